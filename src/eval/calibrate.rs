//! `tiergate calibrate`: fits what `score --calibration` fits (each model's ability on this
//! traffic, the prior's shift, the verifier's re-fit) from a labelled sample of the user's
//! own traffic, and writes it as an overlay the server applies at start (`overlays` in the
//! config). The encoder and the trained heads file are untouched.
#![forbid(unsafe_code)]
use std::path::PathBuf;

use anyhow::{bail, Result};

use super::data::read_rows;
use super::score::{adapt, offline_encoder, Embedder, EncoderArgs, RowFeatures};
use crate::model::overlay::{Overlay, OverlayModel, OVERLAY_FORMAT};
use crate::model::Heads;

#[derive(Debug, Clone, clap::Args)]
pub struct CalibrateArgs {
    /// Labelled rows (prompt, model, score in [0,1], optional response) in the data schema.
    #[arg(long)]
    pub data: PathBuf,
    /// The overlay to write (atomically).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "models/heads.json")]
    pub heads: PathBuf,
    /// Models with fewer labelled rows are left out of the overlay.
    #[arg(long, default_value_t = 20)]
    pub min_rows: usize,
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    let heads = Heads::load(&a.heads)?;
    let rows = read_rows(&a.data)?;
    for (i, r) in rows.iter().enumerate() {
        match r.score {
            Some(s) if (0.0..=1.0).contains(&s) => {}
            Some(s) => bail!(
                "{} row {}: score {s} outside [0, 1]",
                a.data.display(),
                i + 1
            ),
            None => bail!("{} row {}: no score to learn from", a.data.display(), i + 1),
        }
    }
    let enc = offline_encoder(&a.encoder, heads.max_answer_tokens)?;
    let emb = Embedder {
        enc: &enc,
        cache_dir: None,
    };
    let f = RowFeatures::compute(&emb, "calibrate", &rows, true, heads.max_answer_tokens)?;
    let overlay = fit_overlay(&heads, &rows, &f, a.min_rows)?;
    overlay.validate(&heads)?;
    overlay.save(&a.out)?;
    eprintln!(
        "overlay {}: {} models ({}), verifier {}",
        a.out.display(),
        overlay.models.len(),
        overlay
            .models
            .iter()
            .map(|(m, o)| format!("{m}: {} rows", o.rows))
            .collect::<Vec<_>>()
            .join(", "),
        if overlay.verifier.is_some() {
            "re-fitted"
        } else {
            "kept"
        }
    );
    Ok(())
}

/// The overlay of one calibration: `adapt` on a copy of the heads, then what changed.
pub fn fit_overlay(
    heads: &Heads,
    rows: &[super::data::Row],
    f: &RowFeatures,
    min_rows: usize,
) -> Result<Overlay> {
    let mut h = heads.clone();
    adapt(&mut h, rows, f, true)?;
    let mut count = std::collections::BTreeMap::<&str, usize>::new();
    for r in rows.iter().filter(|r| r.score.is_some()) {
        *count.entry(r.model.as_str()).or_default() += 1;
    }
    let mut models = std::collections::BTreeMap::new();
    for (m, n) in count {
        let Some(ability) = h.router.models.get(m) else {
            continue;
        };
        if n < min_rows {
            eprintln!("calibrate: {m} has {n} labelled rows (< {min_rows}); left out");
            continue;
        }
        let mean_output_tokens = h.models.get(m).map_or(1, |i| i.mean_output_tokens);
        models.insert(
            m.to_string(),
            OverlayModel {
                ability: ability.clone(),
                rows: n,
                mean_output_tokens,
            },
        );
    }
    let changed = serde_json::to_value(&h.verifier)? != serde_json::to_value(&heads.verifier)?;
    let verifier_rows = rows
        .iter()
        .filter(|r| r.score.is_some() && r.response.is_some())
        .count();
    Ok(Overlay {
        format: OVERLAY_FORMAT,
        heads_revision: heads.revision.clone(),
        prior: h.router.prior.clone(),
        models,
        verifier: changed.then(|| h.verifier.clone()),
        verifier_rows,
        memory: h.memory.clone(),
    })
}
