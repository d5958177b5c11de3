"""Stage-2 evaluation: generate an image for every test caption (+ R-precision, CLIP score),
or a grid per custom caption file, with the EMA generator of TRAIN.NET_G.

Noise is drawn once from SEED for all captions, so the images do not depend on the number of
processes: under torchrun each rank generates every world-th caption and rank 0 gathers the
CLIP codes for the metrics.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from datasets import CaptionTokenizer, DataError, TextImageDataset, image_sizes
from miscc.judge import EvalJudge
from miscc.minimal_pairs import word_lists_for
from miscc.pair_metric import format_pair_accuracy, generated_pair_accuracy, text_scorer
from miscc.pictures import save_caption_grid, save_png_file, to_uint8
from miscc.protocol import eval_items
from miscc.training import inference_precision, resolve_checkpoint
from miscc.utils import atomic_write_bytes, barrier, is_main_process
from model import ClipEncoder, Generator, gan_arch, load_generator
from r_precision import independent_entry, load_independent_encoder, report_lines, score_generated
from text_features import TextFeatures, load_frozen_encoder, text_feature_cache


def generator_for_eval(cfg, encoder: ClipEncoder, device: torch.device) -> Generator:
    """The EMA generator of TRAIN.NET_G (file, or the newest netG_epoch_*.pth of a directory)."""
    path = resolve_checkpoint(cfg.TRAIN.NET_G, "netG_epoch_*.pth", "generator checkpoint",
                              "TRAIN.NET_G")
    netG = Generator(gan_arch(cfg, encoder.embed_dim))
    load_generator(netG, path)
    if is_main_process():
        print(f"generator: {path}")
    return netG.eval().requires_grad_(False).to(device)


def seeded_noise(cfg, count: int, arch: dict, offset: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [count, Z], eps [count, C]) from SEED (and `offset`, which names another stream): the
    same for every rank and every run."""
    g = torch.Generator().manual_seed(int(cfg.SEED) + 1_000_003 * offset)
    return (torch.randn(count, arch["Z_DIM"], generator=g),
            torch.randn(count, arch["CONDITION_DIM"], generator=g))


def _gather(items: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All ranks' (items, *per-item tensors) on every rank, in caption order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return (items, *tensors)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (items, *tensors))
    items = torch.cat([p[0] for p in parts])
    order = torch.argsort(items[:, 0] * 1_000_000 + items[:, 1])
    return (items[order], *(torch.cat([p[j] for p in parts])[order]
                            for j in range(1, len(tensors) + 1)))


# images [B, 3, H, W] in [-1, 1] for (pair ids [B]: positions among all the split's (image,
# caption) pairs, which seed the draws; image indices [B]; caption indices [B]; the captions'
# (words, sent, mask) features on the device)
MakeImages = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple], torch.Tensor]


def test_split(cfg) -> TextImageDataset:
    """The test split with its captions, centre crops, no image cache (what evaluation reads)."""
    return TextImageDataset(cfg, "test", CaptionTokenizer(int(cfg.TEXT.WORDS_NUM)),
                            image_sizes(cfg), train=False, use_cache=False)


@torch.no_grad()
def evaluate_test_set(cfg, device: torch.device, encoder: ClipEncoder, data: TextImageDataset,
                      make_images: MakeImages, source: dict, out_root: Path | None = None,
                      progress: bool = True, text: TextFeatures | None = None) -> dict | None:
    """The evaluation both generators share (docs/DESIGN.md §9): `make_images` draws the test
    pairs of `eval_items`, shared out over processes; each is written as
    `<out_root>/valid/single/<key>_s<k>.png` (out_root: OUTPUT_DIR) and scored as saved (8-bit)
    with the encoder, the independent scorer and the shapes judge when configured; rank 0
    writes `<out_root>/metrics.json` (with `source` merged in) and returns it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    judge = EvalJudge.from_config(cfg, data.info)  # load problems end the run before drawing
    other, other_info = load_independent_encoder(cfg, device) or (None, None)
    if text is None:  # the caption features, unless the caller has them open already
        text = text_feature_cache(cfg, "test", data.tokens, encoder, device, progress)
    other_text = (text_feature_cache(cfg, "test", data.tokens, other, device, progress)
                  if other is not None else None)
    items, pick, protocol = eval_items(cfg, data.num_captions)
    out_root = Path(cfg.OUTPUT_DIR) if out_root is None else out_root
    out_dir = out_root / "valid" / "single"
    mine = torch.arange(rank, len(items), world)
    codes, other_codes, preds = [], [], []
    for chunk in tqdm(mine.split(int(cfg.TRAIN.BATCH_SIZE)), desc="generating test images",
                      disable=not (progress and is_main_process())):
        idx, cap = items[chunk, 0], items[chunk, 1]
        features = tuple(t.to(device) for t in text.lookup(idx, cap))
        pixels = to_uint8(make_images(pick[chunk], idx, cap, features))
        for pic, i, k in zip(pixels, idx.tolist(), cap.tolist(), strict=True):
            save_png_file(pic, out_dir / f"{data.keys[i]}_s{k}.png")
        # score exactly what was saved (the 8-bit PNG), as r_precision.py reads it back
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x_dev = x.to(device)
        codes.append(encoder.encode_image(x_dev)[1].float().cpu())
        if other is not None:
            other_codes.append(other.encode_image(x_dev)[1].float().cpu())
        if judge is not None:
            preds.append(judge.predict(x))
    codes_t = torch.cat(codes) if codes else torch.zeros(0, encoder.embed_dim)
    extra = []
    if other is not None:
        extra.append(torch.cat(other_codes) if other_codes else torch.zeros(0, other.embed_dim))
    if judge is not None:
        extra.append(torch.cat(preds) if preds else judge.empty())
    all_items, all_codes, *all_extra = _gather(items[mine], codes_t, *extra)
    result = None
    if is_main_process():
        result = score_generated(all_codes, all_items, text.sent, data.class_ids,
                                 data.num_captions, seed=int(cfg.SEED))
        result.update(path=str(out_dir), **source, processes=world, protocol=protocol)
        other_codes_all = all_extra.pop(0) if other is not None else None
        if other is not None:
            result["independent"] = independent_entry(
                other_info, other_codes_all, all_items, other_text.sent, data.class_ids,
                data.num_captions, int(cfg.SEED))
        add_pair_accuracy(cfg, result, data, all_items, all_codes, encoder, other_codes_all,
                          other, device)
        if judge is not None:
            result.update(judge.metrics(all_items, all_extra.pop(0)))
        metrics = out_root / "metrics.json"
        atomic_write_bytes(metrics, json.dumps(result, indent=2).encode())
        print("\n".join(report_lines(result)) + f"\nwrote {len(all_items)} images to {out_dir} "
              f"and {metrics}")
    barrier()
    return result


def add_pair_accuracy(cfg, result: dict, data: TextImageDataset, items: torch.Tensor,
                      codes: torch.Tensor, encoder: ClipEncoder,
                      other_codes: torch.Tensor | None, other: ClipEncoder | None,
                      device: torch.device) -> None:
    """With TEXT.WORD_LISTS: the generated images' minimal-pair accuracy (docs/DESIGN.md §14),
    each image against its own caption's one-edit variants, scored by the training encoder
    (`result["minimal_pairs"]`) and by the independent scorer
    (`result["independent"]["minimal_pairs"]`); both generators' evaluations come here."""
    lists = word_lists_for(cfg)
    if lists is None or not len(items):
        return
    captions = [data.info.captions[i][k] for i, k in items.tolist()]
    e = cfg.EVAL
    scorers = [(result, codes, encoder, "training encoder")]
    if other is not None and other_codes is not None:
        scorers.append((result["independent"], other_codes, other, "independent scorer"))
    for entry, scorer_codes, scorer, title in scorers:
        entry["minimal_pairs"] = generated_pair_accuracy(
            scorer_codes, captions, lists, text_scorer(scorer, data.tokenizer, device),
            int(e.MINIMAL_PAIR_IMAGES), int(e.MINIMAL_PAIR_VARIANTS), int(cfg.SEED))
        print(f"minimal pairs, generated images, {title}: "
              f"{format_pair_accuracy(entry['minimal_pairs'])}")


@torch.no_grad()
def generate_test_set(cfg, device: torch.device, progress: bool = True) -> dict | None:
    """DM-GAN's evaluation: the EMA generator of TRAIN.NET_G draws every test pair of
    `eval_items` with the pair's own seeded noise (`evaluate_test_set` writes and scores)."""
    encoder = load_frozen_encoder(cfg, device)
    netG = generator_for_eval(cfg, encoder, device)
    data = test_split(cfg)
    z, eps = seeded_noise(cfg, int(data.num_captions.sum()), netG.arch)  # one per caption

    def make_images(pairs: torch.Tensor, idx: torch.Tensor, cap: torch.Tensor,
                    text: tuple) -> torch.Tensor:
        words, sent, mask = text
        return netG(z[pairs].to(device), sent, words, mask, eps[pairs].to(device))[0][-1]

    with inference_precision(cfg, device):
        return evaluate_test_set(cfg, device, encoder, data, make_images,
                                 {"generator": str(cfg.TRAIN.NET_G)}, progress=progress)


def caption_files(cfg, captions: str | None) -> list[tuple[str, Path]]:
    """(name, file) pairs: `--captions FILE`, or the files `<DATA_DIR>/example_filenames.txt`
    lists (one name per line, relative to DATA_DIR, `.txt` optional)."""
    if captions:
        path = Path(captions)
        if not path.is_file():
            raise DataError(f"caption file not found: {path}")
        return [(path.stem, path)]
    listing = Path(cfg.DATA_DIR) / "example_filenames.txt"
    if not listing.is_file():
        raise DataError(f"{listing} not found: list caption files there (one name per line) "
                        "or pass --captions FILE")
    out = []
    for line in listing.read_text().splitlines():
        name = line.strip()
        if not name:
            continue
        path = Path(cfg.DATA_DIR) / (name if name.endswith(".txt") else f"{name}.txt")
        if not path.is_file():
            raise DataError(f"{listing} names {name!r} but {path} does not exist")
        out.append((Path(name).stem, path))
    return out


# images [B, 3, H, W] in [-1, 1] for (line numbers [B] in the caption file, which seed the
# draws; the captions' (words, sent, mask) features on the device)
MakeCaptionImages = Callable[[torch.Tensor, tuple], torch.Tensor]


@torch.no_grad()
def caption_file_grids(cfg, device: torch.device, encoder: ClipEncoder, captions: str | None,
                       make_images: MakeCaptionImages, out_root: Path | None = None
                       ) -> list[Path]:
    """One grid per caption file (`caption_files`) under `<out_root>/examples/` (plus each image
    alone as `examples/<name>/<k>.png`), drawn by `make_images` (out_root: OUTPUT_DIR)."""
    tokenizer = CaptionTokenizer(int(cfg.TEXT.WORDS_NUM))
    out = (Path(cfg.OUTPUT_DIR) if out_root is None else out_root) / "examples"
    written = []
    for name, path in caption_files(cfg, captions):
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            warnings.warn(f"{path} has no captions; skipped", stacklevel=2)
            continue
        before = tokenizer.truncated
        tokens = tokenizer(lines)
        if tokenizer.truncated > before:
            warnings.warn(f"{path}: {tokenizer.truncated - before} caption(s) cut to "
                          f"TEXT.WORDS_NUM={cfg.TEXT.WORDS_NUM} word tokens", stacklevel=2)
        images = []
        for part in torch.arange(len(lines)).split(int(cfg.TRAIN.BATCH_SIZE)):
            words, sent, mask = encoder.encode_text(tokens[part].to(device))
            images.append(make_images(part, (words.float(), sent.float(), mask)).float().cpu())
        batch = torch.cat(images)
        for k, pic in enumerate(to_uint8(batch)):
            save_png_file(pic, out / name / f"{k}.png")
        written.append(save_caption_grid(batch, lines, out / f"{name}.png"))
        print(f"{path}: {len(lines)} captions -> {written[-1]}")
    return written


@torch.no_grad()
def generate_custom(cfg, device: torch.device, captions: str | None = None) -> list[Path]:
    """DM-GAN's custom captions: one grid per caption file, noise seeded per line."""
    encoder = load_frozen_encoder(cfg, device)
    netG = generator_for_eval(cfg, encoder, device)

    def make_images(lines: torch.Tensor, text: tuple) -> torch.Tensor:
        # line k's noise comes from (SEED, k): the same whatever the file's length
        noise = [seeded_noise(cfg, 1, netG.arch, offset=int(k)) for k in lines]
        z, eps = (torch.cat([n[j] for n in noise]).to(device) for j in (0, 1))
        words, sent, mask = text
        return netG(z, sent, words, mask, eps)[0][-1]

    with inference_precision(cfg, device):
        return caption_file_grids(cfg, device, encoder, captions, make_images)
