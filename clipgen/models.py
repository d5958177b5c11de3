"""CLIP-GEN's three models together (docs/DESIGN.md §13): the frozen VQGAN tokenizer, the frozen
CLIP encoder and the transformer; the transformer's checkpoints, which record both frozen
models' weight digests so that sampling with another tokenizer or encoder is one clear error;
and drawing images (with optional CLIP re-ranking) from conditioning embeddings.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from clipgen.gpt import CondGPT, GPTArch, sample_tokens
from clipgen.vq_trainer import CHECKPOINT_PATTERN as VQGAN_PATTERN
from clipgen.vqgan import VQModel
from datasets import image_sizes
from miscc.config import ConfigError
from miscc.training import inference_precision, memory_format, resolve_checkpoint
from miscc.utils import CheckpointError, load_checkpoint, load_state_strict
from model import ClipEncoder
from text_features import encoder_digest

GPT_FORMAT = "clipgen-gpt/1"
GPT_PATTERN = "gpt_epoch_*.pth"  # Model/gpt_epoch_<N>.pth (not gpt_step_<S>.pth)


def tokenizer_path(cfg) -> str:
    """CLIPGEN.VQGAN, or when empty the Model/ folder train_vqgan.py writes for this
    DATASET_NAME (its default OUTPUT_DIR), so a tokenizer and a transformer trained on the
    same data find each other without a path in either config."""
    return str(cfg.CLIPGEN.VQGAN) or str(Path("output") / f"{cfg.DATASET_NAME}_VQGAN" / "Model")


def load_tokenizer(cfg, device: torch.device, path: str = "") -> tuple[VQModel, Path]:
    """The frozen VQGAN of CLIPGEN.VQGAN (or `path`): a vqgan<N>.pth or the newest in a folder.
    Its image size must be the config's largest TREE size (the crops the cache encodes)."""
    found = resolve_checkpoint(path or tokenizer_path(cfg), VQGAN_PATTERN,
                               "VQGAN tokenizer (train_vqgan.py)", "CLIPGEN.VQGAN")
    vq = VQModel.from_checkpoint(found)
    size = max(image_sizes(cfg))
    if vq.arch.resolution != size:
        raise ConfigError(f"the tokenizer {found} works on {vq.arch.resolution} px images but "
                          f"the config's largest TREE size is {size} px; set TREE.BASE_SIZE "
                          f"{vq.arch.resolution} with TREE.BRANCH_NUM 1")
    return vq.eval().requires_grad_(False).to(
        device, memory_format=memory_format(bool(cfg.TRAIN.CHANNELS_LAST))), found


def gpt_arch(cfg, vq: VQModel, encoder: ClipEncoder) -> GPTArch:
    """The transformer's sizes: the tokenizer's codebook and grid, the encoder's width and the
    CLIPGEN section's layers."""
    c = cfg.CLIPGEN
    if int(c.N_EMBD) % int(c.N_HEAD):
        raise ConfigError(f"CLIPGEN.N_EMBD ({c.N_EMBD}) must be a multiple of CLIPGEN.N_HEAD "
                          f"({c.N_HEAD})")
    drop = float(c.CFG_DROP)
    if not 0.0 <= drop < 1.0:
        raise ConfigError(f"CLIPGEN.CFG_DROP is {drop}: expected a share in [0, 1)")
    return GPTArch(vocab=vq.arch.n_embed, tokens=vq.arch.tokens_side ** 2,
                   cond_dim=encoder.embed_dim, n_layer=int(c.N_LAYER), n_embd=int(c.N_EMBD),
                   n_head=int(c.N_HEAD), dropout=float(c.DROPOUT), null_cond=drop > 0)


def sources(vq_path: Path, vq: VQModel, encoder_name: str, encoder: ClipEncoder) -> dict:
    """What a transformer belongs to: each frozen model's file and weight digest."""
    return {"tokenizer": {"path": str(vq_path), "digest": encoder_digest(vq)},
            "encoder": {"path": encoder_name, "digest": encoder_digest(encoder)}}


def gpt_checkpoint(gpt: CondGPT, belongs_to: dict, **extra) -> dict:
    """The transformer's weights-only checkpoint (format, arch, frozen models' digests)."""
    return {"format": GPT_FORMAT, "arch": asdict(gpt.arch), "sources": belongs_to,
            "state_dict": {k: v.detach().cpu() for k, v in gpt.state_dict().items()}, **extra}


def check_sources(found: dict, expect: dict, source: str) -> None:
    """A CheckpointError when `found` (a checkpoint's `sources`) names other frozen models'
    weights than `expect` (the ones loaded now)."""
    keys = {"tokenizer": "CLIPGEN.VQGAN", "encoder": "TRAIN.NET_E"}
    for what, key in keys.items():
        was, now = found[what], expect[what]
        if was["digest"] != now["digest"]:
            raise CheckpointError(
                f"{source} was trained with the {what} {was['path']} (weights "
                f"{was['digest'][:12]}), but {key} loads {now['path']} (weights "
                f"{now['digest'][:12]}); point {key} at the {what} it was trained with")


def load_gpt(path: Path, expect: dict) -> CondGPT:
    """The transformer saved at `path`, after checking it belongs to the loaded tokenizer and
    encoder (`expect`: `sources` of them)."""
    state = load_checkpoint(path, "CLIP-GEN transformer checkpoint")
    if state.get("format") != GPT_FORMAT:
        raise CheckpointError(f"{path} is not a CLIP-GEN transformer checkpoint of "
                              f"train_clipgen.py (format {state.get('format')!r}, expected "
                              f"{GPT_FORMAT})")
    check_sources(state["sources"], expect, str(path))
    gpt = CondGPT(GPTArch(**state["arch"]))
    load_state_strict(gpt, state["state_dict"], f"transformer in {path}")
    return gpt


def pair_margin(codes: torch.Tensor, texts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Re-ranking score [M] of image codes [M, D] against text codes [M, 1 + K, D] (the
    caption, then its one-edit variants; mask [M, K], True = a real variant): cos(code,
    caption) − the largest cos(code, variant); cos(code, caption) alone without variants."""
    cos = F.cosine_similarity(codes.float()[:, None], texts.float(), dim=-1)
    worst = cos[:, 1:].masked_fill(~mask, float("-inf")).amax(1)
    return cos[:, 0] - torch.where(mask.any(1), worst, torch.zeros_like(worst))


@torch.no_grad()
def draw_images(cfg, gpt: CondGPT, vq: VQModel, cond: torch.Tensor, ids: torch.Tensor,
                encoder: ClipEncoder | None = None,
                pair_texts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Images [B, 3, R, R] in [-1, 1] for conditioning embeddings cond [B, E]; row b's draw
    depends only on (SEED, ids[b]). With CLIPGEN.CANDIDATES N > 1 (and an encoder), N are
    drawn per row (ids b·N + j) and the one whose CLIP image embedding is closest to its
    condition is kept (CLIP-GEN's re-ranking); with `pair_texts` (text codes [B, 1 + K, D] of
    each row's caption and its one-edit variants, mask [B, K]) the best `pair_margin`."""
    c, side = cfg.CLIPGEN, vq.arch.tokens_side
    ids = ids.to(cond.device)
    n = max(1, int(c.CANDIDATES)) if encoder is not None else 1
    if n > 1:
        cond = cond.repeat_interleave(n, 0)
        ids = ids.repeat_interleave(n) * n + torch.arange(n).repeat(len(ids)).to(ids)
    was_training = gpt.training
    gpt.eval()
    guidance = float(c.GUIDANCE)
    if guidance and gpt.null is None:
        raise ConfigError(f"CLIPGEN.GUIDANCE {guidance} needs a transformer trained with "
                          "CLIPGEN.CFG_DROP > 0 (a learned unconditional prefix)")
    with inference_precision(cfg, cond.device):
        tokens = sample_tokens(gpt, cond, ids, int(cfg.SEED), int(c.TOP_K), float(c.TOP_P),
                               float(c.TEMPERATURE), guidance=guidance)
        gpt.train(was_training)
        images = vq.decode_indices(tokens.view(-1, side, side)).float().clamp(-1, 1)
        if n == 1:
            return images
        codes = encoder.encode_image(images)[1].float()
    if pair_texts is None:
        scores = F.cosine_similarity(codes, cond.float(), dim=-1)
    else:
        texts, mask = pair_texts
        scores = pair_margin(codes, texts.repeat_interleave(n, 0).to(codes.device),
                             mask.repeat_interleave(n, 0).to(codes.device))
    best = scores.view(-1, n).argmax(1)
    return images.view(-1, n, *images.shape[1:])[torch.arange(len(best)), best]
