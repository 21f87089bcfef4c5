#!/usr/bin/env python3
"""Issue 13's evaluation protocol, replicated per source on our data: run-time calibration on a
fifth of a source's prompts, thresholds picked on held-out prompts and applied to others, and
the figures compared with a TF-IDF kNN router (the baseline the sealed evaluation compares
against), the oracle and random scores.

Per source S (rows: one per prompt x model):
- Split S's prompts by md5(prompt_id): calibration 20%, tune 20%, test 60%. The uncalibrated 80%
  (tune + test) is also split into halves A/B by md5("half:" + prompt_id), for cross-fitting.
- `tiergate score --heads HEADS --data UNCAL.jsonl --calibration CAL.jsonl` gives p_route and
  p_verify for every uncalibrated row (`--no-calibration`: without `--calibration`). The output
  is cached per (source, data file, heads file hash, binary hash, mode) under $WORK/cache, so a
  rerun only recomputes the analysis.
- Tiers, from the calibration rows only: models with rows for >= 95% of the calibration prompts;
  their (mean cost, mean score) Pareto front; the cheapest front model, the best-scoring one, and
  up to two front models in between, the nearest to 1/3 and 2/3 of the way in mean cost.
  Uncalibrated prompts missing a row of some tier model are skipped (all policies alike).
- Policies on the uncalibrated prompts (tier models in cost order, the best one last):
  route-only by floor t (the cheapest tier model with p_route >= t, else the best tier; one call);
  cascade (from the cheapest tier, ship if p_verify >= t, else call the next; the last always
  ships; cost = every call made); route+cascade, the gateway's own flow (start at the cheapest
  tier with p_route >= t; an answer with p_verify < t escalates where Verify names: the tier
  above with the highest p_route, when above the answering tier's or when p_verify is under
  0.3 times it, else the answer ships; at most 2 escalations; a row without an answer ships
  unverified; not a policy the sealed evaluation scores); kNN route-only by floor with p from a TF-IDF kNN over the
  calibration prompts (word unigrams, lowercase, sublinear tf, smooth idf from the calibration
  prompts, cosine, k = 10, p = (sum of the model's scores on the neighbours + 2 * its calibration
  mean) / (neighbours with a row + 2)); random scores route-only by floor; the oracle (the
  cheapest tier model with score >= 0.5, else the best; nothing to pick, figures reported as is).
  Peer policies, Verify's rule with peer answers (`decide::ships_with_peers`): an answer ships
  when p_verify >= t or an answer already bought for the prompt commits to the same final answer
  (`final_answer` in score's output: a multiple-choice pick or a declared number, read from each
  answer alone). cascade+peers: the cascade, earlier tiers' answers as peers (no extra call);
  probe+peers: the two cheapest tiers' answers bought up front, each the other's peer, then the
  cascade. consensus (the gateway's `consensus` policy, `decide::consensus`): a probe set of
  2 or 3 cheap models called together; the cheapest answer of the largest group of at least
  `need` that commit to the same final answer ships, else the best tier is called too. Its
  "threshold" is the probe set and `need`, picked like any threshold among the pairs and
  triples of up to six models from the calibration rows (consensus_sets: covering >= 95% of the calibration prompts, mean cost under
  half the best tier's, the best-scoring six). picked: what an operator does with labelled
  traffic, the policy and its threshold picked together among cascade, consensus, route and
  route+cascade. Every call is paid for in the cost.
- Thresholds: 0..1 in steps of 0.01 plus the 1..99% quantiles of the policy's own scores on the
  picking part. Pick = the threshold with the largest saving whose quality >= 98% of the best
  tier's on the picking part; always calling the best tier (saving 0) is always a candidate, so a
  pick never has a negative saving there. Saving = 1 - cost / cost of always calling the best
  tier on the same prompts; quality ratio = quality / the best tier's quality on them.
- Figures per policy: tune->test (picked on tune, applied to test: saving and test quality
  ratio); cross-fitted headline (picked on A applied to B and vice versa; a half's saving counts
  only if its quality ratio >= 97%, else 0; the mean of the two, and both quality ratios);
  in-sample (the pick on all uncalibrated prompts, for reference).
- Score quality on the uncalibrated rows of the tier models (label = score >= 0.5): pooled AUROC
  (ties rank-averaged) and ECE (15 equal-width bins, against the score itself) of p_route and
  p_verify, and within-model AUROC per tier model of p_route, p_verify and the kNN p. Beside
  each ECE its floor: the mean ECE of the same p against labels drawn as Bernoulli(p) (200 seeded
  draws), what a perfectly calibrated p shows on that many rows; ECE near the floor is noise.

usage: python3 scripts/protocol.py [--sources S ...] [--heads H] [--tag NAME] [--no-calibration]
                                   [--no-memory] [--data ../shared/data/dev.jsonl.gz] [--seed N]
env:   WORK (work dir, default /tmp/protocol), BIN (default target/debug/tiergate),
       HEADS (default models/heads.json; --heads wins)
out:   $WORK/<tag>/protocol.json (every figure) and a markdown table on stdout (progress on stderr);
       the default tag is <data>-<heads>-<heads md5>-<cal|nocal>. CAL/UNCAL go to $WORK/splits,
       scores and the score run's log to $WORK/cache. Scoring all three dev sources with a cold
       encoder cache takes about 30 minutes on 2 cores (mmlu_pro 23); the analysis, seconds.
"""
import argparse, gzip, hashlib, json, math, os, random, re, subprocess, sys, time
from collections import Counter, defaultdict
from itertools import combinations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["alpaca_eval2_wgpt4t", "mmlu_pro", "routerbench_0shot"]
CAL_FRAC, TUNE_FRAC = 0.2, 0.2
COVERAGE = 0.95      # share of the calibration prompts a tier candidate must have rows for
MAX_MIDS = 2         # front models between the cheapest and the best
TARGET = 0.98        # quality a pick must hold on its picking part, as a share of the best tier's
HOLD = 0.97          # quality a cross-fitted half must hold for its saving to count
PASS = 0.5           # label: score >= PASS
K, PRIOR = 10, 2.0   # kNN neighbours and pseudo-count of the prior toward the calibration mean
BINS = 15            # ECE bins
ALWAYS_BEST = "always-best"
ESCALATE_BELOW = 0.3  # decide::ESCALATE_BELOW
MAX_ESCALATIONS = 2   # the embedded config's gateway.max_escalations
POLICIES = ["cascade", "cascade+peers", "probe+peers", "consensus", "route", "route+cascade", "knn",
            "random", "picked"]
CONSENSUS_MODELS = 6  # candidates the consensus policy's probe sets are drawn from
# What an operator picks among on its labelled traffic: the policy and its threshold together.
PICKED_FROM = ["cascade", "consensus", "route", "route+cascade"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def unit(s, salt=""):
    """Stable uniform [0, 1) from md5."""
    return int(hashlib.md5((salt + s).encode()).hexdigest()[:8], 16) / 2**32


SPLIT_SALT = ""  # --seed N sets "seed:N:": another draw of the parts and halves


CAL_FRAC_USED = CAL_FRAC  # --cal-frac


def part_of(pid):
    x = unit(pid, SPLIT_SALT)
    c = CAL_FRAC_USED
    return "cal" if x < c else "tune" if x < c + TUNE_FRAC else "test"


def half_of(pid):
    return "A" if unit(pid, SPLIT_SALT + "half:") < 0.5 else "B"


def file_md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mean(v):
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else None


# ---------------------------------------------------------------- scoring (tiergate score)

def write_jsonl(path, rows):
    tmp = path + ".part"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def score_rows(src, cal, uncal, a):
    """p_route / p_verify per uncalibrated row (same order), from the cache or a fresh run."""
    mode = ("nocal" if a.no_calibration else "cal") + ("-nomem" if a.no_memory else "")
    # The binary is part of the key: scores of an older build are not reused.
    key = f"{src}-{a.data_tag}-{a.heads_md5[:12]}-{file_md5(a.bin)[:8]}-{mode}"
    cache = os.path.join(a.work, "cache")
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, key + ".jsonl")
    want = [(r["prompt_id"], r["model"]) for r in uncal]
    info = {"key": key, "cached": True, "seconds": None, "log": os.path.join(cache, key + ".log"),
            "cmd": None}
    if os.path.exists(out):
        got = [json.loads(l) for l in open(out)]
        # Scores written before `final_answer` existed are re-made (the peer policies read it).
        if [(g["prompt_id"], g["model"]) for g in got] == want and all("final_answer" in g for g in got):
            log(f"{src}: scores from cache {out}")
            try:  # the scoring run's own time, from its log
                done = [l for l in open(info["log"]) if l.startswith("scored ")]
                info["seconds"] = float(re.search(r" in ([0-9.]+)s", done[-1]).group(1))
            except (OSError, IndexError, AttributeError):
                pass
            return got, info
        log(f"{src}: cached {out} does not match the rows; rescoring")
    split = os.path.join(a.work, "splits", f"{src}-{a.data_tag}")
    os.makedirs(split, exist_ok=True)
    cal_p, uncal_p = os.path.join(split, "cal.jsonl"), os.path.join(split, "uncal.jsonl")
    write_jsonl(cal_p, cal)
    write_jsonl(uncal_p, uncal)
    cmd = [a.bin, "score", "--heads", a.heads, "--data", uncal_p, "--out", out + ".run",
           "--cache-dir", os.path.join(ROOT, "models", "cache")]
    if not a.no_calibration:
        cmd += ["--calibration", cal_p]
    if a.no_memory:
        cmd += ["--no-memory"]
    log(f"{src}: scoring {len(uncal)} rows ({'no calibration' if a.no_calibration else f'{len(cal)} calibration rows'}): {' '.join(cmd)}")
    t0 = time.time()
    with open(info["log"], "w") as lf:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=lf, stderr=subprocess.STDOUT).returncode
    info.update(cached=False, seconds=round(time.time() - t0, 1), cmd=cmd)
    if rc != 0:
        sys.exit(f"{src}: tiergate score failed (exit {rc}); see {info['log']}")
    got = [json.loads(l) for l in open(out + ".run")]
    if [(g["prompt_id"], g["model"]) for g in got] != want:
        sys.exit(f"{src}: score output does not match its input rows ({out}.run)")
    os.replace(out + ".run", out)
    log(f"{src}: scored in {info['seconds']} s")
    return got, info


# ---------------------------------------------------------------- tiers

def model_stats(cal):
    """Per model of the calibration rows: mean cost, mean score and prompts answered."""
    acc = defaultdict(lambda: [0.0, 0.0, set()])
    for r in cal:
        e = acc[r["model"]]
        e[0] += r["cost_usd"]; e[1] += r["score"]; e[2].add(r["prompt_id"])
    return {m: {"model": m, "cost": c / len(ps), "quality": s / len(ps), "prompts": len(ps)}
            for m, (c, s, ps) in acc.items()}


def choose_tiers(cal):
    prompts = {r["prompt_id"] for r in cal}
    stats = model_stats(cal)
    cands = [st for st in stats.values() if st["prompts"] >= COVERAGE * len(prompts)]
    cands.sort(key=lambda st: (st["cost"], -st["quality"], st["model"]))
    front = []
    for st in cands:  # cost ascending: on the front iff better than everything cheaper
        if not front or st["quality"] > front[-1]["quality"]:
            front.append(st)
    if len(front) <= 2 + MAX_MIDS:
        return front, front
    cheap, best, mids = front[0], front[-1], front[1:-1]
    lc = lambda st: st["cost"]  # spread linearly in cost (log(cost) would pick cheaper mids)
    chosen = []
    for k in range(1, MAX_MIDS + 1):
        goal = lc(cheap) + (lc(best) - lc(cheap)) * k / (MAX_MIDS + 1)
        left = [m for m in mids if m not in chosen]
        chosen.append(min(left, key=lambda m: (abs(lc(m) - goal), m["cost"])))
    tier = [cheap] + sorted(chosen, key=lambda m: m["cost"]) + [best]
    return tier, front


# ---------------------------------------------------------------- kNN baseline

TOKEN = re.compile(r"(?u)\b\w\w+\b")


def tfidf(texts, idf=None):
    docs = [Counter(TOKEN.findall(t.lower())) for t in texts]
    if idf is None:
        df = Counter(w for d in docs for w in d)
        n = len(docs)
        idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}
    vecs = []
    for d in docs:
        v = {w: (1 + math.log(c)) * idf[w] for w, c in d.items() if w in idf}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        vecs.append({w: x / norm for w, x in v.items()})
    return vecs, idf


def knn_scores(cal, uncal_prompts, models):
    """{(prompt_id, model): p} for every uncalibrated prompt and each model in `models`."""
    text, scores = {}, defaultdict(dict)
    for r in cal:
        text[r["prompt_id"]] = r["prompt"]
        scores[r["prompt_id"]][r["model"]] = r["score"]
    cal_ids = sorted(text)
    cvec, idf = tfidf([text[p] for p in cal_ids])
    post = defaultdict(list)
    for i, v in enumerate(cvec):
        for w, x in v.items():
            post[w].append((i, x))
    prior = {m: mean([s[m] for s in scores.values() if m in s]) or 0.0 for m in models}
    qids = sorted(uncal_prompts)
    qvec, _ = tfidf([uncal_prompts[q] for q in qids], idf)
    out = {}
    for q, v in zip(qids, qvec):
        sim = defaultdict(float)
        for w, x in v.items():
            for i, y in post[w]:
                sim[i] += x * y
        nbrs = sorted(range(len(cal_ids)), key=lambda i: (-sim.get(i, 0.0), cal_ids[i]))[:K]
        for m in models:
            got = [scores[cal_ids[i]][m] for i in nbrs if m in scores[cal_ids[i]]]
            out[(q, m)] = (sum(got) + PRIOR * prior[m]) / (len(got) + PRIOR)
    return out


# ---------------------------------------------------------------- metrics

def auroc(p, y):
    n1 = sum(y); n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return None
    pairs = sorted(zip(p, y), key=lambda t: t[0])
    s, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        rank = (i + j) / 2 + 1
        s += rank * sum(yy for _, yy in pairs[i:j + 1])
        i = j + 1
    return (s - n1 * (n1 + 1) / 2) / (n1 * n0)


def ece(p, s, b=BINS):
    if not p:
        return None
    bins = [[0.0, 0.0, 0] for _ in range(b)]
    for pp, ss in zip(p, s):
        k = min(max(int(pp * b), 0), b - 1)
        bins[k][0] += pp; bins[k][1] += ss; bins[k][2] += 1
    return sum(abs(a - c) for a, c, _ in bins) / len(p)


def ece_floor(p, draws=200, b=BINS):
    """The ECE a perfectly calibrated p would show on these rows: labels drawn as Bernoulli(p)
    (seeded), the mean over draws. An ECE near it is all the rows can resolve."""
    if not p:
        return None
    rng = random.Random(13)
    return mean([ece(p, [float(rng.random() < pp) for pp in p], b) for _ in range(draws)])


def quality_block(rows, tier_models):
    """Pooled and within-model AUROC / ECE over rows {model, score, pr, pv, knn}."""
    def pooled(key):
        rs = [r for r in rows if r[key] is not None]
        return {"auroc": auroc([r[key] for r in rs], [int(r["score"] >= PASS) for r in rs]),
                "ece": ece([r[key] for r in rs], [r["score"] for r in rs]),
                "ece_floor": ece_floor([r[key] for r in rs]), "rows": len(rs)}
    out = {k: pooled(k) for k in ("pr", "pv", "knn")}
    for k in ("pr", "pv", "knn"):
        w = {}
        for m in tier_models:
            rs = [r for r in rows if r["model"] == m and r[k] is not None]
            w[m] = auroc([r[k] for r in rs], [int(r["score"] >= PASS) for r in rs])
        out[k]["within"] = w
        out[k]["within_mean"] = mean(list(w.values()))
    return {"router": out["pr"], "verifier": out["pv"], "knn": out["knn"]}


# ---------------------------------------------------------------- replay


def escalation_pick(p, j, v):
    """`decide::escalation_pick`: of the tiers above j, the one with the highest p_route (the
    cheaper on ties), when above p[j] or when the answer's p_verify v is under ESCALATE_BELOW
    times it; else None (the answer ships)."""
    up = [k for k in range(j + 1, len(p)) if p[k] == p[k]]
    if not up:
        return None
    k = max(up, key=lambda i: (p[i], -i))
    return k if p[k] > p[j] or v <= 0 or v < ESCALATE_BELOW * p[k] else None

class Replay:
    """Prompts x tier models (cost order, best last) of the uncalibrated prompts."""

    def __init__(self, prompts, consensus_sets=()):
        # list of dicts: id, part, half, score[], cost[], pr[], pv[], knn[], rnd[], fa[], and
        # all = {model: (score, cost, final answer)} over the consensus candidates
        self.p = prompts
        self.m = len(prompts[0]["score"]) if prompts else 0
        self.consensus_sets = list(consensus_sets)

    def sub(self, pred):
        return [x for x in self.p if pred(x)]

    def best(self, ps):
        j = self.m - 1
        return mean([x["cost"][j] for x in ps]), mean([x["score"][j] for x in ps])

    def plan(self, policy, x, t):
        """(models called, model shipped) for one prompt at threshold t."""
        last = self.m - 1
        if t == ALWAYS_BEST:
            return [last], last
        if policy == "oracle":
            j = next((j for j in range(self.m) if x["score"][j] >= PASS), last)
            return [j], j
        if policy == "cascade":
            for j in range(self.m):
                v = x["pv"][j]
                if j == last or (v is not None and v >= t):
                    return list(range(j + 1)), j
        if policy == "route+cascade":
            # The gateway's flow (src/gateway/cascade.rs): start at the cheapest tier Route
            # accepts, then Verify gates each answer and a rejected one goes where Verify
            # names (escalation_pick; none: it ships), at most MAX_ESCALATIONS times. One
            # threshold serves both, so the pick has one axis like every other policy. An
            # answer without a p_verify (no response in the row) ships unverified, as the
            # gateway ships an answer Verify cannot read.
            j = next((j for j in range(self.m) if x["pr"][j] >= t), last)
            called = [j]
            while j != last and len(called) <= MAX_ESCALATIONS:
                v = x["pv"][j]
                if v is None or v >= t:
                    break
                k = escalation_pick(x["pr"], j, v)
                if k is None:
                    break
                j = k
                called.append(j)
            return called, j
        if policy in ("cascade+peers", "probe+peers"):
            # Verify's rule with peers (decide::ships_with_peers): ship when p_verify >= t or
            # an answer already bought commits to the same final answer. probe+peers buys
            # the second tier's answer up front as the first one's peer.
            # t = (threshold, threshold when a peer agrees).
            t_alone, t_agree = t
            fa = x["fa"]
            bought = {0, 1} if policy == "probe+peers" and self.m > 1 else {0}
            for j in range(self.m):
                bought.add(j)
                v = x["pv"][j]
                agree = fa[j] is not None and any(fa[i] == fa[j] for i in bought if i != j)
                if j == last or (v is not None and (v >= t_alone or (agree and v >= t_agree))):
                    return sorted(bought), j
        key = {"route": "pr", "knn": "knn", "random": "rnd"}[policy]
        j = next((j for j in range(self.m) if x[key][j] >= t), last)
        return [j], j

    def outcome(self, policy, x, t):
        """(cost paid, score shipped, calls made) for one prompt at threshold t."""
        if policy == "picked" and t != ALWAYS_BEST:
            return self.outcome(t[0], x, t[1])
        if policy == "consensus" and t != ALWAYS_BEST:
            # t = (probe models, how many must agree): buy the probes' answers together; ship
            # the cheapest of `need` that commit to the same final answer, else call the best
            # tier too. A probe without a row for this prompt counts as no answer, unpaid.
            probe, need = t
            got = [x["all"].get(m) for m in probe]
            cost = sum(g[1] for g in got if g)
            votes = Counter(g[2] for g in got if g and g[2] is not None)
            top = votes.most_common(1)
            if top and top[0][1] >= need:
                return cost, next(g[0] for g in got if g and g[2] == top[0][0]), len(probe)
            last = self.m - 1
            return cost + x["cost"][last], x["score"][last], len(probe) + 1
        called, j = self.plan(policy, x, t)
        return sum(x["cost"][c] for c in called), x["score"][j], len(called)

    def point(self, policy, ps, t):
        cost = qual = calls = 0.0
        for x in ps:
            c, q, k = self.outcome(policy, x, t)
            cost += c
            qual += q
            calls += k
        n = max(len(ps), 1)
        return cost / n, qual / n, calls / n

    def apply(self, policy, ps, t):
        c, q, calls = self.point(policy, ps, t)
        bc, bq = self.best(ps)
        return {"threshold": t, "saving": 1 - c / bc, "quality_ratio": q / bq if bq else None,
                "cost": c, "quality": q, "calls": calls, "prompts": len(ps)}

    def grid(self, policy, ps):
        if policy == "consensus":
            return self.consensus_sets
        if policy == "picked":
            return [(p, t) for p in PICKED_FROM for t in self.grid(p, ps)]
        keys = {"cascade": ["pv"], "cascade+peers": ["pv"], "probe+peers": ["pv"], "route": ["pr"],
                "route+cascade": ["pr", "pv"], "knn": ["knn"], "random": ["rnd"]}[policy]
        vals = sorted(v for x in ps for key in keys for v in x[key] if v is not None)
        g = {i / 100 for i in range(101)}
        if vals:
            g |= {vals[min(int(q / 100 * len(vals)), len(vals) - 1)] for q in range(1, 100)}
        if policy in ("cascade+peers", "probe+peers"):
            # A coarse second axis: the bar an answer a peer agrees with must reach.
            # (a, a) is the plain cascade, so peers can only add options.
            return sorted({(a, b) for a in g for b in [a] + [i / 10 for i in range(11)] if b <= a})
        return sorted(g)

    def pick(self, policy, ps):
        """Largest saving holding TARGET of the best tier's quality on ps (ties: the higher
        quality, then the higher threshold); always-best (saving 0) is always a candidate."""
        bc, bq = self.best(ps)
        best = (0.0, 1.0, math.inf, ALWAYS_BEST)
        # Ties go to the later grid point: the higher threshold where thresholds are numbers.
        for i, t in enumerate(self.grid(policy, ps)):
            c, q, _ = self.point(policy, ps, t)
            if q >= TARGET * bq:
                cand = (1 - c / bc, q / bq, i, t)
                if cand[:3] > best[:3]:
                    best = cand
        return best[3]


def consensus_sets(cal, tier):
    """Probe sets the consensus policy picks among, from the calibration rows: up to six models
    cheaper than half the best tier's mean cost, covering >= COVERAGE of the calibration
    prompts, the best-scoring first; every pair (both must agree) and every triple (all three,
    or two of three)."""
    n = len({r["prompt_id"] for r in cal})
    stats, best = model_stats(cal), tier[-1]
    cands = sorted(((st["quality"], m) for m, st in stats.items()
                    if st["prompts"] >= COVERAGE * n and st["cost"] < 0.5 * best["cost"]
                    and m != best["model"]), reverse=True)[:CONSENSUS_MODELS]
    # Cheapest first, as the gateway asks them: the cheapest agreeing answer ships.
    ms = sorted((m for _, m in cands), key=lambda m: (stats[m]["cost"], m))
    sets = [((a, b), 2) for a, b in combinations(ms, 2)]
    sets += [(t, need) for t in combinations(ms, 3) for need in (3, 2)]
    return sets


def fmt_t(t):
    if isinstance(t, tuple) and t and isinstance(t[0], str):  # picked: (policy, its threshold)
        return [t[0], fmt_t(t[1])]
    if isinstance(t, tuple) and t and isinstance(t[0], tuple):
        return [list(t[0]), t[1]]
    if isinstance(t, tuple):
        return [round(v, 6) for v in t]
    return t if t == ALWAYS_BEST else round(t, 6)


def evaluate_policy(rp, policy):
    tune, test = rp.sub(lambda x: x["part"] == "tune"), rp.sub(lambda x: x["part"] == "test")
    A, B = rp.sub(lambda x: x["half"] == "A"), rp.sub(lambda x: x["half"] == "B")
    if policy == "oracle":
        pick = lambda ps: None
    else:
        pick = lambda ps: rp.pick(policy, ps)
    t_tune = pick(tune)
    tt = rp.apply(policy, test, t_tune)
    halves = {}
    for name, on, to in (("A->B", A, B), ("B->A", B, A)):
        t = pick(on)
        r = rp.apply(policy, to, t)
        r["counted_saving"] = r["saving"] if policy == "oracle" or r["quality_ratio"] >= HOLD else 0.0
        r["threshold"] = fmt_t(t) if t is not None else None
        halves[name] = r
    t_all = pick(rp.p)
    ins = rp.apply(policy, rp.p, t_all)
    tt["threshold"] = fmt_t(t_tune) if t_tune is not None else None
    ins["threshold"] = fmt_t(t_all) if t_all is not None else None
    return {
        "tune_to_test": tt,
        "cross_fit": {"saving": mean([h["counted_saving"] for h in halves.values()]),
                      "quality_ratios": [halves["A->B"]["quality_ratio"], halves["B->A"]["quality_ratio"]],
                      "halves": halves},
        "in_sample": ins,
    }


def run_source(src, rows, a):
    cal = [r for r in rows if part_of(r["prompt_id"]) == "cal"]
    uncal = [r for r in rows if part_of(r["prompt_id"]) != "cal"]
    n_cal = len({r["prompt_id"] for r in cal})
    tier, front = choose_tiers(cal)
    tier_models = [t["model"] for t in tier]
    log(f"{src}: {n_cal} calibration prompts, {len({r['prompt_id'] for r in uncal})} uncalibrated; "
        f"tiers {tier_models}")
    got, info = score_rows(src, cal, uncal, a)
    uprompts = {r["prompt_id"]: r["prompt"] for r in uncal}
    knn = knn_scores(cal, uprompts, tier_models)
    csets = consensus_sets(cal, tier)
    cmodels = {m for ms, _ in csets for m in ms}
    # per-row view of the tier models' uncalibrated rows
    qrows, by_prompt, others = [], defaultdict(dict), defaultdict(dict)
    for r, g in zip(uncal, got):
        if r["model"] in cmodels:
            others[r["prompt_id"]][r["model"]] = (r["score"], r["cost_usd"], g.get("final_answer"))
        if r["model"] not in tier_models:
            continue
        q = {"model": r["model"], "score": r["score"], "cost": r["cost_usd"], "pr": g["p_route"],
             "pv": g["p_verify"], "knn": knn[(r["prompt_id"], r["model"])],
             "rnd": unit(r["prompt_id"], "random:" + r["model"] + ":"),
             "fa": g.get("final_answer")}
        qrows.append(q)
        by_prompt[r["prompt_id"]][r["model"]] = q
    prompts, skipped = [], 0
    for pid in sorted(by_prompt):
        ms = by_prompt[pid]
        if any(m not in ms for m in tier_models):
            skipped += 1
            continue
        x = {"id": pid, "part": part_of(pid), "half": half_of(pid)}
        for k in ("score", "cost", "pr", "pv", "knn", "rnd", "fa"):
            x[k] = [ms[m][k] for m in tier_models]
        x["all"] = others[pid]
        prompts.append(x)
    skipped += len(uprompts) - len(by_prompt)
    rp = Replay(prompts, csets)
    count = lambda f: sum(1 for x in prompts if f(x))
    res = {
        "source": src,
        "calibration": {"prompts": n_cal, "rows": len(cal)},
        "uncalibrated": {"prompts": len(prompts), "rows": len(uncal), "skipped_prompts": skipped,
                         "tune": count(lambda x: x["part"] == "tune"),
                         "test": count(lambda x: x["part"] == "test"),
                         "A": count(lambda x: x["half"] == "A"),
                         "B": count(lambda x: x["half"] == "B")},
        "tiers": tier,
        "front": [f["model"] for f in front],
        "consensus_candidates": sorted(cmodels),
        "score_run": info,
        "score_quality": quality_block(qrows, tier_models),
        "single_models": {m: {"cost": mean([x["cost"][j] for x in prompts]),
                              "quality": mean([x["score"][j] for x in prompts])}
                          for j, m in enumerate(tier_models)},
        "policies": {p: evaluate_policy(rp, p) for p in POLICIES + ["oracle"]},
    }
    return res


# ---------------------------------------------------------------- report

def pct(v, d=1):
    return "n/a" if v is None else f"{100 * v:.{d}f}%"


def num(v, d=3):
    return "n/a" if v is None else f"{v:.{d}f}"


def short(v):
    return "n/a" if v is None else f"{v:.2f}".lstrip("0") if v >= 0 else f"{v:.2f}"


XF_COLUMNS = ("cascade", "cascade+peers", "probe+peers", "consensus", "route", "route+cascade", "knn",
              "picked", "oracle", "random")


def table(results):
    head = ["source", "cal prompts", "test prompts", "tiers", "router AUROC pooled / within",
            "verifier AUROC / ECE", "kNN within AUROC",
            "XF cascade", "XF cascade+peers", "XF probe+peers", "XF consensus", "XF route",
            "XF route+cascade", "XF kNN", "XF picked", "XF oracle", "XF random",
            "T→T cascade", "T→T route", "T→T kNN"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]

    def xf(r, p):
        c = r["policies"][p]["cross_fit"]
        qa, qb = c["quality_ratios"]
        return f"{pct(c['saving'])} ({pct(qa, 0)[:-1]}/{pct(qb, 0)[:-1]})"

    def tt(r, p):
        t = r["policies"][p]["tune_to_test"]
        return f"{pct(t['saving'])} ({pct(t['quality_ratio'])[:-1]})"

    for r in results:
        sq = r["score_quality"]
        w = lambda k: " ".join(short(v) for v in sq[k]["within"].values())
        lines.append("| " + " | ".join([
            r["source"], str(r["calibration"]["prompts"]), str(r["uncalibrated"]["test"]),
            str(len(r["tiers"])),
            f"{num(sq['router']['auroc'])} / {w('router')}",
            f"{num(sq['verifier']['auroc'])} / {num(sq['verifier']['ece'])}",
            w("knn"),
            *[xf(r, p) for p in XF_COLUMNS],
            *[tt(r, p) for p in ("cascade", "route", "knn")]]) + " |")
    if len(results) > 1:
        M = lambda f: mean([f(r) for r in results])
        sq = lambda r: r["score_quality"]

        def mxf(p):
            s = M(lambda r: r["policies"][p]["cross_fit"]["saving"])
            qa = M(lambda r: r["policies"][p]["cross_fit"]["quality_ratios"][0])
            qb = M(lambda r: r["policies"][p]["cross_fit"]["quality_ratios"][1])
            return f"{pct(s)} ({pct(qa, 0)[:-1]}/{pct(qb, 0)[:-1]})"

        def mtt(p):
            s = M(lambda r: r["policies"][p]["tune_to_test"]["saving"])
            q = M(lambda r: r["policies"][p]["tune_to_test"]["quality_ratio"])
            return f"{pct(s)} ({pct(q)[:-1]})"

        lines.append("| " + " | ".join([
            "**macro mean**", num(M(lambda r: r["calibration"]["prompts"]), 0),
            num(M(lambda r: r["uncalibrated"]["test"]), 0), num(M(lambda r: len(r["tiers"])), 1),
            f"{num(M(lambda r: sq(r)['router']['auroc']))} / {short(M(lambda r: sq(r)['router']['within_mean']))} (mean)",
            f"{num(M(lambda r: sq(r)['verifier']['auroc']))} / {num(M(lambda r: sq(r)['verifier']['ece']))}",
            f"{short(M(lambda r: sq(r)['knn']['within_mean']))} (mean)",
            *[mxf(p) for p in XF_COLUMNS],
            *[mtt(p) for p in ("cascade", "route", "knn")]]) + " |")
    return "\n".join(lines)


def details(results, a):
    out = ["", f"Heads {a.heads} (md5 {a.heads_md5[:12]}), data {a.data}, "
           f"{'no calibration' if a.no_calibration else 'calibrated on 20% of prompts'}; "
           "XF = cross-fitted saving (quality ratio A→B / B→A, % of the best tier), a half counts 0 "
           f"below {HOLD:.0%}; T→T = picked on tune, applied to test (test quality ratio). "
           "Within-model AUROCs are per tier model, cheapest first.", ""]
    for r in results:
        sq = r["score_quality"]
        tiers = ", ".join(f"{t['model']} ({t['cost']:.2e} $, {t['quality']:.3f})" for t in r["tiers"])
        out.append(f"- {r['source']}: tiers {tiers}. Router ECE {num(sq['router']['ece'])} "
                   f"(floor {num(sq['router']['ece_floor'])}), verifier ECE "
                   f"{num(sq['verifier']['ece'])} (floor {num(sq['verifier']['ece_floor'])}; the "
                   f"floor: a perfectly calibrated p on these {sq['verifier']['rows']} rows), "
                   f"verifier within {' '.join(short(v) for v in sq['verifier']['within'].values())}, "
                   f"kNN pooled AUROC {num(sq['knn']['auroc'])}; "
                   f"skipped uncalibrated prompts {r['uncalibrated']['skipped_prompts']}. In-sample at "
                   f"{TARGET:.0%}: " + ", ".join(
                       f"{p} {pct(r['policies'][p]['in_sample']['saving'])}" for p in POLICIES + ["oracle"]))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description="Issue 13's evaluation protocol, per source.")
    ap.add_argument("--sources", nargs="+", default=SOURCES)
    ap.add_argument("--heads", default=os.environ.get("HEADS", "models/heads.json"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--no-calibration", action="store_true")
    ap.add_argument("--no-memory", action="store_true",
                    help="score --no-memory: calibrate without the memory of labelled prompts")
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "dev.jsonl.gz"))
    ap.add_argument("--cal-frac", type=float, default=CAL_FRAC,
                    help="share of the prompts labelled for calibration (the sealed set's: 0.2); "
                         "tune keeps 0.2, test the rest: how each router gains from more labels")
    ap.add_argument("--seed", type=int, default=0,
                    help="another draw of the calibration/tune/test parts and halves (0: the "
                         "documented one); averaging a few seeds steadies a lever's comparison")
    a = ap.parse_args()
    a.work = os.environ.get("WORK", "/tmp/protocol")
    a.bin = os.path.abspath(os.environ.get("BIN", os.path.join(ROOT, "target", "debug", "tiergate")))
    if not os.path.exists(a.heads):  # relative to the repository root when not to the cwd
        a.heads = os.path.join(ROOT, a.heads)
    a.heads = os.path.abspath(a.heads)
    a.data = os.path.abspath(a.data)
    a.heads_md5 = file_md5(a.heads)
    stem = os.path.basename(a.data).split(".")[0]
    a.data_tag = f"{stem}-{file_md5(a.data)[:8]}"
    if not 0.0 < a.cal_frac <= 1.0 - TUNE_FRAC - 0.1:
        sys.exit(f"--cal-frac {a.cal_frac}: must leave tune ({TUNE_FRAC}) and a test part")
    if a.cal_frac != CAL_FRAC:
        global CAL_FRAC_USED
        CAL_FRAC_USED = a.cal_frac
        a.data_tag += f"-cal{a.cal_frac:g}"
    if a.seed:
        global SPLIT_SALT
        SPLIT_SALT = f"seed:{a.seed}:"
        a.data_tag += f"-seed{a.seed}"
    mode = ("nocal" if a.no_calibration else "cal") + ("-nomem" if a.no_memory else "")
    a.tag = a.tag or (f"{stem}-{os.path.basename(a.heads).rsplit('.', 1)[0]}-{a.heads_md5[:8]}-{mode}"
                      + (f"-cal{a.cal_frac:g}" if a.cal_frac != CAL_FRAC else "")
                      + (f"-seed{a.seed}" if a.seed else ""))
    by_src = defaultdict(list)
    with gzip.open(a.data, "rt") if a.data.endswith(".gz") else open(a.data) as f:
        for line in f:
            r = json.loads(line)
            if r["source"] in a.sources:
                by_src[r["source"]].append(r)
    results = []
    for s in a.sources:
        if not by_src[s]:
            sys.exit(f"{s}: no rows in {a.data}")
        t0 = time.time()
        res = run_source(s, by_src[s], a)
        res["seconds"] = round(time.time() - t0, 1)
        results.append(res)
    d = os.path.join(a.work, a.tag)
    os.makedirs(d, exist_ok=True)
    doc = {"protocol": "issue 13", "data": a.data, "heads": a.heads, "heads_md5": a.heads_md5,
           "bin": a.bin, "bin_md5": file_md5(a.bin), "calibration": not a.no_calibration,
           "constants": {"cal_frac": CAL_FRAC_USED, "tune_frac": TUNE_FRAC, "coverage": COVERAGE,
                         "max_mids": MAX_MIDS, "target": TARGET, "hold": HOLD, "pass": PASS,
                         "k": K, "prior": PRIOR, "bins": BINS},
           "sources": results}
    with open(os.path.join(d, "protocol.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(table(results))
    print(details(results, a))
    log(f"wrote {os.path.join(d, 'protocol.json')}")


if __name__ == "__main__":
    main()
