//! The OpenAI-compatible front with the whole cascade, driven by the official `openai`
//! Python client (scripts/gateway-clients.sh installs it) against the real server and model,
//! with stand-in upstreams on loopback (tests/common/upstream.rs): routing to the cheap and
//! the strong model, an answer the verifier escalates, failing upstreams (retried at the next
//! tier, or returned as the upstream wrote them), Verify failing, the deadline, streams, and
//! /v1/models.
mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::upstream::{self, Stub};
use common::Server;
use serde_json::{json, Value};
use tiergate::config::{
    Config, ConsensusConfig, GatewayPolicy, StreamMode, UpstreamConfig, VerifyMode,
};

const FLASH: &str = "gemini-2.5-flash";
const SONNET: &str = "claude-sonnet-4.6";
const OPUS: &str = "claude-opus-4.8";

/// A multiple-choice prompt whose answers' picks `auto:vote` compares.
const MCQ: &str = "Which planet is largest?\nA) Mars\nB) Jupiter\nC) Venus\nAnswer:";

/// Routed to the cheapest tier and to the strongest, among the three with upstreams.
const EASY: &str = "What is 2 + 2?";
/// Routed to the cheapest tier, though Route rates the middle one higher: where Verify sends
/// a rejected answer. (On EASY the cheapest is rated highest: nothing to escalate to.)
const CLOSE: &str = "Write a haiku.";
/// Routed to the cheapest tier; Route rates opus above sonnet above it, so a rejected answer
/// goes past sonnet, the next one up in price.
const SKIP: &str = "Explain recursion to a child.";
const HARD: &str = "Prove that there are infinitely many primes p such that p + 2 is also \
    prime, or explain precisely which known results come closest and why the full \
    statement remains open.";

fn venv_bin(name: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/gateway-venv/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/gateway-clients.sh",
        p.display()
    );
    p
}

/// The embedded config with upstreams for three models (on the stand-in) and two named
/// policies, serving the front on `http`.
fn config(stub: &Stub, http: &str) -> Config {
    let mut c = Config::embedded().unwrap();
    for e in &mut c.catalog {
        let id = match e.model.as_str() {
            FLASH => "stub-flash",
            SONNET => "stub-sonnet",
            OPUS => "stub-opus",
            _ => continue,
        };
        e.upstream = Some(UpstreamConfig {
            base_url: stub.base_url(),
            model: Some(id.into()),
            api_key_env: (e.model == FLASH).then(|| "TIERGATE_TEST_FLASH_KEY".into()),
        });
    }
    c.gateway.http_listen = http.into();
    c.gateway.max_body_bytes = 64 << 10;
    let verify = |v| GatewayPolicy {
        verify: Some(v),
        ..Default::default()
    };
    c.gateway
        .policies
        .insert("fast".into(), verify(VerifyMode::Never));
    c.gateway
        .policies
        .insert("verified".into(), verify(VerifyMode::Always));
    // The same, and a stream asked of it gets the whole cascade.
    let verified_stream = GatewayPolicy {
        stream: Some(StreamMode::Cascade),
        ..verify(VerifyMode::Always)
    };
    c.gateway
        .policies
        .insert("verified_stream".into(), verified_stream);
    // Listed dearest first: the gateway asks them cheapest first whatever the order here.
    let vote = GatewayPolicy {
        consensus: Some(ConsensusConfig {
            models: vec![SONNET.into(), FLASH.into()],
            agree: 2,
        }),
        ..Default::default()
    };
    c.gateway.policies.insert("vote".into(), vote);
    // Two of three, the top among them.
    let vote3 = GatewayPolicy {
        consensus: Some(ConsensusConfig {
            models: vec![OPUS.into(), SONNET.into(), FLASH.into()],
            agree: 2,
        }),
        ..Default::default()
    };
    c.gateway.policies.insert("vote3".into(), vote3);
    // Route's expected cost at 100 output tokens: flash 0.00025, sonnet 0.0015, opus 0.0025
    // USD (plus the prompt's few tokens); within budget, flash and sonnet.
    for e in &mut c.catalog {
        if [FLASH, SONNET, OPUS].contains(&e.model.as_str()) {
            e.expected_output_tokens = Some(100);
        }
    }
    let budget = GatewayPolicy {
        max_cost_usd: Some(0.002),
        verify: Some(VerifyMode::Never),
        ..Default::default()
    };
    c.gateway.policies.insert("budget".into(), budget);
    c
}

/// A front on the stand-in: `config` (changed by `tweak`) written to a temporary dir (held
/// by the returned value), served with `args` and `env` (flash's key always); ready.
struct Front {
    srv: Server,
    http: String,
    cfg: Config,
    /// Holds the config file for as long as the server runs.
    _dir: tempfile::TempDir,
}

async fn front(
    stub: &Stub,
    tweak: impl FnOnce(&mut Config),
    args: &[&str],
    env: &[(&str, &str)],
) -> Front {
    // Port 0: the server prints the port it bound (no race with another test for it).
    let mut cfg = config(stub, "127.0.0.1:0");
    tweak(&mut cfg);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiergate.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let mut all = vec!["--config", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut all_env = vec![("TIERGATE_TEST_FLASH_KEY", "sk-test-flash")];
    all_env.extend_from_slice(env);
    let srv = Server::spawn_env(&all, &all_env);
    srv.ready().await;
    let http = srv.http_addr();
    Front {
        srv,
        http,
        cfg,
        _dir: dir,
    }
}

/// A POST of a JSON body (its text, well-formed or not) to `url`; headers may be added before
/// it is sent.
fn post_json(
    url: impl reqwest::IntoUrl,
    body: impl Into<reqwest::Body>,
) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
}

fn case(name: &str, model: &str, prompt: &str, stub: Value) -> Value {
    let mut stub = stub;
    stub["case"] = json!(name);
    json!({"name": name, "model": model, "messages": [{"role": "user", "content": prompt}],
        "extra_body": {"stub": stub}})
}

/// Runs the cases through a client script of tests/clients; its observations by case name.
fn run_client(script: &str, base_url: &str, cases: Vec<Value>) -> Value {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/");
    let mut child = Command::new(venv_bin("python"))
        .arg(format!("{dir}{script}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running the openai client");
    let spec = json!({"base_url": base_url, "cases": cases});
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(spec.to_string().as_bytes())
        .expect("writing the cases");
    let out = child.wait_with_output().expect("client output");
    assert!(out.status.success(), "{script} failed");
    // The observations are the last line (a client library may print before it).
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{script} printed {text:?}: {e}"))
}

fn cost(model: &str, c: &Config) -> f64 {
    let e = c.catalog.iter().find(|e| e.model == model).unwrap();
    (upstream::PROMPT_TOKENS as f64 * e.in_usd_per_mtok
        + upstream::COMPLETION_TOKENS as f64 * e.out_usd_per_mtok)
        / 1e6
}

fn header_f64(r: &Value, name: &str) -> f64 {
    r["headers"][name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {r}"))
        .parse()
        .unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

/// The case asked as a stream.
fn streamed(mut c: Value) -> Value {
    c["stream"] = json!(true);
    c
}

/// A reply's `choices` with one answer the provider cut at its token limit.
fn cut_at_limit(text: &str) -> Value {
    json!([{"index": 0, "finish_reason": "length",
        "message": {"role": "assistant", "content": text}}])
}

/// The head of an answer `cut_at_limit` returns.
const CUT: &str = "Let me work this out step by step. First";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_gets_the_cascade() {
    let stub = Stub::start("stub").await;
    let Front {
        mut srv,
        http,
        cfg,
        _dir,
    } = front(&stub, |_| {}, &[], &[]).await;
    let base = format!("http://{http}/v1");

    let refusal = "I'm sorry, but I can't help with that.";
    // The real verifier on CLOSE: flash's refusal falls below the learned default threshold, so
    // it escalates to sonnet, which Route rates above flash and opus; sonnet's answer ships.
    let good = "Autumn leaves falling / whispering to the cold ground / the year lets go now";
    let cases = vec![
        case("easy", "auto:fast", EASY, json!({})),
        case("hard", "auto:fast", HARD, json!({})),
        case(
            "verified",
            "auto:verified",
            CLOSE,
            json!({"answer": {"stub-flash": refusal, "stub-sonnet": good}}),
        ),
        case(
            "budget_saved",
            "auto:budget",
            EASY,
            json!({"fail": {"stub-flash": 503}}),
        ),
        case(
            "budget_failover",
            "auto:budget",
            EASY,
            json!({"fail": {"stub-flash": 503, "stub-sonnet": 503}}),
        ),
        case(
            "verified_skip",
            "auto:verified",
            SKIP,
            json!({"answer": {"stub-flash": refusal}}),
        ),
        case(
            "verified_kept",
            "auto:verified",
            EASY,
            json!({"answer": {"stub-flash": refusal}}),
        ),
        case(
            "verified_empty",
            "auto:verified",
            EASY,
            json!({"answer": {"stub-flash": "", "stub-sonnet": "4", "stub-opus": "4"}}),
        ),
        // An answer without a letter or a digit is empty too: under `borderline` it is
        // verified from any pick and sent on.
        case(
            "nothing_said",
            "auto",
            EASY,
            json!({"answer": {"stub-flash": " . ", "stub-sonnet": "4"}}),
        ),
        // `content: null` and no tool call: an empty answer, verified and sent on.
        case(
            "null_content",
            "auto",
            EASY,
            json!({"answer": {"stub-sonnet": "4"}, "choices": {"stub-flash": [{"index": 0,
                "finish_reason": "stop", "message": {"role": "assistant", "content": null}}]}}),
        ),
        // Cut at the provider's token limit, a limit the request did not set: empty too.
        case(
            "cut_short",
            "auto",
            EASY,
            json!({"answer": {"stub-sonnet": "4"}, "choices": {"stub-flash": cut_at_limit(CUT)}}),
        ),
        // Cut twice: the request wants more than the providers' limits give; the second cut
        // answer is not sent on again (it ships as Route's borderline flow reads it).
        case(
            "cut_twice",
            "auto",
            EASY,
            json!({"answer": {"stub-opus": "4"}, "choices": {"stub-flash": cut_at_limit(CUT),
                "stub-sonnet": cut_at_limit("Two plus two: first, take two and")}}),
        ),
        // ... at the client's own `max_tokens`: the length asked for, shipped as Route chose.
        {
            let mut c = case(
                "cut_capped",
                "auto",
                EASY,
                json!({"answer": {"stub-sonnet": "4"}, "choices": {"stub-flash": cut_at_limit(CUT)}}),
            );
            c["extra_body"]["max_tokens"] = json!(8);
            c
        },
        // ... under a policy that never verifies: shipped as it came.
        case(
            "cut_fast",
            "auto:fast",
            EASY,
            json!({"answer": {"stub-sonnet": "4"}, "choices": {"stub-flash": cut_at_limit(CUT)}}),
        ),
        // No choices at all: a malformed reply, retried at the next tier.
        case(
            "no_choices",
            "auto:fast",
            EASY,
            json!({"answer": {"stub-sonnet": "4"}, "choices": {"stub-flash": []}}),
        ),
        // A tool call is not an answer to verify: it ships even under `verified`.
        case(
            "tool_call",
            "auto:verified",
            EASY,
            json!({"choices": {"stub-flash": [{"index": 0, "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                    "type": "function", "function": {"name": "add", "arguments": "{}"}}]}}]}}),
        ),
        case(
            "vote_agree",
            "auto:vote",
            MCQ,
            json!({"answer": {"stub-flash": "The answer is (B).", "stub-sonnet": "B"}}),
        ),
        case(
            "vote_disagree",
            "auto:vote",
            MCQ,
            json!({"answer": {"stub-flash": "(A)", "stub-sonnet": "The answer is (B)."}}),
        ),
        case(
            "vote_probe_fails",
            "auto:vote",
            MCQ,
            json!({"answer": {"stub-sonnet": "B"}, "fail": {"stub-flash": 503},
                "delay_ms": {"stub-sonnet": 3000}}),
        ),
        case(
            "vote_slow_fallback",
            "auto:vote",
            MCQ,
            json!({"answer": {"stub-sonnet": "B"}, "fail": {"stub-flash": 503, "stub-opus": 503},
                "delay_ms": {"stub-sonnet": 1500}}),
        ),
        case(
            "vote_late_refusal",
            "auto:vote",
            MCQ,
            json!({"fail": {"stub-flash": 503, "stub-sonnet": 400, "stub-opus": 503},
                "delay_ms": {"stub-sonnet": 1000, "stub-opus": 2500}}),
        ),
        case(
            "vote_early",
            "auto:vote3",
            MCQ,
            json!({"answer": {"stub-flash": "(B)", "stub-sonnet": "The answer is (B)."},
                "delay_ms": {"stub-opus": 3000}}),
        ),
        case(
            "vote_top_probe",
            "auto:vote3",
            MCQ,
            json!({"answer": {"stub-opus": "(C)"}, "fail": {"stub-flash": 503, "stub-sonnet": 503},
                "delay_ms": {"stub-opus": 300}}),
        ),
        case(
            "vote_top_fails",
            "auto:vote",
            MCQ,
            json!({"answer": {"stub-flash": "(A)", "stub-sonnet": "(B)"},
                "fail": {"stub-opus": 503}}),
        ),
        case(
            "vote_top_fails_empty",
            "auto:vote",
            MCQ,
            json!({"answer": {"stub-flash": "... !?", "stub-sonnet": "(B)"},
                "fail": {"stub-opus": 503}}),
        ),
        // ... or was cut at the provider's token limit: the next probe's answer ships.
        case(
            "vote_top_fails_cut",
            "auto:vote",
            MCQ,
            json!({"answer": {"stub-sonnet": "(B)"}, "fail": {"stub-opus": 503},
                "choices": {"stub-flash": cut_at_limit("Mars is small; Jupiter")}}),
        ),
        streamed(case(
            "vote_stream",
            "auto:vote",
            MCQ,
            json!({"answer": {"stub-flash": "The answer is (B).", "stub-sonnet": "B"}}),
        )),
        {
            let mut c = streamed(case(
                "vote_stream_usage",
                "auto:vote",
                MCQ,
                json!({"answer": {"stub-flash": "The answer is (B).", "stub-sonnet": "B"}}),
            ));
            c["extra_body"]["stream_options"] = json!({"include_usage": true});
            c
        },
        case(
            "vote_refused",
            "auto:vote",
            MCQ,
            json!({"fail": {"stub-flash": 400, "stub-sonnet": 400}}),
        ),
        case(
            "failover",
            "auto:fast",
            EASY,
            json!({"fail": {"stub-flash": 503}}),
        ),
        case(
            "bad_request",
            "auto:fast",
            EASY,
            json!({"fail": {"stub-flash": 400}}),
        ),
        case(
            "all_limited",
            "auto:fast",
            EASY,
            json!({"fail": {"stub-flash": 429, "stub-sonnet": 429, "stub-opus": 429}}),
        ),
        // The gateway's key refused by one provider: the next tier answers.
        case(
            "key_refused",
            "auto:fast",
            EASY,
            json!({"fail": {"stub-flash": 401}, "answer": {"stub-sonnet": "4"}}),
        ),
        // ... by every provider: 502 in our words, never the upstream's 401 (which the
        // client's SDK would take for its own key refused).
        case(
            "keys_refused",
            "auto:fast",
            EASY,
            json!({"fail": {"stub-flash": 401, "stub-sonnet": 403, "stub-opus": 401}}),
        ),
        case("named", OPUS, EASY, json!({})),
        case(
            "borderline",
            "auto",
            CLOSE,
            json!({"answer": {"stub-flash": refusal}}),
        ),
        case(
            "fast_empty",
            "auto:fast",
            EASY,
            json!({"answer": {"stub-flash": ""}}),
        ),
        case(
            "borderline_empty",
            "auto",
            EASY,
            json!({"answer": {"stub-flash": ""}}),
        ),
        case("unknown_model", "gpt-4o", EASY, json!({})),
        case("unknown_policy", "auto:nope", EASY, json!({})),
        {
            let mut c = case(
                "deadline",
                "auto:fast",
                EASY,
                json!({"delay_ms": {"stub-flash": 3000}}),
            );
            c["headers"] = json!({"x-tiergate-timeout-ms": "500"});
            c
        },
        streamed(case("stream", "auto:fast", EASY, json!({}))),
        // A stream under `verified` passes through unverified (stream = "pass", the default);
        // under `verified_stream` the refusal is verified and escalated first.
        streamed(case(
            "stream_unverified",
            "auto:verified",
            CLOSE,
            json!({"answer": {"stub-flash": refusal, "stub-sonnet": good}}),
        )),
        {
            let mut c = streamed(case(
                "stream_verified",
                "auto:verified_stream",
                CLOSE,
                json!({"answer": {"stub-flash": refusal, "stub-sonnet": good}}),
            ));
            c["extra_body"]["stream_options"] = json!({"include_usage": true});
            c
        },
        streamed(case(
            "stream_failover",
            "auto:fast",
            EASY,
            json!({"fail": {"stub-flash": 502}}),
        )),
        json!({"name": "models", "kind": "models"}),
        json!({"name": "model_policy", "kind": "model", "model": "auto:fast"}),
        json!({"name": "model_unknown", "kind": "model", "model": "gpt-nope"}),
        json!({"name": "legacy_completions", "kind": "completions", "model": "auto"}),
    ];
    let r = run_client("openai_cases.py", &base, cases);

    // The easy prompt goes to the cheapest tier, called with its provider id and key.
    let easy = &r["easy"];
    assert_eq!(easy["model"], FLASH, "{easy}");
    assert_eq!(easy["headers"]["x-tiergate-model"], FLASH);
    assert_eq!(easy["text"], upstream::default_answer("stub", "stub-flash"));
    assert_eq!(easy["headers"]["x-tiergate-escalations"], "0");
    assert!(close(
        header_f64(easy, "x-tiergate-cost-usd"),
        cost(FLASH, &cfg)
    ));
    assert!(close(
        easy["usage"]["cost"].as_f64().unwrap(),
        cost(FLASH, &cfg)
    ));
    assert!(close(
        header_f64(easy, "x-tiergate-saved-usd"),
        cost(OPUS, &cfg) - cost(FLASH, &cfg)
    ));
    let calls = stub.calls("easy");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].model, "stub-flash");
    assert_eq!(calls[0].auth.as_deref(), Some("Bearer sk-test-flash"));
    assert_eq!(
        calls[0].body["messages"][0]["content"], EASY,
        "body passed on"
    );

    // The hard one goes to the strongest; its upstream has no key configured.
    assert_eq!(r["hard"]["model"], OPUS, "{}", r["hard"]);
    let calls = stub.calls("hard");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].model, "stub-opus");
    assert_eq!(calls[0].auth, None);

    // The verifier turns the refusal down; the answer of the model Route rates highest above
    // it ships, both are paid for.
    let v = &r["verified"];
    assert_eq!(v["model"], SONNET, "{v}");
    assert_eq!(v["text"], good);
    assert_eq!(v["headers"]["x-tiergate-escalations"], "1");
    assert_eq!(stub.models("verified"), ["stub-flash", "stub-sonnet"]);
    let spent = cost(FLASH, &cfg) + cost(SONNET, &cfg);
    assert!(close(header_f64(v, "x-tiergate-cost-usd"), spent));
    assert!(close(v["usage"]["cost"].as_f64().unwrap(), spent));
    assert!(close(
        header_f64(v, "x-tiergate-saved-usd"),
        cost(OPUS, &cfg) - spent
    ));

    // Past a tier: the refusal goes to opus, which Route rates highest; sonnet is not called.
    let vs = &r["verified_skip"];
    assert_eq!(vs["model"], OPUS, "{vs}");
    assert_eq!(vs["headers"]["x-tiergate-escalations"], "1");
    assert_eq!(stub.models("verified_skip"), ["stub-flash", "stub-opus"]);
    let spent = cost(FLASH, &cfg) + cost(OPUS, &cfg);
    assert!(close(header_f64(vs, "x-tiergate-cost-usd"), spent));
    // On EASY Route rates flash above both: Verify turns the refusal (p 0.57) down with
    // nowhere better to go, and it ships; an empty answer still escalates.
    let vk = &r["verified_kept"];
    assert_eq!(vk["model"], FLASH, "{vk}");
    assert_eq!(vk["text"], refusal);
    assert_eq!(vk["headers"]["x-tiergate-escalations"], "0");
    assert_eq!(stub.models("verified_kept"), ["stub-flash"]);
    let ve = &r["verified_empty"];
    assert_ne!(ve["model"], FLASH, "{ve}");
    assert_eq!(ve["text"], "4");
    assert_eq!(ve["headers"]["x-tiergate-escalations"], "1");
    let called = stub.models("verified_empty");
    assert!(called.len() == 2 && called[0] == "stub-flash", "{called:?}");
    for name in ["null_content", "no_choices", "nothing_said", "cut_short"] {
        let r = &r[name];
        assert_eq!(r["model"], SONNET, "{name}: {r}");
        assert_eq!(r["text"], "4", "{name}: {r}");
        assert_eq!(r["headers"]["x-tiergate-escalations"], "1", "{name}: {r}");
        assert_eq!(stub.models(name), ["stub-flash", "stub-sonnet"], "{name}");
        // Both calls were billed, the malformed one too (its `usage` came with it).
        let both = cost(FLASH, &cfg) + cost(SONNET, &cfg);
        assert!(
            close(header_f64(r, "x-tiergate-cost-usd"), both),
            "{name}: {r}"
        );
    }
    let ct = &r["cut_twice"];
    assert_eq!(ct["model"], SONNET, "{ct}");
    assert_eq!(ct["text"], "Two plus two: first, take two and", "{ct}");
    assert_eq!(ct["headers"]["x-tiergate-escalations"], "1", "{ct}");
    assert_eq!(stub.models("cut_twice"), ["stub-flash", "stub-sonnet"]);
    for name in ["cut_capped", "cut_fast"] {
        let r = &r[name];
        assert_eq!(r["model"], FLASH, "{name}: {r}");
        assert_eq!(r["text"], CUT, "{name}: {r}");
        assert_eq!(r["headers"]["x-tiergate-escalations"], "0", "{name}: {r}");
        assert_eq!(stub.models(name), ["stub-flash"], "{name}");
    }
    assert_eq!(stub.calls("cut_capped")[0].body["max_tokens"], 8);
    let tc = &r["tool_call"];
    assert_eq!(tc["model"], FLASH, "{tc}");
    assert_eq!(tc["text"], Value::Null, "{tc}");
    assert_eq!(tc["headers"]["x-tiergate-escalations"], "0", "{tc}");
    assert_eq!(stub.models("tool_call"), ["stub-flash"]);

    // Consensus: both probes asked (together), they agree, the cheaper one's answer ships;
    // both are paid for and the top tier is not called.
    let sorted = |name: &str| {
        let mut m = stub.models(name);
        m.sort();
        m
    };
    let va = &r["vote_agree"];
    assert_eq!(va["model"], FLASH, "{va}");
    assert_eq!(va["headers"]["x-tiergate-consensus"], "agreed");
    assert_eq!(va["text"], "The answer is (B).");
    assert_eq!(va["headers"]["x-tiergate-escalations"], "0");
    assert_eq!(sorted("vote_agree"), ["stub-flash", "stub-sonnet"]);
    let probes = cost(FLASH, &cfg) + cost(SONNET, &cfg);
    assert!(close(header_f64(va, "x-tiergate-cost-usd"), probes));
    assert!(close(
        header_f64(va, "x-tiergate-saved-usd"),
        cost(OPUS, &cfg) - probes
    ));
    // They disagree: the top tier answers, all three paid for.
    let vd = &r["vote_disagree"];
    assert_eq!(vd["model"], OPUS, "{vd}");
    assert_eq!(vd["headers"]["x-tiergate-consensus"], "escalated");
    assert_eq!(vd["headers"]["x-tiergate-escalations"], "1");
    assert_eq!(
        sorted("vote_disagree"),
        ["stub-flash", "stub-opus", "stub-sonnet"]
    );
    assert!(close(
        header_f64(vd, "x-tiergate-cost-usd"),
        probes + cost(OPUS, &cfg)
    ));
    // A failed probe is no vote (and not paid for): the other's answer cannot reach two votes,
    // so the top is called at once, the slow probe cancelled and not counted.
    let vp = &r["vote_probe_fails"];
    assert_eq!(vp["model"], OPUS, "{vp}");
    assert!(close(
        header_f64(vp, "x-tiergate-cost-usd"),
        cost(OPUS, &cfg)
    ));
    // The same, and the top fails too: the slow probe ran on beside it, and its answer ships.
    let vsf = &r["vote_slow_fallback"];
    assert_eq!(vsf["model"], SONNET, "{vsf}");
    assert_eq!(vsf["text"], "B");
    assert!(close(
        header_f64(vsf, "x-tiergate-cost-usd"),
        cost(SONNET, &cfg)
    ));
    // The top is called early; the slow probe then refuses the request itself, and the top
    // fails after it: the probe's 400 goes back, not the top's later 503.
    let vlr = &r["vote_late_refusal"];
    assert_eq!(vlr["status"], 400, "{vlr}");
    assert_eq!(
        vlr["error"]["message"],
        "stub-sonnet via stub failing with 400"
    );
    // Two of three agree while the third is out: it ships without waiting for (or paying) it.
    let ve = &r["vote_early"];
    assert_eq!(ve["model"], FLASH, "{ve}");
    assert_eq!(ve["headers"]["x-tiergate-escalations"], "0");
    assert!(close(
        header_f64(ve, "x-tiergate-cost-usd"),
        cost(FLASH, &cfg) + cost(SONNET, &cfg)
    ));
    // Two probes fail, so no two can agree, but the top is the third probe: it is waited for.
    let vtp = &r["vote_top_probe"];
    assert_eq!(vtp["model"], OPUS, "{vtp}");
    assert_eq!(vtp["text"], "(C)");
    assert_eq!(vtp["headers"]["x-tiergate-escalations"], "0");
    // No consensus and the top fails: the cheapest probe's answer ships rather than an error.
    let vt = &r["vote_top_fails"];
    assert_eq!(vt["model"], FLASH, "{vt}");
    assert_eq!(vt["headers"]["x-tiergate-consensus"], "fallback");
    assert_eq!(vt["text"], "(A)");
    assert!(close(header_f64(vt, "x-tiergate-cost-usd"), probes));
    // The same, but the cheapest probe's answer says nothing (no letter or digit): the
    // cheapest one with something in it ships, the empty one still paid for.
    // Cut at the provider's token limit: the same.
    for name in ["vote_top_fails_empty", "vote_top_fails_cut"] {
        let ve = &r[name];
        assert_eq!(ve["model"], SONNET, "{name}: {ve}");
        assert_eq!(ve["headers"]["x-tiergate-consensus"], "fallback");
        assert_eq!(ve["text"], "(B)");
        assert!(close(header_f64(ve, "x-tiergate-cost-usd"), probes));
    }
    // A stream asked of a consensus: the probes are asked for whole answers, and the one that
    // ships comes back as server-sent events (one content chunk, one finishing).
    let vs = &r["vote_stream"];
    assert_eq!(vs["headers"]["x-tiergate-model"], FLASH, "{vs}");
    assert_eq!(vs["text"], "The answer is (B).");
    assert_eq!(vs["chunks"], 2);
    assert_eq!(vs["usage"], Value::Null, "not asked for");
    // Asked for usage: one chunk more, without choices, with the whole request's cost.
    let vu = &r["vote_stream_usage"];
    assert_eq!(vu["chunks"], 3, "{vu}");
    assert_eq!(vu["text"], "The answer is (B).");
    assert!(close(
        vu["usage"]["cost"].as_f64().unwrap(),
        header_f64(vu, "x-tiergate-cost-usd")
    ));
    let calls = stub.calls("vote_stream");
    assert_eq!(calls.len(), 2);
    assert!(
        calls.iter().all(|c| c.body.get("stream").is_none()),
        "probes not streamed"
    );

    // Both probes refuse the request itself (400): the upstream's error, the top not called.
    let vr = &r["vote_refused"];
    assert_eq!(vr["status"], 400, "{vr}");
    assert_eq!(sorted("vote_refused"), ["stub-flash", "stub-sonnet"]);
    let m = srv.metrics_text();
    // What answered requests spent, and what the dearest candidate would have, are the sums of
    // their x-tiergate-cost-usd and cost + saved; a stream passed through (no cost header, its
    // bill is in its events) and a refused request add nothing.
    let (mut spent_all, mut base_all, mut answered) = (0.0, 0.0, 0);
    for o in r.as_object().unwrap().values() {
        if o["headers"]["x-tiergate-cost-usd"].is_string() {
            let c = header_f64(o, "x-tiergate-cost-usd");
            spent_all += c;
            base_all += c + header_f64(o, "x-tiergate-saved-usd");
            answered += 1;
        }
    }
    assert!(answered >= 30, "{answered}");
    let series = |name: &str, label: &[(&str, &str)]| common::metric_sum(&m, name, label);
    let spent_m = series("tiergate_gateway_cost_usd_total", &[]).unwrap_or(f64::NAN);
    let base_m = series("tiergate_gateway_baseline_usd_total", &[]).unwrap_or(f64::NAN);
    assert!(
        (spent_m - spent_all).abs() < 1e-9,
        "{spent_m} vs {spent_all}"
    );
    assert!((base_m - base_all).abs() < 1e-9, "{base_m} vs {base_all}");
    assert!(
        base_all > spent_all,
        "the cascade saved: {base_all} vs {spent_all}"
    );
    // Labelled by the model that shipped (opus shipped `hard`, among others).
    let opus_only = series("tiergate_gateway_cost_usd_total", &[("model", OPUS)]);
    assert!(opus_only.is_some_and(|c| c > 0.0), "{m}");
    // The refusal kept on EASY is counted apart from escalations.
    let kept = [("decision", "kept")];
    let kept = common::metric_sum(&m, "tiergate_verify_decisions_total", &kept);
    assert!(kept.is_some_and(|n| n >= 1.0), "{m}");
    for (outcome, n) in [
        ("agreed", 4.0),
        ("escalated", 3.0),
        ("fallback", 4.0),
        ("failed", 2.0),
    ] {
        assert_eq!(
            common::metric_sum(
                &m,
                "tiergate_gateway_consensus_total",
                &[("outcome", outcome)]
            ),
            Some(n),
            "{outcome}: {m}"
        );
    }

    // A consensus does not ask Route (no encoder pass): its decisions counter stays put.
    let routed = |m: &str| common::metric_sum(m, "tiergate_route_decisions_total", &[]);
    let before = routed(&srv.metrics_text());
    let again = run_client(
        "openai_cases.py",
        &base,
        vec![case(
            "vote_again",
            "auto:vote",
            MCQ,
            json!({"answer": {"stub-flash": "(B)", "stub-sonnet": "B"}}),
        )],
    );
    assert_eq!(again["vote_again"]["model"], FLASH, "{again}");
    assert!(
        before.is_some_and(|n| n > 0.0),
        "Route ran for the other cases"
    );
    assert_eq!(routed(&srv.metrics_text()), before);

    // Probes by result: the slow ones of vote_probe_fails and vote_early were cancelled.
    for (result, n) in [("answered", 18.0), ("failed", 8.0), ("cancelled", 2.0)] {
        assert_eq!(
            common::metric_sum(
                &m,
                "tiergate_gateway_consensus_probes_total",
                &[("result", result)]
            ),
            Some(n),
            "{result}: {m}"
        );
    }

    // A failing tier is retried one up; only the answer that came is paid for.
    let f = &r["failover"];
    assert_eq!(f["model"], SONNET, "{f}");
    assert!(f["headers"].get("x-tiergate-consensus").is_none(), "{f}");
    assert_eq!(f["headers"]["x-tiergate-escalations"], "1");
    assert_eq!(stub.models("failover"), ["stub-flash", "stub-sonnet"]);
    assert!(close(
        header_f64(f, "x-tiergate-cost-usd"),
        cost(SONNET, &cfg)
    ));

    // The request's own fault (400) is not retried: the upstream's error, as it wrote it.
    let b = &r["bad_request"];
    assert_eq!(b["status"], 400, "{b}");
    assert_eq!(
        b["error"]["message"],
        "stub-flash via stub failing with 400"
    );
    assert_eq!(stub.models("bad_request"), ["stub-flash"]);

    // A failing tier falls only to tiers within the policy's max_cost_usd: opus is not called.
    // Within budget it falls to sonnet; the saving is still against the dearest candidate.
    let bs = &r["budget_saved"];
    assert_eq!(bs["model"], SONNET, "{bs}");
    assert!(close(
        header_f64(bs, "x-tiergate-saved-usd"),
        cost(OPUS, &cfg) - cost(SONNET, &cfg)
    ));
    let bf = &r["budget_failover"];
    assert_eq!(bf["status"], 503, "{bf}");
    assert_eq!(
        stub.models("budget_failover"),
        ["stub-flash", "stub-sonnet"]
    );

    // Rate-limited everywhere: every tier tried (two escalations), the last 429 returned.
    let l = &r["all_limited"];
    assert_eq!(l["status"], 429, "{l}");
    assert_eq!(l["error"]["message"], "stub-opus via stub failing with 429");
    assert_eq!(
        l["headers"]["retry-after"], "7",
        "the upstream's own say: {l}"
    );
    assert_eq!(l["headers"]["x-ratelimit-remaining-requests"], "0", "{l}");
    assert_eq!(
        stub.models("all_limited"),
        ["stub-flash", "stub-sonnet", "stub-opus"]
    );

    let kr = &r["key_refused"];
    assert_eq!(kr["model"], SONNET, "{kr}");
    assert_eq!(stub.models("key_refused"), ["stub-flash", "stub-sonnet"]);
    let ks = &r["keys_refused"];
    assert_eq!(ks["status"], 502, "{ks}");
    assert_eq!(ks["error"]["type"], "upstream_error", "{ks}");
    assert!(
        ks["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("answered 401")),
        "{ks}"
    );
    assert_eq!(stub.models("keys_refused").len(), 3);

    // A model named directly is called as asked: no routing, nothing saved.
    let n = &r["named"];
    assert_eq!(n["model"], OPUS, "{n}");
    assert_eq!(n["headers"]["x-tiergate-saved-usd"], "0");
    assert_eq!(stub.models("named"), ["stub-opus"]);

    // Plain `auto` verifies when Route calls its pick borderline (gateway.verify's default):
    // the same Route over gRPC says whether it does, and the refusal escalated iff so.
    let route = |prompt: &str| {
        let req = tiergate::proto::RouteRequest {
            input: Some(tiergate::proto::route_request::Input::Messages(
                tiergate::proto::Messages {
                    messages: vec![tiergate::proto::ChatMessage {
                        role: "user".into(),
                        content: prompt.into(),
                    }],
                },
            )),
            candidates: vec![FLASH.into(), SONNET.into(), OPUS.into()],
            ..Default::default()
        };
        let srv = &srv;
        async move { srv.client().await.route(req).await.unwrap().into_inner() }
    };
    let rr = route(CLOSE).await;
    let bl = &r["borderline"];
    assert_eq!(rr.model, FLASH, "{rr:?}");
    let calls = stub.models("borderline");
    assert_eq!(calls.len() > 1, rr.verify_recommended, "{bl} {rr:?}");
    assert_eq!(
        bl["headers"]["x-tiergate-escalations"],
        (calls.len() - 1).to_string()
    );
    // On EASY Route rates flash, its pick, above both pricier models: Verify could not send
    // an answer anywhere better, so Route does not ask for it; an empty answer still goes on.
    let re = route(EASY).await;
    assert_eq!(re.model, FLASH, "{re:?}");
    assert!(!re.verify_recommended, "{re:?}");
    let be = &r["borderline_empty"];
    assert_ne!(be["model"], FLASH, "{be}");
    assert_eq!(be["headers"]["x-tiergate-escalations"], "1");
    assert_eq!(stub.models("borderline_empty")[0], "stub-flash");
    // A policy with Verify `never` ships even an empty answer: nothing is verified.
    let fe = &r["fast_empty"];
    assert_eq!(fe["model"], FLASH, "{fe}");
    assert_eq!(fe["headers"]["x-tiergate-escalations"], "0");
    assert_eq!(stub.models("fast_empty"), ["stub-flash"]);

    assert_eq!(r["unknown_model"]["status"], 404, "{}", r["unknown_model"]);
    assert_eq!(r["unknown_policy"]["status"], 404);
    assert!(stub.calls("unknown_model").is_empty());

    // The client's deadline bounds the upstream call: a gateway timeout, not a hang.
    let d = &r["deadline"];
    assert_eq!(d["status"], 504, "{d}");
    assert_eq!(d["headers"]["x-tiergate-error"], "timeout");

    // Streams pass through (route only); a tier failing before its first byte is replaced.
    let s = &r["stream"];
    assert_eq!(s["headers"]["x-tiergate-model"], FLASH, "{s}");
    assert_eq!(s["text"], "Hello from stub-flash via stub");
    assert_eq!(s["chunks"], 3);
    let sf = &r["stream_failover"];
    assert_eq!(sf["headers"]["x-tiergate-model"], SONNET, "{sf}");
    assert_eq!(sf["headers"]["x-tiergate-escalations"], "1");
    assert_eq!(sf["text"], "Hello from stub-sonnet via stub");
    let su = &r["stream_unverified"];
    assert_eq!(su["headers"]["x-tiergate-model"], FLASH, "{su}");
    assert_eq!(su["text"], "Hello from stub-flash via stub");
    assert_eq!(stub.models("stream_unverified"), ["stub-flash"]);
    // stream = "cascade": both asked without `stream`, the refusal turned down, sonnet's answer
    // sent as events (a content chunk, a finishing one, usage with the whole request's cost).
    let sv = &r["stream_verified"];
    assert_eq!(sv["headers"]["x-tiergate-model"], SONNET, "{sv}");
    assert_eq!(sv["headers"]["x-tiergate-escalations"], "1");
    assert_eq!(sv["text"], good);
    assert_eq!(sv["chunks"], 3);
    let spent = cost(FLASH, &cfg) + cost(SONNET, &cfg);
    assert!(close(header_f64(sv, "x-tiergate-cost-usd"), spent), "{sv}");
    assert!(close(sv["usage"]["cost"].as_f64().unwrap(), spent), "{sv}");
    let calls = stub.calls("stream_verified");
    assert_eq!(calls.len(), 2);
    for c in &calls {
        assert!(c.body.get("stream").is_none(), "{:?}", c.body);
        assert!(c.body.get("stream_options").is_none(), "{:?}", c.body);
    }

    assert_eq!(
        r["model_policy"],
        json!({"id": "auto:fast", "object": "model"})
    );
    // A known path with a method it does not take: a 405 in the same shape.
    let r405 = reqwest::get(format!("{base}/chat/completions"))
        .await
        .unwrap();
    assert_eq!(r405.status(), 405);
    let v: Value = serde_json::from_slice(&r405.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // Refusals the SDK raises with OpenAI's error shape: an unknown model, an unknown path.
    let unknown = &r["model_unknown"];
    assert_eq!(unknown["status"], 404, "{unknown}");
    assert_eq!(unknown["error"]["type"], "model_not_found", "{unknown}");
    let legacy = &r["legacy_completions"];
    assert_eq!(legacy["status"], 404, "{legacy}");
    assert_eq!(
        legacy["headers"]["x-tiergate-error"],
        "invalid_request_error"
    );
    assert!(
        legacy["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Invalid URL (POST /v1/completions)")),
        "{legacy}"
    );
    assert_eq!(
        r["models"]["ids"],
        json!([
            "auto",
            "auto:budget",
            "auto:fast",
            "auto:verified",
            "auto:verified_stream",
            "auto:vote",
            "auto:vote3",
            FLASH,
            SONNET,
            OPUS
        ])
    );

    // LiteLLM's SDK, as a LiteLLM deployment calls the front (`openai/auto` + api_base): the
    // answer, the headers it passes on, and a 429 mapped to its rate-limit error.
    let l = run_client(
        "litellm_cases.py",
        &base,
        vec![
            case("litellm", "auto:fast", EASY, json!({})),
            case(
                "litellm_limited",
                "auto:fast",
                EASY,
                json!({"fail": {"stub-flash": 429, "stub-sonnet": 429, "stub-opus": 429}}),
            ),
        ],
    );
    let ok = &l["litellm"];
    assert_eq!(
        ok["text"],
        upstream::default_answer("stub", "stub-flash"),
        "{ok}"
    );
    assert_eq!(
        ok["headers"]["llm_provider-x-tiergate-model"], FLASH,
        "{ok}"
    );
    assert!(
        close(ok["usage_cost"].as_f64().unwrap(), cost(FLASH, &cfg)),
        "{ok}"
    );
    assert_eq!(stub.models("litellm"), ["stub-flash"]);
    let lim = &l["litellm_limited"];
    assert_eq!(lim["status"], 429, "{lim}");
    assert_eq!(lim["kind"], "RateLimitError", "{lim}");

    // Byte for byte, the stream is the upstream's.
    let body = json!({"model": "auto:fast", "stream": true, "stub": {"case": "raw"},
        "messages": [{"role": "user", "content": EASY}]});
    let resp = post_json(format!("{base}/chat/completions"), body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(
        String::from_utf8(bytes.to_vec()).unwrap(),
        upstream::sse_frames("stub", "stub-flash").concat()
    );
    // A stream that breaks off after its first frame, or inside it, ends with an error event
    // of its own (what OpenAI's SDKs raise), logged and counted, not a stream that just stops.
    let first = upstream::sse_frames("stub", "stub-flash").remove(0);
    for (cut, sent) in [
        (json!(true), first.clone()),
        (json!("mid"), format!("{}\n\n", &first[..first.len() / 2])),
    ] {
        let broken = json!({"model": FLASH, "stream": true, "messages": [{"role": "user",
            "content": EASY}], "stub": {"case": "broken", "break_stream": {"stub-flash": cut}}});
        let resp = post_json(format!("{base}/chat/completions"), broken.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        // A model named directly is priced from the catalog, as Route prices it.
        let expected: f64 = resp.headers()["x-tiergate-expected-cost-usd"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(expected > 0.0, "{expected}");
        let text = String::from_utf8(resp.bytes().await.unwrap().to_vec()).unwrap();
        let rest = text.strip_prefix(&sent).unwrap_or_else(|| panic!("{text}"));
        let event: Value = serde_json::from_str(
            rest.strip_prefix("data: ")
                .and_then(|r| r.strip_suffix("\n\n"))
                .unwrap_or_else(|| panic!("{rest:?}")),
        )
        .unwrap();
        assert_eq!(event["error"]["type"], "upstream_error", "{event}");
    }
    assert_eq!(
        common::metric_sum(
            &srv.metrics_text(),
            "tiergate_http_stream_errors_total",
            &[("model", FLASH)]
        ),
        Some(2.0)
    );

    // A body over gateway.max_body_bytes: 413 in the same error format, nothing called.
    let big = json!({"model": "auto", "stub": {"case": "big"},
        "messages": [{"role": "user", "content": "x".repeat(100 << 10)}]});
    let resp = post_json(format!("{base}/chat/completions"), big.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let err: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(err["error"]["type"], "request_too_large", "{err}");
    assert!(stub.calls("big").is_empty());
    // Turns: at most 4096 (a small body of empty turns is not multiplied into memory).
    let empty_turns = vec![json!({}); 4097];
    let many = json!({"model": FLASH, "stub": {"case": "many"}, "messages": empty_turns});
    let resp = post_json(format!("{base}/chat/completions"), many.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("at most 4096")),
        "{err}"
    );
    assert!(stub.calls("many").is_empty());

    // Routes through the front count in the cost metrics as gRPC ones do: the hard prompt
    // was routed (to opus) only here.
    let m = srv.metrics_text();
    let opus = common::metric_sum(&m, "tiergate_expected_cost_usd_total", &[("model", OPUS)]);
    assert!(opus.is_some_and(|usd| usd > 0.0), "{m}");

    // SIGTERM drains the front with the gRPC port: the process exits cleanly.
    srv.sigterm();
    let st = srv.wait_exit(std::time::Duration::from_secs(60));
    assert!(st.success(), "{st:?}");
}

/// A front with nothing to call is a start-up error that says why.
#[test]
fn a_front_without_upstreams_is_refused() {
    let mut c = Config::embedded().unwrap();
    c.gateway.http_listen = "127.0.0.1:0".into();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiergate.toml");
    std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
    let err = common::serve_refused(&path);
    assert!(
        err.contains("no [[catalog]] entry has an `upstream`"),
        "{err}"
    );
}

/// The front's access lines (JSON log format) and metrics: one line per request with the
/// client's x-request-id, status, model, escalations and cost, never the prompt; refusals
/// with their status and reason; tiergate_http_requests_total by status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_logs_and_counts_each_request() {
    let stub = Stub::start("stub").await;
    let mut cfg = config(&stub, "127.0.0.1:0");
    // One at a time: a request refused at the cap is logged too (below).
    cfg.gateway.max_concurrent = 1;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiergate.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let log_path = dir.path().join("stderr.log");
    let mut srv = Server::spawn_logged(
        &["--config", path.to_str().unwrap()],
        &[
            ("TIERGATE_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,tiergate::access=debug"),
            ("TIERGATE_TEST_FLASH_KEY", "sk-test-flash"),
        ],
        std::fs::File::create(&log_path).unwrap(),
    );
    srv.ready().await;
    let http = srv.http_addr();
    let url = format!("http://{http}/v1/chat/completions");
    let post =
        |id: &'static str, body: String| post_json(&url, body).header("x-request-id", id).send();
    // A word that appears only in the prompt.
    let ok = post(
        "http-a",
        json!({"model": "auto:fast", "messages": [{"role": "user",
            "content": "What is 2 + 2? Answer for the zebra-okapi club."}]})
        .to_string(),
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), 200);
    let model = ok.headers()["x-tiergate-model"]
        .to_str()
        .unwrap()
        .to_string();
    let bad = post("http-b", "not json".into()).await.unwrap();
    assert_eq!(bad.status(), 400);
    let unknown = post(
        "http-c",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(unknown.status(), 404);

    let m = srv.metrics_text();
    for (status, n) in [("200", 1.0), ("400", 1.0), ("404", 1.0)] {
        assert_eq!(
            common::metric_sum(&m, "tiergate_http_requests_total", &[("status", status)]),
            Some(n),
            "{status}: {m}"
        );
    }
    assert_eq!(
        common::metric_sum(&m, "tiergate_http_request_duration_seconds_count", &[]),
        Some(3.0),
        "{m}"
    );
    // The dashboard's latency panel reads the buckets (deploy/metrics-used.txt).
    assert!(
        m.contains("tiergate_http_request_duration_seconds_bucket{"),
        "{m}"
    );
    // A chat with no text part (an image alone) is still routed: the gateway does not refuse
    // what its upstream can answer (gRPC callers with empty turns get INVALID_ARGUMENT).
    let image = post(
        "http-d",
        json!({"model": "auto:fast", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
        .to_string(),
    )
    .await
    .unwrap();
    assert_eq!(image.status(), 200);
    // One more while a slow one runs: the cap's 429 has its access line in the request's span.
    let slow = post(
        "http-slow",
        json!({"model": FLASH, "messages": [{"role": "user", "content": EASY}],
            "stub": {"case": "slow", "delay_ms": {"stub-flash": 1500}}})
        .to_string(),
    );
    let slow = tokio::spawn(slow);
    let t0 = std::time::Instant::now();
    while stub.models("slow").is_empty() {
        assert!(
            t0.elapsed().as_secs() < 60,
            "the slow request never reached the stub"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let busy = post(
        "http-busy",
        json!({"model": FLASH, "messages": [{"role": "user", "content": EASY}]}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(busy.status(), 429);
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    srv.sigterm();
    assert!(srv.wait_exit(std::time::Duration::from_secs(60)).success());

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("zebra"), "the log holds request text:\n{log}");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access = |id: &str| {
        lines
            .iter()
            .find(|l| l["target"] == "tiergate::access" && l["span"]["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}:\n{log}"))
    };
    let a = access("http-a");
    assert_eq!(a["span"]["rpc"], "ChatCompletions", "{a}");
    assert_eq!(a["status"], 200, "{a}");
    assert_eq!(a["model"], model.as_str(), "{a}");
    assert_eq!(a["escalations"], 0, "{a}");
    assert!(
        a.get("consensus").is_none(),
        "only under a consensus policy: {a}"
    );
    assert!(a["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{a}");
    assert!(a["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{a}");
    for (id, status, reason) in [
        ("http-b", 400, "invalid_request_error"),
        ("http-c", 404, "model_not_found"),
        ("http-busy", 429, "rate_limit_error"),
    ] {
        let l = access(id);
        assert_eq!(l["status"], status, "{l}");
        assert_eq!(l["reason"], reason, "{l}");
    }
}

/// Verify failing after Route answered (the encoder errors from the moment flash is called):
/// a non-empty answer ships unverified, an empty one goes up the prices instead; the client
/// sees an answer either way, never Verify's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_verify_ships_the_answer_in_hand_but_never_an_empty_one() {
    let stub = Stub::start("stub").await;
    let control_dir = tempfile::tempdir().unwrap();
    let control = control_dir.path().join("fault");
    // No embedding cache: Verify's prompt would otherwise be served from Route's encoding.
    let Front {
        srv, http, _dir, ..
    } = front(
        &stub,
        |_| {},
        &["--backend", "fault", "--embedding-cache", "0"],
        &[
            ("TIERGATE_FAULT_INJECTION", control.to_str().unwrap()),
            ("RUST_BACKTRACE", "0"),
        ],
    )
    .await;
    let base = format!("http://{http}/v1");

    // One case per client run: the encoder works for Route, and fails from the moment the
    // stand-in has flash's call (held 1.5 s) until the case is answered.
    let mut seen = serde_json::Map::new();
    for (name, model, flash) in [
        // `auto` on EASY: Route does not ask for Verify; the empty answer is verified anyway.
        ("down_empty", "auto", ""),
        // `auto:verified` verifies every answer.
        ("down_answer", "auto:verified", "flash says 4"),
    ] {
        std::fs::write(&control, "ok").unwrap();
        let c = case(
            name,
            model,
            EASY,
            json!({"answer": {"stub-flash": flash, "stub-sonnet": "4"},
                "delay_ms": {"stub-flash": 1500}}),
        );
        let b = base.clone();
        let client =
            tokio::task::spawn_blocking(move || run_client("openai_cases.py", &b, vec![c]));
        let t0 = std::time::Instant::now();
        while !stub.models(name).iter().any(|m| m == "stub-flash") {
            assert!(t0.elapsed().as_secs() < 60, "{name}: flash never called");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        std::fs::write(&control, "error").unwrap();
        let r = client.await.unwrap();
        seen.insert(name.into(), r[name].clone());
    }
    std::fs::write(&control, "ok").unwrap();

    let de = &seen["down_empty"];
    assert_eq!(de["model"], SONNET, "{de}");
    assert_eq!(de["text"], "4");
    assert_eq!(de["headers"]["x-tiergate-escalations"], "1");
    assert_eq!(stub.models("down_empty"), ["stub-flash", "stub-sonnet"]);
    let da = &seen["down_answer"];
    assert_eq!(da["model"], FLASH, "{da}");
    assert_eq!(da["text"], "flash says 4");
    assert_eq!(da["headers"]["x-tiergate-escalations"], "0");
    assert_eq!(stub.models("down_answer"), ["stub-flash"]);
    // Verify did fail on the encoder, in each case (so neither answer is Verify's own decision).
    let m = srv.metrics_text();
    let faults = common::metric_sum(&m, "tiergate_backend_faults_total", &[("kind", "error")]);
    assert!(faults >= Some(2.0), "{m}");
}

/// SIGTERM while the front waits on an upstream, long after start: the request still gets its
/// answer within drain.timeout_s, counted from when the listener closed (it was counted from
/// start, which left a server up longer than the timeout 1 s for its HTTP requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_long_after_start_still_answers_the_front_in_flight() {
    let stub = Stub::start("stub").await;
    let Front {
        mut srv,
        http,
        _dir,
        ..
    } = front(
        &stub,
        |_| {},
        &[],
        &[
            ("TIERGATE_DRAIN_LAME_DUCK_S", "0"),
            ("TIERGATE_DRAIN_TIMEOUT_S", "4"),
        ],
    )
    .await;
    // Up longer than drain.timeout_s before the signal.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let body = case(
        "drain",
        "auto:fast",
        EASY,
        json!({"answer": {"stub-flash": "4"}, "delay_ms": {"stub-flash": 2500}}),
    );
    let mut body = body;
    body["stub"] = body["extra_body"]["stub"].take();
    for k in ["name", "extra_body"] {
        body.as_object_mut().unwrap().remove(k);
    }
    let url = format!("http://{http}/v1/chat/completions");
    let sent = tokio::spawn(async move {
        let r = post_json(url, body.to_string()).send().await?;
        let status = r.status();
        let bytes = r.bytes().await?;
        Ok::<_, reqwest::Error>((
            status,
            serde_json::from_slice::<Value>(&bytes).unwrap_or_default(),
        ))
    });
    let t0 = std::time::Instant::now();
    while stub.models("drain").is_empty() {
        assert!(t0.elapsed().as_secs() < 60, "flash never called");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    srv.sigterm();
    let (status, reply) = common::within("the Chat Completion sent before SIGTERM", sent)
        .await
        .unwrap()
        .expect("the front answered through the drain");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["message"]["content"], "4", "{reply}");
    let st = srv.wait_exit(std::time::Duration::from_secs(60));
    assert!(st.success(), "{st:?}");
}

/// With gateway.max_connections = 1, a second client is not answered while the first holds
/// its connection open, and is answered once that connection closes: it waited to be
/// accepted, it was not turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_bounds_its_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stub = Stub::start("stub").await;
    let Front {
        srv, http, _dir, ..
    } = front(&stub, |c| c.gateway.max_connections = 1, &[], &[]).await;
    let get = format!("GET /v1/models HTTP/1.1\r\nhost: {http}\r\n\r\n");
    let mut first = tokio::net::TcpStream::connect(&http).await.unwrap();
    first.write_all(get.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let n = common::within("the first connection's reply", first.read(&mut buf))
        .await
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The first connection stays open (kept alive); the second waits in the backlog.
    let mut second = tokio::net::TcpStream::connect(&http).await.unwrap();
    second.write_all(get.as_bytes()).await.unwrap();
    let waited =
        tokio::time::timeout(std::time::Duration::from_millis(700), second.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "answered while the first held the only slot"
    );
    assert_eq!(
        common::metric_sum(&srv.metrics_text(), "tiergate_http_connections", &[]),
        Some(1.0)
    );
    drop(first);
    let n = tokio::time::timeout(std::time::Duration::from_secs(30), second.read(&mut buf))
        .await
        .expect("answered once the first closed")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
}

/// A provider's reply within `gateway.max_body_bytes` (4 MiB here) but holding more JSON
/// values than the gateway parses is refused unparsed, like a malformed reply: the next tier
/// answers. (Parsed, each bare value would have taken tens of bytes: 400 KB of `0,` as much
/// as several MB of memory, per request.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_of_countless_values_goes_to_the_next_tier() {
    let stub = Stub::start("stub").await;
    // The server runs as long as `_srv` is held.
    let Front {
        srv: _srv,
        http,
        _dir,
        ..
    } = front(&stub, |c| c.gateway.max_body_bytes = 4 << 20, &[], &[]).await;
    let body = json!({"model": "auto:fast", "messages": [{"role": "user", "content": EASY}],
        "stub": {"case": "values", "answer": {"stub-sonnet": "4"},
            // Past the gateway's limit of 200,000 (`gateway::json::MAX_VALUES`).
            "values": {"stub-flash": 200_010}}});
    let r = post_json(
        format!("http://{http}/v1/chat/completions"),
        body.to_string(),
    )
    .send()
    .await
    .unwrap();
    let escalations = r.headers().get("x-tiergate-escalations").cloned();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["model"], SONNET, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "4", "{v}");
    assert_eq!(escalations.as_ref().map(|h| h.as_bytes()), Some(&b"1"[..]));
    assert_eq!(stub.models("values"), ["stub-flash", "stub-sonnet"]);
}

/// With gateway.max_concurrent = 1, a second chat completion while one runs is a 429 at once
/// (with retry-after), and the first still gets its answer; a body that trickles in is a 408
/// at the client's deadline, and a head that never ends is closed at gateway.head_timeout_s:
/// no connection is held open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_bounds_concurrency_and_slow_bodies() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stub = Stub::start("stub").await;
    let Front {
        srv, http, _dir, ..
    } = front(
        &stub,
        |c| {
            c.gateway.max_concurrent = 1;
            c.gateway.head_timeout_s = 1;
        },
        &[],
        &[],
    )
    .await;
    let url = format!("http://{http}/v1/chat/completions");
    let post = |name: &'static str, delay: u64| {
        let url = url.clone();
        let body = json!({"model": FLASH, "messages": [{"role": "user", "content": EASY}],
            "stub": {"case": name, "answer": {"stub-flash": "4"},
                "delay_ms": {"stub-flash": delay}}});
        async move {
            let r = post_json(url, body.to_string()).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").cloned();
            let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            (status, retry, v)
        }
    };
    let first = tokio::spawn(post("first", 1500));
    let t0 = std::time::Instant::now();
    while stub.models("first").is_empty() {
        assert!(t0.elapsed().as_secs() < 60, "first never called");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (status, retry, v) = post("second", 0).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(retry.as_ref().map(|h| h.as_bytes()), Some(&b"1"[..]));
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    assert!(stub.calls("second").is_empty());
    let (status, _, v) = common::within("the first request", first).await.unwrap();
    assert_eq!(status, 200, "{v}");
    // Its place is free again.
    assert_eq!(post("third", 0).await.0, 200);
    assert_eq!(
        common::metric_sum(
            &srv.metrics_text(),
            "tiergate_rejections_total",
            &[("reason", "max_concurrent")]
        ),
        Some(1.0)
    );

    // 100 bytes announced, 10 sent, then nothing: answered 408 at the 500 ms deadline.
    let mut conn = tokio::net::TcpStream::connect(&http).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {http}\r\ncontent-type: application/json\r\n\
         content-length: 100\r\nx-tiergate-timeout-ms: 500\r\n\r\n{{\"model\":"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(30), conn.read(&mut buf))
        .await
        .expect("answered, not held")
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(t0.elapsed().as_millis() >= 400, "{:?}", t0.elapsed());

    // What `sent` gets back until the front closes the connection (within 30 s, else the
    // test fails), and how long that took.
    let until_closed = |sent: Vec<u8>| {
        let http = http.clone();
        async move {
            let mut conn = tokio::net::TcpStream::connect(&http).await.unwrap();
            conn.write_all(&sent).await.unwrap();
            let t0 = std::time::Instant::now();
            let mut got = Vec::new();
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                conn.read_to_end(&mut got),
            )
            .await
            .expect("closed, not held")
            .ok();
            (String::from_utf8_lossy(&got).into_owned(), t0.elapsed())
        }
    };
    // A request head that never ends: the connection is closed at gateway.head_timeout_s
    // (1 s here), not held open.
    let (_, took) =
        until_closed(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n".to_vec()).await;
    assert!(took.as_millis() >= 900, "{took:?}");
    // A kept-alive connection that goes quiet after its answer: closed at head_timeout_s too.
    let get = format!("GET /v1/models HTTP/1.1\r\nhost: {http}\r\n\r\n");
    let (all, took) = until_closed(get.into_bytes()).await;
    assert!(all.starts_with("HTTP/1.1 200"), "{all}");
    assert!(
        !all.contains("connection: close"),
        "kept alive at first: {all}"
    );
    assert!(took.as_millis() >= 900, "{took:?}");
}
