//! Hot reload against the real server: SIGHUP and Admin/Reload swap the catalog and policy in
//! whole while requests keep flowing (none fails), a bad file is refused with an error naming
//! it and the previous state keeps serving, and the reply's revision names what decided it.
mod common;

use std::path::Path;
use std::time::Duration;

use tiergate::proto::{self, admin_client::AdminClient, route_request::Input};

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_reload_swap_state_without_failing_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("tiergate.toml");
    let base = tiergate::config::EMBEDDED_DEFAULT.to_string();
    write(&cfg, &base);
    let server = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    server.ready().await;
    let mut c = server.client().await;
    let info = |c: &mut proto::router_client::RouterClient<_>| {
        let mut c = c.clone();
        async move {
            c.info(proto::InfoRequest {})
                .await
                .expect("info")
                .into_inner()
        }
    };
    assert_eq!(info(&mut c).await.catalog.len(), 6);

    // Traffic through all the reloads below: every request must succeed.
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let done = std::sync::Arc::new(AtomicU32::new(0));
    let load = {
        let (c, stop, done) = (c.clone(), stop.clone(), done.clone());
        tokio::spawn(async move {
            let mut ok = 0u32;
            while !stop.load(Ordering::Acquire) {
                let mut c = c.clone();
                let r = c
                    .route(proto::RouteRequest {
                        input: Some(Input::Prompt(format!("What is {ok} + {ok}?"))),
                        ..Default::default()
                    })
                    .await;
                assert!(r.is_ok(), "request {ok} failed during reloads: {r:?}");
                ok += 1;
                done.store(ok, Ordering::Release);
            }
            ok
        })
    };

    // Requests flow before the first reload and after the last (below).
    let flowing = |at_least: u32| {
        let done = done.clone();
        async move {
            for _ in 0..600 {
                if done.load(Ordering::Acquire) >= at_least {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the request loop stalled");
        }
    };
    flowing(3).await;

    // 1. SIGHUP with a new catalog entry and another default relative floor.
    let grown = base.replace("relative_floor = 0.94", "relative_floor = 0.8")
        + "\n[[catalog]]\nmodel = \"acme-small\"\nin_usd_per_mtok = 0.05\nout_usd_per_mtok = 0.1\nlike = \"gemini-1.5-flash-002\"\n";
    write(&cfg, &grown);
    server.sighup();
    let mut seen = false;
    for _ in 0..100 {
        let i = info(&mut c).await;
        if i.catalog.len() == 7 {
            assert!((i.default_relative_floor - 0.8).abs() < 1e-12);
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "SIGHUP did not reload the catalog");

    // 2. A bad file: refused, named, and the old state keeps serving.
    let bad = grown.replace(
        "like = \"gemini-1.5-flash-002\"\n",
        "like = \"no-such-model\"\n",
    );
    write(&cfg, &bad);
    let mut admin = AdminClient::new(server.channel().await);
    let e = admin
        .reload(proto::ReloadRequest {})
        .await
        .expect_err("a bad catalog must be refused");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("no-such-model"), "{}", e.message());
    assert_eq!(info(&mut c).await.catalog.len(), 7);

    // 3. A setting only a restart can change is refused too.
    write(&cfg, &grown.replace("max_queue = 1024", "max_queue = 10"));
    let e = admin
        .reload(proto::ReloadRequest {})
        .await
        .expect_err("restart-only");
    assert!(e.message().contains("batch"), "{}", e.message());
    // So is turning the gateway's HTTP front on (a listener is bound only at start).
    write(
        &cfg,
        &format!("{grown}\n[gateway]\nhttp_listen = \"127.0.0.1:0\"\n"),
    );
    let e = admin
        .reload(proto::ReloadRequest {})
        .await
        .expect_err("restart-only");
    assert!(
        e.message().contains("gateway.http_listen"),
        "{}",
        e.message()
    );
    // And the front's concurrency limit (its semaphore is sized at start).
    write(
        &cfg,
        &format!(
            "{grown}
[gateway]
max_concurrent = 8
"
        ),
    );
    let e = admin
        .reload(proto::ReloadRequest {})
        .await
        .expect_err("restart-only");
    assert!(
        e.message().contains("gateway.max_concurrent"),
        "{}",
        e.message()
    );

    // And what is set up once at start: feedback's journal and re-fit task (turned on by a
    // reload it would accept outcomes with no journal behind them), the tokens, the drain.
    write(&dir.path().join("tokens"), "reload-test-token-0123456789\n");
    for (changed, key) in [
        (
            format!(
                "{grown}\n[feedback]\noverlay = \"{}\"\n",
                dir.path().join("fb.json").display()
            ),
            "feedback.overlay",
        ),
        (
            format!(
                "{grown}\n[auth]\ntokens_file = \"{}\"\n",
                dir.path().join("tokens").display()
            ),
            "auth",
        ),
        (grown.replace("timeout_s = 25 ", "timeout_s = 3 "), "drain"),
    ] {
        assert_ne!(changed, grown, "{key}: the test's edit did not apply");
        write(&cfg, &changed);
        let e = admin
            .reload(proto::ReloadRequest {})
            .await
            .expect_err("restart-only");
        assert!(e.message().contains(key), "{key}: {}", e.message());
    }

    // 4. Back to the original by the RPC; the revision names what decides.
    write(&cfg, &base);
    let rev = admin
        .reload(proto::ReloadRequest {})
        .await
        .expect("reload")
        .into_inner()
        .revision;
    assert_eq!(info(&mut c).await.catalog.len(), 6);
    let r = c
        .route(proto::RouteRequest {
            input: Some(Input::Prompt("hello".into())),
            ..Default::default()
        })
        .await
        .expect("route")
        .into_inner();
    assert_eq!(r.revision, rev);
    flowing(done.load(Ordering::Acquire) + 3).await;
    stop.store(true, Ordering::Release);
    let served = common::within("the request loop", load)
        .await
        .expect("no request failed during the reloads");
    assert!(served >= 6, "{served}");
    let m = server.metrics_text();
    assert!(
        m.contains("tiergate_reloads_total{result=\"applied\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("tiergate_reloads_total{result=\"rejected\"} 7"),
        "{m}"
    );
}

/// Reloads asked for at once run one at a time: while one runs, the others are refused at once
/// (ABORTED, retry after it) instead of each queueing a blocking thread a cancel cannot stop;
/// the ones that ran applied, and the count of applied reloads says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_asked_at_once_run_one_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("tiergate.toml");
    write(&cfg, tiergate::config::EMBEDDED_DEFAULT);
    let server = common::Server::spawn(&["--config", cfg.to_str().expect("utf-8")]);
    server.ready().await;
    let admin = AdminClient::new(server.channel().await);
    let calls = (0..32).map(|_| {
        let mut a = admin.clone();
        async move { a.reload(proto::ReloadRequest {}).await }
    });
    let results = common::within("32 reloads", futures::future::join_all(calls)).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let aborted = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == tonic::Code::Aborted))
        .count();
    assert_eq!(ok + aborted, 32, "{results:?}");
    assert!(ok >= 1 && aborted >= 1, "{ok} applied, {aborted} refused");
    let m = server.metrics_text();
    assert!(
        m.contains(&format!(
            "tiergate_reloads_total{{result=\"applied\"}} {ok}"
        )),
        "{m}"
    );
}
