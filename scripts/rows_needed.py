#!/usr/bin/env python3
"""How many labelled rows does a new model need?

For each model M: test rows T(M) = all dev rows of M (in its source), renamed to "new::"+M.
Runs (one at a time, /work/tiergate-after score, cwd /work/main, shared --cache-dir):
  trained : T(M) with the ORIGINAL model name, no calibration (the trained head)
  prior   : T(M) renamed, no calibration (population prior)
  N=50/200/1000 : T(M) renamed, --calibration = N train rows of M (same source), drawn with
                  random.Random(7).sample over M's train rows, sorted by prompt_id, renamed.
Metrics over T(M): AUROC of p_route vs pass (score >= 0.5; rank-based, ties averaged) and
ECE (15 equal-width bins, sum over bins of share * |mean p - mean score|).
Outputs: rows_needed.json (raw numbers), rows_needed.md (table). Re-running reuses finished runs.
"""
import gzip
import json
import os
import random
import subprocess
import sys
import time

BIN = os.environ.get("TIERGATE", os.path.abspath("target/release/tiergate"))
MAIN = os.environ.get("REPO", os.getcwd())
HERE = os.environ.get("OUT", os.path.abspath("target/ana/rows"))
CACHE = os.path.join(HERE, "cache")
RUNS = os.path.join(HERE, "runs")
DATA = os.environ.get("DATA", os.path.abspath("../shared/data"))
MODELS = [
    ("mmlu_pro", "Meta-Llama-3_1-70B-Instruct"),
    ("mmlu_pro", "gemini-1.5-flash-002"),
    ("mmlu_pro", "Qwen1.5-72B-Chat"),
    ("routerbench_0shot", "claude-instant-v1"),
]
NS = [50, 200, 1000]
SEED = 7
CONDS = ["trained", "prior"] + [str(n) for n in NS]


def load(split):
    want = set(MODELS)
    out = {k: [] for k in MODELS}
    with gzip.open(f"{DATA}/{split}.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            k = (r["source"], r["model"])
            if k in want:
                out[k].append(r)
    return out


def prep(r, name, keep_score):
    r = dict(r)
    r["model"] = name
    r["response"] = None  # only p_route is studied
    if not keep_score:
        r.pop("score", None)  # test rows go in unlabelled (score is optional in --data)
    return r


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def auroc(p, y):
    pos = sum(y)
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = sorted(range(len(p)), key=lambda i: p[i])
    ranks = [0.0] * len(p)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and p[order[j + 1]] == p[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1  # 1-based average rank of the tie group
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    rpos = sum(r for r, t in zip(ranks, y) if t)
    return (rpos - pos * (pos + 1) / 2) / (pos * neg)


def ece(p, s, bins=15):
    n = len(p)
    acc = [[0, 0.0, 0.0] for _ in range(bins)]
    for pi, si in zip(p, s):
        b = min(int(pi * bins), bins - 1)
        acc[b][0] += 1
        acc[b][1] += pi
        acc[b][2] += si
    return sum(c / n * abs(sp / c - ss / c) for c, sp, ss in acc if c)


def run_score(tag, data_path, cal_path):
    out = os.path.join(RUNS, tag, "out.jsonl")
    done = os.path.join(RUNS, tag, "done")
    if os.path.exists(done):
        return out, json.load(open(done))
    cmd = [BIN, "score", "--data", data_path, "--out", out, "--cache-dir", CACHE]
    if cal_path:
        cmd += ["--calibration", cal_path]
    env = dict(os.environ, RUST_LOG="warn")
    t0 = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] run {tag}: {' '.join(cmd)}", flush=True)
    with open(os.path.join(RUNS, tag, "stderr.txt"), "w") as err:
        rc = subprocess.run(cmd, cwd=MAIN, env=env, stdout=err, stderr=subprocess.STDOUT).returncode
    secs = time.time() - t0
    if rc != 0:
        print(open(os.path.join(RUNS, tag, "stderr.txt")).read()[-4000:], file=sys.stderr)
        raise SystemExit(f"run {tag} failed with rc={rc}")
    info = {"seconds": round(secs, 1), "cmd": cmd}
    json.dump(info, open(done, "w"))
    print(f"  done in {secs:.0f}s", flush=True)
    return out, info


def main():
    os.makedirs(CACHE, exist_ok=True)
    train, dev = load("train"), load("dev")
    results = {"seed": SEED, "ns": NS, "models": {}}
    for source, m in MODELS:
        new = "new::" + m
        test = dev[(source, m)]
        labels = [r["score"] for r in test]
        key = m.replace("/", "_")
        res = {"source": source, "rows_test": len(test), "rows_train_available": len(train[(source, m)]),
               "pass_rate_test": sum(s >= 0.5 for s in labels) / len(labels), "runs": {}}
        for cond in CONDS:
            tag = f"{key}__{cond}"
            os.makedirs(os.path.join(RUNS, tag), exist_ok=True)
            name = m if cond == "trained" else new
            data_path = os.path.join(RUNS, tag, "test.jsonl")
            write_jsonl(data_path, [prep(r, name, keep_score=False) for r in test])
            cal_path = None
            cal_info = {}
            if cond not in ("trained", "prior"):
                n = int(cond)
                sample = random.Random(SEED).sample(train[(source, m)], n)
                sample.sort(key=lambda r: r["prompt_id"])
                cal_path = os.path.join(RUNS, tag, "cal.jsonl")
                write_jsonl(cal_path, [prep(r, new, keep_score=True) for r in sample])
                cal_info = {"n_cal": n, "cal_pass_rate": sum(r["score"] >= 0.5 for r in sample) / n}
            out, info = run_score(tag, data_path, cal_path)
            outs = [json.loads(l) for l in open(out)]
            assert len(outs) == len(test), (tag, len(outs), len(test))
            for o, r in zip(outs, test):
                assert o["prompt_id"] == r["prompt_id"] and o["model"] == name, (tag, o, r["prompt_id"])
            p = [o["p_route"] for o in outs]
            for line in open(os.path.join(RUNS, tag, "stderr.txt")):
                if line.startswith("calibration: "):  # the binary's fit report: b and prior_shift
                    rep = json.loads(line.split("; ", 1)[1])
                    cal_info["fit_b"] = rep["models"][new]["b"]
                    cal_info["prior_shift"] = rep["prior_shift"]
            y = [1 if s >= 0.5 else 0 for s in labels]
            res["runs"][cond] = {
                "auroc": auroc(p, y),
                "ece": ece(p, labels),
                "mean_p": sum(p) / len(p),
                "seconds": info["seconds"],
                **cal_info,
            }
            print(f"  {m} {cond}: auroc={res['runs'][cond]['auroc']:.4f} ece={res['runs'][cond]['ece']:.4f} "
                  f"mean_p={res['runs'][cond]['mean_p']:.3f}", flush=True)
            json.dump(results, open(os.path.join(HERE, "rows_needed.partial.json"), "w"), indent=1)
        results["models"][m] = res
    mean = {}
    for cond in CONDS:
        mean[cond] = {k: sum(results["models"][m]["runs"][cond][k] for _, m in MODELS) / len(MODELS)
                      for k in ("auroc", "ece")}
    results["mean_over_models"] = mean
    json.dump(results, open(os.path.join(HERE, "rows_needed.json"), "w"), indent=1)
    write_md(results)


def write_md(R):
    hdr = ["model (source)", "rows T"]
    for c in CONDS:
        lab = c if c in ("trained", "prior") else f"N={c}"
        hdr += [f"AUROC {lab}", f"ECE {lab}"]
    lines = ["# How many labelled rows does a new model need?", "",
             "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for _, m in MODELS:
        r = R["models"][m]
        cells = [f"{m} ({r['source']})", str(r["rows_test"])]
        for c in CONDS:
            cells += [f"{r['runs'][c]['auroc']:.3f}", f"{r['runs'][c]['ece']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**mean over models**", str(sum(R["models"][m]["rows_test"] for _, m in MODELS))]
    for c in CONDS:
        cells += [f"{R['mean_over_models'][c]['auroc']:.3f}", f"{R['mean_over_models'][c]['ece']:.3f}"]
    lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "What was done:", "",
        "- Binary `/work/tiergate-after score` run from `/work/main` (default `models/heads.json`, `models/base`), RUST_LOG=warn, "
        "`--cache-dir /work/ana/rows/cache`, one run at a time; `response` set to null in every row (p_route only).",
        "- Test rows T(M) = all **dev** rows of M in its source (mmlu_pro or routerbench_0shot, scores 0/1), fed without `score`. "
        "*trained*: model name unchanged (the trained head's ability for M), no calibration. *prior*: model renamed to `new::M`, "
        "no calibration (population prior).",
        f"- N=50/200/1000: calibration rows = N **train** rows of M from the same source, `random.Random({SEED}).sample` over M's "
        "train rows (in file order), sorted by prompt_id, renamed to `new::M`, passed as `--calibration`; T(M) renamed scored with it. "
        "Train and dev share no prompts.",
        "- Metrics over T(M): AUROC of p_route vs pass (score >= 0.5), rank-based with averaged ties; ECE with 15 equal-width "
        "bins, sum of bin share x |mean p_route - mean score|. Mean row = unweighted mean over the 4 models.",
        "- Caveat: the shared parts of the router (encoder-derived prompt easiness/skill loadings) and the trained heads were fitted "
        "on train prompts, including M's own train rows; a `new::` model is new only in its ability parameters (k + 1 numbers), "
        "and its calibration prompts are ones the shared router already saw in training.",
        "- Single seed (7), single sample per N: no repeat draws, so differences of a few thousandths are within sampling noise.",
    ]
    open(os.path.join(HERE, "rows_needed.md"), "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
