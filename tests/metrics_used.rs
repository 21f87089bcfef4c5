//! Every metric the dashboard, the alerts and KEDA query (deploy/metrics-used.txt) is exported
//! by the real server on loopback once it has seen ordinary traffic and the events those
//! panels watch (a rejected request, an escalation, a truncation, feedback, a re-fit, a
//! reload), with HELP text; and the cost, saving, serving and build series say what the
//! replies and Info say.
mod common;

use tiergate::proto::{self, admin_client::AdminClient, route_request::Input};

/// Queried names the server may rightly not have exported yet here, and why.
fn may_be_absent(name: &str, backend: &str) -> Option<&'static str> {
    match name {
        // Counted only when a queued input's client leaves or its deadline passes while it
        // waits; a loopback server cannot be made to queue on cue (tests/batcher.rs drives it).
        "tiergate_dropped_before_compute_total" => Some("needs a request dropped while queued"),
        // Counted when backend = auto ends on the CPU: absent where a GPU was found.
        "tiergate_backend_fallback_total" if backend == "cuda" => Some("a GPU was found"),
        // The HTTP front is off by default (gateway.http_listen) and needs upstreams:
        // tests/gateway_openai.rs drives it and checks these are exported.
        "tiergate_http_requests_total"
        | "tiergate_http_request_duration_seconds_bucket"
        | "tiergate_gateway_consensus_total"
        | "tiergate_gateway_consensus_probes_total"
        | "tiergate_gateway_cost_usd_total"
        | "tiergate_gateway_baseline_usd_total" => Some("needs the HTTP front and its upstreams"),
        _ => None,
    }
}

/// `name` without the suffix a histogram's series add.
fn family(name: &str) -> &str {
    ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queried_metric_is_exported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("tiergate.toml");
    let overlay = dir.path().join("feedback.json");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[feedback]\noverlay = {:?}\nrefit_interval_s = 3600\nmin_rows = 3\n",
            tiergate::config::EMBEDDED_DEFAULT,
            overlay.display().to_string()
        ),
    )
    .expect("config");
    let server = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    server.ready().await;
    let info = server.info().await;
    let mut c = server.client().await;

    // Routes, one of them longer than the encoder's input limit; what they are expected to
    // cost and save, summed per chosen model.
    let mut cost = std::collections::BTreeMap::<String, (f64, f64)>::new();
    for (i, prompt) in [
        "What is 2 + 2?".to_string(),
        "Prove that sqrt(2) is irrational.".to_string(),
        common::prompt_of(600, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let r = c
            .route(proto::RouteRequest {
                request_id: format!("r{i}"),
                input: Some(Input::Prompt(prompt)),
                ..Default::default()
            })
            .await
            .expect("route")
            .into_inner();
        let e = cost.entry(r.model).or_default();
        e.0 += r.expected_cost_usd;
        e.1 += r.expected_saving_usd;
    }
    // An empty answer is never shipped: an escalation.
    let v = c
        .verify(proto::VerifyRequest {
            prompt: "What is 12*12?".into(),
            answer: "".into(),
            model: "gemini-2.5-flash".into(),
            ..Default::default()
        })
        .await
        .expect("verify")
        .into_inner();
    assert_eq!(v.decision, proto::Decision::Escalate as i32);
    // A rejected request.
    let e = c
        .route(proto::RouteRequest::default())
        .await
        .expect_err("no prompt");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let text = server.metrics_text();
    for (model, (usd, saved)) in &cost {
        for (name, want) in [
            ("tiergate_expected_cost_usd_total", usd),
            ("tiergate_expected_saving_usd_total", saved),
        ] {
            let got = common::metric_sum(&text, name, &[("model", model)])
                .unwrap_or_else(|| panic!("{name}{{model={model:?}}} missing"));
            assert!(
                (got - want).abs() <= 1e-12 + 1e-9 * want.abs(),
                "{name}{{model={model:?}}} = {got}, the replies say {want}"
            );
        }
        let n = common::metric_sum(&text, "tiergate_route_p_pass_count", &[("model", model)]);
        assert!(n.is_some_and(|n| n >= 1.0), "p_pass of {model}: {n:?}");
    }
    assert!(
        text.contains("# TYPE tiergate_route_p_pass histogram"),
        "p_pass must have buckets"
    );
    assert_eq!(
        common::metric_sum(&text, "tiergate_serving", &[]),
        Some(1.0)
    );
    let build = [
        ("version", info.version.as_str()),
        ("model_revision", info.model_revision.as_str()),
        ("heads_revision", info.heads_revision.as_str()),
        ("backend", info.backend.as_str()),
        ("numerics", info.numerics.as_str()),
    ];
    assert_eq!(
        common::metric_sum(&text, "tiergate_build_info", &build),
        Some(1.0),
        "build_info for {build:?}"
    );

    // Feedback, a re-fit pass over it, and a reload.
    for i in 0..4 {
        c.feedback(proto::FeedbackRequest {
            prompt: format!("Question {i}: what is {i} cubed?"),
            model: "gemini-2.5-flash".into(),
            score: 0.0,
            ..Default::default()
        })
        .await
        .expect("feedback");
    }
    let mut admin = AdminClient::new(server.channel().await);
    admin.refit(proto::RefitRequest {}).await.expect("refit");
    admin.reload(proto::ReloadRequest {}).await.expect("reload");

    let text = server.metrics_text();
    let used = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/metrics-used.txt"),
    )
    .expect("deploy/metrics-used.txt");
    let mut missing = Vec::new();
    for name in used.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let exported = text.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(['{', ' ']))
        });
        if !exported && may_be_absent(name, &info.backend).is_none() {
            missing.push(name);
        }
        let help = format!("# HELP {} ", family(name));
        assert!(!exported || text.contains(&help), "{name} has no HELP text");
    }
    assert!(
        missing.is_empty(),
        "queried by the deploy files but not exported: {missing:?}\n{text}"
    );
}
