"""MambaOut: Gated CNN image classifiers ("MambaOut: Do We Really Need Mamba for Vision?", Yu & Wang, 2024).

https://arxiv.org/abs/2405.07992

Module and parameter names follow timm's ``mambaout_*`` models, so timm/hub weights load as they are and the
original release converts by a fixed prefix table (``mambaout.checkpoint``). Activations are channels-last
``[B, H, W, C]`` between the stem and the head; only the convolutions see ``[B, C, H, W]`` views.

Stochastic depth and head dropout take their decisions as an input in training (``drop_draws``: one uniform
value per sample and drop site, drawn on the host from the sample's key, docs/DESIGN.md), so no device
generator is involved; without it they draw like timm's DropPath/Dropout.
"""
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm, LayerScale, get_act_layer, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from mambaout.models.published import PUBLISHED
from mambaout.models.ssm import SelectiveScan2d

__all__ = ['MambaOut', 'VARIANTS', 'PRETRAINED_CFGS']

ActLayer = str | Callable[[], nn.Module]

# timm's `_rw` variants: stem without mid norm, norm-first downsample, LayerScale, head without hidden norm.
_RW = dict(stem_mid_norm=False, downsample_norm_first=True, ls_init_value=1e-6, head_hidden_norm=False)
_BASE_DIMS = (128, 256, 512, 768)

BLOCK_FORMS = ('auto', 'sliced', 'dense')
# The block formulation `auto` takes per device type (GatedConvBlock): sliced is measured faster on CPUs;
# dense is the choice for the rest until scripts/benchmark_model.py --device cuda measures otherwise. XLA
# fuses either into the same kind of graph and keeps the sliced form its tests were measured with.
AUTO_BLOCK_FORM = {'cpu': 'sliced', 'xla': 'sliced', 'cuda': 'dense'}
# Below this many rows (batch x height x width) in its GEMMs a block takes the dense form on these devices: the
# sliced form's extra GEMMs cost more in per-op overhead than its saved copies. Measured on 2 CPU cores, fwd+bwd
# of one block at batch 64 (scripts/benchmark_model.py gives the whole model): sliced/dense time 1.03-1.06
# at 1024 and 4096 rows, 0.76-0.96 from 16384 rows on, for femto's widths 48-288. At 32 px (the quickstart) every
# block is below it: the whole femto step 1.07x faster; from 64 px on, stage 1 stays sliced.
SLICED_MIN_ROWS = {'cpu': 8192}

# Name -> MambaOut(**settings). The first five are the paper's models, then timm's experiments, then the Mamba
# twins of the paper's ablation (the SSM put back into every block; same depths and dims; no released weights).
VARIANTS: dict[str, dict] = {
    'mambaout_femto': dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 288)),
    'mambaout_kobe': dict(depths=(3, 3, 15, 3), dims=(48, 96, 192, 288)),  # Kobe memorial: 24 blocks
    'mambaout_tiny': dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 576)),
    'mambaout_small': dict(depths=(3, 4, 27, 3), dims=(96, 192, 384, 576)),
    'mambaout_base': dict(depths=(3, 4, 27, 3), dims=_BASE_DIMS),
    'mambaout_small_rw': dict(depths=(3, 4, 27, 3), dims=(96, 192, 384, 576), **_RW),
    'mambaout_base_short_rw': dict(
        depths=(3, 3, 25, 3), dims=_BASE_DIMS, expansion_ratio=3.0, conv_ratio=1.25, **_RW),
    'mambaout_base_tall_rw': dict(
        depths=(3, 4, 30, 3), dims=_BASE_DIMS, expansion_ratio=2.5, conv_ratio=1.25, **_RW),
    'mambaout_base_wide_rw': dict(
        depths=(3, 4, 27, 3), dims=_BASE_DIMS, expansion_ratio=3.0, conv_ratio=1.5, act_layer='silu', **_RW),
    'mambaout_base_plus_rw': dict(
        depths=(3, 4, 30, 3), dims=_BASE_DIMS, expansion_ratio=3.0, conv_ratio=1.5, act_layer='silu', **_RW),
    'mambaout_femto_ssm': dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 288), ssm_scan='bidirectional'),
    'mambaout_tiny_ssm': dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 576), ssm_scan='bidirectional'),
}


def _cfg(**overrides) -> dict:
    """A pretrained config in timm's format: how the weights were trained and should be evaluated."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'test_input_size': (3, 288, 288), 'pool_size': (7, 7),
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'head.fc', 'license': 'apache-2.0',
        **overrides,
    }


# Name -> config of its default pretrained weights (the `_rw` tags are timm's).
PRETRAINED_CFGS: dict[str, dict] = {
    **{name: _cfg(url=p.release_url, hf_hub_id=p.hub_id) for name, p in PUBLISHED.items()},
    'mambaout_small_rw': _cfg(hf_hub_id='timm/mambaout_small_rw.sw_e450_in1k'),
    'mambaout_base_short_rw': _cfg(
        hf_hub_id='timm/mambaout_base_short_rw.sw_e500_in1k', crop_pct=0.95, test_crop_pct=1.0),
    'mambaout_base_tall_rw': _cfg(
        hf_hub_id='timm/mambaout_base_tall_rw.sw_e500_in1k', crop_pct=0.95, test_crop_pct=1.0),
    'mambaout_base_wide_rw': _cfg(
        hf_hub_id='timm/mambaout_base_wide_rw.sw_e500_in1k', crop_pct=0.95, test_crop_pct=1.0),
    'mambaout_base_plus_rw': _cfg(hf_hub_id='timm/mambaout_base_plus_rw.sw_e150_in12k_ft_in1k'),
    'mambaout_femto_ssm': _cfg(),
    'mambaout_tiny_ssm': _cfg(),
}


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    # A view: convolutions then run in channels_last memory format, without a copy.
    return x.permute(0, 3, 1, 2)


def _to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class Stem(nn.Module):
    """Two stride-2 3x3 convs: [B, C_in, H, W] -> [B, H/4, W/4, C]."""

    def __init__(self, in_chans: int, dim: int, act_layer: Callable[[], nn.Module], mid_norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = LayerNorm(dim // 2) if mid_norm else nn.Identity()
        self.act = act_layer()
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.contiguous(memory_format=torch.channels_last))
        x = self.act(self.norm1(_to_nhwc(x)))
        x = self.conv2(_to_nchw(x))
        return self.norm2(_to_nhwc(x))


class Downsample(nn.Module):
    """Stride-2 3x3 conv between stages with a LayerNorm after it, or before it for the `_rw` variants."""

    def __init__(self, in_dim: int, out_dim: int, norm_first: bool = False):
        super().__init__()
        self.norm_first = norm_first
        # Registered in data-flow order, so state_dict keys come in timm's order.
        if norm_first:
            self.norm = LayerNorm(in_dim)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        if not norm_first:
            self.norm = LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            return _to_nhwc(self.conv(_to_nchw(self.norm(x))))
        return self.norm(_to_nhwc(self.conv(_to_nchw(x))))


class GatedConvBlock(nn.Module):
    """Gated CNN block: ``x + fc2(act(g) * cat(i, dwconv(c)))`` with ``g, i, c = fc1(norm(x))``.

    With ``ssm_scan`` (``ssm.SCAN_ORDERS``) it is the Mamba block of the paper's figure: the conv's output goes
    through the activation and a selective scan (``ssm.SelectiveScan2d``, ``ssm_state`` states) before the gate.

    ``fc1``'s output rows are ``[g | i | c]`` (``hidden``, ``hidden - conv_channels``, ``conv_channels``). Two
    formulations compute the block, equal up to float rounding, with the same weights (``block_form``):

    - ``sliced``: four row slices of ``fc1`` and two column slices of ``fc2``: every activation a dense tensor,
      the depthwise conv reads its input in place, no split/cat copies forwards or backwards (those copies
      dominated the step on CPU: 1.11-1.33x timm's model there). Each slice reads the activations again.
    - ``dense``: ``fc1`` as two contiguous row slices (the gates, then ``[i | c]``) and ``fc2`` as one GEMM over
      the concatenated gated output: fewer, larger GEMMs and fewer passes over the activations, for GPUs.

    ``auto`` picks ``AUTO_BLOCK_FORM`` by the input's device, dense below ``SLICED_MIN_ROWS`` rows
    (``scripts/benchmark_model.py`` measures both).
    """

    def __init__(
            self,
            dim: int,
            expansion_ratio: float = 8 / 3,
            conv_ratio: float = 1.0,
            kernel_size: int = 7,
            act_layer: Callable[[], nn.Module] = nn.GELU,
            ls_init_value: float | None = None,
            drop_path: float = 0.,
            ssm_scan: str | None = None,
            ssm_state: int = 16,
    ):
        super().__init__()
        hidden = int(expansion_ratio * dim)
        conv_channels = int(conv_ratio * dim)
        gated_identity = hidden - conv_channels
        # Row ranges of fc1 for the gate of i, the gate of c, i and c.
        self.fc1_bounds = (0, gated_identity, hidden, hidden + gated_identity, 2 * hidden)
        self.norm = LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = act_layer()
        self.conv = nn.Conv2d(
            conv_channels, conv_channels, kernel_size, padding=kernel_size // 2, groups=conv_channels)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        # the Mamba block: an SSM after the token-mixing conv and its activation (SelectiveScan2d)
        self.ssm = SelectiveScan2d(conv_channels, ssm_scan, ssm_state) if ssm_scan else None
        self.block_form = "auto"

    def forward(self, x: torch.Tensor, draw: torch.Tensor | None = None) -> torch.Tensor:
        form = self._auto_form(x) if self.block_form == "auto" else self.block_form
        y = self.norm(x)
        out = self._sliced(y) if form == "sliced" else self._dense(y)
        return x + self.drop(self.ls(out.view_as(x)), draw)

    @staticmethod
    def _auto_form(x: torch.Tensor) -> str:
        """``AUTO_BLOCK_FORM`` of the device, dense below its ``SLICED_MIN_ROWS``."""
        form = AUTO_BLOCK_FORM.get(x.device.type, "sliced")
        if form == "sliced" and x.numel() // x.shape[-1] < SLICED_MIN_ROWS.get(x.device.type, 0):
            return "dense"
        return form

    def _sliced(self, y: torch.Tensor) -> torch.Tensor:
        w1, b1, w2 = self.fc1.weight, self.fc1.bias, self.fc2.weight
        gate_i, gate_c, i, c = (F.linear(y, w1[start:stop], b1[start:stop])
                                for start, stop in pairwise(self.fc1_bounds))
        c = self._mix_tokens(c)
        split = i.shape[-1]
        out = F.linear(self.act(gate_c) * c, w2[:, split:], self.fc2.bias)
        # fc2 over the i half accumulates onto `out` inside the GEMM (addmm), saving a separate add.
        return torch.addmm(out.flatten(0, -2), (self.act(gate_i) * i).flatten(0, -2), w2[:, :split].t())

    def _dense(self, y: torch.Tensor) -> torch.Tensor:
        w1, b1 = self.fc1.weight, self.fc1.bias
        _, split, hidden, _, _ = self.fc1_bounds
        gates = self.act(F.linear(y, w1[:hidden], b1[:hidden]))
        i, c = F.linear(y, w1[hidden:], b1[hidden:]).split([split, hidden - split], dim=-1)
        c = self._mix_tokens(c)
        return self.fc2(gates * torch.cat([i, c], dim=-1))

    def _mix_tokens(self, c: torch.Tensor) -> torch.Tensor:
        """The depthwise conv over the map, then (a Mamba block) the activation and the SSM."""
        c = _to_nhwc(self.conv(_to_nchw(c)))
        return c if self.ssm is None else self.ssm(self.act(c))

    def drop(self, branch: torch.Tensor, draw: torch.Tensor | None) -> torch.Tensor:
        """Stochastic depth of the residual branch: from the sample's ``draw`` ([B] uniforms) when given,
        else timm's DropPath. 1/keep stays fp32 (timm rounds it to the branch's dtype under autocast)."""
        if draw is None or not self.training or not isinstance(self.drop_path, DropPath):
            return self.drop_path(branch)
        return branch * keyed_keep_scale(draw, self.drop_path.drop_prob).view(-1, 1, 1, 1)


class MambaOutStage(nn.Module):
    """An optional downsample followed by Gated CNN blocks; channels-last in and out."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            drop_path_rates: Sequence[float],
            downsample: bool = True,
            downsample_norm_first: bool = False,
            **block_kwargs,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_dim, dim, downsample_norm_first) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[GatedConvBlock(dim, drop_path=rate, **block_kwargs) for rate in drop_path_rates])

    def forward(self, x: torch.Tensor, draws: torch.Tensor | None = None) -> torch.Tensor:
        """``draws``: [B, depth] drop decisions of this stage's blocks, or None."""
        x = self.downsample(x)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            draw = None if draws is None else draws[:, index]
            # The draws are inputs, so a recomputed block drops the same samples as its first run.
            x = checkpoint(block, x, draw, use_reentrant=False) if recompute else block(x, draw)
        return x


class MlpHead(nn.Module):
    """Average pool -> LayerNorm -> Linear(D, 4D) -> GELU [-> LayerNorm] -> Dropout -> Linear(4D, classes).

    The paper's head has the hidden LayerNorm; timm's `_rw` variants leave it out.
    """

    def __init__(self, dim: int, num_classes: int, hidden_norm: bool = True, drop_rate: float = 0.):
        super().__init__()
        self.num_features = 4 * dim
        self.norm = LayerNorm(dim)
        layers = [('fc', nn.Linear(dim, self.num_features)), ('act', nn.GELU())]
        if hidden_norm:
            layers.append(('norm', LayerNorm(self.num_features)))
        self.pre_logits = nn.Sequential(OrderedDict(layers))
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False, draws: torch.Tensor | None = None) -> torch.Tensor:
        """``draws``: [B, num_features] dropout decisions (training), or None for torch's Dropout."""
        x = self.pre_logits(self.norm(x.mean((1, 2))))
        if draws is None or not self.training or self.dropout.p == 0:
            x = self.dropout(x)
        else:
            x = x * keyed_keep_scale(draws, self.dropout.p)
        return x if pre_logits else self.fc(x)


def keyed_keep_scale(draws: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """``1/keep`` (fp32) where a draw is below ``keep = 1 - drop_prob``, else 0: inverted dropout from given
    uniforms."""
    keep = 1.0 - drop_prob
    return torch.where(draws < keep, 1.0 / keep, 0.0).to(torch.float32)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MambaOut(nn.Module):
    """MambaOut image classifier: stem, four stages of Gated CNN blocks, MLP head.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 keeps the head up to its hidden features (no classifier).
        depths: blocks per stage.
        dims: channels per stage.
        expansion_ratio: block hidden width / dim.
        conv_ratio: channels that go through the depthwise conv / dim.
        kernel_size: depthwise conv kernel.
        act_layer: activation of stem and blocks (name or class); the head always uses GELU.
        stem_mid_norm: LayerNorm between the two stem convs.
        downsample_norm_first: normalise before the downsample conv instead of after it.
        ls_init_value: LayerScale init on each block's residual branch; None for no LayerScale.
        head_hidden_norm: LayerNorm on the head's hidden features.
        head_dropout: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block; rates rise linearly from 0 over all blocks.
        ssm_scan: None (MambaOut: Gated CNN blocks), or the scan order of Mamba blocks: an SSM after each block's
            token-mixing conv ('1d', 'bidirectional', 'cross'; see ``ssm.SCAN_ORDERS``).
        ssm_stages: the stages (0-3) whose blocks get the SSM; None for all.
        ssm_state: the SSM's state size N.
        features_only: build no head; ``forward`` returns the four stage maps (see ``forward_intermediates``).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            depths: Sequence[int] = (3, 3, 9, 3),
            dims: Sequence[int] = (96, 192, 384, 576),
            expansion_ratio: float = 8 / 3,
            conv_ratio: float = 1.0,
            kernel_size: int = 7,
            act_layer: ActLayer = 'gelu',
            stem_mid_norm: bool = True,
            downsample_norm_first: bool = False,
            ls_init_value: float | None = None,
            head_hidden_norm: bool = True,
            head_dropout: float = 0.,
            drop_path_rate: float = 0.,
            ssm_scan: str | None = None,
            ssm_stages: Sequence[int] | None = None,
            ssm_state: int = 16,
            features_only: bool = False,
    ):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f'depths {tuple(depths)} and dims {tuple(dims)} must have the same length')
        act_layer = get_act_layer(act_layer)
        self.in_chans = in_chans
        self.num_classes = 0 if features_only else num_classes
        self.features_only = features_only
        self.num_features = dims[-1]
        self.pretrained_cfg = _cfg()

        self.stem = Stem(in_chans, dims[0], act_layer, mid_norm=stem_mid_norm)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').split(list(depths))
        in_dims = (dims[0], *dims[:-1])
        self.stages = nn.Sequential(*[
            MambaOutStage(
                in_dim, dim, stage_rates.tolist(),
                downsample=index > 0,
                downsample_norm_first=downsample_norm_first,
                expansion_ratio=expansion_ratio,
                conv_ratio=conv_ratio,
                kernel_size=kernel_size,
                act_layer=act_layer,
                ls_init_value=ls_init_value,
                ssm_scan=ssm_scan if ssm_stages is None or index in ssm_stages else None,
                ssm_state=ssm_state,
            )
            for index, (in_dim, dim, stage_rates) in enumerate(zip(in_dims, dims, rates, strict=True))
        ])
        self.feature_info = [
            dict(num_chs=dim, reduction=2 ** (index + 2), module=f'stages.{index}') for index, dim in enumerate(dims)]
        self.head = None if features_only else MlpHead(
            dims[-1], num_classes, hidden_norm=head_hidden_norm, drop_rate=head_dropout)
        self.head_hidden_size = None if features_only else self.head.num_features
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in depth order, as timm's MetaFormer-style models define them (layer-wise lr decay,
        timm's optimizer factories): the stem, then each stage (coarse) or each block, a stage's downsample with
        its first block; what matches nothing (the head) comes last."""
        blocks = r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)),
            (r'^stages\.(\d+)\.blocks\.(\d+)', None),
        ]
        return dict(stem=r'^stem', blocks=blocks)

    def no_weight_decay(self) -> set[str]:
        """The SSM's decays and skips, which Mamba trains without weight decay (the optimizer's exclusions)."""
        return {name for name, _ in self.named_parameters() if name.endswith(('.A_log', '.D'))}

    def set_block_form(self, form: str) -> None:
        """The formulation of every Gated CNN block (``BLOCK_FORMS``; the weights are the same)."""
        if form not in BLOCK_FORMS:
            raise ValueError(f'block form must be one of {BLOCK_FORMS}, got {form!r}')
        for stage in self.stages:
            for block in stage.blocks:
                block.block_form = form

    def get_classifier(self) -> nn.Module:
        """The final Linear of the head (timm's interface)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final Linear with a freshly initialised one (Identity for 0 classes)."""
        self.num_classes = num_classes
        if num_classes > 0:
            like = self.head.norm.weight  # same device and dtype as the rest of the head
            fc = nn.Linear(self.head.num_features, num_classes, device=like.device, dtype=like.dtype)
            _init_weights(fc)
        else:
            fc = nn.Identity()
        self.head.fc = fc.train(self.training)

    @property
    def num_drop_sites(self) -> int:
        """Columns of ``drop_draws``: one per block, then one per head feature when the head has dropout; 0
        when nothing in the model is random."""
        blocks = [block for stage in self.stages for block in stage.blocks]
        head_sites = self.head.num_features if self.head is not None and self.head.dropout.p > 0 else 0
        if head_sites == 0 and not any(isinstance(block.drop_path, DropPath) for block in blocks):
            return 0
        return len(blocks) + head_sites

    def forward_features(self, x: torch.Tensor, drop_draws: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] images -> [B, H/32, W/32, dims[-1]] (channels-last) features. ``drop_draws``: the
        blocks' columns of ``forward``'s."""
        x = self.stem(x)
        start = 0
        for stage in self.stages:
            depth = len(stage.blocks)
            x = stage(x, None if drop_draws is None else drop_draws[:, start:start + depth])
            start += depth
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, drop_draws: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Features -> logits, or the head's hidden features [B, 4 * dims[-1]] with ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits, draws=drop_draws)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | Sequence[int] | None = None,
            output_fmt: str = 'NCHW',
            stop_early: bool = False,
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32), timm's interface.

        Args:
            indices: stages to return: all if None, the last n if an int, else these indices.
            output_fmt: 'NCHW' (channels-first) or 'NHWC'.
            stop_early: skip the stages after the last one requested.
            intermediates_only: return only the list of maps, not ``(final features, maps)``.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take = _take_indices(len(self.stages), indices)
        stages = self.stages[:max(take) + 1] if stop_early or intermediates_only else self.stages
        maps = []
        x = self.stem(x)
        for index, stage in enumerate(stages):
            x = stage(x)
            if index in take:
                maps.append(_to_nchw(x).contiguous() if output_fmt == 'NCHW' else x)
        return maps if intermediates_only else (x, maps)

    def forward(self, x: torch.Tensor, drop_draws: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """``drop_draws``: [B, num_drop_sites] uniforms in [0, 1) that decide, per sample, stochastic depth
        (column i: block i, counted over all stages) and head dropout (the columns after the blocks) in
        training; None draws them like timm."""
        if self.features_only:
            return self.forward_intermediates(x, intermediates_only=True)
        if drop_draws is not None and drop_draws.shape != (x.shape[0], self.num_drop_sites):
            raise ValueError(f'drop_draws must have shape [batch, num_drop_sites] = '
                             f'[{x.shape[0]}, {self.num_drop_sites}], got {list(drop_draws.shape)}')
        num_blocks = sum(len(stage.blocks) for stage in self.stages)
        head_draws = None if drop_draws is None or drop_draws.shape[1] == num_blocks else drop_draws[:, num_blocks:]
        return self.forward_head(self.forward_features(x, drop_draws), drop_draws=head_draws)


def _take_indices(num_stages: int, indices: int | Sequence[int] | None) -> list[int]:
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        indices = range(num_stages - indices, num_stages)
    if not all(-num_stages <= index < num_stages for index in indices):
        raise ValueError(f'stage indices {list(indices)} out of range for {num_stages} stages')
    return [index % num_stages for index in indices]  # negative indices count from the end
