//! SIGTERM as Kubernetes sends it, on the real server binary on loopback: health goes
//! NOT_SERVING on every service first, the listener keeps serving through the lame duck, then
//! closes; accepted work finishes, or is answered UNAVAILABLE once drain.timeout_s has passed,
//! and the process exits even with a hung backend.
mod common;

use std::time::{Duration, Instant};

use common::fault::{route_req, Faulty};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// An open-loop client (a request every 20 ms, each on its own task, whatever the answers)
/// across the signal: nothing started before it fails, nor anything started well inside the
/// lame duck; every service reads NOT_SERVING while requests are still served; after the lame
/// duck new requests are refused and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_goes_not_serving_first_and_serves_through_the_lame_duck() {
    // A 4 s lame duck: the windows below keep 2.5 s and 1 s of slack from its edge for a
    // loaded 2-core box (the client's scheduling, the server's reaction to the signal).
    let mut f = Faulty::start(&[], &[], &[("TIERGATE_DRAIN_LAME_DUCK_S", "4")]).await;
    let c = f.srv.client().await;
    let t0 = Instant::now();
    let signal_at = Duration::from_millis(1000);
    let stop_at = Duration::from_millis(6500);
    let sender = tokio::spawn(async move {
        let mut tasks = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut i = 0;
        while t0.elapsed() < stop_at {
            tick.tick().await;
            let mut c = c.clone();
            let started = t0.elapsed();
            i += 1;
            tasks.push((
                started,
                tokio::spawn(async move {
                    tokio::time::timeout(Duration::from_secs(30), c.route(route_req(i, 20)))
                        .await
                        .map(|r| r.map(|_| ()))
                }),
            ));
        }
        tasks
    });
    tokio::time::sleep_until((t0 + signal_at).into()).await;
    f.srv.sigterm();
    let signalled = t0.elapsed();
    // Within the lame duck: every service NOT_SERVING (on fresh connections, still accepted).
    let mut seen = false;
    while t0.elapsed() < signalled + Duration::from_millis(1500) {
        let mut all = true;
        for s in ["", "tiergate.v1.Router", "tiergate.v1.Admin"] {
            all &= f.srv.health(s).await == ServingStatus::NotServing;
        }
        if all {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen,
        "health did not go NOT_SERVING on every service in the lame duck"
    );
    let tasks = sender.await.expect("sender");
    let (mut before, mut during, mut after_refused) = (0, 0, 0);
    for (started, t) in tasks {
        let r = t.await.expect("task").expect("a request hung");
        if started < signalled {
            assert!(r.is_ok(), "started {started:?} before the signal: {r:?}");
            before += 1;
        } else if started < signalled + Duration::from_millis(1500) {
            // Well inside the 4 s lame duck: the listener still serves.
            assert!(r.is_ok(), "started {started:?} in the lame duck: {r:?}");
            during += 1;
        } else if started > signalled + Duration::from_millis(5000) {
            match r {
                Err(s) => {
                    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                    after_refused += 1;
                }
                Ok(()) => panic!("started {started:?}, after the lame duck, was served"),
            }
        }
    }
    assert!(
        before > 10 && during > 10,
        "{before} before, {during} during"
    );
    assert!(after_refused > 0, "nothing was sent after the lame duck");
    let st = f.srv.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "exit status {st}");
}

/// A hung backend with no watchdog: the drain waits drain.timeout_s (2 s) for the accepted
/// requests, then answers them UNAVAILABLE and the process exits 0, well before the pod's
/// grace period would have killed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_cannot_hold_the_drain_past_its_bound() {
    let mut f = Faulty::start(
        &[("batch_watchdog_s = 10", "batch_watchdog_s = 0")],
        &["--max-batch-requests", "1"],
        &[("TIERGATE_DRAIN_TIMEOUT_S", "2")],
    )
    .await;
    f.set("hang");
    let c = f.srv.client().await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { c.route(route_req(i, 20)).await }));
    }
    // All four accepted: one hung on the backend, one handed over, one formed and waiting to
    // be, and the fourth in the queue.
    let t0 = Instant::now();
    while f.metric("tiergate_queue_depth", &[]) < 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the requests never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Instant::now();
    f.srv.sigterm();
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a request outlived the drain bound")
            .expect("task");
        match r {
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
            Ok(_) => panic!("a request on a hung backend was answered OK"),
        }
    }
    let st = f.srv.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "exit status {st}");
    // Generous: lame duck 0 + drain 2 s + a few seconds of slack, far under 30.
    assert!(
        signalled.elapsed() < Duration::from_secs(15),
        "exit took {:?}",
        signalled.elapsed()
    );
}
