"""Minimal pairs: captions that differ from a true caption in one place (docs/DESIGN.md §14).

Word categories (colour, size, shape, position, ...) are data, one YAML file per data-set
family under `cfg/words/` (`TEXT.WORD_LISTS`: a stem there, or a path). From them:

    lists = load_word_lists("shapes")
    one_edit_negatives(caption, lists, k, seed)   # <= k distinct one-edit variants, never caption
    negatives_with_mask(captions, lists, k, seed) # padded to k per caption + a [N, k] bool mask
    category_variants(caption, lists, category)   # every one-edit variant within one category
    flip_caption(caption, lists)                  # left <-> right, for a mirrored picture
    with_value(caption, lists, category, value)   # the caption of a picture redrawn with value
    lists.named(caption)                          # {category: [canonical value, ...]}

An edit either replaces one listed word/phrase by another value of its category, or swaps two
different values of one category inside the caption (which colour goes with which part; only
for the categories the file lists under `swap`). An article before a replaced word is made to
agree ("an orange" -> "a red"), so a negative is not told apart by its grammar. Everything is
deterministic under the seed (Python's `random`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

WORDS_DIR = Path(__file__).resolve().parents[1] / "cfg" / "words"


@dataclass(frozen=True)
class Span:
    """One listed word/phrase found in a caption: [start, end) characters, its category and
    the index of its value (a synonym group) within the category."""

    start: int
    end: int
    category: str
    value: int


class WordLists:
    """Word categories of one data-set family: values (synonym groups, the first member is the
    canonical spelling used in edits) per category, and the left/right pairs of a flip."""

    def __init__(self, categories: dict[str, list[list[str]]], flip: list[tuple[str, str]],
                 swap: tuple[str, ...] = (), source: str = "<memory>") -> None:
        self.categories, self.flip_pairs, self.source = categories, flip, source
        self.swap = tuple(swap)  # categories whose words may trade places (binding edits)
        self._lookup: dict[str, tuple[str, int]] = {}
        for category, values in categories.items():
            for v, group in enumerate(values):
                for phrase in group:
                    key = _normal(phrase)
                    if key in self._lookup:
                        raise ValueError(f"{source}: {phrase!r} is listed twice "
                                         f"({self._lookup[key][0]} and {category})")
                    self._lookup[key] = (category, v)
        # longest phrases first, so "light blue and white" wins over "blue" and "white"
        phrases = sorted(self._lookup, key=len, reverse=True)
        self._pattern = re.compile(
            r"(?<!\w)(" + "|".join(r"\s+".join(map(re.escape, p.split())) for p in phrases)
            + r")(?!\w)", re.IGNORECASE) if phrases else None
        flips = {a.lower(): b for a, b in flip} | {b.lower(): a for a, b in flip}
        self._flips = flips
        self._flip_pattern = re.compile(
            r"(?<!\w)(" + "|".join(map(re.escape, sorted(flips, key=len, reverse=True)))
            + r")(?!\w)", re.IGNORECASE) if flips else None

    def find(self, caption: str) -> list[Span]:
        """The listed words/phrases of `caption`, left to right, non-overlapping."""
        if self._pattern is None:
            return []
        out = []
        for m in self._pattern.finditer(caption):
            category, value = self._lookup[_normal(m.group(0))]
            out.append(Span(m.start(), m.end(), category, value))
        return out

    def flip(self, caption: str) -> str:
        """`caption` with every flip pair exchanged (see `flip_caption`)."""
        if self._flip_pattern is None:
            return caption

        def swap(m: re.Match) -> str:
            word = self._flips[m.group(0).lower()]
            return word.capitalize() if m.group(0)[0].isupper() else word

        return self._flip_pattern.sub(swap, caption)

    def named(self, caption: str) -> dict[str, list[str]]:
        """{category: canonical values named in `caption`, in order} (categories it names)."""
        out: dict[str, list[str]] = {}
        for s in self.find(caption):
            out.setdefault(s.category, []).append(self.categories[s.category][s.value][0])
        return out


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _parse(data, source: str) -> WordLists:
    """WordLists from the parsed YAML mapping {categories: {name: [entry, ...]},
    swap: [category, ...], flip: [[a, b], ...]}."""
    if not isinstance(data, dict) or not isinstance(data.get("categories"), dict):
        raise ValueError(f"{source}: expected a mapping with a 'categories' mapping "
                         "(category: [word, phrase or [synonyms], ...])")
    categories: dict[str, list[list[str]]] = {}
    for name, entries in data["categories"].items():
        if not isinstance(entries, list) or len(entries) < 2:
            raise ValueError(f"{source}: category {name!r} needs a list of at least two values")
        groups = []
        for entry in entries:
            group = entry if isinstance(entry, list) else [entry]
            if not group or not all(isinstance(w, str) and w.strip() for w in group):
                raise ValueError(f"{source}: category {name!r} has an empty or non-text "
                                 f"entry {entry!r}")
            groups.append([_normal(w) for w in group])
        categories[str(name)] = groups
    flip = []
    for pair in data.get("flip") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(w, str)
                                                                  for w in pair)):
            raise ValueError(f"{source}: 'flip' entries are [word, word] pairs, got {pair!r}")
        flip.append((pair[0].strip(), pair[1].strip()))
    swap = data.get("swap") or []
    unknown = [c for c in swap if c not in categories]
    if not isinstance(swap, list) or unknown:
        raise ValueError(f"{source}: 'swap' lists categories of this file, got {swap!r}")
    return WordLists(categories, flip, tuple(swap), source)


def load_word_lists(name: str | Path) -> WordLists:
    """The word lists `cfg/words/<name>.yml`, or the YAML file at path `name`."""
    path = Path(name)
    if path.suffix not in (".yml", ".yaml"):
        path = WORDS_DIR / f"{name}.yml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in WORDS_DIR.glob("*.yml")))
        raise FileNotFoundError(f"TEXT.WORD_LISTS: no word lists {str(name)!r} (expected a "
                                f"stem of cfg/words/: {known}, or a .yml path)")
    return _parse(yaml.safe_load(path.read_text()), str(path))


def word_lists_for(cfg) -> WordLists | None:
    """The word lists TEXT.WORD_LISTS names, or None when it is empty (minimal pairs off)."""
    name = str(cfg.TEXT.WORD_LISTS)
    return load_word_lists(name) if name else None


def check_word_lists(lists: WordLists, captions: list[list[str]], cfg) -> None:
    """Fail at start-up (a DataError naming TEXT.WORD_LISTS and the data folder) when no
    caption of the data holds a word of the lists: every one-edit negative, picture edit and
    minimal-pair score would then silently be empty (e.g. the shapes lists on bird captions)."""
    from datasets import DataError

    if any(lists.find(c) for caps in captions for c in caps):
        return
    raise DataError(f"TEXT.WORD_LISTS {cfg.TEXT.WORD_LISTS}: none of its words occurs in the "
                    f"captions of {cfg.DATA_DIR}; name the lists of this data's family "
                    "(cfg/words/: shapes, cub, coco) or set TEXT.WORD_LISTS: '' to turn minimal "
                    "pairs off")


# ------------------------------------------------------------------------------ edits
def _agree_article(text: str, start: int, word: str) -> tuple[str, int]:
    """`text` with an "a"/"an" that ends right before `start` made to agree with `word`;
    returns (text, shift of `start`)."""
    m = re.search(r"(?<!\w)(an?)(\s+)$", text[:start], re.IGNORECASE)
    if m is None:
        return text, 0
    article = "an" if word[:1].lower() in "aeiou" else "a"
    if m.group(1)[0].isupper():
        article = article.capitalize()
    new = text[: m.start(1)] + article + text[m.end(1):]
    return new, len(article) - len(m.group(1))


def _replace(caption: str, edits: list[tuple[Span, str]]) -> str:
    """Apply (span, new words) edits, right to left, fixing the article before each."""
    out = caption
    for span, word in sorted(edits, key=lambda e: -e[0].start):
        if caption[span.start].isupper():
            word = word[:1].upper() + word[1:]
        out = out[: span.start] + word + out[span.end:]
        out, _ = _agree_article(out, span.start, word)
    return out


def _edits(caption: str, lists: WordLists, category: str | None = None
           ) -> dict[tuple[str, str], list[str]]:
    """Every one-edit variant of `caption`, bucketed by (kind, category), deduplicated and
    never equal to the caption; kind is "replace" or "swap"."""
    spans = [s for s in lists.find(caption) if category is None or s.category == category]
    seen = {_normal(caption)}
    buckets: dict[tuple[str, str], list[str]] = {}

    def add(kind: str, cat: str, text: str) -> None:
        if _normal(text) not in seen:
            seen.add(_normal(text))
            buckets.setdefault((kind, cat), []).append(text)

    for s in spans:
        for v, group in enumerate(lists.categories[s.category]):
            if v != s.value:
                add("replace", s.category, _replace(caption, [(s, group[0])]))
    for i, s in enumerate(spans):
        for t in spans[i + 1:]:
            if s.category == t.category and s.value != t.value and s.category in lists.swap:
                a, b = caption[s.start: s.end], caption[t.start: t.end]
                add("swap", s.category, _replace(caption, [(s, b), (t, a)]))
    return buckets


def one_edit_negatives(caption: str, lists: WordLists, k: int, seed: int) -> list[str]:
    """Up to `k` distinct one-edit variants of `caption` (fewer when it has fewer; none when it
    names no listed word), never the caption itself. The kinds of edit (replace / swap, per
    category) take turns in a seeded random order, so every category a caption names is used
    before any is used twice."""
    rng = random.Random(seed)
    buckets = [list(v) for _, v in sorted(_edits(caption, lists).items())]
    for b in buckets:
        rng.shuffle(b)
    rng.shuffle(buckets)
    out: list[str] = []
    while len(out) < k and any(buckets):
        for b in buckets:
            if b and len(out) < k:
                out.append(b.pop())
    return out


def negatives_with_mask(captions: list[str], lists: WordLists, k: int, seed: int
                        ) -> tuple[list[list[str]], torch.Tensor]:
    """`one_edit_negatives` of each caption (seed + its position), each list padded to `k`
    with the caption itself, and a [len(captions), k] bool mask, True at real negatives."""
    rows, mask = [], torch.zeros(len(captions), k, dtype=torch.bool)
    for i, caption in enumerate(captions):
        negs = one_edit_negatives(caption, lists, k, seed + i)
        mask[i, : len(negs)] = True
        rows.append(negs + [caption] * (k - len(negs)))
    return rows, mask


def category_variants(caption: str, lists: WordLists, category: str) -> list[str]:
    """Every one-edit variant of `caption` within `category` (each of its words replaced by
    every other value, and swaps of two of its words), deduplicated, never the caption."""
    return [t for texts in _edits(caption, lists, category).values() for t in texts]


def with_value(caption: str, lists: WordLists, category: str, value: str) -> str:
    """`caption` with every word of `category` replaced by `value` (a value's first spelling;
    articles agree); unchanged when it names no word of the category."""
    spans = [s for s in lists.find(caption) if s.category == category]
    return _replace(caption, [(s, value) for s in spans])


def flip_caption(caption: str, lists: WordLists) -> str:
    """The caption of the mirrored picture: every flip pair (left/right) exchanged at once,
    keeping a capital first letter."""
    return lists.flip(caption)
