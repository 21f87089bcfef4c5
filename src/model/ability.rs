//! Fitting one model's ability on labelled prompts (Newton steps, an L2 pull towards a
//! starting ability): what calibration, overlays and serving-time feedback share.
#![forbid(unsafe_code)]
use anyhow::{bail, Result};

use super::heads::Ability;
use crate::base::sigmoid;

/// One model's ability (u, b) from labelled rows, with the prompt part fixed: Newton on
/// sum CE + l2/2 |θ - prior|², so a handful of rows moves it little and many rows decide.
pub fn fit_ability(
    z: &[f32],
    s: &[f32],
    y: &[f32],
    k: usize,
    prior: &Ability,
    l2: f64,
) -> Result<Ability> {
    fit_ability_split(z, s, y, k, prior, l2, l2)
}

/// [`fit_ability`] with its own pull on the intercept: `l2_u` on the skill loadings, `l2_b`
/// on the level, so a model's level can follow new traffic while its skills stay.
pub fn fit_ability_split(
    z: &[f32],
    s: &[f32],
    y: &[f32],
    k: usize,
    prior: &Ability,
    l2_u: f64,
    l2_b: f64,
) -> Result<Ability> {
    let n = y.len();
    let p = k + 1;
    let mut th: Vec<f64> = prior
        .u
        .iter()
        .map(|&v| v as f64)
        .chain([prior.b as f64])
        .collect();
    let pr = th.clone();
    for _ in 0..25 {
        let mut g = vec![0.0f64; p];
        let mut h = vec![0.0f64; p * p];
        for i in 0..n {
            let x: Vec<f64> = z[i * k..(i + 1) * k]
                .iter()
                .map(|&v| v as f64)
                .chain([1.0])
                .collect();
            let zl = s[i] as f64 + x.iter().zip(&th).map(|(a, b)| a * b).sum::<f64>();
            let mu = sigmoid(zl);
            let w = (mu * (1.0 - mu)).max(1e-9);
            for a in 0..p {
                g[a] += (mu - y[i] as f64) * x[a];
                for b in 0..p {
                    h[a * p + b] += w * x[a] * x[b];
                }
            }
        }
        for a in 0..p {
            let l2 = if a == k { l2_b } else { l2_u };
            g[a] += l2 * (th[a] - pr[a]);
            h[a * p + a] += l2;
        }
        let step = cholesky_solve(&mut h, &g, p)?;
        let mut mx = 0.0f64;
        for a in 0..p {
            th[a] -= step[a];
            mx = mx.max(step[a].abs());
        }
        if mx < 1e-7 {
            break;
        }
    }
    Ok(Ability {
        u: th[..k].iter().map(|&v| v as f32).collect(),
        b: th[k] as f32,
    })
}

/// Solves A x = b for symmetric positive definite A (overwritten by its factor).
pub fn cholesky_solve(a: &mut [f64], b: &[f64], n: usize) -> Result<Vec<f64>> {
    if !cholesky_factor(a, n) {
        bail!("logistic: Hessian is not positive definite");
    }
    let mut z = b.to_vec();
    cholesky_substitute(a, &mut z, n);
    Ok(z)
}

/// Overwrites the lower triangle of A (n × n, symmetric positive definite) with L, where
/// L Lᵀ = A; false when A is not positive definite.
pub fn cholesky_factor(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let mut s = a[j * n + j];
        for k in 0..j {
            s -= a[j * n + k] * a[j * n + k];
        }
        if s <= 0.0 || !s.is_finite() {
            return false;
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
    true
}

/// Solves L Lᵀ x = z in place, L from [`cholesky_factor`].
pub fn cholesky_substitute(l: &[f64], z: &mut [f64], n: usize) {
    for i in 0..n {
        for k in 0..i {
            z[i] -= l[i * n + k] * z[k];
        }
        z[i] /= l[i * n + i];
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            z[i] -= l[k * n + i] * z[k];
        }
        z[i] /= l[i * n + i];
    }
}

/// The ability whose mean pass probability over a benchmark's prompts (router features `s`,
/// `z` row-major with `k` columns) equals `accuracy`: the population prior's skills, its
/// intercept moved (bisection; the mean is monotone in it). How a published accuracy becomes
/// a model's parameters.
pub fn ability_for_accuracy(
    prior: &Ability,
    s: &[f32],
    z: &[f32],
    accuracy: f64,
) -> Result<Ability> {
    let k = prior.u.len();
    if s.is_empty() || z.len() != s.len() * k {
        bail!(
            "benchmark features: {} prompts, {} values for {k} skills",
            s.len(),
            z.len()
        );
    }
    if !(accuracy > 0.0 && accuracy < 1.0) {
        bail!("accuracy {accuracy} must be in (0, 1)");
    }
    let base: Vec<f64> = s
        .iter()
        .zip(z.chunks_exact(k))
        .map(|(&si, zi)| si as f64 + crate::base::dot(&prior.u, zi) as f64)
        .collect();
    let mean = |b: f64| base.iter().map(|&x| sigmoid(x + b)).sum::<f64>() / base.len() as f64;
    let (mut lo, mut hi) = (-30.0f64, 30.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if mean(mid) < accuracy {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Ability {
        u: prior.u.clone(),
        b: (0.5 * (lo + hi)) as f32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_accuracy_is_met_on_the_benchmark() {
        let prior = Ability {
            u: vec![0.5, -0.25],
            b: 0.0,
        };
        let s = [0.3f32, -1.0, 2.0, 0.0];
        let z = [1.0f32, 0.0, 0.0, 1.0, -1.0, 2.0, 0.5, 0.5];
        for acc in [0.1, 0.5, 0.84] {
            let a = ability_for_accuracy(&prior, &s, &z, acc).unwrap();
            let m: f64 = s
                .iter()
                .zip(z.chunks_exact(2))
                .map(|(&si, zi)| sigmoid((si + crate::base::dot(&a.u, zi) + a.b) as f64))
                .sum::<f64>()
                / 4.0;
            assert!((m - acc).abs() < 1e-4, "{m} vs {acc}");
        }
        assert!(ability_for_accuracy(&prior, &s, &z, 1.0).is_err());
        assert!(ability_for_accuracy(&prior, &s, &z[..3], 0.5).is_err());
    }
}
