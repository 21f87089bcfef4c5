//! The container starts with the argv the deploy files give it: the Dockerfile's ENTRYPOINT
//! and CMD (each image stage), replaced by a manifest's `args` where it has them, with the
//! stage's ENV and the manifest's env. `tiergate config` takes the same flags as `serve`, so
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

/// The container `args` of each manifest (None where it sets none), and its env.
fn manifests() -> Vec<(Option<Vec<String>>, Env)> {
    let text = std::fs::read_to_string(root().join("deploy/k8s.yaml")).expect("k8s.yaml");
    let mut args = None;
    let mut env = BTreeMap::new();
    for line in text.lines() {
        let l = line.split(" #").next().unwrap_or("").trim();
        if let Some(j) = l.strip_prefix("args: ") {
            args = Some(serde_json::from_str(j).expect("args as a flow sequence"));
        } else if let Some(e) = l
            .strip_prefix("- { name: ")
            .filter(|_| l.contains("value:"))
        {
            let (k, rest) = e.split_once(", value: ").expect("env entry");
            env.insert(
                k.to_string(),
                rest.trim_end_matches(" }").trim_matches('"').to_string(),
            );
        }
    }
    vec![(args, env)]
}

#[test]
fn the_deployed_argv_parses() {
    let stages = stages();
    assert!(stages.len() >= 2, "expected the cpu and gpu stages");
    for (stage, entry, cmd, stage_env) in &stages {
        for (args, env) in manifests().into_iter().chain([(None, BTreeMap::new())]) {
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
