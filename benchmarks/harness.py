"""Benchmark harness: CUDA-event timing (``triton.testing.do_bench``, median after warm-up),
the device's measured ceilings, peak memory, and result files.

Every benchmark module ``benchmarks/bench_*.py`` defines ``run(ctx: Context) -> None`` and
records rows through ``ctx.add(...)``; ``python -m benchmarks.run`` collects them.

Smoke mode (``ctx.smoke``, ``ctx.device == "cpu"``): the same modules run on the CPU at tiny
shapes, the Triton kernels under the interpreter, so a broken benchmark is caught without a
GPU. The helpers below follow the device (and time budget) of the last :class:`Context`
made: on the CPU :func:`time_ms` is a ``perf_counter`` median of a few calls (one call in a
smoke run), :func:`peak_memory_bytes` returns None, :func:`sync` and :func:`empty_cache` do
nothing, and :func:`try_compile` returns None in a smoke run (inductor may need a C++
compiler; compiling would also take most of the smoke run's time); it also returns None when
less than ``COMPILE_MIN_LEFT_S`` of the run's time budget is left (``Context.deadline``,
:meth:`Context.time_left`).
:meth:`Context.skip` records a variant left out and why, :meth:`Context.fail` one that raised
(a row with a NaN time and the error, an out-of-memory marked ``oom``).

What a module does for smoke mode (``tests/test_benchmarks_smoke.py`` runs every module so):
tensors, generators and ``torch.autocast`` on ``ctx.device``, never a ``"cuda"`` literal;
shapes from a ``SMOKE_*`` table beside the GPU one when ``ctx.smoke`` (same case names,
variants and rows; batch 2-4, tiny widths); ``time_ms`` / ``peak_memory_bytes`` / ``sync`` /
``empty_cache`` / ``try_compile`` from here instead of ``torch.cuda.*`` and ``torch.compile``;
CUDA-only variants left out when ``ctx.device != "cuda"``, and a variant that refuses a case
passed to ``ctx.skip``, not only printed.

Three times per op variant (:func:`measure`, a :class:`Timing` that :meth:`Context.add` takes
in place of ``ms``), because at MAE shapes an op's kernels take 10-60 us and a loop of eager
calls is often timed by the CPU that launches them, not by the GPU:

- ``ms``: the eager call, :func:`time_ms` (``triton.testing.do_bench``: CUDA events around each
  call of a loop, L2 flushed before each, median). Launch and dispatch overhead included
  wherever the CPU cannot enqueue a call as fast as the GPU runs it.
- ``host_ms``: :func:`host_time_ms`, the CPU's time to enqueue one call (``perf_counter``
  around ``HOST_CALLS`` back-to-back calls without synchronising, per call, median of
  ``HOST_ROUNDS`` rounds that each start from an idle GPU). ``host_ms >= ms``: launch-bound.
- ``graph_ms``: :func:`graph_time_ms`, the GPU time of one replay of the call captured in a
  CUDA graph (warm-up on a side stream, capture with the inputs and gradient buffers fixed,
  events around each replay, L2 flushed before each, replays queued behind a GPU sleep so the
  GPU never waits for the CPU): the kernels without launch overhead. The rate columns
  (``graph_gbps``, ``graph_pct_copy_bw``, ``graph_tflops``, ``graph_pct_matmul_peak``) and
  the ``graph_speedup_vs_*`` columns come from it, and targets (``meets_target``) are judged
  on it where every row compared has one. A call that cannot be captured (torch.compile
  variants, which a module passes with ``graph=NO_GRAPH_COMPILED``; a call that synchronises,
  e.g. ``.item()``, or allocates outside the caching allocator) gets no graph columns and an
  entry with ``column: graph_ms`` and the reason in the skipped list; off CUDA (smoke runs)
  one such entry says graphs were not timed at all, and ``host_ms`` equals ``ms`` (a CPU call
  is synchronous).

:data:`COLUMN_LEGEND` explains the columns in ``results.md``.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


# the device, mode and deadline of the last Context made (what the module-level helpers follow)
_active = {"device": "cuda" if torch.cuda.is_available() else "cpu", "smoke": False, "deadline": math.inf}
CPU_TIMING_CALLS = 3  # timed calls (after one warm-up) of time_ms off CUDA; one call in a smoke run
# try_compile gives up when less of the run's budget is left: a cold inductor compile of one
# op (forward and backward) takes 10-30 s
COMPILE_MIN_LEFT_S = 30.0


def on_cuda() -> bool:
    """True when the benchmarks run on a CUDA device (not a CPU smoke run)."""
    return _active["device"] == "cuda"


def sync() -> None:
    """``torch.cuda.synchronize()`` on CUDA; nothing on the CPU."""
    if on_cuda():
        torch.cuda.synchronize()


def empty_cache() -> None:
    if on_cuda():
        torch.cuda.empty_cache()


def time_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (events, after warm-up).

    Off CUDA: the ``perf_counter`` median of ``CPU_TIMING_CALLS`` calls after one warm-up call,
    in a smoke run one call without warm-up (the interpreter compiles nothing): a figure that
    proves the call runs, not a measurement worth reporting.
    """
    if not on_cuda():
        if not _active["smoke"]:
            fn()
        times = []
        for _ in range(1 if _active["smoke"] else CPU_TIMING_CALLS):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


# host_time_ms: calls per round (few enough that the CUDA launch queue does not fill up and
# block the CPU on the GPU) and rounds (median)
HOST_CALLS, HOST_ROUNDS = 10, 7
# graph_time_ms: side-stream warm-up calls before the capture (as PyTorch's CUDA graph docs
# ask), the replays timed (between these, about rep_ms of GPU time), the bytes zeroed before each
# replay to flush L2 (as do_bench does: 256 MiB, more than any current GPU's L2), and the GPU
# sleep queued before the replays (cycles per replay: 50 us at 2 GHz, more than the CPU takes to
# enqueue one), so that no replay waits for the CPU
GRAPH_WARMUP_CALLS = 3
GRAPH_MIN_REPLAYS, GRAPH_MAX_REPLAYS = 10, 200
L2_FLUSH_BYTES = 256 << 20
GRAPH_PRIME_CYCLES_PER_REPLAY = 100_000
NO_GRAPH_COMPILED = "torch.compile variant: not captured into a CUDA graph here (see the step's mimfast+cudagraphs)"
NO_GRAPH_OFF_CUDA = "not on CUDA (smoke run): no CUDA graph timing, host_ms = ms"
# set when a failed capture left CUDA in an error state: no further capture is tried
_graphs_broken: list = []


@dataclass
class Timing:
    """The times of one op variant (:func:`measure`): ``ms`` the eager call, ``host_ms`` the CPU
    time to enqueue it, ``graph_ms`` one CUDA graph replay (None, with ``graph_note`` saying why,
    where it was not captured). :meth:`Context.add` takes it in place of ``ms``."""

    ms: float
    host_ms: float | None = None
    graph_ms: float | None = None
    graph_note: str | None = None


def host_time_ms(fn, calls: int = HOST_CALLS, rounds: int = HOST_ROUNDS, warmup: bool = True) -> float | None:
    """Host wall time per call of ``fn()``: ``perf_counter`` around ``calls`` back-to-back calls
    without synchronising, divided by ``calls``, median of ``rounds`` rounds, each started on an
    idle GPU (one warm-up call first unless ``warmup`` is False).

    Compared with :func:`time_ms`: ``host_ms >= ms`` means the eager figure is the CPU's
    (launch-bound). A call that synchronises inside (``.item()``) counts its GPU time here too.
    Off CUDA: None (a CPU call is synchronous; :func:`measure` then reports ``ms``)."""
    if not on_cuda():
        return None
    if warmup:
        fn()
    per_call = []
    for _ in range(max(1, rounds)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(max(1, calls)):
            fn()
        per_call.append((time.perf_counter() - t0) / max(1, calls))
    torch.cuda.synchronize()
    return 1e3 * statistics.median(per_call)


def replay_count(estimate_ms: float, rep_ms: float) -> int:
    """Replays to time: about ``rep_ms`` of them at ``estimate_ms`` each, within
    [GRAPH_MIN_REPLAYS, GRAPH_MAX_REPLAYS] (an estimate that is 0 or not finite: the most)."""
    if not (estimate_ms > 0 and math.isfinite(estimate_ms)):
        return GRAPH_MAX_REPLAYS
    return int(min(GRAPH_MAX_REPLAYS, max(GRAPH_MIN_REPLAYS, rep_ms / estimate_ms)))


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:160]


def graph_time_ms(fn, rep_ms: float = 100.0) -> tuple[float | None, str | None]:
    """Median GPU milliseconds of one replay of ``fn()`` captured in a CUDA graph, and None; or
    None and why it was not measured (never raises for a call that cannot be captured).

    ``fn`` must take its inputs from tensors that stay put (the benchmarks' closures do): the
    graph replays the captured kernels on the same addresses; its outputs and gradients live in
    the graph's private memory pool, freed (``reset``) before returning. Warm-up: a few calls on
    a side stream (Triton compiles, cuBLAS / autograd set up their per-stream state), then the
    capture on that stream (``torch.cuda.graph``). Timing: CUDA events around each replay on the
    current stream, L2 flushed before each (outside the events, as ``do_bench`` does), all
    replays enqueued behind a GPU sleep (``torch.cuda._sleep``) so none waits for the CPU.
    """
    if not on_cuda():
        return None, NO_GRAPH_OFF_CUDA
    if _graphs_broken:
        return None, f"not tried: an earlier failed capture left CUDA in an error state ({_graphs_broken[0]})"
    prev = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    out = None
    in_capture: list = []  # what the call raised while captured (capture_end then raises its own error)
    try:
        side.wait_stream(prev)
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_CALLS):
                fn()
        prev.wait_stream(side)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=side):
            try:
                out = fn()  # kept until the graph is reset: the replays write to its memory
            except Exception as e:
                in_capture.append(e)
                raise
    except Exception as e:  # a synchronising call, an allocation outside the pool, an unsupported op
        # capture_end raising inside torch.cuda.graph's __exit__ skips its stream context's exit
        torch.cuda.set_stream(prev)
        out = None
        _release(graph)
        _check_cuda_after_failure(e)
        where = "not capturable" if in_capture or "captur" in str(e) else "warm-up failed"
        return None, f"{where}: {_reason(in_capture[0] if in_capture else e)}"
    flush = None
    try:
        flush = _l2_flush_buffer()
        graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        n = replay_count(1e3 * (time.perf_counter() - t0) / 3, rep_ms)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is not None:
            sleep(int(GRAPH_PRIME_CYCLES_PER_REPLAY * n))
        for i in range(n):
            flush.zero_()
            starts[i].record()
            graph.replay()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return float(statistics.median(times)), None
    except Exception as e:  # a replay that fails (out of memory for the flush buffer, say)
        _check_cuda_after_failure(e)
        return None, f"replay failed: {_reason(e)}"
    finally:
        del out, flush
        _release(graph)


def _l2_flush_buffer() -> torch.Tensor:
    """What :func:`graph_time_ms` zeroes before each replay: ``L2_FLUSH_BYTES`` on the GPU."""
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")


def _release(graph) -> None:
    """Free a graph's private memory pool (``reset``); a graph whose capture failed may refuse."""
    try:
        graph.reset()
    except Exception:
        pass


def _check_cuda_after_failure(exc: BaseException) -> None:
    """After a failed capture or replay: if CUDA no longer synchronises, try no more captures."""
    try:
        torch.cuda.synchronize()
    except Exception as e:  # pragma: no cover - only a broken context gets here
        _graphs_broken.append(f"{_reason(exc)}; then {_reason(e)}")


def measure(fn, *, warmup_ms: int = 25, rep_ms: int = 100, graph: bool | str = True) -> Timing:
    """Time ``fn()`` three ways (:class:`Timing`): eager calls (:func:`time_ms`), the CPU's
    time to enqueue one (:func:`host_time_ms`), one CUDA graph replay (:func:`graph_time_ms`).

    ``graph``: True to capture; False or a reason (e.g. :data:`NO_GRAPH_COMPILED`) to leave the
    graph timing out, recorded as such. Off CUDA: ``host_ms`` is ``ms`` and no graph is timed."""
    ms = time_ms(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    if not on_cuda():
        return Timing(ms, host_ms=ms, graph_note=NO_GRAPH_OFF_CUDA)
    host = host_time_ms(fn)
    if graph is True:
        graph_ms, note = graph_time_ms(fn, rep_ms=rep_ms)
    else:
        graph_ms, note = None, (graph if isinstance(graph, str) and graph else "graph timing not asked for")
    return Timing(ms, host_ms=host, graph_ms=graph_ms, graph_note=note)


def rate_columns(ms: float, bytes_moved: float | None, flops: float | None, copy_gbps: float,
                 matmul_tflops: float, prefix: str = "") -> dict:
    """GB/s and its share of the copy bandwidth, TFLOP/s and its share of the matmul ceiling, of
    a time ``ms`` (the eager ``ms`` with no prefix, ``graph_ms`` with ``prefix="graph_"``); {}
    for a time of 0 (a NaN time, a failed row's, gives NaN figures)."""
    row: dict = {}
    if ms == 0:
        return row
    if bytes_moved is not None:
        gbps = bytes_moved / ms / 1e6
        row[f"{prefix}gbps"] = round(gbps, 1)
        row[f"{prefix}pct_copy_bw"] = round(100 * gbps / copy_gbps, 1) if copy_gbps else float("nan")
    if flops is not None:
        tflops = flops / ms / 1e9
        row[f"{prefix}tflops"] = round(tflops, 2)
        row[f"{prefix}pct_matmul_peak"] = round(100 * tflops / matmul_tflops, 1) if matmul_tflops else float("nan")
    return row


def time_key(rows: list) -> str:
    """``"graph_ms"`` where every row of ``rows`` has a finite graph time, else ``"ms"``: the
    time to judge a comparison between them on (kernels alone where all were captured)."""
    ok = rows and all(isinstance(r.get("graph_ms"), (int, float)) and math.isfinite(r["graph_ms"]) and r["graph_ms"] > 0
                      for r in rows)
    return "graph_ms" if ok else "ms"


def peak_memory_bytes(fn) -> int | None:
    """Peak CUDA memory allocated by one call of ``fn()`` above what was allocated before it.

    Off CUDA: None, without calling ``fn`` (:func:`time_ms` already ran it).
    """
    if not on_cuda():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


# the ceilings are the first thing a run times, on a GPU that was idle: a longer warm-up than
# the ops' lets its clocks come up (an idle-clocked ceiling would overstate every "% of" column)
CEILING_WARMUP_MS, CEILING_REP_MS = 250, 500


def measure_copy_gbps(nbytes: int = 1 << 30, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written.

    Times with the active device's clock (:func:`time_ms`): make the Context first.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup_ms=CEILING_WARMUP_MS, rep_ms=CEILING_REP_MS)
    return 2 * nbytes / ms / 1e6


def measure_matmul_tflops(n: int = 8192, dtype=torch.bfloat16, device: str = "cuda") -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, warmup_ms=CEILING_WARMUP_MS, rep_ms=CEILING_REP_MS)
    return 2 * n**3 / ms / 1e9


# Dense (no sparsity) bf16 tensor-core peaks of the vendor's data sheets, TFLOP/s, by a part of
# the name torch reports ("NVIDIA H100 80GB HBM3" is the SXM part); the first match counts, so
# the lower-clocked variants come first. MFU is quoted against these, as training reports do; the
# measured matmul ceiling (a large cuBLAS GEMM, about 80% of it on an H100) is reported beside.
DENSE_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
)


def dense_bf16_peak(device_name: str | None) -> float | None:
    """The data-sheet dense bf16 peak of the GPU called ``device_name``, or None if unknown."""
    for part, tflops in DENSE_BF16_TFLOPS:
        if device_name and part in device_name:
            return tflops
    return None


def measure_ceilings(ctx: "Context") -> None:
    """Fill ``ctx.copy_gbps`` and ``ctx.matmul_tflops``: the device's measured peaks on CUDA; a
    crude CPU figure in a smoke run (16 MiB copy, 256^3 fp32 matmul), marked as such."""
    if ctx.device == "cuda":
        ctx.copy_gbps = measure_copy_gbps(device="cuda")
        ctx.matmul_tflops = measure_matmul_tflops(device="cuda")
        ctx.ceilings = "measured"
        ctx.dense_bf16_tflops = dense_bf16_peak(torch.cuda.get_device_properties(0).name)
    else:
        ctx.copy_gbps = measure_copy_gbps(16 << 20, device=ctx.device)
        ctx.matmul_tflops = measure_matmul_tflops(256, torch.float32, device=ctx.device)
        ctx.ceilings = f"crude {ctx.device} estimate (smoke run), not a device peak"


def device_info(device: str = "cuda") -> dict:
    import triton

    info = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    return info


@dataclass
class Context:
    """What a benchmark module gets: the measured ceilings and a place to put rows.

    ``device``: where tensors go ("cuda", or "cpu" in a smoke run). ``smoke``: tiny shapes, the
    same variants and rows as on the GPU (modules pick their shapes from it). Making a Context
    points the module-level helpers (:func:`time_ms`, :func:`sync`, ...) at its device.
    """

    copy_gbps: float
    matmul_tflops: float
    quick: bool = False
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # variants left out, with the reason (see skip)
    device: str = "cuda"
    smoke: bool = False
    ceilings: str = "measured"  # how copy_gbps / matmul_tflops were obtained (the markdown says it)
    dense_bf16_tflops: float | None = None  # the data-sheet peak MFU is quoted against (None: unknown GPU)
    deadline: float = math.inf  # time.time() at which the run's time budget is spent
    on_add: object = field(default=None, repr=False)  # called after each row (run.py saves the results)

    def __post_init__(self):
        _active.update(device=self.device, smoke=self.smoke, deadline=self.deadline)

    def mfu(self, flops: float, ms: float) -> dict:
        """Model FLOPs utilisation of a step: ``mfu_pct`` against the data-sheet dense bf16 peak
        (against the measured matmul ceiling where the GPU is not in :data:`DENSE_BF16_TFLOPS`,
        and ``mfu_peak`` says which), ``mfu_measured_pct`` against the measured ceiling."""
        achieved = flops / ms / 1e9
        measured = round(100 * achieved / self.matmul_tflops, 1)
        if self.dense_bf16_tflops:
            return dict(mfu_pct=round(100 * achieved / self.dense_bf16_tflops, 1), mfu_measured_pct=measured,
                        mfu_peak="data sheet")
        return dict(mfu_pct=measured, mfu_measured_pct=measured, mfu_peak="measured")

    def time_left(self) -> float:
        """Seconds left of the run's time budget (inf without one): modules drop optional
        variants (torch.compile above all) when it runs short."""
        return self.deadline - time.time()

    def add(self, bench: str, case: str, variant: str, ms, *, bytes_moved: float | None = None,
            flops: float | None = None, peak_mem: int | None = None, **extra) -> dict:
        """Record one measurement; derives GB/s or TFLOP/s and the share of the device's peak.

        ``ms``: milliseconds, or a :class:`Timing` (:func:`measure`), which adds ``host_ms``,
        ``graph_ms`` and the ``graph_*`` rates, or records why there is no graph time."""
        timing = ms if isinstance(ms, Timing) else Timing(float(ms))
        row = {"bench": bench, "case": case, "variant": variant, "ms": round(timing.ms, 4)}
        if timing.host_ms is not None:
            row["host_ms"] = round(timing.host_ms, 4)
        if timing.graph_ms is not None:
            row["graph_ms"] = round(timing.graph_ms, 4)
        row.update(rate_columns(timing.ms, bytes_moved, flops, self.copy_gbps, self.matmul_tflops))
        if timing.graph_ms is not None:
            row.update(rate_columns(timing.graph_ms, bytes_moved, flops, self.copy_gbps, self.matmul_tflops,
                                    prefix="graph_"))
        if peak_mem is not None:
            row["peak_mem_mib"] = round(peak_mem / 2**20, 1)
        row.update(extra)
        self.rows.append(row)
        if timing.graph_ms is None and timing.graph_note:
            self.skip_graph(bench, case, variant, timing.graph_note)
        if self.on_add is not None:
            self.on_add()
        return row

    def skip_graph(self, bench: str, case: str, variant: str, reason: str) -> None:
        """Record a row without graph columns and why (``column: graph_ms`` in the skipped list);
        off CUDA one entry for the whole run instead of one per row."""
        if reason == NO_GRAPH_OFF_CUDA:
            if any(s.get("column") == "graph_ms" and s["reason"] == reason for s in self.skipped):
                return
            bench = case = variant = "*"
        self.skipped.append({"bench": bench, "case": case, "variant": variant, "column": "graph_ms",
                             "reason": reason[:200]})

    def fail(self, bench: str, case: str, variant: str, exc: BaseException, **extra) -> dict:
        """Record a variant that raised: a row with a NaN time and the error, so the other
        variants' rows stay; an out-of-memory also gets ``oom`` and the cache emptied."""
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            extra["oom"] = True
            empty_cache()
        return self.add(bench, case, variant, float("nan"), error=f"{type(exc).__name__}: {exc}"[:200], **extra)

    def skip(self, bench: str, case: str, variant: str, reason: str) -> None:
        """Record a variant that was not measured and why (e.g. an SDPA backend refusing the
        case); listed in the results, and the smoke test fails on a skipped mimfast variant."""
        self.skipped.append({"bench": bench, "case": case, "variant": variant, "reason": reason[:200]})

    def speedups(self, bench: str, case: str, over: str, key: str = "ms") -> None:
        """Add ``speedup_vs_<over>`` to each row of (bench, case), and (``key`` "ms")
        ``graph_speedup_vs_<over>`` to each row that has a graph time where ``over``'s has one."""
        rows = [r for r in self.rows if r["bench"] == bench and r["case"] == case]
        base = next((r for r in rows if r["variant"] == over), None)
        if base is None:
            return
        for r in rows:
            r[f"speedup_vs_{over}"] = round(base[key] / r[key], 2)
        if key == "ms" and base.get("graph_ms"):
            for r in rows:
                if r.get("graph_ms"):
                    r[f"graph_speedup_vs_{over}"] = round(base["graph_ms"] / r["graph_ms"], 2)


def try_compile(fn, **kwargs):
    """``torch.compile(fn, dynamic=False, **kwargs)``, or None where inductor cannot run here, in a
    smoke run, and when less than ``COMPILE_MIN_LEFT_S`` of the run's time budget is left
    (compilation happens at the first call, inside the caller's warm-up, so inside the budget).

    Static shapes (:func:`static_compile_settings`): the benchmarks compile the same function at
    several shapes in one process, where dynamo's automatic dynamic shapes would compile every
    shape after the first as a slower shape-generic kernel, and its recompile limit would fall
    back to eager without an error."""
    if _active["smoke"]:
        return None
    left = _active["deadline"] - time.time()
    if left < COMPILE_MIN_LEFT_S:
        print(f"torch.compile left out: {left:.0f} s of the time budget left", flush=True)
        return None
    try:
        static_compile_settings()
        return torch.compile(fn, **{"dynamic": False, **kwargs})
    except Exception:  # pragma: no cover - depends on the machine
        return None


# compiled entries one function may hold: a case each (shape, grad mode, bias or not) across a run
RECOMPILE_LIMIT = 64


def static_compile_settings() -> None:
    """Raise dynamo's per-function recompile limit (8) to ``RECOMPILE_LIMIT``: every case of a
    benchmark (shape x grad mode) is an entry of its own with static shapes, and past the limit
    dynamo runs the function eagerly, which a "compile" row would then time as compiled."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def write_results(out_dir: Path, info: dict, ctx: Context, errors: list, plot: bool = True) -> tuple[Path, Path]:
    """``results.json``, ``results.md`` and (``plot``, where there are step rows) ``step.png``;
    drawing takes most of the time, so the saves after each row leave it out."""
    from mimfast.kernels import tuning  # here: importing a kernel module early would stop --smoke's interpreter

    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"info": info, "smoke": ctx.smoke, "copy_gbps": ctx.copy_gbps, "matmul_tflops": ctx.matmul_tflops,
               "dense_bf16_tflops": ctx.dense_bf16_tflops,
               "ceilings": ctx.ceilings, "rows": ctx.rows, "skipped": ctx.skipped, "errors": errors,
               "tuning": tuning.chosen()}
    jpath = out_dir / "results.json"
    # strict JSON: a failed row's NaN ms (or an inf) is written as null; a value JSON has no
    # type for as its str(), so one odd value cannot stop the saves
    _write(jpath, json.dumps(_finite(payload), indent=1, allow_nan=False, default=str))
    from benchmarks.report import plot_step

    png = plot_step(_finite(payload), out_dir / "step.png") if plot else None
    mpath = out_dir / "results.md"
    text = markdown_table(payload)
    if png is not None:
        text += f"\n![images/s per configuration]({png.name})\n"
    _write(mpath, text)
    return jpath, mpath


def _write(path: Path, text: str) -> None:
    """Write through a temporary file: a run killed mid-write leaves the previous version whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _finite(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no NaN), numpy / torch
    scalars as Python numbers."""
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# the table's first columns, in this order where a row has them; the rest follow sorted
LEAD_COLUMNS = ("bench", "case", "variant", "ms", "host_ms", "graph_ms", "gbps", "pct_copy_bw", "graph_gbps",
                "graph_pct_copy_bw", "tflops", "pct_matmul_peak", "graph_tflops", "graph_pct_matmul_peak",
                "peak_mem_mib")
# always in the table (what earlier results had), even where no row has them
FIXED_COLUMNS = ("bench", "case", "variant", "ms", "gbps", "pct_copy_bw", "tflops", "pct_matmul_peak",
                 "peak_mem_mib")

# what results.md says of its columns (those of the table only; speedup_vs_* / graph_speedup_vs_*
# by their prefix)
COLUMN_LEGEND = {
    "ms": "median milliseconds of one eager call: CUDA events around each call of a loop "
          "(triton.testing.do_bench, L2 flushed before each call). Where the CPU cannot enqueue a call "
          "as fast as the GPU runs it, this is the CPU's launch and dispatch time, not the kernels'.",
    "host_ms": "CPU milliseconds to enqueue one call: perf_counter around 10 back-to-back calls without "
               "synchronising, per call, median of 7 rounds each started on an idle GPU, after warm-up. "
               "host_ms >= ms: the op is launch-bound (ms is the CPU's time). A call that synchronises "
               "inside counts its GPU time here. Step rows: the time to enqueue one training step from an "
               "idle GPU, median of the timed steps (a step with more launches than the CUDA launch queue "
               "holds waits for the GPU, so there it is an upper bound). Smoke runs: equal to ms.",
    "graph_ms": "median GPU milliseconds of one replay of the same call captured in a CUDA graph (warm-up "
                "on a side stream, inputs and gradient buffers fixed, events around each replay, L2 flushed "
                "before each, the replays queued behind a GPU sleep so none waits for the CPU): the kernels' "
                "time without launch overhead. Empty where the call was not captured (torch.compile "
                "variants, calls that synchronise or allocate outside the caching allocator; the reasons are "
                "under 'Rows without graph_ms').",
    "gbps": "bytes the op must move / ms (GB/s); pct_copy_bw: its share of the measured copy bandwidth.",
    "graph_gbps": "the same bytes / graph_ms; graph_pct_copy_bw: its share of the copy bandwidth. The "
                  "project's %-of-copy-bandwidth targets are read from graph_pct_copy_bw.",
    "tflops": "FLOPs / ms (TFLOP/s); pct_matmul_peak: its share of the measured bf16 matmul ceiling.",
    "graph_tflops": "the same FLOPs / graph_ms; graph_pct_matmul_peak: its share of the matmul ceiling.",
    "peak_mem_mib": "peak CUDA memory one call allocates above what was allocated before it (MiB).",
    "speedup_vs_": "variant X's ms / this row's ms, within the case.",
    "graph_speedup_vs_": "variant X's graph_ms / this row's graph_ms, within the case (rows where both were "
                         "captured).",
    "meets_target": "whether the row meets the op's target; judged on graph_ms where the row and every row "
                    "it is compared with have one, else on ms (target_basis says which).",
}


def table_columns(rows: list) -> list:
    """The markdown table's columns: :data:`FIXED_COLUMNS`, the other :data:`LEAD_COLUMNS` a row
    has, in that order, then every other key of the rows, sorted."""
    present = {k for r in rows for k in r}
    cols = [c for c in LEAD_COLUMNS if c in FIXED_COLUMNS or c in present]
    return cols + sorted(present - set(cols))


def legend_lines(cols: list) -> list:
    """``- `col`: meaning`` lines of :data:`COLUMN_LEGEND` for the columns in ``cols``."""
    lines = []
    for key, text in COLUMN_LEGEND.items():
        if key.endswith("_"):  # a prefix ("graph_speedup_vs_eager" does not start with "speedup_vs_")
            shown = any(c.startswith(key) for c in cols)
        else:
            shown = key in cols
        if shown:
            lines.append(f"- `{key}{'X' if key.endswith('_') else ''}`: {text}")
    return lines


def markdown_table(payload: dict) -> str:
    info = payload["info"]
    ceilings = payload.get("ceilings", "measured")
    lines = [f"# mimfast benchmarks on {info.get('device')}", ""]
    if payload.get("smoke"):
        lines += ["**Smoke run**: tiny shapes on the CPU, Triton kernels interpreted; it proves the benchmarks "
                  "run, its figures mean nothing.", ""]
    if ceilings == "measured":
        peaks = (f"measured copy bandwidth {payload['copy_gbps']:.0f} GB/s (read + write), "
                 f"bf16 matmul {payload['matmul_tflops']:.0f} TFLOP/s")
        if payload.get("dense_bf16_tflops"):
            peaks += (f"; MFU (mfu_pct) against the data-sheet dense bf16 peak "
                      f"{payload['dense_bf16_tflops']:.0f} TFLOP/s, mfu_measured_pct against the measured matmul")
        else:
            peaks += "; MFU against the measured matmul (GPU not in the data-sheet table)"
    else:  # the pct_* columns are then against placeholders
        peaks = (f"copy bandwidth {payload['copy_gbps']:.3g} GB/s, fp32 matmul {payload['matmul_tflops']:.3g} "
                 f"TFLOP/s: {ceilings}")
    lines += [
        f"torch {info.get('torch')}, triton {info.get('triton')}, CUDA {info.get('cuda')}, {info.get('date')}",
        peaks,
        "",
    ]
    cols = table_columns(payload["rows"])
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in payload["rows"]:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    legend = legend_lines(cols)
    if legend:
        lines += ["", "## Columns", ""] + legend
    skipped = payload.get("skipped") or []
    variants = [s for s in skipped if "column" not in s]
    columns = [s for s in skipped if "column" in s]
    if variants:
        lines += ["", "## Skipped variants", ""]
        lines += [f"- {s['bench']} / {s['case']} / {s['variant']}: {s['reason']}" for s in variants]
    if columns:
        lines += ["", "## Rows without graph_ms", ""]
        lines += [f"- {s['bench']} / {s['case']} / {s['variant']}: {s['reason']}" for s in columns]
    if payload.get("tuning"):
        lines += ["", "## Launch configurations chosen on the device (mimfast.kernels.tuning)", ""]
        for t in payload["tuning"]:
            times = ", ".join(f"{n} {'failed' if ms is None else f'{ms:.4g} ms'}" for n, ms in t["ms"].items())
            lines.append(f"- {t['key']}: **{t['chosen']}** of {times}")
    if payload.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in payload["errors"]]
    return "\n".join(lines) + "\n"
