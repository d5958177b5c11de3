"""bench/shapes_judge.py: caption parsing, per-attribute scoring, and the command line."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from datasets import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    safe_load_pickle,
    shapes_captions,
)

sys.path.insert(0, str(ROOT / "bench"))
import shapes_judge


def test_first_caption_gives_back_every_attribute():
    for combo in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS):
        shape, colour, size, pos, bg = combo
        truth = shapes_judge.caption_truth(shapes_captions(shape, colour, size, pos, bg)[0])
        assert truth == [list(SHAPES).index(shape), list(COLOURS).index(colour),
                         list(SIZES).index(size), list(POSITIONS).index(pos),
                         list(BACKGROUNDS).index(bg)]
    with pytest.raises(ValueError, match="not a shapes-set first caption"):
        shapes_judge.caption_truth("this bird has a red crown and black wings")


def test_every_template_names_shape_and_colour():
    assert shapes_judge.named_attributes(1) == ["shape", "colour", "size"]
    assert shapes_judge.named_attributes(0) == list(shapes_judge.ATTRIBUTES)
    assert all({"shape", "colour"} <= set(shapes_judge.named_attributes(k)) for k in range(10))


def test_score_counts_only_the_attributes_a_caption_names():
    truth = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [2, 2, 2, 2, 2], [3, 3, 0, 3, 3]])
    pred = torch.tensor([[0, 0, 0, 0, 0],    # caption 0 names all five: all right
                         [1, 0, 2, 4, 4],    # caption 1 names shape, colour, size: shape right
                         [0, 2, 2, 2, 0],    # caption 2 names colour, shape, pos: 2 of 3 right
                         [3, 3, 0, 0, 0]])   # caption 4 names colour, shape, bg: bg wrong
    got = shapes_judge.score(pred, truth, [0, 1, 2, 4])
    assert got["shape"] == pytest.approx(3 / 4)
    assert got["colour"] == pytest.approx(3 / 4)
    assert got["size"] == pytest.approx(1 / 2)   # captions 0 and 1
    assert got["pos"] == pytest.approx(2 / 2)    # captions 0 and 2
    assert got["bg"] == pytest.approx(1 / 2)     # captions 0 and 4
    assert got["shape+colour"] == pytest.approx(2 / 4)


def fake_run(shapes_dir, run):
    """A generated tree whose images are the real test pictures; returns the test keys."""
    keys = safe_load_pickle(shapes_dir / "test" / "filenames.pickle")
    for i, key in enumerate(keys):
        dest = run / "valid" / "single" / f"{key}_s{i % 10}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shapes_dir / "CUB_200_2011" / "images" / f"{key}.jpg", dest)
    return keys


def judge_command(*args):
    return [sys.executable, str(ROOT / "bench" / "shapes_judge.py"), *map(str, args)]


def test_command_line_trains_saves_and_scores(shapes_dir, tmp_path):
    run = tmp_path / "run"
    keys = fake_run(shapes_dir, run)
    judge = tmp_path / "judge.pt"
    command = judge_command("--path", run, "--data", shapes_dir, "--judge", judge, "--images",
                            200, "--steps", 20)
    first = subprocess.run(command, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "judge on 200 new drawn pictures: shape" in first.stdout
    assert judge.is_file()
    second = subprocess.run(command, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "judge on" not in second.stdout  # loaded, not retrained
    lines = second.stdout.splitlines()
    assert lines[0].split()[2:] == [*shapes_judge.ATTRIBUTES, "shape+colour"]
    assert lines[1].split()[1:] == ["16.7", "16.7", "33.3", "20.0", "20.0", "2.8"]
    assert lines[2].startswith("real test pictures")
    assert lines[3].startswith(f"{run} ({len(keys)} images)")
    # the copies are the real pictures: shape and colour (named by every caption) score the same
    assert lines[3].split()[-6:-4] == lines[2].split()[-6:-4]


def test_missing_images_say_what_to_run(shapes_dir, tmp_path):
    result = subprocess.run(judge_command("--path", tmp_path, "--data", shapes_dir, "--judge",
                                          tmp_path / "j.pt", "--images", 50, "--steps", 2),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "valid/single has no <key>_s<k>.png images" in result.stderr
    assert "cfg/eval_clip_shapes.yml" in result.stderr


def test_bad_data_dir_and_bad_judge_file_say_so(shapes_dir, tmp_path):
    run = tmp_path / "run"
    fake_run(shapes_dir, run)
    result = subprocess.run(judge_command("--path", run, "--data", tmp_path / "nothing"),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert f"--data {tmp_path / 'nothing'}: DATA_DIR" in result.stderr
    assert "Traceback" not in result.stderr
    broken = tmp_path / "judge.pt"
    broken.write_bytes(b"not a checkpoint")
    result = subprocess.run(judge_command("--path", run, "--data", shapes_dir, "--judge", broken),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert f"judge {broken} cannot be read" in result.stderr
    assert "delete it to train a new judge" in result.stderr
    assert "Traceback" not in result.stderr
    assert broken.read_bytes() == b"not a checkpoint"  # left for the user to look at
