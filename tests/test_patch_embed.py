"""Masked patch embedding (only the kept patches embedded) against the eager reference
(stride-p convolution, then random masking): outputs, masks, every gradient, autocast, same
seed same mask, bad input."""

import pytest
import torch

from mimfast import ops
from mimfast.kernels import patch_embed as kp
from tolerance import DEVICE, FLOAT_DTYPES, assert_2x_rule, max_err, poison_

CUDA = DEVICE == "cuda"

# (N, C, H, W, p, D, mask_ratio)
CASES = [
    (2, 3, 32, 32, 8, 32, 0.75),
    (3, 3, 24, 40, 8, 80, 0.4),  # 3 x 5 grid, non-square image
    (2, 1, 28, 28, 14, 48, 0.0),
    (2, 3, 56, 56, 14, 64, 0.9),  # p = 14 as in ViT-H
]
if CUDA:
    CASES += [(8, 3, 224, 224, 16, 768, 0.75), (4, 3, 224, 224, 14, 1280, 0.75), (6, 3, 96, 160, 16, 80, 0.4)]


@pytest.fixture(autouse=True)
def _poison_new_buffers(monkeypatch):
    """Buffers the launchers allocate start as NaN / -7 so unwritten elements fail."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.device.type != "meta":
            poison_(t) if t.is_floating_point() else t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture(autouse=True)
def _full_fp32(no_tf32):
    """cuDNN convolutions default to TF32 on CUDA; the reference must be full fp32 here."""


def _inputs(N, C, H, W, p, D, device, dtype):
    imgs = torch.randn(N, C, H, W, device=device, dtype=dtype)
    weight = (torch.randn(D, C, p, p, device=device) / (C * p * p) ** 0.5).to(dtype)
    bias = torch.randn(D, device=device, dtype=dtype)
    L = (H // p) * (W // p)
    pos = torch.randn(1, L, D, device=device, dtype=dtype)
    noise = torch.rand(N, L, device=device, dtype=torch.float64)  # no ties
    return imgs, weight, bias, pos, noise


def _run(backend, imgs, weight, bias, pos, noise, ratio, need_imgs=False):
    leaves = [t.detach().clone().requires_grad_(True) for t in (imgs, weight, bias, pos)]
    leaves[0].requires_grad_(need_imgs)
    out = ops.masked_patch_embed(leaves[0], leaves[1], leaves[2], ratio, pos_embed=leaves[3], noise=noise,
                                 backend=backend)
    return leaves, out


def _close_fp32(got, want):
    """fp32 Triton vs eager: a few ulps of the largest value apart (1e-5 passed an output 1e-5 off)."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    assert max_err(got, want) <= 2e-6 * max(1.0, want.abs().max().item())


def _check(name, got, lowp, f64, dtype):
    """The 2x rule; fp32 with an atol of a few ulps of the largest value (rtol = atol = 1e-4
    against float64 passed an output or gradient 1e-5 off)."""
    assert got.dtype == lowp.dtype and got.shape == lowp.shape, name
    atol = 1e-6 * max(1e-2, f64.abs().max().item()) if dtype == torch.float32 else 1e-3
    assert_2x_rule(name, got, lowp, f64, atol=atol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("N,C,H,W,p,D,ratio", CASES)
def test_masked_patch_embed_matches_reference(device, dtype, N, C, H, W, p, D, ratio):
    args = _inputs(N, C, H, W, p, D, device, dtype)
    need_imgs = (N, C) == (2, 3)
    lt, (vis, mask, ids) = _run("triton", *args, ratio, need_imgs)
    lr, (vis_r, mask_r, ids_r) = _run("eager", *args, ratio, need_imgs)
    l64, (vis_64, _, _) = _run("eager", *(a.double() for a in args), ratio, need_imgs)
    K = ops.num_kept((H // p) * (W // p), ratio)
    assert vis.shape == (N, K, D) and vis.dtype == vis_r.dtype
    assert torch.equal(mask, mask_r) and torch.equal(ids, ids_r)
    _check("x_visible", vis, vis_r, vis_64, dtype)
    g = torch.randn_like(vis)
    vis.backward(g)
    vis_r.backward(g)
    vis_64.backward(g.double())
    for name, a, b, c in zip(("imgs", "weight", "bias", "pos_embed"), lt, lr, l64):
        if a.requires_grad:
            _check(f"grad {name}", a.grad, b.grad, c.grad, dtype)


def test_autocast_follows_the_convolution_under_autocast(device):
    """Under autocast the projection runs in the autocast dtype (as conv2d would) and the
    fp32 pos_embed promotes the output to fp32; gradients reach the fp32 parameters."""
    lowp = torch.bfloat16 if device == "cpu" else torch.float16
    imgs, weight, bias, pos, noise = _inputs(2, 3, 32, 48, 8, 80, device, torch.float32)
    g = torch.randn(2, 6, 80, device=device)
    outs = {}
    for backend in ("triton", "eager"):
        w, b, pe = (t.detach().clone().requires_grad_(True) for t in (weight, bias, pos))
        with torch.autocast(device, dtype=lowp):
            vis, mask, ids = ops.masked_patch_embed(imgs, w, b, 0.75, pos_embed=pe, noise=noise, backend=backend)
        assert vis.dtype == torch.float32
        vis.backward(g)
        outs[backend] = (vis, mask, w.grad, b.grad, pe.grad)
    w64, b64, pe64 = (t.detach().double().requires_grad_(True) for t in (weight, bias, pos))
    vis_64 = ops.masked_patch_embed(imgs.double(), w64, b64, 0.75, pe64, noise=noise, backend="eager")[0]
    vis_64.backward(g.double())
    assert torch.equal(outs["triton"][1], outs["eager"][1])
    assert_2x_rule("x_visible (autocast)", outs["triton"][0], outs["eager"][0], vis_64, atol=1e-3)
    # the 2x rule against float64 (kernel vs eager within 2e-2 passed gradients 1% off); the
    # projection's gradients come from low-precision products, pos_embed's from the fp32 output
    for name, i, f64, rel in (("weight", 2, w64.grad, 1e-3), ("bias", 3, b64.grad, 1e-3),
                              ("pos_embed", 4, pe64.grad, 1e-6)):
        assert outs["triton"][i].dtype == torch.float32
        assert_2x_rule(f"grad {name} (autocast)", outs["triton"][i], outs["eager"][i], f64,
                       atol=rel * f64.abs().max().item())


def test_same_seed_same_mask_and_no_pos(device):
    imgs, weight, bias, _, _ = _inputs(3, 3, 32, 32, 8, 32, device, torch.float32)
    torch.manual_seed(5)
    got = ops.masked_patch_embed(imgs, weight, None, 0.75, backend="triton")
    torch.manual_seed(5)
    want = ops.masked_patch_embed(imgs, weight, None, 0.75, backend="eager")
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    _close_fp32(got[0], want[0])


def test_strided_images(device):
    """A channels-last image batch (any strides) reads the same pixels."""
    imgs, weight, bias, pos, noise = _inputs(2, 3, 32, 32, 8, 32, device, torch.float32)
    cl = imgs.to(memory_format=torch.channels_last)
    got = ops.masked_patch_embed(cl, weight, bias, 0.5, pos, noise=noise, backend="triton")[0]
    want = ops.masked_patch_embed(imgs, weight, bias, 0.5, pos, noise=noise, backend="eager")[0]
    _close_fp32(got, want)


def test_gather_and_scatter_patches_are_adjoint(device):
    imgs = torch.randn(2, 3, 24, 40, device=device)
    ids_keep = torch.stack([torch.randperm(15, device=device)[:7] for _ in range(2)]).int()
    patches = kp.gather_patches(imgs, ids_keep, 8, torch.float32)
    want = ops.patchify(imgs, 8).view(2, 15, 8, 8, 3).permute(0, 1, 4, 2, 3).reshape(2, 15, -1)
    assert torch.equal(patches.view(2, 7, -1), torch.gather(want, 1, ids_keep.long()[..., None].expand(-1, -1, 192)))
    back = kp.scatter_patches(patches, ids_keep, 8, torch.zeros_like(imgs))
    kept = torch.zeros(2, 15, device=device).scatter_(1, ids_keep.long(), 1.0).view(2, 1, 3, 1, 5, 1)
    assert torch.equal(back, (imgs.view(2, 3, 3, 8, 5, 8) * kept).view_as(imgs))


@pytest.mark.parametrize(
    "make,err,match",
    [
        (lambda d: (torch.randn(2, 3, 32, 32, device=d), torch.randn(16, 1, 8, 8, device=d), None), ValueError,
         "channels"),
        (lambda d: (torch.randn(2, 3, 30, 32, device=d), torch.randn(16, 3, 8, 8, device=d), None), ValueError,
         "multiple"),
        (lambda d: (torch.randn(2, 3, 32, 32, device=d), torch.randn(16, 3, 8, 8, device=d),
                    torch.randn(15, device=d)), ValueError, "bias"),
        (lambda d: (torch.randn(2, 3, 32, 32, device=d), torch.randn(16, 3, 8, 4, device=d), None), ValueError,
         "weight"),
        (lambda d: (torch.randn(2, 3, 32, 32, device=d), torch.randn(16, 3, 8, 8, device=d, dtype=torch.float16),
                    None), TypeError, "weight dtype"),
        (lambda d: (torch.randn(2, 3, 32, 32, device=d, dtype=torch.float64),
                    torch.randn(16, 3, 8, 8, device=d, dtype=torch.float64), None), TypeError, "float32"),
    ],
)
def test_bad_input_names_the_argument(device, make, err, match):
    imgs, weight, bias = make(device)
    with pytest.raises(err, match=match):
        ops.masked_patch_embed(imgs, weight, bias, 0.75, backend="triton")


def test_bad_masking_arguments(device):
    imgs, weight = torch.randn(2, 3, 32, 32, device=device), torch.randn(16, 3, 8, 8, device=device)
    with pytest.raises(ValueError, match="pos_embed"):
        ops.masked_patch_embed(imgs, weight, None, 0.75, pos_embed=torch.randn(1, 15, 16, device=device),
                               backend="triton")
    with pytest.raises(ValueError, match="noise"):
        ops.masked_patch_embed(imgs, weight, None, 0.75, noise=torch.rand(2, 17, device=device), backend="triton")
    with pytest.raises(ValueError, match="mask_ratio"):
        ops.masked_patch_embed(imgs, weight, None, 1.0, backend="triton")


def test_gpu_tiling_under_the_interpreter(device, monkeypatch):
    """The GPU's small tiles (tails in rows and in C*p*p) through the interpreter."""
    from mimfast.kernels import masking as km

    monkeypatch.setattr(km, "GPU_TILES_ON_CPU", True)
    args = _inputs(3, 3, 24, 40, 8, 300, device, torch.float32)
    lt, (vis, mask, ids) = _run("triton", *args, 0.4, need_imgs=True)
    lr, (vis_r, mask_r, ids_r) = _run("eager", *args, 0.4, need_imgs=True)
    l64, (vis_64, _, _) = _run("eager", *(a.double() for a in args), 0.4, need_imgs=True)
    assert torch.equal(mask, mask_r) and torch.equal(ids, ids_r)
    _check("x_visible", vis, vis_r, vis_64, torch.float32)
    g = torch.randn_like(vis)
    vis.backward(g)
    vis_r.backward(g)
    vis_64.backward(g.double())
    for name, a, b, c in zip(("imgs", "weight", "bias", "pos_embed"), lt, lr, l64):
        _check(f"grad {name}", a.grad, b.grad, c.grad, torch.float32)


# --- ops.patch_embed: every patch (BEiT's, SimMIM's embedding) as one matrix product


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("N,C,H,W,p,D,with_bias", [(2, 3, 32, 32, 8, 32, True), (3, 3, 24, 40, 8, 80, False),
                                                   (2, 1, 28, 28, 14, 48, True)])
def test_patch_embed_matches_the_convolution(device, dtype, N, C, H, W, p, D, with_bias):
    imgs, weight, bias, _, _ = _inputs(N, C, H, W, p, D, device, dtype)
    bias = bias if with_bias else None

    def run(backend, *args):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in args]
        return leaves, ops.patch_embed(*leaves, backend=backend)

    lt, out = run("triton", imgs, weight, bias)
    lr, ref = run("eager", imgs, weight, bias)
    l64, ref64 = run("eager", imgs.double(), weight.double(), bias.double() if bias is not None else None)
    assert out.shape == (N, (H // p) * (W // p), D) and out.dtype == ref.dtype == dtype
    _check("patch_embed", out, ref, ref64, dtype)
    g = torch.randn_like(out)
    for o, gg in ((out, g), (ref, g), (ref64, g.double())):
        o.backward(gg)
    for name, a, b, c in zip(("imgs", "weight", "bias"), lt, lr, l64):
        if a is not None:
            _check(f"patch_embed grad {name}", a.grad, b.grad, c.grad, dtype)


def test_patch_embed_under_autocast_runs_in_the_autocast_dtype(device):
    lowp = torch.bfloat16 if device == "cpu" else torch.float16
    imgs, weight, bias, _, _ = _inputs(2, 3, 32, 48, 8, 80, device, torch.float32)
    g = torch.randn(2, 24, 80, device=device)
    outs = {}
    for backend in ("triton", "eager"):
        w, b = (t.detach().clone().requires_grad_(True) for t in (weight, bias))
        with torch.autocast(device, dtype=lowp):
            out = ops.patch_embed(imgs, w, b, backend=backend)
        assert out.dtype == lowp
        out.float().backward(g)
        outs[backend] = (out, w.grad, b.grad)
    w64, b64 = (t.detach().double().requires_grad_(True) for t in (weight, bias))
    out64 = ops.patch_embed(imgs.double(), w64, b64, backend="eager")
    out64.backward(g.double())
    assert_2x_rule("patch_embed (autocast)", outs["triton"][0], outs["eager"][0], out64, atol=1e-3)
    for name, i, f64 in (("weight", 1, w64.grad), ("bias", 2, b64.grad)):
        assert outs["triton"][i].dtype == torch.float32
        assert_2x_rule(f"patch_embed grad {name} (autocast)", outs["triton"][i], outs["eager"][i], f64,
                       atol=1e-3 * f64.abs().max().item())


def test_patch_embed_bad_input_names_the_argument(device):
    imgs = torch.randn(2, 3, 32, 32, device=device)
    with pytest.raises(ValueError, match="weight has 1 input channels"):
        ops.patch_embed(imgs, torch.randn(8, 1, 8, 8, device=device), None, backend="triton")
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        ops.patch_embed(imgs[..., :30], torch.randn(8, 3, 8, 8, device=device), None, backend="triton")
    with pytest.raises(ValueError, match="bias must be"):
        ops.patch_embed(imgs, torch.randn(8, 3, 8, 8, device=device), torch.randn(7, device=device), backend="triton")
    with pytest.raises(TypeError, match="weight dtype"):
        ops.patch_embed(imgs, torch.randn(8, 3, 8, 8, device=device, dtype=torch.float16), None, backend="triton")


def test_beit_embeds_through_the_op_where_the_module_is_the_plain_convolution(device, monkeypatch):
    from mimfast.models import create_model

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, vocab_size=64)
    model = create_model("beit_base_patch16_224_8k_vocab", kernels="triton", **kw).to(device)
    imgs = torch.randn(2, 3, 32, 32, device=device)
    calls = []
    real = ops.patch_embed
    monkeypatch.setattr(ops, "patch_embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = model._embed_patches(imgs)
    handle = model.patch_embed.register_forward_hook(lambda *a: None)  # a hook needs the module's call
    hooked = model._embed_patches(imgs)
    handle.remove()
    assert calls == [1]
    torch.testing.assert_close(got, model.patch_embed(imgs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked, got, rtol=1e-5, atol=1e-5)
