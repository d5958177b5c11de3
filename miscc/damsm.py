"""Stage 1: fine-tune CLIP with the DAMSM word/sentence losses plus NT-Xent (docs/DESIGN.md §7).

Per step each image brings two augmented views and two different captions; both (caption a,
view a) and (caption b, view b) pairs get the DAMSM word + sentence losses, and the two sentence
embeddings of an image are pulled together by NT-Xent:

    loss = Σ_{k∈{a,b}} (word0_k + word1_k + sent0_k + sent1_k)
           + TRAIN.CONTRASTIVE_WEIGHT · NT-Xent(sent_a, sent_b; TRAIN.TEMPERATURE)

Training resumes exactly (the data order comes from `EpochSampler` + `SeededItems`, every RNG,
the optimizer, the one-cycle schedule and the grad scaler are in the resume state).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import CaptionTokenizer, TextImageDataset, image_sizes
from miscc.config import to_plain
from miscc.losses import minimal_pair_loss, nt_xent, sent_loss, words_loss
from miscc.minimal_pairs import word_lists_for
from miscc.pair_metric import build_pair_set, format_pair_accuracy, score_pair_set
from miscc.training import (
    EpochTrainer,
    damsm_class_ids,
    fused_options,
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
    in_process_group,
    load_state_strict,
    rng_state,
)
from model import ClipEncoder

STATE_FORMAT = "damsm-train-state/1"
TRAIN_STATS = ("loss", "words", "sent", "contrastive", "pairs")


def build_encoder(cfg) -> ClipEncoder:
    """TRAIN.NET_E (a clip<epoch>.pth file, or a folder: its newest) if set, else the CLIP
    section (open_clip weights, or a random-init JSON architecture)."""
    if cfg.TRAIN.NET_E:
        path = resolve_checkpoint(cfg.TRAIN.NET_E, "clip*.pth", "encoder checkpoint",
                                  "TRAIN.NET_E")
        encoder = ClipEncoder.from_checkpoint(path)
    else:
        encoder = ClipEncoder.from_config(cfg)
    # CLIP's contrastive temperature is not used by any loss here: frozen, so that
    # DistributedDataParallel does not wait for a gradient that never comes.
    encoder.clip.logit_scale.requires_grad_(False)
    return encoder


@torch.no_grad()
def retrieval_accuracy(text: torch.Tensor, owner: torch.Tensor, images: torch.Tensor,
                       ks: tuple[int, ...] = (1, 5), chunk: int = 4096) -> dict[str, float]:
    """Text→image recall@k: for each caption embedding text[i] ([N, D]), rank every image
    embedding images[j] ([M, D]) by cosine; a hit when images[owner[i]] is among the top k.
    Batched over captions in chunks; other images tied with the true one count as ahead."""
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    v = torch.nn.functional.normalize(images.float(), dim=-1)
    owner = owner.to(t.device)
    rank = torch.empty(len(t), dtype=torch.long, device=t.device)
    for s in range(0, len(t), chunk):
        sims = t[s: s + chunk] @ v.t()  # [n, M]
        own = sims.gather(1, owner[s: s + chunk, None])
        rank[s: s + chunk] = (sims > own).sum(1) + (sims == own).sum(1) - 1
    return {f"R{k}": float((rank < k).float().mean()) for k in ks}


def _pair_major(batch: dict, key: str, mask_key: str, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A batch's per-view minimal pairs [B, 2, K, ...] (+ mask [B, 2, K]) in the order of the
    forward pass, [2B, K, ...] (all of view a, then all of view b), or None when absent."""
    if key not in batch:
        return None
    x, mask = batch[key].to(device, non_blocking=True), batch[mask_key].to(device)
    return torch.cat([x[:, 0], x[:, 1]]), torch.cat([mask[:, 0], mask[:, 1]])


def _with_redraws(batch: dict) -> dict:
    """A batch with its redrawn partners (TRAIN.REDRAW_PAIRS) appended as items of their own:
    2B items, B minimal pairs; the partners have no negatives of their own (masks False)."""
    if "redraw_tokens" not in batch:
        return batch
    out = dict(batch, tokens=torch.cat([batch["tokens"], batch["redraw_tokens"]]),
               imgs=[torch.cat([batch["imgs"][-1], batch["redraw_imgs"]])],
               class_id=torch.cat([batch["class_id"], batch["redraw_class"]]))
    for key, mask in (("neg_tokens", "neg_mask"), ("neg_imgs", "neg_img_mask")):
        if key in batch:
            out[key] = torch.cat([batch[key], torch.zeros_like(batch[key])])
            out[mask] = torch.cat([batch[mask], torch.zeros_like(batch[mask])])
    return out


def _unpack(packed: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor] | None
            ) -> torch.Tensor | None:
    """Encoded real negatives [n, D] back to their slots [2B, K, D] (zeros where masked)."""
    if pairs is None:
        return None
    mask = pairs[1]
    out = packed.new_zeros(*mask.shape, packed.shape[-1])
    out[mask] = packed[: int(mask.sum())]
    return out


class DAMSMTrainer(EpochTrainer):
    """Stage-1 loop: one-cycle AdamW over the CLIP backbone (TRAIN.ENCODER_LR) and the new
    parameters (TRAIN.ADAPTER_LR), validation + attention maps each epoch, exact resume."""

    FRESH_PATTERNS = ("state_step_*.pth", "clip*.pth", "encoder_step_*.pth")
    FRESH_FOLDERS = ("logs", "Image")

    def __init__(self, cfg, device: torch.device, rank: int = 0, world: int = 1,
                 fresh: bool = False, progress: bool = True) -> None:
        super().__init__(cfg, device, rank, world, fresh, progress)

        # data: only the largest GAN scale is needed (what stage 2 feeds the image tower)
        self.tokenizer = CaptionTokenizer(int(cfg.TEXT.WORDS_NUM))
        sizes = [max(image_sizes(cfg))]
        cache = bool(cfg.TRAIN.USE_CACHE)
        self.word_lists = word_lists_for(cfg)
        self.dataset = TextImageDataset(cfg, "train", self.tokenizer, sizes, views=2,
                                        train=True, use_cache=cache, word_lists=self.word_lists,
                                        negatives=int(cfg.TRAIN.HARD_NEGATIVES),
                                        negative_pictures=int(cfg.TRAIN.NEGATIVE_PICTURES),
                                        redraw_pairs=bool(cfg.TRAIN.REDRAW_PAIRS),
                                        picture_attributes=tuple(
                                            a.strip() for a in str(
                                                cfg.TRAIN.NEGATIVE_PICTURE_ATTRIBUTES).split(",")
                                            if a.strip()))
        self.sampler, self.loader = seeded_train_loader(self.dataset, self.batch, cfg, device,
                                                        rank, world)
        self.test = TextImageDataset(cfg, "test", self.tokenizer, sizes, views=1, train=False,
                                     use_cache=cache)
        self.test_loader = DataLoader(self.test, self.batch, shuffle=False,
                                      **loader_options(cfg, device))
        self.total_steps = self.steps_per_epoch * max(1, int(cfg.TRAIN.MAX_EPOCH))
        # minimal-pair accuracy of the test pictures (docs/DESIGN.md §14): queries built once
        self.pairs = None if self.word_lists is None else build_pair_set(
            self.test.info.captions, self.word_lists, int(cfg.EVAL.MINIMAL_PAIR_VARIANTS),
            int(cfg.EVAL.MINIMAL_PAIR_IMAGES), seed=int(cfg.SEED))
        self._pair_tokens: dict[str, torch.Tensor] = {}

        # model, optimizer, schedule
        torch.manual_seed(int(cfg.SEED))
        # channels-last on CPU too: the image tower's step ran 1.3x faster on the shapes
        # batches (docs/configuration.md, TRAIN.CHANNELS_LAST)
        self.memory_format = memory_format(bool(cfg.TRAIN.CHANNELS_LAST))
        self.encoder = build_encoder(cfg).to(device, memory_format=self.memory_format).train()
        new = {id(p) for p in self.encoder.new_parameters()}
        groups = [
            {"params": [p for p in self.encoder.parameters() if p.requires_grad
                        and id(p) not in new], "lr": float(cfg.TRAIN.ENCODER_LR)},
            {"params": self.encoder.new_parameters(), "lr": float(cfg.TRAIN.ADAPTER_LR)},
        ]
        groups = [g for g in groups if g["params"]]
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=float(cfg.TRAIN.WEIGHT_DECAY),
                                           **fused_options(device))
        self.scheduler = self._one_cycle()
        self.model = self.encoder
        if in_process_group():
            self.model = DistributedDataParallel(
                self.encoder, device_ids=[device.index] if self.cuda else None)
        self.val: dict[str, float] = {}  # the latest validation results
        self._resume()

    # ----------------------------------------------------------------------------- setup
    def _one_cycle(self) -> torch.optim.lr_scheduler.OneCycleLR:
        """Cosine one-cycle over MAX_EPOCH epochs (peaks = the groups' learning rates); Adam's
        betas stay fixed (no momentum cycling). MAX_STEPS only stops early, so a run cut by
        MAX_STEPS follows the same schedule as the full run."""
        return torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=[g["lr"] for g in self.optimizer.param_groups],
            total_steps=self.total_steps, pct_start=float(self.cfg.TRAIN.PCT_START),
            anneal_strategy="cos", cycle_momentum=False)

    # ------------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "format": STATE_FORMAT, "epoch": self.epoch, "in_epoch": self.in_epoch,
            "step": self.step, "world": self.world, "batch": self.batch,
            "encoder": self.encoder.checkpoint_state(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(), "config": to_plain(self.cfg),
        }

    def _tag(self) -> str:
        return f"step_{self.step}" if self.in_epoch else f"epoch_{self.epoch}"

    def save(self) -> None:
        """Encoder checkpoint (clip<N>.pth, N = completed epochs; encoder_step_<S>.pth when
        stopping inside an epoch: not picked up by stage 2's folder lookup) + full resume
        state (state_step_<S>.pth), each written atomically; the newest KEEP_STATES states
        are kept."""
        if not self.main:
            return
        name = f"encoder_step_{self.step}.pth" if self.in_epoch else f"clip{self.epoch}.pth"
        atomic_torch_save(self.encoder.checkpoint_state(), self.model_dir / name)
        self.write_state()

    def _resume(self) -> None:
        found = load_resume_state(self.model_dir, STATE_FORMAT,
                                  "stage-1 (pretrain_DAMSM.py) training state")
        if found is None:
            return
        path, state = found
        load_state_strict(self.encoder, state["encoder"]["state_dict"], f"encoder in {path}")
        self.optimizer.load_state_dict(state["optimizer"])
        sched = dict(state["scheduler"])
        if (state["world"], state["batch"]) != (self.world, self.batch):
            warnings.warn(f"{path} was written with {state['world']} process(es) x batch "
                          f"{state['batch']}, this run uses {self.world} x {self.batch}: the data "
                          "order and the schedule are re-planned", stacklevel=2)
        if sched["total_steps"] != self.total_steps:  # MAX_EPOCH (or batch/world) changed
            warnings.warn(f"{path}: the one-cycle schedule is re-planned from "
                          f"{sched['total_steps']} to {self.total_steps} steps "
                          "(TRAIN.MAX_EPOCH changed); the learning rate continues on the new "
                          "curve at this step", stacklevel=2)
            fresh = self.scheduler.state_dict()
            sched.update(total_steps=fresh["total_steps"],
                         _schedule_phases=fresh["_schedule_phases"])
        self.scheduler.load_state_dict(sched)
        load_scaler_state(self.scaler, state["scaler"])
        self._restore_progress(path, state)

    # --------------------------------------------------------------------------- one step
    def losses(self, batch: dict, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, [loss, words, sent, contrastive, pairs] detached) of one two-view batch.
        Minimal pairs (docs/DESIGN.md §14), when the batch has them, go through the same
        forward: the real negative captions after the captions, the real redrawn pictures
        after the views."""
        cfg, dev, sm = self.cfg, self.device, self.cfg.TRAIN.SMOOTH
        model = self.model if model is None else model
        batch = _with_redraws(batch)
        tokens = batch["tokens"].to(dev, non_blocking=True)  # [B, 2, L]
        views = batch["imgs"][-1].to(dev, non_blocking=True)  # [B, 2, 3, S, S]
        b = tokens.shape[0]
        class_ids = damsm_class_ids(cfg, batch, dev)
        text = torch.cat([tokens[:, 0], tokens[:, 1]])
        # without crops or flips the two views are one picture: it goes through the tower once
        same = torch.equal(views[:, 0], views[:, 1])
        images = views[:, 0] if same else torch.cat([views[:, 0], views[:, 1]])
        n_views = len(images)
        neg_text = _pair_major(batch, "neg_tokens", "neg_mask", dev)  # ([2B, K, L], [2B, K])
        neg_pics = _pair_major(batch, "neg_imgs", "neg_img_mask", dev)
        if neg_text is not None:
            text = torch.cat([text, neg_text[0][neg_text[1]]])
        if neg_pics is not None:
            images = torch.cat([images, neg_pics[0][neg_pics[1]]])
        images = images.contiguous(memory_format=self.memory_format)
        with self._autocast():  # one forward over both pairs: [a-captions; b-captions; ...]
            words, sent, mask, regions, code = model(text, images)
        neg_sent = _unpack(sent[2 * b:], neg_text)  # [2B, K, D] or None
        neg_code = _unpack(code[n_views:], neg_pics)
        words, sent, mask = (x[: 2 * b] for x in (words, sent, mask))
        regions, code = regions[:n_views], code[:n_views]
        if same:  # view b's outputs are view a's
            regions, code = regions.repeat(2, 1, 1), code.repeat(2, 1)
        in_damsm = bool(cfg.TRAIN.HARD_NEGATIVES_IN_DAMSM)
        w_total = s_total = 0.0
        for part in (slice(0, b), slice(b, 2 * b)):
            w0, w1, _ = words_loss(words[part], mask[part], regions[part], class_ids,
                                   sm.GAMMA1, sm.GAMMA2, sm.GAMMA3,
                                   attngan_score=sm.ATTNGAN_SCORE,
                                   similarity=sm.SIMILARITY)
            extra = {}
            if in_damsm and neg_sent is not None:
                extra.update(neg_sent=neg_sent[part], neg_sent_mask=neg_text[1][part])
            if in_damsm and neg_code is not None:
                extra.update(neg_code=neg_code[part], neg_code_mask=neg_pics[1][part])
            s0, s1 = sent_loss(code[part], sent[part], class_ids, sm.GAMMA3, **extra)
            w_total, s_total = w_total + w0 + w1, s_total + s0 + s1
        contrastive = nt_xent(sent[:b], sent[b:], float(cfg.TRAIN.TEMPERATURE))
        pairs = torch.zeros((), device=dev)
        scale = float(cfg.TRAIN.HARD_NEGATIVE_SCALE)
        if neg_sent is not None:  # each image: its caption against the caption's edits
            pairs = pairs + minimal_pair_loss(code, sent, neg_sent, neg_text[1], scale)
        if neg_code is not None:  # each caption: its picture against the redrawn ones
            pairs = pairs + minimal_pair_loss(sent, code, neg_code, neg_pics[1], scale)
        loss = (w_total + s_total + float(cfg.TRAIN.CONTRASTIVE_WEIGHT) * contrastive
                + float(cfg.TRAIN.HARD_NEGATIVE_WEIGHT) * pairs)
        return loss, torch.stack([loss, w_total, s_total, contrastive, pairs]).detach()

    def train_step(self, batch: dict) -> dict[str, float]:
        """Forward, backward, clip, step, schedule, then the finite check (all ranks
        together; nothing is saved after a bad step)."""
        loss, parts = self.losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, float(self.cfg.TRAIN.RNN_GRAD_CLIP))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        # one sync (the logged values + the check), after the step is queued: on CUDA a read
        # before the backward would leave the GPU idle while the host waits for it
        return self.checked(dict(zip(TRAIN_STATS, parts, strict=True)))

    # ------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, attention_path: Path | None = None, pairs: bool = True
                 ) -> dict[str, float]:
        """Test split: DAMSM word/sentence losses of (caption 0, centre crop) in batches of
        TRAIN.BATCH_SIZE, text→image R@1/R@5 of every test caption against every test
        image (sentence vs. image code cosine) and, with `pairs` and word lists, the
        minimal-pair accuracy. Every rank computes the same numbers (no communication); only
        rank 0 writes the attention picture."""
        sm, dev = self.cfg.TRAIN.SMOOTH, self.device
        enc = self.encoder.eval()
        codes, sents, owners, indices = [], [], [], []
        totals, weight, row = torch.zeros(2, dtype=torch.float64), 0, 0
        full_batches = len(self.test) >= self.batch
        try:
            with torch.random.fork_rng(devices=[]):
                for batch in tqdm(self.test_loader, desc="validation", leave=False,
                                  disable=not self.progress):
                    images = batch["imgs"][-1][:, 0].to(dev)
                    index = batch["index"]
                    tokens = self.test.tokens[index]  # [b, C, L]: every caption of each image
                    b, c, length = tokens.shape
                    real = torch.arange(c) < self.test.num_captions[index][:, None]  # [b, C]
                    with self._autocast():
                        regions, code = enc.encode_image(images)
                        words, sent, mask = enc.encode_text(tokens.view(b * c, length).to(dev))
                    words, sent, mask = (x.view(b, c, *x.shape[1:]) for x in (words, sent, mask))
                    codes.append(code.float())
                    indices.append(index)
                    sents.append(sent[real.to(dev)].float())
                    owners.append((row + torch.arange(b))[:, None].expand(b, c)[real])
                    row += b
                    if b < self.batch and full_batches:
                        continue  # the last, smaller batch would make easier losses
                    class_ids = damsm_class_ids(self.cfg, batch, dev)
                    w0, w1, attn = words_loss(words[:, 0], mask[:, 0], regions, class_ids,
                                              sm.GAMMA1, sm.GAMMA2, sm.GAMMA3,
                                              attngan_score=sm.ATTNGAN_SCORE,
                                              similarity=sm.SIMILARITY)
                    s0, s1 = sent_loss(code, sent[:, 0], class_ids, sm.GAMMA3)
                    totals += torch.stack([w0 + w1, s0 + s1]).double().cpu() * b
                    weight += b
                    if attention_path is not None and self.main:
                        picked = [self.tokenizer.decode(t) for t in tokens[:4, 0]]
                        from miscc.pictures import save_attention_maps

                        # attn rows follow token positions: row 0 is the start token
                        save_attention_maps(images.float(), picked, attn[:, 1:], attention_path)
                        attention_path = None
                pairs = self._pair_accuracy(enc, torch.cat(codes), torch.cat(indices)) \
                    if pairs else {}
        finally:
            enc.train()
        result = retrieval_accuracy(torch.cat(sents), torch.cat(owners), torch.cat(codes))
        words_val, sent_val = (totals / max(weight, 1)).tolist()
        return {"words": words_val, "sent": sent_val, "loss": words_val + sent_val, **result,
                "images": row, "captions": int(sum(len(o) for o in owners)),
                "minimal_pairs": pairs}

    def _pair_accuracy(self, enc: ClipEncoder, codes: torch.Tensor, indices: torch.Tensor
                       ) -> dict[str, dict[str, float]]:
        """Minimal-pair accuracy of the test pictures' codes (rows in `indices` order); {}
        without word lists."""
        if self.pairs is None:
            return {}
        by_index = codes.new_zeros(len(self.test), codes.shape[-1])
        by_index[indices.to(codes.device)] = codes

        def encode(texts: list[str]) -> torch.Tensor:
            for t in texts:
                if t not in self._pair_tokens:
                    self._pair_tokens[t] = self.tokenizer.encode(t)
            tokens = torch.stack([self._pair_tokens[t] for t in texts]).to(self.device)
            with self._autocast():
                return enc.encode_text(tokens)[1].float()

        return score_pair_set(by_index, self.pairs, encode, batch=int(self.batch) * 8)

    def _validate_and_log(self, pairs: bool = True) -> dict[str, float]:
        """Validate, log, print, write metrics.json; the minimal-pair accuracy (5 texts per
        test image on the shapes set: it would double the validation time) only with
        `pairs`, i.e. at snapshots and at the end."""
        path = self.image_dir / f"attention_{self._tag()}.png"
        val = self.validate(attention_path=path if self.main else None, pairs=pairs)
        if self.writer is not None:
            for key in ("loss", "words", "sent", "R1", "R5"):
                self.writer.add_scalar(f"val/{key}", val[key], self.step)
            for category, v in val["minimal_pairs"].items():
                self.writer.add_scalar(f"val_pairs/{category}", v["accuracy"], self.step)
            self.writer.flush()
        if self.main:
            tqdm.write(f"epoch {self.epoch} step {self.step}: val loss {val['loss']:.3f} "
                       f"(words {val['words']:.3f}, sent {val['sent']:.3f}), text→image "
                       f"R@1 {val['R1']:.3f} R@5 {val['R5']:.3f} over {val['images']} images "
                       f"(chance R@1 {1 / max(val['images'], 1):.4f})")
            if val["minimal_pairs"]:
                tqdm.write("  minimal pairs (true caption above its one-edit variants): "
                           + format_pair_accuracy(val["minimal_pairs"]))
            metrics = {"epoch": self.epoch, "step": self.step,
                       "word_lists": str(self.cfg.TEXT.WORD_LISTS), **val}
            atomic_write_bytes(self.out / "metrics.json",
                               (json.dumps(metrics, indent=1) + "\n").encode())
        return val

    # ---------------------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Run until TRAIN.MAX_EPOCH (or TRAIN.MAX_STEPS); returns a short summary with the
        last validation results (`val`, empty when nothing was trained)."""
        self.val = {}
        return {**super().train(), "val": self.val}

    def _after_step(self, stats: dict[str, float], bar: tqdm) -> None:
        if self.writer is not None:
            for k, v in stats.items():
                self.writer.add_scalar(f"train/{k}", v, self.step)
            for i, lr in enumerate(self.scheduler.get_last_lr()):
                self.writer.add_scalar(f"lr/group{i}", lr, self.step)
        bar.set_postfix(loss=f"{stats['loss']:.3f}")

    def _after_epoch(self, stats: dict[str, float], snapshot: bool) -> None:
        self.val = self._validate_and_log(pairs=snapshot)
        if snapshot:
            self.save()

    def _after_stop(self, stats: dict[str, float]) -> None:
        self.val = self._validate_and_log()
        self.save()
