//! Health as probes see it, and the bounded drain on SIGTERM. Every grpc.health.v1 service
//! this server answers for reports one state, SERVING only while warm-up is done, no drain
//! has begun and the encoder is healthy (src/batch: no faulty backend, no stopped thread).
#![forbid(unsafe_code)]
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::metrics as m;
use crate::proto;
use crate::service::Service;

/// The services health answers for: the server as a whole (`""`, the liveness probe), the
/// Router (readiness, startup) and Admin.
fn services() -> [&'static str; 3] {
    [
        "",
        <proto::router_server::RouterServer<std::sync::Arc<super::RouterService>> as NamedService>::NAME,
        <proto::admin_server::AdminServer<super::admin::AdminService> as NamedService>::NAME,
    ]
}

pub struct Health {
    reporter: HealthReporter,
    draining: AtomicBool,
    /// What was last reported (serving, encoder healthy), under a lock so that a report
    /// always reflects the newest state.
    shown: tokio::sync::Mutex<Option<(bool, bool)>>,
}

impl Health {
    /// Starts NOT_SERVING for every service.
    pub async fn new(reporter: HealthReporter) -> Health {
        let h = Health {
            reporter,
            draining: AtomicBool::new(false),
            shown: tokio::sync::Mutex::new(None),
        };
        h.show(false).await;
        h
    }

    async fn show(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in services() {
            self.reporter.set_service_status(name, status).await;
        }
        metrics::gauge!(m::SERVING).set(if serving { 1.0 } else { 0.0 });
    }

    /// Reports the state now: call on every change (warm-up done, drain) and periodically
    /// (the encoder's health changes on its own).
    pub async fn publish(&self, svc: &Service) {
        let mut shown = self.shown.lock().await;
        let encoder = svc.pipeline.batcher.health();
        let serving = svc.is_ready() && !self.draining.load(Ordering::Acquire) && encoder.is_ok();
        let now = (serving, encoder.is_ok());
        if *shown == Some(now) {
            return;
        }
        match (&encoder, *shown) {
            (Err(why), Some((_, true))) => {
                tracing::error!(%why, "encoder unhealthy: health is NOT_SERVING")
            }
            (Ok(()), Some((_, false))) => tracing::warn!("encoder healthy again"),
            _ => {}
        }
        if shown.is_none_or(|(s, _)| s != serving) {
            self.show(serving).await;
        }
        *shown = Some(now);
    }

    /// The first step of a drain: NOT_SERVING everywhere, for good.
    pub async fn begin_drain(&self, svc: &Service) {
        self.draining.store(true, Ordering::Release);
        self.publish(svc).await;
    }
}

/// How long answers written at the end of a drain get to reach their clients.
const LAST_ANSWERS: Duration = Duration::from_secs(2);

/// Runs the server future to its end, but once `started` fires (the listener closed) waits at
/// most `limit` for it: then everything still queued or running in the encoder is answered
/// UNAVAILABLE, and after a short grace for those answers the server is let go. False when the
/// limit was reached.
pub async fn bounded_drain<E: Into<anyhow::Error>>(
    server: impl Future<Output = Result<(), E>>,
    started: tokio::sync::oneshot::Receiver<()>,
    limit: Duration,
    svc: &Service,
) -> anyhow::Result<bool> {
    tokio::pin!(server);
    let bound = async {
        if started.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(limit).await;
    };
    tokio::select! {
        r = &mut server => return r.map(|_| true).map_err(Into::into),
        _ = bound => {}
    }
    tracing::warn!(
        limit_s = limit.as_secs(),
        "drain.timeout_s passed with requests unanswered: answering them UNAVAILABLE"
    );
    svc.pipeline
        .batcher
        .abort("server is shutting down (drain timeout); retry on another replica");
    match tokio::time::timeout(LAST_ANSWERS, &mut server).await {
        Ok(r) => r.map_err(Into::into)?,
        Err(_) => tracing::warn!("connections still open at the end of the drain; exiting"),
    }
    Ok(false)
}
