#!/usr/bin/env python3
"""Convert a Hugging Face DeepSeek-V2 checkpoint folder into one dsv2 file.

    python3 export.py HF_DIR OUT.bin [--dtype f32|bf16|q8|q4]
    python3 export.py MODEL.bin OUT.bin --dtype q8          (a dsv2 f32/bf16 file, e.g. a trained one, into q8)
    python3 export.py MODEL.bin OUT.bin --dtype f32         (a q8 file dequantized: the GPU's q8 checked exactly)
    python3 export.py --tokenizer tokenizer.json OUT.tok
    python3 export.py --random lite|v2 OUT.bin [--layers N] [--dtype f32|bf16|q8|q4]   (random weights, real shapes)
    --print-layout: instead of a summary, every block written (offset, bytes, name, shape, storage),
    the same lines `./dsv2 OUT.bin -m layout` prints from the file: the two must agree (make test)

HF_DIR holds config.json and model.safetensors, or shards with
model.safetensors.index.json (F32, BF16 or F16 tensors). The conversion streams
tensor by tensor in bounded chunks, so peak memory stays near one chunk whatever
the model size. Standard library + numpy only.

File layout (dsv2.c reads it with mmap; keep the two in step):
  [0, 512)   header: magic "DSV2", version, every hyper-parameter (struct Config in dsv2.c)
  tensors    in the order of tensor_plan() below (dsv2.c: layout_weights), each 64-byte aligned. Weight matrices
             are stored in the chosen dtype ([out, in] row-major, as nn.Linear); q8 is int8
             followed by a second block of float32 scales, one per q8_group weights of a row;
             q4 is 4-bit (q + 8 in nibbles, quantize_q4) with the same scales block after it.
             Norms and the MoE router are always float32 (tiny, and the router decides).
  tokenizer  optional (header.tokenizer_offset), the same blob a standalone .tok file holds
"""
import json
import os
import struct
import sys
import time

try:
    import numpy as np
except ImportError:  # only the weights need numpy: --tokenizer and --train-tokenizer read and write JSON
    np = None


def need_numpy():
    if np is None:
        sys.exit("export.py: error: numpy is missing (Debian: apt-get install -y python3-numpy, then use /usr/bin/python3)")

MAGIC = b"DSV2"
VERSION = 1
HEADER_SIZE = 512
ALIGN = 64
DTYPES = {"f32": 0, "bf16": 1, "q8": 2, "q4": 3}
TOPK_METHODS = {"greedy": 0, "group_limited_greedy": 1}
CHUNK_BYTES = 64 << 20  # conversion works through tensors this many bytes at a time
# DeepSeek-V2-Chat's chat template, as its tokenizer_config.json has it: what --train-tokenizer writes
V2_CHAT_TEMPLATE = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"


def fail(msg):
    msg = str(msg).replace("\n", "\\n").replace("\r", "\\r")  # one line, whatever the input held
    print(f"export.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


# --------------------------------------------------------------------------- config

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}")


def read_config(path, hf=None):
    """config.json (or the same dict) -> the header fields, validated. Fails on anything dsv2.c cannot run."""
    if hf is None:
        hf = read_json(path)
    if not isinstance(hf, dict):
        fail(f"{path}: a config must be a JSON object, got {type(hf).__name__}")
    if hf.get("model_type") not in ("deepseek_v2", None):
        fail(f"{path}: model_type {hf.get('model_type')!r} is not deepseek_v2")

    def need(key):
        if key not in hf or hf[key] is None:
            fail(f"{path}: missing required field '{key}'")
        return hf[key]

    def integer(key, default=None, required=True):
        v = hf.get(key, default)
        if v is None:
            if required:
                fail(f"{path}: missing required field '{key}'")
            return 0
        if isinstance(v, bool) or not isinstance(v, int):
            fail(f"{path}: field '{key}' must be an integer, got {v!r}")
        return v

    def number(key, default):
        v = hf.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            fail(f"{path}: field '{key}' must be a number, got {v!r}")
        return float(v)

    for key, want in (("hidden_act", "silu"), ("scoring_func", "softmax")):
        if hf.get(key, want) != want:
            fail(f"{path}: {key} {hf[key]!r} is not supported (only {want!r})")
    if hf.get("attention_bias", False):
        fail(f"{path}: attention_bias true is not supported (no released model uses it)")

    c = {}
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
        c[key] = integer(key)
    if "q_lora_rank" not in hf:
        fail(f"{path}: missing required field 'q_lora_rank' (null means no q compression)")
    c["q_lora_rank"] = integer("q_lora_rank", required=False)
    c["n_routed_experts"] = integer("n_routed_experts", required=False)
    c["n_shared_experts"] = integer("n_shared_experts", required=False)
    c["first_k_dense_replace"] = integer("first_k_dense_replace", 0)
    c["moe_layer_freq"] = integer("moe_layer_freq", 1)
    for key, lo in (("num_hidden_layers", 1), ("moe_layer_freq", 1), ("n_routed_experts", 0)):
        if not lo <= c[key] <= 1 << 16:
            fail(f"{path}: {key} = {c[key]} is out of range [{lo}, 65536]")
    moe_layers = [l for l in range(c["num_hidden_layers"]) if is_moe_layer(c, l)]
    dense_layers = c["num_hidden_layers"] - len(moe_layers)
    c["intermediate_size"] = integer("intermediate_size", required=dense_layers > 0)
    if moe_layers:
        c["moe_intermediate_size"] = integer("moe_intermediate_size")
        c["num_experts_per_tok"] = integer("num_experts_per_tok")
        method = need("topk_method")
        if not isinstance(method, str) or method not in TOPK_METHODS:
            fail(f"{path}: unknown topk_method {method!r} (supported: {', '.join(TOPK_METHODS)})")
        c["topk_method"] = TOPK_METHODS[method]
        grouped = method == "group_limited_greedy"
        c["n_group"] = integer("n_group", required=grouped)
        c["topk_group"] = integer("topk_group", required=grouped)
    else:
        for key in ("moe_intermediate_size", "num_experts_per_tok", "topk_method", "n_group", "topk_group"):
            c[key] = integer(key, 0) if key != "topk_method" else 0
    norm = hf.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        fail(f"{path}: norm_topk_prob must be true or false")
    c["norm_topk_prob"] = int(norm)
    c["seq_aux"] = int(bool(hf.get("seq_aux", True)))
    c["rms_norm_eps"] = number("rms_norm_eps", 1e-6)
    c["rope_theta"] = number("rope_theta", 10000.0)
    c["routed_scaling_factor"] = number("routed_scaling_factor", 1.0)
    c["aux_loss_alpha"] = number("aux_loss_alpha", 0.001)
    for key in ("bos_token_id", "eos_token_id"):
        v = hf.get(key)
        c[key] = v if isinstance(v, int) and 0 <= v < c["vocab_size"] else -1

    # transformers v5 writes rope_parameters (always, with rope_type "default" for no scaling, and
    # rope_theta inside it) where older files have rope_scaling
    rs = hf.get("rope_scaling", hf.get("rope_parameters"))
    c.update(rope_scaling=0, rope_factor=1.0, original_max_position_embeddings=0,
             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0)
    if rs is not None and not isinstance(rs, dict):
        fail(f"{path}: rope_scaling must be an object or null, got {rs!r}")
    if rs and "rope_theta" in rs and "rope_theta" not in hf:
        v = rs["rope_theta"]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            fail(f"{path}: rope_parameters.rope_theta must be a number, got {v!r}")
        c["rope_theta"] = float(v)
    if rs and rs.get("type", rs.get("rope_type")) not in (None, "default"):
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            fail(f"{path}: rope_scaling type {kind!r} is not supported (only yarn, default or null)")
        if "factor" not in rs:
            fail(f"{path}: rope_scaling has no 'factor'")

        def field(key, default, kind=float):
            v = rs.get(key, default)
            whole = isinstance(v, int) or (isinstance(v, float) and v == v and abs(v) != float("inf") and v == int(v))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not whole):
                fail(f"{path}: rope_scaling.{key} must be a number, got {v!r}")
            return kind(v)
        c.update(rope_scaling=1, rope_factor=field("factor", 1.0),
                 original_max_position_embeddings=field("original_max_position_embeddings", 4096, int),
                 beta_fast=field("beta_fast", 32), beta_slow=field("beta_slow", 1),
                 mscale=field("mscale", 1), mscale_all_dim=field("mscale_all_dim", 0))

    # the ranges and the routing's fit are check_header's, applied by every Writer: one set of rules
    return c


def is_moe_layer(c, l):
    return c["n_routed_experts"] > 0 and l >= c["first_k_dense_replace"] and l % c["moe_layer_freq"] == 0


INT_FIELDS = ["dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
              "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
              "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
              "topk_method", "n_group", "topk_group", "norm_topk_prob", "first_k_dense_replace",
              "moe_layer_freq", "max_position_embeddings", "bos_token_id", "eos_token_id", "rope_scaling",
              "original_max_position_embeddings", "seq_aux", "q8_group"]
FLOAT_FIELDS = ["rms_norm_eps", "rope_theta", "routed_scaling_factor", "rope_factor", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim", "aux_loss_alpha"]


# --------------------------------------------------------------------------- the header's rules
# The same ranges as validate_config in dsv2.c, applied to every header before a file is written,
# so export.py never writes a file that dsv2 refuses (make test runs mutated configs through both).

def check_header(c, path):
    def rng(key, lo, hi):
        v = c[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            fail(f"{path}: {key} = {v!r} is out of range [{lo}, {hi}]")

    def real(key, lo, hi):
        v = c[key]
        if not (isinstance(v, float) and lo <= v <= hi):  # NaN fails every comparison
            fail(f"{path}: {key} = {v!r} is out of range [{lo:g}, {hi:g}]")
    if c["dtype"] not in DTYPES.values():
        fail(f"{path}: unknown dtype {c['dtype']}")
    q8, q4 = c["dtype"] == DTYPES["q8"], c["dtype"] == DTYPES["q4"]
    for key, lo, hi in (("vocab_size", 1, 1 << 24), ("hidden_size", 1, 1 << 16), ("num_hidden_layers", 1, 1024),
                        ("num_attention_heads", 1, 1024), ("q_lora_rank", 0, 1 << 16), ("kv_lora_rank", 1, 1 << 16),
                        ("qk_nope_head_dim", 0, 4096), ("qk_rope_head_dim", 2, 4096), ("v_head_dim", 1, 4096),
                        ("intermediate_size", 0, 1 << 20), ("moe_intermediate_size", 0, 1 << 20),
                        ("max_position_embeddings", 1, 1 << 24), ("n_routed_experts", 0, 1 << 16),
                        ("n_shared_experts", 0, 4096), ("num_experts_per_tok", 0, 4096), ("n_group", 0, 1 << 16),
                        ("topk_group", 0, 1 << 16), ("first_k_dense_replace", 0, 1024), ("moe_layer_freq", 1, 1024),
                        ("bos_token_id", -1, c["vocab_size"] - 1), ("eos_token_id", -1, c["vocab_size"] - 1),
                        ("norm_topk_prob", 0, 1), ("seq_aux", 0, 1), ("q8_group", 2 if q4 else 1 if q8 else 0, 256 if q4 else 4096 if q8 else 0)):
        rng(key, lo, hi)
    if q4 and c["q8_group"] % 2:
        fail(f"{path}: q4 groups must hold an even number of weights (two per byte), not {c['q8_group']}")
    if c["qk_rope_head_dim"] % 2:
        fail(f"{path}: qk_rope_head_dim = {c['qk_rope_head_dim']} must be even")
    H, per_head = c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"]
    if H * per_head > 1 << 20 or H * c["kv_lora_rank"] > 1 << 24:
        fail(f"{path}: {H} heads of {per_head} floats (kv_lora_rank {c['kv_lora_rank']}) are too wide")
    if c["moe_intermediate_size"] * (c["num_experts_per_tok"] + c["n_shared_experts"]) > 1 << 24 \
            or c["hidden_size"] * (c["num_experts_per_tok"] + 1) > 1 << 24:
        fail(f"{path}: the experts of one token are too wide")
    moe = [l for l in range(c["num_hidden_layers"]) if is_moe_layer(c, l)]
    if len(moe) < c["num_hidden_layers"]:
        rng("intermediate_size", 1, 1 << 20)
    if c["topk_method"] not in TOPK_METHODS.values():
        fail(f"{path}: unknown topk_method {c['topk_method']}")
    if moe:
        E = c["n_routed_experts"]
        rng("moe_intermediate_size", 1, 1 << 20)
        rng("num_experts_per_tok", 1, E)
        if c["topk_method"] == TOPK_METHODS["group_limited_greedy"]:
            rng("n_group", 1, E)
            if E % c["n_group"]:
                fail(f"{path}: n_group = {c['n_group']} does not divide n_routed_experts = {E}")
            rng("topk_group", 1, c["n_group"])
            rng("num_experts_per_tok", 1, c["topk_group"] * (E // c["n_group"]))
    rng("rope_scaling", 0, 1)
    real("rms_norm_eps", 1e-30, 0.5)
    real("rope_theta", 1.0 + 1e-9, 1e12)
    real("routed_scaling_factor", 1e-6, 1e4)
    real("aux_loss_alpha", 0.0, 1e3)
    if c["rope_scaling"]:
        real("rope_factor", 1e-6, 1e6)
        rng("original_max_position_embeddings", 1, 1 << 24)
        for key in ("beta_fast", "beta_slow"):
            real(key, 1e-6, 1e6)
        for key in ("mscale", "mscale_all_dim"):
            real(key, 0.0, 1e3)
    D, rq, r, dr, Im = c["hidden_size"], c["q_lora_rank"], c["kv_lora_rank"], c["qk_rope_head_dim"], c["moe_intermediate_size"]
    dq, dv = c["qk_nope_head_dim"] + dr, c["v_head_dim"]
    attention = (rq * D + rq + H * dq * rq if rq else H * dq * D) + (r + dr) * D + r + H * (dq - dr + dv) * r + D * H * dv
    ffn = (c["n_routed_experts"] * D * (1 + 3 * Im) + 3 * c["n_shared_experts"] * Im * D) * len(moe) \
        + 3 * c["intermediate_size"] * D * (c["num_hidden_layers"] - len(moe))
    if 4 * (2 * c["vocab_size"] * D + c["num_hidden_layers"] * (attention + 2 * D) + ffn) > 1 << 50:
        fail(f"{path}: the tensors would take more than 1 PiB")


def q8_group_size(c):
    """Weights per q8 or q4 scale: 32, or the largest power of two dividing every matrix width (tiny models)."""
    group = 32
    while any(shape[-1] % group for _, shape, is_matrix in tensor_plan(c) if is_matrix):
        group //= 2
    if c["dtype"] == DTYPES["q4"] and group < 2:
        fail("q4 needs every matrix width to be even")
    return group


def quantize_q4(a, group):
    """4-bit signed weights in groups along each row, llama.cpp Q4_0's rule with a float32 scale: the
    group's largest-magnitude weight m (the positive one on a tie) maps to -8, so scale = m / -8 and
    q = clamp(round(w / scale), -8, 7).
    Stored as q + 8 in nibbles, group/2 bytes a group: byte j holds weight j (low) and weight j + group/2."""
    g = a.reshape(-1, group)
    hi, lo = g.max(axis=1), g.min(axis=1)
    scale = (np.where(hi >= -lo, hi, lo) / np.float32(-8.0)).astype(np.float32)  # a tie takes the positive one
    q = np.rint(g / np.where(scale != 0, scale, np.float32(1.0))[:, None])
    q = (np.clip(q, -8, 7) + 8).astype(np.uint8)
    half = group // 2
    packed = q[:, :half] | (q[:, half:] << 4)
    return packed.reshape(-1), scale


def dequantize_q4(packed, scale, group):
    """The exact float32 weights of q4 blocks: (nibble - 8) x the group's scale."""
    b = packed.reshape(-1, group // 2)
    q = np.concatenate([(b & 15).astype(np.int16), (b >> 4).astype(np.int16)], axis=1) - 8
    return (q.astype(np.float32) * scale[:, None]).reshape(-1)


def quantize_q8(a, group):
    """Symmetric int8 in groups along each row: scale = max|w| / 127 per group, q = round(w / scale)."""
    g = a.reshape(-1, group)
    amax = np.abs(g).max(axis=1, keepdims=True)
    scale = amax / 127.0
    q = np.rint(g / np.where(scale > 0, scale, 1.0)).astype(np.int8)
    return q.reshape(-1), scale.astype(np.float32).reshape(-1)


def pack_header(c, tokenizer_offset=0, tokenizer_size=0, file_size=0):
    ints = [c[k] for k in INT_FIELDS] + [0] * (32 - len(INT_FIELDS))
    floats = [c[k] for k in FLOAT_FIELDS] + [0.0] * (16 - len(FLOAT_FIELDS))
    head = MAGIC + struct.pack("<I32i16d4Q", VERSION, *ints, *floats, tokenizer_offset, tokenizer_size, file_size, 0)
    return head + b"\0" * (HEADER_SIZE - len(head))


def tensor_plan(c):
    """(HF name, shape, is_matrix) in file order; mirrors layout_weights() in dsv2.c.
    is_matrix False means stored float32 whatever the dtype (norms, router)."""
    D, H = c["hidden_size"], c["num_attention_heads"]
    dq = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    yield "model.embed_tokens.weight", (c["vocab_size"], D), True
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        yield p + "input_layernorm.weight", (D,), False
        if c["q_lora_rank"] > 0:
            yield p + "self_attn.q_a_proj.weight", (c["q_lora_rank"], D), True
            yield p + "self_attn.q_a_layernorm.weight", (c["q_lora_rank"],), False
            yield p + "self_attn.q_b_proj.weight", (H * dq, c["q_lora_rank"]), True
        else:
            yield p + "self_attn.q_proj.weight", (H * dq, D), True
        yield p + "self_attn.kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + c["qk_rope_head_dim"], D), True
        yield p + "self_attn.kv_a_layernorm.weight", (c["kv_lora_rank"],), False
        yield p + "self_attn.kv_b_proj.weight", (H * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]), True
        yield p + "self_attn.o_proj.weight", (D, H * c["v_head_dim"]), True
        yield p + "post_attention_layernorm.weight", (D,), False
        if is_moe_layer(c, l):
            Im = c["moe_intermediate_size"]
            yield p + "mlp.gate.weight", (c["n_routed_experts"], D), False
            for e in range(c["n_routed_experts"]):
                yield p + f"mlp.experts.{e}.gate_proj.weight", (Im, D), True
                yield p + f"mlp.experts.{e}.up_proj.weight", (Im, D), True
                yield p + f"mlp.experts.{e}.down_proj.weight", (D, Im), True
            width, prefix = Im * c["n_shared_experts"], p + "mlp.shared_experts."
        else:
            width, prefix = c["intermediate_size"], p + "mlp."
        if width > 0:
            yield prefix + "gate_proj.weight", (width, D), True
            yield prefix + "up_proj.weight", (width, D), True
            yield prefix + "down_proj.weight", (D, width), True
    yield "model.norm.weight", (D,), False
    yield "lm_head.weight", (c["vocab_size"], D), True


# --------------------------------------------------------------------------- safetensors

ST_DTYPES = {"F32": 4, "BF16": 2, "F16": 2}


class SafeTensors:
    """Index of every tensor in the folder: name -> (file, dtype, shape, byte offset). Reads nothing else."""

    def __init__(self, folder):
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                fail(f"cannot read {index}: {e}")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v.endswith(".safetensors")
                                                           and "/" not in v and v.isprintable()
                                                           for v in weight_map.values()):
                fail(f"{index}: weight_map must map tensor names to shard file names")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            fail(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
        self.tensors = {}
        for name in files:
            self._scan(os.path.join(folder, name))

    def _scan(self, path):
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    fail(f"{path} is truncated (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    fail(f"{path} is truncated or not safetensors (header length {n})")
                header = json.loads(f.read(n))
        except OSError as e:
            fail(f"cannot read {path}: {e}")
        except ValueError as e:
            fail(f"{path}: bad safetensors header: {e}")
        if not isinstance(header, dict):
            fail(f"{path}: bad safetensors header: not a JSON object")
        for name, t in header.items():
            if name == "__metadata__":
                continue
            self.tensors[name] = (path, *self._entry(path, name, t, 8 + n, size))

    @staticmethod
    def _entry(path, name, t, data_start, size):
        """A header entry checked: its dtype, shape and offsets, within the file: (dtype, shape, offset)."""
        if not isinstance(t, dict) or not isinstance(t.get("dtype"), str):
            fail(f"{path}: tensor {name} has no dtype")
        if t["dtype"] not in ST_DTYPES:
            fail(f"{path}: tensor {name} has dtype {t['dtype']}; supported: F32, BF16, F16")
        shape, offsets = t.get("shape"), t.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            fail(f"{path}: tensor {name} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            fail(f"{path}: tensor {name} has bad data_offsets {offsets!r}")
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        if not 0 <= begin <= end or end - begin != count * ST_DTYPES[t["dtype"]] or data_start + end > size:
            fail(f"{path}: tensor {name} data is truncated or inconsistent (offsets {begin}..{end})")
        return t["dtype"], tuple(shape), data_start + begin

    def chunks(self, name, shape):
        """Yields the tensor as float32 or raw bf16 (uint16) arrays of whole rows, CHUNK_BYTES at a time."""
        if name not in self.tensors:
            fail(f"tensor {name} is missing from the checkpoint")
        path, dtype, got, offset = self.tensors[name]
        if got != tuple(shape):
            fail(f"tensor {name} has shape {list(got)}, the config implies {list(shape)}")
        cols = shape[-1]
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        item = ST_DTYPES[dtype]
        step = max(1, CHUNK_BYTES // (cols * item))
        np_dtype = {"F32": "<f4", "BF16": "<u2", "F16": "<f2"}[dtype]
        with open(path, "rb") as f:
            f.seek(offset)
            for r in range(0, rows, step):
                n = min(step, rows - r)
                a = np.frombuffer(f.read(n * cols * item), dtype=np_dtype)
                bad = (a & 0x7F80) == 0x7F80 if dtype == "BF16" else ~np.isfinite(a)
                if bad.any():
                    fail(f"tensor {name} holds NaN or infinity (row {r + int(np.argmax(bad)) // cols})")
                yield a.astype(np.float32) if dtype == "F16" else a, dtype


def to_f32(a, dtype):
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def to_bf16(a, dtype):
    """Round to nearest even, as torch does; NaN stays NaN."""
    if dtype == "BF16":
        return a
    bits = a.astype(np.float32, copy=False).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


# --------------------------------------------------------------------------- tokenizer
#
# tokenizer.json -> a compact blob that dsv2.c reads (inside the model file, or alone with magic DSVT):
#   "DSVT" u32 version, u32 n_ids, i32 bos, i32 eos, u32 add_bos, u32 chat_template
#   per id 0..n_ids-1: u8 kind (0 unused, 1 BPE token, 2 added, 3 added special), u32 len, the token's bytes
#   u32 n_added, then per added token: u32 id, u32 len, the text matched in the input (UTF-8)
#   u32 n_merges, then per merge in rank order: u32 left id, u32 right id, u32 merged id
#   u32 n_patterns, then the pre-tokenizer as regexes, each an "Isolated" split: u32 len, UTF-8
#   u32 n_properties, then per Unicode property: u32 name len, name, u32 n_ranges, (u32 lo, u32 hi)*
TOKENIZER_MAGIC = b"DSVT"
TOKENIZER_VERSION = 1
CHAT_TEMPLATES = {"none": 0, "deepseek-v2": 1, "deepseek-v3": 2}
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
WHITE_SPACE = [(0x9, 0xD), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
               (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]  # Unicode White_Space = regex \s


def byte_level_decoder():
    """GPT-2's bytes_to_unicode, inverted: the character that stands for each byte -> the byte."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(0x100 + n)] = b
            n += 1
    return chars


def unicode_properties():
    """General-category ranges for \p{L} \p{M} \p{N} \p{Nd} \p{P} \p{S}, and White_Space for \s."""
    import unicodedata
    ranges = {k: [] for k in ("L", "M", "N", "Nd", "P", "S")}
    for cp in range(0x110000):
        cat = unicodedata.category(chr(cp))
        for name in (cat[0], cat if cat == "Nd" else None):
            if name in ranges:
                r = ranges[name]
                if r and r[-1][1] == cp - 1:
                    r[-1] = (r[-1][0], cp)
                else:
                    r.append((cp, cp))
    ranges["White_Space"] = WHITE_SPACE
    return ranges


def json_object(v, what, path):
    """v if it is a JSON object, {} for null; anything else is an error naming what."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        fail(f"{path}: {what} must be an object, got {v!r:.60}")
    return v


def tokenizer_patterns(pre, path):
    """The pre-tokenizer as a list of regexes, each splitting every piece with behavior Isolated."""
    pre = json_object(pre, "pre_tokenizer", path)
    if not pre:
        return []
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list):
        fail(f"{path}: pre_tokenizer.pretokenizers must be a list")
    patterns = []
    for st in steps:
        kind = json_object(st, "a pre-tokenizer step", path).get("type")
        if kind == "Split":
            if st.get("behavior") != "Isolated" or st.get("invert"):
                fail(f"{path}: Split behavior {st.get('behavior')!r} (invert {st.get('invert')}) is not supported")
            pat = json_object(st.get("pattern"), "Split.pattern", path)
            text = pat.get("Regex", pat.get("String"))
            if not isinstance(text, str):
                fail(f"{path}: Split.pattern needs a Regex or String text")
            if "Regex" in pat:
                patterns.append(text)
            else:
                patterns.append("".join("\\" + ch if ch in r"\.^$|?*+()[]{}" else ch for ch in text))
        elif kind == "Digits":
            patterns.append(r"\p{N}" if st.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if st.get("add_prefix_space"):
                fail(f"{path}: ByteLevel add_prefix_space is not supported")
            if st.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
        else:
            fail(f"{path}: pre-tokenizer {kind!r} is not supported")
    return patterns


PROPERTY_NAMES = ("L", "M", "N", "Nd", "P", "S", "White_Space")  # what unicode_properties() writes


def check_token_ids(vocab, added, path):
    """Every id a distinct integer in [0, 2^24); an added token is non-empty text and either a new
    id or the vocab's own entry for the same text (as DeepSeek-V3's specials are)."""
    if not isinstance(vocab, dict) or not isinstance(added, list) or not (vocab or added):
        fail(f"{path}: model.vocab must be an object and added_tokens a list")
    owner = {}
    for s, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 1 << 24:
            fail(f"{path}: token {s!r} has id {i!r}, not an integer in [0, 2^24)")
        if i in owner:
            fail(f"{path}: id {i} belongs to two tokens, {owner[i]!r} and {s!r}")
        owner[i] = s
    seen = set()
    for a in added:
        i, text = (a.get("id"), a.get("content")) if isinstance(a, dict) else (None, None)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 1 << 24 or not isinstance(text, str) or not text:
            fail(f"{path}: added token {a!r} needs an id in [0, 2^24) and non-empty content")
        if i in seen or owner.get(i, text) != text:
            fail(f"{path}: added token {text!r} reuses id {i}")
        seen.add(i)


class RegexSyntax:
    """The subset of regex syntax dsv2.c's engine runs, checked by the rules of its parser
    (parse_alternation and below in dsv2.c): a pattern it would refuse is refused here first.
    Each method returns (nullable, size): whether the (sub)pattern can match the empty string, and
    how many instructions dsv2.c compiles it to (repeats unrolled; at most REGEX_MAX_CODE)."""

    def __init__(self, pattern, props, path):
        self.p, self.at, self.props, self.path = pattern, 0, props, path

    def fail(self, why):
        fail(f"{self.path}: pre-tokenizer regex: {why} at character {self.at} of {self.p[:60]!r}")

    def peek(self):
        return self.p[self.at] if self.at < len(self.p) else ""

    def take(self):
        self.at += 1
        return self.p[self.at - 1]

    def check(self):
        _, size = self.alternation()
        if self.at < len(self.p):
            self.fail("unbalanced )")
        if size + 1 > 100000:  # + MATCH; dsv2.c: REGEX_MAX_CODE
            self.fail("too large once its repeats are unrolled (over 100000 steps)")

    def alternation(self):
        nullable, size = self.concat()
        while self.peek() == "|":
            self.at += 1
            right, right_size = self.concat()
            nullable, size = right or nullable, size + right_size + 2  # split, jump
        return nullable, size

    def concat(self):
        nullable, size = True, 0
        while self.at < len(self.p) and self.peek() not in "|)":
            n, s = self.repeat()
            nullable, size = n and nullable, size + s
        return nullable, size

    def number(self):
        v, digits = 0, 0
        while self.peek().isdigit() and self.peek() in "0123456789" and v < 100000:
            v, digits = v * 10 + int(self.take()), digits + 1
        return v if digits else -1

    def repeat(self):
        nullable, size = self.atom()
        while self.peek() and self.peek() in "?*+{":
            q = self.take()
            lo, hi = {"?": (0, 1), "*": (0, -1), "+": (1, -1)}.get(q, (None, None))
            if q == "{":
                lo = hi = self.number()
                if self.peek() == ",":
                    self.at += 1
                    hi = self.number()
                if lo < 0 or self.peek() != "}" or (0 <= hi < lo) or hi > 1000:
                    self.fail("bad {m,n}")
                self.at += 1
            if hi < 0 and nullable:
                self.fail("a repeated group that can match empty")
            if self.peek() == "?":
                self.at += 1
            elif self.peek() == "+":
                self.fail("possessive quantifiers are not supported")
            nullable = lo == 0 or nullable
            size = lo * size + (size + 2 if hi < 0 else (hi - lo) * (size + 1))
            if size > 100000:
                self.fail("too large once its repeats are unrolled (over 100000 steps)")
        return nullable, size

    def atom(self):
        ch = self.take()
        if ch == "(":
            look = False
            if self.peek() == "?":
                self.at += 1
                kind = self.take() if self.at < len(self.p) else ""
                if kind not in "!=:" or not kind:
                    self.fail("unsupported group type")
                look = kind != ":"
            nullable, size = self.alternation()
            if self.peek() != ")":
                self.fail("missing )")
            self.at += 1
            return (True, size + 2) if look else (nullable, size)
        if ch == "[":
            self.bracket()
            return False, 1
        if ch in "$^":
            return True, 1
        if ch == "\\":
            self.escape([0])
            return False, 1
        if ch in ")|*+?{":
            self.fail("unexpected operator")
        return False, 1

    def escape(self, n_props):
        """After a backslash; returns the literal it denotes, or None for a class escape."""
        if self.at >= len(self.p):
            self.fail("trailing backslash")
        e = self.take()
        name = {"s": "White_Space", "S": "White_Space", "d": "Nd", "D": "Nd"}.get(e)
        if e in "pP":
            if self.peek() != "{":
                self.fail("expected { after \\p")
            self.at += 1
            name = ""
            while self.at < len(self.p) and self.peek() != "}" and len(name) < 15:
                name += self.take()
            if self.peek() != "}":
                self.fail("unterminated \\p{...}")
            self.at += 1
            name = name[1:] if name.startswith("^") else name
        if name is not None:
            if name not in self.props:
                self.fail(f"unknown Unicode property {name}")
            n_props[0] += 1
            if n_props[0] > 8:
                self.fail("too many properties in one class")
            return None
        if e in "nrtfv":
            return {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v"}[e]
        if e.isascii() and e.isalnum():
            self.fail("unsupported escape")
        return e

    def bracket(self):
        if self.peek() == "^":
            self.at += 1
        first, n_props = True, [0]
        while self.at < len(self.p) and (self.peek() != "]" or first):
            first = False
            lo = self.take()
            if lo == "\\":
                lo = self.escape(n_props)
                if lo is None:
                    continue
            hi = lo
            if self.peek() == "-" and self.at + 1 < len(self.p) and self.p[self.at + 1] != "]":
                self.at += 1
                hi = self.take()
                if hi == "\\":
                    hi = self.escape([0])
                    if hi is None:
                        self.fail("class escape used as a range end")
                if hi < lo:
                    self.fail("reversed range")
        if self.at >= len(self.p):
            self.fail("unterminated [")
        self.at += 1


def read_tokenizer(path):
    """tokenizer.json (+ tokenizer_config.json beside it) -> the blob dsv2.c reads."""
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read tokenizer {path}: {e}")
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    tc = {}
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                tc = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"cannot read {config_path}: {e}")
    if not isinstance(tj, dict) or not isinstance(tj.get("model", {}), dict) or not isinstance(tc, dict):
        fail(f"{path}: tokenizer.json (and tokenizer_config.json) must be JSON objects with a model object")
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        fail(f"{path}: tokenizer model type {model.get('type')!r} is not supported (only byte-level BPE)")
    if model.get("byte_fallback") or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("ignore_merges"):
        fail(f"{path}: BPE options byte_fallback/dropout/subword prefixes/ignore_merges are not supported")
    norm = json_object(tj.get("normalizer"), "normalizer", path)
    if norm and not (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        fail(f"{path}: normalizer {norm.get('type')!r} is not supported")
    dec = json_object(tj.get("decoder"), "decoder", path)
    if dec and dec.get("type") != "ByteLevel":
        fail(f"{path}: decoder {dec.get('type')!r} is not supported (only ByteLevel)")
    patterns = tokenizer_patterns(tj.get("pre_tokenizer"), path)

    unbyte = byte_level_decoder()

    def raw_bytes(s):  # a byte-level token string -> its bytes; other text (specials) stays UTF-8
        return bytes(unbyte[ch] for ch in s) if all(ch in unbyte for ch in s) else s.encode("utf-8")

    vocab = model.get("vocab")
    added = tj.get("added_tokens") or []
    check_token_ids(vocab, added, path)
    for p in patterns:
        RegexSyntax(p, PROPERTY_NAMES, path).check()
    n_ids = max([*vocab.values(), *(a["id"] for a in added)]) + 1
    kinds, tokens = [0] * n_ids, [b""] * n_ids
    for s, i in vocab.items():
        kinds[i], tokens[i] = 1, raw_bytes(s)
    for a in added:
        kinds[a["id"]], tokens[a["id"]] = (3 if a.get("special") else 2), raw_bytes(a["content"])
        if a.get("single_word") or a.get("lstrip") or a.get("rstrip"):
            fail(f"{path}: added token {a['content']!r} uses single_word/lstrip/rstrip, not supported")
    merges = []
    if not isinstance(model.get("merges", []), list):
        fail(f"{path}: model.merges must be a list")
    for m in model.get("merges", []):
        pair = m.split(" ", 1) if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            fail(f"{path}: merge {m!r} is not two tokens")
        left, right = pair
        if left not in vocab or right not in vocab or left + right not in vocab:
            fail(f"{path}: merge {left!r} + {right!r} refers to tokens missing from the vocab")
        merges.append((vocab[left], vocab[right], vocab[left + right]))

    def token_id(entry):
        text = entry.get("content") if isinstance(entry, dict) else entry
        ids = [a["id"] for a in added if a["content"] == text]
        return ids[0] if ids else vocab.get(text, -1)
    bos, eos = token_id(tc.get("bos_token")), token_id(tc.get("eos_token"))
    post = json.dumps(tj.get("post_processor") or {})
    add_bos = tc.get("add_bos_token", "SpecialToken" in post)
    if bos < 0 and added:
        bos = added[0]["id"]
    template = tc.get("chat_template") or ""
    chat = "deepseek-v3" if "<｜User｜>" in template else "deepseek-v2" if "'User: '" in template else "none"

    out = [TOKENIZER_MAGIC, struct.pack("<IIiiII", TOKENIZER_VERSION, n_ids, bos, eos, int(bool(add_bos)),
                                        CHAT_TEMPLATES[chat])]
    for k, t in zip(kinds, tokens):
        out.append(struct.pack("<BI", k, len(t)) + t)
    out.append(struct.pack("<I", len(added)))
    for a in added:
        text = a["content"].encode("utf-8")
        out.append(struct.pack("<II", a["id"], len(text)) + text)
    out.append(struct.pack("<I", len(merges)))
    out.append(struct.pack(f"<{3 * len(merges)}I", *(i for m in merges for i in m)))
    out.append(struct.pack("<I", len(patterns)))
    for p in patterns:
        raw = p.encode("utf-8")
        out.append(struct.pack("<I", len(raw)) + raw)
    props = unicode_properties()
    out.append(struct.pack("<I", len(props)))
    for name, ranges in props.items():
        out.append(struct.pack("<I", len(name)) + name.encode() + struct.pack("<I", len(ranges)))
        out.append(struct.pack(f"<{2 * len(ranges)}I", *(x for r in ranges for x in r)))
    return b"".join(out), n_ids, chat


# --------------------------------------------------------------------------- writer

class Writer:
    """OUT.tmp, renamed to OUT when finished; used as `with Writer(...) as w:`, so that any failure
    removes the temporary and leaves an earlier OUT as it was."""

    def __init__(self, path, config):
        check_header(config, path)
        self.path, self.tmp = path, path + ".tmp"
        self.config = config
        self.layout = []  # (offset, bytes, name, shape, storage) of every block written
        self.expected = expected_bytes(config)
        self.n_tensors = sum(1 for _ in tensor_plan(config))
        self.started = self.reported = time.time()
        try:
            self.f = open(self.tmp, "wb")
        except OSError as e:
            fail(f"cannot write {path}: {e}")
        self.f.write(pack_header(config))

    def __enter__(self):
        return self

    def __exit__(self, kind, value, trace):
        if kind is not None:
            self.f.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
        return False

    def align(self):
        pad = -self.f.tell() % ALIGN
        self.f.write(b"\0" * pad)

    def tensor(self, arrays, name, shape, storage):
        self.align()
        start = self.f.tell()
        try:
            for a in arrays:
                self.f.write(np.ascontiguousarray(a).data)  # a view, not a copy
        except OSError as e:
            fail(f"cannot write {self.path}: {e}")
        self.layout.append((start, self.f.tell() - start, name, shape, storage))
        now = time.time()
        if now - self.reported >= 2:  # a real checkpoint takes minutes: say how far, how fast
            done, rate = self.f.tell(), self.f.tell() / max(now - self.started, 1e-9)
            left = (self.expected - done) / max(rate, 1)
            tensors = len({n for _, _, n, s, _ in self.layout if s is not None})
            tty = sys.stderr.isatty()  # on a terminal one line that updates; in a log, a line each
            start = "\r" if tty else ""
            print(f"{start}export.py: tensor {tensors} of {self.n_tensors}, {done / 1e9:.2f} of "
                  f"{self.expected / 1e9:.2f} GB, {rate / 1e6:.0f} MB/s, about {left / 60:.1f} min left",
                  end="" if tty else "\n", file=sys.stderr, flush=True)
            self.reported = now

    def finish(self, tokenizer=b""):
        tok_offset = 0
        if tokenizer:
            self.align()
            tok_offset = self.f.tell()
            self.f.write(tokenizer)
        size = self.f.tell()
        if sys.stderr.isatty() and self.reported > self.started:
            print(file=sys.stderr)  # end the updating progress line
        if tokenizer:
            self.layout.append((tok_offset, len(tokenizer), "tokenizer", None, None))
        self.f.seek(0)
        self.f.write(pack_header(self.config, tok_offset, len(tokenizer), size))
        try:
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            fail(f"cannot write {self.path}: {e}")
        return size


def write_tensor(w, name, shape, chunks, is_matrix, dtype_name, group):
    """Writes one tensor from its chunks (arrays of whole rows, with their source dtype)."""
    if not is_matrix:  # norms and router: f32 (at bf16 precision in a bf16 file: exactly the bf16 model)
        w.tensor((to_f32(to_bf16(a, dt), "BF16") if dtype_name == "bf16" else to_f32(a, dt) for a, dt in chunks),
                 name, shape, "f32")
    elif dtype_name in ("q8", "q4"):  # int8 (or packed 4-bit) rows, then all the scales as a second block
        scales = []
        quantize = quantize_q8 if dtype_name == "q8" else quantize_q4

        def data():
            for a, dt in chunks:
                q, sc = quantize(to_f32(a, dt), group)
                scales.append(sc)
                yield q
        w.tensor(data(), name, shape, dtype_name)
        w.tensor(scales, name, (shape[0], shape[1] // group), f"{dtype_name}-scales")
    else:
        convert = to_bf16 if dtype_name == "bf16" else to_f32
        w.tensor((convert(a, dt) for a, dt in chunks), name, shape, dtype_name)


def finish(w, tokenizer, show_layout, summary):
    """Completes the file, then prints the summary (its size as {mib} or {gib}) or, with
    --print-layout, every block written, as `./dsv2 FILE -m layout` prints the file's layout."""
    size = w.finish(tokenizer)
    if not show_layout:
        print(summary.format(mib=size / 2**20, gib=size / 2**30) + (", with tokenizer" if tokenizer else ""))
        return
    for offset, nbytes, name, shape, storage in w.layout:
        if shape is None:
            print(f"{offset} {nbytes} {name}")
        else:
            print(f"{offset} {nbytes} {name} {'x'.join(str(d) for d in shape)} {storage}")


def expected_bytes(c):
    """The size of the tensors part of the file, for the progress report."""
    elem = {DTYPES["f32"]: 4, DTYPES["bf16"]: 2, DTYPES["q8"]: 1, DTYPES["q4"]: 0.5}[c["dtype"]]
    total = HEADER_SIZE
    for _, shape, is_matrix in tensor_plan(c):
        n = shape[0] * (shape[1] if len(shape) > 1 else 1)
        total += int(n * (elem if is_matrix else 4)) + (4 * n // c["q8_group"] if is_matrix and c["q8_group"] else 0)
    return max(total, 1)


def check_tokenizer_fits(blob, config, tok_path):
    """The tokenizer's ids fit the model: no more ids than vocab_size, and the same BOS and EOS."""
    _, _, n_ids, bos, eos = struct.unpack_from("<4sIIii", blob)
    if n_ids > config["vocab_size"]:
        fail(f"{tok_path} has {n_ids} ids but the config's vocab_size is {config['vocab_size']}")
    for what, tok_id, key in (("BOS", bos, "bos_token_id"), ("EOS", eos, "eos_token_id")):
        if tok_id >= 0 and config[key] >= 0 and tok_id != config[key]:
            fail(f"{tok_path}: the tokenizer's {what} is id {tok_id} but the config's {key} is {config[key]}")


def export_model(folder, out, dtype_name, show_layout=False):
    config = read_config(os.path.join(folder, "config.json"))
    source = SafeTensors(folder)
    if dtype_name is None:  # keep bf16 as bf16; anything else becomes f32
        kinds = {source.tensors[n][1] for n in source.tensors}
        dtype_name = "bf16" if kinds == {"BF16"} else "f32"
    config["dtype"] = DTYPES[dtype_name]
    config["q8_group"] = q8_group_size(config) if dtype_name in ("q8", "q4") else 0
    tok_path = os.path.join(folder, "tokenizer.json")
    tokenizer = b""
    if os.path.exists(tok_path):
        tokenizer = read_tokenizer(tok_path)[0]
        check_tokenizer_fits(tokenizer, config, tok_path)
    count = 0
    with Writer(out, config) as w:
        for name, shape, is_matrix in tensor_plan(config):
            write_tensor(w, name, shape, source.chunks(name, shape), is_matrix, dtype_name, config["q8_group"])
            count += 1
        finish(w, tokenizer, show_layout, f"wrote {out}: {count} tensors, {dtype_name}, {{mib:.1f}} MiB")
    if not tokenizer:
        print(f"export.py: warning: {folder} has no tokenizer.json; exported the model alone "
              "(token ids in and out)", file=sys.stderr)


def export_dsv2(path, out, dtype_name, show_layout=False):
    """A dsv2 file of ours (f32 or bf16, e.g. one `./dsv2 -m train` wrote) into another dtype,
    the tokenizer kept: how the built-in model gets its q8 twin for `-m eval -r`."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        fail(f"cannot read {path}: {e}")
    if len(head) < HEADER_SIZE or head[:4] != MAGIC:
        fail(f"{path} is not a dsv2 file (no DSV2 magic)")
    fields = struct.unpack_from("<I32i16d4Q", head, 4)
    if fields[0] != VERSION:
        fail(f"{path}: version {fields[0]}, this export.py reads version {VERSION}")
    config = dict(zip(INT_FIELDS, fields[1:33]))
    config.update(zip(FLOAT_FIELDS, fields[33:49]))
    tok_offset, tok_size, file_size = fields[49:52]
    check_header(config, path)
    source = {v: k for k, v in DTYPES.items()}[config["dtype"]]
    if source in ("q8", "q4") and dtype_name in (None, "q8", "q4"):
        fail(f"{path} is {source} already: convert from its f32 or bf16 source (or to f32: its weights dequantized)")
    if file_size != size or tok_offset + tok_size > size:
        fail(f"{path}: the header says {file_size} bytes, the file has {size}")
    dtype_name = dtype_name or source
    elem, src_dtype = {"f32": (4, "F32"), "bf16": (2, "BF16"), "q8": (1, "Q8"), "q4": (0.5, "Q4")}[source]
    group = config["q8_group"]
    data = np.memmap(path, dtype=np.uint8, mode="r")
    offset, plan = HEADER_SIZE, list(tensor_plan(config))

    def block(n, width):  # the next aligned block of n numbers, width bytes each
        nonlocal offset
        offset += -offset % ALIGN
        nbytes = int(n * width)
        if offset + nbytes > size:
            fail(f"{path} is truncated: it ends inside its tensors")
        raw = data[offset:offset + nbytes]
        offset += nbytes
        return raw

    def chunks(shape, is_matrix):
        n = shape[0] * (shape[1] if len(shape) > 1 else 1)
        if not is_matrix:
            yield block(n, 4).view(np.float32), "F32"
        elif source == "q8":  # int8 rows, then the scales: dequantized exactly (int8 * f32 scale)
            q = block(n, 1).view(np.int8)
            scale = block(n // group, 4).view(np.float32)
            yield (q.reshape(-1, group).astype(np.float32) * scale[:, None]).reshape(-1), "F32"
        elif source == "q4":  # packed nibbles, then the scales: dequantized exactly
            packed = block(n, 0.5)
            scale = block(n // group, 4).view(np.float32)
            yield dequantize_q4(packed, scale, group), "F32"
        else:
            raw = block(n, elem)
            yield (raw.view(np.float32) if elem == 4 else raw.view(np.uint16)), src_dtype

    tokenizer = bytes(data[tok_offset:tok_offset + tok_size]) if tok_size else b""
    config["dtype"] = DTYPES[dtype_name]
    config["q8_group"] = q8_group_size(config) if dtype_name in ("q8", "q4") else 0
    with Writer(out, config) as w:
        for name, shape, is_matrix in plan:
            write_tensor(w, name, shape, chunks(shape, is_matrix), is_matrix, dtype_name, config["q8_group"])
        finish(w, tokenizer, show_layout, f"wrote {out}: {len(plan)} tensors from {path}, {dtype_name}, {{mib:.1f}} MiB")


# --------------------------------------------------------------------------- random checkpoints

PRESETS = {  # the released config.json values (shared/docs/architecture.md section 10)
    "lite": dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                 num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, n_routed_experts=64,
                 topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0),
    "v2": dict(hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
               num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, n_routed_experts=160,
               topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0),
}
PRESETS["tiny"] = dict(  # the built-in model's shape (models/tiny/config.json); vocab from its tokenizer
    hidden_size=192, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, topk_method="greedy", n_group=1,
    topk_group=1, routed_scaling_factor=1.0, aux_loss_alpha=0.01, max_position_embeddings=512,
    vocab_size=2048, bos_token_id=2046, eos_token_id=2047, torch_dtype="float32",
    rope_scaling=dict(type="yarn", factor=4, original_max_position_embeddings=128, beta_fast=32, beta_slow=1,
                      mscale=0.707, mscale_all_dim=0.707))
PRESET_COMMON = dict(
    model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=2, num_experts_per_tok=6,
    first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False, max_position_embeddings=163840,
    rms_norm_eps=1e-6, rope_theta=10000, hidden_act="silu", scoring_func="softmax", seq_aux=True,
    aux_loss_alpha=0.001, attention_bias=False, tie_word_embeddings=False, bos_token_id=100000,
    eos_token_id=100001, torch_dtype="bfloat16",
    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                      mscale=0.707, mscale_all_dim=0.707))


def preset_config(name, layers=None):
    """The Hugging Face config.json of a released shape, optionally cut to fewer layers."""
    hf = dict(PRESET_COMMON, **PRESETS[name])
    if layers:
        hf["num_hidden_layers"] = layers
    return hf


def export_random(preset, out, dtype_name, layers, seed, show_layout=False):
    """Random weights of a real shape, straight into our format, a chunk at a time: uniform with
    std 0.02 for matrices (router included: its logits spread tokens over the experts), norms 1."""
    tokenizer = b""
    if os.path.isfile(preset):  # a config.json of our own (e.g. models/tiny), with the tokenizer beside it
        hf = read_json(preset)
        if layers:
            hf["num_hidden_layers"] = layers
        config = read_config(preset, hf)
        tok_path = os.path.join(os.path.dirname(preset), "tokenizer.json")
        if os.path.exists(tok_path):
            tokenizer = read_tokenizer(tok_path)[0]
            check_tokenizer_fits(tokenizer, config, tok_path)
    elif preset in PRESETS:
        config = read_config(f"--random {preset}", preset_config(preset, layers))
    elif preset.endswith(".json") or os.sep in preset:
        fail(f"{preset}: no such config.json (--train-tokenizer CORPUS VOCAB DIR writes DIR/config.json)")
    else:
        fail(f"--random expects one of {', '.join(PRESETS)} or a config.json")
    dtype_name = dtype_name or "bf16"
    config["dtype"] = DTYPES[dtype_name]
    config["q8_group"] = q8_group_size(config) if dtype_name in ("q8", "q4") else 0
    rng = np.random.default_rng(seed)
    half_width = 0.02 * 3 ** 0.5  # uniform(-a, a) has std a / sqrt(3)

    def chunks(shape, is_matrix):
        if not is_matrix and len(shape) == 1:
            yield np.ones(shape[0], dtype=np.float32), "F32"
            return
        rows_per = max(1, (16 << 20) // shape[-1])
        for r in range(0, shape[0], rows_per):
            n = min(rows_per, shape[0] - r) * shape[-1]
            yield (rng.random(n, dtype=np.float32) * 2 - 1) * half_width, "F32"

    with Writer(out, config) as w:
        for name, shape, is_matrix in tensor_plan(config):
            write_tensor(w, name, shape, chunks(shape, is_matrix), is_matrix, dtype_name, config["q8_group"])
        finish(w, tokenizer, show_layout,
               f"wrote {out}: random {preset}, {config['num_hidden_layers']} layers, {dtype_name}, {{gib:.3f}} GiB")


def train_tokenizer(corpus, vocab_size, out_dir):
    """Byte-level BPE trained on a text file, saved as a Hugging Face tokenizer.json (the format the
    real DeepSeek tokenizers use, read back by the same code): 256 byte tokens, then one token per
    merge, then BOS and EOS. Pre-tokenizer: GPT-2's ByteLevel regex; the words are counted with
    Python's closest form of it (\\p{L} as [^\\W\\d_]), on any UTF-8 text, as bytes. Also writes a
    starting config.json (the built-in model's shape, this vocabulary) unless one is there."""
    import collections
    import re
    try:
        with open(corpus, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {corpus} as UTF-8 text: {e}")
    n_merges = vocab_size - 256 - 2
    if n_merges < 0:
        fail("the vocabulary must hold at least 258 tokens (256 bytes, BOS, EOS)")
    unicode_gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"
    byte_char = {b: ch for ch, b in byte_level_decoder().items()}
    words = collections.Counter(re.findall(unicode_gpt2, text))
    seqs = [[byte_char[b] for b in w.encode()] for w in words]
    freqs = list(words.values())
    pairs, where = collections.Counter(), collections.defaultdict(set)
    for i, sq in enumerate(seqs):
        for a, b in zip(sq, sq[1:]):
            pairs[a, b] += freqs[i]
            where[a, b].add(i)
    vocab = [byte_char[b] for b in range(256)]
    merges = []
    for _ in range(n_merges):
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merges.append((a, b))
        vocab.append(a + b)
        for i in list(where[a, b]):
            sq, f = seqs[i], freqs[i]
            for x, y in zip(sq, sq[1:]):  # remove this word's old pairs
                pairs[x, y] -= f
                if pairs[x, y] <= 0:
                    del pairs[x, y]
                where[x, y].discard(i)
            j, new = 0, []
            while j < len(sq):
                if j + 1 < len(sq) and sq[j] == a and sq[j + 1] == b:
                    new.append(a + b)
                    j += 2
                else:
                    new.append(sq[j])
                    j += 1
            seqs[i] = new
            for x, y in zip(new, new[1:]):
                pairs[x, y] += f
                where[x, y].add(i)
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    n = len(vocab)
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [dict(id=n, content=bos, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True),
                           dict(id=n + 1, content=eos, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)],
          "normalizer": None,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
          "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                                     {"Sequence": {"id": "A", "type_id": 0}}]},
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                    "vocab": {t: i for i, t in enumerate(vocab)}, "merges": [f"{x} {y}" for x, y in merges]}}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": bos, "eos_token": eos, "add_bos_token": True, "chat_template": V2_CHAT_TEMPLATE}, f)
    print(f"wrote {out_dir}/tokenizer.json: {n + 2} tokens ({len(merges)} merges) from {len(text)} characters of {corpus}")
    config_path = os.path.join(out_dir, "config.json")
    if os.path.exists(config_path):
        print(f"kept {config_path} (vocab_size, bos_token_id and eos_token_id must be {n + 2}, {n}, {n + 1})")
        return
    with open(config_path, "w") as f:
        json.dump(dict(preset_config("tiny"), vocab_size=n + 2, bos_token_id=n, eos_token_id=n + 1), f, indent=2)
    print(f"wrote {config_path}: the built-in model's shape with this vocabulary; edit it to change the size")


def export_tokenizer(path, out):
    blob, n_ids, chat = read_tokenizer(path)
    try:
        with open(out + ".tmp", "wb") as f:
            f.write(blob)
        os.replace(out + ".tmp", out)
    except OSError as e:
        if os.path.exists(out + ".tmp"):
            os.remove(out + ".tmp")
        fail(f"cannot write {out}: {e}")
    print(f"wrote {out}: tokenizer with {n_ids} ids, chat template {chat}")


USAGE = """usage: python3 export.py HF_DIR OUT.bin [--dtype f32|bf16|q8|q4] [--print-layout]
       python3 export.py MODEL.bin OUT.bin --dtype f32|bf16|q8|q4   (a dsv2 file into another dtype; q8/q4 only to f32/bf16)
       python3 export.py --random lite|v2|tiny|CONFIG.json OUT.bin [--layers N] [--dtype f32|bf16|q8|q4] [--seed S]
       python3 export.py --tokenizer tokenizer.json OUT.tok
       python3 export.py --train-tokenizer CORPUS.txt VOCAB_SIZE OUT_DIR
HF_DIR: a Hugging Face DeepSeek-V2 folder (config.json, safetensors, tokenizer.json). --dtype: bf16 stays
bf16, anything else becomes f32 unless given. --random: random weights of a released shape, of the built-in
model's (tiny), or of a config.json (with the tokenizer beside it). --train-tokenizer: a byte-level BPE
tokenizer of VOCAB_SIZE tokens trained on any UTF-8 text, and a starting config.json in OUT_DIR.
--print-layout: every block written, as `./dsv2 OUT.bin -m layout` prints it."""


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 1)
    if "--tokenizer" not in argv and "--train-tokenizer" not in argv:
        need_numpy()
    args, dtype, tokenizer, random_preset, layers, seed, show_layout = [], None, None, None, None, 0, False
    i = 0
    while i < len(argv):
        if argv[i] == "--train-tokenizer":
            if len(argv) != i + 4:
                fail("usage: python3 export.py --train-tokenizer CORPUS.txt VOCAB_SIZE OUT_DIR")
            try:
                vocab_size = int(argv[i + 2])
            except ValueError:
                fail("VOCAB_SIZE must be an integer")
            train_tokenizer(argv[i + 1], vocab_size, argv[i + 3])
            return
        if argv[i] in ("--random", "--layers", "--seed"):
            if i + 1 >= len(argv):
                fail(f"{argv[i]} needs a value")
            if argv[i] == "--random":
                random_preset = argv[i + 1]
            else:
                try:
                    v = int(argv[i + 1])
                except ValueError:
                    fail(f"{argv[i]} expects an integer")
                if argv[i] == "--layers":
                    layers = v
                    if v < 1:
                        fail("--layers must be at least 1")
                else:
                    seed = v
            i += 2
        elif argv[i] == "--print-layout":
            show_layout = True
            i += 1
        elif argv[i] == "--tokenizer":
            if i + 1 >= len(argv):
                fail("--tokenizer expects the path of a tokenizer.json")
            tokenizer = argv[i + 1]
            i += 2
        elif argv[i] == "--dtype":
            if i + 1 >= len(argv) or argv[i + 1] not in DTYPES:
                fail(f"--dtype expects one of {', '.join(DTYPES)}")
            dtype = argv[i + 1]
            i += 2
        elif argv[i].startswith("-"):
            fail(f"unknown option {argv[i]}")
        else:
            args.append(argv[i])
            i += 1
    if random_preset is not None:
        if len(args) != 1:
            sys.exit(USAGE)
        export_random(random_preset, args[0], dtype, layers, seed, show_layout)
        return
    if tokenizer is not None:
        if len(args) != 1:
            sys.exit(USAGE)
        export_tokenizer(tokenizer, args[0])
        return
    if len(args) != 2:
        sys.exit(USAGE)
    if os.path.isfile(args[0]):  # one of our own files, into another dtype
        export_dsv2(args[0], args[1], dtype, show_layout)
        return
    export_model(args[0], args[1], dtype, show_layout)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        fail("interrupted")
    except BrokenPipeError:  # the reader went away (export.py --help | head): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as e:  # one line, never a traceback: an input this file did not foresee
        fail(f"unexpected {type(e).__name__}: {e}")
