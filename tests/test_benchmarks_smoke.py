"""Every benchmark module runs: ``benchmarks/bench_*.py`` in smoke mode on the CPU.

The GPU suite (``benchmarks/gpu_suite.sh``) gets a few minutes of device time, so a benchmark
that crashes on an API mistake, a typo, a shape bug or a missing import wastes it. Here each
module's ``run(ctx)`` runs with ``ctx.smoke`` (tiny shapes, Triton kernels under the
interpreter, the same variants and row bookkeeping as on the GPU). Modules are found on disk:
a new ``bench_<name>.py`` is covered without editing this file. No figure is checked: timing
belongs to the GPU run.

Needs Triton's interpreter (the conftest turns it on where there is no GPU); on a CUDA machine
these tests skip, as the GPU suite runs the benchmarks themselves.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pkgutil
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

MODULES = sorted(m.name for m in pkgutil.iter_modules([str(ROOT / "benchmarks")]) if m.name.startswith("bench_"))
# a module that ignores ctx.smoke runs GPU shapes under the interpreter for hours: stop it
MODULE_LIMIT_S = 120
# the variants whose figures the benchmarks exist for: they must run, never be skipped
MAIN_VARIANTS = ("eager", "triton", "mimfast")

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on"),
        reason="smoke runs need Triton's interpreter (CPU machines); the GPU suite runs the benchmarks",
    ),
    # the interpreter's bf16 dots (wrong, triton-lang/triton#11584) overflow; torchvision's
    # image io announces its move to torchcodec; SDPA's flash backend refuses the bias
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision"),
    pytest.mark.filterwarnings("ignore:Flash attention kernel not used:UserWarning"),
]


def _is_main(variant: str) -> bool:
    return variant.startswith(MAIN_VARIANTS)


class _TooSlow(BaseException):  # not an Exception: the modules' per-variant handlers must not swallow it
    pass


def _run_with_limit(fn, seconds: int):
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return fn()

    def alarm(signum, frame):
        raise _TooSlow(f"over {seconds} s: does the module pick tiny shapes when ctx.smoke is set?")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _read_results(out_dir: Path, n_rows: int) -> dict:
    """results.json is strict JSON (no NaN) with every row; results.md a table of them."""

    def no_constant(name):
        raise AssertionError(f"results.json holds {name}, which is not JSON")

    payload = json.loads((out_dir / "results.json").read_text(), parse_constant=no_constant)
    assert payload["smoke"] is True and payload["info"]["device"] == "cpu"
    assert len(payload["rows"]) == n_rows
    md = (out_dir / "results.md").read_text()
    assert md.startswith("# mimfast benchmarks on cpu") and "Smoke run" in md
    assert "## Columns" in md and "- `ms`:" in md
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + n_rows  # header + rows
    return payload


def test_benchmark_modules_found():
    assert {"bench_masking", "bench_attention", "bench_step"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_smoke(name, tmp_path):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(getattr(module, "run", None)), f"benchmarks/{name}.py defines no run(ctx)"
    ctx = harness.Context(copy_gbps=100.0, matmul_tflops=1.0, device="cpu", smoke=True, ceilings="placeholder")
    _run_with_limit(lambda: module.run(ctx), MODULE_LIMIT_S)

    assert ctx.rows, f"{name} recorded no rows"
    for r in ctx.rows:
        where = f"{name}: {r['bench']} / {r['case']} / {r['variant']}"
        assert "error" not in r, f"{where}: {r['error']}"
        assert {"bench", "case", "variant", "ms"} <= set(r), where
        assert math.isfinite(r["ms"]) and r["ms"] >= 0, f"{where}: ms = {r['ms']}"
        if _is_main(r["variant"]):
            assert r["ms"] > 0, f"{where}: ms = {r['ms']}"
        assert "peak_mem_mib" not in r, f"{where}: a peak memory on the CPU"
    # entries with a "column" are rows without one column (graph_ms: none off CUDA), not variants
    bad = [s for s in ctx.skipped if _is_main(s["variant"]) and "column" not in s]
    assert not bad, f"{name}: mimfast / eager variants skipped: {bad}"
    timed = [r for r in ctx.rows if "host_ms" in r]
    for r in timed:  # harness.measure off CUDA: the host time is the call's time, no graph
        assert r["host_ms"] == r["ms"] and "graph_ms" not in r, r
    if timed and name != "bench_step":  # the step rows have host_ms only (no graph of a whole step)
        assert {"bench": "*", "case": "*", "variant": "*", "column": "graph_ms",
                "reason": harness.NO_GRAPH_OFF_CUDA} in ctx.skipped
    harness.write_results(tmp_path, harness.device_info("cpu"), ctx, [])
    _read_results(tmp_path, len(ctx.rows))
    png = tmp_path / "step.png"
    if any(r["bench"] == "step" for r in ctx.rows):  # the report's picture of images/s per configuration
        from PIL import Image

        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 0
        assert "(step.png)" in (tmp_path / "results.md").read_text()
    else:
        assert not png.exists()


def test_run_main_smoke(tmp_path, capsys):
    from benchmarks import run

    assert run.main(["--out", str(tmp_path), "--smoke", "--quick", "--only", "masking"]) == 0
    payload = _read_results(tmp_path, len(json.loads((tmp_path / "results.json").read_text())["rows"]))
    assert payload["errors"] == []
    assert {r["bench"] for r in payload["rows"]} == {"random_masking", "unshuffle", "masked_patch_embed", "patch_embed"}
    assert "crude cpu estimate" in payload["ceilings"]
    assert payload["copy_gbps"] > 0 and payload["matmul_tflops"] > 0
    assert "Smoke run" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_run_main_without_cuda_needs_smoke(tmp_path, capsys):
    from benchmarks import run

    assert run.main(["--out", str(tmp_path)]) == 2
    assert "--smoke" in capsys.readouterr().err
    harness.Context(copy_gbps=1.0, matmul_tflops=1.0, device="cpu", smoke=True)  # leave the helpers on the CPU
