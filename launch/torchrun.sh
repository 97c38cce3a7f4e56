#!/usr/bin/env bash
# Multi-node training with torchrun; the rendezvous comes from the environment.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       bash launch/torchrun.sh --config configs/lm/1.3b.yaml parallel.tp=2 parallel.cp=4 ...
#
# Run the same command on every node with its NODE_RANK. Defaults: one node, one process
# per GPU (or 2 on a CPU machine), a free local port.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$py" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
args=(--nnodes "${NNODES:-1}" --nproc-per-node "$NPROC_PER_NODE")
if [[ "${NNODES:-1}" == 1 && -z "${MASTER_ADDR:-}" ]]; then
    args+=(--standalone)
else
    args+=(--node-rank "${NODE_RANK:?set NODE_RANK}" --master-addr "${MASTER_ADDR:?set MASTER_ADDR}"
           --master-port "${MASTER_PORT:-29500}")
fi
exec "$py" -m torch.distributed.run "${args[@]}" -m mhla_dist.train "$@"
