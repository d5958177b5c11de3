"""Data pipeline: shapes set, layout errors, box crop, safe pickles, bad images, the cache."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import (
    CaptionTokenizer,
    DataError,
    SplitImages,
    TextImageDataset,
    build_image_cache,
    check_batch_size,
    crop_box,
    load_image,
    load_size_for,
    make_shapes_dataset,
    read_split,
    safe_load_pickle,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return CaptionTokenizer(20)


def copy_set(shapes_dir, tmp_path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(shapes_dir, out)
    return out


def test_shapes_items_at_every_scale(shapes_cfg, tokenizer):
    cfg = shapes_cfg("TREE.BRANCH_NUM=2", "TREE.BASE_SIZE=16", "TRAIN.RANDOM_CROP=True",
                     "TRAIN.FLIP=False")
    ds = TextImageDataset(cfg, "train", tokenizer, sizes=[16, 32], views=1)
    assert len(ds) == 24
    torch.manual_seed(0)
    item = ds[3]
    assert [tuple(x.shape) for x in item["imgs"]] == [(1, 3, 16, 16), (1, 3, 32, 32)]
    # the largest scale is a 32-px window of the picture as stored at 38 px (76/64), in [-1, 1]
    stored = torch.from_numpy(load_image(ds.info.image_paths[3], ds.info.boxes[3],
                                         ds.load_size)).permute(2, 0, 1).float() / 127.5 - 1
    assert ds.load_size == 38 and item["index"] == 3
    assert any(torch.equal(item["imgs"][1][0], stored[:, top: top + 32, left: left + 32])
               for top in range(7) for left in range(7))
    assert item["tokens"].shape == (2, 22)
    first, second = item["cap_idx"].tolist()
    assert first != second
    assert not torch.equal(item["tokens"][0], item["tokens"][1])
    # the class id is the folder's number, as in CUB
    assert int(item["class_id"]) == int(item["key"].split(".")[0])
    # the smaller scale is a resized copy of the same crop
    small = torch.nn.functional.interpolate(item["imgs"][1], size=16, mode="bilinear",
                                            antialias=True, align_corners=False)
    assert torch.allclose(small, item["imgs"][0], atol=1e-4)


def test_shapes_captions_follow_the_picture(shapes_dir):
    info = safe_load_pickle(shapes_dir / "train" / "filenames.pickle")
    key = info[0]
    colour, shape = key.split(".")[1].split("/")[0].split("_")
    caps = (shapes_dir / "text" / f"{key}.txt").read_text().splitlines()
    assert len(caps) == 10 and len(set(caps)) == 10
    assert all(shape in c for c in caps) and sum(colour in c for c in caps) >= 9
    img = np.asarray(Image.open(shapes_dir / "CUB_200_2011" / "images" / f"{key}.jpg"))
    assert img.shape == (32, 32, 3)


def test_shapes_is_deterministic(tmp_path):
    def digest(out):
        make_shapes_dataset(out, n_train=5, n_test=2, size=24, seed=3)
        h = hashlib.sha1()
        for p in sorted(out.rglob("*")):
            if p.is_file():
                h.update(p.read_bytes())
        return h.hexdigest()

    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_eval_items_are_deterministic(shapes_cfg, tokenizer):
    ds = TextImageDataset(shapes_cfg(), "test", tokenizer, sizes=[32], views=1, train=False)
    a, b = ds[1], ds[1]
    assert torch.equal(a["imgs"][0], b["imgs"][0]) and a["cap_idx"].tolist() == [0, 1]


def test_box_crop_on_a_hand_made_image():
    arr = np.zeros((80, 100, 3), np.uint8)
    arr[:, :, 0] = np.arange(100)[None, :]  # red = x
    arr[:, :, 1] = np.arange(80)[:, None]  # green = y
    # box x=10, y=20, w=30, h=20 -> r = 22, centre (25, 30) -> crop x 3..47, y 8..52
    out = np.asarray(crop_box(Image.fromarray(arr), (10, 20, 30, 20)))
    assert out.shape == (44, 44, 3)
    assert (out[0, 0, 0], out[0, 0, 1]) == (3, 8)
    assert (out[-1, -1, 0], out[-1, -1, 1]) == (46, 51)
    # clipped at the image border
    edge = np.asarray(crop_box(Image.fromarray(arr), (0, 0, 20, 20)))
    assert edge.shape == (25, 25, 3) and edge[0, 0, 0] == 0


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/clip_dmgan_pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "filenames.pickle"
    path.write_bytes(pickle.dumps([_Evil()], protocol=2))
    Path("/tmp/clip_dmgan_pwned").unlink(missing_ok=True)
    with pytest.raises(DataError, match="refusing to load posix.system"):
        safe_load_pickle(path)
    assert not Path("/tmp/clip_dmgan_pwned").exists()
    ok = tmp_path / "ok.pickle"
    ok.write_bytes(pickle.dumps(["a", 1, 2.0, {"b": (1,)}], protocol=2))
    assert safe_load_pickle(ok) == ["a", 1, 2.0, {"b": (1,)}]


def test_missing_directory_shows_the_layout(shapes_cfg, tmp_path):
    with pytest.raises(DataError, match="is not a directory") as err:
        read_split(shapes_cfg(data_dir=tmp_path / "nothing"), "train")
    assert "is not a directory" in str(err.value) and "CUB_200_2011/bounding_boxes.txt" in str(
        err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"train file list not found: .*filenames.pickle"):
        read_split(shapes_cfg(data_dir=tmp_path / "empty"), "train")


def test_empty_caption_lines_and_captionless_images(shapes_dir, shapes_cfg, tmp_path):
    data = copy_set(shapes_dir, tmp_path)
    keys = safe_load_pickle(data / "train" / "filenames.pickle")
    (data / "text" / f"{keys[0]}.txt").write_text("\n\na red thing\n\n")
    (data / "text" / f"{keys[1]}.txt").write_text("\n  \n")
    info = read_split(shapes_cfg(data_dir=data), "train")
    assert info.skipped_no_caption == [keys[1]]
    assert info.captions[0] == ["a red thing"] and info.empty_lines >= 4
    assert len(info.keys) == 23


def test_corrupt_jpeg_is_skipped_and_counted(shapes_dir, shapes_cfg, tmp_path, tokenizer):
    data = copy_set(shapes_dir, tmp_path)
    keys = safe_load_pickle(data / "train" / "filenames.pickle")
    (data / "CUB_200_2011" / "images" / f"{keys[2]}.jpg").write_bytes(b"not a jpeg at all")
    cfg = shapes_cfg("TREE.BASE_SIZE=32", data_dir=data)
    ds = TextImageDataset(cfg, "train", tokenizer, sizes=[32], use_cache=False)
    with pytest.warns(UserWarning, match="unreadable image skipped"):
        item = ds[2]
    assert item["index"] == 3 and ds.skipped == 1
    # prepare_data.py check reports it
    run = subprocess.run([sys.executable, "prepare_data.py", "check", "--cfg",
                          str(ROOT / "cfg/DAMSM/shapes.yml"), "--data_dir", str(data)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "[train] images: 24 usable, 0 missing files, 0 without captions, 1 corrupt" in run.stdout
    assert "[test] images: 12 usable" in run.stdout


def test_too_many_corrupt_images_fail_clearly(shapes_dir, shapes_cfg, tmp_path, tokenizer):
    data = copy_set(shapes_dir, tmp_path)
    keys = safe_load_pickle(data / "train" / "filenames.pickle")
    for key in keys[:4]:
        (data / "CUB_200_2011" / "images" / f"{key}.jpg").write_bytes(b"")
    ds = TextImageDataset(shapes_cfg(data_dir=data), "train", tokenizer, sizes=[32],
                          use_cache=False)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="unreadable images"):
        ds[0]


def test_cache_gives_the_same_tensors(shapes_dir, shapes_cfg, tmp_path, tokenizer):
    data = copy_set(shapes_dir, tmp_path)
    cfg = shapes_cfg("TRAIN.RANDOM_CROP=True", data_dir=data)  # the 38 px cache
    index = build_image_cache(cfg, "train", load_size_for([32]), progress=False)
    assert len(index["keys"]) == 24 and index["bad"] == []
    cached = TextImageDataset(cfg, "train", tokenizer, sizes=[32], views=2)
    plain = TextImageDataset(cfg, "train", tokenizer, sizes=[32], views=2, use_cache=False)
    assert cached.cache is not None and plain.cache is None
    for i in (0, 5, 23):
        torch.manual_seed(i)
        a = cached[i]
        torch.manual_seed(i)
        b = plain[i]
        assert torch.equal(a["imgs"][0], b["imgs"][0])
        assert torch.equal(a["tokens"], b["tokens"])


def test_cache_for_another_image_list_is_refused(shapes_dir, shapes_cfg, tmp_path, tokenizer):
    data = copy_set(shapes_dir, tmp_path)
    cfg = shapes_cfg("TRAIN.RANDOM_CROP=True", data_dir=data)  # the 38 px cache
    build_image_cache(cfg, "train", load_size_for([32]), progress=False)
    keys = safe_load_pickle(data / "train" / "filenames.pickle")
    (data / "text" / f"{keys[0]}.txt").write_text("")  # now skipped: a different list
    with pytest.raises(DataError, match="built for another image list"):
        TextImageDataset(cfg, "train", tokenizer, sizes=[32])


def test_tokenizer_truncation_is_counted():
    tok = CaptionTokenizer(3)
    out = tok(["a red circle", "a very large red circle in the corner"])
    assert out.shape == (2, 5) and tok.truncated == 1
    assert out[1, -1] == tok.eot and out[0, 4] == tok.eot
    assert tok.decode(out[0]) == ["a", "red", "circle"]
    with pytest.raises(ValueError, match="WORDS_NUM"):
        CaptionTokenizer(80)


def test_batch_larger_than_split(shapes_cfg, tokenizer):
    ds = TextImageDataset(shapes_cfg(), "test", tokenizer, sizes=[32], train=False)
    with pytest.raises(DataError, match=r"TRAIN.BATCH_SIZE=48 is larger than the test split"):
        check_batch_size(ds, 48, "test")


def test_split_images_for_metrics(shapes_cfg):
    ds = SplitImages(shapes_cfg(), "test", 48)
    img = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 48, 48) and len(ds.keys) == 12


def test_prepare_shapes_skips_a_complete_set(tmp_path, capsys):
    import prepare_data

    out = tmp_path / "shapes"
    args = ["shapes", "--out", str(out), "--n-train", "4", "--n-test", "2", "--size", "16"]
    assert prepare_data.main(args) == 0
    caption = next((out / "text").rglob("*.txt"))
    caption.write_text("edited\n")  # a re-run that rewrote the set would restore this
    assert prepare_data.main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert caption.read_text() == "edited\n"
    assert prepare_data.main([*args[:-1], "24"]) == 0  # other parameters: written anew
    assert caption.read_text() != "edited\n"


def test_prepare_shapes_rewrites_an_older_generators_set(tmp_path, monkeypatch, capsys):
    import prepare_data

    out = tmp_path / "shapes"
    args = ["shapes", "--out", str(out), "--n-train", "4", "--n-test", "2", "--size", "16"]
    assert prepare_data.main(args) == 0
    (out / "cache").mkdir()
    (out / "cache" / "train_16px.npy").write_bytes(b"old pixels")
    monkeypatch.setattr(prepare_data, "SHAPES_VERSION", prepare_data.SHAPES_VERSION + 1)
    assert prepare_data.main(args) == 0
    assert "removed the caches of the previous set" in capsys.readouterr().out
    assert not (out / "cache").exists()
    marker = json.loads((out / prepare_data.SHAPES_MARKER).read_text())
    assert marker["version"] == prepare_data.SHAPES_VERSION


def test_prepare_check_missing_data_exits_2_with_an_error_line(tmp_path, capsys):
    import prepare_data

    missing = tmp_path / "missing"
    assert prepare_data.main(["check", "--cfg", str(ROOT / "cfg/DAMSM/shapes.yml"),
                              "--data_dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err


def test_flip_switch(shapes_cfg, tokenizer):
    sizes = [32]
    flipping = TextImageDataset(shapes_cfg("TRAIN.FLIP=True"), "train", tokenizer, sizes)
    plain = TextImageDataset(shapes_cfg("TRAIN.FLIP=False"), "train", tokenizer, sizes)
    side = flipping.load_size
    pixels = torch.randint(0, 256, (3, side, side), dtype=torch.uint8)  # nothing symmetric
    mirrored = 0
    for seed in range(12):
        torch.manual_seed(seed)
        a = flipping._view(pixels)[0]
        torch.manual_seed(seed)
        b = plain._view(pixels)[0]  # same crop (the coin is tossed either way), never mirrored
        if not torch.equal(a, b):
            assert torch.equal(a, b.flip(-1))
            mirrored += 1
    assert 0 < mirrored < 12


# ------------------------------------------------------------------------- minimal pairs
def minimal_pair_set(shapes_cfg, tokenizer, *overrides, negatives=0, pictures=0,
                     redraw=False, picture_attributes=()):
    from miscc.minimal_pairs import load_word_lists

    cfg = shapes_cfg("TRAIN.FLIP=True", "TRAIN.RANDOM_CROP=False", "TEXT.WORD_LISTS=shapes",
                     *overrides)
    return TextImageDataset(cfg, "train", tokenizer, [32], views=2, use_cache=False,
                            word_lists=load_word_lists("shapes"), negatives=negatives,
                            negative_pictures=pictures, redraw_pairs=redraw,
                            picture_attributes=picture_attributes)


def test_no_random_crop_trains_on_the_whole_frame(shapes_cfg, tokenizer):
    """TRAIN.RANDOM_CROP=False: the training view is the stored picture at the test scale
    (or its mirror), never a 76/64 enlargement shifted by a crop."""
    ds = TextImageDataset(shapes_cfg("TRAIN.RANDOM_CROP=False", "TRAIN.FLIP=False"), "train",
                          tokenizer, [32], views=2)
    test = TextImageDataset(shapes_cfg(), "test", tokenizer, [32], views=1, train=False)
    assert ds.load_size == 32 == test.load_size
    for seed in range(4):
        torch.manual_seed(seed)
        item = ds[5]
        whole = torch.from_numpy(load_image(ds.info.image_paths[5], ds.info.boxes[5], 32))
        whole = whole.permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(item["imgs"][0][0], whole) and torch.equal(item["imgs"][0][1], whole)


def test_flip_and_caption_stay_consistent(shapes_cfg, tokenizer):
    """A mirrored view comes with left and right exchanged in its caption; the view looks like
    the picture its own caption describes (drawn by the renderer) and not like the picture of
    the unswapped caption; an unmirrored view keeps its caption."""
    from miscc.minimal_pairs import flip_caption

    ds = minimal_pair_set(shapes_cfg, tokenizer)
    lists, seen = ds.word_lists, {True: 0, False: 0}
    sided = [i for i in range(len(ds)) if "left" in ds.info.captions[i][0]
             or "right" in ds.info.captions[i][0]]
    assert sided
    for seed in range(6):
        for index in sided[:4]:
            torch.manual_seed(seed)
            item = ds[index]
            truth = {c: v[0] for c, v in lists.named(ds.info.captions[index][0]).items()}
            # both views mirrored or neither: the item's two captions agree on the sides
            assert item["flipped"][0] == item["flipped"][1]
            for v in range(2):
                caption = ds.info.captions[index][int(item["cap_idx"][v])]
                mirrored = bool(item["flipped"][v])
                seen[mirrored] += 1
                expect = flip_caption(caption, lists) if mirrored else caption
                assert torch.equal(item["tokens"][v], tokenizer.encode(expect))
                # the view against the renderer's pictures of the mirrored / unmirrored caption
                said = flip_caption(ds.info.captions[index][0], lists) if mirrored \
                    else ds.info.captions[index][0]
                drawn = {p: ds._apply_view(torch.from_numpy(ds._redraw(
                    {**truth, "position": lists.named(p)["position"][0]})).permute(2, 0, 1),
                    0, 0, False)[0] for p in (said, flip_caption(said, lists))}
                view = item["imgs"][0][v]
                near, far = ((drawn[p] - view).abs().mean() for p in drawn)
                assert near < 0.02 < far, (near, far)
    assert seen[True] and seen[False]


def test_negative_pictures_change_one_named_attribute(shapes_cfg, tokenizer):
    """Each redrawn picture differs from its view, comes from changing one attribute the view's
    caption names, and is mirrored like the view; captions get one-edit negatives."""
    from datasets import _picture_edits

    truth = {"shape": "star", "colour": "red", "size": "small", "position": "top left",
             "background": "black"}
    named = {"colour": ["red"], "position": ["top left"]}
    for seed in range(5):
        edits = _picture_edits(truth, named, 6, seed)
        assert edits == _picture_edits(truth, named, 6, seed) and len(edits) == 6
        for attrs in edits:
            changed = [a for a in truth if attrs[a] != truth[a]]
            assert len(changed) == 1 and changed[0] in named
            assert attrs["colour"] not in ("purple", "blue")  # never drawn on black
        assert {next(a for a in truth if e[a] != truth[a]) for e in edits[:2]} == set(named)
    assert len(_picture_edits(truth, {"size": ["small"]}, 6, 0)) == 2  # only two other sizes

    ds = minimal_pair_set(shapes_cfg, tokenizer, negatives=3, pictures=2)
    seed = next(s for s in range(20) if torch.manual_seed(s) and ds[2]["flipped"].all())
    torch.manual_seed(seed)
    item = ds[2]
    assert item["flipped"].tolist() == [True, True]  # mirrored views
    assert item["neg_imgs"].shape == (2, 2, 3, 32, 32) and item["neg_img_mask"].all()
    assert item["neg_tokens"].shape == (2, 3, tokenizer.context) and item["neg_mask"].any()
    truth = {c: v[0] for c, v in ds.word_lists.named(ds.info.captions[2][0]).items()}
    for v in range(2):
        # every single-attribute redraw of what the view's caption names, mirrored like the view
        caption = ds.info.captions[2][int(item["cap_idx"][v])]
        allowed = [ds._apply_view(torch.from_numpy(ds._redraw(e)).permute(2, 0, 1), 0, 0,
                                  bool(item["flipped"][v]))[0]
                   for e in _picture_edits(truth, ds.word_lists.named(caption), 99, 0)]
        for j in range(2):
            assert (item["neg_imgs"][v, j] - item["imgs"][0][v]).abs().max() > 0.1
            assert any(torch.equal(item["neg_imgs"][v, j], a) for a in allowed)
        for j in range(3):
            if item["neg_mask"][v, j]:
                assert not torch.equal(item["neg_tokens"][v, j], item["tokens"][v])
    # the same seed gives the same item
    torch.manual_seed(seed)
    again = ds[2]
    assert all(torch.equal(item[k], again[k]) for k in ("neg_imgs", "neg_tokens", "tokens"))


def test_negative_pictures_prefer_the_listed_attributes(shapes_cfg, tokenizer):
    """TRAIN.NEGATIVE_PICTURE_ATTRIBUTES: a redrawn picture changes a listed attribute whenever
    the view's caption names one, and any named attribute otherwise; unknown names fail."""
    ds = minimal_pair_set(shapes_cfg, tokenizer, pictures=2,
                          picture_attributes=("position", "background"))
    from datasets import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

    values = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS,
              "background": BACKGROUNDS}
    lists, seen = ds.word_lists, {True: set(), False: set()}
    for index in range(len(ds)):
        torch.manual_seed(index)
        item = ds[index]
        truth = {c: v[0] for c, v in lists.named(ds.info.captions[index][0]).items()}
        for v in range(2):
            caption = ds.info.captions[index][int(item["cap_idx"][v])]
            named = set(lists.named(caption))
            listed = bool(named & {"position", "background"})
            flip = bool(item["flipped"][v])
            for j in range(2):
                if not item["neg_img_mask"][v, j]:
                    continue
                changed = [a for a in named for value in values[a] if value != truth[a]
                           and torch.equal(item["neg_imgs"][v, j], ds._apply_view(
                               torch.from_numpy(ds._redraw({**truth, a: value})).permute(2, 0, 1),
                               0, 0, flip)[0])]
                assert changed, (index, v, j)
                seen[listed].update(changed)
    assert seen[True] <= {"position", "background"} and seen[True]
    assert seen[False] & {"shape", "colour"}  # captions naming neither still get pictures
    with pytest.raises(DataError, match="NEGATIVE_PICTURE_ATTRIBUTES"):
        minimal_pair_set(shapes_cfg, tokenizer, pictures=1, picture_attributes=("place",))


@pytest.mark.parametrize("count", [1, 2])
def test_contradicting_pictures_change_one_attribute_their_caption_names(shapes_cfg,
                                                                          tokenizer, count):
    """Stage 2's contradicting pictures (TRAIN.D_NEGATIVE_PICTURES): at every scale, each of the
    item's `count` pictures is its picture redrawn with exactly one listed attribute changed,
    one that the caption they are paired with (contra_cap) names, everything else kept; both
    scales are the same redraw; an item's pictures change different attributes while the
    caption names unused ones; a caption naming none gets masked copies of the picture."""
    from datasets import SHAPES, SIZES

    ds = TextImageDataset(shapes_cfg("TRAIN.RANDOM_CROP=False", "TRAIN.FLIP=False"), "train",
                          tokenizer, [16, 32], views=1, use_cache=False,
                          contradicting=("shape", "size"), contradicting_count=count)
    lists, values = ds.picture_lists, {"shape": SHAPES, "size": SIZES}
    seen, pairs = set(), 0
    for index in range(len(ds)):
        torch.manual_seed(index)
        item = ds[index]
        assert [tuple(x.shape) for x in item["contra_imgs"]] == [(count, 3, 16, 16),
                                                                 (count, 3, 32, 32)]
        truth = {c: v[0] for c, v in lists.named(ds.info.captions[index][0]).items()}
        caption = ds.info.captions[index][int(item["cap_idx"][int(item["contra_cap"])])]
        named = set(lists.named(caption)) & {"shape", "size"}
        assert item["contra_mask"].tolist() == [bool(named)] * count
        changed = []
        for k in range(count):
            pictures = [x[k] for x in item["contra_imgs"]]
            if not item["contra_mask"][k]:  # the item's own picture, left out by the mask
                assert torch.equal(pictures[1], item["imgs"][1][0])
                continue
            matches = []
            for attribute in sorted(named):
                for value in values[attribute]:
                    if value == truth[attribute]:
                        continue
                    drawn = ds._apply_view(torch.from_numpy(
                        ds._redraw({**truth, attribute: value})).permute(2, 0, 1), 0, 0, False)
                    if all(torch.equal(a, b) for a, b in zip(drawn, pictures, strict=True)):
                        matches.append(attribute)
            assert len(matches) == 1, (index, k, matches)
            changed += matches
            assert (pictures[1] - item["imgs"][1][0]).abs().max() > 0.1
        if len(named) == count:  # the attributes take turns
            assert len(set(changed)) == len(changed)
        pairs += len(changed) == 2
        seen.update(changed)
    assert seen == {"shape", "size"} and (pairs > 0) == (count == 2)
    sizes = TextImageDataset(shapes_cfg("TRAIN.RANDOM_CROP=False", "TRAIN.FLIP=False"), "train",
                             tokenizer, [32], views=1, use_cache=False,
                             contradicting=("size",), contradicting_count=count)
    unnamed = 0
    for index in range(len(sizes)):
        torch.manual_seed(index)
        item = sizes[index]
        if not item["contra_mask"].any():  # neither caption names a size: the own picture
            unnamed += 1
            assert all(torch.equal(x, item["imgs"][0][0]) for x in item["contra_imgs"][0])
    assert unnamed > 0
    with pytest.raises(DataError, match="D_NEGATIVE_PICTURE_ATTRIBUTES"):
        TextImageDataset(shapes_cfg(), "train", tokenizer, [32], contradicting=("place",))


def test_minimal_pairs_need_word_lists(shapes_cfg, tokenizer):
    with pytest.raises(DataError, match="TEXT.WORD_LISTS"):
        TextImageDataset(shapes_cfg(), "train", tokenizer, [32], views=2, negatives=2)


def test_redraw_pairs_edit_picture_and_both_captions_alike(shapes_cfg, tokenizer):
    """TRAIN.REDRAW_PAIRS: the partner is the picture with one attribute that both captions
    name changed, in the same views, and its captions are the item's with that value written
    in (then flipped like their views)."""
    from miscc.minimal_pairs import with_value

    ds = minimal_pair_set(shapes_cfg, tokenizer, redraw=True)
    lists, changed_kinds = ds.word_lists, set()
    for seed in range(8):
        torch.manual_seed(seed)
        item = ds[seed]
        truth = {c: v[0] for c, v in lists.named(ds.info.captions[seed][0]).items()}
        originals = [ds.info.captions[seed][int(c)] for c in item["cap_idx"]]
        common = set(lists.named(originals[0])) & set(lists.named(originals[1]))
        matches = []
        for category in common:
            for value in lists.categories[category]:
                attrs = {**truth, category: value[0]}
                if attrs == truth:
                    continue
                caps = [with_value(c, lists, category, value[0]) for c in originals]
                caps = [lists.flip(c) if f else c for c, f in zip(caps, item["flipped"],
                                                                   strict=True)]
                views = [ds._apply_view(torch.from_numpy(ds._redraw(attrs)).permute(2, 0, 1),
                                        0, 0, bool(f))[0] for f in item["flipped"]]
                if all(torch.equal(item["redraw_imgs"][v], views[v]) and torch.equal(
                        item["redraw_tokens"][v], tokenizer.encode(caps[v])) for v in (0, 1)):
                    matches.append(category)
        assert len(matches) == 1, (seed, matches)
        changed_kinds.add(matches[0])
    assert len(changed_kinds) > 1


def test_outline_edits_keep_colour_size_position_and_background_and_change_the_outline():
    """`draw_shape_image(..., outline=...)`, the negatives of docs/DESIGN.md §14: every pixel is
    still a mix of the shape's colour and the background only, the covered area (the mix's sum)
    and its centroid stay, pixels away from the shape are untouched, and the coverage differs
    from the sharp shape's by at least a tenth of its area."""
    from datasets import BACKGROUNDS, COLOURS, OUTLINE_EDITS, SHAPES, SIZES, draw_shape_image

    background, colour = np.array(BACKGROUNDS["white"][0], float), np.array(COLOURS["blue"], float)
    ys, xs = np.mgrid[:32, :32]

    def coverage(img):
        pixels = np.asarray(img, float)
        mix = (pixels - background) @ (colour - background) / np.sum((colour - background) ** 2)
        residual = np.abs(pixels - (background + mix[..., None] * (colour - background))).max()
        return mix, residual, np.array([np.sum(mix * xs), np.sum(mix * ys)]) / mix.sum()

    for shape, size in itertools.product(SHAPES, SIZES):
        # away from the shape: beyond its radius plus three of the largest blur's sigmas
        reach = 32 * SIZES[size] * (1 + 3 * max(max(s) for s in OUTLINE_EDITS.values())) + 2
        far = np.hypot(xs + 0.5 - 0.67 * 32, ys + 0.5 - 0.67 * 32) > reach
        sharp = draw_shape_image(shape, "blue", size, "bottom right", "white", 32)
        mix, _, centre = coverage(sharp)
        for kind, sigma in ((k, s) for k, ss in OUTLINE_EDITS.items() for s in ss):
            blob = draw_shape_image(shape, "blue", size, "bottom right", "white", 32,
                                    outline=(kind, sigma))
            got, residual, got_centre = coverage(blob)
            assert residual < 2.0  # colour and background only
            assert 0.9 < got.sum() / mix.sum() < 1.05  # size
            assert np.abs(got_centre - centre).max() < 1.0  # position (in pixels)
            assert np.array_equal(np.asarray(blob)[far], np.asarray(sharp)[far])  # background
            if not (kind == "melt" and shape == "circle"):  # a melted circle is a circle
                assert np.abs(got - mix).sum() > 0.1 * mix.sum(), (shape, size, kind, sigma)
    with pytest.raises(ValueError, match="outline edit"):
        draw_shape_image("star", "red", "small", "center", "white", 32, outline=("wobble", 1))


def test_negative_pictures_with_outline_edits(shapes_cfg, tokenizer):
    """NEGATIVE_PICTURE_ATTRIBUTES with `outline`: a caption naming the shape gets its own
    picture with the outline destroyed (every other attribute as the caption's picture), never
    a melted circle."""
    from datasets import OUTLINE_EDITS, _picture_edits

    truth = {"shape": "circle", "colour": "red", "size": "small", "position": "top left",
             "background": "white"}
    edits = _picture_edits(truth, {"outline": []}, 9, 0)
    assert {e["outline"] for e in edits} == {("blur", s) for s in OUTLINE_EDITS["blur"]}
    star = _picture_edits({**truth, "shape": "star"}, {"outline": []}, 9, 0)
    assert len(star) == sum(len(s) for s in OUTLINE_EDITS.values())

    ds = minimal_pair_set(shapes_cfg, tokenizer, "TRAIN.FLIP=False", pictures=1,
                          picture_attributes=("outline",))
    for index in range(6):
        torch.manual_seed(index)
        item = ds[index]
        truth = {c: v[0] for c, v in ds.word_lists.named(ds.info.captions[index][0]).items()}
        drawn = [ds._apply_view(torch.from_numpy(ds._redraw({**truth, "outline": o})).permute(
            2, 0, 1), 0, 0, False)[0] for o in (("blur", s) for s in OUTLINE_EDITS["blur"])]
        drawn += [ds._apply_view(torch.from_numpy(ds._redraw({**truth, "outline": ("melt", s)}))
                                 .permute(2, 0, 1), 0, 0, False)[0]
                  for s in OUTLINE_EDITS["melt"] if truth["shape"] != "circle"]
        for v in range(2):
            assert item["neg_img_mask"][v, 0]  # every caption names the shape
            assert any(torch.equal(item["neg_imgs"][v, 0], d) for d in drawn)


def test_a_larger_shapes_set_extends_the_classic_one(tmp_path, monkeypatch):
    """More training pictures are drawn after the test split: the same test pictures and the
    same first BASE_TRAIN training pictures (here 6 of 6 and 15), byte for byte."""
    import datasets

    monkeypatch.setattr(datasets, "BASE_TRAIN", 6)
    small, large = tmp_path / "small", tmp_path / "large"
    datasets.make_shapes_dataset(small, n_train=6, n_test=4, size=32, seed=3)
    datasets.make_shapes_dataset(large, n_train=15, n_test=4, size=32, seed=3)
    for split, count in (("test", 4), ("train", 6)):
        keys = safe_load_pickle(small / split / "filenames.pickle")
        assert safe_load_pickle(large / split / "filenames.pickle")[:count] == keys
        for key in keys:
            for sub, ext in (("CUB_200_2011/images", "jpg"), ("text", "txt")):
                same = (small / sub / f"{key}.{ext}").read_bytes()
                assert same == (large / sub / f"{key}.{ext}").read_bytes()
    assert len(safe_load_pickle(large / "train" / "filenames.pickle")) == 15
