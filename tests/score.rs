//! `tiergate score`, the evaluation interface: exact output shape and order, optional fields,
//! rows without a response, malformed lines, heads of another width than the encoder, and
//! run-time calibration of a model never seen.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// The first `n` dev rows (all models of the first prompts), as JSON values.
fn dev_rows(n: usize) -> Vec<Value> {
    let f =
        std::fs::File::open(data_dir().join("dev.jsonl.gz")).expect("../shared/data/dev.jsonl.gz");
    let r = std::io::BufReader::new(flate2::read::GzDecoder::new(f));
    use std::io::BufRead;
    r.lines()
        .take(n)
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let mut f = std::fs::File::create(path).unwrap();
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
}

fn score(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("score")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn read_out(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn score_writes_one_row_per_input_in_order_without_needing_labels() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = dev_rows(60);
    for r in rows.iter_mut() {
        let o = r.as_object_mut().unwrap();
        o.remove("score");
        o.remove("cost_usd");
        o.remove("extra");
    }
    rows[3]["response"] = Value::Null;
    rows[7].as_object_mut().unwrap().remove("response");
    rows[9]["response"] = Value::from("  \n");
    // Not blank to `trim`, but the tokenizer keeps nothing of it: Verify's empty answer.
    rows[11]["response"] = Value::from("\u{200b}\u{200b}\u{7}");
    // Text without a letter or a digit (punctuation, emoji): says nothing, as in Verify.
    rows[13]["response"] = Value::from("... —!?");
    rows[15]["response"] = Value::from("🙌😅🎉");
    let says_nothing = [9, 11, 13, 15];
    let input = dir.path().join("in.jsonl");
    write_jsonl(&input, &rows);
    let out = dir.path().join("out.jsonl");
    let o = score(&[
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("rows/s"));
    let got = read_out(&out);
    assert_eq!(got.len(), rows.len());
    for (i, (g, r)) in got.iter().zip(&rows).enumerate() {
        let keys: Vec<&str> = g.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys.len(), 6, "{g}");
        for k in ["source", "prompt_id", "model"] {
            assert_eq!(g[k], r[k], "{k} in order");
        }
        let pr = g["p_route"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&pr));
        if r.get("response").is_none_or(|v| v.is_null()) {
            assert!(g["p_verify"].is_null(), "no response → null: {g}");
        } else if says_nothing.contains(&i) {
            // As the server's Verify: a blank answer never ships.
            assert_eq!(g["p_verify"].as_f64(), Some(0.0), "blank → 0: {g}");
        } else {
            assert!((0.0..=1.0).contains(&g["p_verify"].as_f64().unwrap()));
        }
        // What the row's own answer commits to, or null.
        let fa = &g["final_answer"];
        assert!(
            fa.is_null()
                || fa
                    .as_str()
                    .is_some_and(|s| s.starts_with("option:") || s.starts_with("number:")),
            "{g}"
        );
    }
}

#[test]
fn a_malformed_line_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let rows = dev_rows(3);
    let input = dir.path().join("in.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    writeln!(f, "{}", rows[0]).unwrap();
    writeln!(f, "{}", rows[1]).unwrap();
    writeln!(f, "{{\"prompt\": \"truncated").unwrap();
    drop(f);
    let out = dir.path().join("out.jsonl");
    let o = score(&[
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 3"), "{err}");
    assert!(!out.exists(), "no partial output");
    // A row without a model is refused at reading, naming its line (not after the encoder).
    let mut rows = dev_rows(3);
    rows[1]["model"] = Value::from("");
    write_jsonl(&input, &rows);
    let o = score(&[
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("line 2: model is empty"),
        "{err}"
    );
    // A path that cannot be read as data is named.
    let d = dir.path().to_str().unwrap();
    let o = score(&["--data", d, "--out", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(d), "{err}");
}

#[test]
fn calibration_fits_a_model_never_seen_in_training() {
    // Rename a real dev model to a name the heads have never seen; calibrate on half of its
    // prompts, score the other half. The fitted model must rank its outcomes better than the
    // population prior it starts from, on prompts it was not calibrated on.
    let all = dev_rows(22381);
    let model = "gemini-1.5-flash-002";
    let mut mine: Vec<Value> = all.into_iter().filter(|r| r["model"] == model).collect();
    assert!(mine.len() > 300, "{} rows", mine.len());
    mine.truncate(300);
    for r in mine.iter_mut() {
        r["model"] = Value::String("brand-new-model".into());
    }
    // Interleaved halves: the same mix of prompts on both sides.
    let calib: Vec<Value> = mine.iter().step_by(2).cloned().collect();
    let test: Vec<Value> = mine.iter().skip(1).step_by(2).cloned().collect();
    let (calib, test) = (&calib[..], &test[..]);
    let dir = tempfile::tempdir().unwrap();
    let (cp, tp) = (
        dir.path().join("calib.jsonl"),
        dir.path().join("test.jsonl"),
    );
    write_jsonl(&cp, calib);
    write_jsonl(&tp, test);
    let (o1, o2) = (dir.path().join("o1.jsonl"), dir.path().join("o2.jsonl"));
    let cache = dir.path().join("cache");
    let a = score(&[
        "--data",
        tp.to_str().unwrap(),
        "--out",
        o1.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = score(&[
        "--data",
        tp.to_str().unwrap(),
        "--out",
        o2.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--calibration",
        cp.to_str().unwrap(),
    ]);
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let y: Vec<f64> = test.iter().map(|r| r["score"].as_f64().unwrap()).collect();
    let base_rate = y.iter().sum::<f64>() / y.len() as f64;
    let mean = |rows: &[Value]| {
        rows.iter()
            .map(|r| r["p_route"].as_f64().unwrap())
            .sum::<f64>()
            / rows.len() as f64
    };
    let (before, after) = (read_out(&o1), read_out(&o2));
    let (m1, m2) = (mean(&before), mean(&after));
    // Calibration moves the mean prediction towards the model's real pass rate.
    assert!(
        (m2 - base_rate).abs() < (m1 - base_rate).abs(),
        "prior {m1:.3}, calibrated {m2:.3}, truth {base_rate:.3}"
    );
    assert!(
        (m2 - base_rate).abs() < 0.1,
        "calibrated mean {m2:.3} vs pass rate {base_rate:.3}"
    );
}

#[test]
fn calibration_frees_a_known_models_level_when_its_traffic_differs() {
    // A known strong model's name on a weak model's answers: traffic where a model the heads
    // know passes far less often than in training (a new task). Calibration must choose to
    // free its level, and land near its real pass rate on prompts it did not see; the same
    // rows under their own name (traffic like training) too.
    let all = dev_rows(22381);
    let (weak, strong) = ("Llama-2-7b-hf", "gemini-1.5-pro-002");
    let mine: Vec<Value> = all
        .into_iter()
        .filter(|r| r["model"] == weak)
        .take(400)
        .collect();
    assert!(mine.len() == 400, "{} rows", mine.len());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    for (name, renamed) in [(strong, true), (weak, false)] {
        let rows: Vec<Value> = mine
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r["model"] = Value::String(name.into());
                r
            })
            .collect();
        let calib: Vec<Value> = rows.iter().step_by(2).cloned().collect();
        let test: Vec<Value> = rows.iter().skip(1).step_by(2).cloned().collect();
        let (cp, tp, out) = (
            dir.path().join("calib.jsonl"),
            dir.path().join("test.jsonl"),
            dir.path().join("out.jsonl"),
        );
        write_jsonl(&cp, &calib);
        write_jsonl(&tp, &test);
        let o = score(&[
            "--data",
            tp.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--calibration",
            cp.to_str().unwrap(),
            "--no-memory",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        let report = err
            .lines()
            .find_map(|l| l.strip_prefix("calibration: "))
            .and_then(|l| l.split_once("; "))
            .map(|(_, json)| json)
            .unwrap_or_else(|| panic!("no calibration report: {err}"));
        let report: Value = serde_json::from_str(report).unwrap();
        let truth = test
            .iter()
            .map(|r| r["score"].as_f64().unwrap())
            .sum::<f64>()
            / 200.0;
        let got = read_out(&out);
        let mean = got
            .iter()
            .map(|r| r["p_route"].as_f64().unwrap())
            .sum::<f64>()
            / 200.0;
        assert!(
            (mean - truth).abs() < 0.06,
            "{name}: calibrated mean p {mean:.3} vs pass rate {truth:.3}"
        );
        // Held-out fifths of 200 prompts may prefer a milder pull on known traffic too;
        // the renamed model must have its level freed.
        let chosen = &report["known_pull"]["chosen"];
        if renamed {
            assert!(
                matches!(chosen[1].as_f64(), Some(l) if l < 20.0),
                "{name}: {chosen}"
            );
        }
    }
}

/// Heads of another embedding width than the encoder's are a clear error in `score` and
/// `calibrate` alike, before any row is embedded (calibrate used to read the heads' vectors
/// out of bounds and panic).
#[test]
fn heads_of_another_width_are_refused_by_the_offline_tools() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut h: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("models/heads.json")).unwrap())
            .unwrap();
    // A consistent heads file of width 8: every vector resized, trees dropped.
    let dim = 8;
    let k = h["router"]["k"].as_u64().unwrap() as usize;
    h["dim"] = dim.into();
    h["router"]["proj"] = vec![0.0; k * dim].into();
    h["router"]["easiness"]["w"] = vec![0.0; dim].into();
    h["verifier"]["head"]["w"] = vec![0.0; tiergate::model::heads::verify_dim(dim)].into();
    h["verifier"].as_object_mut().unwrap().remove("trees");
    let heads = dir.path().join("heads8.json");
    std::fs::write(&heads, h.to_string()).unwrap();
    tiergate::model::Heads::load(&heads).expect("a valid heads file of width 8");

    let data = dir.path().join("rows.jsonl");
    write_jsonl(&data, &dev_rows(20));
    let out = dir.path().join("out.jsonl");
    let (h8, d, o) = (
        heads.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    for args in [
        vec!["score", "--heads", h8, "--data", d, "--out", o],
        vec!["calibrate", "--heads", h8, "--data", d, "--out", o],
    ] {
        let r = Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .current_dir(root)
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{args:?}");
        assert!(
            err.contains("heads have dim 8 but the encoder") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }

    // The same width, another encoder revision: every offline tool says so.
    let mut h: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("models/heads.json")).unwrap())
            .unwrap();
    h["encoder_revision"] = "0000000000000000000000000000000000000000".into();
    let other = dir.path().join("heads-other-encoder.json");
    std::fs::write(&other, h.to_string()).unwrap();
    let o = score(&["--heads", other.to_str().unwrap(), "--data", d, "--out", o]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("was fitted on encoder 0000"), "{err}");
}

/// The interface's promise: a row's p_route depends on its prompt and model only, its
/// p_verify on its own prompt, model and response only (plus what `--calibration` taught),
/// never on the other rows of `--data` (which may hold stronger models' answers to the same
/// prompt). Rows scored alone get exactly the p they get among the others, with and without
/// calibration.
#[test]
fn a_rows_p_does_not_depend_on_the_other_rows() {
    let dir = tempfile::tempdir().unwrap();
    let all = dev_rows(240);
    let (rows, calib) = all.split_at(60);
    let calib_path = dir.path().join("calib.jsonl");
    write_jsonl(&calib_path, calib);
    let run = |name: &str, rows: &[Value], calibrated: bool| -> Vec<Value> {
        let input = dir.path().join(format!("{name}.jsonl"));
        let out = dir.path().join(format!("{name}.out.jsonl"));
        write_jsonl(&input, rows);
        let mut args = vec![
            "--data".to_string(),
            input.to_str().unwrap().to_string(),
            "--out".to_string(),
            out.to_str().unwrap().to_string(),
        ];
        if calibrated {
            args.extend(["--calibration".into(), calib_path.to_str().unwrap().into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = score(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_out(&out)
    };
    for calibrated in [false, true] {
        let together = run("together", rows, calibrated);
        // The last rows, then a row of the first prompt (its other models absent).
        for i in [59usize, 58, 3] {
            let alone = run(&format!("alone{i}"), &rows[i..=i], calibrated);
            for k in ["p_route", "p_verify"] {
                assert_eq!(
                    alone[0][k], together[i][k],
                    "row {i} {k} (calibrated: {calibrated}) changed with the other rows"
                );
            }
        }
    }
}
