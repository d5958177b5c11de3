"""AttnGAN-layout text-image data (CUB birds, COCO, the synthetic shapes set).

Reads the layout of docs/DESIGN.md §4, crops birds around their boxes, tokenizes captions with
CLIP's BPE once at start-up, and serves random crops at every GAN scale plus two captions per
image.
The decoded, cropped, resized images can be cached once in a memory-mapped uint8 file
(`prepare_data.py cache`) so epochs never re-decode JPEGs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from miscc.utils import NpyWriter, atomic_write_bytes, disk_writes

BIRDS_LAYOUT = """\
  <DATA_DIR>/train/filenames.pickle   <DATA_DIR>/test/filenames.pickle
  <DATA_DIR>/train/class_info.pickle  <DATA_DIR>/test/class_info.pickle
  <DATA_DIR>/text/<key>.txt
  <DATA_DIR>/CUB_200_2011/images/<key>.jpg
  <DATA_DIR>/CUB_200_2011/images.txt  <DATA_DIR>/CUB_200_2011/bounding_boxes.txt"""

COCO_LAYOUT = """\
  <DATA_DIR>/train/filenames.pickle   <DATA_DIR>/test/filenames.pickle
  <DATA_DIR>/text/<key>.txt
  <DATA_DIR>/images/<key>.jpg"""

MAX_BAD_FRACTION = 0.01  # more unreadable images than this (and more than 2) is an error


class DataError(RuntimeError):
    """A user-fixable problem with the data directory (missing files, too many bad images)."""


# --------------------------------------------------------------------------- safe pickles
_SAFE_BUILTINS = {"list", "dict", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                  "int", "float", "bool", "complex"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only builtin containers and scalars: a data file must never execute code."""

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: metadata pickles may only hold lists, dicts, "
            "strings and numbers"
        )


def safe_load_pickle(path: str | Path):
    """Load a (possibly Python-2) metadata pickle with the restricted unpickler."""
    path = Path(path)
    with path.open("rb") as handle:
        try:
            return _RestrictedUnpickler(handle, encoding="latin1").load()
        except pickle.UnpicklingError as err:
            raise DataError(f"{path}: {err}") from err
        except (EOFError, ValueError) as err:
            raise DataError(f"{path}: not a readable pickle ({err})") from err


def write_pickle(obj, path: str | Path) -> None:
    """Write a metadata pickle (protocol 2, as the distributed files) atomically."""
    atomic_write_bytes(path, pickle.dumps(obj, protocol=2))


# ----------------------------------------------------------------------------- tokenizer
class CaptionTokenizer:
    """CLIP BPE tokenization to a fixed length: [SOT, words…, EOT, 0…] of WORDS_NUM + 2.

    Captions longer than `words_num` BPE tokens are cut (the count is kept in `truncated`).
    """

    CLIP_CONTEXT = 77

    def __init__(self, words_num: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        if not 1 <= words_num <= self.CLIP_CONTEXT - 2:
            raise ValueError(f"TEXT.WORDS_NUM must be in 1..75 (CLIP context 77), got {words_num}")
        self._bpe = SimpleTokenizer()
        self.words_num = words_num
        self.context = words_num + 2
        self.sot = self._bpe.sot_token_id
        self.eot = self._bpe.eot_token_id
        self.truncated = 0

    def length(self, text: str) -> int:
        """How many BPE word tokens `text` has (more than `words_num` are cut by `encode`)."""
        return len(self._bpe.encode(text))

    def encode(self, text: str) -> torch.Tensor:
        """Token ids [context] for one caption."""
        ids = self._bpe.encode(text)
        if len(ids) > self.words_num:
            self.truncated += 1
            ids = ids[: self.words_num]
        out = torch.zeros(self.context, dtype=torch.long)
        out[: len(ids) + 2] = torch.tensor([self.sot, *ids, self.eot])
        return out

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Token ids [len(texts), context]."""
        if not texts:
            return torch.zeros(0, self.context, dtype=torch.long)
        return torch.stack([self.encode(t) for t in texts])

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """The BPE word pieces of one caption (no SOT/EOT/padding), for attention-map titles."""
        ids = [int(t) for t in tokens if int(t) not in (0, self.sot, self.eot)]
        return [self._bpe.decode([i]).strip() for i in ids]


# -------------------------------------------------------------------------------- layout
@dataclass
class SplitInfo:
    """What one split of a data directory holds after validation."""

    keys: list[str]
    class_ids: list[int]
    captions: list[list[str]]
    image_paths: list[Path]
    boxes: list[tuple[float, float, float, float] | None]
    skipped_missing: list[str] = field(default_factory=list)
    skipped_no_caption: list[str] = field(default_factory=list)
    empty_lines: int = 0


def is_coco(cfg) -> bool:
    """COCO layout (images/, no boxes) when DATASET_NAME names COCO; birds layout otherwise."""
    return str(cfg.DATASET_NAME).lower().startswith("coco")


def _require(path: Path, layout: str, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} not found: {path}\nExpected layout:\n{layout}")


def read_boxes(root: Path) -> dict[str, tuple[float, float, float, float]]:
    """CUB boxes by image key, from images.txt + bounding_boxes.txt."""
    cub = root / "CUB_200_2011"
    for name in ("images.txt", "bounding_boxes.txt"):
        _require(cub / name, BIRDS_LAYOUT, "CUB metadata file")
    ids = {}
    for line in (cub / "images.txt").read_text().splitlines():
        if line.strip():
            idx, rel = line.split(maxsplit=1)
            ids[idx] = rel.strip().rsplit(".", 1)[0]
    boxes = {}
    for line in (cub / "bounding_boxes.txt").read_text().splitlines():
        if line.strip():
            idx, *vals = line.split()
            boxes[ids[idx]] = tuple(float(v) for v in vals[:4])
    return boxes


def read_split(cfg, split: str) -> SplitInfo:
    """Validate and read one split's filenames, class ids, captions, image paths and boxes."""
    root = Path(cfg.DATA_DIR)
    coco = is_coco(cfg)
    layout = COCO_LAYOUT if coco else BIRDS_LAYOUT
    if not str(cfg.DATA_DIR) or not root.is_dir():
        raise DataError(f"DATA_DIR {str(cfg.DATA_DIR)!r} is not a directory.\n"
                        f"Expected layout:\n{layout}")
    names_file = root / split / "filenames.pickle"
    _require(names_file, layout, f"{split} file list")
    keys = [str(k) for k in safe_load_pickle(names_file)]
    if coco:
        class_ids = list(range(len(keys)))
        image_dir, boxes_by_key = root / "images", {}
    else:
        class_file = root / split / "class_info.pickle"
        _require(class_file, layout, f"{split} class ids")
        class_ids = [int(c) for c in safe_load_pickle(class_file)]
        if len(class_ids) != len(keys):
            raise DataError(f"{class_file}: {len(class_ids)} class ids for {len(keys)} filenames")
        image_dir, boxes_by_key = root / "CUB_200_2011" / "images", read_boxes(root)
    _require(root / "text", layout, "caption directory")
    _require(image_dir, layout, "image directory")

    info = SplitInfo([], [], [], [], [])
    per_image = int(cfg.TEXT.CAPTIONS_PER_IMAGE)
    for key, cls in zip(keys, class_ids, strict=True):
        image_path = image_dir / f"{key}.jpg"
        text_path = root / "text" / f"{key}.txt"
        if not image_path.is_file() or not text_path.is_file():
            info.skipped_missing.append(key)
            continue
        lines = text_path.read_text(encoding="utf-8", errors="replace").splitlines()
        caps = [ln.strip() for ln in lines if ln.strip()]
        info.empty_lines += len(lines) - len(caps)
        if not caps:
            info.skipped_no_caption.append(key)
            continue
        info.keys.append(key)
        info.class_ids.append(cls)
        info.captions.append(caps[:per_image])
        info.image_paths.append(image_path)
        info.boxes.append(boxes_by_key.get(key))
    if not info.keys:
        raise DataError(f"{root}/{split}: no usable images (missing {len(info.skipped_missing)}, "
                        f"without captions {len(info.skipped_no_caption)})")
    return info


# -------------------------------------------------------------------------------- images
def crop_box(img: Image.Image, box: tuple[float, float, float, float] | None) -> Image.Image:
    """Square of side 1.5·max(w, h) centred on the box, clipped to the image (AttnGAN's crop)."""
    if box is None:
        return img
    x, y, w, h = box
    r = int(max(w, h) * 0.75)
    cx, cy = int((2 * x + w) / 2), int((2 * y + h) / 2)
    width, height = img.size
    left, right = max(0, cx - r), min(width, cx + r)
    top, bottom = max(0, cy - r), min(height, cy + r)
    return img.crop((left, top, right, bottom))


def square_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and centre-crop the longer one to a square."""
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(path: Path, box, size: int) -> np.ndarray:
    """Decode, crop and resize one image to uint8 [size, size, 3]; raises OSError if unreadable."""
    with Image.open(path) as img:
        img.load()
        rgb = img.convert("RGB")
    return np.array(square_resize(crop_box(rgb, box), size), dtype=np.uint8)


def image_sizes(cfg) -> list[int]:
    """The GAN scales: BASE_SIZE · 2^i for i < BRANCH_NUM."""
    return [int(cfg.TREE.BASE_SIZE) * 2**i for i in range(int(cfg.TREE.BRANCH_NUM))]


def load_size_for(sizes: list[int]) -> int:
    """Stored/decoded size before the random crop: 76/64 of the largest scale (AttnGAN)."""
    return int(max(sizes) * 76 / 64)


# --------------------------------------------------------------------------------- cache
def cache_root(cfg) -> Path:
    """Where the caches of a data set live: CACHE_DIR, or <DATA_DIR>/cache when it is empty."""
    return Path(cfg.CACHE_DIR) if str(cfg.CACHE_DIR) else Path(cfg.DATA_DIR) / "cache"


def cache_paths(cfg, split: str, size: int) -> tuple[Path, Path]:
    """(array file, index file) of the preprocessed image cache for a split at a size."""
    base = cache_root(cfg) / f"{split}_{size}px"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def keys_digest(keys: list[str]) -> str:
    """A short hash of an image list (detects a changed split)."""
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]


def build_image_cache(cfg, split: str, size: int, progress: bool = True) -> dict:
    """Decode+crop+resize every image of `split` once into `<DATA_DIR>/cache/<split>_<size>px.npy`.

    Unreadable images are recorded (and later skipped). The array is written to a temp file
    and renamed, then the index; an interrupted build leaves no half cache behind.
    """
    from tqdm import tqdm

    info = read_split(cfg, split)
    array_path, index_path = cache_paths(cfg, split, size)
    tmp = array_path.with_name(f".{array_path.name}.tmp")
    bad: list[str] = []
    needed = len(info.keys) * size * size * 3
    with disk_writes(array_path, needed, cleanup=[tmp]):  # full disk / read-only: DiskError
        array_path.parent.mkdir(parents=True, exist_ok=True)
        out = NpyWriter(tmp, (len(info.keys), size, size, 3), np.uint8)  # flat memory
        for key, path, box in tqdm(list(zip(info.keys, info.image_paths, info.boxes,
                                            strict=True)),
                                   desc=f"cache {split} {size}px", disable=not progress):
            try:
                pixels = load_image(path, box, size)
            except (OSError, ValueError, SyntaxError) as err:
                bad.append(key)
                warnings.warn(f"unreadable image skipped: {path} ({err})", stacklevel=2)
                pixels = np.zeros((size, size, 3), np.uint8)
            out.write(pixels[None])
        out.close()
        tmp.replace(array_path)
    index = {"keys": info.keys, "digest": keys_digest(info.keys), "size": size, "bad": bad}
    atomic_write_bytes(index_path, json.dumps(index).encode())
    return index


def open_image_cache(cfg, split: str, size: int, keys: list[str]) -> tuple[np.ndarray, set[str]]:
    """Memory-map a cache built for exactly `keys`; returns (array, bad keys) or raises."""
    array_path, index_path = cache_paths(cfg, split, size)
    if not array_path.is_file() or not index_path.is_file():
        raise FileNotFoundError(array_path)
    index = json.loads(index_path.read_text())
    if index.get("digest") != keys_digest(keys):
        raise DataError(f"{array_path} was built for another image list; "
                        "rebuild it with `python prepare_data.py cache --cfg <config>`")
    return np.load(array_path, mmap_mode="r"), set(index.get("bad", []))


# ------------------------------------------------------------------------------- dataset
class CroppedImages(Dataset):
    """The image half of a dataset: decode (or read from the cache), skip and count unreadable
    images, and cut random (train) or centre crops at every size in `sizes`, in [-1, 1].

    Subclasses set what each item adds (captions for `TextImageDataset`; nothing for the
    caption-free tokenizer data of `clipgen/data.py`).
    """

    def __init__(self, keys: list[str], paths: list[Path], boxes: list, split: str,
                 sizes: list[int], views: int = 1, train: bool = True, flip: bool = True,
                 cache: np.ndarray | None = None, bad: set[str] | None = None,
                 random_crop: bool = True) -> None:
        self.keys, self.image_paths, self.boxes = keys, paths, boxes
        self.split, self.sizes, self.views, self.train = split, sorted(sizes), views, train
        self.crop = max(sizes)
        # random_crop=False (TRAIN.RANDOM_CROP): training sees the whole frame at the test
        # scale, as evaluation does (captions that name size and position stay true)
        self.load_size = load_size_for(sizes) if train and random_crop else self.crop
        self.flip = train and flip
        self.same_flip = False  # True: all views of an item share the first view's coin
        self.cache, self.bad = cache, bad or set()
        self._failures: set[int] = set()

    def __len__(self) -> int:
        return len(self.keys)

    def _pixels(self, index: int) -> np.ndarray:
        if self.cache is not None:
            return np.array(self.cache[index])  # copy out of the read-only memory map
        return load_image(self.image_paths[index], self.boxes[index], self.load_size)

    def _usable(self, index: int) -> tuple[int, np.ndarray]:
        """Pixels of `index`, or of the next readable image (unreadable ones are counted)."""
        for step in range(len(self)):
            i = (index + step) % len(self)
            if self.keys[i] in self.bad or i in self._failures:
                continue
            try:
                return i, self._pixels(i)
            except (OSError, ValueError, SyntaxError) as err:
                self._failures.add(i)
                warnings.warn(f"unreadable image skipped: {self.image_paths[i]} ({err})",
                              stacklevel=2)
                limit = max(2, int(MAX_BAD_FRACTION * len(self)))
                if len(self._failures) + len(self.bad) > limit:
                    raise DataError(
                        f"{len(self._failures) + len(self.bad)} unreadable images in the "
                        f"{self.split} split (more than {MAX_BAD_FRACTION:.0%}); run "
                        "`python prepare_data.py check --cfg <config>` to list them"
                    ) from err
        raise DataError(f"no readable image in the {self.split} split")

    @property
    def skipped(self) -> int:
        """Images skipped as unreadable so far (this process) plus those the cache marked bad."""
        return len(self._failures) + len(self.bad)

    def _view_params(self, h: int, w: int) -> tuple[int, int, bool]:
        """(top, left, mirrored) of one view: a random crop and coin in training (the coin is
        tossed even with flips off, so both settings see the same crops), the centre crop
        otherwise."""
        if not self.train:
            return (h - self.crop) // 2, (w - self.crop) // 2, False
        top = int(torch.randint(0, h - self.crop + 1, ()))
        left = int(torch.randint(0, w - self.crop + 1, ()))
        return top, left, bool(torch.rand(()) < 0.5) and self.flip

    def _apply_view(self, pixels: torch.Tensor, top: int, left: int,
                    mirrored: bool) -> list[torch.Tensor]:
        """The crop at (top, left) of a [3, H, W] uint8 image, mirrored or not, resized to
        every scale, in [-1, 1]."""
        crop = pixels[:, top: top + self.crop, left: left + self.crop].float()
        if mirrored:
            crop = crop.flip(-1)
        out = []
        for size in self.sizes:
            img = crop if size == self.crop else F.interpolate(
                crop[None], size=(size, size), mode="bilinear", antialias=True,
                align_corners=False)[0]
            out.append((img / 127.5 - 1.0).clamp_(-1.0, 1.0))
        return out

    def _view(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """One crop/flip of a [3, H, W] uint8 image, resized to every scale, in [-1, 1]."""
        return self._apply_view(pixels, *self._view_params(*pixels.shape[1:]))

    def views_of(self, index: int) -> tuple[int, list[torch.Tensor]]:
        """(the index actually read, per size a [views, 3, s, s] tensor) for item `index`."""
        index, imgs, _ = self.views_with_params(index)
        return index, imgs

    def views_with_params(self, index: int) -> tuple[int, list[torch.Tensor], list[tuple]]:
        """`views_of` plus each view's (top, left, mirrored), to transform other pictures (or
        edit captions) the same way."""
        index, pixels = self._usable(index)
        chw = torch.from_numpy(pixels).permute(2, 0, 1)
        params = [self._view_params(*chw.shape[1:]) for _ in range(self.views)]
        if self.same_flip:  # every view mirrored as the first (captions follow the flip)
            params = [(top, left, params[0][2]) for top, left, _ in params]
        views = [self._apply_view(chw, *p) for p in params]
        return index, [torch.stack([v[s] for v in views]) for s in range(len(self.sizes))], params


class TextImageDataset(CroppedImages):
    """One item per image: random crops at every scale (`views` of them) + two captions.

    Item: imgs — list over `sizes` of float tensors [views, 3, s, s] in [-1, 1] (all scales of
    one view come from the same crop/flip); tokens [2, L]; cap_idx [2]; class_id; key; index.
    Training items take a random crop/flip and two different random captions; evaluation
    items (train=False) the centre crop and captions (0, 1).

    Minimal pairs (stage 1, docs/DESIGN.md §14; `views` must be 2, caption k goes with view
    k): with `word_lists`, both views of an item are mirrored or neither, and a mirrored
    view's caption has left and right exchanged (`flipped` [2] says which); `negatives` = K
    adds neg_tokens [2, K, L] (one-edit variants of each caption) and neg_mask [2, K];
    `negative_pictures` = M (the shapes set only) adds neg_imgs [2, M, 3, S, S] (the picture
    redrawn by `draw_shape_image` with one attribute its caption names changed, one of
    `picture_attributes` when the caption names any, cropped/mirrored like its view; S = the
    largest size) and neg_img_mask [2, M];
    `redraw_pairs` adds the item's redrawn partner (`_redraw_pair`).

    Contradicting pictures (stage 2's discriminators, the shapes set only; any `views`): with
    `contradicting` attributes, each item also gets `contradicting_count` pictures redrawn with
    one of them that one of its two captions names changed (`_contradicting_picture`).
    """

    def __init__(self, cfg, split: str, tokenizer: CaptionTokenizer, sizes: list[int],
                 views: int = 1, train: bool = True, use_cache: bool = True,
                 word_lists=None, negatives: int = 0, negative_pictures: int = 0,
                 redraw_pairs: bool = False, picture_attributes: tuple[str, ...] = (),
                 contradicting: tuple[str, ...] = (), contradicting_count: int = 1) -> None:
        self.info = read_split(cfg, split)
        super().__init__(self.info.keys, self.info.image_paths, self.info.boxes, split, sizes,
                         views, train, bool(cfg.TRAIN.FLIP),
                         random_crop=bool(cfg.TRAIN.RANDOM_CROP))
        self.class_ids = torch.tensor(self.info.class_ids)
        per_image = int(cfg.TEXT.CAPTIONS_PER_IMAGE)
        self.num_captions = torch.tensor([len(c) for c in self.info.captions])
        self.tokens = torch.zeros(len(self.keys), per_image, tokenizer.context, dtype=torch.long)
        for i, caps in enumerate(self.info.captions):
            self.tokens[i, : len(caps)] = tokenizer(caps)
        self.truncated = tokenizer.truncated
        if use_cache:
            with contextlib.suppress(FileNotFoundError):
                self.cache, self.bad = open_image_cache(cfg, split, self.load_size, self.keys)
        self.tokenizer, self.word_lists = tokenizer, word_lists
        # with captions edited to match their view's mirroring, the two views of an item share
        # one coin: NT-Xent pulls the item's two captions together, and a "left" caption must
        # not be pulled towards a "right" one
        self.same_flip = word_lists is not None
        self.negatives, self.negative_pictures = int(negatives), int(negative_pictures)
        self.redraw_pairs = bool(redraw_pairs)
        self.picture_attributes = tuple(picture_attributes)
        unknown = set(self.picture_attributes) - set(PICTURE_EDITS)
        if unknown:
            raise DataError(f"TRAIN.NEGATIVE_PICTURE_ATTRIBUTES: {sorted(unknown)} are not shapes "
                            f"attributes; expected a list drawn from {list(PICTURE_EDITS)}")
        self._token_memo: dict[str, torch.Tensor] = {}
        self._drawn: dict[tuple, np.ndarray] = {}
        if (self.negatives or self.negative_pictures or word_lists is not None) and views != 2:
            raise ValueError("minimal pairs pair caption k with view k: they need views=2")
        if word_lists is not None:
            from miscc.minimal_pairs import check_word_lists

            check_word_lists(word_lists, self.info.captions, cfg)
        if (self.negatives or self.negative_pictures or self.redraw_pairs) \
                and word_lists is None:
            raise DataError("TRAIN.HARD_NEGATIVES / NEGATIVE_PICTURES / REDRAW_PAIRS need word "
                            "lists: set TEXT.WORD_LISTS (a stem of cfg/words/, e.g. shapes)")
        if self.negative_pictures or self.redraw_pairs:
            missing = {"shape", "colour", "size", "position", "background"} - set(
                word_lists.categories)
            if str(cfg.DATASET_NAME) != "shapes" or missing:
                raise DataError("TRAIN.NEGATIVE_PICTURES / REDRAW_PAIRS redraw pictures with "
                                "the shapes renderer: they need DATASET_NAME shapes and "
                                "TEXT.WORD_LISTS shapes (categories shape, colour, size, "
                                "position, background)")
            self._check_rendered(cfg, self.word_lists, "TRAIN.NEGATIVE_PICTURES / "
                                 "TRAIN.REDRAW_PAIRS", "TRAIN.NEGATIVE_PICTURES: 0 and "
                                 "TRAIN.REDRAW_PAIRS: false")
        self.contradicting = tuple(contradicting)
        self.contradicting_count = int(contradicting_count)
        if self.contradicting:
            self._setup_contradicting(cfg)

    def _setup_contradicting(self, cfg) -> None:
        """Check the attributes and the data for contradicting pictures; load the shapes word
        lists that say which attributes a caption names."""
        from miscc.minimal_pairs import load_word_lists

        key = "TRAIN.D_NEGATIVE_PICTURE_ATTRIBUTES"
        unknown = set(self.contradicting) - set(PICTURE_EDITS)
        if unknown:
            raise DataError(f"{key}: {sorted(unknown)} are not shapes attributes; expected a "
                            f"list drawn from {list(PICTURE_EDITS)}")
        if str(cfg.DATASET_NAME) != "shapes":
            raise DataError(f"TRAIN.D_NEGATIVE_PICTURES redraws pictures with the shapes "
                            f"renderer: it needs DATASET_NAME shapes, not {cfg.DATASET_NAME!r}; "
                            "set it to 0 for this data")
        self.picture_lists = load_word_lists("shapes")
        self._check_rendered(cfg, self.picture_lists, "TRAIN.D_NEGATIVE_PICTURES",
                             "TRAIN.D_NEGATIVE_PICTURES: 0")

    def _check_rendered(self, cfg, lists, keys: str, off: str) -> None:
        """Redrawn pictures need pictures the shapes renderer made: every first caption names
        all five attributes (a DataError naming the key and the folder otherwise, before any
        data-loader worker starts)."""
        for key, captions in zip(self.keys, self.info.captions, strict=True):
            named = lists.named(captions[0]) if captions else {}
            missing = [a for a in SHAPE_ATTRIBUTES if len(named.get(a, ())) != 1]
            if missing:
                first = captions[0] if captions else ""
                raise DataError(
                    f"{keys} redraw pictures with the shapes renderer, but {cfg.DATA_DIR} was "
                    f"not made by `prepare_data.py shapes`: the first caption of {key} "
                    f"({first!r}) does not name exactly one {', '.join(missing)}; set {off} "
                    "for this data")

    def _caption_pair(self, index: int) -> torch.Tensor:
        n = int(self.num_captions[index])
        if n == 1:
            return torch.zeros(2, dtype=torch.long)
        if not self.train:
            return torch.tensor([0, 1])
        first = int(torch.randint(0, n, ()))
        second = (first + 1 + int(torch.randint(0, n - 1, ()))) % n
        return torch.tensor([first, second])

    def _tokens_of(self, caption: str) -> torch.Tensor:
        """Token ids of a caption made at run time (memoised: edits repeat)."""
        if caption not in self._token_memo:
            self._token_memo[caption] = self.tokenizer.encode(caption)
        return self._token_memo[caption]

    def __getitem__(self, index: int) -> dict:
        if self.word_lists is None and not self.contradicting:
            index, imgs = self.views_of(index)
            params = None
        else:
            index, imgs, params = self.views_with_params(index)
        changed = None
        if self.redraw_pairs:  # the partner's attribute first, then captions that name it
            changed, cap_idx = self._redraw_choice(index)
        else:
            cap_idx = self._caption_pair(index)
        item = {
            "imgs": imgs,
            "tokens": self.tokens[index, cap_idx],
            "cap_idx": cap_idx,
            "class_id": self.class_ids[index],
            "key": self.keys[index],
            "index": index,
        }
        if self.word_lists is not None:
            item.update(self._minimal_pairs(index, cap_idx, params, changed))
        if self.contradicting:
            item.update(self._contradicting_picture(index, cap_idx, params[0]))
        return item

    def _contradicting_picture(self, index: int, cap_idx: torch.Tensor, view: tuple) -> dict:
        """N = `contradicting_count` pictures its caption does not describe, for D
        (TRAIN.D_NEGATIVE_PICTURES): one of the item's two captions (at random among those
        naming a `contradicting` attribute) and the picture redrawn N times with one such
        attribute changed, everything else kept (the attributes take turns, `_picture_edits`),
        in the item's first view at every scale. contra_imgs (a list over sizes of
        [N, 3, s, s]), contra_cap (0 or 1: the caption they contradict), contra_mask [N] (False
        where the caption allows fewer edits: the picture is then the item's own)."""
        lists, n = self.picture_lists, self.contradicting_count
        truth = self._picture_truth(index, lists)
        options = [(j, wanted) for j, c in enumerate(cap_idx.tolist())
                   if (wanted := _editable(lists, self.info.captions[index][c],
                                           self.contradicting)[1])]
        edits, j = [], 0
        if options:
            j, wanted = options[int(torch.randint(0, len(options), ()))]
            edits = _picture_edits(truth, wanted, n, int(torch.randint(0, 2**31 - 1, ())))
        drawn = [self._apply_view(torch.from_numpy(self._redraw(attrs)).permute(2, 0, 1), *view)
                 for attrs in edits + [truth] * (n - len(edits))]
        return {"contra_imgs": [torch.stack(scale) for scale in zip(*drawn, strict=True)],
                "contra_cap": torch.tensor(j),
                "contra_mask": torch.arange(n) < len(edits)}

    def _redraw_choice(self, index: int) -> tuple[str, torch.Tensor]:
        """(attribute the partner changes, the two captions): the attribute uniform over
        those the image's captions name, then two different captions naming it (the same one
        twice when only one does), so both captions of both items tell the pair apart."""
        named = [set(self.word_lists.named(c)) for c in self.info.captions[index]]
        attributes = sorted(set().union(*named) & set(SHAPE_ATTRIBUTES))
        attribute = attributes[int(torch.randint(0, len(attributes), ()))]
        naming = [i for i, n in enumerate(named) if attribute in n]
        first = int(torch.randint(0, len(naming), ()))
        second = (first + 1 + int(torch.randint(0, max(len(naming) - 1, 1), ()))) % len(naming)
        return attribute, torch.tensor([naming[first], naming[second]])

    def _minimal_pairs(self, index: int, cap_idx: torch.Tensor, params: list[tuple],
                       changed: str | None = None) -> dict:
        """Flipped captions, negative captions and redrawn pictures of one item (above)."""
        from miscc.minimal_pairs import one_edit_negatives

        lists, k, m = self.word_lists, self.negatives, self.negative_pictures
        originals = [self.info.captions[index][int(c)] for c in cap_idx]
        flipped = [p[2] for p in params]
        captions = [lists.flip(c) if f else c for c, f in zip(originals, flipped, strict=True)]
        out: dict = {"flipped": torch.tensor(flipped),
                     "tokens": torch.stack([self._tokens_of(c) for c in captions])}
        if changed is not None:
            out.update(self._redraw_pair(index, originals, params, changed))
        if k:
            neg_tokens = torch.zeros(2, k, self.tokenizer.context, dtype=torch.long)
            neg_mask = torch.zeros(2, k, dtype=torch.bool)
            for v, caption in enumerate(captions):
                seed = int(torch.randint(0, 2**31 - 1, ()))
                for j, text in enumerate(one_edit_negatives(caption, lists, k, seed)):
                    neg_tokens[v, j], neg_mask[v, j] = self._tokens_of(text), True
            out.update(neg_tokens=neg_tokens, neg_mask=neg_mask)
        if m:
            size = self.crop
            neg_imgs = torch.zeros(2, m, 3, size, size)
            neg_img_mask = torch.zeros(2, m, dtype=torch.bool)
            truth = self._picture_truth(index, lists)
            for v, caption in enumerate(captions):
                named, preferred = _editable(lists, caption, self.picture_attributes)
                edits = _picture_edits(truth, preferred or named, m,
                                       int(torch.randint(0, 2**31 - 1, ())))
                for j, attrs in enumerate(edits):
                    chw = torch.from_numpy(self._redraw(attrs)).permute(2, 0, 1)
                    neg_imgs[v, j] = self._apply_view(chw, *params[v])[-1]
                    neg_img_mask[v, j] = True
            out.update(neg_imgs=neg_imgs, neg_img_mask=neg_img_mask)
        return out

    def _redraw_pair(self, index: int, originals: list[str], params: list[tuple],
                     attribute: str) -> dict:
        """The item's partner (TRAIN.REDRAW_PAIRS): the picture redrawn with `attribute`
        (named by both captions) changed, in the same two views, with both captions edited
        to match: redraw_imgs [2, 3, S, S], redraw_tokens [2, L], redraw_class (its class)."""
        from miscc.minimal_pairs import with_value

        lists = self.word_lists
        truth = self._picture_truth(index, lists)
        edits = _picture_edits(truth, {attribute: []}, 1, int(torch.randint(0, 2**31 - 1, ())))
        attrs = edits[0] if edits else truth
        changed = [a for a in truth if attrs[a] != truth[a]]
        captions = [with_value(c, lists, changed[0], attrs[changed[0]]) if changed else c
                    for c in originals]
        captions = [lists.flip(c) if p[2] else c for c, p in zip(captions, params, strict=True)]
        chw = torch.from_numpy(self._redraw(attrs)).permute(2, 0, 1)
        cls = SHAPES.index(attrs["shape"]) * len(COLOURS) + list(COLOURS).index(
            attrs["colour"]) + 1
        return {"redraw_imgs": torch.stack([self._apply_view(chw, *p)[-1] for p in params]),
                "redraw_tokens": torch.stack([self._tokens_of(c) for c in captions]),
                "redraw_class": torch.tensor(cls)}

    def _picture_truth(self, index: int, lists) -> dict[str, str]:
        """What picture `index` shows (attribute -> value), read off its first caption, which
        names all five attributes (`_check_rendered`)."""
        return {c: v[0] for c, v in lists.named(self.info.captions[index][0]).items()}

    def _redraw(self, attrs: dict[str, str]) -> np.ndarray:
        """A shapes picture with these attributes as the data set stores it (drawn at the
        set's size, JPEG at quality 95, decoded and resized like `load_image`), memoised."""
        import io

        key = (*(attrs[a] for a in SHAPE_ATTRIBUTES), attrs.get("outline"))
        if key not in self._drawn:
            with Image.open(self.image_paths[0]) as first:
                side = first.size[0]
            buffer = io.BytesIO()
            draw_shape_image(*key[:-1], side, outline=key[-1]).save(buffer, format="JPEG",
                                                                    quality=95)
            buffer.seek(0)
            with Image.open(buffer) as img:
                self._drawn[key] = np.array(square_resize(img.convert("RGB"), self.load_size),
                                            dtype=np.uint8)
        return self._drawn[key]


def _editable(lists, caption: str, attributes: tuple[str, ...]
              ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(what `caption` names, the part of it in `attributes`): a redrawn picture may change a
    named attribute; "outline" counts as named with the shape when it is in `attributes`
    (a caption naming the shape is contradicted by a blob)."""
    named = lists.named(caption)
    if "shape" in named and "outline" in attributes:
        named["outline"] = []
    return named, {a: v for a, v in named.items() if a in attributes}


def _picture_edits(truth: dict[str, str], named: dict[str, list[str]], m: int,
                   seed: int) -> list[dict[str, str]]:
    """Up to m attribute sets of a shapes picture (`truth`: attribute -> value) with one
    attribute its caption names changed: categories take turns in a seeded order, values are
    drawn without repeats, and combinations the data set never draws (a purple or blue shape
    on black) are skipped. The category "outline" (in `named` when wanted) keeps every
    attribute and destroys the outline (`OUTLINE_EDITS`; a melted circle is still a circle, so
    circles are only blurred)."""
    import random

    rng = random.Random(seed)
    values = {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES),
              "position": list(POSITIONS), "background": list(BACKGROUNDS)}
    pools = []
    for attribute in sorted(set(named) & {*truth, "outline"}):
        if attribute == "outline":
            pool = [{**truth, "outline": (kind, sigma)} for kind, sigmas in OUTLINE_EDITS.items()
                    for sigma in sigmas if not (kind == "melt" and truth["shape"] == "circle")]
            rng.shuffle(pool)
            pools.append(pool)
            continue
        pool = []
        for value in values[attribute]:
            attrs = {**truth, attribute: value}
            if value != truth[attribute] and visible(attrs["colour"], attrs["background"]):
                pool.append(attrs)
        rng.shuffle(pool)
        pools.append(pool)
    rng.shuffle(pools)
    out: list[dict[str, str]] = []
    while len(out) < m and any(pools):
        for pool in pools:
            if pool and len(out) < m:
                out.append(pool.pop())
    return out


class SplitImages(Dataset):
    """Deterministic uint8 [3, S, S] images of a split (box crop + square resize), e.g. for FID."""

    def __init__(self, cfg, split: str, size: int) -> None:
        self.info = read_split(cfg, split)
        self.keys, self.size = self.info.keys, size

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        pixels = load_image(self.info.image_paths[index], self.info.boxes[index], self.size)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def check_batch_size(dataset: Dataset, batch_size: int, what: str) -> None:
    """Fail clearly when a split is smaller than one batch (training drops the last batch)."""
    if len(dataset) < batch_size:
        raise DataError(f"TRAIN.BATCH_SIZE={batch_size} is larger than the {what} split "
                        f"({len(dataset)} usable images); lower TRAIN.BATCH_SIZE")


# ------------------------------------------------------------------------ synthetic shapes
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220),
           "yellow": (240, 210, 20), "purple": (140, 40, 170), "orange": (250, 130, 20)}
# radius as a fraction of the side: even a small star keeps its points at the demo's 32 px
SIZES = {"small": 0.19, "medium": 0.25, "large": 0.31}
POSITIONS = {"top left": (0.33, 0.33), "top right": (0.67, 0.33), "bottom left": (0.33, 0.67),
             "bottom right": (0.67, 0.67), "center": (0.5, 0.5)}
SHAPE_ATTRIBUTES = ("shape", "colour", "size", "position", "background")  # draw_shape_image's
PICTURE_EDITS = (*SHAPE_ATTRIBUTES, "outline")  # what a redrawn negative picture may change
SHAPES_VERSION = 3  # bump when a set's pictures change: prepare_data.py then rewrites old sets
BACKGROUNDS = {"white": ((255, 255, 255),), "black": ((20, 20, 20),),
               "gray": ((150, 150, 150),), "white and gray": ((255, 255, 255), (150, 150, 150)),
               "light blue and white": ((170, 200, 240), (255, 255, 255))}
TEMPLATES = (
    "{a} {size} {colour} {shape} in the {pos} on a {bg} background",
    "the picture shows {a} {size} {colour} {shape}",
    "{a} {colour} {shape} placed in the {pos}",
    "there is {a} {size} {shape} that is {colour}",
    "this image contains one {colour} {shape} on a {bg} background",
    "{a} {shape} coloured {colour} sits in the {pos} of the picture",
    "{size} {colour} {shape} with a {bg} background",
    "a single {colour} {shape} near the {pos}",
    "an image of {a} {size} {shape} in {colour}",
    "the {shape} in the {pos} is {colour} and {size}",
)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of 'radius' r centred at (cx, cy)."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return list(zip(cx + radii * np.cos(angles), cy - radii * np.sin(angles), strict=True))
    if shape == "cross":
        a, b = r, r * 0.33
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b),
                (cx + a, cy + b), (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a),
                (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(shape)


def _shape_mask(shape: str, size_word: str, pos: str, big: int) -> Image.Image:
    """The shape's coverage (mode L, 0 or 255) on a `big`-pixel canvas."""
    from PIL import ImageDraw

    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    fx, fy = POSITIONS[pos]
    cx, cy, r = fx * big, fy * big, SIZES[size_word] * big
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=255)
    return mask


# Outline edits (docs/DESIGN.md §14): the shape's coverage blurred with a Gaussian of this many
# shape radii, then used as it is ("blur": a soft blob) or cut where it keeps the shape's area
# ("melt": corners and points melted into a rounded, sharp-edged blob of the same size).
# Colour, size, position and background stay.
OUTLINE_EDITS = {"blur": (0.25, 0.45), "melt": (0.3, 0.5)}


def draw_shape_image(shape: str, colour: str, size_word: str, pos: str, bg: str,
                     px: int, outline: tuple[str, float] | None = None) -> Image.Image:
    """Render one shapes-set picture (drawn at 4x and downsampled for smooth edges). With
    `outline` = (kind, sigma) from `OUTLINE_EDITS`, the shape's outline is destroyed (blurred or
    melted, sigma in shape radii) and everything else is drawn as usual."""
    from PIL import ImageDraw, ImageFilter

    big = px * 4
    tones = BACKGROUNDS[bg]
    img = Image.new("RGB", (big, big), tones[0])
    if len(tones) == 2:
        ImageDraw.Draw(img).rectangle((0, big // 2, big, big), fill=tones[1])
    mask = _shape_mask(shape, size_word, pos, big)
    if outline is not None:
        kind, sigma = outline
        if kind not in OUTLINE_EDITS:
            raise ValueError(f"outline edit {kind!r}: expected one of {sorted(OUTLINE_EDITS)}")
        area = int((np.asarray(mask) > 127).sum())
        mask = mask.filter(ImageFilter.GaussianBlur(sigma * SIZES[size_word] * big))
        if kind == "melt":  # the `area` most covered pixels
            level = np.sort(np.asarray(mask), axis=None)[-area]
            mask = Image.fromarray(np.where(np.asarray(mask) >= level, 255, 0).astype(np.uint8))
    img.paste(Image.new("RGB", (big, big), COLOURS[colour]), (0, 0), mask)
    return img.resize((px, px), Image.LANCZOS)


def shapes_captions(shape: str, colour: str, size_word: str, pos: str, bg: str) -> list[str]:
    """The ten templated captions of one picture."""
    words = {"size": size_word, "colour": colour, "shape": shape, "pos": pos, "bg": bg}
    out = []
    for template in TEMPLATES:
        # the article agrees with the word that follows it in this template
        following = template.split("{a} ", 1)[1].split(" ", 1)[0] if "{a}" in template else "{x}"
        first = words.get(following.strip("{}"), "x")
        out.append(template.format(a="an" if first[0] in "aeiou" else "a", **words))
    return out


BASE_TRAIN = 800  # the classic set's training pictures: a larger set draws its extra ones last


def visible(colour: str, bg: str) -> bool:
    """Whether the set draws this colour on this background: a purple or blue shape on black
    would hardly show, so the set puts such pictures on white and never redraws into them."""
    return not (bg == "black" and colour in ("purple", "blue"))


def _shape_picks(n_train: int, n_test: int, seed: int) -> dict[str, list[dict[str, str]]]:
    """Each picture's attributes, drawn from one seeded stream in the order: the first
    BASE_TRAIN training pictures, the test pictures, the other training pictures. So a set with
    more training pictures has the same test split, and its first BASE_TRAIN training pictures,
    as the 800-picture set of the same seed."""
    rng = np.random.default_rng(seed)
    names = {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES),
             "pos": list(POSITIONS), "bg": list(BACKGROUNDS)}

    def pick() -> dict[str, str]:
        attrs = {k: v[int(rng.integers(len(v)))] for k, v in names.items()}
        if not visible(attrs["colour"], attrs["bg"]):
            attrs["bg"] = "white"
        return attrs

    first = [pick() for _ in range(min(n_train, BASE_TRAIN))]
    test = [pick() for _ in range(n_test)]
    return {"train": first + [pick() for _ in range(n_train - len(first))], "test": test}


def make_shapes_dataset(out: str | Path, n_train: int = 800, n_test: int = 200,
                        size: int = 64, seed: int = 0) -> dict:
    """Write the synthetic shapes set in exactly the CUB birds layout (deterministic per seed;
    the draw order of `_shape_picks`).

    Class id = (shape, colour) pair, 1-based like CUB; boxes cover the whole picture so the
    positions named in the captions survive the box crop.
    """
    out = Path(out)
    images_dir = out / "CUB_200_2011" / "images"
    (out / "text").mkdir(parents=True, exist_ok=True)
    lines_images, lines_boxes = [], []
    image_id = 0
    for split, picks in _shape_picks(n_train, n_test, seed).items():
        keys, classes = [], []
        for i, pick in enumerate(picks):
            cls = SHAPES.index(pick["shape"]) * len(COLOURS) + list(COLOURS).index(
                pick["colour"]) + 1
            folder = f"{cls:03d}.{pick['colour']}_{pick['shape']}"
            key = f"{folder}/{split}_{pick['colour']}_{pick['shape']}_{i:05d}"
            (images_dir / folder).mkdir(parents=True, exist_ok=True)
            (out / "text" / folder).mkdir(parents=True, exist_ok=True)
            img = draw_shape_image(pick["shape"], pick["colour"], pick["size"], pick["pos"],
                                   pick["bg"], size)
            img.save(images_dir / f"{key}.jpg", quality=95)
            caps = shapes_captions(pick["shape"], pick["colour"], pick["size"], pick["pos"],
                                   pick["bg"])
            (out / "text" / f"{key}.txt").write_text("\n".join(caps) + "\n")
            image_id += 1
            lines_images.append(f"{image_id} {key}.jpg")
            lines_boxes.append(f"{image_id} 0.0 0.0 {float(size)} {float(size)}")
            keys.append(key)
            classes.append(cls)
        (out / split).mkdir(parents=True, exist_ok=True)
        write_pickle(keys, out / split / "filenames.pickle")
        write_pickle(classes, out / split / "class_info.pickle")
    (out / "CUB_200_2011" / "images.txt").write_text("\n".join(lines_images) + "\n")
    (out / "CUB_200_2011" / "bounding_boxes.txt").write_text("\n".join(lines_boxes) + "\n")
    (out / "example_filenames.txt").write_text("example_captions\n")
    (out / "example_captions.txt").write_text(
        "a large red circle in the center on a white background\n"
        "a small blue square in the top left on a gray background\n"
        "the picture shows a medium green triangle\n"
        "a yellow star placed in the bottom right\n")
    return {"train": n_train, "test": n_test, "size": size, "classes": len(SHAPES) * len(COLOURS)}
