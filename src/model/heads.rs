//! Trained heads on top of the frozen encoder, one small JSON file (models/heads.json).
//!
//! Router (IRT-style): logit P(model m passes | prompt e) = s(e) + u_m · (P e) + b_m, where
//! s(e) = w·e + c is the prompt's easiness, P (k × dim) projects the prompt onto k skills shared
//! by all models, and (u_m, b_m) are model m's abilities. A model with no training rows gets the
//! population mean, and k + 1 numbers fitted from a small labelled sample make it its own.
//!
//! Verifier: logistic on [router logit, answer-form features, the pair's text features
//! (model::answer), their interactions, the answer's length against its model's usual,
//! prompt–answer cosine, answer embedding], plus boosted trees (model::trees) over the
//! non-embedding features, then Platt-scaled on held-back rows so that 0.8 means 80%.
#![forbid(unsafe_code)]
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::answer::{self, TEXT_FEATURES};
use super::trees::Forest;
use crate::base::{dot, sigmoid};

/// 5: the pair's text adds where a numeric pick sits (4: the verifier's boosted trees and the
/// answer's relative length; 3: the pair's text).
pub const FORMAT: u32 = 5;

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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ability {
    pub u: Vec<f32>,
    pub b: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouterHead {
    pub k: usize,
    /// k × dim, row-major.
    pub proj: Vec<f32>,
    pub easiness: LinearHead,
    pub models: BTreeMap<String, Ability>,
    /// Mean ability: used for models without rows of their own.
    pub prior: Ability,
}

impl RouterHead {
    /// The prompt's part of every model's logit: (s(e), P e).
    pub fn prompt_features(&self, e: &[f32]) -> (f32, Vec<f32>) {
        let d = e.len();
        let z = (0..self.k)
            .map(|j| dot(&self.proj[j * d..(j + 1) * d], e))
            .collect();
        (self.easiness.logit(e), z)
    }

    pub fn ability(&self, model: &str) -> &Ability {
        self.models.get(model).unwrap_or(&self.prior)
    }

    pub fn logit_from(&self, pf: &(f32, Vec<f32>), a: &Ability) -> f32 {
        pf.0 + dot(&a.u, &pf.1) + a.b
    }
}

/// Answer-form features the verifier reads besides the embeddings.
pub const FORM_FEATURES: usize = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifierHead {
    /// Over `verify_features` (see [`verify_dim`]).
    pub head: LinearHead,
    /// Added to the head's logit; reads only the non-embedding features ([`tree_inputs`]).
    #[serde(default)]
    pub trees: Forest,
    /// Platt scaling: p = sigmoid(a · logit + b).
    pub platt_a: f32,
    pub platt_b: f32,
    /// Weight of the router logit (feature 0) beside the head's logit; 0 after training, set
    /// by run-time calibration so that traffic unlike the training data can lean on the
    /// (re-fitted) router where the answer features do not transfer.
    #[serde(default)]
    pub router_coef: f32,
}

impl VerifierHead {
    /// `width` finite weights, finite scalars and valid trees: what the heads file and an
    /// overlay's re-fitted verifier must both hold (a non-finite one makes every p NaN).
    pub fn validate(&self, width: usize) -> Result<()> {
        if self.head.w.len() != width
            || !self.head.w.iter().all(|x| x.is_finite())
            || !self.head.b.is_finite()
            || !self.platt_a.is_finite()
            || !self.platt_b.is_finite()
            || !self.router_coef.is_finite()
        {
            bail!("verifier: expected {width} finite weights and finite scalars");
        }
        self.trees.validate(width).context("verifier.trees")
    }

    /// The logit before Platt scaling: linear head plus trees.
    pub fn raw_logit(&self, x: &[f32]) -> f32 {
        self.head.logit(x) + self.trees.margin(x)
    }

    pub fn p(&self, x: &[f32]) -> f64 {
        let x0 = x.first().copied().unwrap_or(0.0);
        let z = self.platt_a * self.raw_logit(x) + self.router_coef * x0 + self.platt_b;
        sigmoid(z as f64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub in_usd_per_mtok: f64,
    pub out_usd_per_mtok: f64,
    /// Mean response length in the training data (byte-proxy tokens), for cost estimates.
    pub mean_output_tokens: u32,
    pub train_rows: usize,
    /// Whether every training label of the model is 0 or 1 (a pass rate); false for judge
    /// preferences. Absent in heads trained before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_fail: Option<bool>,
}

/// Route's quality floor when neither the config nor the heads give one.
pub const FALLBACK_FLOOR: f64 = 0.7;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heads {
    pub format: u32,
    pub revision: String,
    /// Revision of the encoder the heads were fitted on.
    pub encoder_revision: String,
    pub dim: usize,
    pub max_input_tokens: usize,
    /// The answer is encoded on its own, keeping its last tokens (where final answers sit).
    pub max_answer_tokens: usize,
    pub router: RouterHead,
    pub verifier: VerifierHead,
    pub models: BTreeMap<String, ModelInfo>,
    pub default_verify_threshold: f64,
    /// Route's default quality floor, learned on held-back prompts (`tiergate train`); absent
    /// in heads trained before it was learned, which then use [`FALLBACK_FLOOR`].
    #[serde(default)]
    pub default_quality_floor: Option<f64>,
    /// Verify threshold per requested quality floor, learned on held-back rows: the lowest p at
    /// which the answers shipped (p ≥ threshold) pass at least `floor` of the time.
    /// Ascending in floor; empty = use the floor itself.
    #[serde(default)]
    pub verify_thresholds: Vec<(f64, f64)>,
    /// Held-out figures printed by `tiergate train` (informational).
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// Models whose ability an overlay set, with the labelled rows behind it (not saved:
    /// overlays are files of their own).
    #[serde(skip)]
    pub calibrated: BTreeMap<String, usize>,
    /// Catalog models placed by a published accuracy: their parameter source
    /// ("prior:<benchmark>@<accuracy>"; not saved).
    #[serde(skip)]
    pub priors: BTreeMap<String, String>,
    /// Labelled prompts of the user's traffic that correct the router per prompt (set by
    /// calibration or an overlay; not saved with the heads).
    #[serde(skip)]
    pub memory: Option<super::memory::Memory>,
}

impl Heads {
    pub fn load(path: &Path) -> Result<Heads> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading heads {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("heads {}", path.display()))
    }

    /// Refuses an encoder of another width than these heads (read from `path`) were fitted
    /// on: their vectors would be read out of bounds. `model_dir` names the encoder.
    pub fn check_width(&self, path: &Path, encoder_dim: usize, model_dir: &Path) -> Result<()> {
        if encoder_dim != self.dim {
            bail!(
                "{}: heads have dim {} but the encoder in {} has {encoder_dim}",
                path.display(),
                self.dim,
                model_dir.display()
            );
        }
        Ok(())
    }

    /// Heads from the text of a heads file, validated: what [`Self::load`] reads.
    pub fn from_json(text: &str) -> Result<Heads> {
        let h: Heads =
            serde_json::from_str(text).context("parsing (retrain with `tiergate train`)")?;
        h.validate()?;
        Ok(h)
    }

    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT {
            bail!(
                "format {} is not supported (expected {FORMAT})",
                self.format
            );
        }
        let r = &self.router;
        // Zero sizes would pass the length checks below and panic later (chunks of 0).
        if self.dim == 0 || r.k == 0 {
            bail!("dim = {} and router.k = {} must both be > 0", self.dim, r.k);
        }
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        // Checked: k and dim come from the file, and a wrapped product could match proj's length.
        let proj_len = r.k.checked_mul(self.dim);
        if proj_len != Some(r.proj.len()) || !finite(&r.proj) {
            bail!(
                "router.proj: expected k × dim = {} × {} finite values",
                r.k,
                self.dim
            );
        }
        // The bias too: 1e39 in the file reads as f32 infinity, every p 1 and Verify's NaN.
        if r.easiness.w.len() != self.dim || !finite(&r.easiness.w) || !r.easiness.b.is_finite() {
            bail!(
                "router.easiness: expected {} finite weights and a finite bias",
                self.dim
            );
        }
        for (name, a) in r
            .models
            .iter()
            .chain(std::iter::once((&"<prior>".to_string(), &r.prior)))
        {
            if a.u.len() != r.k || !finite(&a.u) || !a.b.is_finite() {
                bail!("router ability {name}: expected {} finite values", r.k);
            }
        }
        self.verifier.validate(verify_dim(self.dim))?;
        check_thresholds(&self.verify_thresholds)?;
        if let Some(f) = self.default_quality_floor {
            if !(0.0..=1.0).contains(&f) {
                bail!("default_quality_floor must be in [0, 1]");
            }
        }
        if !(0.0..=1.0).contains(&self.default_verify_threshold) {
            bail!("default_verify_threshold must be in [0, 1]");
        }
        if self.max_answer_tokens < 8 || self.max_answer_tokens > 512 {
            bail!("max_answer_tokens must be in 8..=512");
        }
        Ok(())
    }

    /// The shipping threshold for a quality floor (linear between learned points; the floor
    /// itself outside them, since p_pass is calibrated).
    pub fn threshold_for(&self, floor: f64) -> f64 {
        threshold_from(&self.verify_thresholds, floor)
    }

    /// Verify's per-floor thresholds, and the default threshold they give the default floor
    /// (as `tiergate train` sets it).
    pub fn set_verify_thresholds(&mut self, t: Vec<(f64, f64)>) {
        self.verify_thresholds = t;
        let floor = self.default_quality_floor.unwrap_or(FALLBACK_FLOOR);
        self.default_verify_threshold = threshold_from(&self.verify_thresholds, floor);
    }

    /// Router logit of `model` (its own ability, or the population prior).
    pub fn route_logit(&self, model: &str, prompt_emb: &[f32]) -> f32 {
        let pf = self.router.prompt_features(prompt_emb);
        self.router.logit_from(&pf, self.router.ability(model))
    }

    /// p_pass of `model` on a prompt: the router, corrected by the memory where there is one.
    pub fn route_p(&self, model: &str, prompt_emb: &[f32]) -> f64 {
        let near = self.near(prompt_emb, &[model]);
        self.route_p_from(
            &self.router.prompt_features(prompt_emb),
            near.as_ref(),
            model,
        )
    }

    /// The prompt's cosines to the memory, once per prompt; None without a memory or when it
    /// holds no outcome of these models (heads), so that scan is skipped.
    pub fn near(&self, prompt_emb: &[f32], models: &[&str]) -> Option<super::memory::Near> {
        self.memory
            .as_ref()
            .filter(|m| models.iter().any(|h| m.outcomes.contains_key(*h)))
            .map(|m| m.near(prompt_emb))
    }

    /// `route_p` from the prompt's parts computed once for all candidates.
    pub fn route_p_from(
        &self,
        pf: &(f32, Vec<f32>),
        near: Option<&super::memory::Near>,
        model: &str,
    ) -> f64 {
        let p = sigmoid(self.router.logit_from(pf, self.router.ability(model)) as f64);
        match (&self.memory, near) {
            (Some(m), Some(n)) => m.adjust(n, model, p),
            _ => p,
        }
    }

    pub fn verify_p(&self, model: &str, prompt_emb: &[f32], answer: &AnswerInput<'_>) -> f64 {
        self.verifier.p(&self.verify_x(model, prompt_emb, answer))
    }

    /// The verifier's input for `model`'s answer (router logit and usual answer length from
    /// the heads).
    pub fn verify_x(&self, model: &str, prompt_emb: &[f32], answer: &AnswerInput<'_>) -> Vec<f32> {
        let rl = self.route_logit(model, prompt_emb);
        let usual = self.models.get(model).map(|m| m.mean_output_tokens);
        verify_features(rl, usual, prompt_emb, answer)
    }
}

/// Verifier input width: router logit, form, text, their interactions (see
/// [`verify_features`]), bare flag, relative length, the prompt–answer cosine and the answer
/// embedding.
pub fn verify_dim(dim: usize) -> usize {
    1 + 2 * FORM_FEATURES + 2 * TEXT_FEATURES + FORM_FEATURES + TEXT_FEATURES + 3 + dim
}

/// Columns of `verify_features` the trees read: router logit, form, text, bare flag,
/// relative length, cosine (the products are there for the linear head; trees make their own).
pub fn tree_inputs(dim: usize) -> Vec<usize> {
    let tail = verify_dim(dim) - dim;
    (0..1 + FORM_FEATURES + TEXT_FEATURES)
        .chain(tail - 3..tail)
        .collect()
}

/// What the verifier knows of an answer.
pub struct AnswerInput<'a> {
    pub text: &'a str,
    /// The prompt's text (multiple-choice options are read from it).
    pub prompt: &'a str,
    pub embedding: &'a [f32],
    pub truncated: bool,
}

fn contains_any(hay: &str, needles: &[&str]) -> bool {
    needles.iter().any(|n| hay.contains(n))
}

/// Form of the answer: length, emptiness, refusal, hedging, abrupt ending, explicit final
/// answer, lines, code, encoder truncation, length relative to the prompt.
pub fn form_features(text: &str, prompt_chars: usize, truncated: bool) -> [f32; FORM_FEATURES] {
    let t = text.trim();
    let lower = t.to_lowercase();
    let chars = t.chars().count();
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let ends_clean = t
        .chars()
        .last()
        .is_some_and(|c| matches!(c, '.' | '!' | '?' | '`' | ')' | '"' | '*' | ']'));
    [
        ((1 + chars) as f32).ln() / 8.0,
        flag(chars == 0),
        flag(contains_any(
            &lower,
            &[
                "i'm sorry",
                "i am sorry",
                "i cannot",
                "i can't",
                "as an ai",
                "i apologize",
                "unable to",
            ],
        )),
        flag(contains_any(
            &lower,
            &[
                "not sure",
                "i think",
                "might be",
                "possibly",
                "unclear",
                "i'm not certain",
                "guess",
            ],
        )),
        flag(ends_clean),
        flag(contains_any(
            &lower,
            &["answer is", "answer:", "final answer", "the answer"],
        )),
        ((1 + t.lines().count()) as f32).ln() / 4.0,
        flag(t.contains("```") || t.contains("def ") || t.contains("return ")),
        flag(truncated),
        (((1 + chars) as f32) / ((1 + prompt_chars) as f32)).ln() / 4.0,
    ]
}

/// The verifier's input. Besides the raw features, a few products let one linear head act
/// differently where they matter: text cues weighed by the router's confidence, form cues
/// for multiple-choice prompts, and text cues for bare one-letter answers (0-shot
/// multiple choice, where the reasoning is absent).
///
/// `usual_tokens`: the model's mean answer length in training (byte-proxy tokens); an answer
/// far shorter or longer than its model's usual is a cue (cut off, rambling). Unknown: 0.
pub fn verify_features(
    route_logit: f32,
    usual_tokens: Option<u32>,
    prompt_emb: &[f32],
    a: &AnswerInput<'_>,
) -> Vec<f32> {
    let mut x = Vec::with_capacity(verify_dim(prompt_emb.len()));
    let form = form_features(a.text, a.prompt.chars().count(), a.truncated);
    let text = answer::text_features(a.prompt, a.text);
    let mc = text[0];
    let bare = if a.text.trim().chars().count() <= 4 {
        1.0
    } else {
        0.0
    };
    x.push(route_logit);
    x.extend_from_slice(&form);
    x.extend_from_slice(&text);
    x.extend(text.iter().map(|v| v * route_logit));
    x.extend(form.iter().map(|v| v * route_logit));
    x.extend(form.iter().map(|v| v * mc));
    x.extend(text.iter().map(|v| v * bare));
    x.push(bare);
    x.push(usual_tokens.map_or(0.0, |u| {
        let tokens = a.text.len().div_ceil(4) as f32;
        (1.0 + tokens).ln() - (1.0 + u as f32).ln()
    }));
    // Both embeddings are L2-normalised: the dot is their cosine.
    x.push(dot(prompt_emb, a.embedding));
    x.extend_from_slice(a.embedding);
    x
}

/// `verify_thresholds`' shape: (floor, threshold) pairs in [0, 1], floors rising, thresholds
/// not falling.
pub fn check_thresholds(t: &[(f64, f64)]) -> Result<()> {
    let mut last = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &(f, th) in t {
        if !(0.0..=1.0).contains(&f) || !(0.0..=1.0).contains(&th) || f <= last.0 || th < last.1 {
            bail!("verify_thresholds must be ascending pairs in [0, 1]");
        }
        last = (f, th);
    }
    Ok(())
}

/// See [`Heads::threshold_for`].
pub fn threshold_from(t: &[(f64, f64)], floor: f64) -> f64 {
    match t.iter().position(|&(f, _)| f >= floor) {
        Some(0) if floor < t[0].0 => floor.min(t[0].1),
        Some(0) => t[0].1,
        Some(i) => {
            let ((f0, t0), (f1, t1)) = (t[i - 1], t[i]);
            t0 + (t1 - t0) * (floor - f0) / (f1 - f0).max(1e-12)
        }
        None => t.last().map_or(floor, |&(_, tl)| tl.max(floor)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_features_see_refusals_hedges_and_endings() {
        let f = form_features("I'm sorry, but I cannot help with that.", 40, false);
        assert_eq!(f[1], 0.0);
        assert_eq!(f[2], 1.0, "refusal");
        assert_eq!(f[4], 1.0, "ends cleanly");
        let f = form_features("I think it might be 42 but the computation of", 40, true);
        assert_eq!(f[3], 1.0, "hedge");
        assert_eq!(f[4], 0.0, "abrupt ending");
        assert_eq!(f[8], 1.0, "truncated");
        let f = form_features("   ", 40, false);
        assert_eq!(f[1], 1.0, "empty");
        let f = form_features("The answer is (B).", 40, false);
        assert_eq!(f[5], 1.0);
    }

    #[test]
    fn verify_features_have_the_declared_layout() {
        let dim = 8;
        let e = vec![0.5f32; dim];
        let prompt = "Which is largest?\nOptions: [\"1 m\", \"5 km\", \"3 cm\"]";
        let a = AnswerInput {
            text: "B",
            prompt,
            embedding: &e,
            truncated: false,
        };
        let x = verify_features(1.5, Some(3), &e, &a);
        assert_eq!(x.len(), verify_dim(dim));
        assert_eq!(x[0], 1.5, "router logit first");
        let text = 1 + FORM_FEATURES;
        assert_eq!(x[text], 1.0, "multiple choice");
        assert_eq!(x[text + 1], 1.0, "valid pick");
        assert_eq!(x[text + TEXT_FEATURES + 1], 1.5, "pick × router logit");
        let bare = verify_dim(dim) - dim - 3;
        assert_eq!(x[bare], 1.0, "a one-letter answer is bare");
        // One byte-proxy token against a usual 3: ln(2/4).
        assert!((x[bare + 1] - 0.5f32.ln()).abs() < 1e-6, "relative length");
        assert_eq!(
            verify_features(1.5, None, &e, &a)[bare + 1],
            0.0,
            "unknown model"
        );
        assert!((x[bare + 2] - 2.0).abs() < 1e-6, "cosine term is the dot");
        let t = tree_inputs(dim);
        assert_eq!(t.len(), 1 + FORM_FEATURES + TEXT_FEATURES + 3);
        assert_eq!(&t[t.len() - 3..], &[bare, bare + 1, bare + 2]);
        assert_eq!(&x[verify_dim(dim) - dim..], &e[..], "answer embedding last");
    }

    /// The committed heads read the text: with the embeddings held fixed, picking a valid
    /// option of a multiple-choice prompt scores above picking none or one out of range.
    #[test]
    fn committed_verifier_prefers_a_valid_pick() -> Result<()> {
        let h = Heads::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/heads.json"
        )))?;
        let e: Vec<f32> = (0..h.dim).map(|i| ((i % 7) as f32 - 3.0) / 40.0).collect();
        let prompt = "A wire of 2 m carries 3 A. What is the charge in 4 s?\n\
                      Options: [\"6 C\", \"12 C\", \"24 C\", \"1.5 C\"]";
        let model = h.models.keys().next().cloned().unwrap_or_default();
        let p = |text: &str| {
            let a = AnswerInput {
                text,
                prompt,
                embedding: &e,
                truncated: false,
            };
            h.verify_p(&model, &e, &a)
        };
        let valid = p("Q = I t = 3 A × 4 s = 12 C. The answer is (B).");
        let none = p("Q = I t, so the charge follows from the current and the time.");
        let out_of_range = p("Q = I t = 3 A × 4 s = 12 C. The answer is (H).");
        assert!(valid > none, "valid {valid} vs none {none}");
        assert!(
            valid > out_of_range,
            "valid {valid} vs out of range {out_of_range}"
        );
        Ok(())
    }

    /// A heads file with router.k = 0 (its vectors emptied to match) is refused on load; it
    /// used to pass and panic when priors were projected (chunks of 0).
    #[test]
    fn zero_sizes_are_refused() -> Result<()> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/heads.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        let r = &mut v["router"];
        r["k"] = 0.into();
        r["proj"] = serde_json::json!([]);
        r["prior"]["u"] = serde_json::json!([]);
        if let Some(models) = r["models"].as_object_mut() {
            for m in models.values_mut() {
                m["u"] = serde_json::json!([]);
            }
        }
        let refused = |v: &serde_json::Value| {
            let e = Heads::from_json(&v.to_string()).err();
            e.is_some_and(|e| format!("{e:#}").contains("must both be > 0"))
        };
        assert!(refused(&v), "router.k = 0");
        // dim = 0 with its vectors emptied to match: refused the same way.
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        v["dim"] = 0.into();
        v["router"]["proj"] = serde_json::json!([]);
        v["router"]["easiness"]["w"] = serde_json::json!([]);
        assert!(refused(&v), "dim = 0");
        // A bias beyond f32 reads as infinity: refused, not p 1 everywhere.
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        v["router"]["easiness"]["b"] = serde_json::json!(1e39);
        let e = Heads::from_json(&v.to_string()).err();
        assert!(
            e.is_some_and(|e| format!("{e:#}").contains("finite bias")),
            "easiness.b = 1e39"
        );
        Ok(())
    }

    #[test]
    fn thresholds_follow_the_learned_table() {
        let t = [(0.6, 0.4), (0.8, 0.7)];
        assert_eq!(threshold_from(&t, 0.6), 0.4);
        assert!((threshold_from(&t, 0.7) - 0.55).abs() < 1e-12);
        assert_eq!(threshold_from(&t, 0.9), 0.9, "beyond the table: the floor");
        assert_eq!(
            threshold_from(&t, 0.3),
            0.3,
            "below: the floor, capped by the first"
        );
        assert_eq!(threshold_from(&[], 0.75), 0.75);
    }

    #[test]
    fn unknown_models_use_the_prior() {
        let dim = 4;
        let r = RouterHead {
            k: 2,
            proj: vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
            easiness: LinearHead {
                w: vec![0.0; dim],
                b: 0.5,
            },
            models: [(
                "m".to_string(),
                Ability {
                    u: vec![2.0, 0.0],
                    b: 1.0,
                },
            )]
            .into(),
            prior: Ability {
                u: vec![0.0, 0.0],
                b: -1.0,
            },
        };
        let e = [1.0, 0.0, 0.0, 0.0];
        let pf = r.prompt_features(&e);
        assert_eq!(r.logit_from(&pf, r.ability("m")), 0.5 + 2.0 + 1.0);
        assert_eq!(r.logit_from(&pf, r.ability("new-model")), 0.5 - 1.0);
    }
}
