#!/usr/bin/env python3
"""Screen: does a signal outside the heads add to the served p within one model?

Two signals, each stacked on the served logit (logistic regression fitted on one half of the
new prompts by md5 of prompt_id, read on the other, both ways), reported as within-model AUROC
(mean over the traffic's models, and per tier model):

- `bow`: a hashed bag of words over the whole answer (word 1–2-grams and punctuation of the
  last 2,000 characters), a logistic fitted on the source's training rows, stacked on p_verify.
  The verifier embeds at most 128 of the answer's tokens (mostly its tail); the bag counts
  every word of its last 2,000 characters, where a chain of thought concludes.
- `knn`: the protocol's TF-IDF kNN p over the calibration prompts, stacked on p_route with a
  weight per model. It asks whether remembering labelled prompts by their words holds
  anything the router (with its own memory) lacks.

Input: a `scripts/lopo.py` work directory (its training data, the protocol's calibration and
uncalibrated splits, and the protocol's cached `tiergate score --calibration` rows).

usage: python3 scripts/stack_screen.py bow|knn SOURCE SEED [WORK]   (WORK default /work/lopo2)
needs: numpy, scikit-learn
"""
import glob, gzip, hashlib, json, os, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol as P  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.feature_extraction.text import HashingVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

TIERS = ("gemini-1.5-flash-002", "gemini-1.5-pro-002")


def one(pattern):
    got = sorted(glob.glob(pattern))
    if len(got) != 1:
        sys.exit(f"expected one match for {pattern}, found {len(got)}")
    return got[0]


def logit(p):
    p = np.clip(np.asarray(p, dtype=float), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("bow", "knn"):
        sys.exit(__doc__)
    mode, src, seed = sys.argv[1:4]
    work = sys.argv[4] if len(sys.argv) > 4 else "/work/lopo2"
    sfx = "" if seed == "0" else f"-seed{seed}"
    # The seed-0 split has no suffix; keep it from matching the others.
    split = one(f"{work}/protocol/splits/{src}:lopo-traffic-lopo-{src}-*-????????{sfx}")
    cal = [json.loads(line) for line in open(f"{split}/cal.jsonl")]
    unc = [json.loads(line) for line in open(f"{split}/uncal.jsonl")]
    cached = one(f"{work}/protocol/cache/{os.path.basename(split)}-????????????-????????-cal.jsonl")
    served = {}
    for line in open(cached):
        r = json.loads(line)
        served[(r["prompt_id"], r["model"])] = r
    rows = [r for r in unc if (r["prompt_id"], r["model"]) in served and r["response"] is not None]
    y = np.array([r["score"] >= 0.5 for r in rows])
    models = sorted({r["model"] for r in rows})
    if mode == "bow":
        base = logit([served[(r["prompt_id"], r["model"])]["p_verify"] for r in rows])
        train_file = one(f"{work}/data-lopo-{src}-*/train.jsonl.gz")
        train = [json.loads(line) for line in gzip.open(train_file)]
        train = [r for r in train if r["source"] == src and r["response"] is not None]
        hv = HashingVectorizer(n_features=2**18, ngram_range=(1, 2), alternate_sign=False,
                               token_pattern=r"(?u)\b\w+\b|[^\w\s]")
        text = lambda rs: hv.transform([r["response"][-2000:] for r in rs])  # noqa: E731
        bag = LogisticRegression(C=3.0, max_iter=2000, solver="liblinear")
        bag.fit(text(train), [r["score"] >= 0.5 for r in train])
        extra = bag.decision_function(text(rows))[:, None]
    else:
        base = logit([served[(r["prompt_id"], r["model"])]["p_route"] for r in rows])
        kp = P.knn_scores(cal, {r["prompt_id"]: r["prompt"] for r in unc}, models)
        k = logit([kp[(r["prompt_id"], r["model"])] for r in rows])
        idx = {m: i for i, m in enumerate(models)}
        onehot = np.zeros((len(rows), len(models)))
        onehot[np.arange(len(rows)), [idx[r["model"]] for r in rows]] = 1
        extra = np.c_[k, k[:, None] * onehot]
    half = np.array([int(hashlib.md5(r["prompt_id"].encode()).hexdigest(), 16) % 2 for r in rows])
    stacked = np.zeros(len(rows))
    for h in (0, 1):
        fit, read = half != h, half == h
        m = LogisticRegression(C=1.0, max_iter=3000).fit(np.c_[base[fit], extra[fit]], y[fit])
        stacked[read] = m.decision_function(np.c_[base[read], extra[read]])
    got = []
    for m in models:
        i = np.array([r["model"] == m for r in rows])
        if y[i].all() or not y[i].any():
            continue
        got.append((m, roc_auc_score(y[i], base[i]), roc_auc_score(y[i], extra[i, 0]),
                    roc_auc_score(y[i], stacked[i])))
    a = np.array([g[1:] for g in got])
    print(f"{mode} {src} seed {seed}: within-model AUROC, mean of {len(a)} models: served "
          f"{a[:, 0].mean():.4f}, signal alone {a[:, 1].mean():.4f}, stacked {a[:, 2].mean():.4f} "
          f"(stacked higher for {(a[:, 2] > a[:, 0]).sum()})")
    for g in got:
        if g[0] in TIERS:
            print(f"  {g[0]:28s} served {g[1]:.4f}  alone {g[2]:.4f}  stacked {g[3]:.4f}")


if __name__ == "__main__":
    main()
