#!/usr/bin/env bash
# Multi-node training with torchrun; the rendezvous comes from the environment.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       bash launch/torchrun.sh --config configs/lm/1.3b.yaml parallel.tp=2 parallel.cp=4 ...
#   bash launch/torchrun.sh --max-restarts 3 --config ...   # restart crashed ranks
#
# Run the same command on every node with its NODE_RANK. Defaults: one node, one process
# per GPU (or 2 on a CPU machine), a free local port, no restarts.
#
# --max-restarts N: when a rank dies, torchrun restarts the whole group (up to N times)
# and the trainer resumes from the newest complete checkpoint (resume=auto).
# SIGTERM and SIGUSR1 (what SLURM's --signal sends) sent to this script are forwarded to
# the training processes, which save a checkpoint of the step they are in and stop; the
# script then stops torchrun (so it does not restart them) and exits with 75. torchrun
# itself ignores SIGUSR1 (its default action would kill it, and with it the workers,
# before they could save).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
restarts=0
if [[ "${1:-}" == --max-restarts ]]; then
    restarts="${2:?--max-restarts needs a number}"
    shift 2
elif [[ "${1:-}" == --max-restarts=* ]]; then
    restarts="${1#--max-restarts=}"
    shift
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$py" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
args=(--nnodes "${NNODES:-1}" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$restarts")
if [[ "${NNODES:-1}" == 1 && -z "${MASTER_ADDR:-}" ]]; then
    args+=(--standalone)
else
    args+=(--node-rank "${NODE_RANK:?set NODE_RANK}" --master-addr "${MASTER_ADDR:?set MASTER_ADDR}"
           --master-port "${MASTER_PORT:-29500}")
fi
(trap '' USR1; exec "$py" -m torch.distributed.run "${args[@]}" -m mhla_dist.train "$@") &
agent=$!
forwarded=""
forward() {
    forwarded="$1"
    pkill "-$1" -P "$agent" -f mhla_dist.train || true
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
rc=0
while true; do
    wait "$agent"  # returns early when a trapped signal arrives
    rc=$?
    if [[ -n "$forwarded" ]]; then
        # The workers save and stop; then stop torchrun before it restarts them.
        while pgrep -P "$agent" -f mhla_dist.train >/dev/null; do sleep 0.5; done
        kill -TERM "$agent" 2>/dev/null
        wait "$agent"
        exit 75
    fi
    kill -0 "$agent" 2>/dev/null || break
done
exit "$rc"
