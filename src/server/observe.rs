//! What the edge records about each answer and about the process: request counts and
//! timings, what Route's choices are expected to cost and save, whether the Router is
//! serving and what build serves. Recorded here, where a whole outcome is known, so the
//! decision layer below stays free of per-reply bookkeeping.
#![forbid(unsafe_code)]
use std::time::Instant;

use super::status::{classify, code_name};
use crate::metrics as m;
use crate::service::{Service, ServiceError};

/// Where each answered request is logged: `RUST_LOG=info,tiergate::access=debug` writes one
/// line per request; faults on our side (INTERNAL) are written at warn.
const ACCESS: &str = "tiergate::access";

/// A client's request id is logged up to this many bytes.
const MAX_LOGGED_ID: usize = 128;

/// The caller's place in a distributed trace, from a W3C `traceparent` header (version 00:
/// `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`), so that log lines join the
/// caller's trace. A malformed header is ignored: it is advisory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
}

impl TraceParent {
    pub fn parse(v: &str) -> Option<TraceParent> {
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let mut it = v.trim().split('-');
        let (ver, trace, parent, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
        let valid = ver == "00"
            && it.next().is_none()
            && hex(trace, 32)
            && hex(parent, 16)
            && hex(flags, 2)
            && trace.bytes().any(|b| b != b'0')
            && parent.bytes().any(|b| b != b'0');
        valid.then(|| TraceParent {
            trace_id: trace.to_string(),
            parent_id: parent.to_string(),
        })
    }
}

/// The span one request is answered in: its fields go with every log line written meanwhile.
/// Never the prompt or the answer.
pub fn span(rpc: &'static str, request_id: &str, trace: Option<&TraceParent>) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        rpc,
        request_id = clip(request_id),
        trace_id = tracing::field::Empty,
        parent_id = tracing::field::Empty
    );
    if let Some(t) = trace {
        span.record("trace_id", t.trace_id.as_str());
        span.record("parent_id", t.parent_id.as_str());
    }
    span
}

fn clip(s: &str) -> &str {
    crate::base::prefix(s, MAX_LOGGED_ID)
}

/// Counts, times and logs one RPC outcome (inside the request's [`span`]).
pub fn request<T>(rpc: &'static str, t0: Instant, r: &Result<T, ServiceError>) {
    let seconds = t0.elapsed().as_secs_f64();
    let latency_ms = seconds * 1e3;
    let code = match r {
        Ok(_) => {
            tracing::debug!(target: ACCESS, code = "OK", latency_ms, "answered");
            "OK"
        }
        Err(e) => {
            let (code, reason) = classify(e);
            metrics::counter!(m::REJECTIONS, "rpc" => rpc, "reason" => reason).increment(1);
            let code = code_name(code);
            if code == "INTERNAL" {
                tracing::warn!(target: ACCESS, code, reason, latency_ms, error = %e, "answered");
            } else {
                tracing::debug!(target: ACCESS, code, reason, latency_ms, "answered");
            }
            code
        }
    };
    count(rpc, code, seconds);
}

/// One RPC in `tiergate_requests_total` and the latency histogram.
fn count(rpc: &'static str, code: &'static str, seconds: f64) {
    metrics::counter!(m::REQUESTS, "rpc" => rpc, "code" => code).increment(1);
    metrics::histogram!(m::REQUEST_SECONDS, "rpc" => rpc).record(seconds);
}

/// Counts an RPC whose future is dropped before it finishes (the client cancelled, or tonic's
/// grpc-timeout fired): CANCELLED, or DEADLINE_EXCEEDED once the deadline has passed. Without
/// it the slowest requests would vanish from the counts and the latency histogram.
pub struct Unfinished {
    rpc: &'static str,
    t0: Instant,
    deadline: Option<Instant>,
    done: bool,
}

impl Unfinished {
    pub fn new(rpc: &'static str, t0: Instant, deadline: Option<Instant>) -> Unfinished {
        Unfinished {
            rpc,
            t0,
            deadline,
            done: false,
        }
    }

    /// Counts the outcome as [`request`] does; the guard then has nothing left to count.
    pub fn finish<T>(mut self, r: &Result<T, ServiceError>) {
        self.done = true;
        request(self.rpc, self.t0, r);
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let seconds = self.t0.elapsed().as_secs_f64();
        // tonic's grpc-timeout timer starts a moment before the deadline we parsed from the
        // same header, so a drop by that timer comes just short of ours.
        let near = Instant::now() + std::time::Duration::from_millis(50);
        let code = if self.deadline.is_some_and(|d| near >= d) {
            "DEADLINE_EXCEEDED"
        } else {
            "CANCELLED"
        };
        tracing::debug!(target: ACCESS, code, latency_ms = seconds * 1e3, "abandoned");
        count(self.rpc, code, seconds);
    }
}

/// `tiergate_build_info`: 1 for what serves now. A reload or re-fit changes the heads
/// revision; the series it replaces is set to 0, since the exporter cannot remove one.
#[derive(Default)]
pub struct BuildInfo {
    shown: Option<[(&'static str, String); 5]>,
}

impl BuildInfo {
    pub fn update(&mut self, svc: &Service) {
        let now = [
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("model_revision", svc.pipeline.model_revision.clone()),
            ("heads_revision", svc.decider().revision()),
            ("backend", svc.pipeline.batcher.backend_name().to_string()),
            ("numerics", svc.pipeline.numerics.to_string()),
        ];
        if self.shown.as_ref() == Some(&now) {
            return;
        }
        if let Some(old) = self.shown.take() {
            metrics::gauge!(m::BUILD_INFO, &old).set(0.0);
        }
        metrics::gauge!(m::BUILD_INFO, &now).set(1.0);
        self.shown = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_strictly() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            TraceParent::parse(ok),
            Some(TraceParent {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                parent_id: "00f067aa0ba902b7".into(),
            })
        );
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_long_request_id_is_clipped_on_a_char_boundary() {
        assert_eq!(clip("req-1"), "req-1");
        let long = "é".repeat(100); // 200 bytes; 128 would split the 64th character
        assert_eq!(clip(&long), "é".repeat(64));
        assert_eq!(clip(&format!("a{long}")), format!("a{}", "é".repeat(63)));
    }
}
