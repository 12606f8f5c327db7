"""Visual tokenizers for BEiT: a VQ tokenizer users can train (:class:`VQTokenizer`), and
:func:`load_tokenizer`, which turns ``"dalle:PATH"`` or ``"vq:PATH"`` into a frozen module that
maps tokenizer-view images (map_pixels range, see :func:`mimfast.models.dalle.map_pixels`) to
(N, h, w) token ids, whichever tokenizer it holds.

The VQ tokenizer: a small conv encoder downsampling by ``downsample`` (8, as DALL-E's, so a
112-px view gives 14x14 tokens), a vector quantizer whose codebook is l2-normalised and
updated by exponential moving averages (VQ-VAE-2 EMA updates on the unit sphere, as BEiT v2's
quantizer) with dead codes restarted from the batch's encodings, and a conv decoder
reconstructing the view (MSE). Loss = reconstruction + ``beta`` x commitment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mimfast.models.dalle import load_dalle_encoder

__all__ = ["VQTokenizer", "EMAQuantizer", "FrozenTokenizer", "load_tokenizer", "save_vq_tokenizer",
           "load_vq_tokenizer"]


class EMAQuantizer(nn.Module):
    """Nearest code by cosine similarity on an l2-normalised codebook updated by EMA.

    Args:
        num_codes: vocabulary size V.
        dim: code dimension D.
        decay: EMA decay of the code counts and sums.
        restart_below: a code whose EMA count (assignments per step) drops below this is
            restarted at a random encoding of the current batch with a count of 1 (codes start
            dead, so step 1 initialises the codebook from data).
    """

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, restart_below: float = 0.5) -> None:
        super().__init__()
        self.num_codes, self.dim, self.decay, self.restart_below = num_codes, dim, decay, restart_below
        embed = F.normalize(torch.randn(num_codes, dim), dim=1)
        self.register_buffer("embed", embed)  # (V, D), unit rows
        self.register_buffer("embed_avg", embed.clone())  # (V, D) EMA of assigned encodings
        self.register_buffer("cluster_size", torch.zeros(num_codes))  # (V,) EMA of counts

    def codes(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (M, D) unit rows -> (M,) nearest code ids."""
        return (flat @ self.embed.t()).argmax(dim=1)

    def forward(self, z: torch.Tensor):
        """z (N, D, h, w) -> (quantized (N, D, h, w) with straight-through gradient, ids (N, h, w),
        commitment loss)."""
        N, D, h, w = z.shape
        flat = F.normalize(z.float().permute(0, 2, 3, 1).reshape(-1, D), dim=1)  # (M, D)
        ids = self.codes(flat)
        if self.training:
            self._ema_update(flat.detach(), ids)
        zq = self.embed[ids]  # (M, D)
        commit = F.mse_loss(flat, zq.detach())
        zq = flat + (zq - flat).detach()
        return zq.view(N, h, w, D).permute(0, 3, 1, 2), ids.view(N, h, w), commit

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids, minlength=self.num_codes).to(flat.dtype)
        sums = torch.zeros_like(self.embed_avg).index_add_(0, ids, flat)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        dead = self.cluster_size < self.restart_below
        n_dead = int(dead.sum())
        if n_dead:  # restart at random encodings of this batch (drawn from torch's RNG)
            pick = flat[torch.randint(flat.shape[0], (n_dead,), device=flat.device)]
            self.embed_avg[dead] = pick
            self.cluster_size[dead] = 1.0
        self.embed.copy_(F.normalize(self.embed_avg, dim=1))


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.body(x)


class VQTokenizer(nn.Module):
    """A small VQ autoencoder; ``tokenize`` gives (N, H / downsample, W / downsample) ids.

    Args:
        vocab_size: number of codes V.
        embed_dim: code dimension D.
        hidden: conv width.
        downsample: 2, 4, 8 or 16; the token grid is the image side over this.
        in_chans: image channels.
        beta: weight of the commitment loss.
        decay: codebook EMA decay.
    """

    def __init__(self, vocab_size: int = 1024, embed_dim: int = 32, hidden: int = 64, downsample: int = 8,
                 in_chans: int = 3, beta: float = 0.25, decay: float = 0.99) -> None:
        super().__init__()
        if downsample not in (2, 4, 8, 16):
            raise ValueError(f"downsample must be 2, 4, 8 or 16, got {downsample}")
        for name, value in (("vocab_size", vocab_size), ("embed_dim", embed_dim), ("hidden", hidden)):
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an int >= 2, got {value!r}")
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden=hidden, downsample=downsample,
                           in_chans=in_chans, beta=beta, decay=decay)
        self.vocab_size, self.downsample, self.beta, self.in_chans = vocab_size, downsample, beta, in_chans
        n_down = downsample.bit_length() - 1
        # the first conv already strides, so no layer runs at full resolution
        enc = [nn.Conv2d(in_chans, hidden, 4, stride=2, padding=1)]
        for _ in range(n_down - 1):
            enc += [_ResBlock(hidden), nn.ReLU(), nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)]
        # centred per channel (over the batch) before the l2 normalisation of the quantizer, so
        # the encodings spread over the sphere from the start instead of sharing one direction
        enc += [_ResBlock(hidden), nn.ReLU(), nn.Conv2d(hidden, embed_dim, 1), nn.BatchNorm2d(embed_dim, affine=False)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = EMAQuantizer(vocab_size, embed_dim, decay=decay)
        dec = [nn.Conv2d(embed_dim, hidden, 3, padding=1), _ResBlock(hidden)]
        for _ in range(n_down - 1):
            dec += [nn.ReLU(), nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), _ResBlock(hidden)]
        dec += [nn.ReLU(), nn.ConvTranspose2d(hidden, in_chans, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x must be (N, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(f"x's height and width must be multiples of {self.downsample}, got {tuple(x.shape[2:])}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor (map_pixels of [0, 1] pixels), got {x.dtype}")

    def forward(self, x: torch.Tensor) -> dict:
        """x (N, C, H, W) in map_pixels range -> dict(loss, rec_loss, commit_loss, recon, ids)."""
        self._check(x)
        z = self.encoder(x)
        with torch.autocast(x.device.type, enabled=False):
            zq, ids, commit = self.quantizer(z.float())
        recon = self.decoder(zq)
        rec = F.mse_loss(recon.float(), x.float())
        return dict(loss=rec + self.beta * commit, rec_loss=rec, commit_loss=commit, recon=recon, ids=ids)

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) map_pixels images -> (N, H / downsample, W / downsample) int64 ids."""
        self._check(x)
        z = self.encoder(x)
        N, D, h, w = z.shape
        with torch.autocast(x.device.type, enabled=False):  # nearest code in float32
            flat = F.normalize(z.float().permute(0, 2, 3, 1).reshape(-1, D), dim=1)
            return self.quantizer.codes(flat).view(N, h, w)

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, h, w) ids -> (N, C, h * downsample, w * downsample) reconstruction."""
        zq = self.quantizer.embed[ids].permute(0, 3, 1, 2)
        return self.decoder(zq)


def save_vq_tokenizer(model: VQTokenizer, path: str | os.PathLike) -> Path:
    """Weights and codebook as safetensors; the constructor arguments in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt", "mimfast_tokenizer": "vq",
                                           "config": json.dumps(model.config)})
    os.replace(tmp, path)
    return path


def load_vq_tokenizer(path: str | os.PathLike) -> VQTokenizer:
    """A VQTokenizer from ``save_vq_tokenizer``'s safetensors file, or from a ``mimfast
    tokenizer train`` checkpoint (read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQ tokenizer weights {str(path)!r} do not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("mimfast_tokenizer") != "vq" or "config" not in meta:
            raise ValueError(f"{path}: not a VQ tokenizer written by `mimfast tokenizer train` "
                             f"(metadata mimfast_tokenizer={meta.get('mimfast_tokenizer')!r})")
        config, state_dict = json.loads(meta["config"]), load_file(str(path))
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
            raise ValueError(f"{path}: not a `mimfast tokenizer train` checkpoint")
        config, state_dict = ckpt["model_config"], ckpt["model"]
    model = VQTokenizer(**config)
    model.load_state_dict(state_dict, strict=True)
    return model


class FrozenTokenizer(nn.Module):
    """A tokenizer fixed in eval mode without gradients: images in map_pixels range
    (N, 3, H, W) -> (N, H / downsample, W / downsample) int64 token ids.

    Attributes: ``kind`` ('dalle' or 'vq'), ``vocab_size``, ``downsample``, ``net``.
    """

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net = net.eval()
        self.kind = kind
        self.vocab_size = net.vocab_size
        self.downsample = net.downsample
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # always frozen
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.tokenize(x)


def load_tokenizer(spec: str, precision: str = "fp16") -> FrozenTokenizer:
    """``"dalle:PATH"`` (a converted DALL-E encoder: safetensors or a weights_only state_dict),
    ``"vq:PATH"`` (from ``mimfast tokenizer train``) or a bare ``.safetensors`` path whose
    metadata names its kind. ``precision`` is the DALL-E encoder's half type on CUDA."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer spec must be 'dalle:PATH' or 'vq:PATH', got {spec!r}")
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("dalle", "vq"):
        kind, path = _kind_from_metadata(spec), spec
    if kind == "dalle":
        return FrozenTokenizer(load_dalle_encoder(path, precision=precision), "dalle")
    return FrozenTokenizer(load_vq_tokenizer(path), "vq")


def _kind_from_metadata(path: str) -> str:
    p = Path(path)
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            kind = (f.metadata() or {}).get("mimfast_tokenizer")
        if kind in ("dalle", "vq"):
            return kind
    raise ValueError(f"tokenizer spec must be 'dalle:PATH' or 'vq:PATH' (or a mimfast .safetensors file), got {path!r}")

