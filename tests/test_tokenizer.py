"""Trainable VQ tokenizer: interface, EMA codebook, a few hundred training steps on the built-in
dataset (reconstruction error falls, many codes used), exact resume, saving/loading, and
``load_tokenizer`` for both kinds."""

import json

import pytest
import torch

from mimfast.data.builtin import ShapesDataset
from mimfast.models.dalle import DalleEncoder, map_pixels
from mimfast.models.tokenizer import EMAQuantizer, FrozenTokenizer, VQTokenizer, load_tokenizer, save_vq_tokenizer
from mimfast.train.tokenizer_train import TokenizerTrainConfig, _eval_transform, train_tokenizer


@pytest.fixture
def one_thread():
    # the CPU is shared by parallel test files: one thread avoids oversubscription stalls
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(tmp_path, name, **kw):
    base = dict(img_size=16, downsample=4, vocab_size=128, embed_dim=16, hidden=16, batch_size=16, steps=250,
                builtin_size=512, num_workers=0, eval_images=128, save_every=0, lr=2e-3, warmup_steps=20,
                output_dir=str(tmp_path / name), log_every=1000, device="cpu")
    base.update(kw)
    return TokenizerTrainConfig(**base)


def test_vq_interface_and_shapes():
    m = VQTokenizer(vocab_size=64, embed_dim=8, hidden=16, downsample=8)
    x = map_pixels(torch.rand(3, 3, 24, 40))
    out = m(x)
    assert out["recon"].shape == x.shape and out["ids"].shape == (3, 3, 5)
    assert out["loss"].requires_grad and out["ids"].dtype == torch.int64
    m.eval()
    assert torch.equal(m.tokenize(x), m(x)["ids"])
    with pytest.raises(ValueError, match="multiples of 8"):
        m(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match="downsample"):
        VQTokenizer(downsample=3)


def test_ema_quantizer_starts_from_data_and_tracks_it():
    q = EMAQuantizer(num_codes=8, dim=4, decay=0.5)
    centres = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    z = (centres.repeat(32, 1) + 0.01 * torch.randn(256, 4)).t().reshape(1, 4, 16, 16)
    q.train()
    for _ in range(20):
        _, ids, commit = q(z)
    # every code sits on (near) a data point: commitment is small and codes are nearly unit
    assert commit.item() < 0.05
    assert torch.allclose(q.embed.norm(dim=1), torch.ones(8), atol=1e-5)
    q.eval()
    before = q.embed.clone()
    q(z)
    assert torch.equal(before, q.embed)  # no update in eval mode


def test_training_lowers_reconstruction_error_and_uses_many_codes(tmp_path, one_thread):
    cfg = _cfg(tmp_path, "run")
    summary = train_tokenizer(cfg)
    # a constant (dataset-mean) image's error on the same fixed images, for scale
    base = ShapesDataset(cfg.builtin_size, cfg.img_size, seed=cfg.seed)
    tf = _eval_transform(cfg.img_size)
    x = torch.stack([tf(base[cfg.builtin_size - 1 - i][0]) for i in range(cfg.eval_images)])
    mean_image_mse = ((x - x.mean(dim=(0, 2, 3), keepdim=True)) ** 2).mean().item()
    assert summary["steps"] == 250
    assert summary["eval_rec_mse_end"] < 0.25 * summary["eval_rec_mse_start"]
    assert summary["eval_rec_mse_end"] < mean_image_mse
    assert summary["codes_used"] >= 48 and summary["perplexity"] > 24
    out = tmp_path / "run"
    for name in ("tokenizer.safetensors", "checkpoint-last.pth", "usage.json", "reconstruction.png", "log.jsonl"):
        assert (out / name).is_file(), name
    assert json.loads((out / "usage.json").read_text())["codes_used"] == summary["codes_used"]

    tok = load_tokenizer(f"vq:{out / 'tokenizer.safetensors'}")
    assert isinstance(tok, FrozenTokenizer) and tok.kind == "vq" and tok.vocab_size == 128 and tok.downsample == 4
    assert not any(p.requires_grad for p in tok.parameters())
    tok.train()
    assert not tok.net.training
    ids = tok(x[:5])
    assert ids.shape == (5, 4, 4) and ids.dtype == torch.int64 and int(ids.max()) < 128
    # the checkpoint (weights_only) and a bare path with metadata give the same tokenizer
    assert torch.equal(load_tokenizer(f"vq:{out / 'checkpoint-last.pth'}")(x[:5]), ids)
    assert torch.equal(load_tokenizer(str(out / "tokenizer.safetensors"))(x[:5]), ids)


def test_resume_is_exact(tmp_path, one_thread):
    # warm-up longer than the run: the lr depends on the step only, not on --steps; 8 steps an
    # epoch, so the resume starts mid-epoch 1; every step logged
    kw = dict(steps=12, warmup_steps=100, builtin_size=64, eval_images=8, batch_size=8, hidden=8, vocab_size=32,
              log_every=1)
    train_tokenizer(_cfg(tmp_path, "straight", **{**kw, "steps": 24}))
    train_tokenizer(_cfg(tmp_path, "resumed", **kw))
    train_tokenizer(_cfg(tmp_path, "resumed", **{**kw, "steps": 24, "resume": "auto"}))
    a = torch.load(tmp_path / "straight" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint-last.pth", weights_only=True)
    assert a["step"] == b["step"] == 24 and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the resumed run ran steps 13 to 24 only (one that started over would end with the same
    # weights), each with the straight run's loss
    def logged(name):
        return [(r["step"], r["rec_loss"]) for r in map(json.loads, open(tmp_path / name / "log.jsonl"))]

    straight = logged("straight")
    assert [s for s, _ in straight] == list(range(1, 25))
    assert logged("resumed") == straight


def test_load_tokenizer_dalle_and_bad_specs(tmp_path):
    from safetensors.torch import save_file

    enc = DalleEncoder(n_hid=8, n_blk_per_group=1, vocab_size=40)
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    tok = load_tokenizer(f"dalle:{path}")
    assert tok.kind == "dalle" and tok.vocab_size == 40 and tok.downsample == 8
    x = map_pixels(torch.rand(2, 3, 32, 32))
    assert torch.equal(tok(x), enc.eval().tokenize(x))
    with pytest.raises(ValueError, match="dalle:PATH"):
        load_tokenizer(str(path))  # no metadata naming the kind
    with pytest.raises(ValueError, match="dalle:PATH"):
        load_tokenizer("")
    with pytest.raises(FileNotFoundError, match="'/nonexistent/tok.safetensors' do not exist"):
        load_tokenizer("vq:/nonexistent/tok.safetensors")
    with pytest.raises(ValueError, match="not a VQ tokenizer"):
        load_tokenizer(f"vq:{path}")
    m = VQTokenizer(vocab_size=16, embed_dim=4, hidden=8, downsample=4)
    save_vq_tokenizer(m, tmp_path / "vq.safetensors")
    m.eval()
    assert torch.equal(load_tokenizer(f"vq:{tmp_path / 'vq.safetensors'}")(x), m.tokenize(x))
