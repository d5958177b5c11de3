"""Config loading: strict keys with suggestions, types, legacy keys, overrides, CLI flags."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from miscc.config import ConfigError, build_parser, config_from_args, load_config
from model import resolve_clip_name

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str):
    path = tmp_path / "c.yml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "TRAIN:\n  BATCHSIZE: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key TRAIN\.BATCHSIZE") as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "unknown key TRAIN.BATCHSIZE" in msg
    assert "did you mean TRAIN.BATCH_SIZE?" in msg


def test_unknown_section_suggests_by_leaf(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean TREE.BRANCH_NUM\?"):
        load_config(write(tmp_path, "GAN:\n  BRANCH_NUM: 2\n"))


def test_wrong_type_says_expected_and_given(tmp_path):
    with pytest.raises(ConfigError, match=r"TRAIN\.BATCH_SIZE expects int") as err:
        load_config(write(tmp_path, "TRAIN:\n  BATCH_SIZE: eight\n"))
    msg = str(err.value)
    assert "TRAIN.BATCH_SIZE expects int" in msg and "got str 'eight'" in msg


def test_int_for_float_and_yaml_exponent_string_are_fine(tmp_path):
    cfg = load_config(write(tmp_path, "TRAIN:\n  GENERATOR_LR: 1\n  ENCODER_LR: 1e-4\n"))
    assert cfg.TRAIN.GENERATOR_LR == 1.0 and isinstance(cfg.TRAIN.GENERATOR_LR, float)
    assert cfg.TRAIN.ENCODER_LR == pytest.approx(1e-4)


def test_choice_keys_name_the_allowed_values(tmp_path):
    path = write(tmp_path, "TRAIN:\n  SMOOTH:\n    SIMILARITY: cosin\n")
    with pytest.raises(ConfigError, match=r"c.yml: TRAIN.SMOOTH.SIMILARITY must be one of "
                                          r"dot, cosine, got 'cosin'"):
        load_config(path)
    assert load_config(overrides=["TRAIN.SMOOTH.SIMILARITY=dot"]).TRAIN.SMOOTH.SIMILARITY == "dot"


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match="TREE.BRANCH_NUM expects int"):
        load_config(write(tmp_path, "TREE:\n  BRANCH_NUM: true\n"))


LEGACY = """\
CONFIG_NAME: legacy
DATASET_NAME: birds
TRAIN:
  DEVICE: 'cuda:1'
  CLIP_MODEL_BASE: openai/clip-vit-base-patch32
  CLIP_MODEL_CHECKPOINT: output/clip5.pth
  BACKBONE_LR: 0.00002
  LINEAR_LR: 0.003
  BASE_LR: 0.0001
  GAMMA: 0.9
  STEP_SIZE_UP: 100
  TRAIN_CLIP_MODEL: false
GAN:
  B_ATTENTION: true
  B_DCGAN: false
"""


def test_legacy_keys_map_to_new_keys_and_warn(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(write(tmp_path, LEGACY))
    assert cfg.GPU_ID == 1
    assert cfg.CLIP.MODEL == "openai/clip-vit-base-patch32" and cfg.CLIP.PRETRAINED == "openai"
    assert cfg.TRAIN.NET_E == "output/clip5.pth"
    assert cfg.TRAIN.ENCODER_LR == pytest.approx(2e-5)
    assert cfg.TRAIN.ADAPTER_LR == pytest.approx(3e-3)
    text = "\n".join(str(w.message) for w in caught)
    for key in ("TRAIN.BASE_LR", "TRAIN.GAMMA", "TRAIN.STEP_SIZE_UP", "TRAIN.TRAIN_CLIP_MODEL",
                "GAN.B_ATTENTION", "GAN.B_DCGAN"):
        assert f"legacy key {key} is ignored" in text
    spec = resolve_clip_name(cfg.CLIP.MODEL, cfg.CLIP.PRETRAINED)
    assert (spec["model"], spec["pretrained"]) == ("ViT-B-32", "openai")


def test_legacy_device_cpu_and_bad_value(tmp_path):
    assert load_config(write(tmp_path, "TRAIN:\n  DEVICE: cpu\n"), quiet=True).GPU_ID == -1
    with pytest.raises(ConfigError, match="TRAIN.DEVICE"):
        load_config(write(tmp_path, "TRAIN:\n  DEVICE: tpu\n"), quiet=True)


def test_clip_name_styles():
    assert resolve_clip_name("ViT-B/32", "openai")["model"] == "ViT-B-32"
    assert resolve_clip_name("ViT-B-16", "laion2b_s34b_b88k")["pretrained"] == "laion2b_s34b_b88k"
    assert resolve_clip_name("openai/clip-vit-large-patch14-336", "")["model"] == "ViT-L-14-336"
    assert resolve_clip_name("tiny", "")["arch"]["embed_dim"] == 64


def test_set_overrides_are_typed_like_the_default():
    cfg = load_config(None, ["TRAIN.BATCH_SIZE=16", "CONFIG_NAME=123", "TRAIN.AMP=false",
                             "TRAIN.GENERATOR_LR=3e-4"])
    assert cfg.TRAIN.BATCH_SIZE == 16
    assert cfg.CONFIG_NAME == "123"
    assert cfg.TRAIN.AMP is False
    assert cfg.TRAIN.GENERATOR_LR == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="--set TRAIN.BATCH_SIZ: unknown key"):
        load_config(None, ["TRAIN.BATCH_SIZ=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["TRAIN.BATCH_SIZE"])


def test_default_output_dir_and_flags():
    parser = build_parser("t")
    args = parser.parse_args(["--cfg", str(ROOT / "cfg/DAMSM/shapes.yml"), "--gpu", "-1",
                              "--data_dir", "/d", "--manualSeed", "7", "--set", "WORKERS=0"])
    cfg = config_from_args(args)
    assert (cfg.GPU_ID, cfg.DATA_DIR, cfg.SEED, cfg.WORKERS) == (-1, "/d", 7, 0)
    assert cfg.OUTPUT_DIR == "output/shapes_DAMSM"


def test_config_error_exits_2_with_one_line(tmp_path, capsys):
    args = build_parser("t").parse_args(["--cfg", str(write(tmp_path, "TRAIN:\n  LR: 1\n"))])
    with pytest.raises(SystemExit, match=r"^2$") as stop:
        config_from_args(args)
    assert stop.value.code == 2
    assert "config error:" in capsys.readouterr().err


def test_print_config_for_legacy_file_through_the_cli(tmp_path):
    path = write(tmp_path, LEGACY)
    run = subprocess.run([sys.executable, "prepare_data.py", "check", "--cfg", str(path),
                          "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    merged = yaml.safe_load(run.stdout)
    assert merged["GPU_ID"] == 1
    assert merged["TRAIN"]["NET_E"] == "output/clip5.pth"
    assert merged["CLIP"]["MODEL"] == "openai/clip-vit-base-patch32"
    assert "BASE_LR" not in merged["TRAIN"]


def test_gpu_without_cuda_is_a_user_error(monkeypatch, capsys):
    from miscc.utils import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"^2$") as exc:
        select_device(0)
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: --gpu 0 was requested but CUDA is not")
    assert select_device(-1) == torch.device("cpu")
