#!/usr/bin/env python3
"""The checks of scripts/check-deploy.sh that need Python (PyYAML, jsonschema: the tool venv).

  check_deploy.py RENDER_DIR [--write]

RENDER_DIR holds <name>.yaml, the kustomize output of deploy/k8s/base and each overlay. Checks
the Dockerfile (stub targets, user, entrypoint), the rendered manifests (CRDs against the
hand-written schemas in deploy/k8s/schemas, probes, drain, security, autoscaling), runs the
argv each Deployment x image stage produces through `tiergate config` when a built binary is
there, checks deploy/k8s/rendered/*.json are current, the dashboard and alert files, and that
deploy/metrics-used.txt lists exactly the metrics they query. Writes RENDER_DIR/promql.yaml
(every dashboard and KEDA query as a recording rule) for `promtool check rules`.
--write regenerates deploy/k8s/rendered/*.json, deploy/metrics-used.txt and the ConfigMap's
copy of tiergate.toml instead of comparing them. Exit 1 on any failure, after listing them all.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CRD_SCHEMAS = {"PodMonitor": "podmonitor.json", "ScaledObject": "scaledobject.json"}
RENDERED = ("cpu", "gpu")  # overlays committed as deploy/k8s/rendered/<name>.json
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m",
                "$namespace": ".*", "$pod": ".*", "$batch_budget": "8192"}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"check-deploy: FAIL: {msg}")


def ok(msg):
    print(f"check-deploy: ok: {msg}")


# ---------------------------------------------------------------------------------- Dockerfile
def dockerfile_stages():
    """[(name, {entrypoint, cmd, env, user})] in order, as tests/deploy.rs reads them."""
    stages, cur = [], None
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if line.startswith("FROM "):
            parts = line[5:].split(" AS ")
            cur = {"name": parts[1].strip() if len(parts) > 1 else "default", "from": parts[0].strip(),
                   "entrypoint": None, "cmd": None, "env": {}, "user": None}
            stages.append(cur)
        elif cur is None:
            continue
        elif line.startswith("ENTRYPOINT "):
            cur["entrypoint"] = json.loads(line[len("ENTRYPOINT "):])
        elif line.startswith("CMD "):
            cur["cmd"] = json.loads(line[4:])
        elif line.startswith("ENV "):
            for pair in line[4:].split():
                k, _, v = pair.partition("=")
                cur["env"][k] = v
        elif line.startswith("USER "):
            cur["user"] = line[5:].strip()
    return stages


def cargo_targets():
    """Source files of every target Cargo.toml names (explicitly or by convention)."""
    paths, section, entry = set(), None, {}

    def close():
        if section == "lib":
            paths.add(entry.get("path", "src/lib.rs"))
        elif section in ("bin", "bench", "example", "test"):
            if "path" in entry:
                paths.add(entry["path"])
            elif section == "bench":
                paths.add(f"benches/{entry.get('name')}.rs")
            elif section == "bin" and entry.get("name"):
                paths.add(f"src/bin/{entry['name']}.rs")

    for raw in (ROOT / "Cargo.toml").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        m = re.match(r"^\[\[?([A-Za-z0-9_.\"-]+)\]?\]$", line)
        if m:
            close()
            section, entry = m.group(1), {}
            continue
        m = re.match(r'^(name|path)\s*=\s*"([^"]*)"', line)
        if m and section in ("lib", "bin", "bench", "example", "test"):
            entry[m.group(1)] = m.group(2)
    close()
    if (ROOT / "src/main.rs").exists():
        paths.add("src/main.rs")
    return paths


def check_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = dockerfile_stages()
    images = [s for s in stages if s["entrypoint"]]
    if {s["name"] for s in images} != {"cpu", "gpu"}:
        fail(f"Dockerfile: expected image stages cpu and gpu, found {[s['name'] for s in images]}")
    if stages and stages[-1]["name"] != "cpu":
        fail("Dockerfile: the cpu stage must be last (the default target)")
    uids = set()
    for s in images:
        if s["entrypoint"] != ["/app/tiergate"] or s["cmd"] != ["serve"]:
            fail(f"Dockerfile {s['name']}: ENTRYPOINT {s['entrypoint']} CMD {s['cmd']}, want [\"/app/tiergate\"] and [\"serve\"]")
        for k in ("TIERGATE_LISTEN", "TIERGATE_METRICS_LISTEN"):
            if k not in s["env"]:
                fail(f"Dockerfile {s['name']}: no ENV {k}")
        if not s["user"] or not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", s["user"]):
            fail(f"Dockerfile {s['name']}: USER {s['user']!r} must be a numeric non-root uid[:gid]")
        else:
            uids.add(int(s["user"].split(":")[0]))
    if not re.search(r"^ARG CUDA_VERSION=\S+", text, re.M) or not any(
            "${CUDA_VERSION}" in s["from"] for s in stages if s["name"] == "gpu"):
        fail("Dockerfile: the gpu stage's base must come from ARG CUDA_VERSION")
    missing = [p for p in sorted(cargo_targets())
               if not re.search(r"(> |touch )" + re.escape(p) + r"\b", text)]
    if missing:
        fail(f"Dockerfile: the dependency layer has no stub for {missing} (a target in Cargo.toml)")
    ignore = (ROOT / ".dockerignore")
    if not ignore.exists():
        fail(".dockerignore is missing")
    else:
        lines = {l.strip().strip("/") for l in ignore.read_text().splitlines()}
        for need in ("target", ".git", "models/base"):
            if need not in lines:
                fail(f".dockerignore does not exclude {need}")
    if not failures:
        ok(f"Dockerfile: stages {[s['name'] for s in images]}, user {sorted(uids)}, stubs for {len(cargo_targets())} Cargo targets")
    return stages, uids


# --------------------------------------------------------------------------------- manifests
def proto_router_service():
    text = (ROOT / "proto/tiergate/v1/tiergate.proto").read_text()
    pkg = re.search(r"^package\s+([\w.]+);", text, re.M).group(1)
    return f"{pkg}.Router"


def load_rendered(render_dir):
    out = {}
    for f in sorted(Path(render_dir).glob("*.yaml")):
        if f.name == "promql.yaml":
            continue
        out[f.stem] = [d for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def find(docs, kind, name=None):
    return [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).get("matchLabels", {}).items())


def check_crds(name, docs):
    n = 0
    for d in docs:
        schema_file = CRD_SCHEMAS.get(d.get("kind"))
        if not schema_file:
            continue
        schema = json.loads((DEPLOY / "k8s/schemas" / schema_file).read_text())
        errs = sorted(jsonschema.Draft202012Validator(schema).iter_errors(d), key=lambda e: list(e.path))
        for e in errs:
            fail(f"{name}: {d['kind']}/{d['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        n += 1
    return n


def check_deployment(name, docs, dep, uids, router):
    where = f"{name}: Deployment/{dep['metadata']['name']}"
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(f"{where}: pod securityContext needs runAsNonRoot and seccompProfile RuntimeDefault")
    if psc.get("runAsUser") not in uids:
        fail(f"{where}: runAsUser {psc.get('runAsUser')} is not the image's USER {sorted(uids)}")
    if pod.get("enableServiceLinks") is not False:
        fail(f"{where}: enableServiceLinks must be false (a Service named tiergate injects TIERGATE_* variables)")
    if "replicas" in dep["spec"]:
        fail(f"{where}: replicas is set; the autoscaler owns it")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        cw = f"{where} container {c['name']}"
        if "command" in c:
            fail(f"{cw}: `command` replaces the image's ENTRYPOINT")
        req = c.get("resources", {}).get("requests", {})
        if "cpu" not in req or "memory" not in req:
            fail(f"{cw}: needs cpu and memory requests")
        sc = c.get("securityContext", {})
        if not (sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
                and "ALL" in sc.get("capabilities", {}).get("drop", []) and sc.get("runAsNonRoot") is True):
            fail(f"{cw}: securityContext needs readOnlyRootFilesystem, no privilege escalation, drop ALL, runAsNonRoot")
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        if "/tmp" not in mounts or "emptyDir" not in volumes.get(mounts["/tmp"]["name"], {}):
            fail(f"{cw}: the read-only root needs an emptyDir at /tmp")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        grpc_port = ports.get("grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c.get(probe, {}).get("grpc")
            if not p or p.get("port") != grpc_port:
                fail(f"{cw}: {probe} must be a grpc probe on the grpc port {grpc_port}")
        if c.get("readinessProbe", {}).get("grpc", {}).get("service") != router:
            fail(f"{cw}: readinessProbe must check the service health reports, {router}")
        cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
        if cmd and len(cmd) == 2 and cmd[0] == "sleep":
            sleep = int(cmd[1])
        if sleep is None:
            fail(f"{cw}: preStop must sleep (the endpoints update before SIGTERM closes the listener)")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if sleep is not None:
            # The whole shutdown: preStop, tiergate's lame duck and drain bound (the config's
            # [drain], or the container's overrides), and 5 s for the process to exit.
            drain = tomllib.loads((DEPLOY / "k8s/base/tiergate.toml").read_text()).get("drain", {})
            lame = int(env.get("TIERGATE_DRAIN_LAME_DUCK_S") or drain.get("lame_duck_s", 5))
            bound = int(env.get("TIERGATE_DRAIN_TIMEOUT_S") or drain.get("timeout_s", 25))
            if grace < sleep + lame + bound + 5:
                fail(f"{cw}: terminationGracePeriodSeconds {grace} < preStop {sleep} s + drain.lame_duck_s {lame} s"
                     f" + drain.timeout_s {bound} s + 5 s to exit")
        limits = c.get("resources", {}).get("limits", {})
        if "nvidia.com/gpu" in limits:
            if pod.get("runtimeClassName") != "nvidia" or not any(
                    t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
                fail(f"{cw}: a GPU pod needs runtimeClassName nvidia and the nvidia.com/gpu toleration")
            if env.get("TIERGATE_BACKEND") != "cuda" or "TIERGATE_TOKENIZE_THREADS" not in env:
                fail(f"{cw}: a GPU pod needs TIERGATE_BACKEND=cuda and TIERGATE_TOKENIZE_THREADS")
            # A surge pod needs a whole free GPU: in a full pool the rollout would stall.
            surge = dep["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", "25%")
            if str(surge) not in ("0", "0%"):
                fail(f"{cw}: a GPU Deployment rolls out with maxSurge 0 (found {surge!r})")
        for pm in find(docs, "PodMonitor"):
            if selects(pm["spec"]["selector"], labels):
                for ep in pm["spec"]["podMetricsEndpoints"]:
                    if ep.get("port") not in ports:
                        fail(f"{name}: PodMonitor/{pm['metadata']['name']} scrapes port {ep.get('port')!r}, not a port of {cw}")
    for v in volumes.values():
        cm = v.get("configMap", {}).get("name")
        if cm and not find(docs, "ConfigMap", cm):
            fail(f"{where}: volume {v['name']} names ConfigMap {cm}, which is not rendered")
    pdbs = [p for p in find(docs, "PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
    nps = [p for p in find(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
    if not pdbs or not nps:
        fail(f"{where}: needs a PodDisruptionBudget and a NetworkPolicy selecting its pods")
    dname = dep["metadata"]["name"]
    hpas = [h for h in find(docs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == dname]
    sos = [s for s in find(docs, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == dname]
    if len(hpas) + len(sos) != 1:
        fail(f"{where}: exactly one autoscaler must drive it, found {len(hpas)} HPA and {len(sos)} ScaledObject")
    for s in sos:
        ns = s["metadata"].get("namespace")
        if s["spec"].get("minReplicaCount", 0) < 2:
            fail(f"{name}: ScaledObject/{s['metadata']['name']}: minReplicaCount < 2 leaves the PDB nothing to keep")
        for t in s["spec"]["triggers"]:
            q = t["metadata"].get("query")
            if q is not None and f'namespace="{ns}"' not in q:
                fail(f"{name}: ScaledObject trigger {t.get('name')}: query does not select namespace {ns!r}: {q}")
    for h in hpas:
        if h["spec"].get("minReplicas", 1) < 2:
            fail(f"{name}: HorizontalPodAutoscaler/{h['metadata']['name']}: minReplicas < 2")


def run_argv(docs_by_name, stages):
    """Each Deployment x image stage: the argv and env the pod gets, through `tiergate config`."""
    binary = Path(os.environ.get("TIERGATE_BIN", ROOT / "target/debug/tiergate"))
    if not binary.exists():
        print(f"check-deploy: skipped: the deployed argv through `tiergate config` ({binary} not built; "
              "scripts/test.sh runs this after cargo test)")
        return
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    n = 0
    for name, docs in docs_by_name.items():
        for dep in find(docs, "Deployment"):
            pod = dep["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                with tempfile.TemporaryDirectory() as tmp:
                    # The ConfigMaps the container mounts, as files under tmp.
                    remap = {}
                    for m in c.get("volumeMounts", []):
                        cm = volumes.get(m["name"], {}).get("configMap", {}).get("name")
                        if not cm:
                            continue
                        d = Path(tmp) / m["name"]
                        d.mkdir()
                        for k, v in find(docs, "ConfigMap", cm)[0].get("data", {}).items():
                            (d / k).write_text(v)
                        remap[m["mountPath"]] = str(d)

                    def local(v):
                        for mp, d in remap.items():
                            if v == mp or v.startswith(mp + "/"):
                                return d + v[len(mp):]
                        return v
                    env = {e["name"]: local(e["value"]) for e in c.get("env", []) if "value" in e}
                    for s in stages:
                        if not s["entrypoint"]:
                            continue
                        tail = [local(a) for a in c["args"]] if "args" in c else s["cmd"]
                        argv = s["entrypoint"][1:] + tail
                        if argv.count("serve") != 1:
                            fail(f"{name} x {s['name']}: argv {argv} must say serve exactly once")
                            continue
                        argv[argv.index("serve")] = "config"
                        r = subprocess.run([str(binary)] + argv, cwd=ROOT, capture_output=True, text=True,
                                           env={**base_env, **s["env"], **env}, timeout=60)
                        want = ['listen = "0.0.0.0:50051"', 'metrics_listen = "0.0.0.0:9464"']
                        if r.returncode != 0 or not all(w in r.stdout for w in want):
                            fail(f"{name} x image {s['name']}: tiergate {argv} with env {env}: rc {r.returncode}: "
                                 f"{r.stderr.strip() or r.stdout[:300]}")
                        n += 1
    ok(f"{n} deployed argv/env combinations pass `tiergate config` (ConfigMap mounted, listen 0.0.0.0)")


def check_rendered_files(docs_by_name, write):
    for name in RENDERED:
        path = DEPLOY / "k8s/rendered" / f"{name}.json"
        items = sorted(docs_by_name[name], key=lambda d: (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]))
        lst = {"apiVersion": "v1", "kind": "List", "items": items}
        if write:
            path.write_text(json.dumps(lst, indent=1, sort_keys=True) + "\n")
            ok(f"wrote {path.relative_to(ROOT)}")
        elif not path.exists() or json.loads(path.read_text()) != lst:
            fail(f"{path.relative_to(ROOT)} is not the render of deploy/k8s/overlays/{name}: run scripts/check-deploy.sh --write")
    if not write:
        ok(f"deploy/k8s/rendered/{{{','.join(RENDERED)}}}.json match the overlays")


# ------------------------------------------------------------------------- dashboard, alerts
def dashboard_exprs():
    dash = json.loads((DEPLOY / "grafana/tiergate.json").read_text())
    ids, exprs = set(), []
    vars_defined = {"$" + v["name"] for v in dash.get("templating", {}).get("list", [])}
    for p in dash["panels"]:
        if p["id"] in ids:
            fail(f"dashboard: panel id {p['id']} twice")
        ids.add(p["id"])
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}" or "gridPos" not in p or not p.get("targets"):
            fail(f"dashboard: panel {p.get('title')!r} needs the ${{datasource}} datasource, gridPos and targets")
        for t in p.get("targets", []):
            e = t.get("expr", "")
            if not e:
                fail(f"dashboard: panel {p.get('title')!r} has a target without expr")
            for v in re.findall(r"\$[A-Za-z_]+", e):
                if v not in vars_defined and not v.startswith("$__"):
                    fail(f"dashboard: panel {p.get('title')!r} uses undefined variable {v}")
            exprs.append((p["title"], e))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query", "")
        m = re.match(r"label_values\((.*),\s*\w+\)$", q or "")
        if m:
            exprs.append((f"variable {v['name']}", m.group(1)))
    return exprs


def alert_exprs():
    doc = yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())
    exprs = []
    for g in doc.get("groups", []):
        for r in g.get("rules", []):
            name = r.get("alert") or r.get("record")
            if "alert" in r:
                if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                    fail(f"alerts: {name}: labels.severity must be critical, warning or info")
                if not r.get("annotations", {}).get("summary") or "for" not in r:
                    fail(f"alerts: {name}: needs `for` and annotations.summary")
            exprs.append((name, r["expr"]))
    names = {n for n, _ in exprs}
    for need in ("TiergateNotServing", "TiergateErrorRatio", "TiergateQueueTimeHigh", "TiergateBackendFallback"):
        if need not in names:
            fail(f"alerts: {need} is missing")
    return exprs


def check_metrics(docs_by_name, render_dir, write):
    dash = dashboard_exprs()
    alerts = alert_exprs()
    keda = []
    for name, docs in docs_by_name.items():
        for s in find(docs, "ScaledObject"):
            for t in s["spec"]["triggers"]:
                if "query" in t["metadata"]:
                    keda.append((f"{name} ScaledObject {t.get('name')}", t["metadata"]["query"]))
    used = set()
    for _, e in dash + alerts + keda:
        used |= set(re.findall(r"\btiergate_[a-z0-9_]+\b", e))
    listed_path = DEPLOY / "metrics-used.txt"
    if write:
        listed_path.write_text("".join(f"{m}\n" for m in sorted(used)))
        ok(f"wrote {listed_path.relative_to(ROOT)} ({len(used)} names)")
    else:
        listed = set(l.strip() for l in listed_path.read_text().splitlines() if l.strip()) if listed_path.exists() else set()
        if listed != used:
            fail(f"deploy/metrics-used.txt differs from the queries: missing {sorted(used - listed)}, "
                 f"not queried {sorted(listed - used)} (scripts/check-deploy.sh --write)")
        else:
            ok(f"deploy/metrics-used.txt lists the {len(used)} metric names the dashboard, alerts and KEDA query")
    # That the server exports every one of them is tests/metrics_used.rs's to check.
    # Every dashboard and KEDA query as a recording rule: promtool parses them all.
    rules = []
    for i, (title, e) in enumerate(dash + keda):
        for k, v in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
            e = e.replace(k, v)
        slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
        rules.append({"record": f"check:q{i}_{slug}", "expr": e})
    (Path(render_dir) / "promql.yaml").write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    ok(f"dashboard: {len(dash)} queries; alerts: {len(alerts)} rules; KEDA: {len(keda)} queries")


def check_config_copy(write):
    """The ConfigMap's tiergate.toml is the repository's default config (comments aside)."""
    copy, orig = DEPLOY / "k8s/base/tiergate.toml", ROOT / "tiergate.toml"
    if write:
        copy.write_bytes(orig.read_bytes())
        ok(f"wrote {copy.relative_to(ROOT)}")
        return
    try:
        import tomllib
        same = tomllib.loads(copy.read_text()) == tomllib.loads(orig.read_text())
    except ImportError:  # Python < 3.11: byte for byte
        same = copy.read_bytes() == orig.read_bytes()
    if not same:
        fail(f"{copy.relative_to(ROOT)} (the ConfigMap) differs from tiergate.toml: scripts/check-deploy.sh --write copies it")
    else:
        ok(f"{copy.relative_to(ROOT)} has the settings of tiergate.toml")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    write = "--write" in sys.argv
    render_dir = args[0]
    stages, uids = check_dockerfile()
    check_config_copy(write)
    docs_by_name = load_rendered(render_dir)
    router = proto_router_service()
    crds, before = 0, len(failures)
    for name, docs in docs_by_name.items():
        crds += check_crds(name, docs)
        for dep in find(docs, "Deployment"):
            check_deployment(name, docs, dep, uids, router)
    if len(failures) == before:
        ok(f"{', '.join(docs_by_name)}: {crds} custom resources match deploy/k8s/schemas; probes ({router}), "
           "drain, security, autoscaling as required")
    run_argv({k: v for k, v in docs_by_name.items() if k != "base"}, stages)
    check_rendered_files(docs_by_name, write)
    check_metrics(docs_by_name, render_dir, write)
    if failures:
        print(f"check-deploy: {len(failures)} failure(s)")
        sys.exit(1)


if __name__ == "__main__":
    main()
