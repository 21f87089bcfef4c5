#!/usr/bin/env python3
"""Screen (issue 13): a Platt scaling per model on top of the calibrated p_verify. The cascade
ships on one threshold for every tier, so a tier whose p is compressed (dev MMLU-Pro, 5 draws:
Mistral-7B's answers at p 0.8-0.9 all passed, at 0.6-0.8 47%) is shipped at the wrong
threshold. Per model with >= 20 labelled calibration answers: logit p' = a * logit p + b,
fitted on the calibration rows' own p (`score --data CAL --calibration CAL`, in-sample), with
a Gaussian pull (weight PM_L2, default 1) towards a = 1, b = 0; applied to the uncalibrated
rows' p, and the protocol run as it stands on them.

usage: WORK=... BIN=... python3 scripts/pm_platt_screen.py [protocol.py's arguments]
       (output tag pm-platt-l2-<PM_L2>-seed<N> unless --tag is given)
needs: numpy. Compare its protocol.json with a plain protocol.py run of the same seed.
"""
import json, math, os, subprocess, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol as P
import numpy as np
L2 = float(os.environ.get('PM_L2', '1.0'))
orig = P.score_rows
def lg(p): p=min(max(p,1e-6),1-1e-6); return math.log(p/(1-p))
def fit(z, y, l2):
    # logistic y ~ sigmoid(a z + b), prior a~1, b~0 with weight l2 (Newton)
    a,b=1.0,0.0
    for _ in range(50):
        s=1/(1+np.exp(-(a*z+b))); g=np.array([np.sum((s-y)*z)+l2*(a-1), np.sum(s-y)+l2*b])
        w=s*(1-s); H=np.array([[np.sum(w*z*z)+l2, np.sum(w*z)],[np.sum(w*z), np.sum(w)+l2]])
        d=np.linalg.solve(H,g); a-=d[0]; b-=d[1]
        if abs(d).max()<1e-8: break
    return a,b
def patched(src, cal, uncal, a):
    got, info = orig(src, cal, uncal, a)
    if a.no_calibration:
        sys.exit("pm_platt_screen: the scaling sits on calibrated p; drop --no-calibration")
    mode = "-nomem" if a.no_memory else ""
    out = os.path.join(a.work, "cache", f"{src}-{a.data_tag}-{a.heads_md5[:12]}-"
                       f"{P.file_md5(a.bin)[:8]}-calself{mode}.jsonl")
    want = [(r["prompt_id"], r["model"]) for r in cal]
    cs = [json.loads(l) for l in open(out)] if os.path.exists(out) else None
    if cs is None or [(g["prompt_id"], g["model"]) for g in cs] != want:
        cal_p = os.path.join(a.work, "splits", f"{src}-{a.data_tag}", "cal-self.jsonl")
        os.makedirs(os.path.dirname(cal_p), exist_ok=True)
        P.write_jsonl(cal_p, cal)
        cmd = [a.bin, "score", "--heads", a.heads, "--data", cal_p, "--calibration", cal_p,
               "--out", out, "--cache-dir", os.path.join(P.ROOT, "models", "cache")]
        if a.no_memory:
            cmd.append("--no-memory")
        subprocess.run(cmd, cwd=P.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)
        cs = [json.loads(l) for l in open(out)]
        if [(g["prompt_id"], g["model"]) for g in cs] != want:
            sys.exit(f"{src}: {out} does not match the calibration rows")
    by = {}
    for r, s in zip(cal, cs):
        if s.get("p_verify") is None or r["score"] is None:
            continue
        z, y = by.setdefault(r["model"], ([], []))
        z.append(lg(s["p_verify"]))
        y.append(float(r["score"] >= 0.5))
    params = {m: fit(np.array(z), np.array(y), L2) for m, (z, y) in by.items() if len(z) >= 20}
    P.log(f"{src}: per-model Platt (a, b) "
          f"{ {m: (round(float(pa), 2), round(float(pb), 2)) for m, (pa, pb) in params.items()} }")
    for r, g in zip(uncal, got):
        if g.get("p_verify") is not None and g["p_verify"] > 0 and r["model"] in params:
            pa, pb = params[r["model"]]
            g["p_verify"] = 1 / (1 + math.exp(-(pa * lg(g["p_verify"]) + pb)))
    return got, info


P.score_rows = patched
# Its own tag by default: a plain protocol.py run's protocol.json in the same WORK is the
# baseline to compare with, not to overwrite.
if "--tag" not in sys.argv:
    seed = next((sys.argv[i + 1] for i, x in enumerate(sys.argv[:-1]) if x == "--seed"), "0")
    sys.argv += ["--tag", f"pm-platt-l2-{L2:g}-seed{seed}"]
P.main()
