//! Faults while serving, on the real server binary on loopback with the fault-injecting
//! backend (src/engine/fault.rs: the CPU backend obeying a control file). Each case says what
//! the clients get, what health (every service) says, and that the server comes back. The
//! health limits here: 2 failed batches in a row, a 1 s watchdog.
mod common;

use common::fault::{config, Faulty};
use tiergate::proto;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const TRIP: &[(&str, &str)] = &[
    ("max_consecutive_faults = 3", "max_consecutive_faults = 2"),
    ("batch_watchdog_s = 10", "batch_watchdog_s = 1"),
];

fn code(r: &Result<proto::RouteReply, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_flip_health_and_a_probe_brings_it_back() {
    let f = Faulty::start(TRIP, &[], &[]).await;
    f.set("error");
    // Below the limit a failed batch is that batch's INTERNAL error; the second in a row
    // declares the backend faulty.
    for i in 0..2 {
        let r = f.route(i).await;
        assert_eq!(code(&r), Code::Internal, "{r:?}");
    }
    f.health_becomes(ServingStatus::NotServing).await;
    // Retryable elsewhere, answered at once.
    let r = f.route(2).await;
    assert_eq!(code(&r), Code::Unavailable, "{r:?}");
    assert!(f.metric("tiergate_backend_faults_total", &[("kind", "error")]) >= 2.0);
    assert_eq!(f.metric("tiergate_backend_healthy", &[]), 0.0);
    assert_eq!(f.metric("tiergate_serving", &[]), 0.0);
    // The backend recovers: the watchdog's probe batch notices without client traffic.
    f.set("ok");
    f.health_becomes(ServingStatus::Serving).await;
    assert!(f.route(3).await.is_ok());
    assert_eq!(f.metric("tiergate_backend_healthy", &[]), 1.0);
    assert_eq!(f.metric("tiergate_serving", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_backend_is_internal_for_its_batch_and_the_process_lives() {
    // The default 10 s watchdog: a panic's report may be slow on a loaded machine.
    let mut f = Faulty::start(&TRIP[..1], &[], &[]).await;
    f.set("panic");
    let r = f.route(0).await;
    assert_eq!(code(&r), Code::Internal, "{r:?}");
    assert!(r.unwrap_err().message().contains("panicked"));
    f.set("ok");
    assert!(
        f.route(1).await.is_ok(),
        "the server serves on after a panic"
    );
    assert!(f.srv.child_alive(), "the process is up");
    assert_eq!(
        f.metric("tiergate_backend_faults_total", &[("kind", "panic")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_batch_is_answered_unavailable_by_the_watchdog() {
    let f = Faulty::start(TRIP, &[], &[]).await;
    f.set("hang");
    // No deadline on the request: only the watchdog (1 s) can answer it.
    let r = f.route(0).await;
    assert_eq!(code(&r), Code::Unavailable, "{r:?}");
    f.health_becomes(ServingStatus::NotServing).await;
    assert_eq!(code(&f.route(1).await), Code::Unavailable);
    assert!(f.metric("tiergate_backend_faults_total", &[("kind", "hang")]) >= 1.0);
    // The batch ends once the device does; its success brings health back.
    f.set("ok");
    f.health_becomes(ServingStatus::Serving).await;
    assert!(f.route(2).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_under_the_watchdog_still_answers_and_stays_serving() {
    let f = Faulty::start(TRIP, &[], &[]).await;
    f.set("slow:300");
    for i in 0..3 {
        let r = f.route(i).await;
        assert!(r.is_ok(), "{r:?}");
    }
    for s in ["", "tiergate.v1.Router"] {
        assert_eq!(f.srv.health(s).await, ServingStatus::Serving);
    }
    assert_eq!(f.metric("tiergate_backend_faults_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_output_is_internal_never_a_p_pass() {
    let f = Faulty::start(TRIP, &[], &[]).await;
    f.set("nan");
    let r = f.route(0).await;
    assert_eq!(code(&r), Code::Internal, "{r:?}");
    assert!(r.unwrap_err().message().contains("non-finite"));
    assert_eq!(
        f.metric("tiergate_backend_faults_total", &[("kind", "nan")]),
        1.0
    );
    f.set("ok");
    let r = f.route(1).await.expect("route");
    assert!(!r.candidates.is_empty());
    assert!(r.candidates.iter().all(|c| c.p_pass.is_finite()));
}

/// `backend = auto` keeps the CPU as the fallback for CUDA failing while serving; the fault
/// backend gets the same with TIERGATE_FAULT_FALLBACK=cpu, so this runs without a GPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_falls_back_to_the_cpu_at_run_time() {
    let f = Faulty::start(TRIP, &[], &[("TIERGATE_FAULT_FALLBACK", "cpu")]).await;
    assert_eq!(f.srv.info().await.backend, "fault");
    f.set("error");
    assert_eq!(code(&f.route(0).await), Code::Internal);
    // The second failure in a row swaps the CPU in, and the batch runs again there.
    let r = f.route(1).await;
    assert!(r.is_ok(), "{r:?}");
    assert!(
        f.route(2).await.is_ok(),
        "the fault backend is out of the path"
    );
    assert_eq!(f.srv.info().await.backend, "cpu");
    assert_eq!(f.srv.health("").await, ServingStatus::Serving);
    assert_eq!(
        f.metric(
            "tiergate_backend_fallback_total",
            &[("reason", "runtime_fault")]
        ),
        1.0
    );
}

/// `backend = "fault"` is refused unless the environment names the control file: a config
/// file alone cannot switch fault injection on.
#[test]
fn the_fault_backend_needs_its_environment_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &[("backend = \"auto\"", "backend = \"fault\"")]);
    let err = common::serve_refused(&cfg);
    assert!(err.contains("TIERGATE_FAULT_INJECTION"), "{err}");
}

/// Requests whose future is dropped unfinished (the client gave up; tonic's grpc-timeout
/// fired) are still counted, with their time: the slowest requests must not vanish from
/// tiergate_requests_total and the latency histogram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_are_counted() {
    let f = Faulty::start(&TRIP[..1], &[], &[]).await;
    f.set("slow:1500");
    let mut c = f.srv.client().await;
    // A 200 ms grpc-timeout (no client-side timer): the server answers DEADLINE_EXCEEDED just
    // before it, while the backend still computes, not tonic's CANCELLED "Timeout expired".
    let mut req = tonic::Request::new(common::fault::route_req(1, 30));
    req.set_timeout(std::time::Duration::from_millis(200));
    let r = c.route(req).await;
    let code = r.map(|_| ()).unwrap_err().code();
    assert_eq!(code, Code::DeadlineExceeded);
    // The client leaves after 200 ms (its RPC future dropped: RST_STREAM).
    let gone = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        c.route(common::fault::route_req(0, 30)),
    )
    .await;
    assert!(gone.is_err(), "answered within 200 ms on a 1.5 s backend");
    let counted = |code: &str| {
        f.metric(
            "tiergate_requests_total",
            &[("rpc", "Route"), ("code", code)],
        )
    };
    for _ in 0..100 {
        if counted("CANCELLED") >= 1.0 && counted("DEADLINE_EXCEEDED") >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(counted("CANCELLED"), 1.0);
    assert_eq!(counted("DEADLINE_EXCEEDED"), 1.0);
    f.set("ok");
}

/// With Route's fast path on, a backend declared faulty still makes Route UNAVAILABLE, as
/// health says: the student, which needs no backend, does not answer a subset meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_backend_is_unavailable_on_the_fast_path_too() {
    let mut edits = TRIP.to_vec();
    edits.push((
        "relative_floor = 0.94\n",
        "relative_floor = 0.94\nfast_path_stability = 0.001\n",
    ));
    let f = Faulty::start(&edits, &[], &[]).await;
    let mut c = f.srv.client().await;
    let verify = |i: usize| proto::VerifyRequest {
        prompt: format!("What is {i} + {i}?"),
        answer: format!("{}", 2 * i),
        model: "gemini-2.5-flash".into(),
        ..Default::default()
    };
    // Verify always runs the encoder: two failed batches declare the backend faulty (one
    // Verify may make both, its prompt and answer batched apart; later ones are refused).
    f.set("error");
    for i in 0..2 {
        let e = c.verify(verify(i)).await.expect_err("a failed batch");
        assert!(
            matches!(e.code(), Code::Internal | Code::Unavailable),
            "{e}"
        );
    }
    f.health_becomes(ServingStatus::NotServing).await;
    for i in 0..5 {
        let r = f.route(100 + i).await;
        assert_eq!(code(&r), Code::Unavailable, "{r:?}");
    }
    assert_eq!(
        f.metric("tiergate_route_fast_path_total", &[("result", "alone")]),
        0.0
    );
    f.set("ok");
}
