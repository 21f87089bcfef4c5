//! Learning while serving, against the real server on loopback: bad feedback is a typed
//! INVALID_ARGUMENT and changes nothing; good feedback (unary, by request id, and streamed) is
//! re-fitted off the hot path, persisted to the feedback overlay, swapped in (the model's
//! parameters become `calibrated:<rows>` and its p_pass follows the outcomes), and survives a
//! restart, as do outcomes accepted but not yet re-fitted (the journal). With feedback off, the RPC says so.
mod common;

use tiergate::proto::{self, admin_client::AdminClient, route_request::Input};
use tonic::Code;

const MODEL: &str = "gemini-2.5-flash";

fn outcome(prompt: &str, score: f64) -> proto::FeedbackRequest {
    proto::FeedbackRequest {
        prompt: prompt.into(),
        model: MODEL.into(),
        score,
        ..Default::default()
    }
}

async fn p_of(
    c: &mut proto::router_client::RouterClient<tonic::transport::Channel>,
    prompt: &str,
) -> (f64, String) {
    let r = c
        .route(proto::RouteRequest {
            input: Some(Input::Prompt(prompt.into())),
            ..Default::default()
        })
        .await
        .expect("route")
        .into_inner();
    let s = r
        .candidates
        .iter()
        .find(|s| s.model == MODEL)
        .expect("candidate");
    (s.p_pass, s.params.clone())
}

/// Writes `base` plus a feedback section (overlay in `dir`, re-fits on request only, 20 rows
/// a model) to `dir`/tiergate.toml; the config's path and the overlay's.
fn with_feedback(dir: &std::path::Path, base: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let overlay = dir.join("feedback.json");
    let cfg = dir.join("tiergate.toml");
    let text = format!(
        "{base}\n[feedback]\noverlay = {:?}\nrefit_interval_s = 3600\nmin_rows = 20\n",
        overlay.display().to_string()
    );
    std::fs::write(&cfg, text).expect("config");
    (cfg, overlay)
}

/// Runs a re-fit pass now (Admin/Refit); the models it updated.
async fn refit(server: &common::Server) -> u32 {
    AdminClient::new(server.channel().await)
        .refit(proto::RefitRequest {})
        .await
        .expect("refit")
        .into_inner()
        .models
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_is_refitted_persisted_and_swapped_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, overlay) = with_feedback(dir.path(), tiergate::config::EMBEDDED_DEFAULT);
    let args = ["--config", cfg.to_str().expect("utf-8")];
    let server = common::Server::spawn(&args);
    server.ready().await;
    let mut c = server.client().await;
    let probe = "Name three prime numbers.";
    let (p_before, params) = p_of(&mut c, probe).await;
    assert!(params.starts_with("like:"), "{params}");

    // Bad feedback: typed errors, nothing kept.
    let bad = [
        proto::FeedbackRequest {
            model: "no-such-model".into(),
            ..outcome("x", 1.0)
        },
        outcome("x", 1.5),
        outcome("x", f64::NAN),
        proto::FeedbackRequest {
            request_id: "never-routed".into(),
            ..outcome("", 1.0)
        },
        outcome("", 1.0),
        // Request ids are at most 256 bytes (each remembered one is kept twice).
        proto::FeedbackRequest {
            request_id: "r".repeat(257),
            ..outcome("x", 1.0)
        },
        // An answer over batch.max_input_bytes.
        proto::FeedbackRequest {
            answer: "a".repeat(262_145),
            ..outcome("x", 1.0)
        },
    ];
    let n_bad = bad.len();
    for b in bad {
        let e = c.feedback(b.clone()).await.expect_err("must be refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{}: {e}", b.model);
    }
    // Each refusal is counted, whichever check refused it.
    let m = server.metrics_text();
    assert!(
        m.contains(&format!(
            "tiergate_feedback_total{{result=\"rejected\"}} {n_bad}"
        )),
        "{m}"
    );

    // A Route refused for its policy is not remembered: feedback by its id is unknown. Both
    // ways a policy is refused: a bad floor (before encoding) and a budget nothing fits
    // (decided on the embedding).
    let refusals = [
        proto::Policy {
            quality_floor: Some(2.0),
            ..Default::default()
        },
        proto::Policy {
            max_cost_usd: Some(0.0),
            ..Default::default()
        },
    ];
    for policy in refusals {
        let refused = c
            .route(proto::RouteRequest {
                request_id: "req-refused".into(),
                input: Some(Input::Prompt("What is 6 * 9?".into())),
                policy: Some(policy),
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{policy:?}: {refused}"
        );
        let e = c
            .feedback(proto::FeedbackRequest {
                request_id: "req-refused".into(),
                ..outcome("", 1.0)
            })
            .await
            .expect_err("never remembered");
        assert!(
            e.message().contains("unknown request_id"),
            "{policy:?}: {e}"
        );
    }

    // By request id: the server remembers the Route's prompt.
    c.route(proto::RouteRequest {
        request_id: "req-1".into(),
        input: Some(Input::Prompt("What is 7 * 8?".into())),
        ..Default::default()
    })
    .await
    .expect("route");
    let r = c
        .feedback(proto::FeedbackRequest {
            request_id: "req-1".into(),
            model: MODEL.into(),
            score: 0.0,
            ..Default::default()
        })
        .await
        .expect("feedback by request id")
        .into_inner();
    assert_eq!(r.accepted, 1);

    // Streamed: the model failed all of these; one bad item is reported, the rest kept.
    let mut items: Vec<proto::FeedbackRequest> = (0..40)
        .map(|i| outcome(&format!("Question {i}: what is {i} squared, and why?"), 0.0))
        .collect();
    items.insert(7, outcome("bad item", -1.0));
    // An over-long id comes back in the error cut to 256 bytes (at a character boundary).
    let long_id = format!("a{}", "é".repeat(1000));
    items.insert(
        9,
        proto::FeedbackRequest {
            request_id: long_id.clone(),
            ..outcome("bad id", 1.0)
        },
    );
    let r = c
        .feedback_stream(futures::stream::iter(items))
        .await
        .expect("stream")
        .into_inner();
    assert_eq!((r.accepted, r.errors.len()), (40, 2));
    assert_eq!(r.errors[0].code, Code::InvalidArgument as i32);
    let cut = &r.errors[1].request_id;
    assert_eq!(r.errors[1].code, Code::InvalidArgument as i32);
    assert!(
        cut.len() <= 256 && long_id.starts_with(cut.as_str()),
        "{cut}"
    );

    // A re-fit pass (the periodic one is an hour away here; Admin/Refit runs one now) swaps
    // the model's new parameters in.
    assert_eq!(refit(&server).await, 1);
    let (p_after, params) = p_of(&mut c, probe).await;
    assert_eq!(params, "calibrated:41");
    assert!(
        p_after < p_before - 0.05,
        "p {p_before} -> {p_after} after 41 failures"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&overlay).expect("overlay written"))
            .expect("overlay parses");
    assert_eq!(saved["models"][MODEL]["rows"], 41);
    let m = server.metrics_text();
    assert!(
        m.contains("tiergate_feedback_total{result=\"accepted\"} 41"),
        "{m}"
    );
    assert!(
        m.contains("tiergate_refits_total{result=\"applied\"}"),
        "{m}"
    );
    // Accepted but not yet re-fitted (fewer than min_rows new): must survive the restart.
    for i in 0..5 {
        c.feedback(outcome(&format!("Late question {i}?"), 0.0))
            .await
            .expect("feedback");
    }
    drop(c);
    drop(server);

    // A restart reads what was learned.
    let server = common::Server::spawn(&args);
    server.ready().await;
    let mut c = server.client().await;
    let (p, params) = p_of(&mut c, probe).await;
    assert_eq!(params, "calibrated:41");
    assert!((p - p_after).abs() < 1e-9);
    // 5 journaled before the restart + 15 now reach min_rows: the re-fit counts all 61.
    for i in 0..15 {
        c.feedback(outcome(&format!("After restart {i}?"), 0.0))
            .await
            .expect("feedback");
    }
    assert_eq!(refit(&server).await, 1);
    let (_, params) = p_of(&mut c, probe).await;
    assert_eq!(
        params, "calibrated:61",
        "outcomes accepted before the restart were lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_off_says_so() {
    let server = common::Server::spawn(&[]);
    server.ready().await;
    let mut c = server.client().await;
    let e = c
        .feedback(outcome("What is 2 + 2?", 1.0))
        .await
        .expect_err("feedback is off by default");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("feedback.overlay"), "{}", e.message());
    let e = AdminClient::new(server.channel().await)
        .refit(proto::RefitRequest {})
        .await
        .expect_err("no re-fit without feedback");
    assert_eq!(e.code(), Code::FailedPrecondition);
}

/// SIGTERM ends an idle open FeedbackStream with what it processed (after the lame duck,
/// not at the drain's timeout): the client learns its outcomes were kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_an_open_feedback_stream_with_its_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = tiergate::config::EMBEDDED_DEFAULT.replace("lame_duck_s = 5 ", "lame_duck_s = 1 ");
    assert_ne!(base, tiergate::config::EMBEDDED_DEFAULT);
    let (cfg, _) = with_feedback(dir.path(), &base);
    let mut server = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    server.ready().await;
    let mut c = server.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::FeedbackRequest>(4);
    for i in 0..3 {
        tx.send(outcome(&format!("Kept before the drain {i}?"), 1.0))
            .await
            .expect("send");
    }
    let reply = tokio::spawn(async move {
        c.feedback_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // All three are processed before the drain begins.
    for _ in 0..100 {
        if server
            .metrics_text()
            .contains("tiergate_feedback_total{result=\"accepted\"} 3")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // `tx` stays alive: the stream is open and idle when the drain begins.
    server.sigterm();
    let got = tokio::time::timeout(std::time::Duration::from_secs(12), reply)
        .await
        .expect("the drain did not end the stream (it waits for drain.timeout_s, 25 s)")
        .expect("task")
        .expect("reply")
        .into_inner();
    assert_eq!((got.accepted, got.errors.len()), (3, 0));
    assert!(server
        .wait_exit(std::time::Duration::from_secs(30))
        .success());
    drop(tx);
}

/// A re-fit whose overlay cannot be written is the server's storage failing (INTERNAL), not a
/// precondition of the request; what it learned is not swapped in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlay_that_cannot_be_written_is_internal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, overlay) = with_feedback(dir.path(), tiergate::config::EMBEDDED_DEFAULT);
    let server = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    server.ready().await;
    let mut c = server.client().await;
    for i in 0..20 {
        c.feedback(outcome(&format!("Question {i}?"), 0.0))
            .await
            .expect("feedback");
    }
    // A directory where the overlay file goes: its atomic write cannot replace it.
    std::fs::create_dir(&overlay).expect("mkdir");
    let e = AdminClient::new(server.channel().await)
        .refit(proto::RefitRequest {})
        .await
        .expect_err("the overlay cannot be written");
    assert_eq!(e.code(), Code::Internal, "{e}");
    assert!(e.message().contains("feedback overlay"), "{}", e.message());
    let (_, params) = p_of(&mut c, "Name three prime numbers.").await;
    assert!(params.starts_with("like:"), "{params}");
}
