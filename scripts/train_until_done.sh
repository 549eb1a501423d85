#!/usr/bin/env bash
# Re-launches a training command until it finishes: a preempted run saves a checkpoint and exits with
# status 75 (or, under torchrun, which turns any worker status into 1, leaves the marker file below), and the
# same command continues the run from the run folder's newest checkpoint.
#
#   scripts/train_until_done.sh python train.py --config configs/mambaout_small.yaml data.root=/data/imagenet
#   scripts/train_until_done.sh torchrun --nproc_per_node=8 train.py --config configs/mambaout_small.yaml
#
# MAX_RESTARTS (default 100) bounds the loop; any other failure stops it and its status is returned.
set -u
preempted=75
marker=$(mktemp -u "${TMPDIR:-/tmp}/mambaout-preempted.XXXXXX")
export MAMBAOUT_PREEMPTED_MARKER="$marker"
trap 'rm -f "$marker"' EXIT
restarts=0
while true; do
  rm -f "$marker"
  "$@"
  status=$?
  if [ "$status" -ne "$preempted" ] && [ ! -e "$marker" ]; then
    exit "$status"
  fi
  restarts=$((restarts + 1))
  if [ "$restarts" -gt "${MAX_RESTARTS:-100}" ]; then
    echo "train_until_done: preempted more than ${MAX_RESTARTS:-100} times, giving up" >&2
    exit "$preempted"
  fi
  echo "train_until_done: preempted, restart $restarts: $*" >&2
done
