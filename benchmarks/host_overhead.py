"""Host-side (CPU) cost per call of the ops' Triton paths, against eager.

At MAE shapes each op's GPU work is tens of microseconds, so the Python and dispatch work that
launches it can cost more than the kernels (a CPU-bound training step). This measures that work:

- CUDA (no stubs): ``n`` calls in a loop with no synchronize inside it; ``host_us`` is the loop's
  wall time per call (time to enqueue), ``wall_us`` adds the final synchronize (``host_us`` close
  to ``wall_us`` means the op is CPU-bound at this shape). Default shapes are MAE ViT-B's
  (B = 256, 50 encoder tokens, decoder 197 tokens of 512).
- CPU: the Triton kernels' launches are replaced by no-ops (:func:`stubbed_kernels`; the
  interpreter is switched on so the ops take their Triton path), so ``host_us`` (the thread's
  CPU time) is everything but the kernels. Tiny shapes keep eager's arithmetic negligible.

Rows: op, backend (triton / eager), ``fwd`` (forward with gradient tracking on, graph dropped)
and ``fwd+bwd`` (forward, then ``torch.autograd.backward`` with fixed incoming gradients).

    python -m benchmarks.host_overhead [--smoke] [--n 100] [--repeat 5] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

if "mimfast.kernels" not in sys.modules and not torch.cuda.is_available():
    # the Triton path runs on CPU tensors only under the interpreter, read when kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_MODULES = ("attention", "gelu", "layer_norm", "linear_ce", "masking", "patch_embed", "patch_loss")


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return _no_op


def _no_op(*args, **kwargs):
    return None


@contextlib.contextmanager
def stubbed_kernels():
    """Replace every Triton kernel of the op kernel modules with a no-op launch (outputs stay
    uninitialised); the originals are put back on exit."""
    import importlib

    from triton.runtime.jit import KernelInterface

    saved = []
    for name in KERNEL_MODULES:
        mod = importlib.import_module(f"mimfast.kernels.{name}")
        for attr, value in list(vars(mod).items()):
            if isinstance(value, KernelInterface):
                saved.append((mod, attr, value))
                setattr(mod, attr, _NoLaunch())
    try:
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


def _shapes(device: str, smoke: bool) -> dict:
    if device == "cuda" and not smoke:  # MAE ViT-B/16, batch 256
        return dict(B=256, S=50, D=768, H=12, L=196, P=768, DEC_D=512, img=224, p=16)
    return dict(B=2, S=5, D=32, H=2, L=16, P=48, DEC_D=24, img=16, p=4)


def _cases(device: str, smoke: bool):
    """name -> (call(backend) -> tensors with gradient, tensors of the graph outputs)."""
    from mimfast import ops

    s = _shapes(device, smoke)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    B, S, D, H, L, P = s["B"], s["S"], s["D"], s["H"], s["L"], s["P"]

    def leaf(*shape, dtype=dt):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(True)

    x, res, w, b = leaf(B, S, D), leaf(B, S, D), leaf(D, dtype=torch.float32), leaf(D, dtype=torch.float32)
    qkv = leaf(B, S, 3 * D)
    h, w2, b2 = leaf(B, S, 4 * D), leaf(D, 4 * D), leaf(D)
    tok, pos = leaf(B, L, D), torch.randn(1, L, D, device=device, dtype=dt)
    noise = torch.rand(B, L, device=device)
    K = int(L * 0.25)
    dec, mt = leaf(B, 1 + K, s["DEC_D"]), leaf(1, 1, s["DEC_D"])
    dec_pos = torch.randn(1, 1 + L, s["DEC_D"], device=device, dtype=dt)
    ids_restore = torch.argsort(torch.rand(B, L, device=device), dim=1)
    pred = leaf(B, L, P)
    imgs = torch.randn(B, 3, s["img"], s["img"], device=device, dtype=dt)
    mask = (torch.rand(B, L, device=device) < 0.75).float()
    pw, pb = leaf(D, 3, s["p"], s["p"], dtype=torch.float32), leaf(D, dtype=torch.float32)
    pe_imgs, pe_pos = imgs.float(), torch.randn(1, L, D, device=device)
    return {
        "add_layer_norm": lambda be: ops.add_layer_norm(x, res, w, b, 1e-6, out_dtype=dt, backend=be),
        "attention": lambda be: (ops.attention(qkv, H, backend=be),),
        "gelu_linear": lambda be: (ops.gelu_linear(h, w2, b2, backend=be),),
        "random_masking": lambda be: ops.random_masking(tok, 0.75, pos, noise, backend=be)[:1],
        "unshuffle_with_mask_token": lambda be: (ops.unshuffle_with_mask_token(dec, mt, ids_restore, dec_pos,
                                                                               backend=be),),
        "masked_patch_loss": lambda be: (ops.masked_patch_loss(pred, imgs, mask, s["p"], backend=be),),
        "masked_patch_embed": lambda be: ops.masked_patch_embed(pe_imgs, pw, pb, 0.75, pe_pos, noise, backend=be)[:1],
    }


def _time(fn, n: int, warmup: int, cuda: bool, repeat: int) -> tuple[float, float]:
    """(host us per call, wall us per call including the final synchronize): the fastest of
    ``repeat`` loops of ``n`` calls (other processes only ever add time). On the CPU (kernels
    stubbed) host time is this thread's CPU time, which a shared machine's other processes
    disturb far less than wall time; on CUDA it is wall time (a full launch queue blocks)."""
    clock = time.perf_counter if cuda else time.thread_time
    for _ in range(warmup):
        fn()
    best = None
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), clock()
        for _ in range(n):
            fn()
        c1 = clock()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if best is None or c1 - c0 < best[0]:
            best = (c1 - c0, max(t2 - t0, c1 - c0))
    return best[0] / n * 1e6, best[1] / n * 1e6


def measure(device: str = "cpu", n: int = 100, warmup: int = 20, smoke: bool = False,
            ops_only: tuple[str, ...] | None = None, repeat: int = 5) -> list[dict]:
    """One row per (op, backend, mode) with host_us and wall_us per call."""
    cuda = device == "cuda"
    stub = stubbed_kernels() if not cuda else contextlib.nullcontext()
    rows = []
    with stub:
        for name, call in _cases(device, smoke).items():
            if ops_only and name not in ops_only:
                continue
            for backend in ("triton", "eager"):
                outs = call(backend)
                grads = [torch.randn_like(o) for o in outs]

                def fwd(call=call, backend=backend):
                    call(backend)

                def fwd_bwd(call=call, backend=backend, grads=grads):
                    torch.autograd.backward(call(backend), grads)

                for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    host, wall = _time(fn, n, warmup, cuda, repeat)
                    rows.append(dict(op=name, backend=backend, mode=mode, host_us=round(host, 1),
                                     wall_us=round(wall, 1), device=device, stubbed=not cuda))
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--n", type=int, default=100, help="calls per timed loop")
    ap.add_argument("--repeat", type=int, default=5, help="timed loops per row (the fastest is reported)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few calls (a test runs this)")
    ap.add_argument("--ops", nargs="*", help="only these ops")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("the CPU measurement needs TRITON_INTERPRET=1 before mimfast's kernels are imported")
    n, warmup, repeat = (3, 2, 1) if args.smoke else (args.n, args.warmup, args.repeat)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny tensors: no intra-op threads to spin up
    rows = measure(args.device, n, warmup, args.smoke, tuple(args.ops) if args.ops else None, repeat)
    stubbed = ", kernels stubbed" if args.device == "cpu" else ""
    print(f"host overhead per call, us ({args.device}{stubbed}; fastest of {repeat} loops of {n} calls)")
    print(f"{'op':28s} {'mode':8s} {'triton host_us':>15s} {'eager host_us':>14s} {'triton wall_us':>15s} "
          f"{'eager wall_us':>14s}")
    by = {(r["op"], r["mode"], r["backend"]): r for r in rows}
    for op, mode in dict.fromkeys((r["op"], r["mode"]) for r in rows):
        t, e = by[(op, mode, "triton")], by[(op, mode, "eager")]
        print(f"{op:28s} {mode:8s} {t['host_us']:15.1f} {e['host_us']:14.1f} {t['wall_us']:15.1f} {e['wall_us']:14.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
