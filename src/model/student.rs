//! A static student of the encoder, for Route's fast path (issue 15): a text's embedding is
//! the mean of its tokens' input word vectors (MiniLM's own table, no attention, no layers)
//! mapped linearly onto the encoder's pooled output, `normalize(bag · W + b)`. Routing reads
//! mostly what a prompt is about, which a bag of words carries; it costs a gather and one
//! 384 × 384 product instead of six transformer layers.
//!
//! `W` and `b` are a ridge regression of the encoder's outputs on the bags, fitted on train
//! prompts by `tiergate distill-static` and stored as f16 (`models/static-student.bin`,
//! embedded at build time and used when its model revision matches the weights).
#![forbid(unsafe_code)]
use super::ability::{cholesky_factor, cholesky_substitute};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"TGSTUD1\n";

/// What the file says about itself, as JSON after the magic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StudentInfo {
    /// `MiniLm::revision()` of the weights whose word vectors and outputs it was fitted on.
    pub model_revision: String,
    pub dim: usize,
    /// How it was made (data, prompts, ridge), for people.
    #[serde(default)]
    pub made_from: String,
}

pub struct StaticStudent {
    info: StudentInfo,
    /// `dim × dim`, row-major: `y = x · map + bias`.
    map: Vec<f32>,
    bias: Vec<f32>,
}

/// The mean of the word vectors of `ids` without its first and last token ([CLS], [SEP]);
/// all of them when there is nothing in between. `word` is `vocab × dim`; ids outside it are
/// skipped (the tokenizer never makes them).
pub fn bag(word: &[f32], dim: usize, ids: &[u32], out: &mut [f32]) {
    out.fill(0.0);
    let inner = if ids.len() > 2 {
        &ids[1..ids.len() - 1]
    } else {
        ids
    };
    let mut n = 0usize;
    for &id in inner {
        if let Some(v) = word.get(id as usize * dim..(id as usize + 1) * dim) {
            out.iter_mut().zip(v).for_each(|(o, &x)| *o += x);
            n += 1;
        }
    }
    if n > 0 {
        let inv = 1.0 / n as f32;
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

impl StaticStudent {
    /// Ridge regression of `teacher` (n × dim) on `bags` (n × dim), both row-major, with an
    /// intercept; `lambda` on the centred normal equations.
    pub fn fit(
        bags: &[f32],
        teacher: &[f32],
        dim: usize,
        lambda: f64,
        info: StudentInfo,
    ) -> Result<Self> {
        ensure!(dim > 0 && bags.len() == teacher.len() && bags.len().is_multiple_of(dim));
        let n = bags.len() / dim;
        ensure!(n > 1, "need at least two texts to fit a student");
        let mean = |m: &[f32]| -> Vec<f64> {
            let mut mu = vec![0.0f64; dim];
            for row in m.chunks(dim) {
                mu.iter_mut().zip(row).for_each(|(a, &x)| *a += x as f64);
            }
            mu.iter_mut().for_each(|a| *a /= n as f64);
            mu
        };
        let (mx, my) = (mean(bags), mean(teacher));
        // A = XcᵀXc + λI, B = XcᵀYc, in f64.
        let mut a = vec![0.0f64; dim * dim];
        let mut b = vec![0.0f64; dim * dim];
        let mut xc = vec![0.0f64; dim];
        let mut yc = vec![0.0f64; dim];
        for (xr, yr) in bags.chunks(dim).zip(teacher.chunks(dim)) {
            xc.iter_mut()
                .zip(xr.iter().zip(&mx))
                .for_each(|(c, (&x, m))| *c = x as f64 - m);
            yc.iter_mut()
                .zip(yr.iter().zip(&my))
                .for_each(|(c, (&y, m))| *c = y as f64 - m);
            for i in 0..dim {
                let xi = xc[i];
                let (ar, br) = (
                    &mut a[i * dim..(i + 1) * dim],
                    &mut b[i * dim..(i + 1) * dim],
                );
                ar.iter_mut().zip(&xc).for_each(|(s, &x)| *s += xi * x);
                br.iter_mut().zip(&yc).for_each(|(s, &y)| *s += xi * y);
            }
        }
        for i in 0..dim {
            a[i * dim + i] += lambda;
        }
        ensure!(
            cholesky_factor(&mut a, dim),
            "the student's normal equations are not positive definite"
        );
        // W = A⁻¹B, a column at a time on the one factor.
        let mut w = vec![0.0f64; dim * dim];
        let mut col = vec![0.0f64; dim];
        for c in 0..dim {
            col.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = b[i * dim + c]);
            cholesky_substitute(&a, &mut col, dim);
            col.iter()
                .enumerate()
                .for_each(|(i, &v)| w[i * dim + c] = v);
        }
        let map: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        // b = ȳ − x̄ · W
        let bias = (0..dim)
            .map(|j| (my[j] - (0..dim).map(|i| mx[i] * w[i * dim + j]).sum::<f64>()) as f32)
            .collect();
        Ok(Self { info, map, bias })
    }

    pub fn info(&self) -> &StudentInfo {
        &self.info
    }

    pub fn dim(&self) -> usize {
        self.info.dim
    }

    /// `normalize(bag · W + b)` into `out` (both `dim` long).
    pub fn apply(&self, bag: &[f32], out: &mut [f32]) {
        let d = self.info.dim;
        out.copy_from_slice(&self.bias);
        for (i, &x) in bag.iter().enumerate().take(d) {
            if x != 0.0 {
                let row = &self.map[i * d..(i + 1) * d];
                out.iter_mut().zip(row).for_each(|(o, &w)| *o += x * w);
            }
        }
        let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            out.iter_mut().for_each(|v| *v /= norm);
        }
    }

    /// The file: magic, u32 LE length of the JSON header, the header, then `map` and `bias`
    /// as f16 LE.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let head = serde_json::to_vec(&self.info)?;
        let mut v = Vec::with_capacity(12 + head.len() + 2 * (self.map.len() + self.bias.len()));
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&u32::try_from(head.len())?.to_le_bytes());
        v.extend_from_slice(&head);
        for &x in self.map.iter().chain(&self.bias) {
            v.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
        }
        Ok(v)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .context("not a tiergate static student (bad magic)")?;
        let (len, rest) = rest
            .split_at_checked(4)
            .context("truncated header length")?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let (head, body) = rest.split_at_checked(len).context("truncated header")?;
        let info: StudentInfo = serde_json::from_slice(head).context("student header")?;
        let d = info.dim;
        ensure!((1..=4096).contains(&d), "student dim {d} out of range");
        let want = 2 * (d * d + d);
        if body.len() != want {
            bail!("student body is {} bytes, {want} expected", body.len());
        }
        let vals: Vec<f32> = body
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        ensure!(
            vals.iter().all(|v| v.is_finite()),
            "student values not finite"
        );
        let (map, bias) = vals.split_at(d * d);
        Ok(Self {
            info,
            map: map.to_vec(),
            bias: bias.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(dim: usize) -> StudentInfo {
        StudentInfo {
            model_revision: "test".into(),
            dim,
            made_from: String::new(),
        }
    }

    /// A linear teacher is recovered, and the f16 file keeps it.
    #[test]
    fn fit_recovers_a_linear_map_and_round_trips() {
        let (n, d) = (200, 6);
        let mut seed = 9u64;
        let mut r = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let w: Vec<f32> = (0..d * d).map(|_| r()).collect();
        let x: Vec<f32> = (0..n * d).map(|_| r()).collect();
        let y: Vec<f32> = x
            .chunks(d)
            .flat_map(|row| {
                (0..d)
                    .map(|j| 0.3 + (0..d).map(|i| row[i] * w[i * d + j]).sum::<f32>())
                    .collect::<Vec<_>>()
            })
            .collect();
        let s = StaticStudent::fit(&x, &y, d, 1e-9, info(d)).unwrap();
        for (a, b) in s.map.iter().zip(&w) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
        assert!(s.bias.iter().all(|b| (b - 0.3).abs() < 1e-3));
        let back = StaticStudent::from_bytes(&s.to_bytes().unwrap()).unwrap();
        let (mut o1, mut o2) = (vec![0.0; d], vec![0.0; d]);
        s.apply(&x[..d], &mut o1);
        back.apply(&x[..d], &mut o2);
        let cos: f32 = o1.iter().zip(&o2).map(|(a, b)| a * b).sum();
        assert!(cos > 0.9999, "f16 file changed the output: cos {cos}");
    }

    #[test]
    fn bad_files_are_errors() {
        let s = StaticStudent::fit(
            &[1.0, 0.0, 0.0, 1.0],
            &[1.0, 2.0, 3.0, 4.0],
            2,
            0.1,
            info(2),
        )
        .unwrap();
        let good = s.to_bytes().unwrap();
        for cut in [0, 4, 9, 12, good.len() - 1] {
            assert!(
                StaticStudent::from_bytes(&good[..cut]).is_err(),
                "cut {cut}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(StaticStudent::from_bytes(&long).is_err());
        let mut nan = good.clone();
        let at = nan.len() - 2;
        nan[at..].copy_from_slice(&half::f16::NAN.to_le_bytes());
        assert!(StaticStudent::from_bytes(&nan).is_err());
    }

    #[test]
    fn bag_skips_cls_and_sep_and_unknown_ids() {
        let word = vec![1.0, 1.0, 2.0, 2.0, 4.0, 4.0]; // vocab 3, dim 2
        let mut out = vec![0.0; 2];
        bag(&word, 2, &[0, 1, 2, 0], &mut out);
        assert_eq!(out, vec![3.0, 3.0]);
        bag(&word, 2, &[0, 1, 99, 0], &mut out);
        assert_eq!(out, vec![2.0, 2.0]);
        bag(&word, 2, &[2], &mut out);
        assert_eq!(out, vec![4.0, 4.0]);
        bag(&word, 2, &[], &mut out);
        assert_eq!(out, vec![0.0, 0.0]);
    }
}
