"""The shapes judge (miscc/judge.py): caption parsing, per-attribute scoring, its float16 file,
and bench/shapes_judge.py, its command line."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys

import numpy as np
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
from miscc import judge as shapes_judge

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_confusion_counts_named_against_read_values_over_naming_captions():
    truth = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 1], [2, 2, 2, 2, 3], [3, 3, 0, 3, 3]])
    pred = torch.tensor([[0, 0, 0, 0, 4],    # caption 0 names bg: black read as light blue
                         [1, 0, 2, 4, 1],    # caption 1 names no bg
                         [0, 2, 2, 2, 3],    # caption 6 names bg: right
                         [3, 3, 0, 0, 1]])   # caption 4 names bg: 'white and gray' as black
    bg = shapes_judge.confusion(pred, truth, [0, 1, 6, 4], "bg")
    expected = torch.zeros(5, 5, dtype=torch.long)
    expected[1, 4] = expected[3, 3] = expected[3, 1] = 1
    assert torch.equal(bg, expected)
    shape = shapes_judge.confusion(pred, truth, [0, 1, 6, 4], "shape")  # every caption names it
    assert int(shape.sum()) == 4 and int(shape[0, 1]) == 1 and int(shape[2, 0]) == 1
    lines = shapes_judge.confusion_lines(pred, truth, [0, 1, 6, 4])
    at = lines.index(next(line for line in lines if line.startswith("bg:")))
    assert lines[at + 2].split()[-7:] == ["0", "0", "0", "0", "1", "0.0", "%"]  # black
    assert lines[at + 4].split()[-7:] == ["0", "1", "0", "1", "0", "50.0", "%"]
    assert lines[at + 1].split()[-1] == "-"  # white: no caption names it


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
    assert lines[0].split()[2:] == [*shapes_judge.ATTRIBUTES, "shape+colour", "Fréchet"]
    assert lines[1].split()[1:] == ["16.7", "16.7", "33.3", "20.0", "20.0", "2.8"]
    assert lines[2].startswith("real test pictures")
    assert lines[3].startswith(f"renderer, the test captions ({10 * len(keys)} images)")
    assert lines[4].startswith(f"{run} ({len(keys)} images)")
    # the copies are the real pictures: shape and colour (named by every caption) score the same
    assert lines[4].split()[-7:-5] == lines[2].split()[-7:-5]
    # ... and their Fréchet distance to them is 0; two halves of the real pictures are apart,
    # and so are drawings whose unnamed attributes are random
    assert abs(float(lines[4].split()[-1])) < 0.01 < float(lines[2].split()[-1])
    assert float(lines[3].split()[-1]) > 0.01
    tables = subprocess.run([*command, "--confusion"], capture_output=True, text=True,
                            check=True, cwd=tmp_path).stdout.splitlines()
    at = tables.index(f"{run}: what the judge reads for each value a caption names")
    assert tables[at + 1].startswith("shape: named / read")
    assert [t.split(":")[0] for t in tables[at + 1:] if ": named / read" in t] == \
        list(shapes_judge.ATTRIBUTES)


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


def test_saved_judge_is_float16_and_loads_back(tmp_path):
    torch.manual_seed(0)
    judge, acc = shapes_judge.train_judge(images=64, steps=3, progress=False)
    path = shapes_judge.save_judge(judge, acc, tmp_path / "j.pt", images=64, steps=3, seed=0)
    raw = torch.load(path, weights_only=True)
    floats = [v for v in raw["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    torch.save({"state_dict": judge.state_dict()}, tmp_path / "fp32.pt")
    assert path.stat().st_size < 0.6 * (tmp_path / "fp32.pt").stat().st_size
    loaded, info = shapes_judge.load_judge(path)
    assert info == {"format": shapes_judge.JUDGE_FORMAT, "fresh_accuracy": acc, "pixels": 32,
                    "images": 64, "steps": 3, "seed": 0}
    # train_judge already rounds to the saved float16 weights: the loaded judge is that network
    x, _ = shapes_judge.draw_pictures(20, seed=9)
    with torch.no_grad():
        for a, logits in loaded(x).items():
            assert torch.equal(logits, judge(x)[a])
    x_new, y_new = shapes_judge.draw_pictures(64, seed=2)  # train_judge's fresh pictures
    assert acc == shapes_judge.accuracy(shapes_judge.predict(loaded, x_new), y_new)


def test_foreign_or_missing_judge_files_name_the_fix(tmp_path):
    torch.save({"format": "something else", "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(shapes_judge.JudgeError,
                       match=r"judge .*other.pt does not hold this judge's weights \(format "
                             r"'something else'.*rebuild it with: python bench/shapes_judge.py "
                             r"--train --judge .*other.pt$"):
        shapes_judge.load_judge(tmp_path / "other.pt")
    with pytest.raises(shapes_judge.JudgeError, match=r"judge not found: .*gone.pt; delete"):
        shapes_judge.load_judge(tmp_path / "gone.pt", "delete it")
    assert shapes_judge.rebuild_command(shapes_judge.SHIPPED) == \
        "python bench/shapes_judge.py --train"


def test_judge_input_reads_pixels_like_the_files():
    from PIL import Image

    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = torch.from_numpy(big).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = torch.stack([shapes_judge.to_tensor(Image.fromarray(p)) for p in big])
    assert torch.equal(shapes_judge.judge_input(x), expected)
    small = x[:, :, :32, :32]
    assert torch.equal(shapes_judge.judge_input(small), small)


def test_metrics_entry_mean_of_the_five_and_no_nan():
    scores = {"shape": 0.5, "colour": 1.0, "size": float("nan"), "pos": 0.25, "bg": 0.25,
              "shape+colour": 0.5}
    assert shapes_judge.metrics_entry(scores, 8) == {"shape": 0.5, "colour": 1.0, "size": None,
                                                     "pos": 0.25, "bg": 0.25, "mean": 0.5,
                                                     "images": 8}
    chance = shapes_judge.metrics_entry(shapes_judge.chance())
    assert chance["mean"] == pytest.approx((1 / 6 + 1 / 6 + 1 / 3 + 1 / 5 + 1 / 5) / 5)
    assert "images" not in chance


def test_command_line_train_only_and_nothing_to_do(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("judge_cli", ROOT / "bench" / "shapes_judge.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    judge = tmp_path / "sub" / "judge.pt"
    assert cli.main(["--train", "--judge", str(judge), "--images", "40", "--steps", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"saved {judge}"
    assert shapes_judge.load_judge(judge)[1]["steps"] == 2
    assert cli.main([]) == 2
    assert capsys.readouterr().err == \
        "error: nothing to do: give --path RUN (repeatable) and/or --train\n"


def test_frechet_entry_equals_the_formula_on_the_judges_pooled_features():
    """`judge_fd`: ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) of the features (scipy's matrix square
    root as the reference), against the real pictures and between two fixed halves of them;
    `Judge.read` pools the last block's features over space and gives the heads' logits."""
    from scipy import linalg

    def reference(a, b):
        a, b = a.double().numpy(), b.double().numpy()
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = linalg.sqrtm(s1 @ s2).real
        return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))

    torch.manual_seed(0)
    real = torch.randn(40, 6) @ torch.randn(6, 6)
    generated = 0.5 + torch.randn(90, 6)
    entry = shapes_judge.frechet_entry(generated, real)
    assert entry["generated"] == pytest.approx(reference(generated, real), rel=1e-4)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert entry["real_halves"] == pytest.approx(reference(real[order[:20]], real[order[20:]]),
                                                 rel=1e-4)
    assert (entry["images"], entry["real_images"]) == (90, 40)
    assert shapes_judge.frechet_entry(real, real)["generated"] == pytest.approx(0, abs=1e-6)

    judge = shapes_judge.Judge().eval()
    x = torch.randn(3, 3, 32, 32)
    logits, pooled = judge.read(x)
    assert pooled.shape == (3, shapes_judge.FEATURES)
    assert torch.allclose(pooled, judge.trunk[:-2](x).mean((2, 3)))
    assert all(torch.equal(logits[a], v) for a, v in judge(x).items())
    reading = shapes_judge.read_pictures(judge, x)
    pred, features = shapes_judge.split_reading(reading)
    assert torch.equal(pred, shapes_judge.predict(judge, x)) and torch.equal(features, pooled)


def test_renderer_floor_keeps_named_attributes_and_draws_the_others(monkeypatch):
    """`draw_for_captions` (the perfect generator of bench/shapes_judge.py's floor row): a
    caption naming all five attributes gives back exactly the set's picture (same renderer,
    same JPEG encoding); a caption naming only some keeps those and varies the rest."""
    import io

    from PIL import Image

    from datasets import draw_shape_image

    truth = torch.tensor([[3, 1, 2, 4, 0]])
    words = [values[i] for values, i in zip(shapes_judge.ATTRIBUTES.values(), truth[0].tolist(),
                                            strict=True)]
    buffer = io.BytesIO()  # JPEG quality 95, as prepare_data.py writes the set
    draw_shape_image(*words, 32).save(buffer, format="JPEG", quality=95)
    expected = shapes_judge.to_tensor(Image.open(buffer))
    assert torch.equal(shapes_judge.draw_for_captions(truth, [0], 32)[0], expected)

    drawn = []
    real_draw = shapes_judge.draw_shape_image
    monkeypatch.setattr(shapes_judge, "draw_shape_image",
                        lambda *a, **k: drawn.append(a[:5]) or real_draw(*a, **k))
    k = 2  # "{a} {colour} {shape} placed in the {pos}": size and background are not named
    assert shapes_judge.named_attributes(k) == ["shape", "colour", "pos"]
    images = shapes_judge.draw_for_captions(truth.repeat(40, 1), [k] * 40, 32, seed=3)
    assert images.shape == (40, 3, shapes_judge.PIXELS, shapes_judge.PIXELS)
    assert {d[0] for d in drawn} == {words[0]} and {d[1] for d in drawn} == {words[1]}
    assert {d[3] for d in drawn} == {words[3]}
    assert len({d[2] for d in drawn}) == len(SIZES) and len({d[4] for d in drawn}) >= 4
