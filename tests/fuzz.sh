#!/usr/bin/env bash
# make fuzz-smoke (30 s a target) and make fuzz-long: every harness of tests/fuzz.c under AFL++
# (Debian's afl++), built with AddressSanitizer and UBSan, plus export.py's reader
# (tests/fuzz_export.py). Fails on any crash or hang. The statistics of each run go to
# build/fuzz-out/TARGET/default/fuzzer_stats; a summary line per target is printed.
#   tests/fuzz.sh SECONDS [TARGET...]     targets: loader tokblob encode-v2 encode-v3 decode regex export
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-30}; shift || true
TARGETS=${*:-loader tokblob encode-v2 encode-v3 decode regex export}
PYTHON=${PYTHON:-python3}
command -v afl-fuzz >/dev/null || { echo "error: afl-fuzz not found (apt-get install -y afl++)"; exit 1; }
mkdir -p build/fuzz-out
[ -f build/fuzz-v2.tok ] || $PYTHON export.py --tokenizer tests/fixtures/tokenizer/tokenizer.json build/fuzz-v2.tok >/dev/null
[ -f build/fuzz-v3.tok ] || $PYTHON export.py --tokenizer tests/fixtures/tokenizer/deepseek-v3/tokenizer.json build/fuzz-v3.tok >/dev/null
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_QUIET=1
export ASAN_OPTIONS=abort_on_error=1:symbolize=0:detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1
failed=0
for target in $TARGETS; do
  out=build/fuzz-out/$target
  case $target in
    loader)    seeds=tests/fuzz/loader;  cmd=(build/fuzz loader @@) ;;
    tokblob)   seeds=tests/fuzz/tokblob; cmd=(build/fuzz tokblob @@) ;;
    encode-v2) seeds=tests/fuzz/encode;  cmd=(build/fuzz encode build/fuzz-v2.tok @@) ;;
    encode-v3) seeds=tests/fuzz/encode;  cmd=(build/fuzz encode build/fuzz-v3.tok @@) ;;
    decode)    seeds=tests/fuzz/decode;  cmd=(build/fuzz decode build/fuzz-v2.tok @@) ;;
    regex)     seeds=tests/fuzz/regex;   cmd=(build/fuzz regex build/fuzz-v2.tok @@) ;;
    export)
      $PYTHON tests/fuzz_export.py "$SECONDS_EACH" build/fuzz-out/export | tee build/fuzz-out/export.txt
      grep -q " 0 crashes" build/fuzz-out/export.txt || failed=1
      continue ;;
    *) echo "unknown target $target"; exit 1 ;;
  esac
  resume=-i; input=$seeds
  if [ -d "$out/default/queue" ]; then resume=-i; input=-; fi  # continue an earlier run's queue
  afl-fuzz $resume "$input" -o "$out" -V "$SECONDS_EACH" -t 2000 -m none -- "${cmd[@]}" >"$out.log" 2>&1 || true
  stats=$out/default/fuzzer_stats
  if [ ! -f "$stats" ]; then echo "$target: afl-fuzz did not start (see $out.log)"; tail -5 "$out.log"; failed=1; continue; fi
  get() { sed -n "s/^$1 *: *//p" "$stats"; }
  crashes=$(get saved_crashes); hangs=$(get saved_hangs)
  echo "$target: $(get execs_done) execs in $(get run_time) s ($(get execs_per_sec)/s), $(get corpus_count) inputs in the corpus, $crashes crashes, $hangs hangs"
  if [ "${crashes:-1}" != 0 ] || [ "${hangs:-1}" != 0 ]; then failed=1; ls "$out/default/crashes" "$out/default/hangs" 2>/dev/null | head; fi
done
exit $failed
