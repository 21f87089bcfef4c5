#!/usr/bin/env python3
"""Screen: does a verifier head per model add to the served p_verify within one model?

The served verifier is one head for every model: its answer-embedding weights are shared, and
what is model-specific reaches it only through the router logit and the answer's length against
the model's usual. Within-model AUROC (issue 13's yardstick) asks which of *one model's* answers
pass; a model's failures may look unlike another's. This screen fits, on the train rows of each
model, a logistic regression over the answer's embedding (the served encoder's, read from
`tiergate`'s content-addressed cache), and stacks its logit on the served p_verify of the dev
rows (a logistic fitted on one half of the dev prompts by md5 of prompt_id, read on the other,
both ways). A control fits one pooled head over the same embeddings (a bias per model), so that
a gain of the per-model heads is what model-specific weights add, not a second look at the
embedding.

Input: `tiergate score` output for the dev rows (committed heads, no calibration), and the
cache directory that run and one over the train rows filled (`--cache-dir`).

usage: python3 scripts/permodel_screen.py SOURCE TRAIN_ROWS DEV_ROWS DEV_SCORED CACHE_DIR
needs: numpy, scikit-learn
"""
import glob, gzip, hashlib, json, os, sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

M64 = (1 << 64) - 1
TIERS = {
    "mmlu_pro": ("gemini-1.5-flash-002", "gemini-1.5-pro-002"),
    "routerbench_0shot": ("mistralai/mistral-7b-chat", "mistralai/mixtral-8x7b-chat",
                          "zero-one-ai/Yi-34B-Chat", "gpt-4-1106-preview"),
}


def str_hash(s):
    """`tiergate`'s cache key (src/eval/util.rs): SipHash-1-3, keys 0, over the text and 0xff."""
    rotl = lambda x, b: ((x << b) | (x >> (64 - b))) & M64  # noqa: E731
    v = [0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573]

    def rnd():
        v[0] = (v[0] + v[1]) & M64; v[1] = rotl(v[1], 13) ^ v[0]; v[0] = rotl(v[0], 32)  # noqa: E702
        v[2] = (v[2] + v[3]) & M64; v[3] = rotl(v[3], 16) ^ v[2]  # noqa: E702
        v[0] = (v[0] + v[3]) & M64; v[3] = rotl(v[3], 21) ^ v[0]  # noqa: E702
        v[2] = (v[2] + v[1]) & M64; v[1] = rotl(v[1], 17) ^ v[2]; v[2] = rotl(v[2], 32)  # noqa: E702

    def block(m):
        v[3] ^= m
        rnd()
        v[0] ^= m

    data = s.encode() + b"\xff"
    full = len(data) - len(data) % 8
    for i in range(0, full, 8):
        block(int.from_bytes(data[i:i + 8], "little"))
    block(((len(data) & 0xFF) << 56) | int.from_bytes(data[full:], "little"))
    v[2] ^= 0xFF
    for _ in range(3):
        rnd()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def load_cache(pattern):
    got = sorted(glob.glob(pattern))
    if len(got) != 1:
        sys.exit(f"expected one cache file for {pattern}, found {got}")
    raw = np.fromfile(got[0], dtype=np.uint8)
    dim = 384
    rec = 8 + 4 * dim
    raw = raw[: len(raw) - len(raw) % rec].reshape(-1, rec)
    keys = raw[:, :8].copy().view("<u8").ravel()
    vecs = raw[:, 8:].copy().view("<f4")
    return {int(k): i for i, k in enumerate(keys)}, vecs


def rows_of(path, src):
    out = []
    for line in gzip.open(path, "rt"):
        r = json.loads(line)
        if r["source"] == src and r["response"] is not None:
            out.append(r)
    return out


def logit(p):
    p = np.clip(np.asarray(p, dtype=float), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def fit_head(x, y, groups):
    """A logistic head with C chosen by log-loss over 3 folds of prompts, refitted on all."""
    best = None
    for c in (0.003, 0.01, 0.03, 0.1, 0.3):
        loss = 0.0
        for k in range(3):
            tr, te = groups != k, groups == k
            if y[tr].all() or not y[tr].any():
                continue
            m = LogisticRegression(C=c, max_iter=2000).fit(x[tr], y[tr])
            loss += log_loss(y[te], m.predict_proba(x[te])[:, 1], labels=[False, True]) * te.sum()
        if best is None or loss < best[0]:
            best = (loss, c)
    return LogisticRegression(C=best[1], max_iter=2000).fit(x, y), best[1]


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    src, train_path, dev_path, scored_path, cache = sys.argv[1:]
    index, vecs = load_cache(f"{cache}/answer128-*.emb")
    emb = lambda rs: vecs[[index[str_hash(r["response"])] for r in rs]]  # noqa: E731
    served = {}
    for line in open(scored_path):
        r = json.loads(line)
        served[(r["prompt_id"], r["model"])] = r["p_verify"]
    train = rows_of(train_path, src)
    dev = [r for r in rows_of(dev_path, src) if served.get((r["prompt_id"], r["model"])) is not None]
    models = sorted({r["model"] for r in dev})
    xt, xd = emb(train), emb(dev)
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    xt, xd = (xt - mu) / sd, (xd - mu) / sd
    yt = np.array([r["score"] >= 0.5 for r in train])
    yd = np.array([r["score"] >= 0.5 for r in dev])
    gt = np.array([int(hashlib.md5(r["prompt_id"].encode()).hexdigest(), 16) % 3 for r in train])
    mt = np.array([r["model"] for r in train])
    md = np.array([r["model"] for r in dev])
    # Per-model heads.
    own = np.zeros(len(dev))
    cs = {}
    for m in models:
        i, j = mt == m, md == m
        if yt[i].all() or not yt[i].any():
            continue
        h, cs[m] = fit_head(xt[i], yt[i], gt[i])
        own[j] = h.decision_function(xd[j])
    # Control: one head over all models' answers, a bias per model.
    idx = {m: k for k, m in enumerate(models)}
    one_hot = lambda ms: np.eye(len(models))[[idx.get(m, 0) for m in ms]]  # noqa: E731
    keep = np.isin(mt, models)
    pooled_h, pooled_c = fit_head(np.c_[xt[keep], one_hot(mt[keep])], yt[keep], gt[keep])
    pooled = pooled_h.decision_function(np.c_[xd, one_hot(md)])
    base = logit([served[(r["prompt_id"], r["model"])] for r in dev])
    half = np.array([int(hashlib.md5(r["prompt_id"].encode()).hexdigest(), 16) % 2 for r in dev])

    def stack(extra):
        out = np.zeros(len(dev))
        for h in (0, 1):
            fit, read = half != h, half == h
            s = LogisticRegression(C=1.0, max_iter=3000).fit(np.c_[base[fit], extra[fit]], yd[fit])
            out[read] = s.decision_function(np.c_[base[read], extra[read]])
        return out

    cols = {"served": base, "own alone": own, "pooled alone": pooled,
            "served+own": stack(own[:, None]), "served+pooled": stack(pooled[:, None])}
    table = []
    for m in models:
        j = md == m
        if yd[j].all() or not yd[j].any():
            continue
        table.append((m, {k: roc_auc_score(yd[j], v[j]) for k, v in cols.items()}))
    print(f"{src}: {len(train)} train answers, {len(dev)} dev answers, {len(table)} models; "
          f"C per model {sorted(set(cs.values()))}, pooled C {pooled_c}")
    print("within-model AUROC, mean over models: " + ", ".join(
        f"{k} {np.mean([t[1][k] for t in table]):.4f}" for k in cols))
    gain = np.array([t[1]["served+own"] - t[1]["served"] for t in table])
    ctrl = np.array([t[1]["served+pooled"] - t[1]["served"] for t in table])
    print(f"served+own − served: mean {gain.mean():+.4f}, higher for {(gain > 0).sum()} of {len(gain)}; "
          f"control served+pooled − served: mean {ctrl.mean():+.4f}")
    for m, a in table:
        if m in TIERS.get(src, ()):
            print(f"  {m:28s} " + "  ".join(f"{k} {v:.4f}" for k, v in a.items()))


if __name__ == "__main__":
    main()
