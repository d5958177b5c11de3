"""Pieces both training stages share: exact-resume data order, mixed precision, checkpoint
lookup and resume states, the finite-loss check, `--fresh`, and the epoch/step loop
(`EpochTrainer`, the base of stage 1's DAMSMTrainer and stage 2's GANTrainer)."""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from datasets import DataError, check_batch_size
from miscc.config import ConfigError, save_config
from miscc.utils import (  # NonFiniteLoss is defined there for run_command; importable here
    CheckpointError,
    NonFiniteLoss,
    all_reduce_mean,
    atomic_torch_save,
    barrier,
    disk_writes,
    init_distributed,
    is_main_process,
    latest_checkpoint,
    load_latest_valid,
    note_resume_folder,
    seed_everything,
    set_rng_state,
)
from model import EncoderLoadError

# what main.py, pretrain_DAMSM.py and r_precision.py report as `error:` + exit code 2
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError,
                                            EncoderLoadError)
STATE_PATTERN = "state_step_*.pth"  # resume states in <OUTPUT_DIR>/Model
KEEP_STATES = 2  # resume states kept on disk (the weights-only checkpoints are all kept)


def start_process(cfg) -> tuple[int, int, torch.device]:
    """A training command's start: torch.distributed under torchrun, the device (GPU_ID),
    CPU_THREADS on the CPU, every RNG seeded from SEED; returns (rank, world size, device)."""
    rank, world, device = init_distributed(int(cfg.GPU_ID), float(cfg.DIST_TIMEOUT_MINUTES))
    if device.type == "cpu" and int(cfg.CPU_THREADS) > 0:
        torch.set_num_threads(int(cfg.CPU_THREADS))
    seed_everything(int(cfg.SEED))
    return rank, world, device


def resolve_checkpoint(path: str, pattern: str, what: str, key: str) -> Path:
    """A checkpoint file, or the newest file matching `pattern` when `path` is a directory."""
    if not path:
        raise CheckpointError(f"{key} is empty: set it to the {what} ({pattern})")
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p, pattern)
        if not found:
            raise CheckpointError(f"{key}={path}: no {what} ({pattern}) in that directory")
        return found[0]
    if not p.is_file():
        raise CheckpointError(f"{key}: {what} not found: {path}")
    return p


# ------------------------------------------------------------------------------------ data
class EpochSampler(Sampler):
    """This rank's share of a per-epoch permutation, yielding (epoch, index) pairs.

    Skipping the batches already trained in the current epoch is a slice, and each item's
    random crop is seeded by (seed, epoch, index) in `SeededItems`: a resumed run sees exactly
    the batches an uninterrupted run would, whatever the worker count.
    """

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.per_rank = (n // world) // batch * batch
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches * self.batch

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[self.rank:: self.world][: self.per_rank]
        return iter([(self.epoch, int(i)) for i in order[self.skip:]])


class SeededItems(Dataset):
    """Wraps a dataset so that item (epoch, i) draws its augmentation from its own seed."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a CUDA/XPU/MTIA
            # re-seed (with a recorded stack trace) on every item
            seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
            torch.default_generator.manual_seed(seed)
            return self.base[index]


def ignore_signals(names: str, worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: ignore the stop signals (a cluster signals every
    process of the job; the main process decides when to stop and then ends its workers)."""
    for sig in parse_signals(names):
        signal.signal(sig, signal.SIG_IGN)


def loader_options(cfg, device: torch.device) -> dict[str, Any]:
    """DataLoader workers (which ignore TRAIN.STOP_SIGNALS), pinned memory (CUDA only) and
    persistent workers from the config."""
    workers = int(cfg.WORKERS)
    options: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": bool(cfg.TRAIN.PIN_MEMORY) and device.type == "cuda",
        "persistent_workers": bool(cfg.TRAIN.PERSISTENT_WORKERS) and workers > 0}
    if workers > 0:
        options["worker_init_fn"] = functools.partial(ignore_signals,
                                                      str(cfg.TRAIN.STOP_SIGNALS))
    return options


def seeded_train_loader(dataset: Dataset, batch: int, cfg, device: torch.device, rank: int = 0,
                        world: int = 1) -> tuple[EpochSampler, DataLoader]:
    """(sampler, loader) of the train split for exact resume (`EpochSampler` + `SeededItems`,
    last partial batch dropped); a DataError when one batch per process does not fit."""
    check_batch_size(dataset, batch, "train")
    if len(dataset) // world < batch:
        raise DataError(f"TRAIN.BATCH_SIZE={batch} per process is larger than the "
                        f"train split's share of each of the {world} processes "
                        f"({len(dataset) // world} images); lower TRAIN.BATCH_SIZE")
    sampler = EpochSampler(len(dataset), batch, int(cfg.SEED), rank, world)
    loader = DataLoader(SeededItems(dataset, int(cfg.SEED)), batch, sampler=sampler,
                        drop_last=True, **loader_options(cfg, device))
    return sampler, loader


def seed_step(seed: int, rank: int, step: int, device: torch.device) -> None:
    """Seed torch's global CPU generator and this process's CUDA one from (seed, rank, step)
    before each training step: dropout masks differ between ranks (one seed on every rank
    would drop the same units everywhere) and need no RNG state carried over a resume.
    Model initialisation, data order and the trainers' noise use their own seeds."""
    mixed = int(np.random.SeedSequence([seed, rank, step, 0x5EED]).generate_state(1)[0])
    torch.default_generator.manual_seed(mixed)
    if device.type == "cuda":
        torch.cuda.manual_seed(mixed)


# ---------------------------------------------------------------------- precision, losses
def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU with native bf16 (Ampere on), else fp16. Emulated bf16 (V100, T4) does
    not count: it is slow, and fp16 with a GradScaler is what those GPUs run fast."""
    native = (device.type == "cuda"
              and torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.bfloat16 if native else torch.float16


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), where CPU autocast
    pays; elsewhere torch emulates it, slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def mixed_precision(cfg, device: torch.device) -> tuple[bool, torch.dtype, torch.amp.GradScaler]:
    """(autocast on?, its dtype, grad scaler). On CUDA with TRAIN.AMP: TRAIN.AMP_DTYPE auto is
    bf16 where the GPU supports it natively (no loss scaling needed), else fp16 with an enabled
    GradScaler; bfloat16 / float16 force one. On the CPU only with TRAIN.AMP_CPU as well, only
    where the CPU has bf16 instructions (`cpu_has_bf16`), and always bf16 (no scaler)."""
    if device.type == "cuda":
        amp = bool(cfg.TRAIN.AMP)
        choice = str(cfg.TRAIN.AMP_DTYPE)
        dtype = amp_dtype(device) if choice == "auto" else getattr(torch, choice)
    else:
        amp = bool(cfg.TRAIN.AMP) and bool(cfg.TRAIN.AMP_CPU) and device.type == "cpu"
        if amp and not cpu_has_bf16():
            warnings.warn("TRAIN.AMP_CPU: this CPU has no bf16 instructions (AVX512-BF16 or "
                          "AMX) and emulated bf16 is slower than fp32: training in fp32",
                          stacklevel=2)
            amp = False
        dtype = torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16)
    return amp, dtype, scaler


def load_scaler_state(scaler: torch.amp.GradScaler, state: Mapping[str, Any]) -> None:
    """Resume a GradScaler. A state saved by a disabled scaler (bf16, CPU or TRAIN.AMP off) is
    empty: an enabled one (fp16, e.g. on another GPU type) then starts from its initial
    scale instead of failing; a disabled one ignores whatever it is given."""
    if scaler.is_enabled() and not state:
        return
    scaler.load_state_dict(dict(state))


def inference_precision(cfg, device: torch.device) -> contextlib.AbstractContextManager:
    """The precision of sampling, evaluation and cache building: with TRAIN.AMP on CUDA,
    TF32 for the matmuls and convolutions left in fp32 and autocast to the training's dtype
    (`amp_dtype`); a no-op on CPU or with TRAIN.AMP off (then everything is fp32)."""
    if not (bool(cfg.TRAIN.AMP) and device.type == "cuda"):
        return contextlib.nullcontext()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls (cuDNN convolutions: default)
    torch.backends.cudnn.allow_tf32 = True
    return autocast(True, amp_dtype(device))


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of convolution weights and image batches (TRAIN.CHANNELS_LAST)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def fused_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for torch's Adam/AdamW: the fused kernel on CPU and CUDA (one pass
    over all tensors per step instead of a chain of per-tensor ops; stage 1 updates CLIP's
    whole token-embedding table every step, which the unfused AdamW took 6x longer to do)."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def autocast(amp: bool, dtype: torch.dtype,
             device_type: str = "cuda") -> contextlib.AbstractContextManager:
    """Autocast of `device_type` to `dtype` when `amp`, else a no-op context."""
    return torch.autocast(device_type, dtype=dtype) if amp else contextlib.nullcontext()


def finite_stats(values: Mapping[str, torch.Tensor], step: int,
                 model_dir: Path) -> dict[str, float]:
    """The step's losses as floats, averaged over processes, in one device-to-host copy.

    A NaN/inf on any process survives the all-reduce, so every process raises NonFiniteLoss
    (naming step + 1, the step that failed) together; nothing is saved after a bad step, so
    the last good checkpoint in `model_dir` is what remains."""
    flat = all_reduce_mean(torch.stack([v.detach().float() for v in values.values()]))
    stats = dict(zip(values, flat.cpu().tolist(), strict=True))
    if not all(math.isfinite(v) for v in stats.values()):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in stats.items())
        raise NonFiniteLoss(f"non-finite loss at step {step + 1} ({shown}); stopping. "
                            f"The last good checkpoint in {model_dir} is kept; try a "
                            "lower learning rate or TRAIN.AMP False")
    return stats


def damsm_class_ids(cfg, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor | None:
    """The batch's class ids for the DAMSM losses' same-class masking, or None when
    TRAIN.CLASS_MASK is off (then every other caption in the batch is a negative)."""
    return batch["class_id"].to(device) if cfg.TRAIN.CLASS_MASK else None


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def check_replicas(nets: Iterable[nn.Module], world: int) -> None:
    """Under torchrun, fail loudly if the processes' weights have drifted apart (a collective:
    every rank calls it)."""
    barrier()
    if world <= 1:
        return
    total = torch.stack([p.detach().double().sum() for n in nets for p in n.parameters()])
    gathered = [torch.zeros_like(total) for _ in range(world)]
    torch.distributed.all_gather(gathered, total)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError("distributed replicas hold different weights after training")


# ------------------------------------------------------------------- run folders, states
def remove_old_run(model_dir: Path, patterns: Iterable[str], folders: Iterable[Path]) -> int:
    """`--fresh`: delete the checkpoints matching `patterns` in `model_dir` and the `folders`;
    returns (and prints, when any) the number of checkpoints removed."""
    removed = [p for pat in patterns for p in model_dir.glob(pat)]
    for p in removed:
        p.unlink()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    if removed:
        print(f"--fresh: removed {len(removed)} checkpoint(s) from {model_dir}")
    return len(removed)


def load_resume_state(model_dir: Path, fmt: str, what: str) -> tuple[Path, dict] | None:
    """The newest readable resume state in `model_dir` (unreadable ones are skipped with a
    warning), or None; a CheckpointError when it is not of format `fmt` (`what` names it)."""
    found = load_latest_valid(latest_checkpoint(model_dir, STATE_PATTERN), "training state")
    if found is not None and found[1].get("format") != fmt:
        held = found[1].get("format")
        if isinstance(held, str) and held.split("/")[0] == fmt.split("/")[0]:
            raise CheckpointError(f"{found[0]} is a {what} of an earlier version of this "
                                  f"repository ({held}; this version reads {fmt}); start over "
                                  "with --fresh")
        raise CheckpointError(f"{found[0]} is not a {what}")
    return found


def save_resume_state(model_dir: Path, state: dict, step: int) -> Path:
    """Write state_step_<step>.pth atomically and delete all but the newest KEEP_STATES."""
    path = model_dir / f"state_step_{step}.pth"
    atomic_torch_save(state, path)
    for old in latest_checkpoint(model_dir, STATE_PATTERN)[KEEP_STATES:]:
        old.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------- preemption
def _clock() -> float:
    """Seconds on a monotonic clock (the TRAIN.STATE_MINUTES timer; tests replace it)."""
    return time.monotonic()


def parse_signals(names: str) -> list[signal.Signals]:
    """TRAIN.STOP_SIGNALS ("SIGTERM,SIGINT,SIGUSR1"; "" = none) as signal numbers."""
    out = []
    for name in (n.strip().upper() for n in str(names).split(",") if n.strip()):
        full = name if name.startswith("SIG") else f"SIG{name}"
        if not hasattr(signal, full) or full in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(f"TRAIN.STOP_SIGNALS: {name!r} is not a signal this run can "
                              "catch (e.g. SIGTERM,SIGINT,SIGUSR1)")
        out.append(signal.Signals(getattr(signal, full)))
    return out


class StopRequest:
    """While active, the signals of TRAIN.STOP_SIGNALS only set `received` (the first one's
    name): the loop then finishes the step, writes a resume state and returns. A second signal
    changes nothing, up to the process's exit (writes are atomic either way). Handlers can
    only be installed from the main thread; elsewhere (threads in tests) it stays empty."""

    def __init__(self, names: str) -> None:
        self.signals = parse_signals(names)
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            print(f"\n{name}: finishing this step, then saving a resume state", file=sys.stderr)
        else:
            print(f"{name}: already stopping (the resume state is being written)",
                  file=sys.stderr)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # once signalled, ignore the rest up to the exit (SIG_IGN outlives the
            # interpreter's shutdown, which resets Python-level handlers to the default)
            signal.signal(sig, handler if self.received is None else signal.SIG_IGN)
        self._previous.clear()


# ------------------------------------------------------------------------------ the loop
class EpochTrainer:
    """Base of both stages' trainers: output folders, mixed precision, `--fresh`, resume
    counters and the epoch/step loop of `train()`.

    A subclass builds its data (`self.sampler`, `self.loader`: `seeded_train_loader`) and
    models, defines `train_step(batch) -> stats` (whose losses go through `self.checked`),
    `_state() -> dict` (the resume state) and fills the `_on_start` / `_after_*` hooks.

    Preemption (docs/DESIGN.md §10): a stop signal makes the loop finish the step, write a
    resume state and return with `interrupted` set; a resume state is also written every
    TRAIN.STATE_MINUTES and at every epoch end that is not a snapshot.
    """

    FRESH_PATTERNS: tuple[str, ...] = ()  # checkpoints in Model/ that `--fresh` deletes
    FRESH_FOLDERS: tuple[str, ...] = ("logs",)  # folders under OUTPUT_DIR it deletes

    sampler: EpochSampler
    loader: DataLoader

    def __init__(self, cfg, device: torch.device, rank: int = 0, world: int = 1,
                 fresh: bool = False, progress: bool = True) -> None:
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.out = Path(cfg.OUTPUT_DIR)
        self.model_dir, self.image_dir = self.out / "Model", self.out / "Image"
        self.main = is_main_process()
        self.progress = progress and self.main
        self.cuda = device.type == "cuda"
        self.amp, self.amp_dtype, self.scaler = mixed_precision(cfg, device)
        self.batch = int(cfg.TRAIN.BATCH_SIZE)
        self.epoch, self.in_epoch, self.step = 0, 0, 0
        self.writer: Any = None  # TensorBoard SummaryWriter while train() runs (rank 0)
        self.stop = StopRequest(str(cfg.TRAIN.STOP_SIGNALS))
        self.stopping = False  # every process saw a stop request (agreed in `checked`)
        self._state_time = _clock()
        if fresh and self.main:
            remove_old_run(self.model_dir, self.FRESH_PATTERNS,
                           [self.out / f for f in self.FRESH_FOLDERS])
        note_resume_folder(self.model_dir)
        barrier()

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of this process."""
        return self.sampler.per_rank // self.batch

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.amp, self.amp_dtype, self.device.type)

    def log_scalars(self, stats: Mapping[str, float], prefix: str, force: bool = False) -> None:
        """TensorBoard scalars `<prefix>/<name>` of this step, every 10th step (or `force`)."""
        if self.writer is not None and (force or self.step % 10 == 0):
            for k, v in stats.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, self.step)

    def checked(self, values: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """`finite_stats` of the step's losses; the same all-reduce carries this process's
        stop request, so every process learns in the same step whether any was signalled."""
        flag = torch.tensor(float(self.stop.received is not None), device=self.device)
        stats = finite_stats({**values, "_stop": flag}, self.step, self.model_dir)
        self.stopping = stats.pop("_stop") > 0
        return stats

    def _state(self) -> dict:
        """The full resume state (models, optimizers, RNG, counters, config)."""
        raise NotImplementedError

    def write_state(self) -> Path | None:
        """Write the resume state `state_step_<step>.pth` (rank 0; the newest KEEP_STATES are
        kept) and restart the TRAIN.STATE_MINUTES clock."""
        self._state_time = _clock()
        if not self.main:
            return None
        return save_resume_state(self.model_dir, self._state(), self.step)

    def _state_due(self) -> bool:
        minutes = float(self.cfg.TRAIN.STATE_MINUTES)
        return minutes > 0 and _clock() - self._state_time >= minutes * 60

    def _restore_progress(self, path: Path, state: dict) -> None:
        """Last part of a resume: every RNG, the epoch/step counters, a note on rank 0."""
        set_rng_state(state["rng"])
        self.epoch, self.in_epoch, self.step = state["epoch"], state["in_epoch"], state["step"]
        if self.main:
            print(f"resuming from {path} (epoch {self.epoch}, step {self.step})")

    # ----------------------------------------------------------------- subclass hooks
    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimisation step on `batch`; returns its (process-averaged) losses."""
        raise NotImplementedError

    def _on_start(self) -> None:
        """Rank 0, before the first step of a train() that has work to do."""

    def _after_step(self, stats: dict[str, float], bar: tqdm) -> None:
        """After each step (counters already advanced): logging, the progress bar."""

    def _after_epoch(self, stats: dict[str, float], snapshot: bool) -> None:
        """After a completed epoch; `snapshot`: a checkpoint is due (interval or the end)."""

    def _after_stop(self, stats: dict[str, float]) -> None:
        """TRAIN.MAX_STEPS stopped the run inside an epoch."""

    def _after_training(self) -> None:
        """Once the loop has ended and the writer is closed (on every rank)."""
        barrier()

    # ----------------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Run until TRAIN.MAX_EPOCH (or TRAIN.MAX_STEPS); returns a short summary."""
        cfg = self.cfg
        max_epoch, max_steps = int(cfg.TRAIN.MAX_EPOCH), int(cfg.TRAIN.MAX_STEPS)
        interval = max(1, int(cfg.TRAIN.SNAPSHOT_INTERVAL))
        done = self.epoch >= max_epoch or (max_steps > 0 and self.step >= max_steps)
        if self.main:
            save_config(cfg, self.out)
            if done:
                print(f"training already complete (epoch {self.epoch}, step {self.step}); "
                      "use --fresh to start over")
            else:
                from torch.utils.tensorboard import SummaryWriter

                with disk_writes(self.out / "logs"):
                    self.writer = SummaryWriter(str(self.out / "logs"),
                                                purge_step=self.step)
                self._on_start()
        last: dict[str, float] = {}
        interrupted = None
        self._state_time = _clock()
        try:
            with self.stop:
                while not done:
                    self.sampler.set_epoch(self.epoch, self.in_epoch)
                    bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}/{max_epoch}",
                               total=len(self.loader), disable=not self.progress, leave=False)
                    for batch in bar:
                        seed_step(int(cfg.SEED), self.rank, self.step, self.device)
                        last = self.train_step(batch)
                        self.step += 1
                        self.in_epoch += 1
                        self._after_step(last, bar)
                        if self.stopping or (max_steps > 0 and self.step >= max_steps):
                            done = True
                            break
                        if self._state_due():
                            self.write_state()
                    if self.stopping:  # the epoch's end (if this was its last step) comes
                        interrupted = self.stop.received or "a signal to another process"
                        self.write_state()  # after the resume, like every other step
                        break
                    if self.in_epoch >= self.steps_per_epoch:
                        self.epoch, self.in_epoch = self.epoch + 1, 0
                        done = done or self.epoch >= max_epoch
                        snapshot = self.epoch % interval == 0 or done
                        self._after_epoch(last, snapshot)
                        if not snapshot:  # a resume state at every epoch end
                            self.write_state()
                    elif done:
                        self._after_stop(last)
        finally:
            if self.writer is not None:
                self.writer.close()
        if interrupted:
            barrier()
            if self.main:
                print(f"stopped by {interrupted} after step {self.step}: resume state saved in "
                      f"{self.model_dir}; run the same command again to continue",
                      file=sys.stderr)
            return {"epoch": self.epoch, "step": self.step, "losses": last,
                    "interrupted": interrupted}
        self._after_training()
        return {"epoch": self.epoch, "step": self.step, "losses": last, "interrupted": None}
