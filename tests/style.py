#!/usr/bin/env python3
"""The layout rules of dsv2.c, checked (make test runs this through test_all):
  - every equation 9..25 of the paper is tagged `eq. N` on a line of model code (code, not only
    a comment) before the end of the forward pass;
  - no intrinsic (immintrin, _mm*, __m512/__m256, arm_neon) before the end of the forward pass;
  - no line longer than 100 characters;
  - no function longer than 80 lines.
Prints one line per failure and a summary; exits 1 on any failure.

    python3 tests/style.py dsv2.c
"""
import re
import sys

MAX_LINE, MAX_FUNCTION = 100, 80


def split_comments(lines):
    """(code, comment) text of each line, following /* ... */ across lines."""
    out, in_comment = [], False
    for line in lines:
        code, comment, j = "", "", 0
        while j < len(line):
            if in_comment:
                k = line.find("*/", j)
                comment += line[j:] if k < 0 else line[j:k]
                j, in_comment = (len(line), True) if k < 0 else (k + 2, False)
            else:
                k = line.find("/*", j)
                code += line[j:] if k < 0 else line[j:k]
                j, in_comment = (len(line), False) if k < 0 else (k + 2, True)
        out.append((code, comment))
    return out


def equations(comment):
    """The equation numbers an `eq. 9`, `eq. 10-11` or `eq. 9, 15` tag names."""
    found = set()
    for m in re.finditer(r"eq\. ([0-9]+(?:-[0-9]+)?(?:, [0-9]+(?:-[0-9]+)?)*)", comment):
        for part in m.group(1).split(","):
            lo, _, hi = part.strip().partition("-")
            found.update(range(int(lo), int(hi or lo) + 1))
    return found


def main(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    failures = []
    ends = [i for i, l in enumerate(lines) if l.startswith("static float *forward(")]
    if not ends:
        print(f"{path}: no forward() found")
        return 1
    model_end = ends[0]
    parts = split_comments(lines)
    tagged = {}
    for i, (code, comment) in enumerate(parts[:model_end]):
        if re.search(r"[;{}=(]", code):
            for n in equations(comment):
                tagged.setdefault(n, i + 1)
    for n in range(9, 26):
        if n not in tagged:
            failures.append(f"eq. {n} is not tagged on a line of model code before forward()")
    for i, (code, _) in enumerate(parts[:model_end]):
        if re.search(r"immintrin|arm_neon|\b_mm[0-9]*_|__m(128|256|512)", code):
            failures.append(f"line {i + 1}: an intrinsic before the end of the forward pass")
    for i, line in enumerate(lines):
        if len(line) > MAX_LINE:
            failures.append(f"line {i + 1}: {len(line)} characters (at most {MAX_LINE})")
    start = None
    for i, line in enumerate(lines):
        if re.match(r"^(static |int |void |float |_Noreturn )", line) and "(" in line and not line.rstrip().endswith(";"):
            start = i
        elif line.startswith("}") and start is not None:
            if i - start + 1 > MAX_FUNCTION:
                failures.append(f"line {start + 1}: a function of {i - start + 1} lines (at most {MAX_FUNCTION})")
            start = None
    for f in failures:
        print(f"{path}: {f}")
    print(f"{path}: eq. 9-25 tagged in model code at lines {', '.join(str(tagged.get(n, '?')) for n in range(9, 26))}; "
          f"{len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "dsv2.c"))
