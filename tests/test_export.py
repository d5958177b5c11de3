"""A trained generator travels (export.py, miscc/export.py, docs/DESIGN.md §15): one folder of
safetensors, config and model card that draws the pixels the run drew with nothing else on disk,
read without any pickle, from a folder or a Hub id; drawing streams in bounded memory and a
re-run finishes what an interrupted one began."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, assert_same_tensors

import export
import generate
from drawing import CLIPGEN, DMGAN, Drawer, draw, find_run, load, write_stream
from miscc.config import load_config, save_config
from miscc.export import EXPORT_FORMAT, ExportError, open_export
from miscc.utils import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["a large red star in the top left on a black background", "a small blue circle"]


def cli(module, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(list(args))
    return code, out.getvalue(), err.getvalue()


def movable_run(run: Path, tmp: Path) -> Path:
    """A copy of a fixture run whose encoder (and tokenizer) files live under `tmp` too, so
    deleting `tmp/run` and `tmp/parts` leaves nothing the export could lean on."""
    cfg = load_config(run / "config.yml", quiet=True)
    copy = tmp / "run"
    shutil.copytree(run, copy)
    parts = tmp / "parts"
    for key in ("TRAIN.NET_E", "CLIPGEN.VQGAN"):
        section, name = key.split(".")
        if cfg[section][name]:
            src = Path(cfg[section][name])
            dest = parts / src.parent.parent.name / "Model" / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            cfg[section][name] = str(dest)
    save_config(cfg, copy)
    return copy


@pytest.mark.parametrize("kind", [DMGAN, CLIPGEN])
def test_an_export_draws_the_runs_pixels_with_the_training_tree_gone(
        kind, dmgan_run, clipgen_run, tmp_path, monkeypatch) -> None:
    run = movable_run(dmgan_run if kind == DMGAN else clipgen_run, tmp_path / "train")
    before = draw(run, CAPTIONS, n=2, seed=4)
    weights = {k: v for k, v in load_checkpoint(find_run(run).checkpoint)["state_dict"].items()}
    out = tmp_path / "models" / "shapes-x"
    code, stdout, err = cli(export, str(run), str(out))
    assert code == 0, err
    assert f"exported the {kind} generator" in stdout
    shutil.rmtree(tmp_path / "train")  # the run, its encoder and tokenizer
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["format"] == EXPORT_FORMAT and manifest["kind"] == kind
    expected = {"generator", "encoder", *(["tokenizer"] if kind == CLIPGEN else [])}
    assert set(manifest["parts"]) == expected
    # no pickle on the export path: every load goes through safetensors
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load on an export"))
    assert_same_tensors(load_checkpoint(out / "generator.safetensors")["state_dict"], weights)
    assert np.array_equal(draw(out, CAPTIONS, n=2, seed=4), before)
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "mit" and header["datasets"] == ["shapes"]
    assert header["pipeline_tag"] == "text-to-image"
    assert 'python generate.py shapes-x "' in card
    config = yaml.safe_load((out / "config.yml").read_text())
    assert config["TRAIN"]["NET_E"] == "encoder.safetensors"


def test_export_of_a_finished_demo_like_run_carries_its_metrics(dmgan_run, tmp_path) -> None:
    run = movable_run(dmgan_run, tmp_path)
    (run / "metrics.json").write_text(json.dumps(
        {"r_precision": 0.9075, "clip_score": 81.42, "judge": {
            "shape": 0.545, "colour": 0.995, "size": 0.629, "pos": 0.975, "bg": 0.845,
            "mean": 0.798}, "judge_fd": {"generated": 5.67}}))
    out = export.main([str(run), str(tmp_path / "e")]) == 0 and tmp_path / "e"
    header = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    metrics = {m["name"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
    assert metrics["R-precision (%)"] == 90.75 and metrics["shapes judge: shape (%)"] == 54.5
    assert metrics["Fréchet distance in the judge's features"] == 5.67
    assert json.loads((out / "metrics.json").read_text())["clip_score"] == 81.42


def test_a_broken_export_is_one_clear_error(dmgan_run, tmp_path) -> None:
    good = tmp_path / "good"
    assert export.main([str(movable_run(dmgan_run, tmp_path / "t")), str(good)]) == 0
    cases = {}
    for name in ("missing", "truncated", "garbled", "no_manifest", "other_sizes"):
        cases[name] = tmp_path / name
        shutil.copytree(good, cases[name])
    (cases["missing"] / "encoder.safetensors").unlink()
    data = (cases["truncated"] / "generator.safetensors").read_bytes()
    (cases["truncated"] / "generator.safetensors").write_bytes(data[: len(data) // 2])
    garbled = bytearray(data)
    garbled[:8] = b"\xff" * 8  # the header length: no longer safetensors, same size
    (cases["garbled"] / "generator.safetensors").write_bytes(bytes(garbled))
    (cases["no_manifest"] / "export.json").unlink()
    config = yaml.safe_load((cases["other_sizes"] / "config.yml").read_text())
    config["GAN"]["GF_DIM"] = 2 * config["GAN"]["GF_DIM"]
    (cases["other_sizes"] / "config.yml").write_text(yaml.safe_dump(config))
    expect = {"missing": "is missing encoder.safetensors",
              "truncated": "generator.safetensors has",
              "garbled": "cannot be read",
              "no_manifest": "no generator checkpoint in",
              "other_sizes": "GF_DIM: checkpoint"}
    for name, folder in cases.items():
        code, _, err = cli(generate, str(folder), "a red star", "--out", str(tmp_path / "o"),
                           "--no-progress", "--gpu", "-1")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert expect[name] in lines[0], (name, lines[0])
    with pytest.raises(ExportError, match="not an export"):
        export.main  # noqa: B018
        from miscc.export import export_run

        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "notes.txt").write_text("mine")
        export_run(dmgan_run, tmp_path / "busy")


def test_a_caption_file_that_is_not_text_is_one_error(dmgan_run, tmp_path) -> None:
    binary = tmp_path / "captions.bin"
    binary.write_bytes(bytes(range(256)))
    code, _, err = cli(generate, str(dmgan_run), "--captions", str(binary), "--no-progress")
    assert code == 2 and err.strip().splitlines() == [
        f"error: --captions: {binary} is not a text file (UTF-8, one caption per line): "
        "byte 128 cannot be read"]


# --------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("kind", [DMGAN, CLIPGEN])
def test_streaming_writes_the_pixels_of_drawing_all_at_once(kind, dmgan_run, clipgen_run,
                                                           tmp_path) -> None:
    drawer = load(dmgan_run if kind == DMGAN else clipgen_run)
    at_once = drawer(CAPTIONS, n=5, seed=2)
    written, skipped, grid = write_stream(drawer, CAPTIONS, 5, tmp_path, seed=2, batch=3,
                                          progress=False)
    assert (written, skipped) == (10, 0) and grid == tmp_path / "grid.png"
    from PIL import Image

    from drawing import drawing_path

    for i, caption in enumerate(CAPTIONS):
        for j in range(5):
            with Image.open(drawing_path(tmp_path, i, caption, j)) as img:
                assert np.array_equal(np.asarray(img), at_once[i, j])


def test_an_interrupted_stream_is_finished_by_a_rerun_without_redrawing(
        dmgan_run, tmp_path, monkeypatch) -> None:
    drawer = load(dmgan_run)
    whole = tmp_path / "whole"
    write_stream(drawer, CAPTIONS, 7, whole, batch=4, progress=False)
    drawn, real = [], Drawer.draw_pairs

    def counting(self, tokens, caption, draw, seed=None):
        drawn.append(len(draw))
        if len(drawn) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the third batch
        return real(self, tokens, caption, draw, seed)

    monkeypatch.setattr(Drawer, "draw_pairs", counting)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        write_stream(drawer, CAPTIONS, 7, part, batch=4, progress=False)
    assert len(list(part.glob("0*.png"))) == 8 and not list(part.glob(".*"))
    drawn.clear()
    monkeypatch.setattr(Drawer, "draw_pairs", real)
    monkeypatch.setattr(Drawer, "draw_pairs", lambda *a, **k: drawn.append(len(a[3])) or real(
        *a, **k))
    written, skipped, _ = write_stream(drawer, CAPTIONS, 7, part, batch=4, progress=False)
    assert (written, skipped) == (6, 8) and sum(drawn) == 6
    for f in whole.glob("0*.png"):
        assert f.read_bytes() == (part / f.name).read_bytes()
    assert (whole / "grid.png").read_bytes() == (part / "grid.png").read_bytes()


def test_memory_stays_flat_however_many_images(tmp_path) -> None:
    """400 images of 1024 px (1.2 GB if they were all held) drawn by a stand-in generator
    through `write_stream`: the process's peak memory grows by less than 300 MB."""
    script = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
from drawing import write_stream
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)

class Big:
    def stream(self, captions, n, seed, batch, skip):
        for j in range(n):
            pixels = np.zeros((1024, 1024, 3), np.uint8)
            pixels[0, 0] = j % 256
            yield 0, j, pixels

write_stream(Big(), ["a caption"], 400, {str(tmp_path)!r}, batch=8, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.glob("*.png"))) == 401  # 400 images + the grid
    before, after = map(int, result.stdout.split()[-2:])  # MB
    assert after - before < 300, result.stdout


# -------------------------------------------------------------------------- hub, evaluation
def test_a_hub_id_is_read_from_huggingface_hubs_cache(dmgan_run, tmp_path) -> None:
    """`generate.py owner/name` goes through huggingface_hub (offline here: a model already
    in its cache, laid out as the Hub's downloads are)."""
    snapshot = tmp_path / "hub" / "models--someone--shapes-dmgan" / "snapshots" / "0123abc"
    assert export.main([str(movable_run(dmgan_run, tmp_path / "t")), str(snapshot)]) == 0
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "generate.py", "someone/shapes-dmgan", "a red star",
                          "--out", str(tmp_path / "drawn"), "--no-progress", "--gpu", "-1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"DM-GAN: {snapshot / 'generator.safetensors'}" in run.stdout
    assert (tmp_path / "drawn" / "000_a-red-star_0.png").is_file()
    run = subprocess.run([sys.executable, "generate.py", "someone/absent", "a red star"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.startswith(
        "error: someone/absent is neither a folder here nor a Hub model that can be fetched")


def test_the_evaluation_of_main_py_takes_an_export(dmgan_run, shapes_dir, tmp_path) -> None:
    import main

    exported = tmp_path / "e"
    assert export.main([str(movable_run(dmgan_run, tmp_path / "t")), str(exported)]) == 0
    out = tmp_path / "eval"
    code = main.main(["--cfg", "cfg/eval_clip_shapes.yml", "--no-progress", "--set",
                      f"DATA_DIR={shapes_dir}", "--set", f"OUTPUT_DIR={out}", "--set",
                      f"TRAIN.NET_G={exported}", "--set", "TRAIN.NET_E=nowhere",
                      "--set", "EVAL.NUM_IMAGES=12", "--set", "WORKERS=0"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 12 and metrics["generator"] == str(
        open_export(exported).files["generator"])
