#!/usr/bin/env bash
# Packs what one `tiergate gpu-check` run on a GPU machine needs into target/gpu/ (no GPU or
# CUDA needed here): the stripped binary, the encoder as f16 (43 MiB), and the first
# distinct dev prompts. benches/GPU.md says how to carry and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-model.sh
cargo build --profile dist --bin tiergate --bin loadgen
out=target/gpu
rm -rf "$out" && mkdir -p "$out"
target/dist/tiergate export-f16 --model-dir models/base --out "$out/base-f16"
python3 - "${DATA:-../shared/data/dev.jsonl.gz}" "$out/prompts.jsonl.gz" "${PROMPTS:-512}" <<'PY'
import gzip, json, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = set()
with gzip.open(src, "rt") as f, gzip.open(dst, "wt") as g:
    for line in f:
        row = json.loads(line)
        if row["prompt_id"] in seen:
            continue
        seen.add(row["prompt_id"])
        g.write(line)
        if len(seen) == n:
            break
print(f"{dst}: {len(seen)} prompts")
PY
# Compressed: the carry limit is 64 MiB and the f16 weights take 44 of it.
for b in tiergate loadgen; do gzip -9 -c "target/dist/$b" >"$out/$b.gz"; done
du -b -s "$out" | awk '{printf "%s: %.1f MiB (carry limit 64 MiB)\n", $2, $1 / 1048576}'
cat <<'TXT'
On the GPU machine (repository root, target/gpu carried):
  ./scripts/gpu-run.sh
TXT
