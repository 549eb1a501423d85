#!/usr/bin/env python3
"""Training-step throughput of our MambaOut against timm's, same variant, weights and batch, on CPU.

Forward + backward steps of the two models alternate (the order flips every round), after a warm-up, so drifts
in machine load hit both alike; each model's time is the median over the rounds. Prints img/s of both and the
ratio ours / timm (above 1.0: ours is faster).

    python scripts/benchmark_model.py --model mambaout_femto --batch-size 32 --img-size 224
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
    parser.add_argument('--rounds', type=int, default=5, help='timed steps per model')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per model first')
    return parser.parse_args()


def train_step(model: nn.Module, images: torch.Tensor) -> float:
    """One forward + backward pass; returns its wall time in seconds."""
    start = time.perf_counter()
    model(images).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    reference = timm.create_model(args.model, pretrained=False)
    ours = create_model(args.model)
    ours.load_state_dict(reference.state_dict())
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
        for model in (ours, reference):
            model.to(memory_format=torch.channels_last)
    models = {'ours': ours.train(), 'timm': reference.train()}

    for _ in range(args.warmup):
        for model in models.values():
            train_step(model, images)
    times = {name: [] for name in models}
    for round_index in range(args.rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(train_step(models[name], images))

    throughput = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    print(f'{args.model}, batch {args.batch_size}, {args.img_size}px, fp32, '
          f'{"channels_last, " if args.channels_last else ""}{torch.get_num_threads()} CPU threads, '
          f'{args.rounds} rounds (median)')
    for name, value in throughput.items():
        print(f'  {name:>4}: {value:7.2f} img/s (fwd+bwd)')
    print(f'  ratio ours/timm: {throughput["ours"] / throughput["timm"]:.3f}')


if __name__ == '__main__':
    main()
