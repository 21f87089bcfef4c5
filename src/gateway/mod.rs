//! Entry points for the gateways teams already run, beside the gRPC edge (`server`): an
//! OpenAI-compatible HTTP front that runs the whole cascade (`http.rs`, `cascade.rs`:
//! route → call the upstream → verify → escalate) and Envoy's external processor, which
//! rewrites `model` for Envoy to route on (`extproc.rs`). Both convert their wire format to
//! `service::RouteQuery` / `VerifyQuery`, call `Service`, and map errors in `status.rs`.
#![forbid(unsafe_code)]

mod cascade;
mod chat;
mod extproc;
mod http;
mod status;
mod targets;
mod upstream;

use std::sync::Arc;

use anyhow::Context;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;

pub use http::TIMEOUT_HEADER;

use crate::service::Service;

/// What the gateway adds to the process: gRPC routes for the main port and the HTTP
/// front's serving task.
pub struct Started {
    pub routes: Option<tonic::service::Routes>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds the HTTP front (if `gateway.http_listen` is set) and builds the ext_proc service
/// (if `gateway.ext_proc`). The front stops accepting once `drain` is set and its task
/// ends when the requests it accepted are answered.
pub async fn start(
    svc: Arc<Service>,
    mut drain: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Started> {
    let cfg = svc.config().clone();
    let mut tasks = Vec::new();
    if let Some(addr) = cfg.http_addr()? {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding gateway.http_listen {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(%local, "OpenAI-compatible front listening");
        let front = Arc::new(cascade::Front {
            svc: svc.clone(),
            upstreams: upstream::Upstreams::new()?,
        });
        let app = http::router(front, cfg.gateway.max_concurrent);
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = drain.wait_for(|d| *d).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %e, "the HTTP front stopped");
            }
        }));
    }
    let routes = cfg.gateway.ext_proc.then(|| {
        tonic::service::Routes::new(ExternalProcessorServer::new(extproc::ExtProc { svc }))
    });
    Ok(Started { routes, tasks })
}
