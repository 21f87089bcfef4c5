//! `tiergate benchmarks`: a seeded sample of each training benchmark's prompts, embedded and
//! put on the trained router's scale, written for catalog priors (`prior = { benchmark,
//! accuracy }`). Benchmarks: MMLU-Pro, and RouterBench's ARC-Challenge, Winogrande and MBPP
//! tasks (AlpacaEval's preferences are not accuracies).
#![forbid(unsafe_code)]
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::data::{read_rows, Row};
use super::embed::{Embedder, Kind};
use super::score::{encoder_for, EncoderArgs};
use super::util::hash_str;
use crate::model::benchmarks::{BenchmarkFeatures, Benchmarks, BENCHMARKS_FORMAT};
use crate::model::Heads;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchmarksArgs {
    /// Training rows whose prompts stand for each benchmark.
    #[arg(long, default_value = "../shared/data/train.jsonl.gz")]
    pub train: PathBuf,
    #[arg(long, default_value = "models/heads.json")]
    pub heads: PathBuf,
    #[arg(long, default_value = "models/benchmarks.json")]
    pub out: PathBuf,
    /// Prompts per benchmark (seeded choice).
    #[arg(long, default_value_t = 150)]
    pub prompts: usize,
    #[arg(long, default_value_t = 20261124)]
    pub seed: u64,
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

/// The benchmark a training row stands for, if it is one a published accuracy refers to.
pub fn benchmark_of(r: &Row) -> Option<&'static str> {
    match (r.source.as_str(), r.task.as_deref().unwrap_or("")) {
        ("mmlu_pro", _) => Some("mmlu_pro"),
        ("routerbench_0shot", "arc-challenge") => Some("arc_challenge"),
        ("routerbench_0shot", "winogrande") => Some("winogrande"),
        ("routerbench_0shot", "mbpp") => Some("mbpp"),
        _ => None,
    }
}

pub fn run(a: BenchmarksArgs) -> Result<()> {
    let heads = Heads::load(&a.heads)?;
    let rows = read_rows(&a.train)?;
    let mut prompts: BTreeMap<&str, BTreeMap<String, &str>> = BTreeMap::new();
    for r in &rows {
        if let Some(b) = benchmark_of(r) {
            prompts
                .entry(b)
                .or_default()
                .entry(r.prompt_id.clone())
                .or_insert(r.prompt.as_str());
        }
    }
    let enc = encoder_for(&a.encoder, &heads, &a.heads)?;
    let emb = Embedder {
        enc: &enc,
        cache_dir: None,
    };
    let mut out = BTreeMap::new();
    for (name, by_id) in prompts {
        let mut ids: Vec<&String> = by_id.keys().collect();
        ids.sort_by_key(|id| hash_str(a.seed, id));
        ids.truncate(a.prompts);
        let texts: Vec<&str> = ids.iter().map(|id| by_id[*id]).collect();
        // Embedded as Route embeds a prompt (head + tail truncation).
        let e = emb.embed(name, &texts, Kind::Prompt)?;
        let d = heads.dim;
        let (mut s, mut z) = (Vec::new(), Vec::new());
        for v in e.emb.chunks_exact(d) {
            let (si, zi) = heads.router.prompt_features(v);
            s.push(si);
            z.extend(zi);
        }
        eprintln!("{name}: {} prompts", s.len());
        out.insert(name.to_string(), BenchmarkFeatures { s, z });
    }
    let b = Benchmarks {
        format: BENCHMARKS_FORMAT,
        heads_revision: heads.revision.clone(),
        k: heads.router.k,
        benchmarks: out,
    };
    let text = serde_json::to_string(&b)?;
    std::fs::write(&a.out, text).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
