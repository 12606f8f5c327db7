"""The benchmarks' second and third timings (``harness.measure``): one CUDA graph replay
(``graph_ms``) and the CPU's enqueue time (``host_ms``), the columns derived from them, and
their place in results.md.

The CUDA paths (:func:`harness.graph_time_ms`, :func:`harness.host_time_ms`) run here on a
scripted ``torch.cuda`` (streams, graphs, events on a fake GPU clock): the order of warm-up,
capture and replays, and what a call that cannot be captured leaves behind, not real timings.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_active(monkeypatch):
    monkeypatch.setattr(harness, "_active", dict(harness._active))
    monkeypatch.setattr(harness, "_graphs_broken", [])
    yield


def _ctx(device="cpu"):
    return harness.Context(copy_gbps=1000.0, matmul_tflops=500.0, device=device)


# ------------------------------------------------------------------------------------------------
# columns
# ------------------------------------------------------------------------------------------------

def test_rate_columns():
    assert harness.rate_columns(2.0, 4e9, 2e12, 1000.0, 500.0) == dict(
        gbps=2000.0, pct_copy_bw=200.0, tflops=1000.0, pct_matmul_peak=200.0)
    assert harness.rate_columns(0.5, 1e9, None, 4000.0, 1.0, prefix="graph_") == dict(
        graph_gbps=2000.0, graph_pct_copy_bw=50.0)
    assert harness.rate_columns(1.0, None, None, 1.0, 1.0) == {}
    assert harness.rate_columns(0.0, 1e9, 1e9, 1.0, 1.0) == {}  # no division by a zero time
    nan = harness.rate_columns(float("nan"), 1e9, None, 1.0, 1.0)  # a failed row's
    assert math.isnan(nan["gbps"]) and math.isnan(nan["pct_copy_bw"])
    assert math.isnan(harness.rate_columns(1.0, 1e9, None, 0.0, 1.0)["pct_copy_bw"])  # no ceiling yet


def test_add_with_a_timing_keeps_the_eager_columns_and_adds_the_graph_ones():
    ctx = _ctx()
    plain = ctx.add("b", "c", "v", 2.0, bytes_moved=4e9, flops=2e12)
    row = ctx.add("b", "c", "w", harness.Timing(2.0, host_ms=3.0, graph_ms=0.5), bytes_moved=4e9, flops=2e12,
                  peak_mem=2**20, x=1)
    for k, v in plain.items():  # the eager columns mean what they meant
        if k != "variant":
            assert row[k] == v, k
    assert row["host_ms"] == 3.0 and row["graph_ms"] == 0.5
    assert row["graph_gbps"] == 8000.0 and row["graph_pct_copy_bw"] == 800.0
    assert row["graph_tflops"] == 4000.0 and row["graph_pct_matmul_peak"] == 800.0
    assert row["peak_mem_mib"] == 1.0 and row["x"] == 1
    assert "host_ms" not in plain and "graph_ms" not in plain and ctx.skipped == []


def test_add_records_why_a_row_has_no_graph_time():
    ctx = _ctx()
    row = ctx.add("b", "c", "compile", harness.Timing(1.0, host_ms=0.2, graph_note=harness.NO_GRAPH_COMPILED),
                  bytes_moved=1e9)
    assert "graph_ms" not in row and "graph_gbps" not in row and row["host_ms"] == 0.2
    assert ctx.skipped == [{"bench": "b", "case": "c", "variant": "compile", "column": "graph_ms",
                            "reason": harness.NO_GRAPH_COMPILED}]
    # off CUDA: one entry for the whole run, not one per row
    ctx = _ctx()
    for v in ("eager", "triton"):
        ctx.add("b", "c", v, harness.Timing(1.0, host_ms=1.0, graph_note=harness.NO_GRAPH_OFF_CUDA))
    assert ctx.skipped == [{"bench": "*", "case": "*", "variant": "*", "column": "graph_ms",
                            "reason": harness.NO_GRAPH_OFF_CUDA}]


def test_speedups_on_graph_times_where_both_rows_have_one():
    ctx = _ctx()
    ctx.add("b", "c", "eager", harness.Timing(1.0, graph_ms=0.4))
    ctx.add("b", "c", "triton", harness.Timing(1.0, graph_ms=0.1))
    ctx.add("b", "c", "compile", harness.Timing(0.5, graph_note=harness.NO_GRAPH_COMPILED))
    ctx.speedups("b", "c", "eager")
    eager, triton, comp = ctx.rows
    assert triton["speedup_vs_eager"] == 1.0 and triton["graph_speedup_vs_eager"] == 4.0
    assert comp["speedup_vs_eager"] == 2.0 and "graph_speedup_vs_eager" not in comp
    ctx.speedups("b", "c", "compile")  # the base has no graph time: eager ratios only
    assert triton["speedup_vs_compile"] == 0.5 and "graph_speedup_vs_compile" not in triton


def test_time_key():
    assert harness.time_key([{"ms": 1.0, "graph_ms": 0.5}, {"ms": 2.0, "graph_ms": 0.2}]) == "graph_ms"
    assert harness.time_key([{"ms": 1.0, "graph_ms": 0.5}, {"ms": 2.0}]) == "ms"
    assert harness.time_key([{"ms": 1.0, "graph_ms": float("nan")}]) == "ms"
    assert harness.time_key([]) == "ms"


def test_replay_count():
    assert harness.replay_count(1.0, 100) == 100
    assert harness.replay_count(0.01, 100) == harness.GRAPH_MAX_REPLAYS
    assert harness.replay_count(50.0, 100) == harness.GRAPH_MIN_REPLAYS
    assert harness.replay_count(0.0, 100) == harness.replay_count(float("nan"), 100) == harness.GRAPH_MAX_REPLAYS


def test_attention_target_judged_on_graph_times_where_all_were_captured():
    from benchmarks import bench_attention as ba

    ctx = _ctx()
    case = "x fwd+bwd"
    # eager: mimfast 1.0 ms vs best SDPA 1.1 ms (1.1x); graphs: 0.2 vs 0.4 ms (2x)
    ctx.add(ba.BENCH, case, "mimfast", harness.Timing(1.0, graph_ms=0.2))
    ctx.add(ba.BENCH, case, "sdpa_flash", harness.Timing(1.1, graph_ms=0.4))
    ctx.add(ba.BENCH, case, "sdpa_math", harness.Timing(3.0, graph_ms=2.0))
    ba._vs_best_sdpa(ctx, case, 1.3)
    row = ctx.rows[0]
    assert row["speedup_vs_best_sdpa"] == 1.1 and row["graph_speedup_vs_best_sdpa"] == 2.0
    assert row["meets_target"] is True and row["target_basis"] == "graph_ms"
    # an SDPA row without a graph time: judged on the eager times
    ctx.add(ba.BENCH, case, "sdpa_cudnn", harness.Timing(1.2, graph_note="not capturable: x"))
    ba._vs_best_sdpa(ctx, case, 1.3)
    assert row["meets_target"] is False and row["target_basis"] == "ms"
    ba._vs_best_sdpa(ctx, "x fwd", None)  # no rows: nothing
    ctx.add(ba.BENCH, "y fwd", "mimfast", harness.Timing(1.0, graph_ms=0.2))
    ctx.add(ba.BENCH, "y fwd", "sdpa_flash", harness.Timing(2.0, graph_ms=0.4))
    ba._vs_best_sdpa(ctx, "y fwd", None)  # forward rows: speed-ups, no target
    assert "meets_target" not in ctx.rows[-2] and ctx.rows[-2]["graph_speedup_vs_best_sdpa"] == 2.0


def test_markdown_columns_legend_and_graph_skips():
    ctx = _ctx()
    ctx.add("b", "c", "eager", harness.Timing(1.0, host_ms=1.5, graph_ms=0.1), bytes_moved=1e9, zeta=1)
    ctx.add("b", "c", "compile", harness.Timing(1.0, host_ms=0.3, graph_note=harness.NO_GRAPH_COMPILED),
            bytes_moved=1e9)
    ctx.speedups("b", "c", "eager")
    ctx.skip("b", "c", "sdpa_x", "refused")
    payload = {"info": {"device": "NVIDIA H200"}, "copy_gbps": 1000.0, "matmul_tflops": 500.0,
               "ceilings": "measured", "rows": ctx.rows, "skipped": ctx.skipped, "errors": []}
    md = harness.markdown_table(payload)
    header = next(line for line in md.splitlines() if line.startswith("| bench"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:9] == ["bench", "case", "variant", "ms", "host_ms", "graph_ms", "gbps", "pct_copy_bw", "graph_gbps"]
    assert cols.index("graph_pct_copy_bw") < cols.index("tflops") < cols.index("peak_mem_mib") < cols.index("zeta")
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + len(ctx.rows)
    legend = md[md.index("## Columns"):]
    for key in ("`ms`", "`host_ms`", "`graph_ms`", "`graph_gbps`", "`speedup_vs_X`", "`graph_speedup_vs_X`"):
        assert key in legend, key
    assert "`graph_tflops`" not in legend and "`meets_target`" not in legend  # not in this table
    variants = md[md.index("## Skipped variants"):md.index("## Rows without graph_ms")]
    assert "sdpa_x: refused" in variants and "compile" not in variants
    assert f"b / c / compile: {harness.NO_GRAPH_COMPILED}" in md[md.index("## Rows without graph_ms"):]
    # a table of step rows only: the earlier fixed columns, no graph ones
    assert harness.table_columns([{"bench": "step", "case": "c", "variant": "v", "ms": 1.0, "host_ms": 0.5}])[:5] == [
        "bench", "case", "variant", "ms", "host_ms"]
    assert "graph_ms" not in harness.table_columns([{"ms": 1.0}])


# ------------------------------------------------------------------------------------------------
# the CUDA paths on a scripted torch.cuda
# ------------------------------------------------------------------------------------------------

class _FakeGPU:
    """A GPU clock that advances as work is enqueued (the order is what matters here)."""

    def __init__(self, replay_ms=0.05, flush_ms=0.2):
        self.clock = 0.0
        self.replay_ms, self.flush_ms = replay_ms, flush_ms
        self.log = []
        self.current = "default"
        self.capturing = None


@pytest.fixture
def fake_cuda(monkeypatch):
    gpu = _FakeGPU()
    monkeypatch.setattr(harness, "_active", {"device": "cuda", "smoke": False, "deadline": math.inf})

    class Stream:
        def __init__(self, name=None):
            self.name = name or f"side{len([e for e in gpu.log if e[0] == 'stream'])}"
            gpu.log.append(("stream", self.name))

        def wait_stream(self, other):
            gpu.log.append(("wait", self.name, other.name))

    default = Stream("default")

    @contextlib.contextmanager
    def stream(s):
        prev, gpu.current = gpu.current, s.name
        try:
            yield
        finally:
            gpu.current = prev

    class CUDAGraph:
        def __init__(self):
            self.captured, self.was_reset = False, False

        def replay(self):
            assert self.captured and not self.was_reset
            gpu.clock += gpu.replay_ms
            gpu.log.append(("replay", gpu.current))

        def reset(self):
            self.was_reset = True
            gpu.log.append(("reset",))

    class graph:  # torch.cuda.graph as 2.11 writes it: capture_end raising skips the stream's exit
        def __init__(self, g, pool=None, stream=None, capture_error_mode="global"):
            self.g, self.stream = g, stream

        def __enter__(self):
            gpu.log.append(("capture_begin", self.stream.name))
            self.prev, gpu.current = gpu.current, self.stream.name
            gpu.capturing = self.g

        def __exit__(self, *exc):
            gpu.capturing = None
            if exc[0] is not None:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
            self.g.captured = True
            gpu.current = self.prev
            gpu.log.append(("capture_end",))

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = gpu.clock

        def elapsed_time(self, end):
            return end.t - self.t

    class Flush:
        def zero_(self):
            gpu.clock += gpu.flush_ms
            gpu.log.append(("flush",))

    def set_stream(s):
        gpu.log.append(("set_stream", s.name))
        gpu.current = s.name

    fakes = dict(synchronize=lambda: gpu.log.append(("sync",)), current_stream=lambda: default, Stream=Stream,
                 stream=stream, CUDAGraph=CUDAGraph, graph=graph, Event=Event, set_stream=set_stream,
                 _sleep=lambda cycles: gpu.log.append(("sleep", cycles)))
    for name, fn in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fn, raising=False)
    monkeypatch.setattr(harness, "_l2_flush_buffer", lambda: Flush())
    yield gpu


def test_graph_time_ms_warms_up_on_a_side_stream_then_captures_and_times_replays(fake_cuda):
    calls = []

    def fn():
        calls.append((fake_cuda.current, fake_cuda.capturing is not None))
        return "out"

    ms, note = harness.graph_time_ms(fn, rep_ms=100)
    assert note is None and ms == pytest.approx(fake_cuda.replay_ms)  # the flushes are outside the events
    side = calls[0][0]
    assert side != "default"
    # warm-up on the side stream, then one call inside the capture on that stream
    assert calls == [(side, False)] * harness.GRAPH_WARMUP_CALLS + [(side, True)]
    log = fake_cuda.log
    assert log.index(("wait", side, "default")) < log.index(("capture_begin", side))
    assert ("wait", "default", side) in log
    replays = [e for e in log if e[0] == "replay"]
    assert all(e[1] == "default" for e in replays)
    timed = len(replays) - 4  # one to settle, three for the estimate
    assert harness.GRAPH_MIN_REPLAYS <= timed <= harness.GRAPH_MAX_REPLAYS
    assert ("sleep", harness.GRAPH_PRIME_CYCLES_PER_REPLAY * timed) in log
    assert log.index(("sleep", harness.GRAPH_PRIME_CYCLES_PER_REPLAY * timed)) < len(log) - 2 * timed
    assert log.count(("flush",)) == timed and log[-1] == ("reset",)
    assert fake_cuda.current == "default"


def test_graph_time_ms_reports_a_call_that_cannot_be_captured(fake_cuda):
    def fn():
        if fake_cuda.capturing is not None:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        return 1

    ms, note = harness.graph_time_ms(fn)
    assert ms is None
    assert note == "not capturable: RuntimeError: CUDA error: operation not permitted when stream is capturing"
    assert fake_cuda.current == "default"  # the stream the failed capture left set is put back
    assert ("set_stream", "default") in fake_cuda.log and fake_cuda.log[-2:] == [("reset",), ("sync",)]
    assert harness._graphs_broken == []  # CUDA still synchronises: later captures are tried

    def warm_up_fails():
        raise ValueError("bad shape")

    ms, note = harness.graph_time_ms(warm_up_fails)
    assert ms is None and note == "warm-up failed: ValueError: bad shape"


def test_graph_time_ms_stops_trying_once_cuda_is_broken(fake_cuda, monkeypatch):
    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def fn():
        if fake_cuda.capturing is not None:
            raise RuntimeError("capture failed")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    ms, note = harness.graph_time_ms(fn)
    assert ms is None and note.startswith("not capturable")
    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    harness._check_cuda_after_failure(RuntimeError("x"))
    assert harness._graphs_broken
    ms, note = harness.graph_time_ms(lambda: None)
    assert ms is None and note.startswith("not tried: an earlier failed capture")


def test_host_time_ms_times_calls_without_synchronising(fake_cuda, monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["t"])
    events = []

    def fn():
        clock["t"] += 0.002  # 2 ms of CPU per call
        events.append("call")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("sync"))
    assert harness.host_time_ms(fn, calls=4, rounds=3) == pytest.approx(2.0)
    # a warm-up call, then rounds of 4 calls each started by a sync, a sync at the end
    assert events == ["call"] + (["sync"] + ["call"] * 4) * 3 + ["sync"]
    events.clear()
    assert harness.host_time_ms(fn, calls=1, rounds=2, warmup=False) == pytest.approx(2.0)
    assert events == ["sync", "call", "sync", "call", "sync"]


def test_measure_on_cuda_and_off(fake_cuda, monkeypatch):
    monkeypatch.setattr(harness, "time_ms", lambda fn, **kw: 1.5)
    monkeypatch.setattr(harness, "host_time_ms", lambda fn: 2.5)
    monkeypatch.setattr(harness, "graph_time_ms", lambda fn, rep_ms: (0.25, None))
    assert harness.measure(lambda: None) == harness.Timing(1.5, host_ms=2.5, graph_ms=0.25)
    t = harness.measure(lambda: None, graph=harness.NO_GRAPH_COMPILED)
    assert t == harness.Timing(1.5, host_ms=2.5, graph_note=harness.NO_GRAPH_COMPILED)
    assert harness.measure(lambda: None, graph=False).graph_note
    harness._active["device"] = "cpu"  # a smoke run: the host time is the call's, no graph
    want = harness.Timing(1.5, host_ms=1.5, graph_note=harness.NO_GRAPH_OFF_CUDA)
    assert harness.measure(lambda: None) == want
