"""torch-fidelity's TF-faithful Inception-v3: its weights, loading it, random weights.

`load_inception` builds `torch_fidelity.FeatureExtractorInceptionV3` for the pool features at
`dims` (FID, KID) plus the unbiased logits (IS), from a local weights file, the torch hub cache
or a download that fails fast with one message saying what to fetch and how to pass it. A
weights file is read with `torch.load(weights_only=True)` before torch-fidelity unpickles it.

Also here: `MetricsError`, the user-fixable error every metric module raises, and the default
log function (stderr).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from miscc.utils import CheckpointError, load_checkpoint

DIMS_CHOICES = (64, 192, 768, 2048)
EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registry name for this extractor
LOGITS_LAYER = "logits_unbiased"  # the layer torch-fidelity's IS uses
DOWNLOAD_TIMEOUT_S = 30.0  # a blocked network fails after this instead of hanging
Log = Callable[[str], None]


class MetricsError(RuntimeError):
    """A user-fixable problem (bad input, missing weights, mismatched statistics)."""


class WeightsUnavailableError(MetricsError):
    """The Inception weights are neither given nor downloadable."""



def log_stderr(msg: str) -> None:
    """The default `log` of the metric functions: progress, notes and warnings go to stderr."""
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ weights
def inception_url() -> str:
    """The URL torch-fidelity downloads its Inception-v3 weights from."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def inception_filename() -> str:
    """The weights file name torch-fidelity expects (and caches under torch hub)."""
    return os.path.basename(inception_url())


def hub_weights_path() -> Path:
    """Where torch hub keeps the downloaded weights (`$TORCH_HOME/hub/checkpoints/<file>`)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / inception_filename()


def missing_weights_message(reason: str) -> str:
    """The one message shown when the weights cannot be obtained."""
    return (
        f"cannot get the Inception-v3 weights '{inception_filename()}' ({reason}).\n"
        f"  Download {inception_url()}\n"
        f"  on a machine with internet access, then pass it with --weights PATH "
        f"(or copy it to {hub_weights_path()})."
    )


def file_sha256(path: str | Path) -> str:
    """Short SHA-256 of a file: identifies the weights that produced cached statistics."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:16]


def _check_state_dict_file(path: Path) -> None:
    """Fail clearly on a missing file or one that holds more than tensors.

    Read with `miscc.utils.load_checkpoint` (`weights_only=True`) before torch-fidelity, which
    loads the file with `weights_only=False`, ever unpickles it.
    """
    if not path.is_file():
        raise MetricsError(f"--weights {path}: no such file.\n" + missing_weights_message(
            "the given file does not exist"))
    try:
        state = load_checkpoint(path, "Inception weights")
    except CheckpointError as err:
        raise MetricsError(f"{err}; expected a PyTorch state dict of tensors readable with "
                           f"torch.load(weights_only=True)") from err
    if not all(torch.is_tensor(v) for v in state.values()):
        raise MetricsError(f"--weights {path}: expected a state dict of tensors "
                           f"(the file '{inception_filename()}')")


@dataclass
class Inception:
    """torch-fidelity's Inception-v3 extractor set up for one pass: pool features (+ logits)."""

    net: torch.nn.Module
    dims: int
    logits: bool
    device: torch.device
    weights_id: str

    @property
    def layers(self) -> list[str]:
        return list(self.net.features_list)


def load_inception(dims: int = 2048, logits: bool = True, weights: str | Path | None = None,
                   device: torch.device | str = "cpu") -> Inception:
    """Build torch-fidelity's FeatureExtractorInceptionV3 for `dims` pool features and logits.

    `weights` is a local weights file (offline use); without it torch-fidelity's own file is
    used from the torch hub cache or downloaded, failing fast with a clear message when the
    network is unavailable.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if dims not in DIMS_CHOICES:
        raise MetricsError(f"--dims must be one of {DIMS_CHOICES}, got {dims}")
    layers = [str(dims)] + ([LOGITS_LAYER] if logits else [])
    from_hub = weights is None and hub_weights_path().is_file()
    if from_hub:
        weights = hub_weights_path()
    if weights is not None:
        path = Path(weights)
        try:
            _check_state_dict_file(path)
        except MetricsError as err:
            if from_hub:  # e.g. a download cut short earlier
                raise MetricsError(f"the cached weights {path} are unreadable; delete the file "
                                   f"and run again, or pass --weights PATH\n{err}") from err
            raise
        try:
            net = FeatureExtractorInceptionV3(EXTRACTOR_NAME, layers,
                                              feature_extractor_weights_path=str(path))
        except RuntimeError as err:  # strict load_state_dict: missing/unexpected keys listed
            raise MetricsError(f"--weights {path} does not fit torch-fidelity's Inception-v3 "
                               f"(expected '{inception_filename()}'):\n{err}") from err
        weights_id = file_sha256(path)
    else:
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        chatter = io.StringIO()  # torch hub's "Downloading: ..." line and progress bar
        try:
            with contextlib.redirect_stderr(chatter):
                net = FeatureExtractorInceptionV3(EXTRACTOR_NAME, layers)
        except (OSError, ValueError, RuntimeError) as err:  # URLError, timeouts, bad file
            # the one message (what to download, how to pass it) replaces torch hub's output
            raise WeightsUnavailableError(missing_weights_message(
                f"download failed: {err}")) from err
        finally:
            socket.setdefaulttimeout(old_timeout)
        log_stderr(f"downloaded {inception_filename()} to {hub_weights_path()}")
        weights_id = file_sha256(hub_weights_path()) if hub_weights_path().is_file() else "hub"
    device = torch.device(device)
    net = net.to(device).eval()
    return Inception(net=net, dims=dims, logits=logits, device=device, weights_id=weights_id)


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """Save torch-fidelity's Inception-v3 with random weights, for offline tests/benchmarks only.

    Built through torch-fidelity's own class with its weight loading switched off. Convolutions
    get He-normal weights (the default init shrinks activations to ~0 over 90 layers); the
    classifier is made orthogonal to the mean feature and scaled so logits spread by ~3, so
    features and IS are non-degenerate. Numbers from it are not comparable to published ones.
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    g = torch.Generator().manual_seed(seed)
    with (mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
          mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict",
                            lambda *a, **k: None)):
        net = fe.FeatureExtractorInceptionV3(EXTRACTOR_NAME, ["2048"])
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.normal_(0, (2.0 / mod.weight[0].numel()) ** 0.5, generator=g)
        probe = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
        feats = net(probe)[0]
        mean_dir = feats.mean(0) / feats.mean(0).norm()
        w = torch.randn(1008, 2048, generator=g)
        w -= (w @ mean_dir)[:, None] * mean_dir[None, :]
        net.fc.weight.copy_(w * 3.0 / ((feats - feats.mean(0)) @ w.T).std())
        net.fc.bias.normal_(0, 1, generator=g)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path

