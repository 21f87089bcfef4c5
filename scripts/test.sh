#!/usr/bin/env bash
# Everything the tests need, then the tests: model fetch (idempotent), lints, the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-model.sh
# NVRTC from PyPI lets the kernel-compile test compile kernels/*.cu without a GPU; without it
# that test says it skipped.
. ./scripts/nvrtc-env.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
