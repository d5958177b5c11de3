"""Networks: `ClipEncoder` (CLIP towers with word and region outputs).

The DM-GAN generator and discriminators are added with the stage-2 work.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.pretrained import get_pretrained_cfg
from open_clip.transformer import VisionTransformer
from torch import nn

from miscc.utils import CheckpointError, load_checkpoint, load_state_strict

ENCODER_FORMAT = "clip-damsm-encoder/1"
CLIP_ARCH_DIR = Path(__file__).resolve().parent / "cfg" / "clip"
_HF_NAME = re.compile(r"^openai/clip-vit-(base|large)-patch(\d+)(-336)?$")


class EncoderLoadError(RuntimeError):
    """CLIP weights or an encoder checkpoint could not be loaded (says what and how to fix)."""


def resolve_clip_name(name: str, pretrained: str) -> dict:
    """Map a CLIP name to a spec {'model', 'pretrained', 'arch'} (see DESIGN §5).

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
                "pretrained": pretrained or "openai", "arch": None}
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
    quick_gelu = False
    if tag and not Path(tag).is_file():
        quick_gelu = bool((get_pretrained_cfg(spec["model"], tag) or {}).get("quick_gelu"))
    elif spec["pretrained"] == "openai":
        quick_gelu = True  # rebuilding an OpenAI-initialised encoder from our checkpoint
    try:
        return open_clip.create_model(spec["model"], pretrained=tag or None,
                                      force_quick_gelu=quick_gelu,
                                      require_pretrained=bool(tag))
    except Exception as err:  # download failure, missing file, unknown tag
        raise EncoderLoadError(
            f"could not load CLIP weights for model {spec['model']!r} (pretrained={tag!r}): "
            f"{type(err).__name__}: {err}\n"
            "Without network access, download the weights file elsewhere (e.g. open_clip's "
            f"`open_clip.create_model('{spec['model']}', pretrained='{tag}')` caches it) and "
            "pass its path: --set CLIP.PRETRAINED=/path/to/weights.bin (or .pt/.safetensors)"
        ) from err


class ClipEncoder(nn.Module):
    """CLIP text and image towers returning per-word and per-region features in the joint space.

    Images enter in the GAN's range [-1, 1] at any size; resizing and CLIP's mean/std
    normalisation happen inside, differentiably, so the DAMSM loss reaches the generator.
    """

    def __init__(self, spec: dict, adapter: bool = True, load_weights: bool = True) -> None:
        super().__init__()
        self.spec = dict(spec)
        self.clip = _create_clip(spec, load_weights)
        if not isinstance(self.clip.visual, VisionTransformer):
            raise EncoderLoadError(
                f"CLIP model {spec['model']!r} has no ViT image tower; region features need a "
                "ViT (e.g. ViT-B/32)"
            )
        if not hasattr(self.clip, "token_embedding"):
            raise EncoderLoadError(f"CLIP model {spec['model']!r} has a custom text tower; "
                                   "only the standard CLIP text transformer is supported")
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
                "arch": json.loads(state["arch"]) if state["arch"] else None}
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
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=x.shape[-1] > self.image_size)
        return ((x - self.mean) / self.std).to(images.dtype)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> regions [B, R, D], code [B, D]."""
        visual = self.clip.visual
        code, tokens = visual(self.prepare_images(images))
        regions = tokens @ visual.proj if visual.proj is not None else tokens
        if self.adapter is not None:
            regions = self.adapter(regions)
        return regions, code

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> tuple:
        """Both towers (the entry point DistributedDataParallel wraps)."""
        return (*self.encode_text(tokens), *self.encode_image(images))
