//! The container starts with the argv the deploy files give it: the Dockerfile's ENTRYPOINT
//! and CMD (each image stage), replaced by a manifest's `args` where it has them, with the
//! stage's ENV and the manifest's env (the rendered kustomize overlays, their ConfigMap
//! mounted). `tiergate config` takes the same flags as `serve`, so
//! running it with that argv (`serve` swapped for `config`) must succeed; a doubled `serve`
//! (an entrypoint and args that both name it) makes clap exit 2 and the pod crash-loop.
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// An image stage: its name, ENTRYPOINT and CMD (exec form) and ENV.
type Stage = (String, Vec<String>, Vec<String>, Env);
type Env = BTreeMap<String, String>;

/// Every image stage of the Dockerfile.
fn stages() -> Vec<Stage> {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    let mut out = Vec::new();
    let mut cur: Option<Stage> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("FROM ") {
            if let Some(c) = cur.take() {
                out.push(c);
            }
            let name = rest.split(" AS ").nth(1).unwrap_or("default").to_string();
            cur = Some((name, vec![], vec![], BTreeMap::new()));
        } else if let Some(c) = cur.as_mut() {
            if let Some(j) = line.strip_prefix("ENTRYPOINT ") {
                c.1 = serde_json::from_str(j).expect("ENTRYPOINT in exec form");
            } else if let Some(j) = line.strip_prefix("CMD ") {
                c.2 = serde_json::from_str(j).expect("CMD in exec form");
            } else if let Some(kv) = line.strip_prefix("ENV ") {
                for pair in kv.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("ENV k=v");
                    c.3.insert(k.into(), v.into());
                }
            }
        }
    }
    out.extend(cur);
    out.into_iter().filter(|s| !s.1.is_empty()).collect()
}

/// The container `args` (None where it sets none) and env of every Deployment in the rendered
/// overlays (deploy/k8s/rendered, kept current by scripts/check-deploy.sh). The ConfigMaps a
/// container mounts are written under `dir`, and values pointing into a mount point there.
fn manifests(dir: &Path) -> Vec<(Option<Vec<String>>, Env)> {
    let mut out = Vec::new();
    for pool in ["cpu", "gpu"] {
        let path = root().join(format!("deploy/k8s/rendered/{pool}.json"));
        let text = std::fs::read_to_string(&path).expect("rendered manifest");
        let list: serde_json::Value = serde_json::from_str(&text).expect("rendered JSON");
        let items = list["items"].as_array().expect("a List");
        for dep in items.iter().filter(|i| i["kind"] == "Deployment") {
            let spec = &dep["spec"]["template"]["spec"];
            for c in spec["containers"].as_array().expect("containers") {
                let mut mounts: Vec<(String, std::path::PathBuf)> = Vec::new();
                for m in c["volumeMounts"].as_array().into_iter().flatten() {
                    let volume = spec["volumes"]
                        .as_array()
                        .and_then(|vs| vs.iter().find(|v| v["name"] == m["name"]))
                        .expect("mounted volume");
                    let Some(name) = volume["configMap"]["name"].as_str() else {
                        continue;
                    };
                    let cm = items
                        .iter()
                        .find(|i| i["kind"] == "ConfigMap" && i["metadata"]["name"] == name)
                        .expect("the mounted ConfigMap is rendered");
                    let local = dir.join(format!(
                        "{pool}-{}",
                        m["name"].as_str().expect("mount name")
                    ));
                    std::fs::create_dir_all(&local).expect("mount dir");
                    for (file, data) in cm["data"].as_object().expect("data") {
                        std::fs::write(local.join(file), data.as_str().expect("text data"))
                            .expect("write ConfigMap file");
                    }
                    mounts.push((
                        m["mountPath"].as_str().expect("mountPath").to_string(),
                        local,
                    ));
                }
                let remap = |v: &str| -> String {
                    for (mount, local) in &mounts {
                        if let Some(rest) = v.strip_prefix(mount.as_str()) {
                            if rest.is_empty() || rest.starts_with('/') {
                                return format!("{}{rest}", local.display());
                            }
                        }
                    }
                    v.to_string()
                };
                let args: Option<Vec<String>> = c["args"].as_array().map(|a| {
                    a.iter()
                        .map(|s| remap(s.as_str().expect("args are strings")))
                        .collect()
                });
                let env: Env = c["env"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| {
                        Some((e["name"].as_str()?.to_string(), remap(e["value"].as_str()?)))
                    })
                    .collect();
                out.push((args, env));
            }
        }
    }
    assert!(out.len() >= 2, "expected the cpu and gpu Deployments");
    out
}

#[test]
fn the_deployed_argv_parses() {
    let stages = stages();
    assert!(stages.len() >= 2, "expected the cpu and gpu stages");
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = manifests(dir.path());
    for (stage, entry, cmd, stage_env) in &stages {
        for (args, env) in manifests.iter().cloned().chain([(None, BTreeMap::new())]) {
            let tail = args.clone().unwrap_or_else(|| cmd.clone());
            let mut argv: Vec<String> = entry[1..].iter().chain(&tail).cloned().collect();
            let i = argv
                .iter()
                .position(|a| a == "serve")
                .unwrap_or_else(|| panic!("{stage}: argv {argv:?} never says serve"));
            argv[i] = "config".into();
            let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
                .current_dir(root())
                .args(&argv)
                .envs(stage_env.iter().chain(&env))
                .output()
                .expect("run tiergate");
            assert!(
                out.status.success(),
                "{stage} with args {args:?}: tiergate {argv:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let printed = String::from_utf8_lossy(&out.stdout);
            assert!(
                printed.contains("listen = \"0.0.0.0:50051\""),
                "{stage}: {printed}"
            );
        }
    }
}
