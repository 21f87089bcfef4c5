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
