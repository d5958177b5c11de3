"""Networks: `ClipEncoder` (CLIP towers with word and region outputs)
and the DM-GAN generator (dynamic-memory stages) and per-scale discriminators.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import tempfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.pretrained import download_pretrained, get_pretrained_cfg
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from miscc.utils import CheckpointError, load_checkpoint, load_state_strict

ENCODER_FORMAT = "clip-damsm-encoder/1"
CLIP_ARCH_DIR = Path(__file__).resolve().parent / "cfg" / "clip"
_HF_NAME = re.compile(r"^openai/clip-vit-(base|large)-patch(\d+)(-336)?$")


class EncoderLoadError(RuntimeError):
    """CLIP weights or an encoder checkpoint could not be loaded (says what and how to fix)."""


def resolve_clip_name(name: str, pretrained: str) -> dict:
    """Map a CLIP name to a spec {'model', 'pretrained', 'arch'} (see docs/DESIGN.md §5).

    Accepts OpenAI names (`ViT-B/32`), open_clip names (`ViT-B-32` + tag), Hugging Face names of
    the earlier configs (`openai/clip-vit-base-patch32`), `hf-hub:` names, and a JSON
    architecture (a path, or a stem under cfg/clip/, e.g. `tiny`) built with random weights.
    """
    json_path = Path(name) if name.endswith(".json") else CLIP_ARCH_DIR / f"{name}.json"
    if json_path.is_file():
        arch = json.loads(json_path.read_text())
        return {"model": json_path.stem, "pretrained": "", "arch": arch}
    if name.endswith(".json"):
        raise EncoderLoadError(f"CLIP architecture file not found: {name}")
    match = _HF_NAME.match(name)
    if match:
        size = "B" if match.group(1) == "base" else "L"
        return {"model": f"ViT-{size}-{match.group(2)}{match.group(3) or ''}",
                "pretrained": pretrained or "openai", "arch": None, "quick_gelu": False}
    if name.startswith("hf-hub:"):
        return {"model": name, "pretrained": "", "arch": None}
    model = name.replace("/", "-")
    if model not in open_clip.list_models():
        raise EncoderLoadError(
            f"unknown CLIP model {name!r}: use an OpenAI name (ViT-B/32), an open_clip name "
            f"(ViT-B-32), openai/clip-vit-base-patch32, or a JSON file under {CLIP_ARCH_DIR}"
        )
    return {"model": model, "pretrained": pretrained, "arch": None}


def _create_clip(spec: dict, load_weights: bool) -> nn.Module:
    """Build the open_clip model of `spec`; weights are fetched only when `load_weights`."""
    if spec["arch"] is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{spec['model']}.json"
            path.write_text(json.dumps(spec["arch"]))
            open_clip.add_model_config(path)
            quiet = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)  # random init is the point here
            try:
                return open_clip.create_model(spec["model"], pretrained=None)
            finally:
                logging.getLogger().setLevel(quiet)
    tag = spec["pretrained"] if load_weights else None
    tag_cfg = get_pretrained_cfg(spec["model"], tag) if tag and not Path(tag).is_file() else {}
    # OpenAI weights need QuickGELU; an encoder rebuilt from our checkpoint keeps its activation
    quick_gelu = bool(spec.get("quick_gelu")) or bool((tag_cfg or {}).get("quick_gelu"))
    spec["quick_gelu"] = quick_gelu
    try:
        # fetch (or find in the cache) the weights before building the model: a missing
        # download is reported before time and memory go into a random init (ViT-B/32: 2 s)
        if tag_cfg:
            download_pretrained(tag_cfg)
        return open_clip.create_model(spec["model"], pretrained=tag or None,
                                      force_quick_gelu=quick_gelu,
                                      require_pretrained=bool(tag))
    except Exception as err:  # download failure, missing file, unknown tag
        sources = []
        if tag_cfg and tag_cfg.get("hf_hub"):
            sources.append(f"https://huggingface.co/{tag_cfg['hf_hub'].rstrip('/')} "
                           "(open_clip_pytorch_model.bin)")
        if tag_cfg and tag_cfg.get("url"):
            sources.append(tag_cfg["url"])
        where = "; ".join(sources) or "the open_clip model zoo"
        raise EncoderLoadError(
            f"could not load CLIP weights for model {spec['model']!r} (pretrained={tag!r}): "
            f"{type(err).__name__}: {err}\n"
            f"Without network access, download the weights from {where} on a machine that has "
            "it and pass the file: --set CLIP.PRETRAINED=/path/to/weights (.bin/.pt/.safetensors)"
        ) from err


def _resnet_regions(visual: ModifiedResNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Regions and code of a CLIP ResNet: the last feature map's cells, each taken through the
    attention pool's value and output projections (the pool's output is a softmax-weighted mix
    of exactly these), so regions live in the joint space like a ViT's projected patches."""
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
    pool = visual.attnpool
    code = pool(x)
    cells = x.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(x.dtype)
    return pool.c_proj(pool.v_proj(cells)), code


@functools.lru_cache(maxsize=32)
def _bicubic_weights(n_in: int, n_out: int, antialias: bool, device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """[n_out, n_in] matrix of 1-D bicubic resizing (align_corners=False), read off
    F.interpolate applied to the n_in unit signals in float64, then cast once per device and
    dtype (stage 2 resizes every step)."""
    unit = torch.eye(n_in, dtype=torch.float64)[:, None, None, :]
    rows = F.interpolate(unit, size=(1, n_out), mode="bicubic", align_corners=False,
                         antialias=antialias)
    return rows[:, 0, 0, :].T.contiguous().to(device, dtype)


def resize_bicubic(x: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """`F.interpolate(x, (size, size), mode="bicubic", align_corners=False, antialias=...)`
    computed as A_h · x · A_wᵀ: bicubic resizing is separable and linear, so two small matmuls
    give the same values (to float rounding) with a backward pass several times faster on CPU
    than interpolate's, which stage 2 runs on every generated batch (docs/DESIGN.md §5)."""
    rows = _bicubic_weights(x.shape[-2], size, antialias, x.device, x.dtype)
    cols = _bicubic_weights(x.shape[-1], size, antialias, x.device, x.dtype)
    with torch.autocast(x.device.type, enabled=False):  # the resize stays in x's precision
        return rows @ x @ cols.T


class ClipEncoder(nn.Module):
    """CLIP text and image towers returning per-word and per-region features in the joint space.

    Images enter in the GAN's range [-1, 1] at any size; resizing and CLIP's mean/std
    normalisation happen inside, differentiably, so the DAMSM loss reaches the generator.
    """

    def __init__(self, spec: dict, adapter: bool = True, load_weights: bool = True) -> None:
        super().__init__()
        self.spec = dict(spec)
        self.clip = _create_clip(self.spec, load_weights)
        if not isinstance(self.clip.visual, (VisionTransformer, ModifiedResNet)):
            raise EncoderLoadError(
                f"CLIP model {spec['model']!r} has a {type(self.clip.visual).__name__} image "
                "tower; region features need a ViT (e.g. ViT-B/32) or a CLIP ResNet (e.g. RN50)"
            )
        if not hasattr(self.clip, "token_embedding"):
            raise EncoderLoadError(f"CLIP model {spec['model']!r} has a custom text tower; "
                                   "only the standard CLIP text transformer is supported")
        if isinstance(self.clip.visual, VisionTransformer):
            self.clip.visual.output_tokens = True
        self.embed_dim = int(self.clip.visual.output_dim)
        size = self.clip.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.context_length = int(self.clip.positional_embedding.shape[0])
        mean = getattr(self.clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(self.clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.adapter = nn.Linear(self.embed_dim, self.embed_dim) if adapter else None
        if self.adapter is not None:  # start as the identity: regions begin as CLIP's own
            nn.init.eye_(self.adapter.weight)
            nn.init.zeros_(self.adapter.bias)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg) -> ClipEncoder:
        """`TRAIN.NET_E` checkpoint if set, else the CLIP section (pretrained weights)."""
        if cfg.TRAIN.NET_E:
            return cls.from_checkpoint(cfg.TRAIN.NET_E)
        spec = resolve_clip_name(cfg.CLIP.MODEL, cfg.CLIP.PRETRAINED)
        return cls(spec, adapter=cfg.CLIP.ADAPTER)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ClipEncoder:
        """Rebuild an encoder saved by `checkpoint_state` (no stage-1 config needed)."""
        state = load_checkpoint(path, "encoder checkpoint")
        if state.get("format") != ENCODER_FORMAT:
            raise CheckpointError(
                f"{path} is not an encoder checkpoint written by pretrain_DAMSM.py "
                f"(expected format {ENCODER_FORMAT!r}, found {state.get('format')!r})"
            )
        spec = {"model": state["model"], "pretrained": state["pretrained"],
                "arch": json.loads(state["arch"]) if state["arch"] else None,
                "quick_gelu": bool(state.get("quick_gelu", False))}
        encoder = cls(spec, adapter=bool(state["adapter"]), load_weights=False)
        load_state_strict(encoder, state["state_dict"], f"encoder checkpoint {path}")
        return encoder

    def checkpoint_state(self) -> dict:
        """Weights + architecture, everything needed to rebuild this encoder."""
        return {
            "format": ENCODER_FORMAT,
            "model": self.spec["model"],
            "pretrained": self.spec["pretrained"],
            "arch": json.dumps(self.spec["arch"]) if self.spec["arch"] else "",
            "adapter": self.adapter is not None,
            "quick_gelu": bool(self.spec.get("quick_gelu")),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters added on top of CLIP (the region adapter): trained at TRAIN.ADAPTER_LR."""
        return list(self.adapter.parameters()) if self.adapter is not None else []

    # ----------------------------------------------------------------------- towers
    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> words [B, T, D], sent [B, D] (end-of-text feature), mask [B, T].

        Every token goes through ln_final and the text projection, so words and sentences
        share the joint space; the mask is True only at real words (no SOT/EOT/padding).
        """
        clip = self.clip
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the CLIP context of {self.context_length}")
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:length].to(cast)
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        x = clip.ln_final(clip.transformer(x, attn_mask=mask))
        proj = clip.text_projection
        words = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        eot = tokens.argmax(dim=-1)  # the end-of-text id is the largest in the vocabulary
        sent = words[torch.arange(tokens.shape[0], device=tokens.device), eot]
        positions = torch.arange(length, device=tokens.device)
        word_mask = (positions[None] > 0) & (positions[None] < eot[:, None])
        return words, sent, word_mask

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size -> CLIP input (resized, mean/std normalised)."""
        x = (images.float() + 1.0) * 0.5
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = resize_bicubic(x, self.image_size, antialias=x.shape[-1] > self.image_size)
        return ((x - self.mean) / self.std).to(images.dtype)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> regions [B, R, D], code [B, D]."""
        visual = self.clip.visual
        if isinstance(visual, ModifiedResNet):
            regions, code = _resnet_regions(visual, self.prepare_images(images))
        else:
            code, tokens = visual(self.prepare_images(images))
            regions = tokens @ visual.proj if visual.proj is not None else tokens
        if self.adapter is not None:
            regions = self.adapter(regions)
        return regions, code

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> tuple:
        """Both towers (the entry point DistributedDataParallel wraps)."""
        return (*self.encode_text(tokens), *self.encode_image(images))


# =============================================================================== DM-GAN
# Generator and discriminators of DM-GAN (Zhu et al., CVPR 2019), conditioned on CLIP word and
# sentence features (docs/DESIGN.md §8), with the widths and layers of the DM-GAN release.
# /2: the memory stages and discriminators as DM-GAN releases them (2·ngf memory, SN D);
# /1 checkpoints hold the earlier, narrower networks and cannot be loaded into these
GENERATOR_FORMAT = "dmgan-generator/2"


def gan_arch(cfg, text_dim: int) -> dict:
    """The architecture numbers a generator checkpoint records (to explain a mismatch)."""
    base = int(cfg.TREE.BASE_SIZE)
    if base < 8 or base & (base - 1):
        raise ValueError(f"TREE.BASE_SIZE must be a power of two >= 8, got {base}")
    branches = int(cfg.TREE.BRANCH_NUM)
    if not 1 <= branches <= 3:
        raise ValueError(f"TREE.BRANCH_NUM must be 1, 2 or 3, got {branches}")
    return {"BRANCH_NUM": branches, "BASE_SIZE": base, "GF_DIM": int(cfg.GAN.GF_DIM),
            "DF_DIM": int(cfg.GAN.DF_DIM), "Z_DIM": int(cfg.GAN.Z_DIM),
            "CONDITION_DIM": int(cfg.GAN.CONDITION_DIM), "R_NUM": int(cfg.GAN.R_NUM),
            "TEXT_DIM": int(text_dim)}


def _up_block(cin: int, cout: int) -> nn.Sequential:
    """Nearest 2x upsampling, 3x3 conv, batch norm, GLU (halves 2*cout channels to cout)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(cin, cout * 2, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(cout * 2), nn.GLU(dim=1))


class ResBlock(nn.Module):
    """x + BN(conv(GLU(BN(conv(x))))) at constant width."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch * 2, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(ch * 2), nn.GLU(dim=1),
                                  nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CondAugment(nn.Module):
    """Conditioning augmentation: sentence -> (mu, logvar) -> c = mu + sigma * eps."""

    def __init__(self, text_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(text_dim, cond_dim * 4)
        self.cond_dim = cond_dim

    def forward(self, sent: torch.Tensor, eps: torch.Tensor | None = None) -> tuple:
        h = F.glu(self.fc(sent), dim=-1)
        mu, logvar = h[:, : self.cond_dim], h[:, self.cond_dim:]
        if eps is None:
            eps = torch.randn_like(mu)
        return mu + eps.to(mu.dtype) * torch.exp(0.5 * logvar), mu, logvar


class InitStage(nn.Module):
    """z ⊕ c -> FC -> 4x4 -> log2(BASE_SIZE/4) up-blocks -> [B, GF_DIM, BASE_SIZE, BASE_SIZE]."""

    def __init__(self, in_dim: int, gf_dim: int, base_size: int) -> None:
        super().__init__()
        n_up = int(math.log2(base_size // 4))
        self.ch = gf_dim * 2**n_up
        self.fc = nn.Sequential(nn.Linear(in_dim, self.ch * 16 * 2, bias=False),
                                nn.BatchNorm1d(self.ch * 16 * 2), nn.GLU(dim=1))
        self.ups = nn.Sequential(*[_up_block(self.ch // 2**i, self.ch // 2 ** (i + 1))
                                   for i in range(n_up)])

    def forward(self, z_c: torch.Tensor) -> torch.Tensor:
        return self.ups(self.fc(z_c).view(-1, self.ch, 4, 4))


class MemoryStage(nn.Module):
    """One dynamic-memory refinement stage as DM-GAN releases it (docs/DESIGN.md §8): memory
    writing from the words and the detached pooled image feature, key addressing by raw dot
    products over the real words, value reading, response gate; the fused feature, doubled to
    2·ch, then goes through the residual blocks and a 2·ch -> ch up-block."""

    def __init__(self, ch: int, text_dim: int, r_num: int) -> None:
        super().__init__()
        self.gate_word = nn.Linear(text_dim, 1, bias=False)              # A(w_i)
        self.gate_img = nn.Linear(ch, 1, bias=False)                     # B(r_avg)
        self.mem_word = nn.Sequential(nn.Linear(text_dim, ch * 2), nn.ReLU())  # M_w
        self.mem_img = nn.Sequential(nn.Linear(ch, ch * 2), nn.ReLU())         # M_r
        self.key = nn.Sequential(nn.Linear(ch * 2, ch), nn.ReLU())             # phi_K
        self.value = nn.Sequential(nn.Linear(ch * 2, ch), nn.ReLU())           # phi_V
        self.response = nn.Conv2d(ch * 2, 1, 1)      # response gate on [r_j, o_j]
        self.res = nn.Sequential(*[ResBlock(ch * 2) for _ in range(r_num)])
        self.up = _up_block(ch * 2, ch)

    def memory(self, h: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> tuple:
        """Gated memory read for image features h [B, C, H, W] given words [B, T, D] and the
        real-word mask [B, T]; returns (fused features [B, C, H, W], attention [B, T, H*W])."""
        b, c, hh, ww = h.shape
        words = words.to(h.dtype)
        r_avg = h.mean(dim=(2, 3)).detach()  # the release writes memory from a detached r_avg
        g_w = torch.sigmoid(self.gate_word(words) + self.gate_img(r_avg)[:, None])  # [B, T, 1]
        mem = self.mem_word(words) * g_w + self.mem_img(r_avg)[:, None] * (1 - g_w)  # [B, T, 2C]
        keys, values = self.key(mem), self.value(mem)                           # [B, T, C]
        logits = torch.bmm(keys, h.flatten(2))                                  # [B, T, N]
        real = mask.to(torch.bool)[:, :, None]
        logits = logits.masked_fill(~real, torch.finfo(logits.dtype).min)
        attn = torch.softmax(logits, dim=1) * real    # all-padding captions read nothing
        out = torch.bmm(values.transpose(1, 2), attn).view(b, c, hh, ww)        # [B, C, H, W]
        g_r = torch.sigmoid(self.response(torch.cat([h, out], dim=1)))          # [B, 1, H, W]
        return h * (1 - g_r) + out * g_r, attn

    def forward(self, h: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        fused, _ = self.memory(h, words, mask)
        return self.up(self.res(torch.cat([fused, fused], dim=1)))


class ImageHead(nn.Sequential):
    """3x3 conv to RGB + tanh: the image at one scale, in [-1, 1]."""

    def __init__(self, ch: int) -> None:
        super().__init__(nn.Conv2d(ch, 3, 3, 1, 1, bias=False), nn.Tanh())


class Generator(nn.Module):
    """DM-GAN generator: images at BASE_SIZE·2^i for i < BRANCH_NUM from noise + CLIP text."""

    def __init__(self, arch: dict) -> None:
        super().__init__()
        self.arch = dict(arch)
        gf, text_dim = arch["GF_DIM"], arch["TEXT_DIM"]
        self.ca = CondAugment(text_dim, arch["CONDITION_DIM"])
        self.init = InitStage(arch["Z_DIM"] + arch["CONDITION_DIM"], gf, arch["BASE_SIZE"])
        self.stages = nn.ModuleList(MemoryStage(gf, text_dim, arch["R_NUM"])
                                    for _ in range(arch["BRANCH_NUM"] - 1))
        self.heads = nn.ModuleList(ImageHead(gf) for _ in range(arch["BRANCH_NUM"]))

    def forward(self, z: torch.Tensor, sent: torch.Tensor, words: torch.Tensor,
                mask: torch.Tensor, eps: torch.Tensor | None = None) -> tuple:
        """-> (images: list over scales of [B, 3, s, s], mu, logvar)."""
        c, mu, logvar = self.ca(sent, eps)
        h = self.init(torch.cat([z, c.to(z.dtype)], dim=1))
        images = [self.heads[0](h)]
        for stage, head in zip(self.stages, self.heads[1:], strict=True):
            h = stage(h, words, mask)
            images.append(head(h))
        return images, mu, logvar


class FP32WeightConv2d(nn.Conv2d):
    """A convolution whose (parametrized) weight is computed outside autocast: spectral
    norm's power iteration and σ in fp32 (under bf16/fp16 autocast torch would run them in
    the low precision); the convolution itself still follows autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            weight = self.weight
        return self._conv_forward(x, weight, self.bias)


def _sn_conv(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Conv2d:
    """A spectrally normalised convolution with bias, as every D convolution of the release."""
    return spectral_norm(FP32WeightConv2d(cin, cout, kernel, stride, padding, bias=True))


def _down_block(cin: int, cout: int) -> list[nn.Module]:
    """4x4 stride-2 SN convolution + LeakyReLU(0.2) (the release's downBlock)."""
    return [_sn_conv(cin, cout, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]


def _conv3_block(cin: int, cout: int) -> list[nn.Module]:
    """3x3 SN convolution + LeakyReLU(0.2) (the release's Block3x3_leakRelu)."""
    return [_sn_conv(cin, cout, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True)]


def _logit(conv: nn.Conv2d, feats: torch.Tensor) -> torch.Tensor:
    """A 4x4 logit convolution over a 4x4 map, [B] logits: the same sum as `conv(feats)`,
    computed as one matrix product (a 4x4 convolution producing one pixel is a linear layer;
    its backward is ~5x cheaper on the CPU than the convolution's)."""
    return F.linear(feats.flatten(1), conv.weight.flatten(1), conv.bias).flatten()


def _border_taps(size: int, device: torch.device) -> torch.Tensor:
    """[size, size, 3, 3] 0/1: which taps of a 3x3, padding-1 convolution land inside a
    size x size map at each output position."""
    inside = torch.ones(size + 2, size + 2, device=device)
    inside[0], inside[-1], inside[:, 0], inside[:, -1] = 0, 0, 0, 0
    return inside.unfold(0, 3, 1).unfold(1, 3, 1)


class Discriminator(nn.Module):
    """One scale's D as DM-GAN releases it (D_NET64/128/256, D_GET_LOGITS): a trunk of
    spectrally normalised stride-2 convolutions to 4x4xDF_DIM·8, no BatchNorm, an unconditional
    logit, and a conditional logit on the features joined with the sentence embedding. The two
    4x4 logit convolutions are plain, as in the release.

    The joint 3x3 convolution over [features ⊕ sentence replicated 4x4] is evaluated as the
    sum it is: the features' part (once per image, however many sentences it is paired with)
    plus the sentence's part, which, the sentence being constant over the map, is a matrix
    product with the 3x3 taps summed over those inside the map at each position. Same function
    as the release's concatenation (tests/test_dmgan.py), a fraction of its convolutions."""

    def __init__(self, size: int, df_dim: int, text_dim: int) -> None:
        super().__init__()
        n_down = int(math.log2(size // 4))
        layers: list[nn.Module] = []
        for k in range(n_down):
            layers += _down_block(3 if k == 0 else df_dim * 2 ** (k - 1), df_dim * 2**k)
        ch, target = df_dim * 2 ** (n_down - 1), df_dim * 8
        while ch > target:  # 128 px and up: 3x3 convs back to DF_DIM·8 (D_NET128/256)
            layers += _conv3_block(ch, ch // 2)
            ch //= 2
        if ch < target:  # small test sizes: widen to DF_DIM·8
            layers += _conv3_block(ch, target)
        self.trunk = nn.Sequential(*layers)
        self.uncond = nn.Conv2d(target, 1, 4, 4)
        self.joint = nn.Sequential(*_conv3_block(target + text_dim, target))
        self.cond = nn.Conv2d(target, 1, 4, 4)

    def cond_logits(self, feats: torch.Tensor, sents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Conditional logits of trunk features [B, C, 4, 4] with each sentence batch of
        `sents` ([B·k, D]: k sentences per image, image-major repeats of the batch), [B·k]
        each: cond(LeakyReLU(joint(features ⊕ sentence)))."""
        conv, c = self.joint[0], feats.shape[1]
        with torch.autocast(feats.device.type, enabled=False):  # as FP32WeightConv2d
            weight = conv.weight  # one spectral-norm step per call, as one joint convolution
            taps = _border_taps(feats.shape[-1], feats.device).to(weight.dtype)
            per_position = torch.einsum("odij,yxij->doyx", weight[:, c:], taps).flatten(1)
        image_part = conv._conv_forward(feats, weight[:, :c], conv.bias)
        out = []
        for sent in sents:
            reps = sent.shape[0] // feats.shape[0]
            if reps * feats.shape[0] != sent.shape[0]:
                raise ValueError(f"{sent.shape[0]} sentences for {feats.shape[0]} images")
            text_part = (sent.to(per_position.dtype) @ per_position).view(-1, *image_part.shape[1:])
            tiled = image_part.repeat(reps, 1, 1, 1) if reps > 1 else image_part
            out.append(_logit(self.cond, self.joint[1](tiled + text_part.to(tiled.dtype))))
        return out

    def cond_logit(self, feats: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
        """Conditional logits [B·k] of trunk features [B, C, 4, 4] with sentences [B·k, D]."""
        return self.cond_logits(feats, [sent])[0]

    def forward(self, images: torch.Tensor, sent: torch.Tensor,
                wrong_sent: torch.Tensor | None = None) -> tuple:
        """-> (uncond [B], cond [B·k], cond with `wrong_sent` [B·k] or None). The trunk runs
        once; `sent` may hold k sentences per image ([B·k, D], image-major repeats of the
        batch: caption 1 of every image, then caption 2, ...), which reuse the image features.
        Both conditional heads are inside forward so DistributedDataParallel sees them."""
        feats = self.trunk(images)
        sents = [sent] if wrong_sent is None else [sent, wrong_sent]
        logits = self.cond_logits(feats, sents)
        return _logit(self.uncond, feats), logits[0], logits[1] if len(logits) > 1 else None


def build_discriminators(arch: dict) -> nn.ModuleList:
    """One discriminator per generator scale."""
    return nn.ModuleList(Discriminator(arch["BASE_SIZE"] * 2**i, arch["DF_DIM"], arch["TEXT_DIM"])
                         for i in range(arch["BRANCH_NUM"]))


def init_gan_weights(module: nn.Module) -> None:
    """The release's init: convolution and linear weights orthogonal (gain 1; the weight
    before spectral normalisation where there is one), linear biases zero, batch-norm weight
    N(1, 0.02) and bias zero; convolution biases keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            weight = (m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight")
                      else m.weight)
            with torch.no_grad():
                nn.init.orthogonal_(weight)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def generator_checkpoint(netG: Generator) -> dict:
    """What `netG_epoch_<N>.pth` holds: format tag, architecture numbers, weights."""
    return {"format": GENERATOR_FORMAT, "arch": dict(netG.arch),
            "state_dict": {k: v.detach().cpu() for k, v in netG.state_dict().items()}}


def load_generator(netG: Generator, path: str | Path) -> None:
    """Load `path` (our format, or a plain state_dict) into `netG`; a checkpoint of another
    architecture fails listing the mismatched keys and the differing architecture numbers."""
    state = load_checkpoint(path, "generator checkpoint")
    fmt = state.get("format")
    if isinstance(fmt, str) and fmt.startswith("dmgan-generator/") and fmt != GENERATOR_FORMAT:
        raise CheckpointError(f"{path} was written by an earlier version of this repository "
                              f"({fmt}; this version reads {GENERATOR_FORMAT}): the DM-GAN "
                              "networks now follow the release; train the generator again")
    arch = state.get("arch") if fmt == GENERATOR_FORMAT else None
    weights = state["state_dict"] if arch is not None else state
    try:
        load_state_strict(netG, weights, f"generator checkpoint {path}")
    except CheckpointError as err:
        if arch:
            diff = ", ".join(f"{k}: checkpoint {arch.get(k)} vs config {v}"
                             for k, v in netG.arch.items() if arch.get(k) != v)
            if diff:
                raise CheckpointError(f"{err} Architecture differences: {diff}") from None
        raise
