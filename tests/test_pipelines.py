"""The tensor pipelines (``tensor``, ``nvjpeg``) against timm's PIL pipeline, and their keying.

Fidelity is measured on real photos (scikit-learn's two sample photos, cropped): the same parameters through
timm's PIL op and ours (``mambaout.data.fidelity``), and the same recipe drawn by both over 2,000 images. The
parameter draws are compared with timm's own functions on the same python random stream: they are equal.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, default_collate

from conftest import tiny_overrides, write_image_folder
from mambaout.checkpoint import load_training_checkpoint
from mambaout.config import ConfigError, load_config
from mambaout.data import MicroBatchSampler, build_dataset, derive_seed, fidelity
from mambaout.data import augment as A
from mambaout.data import plan as P
from mambaout.data.decode import decode_rgb, jpeg_header, looks_complete, read_bytes
from mambaout.data.pipeline import build_pipeline, resolve
from mambaout.data.tensor_pipeline import on_the_host
from mambaout.trainer import train

RECIPE_RA = "rand-m9-mstd0.5-inc1"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def planner(size: int = 32, **overrides) -> P.SamplePlanner:
    settings = dict(rand_augment=RECIPE_RA, random_erase_prob=0.25, random_erase_mode="pixel", random_erase_count=1,
                    crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5, interpolation="random", mean=MEAN)
    return P.SamplePlanner(size, **{**settings, **overrides})


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return fidelity.sample_photos(24, 64)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    """The conftest image folder as JPEGs (baseline and progressive), one PNG and one grey JPEG among them."""
    png_root = write_image_folder(tmp_path_factory.mktemp("png"), {"train": 12, "val": 5})
    root = tmp_path_factory.mktemp("jpeg")
    for index, path in enumerate(sorted(png_root.rglob("*.png"))):
        target = root / path.relative_to(png_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(path)
        if index == 3:
            image.save(target)  # a PNG: decoded by PIL in every pipeline
        elif index == 5:
            image.convert("L").save(target.with_suffix(".jpg"), quality=92)
        else:
            image.save(target.with_suffix(".jpg"), quality=92, progressive=index % 2 == 0)
    return root


# --- the parameters: timm's draws, from one generator ------------------------------------------------------

def test_crop_box_draws_equal_timms_on_the_same_stream():
    timm_crop = RandomResizedCropAndInterpolation(32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    ours = planner()
    for seed in range(500):
        width, height = random.Random(seed).choice([(500, 375), (40, 300), (300, 20), (64, 64)])
        random.seed(seed)
        expected = timm_crop.get_params(Image.new("RGB", (width, height)), timm_crop.scale, timm_crop.ratio)
        assert ours._crop_box(random.Random(seed), width, height) == expected, (seed, width, height)


def test_level_functions_equal_timms_on_the_same_stream():
    size = 32
    hparams = {"translate_const": int(size * 0.45), "img_mean": (124, 116, 104)}
    ours = planner(size)
    names = [*P.LEVELS, "TranslateXRel", "TranslateYRel", "TranslateX", "TranslateY"]
    for name in names:
        _, level = ours._level_function(name, hparams)
        for seed, magnitude in enumerate([0.0, 0.5, 3.3, 5.0, 9.0, 9.7, 10.0]):
            random.seed(seed)
            timm_level = auto_augment.LEVEL_TO_ARG[name]  # None: an op without argument
            expected = timm_level(magnitude, hparams)[0] if timm_level else 0.0
            if name.endswith("Rel"):
                expected *= size  # timm multiplies by the width inside the op
            assert level(magnitude, random.Random(seed)) == expected, (name, magnitude)


def test_erasing_boxes_equal_timms_on_the_same_stream():
    ours = planner(48, random_erase_prob=0.6)
    erasing = RandomErasing(probability=0.6, mode="const", device="cpu")
    for seed in range(300):
        random.seed(seed)
        image = torch.ones(3, 48, 48)
        erasing(image)
        erased = (image[0] == 0).nonzero()
        top, left, h, w = ours._erase_boxes(random.Random(seed))
        if not len(erased):
            assert h == 0, seed
            continue
        (y0, x0), (y1, x1) = erased.min(0).values.tolist(), erased.max(0).values.tolist()
        assert (top, left, h, w) == (y0, x0, y1 - y0 + 1, x1 - x0 + 1), seed


def test_policies_the_tensor_ops_cannot_reproduce_are_refused_with_the_way_out():
    with pytest.raises(P.UnsupportedAugmentation, match="data.pipeline=timm"):
        planner(rand_augment="original")  # AutoAugment
    with pytest.raises(P.UnsupportedAugmentation, match="uses the op Desaturate"):
        planner(rand_augment="rand-m9-t3a")  # 3-Augment's ops
    with pytest.raises(P.UnsupportedAugmentation, match="aug.interpolation='lanczos'"):
        planner(interpolation="lanczos")
    weighted = planner(rand_augment="rand-m9-tweights")  # weighted choice, without replacement
    for seed in range(50):
        _, _, applied = weighted.draw_with_names(seed, 40, 40)
        assert len(applied) == len(set(applied))


# --- the ops: timm's PIL result for the same parameters ------------------------------------------------

def test_colour_ops_equal_pils_within_one_grey_level(photos):
    rows = {row.name: row for row in fidelity.op_differences(photos)}
    for name in fidelity.COLOR_OPS:
        assert rows[name].max <= 1, rows[name]
    exact = [name for name in fidelity.COLOR_OPS if rows[name].max == 0]
    assert len(exact) >= 9, rows  # all but AutoContrast (PIL's float64 rounding) are bit-identical


def test_geometric_ops_bilinear_within_one_grey_level_bicubic_bounded(photos):
    for gather in (False, True):  # grid_sample (CPU, CUDA) and gathers (XLA)
        rows = fidelity.op_differences(photos, gather=gather)
        for row in rows:
            if "bilinear" in row.name:
                assert row.max <= 1 and row.mean < 0.01, row
            elif "bicubic" in row.name:  # torch's cubic kernel (A = -0.75) where PIL's affine uses A = -1
                assert row.max <= 24 and row.mean < 1.0, row


def test_crop_resize_eval_and_decoding_follow_pil(photos, jpeg_root, tmp_path):
    for row in fidelity.crop_resize_differences(fidelity.sample_photos(24, 160), 48):
        assert row.mean <= 0.05 and row.max <= 3, row
    assert fidelity.eval_differences(fidelity.sample_photos(12, 100), 48).mean <= 0.05
    jpegs = sorted(str(p) for p in jpeg_root.rglob("*.jpg"))
    assert fidelity.decode_differences(jpegs).max == 0  # baseline, progressive and grey: PIL's pixels
    cmyk = tmp_path / "cmyk.jpg"
    photos[0].convert("CMYK").save(cmyk)  # decoded by PIL, as the timm pipeline does
    assert torch.equal(decode_rgb(read_bytes(str(cmyk))), fidelity.to_tensor(Image.open(cmyk)))


def test_normalisation_is_bit_identical_to_timms(photos):
    from mambaout.data import build_eval_transform

    image = photos[0].resize((40, 40))
    timm_tensor = build_eval_transform(40)(image)
    ours = A.Augmenter(MEAN, STD, (0, 0, 0), "pixel").normalize(fidelity.to_tensor(image).unsqueeze(0))[0]
    assert torch.equal(ours, timm_tensor)


# --- the recipe, drawn by both pipelines --------------------------------------------------------------

def test_recipe_statistics_match_timms_over_2000_real_photos():
    """Per-channel mean/std of the augmented images and how often each op, flip and erasing happens: equal to
    timm's within 4 standard errors. (A missing 50% op probability, one op forgotten, erasing at the wrong
    rate or a shifted normalisation would each show at well over 10 standard errors.)"""
    images = fidelity.sample_photos(64, 96)
    timm = fidelity.timm_statistics(images, 2000, 48, RECIPE_RA, 0.25)
    ours = fidelity.tensor_statistics(images, 2000, 48, RECIPE_RA, 0.25)
    assert timm.compare(ours) == []
    ops = set(auto_augment._RAND_INCREASING_TRANSFORMS)
    assert ops <= set(ours.events) and ops <= set(timm.events)
    assert 0.45 < ours.events["flip"] / 2000 < 0.55 and 0.2 < ours.events["erase"] / 2000 < 0.3
    assert sum(ours.events[op] for op in ops) / 2000 == pytest.approx(1.0, abs=0.08)  # 2 layers x 50%
    shifted = fidelity.tensor_statistics(images, 2000, 48, "rand-m9-mstd0.5-inc1-p1.0", 0.25)
    assert timm.compare(shifted)  # the test can fail: every op applied gives twice the frequencies


# --- the augmentation of a batch: grouped, masked, per sample ----------------------------------------

def plans_of(reader, files: list[str], epoch: int = 0):
    items = [reader.prepare(reader.load(read_bytes(file)), derive_seed(3, "sample", epoch, i))
             for i, file in enumerate(files)]
    return default_collate(items)


def test_batched_grouped_and_masked_augmentation_equal_one_sample_at_a_time(jpeg_root):
    from mambaout.data.tensor_pipeline import TensorTrainReader

    ours = planner(32, random_erase_prob=0.5, random_erase_count=2)
    batch = plans_of(TensorTrainReader(ours), sorted(str(p) for p in jpeg_root.rglob("*.jpg"))[:32])
    assert {op for op in batch["plan"]["ops"].flatten().tolist()} - {P.NO_OP}  # some ops were drawn
    grouped = A.Augmenter(MEAN, STD, ours.fill, "pixel")
    masked = A.Augmenter(MEAN, STD, ours.fill, "pixel", fixed_shapes=True)
    whole = grouped(batch["image"].clone(), batch["plan"], on_the_host)
    one_by_one = torch.stack([grouped(batch["image"][i:i + 1].clone(), {k: v[i:i + 1] for k, v in
                                                                         batch["plan"].items()}, on_the_host)[0]
                              for i in range(len(whole))])
    assert torch.equal(whole, one_by_one)
    grey_levels = (masked(batch["image"].clone(), batch["plan"], on_the_host) - whole).abs() * 255 * max(STD)
    assert grey_levels.max() <= 1.0 + 1e-4 and (grey_levels > 1e-3).float().mean() < 1e-3


def test_erasing_noise_is_standard_normal_and_keyed():
    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    plan = {"ops": torch.zeros(2, 0, dtype=torch.int64), "args": torch.zeros(2, 0), "affine": torch.zeros(2, 0, 6),
            "erase": torch.tensor([[[0, 0, 64, 64]], [[8, 4, 20, 30]]]), "noise": torch.tensor([12345, 12345])}
    erased = A.Augmenter((0, 0, 0), (1, 1, 1), (0, 0, 0), "pixel")(images, plan, on_the_host)
    assert erased[0].mean().abs() < 0.05 and (erased[0].std() - 1).abs() < 0.05
    assert torch.equal(erased[1, :, 8:28, 4:34], erased[0, :, 8:28, 4:34])  # a pixel's value: key and position
    assert not erased[1, :, :8].any()


def test_posterize_with_zero_bits_is_black_like_pillow_12():
    x = torch.randint(1, 256, (1, 3, 8, 8), dtype=torch.uint8)
    assert not A.posterize(x, torch.tensor([0.0]), None, None, False).any()
    assert torch.equal(A.posterize(x, torch.tensor([8.0]), None, None, False), x)


# --- where each pipeline runs, and what it refuses ------------------------------------------------------

def test_auto_resolves_per_device_and_impossible_combinations_are_refused():
    assert resolve("auto", "auto", "cuda") == ("nvjpeg", "device")
    assert resolve("auto", "auto", "cpu") == ("tensor", "workers")
    assert resolve("auto", "auto", "xla") == ("tensor", "device")
    assert resolve("tensor", "device", "cpu") == ("tensor", "device")
    assert resolve("timm", "auto", "cuda") == ("timm", "workers")
    for args, message in [(("nvjpeg", "auto", "xla"), "CUDA GPU"), (("nvjpeg", "workers", "cuda"), "augment in"),
                          (("timm", "device", "cuda"), "augments PIL")]:
        with pytest.raises(ConfigError, match=message):
            resolve(*args)
    with pytest.raises(ConfigError, match="eval.interpolation='lanczos'"):
        build_pipeline(load_config(None, ["data.pipeline=tensor", "eval.interpolation=lanczos"]), "cpu")


def test_shipped_recipes_use_auto():
    repo = Path(__file__).resolve().parents[1]
    for config in sorted((repo / "configs").glob("*.yaml")):
        if config.name != "_recipe.yaml":
            assert load_config(config).data.pipeline == "auto", config


def test_unreadable_files_are_replaced_in_training_and_masked_in_evaluation(jpeg_root, tmp_path):
    root = tmp_path / "data"
    for path in jpeg_root.rglob("*"):
        if path.is_file():
            (root / path.relative_to(jpeg_root)).parent.mkdir(parents=True, exist_ok=True)
            (root / path.relative_to(jpeg_root)).write_bytes(path.read_bytes())
    files = sorted(root.rglob("train/*/*.jpg"))
    files[1].write_bytes(files[1].read_bytes()[:300])  # truncated: nvjpeg's worker sees no end marker
    files[2].write_bytes(b"\xff\xd8\xff not a jpeg")
    assert not looks_complete(read_bytes(str(files[1]))) and jpeg_header(read_bytes(str(files[0]))) == (32, 32)
    for name in ("tensor", "nvjpeg"):
        cfg = load_config(None, [f"data.pipeline={name}", "data.augment_on=device", "data.img_size=32"])
        pipeline = build_pipeline(cfg, "cpu")
        train_set = build_dataset(root, "train", pipeline.train.reader, train=True)
        paths = [p for p, _ in train_set.samples]
        index = paths.index(str(files[1]))
        readable = next(j for j in range(index + 1, len(paths)) if paths[j] not in (str(files[1]), str(files[2])))
        item = train_set[(index, derive_seed(0, "sample", 0, index))]
        replacement = train_set[(readable, derive_seed(0, "sample", 0, index))]
        assert item["bad"] and item["target"] == train_set.samples[readable][1], name  # the next readable one
        assert all(torch.equal(a, b) for a, b in zip(item["plan"].values(), replacement["plan"].values()))
        val_set = build_dataset(root, "train", pipeline.eval.reader, train=False)
        assert val_set[index]["bad"] and val_set[index]["target"] == -1, name


# --- keyed: the same samples whatever the worker count, mode or pipeline ------------------------------

def run(image_root: Path, out: Path, **extra) -> dict:
    overrides = tiny_overrides(image_root, out, **{"aug.random_erase_prob": 0.5, "train.max_steps": 2,
                                                   "train.checkpoint_every_steps": 1, **extra})
    train(load_config(None, overrides))
    return load_training_checkpoint(out / "last.pth")


def test_workers_modes_and_pipelines_train_the_same_weights(jpeg_root, tmp_path):
    """On the CPU, augmenting in the workers or on the device, with 0 or 2 workers, and the nvjpeg pipeline
    (decoding in the main process here) give bit-identical runs: every op depends on its sample's plan only."""
    reference = run(jpeg_root, tmp_path / "workers", **{"data.pipeline": "tensor", "data.augment_on": "workers"})
    for name, extra in [("device", {"data.augment_on": "device"}),
                        ("device, 2 workers", {"data.augment_on": "device", "data.num_workers": 2}),
                        ("workers, 2 workers", {"data.augment_on": "workers", "data.num_workers": 2}),
                        ("nvjpeg", {"data.pipeline": "nvjpeg"})]:
        other = run(jpeg_root, tmp_path / name.replace(" ", "_").replace(",", ""),
                    **{"data.pipeline": "tensor", **extra})
        for key, value in reference["model"].items():
            assert torch.equal(value, other["model"][key]), (name, key)
        assert other["train_state"]["epoch_loss_sum"] == reference["train_state"]["epoch_loss_sum"], name


def test_timm_pipeline_is_unchanged_and_tensor_differs_from_it(jpeg_root, tmp_path):
    """The timm pipeline reads as before (PIL, seeded streams: its own test_data tests pin the pixels); the
    tensor pipeline draws other samples, so its run differs (no pipeline silently falls back to another)."""
    timm = run(jpeg_root, tmp_path / "timm", **{"data.pipeline": "timm"})
    tensor = run(jpeg_root, tmp_path / "tensor", **{"data.pipeline": "tensor"})
    assert any(not torch.equal(v, tensor["model"][k]) for k, v in timm["model"].items())
    manifest = (tmp_path / "tensor" / "manifest.json").read_text()
    assert '"pipeline": "tensor"' in manifest and '"augment_on": "workers"' in manifest


def test_timm_pipeline_keys_workers_without_saving_states(monkeypatch, jpeg_root):
    """In a worker, the timm pipeline only seeds (no costly save/restore of numpy's state): same pixels."""
    import numpy as np

    dataset = build_dataset(jpeg_root, "train", build_pipeline(load_config(None, ["data.img_size=16"]),
                                                                "cpu").train.reader, train=True)
    sampler = MicroBatchSampler(len(dataset), 8, 4, 1, [0], seed=3)
    in_process = [batch["image"] for batch in DataLoader(dataset, batch_sampler=sampler)]
    calls = []
    monkeypatch.setattr(np.random, "get_state", lambda *a: calls.append(1))
    in_workers = [batch["image"] for batch in DataLoader(dataset, batch_sampler=sampler, num_workers=2,
                                                          multiprocessing_context="fork")]
    assert all(torch.equal(a, b) for a, b in zip(in_process, in_workers)) and not calls


@pytest.mark.cuda
def test_nvjpeg_on_the_gpu_decodes_like_the_cpu(jpeg_root):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from mambaout.data.decode import decode_jpegs_on

    files = sorted(str(p) for p in jpeg_root.rglob("*.jpg"))
    decoded = decode_jpegs_on(torch.device("cuda"), [read_bytes(f) for f in files])
    for path, image in zip(files, decoded):
        cpu = decode_rgb(read_bytes(path))
        assert image.device.type == "cuda" and image.shape == cpu.shape
        assert (image.cpu().int() - cpu.int()).abs().float().mean() < 2.0, path  # nvJPEG's own IDCT


@pytest.mark.cuda
def test_nvjpeg_decoding_while_kernels_are_queued_equals_decoding_on_an_idle_gpu(jpeg_root):
    """pytorch/vision#9606: the decoder allocates its outputs on the caller's stream and writes them from a
    private stream that does not wait for it. Here blocks of the outputs' sizes are freed while a slow kernel
    queued on the compute stream still fills them, then the batch is decoded through ``runtime.fenced``: the
    pixels must equal those decoded on an idle GPU, every time."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from mambaout.data.decode import decode_jpegs_on
    from mambaout.runtime import create_runtime

    runtime = create_runtime("cuda")
    jpegs = [read_bytes(str(p)) for p in sorted(jpeg_root.rglob("*.jpg"))]
    idle = [image.cpu() for image in decode_jpegs_on(runtime.device, jpegs)]
    for _ in range(20):
        reused = [torch.empty(image.shape, dtype=torch.uint8, device=runtime.device) for image in idle]
        torch.cuda._sleep(20_000_000)  # ~10 ms of queued work before the fills
        for block in reused:
            block.fill_(255)
        del reused  # free again, while the fills are still queued
        busy = runtime.fenced(lambda: decode_jpegs_on(runtime.device, jpegs))
        assert all(torch.equal(a.cpu(), b) for a, b in zip(busy, idle))


@pytest.mark.cuda
def test_device_augmentation_on_the_gpu_equals_the_cpu(jpeg_root):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from mambaout.data.tensor_pipeline import TensorTrainReader

    ours = planner(32, random_erase_prob=0.5)
    batch = plans_of(TensorTrainReader(ours), sorted(str(p) for p in jpeg_root.rglob("*.jpg")))
    augmenter = A.Augmenter(MEAN, STD, ours.fill, "pixel")
    cpu = augmenter(batch["image"].clone(), batch["plan"], on_the_host)
    gpu = augmenter(batch["image"].cuda(), batch["plan"], lambda t: t.cuda(non_blocking=True)).cpu()
    grey_levels = (gpu - cpu).abs() * 255 * max(STD)
    assert grey_levels.max() <= 1.0 + 1e-3 and (grey_levels > 1e-3).float().mean() < 1e-2
    assert math.isfinite(gpu.sum().item())


def test_the_affine_sampling_grid_is_exact_whatever_matmul_precision_allows():
    """Rotate/shear/translate sample where PIL's inverse matrix sends each pixel centre. With bf16 (or TF32) matmuls
    allowed, a grid made as a matrix product was rounded (0.79 px at 224 with "medium" on a CPU); multiplied out
    elementwise it stays within float32 rounding of the float64 positions."""
    matrix = torch.tensor([1.1, 0.2, -3.3, -0.15, 0.95, 4.4]).reshape(1, 6)
    ys, xs = torch.meshgrid(torch.arange(224, dtype=torch.float64) + 0.5, torch.arange(224, dtype=torch.float64) + 0.5,
                            indexing="ij")
    m = matrix.double()[0]
    exact = torch.stack([(m[0] * xs + m[1] * ys + m[2]) / 112 - 1, (m[3] * xs + m[4] * ys + m[5]) / 112 - 1], -1)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        grid = A._source_grid(matrix, 224, 224, torch.device("cpu"))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert (grid[0].double() - exact).abs().max().item() * 112 < 1e-3  # pixels


def test_the_augmentations_device_constants_are_not_copied_per_batch(monkeypatch):
    """mean, std and the fill colour go to an eager device once (a copy per batch is a blocking host-to-device
    copy on CUDA: a host sync per batch), and the smoothing kernel is two Python numbers. Counted here as
    ``Tensor.to(device)`` calls on those constants over three batches of normalising and sharpening."""
    augmenter = A.Augmenter((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (124, 116, 104), "pixel")
    constants = {id(tensor) for tensor in (augmenter.mean, augmenter.std, augmenter.fill)}
    moved, real_to = [], torch.Tensor.to

    def counting_to(tensor, *args, **kwargs):
        if id(tensor) in constants and ("device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)):
            moved.append(id(tensor))
        return real_to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    plan = {"ops": torch.full((2, 1), [op.__name__ for op in A.OPS].index("sharpness")),
            "args": torch.full((2, 1), 1.5), "affine": torch.zeros(2, 1, 6), "erase": torch.zeros(2, 0, 4),
            "noise": torch.zeros(2, dtype=torch.int64)}
    for _ in range(3):
        augmenter(images.clone(), plan, on_the_host)
    assert sorted(moved) == sorted(constants)  # each once
    assert isinstance(A._SMOOTH_SIDE, float) and isinstance(A._SMOOTH_CENTRE, float)
