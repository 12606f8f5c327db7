"""Activation memory of a pretraining step: the bytes autograd keeps for the backward, per sample,
for each configuration of the step benchmark (``bench_step``).

A step's peak memory is the parameters, gradients and optimizer state (fixed) plus what the
forward keeps for the backward (linear in the batch) plus the backward's transient buffers. The
middle term is what the model's ops decide, and it is a count of bytes, not a timing: it is the
same on any device for the same dtypes. This counts it exactly: every tensor the forward hands to
autograd (``torch.autograd.graph.saved_tensors_hooks``), each storage once, parameters left out,
under bf16 autocast, at two batch sizes; ``per_sample_mib`` is the difference over the batch
difference (so per-step tensors such as autocast's weight copies drop out, and are reported as
``fixed_mib``).

- CUDA: the models run as they train.
- CPU: the Triton kernels' launches are replaced by no-ops (:func:`benchmarks.host_overhead.stubbed_kernels`;
  the interpreter is on so the ops take their Triton path): shapes, dtypes and what is saved are
  those of a GPU run, the values are not computed (and do not matter here).

Cases as ``bench_step``'s: MAE ViT-B/16, MAE ViT-L/16, BEiT-B (75 of 196 patches masked).
Variants: ``eager`` (reference math, timm's ``Mlp``), ``timm-sdpa`` (its attention on SDPA: issue
9's baseline (b)), ``mimfast`` (the model's defaults), each block fusion switched, and mimfast
with activation checkpointing (``set_grad_checkpointing()``: each block keeps only its inputs).

    python -m benchmarks.activation_memory [--smoke] [--cases mae_vit_b16 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from pathlib import Path

import torch

if "mimfast.kernels" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton path on CPU tensors (stubbed below)

MASK_RATIO = 0.75
BEIT_MASKED = 75
BATCHES = (2, 4)
# case: (model name, overrides, smoke overrides)
_SMOKE_MAE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=24,
                  decoder_depth=1, decoder_num_heads=2)
CASES = {
    "mae_vit_b16": ("mae_vit_base_patch16", ("mae_vit_tiny_patch16", _SMOKE_MAE)),
    "mae_vit_l16": ("mae_vit_large_patch16", ("mae_vit_tiny_patch16", _SMOKE_MAE)),
    "beit_b16": ("beit_base_patch16_224_8k_vocab",
                 ("beit_base_patch16_224_8k_vocab",
                  dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=64))),
}
SMOKE_BEIT_MASKED = 6  # of 16 patches
# (variant, kernels, SDPA attention, model kwargs)
BEIT_VARIANTS = [("eager", "eager", False, {}), ("timm-sdpa", "eager", True, {}), ("mimfast", "auto", False, {}),
                 ("mimfast-no-fused-mlp", "auto", False, {"fused_mlp": False}),
                 ("mimfast-no-fused-blocks", "auto", False, {"fused_norm": False}),
                 ("mimfast-grad-checkpointing", "auto", False, {"grad_checkpointing": True})]
MAE_VARIANTS = BEIT_VARIANTS  # both models run their blocks fused by default


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()`` (storages of
    the tensors in ``exclude``, e.g. the parameters, left out)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _model(name: str, overrides: dict, kernels: str, sdpa: bool, extra: dict, device: str, beit: bool):
    from benchmarks.bench_step import variant_model

    kw = {} if beit else {"norm_pix_loss": True}
    return variant_model(name, kernels, sdpa, device, **kw, **overrides, **extra)


def _step_input(model, beit: bool, n: int, device: str, masked: int):
    """(call(model) -> loss) for a batch of n."""
    g = torch.Generator(device="cpu").manual_seed(0)
    size = model.img_size
    imgs = torch.randn(n, 3, size, size, generator=g).to(device)
    if not beit:
        noise = torch.rand(n, model.patch_embed.num_patches, generator=g).to(device)
        return lambda m: m(imgs, MASK_RATIO, noise)[0]
    from mimfast.data.masking_generators import BlockwiseMaskingGenerator

    grid = tuple(model.patch_embed.grid_size)
    masks = torch.from_numpy(BlockwiseMaskingGenerator(grid, masked)(n)).to(device).bool()
    labels = torch.randint(0, model.lm_head.out_features, (n * masked,), generator=g).to(device)
    if model.kernels == "eager":
        return lambda m: m(imgs, masks, labels=labels)
    return lambda m: m(imgs, masks, labels=labels, num_masked=masked)


def measure(device: str = "cpu", smoke: bool = False, cases: tuple[str, ...] | None = None) -> list[dict]:
    """One row per (case, variant): per_sample_bytes (and _mib), fixed_mib and ratio_vs_timm_sdpa."""
    from benchmarks.host_overhead import stubbed_kernels

    stub = stubbed_kernels() if device == "cpu" else contextlib.nullcontext()
    rows = []
    with stub:
        for case, (name, (smoke_name, smoke_overrides)) in CASES.items():
            if cases and case not in cases:
                continue
            beit = case.startswith("beit")
            name, overrides = (smoke_name, smoke_overrides) if smoke else (name, {})
            masked = SMOKE_BEIT_MASKED if smoke else BEIT_MASKED
            for variant, kernels, sdpa, extra in (BEIT_VARIANTS if beit else MAE_VARIANTS):
                model = _model(name, overrides, kernels, sdpa, extra, device, beit)
                params = list(model.parameters())
                kept = []
                for n in BATCHES:
                    call = _step_input(model, beit, n, device, masked)
                    with torch.autocast(device, dtype=torch.bfloat16):
                        kept.append(saved_bytes(functools.partial(call, model), params))
                per_sample = (kept[1] - kept[0]) / (BATCHES[1] - BATCHES[0])
                rows.append(dict(case=case, variant=variant, per_sample_bytes=per_sample,
                                 per_sample_mib=round(per_sample / 2**20, 3),
                                 fixed_mib=round((kept[0] - BATCHES[0] * per_sample) / 2**20, 2), device=device,
                                 stubbed=device == "cpu", smoke=smoke))
            base = next((r for r in rows if r["case"] == case and r["variant"] == "timm-sdpa"), None)
            for r in rows:
                if r["case"] == case and base and base["per_sample_mib"] > 0:
                    r["ratio_vs_timm_sdpa"] = round(r["per_sample_mib"] / base["per_sample_mib"], 3)
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--smoke", action="store_true", help="tiny models (a test runs this)")
    ap.add_argument("--cases", nargs="*", help=f"only these of {list(CASES)}")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("the CPU count needs TRITON_INTERPRET=1 before mimfast's kernels are imported")
    rows = measure(args.device, args.smoke, tuple(args.cases) if args.cases else None)
    print(f"kept for the backward, bf16 autocast ({args.device}{', kernels stubbed' if args.device == 'cpu' else ''})")
    print(f"{'case':12s} {'variant':26s} {'MiB/sample':>11s} {'fixed MiB':>10s} {'vs timm-sdpa':>13s}")
    for r in rows:
        print(f"{r['case']:12s} {r['variant']:26s} {r['per_sample_mib']:11.2f} {r['fixed_mib']:10.1f} "
              f"{r.get('ratio_vs_timm_sdpa', float('nan')):13.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
