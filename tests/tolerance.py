"""The correctness standard shared by every kernel test (shared/DESIGN.md).

Rule from flash-attention's tests: the kernel's error against a float64 reference may be at
most twice the error of the eager reference run in the same low precision, plus a small atol.
"""

from __future__ import annotations

import os

import torch

DEVICE = os.environ.get("MIMFAST_TEST_DEVICE", "cpu")
INTERPRETED = DEVICE == "cpu"

# dtypes that can be tested here; bf16 dot products are wrong under the interpreter
# (triton-lang/triton#11584), so dot-based kernels test bf16 on a GPU only.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOT_DTYPES = (torch.float32, torch.float16) if INTERPRETED else FLOAT_DTYPES


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


# Triton's interpreter (3.6 and 3.8) converts float32 to bfloat16 by truncation (its cast_impl
# passes no rounding mode), a GPU rounds to nearest even: an interpreted bf16 result can be one
# ulp off where the GPU's and eager's are within half an ulp, twice eager's error by itself.
INTERPRETED_BF16_FACTOR = 3.0


def assert_2x_rule(name: str, out, ref_lowp, ref_f64, atol: float = 1e-6, factor: float = 2.0) -> None:
    """|out - ref_f64| <= factor * |ref_lowp - ref_f64| + atol, elementwise max; NaN fails.
    bf16 results under the interpreter get ``INTERPRETED_BF16_FACTOR`` (truncating casts)."""
    if INTERPRETED and out.dtype == torch.bfloat16:
        factor = max(factor, INTERPRETED_BF16_FACTOR)
    # the same shape everywhere: a wrong-shaped result would otherwise broadcast against the references
    assert tuple(out.shape) == tuple(ref_lowp.shape) == tuple(ref_f64.shape), (
        f"{name}: shapes differ: kernel {tuple(out.shape)}, eager {tuple(ref_lowp.shape)}, "
        f"float64 {tuple(ref_f64.shape)}"
    )
    out_d = out.detach().double().cpu()
    assert torch.isfinite(out_d).all() or not torch.isfinite(ref_f64.double().cpu()).all(), (
        f"{name}: kernel output holds NaN/inf (an unwritten or wrong element)"
    )
    err = max_err(out, ref_f64)
    base = max_err(ref_lowp, ref_f64)
    assert err <= factor * base + atol, (
        f"{name}: kernel error {err:.3e} > {factor} x eager low-precision error {base:.3e} + atol {atol:.1e}"
    )


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a buffer with NaN so an element the kernel forgets to write fails the test."""
    return t.fill_(float("nan"))


def poison_new_buffers(monkeypatch) -> None:
    """Every float tensor made by ``torch.empty`` from now on in the test starts as NaN, so an
    element a kernel or launcher forgets to write fails the comparison."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and t.device.type != "meta":
            poison_(t)
        return t

    monkeypatch.setattr(torch, "empty", empty)
