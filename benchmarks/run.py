"""Run every benchmark module (``benchmarks/bench_*.py``) on the GPU and write the results.

    python -m benchmarks.run --out DIR [--only masking,patch_loss] [--quick]
    TRITON_INTERPRET=1 python -m benchmarks.run --out DIR --smoke      # CPU, no GPU needed

Writes ``DIR/results.json`` and ``DIR/results.md`` (again after every row, so a run cut by a
timeout keeps what it measured; the module then running is named under Errors) and prints a
short table last. ``results.md`` ends with a legend of its columns (``harness.COLUMN_LEGEND``).
``--budget-s``: no module starts once the budget is spent, and the modules leave out optional
variants (torch.compile first) when little of it is left (``Context.time_left``).

Each op row has three times (``harness.measure``): ``ms``, the eager call (CUDA events around
each call of a loop: launch overhead included where the CPU is slower than the GPU, as at MAE
shapes); ``host_ms``, the CPU's time to enqueue one call (``host_ms >= ms``: launch-bound); and
``graph_ms``, one replay of the call captured in a CUDA graph: the kernels alone, with
``graph_gbps`` / ``graph_pct_copy_bw`` / ``graph_tflops`` beside the eager rates, on which the
targets (``meets_target``) are judged where every row compared was captured. Rows whose call
cannot be captured (torch.compile variants, synchronising calls) have no graph columns; the
skipped list says why (entries with ``column: graph_ms``). Step rows have ``host_ms`` (the time
to enqueue one training step) but no graph time.

``--smoke`` runs every module on the CPU at tiny shapes (batch 2-4, small widths, depths and
token counts), the Triton kernels under Triton's interpreter, through the same variant
functions, op calls and row bookkeeping as on the GPU: it proves the benchmarks run (imports,
API calls, shapes), not how fast anything is. Timing is one ``perf_counter``-timed call
(``host_ms`` the same figure, no CUDA graph: one skipped entry says so), peak memory is None,
the copy / matmul ceilings are crude CPU figures (the markdown says so), ``torch.compile``
variants and CUDA-only ones (SDPA efficient / cuDNN, nvjpeg decode) are left out, and the
GpuLoader takes its synchronous (no side stream) path. ``TRITON_INTERPRET=1`` must be set
before mimfast's kernels are imported; ``--smoke`` sets it when nothing imported them yet.
``--quick`` still narrows the cases. ``tests/test_benchmarks_smoke.py`` runs every module this
way (about 40 s on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import harness


# the pretraining step first: issue 9's comparison needs its torch.compile variants, which bench_step
# skips once less than COMPILE_MIN_LEFT_S of the budget is left; attention is quick
ORDER = ["bench_step", "bench_attention", "bench_masking", "bench_patch_loss", "bench_beit", "bench_fusions",
         "bench_input_pipeline", "bench_profile"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated module names without 'bench_'")
    ap.add_argument("--quick", action="store_true", help="fewer cases (the GPU suite's default)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no further benchmark module once this many seconds have passed (0: no limit)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU, kernels interpreted: checks that every module runs")
    args = ap.parse_args(argv)
    t_start = time.time()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        if not _interpreter_ready():
            return 2
        torch.set_num_threads(1)  # tiny tensors: more threads only spin-wait on a shared CPU
    elif not torch.cuda.is_available():
        print("benchmarks need a CUDA device (or --smoke for a CPU check)", file=sys.stderr)
        return 2
    info = harness.device_info(device)
    deadline = t_start + args.budget_s if args.budget_s else math.inf
    ctx = harness.Context(copy_gbps=0.0, matmul_tflops=0.0, quick=args.quick, device=device, smoke=args.smoke,
                          deadline=deadline)
    harness.measure_ceilings(ctx)
    print(f"{info['device']}: copy {ctx.copy_gbps:.0f} GB/s, matmul {ctx.matmul_tflops:.3g} TFLOP/s ({ctx.ceilings})",
          flush=True)
    only = {s for s in args.only.split(",") if s}
    here = Path(__file__).parent
    errors = []
    found = [m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")]
    # the kernels first, then the end-to-end step, then the rest
    order = {name: i for i, name in enumerate(ORDER)}
    for mod in sorted(found, key=lambda m: (order.get(m, len(order)), m)):
        if only and mod[len("bench_"):] not in only:
            continue
        if ctx.time_left() <= 0:
            errors.append(f"{mod}: not run, the time budget of {args.budget_s:.0f}s was spent")
            continue
        t0 = time.time()
        # saved after every row: what a timeout cuts short keeps its rows and says so
        running = [f"{mod}: still running when these results were written (cut short by a timeout?)"]
        ctx.on_add = lambda: harness.write_results(args.out, info, ctx, errors + running, plot=False)
        try:
            importlib.import_module(f"benchmarks.{mod}").run(ctx)
        except Exception as e:  # one broken benchmark must not lose the others' results
            traceback.print_exc()
            errors.append(f"{mod}: {type(e).__name__}: {e}")
        ctx.on_add = None
        harness.empty_cache()
        print(f"[{mod}] {time.time() - t0:.0f}s", flush=True)
        harness.write_results(args.out, info, ctx, errors)
    jpath, mpath = harness.write_results(args.out, info, ctx, errors)
    print(mpath.read_text())
    return 1 if errors else 0


def _interpreter_ready() -> bool:
    """Smoke runs need Triton's interpreter, which is read when a kernel is defined."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        return True
    if any(m.startswith("mimfast.kernels.") for m in sys.modules):
        print("--smoke needs TRITON_INTERPRET=1 set before mimfast's kernels are imported", file=sys.stderr)
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


if __name__ == "__main__":
    sys.exit(main())
