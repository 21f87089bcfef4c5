//! Scoring rows offline through the same encoder, batcher and heads as the server:
//! p_route = P(pass | prompt, model), p_verify = P(pass | prompt, answer, model). Also the
//! `tiergate score` command and the encoder options the offline tools share.
#![forbid(unsafe_code)]
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use super::adapt::adapt;
use super::data::{read_rows, Row};
use super::embed::{Embedder, RowFeatures};
use crate::config::{Config, Precision};
use crate::model::heads::Heads;
use crate::pipeline::TextPipeline;

/// (p_route, p_verify) per row.
pub fn score_with(heads: &Heads, rows: &[Row], f: &RowFeatures) -> Vec<(f64, Option<f64>)> {
    use rayon::prelude::*;
    // The prompt's parts (router features, cosines to the memory) once per unique prompt.
    let models: Vec<&str> = rows
        .iter()
        .map(|r| r.model.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let parts: Vec<_> = (0..f.prompt_emb.len() / f.dim.max(1))
        .into_par_iter()
        .map(|p| {
            let e = &f.prompt_emb[p * f.dim..(p + 1) * f.dim];
            (heads.router.prompt_features(e), heads.near(e, &models))
        })
        .collect();
    rows.par_iter()
        .enumerate()
        .map(|(i, r)| {
            let (pf, near) = &parts[f.prompt_of_row[i]];
            let p_route = crate::service::decide::route_p(heads, pf, near.as_ref(), &r.model);
            // As Verify: a blank answer, or one the tokenizer keeps nothing of, has nothing to
            // ship: p 0 without reading it.
            let blank = r
                .response
                .as_deref()
                .is_some_and(crate::model::answer::says_nothing)
                || f.answer_of_row[i].is_some_and(|a| f.answer_empty.get(a) == Some(&true));
            let p_verify = if blank {
                Some(0.0)
            } else {
                f.verify_x(heads, i, r).map(|x| heads.verifier.p(&x))
            };
            (p_route, p_verify)
        })
        .collect()
}

#[derive(Debug, Clone, clap::Args)]
pub struct ScoreArgs {
    /// Rows to score: JSONL or JSONL.gz in the data schema (score, cost_usd, extra optional).
    #[arg(long)]
    pub data: PathBuf,
    /// Labelled rows of the same traffic, to fit per-model parameters and calibration.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Calibrate without the memory of labelled prompts (for comparisons).
    #[arg(long)]
    pub no_memory: bool,
    /// Output JSONL: one {"source","prompt_id","model","p_route","p_verify","final_answer"} per
    /// input row.
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
pub fn offline_encoder(e: &EncoderArgs, max_answer_tokens: usize) -> Result<TextPipeline> {
    let mut cfg = Config::embedded()?;
    cfg.model_dir = e.model_dir.clone();
    cfg.threads.compute = e.threads;
    cfg.precision = e.precision;
    cfg.batch.max_answer_tokens = max_answer_tokens;
    cfg.validate()?;
    TextPipeline::start(&cfg)
}

/// [`offline_encoder`] for `heads` (read from `heads_path`): refused when the two disagree on
/// the embedding width (the heads' vectors would be read out of bounds), a warning when they
/// agree on it but not on the encoder's revision.
pub fn encoder_for(e: &EncoderArgs, heads: &Heads, heads_path: &Path) -> Result<TextPipeline> {
    let enc = offline_encoder(e, heads.max_answer_tokens)?;
    heads.check_width(heads_path, enc.dim(), &e.model_dir)?;
    // Same width, other weights: the heads (and any overlay fitted now) read another
    // embedding space. Said by every offline tool, as the server does at start.
    if !enc.fits_revision(&heads.encoder_revision) {
        eprintln!(
            "warning: {} was fitted on encoder {} but {} is {}",
            heads_path.display(),
            heads.encoder_revision,
            e.model_dir.display(),
            enc.model_revision
        );
    }
    Ok(enc)
}

pub fn run(a: ScoreArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut heads = Heads::load(&a.heads)?;
    let rows = read_rows(&a.data)?;
    let enc = encoder_for(&a.encoder, &heads, &a.heads)?;
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
        let rep = adapt(&mut heads, &crow, &cf, !a.no_memory)?;
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
                // What the answer commits to (its own text only): replays compare these
                // across models for the peer-agreement policy.
                "final_answer": r.response.as_deref().and_then(|a| crate::model::answer::final_answer(&r.prompt, a)),
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::heads::AnswerInput;

    pub(crate) fn trained_heads() -> Result<Heads> {
        Heads::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/heads.json"
        )))
    }

    /// The shipped verifier learned where a numeric pick sits (`answer::pick_extremeness`):
    /// the same answer picking option C, whose value is the middle one of ten or the largest,
    /// with everything else alike (option lengths, letter, embeddings), is rated lower at the
    /// end, for a strong and a weak MMLU-Pro model.
    #[test]
    fn an_end_value_pick_is_rated_lower_than_a_middle_one() -> Result<()> {
        let h = trained_heads()?;
        let options = |c: u32| {
            let v: Vec<String> = (0..10u32)
                .map(|i| match i {
                    2 => format!("\"{c} J\""),
                    i if i < 5 => format!("\"{} J\"", 10 + i),
                    i => format!("\"{} J\"", 40 + i),
                })
                .collect();
            format!(
                "A 2 kg mass falls 1 m. Energy?\nOptions: [{}]",
                v.join(", ")
            )
        };
        // Option C is 25 (four values below it, five above: the middle) or 99 (the largest);
        // every option is as long, and the answer names none of their numbers.
        let (middle, end) = (options(25), options(99));
        let answer = "E = mgh = 2 * 9.8 * 1 = 19.6 J. The answer is (C).";
        let emb: Vec<f32> = (0..h.dim).map(|i| ((i % 7) as f32 - 3.0) / 40.0).collect();
        for model in ["gemini-1.5-pro-002", "Mistral-7B-v0.1"] {
            let p = |prompt: &str| {
                let a = AnswerInput {
                    text: answer,
                    prompt,
                    embedding: &emb,
                    truncated: false,
                };
                h.verify_p(model, &emb, &a)
            };
            let (pm, pe) = (p(&middle), p(&end));
            assert!(pe < pm - 0.05, "{model}: middle {pm:.3}, end {pe:.3}");
        }
        Ok(())
    }
}
