#!/usr/bin/env bash
# Runs train.py or validate.py on TPU, with torch_xla (default: PJRT, SPMD, one process per host) or with TorchTPU
# (--backend torchtpu: torchrun, one process per chip).
#
# On a TPU VM (v4-8, v5litepod-8, v6e-1, ...), from the repository root:
#   bash scripts/launch_tpu.sh --setup                                    # once: creates .venv-xla/ with libtpu
#   bash scripts/launch_tpu.sh train.py --config configs/mambaout_small.yaml data.root=/data/imagenet
#   bash scripts/launch_tpu.sh --backend torchtpu --setup                 # once: TorchTPU into .venv/
#   bash scripts/launch_tpu.sh --backend torchtpu train.py --config configs/mambaout_small.yaml data.root=...
#
# On every worker of a pod slice (v4-32, ...), from your workstation: the same command runs on all hosts
# (the repository must be at the same path on each, --workdir, default ~/mambaout-train):
#   bash scripts/launch_tpu.sh --tpu NAME --zone ZONE [--backend torchtpu] --setup
#   bash scripts/launch_tpu.sh --tpu NAME --zone ZONE [--backend torchtpu] train.py \
#       --config configs/mambaout_small.yaml data.root=/data/imagenet train.micro_batch_size=128
# which is `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command="cd DIR && bash
# scripts/launch_tpu.sh train.py ..."`.
#
# TorchTPU: `python -m torch.tpu.distributed` derives the launch environment (hosts from TPU_WORKER_HOSTNAMES,
# this host's rank, chips per host, TorchTPU's topology variables), then torchrun starts one process per chip
# with that node rank; --dry-run prints the torchrun command instead of running it.
#
# Environment: PJRT_DEVICE (xla; default TPU), MAMBAOUT_XLA_CACHE (xla: compilation cache folder, default
# ~/.cache/mambaout/xla; `off` to disable), XLA_VENV (default .venv-xla), TPU_VENV (torchtpu; default .venv).
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

tpu="" zone="" project="" workdir="~/mambaout-train" setup="" backend="xla" dry_run=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --backend) backend="$2"; shift 2 ;;
    --setup) setup=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) echo "launch_tpu.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
case "$backend" in
  xla|torchtpu) ;;
  *) echo "launch_tpu.sh: --backend must be torchtpu or xla, got '$backend'" >&2; exit 2 ;;
esac
[ -n "$setup" ] || [ $# -gt 0 ] || usage

if [ -n "$tpu" ]; then
  # From a workstation: the same command on every worker of the slice, this script run there without --tpu.
  [ -n "$zone" ] || { echo "launch_tpu.sh: --tpu needs --zone" >&2; exit 2; }
  remote="cd $workdir && bash scripts/launch_tpu.sh --backend $backend"
  [ -z "$setup" ] || remote+=" --setup"
  [ -z "$dry_run" ] || remote+=" --dry-run"
  for arg in "$@"; do remote+=" $(printf '%q' "$arg")"; done
  exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" ${project:+--project "$project"} --worker=all \
    --command "$remote"
fi

cd "$(dirname "$0")/.."

if [ "$backend" = xla ]; then
  venv=${XLA_VENV:-.venv-xla}
  if [ -n "$setup" ]; then
    XLA_VENV="$venv" bash scripts/setup_xla_env.sh --tpu
  fi
  [ $# -gt 0 ] || exit 0
  [ -x "$venv/bin/python" ] || { echo "launch_tpu.sh: $venv/ is missing; run with --setup first" >&2; exit 2; }
  export PJRT_DEVICE=${PJRT_DEVICE:-TPU}
  # With PJRT_DEVICE set, runtime.device=auto is xla: one process drives every device of this host (SPMD) and
  # joins the other hosts of the slice.
  [ -z "$dry_run" ] || { echo "$venv/bin/python $*"; exit 0; }
  exec "$venv/bin/python" "$@"
fi

venv=${TPU_VENV:-.venv}
if [ -n "$setup" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q -e ".[tpu]"
fi
[ $# -gt 0 ] || exit 0
[ -x "$venv/bin/python" ] || { echo "launch_tpu.sh: $venv/ is missing; run with --backend torchtpu --setup first" >&2; exit 2; }
# Only NAME=value lines become variables: importing TorchTPU may print other lines first.
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
if ! launch_env=$("$venv/bin/python" -m torch.tpu.distributed 2>"$errors"); then
  echo "launch_tpu.sh: TorchTPU could not derive the launch environment on $(hostname): $(tail -n 1 "$errors")" >&2
  echo "(a TPU VM with TorchTPU installed is needed: --backend torchtpu --setup; on a pod slice set" \
    "TPU_WORKER_HOSTNAMES where the VM does not)" >&2
  exit 2
fi
while IFS= read -r line; do
  if [[ "$line" =~ ^([A-Z_][A-Z0-9_]*)=\"?([^\"]*)\"?$ ]]; then
    export "${BASH_REMATCH[1]}=${BASH_REMATCH[2]}"
  fi
done <<< "$launch_env"
nnodes=${NNODES:-1}
command=("$venv/bin/python" -m torch.distributed.run --nproc_per_node "$((WORLD_SIZE / nnodes))")
if [ "$nnodes" -gt 1 ]; then
  command+=(--nnodes "$nnodes" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  command+=(--standalone)
fi
command+=("$@")
if [ -n "$dry_run" ]; then
  echo "${command[*]}"
  exit 0
fi
# The processes train with runtime.device=tpu (auto picks it where TorchTPU sees chips).
rm -f "$errors"
exec "${command[@]}"
