//! What `tiergate calibrate` recommends for Route on the operator's labelled traffic: the
//! floor (an absolute `quality_floor` or a `relative_floor`) with the largest saving that kept
//! the target share of the best model's quality. The p come from heads calibrated on the
//! other half of the prompts (as new traffic meets them), and the pick is judged on the half
//! it was not picked on, both ways: a floor picked on a few hundred prompts sits at the edge
//! of its target and often does not hold elsewhere (the winner's curse issue 13 measured).
//! The decisions are the served ones (`decide::route_pick`, `decide::relative_pick`).
//!
//! Beside each floor it replays the gateway's cascade in each `[gateway] verify` mode
//! (`never`, `borderline`, `always`): where Verify runs, the routed model's answer is verified
//! at the threshold the server would use under that floor, from the re-learned table of the
//! half's heads, and a rejected one escalates where the server's Verify sends it
//! (`decide::escalation_pick`; nowhere: it ships), every call paid for. The
//! pick is the one flow that saved most, so Verify is recommended only where it earned its
//! calls on these prompts; verified flows are among the choices only where, picked on each
//! half, one held on the other (the served default, which is not picked, always is).
#![forbid(unsafe_code)]
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Serialize;

use super::adapt::adapt;
use super::data::Row;
use super::embed::RowFeatures;
use super::replay::{covering, MIN_COVERAGE};
use super::score::score_with;
use super::util::half_of;
use crate::config::VerifyMode;
use crate::model::Heads;
use crate::service::decide;

/// Prompts a source needs, with a row of every candidate, before a floor is recommended.
pub const MIN_PROMPTS: usize = 40;

/// A Route rule as the config names it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Floor {
    /// `policy.quality_floor`: the cheapest candidate with p ≥ t, else the likeliest to pass.
    QualityFloor(f64),
    /// `policy.relative_floor`: the cheapest candidate with p ≥ r · the prompt's highest p.
    RelativeFloor(f64),
}

impl Floor {
    fn pick(self, p: &[f64]) -> usize {
        match self {
            Floor::QualityFloor(t) => decide::route_pick(p, t),
            Floor::RelativeFloor(r) => decide::relative_pick(p, r),
        }
    }

    /// The config line that sets it.
    pub fn toml(self) -> String {
        match self {
            Floor::QualityFloor(t) => format!("quality_floor = {t:.2}"),
            Floor::RelativeFloor(r) => format!("relative_floor = {r:.2}"),
        }
    }

    /// Every floor a pick chooses among: absolute floors 0.01–0.99, relative 0.50–1.00.
    pub fn grid() -> Vec<Floor> {
        let abs = (1..100).map(|i| Floor::QualityFloor(i as f64 / 100.0));
        let rel = (50..=100).map(|i| Floor::RelativeFloor(i as f64 / 100.0));
        abs.chain(rel).collect()
    }
}

/// One prompt: per candidate (cheapest first) its cross-fitted p_route and p_verify (None:
/// no answer in the row), score and cost.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub half: usize,
    pub p: Vec<f64>,
    pub v: Vec<Option<f64>>,
    /// The answer is empty: the gateway verifies it (and so escalates it) under `borderline`
    /// even where Route did not ask for Verify.
    pub empty: Vec<bool>,
    pub score: Vec<f64>,
    pub cost: Vec<f64>,
}

/// A Route floor, and when the gateway verifies an answer below the top and escalates a
/// rejected one (`[gateway] verify`): `never` (Route's pick ships), `borderline` (Route's
/// `verify_recommended`: its pick within `policy.verify_band` of the floor's line and a
/// pricier candidate rated above it; and any empty answer), `always`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Flow {
    pub floor: Floor,
    pub verify: VerifyMode,
}

impl Flow {
    fn route(floor: Floor) -> Flow {
        Flow {
            floor,
            verify: VerifyMode::Never,
        }
    }
}

/// Verify's thresholds as the heads that scored a half's prompts have them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyRule {
    pub table: Vec<(f64, f64)>,
    pub default: f64,
}

/// What the replay of a flow needs beside the prompts: each half's Verify rule (`rules[h]`
/// for the prompts of half h), the config's `policy.verify_threshold` and `verify_band`, and
/// the gateway's escalations after the first call.
#[derive(Debug, Clone, Default)]
pub struct Cascade {
    pub rules: [VerifyRule; 2],
    pub verify_threshold: Option<f64>,
    pub verify_band: f64,
    pub max_escalations: u32,
}

impl Cascade {
    /// The threshold the server's Verify uses with `floor` in the config
    /// (`decide::default_threshold`): the configured one, else a quality floor's own from the
    /// table of the heads that scored half `half`, else their default.
    fn threshold(&self, half: usize, floor: Floor) -> f64 {
        let rule = &self.rules[half.min(1)];
        let quality_floor = match floor {
            Floor::QualityFloor(f) => Some(f),
            Floor::RelativeFloor(_) => None,
        };
        decide::configured_threshold(
            self.verify_threshold,
            quality_floor,
            &rule.table,
            rule.default,
        )
    }

    /// (cost, score) of `flow` on one prompt: Route's pick, then, where the gateway verifies
    /// (`always`; `borderline`: `decide::decide_route`'s `verify_recommended`, or an empty
    /// answer, judged at each hop as the gateway does), the answer verified and a rejected
    /// one escalated where Verify would send it (`decide::escalation_pick`), as many times as
    /// the gateway allows (the last one called ships unverified).
    fn play(&self, p: &Prompt, flow: Flow) -> (f64, f64) {
        let mut j = flow.floor.pick(&p.p);
        let recommended = match flow.verify {
            VerifyMode::Never => false,
            VerifyMode::Always => true,
            VerifyMode::Borderline => {
                let line = match flow.floor {
                    Floor::QualityFloor(t) => t,
                    Floor::RelativeFloor(r) => r * p.p.iter().copied().fold(0.0, f64::max),
                };
                let above: Vec<f64> = p.p[j + 1..].iter().map(|x| x - p.p[j]).collect();
                decide::worth_verifying(p.p[j] - line, self.verify_band, &above)
            }
        };
        let verifies =
            |j: usize| recommended || (flow.verify == VerifyMode::Borderline && p.empty[j]);
        let t = self.threshold(p.half, flow.floor);
        let (mut cost, mut hops) = (0.0, 0);
        loop {
            cost += p.cost[j];
            // An answer Verify cannot read ships unverified, as the gateway does; an empty one
            // never ships from Verify, even at a threshold of 0.
            let turned_down = |v: f64| p.empty[j] || !decide::ships(v, t);
            let v = match p.v[j] {
                Some(v) if verifies(j) && hops < self.max_escalations && turned_down(v) => v,
                _ => return (cost, p.score[j]),
            };
            match decide::escalation_pick(&p.p, j, v) {
                Some(k) => j = k,
                None => return (cost, p.score[j]),
            }
            hops += 1;
        }
    }
}

/// A floor's outcome on some prompts, against always calling the best candidate.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Outcome {
    /// 1 − cost / the best candidate's cost.
    pub saved: f64,
    /// Mean score / the best candidate's mean score.
    pub quality: f64,
    /// Its standard error over these prompts: how far a pick made here may land from it on
    /// new prompts of the same traffic (the pick sits at the edge of the target, so it falls
    /// under it there about as often as not: models/EVAL.md, "Verify only where it can send
    /// an answer on").
    pub quality_se: f64,
}

/// `floor` on `ps` (None: always the best candidate, index `best`), Route's pick shipping.
pub fn outcome(ps: &[&Prompt], floor: Option<Floor>, best: usize) -> Outcome {
    flow_outcome(ps, floor.map(Flow::route), best, &Cascade::default())
}

/// `flow` on `ps` (None: always the best candidate, index `best`).
pub fn flow_outcome(ps: &[&Prompt], flow: Option<Flow>, best: usize, c: &Cascade) -> Outcome {
    let (mut cost, mut score, mut b_cost, mut b_score) = (0.0, 0.0, 0.0, 0.0);
    let mut pairs = Vec::with_capacity(ps.len());
    for p in ps {
        let (ci, si) = flow.map_or((p.cost[best], p.score[best]), |f| c.play(p, f));
        cost += ci;
        score += si;
        b_cost += p.cost[best];
        b_score += p.score[best];
        pairs.push((si, p.score[best]));
    }
    let quality = if b_score > 0.0 { score / b_score } else { 1.0 };
    // The ratio's standard error by the delta method: the spread of each prompt's score about
    // quality × the best's score on it, over the best's total.
    let n = pairs.len() as f64;
    let quality_se = if b_score > 0.0 && n > 1.0 {
        let ss: f64 = pairs.iter().map(|(s, b)| (s - quality * b).powi(2)).sum();
        (ss * n / (n - 1.0)).sqrt() / b_score
    } else {
        0.0
    };
    Outcome {
        saved: if b_cost > 0.0 {
            1.0 - cost / b_cost
        } else {
            0.0
        },
        quality,
        quality_se,
    }
}

/// The floor with the largest saving whose quality held `target` on `ps`; None (always the
/// best candidate) when none saves anything there. Ties keep the later floor of the grid: the
/// highest of a plateau (its lowest is the edge most likely to fail on new prompts), and a
/// relative floor over an absolute one (it carries better to traffic unlike the labels).
pub fn pick(ps: &[&Prompt], floors: &[Floor], best: usize, target: f64) -> Option<Floor> {
    let flows: Vec<Flow> = floors.iter().map(|&f| Flow::route(f)).collect();
    pick_flow(ps, &flows, best, target, &Cascade::default()).map(|f| f.floor)
}

/// [`pick`] over flows; ties keep the later flow (so list the verified ones first: a tie
/// goes to Route alone, which makes fewer calls).
pub fn pick_flow(
    ps: &[&Prompt],
    flows: &[Flow],
    best: usize,
    target: f64,
    c: &Cascade,
) -> Option<Flow> {
    let mut chosen = None;
    let mut top = 0.0;
    for &f in flows {
        let o = flow_outcome(ps, Some(f), best, c);
        if o.quality >= target && o.saved > 0.0 && o.saved >= top {
            top = o.saved;
            chosen = Some(f);
        }
    }
    chosen
}

/// Every flow a pick chooses among: each floor of [`Floor::grid`] always verified, then
/// verified when borderline (when `verify`), then each alone: a tie goes to fewer calls.
pub fn flows(verify: bool) -> Vec<Flow> {
    let floors = Floor::grid();
    let modes: &[VerifyMode] = if verify {
        &[
            VerifyMode::Always,
            VerifyMode::Borderline,
            VerifyMode::Never,
        ]
    } else {
        &[VerifyMode::Never]
    };
    modes
        .iter()
        .flat_map(|&verify| floors.iter().map(move |&floor| Flow { floor, verify }))
        .collect()
}

/// Picked on one half, measured on the other.
#[derive(Debug, Clone, Serialize)]
pub struct Crossed {
    pub picked_on: usize,
    pub floor: Option<Floor>,
    /// When the pick verifies (`[gateway] verify`).
    pub verify: VerifyMode,
    pub held: Outcome,
}

/// `calibrate --recommend-out`'s file: its format (raised when a field changes meaning or
/// goes away; new fields do not raise it) and one recommendation per source.
pub const RECOMMENDATION_FORMAT: u32 = 1;

#[derive(Debug, Serialize)]
pub struct RecommendationFile<'a> {
    pub format: u32,
    pub sources: &'a [SourceRecommendation],
}

/// The recommendation for one source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceRecommendation {
    pub source: String,
    pub prompts: usize,
    /// Candidates cheapest first (mean cost per call on these rows) and the best of them.
    pub candidates: Vec<String>,
    pub best: String,
    /// The floor picked on all prompts (None: keep calling the best model) and its outcome.
    pub floor: Option<Floor>,
    /// When the pick verifies an answer below the top (`[gateway] verify`); `never`: Route's
    /// pick ships (also with no floor).
    pub verify: VerifyMode,
    /// Whether verified flows were among the choices: picked on each half, one held the
    /// target on the other and saved more there than Route alone.
    pub verify_earned: bool,
    pub in_sample: Outcome,
    /// The best flow of the other kind (with Verify when the pick has none, Route alone
    /// when it has) on all prompts, for comparison; None when none kept the target or a row
    /// lacked an answer to verify.
    pub other: Option<(Flow, Outcome)>,
    /// Each half's pick measured on the other half.
    pub crossed: Vec<Crossed>,
    /// The served default (the config's relative floor under its Verify mode) on all prompts.
    pub default: Option<(Flow, Outcome)>,
    /// The same floor with Route alone, when the default verifies: what its Verify changed.
    pub default_without_verify: Option<Outcome>,
}

/// Candidates and prompts of one source from its rows and their cross-fitted p_route and
/// p_verify (same order as `rows`); None when fewer than [`MIN_PROMPTS`] prompts have a row of
/// every candidate, or fewer than two models qualify.
pub fn prompts_of(
    rows: &[&Row],
    p: &[f64],
    v: &[Option<f64>],
) -> Option<(Vec<String>, usize, Vec<Prompt>)> {
    // Per prompt: model -> (p, score, cost, p_verify, empty answer); a repeated (prompt,
    // model) row keeps the last.
    type Cell = (f64, f64, f64, Option<f64>, bool);
    let mut by_prompt: BTreeMap<&str, BTreeMap<&str, Cell>> = BTreeMap::new();
    for ((r, &pr), &pv) in rows.iter().zip(p).zip(v) {
        let (Some(s), Some(c)) = (r.score, r.cost_usd) else {
            continue;
        };
        by_prompt.entry(&r.prompt_id).or_default().insert(
            &r.model,
            (
                pr,
                s,
                c,
                pv,
                r.response
                    .as_deref()
                    .is_some_and(crate::model::answer::says_nothing),
            ),
        );
    }
    let mut cands = covering(
        by_prompt
            .values()
            .map(|m| m.iter().map(|(model, &(_, s, c, _, _))| (*model, s, c))),
    );
    if cands.len() < 2 {
        return None;
    }
    cands.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(b.0)));
    // The best: the highest mean score, the cheaper on ties.
    let best = (0..cands.len()).fold(0, |b, j| if cands[j].2 > cands[b].2 { j } else { b });
    let prompts: Vec<Prompt> = by_prompt
        .iter()
        .filter_map(|(pid, m)| {
            let got: Option<Vec<Cell>> = cands.iter().map(|(c, _, _)| m.get(c).copied()).collect();
            let got = got?;
            Some(Prompt {
                half: half_of(pid),
                p: got.iter().map(|x| x.0).collect(),
                v: got.iter().map(|x| x.3).collect(),
                empty: got.iter().map(|x| x.4).collect(),
                score: got.iter().map(|x| x.1).collect(),
                cost: got.iter().map(|x| x.2).collect(),
            })
        })
        .collect();
    if prompts.len() < MIN_PROMPTS || (0..2).any(|h| !prompts.iter().any(|p| p.half == h)) {
        return None;
    }
    Some((
        cands.iter().map(|c| c.0.to_string()).collect(),
        best,
        prompts,
    ))
}

/// Picks and judges a flow for one source's prompts; verified flows are among the choices
/// only where every row below the top candidate (never verified) has an answer to verify.
pub fn recommend(
    source: &str,
    candidates: Vec<String>,
    best: usize,
    prompts: &[Prompt],
    target: f64,
    default: Option<Flow>,
    cascade: &Cascade,
) -> SourceRecommendation {
    let verify = prompts
        .iter()
        .all(|p| p.v.iter().rev().skip(1).all(Option::is_some));
    let all: Vec<&Prompt> = prompts.iter().collect();
    let half = |h: usize| -> Vec<&Prompt> { prompts.iter().filter(|p| p.half == h).collect() };
    // Each half's pick among `among`, measured on the other half.
    let cross = |among: &[Flow]| -> Vec<Crossed> {
        (0..2)
            .map(|h| {
                let flow = pick_flow(&half(h), among, best, target, cascade);
                Crossed {
                    picked_on: h,
                    floor: flow.map(|f| f.floor),
                    verify: flow.map_or(VerifyMode::Never, |f| f.verify),
                    held: flow_outcome(&half(1 - h), flow, best, cascade),
                }
            })
            .collect()
    };
    let route_alone = flows(false);
    let alone = cross(&route_alone);
    // Verified flows have more to choose among, so a pick fits its prompts more closely:
    // one is offered only when, picked on each half, it held the target on the other and
    // saved more there than Route alone picked the same way (or Route alone did not hold).
    let verify_earned = verify && {
        let verified: Vec<Flow> = flows(true)
            .into_iter()
            .filter(|f| f.verify != VerifyMode::Never)
            .collect();
        let holds = |o: &Outcome| o.quality >= target - HOLD_SLACK;
        cross(&verified).iter().zip(&alone).all(|(v, r)| {
            v.floor.is_some() && holds(&v.held) && (v.held.saved > r.held.saved || !holds(&r.held))
        })
    };
    let mut flows = if verify_earned {
        flows(true)
    } else {
        route_alone
    };
    // The served default is one fixed flow, not picked on these prompts, so how it did on
    // them is a fair estimate of how it does on new ones: it stays a choice (first, so a tie
    // goes to a picked flow without Verify).
    let added = default.filter(|d| (verify || d.verify == VerifyMode::Never) && !flows.contains(d));
    if let Some(d) = added {
        flows.insert(0, d);
    }
    // Route alone's half picks were made above; the same choices need not be made again.
    let crossed = if verify_earned || added.is_some() {
        cross(&flows)
    } else {
        alone
    };
    let flow = pick_flow(&all, &flows, best, target, cascade);
    let chosen_verify = flow.map_or(VerifyMode::Never, |f| f.verify);
    let verifies = |m: VerifyMode| m != VerifyMode::Never;
    let others: Vec<Flow> = self::flows(verify)
        .into_iter()
        .filter(|f| verifies(f.verify) != verifies(chosen_verify))
        .collect();
    let other = pick_flow(&all, &others, best, target, cascade)
        .map(|f| (f, flow_outcome(&all, Some(f), best, cascade)));
    SourceRecommendation {
        source: source.to_string(),
        prompts: prompts.len(),
        best: candidates[best].clone(),
        candidates,
        floor: flow.map(|f| f.floor),
        verify: chosen_verify,
        verify_earned,
        in_sample: flow_outcome(&all, flow, best, cascade),
        other,
        crossed,
        default: default.map(|f| (f, flow_outcome(&all, Some(f), best, cascade))),
        default_without_verify: default
            .filter(|f| f.verify != VerifyMode::Never)
            .map(|f| flow_outcome(&all, Some(Flow::route(f.floor)), best, cascade)),
    }
}

/// Each row's p_route and p_verify from the heads calibrated on the rows of the other half
/// of the prompts, and each half's Verify rule from those heads (`rules[h]` scored half h).
pub struct CrossFitted {
    pub p: Vec<f64>,
    pub v: Vec<Option<f64>>,
    pub rules: [VerifyRule; 2],
}

/// See [`CrossFitted`].
pub fn cross_fitted(heads: &Heads, rows: &[Row], f: &RowFeatures) -> Result<CrossFitted> {
    let mut p = vec![f64::NAN; rows.len()];
    let mut v = vec![None; rows.len()];
    let mut rules: [VerifyRule; 2] = Default::default();
    for (h, rule) in rules.iter_mut().enumerate() {
        let (scored, fitted): (Vec<usize>, Vec<usize>) =
            (0..rows.len()).partition(|&i| half_of(&rows[i].prompt_id) == h);
        if scored.is_empty() || fitted.is_empty() {
            bail!("every prompt falls in one half: too few prompts");
        }
        let pick = |idx: &[usize]| -> Vec<Row> { idx.iter().map(|&i| rows[i].clone()).collect() };
        let mut hh = heads.clone();
        adapt(&mut hh, &pick(&fitted), &f.subset(&fitted, true), true)?;
        let s = score_with(&hh, &pick(&scored), &f.subset(&scored, true));
        // score_with gives a blank answer p 0, as the server's Verify does.
        for (&i, (pr, pv)) in scored.iter().zip(s) {
            p[i] = pr;
            v[i] = pv;
        }
        *rule = VerifyRule {
            table: hh.verify_thresholds.clone(),
            default: hh.default_verify_threshold,
        };
    }
    Ok(CrossFitted { p, v, rules })
}

/// Per source of the labelled `rows` (features `f`): the recommended floor, with p_route from
/// heads calibrated on the other half of the prompts. `default`: the served default floor,
/// replayed with the config's `[gateway] verify` mode.
pub fn recommend_floors(
    heads: &Heads,
    rows: &[Row],
    f: &RowFeatures,
    target: f64,
    default: Option<Floor>,
    cfg: &crate::config::Config,
) -> Result<Vec<SourceRecommendation>> {
    if let Some(r) = rows
        .iter()
        .find(|r| !r.cost_usd.is_some_and(|c| c.is_finite() && c >= 0.0))
    {
        bail!(
            "line {} ({}/{} {}) has no finite, non-negative cost_usd: a floor's saving needs \
             every row's cost",
            r.line,
            r.source,
            r.prompt_id,
            r.model
        );
    }
    let x = cross_fitted(heads, rows, f)?;
    let cascade = Cascade {
        rules: x.rules.clone(),
        verify_threshold: cfg.policy.verify_threshold,
        verify_band: cfg.policy.verify_band,
        max_escalations: cfg.gateway.max_escalations,
    };
    let mut by_source: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        by_source.entry(&r.source).or_default().push(i);
    }
    let mut out = Vec::new();
    for (src, idx) in by_source {
        let rs: Vec<&Row> = idx.iter().map(|&i| &rows[i]).collect();
        let ps: Vec<f64> = idx.iter().map(|&i| x.p[i]).collect();
        let vs: Vec<Option<f64>> = idx.iter().map(|&i| x.v[i]).collect();
        match prompts_of(&rs, &ps, &vs) {
            Some((cands, best, prompts)) => out.push(recommend(
                src,
                cands,
                best,
                &prompts,
                target,
                default.map(|floor| Flow {
                    floor,
                    verify: cfg.gateway.verify,
                }),
                &cascade,
            )),
            None => eprintln!(
                "calibrate: {src}: no floor recommended (needs {MIN_PROMPTS} prompts answered by \
                 two or more models, each with a row for {:.0}% of the prompts)",
                100.0 * MIN_COVERAGE
            ),
        }
    }
    Ok(out)
}

/// The operator's summary of one source.
pub fn describe(r: &SourceRecommendation, target: f64) -> String {
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let mut out = format!(
        "{}: {} prompts, {} candidates (the labelled models, by mean cost: cheapest {}, best {})\n",
        r.source,
        r.prompts,
        r.candidates.len(),
        r.candidates[0],
        r.best
    );
    let line = |m: VerifyMode| {
        format!(
            "[gateway] verify = \"{}\"",
            match m {
                VerifyMode::Never => "never",
                VerifyMode::Borderline => "borderline",
                VerifyMode::Always => "always",
            }
        )
    };
    if let Some((f, o)) = r.default {
        out += &format!(
            "  the default ({}, {}): saved {} at {} of {}'s quality\n",
            f.floor.toml(),
            line(f.verify),
            pct(o.saved),
            pct(o.quality),
            r.best
        );
        if let Some(w) = r
            .default_without_verify
            .filter(|w| w.quality > o.quality + LOST_TO_VERIFY)
        {
            out += &format!(
                "  note: the default's Verify lowered quality here ({} without it): it turns \
                 down answers that pass, and the model a rejected one escalates to (the pricier \
                 one Route rates highest) can fail where they passed; {} avoids that\n",
                pct(w.quality),
                line(VerifyMode::Never)
            );
        }
    }
    let held: Vec<String> = r
        .crossed
        .iter()
        .map(|c| {
            format!(
                "{}{} picked on half {}: saved {} at {} on the other",
                c.floor.map_or("the best model".into(), |f| f.toml()),
                match c.verify {
                    VerifyMode::Never => "",
                    VerifyMode::Borderline => " with borderline Verify",
                    VerifyMode::Always => " with Verify",
                },
                c.picked_on,
                pct(c.held.saved),
                pct(c.held.quality)
            )
        })
        .collect();
    match r.floor {
        Some(f) => {
            out += &format!(
                "  recommended: [policy] {}{} (saved {} at {} ± {} of {}'s quality on these \
                 prompts, ± one standard error){}\n",
                f.toml(),
                match r.verify {
                    VerifyMode::Always => format!(
                        " and {}: Verify every answer below the top, escalating a rejected one",
                        line(r.verify)
                    ),
                    VerifyMode::Borderline => format!(
                        " and {}: Verify where Route's pick is close and a pricier model is rated above \
                         it, escalating a rejected one",
                        line(r.verify)
                    ),
                    VerifyMode::Never => format!(" and {}: Route's pick ships", line(r.verify)),
                },
                pct(r.in_sample.saved),
                pct(r.in_sample.quality),
                pct(r.in_sample.quality_se),
                r.best,
                if r.default
                    .is_some_and(|(d, _)| d.floor == f && d.verify == r.verify)
                {
                    "; the served default: nothing to change"
                } else {
                    ""
                }
            );
        }
        None => {
            out += &format!(
                "  recommended: no floor; none kept {} of {}'s quality and saved anything (route \
             this traffic to that model alone)\n",
                pct(target),
                r.best
            )
        }
    }
    if let Some((o, oo)) = r.other {
        out += &format!(
            "  with {}: at best [policy] {} saved {} at {}{}\n",
            line(o.verify),
            o.floor.toml(),
            pct(oo.saved),
            pct(oo.quality),
            // The served default is offered even then.
            if o.verify != VerifyMode::Never
                && !r.verify_earned
                && r.default.is_none_or(|(d, _)| d != o)
            {
                " (not offered: picked on one half, it did not hold or did not save \
                     more than Route alone on the other)"
            } else {
                ""
            }
        );
    }
    out += &format!("  cross-fitted: {}\n", held.join("; "));
    if r.crossed
        .iter()
        .any(|c| c.held.quality < target - HOLD_SLACK)
    {
        out += &format!(
            "  warning: a half's pick fell below {} of the quality on the other half; a floor \
             picked on this many prompts may not hold on new ones (label more, or keep a \
             higher floor)\n",
            pct(target - HOLD_SLACK)
        );
    }
    out
}

/// Quality the default's Verify may cost (share of the best model's) before the summary
/// says so.
const LOST_TO_VERIFY: f64 = 0.005;

/// How far below the target a pick may fall on the other half before the summary warns
/// (the protocol counts a cross-fitted half's saving down to 97% for a 98% target).
const HOLD_SLACK: f64 = 0.01;

#[cfg(test)]
mod tests {
    use super::*;

    /// Both halves verified by one rule; the embedded config's band and escalations.
    fn same_rule(table: Vec<(f64, f64)>, default: f64) -> Cascade {
        let rule = VerifyRule { table, default };
        Cascade {
            rules: [rule.clone(), rule],
            verify_threshold: None,
            verify_band: 0.1,
            max_escalations: 2,
        }
    }

    fn prompt(half: usize, p: [f64; 2], score: [f64; 2]) -> Prompt {
        Prompt {
            half,
            p: p.to_vec(),
            v: vec![None; 2],
            empty: vec![false; 2],
            score: score.to_vec(),
            cost: vec![1.0, 10.0],
        }
    }

    /// The quality ratio's standard error: with the best passing every prompt it is the
    /// plain standard error of the shipped scores' mean (1, 1, 1, 0: sd 0.5 over √4), and 0
    /// where the flow ships the best's own answers.
    #[test]
    fn quality_comes_with_its_standard_error() {
        let ps: Vec<Prompt> = [1.0, 1.0, 1.0, 0.0]
            .iter()
            .map(|&cheap| prompt(0, [0.9, 0.95], [cheap, 1.0]))
            .collect();
        let all: Vec<&Prompt> = ps.iter().collect();
        let o = outcome(&all, Some(Floor::QualityFloor(0.5)), 1);
        assert!((o.quality - 0.75).abs() < 1e-12, "{o:?}");
        assert!((o.quality_se - 0.25).abs() < 1e-12, "{o:?}");
        assert_eq!(outcome(&all, None, 1).quality_se, 0.0);
    }

    /// Cheap passes where its p is high: the floor that keeps quality sends those prompts to
    /// it and the rest to the best; a floor too low loses quality, one too high saves less.
    #[test]
    fn the_pick_is_the_cheapest_floor_that_keeps_quality() {
        let mut ps = Vec::new();
        for i in 0..100 {
            let p = i as f64 / 100.0;
            // The cheap model passes exactly when its p is at least 0.6.
            let cheap = if p >= 0.6 { 1.0 } else { 0.0 };
            ps.push(prompt(i % 2, [p, 0.9], [cheap, 1.0]));
        }
        let all: Vec<&Prompt> = ps.iter().collect();
        // Full quality: the cheap model from p = 0.6 up, which quality_floor 0.60 does and so
        // does relative_floor 0.66 (0.66 × 0.9 = 0.594); the tie goes to the relative floor.
        let f = pick(&all, &Floor::grid(), 1, 1.0);
        assert_eq!(f, Some(Floor::RelativeFloor(0.66)));
        assert_eq!(
            outcome(&all, Some(Floor::QualityFloor(0.6)), 1).saved,
            outcome(&all, f, 1).saved
        );
        // At 98% two failures are allowed: from p = 0.58 (relative 0.64: 0.576).
        assert_eq!(
            pick(&all, &Floor::grid(), 1, 0.98),
            Some(Floor::RelativeFloor(0.64))
        );
        // Among absolute floors alone, the highest of a plateau: only 0.60 reaches p = 0.6.
        let abs: Vec<Floor> = Floor::grid()
            .into_iter()
            .filter(|f| matches!(f, Floor::QualityFloor(_)))
            .collect();
        assert_eq!(pick(&all, &abs, 1, 1.0), Some(Floor::QualityFloor(0.6)));
        let o = outcome(&all, f, 1);
        // 40 prompts at cost 1, 60 at cost 10: 1 - 640 / 1000.
        assert!((o.saved - 0.36).abs() < 1e-9, "{o:?}");
        assert!((o.quality - 1.0).abs() < 1e-9, "{o:?}");
        let lower = outcome(&all, Some(Floor::QualityFloor(0.5)), 1);
        assert!(lower.quality < 0.98 && lower.saved > o.saved, "{lower:?}");
        // Always the best: nothing saved, full quality.
        let b = outcome(&all, None, 1);
        assert_eq!((b.saved, b.quality), (0.0, 1.0));
    }

    /// Three models at costs 1, 4, 10, Route's p rising with price. Route's p cannot tell the
    /// prompts apart, but the verifier can: the cheap answer passes exactly where its
    /// p_verify is high. Verifying it and escalating the rest keeps full quality for less
    /// than the best alone, every call paid. A rejection escalates to the model Route rates
    /// highest (the best), past the middle one.
    #[test]
    fn verify_is_picked_where_it_earns_its_calls() {
        // `good(i)`: prompt i's cheap answer passes (and Verify rates it 0.95, else 0.2).
        let make = |good: fn(usize) -> bool| -> Vec<Prompt> {
            (0..100)
                .map(|i| Prompt {
                    half: i % 2,
                    p: vec![0.9, 0.92, 0.95],
                    v: vec![Some(if good(i) { 0.95 } else { 0.2 }), Some(0.5), None],
                    empty: vec![false; 3],
                    score: vec![if good(i) { 1.0 } else { 0.0 }, 0.5, 1.0],
                    cost: vec![1.0, 4.0, 10.0],
                })
                .collect()
        };
        // Half the cheap answers pass, in each half of the prompts.
        let ps = make(|i| i % 4 < 2);
        let all: Vec<&Prompt> = ps.iter().collect();
        let c = same_rule(vec![(0.8, 0.6), (0.9, 0.7)], 0.65);
        let floor = Floor::QualityFloor(0.5);
        // Route alone sends all to the cheap model: half fail.
        let alone = flow_outcome(&all, Some(Flow::route(floor)), 2, &c);
        assert!((alone.quality - 0.5).abs() < 1e-12, "{alone:?}");
        // Verified at 0.5's threshold (the floor itself, below the table): 0.2 < 0.5 escalates
        // to the best. Cost 50 * 1 + 50 * (1 + 10) = 600 against 1000, at full quality.
        let v = Flow {
            floor,
            verify: VerifyMode::Always,
        };
        let o = flow_outcome(&all, Some(v), 2, &c);
        assert!(
            (o.quality - 1.0).abs() < 1e-12 && (o.saved - 0.4).abs() < 1e-12,
            "{o:?}"
        );
        // At quality_floor 0.92 Route picks the middle (p 0.92); at 0.92's threshold (above
        // the table: the floor itself) its 0.5 is rejected and the best answers: 4 + 10 a
        // prompt.
        let v92 = Flow {
            floor: Floor::QualityFloor(0.92),
            verify: VerifyMode::Always,
        };
        let o92 = flow_outcome(&all, Some(v92), 2, &c);
        assert!(
            (o92.quality - 1.0).abs() < 1e-12 && (o92.saved + 0.4).abs() < 1e-12,
            "{o92:?}"
        );
        // With no escalation allowed, Verify changes nothing: Route's pick ships.
        let none = Cascade {
            max_escalations: 0,
            ..c.clone()
        };
        let o0 = flow_outcome(&all, Some(v), 2, &none);
        assert_eq!((o0.saved, o0.quality), (alone.saved, alone.quality));
        // The pick: Route alone never keeps 98% here (its p do not tell the prompts apart);
        // the verified flow does.
        let picked = pick_flow(&all, &flows(true), 2, 0.98, &c).expect("a flow");
        assert_ne!(picked.verify, VerifyMode::Never, "{picked:?}");
        assert!(pick_flow(&all, &flows(false), 2, 0.98, &c).is_none());
        let three = |ps: &[Prompt]| {
            let names = vec!["cheap".into(), "mid".into(), "best".into()];
            recommend("s", names, 2, ps, 0.98, None, &c)
        };
        let r = three(&ps);
        // The top model's answer is never verified: its rows need none.
        assert!(r.verify != VerifyMode::Never && r.floor.is_some(), "{r:?}");
        assert!(r.other.is_none(), "Route alone keeps nothing: {r:?}");
        assert!(describe(&r, 0.98).contains(&format!(
            "and [gateway] verify = \"{}\"",
            if r.verify == VerifyMode::Always {
                "always"
            } else {
                "borderline"
            }
        )));
        assert!(r.verify_earned);
        // A row below the top without an answer: no verified flow is offered.
        let mut gap = ps.clone();
        gap[3].v[1] = None;
        let r = three(&gap);
        assert!(r.verify == VerifyMode::Never && r.floor.is_none(), "{r:?}");
        // Every passing cheap answer in half 0: picked there, the cheapest verified flow
        // ships them all (a low floor's threshold is low) and fails half 1. Verify is not
        // offered, though on all the prompts a verified flow saves 40% at full quality.
        let r = three(&make(|i| i % 2 == 0));
        assert!(!r.verify_earned && r.verify == VerifyMode::Never, "{r:?}");
        let (o, oo) = r.other.expect("the best verified flow, for comparison");
        assert!(o.verify != VerifyMode::Never && oo.quality >= 0.98, "{r:?}");
        assert!(describe(&r, 0.98).contains("(not offered: picked on one half"));
        // The served default is not picked on the prompts: where it verifies and holds, it
        // stays a choice. Relative 0.94 (0.893) routes to the cheap model, close to the line:
        // verified at the default threshold 0.65, the bad answers go to the best.
        let served = Flow {
            floor: Floor::RelativeFloor(0.94),
            verify: VerifyMode::Borderline,
        };
        let names = vec!["cheap".into(), "mid".into(), "best".into()];
        let r = recommend("s", names, 2, &make(|i| i % 2 == 0), 0.98, Some(served), &c);
        assert!(!r.verify_earned, "{r:?}");
        assert_eq!(
            (r.floor, r.verify),
            (Some(served.floor), served.verify),
            "{r:?}"
        );
        assert!((r.in_sample.saved - 0.4).abs() < 1e-12, "{r:?}");
        let text = describe(&r, 0.98);
        assert!(
            text.contains("the served default: nothing to change"),
            "{text}"
        );
        assert!(
            text.contains(&format!("± {:.1}%", 100.0 * r.in_sample.quality_se)),
            "{text}"
        );
    }

    /// `borderline` verifies only where Route's pick is within `verify_band` of the floor's
    /// line and a pricier model is rated above it, as `decide::decide_route` sets
    /// `verify_recommended`, and an empty answer at any hop, as the gateway does.
    #[test]
    fn borderline_verifies_close_picks_only() {
        let c = same_rule(vec![], 0.5);
        let prompt = |p0: f64| Prompt {
            half: 0,
            p: vec![p0, 0.99],
            v: vec![Some(0.1), Some(0.9)],
            empty: vec![false; 2],
            score: vec![0.0, 1.0],
            cost: vec![1.0, 10.0],
        };
        let flow = |verify| Flow {
            floor: Floor::QualityFloor(0.7),
            verify,
        };
        // p 0.75 is within 0.1 of the floor 0.7: verified (0.1 < 0.7's threshold, the floor
        // itself with an empty table) and escalated.
        assert_eq!(
            c.play(&prompt(0.75), flow(VerifyMode::Borderline)),
            (11.0, 1.0)
        );
        // p 0.85 is clear of it: the cheap answer ships unverified; `always` still verifies.
        assert_eq!(
            c.play(&prompt(0.85), flow(VerifyMode::Borderline)),
            (1.0, 0.0)
        );
        assert_eq!(c.play(&prompt(0.85), flow(VerifyMode::Always)), (11.0, 1.0));
        // Close to the floor, but the pricier model is rated below the pick: Verify could
        // not send the answer anywhere better (`decide::worth_verifying`), so it ships.
        let mut lower = prompt(0.75);
        lower.p[1] = 0.72;
        assert_eq!(c.play(&lower, flow(VerifyMode::Borderline)), (1.0, 0.0));
        // An empty answer goes on all the same, as the gateway sends it.
        lower.empty[0] = true;
        lower.v[0] = Some(0.0);
        assert_eq!(c.play(&lower, flow(VerifyMode::Borderline)), (11.0, 1.0));
        // Even under a configured Verify threshold of 0, as the server never ships it.
        let zero = Cascade {
            verify_threshold: Some(0.0),
            ..c.clone()
        };
        assert_eq!(zero.play(&lower, flow(VerifyMode::Borderline)), (11.0, 1.0));
        // ...and the answer it goes to is verified only as the gateway would: not here, where
        // Route did not ask for Verify and that answer is not empty (a low p_verify, 0.1,
        // would otherwise escalate it once more, to the top).
        let three = Prompt {
            half: 0,
            p: vec![0.75, 0.72, 0.70],
            v: vec![Some(0.0), Some(0.1), Some(0.9)],
            empty: vec![true, false, false],
            score: vec![0.0, 0.0, 1.0],
            cost: vec![1.0, 3.0, 10.0],
        };
        assert_eq!(c.play(&three, flow(VerifyMode::Borderline)), (4.0, 0.0));
        assert_eq!(c.play(&three, flow(VerifyMode::Always)), (14.0, 1.0));
        // A relative floor's line is r times the prompt's highest p: 0.9 * 0.99 = 0.891.
        let rel = Flow {
            floor: Floor::RelativeFloor(0.9),
            verify: VerifyMode::Borderline,
        };
        // 0.88 is below 0.891: the pick is the top model, with nothing above to escalate to.
        assert_eq!(c.play(&prompt(0.88), rel), (10.0, 1.0));
        // 0.9 clears it by 0.009: close, verified at the default threshold (0.5), escalated.
        assert_eq!(c.play(&prompt(0.9), rel), (11.0, 1.0));
    }

    /// A default that verifies, where the model Route rates highest is a worse one: Verify
    /// rejects the cheap model's right answers and ships the middle model's wrong ones. The
    /// summary says what the default's Verify cost.
    #[test]
    fn the_summary_says_when_the_defaults_verify_lowers_quality() {
        let ps: Vec<Prompt> = (0..80)
            .map(|i| Prompt {
                half: i % 2,
                p: vec![0.9, 0.95, 0.92],
                v: vec![Some(0.1), Some(0.9), None],
                empty: vec![false; 3],
                score: vec![1.0, 0.0, 1.0],
                cost: vec![1.0, 3.0, 10.0],
            })
            .collect();
        let c = same_rule(vec![], 0.5);
        let default = Flow {
            floor: Floor::RelativeFloor(0.94),
            verify: VerifyMode::Always,
        };
        let names = vec!["cheap".into(), "mid".into(), "top".into()];
        let r = recommend("s", names, 2, &ps, 0.98, Some(default), &c);
        let (_, o) = r.default.expect("the default");
        let w = r.default_without_verify.expect("it verifies");
        // 0.94 * 0.95 = 0.893: the cheap model; Verify rejects it and `mid` ships a fail.
        assert_eq!((w.quality, o.quality), (1.0, 0.0), "{r:?}");
        let text = describe(&r, 0.98);
        assert!(
            text.contains("note: the default's Verify lowered quality here (100.0% without it)"),
            "{text}"
        );
        // Route alone keeps it all: the recommendation does not verify.
        assert_eq!(r.verify, VerifyMode::Never, "{r:?}");
        // A default that does not verify has nothing to compare.
        let never = Flow::route(Floor::RelativeFloor(0.94));
        let names = vec!["cheap".into(), "mid".into(), "top".into()];
        let r = recommend("s", names, 2, &ps, 0.98, Some(never), &c);
        assert!(r.default_without_verify.is_none());
        assert!(!describe(&r, 0.98).contains("note: the default's Verify"));
    }

    /// The threshold is the one the server would use: the config's `verify_threshold` first,
    /// else the quality floor's own from the table of the heads that scored the prompt's half,
    /// else (a relative floor) their default.
    #[test]
    fn each_half_is_verified_by_its_own_heads_rule() {
        let rules = [
            VerifyRule {
                table: vec![(0.9, 0.3)],
                default: 0.1,
            },
            VerifyRule {
                table: vec![(0.9, 0.6)],
                default: 0.7,
            },
        ];
        let c = Cascade {
            rules,
            verify_threshold: None,
            verify_band: 0.1,
            max_escalations: 2,
        };
        let q = Floor::QualityFloor(0.9);
        let r = Floor::RelativeFloor(0.9);
        assert_eq!(c.threshold(0, q), 0.3);
        assert_eq!(c.threshold(1, q), 0.6);
        assert_eq!(c.threshold(0, r), 0.1);
        assert_eq!(c.threshold(1, r), 0.7);
        let set = Cascade {
            verify_threshold: Some(0.42),
            ..c.clone()
        };
        assert_eq!(set.threshold(1, q), 0.42);
        // A cheap answer at p_verify 0.5 ships on half 0 (0.5 >= 0.3) and escalates on half 1.
        let ps: Vec<Prompt> = (0..2)
            .map(|half| Prompt {
                half,
                p: vec![0.95, 0.97],
                v: vec![Some(0.5), Some(0.9)],
                empty: vec![false; 2],
                score: vec![0.0, 1.0],
                cost: vec![1.0, 10.0],
            })
            .collect();
        let flow = Flow {
            floor: q,
            verify: VerifyMode::Always,
        };
        assert_eq!(c.play(&ps[0], flow), (1.0, 0.0));
        assert_eq!(c.play(&ps[1], flow), (11.0, 1.0));
        // An empty answer's p is 0 (`cross_fitted`): it never ships below the top.
        let mut empty = ps[0].clone();
        empty.v[0] = Some(0.0);
        assert_eq!(c.play(&empty, flow), (11.0, 1.0));
    }

    #[test]
    fn no_floor_when_the_cheap_model_never_holds_quality() {
        let ps: Vec<Prompt> = (0..60)
            .map(|i| prompt(i % 2, [0.99, 0.5], [0.0, 1.0]))
            .collect();
        let all: Vec<&Prompt> = ps.iter().collect();
        assert_eq!(pick(&all, &Floor::grid(), 1, 0.98), None);
        let r = recommend(
            "s",
            vec!["cheap".into(), "best".into()],
            1,
            &ps,
            0.98,
            None,
            &Cascade::default(),
        );
        assert!(r.floor.is_none());
        assert!(describe(&r, 0.98).contains("recommended: no floor"));
        // Each half's pick is none too, so the other half keeps all of the best's quality.
        assert!(r
            .crossed
            .iter()
            .all(|c| c.floor.is_none() && c.held.quality == 1.0));
    }

    /// A row's p comes from heads calibrated on the other half only: flipping every label of
    /// one half leaves that half's p as they were and moves the other half's.
    #[test]
    fn a_rows_p_never_reads_its_own_half() -> Result<()> {
        let heads = crate::eval::score::tests::trained_heads()?;
        let (dim, n) = (heads.dim, 200);
        let mut rows = Vec::new();
        for i in 0..n {
            for (j, model) in ["brand-new-a", "brand-new-b"].iter().enumerate() {
                rows.push(Row {
                    source: "s".into(),
                    task: None,
                    prompt_id: format!("q{i}"),
                    prompt: format!("question {i}"),
                    model: model.to_string(),
                    score: Some(((i * 7 + j * 3) % 5 < 2 + j) as u8 as f64),
                    response: None,
                    cost_usd: Some(1.0 + j as f64),
                    prompt_tokens: None,
                    response_tokens: None,
                    line: 0,
                });
            }
        }
        let f = RowFeatures {
            dim,
            prompt_emb: (0..n * dim)
                .map(|k| (((k * 2_654_435_761) % 1000) as f32 / 1000.0) - 0.5)
                .collect(),
            prompt_of_row: (0..2 * n).map(|r| r / 2).collect(),
            answer_of_row: vec![None; 2 * n],
            answer_emb: Vec::new(),
            answer_truncated: Vec::new(),
            answer_empty: Vec::new(),
        };
        let before = cross_fitted(&heads, &rows, &f)?.p;
        let mut flipped = rows.clone();
        for r in flipped.iter_mut().filter(|r| half_of(&r.prompt_id) == 0) {
            r.score = r.score.map(|s| 1.0 - s);
        }
        let after = cross_fitted(&heads, &flipped, &f)?.p;
        assert!(before.iter().all(|p| p.is_finite()));
        let mut moved = 0;
        for (i, r) in rows.iter().enumerate() {
            if half_of(&r.prompt_id) == 0 {
                assert_eq!(before[i], after[i], "row {i}");
            } else if before[i] != after[i] {
                moved += 1;
            }
        }
        assert!(moved > 0, "the other half reads the flipped labels");
        Ok(())
    }

    #[test]
    fn candidates_need_a_row_for_nearly_every_prompt() {
        let row = |pid: usize, model: &str, score: f64, cost: f64| Row {
            source: "s".into(),
            task: None,
            prompt_id: format!("q{pid}"),
            prompt: format!("question {pid}"),
            model: model.into(),
            score: Some(score),
            response: None,
            cost_usd: Some(cost),
            prompt_tokens: None,
            response_tokens: None,
            line: 0,
        };
        let mut rows = Vec::new();
        for i in 0..80 {
            rows.push(row(i, "cheap", 0.0, 1.0));
            rows.push(row(i, "best", 1.0, 5.0));
            if i < 10 {
                rows.push(row(i, "rare", 1.0, 0.1));
            }
        }
        let refs: Vec<&Row> = rows.iter().collect();
        let p = vec![0.5; rows.len()];
        let v = vec![None; rows.len()];
        let (cands, best, prompts) = prompts_of(&refs, &p, &v).expect("two candidates");
        assert_eq!(
            cands,
            ["cheap", "best"],
            "cheapest first; `rare` answers 10 of 80"
        );
        assert_eq!(best, 1);
        assert_eq!(prompts.len(), 80);
        assert!(
            prompts_of(&refs[..60], &p[..60], &v[..60]).is_none(),
            "25 prompts are too few"
        );
    }
}
