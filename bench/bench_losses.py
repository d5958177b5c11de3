"""Benchmark: batched DAMSM word loss vs. a straightforward per-pair loop (CPU, float32).

Not a test. Run ``python bench/bench_losses.py`` from anywhere; prints forward+backward
times, the loop/batched ratio and the largest differences in losses and gradients.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from miscc.losses import nt_xent, sent_loss, words_loss

B, T, R, D = 48, 30, 49, 512
G1, G2, G3 = 4.0, 5.0, 10.0


def loop_words_loss(words, word_mask, regions, class_ids, g1, g2, g3):
    """Baseline: the same math with one (caption i, image j) pair at a time."""
    b = words.shape[0]
    rows = []
    for j in range(b):  # image
        v = regions[j]  # [R, D]
        v_hat = F.normalize(v, dim=-1, eps=1e-8)
        row = []
        for i in range(b):  # caption
            e = words[i][word_mask[i]]  # [L, D]
            s = F.normalize(e, dim=-1, eps=1e-8) @ v_hat.t()  # cosines [L, R]
            alpha = torch.softmax(g1 * torch.softmax(s, dim=0), dim=1)
            c = alpha @ v
            r = F.cosine_similarity(c, e, dim=-1)
            row.append(g3 * torch.logsumexp(g2 * r, dim=0) / g2)
        rows.append(torch.stack(row))
    scores = torch.stack(rows)  # [image, caption]
    if class_ids is not None:
        same = class_ids[:, None] == class_ids[None, :]
        same.fill_diagonal_(False)
        scores = scores.masked_fill(same, float("-inf"))
    labels = torch.arange(b)
    return F.cross_entropy(scores, labels), F.cross_entropy(scores.t(), labels)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor produced by any aten op (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def fwd_bwd(fn: Callable, words, mask, regions, cid):
    w = words.clone().requires_grad_(True)
    r = regions.clone().requires_grad_(True)
    out = fn(w, mask, r, cid, G1, G2, G3)
    (out[0] + out[1]).backward()
    return out[0].detach(), out[1].detach(), w.grad, r.grad


def timeit(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000.0 * times[len(times) // 2]  # median, ms


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, float32")
    words = torch.randn(B, T, D)
    regions = torch.randn(B, R, D)
    lengths = torch.randint(8, T + 1, (B,))
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    cid = torch.randint(0, 20, (B,))  # some repeated classes
    print(f"words_loss fwd+bwd: B={B} T={T} (lengths {int(lengths.min())}..{int(lengths.max())})"
          f" R={R} D={D}, class masking on")

    batched = fwd_bwd(words_loss, words, mask, regions, cid)
    looped = fwd_bwd(loop_words_loss, words, mask, regions, cid)
    dl = max((batched[k] - looped[k]).abs().item() for k in (0, 1))
    dg = max((batched[k] - looped[k]).abs().max().item() for k in (2, 3))
    gscale = max(looped[k].abs().max().item() for k in (2, 3))

    t_b = timeit(lambda: fwd_bwd(words_loss, words, mask, regions, cid), reps=10)
    # the loop was already run once by the check above, so no extra warm-up
    t_l = timeit(lambda: fwd_bwd(loop_words_loss, words, mask, regions, cid), reps=2, warmup=0)
    print(f"  batched   {t_b:9.2f} ms")
    print(f"  loop      {t_l:9.2f} ms")
    print(f"  speed ratio loop/batched: {t_l / t_b:.1f}x")
    print(f"  max |loss diff| {dl:.3e}   max |grad diff| {dg:.3e} (max |grad| {gscale:.3e})")
    with LargestTensor() as probe:
        fwd_bwd(words_loss, words, mask, regions, cid)
    print(f"  largest tensor in batched fwd+bwd: {probe.largest:,} elements "
          f"(B*B*T*R = {B * B * T * R:,}; B*B*T*D would be {B * B * T * D:,})")

    code = torch.randn(B, D)
    sent = torch.randn(B, D)

    def sent_step():
        c = code.clone().requires_grad_(True)
        s = sent.clone().requires_grad_(True)
        l0, l1 = sent_loss(c, s, cid, G3)
        (l0 + l1).backward()

    def ntx_step():
        a = code.clone().requires_grad_(True)
        b = sent.clone().requires_grad_(True)
        nt_xent(a, b, 0.5).backward()

    print(f"sent_loss fwd+bwd B={B} D={D}: {timeit(sent_step, reps=50):.3f} ms")
    print(f"nt_xent   fwd+bwd B={B} D={D}: {timeit(ntx_step, reps=50):.3f} ms")


if __name__ == "__main__":
    main()
