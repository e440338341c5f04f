#!/usr/bin/env python3
"""Attention cost per decoded token, naive against absorbed MLA, for DeepSeek-V2-Lite and
DeepSeek-V2 at 1K, 8K, 32K and 128K tokens of context: the KV cache bytes read and the
floating-point operations (one multiply-add = 2), summed over all layers, cache in float32 as
dsv2 keeps it (bf16 halves the bytes). Printed as the Markdown table docs/walkthrough.md shows.

    python3 docs/costs.py

Per layer, for one new token attending to S cached tokens (H heads, dn + dr query/key width,
dv value width, r = kv_lora_rank):
  naive:    reads S H (dn + dr + dv) cached floats; scores 2 H S (dn + dr), sum 2 H S dv,
            plus decompressing the new token's k and v: 2 H (dn + dv) r
  absorbed: reads S (r + dr) cached floats; q_abs = W^UK^T q^C: 2 H dn r, scores 2 H S (r + dr),
            sum 2 H S r, then W^UV u: 2 H r dv
"""

MODELS = {  # the released config.json values
    "DeepSeek-V2-Lite": dict(L=27, H=16, dn=128, dr=64, dv=128, r=512),
    "DeepSeek-V2": dict(L=60, H=128, dn=128, dr=64, dv=128, r=512),
}


def costs(m, S):
    L, H, dn, dr, dv, r = (m[k] for k in ("L", "H", "dn", "dr", "dv", "r"))
    naive_bytes = 4 * S * H * (dn + dr + dv)
    naive_flops = 2 * H * S * (dn + dr) + 2 * H * S * dv + 2 * H * (dn + dv) * r
    absorbed_bytes = 4 * S * (r + dr)
    absorbed_flops = 2 * H * dn * r + 2 * H * S * (r + dr) + 2 * H * S * r + 2 * H * r * dv
    return L * naive_bytes, L * naive_flops, L * absorbed_bytes, L * absorbed_flops


def human(n, unit):
    for prefix in ("", "K", "M", "G", "T"):
        if n < 1000:
            return f"{n:.3g} {prefix}{unit}"
        n /= 1000
    return f"{n:.3g} P{unit}"


def main():
    print("| model | context | naive: cache read | naive: FLOPs | absorbed: cache read | absorbed: FLOPs "
          "| bytes saved | FLOPs added |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in MODELS.items():
        for S in (1024, 8192, 32768, 131072):
            nb, nf, ab, af = costs(m, S)
            print(f"| {name} | {S // 1024}K | {human(nb, 'B')} | {human(nf, 'FLOP')} | {human(ab, 'B')} "
                  f"| {human(af, 'FLOP')} | {nb / ab:.1f}x | {af / nf:.1f}x |")


if __name__ == "__main__":
    main()
