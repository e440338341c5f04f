#!/usr/bin/env bash
# make test-cuda (needs a GPU): the GPU build checked from the smallest piece up, so that the
# first failure names a kernel, then a layer:
#   1. build/cuda_kernels: every kernel against dsv2.c's function on the same inputs
#   2. the official fixtures through ./dsv2cu (logits <= 1e-4 at every position, greedy identical)
#   3. GPU vs CPU on random V2-Lite and V2 shapes (2 layers): logits, and layer by layer
#      (-m layers + tests/compare_layers.py names the first layer and quantity that differ).
#      bf16: the same file on the CPU (which widens bf16 weights, as the GPU does): <= 1e-3 of the
#      logit scale. q8: the CPU on f32 weights dequantized from the same q8 file (export.py Q8
#      OUT --dtype f32), since the CPU's q8 kernels also quantize activations: <= 1e-4.
#   4. -g 0,0 (the layer split on one device) == -g 0 bit for bit
#   5. 5,000 positions layer by layer against the CPU; a model that cannot fit is refused up front
# Every run's exit code and output size are checked, outputs are removed before each run, stderr
# is kept in build/cuda/*.err. Last line: N passed, N failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=build/cuda; mkdir -p "$work"
pass=0; fail=0
result() { if [ "$1" = 0 ]; then pass=$((pass+1)); echo "  ok    $2"; else fail=$((fail+1)); echo "  FAIL  $2"; fi; }
# run NAME CMD...: stdout to $work/NAME.out, stderr to $work/NAME.err, both removed first; prints
# the error's last line on failure.
run() {
  local name=$1; shift
  rm -f "$work/$name.out" "$work/$name.err"
  "$@" > "$work/$name.out" 2> "$work/$name.err"
  local code=$?
  [ "$code" = 0 ] || { echo "        $name: exit $code: $(tail -1 "$work/$name.err")"; }
  return $code
}
export_random() {  # export_random SHAPE DTYPE -> prints the path (made once)
  local out=$work/$1-2layers-$2.bin
  [ -s "$out" ] || $PYTHON export.py --random "$1" "$out" --layers 2 --dtype "$2" > /dev/null 2> "$work/export.err" || return 1
  echo "$out"
}

echo "0. malformed -g lists are refused in one line"
for g in "" "0," ",0" "a" "0,,1" "0,99999"; do
  run bad_g ./dsv2cu models/tiny/model.bin -i hi -n 1 -g "$g"
  code=$?
  [ "$code" = 1 ] && [ "$(grep -c 'dsv2: error: -g' "$work/bad_g.err")" = 1 ]
  result $? "-g \"$g\": exit $code, $(tail -1 "$work/bad_g.err")"
done

echo "1. kernels"
build/cuda_kernels | tee "$work/kernels.log"
result "${PIPESTATUS[0]}" "build/cuda_kernels: $(tail -1 "$work/kernels.log")"

echo "2. fixtures through ./dsv2cu"
DSV2_BIN=./dsv2cu DSV2_GPU_BUILD=1 PYTHON=$PYTHON ./test_all tests/fixtures/lite tests/fixtures/v2 tests/fixtures/v2-bf16-sharded > "$work/fixtures.log" 2>&1
code=$?
grep -E "FAIL" "$work/fixtures.log" | head -20
result "$code" "fixtures through ./dsv2cu: $(tail -1 "$work/fixtures.log")"

echo "3. GPU vs CPU, random weights of real shapes, 2 layers"
ids=$(seq -s' ' 100 115)
for case in "lite bf16" "lite q8" "v2 bf16"; do
  set -- $case; shape=$1; dtype=$2
  model=$(export_random "$shape" "$dtype") || { result 1 "$shape $dtype: export.py --random failed"; continue; }
  cpu_model=$model
  if [ "$dtype" = q8 ]; then
    cpu_model=${model%.bin}-dequantized.bin
    [ -s "$cpu_model" ] || $PYTHON export.py "$model" "$cpu_model" --dtype f32 > /dev/null 2> "$work/export.err" || { result 1 "$shape q8: dequantizing failed"; continue; }
  fi
  V=102400; T=16
  run cpu ./dsv2 "$cpu_model" -m logits -i "$ids" -o "$work/cpu.logits" &&
  run gpu ./dsv2cu "$model" -m logits -i "$ids" -o "$work/gpu.logits" &&
  run gpu2 ./dsv2cu "$model" -m logits -i "$ids" -o "$work/gpu2.logits" -g 0,0
  code=$?
  tol=$([ "$dtype" = bf16 ] && echo 1e-3 || echo 1e-4)
  if [ "$code" = 0 ]; then
    $PYTHON - "$tol" "$((T * V * 4))" "$work" <<'PY'
import os, sys, numpy as np
tol, size, work = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sizes = [os.path.getsize(f"{work}/{n}.logits") for n in ("cpu", "gpu", "gpu2")]
if sizes != [size] * 3: sys.exit(print(f"        output sizes {sizes}, expected {size} each") or 1)
a, b, c = (np.fromfile(f"{work}/{n}.logits", "<f4") for n in ("cpu", "gpu", "gpu2"))
scale = max(1.0, float(np.abs(a).max())); d = float(np.abs(a - b).max())
print(f"        max |gpu - cpu| {d:.2e} = {d / scale:.1e} of the logit scale {scale:.1f} (tolerance {tol:g}); top-1 same at "
      f"{int((a.reshape(-1, 102400).argmax(1) == b.reshape(-1, 102400).argmax(1)).sum())}/{a.size // 102400}")
sys.exit(0 if d <= tol * scale and np.isfinite(b).all() else 1)
PY
    code=$?
  fi
  result "$code" "$shape shape, 2 layers, $dtype: GPU vs CPU logits at $T positions"
  cmp -s "$work/gpu.logits" "$work/gpu2.logits"
  result $? "$shape shape, $dtype: -g 0,0 == -g 0, bit for bit"
  run cpu_layers ./dsv2 "$cpu_model" -m layers -i "$ids" -o "$work/cpu.layers" &&
  run gpu_layers ./dsv2cu "$model" -m layers -i "$ids" -o "$work/gpu.layers" &&
  $PYTHON tests/compare_layers.py "$work/gpu.layers" "$work/cpu.layers" --tol "$tol" | tail -3
  result "${PIPESTATUS[0]}" "$shape shape, $dtype: GPU vs CPU layer by layer (hidden state, latent cache, experts, gates)"
  [ "$dtype" = q8 ] && rm -f "$cpu_model"
done

echo "4. 5,000 positions, layer by layer"
# V2-Lite's attention and experts at 2 layers with a 1,000-token vocabulary: the CPU reference
# runs token by token, and V2-Lite's 102,400-row lm_head would be most of its time
model=$work/lite-vocab1000-2layers-bf16.bin
$PYTHON -c "import json, sys; sys.path.insert(0, '.'); import export
c = export.preset_config('lite', 2); c.update(vocab_size=1000, bos_token_id=998, eos_token_id=999)
json.dump(c, open('$work/lite-vocab1000.json', 'w'))" &&
{ [ -s "$model" ] || $PYTHON export.py --random "$work/lite-vocab1000.json" "$model" --dtype bf16 > /dev/null 2> "$work/export.err"; }
$PYTHON -c "import random; random.seed(1); print(' '.join(str(random.randrange(1000)) for _ in range(5000)))" > "$work/ids5000.txt"
run cpu_long ./dsv2 "$model" -m layers -f "$work/ids5000.txt" -c 5000 -o "$work/cpu_long.layers" &&
run gpu_long ./dsv2cu "$model" -m layers -f "$work/ids5000.txt" -c 5000 -o "$work/gpu_long.layers" &&
$PYTHON tests/compare_layers.py "$work/gpu_long.layers" "$work/cpu_long.layers" --tol 1e-3 | tail -3
result "${PIPESTATUS[0]}" "V2-Lite shape (vocabulary 1,000), bf16: 5,000 positions, GPU vs CPU layer by layer"
rm -f "$model"

echo "5. a model that cannot fit is refused before any upload"
devices=$(printf '0,%.0s' $(seq 199))0  # -g 0,0,...: 200 shares of GPU 0
run refuse ./dsv2cu "$work/v2-2layers-bf16.bin" -i "1 2 3" -n 1 -g "$devices"
code=$?
[ "$code" = 1 ] && grep -q "does not fit" "$work/refuse.err" && [ "$(grep -c error "$work/refuse.err")" = 1 ]
result $? "200 shares of one GPU: refused with the figures (exit $code): $(grep -o 'does not fit.\{0,160\}' "$work/refuse.err" | head -1)"
rm -f "$work"/*.layers "$work"/*.logits
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
