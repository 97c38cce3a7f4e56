#!/usr/bin/env bash
# Perplexity by position of MHLA against plain linear attention and softmax attention:
# the quickstart (the tiny LM on the embedded pydoc corpus, 2 CPU processes, CP = 2,
# ZeRO-2) trained three times with the same data, seed and steps, then scored by
# tools/eval_lm.py on the same held-out windows. ~15 minutes on 2 cores.
#
#   bash launch/compare_perplexity.sh                      # into runs/perplexity/
#   bash launch/compare_perplexity.sh train.steps=200      # overrides go to every run
#
# - mhla:    the quickstart as it is (8 blocks of 32 tokens, Mc learned).
# - linear:  Mc all ones and frozen: every block reads every earlier block with equal
#            weight, which is plain causal linear attention (same layout, same CP).
# - softmax: SDPA in every layer.
# The comparison (JSON, PNG) goes to ${OUT:-benchmarks/results/perplexity_by_position}.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
runs="${RUNS:-runs/perplexity}"
out="${OUT:-benchmarks/results/perplexity_by_position}"
declare -A variant=(
    [mhla]=""
    [linear]="model.mixing_init=ones optim.mixing_lr_scale=0"
    [softmax]="model.softmax_layers=[0,1,2,3]"
)
for name in mhla linear softmax; do
    # shellcheck disable=SC2086  # the variant's overrides are separate words
    bash launch/quickstart.sh "run_dir=$runs/$name" ${variant[$name]} "$@"
done
"$root/.venv/bin/python" tools/eval_lm.py "$runs/mhla" --compare "$runs/linear" \
    "$runs/softmax" --perplexity --bucket 32 --batches 16 --out "$out"
echo "compare_perplexity: $out/perplexity_by_position.json and .png"
