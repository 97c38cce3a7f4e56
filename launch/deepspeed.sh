#!/usr/bin/env bash
# Training with the DeepSpeed launcher over a hostfile ("host slots=N" per line).
#
#   HOSTFILE=hostfile bash launch/deepspeed.sh --config configs/lm/7b.yaml zero.stage=3 ...
#   bash launch/deepspeed.sh --config configs/quickstart.yaml     # this machine only
#
# NUM_GPUS limits the processes per host (default: all slots; 2 on a CPU machine).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/.venv/bin"
args=()
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE")
fi
if [[ -n "${NUM_GPUS:-}" ]]; then
    args+=(--num_gpus "$NUM_GPUS")
elif ! "$bin/python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    args+=(--num_gpus 2)
fi
exec "$bin/deepspeed" "${args[@]}" --module mhla_dist.train "$@"
