"""benchmarks.activation_memory: the bytes autograd keeps for the backward, counted exactly, per
sample and configuration (tiny models here; the full-size count runs the same code)."""

import torch

from benchmarks import activation_memory as am
from tolerance import DEVICE


def test_saved_bytes_counts_each_storage_once_without_parameters():
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)

    def fn():
        h = x @ w.t()  # keeps x and w
        return (h * h).sum() + (h * 2).sum()  # keeps h (once, though two ops hold it)

    assert am.saved_bytes(fn) == (3 * 4 + 8 * 4 + 3 * 8) * 4
    assert am.saved_bytes(fn, exclude=[w]) == (3 * 4 + 3 * 8) * 4


def test_smoke_rows_and_the_mlp_saving():
    from mimfast.kernels import attention

    kernel = attention._attn_fwd
    rows = am.measure(DEVICE, smoke=True, cases=("mae_vit_b16", "beit_b16"))
    assert attention._attn_fwd is kernel  # the CPU count's stubs are taken away again
    by = {(r["case"], r["variant"]): r for r in rows}
    assert len(by) == len(am.MAE_VARIANTS) + len(am.BEIT_VARIANTS)
    for case in ("mae_vit_b16", "beit_b16"):
        assert by[(case, "timm-sdpa")]["ratio_vs_timm_sdpa"] == 1.0
        # the MLP keeps h only, not gelu(h): one (tokens, 4 D) bf16 tensor a block fewer
        assert by[(case, "mimfast")]["per_sample_mib"] < by[(case, "mimfast-no-fused-mlp")]["per_sample_mib"]
        assert by[(case, "mimfast")]["per_sample_mib"] < by[(case, "timm-sdpa")]["per_sample_mib"]
    # MAE tiny: 2 encoder blocks of 4 + 1 tokens (width 32), 1 decoder block of 16 + 1 (width 24)
    gelu_out = (2 * 5 * 4 * 32 + 1 * 17 * 4 * 24) * 2
    mae = {v: by[("mae_vit_b16", v)]["per_sample_bytes"] for v in ("mimfast", "mimfast-no-fused-mlp")}
    assert mae["mimfast-no-fused-mlp"] - mae["mimfast"] == gelu_out
