//! Admission by expected wait and priority, on the real server binary on loopback. The fault
//! backend's `slow:<ms>` mode makes each batch take a known time, so queues and waits are
//! deterministic; no assertion is on timing.
mod common;

use std::time::{Duration, Instant};

use common::fault::{route_req, Faulty};
use tiergate::proto;
use tonic::Code;

fn with_priority(mut r: proto::RouteRequest, p: proto::Priority) -> proto::RouteRequest {
    r.priority = p as i32;
    r
}

/// Polls /metrics until the batch queue holds `n` requests.
async fn queue_reaches(f: &Faulty, n: f64) {
    let t0 = Instant::now();
    while f.metric("tiergate_queue_depth", &[]) < n {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the queue never reached {n}: {}",
            f.srv
                .metrics_text()
                .lines()
                .filter(|l| l.starts_with("tiergate_") && !l.contains("_bucket"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// LOW work fills the queue; a HIGH request is still admitted, taking the place of the newest
/// LOW one, which is told so (RESOURCE_EXHAUSTED with pushback), never left unanswered. The
/// backend hangs meanwhile (under the watchdog's 10 s), so the queue stays full on cue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_displaces_queued_low_work_from_a_full_queue() {
    let f = Faulty::start(
        &[("max_queue_delay_ms = 5000", "max_queue_delay_ms = 0")],
        &["--max-queue", "4", "--max-batch-requests", "1"],
        &[],
    )
    .await;
    f.set("hang");
    let c = f.srv.client().await;
    // LOW requests a little apart (so the batch-forming thread takes the first few off the
    // queue: one hung on the backend, one handed over, one formed) until 4 wait in the queue;
    // then two more, refused as the queue is full.
    let send_low = |i: usize| {
        let mut c = c.clone();
        tokio::spawn(async move {
            c.route(with_priority(route_req(i, 20), proto::Priority::Low))
                .await
        })
    };
    let mut low = Vec::new();
    for i in 0..40 {
        if f.metric("tiergate_queue_depth", &[]) >= 4.0 {
            break;
        }
        low.push(send_low(i));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    queue_reaches(&f, 4.0).await;
    for i in 40..42 {
        low.push(send_low(i));
    }
    let mut c2 = c.clone();
    let high = tokio::spawn(async move {
        c2.route(with_priority(route_req(100, 20), proto::Priority::High))
            .await
    });
    let t0 = Instant::now();
    while f.metric(
        "tiergate_dropped_before_compute_total",
        &[("reason", "displaced")],
    ) < 1.0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "HIGH displaced nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.set("ok");
    let high = common::within("the HIGH request", high)
        .await
        .expect("task");
    assert!(
        high.is_ok(),
        "HIGH refused from a queue full of LOW: {high:?}"
    );
    let (mut ok, mut displaced, mut full) = (0, 0, 0);
    for t in low {
        match tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a LOW request was never answered")
            .expect("task")
        {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.metadata().get("grpc-retry-pushback-ms").is_some());
                if s.message().contains("displaced") {
                    displaced += 1;
                } else {
                    full += 1;
                }
            }
            Err(s) => panic!("LOW got {s:?}"),
        }
    }
    assert_eq!(displaced, 1, "exactly one LOW request made room");
    assert!(
        full >= 2,
        "LOW requests overflowed a full queue of 4 ({full})"
    );
    assert!(ok >= 4, "admitted LOW work is computed ({ok} ok)");
}

/// Once batches are measured slow, a request whose deadline is nearer than the expected wait
/// of the queue ahead of it is refused at once (RESOURCE_EXHAUSTED, not DEADLINE_EXCEEDED
/// after waiting); the configured maximum refuses one with no deadline the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_start_before_its_deadline_is_refused_at_once() {
    let f = Faulty::start(
        &[("max_queue_delay_ms = 5000", "max_queue_delay_ms = 3000")],
        &["--max-batch-requests", "1"],
        &[],
    )
    .await;
    f.set("slow:500");
    // Two batches of ~100 tokens at 0.5 s each teach the batcher the time per token.
    for i in 0..2 {
        assert!(f.route_words(i, 100).await.is_ok());
    }
    let c = f.srv.client().await;
    let mut fillers = Vec::new();
    // One batch on the backend, one handed over, one formed and waiting: the rest queue.
    for i in 10..15 {
        let mut c = c.clone();
        fillers.push(tokio::spawn(
            async move { c.route(route_req(i, 100)).await },
        ));
    }
    queue_reaches(&f, 2.0).await;
    let mut req = tonic::Request::new(route_req(50, 10));
    req.set_timeout(Duration::from_millis(800));
    let mut c2 = c.clone();
    let e = c2.route(req).await.expect_err("admitted past its deadline");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("deadline"), "{}", e.message());
    assert!(e.metadata().get("grpc-retry-pushback-ms").is_some());
    // Batches of 0.5 s for ~100 tokens: more queued than 3 s of work refuses even a request
    // without a deadline (batch.max_queue_delay_ms).
    let mut more = Vec::new();
    for i in 20..30 {
        let mut c = c.clone();
        more.push(tokio::spawn(
            async move { c.route(route_req(i, 100)).await },
        ));
    }
    let mut refused_for_delay = 0;
    for t in fillers.into_iter().chain(more) {
        match common::within("a queued Route", t).await.expect("task") {
            Ok(_) => {}
            Err(s) if s.code() == Code::ResourceExhausted => {
                refused_for_delay += s.message().contains("max_queue_delay_ms") as usize
            }
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert!(
        refused_for_delay > 0,
        "15 x 0.5 s of work never exceeded 3 s"
    );
    let m = f.srv.metrics_text();
    assert!(m.contains("reason=\"deadline_wait\""), "{m}");
    assert!(m.contains("reason=\"queue_delay\""), "{m}");
}
