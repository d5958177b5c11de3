"""Do generated shapes pictures show what their captions name? The shapes judge (miscc/judge.py,
a small CNN trained on freshly drawn pictures) reads shape, colour, size, position and
background off each generated test image, for one run or several side by side.

    python bench/shapes_judge.py --path output/shapes_DMGAN [--path OTHER_RUN ...]
    python bench/shapes_judge.py --path output/shapes_VQGAN  # the tokenizer's reconstructions
    python bench/shapes_judge.py --path output/shapes_DMGAN --confusion  # what is drawn instead
    python bench/shapes_judge.py --train        # rebuild assets/shapes_judge.pt (~16 min, 1 core)

R-precision only says the CLIP encoder matches an image to its caption, and a generator can
win it with textures the encoder likes; this judge never saw the encoder. Its weights ship in
`assets/shapes_judge.pt` (`--judge` names another file: loaded when present, trained there
first otherwise). It scores `<path>/valid/single/<key>_s<k>.png` (written by
`main.py --cfg cfg/eval_clip_shapes.yml`, which also puts these numbers in metrics.json) on
the attributes caption k names (a tokenizer run's `<key>.png` reconstructions against the
picture's first caption); the real test pictures are scored in the same run as the reference,
chance as the floor. Beside the accuracies it prints each run's Fréchet distance to the real
test pictures in the judge's pooled features (`miscc.judge.frechet_entry`; lower is more like
them), beside two random halves of the real pictures and the renderer's drawings of the 2000
test captions (each keeps the attributes its caption names, the others at random: what a
perfect generator draws, the floor for generated images).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from easydict import EasyDict
from PIL import Image

from datasets import TEMPLATES, DataError, read_split
from miscc.judge import (
    ATTRIBUTES,
    SHIPPED,
    Judge,
    JudgeError,
    caption_truth,
    chance,
    confusion_lines,
    draw_for_captions,
    frechet_entry,
    load_judge,
    read_pictures,
    save_judge,
    score,
    split_reading,
    to_tensor,
    train_judge,
)


class UsageError(RuntimeError):
    """A bad argument or input of this command (one `error:` line, exit code 2)."""


def read_test_split(data_dir: Path) -> tuple[dict[str, list[int]], list[Path]]:
    """Attribute truth by test key (from each picture's first caption) and the real pictures,
    read and validated by the dataset code."""
    cfg = EasyDict(DATA_DIR=str(data_dir), DATASET_NAME="shapes",
                   TEXT=EasyDict(CAPTIONS_PER_IMAGE=1))
    try:
        info = read_split(cfg, "test")
    except DataError as err:
        raise UsageError(f"--data {data_dir}: {err}") from err
    try:
        truth = {k: caption_truth(c[0]) for k, c in zip(info.keys, info.captions, strict=True)}
    except ValueError as err:
        raise UsageError(f"{data_dir}: {err}; --data must be a shapes set") from err
    return truth, info.image_paths


def load_generated(path: Path, truth: dict[str, list[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Generated test images (`<key>_s<k>.png`; or a tokenizer's `<key>.png` reconstructions,
    read against caption 0), the attribute truth of their pictures, and their caption index."""
    root = path / "valid" / "single"
    names = {f: f.relative_to(root).with_suffix("").as_posix() for f in root.glob("*/*.png")}
    drawn = {f: m for f, n in names.items() if (m := re.fullmatch(r"(.+)_s(\d+)", n))}
    if drawn:
        files = sorted(drawn)
        keys, index = zip(*(drawn[f].groups() for f in files), strict=True)
    else:  # a tokenizer's reconstructions, each against its picture's first caption
        files = sorted(f for f, n in names.items() if n in truth)
        keys, index = tuple(names[f] for f in files), ("0",) * len(files)
    if not files:
        raise UsageError(f"{root} has no <key>_s<k>.png images: run main.py --cfg "
                         "cfg/eval_clip_shapes.yml (with OUTPUT_DIR pointing there) first")
    unknown = sorted(set(keys) - truth.keys())
    if unknown:
        raise UsageError(f"{root}: {len(unknown)} images of keys not in the test split (e.g. "
                         f"{unknown[0]}): --data must be the shapes set they were generated from")
    return (torch.stack([to_tensor(Image.open(f)) for f in files]),
            torch.tensor([truth[k] for k in keys]), [int(k) for k in index])


def train_and_save(path: Path, images: int, steps: int, seed: int) -> Judge:
    judge, acc = train_judge(images, steps, seed)
    print(f"judge on {min(images, 1000)} new drawn pictures: "
          + ", ".join(f"{a} {100 * v:.1f} %" for a, v in acc.items()))
    save_judge(judge, acc, path, images=images, steps=steps, seed=seed)
    print(f"saved {path}")
    return judge


def get_judge(path: Path, images: int, steps: int, seed: int) -> Judge:
    """Load the judge from `path`, or train it there first."""
    if path.is_file():
        return load_judge(path, "delete it to train a new judge")[0]
    return train_and_save(path, images, steps, seed)


def run(args: argparse.Namespace) -> None:
    judge_file = Path(args.judge)
    if not args.path:
        if not args.train:
            raise UsageError("nothing to do: give --path RUN (repeatable) and/or --train")
        train_and_save(judge_file, args.images, args.steps, args.seed)
        return
    truth, real_paths = read_test_split(Path(args.data))
    generated = {p: load_generated(Path(p), truth) for p in args.path}  # fail before training
    real_x = torch.stack([to_tensor(Image.open(f)) for f in real_paths])
    real_y = torch.tensor(list(truth.values()))
    judge = (train_and_save(judge_file, args.images, args.steps, args.seed) if args.train
             else get_judge(judge_file, args.images, args.steps, args.seed))

    floor = chance()
    real_pred, real_features = split_reading(read_pictures(judge, real_x))
    halves = frechet_entry(real_features, real_features)["real_halves"]
    rows = {"chance": floor,
            "real test pictures": {**score(real_pred, real_y, [0] * len(real_y)), "FD": halves}}
    # every test caption drawn by the renderer, its unnamed attributes at random
    caption_y = real_y.repeat_interleave(len(TEMPLATES), dim=0)
    caption_k = list(range(len(TEMPLATES))) * len(real_y)
    perfect = draw_for_captions(caption_y, caption_k, Image.open(real_paths[0]).size[0])
    perfect_pred, perfect_features = split_reading(read_pictures(judge, perfect))
    rows[f"renderer, the test captions ({len(caption_k)} images)"] = {
        **score(perfect_pred, caption_y, caption_k),
        "FD": frechet_entry(perfect_features, real_features)["generated"]}
    tables = {}
    for p, (x, y, index) in generated.items():
        pred, features = split_reading(read_pictures(judge, x))
        fd = frechet_entry(features, real_features)["generated"]
        rows[f"{p} ({len(y)} images)"] = {**score(pred, y, index), "FD": fd}
        if args.confusion:
            tables[p] = confusion_lines(pred, y, index)
    columns = [*ATTRIBUTES, "shape+colour"]
    width = max(len(r) for r in rows)
    print(f"{'accuracy %':<{width}}  " + "  ".join(f"{c:>12}" for c in columns)
          + f"  {'Fréchet':>8}")
    for name, row in rows.items():
        fd = row.get("FD")
        print(f"{name:<{width}}  " + "  ".join(f"{100 * row[c]:>12.1f}" for c in columns)
              + f"  {'' if fd is None else f'{fd:8.2f}'}")
    print("Fréchet: distance to the real test pictures in the judge's pooled features (the "
          "real row: two random halves of them; the renderer row: what a perfect generator "
          "draws for the test captions, each keeping the attributes its caption names and "
          "taking the others at random, the floor for generated test images)")
    for name, row in list(rows.items())[3:]:
        print(f"{name}: shape {row['shape'] / floor['shape']:.1f}x chance, colour "
              f"{row['colour'] / floor['colour']:.1f}x chance")
    for p, lines in tables.items():
        print(f"\n{p}: what the judge reads for each value a caption names")
        print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", action="append", default=[],
                        help="a run's output folder holding valid/single (repeatable)")
    parser.add_argument("--data", default="data/shapes", help="the shapes set (for the captions)")
    parser.add_argument("--judge", default=str(SHIPPED),
                        help="judge weights: loaded when present, trained and saved otherwise "
                             "(default: the shipped assets/shapes_judge.pt)")
    parser.add_argument("--train", action="store_true",
                        help="train the judge (again) and write it to --judge")
    parser.add_argument("--images", type=int, default=20000, help="drawn training pictures")
    parser.add_argument("--steps", type=int, default=4000, help="judge training steps")
    parser.add_argument("--seed", type=int, default=0, help="judge training seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--confusion", action="store_true",
                        help="also print each run's confusion tables (named value -> value read)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        run(args)
    except (UsageError, JudgeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
