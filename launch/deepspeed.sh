#!/usr/bin/env bash
# Single-node launch with the DeepSpeed launcher (it passes --local_rank, which moe_train drops before Hydra).
#   NPROC=2 launch/deepspeed.sh parallel.ep=2 hydra.run.dir=runs/ep2
set -euo pipefail
NPROC=${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 2)}
MASTER_PORT=${MASTER_PORT:-29500}
VENV=${VENV:-$(dirname "$0")/../.venv}
exec "$VENV/bin/deepspeed" --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module moe_train.train "$@"
