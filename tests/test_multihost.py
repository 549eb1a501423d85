"""The per-host code paths of a multi-host XLA slice, fed two hosts' views (no pod needed).

On a slice of H hosts with n devices each, every host loads only its own micro-batches, and SPMD assembles one
global batch from the hosts' parts, host by host. Every host must then key the mixing of that global batch by
the same global micro-batch ids (else pairs would mirror across micro-batches and the hosts would trace different
graphs: a hang), and its devices must be the ones the sharding assumes. What only a real pod shows: that
torch_xla assembles the parts in this order and that reading a host's own output rows works there (the XLA
suite checks both on one host with two devices).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from mambaout.data import MicroBatchSampler, derive_seed
from mambaout.runtime.base import DistributedRuntimeError
from mambaout.runtime.xla import XlaRuntime

HOSTS, DEVICES_PER_HOST = 2, 2


def host_view(rank: int, device_names: list[str] | None = None) -> XlaRuntime:
    """The XLA runtime as host ``rank`` of a 2-host, 4-device slice sees it (torch_xla's answers stubbed)."""
    runtime = XlaRuntime.__new__(XlaRuntime)
    runtime.spmd, runtime.rank, runtime.world_size = True, rank, HOSTS
    runtime._xr = SimpleNamespace(global_runtime_device_count=lambda: HOSTS * DEVICES_PER_HOST,
                                  addressable_runtime_device_count=lambda: DEVICES_PER_HOST)
    names = device_names or [f"TPU:{rank * DEVICES_PER_HOST + i}" for i in range(DEVICES_PER_HOST)]
    runtime._torch_xla = SimpleNamespace(_XLAC=SimpleNamespace(_xla_get_runtime_devices=lambda: names))
    return runtime


def test_every_host_keys_the_mixing_of_the_global_batch_alike():
    """Both hosts compute the same micro-batch ids for each accumulation step, and those ids, in order, are the
    micro-batches that the hosts' loaded batches form when assembled host by host: the ids the eager run of one
    process per device would use for the same rows."""
    hosts = [host_view(rank) for rank in range(HOSTS)]
    assert [h.shard_ids for h in hosts] == [[0, 1], [2, 3]] and hosts[0].num_shards == 4
    samplers = [MicroBatchSampler(96, 32, 4, 4, host.shard_ids, seed=3) for host in hosts]
    every_shard = MicroBatchSampler(96, 32, 4, 4, [0, 1, 2, 3], seed=3)  # one view holding the whole batch
    assert samplers[0].accum_steps == 2
    host_batches = [list(sampler) for sampler in samplers]
    for position, global_batch in enumerate(every_shard):
        accum_step, step = position % 2, position // 2
        assembled = host_batches[0][position] + host_batches[1][position]
        assert assembled == global_batch
        ids = [sampler.micro_indices(accum_step, host.batch_shard_ids) for sampler, host in zip(samplers, hosts)]
        assert ids[0] == ids[1] == every_shard.micro_indices(accum_step)
        micro = 4
        for slot, micro_id in enumerate(ids[0]):  # each mixing seed belongs to the rows it mixes
            rows = assembled[slot * micro:(slot + 1) * micro]
            order = every_shard.epoch_order().tolist()
            start = step * 32 + micro_id * micro
            assert [index for index, _ in rows] == order[start:start + micro]
        assert len({derive_seed(3, "mix", step, m) for m in ids[0]}) == 4


def test_a_host_whose_devices_are_not_the_assumed_ones_stops():
    host_view(1)._check_device_order()  # TPU:2, TPU:3: the devices host 1 feeds
    with pytest.raises(DistributedRuntimeError, match=r"host 1/2 drives the XLA devices \['TPU:1', 'TPU:3'\].*"
                                                      r"assumes devices \[2, 3\]"):
        host_view(1, ["TPU:1", "TPU:3"])._check_device_order()
