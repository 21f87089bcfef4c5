//! The batcher with the real CPU backend: bounded admission, priorities, work of departed
//! clients dropped before compute, and the server's warm-up gate.
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use tiergate::base::{Backend, BackendError, Device, PackedBatch};
use tiergate::batch::BatchError;
use tiergate::batch::{Batcher, Limits, Options, Priority};
use tiergate::config::Config;
use tiergate::engine::cpu::CpuBackend;
use tiergate::model::encoder::{MiniLm, Precision};

fn batcher(limits: Limits) -> Batcher {
    let model = MiniLm::load(std::path::Path::new("models/base"))
        .expect("models/base missing: run scripts/setup-model.sh");
    Batcher::start(
        Box::new(CpuBackend::new(Arc::new(model), 1, Precision::Auto).unwrap()),
        limits,
    )
    .unwrap()
}

/// `n` tokens: [CLS] n-2 × "the" [SEP].
fn seq(n: usize) -> (Vec<u32>, Vec<u32>) {
    let mut ids = vec![1996u32; n];
    ids[0] = 101;
    ids[n - 1] = 102;
    (ids, vec![0; n])
}

#[tokio::test]
async fn full_queue_is_rejected_at_once_and_admitted_work_completes() {
    let b = batcher(Limits {
        max_batch_tokens: 512,
        max_batch_requests: 1,
        max_queue: 3,
    });
    let mut admitted = Vec::new();
    let mut rejected = 0;
    for _ in 0..20 {
        let (ids, tt) = seq(400);
        match b.submit(ids, tt, Priority::Normal, None) {
            Ok(rx) => admitted.push(rx),
            Err(BatchError::Overloaded(_)) => rejected += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(rejected > 0 && admitted.len() >= 3);
    for rx in admitted {
        let e = rx.await.unwrap().unwrap();
        assert_eq!(e.embedding.len(), 384);
    }
    // Over-long and empty sequences are refused, not queued.
    assert!(matches!(
        b.submit(vec![], vec![], Priority::Normal, None),
        Err(BatchError::InvalidInput(_))
    ));
    let (ids, tt) = seq(600);
    assert!(matches!(
        b.submit(ids, tt, Priority::Normal, None),
        Err(BatchError::InvalidInput(_))
    ));
}

#[tokio::test]
async fn departed_clients_are_dropped_before_compute() {
    let b = batcher(Limits {
        max_batch_tokens: 512,
        max_batch_requests: 8,
        max_queue: 64,
    });
    // Three full batches keep the backend busy (one running, one handed over, one formed).
    let blockers: Vec<_> = (0..3)
        .map(|_| {
            let (ids, tt) = seq(512);
            b.submit(ids, tt, Priority::Normal, None).unwrap()
        })
        .collect();
    // Meanwhile three small jobs queue; two of their clients leave.
    let mut rx: Vec<_> = (0..3)
        .map(|_| {
            let (ids, tt) = seq(16);
            b.submit(ids, tt, Priority::Normal, None).unwrap()
        })
        .collect();
    let keep = rx.pop().unwrap();
    drop(rx);
    for r in blockers {
        r.await.unwrap().unwrap();
    }
    let e = keep.await.unwrap().unwrap();
    assert_eq!(e.batch_size, 1, "the two abandoned jobs were not computed");
}

#[tokio::test]
async fn high_priority_overtakes_queued_low_priority() {
    // A held backend, so both wait in the queue whatever the threads' timing.
    let h = Held::start(4096, 64, Gate::new(true), Options::default());
    let b = &h.b;
    let busy = h.fill().await;
    let (ids, tt) = seq(200);
    let low = b.submit(ids, tt, Priority::Low, None).unwrap();
    let (ids, tt) = seq(200);
    let high = b.submit(ids, tt, Priority::High, None).unwrap();
    h.hold(false);
    for rx in busy {
        rx.await.unwrap().unwrap();
    }
    let high = high.await.unwrap().unwrap();
    let low = low.await.unwrap().unwrap();
    assert!(
        high.queue < low.queue,
        "high waited {:?}, low waited {:?}",
        high.queue,
        low.queue
    );
    // An expired deadline is refused at the door.
    let (ids, tt) = seq(8);
    let past = std::time::Instant::now() - Duration::from_millis(1);
    assert!(matches!(
        b.submit(ids, tt, Priority::High, Some(past)),
        Err(BatchError::DeadlineExceeded)
    ));
}

#[tokio::test]
async fn not_ready_answers_unavailable() {
    let cfg = Config::embedded().unwrap();
    let service = Arc::new(tiergate::service::Service::start(&cfg).unwrap());
    let svc = tiergate::server::RouterService::new(service.clone());
    let req = tiergate::proto::RouteRequest {
        input: Some(tiergate::proto::route_request::Input::Prompt(
            "hello".into(),
        )),
        ..Default::default()
    };
    let e = svc.route_one(req.clone(), None, None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    service.set_ready();
    assert!(svc.route_one(req, None, None).await.is_ok());
}

/// A backend that holds every batch while `held` is set (a hung device), then answers zeros;
/// `first` delays its first batch (lazy initialisation).
struct Gate {
    held: Arc<AtomicBool>,
    first: Option<Duration>,
}

/// Lets a held Gate go when dropped, so a failing test ends instead of hanging the batcher's
/// shutdown on a batch that never returns.
struct Release(Arc<AtomicBool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Gate {
    fn new(held: bool) -> Gate {
        Gate {
            held: Arc::new(AtomicBool::new(held)),
            first: None,
        }
    }
}

impl Backend for Gate {
    fn name(&self) -> &'static str {
        "gate"
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn dim(&self) -> usize {
        4
    }
    fn max_seq_len(&self) -> usize {
        512
    }
    fn numerics(&self) -> &'static str {
        "f32"
    }
    fn embed(&mut self, batch: &PackedBatch) -> Result<Vec<f32>, BackendError> {
        if let Some(d) = self.first.take() {
            std::thread::sleep(d);
        }
        while self.held.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(vec![0.0; batch.len() * 4])
    }
}

/// A batcher of one-job batches on a Gate backend. Dropping it lets the gate go before the
/// batcher shuts down (fields drop in order), so a failing test ends instead of hanging.
struct Held {
    release: Release,
    b: Batcher,
}

type Pending = tokio::sync::oneshot::Receiver<Result<tiergate::batch::JobOutput, BatchError>>;

impl Held {
    fn start(max_batch_tokens: usize, max_queue: usize, gate: Gate, opts: Options) -> Held {
        let limits = Limits {
            max_batch_tokens,
            max_batch_requests: 1,
            max_queue,
        };
        Held {
            release: Release(gate.held.clone()),
            b: Batcher::start_with(Box::new(gate), limits, opts).unwrap(),
        }
    }

    fn hold(&self, on: bool) {
        self.release.0.store(on, Ordering::SeqCst);
    }

    /// Three one-job batches, the pipeline's depth: running, handed over, formed (the forming
    /// thread then waits to hand it over). Whatever comes next waits in the queue.
    async fn fill(&self) -> Vec<Pending> {
        let mut busy = Vec::new();
        for _ in 0..3 {
            let (ids, tt) = seq(8);
            busy.push(self.b.submit(ids, tt, Priority::Normal, None).unwrap());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        busy
    }
}

/// The watchdog answers the batches formed behind a hung one too (one handed over to the
/// backend thread, one held by the forming thread): they would wait on it as long.
#[tokio::test]
async fn a_hung_batch_does_not_strand_the_batches_behind_it() {
    let opts = Options {
        watchdog: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let h = Held::start(512, 8, Gate::new(true), opts);
    let waiting = h.fill().await;
    for (i, rx) in waiting.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(Err(BatchError::Unavailable(why)))) => assert!(why.contains("hung"), "{why}"),
            Ok(other) => panic!("request {i}: {other:?}"),
            Err(_) => panic!("request {i} was never answered"),
        }
    }
}

/// Work of clients that left holds no place in a full queue: a new request is admitted
/// instead of refused "queue full".
#[tokio::test]
async fn departed_clients_do_not_fill_the_queue() {
    let h = Held::start(512, 4, Gate::new(true), Options::default());
    let b = &h.b;
    let busy = h.fill().await;
    for _ in 0..4 {
        let (ids, tt) = seq(8);
        drop(b.submit(ids, tt, Priority::Normal, None).unwrap());
    }
    let (ids, tt) = seq(8);
    let live = b
        .submit(ids, tt, Priority::Normal, None)
        .expect("admitted: the queue holds only abandoned work");
    h.hold(false);
    for rx in busy {
        rx.await.unwrap().unwrap();
    }
    let out = tokio::time::timeout(Duration::from_secs(5), live)
        .await
        .expect("answered")
        .unwrap()
        .unwrap();
    assert_eq!(out.embedding.len(), 4);
}

/// A slow first batch of a few tokens (warm-up with lazy initialisation) does not set the
/// time per token that admission multiplies queued tokens by.
#[tokio::test]
async fn a_slow_tiny_warm_up_batch_does_not_inflate_the_expected_wait() {
    let gate = Gate {
        held: Arc::new(AtomicBool::new(false)),
        first: Some(Duration::from_millis(400)),
    };
    let h = Held::start(512, 8, gate, Options::default());
    let b = &h.b;
    let (ids, tt) = seq(8);
    b.submit(ids, tt, Priority::High, None)
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    // 400 ms for 8 tokens would be 50 ms a token: 25 s for the 500 tokens in flight now.
    h.hold(true);
    let (ids, tt) = seq(500);
    let busy = b.submit(ids, tt, Priority::Normal, None).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let wait = b.expected_wait(Priority::High);
    assert!(wait < Duration::from_secs(1), "expected wait {wait:?}");
    h.hold(false);
    busy.await.unwrap().unwrap();
}
