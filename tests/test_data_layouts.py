"""The data every number is computed on (issue 17, item 5): the COCO layout end to end through
the dataset code, the shapes pictures at the pixel level, and the box crop and resize of the
real images FID compares against."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    CaptionTokenizer,
    SplitImages,
    TextImageDataset,
    draw_shape_image,
    read_split,
    safe_load_pickle,
    write_pickle,
)
from miscc.config import load_config
from miscc.damsm import DAMSMTrainer
from miscc.metrics_cli import resolve_data
from r_precision import sample_negatives

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# where each caption's position is, as (x, y) fractions of the side
WHERE = {"top left": (0.33, 0.33), "top right": (0.67, 0.33), "bottom left": (0.33, 0.67),
         "bottom right": (0.67, 0.67), "center": (0.5, 0.5)}


pytestmark = pytest.mark.usefixtures("one_thread")


def as_model_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [-1, 1], as the datasets serve images."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 127.5 - 1


# ---------------------------------------------------------------------------------- COCO
def test_coco_layout_end_to_end(coco_dir, tmp_path) -> None:
    """images/<key>.jpg, no class_info.pickle and no boxes: every image is its own class, 5
    captions are kept, images are resized (shorter side) and centre-cropped without a box, the
    R-precision negatives are the captions of every other image, and stage 1 trains and
    validates on it."""
    assert not (coco_dir / "test" / "class_info.pickle").exists()
    assert not (coco_dir / "CUB_200_2011").exists()
    cfg = load_config(ROOT / "cfg" / "DAMSM" / "coco.yml",
                      [f"DATA_DIR={coco_dir}", f"OUTPUT_DIR={tmp_path}", "GPU_ID=-1",
                       "WORKERS=0", "TREE.BRANCH_NUM=2", "TREE.BASE_SIZE=16",
                       "TEXT.EMBEDDING_DIM=64", "CLIP.MODEL=tiny", "CLIP.PRETRAINED=",
                       "TRAIN.BATCH_SIZE=4", "TRAIN.MAX_STEPS=1"], quiet=True)
    keys = safe_load_pickle(coco_dir / "test" / "filenames.pickle")
    info = read_split(cfg, "test")
    assert info.keys == keys and len(keys) == 24
    assert info.class_ids == list(range(24)) and info.boxes == [None] * 24
    assert info.image_paths == [coco_dir / "images" / f"{k}.jpg" for k in keys]
    assert [len(c) for c in info.captions] == [5] * 24 and info.empty_lines == 1
    lines = [ln for ln in (coco_dir / "text" / f"{keys[0]}.txt").read_text().splitlines() if ln]
    assert len(lines) == 6 and info.captions[0] == lines[:5]  # the sixth is not kept

    tokenizer = CaptionTokenizer(20)
    data = TextImageDataset(cfg, "test", tokenizer, [16, 32], train=False, use_cache=False)
    # no box: the shorter side to 32 px (bicubic), then the centre square of the longer one
    boxes = {(48, 36): ((43, 32), (5, 0)), (36, 48): ((32, 43), (0, 5)),
             (40, 40): ((32, 32), (0, 0))}
    for i in range(3):
        item = data[i]
        with Image.open(info.image_paths[i]) as img:
            rgb = img.convert("RGB")
        size, (left, top) = boxes[rgb.size]
        expected = np.asarray(rgb.resize(size, Image.BICUBIC).crop((left, top, left + 32,
                                                                     top + 32)))
        assert torch.equal(item["imgs"][1][0], as_model_input(expected)), rgb.size
        assert int(item["class_id"]) == i and item["key"] == keys[i]
        assert torch.equal(item["tokens"], tokenizer(info.captions[i][:2]))

    # R-precision negatives: captions of every other image, never the image's own
    bank_class = data.class_ids.repeat_interleave(5)
    valid = torch.ones(len(bank_class), dtype=torch.bool)
    owner = torch.arange(24).repeat_interleave(5)
    negatives, drawn = sample_negatives(data.class_ids[owner], bank_class, valid, 99, seed=0)
    assert drawn["smallest_pool"] == 23 * 5 and not drawn["with_replacement"]
    assert torch.all(negatives // 5 != owner[:, None])
    assert set((negatives // 5).flatten().tolist()) == set(range(24))

    trainer = DAMSMTrainer(cfg, CPU, progress=False)
    summary = trainer.train()
    assert summary["step"] == 1 and all(np.isfinite(v) for v in summary["losses"].values())
    assert summary["val"]["images"] == 24 and summary["val"]["captions"] == 120


# -------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_drawing_at_the_pixel_level(shape: str) -> None:
    """At every position and size: the shape's colour at its centre, the background (both tones
    of a two-tone one) at the corners and at the mirrored point, and a width on the centre row
    that grows with the size word."""
    px, colours, backgrounds = 64, list(COLOURS), list(BACKGROUNDS)
    for i, (pos, (x, y)) in enumerate(WHERE.items()):
        widths = []
        for j, size in enumerate(SIZES):
            colour, bg = colours[(i + j) % 6], backgrounds[(3 * i + j) % 5]
            img = np.asarray(draw_shape_image(shape, colour, size, pos, bg, px)).astype(int)
            row, col = int(y * px), int(x * px)
            assert np.abs(img[row, col] - COLOURS[colour]).max() <= 2, (pos, size, colour)
            top, bottom = BACKGROUNDS[bg][0], BACKGROUNDS[bg][-1]
            for r, c, tone in [(0, 0, top), (0, -1, top), (-1, 0, bottom), (-1, -1, bottom)]:
                assert np.abs(img[r, c] - tone).max() <= 2, (pos, size, bg, r, c)
            if pos != "center":
                r, c = int((1 - y) * px), int((1 - x) * px)
                tone = top if r < px // 2 else bottom
                assert np.abs(img[r, c] - tone).max() <= 2, (pos, size, "mirrored point")
            on_row = np.abs(img[row] - COLOURS[colour]).max(axis=1) <= 40
            widths.append(int(on_row.sum()))
        assert widths[0] < widths[1] < widths[2], (pos, widths)
        if shape == "circle":  # diameter 2·r·px with r = 0.19, 0.25, 0.31
            assert widths == pytest.approx([24.3, 32, 39.7], abs=2)


CAPTION = re.compile(r"an? (small|medium|large) (\w+) (\w+) in the (.+) on a (.+) background$")


def test_shapes_set_pictures_show_their_first_caption(shapes_dir) -> None:
    """Every picture of the generated set (JPEG, 32 px) has its first caption's colour at the
    caption's position and its background at the corners, and sits in its class folder."""
    checked = 0
    for split in ("train", "test"):
        for key in safe_load_pickle(shapes_dir / split / "filenames.pickle"):
            caption = (shapes_dir / "text" / f"{key}.txt").read_text().splitlines()[0]
            _, colour, shape, pos, bg = CAPTION.match(caption).groups()
            assert key.split("/")[0].split(".", 1)[1] == f"{colour}_{shape}"
            with Image.open(shapes_dir / "CUB_200_2011" / "images" / f"{key}.jpg") as img:
                pixels = np.asarray(img.convert("RGB")).astype(float)
            x, y = WHERE[pos]
            r, c = int(y * 32), int(x * 32)
            centre = pixels[r - 1: r + 2, c - 1: c + 2].reshape(-1, 3).mean(0)
            nearest = min(COLOURS, key=lambda name: np.abs(centre - COLOURS[name]).max())
            assert nearest == colour and np.abs(centre - COLOURS[colour]).max() <= 24, key
            top, bottom = BACKGROUNDS[bg][0], BACKGROUNDS[bg][-1]
            for r, c, tone in [(0, 0, top), (0, -1, top), (-1, 0, bottom), (-1, -1, bottom)]:
                assert np.abs(pixels[r, c] - tone).max() <= 24, (key, r, c)
            checked += 1
    assert checked == 36


# -------------------------------------------------------------- the real images FID sees
def make_birds_like(root: Path) -> list[np.ndarray]:
    """Two test images in the CUB layout with hand-picked boxes; returns their pixels as
    decoded from the written files."""
    images = root / "CUB_200_2011" / "images" / "001.Test"
    images.mkdir(parents=True)
    (root / "text" / "001.Test").mkdir(parents=True)
    keys = ["001.Test/a", "001.Test/b"]
    decoded = []
    for key, (w, h) in zip(keys, [(100, 80), (60, 90)], strict=True):
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([2 * xx, 2 * yy, 120 + 100 * ((xx // 7 + yy // 5) % 2)], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(root / "CUB_200_2011" / "images" /
                                                      f"{key}.jpg", quality=95)
        with Image.open(root / "CUB_200_2011" / "images" / f"{key}.jpg") as img:
            decoded.append(np.asarray(img.convert("RGB")))
        (root / "text" / f"{key}.txt").write_text("a test bird\nanother caption\n")
    (root / "CUB_200_2011" / "images.txt").write_text("1 001.Test/a.jpg\n2 001.Test/b.jpg\n")
    (root / "CUB_200_2011" / "bounding_boxes.txt").write_text("1 10 20 30 20\n2 40 70 16 30\n")
    (root / "test").mkdir()
    write_pickle(keys, root / "test" / "filenames.pickle")
    write_pickle([1, 1], root / "test" / "class_info.pickle")
    return decoded


def test_fid_real_images_are_box_cropped_and_resized(tmp_path) -> None:
    """`fid_score.py --data/--cfg` compares against the test split cropped to 1.5·max(w, h)
    around each box (clipped to the picture), shorter side resized to the largest GAN size, the
    longer centre-cropped — the same pixels the evaluation items of the datasets hold.

    a: 100×80, box (10, 20, 30, 20): r = 22 around (25, 30) -> x 3..47, y 8..52 (44×44) -> 32×32.
    b: 60×90, box (40, 70, 16, 30): r = 22 around (48, 85) -> x 26..60, y 63..90 (34×27, clipped)
    -> 40×32 -> columns 4..36."""
    decoded = make_birds_like(tmp_path / "birds")
    out = tmp_path / "run"
    (out / "valid" / "single").mkdir(parents=True)
    cfg = load_config(ROOT / "cfg" / "eval_clip_bird.yml",
                      [f"DATA_DIR={tmp_path / 'birds'}", f"OUTPUT_DIR={out}",
                       "TREE.BRANCH_NUM=2", "TREE.BASE_SIZE=16"], quiet=True)
    target = resolve_data(cfg, dims=64)
    assert target.size == 32 and isinstance(target.real, SplitImages)
    a = Image.fromarray(decoded[0][8:52, 3:47]).resize((32, 32), Image.BICUBIC)
    b = Image.fromarray(decoded[1][63:90, 26:60]).resize((40, 32), Image.BICUBIC)
    b = b.crop((4, 0, 36, 32))
    data = TextImageDataset(cfg, "test", CaptionTokenizer(20), [16, 32], train=False,
                            use_cache=False)
    for i, expected in enumerate([np.asarray(a), np.asarray(b)]):
        real = target.real[i]
        assert real.dtype == torch.uint8 and real.shape == (3, 32, 32)
        assert torch.equal(real, torch.from_numpy(expected.copy()).permute(2, 0, 1)), f"image {i}"
        assert torch.equal(data[i]["imgs"][1][0], as_model_input(expected))
