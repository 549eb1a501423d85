"""Model size: parameters and multiply-accumulates.

MACs are counted with torch.utils.flop_counter.FlopCounterMode (MACs = FLOPs / 2). Like fvcore, which the
MetaFormer family of papers uses, LayerNorm counts as 5 MACs per element (4 without affine parameters);
elementwise ops, activations and pooling are free. A selective scan (the SSM of the ``_ssm`` variants) counts by
its definition (``ssm.scan_macs``: 4 N + 2 per token and channel), whatever the implementation computes.
"""
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mambaout.models.ssm import SelectiveScan2d


def _layer_norm_flops(input_shape, normalized_shape, weight_shape=None, *args, **kwargs) -> int:
    elements = 1
    for size in input_shape:
        elements *= size
    return 2 * (5 if weight_shape is not None else 4) * elements  # doubled: halved again as MACs = FLOPs / 2


def count_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass of a single image (the model may be on any device,
    the meta device included: the count needs shapes only)."""
    device = next(model.parameters()).device
    images = torch.empty(1, in_chans, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.native_layer_norm: _layer_norm_flops})
    scans: list[int] = []
    hooks = [module.register_forward_hook(lambda mixer, args, out: scans.append(mixer.scan_macs(args[0].shape)))
             for module in model.modules() if isinstance(module, SelectiveScan2d)]
    try:
        with counter, torch.no_grad():
            model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() // 2 + sum(scans)
