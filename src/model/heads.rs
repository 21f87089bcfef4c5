//! Trained heads on top of the frozen encoder, stored as one small JSON file (models/heads.json).
//! Route: one logistic head per data model, P(pass | prompt embedding).
//! Verify: one logistic head on the (prompt, answer) pair embedding, plus a per-model offset,
//! temperature-scaled so that its probabilities are calibrated.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearHead {
    pub w: Vec<f32>,
    pub b: f32,
}

impl LinearHead {
    pub fn logit(&self, x: &[f32]) -> f32 {
        self.b + dot(&self.w, x)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub in_usd_per_mtok: f64,
    pub out_usd_per_mtok: f64,
    /// Mean response length in the training data (byte-proxy tokens), for cost estimates.
    pub mean_output_tokens: u32,
    pub train_rows: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyHead {
    pub head: LinearHead,
    /// Added to the logit for answers written by this model (its base rate).
    #[serde(default)]
    pub model_offset: BTreeMap<String, f32>,
    /// Logits are divided by this before the sigmoid (temperature scaling).
    pub temperature: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heads {
    pub format: u32,
    pub revision: String,
    /// Revision of the encoder the heads were fitted on.
    pub encoder_revision: String,
    pub dim: usize,
    pub max_input_tokens: usize,
    pub max_pair_tokens: usize,
    pub route: BTreeMap<String, LinearHead>,
    pub models: BTreeMap<String, ModelInfo>,
    pub verify: VerifyHead,
    pub default_verify_threshold: f64,
    /// Held-out figures printed by `tiergate train` (informational).
    #[serde(default)]
    pub metrics: serde_json::Value,
}

impl Heads {
    pub fn load(path: &Path) -> Result<Heads> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading heads {}", path.display()))?;
        let h: Heads = serde_json::from_str(&text)
            .with_context(|| format!("parsing heads {}", path.display()))?;
        h.validate()
            .with_context(|| format!("heads {}", path.display()))?;
        Ok(h)
    }

    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT {
            bail!(
                "format {} is not supported (expected {FORMAT})",
                self.format
            );
        }
        for (name, h) in self
            .route
            .iter()
            .chain(std::iter::once((&"verify".to_string(), &self.verify.head)))
        {
            if h.w.len() != self.dim {
                bail!(
                    "head {name}: {} weights, expected dim {}",
                    h.w.len(),
                    self.dim
                );
            }
            if !h.b.is_finite() || h.w.iter().any(|v| !v.is_finite()) {
                bail!("head {name}: non-finite weights");
            }
        }
        if !(self.verify.temperature.is_finite() && self.verify.temperature > 0.0) {
            bail!("verify.temperature must be > 0");
        }
        Ok(())
    }

    /// P(pass) for each named head on one prompt embedding.
    pub fn route_p(&self, head: &str, emb: &[f32]) -> Option<f64> {
        self.route.get(head).map(|h| sigmoid(h.logit(emb) as f64))
    }

    pub fn verify_p(&self, model: &str, pair_emb: &[f32]) -> f64 {
        let v = &self.verify;
        let off = v.model_offset.get(model).copied().unwrap_or(0.0);
        sigmoid(((v.head.logit(pair_emb) + off) / v.temperature) as f64)
    }
}

pub fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
