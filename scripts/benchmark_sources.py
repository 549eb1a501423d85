#!/usr/bin/env python3
"""Training reads from object storage (wds, parquet, timm's wds reader) against the same images in a local folder.

The same images, in the same order, decoded and cropped the same way, from class folders on the disk, from tar
shards (wds) and parquet files on a loopback S3 server behind a latency-adding proxy, and from the same tars
through timm's webdataset reader.

    python scripts/benchmark_sources.py [--latency-ms 20] [--images 3000] [--classes 10] [--workers 2]
                                        [--window 4] [--shard-mb 16] [--rounds 3] [--keep DIR]
                                        [--cache-windows 1.05] [--read-ahead N]
    python scripts/benchmark_sources.py --quickstart [--rounds 1] [--latency-ms 20] [--keep DIR]

Data: --images JPEGs of ImageNet's usual sizes (~48 KB each at quality 90), all distinct (benchmark_data.make_jpegs'
crops of scikit-learn's two sample photos, one seed per 70 images), cycled over --classes class folders, converted
by scripts/make_shards.py to wds tars and parquet files of --shard-mb MB (sample i is the folder's sample i in both),
and uploaded to moto's S3 server on loopback (tests/s3server.py). Every S3 read goes through its FaultProxy, which
waits --latency-ms before each request and counts requests and response bytes. Each split is indexed once
(scripts/index_shards.py's index, written to the bucket) before anything is timed. --keep DIR keeps the files for
the next run.

Per round (--rounds, the order of the sources rotating each round):

* ``folder``: the class folders, read from the page cache (every file is read once before the rounds);
* ``s3 wds``, ``s3 parquet``: open_source on the proxy's s3:// URL, a fresh (cold) cache folder each round with
  data.cache_limit_gb = --cache-windows (1.05) times the bytes of one shuffle window (its --window largest
  shards), the batches wrapped by plan_reads (host shard 0; data.read_ahead_steps = --read-ahead, else the
  default, as are the other data.read_* settings);
* ``timm wds``: timm.data.create_dataset("wds/...") over http:// URLs of the same tars (webdataset fetches each
  with curl), RandomResizedCrop(224) + PILToTensor, the same batch and workers. Its order is its own (shard shuffle
  and an 8192-sample buffer) and so is its count: each worker yields ceil(N / workers / 64) * 64 samples, going
  round its shards again for the rest.

All but timm read one epoch in data.shuffle=window order (WindowShuffle, --window shards a window, seed 0, epoch =
the round; over the tars' lengths for folder and s3 wds, over the parquet files' for s3 parquet, since a window
is a window of the format's own shards) through ImageDataset and the tensor pipeline's training reader
(decode, random-resized crop to 224 keyed by the sample's seed; torch's default collate, so no RandAugment), in
a DataLoader of --workers workers over MicroBatchSampler's batches of 64 (the last incomplete one dropped).
The timed pass runs from creating the loader's iterator (every source's workers start inside it) to its last
batch; the proxy's counters are reset just before it. Before the rounds, a few untimed folder batches warm up
imports and decoders.

Each line gives medians over the rounds:

    <name>: <img/s> img/s, <ratio>x folder, <requests> requests/image, <bytes>x bytes

ratio: against folder in the same run; requests/image: proxy requests during the timed pass / images read;
bytes: proxy response bytes / the encoded bytes of the images read (folder: the bytes of the files it read, so
1.00x and no requests; timm wds: its image count times the mean image size). Set-up messages go to stderr.

--quickstart trains the quickstart job (configs/quickstart_digits.yaml, train.py in a subprocess, as
scripts/quickstart.py runs it) from the digits folder and from the same digits as wds shards on the loopback S3
behind the proxy (data.format=wds, a fresh data.cache_dir, the same data.shuffle=global), alternating, --rounds
times each, and prints the median wall seconds of train.py and its last epoch's top-1:

    folder: <s> s, top-1 <x>
    s3 wds: <s> s, top-1 <x>, <ratio>x folder time
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))

BUCKET = "bench"
BATCH = 64
SEED = 0
SOURCES = ("folder", "s3 wds", "s3 parquet", "timm wds")
PHOTOS_PER_SEED = 70  # make_jpegs' 50 baseline + 20 progressive
LAYOUT_VERSION = 1  # of --keep DIR's content


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the data ------------------------------------------------------------------------------------------------------

def make_folder(out: Path, images: int, classes: int) -> None:
    """``images`` distinct JPEGs in ``out/train/class_<c>/``, image i in class i % classes."""
    from benchmark_data import make_jpegs

    with tempfile.TemporaryDirectory(prefix="bench-jpegs-") as scratch:
        for seed in range(-(-images // PHOTOS_PER_SEED)):
            with contextlib.redirect_stdout(io.StringIO()):
                make_jpegs(Path(scratch) / str(seed), seed=seed)
        made = sorted(Path(scratch).glob("*/*.jpg"), key=lambda path: (int(path.parent.name), path.name))
        for index, path in enumerate(made[:images]):
            folder = out / "train" / f"class_{index % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.move(path, folder / f"{index:06d}.jpg")


def convert(folder: Path, out: Path, form: str, shard_mb: float) -> None:
    import make_shards

    with contextlib.redirect_stdout(io.StringIO()):
        make_shards.main([str(folder), str(out), "--format", form, "--shard-size", str(shard_mb), "--splits",
                          "train", "--workers", "2"])


def prepare_data(root: Path, images: int, classes: int, shard_mb: float) -> None:
    """root/folder, root/wds and root/parquet, reused when root holds them for the same arguments."""
    params = {"version": LAYOUT_VERSION, "images": images, "classes": classes, "shard_mb": shard_mb}
    stamp = root / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        say(f"reusing the data in {root}")
        return
    stamp.unlink(missing_ok=True)
    for name in ("folder", "wds", "parquet"):
        shutil.rmtree(root / name, ignore_errors=True)
    start = time.perf_counter()
    make_folder(root / "folder", images, classes)
    for form in ("wds", "parquet"):
        convert(root / "folder", root / form, form, shard_mb)
    stamp.write_text(json.dumps(params))
    say(f"made {images} JPEGs in {classes} classes, wds and parquet in {time.perf_counter() - start:.0f} s "
        f"({root})")


# --- the loopback S3 -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def loopback_s3(root: Path, names: list[str], latency_ms: float):
    """moto's server holding root/<name> at s3://BUCKET/<name>, a FaultProxy in front of it, and this process's
    environment (inherited by DataLoader workers and subprocesses) pointing s3fs at the proxy."""
    from s3server import FaultProxy, S3Server, make_bucket, s3_environment, upload_folder

    with S3Server() as server:
        make_bucket(server.endpoint, BUCKET)
        for name in names:
            public_read(upload_folder(root / name, f"s3://{BUCKET}/{name}", endpoint=server.endpoint),
                        server.endpoint)
        with FaultProxy(server.endpoint, latency_ms=latency_ms) as proxy:
            os.environ.pop("AWS_PROFILE", None)
            os.environ.update(s3_environment(proxy.endpoint))
            yield proxy


def public_read(urls: list[str], endpoint: str) -> None:
    """Anonymous GETs allowed (moto refuses them on private objects): webdataset's curl signs nothing."""
    import s3fs
    from s3server import CREDENTIALS

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                           secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    for url in urls:
        fs.chmod(url, "public-read")


def index_split(url: str, form: str, split: str = "train") -> None:
    """What scripts/index_shards.py does: the split's index, written below the root where training finds it."""
    from mambaout.data.sources.index import index_name
    from mambaout.data.sources.shards import build_index
    from mambaout.data.sources.store import Store

    store = Store(url)
    store.write_bytes(index_name(split, form), build_index(store, form, split).to_bytes())


# --- one timed pass ------------------------------------------------------------------------------------------------

class Pass:
    """What a timed pass measured."""

    def __init__(self, images: int, seconds: float, requests: int, sent: float, image_bytes: float) -> None:
        self.images, self.seconds = images, seconds
        self.rate = images / seconds
        self.requests = requests / images
        self.bytes = sent / image_bytes


def timed(loader, proxy, keys, image_bytes) -> Pass:
    """Iterates ``loader`` once: ``keys(batch)`` lists a batch's images (indices or targets), ``image_bytes`` of
    all the lists gives the encoded bytes of the images read."""
    proxy.reset_counters()
    start = time.perf_counter()
    batches = [keys(batch) for batch in loader]
    seconds = time.perf_counter() - start
    images = sum(len(batch) for batch in batches)
    return Pass(images, seconds, proxy.requests, proxy.bytes_sent, image_bytes(batches))


def train_reader():
    from mambaout.config import load_config
    from mambaout.data.pipeline import build_pipeline

    return build_pipeline(load_config(None, ["data.pipeline=tensor", "data.augment_on=workers"]), "cpu").train.reader


def data_config(cache_dir: str, cache_gb: float, args):
    from mambaout.config import load_config

    ahead = [] if args.read_ahead is None else [f"data.read_ahead_steps={args.read_ahead}"]
    return load_config(None, ["data.shuffle=window", f"data.shuffle_window={args.window}", f"data.num_workers={args.workers}",
                              f"data.cache_dir={cache_dir}", f"data.cache_limit_gb={cache_gb}", *ahead]).data


def window_gb(sizes: list[int], window: int, windows: float) -> float:
    """GiB of ``windows`` times the largest ``window`` shards."""
    return sum(sorted(sizes, reverse=True)[:window]) * windows / 2**30


class Bench:
    """The sources of one run: the folder, the shards on S3 behind ``proxy``, the order they all read."""

    def __init__(self, root: Path, proxy, args) -> None:
        from mambaout.data.sampling import WindowShuffle
        from mambaout.data.sources import open_source

        self.proxy, self.args = proxy, args
        self.folder = open_source("folder", str(root / "folder"), "train")
        self.sizes = [os.path.getsize(path) for path, _ in self.folder.samples]
        self.reader = train_reader()
        self.urls = {form: f"s3://{BUCKET}/{form}" for form in ("wds", "parquet")}
        with tempfile.TemporaryDirectory() as cache:
            shards = {form: open_source(form, url, "train", cache_dir=cache) for form, url in self.urls.items()}
        self.cache_gb = {form: window_gb(source.index.shard_sizes, args.window, args.cache_windows)
                         for form, source in shards.items()}
        # each format's windows are its own files' (a window of tars is not one of parquet files); the folder
        # reads in the tars' order
        self.shuffles = {form: WindowShuffle(source.shard_lengths, args.window) for form, source in shards.items()}
        self.http_root = f"{proxy.endpoint}/{BUCKET}/wds"

    def sampler(self, epoch: int, form: str = "wds"):
        from mambaout.data.sampling import MicroBatchSampler

        return MicroBatchSampler(len(self.folder), BATCH, BATCH, 1, [0], SEED, epoch=epoch,
                                 shuffle=self.shuffles[form])

    def loader(self, dataset, batches):
        from torch.utils.data import DataLoader

        return DataLoader(dataset, batch_sampler=batches, num_workers=self.args.workers)

    def dataset(self, source):
        from mambaout.data.datasets import ImageDataset

        return ImageDataset(source, self.reader, replace_bad=True)

    def ours(self, dataset, batches) -> Pass:
        result = timed(self.loader(dataset, batches), self.proxy, lambda batch: batch["index"].tolist(),
                       lambda indices: sum(self.sizes[i] for batch in indices for i in batch))
        if dataset.source is self.folder:  # no request; it read each image's file, whole: exactly the image bytes
            result.bytes = 1.0
        return result

    def run(self, name: str, epoch: int) -> Pass:
        if name == "folder":
            return self.ours(self.dataset(self.folder), self.sampler(epoch))
        if name == "timm wds":
            return self.timm(epoch)
        return self.planned(name.split()[1], epoch)

    def planned(self, form: str, epoch: int) -> Pass:
        from mambaout.data.sources import open_source, plan_reads, source_options

        with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
            data = data_config(cache, self.cache_gb[form], self.args)
            dataset = self.dataset(open_source(form, self.urls[form], "train", **source_options(data)))
            return self.ours(dataset, plan_reads(dataset, self.sampler(epoch, form), data, host_shard_ids=[0]))

    def timm(self, epoch: int) -> Pass:
        import timm.data
        from torch.utils.data import DataLoader
        from torchvision import transforms

        transform = transforms.Compose([transforms.RandomResizedCrop(224), transforms.PILToTensor()])
        dataset = timm.data.create_dataset("wds/bench", root=self.http_root, split="train", is_training=True,
                                           batch_size=BATCH, seed=SEED, transform=transform)
        dataset.set_loader_cfg(num_workers=self.args.workers)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=BATCH, num_workers=self.args.workers)
        mean_size = statistics.fmean(self.sizes)
        return timed(loader, self.proxy, lambda batch: batch[1].tolist(),
                     lambda targets: sum(map(len, targets)) * mean_size)

    def warm_up(self) -> None:
        """Every folder file into the page cache; a few untimed folder batches (imports, decoders)."""
        for path, _ in self.folder.samples:
            Path(path).read_bytes()
        self.ours(self.dataset(self.folder), list(self.sampler(-1))[:2 * self.args.workers])


def benchmark(args) -> int:
    with data_root(args.keep) as root:
        prepare_data(root, args.images, args.classes, args.shard_mb)
        with loopback_s3(root, ["wds", "parquet"], args.latency_ms) as proxy:
            for form in ("wds", "parquet"):
                index_split(f"s3://{BUCKET}/{form}", form)
            bench = Bench(root, proxy, args)
            bench.warm_up()
            results = {name: [] for name in SOURCES}
            for epoch in range(args.rounds):
                for name in SOURCES[epoch % len(SOURCES):] + SOURCES[:epoch % len(SOURCES)]:
                    results[name].append(bench.run(name, epoch))
                    done = results[name][-1]
                    say(f"round {epoch}: {name}: {done.images} images in {done.seconds:.1f} s, {done.rate:.1f} img/s, "
                        f"{done.requests * done.images:.0f} requests, {done.bytes:.3f}x bytes")
    report(results, args)
    return 0


def report(results: dict[str, list[Pass]], args) -> None:
    folder = statistics.median(result.rate for result in results["folder"])
    for name in SOURCES:
        rate = statistics.median(result.rate for result in results[name])
        requests = statistics.median(result.requests for result in results[name])
        sent = statistics.median(result.bytes for result in results[name])
        print(f"{name}: {rate:.1f} img/s, {rate / folder:.2f}x folder, {requests:.3f} requests/image, "
              f"{sent:.2f}x bytes", flush=True)


@contextlib.contextmanager
def data_root(keep: Path | None):
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as scratch:
        yield Path(scratch)


# --- --quickstart --------------------------------------------------------------------------------------------------

QUICKSTART_CONFIG = "configs/quickstart_digits.yaml"


def prepare_digits(root: Path) -> None:
    """root/digits (scripts/make_digits_dataset.py) and root/digits-wds (its train and val as tars)."""
    if not (root / "digits" / "val").is_dir():
        shutil.rmtree(root / "digits", ignore_errors=True)
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_digits_dataset.py"), str(root / "digits")],
                       check=True, stdout=subprocess.DEVNULL)
    if not (root / "digits-wds" / "_info.json").is_file():
        shutil.rmtree(root / "digits-wds", ignore_errors=True)
        import make_shards

        with contextlib.redirect_stdout(io.StringIO()):
            make_shards.main([str(root / "digits"), str(root / "digits-wds"), "--format", "wds"])


def train_once(name: str, root: Path, work: Path, proxy) -> tuple[float, float, int]:
    """train.py on the quickstart config from the folder or the S3 shards: (wall seconds, last top-1, requests)."""
    output = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    overrides = [f"train.output_dir={output}"]
    if name == "folder":
        overrides.append(f"data.root={root / 'digits'}")
    else:
        overrides += [f"data.root=s3://{BUCKET}/digits-wds", "data.format=wds", "data.shuffle=global",
                      f"data.cache_dir={tempfile.mkdtemp(prefix='cache-', dir=work)}"]
    proxy.reset_counters()
    start = time.perf_counter()
    with open(output.with_suffix(".log"), "w") as log:
        done = subprocess.run([sys.executable, "train.py", "--config", QUICKSTART_CONFIG, *overrides], cwd=REPO,
                              env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"train.py ({name}) exited with {done.returncode}; its log: {output.with_suffix('.log')}\n"
                         + output.with_suffix(".log").read_text()[-3000:])
    with open(output / "metrics.csv", newline="") as file:
        top1 = float(list(csv.DictReader(file))[-1]["top1"])
    return seconds, top1, proxy.requests


def quickstart(args) -> int:
    with data_root(args.keep) as root:
        prepare_digits(root)
        with loopback_s3(root, ["digits-wds"], args.latency_ms) as proxy, \
                tempfile.TemporaryDirectory(prefix="bench-quickstart-") as work:
            for split in ("train", "val"):
                index_split(f"s3://{BUCKET}/digits-wds", "wds", split)
            runs = {"folder": [], "s3 wds": []}
            for number in range(args.rounds):
                for name in (["folder", "s3 wds"] if number % 2 == 0 else ["s3 wds", "folder"]):
                    runs[name].append(train_once(name, root, Path(work), proxy))
                    say(f"round {number}: {name}: {runs[name][-1][0]:.0f} s, top-1 {runs[name][-1][1]:.2f}, "
                        f"{runs[name][-1][2]} requests")
    folder = statistics.median(seconds for seconds, _, _ in runs["folder"])
    for name, results in runs.items():
        seconds = statistics.median(seconds for seconds, _, _ in results)
        top1 = statistics.median(top1 for _, top1, _ in results)
        ratio = f", {seconds / folder:.2f}x folder time" if name != "folder" else ""
        print(f"{name}: {seconds:.0f} s, top-1 {top1:.2f}{ratio}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added before each S3 request (default 20)")
    parser.add_argument("--images", type=int, default=3000, help="JPEGs in the dataset (default 3000)")
    parser.add_argument("--classes", type=int, default=10, help="class folders (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--window", type=int, default=4, help="shards per shuffle window (default 4)")
    parser.add_argument("--shard-mb", type=float, default=16.0, help="largest shard in MB (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--cache-windows", type=float, default=1.05,
                        help="data.cache_limit_gb in shuffle windows (their --window largest shards; default 1.05)")
    parser.add_argument("--read-ahead", type=int, default=None,
                        help="data.read_ahead_steps (default: the config's default)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="make (or reuse) the data in DIR, and keep it")
    parser.add_argument("--quickstart", action="store_true",
                        help="train the quickstart from the folder and from S3 shards instead")
    args = parser.parse_args(argv)
    if args.images < BATCH:
        parser.error(f"--images must be at least one batch ({BATCH})")
    return quickstart(args) if args.quickstart else benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
