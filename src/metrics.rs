//! Metric names and the Prometheus exporter (its own port, plain HTTP, no TLS stack).
#![forbid(unsafe_code)]
use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub const REQUESTS: &str = "tiergate_requests_total";
pub const REQUEST_SECONDS: &str = "tiergate_request_duration_seconds";
pub const HTTP_REQUESTS: &str = "tiergate_http_requests_total";
pub const HTTP_REQUEST_SECONDS: &str = "tiergate_http_request_duration_seconds";
pub const HTTP_STREAM_ERRORS: &str = "tiergate_http_stream_errors_total";
pub const HTTP_CONNECTIONS: &str = "tiergate_http_connections";
pub const EXT_PROC_PASSED: &str = "tiergate_ext_proc_passed_total";
pub const GATEWAY_CONSENSUS: &str = "tiergate_gateway_consensus_total";
pub const GATEWAY_CONSENSUS_PROBES: &str = "tiergate_gateway_consensus_probes_total";
pub const GATEWAY_COST: &str = "tiergate_gateway_cost_usd_total";
pub const GATEWAY_BASELINE: &str = "tiergate_gateway_baseline_usd_total";
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
pub const SERVING: &str = "tiergate_serving";
pub const BACKEND_FAULTS: &str = "tiergate_backend_faults_total";
pub const BACKEND_HEALTHY: &str = "tiergate_backend_healthy";
pub const BUILD_INFO: &str = "tiergate_build_info";
pub const EXPECTED_COST: &str = "tiergate_expected_cost_usd_total";
pub const EXPECTED_SAVING: &str = "tiergate_expected_saving_usd_total";
pub const ROUTE_P_PASS: &str = "tiergate_route_p_pass";
pub const FAST_PATH: &str = "tiergate_route_fast_path_total";
pub const TOKENIZE_BACKLOG: &str = "tiergate_tokenize_backlog_bytes";

/// Adds `usd` to a running USD sum labelled by `model`: a gauge that only grows, since the
/// `metrics` crate's counters count integers (`rate()` it). A non-finite amount would stay in
/// the sum for the life of the process and is not added; a negative one adds nothing.
pub fn add_usd(name: &'static str, model: &str, usd: f64) {
    if usd.is_finite() {
        metrics::gauge!(name, "model" => model.to_string()).increment(usd.max(0.0));
    }
}

const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// A probability: finer near the floors and thresholds in use (0.7-0.95).
const P_BUCKETS: &[f64] = &[
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99,
];
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
        .set_buckets_for_metric(Matcher::Full(ROUTE_P_PASS.into()), P_BUCKETS)?
        .install()
        .map_err(|e| anyhow::anyhow!("metrics exporter on {addr}: {e}"))?;
    describe();
    Ok(())
}

/// HELP text of every series. Descriptions go to the installed recorder, so this runs after
/// `install`.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS,
        "Answered requests by RPC and gRPC code (streams: per item)."
    );
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "Time to answer one request (streams: one item), by RPC."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP front (OpenAI-compatible) requests answered, by route and HTTP status."
    );
    describe_counter!(
        HTTP_STREAM_ERRORS,
        "HTTP front streams broken off after their headers (the upstream failed or the deadline \
         passed mid-stream), by model: counted 200 in the requests total, ended with an error \
         event."
    );
    describe_counter!(
        GATEWAY_CONSENSUS,
        "HTTP front requests under a consensus policy, by outcome: agreed (the probes agreed), \
         escalated (the top candidate's answer shipped), fallback (no consensus and no answer \
         from the top, failed or not called: a probe's answer shipped), failed (no answer)."
    );
    describe_gauge!(
        HTTP_CONNECTIONS,
        "HTTP front connections open (at gateway.max_connections the front accepts no more \
         until one closes)."
    );
    describe_counter!(
        EXT_PROC_PASSED,
        "Envoy ext_proc requests passed on unrouted because tiergate had no capacity to decide \
         (gateway.ext_proc_when_busy = \"pass\"), by reason: rate_limit_error, timeout, \
         unavailable."
    );
    describe_counter!(
        GATEWAY_CONSENSUS_PROBES,
        "Consensus probe calls, by result: answered, failed, or cancelled (still out when the \
         answers in settled the decision; not in the request's cost, though a provider may \
         bill it)."
    );
    describe_gauge!(
        GATEWAY_COST,
        "HTTP front: USD spent on answered chat completions (every upstream call a request made, \
         at catalog prices on the upstreams' usage), by the model that shipped; streams passed \
         through are not in it. Only grows."
    );
    describe_gauge!(
        GATEWAY_BASELINE,
        "HTTP front: USD the most expensive candidate would have cost for the same answers, by \
         the model that shipped; minus tiergate_gateway_cost_usd_total, the saving. Only grows."
    );
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "HTTP front: time to answer a chat completion (the whole cascade; a stream: to its first byte)."
    );
    describe_counter!(
        FAST_PATH,
        "Routes by the fast path's outcome: the static student decided alone (alone), or its pick was too close to call and the encoder decided (deferred)."
    );
    describe_gauge!(QUEUE_DEPTH, "Requests admitted and not yet batched.");
    describe_histogram!(BATCH_SIZE, "Requests per encoder batch.");
    describe_histogram!(BATCH_TOKENS, "Tokens per encoder batch.");
    describe_histogram!(TOKENIZE_SECONDS, Unit::Seconds, "Tokenizing one input.");
    describe_histogram!(
        QUEUE_SECONDS,
        Unit::Seconds,
        "Wait from admission to the start of the input's batch."
    );
    describe_histogram!(
        INFERENCE_SECONDS,
        Unit::Seconds,
        "Encoder time of the batch an input ran in."
    );
    describe_counter!(
        DECISIONS,
        "Route decisions by chosen model and reason (relative, floor_met, best_effort, utility)."
    );
    describe_counter!(
        VERIFY_DECISIONS,
        "Verify decisions: ship, escalate, or kept (turned down with nowhere Route rates better, so a cascade ships it); escalate / all = the escalation ratio."
    );
    describe_counter!(
        ESCALATIONS,
        "Verify decisions to escalate (turned down, with a model to go to), by the model whose answer was rejected."
    );
    describe_counter!(
        TRUNCATIONS,
        "Inputs cut to the encoder's token limit, by RPC."
    );
    describe_counter!(
        REJECTIONS,
        "Requests answered with an error, by RPC and reason."
    );
    describe_counter!(DROPPED, "Inputs dropped before compute, by stage (tokenize, or queue: the batch queue) and reason: the client left (client_gone), its deadline passed, or the tokenizer backlog was full (tokenizer_backlog), the expected queue wait exceeded batch.max_queue_delay_ms (queue_delay) or the deadline (deadline_wait), or a higher-priority request took its place in a full queue (displaced).");
    describe_gauge!(
        TOKENIZE_BACKLOG,
        Unit::Bytes,
        "Bytes of text being tokenized or waiting for it (bounded by batch.max_tokenize_bytes)."
    );
    describe_counter!(EMBEDDING_CACHE, "Embedding cache lookups: hit or miss.");
    describe_counter!(
        RELOADS,
        "Reloads (SIGHUP, Admin/Reload): applied or rejected."
    );
    describe_counter!(FEEDBACK, "Feedback outcomes: accepted or rejected.");
    describe_counter!(
        REFITS,
        "Feedback re-fits per model: applied, rejected (worse on held-out outcomes) or failed."
    );
    describe_gauge!(
        BACKEND_INFO,
        "1 for the encoder backend and precision in use."
    );
    describe_counter!(
        BACKEND_FALLBACK,
        "backend = auto ended on the CPU, by reason."
    );
    describe_gauge!(
        SERVING,
        "1 while grpc.health.v1 reports SERVING (all services), else 0: warming up, draining, or the backend declared faulty."
    );
    describe_counter!(
        BACKEND_FAULTS,
        "Encoder batches that failed on the backend's side, by kind: error, panic, nan (non-finite output), output_size, hang (past health.batch_watchdog_s)."
    );
    describe_gauge!(
        BACKEND_HEALTHY,
        "0 while the backend is declared faulty (health.max_consecutive_faults failed batches in a row, or a hung batch) until a batch succeeds, else 1."
    );
    describe_gauge!(BUILD_INFO, "1 for the version, encoder and heads revision, backend and numerics serving now; 0 for a heads revision replaced since start (reload, re-fit).");
    // The `metrics` crate's counters count integers; dollars are fractions, so these two are
    // gauges that only ever grow: rate() reads them as counters.
    describe_gauge!(
        EXPECTED_COST,
        "Expected cost in USD of the models Route chose (catalog prices), by model; only grows."
    );
    describe_gauge!(EXPECTED_SAVING, "Expected saving in USD of Route's choice against the most expensive candidate, by chosen model; only grows.");
    describe_histogram!(ROUTE_P_PASS, "p_pass of the model Route chose, by model.");
}
