"""The shapes judge: a small CNN that reads shape, colour, size, position and background off a
shapes-set picture, trained once on pictures freshly drawn by the dataset's own
`draw_shape_image`. It never saw the CLIP encoder, so unlike R-precision it cannot be won with
textures the encoder likes.

Its weights ship with the repository (`assets/shapes_judge.pt`, float16, with the accuracy on
fresh pictures) and are rebuilt with

    python bench/shapes_judge.py --train          # about 16 minutes of one core

Evaluation (`sampling.generate_test_set`, `r_precision.score_tree`) scores every generated test
image on the attributes its caption names (`EvalJudge`); `bench/shapes_judge.py` is the
command line that scores existing runs side by side.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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
    SplitInfo,
    draw_shape_image,
    visible,
)
from miscc.utils import CheckpointError, atomic_torch_save, load_checkpoint

ATTRIBUTES: dict[str, list[str]] = {"shape": list(SHAPES), "colour": list(COLOURS),
                                    "size": list(SIZES), "pos": list(POSITIONS),
                                    "bg": list(BACKGROUNDS)}
PIXELS = 32  # the demo's generated size; larger pictures are scaled down to it
FEATURES = 128  # width of the pooled features `Judge.read` returns
JUDGE_FORMAT = "shapes-judge/1"
REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "assets" / "shapes_judge.pt"
REBUILD_COMMAND = "python bench/shapes_judge.py --train"  # writes SHIPPED
_FIRST_CAPTION = re.compile(r"an? (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) in the "
                            r"(?P<pos>.+) on an? (?P<bg>.+) background")


class JudgeError(CheckpointError):
    """The judge's weights file is missing, unreadable or of another network (a user error:
    `run_command` prints it as one `error:` line, exit code 2)."""


def rebuild_command(path: str | Path) -> str:
    """The command that (re)writes the judge file `path`."""
    path = Path(path)
    if path.resolve() == SHIPPED.resolve():
        return REBUILD_COMMAND
    return f"{REBUILD_COMMAND} --judge {path}"


# --------------------------------------------------------------------------------- network
class Judge(nn.Module):
    """Three conv blocks and one linear head per attribute. `read` also returns the last
    block's features averaged over the picture (`FEATURES` numbers), the space of the judge's
    Fréchet distance (`frechet_entry`)."""

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
        return self.read(x)[0]

    def read(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(logits per attribute, the last block's features averaged over space [B, 128])."""
        maps = self.trunk[:-2](x)  # before the 2x2 pooling and the flattening
        features = self.trunk[-2:](maps)
        return {a: head(features) for a, head in self.heads.items()}, maps.mean(dim=(2, 3))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB picture -> 3xPIXELSxPIXELS tensor in [-1, 1], as the generator writes them."""
    img = img.convert("RGB").resize((PIXELS, PIXELS), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1


def judge_input(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [B, 3, H, W] of 8-bit pixels (read from PNGs, or to_uint8 of the
    generator's output) -> the judge's input: as they are at PIXELS px, otherwise through
    `to_tensor` (PIL bicubic), exactly as if each picture had been read from its file."""
    if x.shape[-2:] == (PIXELS, PIXELS):
        return x.float()
    pixels = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return torch.stack([to_tensor(Image.fromarray(p.permute(1, 2, 0).cpu().numpy()))
                        for p in pixels])


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


def draw_for_captions(truth: torch.Tensor, caption_index: list[int], px: int,
                      seed: int = 0) -> torch.Tensor:
    """What a perfect generator could draw for these captions: each picture keeps the
    attributes its caption (template `caption_index`) names, takes the others at random, and
    is rendered and JPEG-encoded as `prepare_data.py shapes` writes the set. Its Fréchet
    distance to the real test pictures is the floor a generator's can reach."""
    rng = np.random.default_rng(seed)
    images = []
    for row, k in zip(truth.tolist(), caption_index, strict=True):
        named = named_attributes(k)
        words = {a: values[i if a in named else int(rng.integers(len(values)))]
                 for (a, values), i in zip(ATTRIBUTES.items(), row, strict=True)}
        if not visible(words["colour"], words["bg"]):  # as the set draws such a pick
            words["bg"] = "white"
        buffer = io.BytesIO()
        draw_shape_image(words["shape"], words["colour"], words["size"], words["pos"],
                         words["bg"], px).save(buffer, format="JPEG", quality=95)
        images.append(to_tensor(Image.open(buffer)))
    return torch.stack(images)


def train_judge(images: int = 20000, steps: int = 4000, seed: int = 0,
                progress: bool = True) -> tuple[Judge, dict[str, float]]:
    """Train the judge on `images` drawn pictures; return it, rounded to the float16 weights it
    is saved with, and that rounded network's accuracy on new pictures (1000, or `images` when
    fewer)."""
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
    judge.load_state_dict(_from_half(_to_half(judge.state_dict())))
    judge.eval()
    x_new, y_new = draw_pictures(min(images, 1000), seed + 2)
    return judge, accuracy(predict(judge, x_new), y_new)


@torch.no_grad()
def predict(judge: Judge, x: torch.Tensor) -> torch.Tensor:
    """Predicted attribute indices (n x 5) in batches of 500."""
    out = [torch.stack([v.argmax(1) for v in judge(x[i:i + 500]).values()], 1)
           for i in range(0, len(x), 500)]
    return torch.cat(out) if out else torch.zeros(0, len(ATTRIBUTES), dtype=torch.long)


@torch.no_grad()
def read_pictures(judge: Judge, x: torch.Tensor) -> torch.Tensor:
    """What the judge reads off pictures x, in batches of 500, as one float tensor
    [n, 5 + FEATURES]: the predicted attribute indices, then the pooled features."""
    out = []
    for i in range(0, len(x), 500):
        logits, features = judge.read(x[i:i + 500])
        pred = torch.stack([v.argmax(1) for v in logits.values()], 1)
        out.append(torch.cat([pred.float(), features], 1))
    return torch.cat(out) if out else torch.zeros(0, len(ATTRIBUTES) + FEATURES)


def split_reading(reading: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`read_pictures` output -> (attribute indices [n, 5] long, features [n, FEATURES])."""
    return reading[:, :len(ATTRIBUTES)].long(), reading[:, len(ATTRIBUTES):]


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of judge features, with
    torch-fidelity's formula (the FID's, in the judge's feature space)."""
    from miscc.statistics import frechet_distance, statistics

    return frechet_distance(statistics(a.double()), statistics(b.double()))


def frechet_entry(generated: torch.Tensor, real: torch.Tensor) -> dict:
    """The metrics.json entry `judge_fd`: the Fréchet distance of the generated pictures'
    judge features to the real test pictures' (`generated`), and, as a reference, that of two
    random halves of the real pictures (`real_halves`, always the same two halves; with few
    pictures per half it sits above what a perfect generator reaches, which
    bench/shapes_judge.py measures with `draw_for_captions`). Needs no download, unlike the
    FID."""
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(real), generator=g)
    half = len(real) // 2
    entry = {"generated": None, "real_halves": None, "features": FEATURES,
             "images": len(generated), "real_images": len(real)}
    if len(generated) >= 2 and len(real) >= 2:
        entry["generated"] = frechet(generated, real)
    if half >= 2:
        entry["real_halves"] = frechet(real[order[:half]], real[order[half:2 * half]])
    return entry


def accuracy(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Per-attribute fraction of rows where the prediction equals the truth."""
    return {a: float((pred[:, j] == truth[:, j]).float().mean()) for j, a in enumerate(ATTRIBUTES)}


# ------------------------------------------------------------------------ saving, loading
def _to_half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()
            for k, v in state.items()}


def _from_half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def save_judge(judge: Judge, fresh_accuracy: dict[str, float], path: str | Path,
               **meta: int) -> Path:
    """Write the judge (float16 weights, half the size) and its fresh-picture accuracy."""
    atomic_torch_save({"format": JUDGE_FORMAT, "state_dict": _to_half(judge.state_dict()),
                       "fresh_accuracy": dict(fresh_accuracy), "pixels": PIXELS, **meta}, path)
    return Path(path)


def load_judge(path: str | Path, fix: str | None = None) -> tuple[Judge, dict]:
    """(judge in eval mode, the file's contents but the weights), read with weights_only=True.

    A missing, unreadable or foreign file raises JudgeError naming the file and `fix` (by
    default the command that rebuilds it)."""
    fix = fix or f"rebuild it with: {rebuild_command(path)}"
    try:
        state = load_checkpoint(path, "judge")
    except CheckpointError as err:
        raise JudgeError(f"{err}; {fix}") from err
    judge = Judge()
    try:
        if state.get("format") != JUDGE_FORMAT:
            raise ValueError(f"format {state.get('format')!r}, expected {JUDGE_FORMAT!r}")
        judge.load_state_dict(_from_half(state["state_dict"]))
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as err:
        raise JudgeError(f"judge {path} does not hold this judge's weights "
                         f"({str(err).splitlines()[0]}); {fix}") from err
    info = {k: v for k, v in state.items() if k != "state_dict"}
    return judge.eval(), info


# ------------------------------------------------------------------------------- scoring
def caption_truth(first_caption: str) -> list[int]:
    """Attribute indices named by a shapes picture's first caption (the one naming all five)."""
    match = _FIRST_CAPTION.fullmatch(first_caption.strip())
    if match is None:
        raise ValueError(f"not a shapes-set first caption: {first_caption!r}")
    try:
        return [ATTRIBUTES[a].index(match[a]) for a in ATTRIBUTES]
    except ValueError as err:  # the pattern fits but names an unknown word
        raise ValueError(f"not a shapes-set first caption: {first_caption!r}") from err


def named_attributes(caption_index: int) -> list[str]:
    """The attributes that caption template `caption_index` names."""
    return [a for a in ATTRIBUTES if "{" + a + "}" in TEMPLATES[caption_index]]


def score(pred: torch.Tensor, truth: torch.Tensor, caption_index: list[int]) -> dict[str, float]:
    """Per-attribute accuracy over the images whose caption names that attribute (NaN when no
    caption names it), plus `shape+colour`: both right, over the images whose caption names
    both."""
    out: dict[str, float] = {}
    names = [named_attributes(k) for k in caption_index]
    hits = pred == truth
    for j, a in enumerate(ATTRIBUTES):
        rows = [i for i, n in enumerate(names) if a in n]
        out[a] = float(hits[rows, j].float().mean()) if rows else float("nan")
    # every caption names both shape and colour
    out["shape+colour"] = float((hits[:, 0] & hits[:, 1]).float().mean()) if len(hits) \
        else float("nan")
    return out


def confusion(pred: torch.Tensor, truth: torch.Tensor, caption_index: list[int],
              attribute: str) -> torch.Tensor:
    """[n, n] counts of (value the caption names, value the judge reads) for `attribute` over
    the images whose caption names it: the row of a value no image shows (e.g. a background
    the generator never draws) is what the accuracy alone hides."""
    j = list(ATTRIBUTES).index(attribute)
    rows = [i for i, k in enumerate(caption_index) if attribute in named_attributes(k)]
    n = len(ATTRIBUTES[attribute])
    counts = torch.zeros(n * n, dtype=torch.long)
    if rows:
        counts.index_add_(0, truth[rows, j] * n + pred[rows, j],
                          torch.ones(len(rows), dtype=torch.long))
    return counts.view(n, n)


def confusion_lines(pred: torch.Tensor, truth: torch.Tensor,
                    caption_index: list[int]) -> list[str]:
    """Every attribute's `confusion` as a text table: a row per named value (numbered), its
    counts per value read (columns in the same numbering) and the share read right."""
    lines = []
    for attribute, values in ATTRIBUTES.items():
        counts = confusion(pred, truth, caption_index, attribute)
        title = f"{attribute}: named / read"
        width = max(len(title), *(len(f"  ({len(values)}) {v}") for v in values)) + 1
        lines.append(f"{title:<{width}}"
                     + "".join(f"{f'({c + 1})':>6}" for c in range(len(values))) + "   right")
        for r, (value, row) in enumerate(zip(values, counts, strict=True)):
            total = int(row.sum())
            right = f"{100 * int(row[r]) / total:5.1f} %" if total else "    -"
            lines.append(f"{f'  ({r + 1}) {value}':<{width}}"
                         + "".join(f"{int(c):>6}" for c in row) + f"   {right}")
    return lines


def chance() -> dict[str, float]:
    """Accuracy of uniform guessing, per attribute (and shape+colour)."""
    out = {a: 1 / len(v) for a, v in ATTRIBUTES.items()}
    out["shape+colour"] = out["shape"] * out["colour"]
    return out


def metrics_entry(scores: dict[str, float], images: int | None = None) -> dict:
    """A metrics.json entry: the five attributes (None where no caption names one), their
    mean, and the number of images."""
    entry: dict = {a: (None if math.isnan(scores[a]) else scores[a]) for a in ATTRIBUTES}
    known = [v for v in entry.values() if v is not None]
    entry["mean"] = float(np.mean(known)) if known else None
    if images is not None:
        entry["images"] = images
    return entry


def judge_path(cfg) -> Path | None:
    """The judge file evaluation uses: EVAL.JUDGE ('none' = off), else the shipped file for a
    shapes set (DATASET_NAME starting with 'shapes'), else none."""
    setting = str(cfg.EVAL.JUDGE).strip()
    if setting.lower() == "none":
        return None
    if setting:
        return Path(setting)
    return SHIPPED if str(cfg.DATASET_NAME).lower().startswith("shapes") else None


class EvalJudge:
    """The judge as evaluation uses it: predictions per batch of generated images, then the
    metrics.json entries `judge`, `judge_real` and `judge_chance`."""

    def __init__(self, judge: Judge, path: Path, info: SplitInfo) -> None:
        self.judge, self.path, self.info = judge, path, info
        try:
            self.truth = torch.tensor([caption_truth(c[0]) for c in info.captions])
        except ValueError as err:
            raise DataError(f"the shapes judge ({path}) needs a shapes set, but {err}; set "
                            "EVAL.JUDGE: none for other data") from err

    @classmethod
    def from_config(cls, cfg, info: SplitInfo) -> EvalJudge | None:
        """None when the config asks for no judge (see `judge_path`)."""
        path = judge_path(cfg)
        if path is None:
            return None
        fix = (f"rebuild it with: {rebuild_command(path)}" if path.resolve() == SHIPPED.resolve()
               else f"rebuild it with: {rebuild_command(path)}, or set EVAL.JUDGE: none")
        return cls(load_judge(path, fix)[0], path, info)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The judge's reading of [-1, 1] images of 8-bit pixels (any size): attribute
        predictions and pooled features, [B, 5 + FEATURES] (`read_pictures`)."""
        return read_pictures(self.judge, judge_input(images.cpu()))

    def empty(self) -> torch.Tensor:
        """The reading of no image."""
        return torch.zeros(0, len(ATTRIBUTES) + FEATURES)

    def metrics(self, items: torch.Tensor, reading: torch.Tensor) -> dict:
        """`judge` (generated images `items` [M, 2] = (image, caption index) with readings
        [M, 5 + FEATURES] from `predict`), `judge_real` (the real test pictures),
        `judge_chance` and `judge_fd` (`frechet_entry`)."""
        pred, features = split_reading(reading)
        generated = score(pred, self.truth[items[:, 0]], items[:, 1].tolist())
        real_x = torch.stack([to_tensor(Image.open(p)) for p in self.info.image_paths])
        real_pred, real_features = split_reading(read_pictures(self.judge, real_x))
        real = score(real_pred, self.truth, [0] * len(self.truth))
        entry = metrics_entry(generated, len(items))
        entry["weights"] = str(self.path)
        return {"judge": entry, "judge_real": metrics_entry(real, len(self.truth)),
                "judge_chance": metrics_entry(chance()),
                "judge_fd": frechet_entry(features, real_features)}


def judge_row(entry: dict) -> str:
    """One metrics entry as `shape 53.6  colour 91.9 ... mean 79.9` (percent)."""
    return "  ".join(f"{a} {'-' if entry[a] is None else f'{100 * entry[a]:.1f}'}"
                     for a in (*ATTRIBUTES, "mean"))


def judge_lines(result: dict) -> list[str]:
    """Printed summary of the judge entries of a metrics result (none when absent)."""
    if "judge" not in result:
        return []
    lines = ["shapes judge (% of images showing what their caption names):",
             f"  generated ({result['judge']['images']} images): {judge_row(result['judge'])}",
             f"  real test pictures ({result['judge_real']['images']}): "
             f"{judge_row(result['judge_real'])}",
             f"  chance: {judge_row(result['judge_chance'])}"]
    if "judge_fd" in result:
        lines.append(f"  {frechet_line(result['judge_fd'])}")
    return lines


def frechet_line(entry: dict) -> str:
    """A `judge_fd` entry in one line (lower is more like the real pictures)."""
    def number(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    return (f"Fréchet distance in the judge's features: generated {number(entry['generated'])}, "
            f"two halves of the real test pictures {number(entry['real_halves'])}")
