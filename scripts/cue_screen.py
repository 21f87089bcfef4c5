#!/usr/bin/env python3
"""Screens two answer cues for issue 13 before any Rust: does either add to the served
verifier's within-model ranking?

- `arith`: worked arithmetic re-computed (the issue's "re-compute the arithmetic in worked
  solutions"). Every `lhs = n` (or `\\approx`, `≈`) whose left side is plain arithmetic over
  numbers (+ - * / × ÷ \\times \\cdot and brackets, read leftwards from the `=` only across
  those characters, so `1 - 298/352.5 = 0.154` is read whole) is evaluated, unless a word runs
  into it (`x2 + 1`) or it is a variable's term (`x * 3 = 6`); a step is wrong
  when its value misses n by more than 2% and more than half a unit of n's last digit. Steps
  next to an exponent, a percent sign, a unit fraction or a variable are skipped. Indicators:
  a wrong step, any checked step, the share of wrong steps.
- `letter`: a model's bias towards an option letter. Per (task, model, picked letter), the
  model's pass rate on the train rows where it picked that letter, pulled (20 pseudo-rows)
  towards its rate on the task, as a logit against that rate. The task is MMLU-Pro, or
  RouterBench's eval (arc-challenge, winogrande); the letter is `final_answer` in score's output.

Both read `tiergate score` outputs (uncalibrated, committed heads) on train and dev, joined to
the data by (source, prompt_id, model). Pass rates by indicator come from the train rows; the
screen proper is on dev: the served logit p_verify with the cue added, w chosen on one half of
the prompts (md5 of prompt_id; for `arith` a logistic, for `letter` w from a grid) and read on
the other, within-model AUROC computed inside each half and averaged over models and halves.

usage: python3 scripts/cue_screen.py arith|letter --train-scores T.jsonl --dev-scores D.jsonl
       [--data-dir ../shared/data]
needs: numpy, scikit-learn.
"""
import argparse, collections, gzip, hashlib, json, math, os, re

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

RHS = re.compile(r"\s*(-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?))")
ARITH = set("0123456789.,+-*/×÷−() \t")
SKIP_AFTER = re.compile(r"\s*(\\times|×|\*|x)\s*10|\^|[eE][-+]?\d|\d|\s*\\%|%|/|\s*\\cdot")


def lhs_start(text, i):
    """Where the arithmetic ending at `text[i]` (an `=`) starts, read leftwards."""
    j = i
    while j > 0:
        if text[j - 1] in ARITH:
            j -= 1
        elif text[max(0, j - 6):j] == "\\times":
            j -= 6
        elif text[max(0, j - 5):j] == "\\cdot":
            j -= 5
        else:
            break
    return j


def check(text):
    """(steps checked, steps wrong) in an answer."""
    n = bad = 0
    for m in re.finditer(r"=|\\approx|≈", text):
        i = m.start()
        j = lhs_start(text, i)
        if text[j:j + 1] == "(" and text[j - 1:j] == "\\":
            j += 1  # LaTeX's `\(` opens the math, not a bracket
        k = j
        while k < i and text[k] in " \t":
            k += 1
        pre = text[j - 1:j] if j > 0 else ""
        first = text[k:k + 1]
        if first in "+*/×÷" or (first in "-−" and pre.isalnum()):
            continue  # a variable's term: `x * 3 = 6`, `x - 3 = 2`
        if k == j and pre and (pre.isalnum() or pre in "^_{.\\}"):
            continue  # a variable, an exponent or a subscript runs into it
        r = RHS.match(text, m.end())
        if not r or SKIP_AFTER.match(text[r.end():r.end() + 12]):
            continue
        e = (text[j:i].replace("\\times", "*").replace("\\cdot", "*").replace("×", "*")
             .replace("÷", "/").replace("−", "-").replace(",", "").strip())
        if (not re.search(r"\d\s*[-+*/]\s*\(?\s*\d", e) or e.count("(") != e.count(")")
                or len(e) > 80 or "**" in e):
            continue  # `**`: Markdown bold or a power, not a product
        try:
            v = eval(e, {"__builtins__": {}})  # digits, operators and brackets only
        except Exception:
            continue
        if not isinstance(v, (int, float)):
            continue
        z = float(r.group(1).replace(",", ""))
        dec = len(r.group(1).split(".")[1]) if "." in r.group(1) else 0
        n += 1
        if abs(v - z) > max(abs(v) * 0.02, 0.5 * 10 ** (-dec)) + 1e-9:
            bad += 1
    return n, bad


def task_of(r):
    return r["source"] if r["source"] != "routerbench_0shot" else "rb:" + r["prompt_id"].split(".")[0]


def load(data, scores):
    s = {(x["source"], x["prompt_id"], x["model"]): x for x in map(json.loads, open(scores))}
    out = []
    with gzip.open(data, "rt") as f:
        for line in f:
            r = json.loads(line)
            g = s.get((r["source"], r["prompt_id"], r["model"]))
            if g is None or not r.get("response") or r["score"] is None or g["p_verify"] is None:
                continue
            fa = g.get("final_answer") or ""
            p = min(max(g["p_verify"], 1e-6), 1 - 1e-6)
            out.append({"task": task_of(r), "pid": r["prompt_id"], "model": r["model"],
                        "y": float(r["score"] >= 0.5), "x0": math.log(p / (1 - p)),
                        "letter": fa[7:] if fa.startswith("option:") else None,
                        "text": r["response"]})
    return out


def half(pid):
    return int(hashlib.md5(pid.encode()).hexdigest(), 16) % 2


def within(rows, idx, score):
    by = collections.defaultdict(list)
    for i in idx:
        by[rows[i]["model"]].append(i)
    out = {}
    for m, ix in by.items():
        y = [rows[i]["y"] for i in ix]
        if 0 < sum(y) < len(y):
            out[m] = roc_auc_score(y, score[ix])
    return out


def report(name, rows, fit_score):
    """fit_score(k) -> the stacked score of every row, fitted on the rows outside half k."""
    x0 = np.array([r["x0"] for r in rows])
    h = np.array([half(r["pid"]) for r in rows])
    base, new, up, tot = [], [], 0, 0
    for k in (0, 1):
        idx = np.where(h == k)[0]
        a, b = within(rows, idx, x0), within(rows, idx, fit_score(k))
        base.append(np.mean(list(a.values())))
        new.append(np.mean(list(b.values())))
        up += sum(b[m] > a[m] for m in a)
        tot += len(a)
    print(f"{name}: rows {len(rows)}, within-model AUROC (mean over models and halves) "
          f"{np.mean(base):.4f} -> {np.mean(new):.4f}; higher in {up} of {tot} (model, half)")


def arith(train, dev):
    for part, rows in (("train", train), ("dev", dev)):
        acc = collections.defaultdict(lambda: [0, 0])
        for r in rows:
            if r["task"] != "mmlu_pro":
                continue
            n, b = check(r["text"])
            r["n"], r["bad"] = n, b
            k = "none checked" if n == 0 else ("a wrong step" if b else "all steps right")
            acc[k][0] += r["y"]
            acc[k][1] += 1
        print(part, "MMLU-Pro pass rate: " + "; ".join(
            f"{k} {p / n:.3f} ({n} answers)" for k, (p, n) in sorted(acc.items())))
    rows = [r for r in dev if r["task"] == "mmlu_pro"]
    h = np.array([half(r["pid"]) for r in rows])
    y = np.array([r["y"] for r in rows])
    for cols in (("bad",), ("bad", "checked"), ("share", "checked")):
        feat = {"bad": lambda r: float(r["bad"] > 0), "checked": lambda r: float(r["n"] > 0),
                "share": lambda r: r["bad"] / max(r["n"], 1)}
        x = np.array([[r["x0"]] + [feat[c](r) for c in cols] for r in rows])

        def fit_score(k, x=x):
            lr = LogisticRegression(C=10).fit(x[h != k], y[h != k])
            return x @ lr.coef_[0]
        report(f"dev MMLU-Pro, + {' + '.join(cols)}", rows, fit_score)


def letter(train, dev):
    base, cnt = collections.defaultdict(lambda: [0, 0]), collections.defaultdict(lambda: [0, 0])
    for r in train:
        b = base[(r["task"], r["model"])]
        b[0] += r["y"]
        b[1] += 1
        if r["letter"]:
            c = cnt[(r["task"], r["model"], r["letter"])]
            c[0] += r["y"]
            c[1] += 1

    def cue(r):
        b = base.get((r["task"], r["model"]))
        if not b or not r["letter"]:
            return 0.0
        m = (b[0] + 1) / (b[1] + 2)
        c = cnt.get((r["task"], r["model"], r["letter"]), [0, 0])
        p = (c[0] + 20 * m) / (c[1] + 20)
        return math.log(p / (1 - p)) - math.log(m / (1 - m))
    for task in sorted({r["task"] for r in dev}):
        rows = [r for r in dev if r["task"] == task]
        if not any(r["letter"] for r in rows):
            continue
        x0 = np.array([r["x0"] for r in rows])
        f = np.array([cue(r) for r in rows])
        h = np.array([half(r["pid"]) for r in rows])
        grid = [0, 0.25, 0.5, 1, 1.5, 2, 3]

        def fit_score(k):
            other = np.where(h != k)[0]
            w = max(grid, key=lambda w: np.mean(list(within(rows, other, x0 + w * f).values())))
            print(f"  {task}: w {w} chosen without half {k}")
            return x0 + w * f
        alone = within(rows, range(len(rows)), f)
        print(f"{task}: the cue alone, within-model {np.mean(list(alone.values())):.3f}")
        report(f"dev {task}, + letter bias", rows, fit_score)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cue", choices=["arith", "letter"])
    ap.add_argument("--train-scores", required=True)
    ap.add_argument("--dev-scores", required=True)
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                       "shared", "data"))
    a = ap.parse_args()
    train = load(os.path.join(a.data_dir, "train.jsonl.gz"), a.train_scores)
    dev = load(os.path.join(a.data_dir, "dev.jsonl.gz"), a.dev_scores)
    {"arith": arith, "letter": letter}[a.cue](train, dev)


if __name__ == "__main__":
    main()
