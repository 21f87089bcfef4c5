#!/usr/bin/env python3
"""ONNX Runtime peer for the tiergate encoder benchmark (benches/README.md).

Builds an ONNX graph of the same MiniLM encoder straight from models/base/model.safetensors
with the `onnx` package (no torch), checks that its embeddings equal the reference and
tiergate's, then times it with onnxruntime at the same thread count on the same token ids
(written by `loadgen dump-ids`), at batch 1 and in length-sorted batches padded per batch.

    pip install onnx onnxruntime numpy safetensors
    python3 scripts/onnx_peer.py --ids ids.json --threads 2 [--graph fused|standard]
        [--tiergate-embeddings emb.f32] [--out ort.json]

Graphs:
  fused     ORT's own BERT contrib ops (EmbedLayerNormalization, Attention with a per-sequence
            length mask, SkipLayerNormalization, BiasGelu): the graph ORT's transformer
            optimizer produces for BERT, i.e. ORT at its best on CPU. The default.
  standard  opset-17 standard ops only (LayerNormalization, MatMul, Softmax, Erf); ORT's
            graph optimizer fuses what it recognises.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

MS = "com.microsoft"


def load_weights(model_dir):
    cfg = json.load(open(f"{model_dir}/config.json"))
    w = load_file(f"{model_dir}/model.safetensors")
    prefix = "" if "embeddings.word_embeddings.weight" in w else "bert."
    w = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
    return cfg, {k: v.astype(np.float32) if v.dtype != np.int64 else v for k, v in w.items()}


class G:
    """A small graph builder: initializers, nodes and unique names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type, inputs, domain=None, outputs=1, **attrs):
        self.n += 1
        outs = [f"{op_type}_{self.n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs


def linear_t(w, name):
    """HF Linear weight [out, in] -> [in, out] for MatMul."""
    return np.ascontiguousarray(w[name].T)


def build(cfg, w, graph):
    h, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    d = h // heads
    g = G()
    fused = graph == "fused"
    idt = TensorProto.INT32 if fused else TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info(n, idt, ["B", "S"])
        for n in ("input_ids", "token_type_ids", "attention_mask")
    ]
    emb = lambda n: w[f"embeddings.{n}"]  # noqa: E731

    if fused:
        x, mask_index = g.op(
            "EmbedLayerNormalization",
            ["input_ids", "token_type_ids",
             g.const("word", emb("word_embeddings.weight")),
             g.const("pos", emb("position_embeddings.weight")),
             g.const("type", emb("token_type_embeddings.weight")),
             g.const("emb_g", emb("LayerNorm.weight")),
             g.const("emb_b", emb("LayerNorm.bias")),
             "attention_mask"],
            domain=MS, outputs=2, epsilon=eps)
    else:
        s = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const("one_i", np.array(1))])
        positions = g.op("Range", [g.const("zero_l", np.array(0, np.int64)), s,
                                   g.const("one_l", np.array(1, np.int64))])
        x = g.op("Add", [g.op("Gather", [g.const("word", emb("word_embeddings.weight")), "input_ids"]),
                         g.op("Gather", [g.const("pos", emb("position_embeddings.weight")), positions])])
        x = g.op("Add", [x, g.op("Gather", [g.const("type", emb("token_type_embeddings.weight")),
                                            "token_type_ids"])])
        x = g.op("LayerNormalization", [x, g.const("emb_g", emb("LayerNorm.weight")),
                                        g.const("emb_b", emb("LayerNorm.bias"))], axis=-1, epsilon=eps)
        # Additive mask [B, 1, 1, S]: 0 for tokens, -10000 for padding (as HF BERT).
        mf = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
        bias = g.op("Mul", [g.op("Sub", [g.const("one_f", np.array(1, np.float32)), mf]),
                            g.const("neg", np.array(-10000.0, np.float32))])
        mask_bias = g.op("Unsqueeze", [bias, g.const("ax12", np.array([1, 2], np.int64))])
        split_shape = g.const("split_shape", np.array([0, 0, heads, d], np.int64))
        merge_shape = g.const("merge_shape", np.array([0, 0, h], np.int64))
        scale = g.const("scale", np.array(1.0 / np.sqrt(d), np.float32))

    for l in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{l}."
        P = lambda n: f"L{l}_{n}"  # noqa: E731
        wq, wk, wv = (linear_t(w, f"{p}attention.self.{n}.weight") for n in ("query", "key", "value"))
        bq, bk, bv = (w[f"{p}attention.self.{n}.bias"] for n in ("query", "key", "value"))
        wo = g.const(P("wo"), linear_t(w, f"{p}attention.output.dense.weight"))
        bo = g.const(P("bo"), w[f"{p}attention.output.dense.bias"])
        g1 = g.const(P("g1"), w[f"{p}attention.output.LayerNorm.weight"])
        b1 = g.const(P("b1"), w[f"{p}attention.output.LayerNorm.bias"])
        wi = g.const(P("wi"), linear_t(w, f"{p}intermediate.dense.weight"))
        bi = g.const(P("bi"), w[f"{p}intermediate.dense.bias"])
        wo2 = g.const(P("wo2"), linear_t(w, f"{p}output.dense.weight"))
        bo2 = g.const(P("bo2"), w[f"{p}output.dense.bias"])
        g2 = g.const(P("g2"), w[f"{p}output.LayerNorm.weight"])
        b2 = g.const(P("b2"), w[f"{p}output.LayerNorm.bias"])
        if fused:
            att = g.op("Attention", [x, g.const(P("wqkv"), np.concatenate([wq, wk, wv], 1)),
                                     g.const(P("bqkv"), np.concatenate([bq, bk, bv])), mask_index],
                       domain=MS, num_heads=heads)
            x = g.op("SkipLayerNormalization", [g.op("MatMul", [att, wo]), x, g1, b1, bo],
                     domain=MS, epsilon=eps)
            mid = g.op("BiasGelu", [g.op("MatMul", [x, wi]), bi], domain=MS)
            x = g.op("SkipLayerNormalization", [g.op("MatMul", [mid, wo2]), x, g2, b2, bo2],
                     domain=MS, epsilon=eps)
        else:
            def heads_of(wm, bm, name):
                y = g.op("Add", [g.op("MatMul", [x, g.const(P(name + "_w"), wm)]),
                                 g.const(P(name + "_b"), bm)])
                return g.op("Transpose", [g.op("Reshape", [y, split_shape])], perm=[0, 2, 1, 3])
            q, k, v = heads_of(wq, bq, "q"), heads_of(wk, bk, "k"), heads_of(wv, bv, "v")
            kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
            scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, kt]), scale]), mask_bias])
            ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
            ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
            y = g.op("Add", [g.op("Add", [g.op("MatMul", [ctx, wo]), bo]), x])
            x = g.op("LayerNormalization", [y, g1, b1], axis=-1, epsilon=eps)
            t = g.op("Add", [g.op("MatMul", [x, wi]), bi])
            erf = g.op("Erf", [g.op("Mul", [t, g.const(P("isq2"), np.array(1 / np.sqrt(2), np.float32))])])
            gelu = g.op("Mul", [g.op("Mul", [t, g.const(P("half"), np.array(0.5, np.float32))]),
                                g.op("Add", [erf, g.const(P("one"), np.array(1.0, np.float32))])])
            y = g.op("Add", [g.op("Add", [g.op("MatMul", [gelu, wo2]), bo2]), x])
            x = g.op("LayerNormalization", [y, g2, b2], axis=-1, epsilon=eps)

    # Mean over real tokens (special tokens included, as sentence-transformers), then L2.
    m = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT),
                           g.const("ax2", np.array([2], np.int64))])
    axis1 = g.const("ax1", np.array([1], np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [x, m]), axis1], keepdims=0)
    count = g.op("ReduceSum", [m, axis1], keepdims=0)
    mean = g.op("Div", [summed, count])
    g.nodes.append(helper.make_node("LpNormalization", [mean], ["embedding"], axis=-1, p=2))
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", h])
    gr = helper.make_graph(g.nodes, f"minilm_{graph}", inputs, [out], g.inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(MS, 1)] if fused else [])
    model = helper.make_model(gr, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class Runner:
    def __init__(self, model, threads, spin=True):
        so = ort.SessionOptions()
        # ORT's worker threads spin between ops by default (fast on an idle machine, costly
        # when cores are shared); --no-spin makes them block like rayon's.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(model.SerializeToString(), so,
                                         providers=["CPUExecutionProvider"])
        self.dtype = np.int32 if self.sess.get_inputs()[0].type == "tensor(int32)" else np.int64

    def feeds(self, seqs, type_ids=None):
        """Right-padded to the longest sequence of this batch."""
        s = max(len(x) for x in seqs)
        ids = np.zeros((len(seqs), s), self.dtype)
        tt = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
            if type_ids is not None:
                tt[i, :len(x)] = type_ids[i]
        return {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask}

    def embed(self, seqs, type_ids=None):
        return self.sess.run(None, self.feeds(seqs, type_ids))[0]


def cos_rows(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="models/base")
    ap.add_argument("--ids", required=True, help="JSON from `loadgen dump-ids`")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--graph", choices=["fused", "standard", "fused-int8"], default="fused",
                    help="fused-int8: the fused graph after ORT's dynamic int8 quantization "
                         "(weights int8, activations quantized per call): ORT's own fast CPU path")
    ap.add_argument("--golden", default="tests/golden/reference.json")
    ap.add_argument("--tiergate-embeddings", help="f32 file from `loadgen bench-encoder --embeddings-out`")
    ap.add_argument("--min-cos", type=float, default=0.9999)
    ap.add_argument("--no-spin", action="store_true", help="intra-op threads block instead of spinning")
    ap.add_argument("--save-onnx", help="also write the graph here")
    ap.add_argument("--out")
    a = ap.parse_args()

    cfg, w = load_weights(a.model_dir)
    model = build(cfg, w, a.graph.removesuffix("-int8"))
    if a.graph.endswith("-int8"):
        import tempfile
        from onnxruntime.quantization import QuantType, quantize_dynamic
        with tempfile.TemporaryDirectory() as d:
            onnx.save(model, f"{d}/f32.onnx")
            quantize_dynamic(f"{d}/f32.onnx", f"{d}/int8.onnx", weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            model = onnx.load(f"{d}/int8.onnx")
        # ORT's dynamic int8 loses this model (u8 x s8 pair sums saturate): its parity is
        # reported as a result, not enforced, so it can still be timed as the int8 peer.
        a.min_cos = -1.0
    if a.save_onnx:
        onnx.save(model, a.save_onnx)
    run = Runner(model, a.threads, spin=not a.no_spin)

    # Parity 1: the numpy float64 reference (singles and pairs, with type ids).
    gold = json.load(open(a.golden))["items"]
    got = np.concatenate([run.embed([it["ids"]], [it["type_ids"]]) for it in gold])
    cos_gold = cos_rows(got, np.array([it["embedding"] for it in gold]))
    parity = {"golden_min_cos": float(cos_gold.min())}

    seqs = json.load(open(a.ids))["seqs"]
    if a.limit:
        seqs = seqs[:a.limit]
    n, tokens = len(seqs), sum(len(s) for s in seqs)
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    batches = [[seqs[i] for i in order[k:k + a.batch]] for k in range(0, n, a.batch)]
    padded = sum(len(b) * max(len(s) for s in b) for b in batches)

    # Parity 2: tiergate's own embeddings of the very same dev sequences (batch 1, file order).
    if a.tiergate_embeddings:
        ours = np.fromfile(a.tiergate_embeddings, dtype="<f4").reshape(-1, cfg["hidden_size"])
        theirs = np.concatenate([run.embed(b) for b in batches])
        inv = np.empty(n, int)
        inv[order] = np.arange(n)
        c = cos_rows(ours[:n], theirs[inv])
        parity["tiergate_min_cos"] = float(c.min())
        parity["tiergate_mean_cos"] = float(c.mean())
    bad = [k for k, v in parity.items() if "min" in k and v < a.min_cos]
    print("ort parity:", json.dumps(parity), file=sys.stderr)
    if bad:
        sys.exit(f"onnx_peer: embeddings differ ({bad} below {a.min_cos})")

    for s in seqs[:16]:  # warm-up, as the Rust side
        run.embed([s])
    # CPU time of the whole process (all ORT threads), as the Rust side reports it.
    b1_pass, b1_cpu, lat = [], [], []
    for _ in range(a.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for s in seqs:
            t = time.perf_counter()
            run.embed([s])
            lat.append((time.perf_counter() - t) * 1e3)
        b1_pass.append(time.perf_counter() - t0)
        b1_cpu.append(time.process_time() - c0)
    bb_pass, bb_cpu = [], []
    for _ in range(a.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for b in batches:
            run.embed(b)
        bb_pass.append(time.perf_counter() - t0)
        bb_cpu.append(time.process_time() - c0)

    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))]  # noqa: E731
    mode = lambda passes, cpu, latency=None: {  # noqa: E731
        "seqs_per_s": n / statistics.median(passes),
        "tokens_per_s": tokens / statistics.median(passes),
        "pass_s": passes,
        "cpu_ms_per_seq": statistics.median(cpu) * 1e3 / n,
        "pass_cpu_s": cpu,
        **({"latency_ms": latency} if latency else {}),
    }
    report = {
        "side": f"onnxruntime {ort.__version__} ({a.graph} graph{', no spin' if a.no_spin else ''})",
        "threads": a.threads, "sequences": n, "tokens": tokens, "batch": a.batch,
        "padded_tokens_batched": padded, "reps": a.reps, "parity": parity,
        "batch1": mode(b1_pass, b1_cpu, {"p50": pct(50), "p90": pct(90), "p99": pct(99)}),
        "batched": mode(bb_pass, bb_cpu),
    }
    print(f"ort ({a.graph}): {n} seqs ({tokens} tokens), {a.threads} threads: batch 1 "
          f"{report['batch1']['seqs_per_s']:.1f} seq/s (p50 {pct(50):.2f} ms), batch {a.batch} "
          f"{report['batched']['seqs_per_s']:.1f} seq/s (padding +{100 * (padded / tokens - 1):.1f}%)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
