//! The `tiergate.v1.Router` service: unary and streaming Route / Verify, and Info. Each RPC
//! converts (convert.rs), asks the decision layer, counts the outcome and maps errors
//! (status.rs).
#![forbid(unsafe_code)]
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::convert::{self, deadline_of};
use super::observe::{self, TraceParent};
use super::status::{classify, message, to_status};
use super::stream::{serve_stream, BoxStream};
use crate::batch::BatchError;
use crate::pipeline::EncodeError;
use crate::proto::{self, router_server::Router};
use crate::service::{Service, ServiceError};

/// The largest Router request (one stream item) the server decodes; tonic's default is 4 MiB.
/// A Verify may carry a prompt, an answer and [`crate::service::MAX_PEERS`] peer answers, each
/// up to `max_input_bytes`, so ten of those plus 64 KiB for names, candidates, policy and
/// framing: anything larger would be refused after decoding anyway, so it is refused before
/// the server buffers it.
pub fn max_request_bytes(b: &crate::config::BatchConfig) -> usize {
    b.max_input_bytes
        .saturating_mul(2 + crate::service::MAX_PEERS)
        .saturating_add(64 * 1024)
}

/// How long before the client's deadline a unary call answers DEADLINE_EXCEEDED itself.
/// tonic's own grpc-timeout timer, started a moment earlier from the same header, would
/// otherwise end the call with CANCELLED "Timeout expired", which gRPC clients do not read as
/// a deadline. Polled first inside that timer's future, ours wins once it has passed.
const ANSWER_BEFORE_DEADLINE: std::time::Duration = std::time::Duration::from_millis(5);

/// `work`, or DEADLINE_EXCEEDED just before `deadline` if it is still running then.
async fn by_deadline<T>(
    deadline: Option<Instant>,
    work: impl std::future::Future<Output = Result<T, ServiceError>>,
) -> Result<T, ServiceError> {
    let Some(d) = deadline else {
        return work.await;
    };
    let at = d.checked_sub(ANSWER_BEFORE_DEADLINE).unwrap_or(d);
    match tokio::time::timeout_at(at.into(), work).await {
        Ok(r) => r,
        Err(_) => Err(EncodeError::from(BatchError::DeadlineExceeded).into()),
    }
}

pub struct RouterService {
    svc: Arc<Service>,
    /// Set on shutdown: open streams stop reading, answer what they already read, and end,
    /// so an idle client stream cannot hold the drain open.
    drain: tokio::sync::watch::Sender<bool>,
}

impl RouterService {
    pub fn new(svc: Arc<Service>) -> Self {
        Self {
            svc,
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

    async fn route_inner(
        &self,
        r: proto::RouteRequest,
        deadline: Option<Instant>,
    ) -> Result<proto::RouteReply, ServiceError> {
        // Readiness first: a warming server says so whatever else is wrong with the request.
        self.svc.check_ready()?;
        let q = convert::route_query(r, deadline)?;
        Ok(convert::route_reply(self.svc.route(q).await?))
    }

    async fn verify_inner(
        &self,
        r: proto::VerifyRequest,
        deadline: Option<Instant>,
    ) -> Result<proto::VerifyReply, ServiceError> {
        self.svc.check_ready()?;
        let q = convert::verify_query(r, deadline)?;
        Ok(convert::verify_reply(self.svc.verify(q).await?))
    }

    /// One Route, counted and timed under `rpc`.
    pub async fn route_one(
        &self,
        r: proto::RouteRequest,
        deadline: Option<Instant>,
        trace: Option<TraceParent>,
    ) -> Result<proto::RouteReply, Status> {
        let span = observe::span("Route", &r.request_id, trace.as_ref());
        async move {
            let guard = observe::Unfinished::new("Route", Instant::now(), deadline);
            let res = by_deadline(deadline, self.route_inner(r, deadline)).await;
            guard.finish(&res);
            res.map_err(|e| to_status(&e))
        }
        .instrument(span)
        .await
    }

    /// One Verify, counted and timed.
    pub async fn verify_one(
        &self,
        r: proto::VerifyRequest,
        deadline: Option<Instant>,
        trace: Option<TraceParent>,
    ) -> Result<proto::VerifyReply, Status> {
        let span = observe::span("Verify", &r.request_id, trace.as_ref());
        async move {
            let guard = observe::Unfinished::new("Verify", Instant::now(), deadline);
            let res = by_deadline(deadline, self.verify_inner(r, deadline)).await;
            guard.finish(&res);
            res.map_err(|e| to_status(&e))
        }
        .instrument(span)
        .await
    }
}

/// A request type of a pipelined stream: how it is answered and how a reply or an error
/// becomes the stream's item.
trait StreamRequest: Send + Sized + 'static {
    type Reply: Send + 'static;
    type Item: Send + 'static;
    const RPC: &'static str;
    fn request_id(&self) -> String;
    fn answer(
        svc: Arc<RouterService>,
        r: Self,
        deadline: Option<Instant>,
    ) -> impl std::future::Future<Output = Result<Self::Reply, ServiceError>> + Send;
    fn item(r: Result<Self::Reply, proto::StreamError>) -> Self::Item;
}

impl StreamRequest for proto::RouteRequest {
    type Reply = proto::RouteReply;
    type Item = proto::RouteStreamReply;
    const RPC: &'static str = "RouteStream";
    fn request_id(&self) -> String {
        self.request_id.clone()
    }
    async fn answer(
        svc: Arc<RouterService>,
        r: Self,
        deadline: Option<Instant>,
    ) -> Result<Self::Reply, ServiceError> {
        svc.route_inner(r, deadline).await
    }
    fn item(r: Result<Self::Reply, proto::StreamError>) -> Self::Item {
        use proto::route_stream_reply::Result as R;
        proto::RouteStreamReply {
            result: Some(r.map_or_else(R::Error, R::Reply)),
        }
    }
}

impl StreamRequest for proto::VerifyRequest {
    type Reply = proto::VerifyReply;
    type Item = proto::VerifyStreamReply;
    const RPC: &'static str = "VerifyStream";
    fn request_id(&self) -> String {
        self.request_id.clone()
    }
    async fn answer(
        svc: Arc<RouterService>,
        r: Self,
        deadline: Option<Instant>,
    ) -> Result<Self::Reply, ServiceError> {
        svc.verify_inner(r, deadline).await
    }
    fn item(r: Result<Self::Reply, proto::StreamError>) -> Self::Item {
        use proto::verify_stream_reply::Result as R;
        proto::VerifyStreamReply {
            result: Some(r.map_or_else(R::Error, R::Reply)),
        }
    }
}

impl RouterService {
    /// A pipelined stream of one request type; each item counted and timed.
    fn answer_stream<R: StreamRequest>(
        self: &Arc<Self>,
        req: Request<Streaming<R>>,
    ) -> BoxStream<R::Item> {
        let dl = deadline_of(&req);
        let trace = trace_of(&req);
        serve_stream(
            self.clone(),
            self.drained(),
            req.into_inner(),
            move |svc: Arc<RouterService>, r: R| {
                let id = r.request_id();
                let span = observe::span(R::RPC, &id, trace.as_ref());
                async move {
                    let guard = observe::Unfinished::new(R::RPC, Instant::now(), dl);
                    let res = R::answer(svc, r, dl).await;
                    guard.finish(&res);
                    R::item(res.map_err(|e| stream_error(id, &e)))
                }
                .instrument(span)
            },
        )
    }
}

/// The caller's W3C trace context, when its `traceparent` is well formed.
fn trace_of<T>(req: &Request<T>) -> Option<TraceParent> {
    TraceParent::parse(req.metadata().get("traceparent")?.to_str().ok()?)
}

fn stream_error(mut request_id: String, e: &ServiceError) -> proto::StreamError {
    // Up to MAX_ERRORS of these go back in one reply: an over-long id is cut (at a character).
    let end = crate::base::prefix(&request_id, crate::service::MAX_REQUEST_ID_BYTES).len();
    request_id.truncate(end);
    proto::StreamError {
        request_id,
        code: classify(e).0 as i32,
        message: message(e),
    }
}

#[tonic::async_trait]
impl Router for Arc<RouterService> {
    async fn route(
        &self,
        req: Request<proto::RouteRequest>,
    ) -> Result<Response<proto::RouteReply>, Status> {
        let dl = deadline_of(&req);
        let trace = trace_of(&req);
        Ok(Response::new(
            self.route_one(req.into_inner(), dl, trace).await?,
        ))
    }

    async fn verify(
        &self,
        req: Request<proto::VerifyRequest>,
    ) -> Result<Response<proto::VerifyReply>, Status> {
        let dl = deadline_of(&req);
        let trace = trace_of(&req);
        Ok(Response::new(
            self.verify_one(req.into_inner(), dl, trace).await?,
        ))
    }

    type RouteStreamStream = BoxStream<proto::RouteStreamReply>;
    type VerifyStreamStream = BoxStream<proto::VerifyStreamReply>;

    async fn route_stream(
        &self,
        req: Request<Streaming<proto::RouteRequest>>,
    ) -> Result<Response<Self::RouteStreamStream>, Status> {
        Ok(Response::new(self.answer_stream(req)))
    }

    async fn verify_stream(
        &self,
        req: Request<Streaming<proto::VerifyRequest>>,
    ) -> Result<Response<Self::VerifyStreamStream>, Status> {
        Ok(Response::new(self.answer_stream(req)))
    }

    async fn feedback(
        &self,
        req: Request<proto::FeedbackRequest>,
    ) -> Result<Response<proto::FeedbackReply>, Status> {
        let trace = trace_of(&req);
        let dl = deadline_of(&req);
        let r = req.into_inner();
        let span = observe::span("Feedback", &r.request_id, trace.as_ref());
        let guard = observe::Unfinished::new("Feedback", Instant::now(), dl);
        let res = self
            .svc
            .feedback(convert::feedback_query(r))
            .instrument(span.clone())
            .await;
        span.in_scope(|| guard.finish(&res));
        res.map_err(|e| to_status(&e))?;
        Ok(Response::new(proto::FeedbackReply {
            accepted: 1,
            errors: vec![],
        }))
    }

    async fn feedback_stream(
        &self,
        req: Request<Streaming<proto::FeedbackRequest>>,
    ) -> Result<Response<proto::FeedbackReply>, Status> {
        let trace = trace_of(&req);
        let dl = deadline_of(&req);
        let mut inbound = req.into_inner();
        let (mut accepted, mut errors) = (0u32, Vec::new());
        // Bounded like everything else: past this many bad items only the count grows.
        const MAX_ERRORS: usize = 100;
        // A drain ends the stream between items with what was processed so far (in order:
        // the first `accepted + errors` items), so an idle open stream cannot hold the
        // shutdown and the client learns what was kept instead of resending all of it.
        let drained = self.drained();
        tokio::pin!(drained);
        loop {
            let next = tokio::select! {
                biased;
                _ = &mut drained => break,
                m = inbound.message() => m?,
            };
            let Some(item) = next else { break };
            let guard = observe::Unfinished::new("FeedbackStream", Instant::now(), dl);
            let id = item.request_id.clone();
            let span = observe::span("FeedbackStream", &id, trace.as_ref());
            let res = self
                .svc
                .feedback(convert::feedback_query(item))
                .instrument(span.clone())
                .await;
            span.in_scope(|| guard.finish(&res));
            match res {
                Ok(()) => accepted = accepted.saturating_add(1),
                Err(e) if errors.len() < MAX_ERRORS => errors.push(stream_error(id, &e)),
                Err(_) => {}
            }
        }
        Ok(Response::new(proto::FeedbackReply { accepted, errors }))
    }

    async fn info(
        &self,
        _req: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoReply>, Status> {
        Ok(Response::new(convert::info_reply(&self.svc)))
    }
}
