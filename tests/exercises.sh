#!/usr/bin/env bash
# The checks of docs/exercises.md can fail: each wrong answer below (the change an exercise asks
# about, or a typical mistake) is applied to a copy of dsv2.c in build/ex, built, and the
# exercise's own check is run on it; it must fail. One line per exercise: "ok ..." or "FAIL ...".
# Run by make test (test_all), from the repository root.   PYTHON=python3 tests/exercises.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CC=${CC:-cc}
out=build/ex
mkdir -p $out

# mutate NAME OLD NEW: build/ex/NAME/{dsv2,test_all} from dsv2.c with OLD replaced by NEW once
mutate() {
  local dir=$out/$1
  rm -rf "$dir"; mkdir -p "$dir"  # no stale build from an earlier dsv2.c
  cp test_all.c "$dir/"
  OLD="$2" NEW="$3" $PYTHON - "$dir/dsv2.c" <<'EOF' || return 1
import os, sys
s = open("dsv2.c").read()
old, new = os.environ["OLD"], os.environ["NEW"]
if s.count(old) != 1:
    sys.exit(f"the exercise's code is not in dsv2.c as written ({s.count(old)} matches): update tests/exercises.sh")
open(sys.argv[1], "w").write(s.replace(old, new))
EOF
  $CC -std=c11 -O1 -fopenmp -o "$dir/dsv2" "$dir/dsv2.c" -lm &&
  $CC -std=c11 -O1 -fopenmp -Wno-unused-function -o "$dir/test_all" "$dir/test_all.c" -lm
}

# fixture_check NAME DIR: runs the mutated test_all on DIR; prints its first FAIL line
fixture_check() {
  DSV2_BIN=$out/$1/dsv2 PYTHON=$PYTHON $out/$1/test_all "$2" 2>&1 | grep -m1 FAIL
}

report() {  # report OK MESSAGE
  if [ "$1" = 1 ]; then echo "ok    $2"; else echo "FAIL  $2"; fi
}

kl_of() { sed -n 's/^KL(reference || this) mean \([^ ]*\) .*/\1/p'; }

# 1: no group mask -> v2 fails at routing
mutate ex1 '        for (int e = 0; e < E; e++)
            if (!group_taken[e / per_group]) masked[e] = 0.0f;
' ''
first=$(DSV2_BIN=$out/ex1/dsv2 PYTHON=$PYTHON $out/ex1/test_all tests/fixtures/v2 2>&1 | grep FAIL | grep -m1 "routing of layer 1")
report "$([[ -n $first ]] && echo 1)" "exercise 1: without the group mask, ./test_all tests/fixtures/v2 fails: ${first#*FAIL  }"

# 2: no mscale^2 -> lite fails at layer 0's hidden state
mutate ex2 '        scale *= m * m;' '        (void)m;'
first=$(fixture_check ex2 tests/fixtures/lite)
report "$([[ $first == *"hidden state after layer 0"* ]] && echo 1)" "exercise 2: without mscale^2, ./test_all tests/fixtures/lite fails: ${first#*FAIL  }"

# 4: the cache line of -m trace for r = 12 (448 B per token); the unchanged config (r = 48) fails it
mkdir -p $out/ex4 && cp models/class/tokenizer.json models/class/tokenizer_config.json $out/ex4/
sed 's/"kv_lora_rank": 48/"kv_lora_rank": 12/' models/class/config.json > $out/ex4/config.json
$PYTHON export.py --random $out/ex4/config.json $out/ex4-init.bin --dtype f32 --seed 1 >/dev/null
$PYTHON export.py --random models/class/config.json $out/class-init.bin --dtype f32 --seed 1 >/dev/null
narrow=$(./dsv2 $out/ex4-init.bin -m trace -i "And" 2>/dev/null | grep -c "KV cache after 1 tokens: MLA absorbed 448.0 B")
wide=$(./dsv2 $out/class-init.bin -m trace -i "And" 2>/dev/null | grep -c "KV cache after 1 tokens: MLA absorbed 448.0 B")
report "$([[ $narrow -ge 1 && $wide = 0 ]] && echo 1)" "exercise 4: the 448 B cache check holds for r = 12 and fails for the unchanged r = 48"

# 5: the q8 check against an unrelated model fails (KL above 1)
$PYTHON export.py models/tiny/model.bin $out/tiny-q8.bin --dtype q8 >/dev/null
kl=$(./dsv2 $out/tiny-q8.bin -m eval -f tests/heldout.txt -r $out/class-init.bin -c 256 2>/dev/null | kl_of)
report "$(awk -v k="${kl:-0}" 'BEGIN {print (k > 1) ? 1 : 0}')" "exercise 5: q8 against an unrelated model: KL $kl (the check wants < 0.005)"

# 6 (and 1): the new config's fixture catches the missing group mask
sed -e 's/"n_group": 8/"n_group": 2/' -e 's/"topk_group": 3/"topk_group": 1/' \
    -e 's/"num_experts_per_tok": 4/"num_experts_per_tok": 3/' tests/configs/unseen-groups.json > $out/ex6.json
$PYTHON tests/reference.py $out/ex6.json $out/ex6-fixture >/dev/null
first=$(DSV2_BIN=$out/ex1/dsv2 PYTHON=$PYTHON $out/ex1/test_all $out/ex6-fixture 2>&1 | grep FAIL | grep -m1 "routing of layer")
report "$([[ -n $first ]] && echo 1)" "exercise 6: exercise 1's bug on the new fixture fails: ${first#*FAIL  }"

# 7: the absorbed score without q^R . k^R -> naive vs absorbed KL far above 1e-9
mutate ex7 '            memcpy(q_cat + t * H * width + r, q_nope + (size_t)t * H * dq + dn,
                   dr * sizeof(float));' '            memset(q_cat + t * H * width + r, 0, dr * sizeof(float));'
kl=$($out/ex7/dsv2 models/tiny/model.bin -m eval -f tests/heldout.txt -a naive -r models/tiny/model.bin -A absorb 2>/dev/null | kl_of)
report "$(awk -v k="${kl:-0}" 'BEGIN {print (k > 1e-9) ? 1 : 0}')" "exercise 7: absorbed without the rope term: naive vs absorbed KL $kl (the check wants < 1e-9)"

# 8: the NeoX rotation -> lite fails at the latent cache
mutate ex8 '        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cos_row[i] - b * sin_row[i];
        x[2 * i + 1] = a * sin_row[i] + b * cos_row[i];' '        float a = x[i], b = x[i + dim / 2];
        x[i] = a * cos_row[i] - b * sin_row[i];
        x[i + dim / 2] = a * sin_row[i] + b * cos_row[i];'
first=$(DSV2_BIN=$out/ex8/dsv2 PYTHON=$PYTHON $out/ex8/test_all tests/fixtures/lite 2>&1 | grep FAIL | grep -m1 "latent KV cache")
report "$([[ -n $first ]] && echo 1)" "exercise 8: the NeoX rotation fails ./test_all tests/fixtures/lite: ${first#*FAIL  }"

# 10: normalise and scale -> the official v2 fixture passes, the new config's fixture fails
mutate ex10 '(float)(weight[k] / (sum + 1e-20))' '(float)(weight[k] / (sum + 1e-20) * c->routed_scaling_factor)'
v2=$(DSV2_BIN=$out/ex10/dsv2 PYTHON=$PYTHON $out/ex10/test_all tests/fixtures/v2 2>&1 | tail -1)
$PYTHON tests/reference.py docs/solutions/norm-and-scale.json $out/ex10-fixture >/dev/null
first=$(fixture_check ex10 $out/ex10-fixture)
report "$([[ $v2 == *" 0 failed" && $first == *"hidden state after layer"* ]] && echo 1)" "exercise 10: normalise-and-scale passes tests/fixtures/v2 ($v2) and fails the new fixture: ${first#*FAIL  }"
