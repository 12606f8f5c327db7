"""BEiT pretraining against microsoft/unilm ``beit/``: details where mimfast once differed from
the published code, each pinned to what the reference does."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mimfast.data.two_view import TwoViewTransform
from mimfast.models.dalle import map_pixels


def _noise_image(h=150, w=200, seed=0):
    """Every pixel independent: any pixel read from outside the crop box shows up."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_two_views_are_torchvisions_resized_crop_of_the_box(hflip):
    """The reference's RandomResizedCropAndInterpolationWithTwoPic returns
    ``F.resized_crop(img, i, j, h, w, size, interpolation)`` for each view: the box is cut out
    first and then resized, so the filters see only the box's pixels (edge pixels repeat at its
    border). Resizing the whole image with a ``box`` instead reads pixels around the box and
    changes the views' border rows and columns."""
    img = _noise_image()
    tf = TwoViewTransform(img_size=64, tokenizer_size=32, color_jitter=0.0, hflip=hflip)
    mean, std = tf.mean, tf.std
    for seed in range(6):
        torch.manual_seed(seed)
        patches, tokens = tf(img)
        top, left, h, w = tf.last_box
        src = img.transpose(Image.FLIP_LEFT_RIGHT) if hflip else img
        ref_p = TF.resized_crop(src, top, left, h, w, [64, 64], InterpolationMode.BICUBIC)
        ref_t = TF.resized_crop(src, top, left, h, w, [32, 32], InterpolationMode.LANCZOS)
        ref_p = (TF.pil_to_tensor(ref_p).float() / 255 - mean) / std
        ref_t = map_pixels(TF.pil_to_tensor(ref_t).float() / 255)
        torch.testing.assert_close(patches, ref_p, rtol=0, atol=1e-6)
        torch.testing.assert_close(tokens, ref_t, rtol=0, atol=1e-6)


def test_block_mlp_drops_out_once_after_fc2():
    """The reference's ``Mlp`` (modeling_finetune.py) applies its dropout once, after ``fc2``
    (the one after the activation is commented out); timm's ``Mlp(drop=p)`` would drop after
    the activation too. With ``drop_rate`` > 0 the MLP in training mode must be
    ``dropout(fc2(gelu(fc1(x))))`` with a single dropout."""
    from mimfast.models.beit import beit_tiny_patch16_224_8k_vocab

    torch.manual_seed(0)
    model = beit_tiny_patch16_224_8k_vocab(img_size=32, depth=2, vocab_size=64, drop_rate=0.3, kernels="eager")
    model.train()
    x = torch.randn(2, 5, model.embed_dim)
    for blk in model.blocks:
        mlp = blk.mlp
        torch.manual_seed(1)
        out = mlp(x)
        torch.manual_seed(1)
        ref = torch.nn.functional.dropout(mlp.fc2(mlp.act(mlp.fc1(x))), 0.3, training=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_beit_recipe_min_lr():
    """run_beit_pretraining.py's --min_lr default (1e-5), not MAE's 0."""
    from mimfast.train.config import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--method", "beit", "--tokenizer", "vq:t.safetensors"]))
    assert cfg.method == "beit" and cfg.min_lr == 1e-5 and cfg.lr == 1.5e-3
    cfg = config_from_args(build_parser().parse_args(["--method", "beit", "--tokenizer", "vq:t.safetensors",
                                                      "--min-lr", "0"]))
    assert cfg.min_lr == 0.0
