"""mimfast's public functional API: one autograd-aware op per MIM hot path.

Each op takes ``backend="auto" | "eager" | "triton"`` (see :mod:`mimfast.backend`) and has its
eager reference beside it (``<op>_reference``), which is the ground truth and the CPU path.
"""

from mimfast.backend import BackendUnavailableError, use_backend
from mimfast.ops.attention import attention, attention_reference, self_attention, self_attention_reference
from mimfast.ops.gelu_linear import gelu_linear, gelu_linear_reference, mlp, mlp_reference
from mimfast.ops.layer_norm import add_layer_norm, add_layer_norm_reference
from mimfast.ops.linear_ce import linear_cross_entropy, linear_cross_entropy_reference
from mimfast.ops.masking import (
    num_kept,
    random_masking,
    random_masking_reference,
    unshuffle_with_mask_token,
    unshuffle_with_mask_token_reference,
)
from mimfast.ops.patch_embed import masked_patch_embed, masked_patch_embed_reference, patch_embed, patch_embed_reference
from mimfast.ops.patch_loss import masked_patch_loss, masked_patch_loss_reference, patchify, unpatchify

__all__ = [
    "BackendUnavailableError",
    "use_backend",
    "attention",
    "attention_reference",
    "self_attention",
    "self_attention_reference",
    "add_layer_norm",
    "add_layer_norm_reference",
    "gelu_linear",
    "gelu_linear_reference",
    "mlp",
    "mlp_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "num_kept",
    "random_masking",
    "random_masking_reference",
    "unshuffle_with_mask_token",
    "unshuffle_with_mask_token_reference",
    "masked_patch_embed",
    "masked_patch_embed_reference",
    "patch_embed",
    "patch_embed_reference",
    "masked_patch_loss",
    "masked_patch_loss_reference",
    "patchify",
    "unpatchify",
]
