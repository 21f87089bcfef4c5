//! Benchmark prompts on the router's scale (`tiergate benchmarks` writes them): per
//! benchmark of the training data, a sample of prompts' router features. A catalog entry's
//! published accuracy on one of them becomes that model's ability
//! (`ability::ability_for_accuracy`).
#![forbid(unsafe_code)]
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const BENCHMARKS_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkFeatures {
    /// Per prompt: the router's easiness logit s(e).
    pub s: Vec<f32>,
    /// Per prompt: the k skill projections P·e, row-major.
    pub z: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Benchmarks {
    pub format: u32,
    /// `Heads::revision` whose router computed the features.
    pub heads_revision: String,
    pub k: usize,
    pub benchmarks: BTreeMap<String, BenchmarkFeatures>,
}

impl Benchmarks {
    /// Loads and checks the file against the heads that will read it.
    pub fn load(path: &Path, heads_revision: &str, k: usize) -> Result<Benchmarks> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading benchmarks {} (tiergate benchmarks)",
                path.display()
            )
        })?;
        let b: Benchmarks = serde_json::from_str(&text)
            .with_context(|| format!("parsing benchmarks {}", path.display()))?;
        if b.format != BENCHMARKS_FORMAT {
            bail!("benchmarks {}: format {}", path.display(), b.format);
        }
        if b.heads_revision != heads_revision || b.k != k {
            bail!(
                "benchmarks {}: computed for heads {:?} (k {}), these are {heads_revision:?} (k {k}); re-run tiergate benchmarks",
                path.display(),
                b.heads_revision,
                b.k
            );
        }
        for (name, f) in &b.benchmarks {
            if f.s.is_empty() || f.z.len() != f.s.len() * k {
                bail!(
                    "benchmarks {}: {name} has inconsistent shapes",
                    path.display()
                );
            }
        }
        Ok(b)
    }
}
