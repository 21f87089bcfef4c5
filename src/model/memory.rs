//! Memory of labelled traffic: the prompts a user labelled (calibration rows, later feedback)
//! kept as unit embeddings with each model's outcome, so that Route can ask how a model did
//! on the prompts nearest to a new one. The router's abilities learn k + 1 numbers per model
//! from those rows; the memory keeps the rows themselves, which is what a nearest-neighbour
//! router over the same rows does better (issue 13). The two are blended as pseudo-counts: the
//! router's p counts as `alpha` outcomes, each neighbour as its similarity weight, so few or
//! distant neighbours leave the router's p nearly as it was.
#![forbid(unsafe_code)]
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::base::dot;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    pub dim: usize,
    /// Unit prompt embeddings, one row of `dim` per labelled prompt.
    pub prompts: Vec<f32>,
    /// Per model (its head's name): (prompt index, score in [0, 1]) of each labelled outcome.
    pub outcomes: BTreeMap<String, Vec<(u32, f32)>>,
    /// Neighbours read per model.
    pub k: usize,
    /// Weight of the router's own p, in outcomes.
    pub alpha: f32,
    /// Similarity temperature: a neighbour weighs exp((cos − 1) / tau); 0 weighs all alike.
    pub tau: f32,
}

/// A prompt's cosine to every remembered prompt (computed once per Route, read per model).
pub struct Near(Vec<f32>);

impl Memory {
    pub fn len(&self) -> usize {
        self.prompts.len() / self.dim.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn validate(&self, dim: usize) -> Result<()> {
        if self.dim != dim {
            bail!("memory: dim {} but the heads have {dim}", self.dim);
        }
        if !self.prompts.len().is_multiple_of(dim.max(1))
            || self.prompts.iter().any(|x| !x.is_finite())
        {
            bail!("memory: prompts are not whole finite rows of {dim}");
        }
        // Unit rows keep every cosine in [-1, 1]: a longer row made a neighbour's weight
        // exp((cos - 1) / tau) infinite and Route's p NaN (found by tests/fuzz_inputs.rs).
        if let Some(i) = self.prompts.chunks_exact(dim.max(1)).position(|r| {
            let n = r
                .iter()
                .map(|x| f64::from(*x) * f64::from(*x))
                .sum::<f64>()
                .sqrt();
            (n - 1.0).abs() > 1e-3
        }) {
            bail!("memory: prompt {i} is not a unit vector");
        }
        if self.k == 0 || !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!(
                "memory: k {} alpha {} (need k ≥ 1, alpha > 0)",
                self.k,
                self.alpha
            );
        }
        if !(self.tau.is_finite() && self.tau >= 0.0) {
            bail!("memory: tau {} (need ≥ 0)", self.tau);
        }
        let n = self.len();
        for (m, list) in &self.outcomes {
            if let Some((i, s)) = list
                .iter()
                .find(|(i, s)| *i as usize >= n || !(0.0..=1.0).contains(s))
            {
                bail!("memory[{m}]: outcome ({i}, {s}) outside {n} prompts or [0, 1]");
            }
        }
        Ok(())
    }

    pub fn near(&self, e: &[f32]) -> Near {
        let norm = dot(e, e).sqrt().max(1e-12);
        Near(
            self.prompts
                .chunks_exact(self.dim.max(1))
                .map(|p| dot(p, e) / norm)
                .collect(),
        )
    }

    /// The router's `p` for `model` on the prompt `near` describes, corrected by the model's
    /// outcomes on its nearest remembered prompts. Models without outcomes keep `p`.
    pub fn adjust(&self, near: &Near, model: &str, p: f64) -> f64 {
        match self.outcomes.get(model) {
            Some(list) => {
                let top = nearest(&near.0, list, self.k, None);
                blend(&top, p, self.alpha, self.tau)
            }
            None => p,
        }
    }
}

/// The k outcomes (similarity, score) nearest by `sims`, skipping prompt `skip`.
fn nearest(sims: &[f32], list: &[(u32, f32)], k: usize, skip: Option<u32>) -> Vec<(f32, f32)> {
    let mut v: Vec<(f32, f32)> = list
        .iter()
        .filter(|(i, _)| Some(*i) != skip)
        .filter_map(|&(i, s)| sims.get(i as usize).map(|&c| (c, s)))
        .collect();
    let k = k.min(v.len());
    if k < v.len() {
        v.select_nth_unstable_by(k, |a, b| b.0.total_cmp(&a.0));
        v.truncate(k);
    }
    v
}

fn blend(top: &[(f32, f32)], p: f64, alpha: f32, tau: f32) -> f64 {
    let (mut num, mut den) = (alpha as f64 * p, alpha as f64);
    for &(c, s) in top {
        // Rows are unit only to 1e-3 (validate), so a cosine may pass 1 by a hair; with a
        // tiny tau that hair made the weight infinite and p NaN. Cut at 1: weights ≤ 1.
        let c = c.min(1.0);
        let w = if tau > 0.0 {
            (((c - 1.0) / tau) as f64).exp()
        } else {
            1.0
        };
        num += w * s as f64;
        den += w;
    }
    (num / den).clamp(1e-6, 1.0 - 1e-6)
}

/// A setting's summed loss over all outcomes, and per group slot.
type SettingLoss = (f64, Vec<f64>);

/// Relative log-loss gain the memory must bring to be kept.
const MIN_GAIN: f64 = 0.005;

/// What fitting chose, for reports.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryFit {
    pub k: usize,
    pub alpha: f32,
    pub tau: f32,
    /// Leave-one-prompt-out log-loss of the router alone and with the memory.
    pub loss_router: f64,
    pub loss_memory: f64,
    /// With groups: the memory's loss where each group's outcomes are read with the setting
    /// chosen without that group, the figure the keep-or-drop bar compares (the best of 120
    /// settings on the same rows flatters the memory).
    pub loss_memory_nested: Option<f64>,
}

/// Builds a memory from labelled outcomes `(prompt index, model, score, router p)` over unit
/// (or any) prompt embeddings, choosing k, alpha and tau by leave-one-prompt-out log-loss:
/// each outcome is predicted from the other prompts only, as a new prompt would be. None when
/// no choice beats the router alone on that loss by [`MIN_GAIN`]; with `groups` (a group per
/// prompt, e.g. calibration folds) that loss is the nested one, each group read with the
/// setting chosen on the others.
pub fn fit(
    dim: usize,
    prompt_emb: &[f32],
    outcomes: &[(usize, String, f32, f64)],
    groups: Option<&[usize]>,
) -> Option<(Memory, MemoryFit)> {
    const KS: [usize; 5] = [5, 10, 20, 40, 80];
    const ALPHAS: [f32; 6] = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0];
    const TAUS: [f32; 4] = [0.0, 0.2, 0.1, 0.05];
    let n = prompt_emb.len() / dim.max(1);
    if n < 2 || outcomes.is_empty() {
        return None;
    }
    let prompts: Vec<f32> = prompt_emb
        .chunks_exact(dim)
        .flat_map(|p| {
            let norm = dot(p, p).sqrt().max(1e-12);
            p.iter().map(move |x| x / norm)
        })
        .collect();
    let mut by_model: BTreeMap<String, Vec<(u32, f32)>> = BTreeMap::new();
    for (i, m, s, _) in outcomes {
        by_model
            .entry(m.clone())
            .or_default()
            .push((*i as u32, s.clamp(0.0, 1.0)));
    }
    let mem = Memory {
        dim,
        prompts,
        outcomes: by_model,
        k: KS[0],
        alpha: 1.0,
        tau: 0.0,
    };
    // Each outcome's nearest other outcomes of its model (up to the largest k), sorted by
    // similarity, so every (k, alpha, tau) reads a prefix.
    use rayon::prelude::*;
    let kmax = KS[KS.len() - 1];
    let tops: Vec<Vec<(f32, f32)>> = outcomes
        .par_iter()
        .map(|(i, m, _, _)| {
            let e = &mem.prompts[i * dim..(i + 1) * dim];
            let sims = mem.near(e).0;
            let list = mem.outcomes.get(m).map_or(&[][..], |l| l.as_slice());
            let mut top = nearest(&sims, list, kmax, Some(*i as u32));
            top.sort_by(|a, b| b.0.total_cmp(&a.0));
            top
        })
        .collect();
    let loss = |f: &dyn Fn(usize) -> f64| -> f64 {
        outcomes
            .iter()
            .enumerate()
            .map(|(j, (_, _, s, _))| bce(f(j), *s as f64))
            .sum::<f64>()
            / outcomes.len() as f64
    };
    let loss_router = loss(&|j| outcomes[j].3);
    // The grid, in the order that breaks ties (k, then alpha, then tau).
    let settings: Vec<(usize, f32, f32)> = KS
        .iter()
        .flat_map(|&k| {
            ALPHAS
                .iter()
                .flat_map(move |&a| TAUS.iter().map(move |&t| (k, a, t)))
        })
        .collect();
    // Each outcome's slot: its prompt's group among those present, the last slot for none.
    let group_of = |j: usize| groups.and_then(|g| g.get(outcomes[j].0).copied());
    let ids: Vec<usize> = {
        let set: std::collections::BTreeSet<usize> =
            (0..outcomes.len()).filter_map(group_of).collect();
        set.into_iter().collect()
    };
    let slot: Vec<usize> = (0..outcomes.len())
        .map(|j| group_of(j).map_or(ids.len(), |g| ids.partition_point(|&x| x < g)))
        .collect();
    // Per setting: its summed loss over all outcomes (in order, so that without groups the
    // figures are what they always were) and per slot, so that a setting can be chosen without
    // a group and read on it; 120 × (groups + 1) numbers, however many outcomes.
    let sums: Vec<SettingLoss> = settings
        .par_iter()
        .map(|&(k, alpha, tau)| {
            let mut by_slot = vec![0.0f64; ids.len() + 1];
            let mut total = 0.0f64;
            for (j, (_, _, s, p)) in outcomes.iter().enumerate() {
                let top = &tops[j][..k.min(tops[j].len())];
                let l = bce(blend(top, *p, alpha, tau), *s as f64);
                total += l;
                by_slot[slot[j]] += l;
            }
            (total, by_slot)
        })
        .collect();
    let count = outcomes.len() as f64;
    // The first setting with the least of `score` (the grid's order breaks ties).
    let choose = |score: &dyn Fn(&SettingLoss) -> f64| -> Option<usize> {
        sums.iter()
            .map(score)
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(g, _)| g)
    };
    let best = choose(&|s| s.0)?;
    let loss_memory = sums[best].0 / count;
    let (k, alpha, tau) = settings[best];
    // Each group read with the setting chosen on the other groups (outcomes without a group
    // count in every choice and are read with the overall one).
    let loss_memory_nested = (ids.len() >= 2).then(|| {
        let mut total = sums[best].1[ids.len()];
        for g in 0..ids.len() {
            let pick = choose(&|s| s.0 - s.1[g]).unwrap_or(best);
            total += sums[pick].1[g];
        }
        total / count
    });
    // A gain at the noise level is not worth a scan per Route (on left-out MMLU-Pro, 103
    // calibration prompts of unrelated topics gained 1e-5).
    if loss_memory_nested.unwrap_or(loss_memory) >= loss_router * (1.0 - MIN_GAIN) {
        return None;
    }
    let fit = MemoryFit {
        k,
        alpha,
        tau,
        loss_router,
        loss_memory,
        loss_memory_nested,
    };
    Some((
        Memory {
            k,
            alpha,
            tau,
            ..mem
        },
        fit,
    ))
}

fn bce(p: f64, y: f64) -> f64 {
    let p = p.clamp(1e-6, 1.0 - 1e-6);
    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two clusters of prompts; model "a" passes on the first and fails on the second, and the
    /// router (p = 0.5 everywhere) cannot tell them apart. The memory must learn it from the
    /// other prompts of each cluster, and leave a model it never saw alone.
    #[test]
    fn memory_corrects_the_router_per_prompt() {
        let dim = 4;
        let mut emb = Vec::new();
        let mut out = Vec::new();
        for i in 0..40 {
            let c = i % 2;
            let jitter = (i as f32) * 0.01;
            let v = if c == 0 {
                [1.0, jitter, 0.0, 0.0]
            } else {
                [0.0, 0.0, 1.0, jitter]
            };
            emb.extend_from_slice(&v);
            out.push((i, "a".to_string(), if c == 0 { 1.0 } else { 0.0 }, 0.5));
        }
        let groups: Vec<usize> = (0..40).map(|i| i % 5).collect();
        assert!(
            fit(dim, &emb, &out, Some(&groups)).is_some(),
            "held out by fifths, a real signal is kept"
        );
        let (mem, fit) = fit(dim, &emb, &out, None).expect("memory pays here");
        assert!(fit.loss_memory < fit.loss_router - 0.3, "{fit:?}");
        mem.validate(dim).unwrap();
        let first = mem.near(&[2.0, 0.0, 0.1, 0.0]);
        let second = mem.near(&[0.0, 0.1, 3.0, 0.0]);
        assert!(mem.adjust(&first, "a", 0.5) > 0.8);
        assert!(mem.adjust(&second, "a", 0.5) < 0.2);
        assert_eq!(mem.adjust(&first, "b", 0.37), 0.37);
    }

    /// Labels that are pure noise on 40 prompts: the best of the 120 settings, read on the
    /// rows it was chosen on, clears the bar on some draws (these four, found by a search of
    /// 400); read on each fifth with the setting chosen on the other four, it does not.
    #[test]
    fn nested_choice_drops_a_memory_fitted_to_noise() {
        for seed in [50u64, 85, 200, 265] {
            let dim = 3;
            let (mut emb, mut out, mut groups) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..40usize {
                let h = (i as u64 + 1 + seed * 1000).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7;
                emb.extend_from_slice(&[
                    (h % 97) as f32 - 48.0,
                    ((h >> 8) % 89) as f32 - 44.0,
                    ((h >> 16) % 83) as f32 - 41.0,
                ]);
                out.push((i, "a".to_string(), ((h >> 24) % 2) as f32, 0.5));
                groups.push(i % 5);
            }
            assert!(
                fit(dim, &emb, &out, None).is_some(),
                "seed {seed}: chosen in-sample"
            );
            assert!(
                fit(dim, &emb, &out, Some(&groups)).is_none(),
                "seed {seed}: nested"
            );
        }
    }

    /// Labels that are noise around the router's own p: no neighbour choice beats it.
    #[test]
    fn memory_is_dropped_when_it_does_not_pay() {
        let dim = 3;
        let mut emb = Vec::new();
        let mut out = Vec::new();
        for i in 0..60usize {
            // A fixed pseudo-random sequence (splitmix64's multiplier).
            let h = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7;
            emb.extend_from_slice(&[
                (h % 97) as f32,
                ((h >> 8) % 89) as f32,
                ((h >> 16) % 83) as f32,
            ]);
            out.push((i, "a".to_string(), ((h >> 24) % 2) as f32, 0.5));
        }
        assert!(fit(dim, &emb, &out, None).is_none());
    }

    #[test]
    fn bad_memories_are_refused() {
        let ok = Memory {
            dim: 2,
            prompts: vec![1.0, 0.0],
            outcomes: BTreeMap::from([("a".to_string(), vec![(0, 1.0)])]),
            k: 1,
            alpha: 1.0,
            tau: 0.0,
        };
        ok.validate(2).unwrap();
        assert!(ok.validate(3).is_err());
        let mut m = ok.clone();
        m.outcomes.insert("b".into(), vec![(1, 1.0)]);
        assert!(m.validate(2).is_err());
        let mut m = ok.clone();
        m.alpha = f32::NAN;
        assert!(m.validate(2).is_err());
        let mut m = ok;
        m.prompts.push(0.5);
        assert!(m.validate(2).is_err());
    }

    /// A remembered row long by the 1e-3 validate allows, a tiny tau, and a query along it:
    /// the cosine passes 1 and the weight exp((c - 1) / tau) was infinite, p NaN.
    #[test]
    fn a_near_unit_row_and_a_tiny_tau_keep_p_finite() {
        let m = Memory {
            dim: 2,
            prompts: vec![1.0009, 0.0],
            outcomes: BTreeMap::from([("a".to_string(), vec![(0, 0.0)])]),
            k: 1,
            alpha: 1.0,
            tau: 1e-6,
        };
        m.validate(2).unwrap();
        let p = m.adjust(&m.near(&[1.0, 0.0]), "a", 0.5);
        assert!(p.is_finite() && p < 0.5, "{p}");
    }
}

#[cfg(test)]
mod overlay_tests {
    use std::path::Path;

    use super::*;
    use crate::model::overlay::{Overlay, OVERLAY_FORMAT};
    use crate::model::Heads;

    /// A memory travels in an overlay (what `tiergate calibrate` writes and the server loads)
    /// and moves Route's p on prompts near its own, not on others.
    #[test]
    fn an_overlay_memory_moves_route_p_near_its_prompts() -> Result<()> {
        let mut heads = Heads::load(Path::new("models/heads.json"))?;
        let d = heads.dim;
        let model = heads.router.models.keys().next().cloned().expect("a model");
        let unit = |j: usize| {
            let mut v = vec![0.0f32; d];
            v[j] = 1.0;
            v
        };
        let (near_e, far_e) = (unit(0), unit(1));
        let before = (
            heads.route_p(&model, &near_e),
            heads.route_p(&model, &far_e),
        );
        let overlay = Overlay {
            format: OVERLAY_FORMAT,
            heads_revision: heads.revision.clone(),
            prior: heads.router.prior.clone(),
            models: Default::default(),
            verifier: None,
            verifier_rows: 0,
            verify_thresholds: None,
            memory: Some(Memory {
                dim: d,
                prompts: near_e.clone(),
                outcomes: BTreeMap::from([(model.clone(), vec![(0, 0.0)])]),
                k: 5,
                alpha: 1.0,
                tau: 0.05,
            }),
        };
        let text = serde_json::to_string(&overlay)?;
        serde_json::from_str::<Overlay>(&text)?.apply(&mut heads)?;
        let after = (
            heads.route_p(&model, &near_e),
            heads.route_p(&model, &far_e),
        );
        assert!(after.0 < before.0 * 0.6, "{before:?} → {after:?}");
        assert!((after.1 - before.1).abs() < 0.01, "{before:?} → {after:?}");
        let mut bad = overlay;
        if let Some(m) = bad.memory.as_mut() {
            m.dim = d + 1;
        }
        assert!(bad.apply(&mut heads).is_err());
        Ok(())
    }
}
