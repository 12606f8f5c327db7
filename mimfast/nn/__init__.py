"""Modules built on mimfast ops."""

from mimfast.nn.attention import Attention, patch_timm
from mimfast.nn.beit_attention import BEiTAttention, RelativePositionBias

__all__ = ["Attention", "patch_timm", "BEiTAttention", "RelativePositionBias"]
