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
    let overlay = dir.path().join("feedback.json");
    let cfg = dir.path().join("tiergate.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[feedback]\noverlay = {:?}\nrefit_interval_s = 3600\nmin_rows = 20\n",
            tiergate::config::EMBEDDED_DEFAULT,
            overlay.display().to_string()
        ),
    )
    .expect("config");
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
    ];
    for b in bad {
        let e = c.feedback(b.clone()).await.expect_err("must be refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{b:?}: {e}");
    }

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
