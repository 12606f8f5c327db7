"""Modules built on mimfast ops."""

from mimfast.nn.attention import Attention, patch_timm
from mimfast.nn.beit_attention import BEiTAttention, RelativePositionBias
from mimfast.nn.blocks import can_fuse_blocks, forward_blocks, mlp_fusable
from mimfast.nn.mlp import Mlp, patch_timm_mlp

__all__ = ["Attention", "patch_timm", "BEiTAttention", "RelativePositionBias", "forward_blocks", "can_fuse_blocks",
           "mlp_fusable", "Mlp", "patch_timm_mlp"]
