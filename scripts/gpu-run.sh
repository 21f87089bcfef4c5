#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with target/gpu/ from scripts/gpu-pack.sh:
# puts the CUDA libraries on the loader path, then
#   1. gpu-check on the real (f16) model and dev prompts: kernels vs CPU references, CPU vs GPU
#      embeddings and route p_pass (eager and graph), forward timing eager vs graph per budget;
#   2. gpu-check --random-weights (timing on synthetic lengths 8..512);
#   3. the server on the CUDA backend (and each other backend in LOAD_BACKENDS, e.g. "cuda
#      cpu") under loadgen: Route c1/c64/c256, Verify c32, LOAD_S seconds each at most (20).
#   4. (STAGES with "cpu") the host's CPU as a CPU node: encoder bench per precision and
#      thread count, ONNX Runtime beside it.
# STAGES="check load" (default) picks the parts; SERVE_CPUS / LOADGEN_CPUS pin the server and
# loadgen (taskset lists) to size the server like a pod.
# Everything printed is also written to $OUT (default target/gpu/out), and bundled there as
# gpu-out.tgz. benches/GPU.md.
set -uo pipefail
cd "$(dirname "$0")/.."
g=target/gpu
out="${OUT:-$g/out}"
mkdir -p "$out"
[ -f "$g/tiergate.gz" ] || { echo "no $g/tiergate.gz: run scripts/gpu-pack.sh and carry target/gpu"; exit 2; }
# Unpacked outside target/gpu, so that a later carry of target/gpu stays under 64 MiB.
bin="$(mktemp -d)"
for b in tiergate loadgen; do
  [ -f "$g/$b.gz" ] && gunzip -c "$g/$b.gz" >"$bin/$b" && chmod +x "$bin/$b"
done
{ date -u; git rev-parse --short HEAD 2>/dev/null; nvidia-smi
  # The host CPU too: its flags say which CPU kernels the same binary would pick there.
  grep -m1 'model name' /proc/cpuinfo; nproc
  grep -o 'avx512[a-z_0-9]*\|avx_vnni\|amx[a-z_0-9]*\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
} 2>&1 | tee "$out/device.txt"
# A device call returns at most 8 files: on exit, everything here goes into one archive, and
# the loadgen JSON (in it) leaves the folder, so that the archive and the 7 text logs remain.
bundle() {
  tar czf "$bin/gpu-out.tgz" -C "$out" --exclude gpu-out.tgz . 2>/dev/null &&
    mv "$bin/gpu-out.tgz" "$out/" && rm -f "$out"/load-*.json
}
trap bundle EXIT

# A toolkit's libraries first: they match the driver, and PTX from an NVRTC newer than the
# driver does not load. Then the Python wheels' (nvidia/*/lib).
libs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libs="$libs:$d"
done
libs="$libs:$(python3 - <<'PY'
import glob, os, site, sys
dirs = set()
for b in set(site.getsitepackages() + [site.getusersitepackages()] + sys.path):
    for p in glob.glob(os.path.join(b, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(p))
print(":".join(sorted(dirs)))
PY
)"
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$out/device.txt"
ldconfig -p | grep -E 'libcuda\.so|libnvrtc|libcublas' | tee -a "$out/device.txt"

rc=0
stages="${STAGES:-check load}"
if [[ " $stages " == *" check "* ]]; then
  "$bin/tiergate" gpu-check --model-dir "$g/base-f16" --data "$g/prompts.jsonl.gz" \
    --prompts "${PROMPTS:-256}" --budgets 512,1024,2048,4096,8192,16384,32768 --runs "${RUNS:-30}" \
    2>&1 | tee "$out/gpu-check.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  "$bin/tiergate" gpu-check --random-weights --prompts 256 --budgets 1024,4096,16384,32768 \
    --runs "${RUNS:-30}" 2>&1 | tee "$out/gpu-check-random.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi

# One server per backend in LOAD_BACKENDS ("cuda"; "cuda cpu" adds the CPU backend on the same
# host for a same-machine ratio), each under the same loadgen runs, LOAD_S seconds at most each.
if [[ " $stages " == *" load "* ]] && [ -x "$bin/loadgen" ]; then
  addr=127.0.0.1:50161
  for backend in ${LOAD_BACKENDS:-cuda}; do
    log="$out/serve-$backend.log"
    # Tokenizing is on the CPU: on CUDA, give it the cores the encoder no longer needs.
    extra=()
    [ "$backend" = cuda ] && extra=(--tokenize-threads "${TOKENIZE_THREADS:-8}")
    # SERVE_CPUS / LOADGEN_CPUS (taskset lists, e.g. 0-3 and 4-15) size the server like a pod.
    ${SERVE_CPUS:+taskset -c "$SERVE_CPUS"} "$bin/tiergate" serve --backend "$backend" \
      --model-dir "$g/base-f16" --listen "$addr" --metrics-listen "" --embedding-cache 0 \
      ${SERVE_CPUS:+--threads "$(taskset -c "$SERVE_CPUS" nproc)"} "${extra[@]}" >"$log" 2>&1 &
    srv=$!
    trap 'kill "$srv" 2>/dev/null; bundle' EXIT
    # Wait for it to serve (on CUDA, start-up compiles the kernels and self-checks on the CPU).
    for _ in $(seq 1 120); do
      grep -q "warm-up done" "$log" 2>/dev/null && break
      kill -0 "$srv" 2>/dev/null || break
      sleep 1
    done
    if ! grep -q "warm-up done" "$log"; then
      echo "the server did not come up on the $backend backend:"; tail -5 "$log"; exit 1
    fi
    grep -E "listening local" "$log" | tee -a "$out/load-$backend.txt"
    # Warm-up requests first: on CUDA the first batch of each token bucket captures a graph.
    for s in ${LOAD_RUNS:-route:1:3000 route:64:60000 route:256:100000 verify:32:40000}; do
      IFS=: read -r rpc conc n <<<"$s"
      ${LOADGEN_CPUS:+taskset -c "$LOADGEN_CPUS"} "$bin/loadgen" --addr "$addr" \
        --data "$g/prompts.jsonl.gz" --rpc "$rpc" \
        --concurrency "$conc" --requests "$n" --warmup 200 --duration "${LOAD_S:-20}" \
        --out "$out/load-$backend-$rpc-c$conc.json" 2>&1 | tee -a "$out/load-$backend.txt"
    done
    kill "$srv"; wait "$srv" 2>/dev/null
  done
fi
# The GPU host's CPU as a CPU node: the encoder bench (loadgen bench-encoder) per precision
# and thread count, and ONNX Runtime (scripts/onnx_peer.py, the image's onnxruntime) on the
# same ids beside it. Weights are the f16 export widened back to f32 by both sides.
if [[ " $stages " == *" cpu "* ]]; then
  ids="$bin/ids.json"
  "$bin/loadgen" dump-ids --model-dir "$g/base-f16" --data "$g/prompts.jsonl.gz" --out "$ids"
  n="${CPU_LIMIT:-128}"
  for s in ${CPU_RUNS-int8:1 int8:2 int8:4 int8:8 int8:16 bf16:2 bf16:16 f32:2 f32:16}; do
    IFS=: read -r prec t <<<"$s"
    "$bin/loadgen" bench-encoder --ids "$ids" --model-dir "$g/base-f16" --precision "$prec" \
      --threads "$t" --limit "$n" --reps 2 2>&1 | grep -v ' INFO \| WARN ' | tee -a "$out/cpu.txt"
  done
  for s in ${ORT_RUNS-fused:2 fused:16 fused-int8:16}; do
    IFS=: read -r graph t <<<"$s"
    python3 scripts/onnx_peer.py --model-dir "$g/base-f16" --ids "$ids" --threads "$t" \
      --graph "$graph" --limit "$n" --reps 2 --min-cos 0.999 2>&1 | grep -v parity | tee -a "$out/cpu.txt"
  done
fi
exit "$rc"
