#!/usr/bin/env python3
"""Screen: a memory of the *training* prompts blended into the router (issue 13's memory lever,
the other way round from `score --calibration`'s memory of the user's labelled prompts).

For each dev row (prompt, model) the train prompts of the same source nearest to the dev prompt
(cosine of the served encoder's prompt embeddings) give that model's train outcomes; they are
blended with the row's p_route as pseudo-counts, the router's p counting as `alpha` outcomes and
each neighbour as exp((cos - 1) / tau) (tau 0: all alike), as `model::memory` blends (except that
outcomes here are pass/fail at score 0.5, where the Rust blends soft scores). Reported per
(k, tau, alpha): within-model AUROC (mean over the source's models with >= 50 train prompts) and
log-loss, router alone -> blended. Nothing here is fitted on dev; dev only reads the figures.

Inputs: the prompt-embedding store that `tiergate train` / `score --cache-dir models/cache`
writes (`prompt256-<rev>[-<numerics>].emb`: records of (SipHash-1-3 key of the text, f32 x dim),
the key as `eval::util::str_hash` computes it), and `tiergate score` output on dev rows (p_route).

usage: python3 scripts/train_memory_screen.py --emb models/cache/prompt256-53aa51172d14-int8.emb \
           SCORES.jsonl [SCORES.jsonl ...]
"""
import argparse, collections, gzip, json, math, os, sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from protocol import auroc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK = (1 << 64) - 1
DIM = 384
GRID = [(10, 0.0), (30, 0.0), (30, 0.05), (100, 0.05), (100, 0.1)]
ALPHAS = [2, 5, 10, 20]


def rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & MASK


def str_hash(s):
    """`eval::util::str_hash`: SipHash-1-3, keys (0, 0), over the UTF-8 bytes and 0xff."""
    data = s.encode() + b"\xff"
    v = [0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573]

    def rnd():
        v[0] = (v[0] + v[1]) & MASK; v[1] = rotl(v[1], 13) ^ v[0]; v[0] = rotl(v[0], 32)
        v[2] = (v[2] + v[3]) & MASK; v[3] = rotl(v[3], 16) ^ v[2]
        v[0] = (v[0] + v[3]) & MASK; v[3] = rotl(v[3], 21) ^ v[0]
        v[2] = (v[2] + v[1]) & MASK; v[1] = rotl(v[1], 17) ^ v[2]; v[2] = rotl(v[2], 32)

    n = len(data)
    full = n - n % 8
    for i in range(0, full, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v[3] ^= m; rnd(); v[0] ^= m
    b = ((n & 0xFF) << 56) | int.from_bytes(data[full:], "little")
    v[3] ^= b; rnd(); v[0] ^= b
    v[2] ^= 0xFF
    rnd(); rnd(); rnd()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def load_store(path):
    rec = 8 + DIM * 4
    raw = open(path, "rb").read()
    arr = np.frombuffer(raw[: len(raw) - len(raw) % rec], dtype=np.uint8).reshape(-1, rec)
    keys = arr[:, :8].copy().view("<u8").ravel()
    emb = arr[:, 8:].copy().view("<f4")
    return {int(k): emb[i] for i, k in enumerate(keys)}


def load_rows(data, split):
    rows = []
    with gzip.open(os.path.join(data, f"{split}.jsonl.gz"), "rt") as f:
        for line in f:
            r = json.loads(line)
            rows.append({k: r[k] for k in ("source", "prompt_id", "prompt", "model", "score")})
    return rows


def unit_rows(store, texts):
    m = np.stack([store[str_hash(t)] for t in texts])
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--emb", required=True)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("scores", nargs="+")
    a = ap.parse_args()
    assert str_hash("") == 0x30406EA523C53DEF, "str_hash no longer matches eval::util"
    store = load_store(a.emb)
    train, dev = load_rows(a.data, "train"), load_rows(a.data, "dev")
    p_route = {}
    for path in a.scores:
        for line in open(path):
            r = json.loads(line)
            p_route[(r["source"], r["prompt_id"], r["model"])] = r["p_route"]
    for src in sorted({s for s, _, _ in p_route}):
        t_text = {r["prompt_id"]: r["prompt"] for r in train if r["source"] == src}
        t_ids = sorted(t_text)
        t_ix = {p: i for i, p in enumerate(t_ids)}
        d_text = {r["prompt_id"]: r["prompt"] for r in dev if r["source"] == src}
        d_ids = sorted(d_text)
        d_ix = {p: i for i, p in enumerate(d_ids)}
        sims = unit_rows(store, [d_text[p] for p in d_ids]) @ unit_rows(
            store, [t_text[p] for p in t_ids]).T
        outcomes = collections.defaultdict(dict)
        for r in train:
            if r["source"] == src:
                outcomes[r["model"]][t_ix[r["prompt_id"]]] = float(r["score"] >= 0.5)
        by_model = collections.defaultdict(list)
        for r in dev:
            if (src, r["prompt_id"], r["model"]) in p_route:
                by_model[r["model"]].append(r)
        print(f"## {src}: {len(t_ids)} train prompts, {len(d_ids)} dev prompts, "
              f"nearest train cosine {sims.max(1).mean():.3f} (mean)")
        print("| k | tau | alpha | within-model AUROC router → blend | log-loss router → blend |")
        print("|---:|---:|---:|---|---|")
        for k, tau in GRID:
            for alpha in ALPHAS:
                au0, au1, ll0, ll1 = [], [], [], []
                for m, rows in sorted(by_model.items()):
                    have = outcomes[m]
                    if len(have) < 50:
                        continue
                    idx = np.array(sorted(have))
                    yv = np.array([have[i] for i in idx])
                    y, p0, p1 = [], [], []
                    for r in rows:
                        s = sims[d_ix[r["prompt_id"]], idx]
                        kk = min(k, len(s))
                        nn = np.argpartition(-s, kk - 1)[:kk]
                        w = np.exp((s[nn] - 1) / tau) if tau > 0 else np.ones(kk)
                        pr = p_route[(src, r["prompt_id"], m)]
                        y.append(int(r["score"] >= 0.5))
                        p0.append(pr)
                        p1.append((alpha * pr + (w * yv[nn]).sum()) / (alpha + w.sum()))
                    a0, a1 = auroc(p0, y), auroc(p1, y)
                    if a0 is not None and a1 is not None:
                        au0.append(a0); au1.append(a1)
                    yy = np.array(y)
                    for p, acc in ((p0, ll0), (p1, ll1)):
                        q = np.clip(np.array(p), 1e-4, 1 - 1e-4)
                        acc.append(float(-(yy * np.log(q) + (1 - yy) * np.log(1 - q)).mean()))
                print(f"| {k} | {tau} | {alpha} | {np.mean(au0):.4f} → {np.mean(au1):.4f} "
                      f"| {np.mean(ll0):.4f} → {np.mean(ll1):.4f} |")


if __name__ == "__main__":
    main()
