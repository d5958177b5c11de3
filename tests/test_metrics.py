"""FID / IS / KID on torch-fidelity's Inception-v3 (miscc/{inception,features,statistics,metrics,
metrics_cli}.py, fid_score.py, inception_score.py), with a random-weight Inception built from
torch-fidelity's own class."""

from __future__ import annotations

import json
import math
import pickle
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fid_score  # noqa: E402
import inception_score  # noqa: E402
from datasets import make_shapes_dataset  # noqa: E402
from miscc import metrics_cli  # noqa: E402
from miscc.features import FeatureSet, ImageFiles, extract, find_images, full_fp32  # noqa: E402
from miscc.inception import (  # noqa: E402
    Inception,
    MetricsError,
    file_sha256,
    hub_weights_path,
    inception_filename,
    inception_url,
    load_inception,
    save_random_inception,
)
from miscc.statistics import (  # noqa: E402
    Stats,
    cached_real_stats,
    check_enough_for_dims,
    frechet_distance,
    kernel_inception_distance,
    load_stats,
    save_stats,
    statistics,
    stats_cache_path,
)
from miscc.statistics import inception_score as isc  # noqa: E402

BATCH = 8
N_IMAGES = 8
SPLITS = 4  # IS splits in these tests (2 images each)
NATIVE_SIZE = 299  # torch-fidelity's Inception input size
TEST_SIZE = 75  # the smallest input Inception-v3 accepts: ~10x less CPU time per image


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def small_inception_input():
    """Run torch-fidelity's extractor at 75 px instead of 299 px, on one thread, in this module.

    The resize to `INPUT_IMAGE_SIZE` happens inside torch-fidelity's own forward (for our
    pass and for `calculate_metrics` alike), so every comparison stays like for like; only
    `test_native_input_size_matches_calculate_metrics` runs at the real 299 px. One intra-op
    thread: on a small shared CPU, OpenMP threads spin-waiting for each other made this module
    ~3x slower.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    assert FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE == NATIVE_SIZE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", TEST_SIZE)
            yield
    finally:
        torch.set_num_threads(threads)


def blob_image(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Bright blobs on dark ('a') or dark blobs on bright ('b'): two distinct distributions."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 20.0 if kind == "a" else 200.0, np.float32)
    for _ in range(3):
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(size / 10, size / 3.5)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (
            rng.uniform(100, 255, 3) if kind == "a" else rng.uniform(0, 120, 3))
    img += rng.normal(0, 8, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def write_set(root: Path, n: int, kind: str, seed: int, ext: str = "png",
              size: int = 32) -> Path:
    """n images in nested folders (like valid/single/<class>/...)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = root / f"class{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        e = ext if ext != "mixed" else ("png" if i % 2 else "jpg")
        Image.fromarray(blob_image(rng, kind, size)).save(sub / f"{i:03d}.{e}")
    return root


@pytest.fixture(scope="module")
def weights(small_inception_input, tmp_path_factory) -> Path:
    """Random weights through torch-fidelity's own Inception class (save_random_inception)."""
    return save_random_inception(tmp_path_factory.mktemp("weights") / "random_inception.pth")


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    return {"A": write_set(root / "A", N_IMAGES, "a", seed=1),
            "B": write_set(root / "B", N_IMAGES, "b", seed=2, ext="mixed")}


@pytest.fixture(scope="module")
def inception(weights) -> Inception:
    return load_inception(64, logits=True, weights=weights, device="cpu")


@pytest.fixture(scope="module")
def feats(inception, sets) -> dict[str, FeatureSet]:
    """One pass over each set: 64-d pool features and logits together."""
    return {k: extract(v, inception, BATCH, workers=0, progress=False) for k, v in sets.items()}


@pytest.fixture(scope="module")
def reference(weights, sets) -> dict:
    """torch_fidelity.calculate_metrics called directly on the same folders and weights."""
    import torch_fidelity

    return torch_fidelity.calculate_metrics(
        input1=str(sets["A"]), input2=str(sets["B"]), isc=True, fid=True, kid=True,
        feature_layer_fid="64", feature_layer_kid="64", kid_subset_size=N_IMAGES,
        isc_splits=SPLITS,
        feature_extractor_weights_path=str(weights), cuda=False, batch_size=BATCH,
        samples_find_deep=True, cache=False, verbose=False, save_cpu_ram=True)


def run_cli(module, argv: list[str], capsys) -> tuple[int, str, str]:
    code = module.main([*argv, "--gpu", "-1", "--workers", "0", "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------- the network
def test_random_inception_is_non_degenerate(feats):
    a, b = feats["A"], feats["B"]
    assert a.pool.shape == (N_IMAGES, 64) and a.logits.shape == (N_IMAGES, 1008)
    assert (a.pool.std(0) > 1e-4).float().mean() > 0.5  # features vary between images
    gap = (a.pool.mean(0) - b.pool.mean(0)).norm()
    assert gap > 3 * a.pool.std(0).norm() / math.sqrt(N_IMAGES)  # the two sets differ
    assert len(set(a.logits.argmax(1).tolist())) > 3  # not one shared class
    assert isc(a.logits, SPLITS)[0] > 1.2


def test_mixed_sizes_and_formats_are_batched_by_size(inception, tmp_path, feats, sets):
    """A folder with 32 px and 48 px images gives each image the features it gets alone."""
    files = find_images(sets["A"])[:2]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, f in enumerate(files):
        Image.open(f).save(mixed / f"{i}_small.png")
    rng = np.random.default_rng(5)
    for i in range(2):
        Image.fromarray(blob_image(rng, "a", 48)).save(mixed / f"{i}_zbig.jpg")
    together = extract(mixed, inception, batch_size=4, progress=False)
    alone = torch.cat([extract(ImageFiles([f]), inception, 1, progress=False).pool
                       for f in find_images(mixed)])
    torch.testing.assert_close(together.pool, alone, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(together.pool[[0, 2]], feats["A"].pool[:2], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ the math
def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric(feats):
    sa, sb = statistics(feats["A"].pool), statistics(feats["B"].pool)
    ab, ba = frechet_distance(sa, sb), frechet_distance(sb, sa)
    assert ab > 0.1
    assert abs(frechet_distance(sa, sa)) < 1e-6 * ab
    assert ab == pytest.approx(ba, rel=1e-6)


def test_frechet_distance_of_known_gaussians_equals_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # commuting covariances, rotated
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(Stats(mu1, s1, 10), Stats(mu2, s2, 10))
    assert got == pytest.approx(closed, rel=1e-9)
    # general (non-commuting) covariances: tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½)
    x, y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = x @ x.T + 0.1 * np.eye(d), y @ y.T + 0.1 * np.eye(d)
    r1 = scipy.linalg.sqrtm(s1).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
    got = frechet_distance(Stats(mu1, s1, 10), Stats(mu2, s2, 10))
    assert got == pytest.approx(ref, rel=1e-7)
    # one dimension: (m1 - m2)^2 + (sd1 - sd2)^2; float32 mu vs float64 mu is promoted
    one = frechet_distance(Stats(np.array([1.0], np.float32), np.array([[4.0]]), 2),
                           Stats(np.array([3.0]), np.array([[9.0]]), 2))
    assert one == pytest.approx(4.0 + 1.0)


def is_by_hand(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split, after torch-fidelity's seeded shuffle."""
    x = logits[np.random.RandomState(2020).permutation(len(logits))].astype(np.float64)
    x = x - x.max(1, keepdims=True)
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_equals_the_formula_by_hand(feats):
    for logits, splits in ((feats["A"].logits, SPLITS), (feats["B"].logits, 3)):
        mean, std = isc(logits, splits)
        ref_mean, ref_std = is_by_hand(logits.numpy(), splits)
        assert mean == pytest.approx(ref_mean, rel=1e-9)
        assert std == pytest.approx(ref_std, rel=1e-7, abs=1e-12)
    synthetic = torch.randn(50, 1008, generator=torch.Generator().manual_seed(0)) * 4
    assert isc(synthetic, 5)[0] == pytest.approx(is_by_hand(synthetic.numpy(), 5)[0])
    with pytest.raises(MetricsError, match="needs at least 10 images"):
        isc(synthetic[:7], 10)


def test_statistics_round_trip_through_npz(feats, tmp_path):
    sa = statistics(feats["A"].pool, keep_features=True, meta={"weights": "abc"})
    sb = statistics(feats["B"].pool)
    path = save_stats(tmp_path / "sub" / "a.npz", sa)
    back = load_stats(path, dims=64)
    np.testing.assert_array_equal(back.mu, sa.mu)
    np.testing.assert_array_equal(back.sigma, sa.sigma)
    np.testing.assert_array_equal(back.features, feats["A"].pool.numpy())
    assert back.mu.dtype == sa.mu.dtype and back.n == N_IMAGES and back.meta == {"weights": "abc"}
    assert frechet_distance(back, sb) == frechet_distance(sa, sb)
    assert not list(path.parent.glob(".*tmp"))  # atomic write left no temp file
    # pytorch-fid's layout (mu/sigma only) loads too
    np.savez(tmp_path / "pfid.npz", mu=sa.mu.astype(np.float64), sigma=sa.sigma)
    assert frechet_distance(load_stats(tmp_path / "pfid.npz", 64), sa) == pytest.approx(
        0, abs=1e-6 * frechet_distance(sa, sb))
    with pytest.raises(MetricsError, match="holds 64-d statistics but --dims 2048"):
        load_stats(path, dims=2048)


# ------------------------------------------------------------- agreement with torch-fidelity
def test_library_matches_torch_fidelity_calculate_metrics(feats, reference):
    a, b = feats["A"], feats["B"]
    fid = frechet_distance(statistics(a.pool), statistics(b.pool))
    assert fid == pytest.approx(reference["frechet_inception_distance"], rel=1e-6)
    is_mean, is_std = isc(a.logits, SPLITS)
    assert is_mean == pytest.approx(reference["inception_score_mean"], rel=1e-6)
    assert is_std == pytest.approx(reference["inception_score_std"], rel=1e-5)
    kid_mean, kid_std, _ = kernel_inception_distance(a.pool, b.pool, 100, N_IMAGES)
    assert kid_mean == pytest.approx(reference["kernel_inception_distance_mean"], rel=1e-5)
    assert kid_std == pytest.approx(reference["kernel_inception_distance_std"], abs=1e-9)


def test_fid_cli_one_pass_matches_torch_fidelity(weights, sets, reference, capsys):
    code, out, err = run_cli(fid_score, [
        "--path", str(sets["A"]), str(sets["B"]), "--dims", "64", "--weights", str(weights),
        "--batch_size", str(BATCH), "--kid", "--kid-subset-size", str(N_IMAGES), "--isc",
        "--splits", str(SPLITS), "--allow-few-images", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)  # stdout holds exactly one JSON object
    assert res["n_gen"] == res["n_real"] == N_IMAGES and res["dims"] == 64
    assert res["fid"] == pytest.approx(reference["frechet_inception_distance"], rel=1e-6)
    assert res["kid_mean"] == pytest.approx(reference["kernel_inception_distance_mean"],
                                            rel=1e-5)
    assert res["is_mean"] == pytest.approx(reference["inception_score_mean"], rel=1e-6)
    assert res["is_std"] == pytest.approx(reference["inception_score_std"], rel=1e-5)


def test_is_cli_matches_torch_fidelity(weights, sets, reference, capsys):
    code, out, err = run_cli(inception_score, [
        "--path", str(sets["A"]), "--weights", str(weights), "--batch_size", str(BATCH),
        "--splits", str(SPLITS), "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["is_mean"] == pytest.approx(reference["inception_score_mean"], rel=1e-6)
    assert res["is_std"] == pytest.approx(reference["inception_score_std"], rel=1e-5)
    assert res["n"] == N_IMAGES and res["splits"] == SPLITS


def test_save_stats_then_fid_against_npz(weights, sets, tmp_path, capsys):
    small_a, small_b = tmp_path / "a", tmp_path / "b"
    write_set(small_a, 4, "a", seed=3)
    write_set(small_b, 4, "b", seed=4)
    npz = tmp_path / "real.npz"
    base = ["--dims", "64", "--weights", str(weights), "--allow-few-images", "--json"]
    code, out, err = run_cli(fid_score, ["--path", str(small_b), "--save-stats", str(npz),
                                         "--kid", *base], capsys)
    assert code == 0, err
    assert json.loads(out)["n"] == 4 and load_stats(npz, 64).features.shape == (4, 64)
    code, out, err = run_cli(fid_score, ["--path", str(small_a), str(npz), "--kid", *base],
                             capsys)
    assert code == 0, err
    from_npz = json.loads(out)
    code, out, err = run_cli(fid_score, ["--path", str(small_a), str(small_b), "--kid", *base],
                             capsys)
    assert code == 0, err
    from_folder = json.loads(out)
    assert from_npz["fid"] == pytest.approx(from_folder["fid"], rel=1e-9)
    assert from_npz["kid_mean"] == pytest.approx(from_folder["kid_mean"], rel=1e-9)
    # mismatched dims: a clear error before any pass
    code, _, err = run_cli(fid_score, ["--path", str(small_a), str(npz), "--dims", "192",
                                       "--weights", str(weights)], capsys)
    assert code == 2 and "holds 64-d statistics but --dims 192" in err


def test_larger_dims_on_a_tiny_set(weights, tmp_path, capsys):
    """--dims 768 with --allow-few-images works on 4 images; the default --dims 2048 refuses
    them before any pass, naming the way out."""
    a, b = write_set(tmp_path / "a", 4, "a", seed=7), write_set(tmp_path / "b", 4, "b", seed=8)
    code, out, err = run_cli(fid_score, ["--path", str(a), str(b), "--weights", str(weights),
                                         "--dims", "768", "--allow-few-images", "--json"],
                             capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["dims"] == 768 and math.isfinite(res["fid"]) and res["fid"] > 0
    assert "larger than" in err  # batch 50 > 4 images: noted, lowered
    code, _, err = run_cli(fid_score, ["--path", str(a), str(b), "--weights", str(weights)],
                           capsys)
    assert code == 2 and "too few for FID at --dims 2048" in err and "--allow-few-images" in err


def test_native_input_size_matches_calculate_metrics(weights, tmp_path, monkeypatch, capsys):
    """At torch-fidelity's real 299 px input, fid_score.py equals calculate_metrics too (FID at
    64 dims: only the network's stem runs, so this stays cheap)."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    a, b = write_set(tmp_path / "a", 4, "a", seed=12), write_set(tmp_path / "b", 4, "b", seed=13)
    args = ["--path", str(a), str(b), "--dims", "64", "--weights", str(weights), "--batch_size",
            "4", "--allow-few-images", "--json"]
    code, out, err = run_cli(fid_score, args, capsys)
    assert code == 0, err
    small_input_fid = json.loads(out)["fid"]
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", NATIVE_SIZE)
    native = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), fid=True, feature_layer_fid="64",
        feature_extractor_weights_path=str(weights), cuda=False, batch_size=4,
        samples_find_deep=True, cache=False, verbose=False, save_cpu_ram=True)
    code, out, err = run_cli(fid_score, args, capsys)
    assert code == 0, err
    fid = json.loads(out)["fid"]
    assert fid == pytest.approx(native["frechet_inception_distance"], rel=1e-6)
    assert fid != pytest.approx(small_input_fid, rel=1e-3)  # the input size really changed


# -------------------------------------------------------------------------- error paths
def test_weights_download_failure_is_one_clear_message(sets, tmp_path, monkeypatch, capsys):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights

    def offline(url, *args, **kwargs):
        print(f'Downloading: "{url}" to ...', file=sys.stderr)  # as torch hub does
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    start = time.perf_counter()
    code, out, err = run_cli(fid_score, ["--path", str(sets["A"]), str(sets["B"]), "--dims",
                                         "64", "--allow-few-images"], capsys)
    assert time.perf_counter() - start < 20
    assert code == 2 and out == ""
    assert inception_filename() in err and inception_url() in err and "--weights" in err
    assert err.startswith("error: cannot get the Inception-v3 weights") and "Downloading" not in err
    assert err.count("error:") == 1
    code, _, err = run_cli(inception_score, ["--path", str(sets["A"]), "--splits", str(SPLITS)],
                           capsys)
    assert code == 2 and "--weights PATH" in err


def test_bad_weights_files(sets, tmp_path, capsys):
    code, _, err = run_cli(fid_score, ["--path", str(sets["A"]), str(sets["B"]), "--dims", "64",
                                       "--allow-few-images", "--weights",
                                       str(tmp_path / "nope.pth")], capsys)
    assert code == 2 and "no such file" in err and inception_filename() in err
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    code, _, err = run_cli(fid_score, ["--path", str(sets["A"]), str(sets["B"]), "--dims", "64",
                                       "--allow-few-images", "--weights",
                                       str(tmp_path / "other.pth")], capsys)
    assert code == 2 and "does not fit" in err and "Missing key" in err
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump(Path("x"), fh, protocol=2)
    code, _, err = run_cli(fid_score, ["--path", str(sets["A"]), str(sets["B"]), "--dims", "64",
                                       "--allow-few-images", "--weights",
                                       str(tmp_path / "evil.pth")], capsys)
    assert code == 2 and "weights_only=True" in err


def test_empty_and_missing_folders(weights, sets, tmp_path, capsys):
    empty = tmp_path / "empty" / "nested"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    w = ["--weights", str(weights), "--dims", "64"]
    code, _, err = run_cli(fid_score, ["--path", str(empty.parent), str(sets["B"]), *w], capsys)
    assert code == 2 and "no images found" in err and "recursively" in err
    code, _, err = run_cli(fid_score, ["--path", str(sets["A"]), str(tmp_path / "gone"), *w],
                           capsys)
    assert code == 2 and "no such directory" in err
    code, _, err = run_cli(inception_score, ["--path", str(empty.parent), *w[:2]], capsys)
    assert code == 2 and "no images found" in err
    code, _, err = run_cli(fid_score, ["--path", str(sets["A"]), *w], capsys)
    assert code == 2 and "--save-stats" in err
    code, _, err = run_cli(fid_score, [*w], capsys)
    assert code == 2 and "--path GEN REAL" in err


def test_too_few_images_for_dims_or_splits(weights, sets, capsys):
    code, _, err = run_cli(fid_score, ["--path", str(sets["A"]), str(sets["B"]), "--dims", "64",
                                       "--weights", str(weights)], capsys)
    assert code == 2 and f"{N_IMAGES} images are too few for FID at --dims 64" in err
    assert "at least 65 images" in err and "a smaller --dims" not in err  # none fits 12
    with pytest.raises(MetricsError, match=r"Use more images or a smaller --dims \(64\)"):
        check_enough_for_dims(100, 2048, "set", allow_few=False)
    code, _, err = run_cli(inception_score, ["--path", str(sets["A"]), "--splits", "50",
                                             "--weights", str(weights)], capsys)
    assert code == 2 and "--splits 50 needs at least 50 images" in err


def test_unreadable_images_are_skipped_and_counted(weights, tmp_path, capsys):
    folder = write_set(tmp_path / "gen", 4, "a", seed=9)
    (folder / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = next(folder.rglob("*.png")).read_bytes()
    (folder / "class1" / "truncated.png").write_bytes(good[: len(good) // 2])
    real = write_set(tmp_path / "real", 4, "b", seed=10)
    code, out, err = run_cli(fid_score, ["--path", str(folder), str(real), "--dims", "64",
                                         "--weights", str(weights), "--allow-few-images",
                                         "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["n_gen"] == 4 and res["skipped_gen"] == 2 and res["n_real"] == 4
    assert "skipped 2 of 6 unreadable images" in err and "broken.png" in err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"nope")
    (only_bad / "y.png").write_bytes(b"nope")
    code, _, err = run_cli(fid_score, ["--path", str(only_bad), str(real), "--dims", "64",
                                       "--weights", str(weights), "--allow-few-images"], capsys)
    assert code == 2 and "none of the 2 images could be read" in err


def test_kid_needs_features_in_npz(weights, sets, feats, tmp_path, capsys):
    save_stats(tmp_path / "s.npz", statistics(feats["B"].pool))
    code, _, err = run_cli(fid_score, ["--path", str(sets["A"]), str(tmp_path / "s.npz"),
                                       "--dims", "64", "--kid", "--weights", str(weights),
                                       "--allow-few-images"], capsys)
    assert code == 2 and "KID needs per-image features" in err


# ------------------------------------------------------------ real-statistics cache, --data
class CountingImages(torch.utils.data.Dataset):
    """uint8 images with `.keys`, counting how often items are read."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = [torch.from_numpy(blob_image(rng, "a", 32)).permute(2, 0, 1)
                       for _ in range(n)]
        self.keys = [f"k{i}" for i in range(n)]
        self.reads = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return self.images[i]


def test_real_stats_cache_reused_and_rebuilt(weights, tmp_path):
    inc = load_inception(64, logits=False, weights=weights)
    data = CountingImages(4)
    path = stats_cache_path(tmp_path / "cache", "shapes", "test", 32, 64)
    assert path == tmp_path / "cache" / "fid_stats_shapes_test_32px_64.npz"
    logs: list[str] = []
    opts = {"batch_size": 4, "progress": False, "log": logs.append}
    first, hit = cached_real_stats(data, path, inc, **opts)
    assert not hit and data.reads == 4 and path.is_file()
    again, hit = cached_real_stats(data, path, inc, **opts)
    assert hit and data.reads == 4  # not recomputed
    np.testing.assert_array_equal(again.sigma, first.sigma)
    _, hit = cached_real_stats(data, path, inc, need_features=True, **opts)
    assert not hit and data.reads == 8 and "KID needs" in logs[-1]
    data.keys[0] = "renamed"
    _, hit = cached_real_stats(data, path, inc, **opts)
    assert not hit and data.reads == 12 and "image list changed" in logs[-1]


def test_data_config_resolves_paths_and_caches(weights, tmp_path, capsys, monkeypatch):
    data_dir, out_dir = tmp_path / "data", tmp_path / "out"
    make_shapes_dataset(data_dir, n_train=2, n_test=5, size=32, seed=0)
    write_set(out_dir / "valid" / "single", 5, "a", seed=11)
    cfg = tmp_path / "eval_shapes.yml"
    cfg.write_text(f"CONFIG_NAME: eval\nDATASET_NAME: shapes\nDATA_DIR: {data_dir}\n"
                   f"OUTPUT_DIR: {out_dir}\nTREE:\n  BRANCH_NUM: 2\n  BASE_SIZE: 16\n")
    argv = ["--cfg", str(cfg), "--dims", "64", "--weights", str(weights), "--json",
            "--allow-few-images", "--kid"]
    code, out, err = run_cli(fid_score, argv, capsys)
    assert code == 0, err
    first = json.loads(out)
    cache = data_dir / "cache" / "fid_stats_shapes_test_32px_64.npz"
    assert first["real_stats_cache"] == str(cache) and not first["real_stats_cached"]
    assert first["n_gen"] == 5 and first["n_real"] == 5 and cache.is_file()
    # again, as text: the real side comes from the cache; one line per metric on stdout
    code, out, err = run_cli(fid_score, [a for a in argv if a != "--json"], capsys)
    assert code == 0, err
    assert "using cached real statistics" in err and "computing real statistics" not in err
    assert out.splitlines() == [f"FID: {first['fid']:.3f}",
                                f"KID: {first['kid_mean']:.4f} ± {first['kid_std']:.4f}"]
    code, out, err = run_cli(inception_score, ["--cfg", str(cfg), "--weights", str(weights),
                                               "--splits", "2", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["n"] == 5
    # --data NAME reads cfg/eval_clip_<NAME>.yml; a missing one says to use --cfg
    monkeypatch.setattr(metrics_cli, "REPO_ROOT", tmp_path)
    code, _, err = run_cli(fid_score, ["--data", "bird", "--weights", str(weights)], capsys)
    assert code == 2 and "eval_clip_bird.yml not found" in err and "--cfg" in err


def _tf32_flags() -> dict[str, object]:
    """Every switch `full_fp32` touches, as (name -> value), for the PyTorch in use."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):
        return {"conv": conv.fp32_precision, "matmul": matmul.fp32_precision}
    return {"conv": torch.backends.cudnn.allow_tf32, "matmul": matmul.allow_tf32}


def _set_tf32_flags(flags: dict[str, object]) -> None:
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision, matmul.fp32_precision = flags["conv"], flags["matmul"]
    else:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = flags["conv"], flags["matmul"]


def test_full_fp32_turns_tf32_off_and_restores():
    """Inside: convolutions and matmuls in IEEE fp32 (no TF32); after, even after an exception,
    the caller's settings are back, whatever they were."""
    new_api = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")
    on = {"conv": "tf32", "matmul": "tf32"} if new_api else {"conv": True, "matmul": True}
    mixed = {"conv": "tf32", "matmul": "ieee"} if new_api else {"conv": True, "matmul": False}
    off = {"conv": "ieee", "matmul": "ieee"} if new_api else {"conv": False, "matmul": False}
    saved = _tf32_flags()
    try:
        for before in (on, mixed):
            _set_tf32_flags(before)
            with full_fp32():
                assert _tf32_flags() == off
            assert _tf32_flags() == before
        _set_tf32_flags(on)
        with pytest.raises(KeyError, match="boom"), full_fp32():
            assert _tf32_flags() == off
            raise KeyError("boom")
        assert _tf32_flags() == on
    finally:
        _set_tf32_flags(saved)


def test_extract_runs_under_full_fp32(inception, sets, monkeypatch):
    """The Inception pass itself is wrapped in `full_fp32` (TF32 off on CUDA)."""
    states: list[dict[str, object]] = []
    forward = inception.net.forward

    def spy(x):
        states.append(_tf32_flags())
        return forward(x)

    monkeypatch.setattr(inception.net, "forward", spy)
    outside = _tf32_flags()
    with full_fp32():
        inside = _tf32_flags()
    extract(ImageFiles(find_images(sets["A"])[:2]), inception, 2, progress=False)
    assert states == [inside] and _tf32_flags() == outside


def test_weights_are_taken_from_the_torch_hub_cache(weights, tmp_path, monkeypatch):
    """Without --weights, torch-fidelity's file in the torch hub cache ($TORCH_HOME) is used with
    no download; a corrupt cached file says to delete it."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download the weights although they are cached")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = hub_weights_path()
    assert cached == tmp_path / "hub" / "checkpoints" / inception_filename()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights.read_bytes())
    inc = load_inception(64, logits=False)
    assert inc.weights_id == file_sha256(weights)
    expected = torch.load(weights, weights_only=True)
    got = inc.net.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    cached.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(MetricsError, match="cached weights .* are unreadable; delete"):
        load_inception(64, logits=False)
