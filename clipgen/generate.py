"""CLIP-GEN's evaluation and custom captions, exactly as stage 2 does them (docs/DESIGN.md §9,
§13): `sampling.evaluate_test_set` writes `valid/single/<key>_s<k>.png` and metrics.json with
the same fields, here drawn by the transformer from each caption's CLIP text embedding (or,
with CLIPGEN.CONDITION image, from the test image's own embedding: the upper bound, written
under `<OUTPUT_DIR>/image_condition/`). metrics.json also gets the modality gap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from clipgen.data import is_layout
from clipgen.gpt import CondGPT
from clipgen.models import GPT_PATTERN, draw_images, load_gpt, load_tokenizer, sources
from clipgen.trainer import encoder_name
from clipgen.vqgan import VQModel
from datasets import DataError, TextImageDataset
from miscc.config import ConfigError
from miscc.minimal_pairs import one_edit_negatives, word_lists_for
from miscc.training import inference_precision, resolve_checkpoint
from miscc.utils import is_main_process
from model import ClipEncoder
from sampling import caption_file_grids, evaluate_test_set, test_split
from text_features import load_frozen_encoder, text_feature_cache

GAP_IMAGES = 1000  # test images (all their captions) the modality gap is measured on


def has_captions(cfg) -> bool:
    """Whether DATA_DIR is an AttnGAN layout (captions), not a plain folder of images."""
    return is_layout(Path(str(cfg.DATA_DIR)))


def load_models(cfg, device: torch.device) -> tuple[CondGPT, VQModel, ClipEncoder, Path]:
    """(transformer, tokenizer, encoder, transformer file): CLIPGEN.NET (default: this run's
    newest gpt_epoch_<N>.pth), checked against the tokenizer and encoder the config loads."""
    path = resolve_checkpoint(str(cfg.CLIPGEN.NET) or str(Path(cfg.OUTPUT_DIR) / "Model"),
                              GPT_PATTERN, "CLIP-GEN transformer (train_clipgen.py)",
                              "CLIPGEN.NET")
    encoder = load_frozen_encoder(cfg, device)
    vq, vq_path = load_tokenizer(cfg, device)
    gpt = load_gpt(path, sources(vq_path, vq, encoder_name(cfg), encoder))
    if is_main_process():
        print(f"transformer: {path}\ntokenizer: {vq_path}")
    return gpt.eval().requires_grad_(False).to(device), vq, encoder, path


def test_images(data: TextImageDataset, idx: torch.Tensor) -> torch.Tensor:
    """Centre crops [B, 3, S, S] (largest size) of test images `idx`."""
    return torch.stack([data[int(i)]["imgs"][-1][0] for i in idx])


@torch.no_grad()
def modality_gap(encoder: ClipEncoder, data: TextImageDataset, sent: torch.Tensor,
                 device: torch.device, limit: int = GAP_IMAGES, batch: int = 64) -> dict:
    """How far the CLIP text embeddings the transformer is prompted with sit from the image
    embeddings it was trained on, over the first `limit` test images and all their captions
    (unit vectors): mean cosine of each caption with its own image and with another image,
    and the length of the offset between the two means."""
    n = min(limit, len(data))
    image = torch.cat([encoder.encode_image(test_images(data, part).to(device))[1].float().cpu()
                       for part in torch.arange(n).split(batch)])
    image = F.normalize(image, dim=-1)
    owner = torch.arange(n).repeat_interleave(data.num_captions[:n])
    cap = torch.cat([torch.arange(int(k)) for k in data.num_captions[:n]])
    text = F.normalize(sent[owner, cap].float(), dim=-1)
    other = (owner + 1) % n
    return {"images": n, "captions": len(text),
            "paired_cosine": float((text * image[owner]).sum(-1).mean()),
            "unpaired_cosine": float((text * image[other]).sum(-1).mean()),
            "mean_offset": float((text.mean(0) - image.mean(0)).norm())}


@torch.no_grad()
def pair_reranker(cfg, data: TextImageDataset, encoder: ClipEncoder, device: torch.device
                  ) -> Callable[[torch.Tensor, torch.Tensor], tuple] | None:
    """With CLIPGEN.RERANK pairs (and CANDIDATES > 1): (image indices, caption indices) ->
    the `draw_images` pair_texts of those captions: the encoder's codes of each caption and
    its TRAIN.MINIMAL_PAIR_EDITS one-edit variants (seed SEED + n·C + c), and their mask."""
    c = cfg.CLIPGEN
    if str(c.RERANK) != "pairs" or int(c.CANDIDATES) <= 1:
        return None
    lists = word_lists_for(cfg)
    if lists is None:
        raise ConfigError("CLIPGEN.RERANK pairs ranks candidates against one-edit variants of "
                          "the caption: set TEXT.WORD_LISTS (a stem of cfg/words/, e.g. shapes)")
    k, per_image = int(cfg.TRAIN.MINIMAL_PAIR_EDITS), int(cfg.TEXT.CAPTIONS_PER_IMAGE)

    @torch.no_grad()
    def texts_of(idx: torch.Tensor, cap: torch.Tensor) -> tuple:
        rows, mask = [], torch.zeros(len(idx), k, dtype=torch.bool)
        for r, (i, j) in enumerate(zip(idx.tolist(), cap.tolist(), strict=True)):
            caption = data.info.captions[i][j]
            edits = one_edit_negatives(caption, lists, k, int(cfg.SEED) + i * per_image + j)
            mask[r, : len(edits)] = True
            rows += [caption, *edits, *[caption] * (k - len(edits))]
        codes = encoder.encode_text(data.tokenizer(rows).to(device))[1].float()
        return codes.view(len(idx), 1 + k, -1), mask

    return texts_of


def evaluate(cfg, device: torch.device, progress: bool = True,
             models: tuple[CondGPT, VQModel, ClipEncoder, str] | None = None) -> dict | None:
    """Draw and score the test split (CLIPGEN.CONDITION text or image) with `models` (the
    ones just trained) or `load_models`; rank 0 returns the metrics (also in
    `<out>/metrics.json`, out = OUTPUT_DIR, or its image_condition/)."""
    if not has_captions(cfg):
        raise DataError(f"DATA_DIR {cfg.DATA_DIR} is a folder of images without captions: the "
                        "test-split evaluation needs a captioned layout (e.g. --data_dir "
                        "data/coco); draw text prompts with --captions FILE")
    gpt, vq, encoder, path = models or load_models(cfg, device)
    data = test_split(cfg)
    condition = str(cfg.CLIPGEN.CONDITION)

    rerank = pair_reranker(cfg, data, encoder, device)

    def make_images(pairs: torch.Tensor, idx: torch.Tensor, cap: torch.Tensor,
                    text: tuple) -> torch.Tensor:
        cond = (text[1] if condition == "text" else
                encoder.encode_image(test_images(data, idx).to(device))[1].float())
        return draw_images(cfg, gpt, vq, cond, pairs, encoder,
                           rerank(idx, cap) if rerank is not None else None)

    c = cfg.CLIPGEN
    source = {"generator": "CLIP-GEN", "checkpoint": str(path), "condition": condition,
              "sampling": {"top_k": int(c.TOP_K), "top_p": float(c.TOP_P),
                           "temperature": float(c.TEMPERATURE),
                           "candidates": int(c.CANDIDATES), "rerank": str(c.RERANK)}}
    with inference_precision(cfg, device):
        text = text_feature_cache(cfg, "test", data.tokens, encoder, device, progress)
        if is_main_process():
            source["modality_gap"] = modality_gap(encoder, data, text.sent, device)
        out = Path(cfg.OUTPUT_DIR) / ("image_condition" if condition == "image" else "")
        return evaluate_test_set(cfg, device, encoder, data, make_images, source, out,
                                 progress, text)


@torch.no_grad()
def generate_custom(cfg, device: torch.device, captions: str | None = None) -> list[Path]:
    """One grid per caption file under `<OUTPUT_DIR>/examples/`; line k is drawn with seed id k."""
    gpt, vq, encoder, _ = load_models(cfg, device)

    def make_images(lines: torch.Tensor, text: tuple) -> torch.Tensor:
        return draw_images(cfg, gpt, vq, text[1], lines.to(device), encoder)

    return caption_file_grids(cfg, device, encoder, captions, make_images)
