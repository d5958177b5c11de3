"""Long runs survive preemption and full disks (docs/training-at-scale.md): a stop
signal finishes the step, saves a resume state and exits 75, and the re-run ends with the
weights of an uninterrupted run (stage 1, stage 2 and the VQGAN, in one process and under a
2-process torchrun); timed and epoch-end resume states; a full disk or a read-only place at
each kind of write is one `error:` line that damages nothing."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GAN_TINY, ROOT, assert_same_tensors, flat_tensors

from miscc.config import ConfigError, load_config
from miscc.damsm import DAMSMTrainer
from miscc.training import StopRequest
from miscc.utils import DiskError, atomic_write_bytes, load_checkpoint
from trainer import GANTrainer

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
STAGE1_TINY = ["GPU_ID=-1", "WORKERS=0", "TREE.BASE_SIZE=32", "TEXT.WORDS_NUM=16",
               "TRAIN.BATCH_SIZE=4", "TRAIN.MAX_EPOCH=3", "TRAIN.SNAPSHOT_INTERVAL=2"]


def stage2_cfg(data_dir: Path, encoder: Path, out: Path, *overrides: str):
    return load_config(ROOT / "cfg" / "clip_shapes_DMGAN.yml",
                       [f"DATA_DIR={data_dir}", f"OUTPUT_DIR={out}", f"TRAIN.NET_E={encoder}",
                        *GAN_TINY, *overrides], quiet=True)


def stage1_cfg(data_dir: Path, out: Path, *overrides: str):
    return load_config(ROOT / "cfg" / "DAMSM" / "shapes.yml",
                       [f"DATA_DIR={data_dir}", f"OUTPUT_DIR={out}", *STAGE1_TINY, *overrides],
                       quiet=True)


def state_tensors(path: Path) -> dict:
    """Every tensor of a resume state except the RNG and config (weights, EMA, moments)."""
    state = load_checkpoint(path)
    return flat_tensors({k: v for k, v in state.items() if k not in ("rng", "config")})


def signal_before_step(trainer, step: int, sig: signal.Signals, times: int = 1) -> None:
    """Make `trainer` receive `sig` (`times` times) while it runs step number `step`."""
    real = trainer.train_step

    def wrapped(batch):
        if trainer.step == step - 1:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return real(batch)

    trainer.train_step = wrapped


# ------------------------------------------------------------------------- one process
@pytest.fixture(scope="module")
def straight_stage2(data_dir, tiny_encoder_ckpt, tmp_path_factory) -> Path:
    """18 uninterrupted steps (3 epochs of 6) of the tiny stage 2: its last resume state."""
    out = tmp_path_factory.mktemp("straight2")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (results depend on the thread count)
    try:
        GANTrainer(stage2_cfg(data_dir, tiny_encoder_ckpt, out), CPU, progress=False).train()
    finally:
        torch.set_num_threads(before)
    return out / "Model" / "state_step_18.pth"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stage2_signal_at_a_random_step_then_rerun_equals_uninterrupted(
        seed, data_dir, tiny_encoder_ckpt, straight_stage2, tmp_path) -> None:
    step = random.Random(seed).randint(1, 17)
    sig = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)[seed]
    trainer = GANTrainer(stage2_cfg(data_dir, tiny_encoder_ckpt, tmp_path), CPU, progress=False)
    signal_before_step(trainer, step, sig, times=2)  # the second one changes nothing
    summary = trainer.train()
    assert summary["interrupted"] == sig.name and trainer.step == step
    assert (tmp_path / "Model" / f"state_step_{step}.pth").is_file()
    assert signal.getsignal(sig) is signal.SIG_IGN  # later signals cannot cut the exit short
    signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    resumed = GANTrainer(stage2_cfg(data_dir, tiny_encoder_ckpt, tmp_path), CPU, progress=False)
    assert resumed.step == step
    assert resumed.train()["interrupted"] is None
    assert_same_tensors(state_tensors(tmp_path / "Model" / "state_step_18.pth"),
                        state_tensors(straight_stage2))


def test_stage1_and_vqgan_signal_then_rerun_equals_uninterrupted(data_dir, shapes_dir,
                                                                 tmp_path) -> None:
    from test_vqgan import ADVERSARIAL, vq_cfg

    from clipgen.vq_trainer import VQGANTrainer

    runs = [(DAMSMTrainer, lambda out: stage1_cfg(data_dir, out), 9, 18),
            (VQGANTrainer, lambda out: vq_cfg(shapes_dir, out, *ADVERSARIAL), 5, 12)]
    for cls, make, step, last in runs:
        torch.manual_seed(0)
        cls(make(tmp_path / cls.__name__ / "straight"), CPU, progress=False).train()
        torch.manual_seed(0)
        trainer = cls(make(tmp_path / cls.__name__ / "cut"), CPU, progress=False)
        signal_before_step(trainer, step, signal.SIGUSR1)
        assert trainer.train()["interrupted"] == "SIGUSR1"
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        torch.manual_seed(0)
        cls(make(tmp_path / cls.__name__ / "cut"), CPU, progress=False).train()
        assert_same_tensors(
            state_tensors(tmp_path / cls.__name__ / "cut" / "Model" / f"state_step_{last}.pth"),
            state_tensors(tmp_path / cls.__name__ / "straight" / "Model" /
                          f"state_step_{last}.pth"))


def test_cli_exit_code_and_message(data_dir, tiny_encoder_ckpt, tmp_path, monkeypatch,
                                   capsys) -> None:
    import main as cli

    real = GANTrainer.train_step

    def signalled(self, batch):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch)

    monkeypatch.setattr(GANTrainer, "train_step", signalled)
    args = ["--cfg", str(ROOT / "cfg" / "clip_shapes_DMGAN.yml"), "--no-progress",
            *[f"--set={s}" for s in (*GAN_TINY, f"DATA_DIR={data_dir}",
                                     f"OUTPUT_DIR={tmp_path}", f"TRAIN.NET_E={tiny_encoder_ckpt}")]]
    try:
        assert cli.main(args) == 75
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 3: resume state saved in" in err
    assert "run the same command again to continue" in err


def test_unknown_stop_signal_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="TRAIN.STOP_SIGNALS: 'SIGNOPE'"):
        StopRequest("SIGTERM,SIGNOPE")
    assert [s.name for s in StopRequest("TERM, usr1").signals] == ["SIGTERM", "SIGUSR1"]
    assert StopRequest("").signals == []


def test_timed_and_epoch_end_resume_states(data_dir, tiny_encoder_ckpt, tmp_path,
                                           monkeypatch) -> None:
    """STATE_MINUTES: a state whenever that much time has passed (the newest two kept);
    epoch ends that are not snapshots get a state too, snapshots keep their interval."""
    import miscc.training as training

    clock = iter(range(0, 10_000, 25))  # every reading of the clock is 25 s later
    monkeypatch.setattr(training, "_clock", lambda: next(clock))
    out = tmp_path / "timed"
    GANTrainer(stage2_cfg(data_dir, tiny_encoder_ckpt, out, "TRAIN.STATE_MINUTES=1",
                          "TRAIN.SNAPSHOT_INTERVAL=5", "TRAIN.MAX_STEPS=5"),
               CPU, progress=False).train()
    states = sorted(p.name for p in (out / "Model").glob("state_step_*.pth"))
    # readings: construction 0, start 25, then one per step (50, 75, 100: 75 s after the
    # start, a state at step 3, the clock read again, 125), step 4 (150: 25 s), and the
    # stop at step 5 (MAX_STEPS) writes its state; the newest two stay
    assert states == ["state_step_3.pth", "state_step_5.pth"]
    assert load_checkpoint(out / "Model" / "state_step_3.pth")["in_epoch"] == 3

    monkeypatch.undo()
    out = tmp_path / "epochs"
    GANTrainer(stage2_cfg(data_dir, tiny_encoder_ckpt, out, "TRAIN.STATE_MINUTES=0",
                          "TRAIN.SNAPSHOT_INTERVAL=3", "TRAIN.MAX_EPOCH=3"),
               CPU, progress=False).train()
    model = out / "Model"
    assert [p.name for p in model.glob("netG_*.pth")] == ["netG_epoch_3.pth"]  # the snapshot
    # epoch 2's end (step 12) is no snapshot but has its resume state (epoch 1's, the oldest,
    # was deleted)
    assert sorted(p.name for p in model.glob("state_step_*.pth")) == [
        "state_step_12.pth", "state_step_18.pth"]


# ------------------------------------------------------------------------------- disks
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_atomic_write_failure_is_one_message_and_damages_nothing(code, tmp_path,
                                                                 monkeypatch) -> None:
    path = tmp_path / "ckpt.pth"
    atomic_write_bytes(path, b"good")

    def failing(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("miscc.utils.os.replace", failing)
    with pytest.raises(DiskError) as info:
        atomic_write_bytes(path, b"x" * 1000)
    msg = str(info.value)
    assert msg.startswith(f"cannot write {path}: {os.strerror(code)} (1,000 bytes to write, ")
    assert msg.endswith("bytes free there)") and "\n" not in msg
    assert path.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_image_tree_and_cache_writes_report_full_disks(data_dir, tmp_path, monkeypatch) -> None:
    from PIL import Image

    from datasets import build_image_cache
    from miscc.pictures import save_png_file

    monkeypatch.setattr(Image.Image, "save", enospc)
    with pytest.raises(DiskError, match=r"cannot write .*a/b\.png: No space left on device "
                                        r"\(48 bytes to write"):
        save_png_file(np.zeros((4, 4, 3), np.uint8), tmp_path / "a" / "b.png")
    assert not (tmp_path / "a" / "b.png").exists()
    monkeypatch.undo()

    cfg = load_config(None, [f"DATA_DIR={data_dir}", "DATASET_NAME=shapes",
                             f"CACHE_DIR={tmp_path / 'cache'}"], quiet=True)
    monkeypatch.setattr("datasets.NpyWriter.write", enospc)
    with pytest.raises(DiskError, match=r"train_16px\.npy: No space left on device "
                                        r"\(18,432 bytes to write"):
        build_image_cache(cfg, "train", 16, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # the partial temp file is gone


def test_fid_statistics_cache_on_a_read_only_place_is_skipped_with_a_note(tmp_path,
                                                                           monkeypatch) -> None:
    import miscc.statistics as st

    logs: list[str] = []

    class Images(torch.utils.data.Dataset):
        keys = ("a", "b", "c")

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.full((3, 8, 8), 40 * i, dtype=torch.uint8)

    class Fake:
        dims, weights_id = 4, "w"

    feats = type("F", (), {"pool": np.random.default_rng(0).normal(size=(3, 4)),
                           "skipped": []})
    monkeypatch.setattr(st, "extract", lambda *a, **k: feats)

    def read_only(path, stats):
        raise DiskError(f"cannot write {path}: Read-only file system (1 bytes to write, 0 "
                        "bytes free there)")

    monkeypatch.setattr(st, "save_stats", read_only)
    stats, cached = st.cached_real_stats(Images(), tmp_path / "s.npz", Fake(), log=logs.append)
    assert not cached and stats.n == 3
    assert any("not cached (cannot write" in line and "CACHE_DIR" in line for line in logs)


def test_training_on_a_full_disk_stops_cleanly_and_resumes(data_dir, tiny_encoder_ckpt,
                                                           tmp_path, monkeypatch) -> None:
    """The resume state at step 12 cannot be written: one `error:` line, exit 2, the state of
    step 6 intact, no temp file; with space again the re-run resumes from step 6."""
    import main as cli
    import miscc.utils as utils

    real_replace = os.replace

    def full_at_12(src, dst):
        if Path(dst).name == "state_step_12.pth":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", full_at_12)
    args = ["--cfg", str(ROOT / "cfg" / "clip_shapes_DMGAN.yml"), "--no-progress",
            *[f"--set={s}" for s in (*GAN_TINY, f"DATA_DIR={data_dir}", f"OUTPUT_DIR={tmp_path}",
                                     f"TRAIN.NET_E={tiny_encoder_ckpt}")]]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(args)
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1
    assert f"cannot write {tmp_path / 'Model' / 'state_step_12.pth'}: No space left" in lines[0]
    model = tmp_path / "Model"
    assert not [p for p in model.iterdir() if p.name.startswith(".")]  # no temp files
    assert load_checkpoint(model / "state_step_6.pth")["step"] == 6
    monkeypatch.undo()
    resumed = GANTrainer(stage2_cfg(data_dir, tiny_encoder_ckpt, tmp_path), CPU,
                         progress=False)
    assert resumed.step == 6
    resumed.train()
    assert load_checkpoint(model / "state_step_18.pth")["step"] == 18


# ----------------------------------------------------------------------- two processes
def _torchrun(script: str, cfg: str, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", script, "--cfg", str(ROOT / cfg), "--no-progress",
            *[f"--set={s}" for s in sets]]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_torchrun_sigterm_stops_both_ranks_at_one_step_and_resumes_exactly(
        data_dir, tiny_encoder_ckpt, tmp_path) -> None:
    """SIGTERM to torchrun (which passes it to both workers) while stage 2 trains: both ranks
    stop after the same step, rank 0 saves it, and the re-run ends with the weights of an
    uninterrupted 2-process run. (The stop agreement is `EpochTrainer.checked`, which every
    trainer shares; stage 1 and the VQGAN are signalled in one process above, and their
    2-process runs are checked against one process in test_ddp_sync / test_vqgan. Three
    torchrun launches cost ~40 s, so one trainer is run here.)"""
    script, cfg = "main.py", "cfg/clip_shapes_DMGAN.yml"
    sets = [*GAN_TINY, "TRAIN.BATCH_SIZE=2", f"DATA_DIR={data_dir}",
            f"TRAIN.NET_E={tiny_encoder_ckpt}"]
    last = 36  # 24 images / 2 ranks / batch 2 = 6 steps an epoch, 6 epochs
    long = [*sets, "TRAIN.MAX_EPOCH=300", f"TRAIN.MAX_STEPS={last}"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_torchrun(script, cfg, [*long, f"OUTPUT_DIR={cut}"]), cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (cut / "Model" / "state_step_6.pth").is_file():  # epoch 1 is done
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stopped = [ln for ln in err.splitlines() if "stopped by SIGTERM after step" in ln]
    assert len(stopped) == 1, err[-3000:]  # rank 0 reports it
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert 0 < step < last, "the run ended before the signal"
    state = load_checkpoint(cut / "Model" / f"state_step_{step}.pth")
    assert state["step"] == step
    again = subprocess.run(_torchrun(script, cfg, [*long, f"OUTPUT_DIR={cut}"]), cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    straight = tmp_path / "straight"
    ref = subprocess.run(_torchrun(script, cfg, [*long, f"OUTPUT_DIR={straight}"]), cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert_same_tensors(state_tensors(cut / "Model" / f"state_step_{last}.pth"),
                        state_tensors(straight / "Model" / f"state_step_{last}.pth"))


def test_data_preparation_and_report_on_a_full_disk_are_one_line(tmp_path, monkeypatch,
                                                                 capsys) -> None:
    from PIL import Image

    import prepare_data
    import report

    monkeypatch.setattr(Image.Image, "save", enospc)
    assert prepare_data.main(["shapes", "--out", str(tmp_path / "shapes")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {tmp_path / 'shapes'}: No space left on device")
    assert err.count("\n") == 1 and not (tmp_path / "shapes" / "shapes.json").exists()
    monkeypatch.undo()

    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", enospc)
    for stage in ("s1", "s2"):
        logs = tmp_path / stage / "logs"
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(logs)) as writer:
            writer.add_scalar("train/loss", 1.0, 1)
    code = report.main(["--stage1", str(tmp_path / "s1"), "--stage2", str(tmp_path / "s2"),
                        "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot write ") and "No space left" in err


def test_caption_cache_on_a_full_disk_leaves_no_temp_files(tmp_path, monkeypatch) -> None:
    from model import ClipEncoder, resolve_clip_name
    from text_features import encode_all_captions

    torch.manual_seed(0)
    encoder = ClipEncoder(resolve_clip_name("tiny", ""), adapter=False).eval()
    tokens = torch.zeros(4, 2, 8, dtype=torch.long)
    tokens[..., 0], tokens[..., 1:4], tokens[..., 4] = 49406, 7, 49407
    monkeypatch.setattr("miscc.utils.NpyWriter.write", enospc)
    with pytest.raises(DiskError, match=r"words\.npy: No space left on device \("):
        encode_all_captions(encoder, tokens, CPU, tmp_path / "text", progress=False)
    assert list((tmp_path / "text").iterdir()) == []
