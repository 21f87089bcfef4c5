#!/usr/bin/env bash
# The real Portkey AI gateway for tests/gateway_portkey.rs: npm @portkey-ai/gateway, pinned,
# installed under ~/.cache/tiergate (about 25 MB; npm from Debian when missing) and linked as
# target/portkey-gateway. Idempotent; instant when installed.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.15.2
tools="${XDG_CACHE_HOME:-$HOME/.cache}/tiergate/portkey-gateway-$version"
if [ ! -f "$tools/node_modules/@portkey-ai/gateway/build/start-server.js" ]; then
  if ! command -v npm >/dev/null; then
    apt-get install -y -qq npm >/dev/null 2>&1 || sudo apt-get install -y -qq npm >/dev/null 2>&1 ||
      { echo "gateway-portkey: npm is required to install @portkey-ai/gateway" >&2; exit 1; }
  fi
  mkdir -p "$tools"
  npm install --prefix "$tools" --silent --no-audit --no-fund "@portkey-ai/gateway@$version" >/dev/null
fi
mkdir -p target
ln -sfn "$tools" target/portkey-gateway
