#!/usr/bin/env bash
# Runs train.py or validate.py on TPU with torch_xla (PJRT, SPMD: one process per host).
#
# On a TPU VM (v3-8, v4-8, v5litepod-8, ...), from the repository root:
#   bash scripts/launch_tpu.sh --setup                                    # once: creates .venv-xla/ with libtpu
#   bash scripts/launch_tpu.sh train.py --config configs/mambaout_small.yaml data.root=/data/imagenet
#
# On every worker of a pod slice (v4-32, ...), from your workstation: the same command runs on all hosts
# (the repository must be at the same path on each, --workdir, default ~/mambaout-train):
#   bash scripts/launch_tpu.sh --tpu NAME --zone ZONE --setup
#   bash scripts/launch_tpu.sh --tpu NAME --zone ZONE train.py --config configs/mambaout_small.yaml \
#       data.root=/data/imagenet train.micro_batch_size=128
# which is `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command="cd DIR && bash
# scripts/launch_tpu.sh train.py ..."`.
#
# Environment: PJRT_DEVICE (default TPU), MAMBAOUT_XLA_CACHE (compilation cache folder, default
# ~/.cache/mambaout/xla; `off` to disable), XLA_VENV (default .venv-xla).
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

tpu="" zone="" project="" workdir="~/mambaout-train" setup=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --setup) setup=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) echo "launch_tpu.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[ -n "$setup" ] || [ $# -gt 0 ] || usage

if [ -n "$tpu" ]; then
  # From a workstation: the same command on every worker of the slice, this script run there without --tpu.
  [ -n "$zone" ] || { echo "launch_tpu.sh: --tpu needs --zone" >&2; exit 2; }
  remote="cd $workdir && bash scripts/launch_tpu.sh"
  [ -z "$setup" ] || remote+=" --setup"
  for arg in "$@"; do remote+=" $(printf '%q' "$arg")"; done
  exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" ${project:+--project "$project"} --worker=all \
    --command "$remote"
fi

cd "$(dirname "$0")/.."
venv=${XLA_VENV:-.venv-xla}
if [ -n "$setup" ]; then
  XLA_VENV="$venv" bash scripts/setup_xla_env.sh --tpu
fi
[ $# -gt 0 ] || exit 0
[ -x "$venv/bin/python" ] || { echo "launch_tpu.sh: $venv/ is missing; run with --setup first" >&2; exit 2; }
export PJRT_DEVICE=${PJRT_DEVICE:-TPU}
script="$1"
shift
# With PJRT_DEVICE set, runtime.device=auto is xla: one process drives every device of this host (SPMD) and
# joins the other hosts of the slice.
exec "$venv/bin/python" "$script" "$@"
