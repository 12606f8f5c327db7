"""benchmarks.host_overhead in smoke mode (every op's Triton and eager rows come out, and the
kernel stubs it installs are taken away again: later tests run the real kernels), and
mimfast.ops._custom_op.kernel_op, the mechanism that cut that overhead: eager calls run the
implementation directly, a dispatch mode or torch.compile sees the registered op."""

import importlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import host_overhead
from mimfast.ops._custom_op import kernel_op
from tolerance import DEVICE


def test_host_overhead_smoke():
    from mimfast.kernels import layer_norm

    kernel = layer_norm._add_ln_fwd_kernel
    rows = host_overhead.measure(DEVICE, n=2, warmup=1, smoke=True, repeat=1)
    assert layer_norm._add_ln_fwd_kernel is kernel
    for name in host_overhead.KERNEL_MODULES:  # nor a helper one module imports from another
        module = importlib.import_module(f"mimfast.kernels.{name}")
        assert not any(isinstance(v, host_overhead._NoLaunch) for v in vars(module).values()), name
    from mimfast.ops import _custom_op

    assert _custom_op.ALWAYS_DISPATCH is False
    ops = {r["op"] for r in rows}
    assert {"add_layer_norm", "attention", "gelu_linear", "random_masking", "unshuffle_with_mask_token",
            "masked_patch_loss", "masked_patch_embed", "mae_step"} <= ops
    assert len(rows) == 6 * len(ops)  # (triton, triton_dispatch, eager) x (fwd, fwd+bwd)
    assert all(r["host_us"] > 0 and r["wall_us"] >= r["host_us"] for r in rows)


def test_stubs_restore_kernels():
    from mimfast.kernels import attention

    before = attention._attn_fwd
    with host_overhead.stubbed_kernels():
        assert attention._attn_fwd is not before
    assert attention._attn_fwd is before


# --- mimfast.ops._custom_op.kernel_op: eager calls skip the dispatcher, tracing sees the op ---

_seen = []


def _probe_impl(x: torch.Tensor) -> torch.Tensor:
    below_autograd = torch._C._dispatch_tls_local_exclude_set().has(torch._C.DispatchKey.AutogradCPU)
    _seen.append(("dispatcher" if below_autograd else "direct", torch.is_grad_enabled()))
    return x * 2


_probe = kernel_op("mimfast_test::host_overhead_probe")(_probe_impl)


@_probe.register_fake
def _(x):
    return torch.empty_like(x)


def test_kernel_op_eager_calls_the_implementation_directly():
    _seen.clear()
    x = torch.randn(3, requires_grad=True)
    torch.testing.assert_close(_probe(x), x.detach() * 2)
    with torch.no_grad():
        _probe(x)
    # gradient recording off inside, as the dispatcher runs it
    assert _seen == [("direct", False), ("direct", False)]
    assert _probe.op is not None and _probe.impl is _probe_impl


def test_kernel_op_goes_through_the_dispatcher_under_a_dispatch_mode():
    calls = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    _seen.clear()
    with Recorder():  # what fake tensors, make_fx and tests/test_custom_ops.py rely on
        _probe(torch.randn(3, requires_grad=True))
    assert any("host_overhead_probe" in c for c in calls)
    assert len(_seen) == 1


def test_kernel_op_is_traced_as_the_custom_op():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda x: _probe(x) + 1, backend=backend, fullgraph=True)
    x = torch.randn(4)
    torch.testing.assert_close(fn(x), x * 2 + 1)
    assert graphs and any(node.target is torch.ops.mimfast_test.host_overhead_probe.default
                          for node in graphs[0].graph.nodes)
