"""gpu_check.py without a GPU, TRAIN.AMP_DTYPE, and `torchrun --nproc_per_node 1` running the
real DistributedDataParallel path (a one-process group)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gpu_check
import miscc.training as training
from miscc.config import ConfigError, load_config
from miscc.training import mixed_precision
from miscc.utils import cleanup_distributed, in_process_group, init_distributed

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_says_so_in_one_line_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, "gpu_check.py", "--gpu", "-1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == gpu_check.EXIT_NO_GPU == 2, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: needs a CUDA GPU"), proc.stdout


def test_checks_cover_every_trainer_under_amp_fp16_resume_and_ddp(tmp_path) -> None:
    names = [c.name for c in gpu_check.checks(tmp_path, 5)]
    for trainer in ("stage 1", "stage 2", "VQGAN", "CLIP-GEN"):
        kinds = [n for n in names if n.startswith(trainer)]
        assert any("AMP" in n for n in kinds), trainer
        assert any("fp16 + GradScaler, resumed" in n for n in kinds), trainer
        assert any("DDP on nccl" in n for n in kinds), trainer
    ddp = [c for c in gpu_check.checks(tmp_path, 5) if c.torchrun]
    assert len(ddp) == 4 and all("nccl" in c.expect for c in ddp)
    cmd = gpu_check.command(ddp[0])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    # the fp16 resume runs in the AMP run's folder (so it resumes) with float16 forced
    s1 = [c for c in gpu_check.checks(tmp_path, 5) if c.name.startswith("stage 1")]
    assert "TRAIN.AMP_DTYPE=float16" in s1[1].argv and "resuming from" in s1[1].expect
    assert f"OUTPUT_DIR={tmp_path / 's1'}" in s1[0].argv and \
        f"OUTPUT_DIR={tmp_path / 's1'}" in s1[1].argv


@pytest.mark.parametrize(("choice", "dtype"), [("float16", torch.float16),
                                               ("bfloat16", torch.bfloat16)])
def test_amp_dtype_forces_the_autocast_type(shapes_cfg, choice, dtype, monkeypatch) -> None:
    amp, got, _ = mixed_precision(shapes_cfg(f"TRAIN.AMP_DTYPE={choice}"), torch.device("cuda"))
    assert amp and got == dtype
    # not on the CPU, whatever the key says, unless TRAIN.AMP_CPU asks: then always bf16
    amp, _, scaler = mixed_precision(shapes_cfg(f"TRAIN.AMP_DTYPE={choice}"), torch.device("cpu"))
    assert not amp and not scaler.is_enabled()
    cpu_amp = shapes_cfg(f"TRAIN.AMP_DTYPE={choice}", "TRAIN.AMP_CPU=True")
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    amp, got, scaler = mixed_precision(cpu_amp, torch.device("cpu"))
    assert amp and got == torch.bfloat16 and not scaler.is_enabled()
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)  # emulated bf16: fp32
    with pytest.warns(UserWarning, match="TRAIN.AMP_CPU: this CPU has no bf16 instructions"):
        amp, _, _ = mixed_precision(cpu_amp, torch.device("cpu"))
    assert not amp
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    amp, _, _ = mixed_precision(shapes_cfg("TRAIN.AMP=False", "TRAIN.AMP_CPU=True"),
                                torch.device("cpu"))
    assert not amp


def test_amp_dtype_rejects_other_values(shapes_dir) -> None:
    with pytest.raises(ConfigError, match="TRAIN.AMP_DTYPE must be one of auto, bfloat16, float16"):
        load_config(ROOT / "cfg" / "DAMSM" / "shapes.yml", ["TRAIN.AMP_DTYPE=half"], quiet=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_with_one_process_starts_a_group_and_trainers_use_ddp(
        shapes_cfg, tmp_path, monkeypatch) -> None:
    """What `torchrun --nproc_per_node 1` sets up: a one-process group (gloo on the CPU) and the
    stage-1 model wrapped in DistributedDataParallel."""
    from miscc.damsm import DAMSMTrainer

    for key, value in {"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    try:
        rank, world, device = init_distributed(-1)
        assert (rank, world, device.type) == (0, 1, "cpu")
        assert in_process_group() and dist.get_backend() == "gloo"
        cfg = shapes_cfg(f"OUTPUT_DIR={tmp_path}", "WORKERS=0", "TRAIN.BATCH_SIZE=4",
                         "TREE.BASE_SIZE=32")
        trainer = DAMSMTrainer(cfg, device, rank, world, progress=False)
        assert isinstance(trainer.model, DistributedDataParallel)
    finally:
        cleanup_distributed()
    assert not in_process_group()


def test_plain_python_starts_no_group(monkeypatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(-1) == (0, 1, torch.device("cpu"))
    assert not in_process_group()
