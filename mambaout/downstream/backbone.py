"""A MambaOut as a dense-prediction backbone: its four stage maps, each through a LayerNorm of its own.

The MambaOut authors fine-tuned for detection and segmentation with Swin's configs and a LayerNorm added on each
stage output (their answer in the reference repository's issue #251); this module is that backbone, for any of
our variants and any ImageNet weights ``mambaout.create_model`` reads (a train.py checkpoint, the release files in
either key layout, timm's).
"""
from __future__ import annotations

import os

import torch
from timm.layers import LayerNorm
from torch import nn

from ..models import create_model
from ..models.mambaout import VARIANTS


class MambaOutBackbone(nn.Module):
    """[B, 3, H, W] images -> four [B, C_i, H / s_i, W / s_i] maps (strides ``s_i`` = 4, 8, 16, 32), normalised.

    ``out_channels`` lists the maps' channels (the stage widths), ``strides`` their strides. ``body`` is the
    MambaOut (no head) whose stage outputs the norms take; ``overrides`` go to ``create_model`` (e.g.
    ``drop_path_rate``, or ``depths``/``dims`` of a custom width).
    """

    def __init__(self, model_name: str, checkpoint: str | os.PathLike | None = None, **overrides) -> None:
        super().__init__()
        if model_name not in VARIANTS:
            raise ValueError(f"the backbone must be a MambaOut variant ({', '.join(VARIANTS)}), got {model_name!r}")
        self.body = create_model(model_name, checkpoint=checkpoint, features_only=True, **overrides)
        self.out_channels = [info["num_chs"] for info in self.body.feature_info]
        self.strides = [info["reduction"] for info in self.body.feature_info]
        self.norms = nn.ModuleList(LayerNorm(channels) for channels in self.out_channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = self.body.forward_intermediates(images, output_fmt="NHWC", intermediates_only=True)
        # normalised channels-last (where the LayerNorm reads contiguous channels), handed on as NCHW views
        return [norm(x).permute(0, 3, 1, 2) for norm, x in zip(self.norms, maps)]
