#!/usr/bin/env bash
# The first run on a GPU, in one go (a GPU is lent for about 15 minutes per task): builds the
# GPU binaries, runs make test-cuda's checks (tests/test_cuda.sh: kernels, fixtures, GPU vs CPU
# layer by layer, the split, 5,000 positions, the memory plan's refusal), then GPU speed on
# random weights of real shapes: V2-Lite (27 layers, bf16) decode at depth 0 and 4096 and a
# 512-token prefill, as a fraction of the measured memory bandwidth, and the same for 2 layers
# of the 236B DeepSeek-V2. Everything goes into one report, written as it goes:
#   tests/gpu_check.sh [REPORT]     default: $OUT/gpu_report.md if $OUT is set, else build/gpu_report.md
# Aims at under 8 minutes on one H100/H200 with 16 cores; stops starting new steps after
# GPU_CHECK_BUDGET seconds (default 450) so that the report always comes back.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${GPU_CHECK_BUDGET:-450}
report=${1:-${OUT:-build}/gpu_report.md}
mkdir -p "$(dirname "$report")" build/cuda
export PATH=$PATH:/usr/local/cuda/bin
PYTHON=${PYTHON:-$(for p in python3 /usr/bin/python3; do $p -c 'import numpy' 2>/dev/null && echo $p && break; done)}
export PYTHON
log() { echo "$*" | tee -a "$report"; }
elapsed() { echo $(( $(date +%s) - start )); }
: > "$report"
log "# dsv2 GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
log ""
log "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
log "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores; nvcc: $(nvcc --version | tail -2 | head -1)"
log "commit: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)'); python: $PYTHON"
log ""
log '## Build'
if ! make -j"$(nproc)" cuda dsv2 test_all > build/cuda/build.log 2>&1; then
  log '```'; tail -30 build/cuda/build.log | tee -a "$report"; log '```'
  log "BUILD FAILED"; exit 1
fi
log "make cuda dsv2 test_all: ok ($(elapsed) s)"
log ""
log '## Checks (tests/test_cuda.sh)'
log '```'
tests/test_cuda.sh 2>&1 | tee -a "$report"
checks=${PIPESTATUS[0]}
log '```'
log "checks: exit $checks ($(elapsed) s)"
log ""
bandwidth=$(sed -n 's/.*device-to-device copy: \([0-9.]*\) GB\/s.*/\1/p' build/cuda/kernels.log | head -1)
log "## Speed (batch 1, greedy; memory bandwidth measured by cudaMemcpy: ${bandwidth:-?} GB/s)"
log ""
log "| model | work | tok/s | GB read per token | GB/s reached | fraction of the measured bandwidth |"
log "|---|---|---|---|---|---|"
bench() {  # bench LABEL MODEL DEPTH NEW: the prompt DEPTH ids, then NEW tokens
  local label=$1 model=$2 depth=$3 new=$4 out
  seq -s' ' 1000 $((999 + depth)) > build/cuda/bench_ids.txt
  out=$(./dsv2cu "$model" -f build/cuda/bench_ids.txt -n "$new" -t 0 -c $((depth + new + 8)) 2>&1 >/dev/null)
  local pp tg gb
  pp=$(echo "$out" | sed -n 's/.*prompt: [0-9]* tokens, \([0-9.]*\) tok\/s.*/\1/p' | tail -1)
  tg=$(echo "$out" | sed -n 's/.*generation: [0-9]* tokens, \([0-9.]*\) tok\/s.*/\1/p' | tail -1)
  gb=$(echo "$out" | sed -n 's/.*, \([0-9.]*\) GB read per decoded token.*/\1/p' | tail -1)
  if [ -z "$tg" ]; then log "| $label | depth $depth | FAILED: $(echo "$out" | tail -1) | | | |"; return; fi
  if [ "$new" -gt 1 ]; then
    log "$(awk -v l="$label" -v d="$depth" -v tg="$tg" -v gb="$gb" -v bw="${bandwidth:-0}" 'BEGIN {
      printf "| %s | decode at depth %d | %.1f | %.3f | %.0f | %s |", l, d, tg, gb, tg * gb, bw > 0 ? sprintf("%.0f%%", 100 * tg * gb / bw) : "?" }')"
  else
    log "| $label | prefill of $depth tokens | $pp | | | |"
  fi
}
for shape in "lite 27 V2-Lite" "v2 2 V2"; do
  set -- $shape
  if [ "$(elapsed)" -gt "$budget" ]; then log "| $3 | skipped: past the ${budget}s budget | | | | |"; continue; fi
  model=build/cuda/$1-$2layers-bf16.bin
  rm -f build/cuda/lite-2layers-*.bin  # the disk: 64 GB on the lent machines
  [ -s "$model" ] || $PYTHON export.py --random "$1" "$model" --layers "$2" --dtype bf16 > /dev/null 2> build/cuda/export.err ||
    { log "| $3 | export failed: $(tail -1 build/cuda/export.err) | | | | |"; continue; }
  bench "$3 ($2 layers, bf16)" "$model" 4 128
  bench "$3 ($2 layers, bf16)" "$model" 512 1
  [ "$1" = lite ] && [ "$(elapsed)" -lt "$budget" ] && bench "$3 ($2 layers, bf16)" "$model" 4096 64
  rm -f "$model"
done
log ""
log "total: $(elapsed) s"
exit "$checks"
