//! `tiergate train`: fits the route heads (one logistic head per data model on frozen prompt
//! embeddings) and the verifier (a logistic head on the prompt+answer pair embedding,
//! temperature-scaled), selecting the L2 strength and temperature on prompts held back from the
//! train split, and reporting figures on the dev split only.
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::data::{read_catalog, read_rows, Row};
use super::fit;
use crate::config::Config;
use crate::model::heads::{self, Heads, LinearHead, ModelInfo, VerifyHead};
use crate::model::tokenize::TruncSide;
use crate::pipeline::Encoder;

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Folder with train.jsonl.gz, dev.jsonl.gz and catalog.json.
    #[arg(long, default_value = "../shared/data")]
    pub data_dir: PathBuf,
    /// Where to write the heads.
    #[arg(long, default_value = "models/heads.json")]
    pub out: PathBuf,
    #[arg(long, default_value = "models/base")]
    pub model_dir: PathBuf,
    /// Encoder outputs are cached here (keyed by encoder revision and inputs).
    #[arg(long, default_value = "models/cache")]
    pub cache_dir: PathBuf,
    /// Training (prompt, answer) pairs for the verifier, spread evenly over sources.
    #[arg(long, default_value_t = 6000)]
    pub verify_pairs: usize,
    /// Dev pairs used to report the verifier's figures.
    #[arg(long, default_value_t = 1500)]
    pub verify_dev_pairs: usize,
    /// Use at most this many prompts per split (quick runs, tests); 0 = all.
    #[arg(long, default_value_t = 0)]
    pub max_prompts: usize,
    #[arg(long, default_value_t = 20261124)]
    pub seed: u64,
    /// Encoder threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Deterministic 64-bit mix (splitmix64): seeded shuffles and splits without a rand crate.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

pub fn hash_str(seed: u64, s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    mix(h.finish() ^ seed)
}

/// Embeds texts (single or pairs) through the encoder, cached on disk.
pub struct Embedder<'a> {
    pub enc: &'a Encoder,
    pub cache_dir: PathBuf,
}

impl Embedder<'_> {
    pub fn embed(&self, label: &str, inputs: &[(&str, Option<&str>)]) -> Result<Vec<f32>> {
        let dim = self.enc.dim();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.enc.model_revision.hash(&mut h);
        self.enc.tokenizer.max_tokens().hash(&mut h);
        self.enc.tokenizer.max_pair_tokens().hash(&mut h);
        inputs.hash(&mut h);
        let path = self
            .cache_dir
            .join(format!("{label}-{:016x}.f32", h.finish()));
        if let Ok(bytes) = std::fs::read(&path) {
            if bytes.len() == inputs.len() * dim * 4 {
                eprintln!(
                    "{label}: {} embeddings from cache {}",
                    inputs.len(),
                    path.display()
                );
                return Ok(bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect());
            }
        }
        let tok = &self.enc.tokenizer;
        let encoded = {
            let singles: Vec<&str> = inputs
                .iter()
                .filter(|i| i.1.is_none())
                .map(|i| i.0)
                .collect();
            let pairs: Vec<(&str, &str)> = inputs
                .iter()
                .filter_map(|i| i.1.map(|a| (i.0, a)))
                .collect();
            if !singles.is_empty() && !pairs.is_empty() {
                bail!("embed: mixed singles and pairs in one call");
            }
            if pairs.is_empty() {
                tok.encode_single_batch(&singles, TruncSide::HeadTail)?
            } else {
                tok.encode_pair_batch(&pairs)?
            }
        };
        let tokens: usize = encoded.iter().map(|e| e.ids.len()).sum();
        let pb = progress(inputs.len() as u64, label);
        let t0 = std::time::Instant::now();
        let out = self
            .enc
            .batcher
            .embed_all(encoded.into_iter().map(|e| (e.ids, e.type_ids)), |n| {
                pb.inc(n as u64)
            })?;
        pb.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "{label}: {} inputs, {tokens} tokens in {secs:.1}s ({:.0} tokens/s)",
            inputs.len(),
            tokens as f64 / secs
        );
        std::fs::create_dir_all(&self.cache_dir)?;
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tmp = path.with_extension("part");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)?;
        Ok(out)
    }
}

fn progress(n: u64, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(n);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(label.to_string());
    pb
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

/// Unique prompts of some rows, keyed by (source, prompt_id), in first-seen order.
fn unique_prompts(rows: &[Row]) -> (Vec<&str>, HashMap<(String, String), usize>) {
    let mut texts = Vec::new();
    let mut index = HashMap::new();
    for r in rows {
        index
            .entry((r.source.clone(), r.prompt_id.clone()))
            .or_insert_with(|| {
                texts.push(r.prompt.as_str());
                texts.len() - 1
            });
    }
    (texts, index)
}

struct ModelRows {
    x: Vec<f32>,
    y: Vec<f32>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let seed = a.seed;
    let train = limit_prompts(
        read_rows(&a.data_dir.join("train.jsonl.gz"))?,
        a.max_prompts,
        seed,
    );
    let dev = limit_prompts(
        read_rows(&a.data_dir.join("dev.jsonl.gz"))?,
        a.max_prompts,
        seed,
    );
    let prices = read_catalog(&a.data_dir.join("catalog.json"))?;
    eprintln!("train {} rows, dev {} rows", train.len(), dev.len());

    let mut cfg = Config::embedded()?;
    cfg.model_dir = a.model_dir.clone();
    cfg.threads.compute = a.threads;
    cfg.threads.tokenize = 1;
    let enc = Encoder::start(&cfg)?;
    let d = enc.dim();
    let emb = Embedder {
        enc: &enc,
        cache_dir: a.cache_dir.clone(),
    };

    // ---- route heads ----
    let (tr_texts, tr_idx) = unique_prompts(&train);
    let (dv_texts, dv_idx) = unique_prompts(&dev);
    let tr_inputs: Vec<(&str, Option<&str>)> = tr_texts.iter().map(|t| (*t, None)).collect();
    let dv_inputs: Vec<(&str, Option<&str>)> = dv_texts.iter().map(|t| (*t, None)).collect();
    let tr_emb = emb.embed("train-prompts", &tr_inputs)?;
    let dv_emb = emb.embed("dev-prompts", &dv_inputs)?;
    let row_emb =
        |e: &[f32], idx: &HashMap<(String, String), usize>, r: &Row| -> Option<Vec<f32>> {
            let i = *idx.get(&(r.source.clone(), r.prompt_id.clone()))?;
            Some(e[i * d..(i + 1) * d].to_vec())
        };

    // Hold back 15% of train prompts to choose the L2 strength.
    let held = |r: &Row| hash_str(seed ^ 0x51, &r.prompt_id) % 100 < 15;
    let mut fit_rows: BTreeMap<String, ModelRows> = BTreeMap::new();
    let mut hold_rows: BTreeMap<String, ModelRows> = BTreeMap::new();
    let mut all_rows: BTreeMap<String, ModelRows> = BTreeMap::new();
    let mut out_tokens: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for r in &train {
        let (Some(s), Some(x)) = (r.score, row_emb(&tr_emb, &tr_idx, r)) else {
            continue;
        };
        let part = if held(r) {
            &mut hold_rows
        } else {
            &mut fit_rows
        };
        for m in [part, &mut all_rows] {
            let e = m.entry(r.model.clone()).or_insert(ModelRows {
                x: vec![],
                y: vec![],
            });
            e.x.extend_from_slice(&x);
            e.y.push(s as f32);
        }
        let o = out_tokens.entry(r.model.clone()).or_insert((0, 0));
        o.0 += r.response_tokens.unwrap_or(1);
        o.1 += 1;
    }
    let grid = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1];
    let mut best = (f64::INFINITY, grid[0]);
    let pb = progress((grid.len() * fit_rows.len()) as u64, "route-l2");
    for &l2 in &grid {
        let mut loss = 0.0;
        let mut n = 0usize;
        for (m, fr) in &fit_rows {
            pb.inc(1);
            let Some(hr) = hold_rows.get(m) else { continue };
            let h = fit::logistic(&fr.x, d, &fr.y, l2)?;
            let p: Vec<f64> =
                hr.x.chunks_exact(d)
                    .map(|x| heads::sigmoid(h.logit(x) as f64))
                    .collect();
            loss += fit::log_loss(&p, &hr.y) * hr.y.len() as f64;
            n += hr.y.len();
        }
        let loss = loss / n.max(1) as f64;
        if loss < best.0 {
            best = (loss, l2);
        }
    }
    pb.finish_and_clear();
    let route_l2 = best.1;
    eprintln!("route: L2 {route_l2:e} (held-back log-loss {:.4})", best.0);
    let mut route = BTreeMap::new();
    let mut models = BTreeMap::new();
    for (m, rows) in &all_rows {
        route.insert(m.clone(), fit::logistic(&rows.x, d, &rows.y, route_l2)?);
        let price = prices
            .get(m)
            .with_context(|| format!("model {m} is missing from catalog.json"))?;
        let (tok, n) = out_tokens.get(m).copied().unwrap_or((0, 1));
        models.insert(
            m.clone(),
            ModelInfo {
                in_usd_per_mtok: price.in_usd_per_mtok,
                out_usd_per_mtok: price.out_usd_per_mtok,
                mean_output_tokens: (tok / n.max(1) as u64).max(1) as u32,
                train_rows: rows.y.len(),
            },
        );
    }
    // Dev figures: pooled AUROC per source, and the mean of per-model AUROCs.
    let mut route_dev: BTreeMap<String, (Vec<f64>, Vec<bool>)> = BTreeMap::new();
    for r in &dev {
        let (Some(pass), Some(x), Some(h)) = (
            r.passed(),
            row_emb(&dv_emb, &dv_idx, r),
            route.get(&r.model),
        ) else {
            continue;
        };
        let e = route_dev.entry(r.source.clone()).or_default();
        e.0.push(heads::sigmoid(h.logit(&x) as f64));
        e.1.push(pass);
    }
    let mut route_metrics = serde_json::Map::new();
    for (src, (p, y)) in &route_dev {
        let auc = fit::auroc(p, y);
        eprintln!("route dev {src}: pooled AUROC {}", fmt_opt(auc));
        route_metrics.insert(src.clone(), json!({ "pooled_auroc": auc, "rows": y.len() }));
    }

    // ---- verifier ----
    let vtrain = sample_pairs(&train, a.verify_pairs, seed);
    let vdev = sample_pairs(&dev, a.verify_dev_pairs, seed ^ 1);
    let vt_emb = emb.embed("train-pairs", &pair_inputs(&vtrain))?;
    let vd_emb = emb.embed("dev-pairs", &pair_inputs(&vdev))?;
    let (mut fx, mut fy, mut hx, mut hy) = (vec![], vec![], vec![], vec![]);
    for (i, r) in vtrain.iter().enumerate() {
        let x = &vt_emb[i * d..(i + 1) * d];
        let s = r.score.unwrap_or(0.0) as f32;
        if held(r) {
            hx.extend_from_slice(x);
            hy.push(s);
        } else {
            fx.extend_from_slice(x);
            fy.push(s);
        }
    }
    if fy.is_empty() || hy.is_empty() {
        bail!("verifier: too few pairs to fit and hold back (raise --verify-pairs)");
    }
    let mut vbest = (f64::INFINITY, grid[0], None::<LinearHead>);
    for &l2 in &grid {
        let h = fit::logistic(&fx, d, &fy, l2)?;
        let p: Vec<f64> = hx
            .chunks_exact(d)
            .map(|x| heads::sigmoid(h.logit(x) as f64))
            .collect();
        let loss = fit::log_loss(&p, &hy);
        if loss < vbest.0 {
            vbest = (loss, l2, Some(h));
        }
    }
    let (_, verify_l2, Some(vh)) = vbest else {
        bail!("verifier: no fit")
    };
    // Temperature on the held-back pairs (the head never saw them).
    let hold_logits: Vec<f64> = hx.chunks_exact(d).map(|x| vh.logit(x) as f64).collect();
    let t = fit::temperature(&hold_logits, &hy);
    let verify = VerifyHead {
        head: vh,
        model_offset: BTreeMap::new(),
        temperature: t as f32,
    };
    let vp: Vec<f64> = (0..vdev.len())
        .map(|i| heads::sigmoid(verify.head.logit(&vd_emb[i * d..(i + 1) * d]) as f64 / t))
        .collect();
    let vy: Vec<bool> = vdev.iter().map(|r| r.passed().unwrap_or(false)).collect();
    let vys: Vec<f32> = vdev.iter().map(|r| r.score.unwrap_or(0.0) as f32).collect();
    let v_auc = fit::auroc(&vp, &vy);
    let v_ece = fit::ece(&vp, &vys, 15);
    eprintln!(
        "verify: L2 {verify_l2:e}, temperature {t:.3}; dev AUROC {} ECE {v_ece:.4} ({} pairs)",
        fmt_opt(v_auc),
        vdev.len()
    );

    let revision = {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!("{route:?}{verify:?}").hash(&mut h);
        format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
    };
    let out = Heads {
        format: heads::FORMAT,
        revision,
        encoder_revision: enc.model_revision.clone(),
        dim: d,
        max_input_tokens: enc.tokenizer.max_tokens(),
        max_pair_tokens: enc.tokenizer.max_pair_tokens(),
        route,
        models,
        verify,
        default_verify_threshold: 0.5,
        metrics: json!({
            "split": "dev (figures never from training rows)",
            "route_l2": route_l2,
            "route_dev": route_metrics,
            "verify_l2": verify_l2,
            "verify_temperature": t,
            "verify_dev_auroc": v_auc,
            "verify_dev_ece": v_ece,
            "verify_dev_pairs": vdev.len(),
            "verify_train_pairs": vtrain.len(),
        }),
    };
    out.validate()?;
    write_heads(&a.out, &out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn pair_inputs<'a>(rows: &[&'a Row]) -> Vec<(&'a str, Option<&'a str>)> {
    rows.iter()
        .map(|r| (r.prompt.as_str(), Some(r.response.as_deref().unwrap_or(""))))
        .collect()
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.4}"))
}

/// Up to `n` rows with a response, spread evenly over sources, in a seeded order.
fn sample_pairs(rows: &[Row], n: usize, seed: u64) -> Vec<&Row> {
    let mut by_src: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.response.is_some() && r.score.is_some())
    {
        by_src.entry(r.source.as_str()).or_default().push(r);
    }
    let per = n / by_src.len().max(1);
    let mut out = Vec::new();
    for (_, mut v) in by_src {
        v.sort_by_key(|r| hash_str(seed, &format!("{}\u{0}{}", r.prompt_id, r.model)));
        out.extend(v.into_iter().take(per));
    }
    out
}

fn write_heads(path: &Path, h: &Heads) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string(h)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
