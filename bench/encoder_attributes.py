"""Which caption attributes does a stage-1 encoder tell apart on the real shapes test pictures?

    python bench/encoder_attributes.py --encoder output/shapes_DAMSM/Model [--data data/shapes]

For each test picture and each attribute (shape, colour, size, position, background), the
picture's first caption is rewritten with every value of that attribute; the score is how often
the encoder's image code is closest (cosine) to the caption with the true value. Stage 2 can only
learn to draw what this encoder separates, since the DAMSM losses are its only text signal
besides D. Also prints a linear probe of the image code and of the regions (trained on the
train pictures), which says whether the image tower sees the attribute at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from easydict import EasyDict
from PIL import Image

from datasets import CaptionTokenizer, read_split
from miscc.judge import ATTRIBUTES, caption_truth, to_tensor
from miscc.training import resolve_checkpoint
from model import ClipEncoder

CAPTION = "a {size} {colour} {shape} in the {pos} on a {bg} background"


def split(data: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's pictures (32 px, [-1, 1]) and their attribute indices [N, 5]."""
    cfg = EasyDict(DATA_DIR=str(data), DATASET_NAME="shapes", TEXT=EasyDict(CAPTIONS_PER_IMAGE=1))
    info = read_split(cfg, name)
    images = torch.stack([to_tensor(Image.open(p)) for p in info.image_paths])
    return images, torch.tensor([caption_truth(c[0]) for c in info.captions])


@torch.no_grad()
def caption_choice(encoder: ClipEncoder, images: torch.Tensor, truth: torch.Tensor) -> dict:
    """Per attribute: how often the caption with the true value is the closest to the code."""
    code = F.normalize(encoder.encode_image(images)[1], dim=-1)
    tokenizer = CaptionTokenizer(20)
    out = {}
    for j, attribute in enumerate(ATTRIBUTES):
        captions = []
        for row in truth.tolist():
            words = {a: ATTRIBUTES[a][row[k]] for k, a in enumerate(ATTRIBUTES)}
            captions += [CAPTION.format(**{**words, attribute: v}) for v in ATTRIBUTES[attribute]]
        sent = F.normalize(encoder.encode_text(tokenizer(captions))[1], dim=-1)
        sent = sent.view(len(truth), len(ATTRIBUTES[attribute]), -1)
        picked = torch.einsum("nvd,nd->nv", sent, code).argmax(1)
        out[attribute] = float((picked == truth[:, j]).float().mean())
    return out


def linear_probe(train: tuple, test: tuple, steps: int = 300) -> dict:
    """Test accuracy per attribute of a linear classifier on standardised features."""
    (x, y), (xt, yt) = train, test
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mean) / std, (xt - mean) / std
    out = {}
    for j, attribute in enumerate(ATTRIBUTES):
        torch.manual_seed(0)
        head = torch.nn.Linear(x.shape[1], len(ATTRIBUTES[attribute]))
        opt = torch.optim.Adam(head.parameters(), 1e-2, weight_decay=1e-4)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(x), y[:, j]).backward()
            opt.step()
        with torch.no_grad():
            out[attribute] = float((head(xt).argmax(1) == yt[:, j]).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="output/shapes_DAMSM/Model",
                        help="stage-1 clip<epoch>.pth or its Model/ folder")
    parser.add_argument("--data", default="data/shapes", help="the shapes set")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = resolve_checkpoint(args.encoder, "clip*.pth", "stage-1 encoder", "--encoder")
    encoder = ClipEncoder.from_checkpoint(path).eval()
    train, test = split(Path(args.data), "train"), split(Path(args.data), "test")
    with torch.no_grad():
        feats = {name: [encoder.encode_image(x)[k].flatten(1) for x in (train[0], test[0])]
                 for name, k in (("image code", 1), ("regions", 0))}
    rows = {"caption choice (text vs code)": caption_choice(encoder, *test)}
    for name, (f_train, f_test) in feats.items():
        rows[f"linear probe on the {name}"] = linear_probe((f_train, train[1]),
                                                           (f_test, test[1]))
    print(f"encoder {path}, {len(test[1])} test pictures (accuracy %)")
    print("| measure | " + " | ".join(ATTRIBUTES) + " |")
    print("| --- |" + " --- |" * len(ATTRIBUTES))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * row[a]:.1f}" for a in ATTRIBUTES) + " |")


if __name__ == "__main__":
    main()
