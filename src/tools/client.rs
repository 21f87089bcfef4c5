//! `tiergate call`: a gRPC client for the running service, so a fresh machine can try Route,
//! Verify, Info and health without grpcurl or generated stubs. Prints one JSON object.
#![forbid(unsafe_code)]
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::proto::{self, router_client::RouterClient};

#[derive(Debug, Clone, clap::Args)]
pub struct CallArgs {
    /// The server's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051", global = true)]
    pub addr: String,
    /// CA certificates (PEM) to trust: TLS, needed for an https:// address.
    #[arg(long, global = true)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a server that asks for one (mutual TLS).
    #[arg(long, global = true, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, global = true, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the address's host).
    #[arg(long, global = true)]
    pub domain_name: Option<String>,
    /// Bearer token for a server with `[auth]`.
    #[arg(long, env = "TIERGATE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub rpc: Rpc,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Rpc {
    /// Which model should answer this prompt.
    Route {
        /// The prompt.
        prompt: String,
        /// Candidate models (default: the server's catalog).
        #[arg(long, value_delimiter = ',')]
        candidates: Vec<String>,
        /// Quality floor for this request (default: the server's).
        #[arg(long)]
        floor: Option<f64>,
        /// Cost weight (utility mode) for this request.
        #[arg(long)]
        cost_weight: Option<f64>,
    },
    /// Ship this answer or escalate.
    Verify {
        prompt: String,
        answer: String,
        /// The model that wrote the answer.
        #[arg(long)]
        model: String,
        #[arg(long)]
        floor: Option<f64>,
    },
    /// Version, revisions, backend, limits, catalog and defaults.
    Info,
    /// grpc.health.v1 status of the Router service.
    Health,
}

fn policy(floor: Option<f64>, cost_weight: Option<f64>) -> Option<proto::Policy> {
    (floor.is_some() || cost_weight.is_some()).then_some(proto::Policy {
        quality_floor: floor,
        cost_weight,
        max_cost_usd: None,
        relative_floor: None,
    })
}

fn timings(t: Option<proto::Timings>) -> Value {
    t.map_or(Value::Null, |t| {
        json!({"tokenize_ms": t.tokenize_ms, "queue_ms": t.queue_ms,
               "inference_ms": t.inference_ms, "total_ms": t.total_ms})
    })
}

pub fn run(a: CallArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(call(a))?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

async fn connect(a: &CallArgs) -> Result<Channel> {
    let mut ep = Channel::from_shared(a.addr.clone())
        .with_context(|| format!("bad address {:?}", a.addr))?;
    if a.addr.starts_with("https://") || a.ca_file.is_some() {
        // Built without a system root store: the CA is always named.
        let Some(ca) = &a.ca_file else {
            bail!("an https:// address needs --ca-file");
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(c), Some(k)) = (&a.cert_file, &a.key_file) {
            tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
        }
        if let Some(d) = &a.domain_name {
            tls = tls.domain_name(d);
        }
        ep = ep.tls_config(tls).context("TLS settings")?;
    }
    ep.connect()
        .await
        .with_context(|| format!("connecting to {}", a.addr))
}

async fn call(a: CallArgs) -> Result<Value> {
    let channel = connect(&a).await?;
    let auth: Option<tonic::metadata::MetadataValue<_>> = a
        .token
        .as_deref()
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .context("--token is not a valid header value")?;
    let mut c = RouterClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
        if let Some(v) = &auth {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    });
    Ok(match a.rpc {
        Rpc::Route {
            prompt,
            candidates,
            floor,
            cost_weight,
        } => {
            let r = c
                .route(proto::RouteRequest {
                    input: Some(proto::route_request::Input::Prompt(prompt)),
                    candidates,
                    policy: policy(floor, cost_weight),
                    ..Default::default()
                })
                .await?
                .into_inner();
            json!({
                "model": r.model, "reason": r.reason,
                "expected_cost_usd": r.expected_cost_usd,
                "expected_saving_usd": r.expected_saving_usd,
                "margin": r.margin, "verify_recommended": r.verify_recommended,
                "candidates": r.candidates.iter().map(|c| json!({
                    "model": c.model, "p_pass": c.p_pass,
                    "expected_cost_usd": c.expected_cost_usd, "params": c.params
                })).collect::<Vec<_>>(),
                "input_tokens": r.input_tokens, "truncated": r.truncated,
                "revision": r.revision, "timings": timings(r.timings),
            })
        }
        Rpc::Verify {
            prompt,
            answer,
            model,
            floor,
        } => {
            let r = c
                .verify(proto::VerifyRequest {
                    prompt,
                    answer,
                    model,
                    policy: policy(floor, None),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let decision =
                proto::Decision::try_from(r.decision).map_or("UNKNOWN", |d| d.as_str_name());
            json!({
                "decision": decision, "p_pass": r.p_pass, "threshold": r.threshold,
                "escalate_to": r.escalate_to, "input_tokens": r.input_tokens,
                "truncated": r.truncated, "revision": r.revision, "timings": timings(r.timings),
            })
        }
        Rpc::Info => {
            let r = c.info(proto::InfoRequest {}).await?.into_inner();
            json!({
                "version": r.version, "model_revision": r.model_revision,
                "heads_revision": r.heads_revision, "backend": r.backend, "numerics": r.numerics,
                "default_quality_floor": r.default_quality_floor,
                "default_verify_threshold": r.default_verify_threshold,
                "default_relative_floor": r.default_relative_floor,
                "limits": r.limits.map(|l| json!({
                    "max_batch_tokens": l.max_batch_tokens, "max_batch_requests": l.max_batch_requests,
                    "max_queue": l.max_queue, "max_input_tokens": l.max_input_tokens,
                    "max_input_bytes": l.max_input_bytes,
                })),
                "catalog": r.catalog.iter().map(|e| json!({
                    "model": e.model, "in_usd_per_mtok": e.in_usd_per_mtok,
                    "out_usd_per_mtok": e.out_usd_per_mtok, "head": e.head,
                    "expected_output_tokens": e.expected_output_tokens,
                    "params": e.params,
                })).collect::<Vec<_>>(),
            })
        }
        Rpc::Health => {
            let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
            let r = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "tiergate.v1.Router".into(),
                })
                .await?
                .into_inner();
            let status = tonic_health::pb::health_check_response::ServingStatus::try_from(r.status)
                .map_or("UNKNOWN", |s| s.as_str_name());
            json!({ "status": status })
        }
    })
}
