#!/usr/bin/env python3
"""Does `tiergate calibrate`'s recommendation hold on prompts it never saw?

An operator labels a share of its traffic, runs `calibrate`, and applies the recommended
[policy] line with its `[gateway] verify` mode (always, borderline or never). Here, per
draw (md5 of "rec:<seed>:<prompt_id>" < SHARE labels a prompt), three flows are measured on the
other prompts over the same candidates:
- the recommendation as printed (Route's pick, verified and escalated as its mode says:
  `borderline` where the pick is within policy.verify_band (0.1) of the floor's line and a
  pricier candidate is rated above it, or its answer is empty; Verify calls per prompt beside
  each verified flow);
- the best flow without Verify (the recommendation itself when it does not verify, else its
  `other`): what the recommendation was before it weighed Verify;
- the embedded default (relative 0.94), Route alone.
p_route and p_verify come from `score --calibration <the labelled rows>` (the overlay's
calibration); the Verify threshold from the overlay's re-learned table (the heads' when it has
none) at the quality floor, or its default threshold under a relative floor; a rejected answer
escalates where Verify names (the pricier candidate with the highest p_route, when above the
answering one's or when the answer's p_verify is under 0.3 times its; else the
answer ships), at most MAX_ESCALATIONS times, every call paid. The rules are Route's and the
gateway's (`decide::route_pick`, `decide::relative_pick`, `decide::escalation_pick`,
`gateway::cascade`), rewritten here.

usage: python3 scripts/recommend_holdout.py TRAFFIC.jsonl.gz HEADS.json [SHARE=0.4]
env:   BIN (default target/release/tiergate), WORK (default /tmp/recommend), DRAWS (5)
"""
import gzip, hashlib, json, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
from verify_thresholds_holdout import threshold_from  # noqa: E402  (`heads::threshold_from`)
# `decide::escalation_pick` and the gateway's escalations, as the protocol replays them.
from protocol import escalation_pick, MAX_ESCALATIONS  # noqa: E402
BIN = os.environ.get('BIN', os.path.join(ROOT, 'target', 'release', 'tiergate'))
TRAFFIC, HEADS = sys.argv[1], sys.argv[2]
SHARE = float(sys.argv[3]) if len(sys.argv) > 3 else 0.4
W = os.environ.get('WORK', '/tmp/recommend')
DRAWS = int(os.environ.get('DRAWS', '5'))
VERIFY_BAND = 0.1    # the embedded config's policy.verify_band
CACHE = os.path.join(ROOT, 'models', 'cache')
rows = [json.loads(l) for l in gzip.open(TRAFFIC, 'rt')]
heads = json.load(open(HEADS))


def u(s):
    return int(hashlib.md5(s.encode()).hexdigest()[:8], 16) / 2**32


def route_pick(p, t):
    for j, x in enumerate(p):
        if x >= t:
            return j
    return max(range(len(p)), key=lambda j: (p[j], -j))


def rel_pick(p, r):
    bar = r * max(p)
    for j, x in enumerate(p):
        if x >= bar:
            return j
    return 0


def flow_of(floor, verify, relearned):
    """(pick function, floor line function, verify threshold) of a recommended flow, with the
    thresholds the server has once the overlay (its re-learned table, or None) is applied."""
    if floor is None:
        return None, None, None
    table = heads['verify_thresholds'] if relearned is None else relearned
    if 'quality_floor' in floor:
        t = floor['quality_floor']
        return (lambda p: route_pick(p, t)), (lambda p: t), threshold_from(table, t)
    r = floor['relative_floor']
    dq = heads.get('default_quality_floor')
    default = (heads['default_verify_threshold'] if relearned is None
               else threshold_from(table, 0.7 if dq is None else dq))
    return (lambda p: rel_pick(p, r)), (lambda p: r * max(p)), default


def label(floor, verify):
    if floor is None:
        return 'none'
    k, v = next(iter(floor.items()))
    return f"{k} {v}" + ("" if verify == 'never' else f" + verify {verify}")


for seed in range(DRAWS):
    lab = [r for r in rows if u(f"rec:{seed}:{r['prompt_id']}") < SHARE]
    new = [r for r in rows if u(f"rec:{seed}:{r['prompt_id']}") >= SHARE]
    d = f"{W}/s{seed}"
    os.makedirs(d, exist_ok=True)
    for name, rs in (('lab', lab), ('new', new)):
        with open(f"{d}/{name}.jsonl", 'w') as f:
            for r in rs:
                f.write(json.dumps(r) + '\n')
    if not os.path.exists(f"{d}/rec.json"):
        subprocess.run([BIN, 'calibrate', '--heads', HEADS, '--data', f"{d}/lab.jsonl", '--out',
                        f"{d}/ov.json", '--recommend-out', f"{d}/rec.json", '--cache-dir', CACHE],
                       cwd=ROOT, stdout=open(f"{d}/cal.out", 'w'),
                       stderr=open(f"{d}/cal.log", 'w'), check=True)
    if not os.path.exists(f"{d}/new-scores.jsonl"):
        subprocess.run([BIN, 'score', '--heads', HEADS, '--data', f"{d}/new.jsonl",
                        '--calibration', f"{d}/lab.jsonl", '--cache-dir', CACHE, '--out',
                        f"{d}/new-scores.jsonl"], cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=open(f"{d}/score.log", 'w'), check=True)
    rec = json.load(open(f"{d}/rec.json"))["sources"][0]
    relearned = json.load(open(f"{d}/ov.json")).get('verify_thresholds')
    cands = rec['candidates']
    best = cands.index(rec['best'])
    sc = [json.loads(l) for l in open(f"{d}/new-scores.jsonl")]
    by = {}
    for r, s in zip(new, sc):
        empty = r.get('response') is not None and not r['response'].strip()
        # The server's Verify gives an empty answer p 0 (score runs the verifier on it).
        by.setdefault(r['prompt_id'], {})[r['model']] = (
            s['p_route'], 0.0 if empty else s['p_verify'], float(r['score']),
            float(r['cost_usd']), empty)
    ps = [[m[c] for c in cands] for m in by.values() if all(c in m for c in cands)]

    def fig(pick, line, t, mode):
        c = q = bc = bq = calls = 0
        for p in ps:
            pr = [x[0] for x in p]
            j = pick(pr) if pick else best
            cost, hops = p[j][3], 0
            # `borderline`: Route's verify_recommended (`decide::worth_verifying`: within the
            # band of the line, and a pricier candidate rated above the pick), or, at any hop,
            # an empty answer, which the gateway verifies from any pick.
            recommended = pick is not None and (mode == 'always' or (
                mode == 'borderline' and abs(pr[j] - line(pr)) < VERIFY_BAND
                and any(x > pr[j] for x in pr[j + 1:])))

            def verifies(j):
                return recommended or (pick is not None and mode == 'borderline' and p[j][4])
            # Verify the answer; a rejected one (or one it cannot read: the gateway ships
            # those) escalates while escalations are left.
            # (Nothing pricier: the gateway asks Verify nothing.)
            while verifies(j) and hops < MAX_ESCALATIONS and j + 1 < len(p) \
                    and p[j][1] is not None:
                calls += 1
                if p[j][1] >= t and not p[j][4]:  # an empty answer never ships from Verify
                    break
                k = escalation_pick(pr, j, p[j][1])
                if k is None:
                    break
                j = k
                hops += 1
                cost += p[j][3]
            c += cost
            q += p[j][2]
            bc += p[best][3]
            bq += p[best][2]
        return 1 - c / bc, q / bq, calls / len(ps)

    flows = {'recommended': (rec['floor'], rec['verify'])}
    if rec['verify'] != 'never':
        # The best Route-alone flow; none kept the target: the best model alone.
        o = (rec.get('other') or [{'floor': None, 'verify': 'never'}])[0]
        flows['route alone'] = (o['floor'], o['verify'])
    else:
        flows['route alone'] = flows['recommended']
    flows['default 0.94'] = ({'relative_floor': 0.94}, 'never')
    flows['default 0.94 borderline'] = ({'relative_floor': 0.94}, 'borderline')
    out = []
    for name, (floor, verify) in flows.items():
        pick, line, t = flow_of(floor, verify, relearned)
        s, q, calls = fig(pick, line, t, verify)
        vc = f" ({calls:.2f} Verify calls/prompt)" if verify != 'never' else ""
        out.append(f"{name} [{label(floor, verify)}] saved {s:.1%} at {q:.1%}{vc}")
    warn = any(c['held']['quality'] < 0.97 for c in rec['crossed'])
    print(f"seed {seed}: {len(ps)} new prompts; warned {warn}; " + "; ".join(out), flush=True)
