"""BEiT two-view augmentation: both views are the same region of the same (jittered, flipped)
image; the crop box follows RandomResizedCrop's law; sizes, ranges, repeatability."""

import math

import pytest
import torch
import torch.nn.functional as F

from mimfast.data.datasets import IMAGENET_MEAN, IMAGENET_STD, SeededTransform
from mimfast.data.two_view import TwoViewTransform, random_resized_crop_box
from mimfast.models.dalle import unmap_pixels

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _coordinate_image(h=120, w=160):
    """R grows with x, G with y, B a smooth mix: every region looks different."""
    y = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    x = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    img = torch.stack([x, y, 0.5 + 0.4 * torch.sin(3 * x + 2 * y)])
    return (img * 255).round().byte()


def _views_in_common_size(patches, tokens, size):
    a = (patches * STD + MEAN).clamp(0, 1)
    b = unmap_pixels(tokens)
    return F.adaptive_avg_pool2d(a[None], size)[0], F.adaptive_avg_pool2d(b[None], size)[0]


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_views_show_the_same_region(jitter):
    img = _coordinate_image()
    tf = TwoViewTransform(img_size=64, tokenizer_size=32, color_jitter=jitter)
    for seed in range(12):
        torch.manual_seed(seed)
        patches, tokens = tf(img)
        assert patches.shape == (3, 64, 64) and tokens.shape == (3, 32, 32)
        assert patches.dtype == tokens.dtype == torch.float32
        assert 0.1 - 1e-6 <= tokens.min() and tokens.max() <= 0.9 + 1e-6
        a, b = _views_in_common_size(patches, tokens, 8)
        assert (a - b).abs().max() < 0.04, seed  # resampling differences only
        # and another crop's tokenizer view does not match this patch view
        torch.manual_seed(seed + 1000)
        _, other = tf(img)
        _, b2 = _views_in_common_size(patches, other, 8)
        if tf.last_box[2] * tf.last_box[3] < 0.9 * 120 * 160:
            assert (a - b2).abs().max() > 0.05


def test_box_and_flip_are_what_the_pixels_show():
    img = _coordinate_image()
    tf = TwoViewTransform(img_size=48, tokenizer_size=24, color_jitter=0.0, hflip=0.0)
    torch.manual_seed(3)
    patches, tokens = tf(img)
    top, left, h, w = tf.last_box
    rgb = (patches * STD + MEAN)
    # R encodes x, G encodes y: the view's mean colour is the box's centre
    cx, cy = rgb[0].mean().item() * 159, rgb[1].mean().item() * 119
    assert abs(cx - (left + (w - 1) / 2)) < 2.0 and abs(cy - (top + (h - 1) / 2)) < 2.0
    flipped = TwoViewTransform(img_size=48, tokenizer_size=24, color_jitter=0.0, hflip=1.0)
    torch.manual_seed(3)
    p2, t2 = flipped(img)
    for view in (p2, unmap_pixels(t2)):  # R falls from left to right in both views
        assert view[0, :, :4].mean() > view[0, :, -4:].mean()


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_views_are_the_references_resized_crops_of_the_box(hflip):
    """Without jitter, each view is exactly what the reference's RandomResizedCropAndInterpolation-
    WithTwoPic makes of the (flipped) image and the box: torchvision's resized_crop on the PIL
    image, bicubic to img_size and Lanczos to tokenizer_size (a box read off by a pixel, the
    filters reading around the box, or another filter would all show)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    img = _coordinate_image()
    tf = TwoViewTransform(img_size=64, tokenizer_size=32, color_jitter=0.0, hflip=hflip)
    pil = TF.to_pil_image(img)
    if hflip:
        pil = TF.hflip(pil)
    for seed in range(4):
        torch.manual_seed(seed)
        patches, tokens = tf(img)
        box = tf.last_box
        want_p = TF.to_tensor(TF.resized_crop(pil, *box, [64, 64], InterpolationMode.BICUBIC))
        want_t = TF.to_tensor(TF.resized_crop(pil, *box, [32, 32], InterpolationMode.LANCZOS))
        torch.testing.assert_close(patches, (want_p - MEAN) / STD, rtol=0, atol=1e-6)
        torch.testing.assert_close(tokens, want_t * 0.8 + 0.1, rtol=0, atol=1e-6)


def test_crop_box_law_is_torchvisions():
    from torchvision.transforms import RandomResizedCrop

    img = torch.zeros(1, 200, 300)
    for seed in range(200):
        torch.manual_seed(seed)
        ours = random_resized_crop_box(200, 300)
        torch.manual_seed(seed)
        assert ours == tuple(RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))), seed
        top, left, h, w = ours
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        assert 0.08 * 0.95 <= h * w / 60000 <= 1.0
    # fall-back: a thin image gets the centre crop clamped to the ratio range
    torch.manual_seed(0)
    assert random_resized_crop_box(10, 1000, scale=(0.99, 1.0)) == (0, 493, 10, 13)


def test_repeatable_under_seeded_transform_and_input_checks():
    imgs = [(_coordinate_image(60, 60), 0)] * 4
    tf = TwoViewTransform(img_size=32, tokenizer_size=16)
    ds = SeededTransform(imgs, tf, seed=5)
    (a_p, a_t), _ = ds[(0, 1)]
    (b_p, b_t), _ = ds[(0, 1)]
    (c_p, _), _ = ds[(1, 1)]
    assert torch.equal(a_p, b_p) and torch.equal(a_t, b_t)
    assert not torch.equal(a_p, c_p)
    with pytest.raises(TypeError, match="uint8"):
        tf(torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match="tokenizer_interpolation"):
        TwoViewTransform(tokenizer_interpolation="area")
    with pytest.raises(ValueError, match="scale"):
        TwoViewTransform(scale=(0.5, 0.2))
    assert math.isclose(TwoViewTransform().scale[0], 0.08)
