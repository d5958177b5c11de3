"""The VQGAN's training losses (docs/DESIGN.md §13): LPIPS on VGG16 (the `lpips` package), the
PatchGAN discriminator with its hinge loss, and taming's adaptive weight for the adversarial
term.

    L_AE = mean|x − x̂| + w_p·LPIPS(x, x̂) + w_c·L_VQ + λ·[step ≥ DISC_START]·(−mean D(x̂))
    λ    = DISC_WEIGHT · ‖∇_W L_rec‖ / (‖∇_W L_adv‖ + 1e-4), clamped to [0, 1e4], no gradient
    L_D  = ½·(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))

W is the decoder's last conv weight; L_rec the first two terms.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from miscc.utils import all_reduce_mean

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


class WeightsError(RuntimeError):
    """Weights a loss needs are not on this machine (reported as one `error:` line)."""


# ------------------------------------------------------------------------- perceptual loss
def vgg16_weights_path(configured: str = "") -> Path:
    """VQGAN.VGG_WEIGHTS when set, else torch hub's cache entry for torchvision's VGG16."""
    if configured:
        return Path(configured)
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def load_lpips(configured: str = "") -> nn.Module:
    """LPIPS(VGG16) in eval mode with frozen weights: the calibration layers the `lpips`
    package ships, the VGG16 convolutions from `vgg16_weights_path` (never downloaded here)."""
    import lpips

    path = vgg16_weights_path(configured)
    if not path.is_file():
        where = "VQGAN.VGG_WEIGHTS" if configured else "the torch hub cache"
        raise WeightsError(
            f"VGG16 weights for the LPIPS perceptual loss not found: {path} ({where}); "
            f"download {VGG16_URL} to that path (or set VQGAN.VGG_WEIGHTS to a copy), or "
            "train without the perceptual term with --set VQGAN.PERCEPTUAL_WEIGHT=0")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated download, not a state dict
        raise WeightsError(f"VGG16 weights {path} cannot be read ({type(err).__name__}: "
                           f"{err}); delete the file and download {VGG16_URL} again") from err
    with warnings.catch_warnings():  # lpips still passes torchvision's old `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # random trunk
    own = model.net.state_dict()  # slice<k>.<i>.weight keeps torchvision's features.<i>
    trunk = {k: state.get("features." + k.split(".", 1)[1]) for k in own}
    bad = [k for k, v in trunk.items() if v is None or v.shape != own[k].shape]
    if bad:
        raise WeightsError(f"{path} is not torchvision's VGG16 state dict ({VGG16_FILE}): "
                           f"features.{bad[0].split('.', 1)[1]} is missing or mis-shaped")
    model.net.load_state_dict(trunk)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- discriminator
class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): conv4 s2 + LeakyReLU, then LAYERS−1 conv4 s2 and one conv4 s1, each
    with BatchNorm + LeakyReLU 0.2, then conv4 s1 to one logit per patch. Init N(0, 0.02),
    BatchNorm weight N(1, 0.02)."""

    def __init__(self, layers: int = 3, ch: int = 64) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ch
        for i in range(1, layers + 1):
            out = ch * min(2 ** i, 8)
            seq += [nn.Conv2d(c, out, 4, 2 if i < layers else 1, 1, bias=False),
                    nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            c = out
        seq.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RealFake(nn.Module):
    """The discriminator's D step as one module call (one DistributedDataParallel forward):
    real and fake batches go through separately, so BatchNorm sees each batch's statistics."""

    def __init__(self, disc: PatchDiscriminator) -> None:
        super().__init__()
        self.disc = disc

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.disc(real), self.disc(fake)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """½·(mean relu(1 − real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """DISC_WEIGHT · ‖∇W rec‖ / (‖∇W adv‖ + 1e-4), clamped to [0, 1e4] and detached. The two
    gradients are averaged over processes first, so every rank uses the weight of the global
    batch. `scale` is the GradScaler's scale: the gradients are taken of the scaled losses,
    as the training backward takes them (under fp16 the unscaled ones underflow to 0), and
    divided by it in fp32. Scaled gradients that overflow give weight 0 for the step (the
    GradScaler skips that step anyway)."""
    g_rec = torch.autograd.grad(rec_loss * scale, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss * scale, last_layer, retain_graph=True)[0]
    g_rec, g_adv = all_reduce_mean(g_rec.float()), all_reduce_mean(g_adv.float())
    weight = (g_rec.norm() / scale) / (g_adv.norm() / scale + 1e-4)
    weight = torch.where(torch.isfinite(weight), weight, torch.zeros_like(weight))
    return (weight.clamp(0.0, 1e4) * disc_weight).detach()
