"""Do generated shapes pictures show what their captions name? A small CNN, trained on freshly
drawn pictures, reads shape, colour, size, position and background off each generated test image.

    python bench/shapes_judge.py --path output/shapes_DMGAN [--path OTHER_RUN ...]

R-precision only says the CLIP encoder matches an image to its caption, and a generator can
win it with textures the encoder likes; this judge never saw the encoder. It is trained once
(about 14 minutes on one core, saved to `--judge`) on pictures drawn by the dataset's own
`draw_shape_image`, checked on fresh ones, then scores `<path>/valid/single/<key>_s<k>.png`
(written by `main.py --cfg cfg/eval_clip_shapes.yml`) on the attributes caption k names. The
real test pictures are scored in the same run as the reference, chance as the floor.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from easydict import EasyDict
from PIL import Image
from torch import nn
from tqdm import tqdm

from datasets import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    DataError,
    draw_shape_image,
    read_split,
)
from miscc.utils import CheckpointError, atomic_torch_save, load_checkpoint

ATTRIBUTES: dict[str, list[str]] = {"shape": list(SHAPES), "colour": list(COLOURS),
                                    "size": list(SIZES), "pos": list(POSITIONS),
                                    "bg": list(BACKGROUNDS)}
PIXELS = 32  # the demo's generated size; larger pictures are scaled down to it
_FIRST_CAPTION = re.compile(r"an? (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) in the "
                            r"(?P<pos>.+) on an? (?P<bg>.+) background")


class Judge(nn.Module):
    """Three conv blocks and one linear head per attribute."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(((3, 32), (32, 64), (64, 128))):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.MaxPool2d(2) if i < 2 else nn.AdaptiveAvgPool2d(2)]
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.heads = nn.ModuleDict({a: nn.Linear(512, len(v)) for a, v in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x)
        return {a: head(features) for a, head in self.heads.items()}


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB picture -> 3xPIXELSxPIXELS tensor in [-1, 1], as the generator writes them."""
    img = img.convert("RGB").resize((PIXELS, PIXELS), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1


def draw_pictures(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random pictures of every attribute combination and their labels (n x 5 indices)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        pick = {a: int(rng.integers(len(v))) for a, v in ATTRIBUTES.items()}
        words = {a: ATTRIBUTES[a][i] for a, i in pick.items()}
        images.append(to_tensor(draw_shape_image(words["shape"], words["colour"], words["size"],
                                                 words["pos"], words["bg"], 64)))
        labels.append(list(pick.values()))
    return torch.stack(images), torch.tensor(labels)


def train_judge(images: int = 20000, steps: int = 4000, seed: int = 0,
                progress: bool = True) -> tuple[Judge, dict[str, float]]:
    """Train the judge on `images` drawn pictures; return it and its accuracy on new ones
    (1000, or `images` when fewer)."""
    torch.manual_seed(seed)
    x, y = draw_pictures(images, seed + 1)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc="judge", disable=not progress):
        batch = torch.randint(0, len(x), (64,))
        noisy = x[batch] + 0.05 * torch.randn_like(x[batch])  # generated pictures are not clean
        logits = judge(noisy)
        loss = sum(F.cross_entropy(logits[a], y[batch, j]) for j, a in enumerate(ATTRIBUTES))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    judge.eval()
    x_new, y_new = draw_pictures(min(images, 1000), seed + 2)
    return judge, accuracy(predict(judge, x_new), y_new)


@torch.no_grad()
def predict(judge: Judge, x: torch.Tensor) -> torch.Tensor:
    """Predicted attribute indices (n x 5) in batches of 500."""
    out = [torch.stack([v.argmax(1) for v in judge(x[i:i + 500]).values()], 1)
           for i in range(0, len(x), 500)]
    return torch.cat(out)


def accuracy(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Per-attribute fraction of rows where the prediction equals the truth."""
    return {a: float((pred[:, j] == truth[:, j]).float().mean()) for j, a in enumerate(ATTRIBUTES)}


def caption_truth(first_caption: str) -> list[int]:
    """Attribute indices named by a shapes picture's first caption (the one naming all five)."""
    match = _FIRST_CAPTION.fullmatch(first_caption.strip())
    if match is None:
        raise ValueError(f"not a shapes-set first caption: {first_caption!r}")
    return [ATTRIBUTES[a].index(match[a]) for a in ATTRIBUTES]


def named_attributes(caption_index: int) -> list[str]:
    """The attributes that caption template `caption_index` names."""
    return [a for a in ATTRIBUTES if "{" + a + "}" in TEMPLATES[caption_index]]


def score(pred: torch.Tensor, truth: torch.Tensor, caption_index: list[int]) -> dict[str, float]:
    """Per-attribute accuracy over the images whose caption names that attribute, plus
    `shape+colour`: both right, over the images whose caption names both."""
    out: dict[str, float] = {}
    names = [named_attributes(k) for k in caption_index]
    hits = pred == truth
    for j, a in enumerate(ATTRIBUTES):
        rows = [i for i, n in enumerate(names) if a in n]
        out[a] = float(hits[rows, j].float().mean()) if rows else float("nan")
    # every caption names both shape and colour
    out["shape+colour"] = float((hits[:, 0] & hits[:, 1]).float().mean())
    return out


def read_test_split(data_dir: Path) -> tuple[dict[str, list[int]], list[Path]]:
    """Attribute truth by test key (from each picture's first caption) and the real pictures,
    read and validated by the dataset code."""
    cfg = EasyDict(DATA_DIR=str(data_dir), DATASET_NAME="shapes",
                   TEXT=EasyDict(CAPTIONS_PER_IMAGE=1))
    info = read_split(cfg, "test")
    try:
        truth = {k: caption_truth(c[0]) for k, c in zip(info.keys, info.captions, strict=True)}
    except ValueError as err:
        raise SystemExit(f"{data_dir}: {err}; --data must be a shapes set") from err
    return truth, info.image_paths


def load_generated(path: Path, truth: dict[str, list[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Generated test images, the attribute truth of their pictures, and their caption index."""
    root = path / "valid" / "single"
    files = sorted(root.glob("*/*_s*.png"))
    if not files:
        raise SystemExit(f"{root} has no <key>_s<k>.png images: run main.py --cfg "
                         "cfg/eval_clip_shapes.yml (with OUTPUT_DIR pointing there) first")
    keys, index = zip(*(f.relative_to(root).with_suffix("").as_posix().rsplit("_s", 1)
                        for f in files), strict=True)
    unknown = sorted(set(keys) - truth.keys())
    if unknown:
        raise SystemExit(f"{root}: {len(unknown)} images of keys not in the test split (e.g. "
                         f"{unknown[0]}): --data must be the shapes set they were generated from")
    return (torch.stack([to_tensor(Image.open(f)) for f in files]),
            torch.tensor([truth[k] for k in keys]), [int(k) for k in index])


def get_judge(path: Path, images: int, steps: int) -> Judge:
    """Load the judge from `path`, or train it there first."""
    judge = Judge()
    if path.is_file():
        try:
            judge.load_state_dict(load_checkpoint(path, "judge")["state_dict"])
        except CheckpointError as err:
            raise SystemExit(f"{err}; delete it to train a new judge") from err
        except (KeyError, RuntimeError) as err:  # another file, or another architecture
            raise SystemExit(f"judge {path} does not hold this judge's weights ({err}); delete "
                             "it to train a new one") from err
        return judge.eval()
    judge, acc = train_judge(images, steps)
    print(f"judge on {min(images, 1000)} new drawn pictures: "
          + ", ".join(f"{a} {100 * v:.1f} %" for a, v in acc.items()))
    atomic_torch_save({"state_dict": judge.state_dict(), "fresh_accuracy": acc}, path)
    return judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", action="append", required=True,
                        help="a run's output folder holding valid/single (repeatable)")
    parser.add_argument("--data", default="data/shapes", help="the shapes set (for the captions)")
    parser.add_argument("--judge", default="output/shapes_judge.pt",
                        help="judge weights: loaded when present, trained and saved otherwise")
    parser.add_argument("--images", type=int, default=20000, help="drawn training pictures")
    parser.add_argument("--steps", type=int, default=4000, help="judge training steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        truth, real_paths = read_test_split(Path(args.data))
    except DataError as err:
        raise SystemExit(f"--data {args.data}: {err}") from err
    generated = {p: load_generated(Path(p), truth) for p in args.path}  # fail before training
    real_x = torch.stack([to_tensor(Image.open(f)) for f in real_paths])
    real_y = torch.tensor(list(truth.values()))
    judge = get_judge(Path(args.judge), args.images, args.steps)

    chance = {a: 1 / len(v) for a, v in ATTRIBUTES.items()}
    chance["shape+colour"] = chance["shape"] * chance["colour"]
    rows = {"chance": chance, "real test pictures": score(predict(judge, real_x), real_y,
                                                           [0] * len(real_y))}
    for p, (x, y, index) in generated.items():
        rows[f"{p} ({len(y)} images)"] = score(predict(judge, x), y, index)
    columns = [*ATTRIBUTES, "shape+colour"]
    width = max(len(r) for r in rows)
    print(f"{'accuracy %':<{width}}  " + "  ".join(f"{c:>12}" for c in columns))
    for name, row in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{100 * row[c]:>12.1f}" for c in columns))
    for name, row in list(rows.items())[2:]:
        print(f"{name}: shape {row['shape'] / chance['shape']:.1f}x chance, colour "
              f"{row['colour'] / chance['colour']:.1f}x chance")


if __name__ == "__main__":
    main()
