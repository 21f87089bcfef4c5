//! The decision rules, on plain numbers and domain types: which candidate Route picks, when
//! Verify ships, where a cascade escalates, and the defaults behind them. The server, the
//! offline replay (`eval`) and `score` all call these, so what is evaluated is what is served.
#![forbid(unsafe_code)]
use crate::config::PolicyConfig;
use crate::model::heads::FALLBACK_FLOOR;
use crate::model::memory::Near;
use crate::model::Heads;
use crate::policy::{Effective, Model, PolicyError};

/// Route-only decision over candidates in price order: the first (cheapest) with p ≥ floor,
/// else the most likely to pass (the cheaper on ties).
pub fn route_pick(p: &[f64], floor: f64) -> usize {
    p.iter().position(|&x| x >= floor).unwrap_or_else(|| {
        (0..p.len())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a)))
            .unwrap_or(0)
    })
}

/// Relative floor r: the first (cheapest) candidate whose p reaches r times the highest p
/// for this prompt. Reads only how candidates compare on the prompt, not their absolute
/// calibration, which does not carry to traffic unlike the training data.
pub fn relative_pick(p: &[f64], r: f64) -> usize {
    let bar = r * p.iter().copied().fold(0.0, f64::max);
    p.iter().position(|&x| x >= bar).unwrap_or(0)
}

/// Route-only by expected utility (Route's `cost_weight` mode): the candidate maximising
/// p − λ·cost, the cheaper on ties. `cost`: each candidate's expected cost per call.
pub fn utility_pick(p: &[f64], cost: &[f64], lambda: f64) -> usize {
    let u = |j: usize| p[j] - lambda * cost.get(j).copied().unwrap_or(0.0);
    (0..p.len()).fold(0, |b, j| if u(j) > u(b) { j } else { b })
}

/// Verify's rule: ship an answer whose p_pass reaches the threshold.
pub fn ships(p_pass: f64, threshold: f64) -> bool {
    p_pass >= threshold
}

/// Peers whose final answer (`model::answer::final_answer`) can be compared with this
/// answer's, and how many of those agree: (compared, agreeing). An answer without one
/// compares with nothing.
pub fn peer_agreement(own: Option<&str>, peers: &[Option<String>]) -> (u32, u32) {
    let Some(own) = own else {
        return (0, 0);
    };
    let compared = peers.iter().flatten();
    let n = compared.clone().count() as u32;
    (n, compared.filter(|p| p.as_str() == own).count() as u32)
}

/// Verify's rule with peers: ship when p_pass reaches the threshold, or, when the request
/// gives a lower bar for answers a peer agrees with, when a peer agrees and p_pass reaches
/// that bar. Off unless asked: on dev's cascades agreement did not pay under the
/// cross-fitted protocol (models/EVAL.md, "Peer answers"); as a policy of its own, cheap
/// answers bought together and shipped when they agree, it does ([`consensus`]).
pub fn ships_with_peers(
    p_pass: f64,
    threshold: f64,
    agreeing: u32,
    peer_threshold: Option<f64>,
) -> bool {
    ships(p_pass, threshold) || (agreeing >= 1 && peer_threshold.is_some_and(|t| p_pass >= t))
}

/// A consensus over answers bought together (a gateway policy's `consensus`), listed cheapest
/// first (`None`: no answer came): the answer to ship, if at least `agree` commit to the same
/// final answer (`model::answer::final_answer`). The largest such group wins, ties to the group
/// with the cheaper first member, and its cheapest member ships. `None`: no consensus, escalate.
/// `scripts/protocol.py` replays this rule as its `consensus` policy.
pub fn consensus(prompt: &str, answers: &[Option<&str>], agree: usize) -> Option<usize> {
    let keys: Vec<Option<String>> = answers
        .iter()
        .map(|a| a.and_then(|a| crate::model::answer::final_answer(prompt, a)))
        .collect();
    let keys: Vec<Option<&str>> = keys.iter().map(Option::as_deref).collect();
    consensus_of(&keys, agree)
}

/// [`consensus`] on final answers already read, for callers that judge the same answers
/// many times (`tiergate consensus`).
pub fn consensus_of(keys: &[Option<&str>], agree: usize) -> Option<usize> {
    leader(&groups(keys), agree).map(|(_, i)| i)
}

/// The groups of answers that commit to the same final answer, as (votes, first member):
/// largest first, ties to the group whose first (cheapest) member is cheaper.
fn groups(keys: &[Option<&str>]) -> Vec<(usize, usize)> {
    let mut groups: Vec<(usize, usize)> = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let Some(k) = k else { continue };
        if !keys[..i].contains(&Some(*k)) {
            groups.push((keys[i..].iter().filter(|e| *e == &Some(*k)).count(), i));
        }
    }
    groups.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    groups
}

/// The leading group of [`groups`], if it has `agree` votes.
fn leader(groups: &[(usize, usize)], agree: usize) -> Option<(usize, usize)> {
    groups.first().copied().filter(|g| g.0 >= agree.max(1))
}

/// Where a consensus stands while some answers are still to come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// This answer ships whatever the rest say: no pending answer can outvote or tie its group.
    Ship(usize),
    /// No group can reach `agree` even if every pending answer joins the largest.
    Escalate,
    /// The pending answers can still change the outcome.
    Wait,
}

/// [`consensus_of`] before every answer is in, so that a gateway need not wait on a slow
/// probe whose answer cannot change the decision. `keys[i]`: `None` while answer i is pending,
/// `Some(None)` when it came without a final answer (or did not come). Once nothing is pending
/// it is [`consensus_of`]'s decision. A `Ship` names the cheapest member of its group that has
/// answered: the final answer is the one [`consensus_of`] would pick once all are in, though a
/// cheaper pending member could have shipped the same answer in other words.
pub fn consensus_settled(keys: &[Option<Option<&str>>], agree: usize) -> Settled {
    let pending = keys.iter().filter(|k| k.is_none()).count();
    let came: Vec<Option<&str>> = keys.iter().map(|k| k.flatten()).collect();
    let groups = groups(&came);
    let lead = leader(&groups, agree);
    if pending == 0 {
        return lead.map_or(Settled::Escalate, |(_, i)| Settled::Ship(i));
    }
    let votes = |g: Option<&(usize, usize)>| g.map_or(0, |g| g.0);
    match lead {
        Some((v, first)) if v > votes(groups.get(1)) + pending => Settled::Ship(first),
        _ if votes(groups.first()) + pending < agree.max(1) => Settled::Escalate,
        _ => Settled::Wait,
    }
}

/// Cascade from `start`: ship the first answer that [`ships`] (an answer the verifier cannot
/// read counts as rejected), the last model's answer regardless. Returns the model shipped
/// and whether the verifier accepted it.
pub fn cascade_stop(v: &[Option<f64>], start: usize, t: f64) -> (usize, bool) {
    for (j, p) in v.iter().enumerate().skip(start) {
        if p.is_some_and(|p| ships(p, t)) {
            return (j, true);
        }
    }
    (v.len().saturating_sub(1), false)
}

/// Route's default floor: the config's, else the one learned with the heads.
pub fn default_floor(cfg: &PolicyConfig, heads: &Heads) -> f64 {
    cfg.quality_floor
        .unwrap_or(heads.default_quality_floor.unwrap_or(FALLBACK_FLOOR))
}

/// Verify's default ship threshold: the configured threshold, else the threshold of the
/// configured floor, else the learned default (the learned floor's).
pub fn default_threshold(cfg: &PolicyConfig, heads: &Heads) -> f64 {
    configured_threshold(
        cfg.verify_threshold,
        cfg.quality_floor,
        &heads.verify_thresholds,
        heads.default_verify_threshold,
    )
}

/// [`default_threshold`] on plain values: a configured `verify_threshold`, else the configured
/// `quality_floor`'s own from `table`, else `default` (the heads' default threshold). The
/// offline replay of the gateway's cascade calls it with each half's table.
pub fn configured_threshold(
    verify_threshold: Option<f64>,
    quality_floor: Option<f64>,
    table: &[(f64, f64)],
    default: f64,
) -> f64 {
    match (verify_threshold, quality_floor) {
        (Some(t), _) => t,
        (None, Some(f)) => crate::model::heads::threshold_from(table, f),
        (None, None) => default,
    }
}

/// The threshold one Verify uses: a requested floor maps to the threshold at which shipped
/// answers met that floor on held-back data; else the default.
pub fn verify_threshold(pol: &Effective, cfg: &PolicyConfig, heads: &Heads) -> f64 {
    if pol.floor_given {
        heads.threshold_for(pol.quality_floor)
    } else {
        default_threshold(cfg, heads)
    }
}

/// p_pass of every candidate for one prompt embedding, with its expected cost. The prompt's
/// part of the router is shared by all candidates, so it is computed once.
pub fn score_candidates(
    heads: &Heads,
    prompt_emb: &[f32],
    candidates: &[&Model],
    prompt_tokens: u32,
    output_tokens: Option<u32>,
) -> Vec<Scored> {
    let pf = heads.router.prompt_features(prompt_emb);
    let heads_of: Vec<&str> = candidates.iter().map(|c| c.head.as_str()).collect();
    let near = heads.near(prompt_emb, &heads_of);
    candidates
        .iter()
        .map(|c| Scored {
            model: c.name.clone(),
            p_pass: route_p(heads, &pf, near.as_ref(), &c.head),
            cost: c.expected_cost(prompt_tokens, output_tokens),
            params: c.params.clone(),
        })
        .collect()
}

/// p_pass of the model whose head is `head` for a prompt whose router features are `pf`
/// (`RouterHead::prompt_features`) and whose cosines to the memory of labelled traffic are `near` (`Heads::near`): the one
/// formula Route and `score` use.
pub fn route_p(heads: &Heads, pf: &(f32, Vec<f32>), near: Option<&Near>, head: &str) -> f64 {
    heads.route_p_from(pf, near, head)
}

#[derive(Debug, Clone)]
pub struct Scored {
    pub model: String,
    pub p_pass: f64,
    pub cost: f64,
    /// Where the candidate's parameters come from ("trained", "like:<model>").
    pub params: String,
}

#[derive(Debug, Clone)]
pub struct RouteDecision {
    /// Candidates in price order, cheapest first.
    pub candidates: Vec<Scored>,
    pub chosen: usize,
    pub expected_saving: f64,
    pub margin: f64,
    /// Relative mode: how far, in p, the decisive comparisons are from their lines (moving
    /// every candidate's p by less than half of it flips neither the pick nor
    /// `verify_recommended`, for r ≤ 1): the
    /// chosen candidate above the bar (the bar of the others' best when it is the best itself,
    /// since its own fall lowers the bar), every cheaper one below it, and the margin from
    /// the Verify band and the pricier candidates' p from the pick's when they set
    /// `verify_recommended`. Route's fast path answers alone
    /// only at or above a set value of it (measured in this mode only: `scripts/fast_path.py`);
    /// 0 in the other modes, so they always defer.
    pub stability: f64,
    /// Worth verifying the answer: the pick is within the Verify band of its line and a
    /// pricier candidate (within the budget) is rated above it, so a rejected answer has
    /// somewhere better to go.
    pub verify_recommended: bool,
    pub reason: &'static str,
}

/// The pick-stability part of [`RouteDecision::stability`] for the relative pick `k` of `p`.
fn relative_stability(p: &[f64], k: usize, r: f64) -> f64 {
    let max = p.iter().copied().fold(0.0, f64::max);
    let others = (0..p.len())
        .filter(|&j| j != k)
        .map(|j| p[j])
        .fold(f64::NEG_INFINITY, f64::max);
    let reach = if others == f64::NEG_INFINITY {
        f64::INFINITY
    } else if p[k] >= others {
        p[k] - r * others
    } else {
        p[k] - r * max
    };
    p[..k].iter().map(|&x| r * max - x).fold(reach, f64::min)
}

/// Price order of unscored lists (consensus, escalation ladders): by expected cost, ties by
/// name. Route's own list puts the likelier candidate first at an equal cost.
fn price_cmp(a: (f64, &str), b: (f64, &str)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1))
}

/// Candidates' names in Route's price order for a prompt of `prompt_tokens`, without scoring
/// them (a consensus needs only the order, not an encoder pass).
pub fn price_order(candidates: &[&Model], prompt_tokens: u32) -> Vec<String> {
    let mut c: Vec<(f64, &str)> = candidates
        .iter()
        .map(|m| (m.expected_cost(prompt_tokens, None), m.name.as_str()))
        .collect();
    c.sort_by(|a, b| price_cmp(*a, *b));
    c.into_iter().map(|(_, n)| n.to_string()).collect()
}

/// Cheapest candidate with p_pass >= floor, else the one most likely to pass; or, with a cost
/// weight, the best p_pass - weight * cost. `max_cost_usd` filters candidates first.
pub fn decide_route(
    mut scored: Vec<Scored>,
    pol: &Effective,
    verify_band: f64,
) -> Result<RouteDecision, PolicyError> {
    // Price order; at an equal expected cost the one more likely to pass first, so no pick
    // passes over a candidate as cheap and rated higher (names only break exact ties).
    scored.sort_by(|a, b| {
        a.cost
            .total_cmp(&b.cost)
            .then(b.p_pass.total_cmp(&a.p_pass))
            .then_with(|| a.model.cmp(&b.model))
    });
    let affordable: Vec<usize> = (0..scored.len())
        .filter(|&i| pol.max_cost_usd.is_none_or(|m| scored[i].cost <= m))
        .collect();
    // The saving is against the dearest candidate the request could have called: one its
    // budget excludes was never the alternative.
    let max_all = affordable
        .iter()
        .map(|&i| scored[i].cost)
        .fold(0.0, f64::max);
    if affordable.is_empty() {
        return Err(PolicyError(format!(
            "no candidate fits policy.max_cost_usd = {:?}: the cheapest costs {:.3e} USD",
            pol.max_cost_usd.unwrap_or(0.0),
            scored.first().map_or(0.0, |s| s.cost)
        )));
    }
    // The same picks the offline replay makes (`route_pick`, `utility_pick`), over the
    // affordable candidates in price order.
    let p: Vec<f64> = affordable.iter().map(|&i| scored[i].p_pass).collect();
    let (chosen, margin, stability, reason) = if let Some(r) = pol.relative_floor {
        let k = relative_pick(&p, r);
        let bar = r * p.iter().copied().fold(0.0, f64::max);
        // Candidates as cheap as the pick are ordered by p: a move of less than half their
        // gap to it cannot put one of them first.
        let cost_k = scored[affordable[k]].cost;
        let peers = (k + 1..p.len())
            .filter(|&j| scored[affordable[j]].cost == cost_k)
            .map(|j| p[k] - p[j])
            .fold(f64::INFINITY, f64::min);
        (
            affordable[k],
            p[k] - bar,
            relative_stability(&p, k, r).min(peers),
            "relative",
        )
    } else if pol.cost_weight > 0.0 && !pol.floor_given {
        let cost: Vec<f64> = affordable.iter().map(|&i| scored[i].cost).collect();
        let k = utility_pick(&p, &cost, pol.cost_weight);
        let u = |j: usize| p[j] - pol.cost_weight * cost[j];
        let runner = (0..p.len())
            .filter(|&j| j != k)
            .map(u)
            .fold(f64::NEG_INFINITY, f64::max);
        let m = if runner.is_finite() {
            u(k) - runner
        } else {
            0.0
        };
        (affordable[k], m, 0.0, "utility")
    } else {
        let f = pol.quality_floor;
        let k = route_pick(&p, f);
        let reason = if p[k] >= f {
            "floor_met"
        } else {
            "best_effort"
        };
        (affordable[k], p[k] - f, 0.0, reason)
    };
    let own = scored[chosen].p_pass;
    let above: Vec<f64> = affordable
        .iter()
        .filter(|&&i| scored[i].cost > scored[chosen].cost)
        .map(|&i| scored[i].p_pass - own)
        .collect();
    let better_above = above.iter().any(|&d| d > 0.0);
    let near = margin.abs() < verify_band;
    let verify_recommended = reason != "utility" && worth_verifying(margin, verify_band, &above);
    // The fast path must not flip `verify_recommended` either. It needs both the margin
    // inside the band and a pricier candidate above the pick: on, it flips when either goes;
    // off, when the missing one comes (both, when both are missing).
    let stability = if reason != "utility" && !above.is_empty() {
        let band = (margin.abs() - verify_band).abs();
        let cross = if better_above {
            above.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        } else {
            above.iter().map(|d| -d).fold(f64::INFINITY, f64::min)
        };
        stability.min(match (near, better_above) {
            (true, true) => band.min(cross),
            (true, false) => cross,
            (false, true) => band,
            (false, false) => band.max(cross),
        })
    } else {
        stability
    };
    Ok(RouteDecision {
        expected_saving: max_all - scored[chosen].cost,
        candidates: scored,
        chosen,
        margin,
        stability,
        verify_recommended,
        reason,
    })
}

/// Route's `verify_recommended` for a pick `margin` from its line: within `band` of it, and
/// some pricier candidate rated above the pick (`above`: their p less the pick's). Verify can
/// only send an answer on to a pricier candidate, and, but for an answer it all but rules
/// out ([`escalation_pick`]), only to one rated above it: elsewhere the call ships the answer
/// anyway. On the served default (relative 0.94, `borderline`) over six traffics that cut
/// Verify calls per request by 0–43% (new MMLU-Pro subjects 1.13 → 0.81), mean quality within
/// 0.3 points (models/EVAL.md, "Verify only where it can send an answer on").
pub fn worth_verifying(margin: f64, band: f64, above: &[f64]) -> bool {
    margin.abs() < band && above.iter().any(|&d| d > 0.0)
}

/// Where a cascade escalates an answer Verify turned down, over candidates' Route p in price
/// order: the pricier candidate Route rates most likely to pass (the cheaper on ties), when
/// Route rates it above the model that answered (`from`), or when the answer's own p_pass
/// (`p_answer`, Verify's; 0 for an empty answer) is 0 or below [`ESCALATE_BELOW`] times its
/// p; else nowhere, and the answer ships. With many candidates the next one up in price is
/// often a weaker model: on new MMLU-Pro subjects (29 candidates) the served default
/// escalating there kept 89% of the best model's quality against 97% for Route alone; this
/// rule kept 98% (models/EVAL.md, "Where a rejected answer goes").
pub fn escalation_pick(p: &[f64], from: usize, p_answer: f64) -> Option<usize> {
    let own = *p.get(from)?;
    let mut k: Option<usize> = None;
    for j in from + 1..p.len() {
        if !p[j].is_nan() && k.is_none_or(|b| p[j] > p[b]) {
            k = Some(j);
        }
    }
    k.filter(|&k| p[k] > own || p_answer <= 0.0 || p_answer < ESCALATE_BELOW * p[k])
}

/// An answer turned down goes to a pricier model Route rates no higher only when Verify
/// gives it less than this share of that model's p, so an empty answer (p 0) always does.
/// On new MMLU-Pro subjects, where the verifier is weak (within-model AUROC 0.78), a higher
/// share escalates correct answers to worse models: none / 0.3 / 0.5 / 0.7 kept 98.0% / 98.3% /
/// 98.1% / 97.9% of the best model's quality, saving 59.1% / 56.7% / 54.6% / 49.2%; on four
/// other traffics it made no difference (models/EVAL.md, "Where a rejected answer goes").
pub const ESCALATE_BELOW: f64 = 0.3;

/// [`escalation_pick`] on scored candidates: from `model`, whose answer Verify gave
/// `p_answer`, over the candidates priced above it that `max_cost_usd` allows (Route's price
/// order). `scored` must hold `model`.
pub fn escalation_target(
    mut scored: Vec<Scored>,
    model: &str,
    p_answer: f64,
    max_cost_usd: Option<f64>,
) -> Option<String> {
    scored.sort_by(|a, b| price_cmp((a.cost, &a.model), (b.cost, &b.model)));
    let own = scored.iter().find(|s| s.model == model)?.cost;
    let ladder: Vec<&Scored> = scored
        .iter()
        .filter(|s| s.model == model || (s.cost > own && max_cost_usd.is_none_or(|m| s.cost <= m)))
        .collect();
    let from = ladder.iter().position(|s| s.model == model)?;
    let p: Vec<f64> = ladder.iter().map(|s| s.p_pass).collect();
    escalation_pick(&p, from, p_answer).map(|j| ladder[j].model.clone())
}

#[cfg(test)]
mod tests {
    /// A rejected answer goes to the pricier candidate Route rates highest, past cheaper ones
    /// rated lower, and nowhere when none above it is rated above it.
    #[test]
    fn escalation_goes_to_the_likeliest_pricier_candidate() {
        use super::{escalation_pick, escalation_target, Scored};
        // Verify's p for the answer: 0.5, so only a model rated above the answering one.
        let pick = |p: &[f64], from| escalation_pick(p, from, 0.5);
        assert_eq!(pick(&[0.6, 0.5, 0.9, 0.8], 0), Some(2));
        assert_eq!(pick(&[0.6, 0.5, 0.9, 0.9], 0), Some(2), "the cheaper tie");
        assert_eq!(pick(&[0.6, 0.9, 0.5, 0.95], 2), Some(3));
        assert_eq!(pick(&[0.6, 0.5, 0.6], 0), None, "none rated above");
        assert_eq!(pick(&[0.6, 0.9], 1), None, "the top");
        assert_eq!(pick(&[0.6, f64::NAN, 0.7], 0), Some(2));
        assert_eq!(pick(&[0.6], 3), None);
        // An answer Verify all but rules out (an empty one: 0) goes to the likeliest pricier
        // model even when it is rated no higher; 0.3 × 0.6 = 0.18 is the line.
        assert_eq!(escalation_pick(&[0.6, 0.5, 0.6], 0, 0.0), Some(2));
        assert_eq!(escalation_pick(&[0.6, 0.5, 0.6], 0, 0.17), Some(2));
        assert_eq!(escalation_pick(&[0.6, 0.5, 0.6], 0, 0.19), None);
        assert_eq!(escalation_pick(&[0.6], 0, 0.0), None, "nothing pricier");
        assert_eq!(
            escalation_pick(&[0.6, 0.0], 0, 0.0),
            Some(1),
            "an empty answer"
        );
        assert_eq!(escalation_pick(&[0.6, 0.0], 0, 0.01), None);
        let s = |model: &str, p_pass: f64, cost: f64| Scored {
            model: model.into(),
            p_pass,
            cost,
            params: "trained".into(),
        };
        // Listed out of price order; "mid" costs more than "cheap" but is rated lower.
        let scored = vec![
            s("top", 0.9, 10.0),
            s("cheap", 0.6, 1.0),
            s("mid", 0.5, 3.0),
            s("big", 0.8, 6.0),
        ];
        let to = |from: &str, max| escalation_target(scored.clone(), from, 0.5, max);
        assert_eq!(to("cheap", None).as_deref(), Some("top"));
        // The policy's max_cost_usd keeps the cascade within budget.
        assert_eq!(to("cheap", Some(6.0)).as_deref(), Some("big"));
        assert_eq!(to("cheap", Some(2.0)), None);
        assert_eq!(to("big", None).as_deref(), Some("top"));
        assert_eq!(to("top", None), None);
        assert_eq!(to("absent", None), None);
        // A candidate at the same price is not above it.
        let flat = vec![s("a", 0.5, 1.0), s("b", 0.9, 1.0)];
        assert_eq!(escalation_target(flat, "a", 0.5, None), None);
    }

    /// Every pattern of up to four answers (pending, none, or one of three picks) against every
    /// way the pending ones could come: a `Ship` is the final answer whatever they say, an
    /// `Escalate` exactly when none of them could bring consensus.
    #[test]
    fn a_settled_consensus_is_the_one_all_answers_would_give() {
        use super::{consensus_of, consensus_settled, Settled};
        const K: [Option<&str>; 4] = [None, Some("A"), Some("B"), Some("C")];
        for n in 1..=4usize {
            for code in 0..5usize.pow(n as u32) {
                // 0: pending; 1..=4: K[d - 1].
                let digits: Vec<usize> = (0..n).map(|i| code / 5usize.pow(i as u32) % 5).collect();
                let keys: Vec<Option<Option<&str>>> =
                    digits.iter().map(|&d| (d > 0).then(|| K[d - 1])).collect();
                let open: Vec<usize> = (0..n).filter(|&i| digits[i] == 0).collect();
                for agree in 1..=n + 1 {
                    let settled = consensus_settled(&keys, agree);
                    let mut finals = Vec::new();
                    for fill in 0..4usize.pow(open.len() as u32) {
                        let mut all: Vec<Option<&str>> = keys.iter().map(|k| k.flatten()).collect();
                        for (j, &i) in open.iter().enumerate() {
                            all[i] = K[fill / 4usize.pow(j as u32) % 4];
                        }
                        finals.push(consensus_of(&all, agree).map(|i| all[i]));
                    }
                    let case = format!("{keys:?} agree {agree}: {settled:?}");
                    match settled {
                        Settled::Ship(i) => {
                            let k = keys[i].flatten();
                            assert!(k.is_some(), "{case}");
                            assert!(finals.iter().all(|f| *f == Some(k)), "{case}");
                            assert!(keys[..i].iter().all(|e| e.flatten() != k), "{case}");
                        }
                        Settled::Escalate => assert!(finals.iter().all(Option::is_none), "{case}"),
                        Settled::Wait => {
                            assert!(!open.is_empty(), "{case}");
                            assert!(finals.iter().any(Option::is_some), "{case}");
                        }
                    }
                    if open.is_empty() {
                        let all: Vec<Option<&str>> = keys.iter().map(|k| k.flatten()).collect();
                        let expect =
                            consensus_of(&all, agree).map_or(Settled::Escalate, Settled::Ship);
                        assert_eq!(settled, expect, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn consensus_ships_the_cheapest_of_the_largest_agreeing_group() {
        use super::consensus;
        let mcq = "Which?\nA) one\nB) two\nC) three\nAnswer:";
        let (a, b) = (Some("The answer is (A)."), Some("B"));
        let b2 = Some("Two, so the answer is (B).");
        assert_eq!(consensus(mcq, &[b, b2], 2), Some(0));
        assert_eq!(consensus(mcq, &[a, b2], 2), None, "they disagree");
        assert_eq!(consensus(mcq, &[a, b, b2], 2), Some(1), "two of three");
        assert_eq!(consensus(mcq, &[a, b, b2], 3), None, "not all three");
        assert_eq!(
            consensus(mcq, &[None, b, b2], 2),
            Some(1),
            "a failed call is no vote"
        );
        // Two groups of two: the one whose first member is cheaper.
        let c = Some("(C)");
        assert_eq!(consensus(mcq, &[c, a, c, a], 2), Some(0));
        assert_eq!(
            consensus(mcq, &[a, c, c, c], 2),
            Some(1),
            "the larger group wins"
        );
        // Answers with no final answer (free text, code) never agree.
        let free = Some("def f(x):\n    return x");
        assert_eq!(consensus(mcq, &[free, free], 2), None);
        let math = "Tom has 3 boxes of 400 pens. How many pens?";
        assert_eq!(
            consensus(
                math,
                &[Some("#### 1,200"), Some("so the answer is 1200.")],
                2
            ),
            Some(0)
        );
    }

    use super::*;

    fn s(m: &str, p: f64, c: f64) -> Scored {
        Scored {
            model: m.into(),
            p_pass: p,
            cost: c,
            params: "trained".into(),
        }
    }
    fn pol(floor: f64) -> Effective {
        Effective {
            quality_floor: floor,
            max_cost_usd: None,
            cost_weight: 0.0,
            floor_given: true,
            relative_floor: None,
        }
    }

    /// What the fast path relies on: moving every candidate's p by less than half the
    /// decision's stability changes neither the pick nor `verify_recommended` (a fixed seed,
    /// as the fuzz targets, so every run tries the same inputs).
    #[test]
    fn stability_bounds_what_can_flip() {
        use proptest::collection::vec;
        use proptest::strategy::Just;
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let config = Config {
            cases: 2000,
            failure_persistence: None,
            ..Config::default()
        };
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
        // The bound is tight where every p moves its full amount one way, and at r = 1.
        let step = || proptest::prop_oneof![Just(-0.49f64), Just(0.49f64), -0.49f64..0.49];
        let inputs = (
            vec(0.05f64..0.95, 2..7),
            proptest::prop_oneof![Just(1.0f64), 0.5f64..1.0],
            vec(step(), 7),
        );
        // Costs in pairs: equal-cost candidates are ordered by p, which a move can swap.
        let cands = |q: &[f64]| -> Vec<Scored> {
            (q.iter().enumerate())
                .map(|(i, &x)| s(&format!("m{i}"), x, 1.0 + (i / 2) as f64))
                .collect()
        };
        TestRunner::new_with_rng(config, rng)
            .run(&inputs, |(ps, r, moves)| {
                let mut p = pol(0.5);
                p.floor_given = false;
                p.relative_floor = Some(r);
                let d = decide_route(cands(&ps), &p, 0.1).unwrap();
                if !(d.stability.is_finite() && d.stability > 1e-9) {
                    return Ok(());
                }
                let moved: Vec<f64> = (ps.iter().zip(&moves))
                    .map(|(x, m)| x + m * d.stability)
                    .collect();
                let e = decide_route(cands(&moved), &p, 0.1).unwrap();
                proptest::prop_assert_eq!(
                    &d.candidates[d.chosen].model,
                    &e.candidates[e.chosen].model
                );
                proptest::prop_assert_eq!(d.verify_recommended, e.verify_recommended);
                Ok(())
            })
            .unwrap();
    }

    /// At an equal expected cost the candidate more likely to pass goes first: a floor pick
    /// does not pass over it for its name.
    #[test]
    fn equal_costs_go_to_the_likelier_candidate() {
        let d = decide_route(vec![s("a", 0.76, 1.0), s("b", 0.95, 1.0)], &pol(0.75), 0.1);
        let d = d.unwrap();
        assert_eq!(d.candidates[d.chosen].model, "b");
        assert_eq!(d.candidates[0].model, "b", "listed first at the same cost");
        // Relative mode: the pick's stability is at most its gap to an equal-cost peer.
        let mut p = pol(0.5);
        p.floor_given = false;
        p.relative_floor = Some(0.9);
        let cands = vec![s("a", 0.88, 1.0), s("b", 0.90, 1.0), s("c", 0.95, 5.0)];
        let d = decide_route(cands, &p, 0.1).unwrap();
        assert_eq!(d.candidates[d.chosen].model, "b");
        assert!(d.stability <= 0.02 + 1e-12, "{}", d.stability);
    }

    #[test]
    fn relative_floor_reads_the_prompts_own_best() {
        let mut p = pol(0.95);
        p.floor_given = false;
        p.relative_floor = Some(0.9);
        // Easy prompt: everyone is close to the best (0.82), so the cheapest goes.
        let easy = vec![
            s("cheap", 0.80, 1.0),
            s("mid", 0.82, 3.0),
            s("top", 0.81, 9.0),
        ];
        let d = decide_route(easy, &p, 0.1).unwrap();
        assert_eq!(d.candidates[d.chosen].model, "cheap");
        assert_eq!(d.reason, "relative");
        // Hard prompt: only the top model is near the best: it goes, though 0.83 < 0.95.
        let hard = vec![
            s("cheap", 0.55, 1.0),
            s("mid", 0.60, 3.0),
            s("top", 0.83, 9.0),
        ];
        let d = decide_route(hard, &p, 0.1).unwrap();
        assert_eq!(d.candidates[d.chosen].model, "top");
        assert!((d.margin - (0.83 - 0.9 * 0.83)).abs() < 1e-12);
        // Inside the band, but nothing above it to escalate to: Verify would ship it anyway.
        assert!(!d.verify_recommended);
        // top, the best, stays over 0.9 x the others' best by 0.29; mid is 0.147 under the bar.
        assert!((d.stability - (0.9 * 0.83 - 0.60)).abs() < 1e-12);
        let close = vec![s("cheap", 0.70, 1.0), s("top", 0.80, 9.0)];
        let d = decide_route(close, &p, 0.1).unwrap();
        assert_eq!(d.candidates[d.chosen].model, "top");
        assert!(
            (d.stability - (0.72 - 0.70)).abs() < 1e-12,
            "cheap is 0.02 under the bar"
        );
        // cheap goes 0.062 over the bar 0.738, so its margin is 0.038 from the Verify band;
        // mid, rated 0.02 above it, is what makes Verify worth its call.
        let easy = vec![
            s("cheap", 0.80, 1.0),
            s("mid", 0.82, 3.0),
            s("top", 0.81, 9.0),
        ];
        let d = decide_route(easy, &p, 0.1).unwrap();
        assert!(d.verify_recommended);
        assert!((d.stability - (0.82 - 0.80)).abs() < 1e-12);
        // The same pick with the pricier ones rated below it: nowhere better to go, and the
        // decision is as stable as their distance under it (0.01) allows.
        let lone = vec![
            s("cheap", 0.80, 1.0),
            s("mid", 0.78, 3.0),
            s("top", 0.79, 9.0),
        ];
        let d = decide_route(lone, &p, 0.1).unwrap();
        assert_eq!(d.candidates[d.chosen].model, "cheap");
        assert!(!d.verify_recommended);
        assert!((d.stability - (0.80 - 0.79)).abs() < 1e-12);
        let d = decide_route(vec![s("only", 0.3, 1.0)], &p, 0.1).unwrap();
        assert_eq!(d.stability, f64::INFINITY, "nothing to switch to");
        assert_eq!(relative_pick(&[0.5, 0.9, 1.0], 1.0), 2);
        assert_eq!(relative_pick(&[], 0.9), 0);
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
        assert_eq!(
            d.stability, 0.0,
            "the fast path defers outside relative mode"
        );
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
        assert_eq!(d.stability, 0.0);
    }

    /// Verify is worth a call only with a better candidate the budget allows: past
    /// `max_cost_usd`, the one rated above the pick does not count.
    #[test]
    fn verify_needs_a_better_candidate_within_the_budget() {
        let cands = || vec![s("cheap", 0.80, 1.0), s("top", 0.95, 9.0)];
        let d = decide_route(cands(), &pol(0.75), 0.1).unwrap();
        assert_eq!(d.candidates[d.chosen].model, "cheap");
        assert!(d.verify_recommended, "0.05 from the floor, top rated above");
        let mut p = pol(0.75);
        p.max_cost_usd = Some(5.0);
        let d = decide_route(cands(), &p, 0.1).unwrap();
        assert_eq!(d.candidates[d.chosen].model, "cheap");
        assert!(!d.verify_recommended, "top is over the budget");
    }

    #[test]
    fn max_cost_filters_and_errors_when_nothing_fits() {
        let mut p = pol(0.5);
        p.max_cost_usd = Some(2.0);
        let cands = vec![s("a", 0.4, 1.0), s("m", 0.3, 1.5), s("b", 0.9, 3.0)];
        let d = decide_route(cands, &p, 0.1).unwrap();
        assert_eq!(d.candidates[d.chosen].model, "a");
        // Saved against m, the dearest the budget allows, not b, which it never was.
        assert!(
            (d.expected_saving - 0.5).abs() < 1e-12,
            "{}",
            d.expected_saving
        );
        p.max_cost_usd = Some(0.5);
        assert!(matches!(
            decide_route(vec![s("a", 0.4, 1.0)], &p, 0.1),
            Err(PolicyError(_))
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
}
