"""Configuration: defaults, strict YAML merge, legacy-key mapping and shared command-line parsing.

Every script builds its parser with `build_parser`, then calls `config_from_args`, so all of
them accept the same `--cfg/--gpu/--data_dir/--manualSeed/--set/--print-config` options.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from easydict import EasyDict


class ConfigError(ValueError):
    """A user-fixable problem in a config file or a `--set` override."""


def default_config() -> EasyDict:
    """Return a fresh copy of every key with its default (AttnGAN/DM-GAN names + CLIP section)."""
    return EasyDict(
        {
            "CONFIG_NAME": "",
            "DATASET_NAME": "birds",  # '' = the name of the DATA_DIR folder
            "DATA_DIR": "",
            "CACHE_DIR": "",  # image/text/FID-statistics caches; '' = <DATA_DIR>/cache
            "OUTPUT_DIR": "",  # '' -> output/<DATASET_NAME>_<CONFIG_NAME>
            "GPU_ID": 0,
            "CUDA": True,
            "WORKERS": 4,
            "CPU_THREADS": 0,  # >0: torch intra-op threads on CPU runs (tiny models: 1)
            # torchrun: minutes any collective may wait before the job aborts, including the
            # barrier where the other processes wait while the first one of a node builds a
            # token or text-feature cache (raise it for ImageNet-sized caches)
            "DIST_TIMEOUT_MINUTES": 60.0,
            "SEED": 100,
            "B_VALIDATION": False,
            "TREE": {"BRANCH_NUM": 3, "BASE_SIZE": 64},
            "TRAIN": {
                "FLAG": True,
                "BATCH_SIZE": 48,
                "MAX_EPOCH": 600,
                "SNAPSHOT_INTERVAL": 5,
                "NET_G": "",
                "NET_E": "",
                "B_NET_D": True,
                "DISCRIMINATOR_LR": 2e-4,
                "GENERATOR_LR": 2e-4,
                # stage 2: from this fraction of the MAX_EPOCH steps on, G's and D's learning
                # rates fall linearly to 0 at the last step (1.0 = constant, as released)
                "LR_DECAY_START": 1.0,
                "ENCODER_LR": 1e-5,  # CLIP backbone in stage 1
                "ADAPTER_LR": 1e-3,  # new parameters (region adapter) in stage 1
                "WEIGHT_DECAY": 0.0,
                "PCT_START": 0.1,  # one-cycle warm-up fraction
                "RNN_GRAD_CLIP": 0.25,  # gradient-norm clip (name kept from AttnGAN)
                "MAX_STEPS": 0,  # >0: stop after this many optimizer steps (tests, demos)
                "CONTRASTIVE_WEIGHT": 0.2,
                "TEMPERATURE": 0.5,
                "EMA_DECAY": 0.999,
                # stage 2: >0 recomputes the EMA generator's batch-norm statistics over this
                # many batches of training captions before each generator file is written
                # (0 = the current G's statistics, as released; docs/DESIGN.md §8)
                "EMA_BN_BATCHES": 0,
                # preemption (docs/training-at-scale.md): a resume state at least this
                # often (0 = only at epoch ends and snapshots), and the signals that make a
                # run finish its step, save a resume state and exit with code 75
                "STATE_MINUTES": 30.0,
                "STOP_SIGNALS": "SIGTERM,SIGINT,SIGUSR1",
                "AMP": True,  # autocast on CUDA (bf16 where supported)
                # auto: bf16 where the GPU computes it natively, else fp16 + GradScaler;
                # float16 forces the fp16 path (gpu_check.py runs it on bf16 GPUs too)
                "AMP_DTYPE": "auto",
                # bf16 autocast on the CPU too (with AMP): faster only where the CPU has bf16
                # instructions (AMX / AVX512-BF16); evaluation stays fp32 on the CPU
                "AMP_CPU": False,
                "CHANNELS_LAST": True,  # CUDA (and stage 1 and the VQGAN tokenizer on CPU)
                "PIN_MEMORY": True,
                "PERSISTENT_WORKERS": True,
                "USE_CACHE": True,  # read the prepare_data.py image cache when it exists
                "FLIP": True,  # random horizontal flips in training; with TEXT.WORD_LISTS a
                # mirrored picture's caption has left and right exchanged
                # AttnGAN's training crop: load at 76/64 of the size, cut a random crop back.
                # False: the whole frame at the test scale (where captions name size and
                # position the crop would contradict them: docs/DESIGN.md §14)
                "RANDOM_CROP": True,
                # stage-1 minimal pairs (docs/DESIGN.md §14; need TEXT.WORD_LISTS): K one-edit
                # negative captions per caption, M pictures redrawn with one named attribute
                # changed (shapes set only); both join the DAMSM sentence loss as negatives of
                # their own item (HARD_NEGATIVES_IN_DAMSM) and a per-item cross-entropy at
                # HARD_NEGATIVE_SCALE, weighted by HARD_NEGATIVE_WEIGHT
                "HARD_NEGATIVES": 0,
                "NEGATIVE_PICTURES": 0,
                # comma-separated attributes the redrawn pictures change when the caption
                # names any of them ('' = any it names): the ones the image code is slowest
                # to carry; "outline" keeps every attribute and destroys the shape's outline
                # (blurred or melted, docs/DESIGN.md §14), for captions naming the shape
                "NEGATIVE_PICTURE_ATTRIBUTES": "",
                "HARD_NEGATIVE_WEIGHT": 1.0,
                "HARD_NEGATIVE_SCALE": 10.0,
                "HARD_NEGATIVES_IN_DAMSM": True,
                # shapes set: every training item brings a partner, its picture redrawn with
                # one attribute both its captions name changed and the captions edited to
                # match, as an item of its own (the batch holds B minimal pairs, 2B items)
                "REDRAW_PAIRS": False,
                # stage-2 minimal pairs (DM-GAN; docs/DESIGN.md §14; need TEXT.WORD_LISTS):
                # the share of D's mismatched pairs that are the real image with its own caption
                # edited in one place (0 = as released), and the weight of G's per-item
                # cross-entropy of the fake image's code over [its caption, its edits] (at
                # SMOOTH.GAMMA3); MINIMAL_PAIR_EDITS edits per caption are cached (seed SEED)
                "D_MINIMAL_PAIRS": 0.0,
                # stage-2 discriminators (docs/DESIGN.md §8): "bce" as DM-GAN releases them,
                # or DF-GAN's "hinge"; and DF-GAN's matching-aware gradient penalty
                # MAGP_WEIGHT · mean ‖(∂D/∂image, ∂D/∂sentence)‖^MAGP_POWER on the real
                # images with their own captions (DF-GAN: 2 and 6; 0 = off, as released)
                "GAN_LOSS": "bce",
                "MAGP_WEIGHT": 0.0,
                "MAGP_POWER": 6.0,
                # negative augmentation for D (docs/DESIGN.md §8): each real image blurred by a
                # Gaussian of sigma drawn from D_BLUR_SIGMA (pixels at the largest size), scored
                # as a fake with its captions, weight D_BLUR_WEIGHT (0 = off, as released)
                "D_BLUR_WEIGHT": 0.0,
                "D_BLUR_SIGMA": [1.0, 2.0],
                # contradicting pictures for D (shapes set only; docs/DESIGN.md §8): each real
                # picture redrawn with one of D_NEGATIVE_PICTURE_ATTRIBUTES that one of its
                # captions names changed, scored with that caption as a mismatched pair by the
                # conditional logits, weight D_NEGATIVE_PICTURES (0 = off, as released)
                "D_NEGATIVE_PICTURES": 0.0,
                "D_NEGATIVE_PICTURE_ATTRIBUTES": "shape,size",
                "D_NEGATIVE_PICTURE_COUNT": 1,  # pictures per item; the attributes take turns
                "G_MINIMAL_PAIR_WEIGHT": 0.0,
                "MINIMAL_PAIR_EDITS": 4,
                # G's text-matching terms (DAMSM, contrastive, one-edit) rise linearly from 0
                # to their weights over the first TEXT_RAMP of the training (0 = from the
                # first step, as released); the adversarial and KL terms are never ramped
                "TEXT_RAMP": 0.0,
                # MSGAN's mode-seeking term for G (docs/DESIGN.md §8): a share MODE_SEEKING_SHARE
                # of each batch's first captions is drawn again with fresh noise, and G adds
                # MODE_SEEKING_WEIGHT / (mean|image - redrawn| / mean|z - z'| + 1e-5) (0 = off,
                # as released)
                "MODE_SEEKING_WEIGHT": 0.0,
                "MODE_SEEKING_SHARE": 0.25,
                "TEXT_CACHE": True,  # stage 2: read the frozen text tower's features from a
                # cache file instead of re-encoding the captions every step
                # DAMSM losses: captions of the same class id are not negatives of each other
                # (AttnGAN's masking; birds: the species). Off for the shapes set, whose class
                # (shape, colour) would hide size, position and background from the losses
                "CLASS_MASK": True,
                "SMOOTH": {
                    "GAMMA1": 4.0,
                    "GAMMA2": 5.0,
                    "GAMMA3": 10.0,
                    "LAMBDA": 5.0,
                    "ATTNGAN_SCORE": False,  # drop the paper's 1/gamma2 factor like AttnGAN's code
                    # DAMSM attention from raw word-region dot products (AttnGAN/DM-GAN code)
                    # or cosines; measured in docs/results.md
                    "SIMILARITY": "cosine",
                },
            },
            "GAN": {
                "DF_DIM": 32,
                "GF_DIM": 64,
                "Z_DIM": 100,
                "CONDITION_DIM": 100,
                "R_NUM": 2,
            },
            "TEXT": {
                "EMBEDDING_DIM": 512,
                "CAPTIONS_PER_IMAGE": 10,
                "WORDS_NUM": 30,  # BPE word tokens kept per caption (context = WORDS_NUM + 2)
                # word categories for minimal pairs (docs/DESIGN.md §14): a stem of
                # cfg/words/ (shapes, cub, coco) or a .yml path; '' = none (no one-edit
                # negatives, no left/right swap on flips, no minimal-pair accuracy)
                "WORD_LISTS": "",
            },
            "CLIP": {
                "MODEL": "ViT-B/32",
                "PRETRAINED": "openai",  # open_clip tag, a local weights file, or '' (random)
                "ADAPTER": True,  # learnable linear map on region features
            },
            # CLIP-GEN's image tokenizer (train_vqgan.py; docs/DESIGN.md §13). Its image size
            # is the largest TREE size (BASE_SIZE · 2^(BRANCH_NUM-1)): the VQGAN configs set
            # BRANCH_NUM 1, so every metric script reads their images like a generator's.
            "VQGAN": {
                "CH": 128,  # width of the first level; level i has CH · CH_MULT[i] channels
                "CH_MULT": [1, 1, 2, 2, 4],  # one down-sampling between consecutive levels
                "NUM_RES_BLOCKS": 2,  # encoder blocks per level (the decoder has one more)
                "ATTN_RESOLUTIONS": [16],  # feature-map sides that get self-attention
                "Z_CHANNELS": 256,
                "DROPOUT": 0.0,
                "N_EMBED": 16384,  # codebook size
                "EMBED_DIM": 256,  # code vector width
                "BETA": 0.25,  # commitment weight: ‖sg(z) − e‖² + β‖z − sg(e)‖²
                "L2_NORM": True,  # codes and encoder outputs on the unit sphere
                "INIT_FROM_DATA": True,  # codebook = encoder outputs of the first batch
                "RESTART_DEAD": True,  # re-seed codes unused for RESTART_EVERY steps
                "RESTART_EVERY": 100,
                "LR": 1e-4,  # Adam (0.5, 0.9) for the autoencoder and the discriminator
                "CODEBOOK_WEIGHT": 1.0,
                "PERCEPTUAL_WEIGHT": 1.0,  # LPIPS (VGG16); 0 = off (no VGG weights needed)
                "VGG_WEIGHTS": "",  # '' = torch hub cache (vgg16-397923af.pth)
                "DISC_WEIGHT": 0.8,  # 0 = no adversarial term (no discriminator built)
                "DISC_START": 250001,  # steps before the adversarial terms switch on
                "DISC_LAYERS": 3,
                "DISC_CH": 64,
                "VAL_IMAGES": 512,  # test images reconstructed after each epoch (0 = all)
                "NET": "",  # a vqgan*.pth (or its Model/ folder) for --eval; '' = this run's
                "TEST_DIR": "",  # folder data: a folder of test images ('' = held-out share)
                "HOLDOUT": 0.01,  # folder data without TEST_DIR: share held out for testing
            },
            # CLIP-GEN's transformer (train_clipgen.py; docs/DESIGN.md §13): it predicts an
            # image's VQGAN tokens from its CLIP image embedding; the CLIP encoder is
            # TRAIN.NET_E (a stage-1 checkpoint) or, when empty, the CLIP section's weights
            "CLIPGEN": {
                # the tokenizer: a vqgan<N>.pth of train_vqgan.py, or its Model/; '' = the
                # one train_vqgan.py writes for this DATASET_NAME: output/<name>_VQGAN/Model
                "VQGAN": "",
                "N_LAYER": 24,  # GPT-2 medium (the paper's COCO model)
                "N_EMBD": 1024,
                "N_HEAD": 16,
                "DROPOUT": 0.1,
                "LR": 4.5e-4,  # AdamW (0.9, 0.95) peak, after WARMUP_STEPS, cosine to 0
                "WEIGHT_DECAY": 0.01,  # on the Linear weights only (as CLIP-GEN's code)
                "WARMUP_STEPS": 1000,
                "GRAD_CLIP": 1.0,  # gradient-norm clip (0 = off)
                # embedding reconstruction: CLIP(decode(straight-through softmax tokens)) vs
                # the conditioning image embedding (MSE of unit vectors); 0 = off, and then
                # neither the decoder nor the image tower runs in training
                "RECON_WEIGHT": 0.2,
                # LAFITE's language-free remedy for the text-image gap: the conditioning
                # embedding h (unit length) becomes h + NOISE·ε/‖ε‖ in training (0 = off)
                "NOISE": 0.0,
                # classifier-free guidance: the share of training rows whose condition is
                # replaced by a learned "no condition" prefix (0 = off, as the paper), and the
                # sampling weight w of logits_c + w·(logits_c − logits_∅) (0 = unguided)
                "CFG_DROP": 0.0,
                "GUIDANCE": 0.0,
                "VIEWS": 4,  # augmented views per training image in the token cache
                "TOP_K": 500,  # sampling: candidates per token (0 = all codes)
                "TOP_P": 0.95,  # ... then the smallest top-p share of them
                "TEMPERATURE": 1.0,
                "CANDIDATES": 1,  # >1: draw this many per caption, keep the best by CLIP score
                # what "best" is: condition = cosine with the conditioning embedding; pairs =
                # cosine with the caption minus the largest cosine with one of its one-edit
                # variants (TRAIN.MINIMAL_PAIR_EDITS of them; needs TEXT.WORD_LISTS), so the
                # kept picture shows what tells the caption from its minimal pairs
                "RERANK": "condition",
                "CONDITION": "text",  # evaluation prompt: text, or image (each test image's own
                # embedding: the upper bound that measures the text-image gap)
                "NET": "",  # a gpt_epoch_<N>.pth (or its Model/) to evaluate; '' = this run's
                "SAMPLE_CAPTIONS": "",  # captions (a text file) for the training grids; '' =
                # 16 test captions, or 16 test images' embeddings when the data has none
            },
            "EVAL": {
                # images the evaluation generates: 0 = one per test caption (CUB: 29,330);
                # N = N distinct (image, caption) pairs drawn with SEED (COCO: 30,000, as
                # the AttnGAN/DM-GAN papers; every caption would be 202,520 images)
                "NUM_IMAGES": 0,
                # a second scorer beside TRAIN.NET_E: '' = none; a CLIP name (ViT-B/32, with
                # INDEPENDENT_PRETRAINED weights), a stage-1 clip*.pth (or its Model/ folder),
                # or a cfg/clip/ JSON stem (random weights, seeded: tests)
                "INDEPENDENT_ENCODER": "",
                "INDEPENDENT_PRETRAINED": "openai",
                # minimal-pair accuracy (TEXT.WORD_LISTS set): test images it asks (0 = all) and
                # one-edit variants per (image, category) at most (0 = all; a seeded sample)
                "MINIMAL_PAIR_IMAGES": 1000,
                "MINIMAL_PAIR_VARIANTS": 8,
                # shapes judge weights: '' = assets/shapes_judge.pt for shapes sets, 'none' = off
                "JUDGE": "",
            },
        }
    )


# Keys of the earlier CLIP+DM-GAN repository: new key path, or None (accepted, ignored, warned).
LEGACY_KEYS: dict[str, str | None] = {
    "TRAIN.DEVICE": "GPU_ID",
    "TRAIN.CLIP_MODEL_CHECKPOINT": "TRAIN.NET_E",
    "TRAIN.CLIP_MODEL_BASE": "CLIP.MODEL",
    "TRAIN.BACKBONE_LR": "TRAIN.ENCODER_LR",
    "TRAIN.CLIP_LR": "TRAIN.ENCODER_LR",
    "TRAIN.LINEAR_LR": "TRAIN.ADAPTER_LR",
    "TRAIN.BASE_LR": None,
    "TRAIN.GAMMA": None,
    "TRAIN.STEP_SIZE_UP": None,
    "TRAIN.TRAIN_CLIP_MODEL": None,
    "GAN.B_ATTENTION": None,
    "GAN.B_DCGAN": None,
}

# string keys that take one of a few values: checked when a file or --set gives them
CHOICES: dict[str, tuple[str, ...]] = {
    "TRAIN.SMOOTH.SIMILARITY": ("dot", "cosine"),
    "TRAIN.GAN_LOSS": ("bce", "hinge"),
    "CLIPGEN.CONDITION": ("text", "image"),
    "CLIPGEN.RERANK": ("condition", "pairs"),
    "TRAIN.AMP_DTYPE": ("auto", "bfloat16", "float16"),
}

LEGACY_REASONS = {
    "TRAIN.BASE_LR": "the cyclic schedule was replaced by a one-cycle cosine schedule "
    "(TRAIN.ENCODER_LR / TRAIN.ADAPTER_LR are its peaks)",
    "TRAIN.GAMMA": "the cyclic schedule was replaced by a one-cycle cosine schedule",
    "TRAIN.STEP_SIZE_UP": "the one-cycle schedule's warm-up is TRAIN.PCT_START",
    "TRAIN.TRAIN_CLIP_MODEL": "CLIP is fine-tuned in stage 1 only and frozen in stage 2",
    "GAN.B_ATTENTION": "DM-GAN always uses its dynamic memory",
    "GAN.B_DCGAN": "DM-GAN always uses its dynamic memory",
}


def _convert_legacy(key: str, value: Any) -> Any:
    """Translate a legacy value into the new key's meaning."""
    if key == "TRAIN.DEVICE":
        text = str(value).strip().lower()
        if text.startswith("cuda"):
            return int(text.split(":")[1]) if ":" in text else 0
        if text == "cpu":
            return -1
        raise ConfigError(f"TRAIN.DEVICE: expected 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return value


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _get(tree: dict, path: str) -> Any:
    node = tree
    for part in path.split("."):
        node = node[part]
    return node


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value


def _check_type(path: str, default: Any, value: Any, source: str) -> Any:
    """Return `value` coerced to the default's type, or raise a ConfigError naming both."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    elif isinstance(default, list):  # lists of ints (channel multipliers) or of floats
        items = value if isinstance(value, list) else [value]
        numbers = default and isinstance(default[0], float)
        allowed = (int, float) if numbers else (int,)
        if all(isinstance(v, allowed) and not isinstance(v, bool) for v in items):
            return [float(v) for v in items] if numbers else list(items)
        kind = "numbers" if numbers else "integers"
        raise ConfigError(f"{source}: {path} expects a list of {kind} (default {default!r}), "
                          f"got {value!r}")
    else:  # pragma: no cover - defaults only hold the types above
        return value
    raise ConfigError(
        f"{source}: {path} expects {type(default).__name__} (default {default!r}), "
        f"got {type(value).__name__} {value!r}"
    )


def _suggest(path: str, valid: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest valid key: same leaf elsewhere, then spelling."""
    valid = list(valid)
    leaf = path.split(".")[-1]
    same_leaf = [p for p in valid if p.split(".")[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(path, valid, n=1, cutoff=0.5)
    if not close:  # compare the last component only, e.g. BATCHSIZE vs TRAIN.BATCH_SIZE
        leaves = {p.split(".")[-1]: p for p in valid}
        hits = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[hits[0]]] if hits else []
    return f" (did you mean {close[0]}?)" if close else ""


def merge_into(cfg: EasyDict, updates: dict, source: str) -> list[str]:
    """Merge a nested dict of `updates` into `cfg` strictly; return warnings for legacy keys.

    Unknown keys and wrong types raise ConfigError naming `source`, the key path and the
    closest valid key.
    """
    valid = _flatten(cfg)
    notes: list[str] = []
    mapped: dict[str, Any] = {}
    for path, value in _flatten(updates).items():
        if path in LEGACY_KEYS:
            target = LEGACY_KEYS[path]
            if target is None:
                notes.append(
                    f"{source}: legacy key {path} is ignored: {LEGACY_REASONS[path]}"
                )
                continue
            mapped.setdefault(target, _convert_legacy(path, value))
            notes.append(f"{source}: legacy key {path} mapped to {target}")
            continue
        if path not in valid:
            raise ConfigError(f"{source}: unknown key {path}{_suggest(path, valid)}")
        mapped[path] = value
    for path, value in mapped.items():
        value = _check_type(path, valid[path], value, source)
        if path in CHOICES and value not in CHOICES[path]:
            raise ConfigError(f"{source}: {path} must be one of {', '.join(CHOICES[path])}, "
                              f"got {value!r}")
        _set(cfg, path, value)
    if "CLIP.MODEL" in mapped and "CLIP.PRETRAINED" not in mapped:
        model = str(mapped["CLIP.MODEL"])
        if model.startswith("openai/"):
            cfg.CLIP.PRETRAINED = "openai"
    return notes


def apply_overrides(cfg: EasyDict, overrides: Iterable[str]) -> list[str]:
    """Apply `KEY=VALUE` strings, typed like the key's default, with the same checks as a file."""
    notes: list[str] = []
    defaults = _flatten(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. TRAIN.BATCH_SIZE=16")
        key, text = item.split("=", 1)
        key = key.strip()
        tree: dict = {}
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        # string keys take the text as is (a CONFIG_NAME of '123' stays a string)
        keep_text = isinstance(defaults.get(key), str) or text == ""
        try:
            node[leaf] = text if keep_text else yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: cannot parse {text!r}: {err}") from err
        notes += merge_into(cfg, tree, f"--set {key}")
    return notes


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with `yaml.safe_load`, failing clearly on a missing/invalid file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def finalize(cfg: EasyDict) -> EasyDict:
    """Fill derived values: DATASET_NAME '' = the DATA_DIR folder's name (so runs on two
    folders get two output folders), the default OUTPUT_DIR."""
    if not cfg.DATASET_NAME:
        data = str(cfg.DATA_DIR)
        cfg.DATASET_NAME = (Path(data).resolve().name if data else "") or "folder"
    if not cfg.OUTPUT_DIR:
        name = f"{cfg.DATASET_NAME}_{cfg.CONFIG_NAME}" if cfg.CONFIG_NAME else cfg.DATASET_NAME
        cfg.OUTPUT_DIR = str(Path("output") / name)
    return cfg


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), quiet: bool = False
) -> EasyDict:
    """Defaults, then the YAML file at `path`, then `KEY=VALUE` overrides; strict throughout."""
    cfg = default_config()
    notes: list[str] = []
    if path is not None:
        notes += merge_into(cfg, read_yaml(path), str(path))
    notes += apply_overrides(cfg, overrides)
    if not quiet:
        for note in notes:
            warnings.warn(note, stacklevel=2)
    return finalize(cfg)


def to_plain(cfg: dict) -> dict:
    """A plain-dict deep copy (for YAML dumps and checkpoints)."""
    return {k: to_plain(v) if isinstance(v, dict) else copy.copy(v) for k, v in cfg.items()}


def dump_config(cfg: dict) -> str:
    """The merged config as YAML text, keys in definition order."""
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)


def save_config(cfg: dict, out_dir: str | Path) -> Path:
    """Write `config.yml` into `out_dir` atomically and return its path."""
    from miscc.utils import atomic_write_bytes

    path = Path(out_dir) / "config.yml"
    atomic_write_bytes(path, dump_config(cfg).encode())
    return path


def build_parser(description: str) -> argparse.ArgumentParser:
    """The argument parser every script starts from (the shared options of docs/DESIGN.md §3)."""
    return add_common_args(argparse.ArgumentParser(description=description))


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --cfg/--gpu/--data_dir/--manualSeed/--set/--print-config to `parser`."""
    parser.add_argument("--cfg", dest="cfg_file", default=None, help="YAML config file")
    parser.add_argument("--gpu", dest="gpu_id", type=int, default=None,
                        help="GPU index; -1 runs on the CPU")
    parser.add_argument("--data_dir", default=None, help="overrides DATA_DIR")
    parser.add_argument("--manualSeed", type=int, default=None, help="overrides SEED")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the merged config and exit")
    return parser


def config_from_args(args: argparse.Namespace) -> EasyDict:
    """Merge defaults, `--cfg`, the dedicated flags and `--set`; honour `--print-config`.

    Config errors end the program with one line on stderr (exit code 2).
    """
    overrides = list(args.overrides)
    if args.gpu_id is not None:
        overrides.append(f"GPU_ID={args.gpu_id}")
    if args.data_dir is not None:
        overrides.append(f"DATA_DIR={args.data_dir}")
    if args.manualSeed is not None:
        overrides.append(f"SEED={args.manualSeed}")
    try:
        cfg = load_config(args.cfg_file, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if getattr(args, "print_config", False):
        sys.stdout.write(dump_config(cfg))
        raise SystemExit(0)
    return cfg
