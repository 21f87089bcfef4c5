//! Admission before work, on the real server: the tokenizer stage holds a bounded number of
//! bytes, so a burst of huge non-ASCII prompts (the slow `tokenizers` path) is shed with
//! RESOURCE_EXHAUSTED (with a retry pushback) instead of stalling everyone, small requests
//! still get through, and the backlog empties afterwards. And the edge's bounds (issue 19):
//! client text is quoted only clipped in errors, candidate lists and model names are capped,
//! a request that does not parse is INVALID_ARGUMENT, and one over the decode limit is refused
//! by tonic before decoding.
mod common;

use tiergate::proto::{self, route_request::Input};
use tonic::Code;

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
    // Connect all six first, then send together: connecting one by one between the sends
    // could space them out enough for each to finish before the next arrives.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(server.client().await);
    }
    let mut calls = Vec::new();
    for mut c in clients {
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
        match common::within("a large Route", call).await.expect("task") {
            Ok(_) => ok += 1,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(s.message().contains("tokenizer backlog"), "{}", s.message());
                // Shed before work: the reply says when to retry (gRPC retry pushback).
                let pushback = s.metadata().get("grpc-retry-pushback-ms");
                let ms: Option<u64> = pushback.and_then(|v| v.to_str().ok()?.parse().ok());
                assert!(
                    ms.is_some_and(|ms| (100..=1000).contains(&ms)),
                    "{pushback:?}"
                );
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

fn route(prompt: &str, candidates: Vec<String>) -> proto::RouteRequest {
    proto::RouteRequest {
        input: Some(Input::Prompt(prompt.into())),
        candidates,
        ..Default::default()
    }
}

fn verify(model: &str, candidates: Vec<String>) -> proto::VerifyRequest {
    proto::VerifyRequest {
        prompt: "What is 2 + 2?".into(),
        answer: "4".into(),
        model: model.into(),
        candidates,
        ..Default::default()
    }
}

/// Sends `msg`, encoded as given, to the Route method and returns the error.
async fn raw_route<M: prost::Message + Default + Send + 'static>(
    server: &common::Server,
    msg: M,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/tiergate.v1.Router/Route");
    let codec = tonic_prost::ProstCodec::<M, proto::RouteReply>::default();
    grpc.unary(tonic::Request::new(msg), path, codec)
        .await
        .expect_err("a malformed request is refused")
}

/// Field 2 (`prompt`) as raw bytes: the same wire format as a string, any content.
#[derive(Clone, PartialEq, prost::Message)]
struct PromptBytes {
    #[prost(bytes = "vec", tag = "2")]
    prompt: Vec<u8>,
}

/// Field 2 (`prompt`, a string) sent as a varint: the wrong wire type.
#[derive(Clone, PartialEq, prost::Message)]
struct PromptVarint {
    #[prost(uint64, tag = "2")]
    prompt: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_text_is_clipped_and_model_lists_are_capped() {
    let server = common::Server::spawn(&[]);
    server.ready().await;
    let known = server.info().await.catalog[0].model.clone();
    let mut c = server.client().await;

    // A 1 MiB model name used to come back whole (RESOURCE_EXHAUSTED: trailers too big).
    let huge = "m".repeat(1 << 20);
    let e = c.verify(verify(&huge, vec![])).await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().len() < 300, "{} bytes", e.message().len());
    assert!(e.message().contains("bytes"), "{}", e.message());

    // Under the name cap but unknown: still INVALID_ARGUMENT, still clipped.
    let long = "x".repeat(250);
    for e in [
        c.verify(verify(&long, vec![]))
            .await
            .expect_err("unknown model"),
        c.route(route("hi there", vec![long.clone()]))
            .await
            .expect_err("unknown candidate"),
    ] {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("unknown"), "{}", e.message());
        assert!(!e.message().contains(&long), "{}", e.message());
        assert!(e.message().len() < 300, "{}", e.message());
    }

    // Model names: at most 256 bytes, whichever field names them.
    let name_257 = "y".repeat(257);
    let peer = proto::PeerAnswer {
        model: name_257.clone(),
        answer: "4".into(),
    };
    for e in [
        c.route(route("hi there", vec![name_257.clone()]))
            .await
            .expect_err("candidate name"),
        c.verify(verify(&known, vec![name_257.clone()]))
            .await
            .expect_err("candidate name"),
        c.verify(proto::VerifyRequest {
            peers: vec![peer],
            ..verify(&known, vec![])
        })
        .await
        .expect_err("peer's model name"),
    ] {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("over 256 bytes"), "{}", e.message());
    }

    // Request ids: at most 256 bytes, on Route and Verify alike.
    c.route(proto::RouteRequest {
        request_id: "i".repeat(256),
        ..route("hi there", vec![])
    })
    .await
    .expect("a 256-byte request id");
    for e in [
        c.route(proto::RouteRequest {
            request_id: "i".repeat(257),
            ..route("hi there", vec![])
        })
        .await
        .expect_err("257-byte request id"),
        c.verify(proto::VerifyRequest {
            request_id: "i".repeat(1 << 20),
            ..verify(&known, vec![])
        })
        .await
        .expect_err("1 MiB request id"),
    ] {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("request_id"), "{}", e.message());
        assert!(e.message().len() < 300, "{}", e.message());
    }

    // Chat turns: at most 4096 per request, on Route and Verify alike.
    let turns = |n: usize| proto::Messages {
        messages: vec![
            proto::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            };
            n
        ],
    };
    c.route(proto::RouteRequest {
        input: Some(Input::Messages(turns(4096))),
        ..Default::default()
    })
    .await
    .expect("4096 turns");
    for e in [
        c.route(proto::RouteRequest {
            input: Some(Input::Messages(turns(4097))),
            ..Default::default()
        })
        .await
        .expect_err("4097 turns"),
        c.verify(proto::VerifyRequest {
            prompt: String::new(),
            messages: Some(turns(100_000)),
            ..verify(&known, vec![])
        })
        .await
        .expect_err("100000 turns"),
    ] {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("at most 4096"), "{}", e.message());
    }

    // Candidates: 64 pass (duplicates of a known model), 65 do not.
    let n = |k| vec![known.clone(); k];
    c.route(route("hi there", n(64)))
        .await
        .expect("64 candidates");
    c.verify(verify(&known, n(64)))
        .await
        .expect("64 candidates");
    for e in [
        c.route(route("hi there", n(65))).await.expect_err("65"),
        c.verify(verify(&known, n(65))).await.expect_err("65"),
    ] {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("at most 64"), "{}", e.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_requests_are_the_clients_mistake() {
    let server = common::Server::spawn(&[]);
    server.ready().await;

    let bad_utf8 = raw_route(
        &server,
        PromptBytes {
            prompt: vec![b'h', b'i', 0xff, 0xfe],
        },
    )
    .await;
    let wrong_wire_type = raw_route(&server, PromptVarint { prompt: 7 }).await;
    for e in [bad_utf8, wrong_wire_type] {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().len() < 300, "{}", e.message());
    }

    // Ten inputs' worth plus 64 KiB (a Verify with 8 peers); one byte over is refused unread.
    let max_input = server.info().await.limits.expect("limits").max_input_bytes as usize;
    let limit = max_input * 10 + 64 * 1024;
    let e = server
        .client()
        .await
        .route(route(&"a".repeat(limit), vec![]))
        .await
        .expect_err("over the decode limit");
    // tonic's own code for it; the per-field check would say INVALID_ARGUMENT instead.
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    assert!(e.message().contains(&limit.to_string()), "{}", e.message());
    assert!(e.message().len() < 300, "{}", e.message());
}
