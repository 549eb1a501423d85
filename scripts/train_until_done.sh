#!/usr/bin/env bash
# Re-launches a training command until it finishes: exit status 75 means "preempted, checkpoint saved",
# so the same command continues the run (train.py resumes from the run folder's newest checkpoint).
#
#   scripts/train_until_done.sh python train.py --config configs/mambaout_small.yaml data.root=/data/imagenet
#   scripts/train_until_done.sh torchrun --nproc_per_node=8 train.py --config configs/mambaout_small.yaml
#
# MAX_RESTARTS (default 100) bounds the loop; any other non-zero status stops it and is returned.
set -u
preempted=75
restarts=0
while true; do
  "$@"
  status=$?
  if [ "$status" -ne "$preempted" ]; then
    exit "$status"
  fi
  restarts=$((restarts + 1))
  if [ "$restarts" -gt "${MAX_RESTARTS:-100}" ]; then
    echo "train_until_done: preempted more than ${MAX_RESTARTS:-100} times, giving up" >&2
    exit "$status"
  fi
  echo "train_until_done: preempted (status $preempted), restart $restarts: $*" >&2
done
