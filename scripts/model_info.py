#!/usr/bin/env python3
"""Parameters and MACs per model at a given resolution, next to the paper's figures.

MACs are counted with torch.utils.flop_counter.FlopCounterMode (MACs = FLOPs / 2) on the meta device, so no
memory is allocated and nothing is computed. Like fvcore, which the MetaFormer family of papers uses, LayerNorm
counts as 5 MACs per element (4 without affine parameters); elementwise ops, activations and pooling are free.
The paper prints GMACs to one decimal, so its figures are only exact to +-0.05G.

    python scripts/model_info.py --img-size 224 --models mambaout_femto mambaout_small_rw
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mambaout import create_model, list_models  # noqa: E402
from mambaout.models.info import count_macs  # noqa: E402
from mambaout.models.published import PUBLISHED  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--models', nargs='+', default=[*PUBLISHED, *list_models('*_ssm')],
                        help='names for create_model (default: the published variants and their Mamba twins)')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    compare = args.img_size == 224  # the paper's MACs are for 224 x 224
    print(f'{"model":<24}{"params":>13}{"paper":>13}{"GMACs":>9}{"paper":>8}{"diff":>8}  @{args.img_size}px')
    for name in args.models:
        with torch.device('meta'):
            model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        gmacs = count_macs(model, args.img_size) / 1e9
        published = PUBLISHED.get(name)
        row = f'{name:<24}{params:>13,}'
        if published is None:
            row += f'{"-":>13}{gmacs:>9.3f}'
        else:
            row += f'{published.params:>13,}{gmacs:>9.3f}'
            if compare:
                row += f'{published.gmacs:>8.1f}{100 * (gmacs / published.gmacs - 1):>+7.1f}%'
        print(row)


if __name__ == '__main__':
    main()
