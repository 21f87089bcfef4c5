#!/usr/bin/env bash
# `buf lint` on proto/ (rules and their reasons in proto/buf.yaml), with buf pinned from npm
# (@bufbuild/buf) under ~/.cache/tiergate; installs npm from Debian when it is missing.
# Idempotent; seconds when warm.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.75.0
tools="${XDG_CACHE_HOME:-$HOME/.cache}/tiergate/buf-$version"
buf="$tools/node_modules/.bin/buf"
if [ ! -x "$buf" ]; then
  if ! command -v npm >/dev/null; then
    apt-get install -y -qq npm >/dev/null 2>&1 || sudo apt-get install -y -qq npm >/dev/null 2>&1 ||
      { echo "check-proto: npm is required to install buf" >&2; exit 1; }
  fi
  mkdir -p "$tools"
  npm install --prefix "$tools" --silent --no-audit --no-fund "@bufbuild/buf@$version" >/dev/null
fi
(cd proto && "$buf" lint)
echo "check-proto: buf $("$buf" --version) lint: ok"
