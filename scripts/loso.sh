#!/usr/bin/env bash
# Leave-one-source-out: for each source S, train heads without S, then replay S's dev rows
# with them (the kNN baseline also leaves S out) and collect the figures in one table.
# Writes only under $OUT (default /tmp/loso); never touches models/heads.json or models/README.md.
# Usage: scripts/loso.sh [SOURCE ...]   (default: all three sources)
# Env: OUT, DATA (default ../shared/data), BIN (default target/release/tiergate), EXTRA_TRAIN,
#      EXTRA_EVAL (extra flags, e.g. EXTRA_TRAIN="--max-prompts 500" for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loso}
DATA=${DATA:-../shared/data}
BIN=${BIN:-target/release/tiergate}
SOURCES=("$@")
if [ ${#SOURCES[@]} -eq 0 ]; then
  SOURCES=(alpaca_eval2_wgpt4t mmlu_pro routerbench_0shot)
fi
[ -x "$BIN" ] || cargo build --release
mkdir -p "$OUT"
for S in "${SOURCES[@]}"; do
  t0=$(date +%s)
  heads="$OUT/heads-wo-$S.json"
  if [ ! -s "$heads" ]; then
    # shellcheck disable=SC2086
    "$BIN" train --data-dir "$DATA" --exclude-source "$S" --out "$heads" --card "$OUT/card-wo-$S.md" \
      ${EXTRA_TRAIN:-} 2> "$OUT/train-wo-$S.log"
  fi
  t1=$(date +%s)
  # shellcheck disable=SC2086
  "$BIN" eval --heads "$heads" --data "$DATA/dev.jsonl.gz" --train "$DATA/train.jsonl.gz" \
    --source "$S" --knn-exclude-source "$S" --out-dir "$OUT/$S" ${EXTRA_EVAL:-} \
    2> "$OUT/eval-$S.log"
  t2=$(date +%s)
  echo "$S: train $((t1 - t0)) s, eval $((t2 - t1)) s" >&2
done
python3 - "$OUT" "${SOURCES[@]}" <<'PY'
import json, sys
out, sources = sys.argv[1], sys.argv[2:]
fmt = lambda v, p="": "n/a" if v is None else f"{v:.3f}" if not p else f"{v:.1f}%"
print("| left-out source | router AUROC | kNN AUROC | verifier AUROC | saved@98% route | saved@98% kNN "
      "| saved@98% route utility | saved@98% kNN utility "
      "| saved@98% cascade | APGR router | APGR kNN | CPT50 router |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in sources:
    e = json.load(open(f"{out}/{s}/eval.json"))["sources"][s]
    red, pair = e["cost_reduction_at_target"], e["pair_routing"]
    g = lambda k, f: (pair.get(k) or {}).get(f)
    print(f"| {s} | {fmt(e['router']['auroc'])} | {fmt(e['knn']['auroc'])} | {fmt(e['verifier']['auroc'])} "
          f"| {fmt(red['route']['saved_pct'], '%')} | {fmt(red['knn']['saved_pct'], '%')} "
          f"| {fmt(red.get('route_utility', {}).get('saved_pct'), '%')} "
          f"| {fmt(red.get('knn_utility', {}).get('saved_pct'), '%')} "
          f"| {fmt(red['cascade']['saved_pct'], '%')} | {fmt(g('router', 'apgr'))} | {fmt(g('knn', 'apgr'))} "
          f"| {fmt(g('router', 'cpt50_pct'), '%')} |")
PY
