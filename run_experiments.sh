#!/usr/bin/env bash
# Sweep the target sparsity of main_prune.py, then tabulate and plot the runs.
#   bash run_experiments.sh [CONFIG] [LEVEL ...]        (default: configs/prune_shakespeare.yaml, 0.0 to 0.9)
# Environment: SWEEP_DIR (runs, default checkpoints/prune_sweep), PLOTS_DIR (default plots/pruning),
# EXTRA (more flags for every run, e.g. "--epochs 5 --device cuda"), JOBS (runs at once, default 1).
# A run folder that exists is resumed, so a killed sweep continues where it stopped.
set -euo pipefail
config=${1:-configs/prune_shakespeare.yaml}
shift || true
levels=${*:-0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9}
sweep=${SWEEP_DIR:-checkpoints/prune_sweep}
jobs=${JOBS:-1}
mkdir -p "$sweep"
for level in $levels; do
  run="$sweep/sparsity_$level"
  resume=""
  [ -f "$run/metrics.jsonl" ] && resume="--resume"
  # shellcheck disable=SC2086
  python main_prune.py --config "$config" --target_sparsity "$level" --output_dir "$run" --no_tqdm $resume ${EXTRA:-} \
    > "$sweep/sparsity_$level.log" 2>&1 &
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
done
wait
python prune_report.py --results_dir "$sweep" --output_dir "${PLOTS_DIR:-plots/pruning}"
