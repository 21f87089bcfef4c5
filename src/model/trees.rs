//! Gradient-boosted regression trees over a few dense features: the verifier's nonlinear part.
//!
//! Why trees: the verifier's cues interact (a bare letter means one thing from a strong model
//! and another from a weak one; an option's length rank matters only on multiple choice), and
//! one linear head can only add them up. Histogram-based, depth-wise, no sampling: the fit is
//! deterministic. A few hundred depth-3 trees are tens of kilobytes of JSON.
#![forbid(unsafe_code)]
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::base::sigmoid;

/// One node: `(feature, value, left, right)`. `feature` ≥ 0: go left when
/// `x[feature] <= value`, else right. `feature` = -1: a leaf adding `value` to the margin.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Node(pub i32, pub f32, pub u32, pub u32);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Tree {
    fn leaf_value(&self, x: &[f32]) -> f32 {
        let mut i = 0usize;
        // Children always sit after their parent (checked by `Forest::validate`); the step
        // bound keeps an unvalidated tree from looping.
        for _ in 0..self.nodes.len() {
            let Some(&Node(f, v, l, r)) = self.nodes.get(i) else {
                return 0.0;
            };
            if f < 0 {
                return v;
            }
            let xv = x.get(f as usize).copied().unwrap_or(0.0);
            i = if xv <= v { l as usize } else { r as usize };
        }
        0.0
    }

    fn scale(&mut self, a: f32) {
        for n in &mut self.nodes {
            if n.0 < 0 {
                n.1 *= a;
            }
        }
    }
}

/// A sum of trees: the margin added to a logit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Forest {
    pub trees: Vec<Tree>,
}

impl Forest {
    pub fn margin(&self, x: &[f32]) -> f32 {
        self.trees.iter().map(|t| t.leaf_value(x)).sum()
    }

    /// Multiplies every leaf: the forest's share of a logit scaled by `a`.
    pub fn scale(&mut self, a: f32) {
        for t in &mut self.trees {
            t.scale(a);
        }
    }

    /// Structure a file could get wrong: features within `width`, children after their parent
    /// and inside the tree, finite values.
    pub fn validate(&self, width: usize) -> Result<()> {
        for (k, t) in self.trees.iter().enumerate() {
            if t.nodes.is_empty() {
                bail!("tree {k} has no nodes");
            }
            for (i, &Node(f, v, l, r)) in t.nodes.iter().enumerate() {
                if !v.is_finite() {
                    bail!("tree {k} node {i}: value is not finite");
                }
                if f < 0 {
                    continue;
                }
                let ok = |c: u32| (c as usize) > i && (c as usize) < t.nodes.len();
                if f as usize >= width || !ok(l) || !ok(r) {
                    bail!("tree {k} node {i}: feature {f} or children {l}/{r} out of range");
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct BoostParams {
    /// Most rounds; with validation rows, the forest is cut at the round of least
    /// validation log-loss.
    pub rounds: usize,
    pub depth: usize,
    pub learning_rate: f32,
    /// L2 on leaf values (in Hessian units).
    pub l2: f64,
    /// Least rows on each side of a split.
    pub min_leaf: usize,
    /// Histogram bins per feature (≤ 256).
    pub bins: usize,
}

impl Default for BoostParams {
    fn default() -> Self {
        BoostParams {
            rounds: 400,
            depth: 3,
            learning_rate: 0.05,
            l2: 1.0,
            min_leaf: 20,
            bins: 64,
        }
    }
}

/// Rows for `boost`: row-major `x` of `width`, soft labels `y` in [0, 1], and the logit the
/// trees add to (`base`, e.g. a linear head's).
pub struct Rows<'a> {
    pub x: &'a [f32],
    pub y: &'a [f32],
    pub base: &'a [f32],
}

impl Rows<'_> {
    fn check(&self, width: usize) -> Result<usize> {
        let n = self.y.len();
        if self.x.len() != n * width || self.base.len() != n {
            bail!(
                "boost: {} features and {} base logits for {n} rows of width {width}",
                self.x.len(),
                self.base.len()
            );
        }
        Ok(n)
    }
}

/// What `boost` returns besides the forest: validation log-loss after each round (empty
/// without validation rows).
pub struct BoostReport {
    pub valid_loss: Vec<f64>,
    pub rounds_kept: usize,
}

fn log_loss(z: &[f32], y: &[f32]) -> f64 {
    let n = y.len().max(1) as f64;
    z.iter()
        .zip(y)
        .map(|(&z, &y)| {
            let p = sigmoid(z as f64).clamp(1e-12, 1.0 - 1e-12);
            -(y as f64 * p.ln() + (1.0 - y as f64) * (1.0 - p).ln())
        })
        .sum::<f64>()
        / n
}

/// Quantile thresholds of one feature: at most `bins - 1` distinct values; a row's bin is the
/// number of thresholds below its value, so bin ≤ b ⇔ x ≤ thresholds[b].
fn thresholds(mut v: Vec<f32>, bins: usize) -> Vec<f32> {
    v.retain(|x| x.is_finite());
    v.sort_by(f32::total_cmp);
    let mut t: Vec<f32> = Vec::new();
    if v.is_empty() {
        return t;
    }
    for k in 1..bins {
        let q = v[(k * v.len() / bins).min(v.len() - 1)];
        if t.last().is_none_or(|&l| q > l) {
            t.push(q);
        }
    }
    // The top threshold at the maximum splits nothing off.
    if t.last() == v.last() {
        t.pop();
    }
    // Rare low values (under 1/bins of the rows, e.g. a flag that is almost always 1) would
    // otherwise share the one bin with the maximum: split them off.
    if t.is_empty() && v[0] < v[v.len() - 1] {
        t.push(v[0]);
    }
    t
}

#[derive(Clone, Copy, Default)]
struct Bin {
    g: f64,
    h: f64,
    n: u32,
}

/// Gradient boosting for log-loss on the columns `inputs` of `train.x`, adding to `train.base`.
pub fn boost(
    train: &Rows<'_>,
    valid: Option<&Rows<'_>>,
    width: usize,
    inputs: &[usize],
    p: &BoostParams,
) -> Result<(Forest, BoostReport)> {
    let n = train.check(width)?;
    if let Some(v) = valid {
        v.check(width)?;
    }
    if inputs.iter().any(|&j| j >= width) {
        bail!("boost: an input column is outside width {width}");
    }
    if n == 0 || !(2..=256).contains(&p.bins) || p.depth == 0 || p.depth > 8 {
        bail!("boost: no rows, or bins/depth out of range");
    }
    if valid.is_some_and(|v| v.y.is_empty()) {
        bail!("boost: validation rows given but empty");
    }
    let lr_ok = p.learning_rate.is_finite() && p.learning_rate > 0.0;
    if !lr_ok || !p.l2.is_finite() || p.l2 < 0.0 || p.min_leaf == 0 {
        bail!("boost: learning rate must be > 0, l2 ≥ 0, min_leaf ≥ 1");
    }
    let nf = inputs.len();
    let cuts: Vec<Vec<f32>> = inputs
        .iter()
        .map(|&j| thresholds((0..n).map(|i| train.x[i * width + j]).collect(), p.bins))
        .collect();
    let nb = p.bins;
    // Binned rows, row-major n × nf. NaN falls in the top bin and ±inf at the ends, as
    // `Tree::leaf_value` routes them (`x <= t` is false for NaN).
    let binned: Vec<u8> = (0..n)
        .flat_map(|i| {
            inputs.iter().zip(&cuts).map(move |(&j, c)| {
                let x = train.x[i * width + j];
                (if x.is_nan() {
                    c.len()
                } else {
                    c.partition_point(|&t| t < x)
                }) as u8
            })
        })
        .collect();
    let mut z: Vec<f32> = train.base.to_vec();
    let mut vz: Vec<f32> = valid.map(|v| v.base.to_vec()).unwrap_or_default();
    let mut forest = Forest::default();
    let mut report = BoostReport {
        valid_loss: vec![],
        rounds_kept: 0,
    };
    let (mut g, mut h) = (vec![0.0f64; n], vec![0.0f64; n]);
    let mut slot = vec![0i32; n];
    let mut hist: Vec<Bin> = Vec::new();
    for _ in 0..p.rounds {
        for i in 0..n {
            let q = sigmoid(z[i] as f64);
            g[i] = q - train.y[i] as f64;
            h[i] = (q * (1.0 - q)).max(1e-6);
        }
        // Depth-wise growth. `slot[i]`: the row's place in the frontier, -1 once in a leaf.
        let mut nodes = vec![Node(-1, 0.0, 0, 0)];
        let mut frontier: Vec<usize> = vec![0];
        let mut leaf_of = vec![0u32; n];
        slot.iter_mut().for_each(|s| *s = 0);
        for level in 0..=p.depth {
            let nslots = frontier.len();
            hist.clear();
            hist.resize(nslots * nf * nb, Bin::default());
            let mut tot = vec![Bin::default(); nslots];
            for i in 0..n {
                let s = slot[i];
                if s < 0 {
                    continue;
                }
                let s = s as usize;
                tot[s].g += g[i];
                tot[s].h += h[i];
                tot[s].n += 1;
                if level == p.depth {
                    continue;
                }
                let row = &binned[i * nf..(i + 1) * nf];
                let base = s * nf * nb;
                for (f, &b) in row.iter().enumerate() {
                    let e = &mut hist[base + f * nb + b as usize];
                    e.g += g[i];
                    e.h += h[i];
                    e.n += 1;
                }
            }
            // Per frontier node: the best split, or a leaf.
            let mut split_of: Vec<Option<(usize, usize)>> = vec![None; nslots];
            let mut next = Vec::new();
            for s in 0..nslots {
                let t = tot[s];
                let score = |g: f64, h: f64| g * g / (h + p.l2);
                let mut best: Option<(f64, usize, usize)> = None;
                if level < p.depth {
                    for f in 0..nf {
                        let bins = &hist[s * nf * nb + f * nb..s * nf * nb + (f + 1) * nb];
                        let mut left = Bin::default();
                        for (b, e) in bins.iter().enumerate().take(cuts[f].len()) {
                            left.g += e.g;
                            left.h += e.h;
                            left.n += e.n;
                            let rn = t.n - left.n;
                            if (left.n as usize) < p.min_leaf {
                                continue;
                            }
                            if (rn as usize) < p.min_leaf {
                                break;
                            }
                            let gain = score(left.g, left.h) + score(t.g - left.g, t.h - left.h)
                                - score(t.g, t.h);
                            if gain > 1e-9 && best.is_none_or(|bb| gain > bb.0) {
                                best = Some((gain, f, b));
                            }
                        }
                    }
                }
                let id = frontier[s];
                match best {
                    Some((_, f, b)) => {
                        let l = nodes.len();
                        nodes.push(Node(-1, 0.0, 0, 0));
                        nodes.push(Node(-1, 0.0, 0, 0));
                        nodes[id] = Node(inputs[f] as i32, cuts[f][b], l as u32, l as u32 + 1);
                        split_of[s] = Some((f, b));
                        next.push(l);
                        next.push(l + 1);
                    }
                    None => {
                        let v = -(t.g / (t.h + p.l2)) * p.learning_rate as f64;
                        nodes[id] = Node(-1, v as f32, 0, 0);
                    }
                }
            }
            // Move rows down; the children of slot s take slots in `next`'s order.
            let mut child_slot = vec![-1i32; nslots];
            let mut k = 0i32;
            for (s, sp) in split_of.iter().enumerate() {
                if sp.is_some() {
                    child_slot[s] = k;
                    k += 2;
                }
            }
            for i in 0..n {
                let s = slot[i];
                if s < 0 {
                    continue;
                }
                let s = s as usize;
                match split_of[s] {
                    Some((f, b)) => {
                        let right = binned[i * nf + f] as usize > b;
                        slot[i] = child_slot[s] + right as i32;
                    }
                    None => {
                        leaf_of[i] = frontier[s] as u32;
                        slot[i] = -1;
                    }
                }
            }
            frontier = next;
            if frontier.is_empty() {
                break;
            }
        }
        for i in 0..n {
            z[i] += nodes[leaf_of[i] as usize].1;
        }
        let tree = Tree { nodes };
        if let Some(v) = valid {
            for (i, vzi) in vz.iter_mut().enumerate() {
                *vzi += tree.leaf_value(&v.x[i * width..(i + 1) * width]);
            }
            report.valid_loss.push(log_loss(&vz, v.y));
        }
        forest.trees.push(tree);
    }
    report.rounds_kept = match valid {
        // Round 0 = the base alone: trees that never help are all dropped.
        Some(v) => {
            let mut best = (log_loss(v.base, v.y), 0);
            for (r, &l) in report.valid_loss.iter().enumerate() {
                if l < best.0 {
                    best = (l, r + 1);
                }
            }
            best.1
        }
        None => forest.trees.len(),
    };
    forest.trees.truncate(report.rounds_kept);
    Ok((forest, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(s: &mut u64) -> f32 {
        *s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*s >> 40) as f32) / (1u64 << 24) as f32
    }

    /// XOR of two coordinates, which no linear head can fit (AUROC 0.5 on it).
    fn xor_rows(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut s = seed;
        let (mut x, mut y) = (vec![], vec![]);
        for _ in 0..n {
            let (a, b, noise) = (lcg(&mut s), lcg(&mut s), lcg(&mut s));
            x.extend([a, b, noise]);
            y.push(((a > 0.5) != (b > 0.5)) as u8 as f32);
        }
        (x, y)
    }

    fn accuracy(f: &Forest, x: &[f32], y: &[f32]) -> f64 {
        let ok = y
            .iter()
            .enumerate()
            .filter(|&(i, &yi)| (f.margin(&x[i * 3..i * 3 + 3]) > 0.0) == (yi > 0.5))
            .count();
        ok as f64 / y.len() as f64
    }

    #[test]
    fn boosting_learns_an_interaction_and_stops_on_validation() -> Result<()> {
        let (x, y) = xor_rows(4000, 1);
        let (vx, vy) = xor_rows(1000, 2);
        let (b, vb) = (vec![0.0; y.len()], vec![0.0; vy.len()]);
        let p = BoostParams {
            rounds: 120,
            learning_rate: 0.3,
            ..Default::default()
        };
        let fit = || {
            boost(
                &Rows {
                    x: &x,
                    y: &y,
                    base: &b,
                },
                Some(&Rows {
                    x: &vx,
                    y: &vy,
                    base: &vb,
                }),
                3,
                &[0, 1, 2],
                &p,
            )
        };
        let (f, rep) = fit()?;
        assert!(accuracy(&f, &vx, &vy) > 0.95, "{}", accuracy(&f, &vx, &vy));
        assert_eq!(f.trees.len(), rep.rounds_kept);
        assert_eq!(rep.valid_loss.len(), 120);
        let best = rep.valid_loss.iter().cloned().fold(f64::INFINITY, f64::min);
        assert_eq!(rep.valid_loss[rep.rounds_kept - 1], best);
        f.validate(3)?;
        // Deterministic: the same fit twice is the same forest.
        let (g, _) = fit()?;
        assert_eq!(f, g);
        Ok(())
    }

    #[test]
    fn trees_add_to_the_base_logit_and_scale() -> Result<()> {
        // Labels already explained by the base logit leave the trees (almost) nothing to add.
        let (x, _) = xor_rows(2000, 3);
        let base: Vec<f32> = (0..2000)
            .map(|i| if i % 2 == 0 { 4.0 } else { -4.0 })
            .collect();
        let y: Vec<f32> = base.iter().map(|&b| (b > 0.0) as u8 as f32).collect();
        let (f, _) = boost(
            &Rows {
                x: &x,
                y: &y,
                base: &base,
            },
            None,
            3,
            &[0, 1],
            &BoostParams {
                rounds: 20,
                ..Default::default()
            },
        )?;
        let m = f.margin(&x[..3]);
        assert!(m.abs() < 0.2, "margin {m}");
        let mut s = f.clone();
        s.scale(2.0);
        assert!((s.margin(&x[..3]) - 2.0 * m).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn validate_rejects_what_a_file_could_get_wrong() {
        let bad = |nodes: Vec<Node>| Forest {
            trees: vec![Tree { nodes }],
        };
        let leaf = Node(-1, 0.1, 0, 0);
        assert!(bad(vec![Node(0, 0.5, 1, 2), leaf, leaf])
            .validate(3)
            .is_ok());
        assert!(bad(vec![Node(5, 0.5, 1, 2), leaf, leaf])
            .validate(3)
            .is_err());
        assert!(
            bad(vec![Node(0, 0.5, 0, 2), leaf, leaf])
                .validate(3)
                .is_err(),
            "a cycle"
        );
        assert!(bad(vec![Node(0, 0.5, 1, 9), leaf, leaf])
            .validate(3)
            .is_err());
        assert!(bad(vec![Node(-1, f32::NAN, 0, 0)]).validate(3).is_err());
        assert!(bad(vec![]).validate(3).is_err());
        // Unvalidated, a cycle still ends: margin is bounded work and no panic.
        assert_eq!(bad(vec![Node(0, 0.5, 0, 0)]).margin(&[0.0, 0.0, 0.0]), 0.0);
        assert_eq!(
            bad(vec![Node(7, 0.5, 1, 2), leaf, leaf]).margin(&[0.0]),
            0.1
        );
    }

    #[test]
    fn a_rare_low_value_gets_its_own_bin() {
        let mut v = vec![1.0f32; 1000];
        v[3] = 0.0;
        assert_eq!(thresholds(v, 64), vec![0.0]);
        assert!(
            thresholds(vec![2.0; 10], 64).is_empty(),
            "a constant splits nothing"
        );
        let t = thresholds((0..1000).map(|i| i as f32).collect(), 64);
        assert_eq!(t.len(), 63);
        assert!(t.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let p = BoostParams::default();
        let x = [0.0f32; 6];
        let r = Rows {
            x: &x,
            y: &[0.0, 1.0],
            base: &[0.0],
        };
        assert!(boost(&r, None, 3, &[0], &p).is_err());
        let r = Rows {
            x: &x,
            y: &[0.0, 1.0],
            base: &[0.0, 0.0],
        };
        assert!(boost(&r, None, 3, &[3], &p).is_err());
        assert!(boost(&r, None, 3, &[0], &p).is_ok());
        let empty = Rows {
            x: &[],
            y: &[],
            base: &[],
        };
        assert!(boost(&r, Some(&empty), 3, &[0], &p).is_err());
        let bad = BoostParams {
            learning_rate: f32::NAN,
            ..BoostParams::default()
        };
        assert!(boost(&r, None, 3, &[0], &bad).is_err());
    }
}
