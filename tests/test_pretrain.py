"""The pretraining program: configuration, schedule, data, exact resume, DDP equivalence."""

import json
import math

import pytest
import torch

from mimfast.cli import build_parser
from mimfast.data.datasets import ImageFiles, SeededTransform
from mimfast.data.sampler import ResumableSampler
from mimfast.train.checkpoint import dataset_change_notice, load_checkpoint, load_model_weights
from mimfast.train.config import PretrainConfig, config_from_args
from mimfast.train.pretrain import pretrain
from mimfast.train.schedule import lr_at, param_groups_weight_decay
from runs import assert_same_training, pretrain_processes

TINY = dict(
    model="mae_vit_tiny_patch16", img_size=32, patch_size=8,
    model_kwargs=dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2),
    data="builtin", builtin_size=32, batch_size=8, epochs=2, warmup_epochs=1, blr=1e-2, num_workers=0,
    kernels="eager", vis_every=0, tensorboard=False, log_every=1, seed=3,
)


def _cfg(tmp_path, **kw):
    values = dict(TINY, output_dir=str(tmp_path))
    values.update(kw)
    return PretrainConfig(**values)


def _parse(argv):
    args = build_parser().parse_args(["pretrain"] + argv)
    return config_from_args(args)


def test_cli_flags_recipe_preset_and_yaml(tmp_path):
    cfg = _parse([])
    assert cfg.method == "mae" and cfg.blr == 1.5e-4 and cfg.betas == (0.9, 0.95) and cfg.warmup_epochs == 40
    assert cfg.norm_pix_loss and cfg.mask_ratio == 0.75 and cfg.weight_decay == 0.05
    cfg = _parse(["--preset", "tiny", "--max-steps", "7", "--no-norm-pix-loss", "--batch-size", "4"])
    assert cfg.model == "mae_vit_tiny_patch16" and cfg.max_steps == 7 and not cfg.norm_pix_loss
    assert cfg.batch_size == 4 and cfg.img_size == 64
    yml = tmp_path / "run.yaml"
    yml.write_text("preset: tiny\nmask-ratio: 0.6\nbatch_size: 16\n")
    cfg = _parse(["--config", str(yml), "--batch-size", "32"])
    assert cfg.mask_ratio == 0.6 and cfg.batch_size == 32 and cfg.model == "mae_vit_tiny_patch16"
    beit = _parse(["--method", "beit"])
    assert beit.betas == (0.9, 0.999) and beit.lr == 1.5e-3 and beit.clip_grad == 3.0


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--data", "/no/such/folder"], "does not exist"),
        (["--mask-ratio", "1.0"], "mask-ratio"),
        (["--batch-size", "0"], "batch-size"),
        (["--model", "mae_vit_gigantic"], "unknown"),
    ],
)
def test_bad_configs_fail_at_start(argv, match):
    with pytest.raises(SystemExit, match=match):
        _parse(argv)


def test_unknown_setting_in_yaml(tmp_path):
    yml = tmp_path / "bad.yaml"
    yml.write_text("learning_rate_typo: 1\n")
    with pytest.raises(SystemExit, match="unknown settings"):
        _parse(["--config", str(yml)])


def test_unknown_model_fails(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        pretrain(_cfg(tmp_path, model="mae_vit_gigantic"))


def test_lr_schedule_is_the_reference_formula():
    lr, min_lr, warm, epochs = 1e-3, 1e-5, 4, 20
    for epoch in [0, 0.5, 1.25, 3.99, 4, 7.3, 12, 19.9]:
        if epoch < warm:
            want = lr * epoch / warm
        else:
            want = min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warm) / (epochs - warm)))
        assert lr_at(epoch, lr, min_lr, warm, epochs) == pytest.approx(want)


def test_weight_decay_groups():
    from mimfast.models import mae_vit_tiny_patch16

    m = mae_vit_tiny_patch16(img_size=32, patch_size=8, depth=1)
    no_decay, decay = param_groups_weight_decay(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"patch_embed.proj.bias", "blocks.0.norm1.weight"} <= nd
    dn = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token"} <= dn  # the official MAE runs decay the tokens
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert "pos_embed" not in nd | dn  # frozen: in no group at all


def test_weight_decay_groups_beit():
    """unilm BEiT's get_parameter_groups: no decay on 1-D, *.bias and no_weight_decay() names only."""
    from mimfast.models import beit_tiny_patch16_224_8k_vocab

    m = beit_tiny_patch16_224_8k_vocab(img_size=32, patch_size=8, depth=1)
    no_decay, decay = param_groups_weight_decay(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    dn = {names[id(p)] for p in decay["params"]}
    assert "cls_token" in nd and "blocks.0.gamma_1" in nd and "blocks.0.attn.q_bias" in nd
    assert {"mask_token", "rel_pos_bias.relative_position_bias_table"} <= dn
    assert nd | dn == set(names.values())


def test_sampler_resumes_mid_epoch_and_splits_ranks():
    s = ResumableSampler(10, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=4)
    assert list(s) == full[4:]
    r0, r1 = ResumableSampler(10, seed=1, rank=0, world_size=2), ResumableSampler(10, seed=1, rank=1, world_size=2)
    for r in (r0, r1):
        r.set_epoch(2)
    assert sorted(list(r0) + list(r1)) == sorted(full)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 16), color=(10, 200, 30)).save(tmp_path / cls / "good.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    ds = ImageFiles(tmp_path)
    assert ds.classes == ["a", "b"] and len(ds) == 3
    with pytest.warns(UserWarning, match="unreadable"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 1
    assert all(img.shape == (3, 16, 20) and img.dtype == torch.uint8 for img, _ in items)


def test_seeded_transform_depends_on_epoch_and_index_only():
    from mimfast.data.builtin import ShapesDataset
    from mimfast.train.pretrain import mae_transform

    ds = SeededTransform(ShapesDataset(8, img_size=32), mae_transform(32), seed=5)
    torch.manual_seed(0)
    a = ds[(1, 3)][0]
    torch.rand(100)  # global RNG state must not matter
    assert torch.equal(ds[(1, 3)][0], a)
    assert not torch.equal(ds[(2, 3)][0], a)


def test_loss_goes_down_and_files_are_written(tmp_path):
    summary = pretrain(_cfg(tmp_path, builtin_size=64, epochs=4, vis_every=2))
    assert summary["status"] == "done" and summary["steps"] == 32
    assert summary["last_loss"] < summary["first_loss"]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"checkpoint-last.pth", "checkpoint-000032.pth", "log.jsonl", "reconstruction.png",
            "reconstruction-epoch002.png", "summary.json", "config.json"} <= names
    ckpt = load_checkpoint(tmp_path / "checkpoint-last.pth")
    assert ckpt["step"] == 32 and set(ckpt) >= {"model", "optimizer", "scaler", "epoch", "rng"}
    assert set(load_model_weights(tmp_path / "checkpoint-last.pth")) == set(ckpt["model"])


def _logged(out):
    """(step, loss) of every record of a run folder's log.jsonl, in the order written (runs
    resumed in the same folder append to it)."""
    return [(r["step"], r["loss"]) for r in map(json.loads, open(out / "log.jsonl"))]


def test_exact_resume_mid_epoch(tmp_path):
    """A run stopped mid-epoch and resumed ends with the uninterrupted run's weights, having run
    only the steps after its checkpoint (a run that started over would end there too)."""
    full = _cfg(tmp_path / "full", save_every=3)
    pretrain(full)
    straight = _logged(tmp_path / "full")
    assert [s for s, _ in straight] == list(range(1, 9))
    part = _cfg(tmp_path / "part", save_every=3, max_steps=6)  # 4 steps an epoch: stops mid-epoch 1
    assert pretrain(part)["steps"] == 6
    # resume from the step-3 checkpoint (as if killed after it), then to the end
    resumed = _cfg(tmp_path / "part", save_every=3, resume=str(tmp_path / "part" / "checkpoint-000003.pth"))
    assert pretrain(resumed)["steps"] == 8
    # steps 4 to 8 again (from step 3's state, mid-epoch 0), each with the straight run's loss
    assert _logged(tmp_path / "part") == straight[:6] + straight[3:]
    a = load_checkpoint(tmp_path / "full" / "checkpoint-last.pth")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint-last.pth")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and auto-resume from the output folder: from step 8, the third epoch only
    again = _cfg(tmp_path / "part", save_every=3, resume="auto", epochs=3)
    assert pretrain(again)["steps"] == 12
    assert [s for s, _ in _logged(tmp_path / "part")[11:]] == [9, 10, 11, 12]


def test_resume_on_a_changed_dataset_says_so(tmp_path, capsys):
    """Checkpoints record the dataset's size; a resume over a folder that gained or lost images
    (its epoch order is drawn over the new list) warns, and one over the same data does not."""
    pretrain(_cfg(tmp_path, save_every=3, max_steps=3))
    assert load_checkpoint(tmp_path / "checkpoint-last.pth")["dataset_size"] == TINY["builtin_size"]
    capsys.readouterr()
    pretrain(_cfg(tmp_path, save_every=3, max_steps=4, resume="auto"))
    out = capsys.readouterr().out
    assert "dataset of" not in out and "resumed from" in out
    pretrain(_cfg(tmp_path, save_every=3, max_steps=5, resume="auto", builtin_size=40))
    out = capsys.readouterr().out
    assert "dataset of 32 images and this run's has 40" in out and "resumed from" in out
    assert dataset_change_notice({"epoch": 1}, 40) is None  # older checkpoints record no size


def test_nonfinite_losses_stop_the_run(tmp_path):
    summary = pretrain(_cfg(tmp_path, lr=1e30, warmup_epochs=0, max_nonfinite=2, epochs=4))
    # weights of ~1e30 after the first step overflow the activations: every later loss is NaN
    assert summary["status"].startswith("stopped") and summary["nonfinite_steps"] == 2
    assert summary["steps"] == 3


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_process_gloo_ddp_equals_one_process(tmp_path, fsdp):
    # both on the CPU (fp32): on a GPU machine the one-process run would default to cuda and bf16
    one = _cfg(tmp_path / "one", batch_size=8, epochs=1, device="cpu")
    pretrain(one)
    values = dict(TINY, batch_size=4, epochs=1, device="cpu", fsdp=fsdp, vis_every=1)
    pretrain_processes(2, tmp_path / "two", values)
    assert_same_training(tmp_path / "one", tmp_path / "two", steps=4)


def test_gpu_pipeline_needs_cuda(tmp_path):
    # asked for on the CPU (also on a machine that has CUDA)
    with pytest.raises(SystemExit, match="CUDA"):
        pretrain(_cfg(tmp_path, gpu_pipeline=True, device="cpu"))


def test_gpu_pipeline_cpu_decode_flag():
    from mimfast.train.config import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--gpu-pipeline", "--gpu-pipeline-cpu-decode", "0.3"]))
    assert cfg.gpu_pipeline and cfg.gpu_pipeline_cpu_decode == 0.3
    with pytest.raises(SystemExit, match=r"--gpu-pipeline-cpu-decode must be in \[0, 1\]"):
        config_from_args(build_parser().parse_args(["--gpu-pipeline", "--gpu-pipeline-cpu-decode", "1.5"]))
    with pytest.raises(SystemExit, match="add --gpu-pipeline"):
        config_from_args(build_parser().parse_args(["--gpu-pipeline-cpu-decode", "0.3"]))
    cfg = config_from_args(build_parser().parse_args(["--gpu-pipeline", "--gpu-pipeline-adaptive-decode"]))
    assert cfg.gpu_pipeline_adaptive_decode
    with pytest.raises(SystemExit, match="adaptive-decode adjusts"):
        config_from_args(build_parser().parse_args(["--gpu-pipeline-adaptive-decode"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU input pipeline needs CUDA")
@pytest.mark.parametrize("cpu_decode,adaptive", [(0.0, False), (0.5, False), (0.0, True)])
def test_gpu_pipeline_pretrains(tmp_path, cpu_decode, adaptive):
    summary = pretrain(_cfg(tmp_path, gpu_pipeline=True, kernels="auto", builtin_size=64, epochs=2,
                            num_workers=2, gpu_pipeline_cpu_decode=cpu_decode,
                            gpu_pipeline_adaptive_decode=adaptive))
    assert summary["status"] == "done" and summary["steps"] == 16
    assert math.isfinite(summary["last_loss"])


def test_keyed_noise_is_a_function_of_the_sample():
    from mimfast.train.pretrain import _keyed_noise

    a = _keyed_noise(0, [1, 1, 2], [5, 6, 5], 16)
    b = _keyed_noise(0, [2, 1], [5, 6], 16)
    assert torch.equal(a[2], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], a[2])


def test_compile_flag_compiles_the_model(tmp_path, monkeypatch):
    seen = []

    def fake_compile(model, **kw):
        seen.append((model, kw))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    summary = pretrain(_cfg(tmp_path, compile=True, compile_mode="max-autotune", epochs=1))
    assert summary["status"] == "done" and len(seen) == 1
    from mimfast.models import MaskedAutoencoderViT

    model, kw = seen[0]  # the training model itself (one process: no DDP wrapper), in the mode asked for
    assert isinstance(model, MaskedAutoencoderViT) and kw.get("mode") == "max-autotune"


def test_mae_picture_from_the_gpu_pipeline_dataset(tmp_path):
    """With --gpu-pipeline the dataset holds encoded images: the picture augments them as the
    loader does (the augment kernel runs under the interpreter on the CPU)."""
    from mimfast.data.builtin import ShapesDataset
    from mimfast.data.gpu_pipeline import EncodedImages
    from mimfast.train.pretrain import MAETask

    cfg = _cfg(tmp_path, kernels="auto")
    task = MAETask(cfg, torch.device("cpu"))
    model = task.build_model()
    dataset = EncodedImages(ShapesDataset(3, img_size=model.img_size))
    task.picture(model, dataset, tmp_path / "gpu.png")
    assert (tmp_path / "gpu.png").is_file()
    assert task.vis_imgs.shape == (3, 3, model.img_size, model.img_size)
