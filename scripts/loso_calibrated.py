"""Leave-one-source-out with run-time calibration: score a source's dev rows with heads trained
without that source (scripts/loso.sh makes them), with and without `--calibration` on 30% of
its prompts, and print router / verifier AUROC and ECE on the other 70%.

usage: python3 scripts/loso_calibrated.py SOURCE HEADS.json [CALIBRATION_FRACTION]
env: OUT (work dir), PRECISION (the encoder's, default auto)
"""
import gzip, json, sys, subprocess, hashlib, os
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "dev.jsonl.gz")
WORK = os.environ.get("OUT", "/tmp/loso-calibrated")
src = sys.argv[1]; heads = sys.argv[2]; frac = float(sys.argv[3]) if len(sys.argv) > 3 else 0.3
rows = [json.loads(l) for l in gzip.open(DATA, 'rt')]
rows = [r for r in rows if r['source'] == src]
def h(s): return int(hashlib.md5(s.encode()).hexdigest()[:8], 16) / 2**32
calib = [r for r in rows if h(r['prompt_id']) < frac]
test = [r for r in rows if h(r['prompt_id']) >= frac]
d = os.path.join(WORK, src); os.makedirs(d, exist_ok=True)
for name, rs in (('calib', calib), ('test', test)):
    with open(f'{d}/{name}.jsonl', 'w') as f:
        for r in rs: f.write(json.dumps(r) + '\n')
def auroc(p, y):
    pairs = sorted(zip(p, y)); n1 = sum(y); n0 = len(y) - n1
    r = 0; i = 0; ranks = [0]*len(pairs)
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j+1][0] == pairs[i][0]: j += 1
        for k in range(i, j+1): ranks[k] = (i + j) / 2 + 1
        i = j + 1
    s = sum(rk for rk, (_, yy) in zip(ranks, pairs) if yy)
    return (s - n1*(n1+1)/2) / (n1*n0)
def ece(p, y, b=15):
    bins = [[0,0,0] for _ in range(b)]
    for pp, yy in zip(p, y):
        k = min(int(pp*b), b-1); bins[k][0]+=pp; bins[k][1]+=yy; bins[k][2]+=1
    return sum(abs(a-c) for a,c,n in bins)/len(p)
for mode in ('none', 'calib'):
    out = f'{d}/out-{mode}.jsonl'
    args = [os.path.join(ROOT, 'target/release/tiergate'), 'score', '--heads', heads, '--data', f'{d}/test.jsonl', '--out', out, '--cache-dir', os.path.join(ROOT, 'models/cache')]
    args += ['--precision', os.environ.get('PRECISION', 'auto')]
    if mode == 'calib': args += ['--calibration', f'{d}/calib.jsonl']
    subprocess.run(args, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    o = [json.loads(l) for l in open(out)]
    y = [1 if r['score'] >= 0.5 else 0 for r in test]; ys = [r['score'] for r in test]
    pr = [x['p_route'] for x in o]; pv = [x['p_verify'] for x in o]
    print(f"{src} {os.path.basename(heads)} {mode}: calib rows {len(calib)}, test rows {len(test)}: router AUROC {auroc(pr,y):.3f} ECE {ece(pr,ys):.3f} | verifier AUROC {auroc(pv,y):.3f} ECE {ece(pv,ys):.3f}")
