"""Triton random masking + gather and un-shuffle with mask tokens against the eager references
(shared/DESIGN.md sections 1 and 2): outputs, masks, every gradient, determinism, bad input,
and the tiny MAE with these kernels on and off."""

import pytest
import torch

import mimfast
from mimfast import ops
from mimfast.kernels import masking as km
from mimfast.models import mae_vit_tiny_patch16
from mimfast.nn import Attention
from tolerance import DEVICE, FLOAT_DTYPES, assert_2x_rule, max_err, poison_

CUDA = DEVICE == "cuda"

# (N, L, D, mask_ratio, pos_embed trainable): D from 32 to 1280 incl. 80; L from 16 to 576;
# K never a power of two except where L forces it.
MASK_CASES = [
    (2, 16, 32, 0.0, True),
    (3, 50, 80, 0.75, False),
    (2, 49, 1280, 0.4, True),
    (2, 197, 48, 0.9, True),
    (1, 576, 32, 0.75, False),
]
if CUDA:
    MASK_CASES += [(16, 196, 768, 0.75, False), (8, 256, 1280, 0.75, True), (4, 576, 1024, 0.4, True),
                   (5, 197, 80, 0.9, True)]


@pytest.fixture(autouse=True)
def _poison_new_buffers(monkeypatch):
    """Every buffer a kernel launcher allocates starts as NaN (floats) or -7 (ints), so an
    element a kernel forgets to write fails the comparison."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.device.type != "meta":
            poison_(t) if t.is_floating_point() else t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _unique_noise(N, L, device, dtype=torch.float32):
    """Uniform noise without ties inside a sample (so argsort's order is unique)."""
    return ((torch.rand(N, L, device=device, dtype=torch.float64) + torch.arange(L, device=device).double()
             [torch.argsort(torch.rand(N, L, device=device), dim=1)]) / L).to(dtype)


def _check_close(name, out, ref_lowp, ref_f64, dtype, fp32_rtol=1e-6):
    """The 2x rule; fp32 with an atol of a few ulps of the largest value (rtol = atol = 1e-5
    against float64 passed an output or a pos_embed gradient 1e-5 off). ``fp32_rtol``: more for
    a sum over many rows (the mask token's gradient: every masked position of the batch)."""
    assert out.dtype == ref_lowp.dtype and out.shape == ref_lowp.shape, name
    atol = fp32_rtol * max(1e-2, ref_f64.abs().max().item()) if dtype == torch.float32 else 1e-5
    assert_2x_rule(name, out, ref_lowp, ref_f64, atol=atol)


def _close_fp32(a, b, msg=""):
    """fp32 Triton vs eager (sums of a few gradient rows): a few ulps of the largest value apart."""
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, msg
    assert max_err(a, b) <= 1e-6 * max(1.0, b.abs().max().item()), msg


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("N,L,D,ratio,pos_grad", MASK_CASES)
def test_random_masking_matches_reference(device, dtype, N, L, D, ratio, pos_grad):
    x = torch.randn(N, L, D, device=device, dtype=dtype)
    pos = torch.randn(1, L, D, device=device, dtype=dtype)
    noise = _unique_noise(N, L, device)
    K = ops.num_kept(L, ratio)

    def run(backend, x, pos):
        xa = x.detach().clone().requires_grad_(True)
        pa = pos.detach().clone().requires_grad_(pos_grad)
        vis, mask, ids = ops.random_masking(xa, ratio, pos_embed=pa, noise=noise, backend=backend)
        return xa, pa, vis, mask, ids

    xt, pt, vis, mask, ids = run("triton", x, pos)
    xr, pr, vis_r, mask_r, ids_r = run("eager", x, pos)
    x64, p64, vis_64, _, _ = run("eager", x.double(), pos.double())
    assert vis.shape == (N, K, D) and vis.dtype == dtype
    assert torch.equal(mask, mask_r) and mask.dtype == torch.float32
    assert torch.equal(ids, ids_r) and ids.dtype == torch.int64
    _check_close("x_visible", vis, vis_r, vis_64, dtype)

    g = torch.randn(N, K, D, device=device, dtype=dtype)
    vis.backward(g)
    vis_r.backward(g)
    vis_64.backward(g.double())
    # the gather's gradient is a copy: exact, zeros at removed positions
    assert torch.equal(xt.grad, xr.grad)
    assert torch.equal(xt.grad[mask.bool()], torch.zeros_like(xt.grad[mask.bool()]))
    if pos_grad:
        _check_close("grad pos_embed", pt.grad, pr.grad, p64.grad, dtype)
    else:
        assert pt.grad is None


def test_random_masking_mixed_dtypes_promote_like_reference(device):
    """bf16 tokens + fp32 pos_embed (autocast): the output is fp32, as ``x + pos_embed`` is."""
    N, L, D = 3, 50, 80
    x = torch.randn(N, L, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(1, L, D, device=device, requires_grad=True)
    noise = _unique_noise(N, L, device)
    vis, mask, ids = ops.random_masking(x, 0.75, pos_embed=pos, noise=noise, backend="triton")
    vis_r, mask_r, ids_r = ops.random_masking(x, 0.75, pos_embed=pos, noise=noise, backend="eager")
    assert vis.dtype == vis_r.dtype == torch.float32
    torch.testing.assert_close(vis, vis_r, rtol=0, atol=0)
    g = torch.randn_like(vis)
    gx, gp = torch.autograd.grad(vis, (x, pos), g)
    gx_r, gp_r = torch.autograd.grad(vis_r, (x, pos), g)
    assert gx.dtype == torch.bfloat16 and gp.dtype == torch.float32
    assert torch.equal(gx, gx_r)
    _close_fp32(gp, gp_r)


def test_random_masking_without_pos_and_strided_inputs(device):
    N, L, D = 2, 40, 96
    base = torch.randn(N, D, L, device=device)
    x = base.transpose(1, 2)  # (N, L, D) with stride 1 along L, like timm's PatchEmbed output
    noise = _unique_noise(N, 2 * L, device)[:, ::2]  # strided noise
    vis, mask, ids = ops.random_masking(x, 0.6, noise=noise, backend="triton")
    vis_r, mask_r, ids_r = ops.random_masking(x, 0.6, noise=noise, backend="eager")
    assert torch.equal(vis, vis_r) and torch.equal(mask, mask_r) and torch.equal(ids, ids_r)


@pytest.mark.parametrize("noise_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_noise_dtypes_and_ties_follow_stable_argsort(device, noise_dtype):
    """Noise is compared in its own dtype; ties (common in half precision) go to the lower index."""
    N, L, D = 3, 64, 32
    x = torch.randn(N, L, D, device=device)
    noise = torch.rand(N, L, device=device).to(noise_dtype)
    noise[:, 5] = noise[:, 9]  # at least one tie per sample
    K = ops.num_kept(L, 0.75)
    vis, mask, ids = ops.random_masking(x, 0.75, noise=noise, backend="triton")
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    assert torch.equal(ids, ids_restore)
    assert torch.equal(vis, torch.gather(x, 1, ids_shuffle[:, :K, None].expand(-1, -1, D)))
    assert torch.equal(mask, (ids_restore >= K).float())


def test_same_seed_same_mask_as_eager(device):
    x = torch.randn(4, 49, 32, device=device)  # short rows: a tie in torch.rand is unlikely
    torch.manual_seed(11)
    got = ops.random_masking(x, 0.75, backend="triton")
    torch.manual_seed(11)
    want = ops.random_masking(x, 0.75, backend="eager")
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_argsort_ranks_variant_equals_rank_count(device):
    """The kernel's other mode (ranks from torch.argsort, gather only) gives the same result."""
    N, L, D, K = 3, 50, 80, 12
    x = torch.randn(N, L, D, device=device)
    pos = torch.randn(L, D, device=device)
    noise = _unique_noise(N, L, device)
    ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    a = km.masking_forward(x, pos, noise, K, write_ids_keep=True)
    b = km.masking_forward(x, pos, noise, K, ids_restore=ids_restore, write_ids_keep=True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(a[3].long(), torch.argsort(noise, dim=1)[:, :K])


# (N, L, D, mask_ratio, pos_embed trainable) for the decoder input
UNSHUFFLE_CASES = [
    (2, 16, 32, 0.0, False),
    (3, 50, 80, 0.75, True),
    (2, 49, 1280, 0.4, True),
    (2, 197, 64, 0.9, False),
    (1, 576, 32, 0.75, True),
]
if CUDA:
    UNSHUFFLE_CASES += [(16, 196, 512, 0.75, False), (8, 256, 512, 0.75, True), (4, 576, 1280, 0.4, True),
                        (5, 197, 80, 0.9, True)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("N,L,D,ratio,pos_grad", UNSHUFFLE_CASES)
def test_unshuffle_matches_reference(device, dtype, N, L, D, ratio, pos_grad):
    K = ops.num_kept(L, ratio)
    ids_restore = torch.argsort(torch.rand(N, L, device=device), dim=1)
    x = torch.randn(N, 1 + K, D, device=device, dtype=dtype)
    mt = torch.randn(1, 1, D, device=device, dtype=dtype)
    pos = torch.randn(1, 1 + L, D, device=device, dtype=dtype)

    def run(backend, x, mt, pos):
        xa = x.detach().clone().requires_grad_(True)
        ma = mt.detach().clone().requires_grad_(True)
        pa = pos.detach().clone().requires_grad_(pos_grad)
        return xa, ma, pa, ops.unshuffle_with_mask_token(xa, ma, ids_restore, pos_embed=pa, backend=backend)

    xt, mtt, pt, out = run("triton", x, mt, pos)
    xr, mtr, pr, out_r = run("eager", x, mt, pos)
    x64, mt64, p64, out_64 = run("eager", x.double(), mt.double(), pos.double())
    assert out.shape == (N, 1 + L, D) and out.dtype == dtype
    _check_close("decoder input", out, out_r, out_64, dtype)

    g = torch.randn(N, 1 + L, D, device=device, dtype=dtype)
    for o, gg in ((out, g), (out_r, g), (out_64, g.double())):
        o.backward(gg)
    assert torch.equal(xt.grad, xr.grad)  # gathered rows, cls row passed through: exact copies
    _check_close("grad mask_token", mtt.grad, mtr.grad, mt64.grad, dtype, fp32_rtol=4e-6)
    if pos_grad:
        _check_close("grad pos_embed", pt.grad, pr.grad, p64.grad, dtype)
    else:
        assert pt.grad is None


def test_unshuffle_mixed_dtypes_and_strided_inputs(device):
    """bf16 decoder tokens, fp32 mask token and pos_embed: fp32 out, like cat + add; x and the
    output gradient may be views."""
    N, L, D, K = 3, 50, 80, 12
    ids_restore = torch.argsort(torch.rand(N, L, device=device), dim=1)
    x = torch.randn(N, 1 + K, 2 * D, device=device, dtype=torch.bfloat16)[..., ::2].requires_grad_(True)
    mt = torch.randn(1, 1, D, device=device, requires_grad=True)
    pos = torch.randn(1, 1 + L, D, device=device)
    out = ops.unshuffle_with_mask_token(x, mt, ids_restore, pos, backend="triton")
    out_r = ops.unshuffle_with_mask_token(x, mt, ids_restore, pos, backend="eager")
    assert out.dtype == out_r.dtype == torch.float32
    torch.testing.assert_close(out, out_r, rtol=0, atol=0)
    g = torch.randn(N, 1 + L, 2 * D, device=device)[..., 1::2]
    gx, gm = torch.autograd.grad(out, (x, mt), g)
    gx_r, gm_r = torch.autograd.grad(out_r, (x, mt), g)
    assert gx.dtype == torch.bfloat16 and gm.dtype == torch.float32
    assert torch.equal(gx, gx_r)
    _close_fp32(gm, gm_r)


def test_gradients_are_bit_identical_run_to_run(device):
    N, L, D = (64, 196, 512) if CUDA else (4, 50, 80)
    K = ops.num_kept(L, 0.75)
    ids_restore = torch.argsort(torch.rand(N, L, device=device), dim=1)
    x = torch.randn(N, 1 + K, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    mt = torch.randn(1, 1, D, device=device, requires_grad=True)
    dpos = torch.randn(1, 1 + L, D, device=device, requires_grad=True)
    g = torch.randn(N, 1 + L, D, device=device)
    xe = torch.randn(N, L, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(1, L, D, device=device, requires_grad=True)
    noise = torch.rand(N, L, device=device)

    def grads():
        out = ops.unshuffle_with_mask_token(x, mt, ids_restore, dpos, backend="triton")
        vis = ops.random_masking(xe, 0.75, pos, noise, backend="triton")[0]
        return torch.autograd.grad((out * g).sum() + vis.float().square().sum(), (x, mt, dpos, xe, pos))

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="needs a GPU: tensors above 2**31 elements")
def test_int64_offsets_past_2_31_elements(device):
    N, L, D = 10_960, 196, 1_000  # N*L*D > 2**31
    assert N * L * D > 2**31
    K = ops.num_kept(L, 0.75)
    x = torch.empty(N, L, D, device=device, dtype=torch.bfloat16).normal_()
    noise = torch.rand(N, L, device=device)
    vis, mask, ids = ops.random_masking(x, 0.75, noise=noise, backend="triton")
    tail = slice(N - 3, N)
    vis_r, mask_r, ids_r = ops.random_masking(x[tail], 0.75, noise=noise[tail], backend="eager")
    assert torch.equal(vis[tail], vis_r) and torch.equal(ids[tail], ids_r)
    del x
    dec = torch.empty(N, 1 + K, D, device=device, dtype=torch.bfloat16).normal_()
    mt = torch.randn(1, 1, D, device=device, dtype=torch.bfloat16)
    out = ops.unshuffle_with_mask_token(dec, mt, ids, backend="triton")
    out_r = ops.unshuffle_with_mask_token(dec[tail], mt, ids[tail], backend="eager")
    assert torch.equal(out[tail], out_r)


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda d: ops.unshuffle_with_mask_token(torch.randn(2, 5, 8, device=d), torch.randn(1, 1, 8, device=d),
                                                 torch.zeros(2, 16, dtype=torch.int32, device=d), backend="triton"),
         TypeError, "ids_restore"),
        (lambda d: ops.unshuffle_with_mask_token(torch.randn(2, 5, 8, device=d), torch.randn(1, 1, 8, device=d),
                                                 torch.zeros(3, 16, dtype=torch.int64, device=d), backend="triton"),
         ValueError, "ids_restore"),
        (lambda d: ops.unshuffle_with_mask_token(torch.randn(2, 5, 8, device=d), torch.randn(1, 1, 4, device=d),
                                                 torch.zeros(2, 16, dtype=torch.int64, device=d), backend="triton"),
         ValueError, "mask_token"),
        (lambda d: ops.unshuffle_with_mask_token(torch.randn(2, 5, 8, device=d), torch.randn(1, 1, 8, device=d),
                                                 torch.zeros(2, 16, dtype=torch.int64, device=d),
                                                 torch.randn(1, 16, 8, device=d), backend="triton"),
         ValueError, "pos_embed"),
        (lambda d: ops.unshuffle_with_mask_token(torch.randn(2, 5, 8, device=d, dtype=torch.float64),
                                                 torch.randn(1, 1, 8, device=d),
                                                 torch.zeros(2, 16, dtype=torch.int64, device=d), backend="triton"),
         TypeError, "x must be float32"),
        (lambda d: ops.random_masking(torch.randn(2, 16, 8, device=d), 0.75, torch.randn(1, 15, 8, device=d),
                                      backend="triton"),
         ValueError, "pos_embed"),
        (lambda d: ops.random_masking(torch.randn(2, 16, 8, device=d), 0.75, noise=torch.rand(2, 17, device=d),
                                      backend="triton"),
         ValueError, "noise"),
        (lambda d: ops.random_masking(torch.randn(2, 16, 8, device=d), 0.99, backend="triton"),
         ValueError, "K == 0"),
        (lambda d: ops.random_masking(torch.randn(2, 16, 8, device=d, dtype=torch.float64), 0.5, backend="triton"),
         TypeError, "x must be float32"),
        (lambda d: km.masking_backward(torch.randn(2, 4, 8, device=d), torch.zeros(2, 15, dtype=torch.int64, device=d),
                                       16, torch.float32, None),
         ValueError, "ids_restore"),
        (lambda d: km.masking_forward(torch.randn(2, 16, 8, device=d), None, torch.rand(2, 16, device=d), 17),
         ValueError, "K must be"),
    ],
)
def test_bad_input_names_the_argument(device, call, err, match):
    with pytest.raises(err, match=match):
        call(device)


def test_tiny_mae_same_loss_and_gradients_kernels_on_and_off(device, monkeypatch, no_tf32):
    """The tiny MAE with this issue's kernels (masked patch embedding, un-shuffle) against the
    eager model on the same weights and noise; attention and the loss stay eager in both runs so
    the comparison isolates these kernels."""
    torch.manual_seed(3)
    model = mae_vit_tiny_patch16(img_size=32, patch_size=8, depth=1).to(device)
    imgs = torch.randn(2, 3, 32, 32, device=device)
    noise = torch.rand(2, 16, device=device)
    eager_loss = ops.masked_patch_loss
    monkeypatch.setattr(mimfast.ops, "masked_patch_loss", lambda *a, **k: eager_loss(*a, **{**k, "backend": "eager"}))
    from mimfast.ops import _masking_triton

    calls = {"embed": 0, "unshuffle": 0}
    real_embed, real_unshuffle = ops.masked_patch_embed, _masking_triton.unshuffle_with_mask_token_triton

    def spy_embed(*a, **k):
        calls["embed"] += 1
        return real_embed(*a, **k)

    def spy_unshuffle(*a, **k):
        calls["unshuffle"] += 1
        return real_unshuffle(*a, **k)

    monkeypatch.setattr(mimfast.ops, "masked_patch_embed", spy_embed)
    monkeypatch.setattr(_masking_triton, "unshuffle_with_mask_token_triton", spy_unshuffle)

    def run(kernels):
        model.set_kernels(kernels)
        for m in model.modules():
            if isinstance(m, Attention):
                m.kernels = "eager"
        model.zero_grad(set_to_none=True)
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), pred.detach(), mask, grads

    loss_t, pred_t, mask_t, grads_t = run("triton")
    assert calls["embed"] == 1 and calls["unshuffle"] == 1
    loss_e, pred_e, mask_e, grads_e = run("eager")
    assert calls["embed"] == 1 and calls["unshuffle"] == 1  # the eager run went around them
    assert torch.equal(mask_t, mask_e)
    torch.testing.assert_close(loss_t, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred_t, pred_e, rtol=1e-4, atol=1e-5)
    assert grads_t.keys() == grads_e.keys()
    assert {"patch_embed.proj.weight", "patch_embed.proj.bias", "mask_token", "cls_token"} <= grads_t.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_t[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gpu_tiling_under_the_interpreter(device, monkeypatch):
    """The CPU runs whole rows per program; this runs the GPU tiling (tails in rows and D,
    several samples per program with a short last chunk) through the same checks."""
    monkeypatch.setattr(km, "GPU_TILES_ON_CPU", True)
    N, L, D, ratio = 3, 20, 272, 0.6  # 2 row blocks of 16, 2 D blocks of 256, chunks of 2 + 1
    K = ops.num_kept(L, ratio)
    x = torch.randn(N, L, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(1, L, D, device=device, requires_grad=True)
    noise = _unique_noise(N, L, device)
    outs = [ops.random_masking(x, ratio, pos, noise, backend=b) for b in ("triton", "eager")]
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    g = torch.randn(N, K, D, device=device)
    (gx, gp), (gx_r, gp_r) = (torch.autograd.grad(o[0], (x, pos), g) for o in outs)
    assert torch.equal(gx, gx_r)
    _close_fp32(gp, gp_r)

    dec = torch.randn(N, 1 + K, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    mt = torch.randn(1, 1, D, device=device, requires_grad=True)
    dpos = torch.randn(1, 1 + L, D, device=device, requires_grad=True)
    ids = outs[1][2]
    o_t, o_r = (ops.unshuffle_with_mask_token(dec, mt, ids, dpos, backend=b) for b in ("triton", "eager"))
    assert torch.equal(o_t, o_r)
    g = torch.randn(N, 1 + L, D, device=device)
    gt, gr = (torch.autograd.grad(o, (dec, mt, dpos), g) for o in (o_t, o_r))
    assert torch.equal(gt[0], gr[0])
    _close_fp32(gt[1], gr[1], "grad mask_token")
    _close_fp32(gt[2], gr[2], "grad pos_embed")


# --------------------------------------------------------------------------------------------
# random masking, sort variant (masking_forward(method="sort"), MASKING_METHOD = "sort")
# --------------------------------------------------------------------------------------------
SORT_LENGTHS = [16, 49, 196, 257, 576]
SORT_RATIOS = [0.0, 0.4, 0.75, 0.9]


def _tied_noise(N, L, device, dtype=torch.float32):
    """Noise in [0, 1) where about a third of the positions repeat another position's value
    (ties, in either order of positions), with exact zeros among them."""
    noise = torch.rand(N, L, device=device).to(dtype)
    src = torch.randint(0, L, (N, L // 3), device=device)
    dst = torch.randint(0, L, (N, L // 3), device=device)
    noise.scatter_(1, dst, noise.gather(1, src))
    noise[:, L // 2] = 0.0
    noise[:, L // 5] = 0.0
    return noise


def _stable_ranks(noise):
    """ids_restore of a stable argsort (ties to the lower position), computed on the CPU."""
    return torch.argsort(torch.argsort(noise.cpu(), dim=1, stable=True), dim=1).to(noise.device)


@pytest.mark.parametrize("L", SORT_LENGTHS)
def test_sort_variant_equals_count_kernel_with_ties(device, L):
    """mask, ids_restore, ids_keep and the gathered rows (+ pos) are bit-identical to the
    counting kernel's, for every ratio, on noise with ties; ranks are those of a stable argsort
    (the reference's unstable torch.argsort orders ties arbitrarily on the CPU from L = 49).
    The counting kernel runs once with K = L: its ranks do not depend on K, and its output rows
    in rank order hold every ratio's output as a prefix."""
    N, D = (2, 24) if not CUDA else (16, 200)
    dtype = FLOAT_DTYPES[SORT_LENGTHS.index(L) % 3]
    noise = _tied_noise(N, L, device)
    assert (torch.sort(noise, dim=1).values.diff(dim=1) == 0).any(dim=1).all()  # ties in every sample
    x = torch.randn(N, L, D, device=device, dtype=dtype)
    pos = torch.randn(L, D, device=device, dtype=dtype)
    all_rows, _, ranks, order = km.masking_forward(x, pos, noise, L, write_ids_keep=True, method="count")
    assert torch.equal(ranks, _stable_ranks(noise))
    for ratio in SORT_RATIOS:
        K = ops.num_kept(L, ratio)
        vis, mask, ids, ids_keep = km.masking_forward(x, pos, noise, K, write_ids_keep=True, method="sort")
        assert vis.dtype == dtype and ids_keep.dtype == torch.int32
        assert torch.equal(ids, ranks), f"ids_restore (L={L}, ratio={ratio})"
        assert torch.equal(mask, (ranks >= K).float()), f"mask (L={L}, ratio={ratio})"
        assert torch.equal(ids_keep, order[:, :K]), f"ids_keep (L={L}, ratio={ratio})"
        assert torch.equal(vis, all_rows[:, :K]), f"x_visible (L={L}, ratio={ratio}, {dtype})"
    if L == 49:  # and the counting kernel at a ratio of its own, once
        want = km.masking_forward(x, pos, noise, K, write_ids_keep=True, method="count")
        for g, w in zip((vis, mask, ids, ids_keep), want):
            assert torch.equal(g, w)


@pytest.mark.parametrize("L,ratio,dtype", [pytest.param(L, SORT_RATIOS[i % 4], FLOAT_DTYPES[i % 3], id=f"L{L}-{i}")
                                           for i, L in enumerate(SORT_LENGTHS)])
def test_sort_variant_op_matches_reference_with_gradients(device, monkeypatch, L, ratio, dtype):
    """The public op with MASKING_METHOD = "sort": outputs and gradients of x and pos_embed
    bit-identical to the counting kernel's, equal to the eager reference (no ties)."""
    from mimfast.ops import _masking_triton

    N, D = (2, 40) if not CUDA else (8, 768)
    x = torch.randn(N, L, D, device=device, dtype=dtype)
    pos = torch.randn(1, L, D, device=device, dtype=dtype)
    noise = _unique_noise(N, L, device)
    K = ops.num_kept(L, ratio)
    g = torch.randn(N, K, D, device=device, dtype=dtype)

    def run(backend, method=None):
        if method is not None:
            monkeypatch.setattr(_masking_triton, "MASKING_METHOD", method)
        xa = x.detach().clone().requires_grad_(True)
        pa = pos.detach().clone().requires_grad_(True)
        out = ops.random_masking(xa, ratio, pos_embed=pa, noise=noise, backend=backend)
        return (*out, *torch.autograd.grad(out[0], (xa, pa), g))

    got, count, ref = run("triton", "sort"), run("triton", "count"), run("eager")
    for name, a, b in zip(("x_visible", "mask", "ids_restore", "grad x", "grad pos_embed"), got, count):
        assert torch.equal(a, b), f"{name} differs from the counting kernel"
    vis, mask, ids, gx, gpos = got
    assert torch.equal(mask, ref[1]) and torch.equal(ids, ref[2]) and torch.equal(gx, ref[3])
    x64, p64 = x.double().requires_grad_(True), pos.double().requires_grad_(True)
    vis64 = ops.random_masking(x64, ratio, p64, noise, backend="eager")[0]
    _check_close("x_visible", vis, ref[0], vis64, dtype)
    _check_close("grad pos_embed", gpos, ref[4], torch.autograd.grad(vis64, p64, g.double())[0], dtype)


def test_sort_variant_gpu_tiling_under_the_interpreter(device, monkeypatch):
    """Several programs per sample (BLOCK_R = 16 ranks each, a partial last one), each writing its
    share of mask / ids_restore / ids_keep, D in two blocks with a tail."""
    monkeypatch.setattr(km, "GPU_TILES_ON_CPU", True)
    N, D = 2, 272
    for L, ratio, dtype in ((50, 0.0, torch.bfloat16), (197, 0.75, torch.float16)):
        K = ops.num_kept(L, ratio)  # 50 and 49 ranks: 4 programs per sample, the last with 2 / 1
        x = torch.randn(N, L, D, device=device, dtype=dtype)
        pos = torch.randn(L, D, device=device)
        noise = _tied_noise(N, L, device)
        got = km.masking_forward(x, pos, noise, K, out_dtype=torch.float32, write_ids_keep=True, method="sort")
        want = km.masking_forward(x, pos, noise, K, out_dtype=torch.float32, write_ids_keep=True, method="count")
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        if L == 50:
            masks_only = km.masking_forward(None, None, noise, K, write_ids_keep=True, method="sort")
            assert masks_only[0] is None
            for g, w in zip(masks_only[1:], want[1:]):
                assert torch.equal(g, w)


def test_sort_variant_noise_dtypes_signs_and_strides(device):
    """Half-precision noise (many ties), negative values and -0.0 (ranked as +0.0, as the
    counting kernel's comparisons do), strided noise and tokens: same as the counting kernel.
    float64 noise: the kernel refuses it, the op falls back to counting."""
    N, L, D, K = 3, 70, 48, 23
    x = torch.randn(N, D, L, device=device).transpose(1, 2)  # stride 1 along L
    for noise_dtype in (torch.float16, torch.bfloat16, torch.float32):
        noise = (torch.rand(N, 2 * L, device=device) * 2 - 1).to(noise_dtype)[:, ::2]
        noise[:, 3], noise[:, 8], noise[:, 11] = 0.0, -0.0, 0.0
        noise[0, 20] = float("inf")
        noise[1, 21] = -float("inf")
        got = km.masking_forward(x, None, noise, K, write_ids_keep=True, method="sort")
        want = km.masking_forward(x, None, noise, K, write_ids_keep=True, method="count")
        for g, w in zip(got, want):
            assert torch.equal(g, w), noise_dtype
        assert torch.equal(got[2], _stable_ranks(noise.float()))
    noise64 = torch.rand(N, L, device=device, dtype=torch.float64)
    with pytest.raises(TypeError, match="noise must be float32"):
        km.masking_forward(x, None, noise64, K, method="sort")
    from mimfast.ops._masking_triton import random_masking_triton

    got = random_masking_triton(x, 0.75, None, noise64, method="sort")
    want = ops.random_masking(x, 0.75, noise=noise64, backend="eager")
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("L", [16, 49])
def test_tl_sort_itself_gives_the_same_ranks(device, monkeypatch, L):
    """USE_TL_SORT: triton's own tl.sort on the packed int64 keys (slow under the interpreter:
    its xor_sum runs element by element, so small L here) equals this file's network."""
    monkeypatch.setattr(km, "USE_TL_SORT", True)
    N, D, K = 2, 24, ops.num_kept(L, 0.75)
    x = torch.randn(N, L, D, device=device, dtype=torch.float16)
    noise = _tied_noise(N, L, device)
    got = km.masking_forward(x, None, noise, K, write_ids_keep=True, method="sort")
    want = km.masking_forward(x, None, noise, K, write_ids_keep=True, method="count")
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_sort_variant_bad_arguments(device):
    x, noise = torch.randn(2, 16, 8, device=device), torch.rand(2, 16, device=device)
    with pytest.raises(ValueError, match="method must be"):
        km.masking_forward(x, None, noise, 4, method="argsort")
    with pytest.raises(ValueError, match="ids_restore must be None"):
        km.masking_forward(x, None, noise, 4, ids_restore=torch.zeros(2, 16, dtype=torch.int64, device=device),
                           method="sort")
    from mimfast.ops._masking_triton import random_masking_triton

    with pytest.raises(ValueError, match="method must be"):
        random_masking_triton(x, 0.5, None, noise, method="Sort")


@pytest.mark.parametrize("gpu_tiles", [False, True])
@pytest.mark.parametrize("R,M", [(1, 1), (5, 17), (481, 512), (37, 1000), (3, 4099)])
def test_sum_partials_sums_every_row_in_a_fixed_order(device, monkeypatch, gpu_tiles, R, M):
    """The second pass of the deterministic reductions (the mask token's and the positional
    embedding's gradients): every row summed in fp32, tails in R and M, poisoned outputs
    overwritten, the same bits twice."""
    monkeypatch.setattr(km, "GPU_TILES_ON_CPU", gpu_tiles)
    partials = torch.randn(R, M, device=device, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((M,), float("nan"), device=device, dtype=dtype)
        got = km.sum_partials(partials, out)
        assert got is out
        want = partials.double().sum(0)
        # fp32 sums of R terms: the 2x rule against an fp32 reference's error (DESIGN.md)
        ref_err = (partials.sum(0).double() - want).abs().max().item()
        bound = 2 * ref_err + R * 1e-6 * partials.abs().max().item() if dtype == torch.float32 else 1e-2 * R ** 0.5
        assert (got.double() - want).abs().max().item() <= bound
        assert torch.equal(km.sum_partials(partials, torch.empty_like(out)), got)
    with pytest.raises(ValueError, match="partials"):
        km.sum_partials(partials.double(), torch.empty(M, device=device))
    with pytest.raises(ValueError, match="out"):
        km.sum_partials(partials, torch.empty(M + 1, device=device))
