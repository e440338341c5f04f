#!/usr/bin/env python3
"""export.py never writes a file that dsv2 refuses (issue 13): random single-field mutations of
the built-in model's config.json go through `export.py --random` (2 layers, no tokenizer); every
file export.py writes must load in `./dsv2 FILE -m layout`, and every refusal must be one
`export.py: error:` line with exit 1. Prints one line per disagreement and a summary.

    python3 tests/header_rules.py [DSV2_BINARY] [CASES]
"""
import json
import math
import os
import random
import subprocess
import sys
import tempfile

INTS = ["vocab_size", "hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
        "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "first_k_dense_replace",
        "moe_layer_freq", "max_position_embeddings", "bos_token_id", "eos_token_id"]
FLOATS = ["rms_norm_eps", "rope_theta", "routed_scaling_factor", "aux_loss_alpha"]
ROPE = ["factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"]
INT_VALUES = [None, -1, 0, 1, 2, 3, 5, 8, 16, 17, 64, 4096, 1 << 20, 1 << 31, 2.5, "8", True]
FLOAT_VALUES = [None, -1.0, 0.0, 1e-300, 1e-7, 0.5, 1.0, 16.0, 1e300, float("nan"), float("inf"), "1"]


def floats_of(c):
    """A rough size, to skip mutations that would write gigabytes."""
    try:
        D, V = int(c["hidden_size"]), int(c["vocab_size"])
        width = max(int(c.get("intermediate_size") or 0), int(c.get("moe_intermediate_size") or 0))
        experts = int(c.get("n_routed_experts") or 0) + int(c.get("n_shared_experts") or 0) + 1
        H, r = int(c["num_attention_heads"]), int(c["kv_lora_rank"])
        heads = H * (int(c["qk_nope_head_dim"]) + int(c["qk_rope_head_dim"]) + int(c["v_head_dim"]))
        return 2 * V * D + 2 * (3 * width * D * experts + heads * (D + r) + r * D)
    except (TypeError, ValueError, KeyError):
        return 0


def main(dsv2, cases):
    base = json.load(open("models/tiny/config.json"))
    base.update(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, bos_token_id=510,
                eos_token_id=511)  # the same shape, smaller: many cases in seconds
    rng = random.Random(13)
    python = sys.executable
    agree = refused = written = skipped = 0
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(cases):
            c = json.loads(json.dumps(base))
            which = rng.random()
            if which < 0.6:
                key, value = rng.choice(INTS), rng.choice(INT_VALUES)
                c[key] = value
            elif which < 0.8:
                key, value = rng.choice(FLOATS), rng.choice(FLOAT_VALUES)
                c[key] = value
            else:
                key, value = "rope_scaling." + rng.choice(ROPE), rng.choice(FLOAT_VALUES + INT_VALUES)
                c["rope_scaling"][key.split(".")[1]] = value
            if c.get("topk_method") == "greedy" and rng.random() < 0.3:
                c["topk_method"] = "group_limited_greedy"
            if floats_of(c) > 4_000_000 or abs(floats_of(c)) > 1e12:
                skipped += 1
                continue
            cfg = os.path.join(tmp, "config.json")
            with open(cfg, "w") as f:
                f.write(json.dumps(c))
            out = os.path.join(tmp, "m.bin")
            if os.path.exists(out):
                os.remove(out)
            dtype = rng.choice(["f32", "bf16", "q8"])
            e = subprocess.run([python, "export.py", "--random", cfg, out, "--layers", "2", "--dtype", dtype],
                               capture_output=True, text=True, timeout=120)
            what = f"{key} = {value!r} ({c.get('topk_method')}, {dtype})"
            if e.returncode != 0:
                lines = e.stderr.strip().split("\n")
                if e.returncode == 1 and len(lines) == 1 and lines[0].startswith("export.py: error:"):
                    refused += 1
                    agree += 1
                else:
                    problems.append(f"{what}: export.py exit {e.returncode}, stderr {e.stderr.strip()[-200:]!r}")
                continue
            written += 1
            d = subprocess.run([dsv2, out, "-m", "layout"], capture_output=True, text=True, timeout=60)
            if d.returncode == 0:
                agree += 1
            else:
                problems.append(f"{what}: export.py wrote it, dsv2 refuses: {d.stderr.strip()[:200]}")
    for p in problems:
        print(p)
    print(f"header rules: {agree} of {agree + len(problems)} mutated configs agree ({written} written and loaded, "
          f"{refused} refused cleanly by export.py, {skipped} skipped as too large); {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "./dsv2", int(sys.argv[2]) if len(sys.argv) > 2 else 60))
