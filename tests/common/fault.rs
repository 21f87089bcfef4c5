//! A server on the fault-injecting backend (src/engine/fault.rs): the CPU backend obeying a
//! control file, `ok` until a test writes another mode.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tiergate::proto::{self, route_request::Input};
use tonic_health::pb::health_check_response::ServingStatus;

use super::{metric_sum, prompt_of, Server};

pub struct Faulty {
    pub srv: Server,
    control: PathBuf,
    _dir: tempfile::TempDir,
}

/// The embedded tiergate.toml with each `(from, to)` replaced (each must be found), written to
/// `dir`.
pub fn config(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = tiergate::config::EMBEDDED_DEFAULT.to_string();
    for (from, to) in edits {
        assert!(text.contains(from), "tiergate.toml has no {from:?}");
        text = text.replace(from, to);
    }
    let p = dir.join("tiergate.toml");
    std::fs::write(&p, text).expect("config");
    p
}

/// A request of about `words` tokens, distinct for each `i`.
pub fn route_req(i: usize, words: usize) -> proto::RouteRequest {
    proto::RouteRequest {
        request_id: format!("f{i}"),
        input: Some(Input::Prompt(format!("{} {i}", prompt_of(words, i)))),
        ..Default::default()
    }
}

impl Faulty {
    /// Config `edits`, extra flags and environment; one encoder thread, no embedding cache
    /// (every request reaches the backend). Returns once the server is SERVING.
    pub async fn start(edits: &[(&str, &str)], flags: &[&str], env: &[(&str, &str)]) -> Faulty {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("fault");
        let cfg = config(dir.path(), edits);
        let control_s = control.to_str().expect("utf-8").to_string();
        // No backtraces: symbolizing one for an injected panic can take seconds.
        let mut env_all = vec![
            ("TIERGATE_FAULT_INJECTION", control_s.as_str()),
            ("RUST_BACKTRACE", "0"),
        ];
        env_all.extend_from_slice(env);
        let mut args = vec![
            "--config",
            cfg.to_str().expect("utf-8"),
            "--backend",
            "fault",
            "--threads",
            "1",
            "--embedding-cache",
            "0",
        ];
        args.extend_from_slice(flags);
        let srv = Server::spawn_env(&args, &env_all);
        srv.ready().await;
        Faulty {
            srv,
            control,
            _dir: dir,
        }
    }

    pub fn set(&self, mode: &str) {
        std::fs::write(&self.control, mode).expect("control file");
    }

    /// Route on a new connection; no case may leave a client waiting 60 s.
    pub async fn route(&self, i: usize) -> Result<proto::RouteReply, tonic::Status> {
        self.route_words(i, 30).await
    }

    /// [`Self::route`] with a prompt of about `words` tokens.
    pub async fn route_words(
        &self,
        i: usize,
        words: usize,
    ) -> Result<proto::RouteReply, tonic::Status> {
        let mut c = self.srv.client().await;
        tokio::time::timeout(Duration::from_secs(60), c.route(route_req(i, words)))
            .await
            .expect("a request hung")
            .map(|r| r.into_inner())
    }

    /// Waits (up to a generous bound) until every service reports `want`.
    pub async fn health_becomes(&self, want: ServingStatus) {
        let t0 = Instant::now();
        loop {
            let mut all = true;
            for s in ["", "tiergate.v1.Router", "tiergate.v1.Admin"] {
                all &= self.srv.health(s).await == want;
            }
            if all {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "health never became {want:?} on every service"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.srv.metrics_text(), name, labels).unwrap_or(0.0)
    }
}
