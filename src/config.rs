//! The one configuration type: the embedded default (tiergate.toml), then a TOML file, then
//! flags / TIERGATE_* variables. Validated once at start; every error names its key.
#![forbid(unsafe_code)]
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::base::Device;
use crate::batch::Limits;
pub use crate::engine::BackendKind;
pub use crate::model::Precision;

/// The repository's tiergate.toml, compiled in so the binary runs with no file at all.
pub const EMBEDDED_DEFAULT: &str = include_str!("../tiergate.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: String,
    #[serde(default)]
    pub metrics_listen: String,
    pub model_dir: PathBuf,
    pub heads: PathBuf,
    /// Benchmark prompts on the router's scale (`tiergate benchmarks`), for catalog priors.
    #[serde(default = "default_benchmarks")]
    pub benchmarks: PathBuf,
    /// Calibration overlays (`tiergate calibrate`), applied on the heads in order.
    #[serde(default)]
    pub overlays: Vec<PathBuf>,
    #[serde(default = "default_backend")]
    pub backend: BackendKind,
    /// CPU backend: arithmetic of the linear layers.
    #[serde(default = "default_precision")]
    pub precision: Precision,
    /// Log lines on stderr: `text`, or `json` (one object a line, for a log pipeline).
    #[serde(default)]
    pub log_format: LogFormat,
    /// HTTP/2 connections older than this get a GOAWAY and close once their open requests
    /// and streams end, so clients reconnect and re-resolve; 0 = never.
    #[serde(default)]
    pub max_connection_age_s: u64,
    /// gRPC connections open at once; at the cap, more wait in the listen backlog until one
    /// closes (the HTTP front has its own, `gateway.max_connections`).
    #[serde(default = "default_grpc_max_connections")]
    pub max_connections: usize,
    pub batch: BatchConfig,
    pub threads: ThreadsConfig,
    pub policy: PolicyConfig,
    /// Learning from outcomes while serving (the Feedback RPC).
    #[serde(default)]
    pub feedback: FeedbackConfig,
    /// The OpenAI-compatible HTTP front and the Envoy external processor (src/gateway).
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// TLS on the gRPC listener; mutual TLS with `client_ca_file`.
    #[serde(default)]
    pub tls: TlsConfig,
    /// API tokens asked of gRPC (health exempt) and HTTP-front clients.
    #[serde(default)]
    pub auth: AuthConfig,
    /// When the encoder is declared faulty (health NOT_SERVING, requests UNAVAILABLE).
    #[serde(default)]
    pub health: HealthConfig,
    /// What SIGTERM does, and how long it may take.
    #[serde(default)]
    pub drain: DrainConfig,
    pub catalog: Vec<CatalogEntryConfig>,
}

/// PEM files, re-read when they change (rotation without a restart); all unset = plaintext.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain, leaf first.
    #[serde(default)]
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: PathBuf,
    /// CAs whose client certificates are accepted; set = clients must present one.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// A plaintext port serving grpc.health.v1 only, for Kubernetes' gRPC probes (which
    /// cannot speak TLS); "" = none.
    #[serde(default)]
    pub plaintext_health_listen: String,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty() || !self.key_file.as_os_str().is_empty()
    }

    pub fn plaintext_health_addr(&self) -> Result<Option<SocketAddr>> {
        let l = &self.plaintext_health_listen;
        if l.is_empty() {
            return Ok(None);
        }
        l.parse().map(Some).with_context(|| {
            format!("tls.plaintext_health_listen: {l:?} is not an address (use \"\" for none)")
        })
    }
}

/// Bearer tokens (`authorization: Bearer <token>`), read at start; none set = no auth.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// A file of tokens, one a line (blank lines and `#` comments skipped).
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    /// The name of an environment variable holding tokens, separated by commas or newlines.
    #[serde(default)]
    pub tokens_env: Option<String>,
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        self.tokens_file.is_some() || self.tokens_env.is_some()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Failed encoder batches in a row (a device fault, a panic, NaN output) after which the
    /// backend is declared faulty until a probe batch succeeds; 0 = never.
    #[serde(default = "default_max_consecutive_faults")]
    pub max_consecutive_faults: u32,
    /// One encoder batch running longer than this is declared hung; 0 = never.
    #[serde(default = "default_batch_watchdog_s")]
    pub batch_watchdog_s: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            max_consecutive_faults: default_max_consecutive_faults(),
            batch_watchdog_s: default_batch_watchdog_s(),
        }
    }
}

fn default_max_consecutive_faults() -> u32 {
    3
}
fn default_batch_watchdog_s() -> u64 {
    10
}

/// SIGTERM: health NOT_SERVING at once; new connections and requests still served for
/// `lame_duck_s`; then the listener closes and what was accepted has `timeout_s` to finish,
/// after which the rest is answered UNAVAILABLE and the process exits. Keep
/// preStop + lame_duck_s + timeout_s under the pod's terminationGracePeriodSeconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainConfig {
    #[serde(default = "default_lame_duck_s")]
    pub lame_duck_s: u64,
    #[serde(default = "default_drain_timeout_s")]
    pub timeout_s: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            lame_duck_s: default_lame_duck_s(),
            timeout_s: default_drain_timeout_s(),
        }
    }
}

fn default_lame_duck_s() -> u64 {
    5
}
fn default_drain_timeout_s() -> u64 {
    25
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines; colour only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The OpenAI-compatible HTTP front (`/v1/chat/completions`, `/v1/models`); "" = off.
    #[serde(default)]
    pub http_listen: String,
    /// Serve `envoy.service.ext_proc.v3.ExternalProcessor` on the gRPC port.
    #[serde(default = "yes")]
    pub ext_proc: bool,
    /// The `model` that asks tiergate to choose; `<auto_model>:<name>` picks a named policy.
    #[serde(default = "default_auto_model")]
    pub auto_model: String,
    /// When `auto` checks an answer with Verify before shipping it.
    #[serde(default)]
    pub verify: VerifyMode,
    /// What a streaming chat completion under `auto` gets (a named policy may say otherwise).
    #[serde(default)]
    pub stream: StreamMode,
    /// Upstream calls after the first (a rejected answer or a failed upstream), at most.
    #[serde(default = "default_max_escalations")]
    pub max_escalations: u32,
    /// A request's whole deadline (decisions and every upstream call); a client's shorter
    /// `x-tiergate-timeout-ms` applies instead.
    #[serde(default = "default_gateway_timeout")]
    pub timeout_s: u64,
    /// Largest request body, and largest upstream reply read whole (streams pass through).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's head (line and headers), on a new or a
    /// kept-alive connection; past it the connection is closed.
    #[serde(default = "default_head_timeout")]
    pub head_timeout_s: u64,
    /// Chat completions handled at once; more are answered 429 at once (each holds its body
    /// and upstream replies, up to `max_body_bytes` apiece, for as long as it runs).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Connections the front holds open at once. At the cap it accepts no more until one
    /// closes (clients wait in the listen backlog): the process's file descriptors are shared
    /// with the gRPC listener and the upstream calls.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// ext_proc: how long Route may take on one request; keep it under Envoy's
    /// `message_timeout`.
    #[serde(default = "default_ext_proc_route_ms")]
    pub ext_proc_route_ms: u64,
    /// ext_proc, when tiergate cannot decide in time (overloaded, past `ext_proc_route_ms`,
    /// warming up): pass the request on unrouted, as Envoy's fail-open does when tiergate is
    /// down, or refuse it (429 / 504 / 503).
    #[serde(default)]
    pub ext_proc_when_busy: WhenBusy,
    /// Named policies, asked for as `model = "auto:<name>"`.
    #[serde(default)]
    pub policies: std::collections::BTreeMap<String, GatewayPolicy>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            http_listen: String::new(),
            ext_proc: true,
            auto_model: default_auto_model(),
            verify: VerifyMode::default(),
            stream: StreamMode::default(),
            max_escalations: default_max_escalations(),
            timeout_s: default_gateway_timeout(),
            max_body_bytes: default_max_body(),
            max_concurrent: default_max_concurrent(),
            max_connections: default_max_connections(),
            head_timeout_s: default_head_timeout(),
            ext_proc_route_ms: default_ext_proc_route_ms(),
            ext_proc_when_busy: WhenBusy::default(),
            policies: Default::default(),
        }
    }
}

/// What ext_proc does with a request tiergate has no capacity to decide.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenBusy {
    /// On unrouted, to Envoy's default route (a model still answers).
    #[default]
    Pass,
    /// Answered by Envoy with tiergate's error.
    Refuse,
}

/// When the HTTP front runs Verify on an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMode {
    /// Route only: the chosen model's answer ships.
    Never,
    /// Where Route recommends it (`verify_recommended`: the pick close to its line and a
    /// pricier candidate rated above it), and any empty answer.
    #[default]
    Borderline,
    /// Every answer below the top tier.
    Always,
}

/// What the HTTP front does with a streaming chat completion (`"stream": true`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamMode {
    /// Route only: the chosen upstream's events pass through as they come, never verified
    /// (by the time an answer could be read the client has it).
    #[default]
    Pass,
    /// The whole cascade, as for a request without `stream`: answers are read whole, verified
    /// and escalated as the policy says, and the one that ships is sent as events. The first
    /// byte waits for the shipped answer.
    Cascade,
}

/// A consensus policy: call `models` together and ship when `agree` of their answers commit
/// to the same final answer (a multiple-choice pick or a declared number), else call the most
/// expensive candidate too. Pays where cheap models' agreement is a strong signal
/// (multiple-choice and math traffic; models/EVAL.md, "Consensus"); `tiergate consensus` picks
/// the models and `agree` from labelled rows of one's own traffic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsensusConfig {
    /// Catalog models with an upstream, 2 to [`MAX_CONSENSUS_MODELS`] of them.
    pub models: Vec<String>,
    /// How many must agree: 2 up to the number of models.
    #[serde(default = "default_agree")]
    pub agree: usize,
}

/// Upstream calls a consensus makes at once, at most.
pub const MAX_CONSENSUS_MODELS: usize = 4;

fn default_agree() -> usize {
    2
}

/// A policy a client names as `auto:<name>`: Route's policy fields, the verify mode and what a
/// stream gets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayPolicy {
    #[serde(default)]
    pub quality_floor: Option<f64>,
    #[serde(default)]
    pub relative_floor: Option<f64>,
    #[serde(default)]
    pub cost_weight: Option<f64>,
    #[serde(default)]
    pub max_cost_usd: Option<f64>,
    #[serde(default)]
    pub verify: Option<VerifyMode>,
    /// What a stream asked of this policy gets; unset = `gateway.stream`.
    #[serde(default)]
    pub stream: Option<StreamMode>,
    /// Ask cheap models together first and ship what they agree on (chat completions; a stream
    /// gets the shipped answer as events once decided; ext_proc routes as the other fields say).
    #[serde(default)]
    pub consensus: Option<ConsensusConfig>,
}

/// Where the HTTP front calls a catalog model: an OpenAI-compatible API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL; requests go to `{base_url}/chat/completions`.
    pub base_url: String,
    /// The provider's model id (default: the catalog name).
    #[serde(default)]
    pub model: Option<String>,
    /// Environment variable holding the API key, sent as `Authorization: Bearer`.
    #[serde(default)]
    pub api_key_env: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_auto_model() -> String {
    "auto".into()
}
fn default_max_escalations() -> u32 {
    2
}
fn default_gateway_timeout() -> u64 {
    120
}
fn default_max_body() -> usize {
    4 << 20
}
fn default_max_concurrent() -> usize {
    1024
}
fn default_max_connections() -> usize {
    4096
}
fn default_head_timeout() -> u64 {
    30
}
fn default_ext_proc_route_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackConfig {
    /// Where re-fitted parameters are persisted (atomically) and read back at start; ""
    /// disables feedback (the RPC then answers FAILED_PRECONDITION).
    #[serde(default)]
    pub overlay: PathBuf,
    /// Seconds between re-fit passes.
    #[serde(default = "default_refit_interval")]
    pub refit_interval_s: u64,
    /// New outcomes of a model before it is re-fitted.
    #[serde(default = "default_min_rows")]
    pub min_rows: usize,
    /// Outcomes kept per model (oldest dropped first).
    #[serde(default = "default_max_rows")]
    pub max_rows_per_model: usize,
    /// Route request ids remembered, so feedback can name a request instead of its prompt.
    #[serde(default = "default_remember")]
    pub remember_requests: usize,
    /// Bytes of remembered ids and prompts (each prompt runs to `batch.max_input_bytes`);
    /// the oldest are forgotten past it.
    #[serde(default = "default_remember_bytes")]
    pub remember_bytes: usize,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        FeedbackConfig {
            overlay: PathBuf::new(),
            refit_interval_s: default_refit_interval(),
            min_rows: default_min_rows(),
            max_rows_per_model: default_max_rows(),
            remember_requests: default_remember(),
            remember_bytes: default_remember_bytes(),
        }
    }
}

impl FeedbackConfig {
    pub fn enabled(&self) -> bool {
        !self.overlay.as_os_str().is_empty()
    }
}

fn default_refit_interval() -> u64 {
    60
}
fn default_min_rows() -> usize {
    20
}
fn default_max_rows() -> usize {
    5000
}
fn default_remember() -> usize {
    10000
}
fn default_remember_bytes() -> usize {
    64 << 20
}

fn default_grpc_max_connections() -> usize {
    4096
}

fn default_benchmarks() -> PathBuf {
    PathBuf::from("models/benchmarks.json")
}

fn default_backend() -> BackendKind {
    BackendKind::Auto
}

fn default_precision() -> Precision {
    Precision::Auto
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
    pub max_queue: usize,
    pub max_input_tokens: usize,
    pub max_answer_tokens: usize,
    pub max_input_bytes: usize,
    /// Recent embeddings kept by input (0 disables).
    #[serde(default)]
    pub embedding_cache: usize,
    /// Bytes of text being tokenized or waiting for it, all requests together; beyond it a
    /// text is refused (RESOURCE_EXHAUSTED) before any work, so one client's huge inputs
    /// cannot stall everyone's tokenizing.
    #[serde(default = "default_max_tokenize_bytes")]
    pub max_tokenize_bytes: usize,
    /// A request whose expected queue wait (queued tokens at the measured time per token)
    /// exceeds this is refused at once (RESOURCE_EXHAUSTED), as is one whose deadline is
    /// nearer than its expected wait; 0 = only the deadline.
    #[serde(default = "default_max_queue_delay_ms")]
    pub max_queue_delay_ms: u64,
    /// Token budget of one batch on the CUDA backend: a GPU needs far more tokens per forward
    /// than a CPU to be busy (benches/GPU.md times budgets).
    #[serde(default = "default_gpu_max_batch_tokens")]
    pub gpu_max_batch_tokens: usize,
    /// Request cap of one batch on the CUDA backend.
    #[serde(default = "default_gpu_max_batch_requests")]
    pub gpu_max_batch_requests: usize,
}

fn default_gpu_max_batch_tokens() -> usize {
    32768
}

fn default_max_queue_delay_ms() -> u64 {
    5000
}

fn default_max_tokenize_bytes() -> usize {
    1 << 20
}

fn default_gpu_max_batch_requests() -> usize {
    512
}

impl BatchConfig {
    /// The batcher's limits for the device of the backend that was selected (a GPU gets the
    /// GPU budget).
    pub fn limits_for(&self, device: Device) -> Limits {
        let (tokens, requests) = match device {
            Device::Cuda => (self.gpu_max_batch_tokens, self.gpu_max_batch_requests),
            Device::Cpu => (self.max_batch_tokens, self.max_batch_requests),
        };
        Limits {
            max_batch_tokens: tokens,
            max_batch_requests: requests,
            max_queue: self.max_queue,
        }
    }

    /// The expected-wait bound of admission; `None` when 0 (only deadlines bound the wait).
    pub fn max_queue_delay(&self) -> Option<std::time::Duration> {
        (self.max_queue_delay_ms > 0)
            .then(|| std::time::Duration::from_millis(self.max_queue_delay_ms))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThreadsConfig {
    pub compute: usize,
    pub tokenize: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Route's default floor; unset = the floor learned with the heads.
    #[serde(default)]
    pub quality_floor: Option<f64>,
    pub verify_band: f64,
    #[serde(default)]
    pub cost_weight: f64,
    #[serde(default)]
    pub verify_threshold: Option<f64>,
    /// Route's default relative floor r: the cheapest candidate with p ≥ r · (highest p);
    /// `false` = off (the absolute floor: `quality_floor`, else the heads' learned one).
    /// Written `false`, not left out, because a file is laid over the embedded default,
    /// which sets it, and TOML has no null.
    #[serde(default, with = "number_or_off")]
    pub relative_floor: Option<f64>,
    /// Route's fast path: the static student (`model::student`) decides alone when its
    /// pick's stability (`decide::RouteDecision::stability`) reaches this, and the encoder
    /// decides otherwise. Unset = off. Read at start (a reload may change the value, not
    /// turn the path on).
    #[serde(default)]
    pub fast_path_stability: Option<f64>,
    pub default_output_tokens: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntryConfig {
    pub model: String,
    pub in_usd_per_mtok: f64,
    pub out_usd_per_mtok: f64,
    /// Use the trained head of this data model (for models with no head of their own).
    #[serde(default)]
    pub like: Option<String>,
    #[serde(default)]
    pub expected_output_tokens: Option<u32>,
    /// For a model with no rows: its published accuracy on a benchmark the data has, placed
    /// on the router's scale (`benchmarks`).
    #[serde(default)]
    pub prior: Option<PriorConfig>,
    /// Where the HTTP front calls this model (models without one are not routed to there).
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorConfig {
    /// A benchmark of `benchmarks` (mmlu_pro, arc_challenge, winogrande, mbpp).
    pub benchmark: String,
    /// Published accuracy on it, in (0, 1).
    pub accuracy: f64,
}

/// Overrides from flags and the environment (clap fills these; `None` keeps the file's value).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// TOML config file, laid over the embedded tiergate.toml: it names only what it changes.
    #[arg(long, env = "TIERGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address, e.g. 127.0.0.1:50051 (port 0 picks a free port).
    #[arg(long, env = "TIERGATE_LISTEN")]
    pub listen: Option<String>,
    /// Prometheus listen address; "" disables the exporter.
    #[arg(long, env = "TIERGATE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    #[arg(long, env = "TIERGATE_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    #[arg(long, env = "TIERGATE_HEADS")]
    pub heads: Option<PathBuf>,
    #[arg(long, env = "TIERGATE_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,
    /// CPU backend arithmetic: auto (int8 on AVX2 and AVX-512 CPUs with the embedded
    /// encoder, else bf16 on AMD with AVX512-BF16, else f32), int8, bf16, f32 (README).
    #[arg(long, env = "TIERGATE_PRECISION", value_enum)]
    pub precision: Option<Precision>,
    #[arg(long, env = "TIERGATE_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    #[arg(long, env = "TIERGATE_MAX_BATCH_REQUESTS")]
    pub max_batch_requests: Option<usize>,
    /// Token budget of one batch when the CUDA backend runs.
    #[arg(long, env = "TIERGATE_GPU_MAX_BATCH_TOKENS")]
    pub gpu_max_batch_tokens: Option<usize>,
    #[arg(long, env = "TIERGATE_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    #[arg(long, env = "TIERGATE_MAX_INPUT_TOKENS")]
    pub max_input_tokens: Option<usize>,
    /// Recent embeddings kept by input (0 disables the cache).
    #[arg(long, env = "TIERGATE_EMBEDDING_CACHE")]
    pub embedding_cache: Option<usize>,
    #[arg(long, env = "TIERGATE_THREADS")]
    pub threads: Option<usize>,
    /// Tokenizer threads (on a GPU node the CPU's main work).
    #[arg(long, env = "TIERGATE_TOKENIZE_THREADS")]
    pub tokenize_threads: Option<usize>,
    #[arg(long, env = "TIERGATE_QUALITY_FLOOR")]
    pub quality_floor: Option<f64>,
    /// Route's default relative floor r in (0, 1] (used when no absolute floor is set).
    #[arg(long, env = "TIERGATE_RELATIVE_FLOOR")]
    pub relative_floor: Option<f64>,
    /// Route's fast path: the static student decides alone when its pick is at least this
    /// stable (policy.fast_path_stability; off unless set).
    #[arg(long, env = "TIERGATE_FAST_PATH_STABILITY")]
    pub fast_path_stability: Option<f64>,
    /// OpenAI-compatible HTTP front address (gateway.http_listen); "" disables it.
    #[arg(long, env = "TIERGATE_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Log lines: text or json.
    #[arg(long, env = "TIERGATE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Seconds before an HTTP/2 connection is asked to close so its client reconnects
    /// (max_connection_age_s; 0 = never).
    #[arg(long, env = "TIERGATE_MAX_CONNECTION_AGE_S")]
    pub max_connection_age_s: Option<u64>,
    /// Refuse a request whose expected queue wait is longer (batch.max_queue_delay_ms; 0 = off).
    #[arg(long, env = "TIERGATE_MAX_QUEUE_DELAY_MS")]
    pub max_queue_delay_ms: Option<u64>,
    /// Seconds SIGTERM keeps serving new requests with health NOT_SERVING (drain.lame_duck_s).
    #[arg(long, env = "TIERGATE_DRAIN_LAME_DUCK_S")]
    pub drain_lame_duck_s: Option<u64>,
    /// Seconds accepted work may take after the listener closes (drain.timeout_s).
    #[arg(long, env = "TIERGATE_DRAIN_TIMEOUT_S")]
    pub drain_timeout_s: Option<u64>,
}

/// An optional number a file can switch off with `false` (and `tiergate config` prints so):
/// a key the embedded default sets cannot be unset by leaving it out.
mod number_or_off {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => s.serialize_f64(*x),
            None => s.serialize_bool(false),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum NumberOrOff {
            Number(f64),
            Off(bool),
        }
        match NumberOrOff::deserialize(d)? {
            NumberOrOff::Number(x) => Ok(Some(x)),
            NumberOrOff::Off(false) => Ok(None),
            NumberOrOff::Off(true) => Err(D::Error::custom(
                "a number, or false for off (true means nothing here)",
            )),
        }
    }
}

/// The line in `text` (a TOML document) of the value at the dotted key `path`, if the
/// document has it (a key with a dot of its own in quotes is not found).
fn line_of(text: &str, path: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut segs = path.split('.').peekable();
    let value = loop {
        let seg = segs.next()?;
        let v = table.iter().find(|(k, _)| k.get_ref() == seg)?.1;
        if segs.peek().is_none() {
            break v;
        }
        match v.get_ref() {
            toml::de::DeValue::Table(t) => table = t,
            _ => return None,
        }
    };
    Some(text.get(..value.span().start)?.matches('\n').count() + 1)
}

/// `over` laid over `base`: tables merge recursively, anything else replaces.
fn lay_over(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => lay_over(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl Config {
    pub fn embedded() -> Result<Config> {
        toml::from_str(EMBEDDED_DEFAULT).context("embedded tiergate.toml")
    }

    /// A config file's text laid over the embedded default: the file's keys replace the
    /// default's, tables merge key by key, and lists (`catalog`, `overlays`) replace whole. So
    /// a file holds only what it changes; a key it leaves out keeps the default's value (not
    /// the type's, which for `metrics_listen` or `batch.embedding_cache` would switch them off).
    pub fn over_embedded(text: &str) -> Result<Config> {
        let file: toml::Table = toml::from_str(text)?;
        let mut merged: toml::Table =
            toml::from_str(EMBEDDED_DEFAULT).context("embedded tiergate.toml")?;
        lay_over(&mut merged, file);
        toml::Value::Table(merged).try_into().map_err(|merged_err| {
            // The merged value has no positions. A wrong type or an unknown key is in the
            // file's own text, where parsing it alone points at its line (and at the entry
            // of a list); only what the file leaves out is missing from it alone.
            match toml::from_str::<Config>(text) {
                Err(e) if !e.message().starts_with("missing field") => anyhow::Error::new(e),
                // Alone, the file stops at a table it holds in part: name the line of the key
                // the merged error names, when the file has it.
                _ => {
                    let msg = merged_err.to_string();
                    let line = msg
                        .rsplit_once("in `")
                        .and_then(|(_, k)| k.split('`').next())
                        .and_then(|path| line_of(text, path));
                    match line {
                        Some(n) => {
                            anyhow::anyhow!("line {n}: {}", msg.trim_end().replace('\n', " "))
                        }
                        None => anyhow::Error::new(merged_err),
                    }
                }
            }
        })
    }

    /// Embedded default, or the file laid over it, with overrides applied, validated.
    pub fn load(o: &Overrides) -> Result<Config> {
        let mut c = match &o.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                Config::over_embedded(&text)
                    .with_context(|| format!("parsing config {}", p.display()))?
            }
            None => Config::embedded()?,
        };
        if let Some(v) = &o.listen {
            c.listen = v.clone();
        }
        if let Some(v) = &o.metrics_listen {
            c.metrics_listen = v.clone();
        }
        if let Some(v) = &o.model_dir {
            c.model_dir = v.clone();
        }
        if let Some(v) = &o.heads {
            c.heads = v.clone();
        }
        if let Some(v) = o.backend {
            c.backend = v;
        }
        if let Some(v) = o.precision {
            c.precision = v;
        }
        if let Some(v) = o.max_batch_tokens {
            c.batch.max_batch_tokens = v;
        }
        if let Some(v) = o.max_batch_requests {
            c.batch.max_batch_requests = v;
        }
        if let Some(v) = o.gpu_max_batch_tokens {
            c.batch.gpu_max_batch_tokens = v;
        }
        if let Some(v) = o.max_queue {
            c.batch.max_queue = v;
        }
        if let Some(v) = o.max_input_tokens {
            c.batch.max_input_tokens = v;
        }
        if let Some(v) = o.embedding_cache {
            c.batch.embedding_cache = v;
        }
        if let Some(v) = o.threads {
            c.threads.compute = v;
        }
        if let Some(v) = o.tokenize_threads {
            c.threads.tokenize = v;
        }
        if let Some(v) = o.quality_floor {
            c.policy.quality_floor = Some(v);
        }
        if let Some(v) = o.fast_path_stability {
            c.policy.fast_path_stability = Some(v);
        }
        if let Some(v) = o.relative_floor {
            c.policy.relative_floor = Some(v);
        }
        if let Some(v) = &o.http_listen {
            c.gateway.http_listen = v.clone();
        }
        if let Some(v) = o.log_format {
            c.log_format = v;
        }
        if let Some(v) = o.max_connection_age_s {
            c.max_connection_age_s = v;
        }
        if let Some(v) = o.max_queue_delay_ms {
            c.batch.max_queue_delay_ms = v;
        }
        if let Some(v) = o.drain_lame_duck_s {
            c.drain.lame_duck_s = v;
        }
        if let Some(v) = o.drain_timeout_s {
            c.drain.timeout_s = v;
        }
        c.validate()?;
        // The student alone fails the accuracy gate (README, "Route's fast path"): a server
        // uses it only where its pick is stable, never for every Route and Verify.
        if c.precision == Precision::Static {
            bail!(
                "precision = static is the static student alone, for `tiergate score`; to serve \
                 it where its decision is stable, set policy.fast_path_stability"
            );
        }
        Ok(c)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr> {
        self.listen.parse().with_context(|| {
            format!(
                "listen: {:?} is not an address like 127.0.0.1:50051",
                self.listen
            )
        })
    }

    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>> {
        if self.metrics_listen.is_empty() {
            return Ok(None);
        }
        self.metrics_listen.parse().map(Some).with_context(|| {
            format!(
                "metrics_listen: {:?} is not an address (use \"\" to disable)",
                self.metrics_listen
            )
        })
    }

    pub fn http_addr(&self) -> Result<Option<SocketAddr>> {
        let l = &self.gateway.http_listen;
        if l.is_empty() {
            return Ok(None);
        }
        l.parse().map(Some).with_context(|| {
            format!("gateway.http_listen: {l:?} is not an address (use \"\" to disable)")
        })
    }

    pub fn compute_threads(&self) -> usize {
        if self.threads.compute == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.threads.compute
        }
    }

    pub fn validate(&self) -> Result<()> {
        // Before anything reads the int8 kernel (precision's resolution does).
        crate::model::int8::kernel_from_env().map_err(anyhow::Error::msg)?;
        if let Err(e) = self.precision.resolve() {
            bail!("precision: {e}");
        }
        self.listen_addr()?;
        self.metrics_addr()?;
        if self.tls.enabled()
            && (self.tls.cert_file.as_os_str().is_empty()
                || self.tls.key_file.as_os_str().is_empty())
        {
            bail!("tls: cert_file and key_file are both needed");
        }
        if (self.tls.client_ca_file.is_some() || !self.tls.plaintext_health_listen.is_empty())
            && !self.tls.enabled()
        {
            bail!("tls.client_ca_file and tls.plaintext_health_listen need tls.cert_file and tls.key_file");
        }
        self.tls.plaintext_health_addr()?;
        if self.backend == BackendKind::Fault
            && std::env::var_os(crate::engine::fault::ENV).is_none()
        {
            bail!(
                "backend = \"fault\" injects faults for tests; it needs {} (the control file)",
                crate::engine::fault::ENV
            );
        }
        if self.drain.timeout_s == 0 {
            bail!("drain.timeout_s must be > 0");
        }
        // Timers add a duration to the clock unchecked (hyper's header timeout, tokio's
        // interval): a huge value meant as "no limit" would panic in a connection or in the
        // re-fit task, not here. A year is far past any real timeout.
        for (k, v, unit_per_s) in [
            ("max_connection_age_s", self.max_connection_age_s, 1),
            ("health.batch_watchdog_s", self.health.batch_watchdog_s, 1),
            ("drain.lame_duck_s", self.drain.lame_duck_s, 1),
            ("drain.timeout_s", self.drain.timeout_s, 1),
            (
                "feedback.refit_interval_s",
                self.feedback.refit_interval_s,
                1,
            ),
            ("gateway.head_timeout_s", self.gateway.head_timeout_s, 1),
            (
                "batch.max_queue_delay_ms",
                self.batch.max_queue_delay_ms,
                1000,
            ),
            (
                "gateway.ext_proc_route_ms",
                self.gateway.ext_proc_route_ms,
                1000,
            ),
        ] {
            if v > MAX_DURATION_S * unit_per_s {
                bail!("{k} = {v} is above a year ({MAX_DURATION_S} s)");
            }
        }
        let b = &self.batch;
        for (k, v) in [
            ("batch.max_batch_tokens", b.max_batch_tokens),
            ("batch.max_batch_requests", b.max_batch_requests),
            ("batch.gpu_max_batch_tokens", b.gpu_max_batch_tokens),
            ("batch.gpu_max_batch_requests", b.gpu_max_batch_requests),
            ("batch.max_queue", b.max_queue),
            ("batch.max_input_tokens", b.max_input_tokens),
            ("batch.max_answer_tokens", b.max_answer_tokens),
            ("batch.max_input_bytes", b.max_input_bytes),
            ("threads.tokenize", self.threads.tokenize),
        ] {
            if v == 0 {
                bail!("{k} must be > 0");
            }
        }
        if b.max_tokenize_bytes < b.max_input_bytes {
            bail!(
                "batch.max_tokenize_bytes = {} is below batch.max_input_bytes = {}: an input of the allowed size could never be tokenized",
                b.max_tokenize_bytes,
                b.max_input_bytes
            );
        }
        // MiniLM has 512 position embeddings; 2 of them go to [CLS]/[SEP].
        for (k, v) in [
            ("batch.max_input_tokens", b.max_input_tokens),
            ("batch.max_answer_tokens", b.max_answer_tokens),
        ] {
            if !(8..=512).contains(&v) {
                bail!("{k} = {v} must be in 8..=512 (the encoder has 512 positions)");
            }
            for (bk, bv) in [
                ("batch.max_batch_tokens", b.max_batch_tokens),
                ("batch.gpu_max_batch_tokens", b.gpu_max_batch_tokens),
            ] {
                if v > bv {
                    bail!("{k} = {v} exceeds {bk} = {bv}: such a request could never be batched");
                }
            }
        }
        let p = &self.policy;
        if let Some(f) = p.quality_floor {
            unit("policy.quality_floor", f)?;
        }
        unit("policy.verify_band", p.verify_band)?;
        if let Some(r) = p.relative_floor {
            if !(r > 0.0 && r <= 1.0) {
                bail!("policy.relative_floor = {r} must be in (0, 1]");
            }
        }
        if let Some(t) = p.verify_threshold {
            unit("policy.verify_threshold", t)?;
        }
        // 0 would let the student decide every relative Route: the server `precision =
        // static` is refused for.
        if let Some(t) = p.fast_path_stability.filter(|t| !(*t > 0.0 && *t <= 1.0)) {
            bail!("policy.fast_path_stability = {t} must be in (0, 1]");
        }
        if !p.cost_weight.is_finite() || p.cost_weight < 0.0 {
            bail!(
                "policy.cost_weight = {} must be finite and >= 0",
                p.cost_weight
            );
        }
        let f = &self.feedback;
        if f.enabled() {
            if f.refit_interval_s == 0 {
                bail!("feedback.refit_interval_s must be > 0");
            }
            if f.min_rows == 0 || f.max_rows_per_model < f.min_rows {
                bail!("feedback.min_rows must be > 0 and <= feedback.max_rows_per_model");
            }
        }
        if self.catalog.is_empty() {
            bail!("catalog is empty: list at least one [[catalog]] model");
        }
        self.validate_gateway()?;
        let mut seen = std::collections::HashSet::new();
        for e in &self.catalog {
            if e.model.trim().is_empty() {
                bail!("catalog: an entry has an empty model name");
            }
            if !seen.insert(e.model.as_str()) {
                bail!("catalog: model {:?} is listed twice", e.model);
            }
            for (k, v) in [
                ("in_usd_per_mtok", e.in_usd_per_mtok),
                ("out_usd_per_mtok", e.out_usd_per_mtok),
            ] {
                if !v.is_finite() || v < 0.0 {
                    bail!("catalog[{}].{k} = {v} must be finite and >= 0", e.model);
                }
            }
            if let Some(u) = &e.upstream {
                upstream_ok(&e.model, u)?;
            }
            if let Some(p) = &e.prior {
                if e.like.is_some() {
                    bail!("catalog[{}]: give `like` or `prior`, not both", e.model);
                }
                if !(p.accuracy > 0.0 && p.accuracy < 1.0) {
                    bail!(
                        "catalog[{}].prior.accuracy = {} must be in (0, 1)",
                        e.model,
                        p.accuracy
                    );
                }
            }
        }
        Ok(())
    }
}

impl Config {
    fn validate_gateway(&self) -> Result<()> {
        let g = &self.gateway;
        self.http_addr()?;
        if g.auto_model.trim().is_empty() || g.auto_model.contains(':') {
            bail!(
                "gateway.auto_model = {:?} must be a non-empty name without ':'",
                g.auto_model
            );
        }
        for (k, v) in [
            ("gateway.timeout_s", g.timeout_s),
            ("gateway.max_body_bytes", g.max_body_bytes as u64),
            ("gateway.max_concurrent", g.max_concurrent as u64),
            ("gateway.max_connections", g.max_connections as u64),
            ("max_connections", self.max_connections as u64),
            ("gateway.head_timeout_s", g.head_timeout_s),
            ("gateway.ext_proc_route_ms", g.ext_proc_route_ms),
        ] {
            if v == 0 {
                bail!("{k} must be > 0");
            }
        }
        // The front bounds a request's deadline by this (`gateway::http::deadline`): say so
        // here rather than cut a longer setting short without a word. (It also keeps the
        // setting under the year every other duration is held to.)
        if g.timeout_s > MAX_REQUEST_TIMEOUT_S {
            bail!(
                "gateway.timeout_s = {} must be at most {MAX_REQUEST_TIMEOUT_S} (a day)",
                g.timeout_s
            );
        }
        // Far above any real load; a semaphore cannot count past usize::MAX >> 3.
        for (k, v) in [
            ("gateway.max_concurrent", g.max_concurrent),
            ("gateway.max_connections", g.max_connections),
            ("max_connections", self.max_connections),
        ] {
            if v > 1 << 20 {
                bail!("{k} = {v} must be at most {}", 1 << 20);
            }
        }
        for (name, p) in &g.policies {
            let key = |f: &str| format!("gateway.policies.{name}.{f}");
            if name.trim().is_empty() || name.contains(char::is_whitespace) {
                bail!("gateway.policies: {name:?} is not a usable name");
            }
            if let Some(f) = p.quality_floor {
                unit(&key("quality_floor"), f)?;
            }
            if let Some(r) = p.relative_floor {
                if !(r > 0.0 && r <= 1.0) {
                    bail!("{} = {r} must be in (0, 1]", key("relative_floor"));
                }
            }
            for (f, v) in [
                ("cost_weight", p.cost_weight),
                ("max_cost_usd", p.max_cost_usd),
            ] {
                if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    bail!("{} must be finite and >= 0", key(f));
                }
            }
            if let Some(c) = &p.consensus {
                // A consensus escalates to the most expensive candidate, whatever it costs.
                if p.max_cost_usd.is_some() {
                    bail!(
                        "{} and {} do not go together: a consensus escalates to the most \
                         expensive candidate",
                        key("consensus"),
                        key("max_cost_usd")
                    );
                }
                // A consensus reads whole answers: a stream asked of it cannot pass through.
                if p.stream == Some(StreamMode::Pass) {
                    bail!(
                        "{} and {} = \"pass\" do not go together: a consensus reads whole \
                         answers and sends the shipped one as events",
                        key("consensus"),
                        key("stream")
                    );
                }
                let n = c.models.len();
                if !(2..=MAX_CONSENSUS_MODELS).contains(&n) {
                    bail!(
                        "{} lists {n} models; a consensus takes 2 to {MAX_CONSENSUS_MODELS}",
                        key("consensus.models")
                    );
                }
                if !(2..=n).contains(&c.agree) {
                    bail!(
                        "{} = {} must be in 2..={n}",
                        key("consensus.agree"),
                        c.agree
                    );
                }
                for (i, m) in c.models.iter().enumerate() {
                    if c.models[..i].contains(m) {
                        bail!("{} lists {m:?} twice", key("consensus.models"));
                    }
                    if !self
                        .catalog
                        .iter()
                        .any(|e| &e.model == m && e.upstream.is_some())
                    {
                        bail!(
                            "{}: {m:?} is not a catalog model with an `upstream`",
                            key("consensus.models")
                        );
                    }
                }
            }
        }
        if !g.http_listen.is_empty() && self.catalog.iter().all(|e| e.upstream.is_none()) {
            bail!("gateway.http_listen is set but no [[catalog]] entry has an `upstream` to call");
        }
        Ok(())
    }
}

fn upstream_ok(model: &str, u: &UpstreamConfig) -> Result<()> {
    let url = u.base_url.trim();
    if !(url.starts_with("http://") || url.starts_with("https://"))
        || url.contains(char::is_whitespace)
    {
        bail!(
            "catalog[{model}].upstream.base_url = {:?} must be an http:// or https:// URL",
            u.base_url
        );
    }
    if u.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
        bail!("catalog[{model}].upstream.model is empty");
    }
    if let Some(k) = &u.api_key_env {
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("catalog[{model}].upstream.api_key_env = {k:?} is not a variable name");
        }
    }
    Ok(())
}

/// The longest duration any setting may name (365 days).
pub const MAX_DURATION_S: u64 = 365 * 24 * 3600;

/// The longest deadline the HTTP front gives a request (a day): `gateway.timeout_s` and a
/// client's `x-tiergate-timeout-ms` alike.
pub const MAX_REQUEST_TIMEOUT_S: u64 = 24 * 3600;

fn unit(key: &str, v: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&v) {
        bail!("{key} = {v} must be in [0, 1]");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_has_the_six_current_models() {
        let c = Config::embedded().unwrap();
        c.validate().unwrap();
        let names: Vec<_> = c.catalog.iter().map(|e| e.model.as_str()).collect();
        for m in [
            "claude-opus-4.8",
            "gpt-5.5",
            "claude-sonnet-4.6",
            "deepseek-v4",
            "claude-haiku-4.5",
            "gemini-2.5-flash",
        ] {
            assert!(names.contains(&m), "{m} missing from the default catalog");
        }
    }

    /// A file names only what it changes: the rest keeps the embedded default's values (before,
    /// a short file switched metrics and the embedding cache off, dropped the relative floor,
    /// and failed without `model_dir`). Tables merge key by key; a list replaces the default's.
    #[test]
    fn a_short_file_changes_only_what_it_names() {
        let d = Config::embedded().unwrap();
        let c =
            Config::over_embedded("listen = \"127.0.0.1:7\"\n[batch]\nmax_queue = 10\n").unwrap();
        c.validate().unwrap();
        assert_eq!((c.listen.as_str(), c.batch.max_queue), ("127.0.0.1:7", 10));
        assert_eq!(c.metrics_listen, d.metrics_listen);
        assert!(!c.metrics_listen.is_empty());
        assert_eq!(c.batch.embedding_cache, d.batch.embedding_cache);
        assert!(c.batch.embedding_cache > 0);
        assert_eq!(c.batch.max_batch_tokens, d.batch.max_batch_tokens);
        assert_eq!(c.policy.relative_floor, d.policy.relative_floor);
        assert_eq!(
            (c.model_dir, c.catalog.len()),
            (d.model_dir, d.catalog.len())
        );

        let one = "[[catalog]]\nmodel = \"m\"\nin_usd_per_mtok = 1.0\nout_usd_per_mtok = 2.0\nlike = \"gpt-4-1106-preview\"\n";
        let c = Config::over_embedded(one).unwrap();
        assert_eq!(c.catalog.len(), 1, "a list replaces the default's whole");
        assert_eq!(c.catalog[0].model, "m");
    }

    #[test]
    fn a_bad_key_in_a_short_file_is_named() {
        let err = |text: &str| format!("{:#}", Config::over_embedded(text).unwrap_err());
        // Named by the file's own line (the merged value has no positions).
        let e = err("[batch]\nmax_queue = \"x\"\n");
        assert!(e.contains("line 2") && e.contains("max_queue"), "{e}");
        let e = err("[batch]\nmax_queu = 1\n");
        assert!(e.contains("max_queu"), "{e}");
        assert!(err("[batch\n").contains("line 1"));
        // After a table the file holds in part (alone, it stops there: missing fields), the
        // line of the key the merged value names.
        let e = err("[batch]\nmax_batch_tokens = 4096\n\n[gateway]\nverify = \"sometimes\"\n");
        assert!(e.contains("line 5") && e.contains("gateway.verify"), "{e}");
        // Inside a list, the line points at the entry.
        let entry = "[[catalog]]\nmodel = \"a\"\nin_usd_per_mtok = 1.0\nout_usd_per_mtok = 2.0\n";
        let e = err(&format!(
            "{entry}\n[[catalog]]\nmodel = \"b\"\nin_usd_per_mtok = \"x\"\n"
        ));
        assert!(e.contains("line 8"), "{e}");
        // A file can switch the relative floor off, not on without a number.
        assert!(err("[policy]\nrelative_floor = true\n").contains("false for off"));
        let off = Config::over_embedded("[policy]\nrelative_floor = false\n").unwrap();
        assert_eq!(off.policy.relative_floor, None);
        let c = Config::over_embedded("[policy]\nrelative_floor = 1\n").unwrap();
        assert_eq!(c.policy.relative_floor, Some(1.0));
    }

    fn with(f: impl FnOnce(&mut Config)) -> String {
        let mut c = Config::embedded().unwrap();
        f(&mut c);
        format!("{:#}", c.validate().unwrap_err())
    }

    #[test]
    fn a_server_does_not_run_on_the_student_alone() {
        let o = Overrides {
            precision: Some(Precision::Static),
            ..Default::default()
        };
        let e = format!("{:#}", Config::load(&o).unwrap_err());
        assert!(e.contains("fast_path_stability"), "{e}");
        let o = Overrides {
            fast_path_stability: Some(0.05),
            ..Default::default()
        };
        assert_eq!(
            Config::load(&o).unwrap().policy.fast_path_stability,
            Some(0.05)
        );
    }

    #[test]
    fn the_cuda_backend_gets_the_gpu_budget() {
        let c = Config::embedded().unwrap();
        let (cpu, gpu) = (
            c.batch.limits_for(Device::Cpu),
            c.batch.limits_for(Device::Cuda),
        );
        assert_eq!(cpu.max_batch_tokens, c.batch.max_batch_tokens);
        assert_eq!(gpu.max_batch_tokens, c.batch.gpu_max_batch_tokens);
        assert_eq!(gpu.max_batch_requests, c.batch.gpu_max_batch_requests);
        assert!(gpu.max_batch_tokens > cpu.max_batch_tokens);
        assert_eq!(gpu.max_queue, cpu.max_queue);
    }

    #[test]
    fn bad_values_are_named() {
        assert!(with(|c| c.listen = "nowhere".into()).contains("listen"));
        assert!(with(|c| c.batch.max_queue = 0).contains("batch.max_queue"));
        assert!(with(|c| c.batch.max_input_tokens = 1000).contains("512"));
        assert!(with(|c| c.batch.gpu_max_batch_tokens = 0).contains("batch.gpu_max_batch_tokens"));
        assert!(with(|c| c.batch.gpu_max_batch_tokens = 100)
            .contains("batch.gpu_max_batch_tokens = 100"));
        assert!(with(|c| c.policy.quality_floor = Some(1.5)).contains("policy.quality_floor"));
        assert!(with(|c| c.policy.quality_floor = Some(f64::NAN)).contains("policy.quality_floor"));
        for bad in [-0.1, 0.0, f64::NAN] {
            assert!(with(|c| c.policy.fast_path_stability = Some(bad))
                .contains("policy.fast_path_stability"));
        }
        // Past a year a timer's unchecked clock arithmetic could panic at run time.
        let year = MAX_DURATION_S;
        assert!(with(|c| c.gateway.head_timeout_s = u64::MAX).contains("gateway.head_timeout_s"));
        assert!(
            with(|c| c.feedback.refit_interval_s = year + 1).contains("feedback.refit_interval_s")
        );
        assert!(with(|c| c.max_connection_age_s = u64::MAX).contains("max_connection_age_s"));
        assert!(with(|c| c.gateway.timeout_s = 86_401).contains("at most 86400"));
        assert!(
            with(|c| c.batch.max_queue_delay_ms = year * 1000 + 1).contains("max_queue_delay_ms")
        );
        assert!(with(|c| c.gateway.ext_proc_route_ms = u64::MAX).contains("ext_proc_route_ms"));
        let mut c = Config::embedded().unwrap();
        c.gateway.head_timeout_s = year;
        c.health.batch_watchdog_s = year;
        c.batch.max_queue_delay_ms = year * 1000;
        c.validate().unwrap();
        assert!(with(|c| c.catalog.clear()).contains("catalog is empty"));
        assert!(with(|c| c.catalog[0].in_usd_per_mtok = -1.0).contains("in_usd_per_mtok"));
        assert!(with(|c| {
            let e = c.catalog[0].clone();
            c.catalog.push(e)
        })
        .contains("twice"));
    }

    #[test]
    fn gateway_values_are_named() {
        let up = |url: &str| UpstreamConfig {
            base_url: url.into(),
            model: None,
            api_key_env: Some("KEY".into()),
        };
        assert!(with(|c| c.gateway.http_listen = "127.0.0.1:0".into()).contains("no [[catalog]]"));
        assert!(with(|c| c.catalog[0].upstream = Some(up("ftp://x"))).contains("upstream.base_url"));
        assert!(with(|c| {
            let mut u = up("http://127.0.0.1:1/v1");
            u.api_key_env = Some("A-B".into());
            c.catalog[0].upstream = Some(u)
        })
        .contains("api_key_env"));
        assert!(with(|c| c.gateway.auto_model = "a:b".into()).contains("gateway.auto_model"));
        for bad in [0, (1 << 20) + 1] {
            assert!(with(|c| c.gateway.max_connections = bad).contains("gateway.max_connections"));
            assert!(with(|c| c.gateway.max_concurrent = bad).contains("gateway.max_concurrent"));
        }
        assert!(with(|c| {
            let p = GatewayPolicy {
                relative_floor: Some(1.5),
                ..Default::default()
            };
            c.gateway.policies.insert("cheap".into(), p);
        })
        .contains("gateway.policies.cheap.relative_floor"));
        let consensus = |models: &[&str], agree, max_cost_usd, stream| {
            with(|c| {
                c.catalog[0].upstream = Some(up("https://api.example/v1"));
                c.catalog[1].upstream = Some(up("https://api.example/v1"));
                let p = GatewayPolicy {
                    max_cost_usd,
                    stream,
                    consensus: Some(ConsensusConfig {
                        models: models.iter().map(|m| m.to_string()).collect(),
                        agree,
                    }),
                    ..Default::default()
                };
                c.gateway.policies.insert("vote".into(), p);
            })
        };
        let cat = Config::embedded().unwrap().catalog;
        let (a, b, other) = (&cat[0].model, &cat[1].model, &cat[2].model);
        let plain = |models: &[&str], agree| consensus(models, agree, None, None);
        assert!(plain(&[a], 2).contains("lists 1 models"));
        assert!(plain(&[a, b], 3).contains("consensus.agree = 3"));
        assert!(plain(&[a, a], 2).contains("twice"));
        assert!(plain(&[a, other], 2).contains("not a catalog model with an `upstream`"));
        assert!(plain(&[a, "nope"], 2).contains("\"nope\""));
        assert!(consensus(&[a, b], 2, Some(0.01), None).contains("do not go together"));
        let pass = Some(StreamMode::Pass);
        assert!(consensus(&[a, b], 2, None, pass).contains("gateway.policies.vote.stream"));
        // A front with one callable model is valid.
        let mut c = Config::embedded().unwrap();
        c.gateway.http_listen = "127.0.0.1:0".into();
        c.catalog[0].upstream = Some(up("https://api.example/v1"));
        c.validate().unwrap();
        assert_eq!(c.http_addr().unwrap().map(|a| a.port()), Some(0));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = format!("{EMBEDDED_DEFAULT}\nbogus_key = 1\n");
        assert!(toml::from_str::<Config>(&text).is_err());
    }
}
