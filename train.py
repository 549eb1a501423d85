"""Train a MambaOut (or any timm) model from a YAML config.

    python train.py --config configs/mambaout_small.yaml [KEY=VALUE ...]
    torchrun --nproc_per_node=8 train.py --config configs/mambaout_small.yaml data.root=/data/imagenet

`--print-config` shows the resolved config with the derived values (lr, accumulation, epochs);
`--help-config` lists every key with its default and meaning. Rerunning the same command continues the run
from its newest checkpoint. Exit status: 0 done, 2 bad input or a run folder in use by another job, 3 non-finite
loss, 75 preempted (rerun to go on).
"""
import argparse
import logging
import os
import sys
from pathlib import Path

from mambaout.cli import run_cli
from mambaout.config import parse_cli
from mambaout.engine import NonFiniteLossError
from mambaout.trainer import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, ResumeError, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                        help="auto (default): continue from the run folder's newest checkpoint when there is one "
                             "of a compatible config; never: always start fresh; PATH: continue from that checkpoint")
    args, cfg = parse_cli(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        outcome = train(cfg, resume=args.resume)
    except NonFiniteLossError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    if not outcome.preempted:
        return 0
    # torchrun reports any worker failure as status 1, so the relaunch wrapper also looks for this file.
    marker = os.environ.get("MAMBAOUT_PREEMPTED_MARKER")
    if marker:
        Path(marker).touch()
    return PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    run_cli(main, "train.py", extra_errors=(ResumeError,))
