"""benchmarks.bench_profile: its cases, and the op names its rows carry (launches through the
custom ops while profiling, so the profiler can name the op of each Triton kernel)."""

from __future__ import annotations

import os

import pytest

from benchmarks import bench_profile, harness
from mimfast.ops import _custom_op


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on"),
                    reason="the smoke profile runs the kernels under Triton's interpreter; the GPU suite runs "
                           "bench_profile itself")
def test_profile_smoke_names_the_ops_and_restores_direct_launches():
    ctx = harness.Context(copy_gbps=100.0, matmul_tflops=1.0, device="cpu", smoke=True, ceilings="placeholder",
                          quick=True)
    bench_profile.run(ctx)
    cases = {r["case"] for r in ctx.rows}
    assert {"mae_vit_b16_mimfast", "beit_b16_mimfast", "beit_lm_head_triton", "beit_lm_head_eager"} <= cases, cases
    for case in cases:  # each case says whether its step waits for the host: wall time beside operator time
        variants = {r["variant"]: r["ms"] for r in ctx.rows if r["case"] == case}
        assert variants["(step wall time)"] > 0 and variants["(all operators, CPU)"] > 0, case
    assert any(r["variant"].startswith("mimfast::") for r in ctx.rows if r["case"] == "beit_b16_mimfast")
    triton_ops = {r["variant"] for r in ctx.rows if r["case"] == "beit_lm_head_triton"}
    eager_ops = {r["variant"] for r in ctx.rows if r["case"] == "beit_lm_head_eager"}
    # the Triton path's matmuls and its cross-entropy kernel run inside its autograd Function
    # (whose event claims the kernel's time); eager's are aten ops
    assert "LinearCrossEntropy" in triton_ops, triton_ops
    assert "LinearCrossEntropy" not in eager_ops and any("cross_entropy" in k or "log_softmax" in k
                                                         for k in eager_ops), eager_ops
    assert any(k.startswith("mimfast::") for r in ctx.rows if r["case"] == "mae_vit_b16_mimfast"
               for k in [r["variant"]])
    assert _custom_op.ALWAYS_DISPATCH is False
