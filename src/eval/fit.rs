//! Small statistical fits: L2-regularised logistic regression (Newton's method, the Hessian by
//! GEMM), temperature scaling, and the figures we report (AUROC, ECE, log-loss).
use anyhow::{bail, Result};

use crate::model::heads::LinearHead;

/// Minimises mean(w_i * CE(y_i, sigmoid(x_i·w + b))) + l2/2 |w|² with soft labels y in [0, 1].
/// `x` is row-major n×d. The intercept is not penalised.
pub fn logistic(x: &[f32], d: usize, y: &[f32], l2: f64) -> Result<LinearHead> {
    let n = y.len();
    if n == 0 || x.len() != n * d {
        bail!("logistic: {} features for {n} rows of dim {d}", x.len());
    }
    let p = d + 1; // + intercept
    let mut beta = vec![0.0f64; p];
    // Start the intercept at the base rate: fewer Newton steps.
    let mean = (y.iter().map(|&v| v as f64).sum::<f64>() / n as f64).clamp(1e-3, 1.0 - 1e-3);
    beta[d] = (mean / (1.0 - mean)).ln();
    let xa: Vec<f64> = (0..n)
        .flat_map(|i| {
            x[i * d..(i + 1) * d]
                .iter()
                .map(|&v| v as f64)
                .chain(std::iter::once(1.0))
        })
        .collect();
    let mut xw = vec![0.0f64; n * p];
    let mut h = vec![0.0f64; p * p];
    for _ in 0..30 {
        let mut grad = vec![0.0f64; p];
        for i in 0..n {
            let row = &xa[i * p..(i + 1) * p];
            let z: f64 = row.iter().zip(&beta).map(|(a, b)| a * b).sum();
            let mu = 1.0 / (1.0 + (-z).exp());
            let r = (mu - y[i] as f64) / n as f64;
            let s = (mu * (1.0 - mu) / n as f64).max(1e-12).sqrt();
            for j in 0..p {
                grad[j] += r * row[j];
                xw[i * p + j] = row[j] * s;
            }
        }
        for j in 0..d {
            grad[j] += l2 * beta[j];
        }
        // H = Xw' Xw + l2 I (intercept unpenalised; a tiny ridge keeps it solvable).
        unsafe {
            gemm::gemm(
                p,
                p,
                n,
                h.as_mut_ptr(),
                1,
                p as isize,
                false,
                xw.as_ptr(),
                p as isize,
                1, // Xw' : p×n, (i,k) = xw[k*p + i]
                xw.as_ptr(),
                1,
                p as isize, // Xw  : n×p
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        for j in 0..p {
            h[j * p + j] += if j < d { l2 } else { 1e-9 };
        }
        let step = cholesky_solve(&mut h, &grad, p)?;
        let mut max_step = 0.0f64;
        for j in 0..p {
            beta[j] -= step[j];
            max_step = max_step.max(step[j].abs());
        }
        if max_step < 1e-6 {
            break;
        }
    }
    Ok(LinearHead {
        w: beta[..d].iter().map(|&v| v as f32).collect(),
        b: beta[d] as f32,
    })
}

/// Solves A x = b for symmetric positive definite A (overwritten by its factor).
fn cholesky_solve(a: &mut [f64], b: &[f64], n: usize) -> Result<Vec<f64>> {
    for j in 0..n {
        let mut s = a[j * n + j];
        for k in 0..j {
            s -= a[j * n + k] * a[j * n + k];
        }
        if s <= 0.0 || !s.is_finite() {
            bail!("logistic: Hessian is not positive definite");
        }
        let l = s.sqrt();
        a[j * n + j] = l;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / l;
        }
    }
    let mut z = b.to_vec();
    for i in 0..n {
        for k in 0..i {
            z[i] -= a[i * n + k] * z[k];
        }
        z[i] /= a[i * n + i];
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            z[i] -= a[k * n + i] * z[k];
        }
        z[i] /= a[i * n + i];
    }
    Ok(z)
}

/// Temperature T > 0 minimising the log-loss of sigmoid(z / T) (golden-section on log T).
pub fn temperature(logits: &[f64], y: &[f32]) -> f64 {
    let loss = |lt: f64| {
        let t = lt.exp();
        logits
            .iter()
            .zip(y)
            .map(|(&z, &y)| bce(sigmoid(z / t), y as f64))
            .sum::<f64>()
    };
    let (mut a, mut b) = (-3.0f64, 3.0f64);
    let g = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..80 {
        let c = b - g * (b - a);
        let d = a + g * (b - a);
        if loss(c) < loss(d) {
            b = d;
        } else {
            a = c;
        }
    }
    ((a + b) / 2.0).exp()
}

pub fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

pub fn bce(p: f64, y: f64) -> f64 {
    let p = p.clamp(1e-7, 1.0 - 1e-7);
    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
}

pub fn log_loss(p: &[f64], y: &[f32]) -> f64 {
    p.iter()
        .zip(y)
        .map(|(&p, &y)| bce(p, y as f64))
        .sum::<f64>()
        / p.len().max(1) as f64
}

/// Area under the ROC curve for binary labels (ties count one half). None if one class is absent.
pub fn auroc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut i) = (0.0f64, 0usize);
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if labels[k] {
                rank_sum += avg_rank;
            }
        }
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&l| l).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    Some((rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

/// Expected calibration error over `bins` equal-width bins, against soft or hard labels.
pub fn ece(p: &[f64], y: &[f32], bins: usize) -> f64 {
    let mut sum_p = vec![0.0; bins];
    let mut sum_y = vec![0.0; bins];
    let mut cnt = vec![0usize; bins];
    for (&p, &y) in p.iter().zip(y) {
        let b = ((p * bins as f64) as usize).min(bins - 1);
        sum_p[b] += p;
        sum_y[b] += y as f64;
        cnt[b] += 1;
    }
    let n = p.len().max(1) as f64;
    (0..bins)
        .filter(|&b| cnt[b] > 0)
        .map(|b| (sum_p[b] - sum_y[b]).abs() / n)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_known_values() {
        assert_eq!(
            auroc(&[0.1, 0.2, 0.3, 0.4], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            auroc(&[0.4, 0.3, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        assert_eq!(auroc(&[0.5, 0.5], &[false, true]), Some(0.5));
        assert_eq!(auroc(&[0.5, 0.5], &[true, true]), None);
    }

    #[test]
    fn logistic_recovers_a_planted_model() {
        // y ~ Bernoulli(sigmoid(3*x0 - 2*x1 + 0.5)) on a deterministic pseudo-random design.
        let (n, d) = (4000, 3);
        let mut s = 12345u64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut x = Vec::new();
        let mut y = Vec::new();
        for _ in 0..n {
            let row: Vec<f64> = (0..d).map(|_| rnd() * 2.0 - 1.0).collect();
            let p = sigmoid(3.0 * row[0] - 2.0 * row[1] + 0.5);
            y.push(if rnd() < p { 1.0 } else { 0.0 });
            x.extend(row.iter().map(|&v| v as f32));
        }
        let h = logistic(&x, d, &y, 1e-6).unwrap();
        assert!((h.w[0] - 3.0).abs() < 0.4, "{:?}", h);
        assert!((h.w[1] + 2.0).abs() < 0.4, "{:?}", h);
        assert!(h.w[2].abs() < 0.3, "{:?}", h);
        assert!((h.b - 0.5).abs() < 0.2, "{:?}", h);
    }

    #[test]
    fn temperature_undoes_overconfidence() {
        // Labels drawn at p = sigmoid(z); logits reported 3x too large → T ≈ 3.
        let z: Vec<f64> = (0..2000).map(|i| (i as f64 / 1000.0) - 1.0).collect();
        let y: Vec<f32> = z.iter().map(|&z| sigmoid(z) as f32).collect();
        let t = temperature(&z.iter().map(|z| z * 3.0).collect::<Vec<_>>(), &y);
        assert!((t - 3.0).abs() < 0.05, "{t}");
        let p: Vec<f64> = z.iter().map(|&z| sigmoid(z)).collect();
        assert!(ece(&p, &y, 10) < 1e-9);
    }
}
