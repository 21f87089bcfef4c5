#!/usr/bin/env bash
# Benchmarks of benches/README.md.
#
#   scripts/bench.sh [encoder]   encoder throughput, tiergate vs ONNX Runtime (below)
#   scripts/bench.sh load        the release server under loadgen (default config, loopback)
#   scripts/bench.sh gateway     the latency the OpenAI front and Envoy's ext_proc hop add
#   scripts/bench.sh overload    open loop at 1x/2x/4x the saturation rate, against the bounds
#   scripts/bench.sh fastpath    Route with the static student's fast path off and on
#
# encoder: throughput on the real prompt mix, tiergate vs ONNX Runtime, in one go. Both sides
# embed the very same token ids (the dev prompts tokenized by tiergate's own tokenizer,
# head+tail truncated at 256) at the same thread count, at batch 1 and in length-sorted
# batches; ORT's batches are padded to their longest sequence, ours are packed. Rounds
# alternate the sides so drifting machine load hits all alike; medians over rounds are
# printed, with the ratios tiergate / ORT.
#
# load: per round and precision, starts `tiergate serve` (release, embedded default config,
# embedding cache off) on 127.0.0.1:$PORT with metrics off, then: Route at concurrency 1
# and 32 and Verify at 16 on dev prompts, and Route at concurrency 1 on synthetic
# 32/64/128-token prompts; prints medians over rounds.
# The server is stopped (by its pid) on exit. Needs models/heads.json.
#
# gateway (issue 14): a stand-in upstream (one fixed chat completion, Python http.server),
# `tiergate serve` (release, embedded config plus: every catalog model's upstream on the
# stand-in, gateway.verify = "never" so the front is route-only, the HTTP front on, metrics
# off) and Envoy 1.40 (deploy/envoy.yaml on loopback, tiergate as its ext_proc). The same
# $N dev prompts (seeded sample), concurrency 1, $GW_ROUNDS rounds rotating the side order:
# (a) the stand-in direct, (b) the front with model "auto", (c) Envoy, (d) Route alone
# (grpcio). Prints p50/p99 per side and (b) - (a), (c) - (a) beside (d); first with the
# embedding cache off (each request runs the encoder), then on (every prompt embedded once in
# the warm-up, so tiergate's sides time the hops without the encoder). A request through
# (b)/(c) without x-tiergate-model (not routed, e.g. Envoy failing open) is an error.
# Every process it starts is stopped on exit. Needs target/gateway-venv
# (scripts/gateway-clients.sh).
#
# overload (issue 19): scripts/bench_overload.py (its header says what it does); arguments
# after `overload` go to it (e.g. --step-s 30 --multiples 1,2,4,8).
#
# fastpath (issue 15): per round, `tiergate serve` (release, embedded default config and
# catalog, embedding cache off) with Route's fast path off, then on at
# FAST_PATH_STABILITY (0.05) (the order alternating by round); Route on dev prompts at
# concurrency 1 (300 requests) and 32 (30 s); the share the student answered alone from the
# server's /metrics. Medians over rounds. FP_SOURCE and FP_CANDIDATES (comma list) narrow the
# prompts to one dev source and name Route's candidates (default: all prompts, the catalog).
#
# Env: PORT (50151), THREADS (default: all cores), ROUNDS (3), BATCH (32),
#      LIMIT (0 = all 905 prompts), GRAPHS ("fused fused-int8": ORT f32 and ORT's dynamic int8;
#      add "standard" to time ORT on a standard-op graph),
#      ORT_ARGS (extra onnx_peer.py flags, e.g. "--no-spin"), OUT (target/bench),
#      PRECISIONS (tiergate sides; default "bf16 int8 f32" on AVX512-BF16 CPUs, else "int8 f32";
#      int8@KERNEL runs int8 on a named kernel: int8@avx2, int8@avx-vnni, int8@avx512-vnni),
#      DATA (../shared/data/dev.jsonl.gz);
#      gateway: N (150 prompts), GW_ROUNDS (4), CACHE ("off on"), GW_PORT (50161; it uses 4).
# Needs: scripts/setup-model.sh done; python3 with onnx onnxruntime numpy safetensors.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
threads="${THREADS:-$(nproc)}"
rounds="${ROUNDS:-3}"
batch="${BATCH:-32}"
limit="${LIMIT:-0}"
graphs="${GRAPHS:-fused fused-int8}"
# Our sides: f32 (the reference, checked against ORT's embeddings), int8 (AVX2), and, where
# the CPU has AVX512-BF16, bf16 (the `precision = auto` default there).
if grep -q avx512_bf16 /proc/cpuinfo 2>/dev/null; then
  precisions="${PRECISIONS:-bf16 int8 f32}"
else
  precisions="${PRECISIONS:-int8 f32}"
fi
case " $precisions " in *" f32 "*) ;; *) echo "bench: PRECISIONS must include f32" >&2; exit 2 ;; esac
case "$precisions" in
  *@*) [ "${1:-encoder}" = encoder ] || { echo "bench: int8@KERNEL sides are for encoder mode" >&2; exit 2; } ;;
esac
out="${OUT:-target/bench}"
data="${DATA:-../shared/data/dev.jsonl.gz}"
what="${1:-encoder}"
lg=target/release/loadgen
mkdir -p "$out"

if [ "$what" = load ]; then
  port="${PORT:-50151}"
  cargo build --release --quiet --bin tiergate --bin loadgen
  srv=
  trap '[ -n "$srv" ] && kill "$srv" 2>/dev/null; wait 2>/dev/null || true' EXIT
  addr="127.0.0.1:$port"
  for r in $(seq 1 "$rounds"); do
    echo "== round $r/$rounds (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    for p in $precisions; do
      # A fresh server per round and precision, its embedding cache off: every request is
      # encoded (dev prompts repeat across scenarios and would otherwise hit the cache).
      target/release/tiergate serve --listen "$addr" --metrics-listen "" --precision "$p" \
        --embedding-cache 0 >"$out/server-$p.$r.log" 2>&1 &
      srv=$!
      "$lg" --addr "$addr" --data "$data" --concurrency 1 --requests 300 \
        --out "$out/$p-route-c1.$r.json"
      "$lg" --addr "$addr" --data "$data" --concurrency 32 --requests 2000 --duration 30 \
        --out "$out/$p-route-c32.$r.json"
      "$lg" --addr "$addr" --data "$data" --rpc verify --concurrency 16 --requests 1000 \
        --duration 30 --out "$out/$p-verify-c16.$r.json"
      for n in 32 64 128; do
        "$lg" --addr "$addr" --synthetic-tokens "$n" --concurrency 1 --requests 300 \
          --out "$out/$p-route-syn$n-c1.$r.json"
      done
      kill "$srv"; wait "$srv" 2>/dev/null || true; srv=
    done
  done
  python3 - "$out" "$rounds" $precisions <<'PY'
import json, statistics, sys
out, rounds, precisions = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print(f"\nmedians of {rounds} rounds (embedding cache off)")
print(f"{'scenario':<26}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'tokens':>8}{'errors':>8}")
summary = {}
for p in precisions:
    for name in ["route-c1", "route-c32", "verify-c16", "route-syn32-c1", "route-syn64-c1",
                 "route-syn128-c1"]:
        rs = [json.load(open(f"{out}/{p}-{name}.{r}.json")) for r in range(1, rounds + 1)]
        m = lambda f: statistics.median(f(x) for x in rs)  # noqa: E731
        row = {"rps": m(lambda x: x["throughput_rps"]), "p50": m(lambda x: x["latency_ms"]["p50"]),
               "p90": m(lambda x: x["latency_ms"]["p90"]), "p99": m(lambda x: x["latency_ms"]["p99"]),
               "tokens": m(lambda x: x["mean_input_tokens"]),
               "errors": sum(sum(x["errors"].values()) for x in rs)}
        summary[f"{p}-{name}"] = row
        print(f"{p + ' ' + name:<26}{row['rps']:>9.1f}{row['p50']:>9.2f}{row['p90']:>9.2f}"
              f"{row['p99']:>9.2f}{row['tokens']:>8.1f}{row['errors']:>8}")
json.dump(summary, open(f"{out}/load-summary.json", "w"), indent=2)
PY
  exit 0
fi
if [ "$what" = fastpath ]; then
  port="${PORT:-50151}"
  mport=$((port + 1))
  bar="${FAST_PATH_STABILITY:-0.05}"
  # FP_SOURCE: only that dev source's prompts; FP_CANDIDATES: Route's candidates (comma list).
  pick=()
  [ -n "${FP_SOURCE:-}" ] && pick+=(--source "$FP_SOURCE")
  [ -n "${FP_CANDIDATES:-}" ] && pick+=(--candidates "$FP_CANDIDATES")
  cargo build --release --quiet --bin tiergate --bin loadgen
  srv=
  trap '[ -n "$srv" ] && kill "$srv" 2>/dev/null; wait 2>/dev/null || true' EXIT
  addr="127.0.0.1:$port"
  for r in $(seq 1 "$rounds"); do
    echo "== round $r/$rounds (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    # The sides alternate which goes first, so drifting machine state hits both alike.
    order="off on"; [ $((r % 2)) = 0 ] && order="on off"
    for side in $order; do
      extra=()
      [ "$side" = on ] && extra=(--fast-path-stability "$bar")
      target/release/tiergate serve --listen "$addr" --metrics-listen "127.0.0.1:$mport" \
        --embedding-cache 0 "${extra[@]}" >"$out/server-fp-$side.$r.log" 2>&1 &
      srv=$!
      "$lg" --addr "$addr" --data "$data" --concurrency 1 --requests 300 "${pick[@]}" \
        --out "$out/fp-$side-c1.$r.json"
      "$lg" --addr "$addr" --data "$data" --concurrency 32 --requests 2000 --duration 30 \
        "${pick[@]}" --out "$out/fp-$side-c32.$r.json"
      python3 - "http://127.0.0.1:$mport/metrics" >"$out/fp-$side.$r.metrics.json" <<'PY'
import json, sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
n = {"alone": 0.0, "deferred": 0.0}
for line in text.splitlines():
    if line.startswith("tiergate_route_fast_path_total{"):
        for k in n:
            if f'result="{k}"' in line:
                n[k] += float(line.rsplit(" ", 1)[1])
json.dump(n, sys.stdout)
PY
      kill "$srv"; wait "$srv" 2>/dev/null || true; srv=
    done
  done
  python3 - "$out" "$rounds" "$bar" <<'PY'
import json, statistics, sys
out, rounds, bar = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print(f"\nmedians of {rounds} rounds (embedding cache off; fast path on at stability {bar})")
print(f"{'side':<14}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'errors':>8}{'alone':>8}")
for side in ["off", "on"]:
    ms = [json.load(open(f"{out}/fp-{side}.{r}.metrics.json")) for r in range(1, rounds + 1)]
    alone = sum(m["alone"] for m in ms) / max(1.0, sum(m["alone"] + m["deferred"] for m in ms))
    for c in ["c1", "c32"]:
        rs = [json.load(open(f"{out}/fp-{side}-{c}.{r}.json")) for r in range(1, rounds + 1)]
        m = lambda f: statistics.median(f(x) for x in rs)  # noqa: E731
        print(f"{side + ' ' + c:<14}{m(lambda x: x['throughput_rps']):>9.1f}"
              f"{m(lambda x: x['latency_ms']['p50']):>9.2f}{m(lambda x: x['latency_ms']['p90']):>9.2f}"
              f"{m(lambda x: x['latency_ms']['p99']):>9.2f}"
              f"{sum(sum(x['errors'].values()) for x in rs):>8}{100 * alone:>7.1f}%")
PY
  exit 0
fi

if [ "$what" = overload ]; then
  cargo build --release --quiet --bin tiergate --bin loadgen
  shift
  exec python3 scripts/bench_overload.py --data "$data" --out "$out/overload" "$@"
fi
if [ "$what" = gateway ]; then
  venv=target/gateway-venv/bin
  [ -x "$venv/envoy" ] && [ -x "$venv/python" ] || {
    echo "bench: $venv needs envoy and python: run scripts/gateway-clients.sh" >&2; exit 1; }
  cargo build --release --quiet --bin tiergate
  gp="${GW_PORT:-50161}"
  grpc=$gp http=$((gp + 1)) envoy=$((gp + 2)) stub=$((gp + 3))
  ports=(--stub "$stub" --grpc "$grpc" --http "$http" --envoy "$envoy")
  pids=()
  # Stop each process we started (by pid), whichever way the script ends.
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null || true' EXIT
  listening() {
    for _ in $(seq 1 600); do
      (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
      sleep 0.1
    done
    echo "bench: nothing listens on port $1" >&2; exit 1
  }
  "$venv/python" scripts/bench_gateway.py prep --out "$out/gateway" "${ports[@]}"
  "$venv/python" scripts/bench_gateway.py stub --port "$stub" & pids+=($!)
  "$venv/envoy" -c "$out/gateway/envoy.yaml" --disable-hot-restart --concurrency 1 -l warn \
    >"$out/gateway/envoy.log" 2>&1 & pids+=($!)
  files=()
  for c in ${CACHE:-off on}; do
    [ "$c" = on ] && size=4096 warm=--warm-all || size=0 warm=
    echo "== embedding cache $c (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    TIERGATE_DRAIN_LAME_DUCK_S=0 RUST_LOG=warn target/release/tiergate serve \
      --config "$out/gateway/tiergate.toml" --listen "127.0.0.1:$grpc" --metrics-listen "" \
      --http-listen "127.0.0.1:$http" --embedding-cache "$size" \
      >"$out/gateway/server-cache-$c.log" 2>&1 & srv=$!; pids+=($srv)
    for p in "$grpc" "$http" "$envoy" "$stub"; do listening "$p"; done
    "$venv/python" scripts/bench_gateway.py measure --label "embedding cache $c" $warm \
      --data "$data" --n "${N:-150}" --rounds "${GW_ROUNDS:-4}" \
      --out "$out/gateway/cache-$c.json" "${ports[@]}"
    files+=("$out/gateway/cache-$c.json")
    kill "$srv"; wait "$srv" 2>/dev/null || true
  done
  "$venv/python" scripts/bench_gateway.py summarize --json "$out/gateway-summary.json" "${files[@]}"
  exit 0
fi
[ "$what" = encoder ] || { echo "usage: scripts/bench.sh [encoder|load|gateway|overload|fastpath]" >&2; exit 2; }

if ! python3 -c "import onnx, onnxruntime, numpy, safetensors" 2>/dev/null; then
  echo "bench: python3 needs onnx onnxruntime numpy safetensors:" >&2
  echo "  python3 -m pip install onnx onnxruntime numpy safetensors" >&2
  exit 1
fi
cargo build --release --quiet --bin loadgen
"$lg" dump-ids --data "$data" --out "$out/ids.json"
# A second set for the short-prompt latency: the dev prompts of at least 64 tokens, cut to
# exactly 64 ([CLS], the first 62 ids, [SEP]).
python3 - "$out/ids.json" "$out/ids64.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["seqs"] = [s[:63] + [s[-1]] for s in d["seqs"] if len(s) >= 64][:200]
d["max_tokens"] = 64
json.dump(d, open(sys.argv[2], "w"))
PY

# A side is a precision, or int8@KERNEL: int8 on one named kernel this CPU has
# (TIERGATE_INT8_KERNEL), e.g. int8@avx2 to time AVX2-only CPUs' path on an AVX-512 box.
side() {
  local p=$1; shift
  case "$p" in
    *@*) TIERGATE_INT8_KERNEL="${p#*@}" "$lg" bench-encoder --precision "${p%@*}" "$@" ;;
    *) env -u TIERGATE_INT8_KERNEL "$lg" bench-encoder --precision "$p" "$@" ;;
  esac
}
for r in $(seq 1 "$rounds"); do
  echo "== round $r/$rounds (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  for p in $precisions; do
    side "$p" --ids "$out/ids.json" --threads "$threads" --batch "$batch" --reps 1 \
      --limit "$limit" --embeddings-out "$out/tiergate-$p.emb" \
      --out "$out/tiergate-$p.$r.json"
  done
  for g in $graphs; do
    python3 scripts/onnx_peer.py --ids "$out/ids.json" --threads "$threads" --batch "$batch" \
      --reps 1 --limit "$limit" --graph "$g" --tiergate-embeddings "$out/tiergate-f32.emb" \
      --out "$out/ort-$g.$r.json" ${ORT_ARGS:-}
  done
  # 64-token prompts: batch-1 latency only matters here, the batched pass is short.
  for p in $precisions; do
    side "$p" --ids "$out/ids64.json" --threads "$threads" --batch "$batch" --reps 1 \
      --out "$out/tiergate64-$p.$r.json"
  done
  for g in $graphs; do
    python3 scripts/onnx_peer.py --ids "$out/ids64.json" --threads "$threads" --batch "$batch" \
      --reps 1 --graph "$g" --out "$out/ort64-$g.$r.json" ${ORT_ARGS:-}
  done
done

python3 - "$out" "$rounds" "$precisions" $graphs <<'PY'
import json, statistics, sys
import numpy as np
out, rounds, precisions, graphs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
def load(name):
    return [json.load(open(f"{out}/{name}.{r}.json")) for r in range(1, rounds + 1)]
def med(reps, mode, key):
    return statistics.median(x[mode][key] if key != "p50" else x[mode]["latency_ms"]["p50"] for x in reps)
sides = {f"tiergate-{p}": load(f"tiergate-{p}") for p in precisions}
sides |= {f"ort-{g}": load(f"ort-{g}") for g in graphs}
t = sides["tiergate-f32"][0]
ref = np.fromfile(f"{out}/tiergate-f32.emb", dtype="<f4").reshape(t["sequences"], -1)
for p in precisions:
    if p != "f32":
        e = np.fromfile(f"{out}/tiergate-{p}.emb", dtype="<f4").reshape(ref.shape)
        c = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
        print(f"tiergate-{p} vs f32 embeddings: min cosine {c.min():.6f}, mean {c.mean():.7f}")
print(f"\n{t['sequences']} dev prompts, {t['tokens']} tokens (mean {t['tokens'] / t['sequences']:.1f}), "
      f"{t['threads']} threads, batch {t['batch']}, median of {rounds} rounds")
b = str(t["batch"])
print(f"{'side':<24}{'b1 seq/s':>10}{'b1 p50 ms':>11}{'b1 cpu ms/seq':>15}{'b' + b + ' seq/s':>12}"
      f"{'b' + b + ' cpu ms/seq':>16}")
rows = {}
for name, reps in sides.items():
    rows[name] = (med(reps, "batch1", "seqs_per_s"), med(reps, "batch1", "p50"),
                  med(reps, "batch1", "cpu_ms_per_seq"), med(reps, "batched", "seqs_per_s"),
                  med(reps, "batched", "cpu_ms_per_seq"))
    r = rows[name]
    print(f"{name:<24}{r[0]:>10.1f}{r[1]:>11.2f}{r[2]:>15.2f}{r[3]:>12.1f}{r[4]:>16.2f}")
for g, p in [(g, p) for g in graphs for p in precisions]:
    o, ti = rows[f"ort-{g}"], rows[f"tiergate-{p}"]
    print(f"ratio tiergate-{p} / ort-{g} (>1: tiergate better): batch 1 throughput x{ti[0] / o[0]:.2f}, "
          f"p50 latency x{o[1] / ti[1]:.2f}, cpu/seq x{o[2] / ti[2]:.2f}; batched throughput "
          f"x{ti[3] / o[3]:.2f}, cpu/seq x{o[4] / ti[4]:.2f}")
print("\n64-token prompts, batch 1 (median of rounds):")
for name in [f"tiergate64-{p}" for p in precisions] + [f"ort64-{g}" for g in graphs]:
    reps = load(name)
    print(f"  {name:<20} p50 {med(reps, 'batch1', 'p50'):.2f} ms, {med(reps, 'batch1', 'seqs_per_s'):.1f} seq/s")
for g in graphs:
    par = sides[f"ort-{g}"][0].get("parity", {})
    if "tiergate_min_cos" in par:
        print(f"ort-{g} vs tiergate f32 embeddings: min cosine {par['tiergate_min_cos']:.6f}, "
              f"mean {par.get('tiergate_mean_cos', float('nan')):.7f}")
keys = ["b1_seqs_per_s", "b1_p50_ms", "b1_cpu_ms_per_seq", "batched_seqs_per_s", "batched_cpu_ms_per_seq"]
json.dump({k: dict(zip(keys, v)) for k, v in rows.items()}, open(f"{out}/summary.json", "w"), indent=2)
PY
