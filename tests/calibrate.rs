//! Onboarding a model from a labelled sample of one's own traffic: `tiergate calibrate` writes
//! an overlay; the real server applies it at start and routes the new model on it, with the
//! same p_pass `score --calibration` gives; the reply says `calibrated:<rows>`. Overlays that
//! do not fit the heads are start-up errors naming the file, never a partial state.
mod common;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tiergate::proto::{self, route_request::Input};

const NEW: &str = "acme-model-1";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Dev rows of one RouterBench model, renamed to a model the heads have never seen.
fn sample(n: usize) -> Vec<Value> {
    let f = std::fs::File::open(root().join("../shared/data/dev.jsonl.gz")).expect("dev");
    std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .map(|l| serde_json::from_str::<Value>(&l.expect("line")).expect("json"))
        .filter(|r| r["model"] == "claude-instant-v1")
        .take(n)
        .map(|mut r| {
            r["model"] = Value::from(NEW);
            r
        })
        .collect()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let mut f = std::fs::File::create(path).expect("create");
    for r in rows {
        writeln!(f, "{r}").expect("write");
    }
}

fn tiergate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .current_dir(root())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tiergate")
}

/// The command ran to success (its stderr otherwise).
fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("a file the command wrote");
    serde_json::from_str(&text).expect("json")
}

fn config_with(dir: &Path, overlay: &Path) -> PathBuf {
    let text = tiergate::config::EMBEDDED_DEFAULT.replace(
        "heads = \"models/heads.json\"",
        &format!(
            "heads = \"models/heads.json\"\noverlays = [{:?}]",
            overlay.display().to_string()
        ),
    ) + &format!(
        "\n[[catalog]]\nmodel = \"{NEW}\"\nin_usd_per_mtok = 0.1\nout_usd_per_mtok = 0.2\n"
    );
    let p = dir.join("tiergate.toml");
    std::fs::write(&p, text).expect("config");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrate_writes_an_overlay_the_server_routes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = sample(160);
    assert_eq!(rows.len(), 160);
    let (cal, test) = rows.split_at(150);
    let (cal_path, test_path) = (dir.path().join("cal.jsonl"), dir.path().join("test.jsonl"));
    write_jsonl(&cal_path, cal);
    write_jsonl(&test_path, test);
    let overlay = dir.path().join("overlay.json");
    let out = tiergate(&[
        "calibrate",
        "--data",
        cal_path.to_str().expect("utf-8"),
        "--out",
        overlay.to_str().expect("utf-8"),
    ]);
    succeeded(&out);
    let o = json_file(&overlay);
    assert_eq!(o["models"][NEW]["rows"], 150);
    // 150 answers are enough to re-learn Verify's per-floor thresholds on this traffic.
    let table: Vec<(f64, f64)> =
        serde_json::from_value(o["verify_thresholds"].clone()).expect("re-learned thresholds");
    tiergate::model::heads::check_thresholds(&table).expect("ascending pairs in [0, 1]");
    assert!(table.iter().any(|&(f, _)| f >= 0.8), "{table:?}");
    let heads = tiergate::model::Heads::load(&root().join("models/heads.json")).expect("heads");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Verify thresholds re-learned on 150"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same calibration through the evaluation interface, for the held-out rows.
    let scored = dir.path().join("scored.jsonl");
    let out = tiergate(&[
        "score",
        "--data",
        test_path.to_str().expect("utf-8"),
        "--calibration",
        cal_path.to_str().expect("utf-8"),
        "--out",
        scored.to_str().expect("utf-8"),
    ]);
    succeeded(&out);
    let offline: Vec<f64> = std::fs::read_to_string(&scored)
        .expect("scored")
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["p_route"]
                .as_f64()
                .expect("p")
        })
        .collect();

    let cfg = config_with(dir.path(), &overlay);
    let server = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    server.ready().await;
    let mut c = server.client().await;
    let info = server.info().await;
    let entry = info
        .catalog
        .iter()
        .find(|e| e.model == NEW)
        .expect("in Info");
    assert_eq!(entry.params, "calibrated:150");
    // The server's Verify reads the overlay's table: the default threshold is the default
    // floor's, and a requested floor maps through the same table.
    let floor = heads
        .default_quality_floor
        .unwrap_or(tiergate::model::heads::FALLBACK_FLOOR);
    let want = tiergate::model::heads::threshold_from(&table, floor);
    assert!(
        (info.default_verify_threshold - want).abs() < 1e-9,
        "{}",
        info.default_verify_threshold
    );
    let r = &test[0];
    let rep = c
        .verify(proto::VerifyRequest {
            prompt: r["prompt"].as_str().expect("prompt").into(),
            answer: r["response"].as_str().expect("response").into(),
            model: NEW.into(),
            policy: Some(proto::Policy {
                quality_floor: Some(0.9),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("verify")
        .into_inner();
    let want = tiergate::model::heads::threshold_from(&table, 0.9);
    assert!(
        (rep.threshold - want).abs() < 1e-9,
        "{} vs {want}",
        rep.threshold
    );
    for (r, want) in test.iter().zip(&offline) {
        let rep = c
            .route(proto::RouteRequest {
                input: Some(Input::Prompt(r["prompt"].as_str().expect("prompt").into())),
                candidates: vec![NEW.into(), "gemini-2.5-flash".into()],
                ..Default::default()
            })
            .await
            .expect("route")
            .into_inner();
        let s = rep
            .candidates
            .iter()
            .find(|s| s.model == NEW)
            .expect("candidate");
        assert_eq!(s.params, "calibrated:150");
        assert!((s.p_pass - want).abs() < 1e-4, "{} vs {want}", s.p_pass);
        assert_eq!(rep.revision.matches('+').count(), 2, "{}", rep.revision);
    }
}

#[test]
fn overlays_that_do_not_fit_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = tiergate::model::Heads::load(&root().join("models/heads.json"))
        .expect("heads")
        .router
        .k;
    let ability = |n: usize| serde_json::json!({ "u": vec![0.0; n], "b": 0.0 });
    let good = serde_json::json!({
        "format": 1,
        "heads_revision": "not-these-heads",
        "prior": ability(k),
        "models": { NEW: { "ability": ability(k), "rows": 10, "mean_output_tokens": 50 } },
    });
    let mut bad_shape = good.clone();
    bad_shape["heads_revision"] = tiergate::model::Heads::load(&root().join("models/heads.json"))
        .expect("heads")
        .revision
        .into();
    bad_shape["models"][NEW]["ability"] = ability(k + 1);
    for (o, why) in [(good, "heads_revision"), (bad_shape, "skills")] {
        let path = dir.path().join("overlay.json");
        std::fs::write(&path, o.to_string()).expect("write");
        let cfg = config_with(dir.path(), &path);
        let err = common::serve_refused(&cfg);
        assert!(err.contains("overlay.json") && err.contains(why), "{err}");
    }
}

/// `calibrate` recommends a Route floor from the labelled rows: candidates in cost order, the
/// best by mean score, a pick that kept the target on the rows it was picked on, each half's
/// pick measured on the other, and the served default beside it; rows without a cost leave
/// the recommendation out (a note), not the overlay.
#[test]
fn calibrate_recommends_a_floor_and_says_how_it_held() {
    const MODELS: [&str; 4] = [
        "mistralai/mistral-7b-chat",
        "mistralai/mixtral-8x7b-chat",
        "claude-instant-v1",
        "gpt-4-1106-preview",
    ];
    let f = std::fs::File::open(root().join("../shared/data/dev.jsonl.gz")).expect("dev");
    let rows: Vec<Value> = std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .map(|l| serde_json::from_str::<Value>(&l.expect("line")).expect("json"))
        .filter(|r| {
            r["source"] == "routerbench_0shot"
                && MODELS.contains(&r["model"].as_str().unwrap_or(""))
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("labelled.jsonl");
    write_jsonl(&data, &rows);
    let (overlay, rec) = (dir.path().join("o.json"), dir.path().join("rec.json"));
    let calibrate = |rec: &Path| {
        tiergate(&[
            "calibrate",
            "--data",
            data.to_str().unwrap(),
            "--out",
            overlay.to_str().unwrap(),
            "--recommend-out",
            rec.to_str().unwrap(),
        ])
    };
    let out = calibrate(&rec);
    let stdout = String::from_utf8_lossy(&out.stdout);
    succeeded(&out);
    let file = json_file(&rec);
    assert_eq!(file["format"], 1, "{file}");
    let v = &file["sources"];
    let r = &v[0];
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    // Candidates cheapest first by mean cost on the rows; the best by mean score.
    let mean = |m: &str, k: &str| {
        let xs: Vec<f64> = rows
            .iter()
            .filter(|x| x["model"] == m)
            .filter_map(|x| x[k].as_f64().or_else(|| x[k].as_str()?.parse().ok()))
            .collect();
        xs.iter().sum::<f64>() / xs.len() as f64
    };
    let cands: Vec<&str> = r["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(cands.len(), 4, "{r}");
    assert!(
        cands
            .windows(2)
            .all(|w| mean(w[0], "cost_usd") <= mean(w[1], "cost_usd")),
        "{cands:?}"
    );
    let best = MODELS
        .iter()
        .copied()
        .max_by(|a, b| mean(a, "score").total_cmp(&mean(b, "score")))
        .unwrap();
    assert_eq!(r["best"], best);
    let q = |o: &Value| o["quality"].as_f64().unwrap();
    // On these four models a floor pays (0.89 at the time of writing); it kept the target.
    assert!(!r["floor"].is_null(), "{r}");
    assert!(
        q(&r["in_sample"]) >= 0.98 && r["in_sample"]["saved"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    assert!(stdout.contains("recommended: [policy] "), "{stdout}");
    // Verify weighed beside Route alone: the pick says whether it verifies and which gateway
    // line goes with it; the best flow of the other kind, when one kept the target, is of the
    // other kind.
    let verify = r["verify"].as_str().expect("verify is a mode");
    let line = match verify {
        "always" => "[gateway] verify = \"always\": Verify every answer",
        "borderline" => {
            "[gateway] verify = \"borderline\": Verify where Route's pick is close and a pricier \
             model is rated above it"
        }
        "never" => "[gateway] verify = \"never\": Route's pick ships",
        other => panic!("verify = {other:?}"),
    };
    assert!(stdout.contains(line), "{stdout}");
    if !r["other"].is_null() {
        let other = r["other"][0]["verify"].as_str().expect("a mode");
        assert_eq!(other == "never", verify != "never", "{r}");
    }
    assert_eq!(r["crossed"].as_array().map(Vec::len), Some(2), "{r}");
    assert!(r["crossed"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| q(&c["held"]).is_finite()));
    // The served default: the embedded relative floor with the gateway's default Verify mode.
    assert_eq!(r["default"][0]["floor"]["relative_floor"], 0.94, "{r}");
    assert_eq!(r["default"][0]["verify"], "borderline", "{r}");
    assert!(
        stdout.contains("the default (relative_floor = 0.94, [gateway] verify = \"borderline\")"),
        "{stdout}"
    );

    // One row without a cost: the overlay is written, the recommendation is not.
    let mut stripped = rows.clone();
    stripped[0].as_object_mut().unwrap().remove("cost_usd");
    write_jsonl(&data, &stripped);
    let rec2 = dir.path().join("rec2.json");
    let out = calibrate(&rec2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no Route floor recommended: line 1 (")
            && stderr.contains("has no finite, non-negative cost_usd"),
        "{stderr}"
    );
    assert!(!rec2.exists());
}
