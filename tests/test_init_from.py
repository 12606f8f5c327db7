"""``--init-from`` (:func:`mimfast.train.pretrained.init_from_checkpoint`): the encoder must fit,
heads load where they fit.

- DDP / torch.compile prefixes are taken off; an encoder-only file (an official MAE release)
  loads with the decoder kept as initialised, and says which keys were kept.
- A file of another architecture is an error that names the keys and, when the file says which
  model it is (a mimfast config, or one read from a SimMIM / MMPretrain / HF file), that model;
  before, ``load_state_dict(strict=False)`` took what matched and left the rest random.
- A BEiT file with another vocabulary loads the encoder and keeps the run's LM head.
- Through ``pretrain``: the error is a SystemExit naming ``--init-from``.
- Official training checkpoints name their model in their pickled ``args``
  (:func:`mimfast.train.pretrained.read_checkpoint_config`), so export and linprobe need no --model.
"""

from __future__ import annotations

import pytest
import torch

from mimfast.models import create_model
from mimfast.train.pretrained import init_from_checkpoint

MAE = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32, decoder_depth=1,
           decoder_num_heads=4, kernels="eager")
BEIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, vocab_size=64, kernels="eager")


def _mae(seed, **kw):
    torch.manual_seed(seed)
    return create_model("mae_vit_tiny_patch16", **{**MAE, **kw})


def _same(a: dict, b: dict, keys):
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_prefixed_and_encoder_only_files(tmp_path):
    source, run = _mae(1), _mae(2)
    src = source.state_dict()
    torch.save({"model": {"module._orig_mod." + k: v for k, v in src.items()}}, tmp_path / "ddp.pth")
    fresh, unused = init_from_checkpoint(run, tmp_path / "ddp.pth", "mae_vit_tiny_patch16")
    assert fresh == [] and unused == []
    _same(run.state_dict(), src, src)

    encoder = {k: v for k, v in src.items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": encoder}, tmp_path / "release.pth")  # as facebookresearch/mae's released weights
    run = _mae(2)
    before = {k: v.clone() for k, v in run.state_dict().items()}
    fresh, unused = init_from_checkpoint(run, tmp_path / "release.pth")
    assert unused == [] and set(fresh) == set(src) - set(encoder) and "decoder_pred.weight" in fresh
    after = run.state_dict()
    _same(after, src, encoder)
    _same(after, before, fresh)
    # a timm VisionTransformer's weights (its classifier head is not used)
    torch.save({**encoder, "head.weight": torch.zeros(10, 48), "head.bias": torch.zeros(10)}, tmp_path / "timm.pth")
    fresh, unused = init_from_checkpoint(_mae(3), tmp_path / "timm.pth")
    assert unused == ["head.weight", "head.bias"] and "decoder_pred.weight" in fresh


def test_another_architecture_is_an_error_naming_keys_and_the_files_model(tmp_path):
    deeper = _mae(1, depth=3)
    torch.save({"model": deeper.state_dict()}, tmp_path / "bare.pth")
    run = _mae(2)
    before = {k: v.clone() for k, v in run.state_dict().items()}
    with pytest.raises(ValueError, match=r"unexpected \['blocks\.2\."):
        init_from_checkpoint(run, tmp_path / "bare.pth", "mae_vit_tiny_patch16")
    _same(run.state_dict(), before, before)  # nothing was loaded
    wider = _mae(1, embed_dim=96, num_heads=6)
    config = {"method": "mae", "model": "mae_vit_tiny_patch16", "img_size": 32, "patch_size": 8,
              "model_kwargs": {k: v for k, v in MAE.items() if k not in ("img_size", "patch_size", "kernels")}
              | {"embed_dim": 96, "num_heads": 6}}
    torch.save({"model": wider.state_dict(), "config": config}, tmp_path / "mimfast.pth")
    with pytest.raises(ValueError, match=r"shape mismatch \['cls_token: \(1, 1, 96\) vs model \(1, 1, 48\)'.*"
                                         r"'embed_dim': 96"):
        init_from_checkpoint(run, tmp_path / "mimfast.pth")
    # a MAE file for a BEiT run: BEiT's encoder keys are missing
    beit = create_model("beit_tiny_patch16_224_8k_vocab", **BEIT)
    with pytest.raises(ValueError, match=r"missing \[.*rel_pos_bias"):
        init_from_checkpoint(beit, tmp_path / "bare.pth")


def test_beit_with_another_vocabulary_keeps_the_runs_head(tmp_path):
    torch.manual_seed(1)
    source = create_model("beit_tiny_patch16_224_8k_vocab", **{**BEIT, "vocab_size": 32})
    torch.manual_seed(2)
    run = create_model("beit_tiny_patch16_224_8k_vocab", **BEIT)
    head = run.lm_head.weight.detach().clone()
    torch.save({"model": source.state_dict()}, tmp_path / "beit.pth")
    fresh, unused = init_from_checkpoint(run, tmp_path / "beit.pth")
    assert set(fresh) == {"lm_head.weight", "lm_head.bias"} == set(unused)
    torch.testing.assert_close(run.lm_head.weight, head, rtol=0, atol=0)
    src = source.state_dict()
    _same(run.state_dict(), src, [k for k in src if not k.startswith("lm_head.")])


def test_pretrain_refuses_a_file_that_does_not_fit(tmp_path, capsys):
    from mimfast.train.config import PretrainConfig
    from mimfast.train.pretrain import pretrain

    torch.save({"model": _mae(1, depth=3).state_dict()}, tmp_path / "deeper.pth")
    cfg = PretrainConfig(model="mae_vit_tiny_patch16", img_size=32, patch_size=8,
                         model_kwargs={k: v for k, v in MAE.items() if k not in ("img_size", "patch_size", "kernels")},
                         kernels="eager", data="builtin", builtin_size=8, batch_size=4, epochs=1, max_steps=1,
                         warmup_epochs=0, num_workers=0, vis_every=0, tensorboard=False,
                         output_dir=str(tmp_path / "run"), init_from=str(tmp_path / "deeper.pth"), device="cpu")
    with pytest.raises(SystemExit, match=r"--init-from: .*deeper\.pth does not fit model 'mae_vit_tiny_patch16'"):
        pretrain(cfg)
    torch.save({"model": {k: v for k, v in _mae(1).state_dict().items() if not k.startswith("decoder_")}},
               tmp_path / "encoder.pth")
    pretrain(PretrainConfig(**{**cfg.__dict__, "init_from": str(tmp_path / "encoder.pth")}))
    out = capsys.readouterr().out
    assert "unexpected 0): kept as initialised ['decoder_" in out


# --- official training checkpoints name their model in the pickled args


def test_official_args_name_the_model(tmp_path):
    """facebookresearch/mae's and microsoft/unilm BEiT's training checkpoints pickle their argparse
    args beside the weights: their ``model`` (mimfast uses the same names), ``input_size`` and, for
    BEiT, the arguments ``get_model`` passes rebuild the model without --model."""
    import argparse

    from mimfast.train.pretrained import load_pretrained_model, read_checkpoint_config

    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch16", kernels="eager")  # the named model's own sizes
    args = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=224, mask_ratio=0.6, norm_pix_loss=False,
                              blr=1.5e-4, output_dir="./output_dir")
    torch.save({"model": mae.state_dict(), "epoch": 3, "args": args}, tmp_path / "checkpoint-3.pth")
    cfg = read_checkpoint_config(tmp_path / "checkpoint-3.pth")
    assert cfg == {"method": "mae", "model": "mae_vit_tiny_patch16", "source": "official args", "img_size": 224,
                   "norm_pix_loss": False, "mask_ratio": 0.6}
    loaded = load_pretrained_model(tmp_path / "checkpoint-3.pth", kernels="eager")  # no --model
    assert loaded.norm_pix_loss is False
    _same(loaded.state_dict(), mae.state_dict(), mae.state_dict())

    beit_args = argparse.Namespace(model="beit_tiny_patch16_224_8k_vocab", rel_pos_bias=False, abs_pos_emb=True,
                                   layer_scale_init_value=0.0, num_mask_patches=60, input_size=224, drop_path=0.1,
                                   window_size=(14, 14), patch_size=(16, 16))
    cfg = read_checkpoint_config(_saved(tmp_path / "beit.pth", beit_args))
    assert cfg["model_kwargs"] == {"use_shared_rel_pos_bias": False, "use_abs_pos_emb": True, "init_values": 0.0}
    assert (cfg["method"], cfg["num_mask_patches"], cfg["drop_path"]) == ("beit", 60, 0.1)
    # a model name mimfast does not have, or no args: nothing is claimed
    assert read_checkpoint_config(_saved(tmp_path / "deit.pth", argparse.Namespace(model="deit_base"))) is None
    assert read_checkpoint_config(_saved(tmp_path / "bare.pth", None)) is None


def _saved(path, args):
    torch.save({"model": {"w": torch.zeros(1)}, **({"args": args} if args is not None else {})}, path)
    return path


# --- a run that names no model takes the one the --init-from file holds


def _parse(*argv):
    from mimfast.train.config import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(list(argv)))


RUN = ("--data", "builtin", "--builtin-size", "8", "--batch-size", "4", "--epochs", "1", "--max-steps", "1",
       "--warmup-epochs", "0", "--num-workers", "0", "--kernels", "eager", "--vis-every", "0", "--no-tensorboard",
       "--device", "cpu", "--lr", "0")


def test_a_run_without_a_model_takes_the_files(tmp_path, monkeypatch):
    import argparse

    from test_simmim_audit import _model_and_batch
    from test_simmim_checkpoint import _simmim_file

    from mimfast.train.checkpoint import load_checkpoint
    from mimfast.train.pretrain import pretrain

    # official MAE args: the model, its input size and the loss settings it was trained with
    mae = create_model("mae_vit_tiny_patch16", kernels="eager")
    args = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=224, mask_ratio=0.6, norm_pix_loss=False)
    torch.save({"model": mae.state_dict(), "args": args}, tmp_path / "official.pth")
    cfg = _parse("--init-from", str(tmp_path / "official.pth"), "--data", "builtin")
    assert (cfg.recipe, cfg.model, cfg.img_size, cfg.norm_pix_loss, cfg.mask_ratio) == (
        "mae", "mae_vit_tiny_patch16", 224, False, 0.6)
    assert cfg.blr == 1.5e-4 and cfg.warmup_epochs == 40  # the rest is the recipe's
    # naming a model (or a preset, recipe, method, model_kwargs or size) keeps the run's own
    assert _parse("--init-from", str(tmp_path / "official.pth"), "--model", "mae_vit_base_patch16").mask_ratio == 0.75
    yml = tmp_path / "run.yaml"
    yml.write_text("model_kwargs: {depth: 2}\n")
    assert _parse("--config", str(yml), "--init-from", str(tmp_path / "official.pth")).model == "mae_vit_base_patch16"

    # a SimMIM checkpoint: SimMIM's recipe on the pixel model of the file's sizes, trained from its weights
    model, _, _ = _model_and_batch(torch.float32)
    path = _simmim_file(tmp_path, monkeypatch, model)
    cfg = _parse("--init-from", str(path), *RUN, "--lr-milestones", "1", "--output-dir", str(tmp_path / "run"))
    assert (cfg.recipe, cfg.method, cfg.img_size, cfg.patch_size, cfg.pixel_masks, cfg.mask_patch_size) == (
        "simmim", "beit", 64, 8, "simmim", 16)
    assert cfg.model_kwargs["embed_dim"] == 48 and cfg.lr_schedule == "multistep"
    pretrain(cfg)
    trained = load_checkpoint(tmp_path / "run" / "checkpoint-last.pth")["model"]
    for k, v in model.state_dict().items():  # lr 0: the weights as loaded
        torch.testing.assert_close(trained[k], v, rtol=0, atol=0, msg=k)
    # `mimfast pretrain --init-from FILE` alone is not the quickstart's tiny preset: it is the file's model
    import mimfast.cli as cli
    import mimfast.train.pretrain as tp

    seen = []
    monkeypatch.setattr(tp, "pretrain", lambda cfg: seen.append(cfg) or {"status": "done"})
    assert cli.main(["pretrain", "--init-from", str(tmp_path / "official.pth")]) == 0
    assert (seen[-1].preset, seen[-1].model, seen[-1].data) == (None, "mae_vit_tiny_patch16", "builtin")
