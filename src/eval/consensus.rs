//! `tiergate consensus`: from labelled rows of one's own traffic (every model's answer to the
//! same prompts), which cheap models to ask together for the gateway's consensus policy
//! (`[gateway.policies.<name>] consensus = { models, agree }`), and what it saved there. The
//! rule is `service::decide::consensus`, the one the gateway runs; the candidates and the pick
//! are `scripts/protocol.py`'s: models covering >= 95% of the prompts whose mean cost is under
//! half the best model's, the six best-scoring, every pair (both agree) and triple (all three,
//! or two of three); the pick is the largest saving that keeps `target` of the best model's
//! quality. A disagreement is settled, as in the gateway, by the dearest model (where that is
//! not the best-scoring one, the report says so). Alongside the pick on all rows it reports a cross-fitted figure (picked on one half
//! of the prompts, measured on the other, both ways), the one to trust: picks on a few hundred
//! prompts flatter themselves. No encoder, no heads: it reads costs, scores and answers.
#![forbid(unsafe_code)]
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::Serialize;

use super::data::{read_rows, Row};
use super::replay::covering;
use super::util::half_of;
use crate::config::MAX_CONSENSUS_MODELS;
use crate::model::answer::final_answer;
use crate::service::decide;

/// Candidates probe sets are drawn from, the best-scoring first.
const CANDIDATES: usize = 6;

#[derive(Debug, Clone, clap::Args)]
pub struct ConsensusArgs {
    /// Labelled rows (prompt_id, prompt, model, score in [0,1], cost_usd, response) in the data
    /// schema; each `source` is judged as its own traffic.
    #[arg(long)]
    pub data: PathBuf,
    /// Quality to keep, as a share of the best model's mean score.
    #[arg(long, default_value_t = 0.98)]
    pub target: f64,
    /// A cross-fitted half's saving counts only where its quality held this share.
    #[arg(long, default_value_t = 0.97)]
    pub hold: f64,
    /// Write the report as JSON here too.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A probe set and how many must agree (`ConsensusConfig`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeSet {
    pub models: Vec<String>,
    pub agree: usize,
}

/// A policy's outcome on some prompts, against always calling the best model.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// `None`: always the best model (no probe set kept the quality).
    pub pick: Option<ProbeSet>,
    pub saving: f64,
    pub quality_ratio: f64,
    pub prompts: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub source: String,
    pub prompts: usize,
    pub best_model: String,
    /// The dearest model, which settles a disagreement (the gateway's most expensive
    /// candidate); the best model when that is the dearest.
    pub top_model: String,
    pub candidates: Vec<String>,
    /// Picked and measured on all prompts (in-sample).
    pub in_sample: Outcome,
    /// Picked on half A, measured on B, and the other way round.
    pub halves: [Outcome; 2],
    /// The halves' savings, each counted only where its quality held `hold`; their mean.
    pub cross_fitted_saving: f64,
}

/// One prompt's rows: (score, cost, final answer) by model, the final answer read once
/// (`model::answer::final_answer`) for every probe set judged on it.
struct Prompt {
    half: usize,
    rows: HashMap<String, (f64, f64, Option<String>)>,
}

/// The models a replay calls beside the probes: `best` (the highest mean score), the one
/// always calling it is measured against; `top` (the highest mean cost), the one the gateway
/// calls on a disagreement (its most expensive candidate).
#[derive(Clone, Copy)]
struct Ends<'a> {
    best: &'a str,
    top: &'a str,
}

impl Prompt {
    /// (cost, score) of consensus `s` on this prompt, the top model's call on disagreement;
    /// None unless every call it may make has a row (a call without one cannot be paid for).
    fn play(&self, s: &ProbeSet, top: &str) -> Option<(f64, f64)> {
        let (b_score, b_cost, _) = self.rows.get(top)?;
        let got: Vec<&(f64, f64, Option<String>)> = s
            .models
            .iter()
            .map(|m| self.rows.get(m))
            .collect::<Option<_>>()?;
        let cost: f64 = got.iter().map(|r| r.1).sum();
        let keys: Vec<Option<&str>> = got.iter().map(|r| r.2.as_deref()).collect();
        Some(match decide::consensus_of(&keys, s.agree) {
            Some(i) => (cost, got[i].0),
            None => (cost + b_cost, *b_score),
        })
    }
}

/// Mean (cost, score) of the best model alone and of consensus `s` (the best alone again for
/// `None`), over the prompts of `ps` where both can be replayed: the two are averaged over the
/// same prompts. Also that number of prompts.
fn paired(ps: &[&Prompt], s: Option<&ProbeSet>, ends: Ends<'_>) -> ((f64, f64), (f64, f64), usize) {
    let (mut base, mut pol, mut n) = ((0.0, 0.0), (0.0, 0.0), 0usize);
    for p in ps {
        let Some(&(bq, bc, _)) = p.rows.get(ends.best) else {
            continue;
        };
        let r = match s {
            Some(s) => p.play(s, ends.top),
            None => Some((bc, bq)),
        };
        if let Some((pc, pq)) = r {
            base = (base.0 + bc, base.1 + bq);
            pol = (pol.0 + pc, pol.1 + pq);
            n += 1;
        }
    }
    let d = n.max(1) as f64;
    ((base.0 / d, base.1 / d), (pol.0 / d, pol.1 / d), n)
}

fn outcome(ps: &[&Prompt], s: Option<&ProbeSet>, ends: Ends<'_>) -> Outcome {
    let ((bc, bq), (c, q), n) = paired(ps, s, ends);
    Outcome {
        pick: s.cloned(),
        saving: if bc > 0.0 { 1.0 - c / bc } else { 0.0 },
        quality_ratio: if bq > 0.0 { q / bq } else { 1.0 },
        prompts: n,
    }
}

/// The probe set with the largest saving keeping `target` of the best model's quality on `ps`
/// (ties: the higher quality, then the later set, as protocol.py's pick); `None` when none
/// beats the best model alone, or there is nothing to judge on.
fn pick<'a>(
    ps: &[&Prompt],
    sets: &'a [ProbeSet],
    ends: Ends<'_>,
    target: f64,
) -> Option<&'a ProbeSet> {
    if ps.is_empty() {
        return None;
    }
    // Always calling the best model: saving 0, quality 1, the candidate to beat.
    let (mut sv, mut rv, mut chosen) = (0.0, 1.0, None);
    for s in sets {
        let ((bc, bq), (c, q), n) = paired(ps, Some(s), ends);
        if n == 0 || bc <= 0.0 || bq <= 0.0 {
            continue;
        }
        let (saving, ratio) = (1.0 - c / bc, q / bq);
        let beats =
            saving > sv || (saving == sv && (ratio > rv || (ratio == rv && chosen.is_some())));
        if q >= target * bq && beats {
            (sv, rv, chosen) = (saving, ratio, Some(s));
        }
    }
    chosen
}

/// The probe sets of `scripts/protocol.py`'s `consensus_sets`, cheapest model first in each.
fn probe_sets(cands: &[String]) -> Vec<ProbeSet> {
    let mut sets = Vec::new();
    let n = cands.len();
    for a in 0..n {
        for b in a + 1..n {
            sets.push(ProbeSet {
                models: vec![cands[a].clone(), cands[b].clone()],
                agree: 2,
            });
        }
    }
    for a in 0..n {
        for b in a + 1..n {
            for c in b + 1..n {
                for agree in [3, 2] {
                    let models = vec![cands[a].clone(), cands[b].clone(), cands[c].clone()];
                    sets.push(ProbeSet { models, agree });
                }
            }
        }
    }
    debug_assert!(sets.iter().all(|s| s.models.len() <= MAX_CONSENSUS_MODELS));
    sets
}

/// The report for one source's rows.
pub fn judge(source: &str, rows: &[&Row], target: f64, hold: f64) -> Option<SourceReport> {
    let mut prompts: BTreeMap<&str, Prompt> = BTreeMap::new();
    for r in rows {
        // `run` refuses rows without them (`check_labelled`); a library caller's are skipped.
        let (Some(score), Some(cost)) = (r.score, r.cost_usd) else {
            continue;
        };
        let p = prompts.entry(&r.prompt_id).or_insert_with(|| Prompt {
            half: half_of(&r.prompt_id),
            rows: HashMap::new(),
        });
        let key = r
            .response
            .as_deref()
            .and_then(|a| final_answer(&r.prompt, a));
        p.rows.insert(r.model.clone(), (score, cost, key));
    }
    // (model, mean cost, mean score) of the models that answer nearly every prompt, a repeated
    // row counting once.
    let covered = covering(prompts.values().map(|p| {
        p.rows
            .iter()
            .map(|(m, &(score, cost, _))| (m.as_str(), score, cost))
    }));
    // The best model: the highest mean score, the cheaper on ties.
    let best = covered
        .iter()
        .max_by(|a, b| a.2.total_cmp(&b.2).then(b.1.total_cmp(&a.1)))?;
    // The dearest: the higher score on ties.
    let top = covered
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1).then(a.2.total_cmp(&b.2)))?;
    let ends = Ends {
        best: best.0,
        top: top.0,
    };
    let mut cands: Vec<&(&str, f64, f64)> = covered
        .iter()
        .filter(|m| m.0 != best.0 && m.1 < 0.5 * best.1)
        .collect();
    // Ties by name, descending, as protocol.py's sort.
    cands.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.0.cmp(a.0)));
    cands.truncate(CANDIDATES);
    // Cheapest first, as the gateway asks them.
    cands.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(b.0)));
    let cands: Vec<String> = cands.iter().map(|m| m.0.to_string()).collect();
    let sets = probe_sets(&cands);
    let all: Vec<&Prompt> = prompts.values().collect();
    let half = |h: usize| -> Vec<&Prompt> { all.iter().copied().filter(|p| p.half == h).collect() };
    let (a, b) = (half(0), half(1));
    let across = |on: &[&Prompt], to: &[&Prompt]| outcome(to, pick(on, &sets, ends, target), ends);
    let halves = [across(&a, &b), across(&b, &a)];
    let counted = |o: &Outcome| {
        if o.quality_ratio >= hold {
            o.saving
        } else {
            0.0
        }
    };
    Some(SourceReport {
        source: source.to_string(),
        prompts: prompts.len(),
        best_model: best.0.to_string(),
        top_model: top.0.to_string(),
        candidates: cands,
        in_sample: outcome(&all, pick(&all, &sets, ends, target), ends),
        cross_fitted_saving: (counted(&halves[0]) + counted(&halves[1])) / 2.0,
        halves,
    })
}

pub fn run(a: ConsensusArgs) -> Result<()> {
    let share = |v: f64| v > 0.0 && v <= 1.5;
    if !(share(a.target) && share(a.hold)) {
        bail!("--target and --hold are shares of the best model's quality, in (0, 1.5]");
    }
    // read_rows refuses scores outside [0, 1]; a row without a score or with a bad cost is
    // refused as `eval` refuses it, not skipped.
    let rows = read_rows(&a.data)?;
    super::data::check_labelled(&rows, &a.data)?;
    let mut by_source: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in &rows {
        by_source.entry(&r.source).or_default().push(r);
    }
    let mut reports = Vec::new();
    for (src, rs) in &by_source {
        match judge(src, rs, a.target, a.hold) {
            Some(rep) => {
                print_report(&rep, a.target);
                reports.push(rep);
            }
            None => {
                println!("{src}: no model answers >= 95% of its prompts")
            }
        }
    }
    if let Some(out) = &a.out {
        let text = serde_json::to_string_pretty(&reports)?;
        std::fs::write(out, text + "\n")
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    }
    Ok(())
}

fn print_report(r: &SourceReport, target: f64) {
    let fmt = |o: &Outcome| match &o.pick {
        Some(s) => format!(
            "{} (agree {}): saved {:.1}% at {:.1}% quality",
            s.models.join(" + "),
            s.agree,
            100.0 * o.saving,
            100.0 * o.quality_ratio
        ),
        None => format!("always {}: nothing saved", r.best_model),
    };
    println!(
        "{}: {} prompts, best model {}, candidates {}",
        r.source,
        r.prompts,
        r.best_model,
        r.candidates.join(", ")
    );
    if r.top_model != r.best_model {
        println!(
            "  a disagreement goes to the dearest model, {} (as the gateway's most expensive \
             candidate), not to {}: leave {} out of the catalog to have {} settle them",
            r.top_model, r.best_model, r.top_model, r.best_model
        );
    }
    println!("  picked on all prompts: {}", fmt(&r.in_sample));
    for (name, o) in ["A -> B", "B -> A"].iter().zip(&r.halves) {
        println!("  picked on half {name}: {}", fmt(o));
    }
    println!(
        "  cross-fitted saving {:.1}% (a half counts where its quality held), target {:.0}%",
        100.0 * r.cross_fitted_saving,
        100.0 * target
    );
    match &r.in_sample.pick {
        Some(s) if r.cross_fitted_saving > 0.0 => {
            let models: Vec<String> = s.models.iter().map(|m| format!("{m:?}")).collect();
            println!(
                "  [gateway.policies.vote]\n  consensus = {{ models = [{}], agree = {} }}",
                models.join(", "),
                s.agree
            );
        }
        _ => println!("  consensus does not pay on this traffic: route or cascade it instead"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pid: usize, model: &str, score: f64, cost: f64, answer: &str) -> Row {
        Row {
            source: "mcq".into(),
            task: None,
            prompt_id: format!("p{pid}"),
            prompt: format!("Question {pid}?\nA) one\nB) two\nC) three\nAnswer:"),
            model: model.into(),
            score: Some(score),
            response: Some(answer.into()),
            cost_usd: Some(cost),
            prompt_tokens: None,
            response_tokens: None,
            line: 0,
        }
    }

    /// Two cheap models that agree on 80% of prompts and are right then; the best model is
    /// always right and costs 10x both together.
    fn traffic(free_text: bool) -> Vec<Row> {
        let mut rows = Vec::new();
        for i in 0..400 {
            let agree = i % 5 != 0;
            let (a, b) = if free_text {
                ("it is two", "it is two")
            } else if agree {
                ("The answer is (B).", "B")
            } else {
                ("(A)", "(C)")
            };
            let right = if agree { 1.0 } else { 0.0 };
            rows.push(row(i, "cheap-a", right, 1.0, a));
            rows.push(row(i, "cheap-b", right, 1.0, b));
            rows.push(row(i, "weak", 0.0, 0.5, "(C)"));
            rows.push(row(i, "best", 1.0, 20.0, "B"));
        }
        rows
    }

    #[test]
    fn picks_the_pair_that_agrees_and_counts_every_call() {
        let rows = traffic(false);
        let refs: Vec<&Row> = rows.iter().collect();
        let r = judge("mcq", &refs, 0.98, 0.97).unwrap();
        assert_eq!(r.best_model, "best");
        assert_eq!(
            r.candidates,
            ["weak", "cheap-a", "cheap-b"],
            "cheapest first"
        );
        let pick = r.in_sample.pick.clone().unwrap();
        assert_eq!(pick.models, ["cheap-a", "cheap-b"]);
        assert_eq!(pick.agree, 2);
        // Agreed (80%): 2 paid; else 2 + 20. Mean 0.8 * 2 + 0.2 * 22 = 6 against 20.
        assert!(
            (r.in_sample.saving - 0.7).abs() < 1e-12,
            "{}",
            r.in_sample.saving
        );
        assert!((r.in_sample.quality_ratio - 1.0).abs() < 1e-12);
        assert!(r.halves.iter().all(|h| h.pick.as_ref() == Some(&pick)));
        assert!(
            (r.cross_fitted_saving - 0.7).abs() < 0.02,
            "{}",
            r.cross_fitted_saving
        );
    }

    /// Coverage counts prompts: a model that answers half of them, each twice, is not a
    /// candidate.
    #[test]
    fn repeated_rows_do_not_make_a_model_cover_the_prompts() {
        let mut rows = traffic(false);
        for i in 0..200 {
            for _ in 0..2 {
                rows.push(row(i, "half", 1.0, 0.1, "B"));
            }
        }
        let refs: Vec<&Row> = rows.iter().collect();
        let r = judge("mcq", &refs, 0.98, 0.97).unwrap();
        assert!(
            !r.candidates.iter().any(|c| c == "half"),
            "{:?}",
            r.candidates
        );
        assert_eq!(r.candidates, ["weak", "cheap-a", "cheap-b"]);
    }

    /// On disagreement the gateway calls its most expensive candidate, not the best-scoring
    /// one: where they differ the replay pays and scores that call.
    #[test]
    fn a_disagreement_calls_the_dearest_model_as_the_gateway_does() {
        let mut rows = traffic(false);
        for i in 0..400 {
            // Dearer than `best` and wrong on every prompt.
            rows.push(row(i, "dear", 0.0, 40.0, "(A)"));
        }
        let refs: Vec<&Row> = rows.iter().collect();
        let r = judge("mcq", &refs, 0.98, 0.97).unwrap();
        assert_eq!(r.best_model, "best");
        assert_eq!(r.top_model, "dear");
        // The pair that saves 70% at full quality when `best` settles its disagreements keeps
        // only 80% when `dear` does: no probe set holds 98%.
        assert!(r.in_sample.pick.is_none(), "{:?}", r.in_sample);
        assert_eq!(r.cross_fitted_saving, 0.0);
    }

    /// Where the best model has no row, the replay cannot say what always calling it would
    /// score: those prompts leave both sides, not the baseline alone (the policy's losses on
    /// them were set against a baseline that never saw them).
    #[test]
    fn policy_and_baseline_are_averaged_over_the_same_prompts() {
        let mut rows = traffic(false);
        let gone: Vec<usize> = (1..400).filter(|i| i % 5 != 0).take(10).collect();
        rows.retain(|r| {
            let pid: usize = r.prompt_id[1..].parse().unwrap();
            !(r.model == "best" && gone.contains(&pid))
        });
        for r in rows.iter_mut() {
            let pid: usize = r.prompt_id[1..].parse().unwrap();
            if r.model.starts_with("cheap") && gone.contains(&pid) {
                r.score = Some(0.0);
            }
        }
        for i in 0..400 {
            // Dearest, on every prompt: it settles disagreements; wrong once.
            rows.push(row(i, "dear", if i == 0 { 0.0 } else { 1.0 }, 40.0, "B"));
        }
        let refs: Vec<&Row> = rows.iter().collect();
        let r = judge("mcq", &refs, 0.98, 0.97).unwrap();
        assert_eq!(
            (r.best_model.as_str(), r.top_model.as_str()),
            ("best", "dear")
        );
        let pick = r
            .in_sample
            .pick
            .as_ref()
            .expect("the pair holds on the shared prompts");
        assert_eq!(pick.models, ["cheap-a", "cheap-b"]);
        assert_eq!(r.in_sample.prompts, 390);
        assert!(r.in_sample.quality_ratio > 0.99, "{:?}", r.in_sample);
    }

    #[test]
    fn answers_without_a_final_answer_never_agree() {
        let rows = traffic(true);
        let refs: Vec<&Row> = rows.iter().collect();
        let r = judge("mcq", &refs, 0.98, 0.97).unwrap();
        assert!(r.in_sample.pick.is_none(), "{:?}", r.in_sample.pick);
        assert_eq!(r.in_sample.saving, 0.0);
        assert_eq!(r.cross_fitted_saving, 0.0);
    }

    #[test]
    fn a_quality_target_the_pair_misses_keeps_the_best_model() {
        // The agreed answers are wrong on a tenth of all prompts: quality 0.7 + 0.2 = 0.9.
        let mut rows = traffic(false);
        for r in rows.iter_mut() {
            let pid: usize = r.prompt_id[1..].parse().unwrap();
            if r.model.starts_with("cheap") && pid % 10 == 1 {
                r.score = Some(0.0);
            }
        }
        let refs: Vec<&Row> = rows.iter().collect();
        let r = judge("mcq", &refs, 0.98, 0.97).unwrap();
        assert!(r.in_sample.pick.is_none(), "{:?}", r.in_sample.pick);
        let lax = judge("mcq", &refs, 0.85, 0.85).unwrap();
        assert!(lax.in_sample.pick.is_some());
    }
}
