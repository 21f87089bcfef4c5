//! Prompts and answers never reach the log: the real server, logging JSON at debug level (and
//! trace for tiergate itself), is sent Routes and Verifies whose prompt, messages, answer and
//! peer answers carry a marker (accepted, refused and too-large requests); the whole log is
//! then searched for it. Request ids, which are logged, are checked for as a control.
mod common;

use std::time::Duration;

use common::Server;
use tiergate::proto::{self, route_request::Input};

const MARKER: &str = "zqxmarker7731secret";
const REQUEST_ID: &str = "logged-request-id-4417";

fn messages(text: &str) -> proto::Messages {
    proto::Messages {
        messages: vec![
            proto::ChatMessage {
                role: "system".into(),
                content: format!("You are terse. {MARKER}"),
            },
            proto::ChatMessage {
                role: "user".into(),
                content: text.into(),
            },
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_and_answers_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let s = Server::spawn_logged(
        &["--log-format", "json"],
        &[("RUST_LOG", "debug,tiergate=trace")],
        log,
    );
    s.ready().await;
    let info = s.info().await;
    let model = info.catalog[0].model.clone();
    let prompt = format!("Prove that sqrt(2) is irrational. {MARKER}");
    let answer = format!("Assume p/q in lowest terms; then p^2 = 2q^2 ... {MARKER}");
    let mut c = s.client().await;

    let ok = c
        .route(proto::RouteRequest {
            request_id: REQUEST_ID.into(),
            input: Some(Input::Prompt(prompt.clone())),
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    let ok = c
        .route(proto::RouteRequest {
            input: Some(Input::Messages(messages(&prompt))),
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    let ok = c
        .verify(proto::VerifyRequest {
            prompt: prompt.clone(),
            answer: answer.clone(),
            model: model.clone(),
            peers: vec![proto::PeerAnswer {
                model: model.clone(),
                answer: answer.clone(),
            }],
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    let ok = c
        .verify(proto::VerifyRequest {
            answer: answer.clone(),
            model: model.clone(),
            messages: Some(messages(&prompt)),
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    // Refused ones: an unknown candidate, and a prompt over max_input_bytes.
    let refused = c
        .route(proto::RouteRequest {
            input: Some(Input::Prompt(prompt.clone())),
            candidates: vec!["no-such-model".into()],
            ..Default::default()
        })
        .await;
    assert!(refused.is_err());
    let huge = format!("{MARKER} {}", "word ".repeat(60_000));
    let refused = c
        .route(proto::RouteRequest {
            input: Some(Input::Prompt(huge)),
            ..Default::default()
        })
        .await;
    assert!(refused.is_err());

    // Lines are written as they happen; give the writer a moment, then stop the server so
    // the log is complete.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    let text = std::fs::read_to_string(&log_path).unwrap();
    // The control: the log is at the level where requests are logged at all.
    assert!(
        text.contains(REQUEST_ID),
        "the access log did not record the request id (log level too low?):\n{}",
        &text[..text.len().min(4000)]
    );
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(MARKER)).collect();
    assert!(
        lines.is_empty(),
        "client text reached the log ({} lines), e.g.:\n{}",
        lines.len(),
        lines[0].chars().take(600).collect::<String>()
    );
}
