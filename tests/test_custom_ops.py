"""Every ``mimfast::`` custom op under ``torch.library.opcheck``: schema, fake (meta) function
against the real kernel's outputs (shapes, dtypes, strides), autograd registration and AOT
dispatch. torch.compile plans memory from the fake functions alone, so a fake that disagrees
with its kernel breaks compiled training on a GPU without failing any eager test.

The calls checked are the ones the public ops really make, forward and backward: each op runs
under a dispatch mode that records the custom-op calls with their arguments, then each recorded
call is replayed through opcheck.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mimfast import ops
from mimfast.ops import (_attention_triton, _gelu_linear_triton, _layer_norm_triton,  # noqa: F401 (registers)
                         _linear_ce_triton, _masking_triton, _patch_embed_triton, _patch_loss_triton)
from tolerance import DEVICE

UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mimfast":
            clone = lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
            self.calls.append((func, tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _record(fn, *tensors):
    """Run fn(*tensors) forward and backward (random incoming gradient) and return the
    custom-op calls made."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
    with _Recorder() as rec:
        out = fn(*leaves)
        outs = [o for o in (out if isinstance(out, tuple) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
    return rec.calls


# low precision: bf16 on a GPU, fp16 under the interpreter (no bf16 dot there)
LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def _cases(dtype):
    N, L, D = 2, 16, 32

    def _rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    return {
        "random_masking": (lambda x, pos: ops.random_masking(x, 0.75, pos, backend="triton")[0],
                           (_rand(N, L, D), _rand(1, L, D))),
        "unshuffle_with_mask_token": (
            lambda x, mt, pos: ops.unshuffle_with_mask_token(
                x, mt, torch.argsort(torch.rand(N, L, device=DEVICE), dim=1), pos, backend="triton"),
            (_rand(N, 1 + 4, D), _rand(1, 1, D), _rand(1, L + 1, D))),
        "masked_patch_embed": (
            lambda imgs, w, b, pos: ops.masked_patch_embed(imgs, w, b, 0.75, pos, backend="triton")[0],
            (_rand(N, 3, 16, 16), _rand(D, 3, 4, 4), _rand(D), _rand(1, L, D))),
        "masked_patch_loss": (
            lambda pred, imgs: ops.masked_patch_loss(
                pred, imgs.detach(), (torch.rand(N, L, device=DEVICE) < 0.75).float(), 4, backend="triton"),
            (_rand(N, L, 48), _rand(N, 3, 16, 16))),
        "attention": (lambda qkv, bias: ops.attention(qkv, 2, bias, backend="triton"),
                      (_rand(N, 17, 3 * 2 * 32), _rand(2, 17, 17))),
        # neither a bias gradient nor qkv sums: two empty returns, which must not alias
        "attention_no_bias": (lambda qkv: ops.attention(qkv, 2, backend="triton"), (_rand(N, 17, 3 * 2 * 32),)),
        # the qkv bias gradient summed by the attention backward
        "self_attention": (lambda x, wq, bq, wp, bp: ops.self_attention(x, wq, bq, wp, bp, 2, backend="triton"),
                           (_rand(N, 17, D), _rand(3 * D, D), _rand(3 * D), _rand(D, D), _rand(D))),
        # eager autograd runs the chunk loop itself; the custom op is what torch.compile traces
        "linear_cross_entropy": (
            lambda h, w, b: torch.ops.mimfast.linear_ce_fwd(
                h.detach(), w.detach(), b.detach(), torch.randint(0, 40, (12,), device=DEVICE), -100, 5, True, True,
                True, dtype)[0],
            (_rand(12, D), _rand(40, D), _rand(40))),
        "add_layer_norm": (lambda x, r, w, b, s: ops.add_layer_norm(x, r, w, b, scale=s, backend="triton"),
                           (_rand(N, L, D), _rand(N, L, D), _rand(D), _rand(D), _rand(D))),
        "add_layer_norm_x_bias": (
            lambda x, r, w, b, xb: ops.add_layer_norm(x, r, w, b, x_bias=xb, backend="triton"),
            (_rand(N, L, D), _rand(N, L, D), _rand(D), _rand(D), _rand(D))),
        "gelu_linear": (lambda h, w, b: ops.gelu_linear(h, w, b, backend="triton"),
                        (_rand(N, L, 4 * D), _rand(D, 4 * D), _rand(D))),
        "mlp": (lambda x, w1, b1, w2, b2: ops.mlp(x, w1, b1, w2, b2, backend="triton"),
                (_rand(N, L, D), _rand(4 * D, D), _rand(4 * D), _rand(D, 4 * D), _rand(D))),
    }


CASES = _cases(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, LOW], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_custom_ops_pass_opcheck(name, dtype):
    fn, tensors = _cases(dtype)[name]
    calls = _record(fn, *tensors)
    assert calls, f"{name} made no mimfast custom-op call"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs, test_utils=UTILS)


def test_every_custom_op_is_checked():
    """A new custom op must join the cases above."""
    seen = set()
    for name in CASES:
        fn, tensors = CASES[name]
        seen |= {func._schema.name for func, _, _ in _record(fn, *tensors)}
    registered = {f"mimfast::{op}" for op in dir(torch.ops.mimfast) if not op.startswith("_")
                  and isinstance(getattr(torch.ops.mimfast, op), torch._ops.OpOverloadPacket)}
    assert registered - seen == set(), f"custom ops no case exercises: {sorted(registered - seen)}"
