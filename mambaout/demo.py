"""The demo: upload a photo, see a model's top-5 classes, the preprocessing it went through and the inference time.

    python scripts/demo.py --checkpoint runs/quickstart-<time>/best.pth    # after the quickstart
    python scripts/demo.py --model mambaout_femto --pretrained              # the released weights

A gradio app (``pip install -e '.[demo]'``) that needs no network: class names come from the run (its
``classes.json``) or, for ImageNet models, from timm; the example images from the run's validation folder or, for
a model without one, scikit-learn's two sample photos. Whatever goes wrong (weights that cannot be loaded, an upload
that is not an image) is said in the page, never as a traceback.
"""
from __future__ import annotations

import argparse
import io
import logging
import tempfile
from pathlib import Path

import gradio as gr
from PIL import Image

from .checkpoint import CheckpointError
from .config import ConfigError
from .data.sources import DataSourceError, FolderSource, open_source, source_options
from .inference import Classifier, Prediction, load_classifier
from .validation import ValidationError, release_checkpoint

TOP_K = 5
API_NAME = "classify"  # the function's name: the endpoint a client calls (/classify)
MAX_EXAMPLES = 10
# System fonts: the default theme's Google fonts would be fetched from the internet by every browser.
THEME = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                          font_mono=("ui-monospace", "monospace"))
LOAD_ERRORS = (CheckpointError, ConfigError, ValidationError, ValueError)  # each message says what to do

log = logging.getLogger("mambaout")


def image_input() -> gr.Image:
    """gradio's image input, an upload that is not a readable image reported as such (gradio's own decoding error
    reaches the page as a bare "Error"). Wrapped on the instance: subclassing a gradio component makes gradio write a
    ``.pyi`` stub beside the subclass's module."""
    component = gr.Image(type="pil", label="image")
    decode = component.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except (OSError, ValueError, SyntaxError):  # what PIL raises on a damaged or foreign file
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"{name} cannot be read as an image (a damaged file, or not an image format). Upload "
                           "a photo as a JPEG, PNG, WebP or BMP file.", title="Unreadable image",
                           print_exception=False) from None

    component.preprocess = preprocess
    return component


def load_model(checkpoint: str | None, model_name: str | None, pretrained: bool) -> Classifier:
    """The classifier the command line asks for: a checkpoint, or the release of ``model_name``."""
    if pretrained:
        if model_name is None:
            raise ValidationError("--pretrained needs the model's name: --model mambaout_femto (or kobe, tiny, "
                                  "small, base)")
        checkpoint = release_checkpoint(model_name)
    if checkpoint is None:
        raise ValidationError("no weights given: pass --checkpoint PATH (a run's best.pth, an export folder, any "
                              "weights file), or --model NAME --pretrained")
    return load_classifier(checkpoint, model_name)


def example_images(classifier: Classifier) -> list[str]:
    """Images that exist offline: the first image of each class of the run's validation split (up to 10), in any
    data format, else scikit-learn's two sample photos (a temple in China, a flower) when it is installed."""
    return _run_examples(classifier) or _sample_photos()


def _run_examples(classifier: Classifier) -> list[str]:
    cfg = classifier.config
    if cfg is None or cfg.data.format == "synthetic" or cfg.data.root is None:
        return []
    try:
        source = open_source(cfg.data.format, cfg.data.root, cfg.data.val_split, **source_options(cfg.data))
    except (DataSourceError, OSError, ValueError):  # the run's data is not at hand here: the sample photos
        return []
    first_of_class: dict[int, int] = {}
    for index, target in enumerate(source.targets):
        first_of_class.setdefault(target, index)
        if len(first_of_class) == MAX_EXAMPLES:
            break
    indices = [first_of_class[target] for target in sorted(first_of_class)]
    if isinstance(source, FolderSource):
        return [source.describe(index) for index in indices]
    return _write_examples(source, indices)


def _write_examples(source, indices: list[int]) -> list[str]:
    """Samples of shards as files, which is what the page's examples are."""
    folder = Path(tempfile.mkdtemp(prefix="mambaout-demo-examples-"))
    paths = []
    for number, index in enumerate(indices):
        data = source.read(index).numpy().tobytes()
        with Image.open(io.BytesIO(data)) as image:
            extension = (image.format or "png").lower()
        path = folder / f"{number:02d}-{source.classes[source.targets[index]]}.{extension}".replace("/", "_")
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def _sample_photos() -> list[str]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return []
    return list(load_sample_images().filenames)


def describe_model(classifier: Classifier, source: str) -> str:
    size = classifier.preprocessing.img_size
    return (f"**{classifier.model_name}**, weights `{source}`: {classifier.num_classes} classes, images seen at "
            f"{size} x {size} px. Upload a photo or pick an example, then Submit.")


def describe_prediction(classifier: Classifier, prediction: Prediction) -> str:
    return (f"**Preprocessing**: {classifier.preprocessing.describe()}.\n\n"
            f"**Inference**: {prediction.seconds * 1000:.1f} ms (forward pass of one image, "
            f"{classifier.model_name} on {next(classifier.model.parameters()).device.type})")


def build_demo(checkpoint: str | None = None, model_name: str | None = None, pretrained: bool = False
               ) -> gr.Interface:
    """The app; weights that cannot be loaded give a page that says why (and a classification that says it too)."""
    try:
        classifier = load_model(checkpoint, model_name, pretrained)
    except LOAD_ERRORS as error:
        log.error("the model could not be loaded: %s", error)
        return _interface(None, f"**The model could not be loaded**: {error}", [], str(error))
    source = checkpoint if checkpoint is not None else f"released {model_name}"
    return _interface(classifier, describe_model(classifier, source), example_images(classifier), "")


def _interface(classifier: Classifier | None, description: str, examples: list[str], problem: str
               ) -> gr.Interface:
    def classify(image):
        if classifier is None:
            raise gr.Error(problem, title="No model loaded", print_exception=False)
        if image is None:
            raise gr.Error("Upload an image first.", title="No image", print_exception=False)
        prediction = classifier.predict(image, TOP_K)
        return dict(prediction.top), describe_prediction(classifier, prediction)

    return gr.Interface(
        classify, image_input(),
        [gr.Label(num_top_classes=TOP_K, label=f"top-{TOP_K} classes"), gr.Markdown(label="details")],
        examples=[[path] for path in examples] or None, title="MambaOut image classification",
        description=description, flagging_mode="never", analytics_enabled=False)


def launch(demo: gr.Interface, port: int | None = None, **options):
    """Starts the server (``prevent_thread_lock=True`` returns at once: tests); gives gradio's (app, url, share)."""
    return demo.launch(server_port=port, theme=THEME, ssr_mode=False, **options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="weights: a run's best.pth (its class names and preprocessing come "
                        "with it), an export folder, a release or timm/hub file")
    parser.add_argument("--model", help="architecture, where the checkpoint does not say it; with --pretrained, "
                        "the released model (mambaout_femto, _kobe, _tiny, _small, _base)")
    parser.add_argument("--pretrained", action="store_true",
                        help="the released weights of --model (downloaded once; needs a network connection)")
    parser.add_argument("--port", type=int, help="port to serve on (default: gradio's, 7860 or the next free one)")
    args = parser.parse_args(argv)
    if args.pretrained and args.checkpoint:
        parser.error("give --checkpoint PATH or --pretrained, not both")
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # warnings and errors
    launch(build_demo(args.checkpoint, args.model, args.pretrained), args.port)
    return 0
