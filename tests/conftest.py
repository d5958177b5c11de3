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


@pytest.fixture(scope="session")
def dmgan_run(shapes_dir, tiny_encoder_ckpt, tmp_path_factory) -> Path:
    """A DM-GAN run folder as main.py leaves it: config.yml + Model/netG_epoch_2.pth (untrained,
    seeded), the encoder a stage-1 checkpoint."""
    import torch

    from miscc.config import save_config
    from miscc.utils import atomic_torch_save
    from model import Generator, gan_arch, generator_checkpoint, init_gan_weights

    out = tmp_path_factory.mktemp("dmgan_run")
    cfg = load_config(ROOT / "cfg" / "clip_shapes_DMGAN.yml",
                      [*GAN_TINY, f"DATA_DIR={shapes_dir}", f"OUTPUT_DIR={out}",
                       f"TRAIN.NET_E={tiny_encoder_ckpt}"], quiet=True)
    torch.manual_seed(0)
    netG = Generator(gan_arch(cfg, 64))
    init_gan_weights(netG)
    atomic_torch_save(generator_checkpoint(netG), out / "Model" / "netG_epoch_2.pth")
    save_config(cfg, out)
    return out


@pytest.fixture(scope="session")
def clipgen_run(shapes_dir, tiny_encoder_ckpt, tmp_path_factory) -> Path:
    """A CLIP-GEN run folder as train_clipgen.py leaves it: config.yml + Model/gpt_epoch_1.pth
    tied to a tiny tokenizer and the tiny encoder (untrained, seeded)."""
    import torch
    from test_vqgan import vq_cfg

    from clipgen.gpt import CondGPT, GPTArch
    from clipgen.models import gpt_checkpoint, sources
    from clipgen.vqgan import VQModel
    from miscc.config import save_config
    from miscc.utils import atomic_torch_save
    from model import ClipEncoder

    root = tmp_path_factory.mktemp("clipgen_run")
    torch.manual_seed(0)
    vq = VQModel.from_config(vq_cfg(shapes_dir, root / "vq"))
    vq_path = root / "vq" / "Model" / "vqgan2.pth"
    atomic_torch_save(vq.checkpoint_state(), vq_path)
    encoder = ClipEncoder.from_checkpoint(tiny_encoder_ckpt)
    out = root / "run"
    cfg = load_config(ROOT / "cfg" / "clipgen_shapes.yml",
                      ["GPU_ID=-1", "TREE.BASE_SIZE=16", f"DATA_DIR={shapes_dir}",
                       f"OUTPUT_DIR={out}", f"CLIPGEN.VQGAN={vq_path}",
                       f"TRAIN.NET_E={tiny_encoder_ckpt}", "CLIPGEN.CANDIDATES=2"], quiet=True)
    gpt = CondGPT(GPTArch(vocab=16, tokens=16, cond_dim=64, n_layer=1, n_embd=16, n_head=2))
    belongs = sources(vq_path, vq.eval(), str(tiny_encoder_ckpt), encoder.eval())
    atomic_torch_save(gpt_checkpoint(gpt, belongs), out / "Model" / "gpt_epoch_1.pth")
    save_config(cfg, out)
    return out


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
