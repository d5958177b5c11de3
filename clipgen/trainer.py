"""Training CLIP-GEN's transformer (docs/DESIGN.md §13) on the shared loop of
`miscc/training.py`: exact resume, atomic checkpoints, torchrun DDP, AMP on CUDA.

The data are the token cache's rows (tokens + CLIP image embedding of a seeded view of each
image): no pixel and no caption is read. Epoch e uses view e mod VIEWS of every image, the
crop an image-reading run would draw in that epoch. One step: teacher-forced logits of every
token after the prefix Linear(l2norm(e')), e' the embedding (with LAFITE noise when
CLIPGEN.NOISE > 0); loss = CE + RECON_WEIGHT · ‖n(CLIP(decode(ST(logits)))) − n(e)‖², n(·) the
unit vector, ST the straight-through argmax of the softmax.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from clipgen.data import TokenizerImages
from clipgen.gpt import CondGPT, GPTArch
from clipgen.models import (
    check_sources,
    draw_images,
    gpt_arch,
    gpt_checkpoint,
    load_tokenizer,
    sources,
)
from clipgen.tokens import TokenCache, token_cache
from datasets import DataError, read_split
from miscc.config import to_plain
from miscc.training import (
    EpochSampler,
    EpochTrainer,
    check_replicas,
    fused_options,
    inference_precision,
    load_resume_state,
    load_scaler_state,
)
from miscc.utils import (
    CheckpointError,
    atomic_torch_save,
    in_process_group,
    load_state_strict,
    rng_state,
)
from model import ClipEncoder
from text_features import feature_cache_root, load_frozen_encoder

STATE_FORMAT = "clipgen-train-state/1"


def encoder_name(cfg) -> str:
    """How the config names its CLIP encoder (TRAIN.NET_E, else the CLIP section)."""
    return str(cfg.TRAIN.NET_E) or f"{cfg.CLIP.MODEL} ({cfg.CLIP.PRETRAINED or 'random'})"


class CachedBatches:
    """The training 'loader': batches {"tokens" [B, T], "emb" [B, E]} of the token cache for the
    (epoch, index) items of an `EpochSampler`; item (e, i) is row (e mod views)·N + i."""

    def __init__(self, cache: TokenCache, sampler: EpochSampler, batch: int) -> None:
        self.cache, self.sampler, self.batch = cache, sampler, batch
        self.n = len(cache) // cache.views

    def __len__(self) -> int:
        return len(self.sampler) // self.batch

    def __iter__(self):
        items = list(iter(self.sampler))
        for start in range(0, len(self) * self.batch, self.batch):
            part = items[start: start + self.batch]
            rows = torch.tensor([(e % self.cache.views) * self.n + i for e, i in part])
            tokens, emb = self.cache.rows(rows)
            yield {"tokens": tokens, "emb": emb}


def lafite_noise(emb: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """LAFITE's perturbation of unit embeddings: h + level · ε/‖ε‖ per row, ε ~ N(0, I), so the
    offset has length `level` whatever the width (h = emb/‖emb‖)."""
    h = F.normalize(emb.float(), dim=-1)
    eps = torch.randn(h.shape, generator=generator).to(h.device)
    return h + level * F.normalize(eps, dim=-1)


def recon_loss(logits: torch.Tensor, vq, encoder: ClipEncoder, emb: torch.Tensor) -> torch.Tensor:
    """MSE between the unit CLIP image embedding of the image the logits decode to and the unit
    target embedding. Tokens are one-hot argmaxes in the forward pass and softmax gradients in
    the backward pass (straight-through), so the loss reaches the logits through the frozen
    VQGAN decoder and CLIP image tower (which resizes and normalises differentiably)."""
    b, t, v = logits.shape
    side = math.isqrt(t)
    soft = logits.float().softmax(-1)
    hard = F.one_hot(soft.argmax(-1), v).to(soft.dtype)
    st = hard + soft - soft.detach()
    codes = st @ vq.quantizer.codebook().float()  # [B, T, D]
    images = vq.decode_codes(codes.transpose(1, 2).reshape(b, -1, side, side))
    pred = encoder.encode_image(images)[1]
    return F.mse_loss(F.normalize(pred.float(), dim=-1), F.normalize(emb.float(), dim=-1),
                      reduction="sum") / b


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the Linear weights only (not biases, LayerNorm, token or
    position embeddings), as GPT-2-style training does."""
    decay, rest = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (decay if isinstance(module, nn.Linear) and name == "weight" else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps to `peak`, then half a cosine to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class CLIPGenTrainer(EpochTrainer):
    """The transformer's loop: AdamW (0.9, 0.95) with warm-up + cosine, gradient clipping, caption
    sample grids per snapshot, exact resume."""

    FRESH_PATTERNS = ("state_step_*.pth", "gpt_*.pth")
    FRESH_FOLDERS = ("logs", "Image")

    def __init__(self, cfg, device: torch.device, rank: int = 0, world: int = 1,
                 fresh: bool = False, progress: bool = True) -> None:
        super().__init__(cfg, device, rank, world, fresh, progress)
        c = cfg.CLIPGEN
        self.encoder = load_frozen_encoder(cfg, device)
        self.vq, vq_path = load_tokenizer(cfg, device)
        self.sources = sources(vq_path, self.vq, encoder_name(cfg), self.encoder)
        data = TokenizerImages(cfg, "train", train=True, use_cache=bool(cfg.TRAIN.USE_CACHE))
        if len(data) // world < self.batch:
            raise DataError(f"TRAIN.BATCH_SIZE={self.batch} per process is larger than the "
                            f"train split's share of each of the {world} processes "
                            f"({len(data) // world} images); lower TRAIN.BATCH_SIZE")
        with inference_precision(cfg, device):
            self.cache = token_cache(feature_cache_root(cfg), data, self.vq, self.encoder,
                                     device, int(c.VIEWS), int(cfg.SEED),
                                     workers=int(cfg.WORKERS), progress=self.progress)
        self.sampler = EpochSampler(len(data), self.batch, int(cfg.SEED), rank, world)
        self.loader = CachedBatches(self.cache, self.sampler, self.batch)
        self.recon_weight = float(c.RECON_WEIGHT)

        torch.manual_seed(int(cfg.SEED))
        self.gpt = CondGPT(gpt_arch(cfg, self.vq, self.encoder)).to(device)
        self.opt = torch.optim.AdamW(decay_groups(self.gpt, float(c.WEIGHT_DECAY)),
                                     lr=float(c.LR), betas=(0.9, 0.95), **fused_options(device))
        self.model: nn.Module = self.gpt
        if in_process_group():
            self.model = DistributedDataParallel(self.gpt, device_ids=[device.index]
                                                 if self.cuda else None)
        self._resume()
        self._setup_samples()

    @property
    def total_steps(self) -> int:
        """Steps of the whole schedule: TRAIN.MAX_EPOCH epochs (MAX_STEPS only stops early,
        so a run stopped there and resumed follows the same schedule)."""
        return int(self.cfg.TRAIN.MAX_EPOCH) * self.steps_per_epoch

    # ------------------------------------------------------------------ sample grids
    def _setup_samples(self) -> None:
        """16 fixed conditions for the grids: CLIPGEN.SAMPLE_CAPTIONS, else 16 test captions
        spread over the split, else (data without captions) 16 test images' embeddings."""
        cfg = self.cfg
        self.sample_captions: list[str] = []
        self.sample_images: torch.Tensor | None = None
        listed = str(cfg.CLIPGEN.SAMPLE_CAPTIONS)
        if listed:
            path = Path(listed)
            if not path.is_file():
                raise DataError(f"CLIPGEN.SAMPLE_CAPTIONS: caption file not found: {path}")
            self.sample_captions = [ln.strip() for ln in path.read_text().splitlines()
                                    if ln.strip()][:16]
        else:
            try:
                caps = read_split(cfg, "test").captions
                picks = np.linspace(0, len(caps) - 1, num=min(16, len(caps))).round()
                self.sample_captions = [caps[int(i)][0] for i in picks]
            except (DataError, OSError):
                pass  # no readable captions: condition on test images
        with torch.no_grad():
            if self.sample_captions:
                from datasets import CaptionTokenizer

                tokens = CaptionTokenizer(int(cfg.TEXT.WORDS_NUM))(self.sample_captions)
                self.sample_cond = self.encoder.encode_text(tokens.to(self.device))[1].float()
            else:
                test = TokenizerImages(cfg, "test", train=False, use_cache=False)
                picks = np.linspace(0, len(test) - 1, num=min(16, len(test))).round()
                self.sample_images = torch.stack([test[int(i)]["image"] for i in picks])
                self.sample_cond = self.encoder.encode_image(
                    self.sample_images.to(self.device))[1].float()

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """`Image/G_epoch_<N>.png`: the fixed conditions' images (captions under each; for
        image conditions, the test images above their samples) + TensorBoard."""
        if not self.main:
            return None
        from miscc.pictures import caption_grid, rows_picture, save_caption_grid, save_rows

        ids = torch.arange(len(self.sample_cond))
        images = draw_images(self.cfg, self.gpt, self.vq, self.sample_cond, ids).cpu()
        name = f"G_step_{self.step}.png" if self.in_epoch else f"G_epoch_{self.epoch}.png"
        path = self.image_dir / name
        if self.sample_captions:
            save_caption_grid(images, self.sample_captions, path)
            grid = caption_grid(images, self.sample_captions)
        else:
            save_rows([self.sample_images, images], path)
            grid = rows_picture([self.sample_images, images])
        if self.writer is not None:
            self.writer.add_image("samples", np.asarray(grid), self.step, dataformats="HWC")
        return path

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "format": STATE_FORMAT, "epoch": self.epoch, "in_epoch": self.in_epoch,
            "step": self.step, "world": self.world, "batch": self.batch,
            "gpt": gpt_checkpoint(self.gpt, self.sources), "opt": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "config": to_plain(self.cfg),
        }

    def save(self) -> None:
        """`gpt_epoch_<N>.pth` (N = completed epochs; `gpt_step_<S>.pth` inside an epoch) + the
        resume state, each written atomically."""
        if not self.main:
            return
        name = f"gpt_step_{self.step}.pth" if self.in_epoch else f"gpt_epoch_{self.epoch}.pth"
        atomic_torch_save(gpt_checkpoint(self.gpt, self.sources, epoch=self.epoch,
                                         step=self.step), self.model_dir / name)
        self.write_state()

    def _resume(self) -> None:
        found = load_resume_state(self.model_dir, STATE_FORMAT,
                                  "CLIP-GEN transformer (train_clipgen.py) state")
        if found is None:
            return
        path, state = found
        check_sources(state["gpt"]["sources"], self.sources, str(path))
        if GPTArch(**state["gpt"]["arch"]) != self.gpt.arch:
            raise CheckpointError(f"{path} holds a transformer of other sizes "
                                  f"({state['gpt']['arch']}; the config gives "
                                  f"{asdict(self.gpt.arch)}); use its config or --fresh")
        load_state_strict(self.gpt, state["gpt"]["state_dict"], f"transformer in {path}")
        self.opt.load_state_dict(state["opt"])
        load_scaler_state(self.scaler, state["scaler"])
        self._restore_progress(path, state)

    # ----------------------------------------------------------------------- one step
    def train_step(self, batch: dict) -> dict[str, float]:
        """Teacher-forced CE (+ the reconstruction term), one AdamW step at this step's
        learning rate, then one finite check (after the step is queued: no host wait
        between forward and backward)."""
        c, dev = self.cfg.CLIPGEN, self.device
        tokens = batch["tokens"].to(dev, non_blocking=True)
        emb = batch["emb"].to(dev, non_blocking=True)
        cond, drop = emb, None
        # this step's own generator: nothing to carry over a resume
        g = torch.Generator().manual_seed(
            (int(self.cfg.SEED) * 7919 + self.rank) * 1_000_003 + self.step)
        if float(c.NOISE) > 0:
            cond = lafite_noise(emb, float(c.NOISE), g)
        if float(c.CFG_DROP) > 0:  # rows trained without their condition (guidance)
            drop = (torch.rand(len(emb), generator=g) < float(c.CFG_DROP)).to(dev)
        zero = torch.zeros((), device=dev)
        with self._autocast():
            logits = self.model(tokens, cond, drop)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
            recon = (recon_loss(logits, self.vq, self.encoder, emb)
                     if self.recon_weight > 0 else zero)
            loss = ce + self.recon_weight * recon
        lr = lr_at(self.step, self.total_steps, float(c.LR), int(c.WARMUP_STEPS))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if float(c.GRAD_CLIP) > 0:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.gpt.parameters(), float(c.GRAD_CLIP))
        self.scaler.step(self.opt)
        self.scaler.update()
        stats = self.checked({"loss": loss, "ce": ce, "recon": recon})
        stats["lr"] = lr
        return stats

    # ------------------------------------------------------------------- loop hooks
    def _on_start(self) -> None:
        if self.step == 0:
            self.save_samples()

    def _after_step(self, stats: dict[str, float], bar: tqdm) -> None:
        self.log_scalars(stats, "train")
        bar.set_postfix(ce=f"{stats['ce']:.3f}", recon=f"{stats['recon']:.3f}")

    def _after_epoch(self, stats: dict[str, float], snapshot: bool) -> None:
        if self.main and stats and snapshot:
            tqdm.write(f"epoch {self.epoch}: step {self.step} " + " ".join(
                f"{k} {v:.4g}" for k, v in stats.items()))
        if snapshot:
            self.save()
            self.save_samples()

    def _after_stop(self, stats: dict[str, float]) -> None:
        self.save()
        self.save_samples()

    def _after_training(self) -> None:
        check_replicas([self.gpt], self.world)
