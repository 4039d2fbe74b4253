#!/usr/bin/env bash
# Single-node launch with torchrun: NPROC ranks (GPUs, or CPU processes on gloo), Hydra overrides passed through.
#   NPROC=2 launch/torchrun.sh parallel.ep=2 hydra.run.dir=runs/ep2
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node (see launch/slurm.sbatch).
# Crash recovery: MAX_RESTARTS=3 launch/torchrun.sh checkpoint.every=500 checkpoint.resume=auto hydra.run.dir=runs/a
# restarts every rank after a worker dies, and each restart resumes from the newest good checkpoint.
set -euo pipefail
NPROC=${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 2)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max-restarts "$MAX_RESTARTS" -m moe_train.train "$@"
