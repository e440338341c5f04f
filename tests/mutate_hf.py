#!/usr/bin/env python3
"""A copy of a Hugging Face folder with one thing broken, for export.py's bad-input tests.

    python3 tests/mutate_hf.py SRC DST KIND CODE

KIND says what CODE (a Python statement) edits:
  config     c: the parsed config.json (or CODE may assign `c = ...` to replace it)
  header     h: the JSON header of the first safetensors file (tensors keep their bytes)
  index      i: model.safetensors.index.json
  tokenizer  t: tokenizer.json (copied from tests/fixtures/tokenizer when SRC has none)
  data       d: the first safetensors file's bytes after its header (a bytearray), n: header length
Everything else is copied unchanged.
"""
import json
import os
import shutil
import struct
import sys


def main(src, dst, kind, code):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    shards = sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))
    if kind == "config":
        path = os.path.join(dst, "config.json")
        env = {"c": json.load(open(path))}
        exec(code, env)
        json.dump(env["c"], open(path, "w"))
    elif kind in ("header", "data"):
        path = os.path.join(dst, shards[0])
        raw = open(path, "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        env = {"h": json.loads(raw[8:8 + n]), "d": bytearray(raw[8 + n:]), "n": n}
        exec(code, env)
        head = json.dumps(env["h"]).encode() if kind == "header" else raw[8:8 + n]
        open(path, "wb").write(struct.pack("<Q", len(head)) + head + bytes(env["d"]))
    elif kind == "index":
        path = os.path.join(dst, "model.safetensors.index.json")
        env = {"i": json.load(open(path))}
        exec(code, env)
        json.dump(env["i"], open(path, "w"))
    elif kind == "tokenizer":
        path = os.path.join(dst, "tokenizer.json")
        if not os.path.exists(path):
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join("tests/fixtures/tokenizer", name), dst)
        env = {"t": json.load(open(path, encoding="utf-8"))}
        exec(code, env)
        json.dump(env["t"], open(path, "w", encoding="utf-8"), ensure_ascii=False)
    else:
        sys.exit(f"mutate_hf.py: unknown kind {kind}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
