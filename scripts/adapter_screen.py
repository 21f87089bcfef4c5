#!/usr/bin/env python3
"""Screen for issue 13's encoder lever: does fine-tuning MiniLM for the router (a LoRA adapter,
all models' outcomes per prompt as targets) help on a task it never saw?

Offline and before any Rust, like the other screens in models/EVAL.md. Both arms share one
router of the heads' form (logit = w.e + c + u_m.(P e) + b_m over the unit mean-pooled
embedding e):
- frozen: the base weights;
- adapter: LoRA (rank R) on every linear layer of the top L encoder layers, trained jointly
  with the router, which starts from the frozen arm's.
Training rows: train.jsonl.gz without the left-out task. Early stopping: dev rows without it.
New traffic: the left-out task's train and dev rows (neither arm saw them). Reported on that
traffic, mean over seeds: pooled AUROC and log-loss with the trained abilities, and after a
calibration like `score --calibration` (20% of the task's prompts by md5(seed, prompt) refit
each model's (u_m, b_m) with an L2 pull towards its trained values) the within-model AUROC
(what a threshold decision uses) and log-loss on the other 80%.

--rank 0 is the control: the router's continued training exactly as in the adapter arm
(mini-batch Adam, no penalty on P), with no adapter, so that the encoder's part can be told
from the router's.

usage: adapter_screen.py SOURCE TASK [--rank 8] [--layers 3] [--epochs 3] [--max-len 256]
needs: torch, safetensors, tokenizers, numpy (e.g. a venv: pip install torch safetensors
       tokenizers numpy); reads models/base and ../shared/data.
"""
import argparse, gzip, hashlib, json, math, os, random, sys, time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.manual_seed(0)
random.seed(0)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def load_rows(data, source, task):
    train, dev, new = [], [], []
    for split in ("train", "dev"):
        with gzip.open(os.path.join(data, f"{split}.jsonl.gz"), "rt") as f:
            for line in f:
                r = json.loads(line)
                row = (r["prompt"], r["model"], float(r["score"]))
                if r["source"] == source and r["task"] == task:
                    new.append(row)
                elif split == "train":
                    train.append(row)
                else:
                    dev.append(row)
    return train, dev, new


def tokenize(tok, prompts, max_len):
    """Head + tail truncation like src/model/tokenize.rs: keep the first half and the last."""
    out = []
    body = max_len - 2
    for p in prompts:
        ids = tok.encode(p, add_special_tokens=False).ids
        if len(ids) > body:
            head = (body + 1) // 2
            ids = ids[:head] + ids[len(ids) - (body - head):]
        out.append([101] + ids + [102])
    return out


class Lora(torch.nn.Module):
    def __init__(self, w, b, rank, alpha):
        super().__init__()
        self.w = torch.tensor(w)
        self.b = torch.tensor(b)
        self.rank = rank
        if rank:
            self.a = torch.nn.Parameter(torch.randn(rank, w.shape[1]) / math.sqrt(w.shape[1]))
            self.bb = torch.nn.Parameter(torch.zeros(w.shape[0], rank))
            self.scale = alpha / rank

    def forward(self, x):
        y = F.linear(x, self.w, self.b)
        if self.rank:
            y = y + F.linear(F.linear(x, self.a), self.bb) * self.scale
        return y


class Layer(torch.nn.Module):
    def __init__(self, w, i, rank, alpha):
        super().__init__()
        p = f"encoder.layer.{i}."

        def lin(name):
            return Lora(w[p + name + ".weight"], w[p + name + ".bias"], rank, alpha)

        self.q, self.k, self.v = lin("attention.self.query"), lin("attention.self.key"), lin(
            "attention.self.value")
        self.o, self.fi, self.fo = lin("attention.output.dense"), lin("intermediate.dense"), lin(
            "output.dense")
        self.ln1 = (torch.tensor(w[p + "attention.output.LayerNorm.weight"]),
                    torch.tensor(w[p + "attention.output.LayerNorm.bias"]))
        self.ln2 = (torch.tensor(w[p + "output.LayerNorm.weight"]),
                    torch.tensor(w[p + "output.LayerNorm.bias"]))

    def forward(self, x, mask):
        bsz, n, h = x.shape

        def heads(t):
            return t.view(bsz, n, 12, h // 12).transpose(1, 2)

        att = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                             attn_mask=mask)
        att = att.transpose(1, 2).reshape(bsz, n, h)
        x = F.layer_norm(x + self.o(att), (h,), *self.ln1, eps=1e-12)
        return F.layer_norm(x + self.fo(F.gelu(self.fi(x))), (h,), *self.ln2, eps=1e-12)


def embed_input(w, ids):
    n = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = torch.tensor(x)
    return F.layer_norm(x, (384,), torch.tensor(w["embeddings.LayerNorm.weight"]),
                        torch.tensor(w["embeddings.LayerNorm.bias"]), eps=1e-12)


def batches(lengths, idx, max_tokens):
    """Length-sorted batches of at most max_tokens padded tokens."""
    idx = sorted(idx, key=lambda i: lengths[i])
    out, cur = [], []
    for i in idx:
        if cur and (len(cur) + 1) * lengths[i] > max_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def padded(states, ids):
    """states[ids] as one zero-padded f32 batch, its valid-token mask and attention mask."""
    n = max(states[i].shape[0] for i in ids)
    x = torch.zeros(len(ids), n, 384)
    valid = torch.zeros(len(ids), n, dtype=torch.bool)
    for j, i in enumerate(ids):
        x[j, : states[i].shape[0]] = states[i].float()
        valid[j, : states[i].shape[0]] = True
    mask = torch.zeros(len(ids), 1, 1, n)
    mask.masked_fill_(~valid[:, None, None, :], -1e4)
    return x, valid, mask


def run_layers(layers, states, ids):
    x, valid, mask = padded(states, ids)
    for layer in layers:
        x = layer(x, mask)
    pooled = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    return F.normalize(pooled, dim=-1)


class Router(torch.nn.Module):
    def __init__(self, models, k):
        super().__init__()
        self.index = {m: i for i, m in enumerate(models)}
        self.w = torch.nn.Linear(384, 1)
        self.p = torch.nn.Linear(384, k, bias=False)
        self.u = torch.nn.Parameter(torch.randn(len(models), k) * 0.1)
        self.b = torch.nn.Parameter(torch.zeros(len(models)))

    def parts(self, e):
        return self.w(e).squeeze(-1), self.p(e)

    def logit(self, e, mi):
        s, z = self.parts(e)
        return s + (z * self.u[mi]).sum(-1) + self.b[mi]


def auroc(y, p):
    y = np.asarray(y) >= 0.5
    if y.all() or (~y).all():
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    # average ranks over ties
    ps = np.asarray(p)[order]
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j + 2) / 2
        i = j + 1
    npos = y.sum()
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * (len(y) - npos)))


def bce(y, logit):
    y, logit = np.asarray(y), np.asarray(logit)
    return float(np.mean(np.logaddexp(0, logit) - y * logit))


def evaluate(router, emb, rows, pidx, seeds, l2):
    """Pooled figures with trained abilities; within-model figures after a 20% calibration."""
    with torch.no_grad():
        s, z = router.parts(emb)
    s, z = s.numpy(), z.numpy()
    u, b = router.u.detach().numpy(), router.b.detach().numpy()
    mi = np.array([router.index[m] for _, m, _ in rows])
    pi = np.array([pidx[p] for p, _, _ in rows])
    y = np.array([sc for _, _, sc in rows])
    raw = s[pi] + (z[pi] * u[mi]).sum(-1) + b[mi]
    out = {"pooled_auroc": auroc(y, raw), "logloss": bce(y, raw)}
    within, ll = [], []
    prompts = sorted(pidx)
    for seed in seeds:
        cal = {p for p in prompts if int(hashlib.md5(f"{seed}:{p}".encode()).hexdigest(), 16) % 5 == 0}
        iscal = np.array([p in cal for p, _, _ in rows])
        logits = np.empty(len(rows))
        for m in np.unique(mi):
            sel = mi == m
            c, t = sel & iscal, sel & ~iscal
            th = np.concatenate([u[m], [b[m]]]).astype(np.float64)
            prior = th.copy()
            x = np.concatenate([z[pi[c]], np.ones((c.sum(), 1))], 1).astype(np.float64)
            off = s[pi[c]].astype(np.float64)
            for _ in range(20):  # Newton on CE + l2/2 |th - prior|^2
                p = 1 / (1 + np.exp(-(off + x @ th)))
                g = x.T @ (p - y[c]) + l2 * (th - prior)
                hmat = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(th))
                th -= np.linalg.solve(hmat, g)
            logits[t] = s[pi[t]] + z[pi[t]] @ th[:-1] + th[-1]
        t = ~iscal
        ll.append(bce(y[t], logits[t]))
        within.append(np.nanmean([auroc(y[t & (mi == m)], logits[t & (mi == m)])
                                  for m in np.unique(mi)]))
    out["cal_logloss"] = float(np.mean(ll))
    out["cal_within_auroc"] = float(np.mean(within))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("task")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--l2", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    t0 = time.time()
    train, dev, new = load_rows(a.data, a.source, a.task)
    models = sorted({m for _, m, _ in train + dev + new})
    prompts = sorted({p for p, _, _ in train + dev + new})
    pidx = {p: i for i, p in enumerate(prompts)}
    tok = Tokenizer.from_file(os.path.join(ROOT, "models", "base", "tokenizer.json"))
    tok.no_truncation()  # the file truncates at 128 from the head; we keep head + tail
    tok.no_padding()
    ids = tokenize(tok, prompts, a.max_len)
    lengths = [len(x) for x in ids]
    w = load_file(os.path.join(ROOT, "models", "base", "model.safetensors"))
    log(f"rows train {len(train)} dev {len(dev)} new {len(new)}; prompts {len(prompts)}; "
        f"mean tokens {np.mean(lengths):.1f}")
    lower = [Layer(w, i, 0, 0) for i in range(6 - a.layers)]
    # The bottom layers stay frozen: their output is computed once and cached.
    states = [None] * len(prompts)
    with torch.no_grad():
        for bt in batches(lengths, range(len(prompts)), 8192):
            n = max(lengths[i] for i in bt)
            x = torch.zeros(len(bt), n, 384)
            valid = torch.zeros(len(bt), n, dtype=torch.bool)
            for j, i in enumerate(bt):
                x[j, : lengths[i]] = embed_input(w, ids[i])
                valid[j, : lengths[i]] = True
            mask = torch.zeros(len(bt), 1, 1, n).masked_fill_(~valid[:, None, None, :], -1e4)
            for layer in lower:
                x = layer(x, mask)
            for j, i in enumerate(bt):
                states[i] = x[j, : lengths[i]].clone()
    log(f"cached layer {6 - a.layers} states in {time.time() - t0:.0f} s")

    def by_prompt(rows):
        d = {}
        for p, m, sc in rows:
            d.setdefault(pidx[p], []).append((m, sc))
        return d

    tr, dv = by_prompt(train), by_prompt(dev)

    def encode_all(layers, idx):
        out = torch.zeros(len(prompts), 384)
        with torch.no_grad():
            for bt in batches(lengths, idx, 16384):
                out[bt] = run_layers(layers, states, bt)
        return out

    def loss_on(router, emb, d):
        tot, n = 0.0, 0
        with torch.no_grad():
            for pi, lst in d.items():
                mi = torch.tensor([router.index[m] for m, _ in lst])
                y = torch.tensor([sc for _, sc in lst])
                lg = router.logit(emb[pi].expand(len(lst), -1), mi)
                tot += F.binary_cross_entropy_with_logits(lg, y, reduction="sum").item()
                n += len(lst)
        return tot / n

    def flat(d):
        pi, mi, y = [], [], []
        for p, lst in d.items():
            for m, sc in lst:
                pi.append(p)
                mi.append(router.index[m])
                y.append(sc)
        return torch.tensor(pi), torch.tensor(mi), torch.tensor(y)

    # Arm 1: the frozen encoder. Its router trains on fixed embeddings (full batch).
    frozen_layers = [Layer(w, i, 0, 0) for i in range(6 - a.layers, 6)]
    emb0 = encode_all(frozen_layers, range(len(prompts)))
    router = Router(models, a.k)
    tpi, tmi, ty = flat(tr)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2, weight_decay=0)
    best, best_state = float("inf"), None
    for step in range(600):
        opt.zero_grad()
        lg = router.logit(emb0[tpi], tmi)
        loss = F.binary_cross_entropy_with_logits(lg, ty) + 1e-4 * (router.p.weight ** 2).sum()
        loss.backward()
        opt.step()
        if step % 20 == 19:
            v = loss_on(router, emb0, dv)
            if v < best:
                best, best_state = v, {k: t.clone() for k, t in router.state_dict().items()}
    router.load_state_dict(best_state)
    log(f"frozen: dev loss {best:.4f} ({time.time() - t0:.0f} s)")
    newp = {p: pidx[p] for p in {p for p, _, _ in new}}
    seeds = list(range(a.seeds))
    res = {"frozen": {"dev_loss": best, **evaluate(router, emb0, new, newp, seeds, a.l2)}}
    log(json.dumps(res["frozen"]))

    # Arm 2: LoRA on the top layers, trained with the router (started from arm 1's router).
    layers = [Layer(w, i, a.rank, a.alpha) for i in range(6 - a.layers, 6)]
    params = [p for l in layers for p in l.parameters()]
    groups = [{"params": list(router.parameters()), "lr": a.lr}]
    if params:  # --rank 0: the control, the same continued training with no adapter
        groups.append({"params": params, "lr": a.lr})
    opt = torch.optim.Adam(groups)
    tr_prompts = list(tr)
    arm = "adapter" if a.rank else "control"
    best_ad, best_ad_state = best, None
    for epoch in range(a.epochs):
        random.shuffle(tr_prompts)
        bts = batches(lengths, tr_prompts, 4096)
        random.shuffle(bts)
        for bt in bts:
            opt.zero_grad()
            e = run_layers(layers, states, bt)
            rows = [(j, router.index[m], sc) for j, p in enumerate(bt) for m, sc in tr[p]]
            j, mi, y = (torch.tensor(c) for c in zip(*rows))
            loss = F.binary_cross_entropy_with_logits(router.logit(e[j], mi), y.float())
            loss.backward()
            opt.step()
        emb = encode_all(layers, range(len(prompts)))
        v = loss_on(router, emb, dv)
        log(f"{arm} epoch {epoch}: dev loss {v:.4f} ({time.time() - t0:.0f} s)")
        if v < best_ad:
            best_ad = v
            best_ad_state = ({k: t.clone() for k, t in router.state_dict().items()},
                             [{k: t.clone() for k, t in l.state_dict().items()} for l in layers])
    # The last epoch too, picked or not: the control's figures at the adapter's epoch count.
    res[f"{arm}_last_epoch"] = {"dev_loss": v, **evaluate(router, emb, new, newp, seeds, a.l2)}
    if best_ad_state is None:
        log(f"{arm} never beat the frozen arm on dev")
        res[arm] = None
    else:
        router.load_state_dict(best_ad_state[0])
        for l, s in zip(layers, best_ad_state[1]):
            l.load_state_dict(s)
        emb = encode_all(layers, range(len(prompts)))
        res[arm] = {"dev_loss": best_ad, **evaluate(router, emb, new, newp, seeds, a.l2)}
    res["args"] = vars(a)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
