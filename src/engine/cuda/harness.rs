//! Each kernel alone on host data, for the kernel checks on a GPU.
#![forbid(unsafe_code)]
use anyhow::{ensure, Result};
use half::f16;

use super::gpu::*;
use super::kernel_check;
use super::vocab::DeviceVocab;
use crate::model::heads::RouterHead;
use crate::model::wordpiece::WordPieceTable;
/// Runs each kernel alone on host data, for comparing it with its CPU reference
/// (tests/cuda_backend.rs). Needs a GPU.
pub struct KernelHarness {
    gpu: Gpu,
}

impl KernelHarness {
    pub fn new() -> Result<Self> {
        Ok(KernelHarness { gpu: Gpu::open()? })
    }

    fn f16s(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }
}

/// Each kernel alone on host data (tables and GEMM inputs rounded to f16 as the backend does).
impl kernel_check::KernelRunner for KernelHarness {
    /// `x[t, k] · w[n, k]ᵀ` with inputs rounded to f16.
    fn gemm(&self, x: &[f32], w: &[f32], t: usize, n: usize, k: usize) -> Result<Option<Vec<f32>>> {
        ensure!(x.len() == t * k && w.len() == n * k);
        let (xd, wd) = (
            self.gpu.upload(&Self::f16s(x))?,
            self.gpu.upload(&Self::f16s(w))?,
        );
        let mut y = self.gpu.zeros::<f32>(t * n)?;
        self.gpu.gemm(&xd, &wd, &mut y, t, n, k)?;
        self.gpu.download(&y, t * n).map(Some)
    }

    /// LN(word[ids] + pos[positions] + types[type_ids]), tables rounded to f16.
    fn embed_layernorm(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        positions: &[u32],
        (word, pos, types): (&[f32], &[f32], &[f32]),
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) -> Result<Vec<f32>> {
        let (t, h) = (ids.len(), gamma.len());
        ensure!(type_ids.len() == t && positions.len() == t && beta.len() == h);
        let mut meta = ids.to_vec();
        meta.extend_from_slice(type_ids);
        meta.extend_from_slice(positions);
        let w = DeviceWeights {
            h,
            heads: 0,
            inter: 0,
            eps,
            word: self.gpu.upload(&Self::f16s(word))?,
            pos: self.gpu.upload(&Self::f16s(pos))?,
            token_type: self.gpu.upload(&Self::f16s(types))?,
            emb_ln_g: self.gpu.upload(gamma)?,
            emb_ln_b: self.gpu.upload(beta)?,
            layers: Vec::new(),
        };
        let meta = self.gpu.upload(&meta)?;
        let mut x32 = self.gpu.zeros::<f32>(t * h)?;
        let mut x16 = self.gpu.zeros::<f16>(t * h)?;
        self.gpu.embed_layernorm(&meta, t, &w, &mut x32, &mut x16)?;
        self.gpu.download(&x32, t * h)
    }

    /// LN(x + y + bias) per row of `gamma.len()` columns.
    fn bias_residual_layernorm(
        &self,
        x: &[f32],
        y: &[f32],
        bias: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) -> Result<Vec<f32>> {
        let h = gamma.len();
        ensure!(h > 0 && x.len() == y.len() && x.len().is_multiple_of(h));
        let t = x.len() / h;
        let mut x32 = self.gpu.upload(x)?;
        let mut x16 = self.gpu.zeros::<f16>(t * h)?;
        let (yd, bd, gd, btd) = (
            self.gpu.upload(y)?,
            self.gpu.upload(bias)?,
            self.gpu.upload(gamma)?,
            self.gpu.upload(beta)?,
        );
        self.gpu
            .bias_residual_layernorm(&yd, &bd, &gd, &btd, (t, h, eps), &mut x32, &mut x16)?;
        self.gpu.download(&x32, t * h)
    }

    /// GELU(y + bias) per row of `bias.len()` columns (returned from f16).
    fn bias_gelu(&self, y: &[f32], bias: &[f32]) -> Result<Vec<f32>> {
        let cols = bias.len();
        ensure!(cols > 0 && y.len().is_multiple_of(cols));
        let (yd, bd) = (self.gpu.upload(y)?, self.gpu.upload(bias)?);
        let mut out = self.gpu.zeros::<f16>(y.len())?;
        self.gpu
            .bias_gelu(&yd, &bd, (y.len() / cols, cols), &mut out)?;
        Ok(self
            .gpu
            .download(&out, y.len())?
            .iter()
            .map(|v| v.to_f32())
            .collect())
    }

    /// softmax(scale·(Q+bq)(K+bk)ᵀ)(V+bv) within each sequence; `qkv` is `[tokens, 3*h]`.
    /// Returns `[tokens, h]` (from f16).
    fn attention(
        &self,
        qkv: &[f32],
        bias: &[f32],
        cu_seqlens: &[u32],
        heads: usize,
    ) -> Result<Vec<f32>> {
        let h = heads * HEAD_DIM;
        ensure!(qkv.len().is_multiple_of(3 * h) && bias.len() == 3 * h && !cu_seqlens.is_empty());
        let t = qkv.len() / (3 * h);
        let seqs = cu_seqlens.len() - 1;
        let max_len = cu_seqlens
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]) as usize)
            .max()
            .unwrap_or(0);
        let (qd, bd, cu) = (
            self.gpu.upload(qkv)?,
            self.gpu.upload(bias)?,
            self.gpu.upload(cu_seqlens)?,
        );
        let mut ctx = self.gpu.zeros::<f16>(t * h)?;
        self.gpu
            .attention(&qd, &bd, &cu, 0, (seqs, max_len, heads), &mut ctx)?;
        Ok(self
            .gpu
            .download(&ctx, t * h)?
            .iter()
            .map(|v| v.to_f32())
            .collect())
    }

    /// Router logits of each embedding (rows of `r.easiness.w.len()`): every model in name
    /// order, then the prior.
    fn router_logits(&self, emb: &[f32], r: &RouterHead) -> Result<Vec<f32>> {
        let dim = r.easiness.w.len();
        ensure!(dim > 0 && emb.len().is_multiple_of(dim));
        let dr = DeviceRouter::upload(&self.gpu, r, dim)?;
        let seqs = emb.len() / dim;
        let ed = self.gpu.upload(emb)?;
        let mut out = self.gpu.zeros::<f32>(seqs * dr.width())?;
        self.gpu.router_logits(&ed, seqs, &dr, &mut out)?;
        self.gpu.download(&out, seqs * dr.width())
    }

    /// WordPiece ids of `texts` on the GPU (`None` where the GPU path declines the text).
    fn wordpiece(&self, table: &WordPieceTable, texts: &[&str]) -> Result<Vec<Option<Vec<u32>>>> {
        DeviceVocab::upload(&self.gpu, table)?.tokenize(&self.gpu, texts)
    }

    /// Mean of each sequence's rows of `x` (`h` columns), L2-normalised.
    fn mean_pool_l2(&self, x: &[f32], cu_seqlens: &[u32], h: usize) -> Result<Vec<f32>> {
        ensure!(h > 0 && x.len().is_multiple_of(h) && !cu_seqlens.is_empty());
        let seqs = cu_seqlens.len() - 1;
        let (xd, cu) = (self.gpu.upload(x)?, self.gpu.upload(cu_seqlens)?);
        let mut out = self.gpu.zeros::<f32>(seqs * h)?;
        self.gpu.mean_pool_l2(&xd, &cu, 0, (seqs, h), &mut out)?;
        self.gpu.download(&out, seqs * h)
    }
}
