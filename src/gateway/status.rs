//! The gateway's errors as HTTP statuses and OpenAI-style error bodies (`{"error": {...}}`),
//! beside `server/status.rs`, which maps the same `ServiceError` to gRPC codes.
#![forbid(unsafe_code)]
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::upstream::{gateway_fault, UpstreamError};
use crate::batch::BatchError;
use crate::pipeline::EncodeError;
use crate::service::ServiceError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed (not JSON, no messages, an unknown policy).
    #[error("{0}")]
    BadRequest(String),
    /// The body could not be read: over `gateway.max_body_bytes` (413), or broken off.
    #[error("{1}")]
    Unreadable(StatusCode, String),
    /// `model` names nothing this gateway can call.
    #[error("{0}")]
    UnknownModel(String),
    /// A path (404) or method (405) the front does not serve.
    #[error("{1}")]
    NoRoute(StatusCode, String),
    /// `gateway.max_concurrent` requests are already running (429, retry shortly).
    #[error("{0}")]
    Busy(String),
    /// The body did not arrive within the request's deadline (408).
    #[error("{0}")]
    SlowBody(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// HTTP status and OpenAI error `type` of a decision-layer error.
pub fn classify(e: &ServiceError) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match e {
        ServiceError::InvalidArgument(_) => (S::BAD_REQUEST, "invalid_request_error"),
        ServiceError::NotReady(_) => (S::SERVICE_UNAVAILABLE, "unavailable"),
        ServiceError::Encode(EncodeError::Batch(b)) => match b {
            BatchError::InvalidInput(_) => (S::BAD_REQUEST, "invalid_request_error"),
            BatchError::Overloaded(_) => (S::TOO_MANY_REQUESTS, "rate_limit_error"),
            BatchError::DeadlineExceeded => (S::GATEWAY_TIMEOUT, "timeout"),
            BatchError::Unavailable(_) => (S::SERVICE_UNAVAILABLE, "unavailable"),
            BatchError::Backend(_) | BatchError::Internal(_) => {
                (S::INTERNAL_SERVER_ERROR, "server_error")
            }
        },
        ServiceError::Reload(_)
        | ServiceError::Disabled(_)
        | ServiceError::Storage(_)
        | ServiceError::Encode(_) => (S::INTERNAL_SERVER_ERROR, "server_error"),
    }
}

impl GatewayError {
    /// tiergate had no capacity to decide (overloaded, out of time, warming up or its backend
    /// down): nothing is wrong with the request.
    pub fn is_busy(&self) -> bool {
        use crate::batch::BatchError as B;
        matches!(
            self,
            GatewayError::Service(ServiceError::NotReady(_))
                | GatewayError::Service(ServiceError::Encode(EncodeError::Batch(
                    B::Overloaded(_) | B::DeadlineExceeded | B::Unavailable(_)
                )))
        )
    }

    pub fn status(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            GatewayError::BadRequest(_) => (S::BAD_REQUEST, "invalid_request_error"),
            GatewayError::Unreadable(s, _) if *s == S::PAYLOAD_TOO_LARGE => {
                (*s, "request_too_large")
            }
            GatewayError::Unreadable(s, _) => (*s, "invalid_request_error"),
            GatewayError::UnknownModel(_) => (S::NOT_FOUND, "model_not_found"),
            GatewayError::NoRoute(s, _) => (*s, "invalid_request_error"),
            GatewayError::Busy(_) => (S::TOO_MANY_REQUESTS, "rate_limit_error"),
            GatewayError::SlowBody(_) => (S::REQUEST_TIMEOUT, "timeout"),
            GatewayError::Service(e) => classify(e),
            GatewayError::Upstream(u) => match u {
                UpstreamError::Status { status, .. } if gateway_fault(*status) => {
                    (S::BAD_GATEWAY, "upstream_error")
                }
                UpstreamError::Status { status, .. } => (
                    S::from_u16(*status).unwrap_or(S::BAD_GATEWAY),
                    "upstream_error",
                ),
                UpstreamError::Timeout { .. } => (S::GATEWAY_TIMEOUT, "timeout"),
                UpstreamError::Transport { .. } | UpstreamError::BadReply { .. } => {
                    (S::BAD_GATEWAY, "upstream_error")
                }
                UpstreamError::MissingKey { .. } => (S::INTERNAL_SERVER_ERROR, "server_error"),
            },
        }
    }
}

/// An OpenAI-style error body.
pub fn error_body(message: &str, kind: &str) -> Vec<u8> {
    let v = serde_json::json!({"error": {"message": message, "type": kind, "code": kind}});
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The headers every refusal carries: `x-tiergate-error` (the error's type), and on tiergate's
/// own 429 `retry-after: 1` (its overload passes in a moment; what OpenAI's SDKs wait before
/// their own retry). An upstream's 429 keeps its own say.
pub fn refusal_headers(e: &GatewayError) -> Vec<(&'static str, &'static str)> {
    let (status, kind) = e.status();
    let mut h = vec![("x-tiergate-error", kind)];
    if status == StatusCode::TOO_MANY_REQUESTS && !matches!(e, GatewayError::Upstream(_)) {
        h.push(("retry-after", "1"));
    }
    h
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status();
        let extra = refusal_headers(&self);
        let mut resp = match self {
            // The upstream's own error reaches the client as the upstream wrote it, unless
            // it is about the gateway's own key or configuration (502, in our words).
            GatewayError::Upstream(UpstreamError::Status {
                body,
                content_type,
                status: code,
                passed_on,
                ..
            }) if !body.is_empty() && !gateway_fault(code) => {
                let ct = content_type.unwrap_or_else(|| "application/json".into());
                let mut r = (status, [(header::CONTENT_TYPE, ct)], body).into_response();
                for (k, v) in passed_on {
                    r.headers_mut().insert(k, v);
                }
                r
            }
            e => (
                status,
                [(header::CONTENT_TYPE, "application/json".to_string())],
                error_body(&e.to_string(), kind),
            )
                .into_response(),
        };
        for (k, v) in extra {
            resp.headers_mut()
                .insert(k, header::HeaderValue::from_static(v));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_as_a_gateway_would() {
        let up = |status| {
            GatewayError::Upstream(UpstreamError::Status {
                model: "m".into(),
                status,
                body: Default::default(),
                content_type: None,
                passed_on: vec![],
            })
        };
        assert_eq!(up(429).status().0, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(up(503).status().0, StatusCode::SERVICE_UNAVAILABLE);
        // The gateway's own key or configuration for that upstream: 502, and the next tier
        // is tried; the request's own fault (400) goes back as is.
        for s in [401, 403, 404, 302] {
            assert_eq!(up(s).status().0, StatusCode::BAD_GATEWAY, "{s}");
            let GatewayError::Upstream(u) = up(s) else {
                unreachable!()
            };
            assert!(u.retryable(), "{s}");
        }
        assert_eq!(up(400).status().0, StatusCode::BAD_REQUEST);
        let batch = |b| GatewayError::Service(ServiceError::Encode(EncodeError::Batch(b)));
        assert_eq!(
            batch(BatchError::Overloaded("q".into())).status().0,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            batch(BatchError::DeadlineExceeded).status().0,
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            GatewayError::Service(ServiceError::NotReady("w".into()))
                .status()
                .0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            GatewayError::UnknownModel("x".into()).status().0,
            StatusCode::NOT_FOUND
        );
        let t = UpstreamError::Timeout { model: "m".into() };
        assert!(!t.retryable());
        assert_eq!(
            GatewayError::Upstream(t).status().0,
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
