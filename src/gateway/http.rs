//! The OpenAI-compatible HTTP front: `POST /v1/chat/completions` (the cascade, or a stream
//! passed through), `GET /v1/models` and `GET /v1/models/{model}`; any other path or method
//! is an OpenAI-style 404 or 405. Replies carry what was decided and spent in
//! `x-tiergate-*` headers and `usage.cost`.
#![forbid(unsafe_code)]
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::cascade::Front;
use super::chat;
use super::status::GatewayError;
use super::targets::callable;
use crate::metrics as m;

/// A client's deadline for the whole request, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-tiergate-timeout-ms";

/// The access log's target, as the gRPC edge's (`RUST_LOG=info,tiergate::access=debug`).
const ACCESS: &str = "tiergate::access";

/// A client's `x-request-id` is logged up to this many bytes (as gRPC request ids).
const MAX_LOGGED_ID: usize = 128;

/// What one answered chat completion shipped, for its access line.
struct Answered {
    model: String,
    escalations: u32,
    cost_usd: f64,
    /// What the most expensive candidate would have cost for the shipped answer's tokens;
    /// None for a stream passed through, whose bill is in its events.
    baseline_usd: Option<f64>,
    stream: bool,
    /// A consensus policy's outcome (logged only then).
    consensus: Option<&'static str>,
}

pub fn router(front: Arc<Front>, max_concurrent: usize) -> axum::Router {
    let running = Arc::new(Semaphore::new(max_concurrent));
    axum::Router::new()
        .route("/v1/chat/completions", post(completions))
        .route_layer(axum::middleware::from_fn_with_state(running, admit))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route_layer(axum::middleware::from_fn_with_state(
            front.clone(),
            authenticate,
        ))
        // Anything else is answered as OpenAI answers an unknown URL (the SDKs raise it with
        // its message), not with an empty body.
        .fallback(|m, u| no_route(StatusCode::NOT_FOUND, m, u))
        .method_not_allowed_fallback(|m, u| no_route(StatusCode::METHOD_NOT_ALLOWED, m, u))
        .with_state(front)
}

async fn no_route(
    status: StatusCode,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    let msg = format!(
        "Invalid URL ({method} {}): this gateway serves POST /v1/chat/completions, \
         GET /v1/models and GET /v1/models/{{model}}",
        crate::base::prefix(uri.path(), 256)
    );
    GatewayError::NoRoute(status, msg).into_response()
}

/// At most `gateway.max_concurrent` chat completions at once (after authentication): each
/// holds its body and upstream replies while it runs. One more is a 429 at once, which
/// clients retry, rather than memory that grows with the number of clients. A stream holds
/// its place until its headers go out.
async fn admit(
    State(running): State<Arc<Semaphore>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Ok(_permit) = running.try_acquire() else {
        let t0 = Instant::now();
        metrics::counter!(m::REJECTIONS, "rpc" => "ChatCompletions", "reason" => "max_concurrent")
            .increment(1);
        // Counted and logged as every other answer of the front.
        let busy =
            GatewayError::Busy("gateway.max_concurrent requests are running; retry shortly".into());
        let r: Result<(Response, Answered), _> = Err(busy);
        // In the request's span, as the answers past the cap are.
        request_span(req.headers()).in_scope(|| observe(t0, &r));
        return r.map_or_else(IntoResponse::into_response, |(resp, _)| resp);
    };
    next.run(req).await
}

/// With `[auth]` on, the same bearer tokens as gRPC; a miss is a 401 in OpenAI's shape (what
/// its SDKs raise as an authentication error), before the body is read.
async fn authenticate(
    State(front): State<Arc<Front>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(tokens) = &front.svc.tokens {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if let Err(why) = tokens.check(auth) {
            metrics::counter!(crate::metrics::REJECTIONS, "rpc" => "auth", "reason" => "unauthenticated")
                .increment(1);
            let body = serde_json::json!({"error": {
                "message": why.message(),
                "type": "invalid_request_error",
                "param": null,
                "code": "invalid_api_key",
            }});
            return (
                StatusCode::UNAUTHORIZED,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::WWW_AUTHENTICATE, "Bearer"),
                ],
                serde_json::to_vec(&body).unwrap_or_default(),
            )
                .into_response();
        }
    }
    next.run(req).await
}

fn deadline(headers: &HeaderMap, limit: Duration) -> Instant {
    let asked = headers
        .get(TIMEOUT_HEADER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    // A day bounds any configured limit, so the instant is always representable.
    let d = asked.map_or(limit, |a| a.min(limit));
    Instant::now() + d.min(Duration::from_secs(crate::config::MAX_REQUEST_TIMEOUT_S))
}

fn set(h: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(name, v);
    }
}

async fn completions(State(front): State<Arc<Front>>, headers: HeaderMap, body: Body) -> Response {
    let t0 = Instant::now();
    let span = request_span(&headers);
    async move {
        let g = front.svc.decider().cfg.gateway.clone();
        let deadline = deadline(&headers, Duration::from_secs(g.timeout_s));
        // A body over the limit, broken off or too slow, in the same error format.
        let r = match read_body(body, g.max_body_bytes, deadline).await {
            Ok(b) => answer(&front, &g, deadline, &b).await,
            Err(e) => Err(e),
        };
        observe(t0, &r);
        match r {
            Ok((resp, _)) => resp,
            Err(e) => e.into_response(),
        }
    }
    .instrument(span)
    .await
}

fn clip_id(s: &str) -> &str {
    crate::base::prefix(s, MAX_LOGGED_ID)
}

/// The span of one chat completion's log lines: `rpc` and the client's `x-request-id`.
fn request_span(headers: &HeaderMap) -> tracing::Span {
    let id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map_or("", clip_id);
    tracing::info_span!("request", rpc = "ChatCompletions", request_id = id)
}

/// Counts, times and logs one chat completion (the model that answered, escalations and
/// cost; never the prompt or the answer), like the gRPC edge's access lines. A stream is
/// counted when its headers go out: its latency is the time to the upstream's first byte.
fn observe(t0: Instant, r: &Result<(Response, Answered), GatewayError>) {
    let seconds = t0.elapsed().as_secs_f64();
    let latency_ms = seconds * 1e3;
    let status = match r {
        Ok((_, a)) => {
            tracing::debug!(target: ACCESS, status = 200u16, model = %a.model,
                escalations = a.escalations, cost_usd = a.cost_usd, stream = a.stream,
                consensus = a.consensus, latency_ms, "answered");
            // What answered requests cost at catalog prices on the upstreams' usage, and what
            // the dearest candidate would have: their difference is the saving (either may
            // grow faster; a running sum cannot fall, so the saving is not one).
            if let Some(base) = a.baseline_usd {
                m::add_usd(m::GATEWAY_COST, &a.model, a.cost_usd);
                m::add_usd(m::GATEWAY_BASELINE, &a.model, base);
            }
            StatusCode::OK
        }
        Err(e) => {
            let (status, reason) = e.status();
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::warn!(target: ACCESS, status = status.as_u16(), reason, latency_ms,
                    error = %e, "answered");
            } else {
                tracing::debug!(target: ACCESS, status = status.as_u16(), reason, latency_ms,
                    "answered");
            }
            status
        }
    };
    let route = "/v1/chat/completions";
    metrics::counter!(m::HTTP_REQUESTS, "route" => route, "status" => status.as_str().to_string())
        .increment(1);
    metrics::histogram!(m::HTTP_REQUEST_SECONDS, "route" => route).record(seconds);
}

/// An upstream stream passed through; where it breaks off (the upstream failed, the deadline
/// passed) the client gets an `error` event, as OpenAI's own streams end on an error (its SDKs
/// raise it), and the break is logged and counted, instead of a stream that just stops.
fn with_error_event<S>(
    upstream: S,
    model: String,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>>
where
    S: futures::Stream<Item = Result<Bytes, reqwest::Error>>,
{
    use futures::StreamExt;
    // (broken off already, the last chunk ended a frame)
    upstream.scan((false, true), move |(broken, at_frame_end), item| {
        let out = match item {
            _ if *broken => None,
            Ok(b) => {
                if !b.is_empty() {
                    *at_frame_end = b.ends_with(b"\n\n");
                }
                Some(b)
            }
            Err(e) => {
                *broken = true;
                tracing::warn!(model = %model, error = %e, "upstream stream broke off");
                metrics::counter!(m::HTTP_STREAM_ERRORS, "model" => model.clone()).increment(1);
                let err = serde_json::json!({"error": {
                        "message": format!("upstream {model}: the stream broke off: {e}"),
                        "type": "upstream_error", "code": "upstream_error"}});
                // A frame cut in half is closed first, so the event parses on its own.
                let close = if *at_frame_end { "" } else { "\n\n" };
                Some(Bytes::from(format!("{close}data: {err}\n\n")))
            }
        };
        futures::future::ready(out.map(Ok))
    })
}

/// The body, whole, within `limit` bytes and by `deadline` (the request's own): a client
/// that trickles it is answered 408 instead of holding its connection as long as it likes.
async fn read_body(body: Body, limit: usize, deadline: Instant) -> Result<Bytes, GatewayError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let read = Limited::new(body, limit).collect();
    match tokio::time::timeout(left, read).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(GatewayError::Unreadable(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over gateway.max_body_bytes = {limit}"),
            ))
        }
        Ok(Err(e)) => Err(GatewayError::Unreadable(
            StatusCode::BAD_REQUEST,
            format!("reading the request body: {e}"),
        )),
        Err(_) => Err(GatewayError::SlowBody(format!(
            "the request body did not arrive within the request's deadline ({} ms)",
            left.as_millis()
        ))),
    }
}

async fn answer(
    front: &Front,
    g: &crate::config::GatewayConfig,
    deadline: Instant,
    body: &[u8],
) -> Result<(Response, Answered), GatewayError> {
    front.svc.check_ready()?;
    let (body, model) = chat::parse(body)?;
    let ask = chat::ask(&model, &g.auto_model);
    let streamed = chat::is_stream(&body);
    if streamed && !front.streams_whole(&ask) {
        let s = front.stream(body, ask, deadline).await?;
        let mut out = HeaderMap::new();
        if let Some(ct) = s.resp.headers().get(header::CONTENT_TYPE) {
            out.insert(header::CONTENT_TYPE, ct.clone());
        }
        let answered = Answered {
            model: s.model.clone(),
            escalations: s.escalations,
            cost_usd: s.expected_cost_usd,
            baseline_usd: None,
            stream: true,
            consensus: None,
        };
        set(&mut out, "x-tiergate-model", s.model);
        set(
            &mut out,
            "x-tiergate-expected-cost-usd",
            s.expected_cost_usd.to_string(),
        );
        set(
            &mut out,
            "x-tiergate-escalations",
            s.escalations.to_string(),
        );
        let stream = Body::from_stream(with_error_event(
            s.resp.bytes_stream(),
            answered.model.clone(),
        ));
        return Ok(((StatusCode::OK, out, stream).into_response(), answered));
    }
    // A stream asked of a consensus or of `stream = "cascade"` reads whole answers, then
    // streams the one that ships.
    let usage = chat::wants_usage(&body);
    let body = if streamed {
        chat::without_stream(&body)
    } else {
        body
    };
    let s = front.complete(body, ask, deadline).await?;
    let answered = Answered {
        model: s.model.clone(),
        escalations: s.escalations,
        cost_usd: s.cost_usd,
        baseline_usd: Some(s.cost_usd + s.saved_usd),
        stream: streamed,
        consensus: s.consensus,
    };
    let mut out = HeaderMap::new();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if streamed {
            "text/event-stream"
        } else {
            "application/json"
        }),
    );
    set(&mut out, "x-tiergate-model", s.model);
    set(&mut out, "x-tiergate-cost-usd", s.cost_usd.to_string());
    set(&mut out, "x-tiergate-saved-usd", s.saved_usd.to_string());
    set(
        &mut out,
        "x-tiergate-escalations",
        s.escalations.to_string(),
    );
    if let Some(outcome) = s.consensus {
        set(&mut out, "x-tiergate-consensus", outcome.to_string());
    }
    let bytes = if streamed {
        chat::as_sse(&s.reply, usage)
    } else {
        serde_json::to_vec(&s.reply).unwrap_or_default()
    };
    Ok(((StatusCode::OK, out, bytes).into_response(), answered))
}

/// The `model` values the front answers: the routing one, each named policy, and every
/// catalog model with an upstream.
fn model_ids(front: &Front) -> Vec<String> {
    let d = front.svc.decider();
    let g = &d.cfg.gateway;
    std::iter::once(g.auto_model.clone())
        .chain(g.policies.keys().map(|p| format!("{}:{p}", g.auto_model)))
        .chain(callable(&d))
        .collect()
}

fn model_object(id: String) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "tiergate"})
}

fn json_reply(body: &serde_json::Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(body).unwrap_or_default(),
    )
        .into_response()
}

async fn models(State(front): State<Arc<Front>>) -> Response {
    let data: Vec<_> = model_ids(&front).into_iter().map(model_object).collect();
    json_reply(&serde_json::json!({"object": "list", "data": data}))
}

/// One model, as OpenAI's retrieve-model answers (clients and health checks call it).
async fn model(
    State(front): State<Arc<Front>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match model_ids(&front).into_iter().find(|m| *m == id) {
        Some(id) => json_reply(&model_object(id)),
        None => GatewayError::UnknownModel(format!(
            "The model `{}` does not exist here (see GET /v1/models)",
            crate::base::prefix(&id, 256)
        ))
        .into_response(),
    }
}
