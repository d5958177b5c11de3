"""OpenMP wait policy: spin on idle cores, sleep when others keep a core busy or load is unknown,
never override the environment; /proc/stat parsing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from miscc import wait_policy


def test_choose_spins_only_on_an_idle_machine() -> None:
    assert wait_policy.choose({}, 0.0) is None
    assert wait_policy.choose({}, 0.49) is None
    assert wait_policy.choose({}, 0.5) == "PASSIVE"
    assert wait_policy.choose({}, 1.7) == "PASSIVE"
    assert wait_policy.choose({}, None) == "PASSIVE"  # cannot measure: the safe choice
    assert wait_policy.choose({"OMP_WAIT_POLICY": "ACTIVE"}, 1.7) is None
    assert wait_policy.choose({"OMP_WAIT_POLICY": "PASSIVE"}, 0.0) is None


def test_cpu_times_reads_the_first_proc_stat_line() -> None:
    # user nice system idle iowait irq softirq steal
    line = "cpu  100 5 20 800 30 1 2 3 0 0\n"
    assert wait_policy.cpu_times(lambda: line) == (961, 830)
    with pytest.raises(ValueError, match="not a /proc/stat cpu line"):
        wait_policy.cpu_times(lambda: "intr 1 2 3\n")


def test_busy_cores_from_two_readings(monkeypatch) -> None:
    readings = iter([(1000, 600), (1200, 700)])  # 200 jiffies, 100 of them idle: half busy
    monkeypatch.setattr(wait_policy, "cpu_times", lambda: next(readings))
    monkeypatch.setattr(wait_policy.time, "sleep", lambda s: None)
    assert wait_policy.busy_cores(cores=2) == pytest.approx(1.0)

    def unreadable():
        raise OSError("no /proc/stat")

    monkeypatch.setattr(wait_policy, "cpu_times", unreadable)
    assert wait_policy.busy_cores(cores=2) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_importing_miscc_keeps_an_explicit_policy() -> None:
    code = "import os, miscc; print(os.environ['OMP_WAIT_POLICY'])"
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "ACTIVE"
