//! Bearer-token authentication in front of every gRPC service on the port, as a tower layer
//! so services attached from src/gateway (Envoy's ext_proc) are covered too. grpc.health.v1
//! stays open: Kubernetes' gRPC probes send no credentials.
#![forbid(unsafe_code)]
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use tonic::body::Body;
use tonic::codegen::http;

use crate::metrics as m;
use crate::service::auth::Tokens;

/// Paths that need no token: the health service (probes, load balancers).
const OPEN_PREFIXES: &[&str] = &["/grpc.health.v1.Health/"];

#[derive(Clone)]
pub struct AuthLayer {
    pub tokens: Option<Arc<Tokens>>,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    tokens: Option<Arc<Tokens>>,
}

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(tokens) = &self.tokens {
            let path = req.uri().path();
            if !OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
                let auth = req
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes());
                if let Err(why) = tokens.check(auth) {
                    // rpc = "auth": the method is client text, not a bounded label.
                    metrics::counter!(m::REJECTIONS, "rpc" => "auth", "reason" => "unauthenticated")
                        .increment(1);
                    tracing::debug!(reason = why.message(), "request refused");
                    let status = tonic::Status::unauthenticated(why.message());
                    return futures::future::ready(Ok(status.into_http())).boxed();
                }
            }
        }
        self.inner.call(req).boxed()
    }
}
