//! Load generator and encoder benchmark driver (see benches/README.md).
//!
//! - `loadgen [OPTIONS]`: drives a running tiergate server on a loopback address with Route or
//!   Verify calls, closed-loop (`--concurrency`) or open-loop (`--rate`), bounded by
//!   `--requests` and `--duration`; prints and writes (`--out`) throughput, latency
//!   percentiles and error counts by gRPC code.
//! - `loadgen dump-ids`: tokenizes the dev prompts exactly as the server does (Route,
//!   head+tail truncation) and writes the token ids, so the ONNX Runtime peer
//!   (scripts/onnx_peer.py) runs the very same sequences.
//! - `loadgen bench-encoder`: embeds those id lists through the CPU backend directly, at
//!   batch 1 and in length-sorted packed batches, and reports throughput.
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use tiergate::base::{Backend, PackedBatch};
use tiergate::engine::cpu::CpuBackend;
use tiergate::model::encoder::{MiniLm, Precision};
use tiergate::model::tokenize::{TextTokenizer, TruncSide};
use tiergate::proto::router_client::RouterClient;
use tiergate::proto::{self, RouteRequest, VerifyRequest};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "tiergate load generator and encoder benchmark"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write the token ids of the dev prompts (server tokenization) as JSON.
    DumpIds(DumpArgs),
    /// Embed dumped id lists through the CPU backend and report throughput.
    BenchEncoder(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
enum Rpc {
    Route,
    Verify,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Rpc::Route => "Route",
            Rpc::Verify => "Verify",
        }
    }
}

#[derive(Args)]
struct LoadArgs {
    /// Server address; only loopback addresses are accepted.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    #[arg(long, value_enum, default_value = "route")]
    rpc: Rpc,
    /// Requests in flight at once (closed loop). Ignored with --rate.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Open loop: start this many requests per second regardless of replies.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: most requests in flight; further arrivals are counted as shed.
    #[arg(long, default_value_t = 2048)]
    max_in_flight: usize,
    /// Stop after this many measured requests...
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// ...or after this many seconds, whichever comes first.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Unmeasured requests sent first (closed loop, concurrency 1).
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Per-request deadline (sent as grpc-timeout).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    #[arg(long, default_value = "../shared/data/dev.jsonl.gz")]
    data: PathBuf,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Instead of dev prompts, send prompts of about N tokens ([CLS]/[SEP] included).
    #[arg(long)]
    synthetic_tokens: Option<usize>,
    /// Seconds to wait for the server to accept connections and finish its warm-up.
    #[arg(long, default_value_t = 60.0)]
    wait: f64,
    /// Share of requests sent with priority HIGH (the rest NORMAL), picked per request by a
    /// seeded hash of its index.
    #[arg(long, default_value_t = 0.0)]
    high_share: f64,
    /// Only the dev prompts of this source.
    #[arg(long)]
    source: Option<String>,
    /// Route's candidates, comma-separated (default: none given, i.e. the server's catalog).
    #[arg(long, value_delimiter = ',')]
    candidates: Vec<String>,
    /// Write the report as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct DumpArgs {
    #[arg(long, default_value = "../shared/data/dev.jsonl.gz")]
    data: PathBuf,
    #[arg(long, default_value = "models/base")]
    model_dir: PathBuf,
    /// Route's `max_input_tokens` (tiergate.toml).
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    /// JSON written by `dump-ids`.
    #[arg(long)]
    ids: PathBuf,
    #[arg(long, default_value = "models/base")]
    model_dir: PathBuf,
    /// Encoder threads (0 = all cores, as the server's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Linear-layer arithmetic, as the server's `precision`.
    #[arg(long, value_enum, default_value = "auto")]
    precision: Precision,
    /// Sequences per batch in the batched run.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Timed passes over all sequences per mode; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Only the first N sequences (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Write embeddings (f32 little endian, n × dim, input order) for the peer's parity check.
    #[arg(long)]
    embeddings_out: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Some(Cmd::DumpIds(a)) => dump_ids(&a),
        Some(Cmd::BenchEncoder(a)) => bench_encoder(&a),
        None => run_load(cli.load),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared bits

/// SplitMix64: a seeded, dependency-free generator; statistical quality is plenty for sampling.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// One sample of the prompt mix: the prompt and, for Verify, an answer.
#[derive(Clone)]
struct Sample {
    prompt: String,
    answer: String,
}

/// Distinct dev prompts in file order (rows repeat each prompt once per model), each with
/// the first non-empty response seen for it.
fn dev_samples(path: &Path, source: Option<&str>) -> Result<Vec<Sample>> {
    let rows = tiergate::eval::data::read_rows(path)?;
    let mut seen = HashSet::new();
    let mut out: Vec<Sample> = Vec::new();
    let mut index = BTreeMap::new();
    for r in rows
        .into_iter()
        .filter(|r| source.is_none_or(|s| r.source == s))
    {
        let key = (r.source.clone(), r.prompt_id.clone());
        if seen.insert(key.clone()) {
            index.insert(key.clone(), out.len());
            out.push(Sample {
                prompt: r.prompt,
                answer: String::new(),
            });
        }
        if let (Some(&i), Some(resp)) = (index.get(&key), r.response) {
            if out[i].answer.is_empty() && !resp.trim().is_empty() {
                out[i].answer = resp;
            }
        }
    }
    ensure!(!out.is_empty(), "{}: no rows", path.display());
    Ok(out)
}

/// Common English words that are each one WordPiece token in the uncased BERT vocabulary.
const WORDS: &[&str] = &[
    "time",
    "people",
    "year",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "name",
    "team",
    "minute",
    "idea",
    "body",
    "back",
    "face",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
];

/// A prompt of `tokens - 2` single-token words, i.e. about `tokens` tokens with [CLS]/[SEP].
fn synthetic_prompt(rng: &mut Rng, tokens: usize) -> String {
    let n = tokens.saturating_sub(2).max(1);
    (0..n)
        .map(|_| WORDS[rng.below(WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(v, 50.0)
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// dump-ids / bench-encoder

#[derive(Serialize, Deserialize)]
struct IdDump {
    source: String,
    max_tokens: usize,
    /// One entry per distinct dev prompt, in file order, [CLS]/[SEP] included (type ids are 0).
    seqs: Vec<Vec<u32>>,
}

fn dump_ids(a: &DumpArgs) -> Result<()> {
    let samples = dev_samples(&a.data, None)?;
    // The pair limit is unused here; it only has to be valid.
    let tok = TextTokenizer::from_file(
        &a.model_dir.join("tokenizer.json"),
        a.max_tokens,
        a.max_tokens.max(5),
    )?;
    let texts: Vec<&str> = samples.iter().map(|s| s.prompt.as_str()).collect();
    let enc = tok.encode_single_batch(&texts, TruncSide::HeadTail)?;
    let seqs: Vec<Vec<u32>> = enc.into_iter().map(|e| e.ids).collect();
    let tokens: usize = seqs.iter().map(Vec::len).sum();
    let truncated = seqs.iter().filter(|s| s.len() == a.max_tokens).count();
    write_json(
        &a.out,
        &IdDump {
            source: a.data.display().to_string(),
            max_tokens: a.max_tokens,
            seqs,
        },
    )?;
    eprintln!(
        "dump-ids: {} prompts, {tokens} tokens (mean {:.1}), {truncated} at the {}-token limit -> {}",
        texts.len(),
        tokens as f64 / texts.len() as f64,
        a.max_tokens,
        a.out.display()
    );
    Ok(())
}

#[derive(Serialize)]
struct ModeReport {
    /// Median over reps.
    seqs_per_s: f64,
    tokens_per_s: f64,
    pass_s: Vec<f64>,
    /// CPU time of the process per sequence, median over reps: steadier than wall time when
    /// other work shares the cores.
    cpu_ms_per_seq: f64,
    pass_cpu_s: Vec<f64>,
    /// Batch 1 only: per-sequence latency percentiles over all reps (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<BTreeMap<String, f64>>,
}

#[derive(Serialize)]
struct EncoderReport {
    side: &'static str,
    /// The int8 kernel (what `int8` precision runs; `TIERGATE_INT8_KERNEL` picks it).
    int8_kernel: &'static str,
    threads: usize,
    sequences: usize,
    tokens: usize,
    batch: usize,
    reps: usize,
    batch1: ModeReport,
    batched: ModeReport,
}

/// User + system CPU seconds of this process (all threads), from /proc/self/stat in
/// USER_HZ (100 on Linux); NaN where unavailable.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    match (tick(11), tick(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

fn pack(seqs: &[&[u32]]) -> PackedBatch {
    let mut b = PackedBatch::new();
    for s in seqs {
        b.push(s, &vec![0; s.len()]);
    }
    b
}

fn bench_encoder(a: &BenchArgs) -> Result<()> {
    let text =
        std::fs::read_to_string(&a.ids).with_context(|| format!("reading {}", a.ids.display()))?;
    let dump: IdDump =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", a.ids.display()))?;
    let mut seqs = dump.seqs;
    if a.limit > 0 {
        seqs.truncate(a.limit);
    }
    ensure!(!seqs.is_empty(), "{}: no sequences", a.ids.display());
    ensure!(a.batch > 0 && a.reps > 0, "--batch and --reps must be > 0");
    let threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.threads
    };
    tiergate::model::int8::kernel_from_env().map_err(anyhow::Error::msg)?;
    let model = Arc::new(MiniLm::load(&a.model_dir)?);
    let dim = model.dim();
    let mut be = CpuBackend::new(model, threads, a.precision)?;
    let tokens: usize = seqs.iter().map(Vec::len).sum();

    // Warm the pool and allocator.
    for s in seqs.iter().take(16) {
        be.embed(&pack(&[s]))?;
    }

    // Batch 1, in file order: the latency-bound case (one request, nothing to batch with).
    let (mut b1_pass, mut b1_cpu) = (Vec::new(), Vec::new());
    let mut lat = Vec::with_capacity(seqs.len() * a.reps);
    let mut embeddings = vec![0.0f32; seqs.len() * dim];
    for rep in 0..a.reps {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        for (i, s) in seqs.iter().enumerate() {
            let t = Instant::now();
            let e = be.embed(&pack(&[s]))?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            if rep == 0 {
                embeddings[i * dim..(i + 1) * dim].copy_from_slice(&e);
            }
        }
        b1_pass.push(t0.elapsed().as_secs_f64());
        b1_cpu.push(cpu_seconds() - c0);
    }

    // Batched: length-sorted, packed `batch` at a time (the same grouping the peer pads).
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let batches: Vec<PackedBatch> = order
        .chunks(a.batch)
        .map(|c| pack(&c.iter().map(|&i| seqs[i].as_slice()).collect::<Vec<_>>()))
        .collect();
    let (mut bb_pass, mut bb_cpu) = (Vec::new(), Vec::new());
    for _ in 0..a.reps {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        for b in &batches {
            be.embed(b)?;
        }
        bb_pass.push(t0.elapsed().as_secs_f64());
        bb_cpu.push(cpu_seconds() - c0);
    }

    lat.sort_by(f64::total_cmp);
    let pcts: BTreeMap<String, f64> = [50.0, 90.0, 99.0]
        .iter()
        .map(|&p| (format!("p{p}"), percentile(&lat, p)))
        .collect();
    let n = seqs.len() as f64;
    let mode = |passes: Vec<f64>, cpu: Vec<f64>, latency| {
        let m = median(&mut passes.clone());
        ModeReport {
            seqs_per_s: n / m,
            tokens_per_s: tokens as f64 / m,
            pass_s: passes,
            cpu_ms_per_seq: median(&mut cpu.clone()) * 1e3 / n,
            pass_cpu_s: cpu,
            latency_ms: latency,
        }
    };
    let report = EncoderReport {
        side: "tiergate",
        int8_kernel: tiergate::model::int8::kernel().name(),
        threads,
        sequences: seqs.len(),
        tokens,
        batch: a.batch,
        reps: a.reps,
        batch1: mode(b1_pass, b1_cpu, Some(pcts)),
        batched: mode(bb_pass, bb_cpu, None),
    };
    println!(
        "tiergate ({}, int8 kernel {}): {} seqs ({tokens} tokens), {threads} threads: batch 1 \
         {:.1} seq/s (p50 {:.2} ms), batch {} {:.1} seq/s",
        be.numerics(),
        tiergate::model::int8::kernel().name(),
        seqs.len(),
        report.batch1.seqs_per_s,
        report
            .batch1
            .latency_ms
            .as_ref()
            .map_or(f64::NAN, |l| l["p50"]),
        a.batch,
        report.batched.seqs_per_s,
    );
    if let Some(p) = &a.embeddings_out {
        let bytes: Vec<u8> = embeddings.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(p, bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.out {
        write_json(p, &report)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// gRPC load

/// Resolves `addr` and refuses anything that is not loopback: this tool only loads a server
/// on the same machine.
async fn loopback_addr(addr: &str) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving --addr {addr}"))?
        .collect();
    match addrs.iter().find(|a| a.ip().is_loopback()) {
        Some(a) if addrs.iter().all(|a| a.ip().is_loopback()) => Ok(*a),
        _ => bail!("--addr {addr}: only loopback addresses (127.0.0.0/8, ::1) are allowed"),
    }
}

#[derive(Default)]
struct Stats {
    lat_ms: Vec<f64>,
    errors: BTreeMap<String, u64>,
    input_tokens: u64,
    server_queue_ms: f64,
    server_inference_ms: f64,
    server_total_ms: f64,
    ok: u64,
    /// Latency of RESOURCE_EXHAUSTED replies: how fast a shed request learns it.
    reject_ms: Vec<f64>,
    /// Latency of every error reply.
    error_ms: Vec<f64>,
    /// Server-reported inference time of each answered request (its batch's run).
    batch_ms: Vec<f64>,
    high_sent: u64,
    high_ok: u64,
    /// Calls with no reply at all by their deadline plus a grace period.
    unanswered: u64,
}

impl Stats {
    fn record(&mut self, res: Option<Result<Reply, tonic::Status>>, lat: Duration, high: bool) {
        let ms = lat.as_secs_f64() * 1e3;
        self.high_sent += u64::from(high);
        match res {
            Some(Ok(r)) => {
                self.ok += 1;
                self.high_ok += u64::from(high);
                self.lat_ms.push(ms);
                self.input_tokens += u64::from(r.input_tokens);
                if let Some(t) = r.timings {
                    self.server_queue_ms += t.queue_ms;
                    self.server_inference_ms += t.inference_ms;
                    self.server_total_ms += t.total_ms;
                    self.batch_ms.push(t.inference_ms);
                }
            }
            Some(Err(s)) => {
                *self.errors.entry(format!("{:?}", s.code())).or_default() += 1;
                self.error_ms.push(ms);
                if s.code() == tonic::Code::ResourceExhausted {
                    self.reject_ms.push(ms);
                }
            }
            None => self.unanswered += 1,
        }
    }
}

/// p50, p99 and max of `v` (sorted here), in a report's map.
fn spread(v: &mut [f64]) -> BTreeMap<String, f64> {
    v.sort_by(f64::total_cmp);
    [("p50", 50.0), ("p99", 99.0), ("max", 100.0)]
        .iter()
        .map(|&(k, p)| (k.to_string(), percentile(v, p)))
        .collect()
}

struct Reply {
    input_tokens: u32,
    timings: Option<proto::Timings>,
}

struct Driver {
    client: RouterClient<Channel>,
    rpc: Rpc,
    samples: Arc<Vec<Sample>>,
    models: Arc<Vec<String>>,
    candidates: Arc<Vec<String>>,
    timeout: Duration,
    /// Requests whose hashed index falls below this share of u64 go as HIGH.
    high_share: f64,
    seed: u64,
}

impl Driver {
    fn is_high(&self, i: u64) -> bool {
        let h = Rng(i ^ self.seed.rotate_left(17)).next_u64();
        (h as f64 / u64::MAX as f64) < self.high_share
    }

    /// One call; None when no reply came by the deadline plus 5 s (a hang: tonic's own
    /// timers answer at the deadline).
    async fn call_bounded(&self, i: u64) -> Option<Result<Reply, tonic::Status>> {
        let limit = self.timeout + Duration::from_secs(5);
        tokio::time::timeout(limit, self.call(i)).await.ok()
    }

    async fn call(&self, i: u64) -> Result<Reply, tonic::Status> {
        let s = &self.samples[i as usize % self.samples.len()];
        let mut client = self.client.clone();
        let priority = if self.is_high(i) {
            proto::Priority::High
        } else {
            proto::Priority::Unspecified
        } as i32;
        match self.rpc {
            Rpc::Route => {
                let mut req = tonic::Request::new(RouteRequest {
                    request_id: format!("lg-{i}"),
                    input: Some(proto::route_request::Input::Prompt(s.prompt.clone())),
                    candidates: self.candidates.to_vec(),
                    priority,
                    ..Default::default()
                });
                req.set_timeout(self.timeout);
                let r = client.route(req).await?.into_inner();
                Ok(Reply {
                    input_tokens: r.input_tokens,
                    timings: r.timings,
                })
            }
            Rpc::Verify => {
                let model = self.models[i as usize % self.models.len().max(1)].clone();
                let mut req = tonic::Request::new(VerifyRequest {
                    request_id: format!("lg-{i}"),
                    prompt: s.prompt.clone(),
                    answer: s.answer.clone(),
                    model,
                    priority,
                    ..Default::default()
                });
                req.set_timeout(self.timeout);
                let r = client.verify(req).await?.into_inner();
                Ok(Reply {
                    input_tokens: r.input_tokens,
                    timings: r.timings,
                })
            }
        }
    }
}

#[derive(Serialize)]
struct LoadReport {
    rpc: &'static str,
    addr: String,
    mode: String,
    prompts: String,
    requests_sent: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// Open loop: arrivals not sent because --max-in-flight requests were outstanding.
    shed_client_side: u64,
    elapsed_s: f64,
    throughput_rps: f64,
    latency_ms: BTreeMap<String, f64>,
    mean_input_tokens: f64,
    server_mean_ms: BTreeMap<String, f64>,
    /// Time to a RESOURCE_EXHAUSTED reply (ms).
    reject_latency_ms: BTreeMap<String, f64>,
    /// Time to any error reply (ms).
    error_latency_ms: BTreeMap<String, f64>,
    /// The server's inference time per answered request: one batch's run (ms).
    server_batch_ms: BTreeMap<String, f64>,
    high_sent: u64,
    high_ok: u64,
    /// Calls with no reply by the deadline + 5 s.
    unanswered: u64,
}

fn run_load(a: LoadArgs) -> Result<()> {
    ensure!(a.concurrency > 0, "--concurrency must be > 0");
    ensure!(
        (0.0..=1.0).contains(&a.high_share),
        "--high-share must be in [0, 1]"
    );
    // Duration::from_secs_f64 panics on negative, NaN or huge values: bound them here.
    ensure!(
        a.duration > 0.0 && a.duration <= 86_400.0,
        "--duration must be in (0, 86400] seconds"
    );
    ensure!(
        (0.0..=3600.0).contains(&a.wait),
        "--wait must be in [0, 3600] seconds"
    );
    if let Some(r) = a.rate {
        ensure!(
            (0.01..=1e6).contains(&r),
            "--rate must be in [0.01, 1e6] req/s"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(load(a))
}

async fn load(a: LoadArgs) -> Result<()> {
    let addr = loopback_addr(&a.addr).await?;
    let mut rng = Rng(a.seed);
    let (mut samples, prompts) = match a.synthetic_tokens {
        Some(n) => {
            ensure!(n >= 3, "--synthetic-tokens must be >= 3");
            let v: Vec<Sample> = (0..256)
                .map(|_| Sample {
                    prompt: synthetic_prompt(&mut rng, n),
                    answer: synthetic_prompt(&mut rng, n),
                })
                .collect();
            (v, format!("synthetic ~{n} tokens"))
        }
        None => {
            let mut v = dev_samples(&a.data, a.source.as_deref())?;
            if a.rpc == Rpc::Verify {
                v.retain(|s| !s.answer.is_empty());
            }
            ensure!(!v.is_empty(), "no usable prompts in {}", a.data.display());
            let of = a
                .source
                .as_deref()
                .map_or(String::new(), |s| format!(", source {s}"));
            (v, format!("dev prompts ({}{of})", a.data.display()))
        }
    };
    // Seeded shuffle (Fisher-Yates): the request order is the same from run to run.
    for i in (1..samples.len()).rev() {
        samples.swap(i, rng.below(i + 1));
    }

    // The server may still be starting: retry the connection for --wait seconds.
    let endpoint =
        Channel::from_shared(format!("http://{addr}"))?.connect_timeout(Duration::from_secs(5));
    let wait_until = Instant::now() + Duration::from_secs_f64(a.wait);
    let channel = loop {
        match endpoint.connect().await {
            Ok(c) => break c,
            Err(_) if Instant::now() < wait_until => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
        }
    };
    let mut client = RouterClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let info = client
        .info(proto::InfoRequest {})
        .await
        .context("Info RPC")?
        .into_inner();
    let models: Vec<String> = info.catalog.iter().map(|c| c.model.clone()).collect();
    ensure!(
        a.rpc != Rpc::Verify || !models.is_empty(),
        "server has an empty catalog; Verify needs a model name"
    );
    let driver = Arc::new(Driver {
        client,
        rpc: a.rpc,
        samples: Arc::new(samples),
        models: Arc::new(models),
        candidates: Arc::new(a.candidates.clone()),
        timeout: Duration::from_millis(a.timeout_ms),
        high_share: a.high_share,
        seed: a.seed,
    });

    // Until its own warm-up is done the server answers UNAVAILABLE; wait for it.
    loop {
        match driver.call(u64::MAX / 2).await {
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < wait_until => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            _ => break,
        }
    }
    // Warm-up, unmeasured; indices past the measured range so the measured mix is unchanged.
    for i in 0..a.warmup {
        let _ = driver.call(u64::MAX / 2 + i).await;
    }

    let stats = Arc::new(Mutex::new(Stats::default()));
    let issued = Arc::new(AtomicU64::new(0));
    let mut shed = 0u64;
    let stop_at = Instant::now() + Duration::from_secs_f64(a.duration);
    let t0 = Instant::now();
    let mode = match a.rate {
        None => {
            let mut tasks = Vec::new();
            for _ in 0..a.concurrency {
                let (d, st, issued) = (driver.clone(), stats.clone(), issued.clone());
                let n = a.requests;
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = issued.fetch_add(1, Ordering::Relaxed);
                        if i >= n || Instant::now() >= stop_at {
                            break;
                        }
                        let t = Instant::now();
                        let res = d.call_bounded(i).await;
                        let lat = t.elapsed();
                        if let Ok(mut s) = st.lock() {
                            s.record(res, lat, d.is_high(i));
                        }
                    }
                }));
            }
            for t in tasks {
                t.await?;
            }
            format!("closed loop, concurrency {}", a.concurrency)
        }
        Some(rate) => {
            let period = Duration::from_secs_f64(1.0 / rate);
            let mut tick = tokio::time::interval(period);
            // Late ticks are not bunched up: the arrival rate stays the asked one.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let in_flight = Arc::new(AtomicU64::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            loop {
                tick.tick().await;
                let i = issued.load(Ordering::Relaxed);
                if i >= a.requests || Instant::now() >= stop_at {
                    break;
                }
                if in_flight.load(Ordering::Relaxed) >= a.max_in_flight as u64 {
                    shed += 1;
                    continue;
                }
                issued.fetch_add(1, Ordering::Relaxed);
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (d, st, fl) = (driver.clone(), stats.clone(), in_flight.clone());
                tasks.spawn(async move {
                    let t = Instant::now();
                    let res = d.call_bounded(i).await;
                    let lat = t.elapsed();
                    fl.fetch_sub(1, Ordering::Relaxed);
                    if let Ok(mut s) = st.lock() {
                        s.record(res, lat, d.is_high(i));
                    }
                });
                // Reap finished tasks so the set does not grow with the run.
                while tasks.try_join_next().is_some() {}
            }
            // Every call carries a deadline, so this drain is bounded.
            while tasks.join_next().await.is_some() {}
            format!("open loop, {rate} req/s")
        }
    };
    let elapsed = t0.elapsed().as_secs_f64();

    let mut s = match Arc::try_unwrap(stats) {
        Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
        Err(_) => bail!("request tasks still hold the statistics"),
    };
    s.lat_ms.sort_by(f64::total_cmp);
    let latency_ms: BTreeMap<String, f64> = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0)]
        .iter()
        .map(|&(k, p)| (k.to_string(), percentile(&s.lat_ms, p)))
        .chain([(
            "mean".to_string(),
            s.lat_ms.iter().sum::<f64>() / s.lat_ms.len().max(1) as f64,
        )])
        .collect();
    let okf = s.ok.max(1) as f64;
    let errors_total: u64 = s.errors.values().sum();
    let report = LoadReport {
        rpc: a.rpc.name(),
        addr: addr.to_string(),
        mode,
        prompts,
        requests_sent: s.ok + errors_total + s.unanswered,
        ok: s.ok,
        errors: s.errors,
        shed_client_side: shed,
        elapsed_s: elapsed,
        throughput_rps: s.ok as f64 / elapsed,
        latency_ms,
        mean_input_tokens: s.input_tokens as f64 / okf,
        server_mean_ms: [
            ("queue", s.server_queue_ms / okf),
            ("inference", s.server_inference_ms / okf),
            ("total", s.server_total_ms / okf),
        ]
        .iter()
        .map(|&(k, v)| (k.to_string(), v))
        .collect(),
        reject_latency_ms: spread(&mut s.reject_ms),
        error_latency_ms: spread(&mut s.error_ms),
        server_batch_ms: spread(&mut s.batch_ms),
        high_sent: s.high_sent,
        high_ok: s.high_ok,
        unanswered: s.unanswered,
    };
    println!(
        "{} {}: {} ok, {} errors {:?}, {:.1} req/s, latency ms p50 {:.2} p90 {:.2} p99 {:.2}, \
         mean input tokens {:.1}",
        report.rpc,
        report.mode,
        report.ok,
        errors_total,
        report.errors,
        report.throughput_rps,
        report.latency_ms["p50"],
        report.latency_ms["p90"],
        report.latency_ms["p99"],
        report.mean_input_tokens,
    );
    if let Some(p) = &a.out {
        write_json(p, &report)?;
    }
    Ok(())
}
