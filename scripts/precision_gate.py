#!/usr/bin/env python3
"""Accuracy gate for reduced-precision encoders: compares two `tiergate score` outputs of the
same labelled file (reference f32 vs candidate) on router/verifier AUROC per source, the
largest probability shifts, and how often a threshold decision flips.

usage: scripts/precision_gate.py DATA.jsonl.gz REF.jsonl CAND.jsonl [--heads models/heads.json]
       [--floor F --ship T]   (default: the heads' learned floor and Verify threshold)
"""
import argparse
import gzip
import json
from collections import defaultdict


def auroc(p, y):
    pairs = sorted(zip(p, y))
    pos = sum(y)
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        r = (i + 1 + j) / 2
        rank_sum += r * sum(1 for k in range(i, j) if pairs[k][1])
        i = j
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("ref")
    ap.add_argument("cand")
    ap.add_argument("--heads", default="models/heads.json")
    ap.add_argument("--floor", type=float)
    ap.add_argument("--ship", type=float)
    a = ap.parse_args()
    heads = json.load(open(a.heads))
    a.floor = a.floor if a.floor is not None else heads.get("default_quality_floor") or 0.7
    a.ship = a.ship if a.ship is not None else heads["default_verify_threshold"]
    op = gzip.open if a.data.endswith(".gz") else open
    labels = [json.loads(l)["score"] >= 0.5 for l in op(a.data, "rt")]
    ref = [json.loads(l) for l in open(a.ref)]
    cand = [json.loads(l) for l in open(a.cand)]
    assert len(labels) == len(ref) == len(cand)
    groups = defaultdict(list)
    for i, r in enumerate(ref):
        groups["all"].append(i)
        groups[r["source"]].append(i)
    print(f"{'source':<24}{'rows':>7}{'route ref':>11}{'route cand':>11}{'verify ref':>11}{'verify cand':>12}")
    worst, worst_all = 0.0, 0.0
    for g, idx in groups.items():
        y = [labels[i] for i in idx]
        vi = [i for i in idx if ref[i]["p_verify"] is not None]
        yv = [labels[i] for i in vi]
        cols = [auroc([ref[i]["p_route"] for i in idx], y), auroc([cand[i]["p_route"] for i in idx], y),
                auroc([ref[i]["p_verify"] for i in vi], yv), auroc([cand[i]["p_verify"] for i in vi], yv)]
        worst = max(worst, cols[0] - cols[1], cols[2] - cols[3])
        if g == "all":
            worst_all = max(cols[0] - cols[1], cols[2] - cols[3])
        print(f"{g:<24}{len(idx):>7}" + "".join(f"{c:>11.4f}" for c in cols))
    dr = [abs(r["p_route"] - c["p_route"]) for r, c in zip(ref, cand)]
    dv = [abs(r["p_verify"] - c["p_verify"]) for r, c in zip(ref, cand) if r["p_verify"] is not None]
    fr = sum((r["p_route"] >= a.floor) != (c["p_route"] >= a.floor) for r, c in zip(ref, cand))
    fv = sum((r["p_verify"] >= a.ship) != (c["p_verify"] >= a.ship)
             for r, c in zip(ref, cand) if r["p_verify"] is not None)
    dr.sort(), dv.sort()
    print(f"|Δp_route|: median {dr[len(dr) // 2]:.2e}, p99 {dr[int(len(dr) * .99)]:.2e}, max {dr[-1]:.2e}; "
          f"route decisions (p ≥ {a.floor:.3f}) flipped: {fr}/{len(dr)}")
    print(f"|Δp_verify|: median {dv[len(dv) // 2]:.2e}, p99 {dv[int(len(dv) * .99)]:.2e}, max {dv[-1]:.2e}; "
          f"ship decisions (p ≥ {a.ship:.3f}) flipped: {fv}/{len(dv)}")
    # The gate: on all rows, router and verifier AUROC unchanged at 3 decimals (a drop under
    # 0.0005); per source, no drop over 0.005 (a few thousand rows each: noisier).
    print(f"AUROC drop on all rows: {worst_all:+.4f} (gate: < 0.0005); "
          f"largest per-source drop: {worst:+.4f} (gate: ≤ 0.005)")
    ok = worst_all < 0.0005 and worst <= 0.005
    print("gate:", "passed" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
