"""The demo, driven for real: through gradio's Python client and in a headless Chromium, the classes shown are the
model's own top-5, computed here directly; weights that cannot be loaded and unreadable uploads are said in the page.

The model is a random MambaOut-Femto with 4 classes at 32 px, its classifier scaled up so that no two classes come
near a tie; it is saved as a run's training checkpoint (config and class list inside), as train.py writes it.
"""
from __future__ import annotations

import importlib.util

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

from conftest import CLASSES, tiny_overrides, write_image_folder
from mambaout import create_model
from mambaout.config import load_config
from mambaout.models import published

gr = pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[dev]'")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from mambaout import demo as demo_app  # noqa: E402

SKIP_BROWSER_ENV = "MAMBAOUT_SKIP_BROWSER_TEST"
# Root in a container, and no network: no sandbox, no GPU, none of Chromium's background requests.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000")


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory) -> Path:
    """``best.pth`` of a 4-class run on 32 px images (its validation folder gives the examples)."""
    folder = tmp_path_factory.mktemp("demo-run")
    root = write_image_folder(folder / "images", {"val": 2})
    cfg = load_config(None, tiny_overrides(root, folder))
    torch.manual_seed(0)
    weights = create_model("mambaout_femto", num_classes=len(CLASSES)).state_dict()
    weights["head.fc.weight"] *= 30
    path = folder / "best.pth"
    torch.save({"model": weights, "config": cfg.to_dict(), "classes": list(CLASSES)}, path)
    return path


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, Path]:
    """Two photos of other sizes than the model's (the resize and crop matter), and a damaged file."""
    folder = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(1)
    files = {"noise": folder / "noise.png", "stripes": folder / "stripes.jpg", "damaged": folder / "damaged.png"}
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(files["noise"])
    stripes = np.zeros((64, 48, 3), np.uint8)
    stripes[::4, :, 2] = 255
    Image.fromarray(stripes).save(files["stripes"], quality=95)
    files["damaged"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    return files


def direct_probabilities(checkpoint: Path, image: Path) -> torch.Tensor:
    """The model's class probabilities, computed without the demo: timm's eval transform, our model."""
    saved = torch.load(checkpoint, weights_only=True)
    model = create_model("mambaout_femto", num_classes=len(CLASSES))
    model.load_state_dict(saved["model"])
    transform = create_transform(32, crop_pct=1.0, interpolation="bicubic")
    with torch.no_grad():
        return model.eval()(transform(Image.open(image).convert("RGB"))[None]).softmax(-1)[0]


def shown_top(confidences: list[tuple[str, float]], checkpoint: Path, image: Path) -> None:
    """The classes shown, in order, with their probabilities, are the model's top ones."""
    probabilities = direct_probabilities(checkpoint, image)
    order = probabilities.argsort(descending=True).tolist()
    assert [name for name, _ in confidences] == [CLASSES[i] for i in order]
    assert [p for _, p in confidences] == pytest.approx(probabilities[order].tolist(), abs=1e-4)
    assert probabilities[order[0]] - probabilities[order[1]] > 0.05  # a clear winner: no tie to break


@pytest.fixture(scope="module")
def servers(run_checkpoint, tmp_path_factory):
    """The demo of the run, and one started with weights that do not exist; their URLs."""
    working = demo_app.build_demo(str(run_checkpoint))
    broken = demo_app.build_demo(str(tmp_path_factory.mktemp("none") / "missing.pth"))
    urls = [demo_app.launch(app, prevent_thread_lock=True, quiet=True)[1] for app in (working, broken)]
    yield {"working": urls[0], "broken": urls[1]}
    working.close()
    broken.close()


def test_client_gets_the_models_top_classes_preprocessing_and_time(servers, run_checkpoint, uploads):
    client = Client(servers["working"], verbose=False)
    for name in ("noise", "stripes"):
        label, details = client.predict(handle_file(str(uploads[name])), api_name=f"/{demo_app.API_NAME}")
        confidences = [(entry["label"], entry["confidence"]) for entry in label["confidences"]]
        shown_top(confidences, run_checkpoint, uploads[name])
        assert label["label"] == confidences[0][0]
        assert "resize the short side to 32 px (bicubic), centre-crop 32 x 32" in details
        assert " ms (forward pass of one image, mambaout_femto on cpu)" in details


def test_client_errors_are_messages(servers, uploads):
    with pytest.raises(AppError, match="damaged.png cannot be read as an image .* JPEG, PNG"):
        Client(servers["working"], verbose=False).predict(handle_file(str(uploads["damaged"])),
                                                          api_name=f"/{demo_app.API_NAME}")
    with pytest.raises(AppError, match="missing.pth: no such file"):
        Client(servers["broken"], verbose=False).predict(handle_file(str(uploads["noise"])),
                                                         api_name=f"/{demo_app.API_NAME}")


def test_examples_exist_offline(run_checkpoint, tmp_path):
    """A run's first validation image of each class, from a folder or from shards; scikit-learn's two photos for a
    model without a run."""
    run = demo_app.load_model(str(run_checkpoint), None, False)
    val = Path(run.config.data.root) / "val"
    firsts = [sorted((val / name).iterdir())[0] for name in sorted(CLASSES)]
    assert demo_app.example_images(run) == [str(path) for path in firsts]
    if importlib.util.find_spec("webdataset"):
        from shards import write_wds

        run.config.data.format, run.config.data.cache_dir = "wds", str(tmp_path / "cache")
        run.config.data.root = str(write_wds(val.parent, tmp_path / "wds", splits=("val",)))
        assert [Path(path).read_bytes() for path in demo_app.example_images(run)] == [
            path.read_bytes() for path in firsts]
        run.config.data.format = "folder"
    run.config.data.root = "/nonexistent"
    photos = demo_app.example_images(run)
    assert [Path(path).name for path in photos] == ["china.jpg", "flower.jpg"]
    assert all(Image.open(path).size == (640, 427) for path in photos)


def test_pretrained_offline_is_said_in_the_page(tmp_path, monkeypatch):
    """The release URL points at a refused loopback port: nothing leaves the machine."""
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(published, "RELEASE_URL", "http://127.0.0.1:9/x.pth")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    page = demo_app.build_demo(model_name="mambaout_femto", pretrained=True)
    assert "could not download http://127.0.0.1:9/x.pth" in page.description
    assert "--checkpoint PATH" in page.description
    assert "--model" in demo_app.build_demo(pretrained=True).description
    assert "no weights given" in demo_app.build_demo().description


def test_release_weights_are_named_with_imagenet_classes(tmp_path):
    """Weights that do not name their 1000 classes get ImageNet's names, from timm (no download)."""
    torch.manual_seed(0)
    weights = timm.create_model("mambaout_femto", pretrained=False).state_dict()
    torch.save(weights, tmp_path / "femto.pth")
    classifier = demo_app.load_model(str(tmp_path / "femto.pth"), None, False)  # the variant is recognised
    assert classifier.model_name == "mambaout_femto"
    assert classifier.names[:2] == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    assert classifier.names.count("crane") == 0 and "crane (n02012849)" in classifier.names
    assert classifier.preprocessing.img_size == 224 and classifier.preprocessing.interpolation == "bicubic"


# --- in a real browser -------------------------------------------------------------------------------------------

def chromium_driver():
    """Selenium driving Debian's chromium through its chromedriver; a missing browser fails the test (the README's
    test command installs it) unless MAMBAOUT_SKIP_BROWSER_TEST=1 says to go without."""
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        if os.environ.get(SKIP_BROWSER_ENV) == "1":
            pytest.skip(f"no Chromium/chromedriver, and {SKIP_BROWSER_ENV}=1")
        pytest.fail(f"the demo's browser test needs Chromium and chromedriver (found: browser {browser}, driver "
                    f"{driver}): run `bash scripts/install_browser.sh` (Debian's chromium and chromium-driver), or "
                    f"set {SKIP_BROWSER_ENV}=1 to skip this test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_browser_upload_shows_the_models_top_classes(servers, run_checkpoint, uploads):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def upload_and_submit(path: Path) -> None:
        browser.get(servers["working"])
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "[data-testid=image] img"))
        next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Submit").click()

    browser = chromium_driver()
    wait = WebDriverWait(browser, 60)
    try:
        upload_and_submit(uploads["noise"])
        top = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "[data-testid=label-output-value]").text)
        rows = browser.find_elements(By.CSS_SELECTOR, "button.confidence-set")
        confidences = [(row.find_element(By.CSS_SELECTOR, "dt").text,
                        float(row.find_element(By.TAG_NAME, "meter").get_attribute("value"))) for row in rows]
        shown_top(confidences, run_checkpoint, uploads["noise"])
        assert top == confidences[0][0]
        assert "Inference:" in browser.find_element(By.TAG_NAME, "body").text

        upload_and_submit(uploads["damaged"])
        # the toast is in the page a moment before its text (seen on a loaded machine): wait for the text
        toast = wait.until(lambda page: [element.text for element in
                                         page.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]") if element.text])
        assert "damaged.png cannot be read as an image" in toast[0]

        browser.get(servers["broken"])
        wait.until(lambda page: "could not be loaded" in page.find_element(By.TAG_NAME, "body").text)
        assert "missing.pth: no such file" in browser.find_element(By.TAG_NAME, "body").text
    finally:
        browser.quit()
