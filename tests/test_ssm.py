"""The portable selective scan against its definition, run step by step in float64."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mambaout.models.ssm import kernel_available, selective_scan


def scan_by_definition(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False):
    """The selective scan from its definition: one step at a time, float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        step_input = (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        state = torch.exp(delta[:, :, t, None] * A) * state + step_input
        ys.append((state * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    return (y if z is None else y * F.silu(z.double())), state


def inputs(batch, channels, length, states, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_()
    # A as Mamba initialises it (-(1..N)); delta around softplus(-2.. 0.5): decays from ~1 to ~0 over a few steps
    A = (-torch.arange(1, states + 1, dtype=dtype).repeat(channels, 1)).requires_grad_()
    return dict(u=randn(batch, channels, length), delta=randn(batch, channels, length, scale=0.5), A=A,
                B=randn(batch, states, length), C=randn(batch, states, length), D=randn(channels),
                z=randn(batch, channels, length), delta_bias=randn(channels, scale=0.5))


@pytest.fixture(params=["stepwise", "parallel"])
def recurrence(request, monkeypatch):
    """Both ways the recurrence runs inside a chunk: step by step (CPUs) and the parallel prefix scan (GPUs, XLA)."""
    from mambaout.models import ssm

    monkeypatch.setattr(ssm, "STEPWISE_DEVICES", {"cpu"} if request.param == "stepwise" else set())
    return request.param


@pytest.mark.parametrize("length", [17, 196, 3136])
def test_scan_matches_the_definition_in_values_and_gradients(length, recurrence):
    """fp32 chunked scan vs the float64 loop, with D, z, delta_bias and softplus: outputs and last state within
    1e-5 relative, every input's gradient (through the output and the last state) within 1e-4."""
    args = inputs(2, 3, length, 4)
    out, last = selective_scan(**args, delta_softplus=True, return_last_state=True)
    reference, reference_last = scan_by_definition(*args.values(), softplus=True)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    torch.testing.assert_close(last.double(), reference_last, rtol=1e-5, atol=1e-6)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad((out * weights).sum() + last.sum(), list(args.values()))
    theirs = torch.autograd.grad((reference * weights.double()).sum() + reference_last.sum(), list(args.values()))
    for name, a, b in zip(args, ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)


def on_cuda(args):
    return {k: v.detach().cuda().requires_grad_() for k, v in args.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("use_kernel", [False, True], ids=["portable", "mamba_ssm"])
def test_scan_on_cuda_matches_the_definition(use_kernel):
    """On a GPU (scripts/gpu_check.sh): the portable scan (parallel prefix scan inside chunks) and, when it is
    installed, mamba_ssm's kernel, against the float64 loop at stage-1 length, values within 1e-5 and gradients
    within 1e-4 relative."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if use_kernel and not kernel_available():
        pytest.skip("mamba_ssm is not installed (pip install -e '.[ssm-cuda]')")
    args = on_cuda(inputs(2, 3, 3136, 4))
    out, last = selective_scan(**args, delta_softplus=True, return_last_state=True, use_kernel=use_kernel)
    reference, reference_last = scan_by_definition(*(t.cpu() for t in args.values()), softplus=True)
    torch.testing.assert_close(out.double().cpu(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    torch.testing.assert_close(last.double().cpu(), reference_last, rtol=1e-5, atol=1e-6)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad((out * weights.cuda()).sum(), list(args.values()))
    cpu_args = [t.detach().cpu().requires_grad_() for t in args.values()]
    theirs = torch.autograd.grad((scan_by_definition(*cpu_args, softplus=True)[0] * weights.double()).sum(), cpu_args)
    for name, a, b in zip(args, ours, theirs):
        torch.testing.assert_close(a.double().cpu(), b.double(), rtol=1e-4, atol=1e-4 * b.abs().max().item(),
                                   msg=name)


def test_gradcheck_in_float64_across_chunks(recurrence):
    """7 steps in chunks of 3 (the last one shorter), every input, through the output and the last state."""
    args = inputs(1, 2, 7, 3, dtype=torch.float64)

    def scan(*tensors):
        return selective_scan(*tensors, delta_softplus=True, chunk_size=3, return_last_state=True)
    assert torch.autograd.gradcheck(scan, tuple(args.values()))


def test_without_the_optional_terms_and_in_bf16():
    args = inputs(1, 2, 9, 3)
    plain = selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"])
    reference, _ = scan_by_definition(args["u"], args["delta"], args["A"], args["B"], args["C"])
    torch.testing.assert_close(plain.double(), reference, rtol=1e-5, atol=1e-6)
    half = selective_scan(*(t.bfloat16() if t.is_floating_point() else t for t in
                            (args["u"], args["delta"], args["A"], args["B"], args["C"])))
    assert half.dtype == torch.bfloat16  # the output in the input's dtype, accumulated in fp32
    with pytest.raises(ValueError, match=r"B must have shape \[1, 3, 9\]"):
        selective_scan(args["u"], args["delta"], args["A"], args["B"][..., :4], args["C"])


class LargestTensor(TorchDispatchMode):
    """The element count of the largest tensor any operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


def test_no_operation_makes_a_batch_by_length_by_channels_by_states_tensor(recurrence):
    """At stage-1 length (3136) forward and backward stay per chunk: the largest tensor of any op is a small
    fraction of batch x D x L x N (what an unchunked parallel scan holds, several times over)."""
    batch, channels, length, states = 2, 32, 3136, 16
    args = inputs(batch, channels, length, states)
    with LargestTensor() as seen:
        selective_scan(**args, delta_softplus=True).square().sum().backward()
    assert seen.largest <= batch * channels * length * states // 10


def scan_2d_by_index(mixer, x):
    """SelectiveScan2d's forward written with explicit token orders (index permutations of the map)."""
    from mambaout.models.ssm import SCAN_ORDERS

    batch, height, width, channels = x.shape
    grid = torch.arange(height * width).view(height, width)
    rows, columns = grid.flatten(), grid.t().flatten()
    orders = {"1d": [rows], "bidirectional": [rows, rows.flip(0)],
              "cross": [rows, columns, rows.flip(0), columns.flip(0)]}[mixer.scan]
    assert len(orders) == SCAN_ORDERS[mixer.scan]
    tokens = x.flatten(1, 2)  # [B, H*W, C], row-major
    out = torch.zeros_like(tokens)
    for k, order in enumerate(orders):
        sequence = tokens[:, order].transpose(1, 2)  # [B, C, L]
        projected = torch.einsum("bcl,rc->brl", sequence, mixer.x_proj[k])
        dt, B, C = projected.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=1)
        delta = torch.einsum("brl,cr->bcl", dt, mixer.dt_proj_weight[k])
        y = selective_scan(sequence, delta, -torch.exp(mixer.A_log[k]), B, C, mixer.D[k],
                           delta_bias=mixer.dt_proj_bias[k], delta_softplus=True)
        out[:, order] += y.transpose(1, 2)
    return out.view(batch, height, width, channels)


@pytest.mark.parametrize("scan", ["1d", "bidirectional", "cross"])
def test_2d_scan_orders_undo_their_reordering(scan):
    """Each direction's output lands back on the token it came from (checked against index permutations), on a
    non-square map; 1d is causal in row-major order, the others see the whole map."""
    from mambaout.models.ssm import SelectiveScan2d

    torch.manual_seed(0)
    mixer = SelectiveScan2d(6, scan, d_state=4)
    with torch.no_grad():
        mixer.x_proj.normal_()  # larger step sizes than at init: every token reaches the others
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    out = mixer(x)
    torch.testing.assert_close(out, scan_2d_by_index(mixer, x), rtol=1e-5, atol=1e-6)
    reach = torch.autograd.grad(out[0, 1, 2].sum(), x)[0][0].abs().sum(-1)  # [H, W]: which tokens feed (1, 2)
    later = torch.arange(15).view(3, 5) > 1 * 5 + 2
    if scan == "1d":
        assert reach[later].max() == 0 and reach[~later].min() > 0
    else:
        assert reach.min() > 0


def test_mamba_twins_are_registered_and_train_their_ssm():
    """mambaout_femto_ssm: femto's depths and dims with an SSM in every block (or the chosen stages); its
    decays and skips train, without weight decay."""
    from mambaout import create_model, list_models
    from mambaout.optim import create_optimizer

    assert {"mambaout_femto_ssm", "mambaout_tiny_ssm"} <= set(list_models())
    twin, plain = create_model("mambaout_femto_ssm", num_classes=3), create_model("mambaout_femto", num_classes=3)
    assert [len(s.blocks) for s in twin.stages] == [len(s.blocks) for s in plain.stages] == [3, 3, 9, 3]
    assert all(block.ssm is not None and block.ssm.scan == "bidirectional"
               for stage in twin.stages for block in stage.blocks)
    assert set(plain.state_dict()) < set(twin.state_dict())  # the Gated CNN's weights, plus the SSM's
    some = create_model("mambaout_femto_ssm", num_classes=3, ssm_stages=(2, 3), ssm_scan="cross")
    assert [stage.blocks[0].ssm is not None for stage in some.stages] == [False, False, True, True]
    twin(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    a_log = twin.stages[0].blocks[0].ssm.A_log
    assert a_log.grad is not None and a_log.grad.abs().sum() > 0
    optimizer = create_optimizer(twin, 1e-3, 0.05, 1e-8, (0.9, 0.999))
    undecayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert id(a_log) in undecayed and id(twin.stages[0].blocks[0].ssm.x_proj) not in undecayed


def test_macs_of_a_mamba_twin_add_its_projections_and_its_scans():
    """count_macs(femto_ssm) - count_macs(femto) at 224 px is, block by block and per direction, the two
    projections (x_proj to dt, B, C; dt_proj) as GEMMs plus the scan by its definition (4 N + 2 per token and
    channel)."""
    import math

    from mambaout import create_model
    from mambaout.models.info import count_macs

    with torch.device("meta"):
        twin, plain = create_model("mambaout_femto_ssm"), create_model("mambaout_femto")
    expected = 0
    for (depth, dim), side in zip([(3, 48), (3, 96), (9, 192), (3, 288)], [56, 28, 14, 7]):
        rank, states, tokens = math.ceil(dim / 16), 16, side * side
        expected += depth * 2 * tokens * dim * ((rank + 2 * states) + rank + (4 * states + 2))
    assert count_macs(twin, 224) - count_macs(plain, 224) == expected


def test_ablation_script_trains_both_and_prints_one_table(image_root, tmp_path):
    """scripts/ablation.py on a tiny folder dataset: both runs train (their own run folders) and the table has a
    row per model with its params, GMACs, img/s, peak memory and top-1."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from mambaout import create_model

    repo = Path(__file__).resolve().parents[1]
    overrides = [f"data.root={image_root}", "data.img_size=32", "data.num_workers=0", "train.max_steps=2",
                 "optim.global_batch_size=8", "train.micro_batch_size=8", "eval.batch_size=8", "sched.epochs=1",
                 "sched.warmup_epochs=0", "runtime.device=cpu"]
    done = subprocess.run([sys.executable, "scripts/ablation.py", "--out", str(tmp_path / "ablation"), *overrides],
                          cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = re.findall(r"^\| (mambaout_\w+) \| ([\d.]+)M \| ([\d.]+) \| ([\d.]+) \| (\d+) MiB \| ([\d.]+) \|$",
                      done.stdout, re.MULTILINE)
    assert [row[0] for row in rows] == ["mambaout_femto", "mambaout_femto_ssm"]
    for name, params, gmacs, rate, peak, top1 in rows:
        expected = sum(p.numel() for p in create_model(name, num_classes=4).parameters())
        assert float(params) == pytest.approx(expected / 1e6, abs=0.005)
        assert float(gmacs) > 0 and float(rate) > 0 and int(peak) > 100 and 0 <= float(top1) <= 100
        assert (tmp_path / "ablation" / name.replace("mambaout_", "") / "best.pth").exists()
    assert float(rows[1][2]) > float(rows[0][2])  # the scan's MACs


def test_a_mamba_twin_resumes_bit_exactly(image_root, tmp_path):
    """femto_ssm through train(): 2 steps, then a resume to 4, equal 4 uninterrupted steps in every weight (drop
    path keyed per sample, the scan deterministic)."""
    import json

    from conftest import tiny_overrides
    from mambaout.checkpoint import load_training_checkpoint
    from mambaout.config import load_config
    from mambaout.trainer import train

    def run(out, steps):
        train(load_config(None, tiny_overrides(image_root, out, **{"model.name": "mambaout_femto_ssm",
                                                                    "train.max_steps": steps})))
        return load_training_checkpoint(out / "last.pth")

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4)
    assert resumed["train_state"]["step"] == straight["train_state"]["step"] == 4
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert [entry["step"] for entry in manifest["resumes"]] == [2]  # it continued from step 2, not from 0
    assert all(torch.equal(resumed["model"][k], v) for k, v in straight["model"].items())
    assert any(k.endswith("ssm.A_log") for k in straight["model"])


def test_a_mamba_twin_trains_alike_on_1_and_2_processes(image_root, tmp_path):
    """femto_ssm under torchrun (gloo): 2 processes with no accumulation vs 1 process accumulating 2
    micro-batches, Mixup/CutMix and drop path on. After 4 steps the weights agree within 1e-5 while the steps
    moved them by far more (the scan adds no batch-dependent state and no random draw)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from conftest import tiny_overrides
    from mambaout.checkpoint import load_training_checkpoint

    repo = Path(__file__).resolve().parents[1]
    settings = {"model.name": "mambaout_femto_ssm", "train.max_steps": 4, "sched.warmup_epochs": 0,
                "optim.lr": 5e-4, "aug.mixup_alpha": 0.8, "aug.cutmix_alpha": 1.0,
                "train.checkpoint_every_steps": 2}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"

    def run(nproc):
        out = tmp_path / f"p{nproc}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   str(port), "train.py", *tiny_overrides(image_root, out, **settings)]
        done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"micro batch 4 x {nproc} shards x {3 - nproc} accumulation steps" in done.stderr + done.stdout
        return [load_training_checkpoint(out / "checkpoints" / f"step_{step:08d}.pth")["model"] for step in (2, 4)]

    (one_at_2, one), (_, two) = run(1), run(2)
    difference = max((one[k] - two[k]).abs().max().item() for k in one)
    moved = max((one[k] - one_at_2[k]).abs().max().item() for k in one)  # by steps 3 and 4
    print(f"\nfemto_ssm, 2 processes vs 1 x 2 micro-batches: max weight difference {difference:.3g}; "
          f"steps 3-4 moved the weights by up to {moved:.3g}")
    assert difference < 1e-5 and moved > 100 * difference
    assert any(k.endswith("ssm.A_log") for k in one)


def _fake_mamba_ssm(monkeypatch, selective_scan_fn):
    """A mamba_ssm package whose kernel is ``selective_scan_fn``, in place of whatever is installed."""
    import types

    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = selective_scan_fn
    for name, module in (("mamba_ssm", types.ModuleType("mamba_ssm")), ("mamba_ssm.ops", types.ModuleType("ops")),
                         (interface.__name__, interface)):
        monkeypatch.setitem(sys.modules, name, module)
    kernel_available.cache_clear()


def test_a_mamba_ssm_whose_kernel_fails_is_not_used_and_warns_once(monkeypatch, caplog):
    """An install built for another torch or CUDA imports and then fails at its first call: the kernel is tried
    once, on a tiny scan, and the portable scan runs instead, with one warning."""
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    _fake_mamba_ssm(monkeypatch, broken)
    try:
        with caplog.at_level("WARNING", logger="mambaout.models.ssm"):
            assert not kernel_available(torch.device("cpu")) and not kernel_available(torch.device("cpu"))
        assert len(caplog.records) == 1 and "no kernel image" in caplog.records[0].getMessage()
        _fake_mamba_ssm(monkeypatch, lambda u, *args, **kwargs: u)
        assert kernel_available(torch.device("cpu"))
        monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", None)  # a broken import
        kernel_available.cache_clear()
        with caplog.at_level("WARNING", logger="mambaout.models.ssm"):
            assert not kernel_available(torch.device("cpu"))
        assert "does not import" in caplog.records[-1].getMessage()
    finally:
        kernel_available.cache_clear()


def test_the_chunk_is_the_devices():
    from mambaout.models import ssm

    assert ssm.chunk_for(torch.device("cpu")) == ssm.CHUNK_BY_DEVICE["cpu"] == 32
    assert ssm.chunk_for(torch.device("cuda")) == ssm.CHUNK_BY_DEVICE["cuda"]
    assert ssm.chunk_for(torch.device("meta")) == ssm.DEFAULT_CHUNK
