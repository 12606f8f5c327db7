"""DALL-E dVAE encoder: keys, shapes and logits against a plain-torch encoder written here from
the published architecture (openai/DALL-E ``dall_e/encoder.py``, ``utils.py``); the pickle
converter round trip on a pickle this test makes with stand-in ``dall_e`` classes; the
restricted unpickler refusing anything else."""

import os
import pickle
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimfast.models import DalleEncoder
from mimfast.models.dalle import (
    convert_dalle_pickle,
    load_dalle_encoder,
    map_pixels,
    read_dalle_pickle,
    unmap_pixels,
)

DEVICE = os.environ.get("MIMFAST_TEST_DEVICE", "cpu")


# --- the published architecture, plainly (classes named and placed as in the dall_e package) --

class Conv2d(nn.Module):
    def __init__(self, n_in, n_out, kw, use_float16=True):
        super().__init__()
        self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
        self.device, self.requires_grad = torch.device("cpu"), False
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw**2) ** 0.5)
        self.b = nn.Parameter(torch.randn(n_out) * 0.1)  # non-zero so a dropped bias shows

    def forward(self, x):
        if self.use_float16 and x.is_cuda:
            return F.conv2d(x.half(), self.w.half(), self.b.half(), padding=(self.kw - 1) // 2)
        return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, self.n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv2d(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv2d(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv2d(self.n_hid, n_out, 1))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    def __init__(self, n_hid=256, n_blk_per_group=2, vocab_size=8192):
        super().__init__()
        self.group_count, self.n_hid, self.n_blk_per_group = 4, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = 3, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
        r = range(n_blk_per_group)
        blk = lambda a, b: EncoderBlock(a, b, 4 * n_blk_per_group)  # noqa: E731
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(3, n_hid, 7)),
            ("group_1", nn.Sequential(OrderedDict(
                [*[(f"block_{i + 1}", blk(n_hid, n_hid)) for i in r], ("pool", nn.MaxPool2d(2))]))),
            ("group_2", nn.Sequential(OrderedDict(
                [*[(f"block_{i + 1}", blk(n_hid if i == 0 else 2 * n_hid, 2 * n_hid)) for i in r],
                 ("pool", nn.MaxPool2d(2))]))),
            ("group_3", nn.Sequential(OrderedDict(
                [*[(f"block_{i + 1}", blk(2 * n_hid if i == 0 else 4 * n_hid, 4 * n_hid)) for i in r],
                 ("pool", nn.MaxPool2d(2))]))),
            ("group_4", nn.Sequential(OrderedDict(
                [*[(f"block_{i + 1}", blk(4 * n_hid if i == 0 else 8 * n_hid, 8 * n_hid)) for i in r]]))),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", Conv2d(8 * n_hid, vocab_size, 1, use_float16=False))]))),
        ]))

    def forward(self, x):
        return self.blocks(x)


def _copy_into(ours: DalleEncoder, ref: Encoder):
    ours.load_state_dict(ref.state_dict(), strict=True)


def test_official_keys_and_shapes_full_size():
    with torch.device("meta"):  # shapes only: no memory, no init time
        ref = Encoder()  # the published configuration: 3 -> 256 ... 2048 -> 8192
        ours = DalleEncoder()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert {k: tuple(v.shape) for k, v in our_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    for key in ("blocks.input.w", "blocks.group_1.block_1.res_path.conv_1.w", "blocks.group_2.block_1.id_path.w",
                "blocks.group_4.block_2.res_path.conv_4.b", "blocks.output.conv.w"):
        assert key in our_sd
    assert "blocks.group_1.block_1.id_path.w" not in our_sd  # same width: identity
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert ours.downsample == 8


@pytest.mark.parametrize("n_blk_per_group,size", [(1, 24), (2, 16)])
def test_logits_and_tokens_match_the_published_architecture(n_blk_per_group, size):
    ref = Encoder(n_hid=16, n_blk_per_group=n_blk_per_group, vocab_size=37).eval()
    ours = DalleEncoder(n_hid=16, n_blk_per_group=n_blk_per_group, vocab_size=37, precision="fp32").eval()
    _copy_into(ours, ref)
    x = map_pixels(torch.rand(3, 3, size, size + 8))
    with torch.no_grad():
        want = ref(x)
        got = ours(x)
    assert got.shape == (3, 37, size // 8, (size + 8) // 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ids = ours.tokenize(x)
    assert ids.shape == (3, size // 8, (size + 8) // 8) and ids.dtype == torch.int64
    assert torch.equal(ids, want.argmax(1))


@pytest.mark.skipif(DEVICE != "cuda", reason="half-precision convs run on CUDA only (as the reference)")
def test_fp16_on_cuda_matches_the_reference_half_path():
    ref = Encoder(n_hid=64, vocab_size=512).cuda().eval()
    ours = DalleEncoder(n_hid=64, vocab_size=512, precision="fp16").cuda().eval()
    _copy_into(ours, ref)
    x = map_pixels(torch.rand(4, 3, 112, 112, device="cuda"))
    with torch.no_grad():
        want = ref(x).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):  # the trainer's autocast must not leak in
            got = ours(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # the same fp16 convs as the reference
    assert (got.argmax(1) == want.argmax(1)).float().mean().item() > 0.99
    ours.set_precision("bf16")
    with torch.no_grad():
        got_bf16 = ours(x)
    agree = (got_bf16.argmax(1) == want.argmax(1)).float().mean().item()
    assert agree > 0.75  # bf16 keeps most tokens; near-ties may flip


def test_half_path_runs_each_conv_in_the_half_type(monkeypatch):
    """The CUDA-only branch (``x.is_cuda``), taken on the CPU: every conv but the output one in
    the half type, float32 logits, the same tokens as float32 convs, under any autocast."""
    enc = DalleEncoder(n_hid=16, n_blk_per_group=1, vocab_size=37, precision="fp16").eval()
    x = map_pixels(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        want = enc(x)  # CPU: float32 convs
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    dtypes = []
    for m in enc.modules():
        if type(m).__name__ == "Conv2d":
            m.register_forward_hook(lambda m, args, out: dtypes.append((m.use_float16, out.dtype)))
    for precision, half in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        enc.set_precision(precision)
        dtypes.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = enc(x)
        assert got.dtype == torch.float32
        assert set(dtypes) == {(True, half), (False, torch.float32)}
        torch.testing.assert_close(got, want, rtol=0, atol=5e-2)
        assert torch.equal(got.argmax(1), want.argmax(1))


def test_map_pixels():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    torch.testing.assert_close(map_pixels(x), torch.tensor([0.1, 0.5, 0.9]).view(1, 1, 1, 3))
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x)
    with pytest.raises(TypeError, match="x must be a float"):
        map_pixels(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_bad_input_is_refused():
    enc = DalleEncoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    with pytest.raises(ValueError, match="4-d"):
        enc(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="channels"):
        enc(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        enc(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match="precision"):
        DalleEncoder(n_hid=8, precision="fp8")


# --- converter ----------------------------------------------------------------------------


@pytest.fixture
def dall_e_modules(monkeypatch):
    """Stand-in ``dall_e.encoder`` / ``dall_e.utils`` modules holding the classes above, so a
    pickle of a whole Encoder names the same globals as the official ``encoder.pkl``."""
    pkg = types.ModuleType("dall_e")
    pkg.encoder = types.ModuleType("dall_e.encoder")
    pkg.utils = types.ModuleType("dall_e.utils")
    for cls, mod in ((Encoder, pkg.encoder), (EncoderBlock, pkg.encoder), (Conv2d, pkg.utils)):
        monkeypatch.setattr(cls, "__module__", mod.__name__)
        setattr(mod, cls.__name__, cls)
    for m in (pkg, pkg.encoder, pkg.utils):
        monkeypatch.setitem(sys.modules, m.__name__, m)


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")  # legacy torch.save of test classes
@pytest.mark.parametrize("zip_format", [True, False])
def test_converter_round_trip(dall_e_modules, tmp_path, monkeypatch, zip_format):
    ref = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=24)
    pkl = tmp_path / "encoder.pkl"
    torch.save(ref, pkl, _use_new_zipfile_serialization=zip_format)  # a whole pickled module, as the official file
    assert type(ref.blocks.input).__module__ == "dall_e.utils"
    with open(pkl, "rb") as f:  # the pickle names the dall_e classes
        raw = f.read()
    assert b"dall_e.encoder" in raw and b"dall_e.utils" in raw
    x = map_pixels(torch.rand(2, 3, 16, 24))
    with torch.no_grad():
        want = ref.eval()(x)

    # the converter must not need (or import) the dall_e package
    for name in ("dall_e", "dall_e.encoder", "dall_e.utils"):
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "encoder.safetensors"
    config = convert_dalle_pickle(pkl, out)
    assert config == dict(group_count=4, n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=24)
    assert "dall_e" not in sys.modules

    enc = load_dalle_encoder(out, precision="fp32").eval()
    with torch.no_grad():
        got = enc(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(enc.tokenize(x), want.argmax(1))

    # a weights_only torch state_dict loads too; the pickle itself is refused at load time
    pt = tmp_path / "encoder.pt"
    torch.save(enc.state_dict(), pt)
    torch.testing.assert_close(load_dalle_encoder(pt, precision="fp32")(x), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mimfast tokenizer convert"):
        load_dalle_encoder(pkl)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_other_globals(tmp_path, monkeypatch):
    evil, legacy, raw = tmp_path / "evil.pkl", tmp_path / "legacy.pkl", tmp_path / "raw.pkl"
    torch.save({"x": _Evil()}, evil)
    torch.save({"x": _Evil()}, legacy, _use_new_zipfile_serialization=False)
    raw.write_bytes(pickle.dumps(_Evil(), protocol=2))
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        read_dalle_pickle(evil)
    assert not called
    # a legitimate torch file that is not a DALL-E encoder is rejected with a clear message
    sd = tmp_path / "sd.pkl"
    torch.save(OrderedDict(w=torch.zeros(2)), sd)
    with pytest.raises(ValueError, match="dall_e.encoder.Encoder"):
        read_dalle_pickle(sd)
    # legacy (non-zip) serialization goes through the same gate
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_dalle_pickle(legacy)
    # a bare pickle (no torch header): torch's legacy reader unpickles it through the same gate
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        read_dalle_pickle(raw)
    assert not called
