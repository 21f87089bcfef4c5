#!/usr/bin/env python3
"""Does `tiergate calibrate`'s recommended Route floor hold on prompts it never saw?

An operator labels a share of its traffic, runs `calibrate`, and applies the recommended
[policy] line. Here, per draw (md5 of "rec:<seed>:<prompt_id>" < SHARE labels a prompt), that
floor and the embedded default (relative 0.94) are measured on the other prompts over the same
candidates, p_route from `score --calibration <the labelled rows>` (the overlay's calibration);
the decision rules are Route's (`decide::route_pick`, `decide::relative_pick`), rewritten here.

usage: python3 scripts/recommend_holdout.py TRAFFIC.jsonl.gz HEADS.json [SHARE=0.4]
env:   BIN (default target/release/tiergate), WORK (default /tmp/recommend)
"""
import gzip, hashlib, json, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get('BIN', os.path.join(ROOT, 'target', 'release', 'tiergate'))
TRAFFIC, HEADS = sys.argv[1], sys.argv[2]
SHARE = float(sys.argv[3]) if len(sys.argv) > 3 else 0.4
W = os.environ.get('WORK', '/tmp/recommend')
rows=[json.loads(l) for l in gzip.open(TRAFFIC,'rt')]
def u(s): return int(hashlib.md5(s.encode()).hexdigest()[:8],16)/2**32
def route_pick(p, t):
    for j,x in enumerate(p):
        if x>=t: return j
    return max(range(len(p)), key=lambda j:(p[j], -j))
def rel_pick(p, r):
    bar=r*max(p)
    for j,x in enumerate(p):
        if x>=bar: return j
    return 0
for seed in range(5):
    lab=[r for r in rows if u(f"rec:{seed}:{r['prompt_id']}")<SHARE]
    new=[r for r in rows if u(f"rec:{seed}:{r['prompt_id']}")>=SHARE]
    d=f"{W}/s{seed}"; os.makedirs(d,exist_ok=True)
    for name,rs in (('lab',lab),('new',new)):
        with open(f"{d}/{name}.jsonl",'w') as f:
            for r in rs: f.write(json.dumps(r)+'\n')
    if not os.path.exists(f"{d}/rec.json"):
        subprocess.run([BIN,'calibrate','--heads',HEADS,'--data',f"{d}/lab.jsonl",'--out',f"{d}/ov.json",'--recommend-out',f"{d}/rec.json"],cwd=ROOT,stdout=open(f"{d}/cal.out",'w'),stderr=open(f"{d}/cal.log",'w'),check=True)
    if not os.path.exists(f"{d}/new-scores.jsonl"):
        subprocess.run([BIN,'score','--heads',HEADS,'--data',f"{d}/new.jsonl",'--calibration',f"{d}/lab.jsonl",'--cache-dir','models/cache','--out',f"{d}/new-scores.jsonl"],cwd=ROOT,stdout=subprocess.DEVNULL,stderr=open(f"{d}/score.log",'w'),check=True)
    rec=json.load(open(f"{d}/rec.json"))[0]
    cands=rec['candidates']; best=cands.index(rec['best'])
    sc=[json.loads(l) for l in open(f"{d}/new-scores.jsonl")]
    by={}
    for r,s in zip(new,sc):
        by.setdefault(r['prompt_id'],{})[r['model']]=(s['p_route'],float(r['score']),float(r['cost_usd']))
    ps=[[m[c] for c in cands] for m in by.values() if all(c in m for c in cands)]
    def fig(pick):
        c=q=bc=bq=0
        for p in ps:
            j=pick([x[0] for x in p]) if pick else best
            c+=p[j][2]; q+=p[j][1]; bc+=p[best][2]; bq+=p[best][1]
        return 1-c/bc, q/bq
    fl=rec['floor']
    if fl is None: rp=None; label='none'
    elif 'quality_floor' in fl: t=fl['quality_floor']; rp=lambda p: route_pick(p,t); label=f"quality_floor {t}"
    else: r_=fl['relative_floor']; rp=lambda p: rel_pick(p,r_); label=f"relative_floor {r_}"
    s1,q1=fig(rp); s0,q0=fig(lambda p: rel_pick(p,0.94))
    cr=rec['crossed']; warn=any(c['held']['quality']<0.97 for c in cr)
    print(f"seed {seed}: {len(ps)} new prompts; recommended {label} (in-sample {rec['in_sample']['saved']:.1%} at {rec['in_sample']['quality']:.1%}; warned {warn}) -> new: saved {s1:.1%} at {q1:.1%}; default 0.94 -> saved {s0:.1%} at {q0:.1%}", flush=True)
