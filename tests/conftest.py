"""Shared fixtures: a tiny shapes set in the CUB layout and configs pointing at it."""

from __future__ import annotations

from pathlib import Path

import pytest

from datasets import make_shapes_dataset
from miscc.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# a tiny stage-2 run on the shapes fixture: 16/32 px, narrow networks, 24 / 4 = 6 steps an epoch
GAN_TINY = ["GPU_ID=-1", "WORKERS=0", "TREE.BRANCH_NUM=2", "TREE.BASE_SIZE=16", "GAN.GF_DIM=8",
            "GAN.DF_DIM=8", "GAN.Z_DIM=16", "GAN.CONDITION_DIM=8", "GAN.R_NUM=1",
            "TRAIN.BATCH_SIZE=4", "TRAIN.MAX_EPOCH=3", "TRAIN.SNAPSHOT_INTERVAL=1"]


@pytest.fixture
def one_thread():
    """Tiny networks run fastest (and never oversubscribe 2 cores) on one thread; a module opts
    in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """24 train / 12 test shapes pictures of 32 px (read-only: copy before damaging it)."""
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, n_train=24, n_test=12, size=32, seed=0)
    return out


@pytest.fixture(scope="session")
def coco_dir(tmp_path_factory) -> Path:
    """8 train / 24 test images in the COCO layout (read-only: copy before damaging it)."""
    return make_coco_like(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="session")
def tiny_encoder_ckpt(tmp_path_factory) -> Path:
    """A stage-1 encoder checkpoint (tiny CLIP ViT + adapter, seed 0) as pretrain_DAMSM.py
    writes it: <dir>/Model/clip3.pth."""
    import torch

    from miscc.utils import atomic_torch_save
    from model import ClipEncoder, resolve_clip_name

    path = tmp_path_factory.mktemp("encoder") / "Model" / "clip3.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = ClipEncoder(resolve_clip_name("tiny", ""), adapter=True)
    atomic_torch_save(encoder.checkpoint_state(), path)
    return path


@pytest.fixture(scope="module")
def data_dir(shapes_dir, tmp_path_factory) -> Path:
    """A module's private copy of the tiny shapes set (stage 2 writes its caches into it)."""
    import shutil

    out = tmp_path_factory.mktemp("data") / "shapes"
    shutil.copytree(shapes_dir, out)
    return out


@pytest.fixture
def shapes_cfg(shapes_dir):
    """A function: overrides -> merged config over cfg/DAMSM/shapes.yml on the tiny set."""

    def make(*overrides: str, data_dir: Path | None = None):
        return load_config(ROOT / "cfg" / "DAMSM" / "shapes.yml",
                           [f"DATA_DIR={data_dir or shapes_dir}", *overrides], quiet=True)

    return make


# ------------------------------------------------------------- helpers (import from conftest)
def flat_tensors(obj, prefix: str = "") -> dict:
    """Every tensor inside nested dicts/lists (e.g. a checkpoint), keyed by its path."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    out = {}
    for key, value in items:
        out.update(flat_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    """Same names and bit-identical tensors; the message names the first that differ."""
    import torch

    assert a.keys() == b.keys(), f"names differ: {sorted(set(a) ^ set(b))[:5]}"
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def make_coco_like(out: Path, n_train: int = 8, n_test: int = 24, seed: int = 0) -> Path:
    """A tiny data set in the COCO layout (docs/DESIGN.md §4): `images/<key>.jpg` of three aspect
    ratios, `text/<key>.txt` with 5 captions, `{train,test}/filenames.pickle`, and no
    `class_info.pickle`, boxes or `CUB_200_2011/`. Every caption is unique (it names its image's
    running number and its own index), so a caption's features identify it. The first test
    image has a sixth caption and an empty line (CAPTIONS_PER_IMAGE=5 keeps five)."""
    import numpy as np

    from datasets import (
        BACKGROUNDS,
        COLOURS,
        POSITIONS,
        SHAPES,
        SIZES,
        draw_shape_image,
        write_pickle,
    )

    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "text").mkdir(exist_ok=True)
    shapes_of = [SHAPES, list(COLOURS), list(SIZES), list(POSITIONS), list(BACKGROUNDS)]
    templates = ("a {1} {0} in photo {n}", "photo {n} shows a {2} {1} {0}",
                 "the {0} of photo {n} is {1}", "in photo {n} a {0} sits in the {3}",
                 "photo {n}: one {1} {0} on a {4} background", "a sixth caption of photo {n}")
    aspect = [(48, 36), (36, 48), (40, 40)]
    number = 0
    for split, count in (("train", n_train), ("test", n_test)):
        keys = []
        for _ in range(count):
            number += 1
            key = f"COCO_{split}2014_{number:012d}"
            pick = [v[int(rng.integers(len(v)))] for v in shapes_of]
            img = draw_shape_image(*pick, px=48).resize(aspect[number % 3])
            img.save(out / "images" / f"{key}.jpg", quality=95)
            caps = [t.format(*pick, n=number) for t in templates[:5]]
            if split == "test" and not keys:
                caps = [*caps[:2], "", *caps[2:], templates[5].format(*pick, n=number)]
            (out / "text" / f"{key}.txt").write_text("\n".join(caps) + "\n")
            keys.append(key)
        (out / split).mkdir(exist_ok=True)
        write_pickle(keys, out / split / "filenames.pickle")
    return out


def assert_checked_after_step(trainer, optimizer) -> None:
    """One `train_step` of `trainer` (its first batch) calls `checked` - the all-reduce and
    host read of the losses - once, after `optimizer` has stepped: on CUDA a read between
    forward and backward would leave the GPU idle until the host has the values."""
    seen = []
    real = trainer.checked

    def checked(values):
        seen.append(len(optimizer.state) > 0)  # Adam/AdamW fill their state at a step
        return real(values)

    trainer.checked = checked
    trainer.sampler.set_epoch(0)
    assert not optimizer.state
    trainer.train_step(next(iter(trainer.loader)))
    assert seen == [True], "checked() ran before the optimizer step"
