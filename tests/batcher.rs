//! The batcher with the real CPU backend: bounded admission, priorities, work of departed
//! clients dropped before compute, and the server's warm-up gate.
use std::sync::Arc;
use std::time::Duration;

use tiergate::batch::BatchError;
use tiergate::batch::{Batcher, Limits, Priority};
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
    let b = batcher(Limits {
        max_batch_tokens: 4096,
        max_batch_requests: 1,
        max_queue: 64,
    });
    let (ids, tt) = seq(512);
    let blocker = b.submit(ids, tt, Priority::Normal, None).unwrap();
    let (ids, tt) = seq(200);
    let low = b.submit(ids, tt, Priority::Low, None).unwrap();
    let (ids, tt) = seq(200);
    let high = b.submit(ids, tt, Priority::High, None).unwrap();
    blocker.await.unwrap().unwrap();
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
