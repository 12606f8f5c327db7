"""Compile every Triton kernel of ``mimfast.kernels`` for sm_90 (Hopper) without a GPU.

The launch functions run on CPU tensors with their CUDA branch forced (GPU tile sizes, the
compiled-mode heuristics, an H100's 132 SMs for the bias-gradient batch groups) at the shapes,
dtypes and options the tests and benchmarks use on CUDA; each launch is captured instead of
run, specialised exactly as Triton's launcher would (argument dtypes, ints equal to 1, 16-byte
divisibility of pointers and ints, constexprs, num_warps / num_stages) and compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` through the bundled ptxas. One line per
distinct variant: registers per thread, spill stores / loads (bytes), shared memory, OK / FAIL.
A kernel that compiles but asks for more shared memory than an H100 / H200 block may have
(227 KiB) also FAILs: Triton raises OutOfResources at launch, not at compile time; so does a
launch whose grid CUDA refuses (more than 65535 programs on axis 1 or 2).

    python -m benchmarks.compile_check                      # a pairwise cover (about 2 minutes, 2 cores)
    python -m benchmarks.compile_check --all                # all ~1320 specialisations (16 minutes on one core)
    python -m benchmarks.compile_check --only attention,augment --jobs 4
    python -m benchmarks.compile_check --list               # the variants only, no compile
    python -m benchmarks.compile_check --only patch_loss --all --match "IMG_ORDER=3" --mem
    python -m benchmarks.compile_check --warm --jobs 16     # on the GPU machine: fill Triton's cache

``--mem`` adds, per variant, the memory instructions of its PTX: global and shared loads and
stores by vector width and element size (``ld.global.v4.b32: 4`` is four 16-byte loads in the
code, not per launch), barriers, and the matmul and async-copy instructions (``wgmma``, ``mma``,
``cp.async``, TMA's ``cp.async.bulk``). Whether a load is vectorised or scalar, how many
shared-memory round trips a layout change costs, and whether a matmul runs on Hopper's warpgroup
MMA with asynchronous loads can be read there without a GPU. ``--match``
keeps the variants whose label contains every given word.

``--warm`` compiles every specialisation (``--all``) for the machine's own GPU into Triton's
on-disk cache, in parallel processes, so the test suite and the benchmarks that follow load
kernels instead of compiling them one at a time (Triton's runtime compiles through the same
``triton.compile`` call with the same source, signature, constexprs, attributes, options and
target, hence the same cache key). It reports failures only.

Exit status 1 if any variant fails. This proves compilation with the Triton it runs under and
says nothing about numerics or speed. The GPU machine runs triton 3.6; to check against it here::

    python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install --no-deps triton==3.6.0
    /tmp/t36/bin/python -m benchmarks.compile_check
"""

from __future__ import annotations

import os
import sys

# The kernels must be defined as compiled JIT functions, not interpreted ones.
if any(m.startswith("mimfast.kernels.") for m in sys.modules):
    raise RuntimeError("benchmarks.compile_check must be imported before mimfast.kernels (run it as a script)")
os.environ.pop("TRITON_INTERPRET", None)
WARM = "--warm" in sys.argv[1:]
if not WARM:
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas and its register report

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as _jit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # what Triton's CUDA driver reports for an H100 / H200 (32-lane warps)
H100_SMS = 132
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (H100 / H200)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FLOATS = (F32, F16, BF16)
FILES = ("attention", "masking", "patch_embed", "patch_loss", "linear_ce", "blockwise_mask", "augment", "layer_norm",
         "gelu", "gelu_matmul")


# ----------------------------------------------------------------------------------------------
# capture: the launcher's own binder, a CUDA backend, no launch
# ----------------------------------------------------------------------------------------------


class Capture:
    """Replaces ``JITFunction.run``: records (kernel, signature, constexprs, attrs, options)."""

    def __init__(self):
        self.backend = make_backend(TARGET)
        self.binders = {}
        self.variants = {}  # key -> record
        self.bad_grids = []  # launches whose grid CUDA would refuse

    def run(self, fn, args, kwargs, grid, case):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        if not (grid[0] < 2**31 and grid[1] <= 65535 and grid[2] <= 65535):
            self.bad_grids.append(f"{fn.__name__} grid {grid} beyond CUDA's limits  [{case}]")
        kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        binder = self.binders.get(fn)
        if binder is None:
            binder = self.binders[fn] = _jit.create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization,
                                                              options)
        opts = {k: v for k, v in options.__dict__.items()}
        key = (fn.__module__, fn.__name__, repr(signature), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), repr(sorted(opts.items())))
        if key not in self.variants:
            self.variants[key] = dict(module=fn.__module__, name=fn.__name__, signature=signature,
                                      constexprs=constexprs, attrs=attrs, options=opts, case=case,
                                      label=_label(fn.params, signature, constexprs, opts))

    @contextlib.contextmanager
    def active(self, case):
        real = _jit.JITFunction.run
        cap = self

        def run(self, *args, grid, warmup, **kwargs):
            cap.run(self, args, kwargs, grid, case)
            return None

        _jit.JITFunction.run = run
        try:
            yield
        finally:
            _jit.JITFunction.run = real


def _label(params, signature, constexprs, opts):
    """Pointer dtypes, constexprs (user ones and ints specialised to 1), warps / stages, ``nofma``
    for a launch without floating-point contraction."""
    ptrs = [f"{n}:{t[1:]}" for n, t in signature.items() if t.startswith("*")]
    consts = []
    for path, v in constexprs.items():
        p = params[path[0]]
        if p.is_constexpr:
            consts.append(f"{p.name}={int(v) if isinstance(v, bool) else v}")
        else:
            consts.append(f"{p.name}=={v}")  # a runtime int equal to 1, specialised by the launcher
    fusion = "" if opts.get("enable_fp_fusion", True) else " nofma"  # launched with enable_fp_fusion=False
    return (" ".join(consts) + f" w{opts['num_warps']} s{opts['num_stages']}{fusion} | "
            + " ".join(p for p in ptrs))


def pairwise(variants: list[dict]) -> list[dict]:
    """The variants, in order, that add a pair of settings not yet seen for their kernel.

    Settings: each pointer's dtype, each constexpr (ints specialised to 1 included), num_warps,
    num_stages; 16-byte divisibility of the other arguments is left out. Every combination of
    two settings that the launches use is compiled at least once; ``--all`` compiles them all.
    """
    seen, out = {}, []
    for v in variants:
        ts = v["label"].replace("|", " ").split()
        pairs = {(a, b) for a in ts for b in ts if a <= b}
        done = seen.setdefault(v["name"], set())
        if pairs - done:
            done |= pairs
            out.append(v)
    return out


# ----------------------------------------------------------------------------------------------
# the launches: shapes of tests/ and benchmarks/ on CUDA
# ----------------------------------------------------------------------------------------------


def _e(*shape, dtype=F32):
    return torch.empty(*shape, dtype=dtype)  # never read: the launches are captured, not run


def _cuda_mode():
    """Force the CUDA branch of every launcher that asks the device type."""
    from mimfast.kernels import attention as ka
    from mimfast.kernels import augment as kg
    from mimfast.kernels import gelu as ke
    from mimfast.kernels import masking as km
    from mimfast.kernels import patch_loss as kl

    km.GPU_TILES_ON_CPU = True
    real_config = kl._config
    kl._config = lambda block_p, interpreted: real_config(block_p, False)
    kg._blocks = lambda size, size2, device: (kg._BLOCK_H, kg._BLOCK_W)
    colsum_tiles = ke._colsum_tiles
    ke._colsum_tiles = lambda M, N, gpu, sms, config=None: colsum_tiles(M, N, True, H100_SMS, config)

    def bias_batches(cfg, B, programs_per_group, device):
        if cfg.bias_batches:
            return max(1, min(B, cfg.bias_batches))
        target = 4 * H100_SMS
        return triton.cdiv(B, max(1, min(B, triton.cdiv(target, programs_per_group))))

    ka._bias_batches = bias_batches


def cases_attention():
    from mimfast.kernels import attention as K

    def fwd_bwd(B, S, H, Dh, dtype, bias=False, bias_dtype=None, need_bias_grad=True, tf32=False, config=None,
                qsum=False):
        qkv = _e(B, S, 3 * H * Dh, dtype=dtype)
        b = _e(H, S, S, dtype=bias_dtype or dtype) if bias else None
        out, lse = K.attention_forward(qkv, H, b, allow_tf32=tf32, config=config)
        K.attention_backward(qkv, out, lse, _e(B, S, H * Dh, dtype=dtype), H, b, need_bias_grad=need_bias_grad,
                             allow_tf32=tf32, config=config, need_qkv_sum=qsum)

    yield "tests: INTERPRETED_CASES", lambda: [fwd_bwd(*c) for c in [
        (2, 1, 3, 32, F32, True), (2, 17, 3, 32, F16, False), (3, 17, 1, 80, F32, True), (1, 50, 2, 64, F16, True),
        (2, 65, 1, 80, F16, True), (1, 197, 1, 32, F32, False), (1, 257, 1, 32, F16, True)]]
    yield "tests: bf16 GPU grid", lambda: [fwd_bwd(2, S, H, Dh, BF16) for S in (1, 17, 50, 65, 197, 257)
                                           for Dh in (32, 64, 80) for H in (1, 3, 12, 16)]
    yield "tests: bf16 bias sweep", lambda: [fwd_bwd(2, S, 3, Dh, BF16, True) for S, Dh in [
        (1, 64), (17, 64), (50, 64), (65, 64), (197, 64), (257, 64), (197, 80), (50, 32)]]
    yield "tests: fp32 / fp16 with bias", lambda: [fwd_bwd(3, S, 12, 64, dt, True) for S in (50, 197)
                                                   for dt in (F32, F16)]
    yield "tests: bias batch loop", lambda: fwd_bwd(48, 197, 12, 64, BF16, True)
    yield "tests: tf32", lambda: fwd_bwd(2, 197, 3, 64, F32, True, tf32=True)
    yield "tests: configs_agree", lambda: [fwd_bwd(3, 21, 1, 16, F32, True, config=c) for c in [
        K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="fused", fused_block=32, bias_batches=2),
        K.AttentionConfig(fwd_block_m=16, fwd_block_n=16, bwd="split", dq_block_m=16, dq_block_n=32,
                          dkdv_block_m=32, dkdv_block_n=16, bias_batches=1),
        K.AttentionConfig(fwd_block_m=32, fwd_block_n=32, bwd="split", dq_block_m=32, dq_block_n=16,
                          dkdv_block_m=16, dkdv_block_n=32, bias_batches=2)]]
    yield "tests: fp32 bias on fp16 qkv", lambda: fwd_bwd(2, 23, 2, 32, F16, True, bias_dtype=F32)
    yield "models: frozen bias (no bias gradient)", lambda: [fwd_bwd(2, S, 12, 64, BF16, True, need_bias_grad=False)
                                                             for S in (50, 197)]
    yield "models: fp32 bias under bf16 autocast, every tuning candidate", lambda: [
        fwd_bwd(8, 197, 12, 64, BF16, True, bias_dtype=F32, config=cfg)
        for cfg in K.candidate_configs(197, 64, True, BF16).values()]
    yield "models: the qkv bias gradient summed in the backward, every tuning candidate", lambda: [
        fwd_bwd(8, S, H, Dh, BF16, bias, bias_dtype=F32 if bias else None, config=cfg, qsum=True)
        for S, H, Dh, bias in ((50, 12, 64, False), (197, 16, 32, False), (197, 12, 64, True), (65, 16, 80, False),
                               (50, 16, 64, False))
        for cfg in K.candidate_configs(S, Dh, bias, BF16).values()]
    yield "models: combinations of two winning candidates the tuner may time", lambda: [
        fwd_bwd(8, S, H, Dh, BF16, bias, bias_dtype=F32 if bias else None, config=cfg, qsum=True)
        for S, H, Dh, bias in ((197, 16, 32, False), (197, 12, 64, True), (65, 16, 80, False))
        for part in ("fwd", "bwd")
        for cfg in K.candidate_combinations(S, Dh, bias, BF16, part, need_qsum=True)]
    # tests/test_tuning.py: each candidate and each combination at the shapes it is checked at
    # (fp16, one head), which a GPU run's tests compile unless the warm-up has
    tested = ((33, 16, False), (50, 64, True), (65, 16, True), (65, 80, False), (130, 32, True), (140, 32, False),
              (100, 64, True))
    yield "tests: every attention candidate (test_tuning)", lambda: [
        fwd_bwd(2, S, 1, Dh, F16, bias, config=cfg)
        for S, Dh, bias in tested for cfg in K.candidate_configs(S, Dh, bias, F16).values()]
    yield "tests: every combination of attention candidates (test_tuning)", lambda: [
        fwd_bwd(1, S, 1, Dh, F16, bias, config=cfg)
        for S, Dh, bias in ((100, 64, True), (65, 80, False), (133, 64, False))
        for part in ("fwd", "bwd") for cfg in K.candidate_combinations(S, Dh, bias, F16, part)]
    yield "models: tiny test models (Dh 8, 16, 32)", lambda: [fwd_bwd(2, S, H, Dh, dt, bias)
                                                              for S in (5, 17, 50, 65)
                                                              for H, Dh in ((2, 8), (3, 16), (2, 32))
                                                              for dt in FLOATS for bias in (False, True)]

    def bench():
        from benchmarks.bench_attention import CASES, _alt_configs

        for B, H, S, Dh, bias in CASES.values():
            fwd_bwd(B, S, H, Dh, BF16, bias)
            fwd_bwd(B, S, H, Dh, BF16, bias, qsum=True)
            for cfg in _alt_configs(S, Dh, bias).values():
                fwd_bwd(B, S, H, Dh, BF16, bias, config=cfg)

    yield "benchmarks: bench_attention (default + alternative blocks)", bench


def cases_masking():
    from mimfast.kernels import masking as K

    mask_cases = [(2, 16, 32, 0.0, True), (3, 50, 80, 0.75, False), (2, 49, 1280, 0.4, True), (2, 197, 48, 0.9, True),
                  (1, 576, 32, 0.75, False), (16, 196, 768, 0.75, False), (8, 256, 1280, 0.75, True),
                  (4, 576, 1024, 0.4, True), (5, 197, 80, 0.9, True), (256, 196, 768, 0.75, False),
                  (256, 196, 1024, 0.75, False)]

    def masking(N, L, D, ratio, pos_grad, dt, pos_dt):
        K_ = max(1, int(L * (1 - ratio)))
        K.masking_forward(_e(N, L, D, dtype=dt), _e(L, D, dtype=pos_dt), _e(N, L), K_,
                          out_dtype=torch.promote_types(dt, pos_dt))
        K.masking_backward(_e(N, K_, D, dtype=torch.promote_types(dt, pos_dt)), _e(N, L, dtype=torch.int64), L, dt,
                           pos_dt if pos_grad else None)

    yield "tests/benchmarks: random masking fwd + bwd", lambda: [
        masking(*c, dt, pdt) for c in mask_cases for dt in FLOATS for pdt in {dt, F32}]
    yield "masks only (patch embed), argsort ranks (benchmark)", lambda: [
        (K.masking_forward(None, None, _e(N, L), max(1, L // 4), write_ids_keep=True),
         K.masking_forward(_e(N, L, D, dtype=BF16), _e(L, D, dtype=BF16), _e(N, L), max(1, L // 4),
                           ids_restore=_e(N, L, dtype=torch.int64)))
        for N, L, D in ((8, 196, 768), (256, 196, 768), (2, 49, 80), (4, 256, 1280))]
    yield "noise in half precision", lambda: [K.masking_forward(_e(4, 196, 768), None, _e(4, 196, dtype=dt), 49)
                                              for dt in (F16, BF16)]

    def unshuffle(N, L, D, ratio, pos_grad, dt):
        K_ = max(1, int(L * (1 - ratio)))
        for pos in (None, _e(L + 1, D, dtype=dt), _e(L + 1, D)):
            out_dt = dt if pos is None else torch.promote_types(dt, pos.dtype)
            K.unshuffle_forward(_e(N, K_ + 1, D, dtype=dt), _e(D, dtype=dt), _e(N, L, dtype=torch.int64), pos, out_dt)
            K.unshuffle_backward(_e(N, L + 1, D, dtype=out_dt), _e(N, L, dtype=torch.int64), K_, dt, dt,
                                 pos.dtype if (pos is not None and pos_grad) else None)

    yield "tests/benchmarks: unshuffle fwd + bwd", lambda: [unshuffle(*c, dt) for c in [
        (2, 16, 32, 0.0, False), (3, 50, 80, 0.75, True), (2, 49, 1280, 0.4, True), (2, 197, 64, 0.9, False),
        (1, 576, 32, 0.75, True), (16, 196, 512, 0.75, False), (8, 256, 512, 0.75, True), (4, 576, 1280, 0.4, True),
        (5, 197, 80, 0.9, True), (256, 196, 512, 0.75, True)] for dt in FLOATS]
    def tiles(N, L, D, dt):  # every tuning candidate of the row-tile kernels at a MAE shape
        K_ = L // 4
        for _, t in K._tile_candidates(L + 1, D) + K._tile_candidates(L, D):
            K.unshuffle_forward(_e(N, K_ + 1, D, dtype=dt), _e(D, dtype=dt), _e(N, L, dtype=torch.int64),
                                _e(L + 1, D, dtype=dt), dt, tiles=t)
            K.unshuffle_backward(_e(N, L + 1, D, dtype=dt), _e(N, L, dtype=torch.int64), K_, dt, dt, dt, tiles=t)
            K.masking_backward(_e(N, K_, D, dtype=dt), _e(N, L, dtype=torch.int64), L, dt, dt, tiles=t)
        for _, t in K._unshuffle_bwd_candidates(L + 1, D):  # more programs: the same kernels, another grid
            if len(t) < 4:  # the row tiles' own: launched above
                continue
            K.unshuffle_backward(_e(N, L + 1, D, dtype=dt), _e(N, L, dtype=torch.int64), K_, dt, dt, dt, tiles=t)

    yield "tuning candidates (kernels.tuning) at MAE widths", lambda: [
        tiles(256, L, D, dt) for L, D in ((196, 512), (196, 768), (196, 1024), (256, 1280), (256, 512))
        for dt in (BF16, F32)]
    yield "sort variant (bench triton_sort, tests)", lambda: [
        K.masking_forward(_e(N, L, D, dtype=dt), _e(L, D, dtype=pdt), _e(N, L), max(1, int(L * (1 - r))),
                          out_dtype=torch.promote_types(dt, pdt), method="sort")
        for N, L, D, r in [(2, 16, 32, 0.0), (3, 50, 80, 0.75), (2, 49, 1280, 0.4), (2, 197, 48, 0.9),
                           (1, 576, 32, 0.75), (16, 196, 768, 0.75), (8, 256, 1280, 0.75), (4, 576, 1024, 0.4),
                           (256, 196, 768, 0.75)]
        for dt in FLOATS for pdt in {dt, F32}] + [
        K.masking_forward(None, None, _e(N, L, dtype=ndt), max(1, L // 4), write_ids_keep=True, method="sort")
        for N, L in ((8, 196), (2, 576)) for ndt in (F32, F16)]


def cases_patch_embed():
    from mimfast.kernels import masking as km
    from mimfast.kernels import patch_embed as K

    def embed(N, C, H, W, p, D, ratio, img_dt, cdt, pos_dt, bias):
        L = (H // p) * (W // p)
        K_ = max(1, int(L * (1 - ratio)))
        ids = _e(N, K_, dtype=torch.int32)
        imgs = _e(N, C, H, W, dtype=img_dt)
        K.gather_patches(imgs, ids, p, cdt)
        out_dt = cdt if pos_dt is None else torch.promote_types(cdt, pos_dt)
        K.embed_epilogue(_e(N * K_, D, dtype=cdt), _e(D, dtype=cdt) if bias else None,
                         _e(L, D, dtype=pos_dt) if pos_dt else None, ids, out_dt)
        K.scatter_patches(_e(N * K_, C * p * p, dtype=cdt), ids, p, imgs)
        km.masking_backward(_e(N, K_, D, dtype=out_dt), _e(N, L, dtype=torch.int64), L, None, pos_dt or F32)

    cases = [(2, 3, 32, 32, 8, 32, 0.75), (3, 3, 24, 40, 8, 80, 0.4), (2, 1, 28, 28, 14, 48, 0.0),
             (2, 3, 56, 56, 14, 64, 0.9), (8, 3, 224, 224, 16, 768, 0.75), (4, 3, 224, 224, 14, 1280, 0.75),
             (6, 3, 96, 160, 16, 80, 0.4), (256, 3, 224, 224, 16, 768, 0.75)]
    yield "tests/benchmarks: gather, epilogue, scatter (fp32 images, autocast)", lambda: [
        embed(*c, F32, cdt, pdt, bias) for c in cases for cdt in FLOATS for pdt in (None, F32, cdt)
        for bias in (True, False)]
    yield "half-precision images", lambda: [embed(*c, dt, dt, dt, True) for c in cases[4:6] for dt in (F16, BF16)]


def cases_patch_loss():
    from mimfast.kernels import patch_loss as K

    def loss(N, C, H, W, p, pred_dt=F32, img_dt=F32, channels_last=False, config=None, bool_mask=False):
        L, P = (H // p) * (W // p), p * p * C
        pred = _e(N, 1 + L, P, dtype=pred_dt)[:, 1:, :]  # the decoder output without its cls row
        imgs = _e(N, C, H, W, dtype=img_dt)
        if channels_last:
            imgs = imgs.to(memory_format=torch.channels_last)
        mask = _e(N, L, dtype=torch.bool if bool_mask else F32)
        for norm_pix in (True, False):
            for kind in ("mse", "l1"):
                _, grad = K.patch_loss_fwd(pred, imgs, mask, p, norm_pix, kind, 1e-6, config=config)
        K.patch_loss_bwd_scale_(grad, _e(()))

    shapes = [(3, 3, 24, 40, 8), (2, 1, 42, 70, 14), (2, 3, 32, 80, 16), (2, 3, 28, 42, 14), (8, 3, 224, 224, 16),
              (8, 3, 224, 224, 14), (4, 3, 224, 224, 32), (16, 3, 56, 56, 8), (8, 1, 224, 160, 16),
              (256, 3, 224, 224, 16), (256, 3, 224, 224, 14)]
    yield "tests/benchmarks: fp32 / bf16 / fp16 pred and images", lambda: [
        loss(*s, pdt, idt) for s in shapes for pdt in FLOATS for idt in {pdt, F32}]
    yield "channels-last images, bool mask", lambda: [loss(*s, pdt, channels_last=True, bool_mask=True)
                                                      for s in shapes[4:8] for pdt in (F32, BF16)]

    def walks():  # tests/test_patch_loss_kernel.py: the permuted walk, prefetched weights
        for s in [(3, 3, 24, 40, 8), (2, 1, 42, 70, 14), (2, 3, 32, 80, 16), (2, 3, 28, 42, 14),
                  (8, 3, 224, 224, 16)]:
            for pdt in (F32, BF16):
                for c in ((2, 3, 4, 3), (1, 1, 4, 3), (4, 2, 4, 1), (2, 3, 4, 1, True), (1, 5, 4, 3, True),
                          (4, 2, 4, 0, True)):
                    loss(*s, pdt, config=c)

    yield "tests: the permuted walk and prefetched weights", walks

    def tuning():
        from benchmarks.bench_patch_loss import TUNING

        for c in TUNING:
            loss(256, 3, 224, 224, 16, BF16, config=c)

    yield "benchmarks: bench_patch_loss.TUNING configs", tuning


def cases_linear_ce():
    from mimfast.kernels import linear_ce as K

    def ce(C, V, dt, labels_dt=torch.int64, block_v=None):
        K.cross_entropy_fwd_grad_(_e(C, V, dtype=dt), _e(C, dtype=labels_dt), _e(1), -100, _e(C), block_v=block_v)

    yield "tests/benchmarks: V = 8192 / 8191 / 1000 / 520", lambda: [ce(64, V, dt) for V in (8192, 8191, 1000, 520)
                                                                     for dt in FLOATS]
    yield "int32 labels, V = 16384 (one block), 65536 (looped)", lambda: [
        (ce(64, 8192, dt, torch.int32), ce(16, 16384, dt), ce(16, 65536, dt)) for dt in FLOATS]
    yield "tests: looped path forced (block_v)", lambda: [ce(29, 520, dt, block_v=bv) for dt in FLOATS
                                                          for bv in (64, 128, 256, 1024)]


def cases_blockwise_mask():
    from mimfast.kernels import blockwise_mask as K

    def masks(h, w, count):
        L = h * w
        K.blockwise_masks(_e(4, 10 * (count + 1), 4), _e(4, L), h, w, count, 4, max(count, 4), (-1.1, 1.1))

    yield "BEiT 14x14 / 16x16 / tests' grids / 64x64 (largest)", lambda: [
        masks(h, w, c) for h, w, c in [(14, 14, 75), (16, 16, 100), (7, 9, 20), (3, 5, 6), (1, 1, 1), (24, 24, 230),
                                       (64, 64, 1500)]]


def cases_augment():
    from mimfast.kernels import augment as K

    def aug(n, size, dt=F32, interp="bicubic", size2=None, interp2="bicubic", channels_last=False, quantize=False):
        hs, ws = 300, 400
        src = torch.empty(n * 3 * hs * ws, dtype=torch.uint8)
        meta = torch.tensor([[i * 3 * hs * ws, hs, ws, 10, 20, 200, 250, i % 2] for i in range(n)], dtype=torch.int64)
        kw = {}
        if size2:
            kw = dict(out2=_e(n, 3, size2, size2, dtype=dt), mul2=[1.0] * 3, add2=[0.0] * 3, interpolation2=interp2)
        K.augment_crops(src, meta, _e(n, 3, size, size, dtype=dt), [1.0] * 3, [0.0] * 3, interp,
                        channels_last=channels_last, quantize=quantize, **kw)

    yield "MAE (224) and BEiT (224 + 112) views, dtypes, layouts", lambda: [
        (aug(4, 224, dt, interp, channels_last=cl), aug(4, 224, dt, "bicubic", 112, "bilinear", channels_last=cl))
        for dt in FLOATS for interp in ("bicubic", "bilinear") for cl in (False, True)]
    yield "tests: small sizes, quantize, same-size second view", lambda: [
        aug(2, 17), aug(2, 21), aug(1, 16, quantize=True), aug(1, 16, interp="bilinear"),
        aug(3, 13, size2=13), aug(3, 24, size2=9, interp2="bilinear"), aug(3, 32, BF16, size2=16)]


def cases_layer_norm():
    from mimfast.kernels import layer_norm as K

    def add_ln(M, D, x_dt, res_dt, affine=True, scale=False, out_dt=BF16, fwd_cfg=None, bwd_cfg=None, xsum=False):
        x = _e(M, D, dtype=x_dt)
        res = _e(M, D, dtype=res_dt) if res_dt is not None else None
        w = b = _e(D) if affine else None
        s = _e(D) if scale else None
        r, y, mean, rstd = K.add_layer_norm_fwd(x, res, w, b, s, 1e-6, out_dt, fwd_cfg)
        r_in = r if r.numel() else x
        K.add_layer_norm_bwd(_e(M, D, dtype=out_dt), _e(M, D, dtype=r_in.dtype) if r.numel() else None, r_in,
                             x if scale else None, w, s, mean, rstd, x_dt, res.dtype if res is not None else x_dt,
                             True, res is not None, affine, affine, scale, xsum, bwd_cfg)

    dims = (768, 512, 1024, 1280, 80, 33, 1)
    yield "blocks under autocast: bf16 branch, fp32 residual, bf16 / fp32 y, layer scale, branch bias", lambda: [
        add_ln(256 * 50, D, BF16, F32, scale=sc, out_dt=o, xsum=o == BF16) for D in dims for sc in (False, True)
        for o in (BF16, F32)]
    yield "tests: every dtype mix, no residual, no affine", lambda: [
        add_ln(34, D, dt, r, affine=a, scale=sc, out_dt=dt) for D in (80, 33, 130, 768) for dt in FLOATS
        for r in (None, dt, F32) for a in (True, False) for sc in (False, True)]
    yield "tuning candidates (kernels.tuning) at MAE / BEiT widths under autocast", lambda: [
        add_ln(256 * 50, D, BF16, F32, scale=sc, fwd_cfg=f, bwd_cfg=bw, xsum=True) for D in (768, 512, 1024, 1280)
        for sc in (False, True) for (_, f), (_, bw) in zip(K._candidates(D, False) * 2, K._candidates(D, True))]


def cases_gelu():
    from mimfast.kernels import gelu as K

    yield "MLP hidden widths, every dtype", lambda: [K.gelu_bwd_recompute(_e(M, H, dtype=dt), _e(M, H, dtype=dt))
                                                     for M, H in ((256 * 197, 2048), (7, 40)) for dt in FLOATS]
    yield "MLP hidden widths with fc1's bias gradient (ops.mlp), every dtype, every tuning candidate", lambda: [
        K.gelu_bwd_recompute_colsum(_e(M, H, dtype=dt), _e(M, H, dtype=dt), cfg)
        for M, H in ((256 * 197, 2048), (256 * 50, 3072), (256 * 50, 4096), (7, 40), (3, 17)) for dt in FLOATS
        for _, cfg in K._COLSUM_CANDIDATES]
    yield "bias gradients (column sums) at MAE / BEiT widths, every tuning candidate", lambda: [
        K.column_sum(_e(M, N, dtype=dt), cfg) for M, N in ((256 * 50, 768), (256 * 197, 512), (256 * 50, 2304), (7, 3))
        for dt in FLOATS for _, cfg in K._COLSUM_CANDIDATES]


def cases_gelu_matmul():
    from mimfast.kernels import gelu_matmul as K

    def both(M, K_, N, dt, cfg, bias=True, colsum=True):
        K.linear_bias_gelu(_e(M, K_, dtype=dt), _e(N, K_, dtype=dt), _e(N, dtype=dt) if bias else None, cfg)
        K.matmul_gelu_bwd(_e(M, K_, dtype=dt), _e(K_, N, dtype=dt), _e(M, N, dtype=dt), colsum, cfg)

    triton_cfgs = [cfg for _, cfg in K.CANDIDATES if cfg != "cublas"]
    yield "MAE / BEiT MLPs (ViT-B, the decoder, ViT-L), every Triton candidate", lambda: [
        both(M, K_, N, dt, cfg) for M, K_, N in ((256 * 50, 768, 3072), (256 * 197, 512, 2048), (128 * 50, 1024, 4096))
        for dt in (BF16, F16) for cfg in triton_cfgs]
    yield "tests: odd shapes, no bias, no column sums (test_gelu_matmul's GPU cases)", lambda: [
        both(M, K_, N, dt, cfg, bias=b, colsum=c) for M, K_, N in ((37, 40, 96), (5, 24, 200), (130, 48, 72),
                                                                    (1000, 512, 2048))
        for dt in (F16, BF16) for cfg in triton_cfgs for b in (True, False) for c in (True, False)]


CASES = {name: globals()[f"cases_{name}"] for name in FILES}


# ----------------------------------------------------------------------------------------------
# compile (in worker processes)
# ----------------------------------------------------------------------------------------------

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_MEM_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.(global|shared)(?:::\w+)?((?:\.[\w:]+)*)\s", re.M)


def mem_stats(ptx: str) -> dict[str, int]:
    """Static counts of the PTX's global / shared loads and stores by vector width and element
    size (cache hints dropped), of its barriers, and of its matmul and async-copy instructions."""
    counts: dict[str, int] = {}
    for op, space, mods in _MEM_OP.findall(ptx):
        parts = mods.split(".")
        vec = next((m for m in parts if m in ("v2", "v4", "v8")), "")
        size = next((m for m in parts if m[:1] in "bfsu" and m[1:].isdigit()), "")
        key = ".".join(x for x in (op, space, vec, size) if x)
        counts[key] = counts.get(key, 0) + 1
    counts["bar.sync"] = len(re.findall(r"\bbar\.sync\b", ptx))
    # how the matmuls and their operands' loads were compiled: Hopper's warpgroup MMA, the older
    # warp MMA, asynchronous global-to-shared copies, TMA bulk copies
    for name, pattern in (("wgmma", r"\bwgmma\.mma_async\b"), ("mma", r"\bmma\.sync\b"),
                          ("cp.async", r"\bcp\.async\.c[ag]\b"), ("cp.async.bulk", r"\bcp\.async\.bulk\b")):
        n = len(re.findall(pattern, ptx))
        if n:
            counts[name] = n
    return dict(sorted(counts.items()))


def _target() -> GPUTarget:
    """sm_90; with ``--warm`` on a CUDA machine, the target Triton's runtime will ask for there.
    Called in the main process only: the compile workers never touch CUDA."""
    if WARM and torch.cuda.is_available():
        return triton.runtime.driver.active.get_current_target()
    return TARGET


def compile_variant(v: dict) -> dict:
    import importlib

    fn = getattr(importlib.import_module(v["module"]), v["name"])
    triton.knobs.nvidia.dump_ptxas_log = not WARM
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn=fn, signature=v["signature"], constexprs=v["constexprs"],
                                         attrs=v["attrs"]), target=GPUTarget(*v["target"]), options=v["options"])
    except Exception as e:  # a compile error is the result
        msg = str(e).strip().splitlines()
        err = next((line for line in msg if "error" in line.lower()), msg[0] if msg else type(e).__name__)
        return dict(ok=False, error=f"{type(e).__name__}: {err[:300]}", full=str(e)[-3000:],
                    s=time.perf_counter() - t0)
    text = log.getvalue()
    regs = [int(x) for x in _REGS.findall(text)]
    spills = [tuple(map(int, m)) for m in _SPILL.findall(text)]
    return dict(ok=True, regs=max(regs) if regs else -1, spill_st=max((s[0] for s in spills), default=0),
                spill_ld=max((s[1] for s in spills), default=0), smem=k.metadata.shared, s=time.perf_counter() - t0,
                mem=mem_stats(k.asm["ptx"]) if v.get("mem") else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma-separated kernel files among {', '.join(FILES)}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--all", action="store_true",
                    help="every distinct specialisation (about 5 minutes), not only a pairwise cover")
    ap.add_argument("--list", action="store_true", help="list the variants, do not compile")
    ap.add_argument("--mem", action="store_true", help="print each variant's PTX memory instructions")
    ap.add_argument("--match", default="", help="only the variants whose label holds every space-separated word")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the full error of a failed compile")
    ap.add_argument("--warm", action="store_true",
                    help="fill Triton's cache for this machine's GPU (all specialisations, failures reported only)")
    args = ap.parse_args(argv)
    files = [f for f in args.only.split(",") if f] or list(FILES)
    unknown = set(files) - set(FILES)
    if unknown:
        ap.error(f"unknown kernel files {sorted(unknown)}; choose among {FILES}")

    _cuda_mode()
    cap = Capture()
    for f in files:
        for case, launch in CASES[f]():
            with cap.active(f"{f}: {case}"):
                launch()
    variants = list(cap.variants.values())
    n_all = len(variants)
    if args.match:
        variants = [v for v in variants if all(w in f"{v['name']} {v['label']}" for w in args.match.split())]
    if not (args.all or args.warm):
        variants = pairwise(variants)
    target = _target()
    for v in variants:
        v["target"] = (target.backend, target.arch, target.warp_size)
        v["mem"] = args.mem
    print(f"{len(variants)} of {n_all} distinct kernel specialisations from {', '.join(files)} for sm_90 "
          f"({'all' if args.all else 'a pairwise cover; --all for every one'}; triton {triton.__version__}, "
          f"ptxas {triton.knobs.nvidia.ptxas.path})", flush=True)
    if args.list:
        for v in variants:
            print(f"{v['module'].split('.')[-1]}.{v['name']}  {v['label']}")
        return 0

    t0 = time.perf_counter()
    failed = spilled = 0
    per_kernel = {}  # name -> [variants, failed, spilled, max regs, max smem]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for v, r in zip(variants, pool.map(compile_variant, variants, chunksize=1)):
            name = f"{v['module'].split('.')[-1]}.{v['name']}"
            tally = per_kernel.setdefault(name, [0, 0, 0, 0, 0])
            tally[0] += 1
            if r["ok"] and r["smem"] > SMEM_LIMIT:
                r = dict(r, ok=False, error=f"shared memory {r['smem']} B > {SMEM_LIMIT} B: OutOfResources at launch")
            if r["ok"]:
                status = "OK"
                if r["spill_st"] or r["spill_ld"]:
                    status, spilled, tally[2] = "OK SPILLS", spilled + 1, tally[2] + 1
                tally[3], tally[4] = max(tally[3], r["regs"]), max(tally[4], r["smem"])
                if not args.warm:
                    print(f"{status:9s} {name}  regs={r['regs']} spill={r['spill_st']}/{r['spill_ld']}B "
                          f"smem={r['smem']}B  {r['s']:.1f}s  {v['label']}", flush=True)
                    if r.get("mem"):
                        print("          " + "  ".join(f"{k}: {n}" for k, n in r["mem"].items()), flush=True)
            else:
                failed, tally[1] = failed + 1, tally[1] + 1
                print(f"FAIL      {name}  {r['error']}  {v['label']}  [{v['case']}]", flush=True)
                if args.verbose and "full" in r:
                    print(r["full"])
    print("\nkernel: variants, failed, with spills, max registers, max shared memory")
    for name, (n, nf, ns, regs, smem) in per_kernel.items():
        print(f"  {name:42s} {n:4d} {nf:4d} {ns:4d} {regs:4d} {smem:7d} B")
    for line in cap.bad_grids:
        print(f"FAIL      {line}")
    print(f"{len(variants)} variants: {len(variants) - failed} compiled ({spilled} with register spills), "
          f"{failed} failed, in {time.perf_counter() - t0:.0f} s; {len(cap.bad_grids)} launches with a bad grid")
    return 1 if failed or cap.bad_grids else 0


if __name__ == "__main__":
    sys.exit(main())
