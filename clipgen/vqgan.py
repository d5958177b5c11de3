"""The VQGAN autoencoder of CLIP-GEN's tokenizer (docs/DESIGN.md §13): a convolutional encoder
and decoder with GroupNorm residual blocks and self-attention at chosen resolutions, the vector
quantizer between them, and the checkpoint format that carries the architecture.

Layout (Esser et al. 2021, as CLIP-GEN uses it): encoder = conv_in, per level NUM_RES_BLOCKS
residual blocks (+ attention where the side is in ATTN_RESOLUTIONS) then a stride-2 conv, a
middle block (res, attention, res), GroupNorm, swish, conv_out to Z_CHANNELS, 1×1 to EMBED_DIM;
the decoder mirrors it with NUM_RES_BLOCKS + 1 blocks per level and nearest-neighbour
up-sampling.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipgen.quantizer import VectorQuantizer
from datasets import image_sizes
from miscc.utils import CheckpointError, load_checkpoint

CHECKPOINT_FORMAT = "vqgan/1"


@dataclass(frozen=True)
class VQArch:
    """Everything that fixes the tokenizer's tensors and tokens (stored in each checkpoint)."""

    resolution: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    z_channels: int
    n_embed: int
    embed_dim: int
    l2_norm: bool

    @classmethod
    def from_config(cls, cfg) -> VQArch:
        v = cfg.VQGAN
        return cls(max(image_sizes(cfg)), int(v.CH), tuple(v.CH_MULT), int(v.NUM_RES_BLOCKS),
                   tuple(v.ATTN_RESOLUTIONS), int(v.Z_CHANNELS), int(v.N_EMBED),
                   int(v.EMBED_DIM), bool(v.L2_NORM))

    @property
    def tokens_side(self) -> int:
        """Tokens per image side: the resolution halved once between consecutive levels."""
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    def check(self) -> None:
        """A ConfigError when the image size cannot be halved once per level."""
        from miscc.config import ConfigError

        down = 2 ** (len(self.ch_mult) - 1)
        if self.resolution % down:
            raise ConfigError(f"image size {self.resolution} is not divisible by {down} "
                              f"(VQGAN.CH_MULT has {len(self.ch_mult)} levels)")


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm, eps 1e-6, with 32 groups from 128 channels up (taming's widths), else groups
    of 4 channels: one channel per group would normalise each colour channel's mean away."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GN → swish → conv3 → GN → swish → dropout → conv3, plus the (1×1 when widths differ)
    shortcut."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map, with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3×3 conv after zero-padding right and bottom by one (halves an even side)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in: int, c_out: int, blocks: int, attn: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers.append(ResBlock(c_in if i == 0 else c_out, c_out, dropout))
        if attn:
            layers.append(AttnBlock(c_out))
    return nn.Sequential(*layers)


def _middle(channels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResBlock(channels, channels, dropout), AttnBlock(channels),
                         ResBlock(channels, channels, dropout))


class Encoder(nn.Module):
    """Image [B, 3, R, R] in [-1, 1] → features [B, Z_CHANNELS, R/2^(L-1), R/2^(L-1)]."""

    def __init__(self, a: VQArch, dropout: float = 0.0) -> None:
        super().__init__()
        widths = [a.ch * m for m in a.ch_mult]
        self.conv_in = nn.Conv2d(3, a.ch, 3, 1, 1)
        stages: list[nn.Module] = []
        c, side = a.ch, a.resolution
        for i, width in enumerate(widths):
            stages.append(_level(c, width, a.num_res_blocks, side in a.attn_resolutions,
                                 dropout))
            c = width
            if i < len(widths) - 1:
                stages.append(Downsample(c))
                side //= 2
        self.down = nn.Sequential(*stages)
        self.mid = _middle(c, dropout)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, a.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features [B, Z_CHANNELS, t, t] → image [B, 3, R, R] (unbounded; ≈[-1, 1] once trained)."""

    def __init__(self, a: VQArch, dropout: float = 0.0) -> None:
        super().__init__()
        widths = [a.ch * m for m in a.ch_mult]
        c, side = widths[-1], a.tokens_side
        self.conv_in = nn.Conv2d(a.z_channels, c, 3, 1, 1)
        self.mid = _middle(c, dropout)
        stages: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            stages.append(_level(c, widths[i], a.num_res_blocks + 1,
                                 side in a.attn_resolutions, dropout))
            c = widths[i]
            if i > 0:
                stages.append(Upsample(c))
                side *= 2
        self.up = nn.Sequential(*stages)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Module):
    """Encoder → 1×1 → quantizer → 1×1 → decoder. `forward(x)` returns (reconstruction, VQ
    loss, token indices [B, t, t], quantizer stats); `encode`/`decode_indices` are the two
    halves the transformer stage uses."""

    def __init__(self, arch: VQArch, beta: float = 0.25, init_from_data: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        arch.check()
        self.arch = arch
        self.encoder, self.decoder = Encoder(arch, dropout), Decoder(arch, dropout)
        self.quant_conv = nn.Conv2d(arch.z_channels, arch.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(arch.embed_dim, arch.z_channels, 1)
        self.quantizer = VectorQuantizer(arch.n_embed, arch.embed_dim, beta, arch.l2_norm,
                                         init_from_data)

    @classmethod
    def from_config(cls, cfg) -> VQModel:
        v = cfg.VQGAN
        return cls(VQArch.from_config(cfg), float(v.BETA), bool(v.INIT_FROM_DATA),
                   float(v.DROPOUT))

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight (where the adaptive GAN weight compares gradients)."""
        return self.decoder.conv_out.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        q, vq_loss, idx, stats = self.quantizer(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(q)), vq_loss, idx, stats

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token indices [B, t, t] of images [B, 3, R, R]."""
        return self.quantizer(self.quant_conv(self.encoder(x)))[2]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images from code vectors [B, EMBED_DIM, t, t] (differentiable: soft tokens)."""
        return self.decoder(self.post_quant_conv(codes))

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] from token indices [B, t, t]."""
        return self.decode_codes(self.quantizer.lookup(idx))

    # ----------------------------------------------------------------------- checkpoints
    def checkpoint_state(self, **extra) -> dict:
        """The weights-only checkpoint: format, architecture, state dict (+ `extra`)."""
        return {"format": CHECKPOINT_FORMAT, "arch": asdict(self.arch),
                "state_dict": self.state_dict(), **extra}

    @classmethod
    def from_checkpoint(cls, path: str | Path, expect: VQArch | None = None) -> VQModel:
        """The tokenizer saved at `path`; with `expect`, a checkpoint of another architecture
        fails naming each value that differs."""
        state = load_checkpoint(path, "VQGAN checkpoint")
        arch = read_arch(state, path)
        if expect is not None:
            check_same_arch(arch, expect, str(path))
        model = cls(arch)
        model.load_state_dict(state["state_dict"])
        return model


CONFIG_KEYS = {"resolution": "TREE.BASE_SIZE", "ch": "VQGAN.CH", "ch_mult": "VQGAN.CH_MULT",
               "num_res_blocks": "VQGAN.NUM_RES_BLOCKS",
               "attn_resolutions": "VQGAN.ATTN_RESOLUTIONS", "z_channels": "VQGAN.Z_CHANNELS",
               "n_embed": "VQGAN.N_EMBED", "embed_dim": "VQGAN.EMBED_DIM",
               "l2_norm": "VQGAN.L2_NORM"}


def read_arch(state: dict, source: str | Path) -> VQArch:
    """The VQArch a checkpoint/state dict carries, or a CheckpointError naming `source`."""
    if state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("arch"), dict):
        raise CheckpointError(f"{source} is not a VQGAN checkpoint of this repository "
                              f"(format {state.get('format')!r}, expected {CHECKPOINT_FORMAT})")
    a = dict(state["arch"])
    for key in ("ch_mult", "attn_resolutions"):
        a[key] = tuple(a[key])
    return VQArch(**a)


def check_same_arch(found: VQArch, expect: VQArch, source: str) -> None:
    """A CheckpointError listing `key: checkpoint X, config Y` for every differing value."""
    diffs = [f"{CONFIG_KEYS[k]}: checkpoint {getattr(found, k)!r}, config {getattr(expect, k)!r}"
             for k in CONFIG_KEYS if getattr(found, k) != getattr(expect, k)]
    if diffs:
        raise CheckpointError(f"{source} was trained with another architecture ("
                              + "; ".join(diffs) + "); use the config it was trained with, "
                              "or --fresh to start over")
