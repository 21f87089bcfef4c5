//! Admission before work, on the real server: the tokenizer stage holds a bounded number of
//! bytes, so a burst of huge non-ASCII prompts (the slow `tokenizers` path) is shed with
//! RESOURCE_EXHAUSTED instead of stalling everyone, small requests still get through, and the
//! backlog empties afterwards.
mod common;

use tiergate::proto::{self, route_request::Input};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_prompts_beyond_the_tokenizer_backlog_are_shed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("tiergate.toml");
    let text = tiergate::config::EMBEDDED_DEFAULT.replace(
        "max_tokenize_bytes = 1048576",
        "max_tokenize_bytes = 262144",
    );
    assert_ne!(
        text,
        tiergate::config::EMBEDDED_DEFAULT,
        "the key is in the default config"
    );
    std::fs::write(&cfg, text).expect("config");
    let server = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    server.ready().await;

    // ~200 KB of non-ASCII words: one fills most of the 256 KiB backlog while it is tokenized.
    let huge = "grüße straße ĉefo ŝipo ".repeat(7500);
    assert!(huge.len() > 200_000 && huge.len() < 262_144);
    let mut calls = Vec::new();
    for _ in 0..6 {
        let mut c = server.client().await;
        let p = huge.clone();
        calls.push(tokio::spawn(async move {
            c.route(proto::RouteRequest {
                input: Some(Input::Prompt(p)),
                ..Default::default()
            })
            .await
        }));
    }
    let mut c = server.client().await;
    let small = c
        .route(proto::RouteRequest {
            input: Some(Input::Prompt("What is 2 + 2?".into())),
            ..Default::default()
        })
        .await;
    assert!(small.is_ok(), "a small request gets through: {small:?}");
    let (mut ok, mut shed) = (0, 0);
    for call in calls {
        match call.await.expect("task") {
            Ok(_) => ok += 1,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(s.message().contains("tokenizer backlog"), "{}", s.message());
                shed += 1;
            }
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert!(ok >= 1, "the backlog admits what fits");
    assert!(shed >= 1, "six ~200 KB prompts at once do not fit 256 KiB");
    let m = server.metrics_text();
    let dropped = common::metric_sum(
        &m,
        "tiergate_dropped_before_compute_total",
        &[("reason", "tokenizer_backlog"), ("stage", "tokenize")],
    );
    assert_eq!(dropped, Some(shed as f64), "{m}");
    assert_eq!(
        common::metric_sum(&m, "tiergate_tokenize_backlog_bytes", &[]),
        Some(0.0),
        "the backlog empties"
    );
}
