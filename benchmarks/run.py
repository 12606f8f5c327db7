"""Run every benchmark module (``benchmarks/bench_*.py``) on the GPU and write the results.

    python -m benchmarks.run --out DIR [--only masking,patch_loss] [--quick]

Writes ``DIR/results.json`` and ``DIR/results.md`` and prints a short table last.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import harness


ORDER = ["bench_masking", "bench_patch_loss", "bench_attention", "bench_step", "bench_beit",
         "bench_input_pipeline", "bench_profile"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated module names without 'bench_'")
    ap.add_argument("--quick", action="store_true", help="fewer cases (smoke run)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no further benchmark module once this many seconds have passed (0: no limit)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA device", file=sys.stderr)
        return 2
    info = harness.device_info()
    ctx = harness.Context(copy_gbps=harness.measure_copy_gbps(), matmul_tflops=harness.measure_matmul_tflops(),
                          quick=args.quick)
    print(f"{info['device']}: copy {ctx.copy_gbps:.0f} GB/s, bf16 matmul {ctx.matmul_tflops:.0f} TFLOP/s",
          flush=True)
    only = {s for s in args.only.split(",") if s}
    here = Path(__file__).parent
    errors = []
    found = [m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")]
    # the kernels first, then the end-to-end step, then the rest
    order = {name: i for i, name in enumerate(ORDER)}
    t_start = time.time()
    for mod in sorted(found, key=lambda m: (order.get(m, len(order)), m)):
        if only and mod[len("bench_"):] not in only:
            continue
        if args.budget_s and time.time() - t_start > args.budget_s:
            errors.append(f"{mod}: not run, the time budget of {args.budget_s:.0f}s was spent")
            continue
        t0 = time.time()
        try:
            importlib.import_module(f"benchmarks.{mod}").run(ctx)
        except Exception as e:  # one broken benchmark must not lose the others' results
            traceback.print_exc()
            errors.append(f"{mod}: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
        print(f"[{mod}] {time.time() - t0:.0f}s", flush=True)
        harness.write_results(args.out, info, ctx, errors)
    jpath, mpath = harness.write_results(args.out, info, ctx, errors)
    print(mpath.read_text())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
