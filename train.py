"""Train a MambaOut (or any timm) model from a YAML config.

    python train.py --config configs/mambaout_small.yaml [KEY=VALUE ...]
    torchrun --nproc_per_node=8 train.py --config configs/mambaout_small.yaml data.root=/data/imagenet

`--print-config` shows the resolved config with the derived values (lr, accumulation, epochs);
`--help-config` lists every key with its default and meaning.
"""
import argparse
import logging

from mambaout.cli import run_cli
from mambaout.config import parse_cli
from mambaout.trainer import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _, cfg = parse_cli(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train(cfg)
    return 0


if __name__ == "__main__":
    run_cli(main, "train.py")
