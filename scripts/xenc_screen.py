#!/usr/bin/env python3
"""Screen for issue 13's other encoder lever: a cross-encoder verifier. MiniLM reads the prompt
and the answer together ([CLS] prompt [SEP] answer [SEP], segment ids 0 / 1), mean-pooled, with
a logistic head (w.e + c + b_model); LoRA (rank R) on the top L layers, trained jointly with the
head. Offline and before any Rust, like the other screens in models/EVAL.md.

Arms, on the same held-out rows: frozen (the head alone over base weights) and adapter; beside
them the served verifier's uncalibrated p_verify from `tiergate score` (--served SCORE.jsonl,
rows matched by prompt_id and model). The figure a threshold decision reads is the
within-model AUROC (a per-model bias cannot change it), so it is reported per model and as a
mean, with the pooled AUROC; and the mean of the two arms' z-scored logits against the served
verifier alone, which says whether the cross-encoder sees something it does not.

Training rows: a sample of SOURCE's train rows with a response. Held-out rows: SOURCE's dev
rows (prompts the served heads never trained on either). Truncation: the prompt's head and
tail to --prompt-len tokens, the answer's tail to the rest (the verdict sits at its end).

usage: xenc_screen.py SOURCE --served SCORE.jsonl [--train-rows 8000] [--rank 8] [--layers 3]
       [--epochs 2] [--max-len 256] [--prompt-len 96] [--test-prompts N]
SCORE.jsonl: `tiergate score --data ROWS.jsonl --out SCORE.jsonl` over the source's dev rows.
needs: torch, safetensors, tokenizers, numpy; reads models/base and ../shared/data.
"""
import argparse, gzip, hashlib, json, math, os, random, sys, time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapter_screen import Layer, auroc, batches, padded  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.manual_seed(0)
random.seed(0)
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def rows_of(data, split, source):
    out = []
    with gzip.open(os.path.join(data, f"{split}.jsonl.gz"), "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["source"] == source and r.get("response"):
                out.append((r["prompt_id"], r["prompt"], r["model"], r["response"], float(r["score"])))
    return out


def pair_ids(tok, prompt, answer, max_len, prompt_len):
    p = tok.encode(prompt, add_special_tokens=False).ids
    a = tok.encode(answer, add_special_tokens=False).ids
    if len(p) > prompt_len:
        head = prompt_len // 2
        p = p[:head] + p[len(p) - (prompt_len - head):]
    room = max_len - 3 - len(p)
    a = a[len(a) - room:] if len(a) > room else a
    ids = [101] + p + [102] + a + [102]
    types = [0] * (len(p) + 2) + [1] * (len(a) + 1)
    return ids, types


def embed(w, ids, types):
    n = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
         + w["embeddings.token_type_embeddings.weight"][types])
    return F.layer_norm(torch.tensor(x), (384,), torch.tensor(w["embeddings.LayerNorm.weight"]),
                        torch.tensor(w["embeddings.LayerNorm.bias"]), eps=1e-12)


def top(layers, states, ids):
    x, valid, mask = padded(states, ids)
    with torch.autocast(**BF16):
        for layer in layers:
            x = layer(x, mask)
    x = x.float()
    pooled = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    return F.normalize(pooled, dim=-1)


def within(y, s, models):
    out = {}
    for m in sorted(set(models)):
        sel = models == m
        a = auroc(y[sel], s[sel])
        if not math.isnan(a):
            out[m] = a
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--served", required=True)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--train-rows", type=int, default=8000)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--test-prompts", type=int, default=0, help="a sample of dev prompts (0: all)")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    train = rows_of(a.data, "train", a.source)
    random.shuffle(train)
    train = train[: a.train_rows]
    test = rows_of(a.data, "dev", a.source)
    served = {}
    with open(a.served) as f:
        for line in f:
            r = json.loads(line)
            served[(r["prompt_id"], r["model"])] = r["p_verify"]
    test = [r for r in test if (r[0], r[2]) in served]
    if a.test_prompts:
        keep = sorted({r[0] for r in test})
        random.Random(1).shuffle(keep)
        keep = set(keep[: a.test_prompts])
        test = [r for r in test if r[0] in keep]
    models = sorted({r[2] for r in train} | {r[2] for r in test})
    mindex = {m: i for i, m in enumerate(models)}
    log(f"{len(train)} train rows, {len(test)} held-out rows, {len(models)} models")

    w = load_file(os.path.join(ROOT, "models", "base", "model.safetensors"))
    w = {k.removeprefix("bert."): v for k, v in w.items()}
    tok = Tokenizer.from_file(os.path.join(ROOT, "models", "base", "tokenizer.json"))
    frozen_n = 6 - a.layers
    bottom = [Layer(w, i, 0, 1) for i in range(frozen_n)]
    layers = [Layer(w, i, a.rank, 2 * a.rank) for i in range(frozen_n, 6)]

    def states_of(rows):
        t0 = time.time()
        enc = [pair_ids(tok, r[1], r[3], a.max_len, a.prompt_len) for r in rows]
        lengths = [len(i) for i, _ in enc]
        out = [None] * len(rows)
        with torch.no_grad():
            for b in batches(lengths, range(len(rows)), a.max_tokens):
                xs = [embed(w, *enc[i]) for i in b]
                st = {j: x for j, x in enumerate(xs)}
                x, valid, mask = padded(st, list(range(len(b))))
                with torch.autocast(**BF16):
                    for layer in bottom:
                        x = layer(x, mask)
                for j, i in enumerate(b):
                    out[i] = x[j, : lengths[i]].to(torch.bfloat16)
        log(f"  lower {frozen_n} layers over {len(rows)} pairs: {time.time() - t0:.0f} s")
        return out, lengths

    tr_states, tr_len = states_of(train)
    te_states, te_len = states_of(test)
    ytr = torch.tensor([r[4] for r in train])
    yte = np.array([r[4] for r in test])
    mtr = torch.tensor([mindex[r[2]] for r in train])
    mte = np.array([r[2] for r in test])
    mte_i = torch.tensor([mindex[m] for m in mte])

    head = torch.nn.Linear(384, 1)
    bias = torch.nn.Parameter(torch.zeros(len(models)))

    def logits(states, lengths, mi, grad):
        out = torch.empty(len(states))
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for b in batches(lengths, range(len(states)), a.max_tokens):
                e = top(layers, states, b)
                out[b] = (head(e).squeeze(-1) + bias[mi[b]]).detach()
        return out

    def fit(params, epochs, lr):
        opt = torch.optim.Adam(params, lr=lr)
        for ep in range(epochs):
            t0, tot, n = time.time(), 0.0, 0
            bs = batches(tr_len, range(len(train)), a.max_tokens // 2)
            random.shuffle(bs)
            for b in bs:
                e = top(layers, tr_states, b)
                z = head(e).squeeze(-1) + bias[mtr[b]]
                loss = F.binary_cross_entropy_with_logits(z, ytr[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot, n = tot + loss.item() * len(b), n + len(b)
            log(f"  epoch {ep}: train loss {tot / n:.4f} ({time.time() - t0:.0f} s)")

    served_p = np.array([served[(r[0], r[2])] for r in test])
    served_z = np.log(np.clip(served_p, 1e-6, 1 - 1e-6) / np.clip(1 - served_p, 1e-6, 1))
    report = {"served": {"pooled": auroc(yte, served_p), "within": within(yte, served_p, mte)}}

    # Frozen arm: the head alone (LoRA's B starts at zero, so the layers are the base ones).
    for layer in layers:
        for p in layer.parameters():
            p.requires_grad_(False)
    fit(list(head.parameters()) + [bias], 3, 3e-3)
    report["frozen"] = logits(te_states, te_len, mte_i, False).numpy()
    # Adapter arm: from the frozen head, LoRA and head together.
    for layer in layers:
        for p in layer.parameters():
            p.requires_grad_(True)
    lora = [p for layer in layers for p in layer.parameters()]
    fit(lora + list(head.parameters()) + [bias], a.epochs, 1e-3)
    report["adapter"] = logits(te_states, te_len, mte_i, False).numpy()

    # Stacked on the served verifier: a logistic on [served logit, arm logit, 1], fitted on
    # half of the held-out prompts and read on the other half, both ways (cross-fitted).
    fold = np.array([int(hashlib.md5(r[0].encode()).hexdigest(), 16) % 2 for r in test])

    def stacked(s):
        x = np.stack([served_z, s, np.ones_like(s)], 1)
        out = np.empty(len(s))
        for k in (0, 1):
            fit_on, read = fold == k, fold != k
            th = np.zeros(3)
            for _ in range(25):  # Newton, a little ridge
                p = 1 / (1 + np.exp(-(x[fit_on] @ th)))
                g = x[fit_on].T @ (p - yte[fit_on]) + 1e-3 * th
                h = (x[fit_on] * (p * (1 - p))[:, None]).T @ x[fit_on] + 1e-3 * np.eye(3)
                th -= np.linalg.solve(h, g)
            out[read] = x[read] @ th
        return out

    for arm in ("frozen", "adapter"):
        s = report[arm]
        both = stacked(s)
        report[arm] = {"pooled": auroc(yte, s), "within": within(yte, s, mte)}
        report[arm + "+served"] = {"pooled": auroc(yte, both), "within": within(yte, both, mte)}
    print(f"| arm | pooled AUROC | within-model AUROC, mean over {len(report['served']['within'])} models |")
    print("|---|---:|---:|")
    for arm, r in report.items():
        print(f"| {arm} | {r['pooled']:.3f} | {np.mean(list(r['within'].values())):.3f} |")
    json.dump(report, sys.stderr, indent=1)


if __name__ == "__main__":
    main()
