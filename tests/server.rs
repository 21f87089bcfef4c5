//! The real server on loopback with the real model: every RPC, health, reflection, /metrics,
//! bad inputs and their codes, overload, and draining on SIGTERM.
mod common;

use std::time::Duration;

use common::{prompt_of, Server};
use tiergate::proto::{self, route_request::Input, Decision};
use tonic::Code;

fn route(prompt: &str) -> proto::RouteRequest {
    proto::RouteRequest {
        request_id: "r1".into(),
        input: Some(Input::Prompt(prompt.into())),
        ..Default::default()
    }
}

fn verify(prompt: &str, answer: &str, model: &str) -> proto::VerifyRequest {
    proto::VerifyRequest {
        request_id: "v1".into(),
        prompt: prompt.into(),
        answer: answer.into(),
        model: model.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_health_reflection_and_metrics() {
    let srv = Server::spawn(&[]);
    srv.ready().await;
    assert_eq!(
        srv.health("").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let mut c = srv.client().await;

    // Info: the default catalog and limits.
    let info = c.info(proto::InfoRequest {}).await.unwrap().into_inner();
    // `auto` picks CUDA where a GPU is present, else the CPU.
    assert!(
        ["cpu", "cuda"].contains(&info.backend.as_str()),
        "{}",
        info.backend
    );
    // `precision = auto`: int8 with a VNNI kernel, else bf16 on an AMD CPU with AVX512-BF16, else
    // int8 with AVX2 (7-bit weights), else f32; f16 on CUDA.
    use tiergate::model::int8;
    let want = match info.backend.as_str() {
        "cuda" => "f16",
        _ if int8::best_kernel().is_vnni() => "int8",
        _ if tiergate::model::bf16::preferred() => "bf16",
        _ if tiergate::model::int8::available() => "int8-w7",
        _ => "f32",
    };
    assert_eq!(info.numerics, want);
    // No floor in the config: the defaults learned with the heads.
    let heads = tiergate::model::heads::Heads::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/heads.json"
    )))
    .unwrap();
    assert_eq!(
        Some(info.default_quality_floor),
        heads.default_quality_floor,
        "the committed heads carry a learned floor"
    );
    assert_eq!(
        info.default_verify_threshold,
        heads.default_verify_threshold
    );
    assert_eq!(info.catalog.len(), 6);
    assert!(info.catalog.iter().any(|e| e.model == "claude-opus-4.8"));
    assert_eq!(info.limits.as_ref().unwrap().max_input_tokens, 256);
    assert!(!info.model_revision.is_empty() && !info.heads_revision.is_empty());

    // Route on a prompt: every catalog model scored, price order, a coherent decision.
    let r = c
        .route(route(
            "What is the derivative of x^3 + 2x? Show your steps.",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.request_id, "r1");
    assert_eq!(r.candidates.len(), 6);
    for w in r.candidates.windows(2) {
        assert!(
            w[0].expected_cost_usd <= w[1].expected_cost_usd,
            "not in price order"
        );
    }
    for s in &r.candidates {
        assert!((0.0..=1.0).contains(&s.p_pass), "{s:?}");
    }
    let chosen = r
        .candidates
        .iter()
        .find(|s| s.model == r.model)
        .expect("chosen is a candidate");
    let max_cost = r
        .candidates
        .iter()
        .map(|s| s.expected_cost_usd)
        .fold(0.0, f64::max);
    assert!((r.expected_saving_usd - (max_cost - chosen.expected_cost_usd)).abs() < 1e-15);
    match r.reason.as_str() {
        "floor_met" => {
            assert!(chosen.p_pass >= info.default_quality_floor);
            // Nothing cheaper met the floor.
            for s in r.candidates.iter().take_while(|s| s.model != r.model) {
                assert!(
                    s.p_pass < info.default_quality_floor,
                    "{s:?} was cheaper and met the floor"
                );
            }
        }
        "best_effort" => {
            assert!(r.candidates.iter().all(|s| s.p_pass <= chosen.p_pass));
        }
        "relative" => {
            // The default: the cheapest within relative_floor of this prompt's best.
            let best = r.candidates.iter().map(|s| s.p_pass).fold(0.0, f64::max);
            let bar = info.default_relative_floor * best;
            assert!(info.default_relative_floor > 0.0 && chosen.p_pass >= bar);
            for s in r.candidates.iter().take_while(|s| s.model != r.model) {
                assert!(s.p_pass < bar, "{s:?} was cheaper and reached {bar}");
            }
            assert!((r.margin - (chosen.p_pass - bar)).abs() < 1e-12);
        }
        other => panic!("unexpected reason {other}"),
    }
    if r.reason != "relative" {
        assert!((r.margin - (chosen.p_pass - info.default_quality_floor)).abs() < 1e-12);
    }
    assert!(!r.truncated && r.input_tokens > 5 && r.input_tokens < 40);
    let t = r.timings.unwrap();
    assert!(t.total_ms >= t.inference_ms && t.inference_ms > 0.0);

    // Chat messages, and an explicit candidate set of data models.
    let mut req = route("");
    req.input = Some(Input::Messages(proto::Messages {
        messages: vec![
            proto::ChatMessage {
                role: "system".into(),
                content: "You are terse.".into(),
            },
            proto::ChatMessage {
                role: "user".into(),
                content: "Name three prime numbers.".into(),
            },
        ],
    }));
    req.candidates = vec!["gemini-1.5-flash-002".into(), "gemini-1.5-pro-002".into()];
    let r = c.route(req).await.unwrap().into_inner();
    assert_eq!(r.candidates.len(), 2);
    assert!(r.model.starts_with("gemini-1.5-"));
    // Turns without content are no prompt (they would be routed on their role tags), and
    // Verify reads messages as Route does.
    let empty = |content: &str| proto::Messages {
        messages: vec![proto::ChatMessage {
            role: "user".into(),
            content: content.into(),
        }],
    };
    let mut req = route("");
    req.input = Some(Input::Messages(empty(" ")));
    let mut v = verify("", "4", "gemini-2.5-flash");
    v.messages = Some(empty(""));
    for e in [
        c.route(req).await.expect_err("empty turns"),
        c.verify(v).await.expect_err("empty turns"),
    ] {
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(
            e.message().contains("messages are empty"),
            "{}",
            e.message()
        );
    }

    // A floor of 0 always takes the cheapest; a floor of 1 never meets it.
    let mut req = route("Translate 'good morning' into French.");
    req.policy = Some(proto::Policy {
        quality_floor: Some(0.0),
        ..Default::default()
    });
    let r = c.route(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.model, r.candidates[0].model);
    assert_eq!(r.reason, "floor_met");
    req.policy = Some(proto::Policy {
        quality_floor: Some(1.0),
        ..Default::default()
    });
    assert_eq!(
        c.route(req).await.unwrap().into_inner().reason,
        "best_effort"
    );

    // A long prompt is truncated to the limit, and says so.
    let r = c
        .route(route(&prompt_of(600, 1)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.truncated);
    assert_eq!(r.input_tokens, 256);

    // A gateway's Verify after Route on the same prompt reuses the prompt's embedding.
    let routed = c
        .route(route("What is 12 * 12?"))
        .await
        .unwrap()
        .into_inner();
    // Where Verify escalates from `model`: the rule on Route's p, in Route's price order.
    let escalation = |r: &proto::RouteReply, model: &str, p_answer: f64| {
        let p: Vec<f64> = r.candidates.iter().map(|c| c.p_pass).collect();
        let from = r.candidates.iter().position(|c| c.model == model).unwrap();
        tiergate::service::decide::escalation_pick(&p, from, p_answer)
            .map_or(String::new(), |j| r.candidates[j].model.clone())
    };

    // Verify: a calibrated p_pass, a decision consistent with the threshold.
    let v = c
        .verify(verify(
            "What is 12 * 12?",
            "12 * 12 = 144. The answer is 144.",
            "gemini-2.5-flash",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!((0.0..=1.0).contains(&v.p_pass));
    let ship = v.p_pass >= v.threshold;
    assert_eq!(
        v.decision,
        if ship {
            Decision::Ship
        } else {
            Decision::Escalate
        } as i32
    );
    if ship {
        assert!(v.escalate_to.is_empty());
    } else {
        assert_eq!(
            v.escalate_to,
            escalation(&routed, "gemini-2.5-flash", v.p_pass)
        );
    }
    // An empty answer is never shipped. It escalates to the pricier model Route rates most
    // likely to pass, past pricier ones rated lower (expected cost at 250 output tokens:
    // flash < deepseek-v4 < haiku < sonnet < opus < gpt-5.5), and, having p 0, even to one
    // rated no higher than the model that answered; the top tier has nowhere to go.
    let haiku = c.route(route("Write a haiku.")).await.unwrap().into_inner();
    let names: Vec<&str> = haiku.candidates.iter().map(|c| c.model.as_str()).collect();
    assert_eq!(names[0], "gemini-2.5-flash", "{names:?}");
    assert_eq!(names[5], "gpt-5.5", "{names:?}");
    let mut to = Vec::new();
    for model in ["gemini-2.5-flash", "claude-opus-4.8"] {
        let v = c
            .verify(verify("Write a haiku.", "  ", model))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.decision, Decision::Escalate as i32);
        assert_eq!(v.p_pass, 0.0);
        assert_eq!(v.escalate_to, escalation(&haiku, model, 0.0), "{haiku:?}");
        to.push(v.escalate_to);
    }
    // Characters the tokenizer drops (zero-width, control) are no answer either, nor is one
    // without a letter or a digit (the verifier rated "." like a real answer).
    for nothing in ["\u{200B}\u{1}", ".", "} } } ]", "?!"] {
        let v = c
            .verify(verify("Write a haiku.", nothing, "gemini-2.5-flash"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (v.decision, v.p_pass),
            (Decision::Escalate as i32, 0.0),
            "{nothing:?}: {v:?}"
        );
    }
    // With the landed heads Route rates deepseek-v4 and haiku below flash here, and gpt-5.5
    // the same as opus (the catalog gives both gpt-4-1106-preview's parameters).
    assert_eq!(to, ["claude-sonnet-4.6", "gpt-5.5"], "{haiku:?}");
    // The escalation's budget is judged at the output length Route assumed: opus fits 0.05
    // USD at its default 250 output tokens (0.006) but not at 4000 (0.1), as Route would
    // judge it with the same expected_output_tokens.
    let mut budget = verify("Write a haiku.", "", "gemini-2.5-flash");
    budget.candidates = vec!["gemini-2.5-flash".into(), "claude-opus-4.8".into()];
    budget.policy = Some(proto::Policy {
        max_cost_usd: Some(0.05),
        ..Default::default()
    });
    let v = c.verify(budget.clone()).await.unwrap().into_inner();
    assert_eq!(v.escalate_to, "claude-opus-4.8");
    budget.expected_output_tokens = Some(4000);
    let v = c.verify(budget).await.unwrap().into_inner();
    assert_eq!(v.escalate_to, "", "over the budget at 4000 output tokens");
    // Not even at a threshold of 0 (a floor of 0 below the learned table).
    let mut zero = verify("Write a haiku.", "", "gemini-2.5-flash");
    zero.policy = Some(proto::Policy {
        quality_floor: Some(0.0),
        ..Default::default()
    });
    let v = c.verify(zero).await.unwrap().into_inner();
    assert_eq!((v.threshold, v.decision), (0.0, Decision::Escalate as i32));
    let mut top = verify("Write a haiku.", "", "gpt-5.5");
    top.policy = Some(proto::Policy {
        quality_floor: Some(0.9),
        ..Default::default()
    });
    let v = c.verify(top.clone()).await.unwrap().into_inner();
    assert!(v.escalate_to.is_empty());
    // A higher floor never lowers the shipping bar.
    top.policy = Some(proto::Policy {
        quality_floor: Some(0.6),
        ..Default::default()
    });
    let lower = c.verify(top).await.unwrap().into_inner();
    assert!(
        lower.threshold <= v.threshold && v.threshold <= 1.0,
        "{} vs {}",
        lower.threshold,
        v.threshold
    );

    // Streams keep order; a bad item answers with an error in its place, the stream goes on.
    let mut reqs: Vec<proto::RouteRequest> = (0..12)
        .map(|i| {
            let mut r = route(&prompt_of(5 + i * 9, i));
            r.request_id = format!("s{i}");
            r
        })
        .collect();
    reqs[5].input = None;
    let mut out = c
        .route_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut i = 0;
    while let Some(item) = out.message().await.unwrap() {
        match item.result.unwrap() {
            proto::route_stream_reply::Result::Reply(r) => {
                assert_eq!(r.request_id, format!("s{i}"));
                assert_ne!(i, 5);
            }
            proto::route_stream_reply::Result::Error(e) => {
                assert_eq!(i, 5);
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert_eq!(e.request_id, "s5");
            }
        }
        i += 1;
    }
    assert_eq!(i, 12);

    let vreqs: Vec<proto::VerifyRequest> = (0..6)
        .map(|i| {
            let mut v = verify(
                "What is 2 + 2?",
                &format!("It is {}.", i + 2),
                "deepseek-v4",
            );
            v.request_id = format!("v{i}");
            v
        })
        .collect();
    let mut out = c
        .verify_stream(tokio_stream::iter(vreqs))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(item) = out.message().await.unwrap() {
        match item.result.unwrap() {
            proto::verify_stream_reply::Result::Reply(v) => ids.push(v.request_id),
            proto::verify_stream_reply::Result::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ids, (0..6).map(|i| format!("v{i}")).collect::<Vec<_>>());

    // Reflection lists our service and health, so grpcurl works.
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut rc = ServerReflectionClient::new(srv.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = rc
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection reply");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"tiergate.v1.Router"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    // The same through v1alpha, which older grpcurl, grpcui and Postman speak.
    {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut rc = ServerReflectionClient::new(srv.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = rc
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .expect("v1alpha reflection")
            .into_inner();
        let msg = resp.message().await.expect("reply").expect("one");
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("unexpected v1alpha reflection reply");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"tiergate.v1.Router"), "{names:?}");
    }

    // Prometheus: the counters moved.
    let m = srv.metrics_text();
    for name in [
        "tiergate_requests_total{rpc=\"Route\",code=\"OK\"}",
        "tiergate_requests_total{rpc=\"RouteStream\",code=\"INVALID_ARGUMENT\"}",
        "tiergate_request_duration_seconds_bucket",
        "tiergate_batch_size_bucket",
        "tiergate_batch_tokens_bucket",
        "tiergate_queue_depth",
        "tiergate_tokenize_seconds_bucket",
        "tiergate_queue_seconds_bucket",
        "tiergate_inference_seconds_bucket",
        "tiergate_route_decisions_total",
        "tiergate_escalations_total",
        "tiergate_truncations_total{rpc=\"route\"}",
        "tiergate_rejections_total",
        "tiergate_embedding_cache_total{result=\"hit\"}",
    ] {
        assert!(m.contains(name), "/metrics lacks {name}:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_typed_errors() {
    let srv = Server::spawn(&[]);
    srv.ready().await;
    let mut c = srv.client().await;
    let huge = "x ".repeat(140_000);
    let pol = |p: proto::Policy| {
        let mut r = route("hello there");
        r.policy = Some(p);
        r
    };
    let route_cases: Vec<(&str, proto::RouteRequest, Code)> = vec![
        (
            "no input",
            proto::RouteRequest::default(),
            Code::InvalidArgument,
        ),
        ("empty prompt", route("   "), Code::InvalidArgument),
        ("oversize prompt", route(&huge), Code::InvalidArgument),
        (
            "unknown candidate",
            {
                let mut r = route("hi");
                r.candidates = vec!["gpt-7-ultra".into()];
                r
            },
            Code::InvalidArgument,
        ),
        (
            "NaN floor",
            pol(proto::Policy {
                quality_floor: Some(f64::NAN),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ),
        (
            "floor above 1",
            pol(proto::Policy {
                quality_floor: Some(1.5),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ),
        (
            "negative max cost",
            pol(proto::Policy {
                max_cost_usd: Some(-1.0),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ),
        (
            "negative cost weight",
            pol(proto::Policy {
                cost_weight: Some(-0.5),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ),
        (
            "nothing affordable",
            pol(proto::Policy {
                max_cost_usd: Some(0.0),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ),
        (
            "bad priority",
            {
                let mut r = route("hi");
                r.priority = 42;
                r
            },
            Code::InvalidArgument,
        ),
        (
            "bad truncation",
            {
                let mut r = route("hi");
                r.truncation = 9;
                r
            },
            Code::InvalidArgument,
        ),
        (
            "zero output tokens",
            {
                let mut r = route("hi");
                r.expected_output_tokens = Some(0);
                r
            },
            Code::InvalidArgument,
        ),
    ];
    for (name, req, code) in route_cases {
        let e = c.route(req).await.expect_err(name);
        assert_eq!(e.code(), code, "{name}: {}", e.message());
        assert!(!e.message().is_empty(), "{name}: empty message");
    }
    let e = c
        .route({
            let mut r = route("hi");
            r.candidates = vec!["gpt-7-ultra".into()];
            r
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("gpt-7-ultra"),
        "names the model: {}",
        e.message()
    );

    let verify_cases: Vec<(&str, proto::VerifyRequest, Code)> = vec![
        (
            "empty prompt",
            verify("", "answer", "gpt-5.5"),
            Code::InvalidArgument,
        ),
        (
            "unknown model",
            verify("q", "a", "nope"),
            Code::InvalidArgument,
        ),
        (
            "oversize answer",
            verify("q", &huge, "gpt-5.5"),
            Code::InvalidArgument,
        ),
        (
            "NaN floor",
            {
                let mut v = verify("q", "a", "gpt-5.5");
                v.policy = Some(proto::Policy {
                    quality_floor: Some(f64::NAN),
                    ..Default::default()
                });
                v
            },
            Code::InvalidArgument,
        ),
    ];
    for (name, req, code) in verify_cases {
        let e = c.verify(req).await.expect_err(name);
        assert_eq!(e.code(), code, "{name}: {}", e.message());
    }

    // A deadline shorter than the work, sent as grpc-timeout only (no client-side timer): the
    // server answers DEADLINE_EXCEEDED, never OK, never a hang, and never the CANCELLED
    // "Timeout expired" of tonic's own timer, which clients do not read as a deadline.
    // (tests/faults.rs has the deadline passing while the backend computes.)
    let mut req = tonic::Request::new(route(&prompt_of(250, 3)));
    req.metadata_mut()
        .insert("grpc-timeout", "1u".parse().unwrap());
    let e = c.route(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());

    // The server is still healthy after all that.
    assert!(c.route(route("still alive?")).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_rejects_at_once_and_loses_nothing_accepted() {
    let srv = Server::spawn(&[
        "--max-queue",
        "4",
        "--max-batch-requests",
        "2",
        "--threads",
        "1",
    ]);
    srv.ready().await;
    let c = srv.client().await;
    let n = 80;
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = route(&prompt_of(200, i));
            r.request_id = format!("o{i}");
            c.route(r).await.map(|r| r.into_inner().request_id)
        }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    for (i, t) in tasks.into_iter().enumerate() {
        match common::within("an accepted Route", t).await.unwrap() {
            Ok(id) => {
                assert_eq!(id, format!("o{i}"));
                ok += 1;
            }
            Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
            Err(e) => panic!("request {i}: unexpected {:?} {}", e.code(), e.message()),
        }
    }
    assert_eq!(ok + exhausted, n, "every request answered");
    assert!(
        exhausted > 0,
        "a queue of 4 must overflow under {n} concurrent requests"
    );
    assert!(ok >= 4, "admitted requests are computed ({ok} ok)");
    let m = srv.metrics_text();
    assert!(
        m.contains("tiergate_rejections_total{rpc=\"Route\",reason=\"queue_full\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_accepted_requests() {
    // No wait bound: all 16 are accepted, however slow the machine (tests/admission.rs has it).
    let mut srv = Server::spawn(&[
        "--max-batch-requests",
        "1",
        "--threads",
        "1",
        "--max-queue-delay-ms",
        "0",
    ]);
    srv.ready().await;
    let c = srv.client().await;
    let n = 16;
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.route(route(&prompt_of(250, i))).await
        }));
    }
    // Wait until all of them are accepted: one batch a request, so at most three are formed
    // (running, handed over, held by the forming thread); the rest are answered or queued.
    let accepted = || {
        let m = srv.metrics_text();
        let queued = common::metric_sum(&m, "tiergate_queue_depth", &[]).unwrap_or(0.0);
        let done = common::metric_sum(&m, "tiergate_requests_total", &[("rpc", "Route")]);
        queued + done.unwrap_or(0.0)
    };
    let t0 = std::time::Instant::now();
    while accepted() < (n - 3) as f64 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "requests never queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.sigterm();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = common::within("a Route accepted before SIGTERM", t)
            .await
            .unwrap();
        assert!(
            r.is_ok(),
            "request {i} was accepted before SIGTERM but got {:?}",
            r.err()
        );
    }
    let st = srv.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "exit status {st}");
}

/// An open stream whose client neither sends nor closes must not hold the drain: on SIGTERM
/// the server answers what the stream already sent, ends it with UNAVAILABLE, and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_idle_open_streams() {
    let mut srv = Server::spawn(&[]);
    srv.ready().await;
    let mut c = srv.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::RouteRequest>(4);
    let mut r = route(&prompt_of(20, 1));
    r.request_id = "first".into();
    tx.send(r).await.unwrap();
    let mut out = c
        .route_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    match out.message().await.unwrap().and_then(|m| m.result) {
        Some(proto::route_stream_reply::Result::Reply(rep)) => assert_eq!(rep.request_id, "first"),
        other => panic!("first stream item got {other:?}"),
    }
    // `tx` stays alive: the client keeps its side of the stream open and idle.
    srv.sigterm();
    let end = tokio::time::timeout(Duration::from_secs(30), out.message())
        .await
        .expect("the stream was not ended by the drain");
    // Cut by the drain, not ended by the client: UNAVAILABLE tells it that anything it sent
    // without a reply was not processed.
    match end {
        Err(st) => assert_eq!(st.code(), Code::Unavailable, "{st:?}"),
        other => panic!("stream ended with {other:?}"),
    }
    let st = srv.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "exit status {st}");
    drop(tx);
}

/// A floor in the config replaces the learned one, and Verify's default threshold follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_floor_overrides_the_learned_defaults() {
    let srv = Server::spawn(&["--quality-floor", "0.55"]);
    srv.ready().await;
    let mut c = srv.client().await;
    let info = c.info(proto::InfoRequest {}).await.unwrap().into_inner();
    let heads = tiergate::model::heads::Heads::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/heads.json"
    )))
    .unwrap();
    assert_eq!(info.default_quality_floor, 0.55);
    assert_eq!(info.default_verify_threshold, heads.threshold_for(0.55));
    assert_ne!(
        info.default_verify_threshold,
        heads.default_verify_threshold
    );
    let r = c
        .route(route("Summarise the causes of the French Revolution."))
        .await
        .unwrap()
        .into_inner();
    let chosen = r.candidates.iter().find(|s| s.model == r.model).unwrap();
    if r.reason == "floor_met" {
        assert!(chosen.p_pass >= 0.55);
        assert!((r.margin - (chosen.p_pass - 0.55)).abs() < 1e-12);
    }
}
