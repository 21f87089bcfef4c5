//! Metric names and the Prometheus exporter (its own port, plain HTTP, no TLS stack).
#![forbid(unsafe_code)]
use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub const REQUESTS: &str = "tiergate_requests_total";
pub const REQUEST_SECONDS: &str = "tiergate_request_duration_seconds";
pub const QUEUE_DEPTH: &str = "tiergate_queue_depth";
pub const BATCH_SIZE: &str = "tiergate_batch_size";
pub const BATCH_TOKENS: &str = "tiergate_batch_tokens";
pub const TOKENIZE_SECONDS: &str = "tiergate_tokenize_seconds";
pub const QUEUE_SECONDS: &str = "tiergate_queue_seconds";
pub const INFERENCE_SECONDS: &str = "tiergate_inference_seconds";
pub const DECISIONS: &str = "tiergate_route_decisions_total";
pub const VERIFY_DECISIONS: &str = "tiergate_verify_decisions_total";
pub const ESCALATIONS: &str = "tiergate_escalations_total";
pub const TRUNCATIONS: &str = "tiergate_truncations_total";
pub const REJECTIONS: &str = "tiergate_rejections_total";
pub const DROPPED: &str = "tiergate_dropped_before_compute_total";
pub const EMBEDDING_CACHE: &str = "tiergate_embedding_cache_total";
pub const RELOADS: &str = "tiergate_reloads_total";
pub const FEEDBACK: &str = "tiergate_feedback_total";
pub const REFITS: &str = "tiergate_refits_total";
pub const BACKEND_INFO: &str = "tiergate_backend_info";
pub const BACKEND_FALLBACK: &str = "tiergate_backend_fallback_total";

const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const TOKEN_BUCKETS: &[f64] = &[
    16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
];

/// Installs the global recorder and serves /metrics on `addr`. Must run inside a tokio runtime.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), COUNT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_TOKENS.into()), TOKEN_BUCKETS)?
        .install()
        .map_err(|e| anyhow::anyhow!("metrics exporter on {addr}: {e}"))
}
