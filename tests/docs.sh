#!/usr/bin/env bash
# Every command of the docs runs as written: each ```sh block of docs/walkthrough.md and
# docs/exercises.md runs from the repository root with bash -e (python3 as $PYTHON, the one
# with numpy). Blocks fenced ```sh slow need `make class` first: they run with SLOW=1
# (make docs-check); blocks fenced ```sh shown print what the doc shows, and every line they print
# must be in the doc, verbatim. One line per block: "ok ..." or "FAIL ...". Run by make test.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SLOW=${SLOW:-0}
out=build/docs
rm -rf $out && mkdir -p $out
for doc in docs/walkthrough.md docs/exercises.md; do
  name=$(basename "$doc" .md)
  awk -v dir=$out -v name="$name" -v slow="$SLOW" '
    /^```sh( slow| shown)?$/ {
      if ($2 == "slow" && slow != 1) next
      n++; on = 1
      if ($2 == "shown") printf "" > sprintf("%s/%s-%02d.shown", dir, name, n)
      next }
    /^```/ { on = 0; next }
    on { f = sprintf("%s/%s-%02d.sh", dir, name, n); sub(/^python3 /, "\"$PYTHON\" "); gsub(/&& python3 /, "\\&\\& \"$PYTHON\" "); print > f }
  ' "$doc"
done
for block in $out/*.sh; do
  first=$(grep -m1 . "$block")
  doc=docs/$(basename "$block" | sed 's/-[0-9]*\.sh$//').md
  missing=0
  if PYTHON=$PYTHON bash -e "$block" > "$block.out" 2>"$block.err"; then
    if [ -f "${block%.sh}.shown" ]; then  # the doc must show this output as it is
      while IFS= read -r line; do grep -qxF -- "$line" "$doc" || grep -qxF -- "    $line" "$doc" || missing=$((missing + 1)); done < "$block.out"
    fi
    if [ $missing = 0 ]; then echo "ok    docs: $(basename "$block" .sh): $first"
    else echo "FAIL  docs: $(basename "$block" .sh): $first: $missing lines of its output are not in $doc"; fi
  else
    echo "FAIL  docs: $(basename "$block" .sh): $first (exit $?; $(tail -1 "$block.err"))"
  fi
done
