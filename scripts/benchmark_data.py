#!/usr/bin/env python3
"""Throughput of the input pipelines on the same files, interleaved in one run.

    python scripts/benchmark_data.py --make-jpegs data/bench-jpegs      # ImageNet-sized JPEGs from real photos
    python scripts/benchmark_data.py --data data/bench-jpegs [--pipelines timm tensor ...] [--cores N]

One process per measured core (``--cores``, default all), each single-threaded, all running the same pipeline
at the same time, so the figure is what a fully loaded DataLoader worker achieves. Pipelines, with the
recipe's training augmentation at 224 px (``configs/_recipe.yaml``):

* ``timm``: timm's PIL transform from the file (the reference);
* ``tensor``: the tensor pipeline with everything in the workers (``data.augment_on=workers``: each worker
  augments the batch it collates);
* ``tensor (host part)``: what stays in the workers when the augmentation runs on the device: read, decode,
  crop, resize, flip, plan;
* ``nvjpeg`` (CUDA only): its worker part (read, header, plan) per core, then the GPU's part (batched nvJPEG
  decode, crop, resize, RandAugment, erasing, normalisation) in img/s of one GPU.

Each line reads ``<name>: <img/s> img/s per core, <ratio>x timm`` (the median of ``--rounds`` rounds).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = ((500, 375), (500, 333), (375, 500), (400, 300), (500, 400), (333, 500))  # common ImageNet shapes


def make_jpegs(out: Path, baseline: int = 50, progressive: int = 20, seed: int = 0) -> None:
    """Random crops of scikit-learn's two sample photos (real photos, shipped in its wheel), at ImageNet's usual
    sizes as quality-90 baseline JPEGs, and 512 px progressive ones."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(image) for image in load_sample_images().images]
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(baseline + progressive):
        is_progressive = index >= baseline
        photo = photos[index % len(photos)]
        width, height = (512, rng.choice((512, 384, 341))) if is_progressive else rng.choice(SIZES)
        scale = min(photo.width / width, photo.height / height) * rng.uniform(0.6, 1.0)
        crop_w, crop_h = int(width * scale), int(height * scale)
        left, top = rng.randint(0, photo.width - crop_w), rng.randint(0, photo.height - crop_h)
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        name = f"{'progressive' if is_progressive else 'baseline'}_{index:03d}.jpg"
        image.save(out / name, quality=90, progressive=is_progressive)
    print(f"wrote {baseline} baseline and {progressive} progressive JPEGs to {out}")


CONFIG = REPO / "configs" / "_recipe.yaml"


def _config(path: str | Path = CONFIG):
    from mambaout.config import load_config

    return load_config(path)


def _stages(names: list[str], config: str | Path = CONFIG) -> dict:
    """The training stage of each measured pipeline, built as training builds it: what a DataLoader worker
    runs is the stage's reader on each sample, then its collate on the batch."""
    from mambaout.data.pipeline import Stage, build_pipeline

    cfg = _config(config)

    def stage(name: str, augment_on: str, device: str = "cpu") -> Stage:
        cfg.data.pipeline, cfg.data.augment_on = name, augment_on
        return build_pipeline(cfg, device).train

    factories = {
        "timm": lambda: stage("timm", "auto"),
        "tensor": lambda: stage("tensor", "workers"),
        "tensor (host part)": lambda: stage("tensor", "device", "cuda"),  # its workers' part only
        "nvjpeg": lambda: stage("nvjpeg", "device", "cuda"),
    }
    return {name: factories[name]() for name in names}


def _worker_batches(stage, files: list[str], batch_size: int, epoch: int) -> None:
    """What a DataLoader worker does for these files: read and prepare each sample, collate each batch."""
    from torch.utils.data import default_collate

    from mambaout.data.decode import read_bytes
    from mambaout.data.sampling import derive_seed

    collate = stage.collate or default_collate
    for start in range(0, len(files), batch_size):
        items = []
        for index in range(start, min(start + batch_size, len(files))):
            reader = stage.reader
            item = reader.prepare(reader.load(read_bytes(files[index])), derive_seed(0, "sample", epoch, index))
            items.append({**item, "target": 0, "index": index, "bad": False})
        collate(items)


def _measure_core(names: list[str], files: list[str], rounds: int, batch_size: int, config: str, barrier,
                  results) -> None:
    """One core: every round runs each pipeline over all files, in step with the other cores."""
    import torch

    torch.set_num_threads(1)
    stages = _stages(names, config)
    for stage in stages.values():  # warm-up: caches, lazy imports, the erasing noise table
        _worker_batches(stage, files[:batch_size], batch_size, epoch=-1)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name, stage in stages.items():
            barrier.wait()
            start = time.perf_counter()
            _worker_batches(stage, files, batch_size, round_index)
            rates[name].append(len(files) / (time.perf_counter() - start))
    results.put(rates)


def per_core_rates(names: list[str], files: list[str], cores: int, rounds: int, batch_size: int, config: str
                   ) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(cores), context.Queue()
    processes = [context.Process(target=_measure_core,
                                 args=(names, files, rounds, batch_size, str(config), barrier, results))
                 for _ in range(cores)]
    for process in processes:
        process.start()
    per_process = [results.get() for _ in processes]
    for process in processes:
        process.join()
    # per round: the mean over cores of their rates; then the median over rounds
    return {name: statistics.median(statistics.fmean(rates[name][r] for rates in per_process)
                                    for r in range(rounds)) for name in names}


def nvjpeg_device_rate(files: list[str], batch_size: int = 128, rounds: int = 5) -> tuple[float, str]:
    """img/s of the GPU part of ``nvjpeg``: batched decode, crop, resize, augmentation, normalisation."""
    import torch

    from mambaout.data.decode import read_bytes
    from mambaout.data.sampling import derive_seed
    from mambaout.runtime import create_runtime

    runtime = create_runtime("cuda")
    stage = _stages(["nvjpeg"])["nvjpeg"]
    loaded = [stage.reader.load(read_bytes(files[i % len(files)])) for i in range(batch_size)]
    items = [{**stage.reader.prepare(loaded[i], derive_seed(0, "sample", 0, i)), "target": 0, "index": i,
              "bad": False} for i in range(batch_size)]
    stage.finish(stage.collate([dict(item) for item in items]), runtime)  # warm-up
    torch.cuda.synchronize()
    rates = []
    for _ in range(rounds):
        batches = [stage.collate([dict(item) for item in items]) for _ in range(5)]
        start = time.perf_counter()
        for batch in batches:
            stage.finish(batch, runtime)
        torch.cuda.synchronize()
        rates.append(len(batches) * batch_size / (time.perf_counter() - start))
    return statistics.median(rates), torch.cuda.get_device_name()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--make-jpegs", type=Path, metavar="DIR", help="write benchmark JPEGs to DIR and exit")
    parser.add_argument("--pipelines", nargs="+", default=None,
                        help="of: timm, tensor, 'tensor (host part)', nvjpeg (default: all that apply here)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="processes, one per core (default all)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples a worker collates at once (default 32)")
    parser.add_argument("--config", default=str(CONFIG),
                        help="the augmentation and image size to measure (default: the recipe, 224 px)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N files")
    args = parser.parse_args()
    if args.make_jpegs:
        make_jpegs(args.make_jpegs)
        return 0
    if args.data is None:
        parser.error("give --data DIR (or --make-jpegs DIR first)")
    import torch

    from mambaout.data.sources.folder import IMAGE_EXTENSIONS

    files = sorted(str(p) for p in args.data.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    files = files[:args.limit] if args.limit else files
    if not files:
        parser.error(f"{args.data} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    gpu = torch.cuda.is_available()
    names = args.pipelines or ["timm", "tensor", "tensor (host part)", *(["nvjpeg"] if gpu else [])]
    if "timm" not in names:
        names.insert(0, "timm")
    size = _config(args.config).data.img_size
    print(f"{len(files)} files, {args.cores} core(s), {args.rounds} rounds, the augmentation of {args.config} at "
          f"{size} px", flush=True)
    rates = per_core_rates(names, files, args.cores, args.rounds, args.batch_size, args.config)
    for name in names:
        print(f"{name}: {rates[name]:.1f} img/s per core, {rates[name] / rates['timm']:.2f}x timm")
    if "nvjpeg" in names:
        if not gpu:
            print("nvjpeg (GPU part): skipped, no CUDA device")
        else:
            rate, device = nvjpeg_device_rate(files)
            print(f"nvjpeg (GPU part: decode, crop, augment): {rate:.0f} img/s on one {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
