"""MAE's reconstruction loss, forward + backward (d(loss)/d(pred)), at ViT-B/16, ViT-L/16 and
ViT-H/14 decoder shapes, N = 256, bf16 pred (a view of the decoder output without its cls row),
fp32 images, mask ratio 0.75, norm_pix on.

Variants: eager reference, ``torch.compile`` of the eager reference, the Triton kernel (the
public op with ``backend="triton"``). GB/s counts the bytes that must move: for masked rows
only, pred read + pixels read + gradient written, plus the mask; ``gbps_incl_zero_grad`` adds
the zero gradient of the visible rows, which the kernel also writes (autograd wants a dense
gradient). The ``triton`` row launches the tiling the launcher chose on the device among its
candidates (``mimfast.kernels.tuning``); full runs time each candidate alone too. Peak memory
is what one forward + backward allocates above the inputs. Every row
also has ``host_ms`` and, but for ``torch.compile``, ``graph_ms`` (one CUDA graph replay: the
kernels without launch overhead) with ``graph_gbps`` / ``graph_pct_copy_bw`` /
``graph_gbps_incl_zero_grad`` (``harness.measure``).

    python -m benchmarks.run --out DIR --only patch_loss

Smoke mode (``ctx.smoke``): N = 2 and ``SMOKE_CASES`` (P = 48 and the odd P = 147), same rows.
"""

from __future__ import annotations

import functools

import torch

from benchmarks import harness
from mimfast import ops
from mimfast.kernels.patch_loss import _candidates, _config, patch_loss_fwd
from mimfast.ops.patch_loss import masked_patch_loss_reference

BENCH = "patch_loss"
N = 256
MASK_RATIO = 0.75
# name: (img_size, patch_size, C)
CASES = {
    "vit_b16": (224, 16, 3),
    "vit_l16": (224, 16, 3),  # the loss sees the same shapes as B/16 (decoder width is shared)
    "vit_h14": (224, 14, 3),
}
# kernel-only rows at the B/16 shape (not in --quick): the launcher's tuning candidates
# (BLOCK_R, TILES, num_warps, IMG_ORDER, PREFETCH_W) around the heuristic's (2, 8, 4, 1, False) for
# P = 768 and NCHW images, each timed. The H200 run put the heuristic's at 41% of copy bandwidth; one row a loop
# step (BLOCK_R 1) takes 39-54 registers against 72 in the sm_90 compile: 36-48 warps resident
# per SM against 28
TUNING = [c for _, c in _candidates(*_config(1024, interpreted=False), 1, 3)]
SMOKE_N = 2
SMOKE_CASES = {"vit_b16": (16, 4, 3), "vit_l16": (16, 4, 3), "vit_h14": (21, 7, 3)}


def _inputs(N, img_size, p, C, device, pred_dtype=torch.bfloat16):
    """dec (N, 1 + L, P) decoder output (pred is its view without the cls row), imgs, mask."""
    L = (img_size // p) ** 2
    P = p * p * C
    g = torch.Generator(device=device).manual_seed(0)
    dec = torch.randn(N, 1 + L, P, device=device, dtype=pred_dtype, generator=g).requires_grad_(True)
    imgs = torch.randn(N, C, img_size, img_size, device=device, generator=g)
    # MAE masking: exactly L - int(L * (1 - ratio)) masked per image, at random positions
    keep = int(L * (1 - MASK_RATIO))
    ids_restore = torch.rand(N, L, device=device, generator=g).argsort(1).argsort(1)
    mask = (ids_restore >= keep).float()
    return dec, imgs, mask


def _incl_zero(nbytes: float, t: harness.Timing) -> dict:
    """``gbps_incl_zero_grad`` of the eager time, and ``graph_gbps_incl_zero_grad`` of the graph's."""
    cols = {"gbps_incl_zero_grad": round(nbytes / t.ms / 1e6, 1)}
    if t.graph_ms:
        cols["graph_gbps_incl_zero_grad"] = round(nbytes / t.graph_ms / 1e6, 1)
    return cols


def _fwd_bwd(loss_fn, dec, imgs, mask):
    """One forward + backward to the decoder-output view; returns (loss, d(loss)/d(pred))."""
    pred = dec[:, 1:, :]
    loss = loss_fn(pred, imgs, mask)
    (grad,) = torch.autograd.grad(loss, pred)
    return loss, grad


def run(ctx: harness.Context) -> None:
    n, all_cases = (SMOKE_N, SMOKE_CASES) if ctx.smoke else (N, CASES)
    cases = {"vit_b16": all_cases["vit_b16"]} if ctx.quick else all_cases
    compiled_ref = harness.try_compile(masked_patch_loss_reference)
    for case, (img_size, p, C) in cases.items():
        dec, imgs, mask = _inputs(n, img_size, p, C, ctx.device)
        L, P = mask.shape[1], p * p * C
        masked_rows = int(mask.sum().item())
        pred_b, img_b, grad_b = dec.element_size(), imgs.element_size(), dec.element_size()
        bytes_moved = masked_rows * P * (pred_b + img_b + grad_b) + mask.numel() * mask.element_size()
        bytes_incl_zero = bytes_moved + (n * L - masked_rows) * P * grad_b

        variants = {
            "eager": functools.partial(masked_patch_loss_reference, patch_size=p, norm_pix=True),
            "triton": functools.partial(ops.masked_patch_loss, patch_size=p, norm_pix=True, backend="triton"),
        }
        if compiled_ref is not None:
            variants["torch.compile"] = lambda pr, im, mk, _p=p: compiled_ref(pr, im, mk, _p, True)

        want_loss, want_grad = _fwd_bwd(variants["eager"], dec, imgs, mask)
        for name, loss_fn in variants.items():
            fn = functools.partial(_fwd_bwd, loss_fn, dec, imgs, mask)
            try:
                loss, grad = fn()  # warm-up / compile, and a correctness check on the same inputs
                loss_err = abs(loss.float().item() - want_loss.float().item())
                grad_err = (grad.float() - want_grad.float()).abs().max().item()
                del loss, grad
                t = harness.measure(fn, graph=harness.NO_GRAPH_COMPILED if name == "torch.compile" else True)
                peak = harness.peak_memory_bytes(fn)
            except Exception as e:  # e.g. inductor failing on this machine: keep the other rows
                print(f"[{BENCH}] {case}: {name} failed: {type(e).__name__}: {e}")
                ctx.fail(BENCH, case, name, e)
                continue
            ctx.add(BENCH, case, name, t, bytes_moved=bytes_moved, peak_mem=peak,
                    **_incl_zero(bytes_incl_zero, t),
                    grad_buffer_mib=round(n * L * P * grad_b / 2**20, 1),
                    loss_err_vs_eager=float(f"{loss_err:.2e}"), grad_err_vs_eager=float(f"{grad_err:.2e}"))
        if case == "vit_b16" and not ctx.quick:
            pred = dec.detach()[:, 1:, :]
            for cfg in TUNING:
                name = f"kernel fwd only cfg={cfg}"
                fn = functools.partial(patch_loss_fwd, pred, imgs, mask, p, True, "mse", 1e-6, config=cfg)
                try:
                    fn()
                    t = harness.measure(fn)
                except Exception as e:  # a tiling the kernel cannot build here
                    ctx.fail(BENCH, case, name, e)
                    continue
                ctx.add(BENCH, case, name, t, bytes_moved=bytes_moved, **_incl_zero(bytes_incl_zero, t))
        ctx.speedups(BENCH, case, over="eager")
        ctx.speedups(BENCH, case, over="torch.compile")
        del dec, imgs, mask, want_loss, want_grad
        harness.empty_cache()
