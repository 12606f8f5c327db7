"""The eager references: hand-computed cases and the invariants of the MAE hot paths."""

import math

import numpy as np
import pytest
import torch

from mimfast import ops
from mimfast.backend import BackendUnavailableError, resolve, use_backend
from mimfast.models.pos_embed import get_2d_sincos_pos_embed


def test_patchify_order_and_roundtrip():
    imgs = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    x = ops.patchify(imgs, 2)  # (2, 2*3, 2*2*3)
    assert x.shape == (2, 6, 12)
    # patch (row 0, col 1), in (p, q, c) order
    n, hh, ww, p = 1, 0, 1, 2
    expect = [imgs[n, c, hh * p + pi, ww * p + qi] for pi in range(p) for qi in range(p) for c in range(3)]
    assert torch.equal(x[n, hh * 3 + ww], torch.stack(expect))
    assert torch.equal(ops.unpatchify(x, 2, 3, grid_size=(2, 3)), imgs)


def test_masked_patch_loss_hand_computed():
    # one image, 1 channel, 2x4 pixels, patch 2 -> two patches of 4 values
    imgs = torch.tensor([[[[1.0, 2.0, 5.0, 5.0], [3.0, 4.0, 5.0, 9.0]]]])
    pred = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])
    mask = torch.tensor([[1.0, 0.0]])
    # patch 0 = [1, 2, 3, 4]; MSE vs 0 = (1 + 4 + 9 + 16) / 4 = 7.5; patch 1 has weight 0
    loss = ops.masked_patch_loss(pred, imgs, mask, 2, norm_pix=False, backend="eager")
    assert loss.item() == pytest.approx(7.5)
    # norm_pix: mean 2.5, unbiased var 5/3 -> target (t - 2.5) / sqrt(5/3 + 1e-6)
    t = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3 + 1e-6)
    loss = ops.masked_patch_loss(pred, imgs, mask, 2, norm_pix=True, backend="eager")
    assert loss.item() == pytest.approx((t**2).mean().item(), rel=1e-6)
    # L1 with weights 0.5 / 1.5: patch 1 = [5, 5, 5, 9], |1 - t| mean = (4 + 4 + 4 + 8) / 4 = 5
    mask = torch.tensor([[0.5, 1.5]])
    loss = ops.masked_patch_loss(pred, imgs, mask, 2, norm_pix=False, loss="l1", backend="eager")
    assert loss.item() == pytest.approx((0.5 * 2.5 + 1.5 * 5.0) / 2.0)


def test_masked_patch_loss_all_weights_zero_is_zero():
    pred = torch.randn(2, 4, 12, requires_grad=True)
    imgs = torch.randn(2, 3, 4, 4)
    loss = ops.masked_patch_loss(pred, imgs, torch.zeros(2, 4), 2, backend="eager")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.parametrize("L,ratio", [(196, 0.75), (49, 0.4), (50, 0.9), (16, 0.0), (257, 0.75)])
def test_random_masking_invariants(L, ratio):
    N, D = 3, 8
    x = torch.randn(N, L, D)
    pos = torch.randn(1, L, D)
    K = int(L * (1 - ratio))
    xv, mask, ids_restore = ops.random_masking(x, ratio, pos_embed=pos, backend="eager")
    assert xv.shape == (N, K, D) and mask.shape == (N, L) and ids_restore.dtype == torch.int64
    assert torch.equal(mask.sum(1), torch.full((N,), float(L - K)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # ids_restore inverts the shuffle: ids_shuffle[ids_restore] == arange
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(N, L))
    # the visible rows are x + pos at the kept positions, in shuffle order
    for n in range(N):
        kept = ids_shuffle[n, :K]
        assert torch.equal(mask[n, kept], torch.zeros(K))
        torch.testing.assert_close(xv[n], (x + pos)[n, kept])


def test_random_masking_same_seed_same_mask():
    x = torch.randn(2, 49, 4)
    torch.manual_seed(3)
    _, m1, r1 = ops.random_masking(x, 0.75, backend="eager")
    torch.manual_seed(3)
    noise = torch.rand(2, 49)
    _, m2, r2 = ops.random_masking(x, 0.75, noise=noise, backend="eager")
    assert torch.equal(m1, m2) and torch.equal(r1, r2)


def test_unshuffle_places_rows_and_mask_tokens():
    N, L, D = 2, 9, 5
    x = torch.randn(N, L, D)
    xv, mask, ids_restore = ops.random_masking(x, 0.6, backend="eager")
    K = xv.shape[1]
    cls = torch.randn(N, 1, D)
    tok = torch.randn(1, 1, D)
    pos = torch.randn(1, 1 + L, D)
    out = ops.unshuffle_with_mask_token(torch.cat([cls, xv], 1), tok, ids_restore, pos, backend="eager")
    assert out.shape == (N, 1 + L, D)
    torch.testing.assert_close(out[:, 0], cls[:, 0] + pos[0, 0])
    for n in range(N):
        for l in range(L):
            r = ids_restore[n, l].item()
            want = (x[n, l] if r < K else tok[0, 0]) + pos[0, 1 + l]
            assert (mask[n, l] == 0) == (r < K)
            torch.testing.assert_close(out[n, 1 + l], want)


def _sincos_formula(D, gh, gw):
    # for patch (i = row, j = col): first half encodes j (the reference's grid[0]), second half i
    out = np.zeros((gh * gw, D))
    quarter = D // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    for i in range(gh):
        for j in range(gw):
            row = i * gw + j
            out[row, :quarter] = np.sin(j * omega)
            out[row, quarter : 2 * quarter] = np.cos(j * omega)
            out[row, 2 * quarter : 3 * quarter] = np.sin(i * omega)
            out[row, 3 * quarter :] = np.cos(i * omega)
    return out


@pytest.mark.parametrize("D,grid", [(16, 4), (768, 14), (32, (3, 5))])
def test_pos_embed_is_2d_sincos(D, grid):
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    pe = get_2d_sincos_pos_embed(D, grid, cls_token=True)
    assert pe.shape == (1 + gh * gw, D)
    assert np.all(pe[0] == 0)
    np.testing.assert_allclose(pe[1:], _sincos_formula(D, gh, gw), atol=1e-12)


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(1)
    assert resolve("eager", cpu) == "eager"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve("auto", cpu) == "eager"
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        resolve("triton", cpu)
    with pytest.raises(BackendUnavailableError):
        ops.random_masking(torch.randn(1, 4, 2), 0.5, backend="triton")
    with use_backend("eager"):
        assert resolve("auto", cpu) == "eager"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("auto", cpu) == "triton"
    assert resolve("triton", cpu) == "triton"
    with use_backend("eager"):
        assert resolve("auto", cpu) == "eager"
        assert resolve("triton", cpu) == "triton"  # an explicit argument beats the context
    with pytest.raises(ValueError, match="backend"):
        resolve("cuda", cpu)


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda: ops.random_masking(torch.randn(2, 4, 3), float("nan")), ValueError, r"mask_ratio must be in \[0, 1\)"),
        (lambda: ops.random_masking(torch.randn(2, 4, 3), 1.0), ValueError, r"mask_ratio must be in \[0, 1\)"),
        (lambda: ops.random_masking(torch.randn(2, 4, 3), True), TypeError, "mask_ratio must be a float"),
        (lambda: ops.random_masking(torch.randn(2, 4, 3), 0.9), ValueError, "K == 0"),
        (lambda: ops.random_masking(torch.randn(0, 4, 3), 0.5), ValueError, "empty batch"),
        (lambda: ops.random_masking(torch.randn(2, 4, 3), 0.5, pos_embed=torch.randn(1, 5, 3)), ValueError,
         "pos_embed must be"),
        (lambda: ops.random_masking(torch.randn(2, 4, 3), 0.5, noise=torch.rand(2, 5)), ValueError, "noise must be"),
        (lambda: ops.random_masking(torch.randint(0, 3, (2, 4, 3)), 0.5), TypeError, "x must be a floating"),
        (lambda: ops.unshuffle_with_mask_token(torch.randn(2, 3, 4), torch.randn(1, 1, 4),
                                               torch.zeros(2, 4, dtype=torch.int32)), TypeError,
         "ids_restore must be an int64"),
        (lambda: ops.unshuffle_with_mask_token(torch.randn(2, 3, 4), torch.randn(1, 1, 5),
                                               torch.zeros(2, 4, dtype=torch.int64)), ValueError, "mask_token must be"),
        (lambda: ops.unshuffle_with_mask_token(torch.randn(0, 3, 4), torch.randn(1, 1, 4),
                                               torch.zeros(0, 4, dtype=torch.int64)), ValueError, "empty batch"),
        (lambda: ops.masked_patch_loss(torch.randn(1, 4, 11), torch.randn(1, 3, 4, 4), torch.ones(1, 4), 2),
         ValueError, "pred must be"),
        (lambda: ops.masked_patch_loss(torch.randn(1, 4, 12), torch.randn(1, 3, 5, 4), torch.ones(1, 4), 2),
         ValueError, "not a multiple of patch_size"),
        (lambda: ops.masked_patch_loss(torch.randn(1, 4, 12), torch.randn(1, 3, 4, 4), torch.ones(1, 3), 2),
         ValueError, "mask must be"),
        (lambda: ops.masked_patch_loss(torch.randn(1, 4, 12), torch.randn(1, 3, 4, 4), torch.ones(1, 4), 2,
                                       loss="l3"), ValueError, "loss must be one of"),
        (lambda: ops.masked_patch_loss(torch.randn(0, 4, 12), torch.randn(0, 3, 4, 4), torch.ones(0, 4), 2),
         ValueError, "empty batch"),
    ],
)
def test_bad_input_raises_clear_errors(call, err, match):
    """The exact exception type and a message naming the argument (either type passed before)."""
    with pytest.raises(err, match=match):
        call()
