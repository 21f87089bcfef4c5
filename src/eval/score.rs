//! Scoring rows offline through the same encoder, batcher and heads as the server:
//! p_route = P(pass | prompt, model), p_verify = P(pass | prompt, answer, model).
//! Also the `tiergate score` command and run-time adaptation from labelled calibration rows.
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::data::{read_rows, Row};
use super::fit;
use crate::config::{Config, Precision};
use crate::model::heads::{self, AnswerInput, Heads};
use crate::model::tokenize::TruncSide;
use crate::pipeline::Encoder;

/// Embeds texts through the encoder's batcher, with an on-disk cache keyed by the encoder
/// revision, the limits and the texts.
pub struct Embedder<'a> {
    pub enc: &'a Encoder,
    pub cache_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Hash)]
pub enum Kind {
    Prompt,
    Answer(usize),
}

pub struct Embedded {
    pub emb: Vec<f32>,
    pub truncated: Vec<bool>,
}

impl Embedder<'_> {
    pub fn embed(&self, label: &str, texts: &[&str], kind: Kind) -> Result<Embedded> {
        let tok = &self.enc.tokenizer;
        let encoded = match kind {
            Kind::Prompt => tok.encode_single_batch(texts, TruncSide::HeadTail)?,
            Kind::Answer(limit) => {
                use rayon::prelude::*;
                texts
                    .par_iter()
                    .map(|t| tok.encode_answer(t, limit))
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        let truncated: Vec<bool> = encoded.iter().map(|e| e.truncated).collect();
        let dim = self.enc.dim();
        // Content-addressed store: one record (text key, embedding) per text, appended, so any
        // later run (another split, a left-out source, eval) reuses what was computed.
        let store = self.cache_dir.as_ref().map(|d| {
            let kind = match kind {
                Kind::Prompt => format!("prompt{}", tok.max_tokens()),
                Kind::Answer(n) => format!("answer{n}"),
            };
            let rev: String = self.enc.model_revision.chars().take(12).collect();
            // f32 records keep their original name; other arithmetic gets its own file.
            match self.enc.numerics {
                "f32" => d.join(format!("{kind}-{rev}.emb")),
                n => d.join(format!("{kind}-{rev}-{n}.emb")),
            }
        });
        let key = |t: &str| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            t.hash(&mut h);
            h.finish()
        };
        let rec = 8 + dim * 4;
        let mut known: HashMap<u64, Vec<f32>> = HashMap::new();
        if let Some(bytes) = store.as_ref().and_then(|p| std::fs::read(p).ok()) {
            // A torn last record (interrupted write) is ignored.
            for r in bytes.chunks_exact(rec) {
                let k = u64::from_le_bytes(r[..8].try_into().unwrap_or([0; 8]));
                let v = r[8..]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                known.insert(k, v);
            }
        }
        let keys: Vec<u64> = texts.iter().map(|t| key(t)).collect();
        let mut todo: Vec<usize> = (0..texts.len())
            .filter(|&i| !known.contains_key(&keys[i]))
            .collect();
        let mut seen = std::collections::HashSet::new();
        todo.retain(|&i| seen.insert(keys[i]));
        if !todo.is_empty() {
            let tokens: usize = todo.iter().map(|&i| encoded[i].ids.len()).sum();
            let pb = progress(todo.len() as u64, label);
            let t0 = Instant::now();
            let out = self.enc.batcher.embed_all(
                todo.iter()
                    .map(|&i| (encoded[i].ids.clone(), encoded[i].type_ids.clone())),
                |n| pb.inc(n as u64),
            )?;
            pb.finish_and_clear();
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "{label}: {} texts, {tokens} tokens in {secs:.1}s ({:.0} tokens/s)",
                todo.len(),
                tokens as f64 / secs
            );
            let mut bytes = Vec::with_capacity(todo.len() * rec);
            for (n, &i) in todo.iter().enumerate() {
                let v = out[n * dim..(n + 1) * dim].to_vec();
                bytes.extend_from_slice(&keys[i].to_le_bytes());
                bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
                known.insert(keys[i], v);
            }
            if let Some(p) = &store {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?;
                // Cut a torn record left by an interrupted run, so appends stay aligned.
                let len = f.metadata()?.len();
                let whole = len - len % rec as u64;
                if whole != len {
                    f.set_len(whole)?;
                }
                f.write_all(&bytes)?;
            }
        } else {
            eprintln!("{label}: {} embeddings from cache", texts.len());
        }
        let mut emb = Vec::with_capacity(texts.len() * dim);
        for k in &keys {
            let v = known
                .get(k)
                .ok_or_else(|| anyhow::anyhow!("{label}: embedding missing after encoding"))?;
            emb.extend_from_slice(v);
        }
        Ok(Embedded { emb, truncated })
    }
}

pub fn progress(n: u64, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(n);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(label.to_string());
    pb
}

/// Unique prompts of some rows in first-seen order, and each row's prompt index.
pub fn unique_prompts(rows: &[Row]) -> (Vec<&str>, Vec<usize>) {
    let mut texts = Vec::new();
    // Keyed by the text too: rows that share an id but not a prompt get their own embedding.
    let mut index: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let mut of_row = Vec::with_capacity(rows.len());
    for r in rows {
        let i = *index
            .entry((r.source.as_str(), r.prompt_id.as_str(), r.prompt.as_str()))
            .or_insert_with(|| {
                texts.push(r.prompt.as_str());
                texts.len() - 1
            });
        of_row.push(i);
    }
    (texts, of_row)
}

/// Everything the heads need about a set of rows.
pub struct RowFeatures {
    pub dim: usize,
    pub prompt_emb: Vec<f32>,
    pub prompt_of_row: Vec<usize>,
    /// Per row: answer embedding index (rows without a response have none).
    pub answer_of_row: Vec<Option<usize>>,
    pub answer_emb: Vec<f32>,
    pub answer_truncated: Vec<bool>,
}

impl RowFeatures {
    pub fn compute(
        emb: &Embedder,
        label: &str,
        rows: &[Row],
        answers: bool,
        max_answer_tokens: usize,
    ) -> Result<RowFeatures> {
        let (texts, prompt_of_row) = unique_prompts(rows);
        let p = emb.embed(&format!("{label}-prompts"), &texts, Kind::Prompt)?;
        let mut answer_of_row = vec![None; rows.len()];
        let mut atexts = Vec::new();
        if answers {
            for (i, r) in rows.iter().enumerate() {
                if let Some(a) = &r.response {
                    answer_of_row[i] = Some(atexts.len());
                    atexts.push(a.as_str());
                }
            }
        }
        let a = if atexts.is_empty() {
            Embedded {
                emb: vec![],
                truncated: vec![],
            }
        } else {
            emb.embed(
                &format!("{label}-answers"),
                &atexts,
                Kind::Answer(max_answer_tokens),
            )?
        };
        Ok(RowFeatures {
            dim: emb.enc.dim(),
            prompt_emb: p.emb,
            prompt_of_row,
            answer_of_row,
            answer_emb: a.emb,
            answer_truncated: a.truncated,
        })
    }

    pub fn prompt(&self, row: usize) -> &[f32] {
        let p = self.prompt_of_row[row];
        &self.prompt_emb[p * self.dim..(p + 1) * self.dim]
    }

    pub fn answer<'a>(&'a self, row: usize, r: &'a Row) -> Option<AnswerInput<'a>> {
        let a = self.answer_of_row[row]?;
        Some(AnswerInput {
            text: r.response.as_deref().unwrap_or(""),
            prompt: &r.prompt,
            embedding: &self.answer_emb[a * self.dim..(a + 1) * self.dim],
            truncated: self.answer_truncated[a],
        })
    }

    /// Verifier features of a row (None without a response).
    pub fn verify_x(&self, heads: &Heads, row: usize, r: &Row) -> Option<Vec<f32>> {
        let a = self.answer(row, r)?;
        let e = self.prompt(row);
        Some(heads::verify_features(
            heads.route_logit(&r.model, e),
            e,
            &a,
        ))
    }
}

/// (p_route, p_verify) per row.
pub fn score_with(heads: &Heads, rows: &[Row], f: &RowFeatures) -> Vec<(f64, Option<f64>)> {
    use rayon::prelude::*;
    rows.par_iter()
        .enumerate()
        .map(|(i, r)| {
            let p_route = heads.route_p(&r.model, f.prompt(i));
            let p_verify = f.verify_x(heads, i, r).map(|x| heads.verifier.p(&x));
            (p_route, p_verify)
        })
        .collect()
}

/// Fits per-model abilities (new models from scratch, known ones adjusted) and re-fits the
/// verifier's Platt scaling on labelled rows of the target traffic. The encoder is untouched.
pub fn adapt(heads: &mut Heads, rows: &[Row], f: &RowFeatures) -> Result<serde_json::Value> {
    let k = heads.router.k;
    let mut by_model: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        if r.score.is_some() {
            by_model.entry(r.model.as_str()).or_default().push(i);
        }
    }
    let mut report = serde_json::Map::new();
    for (m, idx) in &by_model {
        let (mut z, mut s, mut y) = (Vec::new(), Vec::new(), Vec::new());
        for &i in idx {
            let (si, zi) = heads.router.prompt_features(f.prompt(i));
            z.extend_from_slice(&zi);
            s.push(si);
            y.push(rows[i].score.unwrap_or(0.0) as f32);
        }
        let known = heads.router.models.contains_key(*m);
        let prior = heads.router.ability(m).clone();
        // Known models keep more of their trained ability than new ones keep of the prior.
        let l2 = if known { 20.0 } else { 2.0 };
        let a = fit::fit_ability(&z, &s, &y, k, &prior, l2)?;
        report.insert(
            m.to_string(),
            serde_json::json!({ "rows": idx.len(), "known": known, "b": a.b }),
        );
        heads.router.models.insert(m.to_string(), a);
    }
    // Re-fit how the verifier's logit and the (adapted) router's logit combine, on the
    // calibration answers: calibrated on the target traffic, and never much worse than the
    // router where the answer features do not transfer.
    let mut xs: Vec<f32> = Vec::new();
    let mut ys = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if let (Some(s), Some(x)) = (r.score, f.verify_x(heads, i, r)) {
            xs.extend([heads.verifier.head.logit(&x), x[0]]);
            ys.push(s as f32);
        }
    }
    if ys.len() >= 50 {
        let h = fit::logistic(&xs, 2, &ys, 1e-4)?;
        heads.verifier.platt_a = h.w[0];
        heads.verifier.router_coef = h.w[1];
        heads.verifier.platt_b = h.b;
    }
    Ok(serde_json::json!({ "models": report, "verifier_rows": ys.len() }))
}

#[derive(Debug, Clone, clap::Args)]
pub struct ScoreArgs {
    /// Rows to score: JSONL or JSONL.gz in the data schema (score, cost_usd, extra optional).
    #[arg(long)]
    pub data: PathBuf,
    /// Labelled rows of the same traffic, to fit per-model parameters and calibration.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Output JSONL: one {"source","prompt_id","model","p_route","p_verify"} per input row.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "models/heads.json")]
    pub heads: PathBuf,
    /// Cache encoder outputs here (off by default).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

/// The encoder options shared by `score`, `train` and `eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EncoderArgs {
    #[arg(long, default_value = "models/base")]
    pub model_dir: PathBuf,
    /// Encoder threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Encoder arithmetic on the CPU, as the server's `precision`.
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: Precision,
}

/// The encoder for offline work: the embedded config with the given model, threads and
/// precision.
pub fn offline_encoder(e: &EncoderArgs, max_answer_tokens: usize) -> Result<Encoder> {
    let mut cfg = Config::embedded()?;
    cfg.model_dir = e.model_dir.clone();
    cfg.threads.compute = e.threads;
    cfg.precision = e.precision;
    cfg.batch.max_answer_tokens = max_answer_tokens;
    cfg.validate()?;
    Encoder::start(&cfg)
}

pub fn run(a: ScoreArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut heads = Heads::load(&a.heads)?;
    let rows = read_rows(&a.data)?;
    let enc = offline_encoder(&a.encoder, heads.max_answer_tokens)?;
    if enc.dim() != heads.dim {
        anyhow::bail!(
            "{}: heads have dim {} but the encoder in {} has {}",
            a.heads.display(),
            heads.dim,
            a.encoder.model_dir.display(),
            enc.dim()
        );
    }
    let emb = Embedder {
        enc: &enc,
        cache_dir: a.cache_dir.clone(),
    };
    if let Some(c) = &a.calibration {
        let crow = read_rows(c)?;
        let labelled = crow.iter().filter(|r| r.score.is_some()).count();
        if labelled == 0 {
            anyhow::bail!(
                "{}: no labelled rows (field `score`) to calibrate on",
                c.display()
            );
        }
        let cf = RowFeatures::compute(&emb, "calibration", &crow, true, heads.max_answer_tokens)?;
        let rep = adapt(&mut heads, &crow, &cf)?;
        eprintln!("calibration: {labelled} labelled rows; {rep}");
    }
    let f = RowFeatures::compute(&emb, "score", &rows, true, heads.max_answer_tokens)?;
    let scores = score_with(&heads, &rows, &f);
    let tmp = a.out.with_extension("part");
    {
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        for (r, (pr, pv)) in rows.iter().zip(&scores) {
            let line = serde_json::json!({
                "source": r.source,
                "prompt_id": r.prompt_id,
                "model": r.model,
                "p_route": pr,
                "p_verify": pv,
            });
            writeln!(w, "{line}")?;
        }
        w.flush()?;
    }
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "scored {} rows in {secs:.1}s ({:.1} rows/s) → {}",
        rows.len(),
        rows.len() as f64 / secs.max(1e-9),
        a.out.display()
    );
    Ok(())
}
