"""The selective scan (S6) of Mamba in portable PyTorch, with mamba_ssm's CUDA kernel used where it is installed,
and the token mixer that runs it over a 2D map in the orders of the visual Mambas (``SelectiveScan2d``).

``selective_scan`` has the semantics of ``mamba_ssm``'s ``selective_scan_fn`` for a real ``A``: for every channel
``d`` and state ``n``,

    x_t = exp(delta_t A) * x_{t-1} + delta_t B_t u_t,      y_t = <x_t, C_t> + D u_t,      out = y * silu(z)

with ``delta = softplus(delta + delta_bias)`` when asked, everything accumulated in fp32 (float64 inputs: float64).

The portable scan splits the sequence into chunks of ``chunk_size`` steps and writes its backward out: the
gradient of a linear recurrence is the same recurrence run backwards (transposed), so forward and backward are
one primitive each plus elementwise work and small GEMMs. Inside a chunk the recurrence runs step by step on
CPUs (one fused multiply-add per step: the least work) and as a parallel prefix scan elsewhere (log2(chunk)
rounds over the chunk, only products of decays, which cannot overflow); the chunks follow one another through
their end states. The forward keeps one state per chunk and the backward recomputes one chunk at a time, so
memory holds the inputs and one chunk's work: at stage-1 lengths (L = 3136 at 224 px) never a
``batch x L x D x N`` tensor (scripts/benchmark_ssm.py measures it). Shapes depend only on the input shapes, so
XLA compiles it.
"""
from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)

CHUNK_BY_DEVICE = {
    # on 2 CPU cores at L = 3136 (scripts/benchmark_ssm.py): 0.32 s and 218 MiB; 16: 0.45 s
    "cpu": 32,
    # not measured yet (no GPU has run it; scripts/gpu_check.sh's ssm-scan check times 32, 128 and 512): each
    # chunk is ~6 kernel launches per doubling round, so chunks of 32 launch ~40k kernels per femto_ssm forward
    # at 224 px; 128 cuts the chunks 4x for 2 more rounds, and one chunk's work stays well under 1 GB
    "cuda": 128,
}
DEFAULT_CHUNK = 32  # other devices (XLA: its graphs unroll the chunks, and CI's compile counts are taken at 32)
STEPWISE_DEVICES = {"cpu"}  # device types whose recurrence runs step by step (``_recurrence``)


def chunk_for(device: torch.device) -> int:
    """The portable scan's chunk length on ``device`` (``CHUNK_BY_DEVICE``)."""
    return CHUNK_BY_DEVICE.get(device.type, DEFAULT_CHUNK)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, chunk_size: int | None = None,
                   use_kernel: bool | None = None):
    """``u, delta, z``: (batch, D, L); ``A``: (D, N) real; ``B, C``: (batch, N, L); ``D, delta_bias``: (D,).

    Returns ``out`` (batch, D, L) in ``u``'s dtype, and the last state (batch, D, N) in fp32 (or float64) with
    ``return_last_state``. ``use_kernel``: mamba_ssm's CUDA kernel (default: when it is installed, works, and the
    tensors are on CUDA); otherwise the portable chunked scan, in chunks of ``chunk_size`` (default: the device's,
    ``chunk_for``).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if use_kernel is None:
        use_kernel = u.is_cuda and kernel_available(u.device)
    if use_kernel:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    dtype = u.dtype
    compute = torch.promote_types(dtype, torch.float32)  # fp32, or float64 for float64 inputs
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y, last_state = _chunked_scan(u, delta, A, B, C, chunk_size or chunk_for(u.device))
    if D is not None:
        y = y + D.to(compute)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(dtype)
    return (out, last_state) if return_last_state else out


@torch.compiler.assume_constant_result  # decided once, before tracing: compiled graphs hold the choice
@functools.lru_cache(maxsize=None)
def kernel_available(device: torch.device = torch.device("cuda")) -> bool:
    """Whether mamba_ssm's kernel (the optional extra ``ssm-cuda``) imports and runs on ``device``: tried once
    per device on a tiny scan, since a build for another torch or CUDA imports, or even loads, and then fails at
    its first call. When it does not, one warning, and the portable scan runs instead."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as error:
        if getattr(error, "name", None) != "mamba_ssm":  # installed but broken, not just absent
            _logger.warning("mamba_ssm is installed but does not import (%s): the portable selective scan runs "
                            "instead", error)
        return False
    except Exception as error:  # noqa: BLE001 - a binary built for another torch raises anything at load time
        _logger.warning("mamba_ssm does not load (%s: %s): the portable selective scan runs instead",
                        type(error).__name__, error)
        return False
    try:
        ones = torch.ones(1, 2, 4, device=device)
        selective_scan_fn(ones, ones, -torch.ones(2, 1, device=device), ones[:, :1], ones[:, :1])
    except Exception as error:  # noqa: BLE001 - CUDA, ABI and shape errors alike mean: do not use it
        _logger.warning("mamba_ssm's selective scan kernel fails on %s (%s: %s): the portable selective scan "
                        "runs instead", device, type(error).__name__, error)
        return False
    return True


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, D, L), got shape {list(u.shape)}")
    batch, channels, length = u.shape
    if A.dim() != 2 or A.shape[0] != channels or A.is_complex():
        raise ValueError(f"A must be real (D, N) = ({channels}, N), got {list(A.shape)} {A.dtype}")
    expected = {"delta": (delta, (batch, channels, length)), "B": (B, (batch, A.shape[1], length)),
                "C": (C, (batch, A.shape[1], length)), "z": (z, (batch, channels, length)),
                "D": (D, (channels,)), "delta_bias": (delta_bias, (channels,))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")


def _chunked_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y (batch, D, L) without the D and z terms, and the last state (batch, D, N)."""
    return _ChunkedScan.apply(u, delta, A, B, C, chunk_size)


class _ChunkedScan(torch.autograd.Function):
    """The scan chunk by chunk, with its backward written out: the gradient of a linear recurrence is the same
    recurrence run backwards, so forward and backward are one primitive (``_recurrence``) each plus elementwise
    work and small GEMMs per chunk. The forward keeps the state at each chunk's start; the backward recomputes one
    chunk's states at a time, last chunk first, so memory holds one chunk of ``batch x D x T x N`` tensors.

    Inside a chunk the tensors are time-major, (T, batch, D, N): each step is one contiguous slice."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk_size):
        starts = []  # the state entering each chunk
        state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        outputs = []
        du = delta * u
        for chunk in _chunks(u.shape[2], chunk_size):
            starts.append(state)
            delta_t, du_t, B_t, C_t = _time_major(chunk, delta, du, B, C)
            states = _chunk_states(state, delta_t, A, du_t, B_t)
            outputs.append(_readout(states, C_t))
            state = states[-1].clone()  # not a view: it would keep the chunk's states alive
        ctx.save_for_backward(u, delta, A, B, C, *starts)
        ctx.chunk_size = chunk_size
        return torch.cat(outputs).permute(1, 2, 0), state  # y: (batch, D, L)

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, *starts = ctx.saved_tensors
        grad_y = grad_y if grad_y is not None else torch.zeros_like(u)
        carry = grad_last if grad_last is not None else torch.zeros_like(starts[0])  # dL/dx of the chunk's end
        grad_A = torch.zeros_like(A)
        per_chunk = []
        du = delta * u
        for chunk, start in reversed(list(zip(_chunks(u.shape[2], ctx.chunk_size), starts))):
            grads, carry = _chunk_backward(start, A, *_time_major(chunk, delta, du, B, C, grad_y), carry)
            grad_A += grads.pop()
            per_chunk.append(grads)
        grad_du, grad_delta, grad_B, grad_C = (torch.cat(parts[::-1]).permute(1, 2, 0) for parts in zip(*per_chunk))
        return grad_du * delta, grad_delta + grad_du * u, grad_A, grad_B, grad_C, None


def _chunk_backward(start, A, delta, du, B, C, grad_y, carry):
    """One chunk's gradients (time-major) from its start state and ``carry``, dL/dx at its end: those of
    delta u, delta (through the decays), B, C and A, and dL/dx at the previous chunk's end."""
    decay = (delta[..., None] * A).exp_()
    states = _chunk_states(start, delta, A, du, B, decay)
    # dL/dx_t = C_t g_t + a_{t+1} dL/dx_{t+1}: the transposed recurrence, the carry entering at the end
    grads = grad_y[..., None] * C[:, :, None, :]
    grads[-1] += carry
    grads = _recurrence(decay, grads, transposed=True)
    carry = grads[0] * decay[0]
    grad_du = _contract_states(grads, B)  # sum over n of dL/dx_t B_t
    grad_B, grad_C = _contract_channels(grads, du), _contract_channels(states, grad_y)
    d_log_decay = grads.mul_(decay)  # dL/d(delta_t A) = dL/dx_t x_{t-1} a_t
    d_log_decay[1:] *= states[:-1]
    d_log_decay[0] *= start
    grad_delta = (d_log_decay * A).sum(-1)
    grad_A = torch.einsum("tbdn,tbd->dn", d_log_decay, delta)
    return [grad_du, grad_delta, grad_B, grad_C, grad_A], carry


def _chunks(length: int, chunk_size: int) -> list[slice]:
    """The time slices of the chunks; the last may be shorter (its shape still depends only on ``length``)."""
    return [slice(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]


def _time_major(chunk: slice, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The chunk's time slice of each (batch, C, L) tensor as (T, batch, C), contiguous."""
    return [t[..., chunk].permute(2, 0, 1).contiguous() for t in tensors]


def _chunk_states(start: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, du: torch.Tensor, B: torch.Tensor,
                  decay: torch.Tensor | None = None) -> torch.Tensor:
    """Every state x_t (T, batch, D, N) of a chunk from the state before it, ``x_t = exp(delta_t A) x_{t-1} +
    delta_t u_t B_t``; time-major inputs ``delta, du`` (T, batch, D), ``B`` (T, batch, N)."""
    if decay is None:
        decay = (delta[..., None] * A).exp_()
    inputs = du[..., None] * B[:, :, None, :]
    inputs[0] += decay[0] * start
    return _recurrence(decay, inputs)


def _readout(states: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """y_t = <x_t, C_t>: (T, batch, D, N), (T, batch, N) -> (T, batch, D). Elementwise, like the rest of the
    forward, so that ``models.info.count_macs`` counts the scan once, by its definition (``scan_macs``)."""
    return (states * C[:, :, None, :]).sum(-1)


def _contract_states(states: torch.Tensor, per_state: torch.Tensor) -> torch.Tensor:
    """sum over n of states[t, b, d, n] * per_state[t, b, n], as one batched GEMM: (T, batch, D)."""
    t, b, d, n = states.shape
    return torch.bmm(states.view(t * b, d, n), per_state.reshape(t * b, n, 1)).view(t, b, d)


def _contract_channels(states: torch.Tensor, per_channel: torch.Tensor) -> torch.Tensor:
    """sum over d of states[t, b, d, n] * per_channel[t, b, d], as one batched GEMM: (T, batch, N)."""
    t, b, d, n = states.shape
    return torch.bmm(per_channel.reshape(t * b, 1, d), states.view(t * b, d, n)).view(t, b, n)


def _recurrence(decay: torch.Tensor, inputs: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """x_t = decay_t x_{t-1} + inputs_t along dim 0 from x_{-1} = 0, in place of ``inputs``; ``transposed``: the
    recurrence's transpose (its gradient), x_t = decay_{t+1} x_{t+1} + inputs_t from the end.

    On a CPU step by step (one fused multiply-add per step over a contiguous slice: the least work); elsewhere by
    doubling spans (Hillis-Steele, log2(T) rounds of whole-chunk operations, which GPUs and XLA run in parallel):
    ``(a, b) then (a', b') = (a a', a' b + b')`` is associative, and in round ``s`` each step takes in the
    composite ending ``s`` steps before it. Only products of decays in (0, 1] appear: nothing overflows."""
    steps = inputs.shape[0]
    if inputs.device.type in STEPWISE_DEVICES:
        for t in (range(steps - 2, -1, -1) if transposed else range(1, steps)):
            inputs[t].addcmul_(decay[t + 1] if transposed else decay[t], inputs[t + 1] if transposed else inputs[t - 1])
        return inputs
    if transposed:  # the same recurrence on the reversed sequence, each step's decay taken from the next step
        shifted = torch.cat([decay[1:], torch.ones_like(decay[:1])])
        return _recurrence(shifted.flip(0), inputs.flip(0)).flip(0)
    span = 1
    while span < steps:
        inputs = torch.cat([inputs[:span], inputs[span:] + decay[span:] * inputs[:-span]])
        decay = torch.cat([decay[:span], decay[span:] * decay[:-span]])
        span *= 2
    return inputs


SCAN_ORDERS = {"1d": 1, "bidirectional": 2, "cross": 4}
"""How a 2D map becomes sequences, and how many: ``1d`` row-major (the Mamba block of the paper's figure);
``bidirectional`` row-major forwards and backwards (Vision Mamba); ``cross`` row- and column-major, each both
ways (VMamba's SS2D). Each direction has its own projections, decays and skip; their outputs are summed after the
reordering is undone."""


def scan_macs(batch: int, channels: int, length: int, states: int) -> int:
    """Multiply-accumulates of one selective scan by its definition, per token and channel: delta u and D u, and
    per state delta A, the decayed state plus its input, delta u B, and the readout C x."""
    return batch * length * channels * (4 * states + 2)


class SelectiveScan2d(nn.Module):
    """Mamba's S6 over the tokens of a channels-last map [B, H, W, C]: per direction, ``x_proj`` gives the
    input-dependent step size (through ``dt_proj``, rank ``dt_rank``), B and C from each token; ``A = -exp(A_log)``
    and ``D`` are learnt per channel. Initialised as Mamba initialises them (A = -(1..N), D = 1, step sizes
    log-uniform in [dt_min, dt_max] after the softplus)."""

    def __init__(self, channels: int, scan: str = "1d", d_state: int = 16, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        super().__init__()
        if scan not in SCAN_ORDERS:
            raise ValueError(f"scan order must be one of {sorted(SCAN_ORDERS)}, got {scan!r}")
        self.scan, self.d_state = scan, d_state
        self.dt_rank = dt_rank or math.ceil(channels / 16)
        directions = SCAN_ORDERS[scan]
        self.x_proj = nn.Parameter(torch.empty(directions, self.dt_rank + 2 * d_state, channels))
        self.dt_proj_weight = nn.Parameter(torch.empty(directions, channels, self.dt_rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(directions, channels))
        self.A_log = nn.Parameter(torch.empty(directions, channels, d_state))
        self.D = nn.Parameter(torch.empty(directions, channels))
        self.reset_parameters(dt_min, dt_max)

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        channels = self.D.shape[1]
        bound = channels ** -0.5  # nn.Linear's default for x_proj
        self.x_proj.uniform_(-bound, bound)
        self.dt_proj_weight.uniform_(-self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand_like(self.dt_proj_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        out = None
        for k, sequence in enumerate(self._sequences(x)):
            projected = torch.einsum("bcl,rc->brl", sequence, self.x_proj[k])
            dt, B, C = projected.split([self.dt_rank, self.d_state, self.d_state], dim=1)
            delta = torch.einsum("brl,cr->bcl", dt, self.dt_proj_weight[k])
            y = selective_scan(sequence, delta, -torch.exp(self.A_log[k].float()), B, C, self.D[k],
                               delta_bias=self.dt_proj_bias[k], delta_softplus=True)
            y = self._as_map(y, k, height, width)
            out = y if out is None else out + y
        return out

    def scan_macs(self, shape: torch.Size) -> int:
        """The MACs of this module's scans on a map of ``shape`` [B, H, W, C] (its projections are GEMMs, counted
        as such by ``models.info.count_macs``)."""
        batch, height, width, channels = shape
        return SCAN_ORDERS[self.scan] * scan_macs(batch, channels, height * width, self.d_state)

    def _sequences(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, H, W, C] -> the scan's sequences [B, C, L], direction by direction."""
        rows = x.permute(0, 3, 1, 2).flatten(2)
        if self.scan == "1d":
            return [rows]
        if self.scan == "bidirectional":
            return [rows, rows.flip(-1)]
        columns = x.permute(0, 3, 2, 1).flatten(2)
        return [rows, columns, rows.flip(-1), columns.flip(-1)]

    def _as_map(self, y: torch.Tensor, direction: int, height: int, width: int) -> torch.Tensor:
        """Direction ``direction``'s output sequence [B, C, L] back to a channels-last map [B, H, W, C]."""
        directions = SCAN_ORDERS[self.scan]
        if direction >= (directions + 1) // 2 and directions > 1:  # the reversed half
            y = y.flip(-1)
        if self.scan == "cross" and direction % 2 == 1:  # column-major
            return y.unflatten(2, (width, height)).permute(0, 3, 2, 1)
        return y.unflatten(2, (height, width)).permute(0, 2, 3, 1)
