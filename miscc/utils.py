"""Shared helpers: atomic checkpoint I/O, device selection, seeding/RNG state, distributed setup,
command-line exit codes.

Pictures (image grids, attention maps, loss curves) live in `miscc/pictures.py`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

EXIT_BUG = 1  # an unexpected exception: its traceback is printed (please report it)
EXIT_USER_ERROR = 2  # a user-fixable input problem: config, data, checkpoint, weights
EXIT_NON_FINITE = 3  # training stopped on a NaN/inf loss
EXIT_INTERRUPTED = 75  # a stop signal: the resume state is saved, re-run the command (EX_TEMPFAIL)
# outside a training loop a stop signal ends the command at once: 128 + the signal's number
# (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1), the shell's code for a process a signal ended
STOP_SIGNALS_OUTSIDE_TRAINING = ("SIGTERM", "SIGINT", "SIGUSR1")
# a full disk, a read-only file system, no permission: reported as DiskError (one line, exit 2)
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (missing, truncated, another architecture)."""


class NonFiniteLoss(RuntimeError):
    """A loss became NaN/inf; the run stops and the last good checkpoint stays in place."""


class DiskError(RuntimeError):
    """A write failed for lack of space or permission (the message names the path, the bytes
    it needed and the free space there); nothing earlier was damaged."""


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


@contextlib.contextmanager
def disk_writes(path: str | Path, needed: int | None = None,
                cleanup: Iterable[str | Path] = ()) -> Iterator[None]:
    """Turn an OSError of DISK_ERRNOS inside the block into a DiskError naming `path`, the
    `needed` bytes and the free space there, after deleting the `cleanup` files (temp or
    partial files of this write)."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise
        for leftover in cleanup:
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        size = f"{needed:,} bytes to write" if needed is not None else "size unknown"
        free = free_bytes(path)
        room = f"{free:,} bytes free there" if free is not None else "free space unknown"
        raise DiskError(f"cannot write {path}: {err.strerror or err} ({size}, {room})") \
            from err


# ---------------------------------------------------------------- atomic files and checkpoints
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then `os.replace` it into place.

    A kill at any moment leaves either the old file or the new one, never a partial file; a
    full disk or a read-only place raises DiskError and leaves no temp file behind.
    """
    path = Path(path)
    tmp: list[str] = []
    with disk_writes(path, len(data), cleanup=tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp.append(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(name, path)
        except BaseException:
            if os.path.exists(name):
                os.unlink(name)
            raise


class NpyWriter:
    """Stream rows into a `.npy` file of a known shape: header first, then each batch appended
    with plain writes, so the process never holds (or maps) more than one batch: the page
    cache may keep the file, but the resident set stays flat whatever the array's size.
    `np.load(path, mmap_mode="r")` reads the result."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.rows = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._file, header)

    def write(self, rows: np.ndarray) -> None:
        """Append `rows` ([k, *shape[1:]], cast to the file's dtype)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: rows of shape {rows.shape} do not fit {self.shape} "
                             f"after {self.rows} rows")
        self._file.write(rows.tobytes())
        self.rows += len(rows)

    def discard(self) -> None:
        """Close and delete the file (a build that failed)."""
        self._file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def close(self) -> None:
        """Flush and close; an error if fewer rows than the shape says were written."""
        self._file.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} of {self.shape[0]} rows written")


@contextlib.contextmanager
def streamed_arrays(folder: str | Path, specs: dict[str, tuple[tuple[int, ...], Any]]
                    ) -> Iterator[dict[str, NpyWriter]]:
    """`NpyWriter`s for `<folder>/<name>.npy` of the given (shape, dtype), at temp paths of this
    host and process (two builders sharing a disk never share a temp file); renamed into place
    when the block ends, deleted when it fails. A full disk or a read-only place: DiskError."""
    folder = Path(folder)
    tag = f"{socket.gethostname()}.{os.getpid()}"
    tmp = {k: folder / f".{k}.npy.{tag}.tmp" for k in specs}
    needed = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in
                 specs.values())
    first = folder / f"{next(iter(specs))}.npy"
    with disk_writes(first, needed, cleanup=list(tmp.values())):
        folder.mkdir(parents=True, exist_ok=True)
        writers = {k: NpyWriter(tmp[k], *specs[k]) for k in specs}
        try:
            yield writers
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.discard()
            raise
        for k, path in tmp.items():
            path.replace(folder / f"{k}.npy")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through `atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


SAFETENSORS_META = "clip_t2i"  # the metadata entry holding a checkpoint's non-tensor fields


def atomic_safetensors_save(state: dict, path: str | Path) -> None:
    """A weights-only checkpoint (`state_dict` of tensors + JSON-able fields) as a safetensors
    file: the tensors as they are, every other field as JSON in the header's metadata, written
    through `atomic_write_bytes`. Loading it runs no code (no pickle)."""
    import json

    from safetensors.torch import save

    fields = {k: v for k, v in state.items() if k != "state_dict"}
    # own storage each: safetensors refuses tensors that share memory (views, tied weights)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state["state_dict"].items()}
    atomic_write_bytes(path, save(tensors, metadata={SAFETENSORS_META: json.dumps(fields)}))


def _load_safetensors(path: Path) -> dict:
    """The dict `atomic_safetensors_save` wrote (fields + `state_dict`)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    if SAFETENSORS_META not in meta:
        raise ValueError(f"no {SAFETENSORS_META!r} metadata (not written by this repository)")
    return {**json.loads(meta[SAFETENSORS_META]), "state_dict": state}


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """`torch.load(weights_only=True)` on CPU (a `.safetensors` file: `atomic_safetensors_save`'s
    format, no pickle) with one clear error for a missing/broken file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return _load_safetensors(path)
        except Exception as err:  # truncated, not safetensors, foreign metadata
            raise CheckpointError(f"{what} {path} cannot be read ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...
        raise CheckpointError(f"{what} {path} cannot be read ({type(err).__name__}: {err})") \
            from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path}: expected a dict, found {type(obj).__name__}")
    return obj


def load_state_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    """`load_state_dict` that lists missing/unexpected/mis-shaped keys in one message."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if hasattr(state[k], "shape") and state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {show(shapes)}")
        raise CheckpointError(
            f"{source} does not match this architecture ({'; '.join(parts)}). "
            "Check the config (sizes, branch number) it was trained with."
        )
    module.load_state_dict(state)


def latest_checkpoint(directory: str | Path, pattern: str) -> list[Path]:
    """Checkpoints matching `pattern` in `directory`, newest (highest number) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []

    def number(p: Path) -> int:
        digits = "".join(ch for ch in p.stem if ch.isdigit())
        return int(digits) if digits else -1

    return sorted(directory.glob(pattern), key=number, reverse=True)


def load_latest_valid(candidates: Iterable[Path], what: str) -> tuple[Path, dict] | None:
    """The first readable checkpoint among `candidates`; warns about each unreadable one."""
    for path in candidates:
        try:
            return path, load_checkpoint(path, what)
        except CheckpointError as err:
            warnings.warn(f"skipping unreadable {what}: {err}", stacklevel=2)
    return None


# ----------------------------------------------------------------------------- device, seeds
def _exit_user_error(message: str) -> None:
    """One `error:` line on stderr and the input-error exit code, like every other user error."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def select_device(gpu: int) -> torch.device:
    """`gpu` -1 = CPU; otherwise that CUDA device, with a clear error when CUDA is missing."""
    if gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        _exit_user_error(f"--gpu {gpu} was requested but CUDA is not available on this machine; "
                         "use --gpu -1 to run on the CPU")
    if gpu >= torch.cuda.device_count():
        _exit_user_error(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA device(s) found")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG state needed to continue a run exactly (saved in checkpoints)."""
    state = {
        "python": random.getstate(),
        # as plain types + a tensor, so torch.load(weights_only=True) can read it back
        "numpy": _numpy_state_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: a job may resume with fewer (or other) GPUs visible
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    random.setstate(_tuplify(state["python"]))
    np_state = list(state["numpy"])
    if isinstance(np_state[1], torch.Tensor):
        np_state[1] = np_state[1].numpy()
    np.random.set_state(tuple(np_state))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        if isinstance(cuda, (list, tuple)):  # older states: one entry per visible device
            here = torch.cuda.current_device()
            cuda = cuda[here] if here < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _numpy_state_plain(state: tuple) -> list:
    """NumPy's legacy RNG state with its key array as a tensor (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)]


def _tuplify(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tuplify(x) for x in obj)
    return obj


# ---------------------------------------------------------------------------- distributed
def init_distributed(gpu: int, timeout_minutes: float = 60.0) -> tuple[int, int, torch.device]:
    """Start torch.distributed when launched by torchrun (one process too); return (rank,
    world size, device).

    nccl with one GPU per process (LOCAL_RANK, passed as `device_id` so that barriers know
    it) on CUDA, gloo on CPU (`gpu` -1). `timeout_minutes` (DIST_TIMEOUT_MINUTES) bounds
    every collective, including the barrier where the other ranks wait while the first
    process of a node builds a cache.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun's own variable
        return 0, 1, select_device(gpu)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if gpu >= 0:
        device = select_device(local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        options = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes),
                                **options)
    if dist.get_rank() == 0:
        print(f"torch.distributed: {backend}, {dist.get_world_size()} process(es)")
    return dist.get_rank(), dist.get_world_size(), device


def in_process_group() -> bool:
    """True under torchrun (even with one process): the trainers then wrap their networks in
    DistributedDataParallel, so `torchrun --nproc_per_node 1` runs the real DDP path."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed): only this process writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def is_local_main_process() -> bool:
    """True on the first process of each node (LOCAL_RANK 0 under torchrun, or when not
    distributed): the process that builds a node's caches when nodes keep their own data."""
    return not dist.is_initialized() or int(os.environ.get("LOCAL_RANK", "0")) == 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over ranks (identity when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def barrier() -> None:
    """`dist.barrier` when distributed."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup_distributed() -> None:
    """Tear down the process group if one was started."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- command line
class Stopped(Exception):
    """A stop signal arrived outside a training loop (which saves and exits 75 instead): the
    command ends at once with 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals_end_command() -> Iterator[None]:
    """While the command runs, SIGTERM/SIGINT/SIGUSR1 raise `Stopped` in the main thread (the
    training loop's own handlers take over while it runs), so even a stop outside training
    unwinds through `run_command`, which ends the workers. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in STOP_SIGNALS_OUTSIDE_TRAINING:
        sig = getattr(signal, name)
        previous[sig] = signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # a handler the training loop left (SIG_IGN after it saved) is not undone
            if signal.getsignal(sig) is _raise_stopped:
                signal.signal(sig, handler)


_RESUME_FOLDERS: list[Path] = []  # Model/ folders of the trainers this process built


def note_resume_folder(path: str | Path) -> None:
    """Remember a trainer's Model/ folder: an unexpected exception then names its newest
    resume state (`resume_line`)."""
    _RESUME_FOLDERS.append(Path(path))


def resume_line() -> str | None:
    """'resume state: <newest state_step_*.pth> ...' for the folders noted, or None."""
    found = [f for folder in _RESUME_FOLDERS for f in latest_checkpoint(folder, "state_step_*.pth")]
    if not found:
        return None
    newest = max(found, key=lambda f: f.stat().st_mtime)
    return (f"resume state: {newest} (re-running the same command continues from it once the "
            "cause is fixed)")


def end_children(timeout: float = 10.0) -> int:
    """SIGKILL every child process this one started through multiprocessing (DataLoader
    workers, which ignore the stop signals so that the main process can save first) and reap
    them; returns how many were alive. Called on every exit path of a command: otherwise
    Python's exit waits for a worker that never ends (docs/DESIGN.md §10)."""
    import multiprocessing

    children = multiprocessing.active_children()
    if children and threading.current_thread() is threading.main_thread():
        # torch's DataLoader reports a worker ended by a signal from its SIGCHLD handler
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        with contextlib.suppress(Exception):
            child.kill()
    for child in children:
        child.join(timeout)
    return len(children)


def _peer_failed(err: BaseException) -> bool:
    """Whether `err` is a collective that broke because another process of the job died
    (gloo: 'Connection closed by peer'; NCCL: a DistBackendError)."""
    if not dist.is_initialized():
        return False
    text = str(err)
    return (isinstance(err, getattr(dist, "DistBackendError", ())) or "closed by peer" in text
            or "reset by peer" in text)


def _record_for_torchrun(err: BaseException) -> None:
    """Under torchrun, write the error where its summary looks (TORCHELASTIC_ERROR_FILE), so the
    job's 'Root Cause' names this process's error instead of 'error_file: <N/A>'."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        with contextlib.suppress(OSError):
            ErrorHandler().record_exception(err)


def run_command(body: Callable[[], int | None],
                user_errors: tuple[type[BaseException], ...]) -> int:
    """Run a command-line body and return its exit code (docs/training-at-scale.md).

    0 (or the body's own code) on success; one of `user_errors` (CheckpointError and DiskError
    always count) prints `error: <message>` on stderr and gives EXIT_USER_ERROR (2); NonFiniteLoss
    prints its message the same way and gives EXIT_NON_FINITE (3); a stop signal outside a
    training loop gives 128 + its number; any other exception is a bug: its traceback, then
    where the newest resume state is, and EXIT_BUG (1). On every path the data-loader workers
    are ended and torch.distributed is torn down.
    """
    try:
        with stop_signals_end_command():
            code = body()
        return 0 if code is None else code
    except (CheckpointError, DiskError, *user_errors) as err:
        print(f"error: {err}", file=sys.stderr)
        _record_for_torchrun(err)
        return EXIT_USER_ERROR
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        _record_for_torchrun(err)
        return EXIT_NON_FINITE
    except (Stopped, KeyboardInterrupt) as err:
        signum = err.signum if isinstance(err, Stopped) else int(signal.SIGINT)
        line = resume_line()
        print(f"\nstopped by {signal.Signals(signum).name}" + (f"; {line}" if line else ""),
              file=sys.stderr)
        return 128 + signum
    except Exception as err:
        if _peer_failed(err):  # the process that failed first has printed why
            print(f"error: process {dist.get_rank()} stops: another process of this job "
                  "failed (its error is printed above, and in torchrun's summary)",
                  file=sys.stderr)
            return EXIT_BUG
        traceback.print_exc()
        _record_for_torchrun(err)
        line = resume_line()
        if line:
            print(line, file=sys.stderr)
        return EXIT_BUG
    finally:
        end_children()
        cleanup_distributed()
