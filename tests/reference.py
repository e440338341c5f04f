#!/usr/bin/env python3
"""An independent float64 transcription of the DeepSeek-V2 forward pass, in numpy, written from the
paper and shared/docs/architecture.md (not from the official modeling code), to check dsv2 against
and to make fixtures for configs no official fixture covers.

    python3 tests/reference.py CONFIG.json|HF_DIR OUT_DIR [--seed S] [--prompt N] [--gen N]
        a fixture folder for ./test_all OUT_DIR: config.json, model.safetensors (random float32
        weights when given a config.json; the folder's own weights when given a HF folder, and
        an official fixture's prompt when the folder is one),
        manifest.txt and forward.bin with logits at every position, a greedy continuation, the
        hidden state after every layer, the latent cache, the RoPE tables and the routing
    python3 tests/reference.py --route-example [SEED]
        device-limited routing worked through on DeepSeek-V2's real config (docs/walkthrough.md)
    python3 tests/reference.py --check FIXTURE_DIR
        this transcription against a fixture's references (the official code's outputs), in both
        MLA forms: prints the largest differences, exits 1 if any logit differs by more than 1e-6

Both forms of attention are here: naive (per-head keys and values from the latent, MHA over the
whole prompt with a causal mask) and absorbed (token by token over the cache of c^KV and k^R, with
W^UK folded into the query and W^UV applied after the weighted sum). They must agree.
"""
import json
import math
import os
import struct
import sys

import numpy as np


# ------------------------------------------------------------------------------------- config

def load_config(path):
    """config.json with the defaults the official configuration class uses for absent keys."""
    with open(path) as f:
        c = json.load(f)
    c.setdefault("q_lora_rank", None)
    c.setdefault("rms_norm_eps", 1e-6)
    c.setdefault("rope_theta", 10000.0)
    c.setdefault("rope_scaling", None)
    c.setdefault("n_shared_experts", None)
    c.setdefault("n_routed_experts", None)
    c.setdefault("first_k_dense_replace", 0)
    c.setdefault("moe_layer_freq", 1)
    c.setdefault("routed_scaling_factor", 1.0)
    c.setdefault("norm_topk_prob", False)
    c.setdefault("topk_method", "greedy")
    c.setdefault("n_group", 1)
    c.setdefault("topk_group", 1)
    if c.get("scoring_func", "softmax") != "softmax":
        sys.exit(f"reference.py: scoring_func {c['scoring_func']} is not DeepSeek-V2's softmax")
    rs = c["rope_scaling"]
    if rs is not None and rs.get("type", rs.get("rope_type")) != "yarn":
        sys.exit("reference.py: only rope_scaling of type yarn (every release) or none")
    return c


def is_moe(c, l):
    return (c["n_routed_experts"] is not None and l >= c["first_k_dense_replace"]
            and l % c["moe_layer_freq"] == 0)


# ------------------------------------------------------------------------------------ weights

def read_safetensors(folder):
    """Every tensor of the folder (one file, or shards with an index) as float64."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    weights = {}
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            data = f.read()
        for key, t in header.items():
            if key == "__metadata__":
                continue
            a, b = t["data_offsets"]
            raw = data[a:b]
            if t["dtype"] == "F32":
                x = np.frombuffer(raw, dtype="<f4")
            elif t["dtype"] == "F16":
                x = np.frombuffer(raw, dtype="<f2")
            elif t["dtype"] == "BF16":
                x = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                sys.exit(f"reference.py: {key} has dtype {t['dtype']}")
            weights[key] = x.astype(np.float64).reshape(t["shape"])
    return weights


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def random_weights(c, rng):
    """float32 weights of the config's shapes: matrices N(0, 0.02^2) scaled up where tiny models
    need signal (router), norms near 1."""
    D, H, V = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    dn, dr, dv, r = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    w = {}

    def mat(name, rows, cols, std=0.02):
        w[name] = rng.normal(0, std, (rows, cols)).astype(np.float32)

    def norm(name, n):
        w[name] = (1 + rng.normal(0, 0.1, n)).astype(np.float32)

    std = 1 / math.sqrt(D)
    mat("model.embed_tokens.weight", V, D, 1.0)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        norm(p + "input_layernorm.weight", D)
        if c["q_lora_rank"]:
            mat(p + "self_attn.q_a_proj.weight", c["q_lora_rank"], D, std)
            norm(p + "self_attn.q_a_layernorm.weight", c["q_lora_rank"])
            mat(p + "self_attn.q_b_proj.weight", H * (dn + dr), c["q_lora_rank"], 1 / math.sqrt(c["q_lora_rank"]))
        else:
            mat(p + "self_attn.q_proj.weight", H * (dn + dr), D, std)
        mat(p + "self_attn.kv_a_proj_with_mqa.weight", r + dr, D, std)
        norm(p + "self_attn.kv_a_layernorm.weight", r)
        mat(p + "self_attn.kv_b_proj.weight", H * (dn + dv), r, 1 / math.sqrt(r))
        mat(p + "self_attn.o_proj.weight", D, H * dv, 1 / math.sqrt(H * dv))
        norm(p + "post_attention_layernorm.weight", D)
        if is_moe(c, l):
            Im = c["moe_intermediate_size"]
            mat(p + "mlp.gate.weight", c["n_routed_experts"], D, 3 * std)  # clear routing margins
            for e in range(c["n_routed_experts"]):
                mat(p + f"mlp.experts.{e}.gate_proj.weight", Im, D, std)
                mat(p + f"mlp.experts.{e}.up_proj.weight", Im, D, std)
                mat(p + f"mlp.experts.{e}.down_proj.weight", D, Im, 1 / math.sqrt(Im))
            if c["n_shared_experts"]:
                S = c["n_shared_experts"] * Im
                mat(p + "mlp.shared_experts.gate_proj.weight", S, D, std)
                mat(p + "mlp.shared_experts.up_proj.weight", S, D, std)
                mat(p + "mlp.shared_experts.down_proj.weight", D, S, 1 / math.sqrt(S))
        else:
            I = c["intermediate_size"]
            mat(p + "mlp.gate_proj.weight", I, D, std)
            mat(p + "mlp.up_proj.weight", I, D, std)
            mat(p + "mlp.down_proj.weight", D, I, 1 / math.sqrt(I))
    norm("model.norm.weight", D)
    if not c.get("tie_word_embeddings"):
        mat("lm_head.weight", V, D, std)
    return w


# ---------------------------------------------------------------------------- building blocks

def rmsnorm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x):
    return x / (1 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def linear(x, w, name):
    """x W^T (+ b where the checkpoint has a bias: attention_bias configs)."""
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y


def mlp(x, w, prefix):
    gate = linear(x, w, prefix + "gate_proj")
    up = linear(x, w, prefix + "up_proj")
    return linear(silu(gate) * up, w, prefix + "down_proj")


def yarn_mscale(scale, m):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def rope_tables(c, positions):
    """inv_freq (YaRN when configured) and the cos/sin tables with YaRN's magnitude correction."""
    d, base, rs = c["qk_rope_head_dim"], c["rope_theta"], c["rope_scaling"]
    i = np.arange(d // 2, dtype=np.float64)
    extra = 1.0 / base ** (2 * i / d)
    scale = 1.0
    if rs is None:
        inv_freq = extra
    else:
        factor = rs["factor"]
        L0 = rs.get("original_max_position_embeddings", 4096)
        fast, slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

        def corr_dim(n):  # the dimension whose wavelength fits n times in L0
            return d * math.log(L0 / (n * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(corr_dim(fast)), 0)
        high = min(math.ceil(corr_dim(slow)), d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((i - low) / (high - low), 0, 1)
        keep = 1 - ramp  # 1: the original frequency
        inv_freq = extra / factor * (1 - keep) + extra * keep
        scale = yarn_mscale(factor, rs.get("mscale", 1)) / yarn_mscale(factor, rs.get("mscale_all_dim", 0))
    angle = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return inv_freq, np.cos(angle) * scale, np.sin(angle) * scale


def rope(x, cos, sin):
    """The pair rotation of (x[2i], x[2i+1]) by p * inv_freq[i], in place (the official code's
    permute-then-rotate-half gives the same dot products; see the spec)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    y = np.empty_like(x)
    y[..., 0::2] = even * cos - odd * sin
    y[..., 1::2] = even * sin + odd * cos
    return y


def softmax_scale(c):
    dq = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    s = dq ** -0.5
    rs = c["rope_scaling"]
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        s *= m * m
    return s


def route(c, x, gate):
    """Scores (softmax over all experts), the K chosen experts (ascending id) and their weights."""
    E, K = c["n_routed_experts"], c["num_experts_per_tok"]
    scores = softmax(x @ gate.T)
    masked = scores.copy()
    if c["topk_method"] == "group_limited_greedy":
        G = c["n_group"]
        group_best = scores.reshape(len(x), G, E // G).max(axis=-1)
        for t in range(len(x)):
            kept = np.argsort(-group_best[t], kind="stable")[: c["topk_group"]]
            drop = np.ones(G, bool)
            drop[kept] = False
            masked[t].reshape(G, E // G)[drop] = 0.0
    elif c["topk_method"] != "greedy":
        sys.exit(f"reference.py: topk_method {c['topk_method']}")
    idx = np.sort(np.argsort(-masked, axis=-1, kind="stable")[:, :K], axis=-1)
    weight = np.take_along_axis(scores, idx, axis=-1)
    if K > 1 and c["norm_topk_prob"]:
        weight = weight / (weight.sum(axis=-1, keepdims=True) + 1e-20)
    else:
        weight = weight * c["routed_scaling_factor"]
    return scores, idx, weight


def moe(c, x, w, p, record):
    scores, idx, weight = route(c, x, w[p + "mlp.gate.weight"])
    record.update(scores=scores, idx=idx, weight=weight)
    out = np.zeros_like(x)
    for t in range(len(x)):
        for k in range(idx.shape[1]):
            out[t] += weight[t, k] * mlp(x[t:t + 1], w, p + f"mlp.experts.{idx[t, k]}.")[0]
    if c["n_shared_experts"]:
        out += mlp(x, w, p + "mlp.shared_experts.")
    return out


# ------------------------------------------------------------------------------------ the model

class Model:
    def __init__(self, c, w):
        self.c, self.w = c, w
        self.H, self.dn, self.dr = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"]
        self.dv, self.r = c["v_head_dim"], c["kv_lora_rank"]
        self.scale = softmax_scale(c)

    def query(self, x, p, cos, sin):
        """q^C and the rotated q^R per head: [T][H][dn], [T][H][dr]."""
        c, w = self.c, self.w
        if c["q_lora_rank"]:
            cq = rmsnorm(linear(x, w, p + "self_attn.q_a_proj"), w[p + "self_attn.q_a_layernorm.weight"], 1e-6)
            q = linear(cq, w, p + "self_attn.q_b_proj")
        else:
            q = linear(x, w, p + "self_attn.q_proj")
        q = q.reshape(len(x), self.H, self.dn + self.dr)
        return q[..., :self.dn], rope(q[..., self.dn:], cos[:, None, :], sin[:, None, :])

    def latent(self, x, p, cos, sin):
        """c^KV (normed) and the rotated shared k^R: [T][r], [T][dr]."""
        a = linear(x, self.w, p + "self_attn.kv_a_proj_with_mqa")
        c_kv = rmsnorm(a[:, :self.r], self.w[p + "self_attn.kv_a_layernorm.weight"], 1e-6)
        return c_kv, rope(a[:, self.r:], cos, sin)

    def attention_naive(self, x, p, cos, sin):
        """The whole sequence at once: per-head keys and values from the latent, causal MHA."""
        q_nope, q_pe = self.query(x, p, cos, sin)
        c_kv, k_pe = self.latent(x, p, cos, sin)
        kv = linear(c_kv, self.w, p + "self_attn.kv_b_proj").reshape(len(x), self.H, self.dn + self.dv)
        k_nope, v = kv[..., :self.dn], kv[..., self.dn:]
        s = (np.einsum("ihd,jhd->hij", q_nope, k_nope) + np.einsum("ihd,jd->hij", q_pe, k_pe)) * self.scale
        T = len(x)
        s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
        o = np.einsum("hij,jhd->ihd", softmax(s), v).reshape(T, self.H * self.dv)
        return linear(o, self.w, p + "self_attn.o_proj"), (c_kv, k_pe)

    def attention_absorbed(self, x, p, cos, sin, cache):
        """One token at position len(cache): W^UK folded into the query, scores against the latent
        cache, W^UV applied to the probability-weighted latent."""
        q_nope, q_pe = self.query(x, p, cos, sin)
        c_kv, k_pe = self.latent(x, p, cos, sin)
        cache.append((c_kv[0], k_pe[0]))
        C = np.stack([e[0] for e in cache])                       # [S][r]
        KR = np.stack([e[1] for e in cache])                      # [S][dr]
        kv_b = self.w[p + "self_attn.kv_b_proj.weight"].reshape(self.H, self.dn + self.dv, self.r)
        w_uk, w_uv = kv_b[:, :self.dn, :], kv_b[:, self.dn:, :]
        if p + "self_attn.kv_b_proj.bias" in self.w:
            sys.exit("reference.py: a kv_b_proj bias cannot be absorbed (no DeepSeek-V2 config has one)")
        q_abs = np.einsum("hd,hdr->hr", q_nope[0], w_uk)           # W^UK^T q^C per head
        s = (q_abs @ C.T + q_pe[0] @ KR.T) * self.scale            # [H][S]
        u = softmax(s) @ C                                         # sum_j P_j c_j, [H][r]
        o = np.einsum("hdr,hr->hd", w_uv, u).reshape(1, self.H * self.dv)
        return linear(o, self.w, p + "self_attn.o_proj"), (c_kv, k_pe)

    def forward(self, ids, positions, cos, sin, form, caches=None, trace=None):
        """Logits [T][V] for ids at the given positions. form "naive": all at once; "absorb": one
        token, appending to caches (one list per layer). trace: filled with the hidden states, the
        latent cache and the routing of every layer."""
        c, w = self.c, self.w
        h = w["model.embed_tokens.weight"][ids]
        cs, sn = cos[positions], sin[positions]
        if trace is not None:
            trace["embed"] = h.copy()
        for l in range(c["num_hidden_layers"]):
            p = f"model.layers.{l}."
            x = rmsnorm(h, w[p + "input_layernorm.weight"], c["rms_norm_eps"])
            if form == "naive":
                a, latent = self.attention_naive(x, p, cs, sn)
            else:
                a, latent = self.attention_absorbed(x, p, cs, sn, caches[l])
            h = h + a
            x = rmsnorm(h, w[p + "post_attention_layernorm.weight"], c["rms_norm_eps"])
            record = {}
            h = h + (moe(c, x, w, p, record) if is_moe(c, l) else mlp(x, w, p + "mlp."))
            if trace is not None:
                trace[l] = dict(hidden=h.copy(), c_kv=latent[0], k_pe=latent[1], **record)
        h = rmsnorm(h, w["model.norm.weight"], c["rms_norm_eps"])
        if trace is not None:
            trace["final_norm"] = h.copy()
        return h @ w["lm_head.weight" if "lm_head.weight" in w else "model.embed_tokens.weight"].T

    def prompt_naive(self, ids, cos, sin, trace=None):
        return self.forward(np.array(ids), np.arange(len(ids)), cos, sin, "naive", trace=trace)

    def decode_absorbed(self, ids, cos, sin):
        """Every position's logits, token by token over the latent cache."""
        caches = [[] for _ in range(self.c["num_hidden_layers"])]
        return np.concatenate([self.forward(np.array([t]), np.array([i]), cos, sin, "absorb", caches)
                               for i, t in enumerate(ids)])


# ------------------------------------------------------------------------------------ fixtures

def read_manifest(folder):
    refs = {}
    with open(os.path.join(folder, "manifest.txt")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            parts = line.split()
            name, dtype, ndim = parts[0], parts[1], int(parts[2])
            dims = [int(d) for d in parts[3:3 + ndim]]
            file, offset = parts[3 + ndim], int(parts[4 + ndim])
            n = int(np.prod(dims))
            with open(os.path.join(folder, file), "rb") as g:
                g.seek(offset)
                a = np.frombuffer(g.read(4 * n), dtype="<f4" if dtype == "f32" else "<i4")
            refs[name] = a.reshape(dims)
    return refs


def run_all(c, w, prompt, n_gen):
    """Everything a forward fixture holds, the prompt naive and the continuation absorbed."""
    model = Model(c, w)
    total = len(prompt) + n_gen
    inv_freq, cos, sin = rope_tables(c, total)
    trace = {}
    logits = model.prompt_naive(prompt, cos, sin, trace)
    ids = list(prompt)
    gen, gen_logits = [], []
    caches = [[] for _ in range(c["num_hidden_layers"])]
    for i, t in enumerate(ids):  # the prompt into the latent cache, then greedy decoding
        last = model.forward(np.array([t]), np.array([i]), cos, sin, "absorb", caches)
    for k in range(n_gen):
        gen_logits.append(last[0])
        gen.append(int(np.argmax(last[0])))
        if k + 1 < n_gen:
            last = model.forward(np.array([gen[-1]]), np.array([len(ids) + k]), cos, sin, "absorb", caches)
    return dict(model=model, logits=logits, gen=gen, gen_logits=np.array(gen_logits), trace=trace,
                inv_freq=inv_freq, cos=cos, sin=sin)


def write_fixture(out, c, out_dir, prompt):
    """manifest.txt and forward.bin in the official fixtures' format."""
    tensors = [("prompt_ids", np.array(prompt, dtype=np.int32)), ("logits", out["logits"]),
               ("gen_ids", np.array(out["gen"], dtype=np.int32)), ("gen_logits", out["gen_logits"]),
               ("hidden.embed", out["trace"]["embed"])]
    L = c["num_hidden_layers"]
    tensors += [(f"hidden.layer.{l}", out["trace"][l]["hidden"]) for l in range(L)]
    tensors += [("hidden.final_norm", out["trace"]["final_norm"]), ("rope.inv_freq", out["inv_freq"]),
                ("rope.cos", out["cos"]), ("rope.sin", out["sin"])]
    for l in range(L):
        tensors += [(f"cache.{l}.c_kv", out["trace"][l]["c_kv"]), (f"cache.{l}.k_pe", out["trace"][l]["k_pe"])]
    for l in range(L):
        if is_moe(c, l):
            t = out["trace"][l]
            tensors += [(f"route.{l}.scores", t["scores"]), (f"route.{l}.idx", t["idx"].astype(np.int32)),
                        (f"route.{l}.weight", t["weight"])]
    lines = ["# name dtype ndim dims... file byte_offset   (little-endian, row-major)"]
    offset = 0
    with open(os.path.join(out_dir, "forward.bin"), "wb") as f:
        for name, a in tensors:
            kind = "i32" if a.dtype == np.int32 else "f32"
            b = np.ascontiguousarray(a, dtype="<i4" if kind == "i32" else "<f4").tobytes()
            lines.append(f"{name} {kind} {a.ndim} {' '.join(map(str, a.shape))} forward.bin {offset}")
            f.write(b)
            offset += len(b)
    with open(os.path.join(out_dir, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def make_fixture(source, out_dir, seed, n_prompt, n_gen):
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    if os.path.isdir(source):
        c = load_config(os.path.join(source, "config.json"))
        w = read_safetensors(source)
        with open(os.path.join(source, "config.json")) as f:
            config_text = f.read()
    else:
        c = load_config(source)
        w32 = random_weights(c, rng)
        write_safetensors(os.path.join(out_dir, "model.safetensors"), w32)
        w = {k: v.astype(np.float64) for k, v in w32.items()}
        with open(source) as f:
            config_text = f.read()
    if os.path.abspath(source) != os.path.abspath(out_dir):
        if os.path.isdir(source):
            for name in os.listdir(source):
                if name.endswith(".safetensors") or name == "model.safetensors.index.json":
                    with open(os.path.join(source, name), "rb") as f, open(os.path.join(out_dir, name), "wb") as g:
                        g.write(f.read())
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write(config_text)
    n_prompt = min(n_prompt, c["max_position_embeddings"] - n_gen)
    prompt = [int(t) for t in rng.integers(0, c["vocab_size"], n_prompt)]
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "manifest.txt")):
        refs = read_manifest(source)  # an official fixture: the same prompt, comparable outputs
        if "prompt_ids" in refs:
            prompt = [int(t) for t in refs["prompt_ids"]]
            n_gen = len(refs["gen_ids"]) if "gen_ids" in refs else n_gen
    out = run_all(c, w, prompt, n_gen)
    absorbed = out["model"].decode_absorbed(prompt, out["cos"], out["sin"])
    agree = np.abs(absorbed - out["logits"]).max()
    if agree > 1e-9:
        sys.exit(f"reference.py: naive and absorbed logits differ by {agree:.2e}")
    write_fixture(out, c, out_dir, prompt)
    print(f"wrote {out_dir}: {len(prompt)} prompt + {n_gen} generated tokens, {c['num_hidden_layers']} layers; "
          f"naive vs absorbed max |dlogit| {agree:.1e}")


def check_fixture(folder):
    """This transcription against the official references of a fixture folder, both MLA forms."""
    c = load_config(os.path.join(folder, "config.json"))
    refs = read_manifest(folder)
    prompt = [int(t) for t in refs["prompt_ids"]]
    out = run_all(c, read_safetensors(folder), prompt, len(refs["gen_ids"]))
    absorbed = out["model"].decode_absorbed(prompt, out["cos"], out["sin"])
    def excess(got, ref):  # how far past 1e-6 (or past float32's rounding of a large reference)
        return (np.abs(got - ref) / np.maximum(1e-6, 1.2e-7 * np.abs(ref))).max()
    diffs = {"logits (naive)": np.abs(out["logits"] - refs["logits"]).max(),
             "logits (absorbed)": np.abs(absorbed - refs["logits"]).max(),
             "generated logits (absorbed)": np.abs(out["gen_logits"] - refs["gen_logits"]).max()}
    worst = max(excess(out["logits"], refs["logits"]), excess(absorbed, refs["logits"]),
                excess(out["gen_logits"], refs["gen_logits"]))
    same_gen = out["gen"] == [int(t) for t in refs["gen_ids"]]
    worst_hidden = max(np.abs(out["trace"][l]["hidden"] - refs[f"hidden.layer.{l}"]).max()
                       for l in range(c["num_hidden_layers"]))
    worst_cache = max(max(np.abs(out["trace"][l]["c_kv"] - refs[f"cache.{l}.c_kv"]).max(),
                          np.abs(out["trace"][l]["k_pe"] - refs[f"cache.{l}.k_pe"]).max())
                      for l in range(c["num_hidden_layers"]))
    same_route = all((out["trace"][l]["idx"] == refs[f"route.{l}.idx"]).all()
                     for l in range(c["num_hidden_layers"]) if f"route.{l}.idx" in refs)
    print(f"{folder}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) +
          f", hidden {worst_hidden:.1e}, latent cache {worst_cache:.1e}, greedy continuation "
          f"{'identical' if same_gen else 'DIFFERS'}, routing {'identical' if same_route else 'DIFFERS'}")
    # the references are float32 copies of float64 results: within 1e-6, or within float32's
    # rounding (1.2e-7 relative) for logits beyond about 8
    ok = worst <= 1 and same_gen and same_route
    sys.exit(0 if ok else 1)


def route_example(seed):
    """Device-limited routing step by step on DeepSeek-V2's released config (160 experts in 8
    groups of 20, keep 3 groups, then the top 6 experts, gates times routed_scaling_factor 16)."""
    c = dict(n_routed_experts=160, num_experts_per_tok=6, topk_method="group_limited_greedy", n_group=8,
             topk_group=3, norm_topk_prob=False, routed_scaling_factor=16.0)
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (1, 160))  # one token's router logits u_t . e_i
    scores = softmax(logits)[0]
    best = scores.reshape(8, 20).max(axis=1)
    kept = sorted(np.argsort(-best, kind="stable")[:3])
    plain = sorted(np.argsort(-scores, kind="stable")[:6])
    _, idx, weight = route(c, logits, np.eye(160))
    print("s_i,t = softmax over all 160 experts; the scores sum to %.6f" % scores.sum())
    for g in range(8):
        top = 20 * g + int(np.argmax(scores[20 * g:20 * g + 20]))
        print(f"group {g} (experts {20 * g:3d}-{20 * g + 19:3d}): best expert {top:3d}, score {best[g]:.4f}"
              + ("  <- kept" if g in kept else ""))
    print("kept groups:", " ".join(map(str, kept)))
    print("top-6 of the kept groups' experts:", " ".join(f"{e} ({scores[e]:.4f})" for e in idx[0]))
    print("top-6 without the group limit:     ", " ".join(f"{e} ({scores[e]:.4f})" for e in plain),
          f"-> groups {sorted({e // 20 for e in plain})}")
    print("gate values g_i,t = s_i,t * 16:", " ".join(f"{g:.4f}" for g in weight[0]),
          f"(sum {weight[0].sum():.4f})")


def main(argv):
    if len(argv) == 2 and argv[0] == "--check":
        check_fixture(argv[1])
        return
    if argv and argv[0] == "--route-example":
        route_example(int(argv[1]) if len(argv) > 1 else 7)
        return
    args, opts = [], {"--seed": 1, "--prompt": 24, "--gen": 8}
    i = 0
    while i < len(argv):
        if argv[i] in opts and i + 1 < len(argv):
            opts[argv[i]] = int(argv[i + 1])
            i += 2
        else:
            args.append(argv[i])
            i += 1
    if len(args) != 2:
        sys.exit(__doc__)
    make_fixture(args[0], args[1], opts["--seed"], opts["--prompt"], opts["--gen"])


if __name__ == "__main__":
    main(sys.argv[1:])
