//! What the edge records about each answer and about the process: request counts and
//! timings, what Route's choices are expected to cost and save, whether the Router is
//! serving and what build serves. Recorded here, where a whole outcome is known, so the
//! decision layer below stays free of per-reply bookkeeping.
#![forbid(unsafe_code)]
use std::time::Instant;

use super::status::{classify, code_name};
use crate::metrics as m;
use crate::service::{RouteOutcome, Service, ServiceError};

/// Where each answered request is logged: `RUST_LOG=info,tiergate::access=debug` writes one
/// line per request; faults on our side (INTERNAL) are written at warn.
const ACCESS: &str = "tiergate::access";

/// A client's request id is logged up to this many bytes.
const MAX_LOGGED_ID: usize = 128;

/// The span one request is answered in: its fields go with every log line written meanwhile.
/// Never the prompt or the answer.
pub fn span(rpc: &'static str, request_id: &str) -> tracing::Span {
    tracing::info_span!("request", rpc, request_id = clip(request_id))
}

fn clip(s: &str) -> &str {
    let mut end = s.len().min(MAX_LOGGED_ID);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
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
    metrics::counter!(m::REQUESTS, "rpc" => rpc, "code" => code).increment(1);
    metrics::histogram!(m::REQUEST_SECONDS, "rpc" => rpc).record(seconds);
}

/// The chosen model's expected cost, the saving against the most expensive candidate, and
/// the chosen model's p_pass.
pub fn route(o: &RouteOutcome) {
    // A non-finite amount would stay in the running sum for the life of the process.
    for (name, usd) in [
        (m::EXPECTED_COST, o.expected_cost_usd),
        (m::EXPECTED_SAVING, o.expected_saving_usd),
    ] {
        if usd.is_finite() {
            metrics::gauge!(name, "model" => o.model.clone()).increment(usd.max(0.0));
        }
    }
    if let Some(c) = o.candidates.iter().find(|c| c.model == o.model) {
        metrics::histogram!(m::ROUTE_P_PASS, "model" => o.model.clone()).record(c.p_pass);
    }
}

/// `tiergate_serving` follows the Router's health status.
pub async fn router_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    use crate::proto::router_server::RouterServer;
    type Served = RouterServer<std::sync::Arc<super::RouterService>>;
    if serving {
        health.set_serving::<Served>().await;
    } else {
        health.set_not_serving::<Served>().await;
    }
    metrics::gauge!(m::SERVING).set(if serving { 1.0 } else { 0.0 });
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
    fn a_long_request_id_is_clipped_on_a_char_boundary() {
        assert_eq!(clip("req-1"), "req-1");
        let long = "é".repeat(100); // 200 bytes; 128 would split the 64th character
        assert_eq!(clip(&long), "é".repeat(64));
        assert_eq!(clip(&format!("a{long}")), format!("a{}", "é".repeat(63)));
    }
}
