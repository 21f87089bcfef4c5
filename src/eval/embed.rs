//! Rows through the encoder: prompt and answer embeddings (cached on disk by encoder revision,
//! limits and text) and the per-row features the heads read, shared by every offline tool.
#![forbid(unsafe_code)]
use std::collections::HashMap;
use std::hash::Hash;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use super::data::Row;
use crate::model::heads::{AnswerInput, Heads};
use crate::model::tokenize::{kept_nothing, TruncSide};
use crate::pipeline::TextPipeline;

/// Embeds texts through the encoder's batcher, with an on-disk cache keyed by the encoder
/// revision, the limits and the texts.
pub struct Embedder<'a> {
    pub enc: &'a TextPipeline,
    pub cache_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Hash)]
pub enum Kind {
    Prompt,
    Answer(usize),
}

pub struct EmbeddedTexts {
    pub emb: Vec<f32>,
    pub truncated: Vec<bool>,
    /// The tokenizer kept nothing of the text (`tokenize::kept_nothing`).
    pub empty: Vec<bool>,
}

impl Embedder<'_> {
    pub fn embed(&self, label: &str, texts: &[&str], kind: Kind) -> Result<EmbeddedTexts> {
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
        let empty: Vec<bool> = encoded.iter().map(|e| kept_nothing(e.ids.len())).collect();
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
        let key = super::util::str_hash;
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
        Ok(EmbeddedTexts {
            emb,
            truncated,
            empty,
        })
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
    /// Per answer: the tokenizer kept nothing of it (zero-width or control characters only),
    /// which Verify treats as blank.
    pub answer_empty: Vec<bool>,
}

impl RowFeatures {
    pub fn compute(
        emb: &Embedder<'_>,
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
            EmbeddedTexts {
                emb: vec![],
                truncated: vec![],
                empty: vec![],
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
            answer_empty: a.empty,
        })
    }

    /// The features of rows `idx` (in that order), their prompts and answers re-indexed so that
    /// only those rows' remain (a memory fitted on them holds no other prompt); without
    /// `answers` the rows have none (Route's p alone).
    pub fn subset(&self, idx: &[usize], answers: bool) -> RowFeatures {
        let mut remap = std::collections::HashMap::new();
        let mut prompt_emb = Vec::new();
        let prompt_of_row = idx
            .iter()
            .map(|&i| {
                let p = self.prompt_of_row[i];
                *remap.entry(p).or_insert_with(|| {
                    prompt_emb
                        .extend_from_slice(&self.prompt_emb[p * self.dim..(p + 1) * self.dim]);
                    prompt_emb.len() / self.dim.max(1) - 1
                })
            })
            .collect();
        let mut aremap = std::collections::HashMap::new();
        let (mut answer_emb, mut answer_truncated, mut answer_empty) =
            (Vec::new(), Vec::new(), Vec::new());
        let answer_of_row = idx
            .iter()
            .map(|&i| {
                let a = self.answer_of_row[i].filter(|_| answers)?;
                Some(*aremap.entry(a).or_insert_with(|| {
                    answer_emb
                        .extend_from_slice(&self.answer_emb[a * self.dim..(a + 1) * self.dim]);
                    answer_truncated.push(self.answer_truncated[a]);
                    answer_empty.push(self.answer_empty[a]);
                    answer_truncated.len() - 1
                }))
            })
            .collect();
        RowFeatures {
            dim: self.dim,
            prompt_emb,
            prompt_of_row,
            answer_of_row,
            answer_emb,
            answer_truncated,
            answer_empty,
        }
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
        Some(heads.verify_x(&r.model, self.prompt(row), &a))
    }
}
