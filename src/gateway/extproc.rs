//! Envoy's external processor (`envoy.service.ext_proc.v3.ExternalProcessor`). On a buffered
//! `POST …/chat/completions` whose `model` is `auto` (or `auto:<name>`), Route picks the model;
//! the body's `model` is rewritten to its provider id (content-length fixed), the decision is
//! set in `x-tiergate-*` request headers and the route cache cleared, so Envoy routes on
//! `x-tiergate-model`. A JSON reply to such a request is buffered (asked for uncompressed) and
//! gets `x-tiergate-cost-usd` from its `usage` at catalog prices, unless it is over Envoy's
//! buffer limit; anything else passes untouched (SSE streams included). deploy/envoy.yaml
//! configures the filter.
#![forbid(unsafe_code)]
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{
    BodySendMode, HeaderSendMode,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, processing_request as req, processing_response as resp, BodyMutation,
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders, ImmediateResponse,
    ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::chat::{self, Ask};
use super::status::{error_body, refusal_headers, GatewayError};
use super::targets::{callable, entry, policy, prices, route_query};
use crate::batch::BatchError;
use crate::pipeline::EncodeError;
use crate::service::{RouteInput, Service, ServiceError};

pub struct ExtProc {
    pub svc: Arc<Service>,
    /// Set when the server drains: a stream whose request is decided ends (see `process`).
    pub drain: tokio::sync::watch::Receiver<bool>,
}

/// One HTTP exchange as the processor sees it.
#[derive(Default)]
struct Exchange {
    /// A chat completion whose body is worth reading.
    chat: bool,
    /// The request phases are answered: what is left is the reply's (its cost).
    request_done: bool,
    /// The model Route chose, with what its reply's cost needs.
    routed: Option<Routed>,
}

struct Routed {
    model: String,
    prompt_bytes: usize,
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        // One reply per message, in order: a small buffer is enough.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let svc = self.svc.clone();
        let mut drain = self.drain.clone();
        tokio::spawn(async move {
            let mut ex = Exchange::default();
            loop {
                // Draining: once the request is routed, the stream ends (Envoy goes on without
                // the processor). Its reply, which may take minutes, goes unpriced rather than
                // holding the drain until drain.timeout_s.
                let draining = async {
                    if drain.wait_for(|d| *d).await.is_err() {
                        std::future::pending::<()>().await
                    }
                };
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = draining, if ex.request_done => break,
                };
                let msg = match msg {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break,
                    Err(e) => {
                        // A message over the decode limit, a reset stream: Envoy goes on
                        // without tiergate (fail-open), so say why here.
                        tracing::warn!(error = %e, "ext_proc stream ended");
                        break;
                    }
                };
                let Some(r) = msg.request else { continue };
                let out = ex.handle(&svc, r).await;
                if tx.send(Ok(out)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn header<'a>(h: &'a HttpHeaders, name: &str) -> Option<&'a str> {
    let m = h.headers.as_ref()?;
    let v = m
        .headers
        .iter()
        .find(|v| v.key.eq_ignore_ascii_case(name))?;
    if v.raw_value.is_empty() {
        Some(v.value.as_str())
    } else {
        std::str::from_utf8(&v.raw_value).ok()
    }
}

fn set(headers: &[(&str, String)]) -> HeaderMutation {
    HeaderMutation {
        set_headers: headers
            .iter()
            .map(|(k, v)| HeaderValueOption {
                header: Some(HeaderValue {
                    key: k.to_string(),
                    raw_value: v.clone().into_bytes(),
                    ..Default::default()
                }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            })
            .collect(),
        remove_headers: vec![],
    }
}

impl Exchange {
    async fn handle(&mut self, svc: &Service, r: req::Request) -> ProcessingResponse {
        let mut out = ProcessingResponse::default();
        out.response = Some(match r {
            req::Request::RequestHeaders(h) => {
                let path = header(&h, ":path").unwrap_or("");
                let path = path.split('?').next().unwrap_or("");
                self.chat = header(&h, ":method") == Some("POST")
                    && path.ends_with("/chat/completions")
                    && !h.end_of_stream;
                self.request_done = !self.chat;
                if !self.chat {
                    // Nothing to decide: no body, and no reply, is sent to us.
                    out.mode_override = Some(ProcessingMode {
                        request_body_mode: BodySendMode::None as i32,
                        response_header_mode: HeaderSendMode::Skip as i32,
                        response_body_mode: BodySendMode::None as i32,
                        ..Default::default()
                    });
                }
                resp::Response::RequestHeaders(HeadersResponse {
                    response: strip_ours(&h),
                })
            }
            req::Request::RequestBody(b) if self.chat && b.end_of_stream => {
                self.request_done = true;
                match self.route(svc, &b.body).await {
                    Ok(c) => resp::Response::RequestBody(BodyResponse { response: c }),
                    Err(e) if e.is_busy() && passes_when_busy(svc) => pass_unrouted(&e),
                    Err(e) => immediate(e),
                }
            }
            req::Request::RequestBody(_) => resp::Response::RequestBody(BodyResponse::default()),
            req::Request::ResponseHeaders(h) => {
                let mut c = CommonResponse::default();
                if let Some(r) = &self.routed {
                    c.header_mutation = Some(set(&[("x-tiergate-model", r.model.clone())]));
                    let ok = header(&h, ":status").is_some_and(|s| s.starts_with('2'));
                    let json = header(&h, "content-type")
                        .is_some_and(|t| t.starts_with("application/json"));
                    if ok && json && !h.end_of_stream {
                        // Only a whole JSON reply has `usage` to price; streams stay streams.
                        // Partial: a reply over Envoy's buffer limit passes on unpriced (with
                        // BUFFERED it would become a 500 after the provider billed it).
                        out.mode_override = Some(ProcessingMode {
                            response_body_mode: BodySendMode::BufferedPartial as i32,
                            ..Default::default()
                        });
                    }
                }
                resp::Response::ResponseHeaders(HeadersResponse { response: Some(c) })
            }
            req::Request::ResponseBody(b) => {
                let mut c = CommonResponse::default();
                // Only a whole reply is parsed: a partial one (over Envoy's buffer limit) is
                // not JSON, and reading up to 4 MiB of it would be wasted.
                let whole = self.routed.as_ref().filter(|_| b.end_of_stream);
                let reply = whole.map(|r| (r, super::json::bounded(&b.body)));
                if let Some((r, Ok(reply))) = reply {
                    let d = svc.decider();
                    let (i, o) = prices(&d, &r.model);
                    let cost = chat::cost(chat::tokens(&reply, r.prompt_bytes), i, o);
                    c.header_mutation = Some(set(&[("x-tiergate-cost-usd", cost.to_string())]));
                }
                resp::Response::ResponseBody(BodyResponse { response: Some(c) })
            }
            req::Request::RequestTrailers(_) => {
                resp::Response::RequestTrailers(TrailersResponse::default())
            }
            req::Request::ResponseTrailers(_) => {
                resp::Response::ResponseTrailers(TrailersResponse::default())
            }
        });
        out
    }

    /// Route an `auto` body; `None` leaves the request as it came.
    async fn route(
        &mut self,
        svc: &Service,
        body: &[u8],
    ) -> Result<Option<CommonResponse>, GatewayError> {
        let d = svc.decider();
        let g = &d.cfg.gateway;
        // Not ours to judge: a body that is not a chat request goes on untouched.
        let Ok((json, model)) = chat::parse(body) else {
            return Ok(None);
        };
        let Ask::Auto(name) = chat::ask(&model, &g.auto_model) else {
            return Ok(None);
        };
        svc.check_ready()?;
        let (pol, _, _) = policy(g, name.as_deref())?;
        let turns = chat::turns(&json)?;
        let input = RouteInput::Messages(turns);
        let prompt_bytes = input.text().len();
        let deadline = Instant::now() + Duration::from_millis(g.ext_proc_route_ms);
        // With upstreams configured, only those; else the catalog.
        // The deadline also bounds a batch already computing (the batcher drops only what
        // still waits): Envoy's message_timeout must not be what ends a slow Route.
        let routed = svc.route(route_query(input, callable(&d), pol, deadline));
        let o = match tokio::time::timeout_at(deadline.into(), routed).await {
            Ok(o) => o?,
            Err(_) => {
                return Err(
                    ServiceError::from(EncodeError::Batch(BatchError::DeadlineExceeded)).into(),
                )
            }
        };
        let provider = entry(&d, &o.model)
            .and_then(|e| e.upstream.as_ref()?.model.clone())
            .unwrap_or_else(|| o.model.clone());
        let new_body = chat::with_model(&json, &provider);
        let p_pass = o
            .candidates
            .iter()
            .find(|c| c.model == o.model)
            .map_or(0.0, |c| c.p_pass);
        let mut headers = set(&[
            ("x-tiergate-model", o.model.clone()),
            ("x-tiergate-p-pass", format!("{p_pass:.4}")),
            (
                "x-tiergate-expected-cost-usd",
                o.expected_cost_usd.to_string(),
            ),
            (
                "x-tiergate-expected-saving-usd",
                o.expected_saving_usd.to_string(),
            ),
            ("content-length", new_body.len().to_string()),
        ]);
        // The reply's `usage` is read to price it: ask for it uncompressed.
        headers.remove_headers.push("accept-encoding".into());
        self.routed = Some(Routed {
            model: o.model,
            prompt_bytes,
        });
        Ok(Some(CommonResponse {
            header_mutation: Some(headers),
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::Body(new_body)),
            }),
            clear_route_cache: true,
            ..Default::default()
        }))
    }
}

/// Our headers as a client sent them are dropped (and the route recomputed): only tiergate
/// decides which cluster `x-tiergate-model` sends a request to.
fn strip_ours(h: &HttpHeaders) -> Option<CommonResponse> {
    let ours: Vec<String> = h
        .headers
        .as_ref()?
        .headers
        .iter()
        .filter(|v| v.key.to_ascii_lowercase().starts_with("x-tiergate-"))
        .map(|v| v.key.clone())
        .collect();
    (!ours.is_empty()).then(|| CommonResponse {
        header_mutation: Some(HeaderMutation {
            set_headers: vec![],
            remove_headers: ours,
        }),
        clear_route_cache: true,
        ..Default::default()
    })
}

fn passes_when_busy(svc: &Service) -> bool {
    svc.decider().cfg.gateway.ext_proc_when_busy == crate::config::WhenBusy::Pass
}

/// tiergate could not decide in time: the request goes on as it came, to Envoy's default
/// route, as it would with tiergate down (`gateway.ext_proc_when_busy = "pass"`); the
/// upstream sees why in `x-tiergate-skipped`.
fn pass_unrouted(e: &GatewayError) -> resp::Response {
    let (_, kind) = e.status();
    tracing::debug!(error = %e, "ext_proc: no capacity to route; passed on unrouted");
    metrics::counter!(crate::metrics::EXT_PROC_PASSED, "reason" => kind).increment(1);
    resp::Response::RequestBody(BodyResponse {
        response: Some(CommonResponse {
            header_mutation: Some(set(&[("x-tiergate-skipped", kind.to_string())])),
            ..Default::default()
        }),
    })
}

/// A refused request is answered by Envoy at once, in the HTTP front's error format (body,
/// `x-tiergate-error`, and `retry-after` on our own 429).
fn immediate(e: GatewayError) -> resp::Response {
    let (status, kind) = e.status();
    let mut headers = vec![("content-type", "application/json".to_string())];
    headers.extend(
        refusal_headers(&e)
            .into_iter()
            .map(|(k, v)| (k, v.to_string())),
    );
    resp::Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus {
            code: status.as_u16() as i32,
        }),
        headers: Some(set(&headers)),
        body: error_body(&e.to_string(), kind),
        details: format!("tiergate_{kind}"),
        ..Default::default()
    })
}
