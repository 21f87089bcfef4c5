#!/usr/bin/env python3
"""Leave-model-out check of catalog priors from published accuracy (MMLU-Pro).

For every mmlu_pro model with dev rows on >= 95% of the dev mmlu_pro prompts, a catalog entry
"prior::<name>" is appended to a copy of /work/main/tiergate.toml with the model's catalog prices
and prior {benchmark="mmlu_pro", accuracy=<its mean train score on mmlu_pro, 3 decimals>}.
The server (/work/tiergate-prior, cwd /work/main) is asked once per dev mmlu_pro prompt for p_pass of
every trained name and every prior:: name. Results are cached in route_cache.jsonl (keyed by
prompt_id, invalidated when the candidate/prior set changes).

Then: Table 1 (per-model AUROC / ECE / mean p, trained vs prior-placed) and Table 2 (route-only
relative / absolute floor curves over the selected models with trained p vs prior-placed p).

Usage: python3 leave_model_out.py            # query what is missing, then analyse
       python3 leave_model_out.py --no-query # analyse from the cache only
Pure standard library. Writes only under /work/ana/prior.
"""
import argparse
import collections
import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
import time

HERE = os.environ.get("OUT", os.path.abspath("target/ana/prior"))
MAIN = os.environ.get("REPO", os.getcwd())
BIN = os.environ.get("TIERGATE", os.path.abspath("target/release/tiergate"))
DATA = os.environ.get("DATA", os.path.abspath("../shared/data"))
SRC = "mmlu_pro"
MIN_COV = 0.95
CONFIG = os.path.join(HERE, "tiergate_prior.toml")
CACHE = os.path.join(HERE, "route_cache.jsonl")
OUT_JSON = os.path.join(HERE, "leave_model_out.json")
OUT_MD = os.path.join(HERE, "leave_model_out.md")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from relative_floor import cost_at_quality, pick_abs, pick_rel, F_GRID, R_GRID, TARGET  # noqa: E402

R_DEFAULT = 0.94
F_DEFAULT = 0.89  # heads' learned default_quality_floor (Info), shown for reference only


def load_src(path):
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            if f'"{SRC}"' not in line:
                continue
            r = json.loads(line)
            if r["source"] == SRC:
                out.append(r)
    return out


# ------------------------------------------------------------------ server
class Server:
    def __init__(self, config):
        env = dict(os.environ, RUST_LOG="warn")
        self.err = open(os.path.join(HERE, "server.stderr"), "w")
        self.p = subprocess.Popen([BIN, "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "",
                                   "--config", config], cwd=MAIN, env=env,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True)
        line = self.p.stdout.readline().strip()
        if not line.startswith("tiergate listening on "):
            self.stop()
            raise SystemExit(f"unexpected first line: {line!r} (see server.stderr)")
        self.addr = "http://" + line.rsplit(" ", 1)[1]
        for _ in range(600):
            r = subprocess.run([BIN, "call", "--addr", self.addr, "health"], cwd=MAIN,
                               capture_output=True, text=True)
            if r.returncode == 0:
                try:
                    if json.loads(r.stdout).get("status") == "SERVING":  # not "NOT_SERVING"
                        break
                except ValueError:
                    pass
            time.sleep(0.5)
        else:
            self.stop()
            raise SystemExit("server never became SERVING")

    def call(self, *args):
        r = subprocess.run([BIN, "call", "--addr", self.addr, *args], cwd=MAIN,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"call failed rc={r.returncode}: {r.stderr[:500]}")
        return json.loads(r.stdout)

    def route(self, prompt, cands):
        # "--" so that a prompt beginning with "-" is never read as a flag
        return self.call("route", "--candidates", ",".join(cands), "--", prompt)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.err.close()


# ------------------------------------------------------------------ metrics
def auroc(p, y):
    """Mann-Whitney AUROC with average ranks for ties; None if one class is empty."""
    n1 = sum(y)
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return None
    order = sorted(range(len(p)), key=lambda i: p[i])
    ranks = [0.0] * len(p)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and p[order[j + 1]] == p[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    s1 = sum(r for r, t in zip(ranks, y) if t)
    return (s1 - n1 * (n1 + 1) / 2) / (n1 * n0)


def ece(p, y, bins=15):
    """Equal-width bins on [0,1] (p = 1 goes to the last bin); sum_b n_b/N |mean p - mean y|."""
    acc = [[0, 0.0, 0.0] for _ in range(bins)]
    for x, t in zip(p, y):
        b = min(int(x * bins), bins - 1)
        acc[b][0] += 1
        acc[b][1] += x
        acc[b][2] += t
    n = len(p)
    return sum(c / n * abs(sp / c - sy / c) for c, sp, sy in acc if c)


def mean(v):
    return sum(v) / len(v)


def logit(p):
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def sd(v):
    m = mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))


def calib_slope(p, y, iters=50):
    """Logistic recalibration y ~ sigmoid(a + b*logit(p)) by Newton; returns b (1 = well spread,
    > 1 = p too compressed / under-confident, < 1 = over-confident)."""
    x = [logit(v) for v in p]
    a = b = 0.0
    for _ in range(iters):
        g0 = g1 = h00 = h01 = h11 = 0.0
        for xi, yi in zip(x, y):
            q = 1 / (1 + math.exp(-(a + b * xi)))
            w = q * (1 - q)
            g0 += yi - q
            g1 += (yi - q) * xi
            h00 += w
            h01 += w * xi
            h11 += w * xi * xi
        det = h00 * h11 - h01 * h01
        if det <= 0:
            break
        da = (h11 * g0 - h01 * g1) / det
        db = (h00 * g1 - h01 * g0) / det
        a += da
        b += db
        if abs(da) + abs(db) < 1e-10:
            break
    return b


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-query", action="store_true")
    a = ap.parse_args()

    dev = load_src(os.path.join(DATA, "dev.jsonl.gz"))
    train = load_src(os.path.join(DATA, "train.jsonl.gz"))
    catalog = {c["model"]: c for c in json.load(open(os.path.join(DATA, "catalog.json")))}

    by_prompt = collections.defaultdict(dict)
    prompt_text = {}
    for r in dev:
        by_prompt[r["prompt_id"]][r["model"]] = r
        prompt_text[r["prompt_id"]] = r["prompt"]
    n_prompts = len(by_prompt)
    cov = collections.Counter(r["model"] for r in dev)
    models = sorted(m for m in cov if cov[m] >= MIN_COV * n_prompts)
    excluded = sorted((m, cov[m]) for m in cov if cov[m] < MIN_COV * n_prompts)

    tr = collections.defaultdict(lambda: [0.0, 0.0, 0])  # score sum, cost sum, n
    for r in train:
        t = tr[r["model"]]
        t[0] += r["score"]
        t[1] += r["cost_usd"]
        t[2] += 1
    for m in models:
        if tr[m][2] == 0:
            raise SystemExit(f"{m}: no train rows")
        if m not in catalog:
            raise SystemExit(f"{m}: not in catalog.json")
    train_acc = {m: tr[m][0] / tr[m][2] for m in models}
    published = {m: round(train_acc[m], 3) for m in models}
    train_cost = {m: tr[m][1] / tr[m][2] for m in models}
    train_n = {m: tr[m][2] for m in models}

    # ---- config: tiergate.toml as is + appended prior:: entries
    base = open(os.path.join(MAIN, "tiergate.toml")).read()
    extra = ["", "# ---- appended by /work/ana/prior/leave_model_out.py: leave-model-out priors (mmlu_pro)"]
    for m in models:
        c = catalog[m]
        extra += ["", "[[catalog]]", f'model = "prior::{m}"',
                  f"in_usd_per_mtok = {c['in_usd_per_mtok']!r}",
                  f"out_usd_per_mtok = {c['out_usd_per_mtok']!r}",
                  f'prior = {{ benchmark = "mmlu_pro", accuracy = {published[m]:.3f} }}']
    cfg_text = base.rstrip("\n") + "\n" + "\n".join(extra) + "\n"
    with open(CONFIG, "w") as f:
        f.write(cfg_text)

    cands = models + [f"prior::{m}" for m in models]
    key = hashlib.sha256((cfg_text + "\n" + ",".join(cands)).encode()).hexdigest()[:16]

    cache = {}
    if os.path.exists(CACHE):
        with open(CACHE) as f:
            for line in f:
                d = json.loads(line)
                if d.get("key") == key:
                    cache[d["prompt_id"]] = d
    todo = [pid for pid in sorted(by_prompt) if pid not in cache]
    if todo and a.no_query:
        raise SystemExit(f"{len(todo)} prompts not cached and --no-query given")
    info = None
    if todo:
        srv = Server(CONFIG)
        try:
            info = srv.call("info")
            with open(os.path.join(HERE, "server_info.json"), "w") as f:
                json.dump(info, f, indent=1)
            t0 = time.time()
            with open(CACHE, "a") as f:
                for k, pid in enumerate(todo):
                    rep = srv.route(prompt_text[pid], cands)
                    got = {c["model"]: c for c in rep["candidates"]}
                    missing = [c for c in cands if c not in got]
                    if missing:
                        raise RuntimeError(f"{pid}: reply lacks {missing[:5]}")
                    d = {"key": key, "prompt_id": pid,
                         "p": {c: got[c]["p_pass"] for c in cands},
                         "params": {c: got[c]["params"] for c in cands},
                         "exp_cost": {c: got[c]["expected_cost_usd"] for c in cands},
                         "input_tokens": rep.get("input_tokens"), "truncated": rep.get("truncated"),
                         "revision": rep.get("revision")}
                    f.write(json.dumps(d) + "\n")
                    f.flush()
                    cache[pid] = d
                    if (k + 1) % 100 == 0:
                        print(f"  {k + 1}/{len(todo)} prompts, {time.time() - t0:.0f}s", file=sys.stderr)
        finally:
            srv.stop()
    elif os.path.exists(os.path.join(HERE, "server_info.json")):
        info = json.load(open(os.path.join(HERE, "server_info.json")))

    # ---- sanity: params labels
    bad = []
    for pid, d in cache.items():
        for m in models:
            if d["params"][m] != "trained":
                bad.append((pid, m, d["params"][m]))
            want = f"prior:mmlu_pro@{published[m]:.3f}"
            got = d["params"][f"prior::{m}"]
            if not got.startswith("prior:mmlu_pro@") or abs(float(got.split("@")[1]) - published[m]) > 1e-9:
                bad.append((pid, f"prior::{m}", got, want))
    if bad:
        raise SystemExit(f"unexpected params labels, e.g. {bad[:3]}")

    # ---- Table 1
    t1 = {}
    pooled = {"y": [], "pt": [], "pp": []}
    for m in models:
        y, pt, pp = [], [], []
        for pid, ms in by_prompt.items():
            if m in ms:
                y.append(1 if ms[m]["score"] >= 0.5 else 0)
                pt.append(cache[pid]["p"][m])
                pp.append(cache[pid]["p"][f"prior::{m}"])
        pooled["y"] += y
        pooled["pt"] += pt
        pooled["pp"] += pp
        t1[m] = {"dev_rows": len(y), "train_rows": train_n[m], "train_acc": train_acc[m],
                 "published": published[m], "dev_pass": mean(y),
                 "auroc_trained": auroc(pt, y), "auroc_prior": auroc(pp, y),
                 "ece_trained": ece(pt, y), "ece_prior": ece(pp, y),
                 "mean_p_trained": mean(pt), "mean_p_prior": mean(pp),
                 "mean_abs_p_diff": mean([abs(u - v) for u, v in zip(pt, pp)]),
                 "sd_logit_trained": sd([logit(v) for v in pt]), "sd_logit_prior": sd([logit(v) for v in pp]),
                 "calib_slope_trained": calib_slope(pt, y), "calib_slope_prior": calib_slope(pp, y),
                 "corr_pt_pp": pearson(pt, pp)}
    t1_pooled = {"rows": len(pooled["y"]), "dev_pass": mean(pooled["y"]),
                 "auroc_trained": auroc(pooled["pt"], pooled["y"]),
                 "auroc_prior": auroc(pooled["pp"], pooled["y"]),
                 "ece_trained": ece(pooled["pt"], pooled["y"]),
                 "ece_prior": ece(pooled["pp"], pooled["y"]),
                 "mean_p_trained": mean(pooled["pt"]), "mean_p_prior": mean(pooled["pp"])}

    # ---- are the prior-placed models one family (same prompt term, own intercept)?
    ref = max(models, key=lambda m: (published[m], m))
    fam = {}
    for m in models:
        d = [logit(cache[pid]["p"][f"prior::{m}"]) - logit(cache[pid]["p"][f"prior::{ref}"]) for pid in by_prompt]
        fam[m] = {"mean": mean(d), "sd": sd(d)}
    family = {"ref": ref, "max_sd_logit_offset": max(v["sd"] for v in fam.values()),
              "offsets": {m: v["mean"] for m, v in fam.items()}}

    # ---- Table 2: route-only curves over the selected models
    order = sorted(models, key=lambda m: (train_cost[m], m))
    prompts = sorted(pid for pid, ms in by_prompt.items() if all(m in ms for m in order))
    S = [[by_prompt[pid][m]["score"] for m in order] for pid in prompts]
    C = [[by_prompt[pid][m]["cost_usd"] for m in order] for pid in prompts]
    P = {"trained": [[cache[pid]["p"][m] for m in order] for pid in prompts],
         "prior": [[cache[pid]["p"][f"prior::{m}"] for m in order] for pid in prompts]}
    n = len(prompts)
    k = len(order)
    qs = [sum(S[i][j] for i in range(n)) / n for j in range(k)]
    cs = [sum(C[i][j] for i in range(n)) / n for j in range(k)]
    b = max(range(k), key=lambda j: (qs[j], -cs[j]))
    q_best, c_best = qs[b], cs[b]

    def point(picks):
        q = sum(S[i][picks[i]] for i in range(n)) / n
        c = sum(C[i][picks[i]] for i in range(n)) / n
        return {"quality": q, "cost": c, "ratio": q / q_best, "saved": 100 * (1 - c / c_best)}

    t2 = {}
    for which, PP in P.items():
        res = {}
        for kind, grid, pick in (("rel", R_GRID, pick_rel), ("abs", F_GRID, pick_abs)):
            pts = []
            for x in grid:
                picks = [pick(p, x) for p in PP]
                pts.append({"param": x, **point(picks),
                            "share_picked_best": sum(pk == b for pk in picks) / n})
            ca = cost_at_quality([(p["cost"], p["quality"]) for p in pts], TARGET * q_best)
            res[kind] = {"points": pts, "cost_at_98": ca,
                         "saved_at_98": None if ca is None else 100 * (1 - ca / c_best),
                         "max_ratio": max(p["ratio"] for p in pts),
                         "params_reaching_98": [p["param"] for p in pts if p["ratio"] >= TARGET]}
        ri = min(range(len(R_GRID)), key=lambda i: abs(R_GRID[i] - R_DEFAULT))
        fi = min(range(len(F_GRID)), key=lambda i: abs(F_GRID[i] - F_DEFAULT))
        res["r_default"] = res["rel"]["points"][ri]
        res["f_default"] = res["abs"]["points"][fi]
        picks = [pick_rel(p, R_DEFAULT) for p in PP]
        res["r_default_pick_counts"] = dict(collections.Counter(order[j] for j in picks).most_common())
        # argmax-p oracle-free pick (r = 1)
        res["argmax_point"] = point([pick_rel(p, 1.0) for p in PP])
        t2[which] = res

    # ---- compare the trained p with the older offline scores, if present (information only)
    cmp_old = None
    old_path = os.environ.get("SCORES", "target/ana/dev_scores.jsonl")
    if os.path.exists(old_path):
        diffs = []
        with open(old_path) as f:
            for line in f:
                d = json.loads(line)
                if d["source"] == SRC and d["model"] in models and d["prompt_id"] in cache:
                    diffs.append(abs(d["p_route"] - cache[d["prompt_id"]]["p"][d["model"]]))
        if diffs:
            cmp_old = {"rows": len(diffs), "max_abs_diff": max(diffs), "mean_abs_diff": mean(diffs)}

    out = {
        "setup": {"binary": BIN, "config": CONFIG, "cache_key": key, "min_coverage": MIN_COV,
                  "n_dev_prompts": n_prompts, "n_candidates_per_call": len(cands),
                  "server_revision": next(iter(cache.values()))["revision"],
                  "heads_revision": info.get("heads_revision") if info else None,
                  "truncated_prompts": sum(1 for d in cache.values() if d.get("truncated")),
                  "excluded_for_coverage": excluded,
                  "trained_p_vs_/work/ana/dev_scores.jsonl": cmp_old},
        "models": models,
        "table1": t1, "table1_pooled": t1_pooled, "prior_family_check": family,
        "table2": {"price_order": [{"model": m, "train_mean_cost": train_cost[m]} for m in order],
                   "n_prompts": n, "dropped_prompts": n_prompts - n,
                   "best_model": order[b], "q_best": q_best, "c_best": c_best,
                   "target": TARGET * q_best, "trained": t2["trained"], "prior": t2["prior"]},
    }
    with open(OUT_JSON, "w") as f:
        json.dump(out, f, indent=1)
    md = render(out)
    with open(OUT_MD, "w") as f:
        f.write(md)
    print(md)


def pearson(x, y):
    mx, my = mean(x), mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def f3(v, nd=3):
    return "—" if v is None else f"{v:.{nd}f}"


def pct(v):
    return "—" if v is None else f"{v:.1f}%"


def render(o):
    s = o["setup"]
    t2 = o["table2"]
    L = ["# Leave-model-out: catalog priors from published accuracy (MMLU-Pro dev)\n"]
    L.append("What was done:")
    L.append(f"- Models: the {len(o['models'])} mmlu_pro models with dev rows on >= 95% of the "
             f"{s['n_dev_prompts']} dev mmlu_pro prompts (excluded: " +
             ", ".join(f"{m} ({c} rows)" for m, c in s["excluded_for_coverage"]) + "). "
             "For each, `/work/main/tiergate.toml` (kept whole) got an appended catalog entry `prior::<name>` with its "
             "catalog.json prices and `prior = { benchmark = \"mmlu_pro\", accuracy = <its mean train mmlu_pro score, 3 dp> }` "
             "(config: `tiergate_prior.toml`).")
    L.append(f"- `/work/tiergate-prior serve` (cwd /work/main, default models/base, heads.json, benchmarks.json; "
             f"revision {s['server_revision']}) answered one Route per dev mmlu_pro prompt with all "
             f"{s['n_candidates_per_call']} candidates (trained names + prior:: names); p_pass of each read from the reply "
             f"(cached in `route_cache.jsonl`). Every trained name replied params=\"trained\", every prior:: name "
             f"\"prior:mmlu_pro@<acc>\". {s['truncated_prompts']} prompts were truncated by the encoder's token cap.")
    L.append("- Caveat: the router's shared parts (encoder head, skills) and the benchmark sample that the prior is "
             "placed against both come from **train** prompts, and the \"published accuracy\" is the model's own "
             "**train** mean on mmlu_pro. So this is not a true held-out model: it measures how well the "
             "prior mechanism places a model on the router's scale (population skills + one moved intercept vs the "
             "model's own fitted parameters), not how well a real published number estimates accuracy.")
    L.append("- Table 1: pass = score >= 0.5; AUROC by Mann-Whitney (ties averaged); ECE with 15 equal-width bins "
             "(weighted |mean p − pass rate|). Table 2: route-only over the same models in price order (mean train "
             "cost_usd on mmlu_pro), prompts where all have dev rows; relative floor r (cheapest with p >= r·max p, "
             "r 0.5..1 step .005) and absolute floor f (cheapest with p >= f else argmax p, f 0..1 step .01); "
             "quality/cost = mean dev score/cost_usd of picked rows; best single = highest mean dev score (ties cheaper); "
             "saved@98% via cost_at_quality from scripts/relative_floor.py (target 0.98·q_best).")
    L.append("")
    L.append("## Table 1: per model, trained parameters vs prior-placed (dev mmlu_pro)\n")
    L.append("| model | dev rows | published (train mean) | dev pass | mean p trained | mean p prior | "
             "AUROC trained | AUROC prior | ECE trained | ECE prior | mean abs(p_tr − p_pr) | corr(p_tr, p_pr) | "
             "sd logit p tr / pr | calib. slope tr / pr |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in sorted(o["models"], key=lambda m: o["table1"][m]["train_acc"]):
        d = o["table1"][m]
        L.append(f"| {m} | {d['dev_rows']} | {d['published']:.3f} | {d['dev_pass']:.3f} | {d['mean_p_trained']:.3f} | "
                 f"{d['mean_p_prior']:.3f} | {f3(d['auroc_trained'])} | {f3(d['auroc_prior'])} | "
                 f"{d['ece_trained']:.3f} | {d['ece_prior']:.3f} | {d['mean_abs_p_diff']:.3f} | {f3(d['corr_pt_pp'])} | "
                 f"{d['sd_logit_trained']:.2f} / {d['sd_logit_prior']:.2f} | "
                 f"{d['calib_slope_trained']:.2f} / {d['calib_slope_prior']:.2f} |")
    t1 = o["table1"]
    ms = o["models"]
    L.append(f"| **mean over models** | | {mean([t1[m]['published'] for m in ms]):.3f} | "
             f"{mean([t1[m]['dev_pass'] for m in ms]):.3f} | {mean([t1[m]['mean_p_trained'] for m in ms]):.3f} | "
             f"{mean([t1[m]['mean_p_prior'] for m in ms]):.3f} | {mean([t1[m]['auroc_trained'] for m in ms]):.3f} | "
             f"{mean([t1[m]['auroc_prior'] for m in ms]):.3f} | {mean([t1[m]['ece_trained'] for m in ms]):.3f} | "
             f"{mean([t1[m]['ece_prior'] for m in ms]):.3f} | {mean([t1[m]['mean_abs_p_diff'] for m in ms]):.3f} | | "
             f"{mean([t1[m]['sd_logit_trained'] for m in ms]):.2f} / {mean([t1[m]['sd_logit_prior'] for m in ms]):.2f} | "
             f"{mean([t1[m]['calib_slope_trained'] for m in ms]):.2f} / {mean([t1[m]['calib_slope_prior'] for m in ms]):.2f} |")
    p = o["table1_pooled"]
    L.append(f"| **pooled rows** | {p['rows']} | | {p['dev_pass']:.3f} | {p['mean_p_trained']:.3f} | {p['mean_p_prior']:.3f} | "
             f"{f3(p['auroc_trained'])} | {f3(p['auroc_prior'])} | {p['ece_trained']:.3f} | {p['ece_prior']:.3f} | | | | |")
    L.append("\nRows sorted by published accuracy. Pooled = all (model, prompt) rows together (mixes across-model "
             "placement with within-model ranking). sd logit p = spread of the model's predictions over dev prompts; "
             "calib. slope = b in a logistic recalibration pass ~ sigmoid(a + b·logit p) on dev (1 = right spread, "
             ">1 = predictions too compressed).\n")
    fc = o["prior_family_check"]
    L.append(f"Prior family check: for every prior:: model, logit(p) − logit(p of prior::{fc['ref']}) is constant over "
             f"the {s['n_dev_prompts']} prompts (largest sd {fc['max_sd_logit_offset']:.1e}); i.e. all prior-placed "
             "models share one prompt term and differ only by an intercept, so on every prompt they are ranked "
             "by published accuracy.\n")

    L.append("## Table 2: route-only over these models, trained p vs prior-placed p\n")
    L.append(f"{t2['n_prompts']} prompts (dropped {t2['dropped_prompts']} lacking a model), {len(t2['price_order'])} "
             f"candidates; best single {t2['best_model']}: q_best {t2['q_best']:.4f}, c_best {t2['c_best']:.3g} USD; "
             f"target 0.98·q_best = {t2['target']:.4f}.\n")
    L.append("| p used | saved@98 rel r | saved@98 abs f | max ratio rel / abs | r reaching 98% | "
             "r=0.94: quality / q_best / saved | f=0.89 (ref.): q/q_best / saved | argmax p (r=1): q/q_best / saved |")
    L.append("|---|---|---|---|---|---|---|---|")
    for which in ("trained", "prior"):
        d = t2[which]
        rr = d["rel"]["params_reaching_98"]
        rr_s = f"{min(rr):.3f}..{max(rr):.3f} ({len(rr)} pts)" if rr else "none"
        rd, fd, am = d["r_default"], d["f_default"], d["argmax_point"]
        L.append(f"| {which} | {pct(d['rel']['saved_at_98'])} | {pct(d['abs']['saved_at_98'])} | "
                 f"{d['rel']['max_ratio']:.3f} / {d['abs']['max_ratio']:.3f} | {rr_s} | "
                 f"{rd['quality']:.4f} / {rd['ratio']:.3f} / {rd['saved']:.1f}% | "
                 f"{fd['ratio']:.3f} / {fd['saved']:.1f}% | {am['ratio']:.3f} / {am['saved']:.1f}% |")
    L.append("\nsaved = 100·(1 − cost / c_best). r reaching 98% lists the range of grid r whose point has quality >= "
             "0.98·q_best (may be non-contiguous; count given).\n")
    L.append("Picks at r = 0.94 (model: prompts):\n")
    for which in ("trained", "prior"):
        L.append(f"- {which}: " + ", ".join(f"{m} {c}" for m, c in t2[which]["r_default_pick_counts"].items()))
    L.append("\nPrice order (mean train cost_usd): " + ", ".join(
        f"{x['model']} ({x['train_mean_cost']:.3g})" for x in t2["price_order"]) + "\n")
    tr, pr = t2["trained"], t2["prior"]
    L.append("## Observations\n")
    L.append(f"- Placement of the mean works: prior-placed mean p on dev is within "
             f"{max(abs(t1[m]['mean_p_prior'] - t1[m]['published']) for m in ms):.3f} of the published (train) accuracy "
             f"for every model (mean offset {mean([t1[m]['mean_p_prior'] - t1[m]['published'] for m in ms]):+.3f}); "
             f"the trained heads' mean p sits {mean([t1[m]['published'] - t1[m]['mean_p_trained'] for m in ms]):.3f} "
             "below the train mean on average.")
    L.append(f"- The spread does not: every prior-placed model has the same logit spread over prompts "
             f"(sd {mean([t1[m]['sd_logit_prior'] for m in ms]):.2f}) vs {mean([t1[m]['sd_logit_trained'] for m in ms]):.2f} "
             f"for trained parameters, so prior p is compressed toward its mean (recalibration slope "
             f"{mean([t1[m]['calib_slope_prior'] for m in ms]):.2f} vs {mean([t1[m]['calib_slope_trained'] for m in ms]):.2f}); "
             f"this, not the mean, is what doubles ECE ({mean([t1[m]['ece_trained'] for m in ms]):.3f} → "
             f"{mean([t1[m]['ece_prior'] for m in ms]):.3f}). Ranking within a model is nearly kept "
             f"(AUROC {mean([t1[m]['auroc_trained'] for m in ms]):.3f} → {mean([t1[m]['auroc_prior'] for m in ms]):.3f}).")
    L.append("- Because all prior-placed models are one family ranked by published accuracy on every prompt, argmax p "
             "is always the highest-accuracy model and routing can only trade down by prompt difficulty. Here the "
             "cheapest model (gemini-1.5-flash-002) is also the second most accurate, so both p's route almost only "
             "between flash and pro (see picks at r = 0.94).")
    L.append(f"- Route-only saved@98%: relative {pct(tr['rel']['saved_at_98'])} → {pct(pr['rel']['saved_at_98'])}, "
             f"absolute {pct(tr['abs']['saved_at_98'])} → {pct(pr['abs']['saved_at_98'])} (trained → prior). At the default "
             f"r = 0.94 the prior keeps quality ({pr['r_default']['ratio']:.3f} of q_best) but saves only "
             f"{pr['r_default']['saved']:.1f}% vs {tr['r_default']['saved']:.1f}%: with compressed p the flash/pro ratio "
             "moves little across prompts, so the prior's curve jumps from mostly-flash to mostly-pro within a few "
             "hundredths of r. No prior p reaches 0.89, so f = 0.89 always falls back to argmax (pro).\n")
    c = s["trained_p_vs_/work/ana/dev_scores.jsonl"]
    if c:
        L.append(f"Check: trained p from the server vs p_route in /work/ana/dev_scores.jsonl over {c['rows']} rows: "
                 f"max |diff| {c['max_abs_diff']:.2e}, mean {c['mean_abs_diff']:.2e}.\n")
    return "\n".join(L)


if __name__ == "__main__":
    main()
