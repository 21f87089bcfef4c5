//! gRPC front: Router service, grpc.health.v1, reflection; graceful drain on SIGTERM.
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::batch::Priority;
use crate::config::Config;
use crate::error::TgError;
use crate::metrics as m;
use crate::model::heads;
use crate::model::tokenize::TruncSide;
use crate::pipeline::{Input, Pipeline};
use crate::policy::{self, Scored};
use crate::proto::{self, router_server::Router};

/// Pipelined stream requests in flight per stream; replies keep request order.
const STREAM_WINDOW: usize = 64;

pub struct RouterService {
    cfg: Config,
    pipe: Arc<Pipeline>,
    ready: Arc<AtomicBool>,
    /// Set on shutdown: open streams stop reading, answer what they already read, and end,
    /// so an idle client stream cannot hold the drain open.
    drain: tokio::sync::watch::Sender<bool>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The deadline a client set with grpc-timeout, if any.
fn deadline_of<T>(req: &Request<T>) -> Option<Instant> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(d)
}

fn truncation(t: i32) -> Result<TruncSide, TgError> {
    match proto::Truncation::try_from(t) {
        Ok(proto::Truncation::Unspecified | proto::Truncation::HeadTail) => Ok(TruncSide::HeadTail),
        Ok(proto::Truncation::Head) => Ok(TruncSide::Head),
        Ok(proto::Truncation::Tail) => Ok(TruncSide::Tail),
        Err(_) => Err(TgError::InvalidArgument(format!(
            "unknown truncation value {t}"
        ))),
    }
}

fn check_priority(p: i32) -> Result<Priority, TgError> {
    proto::Priority::try_from(p)
        .map(|_| Priority::from_proto(p))
        .map_err(|_| TgError::InvalidArgument(format!("unknown priority value {p}")))
}

impl RouterService {
    pub fn new(cfg: Config, pipe: Arc<Pipeline>, ready: Arc<AtomicBool>) -> Self {
        Self {
            cfg,
            pipe,
            ready,
            drain: tokio::sync::watch::channel(false).0,
        }
    }

    /// Ends every open stream after the replies to what it has already read.
    pub fn begin_drain(&self) {
        self.drain.send_replace(true);
    }

    /// Resolves once draining has begun.
    fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.drain.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Route's default floor: the config's, else the one learned with the heads.
    pub fn default_floor(&self) -> f64 {
        self.cfg.policy.quality_floor.unwrap_or(
            self.pipe
                .heads
                .default_quality_floor
                .unwrap_or(crate::model::heads::FALLBACK_FLOOR),
        )
    }

    /// Verify's default ship threshold (see `verify_one`).
    pub fn default_threshold(&self) -> f64 {
        let p = &self.cfg.policy;
        match (p.verify_threshold, p.quality_floor) {
            (Some(t), _) => t,
            (None, Some(f)) => self.pipe.heads.threshold_for(f),
            (None, None) => self.pipe.heads.default_verify_threshold,
        }
    }

    fn check_ready(&self) -> Result<(), TgError> {
        if self.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(TgError::Unavailable("warming up".into()))
        }
    }

    fn check_text(&self, what: &str, text: &str, allow_empty: bool) -> Result<(), TgError> {
        if !allow_empty && text.trim().is_empty() {
            return Err(TgError::InvalidArgument(format!("{what} is empty")));
        }
        if text.len() > self.cfg.batch.max_input_bytes {
            return Err(TgError::InvalidArgument(format!(
                "{what} is {} bytes; the limit is {} (max_input_bytes)",
                text.len(),
                self.cfg.batch.max_input_bytes
            )));
        }
        Ok(())
    }

    pub async fn route_one(
        &self,
        r: proto::RouteRequest,
        deadline: Option<Instant>,
    ) -> Result<proto::RouteReply, TgError> {
        let t0 = Instant::now();
        self.check_ready()?;
        let text = match r.input {
            Some(proto::route_request::Input::Prompt(p)) => p,
            // Role-tagged turns: head+tail truncation then keeps the system prompt and the
            // latest user turn, the parts that decide difficulty.
            Some(proto::route_request::Input::Messages(ms)) => ms
                .messages
                .iter()
                .map(|m| format!("{}: {}", m.role, m.content))
                .collect::<Vec<_>>()
                .join("\n"),
            None => {
                return Err(TgError::InvalidArgument(
                    "prompt or messages is required".into(),
                ))
            }
        };
        self.check_text("prompt", &text, false)?;
        let side = truncation(r.truncation)?;
        let priority = check_priority(r.priority)?;
        let pol = policy::effective(r.policy.as_ref(), &self.cfg.policy, self.default_floor())?;
        let cands = self.pipe.catalog.resolve(&r.candidates)?;
        if let Some(0) = r.expected_output_tokens {
            return Err(TgError::InvalidArgument(
                "expected_output_tokens must be > 0".into(),
            ));
        }
        let prompt_tokens = policy::proxy_tokens(text.len());
        let e = self
            .pipe
            .encode("route", Input::Single(text, side), priority, deadline)
            .await?;
        // The prompt's part of the router is shared by all candidates: compute it once.
        let router = &self.pipe.heads.router;
        let pf = router.prompt_features(&e.embedding);
        let scored: Vec<Scored> = cands
            .iter()
            .map(|c| {
                let p = heads::sigmoid(router.logit_from(&pf, router.ability(&c.head)) as f64);
                Ok(Scored {
                    model: c.name.clone(),
                    p_pass: p,
                    cost: c.expected_cost(prompt_tokens, r.expected_output_tokens),
                })
            })
            .collect::<Result<_, TgError>>()?;
        let d = policy::decide_route(scored, &pol, self.cfg.policy.verify_band)?;
        let chosen = &d.candidates[d.chosen];
        metrics::counter!(m::DECISIONS, "model" => chosen.model.clone(), "reason" => d.reason)
            .increment(1);
        Ok(proto::RouteReply {
            request_id: r.request_id,
            model: chosen.model.clone(),
            expected_cost_usd: chosen.cost,
            expected_saving_usd: d.expected_saving,
            margin: d.margin,
            verify_recommended: d.verify_recommended,
            truncated: e.truncated,
            input_tokens: e.enc_len as u32,
            revision: self.pipe.revision(),
            reason: d.reason.to_string(),
            candidates: d
                .candidates
                .iter()
                .map(|s| proto::CandidateScore {
                    model: s.model.clone(),
                    p_pass: s.p_pass,
                    expected_cost_usd: s.cost,
                })
                .collect(),
            timings: Some(proto::Timings {
                tokenize_ms: ms(e.tokenize),
                queue_ms: ms(e.queue),
                inference_ms: ms(e.inference),
                total_ms: ms(t0.elapsed()),
            }),
        })
    }

    pub async fn verify_one(
        &self,
        r: proto::VerifyRequest,
        deadline: Option<Instant>,
    ) -> Result<proto::VerifyReply, TgError> {
        let t0 = Instant::now();
        self.check_ready()?;
        self.check_text("prompt", &r.prompt, false)?;
        self.check_text("answer", &r.answer, true)?;
        let priority = check_priority(r.priority)?;
        let pol = policy::effective(r.policy.as_ref(), &self.cfg.policy, self.default_floor())?;
        let model = self.pipe.catalog.get(&r.model).ok_or_else(|| {
            TgError::InvalidArgument(format!(
                "unknown model {:?}: not in the catalog and no trained head (see Info)",
                r.model
            ))
        })?;
        let cands = self.pipe.catalog.resolve(&r.candidates)?;
        // A requested floor maps to the threshold at which shipped answers met that floor on
        // held-back data; else the configured threshold, else the configured floor's, else
        // the learned default (the learned floor's).
        let threshold = if pol.floor_given {
            self.pipe.heads.threshold_for(pol.quality_floor)
        } else {
            self.default_threshold()
        };
        let prompt_tokens = policy::proxy_tokens(r.prompt.len());
        let escalate_to = policy::escalation_target(model, &cands, prompt_tokens)
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let (p, truncated, input_tokens, timings) = if r.answer.trim().is_empty() {
            // Nothing to ship: no need to ask the encoder.
            (
                0.0,
                false,
                0,
                (Duration::ZERO, Duration::ZERO, Duration::ZERO),
            )
        } else {
            // Prompt and answer are encoded separately (the verifier reads both embeddings
            // and the pair's text), as two jobs in the same batcher.
            let limit = self.cfg.batch.max_answer_tokens;
            let (pe, ae) = tokio::join!(
                self.pipe.encode(
                    "verify",
                    Input::Single(r.prompt.clone(), TruncSide::HeadTail),
                    priority,
                    deadline
                ),
                self.pipe.encode(
                    "verify",
                    Input::Answer(r.answer.clone(), limit),
                    priority,
                    deadline
                ),
            );
            let (pe, ae) = (pe?, ae?);
            let answer = crate::model::heads::AnswerInput {
                text: &r.answer,
                prompt: &r.prompt,
                embedding: &ae.embedding,
                truncated: ae.truncated,
            };
            (
                self.pipe
                    .heads
                    .verify_p(&model.head, &pe.embedding, &answer),
                pe.truncated || ae.truncated,
                (pe.enc_len + ae.enc_len) as u32,
                (
                    pe.tokenize.max(ae.tokenize),
                    pe.queue.max(ae.queue),
                    pe.inference.max(ae.inference),
                ),
            )
        };
        let ship = p >= threshold;
        let decision = if ship {
            proto::Decision::Ship
        } else {
            proto::Decision::Escalate
        };
        metrics::counter!(m::VERIFY_DECISIONS, "decision" => if ship { "ship" } else { "escalate" })
            .increment(1);
        if !ship {
            metrics::counter!(m::ESCALATIONS, "from" => r.model.clone()).increment(1);
        }
        Ok(proto::VerifyReply {
            request_id: r.request_id,
            p_pass: p,
            decision: decision as i32,
            escalate_to: if ship { String::new() } else { escalate_to },
            threshold,
            truncated,
            input_tokens,
            revision: self.pipe.revision(),
            timings: Some(proto::Timings {
                tokenize_ms: ms(timings.0),
                queue_ms: ms(timings.1),
                inference_ms: ms(timings.2),
                total_ms: ms(t0.elapsed()),
            }),
        })
    }

    fn info(&self) -> proto::InfoReply {
        let b = &self.cfg.batch;
        // The batcher's own limits: the GPU budget when the CUDA backend runs.
        let lim = self.pipe.enc.batcher.limits();
        let heads = &self.pipe.heads;
        proto::InfoReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            model_revision: self.pipe.enc.model_revision.clone(),
            heads_revision: heads.revision.clone(),
            backend: self.pipe.enc.batcher.backend_name().to_string(),
            numerics: self.pipe.enc.numerics.to_string(),
            limits: Some(proto::Limits {
                max_batch_tokens: lim.max_batch_tokens as u32,
                max_batch_requests: lim.max_batch_requests as u32,
                max_queue: lim.max_queue as u32,
                max_input_tokens: b.max_input_tokens as u32,
                max_input_bytes: b.max_input_bytes as u32,
            }),
            catalog: self
                .pipe
                .catalog
                .default_models()
                .map(|c| proto::CatalogEntry {
                    model: c.name.clone(),
                    in_usd_per_mtok: c.in_usd_per_mtok,
                    out_usd_per_mtok: c.out_usd_per_mtok,
                    head: c.head.clone(),
                    expected_output_tokens: c.expected_output_tokens,
                })
                .collect(),
            default_quality_floor: self.default_floor(),
            default_verify_threshold: self.default_threshold(),
        }
    }
}

/// Counts and times one RPC outcome.
fn observe<T>(rpc: &'static str, t0: Instant, r: &Result<T, TgError>) {
    let code = match r {
        Ok(_) => "OK",
        Err(e) => {
            metrics::counter!(m::REJECTIONS, "rpc" => rpc, "reason" => e.reason()).increment(1);
            code_name(e.code())
        }
    };
    metrics::counter!(m::REQUESTS, "rpc" => rpc, "code" => code).increment(1);
    metrics::histogram!(m::REQUEST_SECONDS, "rpc" => rpc).record(t0.elapsed().as_secs_f64());
}

fn code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::Cancelled => "CANCELLED",
        _ => "INTERNAL",
    }
}

fn stream_error(request_id: String, e: TgError) -> proto::StreamError {
    proto::StreamError {
        request_id,
        code: e.code() as i32,
        message: e.to_string(),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Answers a client stream in order, up to STREAM_WINDOW requests in flight. On drain it stops
/// reading and, after the replies to what it read, ends with UNAVAILABLE if the client had not
/// ended its side: the client then knows that requests without a reply were not processed and
/// can retry them elsewhere (an idle stream cannot hold the drain open).
fn serve_stream<Req, Rep, F, Fut>(
    svc: Arc<RouterService>,
    inbound: Streaming<Req>,
    answer: F,
) -> BoxStream<Rep>
where
    Req: Send + 'static,
    Rep: Send + 'static,
    F: Fn(Arc<RouterService>, Req) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Rep> + Send + 'static,
{
    let ended = Arc::new(AtomicBool::new(false));
    let seen_end = ended.clone();
    let answer = Arc::new(answer);
    let drained = svc.drained();
    let replies = inbound
        .map(Some)
        .chain(futures::stream::iter([None])) // marks the client's own end
        .take_until(drained)
        .filter_map(move |item| {
            if item.is_none() {
                seen_end.store(true, Ordering::Release);
            }
            futures::future::ready(item)
        })
        .map(move |item| {
            let (svc, answer) = (svc.clone(), answer.clone());
            async move { Ok(answer(svc, item?).await) }
        })
        .buffered(STREAM_WINDOW);
    let tail = futures::stream::once(async move {
        (!ended.load(Ordering::Acquire)).then(|| {
            Err(Status::unavailable(
                "server draining: stream closed; requests without a reply were not processed",
            ))
        })
    })
    .filter_map(futures::future::ready);
    Box::pin(replies.chain(tail))
}

#[tonic::async_trait]
impl Router for Arc<RouterService> {
    async fn route(
        &self,
        req: Request<proto::RouteRequest>,
    ) -> Result<Response<proto::RouteReply>, Status> {
        let t0 = Instant::now();
        let dl = deadline_of(&req);
        let r = self.route_one(req.into_inner(), dl).await;
        observe("Route", t0, &r);
        Ok(Response::new(r?))
    }

    async fn verify(
        &self,
        req: Request<proto::VerifyRequest>,
    ) -> Result<Response<proto::VerifyReply>, Status> {
        let t0 = Instant::now();
        let dl = deadline_of(&req);
        let r = self.verify_one(req.into_inner(), dl).await;
        observe("Verify", t0, &r);
        Ok(Response::new(r?))
    }

    type RouteStreamStream = BoxStream<proto::RouteStreamReply>;
    type VerifyStreamStream = BoxStream<proto::VerifyStreamReply>;

    async fn route_stream(
        &self,
        req: Request<Streaming<proto::RouteRequest>>,
    ) -> Result<Response<Self::RouteStreamStream>, Status> {
        let dl = deadline_of(&req);
        let out = serve_stream(self.clone(), req.into_inner(), move |svc, r| async move {
            let t0 = Instant::now();
            let id = r.request_id.clone();
            let res = svc.route_one(r, dl).await;
            observe("RouteStream", t0, &res);
            proto::RouteStreamReply {
                result: Some(match res {
                    Ok(rep) => proto::route_stream_reply::Result::Reply(rep),
                    Err(e) => proto::route_stream_reply::Result::Error(stream_error(id, e)),
                }),
            }
        });
        Ok(Response::new(out))
    }

    async fn verify_stream(
        &self,
        req: Request<Streaming<proto::VerifyRequest>>,
    ) -> Result<Response<Self::VerifyStreamStream>, Status> {
        let dl = deadline_of(&req);
        let out = serve_stream(self.clone(), req.into_inner(), move |svc, r| async move {
            let t0 = Instant::now();
            let id = r.request_id.clone();
            let res = svc.verify_one(r, dl).await;
            observe("VerifyStream", t0, &res);
            proto::VerifyStreamReply {
                result: Some(match res {
                    Ok(rep) => proto::verify_stream_reply::Result::Reply(rep),
                    Err(e) => proto::verify_stream_reply::Result::Error(stream_error(id, e)),
                }),
            }
        });
        Ok(Response::new(out))
    }

    async fn info(
        &self,
        _req: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoReply>, Status> {
        Ok(Response::new(RouterService::info(self)))
    }
}

/// Loads everything, listens, warms up (health NOT_SERVING until then), serves until
/// `shutdown` resolves, then drains: accepted requests are answered before this returns.
pub async fn serve(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(addr) = cfg.metrics_addr()? {
        m::install(addr)?;
        tracing::info!(%addr, "metrics on /metrics");
    }
    let pipe = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || Pipeline::start(&cfg)).await??
    };
    let pipe = Arc::new(pipe);
    let listener = tokio::net::TcpListener::bind(cfg.listen_addr()?)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let local = listener.local_addr()?;
    // Tests and scripts read this line to find an ephemeral port.
    println!("tiergate listening on {local}");
    tracing::info!(%local, backend = pipe.enc.batcher.backend_name(), numerics = pipe.enc.numerics, revision = %pipe.revision(), "listening");

    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<proto::router_server::RouterServer<Arc<RouterService>>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let ready = Arc::new(AtomicBool::new(false));
    let svc = Arc::new(RouterService::new(cfg.clone(), pipe.clone(), ready.clone()));
    let svc_drain = svc.clone();
    {
        let pipe = pipe.clone();
        let health = health.clone();
        tokio::spawn(async move {
            match warm_up(&pipe).await {
                Ok(_) if pipe.enc.batcher.failure().is_some() => {
                    tracing::error!("encoder stopped during warm-up; staying NOT_SERVING")
                }
                Ok(d) => {
                    ready.store(true, Ordering::Release);
                    health
                        .set_service_status("", tonic_health::ServingStatus::Serving)
                        .await;
                    health
                        .set_serving::<proto::router_server::RouterServer<Arc<RouterService>>>()
                        .await;
                    tracing::info!(ms = ms(d), "warm-up done, serving");
                }
                Err(e) => tracing::error!(error = %e, "warm-up failed; staying NOT_SERVING"),
            }
        });
    }

    {
        // A batcher that stopped serving on its own must take the pod out of rotation.
        let (pipe, health) = (pipe.clone(), health.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut reported = false;
            loop {
                tick.tick().await;
                // Re-asserted every tick, so a late warm-up cannot flip it back.
                if let Some(why) = pipe.enc.batcher.failure() {
                    if !reported {
                        tracing::error!(%why, "encoder stopped; health is NOT_SERVING");
                        reported = true;
                    }
                    health
                        .set_service_status("", tonic_health::ServingStatus::NotServing)
                        .await;
                    health
                        .set_not_serving::<proto::router_server::RouterServer<Arc<RouterService>>>()
                        .await;
                }
            }
        });
    }

    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let health_down = health.clone();
    tonic::transport::Server::builder()
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(proto::router_server::RouterServer::new(svc))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            tracing::info!("shutdown requested: draining");
            svc_drain.begin_drain();
            health_down
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        })
        .await?;
    // Every accepted RPC has been answered; now stop the batcher threads.
    tokio::task::spawn_blocking(move || pipe.enc.batcher.shutdown()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn warm_up(pipe: &Pipeline) -> Result<Duration, TgError> {
    let t0 = Instant::now();
    for text in [
        "warm up the encoder",
        "a second, slightly longer warm-up sentence for the encoder",
    ] {
        pipe.encode(
            "warmup",
            Input::Single(text.into(), TruncSide::HeadTail),
            Priority::High,
            None,
        )
        .await?;
    }
    pipe.encode(
        "warmup",
        Input::Answer("2 + 2 = 4".into(), 128),
        Priority::High,
        None,
    )
    .await?;
    Ok(t0.elapsed())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
