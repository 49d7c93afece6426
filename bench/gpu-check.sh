#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU but without Rust: run from the repository
# root with the kit that `cargo xtask build --backend cuda [--backend tch-cuda --kit-torch V]
# --kit gpu-kit` packed here.
#   bash bench/gpu-check.sh [BUDGET_SECONDS] [OUT_DIR]
# The steps run in order of importance, each backend in turn: the comparison with flex, the
# gpu preset's bench in f32 and bf16, a profile of its bf16 steps, PyTorch's own bf16 steps at
# that shape, bf16 training against f32 training, the quick experiment in f32 and bf16, then
# the rest (the quick preset's bench, PyTorch's compiled bf16 step, the host's cost per step). Each
# step has a cap, and none starts past the budget. Everything lands in OUT_DIR/gpu-check.tar.gz
# (rewritten after each step; checkpoints left out) and a summary on stdout.
set -uo pipefail
budget=${1:-420}
out=${2:-${OUT:-results/gpu}}
kit=${KIT:-gpu-kit}
deadline=$((SECONDS + budget))
mkdir -p "$out"
test -f "$kit/lookahead.gz" || { echo "no $kit/lookahead.gz: cargo xtask build --backend cuda --kit $kit" >&2; exit 2; }
work=$(mktemp -d)
bin=$work/lookahead
logs=$work/gpu-check
mkdir -p "$logs"
gunzip -c "$kit/lookahead.gz" > "$bin" && chmod +x "$bin"
export CUDA_PATH="$PWD/$kit/cuda"      # libdevice for kernels with exp, erf, tanh
unset TORCH_ALLOW_TF32_CUBLAS_OVERRIDE  # f32 runs on tch-cuda refuse libtorch's TF32 switch
if [ -f "$kit/torch-version" ]; then
  # The binary links libtorch: this machine's PyTorch, which must be the version it was built for.
  want=$(cat "$kit/torch-version")
  read -r have torch_lib < <(python3 -c 'import os, torch; print(torch.__version__.split("+")[0], os.path.join(os.path.dirname(torch.__file__), "lib"))')
  if [ "${have:-none}" != "$want" ]; then
    echo "the kit's binary needs PyTorch $want, this machine's python3 has ${have:-none}: cargo xtask build ... --kit-torch ${have:-VERSION}" >&2
    exit 2
  fi
  export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$logs/gpu.txt"
# The kit's GPU backends, tch-cuda first: PyTorch's kernels, the likelier to reach the MFU
# target, while burn-cuda first compiles and autotunes its kernels. BACKENDS=flex tries the
# script on a CPU.
backends=${BACKENDS:-$(tr ' ' '\n' < "$kit/backends" | grep -vx flex | sort -r | tr '\n' ' ')}

pack() {  # everything so far, without checkpoints, into one file (the device tool returns few,
  # of at most 16 MiB: the profiles' traces and CubeCL's kernel log are left out if they would
  # pass that)
  local part="$out/gpu-check.tar.gz.part" limit=15000000
  tar -C "$work" --exclude=checkpoints -czf "$part" gpu-check &&
    if [ "$(stat -c %s "$part")" -gt "$limit" ]; then
      tar -C "$work" --exclude=checkpoints --exclude='*.trace.json' --exclude='cuda-profile-*.txt' -czf "$part" gpu-check
      [ "$(stat -c %s "$part")" -le "$limit" ] || echo "warning: $part is still over $limit bytes" >&2
    fi &&
    mv "$part" "$out/gpu-check.tar.gz"
}

step() {  # step NAME CAP COMMAND...: run under min(CAP, time left), log to NAME.log
  local name=$1 cap=$2; shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "-- $name: skipped, budget spent" | tee -a "$logs/summary.txt"
    return
  fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout -k 20 "$limit" "$@" > "$logs/$name.log" 2>&1  # a second signal 20 s on
  local rc=$?
  tail -n 8 "$logs/$name.log"
  echo "-- $name: exit $rc after $((SECONDS - start))s" | tee -a "$logs/summary.txt"
  pack
}

each() {  # each NAME-SUFFIX CAP ARGS...: step on every GPU backend of the kit ({B} = backend)
  local suffix=$1 cap=$2; shift 2
  for backend in $backends; do
    step "$backend-$suffix" "$cap" "${@//\{B\}/$backend}"
  done
}

each check-backend $((budget / 10)) "$bin" check-backend --backend {B}
each bench-gpu $((budget / 6)) "$bin" bench --backend {B} --preset gpu --steps 5 --output "$logs/{B}-bench-gpu.json"
# bf16 products (docs/backends.md#precision): speed at the gpu preset, eval loss against f32.
each bench-gpu-bf16 $((budget / 6)) "$bin" bench --backend {B} --preset gpu --precision bf16 --steps 5 --output "$logs/{B}-bench-gpu-bf16.json"
# Where a bf16 step's time goes: libtorch's profiler on tch-cuda (Chrome traces and a summary in
# the JSON), CubeCL's kernel timing on cuda (one line per kernel, a summary per step).
case " $backends " in *" tch-cuda "*)
  step tch-cuda-profile-gpu-bf16 $((budget / 10)) "$bin" bench --backend tch-cuda --preset gpu --precision bf16 --warmup-steps 2 --steps 1 --profile "$logs/tch-cuda-profile" --output "$logs/tch-cuda-profile-gpu-bf16.json"
esac
case " $backends " in *" cuda "*)
  step cuda-profile-gpu-bf16 $((budget / 10)) env CUBECL_DEBUG_OPTION=profile CUBECL_DEBUG_LOG="$logs/cuda-profile-gpu-bf16.txt" "$bin" bench --backend cuda --preset gpu --precision bf16 --warmup-steps 2 --steps 1 --objectives standard,seed
esac
# PyTorch itself on the same shapes and GPU (bench/reference.py, this machine's python3): the
# side-by-side figures. The vocabulary is the gpu preset's corpus's, as a bench reported it.
vocab=$(python3 -c 'import glob, json, sys; print(json.load(open(sorted(glob.glob(sys.argv[1] + "/*-bench-gpu*.json"))[0]))["vocab_size"])' "$logs" 2>/dev/null)
pytorch() {  # pytorch NAME CAP PRECISION [ARGS...]: the reference's bench at the gpu preset's shape
  local name=$1 cap=$2 precision=$3; shift 3
  case " $backends " in *cuda*)
    if [ -z "$vocab" ]; then
      echo "-- $name: skipped, no bench reported the gpu preset's vocabulary" | tee -a "$logs/summary.txt"
      return
    fi
    step "$name" "$cap" python3 bench/reference.py bench --device cuda --precision "$precision" \
      --d-model 768 --n-layers 12 --n-heads 12 --seq-len 512 --batch-size 32 --vocab "$vocab" --steps 5 --warmup-steps 3 --turn-steps 5 "$@"
  esac
}
pytorch pytorch-bench-gpu-bf16 $((budget / 10)) bf16
each bf16-training $((budget / 10)) "$bin" check-backend --backend {B} --bf16-training
each experiment-quick $((budget / 5)) "$bin" experiment --backend {B} --no-tui --results-dir "$logs/{B}-experiment"
each experiment-quick-bf16 $((budget / 5)) "$bin" experiment --backend {B} --precision bf16 --no-tui --results-dir "$logs/{B}-experiment-bf16"
pytorch pytorch-bench-gpu-f32 $((budget / 10)) f32
each bench-quick $((budget / 10)) "$bin" bench --backend {B} --preset quick --steps 10 --output "$logs/{B}-bench-quick.json"
# What PyTorch's compiler (TorchInductor: element-wise chains fused into generated kernels, which
# Burn's tch backend cannot reach) makes of the standard bf16 step: what fusing them is worth.
pytorch pytorch-compiled-bench-gpu-bf16 $((budget / 5)) bf16 --compile --objectives standard
# The host's cost per step: the gpu preset's depth at almost no width (docs/performance.md#host-cost-per-step-what-a-gpu-waits-for).
printf 'd_model = 24\nn_layers = 12\nn_heads = 12\nseq_len = 8\nbatch_size = 1\n' > "$work/host.toml"
each bench-host $((budget / 10)) "$bin" bench --backend {B} --config "$work/host.toml" --steps 50 --output "$logs/{B}-bench-host.json"
case " $backends " in *" tch-cuda "*)
  step tch-cuda-bench-gpu-tf32 $((budget / 6)) env TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 "$bin" bench --backend tch-cuda --preset gpu --precision tf32 --steps 5 --output "$logs/tch-cuda-bench-gpu-tf32.json"
esac
# Whether tch-cuda's AdaptiveLayer ran as the project's CUDA kernels (compiled by NVRTC on first
# use) or as libtorch's operations (a warning says why).
grep -h "AdaptiveLayer's CUDA kernels" "$logs"/*.log 2>/dev/null | sed 's/^.*\(the AdaptiveLayer\)/\1/' | sort | uniq -c >> "$logs/summary.txt"
pack
echo "== summary"; cat "$logs/summary.txt"
