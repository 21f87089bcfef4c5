//! The gRPC edge: `tiergate.v1.Router`, grpc.health.v1 and reflection on one port, with
//! warm-up, a watchdog on the batcher, and a graceful drain on SIGTERM. The decisions are the
//! service layer's; this folder converts (convert.rs), maps errors (status.rs), serves the
//! RPCs (grpc.rs, stream.rs) and runs the process lifecycle (here, signal.rs).
#![forbid(unsafe_code)]

mod admin;
mod auth;
mod conns;
mod convert;
mod grpc;
mod lifecycle;
mod observe;
mod signal;
mod status;
mod stream;
mod tls;

use std::sync::Arc;
use std::time::Duration;

pub use convert::parse_grpc_timeout;
pub use grpc::RouterService;
pub use signal::shutdown_signal;

use crate::config::{Config, Overrides};
use crate::metrics as m;
use crate::proto;
use crate::service::Service;

/// What the entry points beside this one (src/gateway) add to the process: gRPC services on
/// this port, and tasks serving their own listeners that end once `drain` is set and their
/// requests are answered. They sit beside `server`, so the binary wires them in.
#[derive(Default)]
pub struct Attached {
    pub routes: Option<tonic::service::Routes>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Builds [`Attached`] once the service exists; binding errors stop start-up.
pub type Attach = Box<
    dyn FnOnce(
            Arc<Service>,
            tokio::sync::watch::Receiver<bool>,
        ) -> futures::future::BoxFuture<'static, anyhow::Result<Attached>>
        + Send,
>;

/// Concurrent HTTP/2 streams one client connection may hold on the gRPC port (sent in its
/// SETTINGS; streams past it wait in the client, or go on another connection, as Envoy's
/// pool does).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
pub use conns::FIRST_BYTES_WITHIN;
/// How often an idle gRPC connection is pinged (HTTP/2) and probed (TCP keepalive).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// A ping unanswered this long closes the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Loads everything, listens, warms up (health NOT_SERVING until then), serves until
/// `shutdown` resolves, then drains: accepted requests are answered before this returns.
pub async fn serve(
    cfg: Config,
    reload_from: Option<Overrides>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(cfg, reload_from, shutdown, None).await
}

/// [`serve`], with other entry points attached and drained with it.
pub async fn serve_with(
    cfg: Config,
    reload_from: Option<Overrides>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    attach: Option<Attach>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    // Before the model loads: a bad certificate is a start-up error, found at once.
    let tls = if cfg.tls.enabled() {
        Some(Arc::new(tls::ReloadingTls::load(&cfg.tls)?))
    } else {
        None
    };
    if let Some(addr) = cfg.metrics_addr()? {
        m::install(addr)?;
        tracing::info!(%addr, "metrics on /metrics");
    }
    let svc = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || Service::start(&cfg)).await??
    };
    let svc = Arc::new(svc);
    if let Some(o) = reload_from {
        svc.set_reload_source(o);
        tokio::spawn(admin::reload_on_sighup(svc.clone()));
    }
    if cfg.feedback.enabled() {
        tokio::spawn(admin::refit_periodically(
            svc.clone(),
            Duration::from_secs(cfg.feedback.refit_interval_s),
        ));
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen_addr()?)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let plain_health = match cfg.tls.plaintext_health_addr()? {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding tls.plaintext_health_listen {a}"))?,
        ),
        None => None,
    };
    // Tests and scripts read this line to find an ephemeral port.
    println!("tiergate listening on {local}");
    tracing::info!(%local, backend = svc.pipeline.batcher.backend_name(), numerics = svc.pipeline.numerics, revision = %svc.revision(), "listening");

    let (reporter, health_svc) = tonic_health::server::health_reporter();
    let health = Arc::new(lifecycle::Health::new(reporter).await);
    // Reflection v1, and v1alpha for the clients that still speak only it (older grpcurl,
    // grpcui, Postman).
    let reflection_of = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_of().build_v1()?;
    let reflection_v1alpha = reflection_of().build_v1alpha()?;

    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let attached = match attach {
        Some(f) => f(svc.clone(), drain_rx).await?,
        None => Attached::default(),
    };

    if let Some(l) = plain_health {
        // Health only, in the clear, for probes that cannot do TLS; it closes with the drain.
        let mut drain = drain_tx.subscribe();
        let health_svc = health_svc.clone();
        tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(health_svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(l),
                    async move {
                        let _ = drain.wait_for(|d| *d).await;
                    },
                )
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "plaintext health listener stopped");
            }
        });
    }

    let router = Arc::new(RouterService::new(svc.clone()));
    let router_drain = router.clone();
    {
        let svc = svc.clone();
        let health = health.clone();
        tokio::spawn(async move {
            match svc.warm_up().await {
                Ok(_) if svc.pipeline.batcher.failure().is_some() => {
                    tracing::error!("encoder stopped during warm-up; staying NOT_SERVING")
                }
                Ok(d) => {
                    svc.set_ready();
                    health.publish(&svc).await;
                    tracing::info!(ms = d.as_secs_f64() * 1e3, "warm-up done, serving");
                }
                Err(e) => tracing::error!(error = %e, "warm-up failed; staying NOT_SERVING"),
            }
        });
    }

    {
        // A batcher that stopped serving, or whose backend is declared faulty, takes the pod
        // out of rotation; a recovered backend brings it back.
        let (svc, health) = (svc.clone(), health.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut build = observe::BuildInfo::default();
            loop {
                tick.tick().await;
                // Reloads and re-fits change the heads revision; shown within a tick.
                build.update(&svc);
                health.publish(&svc).await;
            }
        });
    }

    let (health_down, svc_down) = (health.clone(), svc.clone());
    let lame_duck = Duration::from_secs(cfg.drain.lame_duck_s);
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    // When the listener closed: attached listeners get what is left of drain.timeout_s from
    // then, not from the start of serving.
    let drain_began = Arc::new(std::sync::OnceLock::new());
    let drain_began_set = drain_began.clone();
    let mut builder = tonic::transport::Server::builder()
        // tonic's default is no limit (hyper's own is 200): without one a single connection
        // can open streams, each holding a partial message, without end.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // A peer that vanished without closing (a node lost, a NAT that dropped the flow)
        // holds its connection and streams until a ping goes unanswered.
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if cfg.max_connection_age_s > 0 {
        // At this age tonic sends GOAWAY; the connection closes once its open requests end and
        // the client reconnects, re-resolving, so it reaches new replicas. Not with tonic's
        // max_connection_age_grace: in 0.14.9 setting it replaces the GOAWAY with a hard close
        // at age + grace, failing requests in flight (tests/ops.rs caught it).
        builder = builder.max_connection_age(Duration::from_secs(cfg.max_connection_age_s));
    }
    let routes = attached.routes.unwrap_or_default();
    let served = builder
        .layer(auth::AuthLayer {
            tokens: svc.tokens.clone(),
        })
        .add_routes(routes)
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            proto::router_server::RouterServer::new(router)
                .max_decoding_message_size(grpc::max_request_bytes(&cfg.batch)),
        )
        .add_service(proto::admin_server::AdminServer::new(
            admin::AdminService::new(svc.clone()),
        ));
    let drain = async move {
        shutdown.await;
        // Probes see NOT_SERVING first, while the listener still accepts (the lame duck):
        // balancers that have not yet seen the endpoint go lose no requests.
        health_down.begin_drain(&svc_down).await;
        tracing::info!(
            lame_duck_s = lame_duck.as_secs(),
            "shutdown requested: NOT_SERVING, still serving during the lame duck"
        );
        tokio::time::sleep(lame_duck).await;
        tracing::info!("closing the listener: draining");
        router_drain.begin_drain();
        let _ = drain_began_set.set(std::time::Instant::now());
        drain_tx.send_replace(true);
        let _ = closed_tx.send(());
    };
    let max_connections = cfg.max_connections;
    let server = async move {
        match tls {
            Some(tls) => {
                let incoming = conns::capped(tls::incoming(listener, tls), max_connections);
                served.serve_with_incoming_shutdown(incoming, drain).await
            }
            None => {
                let incoming = tonic::transport::server::TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(KEEPALIVE_INTERVAL));
                let incoming = conns::capped(incoming, max_connections);
                served.serve_with_incoming_shutdown(incoming, drain).await
            }
        }
    };
    let limit = Duration::from_secs(cfg.drain.timeout_s);
    let complete = lifecycle::bounded_drain(server, closed_rx, limit, &svc).await?;
    for t in attached.tasks {
        let since = drain_began.get().map_or(Duration::ZERO, |t0| t0.elapsed());
        let left = limit.saturating_sub(since).max(Duration::from_secs(1));
        match tokio::time::timeout(left, t).await {
            Ok(Err(e)) => tracing::error!(error = %e, "an attached listener ended abnormally"),
            Err(_) => tracing::warn!("an attached listener did not finish draining in time"),
            Ok(Ok(())) => {}
        }
    }
    // Every accepted request has been answered; now stop the batcher threads. A hung backend
    // thread is left behind, so the process still exits.
    let ended = tokio::task::spawn_blocking(move || {
        svc.pipeline.batcher.shutdown_within(if complete {
            limit
        } else {
            Duration::from_secs(1)
        })
    })
    .await?;
    if !ended {
        tracing::warn!("the encoder thread did not stop; exiting without it");
    }
    tracing::info!("stopped");
    Ok(())
}
