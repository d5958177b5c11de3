"""Stage 2: DM-GAN training on frozen CLIP features, test-set generation, custom captions.

The CLIP text tower is frozen, so every caption's word/sentence features are computed once into
a memory-mapped cache (keyed by a hash of the encoder weights and the tokens) and read per step.
Training resumes exactly: batches come from a per-epoch permutation, each item's augmentation
is seeded by (seed, epoch, index), and each step's noise by (seed, rank, step), so a resumed
process draws what the uninterrupted one would have drawn, on every rank.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from datasets import CaptionTokenizer, DataError, TextImageDataset, image_sizes
from miscc.config import ConfigError, to_plain
from miscc.losses import (
    discriminator_loss,
    generator_adv_loss,
    kl_loss,
    matching_aware_gp,
    minimal_pair_loss,
    mode_seeking_loss,
    negative_loss,
    nt_xent,
    sent_loss,
    words_loss,
)
from miscc.minimal_pairs import check_word_lists, word_lists_for
from miscc.training import (
    EpochTrainer,
    check_replicas,
    damsm_class_ids,
    fused_options,
    inference_precision,
    load_resume_state,
    load_scaler_state,
    memory_format,
    resolve_checkpoint,
    seeded_train_loader,
    unwrap,
)
from miscc.utils import (
    CheckpointError,
    atomic_torch_save,
    in_process_group,
    load_state_strict,
    rng_state,
)
from model import (
    Generator,
    build_discriminators,
    gan_arch,
    generator_checkpoint,
    init_gan_weights,
    load_generator,
)
from text_features import edit_feature_cache, load_frozen_encoder, text_feature_cache

STATE_FORMAT = "dmgan-train-state/2"  # /2: released DM-GAN networks (model.GENERATOR_FORMAT)


# --------------------------------------------------------------------------- learning rates
def lr_factor(step: int, total: int, decay_start: float) -> float:
    """1 before `decay_start`·total steps, then falling linearly to 0 at step `total` (the
    second-half decay of pix2pix/CycleGAN); `decay_start` ≥ 1 keeps the rate constant."""
    begin = decay_start * total
    if decay_start >= 1.0 or step < begin:
        return 1.0
    return max(0.0, (total - step) / max(total - begin, 1.0))


def text_terms_factor(step: int, total: int, ramp: float) -> float:
    """The weight of G's text-matching terms at `step`: rising linearly from 0 to 1 over the
    first `ramp`·total steps (so the adversarial terms alone shape the first pictures), then 1;
    `ramp` 0 keeps it at 1 throughout, as released."""
    if ramp <= 0.0:
        return 1.0
    return min(1.0, step / max(ramp * total, 1.0))


# ---------------------------------------------------------------------------- minimal pairs
def minimal_pair_wrong(wrong: torch.Tensor, edits: torch.Tensor, mask: torch.Tensor,
                       share: float, generator: torch.Generator) -> torch.Tensor:
    """D's mismatched sentences [N, D] with a `share` of the rows (each independently, drawn
    from `generator`) replaced by one of their own caption's edits (edits [N, K, D], mask
    [N, K]; uniform over the real ones): the same real image, its caption changed in one place
    (docs/DESIGN.md §14). Rows without a real edit keep the other image's caption."""
    n, k = mask.shape
    take = (torch.rand(n, generator=generator) < share).to(mask.device) & mask.any(1)
    # uniform over the real edits: the largest of uniform keys among the allowed slots
    keys = torch.rand(n, k, generator=generator).to(mask.device).masked_fill(~mask, -1.0)
    choice = keys.argmax(1)
    picked = edits[torch.arange(n, device=edits.device), choice].to(wrong.dtype)
    return torch.where(take[:, None], picked, wrong)


# ---------------------------------------------------------- negative augmentation
def contradicting_attributes(cfg) -> tuple[str, ...]:
    """The attributes D's contradicting pictures change (TRAIN.D_NEGATIVE_PICTURE_ATTRIBUTES),
    or () when TRAIN.D_NEGATIVE_PICTURES is off."""
    weight = float(cfg.TRAIN.D_NEGATIVE_PICTURES)
    if weight < 0:
        raise ConfigError(f"TRAIN.D_NEGATIVE_PICTURES is {weight}: expected a weight >= 0 "
                          "(0 = off)")
    if weight == 0:
        return ()
    count = int(cfg.TRAIN.D_NEGATIVE_PICTURE_COUNT)
    if count < 1:
        raise ConfigError(f"TRAIN.D_NEGATIVE_PICTURE_COUNT is {count}: expected at least 1 "
                          "picture per item")
    names = tuple(a.strip() for a in str(cfg.TRAIN.D_NEGATIVE_PICTURE_ATTRIBUTES).split(",")
                  if a.strip())
    if not names:
        raise ConfigError("TRAIN.D_NEGATIVE_PICTURE_ATTRIBUTES is empty: expected attributes "
                          "to change, e.g. shape,size")
    return names


def gaussian_blurs(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image [B, C, H, W] blurred by a Gaussian of its own sigma [B] (pixels; separable,
    reflect-padded, kernel radius 3·max sigma)."""
    b, c, h, w = images.shape
    radius = max(1, min(int(torch.ceil(3 * sigma.max())), min(h, w) - 1))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (taps[None] / sigma.to(images.device, torch.float32)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0).to(images.dtype)
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"),
                 kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"),
                 kernel[:, None, :, None], groups=b * c)
    return x.view(b, c, h, w)


# ---------------------------------------------------------------------------------- trainer
class GANTrainer(EpochTrainer):
    """DM-GAN training loop (docs/DESIGN.md §8; the losses: §6): D per scale, then G with
    adversarial + DAMSM + KL + contrastive losses, generator EMA, snapshots, exact resume."""

    FRESH_PATTERNS = ("state_step_*.pth", "netG_*.pth")
    FRESH_FOLDERS = ("logs",)  # the sample grids in Image/ stay

    def __init__(self, cfg, device: torch.device, rank: int = 0, world: int = 1,
                 fresh: bool = False, progress: bool = True) -> None:
        super().__init__(cfg, device, rank, world, fresh, progress)
        self.memory_format = memory_format(bool(cfg.TRAIN.CHANNELS_LAST) and self.cuda)
        sigma = list(cfg.TRAIN.D_BLUR_SIGMA)
        blur = float(cfg.TRAIN.D_BLUR_WEIGHT) > 0
        if blur and not (len(sigma) == 2 and 0 < sigma[0] <= sigma[1]):
            raise ConfigError(f"TRAIN.D_BLUR_SIGMA is {sigma}: expected [low, high] blur sigmas "
                              "in pixels, 0 < low <= high")
        share = float(cfg.TRAIN.MODE_SEEKING_SHARE)
        if float(cfg.TRAIN.MODE_SEEKING_WEIGHT) > 0 and not 0.0 < share <= 1.0:
            raise ConfigError(f"TRAIN.MODE_SEEKING_SHARE is {share}: expected the share of each "
                              "batch drawn twice, in (0, 1]")
        if not 0.0 <= float(cfg.TRAIN.TEXT_RAMP) <= 1.0:
            raise ConfigError(f"TRAIN.TEXT_RAMP is {cfg.TRAIN.TEXT_RAMP}: expected a fraction of "
                              "the training in [0, 1] (0 = the text terms at full weight)")
        if int(cfg.TRAIN.EMA_BN_BATCHES) < 0:
            raise ConfigError(f"TRAIN.EMA_BN_BATCHES is {cfg.TRAIN.EMA_BN_BATCHES}: expected a "
                              "number of batches >= 0 (0 = the EMA keeps G's statistics)")
        decay = float(cfg.TRAIN.LR_DECAY_START)
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"TRAIN.LR_DECAY_START is {decay}: expected a fraction of the "
                              "training in [0, 1] (1 = constant learning rates)")

        self.encoder = load_frozen_encoder(cfg, device)
        tokenizer = CaptionTokenizer(int(cfg.TEXT.WORDS_NUM))
        self.dataset = TextImageDataset(cfg, "train", tokenizer, image_sizes(cfg), views=1,
                                        train=True, use_cache=bool(cfg.TRAIN.USE_CACHE),
                                        contradicting=contradicting_attributes(cfg),
                                        contradicting_count=int(cfg.TRAIN.D_NEGATIVE_PICTURE_COUNT))
        self.sampler, self.loader = seeded_train_loader(self.dataset, self.batch, cfg, device,
                                                        rank, world)
        self.text = (text_feature_cache(cfg, "train", self.dataset.tokens, self.encoder, device,
                                        self.progress) if cfg.TRAIN.TEXT_CACHE else None)

        self.edits = self._edit_features(tokenizer)
        self.arch = gan_arch(cfg, self.encoder.embed_dim)
        torch.manual_seed(int(cfg.SEED))
        netG = Generator(self.arch)
        init_gan_weights(netG)
        netDs = build_discriminators(self.arch) if cfg.TRAIN.B_NET_D else nn.ModuleList()
        init_gan_weights(netDs)
        fmt = self.memory_format
        netG, netDs = netG.to(device, memory_format=fmt), netDs.to(device, memory_format=fmt)
        self.ema = copy.deepcopy(netG).eval().requires_grad_(False)
        betas = (0.5, 0.999)
        fused = fused_options(device)
        self.optG = torch.optim.Adam(netG.parameters(), lr=cfg.TRAIN.GENERATOR_LR, betas=betas,
                                     **fused)
        self.optDs = [torch.optim.Adam(d.parameters(), lr=cfg.TRAIN.DISCRIMINATOR_LR,
                                       betas=betas, **fused) for d in netDs]
        if in_process_group():
            ids = [device.index] if self.cuda else None
            # without discriminators only the largest image head is trained
            netG = DistributedDataParallel(netG, device_ids=ids,
                                           find_unused_parameters=not cfg.TRAIN.B_NET_D)
            netDs = [DistributedDataParallel(d, device_ids=ids) for d in netDs]
        self.netG, self.netDs = netG, list(netDs)
        if not self._resume() and cfg.TRAIN.NET_G:
            self._warm_start(cfg.TRAIN.NET_G)
        self._setup_samples(tokenizer)

    # ------------------------------------------------------------------ setup helpers
    def _edit_features(self, tokenizer: CaptionTokenizer):
        """The cached sentence features of every training caption's one-edit variants when
        TRAIN.D_MINIMAL_PAIRS or G_MINIMAL_PAIR_WEIGHT asks for them (docs/DESIGN.md §14)."""
        t = self.cfg.TRAIN
        share, weight = float(t.D_MINIMAL_PAIRS), float(t.G_MINIMAL_PAIR_WEIGHT)
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"TRAIN.D_MINIMAL_PAIRS is {share}: expected a share in [0, 1]")
        if share == 0.0 and weight == 0.0:
            return None
        lists = word_lists_for(self.cfg)
        if lists is None:
            raise ConfigError("TRAIN.D_MINIMAL_PAIRS / G_MINIMAL_PAIR_WEIGHT edit captions: "
                              "set TEXT.WORD_LISTS (a stem of cfg/words/, e.g. shapes)")
        check_word_lists(lists, self.dataset.info.captions, self.cfg)
        if int(t.MINIMAL_PAIR_EDITS) < 1:
            raise ConfigError(f"TRAIN.MINIMAL_PAIR_EDITS is {t.MINIMAL_PAIR_EDITS}: expected "
                              f"at least 1 edit per caption")
        return edit_feature_cache(self.cfg, "train", self.dataset.info.captions, tokenizer,
                                  lists, int(t.MINIMAL_PAIR_EDITS), self.encoder, self.device,
                                  progress=self.progress)

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
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(), "config": to_plain(self.cfg),
        }

    def save(self) -> None:
        """Write the EMA generator (netG_epoch_<N>.pth, N = completed epochs; netG_step_<S>.pth
        when stopping inside an epoch) and the full resume state (state_step_<S>.pth),
        atomically; keep the newest KEEP_STATES states."""
        if not self.main:
            return
        name = f"netG_step_{self.step}.pth" if self.in_epoch else f"netG_epoch_{self.epoch}.pth"
        self.recompute_ema_statistics()
        atomic_torch_save(generator_checkpoint(self.ema), self.model_dir / name)
        self.write_state()

    @torch.no_grad()
    def recompute_ema_statistics(self) -> None:
        """TRAIN.EMA_BN_BATCHES = n > 0: the EMA generator's batch-norm statistics become the
        plain average of its own batch statistics over n batches of 2·BATCH_SIZE training
        captions with seeded noise (BigGAN's standing statistics). Its averaged weights are
        then evaluated with their own activations' statistics, not the current G's, which
        `_update_ema` copies; training is unchanged (docs/DESIGN.md §8)."""
        n = int(self.cfg.TRAIN.EMA_BN_BATCHES)
        norms = [m for m in self.ema.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if n == 0 or not norms:
            return
        g = torch.Generator().manual_seed(int(self.cfg.SEED) + 7_777)  # the same draws every save
        rows, momenta = 2 * self.batch, [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the passes below
        self.ema.train()
        for _ in range(n):
            index = torch.randint(len(self.dataset), (rows,), generator=g)
            cap = (torch.rand(rows, generator=g) * self.dataset.num_captions[index]).long()
            words, sent, mask = self._caption_features(index, cap)
            z = torch.randn(rows, self.arch["Z_DIM"], generator=g).to(self.device)
            eps = torch.randn(rows, self.arch["CONDITION_DIM"], generator=g).to(self.device)
            with self._autocast():
                self.ema(z, sent, words, mask, eps)
        self.ema.eval()
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum

    def _warm_start(self, net_g: str) -> None:
        """A fresh run starts G (and its EMA) from the generator of TRAIN.NET_G; a resumed run
        never reads it (the file may be gone by then)."""
        path = resolve_checkpoint(net_g, "netG_epoch_*.pth", "generator checkpoint",
                                  "TRAIN.NET_G")
        load_generator(unwrap(self.netG), path)
        self.ema.load_state_dict(unwrap(self.netG).state_dict())

    def _resume(self) -> bool:
        """Restore the newest resume state of Model/, if any; returns whether one was found."""
        found = load_resume_state(self.model_dir, STATE_FORMAT, "stage-2 training state")
        if found is None:
            return False
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
        load_scaler_state(self.scaler, state["scaler"])
        self._restore_progress(path, state)
        return True

    # ----------------------------------------------------------------------- one step
    def _text(self, batch: dict) -> tuple:
        """Features of both captions of every image, stacked: first captions, then seconds."""
        cap = batch["cap_idx"]
        return self._caption_features(batch["index"].repeat(2),
                                      torch.cat([cap[:, 0], cap[:, 1]]))

    def _caption_features(self, index: torch.Tensor, cap: torch.Tensor) -> tuple:
        """(words, sent, mask) of caption `cap` of training item `index`, row by row."""
        if self.text is not None:
            w, s, m = self.text.lookup(index, cap)
        else:  # the baseline: run the frozen text tower every step, in the cache's precision
            tokens = self.dataset.tokens[index, cap].to(self.device)
            with torch.no_grad(), inference_precision(self.cfg, self.device):
                w, s, m = self.encoder.encode_text(tokens)
            w, s = w.float(), s.float()
        return w.to(self.device), s.to(self.device), m.to(self.device)

    def train_step(self, batch: dict) -> dict[str, float]:
        """One D update per scale, then one G update, as DM-GAN+CL does them (docs/DESIGN.md
        §8): both captions of every image are drawn with the same noise z; each D sees the real,
        wrong and fake pair of both captions; G's loss is the sum of both captions' adversarial,
        DAMSM and KL losses plus CONTRASTIVE_WEIGHT · NT-Xent between the two fake batches'
        CLIP codes. Returns the loss values (averaged over processes), read once per step."""
        cfg, dev = self.cfg, self.device
        self._set_learning_rates()
        reals = [x[:, 0].to(dev, non_blocking=True, memory_format=self.memory_format)
                 for x in batch["imgs"]]
        b = reals[0].shape[0]
        halves = (slice(0, b), slice(b, 2 * b))  # caption 1 of every image, then caption 2
        words, sent, mask = self._text(batch)
        class_ids = damsm_class_ids(cfg, batch, dev)
        # this step's own generator: no state to carry over a resume (one saved from rank 0
        # would give every rank rank 0's noise after a resume under torchrun)
        noise = torch.Generator().manual_seed(
            (int(self.cfg.SEED) * 7919 + self.rank) * 1_000_003 + self.step)
        z = torch.randn(b, self.arch["Z_DIM"], generator=noise).repeat(2, 1).to(dev)
        eps = torch.randn(2 * b, self.arch["CONDITION_DIM"], generator=noise).to(dev)
        ms_weight = float(cfg.TRAIN.MODE_SEEKING_WEIGHT)
        m = max(1, round(float(cfg.TRAIN.MODE_SEEKING_SHARE) * b)) if ms_weight > 0 else 0
        # the first m captions again with fresh noise (mode seeking), in the same pass (one BN
        # batch); with m = 0 the pass is the 2B rows alone
        z_ms = torch.randn(m, self.arch["Z_DIM"], generator=noise).to(dev) if m else z[:0]
        inputs = (torch.cat([z, z_ms]), *(torch.cat([t, t[:m]]) for t in (sent, words, mask, eps)))
        with self._autocast():
            drawn, mu, logvar = self.netG(*inputs)
        fakes, redrawn = [f[:2 * b] for f in drawn], drawn[-1][2 * b:]
        mu, logvar = mu[:2 * b], logvar[:2 * b]
        wrong = torch.cat([sent[h].roll(1, dims=0) for h in halves])  # another image's caption
        if self.edits is not None:
            cap = batch["cap_idx"]
            edit_sent, edit_mask = (t.to(dev) for t in self.edits.lookup(
                batch["index"].repeat(2), torch.cat([cap[:, 0], cap[:, 1]])))
            if float(cfg.TRAIN.D_MINIMAL_PAIRS) > 0:
                wrong = minimal_pair_wrong(wrong, edit_sent, edit_mask,
                                           float(cfg.TRAIN.D_MINIMAL_PAIRS), noise)
        values: dict[str, torch.Tensor] = {}

        # discriminators: the real image with both its captions and with two wrong ones; fakes
        kind, magp = str(cfg.TRAIN.GAN_LOSS), float(cfg.TRAIN.MAGP_WEIGHT)
        blur_weight, blurred = float(cfg.TRAIN.D_BLUR_WEIGHT), []
        if blur_weight > 0:  # negative augmentation: sigma per image, from the step's noise
            low, high = (float(v) for v in cfg.TRAIN.D_BLUR_SIGMA)
            sigma = low + (high - low) * torch.rand(b, generator=noise)
            biggest = reals[-1].shape[-1]
            blurred = [gaussian_blurs(x, sigma * x.shape[-1] / biggest) for x in reals]
        contra_weight = float(cfg.TRAIN.D_NEGATIVE_PICTURES)
        if contra_weight > 0:  # the caption each contradicting picture was made against
            # [B, N, 3, s, s] -> [B·N, 3, s, s], item by item; each row's sentence and mask alike
            contra = [x.flatten(0, 1).to(dev, non_blocking=True, memory_format=self.memory_format)
                      for x in batch["contra_imgs"]]
            n_pictures = batch["contra_mask"].shape[1]
            contra_rows = (batch["contra_cap"].to(dev) * b + torch.arange(b, device=dev)
                           ).repeat_interleave(n_pictures)
            contra_keep = batch["contra_mask"].to(dev).flatten()
            contra_any = bool(contra_keep.any())  # once per step, not per D
        d_losses, penalties = [], []
        for i, netD in enumerate(self.netDs):
            real, matched, first = reals[i], sent, None
            if magp > 0:  # leaves for the gradient penalty: the images and their first captions
                real = real.detach().requires_grad_()
                first = sent[halves[0]].detach().requires_grad_()
                matched = torch.cat([first, sent[halves[1]]])
            with self._autocast():
                ru, rc, wc = netD(real, matched, wrong)
                fu, fc, _ = netD(fakes[i].detach(), sent)
                loss = sum(discriminator_loss(ru, rc[h], fu[h], fc[h], wc[h], kind)
                           for h in halves)
            if magp > 0:  # on each image with its first caption (DF-GAN: one per image)
                penalty = matching_aware_gp(rc[halves[0]], real, first,
                                            float(cfg.TRAIN.MAGP_POWER))
                loss = loss + magp * penalty
                penalties.append(penalty)
            if contra_weight > 0:  # pictures a caption does not describe, with that caption
                with self._autocast():
                    _, cc, _ = netD(contra[i], sent[contra_rows])
                    contra_loss = (negative_loss([cc[contra_keep]], kind) if contra_any
                                   else cc.sum() * 0)
                loss = loss + contra_weight * contra_loss
                values[f"D{i}_pictures"] = contra_loss
            if blur_weight > 0:  # the real images blurred: fakes to D, with their captions
                with self._autocast():
                    bu, bc, _ = netD(blurred[i], sent)
                    blur_loss = sum(negative_loss([bu, bc[h]], kind) for h in halves)
                loss = loss + blur_weight * blur_loss
                values[f"D{i}_blur"] = blur_loss
            d_losses.append(loss)
            values[f"D{i}"] = loss
        if penalties:
            values["MA_GP"] = torch.stack(penalties).sum()
        for loss, opt in zip(d_losses, self.optDs, strict=True):
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)

        # generator: the sum of both captions' losses + the contrastive term
        for netD in self.netDs:
            unwrap(netD).requires_grad_(False)
        sm = cfg.TRAIN.SMOOTH
        with self._autocast():
            adv = torch.zeros((), device=dev)
            for i, netD in enumerate(self.netDs):
                fu, fc, _ = unwrap(netD)(fakes[i], sent)
                adv = adv + sum(generator_adv_loss(fu[h], fc[h], kind) for h in halves)
            regions, code = self.encoder.encode_image(fakes[-1])
            words_total = sent_total = kl = pairs = torch.zeros((), device=dev)
            for h in halves:
                w0, w1, _ = words_loss(words[h], mask[h], regions[h], class_ids, sm.GAMMA1,
                                       sm.GAMMA2, sm.GAMMA3, attngan_score=sm.ATTNGAN_SCORE,
                                       similarity=sm.SIMILARITY)
                s0, s1 = sent_loss(code[h], sent[h], class_ids, sm.GAMMA3)
                if float(cfg.TRAIN.G_MINIMAL_PAIR_WEIGHT) > 0:
                    pairs = pairs + minimal_pair_loss(code[h], sent[h], edit_sent[h],
                                                      edit_mask[h], sm.GAMMA3)
                words_total = words_total + w0 + w1
                sent_total = sent_total + s0 + s1
                kl = kl + kl_loss(mu[h].float(), logvar[h].float())
            damsm = (words_total + sent_total) * sm.LAMBDA
            contrastive = nt_xent(code[:b], code[b:], cfg.TRAIN.TEMPERATURE) \
                * cfg.TRAIN.CONTRASTIVE_WEIGHT
            ramp = text_terms_factor(self.step, self.total_steps, float(cfg.TRAIN.TEXT_RAMP))
            g_loss = adv + kl + ramp * (damsm + contrastive
                                        + pairs * float(cfg.TRAIN.G_MINIMAL_PAIR_WEIGHT))
            if m:
                seeking = mode_seeking_loss(fakes[-1][:m], redrawn, z[:m], z_ms)
                g_loss = g_loss + ms_weight * seeking
                values["G_mode_seeking"] = seeking
        for netD in self.netDs:
            unwrap(netD).requires_grad_(True)
        values.update(G=g_loss, G_adv=adv, DAMSM_words=words_total, DAMSM_sent=sent_total, KL=kl,
                      contrastive=contrastive)
        if float(cfg.TRAIN.G_MINIMAL_PAIR_WEIGHT) > 0:
            values["G_pairs"] = pairs
        self.optG.zero_grad(set_to_none=True)
        self.scaler.scale(g_loss).backward()
        self.scaler.step(self.optG)
        self.scaler.update()
        self._update_ema()
        return self.checked(values)

    @property
    def total_steps(self) -> int:
        """Steps of the whole run (MAX_EPOCH epochs)."""
        return self.steps_per_epoch * max(1, int(self.cfg.TRAIN.MAX_EPOCH))

    def _set_learning_rates(self) -> None:
        """G's and D's learning rates for this step: `lr_factor` of the configured ones. A pure
        function of the step, so a resumed run continues the same schedule."""
        f = lr_factor(self.step, self.total_steps, float(self.cfg.TRAIN.LR_DECAY_START))
        for opt, lr in [(self.optG, self.cfg.TRAIN.GENERATOR_LR),
                        *((d, self.cfg.TRAIN.DISCRIMINATOR_LR) for d in self.optDs)]:
            for group in opt.param_groups:
                group["lr"] = float(lr) * f

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
        self.log_scalars(stats, "loss")
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
        check_replicas([unwrap(self.netG), *[unwrap(d) for d in self.netDs]], self.world)
