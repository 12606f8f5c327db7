"""The DALL-E dVAE encoder (BEiT's visual tokenizer), reimplemented with openai/DALL-E's
architecture and ``state_dict`` keys (``dall_e/encoder.py``, ``dall_e/utils.py``), so a
converted official ``encoder.pkl`` loads with ``strict=True``:

    blocks.input              7x7 conv, 3 -> n_hid                          (N, 256, 112, 112)
    blocks.group_1..group_4   2 bottleneck blocks each at 1, 2, 4, 8 x n_hid
                              (MaxPool2d(2) after groups 1-3)               (N, 2048, 14, 14)
    blocks.output             ReLU + 1x1 conv to vocab_size logits          (N, 8192, 14, 14)

A block is ``id_path(x) + post_gain * res_path(x)`` with ``post_gain = 1 / n_layers ** 2``
(n_layers = group_count * n_blk_per_group = 8) and ``res_path`` = ReLU, 3x3 conv to n_out/4,
ReLU, 3x3, ReLU, 3x3, ReLU, 1x1 to n_out; ``id_path`` is a 1x1 conv where the width changes.
Every convolution holds its weight as ``w`` and bias as ``b``. On CUDA the reference runs
each conv in float16 except the output conv (``use_float16=False``); here the half type is
selectable (``precision="fp16"`` as the reference, ``"bf16"``, or ``"fp32"``). Inputs are
pixels in [0, 1] passed through :func:`map_pixels` (0.1 + 0.8 x); tokens are the argmax of the
logits over the vocabulary: a 112-px view gives (N, 14, 14) ids.

Weights: the official files are ``torch.save``d whole modules, which need the ``dall_e``
classes to unpickle and would run arbitrary code if unpickled plainly.
:func:`convert_dalle_pickle` reads one once through a restricted unpickler (only the handful
of classes and tensor-rebuild functions such a file holds; everything else is refused) and
writes a safetensors ``state_dict``; :func:`load_dalle_encoder` reads only safetensors or
``weights_only=True`` files.
"""

from __future__ import annotations

import collections
import os
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DalleEncoder",
    "map_pixels",
    "unmap_pixels",
    "LOGIT_LAPLACE_EPS",
    "convert_dalle_pickle",
    "read_dalle_pickle",
    "load_dalle_encoder",
    "dalle_config_from_state_dict",
]

LOGIT_LAPLACE_EPS = 0.1

_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] to the dVAE's input range: ``(1 - 2 eps) x + eps`` with eps 0.1."""
    if not x.is_floating_point():
        raise TypeError(f"map_pixels: x must be a float tensor of pixels in [0, 1], got dtype {x.dtype}")
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class Conv2d(nn.Module):
    """DALL-E's conv: parameters ``w`` (n_out, n_in, kw, kw) and ``b`` (n_out,), 'same' padding,
    init normal(std = 1 / sqrt(n_in kw^2)) and zero bias. With ``use_float16`` it runs in the
    encoder's half type on CUDA (the reference: float16), otherwise in float32."""

    def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True) -> None:
        super().__init__()
        if kw < 1 or kw % 2 == 0:
            raise ValueError(f"kw must be a positive odd kernel width, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16 = use_float16
        self.half_dtype: torch.dtype | None = torch.float16  # set by DalleEncoder(precision=...)
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=(n_in * kw**2) ** -0.5))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_float16 and self.half_dtype is not None and x.is_cuda:
            dtype = self.half_dtype
        else:
            dtype = torch.float32
        return F.conv2d(x.to(dtype), self.w.to(dtype), self.b.to(dtype), padding=(self.kw - 1) // 2)

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}, kw={self.kw}, use_float16={self.use_float16}"


class EncoderBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``; the bottleneck is n_out / 4 wide."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        if n_out % 4:
            raise ValueError(f"n_out must be a multiple of 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()),
            ("conv_1", Conv2d(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()),
            ("conv_2", Conv2d(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()),
            ("conv_3", Conv2d(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()),
            ("conv_4", Conv2d(n_hid, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """The DALL-E dVAE encoder: image (N, 3, H, W) in map_pixels range -> logits
    (N, vocab_size, H / 2^(group_count-1), ...). ``tokenize`` gives (N, h, w) int64 ids.

    Args:
        group_count: groups of blocks (4); groups but the last end with MaxPool2d(2).
        n_hid: width of the first group (256); group g is 2^(g-1) x n_hid wide.
        n_blk_per_group: blocks per group (2).
        input_channels: image channels (3).
        vocab_size: number of visual tokens (8192).
        precision: the half type of the convs on CUDA: ``"fp16"`` (the reference),
            ``"bf16"`` or ``"fp32"``. The output conv is always float32; CPU is float32.
    """

    def __init__(self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3,
                 vocab_size: int = 8192, precision: str = "fp16") -> None:
        super().__init__()
        for name, value in (("group_count", group_count), ("n_hid", n_hid), ("n_blk_per_group", n_blk_per_group),
                            ("input_channels", input_channels), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if n_hid % 4:
            raise ValueError(f"n_hid must be a multiple of 4, got {n_hid}")
        self.group_count = group_count
        self.n_hid = n_hid
        self.n_blk_per_group = n_blk_per_group
        self.input_channels = input_channels
        self.vocab_size = vocab_size
        self.downsample = 2 ** (group_count - 1)
        n_layers = group_count * n_blk_per_group

        layers = [("input", Conv2d(input_channels, n_hid, 7))]
        n_in = n_hid
        for g in range(group_count):
            width = 2**g * n_hid
            group = [(f"block_{i + 1}", EncoderBlock(n_in if i == 0 else width, width, n_layers))
                     for i in range(n_blk_per_group)]
            if g < group_count - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
            n_in = width
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", Conv2d(n_in, vocab_size, 1, use_float16=False)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(layers))
        self.set_precision(precision)

    def set_precision(self, precision: str) -> None:
        if precision not in _HALF:
            raise ValueError(f"precision must be one of {tuple(_HALF)}, got {precision!r}")
        self.precision = precision
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.half_dtype = _HALF[precision]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) float, H and W multiples of ``downsample`` -> float32 logits."""
        if x.dim() != 4:
            raise ValueError(f"x must be 4-d (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"x has {x.shape[1]} channels, the encoder was built for {self.input_channels}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor (map_pixels of [0, 1] pixels), got {x.dtype}")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(f"x's height and width must be multiples of {self.downsample}, got {tuple(x.shape[2:])}")
        # explicit per-conv dtypes as the reference: an enclosing autocast must not change them
        with torch.autocast(x.device.type, enabled=False):
            return self.blocks(x).float()

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) map_pixels images -> (N, H / downsample, W / downsample) int64 token ids."""
        return self(x).argmax(dim=1)


# ----------------------------------------------------------------------------------------------
# Weights: official pickle -> safetensors (once), then safetensors / weights_only loading only.


class _StandIn:
    """Takes the place of a pickled module: keeps its attribute dict (``_parameters``,
    ``_buffers``, ``_modules``, ...) and runs no code of the original class."""

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict, slotstate)
            state = state[0] or {}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected module state of type {type(state).__name__}")
        self.__dict__.update(state)


def _stand_in(module: str, name: str) -> type:
    return type(name, (_StandIn,), {"__module__": "mimfast.models.dalle._standin", "_pickled_as": f"{module}.{name}"})


_MODULE_CLASSES = {
    ("dall_e.encoder", "Encoder"), ("dall_e.encoder", "EncoderBlock"), ("dall_e.utils", "Conv2d"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"), ("torch.nn.modules.linear", "Identity"),
}
_STAND_INS = {key: _stand_in(*key) for key in _MODULE_CLASSES}
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled DALL-E encoder holds: its module classes (to inert
    stand-ins), OrderedDict/set/device and torch's tensor-rebuild functions. torch.load's own
    wrapper maps storage type names before asking here."""

    def find_class(self, module: str, name: str):
        if (module, name) in _STAND_INS:
            return _STAND_INS[(module, name)]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: not part of a DALL-E encoder pickle")


class _RestrictedPickleModule:
    """The ``pickle_module`` handed to ``torch.load``: only the restricted unpickler."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def _collect_tensors(obj, prefix: str, out: dict) -> None:
    state = getattr(obj, "__dict__", {})
    for kind in ("_parameters", "_buffers"):
        for name, t in (state.get(kind) or {}).items():
            if t is None:
                continue
            if kind == "_buffers" and name in (state.get("_non_persistent_buffers_set") or ()):
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{prefix}{name} is a {type(t).__name__}, expected a tensor")
            out[prefix + name] = t.detach().contiguous()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out)


def read_dalle_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict of an official pickled DALL-E ``Encoder`` (``encoder.pkl``), read
    through the restricted unpickler (no code of the pickle's classes runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DALL-E encoder pickle {str(path)!r} does not exist")
    with warnings.catch_warnings():  # legacy files: torch cannot compare the stand-ins' source
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        obj = torch.load(path, map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False)
    pickled_as = getattr(type(obj), "_pickled_as", None)
    if pickled_as != "dall_e.encoder.Encoder":
        raise ValueError(f"{path}: expected a pickled dall_e.encoder.Encoder, found {pickled_as or type(obj).__name__}")
    state_dict: dict[str, torch.Tensor] = {}
    _collect_tensors(obj, "", state_dict)
    if "blocks.input.w" not in state_dict or "blocks.output.conv.w" not in state_dict:
        raise ValueError(f"{path}: no blocks.input.w / blocks.output.conv.w in the pickled encoder")
    return state_dict


def convert_dalle_pickle(pkl_path: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Convert the official ``encoder.pkl`` to a safetensors state_dict; returns the config."""
    from safetensors.torch import save_file

    state_dict = read_dalle_pickle(pkl_path)
    config = dalle_config_from_state_dict(state_dict)
    DalleEncoder(**config).load_state_dict(state_dict, strict=True)  # proves the keys and shapes
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in state_dict.items()}, str(out_path),
              metadata={"format": "pt", "mimfast_tokenizer": "dalle"})
    return config


def dalle_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """DalleEncoder arguments read off a state_dict's shapes."""
    try:
        w_in = state_dict["blocks.input.w"]
        w_out = state_dict["blocks.output.conv.w"]
    except KeyError as e:
        raise ValueError(f"not a DALL-E encoder state_dict: missing {e.args[0]}") from None
    groups = {k.split(".")[1] for k in state_dict if k.startswith("blocks.group_")}
    blocks = {k.split(".")[2] for k in state_dict if k.startswith("blocks.group_1.block_")}
    return dict(group_count=len(groups), n_hid=w_in.shape[0], n_blk_per_group=len(blocks),
                input_channels=w_in.shape[1], vocab_size=w_out.shape[0])


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pkl",):
        raise ValueError(f"{path}: a pickled module; convert it once with "
                         f"`mimfast tokenizer convert {path} encoder.safetensors`")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state_dict of tensors")
    return obj


def load_dalle_encoder(path: str | os.PathLike, precision: str = "fp16") -> DalleEncoder:
    """A DalleEncoder from a safetensors (or ``weights_only`` torch) state_dict, strict keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DALL-E encoder weights {str(path)!r} do not exist")
    state_dict = _read_state_dict(path)
    model = DalleEncoder(**dalle_config_from_state_dict(state_dict), precision=precision)
    model.load_state_dict(state_dict, strict=True)
    return model
