//! Starts the real `tiergate` binary on 127.0.0.1 (ephemeral ports) with the real model.
#![allow(dead_code)]
pub mod fault;
pub mod upstream;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tiergate::proto::router_client::RouterClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Awaits `f` for at most 90 s: a request the server lost fails the test instead of hanging
/// the suite.
pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(90), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not answered within 90 s"))
}

pub struct Server {
    child: Child,
    pub addr: String,
    pub metrics: String,
    /// The server's later stdout lines (the front's address comes after the gRPC port's).
    lines: std::sync::Mutex<std::sync::mpsc::Receiver<String>>,
    http: std::sync::OnceLock<String>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

/// Runs `tiergate serve --config <config>`, which must refuse to start; returns its stderr.
pub fn serve_refused(config: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
            "--config",
        ])
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running tiergate serve");
    assert!(!out.status.success(), "the server started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

impl Server {
    /// Spawns `tiergate serve` with `extra` flags and waits for its listening line.
    pub fn spawn(extra: &[&str]) -> Server {
        Self::spawn_env(extra, &[])
    }

    /// [`Self::spawn`] with environment variables set for the server.
    pub fn spawn_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn_with(extra, env, Stdio::inherit)
    }

    /// [`Self::spawn_env`] with the server's stderr (its log) written to `log`.
    pub fn spawn_logged(extra: &[&str], env: &[(&str, &str)], log: std::fs::File) -> Server {
        Self::spawn_with(extra, env, || {
            log.try_clone()
                .map_or_else(|_| Stdio::inherit(), Stdio::from)
        })
    }

    /// The metrics port is picked free before the server binds it, so another test can take
    /// it in between; a server that exits before printing its address is started again on
    /// another port (three tries), one still running without it is killed and fails.
    fn spawn_with(extra: &[&str], env: &[(&str, &str)], stderr: impl Fn() -> Stdio) -> Server {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::try_spawn(extra, env, stderr()) {
                Ok(s) => return s,
                Err(why) if tries < 3 => eprintln!("tiergate exited at start ({why}); again"),
                Err(why) => panic!("tiergate did not print its address: {why}"),
            }
        }
    }

    fn try_spawn(extra: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Result<Server, String> {
        let root = env!("CARGO_MANIFEST_DIR");
        assert!(
            std::path::Path::new(root)
                .join("models/base/model.safetensors")
                .exists(),
            "models/base is missing: run scripts/setup-model.sh"
        );
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .current_dir(root)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                &metrics,
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            // No lame duck unless a test asks for one: a SIGTERM'd test server exits at once.
            .env("TIERGATE_DRAIN_LAME_DUCK_S", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawning tiergate");
        // The address line comes once the model is loaded; bounded, and the child killed if
        // it never comes, so a stalled start fails the test instead of hanging the suite.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let (later_tx, later_rx) = std::sync::mpsc::channel();
        // Reads stdout to its end: the first line (or the error) to `tx`, the rest to
        // `later_tx`, so the server never writes to a closed pipe.
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let read = r.read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
            for l in r.lines() {
                let Ok(l) = l else { break };
                let _ = later_tx.send(l);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(180));
        let addr = match &line {
            Ok(Ok(l)) => l.trim().strip_prefix("tiergate listening on "),
            _ => None,
        };
        let Some(addr) = addr.map(str::to_string) else {
            // Its stdout closes a moment before its exit status can be read.
            for _ in 0..20 {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("{status}, read {line:?}"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("tiergate did not print its address: {line:?}");
        };
        Ok(Server {
            child,
            addr,
            metrics,
            lines: std::sync::Mutex::new(later_rx),
            http: std::sync::OnceLock::new(),
        })
    }

    /// The OpenAI-compatible front's address (the server was configured with one, port 0
    /// for any free port), from the line it prints once bound; within 60 s.
    pub fn http_addr(&self) -> String {
        self.http
            .get_or_init(|| {
                let rx = self.lines.lock().unwrap_or_else(|e| e.into_inner());
                let until = Instant::now() + Duration::from_secs(60);
                loop {
                    let left = until.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(l) => {
                            if let Some(a) = l.trim().strip_prefix("tiergate http listening on ") {
                                return a.to_string();
                            }
                        }
                        Err(e) => panic!("the front's address was not printed: {e}"),
                    }
                }
            })
            .clone()
    }

    pub async fn client(&self) -> RouterClient<Channel> {
        RouterClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    /// The server's Info reply.
    pub async fn info(&self) -> tiergate::proto::InfoReply {
        self.client()
            .await
            .info(tiergate::proto::InfoRequest {})
            .await
            .expect("info")
            .into_inner()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn health(&self, service: &str) -> ServingStatus {
        let mut h = HealthClient::new(self.channel().await);
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        ServingStatus::try_from(r.status).expect("status")
    }

    /// Waits until grpc.health.v1 says SERVING (warm-up done).
    pub async fn ready(&self) {
        let t0 = Instant::now();
        loop {
            if self.health("tiergate.v1.Router").await == ServingStatus::Serving {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "server never became SERVING"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn metrics_text(&self) -> String {
        let mut s = std::net::TcpStream::connect(&self.metrics).expect("metrics port");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    pub fn sighup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// True while the server process runs.
    pub fn child_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(t0.elapsed() < limit, "server did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A prompt of roughly `words` words (about as many tokens).
pub fn prompt_of(words: usize, seed: usize) -> String {
    const W: &[&str] = &[
        "explain",
        "why",
        "the",
        "integral",
        "of",
        "a",
        "function",
        "converges",
        "when",
        "its",
        "derivative",
        "is",
        "bounded",
        "and",
        "give",
        "an",
        "example",
        "in",
        "python",
        "code",
    ];
    (0..words)
        .map(|i| W[(i * 7 + seed * 13) % W.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// The sum of the series `name` in a /metrics scrape whose labels include every `k="v"` of
/// `labels`; None when there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let matches = (rest.is_empty() || rest.starts_with('{'))
                && labels
                    .iter()
                    .all(|(k, want)| rest.contains(&format!("{k}=\"{want}\"")));
            matches.then(|| v.parse().ok())?
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
