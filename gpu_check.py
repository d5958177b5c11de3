"""Check a CUDA machine: every trainer, evaluation and sampling on the GPU, in a few minutes.

    python gpu_check.py [--gpu 0] [--log gpu_check.log] [--workdir DIR] [--bench-steps 20]
    make gpu-check                                   # the same, inside the project's venv

What anyone runs first on a new GPU machine (and what a GPU runner's CI would run). On a tiny
shapes set it runs the real command lines, each as a user would type it:

- stage 1, stage 2, the VQGAN and CLIP-GEN for a few steps with TRAIN.AMP and
  TRAIN.CHANNELS_LAST on (bf16 autocast where the GPU has it);
- each of them again under `torchrun --nproc_per_node 1`: DistributedDataParallel on a real
  nccl process group;
- each resumed from that AMP run with fp16 autocast + GradScaler forced
  (TRAIN.AMP_DTYPE=float16): the fp16 path on a bf16 GPU, and a resume across AMP modes;
- stage-2 evaluation (test split + R-precision), CLIP-GEN sampling of the test split, and
  bench/bench_gpu.py for a few steps.

One line per check (ok / FAIL, seconds), a summary line, exit 0 when all pass, 1 when one
fails, 2 without a CUDA GPU. Every command's full output goes to the log (--log).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
EXIT_NO_GPU = 2

# tiny but real: the shapes configs at 32 px, a few steps each (64 train / 16 test images)
DATA = ["--n-train", "64", "--n-test", "16", "--size", "32"]
COMMON = ["GPU_ID=0", "WORKERS=2", "TRAIN.AMP=True", "TRAIN.CHANNELS_LAST=True",
          "TRAIN.SNAPSHOT_INTERVAL=1", "TRAIN.BATCH_SIZE=16", "TRAIN.MAX_EPOCH=1"]
STAGE1 = ["TREE.BASE_SIZE=32"]
STAGE2 = ["TREE.BASE_SIZE=16", "GAN.GF_DIM=16", "GAN.DF_DIM=16"]
VQ = ["TREE.BASE_SIZE=32", "VQGAN.DISC_WEIGHT=0.8", "VQGAN.DISC_START=2",
      "VQGAN.PERCEPTUAL_WEIGHT=0.0", "VQGAN.VAL_IMAGES=16"]
GPT = ["TREE.BASE_SIZE=32", "CLIPGEN.N_LAYER=2", "CLIPGEN.N_EMBD=64", "CLIPGEN.N_HEAD=2",
       "CLIPGEN.VIEWS=2", "CLIPGEN.WARMUP_STEPS=2", "CLIPGEN.RECON_WEIGHT=0.2",
       "CLIPGEN.CANDIDATES=2", "EVAL.NUM_IMAGES=32"]
FP16_RESUME = ["TRAIN.AMP_DTYPE=float16", "TRAIN.MAX_EPOCH=2"]


@dataclass
class Check:
    """One command line to run and what its success leaves behind."""

    name: str
    argv: list[str]
    expect: list[str] = field(default_factory=list)  # substrings of stdout
    files: list[str] = field(default_factory=list)  # glob patterns under the work dir
    torchrun: bool = False


def _python(script: str, cfg: str | None, sets: list[str], *extra: str) -> list[str]:
    argv = [script, *extra]
    if cfg:
        argv += ["--cfg", cfg]
    for item in sets:
        argv += ["--set", item]
    return argv


def checks(work: Path, bench_steps: int) -> list[Check]:
    """Every check in the order they depend on one another (stage 1 feeds the rest)."""
    data = f"DATA_DIR={work / 'data'}"

    def out(name: str) -> str:
        return f"OUTPUT_DIR={work / name}"

    enc = f"TRAIN.NET_E={work / 's1' / 'Model'}"
    vq = f"CLIPGEN.VQGAN={work / 'vq' / 'Model'}"
    s1 = [*COMMON, *STAGE1, data]
    s2 = [*COMMON, *STAGE2, data, enc]
    vqs = [*COMMON, *VQ, data]
    gpt = [*COMMON, *GPT, data, enc, vq]
    quiet = "--no-progress"

    def trainer(label: str, script: str, cfg: str, sets: list[str], run: str, model: str,
                first: str = "") -> list[Check]:
        """AMP + channels-last in `run`; resumed there with fp16 + GradScaler forced; DDP on
        nccl in `run`_ddp. `model` names the epoch checkpoint with {e} for the epoch."""
        ddp = f"{run}_ddp"
        return [
            Check(f"{label}: {first or 'AMP + channels-last'}",
                  _python(script, cfg, [*sets, out(run)], quiet), ["done: epoch 1"],
                  [f"{run}/Model/{model.format(e=1)}"]),
            Check(f"{label}: fp16 + GradScaler, resumed",
                  _python(script, cfg, [*sets, out(run), *FP16_RESUME], quiet),
                  ["resuming from", "done: epoch 2"], [f"{run}/Model/{model.format(e=2)}"]),
            Check(f"{label}: DDP on nccl", _python(script, cfg, [*sets, out(ddp)], quiet),
                  ["nccl", "done: epoch 1"], [f"{ddp}/Model/{model.format(e=1)}"],
                  torchrun=True),
        ]

    stage1 = trainer("stage 1", "pretrain_DAMSM.py", "cfg/DAMSM/shapes.yml", s1, "s1",
                     "clip{e}.pth")
    stage2 = trainer("stage 2", "main.py", "cfg/clip_shapes_DMGAN.yml", s2, "s2",
                     "netG_epoch_{e}.pth")
    vqgan = trainer("VQGAN", "train_vqgan.py", "cfg/VQGAN/shapes.yml", vqs, "vq",
                    "vqgan{e}.pth")
    clipgen = trainer("CLIP-GEN", "train_clipgen.py", "cfg/clipgen_shapes.yml", gpt, "gpt",
                      "gpt_epoch_{e}.pth", "AMP, token cache, sampling the test split")
    clipgen[0].files.append("gpt/metrics.json")
    return [
        Check("data: shapes set", ["prepare_data.py", "shapes", "--out", str(work / "data"),
                                   *DATA], files=["data/train/filenames.pickle"]),
        *stage1, *stage2,
        Check("stage 2: evaluation (test split, R-precision)",
              _python("main.py", "cfg/eval_clip_shapes.yml",
                      ["GPU_ID=0", "TRAIN.AMP=True", *STAGE2, data, enc, out("s2"),
                       f"TRAIN.NET_G={work / 's2' / 'Model'}"], quiet),
              [], ["s2/metrics.json", "s2/valid/single/**/*.png"]),
        *vqgan, *clipgen,
        Check("CLIP-GEN: image-conditioned evaluation",
              _python("train_clipgen.py", "cfg/clipgen_shapes.yml",
                      [*gpt, out("gpt"), "CLIPGEN.CONDITION=image"], quiet, "--eval"),
              [], ["gpt/metrics*.json"]),
        Check("bench/bench_gpu.py (birds config, ViT-B/32-sized encoder)",
              ["bench/bench_gpu.py", "--gpu", "0", "--steps", str(bench_steps), "--batch", "4",
               "--vq-batch", "2", "--sampler-batch", "4"],
              ["| AMP + channels_last |"]),
    ]


def command(check: Check) -> list[str]:
    """The process to start: python, or torchrun with one process (a real process group)."""
    if check.torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "1", *check.argv]
    return [sys.executable, *check.argv]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), deepest first; [] where /proc is missing."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))

    def below(p: int) -> list[int]:
        return [q for child in parents.get(p, []) for q in (*below(child), child)]

    return below(pid)


def run_check(check: Check, work: Path, env: dict[str, str], log: Callable[[str], None],
              timeout: float) -> tuple[bool, float, str]:
    """(passed, seconds, why not) for one check; its whole output goes to the log."""
    cmd = command(check)
    log(f"\n===== {check.name}\n$ {' '.join(cmd)}\n")
    start = time.perf_counter()
    # its own process group, so that a hang is stopped with every process it started; SIGABRT
    # first makes Python's faulthandler write each hung process's stacks into the log
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:  # torchrun's workers first
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        log(f"{stdout}\n--- stderr (stacks at the time-out) ---\n{stderr}")
        return False, time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    log(stdout + "\n--- stderr ---\n" + stderr)
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if proc.returncode != 0:
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["?"]
        return False, seconds, f"exit {proc.returncode}: {last[0][:200]}"
    missing = [s for s in check.expect if s not in proc.stdout + proc.stderr]
    if missing:
        return False, seconds, f"output lacks {missing[0]!r}"
    absent = [p for p in check.files if not any(work.glob(p))]
    if absent:
        return False, seconds, f"no file {absent[0]}"
    return True, seconds, ""


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, refuse without CUDA, run every check, print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0, help="the GPU to check (-1: none)")
    parser.add_argument("--log", type=Path, default=Path("gpu_check.log"),
                        help="every command's full output (default: ./gpu_check.log)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the runs here (default: a temporary folder, removed)")
    parser.add_argument("--bench-steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per check")
    parser.add_argument("-k", dest="only", default="",
                        help="run only the checks whose name contains this (and 'data')")
    args = parser.parse_args(argv)

    import torch

    if args.gpu < 0 or not torch.cuda.is_available() or args.gpu >= torch.cuda.device_count():
        print(f"gpu_check: needs a CUDA GPU (--gpu {args.gpu}; torch {torch.__version__} sees "
              f"{torch.cuda.device_count()} CUDA device(s))")
        return EXIT_NO_GPU
    name = torch.cuda.get_device_name(args.gpu)
    # every command sees the chosen GPU as cuda:0, as torchrun's LOCAL_RANK 0 does
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(args.gpu), "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check on {name} (torch {torch.__version__}, CUDA {torch.version.cuda}); "
          f"full output in {args.log}")
    todo = [c for c in checks(work, args.bench_steps)
            if not args.only or args.only in c.name or c.name.startswith("data")]
    failed: list[str] = []
    start = time.perf_counter()
    with args.log.open("w") as log_file:
        def log(text: str) -> None:
            log_file.write(text)
            log_file.flush()

        for check in todo:
            ok, seconds, why = run_check(check, work, env, log, args.timeout)
            print(f"{'ok  ' if ok else 'FAIL'} {seconds:6.1f} s  {check.name}"
                  + ("" if ok else f"  ({why})"), flush=True)
            if not ok:
                failed.append(check.name)
    total = time.perf_counter() - start
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: {len(todo) - len(failed)}/{len(todo)} ok on {name} in {total:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
