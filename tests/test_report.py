"""report.py: curves from TensorBoard logs, copied pictures, the metrics table."""

from __future__ import annotations

import json

from PIL import Image
from torch.utils.tensorboard import SummaryWriter

import report


def _stage(folder, tags, picture_dir, picture_name):
    writer = SummaryWriter(str(folder / "logs"))
    for step in range(5):
        for i, tag in enumerate(tags):
            writer.add_scalar(tag, 10.0 - step + i, step)
    writer.close()
    (folder / picture_dir).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / picture_dir / picture_name)


def test_report_from_stage_outputs(tmp_path):
    s1, s2, out = tmp_path / "s1", tmp_path / "s2", tmp_path / "report"
    _stage(s1, ["loss/w0", "val/r1"], "attention", "attention_3.png")
    _stage(s2, ["loss/g", "loss/d"], "Image", "samples_40.png")
    metrics = {"images": 120, "clip_score": 31.5, "r_precision": 0.8125,
               "r_precision_std": 0.031, "negatives": 99, "folds": [0.8] * 10}
    (s2 / "metrics.json").write_text(json.dumps(metrics))

    assert report.main(["--stage1", str(s1), "--stage2", str(s2), "--out", str(out),
                        "--fid", str(out / "missing.json")]) == 0
    text = (out / "report.md").read_text()
    assert "| R-precision (top-1 of 1 + 99) | 81.25 ± 3.10 % |" in text
    assert "| CLIP score | 31.50 |" in text
    assert report.FID_HINT in text  # no FID/IS results: the line saying how to enable them
    for name in ("stage1_losses.png", "stage2_losses.png", "samples.png", "attention.png"):
        assert f"]({name})" in text
        with Image.open(out / name) as img:
            assert img.format == "PNG", name
    assert Image.open(out / "samples.png").getpixel((0, 0)) == (200, 10, 10)


def test_scalars_are_read_back(tmp_path):
    _stage(tmp_path, ["loss/a"], "Image", "x.png")
    steps, values = report.read_scalars(tmp_path)["loss/a"]
    assert steps == [0, 1, 2, 3, 4]
    assert values == [10.0, 9.0, 8.0, 7.0, 6.0]


def test_missing_outputs_are_said_not_crashed(tmp_path, capsys):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    (tmp_path / "fid.json").write_text("{not json")
    fid = json.dumps({"fid": 12.3456})
    (tmp_path / "is.json").write_text(json.dumps({"is_mean": 2.5, "is_std": 0.25}))
    path = report.build_report(tmp_path / "s1", tmp_path / "s2", tmp_path / "out",
                               fid_file=tmp_path / "fid.json", is_file=tmp_path / "is.json")
    text = path.read_text()
    assert "not computed (run the evaluation config)" in text
    assert "| Inception Score | 2.50 ± 0.25 |" in text
    assert "No TensorBoard scalars found" in text
    assert "not readable JSON" in capsys.readouterr().err
    (tmp_path / "fid.json").write_text(fid)
    text = report.build_report(tmp_path / "s1", tmp_path / "s2", tmp_path / "out",
                               fid_file=tmp_path / "fid.json",
                               is_file=tmp_path / "is.json").read_text()
    assert "| FID | 12.346 |" in text
    assert report.FID_HINT not in text


def test_is_from_a_one_pass_fid_file(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    (tmp_path / "fid.json").write_text(json.dumps({"fid": 3.0, "is_mean": 1.5, "is_std": 0.5}))
    text = report.build_report(tmp_path / "s1", tmp_path / "s2", tmp_path / "out",
                               fid_file=tmp_path / "fid.json").read_text()
    assert "| FID | 3.000 |" in text
    assert "| Inception Score | 1.50 ± 0.50 |" in text
    assert report.FID_HINT not in text


def test_independent_scorer_and_judge_rows(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    judge = {"shape": 0.511, "colour": 0.994, "size": 0.459, "pos": 0.199, "bg": 0.257,
             "mean": 0.484, "images": 2000, "weights": "assets/shapes_judge.pt"}
    real = {"shape": 1.0, "colour": 1.0, "size": 0.995, "pos": 1.0, "bg": None, "mean": 0.99875,
            "images": 200}
    chance = {"shape": 1 / 6, "colour": 1 / 6, "size": 1 / 3, "pos": 0.2, "bg": 0.2,
              "mean": 0.2133333}
    metrics = {"images": 2000, "clip_score": 92.19, "r_precision": 0.994, "r_precision_std": 0.007,
               "negatives": 99,
               "independent": {"encoder": "ViT-B/32", "pretrained": "openai", "r_precision": 0.4525,
                               "r_precision_std": 0.0312, "clip_score": 24.5},
               "judge": judge, "judge_real": real, "judge_chance": chance}
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    text = report.build_report(tmp_path / "s1", tmp_path / "s2", tmp_path / "out",
                               metrics_file=tmp_path / "m.json").read_text()
    assert "| R-precision, independent scorer `ViT-B/32` | 45.25 ± 3.12 % |" in text
    assert "| CLIP score, independent scorer `ViT-B/32` | 24.50 |" in text
    lines = text.splitlines()
    header = lines.index("| images | shape | colour | size | position | background | mean |")
    assert lines[header + 1] == "| --- | --- | --- | --- | --- | --- | --- |"
    assert lines[header + 2:header + 5] == [
        "| generated (2000) | 51.1 | 99.4 | 45.9 | 19.9 | 25.7 | 48.4 |",
        "| real test pictures (200) | 100.0 | 100.0 | 99.5 | 100.0 | – | 99.9 |",
        "| chance | 16.7 | 16.7 | 33.3 | 20.0 | 20.0 | 21.3 |"]
    # without those entries: neither the rows nor the judge table
    del metrics["independent"], metrics["judge"]
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    text = report.build_report(tmp_path / "s1", tmp_path / "s2", tmp_path / "out",
                               metrics_file=tmp_path / "m.json").read_text()
    assert "independent scorer" not in text and "Shapes judge" not in text


def test_side_by_side_section_for_clipgen(tmp_path):
    """--clipgen adds one table with a column per generator (and the image-conditioned upper
    bound), the modality gap, both sample grids and CLIP-GEN's curves."""
    s1, s2, cg, out = (tmp_path / n for n in ("s1", "s2", "cg", "report"))
    _stage(s1, ["loss/w0"], "attention", "attention_3.png")
    _stage(s2, ["loss/g"], "Image", "G_epoch_4.png")
    _stage(cg, ["train/ce"], "Image", "G_epoch_40.png")
    judge = {"shape": 0.5, "colour": 0.9, "size": 0.6, "pos": 0.2, "bg": 0.3, "mean": 0.5}
    (s2 / "metrics.json").write_text(json.dumps(
        {"images": 2000, "clip_score": 90.0, "r_precision": 0.993, "r_precision_std": 0.005,
         "judge": judge, "independent": {"encoder": "x", "r_precision": 0.25,
                                         "r_precision_std": 0.01, "clip_score": 3.0}}))
    (cg / "metrics.json").write_text(json.dumps(
        {"images": 2000, "clip_score": 58.5, "r_precision": 0.304, "r_precision_std": 0.04,
         "judge": {**judge, "shape": 0.248},
         "modality_gap": {"images": 200, "captions": 2000, "paired_cosine": 0.88,
                          "unpaired_cosine": 0.001, "mean_offset": 0.162}}))
    (cg / "image_condition").mkdir()
    (cg / "image_condition" / "metrics.json").write_text(json.dumps(
        {"images": 2000, "clip_score": 50.4, "r_precision": 0.227, "r_precision_std": 0.024}))
    (tmp_path / "fid_cg.json").write_text(json.dumps({"fid": 41.234, "is_mean": 3.5}))
    assert report.main(["--stage1", str(s1), "--stage2", str(s2), "--clipgen", str(cg),
                        "--clipgen-fid", str(tmp_path / "fid_cg.json"), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| | DM-GAN | CLIP-GEN (text) | CLIP-GEN (image embedding) |" in text
    assert "| R-precision, training encoder (%) | 99.3 ± 0.5 | 30.4 ± 4.0 | 22.7 ± 2.4 |" in text
    assert "| R-precision, independent scorer (%) | 25.0 ± 1.0 | – | – |" in text
    assert "| judge: shape (%) | 50.0 | 24.8 | – |" in text
    assert "| FID | – | 41.23 | – |" in text and "| Inception Score | – | 3.50 | – |" in text
    assert "with its own image 0.880, with another image 0.001" in text
    assert "mean image embedding 0.162" in text
    for name in ("dmgan_samples.png", "clipgen_samples.png", "clipgen_losses.png"):
        assert f"]({name})" in text and (out / name).is_file()
    assert (out / "clipgen_samples.png").read_bytes() == \
        (cg / "Image" / "G_epoch_40.png").read_bytes()


def test_minimal_pair_rows_for_both_scorers(tmp_path):
    """The generated images' minimal-pair accuracy: a row per scorer and chance; none without."""
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()

    def entry(acc: float) -> dict:
        return {"accuracy": acc, "chance": 0.2, "count": 10}

    metrics = {"images": 20, "clip_score": 50.0, "r_precision": 0.5, "r_precision_std": 0.1,
               "minimal_pairs": {"shape": entry(0.9), "position": entry(0.25),
                                 "mean": entry(0.575)},
               "independent": {"encoder": "x", "r_precision": 0.4, "r_precision_std": 0.1,
                               "clip_score": 20.0,
                               "minimal_pairs": {"shape": entry(0.5), "position": entry(0.6),
                                                 "mean": entry(0.55)}}}
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    text = report.build_report(tmp_path / "s1", tmp_path / "s2", tmp_path / "out",
                               metrics_file=tmp_path / "m.json").read_text()
    lines = text.splitlines()
    header = lines.index("| scorer | shape | position | mean |")
    assert lines[header + 2:header + 5] == ["| training encoder | 90.0 | 25.0 | 57.5 |",
                                            "| independent scorer | 50.0 | 60.0 | 55.0 |",
                                            "| chance | 20.0 | 20.0 | 20.0 |"]
    assert report.comparison_rows([("A", metrics, None)])[-5:-3] == [
        "| minimal pairs, training encoder (%) | 57.5 |",
        "| minimal pairs, independent scorer (%) | 55.0 |"]
    del metrics["minimal_pairs"], metrics["independent"]["minimal_pairs"]
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    text = report.build_report(tmp_path / "s1", tmp_path / "s2", tmp_path / "out",
                               metrics_file=tmp_path / "m.json").read_text()
    assert "Minimal pairs" not in text
