"""Benchmark harness: CUDA-event timing (``triton.testing.do_bench``, median after warm-up),
the device's measured ceilings, peak memory, and result files.

Every benchmark module ``benchmarks/bench_*.py`` defines ``run(ctx: Context) -> None`` and
records rows through ``ctx.add(...)``; ``python -m benchmarks.run`` collects them.
"""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch


def time_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (events, after warm-up)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def peak_memory_bytes(fn) -> int:
    """Peak CUDA memory allocated by one call of ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def measure_copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def measure_matmul_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def device_info() -> dict:
    import triton

    info = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    return info


@dataclass
class Context:
    """What a benchmark module gets: the measured ceilings and a place to put rows."""

    copy_gbps: float
    matmul_tflops: float
    quick: bool = False
    rows: list = field(default_factory=list)

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
        return row

    def speedups(self, bench: str, case: str, over: str, key: str = "ms") -> None:
        """Add ``speedup_vs_<over>`` to each row of (bench, case)."""
        rows = [r for r in self.rows if r["bench"] == bench and r["case"] == case]
        base = next((r for r in rows if r["variant"] == over), None)
        if base is None:
            return
        for r in rows:
            r[f"speedup_vs_{over}"] = round(base[key] / r[key], 2)


def try_compile(fn):
    """``torch.compile(fn)``, or None where inductor cannot run here."""
    try:
        return torch.compile(fn)
    except Exception:  # pragma: no cover - depends on the machine
        return None


def write_results(out_dir: Path, info: dict, ctx: Context, errors: list) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"info": info, "copy_gbps": ctx.copy_gbps, "matmul_tflops": ctx.matmul_tflops,
               "rows": ctx.rows, "errors": errors}
    jpath = out_dir / "results.json"
    jpath.write_text(json.dumps(payload, indent=1))
    mpath = out_dir / "results.md"
    mpath.write_text(markdown_table(payload))
    return jpath, mpath


def markdown_table(payload: dict) -> str:
    info = payload["info"]
    lines = [
        f"# mimfast benchmarks on {info.get('device')}",
        "",
        f"torch {info.get('torch')}, triton {info.get('triton')}, CUDA {info.get('cuda')}, {info.get('date')}",
        f"measured copy bandwidth {payload['copy_gbps']:.0f} GB/s (read + write), "
        f"bf16 matmul {payload['matmul_tflops']:.0f} TFLOP/s",
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
    if payload.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in payload["errors"]]
    return "\n".join(lines) + "\n"
