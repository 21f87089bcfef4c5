//! Small statistical fits: L2-regularised logistic regression (Newton's method, the Hessian by
//! GEMM), temperature scaling, and the figures we report (AUROC, ECE, log-loss).
use anyhow::{bail, Context, Result};

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
    // Mean cross-entropy (soft labels) plus the L2 penalty on the weights.
    let objective = |beta: &[f64]| -> f64 {
        let ce: f64 = (0..n)
            .map(|i| {
                let z: f64 = xa[i * p..(i + 1) * p]
                    .iter()
                    .zip(beta)
                    .map(|(a, b)| a * b)
                    .sum();
                softplus_ce(z, y[i] as f64)
            })
            .sum();
        ce / n as f64 + 0.5 * l2 * beta[..d].iter().map(|b| b * b).sum::<f64>()
    };
    let mut xw = vec![0.0f64; n * p];
    let grad_hess = |beta: &[f64]| -> (Vec<f64>, Vec<f64>) {
        let mut grad = vec![0.0f64; p];
        let mut h = vec![0.0f64; p * p];
        for i in 0..n {
            let row = &xa[i * p..(i + 1) * p];
            let z: f64 = row.iter().zip(beta).map(|(a, b)| a * b).sum();
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
        // SAFETY: h is p×p and xw is n×p, both allocated above with exactly those sizes;
        // the strides below stay inside them.
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
        (grad, h)
    };
    let beta = damped_newton(beta, 30, 1e-6, objective, grad_hess).context("logistic")?;
    Ok(LinearHead {
        w: beta[..d].iter().map(|&v| v as f32).collect(),
        b: beta[d] as f32,
    })
}

pub use crate::base::sigmoid;
pub use crate::model::ability::fit_ability;
use crate::model::ability::{damped_newton, softplus_ce};

pub fn bce(p: f64, y: f64) -> f64 {
    let p = p.clamp(1e-7, 1.0 - 1e-7);
    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
}

/// Mean log-loss of a logistic head on rows `x` (row-major, width `d`) with labels `y`.
pub fn head_log_loss(h: &LinearHead, x: &[f32], d: usize, y: &[f32]) -> f64 {
    let p: Vec<f64> = x
        .chunks_exact(d)
        .map(|x| sigmoid(h.logit(x) as f64))
        .collect();
    log_loss(&p, y)
}

pub fn log_loss(p: &[f64], y: &[f32]) -> f64 {
    p.iter()
        .zip(y)
        .map(|(&p, &y)| bce(p, y as f64))
        .sum::<f64>()
        / p.len().max(1) as f64
}

/// The shift c minimising summed CE(y, sigmoid(z + c)) + l2·c²/2 (Newton; soft labels). The
/// penalty keeps a one-class sample (every row passing) from running c to the ±20 bound,
/// which moved every model that reads the shifted start to p ≈ 1 (or 0).
pub fn shift(z: &[f64], y: &[f32], l2: f64) -> f64 {
    let mut c = 0.0f64;
    for _ in 0..50 {
        let (mut g, mut h) = (l2 * c, 1e-9f64 + l2);
        for (&zi, &yi) in z.iter().zip(y) {
            let mu = sigmoid(zi + c);
            g += mu - yi as f64;
            h += mu * (1.0 - mu);
        }
        let step = (g / h).clamp(-5.0, 5.0);
        c = (c - step).clamp(-20.0, 20.0);
        if step.abs() < 1e-9 {
            break;
        }
    }
    c
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

/// For each quality floor, the lowest p at which the answers with p ≥ it pass at least
/// `floor` of the time (at least 30 shipped), made non-decreasing in the floor.
pub fn threshold_table(p: &[f64], y: &[f32]) -> Vec<(f64, f64)> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let mut cuts = Vec::with_capacity(idx.len());
    let mut pass = 0.0;
    for (n, &i) in idx.iter().enumerate() {
        pass += if y[i] >= 0.5 { 1.0 } else { 0.0 };
        // A cut inside a run of equal p would count part of the run while `p >= t` ships
        // all of it: cut only where p falls.
        if idx.get(n + 1).is_some_and(|&j| p[j] == p[i]) {
            continue;
        }
        cuts.push((p[i], pass / (n + 1) as f64, n + 1));
    }
    let floors = [
        0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99,
    ];
    let mut out: Vec<(f64, f64)> = Vec::new();
    for f in floors {
        let t = cuts
            .iter()
            .filter(|c| c.2 >= 30 && c.1 >= f)
            .map(|c| c.0)
            .fold(f64::INFINITY, f64::min);
        if !t.is_finite() {
            break; // not reached on these rows: beyond the table the floor itself applies
        }
        let t = out.last().map_or(t, |&(_, prev): &(f64, f64)| t.max(prev));
        out.push((f, t));
    }
    out
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

    /// Most rows far on one side with label 0 and a small cluster of mostly passing rows on
    /// the other (a calibration fold of a traffic the verifier mostly rejects): plain Newton
    /// steps from the base rate overshoot, and the intercept ran off to -7e8 (a real re-fit
    /// fold reached -1.5e7). Every step must lower the penalised loss.
    #[test]
    fn logistic_does_not_diverge_when_newton_overshoots() {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..320 {
            let t = if i < 300 {
                -6.0 + 0.3 * (i as f64).sin()
            } else {
                0.5 + 0.5 * ((i - 300) as f64).cos()
            };
            let label = match i {
                0..300 => 0.0,
                _ if (i - 300) % 3 == 0 => 0.05,
                _ => 1.0,
            };
            x.extend([t as f32, (0.8 * t + 0.2 * (i as f64).sin()) as f32]);
            y.push(label);
        }
        let h = logistic(&x, 2, &y, 1e-4).unwrap();
        assert!(h.b.is_finite() && h.b.abs() < 100.0, "{h:?}");
        let base = {
            let m = y.iter().map(|&v| v as f64).sum::<f64>() / y.len() as f64;
            LinearHead {
                w: vec![0.0, 0.0],
                b: (m / (1.0 - m)).ln() as f32,
            }
        };
        let (fitted, start) = (
            head_log_loss(&h, &x, 2, &y),
            head_log_loss(&base, &x, 2, &y),
        );
        assert!(
            fitted < 0.5 * start,
            "{fitted} vs {start} at the start: {h:?}"
        );
    }

    #[test]
    fn platt_recovers_a_planted_scaling_and_survives_a_far_start() {
        let z: Vec<f64> = (0..2000).map(|i| (i as f64 / 250.0) - 4.0).collect();
        let y: Vec<f32> = z.iter().map(|&z| sigmoid(2.5 * z - 1.0) as f32).collect();
        let (a, b) = platt(&z, &y).unwrap();
        assert!((a - 2.5).abs() < 1e-4 && (b + 1.0).abs() < 1e-4, "{a} {b}");
        // Logits far from the labels' scale: a full step from (1, 0) overshoots.
        let z: Vec<f64> = (0..400).map(|i| 40.0 * ((i as f64) * 0.37).sin()).collect();
        let y: Vec<f32> = z.iter().map(|&z| sigmoid(0.02 * z + 3.0) as f32).collect();
        let (a, b) = platt(&z, &y).unwrap();
        assert!((a - 0.02).abs() < 1e-3 && (b - 3.0).abs() < 1e-2, "{a} {b}");
        assert!(platt(&z, &y[..10]).is_err(), "lengths must match");
        assert!(
            platt(&[f64::NAN, 1.0], &[1.0, 0.0]).is_err(),
            "non-finite logits"
        );
    }

    #[test]
    fn shift_recovers_an_offset() {
        let z: Vec<f64> = (0..400).map(|i| (i as f64 / 100.0) - 2.0).collect();
        let y: Vec<f32> = z.iter().map(|&z| sigmoid(z - 1.5) as f32).collect();
        assert!((shift(&z, &y, 0.0) + 1.5).abs() < 1e-6);
        assert!(
            (shift(&z, &y, 1.0) + 1.5).abs() < 0.05,
            "the penalty is slight on 400 rows"
        );
        assert_eq!(
            shift(&z, &vec![1.0; z.len()], 0.0),
            20.0,
            "one class: bounded"
        );
        // 25 rows, all passing: a finite shift, not the bound.
        let c = shift(&z[..25], &[1.0; 25], 1.0);
        assert!(c > 1.0 && c < 8.0, "{c}");
    }

    #[test]
    fn ece_is_zero_for_calibrated_soft_labels() {
        let z: Vec<f64> = (0..2000).map(|i| (i as f64 / 1000.0) - 1.0).collect();
        let y: Vec<f32> = z.iter().map(|&z| sigmoid(z) as f32).collect();
        let p: Vec<f64> = z.iter().map(|&z| sigmoid(z)).collect();
        assert!(ece(&p, &y, 10) < 1e-9);
        let over: Vec<f64> = z.iter().map(|&z| sigmoid(3.0 * z)).collect();
        assert!(ece(&over, &y, 10) > 0.01, "overconfidence shows");
    }

    #[test]
    fn threshold_table_meets_each_floor_on_its_data() {
        // p = i/100 for i in 0..100, passing exactly when i >= 40: precision of p ≥ t is 1 for
        // t ≥ 0.40 and falls below it.
        let p: Vec<f64> = (0..100).map(|i| i as f64 / 100.0).collect();
        let y: Vec<f32> = (0..100).map(|i| if i >= 40 { 1.0 } else { 0.0 }).collect();
        let t = threshold_table(&p, &y);
        assert!(!t.is_empty());
        for w in t.windows(2) {
            assert!(w[0].1 <= w[1].1, "non-decreasing: {t:?}");
        }
        for &(f, th) in &t {
            let shipped: Vec<usize> = (0..100).filter(|&i| p[i] >= th).collect();
            let prec =
                shipped.iter().filter(|&&i| y[i] > 0.5).count() as f64 / shipped.len() as f64;
            assert!(
                prec >= f,
                "floor {f}: threshold {th} ships at precision {prec}"
            );
        }
        // Precision 1.0 is reached at 0.40: every floor's threshold is at most that.
        assert!(t.iter().all(|&(_, th)| th <= 0.40 + 1e-12), "{t:?}");
    }

    /// Equal p ship together: a cut inside a run of them would count its first rows only.
    #[test]
    fn threshold_table_cuts_between_runs_of_equal_p() {
        // 10 passes at 0.9; 40 at 0.5 whose 10 passes come first; 50 failures at 0.1. Every
        // cut that ships 30 or more passes at most 20 / 50 = 0.4: no floor is reached. A cut
        // 20 rows into the 0.5 run would claim 20 / 30.
        let mut p = vec![0.9; 10];
        p.extend([0.5; 40]);
        p.extend([0.1; 50]);
        let mut y = vec![1.0f32; 20];
        y.extend([0.0; 80]);
        assert_eq!(threshold_table(&p, &y), vec![]);
        // With 30 of the run passing, p >= 0.5 ships 40 / 50 = 0.8: floors up to 0.8 get 0.5.
        for v in &mut y[20..40] {
            *v = 1.0;
        }
        let t = threshold_table(&p, &y);
        assert_eq!(t.first(), Some(&(0.5, 0.5)), "{t:?}");
        assert_eq!(t.last(), Some(&(0.8, 0.5)), "{t:?}");
    }
}

/// Training rows of the router: (prompt index, model index, soft label).
pub struct RouterRows {
    pub rows: Vec<(u32, u32, f32)>,
}

/// Parameters of the IRT-style router (see model::heads::RouterHead).
#[derive(Debug, Clone)]
pub struct RouterFit {
    pub k: usize,
    pub proj: Vec<f32>,
    pub w: Vec<f32>,
    pub c: f32,
    pub u: Vec<f32>,
    pub b: Vec<f32>,
}

impl RouterFit {
    pub fn logit(&self, z: &[f32], s: f32, m: usize) -> f32 {
        let k = self.k;
        s + self.b[m] + crate::base::dot(&self.u[m * k..(m + 1) * k], z)
    }

    /// (P e, w·e + c) for every prompt embedding in `e` (n × d).
    pub fn prompt_features(&self, e: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
        use rayon::prelude::*;
        let k = self.k;
        let n = e.len() / d;
        let mut z = vec![0.0f32; n * k];
        let mut s = vec![0.0f32; n];
        z.par_chunks_mut(k)
            .zip(s.par_iter_mut())
            .enumerate()
            .for_each(|(i, (zi, si))| {
                let ei = &e[i * d..(i + 1) * d];
                for (j, zj) in zi.iter_mut().enumerate() {
                    *zj = crate::base::dot(&self.proj[j * d..(j + 1) * d], ei);
                }
                *si = self.c + crate::base::dot(&self.w, ei);
            });
        (z, s)
    }
}

/// Fits the router by full-batch Adam on mean cross-entropy + L2 (abilities and projections;
/// model intercepts unpenalised). Deterministic for a given seed. `eval` is called every 25
/// steps with the current fit and may return a held-out loss; the best step is kept.
#[allow(clippy::too_many_arguments)]
pub fn fit_router(
    e: &[f32],
    d: usize,
    n_models: usize,
    data: &RouterRows,
    k: usize,
    l2: f32,
    steps: usize,
    seed: u64,
    mut eval: impl FnMut(&RouterFit) -> Option<f64>,
) -> (RouterFit, usize, Option<f64>) {
    let n_prompts = e.len() / d;
    let mut s0 = seed;
    let mut rnd = move || {
        s0 = super::util::mix(s0);
        ((s0 >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
    };
    let mut f = RouterFit {
        k,
        proj: (0..k * d).map(|_| rnd() * 0.2).collect(),
        w: vec![0.0; d],
        c: 0.0,
        u: (0..n_models * k).map(|_| rnd() * 0.2).collect(),
        b: vec![0.0; n_models],
    };
    // Intercepts start at each model's base rate.
    let mut sum = vec![(0.0f64, 0usize); n_models];
    for &(_, m, y) in &data.rows {
        sum[m as usize].0 += y as f64;
        sum[m as usize].1 += 1;
    }
    for (m, (s, n)) in sum.iter().enumerate() {
        let p = (s / (*n).max(1) as f64).clamp(0.02, 0.98);
        f.b[m] = (p / (1.0 - p)).ln() as f32;
    }
    let sizes = [k * d, d, 1, n_models * k, n_models];
    let mut adam: Vec<(Vec<f32>, Vec<f32>)> = sizes
        .iter()
        .map(|&n| (vec![0.0; n], vec![0.0; n]))
        .collect();
    let (lr, b1, b2, eps) = (0.01f32, 0.9f32, 0.999f32, 1e-8f32);
    let inv_n = 1.0 / data.rows.len().max(1) as f32;
    let mut best: (Option<f64>, usize, RouterFit) = (None, 0, f.clone());
    for step in 1..=steps {
        let (z, s) = f.prompt_features(e, d);
        let mut gz = vec![0.0f32; n_prompts * k];
        let mut gs = vec![0.0f32; n_prompts];
        let mut gu = vec![0.0f32; n_models * k];
        let mut gb = vec![0.0f32; n_models];
        for &(p, m, y) in &data.rows {
            let (p, m) = (p as usize, m as usize);
            let zp = &z[p * k..(p + 1) * k];
            let mu = crate::base::sigmoid(f.logit(zp, s[p], m) as f64) as f32;
            let g = (mu - y) * inv_n;
            gb[m] += g;
            gs[p] += g;
            for j in 0..k {
                gu[m * k + j] += g * zp[j];
                gz[p * k + j] += g * f.u[m * k + j];
            }
        }
        let mut gp = vec![0.0f32; k * d];
        let mut gw = vec![0.0f32; d];
        let mut gc = 0.0f32;
        for p in 0..n_prompts {
            let ep = &e[p * d..(p + 1) * d];
            for j in 0..k {
                let g = gz[p * k + j];
                if g != 0.0 {
                    for (a, &x) in gp[j * d..(j + 1) * d].iter_mut().zip(ep) {
                        *a += g * x;
                    }
                }
            }
            if gs[p] != 0.0 {
                for (a, &x) in gw.iter_mut().zip(ep) {
                    *a += gs[p] * x;
                }
                gc += gs[p];
            }
        }
        for (g, x) in gp.iter_mut().zip(&f.proj) {
            *g += l2 * x;
        }
        for (g, x) in gw.iter_mut().zip(&f.w) {
            *g += l2 * x;
        }
        for (g, x) in gu.iter_mut().zip(&f.u) {
            *g += l2 * x;
        }
        let t = step as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let mut gcv = [gc];
        let mut cv = [f.c];
        for (idx, (param, grad)) in [
            (&mut f.proj[..], &gp[..]),
            (&mut f.w[..], &gw[..]),
            (&mut cv[..], &gcv[..]),
            (&mut f.u[..], &gu[..]),
            (&mut f.b[..], &gb[..]),
        ]
        .into_iter()
        .enumerate()
        {
            let (m1, m2) = &mut adam[idx];
            for i in 0..param.len() {
                m1[i] = b1 * m1[i] + (1.0 - b1) * grad[i];
                m2[i] = b2 * m2[i] + (1.0 - b2) * grad[i] * grad[i];
                param[i] -= lr * (m1[i] / c1) / ((m2[i] / c2).sqrt() + eps);
            }
        }
        f.c = cv[0];
        gcv[0] = 0.0;
        let _ = gcv;
        if step % 25 == 0 || step == steps {
            match (eval(&f), best.0) {
                (Some(l), Some(b)) if l >= b => {}
                (Some(l), _) => best = (Some(l), step, f.clone()),
                (None, _) => best = (None, step, f.clone()),
            }
        }
    }
    let (loss, step, fit) = best;
    (fit, step, loss)
}

/// Platt scaling: (a, b) minimising the log-loss of sigmoid(a·z + b) (Newton, 2 parameters).
pub fn platt(z: &[f64], y: &[f32]) -> Result<(f64, f64)> {
    if z.len() != y.len() {
        bail!("platt: {} logits for {} labels", z.len(), y.len());
    }
    let loss = |t: &[f64]| -> f64 {
        z.iter()
            .zip(y)
            .map(|(&zi, &yi)| softplus_ce(t[0] * zi + t[1], yi as f64))
            .sum()
    };
    let grad_hess = |t: &[f64]| -> (Vec<f64>, Vec<f64>) {
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 1e-6, 0.0, 1e-6);
        for (&zi, &yi) in z.iter().zip(y) {
            let mu = sigmoid(t[0] * zi + t[1]);
            let w = (mu * (1.0 - mu)).max(1e-12);
            let r = mu - yi as f64;
            ga += r * zi;
            gb += r;
            haa += w * zi * zi;
            hab += w * zi;
            hbb += w;
        }
        (vec![ga, gb], vec![haa, hab, hab, hbb])
    };
    let t = damped_newton(vec![1.0, 0.0], 50, 1e-9, loss, grad_hess).context("platt")?;
    let (a, b) = (t[0], t[1]);
    Ok((a, b))
}
