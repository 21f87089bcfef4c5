//! `tiergate eval` on a small real slice of dev (structure and invariants of eval.json, the SVG),
//! and the replay's figures (APGR / CPT(50%), cost at a quality level) on hand-made inputs.
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tiergate::eval::replay::{cost_at_quality, pgr};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn apgr_and_cpt_on_known_inputs() {
    // Strong passes prompts 0 and 1 only, weak passes nothing: gap = 0.5.
    let weak = [0.0, 0.0, 0.0, 0.0];
    let strong = [1.0, 1.0, 0.0, 0.0];
    // Perfect ranking: PGR 0, 0.5, 1, 1, 1 at x = 0, ¼, ½, ¾, 1 → area 0.0625+0.1875+0.25+0.25.
    let g = pgr(&[0.9, 0.8, 0.1, 0.0], &weak, &strong).unwrap();
    assert!(close(g.apgr, 0.75), "{g:?}");
    assert!(close(g.cpt50.unwrap(), 0.25), "{g:?}");
    // Worst ranking: PGR 0, 0, 0, 0.5, 1 → area 0.0625 + 0.1875.
    let g = pgr(&[0.0, 0.1, 0.8, 0.9], &weak, &strong).unwrap();
    assert!(close(g.apgr, 0.25), "{g:?}");
    assert!(close(g.cpt50.unwrap(), 0.75), "{g:?}");
    // All tied = random routing in expectation: the diagonal, APGR ½, CPT(50%) = 50%.
    let g = pgr(&[0.5; 4], &weak, &strong).unwrap();
    assert!(close(g.apgr, 0.5) && close(g.cpt50.unwrap(), 0.5), "{g:?}");
    assert_eq!(g.curve, vec![(0.0, 0.0), (1.0, 1.0)]);
    // No gap to recover: undefined.
    assert!(pgr(&[0.5; 4], &strong, &weak).is_none());
    // A prompt where strong is worse than weak costs PGR on the way (curve exceeds 1 first).
    let g = pgr(&[0.9, 0.1], &[0.0, 1.0], &[1.0, 0.5]).unwrap();
    assert_eq!(g.curve, vec![(0.0, 0.0), (0.5, 2.0), (1.0, 1.0)]);
    assert!(
        close(g.apgr, 1.25) && close(g.cpt50.unwrap(), 0.125),
        "{g:?}"
    );
}

#[test]
fn cost_at_quality_interpolates_between_cost_adjacent_points() {
    let curve = [(1.0, 0.5), (3.0, 0.9), (2.0, 0.7), (10.0, 1.0)];
    assert!(close(cost_at_quality(&curve, 0.6).unwrap(), 1.5));
    assert!(close(cost_at_quality(&curve, 0.8).unwrap(), 2.5));
    assert!(
        close(cost_at_quality(&curve, 0.7).unwrap(), 2.0),
        "a point exactly on it"
    );
    assert!(
        close(cost_at_quality(&curve, 0.4).unwrap(), 1.0),
        "cheapest point already does"
    );
    assert!(close(cost_at_quality(&curve, 0.95).unwrap(), 6.5));
    assert_eq!(cost_at_quality(&curve, 1.01), None);
    // Non-monotone curve: the first upward crossing in cost order is the cheapest.
    let wiggle = [(1.0, 0.4), (2.0, 0.8), (3.0, 0.5), (4.0, 0.9)];
    assert!(close(cost_at_quality(&wiggle, 0.6).unwrap(), 1.5));
    assert_eq!(cost_at_quality(&[], 0.5), None);
}

fn f(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("expected a number, got {v}"))
}

#[test]
fn eval_replays_a_dev_slice() {
    let data = data_dir();
    assert!(
        data.join("dev.jsonl.gz").exists(),
        "../shared/data/dev.jsonl.gz is missing"
    );
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["eval", "--data"])
        .arg(data.join("dev.jsonl.gz"))
        .arg("--train")
        .arg(data.join("train.jsonl.gz"))
        // Bounded kNN index: the test stays fast even where the encoder cache is cold.
        .args(["--max-prompts", "30", "--knn-max-train-prompts", "400"])
        .arg("--out-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("saved@98%"), "table on stderr: {stderr}");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("eval.json")).unwrap())
            .unwrap();
    let sources = v["sources"].as_object().unwrap();
    assert_eq!(sources.len(), 3, "{:?}", sources.keys());
    for (name, s) in sources {
        assert!(dir.path().join(format!("curves-{name}.svg")).exists());
        assert_eq!(s["prompts"], 30, "{name}");
        let tier = s["tier"].as_array().unwrap();
        assert!((2..=4).contains(&tier.len()), "{name}: {tier:?}");
        for w in tier.windows(2) {
            assert!(f(&w[0]["train_mean_cost"]) <= f(&w[1]["train_mean_cost"]));
        }
        let c = &s["curves"];
        let singles = c["single"].as_array().unwrap();
        assert_eq!(singles.len(), tier.len());
        let oracle = &c["oracle"];
        // The oracle passes whatever any tier model passes; against a model that passes as
        // often, it never pays more (it ships that model's answer or a cheaper passing one).
        for m in singles {
            assert!(
                f(&oracle["pass_rate"]) >= f(&m["pass_rate"]) - 1e-12,
                "{name}"
            );
            if f(&m["pass_rate"]) >= f(&oracle["pass_rate"]) - 1e-12 {
                assert!(f(&oracle["cost"]) <= f(&m["cost"]) + 1e-15, "{name}");
            }
        }
        let best = singles
            .iter()
            .map(|m| f(&m["quality"]))
            .fold(f64::MIN, f64::max);
        assert!(close(f(&s["best_quality"]), best));
        assert!(close(f(&s["target_quality"]), 0.98 * best));
        // Cascades: a higher threshold only escalates further, so cost and calls never fall.
        for k in ["cascade", "route_cascade"] {
            let pts = c[k].as_array().unwrap();
            assert!(pts.len() > 10, "{name} {k}");
            for w in pts.windows(2) {
                assert!(f(&w[0]["param"]) < f(&w[1]["param"]));
                assert!(f(&w[0]["cost"]) <= f(&w[1]["cost"]) + 1e-15, "{name} {k}");
                assert!(f(&w[0]["calls"]) <= f(&w[1]["calls"]) + 1e-12, "{name} {k}");
            }
            let last = pts.last().unwrap();
            assert!(f(&last["calls"]) >= 1.0);
        }
        // Route-only at floor 0 calls the cheapest model for every prompt.
        for k in ["route", "knn"] {
            let first = &c[k][0];
            assert_eq!(f(&first["param"]), 0.0);
            assert!(
                close(f(&first["cost"]), f(&singles[0]["cost"])),
                "{name} {k}"
            );
            assert!(close(f(&first["calls"]), 1.0));
        }
        // Route-only by utility: one call per prompt, λ ascending from 0.
        for k in ["route_utility", "knn_utility"] {
            let pts = c[k].as_array().unwrap();
            assert!(pts.len() > 10, "{name} {k}");
            assert_eq!(f(&pts[0]["param"]), 0.0);
            for w in pts.windows(2) {
                assert!(f(&w[0]["param"]) < f(&w[1]["param"]), "{name} {k}");
            }
            assert!(pts.iter().all(|p| close(f(&p["calls"]), 1.0)), "{name} {k}");
        }
        for k in ["router", "knn", "verifier"] {
            let a = f(&s[k]["auroc"]);
            assert!((0.0..=1.0).contains(&a), "{name} {k} auroc {a}");
            let e = f(&s[k]["ece"]);
            assert!((0.0..=1.0).contains(&e), "{name} {k} ece {e}");
        }
        let far = &s["verifier"]["false_accept_rate"];
        assert!(far.is_null() || (0.0..=1.0).contains(&f(far)));
        for (k, p) in s["pair_routing"].as_object().unwrap() {
            let a = f(&p["apgr"]);
            assert!(a.is_finite() && a > -1.0 && a < 2.0, "{name} {k} apgr {a}");
            let c = &p["cpt50_pct"];
            assert!(c.is_null() || (0.0..=100.0).contains(&f(c)), "{name} {k}");
        }
        // Savings are relative to the best single model's cost: at most 100%.
        for (k, r) in s["cost_reduction_at_target"].as_object().unwrap() {
            let p = &r["saved_pct"];
            assert!(p.is_null() || f(p) <= 100.0, "{name} {k}");
        }
    }
}

/// `tiergate train` end to end on a small real slice: the heads it writes load, and carry the
/// defaults it learned on held-back prompts (the floor in its grid, the Verify threshold being
/// that floor's from the learned table), which the model card reports.
#[test]
fn train_learns_its_defaults_on_held_back_prompts() {
    let data = data_dir();
    let dir = tempfile::tempdir().unwrap();
    let heads_path = dir.path().join("heads.json");
    let card = dir.path().join("card.md");
    let o = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", "--data-dir"])
        .arg(&data)
        .args(["--max-prompts", "120", "--verify-rows", "800"])
        .args(["--verify-dev-rows", "300", "--steps", "60"])
        .arg("--out")
        .arg(&heads_path)
        .arg("--card")
        .arg(&card)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let h = tiergate::model::heads::Heads::load(&heads_path).unwrap();
    let floor = h.default_quality_floor.expect("a learned floor");
    assert!((0.30..=0.95).contains(&floor), "floor {floor}");
    assert!((h.default_verify_threshold - h.threshold_for(floor)).abs() < 1e-12);
    let d = &h.metrics["default_floor"];
    assert_eq!(d["floor"].as_f64(), Some(floor));
    // Learned, not the fallback: the held-back prompts gave at least one source's tier.
    assert!(d.get("reason").is_none(), "{d}");
    assert!(!d["sources"].as_object().unwrap().is_empty(), "{d}");
    // The verifier fitted on out-of-fold router logits (the default 5 folds).
    assert!(stderr.contains("router without fold 5/5"), "{stderr}");
    let text = std::fs::read_to_string(&card).unwrap();
    assert!(text.contains("5 folds"), "{text}");
    assert!(
        text.contains(&format!("Default quality floor: {floor:.2} (learned)")),
        "{text}"
    );
}

/// Bad training flags fail before any data is read or encoded, naming the flag.
#[test]
fn bad_train_flags_fail_at_once_naming_the_flag() {
    for (flag, value) in [
        ("--verify-folds", "1"),
        ("--verify-tree-depth", "0"),
        ("--verify-tree-lr", "0"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["train", "--data-dir", "/nonexistent", flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flag} {value}");
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
}

/// `tiergate consensus` on all dev rows: a probe set where answers carry a final answer
/// (MMLU-Pro, RouterBench), none on free-text chat (AlpacaEval), and the in-sample figures
/// recomputed here from the rows with the gateway's own rule (`decide::consensus`).
#[test]
fn consensus_suggests_probe_sets_and_pays_for_every_call() {
    let data = data_dir().join("dev.jsonl.gz");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("consensus.json");
    let o = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["consensus", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let reports = v.as_array().unwrap();
    let by = |s: &str| reports.iter().find(|r| r["source"] == s).unwrap();
    assert_eq!(reports.len(), 3);
    let alpaca = by("alpaca_eval2_wgpt4t");
    assert!(alpaca["in_sample"]["pick"].is_null(), "{alpaca}");
    assert_eq!(alpaca["cross_fitted_saving"], 0.0);

    let rows = tiergate::eval::data::read_rows(&data).unwrap();
    for src in ["mmlu_pro", "routerbench_0shot"] {
        let r = by(src);
        let pick = &r["in_sample"]["pick"];
        let models: Vec<&str> = pick["models"]
            .as_array()
            .unwrap_or_else(|| panic!("{src}: no pick: {r}"))
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        let agree = pick["agree"].as_u64().unwrap() as usize;
        assert!((2..=4).contains(&models.len()) && (2..=models.len()).contains(&agree));
        assert!(stdout.contains(&format!("consensus = {{ models = [\"{}\"", models[0])));
        // Replay the pick over the source's prompts: probes paid for, the best model on
        // disagreement.
        let best = r["best_model"].as_str().unwrap();
        let mut per: std::collections::BTreeMap<&str, Vec<&tiergate::eval::data::Row>> =
            Default::default();
        for row in rows.iter().filter(|x| x.source == src) {
            per.entry(&row.prompt_id).or_default().push(row);
        }
        let (mut cost, mut qual, mut best_cost, mut best_qual, mut n) = (0.0, 0.0, 0.0, 0.0, 0);
        for ps in per.values() {
            let get = |m: &str| ps.iter().find(|x| x.model == m);
            let Some(b) = get(best) else { continue };
            let probes: Vec<_> = models.iter().map(|m| get(m)).collect();
            let answers: Vec<Option<&str>> = probes
                .iter()
                .map(|p| p.and_then(|p| p.response.as_deref()))
                .collect();
            let paid: f64 = probes.iter().flatten().map(|p| p.cost_usd.unwrap()).sum();
            let prompt = &ps[0].prompt;
            match tiergate::service::decide::consensus(prompt, &answers, agree) {
                Some(i) => {
                    cost += paid;
                    qual += probes[i].unwrap().score.unwrap();
                }
                None => {
                    cost += paid + b.cost_usd.unwrap();
                    qual += b.score.unwrap();
                }
            }
            best_cost += b.cost_usd.unwrap();
            best_qual += b.score.unwrap();
            n += 1;
        }
        assert!(n > 300, "{src}: {n} prompts");
        let saving = 1.0 - cost / best_cost;
        let ratio = qual / best_qual;
        let got = &r["in_sample"];
        assert!(
            (got["saving"].as_f64().unwrap() - saving).abs() < 1e-9,
            "{src}: {got} vs {saving}"
        );
        assert!((got["quality_ratio"].as_f64().unwrap() - ratio).abs() < 1e-9);
        assert!(saving > 0.0 && ratio >= 0.98, "{src}: {saving} at {ratio}");
    }
}

/// `eval` and `consensus` refuse a row they cannot price or grade, naming it, rather than
/// replaying the rest as if it were not there.
#[test]
fn replays_refuse_a_row_without_a_score_or_cost() {
    let dir = tempfile::tempdir().unwrap();
    let row = |pid: &str, model: &str, extra: &str| {
        format!(
            r#"{{"source":"s","prompt_id":"{pid}","prompt":"2+2? A) 3 B) 4","model":"{model}","response":"B"{extra}}}"#
        )
    };
    for (bad, what) in [
        (row("p2", "m1", r#","cost_usd":0.001"#), "no score"),
        (row("p2", "m1", r#","score":1.0"#), "no cost"),
        (
            row("p2", "m1", r#","score":1.0,"cost_usd":-1"#),
            "a negative cost",
        ),
    ] {
        let data = dir.path().join("rows.jsonl");
        let good = [
            row("p1", "m1", r#","score":1.0,"cost_usd":0.001"#),
            row("p1", "m2", r#","score":1.0,"cost_usd":0.01"#),
        ];
        // A blank line between: errors name the file's line (4), not the row (3).
        std::fs::write(&data, format!("{}\n\n{}\n{bad}\n", good[0], good[1])).unwrap();
        for cmd in [
            vec!["consensus", "--data"],
            vec!["eval", "--out-dir", dir.path().to_str().unwrap(), "--data"],
        ] {
            let o = Command::new(env!("CARGO_BIN_EXE_tiergate"))
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .args(&cmd)
                .arg(&data)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{cmd:?} accepted a row with {what}");
            assert!(
                err.contains("line 4 (s/p2 m1)") && err.contains("needs a score"),
                "{cmd:?}, {what}: {err}"
            );
        }
    }
}
