#!/usr/bin/env python3
"""Write a Hugging Face-style DeepSeek-V2 folder with random BF16 weights, sharded, streaming.

    python3 tests/make_hf_checkpoint.py lite|v2 OUT_DIR [--layers N] [--shard-mb M]

Used to measure export.py on real shapes (peak RSS, speed) without downloading weights.
The tensors are written one at a time, so this needs little memory too.
"""
import json, os, struct, sys
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import export  # noqa: E402  (the tensor names and shapes come from export.tensor_plan)

def main():
    args = sys.argv[1:]
    layers = None
    shard_bytes = 2 << 30
    if "--layers" in args:
        i = args.index("--layers"); layers = int(args[i + 1]); del args[i:i + 2]
    if "--shard-mb" in args:
        i = args.index("--shard-mb"); shard_bytes = int(args[i + 1]) << 20; del args[i:i + 2]
    preset, out = args
    hf = export.preset_config(preset, layers)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    plan = list(export.tensor_plan(export.read_config(os.path.join(out, "config.json"))))
    shards, cur, size = [], [], 0
    for name, shape, _ in plan:  # group tensors into shards of about shard_bytes
        nbytes = int(np.prod(shape)) * 2
        if cur and size + nbytes > shard_bytes:
            shards.append(cur); cur, size = [], 0
        cur.append((name, shape)); size += nbytes
    shards.append(cur)
    rng = np.random.default_rng(0)
    weight_map = {}
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in tensors:
            n = int(np.prod(shape)) * 2
            header[name] = dict(dtype="BF16", shape=list(shape), data_offsets=[offset, offset + n])
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(out, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in tensors:
                rows_per = max(1, (32 << 20) // (shape[-1] * 4))
                rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
                for r in range(0, rows, rows_per):
                    n = min(rows_per, rows - r) * shape[-1]
                    a = (1.0 + 0.02 * rng.standard_normal(n, dtype=np.float32)) if len(shape) == 1 else \
                        0.02 * rng.standard_normal(n, dtype=np.float32)
                    f.write(export.to_bf16(a, "F32").data)
        print(f"wrote {fname}", file=sys.stderr)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


if __name__ == "__main__":
    main()
