"""The training step on a GPU: no host synchronisation inside it, input copies ahead of it on a side stream.

Marked ``cuda``: skipped without a GPU, run by ``scripts/gpu_check.sh``.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_overrides
from mambaout.config import load_config

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def needs_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="module")
def jpeg_image_root(image_root, tmp_path_factory):
    """image_root's images as JPEGs, so that the nvjpeg pipeline decodes them on the GPU."""
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    for png in image_root.rglob("*.png"):
        target = root / png.relative_to(image_root).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").save(target, quality=90)
    return root


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("pipeline", ["timm", "tensor", "nvjpeg"])
def test_no_host_sync_inside_a_training_step(image_root, jpeg_image_root, tmp_path, monkeypatch, precision,
                                             pipeline):
    """train.py's loop with Mixup/CutMix, drop path, EMA, clipping and 2 accumulation micro-steps, under
    ``torch.cuda.set_sync_debug_mode("error")`` from the end of step 2 to the last step: any operation that
    waits for the GPU (``.item()``, a host-made tensor copied synchronously, a host branch on a device value)
    raises. Each step's report is still read, a step later, and the run logs every step. The nvjpeg pipeline
    reads JPEGs, decoded on the GPU inside the guarded steps."""
    import csv

    import mambaout.trainer as trainer

    real_epoch = trainer.train_one_epoch
    guarded_steps = []

    def epoch(*args, hooks, max_steps, **kwargs):
        state = args[7]

        def on_step_end():
            hooks.on_step_end()
            if state.step == 2:
                torch.cuda.set_sync_debug_mode("error")
            elif state.step == max_steps:
                torch.cuda.set_sync_debug_mode("default")
            elif state.step > 2:
                guarded_steps.append(state.step)
        return real_epoch(*args, hooks=dataclasses.replace(hooks, on_step_end=on_step_end),
                          max_steps=max_steps, **kwargs)
    monkeypatch.setattr(trainer, "train_one_epoch", epoch)
    out = tmp_path / "run"
    try:
        root = jpeg_image_root if pipeline == "nvjpeg" else image_root
        trainer.train(load_config(None, tiny_overrides(root, out, **{
            "runtime.device": "cuda", "train.precision": precision, "data.pipeline": pipeline,
            "train.max_steps": 6, "train.ema": True, "optim.clip_grad": 1.0, "aug.mixup_alpha": 0.8,
            "aug.cutmix_alpha": 1.0, "data.num_workers": 2})))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guarded_steps == [3, 4, 5]
    rows = list(csv.DictReader(open(out / "steps.csv")))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(row["loss"]) > 0 for row in rows)


def test_side_stream_prefetch_yields_the_loaders_batches():
    """Every batch, in order, with image and target on the GPU and the other fields left on the host."""
    from mambaout.runtime.torch_dist import _SideStreamPrefetch

    loader = [{"image": torch.full((2, 3, 8, 8), float(n)).pin_memory(), "target": torch.tensor([n, n + 1]),
               "index": torch.tensor([2 * n, 2 * n + 1])} for n in range(5)]
    batches = list(_SideStreamPrefetch(loader, torch.device("cuda")))
    assert len(batches) == 5
    for n, batch in enumerate(batches):
        assert batch["image"].is_cuda and batch["target"].is_cuda and not batch["index"].is_cuda
        assert torch.equal(batch["image"].cpu(), loader[n]["image"])
        assert batch["target"].tolist() == [n, n + 1]
