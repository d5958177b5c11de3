"""Minimal pairs: one-edit negative captions, left/right flips, the word-list files."""

from __future__ import annotations

import pytest
from easydict import EasyDict

from datasets import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, shapes_captions
from miscc.minimal_pairs import (
    WordLists,
    category_variants,
    flip_caption,
    load_word_lists,
    negatives_with_mask,
    one_edit_negatives,
    word_lists_for,
)

CAPTION = "an orange star in the top left on a white and gray background"


@pytest.fixture(scope="module")
def shapes():
    return load_word_lists("shapes")


@pytest.fixture(scope="module")
def birds():
    return load_word_lists("cub")


def test_shapes_lists_are_the_renderers_values(shapes):
    """The shapes word lists hold exactly what datasets.py draws, under the judge's names."""
    expect = {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES),
              "position": list(POSITIONS), "background": list(BACKGROUNDS)}
    assert {k: [g[0] for g in v] for k, v in shapes.categories.items()} == expect
    # every shapes caption names its attributes; phrases win over the words inside them
    caps = shapes_captions("star", "blue", "small", "bottom right", "light blue and white")
    assert shapes.named(caps[0]) == {"size": ["small"], "colour": ["blue"], "shape": ["star"],
                                     "position": ["bottom right"],
                                     "background": ["light blue and white"]}
    assert shapes.named(CAPTION) == {"colour": ["orange"], "shape": ["star"],
                                     "position": ["top left"], "background": ["white and gray"]}


def test_each_category_replaced(shapes):
    """Every category a caption names gets replacements: each other value exactly once, with the
    article made to agree; categories it does not name get none."""
    expected = {
        "colour": [f"{'an' if c[0] in 'aeiou' else 'a'} {c} star in the top left on a white "
                   "and gray background" for c in COLOURS if c != "orange"],
        "position": [f"an orange star in the {p} on a white and gray background"
                     for p in POSITIONS if p != "top left"],
        "background": [f"an orange star in the top left on a {b} background"
                       for b in BACKGROUNDS if b != "white and gray"],
        "shape": [f"an orange {s} in the top left on a white and gray background"
                  for s in SHAPES if s != "star"],
        "size": [],
    }
    for category, want in expected.items():
        assert category_variants(CAPTION, shapes, category) == want, category


def test_swaps_within_a_category(birds):
    """Two different values of a swap category trade places (binding): colours and parts."""
    caption = "this bird has red wings and a black crown"
    colours = category_variants(caption, birds, "colour")
    assert "this bird has black wings and a red crown" in colours
    parts = category_variants(caption, birds, "body part")
    assert "this bird has red crown and a black wings" in parts
    # a replacement of each listed word too; the two swaps are the only two-word edits
    assert "this bird has green wings and a black crown" in colours
    assert len(colours) == 2 * (len(birds.categories["colour"]) - 1) + 1


def test_swap_only_for_listed_categories():
    lists = WordLists({"colour": [["red"], ["blue"]]}, [], swap=())
    assert category_variants("red and blue", lists, "colour") == ["blue and blue",
                                                                  "red and red"]
    lists = WordLists({"colour": [["red"], ["blue"]]}, [], swap=("colour",))
    assert "blue and red" in category_variants("red and blue", lists, "colour")


def test_none_without_category_words(shapes, birds):
    caption = "there is something in this picture"
    assert one_edit_negatives(caption, shapes, 4, seed=0) == []
    assert one_edit_negatives("a bird with a song", birds, 4, seed=0) == []
    rows, mask = negatives_with_mask([caption, CAPTION], shapes, 3, seed=0)
    assert mask.tolist() == [[False] * 3, [True] * 3]
    assert rows[0] == [caption] * 3  # padding: the caption itself, masked out


def test_never_the_caption_itself():
    """Synonyms and equal values are not edits; a caption whose only edits give itself back
    (two synonyms swapped) gets nothing."""
    lists = WordLists({"colour": [["gray", "grey"], ["red"]]}, [], swap=("colour",))
    for seed in range(20):
        negs = one_edit_negatives("a gray and grey bird", lists, 10, seed)
        assert "a gray and grey bird" not in negs
        assert sorted(negs) == ["a gray and red bird", "a red and grey bird"]
        assert len(set(negs)) == len(negs)
    assert one_edit_negatives("a gray bird", WordLists({"c": [["gray", "grey"], ["x"]]}, []),
                              5, 0) == ["a x bird"]


def test_fewer_when_fewer_exist(shapes):
    caption = "a small shape"  # only a size: two replacements exist
    assert sorted(one_edit_negatives(caption, shapes, 5, seed=3)) == ["a large shape",
                                                                     "a medium shape"]


def test_deterministic_under_the_seed(shapes):
    a = one_edit_negatives(CAPTION, shapes, 4, seed=7)
    assert a == one_edit_negatives(CAPTION, shapes, 4, seed=7)
    assert len(a) == 4 and len(set(a)) == 4 and CAPTION not in a
    draws = {tuple(one_edit_negatives(CAPTION, shapes, 4, seed=s)) for s in range(10)}
    assert len(draws) > 1  # the seed matters
    # the four categories the caption names each appear once before any twice
    for s in range(10):
        negs = one_edit_negatives(CAPTION, shapes, 4, seed=s)
        changed = {next(c for c in shapes.categories if n in category_variants(CAPTION, shapes, c))
                   for n in negs}
        assert changed == {"shape", "colour", "position", "background"}


def test_flip_swaps_left_and_right(shapes):
    assert flip_caption(CAPTION, shapes) == CAPTION.replace("top left", "top right")
    assert flip_caption("Left of the right one", shapes) == "Right of the left one"
    assert flip_caption("a leftover in the center", shapes) == "a leftover in the center"
    assert flip_caption(flip_caption(CAPTION, shapes), shapes) == CAPTION


def test_word_list_errors(tmp_path):
    assert word_lists_for(EasyDict(TEXT=EasyDict(WORD_LISTS=""))) is None
    with pytest.raises(FileNotFoundError, match="TEXT.WORD_LISTS.*cub, coco|TEXT.WORD_LISTS"):
        load_word_lists("nope")
    bad = tmp_path / "bad.yml"
    bad.write_text("categories:\n  colour: [red, blue]\n  other: [red, green]\n")
    with pytest.raises(ValueError, match="'red' is listed twice"):
        load_word_lists(bad)
    bad.write_text("categories:\n  colour: [red, blue]\nswap: [size]\n")
    with pytest.raises(ValueError, match="'swap' lists categories"):
        load_word_lists(bad)
    for name in ("shapes", "cub", "coco"):  # the shipped files load
        assert load_word_lists(name).categories
