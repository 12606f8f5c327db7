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

    def add(self, bench: str, case: str, variant: str, ms: float, *, bytes_moved: float | None = None,
            flops: float | None = None, peak_mem: int | None = None, **extra) -> dict:
        """Record one measurement; derives GB/s or TFLOP/s and the share of the device's peak."""
        row = {"bench": bench, "case": case, "variant": variant, "ms": round(ms, 4)}
        if bytes_moved is not None:
            gbps = bytes_moved / ms / 1e6
            row.update(gbps=round(gbps, 1), pct_copy_bw=round(100 * gbps / self.copy_gbps, 1))
        if flops is not None:
            tflops = flops / ms / 1e9
            row.update(tflops=round(tflops, 2), pct_matmul_peak=round(100 * tflops / self.matmul_tflops, 1))
        if peak_mem is not None:
            row["peak_mem_mib"] = round(peak_mem / 2**20, 1)
        row.update(extra)
        self.rows.append(row)
        if self.on_add is not None:
            self.on_add()
        return row

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
        """Add ``speedup_vs_<over>`` to each row of (bench, case)."""
        rows = [r for r in self.rows if r["bench"] == bench and r["case"] == case]
        base = next((r for r in rows if r["variant"] == over), None)
        if base is None:
            return
        for r in rows:
            r[f"speedup_vs_{over}"] = round(base[key] / r[key], 2)


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
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"info": info, "smoke": ctx.smoke, "copy_gbps": ctx.copy_gbps, "matmul_tflops": ctx.matmul_tflops,
               "dense_bf16_tflops": ctx.dense_bf16_tflops,
               "ceilings": ctx.ceilings, "rows": ctx.rows, "skipped": ctx.skipped, "errors": errors}
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
    cols = ["bench", "case", "variant", "ms", "gbps", "pct_copy_bw", "tflops", "pct_matmul_peak",
            "peak_mem_mib"]
    extra = sorted({k for r in payload["rows"] for k in r} - set(cols))
    cols += extra
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in payload["rows"]:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if payload.get("skipped"):
        lines += ["", "## Skipped variants", ""]
        lines += [f"- {s['bench']} / {s['case']} / {s['variant']}: {s['reason']}" for s in payload["skipped"]]
    if payload.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in payload["errors"]]
    return "\n".join(lines) + "\n"
