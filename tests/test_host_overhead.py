"""benchmarks.host_overhead in smoke mode: every op's Triton and eager rows come out, and the
kernel stubs it installs are taken away again (later tests run the real kernels)."""

from benchmarks import host_overhead
from tolerance import DEVICE


def test_host_overhead_smoke():
    from mimfast.kernels import layer_norm

    kernel = layer_norm._add_ln_fwd_kernel
    rows = host_overhead.measure(DEVICE, n=2, warmup=1, smoke=True, repeat=1)
    assert layer_norm._add_ln_fwd_kernel is kernel
    ops = {r["op"] for r in rows}
    assert {"add_layer_norm", "attention", "gelu_linear", "random_masking", "unshuffle_with_mask_token",
            "masked_patch_loss", "masked_patch_embed"} <= ops
    assert len(rows) == 4 * len(ops)  # (triton, eager) x (fwd, fwd+bwd)
    assert all(r["host_us"] > 0 and r["wall_us"] >= r["host_us"] for r in rows)


def test_stubs_restore_kernels():
    from mimfast.kernels import attention

    before = attention._attn_fwd
    with host_overhead.stubbed_kernels():
        assert attention._attn_fwd is not before
    assert attention._attn_fwd is before
