//! `tiergate eval`: replays a labelled dataset through the heads and reports, per source, the
//! cost–quality curves of route-only, cascade and kNN-baseline policies over a realistic model
//! tier, against each single model and the oracle; the cost saved at 98% of the best model's
//! quality; RouteLLM's APGR and CPT(50%) on a cheap/strong pair; and router / verifier figures.
//!
//! Quality is the mean score, cost the mean `cost_usd` of the models called, both from the rows:
//! nothing is estimated except the decisions.
#![forbid(unsafe_code)]
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::data::{read_rows, Row};
use super::embed::{Embedder, RowFeatures};
use super::fit;
use super::knn::KnnIndex;
use super::plot;
use super::score::{encoder_for, score_with, EncoderArgs};
use super::util::{hash_str, judge_gaming};
use crate::model::heads::Heads;
pub use crate::service::decide::{cascade_stop, route_pick, utility_pick};

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Labelled rows to replay (JSONL or JSONL.gz with score and cost_usd), e.g. the dev split.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "models/heads.json")]
    pub heads: PathBuf,
    /// Training rows: the kNN baseline's neighbours and the statistics that pick the tiers.
    #[arg(long, default_value = "../shared/data/train.jsonl.gz")]
    pub train: PathBuf,
    /// eval.json and curves-<source>.svg are written here.
    #[arg(long, default_value = "eval-out")]
    pub out_dir: PathBuf,
    #[arg(long, default_value = "models/cache")]
    pub cache_dir: PathBuf,
    /// Replay at most this many prompts per source (seeded choice); 0 = all.
    #[arg(long, default_value_t = 0)]
    pub max_prompts: usize,
    /// Only this source of the data.
    #[arg(long)]
    pub source: Option<String>,
    /// Leave this source's training prompts out of the kNN baseline (leave-one-source-out).
    #[arg(long)]
    pub knn_exclude_source: Option<String>,
    /// kNN neighbours.
    #[arg(long, default_value_t = 20)]
    pub k: usize,
    /// Training prompts per source the kNN baseline searches (seeded choice); 0 = all.
    #[arg(long, default_value_t = 0)]
    pub knn_max_train_prompts: usize,
    #[arg(long, default_value_t = 20261124)]
    pub seed: u64,
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

/// Share of a source's prompts a model must have rows for to be a tier candidate (MMLU-Pro's
/// gemini models miss a handful of questions and are still the realistic choices).
pub(super) const MIN_COVERAGE: f64 = 0.95;
/// Models priced strictly between the cheap and the strong one that join the tier.
const MAX_MIDS: usize = 2;
/// Fraction of the best tier model's quality the cost-reduction figure asks for.
pub const TARGET: f64 = 0.98;
/// Route's floor for heads trained before the floor was learned.
pub use crate::model::heads::FALLBACK_FLOOR;

/// (model, mean cost, mean score) of a tier candidate.
#[derive(Debug, Clone)]
pub struct ModelStat {
    pub model: String,
    pub cost: f64,
    pub score: f64,
}

/// The tier rule: strong = best mean score (cheaper on ties); cheap = the cheapest model
/// scoring at least half of the strong one (nobody deploys a model that fails most of what
/// the strong one passes); plus up to MAX_MIDS best-scoring models priced strictly between.
/// Returned in price order (cheap first, strong last). Indexes into `stats`.
pub fn choose_tier(stats: &[ModelStat]) -> Vec<usize> {
    let Some(strong) = (0..stats.len()).min_by(|&a, &b| {
        stats[b]
            .score
            .total_cmp(&stats[a].score)
            .then(stats[a].cost.total_cmp(&stats[b].cost))
    }) else {
        return vec![];
    };
    let Some(cheap) = (0..stats.len())
        .filter(|&i| stats[i].score >= 0.5 * stats[strong].score)
        .min_by(|&a, &b| stats[a].cost.total_cmp(&stats[b].cost))
    else {
        return vec![strong];
    };
    let mut mids: Vec<usize> = (0..stats.len())
        .filter(|&i| stats[i].cost > stats[cheap].cost && stats[i].cost < stats[strong].cost)
        .collect();
    mids.sort_by(|&a, &b| stats[b].score.total_cmp(&stats[a].score));
    mids.truncate(MAX_MIDS);
    let mut tier = vec![cheap];
    tier.extend(mids);
    if strong != cheap {
        tier.push(strong);
    }
    tier.sort_by(|&a, &b| stats[a].cost.total_cmp(&stats[b].cost));
    tier
}

/// Smallest cost at which a cost–quality curve reaches quality `q`: any point at or above it,
/// or the linear mix of two cost-adjacent points that crosses it. None if it never does.
pub fn cost_at_quality(points: &[(f64, f64)], q: f64) -> Option<f64> {
    let mut p: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut best: Option<f64> = None;
    let mut take = |c: f64| best = Some(best.map_or(c, |b: f64| b.min(c)));
    for (i, &(c, quality)) in p.iter().enumerate() {
        if quality >= q {
            take(c);
        }
        if let Some(&(c2, q2)) = p.get(i + 1) {
            if quality < q && q2 >= q {
                take(c + (q - quality) / (q2 - quality) * (c2 - c));
            }
        }
    }
    best
}

/// RouteLLM's figures for a cheap/strong pair. Prompts go to the strong model in descending
/// `rank`; PGR(x) = (quality with a share x sent to strong − weak) / (strong − weak).
#[derive(Debug, Clone, PartialEq)]
pub struct Pgr {
    /// Area under PGR vs share of calls to strong, over [0, 1] (trapezoids).
    pub apgr: f64,
    /// Share of calls to strong (0–1) at which PGR first reaches 0.5 (interpolated).
    pub cpt50: Option<f64>,
    /// (share to strong, PGR) at every distinct rank value (ties are sent together, so the
    /// straight segment between boundaries is the expectation over tie-breaking).
    pub curve: Vec<(f64, f64)>,
}

pub fn pgr(rank: &[f64], weak: &[f64], strong: &[f64]) -> Option<Pgr> {
    let n = rank.len();
    if n == 0 || weak.len() != n || strong.len() != n {
        return None;
    }
    let (qw, qs) = (
        weak.iter().sum::<f64>() / n as f64,
        strong.iter().sum::<f64>() / n as f64,
    );
    let gap = qs - qw;
    if gap <= 1e-12 {
        return None;
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| rank[b].total_cmp(&rank[a]));
    let mut curve = vec![(0.0, 0.0)];
    let mut gain = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        // Ties by total order: `==` never holds for NaN, and the loop would not advance.
        while j < n && rank[idx[j]].total_cmp(&rank[idx[i]]).is_eq() {
            gain += strong[idx[j]] - weak[idx[j]];
            j += 1;
        }
        curve.push((j as f64 / n as f64, gain / n as f64 / gap));
        i = j;
    }
    let apgr = curve
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0)
        .sum();
    let cpt50 = curve.windows(2).find_map(|w| {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        (y1 >= 0.5 && y0 < 0.5).then(|| x0 + (0.5 - y0) / (y1 - y0) * (x1 - x0))
    });
    Some(Pgr { apgr, cpt50, curve })
}

/// One source's replay: prompts × tier models (price order), row-major.
pub struct Replay {
    pub m: usize,
    pub score: Vec<f64>,
    pub cost: Vec<f64>,
    pub route: Vec<f64>,
    pub verify: Vec<Option<f64>>,
    pub knn: Vec<f64>,
}

#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub param: f64,
    pub cost: f64,
    pub quality: f64,
    pub pass_rate: f64,
    /// Mean number of models called per prompt.
    pub calls: f64,
}

impl Point {
    fn json(&self) -> Value {
        json!({ "param": self.param, "cost": self.cost, "quality": self.quality,
                "pass_rate": self.pass_rate, "calls": self.calls })
    }
}

impl Replay {
    pub fn n(&self) -> usize {
        self.score.len() / self.m.max(1)
    }

    fn row<'a, T>(&self, v: &'a [T], i: usize) -> &'a [T] {
        &v[i * self.m..(i + 1) * self.m]
    }

    /// Mean cost / score when prompt i calls models `called(i)` and ships `shipped(i)`.
    fn point(&self, param: f64, mut plan: impl FnMut(usize) -> (usize, usize)) -> Point {
        let n = self.n().max(1) as f64;
        let (mut cost, mut q, mut pass, mut calls) = (0.0, 0.0, 0.0, 0.0);
        for i in 0..self.n() {
            let (first, shipped) = plan(i);
            let c = self.row(&self.cost, i);
            cost += c[first..=shipped].iter().sum::<f64>();
            calls += (shipped + 1 - first) as f64;
            let s = self.row(&self.score, i)[shipped];
            q += s;
            pass += if s >= 0.5 { 1.0 } else { 0.0 };
        }
        Point {
            param,
            cost: cost / n,
            quality: q / n,
            pass_rate: pass / n,
            calls: calls / n,
        }
    }

    pub fn single(&self, j: usize) -> Point {
        self.point(f64::NAN, |_| (j, j))
    }

    /// Per prompt the cheapest passing model (by its actual cost), else the cheapest model.
    pub fn oracle(&self) -> Point {
        self.point(f64::NAN, |i| {
            let (s, c) = (self.row(&self.score, i), self.row(&self.cost, i));
            let by_cost = |a: &usize, b: &usize| c[*a].total_cmp(&c[*b]);
            let j = (0..self.m)
                .filter(|&j| s[j] >= 0.5)
                .min_by(by_cost)
                .or_else(|| (0..self.m).min_by(by_cost))
                .unwrap_or(0);
            (j, j)
        })
    }

    /// Route-only over a grid of a policy's parameter: one call per prompt, to the model
    /// `pick(p of the prompt's models, parameter)` chooses, with p from `p` (router or kNN).
    fn pick_curve(
        &self,
        p: &[f64],
        grid: &[f64],
        pick: impl Fn(&[f64], f64) -> usize,
    ) -> Vec<Point> {
        grid.iter()
            .map(|&x| {
                self.point(x, |i| {
                    let j = pick(self.row(p, i), x);
                    (j, j)
                })
            })
            .collect()
    }

    /// Route-only over a grid of floors.
    pub fn route_curve(&self, p: &[f64], grid: &[f64]) -> Vec<Point> {
        self.pick_curve(p, grid, route_pick)
    }

    /// Route-only by utility over a grid of cost weights λ, with each model's expected cost
    /// `cost` (its training mean: known before the call).
    pub fn utility_curve(&self, p: &[f64], cost: &[f64], lambdas: &[f64]) -> Vec<Point> {
        self.pick_curve(p, lambdas, |row, l| utility_pick(row, cost, l))
    }

    /// Cascade over a grid of thresholds, starting where `start(i)` says.
    pub fn cascade_curve(&self, grid: &[f64], start: impl Fn(usize) -> usize) -> Vec<Point> {
        grid.iter()
            .map(|&t| {
                self.point(t, |i| {
                    let s = start(i);
                    (s, cascade_stop(self.row(&self.verify, i), s, t).0)
                })
            })
            .collect()
    }

    /// The cascade from the cheapest model at threshold t: (escalation rate, share of the
    /// verifier-accepted answers that fail, number accepted).
    pub fn operating_point(&self, t: f64) -> (f64, Option<f64>, usize) {
        let (mut escalated, mut accepted, mut bad) = (0usize, 0usize, 0usize);
        for i in 0..self.n() {
            let (j, ok) = cascade_stop(self.row(&self.verify, i), 0, t);
            escalated += usize::from(j > 0);
            if ok {
                accepted += 1;
                bad += usize::from(self.row(&self.score, i)[j] < 0.5);
            }
        }
        let far = (accepted > 0).then(|| bad as f64 / accepted as f64);
        (escalated as f64 / self.n().max(1) as f64, far, accepted)
    }

    pub fn column(&self, v: &[f64], j: usize) -> Vec<f64> {
        (0..self.n()).map(|i| v[i * self.m + j]).collect()
    }
}

fn grid(step: f64) -> Vec<f64> {
    let n = (1.0 / step).round() as usize;
    (0..=n).map(|i| i as f64 / n as f64).collect()
}

fn opt(v: Option<f64>) -> Value {
    v.filter(|x| x.is_finite())
        .map_or(Value::Null, |x| json!(x))
}

/// Keeps at most `max` prompts per source, chosen by a seeded hash of their ids; 0 = all.
fn limit_per_source(rows: Vec<Row>, max: usize, seed: u64) -> Vec<Row> {
    if max == 0 {
        return rows;
    }
    let mut ids: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in &rows {
        ids.entry(&r.source).or_default().push(&r.prompt_id);
    }
    let mut keep: HashSet<(String, String)> = HashSet::new();
    for (src, mut v) in ids {
        v.sort_unstable();
        v.dedup();
        v.sort_by_key(|id| hash_str(seed, id));
        keep.extend(
            v.iter()
                .take(max)
                .map(|id| (src.to_string(), id.to_string())),
        );
    }
    rows.into_iter()
        .filter(|r| keep.contains(&(r.source.clone(), r.prompt_id.clone())))
        .collect()
}

/// (model, mean cost, mean score) of the models with a row for at least [`MIN_COVERAGE`] of
/// the prompts, in name order, from each prompt's (model, score, cost), one per model: a model
/// counts once per prompt, so repeated rows cannot pass one that answers half of them.
pub(super) fn covering<'a, P, M>(prompts: P) -> Vec<(&'a str, f64, f64)>
where
    P: IntoIterator<Item = M>,
    M: IntoIterator<Item = (&'a str, f64, f64)>,
{
    let mut n = 0usize;
    let mut stats: BTreeMap<&str, (f64, f64, usize)> = BTreeMap::new();
    for models in prompts {
        n += 1;
        for (m, score, cost) in models {
            let e = stats.entry(m).or_default();
            e.0 += cost;
            e.1 += score;
            e.2 += 1;
        }
    }
    stats
        .into_iter()
        .filter(|(_, (_, _, k))| *k as f64 >= MIN_COVERAGE * n as f64)
        .map(|(m, (c, s, k))| (m, c / k as f64, s / k as f64))
        .collect()
}

pub(super) fn model_stats<'a>(
    rows: impl Iterator<Item = &'a Row>,
) -> BTreeMap<String, (f64, f64, usize)> {
    let mut m: BTreeMap<String, (f64, f64, usize)> = BTreeMap::new();
    for r in rows {
        if let (Some(s), Some(c)) = (r.score, r.cost_usd) {
            let e = m.entry(r.model.clone()).or_default();
            e.0 += c;
            e.1 += s;
            e.2 += 1;
        }
    }
    m
}

/// One source's tier, prompts and row indices (prompt × tier model) into the eval rows.
pub struct SourcePlan {
    pub source: String,
    pub tier: Vec<ModelStat>,
    pub prompts: Vec<String>,
    pub dropped: usize,
    pub rows: Vec<usize>,
}

pub fn plan_source(
    source: &str,
    rows: &[Row],
    train: &[Row],
    max_prompts: usize,
    seed: u64,
) -> Result<SourcePlan> {
    let mut by_prompt: BTreeMap<&str, HashMap<&str, usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate().filter(|(_, r)| r.source == source) {
        by_prompt
            .entry(&r.prompt_id)
            .or_default()
            .insert(&r.model, i);
    }
    let n_prompts = by_prompt.len();
    let mut coverage: HashMap<&str, usize> = HashMap::new();
    for ms in by_prompt.values() {
        for m in ms.keys() {
            *coverage.entry(m).or_default() += 1;
        }
    }
    // Tier statistics from the training rows (the ladder is not chosen on the replayed labels),
    // from the replayed rows when training has none of this source.
    let train_stats = model_stats(train.iter().filter(|r| r.source == source));
    let stats_src = if train_stats.is_empty() {
        model_stats(rows.iter().filter(|r| r.source == source))
    } else {
        train_stats
    };
    let stats: Vec<ModelStat> = stats_src
        .into_iter()
        .filter(|(m, _)| !judge_gaming(m))
        .filter(|(m, _)| {
            coverage.get(m.as_str()).copied().unwrap_or(0) as f64 >= MIN_COVERAGE * n_prompts as f64
        })
        .map(|(model, (c, s, n))| ModelStat {
            model,
            cost: c / n.max(1) as f64,
            score: s / n.max(1) as f64,
        })
        .collect();
    let tier: Vec<ModelStat> = choose_tier(&stats)
        .into_iter()
        .map(|i| stats[i].clone())
        .collect();
    if tier.is_empty() {
        bail!("source {source}: no model has rows for {MIN_COVERAGE} of its prompts");
    }
    let mut prompts: Vec<String> = by_prompt
        .iter()
        .filter(|(_, ms)| tier.iter().all(|t| ms.contains_key(t.model.as_str())))
        .map(|(p, _)| p.to_string())
        .collect();
    let dropped = n_prompts - prompts.len();
    if max_prompts > 0 {
        prompts.sort_by_key(|id| hash_str(seed, id));
        prompts.truncate(max_prompts);
        prompts.sort();
    }
    let mut idx = Vec::with_capacity(prompts.len() * tier.len());
    for p in &prompts {
        let ms = &by_prompt[p.as_str()];
        for t in &tier {
            idx.push(ms[t.model.as_str()]);
        }
    }
    Ok(SourcePlan {
        source: source.to_string(),
        tier,
        prompts,
        dropped,
        rows: idx,
    })
}

pub fn run(a: EvalArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let heads = Heads::load(&a.heads)?;
    let mut rows = read_rows(&a.data)?;
    if let Some(s) = &a.source {
        rows.retain(|r| &r.source == s);
        if rows.is_empty() {
            bail!("{}: no rows of source {s}", a.data.display());
        }
    }
    super::data::check_labelled(&rows, &a.data)?;
    let mut train = read_rows(&a.train)?;
    for r in train.iter_mut() {
        r.response = None; // not needed: keeps memory down
    }
    let sources: Vec<String> = {
        let s: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.source.as_str()).collect();
        s.into_iter().map(String::from).collect()
    };
    let plans: Vec<SourcePlan> = sources
        .iter()
        .map(|s| plan_source(s, &rows, &train, a.max_prompts, a.seed))
        .collect::<Result<_>>()?;

    let enc = encoder_for(&a.encoder, &heads, &a.heads)?;
    let emb = Embedder {
        enc: &enc,
        cache_dir: Some(a.cache_dir.clone()),
    };
    let tier_rows: Vec<Row> = plans
        .iter()
        .flat_map(|p| p.rows.iter().map(|&i| rows[i].clone()))
        .collect();
    let f = RowFeatures::compute(&emb, "eval", &tier_rows, true, heads.max_answer_tokens)?;
    let scores = score_with(&heads, &tier_rows, &f);

    // kNN baseline over the training prompts.
    let knn_train: Vec<Row> = limit_per_source(
        train
            .into_iter()
            .filter(|r| r.score.is_some())
            .filter(|r| a.knn_exclude_source.as_ref() != Some(&r.source))
            .collect(),
        a.knn_max_train_prompts,
        a.seed,
    );
    let kf = RowFeatures::compute(
        &emb,
        "knn-train",
        &knn_train,
        false,
        heads.max_answer_tokens,
    )?;
    let index = KnnIndex::build(
        kf.dim,
        kf.prompt_emb.clone(),
        knn_train.iter().enumerate().map(|(i, r)| {
            (
                kf.prompt_of_row[i],
                r.model.as_str(),
                r.score.unwrap_or(0.0),
            )
        }),
    );
    eprintln!("knn: {} training prompts, k = {}", index.len(), a.k);

    let floor = heads.default_quality_floor.unwrap_or(FALLBACK_FLOOR);
    let t_op = heads.default_verify_threshold;
    let mut out_sources = serde_json::Map::new();
    let mut table = String::new();
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    let mut offset = 0;
    for p in &plans {
        let m = p.tier.len();
        let n = p.prompts.len();
        let range = offset..offset + n * m;
        offset += n * m;
        if n == 0 {
            eprintln!("{}: no prompt has all tier models; skipped", p.source);
            continue;
        }
        let names: Vec<&str> = p.tier.iter().map(|t| t.model.as_str()).collect();
        let knn: Vec<f64> = {
            use rayon::prelude::*;
            (0..n)
                .into_par_iter()
                .flat_map_iter(|i| index.predict(f.prompt(range.start + i * m), &names, a.k))
                .collect()
        };
        let r = Replay {
            m,
            score: range
                .clone()
                .map(|i| tier_rows[i].score.unwrap_or(0.0))
                .collect(),
            cost: range
                .clone()
                .map(|i| tier_rows[i].cost_usd.unwrap_or(0.0))
                .collect(),
            route: range.clone().map(|i| scores[i].0).collect(),
            verify: range.clone().map(|i| scores[i].1).collect(),
            knn,
        };
        let (v, t) = report_source(p, &r, floor, t_op, &a.out_dir)?;
        out_sources.insert(p.source.clone(), v);
        table.push_str(&t);
    }
    let out = json!({
        "data": a.data,
        "heads": a.heads,
        "heads_revision": heads.revision,
        "knn": { "k": a.k, "train_prompts": index.len(), "exclude_source": a.knn_exclude_source },
        "route_floor_for_cascade_start": floor,
        "verify_threshold": t_op,
        "target_fraction_of_best": TARGET,
        "max_prompts_per_source": a.max_prompts,
        "sources": out_sources,
    });
    let path = a.out_dir.join("eval.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprint!("{table}");
    eprintln!(
        "wrote {} and the curves in {:.1}s",
        path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn pct(v: Option<f64>) -> String {
    v.map_or("    n/a".into(), |x| format!("{:6.1}%", x))
}

fn num(v: Option<f64>) -> String {
    v.map_or("  n/a".into(), |x| format!("{x:5.3}"))
}

/// Figures, JSON, SVG and table lines of one source.
fn report_source(
    p: &SourcePlan,
    r: &Replay,
    floor: f64,
    t_op: f64,
    out_dir: &Path,
) -> Result<(Value, String)> {
    let m = r.m;
    let singles: Vec<Point> = (0..m).map(|j| r.single(j)).collect();
    let best = (0..m)
        .max_by(|&a, &b| {
            singles[a]
                .quality
                .total_cmp(&singles[b].quality)
                .then(singles[b].cost.total_cmp(&singles[a].cost))
        })
        .unwrap_or(0);
    let (q_best, c_best) = (singles[best].quality, singles[best].cost);
    let target = TARGET * q_best;
    let saving = |c: Option<f64>| c.map(|c| 100.0 * (1.0 - c / c_best));
    let g = grid(0.02);
    let mut tg = grid(0.02);
    tg.push(t_op);
    tg.sort_by(f64::total_cmp);
    tg.dedup();
    let route = r.route_curve(&r.route, &g);
    let knn = r.route_curve(&r.knn, &g);
    // Cost weights from "price only matters for near-ties" to "always the cheapest": λ·c_best
    // over 1e-3 … 1e5 (tier models can be priced within a few percent of each other).
    let expected: Vec<f64> = p.tier.iter().map(|t| t.cost).collect();
    let c_ref = expected.iter().cloned().fold(0.0, f64::max).max(1e-300);
    let lambdas: Vec<f64> = std::iter::once(0.0)
        .chain((0..=80).map(|k| 10f64.powf(-3.0 + k as f64 / 10.0) / c_ref))
        .collect();
    let route_u = r.utility_curve(&r.route, &expected, &lambdas);
    let knn_u = r.utility_curve(&r.knn, &expected, &lambdas);
    let cascade = r.cascade_curve(&tg, |_| 0);
    let route_cascade = r.cascade_curve(&tg, |i| route_pick(r.row(&r.route, i), floor));
    let oracle = r.oracle();
    // The service's default: route-only at the learned floor.
    let at_default = r.route_curve(&r.route, &[floor])[0];
    let curves: [(&str, &str, &Vec<Point>); 6] = [
        ("route", "#1f77b4", &route),
        ("knn", "#ff7f0e", &knn),
        ("route_utility", "#17becf", &route_u),
        ("knn_utility", "#bcbd22", &knn_u),
        ("cascade", "#2ca02c", &cascade),
        ("route_cascade", "#9467bd", &route_cascade),
    ];
    let mut reduction = serde_json::Map::new();
    for (name, _, c) in &curves {
        let cost = cost_at_quality(&xy(c), target);
        reduction.insert(
            name.to_string(),
            json!({ "cost": opt(cost), "saved_pct": opt(saving(cost)) }),
        );
    }
    let oc = (oracle.quality >= target).then_some(oracle.cost);
    reduction.insert(
        "oracle".into(),
        json!({ "cost": opt(oc), "saved_pct": opt(saving(oc)) }),
    );
    let sc = cost_at_quality(
        &singles
            .iter()
            .map(|s| (s.cost, s.quality))
            .collect::<Vec<_>>(),
        target,
    );
    reduction.insert(
        "best_single_mix".into(),
        json!({ "cost": opt(sc), "saved_pct": opt(saving(sc)) }),
    );

    // Pair: the cheapest tier model vs the best one.
    let cheap = 0;
    let weak_s = r.column(&r.score, cheap);
    let strong_s = r.column(&r.score, best);
    let rank_of = |v: Vec<f64>| v.into_iter().map(|x| 1.0 - x).collect::<Vec<f64>>();
    let verify_cheap: Vec<f64> = (0..r.n())
        .map(|i| r.verify[i * m + cheap].unwrap_or(0.0))
        .collect();
    let pairs = [
        ("router", rank_of(r.column(&r.route, cheap))),
        ("knn", rank_of(r.column(&r.knn, cheap))),
        ("verifier", rank_of(verify_cheap)),
    ];
    let mut pair_json = serde_json::Map::new();
    let mut pair_fig: HashMap<&str, Pgr> = HashMap::new();
    for (name, rank) in &pairs {
        if best == cheap {
            break;
        }
        if let Some(g) = pgr(rank, &weak_s, &strong_s) {
            pair_json.insert(
                name.to_string(),
                json!({ "apgr": g.apgr, "cpt50_pct": opt(g.cpt50.map(|x| 100.0 * x)) }),
            );
            pair_fig.insert(name, g);
        }
    }

    let RowFigures {
        verifier,
        router,
        knn: knn_fig,
        row_far,
        esc,
        cascade_far,
        op,
    } = row_figures(r, t_op, &cascade);
    let pts = |c: &[Point]| c.iter().map(Point::json).collect::<Vec<_>>();
    let v = json!({
        "prompts": r.n(),
        "prompts_without_full_tier": p.dropped,
        "tier": p.tier.iter().map(|t| json!({"model": t.model, "train_mean_cost": t.cost, "train_mean_score": t.score})).collect::<Vec<_>>(),
        "pair": { "cheap": p.tier[cheap].model, "strong": p.tier[best].model },
        "best_model": p.tier[best].model,
        "best_quality": q_best,
        "best_cost": c_best,
        "target_quality": target,
        "curves": {
            "single": singles.iter().zip(&p.tier).map(|(s, t)| {
                let mut j = s.json();
                j["model"] = json!(t.model);
                j
            }).collect::<Vec<_>>(),
            "oracle": oracle.json(),
            "route": pts(&route),
            "knn": pts(&knn),
            "route_utility": pts(&route_u),
            "knn_utility": pts(&knn_u),
            "cascade": pts(&cascade),
            "route_cascade": pts(&route_cascade),
        },
        "cost_reduction_at_target": reduction,
        "route_at_default_floor": {
            "floor": floor,
            "quality_of_best": at_default.quality / q_best.max(1e-12),
            "saved_pct": 100.0 * (1.0 - at_default.cost / c_best.max(1e-300)),
            "point": at_default.json(),
        },
        "pair_routing": pair_json,
        "router": router,
        "knn": knn_fig,
        "verifier": verifier,
    });

    let ctx = SourceSummary {
        p,
        r,
        singles: &singles,
        best,
        q_best,
        c_best,
        target,
        oracle,
    };
    write_figure(&ctx, &curves, out_dir)?;
    let t = table(
        &ctx,
        &v,
        &reduction,
        &pair_fig,
        floor,
        t_op,
        at_default,
        &op,
        esc,
        row_far,
        cascade_far,
    );
    Ok((v, t))
}

/// Row-level figures over the tier rows: router, kNN and verifier (AUROC, ECE), and the
/// cascade at the operating threshold.
struct RowFigures {
    verifier: Value,
    router: Value,
    knn: Value,
    row_far: Option<f64>,
    esc: f64,
    cascade_far: Option<f64>,
    op: Point,
}

fn row_figures(r: &Replay, t_op: f64, cascade: &[Point]) -> RowFigures {
    let pass: Vec<bool> = r.score.iter().map(|&s| s >= 0.5).collect();
    let y: Vec<f32> = r.score.iter().map(|&s| s as f32).collect();
    let (mut vp, mut vy, mut vpass) = (Vec::new(), Vec::new(), Vec::new());
    for (i, v) in r.verify.iter().enumerate() {
        if let Some(v) = v {
            vp.push(*v);
            vy.push(y[i]);
            vpass.push(pass[i]);
        }
    }
    let accepted: Vec<usize> = (0..vp.len()).filter(|&i| vp[i] >= t_op).collect();
    let row_far = (!accepted.is_empty())
        .then(|| accepted.iter().filter(|&&i| !vpass[i]).count() as f64 / accepted.len() as f64);
    let (esc, cascade_far, shipped) = r.operating_point(t_op);
    let op = cascade
        .iter()
        .find(|pt| pt.param == t_op)
        .copied()
        .unwrap_or_else(|| r.cascade_curve(&[t_op], |_| 0)[0]);
    let verifier = json!({
        "rows": vp.len(),
        "auroc": opt(fit::auroc(&vp, &vpass)),
        "ece": fit::ece(&vp, &vy, 15),
        "threshold": t_op,
        "accept_rate": accepted.len() as f64 / vp.len().max(1) as f64,
        "false_accept_rate": opt(row_far),
        "cascade_at_threshold": {
            "cost": op.cost, "quality": op.quality, "pass_rate": op.pass_rate,
            "escalation_rate": esc, "verifier_shipped": shipped,
            "false_accept_rate": opt(cascade_far),
        },
    });
    let router = json!({
        "rows": r.route.len(),
        "auroc": opt(fit::auroc(&r.route, &pass)),
        "ece": fit::ece(&r.route, &y, 15),
    });
    let knn_fig = json!({
        "rows": r.knn.len(),
        "auroc": opt(fit::auroc(&r.knn, &pass)),
        "ece": fit::ece(&r.knn, &y, 15),
    });
    RowFigures {
        verifier,
        router,
        knn: knn_fig,
        row_far,
        esc,
        cascade_far,
        op,
    }
}

/// What the figure and the table of one source share.
struct SourceSummary<'a> {
    p: &'a SourcePlan,
    r: &'a Replay,
    singles: &'a [Point],
    best: usize,
    q_best: f64,
    c_best: f64,
    target: f64,
    oracle: Point,
}

type Curve<'a> = (&'a str, &'a str, &'a Vec<Point>);

fn xy(c: &[Point]) -> Vec<(f64, f64)> {
    c.iter().map(|p| (p.cost, p.quality)).collect()
}

/// curves-<source>.svg: every policy's cost–quality curve, the tier models and the oracle.
fn write_figure(s: &SourceSummary<'_>, curves: &[Curve<'_>], out_dir: &Path) -> Result<()> {
    let SourceSummary {
        p,
        r,
        singles,
        best,
        target,
        oracle,
        ..
    } = *s;
    let title = format!("{} — {} prompts, tier {}", p.source, r.n(), p.tier.len());
    let target_label = format!("{:.0}% of {}", TARGET * 100.0, p.tier[best].model);
    let fig = plot::Figure {
        title: &title,
        lines: curves
            .iter()
            .map(|(name, colour, c)| plot::Line {
                label: match *name {
                    "route" => "route-only (floor sweep)",
                    "knn" => "kNN router (floor sweep)",
                    "route_utility" => "route-only (utility, λ sweep)",
                    "knn_utility" => "kNN router (utility, λ sweep)",
                    "cascade" => "cascade from cheapest",
                    _ => "route, then cascade",
                },
                colour,
                points: xy(c),
            })
            .collect(),
        models: singles
            .iter()
            .zip(&p.tier)
            .map(|(s, t)| plot::Dot {
                label: &t.model,
                cost: s.cost,
                quality: s.quality,
            })
            .collect(),
        oracle: Some((oracle.cost, oracle.quality)),
        target: Some((target, &target_label)),
    };
    let svg_path = out_dir.join(format!("curves-{}.svg", p.source));
    std::fs::write(&svg_path, plot::svg(&fig))
        .with_context(|| format!("writing {}", svg_path.display()))?;

    Ok(())
}

/// The plain-text table of one source (printed by `eval`).
#[allow(clippy::too_many_arguments)]
fn table(
    s: &SourceSummary<'_>,
    v: &Value,
    reduction: &serde_json::Map<String, Value>,
    pair_fig: &HashMap<&str, Pgr>,
    floor: f64,
    t_op: f64,
    at_default: Point,
    op: &Point,
    esc: f64,
    row_far: Option<f64>,
    cascade_far: Option<f64>,
) -> String {
    let SourceSummary {
        p,
        r,
        best,
        q_best,
        c_best,
        target,
        oracle,
        ..
    } = *s;
    let mut t = String::new();
    t.push_str(&format!(
        "\n{} — {} prompts; tier: {}\n  best {} q {:.3} cost {:.2e}; target {:.3}; oracle q {:.3} cost {:.2e}\n",
        p.source,
        r.n(),
        p.tier.iter().map(|t| t.model.as_str()).collect::<Vec<_>>().join(" < "),
        p.tier[best].model,
        q_best,
        c_best,
        target,
        oracle.quality,
        oracle.cost
    ));
    t.push_str("  policy          saved@98%   APGR  CPT50   AUROC\n");
    let saved = |k: &str| reduction.get(k).and_then(|v| v["saved_pct"].as_f64());
    let apgr = |k: &str| pair_fig.get(k).map(|g| g.apgr);
    let cpt = |k: &str| pair_fig.get(k).and_then(|g| g.cpt50).map(|x| 100.0 * x);
    let au = |v: &Value| v["auroc"].as_f64();
    for (label, key, pk, a) in [
        ("route-only", "route", "router", au(&v["router"])),
        ("kNN", "knn", "knn", au(&v["knn"])),
        ("route utility", "route_utility", "", None),
        ("kNN utility", "knn_utility", "", None),
        ("cascade", "cascade", "verifier", au(&v["verifier"])),
        ("route+cascade", "route_cascade", "", None),
        ("oracle", "oracle", "", None),
    ] {
        t.push_str(&format!(
            "  {label:<14} {}  {}  {}  {}\n",
            pct(saved(key)),
            num(apgr(pk)),
            pct(cpt(pk)),
            num(a)
        ));
    }
    t.push_str(&format!(
        "  route-only @ default floor {floor:.2}: {:.1}% of best quality, {:.1}% cost saved\n",
        100.0 * at_default.quality / q_best.max(1e-12),
        100.0 * (1.0 - at_default.cost / c_best.max(1e-300)),
    ));
    t.push_str(&format!(
        "  verifier @ {t_op:.3}: ECE {:.3}, false-accept {} of rows accepted, cascade ships q {:.3} at cost {:.2e} (escalates {:.0}%, false-accept {})\n",
        v["verifier"]["ece"].as_f64().unwrap_or(f64::NAN),
        num(row_far),
        op.quality,
        op.cost,
        esc * 100.0,
        num(cascade_far)
    ));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NaN rank (heads whose logit overflowed) ends the curve; it looped forever.
    #[test]
    fn pgr_ends_on_nan_ranks() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(pgr(&[f64::NAN, 0.5, f64::NAN], &[0.0; 3], &[1.0; 3]).is_some());
        });
        // Short: a loop that never advances grows the curve by gigabytes a second.
        let done = rx.recv_timeout(std::time::Duration::from_secs(1));
        assert_eq!(done, Ok(true));
    }

    #[test]
    fn tier_rule_picks_cheap_mids_strong() {
        let s = |m: &str, cost: f64, score: f64| ModelStat {
            model: m.into(),
            cost,
            score,
        };
        let stats = vec![
            s("tiny", 1.0, 0.2),
            s("small", 2.0, 0.5),
            s("mid1", 3.0, 0.6),
            s("mid2", 4.0, 0.7),
            s("mid3", 5.0, 0.55),
            s("big", 10.0, 0.9),
            s("pricey", 20.0, 0.8),
        ];
        let t: Vec<&str> = choose_tier(&stats)
            .into_iter()
            .map(|i| stats[i].model.as_str())
            .collect();
        assert_eq!(t, ["small", "mid1", "mid2", "big"]);
    }

    #[test]
    fn route_and_cascade_decisions() {
        assert_eq!(route_pick(&[0.3, 0.8, 0.9], 0.7), 1);
        assert_eq!(
            route_pick(&[0.3, 0.6, 0.5], 0.7),
            1,
            "most likely when none meets"
        );
        assert_eq!(
            cascade_stop(&[Some(0.2), None, Some(0.9)], 0, 0.5),
            (2, true)
        );
        assert_eq!(cascade_stop(&[Some(0.2), Some(0.3)], 0, 0.5), (1, false));
        assert_eq!(cascade_stop(&[Some(0.9), Some(0.3)], 1, 0.5), (1, false));
        let (p, c) = ([0.5, 0.7, 0.9], [1.0, 2.0, 10.0]);
        assert_eq!(utility_pick(&p, &c, 0.0), 2, "free: the most likely");
        assert_eq!(
            utility_pick(&p, &c, 0.1),
            1,
            "0.7 − 0.2 beats 0.9 − 1 and 0.5 − 0.1"
        );
        assert_eq!(utility_pick(&p, &c, 1.0), 0, "dear: the cheapest");
        assert_eq!(
            utility_pick(&[0.5, 0.5], &[1.0, 1.0], 0.0),
            0,
            "ties: the cheaper"
        );
    }
}
