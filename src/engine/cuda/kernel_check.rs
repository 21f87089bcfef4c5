//! Each of our kernels (and the cuBLAS GEMM as we call it) against its CPU reference in
//! `model::encoder` / `model::heads` / `model::wordpiece`, on deterministic data shaped like
//! MiniLM's, through a [`KernelRunner`]: the GPU harness (`tiergate gpu-check`,
//! tests/cuda_backend.rs) or the kernels' source run on the CPU (tests/kernels_on_cpu.rs).
#![forbid(unsafe_code)]
use anyhow::{ensure, Result};

use crate::model::encoder;
use crate::model::heads::{Heads, RouterHead};
use crate::model::wordpiece::WordPieceTable;

/// One kernel's largest error against its reference, and what it may be.
#[derive(Debug, Clone)]
pub struct KernelCheck {
    pub kernel: &'static str,
    pub max_err: f32,
    pub tolerance: f32,
    /// "abs" or "rel" (relative to max(|reference|, 1)).
    pub kind: &'static str,
}

impl KernelCheck {
    fn abs(kernel: &'static str, got: &[f32], want: &[f32], tolerance: f32) -> Self {
        Self::measure(kernel, got, want, tolerance, "abs", |_| 1.0)
    }

    fn rel(kernel: &'static str, got: &[f32], want: &[f32], tolerance: f32) -> Self {
        Self::measure(kernel, got, want, tolerance, "rel", |w| w.abs().max(1.0))
    }

    fn measure(
        kernel: &'static str,
        got: &[f32],
        want: &[f32],
        tolerance: f32,
        kind: &'static str,
        scale: impl Fn(f32) -> f32,
    ) -> Self {
        // A length mismatch or a NaN is an infinite error, never a pass.
        let max_err = if got.len() != want.len() {
            f32::INFINITY
        } else {
            got.iter().zip(want).fold(0.0f32, |m, (&g, &w)| {
                let e = (g - w).abs() / scale(w);
                if e.is_nan() {
                    f32::INFINITY
                } else {
                    m.max(e)
                }
            })
        };
        KernelCheck {
            kernel,
            max_err,
            tolerance,
            kind,
        }
    }

    pub fn passed(&self) -> bool {
        self.max_err <= self.tolerance
    }
}

/// Deterministic values in [-scale, scale].
fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.618_034 + seed as f32 * 0.37).sin() * 43_758.547).fract() * scale)
        .collect()
}

fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// Deterministic ASCII texts that exercise every byte class: mixed case, digits, punctuation,
/// whitespace, control bytes inside words, words over 100 characters.
pub fn wordpiece_texts(n: usize) -> Vec<String> {
    const PIECES: &[&str] = &[
        "The",
        "quick",
        "BROWN",
        "fox",
        "unaffable",
        "tokenization",
        "x",
        "3.14159",
        "isn't",
        "e-mail",
        "#include",
        "<stdio.h>",
        "(a+b)*c",
        "C++",
        "naïve",
        "\u{1}",
        "\u{7f}",
        "\t",
        "\n",
        "  ",
        "!!",
        "qqqzzkk",
        "Mississippi",
        "GPU",
        "don't",
        "[SEP]",
        "url:http://a.b/c",
        // The vocabulary's longest piece (18 bytes), alone and inside a longer word.
        "telecommunications",
        "Telecommunicationsxyz",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|i| {
            let mut s = String::new();
            let words = 1 + (next() % 60) as usize;
            for _ in 0..words {
                let r = next();
                if r % 97 == 0 {
                    s.push_str(&"ab".repeat(40 + (r % 30) as usize)); // 80..138 chars
                } else {
                    s.push_str(PIECES[(r % PIECES.len() as u64) as usize]);
                }
                if r % 3 != 0 {
                    s.push(' ');
                }
            }
            if i % 5 == 0 {
                s = s.to_uppercase();
            }
            s
        })
        .collect()
}

/// Runs our kernels on host data: [`super::KernelHarness`] on a GPU, or anything else that runs
/// the same kernel source (tests/cuda_backend.rs runs it on the CPU).
#[allow(clippy::too_many_arguments)]
pub trait KernelRunner {
    /// `x[t, k] · w[n, k]ᵀ`; `None` where the runner has no cuBLAS.
    fn gemm(&self, x: &[f32], w: &[f32], t: usize, n: usize, k: usize) -> Result<Option<Vec<f32>>>;
    fn embed_layernorm(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        positions: &[u32],
        tables: (&[f32], &[f32], &[f32]),
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) -> Result<Vec<f32>>;
    fn bias_residual_layernorm(
        &self,
        x: &[f32],
        y: &[f32],
        bias: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) -> Result<Vec<f32>>;
    fn bias_gelu(&self, y: &[f32], bias: &[f32]) -> Result<Vec<f32>>;
    fn attention(&self, qkv: &[f32], bias: &[f32], cu: &[u32], heads: usize) -> Result<Vec<f32>>;
    fn router_logits(&self, emb: &[f32], r: &RouterHead) -> Result<Vec<f32>>;
    fn mean_pool_l2(&self, x: &[f32], cu: &[u32], h: usize) -> Result<Vec<f32>>;
    fn wordpiece(&self, t: &WordPieceTable, texts: &[&str]) -> Result<Vec<Option<Vec<u32>>>>;
}

/// Runs every kernel once on the GPU and on the CPU; `heads` supplies the router head and
/// `wordpiece` (when given) the vocabulary.
pub fn kernel_checks(
    k: &dyn KernelRunner,
    heads: &Heads,
    wordpiece: Option<&WordPieceTable>,
) -> Result<Vec<KernelCheck>> {
    let mut out = Vec::new();
    let (h, eps) = (384usize, 1e-12f32);
    // The router check reads `h`-wide embeddings through the heads' projection.
    ensure!(
        heads.dim == h,
        "the kernel checks run at width {h}; these heads have dim {}",
        heads.dim
    );
    let gamma: Vec<f32> = values(h, 1, 0.5).iter().map(|v| 1.0 + v).collect();
    let beta = values(h, 2, 0.1);

    // GEMM (cuBLAS, f16 in, f32 out) against encoder::matmul on the same f16-rounded inputs.
    let (t, n) = (37usize, 96usize);
    let x = f16_round(&values(t * h, 3, 1.0));
    let w = f16_round(&values(n * h, 4, 0.1)); // [n, h]
    let mut wt = vec![0.0; h * n]; // [h, n] for the CPU reference
    for o in 0..n {
        for i in 0..h {
            wt[i * n + o] = w[o * h + i];
        }
    }
    let mut want = vec![0.0; t * n];
    encoder::matmul(&mut want, &x, &wt, t, h, n, false);
    if let Some(got) = k.gemm(&x, &w, t, n, h)? {
        out.push(KernelCheck::abs("gemm (cuBLAS)", &got, &want, 1e-3));
    }

    // Embedding gather + LayerNorm.
    let (vocab, positions) = (50usize, 20usize);
    let word = f16_round(&values(vocab * h, 5, 1.0));
    let pos = f16_round(&values(positions * h, 6, 1.0));
    let types = f16_round(&values(2 * h, 7, 1.0));
    let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7) % vocab as u32).collect();
    let tys: Vec<u32> = (0..t as u32).map(|i| i % 2).collect();
    let ps: Vec<u32> = (0..t as u32).map(|i| i % positions as u32).collect();
    let got = k.embed_layernorm(&ids, &tys, &ps, (&word, &pos, &types), &gamma, &beta, eps)?;
    let mut want = Vec::with_capacity(t * h);
    for i in 0..t {
        let (id, ty, p) = (ids[i] as usize, tys[i] as usize, ps[i] as usize);
        let mut row: Vec<f32> = (0..h)
            .map(|c| word[id * h + c] + pos[p * h + c] + types[ty * h + c])
            .collect();
        encoder::layer_norm(&mut row, &gamma, &beta, eps);
        want.extend(row);
    }
    out.push(KernelCheck::abs("embed_layernorm", &got, &want, 1e-4));

    // bias + residual + LayerNorm.
    let xr = values(t * h, 8, 2.0);
    let y = values(t * h, 9, 2.0);
    let bias = values(h, 10, 0.5);
    let got = k.bias_residual_layernorm(&xr, &y, &bias, &gamma, &beta, eps)?;
    let mut want = Vec::with_capacity(t * h);
    for (xrow, yrow) in xr.chunks_exact(h).zip(y.chunks_exact(h)) {
        let mut row: Vec<f32> = (0..h).map(|c| xrow[c] + yrow[c] + bias[c]).collect();
        encoder::layer_norm(&mut row, &gamma, &beta, eps);
        want.extend(row);
    }
    out.push(KernelCheck::abs(
        "bias_residual_layernorm",
        &got,
        &want,
        1e-4,
    ));

    // bias + GELU (output is f16: compare within f16 rounding).
    let inter = 1536usize;
    let y = values(5 * inter, 11, 6.0);
    let bias = values(inter, 12, 1.0);
    let got = k.bias_gelu(&y, &bias)?;
    let want: Vec<f32> = y
        .iter()
        .enumerate()
        .map(|(i, &v)| encoder::gelu(v + bias[i % inter]))
        .collect();
    out.push(KernelCheck::rel("bias_gelu", &got, &want, 2e-3));

    // Attention over a packed batch with lengths across tile boundaries (1, 63, 64, 65, 300).
    let n_heads = 12usize;
    let d = 32usize;
    let lens = [1usize, 63, 64, 65, 300];
    let mut cu = vec![0u32];
    for l in lens {
        cu.push(cu[cu.len() - 1] + l as u32);
    }
    let tt = cu[cu.len() - 1] as usize;
    let qkv = values(tt * 3 * h, 13, 1.5);
    let bias = values(3 * h, 14, 0.3);
    let got = k.attention(&qkv, &bias, &cu, n_heads)?;
    let scale = 1.0 / (d as f32).sqrt();
    let at = |tok: usize, part: usize, head: usize, j: usize| {
        qkv[tok * 3 * h + part * h + head * d + j] + bias[part * h + head * d + j]
    };
    let mut want = vec![0.0f32; tt * h];
    for s in 0..lens.len() {
        let (a, b) = (cu[s] as usize, cu[s + 1] as usize);
        for head in 0..n_heads {
            for qi in a..b {
                let mut scores: Vec<f32> = (a..b)
                    .map(|ki| {
                        (0..d)
                            .map(|j| at(qi, 0, head, j) * at(ki, 1, head, j))
                            .sum::<f32>()
                            * scale
                    })
                    .collect();
                encoder::softmax_inplace(&mut scores);
                for j in 0..d {
                    want[qi * h + head * d + j] = (a..b)
                        .zip(&scores)
                        .map(|(ki, p)| p * at(ki, 2, head, j))
                        .sum();
                }
            }
        }
    }
    out.push(KernelCheck::rel("attention_varlen", &got, &want, 2e-3));

    // The router head (the real one when given) against RouterHead on the same unit vectors.
    let mut emb = values(6 * h, 16, 1.0);
    for e in emb.chunks_exact_mut(h) {
        let n = e.iter().map(|v| v * v).sum::<f32>().sqrt();
        e.iter_mut().for_each(|v| *v /= n);
    }
    let got = k.router_logits(&emb, &heads.router)?;
    let mut want = Vec::with_capacity(got.len());
    for e in emb.chunks_exact(h) {
        let models = heads.router.models.keys().map(String::as_str);
        // Every model in name order, then the prior (a model without a head).
        for m in models.chain(["\u{0}no such model"]) {
            want.push(heads.route_logit(m, e));
        }
    }
    ensure!(
        got.len() == want.len(),
        "router_logits returned {} values, not {}",
        got.len(),
        want.len()
    );
    out.push(KernelCheck::rel("router_logits", &got, &want, 1e-4));

    // Mean pooling + L2 norm (an empty sequence gives zeros, like the CPU).
    let cu = [0u32, 5, 5, 42];
    let x = values(42 * h, 15, 1.0);
    let got = k.mean_pool_l2(&x, &cu, h)?;
    let mut want = vec![0.0f32; 3 * h];
    for s in 0..3 {
        let (a, b) = (cu[s] as usize, cu[s + 1] as usize);
        encoder::mean_pool_normalize(&x[a * h..b * h], &mut want[s * h..(s + 1) * h]);
    }
    out.push(KernelCheck::abs("mean_pool_l2", &got, &want, 1e-5));

    // WordPiece: the same ids as the CPU reference, text by text (declined texts included).
    if let Some(table) = wordpiece {
        let texts = wordpiece_texts(2000);
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let got = k.wordpiece(table, &refs)?;
        let differ = got
            .iter()
            .zip(&refs)
            .filter(|(g, t)| **g != table.encode_ascii(t))
            .count();
        out.push(KernelCheck {
            kernel: "wordpiece_ascii",
            max_err: differ as f32,
            tolerance: 0.0,
            kind: "texts differing",
        });
    }
    Ok(out)
}
