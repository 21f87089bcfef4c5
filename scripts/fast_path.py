#!/usr/bin/env python3
"""Route's fast path on dev (issue 15): the static student decides alone when its decision
has a margin, and defers to the encoder otherwise.

Usage: FULL=dev-full.jsonl STATIC=dev-static.jsonl python3 scripts/fast_path.py
(both `tiergate score` on dev.jsonl.gz, row-aligned: FULL at the serving precision,
STATIC at `--precision static`). Route-only by the default relative floor r (0.94) over each
source's data models in price order (scripts/relative_floor.py's candidates). The student's
decision at r is the cheapest candidate j with p_j >= r * max p; its margin is how far the
decisive comparisons are from their lines (`margin` below, the server's `stability`).
With margin >= delta the student answers alone, else the encoder's decision is taken.
delta is chosen on one half of the prompts (md5, as relative_floor.py) as the smallest value
on a grid whose hybrid keeps >= 99% agreement with the encoder's decisions on every source,
and reported on the other half, both ways. Pure standard library.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import relative_floor as rf  # noqa: E402

R = float(os.environ.get("R", "0.94"))
BAND = 0.1  # policy.verify_band
DELTAS = [i / 100 for i in range(0, 41)]


def margin(p, r, band=BAND):
    """The student's pick j and its stability, as `decide::RouteDecision::stability`: j over
    the bar (of the others' best when j is the best: its own fall lowers the bar), every
    cheaper candidate under it, and, when a dearer one exists, how far `verify_recommended`
    is from flipping: it needs the margin inside the Verify band and a dearer one rated above
    j (`decide::worth_verifying`) (candidates are in price order: a later one counts as
    dearer, where Route needs a strictly higher cost; the dev sources have no ties)."""
    thr = r * max(p)
    j = rf.pick_rel(p, r)
    others = max((p[i] for i in range(len(p)) if i != j), default=None)
    if others is None:
        m = float("inf")
    elif p[j] >= others:
        m = p[j] - r * others
    else:
        m = p[j] - thr
    for i in range(j):
        m = min(m, thr - p[i])
    if j < len(p) - 1:
        # verify_recommended needs the margin inside the band and a dearer one above j.
        b = abs(abs(p[j] - thr) - band)
        above = [x - p[j] for x in p[j + 1:]]
        near, better = abs(p[j] - thr) < band, max(above) > 0
        c = max(above) if better else min(-d for d in above)
        m = min(m, min(b, c) if near and better else c if near else b if better else max(b, c))
    return j, m


def main():
    dev = rf.load_gz(f"{rf.DATA}/dev.jsonl.gz")
    train = rf.load_gz(f"{rf.DATA}/train.jsonl.gz")
    full = [json.loads(line) for line in open(os.environ["FULL"])]
    stat = [json.loads(line) for line in open(os.environ["STATIC"])]
    assert len(full) == len(dev) == len(stat), "score files must be row-aligned with dev"
    srcs, student_P = {}, {}
    for s in rf.SOURCES:
        rows_f = [dict(d, p_route=f["p_route"]) for d, f in zip(dev, full) if d["source"] == s]
        rows_s = [dict(d, p_route=f["p_route"]) for d, f in zip(dev, stat) if d["source"] == s]
        tr = [r for r in train if r["source"] == s]
        a, b = rf.Src(s, rows_f, tr, 0.95), rf.Src(s, rows_s, tr, 0.95)
        assert a.cands == b.cands and a.prompts == b.prompts
        fp = [rf.pick_rel(p, R) for p in a.P]
        sm = [margin(p, R) for p in b.P]
        srcs[s] = (a, fp, sm)
        student_P[s] = b.P

    def hybrid(s, delta, I):
        a, fp, sm = srcs[s]
        picks = list(fp)
        alone = 0
        for i in I:
            j, m = sm[i]
            if m >= delta:
                picks[i] = j
                alone += 1
        agree = sum(picks[i] == fp[i] for i in I) / len(I)
        return picks, alone / len(I), agree

    def line(s, I, picks):
        a = srcs[s][0]
        _, qb, cb = a.best_single(I)
        q, c = a.point(I, picks)
        return q / qb, 100 * (1 - c / cb)

    print(f"relative floor r = {R}; quality = share of the best single model's, saved = % of its cost")
    for fit, rep in (("A", "B"), ("B", "A")):
        ok = [d for d in DELTAS
              if all(hybrid(s, d, srcs[s][0].idx(fit))[2] >= 0.99 for s in srcs)]
        delta = min(ok) if ok else None
        print(f"\nchosen on {fit}: delta = {delta}; reported on {rep}:")
        print("| source | prompts | encoder: quality / saved | student alone: quality / saved | "
              "fast path: answered alone | agreement | quality / saved |")
        print("|---|---:|---|---|---:|---:|---|")
        for s, (a, fp, sm) in srcs.items():
            I = a.idx(rep)
            sp = [j for j, _ in sm]
            qe, se = line(s, I, fp)
            qs, ss = line(s, I, sp)
            if delta is None:
                print(f"| {s} | {len(I)} | {qe:.3f} / {se:.1f}% | {qs:.3f} / {ss:.1f}% | — | — | — |")
                continue
            hp, alone, agree = hybrid(s, delta, I)
            qh, sh = line(s, I, hp)
            print(f"| {s} | {len(I)} | {qe:.3f} / {se:.1f}% | {qs:.3f} / {ss:.1f}% | "
                  f"{100 * alone:.1f}% | {100 * agree:.1f}% | {qh:.3f} / {sh:.1f}% |")
    # saved@98% of the whole relative-floor curves, encoder vs student (a sweep, not a default)
    print("\nsaved@98% of the relative-floor curve on all dev prompts (encoder / student):")
    for s, (a, fp, sm) in srcs.items():
        I = a.idx("all")
        _, qb, cb = a.best_single(I)

        def s98(P):
            pts = [a.point(I, [rf.pick_rel(p, r) for p in P]) for r in rf.R_GRID]
            ca = rf.cost_at_quality([(c, q) for q, c in pts], rf.TARGET * qb)
            return "n/a" if ca is None else f"{100 * (1 - ca / cb):.1f}%"
        print(f"  {s}: {s98(a.P)} / {s98(student_P[s])}")

if __name__ == "__main__":
    main()
