"""Shared fixtures: a tiny shapes set in the CUB layout and configs pointing at it."""

from __future__ import annotations

from pathlib import Path

import pytest

from datasets import make_shapes_dataset
from miscc.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """24 train / 12 test shapes pictures of 32 px (read-only: copy before damaging it)."""
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, n_train=24, n_test=12, size=32, seed=0)
    return out


@pytest.fixture
def shapes_cfg(shapes_dir):
    """A function: overrides -> merged config over cfg/DAMSM/shapes.yml on the tiny set."""

    def make(*overrides: str, data_dir: Path | None = None):
        return load_config(ROOT / "cfg" / "DAMSM" / "shapes.yml",
                           [f"DATA_DIR={data_dir or shapes_dir}", *overrides], quiet=True)

    return make


# ------------------------------------------------------------- helpers (import from conftest)
def flat_tensors(obj, prefix: str = "") -> dict:
    """Every tensor inside nested dicts/lists (e.g. a checkpoint), keyed by its path."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    out = {}
    for key, value in items:
        out.update(flat_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    """Same names and bit-identical tensors; the message names the first that differ."""
    import torch

    assert a.keys() == b.keys(), f"names differ: {sorted(set(a) ^ set(b))[:5]}"
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
