//! Bearer-token authentication on the real server: gRPC answers UNAUTHENTICATED without a
//! known token (Router and Admin alike) and serves with one, tokens from a file and from an
//! environment variable both count, grpc.health.v1 stays open for probes, and the HTTP front
//! answers 401 in OpenAI's error shape. Unusable token lists stop start-up.
mod common;

use common::Server;
use tiergate::proto::{self, admin_client::AdminClient, route_request::Input};
use tonic::metadata::MetadataValue;
use tonic::Code;

const FILE_TOKEN: &str = "file-token-0123456789abcdef";
const ENV_TOKEN: &str = "env-token-fedcba9876543210";

fn route_request(token: Option<&str>) -> tonic::Request<proto::RouteRequest> {
    let mut r = tonic::Request::new(proto::RouteRequest {
        input: Some(Input::Prompt("Write a haiku about type systems.".into())),
        ..Default::default()
    });
    if let Some(t) = token {
        let v: MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
        r.metadata_mut().insert("authorization", v);
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_known_bearer_tokens_get_in_and_health_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("# API tokens\n\n{FILE_TOKEN}\n")).unwrap();
    // The front needs a model with an upstream to start; /v1/models never calls it.
    let mut c = tiergate::config::Config::embedded().unwrap();
    c.catalog[0].upstream = Some(tiergate::config::UpstreamConfig {
        base_url: "http://127.0.0.1:9/v1".into(),
        model: None,
        api_key_env: None,
    });
    // Port 0: the server prints the port it bound.
    c.gateway.http_listen = "127.0.0.1:0".into();
    c.auth.tokens_file = Some(tokens.clone());
    c.auth.tokens_env = Some("TIERGATE_TEST_TOKENS".into());
    let config = dir.path().join("tiergate.toml");
    std::fs::write(&config, toml::to_string(&c).unwrap()).unwrap();
    let s = Server::spawn_env(
        &["--config", config.to_str().unwrap()],
        &[("TIERGATE_TEST_TOKENS", ENV_TOKEN)],
    );
    // Health needs no token: this is what a kubelet's gRPC probe does.
    s.ready().await;
    let http = s.http_addr();

    let mut c = s.client().await;
    for (token, why) in [
        (None, "missing credentials"),
        (
            Some("not-a-token-we-ever-issued"),
            "not one this server accepts",
        ),
        (Some(&FILE_TOKEN[1..]), "not one this server accepts"),
    ] {
        let e = c.route(route_request(token)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}: {e:?}");
        assert!(e.message().contains(why), "{token:?}: {}", e.message());
    }
    for t in [FILE_TOKEN, ENV_TOKEN] {
        let r = c
            .route(route_request(Some(t)))
            .await
            .expect("Route with a token");
        assert!(!r.into_inner().model.is_empty());
    }
    // `tiergate call` sends the token it is given (TIERGATE_TOKEN), and is refused without.
    let call = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"));
        cmd.args(["call", "--addr", &format!("http://{}", s.addr), "info"]);
        cmd.env_remove("TIERGATE_TOKEN");
        if let Some(t) = token {
            cmd.env("TIERGATE_TOKEN", t);
        }
        cmd.output().expect("tiergate call")
    };
    let out = call(Some(FILE_TOKEN));
    assert!(out.status.success(), "{out:?}");
    let out = call(None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing credentials"), "{err}");
    // The Admin service is behind the same check.
    let mut admin = AdminClient::new(s.channel().await);
    let e = admin.reload(proto::ReloadRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // The HTTP front: 401 with OpenAI's error body, then 200 with the token.
    let client = reqwest::Client::new();
    let url = format!("http://{http}/v1/models");
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    let r = client
        .post(format!("http://{http}/v1/chat/completions"))
        .bearer_auth("wrong-token-000000000000")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(&url)
        .bearer_auth(ENV_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);

    let m = s.metrics_text();
    let denied = common::metric_sum(
        &m,
        "tiergate_rejections_total",
        &[("rpc", "auth"), ("reason", "unauthenticated")],
    );
    // Three Routes, one `tiergate call`, one Reload, two HTTP requests.
    assert_eq!(denied, Some(7.0), "{m}");
}

#[test]
fn unusable_token_lists_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tiergate.toml");
    let with = |auth: &str| {
        std::fs::write(
            &config,
            format!("{}\n[auth]\n{auth}\n", tiergate::config::EMBEDDED_DEFAULT),
        )
        .unwrap();
        common::serve_refused(&config)
    };
    let err = with("tokens_file = \"/nonexistent/tiergate-tokens\"");
    assert!(err.contains("auth.tokens_file"), "{err}");
    let short = dir.path().join("short");
    std::fs::write(&short, "abc\n").unwrap();
    let err = with(&format!("tokens_file = {:?}", short.display().to_string()));
    assert!(err.contains("shorter than 16 bytes"), "{err}");
    let err = with("tokens_env = \"TIERGATE_TEST_UNSET_TOKENS_VARIABLE\"");
    assert!(err.contains("TIERGATE_TEST_UNSET_TOKENS_VARIABLE"), "{err}");
}
