"""Modules built on mimfast ops."""

from mimfast.nn.attention import Attention, patch_timm

__all__ = ["Attention", "patch_timm"]
