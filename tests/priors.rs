//! Onboarding a model with no rows from what a user knows: a published accuracy on a
//! benchmark the data has places it on the router's scale (real server, models/benchmarks.json).
//! Bad priors are start-up errors naming the key.
mod common;

use tiergate::proto::{self, route_request::Input};

fn config(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("tiergate.toml");
    std::fs::write(
        &p,
        format!("{}\n{extra}", tiergate::config::EMBEDDED_DEFAULT),
    )
    .expect("write");
    (dir, p)
}

const TWO: &str = r#"
[[catalog]]
model = "acme-pro"
in_usd_per_mtok = 1.0
out_usd_per_mtok = 2.0
prior = { benchmark = "mmlu_pro", accuracy = 0.84 }

[[catalog]]
model = "acme-lite"
in_usd_per_mtok = 0.1
out_usd_per_mtok = 0.2
prior = { benchmark = "mmlu_pro", accuracy = 0.30 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_accuracy_places_a_new_model() {
    let (_dir, cfg) = config(TWO);
    let server = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    server.ready().await;
    let mut c = server.client().await;
    let info = server.info().await;
    let params = |m: &str| {
        info.catalog
            .iter()
            .find(|e| e.model == m)
            .map(|e| e.params.clone())
    };
    assert_eq!(params("acme-pro").as_deref(), Some("prior:mmlu_pro@0.84"));
    assert_eq!(params("acme-lite").as_deref(), Some("prior:mmlu_pro@0.3"));
    let prompts = [
        "Which of the following is a prime number? Options: A. 21 B. 27 C. 29 D. 33",
        "The derivative of x^2 is: A. x B. 2x C. x^2 D. 2",
        "What is the capital of Australia? A. Sydney B. Melbourne C. Canberra D. Perth",
    ];
    let mut sum = (0.0, 0.0);
    for p in prompts {
        let r = c
            .route(proto::RouteRequest {
                input: Some(Input::Prompt(p.into())),
                candidates: vec!["acme-pro".into(), "acme-lite".into()],
                ..Default::default()
            })
            .await
            .expect("route")
            .into_inner();
        let get = |m: &str| {
            r.candidates
                .iter()
                .find(|s| s.model == m)
                .expect("candidate")
                .p_pass
        };
        assert!(get("acme-pro") > get("acme-lite"), "{p}");
        sum = (sum.0 + get("acme-pro"), sum.1 + get("acme-lite"));
    }
    // On the scale of the benchmark the accuracies refer to, far apart as they are.
    assert!(sum.0 / 3.0 - sum.1 / 3.0 > 0.3, "{sum:?}");
}

#[test]
fn bad_priors_are_start_up_errors_naming_the_key() {
    for (entry, key) in [
        (
            "prior = { benchmark = \"gsm9k\", accuracy = 0.5 }",
            "prior.benchmark",
        ),
        (
            "prior = { benchmark = \"mmlu_pro\", accuracy = 1.5 }",
            "prior.accuracy",
        ),
        (
            "like = \"gemini-1.5-flash-002\"\nprior = { benchmark = \"mmlu_pro\", accuracy = 0.5 }",
            "not both",
        ),
    ] {
        let (_dir, cfg) = config(&format!(
            "[[catalog]]\nmodel = \"acme\"\nin_usd_per_mtok = 1.0\nout_usd_per_mtok = 1.0\n{entry}\n"
        ));
        let err = common::serve_refused(&cfg);
        assert!(
            err.contains("catalog[acme]") && err.contains(key),
            "{key}: {err}"
        );
    }
}
