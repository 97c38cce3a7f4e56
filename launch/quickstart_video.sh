#!/usr/bin/env bash
# The video quickstart: set up if needed, make synthetic moving-shape clips (square, disc,
# triangle, ring: the class; shapes 0.2-0.32 of the frame across, large enough at 16x16 to
# tell a ring from a disc; nothing is downloaded), train a small class-conditional MHLA
# DiT on them on 2 CPU processes (context parallel 2, ZeRO-2), then draw the loss curve and
# sample two clips of each class into a labelled PNG grid (rows: classes, columns: frames)
# and an animated GIF.
#
#   bash launch/quickstart_video.sh                   # 3000 steps, ~8 minutes on 2 cores
#   bash launch/quickstart_video.sh optim.lr=1e-3     # any key=value override of the config
#   STEPS=4 CLIPS=32 SAMPLE_STEPS=2 bash launch/quickstart_video.sh run_dir=/tmp/qv  # smoke
#
# Environment: STEPS (train.steps; an explicit train.steps=N wins), CLIPS (training clips,
# default 2048), DATA_DIR (default data/quickstart_video), SAMPLE_STEPS (Euler steps,
# default 25), CFG_SCALE (classifier-free guidance, default 1.5: at 3 the shapes swell and
# fray), RADIUS (the shapes' radius range in frame sizes, default "0.2 0.32"), PYTHON (an
# interpreter with the project installed: skips launch/setup.sh; launch/torchrun.sh uses
# it too).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -z "${PYTHON:-}" ]]; then
    bash launch/setup.sh
fi
py="${PYTHON:-$root/.venv/bin/python}"
# glibc would otherwise return every large buffer to the OS after each step.
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 OMP_NUM_THREADS=1
config=configs/dit/quickstart_video.yaml
data="${DATA_DIR:-data/quickstart_video}"
overrides=(${STEPS:+"train.steps=$STEPS"} "$@")

# The clips' shape is the model's: read it (and the run folder) from the resolved config.
read -r run_dir frames size < <("$py" -c "
import sys
from mhla_dist.config import load_config
c = load_config(sys.argv[1], sys.argv[2:])
m = c.model
if m.height != m.width:
    sys.exit(f'the synthetic clips are square; model.height={m.height} != model.width={m.width}')
print(c.run_dir, m.frames, m.height)" "$config" "${overrides[@]}")
make_clips() {  # folder, clips, seed
    # shellcheck disable=SC2086  # RADIUS is two numbers
    "$py" tools/make_synthetic_video.py --output "$1" --num-clips "$2" --seed "$3" \
        --frames "$frames" --size "$size" --shard-size 64 --radius ${RADIUS:-0.2 0.32} \
        | sed 's/^/quickstart_video: /'
}
make_clips "$data/train" "${CLIPS:-2048}" 0
make_clips "$data/eval" 64 1  # other clips than training's, for the eval loss
pattern() { "$py" -c "import json, sys; print(json.load(open(sys.argv[1]))['pattern'])" "$1/clips.json"; }
train="$(pattern "$data/train")" eval="$(pattern "$data/eval")"
classes=$("$py" -c "import json, sys; print(*json.load(open(sys.argv[1]))['classes'])" \
    "$data/train/clips.json")

bash launch/torchrun.sh --config "$config" "data.train=$train" "data.eval=$eval" \
    "${overrides[@]}"
png=$("$py" tools/plot_metrics.py "$run_dir")
# Two clips per class, one row each; the same noise seed every run.
labels=$("$py" -c "import sys; print(*(i // 2 for i in range(2 * int(sys.argv[1]))))" \
    "$(wc -w <<< "$classes")")
# shellcheck disable=SC2086  # labels and classes are lists of words
samples=$("$py" tools/sample_video.py "$run_dir" --labels $labels --class-names $classes \
    --cfg-scale "${CFG_SCALE:-1.5}" --steps "${SAMPLE_STEPS:-25}" --zoom 6 --fps 3)
"$py" -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [r for r in rows if 'loss' in r]
evals = [r for r in rows if 'eval_loss' in r]
print(f'quickstart_video: step {rows[-1][\"step\"]}: train loss {train[-1][\"loss\"]:.4f}'
      + (f', eval loss {evals[-1][\"eval_loss\"]:.4f}' if evals else ''))" "$run_dir/metrics.jsonl"
echo "quickstart_video: loss curve   $png"
echo "quickstart_video: weights      $run_dir/model.safetensors"
echo "quickstart_video: samples      $(sed -n 3p <<< "$samples")  (rows: classes, columns: frames)"
echo "quickstart_video: animation    $(sed -n 4p <<< "$samples")  (the same clips, side by side)"
