//! Whole Route and Verify requests through the real server (the binary, on loopback, on the
//! fault-injecting backend in its pass-through mode): arbitrary candidate lists, names,
//! prompts, messages, answers, peers, floors, priorities, truncation values and deadlines,
//! empty, huge or invalid. Each gets a valid reply or a typed status a client can act on
//! (never INTERNAL or UNKNOWN, which a panic or an unmapped error would give), within a
//! bound; the server stays up and SERVING throughout.
use std::time::Duration;

use proptest::prelude::*;
use tiergate::proto::{self, route_request::Input};
use tonic::Code;

use crate::common::fault::Faulty;

/// Names: mostly the catalog's; else a trained head's, unknown, empty, long, odd characters.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "gemini-2.5-flash",
            "claude-haiku-4.5",
            "deepseek-v4",
            "claude-sonnet-4.6",
            "gpt-5.5",
            "claude-opus-4.8",
        ])
        .prop_map(String::from),
        1 => prop::sample::select(vec!["gpt-4-1106-preview", "", " ", "auto"])
            .prop_map(String::from),
        1 => any::<String>(),
        1 => (1usize..400).prop_map(|n| "m".repeat(n)),
        1 => "[a-z0-9.:/_-]{1,40}",
    ]
}

/// Text: mostly a real-looking prompt; else empty, any Unicode, or large (past
/// max_input_bytes = 256 KiB).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[A-Za-z][A-Za-z0-9 ,.?]{0,200}",
        2 => any::<String>(),
        1 => Just(String::new()),
        1 => "\\PC{0,40}",
        1 => (1usize..3, prop::sample::select(vec!["word ", "é", "\u{0}", "漢"]))
            .prop_map(|(k, p)| p.repeat(k * 100_000)),
    ]
}

/// Floats as a client may send them: mostly in [0, 1], else out of range or not finite.
fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => 0.0..=1.0f64,
        1 => prop::sample::select(vec![
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            -0.0,
            5e-324,
            1.5,
            1e300,
        ]),
    ]
}

fn policy() -> impl Strategy<Value = Option<proto::Policy>> {
    prop::option::weighted(
        0.4,
        (
            prop::option::of(float()),
            prop::option::of(float()),
            prop::option::of(float()),
            prop::option::of(float()),
        )
            .prop_map(|(q, m, c, r)| proto::Policy {
                quality_floor: q,
                max_cost_usd: m,
                cost_weight: c,
                relative_floor: r,
            }),
    )
}

/// Priority or truncation: mostly a defined value.
fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![
        6 => 0..=3i32,
        1 => prop::sample::select(vec![4, -1, 99, i32::MIN, i32::MAX]),
    ]
}

fn candidates() -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        2 => Just(vec![]),
        4 => prop::collection::vec(name(), 1..6),
        1 => (60usize..80).prop_map(|n| vec!["gpt-5.5".to_string(); n]),
    ]
}

fn messages() -> impl Strategy<Value = proto::Messages> {
    prop::collection::vec(
        (
            prop::sample::select(vec!["system", "user", "assistant", "tool", "", "ROOT"]),
            text(),
        ),
        0..5,
    )
    .prop_map(|v| proto::Messages {
        messages: v
            .into_iter()
            .map(|(r, c)| proto::ChatMessage {
                role: r.to_string(),
                content: c,
            })
            .collect(),
    })
}

/// grpc-timeout as sent: none, ample, or too short to do anything.
fn timeout() -> impl Strategy<Value = Option<Duration>> {
    prop::sample::select(vec![
        None,
        None,
        Some(Duration::from_secs(20)),
        Some(Duration::from_nanos(1)),
        Some(Duration::from_millis(1)),
        Some(Duration::from_millis(50)),
    ])
}

#[derive(Debug, Clone)]
enum Req {
    Route(proto::RouteRequest),
    Verify(proto::VerifyRequest),
}

enum Reply {
    Route(proto::RouteReply),
    Verify(proto::VerifyReply),
}

fn route() -> impl Strategy<Value = Req> {
    (
        "\\PC{0,20}",
        prop_oneof![
            1 => Just(None),
            6 => text().prop_map(|t| Some(Input::Prompt(t))),
            2 => messages().prop_map(|m| Some(Input::Messages(m))),
        ],
        candidates(),
        policy(),
        enum_value(),
        enum_value(),
        prop::option::of(prop::sample::select(vec![0u32, 1, 250, u32::MAX])),
    )
        .prop_map(
            |(id, input, candidates, policy, priority, truncation, out)| {
                Req::Route(proto::RouteRequest {
                    request_id: id,
                    input,
                    candidates,
                    policy,
                    priority,
                    truncation,
                    expected_output_tokens: out,
                })
            },
        )
}

fn verify() -> impl Strategy<Value = Req> {
    (
        (
            text(),
            prop::option::weighted(0.2, messages()),
            text(),
            name(),
        ),
        candidates(),
        policy(),
        enum_value(),
        prop_oneof![
            3 => Just(vec![]),
            2 => prop::collection::vec((name(), text()), 1..4),
            1 => prop::collection::vec((name(), text()), 4..10),
        ],
        prop::option::weighted(0.3, float()),
        prop::option::of(prop::sample::select(vec![0u32, 1, 250, u32::MAX])),
    )
        .prop_map(
            |((prompt, messages, answer, model), candidates, policy, priority, peers, pt, out)| {
                Req::Verify(proto::VerifyRequest {
                    request_id: "v".into(),
                    prompt,
                    messages,
                    answer,
                    model,
                    candidates,
                    policy,
                    priority,
                    peers: peers
                        .into_iter()
                        .map(|(model, answer)| proto::PeerAnswer { model, answer })
                        .collect(),
                    peer_threshold: pt,
                    expected_output_tokens: out,
                })
            },
        )
}

fn p_ok(what: &str, p: f64) -> Result<(), TestCaseError> {
    prop_assert!(p.is_finite() && (0.0..=1.0).contains(&p), "{what} = {p}");
    Ok(())
}

#[test]
fn route_and_verify_requests_get_a_reply_or_a_typed_status() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut f = rt.block_on(Faulty::start(&[], &[], &[]));
    let mut client = rt.block_on(f.srv.client());
    let input = (prop_oneof![route(), verify()], timeout());
    let seen = std::sync::Mutex::new(std::collections::BTreeMap::<String, u64>::new());
    super::engine::run("route_verify_requests", 150, input, |(req, t)| {
        let mut c = client.clone();
        let res = rt.block_on(async {
            let call = async {
                match req.clone() {
                    Req::Route(r) => {
                        let mut q = tonic::Request::new(r);
                        if let Some(t) = t {
                            q.set_timeout(t);
                        }
                        c.route(q).await.map(|r| Reply::Route(r.into_inner()))
                    }
                    Req::Verify(r) => {
                        let mut q = tonic::Request::new(r);
                        if let Some(t) = t {
                            q.set_timeout(t);
                        }
                        c.verify(q).await.map(|r| Reply::Verify(r.into_inner()))
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(60), call).await
        });
        let res = res.map_err(|_| TestCaseError::fail("no answer in 60 s: a hang"))?;
        let code = match &res {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        *seen.lock().unwrap().entry(format!("{code:?}")).or_default() += 1;
        match res {
            Ok(Reply::Route(r)) => {
                for c in &r.candidates {
                    p_ok(&format!("p_pass of {}", c.model), c.p_pass)?;
                    prop_assert!(c.expected_cost_usd.is_finite() && c.expected_cost_usd >= 0.0);
                }
                prop_assert!(!r.model.is_empty(), "Route chose no model");
                prop_assert!(r.expected_cost_usd.is_finite());
            }
            Ok(Reply::Verify(v)) => {
                p_ok("Verify p_pass", v.p_pass)?;
                prop_assert!(v.threshold.is_finite(), "threshold {}", v.threshold);
            }
            Err(s) => {
                // What a client can act on: its own mistake, load, or its deadline (CANCELLED:
                // the client's own timer at the same deadline).
                let allowed = [
                    Code::InvalidArgument,
                    Code::ResourceExhausted,
                    Code::DeadlineExceeded,
                    Code::Cancelled,
                ];
                prop_assert!(
                    allowed.contains(&s.code()),
                    "{:?}: {}",
                    s.code(),
                    s.message().chars().take(300).collect::<String>()
                );
                prop_assert!(
                    s.message().len() <= 600,
                    "message of {} bytes",
                    s.message().len()
                );
                if s.code() == Code::Cancelled || s.code() == Code::DeadlineExceeded {
                    prop_assert!(
                        t.is_some_and(|t| t < Duration::from_secs(1)),
                        "deadline {t:?}"
                    );
                }
            }
        }
        Ok(())
    });
    assert!(f.srv.child_alive(), "the server exited");
    let info = rt.block_on(client.info(proto::InfoRequest {}));
    assert!(info.is_ok(), "Info after the run: {info:?}");
    println!("codes: {:?}", seen.into_inner().unwrap());
}
