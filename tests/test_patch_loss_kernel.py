"""Fused patch-normalised masked loss (kernels/patch_loss.py) against the eager reference and a
float64 reference: loss and d(loss)/d(pred), odd shapes, strided inputs, low precision under the
2x rule, skipped rows, poisoned gradient buffer, determinism, the MAE model's loss."""

import pytest
import torch

from mimfast import ops
from mimfast.backend import use_backend
from mimfast.kernels.patch_loss import _config, patch_loss_bwd_scale_, patch_loss_fwd
from mimfast.models import mae_vit_tiny_patch16
from mimfast.ops.patch_loss import masked_patch_loss_reference as reference
from tolerance import DEVICE, assert_2x_rule, max_err, poison_, poison_new_buffers


@pytest.fixture(autouse=True)
def _poison_new_buffers(monkeypatch):
    """Every buffer the launcher allocates (the gradient, the per-program partial sums, the loss)
    starts as NaN, so an element or partial the kernels forget to write fails the comparison."""
    poison_new_buffers(monkeypatch)

# fp32 triton vs eager: a few ulps (5e-6 and 1e-5 passed a loss 1e-6 off and a gradient 1e-5 off)
LOSS_TOL = dict(rtol=5e-7, atol=1e-7)


def _assert_grad_close(got, want):
    """fp32 gradients: a few ulps, an atol of 1e-6 of the largest (a fixed 1e-9 was 1e-5 of an
    L1 gradient; elements near 0 cancel in pred - target)."""
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6 * want.abs().max().item())

# (N, C, H, W, p): L = (H/p)(W/p), P = p*p*C
SMALL = [
    (3, 3, 24, 40, 8),  # L=15, P=192, H != W
    (2, 1, 42, 70, 14),  # L=15, P=196, C=1
    (2, 3, 32, 80, 16),  # L=10, P=768
    (2, 3, 28, 42, 14),  # L=6, P=588
]
ISSUE = [
    (1, 3, 56, 56, 8),  # L=49, P=192
    (1, 3, 224, 224, 16),  # L=196, P=768
    (1, 3, 224, 224, 14),  # L=256, P=588
    (1, 3, 224, 224, 32),  # L=49, P=3072
]
if DEVICE == "cuda":
    ISSUE = [(8, 3, 224, 224, 16), (8, 3, 224, 224, 14), (4, 3, 224, 224, 32), (16, 3, 56, 56, 8),
             (8, 1, 224, 160, 16)]


def _inputs(N, C, H, W, p, pred_dtype=torch.float32, img_dtype=torch.float32, ratio=0.75):
    """pred as the MAE decoder gives it: a view of (N, 1 + L, P) without its cls row."""
    L, P = (H // p) * (W // p), p * p * C
    dec = torch.randn(N, 1 + L, P, device=DEVICE, dtype=pred_dtype)
    pred = dec[:, 1:, :]
    imgs = torch.randn(N, C, H, W, device=DEVICE, dtype=img_dtype) * 2 + 0.5
    mask = (torch.rand(N, L, device=DEVICE) < ratio).float()
    mask[0, 0] = 1.0  # never all zero here
    return pred, imgs, mask


def _loss_and_grad(pred, imgs, mask, p, norm_pix, loss, backend, scale=1.0):
    pred = pred.detach().requires_grad_(True)
    out = ops.masked_patch_loss(pred, imgs, mask, p, norm_pix=norm_pix, loss=loss, backend=backend)
    (g,) = torch.autograd.grad(out * scale if scale != 1.0 else out, pred)
    return out.detach(), g


def _f64(pred, imgs, mask, p, norm_pix, loss):
    return _loss_and_grad(pred.double(), imgs.double(), mask.double(), p, norm_pix, loss, "eager")


def _assert_l1_grad(gt, g64):
    """L1: d(loss)/d(pred) is sign(pred - target) * w / (P * sum(w)). Where the sign agrees with
    float64's (it may flip only where pred and target agree to rounding), the magnitude is
    float64's rounded to pred's dtype: within one ulp (the interpreter truncates; fp32 gets a few,
    for a GPU's approximate division), plus one subnormal step for gradients below the dtype's
    normal range."""
    fi = torch.finfo(gt.dtype)
    ulps = 4 if gt.dtype == torch.float32 else 1
    agree = (gt.double().sign() == g64.sign()) & (g64 != 0)
    assert agree.double().mean().item() > 0.99 * (g64 != 0).double().mean().item()
    diff = (gt.double().abs() - g64.abs()).abs()[agree]
    bound = ulps * fi.eps * g64.abs()[agree] + fi.smallest_normal * fi.eps
    assert (diff <= bound).all(), f"L1 gradient magnitude off by up to {(diff / g64.abs()[agree]).max():.3e} (relative)"


@pytest.mark.parametrize("shape", SMALL + ISSUE, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norm_pix,loss", [(True, "mse"), (False, "mse"), (True, "l1"), (False, "l1")])
def test_fp32_matches_reference_and_float64(shape, norm_pix, loss):
    N, C, H, W, p = shape
    pred, imgs, mask = _inputs(*shape)
    lt, gt = _loss_and_grad(pred, imgs, mask, p, norm_pix, loss, "triton")
    le, ge = _loss_and_grad(pred, imgs, mask, p, norm_pix, loss, "eager")
    l64, g64 = _f64(pred, imgs, mask, p, norm_pix, loss)
    assert lt.dtype == torch.float32 and lt.dim() == 0
    assert gt.dtype == pred.dtype and gt.shape == pred.shape
    torch.testing.assert_close(lt, le, **LOSS_TOL)
    if loss == "mse":
        torch.testing.assert_close(gt, ge, rtol=1e-5, atol=1e-5 * ge.abs().max().item())
    else:
        # sign(pred - target) may flip only where pred and target agree to rounding
        far = ~torch.isclose(gt, ge, rtol=1e-5, atol=0)
        assert far.double().mean().item() < 1e-3
        _assert_l1_grad(gt, g64)
    assert_2x_rule("loss", lt, le, l64, atol=5e-7 * l64.abs().item())  # a few fp32 ulps
    if loss == "mse":
        assert_2x_rule("grad", gt, ge, g64, atol=1e-6 * g64.abs().max().item())


LOWP = [(torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("dtypes", LOWP, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
@pytest.mark.parametrize("shape", [SMALL[2], SMALL[1], ISSUE[2]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_low_precision_2x_rule(dtypes, shape, loss):
    pred_dtype, img_dtype = dtypes
    N, C, H, W, p = shape
    pred, imgs, mask = _inputs(*shape, pred_dtype=pred_dtype, img_dtype=img_dtype)
    lt, gt = _loss_and_grad(pred, imgs, mask, p, True, loss, "triton")
    le, ge = _loss_and_grad(pred, imgs, mask, p, True, loss, "eager")
    l64, g64 = _f64(pred, imgs, mask, p, True, loss)
    assert lt.dtype == torch.float32 and gt.dtype == pred_dtype
    assert_2x_rule("loss", lt, le, l64, atol=1e-5)
    if loss == "mse":
        assert_2x_rule("grad", gt, ge, g64, atol=1e-6 * g64.abs().max().item())
    else:
        # l1: |grad| is w / (sum(w) * P) wherever pred != target; signs agree with float64
        # except where |pred - target| is below the inputs' rounding
        assert torch.isfinite(gt).all()
        assert (gt.double().sign() != g64.sign()).double().mean().item() < 0.01
        _assert_l1_grad(gt, g64)  # the signs alone passed a gradient 2% too large


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "pred_last_dim_strided", "mask_strided"])
def test_strided_inputs(layout):
    N, C, H, W, p = 3, 3, 24, 40, 8
    L, P = 15, 192
    pred, imgs, mask = _inputs(N, C, H, W, p)
    if layout == "channels_last":
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # a crop of a larger batch of images: no unit stride anywhere
        big = torch.randn(N + 1, C + 1, H + 8, 2 * W, device=DEVICE)
        imgs = big[1:, 1:, 4:H + 4, ::2]
        assert imgs.shape == (N, C, H, W)
    elif layout == "pred_last_dim_strided":
        pred = torch.randn(N, P, L, device=DEVICE).transpose(1, 2)
    else:
        mask = (torch.rand(L, N, device=DEVICE) < 0.6).float().t()
        mask[0, 0] = 1.0
    for norm_pix in (True, False):
        lt, gt = _loss_and_grad(pred, imgs, mask, p, norm_pix, "mse", "triton")
        le, ge = _loss_and_grad(pred.contiguous(), imgs.contiguous(), mask.contiguous(), p, norm_pix, "mse", "eager")
        torch.testing.assert_close(lt, le, **LOSS_TOL)
        _assert_grad_close(gt, ge)
        # every order of walking a patch gives the same answer on any layout
        for order in (0, 1, 2, 3) if layout == "channels_last" else (0, 1, 3):
            lo, go = patch_loss_fwd(pred, imgs, mask, p, norm_pix, config=(4, 2, 4, order))
            torch.testing.assert_close(lo, le, **LOSS_TOL)
            _assert_grad_close(go, ge)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SMALL + [ISSUE[0]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norm_pix,loss", [(True, "mse"), (False, "l1")])
def test_permuted_order_and_prefetched_weights_match_the_reference(shape, norm_pix, loss, dtype):
    """Order 3 reads pred and writes grad in their own (p, q, c) order and permutes them in the
    kernel; PREFETCH_W loads all a program's weights before its first tile. The same loss and
    gradient as the eager reference on C = 1 and 3, P below its power of two (192, 196, 588),
    tile counts that are not powers of two, tiles past the last row, a poisoned gradient buffer
    and zero-weight rows."""
    N, C, H, W, p = shape
    pred, imgs, mask = _inputs(*shape, pred_dtype=dtype)
    le, ge = _loss_and_grad(pred, imgs, mask, p, norm_pix, loss, "eager")
    for config in ((2, 3, 4, 3), (1, 1, 4, 3), (4, 2, 4, 1), (2, 3, 4, 1, True), (1, 5, 4, 3, True),
                   (4, 2, 4, 0, True)):
        grad = poison_(torch.empty(pred.shape, device=DEVICE, dtype=dtype))
        lo, go = patch_loss_fwd(pred, imgs, mask, p, norm_pix, loss, grad=grad, config=config)
        torch.testing.assert_close(lo, le, **LOSS_TOL)
        assert (go[mask == 0] == 0).all(), config
        got, want = go, ge
        if loss == "l1":  # the same signs except on rounding ties, and the same magnitudes
            agree = go.sign() == ge.sign()
            assert (~agree).double().mean().item() < 1e-3, config
            got, want = go[agree], ge[agree]
        if dtype == torch.bfloat16:
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-6)
        else:
            _assert_grad_close(got, want)


@pytest.mark.parametrize("kind", ["bool", "float16", "weights", "float64"])
def test_mask_dtypes_and_weights(kind):
    N, C, H, W, p = 2, 3, 32, 80, 16
    pred, imgs, mask = _inputs(N, C, H, W, p)
    if kind == "bool":
        mask = mask.bool()
    elif kind == "float16":
        mask = mask.half()
    elif kind == "weights":  # any non-negative weights, some zero
        mask = torch.rand(N, 10, device=DEVICE) * (torch.rand(N, 10, device=DEVICE) < 0.7)
    else:
        mask = mask.double()
    lt, gt = _loss_and_grad(pred, imgs, mask, p, True, "mse", "triton")
    le, ge = _loss_and_grad(pred, imgs, mask.float(), p, True, "mse", "eager")
    torch.testing.assert_close(lt, le, **LOSS_TOL)
    _assert_grad_close(gt, ge)


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_zero_weight_rows_are_not_read(loss):
    """NaN pixels and predictions in zero-weight rows cannot reach the loss or the gradient."""
    N, C, H, W, p = 2, 3, 32, 80, 16
    pred, imgs, mask = _inputs(N, C, H, W, p)
    le, ge = _loss_and_grad(pred, imgs, mask, p, True, loss, "eager")
    pred_nan, imgs_nan = pred.clone(), imgs.clone()
    w_patches = W // p
    for n, l in (mask == 0).nonzero().tolist():
        pred_nan[n, l] = float("nan")
        hi, wi = divmod(l, w_patches)
        imgs_nan[n, :, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p] = float("nan")
    lt, gt = _loss_and_grad(pred_nan, imgs_nan, mask, p, True, loss, "triton")
    torch.testing.assert_close(lt, le, **LOSS_TOL)
    assert torch.isfinite(gt).all()
    assert (gt[mask == 0] == 0).all()
    _assert_grad_close(gt, ge)


@pytest.mark.parametrize("mask_kind", ["float", "bool"])
def test_all_weights_zero_gives_zero_loss_and_gradient(mask_kind):
    pred, imgs, _ = _inputs(2, 3, 24, 40, 8)
    mask = torch.zeros(2, 15, device=DEVICE, dtype=torch.float32 if mask_kind == "float" else torch.bool)
    grad = poison_(torch.empty(2, 15, 192, device=DEVICE))
    loss, grad = patch_loss_fwd(pred, imgs, mask, 8, grad=grad)
    assert loss.item() == 0.0 and (grad == 0).all()
    lt, gt = _loss_and_grad(pred, imgs, mask, 8, True, "mse", "triton")
    assert lt.item() == 0.0 and (gt == 0).all()
    assert reference(pred, imgs, mask, 8).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [SMALL[0], SMALL[2], (1, 3, 64, 32, 32)], ids=lambda s: "x".join(map(str, s)))
def test_poisoned_gradient_buffer_and_gpu_tiling(dtype, shape):
    """Every gradient element is written, with the heuristic tiling and with the GPU's tiling
    (small tiles, several per program, a partial last program) run here too."""
    N, C, H, W, p = shape
    pred, imgs, mask = _inputs(*shape, pred_dtype=dtype)
    le, ge = _loss_and_grad(pred, imgs, mask, p, True, "mse", "eager")
    P = p * p * C
    block_p = 1 << (P - 1).bit_length()
    configs = [None, _config(block_p, interpreted=False)]
    if N * (H // p) * (W // p) < 8:
        configs.append((1, 3, 4))  # one row per tile, three tiles per program, the last one empty
    for config in configs:
        grad = poison_(torch.empty(pred.shape, device=DEVICE, dtype=dtype))
        loss, grad = patch_loss_fwd(pred, imgs, mask, p, grad=grad, config=config)
        assert torch.isfinite(grad).all(), config
        torch.testing.assert_close(loss, le.float(), **LOSS_TOL)
        if dtype == torch.float32:
            _assert_grad_close(grad, ge)
        else:
            torch.testing.assert_close(grad, ge, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_deterministic_bitwise(loss):
    shape = ISSUE[1] if DEVICE == "cuda" else SMALL[2]
    pred, imgs, mask = _inputs(*shape, pred_dtype=torch.bfloat16)
    mask = torch.rand_like(mask)  # weights of all magnitudes: any reordering would show
    a_loss, a_grad = patch_loss_fwd(pred, imgs, mask, shape[-1], loss=loss)
    b_loss, b_grad = patch_loss_fwd(pred, imgs, mask, shape[-1], loss=loss)
    assert torch.equal(a_loss, b_loss) and torch.equal(a_grad, b_grad)


def test_backward_is_a_scale_skipped_at_one():
    pred, imgs, mask = _inputs(*SMALL[0])
    _, g1 = _loss_and_grad(pred, imgs, mask, 8, True, "mse", "triton")
    _, g3 = _loss_and_grad(pred, imgs, mask, 8, True, "mse", "triton", scale=-2.5)
    torch.testing.assert_close(g3, -2.5 * g1)
    # the in-place scale leaves the buffer alone when the incoming gradient is 1 ...
    buf = torch.randn(5, 7, 3, device=DEVICE)
    before = buf.clone()
    patch_loss_bwd_scale_(buf, torch.ones((), device=DEVICE))
    assert torch.equal(buf, before)
    patch_loss_bwd_scale_(buf, torch.full((), 0.5, device=DEVICE))
    assert torch.equal(buf, before * 0.5)
    # more blocks than programs (two on the CPU, four per multiprocessor on a GPU): each program
    # strides over several, the last one partial
    big = torch.randn(3 * 4096 * (2 if DEVICE == "cpu" else 4 * torch.cuda.get_device_properties(0)
                                  .multi_processor_count) + 77, device=DEVICE, dtype=torch.bfloat16)
    want = big * -2.0  # exact: no rounding to compare
    patch_loss_bwd_scale_(big, torch.full((), -2.0, device=DEVICE))
    assert torch.equal(big, want)
    # ... and through .backward() the gradient reaches a leaf's .grad
    leaf = pred.detach().clone().requires_grad_(True)
    ops.masked_patch_loss(leaf, imgs, mask, 8, backend="triton").backward()
    torch.testing.assert_close(leaf.grad, g1)


def test_second_backward_raises():
    pred, imgs, mask = _inputs(*SMALL[0])
    pred = pred.detach().requires_grad_(True)
    loss = ops.masked_patch_loss(pred, imgs, mask, 8, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_no_grad_and_requires_grad_checks():
    pred, imgs, mask = _inputs(*SMALL[0])
    with torch.no_grad():
        lt = ops.masked_patch_loss(pred, imgs, mask, 8, backend="triton")
    torch.testing.assert_close(lt, reference(pred, imgs, mask, 8), **LOSS_TOL)
    with pytest.raises(ValueError, match="imgs requires grad"):
        ops.masked_patch_loss(pred, imgs.requires_grad_(True), mask, 8, backend="triton")
    with pytest.raises(ValueError, match="mask requires grad"):
        ops.masked_patch_loss(pred, imgs.detach(), mask.requires_grad_(True), 8, backend="triton")


@pytest.mark.parametrize(
    "args,err,match",
    [
        (dict(pred=torch.randn(2, 15, 191)), ValueError, "pred must be"),
        (dict(imgs=torch.randn(2, 3, 24, 44)), ValueError, "multiple of patch_size"),
        (dict(mask=torch.ones(2, 14)), ValueError, "mask must be"),
        (dict(mask=torch.ones(2, 15, dtype=torch.int64)), TypeError, "mask must hold float"),
        (dict(pred=torch.randn(2, 15, 192, dtype=torch.float64)), TypeError, "pred must be float32"),
        (dict(imgs=torch.randn(2, 3, 24, 40).to(torch.int32)), TypeError, "imgs must be"),
        (dict(imgs=torch.randn(0, 3, 24, 40)), ValueError, "empty batch"),
        (dict(loss="huber"), ValueError, "loss must be one of"),
        (dict(eps=-1.0), ValueError, "eps must be"),
        (dict(grad=torch.empty(2, 15, 192, dtype=torch.float16)), ValueError, "grad must be a contiguous"),
        (dict(config=(3, 1, 4)), ValueError, "config must be"),
        (dict(config=(2, 1, 4, 2)), ValueError, "config must be"),
        (dict(config=(2, 1, 4, 1, 1)), ValueError, "config must be"),
        (dict(config=(2, 1, 4, 4)), ValueError, "config must be"),
    ],
)
def test_bad_input_raises(args, err, match):
    kw = dict(pred=torch.randn(2, 15, 192), imgs=torch.randn(2, 3, 24, 40), mask=torch.ones(2, 15),
              patch_size=8, loss="mse", eps=1e-6)
    kw.update(args)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with pytest.raises(err, match=match):
        patch_loss_fwd(**kw)
    if "grad" not in args and "config" not in args and "pred must be float32" not in match:
        kw.pop("patch_size")
        with pytest.raises(err, match=match):
            ops.masked_patch_loss(kw.pop("pred"), kw.pop("imgs"), kw.pop("mask"), 8, backend="triton", **kw)


@pytest.mark.parametrize("norm_pix,loss", [(True, "mse"), (False, "l1")])
def test_mae_model_loss_and_gradients_equal_triton_vs_eager(norm_pix, loss, no_tf32):
    """The tiny MAE's loss, d(loss)/d(pred) and the decoder head's gradients with only this op
    switched between backends (the encoder and decoder run eager). Full fp32 convolutions: with
    cuDNN's default TF32, the patch projection's weight gradient rounds the two runs' (slightly
    different) incoming gradients to 10-bit mantissas, and a rounding that falls differently moves
    a term by a TF32 step (2**-10 of it), past this comparison's tolerance."""
    torch.manual_seed(3)
    model = mae_vit_tiny_patch16(img_size=32, patch_size=8, depth=1, decoder_depth=1, norm_pix_loss=norm_pix,
                                 loss=loss, kernels="auto").to(DEVICE)
    imgs = torch.randn(3, 3, 32, 32, device=DEVICE)
    noise = torch.rand(3, 16, device=DEVICE)
    with use_backend("eager"):
        latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise)
        pred = model.forward_decoder(latent, ids_restore)  # a view of (N, 1 + L, P)
    params = [model.decoder_pred.weight, model.decoder_pred.bias, model.patch_embed.proj.weight]
    got = {}
    for name in ("eager", "triton"):
        with use_backend(name):
            out = model.forward_loss(imgs, pred, mask)
        got[name] = (out, *torch.autograd.grad(out, [pred] + params, retain_graph=True))
    (le, *ge), (lt, *gt) = got["eager"], got["triton"]
    assert lt.dtype == torch.float32
    torch.testing.assert_close(lt, le, rtol=5e-6, atol=1e-6)
    for a, b in zip(gt, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())
    assert max_err(gt[0], ge[0]) <= 1e-5 * ge[0].abs().max().item()
