"""Training and evaluating CLIP-GEN's VQGAN tokenizer (docs/DESIGN.md §13) on the shared loop of
`miscc/training.py`: exact resume, atomic checkpoints, torchrun DDP, AMP on CUDA.

One step: one autoencoder forward; the reconstruction, VQ and (from DISC_START on) adaptive
adversarial losses update the autoencoder, and the same detached reconstructions train the
PatchGAN (taming's Lightning loop runs the autoencoder forward again for the discriminator).
Every RESTART_EVERY steps the codes nobody used are re-seeded from encoder outputs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from clipgen.data import TokenizerImages
from clipgen.vq_losses import (
    PatchDiscriminator,
    RealFake,
    adaptive_weight,
    hinge_d_loss,
    load_lpips,
)
from clipgen.vqgan import VQArch, VQModel, check_same_arch, read_arch
from datasets import read_split
from miscc.config import to_plain
from miscc.judge import EvalJudge, frechet_line, judge_row, to_tensor
from miscc.pictures import save_png_file
from miscc.training import (
    EpochTrainer,
    check_replicas,
    fused_options,
    inference_precision,
    load_resume_state,
    load_scaler_state,
    loader_options,
    memory_format,
    resolve_checkpoint,
    seeded_train_loader,
)
from miscc.utils import (
    atomic_torch_save,
    atomic_write_bytes,
    barrier,
    in_process_group,
    is_main_process,
    load_state_strict,
    rng_state,
)

STATE_FORMAT = "vqgan-train-state/1"
CHECKPOINT_PATTERN = "vqgan[0-9]*.pth"  # Model/vqgan<epoch>.pth (not vqgan_step_<S>.pth)


def _shard(n: int) -> torch.Tensor:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return torch.arange(rank, n, world)


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def reconstruct(vq: VQModel, data: TokenizerImages, cfg, device: torch.device,
                limit: int = 0, out_dir: Path | None = None, real_dir: Path | None = None,
                progress: bool = False) -> dict:
    """Reconstruct the first `limit` (0: all) images of `data`, shared out over processes;
    returns the mean L1 (pixels in [-1, 1]), mean per-image PSNR (dB, pixels in [0, 1]) and the
    share of codes used, all measured on the 8-bit reconstructions. With `out_dir`, each is
    written as `<out_dir>/<key>.png` (and the input crop under `real_dir`). The global RNG is
    left as it was (the loader draws a seed from it), so validating never changes training."""
    n = len(data) if limit <= 0 else min(limit, len(data))
    loader = DataLoader(Subset(data, _shard(n).tolist()), int(cfg.TRAIN.BATCH_SIZE),
                        **loader_options(cfg, device))
    sums = torch.zeros(3, dtype=torch.float64)  # L1, PSNR, images
    counts = torch.zeros(vq.arch.n_embed, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]), inference_precision(cfg, device):
        _reconstruct_into(vq, loader, device, sums, counts, out_dir, real_dir, progress)
    sums, counts = _all_sum(sums.to(device)).cpu(), _all_sum(counts.to(device)).cpu()
    images = max(int(sums[2]), 1)
    return {"l1": float(sums[0]) / images, "psnr": float(sums[1]) / images,
            "codebook_usage": float((counts > 0).double().mean()),
            "codes_used": int((counts > 0).sum()), "images": int(sums[2])}


def _reconstruct_into(vq: VQModel, loader: DataLoader, device: torch.device, sums: torch.Tensor,
                      counts: torch.Tensor, out_dir: Path | None, real_dir: Path | None,
                      progress: bool) -> None:
    was_training = vq.training
    vq.eval()
    try:
        for batch in tqdm(loader, desc="reconstructing", leave=False,
                          disable=not (progress and is_main_process())):
            x = batch["image"].to(device)
            xrec, _, idx, _ = vq(x)
            pixels = ((xrec.float().clamp(-1, 1) + 1) * 127.5).round()
            rec = pixels / 127.5 - 1.0
            err = (rec - x).abs().flatten(1).mean(1)
            mse = (((rec - x) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-10)
            sums += torch.stack([err.sum(), (-10 * torch.log10(mse)).sum(),
                                 torch.tensor(float(len(x)), device=device)]).double().cpu()
            counts += torch.bincount(idx.flatten(), minlength=vq.arch.n_embed).double().cpu()
            if out_dir is not None:
                _write_pngs(pixels, batch["key"], out_dir)
                if real_dir is not None:
                    _write_pngs((x.float() + 1) * 127.5, batch["key"], real_dir)
    finally:
        vq.train(was_training)


def _write_pngs(pixels: torch.Tensor, keys: list[str], out_dir: Path) -> None:
    array = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for pic, key in zip(array, keys, strict=True):
        save_png_file(pic, out_dir / f"{key}.png")


def save_recon_grid(x: torch.Tensor, xrec: torch.Tensor, path: Path, cell: int = 64) -> Path:
    """Inputs (top row) above their reconstructions (bottom row), each upscaled to `cell` px."""
    from miscc.pictures import save_rows

    return save_rows([x, xrec], path, cell)


def evaluate_tokenizer(cfg, device: torch.device, vq: VQModel | None = None,
                       checkpoint: str = "", progress: bool = True,
                       cfg_file: str | None = None) -> dict | None:
    """The evaluation of docs/DESIGN.md §13: reconstruct the whole test split into
    `<OUTPUT_DIR>/valid/single/<key>.png` (what fid_score.py reads for rFID; folder data also
    get the input crops in `valid/real/`) and write `<OUTPUT_DIR>/metrics.json`; rank 0
    returns (and prints) the metrics."""
    if vq is None:
        path = resolve_checkpoint(str(cfg.VQGAN.NET) or str(Path(cfg.OUTPUT_DIR) / "Model"),
                                  CHECKPOINT_PATTERN, "VQGAN checkpoint", "VQGAN.NET")
        vq = VQModel.from_checkpoint(path, expect=VQArch.from_config(cfg))
        checkpoint = str(path)
    vq = vq.to(device)
    data = TokenizerImages(cfg, "test", train=False, use_cache=False)
    out = Path(cfg.OUTPUT_DIR) / "valid"
    real = None if data.layout else out / "real"
    result = reconstruct(vq, data, cfg, device, out_dir=out / "single", real_dir=real,
                         progress=progress)
    if not is_main_process():
        barrier()
        return None
    result.update(n_embed=vq.arch.n_embed, tokens=f"{vq.arch.tokens_side}x"
                  f"{vq.arch.tokens_side}", checkpoint=checkpoint, path=str(out / "single"),
                  skipped=data.skipped)
    if data.layout:
        result.update(judge_reconstructions(cfg, out / "single"))
    metrics = Path(cfg.OUTPUT_DIR) / "metrics.json"
    atomic_write_bytes(metrics, json.dumps(result, indent=2).encode())
    rfid = (f"python fid_score.py --path {out / 'single'} {real}" if real else
            f"python fid_score.py --cfg {cfg_file or '<this config>'}")
    print(f"test split: L1 {result['l1']:.4f}, PSNR {result['psnr']:.2f} dB, codebook usage "
          f"{result['codebook_usage']:.1%} ({result['codes_used']}/{vq.arch.n_embed}) over "
          f"{result['images']} images\nwrote the reconstructions to {out / 'single'} and "
          f"{metrics}; rFID: {rfid}")
    if "judge" in result:
        print("shapes judge on the reconstructions (% showing what the picture's first caption "
              f"names): {judge_row(result['judge'])}\n{frechet_line(result['judge_fd'])}")
    barrier()
    return result


def judge_reconstructions(cfg, folder: Path) -> dict:
    """On a shapes set (see `miscc.judge.judge_path`): the judge's reading of each test
    picture's reconstruction in `folder` against the picture's first caption, which names all
    five attributes: what the tokens can carry, the ceiling of CLIP-GEN's judge scores. The
    metrics.json entries `judge`, `judge_real`, `judge_chance`; {} where no judge applies."""
    info = read_split(cfg, "test")
    judge = EvalJudge.from_config(cfg, info)
    if judge is None:
        return {}
    rows = [i for i, k in enumerate(info.keys) if (folder / f"{k}.png").is_file()]
    if not rows:
        return {}
    x = torch.stack([to_tensor(Image.open(folder / f"{info.keys[i]}.png")) for i in rows])
    return judge.metrics(torch.tensor([[i, 0] for i in rows]), judge.predict(x))


class VQGANTrainer(EpochTrainer):
    """The tokenizer's loop: Adam (0.5, 0.9) for the autoencoder and the PatchGAN, codebook
    restarts, validation + reconstruction grid per epoch, exact resume."""

    FRESH_PATTERNS = ("state_step_*.pth", "vqgan*.pth")
    FRESH_FOLDERS = ("logs", "Image", "valid")

    def __init__(self, cfg, device: torch.device, rank: int = 0, world: int = 1,
                 fresh: bool = False, progress: bool = True) -> None:
        super().__init__(cfg, device, rank, world, fresh, progress)
        v = cfg.VQGAN
        # on CPU too, unlike stage 2: the tokenizer's small convolutions ran 1.2x faster per
        # step in channels-last on 2 cores (docs/configuration.md, TRAIN.CHANNELS_LAST)
        self.memory_format = memory_format(bool(cfg.TRAIN.CHANNELS_LAST))
        # missing VGG weights end the run before anything else is built
        self.lpips = (load_lpips(str(v.VGG_WEIGHTS)).to(device)
                      if float(v.PERCEPTUAL_WEIGHT) > 0 else None)
        cache = bool(cfg.TRAIN.USE_CACHE)
        self.dataset = TokenizerImages(cfg, "train", train=True, use_cache=cache)
        self.sampler, self.loader = seeded_train_loader(self.dataset, self.batch, cfg, device,
                                                        rank, world)
        self.test = TokenizerImages(cfg, "test", train=False, use_cache=cache)

        torch.manual_seed(int(cfg.SEED))
        fmt = self.memory_format
        self.vq = VQModel.from_config(cfg).to(device, memory_format=fmt)
        self.disc = (PatchDiscriminator(int(v.DISC_LAYERS), int(v.DISC_CH)).to(
            device, memory_format=fmt) if float(v.DISC_WEIGHT) > 0 else None)
        betas, lr = (0.5, 0.9), float(v.LR)
        self.opt_ae = torch.optim.Adam(self.vq.parameters(), lr=lr, betas=betas,
                                       **fused_options(device))
        self.opt_d = (torch.optim.Adam(self.disc.parameters(), lr=lr, betas=betas,
                                       **fused_options(device)) if self.disc else None)
        self.scaler_d = torch.amp.GradScaler("cuda", enabled=self.scaler.is_enabled())
        self.model: torch.nn.Module = self.vq
        self.d_step = RealFake(self.disc) if self.disc else None
        if in_process_group():
            ids = [device.index] if self.cuda else None
            # the quantizer's usage counts are per process (summed at each restart)
            self.model = DistributedDataParallel(self.vq, device_ids=ids, broadcast_buffers=False)
            if self.d_step is not None:
                self.d_step = DistributedDataParallel(self.d_step, device_ids=ids)
        self.val: dict[str, float] = {}
        self._resume()

    # ------------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "format": STATE_FORMAT, "epoch": self.epoch, "in_epoch": self.in_epoch,
            "step": self.step, "world": self.world, "batch": self.batch,
            "vqgan": self.vq.checkpoint_state(),
            "disc": self.disc.state_dict() if self.disc else None,
            "opt_ae": self.opt_ae.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d else None,
            "scaler": self.scaler.state_dict(), "scaler_d": self.scaler_d.state_dict(),
            "rng": rng_state(), "config": to_plain(self.cfg),
        }

    def save(self) -> None:
        """Tokenizer checkpoint `vqgan<N>.pth` (N = completed epochs; `vqgan_step_<S>.pth`
        inside an epoch) + the resume state, each written atomically."""
        if not self.main:
            return
        name = f"vqgan_step_{self.step}.pth" if self.in_epoch else f"vqgan{self.epoch}.pth"
        atomic_torch_save(self.vq.checkpoint_state(epoch=self.epoch, step=self.step),
                          self.model_dir / name)
        self.write_state()

    def _resume(self) -> None:
        found = load_resume_state(self.model_dir, STATE_FORMAT, "VQGAN (train_vqgan.py) state")
        if found is None:
            return
        path, state = found
        check_same_arch(read_arch(state["vqgan"], path), self.vq.arch, str(path))
        load_state_strict(self.vq, state["vqgan"]["state_dict"], f"VQGAN in {path}")
        self.opt_ae.load_state_dict(state["opt_ae"])
        load_scaler_state(self.scaler, state["scaler"])
        if self.disc is not None:
            if state.get("disc") is None:
                warnings.warn(f"{path} has no discriminator (VQGAN.DISC_WEIGHT was 0): a new "
                              "one starts here", stacklevel=2)
            else:
                load_state_strict(self.disc, state["disc"], f"discriminator in {path}")
                self.opt_d.load_state_dict(state["opt_d"])
                load_scaler_state(self.scaler_d, state["scaler_d"])
        self._restore_progress(path, state)

    # --------------------------------------------------------------------------- one step
    def train_step(self, batch: dict) -> dict[str, float]:
        """Autoencoder losses (+ the discriminator's from DISC_START), the two optimizer
        steps, one finite check for all of them (after the steps are queued: no host wait
        between forward and backward) and, when due, the dead-code restart."""
        v, dev = self.cfg.VQGAN, self.device
        x = batch["image"].to(dev, non_blocking=True).contiguous(
            memory_format=self.memory_format)
        adversarial = self.disc is not None and self.step >= int(v.DISC_START)
        zero = torch.zeros((), device=dev)
        with self._autocast():
            xrec, vq_loss, _, qstats = self.model(x)
            l1 = (x - xrec).abs().mean()
            perceptual = self.lpips(x, xrec).mean() if self.lpips is not None else zero
            rec = l1 + float(v.PERCEPTUAL_WEIGHT) * perceptual
            g_adv = d_loss = weight = zero
            if adversarial:
                self.disc.requires_grad_(False)  # the autoencoder's term: no D gradients
                g_adv = -self.disc(xrec).mean()
                self.disc.requires_grad_(True)
        if adversarial:
            # the loss scale as a tensor (GradScaler.get_scale would be a host read)
            scale = self.scaler.scale(torch.ones((), device=dev))
            weight = adaptive_weight(rec, g_adv, self.vq.last_layer, float(v.DISC_WEIGHT),
                                     scale)
            with self._autocast():
                real, fake = self.d_step(x, xrec.detach())
                d_loss = hinge_d_loss(real, fake)
        loss = rec + float(v.CODEBOOK_WEIGHT) * vq_loss + weight * g_adv
        values = {"loss": loss, "l1": l1, "perceptual": perceptual, "vq": vq_loss,
                  "g_adv": g_adv, "d": d_loss, "adaptive_weight": weight,
                  "perplexity": qstats["perplexity"]}
        self.opt_ae.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt_ae)
        self.scaler.update()
        if adversarial:
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler_d.scale(d_loss).backward()
            self.scaler_d.step(self.opt_d)
            self.scaler_d.update()
        stats = self.checked(values)
        if bool(v.RESTART_DEAD) and (self.step + 1) % int(v.RESTART_EVERY) == 0:
            # drawn from (SEED, step), not the global RNG, whose history differs after a resume
            draw = torch.Generator().manual_seed(int(self.cfg.SEED) * 1_000_003 + self.step)
            restarted, used = self.vq.quantizer.restart_dead(qstats["z"], draw)
            stats.update(restarted=float(restarted), usage=used)
        return stats

    # ------------------------------------------------------------------------- validation
    def validate(self, grid: Path | None = None) -> dict[str, float]:
        """L1/PSNR/usage on the first VQGAN.VAL_IMAGES test images (every rank takes part);
        rank 0 draws the reconstruction grid of the first eight."""
        val = reconstruct(self.vq, self.test, self.cfg, self.device,
                          int(self.cfg.VQGAN.VAL_IMAGES))
        if grid is not None and self.main:
            x = torch.stack([self.test[i]["image"] for i in range(min(8, len(self.test)))])
            self.vq.eval()
            with torch.no_grad():
                xrec = self.vq(x.to(self.device))[0].float().cpu()
            self.vq.train()
            save_recon_grid(x, xrec, grid)
            if self.writer is not None:
                from miscc.pictures import rows_picture

                self.writer.add_image("reconstructions", np.asarray(rows_picture([x, xrec])),
                                      self.step, dataformats="HWC")
        return val

    def _validate_and_log(self) -> None:
        tag = f"step_{self.step}" if self.in_epoch else f"epoch_{self.epoch}"
        self.val = self.validate(self.image_dir / f"recon_{tag}.png")
        if self.writer is not None:
            for key in ("l1", "psnr", "codebook_usage"):
                self.writer.add_scalar(f"val/{key}", self.val[key], self.step)
            self.writer.flush()
        if self.main:
            tqdm.write(f"epoch {self.epoch} step {self.step}: test L1 {self.val['l1']:.4f}, "
                       f"PSNR {self.val['psnr']:.2f} dB, codes used "
                       f"{self.val['codebook_usage']:.1%} ({self.val['images']} images)")

    # ---------------------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Run until TRAIN.MAX_EPOCH (or TRAIN.MAX_STEPS); the summary carries the last
        validation (`val`, empty when nothing was trained)."""
        self.val = {}
        return {**super().train(), "val": self.val}

    def _after_step(self, stats: dict[str, float], bar: tqdm) -> None:
        self.log_scalars(stats, "train", force="usage" in stats)
        bar.set_postfix(l1=f"{stats['l1']:.3f}", ppl=f"{stats['perplexity']:.0f}")

    def _after_epoch(self, stats: dict[str, float], snapshot: bool) -> None:
        if snapshot:
            self._validate_and_log()
            self.save()

    def _after_stop(self, stats: dict[str, float]) -> None:
        self._validate_and_log()
        self.save()

    def _after_training(self) -> None:
        nets = [self.vq] + ([self.disc] if self.disc is not None else [])
        check_replicas(nets, self.world)

