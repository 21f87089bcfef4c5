#!/usr/bin/env python3
"""Screen: the answer's last computed number against the options (issue 13's "the final number
against the last computed value", in the form multiple-choice data allows).

For each MMLU-Pro row whose options are mostly numeric and whose answer declares a pick
(`answer is (X)`, cut at a following `Question:`), the last number before that declaration is
compared with each option's numbers (relative tolerance 0.5%). Indicators: no number at all,
the last number matches the picked option, matches only another option, nearest (in log
magnitude) to the picked option. Reported per scored file: pass rates by indicator, and the
within-model AUROC of the served p_verify against a logistic on [logit p_verify, indicators]
fitted on one half of the prompts (md5 of prompt_id) and read on the other, both ways.

Input: `tiergate score` output on dev rows (protocol.py's cached scores of the uncalibrated
rows), joined to dev by (prompt_id, model).

usage: python3 scripts/numcheck_screen.py [--data ../shared/data/dev.jsonl.gz] SCORES.jsonl [...]
"""
import argparse, gzip, hashlib, json, math, os, re, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from protocol import auroc  # noqa: E402

import numpy as np  # noqa: E402

NUM = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*(?:\\times|×|x)\s*10\^\{?-?\d+\}?)?")
SCI = re.compile(r"(-?[\d.]+)(?:\s*(?:\\times|×|x)\s*10\^\{?(-?\d+)\}?)?")
DECL = re.compile(r"answer is \(?([A-J])\)?")
TIERS = ["gemini-1.5-flash-002", "gemini-1.5-pro-002"]


def numbers(s):
    out = []
    for m in NUM.finditer(s):
        mm = SCI.match(m.group(0).replace(",", ""))
        try:
            out.append(float(mm.group(1)) * (10 ** int(mm.group(2)) if mm.group(2) else 1))
        except (ValueError, AttributeError, OverflowError):
            pass
    return out


def options(prompt):
    i = prompt.rfind("Options: [")
    if i < 0:
        return []
    try:
        return json.loads(prompt[i + 9:].split("]")[0] + "]")
    except ValueError:
        return []


def indicators(prompt, resp):
    """[no number, has a number, last matches pick, matches another only, nearest is pick]."""
    opts = options(prompt)
    resp = resp.split("\nQuestion:")[0]
    decl = list(DECL.finditer(resp))
    if not opts or not decl:
        return None
    pick = "ABCDEFGHIJ".index(decl[-1].group(1))
    if pick >= len(opts):
        return None
    onum = [numbers(o) for o in opts]
    if sum(1 for o in onum if o) < 0.7 * len(opts):
        return None
    body = numbers(resp[: decl[-1].start()])
    if not body:
        return [1, 0, 0, 0, 0]
    last = body[-1]
    close = lambda a, b: abs(a - b) <= 0.005 * max(abs(a), abs(b), 1e-9)
    match = [any(close(last, v) for v in o) for o in onum]
    other = any(match[j] for j in range(len(opts)) if j != pick)
    firsts = [(j, o[0]) for j, o in enumerate(onum) if o and o[0] != 0]
    near = -1
    if last != 0 and firsts:
        near = min(firsts, key=lambda jf: abs(math.log(abs(last)) - math.log(abs(jf[1]))))[0]
    return [0, 1, float(match[pick]), float(other and not match[pick]), float(near == pick)]


def logistic(z, y, l2=1e-2, steps=50):
    w = np.zeros(z.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-z @ w))
        g = z.T @ (p - y) + l2 * w
        h = (z * (p * (1 - p))[:, None]).T @ z + l2 * np.eye(len(w))
        w -= np.linalg.solve(h, g)
    return w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "dev.jsonl.gz"))
    ap.add_argument("scores", nargs="+")
    a = ap.parse_args()
    rows = {}
    for line in gzip.open(a.data, "rt"):
        r = json.loads(line)
        if r["source"] == "mmlu_pro":
            rows[(r["prompt_id"], r["model"])] = r
    for fn in a.scores:
        x, y, models, pids = [], [], [], []
        for line in open(fn):
            s = json.loads(line)
            r = rows.get((s["prompt_id"], s["model"]))
            if r is None or s.get("p_verify") is None:
                continue
            f = indicators(r["prompt"], r["response"] or "")
            if f is None:
                continue
            pv = min(max(s["p_verify"], 1e-6), 1 - 1e-6)
            x.append([math.log(pv / (1 - pv))] + f)
            y.append(float(r["score"]) >= 0.5)
            models.append(s["model"])
            pids.append(s["prompt_id"])
        x, y, models = np.array(x), np.array(y, float), np.array(models)
        c = x[:, 1:]
        rate = lambda m: f"{y[m].mean():.3f} ({m.mean():.1%})"
        print(f"{os.path.basename(fn)}: {len(y)} rows; pass when the last number matches the pick "
              f"{rate(c[:, 2] == 1)}, another option {rate(c[:, 3] == 1)}, none "
              f"{rate((c[:, 1] == 1) & (c[:, 2] == 0) & (c[:, 3] == 0))}, no number {rate(c[:, 0] == 1)}")
        half = np.array([int(hashlib.md5(p.encode()).hexdigest(), 16) % 2 for p in pids])
        z = np.c_[x, np.ones(len(y))]
        stacked = np.zeros(len(y))
        for k in (0, 1):
            w = logistic(z[half != k], y[half != k])
            stacked[half == k] = z[half == k] @ w
        base, new = [], []
        for m in sorted(set(models)):
            s = models == m
            if y[s].min() != y[s].max():
                base.append(auroc(list(x[s, 0]), list(y[s] == 1)))
                new.append(auroc(list(stacked[s]), list(y[s] == 1)))
        print(f"  within-model AUROC, mean over {len(base)} models: served {np.mean(base):.3f}, "
              f"stacked {np.mean(new):.3f}")
        for m in TIERS:
            s = models == m
            if s.sum() and y[s].min() != y[s].max():
                print(f"  {m} ({s.sum()} rows): served {auroc(list(x[s, 0]), list(y[s] == 1)):.3f}, "
                      f"stacked {auroc(list(stacked[s]), list(y[s] == 1)):.3f}")


if __name__ == "__main__":
    main()
