//! The offline tools decide what the server decides: on real dev rows, `tiergate score` (the
//! evaluation interface `eval` replays) and the real server on loopback give the same p_pass
//! per candidate and per answer, and the rules `eval` replays with (`route_pick`, `ships`)
//! applied to the offline scores pick the model and the ship / escalate the server returned.
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use tiergate::policy::Effective;
use tiergate::proto::{self, route_request::Input, Decision};
use tiergate::service::decide::{decide_route, relative_pick, route_pick, ships, Scored};

/// Probabilities agree to this (the same encoder and heads; only batch neighbours differ).
const TOL: f64 = 1e-4;

fn dev_rows(n: usize) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/dev.jsonl.gz");
    let f = std::fs::File::open(path).expect("../shared/data/dev.jsonl.gz");
    std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .take(n)
        .map(|l| serde_json::from_str(&l.expect("line")).expect("json"))
        .collect()
}

/// Up to 4 dev rows per prompt of models with a trained head (Route accepts those as
/// candidates), from the first 40 prompts.
fn rows_of_trained_models() -> Vec<Value> {
    let root = env!("CARGO_MANIFEST_DIR");
    let heads =
        tiergate::model::Heads::load(&Path::new(root).join("models/heads.json")).expect("heads");
    let mut per_prompt: BTreeMap<String, usize> = BTreeMap::new();
    dev_rows(6000)
        .into_iter()
        .filter(|r| {
            heads
                .router
                .models
                .contains_key(r["model"].as_str().unwrap_or(""))
        })
        .filter(|r| {
            let prompt = r["prompt"].as_str().unwrap_or("").to_string();
            let known = per_prompt.len();
            let n = per_prompt.entry(prompt).or_insert(0);
            if *n == 0 && known >= 40 {
                return false;
            }
            *n += 1;
            *n <= 4
        })
        .collect()
}

/// `tiergate score` of `rows` with `args` added: (p_route, p_verify) per row.
fn score(rows: &[Value], args: &[&str]) -> Vec<Value> {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().expect("tempdir");
    let (inp, out) = (dir.path().join("rows.jsonl"), dir.path().join("out.jsonl"));
    let mut f = std::fs::File::create(&inp).expect("create");
    for r in rows {
        writeln!(f, "{r}").expect("write");
    }
    drop(f);
    let st = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .current_dir(root)
        .args(["score", "--data"])
        .arg(&inp)
        .arg("--out")
        .arg(&out)
        .args(args)
        .env("RUST_LOG", "warn")
        .status()
        .expect("score");
    assert!(st.success());
    let scored: Vec<Value> = std::fs::read_to_string(&out)
        .expect("out")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(scored.len(), rows.len());
    scored
}

/// prompt -> (model -> p_route).
fn p_route_by_prompt(rows: &[Value], scored: &[Value]) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut by_prompt: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for (r, s) in rows.iter().zip(scored) {
        by_prompt
            .entry(r["prompt"].as_str().expect("prompt").to_string())
            .or_default()
            .insert(
                r["model"].as_str().expect("model").to_string(),
                s["p_route"].as_f64().expect("p_route"),
            );
    }
    by_prompt
}

/// The p_pass of `by` in the reply's (price) order, each asserted equal to what the server
/// returned for that candidate; `what` names `by` in the failure message.
fn offline_in_price_order(
    rep: &proto::RouteReply,
    by: &BTreeMap<String, f64>,
    what: &str,
) -> Vec<f64> {
    rep.candidates
        .iter()
        .map(|cs| {
            let q = by[&cs.model];
            assert!(
                (cs.p_pass - q).abs() < TOL,
                "{}: served {} vs the {what} {q}",
                cs.model,
                cs.p_pass
            );
            q
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_and_the_server_make_the_same_decisions_on_dev_rows() {
    let rows = rows_of_trained_models();
    assert!(
        rows.len() >= 100,
        "only {} dev rows with trained models",
        rows.len()
    );
    let scored = score(&rows, &[]);
    let by_prompt = p_route_by_prompt(&rows, &scored);

    let server = common::Server::spawn(&[]);
    server.ready().await;
    let mut c = server.client().await;
    let (mut routes, mut verifies) = (0, 0);
    for floor in [0.5, 0.8] {
        for (prompt, offline) in by_prompt.iter().filter(|(_, m)| m.len() >= 2) {
            let rep = c
                .route(proto::RouteRequest {
                    input: Some(Input::Prompt(prompt.clone())),
                    candidates: offline.keys().cloned().collect(),
                    policy: Some(proto::Policy {
                        quality_floor: Some(floor),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .expect("route")
                .into_inner();
            let p = offline_in_price_order(&rep, offline, "offline");
            if p.iter().any(|q| (q - floor).abs() < TOL) {
                continue; // on the edge: float noise may tip it either way
            }
            let pick = &rep.candidates[route_pick(&p, floor)].model;
            assert_eq!(&rep.model, pick, "prompt {prompt:?} at floor {floor}");
            routes += 1;
        }
    }
    for (r, s) in rows.iter().zip(&scored) {
        let (Some(answer), Some(pv)) = (r["response"].as_str(), s["p_verify"].as_f64()) else {
            continue;
        };
        let rep = c
            .verify(proto::VerifyRequest {
                prompt: r["prompt"].as_str().expect("prompt").into(),
                answer: answer.into(),
                model: r["model"].as_str().expect("model").into(),
                ..Default::default()
            })
            .await
            .expect("verify")
            .into_inner();
        assert!(
            (rep.p_pass - pv).abs() < TOL,
            "verify {} vs {pv}",
            rep.p_pass
        );
        if (pv - rep.threshold).abs() < TOL {
            continue;
        }
        let ship = rep.decision == Decision::Ship as i32;
        assert_eq!(ship, ships(pv, rep.threshold));
        verifies += 1;
    }
    assert!(
        routes >= 40 && verifies >= 50,
        "compared {routes} routes, {verifies} verifies"
    );
}

/// Route's fast path serves what `score --precision static` measured: with
/// `policy.fast_path_stability` set, a prompt whose student pick is at least that stable gets
/// the student's p_pass and pick (no encoder), any other the encoder's; the metric counts both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_answers_alone_only_when_the_students_pick_is_stable() {
    const BAR: f64 = 0.05;
    const R: f64 = 0.94; // the embedded default's relative floor
                         // Prompts only: Route needs no answers, and the encoder then runs on 40 texts.
    let rows: Vec<Value> = rows_of_trained_models()
        .into_iter()
        .map(|mut r| {
            if let Some(o) = r.as_object_mut() {
                o.remove("response");
            }
            r
        })
        .collect();
    let full = p_route_by_prompt(&rows, &score(&rows, &[]));
    let student = p_route_by_prompt(&rows, &score(&rows, &["--precision", "static"]));

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("tiergate.toml");
    let text = tiergate::config::EMBEDDED_DEFAULT.replace(
        "relative_floor = 0.94\n",
        &format!("relative_floor = {R}\nfast_path_stability = {BAR}\n"),
    );
    assert!(
        text.contains("fast_path_stability"),
        "the default's floor moved"
    );
    std::fs::write(&cfg, text).expect("config");
    let server = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    server.ready().await;
    let mut c = server.client().await;
    let (mut alone, mut deferred, mut edge) = (0.0, 0.0, 0.0);
    for (prompt, sp) in student.iter().filter(|(_, m)| m.len() >= 2) {
        let rep = c
            .route(proto::RouteRequest {
                input: Some(Input::Prompt(prompt.clone())),
                candidates: sp.keys().cloned().collect(),
                ..Default::default()
            })
            .await
            .expect("route")
            .into_inner();
        // The stability of the student's pick, by the server's own rule (Verify band 0.1):
        // a copy of the formula here went stale when the rule gained the pricier candidates'
        // term.
        let scored: Vec<Scored> = rep
            .candidates
            .iter()
            .map(|cs| Scored {
                model: cs.model.clone(),
                p_pass: sp[&cs.model],
                cost: cs.expected_cost_usd,
                params: cs.params.clone(),
            })
            .collect();
        let relative = Effective {
            quality_floor: 0.0,
            max_cost_usd: None,
            cost_weight: 0.0,
            floor_given: false,
            relative_floor: Some(R),
        };
        let stability = decide_route(scored, &relative, 0.1)
            .expect("a decision")
            .stability;
        if (stability - BAR).abs() < TOL {
            edge += 1.0; // float noise may tip it either way
            continue;
        }
        let (by, name) = if stability >= BAR {
            alone += 1.0;
            (sp, "student")
        } else {
            deferred += 1.0;
            (&full[prompt], "encoder")
        };
        let what = format!("{name} (stability {stability:.4})");
        // The reply says which decided: its p_pass are the student's when it went alone.
        assert_eq!(rep.fast_path, name == "student", "{what}");
        let p = offline_in_price_order(&rep, by, &what);
        assert_eq!(rep.model, rep.candidates[relative_pick(&p, R)].model);
    }
    assert!(
        alone >= 1.0 && deferred >= 1.0,
        "{alone} routes alone, {deferred} deferred: both paths must be seen"
    );
    let m = server.metrics_text();
    let count = |result| {
        common::metric_sum(&m, "tiergate_route_fast_path_total", &[("result", result)])
            .unwrap_or(0.0)
    };
    assert_eq!(count("alone") + count("deferred"), alone + deferred + edge);
    assert!((alone..=alone + edge).contains(&count("alone")));
}

/// The fast path stands aside where its bound does not hold: a Route with a floor (absolute
/// mode), and heads carrying a memory of labelled prompts (encoder neighbours, which the
/// student's embedding does not find). Neither is answered alone nor counted as deferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_stands_aside_for_floors_and_memories() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let heads = tiergate::model::Heads::load(&root.join("models/heads.json")).expect("heads");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut unit = vec![0.0f32; heads.dim];
    unit[0] = 1.0;
    let overlay = dir.path().join("memory.json");
    let o = serde_json::json!({
        "format": 1,
        "heads_revision": heads.revision,
        "prior": heads.router.prior,
        "models": {},
        "memory": {
            "dim": heads.dim,
            "prompts": unit,
            "outcomes": { "gemini-1.5-flash-002": [[0, 0.0]] },
            "k": 1, "alpha": 1.0, "tau": 0.05,
        },
    });
    std::fs::write(&overlay, o.to_string()).expect("overlay");
    let fast = tiergate::config::EMBEDDED_DEFAULT.replace(
        "relative_floor = 0.94\n",
        "relative_floor = 0.94\nfast_path_stability = 0.001\n",
    );
    assert_ne!(fast, tiergate::config::EMBEDDED_DEFAULT);
    let with_memory = format!("overlays = [{:?}]\n{fast}", overlay.display().to_string());
    let counted = |server: &common::Server| {
        common::metric_sum(
            &server.metrics_text(),
            "tiergate_route_fast_path_total",
            &[],
        )
        .unwrap_or(0.0)
    };
    for (name, text, floor) in [("floor", &fast, Some(0.5)), ("memory", &with_memory, None)] {
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, text).expect("config");
        let server = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
        server.ready().await;
        let mut c = server.client().await;
        for prompt in [
            "What is 2 + 2?",
            "Name three prime numbers.",
            "Write a haiku.",
        ] {
            c.route(proto::RouteRequest {
                input: Some(Input::Prompt(prompt.into())),
                policy: floor.map(|f| proto::Policy {
                    quality_floor: Some(f),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("route");
        }
        assert_eq!(counted(&server), 0.0, "{name}: the fast path was tried");
    }
    // The control: the same config without either, on the same prompts, does try it.
    let cfg = dir.path().join("plain.toml");
    std::fs::write(&cfg, &fast).expect("config");
    let server = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    server.ready().await;
    let mut c = server.client().await;
    c.route(proto::RouteRequest {
        input: Some(Input::Prompt("What is 2 + 2?".into())),
        ..Default::default()
    })
    .await
    .expect("route");
    assert_eq!(counted(&server), 1.0);
}
