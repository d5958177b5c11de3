"""OpenMP's wait policy, chosen before torch loads its OpenMP runtime (docs/DESIGN.md §11).

Spinning threads make small CPU models fastest on idle cores (stage 2 of the shapes demo: 49 s
for 300 steps against 74 s with sleeping threads) and collapse when another process holds a
core (94–157 s against 103 s, run to run). So the policy is PASSIVE (sleep between parallel
regions) when the machine is already busy, or cannot be measured, and OpenMP's default
otherwise; an OMP_WAIT_POLICY already in the environment always wins.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

BUSY_CORES = 0.5  # other processes' load, in cores, from which threads should not spin


def cpu_times(read: Callable[[], str] | None = None) -> tuple[int, int]:
    """(all, idle) jiffies of the machine from the first line of /proc/stat; idle counts
    iowait too. Raises OSError/ValueError where there is no such file or it reads otherwise."""
    text = read() if read is not None else open("/proc/stat").readline()  # noqa: SIM115
    fields = text.split()
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        raise ValueError(f"not a /proc/stat cpu line: {text[:60]!r}")
    values = [int(v) for v in fields[1:]]
    return sum(values), values[3] + values[4]


def busy_cores(seconds: float = 0.1, cores: int | None = None) -> float | None:
    """How many cores other processes kept busy over the next `seconds` (None: unknown)."""
    try:
        total0, idle0 = cpu_times()
        time.sleep(seconds)
        total1, idle1 = cpu_times()
    except (OSError, ValueError):
        return None
    total = total1 - total0
    if total <= 0:
        return None
    return (1 - (idle1 - idle0) / total) * (cores or os.cpu_count() or 1)


def choose(environ: dict, busy: float | None) -> str | None:
    """The OMP_WAIT_POLICY to set: None keeps the environment's (or OpenMP's default)."""
    if "OMP_WAIT_POLICY" in environ:
        return None
    return "PASSIVE" if busy is None or busy >= BUSY_CORES else None


def apply() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE where `choose` says so (call before importing torch)."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    policy = choose(os.environ, busy_cores())
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy
