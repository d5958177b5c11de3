"""Minimal-pair accuracy: hand-computed answers on a made-up scorer, and stage 1's report."""

from __future__ import annotations

import pytest
import torch

from miscc.minimal_pairs import WordLists
from miscc.pair_metric import build_pair_set, minimal_pair_accuracy, score_pair_set

VOCAB = ("red", "blue", "green", "small", "large")
LISTS = WordLists({"colour": [["red"], ["blue"], ["green"]], "size": [["small"], ["large"]]},
                  [])


def bag_of_words(texts: list[str]) -> torch.Tensor:
    """A made-up text scorer: counts of the five listed words, plus 0.1 on a sixth axis."""
    rows = [[t.split().count(w) for w in VOCAB] + [0.1, 0.0] for t in texts]
    return torch.tensor(rows, dtype=torch.float32)


def axis(*names: str) -> list[float]:
    v = [0.0] * 7
    for n in names:
        v[VOCAB.index(n) if n in VOCAB else 6] = 1.0
    return v


CAPTIONS = [["a red ball"],                              # 0: code red -> colour hit
            ["a small blue ball", "a large thing"],      # 1: size asked with "a large thing"
            ["a green ball"],                            # 2: code red -> colour miss
            ["nothing here"],                            # 3: names nothing -> no query
            ["a red ball"]]                              # 4: code off every text -> ties: miss
CODES = torch.tensor([axis("red"), axis("blue", "small"), axis("red"), axis("red"),
                      axis("other")])


def test_hand_computed_answers():
    """colour: images 0, 1, 2, 4 asked, hits 0 and 1 (2 of 4), each against 2 variants
    (chance 1/3); size: image 1 only, its caption 1 ('a large thing', scanned from 1 mod 2)
    against 'a small thing' while the code is small: a miss (chance 1/2)."""
    result = minimal_pair_accuracy(CODES, CAPTIONS, LISTS, bag_of_words)
    assert result["colour"] == pytest.approx({"accuracy": 0.5, "chance": 1 / 3, "count": 4})
    assert result["size"] == pytest.approx({"accuracy": 0.0, "chance": 0.5, "count": 1})
    assert result["mean"] == pytest.approx({"accuracy": 0.25, "chance": 5 / 12, "count": 5})
    pairs = build_pair_set(CAPTIONS, LISTS)
    assert pairs.owner == [0, 1, 1, 2, 4]
    assert pairs.texts[2] == ["a large thing", "a small thing"]
    assert pairs.texts[1][0] == "a small blue ball"


def test_variant_cap_and_image_cap():
    """At most `max_variants` variants per query (chance follows), first `max_images` only;
    an encoder that separates colours gets every colour query right whatever the sample."""
    pairs = build_pair_set(CAPTIONS, LISTS, max_variants=1, max_images=2, seed=3)
    assert pairs.owner == [0, 1, 1] and all(len(t) == 2 for t in pairs.texts)
    result = score_pair_set(CODES, pairs, bag_of_words, batch=2)  # batches of texts too
    assert result["colour"] == pytest.approx({"accuracy": 1.0, "chance": 0.5, "count": 2})
    assert build_pair_set(CAPTIONS, LISTS, 1, seed=3).texts == \
        build_pair_set(CAPTIONS, LISTS, 1, seed=3).texts


def test_no_queries_gives_an_empty_result():
    assert minimal_pair_accuracy(CODES[3:4], [["nothing here"]], LISTS, bag_of_words) == {}


def test_generated_images_against_their_own_caption():
    """Each generated image is asked about its one caption only; max_images spreads the picks
    evenly: of 5 images, 3 keep rows 0, 2 and 4 (colour hit, miss, tie-miss; no size query)."""
    from miscc.pair_metric import generated_pair_accuracy

    captions = [c[0] for c in CAPTIONS]
    result = generated_pair_accuracy(CODES, captions, LISTS, bag_of_words)
    # image 1 now asks about "a small blue ball" only: colour and size both hit
    assert result["colour"] == pytest.approx({"accuracy": 0.5, "chance": 1 / 3, "count": 4})
    assert result["size"] == pytest.approx({"accuracy": 1.0, "chance": 0.5, "count": 1})
    spread = generated_pair_accuracy(CODES, captions, LISTS, bag_of_words, max_images=3)
    assert spread == {"colour": pytest.approx({"accuracy": 1 / 3, "chance": 1 / 3, "count": 3}),
                      "mean": pytest.approx({"accuracy": 1 / 3, "chance": 1 / 3, "count": 3})}
