"""R-precision and CLIP score of generated test images (docs/DESIGN.md §9).

R-precision: for each generated image, its true caption is ranked among itself and 99
captions of other classes by cosine(CLIP image code, sentence embedding); the score is the
fraction ranked first, as mean ± std over 10 folds of a seeded shuffle of the images (as
DM-GAN forms them). CLIP score: 100·max(cos, 0), averaged.

The training encoder (TRAIN.NET_E) is the one the generator was optimised against, so it can
be flattered; EVAL.INDEPENDENT_ENCODER adds the same scores from a second encoder (for
bird/coco an off-the-shelf CLIP ViT-B/32, the CLIP-R-precision of Park et al. 2021), and on a
shapes set the shapes judge (miscc/judge.py) says how often each attribute a caption names is
drawn.

As a script it scores an existing tree `<DIR>/<key>_s<k>.png` (main.py's evaluation layout, or
any model's images laid out the same way) with the dataset and encoder of the config:

    python r_precision.py --cfg cfg/eval_clip_shapes.yml [--path DIR] [--json] [--independent NAME]
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

NEGATIVES = 99
FOLDS = 10


def _distinct_draws(sizes: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """[M, k] integers, row m a uniform random k-subset of range(sizes[m]) (sizes >= k).

    Large ranges: draw with replacement and redraw the repeats until none is left (a repeat
    has probability < k/size, so this takes a few rounds). Ranges under 4k: random keys over
    the whole (small) range, the k smallest. Both are O(M·k) for the evaluation splits.
    """
    out = torch.empty(len(sizes), k, dtype=torch.long)
    small = sizes < 4 * k
    if small.any():
        width = int(sizes[small].max())
        keys = torch.rand(int(small.sum()), width, generator=g)
        keys[torch.arange(width)[None] >= sizes[small][:, None]] = 2.0  # outside the range
        out[small] = keys.topk(k, dim=1, largest=False).indices
    large = ~small
    if large.any():
        span = sizes[large][:, None].double()
        draws = (torch.rand(len(span), k, generator=g, dtype=torch.float64) * span).long()
        while True:
            ordered, order = draws.sort(dim=1)
            repeat = ordered[:, 1:] == ordered[:, :-1]
            if not repeat.any():
                break
            again = torch.zeros(len(span), k, dtype=torch.bool)
            again.scatter_(1, order[:, 1:], repeat)
            fresh = (torch.rand(len(span), k, generator=g, dtype=torch.float64) * span).long()
            draws = torch.where(again, fresh, draws)
        out[large] = draws
    return out


def sample_negatives(image_class: torch.Tensor, bank_class: torch.Tensor,
                     bank_valid: torch.Tensor, k: int = NEGATIVES,
                     seed: int = 0) -> tuple[torch.Tensor | None, dict]:
    """k caption indices per image, uniformly among the valid captions of other classes.

    The valid captions are sorted by class once; an image's candidates are then the sorted
    list minus one contiguous run (its own class), so a draw in [0, pool size) maps to a
    caption with one comparison: O(M·k), never an [images × captions] matrix. Without
    replacement when every image has at least k such captions; otherwise (small test sets)
    with replacement, reported in the returned info. Returns (None, info) when some image has
    no caption of another class at all (R-precision is then undefined).
    """
    pool = bank_valid.nonzero().flatten()
    pool_class, order = bank_class[pool].sort(stable=True)
    pool = pool[order]
    lo = torch.searchsorted(pool_class, image_class, right=False)
    own = torch.searchsorted(pool_class, image_class, right=True) - lo
    sizes = len(pool) - own                       # captions of other classes, per image
    smallest = int(sizes.min()) if len(sizes) else 0
    info = {"negatives": k, "smallest_pool": smallest, "with_replacement": smallest < k}
    if smallest == 0:
        return None, info
    g = torch.Generator().manual_seed(seed)
    if smallest < k:
        draws = (torch.rand(len(sizes), k, generator=g, dtype=torch.float64)
                 * sizes[:, None].double()).long()
    else:
        draws = _distinct_draws(sizes, k, g)
    draws = torch.where(draws < lo[:, None], draws, draws + own[:, None])  # skip own class
    return pool[draws], info


def rank_first(codes: torch.Tensor, bank: torch.Tensor, true_idx: torch.Tensor,
               negatives: torch.Tensor, max_elements: int = 1 << 22) -> torch.Tensor:
    """Bool [M]: True where the true caption scores at least as high as every negative.

    Only the 1 + k candidates of each image are scored (gathered, then one batched product
    per chunk of images of about `max_elements` gathered numbers), not the whole caption
    bank: O(M·k·D) instead of O(M·N·D), which matters for COCO's 200k test captions.
    """
    txt = F.normalize(bank.float(), dim=-1)
    cands = torch.cat([true_idx[:, None], negatives], dim=1)                 # [M, 1 + k]
    per_image = cands.shape[1]
    rows = max(1, max_elements // max(1, per_image * txt.shape[1]))
    out = []
    for start in range(0, len(codes), rows):
        img = F.normalize(codes[start: start + rows].float(), dim=-1)        # [c, D]
        picked = txt.index_select(0, cands[start: start + rows].flatten())
        scores = torch.bmm(picked.view(len(img), per_image, -1), img[:, :, None])[..., 0]
        out.append((scores[:, 1:] > scores[:, :1]).sum(1) == 0)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def rank_first_loop(codes: torch.Tensor, bank: torch.Tensor, true_idx: torch.Tensor,
                    negatives: torch.Tensor) -> torch.Tensor:
    """`rank_first` written the plain way, one image and one candidate at a time: the
    reference the tests compare with and the baseline bench/bench_gan_step.py times."""
    hits = []
    for i in range(len(codes)):
        img = codes[i] / codes[i].norm()
        cands = [int(true_idx[i])] + [int(j) for j in negatives[i]]
        scores = [float(img @ (bank[j] / bank[j].norm())) for j in cands]
        hits.append(all(s <= scores[0] for s in scores[1:]))
    return torch.tensor(hits, dtype=torch.bool)


def fold_stats(success: torch.Tensor, folds: int = FOLDS,
               seed: int | None = None) -> tuple[float, float, list[float]]:
    """Mean ± std (population, as AttnGAN) of the per-fold success rates.

    With a seed the per-image successes are first put in the order of
    `np.random.default_rng(seed).permutation`, as DM-GAN shuffles its R array before cutting it
    into folds: contiguous runs in caption order would put all captions of one image (and of
    neighbouring keys, often one class) into the same fold and inflate the std.
    `score_generated` always passes one (SEED); None keeps caption order.
    """
    values = success.double().numpy()  # float64: 0.6, not 0.6000000238, in metrics.json
    if seed is not None:
        values = values[np.random.default_rng(seed).permutation(len(values))]
    parts = np.array_split(values, max(1, min(folds, len(values))))
    rates = [float(x.mean()) for x in parts]
    return float(np.mean(rates)), float(np.std(rates)), rates


def clip_score(codes: torch.Tensor, sents: torch.Tensor) -> float:
    """Mean of 100·max(cos(image code, its caption's sentence embedding), 0)."""
    cos = F.cosine_similarity(codes.float(), sents.float(), dim=-1)
    return float(100 * cos.clamp_min(0).mean())


def score_generated(codes: torch.Tensor, items: torch.Tensor, sent: torch.Tensor,
                    class_ids: torch.Tensor, num_captions: torch.Tensor, seed: int = 0,
                    k: int = NEGATIVES, folds: int = FOLDS) -> dict:
    """R-precision + CLIP score of images whose captions are `items` [M, 2] (image index,
    caption index), given codes [M, D] and the split's sentence features sent [N, C, D]."""
    n, c, d = sent.shape
    bank = sent.reshape(n * c, d)
    bank_valid = (torch.arange(c)[None] < num_captions[:, None]).reshape(-1)
    bank_class = class_ids.repeat_interleave(c)
    true_idx = items[:, 0] * c + items[:, 1]
    image_class = class_ids[items[:, 0]]
    result = {"images": len(items), "clip_score": clip_score(codes, bank[true_idx])}
    negatives, info = sample_negatives(image_class, bank_class, bank_valid, k, seed)
    result.update(info)
    if negatives is None:
        result.update(r_precision=None, r_precision_std=None,
                      note="some images have no caption of another class in the test split; "
                           "R-precision is undefined")
        return result
    success = rank_first(codes, bank, true_idx, negatives)
    mean, std, rates = fold_stats(success, folds, seed=seed)
    result.update(r_precision=mean, r_precision_std=std, folds=rates)
    if info["with_replacement"]:
        result["note"] = (f"only {info['smallest_pool']} captions of other classes for some "
                          f"images (fewer than {k}): negatives sampled with replacement")
    return result


def report_lines(result: dict) -> list[str]:
    """Human-readable summary of `score_generated`'s result."""
    lines = [f"images scored: {result['images']}"]
    if result.get("r_precision") is not None:
        lines.append(f"R-precision (top-1 among 1 + {result['negatives']}, "
                     f"{len(result['folds'])} folds): {100 * result['r_precision']:.2f} ± "
                     f"{100 * result['r_precision_std']:.2f} %")
    lines.append(f"CLIP score: {result['clip_score']:.2f}")
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    other = result.get("independent")
    if other is not None:
        rp = ("undefined" if other.get("r_precision") is None else
              f"{100 * other['r_precision']:.2f} ± {100 * other['r_precision_std']:.2f} %")
        lines.append(f"independent scorer {other['encoder']}: R-precision {rp}, "
                     f"CLIP score {other['clip_score']:.2f}")
    if "judge" in result:
        from miscc.judge import judge_lines

        lines += judge_lines(result)
    return lines


# ------------------------------------------------------------------ the independent scorer
def load_independent_encoder(cfg, device: torch.device,
                             name: str | None = None) -> tuple[object, dict] | None:
    """The second scorer of EVAL.INDEPENDENT_ENCODER (or `name`), frozen, and its description
    for metrics.json; None when none is asked for ('' or 'none').

    `name` is a CLIP name resolved like CLIP.MODEL (`ViT-B/32`, `ViT-B-32`, `RN50`, ...) with
    EVAL.INDEPENDENT_PRETRAINED weights, a stage-1 `clip*.pth` checkpoint (or its `Model/`
    folder: the newest one), or a JSON architecture stem under cfg/clip/ (`tiny`: random
    weights drawn from seed 0, the same every run; for tests). Any load failure is an
    EncoderLoadError naming the key.
    """
    from miscc.training import resolve_checkpoint
    from miscc.utils import CheckpointError
    from model import ClipEncoder, EncoderLoadError, resolve_clip_name

    name = str(cfg.EVAL.INDEPENDENT_ENCODER if name is None else name).strip()
    if not name or name.lower() == "none":
        return None
    info: dict = {"encoder": name}
    try:
        if name.endswith((".pth", ".pt")) or Path(name).is_dir():
            path = resolve_checkpoint(name, "clip*.pth", "stage-1 encoder",
                                      "EVAL.INDEPENDENT_ENCODER")
            encoder = ClipEncoder.from_checkpoint(path)
            info["checkpoint"] = str(path)
        else:
            spec = resolve_clip_name(name, str(cfg.EVAL.INDEPENDENT_PRETRAINED))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # a JSON architecture's random weights: fixed
                encoder = ClipEncoder(spec, adapter=False)
            if spec["pretrained"]:
                info["pretrained"] = spec["pretrained"]
    except (EncoderLoadError, CheckpointError) as err:
        message = str(err).replace("CLIP.PRETRAINED", "EVAL.INDEPENDENT_PRETRAINED")
        raise EncoderLoadError(f"EVAL.INDEPENDENT_ENCODER={name!r} (the independent scorer; "
                               f"'' turns it off): {message}") from err
    encoder.requires_grad_(False)
    return encoder.eval().to(device), info


def independent_entry(info: dict, codes: torch.Tensor, items: torch.Tensor, sent: torch.Tensor,
                      class_ids: torch.Tensor, num_captions: torch.Tensor, seed: int) -> dict:
    """metrics.json's `independent`: `score_generated` of the second encoder's image codes and
    sentence features (same negatives and folds as the main score: same classes, same seed)."""
    scored = score_generated(codes, items, sent, class_ids, num_captions, seed=seed)
    shared = ("images", "negatives", "smallest_pool", "with_replacement")
    return {**info, **{k: v for k, v in scored.items() if k not in shared}}


# ---------------------------------------------------------------------------- the script
class _Pngs(Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            pixels = np.array(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0


@torch.no_grad()
def image_pass(encoders: list, images: DataLoader, device: torch.device, judge=None,
               progress: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """One pass over batches of [-1, 1] images: the CLIP image codes of each encoder and, with
    a judge (miscc.judge.EvalJudge), its reading (attribute predictions and features)."""
    from tqdm import tqdm

    codes: list[list[torch.Tensor]] = [[] for _ in encoders]
    preds = []
    for x in tqdm(images, desc="scoring images", disable=not progress):
        for out, encoder in zip(codes, encoders, strict=True):
            out.append(encoder.encode_image(x.to(device))[1].float().cpu())
        if judge is not None:
            preds.append(judge.predict(x))
    joined = [torch.cat(c) if c else torch.zeros(0, e.embed_dim)
              for c, e in zip(codes, encoders, strict=True)]
    if judge is None:
        return joined, None
    return joined, torch.cat(preds) if preds else judge.empty()


def encode_images(encoder, images: DataLoader, device: torch.device,
                  progress: bool = True) -> torch.Tensor:
    """CLIP image codes of every batch of [-1, 1] images."""
    return image_pass([encoder], images, device, progress=progress)[0][0]


def score_tree(cfg, path: str | Path, device: torch.device, progress: bool = True,
               independent: str | None = None) -> dict:
    """Score `<path>/<key>_s<k>.png` for every test caption found there: R-precision and CLIP
    score with TRAIN.NET_E, plus the independent scorer (EVAL.INDEPENDENT_ENCODER, or
    `independent`) and the shapes judge (miscc.judge.judge_path) when configured."""
    from datasets import CaptionTokenizer, TextImageDataset, image_sizes
    from miscc.judge import EvalJudge
    from text_features import load_frozen_encoder, text_feature_cache

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"generated image folder not found: {root} (run main.py with "
                                "the eval config first, or pass --path)")
    encoder = load_frozen_encoder(cfg, device)
    data = TextImageDataset(cfg, "test", CaptionTokenizer(int(cfg.TEXT.WORDS_NUM)),
                            image_sizes(cfg), train=False, use_cache=False)
    judge = EvalJudge.from_config(cfg, data.info)
    other, other_info = load_independent_encoder(cfg, device, independent) or (None, None)
    text = text_feature_cache(cfg, "test", data.tokens, encoder, device, progress)
    other_text = (text_feature_cache(cfg, "test", data.tokens, other, device, progress)
                  if other is not None else None)
    from miscc.protocol import eval_items

    wanted, _, protocol = eval_items(cfg, data.num_captions)  # EVAL.NUM_IMAGES decides
    expected = len(wanted)
    items, paths = [], []
    for i, k in wanted.tolist():
        p = root / f"{data.keys[i]}_s{k}.png"
        if p.is_file():
            items.append((i, k))
            paths.append(p)
    if not items:
        raise FileNotFoundError(f"none of the {expected} expected images <key>_s<k>.png of the "
                                f"test split is in {root}")
    if len(items) < expected:
        warnings.warn(f"{expected - len(items)} of {expected} test-caption images are missing "
                      f"in {root}; scoring the {len(items)} found", stacklevel=2)
    loader = DataLoader(_Pngs(paths), batch_size=int(cfg.TRAIN.BATCH_SIZE),
                        num_workers=int(cfg.WORKERS))
    encoders = [encoder] if other is None else [encoder, other]
    codes, preds = image_pass(encoders, loader, device, judge, progress)
    items_t = torch.tensor(items)
    result = score_generated(codes[0], items_t, text.sent, data.class_ids,
                             data.num_captions, seed=int(cfg.SEED))
    result.update(path=str(root), expected_images=expected, protocol=protocol)
    if other is not None:
        result["independent"] = independent_entry(other_info, codes[1], items_t, other_text.sent,
                                                  data.class_ids, data.num_captions,
                                                  int(cfg.SEED))
    if judge is not None:
        result.update(judge.metrics(items_t, preds))
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: score an existing generated tree. Exit codes: 0 done, 2 missing images or
    a config/data/checkpoint/weights problem (an `error:` line on stderr)."""
    from miscc.config import build_parser, config_from_args
    from miscc.training import USER_ERRORS
    from miscc.utils import run_command, select_device

    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--path", default=None,
                        help="generated images (default <OUTPUT_DIR>/valid/single)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--independent", default=None, metavar="NAME",
                        help="also score with this encoder (a CLIP name such as ViT-B/32, a "
                             "stage-1 clip*.pth, or '' for none; default EVAL.INDEPENDENT_"
                             "ENCODER)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)

    def body() -> None:
        device = select_device(int(cfg.GPU_ID))
        if device.type == "cpu" and int(cfg.CPU_THREADS) > 0:
            torch.set_num_threads(int(cfg.CPU_THREADS))
        path = args.path or str(Path(cfg.OUTPUT_DIR) / "valid" / "single")
        result = score_tree(cfg, path, device, progress=not args.json,
                            independent=args.independent)
        print(json.dumps(result, indent=2) if args.json else "\n".join(report_lines(result)))

    return run_command(body, (*USER_ERRORS, FileNotFoundError))


if __name__ == "__main__":
    raise SystemExit(main())
