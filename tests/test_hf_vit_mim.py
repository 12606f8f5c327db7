"""Hugging Face ``ViTForMaskedImageModeling`` (SimMIM with a plain ViT, transformers'
``run_mim.py``) checkpoints in and out of mimfast's pixel model (:mod:`mimfast.models.hf`).

Tiny HF models with random weights, built from configs (no network). The comparisons run in
float64 with HF's ``sdpa`` attention: its ``eager`` attention takes the softmax in float32 even
for float64 inputs, SDPA computes in the input's dtype, so both sides do the same float64 math.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimfast import ops  # noqa: E402
from mimfast.cli import main  # noqa: E402
from mimfast.models.beit import beit_tiny_patch16_224_pixel  # noqa: E402
from mimfast.models.hf import hf_config_for, state_dict_layout  # noqa: E402
from mimfast.models.hf_vit import vit_mim_from_hf, vit_mim_model_config, vit_mim_to_hf  # noqa: E402
from mimfast.train.checkpoint import load_model_weights  # noqa: E402
from mimfast.train.export import export_hf  # noqa: E402
from mimfast.train.pretrained import (  # noqa: E402
    build_model_from_config,
    load_pretrained_model,
    read_checkpoint_config,
)

TOL64 = dict(rtol=1e-10, atol=1e-12)
HF_CFG = dict(image_size=32, patch_size=8, encoder_stride=8, hidden_size=48, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=96, layer_norm_eps=1e-6)
# the mimfast run config of the same network: the pixel model with the plain-ViT settings
PLAIN_VIT = dict(use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=False, init_values=None)
RUN_CFG = {"method": "beit", "model": "beit_tiny_patch16_224_pixel", "img_size": 32, "patch_size": 8,
           "pixel_loss": "l1", "norm_pix_loss": False,
           "model_kwargs": dict(embed_dim=48, depth=2, num_heads=4, mlp_ratio=2, **PLAIN_VIT)}


def _perturbed(model):
    """Every weight off its init (mask token, LayerNorms, key biases included)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.1)
    return model.eval()


def _hf(**over):
    model = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**{**HF_CFG, **over}))
    model.set_attn_implementation("sdpa")
    return _perturbed(model)


def _ours():
    return _perturbed(beit_tiny_patch16_224_pixel(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                                                  mlp_ratio=2, **PLAIN_VIT, kernels="eager"))


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    bool_masked_pos = torch.rand(2, 16, generator=g) < 0.5
    return x, bool_masked_pos


def _hf_loss_of(ours_loss, bool_masked_pos, patch=8):
    """mimfast's loss as HF computes it: HF divides by (masked pixels + 1e-5), the 1e-5 added to
    the integer count in float32 (where it vanishes for counts >= 256, as here)."""
    count = int(bool_masked_pos.sum()) * patch * patch
    return ours_loss * count / float(torch.tensor(count, dtype=torch.float32) + 1e-5)


def _compare(hf, ours):
    """HF and mimfast, float64, the same batch: loss, reconstruction, every gradient."""
    hf, ours = hf.double(), ours.double()
    x, bool_masked_pos = _batch()
    out = hf(pixel_values=x, bool_masked_pos=bool_masked_pos)
    loss, pred = ours(x, bool_masked_pos)
    torch.testing.assert_close(_hf_loss_of(loss, bool_masked_pos), out.loss, **TOL64)
    torch.testing.assert_close(ops.unpatchify(pred, 8), out.reconstruction, **TOL64)
    out.loss.backward()
    loss.backward()
    hf_grads = vit_mim_from_hf({k: p.grad for k, p in hf.named_parameters()})
    ours_grads = {k: p.grad for k, p in ours.named_parameters()}
    assert set(hf_grads) == set(ours_grads)
    for k, g in ours_grads.items():
        torch.testing.assert_close(g, hf_grads[k], **TOL64, msg=k)


def _file_keys(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_hf_key_names_in_both_generations():
    hf = _hf()
    ours = _ours()
    for sd in (hf.state_dict(), vit_mim_to_hf(ours.state_dict(), legacy=True)):
        assert state_dict_layout(sd) == "hf_vit"
        got = vit_mim_from_hf(sd)
        assert got.keys() == ours.state_dict().keys()
        assert all(got[k].shape == v.shape for k, v in ours.state_dict().items())
    assert set(vit_mim_to_hf(ours.state_dict())) == set(hf.state_dict())  # transformers 5's module names
    legacy = vit_mim_to_hf(ours.state_dict(), legacy=True)
    assert "vit.encoder.layer.1.attention.attention.key.bias" in legacy
    assert "vit.encoder.layer.0.intermediate.dense.weight" in legacy and "decoder.0.weight" in legacy
    back = vit_mim_from_hf(legacy)
    for k, v in ours.state_dict().items():  # the round trip is exact
        assert torch.equal(back[k], v), k
    # ViTForMaskedImageModeling builds its ViTModel without a pooler; a ViTModel's is dropped
    assert not any("pooler" in k for k in hf.state_dict())
    vit_model = transformers.ViTModel(transformers.ViTConfig(**HF_CFG), add_pooling_layer=True, use_mask_token=True)
    enc = vit_mim_from_hf(vit_model.state_dict())
    assert enc.keys() == {k for k in ours.state_dict() if not k.startswith("pixel_head.")}


def test_hf_folder_loads_without_model_and_gives_the_same_loss_reconstruction_and_gradients(tmp_path):
    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")  # transformers 5 writes the older key names
    assert "vit.encoder.layer.0.attention.attention.query.weight" in _file_keys(tmp_path / "hf")
    cfg = read_checkpoint_config(tmp_path / "hf")
    assert cfg["method"] == "beit" and cfg["model"].endswith("_pixel") and cfg["source"] == "hf_vit"
    assert (cfg["img_size"], cfg["patch_size"], cfg["pixel_loss"], cfg["norm_pix_loss"]) == (32, 8, "l1", False)
    assert (cfg["pixel_masks"], cfg["mask_patch_size"], cfg["simmim_mask_ratio"]) == ("simmim", 32, 0.6)
    assert cfg["model_kwargs"] == dict(embed_dim=48, depth=2, num_heads=4, in_chans=3, mlp_ratio=2, qkv_bias=True,
                                       **PLAIN_VIT)
    ours = load_pretrained_model(tmp_path / "hf", kernels="eager")  # no model name: config.json says it
    assert ours.pos_embed is not None and ours.rel_pos_bias is None and ours.blocks[0].gamma_1 is None
    assert ours.loss_type == "l1" and not ours.norm_pix_loss
    # --init-from: the weights fit the model the config rebuilds, every key
    fresh = build_model_from_config(cfg, kernels="eager")
    missing, unexpected = fresh.load_state_dict(load_model_weights(tmp_path / "hf"), strict=False)
    assert not missing and not unexpected
    _compare(hf, ours.eval())


def test_key_bias_changes_nothing_and_gets_no_gradient():
    hf = _hf().double()
    x, bool_masked_pos = _batch()
    keys = [layer.attention.k_proj for layer in hf.vit.layers]
    with torch.no_grad():
        for k in keys:
            k.bias.normal_(0.0, 3.0)  # large: it shifts every logit of a query by the same q . b_k
    out = hf(pixel_values=x, bool_masked_pos=bool_masked_pos)
    out.loss.backward()
    for k in keys:
        assert k.bias.grad.abs().max() < 1e-12 * k.weight.grad.abs().max()
    q_grad = hf.vit.layers[0].attention.q_proj.bias.grad
    assert q_grad.abs().max() > 1e-4  # the other biases do learn
    with torch.no_grad():
        for k in keys:
            k.bias.zero_()
    again = hf(pixel_values=x, bool_masked_pos=bool_masked_pos)
    torch.testing.assert_close(again.loss, out.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(again.reconstruction, out.reconstruction, rtol=0, atol=1e-12)


def test_mimfast_export_hf_loads_with_from_pretrained_and_gives_the_same_outputs(tmp_path, capsys):
    ours = _ours()
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": ours.state_dict(), "config": RUN_CFG}, ckpt)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "ViTForMaskedImageModeling.from_pretrained" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["ViTForMaskedImageModeling"] and config["model_type"] == "vit"
    assert (config["encoder_stride"], config["patch_size"], config["layer_norm_eps"]) == (8, 8, 1e-6)
    hf = transformers.ViTForMaskedImageModeling.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    assert hf.vit.layers[0].attention.k_proj.bias.abs().max() == 0  # written as zeros
    # back into mimfast: the same tensors, and the same model without --model
    back = load_model_weights(tmp_path / "hf")
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k
    assert read_checkpoint_config(tmp_path / "hf")["model_kwargs"]["embed_dim"] == 48
    export_hf(ckpt, tmp_path / "hf5", legacy=False)  # transformers 5's module names load too
    hf5 = transformers.ViTForMaskedImageModeling.from_pretrained(tmp_path / "hf5", attn_implementation="sdpa")
    torch.testing.assert_close(hf5.decoder[0].weight, hf.decoder[0].weight, rtol=0, atol=0)
    _compare(hf, ours)


def test_default_pixel_model_is_refused_for_hf_export(tmp_path):
    default = beit_tiny_patch16_224_pixel(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4,
                                          kernels="eager")
    ckpt = tmp_path / "checkpoint-last.pth"
    cfg = {"method": "beit", "model": "beit_tiny_patch16_224_pixel", "img_size": 32, "patch_size": 8,
           "model_kwargs": {"embed_dim": 48, "depth": 1, "num_heads": 4}}
    torch.save({"model": default.state_dict(), "config": cfg}, ckpt)
    with pytest.raises(ValueError, match=r"shared relative position bias.*layer scale.*use_abs_pos_emb=True"):
        export_hf(ckpt, tmp_path / "hf")
    with pytest.raises(SystemExit, match="ViTForMaskedImageModeling is a plain ViT"):
        main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "hf"])
    with pytest.raises(ValueError, match="plain ViT"):
        vit_mim_to_hf(default.state_dict())
    mse = beit_tiny_patch16_224_pixel(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4, **PLAIN_VIT,
                                      loss="mse", kernels="eager")
    with pytest.raises(ValueError, match="loss='mse'"):
        hf_config_for(mse)


def test_bare_safetensors_config_from_the_weights_and_clear_errors(tmp_path):
    from safetensors.torch import save_file

    # a bare .safetensors of HF keys: the sizes from the shapes, the heads from the standard widths
    wide = _hf(hidden_size=192, num_attention_heads=3, intermediate_size=768, num_hidden_layers=1)
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    cfg = read_checkpoint_config(tmp_path / "wide.safetensors")
    assert cfg["model_kwargs"]["num_heads"] == 3 and cfg["img_size"] == 32 and cfg["source"] == "hf_vit"
    model = load_pretrained_model(tmp_path / "wide.safetensors", kernels="eager")
    torch.testing.assert_close(model.mask_token, wide.vit.embeddings.mask_token, rtol=0, atol=0)
    save_file({k: v.contiguous() for k, v in _hf().state_dict().items()}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match="config.json"):  # 48 wide: no standard head count
        read_checkpoint_config(tmp_path / "narrow.safetensors")
    # HF's defaults: eps 1e-12 and another activation warn; encoder_stride / num_channels mismatches refuse
    _hf(layer_norm_eps=1e-12, hidden_act="gelu_new").save_pretrained(tmp_path / "eps")
    with pytest.warns(UserWarning) as record:
        load_model_weights(tmp_path / "eps")
    messages = " ".join(str(w.message) for w in record)
    assert "layer_norm_eps=1e-12" in messages and "gelu_new" in messages
    _hf().save_pretrained(tmp_path / "stride")
    config = json.loads((tmp_path / "stride" / "config.json").read_text())
    (tmp_path / "stride" / "config.json").write_text(json.dumps({**config, "encoder_stride": 16}))
    for fn in (load_model_weights, read_checkpoint_config):
        with pytest.raises(ValueError, match="encoder_stride=16 != patch_size=8"):
            fn(tmp_path / "stride")
    (tmp_path / "stride" / "config.json").write_text(json.dumps({**config, "num_channels": 1}))
    with pytest.raises(ValueError, match="num_channels=1"):
        load_model_weights(tmp_path / "stride")
    with pytest.raises(ValueError, match="model_type"):
        vit_mim_model_config({"model_type": "vit_mae"})
    with pytest.raises(ValueError, match="not an HF ViT masked-image-modeling"):
        vit_mim_from_hf(_ours().state_dict())


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_hf_folder_encoder_exports_for_timm(tmp_path, qkv_bias):
    """No relative position tables: timm's Beit with absolute position embeddings only, or
    without any q/k/v bias its VisionTransformer; the same features either way."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    from mimfast.train.export import export_checkpoint

    _hf(qkv_bias=qkv_bias).save_pretrained(tmp_path / "hf")
    summary = export_checkpoint(tmp_path / "hf", tmp_path / "enc", fmt="safetensors")
    assert summary["timm_class"] == ("Beit" if qkv_bias else "VisionTransformer")
    module = timm.models.beit if qkv_bias else timm.models.vision_transformer
    encoder = getattr(module, summary["timm_class"])(**summary["timm_kwargs"], num_classes=0).eval()
    encoder.load_state_dict(load_file(summary["paths"][0]), strict=True)
    ours = load_pretrained_model(tmp_path / "hf", kernels="eager").eval()
    x, _ = _batch()
    x = x.float()
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(x),
                                   ours.forward_features(x, torch.zeros(2, 16, dtype=torch.bool)),
                                   rtol=1e-5, atol=1e-5)
