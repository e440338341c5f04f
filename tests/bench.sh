#!/usr/bin/env bash
# make bench: prefill and decode speed, peak RSS and the decode roofline on random weights of
# the real DeepSeek-V2-Lite shape (python3 export.py --random lite --layers N --dtype D).
#   tests/bench.sh [LAYERS] [DTYPES] [RUNS]     defaults: 8 "q8 bf16" 5
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=${1:-8}; DTYPES=${2:-q8 bf16}; RUNS=${3:-5}
PYTHON=${PYTHON:-python3}
mkdir -p build
cc -O3 -march=native -fopenmp -o build/bandwidth tests/bandwidth.c
threads=${OMP_NUM_THREADS:-$(nproc)}
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
bw=$(build/bandwidth)
prompt=$(seq -s' ' 1000 1127)   # 128 token ids
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
echo "CPU: $cpu, $threads threads; memory read bandwidth $bw GB/s (tests/bandwidth.c: 4 streams per thread)"
echo
echo "| V2-Lite shape | prefill pp128 tok/s | decode tg64 tok/s | peak RSS | weights read per token | decode roofline | fraction reached |"
echo "|---|---|---|---|---|---|---|"
for dtype in $DTYPES; do
  model=build/lite${LAYERS}-${dtype}.bin
  [ -f "$model" ] || $PYTHON export.py --random lite "$model" --layers "$LAYERS" --dtype "$dtype" >&2
  pp=(); tg=(); rss=()
  for run in $(seq "$RUNS"); do
    out=$( { /usr/bin/time -f "RSS %M" ./dsv2 "$model" -i "$prompt" -n 64 -t 0 -s 1 >/dev/null; } 2>&1 )
    pp+=("$(echo "$out" | sed -n 's/.*prompt: [0-9]* tokens, \([0-9.]*\) tok\/s.*/\1/p')")
    tg+=("$(echo "$out" | sed -n 's/.*generation: [0-9]* tokens, \([0-9.]*\) tok\/s.*/\1/p')")
    rss+=("$(echo "$out" | sed -n 's/^RSS \([0-9]*\)/\1/p')")
    gb=$(echo "$out" | sed -n 's/.*, \([0-9.]*\) GB read per decoded token.*/\1/p')
  done
  pp_m=$(printf '%s\n' "${pp[@]}" | median); tg_m=$(printf '%s\n' "${tg[@]}" | median)
  rss_m=$(printf '%s\n' "${rss[@]}" | sort -g | tail -1)
  awk -v l="$LAYERS" -v d="$dtype" -v pp="$pp_m" -v tg="$tg_m" -v rss="$rss_m" -v gb="$gb" -v bw="$bw" 'BEGIN {
    roof = bw / gb; printf "| %d layers, %s | %.1f | %.1f | %.1f GB | %.3f GB | %.1f tok/s | %.0f%% |\n", l, d, pp, tg, rss / 1e6, gb, roof, 100 * tg / roof }'
done
echo
echo "medians of $RUNS runs; peak RSS is the largest; each run: a 128-token prompt (batched prefill), then 64 greedy tokens"
