"""Stage 2: DM-GAN training on frozen CLIP features, test-set generation, custom captions.

The CLIP text tower is frozen, so every caption's word/sentence features are computed once into
a memory-mapped cache (keyed by a hash of the encoder weights and the tokens) and read per step.
Training resumes exactly: batches come from a per-epoch permutation, each item's augmentation
is seeded by (seed, epoch, index), and the noise has its own generator saved in the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from datasets import CaptionTokenizer, DataError, TextImageDataset, image_sizes
from miscc.config import ConfigError, to_plain
from miscc.losses import (
    discriminator_loss,
    generator_adv_loss,
    kl_loss,
    nt_xent,
    sent_loss,
    words_loss,
)
from miscc.training import (
    EpochTrainer,
    finite_stats,
    load_resume_state,
    resolve_checkpoint,
    save_resume_state,
    seeded_train_loader,
    unwrap,
)
from miscc.utils import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_bytes,
    barrier,
    is_main_process,
    load_state_strict,
    rng_state,
)
from model import (
    ClipEncoder,
    Generator,
    build_discriminators,
    gan_arch,
    generator_checkpoint,
    init_gan_weights,
    load_generator,
)

STATE_FORMAT = "dmgan-train-state/1"


# ----------------------------------------------------------------------------- checkpoints
def load_frozen_encoder(cfg, device: torch.device) -> ClipEncoder:
    """The stage-1 encoder of TRAIN.NET_E (file or Model/ directory), frozen, in eval mode."""
    if cfg.TRAIN.NET_E:
        path = resolve_checkpoint(cfg.TRAIN.NET_E, "clip*.pth", "stage-1 encoder", "TRAIN.NET_E")
        encoder = ClipEncoder.from_checkpoint(path)
    else:
        warnings.warn("TRAIN.NET_E is empty: using the CLIP weights of the CLIP section without "
                      "stage-1 DAMSM fine-tuning", stacklevel=2)
        encoder = ClipEncoder.from_config(cfg)
    if encoder.embed_dim != int(cfg.TEXT.EMBEDDING_DIM):
        raise ConfigError(f"TEXT.EMBEDDING_DIM is {cfg.TEXT.EMBEDDING_DIM} but the encoder "
                          f"gives {encoder.embed_dim}-d features; set TEXT.EMBEDDING_DIM: "
                          f"{encoder.embed_dim}")
    encoder.requires_grad_(False)
    return encoder.eval().to(device)


# --------------------------------------------------------------------------- text features
class TextFeatures:
    """Word [N, C, L, D] (fp16, memory-mapped), sentence [N, C, D] and mask [N, C, L] features
    of every caption of a split, indexed by (image index, caption index)."""

    def __init__(self, words: np.ndarray, sent: np.ndarray, mask: np.ndarray) -> None:
        self.words, self.sent, self.mask = words, torch.from_numpy(sent), torch.from_numpy(mask)

    def lookup(self, index: torch.Tensor, cap: torch.Tensor) -> tuple:
        """(words [B, L, D] float32, sent [B, D], mask [B, L] bool) for the given captions."""
        i, k = index.cpu().numpy(), cap.cpu().numpy()
        words = torch.from_numpy(np.ascontiguousarray(self.words[i, k])).float()
        return words, self.sent[index, cap].float(), self.mask[index, cap]


def encoder_digest(encoder: nn.Module) -> str:
    """A hash of every encoder weight: the cache key part that names the encoder."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_root(cfg) -> Path:
    """<DATA_DIR>/cache when writable, else <OUTPUT_DIR>/cache."""
    root = Path(cfg.DATA_DIR) / "cache"
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    return Path(cfg.OUTPUT_DIR) / "cache"


@torch.no_grad()
def encode_all_captions(encoder: ClipEncoder, tokens: torch.Tensor, device: torch.device,
                        batch: int = 256, progress: bool = True) -> tuple:
    """Run the text tower over tokens [N, C, L] -> (words fp16 [N, C, L', D] numpy, sent
    float32 [N, C, D], mask bool [N, C, L']); L' = the longest caption (+SOT/EOT) in the split."""
    n, c, _ = tokens.shape
    flat = tokens.reshape(n * c, -1)
    length = int(flat.argmax(dim=1).max()) + 1
    flat = flat[:, :length]
    words = np.zeros((n * c, length, encoder.embed_dim), dtype=np.float16)
    sent = np.zeros((n * c, encoder.embed_dim), dtype=np.float32)
    mask = np.zeros((n * c, length), dtype=bool)
    for start in tqdm(range(0, n * c, batch), desc="text features", disable=not progress,
                      leave=False):
        w, s, m = encoder.encode_text(flat[start: start + batch].to(device))
        words[start: start + len(w)] = w.float().cpu().numpy()
        sent[start: start + len(w)] = s.float().cpu().numpy()
        mask[start: start + len(w)] = m.cpu().numpy()
    shape = (n, c)
    return words.reshape(*shape, length, -1), sent.reshape(*shape, -1), mask.reshape(*shape, -1)


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def text_feature_cache(cfg, split: str, tokens: torch.Tensor, encoder: ClipEncoder,
                       device: torch.device, progress: bool = True) -> TextFeatures:
    """Open (or build once, on rank 0) the feature cache of a split's captions.

    Key: hash of the encoder weights + the token ids (so WORDS_NUM, captions and image list are
    covered). Files are replaced atomically and meta.json is written last, so an interrupted
    build is simply rebuilt.
    """
    key = hashlib.sha256((encoder_digest(encoder) + split).encode()
                         + tokens.numpy().tobytes()).hexdigest()[:16]
    folder = _cache_root(cfg) / f"text_{split}_{key}"
    meta = folder / "meta.json"
    if is_main_process() and not meta.is_file():
        words, sent, mask = encode_all_captions(encoder, tokens, device, progress=progress)
        folder.mkdir(parents=True, exist_ok=True)
        _save_npy(folder / "words.npy", words)
        _save_npy(folder / "sent.npy", sent)
        _save_npy(folder / "mask.npy", mask)
        atomic_write_bytes(meta, json.dumps({"split": split, "shape": list(words.shape),
                                             "words_num": int(cfg.TEXT.WORDS_NUM)}).encode())
    barrier()
    return TextFeatures(np.load(folder / "words.npy", mmap_mode="r"),
                        np.load(folder / "sent.npy"), np.load(folder / "mask.npy"))


# ---------------------------------------------------------------------------------- trainer
class GANTrainer(EpochTrainer):
    """DM-GAN training loop (DESIGN §6, §8): D per scale, then G with adversarial + DAMSM + KL +
    contrastive losses, generator EMA, snapshots, exact resume."""

    FRESH_PATTERNS = ("state_step_*.pth", "netG_*.pth")
    FRESH_FOLDERS = ("logs",)  # the sample grids in Image/ stay

    def __init__(self, cfg, device: torch.device, rank: int = 0, world: int = 1,
                 fresh: bool = False, progress: bool = True) -> None:
        super().__init__(cfg, device, rank, world, fresh, progress)
        self.channels_last = bool(cfg.TRAIN.CHANNELS_LAST) and self.cuda

        self.encoder = load_frozen_encoder(cfg, device)
        tokenizer = CaptionTokenizer(int(cfg.TEXT.WORDS_NUM))
        self.dataset = TextImageDataset(cfg, "train", tokenizer, image_sizes(cfg), views=1,
                                        train=True, use_cache=bool(cfg.TRAIN.USE_CACHE))
        self.sampler, self.loader = seeded_train_loader(self.dataset, self.batch, cfg, device,
                                                        rank, world)
        self.text = (text_feature_cache(cfg, "train", self.dataset.tokens, self.encoder, device,
                                        self.progress) if cfg.TRAIN.TEXT_CACHE else None)

        self.arch = gan_arch(cfg, self.encoder.embed_dim)
        torch.manual_seed(int(cfg.SEED))
        netG = Generator(self.arch)
        init_gan_weights(netG)
        netDs = build_discriminators(self.arch) if cfg.TRAIN.B_NET_D else nn.ModuleList()
        init_gan_weights(netDs)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        netG, netDs = netG.to(device, memory_format=fmt), netDs.to(device, memory_format=fmt)
        if cfg.TRAIN.NET_G:  # start from given generator weights (a fresh run only)
            load_generator(netG, resolve_checkpoint(cfg.TRAIN.NET_G, "netG_epoch_*.pth",
                                                    "generator checkpoint", "TRAIN.NET_G"))
        self.ema = copy.deepcopy(netG).eval().requires_grad_(False)
        betas = (0.5, 0.999)
        self.optG = torch.optim.Adam(netG.parameters(), lr=cfg.TRAIN.GENERATOR_LR, betas=betas)
        self.optDs = [torch.optim.Adam(d.parameters(), lr=cfg.TRAIN.DISCRIMINATOR_LR,
                                       betas=betas) for d in netDs]
        if world > 1:
            ids = [device.index] if self.cuda else None
            # without discriminators only the largest image head is trained
            netG = DistributedDataParallel(netG, device_ids=ids,
                                           find_unused_parameters=not cfg.TRAIN.B_NET_D)
            netDs = [DistributedDataParallel(d, device_ids=ids) for d in netDs]
        self.netG, self.netDs = netG, list(netDs)
        self.noise = torch.Generator().manual_seed(int(cfg.SEED) * 7919 + rank)
        self._resume()
        self._setup_samples(tokenizer)

    # ------------------------------------------------------------------ setup helpers
    def _setup_samples(self, tokenizer: CaptionTokenizer) -> None:
        """Fixed captions (spread over the test split) and fixed noise for the sample grids."""
        from datasets import read_split

        try:
            caps = read_split(self.cfg, "test").captions
        except DataError:
            caps = self.dataset.info.captions
        picks = np.linspace(0, len(caps) - 1, num=min(16, len(caps))).round().astype(int)
        self.sample_captions = [caps[i][0] for i in picks]
        with torch.no_grad():
            words, sent, mask = self.encoder.encode_text(
                tokenizer(self.sample_captions).to(self.device))
        self.sample_text = (words.float(), sent.float(), mask)
        g = torch.Generator().manual_seed(int(self.cfg.SEED))
        n = len(self.sample_captions)
        self.sample_z = torch.randn(n, self.arch["Z_DIM"], generator=g).to(self.device)
        self.sample_eps = torch.randn(n, self.arch["CONDITION_DIM"], generator=g).to(self.device)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "format": STATE_FORMAT, "epoch": self.epoch, "in_epoch": self.in_epoch,
            "step": self.step, "arch": dict(self.arch),
            "netG": unwrap(self.netG).state_dict(), "ema": self.ema.state_dict(),
            "netDs": [unwrap(d).state_dict() for d in self.netDs],
            "optG": self.optG.state_dict(), "optDs": [o.state_dict() for o in self.optDs],
            "scaler": self.scaler.state_dict(), "noise": self.noise.get_state(),
            "rng": rng_state(), "config": to_plain(self.cfg),
        }

    def save(self) -> None:
        """Write the EMA generator (netG_epoch_<N>.pth, N = completed epochs; netG_step_<S>.pth
        when stopping inside an epoch) and the full resume state (state_step_<S>.pth),
        atomically; keep the newest KEEP_STATES states."""
        if not self.main:
            return
        name = f"netG_step_{self.step}.pth" if self.in_epoch else f"netG_epoch_{self.epoch}.pth"
        atomic_torch_save(generator_checkpoint(self.ema), self.model_dir / name)
        save_resume_state(self.model_dir, self._state(), self.step)

    def _resume(self) -> None:
        found = load_resume_state(self.model_dir, STATE_FORMAT, "stage-2 training state")
        if found is None:
            return
        path, state = found
        load_state_strict(unwrap(self.netG), state["netG"], f"generator in {path}")
        load_state_strict(self.ema, state["ema"], f"EMA generator in {path}")
        if len(state["netDs"]) != len(self.netDs):
            raise CheckpointError(f"{path} holds {len(state['netDs'])} discriminators, this "
                                  f"config has {len(self.netDs)} (TREE.BRANCH_NUM, B_NET_D)")
        for i, (d, opt) in enumerate(zip(self.netDs, self.optDs, strict=True)):
            load_state_strict(unwrap(d), state["netDs"][i], f"discriminator {i} in {path}")
            opt.load_state_dict(state["optDs"][i])
        self.optG.load_state_dict(state["optG"])
        self.scaler.load_state_dict(state["scaler"])
        self.noise.set_state(state["noise"])
        self._restore_progress(path, state)

    # ----------------------------------------------------------------------- one step
    def _text(self, batch: dict) -> tuple:
        """Features of both captions of every image, stacked: first captions, then seconds."""
        cap = batch["cap_idx"]
        if self.text is not None:
            index = batch["index"].repeat(2)
            w, s, m = self.text.lookup(index, torch.cat([cap[:, 0], cap[:, 1]]))
        else:  # the baseline: run the frozen text tower every step
            tokens = torch.cat([batch["tokens"][:, 0], batch["tokens"][:, 1]]).to(self.device)
            with torch.no_grad(), self._autocast():
                w, s, m = self.encoder.encode_text(tokens)
            w, s = w.float(), s.float()
        return w.to(self.device), s.to(self.device), m.to(self.device)

    def train_step(self, batch: dict) -> dict[str, float]:
        """One D update per scale, then one G update; returns the loss values (averaged over
        processes). The values reach the host once, at the end of the step."""
        cfg, dev = self.cfg, self.device
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        reals = [x[:, 0].to(dev, non_blocking=True, memory_format=fmt) for x in batch["imgs"]]
        b = reals[0].shape[0]
        words, sent, mask = self._text(batch)
        class_ids = batch["class_id"].repeat(2).to(dev)
        z = torch.randn(2 * b, self.arch["Z_DIM"], generator=self.noise).to(dev)
        eps = torch.randn(2 * b, self.arch["CONDITION_DIM"], generator=self.noise).to(dev)
        with self._autocast():
            fakes, mu, logvar = self.netG(z, sent, words, mask, eps)
        values: dict[str, torch.Tensor] = {}

        # discriminators: real (first caption), wrong (real with another image's caption), fake
        d_losses = []
        for i, netD in enumerate(self.netDs):
            with self._autocast():
                ru, rc, wc = netD(reals[i], sent[:b], sent[:b].roll(1, dims=0))
                fu, fc, _ = netD(fakes[i].detach(), sent)
                loss = discriminator_loss(ru, rc, fu, fc, wc)
            d_losses.append(loss)
            values[f"D{i}"] = loss
        for loss, opt in zip(d_losses, self.optDs, strict=True):
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)

        # generator
        for netD in self.netDs:
            unwrap(netD).requires_grad_(False)
        with self._autocast():
            adv = torch.zeros((), device=dev)
            for i, netD in enumerate(self.netDs):
                fu, fc, _ = unwrap(netD)(fakes[i], sent)
                adv = adv + generator_adv_loss(fu, fc)
            regions, code = self.encoder.encode_image(fakes[-1])
            sm = cfg.TRAIN.SMOOTH
            w0, w1, _ = words_loss(words, mask, regions, class_ids, sm.GAMMA1, sm.GAMMA2,
                                   sm.GAMMA3, attngan_score=sm.ATTNGAN_SCORE)
            s0, s1 = sent_loss(code, sent, class_ids, sm.GAMMA3)
            damsm = (w0 + w1 + s0 + s1) * sm.LAMBDA
            kl = kl_loss(mu.float(), logvar.float())
            contrastive = nt_xent(code[:b], code[b:], cfg.TRAIN.TEMPERATURE) \
                * cfg.TRAIN.CONTRASTIVE_WEIGHT
            g_loss = adv + damsm + kl + contrastive
        for netD in self.netDs:
            unwrap(netD).requires_grad_(True)
        values.update(G=g_loss, G_adv=adv, DAMSM_words=w0 + w1, DAMSM_sent=s0 + s1, KL=kl,
                      contrastive=contrastive)
        self.optG.zero_grad(set_to_none=True)
        self.scaler.scale(g_loss).backward()
        self.scaler.step(self.optG)
        self.scaler.update()
        self._update_ema()
        return finite_stats(values, self.step, self.model_dir)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema = decay·ema + (1-decay)·G, with decay warmed up as min(EMA_DECAY, (1+n)/(10+n))
        (n = steps so far) so that early snapshots are not dominated by the initial weights."""
        decay = min(float(self.cfg.TRAIN.EMA_DECAY), (1 + self.step) / (10 + self.step))
        src = unwrap(self.netG)
        torch._foreach_lerp_(list(self.ema.parameters()), list(src.parameters()), 1.0 - decay)
        for e, s in zip(self.ema.buffers(), src.buffers(), strict=True):
            e.copy_(s)

    # ------------------------------------------------------------------------- outputs
    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """Fixed-noise grid of the EMA generator's largest images with their captions."""
        if not self.main:
            return None
        from miscc.pictures import caption_grid, save_caption_grid

        words, sent, mask = self.sample_text
        with self._autocast():
            images = self.ema(self.sample_z, sent, words, mask, self.sample_eps)[0][-1]
        name = f"G_step_{self.step}.png" if self.in_epoch else f"G_epoch_{self.epoch}.png"
        path = self.image_dir / name
        save_caption_grid(images.float(), self.sample_captions, path)
        if self.writer is not None:
            grid = np.asarray(caption_grid(images.float(), self.sample_captions))
            self.writer.add_image("samples", grid, self.step, dataformats="HWC")
        return path

    # ------------------------------------------------------------------- loop hooks
    def _on_start(self) -> None:
        if self.step == 0:
            self.save_samples()

    def _after_step(self, stats: dict[str, float], bar: tqdm) -> None:
        if self.writer is not None and self.step % 10 == 0:
            for k, v in stats.items():
                self.writer.add_scalar(f"loss/{k}", v, self.step)
        d_sum = sum(stats[f"D{i}"] for i in range(len(self.netDs)))
        bar.set_postfix(D=f"{d_sum:.3f}", G=f"{stats['G']:.3f}")

    def _after_epoch(self, stats: dict[str, float], snapshot: bool) -> None:
        if self.main and stats:
            tqdm.write(f"epoch {self.epoch}: step {self.step} " + " ".join(
                f"{k} {v:.3f}" for k, v in stats.items()))
        if snapshot:
            self.save()
            self.save_samples()

    def _after_stop(self, stats: dict[str, float]) -> None:
        self.save()
        self.save_samples()

    def _after_training(self) -> None:
        self._check_replicas()

    def _check_replicas(self) -> None:
        """Under torchrun, fail loudly if the processes' weights have drifted apart."""
        barrier()
        if self.world <= 1:
            return
        nets = [unwrap(self.netG), *[unwrap(d) for d in self.netDs]]
        total = torch.stack([p.detach().double().sum() for n in nets for p in n.parameters()])
        gathered = [torch.zeros_like(total) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, total)
        if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
            raise RuntimeError("distributed replicas hold different weights after training")

