//! `tiergate distill-static`: fits Route's fast-path student (`model::student`) on train
//! prompts: the encoder's pooled outputs regressed on the prompts' bags of word vectors.
//! Train data only. Writes `models/static-student.bin` (embedded at build time).
#![forbid(unsafe_code)]
use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

use super::data::read_rows;
use crate::base::PackedBatch;
use crate::model::student::{bag, StaticStudent, StudentInfo};
use crate::model::{MiniLm, Precision, TextTokenizer, TruncSide};

#[derive(Debug, Clone, clap::Args)]
pub struct DistillStaticArgs {
    /// Rows whose distinct prompts are embedded by the encoder and by the student.
    #[arg(long, default_value = "../shared/data/train.jsonl.gz")]
    pub data: PathBuf,
    /// Ridge penalty on the centred normal equations.
    #[arg(long, default_value_t = 0.01)]
    pub lambda: f64,
    /// Every how-many-th prompt is held out to report the student's cosine to the encoder.
    #[arg(long, default_value_t = 10)]
    pub holdout_every: usize,
    #[arg(long, default_value = "models/base")]
    pub model_dir: PathBuf,
    /// The encoder's arithmetic for the targets (`auto`: what serving runs here).
    #[arg(long, value_enum, default_value_t = Precision::Auto)]
    pub precision: Precision,
    #[arg(long, default_value = "models/static-student.bin")]
    pub out: PathBuf,
}

pub fn run(a: DistillStaticArgs) -> Result<()> {
    ensure!(a.holdout_every >= 2, "--holdout-every must be at least 2");
    ensure!(
        a.precision != Precision::Static,
        "the targets come from the encoder"
    );
    let model = MiniLm::load(&a.model_dir)?;
    let h = model.dim();
    let tok = TextTokenizer::from_file(&a.model_dir.join("tokenizer.json"), 256, 384)?;
    let rows = read_rows(&a.data)?;
    let mut seen = HashSet::new();
    let prompts: Vec<&str> = rows
        .iter()
        .filter(|r| seen.insert(r.prompt.as_str()))
        .map(|r| r.prompt.as_str())
        .collect();
    let seqs: Vec<Vec<u32>> = tok
        .encode_single_batch(&prompts, TruncSide::HeadTail)?
        .into_iter()
        .map(|e| e.ids)
        .collect();
    let mut teacher = Vec::with_capacity(seqs.len() * h);
    for (i, chunk) in seqs.chunks(32).enumerate() {
        let mut b = PackedBatch::new();
        for s in chunk {
            b.push(s, &vec![0; s.len()]);
        }
        model.validate(&b).context("distillation batch")?;
        teacher.extend(model.forward_with(&b, a.precision));
        if i % 20 == 0 {
            eprintln!("distill-static: {} of {} prompts", i * 32, seqs.len());
        }
    }
    let mut bags = vec![0.0f32; seqs.len() * h];
    for (s, o) in seqs.iter().zip(bags.chunks_mut(h)) {
        bag(model.word_vectors(), h, s, o);
    }
    let held = |i: usize| i.is_multiple_of(a.holdout_every);
    let pick = |m: &[f32], keep: bool| -> Vec<f32> {
        m.chunks(h)
            .enumerate()
            .filter(|(i, _)| held(*i) != keep)
            .flat_map(|(_, r)| r.iter().copied())
            .collect()
    };
    let fitted_on = seqs.len() - seqs.len().div_ceil(a.holdout_every);
    let info = StudentInfo {
        model_revision: model.revision().to_string(),
        dim: h,
        made_from: format!(
            "tiergate distill-static: {fitted_on} distinct prompts of {} (every {}th held out), \
             targets at {}, ridge lambda {}",
            a.data
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
            a.holdout_every,
            model.resolve_precision(a.precision)?.as_str(),
            a.lambda
        ),
    };
    let student = StaticStudent::fit(&pick(&bags, true), &pick(&teacher, true), h, a.lambda, info)?;
    // Read back through the f16 file, as serving will.
    let bytes = student.to_bytes()?;
    let student = StaticStudent::from_bytes(&bytes)?;
    let (hb, ht) = (pick(&bags, false), pick(&teacher, false));
    let mut cos: Vec<f32> = hb
        .chunks(h)
        .zip(ht.chunks(h))
        .map(|(b, t)| {
            let mut o = vec![0.0f32; h];
            student.apply(b, &mut o);
            o.iter().zip(t).map(|(x, y)| x * y).sum()
        })
        .collect();
    cos.sort_by(f32::total_cmp);
    let tmp = a.out.with_extension("bin.tmp");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "distill-static: fitted on {fitted_on} prompts; on {} held-out prompts cosine to the \
         encoder: median {:.4}, min {:.4} -> {} ({} bytes; rebuild to embed it)",
        cos.len(),
        cos.get(cos.len() / 2).copied().unwrap_or(f32::NAN),
        cos.first().copied().unwrap_or(f32::NAN),
        a.out.display(),
        bytes.len()
    );
    Ok(())
}
