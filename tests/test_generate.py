"""generate.py and its seam `drawing.draw`: typed captions drawn by a DM-GAN or a CLIP-GEN run
found from its folder or checkpoint; files and grid written, seeds reproducible, clear errors."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GAN_TINY, ROOT
from PIL import Image
from test_vqgan import vq_cfg

import generate
from clipgen.gpt import CondGPT, GPTArch
from clipgen.models import gpt_checkpoint, sources
from clipgen.vqgan import VQModel
from drawing import CLIPGEN, DMGAN, RunError, draw, find_run, load
from miscc.config import load_config, save_config
from miscc.utils import atomic_torch_save
from model import ClipEncoder, Generator, gan_arch, generator_checkpoint, init_gan_weights

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["a large red star in the top left on a black background", "a small blue circle"]


@pytest.fixture(scope="module")
def dmgan_run(shapes_dir, tiny_encoder_ckpt, tmp_path_factory) -> Path:
    """A DM-GAN run folder as main.py leaves it: config.yml + Model/netG_epoch_2.pth (untrained,
    seeded), the encoder a stage-1 checkpoint."""
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


@pytest.fixture(scope="module")
def clipgen_run(shapes_dir, tiny_encoder_ckpt, tmp_path_factory) -> Path:
    """A CLIP-GEN run folder as train_clipgen.py leaves it: config.yml + Model/gpt_epoch_1.pth
    tied to a tiny tokenizer and the tiny encoder (untrained, seeded)."""
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


def run_cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """generate.main in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        old = generate.sys.stdin
        generate.sys.stdin = io.StringIO(stdin)
        try:
            code = generate.main(list(args))
        finally:
            generate.sys.stdin = old
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("kind", [DMGAN, CLIPGEN])
def test_cli_writes_each_image_and_one_grid(kind, dmgan_run, clipgen_run, tmp_path) -> None:
    run = dmgan_run if kind == DMGAN else clipgen_run
    captions = tmp_path / "more.txt"
    captions.write_text("a green cross\n\n")
    out = tmp_path / "drawn"
    code, stdout, err = run_cli(str(run), CAPTIONS[0], "-", "--captions", str(captions),
                                "--n", "2", "--seed", "3", "--out", str(out), "--gpu", "-1",
                                stdin="a small blue circle\n")
    assert code == 0, err
    assert stdout.splitlines()[0].startswith(f"{kind}: ")
    files = sorted(p.name for p in out.glob("0*.png"))
    assert files == ["000_a-large-red-star-in-the-top-left-on-a-bl_0.png",
                     "000_a-large-red-star-in-the-top-left-on-a-bl_1.png",
                     "001_a-small-blue-circle_0.png", "001_a-small-blue-circle_1.png",
                     "002_a-green-cross_0.png", "002_a-green-cross_1.png"]
    size = 32 if kind == DMGAN else 16
    with Image.open(out / files[0]) as img:
        assert img.size == (size, size)
    with Image.open(out / "grid.png") as grid:  # 2 columns x 3 rows of 128 px cells + captions
        assert grid.size[0] == 2 * 128 and grid.size[1] > 3 * 128
    assert f"wrote 6 images to {out}/ and the grid {out / 'grid.png'}" in stdout


@pytest.mark.parametrize("kind", [DMGAN, CLIPGEN])
def test_same_seed_same_pixels_and_draws_independent_of_other_captions(
        kind, dmgan_run, clipgen_run) -> None:
    run = dmgan_run if kind == DMGAN else clipgen_run
    drawer = load(run)
    first = draw(drawer, CAPTIONS, n=2, seed=5)
    assert first.dtype == np.uint8 and first.shape[:2] == (2, 2) and first.shape[-1] == 3
    assert np.array_equal(first, draw(run, CAPTIONS, n=2, seed=5))  # reloaded from disk
    # a caption's draw j does not depend on the other captions or on n (up to the float
    # rounding of another batch size); another seed, or another draw, is another picture
    both = drawer.images(CAPTIONS, n=2, seed=5)
    alone = drawer.images(CAPTIONS[1:], n=1, seed=5)
    torch.testing.assert_close(alone[0, 0], both[1, 0], atol=1e-4, rtol=0)
    other = drawer.images(CAPTIONS, n=2, seed=6)
    assert (other - both).abs().mean() > 100 * (alone[0, 0] - both[1, 0]).abs().mean() + 1e-3
    assert (both[0, 1] - both[0, 0]).abs().mean() > 1e-3


def test_runs_are_recognised_from_folder_model_folder_and_file(dmgan_run, clipgen_run) -> None:
    assert find_run(dmgan_run).kind == DMGAN
    assert find_run(dmgan_run / "Model").checkpoint == dmgan_run / "Model" / "netG_epoch_2.pth"
    run = find_run(clipgen_run / "Model" / "gpt_epoch_1.pth")
    assert run.kind == CLIPGEN and run.folder == clipgen_run
    assert run.cfg.CLIPGEN.NET == str(clipgen_run / "Model" / "gpt_epoch_1.pth")


def test_a_renamed_checkpoint_is_recognised_by_its_format(dmgan_run, tmp_path) -> None:
    shutil.copytree(dmgan_run, tmp_path / "run")
    (tmp_path / "run" / "Model" / "netG_epoch_2.pth").rename(tmp_path / "run" / "Model" / "g.pth")
    assert find_run(tmp_path / "run" / "Model" / "g.pth").kind == DMGAN


@pytest.mark.parametrize("damage", ["missing", "no_checkpoint", "no_config", "encoder_run"])
def test_wrong_paths_are_one_clear_error(damage, dmgan_run, tiny_encoder_ckpt, tmp_path) -> None:
    run = tmp_path / "run"
    if damage == "missing":
        expect = f"error: {run} does not exist: give a run folder"
    elif damage == "no_checkpoint":
        shutil.copytree(dmgan_run, run)
        (run / "Model" / "netG_epoch_2.pth").unlink()
        expect = f"error: no generator checkpoint in {run / 'Model'}: expected"
    elif damage == "no_config":
        shutil.copytree(dmgan_run, run)
        (run / "config.yml").unlink()
        expect = f"error: {run} has no config.yml"
    else:
        run = tiny_encoder_ckpt.parent.parent
        expect = f"error: {run} is a stage-1 encoder run (pretrain_DAMSM.py), not a generator"
    code, _, err = run_cli(str(run), "a red circle", "--gpu", "-1")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(expect), err
    with pytest.raises(RunError):
        find_run(run)


def test_no_captions_is_one_clear_error(dmgan_run) -> None:
    code, _, err = run_cli(str(dmgan_run), "--gpu", "-1")
    assert code == 2 and err.startswith("error: no captions given"), err
