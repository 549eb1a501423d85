"""The selective scan (S6) of Mamba in portable PyTorch, with mamba_ssm's CUDA kernel used where it is installed,
and the token mixer that runs it over a 2D map in the orders of the visual Mambas (``SelectiveScan2d``).

``selective_scan`` has the semantics of ``mamba_ssm``'s ``selective_scan_fn`` for a real ``A``: for every channel
``d`` and state ``n``,

    x_t = exp(delta_t A) * x_{t-1} + delta_t B_t u_t,      y_t = <x_t, C_t> + D u_t,      out = y * silu(z)

with ``delta = softplus(delta + delta_bias)`` when asked, everything accumulated in fp32 (float64 inputs: float64).

The portable scan splits the sequence into chunks of ``chunk_size`` steps. Inside a chunk every step is computed
at once by a parallel prefix scan (log2(chunk) rounds over the chunk, only products of decays, which cannot
overflow); the chunks follow one another through their end states. Each chunk is recomputed in the backward
pass (activation checkpointing), so memory holds the inputs, one state per chunk and one chunk's work: at
stage-1 lengths (L = 3136 at 224 px) never a ``batch x L x D x N`` tensor (scripts/benchmark_ssm.py measures
it). Shapes depend only on the input shapes (the sequence is padded to whole chunks), so XLA compiles it.
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 32  # on 2 CPU cores at L = 3136: 3.7 s and 176 MiB, against 5.4 s and 307 MiB for 128


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, chunk_size: int = DEFAULT_CHUNK,
                   use_kernel: bool | None = None):
    """``u, delta, z``: (batch, D, L); ``A``: (D, N) real; ``B, C``: (batch, N, L); ``D, delta_bias``: (D,).

    Returns ``out`` (batch, D, L) in ``u``'s dtype, and the last state (batch, D, N) in fp32 (or float64) with
    ``return_last_state``. ``use_kernel``: mamba_ssm's CUDA kernel (default: when it is installed and the tensors
    are on CUDA); otherwise the portable chunked scan.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if use_kernel is None:
        use_kernel = u.is_cuda and kernel_available()
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
    y, last_state = _chunked_scan(u, delta, A, B, C, chunk_size)
    if D is not None:
        y = y + D.to(compute)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(dtype)
    return (out, last_state) if return_last_state else out


def kernel_available() -> bool:
    """Whether mamba_ssm (the optional extra ``ssm-cuda``) is installed."""
    return importlib.util.find_spec("mamba_ssm") is not None


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
    batch, channels, length = u.shape
    chunk_size = min(chunk_size, length)  # a short sequence (a late stage's map) is one chunk, unpadded
    pad = -length % chunk_size
    if pad:  # delta 0 on the padding: decay 1, input 0, so the last state is that of the true last step
        u, delta, B, C = (F.pad(t, (0, pad)) for t in (u, delta, B, C))
    state = u.new_zeros(batch, channels, A.shape[1])
    outputs = []
    for start in range(0, length + pad, chunk_size):
        parts = [t[..., start:start + chunk_size] for t in (u, delta, B, C)]
        if torch.is_grad_enabled() and pad + length > chunk_size:  # one chunk: nothing to save by recomputing
            y, state = checkpoint(_scan_chunk, state, *parts, A, use_reentrant=False)
        else:
            y, state = _scan_chunk(state, *parts, A)
        outputs.append(y)
    return torch.cat(outputs, dim=-1)[..., :length], state


def _scan_chunk(state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of T steps from ``state`` (batch, D, N): every step's output (batch, D, T) and the end state.

    The recurrence ``x_t = a_t x_{t-1} + b_t`` composes associatively, ``(a, b) then (a', b') = (a a', a' b + b')``,
    so log2(T) rounds of doubling span (Hillis-Steele) give every prefix at once: in round ``s`` each step takes
    in the composite ending ``s`` steps before it. Only products of decays in (0, 1] appear: nothing overflows.
    """
    decay = torch.exp(delta[..., None] * A[:, None, :])  # a_t: (batch, D, T, N)
    inputs = (delta * u)[..., None] * B.transpose(1, 2)[:, None]  # b_t = delta_t B_t u_t: (batch, D, T, N)
    span = 1
    while span < decay.shape[2]:
        earlier_inputs = F.pad(inputs[:, :, :-span], (0, 0, span, 0))  # before the chunk: the identity (1, 0)
        earlier_decay = F.pad(decay[:, :, :-span], (0, 0, span, 0), value=1.0)
        inputs = inputs + decay * earlier_inputs
        decay = decay * earlier_decay
        span *= 2
    states = inputs + decay * state[:, :, None, :]  # now decay_t = a_1...a_t: the start state carried to t
    y = (states * C.transpose(1, 2)[:, None]).sum(-1)  # elementwise, like the rest: scan_macs counts the scan
    return y, states[:, :, -1].clone()  # not a view: it would keep the whole chunk alive


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
