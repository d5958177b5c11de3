"""Images without captions for CLIP-GEN (docs/DESIGN.md §13): the images of an AttnGAN-layout
data set (CUB, COCO, shapes; captions are never read), or a plain folder searched recursively
(e.g. ImageNet's train/), with its test split from VQGAN.TEST_DIR or a held-out share.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from PIL import Image

from datasets import (
    BIRDS_LAYOUT,
    CroppedImages,
    DataError,
    image_sizes,
    is_coco,
    open_image_cache,
    read_boxes,
    safe_load_pickle,
)

# folder data: files decoded up front until one works, so a folder of files that are not
# images (or that PIL cannot read) is one clear error, not a batch-size complaint later
PROBE_IMAGES = 16
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def is_layout(root: Path) -> bool:
    """An AttnGAN layout (train/filenames.pickle), rather than a plain folder of images."""
    return (root / "train" / "filenames.pickle").is_file()


def list_images(root: Path) -> list[Path]:
    """Every image file under `root` (recursively, by suffix), in a stable order."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in sorted(files)
                  if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith(".")]
    return found


def _holdout_rank(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()


def folder_split(root: Path, split: str, holdout: float, test_dir: str = ""
                 ) -> tuple[list[str], list[Path]]:
    """(keys, paths) of one split of a folder of images. Test: every image of `test_dir`, or
    else the images whose path hash ranks in the first `holdout` share (at least one), which
    train then leaves out; the choice depends only on the relative paths."""
    if split == "test" and test_dir:
        root = Path(test_dir)
        if not root.is_dir():
            raise DataError(f"VQGAN.TEST_DIR {test_dir} is not a directory: point it at a "
                            "folder of test images, or set it to '' (--set VQGAN.TEST_DIR=) "
                            "to hold out VQGAN.HOLDOUT of DATA_DIR's images instead")
        paths = list_images(root)
    else:
        paths = list_images(root)
        if not test_dir:
            rels = [p.relative_to(root).as_posix() for p in paths]
            n_test = max(1, round(holdout * len(paths))) if len(paths) > 1 else 0
            held = set(sorted(rels, key=_holdout_rank)[:n_test])
            test = split == "test"
            paths = [p for p, r in zip(paths, rels, strict=True) if (r in held) == test]
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root} "
                        f"for the {split} split; point DATA_DIR (--data_dir) at a folder of "
                        f"images or at an AttnGAN layout:\n{BIRDS_LAYOUT}")
    keys = [p.relative_to(root).with_suffix("").as_posix() for p in paths]
    return keys, paths


def check_decodable(paths: list[Path], root: Path, split: str) -> None:
    """A DataError when none of the first PROBE_IMAGES files of a folder split decodes (it
    returns at the first file that does)."""
    tried = []
    for path in paths[:PROBE_IMAGES]:
        try:
            with Image.open(path) as img:
                img.load()
            return
        except (OSError, ValueError, SyntaxError) as err:
            tried.append(f"{path.name}: {err}")
    total = "the" if len(paths) <= PROBE_IMAGES else "the first"
    raise DataError(f"none of {total} {len(tried)} image files of the {split} split under "
                    f"{root} could be decoded ({'; '.join(tried[:3])}); DATA_DIR must hold "
                    "images PIL can read (jpg, png, ...)")


def layout_split(cfg, split: str) -> tuple[list[str], list[Path], list]:
    """(keys, paths, boxes) of an AttnGAN layout's split, without reading any caption."""
    root = Path(cfg.DATA_DIR)
    names = root / split / "filenames.pickle"
    if not names.is_file():
        raise DataError(f"{split} file list not found: {names}")
    keys = [str(k) for k in safe_load_pickle(names)]
    if is_coco(cfg):
        image_dir, boxes = root / "images", {}
    else:
        image_dir, boxes = root / "CUB_200_2011" / "images", read_boxes(root)
    paths = [image_dir / f"{k}.jpg" for k in keys]
    present = [i for i, p in enumerate(paths) if p.is_file()]
    if not present:
        raise DataError(f"no images of the {split} split found in {image_dir}")
    return ([keys[i] for i in present], [paths[i] for i in present],
            [boxes.get(keys[i]) for i in present])


class TokenizerImages(CroppedImages):
    """Items {"image": [3, S, S] in [-1, 1], "index", "key"} of one split: a random crop of
    the image resized to 76/64·S (and a flip when TRAIN.FLIP) in training, the centre crop at S
    in evaluation. Unreadable images are skipped and counted like the text-image data."""

    def __init__(self, cfg, split: str, train: bool, use_cache: bool = True) -> None:
        root = Path(str(cfg.DATA_DIR))
        if not str(cfg.DATA_DIR) or not root.is_dir():
            raise DataError(f"DATA_DIR {str(cfg.DATA_DIR)!r} is not a directory: give a folder "
                            "of images or an AttnGAN layout (--data_dir DIR)")
        self.layout = is_layout(root)
        if self.layout:
            keys, paths, boxes = layout_split(cfg, split)
        else:
            test_dir = str(cfg.VQGAN.TEST_DIR)
            keys, paths = folder_split(root, split, float(cfg.VQGAN.HOLDOUT), test_dir)
            check_decodable(paths, Path(test_dir) if split == "test" and test_dir else root,
                            split)
            boxes = [None] * len(keys)
        size = max(image_sizes(cfg))
        super().__init__(keys, paths, boxes, split, [size], 1, train, bool(cfg.TRAIN.FLIP),
                         random_crop=bool(cfg.TRAIN.RANDOM_CROP))
        if use_cache and self.layout:
            with contextlib.suppress(FileNotFoundError, DataError):
                self.cache, self.bad = open_image_cache(cfg, split, self.load_size, self.keys)

    def __getitem__(self, index: int) -> dict:
        index, imgs = self.views_of(index)
        return {"image": imgs[0][0], "index": index, "key": self.keys[index]}

