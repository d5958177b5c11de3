"""app.py and comparison.py: the page that draws a typed caption with both generators, driven in
headless Chromium on tiny runs, and its drawing function checked against `drawing.draw` and
generate.py (docs/DESIGN.md §15, §16).

Set APP_SCREENSHOT=<file> to keep a copy of the browser test's screenshot (README's picture).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_generate import run_cli

from comparison import Side, example_captions, image_scores, score_line
from drawing import CLIPGEN, DMGAN, draw
from r_precision import clip_score

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTION = "a large red star in the top left on a black background"
SIZE = {DMGAN: 32, CLIPGEN: 16}  # the tiny runs' image sides


@pytest.mark.parametrize("kind", [DMGAN, CLIPGEN])
def test_page_draws_the_pixels_of_drawing_draw_and_generate(kind, dmgan_run, clipgen_run,
                                                            tmp_path) -> None:
    run = dmgan_run if kind == DMGAN else clipgen_run
    side = Side(kind, run, torch.device("cpu"))
    assert side.error == ""
    got = side.answer(CAPTION, 2, 5)
    assert got.message == "" and got.images.shape == (2, SIZE[kind], SIZE[kind], 3)
    assert np.array_equal(got.images, draw(run, [CAPTION], n=2, seed=5)[0])
    code, _, err = run_cli(str(run), CAPTION, "--n", "2", "--seed", "5", "--out",
                           str(tmp_path), "--gpu", "-1")
    assert code == 0, err
    for j in range(2):
        with Image.open(next(tmp_path.glob(f"000_*_{j}.png"))) as png:
            assert np.array_equal(np.asarray(png.convert("RGB")), got.images[j])
    # the score is evaluation's CLIP score of the shown pixels under the fine-tuned encoder
    x = torch.from_numpy(got.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    enc = side.drawer.encoder
    sent = enc.encode_text(side.drawer.tokenizer([CAPTION]))[1]
    codes = enc.encode_image(x)[1]
    assert got.scores["fine-tuned"] == pytest.approx(
        [clip_score(codes[j:j + 1], sent) for j in range(2)], abs=1e-4)
    assert "CLIP score (fine-tuned)" in score_line(got)
    if kind == DMGAN:  # the image, then one attention panel per word piece, 8 to a row
        words = len(side.drawer.tokenizer.decode(side.drawer.tokenizer([CAPTION])[0]))
        rows = -(-(words + 1) // 8)
        assert got.attention.size == (8 * 128, rows * (128 + 14))
    else:
        assert got.attention is None


def test_independent_scorer_is_added_when_configured(dmgan_run, tiny_encoder_ckpt,
                                                     tmp_path) -> None:
    shutil.copytree(dmgan_run, tmp_path / "run")
    config = tmp_path / "run" / "config.yml"
    config.write_text(config.read_text().replace("INDEPENDENT_ENCODER: ''",
                                                 f"INDEPENDENT_ENCODER: {tiny_encoder_ckpt}"))
    side = Side(DMGAN, tmp_path / "run", torch.device("cpu"))
    got = side.answer(CAPTION, 1, 0)
    name = f"independent {tiny_encoder_ckpt}"
    assert list(got.scores) == ["fine-tuned", name]
    x = torch.from_numpy(got.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    tokens = side.drawer.tokenizer([CAPTION])
    assert got.scores[name] == image_scores(side.independent[0], x, tokens)


def test_long_captions_and_missing_runs_are_messages(dmgan_run, tmp_path) -> None:
    side = Side(DMGAN, dmgan_run, torch.device("cpu"))
    long = " ".join(["red"] * 21)  # one BPE token each; the run reads TEXT.WORDS_NUM=20
    got = side.answer(long, 1, 0)
    assert got.images is None
    assert got.message.startswith("The caption has 21 word tokens; this DM-GAN run reads at "
                                  "most 20 (TEXT.WORDS_NUM in")
    assert side.answer("  ", 1, 0).message == "Type a caption first."
    missing = Side(CLIPGEN, tmp_path / "nowhere", torch.device("cpu"))
    assert missing.drawer is None
    assert missing.error.startswith(f"CLIP-GEN run not loaded: {tmp_path / 'nowhere'} does not "
                                    "exist")
    assert missing.answer(CAPTION, 1, 0).message == missing.error
    wrong = Side(CLIPGEN, dmgan_run, torch.device("cpu"))
    assert wrong.error == (f"CLIP-GEN run not loaded: {dmgan_run} is a DM-GAN run, not a "
                           "CLIP-GEN run")
    examples = example_captions([missing, side])  # the loaded run's test split, spread over it
    assert len(examples) == 6 and len(set(examples)) == 6


# ------------------------------------------------------------------------ in a real browser
def _browser() -> tuple[str, str] | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name) and shutil.which("chromedriver"):
            return shutil.which(name), shutil.which("chromedriver")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_page(url: str, proc: subprocess.Popen, log: Path, limit: float = 300) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not answer on {url} within {limit} s:\n{log.read_text()}")


@pytest.fixture
def app_url(dmgan_run, clipgen_run, tmp_path):
    """app.py serving the two tiny runs on a free local port (stopped after the test)."""
    pytest.importorskip("gradio", reason="gradio is not installed (requirements-app.txt)")
    port = _free_port()
    log = tmp_path / "app.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--dmgan", str(dmgan_run),
                                 "--clipgen", str(clipgen_run), "--gpu", "-1",
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_page(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def chrome():
    """Headless Chromium under chromedriver (Debian's chromium + chromium-driver)."""
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (requirements-dev.txt)")
    found = _browser()
    if found is None:
        pytest.skip("no chromium + chromedriver on PATH (apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=found[1]))
    try:
        yield driver
    finally:
        driver.quit()


def test_browser_draws_both_generators_side_by_side(chrome, app_url, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chrome.get(app_url)
    wait = WebDriverWait(chrome, 120)  # generous: a loaded 2-core machine is slow
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#caption textarea"))
    example = chrome.find_element(By.CSS_SELECTOR, "button.gallery-item")
    shown = example.text.removesuffix("...").strip()  # long ones are cut on the button
    assert shown.startswith("a ")
    example.click()  # an example caption from the test split fills the box
    wait.until(lambda d: box.get_attribute("value").startswith(shown))
    box.clear()
    box.send_keys(CAPTION)
    chrome.find_element(By.CSS_SELECTOR, "#draw").click()

    def loaded(panel: str):
        sizes = chrome.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0] + ' img'))"
            ".filter(i => i.complete && i.naturalWidth > 0)"
            ".map(i => [i.naturalWidth, i.naturalHeight]);", panel)
        return sizes if len(sizes) == 4 else False  # the page's default: 4 images

    try:
        dm = wait.until(lambda d: loaded("#dmgan-images"))
        cg = wait.until(lambda d: loaded("#clipgen-images"))
        wait.until(lambda d: loaded("#attention") or d.find_elements(
            By.CSS_SELECTOR, "#attention img[src]"))
    finally:
        chrome.save_screenshot(str(tmp_path / "app.png"))
    assert dm == [[32, 32]] * 4 and cg == [[16, 16]] * 4
    for key in ("dmgan", "clipgen"):
        assert "CLIP score (fine-tuned)" in chrome.find_element(By.ID, f"{key}-scores").text
    with Image.open(tmp_path / "app.png") as shot:
        assert shot.size[0] > 600
    if os.environ.get("APP_SCREENSHOT"):
        shutil.copy(tmp_path / "app.png", os.environ["APP_SCREENSHOT"])
