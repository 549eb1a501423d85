#!/usr/bin/env bash
# Starts train.py with torchrun: one process per GPU on this node, NCCL between them (gloo with
# runtime.device=cpu). Prints the torchrun command before running it. Everything after the launcher options
# below goes to train.py unchanged.
#
#   # one node, every visible GPU (8 GPUs x micro batch 128 x 4 accumulation steps = 4096 for the recipe)
#   scripts/launch_gpu.sh --config configs/mambaout_small.yaml data.root=/data/imagenet
#   # one node, 4 GPUs
#   scripts/launch_gpu.sh --nproc_per_node 4 --config configs/mambaout_small.yaml data.root=/data/imagenet
#   # N nodes: the same command on every node, --node_rank 0..N-1; node 0 hosts the rendezvous at HOST:PORT
#   scripts/launch_gpu.sh --nnodes 2 --node_rank 0 --rdzv-endpoint node0:29500 --config ... data.root=...
#   scripts/launch_gpu.sh --nnodes 2 --node_rank 1 --rdzv-endpoint node0:29500 --config ... data.root=...
#
# Launcher options (each also read from the environment variable named in brackets):
#   --nproc_per_node N      processes on this node [NPROC_PER_NODE]; default "gpu": one per visible GPU
#   --nnodes N              nodes in the job [NNODES]; default 1
#   --node_rank R           this node, 0..N-1 [NODE_RANK]; node 0 runs the rank-0 process (logs, checkpoints)
#   --rdzv-endpoint H:P     rendezvous on node 0 [MASTER_ADDR, MASTER_PORT (29500)]; required with N > 1
# Other environment: RDZV_TIMEOUT (seconds node 0 waits for every node to join, default 900),
# SCRIPT (default train.py), TORCHRUN (the launcher command; default torchrun, else .venv's python -m
# torch.distributed.run), DRY_RUN=1 (print the command only).
# One node without an endpoint uses --standalone (a free local port, so two jobs on one node do not clash).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "launch_gpu.sh: error: $*" >&2; exit 2; }

nproc=${NPROC_PER_NODE:-gpu}
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
endpoint=""
if [ -n "${MASTER_ADDR:-}" ]; then endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"; fi

need_value() { [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --nproc_per_node=*|--nproc-per-node=*) nproc=${1#*=}; shift ;;
    --nproc_per_node|--nproc-per-node) need_value "$@"; nproc=$2; shift 2 ;;
    --nnodes=*) nnodes=${1#*=}; shift ;;
    --nnodes) need_value "$@"; nnodes=$2; shift 2 ;;
    --node_rank=*|--node-rank=*) node_rank=${1#*=}; shift ;;
    --node_rank|--node-rank) need_value "$@"; node_rank=$2; shift 2 ;;
    --rdzv-endpoint=*|--rdzv_endpoint=*) endpoint=${1#*=}; shift ;;
    --rdzv-endpoint|--rdzv_endpoint) need_value "$@"; endpoint=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, got '$nnodes'"
[[ "$node_rank" =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$nnodes" ] \
  || die "--node_rank must be in 0..$((nnodes - 1)) for --nnodes $nnodes, got '$node_rank'"
[[ "$nproc" =~ ^([1-9][0-9]*|gpu|cpu|auto)$ ]] || die "--nproc_per_node must be a count or gpu, got '$nproc'"

if [ -n "${TORCHRUN:-}" ]; then
  read -r -a launcher <<< "$TORCHRUN"
elif command -v torchrun > /dev/null; then
  launcher=(torchrun)
elif [ -x .venv/bin/python ]; then
  launcher=(.venv/bin/python -m torch.distributed.run)
else
  launcher=("${PYTHON:-python3}" -m torch.distributed.run)
fi

cmd=("${launcher[@]}" "--nproc_per_node=$nproc")
if [ "$nnodes" -eq 1 ] && [ -z "$endpoint" ]; then
  cmd+=(--standalone)
  where="one node, standalone rendezvous"
else
  [ -n "$endpoint" ] || die "--nnodes $nnodes needs the rendezvous on node 0: --rdzv-endpoint HOST:PORT" \
    "(or MASTER_ADDR=HOST [MASTER_PORT=29500]), the same on every node"
  [[ "$endpoint" =~ ^[^:]+:[0-9]+$ ]] || die "--rdzv-endpoint must be HOST:PORT, got '$endpoint'"
  cmd+=("--nnodes=$nnodes" "--node_rank=$node_rank" --rdzv-backend=static "--rdzv-endpoint=$endpoint"
        "--rdzv-conf=timeout=${RDZV_TIMEOUT:-900}")
  where="node $node_rank of $nnodes, rendezvous at $endpoint (hosted by node 0; every node must reach it)"
fi
cmd+=("${SCRIPT:-train.py}" "$@")

echo "launch_gpu.sh: $where" >&2
{ printf '+'; printf ' %q' "${cmd[@]}"; echo; } >&2
if [ -n "${DRY_RUN:-}" ]; then exit 0; fi
exec "${cmd[@]}"  # torchrun itself receives SIGTERM/SIGINT (preemption) and forwards them to the workers
