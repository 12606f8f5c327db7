"""microsoft/SimMIM ViT checkpoints <-> mimfast's pixel model (pure ``state_dict`` mapping).

SimMIM's ViT (``models/simmim.py`` ``SimMIM(VisionTransformerForSimMIM, encoder_stride=16)``) is
BEiT's encoder under an ``encoder.`` prefix, and its decoder a 1x1 conv to ``stride**2 * 3``
channels followed by ``PixelShuffle(stride)``; mimfast's
:class:`~mimfast.models.VisionTransformerForMaskedPixelModeling` (``beit_*_pixel``) is the same
network with the decoder as a Linear head::

    SimMIM                                       mimfast
    encoder.<k>  (cls_token, mask_token,         <k>
      patch_embed.proj, rel_pos_bias.*,
      pos_embed, blocks.<i>.*, norm)
    decoder.0.weight (p*p*3, D, 1, 1)            pixel_head.weight (p*p*3, D), rows permuted
    decoder.0.bias   (p*p*3,)                    pixel_head.bias, permuted the same way

PixelShuffle reads conv channel ``c*p*p + i*p + j`` into pixel ``(c, i, j)`` of a patch; mimfast's
head row for that pixel is ``(i*p + j)*3 + c`` (``ops.patchify``'s (p, q, c) order). SimMIM's
decoder always has 3 output channels, so only 3-channel models map.

The architecture is read from the weights (width, depth, patch, grid, MLP ratio, heads from the
relative position tables, q/v biases, layer scale, absolute / shared / per-block position
terms); a checkpoint written by SimMIM's ``main_simmim.py`` also holds its yacs config, read
through :func:`mimfast.train.checkpoint.load_model_weights`'s allow-list as nested dicts, which
gives the masking settings (and the heads where no table says them). Swin checkpoints and
``USE_MEAN_POOLING`` encoders (no final ``norm``) have no mimfast model and are refused.
"""

from __future__ import annotations

import torch

from mimfast.models import VIT_HEADS_BY_WIDTH
from mimfast.models.beit import encoder_config_from_state_dict
from mimfast.models.mmpretrain_cfg import _get

__all__ = ["is_simmim_state_dict", "from_simmim", "to_simmim", "simmim_model_config", "PIXEL_MODELS"]

_ENC = "encoder."
_DEC_W, _DEC_B = "decoder.0.weight", "decoder.0.bias"
_HEAD_W, _HEAD_B = "pixel_head.weight", "pixel_head.bias"
# (width, depth) -> mimfast's pixel model of that size
PIXEL_MODELS = {(192, 12): "beit_tiny_patch16_224_pixel", (768, 12): "beit_base_patch16_224_pixel",
                (1024, 24): "beit_large_patch16_224_pixel"}


def is_simmim_state_dict(sd: dict) -> bool:
    """Whether ``sd`` is a SimMIM model's state_dict (``encoder.patch_embed...``). A SimMIM Swin
    encoder is an error: mimfast has no Swin model."""
    if f"{_ENC}patch_embed.proj.weight" not in sd:
        return False
    if any(k.startswith(f"{_ENC}layers.") for k in sd):
        raise ValueError("a SimMIM Swin Transformer checkpoint (encoder.layers.*): mimfast's SimMIM model is the "
                         "ViT one (beit_*_pixel); Swin encoders cannot be loaded")
    return True


def _shuffle_rows(p: int, channels: int = 3) -> torch.Tensor:
    """``perm`` with head row r = conv channel ``perm[r]``: r = (i*p + j)*C + c <- c*p*p + i*p + j."""
    c = torch.arange(channels)
    ij = torch.arange(p * p)
    return (c[None, :] * p * p + ij[:, None]).reshape(-1)


def _head_patch(rows: int) -> int:
    p = int(round((rows / 3) ** 0.5))
    if 3 * p * p != rows:
        raise ValueError(f"SimMIM decoder with {rows} output channels: expected stride**2 * 3")
    return p


def from_simmim(sd: dict) -> dict:
    """A SimMIM ViT state_dict (keys ``encoder.*``, ``decoder.0.*``) under mimfast's pixel-model keys.
    An encoder-only file (no ``decoder.0``) gives no ``pixel_head``."""
    if not is_simmim_state_dict(sd):
        raise ValueError("not a SimMIM ViT state_dict (no encoder.patch_embed.proj.weight)")
    out = {}
    for k, v in sd.items():
        if k.startswith(_ENC):
            out[k[len(_ENC):]] = v
        elif k not in (_DEC_W, _DEC_B):
            raise ValueError(f"unexpected key {k!r} in a SimMIM state_dict")
    if _DEC_W in sd:
        w = sd[_DEC_W]
        if w.dim() != 4 or w.shape[2:] != (1, 1):
            raise ValueError(f"SimMIM {_DEC_W} must be a 1x1 conv (C_out, D, 1, 1), got {tuple(w.shape)}")
        perm = _shuffle_rows(_head_patch(w.shape[0])).to(w.device)
        out[_HEAD_W] = w.reshape(w.shape[0], w.shape[1])[perm].contiguous()
        if _DEC_B in sd:
            out[_HEAD_B] = sd[_DEC_B][perm].contiguous()
    return out


def to_simmim(sd: dict) -> dict:
    """mimfast's pixel-model (or any BEiT encoder) state_dict under SimMIM's keys, for SimMIM's
    ``main_finetune.py --pretrained`` (which strips ``encoder.``) or ``main_simmim.py --resume``.
    ``lm_head`` (a BEiT tokenizer head) has no SimMIM counterpart and is left out."""
    out = {}
    for k, v in sd.items():
        if k in (_HEAD_W, _HEAD_B) or k.startswith("lm_head."):
            continue
        out[_ENC + k] = v
    if _HEAD_W in sd:
        w = sd[_HEAD_W]
        perm = _shuffle_rows(_head_patch(w.shape[0])).to(w.device)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        out[_DEC_W] = w[inverse].reshape(w.shape[0], w.shape[1], 1, 1).contiguous()
        if _HEAD_B in sd:
            out[_DEC_B] = sd[_HEAD_B][inverse].contiguous()
    return out


def simmim_model_config(sd: dict, simmim_cfg: dict | None = None) -> dict:
    """A mimfast checkpoint ``config`` (method, model, img_size, patch_size, model_kwargs and the
    SimMIM masking and loss settings) for a SimMIM ViT checkpoint: ``sd`` already under mimfast's
    keys (:func:`from_simmim`), ``simmim_cfg`` the checkpoint's yacs config as nested dicts, if any."""
    if simmim_cfg is not None and _get(simmim_cfg, "MODEL", "TYPE", default="vit") != "vit":
        raise ValueError(f"SimMIM checkpoint of MODEL.TYPE {_get(simmim_cfg, 'MODEL', 'TYPE')!r}: only ViT encoders "
                         "have a mimfast model")
    if "norm.weight" not in sd:
        raise ValueError("a SimMIM encoder without a final norm (USE_MEAN_POOLING): mimfast's pixel model keeps "
                         "BEiT's final LayerNorm")
    arch = encoder_config_from_state_dict(sd)
    kwargs, patch = arch["model_kwargs"], arch["patch_size"]
    width, depth = kwargs["embed_dim"], kwargs["depth"]
    if kwargs["num_heads"] is None:  # no relative position table says it
        kwargs["num_heads"] = _get(simmim_cfg, "MODEL", "VIT", "NUM_HEADS", default=VIT_HEADS_BY_WIDTH.get(width))
        if kwargs["num_heads"] is None:
            raise ValueError(f"the head count of a {width}-wide SimMIM encoder without position tables is unknown; "
                             "give the model with its config")
    img_size = arch["img_size"] or _get(simmim_cfg, "DATA", "IMG_SIZE", default=224) // patch * patch
    vit = _get(simmim_cfg, "MODEL", "VIT", default={}) or {}
    if vit.get("INIT_VALUES") and "blocks.0.gamma_1" in sd:
        kwargs["init_values"] = float(vit["INIT_VALUES"])
    config = dict(method="beit", model=PIXEL_MODELS.get((width, depth), "beit_base_patch16_224_pixel"),
                  img_size=img_size, patch_size=patch, model_kwargs=kwargs,
                  recipe="simmim", pixel_masks="simmim", pixel_loss="l1", norm_pix_loss=False, source="simmim",
                  mask_patch_size=int(_get(simmim_cfg, "DATA", "MASK_PATCH_SIZE", default=32)),
                  simmim_mask_ratio=float(_get(simmim_cfg, "DATA", "MASK_RATIO", default=0.6)))
    drop_path = _get(simmim_cfg, "MODEL", "DROP_PATH_RATE")
    if drop_path is not None:
        config["drop_path"] = float(drop_path)
    return config
