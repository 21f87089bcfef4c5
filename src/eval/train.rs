//! `tiergate train`: fits the router (IRT-style abilities over shared prompt skills) and the
//! verifier on the train split, selecting everything on prompts held back from it, and reports
//! figures on the dev split only.
//!
//! Split of the train prompts (seeded, by prompt id): 70% fit the router while it is selected
//! on the other 30%. The verifier fits on 90% (router logits out of fold: each row's from a
//! router fitted without its fold) and is calibrated on the last 10% (router logits from the
//! 70% router). The router is then refitted on all train prompts for the same number of steps.
#![forbid(unsafe_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::data::{read_catalog, read_rows, Row};
use super::embed::{Embedder, RowFeatures};
use super::fit::{self, RouterFit, RouterRows};
use super::score::{offline_encoder, score_with, EncoderArgs};
use super::util::{hash_str, judge_biased, judge_gaming};
use crate::model::answer;
use crate::model::heads::{self, Ability, Heads, LinearHead, ModelInfo, RouterHead, VerifierHead};
use crate::model::trees::{boost, BoostParams, Rows};

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Folder with train.jsonl.gz, dev.jsonl.gz and catalog.json.
    #[arg(long, default_value = "../shared/data")]
    pub data_dir: PathBuf,
    /// Where to write the heads.
    #[arg(long, default_value = "models/heads.json")]
    pub out: PathBuf,
    /// Encoder outputs are cached here (keyed by encoder revision and inputs).
    #[arg(long, default_value = "models/cache")]
    pub cache_dir: PathBuf,
    /// Most answers the verifier fits and calibrates on (from the held-back train prompts;
    /// 0 = all of them).
    #[arg(long, default_value_t = 0)]
    pub verify_rows: usize,
    /// F > 0: the verifier fits on every train prompt outside the calibration part, each
    /// row's router logit from a router fitted without its fold (F folds); 0: only on the 20%
    /// verifier part, logits from the router fitted on the 70% router part.
    #[arg(long, default_value_t = 5)]
    pub verify_folds: usize,
    /// Most boosting rounds of the verifier's trees (cut at the best on held-back rows; 0 =
    /// linear head only).
    #[arg(long, default_value_t = 600)]
    pub verify_trees: usize,
    /// Learning rate (shrinkage) of those trees.
    #[arg(long, default_value_t = 0.1)]
    pub verify_tree_lr: f32,
    /// Depth of those trees (1–8).
    #[arg(long, default_value_t = 3)]
    pub verify_tree_depth: usize,
    /// Dev rows used to report the verifier's figures.
    #[arg(long, default_value_t = 6000)]
    pub verify_dev_rows: usize,
    /// Answer tokens the verifier reads (the answer's tail mostly).
    #[arg(long, default_value_t = 128)]
    pub max_answer_tokens: usize,
    /// Skills shared by all models (router rank).
    #[arg(long, default_value_t = 16)]
    pub k: usize,
    #[arg(long, default_value_t = 400)]
    pub steps: usize,
    /// Leave this source out of training (leave-one-source-out figures).
    #[arg(long)]
    pub exclude_source: Option<String>,
    /// Model card to write (markdown) beside the heads; "" skips it (clap's path parser
    /// would refuse an empty value, hence the string parser).
    #[arg(long, default_value = "models/README.md",
          value_parser = clap::builder::TypedValueParser::map(
              clap::builder::StringValueParser::new(), PathBuf::from))]
    pub card: PathBuf,
    /// Share of the verifier's fit rows that also get each kind of non-answer (another
    /// prompt's answer, the prompt given back; see `non_answers`); 0 = none.
    #[arg(long, default_value_t = 0.05)]
    pub non_answers: f64,
    /// Use at most this many prompts per split (quick runs, tests); 0 = all.
    #[arg(long, default_value_t = 0)]
    pub max_prompts: usize,
    #[arg(long, default_value_t = 20261124)]
    pub seed: u64,
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

fn limit_prompts(rows: Vec<Row>, max: usize, seed: u64) -> Vec<Row> {
    if max == 0 {
        return rows;
    }
    let mut ids: Vec<&str> = rows.iter().map(|r| r.prompt_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.sort_by_key(|id| hash_str(seed, id));
    let keep: std::collections::HashSet<String> =
        ids.iter().take(max).map(|s| s.to_string()).collect();
    rows.into_iter()
        .filter(|r| keep.contains(&r.prompt_id))
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    RouterFit,
    VerifierFit,
    Calibrate,
}

fn part_of(seed: u64, r: &Row) -> Part {
    match hash_str(seed ^ 0x51, &format!("{}/{}", r.source, r.prompt_id)) % 100 {
        0..70 => Part::RouterFit,
        70..90 => Part::VerifierFit,
        _ => Part::Calibrate,
    }
}

fn router_rows(
    rows: &[Row],
    f: &RowFeatures,
    models: &BTreeMap<String, usize>,
    keep: impl Fn(&Row) -> bool,
) -> RouterRows {
    RouterRows {
        rows: rows
            .iter()
            .enumerate()
            .filter(|(_, r)| keep(r))
            .filter_map(|(i, r)| {
                Some((
                    f.prompt_of_row[i] as u32,
                    *models.get(&r.model)? as u32,
                    r.score? as f32,
                ))
            })
            .collect(),
    }
}

fn router_loss(fit: &RouterFit, f: &RowFeatures, data: &RouterRows) -> f64 {
    let (z, s) = fit.prompt_features(&f.prompt_emb, f.dim);
    let k = fit.k;
    let mut loss = 0.0;
    for &(p, m, y) in &data.rows {
        let p = p as usize;
        let l = fit.logit(&z[p * k..(p + 1) * k], s[p], m as usize);
        loss += fit::bce(crate::base::sigmoid(l as f64), y as f64);
    }
    loss / data.rows.len().max(1) as f64
}

fn to_head(fit: &RouterFit, names: &[String]) -> RouterHead {
    let k = fit.k;
    let models: BTreeMap<String, Ability> = names
        .iter()
        .enumerate()
        .map(|(m, n)| {
            (
                n.clone(),
                Ability {
                    u: fit.u[m * k..(m + 1) * k].to_vec(),
                    b: fit.b[m],
                },
            )
        })
        .collect();
    let n = names.len().max(1) as f32;
    let prior = Ability {
        u: (0..k)
            .map(|j| models.values().map(|a| a.u[j]).sum::<f32>() / n)
            .collect(),
        b: models.values().map(|a| a.b).sum::<f32>() / n,
    };
    RouterHead {
        k,
        proj: fit.proj.clone(),
        easiness: LinearHead {
            w: fit.w.clone(),
            b: fit.c,
        },
        models,
        prior,
    }
}

/// Flags first: a bad one should not cost the encoder pass.
fn check_flags(a: &TrainArgs) -> Result<()> {
    if a.verify_folds == 1 {
        bail!("--verify-folds 1 leaves no rows to fit a fold's router: use 0 or at least 2");
    }
    if !(a.verify_tree_lr.is_finite() && a.verify_tree_lr > 0.0) {
        bail!("--verify-tree-lr must be a positive number");
    }
    if !(1..=8).contains(&a.verify_tree_depth) {
        bail!("--verify-tree-depth must be in 1..=8");
    }
    Ok(())
}

/// The router chosen on held-back prompts, and the same settings refitted on all of them.
struct RouterChoice {
    /// Fitted on the router part only: what scores the held-back prompts.
    held_head: RouterHead,
    /// Refitted on every train prompt: what ships.
    router: RouterHead,
    k: usize,
    l2: f32,
    steps: usize,
    held_loss: f64,
}

/// Model ids and their router column.
struct Names {
    names: Vec<String>,
    index: BTreeMap<String, usize>,
}

fn fit_routers(
    a: &TrainArgs,
    train: &[Row],
    tf: &RowFeatures,
    n: &Names,
    d: usize,
) -> Result<RouterChoice> {
    let seed = a.seed;
    let (names, index) = (&n.names, &n.index);
    let fit_rows = router_rows(train, tf, index, |r| part_of(seed, r) == Part::RouterFit);
    let held_rows = router_rows(train, tf, index, |r| part_of(seed, r) != Part::RouterFit);
    let all_rows = router_rows(train, tf, index, |_| true);
    let mut best: Option<(f64, f32, usize, RouterFit)> = None;
    for (k, l2) in [(a.k, 1e-4f32), (a.k, 1e-3), (a.k * 2, 1e-4)] {
        let (f, step, loss) = fit::fit_router(
            &tf.prompt_emb,
            d,
            names.len(),
            &fit_rows,
            k,
            l2,
            a.steps,
            seed,
            |f| Some(router_loss(f, tf, &held_rows)),
        );
        let loss = loss.unwrap_or(f64::INFINITY);
        eprintln!("router: k {k} L2 {l2:e}: held-back log-loss {loss:.4} at step {step}");
        if best.as_ref().is_none_or(|b| loss < b.0) {
            best = Some((loss, l2, step, f));
        }
    }
    let Some((held_loss, l2, steps, held_fit)) = best else {
        bail!("router: no fit")
    };
    let held_head = to_head(&held_fit, names);
    let k = held_fit.k;
    let (final_fit, _, _) = fit::fit_router(
        &tf.prompt_emb,
        d,
        names.len(),
        &all_rows,
        k,
        l2,
        steps,
        seed,
        |_| None,
    );
    Ok(RouterChoice {
        held_head,
        router: to_head(&final_fit, names),
        k,
        l2,
        steps,
        held_loss,
    })
}

/// Prices and usual answer length of every trained model.
fn model_infos(
    names: &[String],
    train: &[Row],
    prices: &BTreeMap<String, super::data::Price>,
) -> Result<BTreeMap<String, ModelInfo>> {
    let mut models = BTreeMap::new();
    for m in names {
        let price = prices
            .get(m)
            .with_context(|| format!("model {m} is missing from catalog.json"))?;
        let rows: Vec<&Row> = train.iter().filter(|r| &r.model == m).collect();
        // Token counts come from the file: saturate rather than overflow.
        let tok = rows
            .iter()
            .map(|r| r.response_tokens.unwrap_or(1))
            .fold(0u64, u64::saturating_add);
        models.insert(
            m.clone(),
            ModelInfo {
                in_usd_per_mtok: price.in_usd_per_mtok,
                out_usd_per_mtok: price.out_usd_per_mtok,
                mean_output_tokens: (tok / rows.len().max(1) as u64).clamp(1, u32::MAX.into())
                    as u32,
                train_rows: rows.len(),
                pass_fail: Some(
                    rows.iter()
                        .all(|r| r.score.is_none_or(|s| s == 0.0 || s == 1.0)),
                ),
            },
        );
    }
    Ok(models)
}

/// Answers that do not answer their prompt, as verifier training rows: for a `share` of the
/// fit part's rows each, another prompt's answer by the same model of the same source, and
/// the prompt itself given back. Trained on matched pairs alone, the verifier rated both like
/// real answers (dev AlpacaEval: another prompt's answer at or above the real one's p for 16%
/// of the rows, the prompt echoed for 40%; models/EVAL.md). Labels: on a prompt that offers
/// options, another answer passes when its pick is this prompt's key (read off the rows that
/// passed; rows whose key is unknown are skipped); elsewhere, and for an echo, 0. Never in the
/// calibration part: the trees' length, the Platt scaling and Verify's thresholds are
/// learned on real answers only.
fn non_answers(
    vrows: &[Row],
    train: &[Row],
    part: impl Fn(&Row) -> Part,
    seed: u64,
    share: f64,
) -> Vec<Row> {
    if share <= 0.0 {
        return Vec::new();
    }
    let cut = (share * 1e6) as u64;
    let key = |r: &Row| format!("{}/{}", r.source, r.prompt_id);
    // A prompt's key: the letter its passing answers picked.
    let mut keys: BTreeMap<String, char> = BTreeMap::new();
    for r in train.iter().filter(|r| r.score == Some(1.0)) {
        if let (Some(c), 1) = answer::chosen(r.response.as_deref().unwrap_or("")) {
            keys.entry(key(r)).or_insert(c);
        }
    }
    let fit: Vec<&Row> = vrows
        .iter()
        .filter(|r| part(r) != Part::Calibrate)
        .collect();
    // Donors: the fit part's answers by (source, model), in a fixed order.
    let mut donors: BTreeMap<(&str, &str), Vec<&Row>> = BTreeMap::new();
    for &r in &fit {
        donors
            .entry((r.source.as_str(), r.model.as_str()))
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    for &r in &fit {
        let prompt_key = key(r);
        let id = format!("{prompt_key}/{}", r.model);
        let h = hash_str(seed ^ 0xa11e, &id);
        if h % 1_000_000 < cut {
            let group = &donors[&(r.source.as_str(), r.model.as_str())];
            let other = group[(h / 1_000_000) as usize % group.len()];
            let has_options = !answer::options(&r.prompt).is_empty();
            let label = match (has_options, keys.get(&prompt_key)) {
                (false, _) => Some(0.0),
                (true, Some(&k)) => {
                    let picked = answer::chosen(other.response.as_deref().unwrap_or("")).0;
                    Some(if picked == Some(k) { 1.0 } else { 0.0 })
                }
                (true, None) => None,
            };
            if let Some(y) = label.filter(|_| other.prompt_id != r.prompt_id) {
                out.push(Row {
                    response: other.response.clone(),
                    score: Some(y),
                    ..r.clone()
                });
            }
        }
        if hash_str(seed ^ 0xec40, &id) % 1_000_000 < cut {
            out.push(Row {
                response: Some(r.prompt.clone()),
                score: Some(0.0),
                ..r.clone()
            });
        }
    }
    out
}

/// The verifier's inputs and labels, fit part and calibration part (x row-major).
struct VerifyXy {
    fx: Vec<f32>,
    fy: Vec<f32>,
    cx: Vec<f32>,
    cy: Vec<f32>,
}

/// Verifier rows with out-of-fold router logits: fold f's rows are read by a router fitted on
/// the other folds (the calibration part never fits one, and is read by the 70% router in
/// `stage`).
#[allow(clippy::too_many_arguments)]
fn verifier_xy(
    a: &TrainArgs,
    stage: &Heads,
    rc: &RouterChoice,
    n: &Names,
    train: &[Row],
    tf: &RowFeatures,
    vrows: &[Row],
    vf: &RowFeatures,
) -> Result<VerifyXy> {
    let (seed, folds, d) = (a.seed, a.verify_folds, stage.dim);
    let fold_of = |r: &Row| {
        (hash_str(seed ^ 0xf01d, &format!("{}/{}", r.source, r.prompt_id)) % folds.max(1) as u64)
            as usize
    };
    let mut fold_heads: Vec<Heads> = Vec::with_capacity(folds);
    for f in 0..folds {
        let rows = router_rows(train, tf, &n.index, |r| {
            part_of(seed, r) != Part::Calibrate && fold_of(r) != f
        });
        let (fit, _, _) = fit::fit_router(
            &tf.prompt_emb,
            d,
            n.names.len(),
            &rows,
            rc.k,
            rc.l2,
            rc.steps,
            seed,
            |_| None,
        );
        fold_heads.push(Heads {
            router: to_head(&fit, &n.names),
            ..stage.clone()
        });
        eprintln!("verifier: router without fold {}/{folds} fitted", f + 1);
    }
    let (mut fx, mut fy, mut cx, mut cy) = (vec![], vec![], vec![], vec![]);
    for (i, r) in vrows.iter().enumerate() {
        let calibrate = part_of(seed, r) == Part::Calibrate;
        let h = match fold_heads.get(fold_of(r)) {
            Some(h) if !calibrate => h,
            _ => stage,
        };
        let Some(x) = vf.verify_x(h, i, r) else {
            continue;
        };
        let y = r.score.unwrap_or(0.0) as f32;
        if !calibrate {
            fx.extend(x);
            fy.push(y);
        } else {
            cx.extend(x);
            cy.push(y);
        }
    }
    if fy.len() < 50 || cy.len() < 20 {
        bail!(
            "verifier: too few rows ({} fit, {} calibrate); raise --verify-rows",
            fy.len(),
            cy.len()
        );
    }
    Ok(VerifyXy { fx, fy, cx, cy })
}

/// The fitted verifier (linear head, trees on its residual, Platt scaling) and its
/// threshold table, with what was chosen.
struct VerifierFit {
    head: VerifierHead,
    thresholds: Vec<(f64, f64)>,
    l2: f64,
    platt: (f64, f64),
}

fn fit_verifier(a: &TrainArgs, d: usize, xy: &VerifyXy) -> Result<VerifierFit> {
    let VerifyXy { fx, fy, cx, cy } = xy;
    let nv = heads::verify_dim(d);
    let mut vbest: Option<(f64, f64, LinearHead)> = None;
    for l2 in [1e-5, 1e-4, 1e-3, 1e-2] {
        let h = fit::logistic(fx, nv, fy, l2)?;
        let loss = fit::head_log_loss(&h, cx, nv, cy);
        eprintln!("verifier: L2 {l2:e}: calibration-part log-loss {loss:.4}");
        if vbest.as_ref().is_none_or(|b| loss < b.0) {
            vbest = Some((loss, l2, h));
        }
    }
    let Some((linear_loss, verify_l2, vh)) = vbest else {
        bail!("verifier: no fit")
    };
    // Trees on the linear head's residual, cut at the round of least calibration-part loss.
    let (fb, cb): (Vec<f32>, Vec<f32>) = (
        fx.chunks_exact(nv).map(|x| vh.logit(x)).collect(),
        cx.chunks_exact(nv).map(|x| vh.logit(x)).collect(),
    );
    let bp = BoostParams {
        rounds: a.verify_trees,
        learning_rate: a.verify_tree_lr,
        depth: a.verify_tree_depth,
        ..Default::default()
    };
    let (trees, rep) = boost(
        &Rows {
            x: fx,
            y: fy,
            base: &fb,
        },
        Some(&Rows {
            x: cx,
            y: cy,
            base: &cb,
        }),
        nv,
        &heads::tree_inputs(d),
        &bp,
    )?;
    eprintln!(
        "verifier: {} trees kept of {}; calibration-part log-loss {linear_loss:.4} → {:.4}",
        rep.rounds_kept,
        bp.rounds,
        rep.rounds_kept
            .checked_sub(1)
            .and_then(|r| rep.valid_loss.get(r))
            .copied()
            .unwrap_or(linear_loss)
    );
    let vhead = VerifierHead {
        head: vh,
        trees,
        platt_a: 1.0,
        platt_b: 0.0,
        router_coef: 0.0,
    };
    let cz: Vec<f64> = cx
        .chunks_exact(nv)
        .map(|x| vhead.raw_logit(x) as f64)
        .collect();
    let (pa, pb) = fit::platt(&cz, cy)?;
    eprintln!("verifier: Platt a {pa:.3} b {pb:.3} on {} rows", cy.len());
    let cp: Vec<f64> = cz
        .iter()
        .map(|&z| crate::base::sigmoid(pa * z + pb))
        .collect();
    let thresholds = fit::threshold_table(&cp, cy);
    eprintln!("verifier: thresholds per floor {thresholds:?}");
    Ok(VerifierFit {
        head: VerifierHead {
            platt_a: pa as f32,
            platt_b: pb as f32,
            ..vhead
        },
        thresholds,
        l2: verify_l2,
        platt: (pa, pb),
    })
}

/// A short hash of what decides: the heads' revision.
fn heads_revision(out: &Heads) -> Result<String> {
    let h = super::util::str_hash(&serde_json::to_string(&(
        &out.router,
        &out.verifier,
        out.default_quality_floor,
        out.default_verify_threshold,
    ))?);
    Ok(format!("{:012x}", h & 0xffff_ffff_ffff))
}

pub fn run(a: TrainArgs) -> Result<()> {
    let seed = a.seed;
    check_flags(&a)?;
    let mut train = limit_prompts(
        read_rows(&a.data_dir.join("train.jsonl.gz"))?,
        a.max_prompts,
        seed,
    );
    let dev = limit_prompts(
        read_rows(&a.data_dir.join("dev.jsonl.gz"))?,
        a.max_prompts,
        seed,
    );
    if let Some(src) = &a.exclude_source {
        train.retain(|r| &r.source != src);
        eprintln!("leaving source {src} out of training");
    }
    let prices = read_catalog(&a.data_dir.join("catalog.json"))?;
    eprintln!("train {} rows, dev {} rows", train.len(), dev.len());

    let enc = offline_encoder(&a.encoder, a.max_answer_tokens)?;
    let d = enc.dim();
    let emb = Embedder {
        enc: &enc,
        cache_dir: Some(a.cache_dir.clone()),
    };
    let tf = RowFeatures::compute(&emb, "train", &train, false, a.max_answer_tokens)?;

    // ---- router ----
    let names: Vec<String> = {
        let mut v: Vec<String> = train.iter().map(|r| r.model.clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    let index: BTreeMap<String, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i))
        .collect();
    let n = Names { names, index };
    let rc = fit_routers(&a, &train, &tf, &n, d)?;

    // ---- verifier, on out-of-sample router logits ----
    let folds = a.verify_folds;
    let verifier_part = |r: &Row| match part_of(seed, r) {
        Part::RouterFit => folds > 0,
        Part::VerifierFit | Part::Calibrate => true,
    };
    let mut vrows: Vec<Row> = train
        .iter()
        .filter(|r| verifier_part(r) && r.response.is_some() && r.score.is_some())
        .filter(|r| !judge_biased(&r.model))
        .cloned()
        .collect();
    vrows.sort_by_key(|r| {
        hash_str(
            seed ^ 7,
            &format!("{}/{}/{}", r.source, r.prompt_id, r.model),
        )
    });
    if a.verify_rows > 0 {
        vrows.truncate(a.verify_rows);
    }
    let extra = non_answers(&vrows, &train, |r| part_of(seed, r), seed, a.non_answers);
    eprintln!(
        "verifier: {} non-answers added to its fit part",
        extra.len()
    );
    vrows.extend(extra);
    let vf = RowFeatures::compute(&emb, "verify", &vrows, true, a.max_answer_tokens)?;
    let models = model_infos(&n.names, &train, &prices)?;
    let mut stage = Heads {
        format: heads::FORMAT,
        revision: String::new(),
        encoder_revision: enc.model_revision.clone(),
        dim: d,
        max_input_tokens: enc.tokenizer.max_tokens(),
        max_answer_tokens: a.max_answer_tokens,
        router: rc.held_head.clone(),
        verifier: VerifierHead {
            head: LinearHead {
                w: vec![0.0; heads::verify_dim(d)],
                b: 0.0,
            },
            platt_a: 1.0,
            platt_b: 0.0,
            router_coef: 0.0,
            trees: Default::default(),
        },
        models: models.clone(),
        default_verify_threshold: 0.5,
        default_quality_floor: None,
        verify_thresholds: vec![],
        metrics: json!({}),
        calibrated: Default::default(),
        priors: Default::default(),
        memory: None,
    };
    let xy = verifier_xy(&a, &stage, &rc, &n, &train, &tf, &vrows, &vf)?;
    let vfit = fit_verifier(&a, d, &xy)?;
    let (pa, pb) = vfit.platt;

    // ---- assemble, then measure on dev ----
    let mut out = Heads {
        router: rc.router.clone(),
        verifier: vfit.head,
        models,
        ..stage.clone()
    };
    // Defaults learned on the 30% of prompts held back from the router, scored by the router
    // fitted without them (`stage`; the final router has seen them): the floor, then the
    // Verify threshold that floor maps to.
    let (floor, floor_report) = learn_default_floor(&stage, &train, &tf, seed)?;
    out.default_quality_floor = Some(floor);
    out.set_verify_thresholds(vfit.thresholds);
    eprintln!(
        "default quality floor {floor:.2} (verify threshold {:.3}): {floor_report}",
        out.default_verify_threshold
    );
    stage.metrics = json!({});
    let mut dev_rows = dev.clone();
    dev_rows.sort_by_key(|r| {
        hash_str(
            seed ^ 9,
            &format!("{}/{}/{}", r.source, r.prompt_id, r.model),
        )
    });
    dev_rows.truncate(a.verify_dev_rows.max(1));
    let df = RowFeatures::compute(&emb, "dev", &dev_rows, true, a.max_answer_tokens)?;
    let dev_metrics = dev_figures(&out, &dev_rows, &df);
    eprintln!(
        "dev figures: {}",
        serde_json::to_string_pretty(&dev_metrics)?
    );
    out.metrics = json!({
        "split": "dev rows (never used to fit or select)",
        "dev_rows": dev_rows.len(),
        "exclude_source": a.exclude_source,
        "router": { "k": rc.k, "l2": rc.l2, "steps": rc.steps, "held_back_log_loss": rc.held_loss },
        "verifier": { "l2": vfit.l2, "platt_a": pa, "platt_b": pb, "fit_rows": xy.fy.len(), "calibration_rows": xy.cy.len() },
        "default_floor": floor_report,
        "dev": dev_metrics,
    });
    out.revision = heads_revision(&out)?;
    out.validate()?;
    write_heads(&a.out, &out)?;
    eprintln!("wrote {}", a.out.display());
    if !a.card.as_os_str().is_empty() {
        std::fs::write(&a.card, model_card(&out, &a))
            .with_context(|| format!("writing {}", a.card.display()))?;
        eprintln!("wrote {}", a.card.display());
    }
    Ok(())
}

/// Route's default quality floor, learned where the router never fitted (the 30% of train
/// prompts held back from it): per source the tier ladder `tiergate eval` uses, route-only
/// at floors 0.30–0.95; the lowest floor at which every source keeps ≥ 98% of its
/// best tier model's quality. If no floor does, the one with the best worst-source ratio.
fn learn_default_floor(
    h: &Heads,
    train: &[Row],
    tf: &RowFeatures,
    seed: u64,
) -> Result<(f64, serde_json::Value)> {
    use super::replay::{plan_source, Replay, TARGET};
    let held_idx: Vec<usize> = (0..train.len())
        .filter(|&i| part_of(seed, &train[i]) != Part::RouterFit && train[i].score.is_some())
        .collect();
    let held: Vec<Row> = held_idx.iter().map(|&i| train[i].clone()).collect();
    let mut sources: Vec<&str> = held.iter().map(|r| r.source.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    let grid: Vec<f64> = (30..=95).map(|i| i as f64 / 100.0).collect();
    // Per source: (name, prompts, best quality, best cost, route-only points over the grid).
    let mut curves = Vec::new();
    for src in sources {
        let Ok(plan) = plan_source(src, &held, train, 0, seed) else {
            continue; // no tier on this source's held-back prompts
        };
        if plan.prompts.is_empty() || plan.tier.len() < 2 {
            continue;
        }
        let rows = &plan.rows;
        let r = Replay {
            m: plan.tier.len(),
            score: rows.iter().map(|&i| held[i].score.unwrap_or(0.0)).collect(),
            cost: rows
                .iter()
                .map(|&i| held[i].cost_usd.unwrap_or(0.0))
                .collect(),
            route: rows
                .iter()
                .map(|&i| h.route_p(&held[i].model, tf.prompt(held_idx[i])))
                .collect(),
            verify: vec![None; rows.len()],
            knn: vec![0.0; rows.len()],
        };
        let best = (0..r.m).map(|j| r.single(j)).max_by(|a, b| {
            a.quality
                .total_cmp(&b.quality)
                .then(b.cost.total_cmp(&a.cost))
        });
        let Some(best) = best else { continue };
        curves.push((
            src.to_string(),
            plan.prompts.len(),
            best,
            r.route_curve(&r.route, &grid),
        ));
    }
    if curves.is_empty() {
        let floor = heads::FALLBACK_FLOOR;
        eprintln!("default floor: no source has a tier on the held-back prompts; using {floor}");
        return Ok((
            floor,
            json!({ "floor": floor, "met": false, "reason": "no tier on the held-back prompts" }),
        ));
    }
    let ratios: Vec<Vec<f64>> = curves
        .iter()
        .map(|(_, _, b, pts)| {
            // A source whose best model scores 0 is met by any floor.
            pts.iter()
                .map(|p| {
                    if b.quality > 0.0 {
                        p.quality / b.quality
                    } else {
                        1.0
                    }
                })
                .collect()
        })
        .collect();
    let g = choose_floor(&ratios, TARGET);
    let worst_ratio = |g: usize| ratios.iter().map(|r| r[g]).fold(f64::INFINITY, f64::min);
    let report: serde_json::Map<String, serde_json::Value> = curves
        .iter()
        .map(|(s, n, b, pts)| {
            (
                s.clone(),
                json!({
                    "held_back_prompts": n,
                    "quality_of_best": pts[g].quality / b.quality.max(1e-12),
                    "cost_saved_vs_best": 1.0 - pts[g].cost / b.cost.max(1e-300),
                }),
            )
        })
        .collect();
    // The trade-off around it: per floor, each source's (quality / best, cost saved).
    let by_floor: serde_json::Map<String, serde_json::Value> = (0..grid.len())
        .filter(|&i| i % 5 == 0 || i == g)
        .map(|i| {
            let per: serde_json::Map<String, serde_json::Value> = curves
                .iter()
                .map(|(s, _, b, pts)| {
                    let q = pts[i].quality / b.quality.max(1e-12);
                    let saved = 1.0 - pts[i].cost / b.cost.max(1e-300);
                    (s.clone(), json!([q, saved]))
                })
                .collect();
            (format!("{:.2}", grid[i]), serde_json::Value::Object(per))
        })
        .collect();
    Ok((
        grid[g],
        json!({ "floor": grid[g], "target_of_best": TARGET, "met": worst_ratio(g) >= TARGET,
                "sources": report, "by_floor_quality_of_best_and_saved": by_floor }),
    ))
}

/// Index of the lowest grid floor at which every source's quality ratio (route-only quality /
/// best model's, one row per source, one column per floor) reaches `target`; if none does,
/// the floor with the best worst-source ratio (the lowest such on ties).
fn choose_floor(ratios: &[Vec<f64>], target: f64) -> usize {
    let n = ratios.iter().map(Vec::len).min().unwrap_or(0);
    let worst = |g: usize| ratios.iter().map(|r| r[g]).fold(f64::INFINITY, f64::min);
    (0..n).find(|&g| worst(g) >= target).unwrap_or_else(|| {
        (0..n)
            .rev()
            .max_by(|&a, &b| worst(a).total_cmp(&worst(b)))
            .unwrap_or(0)
    })
}

/// Router and verifier AUROC / ECE per source (and pooled) on labelled rows.
pub fn dev_figures(h: &Heads, rows: &[Row], f: &RowFeatures) -> serde_json::Value {
    let scores = score_with(h, rows, f);
    /// Per group: p_route, p_verify, pass, score, judge-gaming overestimates.
    type Group = (Vec<f64>, Vec<f64>, Vec<bool>, Vec<f32>, Vec<f64>);
    let mut by: BTreeMap<String, Group> = BTreeMap::new();
    for (r, (pr, pv)) in rows.iter().zip(&scores) {
        let Some(s) = r.score else { continue };
        for key in [r.source.clone(), "all".to_string()] {
            let e = by.entry(key).or_default();
            e.0.push(*pr);
            e.1.push(pv.unwrap_or(*pr));
            e.2.push(s >= 0.5);
            e.3.push(s as f32);
            if judge_gaming(&r.model) {
                e.4.push(pv.unwrap_or(*pr) - s);
            }
        }
    }
    let mut out = serde_json::Map::new();
    for (k, (pr, pv, y, ys, gamed)) in by {
        out.insert(
            k,
            json!({
                "rows": y.len(),
                "router_auroc": fit::auroc(&pr, &y),
                "router_ece": fit::ece(&pr, &ys, 15),
                "verifier_auroc": fit::auroc(&pv, &y),
                "verifier_ece": fit::ece(&pv, &ys, 15),
                "judge_gaming_rows": gamed.len(),
                "judge_gaming_mean_overestimate": if gamed.is_empty() { None } else { Some(gamed.iter().sum::<f64>() / gamed.len() as f64) },
            }),
        );
    }
    serde_json::Value::Object(out)
}

fn model_card(h: &Heads, a: &TrainArgs) -> String {
    let m = &h.metrics;
    let f = |v: &serde_json::Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.3}"));
    let mut s = String::new();
    s.push_str("# Model card: tiergate heads\n\n");
    s.push_str("Written by `tiergate train` (do not edit by hand; re-run it). ");
    s.push_str(&format!(
        "Heads revision `{}`, encoder all-MiniLM-L6-v2 revision `{}` (frozen), seed {}.\n\n",
        h.revision, h.encoder_revision, a.seed
    ));
    s.push_str("## What it predicts\n\n");
    s.push_str("- **Router**: P(model m passes | prompt), IRT-style: prompt easiness + abilities of each model over ");
    s.push_str(&format!(
        "k = {} skills shared by all models. {} models have their own abilities; any other model uses the mean ability ",
        h.router.k,
        h.router.models.len()
    ));
    s.push_str("until `tiergate score --calibration` fits its k + 1 numbers from labelled rows.\n");
    s.push_str(&format!(
        "- **Verifier**: P(pass | prompt, answer, model): logistic over the router logit, {} answer-form features ",
        heads::FORM_FEATURES
    ));
    s.push_str(&format!(
        "(length, refusal, hedging, abrupt ending, explicit final answer, lines, code, truncation, relative length), {} \
         features of the pair's text (`src/model/answer.rs`: for multiple-choice prompts the option picked, whether it is \
         valid, its length rank and position among the options, whether its text and numbers appear in the reasoning, \
         where its value sits among numeric options, changed picks; for any answer repetition and approximation words), products of these with the router logit, \
         the multiple-choice flag and a bare-letter flag, the answer's length against its model's usual, the \
         prompt–answer cosine and the answer's embedding (last {} tokens mostly); plus {} boosted depth-3 trees over the \
         non-embedding features (`src/model/trees.rs`, on the linear head's residual, cut at the round of least \
         held-back log-loss); Platt-scaled on held-back rows. ",
        answer::TEXT_FEATURES,
        h.max_answer_tokens,
        h.verifier.trees.trees.len()
    ));
    s.push_str("Outputs whose grade rides the judge's length bias (`*_verbose`, `*_concise`) are excluded from its training; \
         `gpt4_gamed`'s (ten-character heads of answers, graded failing) are in it. ");
    if a.non_answers > 0.0 {
        s.push_str(&format!(
            "Its fit part also holds non-answers ({:.0}% of its rows each): another prompt's answer by the same model \
             (on a prompt with options, passing when its pick is this prompt's key, else failing) and the prompt given \
             back (failing); never its calibration part.",
            100.0 * a.non_answers
        ));
    }
    s.push_str("\n\n");
    s.push_str("## Data and selection\n\n");
    s.push_str("Train split of `../shared/data` (see its README). Train prompts are split by a seeded hash: 70% fit the router ");
    s.push_str("while its rank, L2 and step count are chosen on the other 30%; ");
    if a.verify_folds > 0 {
        s.push_str(&format!(
            "the verifier is fitted on 90% (each row's router logit from a router fitted without its fold, {} folds) ",
            a.verify_folds
        ));
    } else {
        s.push_str("the verifier is fitted on 20% (out-of-sample router logits) ");
    }
    s.push_str("and calibrated on the last 10% (trees cut, L2 and Platt chosen there); the router is then refitted on all train prompts. ");
    if let Some(src) = &a.exclude_source {
        s.push_str(&format!("**Source `{src}` was left out of training.** "));
    }
    s.push_str("Figures below are on dev rows only, which never fitted or selected anything.\n\n");
    s.push_str("## Dev figures\n\n| source | rows | router AUROC | router ECE | verifier AUROC | verifier ECE | judge-gaming rows: mean p − score |\n|---|---:|---:|---:|---:|---:|---:|\n");
    if let Some(dev) = m.get("dev").and_then(|d| d.as_object()) {
        for (src, v) in dev {
            s.push_str(&format!(
                "| {src} | {} | {} | {} | {} | {} | {} |\n",
                v["rows"],
                f(&v["router_auroc"]),
                f(&v["router_ece"]),
                f(&v["verifier_auroc"]),
                f(&v["verifier_ece"]),
                f(&v["judge_gaming_mean_overestimate"])
            ));
        }
    }
    s.push_str("\n## Verify thresholds per quality floor (held-back rows)\n\n| floor | threshold |\n|---:|---:|\n");
    for (fl, t) in &h.verify_thresholds {
        s.push_str(&format!("| {fl:.2} | {t:.3} |\n"));
    }
    s.push_str(&format!(
        "\nDefault threshold (for the default floor): {:.3}. Beyond the table the floor itself applies.\n\n",
        h.default_verify_threshold
    ));
    if let Some(fl) = h.default_quality_floor {
        let d = &m["default_floor"];
        s.push_str(&format!(
            "## Default quality floor: {fl:.2} (learned)\n\nRoute's default floor is the lowest p_pass floor at which route-only keeps ≥ {:.0}% of the best \
             tier model's quality on every source, on the train prompts held back from the router (the tier ladders of \
             `tiergate eval`; met: {}). One floor serves all traffic, so the hardest source sets it; a client that \
             knows its traffic passes its own `policy.quality_floor`. Quality / best and cost saved per source:\n\n\
             | floor | {} |\n|---:|{}\n",
            100.0 * d["target_of_best"].as_f64().unwrap_or(0.98),
            d["met"],
            d["sources"].as_object().map_or(String::new(), |o| o.keys().cloned().collect::<Vec<_>>().join(" | ")),
            d["sources"].as_object().map_or(String::new(), |o| "---:|".repeat(o.len())),
        ));
        if let Some(rows) = d["by_floor_quality_of_best_and_saved"].as_object() {
            for (f, per) in rows {
                let cells: Vec<String> = per
                    .as_object()
                    .map(|o| {
                        o.values()
                            .map(|v| {
                                format!(
                                    "{:.1}% / {:.1}%",
                                    100.0 * v[0].as_f64().unwrap_or(f64::NAN),
                                    100.0 * v[1].as_f64().unwrap_or(f64::NAN)
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let mark = if f == &format!("{fl:.2}") {
                    " (default)"
                } else {
                    ""
                };
                s.push_str(&format!("| {f}{mark} | {} |\n", cells.join(" | ")));
            }
        }
        s.push('\n');
    }
    s.push_str("## Limits\n\n- The encoder is frozen and small: it sees topic, form and difficulty cues, not correctness of reasoning; ");
    s.push_str("verifier AUROC on MMLU-Pro-style chain-of-thought answers is bounded by that.\n");
    s.push_str("- Models differ by source: each data model was only observed on one source, so abilities do not transfer across ");
    s.push_str("sources for a given model; the default catalog's current models borrow heads (`like`) as a stop-gap.\n");
    s.push_str("- Replay figures (cost–quality curves, kNN baseline, leave-one-source-out) are in `models/EVAL.md`.\n");
    s
}

fn write_heads(path: &Path, h: &Heads) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string(h)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    #[test]
    fn an_empty_card_path_parses_and_means_none() {
        use clap::Parser;
        let c = Cli::try_parse_from(["train", "--card", ""]).map_err(|e| e.to_string());
        assert_eq!(c.map(|c| c.train.card), Ok(PathBuf::new()));
        let c = Cli::try_parse_from(["train"]).map_err(|e| e.to_string());
        assert_eq!(
            c.map(|c| c.train.card),
            Ok(PathBuf::from("models/README.md"))
        );
    }

    /// Non-answers: every one is labelled as the benchmark would grade it (another prompt's
    /// pick passes only when it is this prompt's key; open-ended and echoed answers fail), only
    /// fit-part rows get them, and a share of 0 adds none.
    #[test]
    fn non_answers_are_labelled_as_graded_and_stay_out_of_calibration() {
        let row = |source: &str, id: usize, prompt: String, answer: &str, score: f64| {
            Row::labelled(source, format!("p{id}"), prompt, "m", answer, score)
        };
        let mut rows = Vec::new();
        for i in 0..200 {
            // Keys cycle A, B, C; the model picks A: right on a third of the prompts.
            let key = ['A', 'B', 'C'][i % 3];
            let prompt = format!("Question {i}?\nA) one\nB) two\nC) three\nAnswer:");
            rows.push(row(
                "mcq",
                i,
                prompt,
                "The answer is (A).",
                f64::from(key == 'A'),
            ));
            rows.push(row(
                "chat",
                i,
                format!("Tell me about {i}."),
                "Here it is.",
                0.8,
            ));
        }
        // What passed on prompt i is what the key of i is: passing answers there pick it.
        let mut train = rows.clone();
        for i in 0..200 {
            let key = ['A', 'B', 'C'][i % 3];
            let prompt = rows[2 * i].prompt.clone();
            train.push(row(
                "mcq",
                i,
                prompt,
                &format!("The answer is ({key})."),
                1.0,
            ));
        }
        let calib = |r: &Row| {
            if r.prompt_id.ends_with('7') {
                Part::Calibrate
            } else {
                Part::VerifierFit
            }
        };
        let extra = non_answers(&rows, &train, calib, 1, 0.5);
        assert!(extra.len() > 100, "{}", extra.len());
        assert!(extra.iter().all(|r| !r.prompt_id.ends_with('7')));
        let (mut passed, mut mcq_swaps) = (0, 0);
        for r in &extra {
            let i: usize = r.prompt_id[1..].parse().unwrap();
            let answer = r.response.as_deref().unwrap();
            if answer == r.prompt {
                assert_eq!(r.score, Some(0.0), "an echo fails");
            } else if r.source == "chat" {
                assert_eq!(r.score, Some(0.0), "another prompt's answer fails");
            } else {
                mcq_swaps += 1;
                let key = ['A', 'B', 'C'][i % 3];
                let picked = answer::chosen(answer).0;
                assert_eq!(r.score, Some(f64::from(picked == Some(key))), "{r:?}");
                passed += usize::from(r.score == Some(1.0));
            }
        }
        assert!(
            mcq_swaps > 20 && passed > 0 && passed < mcq_swaps,
            "{passed} of {mcq_swaps}"
        );
        assert!(non_answers(&rows, &train, calib, 1, 0.0).is_empty());
    }

    #[test]
    fn default_floor_is_the_lowest_meeting_the_target_everywhere() {
        // Source a reaches 0.98 at index 1, source b only at index 3.
        let a = vec![0.90, 0.98, 0.99, 1.00, 1.00];
        let b = vec![0.70, 0.80, 0.95, 0.985, 0.99];
        assert_eq!(choose_floor(&[a.clone(), b.clone()], 0.98), 3);
        assert_eq!(choose_floor(std::slice::from_ref(&a), 0.98), 1);
        // Unreachable: the best worst-source ratio, the lowest floor among equals.
        let c = vec![0.50, 0.60, 0.60, 0.55, 0.40];
        assert_eq!(choose_floor(&[a, c], 0.98), 1);
        assert_eq!(choose_floor(&[], 0.98), 0);
    }
}
