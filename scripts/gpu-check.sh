#!/usr/bin/env bash
# The prepared device check of the CUDA backend, run once on a GPU machine (H100/H200) from the
# repository root with the bundle scripts/gpu-bundle.sh made: `bash scripts/gpu-check.sh
# [BUNDLE]`. Under 6 minutes. It shows:
#  1. every CUDA kernel against the CPU reference on random inputs at odd shapes (the kernels'
#     test binary, SHARDSEEK_REQUIRE_CUDA=1 so that a missing device fails instead of skipping);
#  2. the model on the CUDA backend: fixtures at the CPU's tolerance, logits against the CPU
#     backend for every KV-cache dtype, the FP8-activation prefill within its own bound;
#  3. `generate --device cuda` on each fixture case against expected.json (scripts/fixture_compare.py);
#  4. `bench kernels --device cuda`: GB/s and TFLOP/s beside the same run's ceilings;
#  5. `bench model --device cuda` and the hybrid layout: `up` with attention on the GPU and two
#     expert shards on the CPU answering an OpenAI request.
# Exits non-zero when any step fails; logs go to $OUT (or BUNDLE/out).
set -uo pipefail
cd "$(dirname "$0")/.."
B=${1:-gpu-bundle}
LOG=${OUT:-$B/out}
mkdir -p "$LOG" "$B/bin"
tar -C "$B/bin" -xJf "$B/bin.tar.xz"
export SHARDSEEK_REQUIRE_CUDA=1 SHARDSEEK_FIXTURES="$PWD/$B/fixtures" RUST_BACKTRACE=1
# cudarc loads libcuda and libnvrtc by name: make an unversioned libnvrtc.so findable.
mkdir -p /tmp/nvlib
nv=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | grep -v builtins | head -1)
[ -z "$nv" ] && nv=$(python3 -c 'import nvidia.cuda_nvrtc, glob, os; p=list(nvidia.cuda_nvrtc.__path__)[0]; print([f for f in sorted(glob.glob(os.path.join(p, "lib", "libnvrtc.so*"))) if "builtins" not in f][0])' 2>/dev/null)
[ -n "$nv" ] && ln -sf "$nv" /tmp/nvlib/libnvrtc.so
export LD_LIBRARY_PATH="/tmp/nvlib:$(dirname "${nv:-/x}"):/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
echo "nvrtc: $nv"
fail=0
step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }
# t LOGFILE CMD...: runs CMD, shows and keeps its output, records a failure.
t() {
  local log=$1
  shift
  "$@" 2>&1 | tee "$LOG/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "FAILED (exit $rc): $*"; fail=1; }
}

step "1. CUDA kernels against the CPU reference"
t kernels.log timeout 150 "$B/bin/kernels-kernels" cuda --test-threads=1 --nocapture

step "2. the model on the CUDA backend"
t model.log timeout 180 "$B/bin/worker-model" cuda --test-threads=1 --nocapture

step "3. generate --device cuda on the fixtures"
t fixtures.log timeout 120 python3 scripts/fixture_compare.py "$B/bin/shardseek" "$B/fixtures"

step "4. bench kernels --device cuda"
t bench-kernels.txt timeout 150 "$B/bin/shardseek" bench kernels --device cuda

step "5. bench model and the hybrid cluster (attention on the GPU, experts on the CPU)"
m=/tmp/shardseek-small
t gen.log timeout 240 "$B/bin/shardseek" model gen --preset small --out "$m"
t bench-model.txt timeout 90 "$B/bin/shardseek" bench model --model "$m" --device cuda --batch 1,8 --prompt-len 256 --decode 16
t hybrid.txt timeout 90 "$B/bin/shardseek" up --model "$m" --device cuda --experts-device cpu --expert-shards 2 --port 0 --demo

step "done: $([ $fail = 0 ] && echo all passed || echo FAILURES)"
exit $fail
