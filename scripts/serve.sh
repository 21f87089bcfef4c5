#!/usr/bin/env bash
# Fetches the model if needed and runs the service on its embedded default (CPU, bundled heads).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-model.sh
exec cargo run --release -- serve "$@"
