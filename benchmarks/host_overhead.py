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

Rows: op (``mae_step``: a whole MAE model's forward, and its backward in ``fwd+bwd``); variant:
``triton``, ``triton_dispatch`` (the Triton path with every kernel launch through the dispatcher,
as before :mod:`mimfast.ops._custom_op` skipped it in eager mode) or ``eager``; ``fwd`` (forward
with gradient tracking on, graph dropped) or ``fwd+bwd`` (forward, then ``torch.autograd.backward``
with fixed incoming gradients).

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

KERNEL_MODULES = ("attention", "gelu", "gelu_matmul", "layer_norm", "linear_ce", "masking", "patch_embed", "patch_loss")


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

    # import them all first: a module imported while another is stubbed would keep the stub of a
    # helper it imports from it
    modules = [importlib.import_module(f"mimfast.kernels.{name}") for name in KERNEL_MODULES]
    saved = []
    for mod in modules:
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

    # the blocks' dtypes under autocast: a bf16 branch output added to the fp32 residual stream
    f32 = torch.float32
    x, res, w, b = leaf(B, S, D), leaf(B, S, D, dtype=f32), leaf(D, dtype=f32), leaf(D, dtype=f32)
    qkv = leaf(B, S, 3 * D)
    h, w2, b2 = leaf(B, S, 4 * D), leaf(D, 4 * D), leaf(D)
    w1, b1 = leaf(4 * D, D), leaf(4 * D)
    wq, bq, wp, bp = leaf(3 * D, D), leaf(3 * D), leaf(D, D), leaf(D)
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
        "self_attention": lambda be: (ops.self_attention(x, wq, bq, wp, bp, H, backend=be),),
        "gelu_linear": lambda be: (ops.gelu_linear(h, w2, b2, backend=be),),
        "mlp": lambda be: (ops.mlp(x, w1, b1, w2, b2, backend=be),),
        "random_masking": lambda be: ops.random_masking(tok, 0.75, pos, noise, backend=be)[:1],
        "unshuffle_with_mask_token": lambda be: (ops.unshuffle_with_mask_token(dec, mt, ids_restore, dec_pos,
                                                                               backend=be),),
        "masked_patch_loss": lambda be: (ops.masked_patch_loss(pred, imgs, mask, s["p"], backend=be),),
        "masked_patch_embed": lambda be: ops.masked_patch_embed(pe_imgs, pw, pb, 0.75, pe_pos, noise, backend=be)[:1],
        "patch_embed": lambda be: (ops.patch_embed(pe_imgs.to(dt), pw.to(dt), pb.to(dt), backend=be),),
        "mae_step": _mae_step(device, smoke),
    }


def _mae_step(device: str, smoke: bool):
    """A whole MAE forward (loss) under bf16 autocast, the backward in the measure loop: MAE
    ViT-B/16's 12 + 8 blocks (on the CPU 32 wide, 16 patches: the op count of ViT-B, tiny
    arithmetic; smoke: 2 + 1 blocks) at a batch small enough that the GPU never holds up the host
    (``host_us`` is then the step's enqueue cost). The Triton and eager models hold the same
    weights and are built at the first call (not for runs that leave this row out); the optimizer
    is left out (the same fused AdamW either way)."""
    import functools

    from mimfast.models.mae import MaskedAutoencoderViT

    if device == "cuda" and not smoke:
        shape = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                     decoder_depth=8, decoder_num_heads=16)
        batch = 8
    else:
        shape = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2,
                     depth=2 if smoke else 12, decoder_depth=1 if smoke else 8)
        batch = 2

    @functools.cache
    def models():
        built = {be: MaskedAutoencoderViT(**shape, norm_pix_loss=True, kernels=be).to(device)
                 for be in ("triton", "eager")}
        built["eager"].load_state_dict(built["triton"].state_dict())
        return built, torch.randn(batch, 3, shape["img_size"], shape["img_size"], device=device)

    def call(backend):
        model, imgs = models()[0][backend], models()[1]
        with torch.autocast(device, dtype=torch.bfloat16):
            return (model(imgs, mask_ratio=0.75)[0],)

    return call


def _step_calls(n: int) -> int:
    """Calls per timed loop of the whole-step row: a step costs about a hundred ops' calls, so a
    tenth as many (the GPU suite gives the whole module 40 s)."""
    return max(2, n // 10)


def _clock(cuda: bool):
    # CPU (kernels stubbed): this thread's CPU time, which a shared machine's other processes
    # disturb far less than wall time; CUDA: wall time (a full launch queue blocks the host)
    return time.perf_counter if cuda else time.thread_time


def _loop(fn, n: int, cuda: bool) -> tuple[float, float]:
    """(host seconds, wall seconds including the final synchronize) of n calls."""
    clock = _clock(cuda)
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), clock()
    for _ in range(n):
        fn()
    c1 = clock()
    if cuda:
        torch.cuda.synchronize()
    return c1 - c0, max(time.perf_counter() - t0, c1 - c0)


@contextlib.contextmanager
def _variant(name: str):
    """``triton_dispatch``: the Triton path with every kernel launch through the registered
    custom op (mimfast.ops._custom_op.ALWAYS_DISPATCH), the cost before eager calls skipped it."""
    from mimfast.ops import _custom_op

    _custom_op.ALWAYS_DISPATCH = name == "triton_dispatch"
    try:
        yield "eager" if name == "eager" else "triton"
    finally:
        _custom_op.ALWAYS_DISPATCH = False


VARIANTS = ("triton", "triton_dispatch", "eager")


def measure(device: str = "cpu", n: int = 100, warmup: int = 20, smoke: bool = False,
            ops_only: tuple[str, ...] | None = None, repeat: int = 5, progress: bool = False) -> list[dict]:
    """One row per (op, variant, mode) with host_us and wall_us per call: the fastest of
    ``repeat`` loops of ``n`` calls (other processes only ever add time), the variants' loops
    interleaved so that a slow spell of the machine hits them alike. ``progress``: print each row
    as it is measured (a run cut by a timeout keeps what it printed)."""
    cuda = device == "cuda"
    stub = stubbed_kernels() if not cuda else contextlib.nullcontext()
    rows = []
    with stub:
        for name, call in _cases(device, smoke).items():
            if ops_only and name not in ops_only:
                continue
            n_op, warmup_op = (_step_calls(n), max(1, warmup // 10)) if name == "mae_step" else (n, warmup)
            outs = call("eager")
            grads = [torch.randn_like(o) for o in outs]
            for mode in ("fwd", "fwd+bwd"):
                def fn(backend, call=call, mode=mode):
                    out = call(backend)
                    if mode == "fwd+bwd":
                        torch.autograd.backward(out, grads)

                best = {}
                for variant in VARIANTS:
                    with _variant(variant) as backend:
                        for _ in range(warmup_op):
                            fn(backend)
                for _ in range(repeat):
                    for variant in VARIANTS:
                        with _variant(variant) as backend:
                            host, wall = _loop(lambda: fn(backend), n_op, cuda)
                        if variant not in best or host < best[variant][0]:
                            best[variant] = (host, wall)
                for variant in VARIANTS:
                    host, wall = best[variant]
                    rows.append(dict(op=name, backend=variant, mode=mode, host_us=round(host / n_op * 1e6, 1),
                                     wall_us=round(wall / n_op * 1e6, 1), device=device, stubbed=not cuda))
                    if progress:
                        r = rows[-1]
                        print(f"  {name} {mode} {variant}: host {r['host_us']} us, wall {r['wall_us']} us",
                              flush=True)
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
    rows = measure(args.device, n, warmup, args.smoke, tuple(args.ops) if args.ops else None, repeat,
                   progress=not args.smoke)
    stubbed = ", kernels stubbed" if args.device == "cpu" else ""
    print(f"host overhead per call, us ({args.device}{stubbed}; fastest of {repeat} loops of {n} calls, "
          f"mae_step {_step_calls(n)})")
    heads = " ".join(f"{v[:10]:>10s}" for v in ("triton", "dispatch", "eager"))
    print(f"{'':26s} {'':8s} {'host_us':>32s}   {'wall_us':>32s}")
    print(f"{'op':26s} {'mode':8s} {heads}   {heads}")
    by = {(r["op"], r["mode"], r["backend"]): r for r in rows}
    for op, mode in dict.fromkeys((r["op"], r["mode"]) for r in rows):
        host = " ".join(f"{by[(op, mode, v)]['host_us']:10.1f}" for v in VARIANTS)
        wall = " ".join(f"{by[(op, mode, v)]['wall_us']:10.1f}" for v in VARIANTS)
        print(f"{op:26s} {mode:8s} {host}   {wall}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
