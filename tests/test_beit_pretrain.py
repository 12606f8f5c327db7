"""``mimfast pretrain --method beit`` end to end on the built-in dataset with either tokenizer (a
VQ tokenizer from ``mimfast tokenizer`` files, a DALL-E encoder converted from a pickle), exact
resume, the pixel variant, and the per-sample views and masks the task feeds the model."""

import json
import sys
import types

import pytest
import torch

from mimfast.cli import main
from mimfast.data.datasets import build_dataset
from mimfast.models.dalle import DalleEncoder
from mimfast.models.tokenizer import VQTokenizer, save_vq_tokenizer
from mimfast.train.beit_task import BEiTTask
from mimfast.train.config import build_parser, config_from_args

# beit-tiny shrunk for a CPU test: 32 px, patch 4 (8x8 grid), 2 blocks, eager kernels (the
# kernels have their own tests; the interpreter would dominate the runtime here)
SMALL = ["--img-size", "32", "--patch-size", "4", "--builtin-size", "32", "--batch-size", "8", "--num-workers", "0",
         "--kernels", "eager", "--log-every", "1", "--no-tensorboard", "--num-mask-patches", "20"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def vq_path(tmp_path):
    path = tmp_path / "vq.safetensors"
    save_vq_tokenizer(VQTokenizer(vocab_size=64, embed_dim=8, hidden=8, downsample=4), path)
    return path


def _run(out, *extra):
    argv = ["pretrain", "--method", "beit", "--preset", "beit-tiny", *SMALL, "--output-dir", str(out), *extra]
    return main(argv)


def _cfg(*argv):
    return config_from_args(build_parser().parse_args(["--preset", "beit-tiny", *SMALL, *argv]))


def test_task_samples_views_masks_and_tokens(vq_path):
    cfg = _cfg("--tokenizer", f"vq:{vq_path}")
    task = BEiTTask(cfg, torch.device("cpu"))
    model = task.build_model()
    assert model.lm_head.out_features == 64  # vocabulary from the tokenizer
    assert len(model.blocks) == 6 and model.patch_size == 4 and model.img_size == 32
    ds = build_dataset("builtin", 32, task.transform(32), seed=0, builtin_size=8)
    (patches, views, mask), _ = ds[(0, 3)]
    assert patches.shape == (3, 32, 32) and views.shape == (3, 32, 32)  # 8x8 grid x downsample 4
    assert mask.shape == (8, 8) and mask.dtype == torch.bool and int(mask.sum()) == 20
    (_, _, again), _ = ds[(0, 3)]
    (_, _, other), _ = ds[(1, 3)]
    assert torch.equal(mask, again) and not torch.equal(mask, other)  # keyed by (seed, epoch, index)
    batch = [torch.stack(t) for t in zip(*[ds[(0, i)][0] for i in range(4)])]
    tokens = task.tokens(batch[1])
    assert tokens.shape == (4, 64) and tokens.dtype == torch.int64
    loss = task.loss(model, (batch, None))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert not any(p.grad is not None for p in task.tokenizer.parameters())


def test_pretrain_with_vq_tokenizer_end_to_end_and_exact_resume(tmp_path, one_thread):
    # the chain a user runs: `mimfast tokenizer train`, then `mimfast pretrain --tokenizer vq:...`
    assert main(["tokenizer", "train", "--img-size", "32", "--downsample", "4", "--hidden", "8", "--embed-dim", "8",
                 "--vocab-size", "64", "--steps", "3", "--builtin-size", "32", "--batch-size", "8",
                 "--eval-images", "8", "--num-workers", "0", "--warmup-steps", "1", "--device", "cpu",
                 "--output-dir", str(tmp_path / "tok")]) == 0
    vq_path = tmp_path / "tok" / "tokenizer.safetensors"
    a, b = tmp_path / "a", tmp_path / "b"
    # on the CPU, where every op is deterministic (the DALL-E test below takes the default device)
    assert _run(a, "--tokenizer", f"vq:{vq_path}", "--max-steps", "4", "--save-every", "2", "--device", "cpu") == 0
    summary = json.loads((a / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["status"] == "done"
    assert 0 < summary["first_loss"] < 10 and summary["last_loss"] < 10
    assert (a / "reconstruction.png").is_file()
    # resumed from step 2, the run ends where the straight one did
    assert _run(b, "--tokenizer", f"vq:{vq_path}", "--max-steps", "4", "--save-every", "2", "--device", "cpu",
                "--resume", str(a / "checkpoint-000002.pth")) == 0
    wa = torch.load(a / "checkpoint-last.pth", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint-last.pth", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # b ran steps 3 and 4 only (a run that started over would end with a's weights too), with
    # a's losses
    def logged(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(out / "log.jsonl"))]

    assert [s for s, _ in logged(a)] == [1, 2, 3, 4]
    assert logged(b) == logged(a)[2:]


def test_pretrain_with_a_converted_dalle_encoder(tmp_path, monkeypatch, one_thread):
    # a whole pickled Encoder under the official module paths (our classes re-homed for the
    # pickling), converted once by the CLI, then used as the tokenizer
    from mimfast.models import dalle

    mods = {name: types.ModuleType(name) for name in ("dall_e", "dall_e.encoder", "dall_e.utils")}
    homes = ((dalle.DalleEncoder, "dall_e.encoder", "Encoder"), (dalle.EncoderBlock, "dall_e.encoder", "EncoderBlock"),
             (dalle.Conv2d, "dall_e.utils", "Conv2d"))
    saved = [(cls, cls.__module__, cls.__qualname__) for cls, _, _ in homes]
    try:
        for cls, mod, name in homes:
            cls.__module__, cls.__qualname__ = mod, name
            setattr(mods[mod], name, cls)
        for name, mod in mods.items():
            monkeypatch.setitem(sys.modules, name, mod)
        enc = DalleEncoder(n_hid=8, n_blk_per_group=1, vocab_size=48, precision="fp32")  # no dtype objects inside
        pkl = tmp_path / "encoder.pkl"
        torch.save(enc, pkl)
    finally:
        for cls, mod, name in saved:
            cls.__module__, cls.__qualname__ = mod, name
        monkeypatch.undo()

    path = tmp_path / "encoder.safetensors"
    assert main(["tokenizer", "convert", str(pkl), str(path)]) == 0
    out = tmp_path / "run"
    assert _run(out, "--tokenizer", f"dalle:{path}", "--max-steps", "2") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["status"] == "done"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tokenizer"] == f"dalle:{path}" and cfg["method"] == "beit"
    with pytest.raises(SystemExit, match="mimfast tokenizer convert"):
        _run(tmp_path / "pickled", "--tokenizer", f"dalle:{pkl}", "--max-steps", "1")


def test_missing_tokenizer_and_pixel_variant(tmp_path, vq_path, one_thread):
    with pytest.raises(SystemExit, match="mimfast tokenizer train"):
        _run(tmp_path / "x", "--max-steps", "1")
    with pytest.raises(SystemExit, match="num-mask-patches"):
        _run(tmp_path / "y", "--tokenizer", f"vq:{vq_path}", "--max-steps", "1", "--num-mask-patches", "64")
    with pytest.raises(SystemExit, match="do not exist"):
        _run(tmp_path / "z", "--tokenizer", "vq:/nonexistent.safetensors", "--max-steps", "1")
    out = tmp_path / "pixel"
    assert _run(out, "--model", "beit_tiny_patch16_224_pixel", "--max-steps", "2") == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "done"
    assert (out / "reconstruction.png").is_file()
