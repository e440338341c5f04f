#!/usr/bin/env bash
# make bench: prefill and decode speed, peak RSS and the decode roofline on random weights of
# a real shape, DeepSeek-V2-Lite or DeepSeek-V2 (python3 export.py --random SHAPE --layers N --dtype D).
#   tests/bench.sh [LAYERS] [DTYPES] [RUNS] [SHAPE] [DEPTHS]   defaults: 8 "q8 bf16" 5 lite "2048 8192"
# DEPTHS: after the table, decode speed after a context of each depth (one run each), against
# depth 0: what attention over a long latent cache costs; also drawn in build/bench_depth.svg.
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=${1:-8}; DTYPES=${2:-q8 bf16}; RUNS=${3:-5}; SHAPE=${4:-lite}; DEPTHS=${5-2048 8192}
PYTHON=${PYTHON:-python3}
mkdir -p build
cc -O3 -march=native -fopenmp -o build/bandwidth tests/bandwidth.c
threads=${OMP_NUM_THREADS:-$(nproc)}
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
prompt=$(seq -s' ' 1000 1127)   # 128 token ids
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
isa=$(grep -m1 -o -w -E 'avx512_vnni' /proc/cpuinfo || grep -m1 -o -w -E 'avx_vnni' /proc/cpuinfo || grep -m1 -o -w -E 'avx2' /proc/cpuinfo || grep -m1 -o -w asimddp /proc/cpuinfo || echo "none of avx512_vnni, avx_vnni, avx2, asimddp")
kernel=$(case $isa in avx512_vnni) echo "AVX-512 VNNI";; avx_vnni) echo "AVX-VNNI (256-bit)";; avx2) echo AVX2;; asimddp) echo "NEON sdot";; *) echo "portable C";; esac)
echo "CPU: $cpu, $threads threads, instruction set: $isa (q8 kernel: $kernel)"
cc -O3 -march=native -fopenmp -o build/peak tests/peak.c
echo "arithmetic peak (tests/peak.c): $(build/peak | sed 's/^[0-9]* threads: //')"
echo
echo "| $([ "$SHAPE" = lite ] && echo V2-Lite || echo V2) shape | prefill pp128 tok/s | decode tg64 tok/s | peak RSS | weights read per token | read bandwidth | decode roofline | fraction reached |"
echo "|---|---|---|---|---|---|---|---|"
for dtype in $DTYPES; do
  model=build/${SHAPE}-${LAYERS}layers-${dtype}.bin
  [ -f "$model" ] || $PYTHON export.py --random "$SHAPE" "$model" --layers "$LAYERS" --dtype "$dtype" >&2
  pp=(); tg=(); rss=(); bws=(); fr=()
  for run in $(seq "$RUNS"); do
    bw=$(build/bandwidth)  # before every run: this VM's bandwidth drifts by phase
    out=$( { /usr/bin/time -f "RSS %M" ./dsv2 "$model" -i "$prompt" -n 64 -t 0 -s 1 >/dev/null; } 2>&1 )
    pp+=("$(echo "$out" | sed -n 's/.*prompt: [0-9]* tokens, \([0-9.]*\) tok\/s.*/\1/p')")
    tg+=("$(echo "$out" | sed -n 's/.*generation: [0-9]* tokens, \([0-9.]*\) tok\/s.*/\1/p')")
    rss+=("$(echo "$out" | sed -n 's/^RSS \([0-9]*\)/\1/p')")
    gb=$(echo "$out" | sed -n 's/.*, \([0-9.]*\) GB read per decoded token.*/\1/p')
    bws+=("$bw"); fr+=("$(awk -v tg="${tg[-1]}" -v gb="$gb" -v bw="$bw" 'BEGIN { print 100 * tg * gb / bw }')")
  done
  pp_m=$(printf '%s\n' "${pp[@]}" | median); tg_m=$(printf '%s\n' "${tg[@]}" | median)
  rss_m=$(printf '%s\n' "${rss[@]}" | sort -g | tail -1)
  bw_m=$(printf '%s\n' "${bws[@]}" | median); fr_m=$(printf '%s\n' "${fr[@]}" | median)
  awk -v l="$LAYERS" -v d="$dtype" -v pp="$pp_m" -v tg="$tg_m" -v rss="$rss_m" -v gb="$gb" -v bw="$bw_m" -v fr="$fr_m" 'BEGIN {
    printf "| %d layers, %s | %.1f | %.1f | %.1f GB | %.3f GB | %.1f GB/s | %.1f tok/s | %.0f%% |\n", l, d, pp, tg, rss / 1e6, gb, bw, bw / gb, fr }'
done
echo
echo "medians of $RUNS runs; peak RSS is the largest; each run: a 128-token prompt (batched prefill), then 64 greedy"
echo "tokens. Read bandwidth: tests/bandwidth.c (4 streams per thread, huge pages) just before each run; roofline ="
echo "bandwidth / weights read per token; fraction reached: decode tok/s over that run's roofline."
[ -n "$DEPTHS" ] || exit 0
echo
echo "| decode after a context of | $(for d in $DTYPES; do printf '%s tok/s | %s vs depth 0 | ' "$d" "$d"; done)"
echo "|---|$(for d in $DTYPES; do printf -- '---|---|'; done)"
declare -A base
: > build/bench_depth.txt
for depth in 0 $DEPTHS; do
  row="| $depth tokens |"
  for dtype in $DTYPES; do
    model=build/${SHAPE}-${LAYERS}layers-${dtype}.bin
    n=$((depth > 0 ? depth : 4))
    seq -s' ' 1000 $((999 + n)) > build/bench_ids.txt
    tg=$(./dsv2 "$model" -f build/bench_ids.txt -n 32 -t 0 -c $((n + 40)) 2>&1 >/dev/null |
         sed -n 's/.*generation: [0-9]* tokens, \([0-9.]*\) tok\/s.*/\1/p')
    [ "$depth" = 0 ] && base[$dtype]=$tg
    echo "$dtype $depth ${tg:-0}" >> build/bench_depth.txt
    row="$row $tg | $(awk -v a="$tg" -v b="${base[$dtype]}" 'BEGIN { printf "%.0f%%", 100 * a / b }') |"
  done
  echo "$row"
done
echo
echo "one run each: the context is prefilled as one prompt (ids 1000..), then 32 greedy tokens are timed."
# The same as a chart: decode tok/s against context length, one line per dtype.
$PYTHON - build/bench_depth.txt build/bench_depth.svg "$cpu ($isa), $threads threads" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
series = {}
for dtype, depth, tg in rows: series.setdefault(dtype, []).append((int(depth), float(tg)))
W, H, L, B, T, R = 640, 400, 60, 50, 40, 110
xmax = max(d for s in series.values() for d, _ in s) or 1
ymax = max(t for s in series.values() for _, t in s) * 1.1 or 1
px = lambda d: L + (W - L - R) * d / xmax
py = lambda t: H - B - (H - B - T) * t / ymax
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<text x="{W / 2}" y="20" text-anchor="middle">decode speed against context length: {sys.argv[3]}</text>',
       f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
       f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
       f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">context (tokens)</text>',
       f'<text x="15" y="{(T + H - B) / 2}" transform="rotate(-90 15 {(T + H - B) / 2})" text-anchor="middle">tok/s</text>']
for i in range(6):
    t = ymax * i / 5
    out.append(f'<text x="{L - 6}" y="{py(t) + 4}" text-anchor="end">{t:.0f}</text>')
for d in sorted({d for s in series.values() for d, _ in s}):  # the depths measured
    out.append(f'<text x="{px(d)}" y="{H - B + 16}" text-anchor="middle">{d}</text>')
colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
for k, (dtype, pts) in enumerate(series.items()):
    c = colors[k % len(colors)]
    out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="' + " ".join(f"{px(d):.1f},{py(t):.1f}" for d, t in pts) + '"/>')
    out += [f'<circle cx="{px(d):.1f}" cy="{py(t):.1f}" r="3" fill="{c}"/>' for d, t in pts]
    out.append(f'<text x="{W - R + 10}" y="{T + 16 * k + 10}" fill="{c}">{dtype}</text>')
open(sys.argv[2], "w").write("\n".join(out + ["</svg>"]) + "\n")
print(f"chart: {sys.argv[2]}")
PY
