//! Baseline router for the replay: cosine kNN over training prompt embeddings.
//! p(m passes | x) = mean of m's scores over the k training prompts nearest to x that have a row
//! of m (models are source-specific, so a plain top-k over all prompts would mostly hold
//! neighbours without m); m's training mean if it has no rows, the global mean if it is unknown.
#![forbid(unsafe_code)]
use std::collections::HashMap;

/// Training prompts (unit-normalised embeddings) and each prompt's scores per model.
pub struct KnnIndex {
    dim: usize,
    emb: Vec<f32>,
    scores: Vec<HashMap<String, f64>>,
    model_mean: HashMap<String, f64>,
    global_mean: f64,
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

impl KnnIndex {
    /// `emb` holds one embedding of `dim` per prompt; `rows` are (prompt index, model, score).
    pub fn build<'a>(
        dim: usize,
        mut emb: Vec<f32>,
        rows: impl IntoIterator<Item = (usize, &'a str, f64)>,
    ) -> KnnIndex {
        let n = emb.len() / dim.max(1);
        emb.chunks_exact_mut(dim.max(1)).for_each(normalise);
        let mut scores: Vec<HashMap<String, f64>> = vec![HashMap::new(); n];
        let mut sums: HashMap<String, (f64, usize)> = HashMap::new();
        let (mut total, mut count) = (0.0, 0usize);
        for (p, m, s) in rows {
            if p >= n {
                continue;
            }
            scores[p].insert(m.to_string(), s);
            let e = sums.entry(m.to_string()).or_default();
            e.0 += s;
            e.1 += 1;
            total += s;
            count += 1;
        }
        KnnIndex {
            dim,
            emb,
            scores,
            model_mean: sums
                .into_iter()
                .map(|(m, (s, c))| (m, s / c.max(1) as f64))
                .collect(),
            global_mean: if count == 0 {
                0.5
            } else {
                total / count as f64
            },
        }
    }

    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    /// p(pass) of each of `models` for a query embedding (any norm).
    pub fn predict(&self, query: &[f32], models: &[&str], k: usize) -> Vec<f64> {
        let mut q = query.to_vec();
        normalise(&mut q);
        let mut order: Vec<(f32, usize)> = self
            .emb
            .chunks_exact(self.dim.max(1))
            .enumerate()
            .map(|(i, e)| (crate::base::dot(e, &q), i))
            .collect();
        // Nearest first; index order breaks ties so results are deterministic.
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        models
            .iter()
            .map(|&m| {
                let near: Vec<f64> = order
                    .iter()
                    .filter_map(|&(_, i)| self.scores[i].get(m).copied())
                    .take(k)
                    .collect();
                if near.is_empty() {
                    self.model_mean.get(m).copied().unwrap_or(self.global_mean)
                } else {
                    near.iter().sum::<f64>() / near.len() as f64
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_neighbours_having_the_model_decide() {
        // Prompts along x pass model a, prompts along y fail it; b is only seen far away.
        let emb = vec![1.0, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9];
        let rows = [
            (0, "a", 1.0),
            (1, "a", 1.0),
            (2, "a", 0.0),
            (3, "a", 0.0),
            (3, "b", 0.25),
        ];
        let idx = KnnIndex::build(2, emb, rows);
        assert_eq!(idx.len(), 4);
        let p = idx.predict(&[2.0, 0.0], &["a", "b", "c"], 2);
        assert_eq!(p[0], 1.0);
        assert_eq!(p[1], 0.25, "the only prompt with b counts however far");
        assert_eq!(p[2], 0.45, "unknown model: global mean");
        assert_eq!(idx.predict(&[0.0, 1.0], &["a"], 2)[0], 0.0);
        assert_eq!(idx.predict(&[0.0, 1.0], &["a"], 4)[0], 0.5);
    }
}
