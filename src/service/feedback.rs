//! Learning from outcomes while serving: the Feedback RPC's store (bounded per model), the
//! request ids Route remembers (bounded), and the re-fit pass that runs off the hot path. A
//! re-fit that does worse than the current parameters on held-out outcomes is not applied.
#![forbid(unsafe_code)]
use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::model::heads::Ability;

/// One outcome, as the router reads it: the prompt's features (s, z) and the label.
pub struct Outcome {
    pub s: f32,
    pub z: Vec<f32>,
    pub y: f32,
}

#[derive(Default)]
pub struct ModelOutcomes {
    pub rows: VecDeque<Outcome>,
    /// Outcomes received since the model was last re-fitted.
    pub fresh: usize,
    pub answer_tokens: u64,
    pub answers: u64,
}

/// Everything feedback keeps in memory; every part bounded by the config.
#[derive(Default)]
pub struct FeedbackStore {
    pub models: BTreeMap<String, ModelOutcomes>,
    requests: HashMap<String, String>,
    order: VecDeque<String>,
}

impl FeedbackStore {
    /// Remembers a Route's prompt under its request id (the oldest forgotten past `cap`).
    pub fn remember(&mut self, request_id: &str, prompt: &str, cap: usize) {
        if cap == 0 || request_id.is_empty() {
            return;
        }
        if self
            .requests
            .insert(request_id.to_string(), prompt.to_string())
            .is_none()
        {
            self.order.push_back(request_id.to_string());
        }
        while self.order.len() > cap {
            if let Some(old) = self.order.pop_front() {
                self.requests.remove(&old);
            }
        }
    }

    pub fn prompt_of(&self, request_id: &str) -> Option<String> {
        self.requests.get(request_id).cloned()
    }

    pub fn push(&mut self, model: &str, o: Outcome, answer_tokens: Option<u32>, cap: usize) {
        let m = self.models.entry(model.to_string()).or_default();
        m.rows.push_back(o);
        while m.rows.len() > cap.max(1) {
            m.rows.pop_front();
        }
        m.fresh += 1;
        if let Some(t) = answer_tokens {
            m.answer_tokens += u64::from(t);
            m.answers += 1;
        }
    }
}

/// Mean log-loss of an ability on outcomes.
pub fn log_loss(a: &Ability, rows: &[&Outcome]) -> f64 {
    let n = rows.len().max(1) as f64;
    rows.iter()
        .map(|o| {
            let z = o.s + crate::base::dot(&a.u, &o.z) + a.b;
            let p = crate::base::sigmoid(z as f64).clamp(1e-7, 1.0 - 1e-7);
            let y = o.y as f64;
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum::<f64>()
        / n
}

/// Fits an ability on outcomes starting from `start` (an L2 pull towards it: `l2`).
pub fn fit(rows: &[&Outcome], start: &Ability, l2: f64) -> anyhow::Result<Ability> {
    let k = start.u.len();
    let mut z = Vec::with_capacity(rows.len() * k);
    let (mut s, mut y) = (Vec::new(), Vec::new());
    for o in rows {
        anyhow::ensure!(
            o.z.len() == k,
            "outcome has {} skills, the router {k}",
            o.z.len()
        );
        z.extend_from_slice(&o.z);
        s.push(o.s);
        y.push(o.y);
    }
    crate::model::ability::fit_ability(&z, &s, &y, k, start, l2)
}

/// The re-fit of one model, checked: fitted without every fifth outcome, it must do no worse
/// than `start` on those; then fitted on all. None when the check fails.
pub fn checked_refit(
    rows: &[Outcome],
    start: &Ability,
    l2: f64,
) -> anyhow::Result<Option<Ability>> {
    let (mut fit_rows, mut held) = (Vec::new(), Vec::new());
    for (i, o) in rows.iter().enumerate() {
        if i % 5 == 4 {
            held.push(o)
        } else {
            fit_rows.push(o)
        }
    }
    if !held.is_empty() {
        let trial = fit(&fit_rows, start, l2)?;
        let (new, old) = (log_loss(&trial, &held), log_loss(start, &held));
        // NaN fails too: only a loss known to be no worse passes.
        if new.is_nan() || new > old + 1e-9 {
            return Ok(None);
        }
    }
    let all: Vec<&Outcome> = rows.iter().collect();
    let a = fit(&all, start, l2)?;
    let finite = a.b.is_finite() && a.u.iter().all(|x| x.is_finite());
    Ok(finite.then_some(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(n: usize, y: f32) -> Vec<Outcome> {
        (0..n)
            .map(|i| Outcome {
                s: 0.0,
                z: vec![(i % 3) as f32 - 1.0, 0.5],
                y,
            })
            .collect()
    }

    #[test]
    fn a_refit_follows_the_outcomes_and_is_checked() {
        let start = Ability {
            u: vec![0.0, 0.0],
            b: -1.0,
        };
        let a = checked_refit(&outcomes(50, 1.0), &start, 2.0)
            .unwrap()
            .expect("all passes: the refit must help");
        assert!(a.b > start.b);
        // Labels that contradict themselves between fit and held-out rows: refused.
        let mut mixed = outcomes(50, 1.0);
        for (i, o) in mixed.iter_mut().enumerate() {
            o.y = if i % 5 == 4 { 0.0 } else { 1.0 };
        }
        assert!(checked_refit(&mixed, &start, 2.0).unwrap().is_none());
    }

    #[test]
    fn memory_is_bounded() {
        let mut st = FeedbackStore::default();
        for i in 0..100 {
            st.remember(&format!("r{i}"), "p", 10);
            st.push("m", outcomes(1, 1.0).remove(0), None, 7);
        }
        assert!(st.prompt_of("r99").is_some() && st.prompt_of("r0").is_none());
        assert_eq!(st.requests.len(), 10);
        assert_eq!(st.models["m"].rows.len(), 7);
    }
}
