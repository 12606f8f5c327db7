"""MAE and BEiT pretraining models."""

from mimfast.models.dalle import DalleEncoder
from mimfast.models.beit import (
    VisionTransformerForMaskedImageModeling,
    VisionTransformerForMaskedPixelModeling,
    beit_base_patch16_224_8k_vocab,
    beit_base_patch16_224_pixel,
    beit_large_patch16_224_8k_vocab,
    beit_large_patch16_224_pixel,
    beit_tiny_patch16_224_8k_vocab,
    beit_tiny_patch16_224_pixel,
)
from mimfast.models.mae import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_base_patch16_dec512d8b,
    mae_vit_huge_patch14,
    mae_vit_huge_patch14_dec512d8b,
    mae_vit_large_patch16,
    mae_vit_large_patch16_dec512d8b,
    mae_vit_tiny_patch16,
)

MODELS = {
    "mae_vit_tiny_patch16": mae_vit_tiny_patch16,
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
    "mae_vit_base_patch16_dec512d8b": mae_vit_base_patch16_dec512d8b,
    "mae_vit_large_patch16_dec512d8b": mae_vit_large_patch16_dec512d8b,
    "mae_vit_huge_patch14_dec512d8b": mae_vit_huge_patch14_dec512d8b,
    "beit_tiny_patch16_224_8k_vocab": beit_tiny_patch16_224_8k_vocab,
    "beit_base_patch16_224_8k_vocab": beit_base_patch16_224_8k_vocab,
    "beit_large_patch16_224_8k_vocab": beit_large_patch16_224_8k_vocab,
    "beit_tiny_patch16_224_pixel": beit_tiny_patch16_224_pixel,
    "beit_base_patch16_224_pixel": beit_base_patch16_224_pixel,
    "beit_large_patch16_224_pixel": beit_large_patch16_224_pixel,
}

# heads of the standard ViT widths (Tiny, Small, Base, Large, Huge), for weights that do not say it
VIT_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def create_model(name: str, **kwargs):
    """Build a registered model by name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


__all__ = [
    "VIT_HEADS_BY_WIDTH",
    "DalleEncoder",
    "MODELS",
    "create_model",
    "MaskedAutoencoderViT",
    "VisionTransformerForMaskedImageModeling",
    "VisionTransformerForMaskedPixelModeling",
    "beit_base_patch16_224_8k_vocab",
    "beit_base_patch16_224_pixel",
    "beit_large_patch16_224_8k_vocab",
    "beit_large_patch16_224_pixel",
    "beit_tiny_patch16_224_8k_vocab",
    "beit_tiny_patch16_224_pixel",
    "mae_vit_base_patch16",
    "mae_vit_base_patch16_dec512d8b",
    "mae_vit_huge_patch14",
    "mae_vit_huge_patch14_dec512d8b",
    "mae_vit_large_patch16",
    "mae_vit_large_patch16_dec512d8b",
    "mae_vit_tiny_patch16",
]
