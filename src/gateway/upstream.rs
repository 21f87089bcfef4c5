//! Calls to a catalog model's upstream (an OpenAI-compatible API), each bounded by the
//! request's deadline; replies read whole are bounded in size.
#![forbid(unsafe_code)]
use std::time::Instant;

use axum::body::Bytes;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::Value;

use crate::config::UpstreamConfig;

/// Why an upstream call gave no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream answered with an error status; its body is passed on as it came.
    #[error("upstream {model} answered {status}")]
    Status {
        model: String,
        status: u16,
        body: Bytes,
        content_type: Option<String>,
        /// The upstream's `retry-after` / `retry-after-ms` and `x-ratelimit-*`, passed on
        /// with its error: the SDKs wait that long before they retry a 429 or 503.
        passed_on: Vec<(HeaderName, HeaderValue)>,
    },
    #[error("upstream {model}: no reply before the request's deadline")]
    Timeout { model: String },
    #[error("upstream {model}: {msg}")]
    Transport { model: String, msg: String },
    /// A 2xx reply that is not a chat completion (not JSON, too large, no choices). The
    /// provider billed it: `billed` is the reply where it was JSON (its `usage` is priced),
    /// else `None` (priced as the prompt alone).
    #[error("upstream {model}: bad reply: {msg}")]
    BadReply {
        model: String,
        msg: String,
        billed: Option<Box<Value>>,
    },
    /// The API key's variable is not set: the operator's to fix, no other tier is tried.
    #[error("upstream {model}: environment variable {var} (api_key_env) is not set")]
    MissingKey { model: String, var: String },
}

/// An upstream status that says nothing about the client's request: the gateway's own key or
/// configuration for that upstream (401, 403, 404: a bad key, a model id or base_url the
/// provider does not know), or no error status at all (an unfollowed redirect). The client
/// gets 502, never the upstream's 401 (which its SDK would read as its own key refused).
pub fn gateway_fault(status: u16) -> bool {
    matches!(status, 401 | 403 | 404) || !(400..600).contains(&status)
}

impl UpstreamError {
    /// What a failed call cost, as a reply whose `usage` (or, without one, the prompt) prices
    /// it: a malformed 2xx was billed; an error status, a timeout or no connection was not.
    pub fn billed(&self) -> Option<&Value> {
        static UNREAD: Value = Value::Null;
        match self {
            UpstreamError::BadReply { billed, .. } => Some(billed.as_deref().unwrap_or(&UNREAD)),
            _ => None,
        }
    }

    /// Another tier may succeed where this one failed: rate limits, server errors, the
    /// gateway's own fault with that upstream, network faults and broken replies. Other 4xx
    /// are the request's own fault and go back as is.
    pub fn retryable(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => {
                *status == 429 || *status >= 500 || gateway_fault(*status)
            }
            UpstreamError::Transport { .. } | UpstreamError::BadReply { .. } => true,
            UpstreamError::Timeout { .. } | UpstreamError::MissingKey { .. } => false,
        }
    }
}

/// The headers an upstream's error passes on to the client: when to retry (OpenAI's SDKs
/// read both) and the provider's rate-limit state (`x-ratelimit-*`), which clients pace by.
fn passes_on(name: &str) -> bool {
    matches!(name, "retry-after" | "retry-after-ms") || name.starts_with("x-ratelimit-")
}

#[derive(Clone)]
pub struct Upstreams {
    client: reqwest::Client,
}

impl Upstreams {
    pub fn new() -> anyhow::Result<Upstreams> {
        Ok(Upstreams {
            client: reqwest::Client::builder().build()?,
        })
    }

    /// POSTs `body` to `{base_url}/chat/completions`; a 2xx response is returned with its
    /// body unread (a stream passes through), anything else as an error.
    pub async fn send(
        &self,
        model: &str,
        up: &UpstreamConfig,
        body: Vec<u8>,
        deadline: Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        let timeout = || UpstreamError::Timeout {
            model: model.to_string(),
        };
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timeout)?;
        let url = format!("{}/chat/completions", up.base_url.trim_end_matches('/'));
        // Bounds the whole call, the body's stream included.
        let mut req = self
            .client
            .post(url)
            .timeout(left)
            .header("content-type", "application/json")
            .body(body);
        if let Some(var) = &up.api_key_env {
            let key = std::env::var(var).map_err(|_| UpstreamError::MissingKey {
                model: model.to_string(),
                var: var.clone(),
            })?;
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.map_err(|e| transport(model, e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let passed_on = resp
            .headers()
            .iter()
            // Numbers, durations, HTTP dates: short and printable; a handful at most.
            .filter(|(k, v)| passes_on(k.as_str()) && v.len() <= 64 && v.to_str().is_ok())
            .take(16)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // The error body is for the client; a bounded prefix of it is enough.
        let body = read_bounded(model, resp, 64 << 10)
            .await
            .unwrap_or_default();
        Err(UpstreamError::Status {
            model: model.to_string(),
            status: status.as_u16(),
            body,
            content_type,
            passed_on,
        })
    }

    /// A whole (non-streamed) chat completion, read up to `max_bytes`.
    pub async fn complete(
        &self,
        model: &str,
        up: &UpstreamConfig,
        body: Vec<u8>,
        deadline: Instant,
        max_bytes: usize,
    ) -> Result<Value, UpstreamError> {
        let resp = self.send(model, up, body, deadline).await?;
        let bytes = read_bounded(model, resp, max_bytes).await?;
        let bad = |msg: String, billed: Option<Value>| UpstreamError::BadReply {
            model: model.to_string(),
            msg,
            billed: billed.map(Box::new),
        };
        let v = super::json::bounded(&bytes).map_err(|e| bad(format!("the reply {e}"), None))?;
        // A completion has at least one choice; an empty array is no answer at all (retried
        // at the next tier like any malformed reply).
        if v.get("choices")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            return Err(bad("no `choices`".into(), Some(v)));
        }
        Ok(v)
    }
}

fn transport(model: &str, e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        UpstreamError::Timeout {
            model: model.to_string(),
        }
    } else {
        // The source chain says what failed (refused, reset, DNS).
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        UpstreamError::Transport {
            model: model.to_string(),
            msg,
        }
    }
}

async fn read_bounded(
    model: &str,
    mut resp: reqwest::Response,
    max_bytes: usize,
) -> Result<Bytes, UpstreamError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport(model, e))? {
        if out.len() + chunk.len() > max_bytes {
            return Err(UpstreamError::BadReply {
                model: model.to_string(),
                msg: format!("reply over {max_bytes} bytes (gateway.max_body_bytes)"),
                billed: None,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.into())
}
