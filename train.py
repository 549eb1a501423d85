"""Train a MambaOut (or any timm) model from a YAML config.

    python train.py --config configs/mambaout_small.yaml [KEY=VALUE ...]
    torchrun --nproc_per_node=8 train.py --config configs/mambaout_small.yaml data.root=/data/imagenet

`--print-config` shows the resolved config with the derived values (lr, accumulation, epochs);
`--help-config` lists every key with its default and meaning. Rerunning the same command continues the run
from its newest checkpoint. Exit status: 0 done, 2 bad input or a run folder in use by another job, 3 non-finite
loss, 4 the data's storage stayed unreachable (rerun to resume), 75 preempted (rerun to go on).
"""
import argparse

from mambaout.cli import run_cli
from mambaout.config import Config
from mambaout.trainer import ResumeError, command_main, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return command_main(parser, argv, "train.py", Config, lambda cfg, resume: train(cfg, resume=resume))


if __name__ == "__main__":
    run_cli(main, "train.py", extra_errors=(ResumeError,))
