//! The binary's configuration surface: layering of file, env and flags, and start-up validation.
use std::process::Command;

fn tiergate(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tiergate"));
    c.current_dir(env!("CARGO_MANIFEST_DIR")).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn flags_and_env_override_the_embedded_default() {
    let o = tiergate(
        &["config", "--max-queue", "7"],
        &[("TIERGATE_QUALITY_FLOOR", "0.55")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("max_queue = 7"), "{text}");
    assert!(text.contains("quality_floor = 0.55"), "{text}");
    assert!(text.contains("claude-opus-4.8"));
}

#[test]
fn invalid_settings_fail_at_start_naming_the_key() {
    for (args, env, key) in [
        (
            vec!["config", "--quality-floor", "1.5"],
            vec![],
            "policy.quality_floor",
        ),
        (
            vec!["config", "--listen", "not-an-address"],
            vec![],
            "listen",
        ),
        (
            vec!["config"],
            vec![("TIERGATE_MAX_QUEUE", "0")],
            "batch.max_queue",
        ),
        (
            vec!["serve", "--max-input-tokens", "4096"],
            vec![],
            "batch.max_input_tokens",
        ),
        (
            vec!["config"],
            vec![("TIERGATE_INT8_KERNEL", "sse9")],
            "TIERGATE_INT8_KERNEL",
        ),
        (
            vec!["serve", "--config", "/nonexistent/tiergate.toml"],
            vec![],
            "/nonexistent/tiergate.toml",
        ),
    ] {
        let o = tiergate(&args, &env);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(key), "{args:?}: {err}");
    }
}

#[test]
fn a_config_file_is_read_and_unknown_keys_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let base =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tiergate.toml")).unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, base.replace("max_queue = 1024", "max_queue = 33")).unwrap();
    let o = tiergate(&["config", "--config", good.to_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("max_queue = 33"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, base.replace("[batch]", "[batch]\nmax_qeueu = 3")).unwrap();
    let o = tiergate(&["config", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("max_qeueu"));
}

/// A short file through the real loader: it changes what it names, keeps the default's other
/// keys (metrics on, the relative floor), turns the relative floor off with `false`, and what
/// `tiergate config` prints of it loads back to the same configuration.
#[test]
fn a_short_config_file_is_laid_over_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.toml");
    std::fs::write(&short, "[batch]\nmax_queue = 33\n").unwrap();
    let o = tiergate(&["config", "--config", short.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8_lossy(&o.stdout).to_string();
    for line in [
        "max_queue = 33",
        "metrics_listen = \"127.0.0.1:9464\"",
        "embedding_cache = 4096",
        "relative_floor = 0.94",
    ] {
        assert!(printed.contains(line), "{line} missing:\n{printed}");
    }

    let off = dir.path().join("off.toml");
    std::fs::write(&off, "[policy]\nrelative_floor = false\n").unwrap();
    let o = tiergate(&["config", "--config", off.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(printed.contains("relative_floor = false"), "{printed}");
    // Printed, then loaded again: still off.
    let again = dir.path().join("again.toml");
    std::fs::write(&again, &printed).unwrap();
    let o = tiergate(&["config", "--config", again.to_str().unwrap()], &[]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), printed);

    // A wrong type in a short file is named with its line in the file.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:7\"\n\n[batch]\nmax_queue = \"x\"\n",
    )
    .unwrap();
    let o = tiergate(&["config", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 4") && err.contains("max_queue"), "{err}");
}

/// `TIERGATE_INT8_KERNEL` picks the kernel and with it the weights' width and the numerics'
/// name: `avx2` runs 7-bit weights ("int8-w7"), the scalar reference 8-bit ("int8"), and the
/// embeddings differ a little, not in direction.
#[test]
fn the_int8_kernel_variable_sets_weight_width_and_numerics() {
    if !tiergate::model::int8::kernels().contains(&tiergate::model::int8::Kernel::Avx2) {
        return; // no AVX2 here: only the scalar kernel
    }
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.json");
    // [CLS] … [SEP] sequences of ordinary word-piece ids.
    let seqs: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            let mut s = vec![101];
            s.extend((0..20 + 7 * i).map(|j| 2000 + (j * 37 + i * 11) as u32 % 5000));
            s.push(102);
            s
        })
        .collect();
    let dump = serde_json::json!({ "source": "test", "max_tokens": 256, "seqs": seqs });
    std::fs::write(&ids, dump.to_string()).unwrap();
    let run = |kernel: &str| {
        let emb = dir.path().join(format!("{kernel}.f32"));
        let o = Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["bench-encoder", "--ids"])
            .arg(&ids)
            .args(["--precision", "int8", "--threads", "1", "--reps", "1"])
            .arg("--embeddings-out")
            .arg(&emb)
            .env("TIERGATE_INT8_KERNEL", kernel)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let bytes = std::fs::read(&emb).unwrap();
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (String::from_utf8_lossy(&o.stdout).into_owned(), v)
    };
    let (out7, e7) = run("avx2");
    let (out8, e8) = run("scalar");
    assert!(out7.contains("(int8-w7, int8 kernel avx2)"), "{out7}");
    assert!(out8.contains("(int8, int8 kernel scalar)"), "{out8}");
    assert_eq!(e7.len(), e8.len());
    assert_ne!(
        e7, e8,
        "7- and 8-bit weights must give different embeddings"
    );
    for (a, b) in e7.chunks(384).zip(e8.chunks(384)) {
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()
            / (a.iter().map(|x| x * x).sum::<f32>().sqrt()
                * b.iter().map(|y| y * y).sum::<f32>().sqrt());
        assert!(cos > 0.99, "cosine {cos}");
    }
}
