#!/usr/bin/env python3
"""Do Verify's per-floor thresholds hold on prompts calibration never saw?

Verify maps a requested quality floor to a threshold on p_verify (`Heads::threshold_for`): the
lowest p at which the answers shipped (p >= threshold) passed at least that often. `tiergate
train` learns the table on its held-back rows; `tiergate calibrate` re-learns it on the
labelled traffic's held-out answers. Per `scripts/protocol.py` run (its protocol.json: the
draw's split, heads and cached `score --calibration` output), this runs `calibrate` on the
run's calibration part (20% of the prompts) and applies both tables to the test part (60%):
for each floor, the share of the shipped answers that passed and the share shipped. Rows:
every test answer of the run's tier models below the best one (the answers a cascade asks
Verify about).

usage: python3 scripts/verify_thresholds_holdout.py PROTOCOL.json ...
env:   BIN (default target/release/tiergate), WORK (default /tmp/vthr), CACHE (encoder cache,
       default models/cache, as protocol.py's)
out:   a table per traffic on stdout: floor, then for the trained and the re-learned table the
       mean passed share (over runs), the mean shipped share, and runs under the floor by more
       than 0.02
"""
import gzip, json, os, re, subprocess, sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import protocol as P  # noqa: E402  (the split rules)

BIN = os.environ.get("BIN", os.path.join(ROOT, "target", "release", "tiergate"))
WORK = os.environ.get("WORK", "/tmp/vthr")
CACHE = os.environ.get("CACHE", os.path.join(ROOT, "models", "cache"))
FLOORS = [0.8, 0.85, 0.9, 0.95]
SLACK = 0.02


def threshold_from(t, floor):
    """`heads::threshold_from`, rewritten."""
    for i, (f, th) in enumerate(t):
        if f >= floor:
            if i == 0:
                return min(floor, th) if floor < f else th
            f0, t0 = t[i - 1]
            return t0 + (th - t0) * (floor - f0) / max(f - f0, 1e-12)
    return max(t[-1][1], floor) if t else floor


def run(pj):
    d = json.load(open(pj))
    heads = json.load(open(d["heads"]))
    out = {}
    for s in d["sources"]:
        key = s["score_run"]["key"]
        m = re.search(r"-seed(\d+)", key)
        P.SPLIT_SALT = f"seed:{m.group(1)}:" if m else ""
        P.CAL_FRAC_USED = d["constants"]["cal_frac"]
        name = s["source"]
        op = gzip.open if d["data"].endswith(".gz") else open
        with op(d["data"], "rt") as f:
            rows = [r for r in map(json.loads, f) if r["source"] == name]
        cal = [r for r in rows if P.part_of(r["prompt_id"]) == "cal"]
        uncal = [r for r in rows if P.part_of(r["prompt_id"]) != "cal"]
        got = [json.loads(l) for l in open(s["score_run"]["log"][:-len(".log")] + ".jsonl")]
        if len(got) != len(uncal):
            sys.exit(f"{pj} {name}: {len(got)} scores for {len(uncal)} rows")
        w = os.path.join(WORK, key)
        os.makedirs(w, exist_ok=True)
        ov = os.path.join(w, "overlay.json")
        if not os.path.exists(ov):
            with open(os.path.join(w, "cal.jsonl"), "w") as f:
                for r in cal:
                    f.write(json.dumps(r) + "\n")
            subprocess.run([BIN, "calibrate", "--heads", d["heads"], "--data",
                            os.path.join(w, "cal.jsonl"), "--out", ov, "--no-recommend",
                            "--cache-dir", CACHE], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=open(os.path.join(w, "calibrate.log"), "w"), check=True)
        relearned = json.load(open(ov)).get("verify_thresholds")
        tables = {"trained": heads["verify_thresholds"],
                  "relearned": heads["verify_thresholds"] if relearned is None else relearned}
        asked = [t["model"] for t in s["tiers"]][:-1]
        test = []
        for r, g in zip(uncal, got):
            if (g["prompt_id"], g["model"]) != (r["prompt_id"], r["model"]):
                sys.exit(f"{pj} {name}: scores out of order")
            if (r["model"] in asked and g["p_verify"] is not None
                    and P.part_of(r["prompt_id"]) == "test"):
                test.append((g["p_verify"], r["score"] >= P.PASS))
        res = {}
        for floor in FLOORS:
            for which, t in tables.items():
                th = threshold_from(t, floor)
                shipped = [y for p, y in test if p >= th]
                passed = sum(shipped) / len(shipped) if shipped else None
                res[(floor, which)] = (passed, len(shipped) / max(len(test), 1))
        out[name] = (res, relearned is not None)
    return out


def main():
    acc = defaultdict(list)
    relearned = defaultdict(int)
    for pj in sys.argv[1:]:
        for name, (res, re_) in run(pj).items():
            tr = name.split(":")[-1]
            relearned[tr] += re_
            for k, v in res.items():
                acc[(tr,) + k].append(v)
    for tr in sorted({k[0] for k in acc}):
        n = len(acc[(tr, FLOORS[0], "trained")])
        print(f"\n{tr}: {n} runs, thresholds re-learned in {relearned[tr]}")
        print("| floor | trained: passed / shipped / runs under | re-learned: passed / shipped / runs under |")
        print("|---:|---|---|")
        for floor in FLOORS:
            cells = []
            for which in ("trained", "relearned"):
                xs = acc[(tr, floor, which)]
                ps = [x[0] for x in xs if x[0] is not None]
                mp = f"{sum(ps) / len(ps):.3f}" if ps else "—"
                sh = sum(x[1] for x in xs) / len(xs)
                under = sum(1 for x in xs if x[0] is not None and x[0] < floor - SLACK)
                cells.append(f"{mp} / {sh:.2f} / {under}")
            print(f"| {floor} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
