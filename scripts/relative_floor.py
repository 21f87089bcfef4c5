#!/usr/bin/env python3
"""Route-only policies on dev: absolute floor f, relative floor r, utility lambda.

Usage: SCORES=dev_scores.jsonl python3 scripts/relative_floor.py [--min-coverage 0.95] [--out-prefix target/ana/relative]
(dev_scores.jsonl: `tiergate score` on dev.jsonl.gz, row-aligned; responses may be nulled for speed.)
Reads $DATA/{dev,train}.jsonl.gz (default ../shared/data) and $SCORES (row-aligned with dev).
Pure standard library.
"""
import argparse
import collections
import gzip
import hashlib
import json
import math
import os

DATA = os.environ.get("DATA", "../shared/data")
SCORES = os.environ.get("SCORES", "target/ana/dev_scores.jsonl")
SOURCES = ["mmlu_pro", "routerbench_0shot", "alpaca_eval2_wgpt4t"]
TARGET = 0.98
DEFAULT_F = 0.89

F_GRID = [i / 100 for i in range(101)]                 # 0.00 .. 1.00
R_GRID = [(100 + i) / 200 for i in range(101)]         # 0.500 .. 1.000 step 0.005
K_GRID = [None] + list(range(81))                       # None = lambda 0


def judge_gaming(m):
    return m == "gpt4_gamed" or m.endswith("_verbose") or m.endswith("_concise")


def load_gz(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(l) for l in f]


# ---------------------------------------------------------------- pick rules (project semantics)
def pick_abs(p, f):
    for j, x in enumerate(p):
        if x >= f:
            return j
    best = 0
    for j in range(1, len(p)):
        if p[j] > p[best]:
            best = j
    return best


def pick_rel(p, r):
    thr = r * max(p)
    for j, x in enumerate(p):
        if x >= thr:
            return j
    return len(p) - 1  # unreachable (max itself passes)


def pick_util(p, cost, lam):
    best, ub = 0, p[0] - lam * cost[0]
    for j in range(1, len(p)):
        u = p[j] - lam * cost[j]
        if u > ub:
            best, ub = j, u
    return best


def cost_at_quality(points, q):
    """Port of tiergate src/eval/replay.rs cost_at_quality: points sorted by (cost, quality);
    any point with quality >= q counts; for cost-adjacent pairs with q_i < q <= q_{i+1} the
    linear mix reaching exactly q counts. Smallest such cost, None if none."""
    p = sorted((c, x) for c, x in points if math.isfinite(c) and math.isfinite(x))
    best = None
    for i, (c, x) in enumerate(p):
        if x >= q:
            best = c if best is None else min(best, c)
        if i + 1 < len(p):
            c2, x2 = p[i + 1]
            if x < q and x2 >= q:
                v = c + (q - x) / (x2 - x) * (c2 - c)
                best = v if best is None else min(best, v)
    return best


# ---------------------------------------------------------------- data
class Src:
    """One source: candidates in price order, per-prompt arrays (p, score, cost)."""

    def __init__(self, name, dev_rows, train_rows, min_cov):
        self.name = name
        by_prompt = collections.defaultdict(dict)
        for r in dev_rows:
            by_prompt[r["prompt_id"]][r["model"]] = r
        n = len(by_prompt)
        cov = collections.Counter(m for ms in by_prompt.values() for m in ms)
        tr = collections.defaultdict(lambda: [0.0, 0])
        for r in train_rows:
            tr[r["model"]][0] += r["cost_usd"]
            tr[r["model"]][1] += 1
        cands = [m for m in cov if not judge_gaming(m) and cov[m] >= min_cov * n]
        missing_train = [m for m in cands if tr[m][1] == 0]
        if missing_train:
            raise SystemExit(f"{name}: candidates without train rows: {missing_train}")
        self.price = {m: tr[m][0] / tr[m][1] for m in cands}
        self.cands = sorted(cands, key=lambda m: (self.price[m], m))
        self.excluded_coverage = sorted(
            (m, cov[m]) for m in cov if not judge_gaming(m) and cov[m] < min_cov * n)
        self.n_prompts_all = n
        self.prompts = sorted(pid for pid, ms in by_prompt.items()
                              if all(m in ms for m in self.cands))
        self.dropped = n - len(self.prompts)
        self.P, self.S, self.C = [], [], []
        for pid in self.prompts:
            ms = by_prompt[pid]
            self.P.append([ms[m]["p_route"] for m in self.cands])
            self.S.append([ms[m]["score"] for m in self.cands])
            self.C.append([ms[m]["cost_usd"] for m in self.cands])
        self.exp_cost = [self.price[m] for m in self.cands]
        self.c_max = max(self.exp_cost)
        self.half = [int(hashlib.md5(f"{name}/{pid}".encode()).hexdigest(), 16) % 2
                     for pid in self.prompts]

    def idx(self, which):
        if which == "all":
            return list(range(len(self.prompts)))
        h = {"A": 0, "B": 1}[which]
        return [i for i in range(len(self.prompts)) if self.half[i] == h]

    def lam(self, k):
        return 0.0 if k is None else 10 ** (-3 + k / 10) / self.c_max

    def best_single(self, I):
        m = len(self.cands)
        n = len(I)
        qs = [sum(self.S[i][j] for i in I) / n for j in range(m)]
        cs = [sum(self.C[i][j] for i in I) / n for j in range(m)]
        # highest mean score, ties: cheaper (by actual mean dev cost, as replay.rs does)
        b = max(range(m), key=lambda j: (qs[j], -cs[j]))
        return b, qs[b], cs[b]

    def point(self, I, picks):
        n = len(I)
        q = sum(self.S[i][picks[i]] for i in I) / n
        c = sum(self.C[i][picks[i]] for i in I) / n
        return q, c

    def picks_for(self, kind, x):
        if kind == "abs":
            return [pick_abs(p, x) for p in self.P]
        if kind == "rel":
            return [pick_rel(p, x) for p in self.P]
        lam = self.lam(x)
        return [pick_util(p, self.exp_cost, lam) for p in self.P]


GRIDS = {"abs": F_GRID, "rel": R_GRID, "util": K_GRID}


def ranges(vals, kind):
    """Compress feasible grid values into contiguous runs ["lo..hi", ...] (grid order)."""
    grid = GRIDS[kind]
    pos = [grid.index(v) for v in vals]
    runs = []
    for p in pos:
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    lab = lambda v: pname(kind, v) if kind != "util" else ("λ0" if v is None else f"k{v}")
    return [lab(grid[a]) if a == b else f"{lab(grid[a])}..{lab(grid[b])}" for a, b in runs]


def curves(src):
    """kind -> list of picks arrays over the whole prompt set (reused for every subset)."""
    return {kind: [src.picks_for(kind, x) for x in GRIDS[kind]] for kind in GRIDS}


def evaluate(src, picks_by_kind, which):
    I = src.idx(which)
    b, qb, cb = src.best_single(I)
    out = {"n_prompts": len(I), "best_model": src.cands[b], "q_best": qb, "c_best": cb,
           "target": TARGET * qb, "curves": {}}
    for kind, grid in GRIDS.items():
        pts = []
        for x, picks in zip(grid, picks_by_kind[kind]):
            q, c = src.point(I, picks)
            pts.append({"param": x, "lambda": src.lam(x) if kind == "util" else None,
                        "quality": q, "cost": c, "ratio": q / qb,
                        "saved": 100 * (1 - c / cb)})
        ca = cost_at_quality([(p["cost"], p["quality"]) for p in pts], TARGET * qb)
        out["curves"][kind] = {
            "points": pts,
            "cost_at_98": ca,
            "saved_at_98": None if ca is None else 100 * (1 - ca / cb),
            "max_ratio": max(p["ratio"] for p in pts),
            "feasible_params": ranges([x for x, p in zip(grid, pts) if p["ratio"] >= TARGET], kind),
        }
    return out


def choose(evals_by_src, kind):
    """Shared grid index: quality >= 98% of q_best on every source, max mean saving.
    Ties: first in grid order (smallest f / r / k)."""
    grid = GRIDS[kind]
    best, best_s = None, None
    for gi in range(len(grid)):
        pts = [evals_by_src[s]["curves"][kind]["points"][gi] for s in evals_by_src]
        if all(p["ratio"] >= TARGET for p in pts):
            ms = sum(p["saved"] for p in pts) / len(pts)
            if best is None or ms > best_s:
                best, best_s = gi, ms
    info = {"feasible": best is not None}
    if best is None:
        # fallback, for information only: the point with the largest min-over-sources ratio
        gi = max(range(len(grid)), key=lambda g: min(
            evals_by_src[s]["curves"][kind]["points"][g]["ratio"] for s in evals_by_src))
        info["fallback_max_min_ratio_index"] = gi
        info["fallback_param"] = grid[gi]
        return None, info
    info["param"] = grid[best]
    info["mean_saved_fit"] = best_s
    return best, info


def at(evals_by_src, kind, gi):
    res = {}
    for s, e in evals_by_src.items():
        p = e["curves"][kind]["points"][gi]
        res[s] = {"ratio": p["ratio"], "saved": p["saved"], "quality": p["quality"],
                  "cost": p["cost"], "meets_98": p["ratio"] >= TARGET}
        if kind == "util":
            res[s]["lambda"] = p["lambda"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-coverage", type=float, default=None,
                    help="run only this coverage rule (default: 1.0 -> relative.*, plus 0.95 -> relative_cov95.*)")
    ap.add_argument("--out-prefix", default="target/ana/relative")
    a = ap.parse_args()
    if a.min_coverage is not None:
        out, md = run(a.min_coverage)
        write(a.out_prefix, out, md)
        print(md)
        return
    out, md = run(1.0)
    out95, md95 = run(0.95)
    write(a.out_prefix + "_cov95", out95, md95)
    md += "\n" + appendix(out95)
    out["sensitivity_cov95"] = {"file": a.out_prefix + "_cov95.json"}
    write(a.out_prefix, out, md)
    print(md)


def write(prefix, out, md):
    with open(prefix + ".json", "w") as f:
        json.dump(out, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(md)


def appendix(o):
    L = ["## Sensitivity: candidates = models with rows on >= 95% of prompts (the replay's tier coverage rule)\n",
         "Full tables in relative_cov95.md / .json. Only mmlu_pro changes (gemini-1.5-flash/pro and jamba-1.5-large "
         "join, 2 prompts dropped).\n",
         "| source | best | q_best | saved@98 abs / rel / util |", "|---|---|---|---|"]
    for s, d in o["sources"].items():
        c = d["all"]["curves"]
        L.append(f"| {s} | {d['all']['best_model']} | {d['all']['q_best']:.4f} | " +
                 " / ".join(fmt(c[k]['saved_at_98'], pct=True) for k in ("abs", "rel", "util")) + " |")
    L.append("")
    L.append("| choice | r | " + " | ".join(f"{s} ratio / saved" for s in o["sources"]) + " |")
    L.append("|---|---|" + "---|" * len(o["sources"]))
    rows = [(k, o["crossfit"][k]["rel"]["choice"], o["crossfit"][k]["rel"].get("report")) for k in o["crossfit"]]
    rows.append(("whole dev (in-sample)", o["whole_dev"]["rel"]["choice"], o["whole_dev"]["rel"]["result"]))
    for k, ch, rep in rows:
        if not ch["feasible"]:
            L.append(f"| {k} | none feasible | " + " | ".join("—" for _ in o["sources"]) + " |")
        else:
            L.append(f"| {k} | {pname('rel', ch['param'])} | " + " | ".join(
                f"{v['ratio']:.3f}{'' if v['meets_98'] else '*'} / {v['saved']:.1f}%" for v in rep.values()) + " |")
    L.append("")
    return "\n".join(L)


def run(min_cov):
    dev = load_gz(os.path.join(DATA, "dev.jsonl.gz"))
    with open(SCORES) as f:
        sc = [json.loads(l) for l in f]
    assert len(sc) == len(dev) == 22381, (len(sc), len(dev))
    for r, s in zip(dev, sc):
        assert (r["source"], r["prompt_id"], r["model"]) == (s["source"], s["prompt_id"], s["model"])
        r["p_route"] = float(s["p_route"])
    train = load_gz(os.path.join(DATA, "train.jsonl.gz"))

    srcs = {}
    for s in SOURCES:
        srcs[s] = Src(s, [r for r in dev if r["source"] == s],
                      [r for r in train if r["source"] == s], min_cov)
    picks = {s: curves(srcs[s]) for s in SOURCES}
    ev = {w: {s: evaluate(srcs[s], picks[s], w) for s in SOURCES} for w in ("all", "A", "B")}

    out = {"rules": {
        "min_coverage": min_cov, "target_fraction": TARGET,
        "f_grid": [F_GRID[0], F_GRID[-1], 0.01], "r_grid": [R_GRID[0], R_GRID[-1], 0.005],
        "lambda_grid": "0 and 10^(-3+k/10)/c_max, k=0..80",
        "cost_at_quality": "replay.rs: points sorted by cost; any point >= target or the linear "
                           "mix of cost-adjacent points crossing upward",
        "choice": "shared param, quality>=98% q_best on every source, max mean saving, "
                  "ties first in grid"},
        "sources": {}, "crossfit": {}, "whole_dev": {}}
    for s in SOURCES:
        src, e = srcs[s], ev["all"][s]
        out["sources"][s] = {
            "candidates": [{"model": m, "train_mean_cost": src.price[m]} for m in src.cands],
            "excluded_for_coverage": src.excluded_coverage,
            "n_prompts": len(src.prompts), "n_prompts_all": src.n_prompts_all,
            "dropped_prompts": src.dropped, "c_max": src.c_max,
            "share_maxp_below_0.89": sum(max(p) < DEFAULT_F for p in src.P) / len(src.P),
            "max_p_quantiles_0_50_100": [sorted(max(p) for p in src.P)[int(q * (len(src.P) - 1))] for q in (0, .5, 1)],
            "n_A": len(src.idx("A")), "n_B": len(src.idx("B")),
            "all": e,
            "A": {k: v for k, v in ev["A"][s].items() if k != "curves"}
                 | {"saved_at_98": {k: ev["A"][s]["curves"][k]["saved_at_98"] for k in GRIDS},
                    "max_ratio": {k: ev["A"][s]["curves"][k]["max_ratio"] for k in GRIDS},
                    "feasible_params": {k: ev["A"][s]["curves"][k]["feasible_params"] for k in GRIDS}},
            "B": {k: v for k, v in ev["B"][s].items() if k != "curves"}
                 | {"saved_at_98": {k: ev["B"][s]["curves"][k]["saved_at_98"] for k in GRIDS},
                    "max_ratio": {k: ev["B"][s]["curves"][k]["max_ratio"] for k in GRIDS},
                    "feasible_params": {k: ev["B"][s]["curves"][k]["feasible_params"] for k in GRIDS}},
        }
    fi = F_GRID.index(DEFAULT_F)
    for fit, rep in (("A", "B"), ("B", "A")):
        d = {}
        for kind in GRIDS:
            gi, info = choose(ev[fit], kind)
            d[kind] = {"choice": info,
                       "fit": at(ev[fit], kind, gi) if gi is not None else None,
                       "report": at(ev[rep], kind, gi) if gi is not None else None}
            if gi is None:
                fb = info["fallback_max_min_ratio_index"]
                d[kind]["fallback_fit"] = at(ev[fit], kind, fb)
                d[kind]["fallback_report"] = at(ev[rep], kind, fb)
        d["default_f_0.89"] = {"fit_half": at(ev[fit], "abs", fi), "report_half": at(ev[rep], "abs", fi)}
        out["crossfit"][f"{fit}->{rep}"] = d
    for kind in GRIDS:
        gi, info = choose(ev["all"], kind)
        out["whole_dev"][kind] = {"choice": info,
                                  "result": at(ev["all"], kind, gi) if gi is not None else None}
        if gi is None:
            out["whole_dev"][kind]["fallback_result"] = at(ev["all"], kind, info["fallback_max_min_ratio_index"])
    out["whole_dev"]["default_f_0.89"] = at(ev["all"], "abs", fi)
    return out, render(out, srcs)


def fmt(v, nd=1, pct=False):
    if v is None:
        return "—"
    return f"{v:.{nd}f}" + ("%" if pct else "")


def pname(kind, v):
    if kind == "util":
        return "λ=0" if v is None else f"k={v}"
    return f"{v:.3f}".rstrip("0").rstrip(".") if kind == "rel" else f"{v:.2f}"


def render(out, srcs):
    L = []
    cov = out["rules"]["min_coverage"]
    L.append("# Route-only policies on dev: absolute floor vs relative floor vs utility\n")
    L.append("Rules used:")
    L.append(f"- Candidates per source: non-judge-gaming models with dev rows on {'every prompt' if cov >= 1 else f'>= {cov:.0%} of prompts'}"
             "; prompts missing any candidate dropped; price = mean train cost_usd in the source (ties by name); p = p_route.")
    L.append("- (a) abs floor f: cheapest with p>=f, else argmax p (first on ties); (b) rel floor r: cheapest with p >= r·max(p); "
             "(c) utility: argmax p − λ·price (first on ties), λ ∈ {0} ∪ {10^(−3+k/10)/c_max, k=0..80}.")
    L.append("- Grids: f 0.00..1.00 step .01; r 0.500..1.000 step .005. Point = (mean dev cost, mean dev score) of picked rows.")
    L.append("- Best single = highest mean dev score (ties: cheaper); target = 0.98·q_best; saved = 100·(1 − cost/c_best).")
    L.append("- saved@98% = replay.rs cost_at_quality: points sorted by cost; any point ≥ target, or the linear mix of two "
             "cost-adjacent points crossing target upward; smallest such cost.")
    L.append("- Cross-fit: halves by md5(\"{source}/{prompt_id}\") % 2 (0=A, 1=B), q_best/c_best recomputed per half. One shared "
             "parameter: among grid values with quality ≥ 98% of q_best on every source (fit half), max mean saving (ties: first in grid); "
             "reported on the other half. Utility shares k across sources (λ_s = 10^(−3+k/10)/c_max,s).\n")

    L.append("## 1. saved@98% per source (whole dev)\n")
    L.append("| source | prompts | cands | best model | q_best | c_best | abs floor f | relative r | utility λ |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for s, d in out["sources"].items():
        e = d["all"]
        c = e["curves"]
        L.append(f"| {s} | {d['n_prompts']} (dropped {d['dropped_prompts']}) | {len(d['candidates'])} | {e['best_model']} | "
                 f"{e['q_best']:.4f} | {e['c_best']:.3g} | {fmt(c['abs']['saved_at_98'], pct=True)} | "
                 f"{fmt(c['rel']['saved_at_98'], pct=True)} | {fmt(c['util']['saved_at_98'], pct=True)} |")
    L.append("")
    L.append("Max quality ratio reached on each curve (whole dev): " + "; ".join(
        f"{s}: abs {d['all']['curves']['abs']['max_ratio']:.3f}, rel {d['all']['curves']['rel']['max_ratio']:.3f}, "
        f"util {d['all']['curves']['util']['max_ratio']:.3f}" for s, d in out["sources"].items()) + "\n")
    L.append("Share of prompts where no candidate has p_route >= 0.89 (f=0.89 falls back to argmax p): " + "; ".join(
        f"{s} {d['share_maxp_below_0.89']:.0%} (max-p min/median/max {', '.join(f'{x:.2f}' for x in d['max_p_quantiles_0_50_100'])})"
        for s, d in out["sources"].items()) + "\n")
    L.append("Candidates (price order, train mean cost):\n")
    for s, d in out["sources"].items():
        L.append(f"- **{s}**: " + ", ".join(f"{c['model']} ({c['train_mean_cost']:.3g})" for c in d["candidates"]))
        if d["excluded_for_coverage"]:
            L.append(f"  - excluded for coverage (rows/{d['n_prompts_all']}): " +
                     ", ".join(f"{m} ({n})" for m, n in d["excluded_for_coverage"]))
    L.append("")
    L.append("Per half (for reference): " + "; ".join(
        f"{s}: A n={d['n_A']} best {d['A']['best_model']} q={d['A']['q_best']:.4f}, "
        f"B n={d['n_B']} best {d['B']['best_model']} q={d['B']['q_best']:.4f}" for s, d in out["sources"].items()) + "\n")

    L.append("## 2. Cross-fitted shared parameter (choose on one half, report on the other)\n")
    L.append("| fit→report | policy | chosen | " + " | ".join(f"{s} ratio / saved" for s in out["sources"]) + " | mean saved |")
    L.append("|---|---|---|" + "---|" * len(out["sources"]) + "---|")
    names = {"abs": "abs floor f", "rel": "relative r", "util": "utility k"}
    for key, d in out["crossfit"].items():
        for kind in ("rel", "abs", "util"):
            ch = d[kind]["choice"]
            if not ch["feasible"]:
                rep = d[kind]["fallback_report"]
                ms = sum(v["saved"] for v in rep.values()) / len(rep)
                L.append(f"| {key} | {names[kind]} | **none feasible**; fallback max-min-ratio {pname(kind, ch['fallback_param'])} | " +
                         " | ".join(f"{v['ratio']:.3f}{'' if v['meets_98'] else '*'} / {v['saved']:.1f}%" for v in rep.values())
                         + f" | {ms:.1f}% |")
                continue
            rep = d[kind]["report"]
            ms = sum(v["saved"] for v in rep.values()) / len(rep)
            L.append(f"| {key} | {names[kind]} | {pname(kind, ch['param'])} (fit mean saved {ch['mean_saved_fit']:.1f}%) | " +
                     " | ".join(f"{v['ratio']:.3f}{'' if v['meets_98'] else '*'} / {v['saved']:.1f}%" for v in rep.values())
                     + f" | {ms:.1f}% |")
        rep = d["default_f_0.89"]["report_half"]
        ms = sum(v["saved"] for v in rep.values()) / len(rep)
        L.append(f"| {key} | abs f=0.89 (default, not fitted) | 0.89 | " +
                 " | ".join(f"{v['ratio']:.3f}{'' if v['meets_98'] else '*'} / {v['saved']:.1f}%" for v in rep.values())
                 + f" | {ms:.1f}% |")
    L.append("\n`*` = below 98% of that half's q_best. Fallback (only where no shared value is feasible, not part of the rule): "
             "the grid value maximising the minimum over sources of quality/q_best on the fit half.")
    L.append("\nPer half and source: saved@98% of each curve, max quality ratio on the curve, and the grid values reaching 98%:\n")
    L.append("| half | source | n | best | q_best | saved@98 abs / rel / util | max ratio abs / rel / util | r reaching 98% | f reaching 98% | k reaching 98% |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for h in ("A", "B"):
        for s, d in out["sources"].items():
            e = d[h]
            L.append(f"| {h} | {s} | {e['n_prompts']} | {e['best_model']} | {e['q_best']:.4f} | " +
                     " / ".join(fmt(e['saved_at_98'][k], pct=True) for k in ("abs", "rel", "util")) + " | " +
                     " / ".join(f"{e['max_ratio'][k]:.3f}" for k in ("abs", "rel", "util")) + " | " +
                     " | ".join(", ".join(e['feasible_params'][k]) or "none" for k in ("rel", "abs", "util")) + " |")
    L.append("\nUtility k: λ_source = 10^(−3+k/10)/c_max,source.\n")

    L.append("## 3. Whole-dev choice (in-sample)\n")
    L.append("| policy | chosen | " + " | ".join(f"{s} ratio / saved" for s in out["sources"]) + " | mean saved |")
    L.append("|---|---|" + "---|" * len(out["sources"]) + "---|")
    for kind in ("rel", "abs", "util"):
        d = out["whole_dev"][kind]
        if not d["choice"]["feasible"]:
            rep = d["fallback_result"]
            ms = sum(v["saved"] for v in rep.values()) / len(rep)
            L.append(f"| {names[kind]} (in-sample) | **none feasible**; fallback max-min-ratio {pname(kind, d['choice']['fallback_param'])} | " +
                     " | ".join(f"{v['ratio']:.3f}{'' if v['meets_98'] else '*'} / {v['saved']:.1f}%" for v in rep.values())
                     + f" | {ms:.1f}% |")
            continue
        rep = d["result"]
        ms = sum(v["saved"] for v in rep.values()) / len(rep)
        L.append(f"| {names[kind]} (in-sample) | {pname(kind, d['choice']['param'])} | " +
                 " | ".join(f"{v['ratio']:.3f} / {v['saved']:.1f}%" for v in rep.values()) + f" | {ms:.1f}% |")
    rep = out["whole_dev"]["default_f_0.89"]
    ms = sum(v["saved"] for v in rep.values()) / len(rep)
    L.append("| abs f=0.89 (default) | 0.89 | " + " | ".join(
        f"{v['ratio']:.3f}{'' if v['meets_98'] else '*'} / {v['saved']:.1f}%" for v in rep.values()) + f" | {ms:.1f}% |")
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
