#!/usr/bin/env bash
# make test-arm: dsv2 and test_all cross-compiled for ARM64 with NEON and the dot-product
# extension (Debian: gcc-aarch64-linux-gnu, qemu-user-static) and run under qemu-user: the unit
# tests (every q8 kernel against the portable one), the fixtures through the ARM binary, and q8
# and q4 against f32 on the built-in model. Correctness only: qemu says nothing about speed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CC_ARM=${CC_ARM:-aarch64-linux-gnu-gcc}
Q="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
command -v $CC_ARM >/dev/null && command -v qemu-aarch64-static >/dev/null ||
  { echo "error: needs $CC_ARM and qemu-aarch64-static (apt-get install -y gcc-aarch64-linux-gnu qemu-user-static)"; exit 1; }
mkdir -p build
FLAGS="-std=c11 -Wall -Wextra -Werror -O2 -march=armv8.2-a+dotprod -fopenmp"
$CC_ARM $FLAGS -o build/dsv2_arm dsv2.c -lm
$CC_ARM $FLAGS -Wno-unused-function -o build/test_all_arm test_all.c -lm
$Q build/test_all_arm --units | tail -1 | tee build/arm.log
DSV2_BIN="$Q build/dsv2_arm" PYTHON=$PYTHON $Q build/test_all_arm tests/fixtures/lite tests/fixtures/v2 | tail -1 | tee -a build/arm.log
$PYTHON export.py models/tiny/model.bin build/tiny-q8.bin --dtype q8 >/dev/null
$Q build/dsv2_arm build/tiny-q8.bin -m eval -f tests/heldout.txt -r models/tiny/model.bin | tee build/arm-eval.log | tail -2
$PYTHON export.py models/tiny/model.bin build/tiny-q4.bin --dtype q4 >/dev/null
$Q build/dsv2_arm build/tiny-q4.bin -m eval -f tests/heldout.txt -r models/tiny/model.bin | tee build/arm-eval-q4.log | tail -2
if grep -q " [1-9][0-9]* failed" build/arm.log; then echo "test-arm: FAILED"; exit 1; fi
awk '/^KL/ {exit !($5 < 0.005)}' build/arm-eval.log || { echo "test-arm: q8 KL too high"; exit 1; }
awk '/^KL/ {exit !($5 < 0.03)}' build/arm-eval-q4.log || { echo "test-arm: q4 KL too high"; exit 1; }
echo "test-arm: passed"
