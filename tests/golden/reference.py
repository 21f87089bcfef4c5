#!/usr/bin/env python3
"""Independent reference for tests/golden_embeddings.rs.

Tokenises fixed inputs with the python `tokenizers` package and embeds them with a
plain numpy BERT forward pass (float64), writing tests/golden/reference.json.
Truncation mirrors src/model/tokenize.rs (head+tail for singles; for pairs the answer
keeps >= 60% of the budget, 1/4 head + 3/4 tail).

    pip install numpy safetensors tokenizers
    python3 tests/golden/reference.py        # from the repository root
"""
import json
import math
import os

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "base")
OUT = os.path.join(ROOT, "tests", "golden", "reference.json")
MAX_TOKENS = 128
MAX_PAIR_TOKENS = 256

LONG = " ".join(
    f"Step {i}: the service checks request {i * 7 % 13} against the budget, "
    f"logs latency of {i * 3} ms and moves on."
    for i in range(1, 21)
)
SINGLES = [
    "Hello world.",
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number using memoization.",
    "Café déjà vu — naïve façade, 東京 and emoji 🚀 in one line!",
    "",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12))",
    LONG,  # ~400 tokens: truncated to MAX_TOKENS head+tail
]
PAIRS = [
    ("What is 17 * 23?", "17 * 23 = 391. The answer is 391."),
    ("Summarise the following log. " + LONG, "The log shows twenty steps. " + LONG + " Final answer: all steps passed."),
]


def head_tail(ids, keep, head):
    if len(ids) <= keep:
        return ids
    head = min(head, keep)
    return ids[:head] + ids[len(ids) - (keep - head):]


def encode_single(tok, text):
    raw = tok.encode(text, add_special_tokens=False).ids
    body = MAX_TOKENS - 2
    ids = [CLS] + head_tail(raw, body, (body + 1) // 2) + [SEP]
    return ids, [0] * len(ids)


def encode_pair(tok, prompt, answer):
    p = tok.encode(prompt, add_special_tokens=False).ids
    a = tok.encode(answer, add_special_tokens=False).ids
    budget = MAX_PAIR_TOKENS - 3
    if len(p) + len(a) <= budget:
        pk, ak = len(p), len(a)
    else:
        ak = min(len(a), max(math.ceil(budget * 0.6), budget - len(p)))
        pk = min(len(p), budget - ak)
    first = [CLS] + head_tail(p, pk, (pk + 1) // 2) + [SEP]
    second = head_tail(a, ak, ak // 4) + [SEP]
    return first + second, [0] * len(first) + [1] * len(second)


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def erf(x):
    return np.vectorize(math.erf)(x)


def embed(w, cfg, ids, type_ids):
    f = lambda n: w[n].astype(np.float64)  # noqa: E731
    lin = lambda x, n: x @ f(n + ".weight").T + f(n + ".bias")  # noqa: E731
    n = len(ids)
    x = f("embeddings.word_embeddings.weight")[ids]
    x = x + f("embeddings.position_embeddings.weight")[:n]
    x = x + f("embeddings.token_type_embeddings.weight")[type_ids]
    eps = cfg["layer_norm_eps"]
    x = layer_norm(x, f("embeddings.LayerNorm.weight"), f("embeddings.LayerNorm.bias"), eps)
    heads = cfg["num_attention_heads"]
    d = cfg["hidden_size"] // heads
    for l in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{l}."
        q = lin(x, p + "attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        k = lin(x, p + "attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        v = lin(x, p + "attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, heads * d)
        x = layer_norm(
            x + lin(ctx, p + "attention.output.dense"),
            f(p + "attention.output.LayerNorm.weight"),
            f(p + "attention.output.LayerNorm.bias"),
            eps,
        )
        hmid = lin(x, p + "intermediate.dense")
        hmid = 0.5 * hmid * (1.0 + erf(hmid / math.sqrt(2.0)))
        x = layer_norm(
            x + lin(hmid, p + "output.dense"),
            f(p + "output.LayerNorm.weight"),
            f(p + "output.LayerNorm.bias"),
            eps,
        )
    e = x.mean(0)
    return e / max(np.linalg.norm(e), 1e-12)


def main():
    global CLS, SEP
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    CLS, SEP = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    with open(os.path.join(MODEL, "config.json")) as fh:
        cfg = json.load(fh)
    w = load_file(os.path.join(MODEL, "model.safetensors"))

    items = []
    for text in SINGLES:
        ids, tt = encode_single(tok, text)
        items.append({"kind": "single", "text": text, "ids": ids, "type_ids": tt})
    for prompt, answer in PAIRS:
        ids, tt = encode_pair(tok, prompt, answer)
        items.append({"kind": "pair", "prompt": prompt, "answer": answer, "ids": ids, "type_ids": tt})
    for it in items:
        e = embed(w, cfg, it["ids"], it["type_ids"])
        it["embedding"] = [round(float(v), 6) for v in e]
    doc = {
        "max_tokens": MAX_TOKENS,
        "max_pair_tokens": MAX_PAIR_TOKENS,
        "generator": "tests/golden/reference.py (numpy float64 forward, python tokenizers)",
        "items": items,
    }
    with open(OUT, "w") as fh:
        json.dump(doc, fh, ensure_ascii=False, separators=(",", ":"))
        fh.write("\n")
    print(f"wrote {OUT}: {len(items)} items")


if __name__ == "__main__":
    main()
