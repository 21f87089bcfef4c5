//! clients/python (tiergate_client) against the real server and model on loopback, run with
//! the venv of scripts/gateway-clients.sh: Route of an easy and a hard prompt, Verify of a
//! usable and an unusable answer, the cascade helper escalating (and going on while Verify
//! is busy), Feedback by request id (seen in the server's metrics), and errors as
//! TiergateError with the gRPC code.
mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{free_port, metric_sum, Server};
use serde_json::{json, Value};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs a script of tests/clients with the venv's Python and clients/python on the path;
/// the JSON on its last line.
fn run_python(script: &str, spec: Value) -> Value {
    let python = std::path::Path::new(ROOT).join("target/gateway-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/gateway-clients.sh",
        python.display()
    );
    let mut child = Command::new(python)
        .arg(format!("{ROOT}/tests/clients/{script}"))
        .env("PYTHONPATH", format!("{ROOT}/clients/python"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(spec.to_string().as_bytes())
        .expect("writing the spec");
    let out = child.wait_with_output().expect("python output");
    assert!(out.status.success(), "{script} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{script} printed {text:?}: {e}"))
}

/// A server with feedback on (an overlay in `dir`), ready.
async fn server(dir: &std::path::Path) -> Server {
    let cfg = dir.join("tiergate.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[feedback]\noverlay = {:?}\nrefit_interval_s = 3600\n",
            tiergate::config::EMBEDDED_DEFAULT,
            dir.join("feedback.json").display().to_string()
        ),
    )
    .expect("config");
    let srv = Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    srv.ready().await;
    srv
}

fn price(o: &Value, model: &str) -> f64 {
    o["price"][model]
        .as_f64()
        .unwrap_or_else(|| panic!("no price for {model}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_routes_verifies_and_cascades() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = server(dir.path()).await;
    let o = run_python(
        "tiergate_client_cases.py",
        json!({"addr": srv.addr, "dead_addr": format!("127.0.0.1:{}", free_port())}),
    );

    assert_eq!(o["health"], "SERVING");
    // The default catalog: the easy prompt goes to a cheaper model than the hard one, and
    // the same turn as chat messages decides the same.
    let (easy, hard) = (
        o["easy"]["model"].as_str().unwrap(),
        o["hard"]["model"].as_str().unwrap(),
    );
    assert!(
        price(&o, easy) < price(&o, hard),
        "easy {easy}, hard {hard}"
    );
    assert_eq!(o["easy"]["request_id"], "easy-1");
    assert_eq!(o["easy_messages"], easy);
    assert_eq!(o["strict_reason"], "best_effort");

    // Verify: the usable answer ships (1 = SHIP), the unusable one escalates up the prices.
    assert_eq!(
        o["budget_escalation"],
        serde_json::json!(["claude-opus-4.8", ""]),
        "expected_output_tokens reaches Verify"
    );
    let cu = &o["cascade_unreadable"];
    assert_eq!(cu["shipped"], true, "{cu}");
    assert_eq!(cu["called"].as_array().map(Vec::len), Some(1), "{cu}");
    assert_eq!(cu["verify_errors"], json!(["INVALID_ARGUMENT"]), "{cu}");
    assert_eq!(o["pickled"], json!(["UNAVAILABLE", "x", 0.25]));
    assert_eq!(o["portkey_request_id"], "pk-1");
    let mcq = &o["mcq"];
    assert_eq!(mcq["good"]["decision"], 1, "{mcq}");
    let bad = &mcq["unusable"];
    assert_eq!(bad["decision"], 2, "{mcq}");
    assert!(bad["p_pass"].as_f64().unwrap() < bad["threshold"].as_f64().unwrap());
    let routed = mcq["model"].as_str().unwrap();
    let up = bad["escalate_to"].as_str().unwrap();
    assert!(price(&o, up) > price(&o, routed), "{routed} → {up}");

    // The cascade called the routed model, escalated once to Verify's pick, shipped its
    // answer, and summed both models' expected costs.
    let c = &o["cascade"];
    assert_eq!(c["called"], json!([routed, up]), "{c}");
    assert_eq!(c["model"], up);
    assert_eq!(c["answer"], "The answer is B.");
    assert_eq!(c["escalations"], 1);
    assert_eq!(c["decisions"], json!(["escalate", "ship"]));
    let costs = &c["route_costs"];
    let want = costs[routed].as_f64().unwrap() + costs[up].as_f64().unwrap();
    assert!((c["cost"].as_f64().unwrap() - want).abs() < 1e-12, "{c}");
    // With no escalation allowed the routed model's answer ships, not verified.
    let c0 = &o["cascade_no_hops"];
    assert_eq!(c0["called"], json!([routed]), "{c0}");
    assert_eq!(c0["answer"], "I don't know.");
    assert_eq!(c0["decisions"], json!([null]));
    // Borderline (the default): Route did not ask for Verify, yet the empty answer went on.
    let ce = &o["cascade_empty"];
    assert_eq!(ce["verify_recommended"], false, "{ce}");
    assert_eq!(ce["called"][0], ce["routed"], "{ce}");
    assert_eq!(ce["escalations"], 1, "{ce}");
    assert_eq!(ce["answer"], "The answer is B.");
    // So does an answer without a letter or digit, and one the provider cut short (asked
    // about as empty: p 0); a Reply not marked cut is an answer as any other, and ships.
    for name in ["cascade_symbols", "cascade_cut"] {
        let r = &o[name];
        assert_eq!(r["called"][0], ce["routed"], "{name}: {r}");
        assert_eq!(r["escalations"], 1, "{name}: {r}");
        assert_eq!(r["answer"], "The answer is B.", "{name}: {r}");
        assert_eq!(r["p_pass"], 0.0, "{name}: {r}");
    }
    let c2 = &o["cascade_cut_twice"];
    assert_eq!(c2["called"].as_array().map(Vec::len), Some(2), "{c2}");
    assert_eq!(c2["escalations"], 1, "{c2}");
    assert!(
        c2["answer"].as_str().is_some_and(|a| a.ends_with("(2)")),
        "{c2}"
    );
    let cc = &o["cascade_capped"];
    assert_eq!(cc["called"], json!([ce["routed"]]), "{cc}");
    assert_eq!(cc["escalations"], 0, "{cc}");
    assert_eq!(cc["p_pass"], Value::Null, "not verified: {cc}");

    // Feedback by the earlier Route's request id reached the server.
    assert_eq!(o["feedback_accepted"], 1);
    let m = srv.metrics_text();
    assert_eq!(
        metric_sum(&m, "tiergate_feedback_total", &[("result", "accepted")]),
        Some(1.0),
        "{m}"
    );

    // Errors: the server's INVALID_ARGUMENTs, the client's own for a malformed call, and an
    // unreachable server, each a TiergateError with its code.
    let e = &o["errors"];
    for case in [
        "empty_prompt",
        "unknown_candidate",
        "bad_score",
        "both_inputs",
        "bad_message",
    ] {
        assert_eq!(e[case]["code"], "INVALID_ARGUMENT", "{case}: {e}");
    }
    assert!(e["unknown_candidate"]["details"]
        .as_str()
        .unwrap()
        .contains("no-such-model"));
    assert_eq!(e["down"]["code"], "UNAVAILABLE", "{e}");
}

/// The cascade helper while Verify cannot answer in time (the server's encoder hangs from the
/// first provider call on): the empty answer goes up the prices, the next answer ships
/// unverified, and no error reaches the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_cascade_goes_up_the_prices_when_verify_is_busy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("fault");
    // No embedding cache: Verify's prompt would otherwise be served from Route's encoding.
    let srv = Server::spawn_env(
        &["--backend", "fault", "--embedding-cache", "0"],
        &[
            ("TIERGATE_FAULT_INJECTION", control.to_str().expect("utf-8")),
            ("RUST_BACKTRACE", "0"),
        ],
    );
    srv.ready().await;
    let o = run_python(
        "tiergate_client_cases.py",
        json!({"addr": srv.addr, "fault": control}),
    );
    // The routed model, then the next one up in Route's price order; neither answer was
    // verified (no decision), and the second ships.
    let by_price: Vec<&str> = o["by_price"]
        .as_array()
        .expect("by_price")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let routed = o["routed"].as_str().expect("routed");
    let at = by_price
        .iter()
        .position(|m| *m == routed)
        .expect("routed among the candidates");
    assert_eq!(o["called"], json!([routed, by_price[at + 1]]), "{o}");
    assert_eq!(o["answer"], "The answer is B.");
    assert_eq!(o["escalations"], 1);
    // No decision: both Verify calls ran out of time (any other failure raises in the script).
    assert_eq!(o["decisions"], json!([null, null]));
}

/// tiergate_client.litellm.TiergateRouting as a real litellm.Router's routing strategy
/// (mock_response deployments: no network), against the real server, then against none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_routes_through_tiergate_and_falls_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = server(dir.path()).await;
    let o = run_python(
        "litellm_routing_cases.py",
        json!({"addr": srv.addr, "dead_addr": format!("127.0.0.1:{}", free_port())}),
    );
    let answer = |side: &str, case: &str| o[side][case]["answer"].as_str().unwrap().to_string();
    let decision = |side: &str, case: &str| o[side][case]["tiergate"].clone();

    // Up: the easy prompt lands on the cheap deployment, the hard one on the strong one (sync
    // and async), never on the deployment without a catalog model; the decision is in the
    // request's metadata.
    assert_eq!(answer("up", "easy"), "answered by flash", "{o}");
    assert_eq!(answer("up", "easy_parts"), "answered by flash", "{o}");
    assert_eq!(answer("up", "hard"), "answered by opus", "{o}");
    assert_eq!(answer("up", "hard_async"), "answered by opus", "{o}");
    // An earlier reply in the conversation (a LiteLLM Message object) is read as a turn; a
    // request naming one deployment is served by it, tiergate up or down.
    assert_eq!(
        o["up"]["with_reply"]["roles"],
        json!(["user", "assistant", "user"]),
        "{o}"
    );
    assert_eq!(answer("up", "named"), "answered by opus", "{o}");
    // A rate-limited pick is cooled down by LiteLLM; its retry goes elsewhere.
    assert_ne!(o["up"]["cooled"]["fallback"], "gemini-2.5-flash", "{o}");
    let cooled = answer("up", "cooled");
    assert!(
        cooled.starts_with("answered by") && cooled != "answered by flash",
        "{o}"
    );
    assert_eq!(answer("down", "named"), "answered by opus", "{o}");
    assert_eq!(decision("up", "easy")["model"], "gemini-2.5-flash");
    assert!(
        decision("up", "easy")["expected_cost_usd"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(decision("up", "hard")["model"], "claude-opus-4.8");
    // A prompt tiergate refuses: the default deployment serves, and the metadata says why.
    assert_eq!(answer("up", "too_long"), "answered by sonnet", "{o}");
    assert_eq!(
        decision("up", "too_long"),
        json!({"error": "INVALID_ARGUMENT", "fallback": "claude-sonnet-4.6"})
    );
    // Down: every request still answers, from the default deployment.
    for case in ["easy", "hard", "hard_async", "easy_parts", "too_long"] {
        assert_eq!(answer("down", case), "answered by sonnet", "{case}: {o}");
        assert_eq!(
            decision("down", case)["error"],
            "UNAVAILABLE",
            "{case}: {o}"
        );
    }
    // A tiergate that never answers, 40 requests at once on a 2-thread executor: every async
    // pick gives up at the client's 0.5 s and the default deployment serves. Picks waiting
    // on executor threads queued: the last took 10 s (the bound leaves a slow box 4.5 s).
    let hung = &o["hung"];
    assert_eq!(hung["answers"], json!(["answered by sonnet"]), "{hung}");
    assert!(hung["seconds"].as_f64().unwrap() < 5.0, "{hung}");
    // The server decided the four routable requests of the up side, with_reply's two and
    // cooled's two (the pick and its retry), and no more (the named deployment is not routed).
    let m = srv.metrics_text();
    assert_eq!(
        metric_sum(&m, "tiergate_route_decisions_total", &[]),
        Some(8.0),
        "{m}"
    );
}
