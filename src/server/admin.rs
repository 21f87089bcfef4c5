//! `tiergate.v1.Admin`: reload on request (the same as SIGHUP).
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status::to_status;
use crate::proto::{self, admin_server::Admin};
use crate::service::Service;

pub struct AdminService {
    svc: Arc<Service>,
    /// One Reload or Refit at a time from this port: each runs on a blocking thread that a
    /// client's cancel cannot stop, so calls that queued behind the one running would pile
    /// up threads (and delay shutdown's). The one running holds the permit to its end.
    running: Arc<tokio::sync::Semaphore>,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn reload(
        &self,
        _req: Request<proto::ReloadRequest>,
    ) -> Result<Response<proto::ReloadReply>, Status> {
        match self.alone("reload", |svc| svc.reload()).await? {
            Ok(revision) => Ok(Response::new(proto::ReloadReply { revision })),
            Err(e) => Err(to_status(&e)),
        }
    }

    async fn refit(
        &self,
        _req: Request<proto::RefitRequest>,
    ) -> Result<Response<proto::RefitReply>, Status> {
        Ok(Response::new(self.refit_now().await?))
    }
}

impl AdminService {
    pub fn new(svc: Arc<Service>) -> Self {
        AdminService {
            svc,
            running: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Runs `job` on a blocking thread, holding the one permit to its end; ABORTED at once
    /// while another Reload or Refit runs (retry after it).
    async fn alone<T: Send + 'static>(
        &self,
        what: &str,
        job: impl FnOnce(&Service) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let permit = self.running.clone().try_acquire_owned().map_err(|_| {
            Status::aborted("a reload or re-fit is already running; retry after it")
        })?;
        let svc = self.svc.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job(&svc)
        })
        .await
        .map_err(|e| Status::internal(format!("{what} task: {e}")))
    }

    async fn refit_now(&self) -> Result<proto::RefitReply, Status> {
        if !self.svc.decider().cfg.feedback.enabled() {
            return Err(to_status(&crate::service::ServiceError::Disabled(
                "feedback is disabled: set feedback.overlay in the configuration".into(),
            )));
        }
        let n = self
            .alone("re-fit", |svc| svc.refit_feedback())
            .await?
            .map_err(|e| to_status(&e))?;
        Ok(proto::RefitReply {
            models: n as u32,
            revision: self.svc.revision(),
        })
    }
}

/// Re-fits from feedback every `every`, off the async runtime; failures are logged and the
/// previous state keeps serving.
pub async fn refit_periodically(svc: Arc<Service>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = svc.clone();
        match tokio::task::spawn_blocking(move || s.refit_feedback()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(models = n, "feedback re-fit applied"),
            Ok(Err(e)) => tracing::error!(error = %e, "feedback re-fit not applied"),
            Err(e) => tracing::error!(error = %e, "feedback re-fit task failed"),
        }
    }
}

/// Reloads on every SIGHUP until the process ends; a failed reload is logged and counted,
/// and the previous state keeps serving.
pub async fn reload_on_sighup(svc: Arc<Service>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with tiergate.v1.Admin/Reload");
            return;
        };
        while hup.recv().await.is_some() {
            let s = svc.clone();
            match tokio::task::spawn_blocking(move || s.reload()).await {
                Ok(Ok(rev)) => tracing::info!(revision = %rev, "SIGHUP: reloaded"),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "SIGHUP: reload refused; still serving the previous state")
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: reload task failed"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = svc;
        std::future::pending::<()>().await
    }
}
