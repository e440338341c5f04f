#!/usr/bin/env python3
"""A mutation fuzzer for export.py's readers (config.json, safetensors headers, the shard index,
tokenizer.json), in process: each input is a mutated copy of a real one (bytes flipped,
inserted, cut, or a JSON value replaced by one of another type), and export.py must either read
it or stop with its one-line error (SystemExit 1). Any other exception is a crash, saved in
OUT_DIR/crashes with its traceback.

    python3 tests/fuzz_export.py SECONDS OUT_DIR
"""
import io
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import export  # noqa: E402

_PROPS = export.unicode_properties()
export.unicode_properties = lambda: _PROPS  # computed once: 1.1M code points per call otherwise

VALUES = [None, True, 0, -1, 1, 2, 2**31, 2**63, 1e308, float("nan"), "", "x", "yarn", [], [1], {}, {"a": 1}]


def mutate_json(obj, rng):
    """Replaces one value somewhere in obj (a parsed JSON document) with one of another kind."""
    if isinstance(obj, dict) and obj and rng.random() < 0.8:
        key = rng.choice(list(obj))
        if rng.random() < 0.1:
            del obj[key]
        else:
            obj[key] = mutate_json(obj[key], rng)
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.8:
        i = rng.randrange(len(obj))
        obj[i] = mutate_json(obj[i], rng)
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool) and rng.random() < 0.5:
        return obj + rng.choice([-1, 1, -obj, obj, 1 << 20])
    return rng.choice(VALUES)


def mutate_bytes(data, rng):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, at = rng.random(), rng.randrange(len(data) + 1)
        if op < 0.4 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op < 0.6:
            data[at:at] = bytes([rng.randrange(256)])
        elif op < 0.8:
            del data[at:at + rng.randint(1, 8)]
        else:
            data[at:at] = data[at:at + rng.randint(1, 16)]
    return bytes(data)


def mutate_text(text, rng):
    """A JSON document mutated as a value (mostly) or as bytes."""
    try:
        if rng.random() < 0.7:
            return json.dumps(mutate_json(json.loads(text), rng)).encode()
    except ValueError:
        pass
    return mutate_bytes(text.encode() if isinstance(text, str) else text, rng)


def safetensors_with(header, data):
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def run_one(kind, folder, rng, seeds):
    """Writes one mutated input into folder and runs the reader of that kind on it."""
    if kind == "config":
        open(os.path.join(folder, "config.json"), "wb").write(mutate_text(seeds["config"], rng))
        export.read_config(os.path.join(folder, "config.json"))
    elif kind == "safetensors":
        raw = seeds["safetensors"]
        (n,) = struct.unpack("<Q", raw[:8])
        if rng.random() < 0.8:
            body = safetensors_with(mutate_text(raw[8:8 + n].decode(), rng), raw[8 + n:])
        else:
            body = mutate_bytes(raw[:64], rng) + raw[64:]
        open(os.path.join(folder, "model.safetensors"), "wb").write(body)
        source = export.SafeTensors(folder)
        for name, (_, dtype, shape, _) in list(source.tensors.items())[:3]:
            for _ in source.chunks(name, shape):
                pass
    elif kind == "index":
        index = mutate_text(seeds["index"], rng)
        open(os.path.join(folder, "model.safetensors.index.json"), "wb").write(index)
        export.SafeTensors(folder)
    else:
        open(os.path.join(folder, "tokenizer.json"), "wb").write(mutate_text(seeds["tokenizer"], rng))
        export.read_tokenizer(os.path.join(folder, "tokenizer.json"))


def main(seconds, out_dir):
    os.makedirs(os.path.join(out_dir, "crashes"), exist_ok=True)
    lite, sharded = "tests/fixtures/lite", "tests/fixtures/v2-bf16-sharded"
    seeds = {"config": open(os.path.join(lite, "config.json")).read(),
             "safetensors": open(os.path.join(lite, "model.safetensors"), "rb").read(),
             "index": open(os.path.join(sharded, "model.safetensors.index.json")).read(),
             "tokenizer": open("tests/fuzz/export/tokenizer.json", encoding="utf-8").read()}
    rng = random.Random(int(time.time()))
    execs = crashes = 0
    end = time.time() + seconds
    with tempfile.TemporaryDirectory() as tmp:
        for name in os.listdir(sharded):
            if name.endswith(".safetensors"):
                shutil.copy(os.path.join(sharded, name), tmp)
        shutil.copy("tests/fuzz/export/tokenizer_config.json", tmp)
        stderr = sys.stderr
        while time.time() < end:
            kind = rng.choice(["config", "safetensors", "index", "tokenizer"])
            folder = os.path.join(tmp, kind)
            os.makedirs(folder, exist_ok=True)
            if kind == "index":
                for name in os.listdir(tmp):
                    if name.endswith(".safetensors") and not os.path.exists(os.path.join(folder, name)):
                        os.symlink(os.path.join(tmp, name), os.path.join(folder, name))
            sys.stderr = io.StringIO()
            try:
                run_one(kind, folder, rng, seeds)
            except SystemExit as e:
                if e.code != 1 or sys.stderr.getvalue().count("\n") != 1:
                    crashes += 1
                    save(out_dir, kind, folder, f"exit {e.code}: {sys.stderr.getvalue()!r}")
            except Exception:  # a traceback instead of one error line
                crashes += 1
                save(out_dir, kind, folder, traceback.format_exc())
            finally:
                sys.stderr = stderr
            execs += 1
    print(f"export: {execs} execs in {seconds} s ({execs / seconds:.0f}/s), {crashes} crashes, 0 hangs")
    return 0


def save(out_dir, kind, folder, why):
    dst = os.path.join(out_dir, "crashes", f"{kind}-{int(time.time() * 1000)}")
    shutil.copytree(folder, dst, symlinks=True)
    open(os.path.join(dst, "why.txt"), "w").write(why)


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]), sys.argv[2]))
