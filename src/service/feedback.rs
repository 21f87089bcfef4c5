//! Learning from outcomes while serving: the Feedback RPC's store (bounded per model) and its
//! journal, the request ids Route remembers (bounded), and the re-fit pass that runs off the
//! hot path. A re-fit that does worse than the current parameters on held-out outcomes is not
//! applied.
#![forbid(unsafe_code)]
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::heads::Ability;

/// One outcome, as the router reads it: the prompt's features (s, z) and the label, and the
/// answer's length when one was sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub s: f32,
    pub z: Vec<f32>,
    pub y: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u32>,
}

/// A journal line: an outcome and its model.
#[derive(Serialize, Deserialize)]
struct Entry {
    model: String,
    #[serde(flatten)]
    outcome: Outcome,
}

#[derive(Default)]
pub struct ModelOutcomes {
    pub rows: VecDeque<Outcome>,
    /// Outcomes received since the model was last re-fitted.
    pub fresh: usize,
}

impl ModelOutcomes {
    /// Mean answer length of the outcomes that came with an answer.
    pub fn mean_answer_tokens(&self) -> Option<u32> {
        let t: Vec<u64> = self
            .rows
            .iter()
            .filter_map(|o| o.tokens)
            .map(u64::from)
            .collect();
        (!t.is_empty()).then(|| (t.iter().sum::<u64>() / t.len() as u64).max(1) as u32)
    }
}

/// The prompts of recent Routes by request id, for Feedback that names one (bounded by
/// `feedback.remember_requests`). Apart from [`FeedbackStore`] so Route never waits on the
/// journal's writes.
#[derive(Default)]
pub struct RequestMemory {
    requests: HashMap<String, String>,
    order: VecDeque<String>,
    /// Bytes of the ids and prompts held (prompts run to `batch.max_input_bytes` each).
    bytes: usize,
}

/// The outcomes feedback keeps in memory (bounded per model by the config) and their journal.
#[derive(Default)]
pub struct FeedbackStore {
    pub models: BTreeMap<String, ModelOutcomes>,
    /// Every accepted outcome is appended here before it is acknowledged, and the file is
    /// rewritten to what memory holds after each applied re-fit and whenever it holds about
    /// twice that: nothing accepted is lost to a restart, and the file stays bounded like
    /// memory.
    journal: Option<(PathBuf, std::fs::File)>,
    /// Lines in the journal file.
    journal_lines: usize,
}

impl RequestMemory {
    /// Remembers a Route's prompt under its request id; the oldest are forgotten past `cap`
    /// ids or `cap_bytes` of ids and prompts (a prompt larger than that is not kept).
    pub fn remember(&mut self, request_id: &str, prompt: String, cap: usize, cap_bytes: usize) {
        let size = request_id.len() + prompt.len();
        if cap == 0 || request_id.is_empty() {
            return;
        }
        if size > cap_bytes {
            // Not kept; nor is an earlier prompt under the same id, which Feedback naming it
            // would otherwise get.
            if let Some(old) = self.requests.remove(request_id) {
                self.bytes -= request_id.len() + old.len();
                self.order.retain(|id| id != request_id);
            }
            return;
        }
        self.bytes += size;
        match self.requests.insert(request_id.to_string(), prompt) {
            Some(old) => self.bytes -= request_id.len() + old.len(),
            None => self.order.push_back(request_id.to_string()),
        }
        while self.order.len() > cap || self.bytes > cap_bytes {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(p) = self.requests.remove(&old) {
                self.bytes -= old.len() + p.len();
            }
        }
    }

    pub fn prompt_of(&self, request_id: &str) -> Option<String> {
        self.requests.get(request_id).cloned()
    }
}

impl FeedbackStore {
    /// Outcomes held in memory, all models together (what a compacted journal holds).
    fn held(&self) -> usize {
        self.models.values().map(|m| m.rows.len()).sum()
    }

    /// Keeps an outcome in memory (the oldest of its model dropped past `cap`).
    fn keep(&mut self, model: &str, o: Outcome, cap: usize) {
        let m = self.models.entry(model.to_string()).or_default();
        m.rows.push_back(o);
        while m.rows.len() > cap.max(1) {
            m.rows.pop_front();
        }
        m.fresh += 1;
    }

    /// Journals the outcome (when a journal is open), then keeps it. An error means it was
    /// not accepted.
    pub fn push(&mut self, model: &str, o: Outcome, cap: usize) -> std::io::Result<()> {
        if let Some((_, f)) = &mut self.journal {
            let mut line = serde_json::to_vec(&Entry {
                model: model.to_string(),
                outcome: o.clone(),
            })?;
            line.push(b'\n');
            f.write_all(&line)?;
            f.flush()?;
            self.journal_lines += 1;
        }
        self.keep(model, o, cap);
        // Re-fits compact the journal, but a model whose re-fits are all rejected, or that
        // never reaches min_rows, would let it grow without end: past twice what memory
        // holds (plus one model's worth), it is rewritten to what memory holds.
        let held = self.held();
        if self.journal.is_some() && self.journal_lines > 2 * held + cap {
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "feedback journal not compacted; it keeps every outcome");
                // Tried again after as many outcomes more, not on every one.
                self.journal_lines = held;
            }
        }
        Ok(())
    }

    /// Opens the journal at `path`, first reading back what it holds (a torn last line from a
    /// crash, or any unreadable line, is skipped with a warning). Returns the outcomes read.
    pub fn open_journal(&mut self, path: &Path, cap: usize) -> std::io::Result<usize> {
        let mut n = 0;
        self.journal_lines = 0;
        let mut torn = false;
        if let Ok(text) = std::fs::read_to_string(path) {
            self.journal_lines = text.lines().count();
            torn = !text.is_empty() && !text.ends_with('\n');
            for (i, line) in text.lines().enumerate() {
                match serde_json::from_str::<Entry>(line) {
                    Ok(e) => {
                        self.keep(&e.model, e.outcome, cap);
                        n += 1;
                    }
                    Err(e) => tracing::warn!(
                        journal = %path.display(), line = i + 1, error = %e,
                        "skipping an unreadable feedback journal line"
                    ),
                }
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        // A crash mid-write leaves a last line without its end: end it, or the next outcome
        // would be appended to it and be unreadable too.
        if torn {
            f.write_all(b"\n")?;
        }
        self.journal = Some((path.to_path_buf(), f));
        Ok(n)
    }

    /// Outcomes of `model` that the persisted parameters were already fitted on are not new.
    pub fn settle(&mut self, model: &str, fitted_rows: usize) {
        if let Some(m) = self.models.get_mut(model) {
            m.fresh = m.rows.len().saturating_sub(fitted_rows);
        }
    }

    /// Rewrites the journal to exactly what memory holds (atomically: a temporary file
    /// renamed over it). The handle written through becomes the journal's, so there is no
    /// re-open that could fail after the rename and leave appends going to the replaced file.
    pub fn compact(&mut self) -> std::io::Result<()> {
        let Some((path, _)) = &self.journal else {
            return Ok(());
        };
        let path = path.clone();
        let tmp = path.with_extension("part");
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(&tmp)?;
            let mut w = std::io::BufWriter::new(f);
            for (model, mo) in &self.models {
                for o in &mo.rows {
                    serde_json::to_writer(
                        &mut w,
                        &Entry {
                            model: model.clone(),
                            outcome: o.clone(),
                        },
                    )?;
                    w.write_all(b"\n")?;
                }
            }
            let f = w.into_inner().map_err(|e| e.into_error())?;
            // On disk before it replaces the journal: a power loss must not leave it empty.
            f.sync_data()?;
            f
        };
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.journal = Some((path, file));
        self.journal_lines = self.held();
        Ok(())
    }
}

/// Mean log-loss of an ability on outcomes.
pub fn log_loss(a: &Ability, rows: &[&Outcome]) -> f64 {
    let n = rows.len().max(1) as f64;
    rows.iter()
        .map(|o| {
            let z = o.s + crate::base::dot(&a.u, &o.z) + a.b;
            let p = crate::base::sigmoid(z as f64).clamp(1e-7, 1.0 - 1e-7);
            let y = o.y as f64;
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum::<f64>()
        / n
}

/// Fits an ability on outcomes starting from `start` (an L2 pull towards it: `l2`).
pub fn fit(rows: &[&Outcome], start: &Ability, l2: f64) -> anyhow::Result<Ability> {
    let k = start.u.len();
    let mut z = Vec::with_capacity(rows.len() * k);
    let (mut s, mut y) = (Vec::new(), Vec::new());
    for o in rows {
        anyhow::ensure!(
            o.z.len() == k,
            "outcome has {} skills, the router {k}",
            o.z.len()
        );
        z.extend_from_slice(&o.z);
        s.push(o.s);
        y.push(o.y);
    }
    crate::model::ability::fit_ability(&z, &s, &y, k, start, l2)
}

/// The re-fit of one model, checked: fitted without every fifth outcome, it must do no worse
/// than `start` on those; then fitted on all. None when the check fails.
pub fn checked_refit(
    rows: &[Outcome],
    start: &Ability,
    l2: f64,
) -> anyhow::Result<Option<Ability>> {
    let (mut fit_rows, mut held) = (Vec::new(), Vec::new());
    for (i, o) in rows.iter().enumerate() {
        if i % 5 == 4 {
            held.push(o)
        } else {
            fit_rows.push(o)
        }
    }
    if !held.is_empty() {
        let trial = fit(&fit_rows, start, l2)?;
        let (new, old) = (log_loss(&trial, &held), log_loss(start, &held));
        // NaN fails too: only a loss known to be no worse passes.
        if new.is_nan() || new > old + 1e-9 {
            return Ok(None);
        }
    }
    let all: Vec<&Outcome> = rows.iter().collect();
    let a = fit(&all, start, l2)?;
    let finite = a.b.is_finite() && a.u.iter().all(|x| x.is_finite());
    Ok(finite.then_some(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(n: usize, y: f32) -> Vec<Outcome> {
        (0..n)
            .map(|i| Outcome {
                s: 0.0,
                z: vec![(i % 3) as f32 - 1.0, 0.5],
                y,
                tokens: None,
            })
            .collect()
    }

    #[test]
    fn a_refit_follows_the_outcomes_and_is_checked() {
        let start = Ability {
            u: vec![0.0, 0.0],
            b: -1.0,
        };
        let a = checked_refit(&outcomes(50, 1.0), &start, 2.0)
            .unwrap()
            .expect("all passes: the refit must help");
        assert!(a.b > start.b);
        // Labels that contradict themselves between fit and held-out rows: refused.
        let mut mixed = outcomes(50, 1.0);
        for (i, o) in mixed.iter_mut().enumerate() {
            o.y = if i % 5 == 4 { 0.0 } else { 1.0 };
        }
        assert!(checked_refit(&mixed, &start, 2.0).unwrap().is_none());
    }

    #[test]
    fn memory_is_bounded() {
        let (mut st, mut ids) = (FeedbackStore::default(), RequestMemory::default());
        for i in 0..100 {
            ids.remember(&format!("r{i}"), "p".into(), 10, usize::MAX);
            st.push("m", outcomes(1, 1.0).remove(0), 7).unwrap();
        }
        assert!(ids.prompt_of("r99").is_some() && ids.prompt_of("r0").is_none());
        assert_eq!((ids.requests.len(), ids.order.len()), (10, 10));
        assert_eq!(st.models["m"].rows.len(), 7);
    }

    /// Prompts run to `batch.max_input_bytes` each: the remembered ones are bounded by bytes
    /// too, the oldest forgotten first; one id sent again is counted once.
    #[test]
    fn remembered_prompts_are_bounded_by_bytes() {
        let mut ids = RequestMemory::default();
        let big = "x".repeat(1000);
        for i in 0..100 {
            ids.remember(&format!("r{i:02}"), big.clone(), 10_000, 5_100);
        }
        // Five of 1003 bytes fit in 5100.
        assert_eq!((ids.requests.len(), ids.order.len()), (5, 5));
        assert_eq!(ids.bytes, 5 * 1003);
        assert!(ids.prompt_of("r99").is_some() && ids.prompt_of("r94").is_none());
        ids.remember("r99", "short".into(), 10_000, 5_100);
        assert_eq!(ids.bytes, 4 * 1003 + 3 + 5);
        // Larger than the whole budget: not kept, nothing forgotten for it.
        ids.remember("huge", "y".repeat(6000), 10_000, 5_100);
        assert!(ids.prompt_of("huge").is_none());
        assert_eq!(ids.requests.len(), 5);
        // An id sent again with a prompt too large: its earlier prompt is not answered for it.
        ids.remember("r99", "y".repeat(6000), 10_000, 5_100);
        assert!(ids.prompt_of("r99").is_none());
        assert_eq!((ids.requests.len(), ids.order.len()), (4, 4));
        assert_eq!(ids.bytes, 4 * 1003);
    }

    #[test]
    fn the_journal_brings_back_what_was_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fb.journal");
        let mut st = FeedbackStore::default();
        assert_eq!(st.open_journal(&path, 100).unwrap(), 0);
        for o in outcomes(12, 1.0) {
            st.push("m", o, 100).unwrap();
        }
        // A crash mid-write leaves a torn last line: skipped, the rest read back.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"model\":\"m\",\"s\":0.")
            .unwrap();
        let mut back = FeedbackStore::default();
        assert_eq!(back.open_journal(&path, 100).unwrap(), 12);
        assert_eq!(back.models["m"].fresh, 12);
        // An outcome accepted after that restart starts a line of its own, not the torn one's.
        back.push("m", outcomes(1, 0.0).remove(0), 100).unwrap();
        assert_eq!(
            FeedbackStore::default().open_journal(&path, 100).unwrap(),
            13
        );
        // Compaction keeps what memory holds (bounded), nothing more.
        let mut small = FeedbackStore::default();
        small.open_journal(&path, 5).unwrap();
        small.compact().unwrap();
        let mut again = FeedbackStore::default();
        assert_eq!(again.open_journal(&path, 100).unwrap(), 5);
    }

    /// With no re-fit ever compacting it, the journal stays within about twice what memory
    /// holds, and what it holds still reads back as memory's rows.
    #[test]
    fn the_journal_stays_bounded_without_refits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fb.journal");
        let mut st = FeedbackStore::default();
        st.open_journal(&path, 7).unwrap();
        for i in 0..1000 {
            let model = if i % 2 == 0 { "a" } else { "b" };
            st.push(model, outcomes(1, 1.0).remove(0), 7).unwrap();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 2 * 14 + 7 + 1, "{lines} lines");
        assert!(!path.with_extension("part").exists());
        let mut back = FeedbackStore::default();
        back.open_journal(&path, 7).unwrap();
        assert_eq!(back.models["a"].rows.len(), 7);
        assert_eq!(back.models["b"].rows.len(), 7);
    }
}
