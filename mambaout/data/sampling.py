"""Keyed randomness and the batch arithmetic of ``docs/DESIGN.md``.

Every random draw of the data pipeline is seeded by a key such as ``(seed, "sample", epoch, index)``
instead of reading a stream that carries over between samples, so results do not depend on the
number of workers, shards or devices, nor on where a run was interrupted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

PAD_INDEX = -1
"""Index of a padding row: datasets return a zero image with target -1 for it."""

SampleKey = tuple[int, int]
"""What the training batch sampler yields per sample: ``(index, sample_seed)``."""


def derive_seed(*parts: int | str) -> int:
    """Hashes ``parts`` (ints and strings) into a non-negative 63-bit seed.

    The same parts give the same seed on every platform and Python run (``hash()`` is salted per
    process, so it is not used). ``derive_seed(1)`` and ``derive_seed("1")`` differ.
    """
    canonical = [part if isinstance(part, str) else operator.index(part) for part in parts]
    encoded = json.dumps(canonical, separators=(",", ":")).encode()
    digest = hashlib.blake2b(encoded, digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def sample_generator(sample_seed: int) -> random.Random:
    """The one generator every random parameter of a sample is drawn from (tensor pipelines): python's
    Mersenne Twister, seeded in ~6 us, its scalar draws ~0.1 us each."""
    return random.Random(sample_seed)


def _seed_global_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(derive_seed(seed, "numpy") % 2**32)  # numpy's legacy seeding takes 32 bits
    # Only the CPU generator: torch.manual_seed would also reseed (and initialise) every CUDA device.
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seeds python ``random``, numpy's global RNG and torch's CPU RNG from ``seed`` for the duration of the
    block (timm's PIL transforms draw from these three).

    In the main process (``num_workers=0``) the previous states are restored afterwards, so the draws inside
    the block do not shift the streams the caller continues with. A DataLoader worker has no such caller, and
    saving and restoring numpy's state alone costs ~120 us a sample, so workers only seed (~15 us).
    """
    if get_worker_info() is not None:
        _seed_global_rngs(seed)
        yield
        return
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    _seed_global_rngs(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


# --- counter-based noise: the same values from the same key on any device, in any batch --------------------

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 ``x`` in [0, 2**32), in 16-bit halves so no product overflows int64
    (overflow is undefined in C++ and differs between backends)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2**32) in which every input bit flips about half of
    the output bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def keyed_bits(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in [0, 2**32)) for each ``counter`` (int64 in [0, 2**32)) under a 63-bit ``key``
    (broadcast against it): a pure function of both, computed with integer ops that every backend (CPU, CUDA,
    XLA) evaluates exactly, so no generator state exists and no device or batch split changes a value."""
    low, high = key & _MASK32, key >> 32
    return _fmix32(_fmix32(counter ^ low) ^ high ^ 0x9E3779B9)  # the constant keeps (0, 0) off the fixed point 0


def keyed_normal(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 values, one per ``counter`` (< 2**31), by Box-Muller from two keyed uniforms
    of 24 bits (|value| <= 5.77: the normal's mass beyond that is 1e-8)."""
    scale = 2.0 ** -24
    u1 = ((keyed_bits(key, 2 * counter) >> 8) + 1).to(torch.float32) * scale  # in (0, 1]: log(u1) is finite
    u2 = (keyed_bits(key, 2 * counter + 1) >> 8).to(torch.float32) * scale
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)


def drop_draws(sample_seeds: Sequence[int], num_sites: int) -> torch.Tensor:
    """[len(sample_seeds), num_sites] float32 uniforms in [0, 1) (24 bits) that decide a sample's stochastic depth
    and dropout: column ``c`` is ``keyed_bits`` of the sample's drop key and counter ``c``, so a sample is dropped
    alike whatever batch, worker, process or device it lands on, and no generator state exists."""
    keys = torch.tensor([derive_seed(seed, "drop") for seed in sample_seeds], dtype=torch.int64)
    bits = keyed_bits(keys[:, None], torch.arange(num_sites, dtype=torch.int64))
    return (bits >> 8).to(torch.float32) * 2.0 ** -24


def with_drop_draws(collate: Callable[[list[dict]], dict] | None, num_sites: int
                    ) -> Callable[[list[dict]], dict]:
    """``collate`` (torch's default when None) that adds each training sample's ``drop`` decisions
    (:func:`drop_draws`) to the batch: drawn in the loader's workers, moved and sharded like the targets."""
    collate = collate or default_collate

    def collate_with_draws(items: list[dict]) -> dict:
        batch = collate(items)
        batch["drop"] = drop_draws(batch["sample_seed"].tolist(), num_sites)
        return batch
    return collate_with_draws


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_batch_arithmetic(global_batch_size: int, micro_batch_size: int, num_shards: int) -> None:
    """Raises ValueError unless ``global_batch_size == micro_batch_size * num_shards * A`` for an integer A."""
    if global_batch_size <= 0 or micro_batch_size <= 0 or num_shards <= 0:
        raise ValueError(
            f"global batch size ({global_batch_size}), micro-batch size ({micro_batch_size}) and number "
            f"of shards ({num_shards}) must all be positive")
    if global_batch_size % num_shards:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {num_shards} data shards; "
            f"choose a global batch size that is a multiple of {num_shards}")
    per_shard = global_batch_size // num_shards
    if per_shard % micro_batch_size:
        raise ValueError(
            f"global batch size {global_batch_size} cannot be cut into micro-batches of {micro_batch_size} "
            f"over {num_shards} shard(s): {global_batch_size} / ({micro_batch_size} x {num_shards}) is not "
            f"an integer. Valid micro-batch sizes: {_divisors(per_shard)}")


class GlobalShuffle:
    """Epoch ``e`` visits a permutation of all samples, drawn from ``derive_seed(seed, "order", e)``."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
        return torch.randperm(self.num_samples, generator=generator)


class WindowShuffle:
    """Shards permuted per epoch, then cut into windows of ``window`` shards, the samples of each window permuted:
    a pure function of (seed, epoch, shard lengths, window), never of the world size or the workers. A host reads
    a window's few shards in large requests, at the price of an order less mixed than a global permutation
    (a sample meets only the samples of its window's shards in a batch)."""

    def __init__(self, shard_lengths: Sequence[int], window: int) -> None:
        if window < 1:
            raise ValueError(f"the shuffle window must hold at least one shard, got {window}")
        self.shard_lengths = [int(length) for length in shard_lengths]
        self.window = window
        self.num_samples = sum(self.shard_lengths)
        self._shard_starts = np.concatenate([[0], np.cumsum(self.shard_lengths)[:-1]]).astype(np.int64)

    def _windows(self, seed: int, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(derive_seed(seed, "shards", epoch))
        shards = torch.randperm(len(self.shard_lengths), generator=generator).tolist()
        return [shards[start:start + self.window] for start in range(0, len(shards), self.window)]

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        parts = []
        for number, shards in enumerate(self._windows(seed, epoch)):
            samples = torch.from_numpy(np.concatenate(
                [np.arange(self._shard_starts[s], self._shard_starts[s] + self.shard_lengths[s]) for s in shards]))
            generator = torch.Generator().manual_seed(derive_seed(seed, "window", epoch, number))
            parts.append(samples[torch.randperm(len(samples), generator=generator)])
        return torch.cat(parts)

    def window_bounds(self, seed: int, epoch: int) -> list[int]:
        """Where each window starts in the epoch's order, and the order's end."""
        sizes = [sum(self.shard_lengths[s] for s in shards) for shards in self._windows(seed, epoch)]
        return np.concatenate([[0], np.cumsum(sizes)]).tolist()


class MicroBatchSampler:
    """Batch sampler of training micro-batches for ``torch.utils.data.DataLoader(batch_sampler=...)``.

    Epoch ``e`` visits the order ``shuffle`` gives (:class:`GlobalShuffle` by default: a permutation of
    ``range(num_samples)`` drawn from a generator seeded by ``derive_seed(seed, "order", e)``; or a
    :class:`WindowShuffle`). Optimizer step ``s`` takes the global batch ``order[s * G:(s + 1) * G]``, cut into
    micro-batches of ``micro_batch_size`` numbered ``0..G/micro - 1``.
    Shard ``r`` of ``num_shards`` takes micro-batches ``a * num_shards + r`` for accumulation steps
    ``a = 0..accum_steps - 1``. Each yielded list is one accumulation step of this process: the
    micro-batches of its ``shard_ids`` concatenated in that order (one shard per process on
    torch.distributed, all of a host's devices under XLA SPMD).

    Elements are ``(index, sample_seed)`` with ``sample_seed = derive_seed(seed, "sample", epoch, index)``;
    the dataset seeds the augmentation of that sample with it. The last incomplete global batch of an
    epoch is dropped, so every optimizer step sees exactly ``global_batch_size`` samples.
    """

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, num_shards: int,
                 shard_ids: Sequence[int], seed: int, epoch: int = 0, start_step: int = 0,
                 shuffle: GlobalShuffle | WindowShuffle | None = None) -> None:
        _check_batch_arithmetic(global_batch_size, micro_batch_size, num_shards)
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch_size}, "
                f"so an epoch would have no optimizer step; use a global batch size of at most {num_samples}")
        shard_ids = list(shard_ids)
        if not shard_ids or len(set(shard_ids)) != len(shard_ids) or not all(
                0 <= shard < num_shards for shard in shard_ids):
            raise ValueError(f"shard_ids must be distinct values in range({num_shards}), got {shard_ids}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.num_shards = num_shards
        self.shard_ids = shard_ids
        self.seed = seed
        self.shuffle = shuffle or GlobalShuffle(num_samples)
        if self.shuffle.num_samples != num_samples:
            raise ValueError(f"the shuffle orders {self.shuffle.num_samples} samples, the dataset has {num_samples}")
        self.set_epoch(epoch, start_step)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last incomplete global batch is dropped)."""
        return self.num_samples // self.global_batch_size

    @property
    def accum_steps(self) -> int:
        """Micro-batches each shard processes per optimizer step (gradient accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.num_shards)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Selects the epoch to iterate and the optimizer step to start from (to resume mid-epoch)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        self.epoch = epoch
        self.start_step = start_step

    def micro_indices(self, accum_step: int, shard_ids: Sequence[int] | None = None) -> list[int]:
        """Global micro-batch indices of the list yielded for ``accum_step``, in concatenation order; with
        ``shard_ids``, those of these shards instead of this sampler's."""
        return [accum_step * self.num_shards + shard for shard in (self.shard_ids if shard_ids is None else shard_ids)]

    def epoch_order(self) -> torch.Tensor:
        """The sample order of the current epoch."""
        return self.shuffle.order(self.seed, self.epoch)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        order = self.epoch_order().tolist()
        micro = self.micro_batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            step_start = step * self.global_batch_size
            for accum_step in range(self.accum_steps):
                batch = []
                for micro_index in self.micro_indices(accum_step):
                    start = step_start + micro_index * micro
                    batch += [(index, derive_seed(self.seed, "sample", self.epoch, index))
                              for index in order[start:start + micro]]
                yield batch

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps


def shard_indices(num_samples: int, num_shards: int, shard: int) -> list[int]:
    """Indices ``shard, shard + num_shards, ...`` of ``range(num_samples)``: the shards of exact
    evaluation, disjoint and covering every index once, without padding."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in range({num_shards}), got {shard}")
    return list(range(shard, num_samples, num_shards))


class EvalBatchSampler:
    """Batch sampler of one evaluation shard: the indices of :func:`shard_indices` in batches of
    ``batch_size`` (the last one may be smaller).

    With ``pad_to_full`` (fixed-shape backends such as XLA) every batch holds exactly ``batch_size``
    entries and every shard yields the same number of batches; the missing entries are
    :data:`PAD_INDEX`, which datasets turn into rows with target -1 that the evaluator masks out.
    """

    def __init__(self, num_samples: int, batch_size: int, num_shards: int, shard: int,
                 pad_to_full: bool = False) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.indices = shard_indices(num_samples, num_shards, shard)
        self.batch_size = batch_size
        self.pad_to_full = pad_to_full
        largest_shard = -(-num_samples // num_shards)
        self._num_batches = -(-(largest_shard if pad_to_full else len(self.indices)) // batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self._num_batches * self.batch_size, self.batch_size):
            batch = self.indices[start:start + self.batch_size]
            if self.pad_to_full:
                batch += [PAD_INDEX] * (self.batch_size - len(batch))
            yield batch

    def __len__(self) -> int:
        return self._num_batches
