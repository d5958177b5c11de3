"""The Makefile's `demo` pipeline end to end, shrunk to seconds, through the real command lines:
prepare_data.py -> pretrain_DAMSM.py -> main.py (train) -> main.py (evaluate) -> fid_score.py
(offline: the weights-missing branch) -> report.py. Everything is written under tmp_path.

FID/IS with (random) weights are not run here: at 299 px a pass over even two dozen images
takes ~15 s on two cores; tests/test_metrics.py covers those numbers at a reduced input size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST, SIZE = 24, 12, 32
CAPTIONS_PER_IMAGE = 10  # TEXT.CAPTIONS_PER_IMAGE of the shapes configs
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# stage 2 at 16/32 px with narrow nets; the evaluation config must build the same generator
GAN_TINY = ["GPU_ID=-1", "WORKERS=0", "TREE.BASE_SIZE=16", "GAN.GF_DIM=8", "GAN.DF_DIM=8",
            "GAN.Z_DIM=16", "GAN.CONDITION_DIM=8"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore"}


def run(script: str, *args: str | Path | int, sets: tuple[str, ...] | list[str] = (),
        expect: int = 0) -> subprocess.CompletedProcess:
    """`python <script> <args> --set ...` from the repository root; a wrong exit code fails
    with the command, its stdout and its stderr."""
    cmd = [sys.executable, script, *map(str, args)]
    for item in sets:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == expect, (
        f"exit code {proc.returncode} (expected {expect}) from:\n  {' '.join(cmd)}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def test_demo_pipeline_end_to_end(tmp_path: Path) -> None:
    import torch

    from datasets import SHAPES_VERSION, safe_load_pickle
    from model import ClipEncoder

    data, s1, s2, demo = (tmp_path / n for n in ("shapes", "s1", "s2", "demo"))

    # 1. the synthetic shapes set
    run("prepare_data.py", "shapes", "--out", data, "--n-train", N_TRAIN, "--n-test", N_TEST,
        "--size", SIZE)
    assert json.loads((data / "shapes.json").read_text()) == \
        {"n_train": N_TRAIN, "n_test": N_TEST, "size": SIZE, "seed": 0,
         "version": SHAPES_VERSION}
    keys = [str(k) for k in safe_load_pickle(data / "test" / "filenames.pickle")]
    assert len(keys) == N_TEST
    captions = {key: min(CAPTIONS_PER_IMAGE, sum(
        1 for line in (data / "text" / f"{key}.txt").read_text().splitlines() if line.strip()))
        for key in keys}
    expected_pngs = {f"{key}_s{k}.png" for key, n in captions.items() for k in range(n)}
    assert len(expected_pngs) == sum(captions.values()) > N_TEST

    # 2. stage 1: one epoch of 3 steps on 32 px crops (stage 2's largest scale)
    out = run("pretrain_DAMSM.py", "--cfg", "cfg/DAMSM/shapes.yml", "--data_dir", data,
              "--no-progress",
              sets=[f"OUTPUT_DIR={s1}", "GPU_ID=-1", "WORKERS=0", "TREE.BASE_SIZE=32",
                    "TRAIN.MAX_EPOCH=1", "TRAIN.BATCH_SIZE=8", "TRAIN.SNAPSHOT_INTERVAL=1"])
    assert "done: epoch 1, step 3" in out.stdout, out.stdout
    encoder = ClipEncoder.from_checkpoint(s1 / "Model" / "clip1.pth")
    assert sum(p.numel() for p in encoder.parameters()) > 0
    assert all(torch.isfinite(p).all() for p in encoder.parameters())

    # 3. stage 2: one epoch of 12 steps (>= 10: the first TensorBoard loss scalars)
    out = run("main.py", "--cfg", "cfg/clip_shapes_DMGAN.yml", "--data_dir", data,
              "--no-progress",
              sets=[f"OUTPUT_DIR={s2}", f"TRAIN.NET_E={s1 / 'Model'}", *GAN_TINY,
                    "TRAIN.MAX_EPOCH=1", "TRAIN.BATCH_SIZE=2", "TRAIN.SNAPSHOT_INTERVAL=1"])
    assert "done: epoch 1, step 12" in out.stdout, out.stdout
    generators = sorted((s2 / "Model").glob("netG_epoch_*.pth"))
    assert [p.name for p in generators] == ["netG_epoch_1.pth"]

    # 4. evaluation: one image per test caption + R-precision and CLIP score
    run("main.py", "--cfg", "cfg/eval_clip_shapes.yml", "--data_dir", data, "--no-progress",
        sets=[f"OUTPUT_DIR={s2}", f"TRAIN.NET_E={s1 / 'Model'}", f"TRAIN.NET_G={s2 / 'Model'}",
              *GAN_TINY])
    single = s2 / "valid" / "single"
    found = {p.relative_to(single).as_posix() for p in single.rglob("*.png")}
    assert found == expected_pngs, (f"{len(found)} images vs {len(expected_pngs)} captions; "
                                    f"unexpected {sorted(found - expected_pngs)[:3]}, "
                                    f"missing {sorted(expected_pngs - found)[:3]}")
    metrics = json.loads((s2 / "metrics.json").read_text())
    assert metrics["images"] == len(expected_pngs)
    assert isinstance(metrics["r_precision"], float) and len(metrics["folds"]) == 10, metrics
    assert metrics["r_precision"] == pytest.approx(sum(metrics["folds"]) / 10), metrics
    assert isinstance(metrics["clip_score"], float), metrics

    # 5. FID offline, the Makefile's flags: no weights -> one `error:` message, exit code 2,
    # nothing on stdout (the Makefile then skips FID/IS). --allow-few-images gets past the
    # image-count check (120 generated / 12 real images are far fewer than --dims 2048 + 1).
    missing = tmp_path / "no-such-weights.pth"
    out = run("fid_score.py", "--data", "shapes", "--data_dir", data, "--dims", 2048, "--json",
              "--allow-few-images", "--no-progress", "--weights", missing,
              sets=[f"OUTPUT_DIR={s2}", *GAN_TINY], expect=2)
    assert out.stdout == ""
    assert out.stderr.startswith("error: "), out.stderr
    assert f"--weights {missing}: no such file" in out.stderr, out.stderr
    assert "weights-inception-2015-12-05-6726825d.pth" in out.stderr, out.stderr

    # 6. the report, from the two output folders; fid.json / is.json were never written
    fid_json, is_json = demo / "fid.json", demo / "is.json"
    run("report.py", "--stage1", s1, "--stage2", s2, "--fid", fid_json, "--is", is_json,
        "--out", demo)
    report = (demo / "report.md").read_text()
    for name in ("stage1_losses.png", "stage2_losses.png", "samples.png", "attention.png"):
        assert f"]({name})" in report, f"{name} not referenced in report.md:\n{report}"
        assert (demo / name).read_bytes().startswith(PNG_MAGIC), f"{name} is not a PNG"
    assert (demo / "samples.png").read_bytes() == (s2 / "Image" / "G_epoch_1.png").read_bytes()
    assert (demo / "attention.png").read_bytes() == \
        (s1 / "Image" / "attention_epoch_1.png").read_bytes()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    r_row = (f"| R-precision (top-1 of 1 + {metrics['negatives']}) | "
             f"{100 * metrics['r_precision']:.2f} ± {100 * metrics['r_precision_std']:.2f} % |")
    assert rows[:2] == ["| metric | value |", "| --- | --- |"], rows
    assert rows[2:5] == [r_row, f"| CLIP score | {metrics['clip_score']:.2f} |",
                         f"| generated test images | {len(expected_pngs)} |"], rows
    # the shapes judge's table: generated (its count), real test pictures, chance
    judge = metrics["judge"]
    assert set(judge) >= {"shape", "colour", "size", "pos", "bg", "mean", "images"}
    assert judge["mean"] == pytest.approx(sum(judge[k] for k in ("shape", "colour", "size",
                                                                 "pos", "bg")) / 5)
    assert rows[5:7] == ["| images | shape | colour | size | position | background | mean |",
                         "| --- | --- | --- | --- | --- | --- | --- |"], rows
    assert rows[7].startswith(f"| generated ({judge['images']}) | {100 * judge['shape']:.1f} |")
    assert rows[8].startswith("| real test pictures") and rows[9].startswith("| chance | 16.7 |")
    assert "FID / IS need torch-fidelity's Inception weights" in report
    assert "make demo INCEPTION_WEIGHTS=" in report
