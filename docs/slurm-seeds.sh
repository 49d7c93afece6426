#!/bin/bash
# One seed per job of a SLURM array, all into one shared results directory; the last step
# merges them (docs/scaling.md). Submit from the repository root:
#   sbatch --array=0-9 docs/slurm-seeds.sh            # ten seeds
# then, when every job has finished:
#   target/release/lookahead report "$RESULTS"/*_results.json
#SBATCH --job-name=lookahead-seeds
#SBATCH --cpus-per-task=2
#SBATCH --time=02:00:00
#SBATCH --output=lookahead-seed-%a.log
set -euo pipefail

SEEDS=(42 123 456 789 1011 1213 1415 1617 1819 2021)
SEED=${SEEDS[$SLURM_ARRAY_TASK_ID]}
# A directory every node sees; each job reserves its own experiment id inside it.
RESULTS=${RESULTS:-$HOME/lookahead-results/seeds}
# One configuration for every job: only --seeds differs.
CONFIG=${CONFIG:-exp.toml}
# Anything else every job passes, e.g. EXTRA_FLAGS="--backend cuda --devices 0,1,2,3".
read -r -a EXTRA <<< "${EXTRA_FLAGS:-}"

# Build once before submitting (cargo build --release); a job only runs the binary.
srun target/release/lookahead experiment \
    --config "$CONFIG" \
    --seeds "$SEED" \
    --results-dir "$RESULTS" \
    --no-tui \
    ${EXTRA[@]+"${EXTRA[@]}"}
