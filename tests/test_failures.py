"""A failure ends the command (docs/DESIGN.md §10, docs/training-at-scale.md "Exit codes"): no
process is left behind, the exit code says why, and a config that cannot work with its data
stops before any data-loader worker starts.

The commands run as subprocesses through tests/failing_command.py, which injects the failure.
Every process they start inherits a marker in its environment, so after the command has ended
the process table (/proc/*/environ) shows whether any of them is still alive.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import GAN_TINY
from test_clipgen_train import GPT_TINY
from test_vqgan import VQ_TINY

from datasets import DataError, make_shapes_dataset
from miscc import utils as U

ROOT = Path(__file__).resolve().parents[1]
BOUND = 60  # seconds a failing command may take to end (start-up included)
STAGE1 = ["GPU_ID=-1", "CPU_THREADS=1", "TREE.BASE_SIZE=32", "TEXT.WORDS_NUM=16",
          "TRAIN.BATCH_SIZE=4", "TRAIN.MAX_EPOCH=1"]

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                                reason="reads the process table in /proc")


def marked_processes(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (this test's commands and their children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours
                continue
    return found


def run_failing(mode: str, script: str, *args: str, torchrun: bool = False
                ) -> tuple[int, str, float]:
    """(exit code, stderr + stdout, seconds) of `script args` with the failure `mode`; fails
    the test when it does not end within BOUND or leaves a process behind."""
    marker = f"T2I_FAILURE_TEST={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1], "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2"] if torchrun else [sys.executable])
    start = time.monotonic()
    proc = subprocess.Popen([*launcher, "tests/failing_command.py", mode, script, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        for pid in marked_processes(marker):
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{script} did not end within {BOUND} s of a failure:\n{out[-2000:]}")
    seconds = time.monotonic() - start
    time.sleep(0.5)  # a process killed a moment ago may still be listed
    left = marked_processes(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} process(es) of {script} outlived it:\n{out[-2000:]}"
    return proc.returncode, out, seconds


def sets(*overrides: str) -> list[str]:
    return [f"--set={s}" for s in overrides]


@pytest.fixture(scope="module")
def data(shapes_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("failures") / "shapes"
    shutil.copytree(shapes_dir, out)
    return out


@pytest.mark.parametrize("workers, persistent", [(1, True), (2, False)])
def test_a_worker_that_raises_ends_stage_1(data, tmp_path, workers, persistent) -> None:
    code, out, _ = run_failing(
        "worker", "pretrain_DAMSM.py", "--cfg", "cfg/DAMSM/shapes.yml", "--no-progress",
        *sets(*STAGE1, f"DATA_DIR={data}", f"OUTPUT_DIR={tmp_path}", f"WORKERS={workers}",
              f"TRAIN.PERSISTENT_WORKERS={persistent}"))
    assert code == U.EXIT_BUG
    assert "RuntimeError: injected failure reading item" in out  # the traceback is printed


def test_a_worker_that_raises_ends_stage_2_and_names_the_resume_state(
        data, tiny_encoder_ckpt, tmp_path) -> None:
    """The worker fails in the second epoch: the traceback is followed by where the resume
    state of the first epoch is."""
    code, out, _ = run_failing(
        "worker:20", "main.py", "--cfg", "cfg/clip_shapes_DMGAN.yml", "--no-progress",
        *sets(*GAN_TINY, f"DATA_DIR={data}", f"OUTPUT_DIR={tmp_path}", "WORKERS=2",
              "TRAIN.PERSISTENT_WORKERS=True", f"TRAIN.NET_E={tiny_encoder_ckpt}",
              "TRAIN.TEXT_CACHE=False"))
    assert code == U.EXIT_BUG
    traceback, last = out.strip().rsplit("\n", 1)
    assert "RuntimeError: injected failure reading item" in traceback
    assert last.startswith(f"resume state: {tmp_path / 'Model' / 'state_step_6.pth'}")


def test_a_worker_that_raises_ends_the_tokenizer_and_clipgen(
        data, tiny_encoder_ckpt, tmp_path) -> None:
    code, out, _ = run_failing(
        "worker", "train_vqgan.py", "--cfg", "cfg/VQGAN/shapes.yml", "--no-progress",
        *sets(*VQ_TINY, f"DATA_DIR={data}", f"OUTPUT_DIR={tmp_path / 'vq'}", "WORKERS=1"))
    assert code == U.EXIT_BUG and "RuntimeError: injected failure" in out
    # CLIP-GEN's token cache reads the pictures through workers
    import torch
    from test_vqgan import vq_cfg

    from clipgen.vqgan import VQModel
    from miscc.utils import atomic_torch_save

    torch.manual_seed(0)
    vq = tmp_path / "vq" / "Model" / "vqgan1.pth"
    atomic_torch_save(VQModel.from_config(vq_cfg(data, tmp_path / "vq")).checkpoint_state(), vq)
    code, out, _ = run_failing(
        "worker", "train_clipgen.py", "--cfg", "cfg/clipgen_shapes.yml", "--no-progress",
        *sets(*GPT_TINY, f"DATA_DIR={data}", f"OUTPUT_DIR={tmp_path / 'gen'}", "WORKERS=1",
              f"CLIPGEN.VQGAN={vq}", f"TRAIN.NET_E={tiny_encoder_ckpt}"))
    assert code == U.EXIT_BUG and "RuntimeError: injected failure" in out


def test_a_rank_that_raises_ends_the_whole_torchrun_job(data, tiny_encoder_ckpt,
                                                       tmp_path) -> None:
    """Two gloo processes; process 1 raises at step 2: the job ends long before
    DIST_TIMEOUT_MINUTES, non-zero, with that error in torchrun's summary and one line from
    process 0."""
    code, out, seconds = run_failing(
        "rank:1:2", "main.py", "--cfg", "cfg/clip_shapes_DMGAN.yml", "--no-progress",
        "--gpu", "-1",
        *sets(*GAN_TINY, f"DATA_DIR={data}", f"OUTPUT_DIR={tmp_path}", "WORKERS=1",
              f"TRAIN.NET_E={tiny_encoder_ckpt}", "TRAIN.TEXT_CACHE=False",
              "TRAIN.AMP_CPU=False"), torchrun=True)
    assert code != 0 and seconds < BOUND
    assert "injected failure in process 1 at step 2" in out
    assert "error: process 0 stops: another process of this job failed" in out
    # the failing process's error reached torchrun's summary ("Root Cause")
    cause = out.index("Root Cause")
    assert out.rindex("injected failure in process 1") > cause


# ------------------------------------------------------------------- run_command itself
def _sleeping_child() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a data-loader worker does
    time.sleep(600)


def test_run_command_ends_children_that_ignore_sigterm_on_every_path(capsys) -> None:
    import multiprocessing

    def body(fail: Exception | None):
        def run():
            multiprocessing.get_context("fork").Process(target=_sleeping_child,
                                                        daemon=True).start()
            if fail:
                raise fail
        return run

    for fail, expected in [(None, 0), (ValueError("a bug"), U.EXIT_BUG),
                           (DataError("bad data"), U.EXIT_USER_ERROR)]:
        assert U.run_command(body(fail), (DataError,)) == expected
        assert multiprocessing.active_children() == []
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: a bug" in err
    assert "error: bad data" in err and err.count("Traceback") == 1


def test_a_stop_signal_outside_training_ends_the_command_with_128_plus_its_number(
        capsys) -> None:
    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert U.run_command(body, ()) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_an_unexpected_exception_prints_its_traceback_then_the_resume_state(
        tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(U, "_RESUME_FOLDERS", [])
    model = tmp_path / "Model"
    model.mkdir()
    (model / "state_step_6.pth").write_bytes(b"x")
    (model / "state_step_12.pth").write_bytes(b"x")
    U.note_resume_folder(model)

    def body():
        raise KeyError("background")

    assert U.run_command(body, ()) == U.EXIT_BUG
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and "KeyError: 'background'" in err[-2]
    assert err[-1].startswith(f"resume state: {model / 'state_step_12.pth'}")


# ------------------------------------------------------------- start-up checks of the data
@pytest.fixture(scope="module")
def not_rendered(tmp_path_factory) -> Path:
    """A CUB-layout set the shapes renderer did not caption: its captions name a colour and a
    size, but no shape, position or background."""
    out = tmp_path_factory.mktemp("cub_like")
    make_shapes_dataset(out, n_train=12, n_test=8, size=32, seed=1)
    for f in (out / "text").rglob("*.txt"):
        f.write_text("".join(f"a small bird with a red crown, picture {i}\n" for i in range(10)))
    return out


def test_negative_pictures_on_data_the_renderer_did_not_make_stop_at_start(
        not_rendered, tmp_path) -> None:
    """The command of the report ends in one line naming the key and the folder, exit 2, and
    trains with the key off."""
    import pretrain_DAMSM

    base = ["--cfg", "cfg/DAMSM/shapes.yml", "--data_dir", str(not_rendered), "--no-progress",
            *sets(*STAGE1, "WORKERS=1", f"OUTPUT_DIR={tmp_path}", "TRAIN.MAX_STEPS=1")]
    start = time.monotonic()
    code, out, _ = run_failing("none", "pretrain_DAMSM.py", *base)
    assert code == U.EXIT_USER_ERROR and time.monotonic() - start < 30
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "TRAIN.NEGATIVE_PICTURES" in error[0]
    assert str(not_rendered) in error[0] and "Traceback" not in out
    assert pretrain_DAMSM.main([*base, "--set=TRAIN.NEGATIVE_PICTURES=0"]) == 0


def test_word_lists_whose_words_never_occur_stop_at_start(not_rendered, tmp_path,
                                                          shapes_cfg) -> None:
    from datasets import CaptionTokenizer, TextImageDataset
    from miscc.minimal_pairs import load_word_lists

    data = tmp_path / "plain"
    shutil.copytree(not_rendered, data)
    for f in (data / "text").rglob("*.txt"):
        f.write_text("".join(f"photo number {i}\n" for i in range(10)))
    cfg = shapes_cfg(data_dir=data)
    with pytest.raises(DataError, match=rf"TEXT.WORD_LISTS shapes: none of its words occurs "
                                        rf"in the captions of {data}"):
        TextImageDataset(cfg, "train", CaptionTokenizer(16), [32], views=2,
                         word_lists=load_word_lists("shapes"))
