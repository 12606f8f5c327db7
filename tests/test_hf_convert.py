"""Hugging Face transformers interop: HF ViTMAEForPreTraining / BeitForMaskedImageModeling
checkpoints in (``load_model_weights``, ``--init-from``) and out (``mimfast export --format hf``).

Small HF models with random weights, built from configs (no network); eager kernels and HF's
eager attention, so the two sides compute the same fp32 math and agree to rounding.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimfast.cli import main  # noqa: E402
from mimfast.models import beit_tiny_patch16_224_8k_vocab, mae_vit_tiny_patch16  # noqa: E402
from mimfast.models.hf import (  # noqa: E402
    beit_from_hf,
    beit_to_hf,
    hf_config_for,
    is_hf_state_dict,
    mae_from_hf,
    mae_to_hf,
    state_dict_layout,
)
from mimfast.train.checkpoint import load_model_weights  # noqa: E402
from mimfast.train.export import export_hf  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)
SIZES = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
MAE_KW = dict(SIZES, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
MAE_MODEL_KWARGS = {k: v for k, v in MAE_KW.items() if k not in ("img_size", "patch_size")}  # a run config's


def _hf_mae(norm_pix_loss=True, **over):
    cfg = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=256, decoder_hidden_size=32, decoder_num_hidden_layers=2,
               decoder_num_attention_heads=4, decoder_intermediate_size=128, layer_norm_eps=1e-6,
               norm_pix_loss=norm_pix_loss, mask_ratio=0.75)
    cfg.update(over)
    return _perturbed(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**cfg)))


def _hf_beit(**over):
    cfg = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=256, vocab_size=50, use_mask_token=True, use_shared_relative_position_bias=True,
               layer_norm_eps=1e-6, drop_path_rate=0.0, layer_scale_init_value=0.1)
    cfg.update(over)
    return _perturbed(transformers.BeitForMaskedImageModeling(transformers.BeitConfig(**cfg)))


def _perturbed(model):
    """Every weight off its init, fixed position embeddings included (LayerNorms at 1/0, zero
    tables or tokens would hide a swapped mapping). Eager attention, eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.1)
    if hasattr(model, "set_attn_implementation"):  # an HF model
        model.set_attn_implementation("eager")
    return model.eval()


def _mimfast_mae(norm_pix_loss=True):
    return mae_vit_tiny_patch16(**MAE_KW, norm_pix_loss=norm_pix_loss, kernels="eager").eval()


def _mimfast_beit():
    return beit_tiny_patch16_224_8k_vocab(**SIZES, vocab_size=50, kernels="eager").eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g)
    noise = torch.rand(2, 16, generator=g)
    bool_masked_pos = torch.rand(2, 16, generator=g) < 0.4
    return x, noise, bool_masked_pos


def _grads(model):
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- MAE


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_from_hf_same_loss_pred_mask_and_gradients(norm_pix_loss):
    hf = _hf_mae(norm_pix_loss)
    ours = _mimfast_mae(norm_pix_loss)
    assert is_hf_state_dict(hf.state_dict()) and state_dict_layout(hf.state_dict()) == "hf_mae"
    ours.load_state_dict(mae_from_hf(hf.state_dict()), strict=True)
    x, noise, _ = _inputs()
    out = hf(pixel_values=x, noise=noise)
    loss, pred, mask = ours(x, 0.75, noise)
    torch.testing.assert_close(loss, out.loss, **TOL)
    torch.testing.assert_close(pred, out.logits, **TOL)
    assert torch.equal(mask, out.mask)
    out.loss.backward()
    loss.backward()
    hf_grads = mae_from_hf(_grads(hf))
    ours_grads = _grads(ours)
    assert set(hf_grads) == set(ours_grads)  # every trained parameter, fixed pos embeds on neither
    for k, g in ours_grads.items():
        torch.testing.assert_close(g, hf_grads[k], **TOL, msg=k)


def test_mae_round_trip_is_identity_in_both_key_generations():
    ours = _perturbed(_mimfast_mae())
    sd = ours.state_dict()
    hf_keys = set(_hf_mae().state_dict())
    for legacy in (False, True):
        hf_sd = mae_to_hf(sd, legacy=legacy)
        if not legacy:
            assert set(hf_sd) == hf_keys
        else:
            assert any(".encoder.layer.0.attention.attention.query." in k for k in hf_sd)
        back = mae_from_hf(hf_sd)
        assert back.keys() == sd.keys()
        for k in sd:
            assert torch.equal(back[k], sd[k]), k


def test_hf_sincos_layout_is_the_official_one():
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    from mimfast.models.pos_embed import get_2d_sincos_pos_embed

    pe = build_2d_sinusoidal_position_embedding(4, 4, embed_dim=64, cls_token=True)
    pe = torch.cat([pe[..., 32:], pe[..., :32]], dim=-1)  # HF's rotation to the released layout
    ref = torch.from_numpy(get_2d_sincos_pos_embed(64, (4, 4), cls_token=True)).float()
    torch.testing.assert_close(pe, ref, atol=1e-6, rtol=0)


def test_mae_export_hf_loads_with_from_pretrained_and_gives_the_same_outputs(tmp_path, capsys):
    ours = _perturbed(_mimfast_mae(norm_pix_loss=True))
    cfg = {"model": "mae_vit_tiny_patch16", "img_size": 32, "patch_size": 8, "method": "mae", "mask_ratio": 0.5,
           "norm_pix_loss": True, "model_kwargs": MAE_MODEL_KWARGS}
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": ours.state_dict(), "config": cfg}, ckpt)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "ViTMAEForPreTraining.from_pretrained" in capsys.readouterr().out
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["layer_norm_eps"] == 1e-6 and written["mask_ratio"] == 0.5 and written["norm_pix_loss"]
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x, _, _ = _inputs(2)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    out = hf(pixel_values=x, noise=noise)
    loss, pred, mask = ours(x, 0.5, noise)
    torch.testing.assert_close(loss, out.loss, **TOL)
    torch.testing.assert_close(pred, out.logits, **TOL)
    assert torch.equal(mask, out.mask)
    # the export holds the file key names (transformers 4's); transformers 5's module names load too
    from safetensors.torch import load_file

    written_keys = load_file(tmp_path / "hf" / "model.safetensors")
    assert any(".encoder.layer.0.attention.attention.query." in k for k in written_keys)
    export_hf(ckpt, tmp_path / "hf5", legacy=False)
    hf5 = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf5", attn_implementation="eager").eval()
    torch.testing.assert_close(hf5(pixel_values=x, noise=noise).logits, out.logits, atol=0, rtol=0)
    back = load_model_weights(tmp_path / "hf5")
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


# --------------------------------------------------------------------------- BEiT


def test_beit_from_hf_same_loss_logits_and_gradients():
    hf = _hf_beit()
    ours = _mimfast_beit()
    assert state_dict_layout(hf.state_dict()) == "hf_beit"
    ours.load_state_dict(beit_from_hf(hf.state_dict()), strict=True)
    x, _, bool_masked_pos = _inputs()
    labels = torch.randint(0, 50, (int(bool_masked_pos.sum()),), generator=torch.Generator().manual_seed(4))
    out = hf(pixel_values=x, bool_masked_pos=bool_masked_pos, labels=labels)
    loss = ours(x, bool_masked_pos, labels)
    torch.testing.assert_close(loss, out.loss, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, bool_masked_pos), out.logits[bool_masked_pos], **TOL)
    out.loss.backward()
    loss.backward()
    hf_grads = beit_from_hf(_grads(hf))
    ours_grads = _grads(ours)
    assert set(hf_grads) - {k for k in hf_grads if k.endswith("relative_position_index")} == set(ours_grads)
    for k, g in ours_grads.items():
        torch.testing.assert_close(g, hf_grads[k], **TOL, msg=k)


def test_beit_round_trip_and_export(tmp_path):
    ours = _perturbed(_mimfast_beit())
    sd = ours.state_dict()
    assert set(beit_to_hf(sd)) == set(_hf_beit().state_dict())
    for legacy in (False, True):
        back = beit_from_hf(beit_to_hf(sd, legacy=legacy))
        assert back.keys() == sd.keys()
        for k in sd:
            assert torch.equal(back[k], sd[k]), k
    cfg = {"model": "beit_tiny_patch16_224_8k_vocab", "img_size": 32, "patch_size": 8, "method": "beit",
           "drop_path": 0.1, "model_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 4}}
    ckpt = tmp_path / "beit.pth"
    torch.save({"model": sd, "config": cfg}, ckpt)  # vocab 50: read from lm_head, not the config
    export_hf(ckpt, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (written["vocab_size"], written["use_mean_pooling"], written["drop_path_rate"]) == (50, True, 0.1)
    hf = transformers.BeitForMaskedImageModeling.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x, _, bool_masked_pos = _inputs(5)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x, bool_masked_pos=bool_masked_pos).logits,
                                   ours(x, bool_masked_pos, return_all_tokens=True), **TOL)


# --------------------------------------------------------------------------- loading, --init-from


def test_load_model_weights_reads_hf_folders_safetensors_and_bin(tmp_path):
    from safetensors.torch import save_file

    hf = _hf_mae()
    expected = mae_from_hf(hf.state_dict())
    hf.save_pretrained(tmp_path / "st")
    hf.save_pretrained(tmp_path / "shards", max_shard_size="100KB")  # model-0000x-of-0000y + index
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    encoder_only = {k[len("vit."):]: v.contiguous() for k, v in hf.state_dict().items() if k.startswith("vit.")}
    save_file(encoder_only, str(tmp_path / "vitmaemodel.safetensors"))  # ViTMAEModel keys: no "vit."
    for path in (tmp_path / "st", tmp_path / "shards", tmp_path / "bin"):
        sd = load_model_weights(path)
        assert sd.keys() == expected.keys()
        for k in sd:
            assert torch.equal(sd[k], expected[k]), (path, k)
    enc = load_model_weights(tmp_path / "vitmaemodel.safetensors")
    assert set(enc) == {k for k in expected if not k.startswith(("decoder", "mask_token"))}
    # an HF config with HF's default eps, and a model built from a config (zero sin-cos tables)
    fresh = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=256, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
        decoder_intermediate_size=128))
    fresh.save_pretrained(tmp_path / "fresh")
    with pytest.warns(UserWarning) as record:
        load_model_weights(tmp_path / "fresh")
    messages = " ".join(str(w.message) for w in record)
    assert "layer_norm_eps=1e-12" in messages
    if not bool(torch.any(fresh.vit.embeddings.position_embeddings != 0)):
        assert "pos_embed is all zeros" in messages
    beit = _hf_beit()
    beit.save_pretrained(tmp_path / "beit")
    ours = _mimfast_beit()
    ours.load_state_dict(load_model_weights(tmp_path / "beit"), strict=True)


def test_pretrain_init_from_an_hf_folder_through_the_cli(tmp_path, capsys):
    hf = _hf_mae(norm_pix_loss=True)
    hf.save_pretrained(tmp_path / "hf")
    yml = tmp_path / "run.yaml"
    yml.write_text(json.dumps({
        "model": "mae_vit_tiny_patch16", "img_size": 32, "patch_size": 8,
        "model_kwargs": MAE_MODEL_KWARGS,
        "data": "builtin", "builtin_size": 8, "batch_size": 4, "epochs": 1, "max_steps": 1, "warmup_epochs": 0,
        "num_workers": 0, "kernels": "eager", "vis_every": 0, "tensorboard": False, "log_every": 1,
        "init_from": str(tmp_path / "hf"), "output_dir": str(tmp_path / "run"), "lr": 0.0,
    }))
    assert main(["pretrain", "--config", str(yml)]) in (0, None)
    assert "(missing 0, unexpected 0)" in capsys.readouterr().out
    trained = load_model_weights(tmp_path / "run" / "checkpoint-last.pth")
    expected = mae_from_hf(hf.state_dict())
    assert trained.keys() == expected.keys()
    for k in expected:  # lr 0: every tensor, the fixed position embeddings too, as loaded
        torch.testing.assert_close(trained[k], expected[k], rtol=0, atol=0, msg=k)


# --------------------------------------------------------------------------- errors


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="neither an HF"):
        state_dict_layout({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="not an official MAE"):
        mae_to_hf(_hf_mae().state_dict())
    with pytest.raises(ValueError, match="not an HF BEiT"):
        beit_from_hf(_mimfast_beit().state_dict())
    with pytest.raises(ValueError, match="unknown HF ViTMAE key 'vit.pooler.dense.weight'"):
        mae_from_hf({**_hf_mae().state_dict(), "vit.pooler.dense.weight": torch.zeros(2, 2)})
    # two LayerNorms before lm_head (use_mean_pooling=False) have no official counterpart
    with pytest.raises(ValueError, match="use_mean_pooling=False"):
        beit_from_hf(_hf_beit(use_mean_pooling=False).state_dict())
    sd = _hf_beit().state_dict()
    sd["beit.layers.0.attention.k_proj.bias"] = torch.ones(64)
    with pytest.raises(ValueError, match="non-zero key bias"):
        beit_from_hf(sd)
    # an HF folder of another model type, or without weights
    (tmp_path / "swin").mkdir()
    (tmp_path / "swin" / "config.json").write_text(json.dumps({"model_type": "swin"}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "swin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="model_type is 'swin'"):
        load_model_weights(tmp_path / "swin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_model_weights(tmp_path / "empty")
    # sizes that do not fit: loading into a model of another width, exporting against another model
    hf = _hf_mae(hidden_size=32)
    hf.save_pretrained(tmp_path / "narrow")
    with pytest.raises(RuntimeError, match="size mismatch"):
        _mimfast_mae().load_state_dict(load_model_weights(tmp_path / "narrow"), strict=False)
    ckpt = tmp_path / "ck.pth"
    torch.save({"model": _mimfast_mae().state_dict()}, ckpt)
    with pytest.raises(SystemExit, match="does not fit model 'mae_vit_base_patch16'"):
        main(["export", str(ckpt), "--out", str(tmp_path / "o"), "--format", "hf", "--model", "mae_vit_base_patch16"])
    enc_only = tmp_path / "enc.pth"
    encoder = {k: v for k, v in _mimfast_mae().state_dict().items() if not k.startswith(("decoder", "mask"))}
    torch.save({"model": encoder, "config": {"model": "mae_vit_tiny_patch16", "img_size": 32, "patch_size": 8,
                                             "model_kwargs": MAE_MODEL_KWARGS}},
               enc_only)
    with pytest.raises(SystemExit, match="encoder-only"):
        main(["export", str(enc_only), "--out", str(tmp_path / "o"), "--format", "hf"])
    # HF has no class for the L1 MAE loss nor for BEiT's pixel variant
    with pytest.raises(ValueError, match="MSE"):
        hf_config_for(mae_vit_tiny_patch16(**MAE_KW, loss="l1", kernels="eager"))
