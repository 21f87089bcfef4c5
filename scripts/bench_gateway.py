"""`scripts/bench.sh gateway`: the latency the gateway hops add (issue 14), on loopback.

  stub --port P                       an OpenAI-compatible stand-in: one fixed chat completion
  prep --out DIR --stub P --grpc P --http P --envoy P
                                      the bench tiergate.toml (embedded config, every catalog
                                      model's upstream on the stub, verify = "never") and
                                      envoy.yaml (deploy/envoy.yaml on loopback ports)
  measure --out FILE --label L ...    sequential requests, same prompts, on four sides:
    direct  POST the stub itself
    front   tiergate's OpenAI front, model "auto" (Route, then the stub)
    envoy   Envoy with tiergate's ext_proc choosing the cluster (then the stub)
    route   tiergate's Route RPC alone (grpcio), the prompt as one user message
  summarize FILE...                   the table, and the differences front - direct and
                                      envoy - direct beside route

Run with target/gateway-venv's python (grpcio, and the generated stubs in clients/python).
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import http.server
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDES = ["direct", "front", "envoy", "route"]

REPLY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "stub",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "The answer is 4."}}],
    "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
}).encode()


class Stub(http.server.BaseHTTPRequestHandler):
    # Keep-alive, as a provider's API would; every client here reuses its connection.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, the second waits for the client's
    # delayed ACK (~40 ms on Linux), which would swamp everything measured here.
    disable_nagle_algorithm = True

    def do_POST(self):  # noqa: N802 (http.server's naming)
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(REPLY)))
        self.end_headers()
        self.wfile.write(REPLY)

    def log_message(self, *args):
        pass


def stub(a):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Stub)
    srv.daemon_threads = True
    srv.serve_forever()


def prep(a):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import subprocess

    cfg = subprocess.run([str(ROOT / "target/release/tiergate"), "config"], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    base = f"http://127.0.0.1:{a.stub}/v1"
    # Each catalog entry gets its upstream as an inline table right after its `model` key
    # (still inside that [[catalog]] table); route-only, so no Verify and no escalation.
    cfg, n = re.subn(r'(?m)^(\[\[catalog\]\]\nmodel = "[^"]+"\n)',
                     lambda m: m.group(1) + f'upstream = {{ base_url = "{base}" }}\n', cfg)
    cfg, v = re.subn(r'(?m)^verify = "borderline"$', 'verify = "never"', cfg)
    if n == 0 or v != 1:
        sys.exit(f"bench: unexpected `tiergate config` output ({n} catalog entries, {v} verify)")
    (out / "tiergate.toml").write_text(cfg)

    text = (ROOT / "deploy/envoy.yaml").read_text()
    swaps = {"0.0.0.0:10000": a.envoy, "tiergate:50051": a.grpc}
    for c in ["flash", "sonnet", "opus", "default"]:
        swaps[f"{c}-upstream:8000"] = a.stub
    for hp, port in swaps.items():
        host, p = hp.split(":")
        frm = f"{{ address: {host}, port_value: {p} }}"
        if text.count(frm) != 1:
            sys.exit(f"bench: {frm} not once in deploy/envoy.yaml")
        text = text.replace(frm, f"{{ address: 127.0.0.1, port_value: {port} }}")
    (out / "envoy.yaml").write_text(text)


def prompts(data, n, seed):
    seen = {}
    with gzip.open(data, "rt") as f:
        for line in f:
            r = json.loads(line)
            seen.setdefault(r["prompt_id"], r["prompt"])
    ids = sorted(seen)
    return [seen[i] for i in random.Random(seed).sample(ids, min(n, len(ids)))]


class Http:
    def __init__(self, port, model, tiergate):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.model, self.tiergate = model, tiergate

    def __call__(self, prompt):
        body = json.dumps({"model": self.model,
                           "messages": [{"role": "user", "content": prompt}]})
        self.conn.request("POST", "/v1/chat/completions", body,
                          {"content-type": "application/json"})
        r = self.conn.getresponse()
        r.read()
        # Without x-tiergate-model the request was not routed (e.g. Envoy failing open): that
        # would time the wrong path, so it counts as an error.
        return r.status == 200 and (not self.tiergate or r.getheader("x-tiergate-model"))


class Route:
    def __init__(self, port):
        import grpc
        sys.path.insert(0, str(ROOT / "clients/python"))
        from tiergate_client._pb import tiergate_pb2 as pb
        from tiergate_client._pb import tiergate_pb2_grpc as pb_grpc

        self.pb = pb
        self.stub = pb_grpc.RouterStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def __call__(self, prompt):
        pb = self.pb
        req = pb.RouteRequest(messages=pb.Messages(
            messages=[pb.ChatMessage(role="user", content=prompt)]))
        return bool(self.stub.Route(req, timeout=30).model)


def measure(a):
    ps = prompts(a.data, a.n, a.seed)
    call = {"direct": Http(a.stub, "gemini-2.5-flash", False),
            "front": Http(a.http, "auto", True),
            "envoy": Http(a.envoy, "auto", True),
            "route": Route(a.grpc)}
    # Warm-up: connections open, code paths hot; with the embedding cache on, every prompt
    # is embedded once here, so all three tiergate sides then hit the cache.
    warm = ps if a.warm_all else ps[: a.warmup]
    for p in warm:
        call["route"](p)
    for s in SIDES:
        for p in ps[: a.warmup]:
            call[s](p)
    lat = {s: [] for s in SIDES}
    errors = {s: 0 for s in SIDES}
    for r in range(a.rounds):
        order = SIDES[r % 4:] + SIDES[: r % 4]  # rotate so no side always goes first
        for s in order:
            ms = []
            for p in ps:
                t0 = time.perf_counter()
                ok = call[s](p)
                ms.append((time.perf_counter() - t0) * 1e3)
                errors[s] += not ok
            lat[s].append(ms)
        print(f"  {a.label} round {r + 1}/{a.rounds}: "
              + ", ".join(f"{s} p50 {statistics.median(lat[s][-1]):.2f} ms" for s in SIDES),
              flush=True)
    json.dump({"label": a.label, "prompts": len(ps), "rounds": a.rounds, "latency_ms": lat,
               "errors": errors}, open(a.out, "w"))
    if any(errors.values()):
        sys.exit(f"bench: errors {errors}")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summarize(a):
    summary = {}
    for path in a.files:
        d = json.load(open(path))
        rows = {}
        for s in SIDES:
            allms = [x for rnd in d["latency_ms"][s] for x in rnd]
            rows[s] = {"p50": pct(allms, 0.5), "p99": pct(allms, 0.99), "n": len(allms),
                       "round_p50s": [statistics.median(r) for r in d["latency_ms"][s]]}
        for s in ["front", "envoy"]:
            rows[f"{s}-direct"] = {k: rows[s][k] - rows["direct"][k] for k in ["p50", "p99"]}
        summary[d["label"]] = rows
        print(f"\n{d['label']}: {d['prompts']} dev prompts x {d['rounds']} rounds per side, "
              f"concurrency 1, loopback (p50/p99 over all {rows['direct']['n']} requests)")
        print(f"{'side':<44}{'p50 ms':>9}{'p99 ms':>9}  round p50s")
        names = {"direct": "(a) upstream stand-in, direct",
                 "front": "(b) OpenAI front, model auto, route-only",
                 "envoy": "(c) Envoy + tiergate ext_proc",
                 "route": "(d) Route RPC alone (grpcio)",
                 "front-direct": "added by the front (b - a)",
                 "envoy-direct": "added by Envoy + ext_proc (c - a)"}
        for k, name in names.items():
            r = rows[k]
            spread = " ".join(f"{x:.2f}" for x in r.get("round_p50s", []))
            print(f"{name:<44}{r['p50']:>9.2f}{r['p99']:>9.2f}  {spread}")
    json.dump(summary, open(a.json, "w"), indent=2)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stub")
    s.add_argument("--port", type=int, required=True)
    p = sub.add_parser("prep")
    m = sub.add_parser("measure")
    for x in (p, m):
        for k in ("stub", "grpc", "http", "envoy"):
            x.add_argument(f"--{k}", type=int, required=True)
        x.add_argument("--out", required=True)
    m.add_argument("--label", required=True)
    m.add_argument("--data", default=str(ROOT.parent / "shared/data/dev.jsonl.gz"))
    m.add_argument("--n", type=int, default=150)
    m.add_argument("--rounds", type=int, default=3)
    m.add_argument("--seed", type=int, default=42)
    m.add_argument("--warmup", type=int, default=10)
    m.add_argument("--warm-all", action="store_true")
    z = sub.add_parser("summarize")
    z.add_argument("--json", required=True)
    z.add_argument("files", nargs="+")
    a = ap.parse_args()
    {"stub": stub, "prep": prep, "measure": measure, "summarize": summarize}[a.cmd](a)


if __name__ == "__main__":
    main()
