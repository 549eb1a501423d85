#!/usr/bin/env python3
"""Training-step throughput of our MambaOut (each block formulation) against timm's, same variant, weights and
batch, on CPU or a GPU, eager or compiled.

Forward + backward steps of the models alternate (the order flips every round), after a warm-up, so drifts
in machine load hit all alike; each model's time is the median over the rounds. Prints img/s of each and the
ratio to timm (above 1.0: faster than timm), and which block formulation wins on this device
(``mambaout.models.mambaout.AUTO_BLOCK_FORM`` records the winners).

    python scripts/benchmark_model.py --model mambaout_femto --batch-size 32 --img-size 224
    python scripts/benchmark_model.py --model mambaout_small --batch-size 128 --device cuda --precision bf16 \
        --channels-last [--compile]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mambaout import create_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='mambaout_femto', help='a MambaOut variant that timm also has')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--channels-last', action='store_true', help='channels_last input and weights')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--precision', default='fp32', choices=('fp32', 'bf16', 'fp16'), help='autocast dtype')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model first')
    parser.add_argument('--rounds', type=int, default=5, help='timed steps per model')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per model first')
    return parser.parse_args()


def train_step(model: nn.Module, images: torch.Tensor, precision: str) -> float:
    """One forward + backward pass; returns its wall time in seconds (the device's work included)."""
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        loss = model(images).float().sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build_models(args: argparse.Namespace) -> dict[str, nn.Module]:
    """timm's model and ours in each block formulation, with the same weights, on the device."""
    torch.manual_seed(0)
    reference = timm.create_model(args.model, pretrained=False)
    models = {'timm': reference}
    for form in ('sliced', 'dense'):
        ours = create_model(args.model)
        ours.load_state_dict(reference.state_dict())
        ours.set_block_form(form)
        models[f'ours {form}'] = ours
    for name, model in models.items():
        model.to(args.device).train()
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if args.compile:
            models[name] = torch.compile(model)
    return models


def main() -> None:
    args = parse_args()
    models = build_models(args)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    for _ in range(args.warmup):
        for model in models.values():
            train_step(model, images, args.precision)
    times = {name: [] for name in models}
    for round_index in range(args.rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(train_step(models[name], images, args.precision))

    throughput = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    where = (torch.cuda.get_device_name() if args.device.startswith('cuda')
             else f'{torch.get_num_threads()} CPU threads')
    print(f'{args.model}, batch {args.batch_size}, {args.img_size}px, {args.precision}, '
          f'{"channels_last, " if args.channels_last else ""}{"compiled, " if args.compile else "eager, "}{where}, '
          f'{args.rounds} rounds (median)')
    for name, value in throughput.items():
        print(f'  {name:>11}: {value:8.2f} img/s (fwd+bwd), {value / throughput["timm"]:.3f}x timm')
    faster = max(('sliced', 'dense'), key=lambda form: throughput[f'ours {form}'])
    print(f'  faster block form here: {faster}')


if __name__ == '__main__':
    main()
