//! Files tiergate reads: heads JSON, overlay JSON and config TOML, mutated from the real ones
//! (models/heads.json, an overlay fitted on it, tiergate.toml): truncation, byte flips and
//! insertions, wrong types, huge and non-finite numbers, wrong array lengths, dropped and
//! unknown keys, commented keys switched on. Loading must give a typed error or something
//! usable: a model that loads answers finite probabilities in [0, 1].
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::{json, Value};
use tiergate::base::Device;
use tiergate::config::{Config, EMBEDDED_DEFAULT};
use tiergate::model::heads::{AnswerInput, Heads};
use tiergate::model::memory::Memory;
use tiergate::model::overlay::{Overlay, OverlayModel, OVERLAY_FORMAT};
use tiergate::service::Decider;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A JSON document with the pointers of its nodes, parsed once per target.
struct Doc {
    text: String,
    value: Value,
    /// JSON pointers of arrays and objects (where structure goes wrong).
    containers: Vec<String>,
    /// JSON pointers of scalars.
    leaves: Vec<String>,
    /// The nodes that are an object's field, not an array's element: the few that say what
    /// the rest means (format, dim, k, thresholds), drawn as often as the thousands of weights.
    fields: Vec<String>,
}

impl Doc {
    fn new(value: Value) -> Doc {
        let (mut containers, mut leaves, mut fields) = (Vec::new(), Vec::new(), Vec::new());
        let mut stack = vec![(&value, String::new(), false)];
        while let Some((v, at, field)) = stack.pop() {
            if field {
                fields.push(at.clone());
            }
            match v {
                Value::Array(a) => {
                    for (i, x) in a.iter().enumerate() {
                        stack.push((x, format!("{at}/{i}"), false));
                    }
                    containers.push(at);
                }
                Value::Object(o) => {
                    for (k, x) in o {
                        let k = k.replace('~', "~0").replace('/', "~1");
                        stack.push((x, format!("{at}/{k}"), true));
                    }
                    containers.push(at);
                }
                _ => leaves.push(at),
            }
        }
        Doc {
            text: value.to_string(),
            value,
            containers,
            leaves,
            fields,
        }
    }
}

/// Values a file could hold where another was expected.
fn special(i: u32) -> Value {
    match i % 26 {
        0 => Value::Null,
        1 => json!(true),
        2 => json!("x"),
        3 => json!(""),
        4 => json!(0),
        5 => json!(-1),
        6 => json!(1e39), // beyond f32: infinite once read
        7 => json!(-1e39),
        8 => json!(3.4e38),
        9 => json!(1e300),
        10 => json!(f64::MIN_POSITIVE),
        11 => json!(u64::MAX),
        12 => json!(i64::MIN),
        13 => json!(1u64 << 32),
        14 => json!(-0.0),
        15 => json!([]),
        16 => json!({}),
        17 => json!([1.0, 2.0, 3.0]),
        18 => json!(1e20),
        19 => json!(0.5),
        20 => json!(1.0),
        21 => json!(1u64 << 62),
        22 => json!({"k": 1}),
        23 => json!(1e10),
        24 => json!(-1e10),
        // Deeper than serde_json's recursion limit.
        _ => serde_json::from_str(&format!("{}{}", "[".repeat(300), "]".repeat(300)))
            .unwrap_or(Value::Null),
    }
}

/// Text spliced into a file: JSON's non-numbers, bad numbers, stray structure.
const SPLICES: &[&str] = &[
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-",
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "\u{0}",
    "\u{fffd}",
    "0x10",
    "1_000",
    "'",
    "\\",
    "\"\\ud800\"",
    "9999999999999999999999999999999999999999",
];

/// One edit: (kind, which node or byte, argument).
type Edit = (u8, u32, u32);

fn edits() -> impl Strategy<Value = (Vec<Edit>, Vec<Edit>)> {
    let e = (0u8..14, any::<u32>(), any::<u32>());
    prop_oneof![
        // Structure only, text only, or both.
        (prop::collection::vec(e.clone(), 1..4), Just(vec![])),
        (Just(vec![]), prop::collection::vec(e.clone(), 1..3)),
        (
            prop::collection::vec(e.clone(), 1..3),
            prop::collection::vec(e, 1..2)
        ),
    ]
}

fn apply_value_edit(doc: &Doc, v: &mut Value, (kind, at, arg): Edit) {
    let pool = match kind {
        0..4 => &doc.containers,
        4..6 | 9.. => &doc.fields,
        _ => &doc.leaves,
    };
    let Some(ptr) = pool.get(at as usize % pool.len().max(1)) else {
        return;
    };
    let Some(node) = v.pointer_mut(ptr) else {
        return; // an earlier edit removed it
    };
    match (kind, node) {
        (0, Value::Array(a)) if !a.is_empty() => {
            a.remove(arg as usize % a.len());
        }
        (1, Value::Array(a)) if !a.is_empty() => {
            let x = a[arg as usize % a.len()].clone();
            a.push(x);
        }
        (2, Value::Array(a)) => a.truncate(arg as usize % (a.len() + 1)),
        (3, Value::Array(a)) => a.push(special(arg)),
        (0 | 1, Value::Object(o)) if !o.is_empty() => {
            if let Some(k) = o.keys().nth(arg as usize % o.len()).cloned() {
                o.remove(&k);
            }
        }
        (2 | 3, Value::Object(o)) => {
            o.insert("zz_unknown".into(), special(arg));
        }
        (6 | 7, Value::Number(n)) => {
            // Scale a number by 1e±k or flip its sign: huge, tiny, negative.
            let f = n.as_f64().unwrap_or(0.0);
            let scale = [1e30, 1e10, 1e4, -1.0, 1e-30, 0.0][arg as usize % 6];
            *n = serde_json::Number::from_f64(f * scale)
                .unwrap_or_else(|| serde_json::Number::from(0));
        }
        (8, Value::Number(n)) => {
            // Off by one (lengths, counts, format).
            let i = n.as_i64().unwrap_or(0);
            *n = serde_json::Number::from(i.saturating_add(if arg % 2 == 0 { 1 } else { -1 }));
        }
        (_, node) => *node = special(arg),
    }
}

fn apply_text_edit(text: &mut Vec<u8>, (kind, at, arg): Edit) {
    if text.is_empty() {
        return;
    }
    let i = at as usize % text.len();
    match kind % 4 {
        0 => text.truncate(i),
        1 => text[i] ^= 1 << (arg % 8),
        2 => {
            let s = SPLICES[arg as usize % SPLICES.len()].as_bytes();
            text.splice(i..i, s.iter().copied());
        }
        _ => {
            let end = (i + 1 + arg as usize % 64).min(text.len());
            text.drain(i..end);
        }
    }
}

/// The document after `value_edits` (on its tree) and `text_edits` (on its bytes), as text
/// (bytes that are not UTF-8 replaced, as a file read lossily would be).
fn mutate(doc: &Doc, value_edits: &[Edit], text_edits: &[Edit]) -> String {
    let mut bytes = if value_edits.is_empty() {
        doc.text.clone().into_bytes()
    } else {
        let mut v = doc.value.clone();
        for &e in value_edits {
            apply_value_edit(doc, &mut v, e);
        }
        v.to_string().into_bytes()
    };
    for &e in text_edits {
        apply_text_edit(&mut bytes, e);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn real_heads() -> &'static Heads {
    static H: OnceLock<Heads> = OnceLock::new();
    H.get_or_init(|| Heads::load(&root().join("models/heads.json")).expect("models/heads.json"))
}

/// A unit vector of `dim` from `seed` (the encoder's embeddings are unit length).
fn unit(dim: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

fn prob(what: &str, p: f64) -> Result<(), TestCaseError> {
    prop_assert!(p.is_finite() && (0.0..=1.0).contains(&p), "{what} = {p}");
    Ok(())
}

/// What serving reads from heads that loaded: every model's p_pass (the memory's correction
/// included), the verifier's p, thresholds, and the decider built over them.
fn check_usable(h: &Heads) -> Result<(), TestCaseError> {
    let (e, a) = (unit(h.dim, 7), unit(h.dim, 11));
    let answer = AnswerInput {
        text: "3 × 4 = 12. The answer is (B).",
        prompt: "What is 3 × 4?\nOptions: [\"7\", \"12\", \"34\"]",
        embedding: &a,
        truncated: false,
    };
    let mut models: Vec<&str> = h.router.models.keys().map(String::as_str).collect();
    if let Some(m) = &h.memory {
        models.extend(m.outcomes.keys().map(String::as_str));
    }
    models.push("no-such-model");
    for m in models {
        prob(&format!("route_p({m})"), h.route_p(m, &e))?;
        prob(&format!("verify_p({m})"), h.verify_p(m, &e, &answer))?;
    }
    for f in [0.0, 0.3, 0.7, 0.95, 1.0] {
        let t = h.threshold_for(f);
        prop_assert!(t.is_finite(), "threshold_for({f}) = {t}");
    }
    let cfg = Config::embedded().expect("embedded config");
    if let Ok(d) = Decider::with_heads(&cfg, h.clone(), h.dim) {
        prob("default floor", d.default_floor())?;
        prob("default threshold", d.default_threshold())?;
        for c in d.catalog.default_models() {
            prob(
                &format!("catalog {} p", c.name),
                d.heads.route_p(&c.head, &e),
            )?;
        }
    }
    Ok(())
}

#[test]
fn heads_json_loads_or_fails_typed() {
    let doc = Doc::new(
        serde_json::from_str(&std::fs::read_to_string(root().join("models/heads.json")).unwrap())
            .expect("models/heads.json"),
    );
    let loaded = std::cell::Cell::new(0u64);
    super::engine::run("heads_json", 300, edits(), |(v, t)| {
        let text = mutate(&doc, &v, &t);
        match Heads::from_json(&text) {
            Ok(h) => {
                loaded.set(loaded.get() + 1);
                check_usable(&h)
            }
            Err(e) => {
                let why = format!("{e:#}");
                prop_assert!(!why.is_empty(), "an error without a message");
                Ok(())
            }
        }
    });
    println!(
        "  heads_json: {} loaded (and were usable), the rest refused",
        loaded.get()
    );
}

/// Found by heads_json (20 000 inputs): a huge `k` or `dim` overflowed `k × dim` in
/// `Heads::validate` (a panic in debug builds; in release a wrapped product could pass the
/// length check and index out of bounds later). Now a typed error.
#[test]
fn a_huge_k_or_dim_in_heads_is_refused_not_an_overflow() {
    let text = std::fs::read_to_string(root().join("models/heads.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    for (ptr, huge) in [
        ("/router/k", u64::MAX),
        ("/router/k", 1 << 62),
        ("/dim", u64::MAX),
    ] {
        let mut m = v.clone();
        *m.pointer_mut(ptr).expect(ptr) = huge.into();
        let e = Heads::from_json(&m.to_string()).expect_err("refused");
        assert!(format!("{e:#}").contains("k × dim"), "{ptr}: {e:#}");
    }
    assert!(
        Heads::from_json(&v.to_string()).is_ok(),
        "the file itself loads"
    );
}

/// Found by overlay_json (20 000 inputs): a memory prompt scaled by 1e30 passed validation
/// (finite) and made Route's p NaN for the models with outcomes (an infinite neighbour
/// weight). Memory rows must now be unit vectors, as the encoder makes them.
#[test]
fn an_overlay_memory_row_that_is_not_unit_is_refused() {
    let heads = real_heads();
    let mut o = base_overlay(heads);
    if let Some(m) = o.memory.as_mut() {
        m.prompts[5] *= 1e30;
    }
    let mut h = heads.clone();
    let e = o.apply(&mut h).expect_err("refused");
    assert!(format!("{e:#}").contains("unit vector"), "{e:#}");
    base_overlay(heads)
        .apply(&mut h)
        .expect("the unit rows apply");
}

/// An overlay as `tiergate calibrate` writes one for the committed heads: abilities, a
/// re-fitted verifier, a memory of labelled prompts and re-learned Verify thresholds.
fn base_overlay(h: &Heads) -> Overlay {
    let names: Vec<String> = h.router.models.keys().take(3).cloned().collect();
    let models: BTreeMap<String, OverlayModel> = names
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                m.clone(),
                OverlayModel {
                    ability: h.router.ability(m).clone(),
                    rows: 40 + i,
                    mean_output_tokens: 200,
                },
            )
        })
        .chain([(
            "fresh-model".to_string(),
            OverlayModel {
                ability: h.router.prior.clone(),
                rows: 12,
                mean_output_tokens: 90,
            },
        )])
        .collect();
    let prompts: Vec<f32> = (0..4).flat_map(|i| unit(h.dim, 100 + i)).collect();
    let outcomes = names
        .iter()
        .map(|m| (m.clone(), vec![(0, 1.0), (1, 0.0), (3, 0.5)]))
        .collect();
    Overlay {
        format: OVERLAY_FORMAT,
        heads_revision: h.revision.clone(),
        prior: h.router.prior.clone(),
        models,
        verifier: Some(h.verifier.clone()),
        verifier_rows: 300,
        verify_thresholds: Some(vec![(0.8, 0.55), (0.9, 0.7), (0.95, 0.82)]),
        memory: Some(Memory {
            dim: h.dim,
            prompts,
            outcomes,
            k: 3,
            alpha: 2.0,
            tau: 0.05,
        }),
    }
}

#[test]
fn overlay_json_loads_or_fails_typed() {
    let heads = real_heads();
    let base = base_overlay(heads);
    // The unmutated overlay applies: the mutations start from a file the server takes.
    base.apply(&mut heads.clone())
        .expect("base overlay applies");
    let doc = Doc::new(serde_json::to_value(&base).expect("overlay to JSON"));
    let applied = std::cell::Cell::new(0u64);
    super::engine::run("overlay_json", 300, edits(), |(v, t)| {
        let text = mutate(&doc, &v, &t);
        let Ok(o) = Overlay::from_json(&text) else {
            return Ok(());
        };
        let mut h = heads.clone();
        match o.apply(&mut h) {
            Ok(()) => {
                applied.set(applied.get() + 1);
                check_usable(&h)
            }
            Err(_) => {
                // All or nothing: a refused overlay changed nothing.
                prop_assert_eq!(&h.router.models, &heads.router.models);
                prop_assert!(h.memory.is_none());
                prop_assert_eq!(&h.verify_thresholds, &heads.verify_thresholds);
                Ok(())
            }
        }
    });
    println!(
        "  overlay_json: {} applied (and were usable), the rest refused",
        applied.get()
    );
}

/// TOML values a config key could be given.
const TOML_VALUES: &[&str] = &[
    "-1",
    "0",
    "1",
    "9223372036854775807",
    "-9223372036854775808",
    "1e308",
    "nan",
    "inf",
    "-inf",
    "-0.0",
    "0.5",
    "1.5",
    "\"\"",
    "\"x\"",
    "\"999.999.999.999:99999\"",
    "\"[::1]:0\"",
    "\"127.0.0.1:0\"",
    "\"/nonexistent/file\"",
    "true",
    "[]",
    "[1, 2]",
    "{}",
    "{ a = 1 }",
    "2026-12-04T00:00:00Z",
    "'''multi\nline'''",
    "\"\\u0000\"",
    "\"cpu\"",
    "\"fault\"",
    "\"bf16\"",
];

fn mutate_toml(edits: &[Edit]) -> String {
    let mut lines: Vec<String> = EMBEDDED_DEFAULT.lines().map(String::from).collect();
    let keys: Vec<String> = lines
        .iter()
        .filter_map(|l| {
            let l = l.trim_start_matches(['#', ' ']);
            let (k, _) = l.split_once(" = ")?;
            (!k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .then(|| k.to_string())
        })
        .collect();
    for &(kind, at, arg) in edits {
        if lines.is_empty() {
            break;
        }
        let i = at as usize % lines.len();
        let value = TOML_VALUES[arg as usize % TOML_VALUES.len()];
        match kind % 6 {
            // A key's value replaced (the comment after it goes too).
            0 | 1 => {
                if let Some((k, _)) = lines[i].split_once(" = ") {
                    lines[i] = format!("{k} = {value}");
                }
            }
            // A commented key or section switched on.
            2 => {
                if let Some(rest) = lines[i].strip_prefix("# ") {
                    lines[i] = rest.to_string();
                }
            }
            3 => {
                lines.remove(i);
            }
            4 => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            _ => {
                let k = &keys[arg as usize % keys.len()];
                lines.insert(i, format!("{k} = {value}"));
            }
        }
    }
    lines.join("\n")
}

/// Arbitrary text, TOML-shaped text, or the default config after line edits and byte edits.
fn toml_inputs() -> impl Strategy<Value = String> {
    let e = (0u8..12, any::<u32>(), any::<u32>());
    prop_oneof![
        any::<String>(),
        "(\\[{1,2}[a-z_.]{0,12}\\]{1,2}\n|[a-z_]{1,16} = (-?[0-9]{1,20}|\"[^\"\n]{0,20}\"|nan|inf|true|\\[\\]|\\{\\})\n){0,12}",
        prop::collection::vec(e.clone(), 1..6).prop_map(|v| mutate_toml(&v)),
        (prop::collection::vec(e.clone(), 0..3), prop::collection::vec(e, 1..3)).prop_map(
            |(v, t)| {
                let mut b = mutate_toml(&v).into_bytes();
                for x in t {
                    apply_text_edit(&mut b, x);
                }
                String::from_utf8_lossy(&b).into_owned()
            }
        ),
    ]
}

#[test]
fn config_toml_loads_or_fails_typed() {
    let heads = real_heads();
    let valid = std::cell::Cell::new(0u64);
    super::engine::run("config_toml", 1500, toml_inputs(), |text| {
        // As `--config` loads a file: laid over the embedded default.
        let Ok(c) = Config::over_embedded(&text) else {
            return Ok(());
        };
        if c.validate().is_err() {
            return Ok(());
        }
        valid.set(valid.get() + 1);
        // What start-up derives from a config that validated.
        prop_assert!(c.listen_addr().is_ok());
        prop_assert!(c.metrics_addr().is_ok());
        prop_assert!(c.http_addr().is_ok());
        prop_assert!(c.tls.plaintext_health_addr().is_ok());
        for d in [Device::Cpu, Device::Cuda] {
            let l = c.batch.limits_for(d);
            prop_assert!(l.max_batch_tokens > 0 && l.max_batch_requests > 0 && l.max_queue > 0);
        }
        let _ = c.batch.max_queue_delay();
        prop_assert!(c.compute_threads() > 0);
        if let Ok(d) = Decider::with_heads(&c, heads.clone(), heads.dim) {
            let e = unit(heads.dim, 3);
            for m in d.catalog.default_models() {
                prob(
                    &format!("catalog {} p", m.name),
                    d.heads.route_p(&m.head, &e),
                )?;
            }
        }
        Ok(())
    });
    println!(
        "  config_toml: {} parsed and validated, the rest refused",
        valid.get()
    );
}
