"""The language-free path as README writes it: train_vqgan.py then train_clipgen.py on a plain
folder of images, the second finding the first's tokenizer with no path in either config, then
generate.py on the result; and a folder whose files cannot be decoded is one clear error."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

import generate
import train_clipgen
import train_vqgan

pytestmark = pytest.mark.usefixtures("one_thread")
SECTION = "## CLIP-GEN on a folder of images"
# tiny networks on 16 px pictures: 12 training images / batch 4 = 3 steps an epoch
VQ_TINY = ["WORKERS=0", "CPU_THREADS=1", "TREE.BASE_SIZE=16", "TRAIN.BATCH_SIZE=4",
           "TRAIN.MAX_EPOCH=1", "VQGAN.CH=8", "VQGAN.CH_MULT=[1,2,2]",
           "VQGAN.NUM_RES_BLOCKS=1", "VQGAN.ATTN_RESOLUTIONS=[4]", "VQGAN.Z_CHANNELS=8",
           "VQGAN.N_EMBED=16", "VQGAN.EMBED_DIM=8", "VQGAN.RESTART_EVERY=2",
           "VQGAN.PERCEPTUAL_WEIGHT=0", "VQGAN.DISC_WEIGHT=0", "VQGAN.VAL_IMAGES=4",
           "VQGAN.HOLDOUT=0.2"]
GPT_TINY = ["WORKERS=0", "CPU_THREADS=1", "TREE.BASE_SIZE=16", "TRAIN.BATCH_SIZE=4",
            "TRAIN.MAX_EPOCH=1", "CLIPGEN.N_LAYER=1", "CLIPGEN.N_EMBD=16", "CLIPGEN.N_HEAD=2",
            "CLIPGEN.VIEWS=1", "CLIPGEN.WARMUP_STEPS=2", "CLIPGEN.RECON_WEIGHT=0",
            "CLIPGEN.TOP_K=0", "TEXT.EMBEDDING_DIM=64", "VQGAN.HOLDOUT=0.2"]


def readme_commands() -> list[list[str]]:
    """The `python ...` lines of README's folder section, split like a shell would."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines()
            if line.startswith("python ")]


def run(main, argv: list[str]) -> tuple[int, str, str]:
    """A command line's main in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--no-progress", *argv] if main is not generate.main else argv)
    return code, out.getvalue(), err.getvalue()


def as_here(argv: list[str], folder: Path) -> list[str]:
    """README's arguments for this machine: the test folder, the CPU, configs of the repo."""
    out = []
    for arg in argv:
        arg = arg.replace("FOLDERNAME", folder.name).replace("FOLDER", str(folder))
        out.append(str(ROOT / arg) if arg.startswith("cfg/") else arg)
    return ["-1" if a == "0" and out[i - 1] == "--gpu" else a for i, a in enumerate(out)]


def picture_folder(root: Path, n: int = 15) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"group{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return root


def test_readme_folder_commands_train_both_steps_and_draw(tmp_path, tiny_encoder_ckpt,
                                                          monkeypatch) -> None:
    commands = readme_commands()
    assert [c[1] for c in commands] == ["train_vqgan.py", "train_clipgen.py", "generate.py"]
    folder = picture_folder(tmp_path / "pictures")
    monkeypatch.chdir(tmp_path)  # the runs write output/<folder name>_* here
    vq, gpt, draw = (as_here(c[2:], folder) for c in commands)

    code, _, err = run(train_vqgan.main, [*vq, *[f"--set={s}" for s in VQ_TINY]])
    assert code == 0, err
    assert list((tmp_path / "output" / "pictures_VQGAN" / "Model").glob("vqgan*.pth"))
    assert (tmp_path / "output" / "pictures_VQGAN" / "metrics.json").is_file()  # 3 held out

    code, stdout, err = run(train_clipgen.main, [*gpt, *[f"--set={s}" for s in (
        *GPT_TINY, f"TRAIN.NET_E={tiny_encoder_ckpt}")]])
    assert code == 0, err
    run_dir = tmp_path / "output" / "pictures_CLIPGEN"
    assert (run_dir / "Model" / "gpt_epoch_1.pth").is_file()
    assert "has no captions" in stdout

    code, stdout, err = run(generate.main, draw)
    assert code == 0, err
    assert (run_dir / "generated" / "grid.png").is_file()
    assert len(list((run_dir / "generated").glob("000_*.png"))) == 1


def test_a_folder_of_undecodable_files_says_so(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"not a jpeg at all")
    monkeypatch.chdir(tmp_path)
    vq = as_here(readme_commands()[0][2:], folder)
    code, _, err = run(train_vqgan.main, [*vq, *[f"--set={s}" for s in VQ_TINY]])
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: none of the 2 image files of the train split under {folder} "
                          "could be decoded (")
    assert "must hold images PIL can read" in err


def test_a_missing_test_dir_is_one_clear_error(tmp_path, monkeypatch) -> None:
    folder = picture_folder(tmp_path / "pictures")
    monkeypatch.chdir(tmp_path)
    vq = as_here(readme_commands()[0][2:], folder)
    code, _, err = run(train_vqgan.main, [*vq, *[f"--set={s}" for s in VQ_TINY],
                                          "--set", "VQGAN.TEST_DIR=nowhere"])
    assert code == 2, err
    assert err.startswith("error: VQGAN.TEST_DIR nowhere is not a directory"), err
