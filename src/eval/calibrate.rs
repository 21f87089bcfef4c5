//! `tiergate calibrate`: fits what `score --calibration` fits (each model's ability on this
//! traffic, the prior's shift, the verifier's re-fit) from a labelled sample of the user's
//! own traffic, and writes it as an overlay the server applies at start (`overlays` in the
//! config). The encoder and the trained heads file are untouched.
#![forbid(unsafe_code)]
use std::path::PathBuf;

use anyhow::{bail, Result};

use super::adapt::adapt;
use super::data::{read_rows, Row};
use super::embed::{Embedder, RowFeatures};
use super::recommend::{
    describe, recommend_floors, Floor, RecommendationFile, RECOMMENDATION_FORMAT,
};
use super::score::{encoder_for, EncoderArgs};
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
    /// Quality a recommended Route floor must keep, as a share of the best model's mean score.
    #[arg(long, default_value_t = 0.98)]
    pub target: f64,
    /// Skip the Route floor recommendation (it calibrates twice more, on halves of the rows).
    #[arg(long)]
    pub no_recommend: bool,
    /// Write the recommendation (per source, JSON) here too.
    #[arg(long)]
    pub recommend_out: Option<PathBuf>,
    /// The server config the overlay will run under (default: the embedded one): the
    /// recommendation replays its default floor, `policy.verify_threshold` and
    /// `gateway.max_escalations`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Cache encoder outputs here (off by default), as `score --cache-dir`.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    if !(a.target > 0.0 && a.target <= 1.5) {
        bail!("--target is a share of the best model's quality, in (0, 1.5]");
    }
    let heads = Heads::load(&a.heads)?;
    let rows = read_rows(&a.data)?;
    // (read_rows has checked every score's range.)
    if let Some(r) = rows.iter().find(|r| r.score.is_none()) {
        bail!(
            "{}: line {}: no score to learn from",
            a.data.display(),
            r.line
        );
    }
    let enc = encoder_for(&a.encoder, &heads, &a.heads)?;
    let emb = Embedder {
        enc: &enc,
        cache_dir: a.cache_dir.clone(),
    };
    let f = RowFeatures::compute(&emb, "calibrate", &rows, true, heads.max_answer_tokens)?;
    let (overlay, report) = fit_overlay(&heads, &rows, &f, a.min_rows)?;
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
    eprintln!("{}", describe_thresholds(&report["verify_thresholds"]));
    if !a.no_recommend {
        recommend(&a, &heads, &rows, &f)?;
    }
    Ok(())
}

/// One paragraph on Verify's thresholds: re-learned or kept, and for the floors the operator
/// is likely to ask for, what the trained table's threshold shipped on this traffic.
fn describe_thresholds(r: &serde_json::Value) -> String {
    let rows = r["held_out_rows"].as_u64().unwrap_or(0);
    if r["relearned"] != true {
        return format!(
            "Verify thresholds: trained table kept: {} ({rows} held-out answers; {} needed)",
            r["why"].as_str().unwrap_or("not re-learned"),
            super::adapt::MIN_ROWS_FOR_THRESHOLDS
        );
    }
    let pairs = |v: &serde_json::Value| -> Vec<(f64, f64)> {
        serde_json::from_value(v.clone()).unwrap_or_default()
    };
    let table = pairs(&r["table"]);
    let mut s = format!("Verify thresholds re-learned on {rows} held-out answers:");
    if table.is_empty() {
        s.push_str(" no floor reached on 30 or more of them; a floor is its own threshold");
    }
    for (f, t) in &table {
        s.push_str(&format!(" {f:.2}→{t:.3}"));
    }
    let trained = r["trained_table_here"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let held: Vec<String> = trained
        .iter()
        .filter(|e| {
            [0.8, 0.9, 0.95]
                .iter()
                .any(|f| e["floor"].as_f64() == Some(*f))
        })
        .map(|e| match e["passed"].as_f64() {
            Some(p) => format!(
                "floor {:.2}: {} shipped, {:.1}% passed",
                e["floor"].as_f64().unwrap_or(f64::NAN),
                e["shipped"],
                100.0 * p
            ),
            None => format!(
                "floor {:.2}: none shipped",
                e["floor"].as_f64().unwrap_or(f64::NAN)
            ),
        })
        .collect();
    if !held.is_empty() {
        s.push_str(&format!(
            "\n  the trained thresholds on the same answers: {}",
            held.join("; ")
        ));
    }
    s
}

/// Prints (and with `--recommend-out` writes) the Route floor each source's labelled rows
/// support, beside the embedded config's default; rows without a cost leave it out with a
/// note, not an error (the overlay stands).
fn recommend(a: &CalibrateArgs, heads: &Heads, rows: &[Row], f: &RowFeatures) -> Result<()> {
    // A file from an earlier run must not pass for this one's.
    if let Some(out) = &a.recommend_out {
        if out.exists() {
            std::fs::remove_file(out)
                .map_err(|e| anyhow::anyhow!("removing {}: {e}", out.display()))?;
        }
    }
    let cfg = crate::config::Config::load(&crate::config::Overrides {
        config: a.config.clone(),
        ..Default::default()
    })?;
    // The default the server would serve: a configured quality_floor or cost_weight
    // replaces the relative floor.
    let default = crate::policy::default_relative_floor(&cfg.policy).map(Floor::RelativeFloor);
    let recs = match recommend_floors(heads, rows, f, a.target, default, &cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("calibrate: no Route floor recommended: {e:#}");
            return Ok(());
        }
    };
    for r in &recs {
        print!("{}", describe(r, a.target));
    }
    if let Some(out) = &a.recommend_out {
        let text = serde_json::to_string_pretty(&RecommendationFile {
            format: RECOMMENDATION_FORMAT,
            sources: &recs,
        })?;
        std::fs::write(out, text + "\n")
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    }
    Ok(())
}

/// The overlay of one calibration: `adapt` on a copy of the heads, then what changed; with
/// `adapt`'s report.
pub fn fit_overlay(
    heads: &Heads,
    rows: &[super::data::Row],
    f: &RowFeatures,
    min_rows: usize,
) -> Result<(Overlay, serde_json::Value)> {
    let mut h = heads.clone();
    let report = adapt(&mut h, rows, f, true)?;
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
    let overlay = Overlay {
        format: OVERLAY_FORMAT,
        heads_revision: heads.revision.clone(),
        prior: h.router.prior.clone(),
        models,
        verifier: changed.then(|| h.verifier.clone()),
        verifier_rows,
        memory: h.memory.clone(),
        // Whenever the verifier or the table changed: a later overlay's verifier must not
        // run on an earlier overlay's table (overlays apply in order), so a re-fitted verifier
        // carries the table it was calibrated with, the trained one when not re-learned.
        verify_thresholds: (changed
            || report["verify_thresholds"]["relearned"] == true
            || h.verify_thresholds != heads.verify_thresholds)
            .then(|| h.verify_thresholds.clone()),
    };
    Ok((overlay, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::adapt::tests::traffic;
    use crate::eval::score::tests::trained_heads;

    /// An overlay with a re-fitted verifier carries the table it was calibrated with (the
    /// trained one when too few answers re-learned it), so that a later overlay's verifier
    /// never runs on an earlier overlay's table.
    #[test]
    fn a_refitted_verifier_carries_its_thresholds() -> Result<()> {
        let heads = trained_heads()?;
        let (few, f) = traffic(
            super::super::adapt::MIN_ROWS_FOR_THRESHOLDS - 20,
            0,
            heads.dim,
        );
        let (o, report) = fit_overlay(&heads, &few, &f, 1)?;
        assert!(o.verifier.is_some(), "{report}");
        assert_eq!(report["verify_thresholds"]["relearned"], false, "{report}");
        assert_eq!(o.verify_thresholds.as_ref(), Some(&heads.verify_thresholds));
        let (many, f) = traffic(600, 0, heads.dim);
        let (o, report) = fit_overlay(&heads, &many, &f, 1)?;
        assert_eq!(report["verify_thresholds"]["relearned"], true, "{report}");
        let t = o.verify_thresholds.clone().unwrap_or_default();
        assert!(!t.is_empty() && t != heads.verify_thresholds, "{t:?}");
        // Applied over an overlay with another table, the last one's table is the one in use.
        let mut h = heads.clone();
        o.apply(&mut h)?;
        assert_eq!(h.verify_thresholds, t);
        let (o2, _) = fit_overlay(&heads, &few, &traffic(80, 0, heads.dim).1, 1)?;
        o2.apply(&mut h)?;
        assert_eq!(h.verify_thresholds, heads.verify_thresholds);
        Ok(())
    }
}
