#!/usr/bin/env python3
"""Overload with stated bounds (issue 19, benches/README.md): the release server under open-loop
load at 1x, 2x and 4x its measured saturation rate, on loopback.

Run by `scripts/bench.sh overload` (which builds the release binaries first). Steps:
  1. start `tiergate serve` (embedded default config, embedding cache off so every request
     runs the encoder, metrics off) and sample its RSS (/proc/PID/status VmRSS) every 0.25 s;
  2. saturation: closed loop at --concurrency (default 64) for --sat-s seconds; the
     throughput is the saturation rate;
  3. open loop at each multiple of it for --step-s seconds, --high-share of the requests
     HIGH priority, every request with a --timeout-ms deadline;
  4. stop the server with SIGTERM; count panics in its log.
Then prints per step: goodput, admitted p50/p99, time-to-reject p50/p99, errors by code,
HIGH success, server RSS, unanswered requests, and checks the bounds at 2x:
  admitted p99 <= batch.max_queue_delay_ms + one batch (p99 of the server's inference time),
  HIGH success >= 99 %, zero panics, zero unanswered (hangs), memory flat (idle RSS 3 s after
  the last step within 10 % of idle RSS 3 s after the first).
Exit status 0 whatever the bounds say: this is a measurement, the reading is in the report.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    def __init__(self, pid, period=0.25):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples = []  # (t, kib)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            v = rss_kib(self.pid)
            if v is not None:
                self.samples.append((time.monotonic(), v))
            time.sleep(self.period)

    def window(self, t0, t1):
        vals = [v for t, v in self.samples if t0 <= t <= t1]
        if not vals:
            return None
        return {"start_mib": vals[0] / 1024, "peak_mib": max(vals) / 1024,
                "end_mib": vals[-1] / 1024}


def loadgen(args, out, extra):
    cmd = [args.loadgen, "--addr", args.addr, "--data", args.data, "--timeout-ms",
           str(args.timeout_ms), "--requests", "100000000", "--out", out] + extra
    print("  $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiergate", default="target/release/tiergate")
    ap.add_argument("--loadgen", default="target/release/loadgen")
    ap.add_argument("--port", type=int, default=50171)
    ap.add_argument("--data", default="../shared/data/dev.jsonl.gz")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--sat-s", type=float, default=20)
    ap.add_argument("--step-s", type=float, default=25)
    ap.add_argument("--multiples", default="1,2,4")
    ap.add_argument("--high-share", type=float, default=0.1)
    ap.add_argument("--timeout-ms", type=int, default=10000)
    ap.add_argument("--queue-delay-ms", type=int, default=5000,
                    help="batch.max_queue_delay_ms of the config served (the default's)")
    ap.add_argument("--out", default="target/bench/overload")
    args = ap.parse_args()
    args.addr = f"127.0.0.1:{args.port}"
    os.makedirs(args.out, exist_ok=True)

    log_path = os.path.join(args.out, "server.log")
    log = open(log_path, "w")
    env = dict(os.environ, RUST_LOG="info", TIERGATE_DRAIN_LAME_DUCK_S="0",
               RUST_BACKTRACE="0")
    srv = subprocess.Popen(
        [args.tiergate, "serve", "--listen", args.addr, "--metrics-listen", "",
         "--embedding-cache", "0", "--max-queue-delay-ms", str(args.queue_delay_ms)],
        stdout=subprocess.DEVNULL, stderr=log, env=env)
    sampler = RssSampler(srv.pid)
    sampler.start()
    steps = {}
    try:
        t = time.monotonic()
        print(f"saturation: closed loop, concurrency {args.concurrency}, {args.sat_s} s", flush=True)
        sat = loadgen(args, os.path.join(args.out, "saturation.json"),
                      ["--concurrency", str(args.concurrency), "--duration", str(args.sat_s),
                       "--wait", "120"])
        sat["rss"] = sampler.window(t, time.monotonic())
        rate = sat["throughput_rps"]
        print(f"saturation rate {rate:.1f} req/s", flush=True)
        for m in [float(x) for x in args.multiples.split(",")]:
            r = m * rate
            print(f"open loop {m:g}x = {r:.1f} req/s, {args.step_s} s, "
                  f"{args.high_share:.0%} HIGH", flush=True)
            t = time.monotonic()
            rep = loadgen(args, os.path.join(args.out, f"open-{m:g}x.json"),
                          ["--rate", f"{r:.3f}", "--duration", str(args.step_s),
                           "--max-in-flight", "100000", "--warmup", "0",
                           "--high-share", str(args.high_share)])
            rep["rss"] = sampler.window(t, time.monotonic())
            rep["multiple"], rep["rate"] = m, r
            steps[m] = rep
            # Let the queue drain between steps so each starts from an idle server; the RSS
            # then is what the step left behind.
            time.sleep(3)
            rest = rss_kib(srv.pid)
            rep["rss_after_rest_mib"] = rest / 1024 if rest else None
        alive = srv.poll() is None
    finally:
        sampler.stop.set()
        if srv.poll() is None:
            srv.send_signal(signal.SIGTERM)
            try:
                srv.wait(timeout=60)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()
        log.close()
    with open(log_path, errors="replace") as f:
        text = f.read()
    panics = text.count("panicked")
    all_rss = sampler.window(0, float("inf"))

    def pct(x):
        # loadgen writes NaN (no such replies) as null.
        return "-" if x is None or x != x else f"{x:.1f}"

    print()
    print(f"saturation (closed loop, concurrency {args.concurrency}): {rate:.1f} req/s, "
          f"p50 {sat['latency_ms']['p50']:.0f} ms, p99 {sat['latency_ms']['p99']:.0f} ms, "
          f"errors {sat['errors']}")
    hdr = (f"{'load':>6} {'offered/s':>9} {'sent':>6} {'goodput/s':>9} {'adm p50':>8} "
           f"{'adm p99':>8} {'rej p50':>8} {'rej p99':>8} {'batch p99':>9} {'HIGH ok':>9} "
           f"{'unans':>5} {'RSS start/peak/idle MiB':>23}  errors")
    print(hdr)
    for m, s in steps.items():
        hs = s["high_sent"]
        high = 100.0 * s["high_ok"] / hs if hs else float("nan")
        rss = s["rss"] or {}
        print(f"{m:>5g}x {s['rate']:>9.1f} {s['requests_sent']:>6} {s['throughput_rps']:>9.1f} "
              f"{pct(s['latency_ms']['p50']):>8} {pct(s['latency_ms']['p99']):>8} "
              f"{pct(s['reject_latency_ms']['p50']):>8} {pct(s['reject_latency_ms']['p99']):>8} "
              f"{pct(s['server_batch_ms']['p99']):>9} {high:>8.2f}% {s['unanswered']:>5} "
              f"{rss.get('start_mib', 0):>7.0f}/{rss.get('peak_mib', 0):.0f}/"
              f"{s.get('rss_after_rest_mib') or 0:.0f}  {s['errors']}")
    print(f"server: {'alive' if alive else 'EXITED'} through the run; panics in log: {panics}; "
          f"RSS over the whole run {all_rss}")

    checks = {}
    if 2.0 in steps:
        s = steps[2.0]
        bound = args.queue_delay_ms + (s["server_batch_ms"]["p99"] or 0.0)
        p99 = s["latency_ms"]["p99"]
        checks["admitted_p99_ms"] = [p99, f"<= {bound:.0f}", p99 is not None and p99 <= bound]
        hs = s["high_sent"]
        high = 100.0 * s["high_ok"] / hs if hs else float("nan")
        checks["high_success_pct"] = [high, ">= 99", high >= 99.0]
    checks["panics"] = [panics, "== 0", panics == 0 and alive]
    unans = sum(s["unanswered"] for s in steps.values())
    checks["unanswered"] = [unans, "== 0", unans == 0]
    rests = [s.get("rss_after_rest_mib") for s in steps.values()]
    if len(rests) >= 2 and None not in rests:
        # Idle RSS after the last step against idle RSS after the first.
        checks["idle_rss_last_vs_first_mib"] = [f"{rests[-1]:.0f} vs {rests[0]:.0f}",
                                                "within 10 %", rests[-1] <= rests[0] * 1.10]
    print("\nbounds at 2x saturation:")
    for k, (v, want, ok) in checks.items():
        print(f"  {k:<24} {v!s:<18} {want:<12} {'holds' if ok else 'DOES NOT HOLD'}")
    summary = {"saturation": sat, "steps": {f"{m:g}x": s for m, s in steps.items()},
               "panics": panics, "server_alive": alive, "rss_run": all_rss,
               "checks": {k: {"value": v, "want": w, "holds": ok}
                          for k, (v, w, ok) in checks.items()}}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"\nwritten: {args.out}/summary.json, server log {log_path}")


if __name__ == "__main__":
    sys.exit(main())
