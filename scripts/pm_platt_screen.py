#!/usr/bin/env python3
"""Screen (issue 13): a Platt scaling per model on top of the calibrated p_verify. The cascade
ships on one threshold for every tier, so a tier whose p is compressed (dev MMLU-Pro, 5 draws:
Mistral-7B's answers at p 0.8-0.9 all passed, at 0.6-0.8 47%) is shipped at the wrong
threshold. Per model with >= 20 labelled calibration answers: logit p' = a * logit p + b,
fitted on the calibration rows' own p (`score --data CAL --calibration CAL`, in-sample), with
a Gaussian pull (weight PM_L2, default 1) towards a = 1, b = 0; applied to the uncalibrated
rows' p, and the protocol run as it stands on them.

usage: WORK=... BIN=... python3 scripts/pm_platt_screen.py [protocol.py's arguments]
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
    out = os.path.join(a.work, 'cache', f'{src}-{a.data_tag}-{a.heads_md5[:12]}-{P.file_md5(a.bin)[:8]}-calself.jsonl')
    if not os.path.exists(out):
        split = os.path.join(a.work, 'splits', f'{src}-{a.data_tag}')
        cmd=[a.bin,'score','--heads',a.heads,'--data',os.path.join(split,'cal.jsonl'),'--calibration',os.path.join(split,'cal.jsonl'),'--out',out,'--cache-dir',os.path.join(P.ROOT,'models','cache')]
        subprocess.run(cmd, cwd=P.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    cs=[json.loads(l) for l in open(out)]
    by={}
    for r,s in zip(cal,cs):
        if s.get('p_verify') is None or r['score'] is None: continue
        by.setdefault(r['model'],([],[]))
        by[r['model']][0].append(lg(s['p_verify'])); by[r['model']][1].append(float(r['score']>=0.5))
    params={m:fit(np.array(z),np.array(y),L2) for m,(z,y) in by.items() if len(z)>=20}
    P.log(f"{src}: per-model platt {[(m[:12],round(a,2),round(b,2)) for m,(a,b) in params.items() if m in ['Mistral-7B-v0.1','gemma-7b','gemini-1.5-flash-002','gemini-1.5-pro-002','mistralai/mistral-7b-chat','mistralai/mixtral-8x7b-chat','gpt-4-1106-preview']]}")
    for r,g in zip(uncal,got):
        if g.get('p_verify') is not None and g['p_verify']>0 and r['model'] in params:
            a_,b_=params[r['model']]; g['p_verify']=1/(1+math.exp(-(a_*lg(g['p_verify'])+b_)))
    return got, info
P.score_rows = patched
P.main()
