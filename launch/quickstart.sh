#!/usr/bin/env bash
# The quickstart: set up if needed, build the embedded text shards (CPython's bundled
# documentation, byte-level tokens; nothing is downloaded), train the tiny MHLA LM on 2
# CPU processes (context parallel 2, ZeRO-2), then draw the loss curve and sample text.
#
#   bash launch/quickstart.sh                  # 1000 steps, ~4 minutes on 2 cores
#   bash launch/quickstart.sh train.steps=50   # any key=value override of the config
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh
py="$root/.venv/bin/python"
# glibc would otherwise return every large buffer to the OS after each step.
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 OMP_NUM_THREADS=1
corpus=$("$py" -c "
from mhla_dist.data import build_default_corpus
info = build_default_corpus('data/default')
print(f'data.train={info.train} data.eval={info.eval}')")
echo "quickstart: data ready ($corpus)"
"$py" -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m mhla_dist.train --config configs/quickstart.yaml $corpus "$@"
run_dir=$("$py" -c "
import sys
from mhla_dist.config import load_config
print(load_config('configs/quickstart.yaml', sys.argv[1:]).run_dir)" $corpus "$@")
png=$("$py" tools/plot_metrics.py "$run_dir")
echo "quickstart: loss curve  $png"
echo "quickstart: weights     $run_dir/model.safetensors"
echo "quickstart: a sample of generated text:"
"$py" tools/generate.py "$run_dir" --prompt "The for statement" --max-new-tokens 200
