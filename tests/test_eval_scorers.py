"""Evaluation the training encoder cannot flatter: R-precision folds over a seeded shuffle (as
DM-GAN forms them), the independent scorer (EVAL.INDEPENDENT_ENCODER) and the shapes judge in
metrics.json, from `sampling.generate_test_set` and from `r_precision.py` scoring a tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main as main_cli
import r_precision as r_precision_cli
from datasets import CaptionTokenizer, DataError, SplitInfo, TextImageDataset, image_sizes
from miscc import judge as J
from miscc.config import load_config
from miscc.protocol import caption_items
from miscc.utils import atomic_torch_save
from model import (
    ClipEncoder,
    EncoderLoadError,
    Generator,
    gan_arch,
    generator_checkpoint,
    init_gan_weights,
    resolve_clip_name,
)
from r_precision import (
    fold_stats,
    load_independent_encoder,
    rank_first,
    sample_negatives,
    score_generated,
)
from sampling import generate_test_set

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY = ["GPU_ID=-1", "WORKERS=0", "TREE.BRANCH_NUM=2", "TREE.BASE_SIZE=16", "GAN.GF_DIM=8",
        "GAN.DF_DIM=8", "GAN.Z_DIM=16", "GAN.CONDITION_DIM=8", "GAN.R_NUM=1",
        "TRAIN.BATCH_SIZE=16"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ the folds
def test_folds_are_a_seeded_shuffle_not_caption_order():
    """Successes in caption order (all of the first half, none of the second): contiguous
    folds give std 0.5; the seeded folds are the hand-permuted array cut in ten, same mean."""
    success = torch.tensor([True] * 50 + [False] * 50)
    mean, std, rates = fold_stats(success)  # seed None: caption order
    assert rates == [1.0] * 5 + [0.0] * 5 and std == 0.5 and mean == 0.5
    shuffled = np.array([1.0] * 50 + [0.0] * 50)[np.random.default_rng(7).permutation(100)]
    expected = [float(shuffled[10 * i: 10 * (i + 1)].mean()) for i in range(10)]
    mean, std, rates = fold_stats(success, seed=7)
    assert rates == pytest.approx(expected, abs=1e-7)  # float32 fold means
    assert mean == pytest.approx(0.5) and std == pytest.approx(float(np.std(expected)), abs=1e-7)
    assert std < 0.25  # no longer the caption order's 0.5
    assert fold_stats(success, seed=8)[2] != rates  # the seed picks the permutation


def test_score_generated_forms_its_folds_from_the_seed():
    g = torch.Generator().manual_seed(0)
    sent = torch.randn(40, 3, 8, generator=g)
    classes, num = torch.arange(40) % 10, torch.full((40,), 3)
    items = caption_items(num)
    bank, true_idx = sent.reshape(-1, 8), items[:, 0] * 3 + items[:, 1]
    codes = bank[true_idx] + 1.2 * torch.randn(len(items), 8, generator=g)
    negatives, _ = sample_negatives(classes[items[:, 0]], classes.repeat_interleave(3),
                                    torch.ones(120, dtype=torch.bool), 99, seed=5)
    success = rank_first(codes, bank, true_idx, negatives)
    assert 0.1 < float(success.float().mean()) < 0.9
    got = score_generated(codes, items, sent, classes, num, seed=5)
    assert got["folds"] == fold_stats(success, seed=5)[2] != fold_stats(success)[2]
    assert got["r_precision"] == pytest.approx(float(success.float().mean()))  # 10 equal folds


# ------------------------------------------------------------------- fixtures: a tiny run
@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    """Two tiny stage-1 checkpoints of different random weights: the training encoder and the
    independent one."""
    root = tmp_path_factory.mktemp("enc")
    out = {}
    for seed, name in ((0, "main"), (1, "other")):
        torch.manual_seed(seed)
        out[name] = root / name / "Model" / "clip1.pth"
        atomic_torch_save(ClipEncoder(resolve_clip_name("tiny", ""), adapter=True)
                          .checkpoint_state(), out[name])
    return out


@pytest.fixture(scope="module")
def generator(data_dir, encoders, tmp_path_factory) -> Path:
    """An untrained tiny generator checkpoint (what it draws does not matter here)."""
    cfg = load_config(ROOT / "cfg" / "eval_clip_shapes.yml", [f"DATA_DIR={data_dir}", *TINY],
                      quiet=True)
    torch.manual_seed(0)
    netG = Generator(gan_arch(cfg, 64))
    init_gan_weights(netG)
    path = tmp_path_factory.mktemp("gen") / "netG_epoch_1.pth"
    atomic_torch_save(generator_checkpoint(netG), path)
    return path


def overrides(data_dir, encoders, generator, out, *extra) -> list[str]:
    return [f"DATA_DIR={data_dir}", f"OUTPUT_DIR={out}", f"TRAIN.NET_E={encoders['main']}",
            f"TRAIN.NET_G={generator}", *TINY, *extra]


def cli_args(data_dir, encoders, generator, out, *extra) -> list[str]:
    args = ["--cfg", str(ROOT / "cfg" / "eval_clip_shapes.yml"), "--gpu", "-1"]
    for item in overrides(data_dir, encoders, generator, out, *extra):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def evaluated(data_dir, encoders, generator, tmp_path_factory):
    """generate_test_set with an independent scorer and the default (shipped) judge."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "cfg" / "eval_clip_shapes.yml",
                      overrides(data_dir, encoders, generator, out,
                                f"EVAL.INDEPENDENT_ENCODER={encoders['other']}"), quiet=True)
    torch.set_num_threads(1)
    result = generate_test_set(cfg, CPU, progress=False)
    data = TextImageDataset(cfg, "test", CaptionTokenizer(int(cfg.TEXT.WORDS_NUM)),
                            image_sizes(cfg), train=False, use_cache=False)
    items = caption_items(data.num_captions)
    pngs = [out / "valid" / "single" / f"{data.keys[i]}_s{k}.png" for i, k in items.tolist()]
    return cfg, result, out, data, items, pngs


def read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1


# ----------------------------------------------------------------- the independent scorer
def test_independent_scorer_equals_its_own_codes_scored_directly(evaluated, encoders):
    cfg, result, out, data, items, pngs = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    other = metrics["independent"]
    assert other["encoder"] == str(encoders["other"])
    assert other["checkpoint"] == str(encoders["other"])
    encoder = ClipEncoder.from_checkpoint(encoders["other"]).eval()
    with torch.no_grad():
        codes = encoder.encode_image(torch.stack([read_png(p) for p in pngs]))[1]
        n, c, length = data.tokens.shape
        sent = encoder.encode_text(data.tokens.reshape(n * c, length))[1].reshape(n, c, -1)
    ref = score_generated(codes, items, sent, data.class_ids, data.num_captions,
                          seed=int(cfg.SEED))
    assert other["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-9)
    assert other["r_precision_std"] == pytest.approx(ref["r_precision_std"], abs=1e-9)
    assert other["folds"] == pytest.approx(ref["folds"], abs=1e-9)
    assert other["clip_score"] == pytest.approx(ref["clip_score"], abs=1e-3)
    # really another encoder than TRAIN.NET_E's
    assert abs(other["clip_score"] - metrics["clip_score"]) > 0.1


def test_r_precision_cli_scores_the_tree_the_same_way(evaluated, encoders, data_dir, generator,
                                                      capsys):
    _, result, out, *_ = evaluated
    args = cli_args(data_dir, encoders, generator, out)
    capsys.readouterr()
    assert r_precision_cli.main([*args, "--independent", str(encoders["other"]), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("r_precision", "r_precision_std", "clip_score"):
        assert again["independent"][key] == pytest.approx(result["independent"][key], abs=1e-4)
    for key in ("judge", "judge_real", "judge_chance"):
        assert again[key] == pytest.approx(result[key])
    # printed: the independent scorer and the judge, one line each per row
    assert r_precision_cli.main([*args, "--independent", str(encoders["other"]),
                                 "--set", "EVAL.JUDGE=none"]) == 0
    text = capsys.readouterr().out
    other = result["independent"]
    assert (f"independent scorer {encoders['other']}: R-precision "
            f"{100 * other['r_precision']:.2f} ± {100 * other['r_precision_std']:.2f} %, "
            f"CLIP score {other['clip_score']:.2f}") in text
    assert "shapes judge" not in text  # EVAL.JUDGE=none turns it off


def test_json_architecture_and_off_switch():
    cfg = load_config(ROOT / "cfg" / "eval_clip_shapes.yml", quiet=True)
    assert load_independent_encoder(cfg, CPU) is None  # default ''
    assert load_independent_encoder(cfg, CPU, "none") is None
    first, info = load_independent_encoder(cfg, CPU, "tiny")
    second, _ = load_independent_encoder(cfg, CPU, "tiny")
    assert info == {"encoder": "tiny"} and first.adapter is None
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 second.state_dict().values(), strict=True))
    assert not first.training and not any(p.requires_grad for p in first.parameters())


def test_independent_load_failures_are_one_error_line(encoders, data_dir, generator, tmp_path,
                                                      capsys):
    args = [*cli_args(data_dir, encoders, generator, tmp_path, "EVAL.JUDGE=none"),
            "--path", str(tmp_path)]
    missing = tmp_path / "nope.pth"
    assert r_precision_cli.main([*args, "--independent", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: EVAL.INDEPENDENT_ENCODER='{missing}' (the independent scorer")
    assert "not found" in err and err.count("error:") == 1 and "Traceback" not in err
    assert r_precision_cli.main([*args, "--independent", "ViT-Q/99"]) == 2
    assert "unknown CLIP model 'ViT-Q/99'" in capsys.readouterr().err
    cfg = load_config(ROOT / "cfg" / "eval_clip_shapes.yml", quiet=True)
    empty = tmp_path / "Model"
    empty.mkdir()
    with pytest.raises(EncoderLoadError, match=r"INDEPENDENT_ENCODER='.*Model' .*no stage-1 "
                                               r"encoder \(clip\*\.pth\) in that directory"):
        load_independent_encoder(cfg, CPU, str(empty))


# ------------------------------------------------------------------------- the judge
def test_judge_entries_equal_the_judge_run_by_hand(evaluated):
    _, result, _, data, items, pngs = evaluated
    judge, info = J.load_judge(J.SHIPPED)
    assert info["format"] == J.JUDGE_FORMAT and min(info["fresh_accuracy"].values()) > 0.9
    truth = torch.tensor([J.caption_truth(c[0]) for c in data.info.captions])
    pred = J.predict(judge, torch.stack([J.to_tensor(Image.open(p)) for p in pngs]))
    ref = J.score(pred, truth[items[:, 0]], items[:, 1].tolist())
    got = result["judge"]
    assert got["images"] == len(pngs) == 120 and got["weights"] == str(J.SHIPPED)
    for a in J.ATTRIBUTES:
        assert got[a] == pytest.approx(ref[a])
    assert got["mean"] == pytest.approx(np.mean([ref[a] for a in J.ATTRIBUTES]))
    real_pred = J.predict(judge, torch.stack([J.to_tensor(Image.open(p))
                                              for p in data.info.image_paths]))
    real = J.score(real_pred, truth, [0] * len(truth))
    assert result["judge_real"] == pytest.approx(
        {**{a: real[a] for a in J.ATTRIBUTES}, "images": 12,
         "mean": np.mean([real[a] for a in J.ATTRIBUTES])})
    assert result["judge_chance"] == pytest.approx(
        {"shape": 1 / 6, "colour": 1 / 6, "size": 1 / 3, "pos": 1 / 5, "bg": 1 / 5,
         "mean": (1 / 6 + 1 / 6 + 1 / 3 + 1 / 5 + 1 / 5) / 5})
    # the shipped judge reads the real pictures (drawn at 32 px here, at 64 px in training)
    assert min(real[a] for a in J.ATTRIBUTES) >= 0.9
    # the Fréchet distance of the saved images' judge features to the real pictures'
    features = [J.split_reading(J.read_pictures(judge, torch.stack(
        [J.to_tensor(Image.open(p)) for p in paths])))[1]
        for paths in (pngs, data.info.image_paths)]
    assert result["judge_fd"] == pytest.approx(J.frechet_entry(*features))
    assert result["judge_fd"]["generated"] > 0 and result["judge_fd"]["real_images"] == 12


def test_missing_or_corrupt_judge_ends_before_drawing(data_dir, encoders, generator, tmp_path,
                                                      capsys, monkeypatch):
    out = tmp_path / "run"
    missing = tmp_path / "judge.pt"
    args = cli_args(data_dir, encoders, generator, out, f"EVAL.JUDGE={missing}")
    assert main_cli.main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: judge not found: {missing}; rebuild it with: python "
                   f"bench/shapes_judge.py --train --judge {missing}, or set EVAL.JUDGE: none\n")
    assert not (out / "valid").exists()
    missing.write_bytes(b"PK\x03\x04 truncated")
    assert main_cli.main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: judge {missing} cannot be read") and err.count("\n") == 1
    # the shipped file gone: the message names it and the documented rebuild command
    monkeypatch.setattr(J, "SHIPPED", tmp_path / "assets" / "shapes_judge.pt")
    cfg = load_config(ROOT / "cfg" / "eval_clip_shapes.yml",
                      overrides(data_dir, encoders, generator, out), quiet=True)
    with pytest.raises(J.JudgeError, match=r"judge not found: .*assets/shapes_judge.pt; rebuild "
                                           r"it with: python bench/shapes_judge.py --train$"):
        generate_test_set(cfg, CPU, progress=False)


def test_judge_needs_shapes_captions(tmp_path):
    info = SplitInfo(keys=["a"], class_ids=[1], captions=[["a small bird with red wings"]],
                     image_paths=[tmp_path / "a.jpg"], boxes=[None])
    with pytest.raises(DataError, match="needs a shapes set.*EVAL.JUDGE: none"):
        J.EvalJudge(J.Judge(), tmp_path / "j.pt", info)
    cfg = load_config(ROOT / "cfg" / "eval_clip_bird.yml", quiet=True)
    assert J.judge_path(cfg) is None  # birds: no judge unless EVAL.JUDGE names one
    cfg.EVAL.JUDGE = "mine.pt"
    assert J.judge_path(cfg) == Path("mine.pt")
    cfg = load_config(ROOT / "cfg" / "eval_clip_shapes.yml", ["EVAL.JUDGE=none"], quiet=True)
    assert J.judge_path(cfg) is None
