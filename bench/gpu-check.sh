#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU but without Rust: run from the repository
# root with the kit that `cargo xtask build --backend cuda --kit gpu-kit` packed here.
#   bash bench/gpu-check.sh [BUDGET_SECONDS] [OUT_DIR]
# Each step has its share of the budget and the figures go to OUT_DIR (default results/gpu).
set -uo pipefail
budget=${1:-480}
out=${2:-${OUT:-results/gpu}}
kit=${KIT:-gpu-kit}
mkdir -p "$out"
test -f "$kit/lookahead.gz" || { echo "no $kit/lookahead.gz: cargo xtask build --backend cuda --kit $kit" >&2; exit 2; }
bin=$(mktemp -d)/lookahead
gunzip -c "$kit/lookahead.gz" > "$bin" && chmod +x "$bin"
export CUDA_PATH="$PWD/$kit/cuda"      # libdevice for kernels with exp, erf, tanh
unset TORCH_ALLOW_TF32_CUBLAS_OVERRIDE  # f32 runs on tch-cuda refuse libtorch's TF32 switch
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$out/$name.log"
  echo "-- $name: exit $rc"
}

for backend in $(cat "$kit/backends"); do
  case $backend in flex) continue ;; esac
  step "$backend-probe" $((budget / 16)) "$bin" bench --backend "$backend" --objectives standard --steps 2 --warmup-steps 1
  step "$backend-bench-quick" $((budget / 8)) "$bin" bench --backend "$backend" --preset quick --steps 10 --output "$out/$backend-bench-quick.json"
  step "$backend-bench-gpu" $((budget / 4)) "$bin" bench --backend "$backend" --preset gpu --steps 5 --output "$out/$backend-bench-gpu.json"
  step "$backend-experiment-quick" $((budget / 4)) "$bin" experiment --backend "$backend" --no-tui --results-dir "$out/$backend-experiment"
  # bf16 products (docs/backends.md#precision): speed at the gpu preset, eval loss against f32.
  step "$backend-bench-gpu-bf16" $((budget / 4)) "$bin" bench --backend "$backend" --preset gpu --precision bf16 --steps 5 --output "$out/$backend-bench-gpu-bf16.json"
  step "$backend-experiment-quick-bf16" $((budget / 4)) "$bin" experiment --backend "$backend" --precision bf16 --no-tui --results-dir "$out/$backend-experiment-bf16"
  if [ "$backend" = tch-cuda ]; then
    step "$backend-bench-gpu-tf32" $((budget / 4)) env TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 "$bin" bench --backend "$backend" --preset gpu --precision tf32 --steps 5 --output "$out/$backend-bench-gpu-tf32.json"
  fi
done
