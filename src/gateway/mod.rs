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
mod json;
mod status;
mod targets;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

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

/// Serves the front's connections (HTTP/1.1) until `drain` is set, then lets the requests in
/// flight finish: no new connections, idle ones closed. A request's head must arrive within
/// `head_timeout` (gateway.head_timeout_s); its body within its deadline (http.rs). At most
/// `max_connections` (gateway.max_connections) are open at once.
async fn serve_front(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    head_timeout: Duration,
    max_connections: usize,
    mut drain: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut warned: Option<std::time::Instant> = None;
    loop {
        // A slot is taken before a connection is accepted: at the cap, clients wait in the
        // listen backlog until one closes, rather than taking descriptors the gRPC listener
        // and the upstream calls need.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = async { drop(drain.wait_for(|d| *d).await) } => break,
        };
        if slots.available_permits() == 0 && warned.is_none_or(|t| t.elapsed().as_secs() >= 10) {
            tracing::warn!(
                max_connections,
                "the HTTP front holds gateway.max_connections connections; more wait to be accepted"
            );
            warned = Some(std::time::Instant::now());
        }
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "the HTTP front could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // (the watch's guard is dropped inside: the future stays Send)
            _ = async { drop(drain.wait_for(|d| *d).await) } => break,
        };
        let _ = tcp.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(head_timeout)
            .serve_connection(TokioIo::new(tcp), svc);
        let conn = graceful.watch(conn);
        metrics::gauge!(crate::metrics::HTTP_CONNECTIONS).increment(1.0);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP front connection ended");
            }
            metrics::gauge!(crate::metrics::HTTP_CONNECTIONS).decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Binds the HTTP front (if `gateway.http_listen` is set) and builds the ext_proc service
/// (if `gateway.ext_proc`). The front stops accepting once `drain` is set and its task
/// ends when the requests it accepted are answered.
pub async fn start(
    svc: Arc<Service>,
    drain: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Started> {
    let cfg = svc.config().clone();
    let mut tasks = Vec::new();
    let ext_proc_drain = drain.clone();
    if let Some(addr) = cfg.http_addr()? {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding gateway.http_listen {addr}"))?;
        let local = listener.local_addr()?;
        // After the gRPC port's line, as that one: tests and scripts read it to find an
        // ephemeral port (`http_listen` port 0). Written, not println!: a reader that stopped
        // after the first line must not make the start fail.
        {
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "tiergate http listening on {local}");
        }
        tracing::info!(%local, "OpenAI-compatible front listening");
        let front = Arc::new(cascade::Front {
            svc: svc.clone(),
            upstreams: upstream::Upstreams::new()?,
        });
        let app = http::router(front, cfg.gateway.max_concurrent);
        let head_timeout = Duration::from_secs(cfg.gateway.head_timeout_s);
        tasks.push(tokio::spawn(serve_front(
            listener,
            app,
            head_timeout,
            cfg.gateway.max_connections,
            drain,
        )));
    }
    // A message carries a whole buffered body (up to Envoy's buffer limit, which
    // deploy/envoy.yaml sets to gateway.max_body_bytes) and its headers: tonic's default 4 MiB
    // would refuse one at the limit, and Envoy would then fail open on it. Set at start, so
    // room for a reloaded max_body_bytes up to 16 MiB.
    let max_message = cfg
        .gateway
        .max_body_bytes
        .max(16 << 20)
        .saturating_add(64 << 10);
    let routes = cfg.gateway.ext_proc.then(|| {
        tonic::service::Routes::new(
            ExternalProcessorServer::new(extproc::ExtProc {
                svc,
                drain: ext_proc_drain,
            })
            .max_decoding_message_size(max_message),
        )
    });
    Ok(Started { routes, tasks })
}
