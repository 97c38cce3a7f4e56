#!/usr/bin/env bash
# The Triton kernels on a lent GPU in one call: the fp32 check against mhla_reference, the
# bf16 checks against the torch backend (float64), then the timing sweep against SDPA
# (flash), the torch backend and flash-linear-attention, targets' shapes first. The JSON
# is rewritten after every shape, so a run cut short keeps what it measured.
#
# The device machine has torch and triton but not this project's other dependencies; the
# kernels need only those two, so they are put on PYTHONPATH as `mhla_kernels` here.
# fla (the causal baseline) is not there: carry its wheels. In the repo root, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       flash-linear-attention==0.6.0 fla-core==0.6.0
# then, with the device tool: run(command="bash launch/gpu_kernels.sh", carry=[".whl"],
# timeout_s=570). Copy the JSON, PNG and log that come back to benchmarks/results/.
#
# Usage: bash launch/gpu_kernels.sh [tools/bench_kernels.py arguments]
#   BUDGET=420   seconds after which no new shape is timed (checks and compiles included)
#   OUT=dir      where results go (the device tool sets it; default benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-420}
site=/tmp/mhla_kernels_site
mkdir -p "$site" "$OUT"
ln -sfn "$PWD/kernels" "$site/mhla_kernels"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/mhla_wheels .whl/*.whl || exit 1
    site="$site:/tmp/mhla_wheels"
fi
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'no-gpu')") || exit 1
python3 tools/bench_kernels.py --time-budget-s "$BUDGET" --out "$OUT/kernels_${gpu}.json" "$@" \
    2>&1 | tee "$OUT/kernels_${gpu}.log"
