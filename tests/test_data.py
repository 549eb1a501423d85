"""Data pipeline: keyed seeds, batch arithmetic, datasets and their layouts, transforms, Mixup."""
from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment
from torch.utils.data import DataLoader

from mambaout.data import (
    PAD_INDEX,
    DatasetFormatError,
    DatasetNotFoundError,
    EvalBatchSampler,
    MicroBatchSampler,
    SyntheticDataset,
    build_dataset,
    build_eval_transform,
    build_mixup,
    build_train_transform,
    dataset_fingerprint,
    derive_seed,
    ilsvrc2012_id_to_synset,
    imagenet_synsets,
    mixup_micro_batch,
    seeded_rngs,
    shard_indices,
)
from mambaout.data import transforms as data_transforms
from mambaout.data.sampling import drop_draws, with_drop_draws

REPO = Path(__file__).resolve().parents[1]
IMG = 16  # output side of the test transforms


def write_image(path: Path, seed: int, size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_class_folders(root: Path, class_names: list[str], per_class: int = 3, split: str = "train") -> None:
    for c, name in enumerate(class_names):
        for i in range(per_class):
            write_image(root / split / name / f"img{i}.jpg", seed=100 * c + i)


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    make_class_folders(tmp_path, ["cat", "dog", "emu", "fox"], per_class=4)
    return tmp_path


# --- keyed randomness ---------------------------------------------------------------------------------

def test_derive_seed_is_a_stable_63_bit_key() -> None:
    assert derive_seed(42, "order", 0) == 4738335298272480200  # same on every platform and Python run
    assert derive_seed(np.int64(42), "order", 0) == derive_seed(42, "order", 0)
    assert derive_seed(1) != derive_seed("1")
    assert derive_seed(42, "sample", 0, 1) != derive_seed(42, "sample", 1, 0)
    assert all(0 <= derive_seed(i) < 2**63 for i in range(100))


def test_seeded_rngs_restores_the_callers_streams() -> None:
    def draw() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected_outer = [draw(), draw()]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    outer = [draw()]
    with seeded_rngs(7):
        inner = draw()
    outer.append(draw())
    with seeded_rngs(7):
        assert draw() == inner
    assert outer == expected_outer
    with seeded_rngs(8):
        assert draw() != inner


# --- training batch arithmetic --------------------------------------------------------------------------

def micro_batches_by_index(num_shards: int, micro: int, global_batch: int = 16, num_samples: int = 50,
                           seed: int = 3, epoch: int = 1) -> dict[tuple[int, int], list]:
    """(step, global micro-batch index) -> micro-batch, gathered from every shard's sampler."""
    found = {}
    for shard in range(num_shards):
        sampler = MicroBatchSampler(num_samples, global_batch, micro, num_shards, [shard], seed, epoch=epoch)
        for position, batch in enumerate(sampler):
            step, accum_step = divmod(position, sampler.accum_steps)
            (micro_index,) = sampler.micro_indices(accum_step)
            found[step, micro_index] = batch
    return found


def test_sampler_partitions_each_global_batch() -> None:
    sampler = MicroBatchSampler(50, 16, 4, 1, [0], seed=3, epoch=1)
    order = sampler.epoch_order().tolist()
    assert sorted(order) == list(range(50))
    assert (sampler.steps_per_epoch, sampler.accum_steps, len(sampler)) == (3, 4, 12)
    batches = list(sampler)
    for step in range(3):
        indices = [index for batch in batches[4 * step:4 * step + 4] for index, _ in batch]
        assert indices == order[16 * step:16 * (step + 1)]  # the last 2 samples are dropped
    for batch in batches:
        assert all(seed == derive_seed(3, "sample", 1, index) for index, seed in batch)


@pytest.mark.parametrize("num_shards, micro", [(2, 4), (4, 4), (2, 2), (1, 16)])
def test_micro_batches_do_not_depend_on_the_sharding(num_shards: int, micro: int) -> None:
    reference = micro_batches_by_index(num_shards=1, micro=micro)  # A = 16 / micro
    assert micro_batches_by_index(num_shards, micro) == reference


def test_one_process_feeding_several_shards_concatenates_their_micro_batches() -> None:
    reference = micro_batches_by_index(num_shards=4, micro=2)
    sampler = MicroBatchSampler(50, 16, 2, 4, [1, 3], seed=3, epoch=1)
    assert sampler.micro_indices(1) == [5, 7]
    for position, batch in enumerate(sampler):
        step, accum_step = divmod(position, sampler.accum_steps)
        assert batch == [key for m in sampler.micro_indices(accum_step) for key in reference[step, m]]


def test_sampler_resumes_exactly_at_start_step() -> None:
    full = list(MicroBatchSampler(80, 16, 4, 2, [1], seed=5, epoch=2))
    resumed = MicroBatchSampler(80, 16, 4, 2, [1], seed=5, epoch=0)
    resumed.set_epoch(2, start_step=3)
    assert len(resumed) == 4 and list(resumed) == full[3 * 2:]


def test_epochs_have_different_orders() -> None:
    sampler = MicroBatchSampler(80, 16, 4, 1, [0], seed=5)
    first = sampler.epoch_order()
    sampler.set_epoch(1)
    assert not torch.equal(first, sampler.epoch_order())


def test_sampler_errors_explain_the_batch_arithmetic() -> None:
    with pytest.raises(ValueError, match=r"16 / \(3 x 2\).*Valid micro-batch sizes: \[1, 2, 4, 8\]"):
        MicroBatchSampler(100, 16, 3, 2, [0], seed=0)
    with pytest.raises(ValueError, match="not divisible by the 3 data shards"):
        MicroBatchSampler(100, 16, 2, 3, [0], seed=0)
    with pytest.raises(ValueError, match="10 samples, fewer than one global batch of 16"):
        MicroBatchSampler(10, 16, 4, 1, [0], seed=0)
    with pytest.raises(ValueError, match="shard_ids"):
        MicroBatchSampler(100, 16, 4, 2, [2], seed=0)


# --- exact evaluation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_shards", [2, 3])
@pytest.mark.parametrize("pad_to_full", [False, True])
def test_eval_shards_cover_every_index_exactly_once(num_shards: int, pad_to_full: bool) -> None:
    num_samples, batch_size = 23, 4
    seen, batch_counts = [], set()
    for shard in range(num_shards):
        assert shard_indices(num_samples, num_shards, shard) == list(range(shard, num_samples, num_shards))
        sampler = EvalBatchSampler(num_samples, batch_size, num_shards, shard, pad_to_full=pad_to_full)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        batch_counts.add(len(batches))
        if pad_to_full:
            assert all(len(batch) == batch_size for batch in batches)
        seen += [index for batch in batches for index in batch if index != PAD_INDEX]
    assert sorted(seen) == list(range(num_samples))
    if pad_to_full:
        assert len(batch_counts) == 1  # fixed shapes: every shard runs the same number of batches


# --- datasets ------------------------------------------------------------------------------------------

def test_augmentation_is_a_pure_function_of_the_sample_seed(folder_root: Path) -> None:
    dataset = build_dataset(folder_root, "train", build_train_transform(IMG), train=True)
    key = (5, derive_seed(0, "sample", 3, 5))
    first, second = dataset[key], dataset[key]
    assert torch.equal(first["image"], second["image"]) and first["image"].shape == (3, IMG, IMG)
    assert (first["target"], first["index"], first["bad"]) == (dataset.samples[5][1], 5, False)
    assert not torch.equal(first["image"], dataset[(5, key[1] + 1)]["image"])


def test_batches_do_not_depend_on_the_number_of_workers(folder_root: Path) -> None:
    dataset = build_dataset(folder_root, "train", build_train_transform(IMG), train=True)

    def load(num_workers: int) -> list[dict]:
        sampler = MicroBatchSampler(len(dataset), 8, 4, 1, [0], seed=11, epoch=1)
        return list(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers))

    in_process, in_workers = load(0), load(2)
    assert len(in_process) == 4
    for a, b in zip(in_process, in_workers):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])


def test_unreadable_images_are_replaced_in_training_and_masked_in_evaluation(folder_root: Path) -> None:
    corrupt = folder_root / "train" / "dog" / "img1.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    truncated = folder_root / "train" / "dog" / "img2.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    train = build_dataset(folder_root, "train", build_train_transform(IMG), train=True)
    paths = [path for path, _ in train.samples]
    bad, next_good = paths.index(str(corrupt)), paths.index(str(truncated)) + 1
    assert next_good == bad + 2

    seed = derive_seed(0, "sample", 0, bad)
    item = train[(bad, seed)]
    replacement = train[(next_good, seed)]  # bad + 1 is the truncated file: skipped as well
    assert item["bad"] and item["index"] == bad and item["target"] == replacement["target"]
    assert torch.equal(item["image"], replacement["image"])

    evaluation = build_dataset(folder_root, "train", build_eval_transform(IMG), train=False)
    masked = evaluation[bad]
    assert masked["bad"] and masked["target"] == -1 and masked["index"] == bad
    assert masked["image"].shape == (3, IMG, IMG) and not masked["image"].any()
    (folder_root / "train" / "cat" / "img0.jpg").unlink()  # vanished after the scan
    assert evaluation[0]["target"] == -1 and evaluation[0]["bad"]
    padding = evaluation[PAD_INDEX]
    assert (padding["target"], padding["bad"]) == (-1, False) and not padding["image"].any()


def test_synset_folders_follow_the_imagenet_class_order(tmp_path: Path) -> None:
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and list(synsets) == sorted(synsets)
    present = [synsets[999], synsets[1], synsets[0], synsets[500]]
    make_class_folders(tmp_path, present, per_class=2, split="val")
    dataset = build_dataset(tmp_path, "val", build_eval_transform(IMG), train=False)
    assert dataset.num_classes == 1000
    assert sorted(set(dataset.targets)) == [0, 1, 500, 999]
    assert all(Path(path).parent.name == synsets[target] for path, target in dataset.samples)


def test_other_folders_use_sorted_names_or_the_given_classes(folder_root: Path) -> None:
    dataset = build_dataset(folder_root, "train", build_eval_transform(IMG), train=False)
    assert dataset.classes == ["cat", "dog", "emu", "fox"]
    saved = ["zebra", "fox", "emu", "dog", "cat"]
    relabelled = build_dataset(folder_root, "train", build_eval_transform(IMG), train=False, classes=saved)
    assert relabelled.num_classes == 5
    assert all(Path(path).parent.name == saved[target] for path, target in relabelled.samples)
    with pytest.raises(DatasetFormatError, match=r"\['fox'\].*not in the given class list"):
        build_dataset(folder_root, "train", build_eval_transform(IMG), train=False, classes=["cat", "dog", "emu"])


def val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.JPEG"


@pytest.fixture
def validation_layouts(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """The same 6 validation images as class folders (``folders/val/<synset>/``) and flat (``flat/val/``)."""
    synsets = [imagenet_synsets()[i] for i in (3, 999, 3, 0, 42, 999)]
    for number, synset in enumerate(synsets, start=1):
        write_image(tmp_path / "folders" / "val" / synset / val_name(number), seed=number)
        write_image(tmp_path / "flat" / "val" / val_name(number), seed=number)
    return tmp_path / "folders", tmp_path / "flat", synsets


def names_and_targets(root: Path) -> list[tuple[str, int]]:
    dataset = build_dataset(root, "val", build_eval_transform(IMG), train=False)
    assert dataset.num_classes == 1000
    return sorted((Path(path).name, target) for path, target in dataset.samples)


def test_flat_validation_with_kaggle_csv_matches_the_folder_layout(validation_layouts) -> None:
    folders, flat, synsets = validation_layouts
    with open(flat / "LOC_val_solution.csv", "w", newline="") as file:  # in the parent of val/
        writer = csv.writer(file)
        writer.writerow(["ImageId", "PredictionString"])
        for number, synset in enumerate(synsets, start=1):
            writer.writerow([val_name(number)[:-5], f"{synset} 10 20 30 40 {synset} 1 2 3 4"])
    assert names_and_targets(flat) == names_and_targets(folders)


def test_flat_validation_with_devkit_ground_truth_matches_the_folder_layout(validation_layouts) -> None:
    folders, flat, synsets = validation_layouts
    ilsvrc_ids = [ilsvrc2012_id_to_synset().index(synset) + 1 for synset in synsets]
    (flat / "val" / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, ilsvrc_ids)) + "\n")
    assert names_and_targets(flat) == names_and_targets(folders)


def test_devkit_id_table_is_the_meta_mat_order() -> None:
    table = ilsvrc2012_id_to_synset()
    assert len(table) == 1000 and set(table) == set(imagenet_synsets())
    assert table[:3] == ("n02119789", "n02100735", "n02110185")  # kit fox, English setter, Siberian husky
    # The devkit labels the first validation images 490, 361, 171, 822, 297 (sea snake, alp, Shetland
    # sheepdog, soup bowl, cradle).
    assert [table[i - 1] for i in (490, 361, 171, 822, 297)] == [
        "n01751748", "n09193705", "n02105855", "n04263257", "n03125729"]


def test_dataset_errors_name_the_path_and_the_fix(tmp_path: Path) -> None:
    def build(root: Path, split: str = "val"):
        return build_dataset(root, split, build_eval_transform(IMG), train=False)

    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        build(tmp_path / "missing")
    (tmp_path / "imagenet.tar").write_bytes(b"an archive, not the folder")
    with pytest.raises(DatasetFormatError, match=r"imagenet.tar is a file, not a folder.*train/ and val/"):
        build(tmp_path / "imagenet.tar")
    with pytest.raises(DatasetNotFoundError, match=r"val.*does not exist.*sub-folder"):
        build(tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetFormatError, match="is empty"):
        build(tmp_path)
    (tmp_path / "val" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetFormatError, match="no class sub-folders and no images"):
        build(tmp_path)
    write_image(tmp_path / "val" / val_name(1), seed=1)
    write_image(tmp_path / "val" / val_name(2), seed=2)
    with pytest.raises(DatasetNotFoundError, match="LOC_val_solution.csv.*ILSVRC2012_validation_ground_truth"):
        build(tmp_path)
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("490\n")
    with pytest.raises(DatasetFormatError, match=r"has 1 entries and none for 1 of the 2 images"):
        build(tmp_path)
    (tmp_path / "empty_classes" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match="hold no images"):
        build(tmp_path / "empty_classes")
    assert issubclass(DatasetNotFoundError, FileNotFoundError) and issubclass(DatasetFormatError, ValueError)


def test_fingerprint_follows_files_and_targets(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "a", ["cat", "dog"], per_class=2)
    make_class_folders(tmp_path / "b", ["cat", "dog"], per_class=2)
    fingerprint = dataset_fingerprint(build_dataset(tmp_path / "a", "train", build_eval_transform(IMG), train=True))
    assert fingerprint["num_images"] == 4 and fingerprint["num_classes"] == 2
    same_files = build_dataset(tmp_path / "b", "train", build_eval_transform(IMG), train=True)
    assert dataset_fingerprint(same_files) == fingerprint
    more_classes = build_dataset(tmp_path / "b", "train", build_eval_transform(IMG), train=True,
                                 classes=["ant", "cat", "dog"])
    assert dataset_fingerprint(more_classes)["sha256"] != fingerprint["sha256"]


def test_synthetic_dataset_is_a_pure_function_of_the_index() -> None:
    dataset = build_dataset(None, "train", None, train=True, format="synthetic", num_samples=10,
                            num_classes=7, img_size=IMG)
    assert isinstance(dataset, SyntheticDataset) and len(dataset) == 10 and dataset.num_classes == 7
    item = dataset[(3, 12345)]
    assert torch.equal(item["image"], dataset[3]["image"]) and item["image"].shape == (3, IMG, IMG)
    assert 0 <= item["target"] < 7 and not item["bad"]
    assert not torch.equal(item["image"], dataset[4]["image"])
    assert dataset[PAD_INDEX]["target"] == -1
    assert dataset_fingerprint(dataset)["num_images"] == 10


# --- transforms and Mixup ------------------------------------------------------------------------------

def test_posterize_with_zero_bits_gives_a_black_image_on_every_pillow() -> None:
    image = Image.fromarray(np.random.RandomState(0).randint(1, 256, (16, 16, 3), dtype=np.uint8))
    if PIL.__version__ >= "13":  # the pitfall this guards against
        with pytest.raises(ValueError, match="bits must be"):
            ImageOps.posterize(image, 0)
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)  # 4 - 4 = 0 bits
    assert not np.asarray(op(image)).any()
    kept = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(image)  # 2 bits
    assert np.array_equal(np.asarray(kept), np.asarray(image) & 0b11000000)


def test_recipe_randaugment_survives_many_images(monkeypatch) -> None:
    zero_bit_calls = []

    def counting_posterize(image, bits_to_keep, **kwargs):
        zero_bit_calls.append(bits_to_keep < 1)
        return data_transforms._posterize_black_at_zero_bits(image, bits_to_keep, **kwargs)

    monkeypatch.setitem(auto_augment.NAME_TO_OP, "PosterizeIncreasing", counting_posterize)
    transform = build_train_transform(IMG)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 20, 3), dtype=np.uint8))
    for index in range(3000):
        with seeded_rngs(derive_seed(0, "sample", 0, index)):
            assert transform(image).shape == (3, IMG, IMG)
    assert sum(zero_bit_calls) >= 1  # the 0-bit case was hit, and did not raise


def test_mixup_draw_is_a_pure_function_of_the_seed() -> None:
    assert build_mixup(0.0, 0.0, 1.0, 0.5, "batch", 0.1, 10) is None
    mixup = build_mixup(0.8, 1.0, 1.0, 0.5, "batch", 0.1, num_classes=10)
    images, targets = torch.randn(4, 3, IMG, IMG), torch.tensor([1, 2, 3, 4])
    np.random.seed(0)
    numpy_next = np.random.rand()
    np.random.seed(0)
    mixed_a = mixup_micro_batch(mixup, images.clone(), targets, seed=derive_seed(42, "step", 0, 1))
    mixed_b = mixup_micro_batch(mixup, images.clone(), targets, seed=derive_seed(42, "step", 0, 1))
    assert np.random.rand() == numpy_next  # the caller's numpy stream is untouched
    assert all(torch.equal(a, b) for a, b in zip(mixed_a, mixed_b))
    assert mixed_a[1].shape == (4, 10) and torch.allclose(mixed_a[1].sum(1), torch.ones(4))
    draws = {mixup_micro_batch(mixup, images.clone(), targets, seed=s)[1][0, 1].item() for s in range(8)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="must be even"):
        mixup_micro_batch(mixup, images[:3], targets[:3], seed=0)


# --- scripts -------------------------------------------------------------------------------------------

def test_make_digits_dataset_writes_a_stratified_image_folder(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    command = [sys.executable, str(REPO / "scripts" / "make_digits_dataset.py"), str(out), "--size", "16"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "1497 train and 300 val" in result.stdout
    train = build_dataset(out, "train", build_eval_transform(IMG), train=True)
    val = build_dataset(out, "val", build_eval_transform(IMG), train=False)
    assert (len(train), len(val)) == (1497, 300)
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert np.bincount(val.targets).tolist() == [30] * 10
    assert Image.open(val.samples[0][0]).size == (16, 16)
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode != 0 and "is not empty" in again.stderr


def test_fixed_shape_mixup_equals_timm_mixup():
    """The CutMix box goes through a mask (one compiled graph on XLA) yet every pixel and target equals
    timm's slicing implementation, for Mixup and CutMix draws alike."""
    from timm.data import Mixup

    ours = build_mixup(0.8, 1.0, 1.0, 0.5, "batch", 0.1, 10)
    reference = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                      label_smoothing=0.1, num_classes=10)
    for seed in range(100):
        images, targets = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
        mixed, soft = mixup_micro_batch(ours, images.clone(), targets, seed)
        expected_mixed, expected_soft = mixup_micro_batch(reference, images.clone(), targets, seed)
        assert torch.equal(mixed, expected_mixed) and torch.equal(soft, expected_soft), seed


def test_drop_draws_are_a_function_of_the_sample_alone():
    """A sample's drop decisions do not depend on the batch it is drawn in (order, company, size) and are
    uniform in [0, 1): over 20,000 samples the fraction kept at keep = 0.9 and the mean are within 4 standard
    errors, and neighbouring columns (blocks) are uncorrelated."""
    seeds = [derive_seed(7, "sample", 0, index) for index in range(20_000)]
    draws = drop_draws(seeds, 3)
    assert draws.dtype == torch.float32 and 0 <= draws.min() and draws.max() < 1
    assert torch.equal(drop_draws(seeds[5:2:-1], 3), draws[[5, 4, 3]])
    assert torch.equal(with_drop_draws(None, 3)([{"sample_seed": seeds[9], "target": 1}])["drop"], draws[9:10])
    n = len(seeds)
    assert abs((draws < 0.9).double().mean() - 0.9) < 4 * (0.9 * 0.1 / n) ** 0.5
    assert abs(draws.double().mean() - 0.5) < 4 * (1 / 12 / n) ** 0.5
    correlation = torch.corrcoef(draws.T.double())[0, 1]
    assert abs(correlation) < 4 / n ** 0.5
