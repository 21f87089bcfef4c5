//! The Portkey recipe (deploy/portkey/config.json) run for real: the official `openai`
//! client calls the real Portkey gateway (npm @portkey-ai/gateway, scripts/gateway-portkey.sh),
//! with tiergate's pick in Portkey's metadata (clients/python, tiergate_client.portkey); the
//! recipe's conditional strategy, unchanged, sends the request to the chosen model's target.
//! Only the targets' provider, host and key are swapped for a stand-in on loopback.
mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::upstream::Stub;
use common::{free_port, Server};
use serde_json::{json, Value};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn recipe() -> Value {
    let text = std::fs::read_to_string(format!("{ROOT}/deploy/portkey/config.json"))
        .expect("deploy/portkey/config.json");
    serde_json::from_str(&text).expect("the recipe is JSON")
}

/// The recipe's shape: a conditional strategy with one `metadata.tiergate_model` condition per
/// catalog model, each naming a target of that name, and a default that is a target.
#[test]
fn the_recipe_routes_every_catalog_model() {
    let c = recipe();
    let s = &c["strategy"];
    assert_eq!(s["mode"], "conditional");
    let targets: Vec<&str> = c["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| t["name"].as_str().expect("a target's name"))
        .collect();
    let mut routed = Vec::new();
    for cond in s["conditions"].as_array().expect("conditions") {
        let model = cond["query"]["metadata.tiergate_model"]["$eq"]
            .as_str()
            .unwrap_or_else(|| panic!("a condition not on metadata.tiergate_model: {cond}"));
        assert_eq!(cond["then"], model, "{cond}");
        assert!(targets.contains(&model), "no target {model}");
        routed.push(model.to_string());
    }
    assert!(targets.contains(&s["default"].as_str().expect("default")));
    let mut catalog: Vec<String> = tiergate::config::Config::embedded()
        .expect("embedded config")
        .catalog
        .iter()
        .map(|e| e.model.clone())
        .collect();
    catalog.sort();
    routed.sort();
    assert_eq!(routed, catalog, "one condition per catalog model");
    for t in c["targets"].as_array().unwrap() {
        assert!(
            t["provider"].is_string() && t["override_params"]["model"].is_string(),
            "{t}"
        );
    }
}

struct Portkey(Child);

impl Drop for Portkey {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real Portkey gateway on `port`, accepting connections.
fn portkey(port: u16) -> Portkey {
    let js = format!(
        "{ROOT}/target/portkey-gateway/node_modules/@portkey-ai/gateway/build/start-server.js"
    );
    assert!(
        std::path::Path::new(&js).exists(),
        "{js} is missing: run scripts/gateway-portkey.sh"
    );
    let child = Command::new("node")
        .args([&js, &format!("--port={port}"), "--headless"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running node (scripts/gateway-portkey.sh installs it)");
    let pk = Portkey(child);
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "Portkey never listened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pk
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portkey_routes_on_tiergates_pick() {
    let stub = Stub::start("stub").await;
    // The recipe with each target sent to the stand-in (as an OpenAI-compatible provider,
    // with its own key and model id); the strategy is the recipe's, untouched.
    let mut config = recipe();
    for t in config["targets"].as_array_mut().unwrap() {
        let name = t["name"].as_str().unwrap().to_string();
        t["provider"] = json!("openai");
        t["custom_host"] = json!(stub.base_url());
        t["api_key"] = json!(format!("sk-{name}"));
        t["override_params"]["model"] = json!(format!("stub:{name}"));
    }
    let srv = Server::spawn(&[]);
    srv.ready().await;
    let port = free_port();
    let _pk = portkey(port);

    let spec = json!({"portkey": format!("http://127.0.0.1:{port}/v1"), "config": config,
        "addr": srv.addr, "dead_addr": format!("127.0.0.1:{}", free_port())});
    let mut child = Command::new(format!("{ROOT}/target/gateway-venv/bin/python"))
        .arg(format!("{ROOT}/tests/clients/portkey_cases.py"))
        .env("PYTHONPATH", format!("{ROOT}/clients/python"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running the venv's python (scripts/gateway-clients.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("python output");
    assert!(out.status.success(), "portkey_cases.py failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let o: Value = serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("portkey_cases.py printed {text:?}: {e}"));

    // Easy → the cheapest model's target, hard → the strongest's; tiergate down → the
    // recipe's default, the caller's own metadata kept beside tiergate's.
    assert_eq!(
        o["easy"]["metadata"]["tiergate_model"], "gemini-2.5-flash",
        "{o}"
    );
    assert_eq!(o["easy"]["model"], "stub:gemini-2.5-flash", "{o}");
    assert_eq!(
        o["hard"]["metadata"]["tiergate_model"], "claude-opus-4.8",
        "{o}"
    );
    assert_eq!(o["hard"]["model"], "stub:claude-opus-4.8", "{o}");
    assert_eq!(
        o["down"]["metadata"],
        json!({"team": "search", "tiergate_error": "UNAVAILABLE"})
    );
    assert_eq!(o["down"]["model"], "stub:claude-sonnet-4.6", "{o}");
    assert!(o["easy"]["text"]
        .as_str()
        .unwrap()
        .contains("stub:gemini-2.5-flash via stub"));
    // What reached the providers: the target's model id and key, one call per request.
    let calls = stub.calls("");
    let seen: Vec<(String, Option<String>)> = calls
        .iter()
        .map(|c| (c.model.clone(), c.auth.clone()))
        .collect();
    let want = |m: &str| (format!("stub:{m}"), Some(format!("Bearer sk-{m}")));
    assert_eq!(
        seen,
        vec![
            want("gemini-2.5-flash"),
            want("claude-opus-4.8"),
            want("claude-sonnet-4.6")
        ]
    );
}
