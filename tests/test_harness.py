"""The benchmark harness's CUDA branches, run on any machine with ``torch.cuda`` and
``triton.testing.do_bench`` stood in for, and the run's bookkeeping: results saved after every
row, the time budget, failed variants recorded as rows, the profile's totals.

The smoke test (``test_benchmarks_smoke.py``) runs every module on the CPU, where these
branches are never taken; the GPU suite has a few minutes, so a crash there costs the run.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402


@pytest.fixture
def on_cuda(monkeypatch):
    """The helpers on the CUDA branch; ``torch.cuda``'s memory calls on a scripted counter."""
    monkeypatch.setattr(harness, "_active", {"device": "cuda", "smoke": False, "deadline": math.inf})
    mem = {"allocated": 0, "peak": 0, "calls": []}

    def alloc(nbytes):  # what a benchmarked fn does to the allocator
        mem["allocated"] += nbytes
        mem["peak"] = max(mem["peak"], mem["allocated"])

    fakes = {
        "synchronize": lambda: mem["calls"].append("sync"),
        "empty_cache": lambda: mem["calls"].append("empty_cache"),
        "memory_allocated": lambda: mem["allocated"],
        "max_memory_allocated": lambda: mem["peak"],
        "reset_peak_memory_stats": lambda: (mem["calls"].append("reset"), mem.update(peak=mem["allocated"])),
    }
    for name, fn in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    mem["alloc"] = alloc
    yield mem


def test_peak_memory_from_a_reset_baseline(on_cuda):
    on_cuda["alloc"](1000)  # inputs, allocated before: not the fn's
    on_cuda["peak"] = 5000  # an earlier, larger peak: reset away

    def fn():
        on_cuda["alloc"](300)  # a temporary ...
        on_cuda["alloc"](-300)
        on_cuda["alloc"](200)  # ... and an output

    assert harness.peak_memory_bytes(fn) == 300
    assert on_cuda["calls"].index("reset") < len(on_cuda["calls"]) - 1  # reset, then fn, then a sync
    assert on_cuda["calls"][-1] == "sync"


def test_time_ms_calls_do_bench_as_triton_defines_it(on_cuda, monkeypatch):
    import triton.testing

    real = inspect.signature(triton.testing.do_bench)
    seen = {}

    def fake(fn, *args, **kwargs):
        real.bind(fn, *args, **kwargs)  # a TypeError here: the harness calls do_bench wrongly
        seen.update(kwargs)
        fn()
        return 0.25  # triton 3.6 returns a Python float for one statistic

    monkeypatch.setattr(triton.testing, "do_bench", fake)
    calls = []
    ms = harness.time_ms(lambda: calls.append(1), warmup_ms=10, rep_ms=40)
    assert ms == 0.25 and isinstance(ms, float) and calls == [1]
    assert seen == {"warmup": 10, "rep": 40, "return_mode": "median"}


def test_ceilings_formulas(monkeypatch):
    # bytes read + written / time; 2 n^3 / time
    monkeypatch.setattr(harness, "_active", dict(harness._active))
    timings = []
    monkeypatch.setattr(harness, "time_ms", lambda fn, **kw: timings.append(kw) or 2.0)
    assert harness.measure_copy_gbps(1 << 20, device="cpu") == pytest.approx(2 * 2**20 / 2e-3 / 1e9)
    assert harness.measure_matmul_tflops(64, torch.float32, device="cpu") == pytest.approx(2 * 64**3 / 2e-3 / 1e12)
    # the GPU's clocks come up during a longer warm-up than the ops' default
    assert all(kw["warmup_ms"] >= 200 for kw in timings) and len(timings) == 2
    ctx = harness.Context(copy_gbps=1000.0, matmul_tflops=500.0, device="cpu")
    row = ctx.add("b", "c", "v", 2.0, bytes_moved=4e9, flops=2e12, peak_mem=3 * 2**20)
    assert row["gbps"] == 2000.0 and row["pct_copy_bw"] == 200.0
    assert row["tflops"] == 1000.0 and row["pct_matmul_peak"] == 200.0
    assert row["peak_mem_mib"] == 3.0


def test_mfu_against_the_data_sheet_peak_and_the_measured_one(monkeypatch):
    names = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H200": 989.4, "NVIDIA H200 NVL": 835.0, "NVIDIA GH200 480GB": 989.4,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA L4": None, None: None}
    for name, peak in names.items():
        assert harness.dense_bf16_peak(name) == peak, name
    # measure_ceilings on a CUDA device picks the peak by the device's name
    monkeypatch.setattr(harness, "measure_copy_gbps", lambda **kw: 4000.0)
    monkeypatch.setattr(harness, "measure_matmul_tflops", lambda **kw: 800.0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(name="NVIDIA H200"))
    ctx = harness.Context(copy_gbps=0.0, matmul_tflops=0.0, device="cuda")
    harness.measure_ceilings(ctx)
    assert ctx.dense_bf16_tflops == 989.4 and ctx.matmul_tflops == 800.0
    # 400 TFLOP in 1 s: 40.4% of the data sheet's 989.4, 50% of the measured 800
    assert ctx.mfu(400e12, 1000.0) == dict(mfu_pct=40.4, mfu_measured_pct=50.0, mfu_peak="data sheet")
    md = harness.markdown_table({"info": {"device": "NVIDIA H200"}, "copy_gbps": 4000.0, "matmul_tflops": 800.0,
                                 "dense_bf16_tflops": 989.4, "ceilings": "measured", "rows": [], "errors": []})
    assert "data-sheet dense bf16 peak 989 TFLOP/s" in md
    ctx.dense_bf16_tflops = None  # a GPU not in the table: the measured ceiling, said so
    assert ctx.mfu(400e12, 1000.0) == dict(mfu_pct=50.0, mfu_measured_pct=50.0, mfu_peak="measured")


def test_device_info_on_cuda(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132, total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    info = harness.device_info("cuda")
    assert info["device"] == props.name and info["sm_count"] == 132 and info["memory_gib"] == 80.0
    md = harness.markdown_table({"info": info, "copy_gbps": 3000.0, "matmul_tflops": 790.0, "ceilings": "measured",
                                 "rows": [], "errors": ["bench_x: RuntimeError: boom"]})
    assert "copy bandwidth 3000 GB/s" in md and "## Errors" in md and "bench_x" in md
    tuned = [{"key": "('attention_fwd', 256)", "chosen": "fwd_half_rows", "ms": {"default": 0.2, "fwd_half_rows": 0.1,
                                                                                  "split_bwd": None}}]
    md = harness.markdown_table({"info": info, "copy_gbps": 3000.0, "matmul_tflops": 790.0, "ceilings": "measured",
                                 "rows": [], "errors": [], "tuning": tuned})
    assert ("- ('attention_fwd', 256): **fwd_half_rows** of default 0.2 ms, fwd_half_rows 0.1 ms, split_bwd failed"
            in md)


def test_fail_records_a_row_and_marks_out_of_memory(on_cuda):
    ctx = harness.Context(copy_gbps=1.0, matmul_tflops=1.0, device="cuda")
    row = ctx.fail("b", "c", "v", torch.cuda.OutOfMemoryError("CUDA out of memory"), S=4)
    assert math.isnan(row["ms"]) and row["oom"] is True and row["S"] == 4
    assert row["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert on_cuda["calls"] == ["empty_cache"]
    assert "oom" not in ctx.fail("b", "c", "w", ValueError("x"))


def test_try_compile_respects_the_time_budget(monkeypatch, dynamo_recompile_limit):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    monkeypatch.setattr(harness, "_active", dict(harness._active))
    harness.Context(copy_gbps=1.0, matmul_tflops=1.0, device="cpu", deadline=time.time() + 10)
    assert harness.try_compile(len) is None and not compiled
    ctx = harness.Context(copy_gbps=1.0, matmul_tflops=1.0, device="cpu", deadline=time.time() + 1000)
    assert harness.try_compile(len, mode="max-autotune") is len
    assert compiled == [{"dynamic": False, "mode": "max-autotune"}]  # static shapes (test_bench_audit)
    assert 990 < ctx.time_left() <= 1000
    harness.Context(copy_gbps=1.0, matmul_tflops=1.0, device="cpu", smoke=True)
    assert harness.try_compile(len) is None and math.isinf(harness._active["deadline"])


def _fake_modules(monkeypatch, modules: dict):
    """run.main finds ``modules`` (name -> run function) as benchmarks/bench_<name>.py."""
    from benchmarks import run

    found = [types.SimpleNamespace(name=f"bench_{n}") for n in modules]
    monkeypatch.setattr(run.pkgutil, "iter_modules", lambda paths: found)
    for n, fn in modules.items():
        monkeypatch.setitem(sys.modules, f"benchmarks.bench_{n}", types.SimpleNamespace(run=fn))
    monkeypatch.setattr(run.harness, "measure_ceilings", _placeholder_ceilings)
    monkeypatch.setattr(run, "_interpreter_ready", lambda: True)  # --smoke: a CPU run, on any machine
    monkeypatch.setattr(harness, "_active", dict(harness._active))
    return run


def _placeholder_ceilings(ctx):
    ctx.copy_gbps, ctx.matmul_tflops, ctx.ceilings = 1.0, 1.0, "placeholder"


class _Killed(BaseException):  # what a timeout's SIGTERM is to the run: nothing after it runs
    pass


def test_run_saves_after_every_row_and_names_the_module_cut_short(tmp_path, monkeypatch):
    def good(ctx):
        ctx.add("good", "c", "eager", 1.0)

    def broken(ctx):
        ctx.add("broken", "c", "eager", 1.0)
        raise RuntimeError("a bug")

    def killed(ctx):
        ctx.add("killed", "c", "eager", 2.0)
        saved = json.loads((tmp_path / "results.json").read_text())
        assert [r["bench"] for r in saved["rows"]] == ["good", "broken", "killed"]
        raise _Killed

    run = _fake_modules(monkeypatch, {"a": good, "b": broken, "c": killed})
    with pytest.raises(_Killed):
        run.main(["--out", str(tmp_path), "--smoke"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["bench"] for r in saved["rows"]] == ["good", "broken", "killed"]
    assert saved["errors"][0] == "bench_b: RuntimeError: a bug"
    assert saved["errors"][1].startswith("bench_c: still running")
    assert "still running" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_run_budget_stops_starting_modules_and_reaches_them(tmp_path, monkeypatch):
    seen = []

    def slow(ctx):
        seen.append(ctx.time_left())
        ctx.add("slow", "c", "eager", 1.0)
        ctx.deadline = time.time() - 1  # as if the budget ran out during this module

    run = _fake_modules(monkeypatch, {"a": slow, "b": slow})
    assert run.main(["--out", str(tmp_path), "--smoke", "--budget-s", "100"]) == 1
    assert len(seen) == 1 and 90 < seen[0] <= 100
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["bench"] for r in saved["rows"]] == ["slow"]
    assert saved["errors"] == ["bench_b: not run, the time budget of 100s was spent"]


def test_step_compile_variants_left_out_near_the_deadline(monkeypatch):
    from benchmarks import bench_step

    monkeypatch.setattr(harness, "_active", dict(harness._active))
    ctx = harness.Context(copy_gbps=1.0, matmul_tflops=1.0, device="cpu", deadline=time.time() + 60)
    assert bench_step._skip_compile(ctx, "mae", "mimfast+compile", [0.0])
    assert ctx.skipped[-1]["variant"] == "mimfast+compile" and "time budget" in ctx.skipped[-1]["reason"]
    assert bench_step._skip_compile(ctx, "mae", "x", [bench_step.COMPILE_BUDGET_S + 1.0])
    assert "spent compiling" in ctx.skipped[-1]["reason"]
    ctx.deadline = math.inf
    assert not bench_step._skip_compile(ctx, "mae", "mimfast+compile", [0.0])
    ctx.smoke = True
    n = len(ctx.skipped)
    assert bench_step._skip_compile(ctx, "mae", "mimfast+compile", [0.0]) and len(ctx.skipped) == n


def test_profile_counts_each_kernel_once():
    from torch.autograd import DeviceType

    from benchmarks.bench_profile import top_consumers

    def ev(key, device_type, self_dev, count=1, self_cpu=0, annotation=False):
        return types.SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_dev,
                                     count=count, self_cpu_time_total=self_cpu, is_user_annotation=annotation)

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [
        ev("aten::linear", cpu, 0, self_cpu=50),  # its kernels are addmm's
        ev("aten::addmm", cpu, 600, count=3, self_cpu=30),
        ev("mimfast::attention_fwd", cpu, 300, self_cpu=20),
        ev("sm90_gemm_kernel", gpu, 600, count=3),  # the same time again, as kernel events
        ev("_attn_fwd", gpu, 300),
        ev("_stray_kernel", gpu, 100),  # launched outside any operator
        ev("my_range", gpu, 900, annotation=True),  # a range on the GPU timeline, spanning the others
    ]
    rows = top_consumers(events, on_cuda=True, top=10)
    assert [r[0] for r in rows] == ["aten::addmm", "mimfast::attention_fwd", "(kernels outside any operator)"]
    assert [r[1] for r in rows] == [600, 300, 100]
    assert sum(r[3] for r in rows) == pytest.approx(100.0)
    assert rows[0][2] == 3 and rows[0][3] == pytest.approx(60.0)
    assert [r[0] for r in top_consumers(events, on_cuda=True, top=1)] == ["aten::addmm"]
    cpu_rows = top_consumers(events, on_cuda=False, top=10)
    assert [r[0] for r in cpu_rows] == ["aten::linear", "aten::addmm", "mimfast::attention_fwd"]
    assert sum(r[3] for r in cpu_rows) == pytest.approx(100.0)


def test_profile_splits_generic_operators_by_input_shape():
    from torch.autograd import DeviceType

    from benchmarks.bench_profile import by_input_shape

    def ev(key, shapes, self_dev, count=1, device_type=DeviceType.CPU, self_cpu=0):
        return types.SimpleNamespace(key=key, input_shapes=shapes, self_device_time_total=self_dev, count=count,
                                     device_type=device_type, self_cpu_time_total=self_cpu)

    events = [
        ev("aten::mm", [[12800, 768], [768, 3072]], 400, count=12),
        ev("aten::mm", [[3072, 12800], [12800, 768]], 900, count=12),
        ev("aten::mm", [[4, 4], [4, 4]], 0, self_cpu=5),  # no GPU time: not a row on CUDA
        ev("aten::copy_", [[256, 50, 768], [256, 50, 768], []], 300, count=24),
        ev("aten::copy_", [[768], [768]], 2, count=100),
        ev("sm90_gemm", [], 1300, device_type=DeviceType.CUDA),  # a kernel event: not an operator
        ev("aten::gelu", [], 50),  # shapes not recorded
    ]
    rows = by_input_shape(events, on_cuda=True, total=2000.0, names=("aten::mm", "aten::copy_", "aten::gelu"), top=1)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("aten::mm", "[3072x12800, 12800x768]", 900, 12),
        ("aten::copy_", "[256x50x768, 256x50x768]", 300, 24),
        ("aten::gelu", "[()]", 50, 1),
    ]
    assert rows[0][4] == pytest.approx(45.0)
    assert len(by_input_shape(events, on_cuda=True, total=2000.0, names=("aten::mm",), top=5)) == 2
    cpu = by_input_shape(events, on_cuda=False, total=5.0, names=("aten::mm",))
    assert [(r[1], r[2]) for r in cpu] == [("[4x4, 4x4]", 5)]


def test_results_json_takes_numpy_and_torch_scalars(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setattr(harness, "_active", dict(harness._active))
    ctx = harness.Context(copy_gbps=1.0, matmul_tflops=1.0, device="cpu", smoke=True)
    ctx.add("b", "c", "v", 1.0, calls=np.int64(3), err=torch.tensor(float("nan")), shape=torch.Size([2, 3]),
            where=Path("x"))
    harness.write_results(tmp_path, harness.device_info("cpu"), ctx, [])
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["calls"] == 3 and row["err"] is None and row["shape"] == [2, 3] and row["where"] == "x"
