//! Catalog (prices, which head each model uses) and the route / cascade decisions.
use std::collections::HashMap;

use crate::config::{Config, PolicyConfig};
use crate::error::TgError;
use crate::model::heads::Heads;

#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    pub in_usd_per_mtok: f64,
    pub out_usd_per_mtok: f64,
    pub head: String,
    pub expected_output_tokens: u32,
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
            if heads.router.models.contains_key(name) {
                models.insert(
                    name.clone(),
                    Model {
                        name: name.clone(),
                        in_usd_per_mtok: info.in_usd_per_mtok,
                        out_usd_per_mtok: info.out_usd_per_mtok,
                        head: name.clone(),
                        expected_output_tokens: info.mean_output_tokens.max(1),
                    },
                );
            }
        }
        let mut default_set = Vec::new();
        for e in &cfg.catalog {
            let head = match (&e.like, heads.router.models.contains_key(&e.model)) {
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
    pub fn resolve(&self, names: &[String]) -> Result<Vec<&Model>, TgError> {
        if names.is_empty() {
            return Ok(self.default_models().collect());
        }
        let mut out: Vec<&Model> = Vec::with_capacity(names.len());
        for n in names {
            let m = self.get(n).ok_or_else(|| {
                TgError::InvalidArgument(format!(
                    "unknown candidate model {n:?}: not in the catalog and no trained head (see Info)"
                ))
            })?;
            if !out.iter().any(|o| o.name == m.name) {
                out.push(m);
            }
        }
        Ok(out)
    }
}

/// A request's policy with the server defaults filled in, validated.
#[derive(Debug, Clone, Copy)]
pub struct Effective {
    pub quality_floor: f64,
    pub max_cost_usd: Option<f64>,
    pub cost_weight: f64,
    pub floor_given: bool,
}

/// `default_floor` is the server's resolved default (config, else the heads' learned floor).
pub fn effective(
    p: Option<&crate::proto::Policy>,
    d: &PolicyConfig,
    default_floor: f64,
) -> Result<Effective, TgError> {
    let floor = p.and_then(|p| p.quality_floor);
    let max_cost = p.and_then(|p| p.max_cost_usd);
    let weight = p.and_then(|p| p.cost_weight);
    if let Some(f) = floor {
        if !(0.0..=1.0).contains(&f) {
            return Err(TgError::InvalidArgument(format!(
                "policy.quality_floor = {f} must be in [0, 1]"
            )));
        }
    }
    if let Some(c) = max_cost {
        if !c.is_finite() || c < 0.0 {
            return Err(TgError::InvalidArgument(format!(
                "policy.max_cost_usd = {c} must be finite and >= 0"
            )));
        }
    }
    if let Some(w) = weight {
        if !w.is_finite() || w < 0.0 {
            return Err(TgError::InvalidArgument(format!(
                "policy.cost_weight = {w} must be finite and >= 0"
            )));
        }
    }
    Ok(Effective {
        quality_floor: floor.unwrap_or(default_floor),
        max_cost_usd: max_cost,
        cost_weight: weight.unwrap_or(d.cost_weight),
        floor_given: floor.is_some(),
    })
}

#[derive(Debug, Clone)]
pub struct Scored {
    pub model: String,
    pub p_pass: f64,
    pub cost: f64,
}

#[derive(Debug, Clone)]
pub struct RouteDecision {
    /// Candidates in price order, cheapest first.
    pub candidates: Vec<Scored>,
    pub chosen: usize,
    pub expected_saving: f64,
    pub margin: f64,
    pub verify_recommended: bool,
    pub reason: &'static str,
}

/// Cheapest candidate with p_pass >= floor, else the one most likely to pass; or, with a cost
/// weight, the best p_pass - weight * cost. `max_cost_usd` filters candidates first.
pub fn decide_route(
    mut scored: Vec<Scored>,
    pol: &Effective,
    verify_band: f64,
) -> Result<RouteDecision, TgError> {
    scored.sort_by(|a, b| {
        a.cost
            .total_cmp(&b.cost)
            .then_with(|| a.model.cmp(&b.model))
    });
    let max_all = scored.iter().map(|s| s.cost).fold(0.0, f64::max);
    let affordable: Vec<usize> = (0..scored.len())
        .filter(|&i| pol.max_cost_usd.is_none_or(|m| scored[i].cost <= m))
        .collect();
    let Some(&first) = affordable.first() else {
        return Err(TgError::InvalidArgument(format!(
            "no candidate fits policy.max_cost_usd = {:?}: the cheapest costs {:.3e} USD",
            pol.max_cost_usd.unwrap_or(0.0),
            scored.first().map_or(0.0, |s| s.cost)
        )));
    };
    let best_p = |set: &[usize]| {
        set.iter().copied().fold(first, |b, i| {
            if scored[i].p_pass > scored[b].p_pass {
                i
            } else {
                b
            }
        })
    };
    let (chosen, margin, reason) = if pol.cost_weight > 0.0 && !pol.floor_given {
        let u = |i: usize| scored[i].p_pass - pol.cost_weight * scored[i].cost;
        let c = affordable
            .iter()
            .copied()
            .fold(first, |b, i| if u(i) > u(b) { i } else { b });
        let runner = affordable
            .iter()
            .copied()
            .filter(|&i| i != c)
            .map(u)
            .fold(f64::NEG_INFINITY, f64::max);
        let m = if runner.is_finite() {
            u(c) - runner
        } else {
            0.0
        };
        (c, m, "utility")
    } else {
        match affordable
            .iter()
            .copied()
            .find(|&i| scored[i].p_pass >= pol.quality_floor)
        {
            Some(i) => (i, scored[i].p_pass - pol.quality_floor, "floor_met"),
            None => {
                let i = best_p(&affordable);
                (i, scored[i].p_pass - pol.quality_floor, "best_effort")
            }
        }
    };
    let has_higher_tier = affordable
        .iter()
        .any(|&i| scored[i].cost > scored[chosen].cost);
    let verify_recommended = reason != "utility" && margin.abs() < verify_band && has_higher_tier;
    Ok(RouteDecision {
        expected_saving: max_all - scored[chosen].cost,
        candidates: scored,
        chosen,
        margin,
        verify_recommended,
        reason,
    })
}

/// The next model up in price order from `model` among `candidates`, if any.
pub fn escalation_target<'a>(
    model: &Model,
    candidates: &[&'a Model],
    prompt_tokens: u32,
) -> Option<&'a Model> {
    let own = model.expected_cost(prompt_tokens, None);
    candidates
        .iter()
        .copied()
        .filter(|c| c.name != model.name && c.expected_cost(prompt_tokens, None) > own)
        .min_by(|a, b| {
            a.expected_cost(prompt_tokens, None)
                .total_cmp(&b.expected_cost(prompt_tokens, None))
                .then_with(|| a.name.cmp(&b.name))
        })
}

/// Byte-proxy token count, the same rule as the data's cost column: ceil(bytes / 4).
pub fn proxy_tokens(text_bytes: usize) -> u32 {
    text_bytes.div_ceil(4).min(u32::MAX as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(m: &str, p: f64, c: f64) -> Scored {
        Scored {
            model: m.into(),
            p_pass: p,
            cost: c,
        }
    }
    fn pol(floor: f64) -> Effective {
        Effective {
            quality_floor: floor,
            max_cost_usd: None,
            cost_weight: 0.0,
            floor_given: true,
        }
    }

    #[test]
    fn cheapest_meeting_the_floor() {
        let d = decide_route(
            vec![
                s("big", 0.95, 10.0),
                s("small", 0.6, 1.0),
                s("mid", 0.8, 3.0),
            ],
            &pol(0.75),
            0.1,
        )
        .unwrap();
        assert_eq!(d.candidates[d.chosen].model, "mid");
        assert_eq!(d.reason, "floor_met");
        assert!((d.margin - 0.05).abs() < 1e-12);
        assert!(
            d.verify_recommended,
            "margin 0.05 < band and a bigger model exists"
        );
        assert!((d.expected_saving - 7.0).abs() < 1e-12);
        assert_eq!(d.candidates[0].model, "small", "price order");
    }

    #[test]
    fn best_effort_when_nobody_meets_the_floor() {
        let d = decide_route(
            vec![s("a", 0.5, 1.0), s("b", 0.7, 2.0), s("c", 0.6, 3.0)],
            &pol(0.9),
            0.1,
        )
        .unwrap();
        assert_eq!(d.candidates[d.chosen].model, "b");
        assert_eq!(d.reason, "best_effort");
        assert!(d.margin < 0.0);
    }

    #[test]
    fn max_cost_filters_and_errors_when_nothing_fits() {
        let mut p = pol(0.5);
        p.max_cost_usd = Some(2.0);
        let d = decide_route(vec![s("a", 0.4, 1.0), s("b", 0.9, 3.0)], &p, 0.1).unwrap();
        assert_eq!(d.candidates[d.chosen].model, "a");
        p.max_cost_usd = Some(0.5);
        assert!(matches!(
            decide_route(vec![s("a", 0.4, 1.0)], &p, 0.1),
            Err(TgError::InvalidArgument(_))
        ));
    }

    #[test]
    fn utility_mode_trades_cost_for_quality() {
        let mut p = pol(0.5);
        p.floor_given = false;
        p.cost_weight = 0.1;
        // a: 0.8 - 0.1 = 0.7; b: 0.9 - 0.5 = 0.4
        let d = decide_route(vec![s("a", 0.8, 1.0), s("b", 0.9, 5.0)], &p, 0.1).unwrap();
        assert_eq!(d.candidates[d.chosen].model, "a");
        assert_eq!(d.reason, "utility");
        p.cost_weight = 0.01; // a: 0.79, b: 0.85
        let d = decide_route(vec![s("a", 0.8, 1.0), s("b", 0.9, 5.0)], &p, 0.1).unwrap();
        assert_eq!(d.candidates[d.chosen].model, "b");
    }

    #[test]
    fn policy_validation() {
        let d = crate::config::Config::embedded().unwrap().policy;
        let bad = |p: crate::proto::Policy| effective(Some(&p), &d, 0.6).is_err();
        assert!(bad(crate::proto::Policy {
            quality_floor: Some(f64::NAN),
            ..Default::default()
        }));
        assert!(bad(crate::proto::Policy {
            quality_floor: Some(-0.1),
            ..Default::default()
        }));
        assert!(bad(crate::proto::Policy {
            max_cost_usd: Some(-1.0),
            ..Default::default()
        }));
        assert!(bad(crate::proto::Policy {
            cost_weight: Some(f64::INFINITY),
            ..Default::default()
        }));
        let e = effective(None, &d, 0.6).unwrap();
        assert_eq!(e.quality_floor, 0.6);
        assert!(!e.floor_given);
    }
}
