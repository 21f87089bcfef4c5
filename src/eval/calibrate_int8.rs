//! `tiergate calibrate-int8`: measures, on train prompts and answers, the largest |input| per
//! channel of every linear layer of the encoder (f32 forward pass), and writes them as the
//! JSON that `model::int8` smoothing reads (`models/int8-act-max.json`, embedded in the
//! binary at build time). Train data only: the maxima must not come from what we evaluate on.
#![forbid(unsafe_code)]
use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

use super::data::read_rows;
use crate::base::PackedBatch;
use crate::model::{ActStats, MiniLm, TextTokenizer, TruncSide};

#[derive(Debug, Clone, clap::Args)]
pub struct CalibrateInt8Args {
    /// Rows whose prompts and responses are run through the encoder.
    #[arg(long, default_value = "../shared/data/train.jsonl.gz")]
    pub data: PathBuf,
    /// Distinct prompts to use (and as many responses), spread evenly over the file.
    #[arg(long, default_value_t = 400)]
    pub prompts: usize,
    #[arg(long, default_value = "models/base")]
    pub model_dir: PathBuf,
    #[arg(long, default_value = "models/int8-act-max.json")]
    pub out: PathBuf,
}

pub fn run(a: CalibrateInt8Args) -> Result<()> {
    ensure!(a.prompts > 0, "--prompts must be at least 1");
    let model = MiniLm::load(&a.model_dir)?;
    let tok = TextTokenizer::from_file(&a.model_dir.join("tokenizer.json"), 256, 384)?;
    let rows = read_rows(&a.data)?;
    let mut seen = HashSet::new();
    let distinct: Vec<usize> = (0..rows.len())
        .filter(|&i| seen.insert(rows[i].prompt_id.as_str()))
        .collect();
    let step = (distinct.len() / a.prompts).max(1);
    let picked: Vec<usize> = distinct
        .iter()
        .step_by(step)
        .take(a.prompts)
        .copied()
        .collect();
    let prompts: Vec<&str> = picked.iter().map(|&i| rows[i].prompt.as_str()).collect();
    let mut seqs: Vec<Vec<u32>> = tok
        .encode_single_batch(&prompts, TruncSide::HeadTail)?
        .into_iter()
        .map(|e| e.ids)
        .collect();
    for &i in &picked {
        if let Some(r) = rows[i].response.as_deref().filter(|r| !r.is_empty()) {
            seqs.push(tok.encode_answer(r, 128)?.ids);
        }
    }
    let mut stats: Option<ActStats> = None;
    for chunk in seqs.chunks(32) {
        let mut b = PackedBatch::new();
        for s in chunk {
            b.push(s, &vec![0; s.len()]);
        }
        model.validate(&b).context("calibration batch")?;
        stats = Some(model.observe(&b, stats));
    }
    let mut stats = stats.context("no sequences to calibrate on")?;
    stats.made_from = format!(
        "tiergate calibrate-int8: {} prompts and {} responses of {}",
        prompts.len(),
        seqs.len() - prompts.len(),
        a.data
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned())
    );
    // Four significant digits are plenty for a range and keep the embedded file small.
    for l in &mut stats.layers {
        for v in l.iter_mut().flat_map(|x| x.iter_mut()) {
            *v = format!("{:.4e}", *v).parse().unwrap_or(*v);
        }
    }
    let tmp = a.out.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string(&stats)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "calibrate-int8: {} sequences, maxima for {} layers -> {} (rebuild to embed them)",
        seqs.len(),
        stats.layers.len(),
        a.out.display()
    );
    Ok(())
}
