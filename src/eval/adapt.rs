//! Run-time adaptation from labelled rows of the user's traffic (`score --calibration`,
//! `tiergate calibrate`): per-model abilities and the prior's shift, the memory of labelled
//! prompts, answer lengths, the verifier's re-fit and Verify's thresholds. The encoder is
//! untouched; each choice is judged on held-out fifths of the calibration prompts.
#![forbid(unsafe_code)]
use std::collections::BTreeMap;

use anyhow::Result;

use super::data::Row;
use super::embed::RowFeatures;
use super::fit;
use crate::model::heads::{self, Heads, LinearHead, ModelInfo, VerifierHead};

/// Fits per-model abilities (new models from scratch, known ones adjusted) and re-fits the
/// verifier's Platt scaling on labelled rows of the target traffic. The encoder is untouched.
/// `memory`: also keep the labelled prompts as a memory when it pays (`remember`).
pub fn adapt(
    heads: &mut Heads,
    rows: &[Row],
    f: &RowFeatures,
    memory: bool,
) -> Result<serde_json::Value> {
    let router = adapt_router(heads, rows, f)?;
    learn_answer_lengths(heads, rows);
    let (verifier_rows, refit, held) = refit_verifier(heads, rows, f)?;
    let thresholds = relearn_thresholds(heads, &held, verifier_rows);
    heads.memory = None;
    let memory = if memory {
        remember(heads, rows, f, &router.held_out_p)
    } else {
        serde_json::Value::Null
    };
    Ok(serde_json::json!({
        "memory": memory,
        "prior_shift": router.prior_shift,
        "known_pull": router.known_pull,
        "models": router.models,
        "verifier_rows": verifier_rows,
        "verifier_refit": refit,
        "verify_thresholds": thresholds,
    }))
}

/// Held-out answers needed before Verify's per-floor thresholds are re-learned on this
/// traffic (below it the trained table stays).
pub const MIN_ROWS_FOR_THRESHOLDS: usize = 100;

/// Verify's per-floor thresholds re-learned from this traffic's held-out answers (`held`: p
/// from the verifier that ships, fitted without each answer's fifth, and the label), as
/// `tiergate train` learns them on its held-back rows. The trained table maps a floor to the
/// p at which the training mix's shipped answers passed that often; on other traffic the
/// calibrated p spread differently above it, and answers shipped at the trained threshold
/// passed less often than asked (dev RouterBench: 0.79 at a floor of 0.9; models/EVAL.md).
/// The verifier's router-logit input comes from abilities fitted on every calibration row
/// (see `refit_verifier`), so these p are held out in the verifier's own fit only.
/// Returns the report: the new table, and what the trained one would have shipped here;
/// `answers`: the labelled answers the verifier saw, for the report.
fn relearn_thresholds(heads: &mut Heads, held: &[HeldOut], answers: usize) -> serde_json::Value {
    let held: Vec<&HeldOut> = held.iter().filter(|h| h.p.is_finite()).collect();
    if held.len() < MIN_ROWS_FOR_THRESHOLDS {
        let why = if held.is_empty() && answers >= MIN_ROWS_FOR_THRESHOLDS {
            "the verifier was re-fitted without held-out fifths (its prompts fall in fewer than two)"
        } else {
            "too few held-out answers"
        };
        return serde_json::json!({
            "relearned": false,
            "held_out_rows": held.len(),
            "why": why,
        });
    }
    // Held-out p come from five fold fits, the p Verify will compare with the threshold from
    // the final fit on every fifth: differences of a few thousandths between them are noise.
    // On a grid of 0.01 a cut rarely lands inside such a cluster (on traffic the re-fit
    // separates sharply, the failing answers' held-out p sat within 0.0005 of each other,
    // the cut fell among them, and the final fit put them all above it); a cluster that
    // straddles a grid line can still be cut. The grid's cuts are a subset of the exact
    // ones, so the table may stop at a lower floor than before.
    let (p, y): (Vec<f64>, Vec<f32>) = held
        .iter()
        .map(|h| ((h.p * 100.0).floor() / 100.0, h.y))
        .unzip();
    // What the trained table's threshold for each of its floors shipped on these answers.
    let trained: Vec<serde_json::Value> = heads
        .verify_thresholds
        .iter()
        .map(|&(floor, t)| {
            let shipped: Vec<f32> = held.iter().filter(|h| h.p >= t).map(|h| h.y).collect();
            let pass = shipped.iter().filter(|&&y| y >= 0.5).count();
            serde_json::json!({
                "floor": floor,
                "threshold": t,
                "shipped": shipped.len(),
                "passed": (!shipped.is_empty()).then(|| pass as f64 / shipped.len() as f64),
            })
        })
        .collect();
    let table = fit::threshold_table(&p, &y);
    heads.set_verify_thresholds(table.clone());
    serde_json::json!({
        "relearned": true,
        "held_out_rows": held.len(),
        "table": table,
        "default_threshold": heads.default_verify_threshold,
        "trained_table_here": trained,
    })
}

/// The labelled prompts as a memory that corrects the (adapted) router per prompt, kept only
/// when it predicts the calibration rows better than the router, each from the other prompts.
/// The router's side of that comparison is its held-out p where there is one: abilities fitted
/// on the very rows they are judged on look better than they will on new prompts, and the
/// memory would lose to that optimism.
fn remember(
    heads: &mut Heads,
    rows: &[Row],
    f: &RowFeatures,
    held_out_p: &[Option<f64>],
) -> serde_json::Value {
    heads.memory = None;
    let outcomes: Vec<(usize, String, f32, f64)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let s = r.score?;
            let p = held_out_p
                .get(i)
                .copied()
                .flatten()
                .unwrap_or_else(|| heads.route_p(&r.model, f.prompt(i)));
            Some((f.prompt_of_row[i], r.model.clone(), s as f32, p))
        })
        .collect();
    // Each prompt's fifth: the memory's setting is judged on each fifth chosen on the others.
    let mut groups = vec![usize::MAX; f.prompt_emb.len() / f.dim.max(1)];
    for (i, r) in rows.iter().enumerate() {
        if let Some(g) = groups.get_mut(f.prompt_of_row[i]) {
            *g = calibration_fold(r);
        }
    }
    match crate::model::memory::fit(f.dim, &f.prompt_emb, &outcomes, Some(&groups)) {
        Some((m, fit)) => {
            let report = serde_json::json!({ "prompts": m.len(), "fit": fit });
            heads.memory = Some(m);
            report
        }
        None => serde_json::Value::Null,
    }
}

/// What [`adapt_router`] did: the prior's shift, a report per model, one on the pull.
struct RouterAdaptation {
    prior_shift: Option<f64>,
    models: serde_json::Map<String, serde_json::Value>,
    known_pull: serde_json::Value,
    /// Per calibration row: the router's p from abilities fitted without the row's fifth of
    /// the prompts (what a new prompt of this traffic sees); None where no such fit exists.
    /// Known models' pull is chosen over every fifth, so theirs read their own fifth through
    /// that one choice among four (new models' starts do not; their prior's shift is fitted
    /// without the fifth, left unshifted where fewer than 20 rows remain).
    held_out_p: Vec<Option<f64>>,
}

/// Each calibration model's ability on this traffic (new models from the shifted prior,
/// known ones pulled from their trained ability, as hard as held-out calibration prompts
/// favour).
fn adapt_router(heads: &mut Heads, rows: &[Row], f: &RowFeatures) -> Result<RouterAdaptation> {
    let k = heads.router.k;
    let mut by_model: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        if r.score.is_some() {
            by_model.entry(r.model.as_str()).or_default().push(i);
        }
    }
    // Models the heads have never seen start from the population-mean ability. Move that start
    // to this traffic's pass rate first (one logit shift, fitted on those models' rows): a few
    // rows per model then refine a start that is already right on average, instead of pulling
    // away from the training mix's rate (AlpacaEval's preferences grade far below it).
    let fold_of = |i: usize| calibration_fold(&rows[i]);
    let (mut uz, mut uy, mut ufold) = (Vec::new(), Vec::new(), Vec::new());
    for (i, r) in rows.iter().enumerate() {
        if let (Some(s), false) = (r.score, heads.router.models.contains_key(&r.model)) {
            uz.push(heads.route_logit(&r.model, f.prompt(i)) as f64);
            uy.push(s as f32);
            ufold.push(fold_of(i));
        }
    }
    // The shift from the rows outside `fold` (all rows: None), 0 below 20 rows.
    let shift_without = |fold: Option<usize>| -> f64 {
        let (z, y): (Vec<f64>, Vec<f32>) = (0..uy.len())
            .filter(|&j| fold.is_none_or(|k| ufold[j] != k))
            .map(|j| (uz[j], uy[j]))
            .unzip();
        if y.len() >= 20 {
            // A unit Gaussian prior on the shift (worth a few rows): one class of outcomes
            // (all passing) moves the start far, not to the bound.
            fit::shift(&z, &y, 1.0)
        } else {
            0.0
        }
    };
    let prior0 = heads.router.prior.clone();
    let prior_shift = (uy.len() >= 20).then(|| shift_without(None));
    heads.router.prior.b += prior_shift.unwrap_or(0.0) as f32;
    // New models' starts for each held-out fifth: the prior shifted by the other fifths' rows
    // only, so their held-out p (the memory's bar) are not fitted on the rows they predict.
    let fold_priors: Vec<crate::model::heads::Ability> = (0..5)
        .map(|k| crate::model::heads::Ability {
            u: prior0.u.clone(),
            b: prior0.b + shift_without(Some(k)) as f32,
        })
        .collect();
    // The prompt part of every row's logit, computed once (the pull is chosen by refitting).
    let pf: Vec<Option<(f32, Vec<f32>)>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| r.score.map(|_| heads.router.prompt_features(f.prompt(i))))
        .collect();
    let fit_rows = |start: &crate::model::heads::Ability,
                    idx: &[usize],
                    (l2_u, l2_b): (f64, f64)|
     -> Result<crate::model::heads::Ability> {
        let (mut z, mut s, mut y) = (Vec::new(), Vec::new(), Vec::new());
        for &i in idx {
            if let (Some((si, zi)), Some(yi)) = (&pf[i], rows[i].score) {
                z.extend_from_slice(zi);
                s.push(*si);
                y.push(yi as f32);
            }
        }
        crate::model::ability::fit_ability_split(&z, &s, &y, k, start, l2_u, l2_b)
    };
    // How hard a known model is held to its trained ability: on traffic like training the
    // strongest pull is right; on a new task of known models (the sealed set's new sources)
    // their levels differ, and a strong pull leaves the router off by a model-wide offset.
    // Chosen by log-loss on held-out fifths of the calibration prompts.
    // (row, p) for each of `idx`'s rows, p from abilities fitted without the row's fifth of
    // the prompts; rows of a fifth with no other fifth beside it are left out.
    let held_out = |m: &str, idx: &[usize], pull: (f64, f64)| -> Result<Vec<(usize, f64)>> {
        let mut out = Vec::new();
        let known = heads.router.models.contains_key(m);
        for (fold, fold_prior) in fold_priors.iter().enumerate() {
            let (held, fit_idx): (Vec<usize>, Vec<usize>) =
                idx.iter().partition(|&&i| fold_of(i) == fold);
            if held.is_empty() || fit_idx.is_empty() {
                continue;
            }
            let start = if known {
                heads.router.ability(m)
            } else {
                fold_prior
            };
            let a = fit_rows(start, &fit_idx, pull)?;
            for &i in &held {
                if let Some(p) = &pf[i] {
                    out.push((
                        i,
                        crate::base::sigmoid(heads.router.logit_from(p, &a) as f64),
                    ));
                }
            }
        }
        Ok(out)
    };
    let known: Vec<(&str, &Vec<usize>)> = by_model
        .iter()
        .filter(|(m, _)| heads.router.models.contains_key(**m))
        .map(|(m, idx)| (*m, idx))
        .collect();
    let known_rows: usize = known.iter().map(|(_, idx)| idx.len()).sum();
    let mut pull_losses = Vec::new();
    // Known models' held-out p under each pull tried, kept for the memory's comparison.
    let mut held_by_pull: Vec<(Pull, Vec<(usize, f64)>)> = Vec::new();
    if known_rows >= MIN_ROWS_FOR_PULL {
        for &pull in &KNOWN_PULLS {
            let (mut loss, mut n) = (0.0, 0usize);
            let mut all = Vec::new();
            for (m, idx) in &known {
                for (i, p) in held_out(m, idx, pull)? {
                    if let Some(y) = rows[i].score {
                        loss += fit::bce(p, y);
                        n += 1;
                    }
                    all.push((i, p));
                }
            }
            pull_losses.push((pull, loss / n.max(1) as f64));
            held_by_pull.push((pull, all));
        }
    }
    // The default stays unless another pull predicts held-out rows clearly better: a few
    // hundred rows would otherwise free the levels on noise.
    let default_loss = pull_losses.first().map(|&(_, l)| l);
    let known_pull = pull_losses
        .iter()
        .skip(1)
        .filter(|(_, l)| l.is_finite())
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .filter(|(_, l)| default_loss.is_some_and(|d| *l < d * (1.0 - MIN_PULL_GAIN)))
        .map_or(KNOWN_PULLS[0], |&(pull, _)| pull);
    let mut report = serde_json::Map::new();
    let mut fitted = Vec::new();
    let mut held_out_p = vec![None; rows.len()];
    // Known models' were fitted while choosing the pull; the others' are fitted below.
    let cached = held_by_pull.iter().find(|(pull, _)| *pull == known_pull);
    for &(i, p) in cached.map_or(&[][..], |(_, v)| v.as_slice()) {
        held_out_p[i] = Some(p);
    }
    for (m, idx) in &by_model {
        let known = heads.router.models.contains_key(*m);
        // New models start from the (shifted) prior and follow their rows.
        let pull = if known { known_pull } else { (2.0, 2.0) };
        if !(known && cached.is_some()) {
            for (i, p) in held_out(m, idx, pull)? {
                held_out_p[i] = Some(p);
            }
        }
        let a = fit_rows(heads.router.ability(m), idx, pull)?;
        report.insert(
            m.to_string(),
            serde_json::json!({ "rows": idx.len(), "known": known, "b": a.b }),
        );
        fitted.push((m.to_string(), a));
    }
    let pull_report = serde_json::json!({
            "chosen": [known_pull.0, known_pull.1],
            "held_out_log_loss": pull_losses
                .iter()
                .map(|((u, b), l)| serde_json::json!({ "skills": u, "level": b, "loss": l }))
                .collect::<Vec<_>>(),
    });
    heads.router.models.extend(fitted);
    Ok(RouterAdaptation {
        prior_shift,
        models: report,
        known_pull: pull_report,
        held_out_p,
    })
}

/// Which of five folds a calibration row's prompt falls in: the pull and the verifier's
/// re-fit are judged on the same held-out prompts.
fn calibration_fold(r: &Row) -> usize {
    (super::util::hash_str(0x5eed, &format!("{}/{}", r.source, r.prompt_id)) % 5) as usize
}

/// L2 pulls (on skills, on level) towards a model's trained ability.
type Pull = (f64, f64);

/// Pulls (on skills, on level) a known model's ability may get; the first is the default.
const KNOWN_PULLS: [Pull; 4] = [(20.0, 20.0), (20.0, 2.0), (5.0, 5.0), (2.0, 2.0)];

/// Known models' labelled rows needed before the pull is chosen (by log-loss on held-out
/// fifths of the calibration prompts) rather than left at the default.
const MIN_ROWS_FOR_PULL: usize = 100;

/// Relative fall in held-out log-loss another pull must bring over the default (the
/// memory's bar too).
const MIN_PULL_GAIN: f64 = 0.005;

/// The verifier compares an answer's length with its model's usual; a model the heads have
/// not seen gets its usual from its calibration answers. Its prices stay unknown (0): scoring
/// never reads them.
fn learn_answer_lengths(heads: &mut Heads, rows: &[Row]) {
    let mut lens: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for r in rows {
        if let (Some(t), false) = (&r.response, heads.models.contains_key(&r.model)) {
            let e = lens.entry(r.model.as_str()).or_default();
            e.0 += u64::from(crate::policy::proxy_tokens(t.len()));
            e.1 += 1;
        }
    }
    for (m, (tok, n)) in lens {
        heads.models.insert(
            m.to_string(),
            ModelInfo {
                in_usd_per_mtok: 0.0,
                out_usd_per_mtok: 0.0,
                mean_output_tokens: (tok / n.max(1)).max(1) as u32,
                train_rows: 0,
                pass_fail: None,
            },
        );
    }
}

/// Re-fits the verifier on the calibration answers, the encoder untouched. Always: how its
/// logit and the (adapted) router's logit combine, so it is calibrated on the target traffic
/// and never much worse than the router where the answer features do not transfer. With
/// enough rows, also the weights of its text and form features (not the embedding's), so cues
/// that mean something else on this traffic (an option's length rank, a bare letter) are
/// re-weighed. Returns the rows used, what was re-fitted, and the held-out answers (none
/// when the re-fit had no fifths to hold out).
fn refit_verifier(
    heads: &mut Heads,
    rows: &[Row],
    f: &RowFeatures,
) -> Result<(usize, serde_json::Value, Vec<HeldOut>)> {
    // Calibration rows are split into five folds by prompt; the re-fit picks its candidate
    // by its log-loss on each fold in turn, fitted on the other four.
    let fold_of = |i: usize| calibration_fold(&rows[i]);
    let nv = heads::verify_dim(heads.dim);
    let small = nv - heads.dim - 1; // router logit + text/form features + interactions
    let (mut xs, mut ys, mut folds, mut row_of) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, r) in rows.iter().enumerate() {
        let (Some(s), Some(a)) = (r.score, f.answer(i, r)) else {
            continue;
        };
        row_of.push(i);
        // The router logit here comes from abilities fitted on these same rows. Out-of-fold
        // logits (abilities fitted without each fifth) were tried: they lowered left-out
        // AlpacaEval's verifier AUROC from 0.838 to 0.809 (MMLU-Pro 0.843 → 0.840). What the
        // abilities learn is mostly each model's level, which carries over to new prompts of
        // the same traffic, so these logits are less optimistic than usual in-sample ones.
        xs.push(heads.verify_x(&r.model, f.prompt(i), &a));
        ys.push(s as f32);
        folds.push(fold_of(i));
    }
    // The trained verifier never saw these answers: its p are held out as they stand.
    let trained_p = |v: &VerifierHead| -> Vec<HeldOut> {
        (0..xs.len())
            .map(|j| HeldOut {
                row: row_of[j],
                p: v.p(&xs[j]),
                y: ys[j],
            })
            .collect()
    };
    if ys.len() < 50 {
        let held = trained_p(&heads.verifier);
        return Ok((ys.len(), serde_json::Value::Null, held));
    }
    let v = heads.verifier.clone();
    // Features of the re-fit: [trained head logit, router logit, small features...].
    let feats = |x: &[f32], width: usize| -> Vec<f32> {
        let mut z = vec![v.raw_logit(x), x[0]];
        z.extend_from_slice(&x[1..width]);
        z
    };
    // Candidates (features, L2): the combination alone, or the small features too. With
    // enough rows, the one with the lowest log-loss on held-out fifths of the calibration
    // prompts wins (on traffic the heads know, re-weighing rarely pays; on new traffic it
    // does), then it is re-fitted on all rows. Every fifth is held out in turn: one fifth
    // alone chose a different candidate in most draws of the same traffic.
    let mut cands = vec![(1usize, 1e-4)];
    if ys.len() >= MIN_ROWS_FOR_FEATURE_REFIT {
        cands.extend([(small, 1e-3), (small, 1e-2), (small, 1e-1)]);
    }
    // Every row's widest features, once (the trees are read here); a narrower candidate
    // reads a prefix.
    let widest: Vec<Vec<f32>> = xs.iter().map(|x| feats(x, small)).collect();
    // (features, labels) of the rows in `fold` (held) or outside it (fit); None: all.
    let rows_of = |width: usize, fold: Option<(usize, bool)>| -> (Vec<f32>, Vec<f32>) {
        let mut fx = Vec::new();
        let mut fy = Vec::new();
        for (j, x) in widest.iter().enumerate() {
            if fold.is_none_or(|(k, held)| (folds[j] == k) == held) {
                fx.extend_from_slice(&x[..1 + width]);
                fy.push(ys[j]);
            }
        }
        (fx, fy)
    };
    // Fifths with rows on both sides; with fewer than two the trained verifier's own
    // combination is re-fitted without a choice.
    let usable: Vec<usize> = (0..5)
        .filter(|&k| folds.contains(&k) && folds.iter().any(|&f| f != k))
        .collect();
    // The trained verifier, unchanged (it reads the adapted router), is a candidate too:
    // on traffic the heads already know, a re-fit on a few thousand rows can cost more
    // than it brings. Losses are summed over the held-out rows of every usable fifth.
    let held_rows: Vec<usize> = (0..xs.len())
        .filter(|&j| usable.contains(&folds[j]))
        .collect();
    let mut chosen = Some(cands[0]);
    let mut losses = Vec::new();
    // The chosen candidate's p on each held-out row, fitted on the other fifths.
    let mut held: Vec<HeldOut> = Vec::new();
    if usable.len() >= 2 {
        held = trained_p(&v);
        let (p, y): (Vec<f64>, Vec<f32>) =
            held_rows.iter().map(|&j| (held[j].p, held[j].y)).unzip();
        let keep = fit::log_loss(&p, &y);
        losses.push(serde_json::json!({ "kept": true, "loss": keep }));
        let mut best = keep;
        chosen = None;
        for &(width, l2) in &cands {
            let d = 1 + width;
            let mut total = 0.0;
            let mut cand_held = Vec::with_capacity(held_rows.len());
            for &k in &usable {
                let ((fx, fy), (hx, hy)) = (
                    rows_of(width, Some((k, false))),
                    rows_of(width, Some((k, true))),
                );
                let h = fit::logistic(&fx, d, &fy, l2)?;
                total += fit::head_log_loss(&h, &hx, d, &hy) * hy.len() as f64;
                // rows_of lists fold k's rows in this order.
                let rows_k = (0..xs.len()).filter(|&j| folds[j] == k);
                cand_held.extend(hx.chunks_exact(d).zip(rows_k).map(|(x, j)| HeldOut {
                    row: row_of[j],
                    p: crate::base::sigmoid(h.logit(x) as f64),
                    y: ys[j],
                }));
            }
            let loss = total / held_rows.len() as f64;
            losses.push(serde_json::json!({ "features": width, "l2": l2, "loss": loss }));
            if loss < best {
                best = loss;
                chosen = Some((width, l2));
                held = cand_held;
            }
        }
    }
    let Some((width, l2)) = chosen else {
        return Ok((
            ys.len(),
            serde_json::json!({ "kept": true, "folds": usable.len(), "held_out_log_loss": losses }),
            held,
        ));
    };
    let d = 1 + width;
    let (flat, _) = rows_of(width, None);
    let h = fit::logistic(&flat, d, &ys, l2)?;
    // Fold the re-fit into the head: z = a·(w·x + b0 + trees(x)) + c·x0 + Σ v_j x_j + b.
    let a = h.w[0];
    let mut w: Vec<f32> = v.head.w.iter().map(|wi| a * wi).collect();
    let mut trees = v.trees.clone();
    trees.scale(a);
    // h.w[1..] are the deltas for x[0..width] (router logit, then the small features).
    for (wj, dj) in w.iter_mut().zip(&h.w[1..]) {
        *wj += dj;
    }
    heads.verifier = VerifierHead {
        head: LinearHead {
            w,
            b: a * v.head.b + h.b,
        },
        trees,
        platt_a: 1.0,
        platt_b: 0.0,
        router_coef: 0.0,
    };
    let refit = serde_json::json!({
        "features": width,
        "l2": l2,
        "folds": usable.len(),
        "held_out_log_loss": losses,
    });
    Ok((ys.len(), refit, held))
}

/// A calibration answer's p from the verifier that ships, fitted without the answer's fifth
/// of the prompts (the trained verifier's own p when it is kept), with its label.
#[derive(Debug, Clone, Copy, PartialEq)]
struct HeldOut {
    row: usize,
    p: f64,
    y: f32,
}

/// Labelled answers needed before run-time calibration re-weighs the verifier's text and
/// form features (below it, only how its logit and the router's combine is re-fitted).
pub const MIN_ROWS_FOR_FEATURE_REFIT: usize = 500;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::eval::score::score_with;
    use crate::eval::score::tests::trained_heads;

    /// Synthetic traffic on which one cue means the opposite of what the trained heads learned
    /// (here the longest option is the wrong one) while another keeps its meaning (a pick out
    /// of range fails). Three kinds of rows: longest picked (fails), a short option picked
    /// (passes), a letter out of range (fails). The trained head ranks them longest > short >
    /// out of range, so no monotone transform of its logit, which is all that re-combining
    /// can do, ranks the passing kind first; only re-weighing the cues can.
    pub(crate) fn traffic(n: usize, offset: usize, dim: usize) -> (Vec<Row>, RowFeatures) {
        let mut rows = Vec::new();
        for i in 0..n {
            let id = offset + i;
            let (answer, score) = match i % 3 {
                0 => ("Reasoning done. The answer is (A).", 0.0),
                1 => ("Reasoning done. The answer is (B).", 1.0),
                _ => ("Reasoning done. The answer is (H).", 0.0),
            };
            rows.push(Row::labelled(
                "new-benchmark",
                format!("q{id}"),
                format!(
                    "Question {id}: which holds?\nOptions: [\"a long and detailed option number {id}\", \"b\", \"c\", \"d\"]"
                ),
                "brand-new-model",
                answer,
                score,
            ));
        }
        let unit = |v: Vec<f32>| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let e = unit((0..dim).map(|i| (i % 5) as f32 - 2.0).collect());
        // The answers' embedding is near the prompts' (cosine 0.6), as a real answer's is: one
        // that embeds as its prompt is the prompt given back, and one far from it another
        // prompt's answer, both of which the verifier learned to fail (`train::non_answers`).
        let other = unit((0..dim).map(|i| (i % 7) as f32 - 3.0).collect());
        let ae = unit(
            e.iter()
                .zip(&other)
                .map(|(a, b)| 0.6 * a + 0.8 * b)
                .collect(),
        );
        // Each answer a little apart from the others (a seeded direction per row), so that p
        // spread within a kind as real answers' do; identical rows gave p equal to a few
        // decimals, and the threshold table would cut inside that tie's fold-to-fold noise.
        let answer_emb: Vec<f32> = (0..n)
            .flat_map(|r| {
                let id = (offset + r) as u64;
                let jitter = unit(
                    (0..dim as u64)
                        .map(|i| (((id * 2654435761 + i * 40503) % 1000) as f32 / 500.0) - 1.0)
                        .collect(),
                );
                unit(ae.iter().zip(&jitter).map(|(a, j)| a + 0.3 * j).collect())
            })
            .collect();
        let f = RowFeatures {
            dim,
            prompt_emb: e.repeat(n),
            prompt_of_row: (0..n).collect(),
            answer_of_row: (0..n).map(Some).collect(),
            answer_emb,
            answer_truncated: vec![false; n],
            answer_empty: vec![false; n],
        };
        (rows, f)
    }

    fn verifier_auroc(h: &Heads, rows: &[Row], f: &RowFeatures) -> f64 {
        let s = score_with(h, rows, f);
        let p: Vec<f64> = s.iter().map(|(_, v)| v.unwrap_or(0.0)).collect();
        let y: Vec<bool> = rows.iter().map(|r| r.passed() == Some(true)).collect();
        fit::auroc(&p, &y).unwrap_or(0.5)
    }

    #[test]
    fn calibration_reweighs_text_cues_on_new_traffic() -> Result<()> {
        let mut h = trained_heads()?;
        let (test, tf) = traffic(200, 10_000, h.dim);
        let before = verifier_auroc(&h, &test, &tf);
        assert!(
            before < 0.5,
            "trained heads favour the longest option: {before}"
        );
        let (calib, cf) = traffic(MIN_ROWS_FOR_FEATURE_REFIT + 300, 0, h.dim);
        let rep = adapt(&mut h, &calib, &cf, true)?;
        assert!(
            rep["verifier_refit"]["features"].as_u64() > Some(1),
            "{rep}"
        );
        h.validate()?;
        let after = verifier_auroc(&h, &test, &tf);
        assert!(after > 0.9, "after calibration {after} (before {before})");
        Ok(())
    }

    /// The re-fit's choice is the candidate with the least log-loss summed over every held-out
    /// fifth, the trained verifier kept among them; the report shows each loss.
    #[test]
    fn refit_choice_is_the_least_held_out_loss() -> Result<()> {
        let mut h = trained_heads()?;
        let (calib, cf) = traffic(MIN_ROWS_FOR_FEATURE_REFIT + 300, 0, h.dim);
        let rep = adapt(&mut h, &calib, &cf, true)?;
        let refit = &rep["verifier_refit"];
        let losses = refit["held_out_log_loss"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(losses.len(), 5, "kept + four candidates: {refit}");
        assert_eq!(
            refit["folds"].as_u64(),
            Some(5),
            "every fifth held out in turn: {refit}"
        );
        assert_eq!(losses[0]["kept"], serde_json::json!(true), "{refit}");
        let loss = |e: &serde_json::Value| e["loss"].as_f64().unwrap_or(f64::NAN);
        let best = losses
            .iter()
            .min_by(|a, b| loss(a).total_cmp(&loss(b)))
            .cloned()
            .unwrap_or_default();
        assert!(losses.iter().all(|e| loss(e).is_finite()), "{refit}");
        assert_eq!(best["features"], refit["features"], "{refit}");
        assert_eq!(best["l2"], refit["l2"], "{refit}");
        Ok(())
    }

    /// The memory is judged against the router's p on prompts its abilities were not fitted
    /// on: every calibration row gets one, and it predicts the rows worse than the in-sample
    /// fit does (the optimism the memory would otherwise have to beat).
    #[test]
    fn held_out_router_p_is_held_out() -> Result<()> {
        let mut h = trained_heads()?;
        let (calib, cf) = traffic(300, 0, h.dim);
        let adapted = adapt_router(&mut h, &calib, &cf)?;
        let held: Vec<f64> = adapted.held_out_p.iter().flatten().copied().collect();
        assert_eq!(held.len(), calib.len(), "one held-out p per row");
        let y: Vec<f32> = calib
            .iter()
            .map(|r| r.score.unwrap_or(0.0) as f32)
            .collect();
        let in_sample: Vec<f64> = (0..calib.len())
            .map(|i| h.route_p(&calib[i].model, cf.prompt(i)))
            .collect();
        let (lh, li) = (fit::log_loss(&held, &y), fit::log_loss(&in_sample, &y));
        assert!(lh > li, "held-out {lh} vs in-sample {li}");
        Ok(())
    }

    /// Every calibration row of an unseen model passing: the start every other unseen model
    /// reads moves up, but not to the ±20 bound (which put them all at p ≈ 1).
    #[test]
    fn one_class_calibration_moves_the_start_a_bounded_way() -> Result<()> {
        let mut h = trained_heads()?;
        let before = h.router.prior.b;
        let (mut calib, cf) = traffic(25, 0, h.dim);
        for r in calib.iter_mut() {
            r.score = Some(1.0);
        }
        adapt_router(&mut h, &calib, &cf)?;
        let moved = h.router.prior.b - before;
        assert!(moved > 0.5 && moved < 8.0, "prior moved by {moved}");
        let p = h.route_p("another-new-model", &cf.prompt_emb[..h.dim]);
        assert!(p < 0.999, "{p}");
        Ok(())
    }

    /// A new model's held-out p for a fifth of the prompts reads nothing of that fifth's
    /// labels: not through its fit, nor through the prior's shift to the traffic's pass rate
    /// (which used every row before).
    #[test]
    fn held_out_p_of_new_models_ignore_their_own_fifth() -> Result<()> {
        let dim = trained_heads()?.dim;
        let (calib, cf) = traffic(300, 0, dim);
        let held_for = |rows: &[Row]| -> Result<Vec<Option<f64>>> {
            let mut h = trained_heads()?;
            Ok(adapt_router(&mut h, rows, &cf)?.held_out_p)
        };
        let before = held_for(&calib)?;
        let mut flipped = calib.clone();
        for r in flipped.iter_mut().filter(|r| calibration_fold(r) == 0) {
            r.score = Some(1.0);
        }
        let after = held_for(&flipped)?;
        let fold0: Vec<usize> = (0..calib.len())
            .filter(|&i| calibration_fold(&calib[i]) == 0)
            .collect();
        assert!(fold0.len() > 20 && fold0.len() < 100, "{}", fold0.len());
        for &i in &fold0 {
            assert!(before[i].is_some(), "row {i} has a held-out p");
            assert_eq!(before[i], after[i], "row {i}");
        }
        // The other fifths' p read fold 0's new labels.
        assert!((0..calib.len()).any(|i| !fold0.contains(&i) && before[i] != after[i]));
        Ok(())
    }

    /// Verify's per-floor thresholds are re-learned on the traffic's held-out answers: the
    /// answers of new prompts shipped at each floor's threshold pass at least that often, and
    /// the default threshold follows the table.
    #[test]
    fn verify_thresholds_are_relearned_and_hold_on_new_answers() -> Result<()> {
        let trained = trained_heads()?;
        let mut h = trained.clone();
        let (calib, cf) = traffic(MIN_ROWS_FOR_FEATURE_REFIT + 300, 0, h.dim);
        let rep = adapt(&mut h, &calib, &cf, true)?;
        let t = &rep["verify_thresholds"];
        assert_eq!(t["relearned"], true, "{t}");
        assert_eq!(t["held_out_rows"].as_u64(), Some(calib.len() as u64), "{t}");
        assert!(!h.verify_thresholds.is_empty(), "{t}");
        assert_ne!(h.verify_thresholds, trained.verify_thresholds);
        h.validate()?;
        let floor = h.default_quality_floor.unwrap_or(heads::FALLBACK_FLOOR);
        assert_eq!(
            h.default_verify_threshold,
            heads::threshold_from(&h.verify_thresholds, floor)
        );
        let (test, tf) = traffic(300, 10_000, h.dim);
        let scored = score_with(&h, &test, &tf);
        for &(floor, th) in &h.verify_thresholds {
            let shipped: Vec<bool> = test
                .iter()
                .zip(&scored)
                .filter(|(_, (_, v))| v.is_some_and(|p| p >= th))
                .map(|(r, _)| r.passed() == Some(true))
                .collect();
            let rate = shipped.iter().filter(|&&x| x).count() as f64 / shipped.len() as f64;
            assert!(
                !shipped.is_empty() && rate >= floor,
                "floor {floor}: threshold {th} shipped {} at {rate}",
                shipped.len()
            );
        }
        Ok(())
    }

    /// The answers the thresholds are learned on are held out: flipping labels in one fifth
    /// leaves that fifth's p as they were (the re-fit's choice is the same both ways).
    #[test]
    fn held_out_verify_p_ignore_their_own_fifth() -> Result<()> {
        let dim = trained_heads()?.dim;
        // Fewer rows than the feature re-fit needs: one candidate beside the trained
        // verifier, chosen with either set of labels.
        let (calib, cf) = traffic(300, 0, dim);
        let held_for = |rows: &[Row]| -> Result<(serde_json::Value, Vec<HeldOut>)> {
            let mut h = trained_heads()?;
            let (_, refit, held) = refit_verifier(&mut h, rows, &cf)?;
            Ok((refit, held))
        };
        let (refit, before) = held_for(&calib)?;
        let mut flipped = calib.clone();
        // Ten of fold 0's labels flipped (pass for fail and back): the other fifths read them.
        // (All of fold 0 passing tipped the near tie between the trained verifier and the
        // re-combination on this traffic, and the property is about a candidate's p.)
        for r in flipped
            .iter_mut()
            .filter(|r| calibration_fold(r) == 0)
            .take(10)
        {
            r.score = r.score.map(|s| 1.0 - s);
        }
        let (refit2, after) = held_for(&flipped)?;
        assert_eq!(refit["features"], refit2["features"]);
        assert_eq!(refit["l2"], refit2["l2"]);
        assert_eq!(before.len(), calib.len());
        let p_of = |held: &[HeldOut], i: usize| held.iter().find(|h| h.row == i).map(|h| h.p);
        let fold0: Vec<usize> = (0..calib.len())
            .filter(|&i| calibration_fold(&calib[i]) == 0)
            .collect();
        assert!(fold0.len() > 20, "{}", fold0.len());
        assert_eq!(refit["features"], 1, "{refit}");
        for &i in &fold0 {
            assert!(p_of(&before, i).is_some(), "row {i}");
            assert_eq!(p_of(&before, i), p_of(&after, i), "row {i}");
        }
        assert!(
            (0..calib.len()).any(|i| !fold0.contains(&i) && p_of(&before, i) != p_of(&after, i))
        );
        // Each p sits on its own row: a different answer in one row of fold 0 moves that
        // row's p and no other of fold 0 (fitted without fold 0 either way).
        let j = fold0[0];
        let mut changed = calib.clone();
        changed[j].response = Some("Reasoning done. The answer is (H).".into());
        changed[j].score = Some(0.0);
        if calib[j].response == changed[j].response {
            changed[j].response = Some("Reasoning done. The answer is (B).".into());
            changed[j].score = Some(1.0);
        }
        let (refit3, moved) = held_for(&changed)?;
        assert_eq!(refit["features"], refit3["features"]);
        assert_ne!(p_of(&before, j), p_of(&moved, j), "row {j}");
        for &i in fold0.iter().filter(|&&i| i != j) {
            assert_eq!(p_of(&before, i), p_of(&moved, i), "row {i}");
        }
        Ok(())
    }

    #[test]
    fn few_answers_keep_the_trained_thresholds() -> Result<()> {
        let trained = trained_heads()?;
        let mut h = trained.clone();
        let (calib, cf) = traffic(MIN_ROWS_FOR_THRESHOLDS - 1, 0, h.dim);
        let rep = adapt(&mut h, &calib, &cf, true)?;
        assert_eq!(rep["verify_thresholds"]["relearned"], false, "{rep}");
        assert_eq!(h.verify_thresholds, trained.verify_thresholds);
        assert_eq!(h.default_verify_threshold, trained.default_verify_threshold);
        Ok(())
    }

    #[test]
    fn few_calibration_rows_only_recombine() -> Result<()> {
        let mut h = trained_heads()?;
        let (calib, cf) = traffic(100, 0, h.dim);
        let rep = adapt(&mut h, &calib, &cf, true)?;
        assert_eq!(rep["verifier_refit"]["features"].as_u64(), Some(1), "{rep}");
        Ok(())
    }
}
