"""Full-scale concerns (docs/training-at-scale.md): the caption-feature
cache streams to disk (peak memory flat in the number of captions), the 30,000-pair evaluation
protocol, and caches built per node for two-node runs with node-local data copies."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GAN_TINY, ROOT

from miscc.config import load_config
from miscc.protocol import caption_items, eval_items

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# ---------------------------------------------------------------------- caption cache
def _peak_growth_mb(images: int, out: Path) -> int:
    run = subprocess.run([sys.executable, "bench/bench_scale.py", "--images", str(images),
                          "--dim", "64", "--threads", "1", "--out", str(out)], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak, before = re.search(r"\((\d+) MB; (\d+) MB before the build\)", run.stdout).groups()
    return int(peak) - int(before)


def test_caption_cache_build_memory_does_not_grow_with_the_captions(tmp_path) -> None:
    """5,000 and 50,000 captions (word features 15 MB and 147 MB): the build's peak resident
    memory grows by about the same few MB; holding the arrays, as the earlier build did, would
    add ~290 MB at 10x (the words twice: the array and its serialised copy)."""
    small = _peak_growth_mb(1000, tmp_path / "a")
    large = _peak_growth_mb(10000, tmp_path / "b")
    assert large < small + 40, f"peak RSS grew by {small} MB for 1x and {large} MB for 10x"


def test_streamed_cache_holds_the_text_tower_outputs(tmp_path) -> None:
    from model import ClipEncoder, resolve_clip_name
    from text_features import encode_all_captions

    torch.manual_seed(0)
    encoder = ClipEncoder(resolve_clip_name("tiny", ""), adapter=False).eval()
    tokens = torch.zeros(7, 3, 12, dtype=torch.long)
    tokens[..., 0], tokens[..., 1:6] = 49406, torch.randint(1, 49000, (7, 3, 5))
    tokens[..., 6] = 49407
    tokens[2, 1, 6:9] = torch.tensor([5, 6, 49407])  # one longer caption: L' = 9
    shapes = encode_all_captions(encoder, tokens, CPU, tmp_path, batch=4, progress=False)
    assert shapes["words"] == (7, 3, 9, 64)
    words = np.load(tmp_path / "words.npy", mmap_mode="r").reshape(7, 3, 9, 64)
    sent = np.load(tmp_path / "sent.npy").reshape(7, 3, 64)
    with torch.no_grad():
        w, s, m = encoder.encode_text(tokens.reshape(21, 12)[:, :9])
    # stored as float16; batches of 4 and of 21 may round a float32 value differently by an ulp,
    # which float16 can turn into one step of its own: equal to float16 precision
    ref = w.numpy().reshape(7, 3, 9, 64)
    assert np.allclose(words.astype(np.float32), ref, rtol=2e-3, atol=1e-3)
    assert np.allclose(sent, s.numpy().reshape(7, 3, 64))
    mask = np.load(tmp_path / "mask.npy").reshape(7, 3, 9)
    assert np.array_equal(mask, m.numpy().reshape(7, 3, 9))
    assert not list(tmp_path.glob(".*tmp"))  # temp files renamed


# ------------------------------------------------------------------ evaluation protocol
def test_30k_protocol_draws_distinct_real_captions_reproducibly() -> None:
    num = torch.tensor([5, 5, 6, 5, 4] * 40)  # 200 images, 1,000 captions
    cfg = load_config(None, ["EVAL.NUM_IMAGES=300", "SEED=3"], quiet=True)
    items, pick, protocol = eval_items(cfg, num)
    assert items.shape == (300, 2) and len({tuple(p) for p in items.tolist()}) == 300
    assert (items[:, 1] < num[items[:, 0]]).all()  # every pair is a real caption
    assert torch.equal(caption_items(num)[pick], items)
    again, _, _ = eval_items(cfg, num)
    assert torch.equal(again, items)
    other, _, _ = eval_items(load_config(None, ["EVAL.NUM_IMAGES=300", "SEED=4"], quiet=True),
                             num)
    assert not torch.equal(other, items)
    assert protocol == {"rule": "300 distinct (image, caption) pairs drawn uniformly (seed 3)",
                        "images": 300, "test_captions": 1000, "seed": 3,
                        "num_images_key": 300}
    every, _, p0 = eval_items(load_config(None, [], quiet=True), num)
    assert len(every) == 1000 and p0["rule"] == "one image per test caption"
    with pytest.warns(UserWarning, match="EVAL.NUM_IMAGES=5000 is more than the 1000"):
        assert len(eval_items(load_config(None, ["EVAL.NUM_IMAGES=5000"], quiet=True),
                              num)[0]) == 1000


def test_evaluation_generates_the_drawn_pairs_with_their_own_noise(data_dir, tiny_encoder_ckpt,
                                                                   tmp_path) -> None:
    """EVAL.NUM_IMAGES=40 of the 120 test captions: exactly those files, the protocol in
    metrics.json, and each picture identical to the one the every-caption protocol draws for
    the same pair; r_precision.py scores the same set without calling any missing."""
    import warnings

    from r_precision import score_tree
    from sampling import generate_test_set
    from trainer import GANTrainer

    base = [f"DATA_DIR={data_dir}", f"TRAIN.NET_E={tiny_encoder_ckpt}", *GAN_TINY]
    train = load_config(ROOT / "cfg" / "clip_shapes_DMGAN.yml",
                        [*base, f"OUTPUT_DIR={tmp_path / 'g'}", "TRAIN.MAX_EPOCH=1"], quiet=True)
    GANTrainer(train, CPU, progress=False).train()

    def evaluate(out: str, *extra: str):
        cfg = load_config(ROOT / "cfg" / "eval_clip_shapes.yml",
                          [*base, f"OUTPUT_DIR={tmp_path / out}",
                           f"TRAIN.NET_G={tmp_path / 'g' / 'Model'}", *extra], quiet=True)
        return cfg, generate_test_set(cfg, CPU, progress=False)

    cfg, part = evaluate("part", "EVAL.NUM_IMAGES=40")
    _, whole = evaluate("whole")
    assert part["images"] == 40 and part["protocol"]["images"] == 40
    assert whole["images"] == 120 and whole["protocol"]["rule"] == "one image per test caption"
    tree = sorted((tmp_path / "part" / "valid" / "single").rglob("*.png"))
    assert len(tree) == 40
    for path in tree:
        twin = tmp_path / "whole" / "valid" / "single" / path.relative_to(
            tmp_path / "part" / "valid" / "single")
        assert path.read_bytes() == twin.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "missing" would be a warning
        scored = score_tree(cfg, tmp_path / "part" / "valid" / "single", CPU, progress=False)
    assert scored["images"] == scored["expected_images"] == 40
    assert scored["protocol"] == part["protocol"]
    assert json.loads((tmp_path / "part" / "metrics.json").read_text())["protocol"]["seed"] == \
        part["protocol"]["seed"]


# ------------------------------------------------------------------------ two nodes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_their_own_data_copies(data_dir, tiny_encoder_ckpt, tmp_path) -> None:
    """Two torchrun 'nodes' (one process each, gloo over localhost), each given its own copy
    of the data: each node's first process builds that copy's caption cache, and both train
    together."""
    copies = [tmp_path / "node0" / "shapes", tmp_path / "node1" / "shapes"]
    for copy in copies:
        shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("cache"))
    port = _free_port()
    procs = []
    for rank, copy in enumerate(copies):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr",
               "127.0.0.1", "--master_port", str(port), "main.py", "--cfg",
               str(ROOT / "cfg" / "clip_shapes_DMGAN.yml"), "--data_dir", str(copy),
               "--no-progress",
               *[f"--set={s}" for s in (*GAN_TINY, "TRAIN.MAX_STEPS=3",
                                        f"TRAIN.NET_E={tiny_encoder_ckpt}",
                                        f"OUTPUT_DIR={tmp_path / 'out'}")]]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    for copy in copies:
        built = list((copy / "cache").glob("text_train_*/meta.json"))
        assert len(built) == 1, f"no caption cache built in {copy}"
    assert (tmp_path / "out" / "Model" / "state_step_3.pth").is_file()


def test_caption_cache_of_the_earlier_layout_still_reads(shapes_cfg, tiny_encoder_ckpt,
                                                         tmp_path) -> None:
    """Caches written before streaming hold words as [N, C, L, D]; the reader takes both."""
    from datasets import CaptionTokenizer, TextImageDataset, image_sizes
    from text_features import load_frozen_encoder, text_feature_cache

    cfg = shapes_cfg(f"CACHE_DIR={tmp_path / 'cache'}", f"TRAIN.NET_E={tiny_encoder_ckpt}",
                     "CLIP.MODEL=tiny", f"OUTPUT_DIR={tmp_path / 'out'}")
    data = TextImageDataset(cfg, "test", CaptionTokenizer(int(cfg.TEXT.WORDS_NUM)),
                            image_sizes(cfg), train=False, use_cache=False)
    encoder = load_frozen_encoder(cfg, CPU)
    new = text_feature_cache(cfg, "test", data.tokens, encoder, CPU, progress=False)
    idx, cap = torch.tensor([0, 5, 11]), torch.tensor([0, 3, 9])
    want = new.lookup(idx, cap)
    folder = next((tmp_path / "cache").glob("text_test_*"))
    words = np.load(folder / "words.npy")
    np.save(folder / "words.npy", words.reshape(*data.tokens.shape[:2], *words.shape[1:]))
    old = text_feature_cache(cfg, "test", data.tokens, encoder, CPU, progress=False)
    assert old.words.shape[:2] == data.tokens.shape[:2]
    for a, b in zip(old.lookup(idx, cap), want, strict=True):
        assert torch.equal(a, b)
