#!/usr/bin/env python3
"""Two runs compared layer by layer: which position, layer and quantity differ first.

    python3 tests/compare_layers.py A B [--tol 1e-4]

A and B: files written by `dsv2 MODEL -m layers -f IDS -o FILE` (the CPU build ./dsv2 or the
GPU build ./dsv2cu), or an official fixture folder (tests/fixtures/lite: its manifest.txt's
hidden.layer.N, cache.N.c_kv/k_pe, route.N.idx/weight). B is the reference. For each position in
order and each layer in order it compares what the layer computes first to last: the latent
cache row it wrote [c^KV; k^R], the experts it chose, their gates, the hidden state it left.
A number differs when |A - B| > tol x the largest |B| of that quantity in that layer; experts
must be identical. Prints a line per layer and the first difference; exit 0 when none, 1 else.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import read_manifest  # noqa: E402  (the fixtures' manifest.txt, one reader)

QUANTITIES = ("latent", "experts", "gates", "hidden")


def read_layers(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 28 or data[:8] != b"DSV2LAYR":
        sys.exit(f"compare_layers.py: error: {path} is not a -m layers file")
    T, L, D, W, K = np.frombuffer(data, "<i4", 5, 8)
    per = D + W + 2 * K
    body = np.frombuffer(data, "<f4", offset=28)
    if body.size != T * L * per:
        sys.exit(f"compare_layers.py: error: {path}: {body.size} floats, the header says {T * L * per}")
    body = body.reshape(T, L, per)
    return {"hidden": body[:, :, :D], "latent": body[:, :, D:D + W],
            "experts": body[:, :, D + W:D + W + K], "gates": body[:, :, D + W + K:]}


def read_fixture(folder):
    tensors = read_manifest(folder)
    L = sum(1 for n in tensors if n.startswith("hidden.layer."))
    T, D = tensors["hidden.layer.0"].shape
    K = next((tensors[n].shape[1] for n in tensors if n.endswith(".idx")), 1)
    W = tensors["cache.0.c_kv"].shape[1] + tensors["cache.0.k_pe"].shape[1]
    out = {"hidden": np.zeros((T, L, D), "f4"), "latent": np.zeros((T, L, W), "f4"),
           "experts": np.full((T, L, K), -1, "f4"), "gates": np.zeros((T, L, K), "f4")}
    for l in range(L):
        out["hidden"][:, l] = tensors[f"hidden.layer.{l}"]
        out["latent"][:, l] = np.concatenate([tensors[f"cache.{l}.c_kv"], tensors[f"cache.{l}.k_pe"]], axis=1)
        if f"route.{l}.idx" in tensors:
            out["experts"][:, l] = tensors[f"route.{l}.idx"]
            out["gates"][:, l] = tensors[f"route.{l}.weight"]
    return out


def read(path):
    return read_fixture(path) if os.path.isdir(path) else read_layers(path)


def main(argv):
    tol = 1e-4
    if "--tol" in argv:
        i = argv.index("--tol")
        tol = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if len(argv) != 3:
        sys.exit(__doc__)
    a, b = read(argv[1]), read(argv[2])
    if any(a[q].shape[1:] != b[q].shape[1:] for q in QUANTITIES):
        sys.exit(f"compare_layers.py: error: the two runs have different shapes: "
                 f"{[a[q].shape for q in QUANTITIES]} vs {[b[q].shape for q in QUANTITIES]}")
    T = min(a["hidden"].shape[0], b["hidden"].shape[0])
    L = a["hidden"].shape[1]
    first = None
    for l in range(L):
        cells = []
        for q in QUANTITIES:
            x, y = a[q][:T, l].astype(np.float64), b[q][:T, l].astype(np.float64)
            d = np.abs(x - y)
            if q == "experts":
                bad = d > 0
                cells.append(f"experts {'same' if not bad.any() else f'differ at {int(bad.any(axis=1).sum())} positions'}")
            else:
                scale = max(1.0, float(np.abs(y).max()))
                bad = ~(d <= tol * scale)  # NaN counts as a difference
                cells.append(f"{q} {float(np.nanmax(d)) / scale if d.size else 0:.1e}")
            for t in np.flatnonzero(bad.any(axis=1)):
                where = (int(t), l, QUANTITIES.index(q))
                if first is None or where < first[0]:
                    first = (where, q, float(np.nanmax(d[t])))
        print(f"layer {l}: " + ", ".join(cells))
    if first is None:
        print(f"all {T} positions x {L} layers agree within {tol:g} of each quantity's scale; experts identical")
        return 0
    (t, l, _), q, worst = first
    print(f"first difference: position {t}, layer {l}, {q} (max |A - B| {worst:.3e} there)")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
