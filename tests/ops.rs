//! Operating the real server on loopback: JSON log lines that carry the request (rpc, request
//! id, code, latency) and never its text; no colour codes in a log that is not a terminal; and
//! clients that keep working while `max_connection_age_s` makes them reconnect.
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tiergate::proto::{self, route_request::Input};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn route(id: &str, prompt: &str) -> proto::RouteRequest {
    proto::RouteRequest {
        request_id: id.into(),
        input: Some(Input::Prompt(prompt.into())),
        ..Default::default()
    }
}

/// Runs the server with `env`, its log in a file, until `drive` is done and it has drained
/// (so every line is written); returns the log.
async fn log_of<F: std::future::Future<Output = ()>>(
    env: &[(&str, &str)],
    drive: impl FnOnce(proto::router_client::RouterClient<tonic::transport::Channel>) -> F,
) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&path).expect("log file");
    let mut server = common::Server::spawn_logged(&[], env, log);
    server.ready().await;
    drive(server.client().await).await;
    server.sigterm();
    assert!(server.wait_exit(Duration::from_secs(60)).success());
    std::fs::read_to_string(&path).expect("log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_and_never_its_text() {
    // Words that appear only in the prompt and the answer.
    let (prompt, answer) = ("Explain the zebra-okapi theorem.", "It is quokka-shaped.");
    let log = log_of(
        &[
            ("TIERGATE_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,tiergate::access=debug"),
        ],
        |mut c| async move {
            c.route(route("req-a", prompt)).await.expect("route");
            // A caller in a distributed trace: its W3C traceparent joins the log line.
            let mut traced = tonic::Request::new(route("req-t", prompt));
            traced
                .metadata_mut()
                .insert("traceparent", TRACEPARENT.parse().expect("ascii"));
            c.route(traced).await.expect("traced route");
            c.verify(proto::VerifyRequest {
                request_id: "req-b".into(),
                prompt: prompt.into(),
                answer: answer.into(),
                model: "gemini-2.5-flash".into(),
                ..Default::default()
            })
            .await
            .expect("verify");
            let e = c.route(route("req-c", "")).await.expect_err("empty prompt");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        },
    )
    .await;
    for word in ["zebra", "quokka"] {
        assert!(!log.contains(word), "the log holds request text:\n{log}");
    }
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "warm-up done, serving"),
        "{log}"
    );
    let access = |id: &str| {
        lines
            .iter()
            .find(|l| l["target"] == "tiergate::access" && l["span"]["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}:\n{log}"))
    };
    for (id, rpc, code) in [
        ("req-a", "Route", "OK"),
        ("req-b", "Verify", "OK"),
        ("req-c", "Route", "INVALID_ARGUMENT"),
    ] {
        let l = access(id);
        assert_eq!(l["span"]["rpc"], rpc, "{l}");
        assert_eq!(l["code"], code, "{l}");
        assert!(l["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{l}");
    }
    assert_eq!(access("req-c")["reason"], "invalid_argument");
    let t = access("req-t");
    assert_eq!(
        t["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{t}"
    );
    assert_eq!(t["span"]["parent_id"], "00f067aa0ba902b7", "{t}");
    assert!(
        access("req-a")["span"].get("trace_id").is_none(),
        "no header, no trace id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_file_have_no_colour_codes() {
    // An empty NO_COLOR does not ask for plain text: the file alone must.
    let log = log_of(
        &[("RUST_LOG", "info"), ("NO_COLOR", "")],
        |mut c| async move {
            c.route(route("", "What is 2 + 2?")).await.expect("route");
        },
    )
    .await;
    assert!(log.contains("warm-up done, serving"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log:\n{log}");
}

/// A TCP relay in front of `to` that counts the connections clients open through it.
async fn counting_relay(to: String) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("relay bind");
    let addr = listener.local_addr().expect("relay addr").to_string();
    let opened = Arc::new(AtomicUsize::new(0));
    let count = opened.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, opened)
}

/// Calls one after another until at least three ages have passed and the channel has been
/// replaced twice; each Route retried until answered. Returns (answered, failed attempts).
async fn keep_calling(
    mut c: proto::router_client::RouterClient<tonic::transport::Channel>,
    k: usize,
    opened: Arc<AtomicUsize>,
    t0: Instant,
) -> (usize, usize) {
    let (mut answered, mut failed) = (0, 0);
    while t0.elapsed() < Duration::from_secs(3) || opened.load(Ordering::SeqCst) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the connection was never replaced"
        );
        match c
            .route(route(&format!("{k}-{answered}"), "What is 2 + 2?"))
            .await
        {
            Ok(_) => answered += 1,
            Err(_) => failed += 1,
        }
    }
    (answered, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_keep_working_across_max_connection_age() {
    let server = common::Server::spawn(&["--max-connection-age-s", "1"]);
    server.ready().await;
    let (relay, opened) = counting_relay(server.addr.clone()).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{relay}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    // Two callers share the channel, so a GOAWAY also finds requests in flight.
    let t0 = Instant::now();
    let callers: Vec<_> = (0..2)
        .map(|k| {
            let c = proto::router_client::RouterClient::new(channel.clone());
            tokio::spawn(keep_calling(c, k, opened.clone(), t0))
        })
        .collect();
    let (mut answered, mut failed) = (0, 0);
    for c in callers {
        let (a, f) = c.await.expect("caller");
        (answered, failed) = (answered + a, failed + f);
    }
    let opened = opened.load(Ordering::SeqCst);
    assert!(opened >= 3, "{opened} connections");
    // A request in flight when the GOAWAY comes is answered. tonic's channel can still fail
    // a call it was about to send on the closing connection (hyper: "operation was
    // canceled", or a stream the GOAWAY refused): such a call never reached the server, so
    // the server answered exactly what the callers received, and retrying it is safe.
    let served = common::metric_sum(
        &server.metrics_text(),
        "tiergate_requests_total",
        &[("rpc", "Route")],
    );
    assert_eq!(served, Some(answered as f64), "{failed} failed attempts");
    assert!(
        failed <= 2 * opened,
        "{failed} failed attempts over {opened} connections"
    );
}

/// A gRPC-core client (grpcio, as grpc-go and grpc-java behave): it retries a call that a
/// GOAWAY refused on a new connection by itself, so across several connection ages it sees no
/// failed request at all. Bytes in, bytes out: no generated Python code is needed.
const GRPCIO_CALLER: &str = r#"
import grpc, json, sys, time
addr, req, secs = sys.argv[1], bytes.fromhex(sys.argv[2]), float(sys.argv[3])
call = grpc.insecure_channel(addr).unary_unary("/tiergate.v1.Router/Route")
ok, errors, t0 = 0, [], time.time()
while time.time() - t0 < secs:
    try:
        call(req, timeout=10)
        ok += 1
    except grpc.RpcError as e:
        errors.append(f"{e.code()}: {e.details()}")
print(json.dumps({"ok": ok, "errors": errors}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_core_client_has_no_failed_request_across_max_connection_age() {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/gateway-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/gateway-clients.sh",
        python.display()
    );
    let server = common::Server::spawn(&["--max-connection-age-s", "1"]);
    server.ready().await;
    let (relay, opened) = counting_relay(server.addr.clone()).await;
    let req = prost::Message::encode_to_vec(&route("grpcio", "What is 2 + 2?"));
    let hex: String = req.iter().map(|b| format!("{b:02x}")).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", GRPCIO_CALLER, &relay, &hex, "4"])
            .output()
    })
    .await
    .expect("join")
    .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let got: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let opened = opened.load(Ordering::SeqCst);
    assert!(
        opened >= 3,
        "{opened} connections: the age never closed one"
    );
    assert_eq!(got["errors"], serde_json::json!([]), "{got}");
    let ok = got["ok"].as_u64().unwrap_or(0);
    assert!(ok >= 10, "{got}");
    let served = common::metric_sum(
        &server.metrics_text(),
        "tiergate_requests_total",
        &[("rpc", "Route")],
    );
    assert_eq!(served, Some(ok as f64));
}

/// The gRPC port bounds the streams one connection may hold (tonic's default is none) and
/// says so in its HTTP/2 SETTINGS, as a client reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_bounds_streams_per_connection() {
    let srv = common::Server::spawn(&[]);
    srv.ready().await;
    let (send, _task) = h2_connect(&srv.addr).await;
    // The server's SETTINGS arrive just after the handshake.
    assert!(served(&send, Duration::from_secs(10)).await);
    assert_eq!(
        send.current_max_send_streams(),
        tiergate::server::MAX_STREAMS_PER_CONNECTION as usize
    );
}

/// A bare HTTP/2 connection to `addr`: its request handle and the task driving it (abort it
/// to close the connection).
async fn h2_connect(
    addr: &str,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

/// Whether the server's SETTINGS (its stream limit) reached `send` within `wait`: a
/// connection the server serves gets them at once.
async fn served<B: bytes::Buf>(send: &h2::client::SendRequest<B>, wait: Duration) -> bool {
    let want = tiergate::server::MAX_STREAMS_PER_CONNECTION as usize;
    let t0 = Instant::now();
    while send.current_max_send_streams() != want && t0.elapsed() < wait {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    send.current_max_send_streams() == want
}

/// A ready server with `max_connections = max`, and the directory holding its config.
async fn capped_server(max: usize) -> (common::Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("tiergate.toml");
    let text = format!(
        "max_connections = {max}\n{}",
        tiergate::config::EMBEDDED_DEFAULT
    );
    std::fs::write(&cfg, text).expect("config");
    let srv = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    srv.ready().await;
    (srv, dir)
}

/// At `max_connections` the gRPC port takes no more connections until one closes: a third
/// client waits in the listen backlog (no SETTINGS) while two are open, and is served once one
/// of them closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_caps_its_connections() {
    let (srv, _dir) = capped_server(2).await;
    let (a, a_task) = h2_connect(&srv.addr).await;
    assert!(
        served(&a, Duration::from_secs(10)).await,
        "first connection"
    );
    let (b, _b_task) = h2_connect(&srv.addr).await;
    assert!(
        served(&b, Duration::from_secs(10)).await,
        "second connection"
    );
    let (c, _c_task) = h2_connect(&srv.addr).await;
    assert!(
        !served(&c, Duration::from_secs(1)).await,
        "a third connection was served at max_connections = 2"
    );
    drop(a);
    a_task.abort();
    assert!(
        served(&c, Duration::from_secs(10)).await,
        "the third connection was not served once one closed"
    );
}

/// A connection that never sends HTTP/2's preface does not keep its slot: at
/// `max_connections = 1`, a silent socket is closed after `FIRST_BYTES_WITHIN` and the client
/// behind it is served (hyper itself sets no limit there, so silent sockets could hold every
/// slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_gives_its_slot_back() {
    use tokio::io::AsyncReadExt;
    let (srv, _dir) = capped_server(1).await;
    // Its slot once ready()'s own connection has gone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut silent = tokio::net::TcpStream::connect(&srv.addr)
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (next, _task) = h2_connect(&srv.addr).await;
    assert!(
        !served(&next, Duration::from_secs(1)).await,
        "served beside a connection holding the only slot"
    );
    let limit = tiergate::server::FIRST_BYTES_WITHIN + Duration::from_secs(10);
    assert!(
        served(&next, limit).await,
        "the silent connection kept the only slot"
    );
    // The server closed it (end of stream or a reset), after its SETTINGS.
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the silent connection is still open");
}
