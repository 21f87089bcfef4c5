//! Rows of the routing data (JSONL, optionally gzip) and the price catalog.
#![forbid(unsafe_code)]
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One (prompt, model) row. `score`, `cost_usd` and `extra` may be absent (the score input).
#[derive(Debug, Clone, Deserialize)]
pub struct Row {
    pub source: String,
    #[serde(default)]
    pub task: Option<String>,
    pub prompt_id: String,
    pub prompt: String,
    pub model: String,
    #[serde(default)]
    pub score: Option<f64>,
    #[serde(default)]
    pub response: Option<String>,
    #[serde(default)]
    pub cost_usd: Option<f64>,
    #[serde(default)]
    pub prompt_tokens: Option<u64>,
    #[serde(default)]
    pub response_tokens: Option<u64>,
    /// Its line in the file it was read from (errors name it); 0 when not read from a file.
    #[serde(skip)]
    pub line: usize,
}

impl Row {
    /// Pass = score >= 0.5 (the data README's rule).
    pub fn passed(&self) -> Option<bool> {
        self.score.map(|s| s >= 0.5)
    }
}

#[cfg(test)]
impl Row {
    /// A labelled, answered row of `source` (tests).
    pub(crate) fn labelled(
        source: &str,
        prompt_id: String,
        prompt: String,
        model: &str,
        answer: &str,
        score: f64,
    ) -> Row {
        Row {
            source: source.into(),
            task: None,
            prompt_id,
            prompt,
            model: model.into(),
            score: Some(score),
            response: Some(answer.into()),
            cost_usd: None,
            prompt_tokens: None,
            response_tokens: None,
            line: 0,
        }
    }
}

/// Reads JSONL or JSONL.gz (detected by the gzip magic). A malformed line is an error naming
/// its number; nothing is skipped silently (blank lines excepted).
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = BufReader::new(f);
    let gz = r
        .fill_buf()
        .with_context(|| format!("reading {}", path.display()))?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else {
        Box::new(r)
    };
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.with_context(|| format!("{}: reading line {}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut row: Row = serde_json::from_str(&line)
            .with_context(|| format!("{}: line {} is not a valid row", path.display(), i + 1))?;
        if let Some(s) = row.score {
            if !(0.0..=1.0).contains(&s) {
                bail!(
                    "{}: line {}: score {s} is outside [0, 1]",
                    path.display(),
                    i + 1
                );
            }
        }
        if row.model.trim().is_empty() {
            bail!("{}: line {}: model is empty", path.display(), i + 1);
        }
        row.line = i + 1;
        rows.push(row);
    }
    Ok(rows)
}

#[derive(Debug, Clone, Deserialize)]
pub struct Price {
    pub model: String,
    pub in_usd_per_mtok: f64,
    pub out_usd_per_mtok: f64,
}

pub fn read_catalog(path: &Path) -> Result<BTreeMap<String, Price>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let list: Vec<Price> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(list.into_iter().map(|p| (p.model.clone(), p)).collect())
}

/// Rows with the fields a replay needs (a score and a cost: `eval` and `consensus` price and
/// grade every row); anything else is an error naming the row.
pub fn check_labelled(rows: &[Row], path: &Path) -> Result<()> {
    for r in rows {
        match (r.score, r.cost_usd) {
            (Some(_), Some(c)) if c.is_finite() && c >= 0.0 => {}
            _ => bail!(
                "{}: line {} ({}/{} {}) needs a score and a non-negative cost_usd",
                path.display(),
                r.line,
                r.source,
                r.prompt_id,
                r.model
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_plain_and_gzip_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let good =
            r#"{"source":"s","prompt_id":"1","prompt":"p","model":"m","score":1.0,"response":"r"}"#;
        let plain = dir.path().join("a.jsonl");
        std::fs::write(&plain, format!("{good}\n\n{good}\n")).unwrap();
        assert_eq!(read_rows(&plain).unwrap().len(), 2);

        let gz = dir.path().join("a.jsonl.gz");
        let mut enc =
            flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), Default::default());
        writeln!(enc, "{good}").unwrap();
        enc.finish().unwrap();
        let rows = read_rows(&gz).unwrap();
        assert_eq!(rows[0].passed(), Some(true));

        let bad = dir.path().join("b.jsonl");
        std::fs::write(&bad, format!("{good}\n{{\"source\": 3}}\n")).unwrap();
        let e = format!("{:#}", read_rows(&bad).unwrap_err());
        assert!(e.contains("line 2"), "{e}");
    }
}
