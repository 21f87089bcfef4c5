//! Out of the box: the embedded default policy and catalog, the real server on loopback.
//! Prompts of obvious difficulty (written for this test, not from any dataset): most trivial
//! ones go to the cheapest model, most hard ones to the two most expensive; every candidate
//! says where its parameters come from, and no catalog model borrows a judge-preference head.
mod common;

use tiergate::proto::{self, route_request::Input};

const TRIVIAL: &[&str] = &[
    "What is 2 + 2?",
    "What is the capital of France?",
    "Translate 'good morning' into French.",
    "What colour is the sky on a clear day?",
    "Spell the word 'cat' backwards.",
    "How many days are in a week?",
    "What is 10 divided by 2?",
    "Name the largest planet in our solar system.",
    "Is water wet? Answer yes or no.",
    "What is the opposite of 'hot'?",
    "Say hello.",
    "What is 3 times 3?",
];

const HARD: &[&str] = &[
    "Prove that there are infinitely many primes p with p ≡ 3 (mod 4).",
    "Prove that every finite integral domain is a field, then show that Z[x]/(x^2+1) is not a field over Z but its reduction mod 3 is.",
    "Derive the closed form of the sum over k from 1 to n of k^3 and prove it by induction; then bound the error of approximating it by the integral of x^3.",
    "Let f be a continuous function on [0,1] with f(0)=f(1). Prove that for every n there exist x with f(x)=f(x+1/n).",
    "Write a lock-free multi-producer multi-consumer bounded queue in C++ using atomics, and argue why it is linearizable and free of the ABA problem.",
    "Show that the halting problem is undecidable and use a reduction to prove that deciding whether a Turing machine accepts a regular language is undecidable.",
    "Compute the Galois group of x^5 - 4x + 2 over Q and explain why the polynomial is not solvable by radicals.",
    "Prove the Cauchy-Schwarz inequality for inner product spaces and derive the triangle inequality from it, handling the complex case.",
    "Design a distributed consensus protocol tolerant to f Byzantine faults among 3f+1 nodes and prove its safety under partial synchrony.",
    "Evaluate the integral of ln(x) / (1 + x^2) from 0 to infinity, justifying every step.",
    "A quantum particle is in an infinite square well of width L. Derive the energy eigenvalues and compute the expectation value of x^2 in the ground state.",
    "Prove that a graph is bipartite if and only if it contains no odd cycle, and give a linear-time algorithm that finds such a cycle when one exists.",
];

async fn route(
    c: &mut proto::router_client::RouterClient<tonic::transport::Channel>,
    p: &str,
) -> proto::RouteReply {
    c.route(proto::RouteRequest {
        input: Some(Input::Prompt(p.into())),
        ..Default::default()
    })
    .await
    .expect("route")
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_defaults_send_trivial_prompts_cheap_and_hard_ones_up() {
    let server = common::Server::spawn(&[]);
    server.ready().await;
    let mut c = server.client().await;
    let info = server.info().await;
    assert!(info.default_relative_floor > 0.0, "the default is relative");
    for e in &info.catalog {
        assert!(
            e.params.starts_with("like:") || e.params == "trained",
            "{e:?}"
        );
        assert_ne!(
            e.head, "gpt4_1106_preview",
            "a judge-preference head is borrowed"
        );
    }
    // Price order of the default catalog, as Route reports it for any prompt.
    let order: Vec<String> = route(&mut c, TRIVIAL[0])
        .await
        .candidates
        .iter()
        .map(|s| s.model.clone())
        .collect();
    let (cheapest, top_two) = (&order[0], &order[order.len() - 2..]);
    let (mut cheap, mut up) = (0, 0);
    for p in TRIVIAL {
        let r = route(&mut c, p).await;
        assert!(r.candidates.iter().all(|s| !s.params.is_empty()));
        cheap += usize::from(&r.model == cheapest);
    }
    for p in HARD {
        let r = route(&mut c, p).await;
        up += usize::from(top_two.contains(&r.model));
    }
    eprintln!(
        "trivial to {cheapest}: {cheap}/{}; hard to {top_two:?}: {up}/{}",
        TRIVIAL.len(),
        HARD.len()
    );
    assert!(
        cheap * 3 >= TRIVIAL.len() * 2,
        "{cheap}/{} trivial prompts to {cheapest}",
        TRIVIAL.len()
    );
    assert!(
        up * 3 >= HARD.len() * 2,
        "{up}/{} hard prompts to {top_two:?}",
        HARD.len()
    );
}

#[test]
fn a_judge_preference_head_cannot_be_borrowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    let text = tiergate::config::EMBEDDED_DEFAULT.replace(
        "like = \"gpt-4-1106-preview\"",
        "like = \"gpt4_1106_preview\"",
    );
    std::fs::write(&cfg, text).expect("write");
    let err = common::serve_refused(&cfg);
    assert!(
        err.contains("gpt4_1106_preview") && err.contains("pass/fail"),
        "{err}"
    );
}
