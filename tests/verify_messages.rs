//! Verify reads a conversation as Route does: after a Route(messages) the Verify of the same
//! turns reuses the prompt's embedding and scores exactly as the joined text would.
mod common;

use tiergate::proto::{self, route_request::Input};

fn turns() -> proto::Messages {
    let m = |role: &str, content: &str| proto::ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    proto::Messages {
        messages: vec![
            m("system", "You answer arithmetic questions."),
            m("user", "What is 12 times 12?"),
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_takes_messages_like_route() {
    let server = common::Server::spawn(&[]);
    server.ready().await;
    let mut c = server.client().await;
    let routed = c
        .route(proto::RouteRequest {
            input: Some(Input::Messages(turns())),
            ..Default::default()
        })
        .await
        .expect("route")
        .into_inner();
    let hits =
        |m: &str| common::metric_sum(m, "tiergate_embedding_cache_total", &[("result", "hit")]);
    let before = hits(&server.metrics_text()).unwrap_or(0.0);
    let verify = |messages: Option<proto::Messages>, prompt: &str| proto::VerifyRequest {
        prompt: prompt.into(),
        messages,
        answer: "12 times 12 is 144.".into(),
        model: routed.model.clone(),
        ..Default::default()
    };
    let by_turns = c
        .verify(verify(Some(turns()), ""))
        .await
        .expect("verify messages")
        .into_inner();
    let after = hits(&server.metrics_text()).unwrap_or(0.0);
    assert!(
        after >= before + 1.0,
        "the Route's embedding is reused: {before} → {after}"
    );
    let joined = "system: You answer arithmetic questions.\nuser: What is 12 times 12?";
    let by_text = c
        .verify(verify(None, joined))
        .await
        .expect("verify prompt")
        .into_inner();
    assert!(
        (by_turns.p_pass - by_text.p_pass).abs() < 1e-9,
        "{by_turns:?} {by_text:?}"
    );
    let e = c
        .verify(verify(Some(turns()), joined))
        .await
        .expect_err("both");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}
