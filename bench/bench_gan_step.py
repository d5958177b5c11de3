"""Stage-2 training steps/s with the text-feature cache vs. re-encoding captions every step and
in bf16 vs. fp32 on the CPU, R-precision batched vs. a per-image loop, the encoder's resize
of generated images as two matmuls vs. F.interpolate, and the discriminators' conditional
logits as `model.Discriminator` computes them vs. the release's concatenation, forward +
backward (same run, same inputs).

    python bench/bench_gan_step.py [--steps 10 --batch 16 --threads 1]

The GAN is small (16/32 px, GF_DIM 16) and the image tower is the tiny test CLIP; the text
tower is measured twice: the tiny one and one of CLIP ViT-B/32's size (12 layers, width 512,
random weights, so no download), which is what a real run re-encodes without the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from datasets import make_shapes_dataset
from miscc.config import load_config
from miscc.training import cpu_has_bf16
from miscc.utils import atomic_torch_save
from model import CLIP_ARCH_DIR, ClipEncoder, Discriminator, resize_bicubic, resolve_clip_name
from r_precision import rank_first, rank_first_loop, sample_negatives
from trainer import GANTrainer

B32_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}


def encoder_file(tmp: Path, text_cfg: dict | None) -> Path:
    """A stage-1-format encoder checkpoint: tiny CLIP, optionally with a bigger text tower."""
    arch = json.loads((CLIP_ARCH_DIR / "tiny.json").read_text())
    name = "tiny"
    if text_cfg is not None:
        arch["text_cfg"] = text_cfg
        name = "tiny_b32text"
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(arch))
    torch.manual_seed(0)
    out = tmp / f"clip_{name}.pth"
    atomic_torch_save(ClipEncoder(resolve_clip_name(str(path), ""), adapter=True)
                      .checkpoint_state(), out)
    return out


def steps_per_second(cfg, steps: int) -> float:
    """Time `steps` training steps on prefetched batches (data loading excluded, equal for both)."""
    trainer = GANTrainer(cfg, torch.device("cpu"), fresh=True, progress=False)
    trainer.sampler.set_epoch(0)
    batches = [b for _, b in zip(range(4), trainer.loader, strict=False)]
    trainer.train_step(batches[0])  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        trainer.train_step(batches[i % len(batches)])
    return steps / (time.perf_counter() - start)


def stage2_cfg(tmp: Path, enc: Path, batch: int, out: str, *overrides: str):
    """The demo's stage-2 config at 16/32 px on the bench's small shapes set."""
    return load_config(
        Path(__file__).resolve().parents[1] / "cfg" / "clip_shapes_DMGAN.yml",
        [f"DATA_DIR={tmp / 'data'}", f"OUTPUT_DIR={tmp / out}", f"TRAIN.NET_E={enc}",
         "WORKERS=0", "TREE.BASE_SIZE=16", "TREE.BRANCH_NUM=2", f"TRAIN.BATCH_SIZE={batch}",
         "GAN.GF_DIM=16", "GAN.DF_DIM=16", "TEXT.EMBEDDING_DIM=64", *overrides], quiet=True)


def on_off(tmp: Path, enc: Path, args, key: str) -> dict[bool, float]:
    """Steps/s of the stage-2 config with the boolean `key` off and on."""
    return {flag: steps_per_second(stage2_cfg(tmp, enc, args.batch, f"{key}{flag}",
                                              f"{key}={flag}"), args.steps)
            for flag in (False, True)}


def print_rates(title: str, off: str, on: str, rates: dict[bool, float]) -> None:
    print(title)
    width = max(len(off), len(on))
    print(f"  {off:<{width}}: {rates[False]:7.2f} steps/s")
    print(f"  {on:<{width}}: {rates[True]:7.2f} steps/s")
    print(f"  ratio: {rates[True] / rates[False]:.2f}x")


def bench_steps(args, tmp: Path) -> None:
    make_shapes_dataset(tmp / "data", n_train=96, n_test=4, size=32, seed=0)
    for label, text_cfg in (("tiny text tower", None), ("ViT-B/32-size text tower", B32_TEXT)):
        print_rates(f"[{label}] batch {args.batch} (x2 captions), 16/32 px, GF_DIM 16",
                    "re-encode captions every step", "text-feature cache",
                    on_off(tmp, encoder_file(tmp, text_cfg), args, "TRAIN.TEXT_CACHE"))
    if not cpu_has_bf16():
        print("[bf16 autocast] skipped: this CPU has no AVX512-BF16 or AMX")
        return
    print_rates(f"[bf16 autocast on the CPU, TRAIN.AMP_CPU] batch {args.batch}, tiny text tower",
                "fp32", "bf16", on_off(tmp, encoder_file(tmp, None), args, "TRAIN.AMP_CPU"))


def bench_r_precision(images: int) -> None:
    g = torch.Generator().manual_seed(0)
    n_img, caps, dim = images // 10, 10, 512
    bank = torch.randn(n_img * caps, dim, generator=g)
    classes = torch.arange(n_img) % 50
    bank_class = classes.repeat_interleave(caps)
    true_idx = torch.arange(n_img * caps)
    codes = bank + 8 * torch.randn(len(bank), dim, generator=g)  # R-precision ~0.5
    image_class = bank_class
    valid = torch.ones(len(bank), dtype=torch.bool)
    start = time.perf_counter()
    negatives, _ = sample_negatives(image_class, bank_class, valid, 99, seed=0)
    fast = rank_first(codes, bank, true_idx, negatives)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    slow = rank_first_loop(codes, bank, true_idx, negatives)
    t_loop = time.perf_counter() - start
    assert torch.equal(fast, slow)
    print(f"[R-precision] {len(codes)} images, bank of {len(bank)} captions, 1 + 99 candidates")
    print(f"  per-image loop: {t_loop:7.3f} s (negatives given)")
    print(f"  batched       : {t_batched:7.3f} s (including sampling the negatives)")
    print(f"  ratio loop/batched: {t_loop / t_batched:.1f}x  "
          f"(identical hits; R-precision {fast.float().mean():.3f})")


def bench_resize(batch: int, reps: int = 20) -> None:
    """What stage 2 does to every generated batch: 32 px -> the tiny tower's 64 px, forward and
    backward."""
    x = torch.rand(batch, 3, 32, 32, requires_grad=True)
    probe = torch.rand(batch, 3, 64, 64)

    def interpolate(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, size=(64, 64), mode="bicubic", align_corners=False)

    def matmul(t: torch.Tensor) -> torch.Tensor:
        return resize_bicubic(t, 64, antialias=False)

    times = {}
    for name, fn in (("F.interpolate", interpolate), ("matmul", matmul)):
        for _ in range(3):
            (fn(x) * probe).sum().backward()
        start = time.perf_counter()
        for _ in range(reps):
            (fn(x) * probe).sum().backward()
        times[name] = (time.perf_counter() - start) / reps * 1e3
    print(f"[resize] [{batch}, 3, 32, 32] -> 64 px bicubic, forward + backward")
    for name, ms in times.items():
        print(f"  {name:13s}: {ms:7.2f} ms")
    print(f"  ratio interpolate/matmul: {times['F.interpolate'] / times['matmul']:.1f}x")


class ReleaseD(Discriminator):
    """The same weights, conditional logits as DM-GAN's D_GET_LOGITS computes them: features ⊕
    the sentence replicated 4x4 through the 3x3 joint convolution for every sentence, 4x4
    logit convolutions."""

    def cond_logits(self, feats, sents):
        out = []
        for sent in sents:
            tiled = feats.repeat(sent.shape[0] // feats.shape[0], 1, 1, 1)
            joint = torch.cat([tiled, sent[:, :, None, None].expand(-1, -1, 4, 4)], dim=1)
            out.append(self.cond(self.joint(joint)).flatten())
        return out

    def forward(self, images, sent, wrong_sent=None):
        feats = self.trunk(images)
        logits = self.cond_logits(feats, [sent] if wrong_sent is None else [sent, wrong_sent])
        return self.uncond(feats).flatten(), logits[0], logits[1] if len(logits) > 1 else None


def bench_discriminator(batch: int, reps: int = 20) -> None:
    """One step's discriminator work at 32 px, DF_DIM 16, 64-d sentences: the real images with
    both captions and wrong ones, the 2B fakes, then the fakes again for G; backward each."""
    torch.manual_seed(0)
    ours = Discriminator(32, 16, 64)
    release = ReleaseD(32, 16, 64)
    release.load_state_dict(ours.state_dict())
    real, fake = torch.randn(batch, 3, 32, 32), torch.randn(2 * batch, 3, 32, 32)
    sent, wrong = torch.randn(2 * batch, 64), torch.randn(2 * batch, 64)

    def step(net) -> None:
        ru, rc, wc = net(real, sent, wrong)
        fu, fc, _ = net(fake, sent)
        (ru.sum() + rc.sum() + wc.sum() + fu.sum() + fc.sum()).backward()
        gu, gc, _ = net(fake.requires_grad_(), sent)
        (gu.sum() + gc.sum()).backward()

    times = {}
    for name, net in (("release concatenation", release), ("Discriminator", ours)):
        for _ in range(3):
            step(net)
        start = time.perf_counter()
        for _ in range(reps):
            step(net)
        times[name] = (time.perf_counter() - start) / reps * 1e3
    print(f"[discriminator] one step's D work, batch {batch} (x2 captions), 32 px, DF_DIM 16")
    for name, ms in times.items():
        print(f"  {name:21s}: {ms:7.2f} ms")
    print(f"  ratio: {times['release concatenation'] / times['Discriminator']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rp-images", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU")
    with tempfile.TemporaryDirectory() as tmp:
        bench_steps(args, Path(tmp))
    bench_r_precision(args.rp_images)
    bench_resize(2 * args.batch)
    bench_discriminator(args.batch)


if __name__ == "__main__":
    main()
