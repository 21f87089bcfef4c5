//! The catalog (prices, which head each model uses) and a request's policy with the
//! configured defaults filled in. The decisions themselves are in `service::decide`.
#![forbid(unsafe_code)]
use std::collections::HashMap;

use crate::config::{Config, PolicyConfig};
use crate::model::Heads;

/// A request the catalog or the policy rules refuse: always the client's to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// What a request asks of the decision, before defaults (every field optional).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PolicyRequest {
    pub quality_floor: Option<f64>,
    pub max_cost_usd: Option<f64>,
    pub cost_weight: Option<f64>,
    pub relative_floor: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    pub in_usd_per_mtok: f64,
    pub out_usd_per_mtok: f64,
    pub head: String,
    pub expected_output_tokens: u32,
    /// Where its parameters come from: "trained" or "like:<model>".
    pub params: String,
}

impl Model {
    pub fn expected_cost(&self, prompt_tokens: u32, output_tokens: Option<u32>) -> f64 {
        let out = output_tokens.unwrap_or(self.expected_output_tokens);
        (prompt_tokens as f64 * self.in_usd_per_mtok + out as f64 * self.out_usd_per_mtok) / 1e6
    }
}

/// Models a request may name: the configured catalog (the default candidate set) plus every
/// model the heads were trained on (priced from the data catalog).
#[derive(Debug, Clone)]
pub struct Catalog {
    pub default_set: Vec<String>,
    models: HashMap<String, Model>,
}

impl Catalog {
    pub fn build(cfg: &Config, heads: &Heads) -> anyhow::Result<Catalog> {
        let mut models = HashMap::new();
        for (name, info) in &heads.models {
            // A model known only from an overlay has no price here: the catalog names it.
            let priced = info.train_rows > 0
                || !(heads.calibrated.contains_key(name) || heads.priors.contains_key(name));
            if priced && heads.router.models.contains_key(name) {
                models.insert(
                    name.clone(),
                    Model {
                        name: name.clone(),
                        in_usd_per_mtok: info.in_usd_per_mtok,
                        out_usd_per_mtok: info.out_usd_per_mtok,
                        head: name.clone(),
                        expected_output_tokens: info.mean_output_tokens.max(1),
                        params: params_of(heads, name),
                    },
                );
            }
        }
        let mut default_set = Vec::new();
        for e in &cfg.catalog {
            let calibrated = heads.calibrated.contains_key(&e.model);
            let head = match (&e.like, heads.router.models.contains_key(&e.model)) {
                // Parameters fitted on the model's own outcomes replace borrowed ones.
                (Some(_), true) if calibrated => e.model.clone(),
                (Some(like), _) => like.clone(),
                (None, true) => e.model.clone(),
                (None, false) => anyhow::bail!(
                    "catalog[{}]: no trained head for this model; set `like` to a trained model",
                    e.model
                ),
            };
            let Some(h) = heads
                .models
                .get(&head)
                .filter(|_| heads.router.models.contains_key(&head))
            else {
                anyhow::bail!(
                    "catalog[{}].like = {head:?}: no trained head of that name",
                    e.model
                );
            };
            // A head fitted on judge preferences against a reference answer (AlpacaEval's
            // gpt4_1106_preview is the judge's own reference) is not a pass rate: borrowing it
            // rates the model on another scale entirely.
            if e.like.is_some() && !calibrated && h.pass_fail == Some(false) {
                anyhow::bail!(
                    "catalog[{}].like = {head:?}: that model's training labels are judge \
                     preferences, not pass/fail; borrow a head trained on pass/fail rows",
                    e.model
                );
            }
            let expected_output_tokens = e
                .expected_output_tokens
                .unwrap_or(if e.like.is_some() {
                    cfg.policy.default_output_tokens
                } else {
                    h.mean_output_tokens
                })
                .max(1);
            models.insert(
                e.model.clone(),
                Model {
                    name: e.model.clone(),
                    in_usd_per_mtok: e.in_usd_per_mtok,
                    out_usd_per_mtok: e.out_usd_per_mtok,
                    params: match &e.like {
                        Some(l) if !calibrated => format!("like:{l}"),
                        _ => params_of(heads, &e.model),
                    },
                    head,
                    expected_output_tokens,
                },
            );
            default_set.push(e.model.clone());
        }
        Ok(Catalog {
            default_set,
            models,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Model> {
        self.models.get(name)
    }

    pub fn default_models(&self) -> impl Iterator<Item = &Model> {
        self.default_set.iter().filter_map(|n| self.models.get(n))
    }

    /// The named candidates (or the default set), deduplicated; unknown names are an error.
    pub fn resolve(&self, names: &[String]) -> Result<Vec<&Model>, PolicyError> {
        if names.is_empty() {
            return Ok(self.default_models().collect());
        }
        let mut out: Vec<&Model> = Vec::with_capacity(names.len());
        for n in names {
            let m = self.get(n).ok_or_else(|| {
                PolicyError(format!(
                    "unknown candidate model {}: not in the catalog and no trained head (see Info)",
                    crate::base::clip(n)
                ))
            })?;
            if !out.iter().any(|o| o.name == m.name) {
                out.push(m);
            }
        }
        Ok(out)
    }
}

/// Where a model's own parameters come from: an overlay's calibration, else training.
fn params_of(heads: &Heads, model: &str) -> String {
    match (heads.calibrated.get(model), heads.priors.get(model)) {
        (Some(rows), _) => format!("calibrated:{rows}"),
        (None, Some(p)) => p.clone(),
        (None, None) => "trained".into(),
    }
}

/// A request's policy with the server defaults filled in, validated.
#[derive(Debug, Clone, Copy)]
pub struct Effective {
    pub quality_floor: f64,
    pub max_cost_usd: Option<f64>,
    pub cost_weight: f64,
    pub floor_given: bool,
    /// Relative mode: the cheapest candidate with p ≥ r · (highest p). Set by the request,
    /// or by the config when the request asks for neither a floor nor a cost weight.
    pub relative_floor: Option<f64>,
}

/// Route's default relative floor under `d`, when the default is relative: what a request
/// that asks for nothing gets ([`effective`]'s rule; the absolute floor plays no part).
pub fn default_relative_floor(d: &PolicyConfig) -> Option<f64> {
    effective(None, d, 0.0).ok().and_then(|e| e.relative_floor)
}

/// `default_floor` is the server's resolved default (config, else the heads' learned floor).
pub fn effective(
    p: Option<&PolicyRequest>,
    d: &PolicyConfig,
    default_floor: f64,
) -> Result<Effective, PolicyError> {
    let floor = p.and_then(|p| p.quality_floor);
    let max_cost = p.and_then(|p| p.max_cost_usd);
    let weight = p.and_then(|p| p.cost_weight);
    let relative = p.and_then(|p| p.relative_floor);
    if let Some(r) = relative {
        if !(r > 0.0 && r <= 1.0) {
            return Err(PolicyError(format!(
                "policy.relative_floor = {r} must be in (0, 1]"
            )));
        }
    }
    if let Some(f) = floor {
        if !(0.0..=1.0).contains(&f) {
            return Err(PolicyError(format!(
                "policy.quality_floor = {f} must be in [0, 1]"
            )));
        }
    }
    if let Some(c) = max_cost {
        if !c.is_finite() || c < 0.0 {
            return Err(PolicyError(format!(
                "policy.max_cost_usd = {c} must be finite and >= 0"
            )));
        }
    }
    if let Some(w) = weight {
        if !w.is_finite() || w < 0.0 {
            return Err(PolicyError(format!(
                "policy.cost_weight = {w} must be finite and >= 0"
            )));
        }
    }
    let cost_weight = weight.unwrap_or(d.cost_weight);
    // The configured relative default applies only when nothing else is asked: a floor or
    // a cost weight in the request, or a floor or cost weight the operator configured, each
    // take precedence.
    let relative_floor = match (floor, relative) {
        (Some(_), _) => None,
        (None, Some(r)) => Some(r),
        (None, None) if cost_weight > 0.0 || d.quality_floor.is_some() => None,
        (None, None) => d.relative_floor,
    };
    Ok(Effective {
        quality_floor: floor.unwrap_or(default_floor),
        max_cost_usd: max_cost,
        cost_weight,
        floor_given: floor.is_some(),
        relative_floor,
    })
}

/// Byte-proxy token count, the same rule as the data's cost column: ceil(bytes / 4).
pub fn proxy_tokens(text_bytes: usize) -> u32 {
    text_bytes.div_ceil(4).min(u32::MAX as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_validation() {
        let d = crate::config::Config::embedded().unwrap().policy;
        let bad = |p: PolicyRequest| effective(Some(&p), &d, 0.6).is_err();
        assert!(bad(PolicyRequest {
            quality_floor: Some(f64::NAN),
            ..Default::default()
        }));
        assert!(bad(PolicyRequest {
            quality_floor: Some(-0.1),
            ..Default::default()
        }));
        assert!(bad(PolicyRequest {
            max_cost_usd: Some(-1.0),
            ..Default::default()
        }));
        assert!(bad(PolicyRequest {
            cost_weight: Some(f64::INFINITY),
            ..Default::default()
        }));
        let e = effective(None, &d, 0.6).unwrap();
        assert_eq!(e.quality_floor, 0.6);
        assert!(!e.floor_given);
    }
}
