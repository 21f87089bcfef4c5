//! One device: context, stream, cuBLAS, the compiled kernels, and a launcher per kernel.
use anyhow::{anyhow, ensure, Result};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use half::f16;

use std::sync::Arc;

use super::kernels;
use super::probe::probe;
use super::weights;
use crate::model::heads::RouterHead;

/// Threads per block of the row kernels and of attention; must match the assumptions in
/// `kernels/*.cu` (a multiple of 32; hidden <= 8 * ROW_THREADS; one query per thread).
pub(crate) const ROW_THREADS: u32 = 128;
/// `MAX_PER_THREAD` in norm.cu.
pub(crate) const MAX_PER_THREAD: usize = 8;
/// `HEAD_DIM` in attention.cu.
pub(crate) const HEAD_DIM: usize = 32;
/// cuBLAS workspace (cuBLAS recommends 32 MiB on Hopper).
pub(crate) const BLAS_WORKSPACE: usize = 32 << 20;
/// Batches up to this many tokens (after rounding up to their bucket) replay a CUDA graph by
/// default: small batches are launch-bound (about 50 launches per forward), large ones are not.
pub const DEFAULT_GRAPH_MAX_TOKENS: usize = 8192;
/// Graphs kept; a bucket beyond them runs eagerly.
pub(crate) const MAX_GRAPHS: usize = 32;

/// Token bucket of a batch: the least of 2^k and 3·2^(k-1) (at least 512) that holds it, so
/// a replayed graph computes at most half again as many rows as the batch has.
pub fn token_bucket(t: usize) -> usize {
    let p = t.max(512).next_power_of_two();
    if p / 4 * 3 >= t.max(512) {
        p / 4 * 3
    } else {
        p
    }
}

pub(crate) fn seq_bucket(s: usize) -> usize {
    s.next_power_of_two().max(32)
}

pub(crate) fn drv<T>(what: &str, r: Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| anyhow!("{what}: {e:?}"))
}

/// A CUDA context and stream with our kernels loaded and a cuBLAS handle.
pub(crate) struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    pub(crate) embed_layernorm: CudaFunction,
    pub(crate) bias_residual_layernorm: CudaFunction,
    pub(crate) mean_pool_l2: CudaFunction,
    pub(crate) bias_gelu: CudaFunction,
    pub(crate) attention: CudaFunction,
    pub(crate) router_logits: CudaFunction,
    pub(crate) wordpiece: CudaFunction,
    pub(crate) _workspace: CudaSlice<u8>,
    pub(crate) name: String,
}

pub(crate) fn cfg1(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Gpu {
    /// Opens device 0 and compiles the kernels for it. Call [`probe`] first.
    pub(crate) fn open() -> Result<Gpu> {
        let info = probe().map_err(|e| anyhow!("no usable CUDA device: {e}"))?;
        let ctx = drv("creating the CUDA context", CudaContext::new(0))?;
        // One stream of our own (the legacy default stream cannot be captured into a CUDA
        // graph). All work is ordered on it, so cudarc's cross-stream event tracking would only
        // add event calls, which graph capture does not allow either: turn it off first.
        // SAFETY: every allocation and use below is on this one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = drv("creating a stream", ctx.new_stream())?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuBLAS init: {e:?}"))?;
        // A workspace of our own, so cuBLAS never allocates inside a graph capture.
        let workspace = drv(
            "allocating the cuBLAS workspace",
            stream.alloc_zeros::<u8>(BLAS_WORKSPACE),
        )?;
        {
            let (wp, _g) = workspace.device_ptr(&stream);
            // SAFETY: the workspace outlives the handle (both live in Gpu; `blas` is declared
            // first, so it is dropped first).
            let st = unsafe {
                blas_sys::cublasSetWorkspace_v2(*blas.handle(), wp as *mut _, BLAS_WORKSPACE)
            };
            ensure!(
                st == blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS,
                "cublasSetWorkspace: {st:?}"
            );
        }
        let (major, minor) = info.compute_capability;
        let arch = format!("compute_{major}{minor}");
        let mut funcs = std::collections::HashMap::new();
        for (file, src, names) in kernels::SOURCES {
            let ptx = kernels::compile(file, src, &arch).map_err(|e| anyhow!(e))?;
            let module = drv(&format!("loading {file} ({arch})"), ctx.load_module(ptx))?;
            for n in *names {
                funcs.insert(*n, drv(n, module.load_function(n))?);
            }
        }
        let mut take = |n: &str| {
            funcs
                .remove(n)
                .ok_or_else(|| anyhow!("kernel {n} is not in kernels::SOURCES"))
        };
        Ok(Gpu {
            embed_layernorm: take("embed_layernorm")?,
            bias_residual_layernorm: take("bias_residual_layernorm")?,
            mean_pool_l2: take("mean_pool_l2")?,
            bias_gelu: take("bias_gelu")?,
            attention: take("attention_varlen")?,
            router_logits: take("router_logits")?,
            wordpiece: take("wordpiece_ascii")?,
            _workspace: workspace,
            ctx,
            stream,
            blas,
            name: format!("{} (sm_{major}{minor})", info.name),
        })
    }

    pub(crate) fn upload<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        drv("copying to the GPU", self.stream.clone_htod(v))
    }

    pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        // At least one element: zero-sized allocations are an error in CUDA.
        drv("allocating GPU memory", self.stream.alloc_zeros(n.max(1)))
    }

    pub(crate) fn download<T: DeviceRepr>(&self, v: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let out = drv(
            "copying from the GPU",
            self.stream.clone_dtoh(&v.slice(..n)),
        )?;
        drv("synchronising the stream", self.stream.synchronize())?;
        Ok(out)
    }

    /// `y[t, n] = x[t, k] · w[n, k]ᵀ` (row-major; `w` in HF `[out, in]` layout): f16 inputs,
    /// f32 accumulation and output.
    pub(crate) fn gemm(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        y: &mut CudaSlice<f32>,
        t: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        ensure!(x.len() >= t * k && w.len() >= n * k && y.len() >= t * n);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (xp, _gx) = x.device_ptr(&self.stream);
        let (wp, _gw) = w.device_ptr(&self.stream);
        let (yp, _gy) = y.device_ptr_mut(&self.stream);
        // Column-major view: yᵀ[n, t] = op(w)[n, k] · xᵀ[k, t], with op = transpose since the
        // row-major [n, k] weight reads as a column-major [k, n] matrix.
        // SAFETY: sizes checked above; pointers live until the guards drop after the call.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                t as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                k as i32,
                xp as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                k as i32,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow!("cublasGemmEx ({t}x{k} · {k}x{n}): {e:?}"))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn embed_layernorm(
        &self,
        meta: &CudaSlice<u32>,
        t: usize,
        w: &DeviceWeights,
        x32: &mut CudaSlice<f32>,
        x16: &mut CudaSlice<f16>,
    ) -> Result<()> {
        let (ids, types, positions) = (
            meta.slice(..t),
            meta.slice(t..2 * t),
            meta.slice(2 * t..3 * t),
        );
        let (h, eps) = (w.h as i32, w.eps);
        let mut b = self.stream.launch_builder(&self.embed_layernorm);
        b.arg(&ids).arg(&types).arg(&positions);
        b.arg(&w.word).arg(&w.pos).arg(&w.token_type);
        b.arg(&w.emb_ln_g).arg(&w.emb_ln_b).arg(&h).arg(&eps);
        b.arg(x32).arg(x16);
        // SAFETY: ids/types/positions hold t entries each, validated against the tables'
        // sizes; x32/x16 hold at least t rows of h.
        drv("embed_layernorm", unsafe {
            b.launch(cfg1(t as u32, ROW_THREADS))
        })?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bias_residual_layernorm(
        &self,
        y: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        (t, h, eps): (usize, usize, f32),
        x32: &mut CudaSlice<f32>,
        x16: &mut CudaSlice<f16>,
    ) -> Result<()> {
        let hi = h as i32;
        let mut b = self.stream.launch_builder(&self.bias_residual_layernorm);
        b.arg(y).arg(bias).arg(gamma).arg(beta).arg(&hi).arg(&eps);
        b.arg(x32).arg(x16);
        // SAFETY: all row buffers hold at least t rows of h; parameters hold h.
        drv("bias_residual_layernorm", unsafe {
            b.launch(cfg1(t as u32, ROW_THREADS))
        })?;
        Ok(())
    }

    pub(crate) fn bias_gelu(
        &self,
        y: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        (rows, cols): (usize, usize),
        out: &mut CudaSlice<f16>,
    ) -> Result<()> {
        let total = (rows * cols) as u64;
        let cols32 = cols as u32;
        let blocks = total.div_ceil(256).clamp(1, 8192) as u32;
        let mut b = self.stream.launch_builder(&self.bias_gelu);
        b.arg(y).arg(bias).arg(&cols32).arg(&total).arg(out);
        // SAFETY: y and out hold rows*cols elements, bias holds cols.
        drv("bias_gelu", unsafe { b.launch(cfg1(blocks, 256)) })?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        qkv: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        meta: &CudaSlice<u32>,
        cu_at: usize,
        (seqs, max_len, heads): (usize, usize, usize),
        ctx: &mut CudaSlice<f16>,
    ) -> Result<()> {
        let cu = meta.slice(cu_at..cu_at + seqs + 1);
        let heads32 = heads as i32;
        let scale = 1.0f32 / (HEAD_DIM as f32).sqrt();
        let mut b = self.stream.launch_builder(&self.attention);
        b.arg(qkv)
            .arg(bias)
            .arg(&cu)
            .arg(&heads32)
            .arg(&scale)
            .arg(ctx);
        let cfg = LaunchConfig {
            grid_dim: (
                (seqs * heads) as u32,
                (max_len as u32).div_ceil(ROW_THREADS).max(1),
                1,
            ),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: cu_seqlens is validated (monotone, ending at the token count); qkv holds
        // those tokens' rows of 3*heads*HEAD_DIM, ctx rows of heads*HEAD_DIM.
        drv("attention_varlen", unsafe { b.launch(cfg) })?;
        Ok(())
    }

    pub(crate) fn mean_pool_l2(
        &self,
        x32: &CudaSlice<f32>,
        meta: &CudaSlice<u32>,
        cu_at: usize,
        (seqs, h): (usize, usize),
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let cu = meta.slice(cu_at..cu_at + seqs + 1);
        let hi = h as i32;
        let mut b = self.stream.launch_builder(&self.mean_pool_l2);
        b.arg(x32).arg(&cu).arg(&hi).arg(out);
        // SAFETY: cu_seqlens indexes rows of x32; out holds seqs rows of h.
        drv("mean_pool_l2", unsafe {
            b.launch(cfg1(seqs as u32, ROW_THREADS))
        })?;
        Ok(())
    }

    /// `out[s, m]` = the router logit of row `m` of `r` for embedding `s`.
    pub(crate) fn router_logits(
        &self,
        emb: &CudaSlice<f32>,
        seqs: usize,
        r: &DeviceRouter,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        ensure!(emb.len() >= seqs * r.dim && out.len() >= seqs * r.width());
        let (k, dim, rows) = (r.k as i32, r.dim as i32, r.width() as i32);
        let mut b = self.stream.launch_builder(&self.router_logits);
        b.arg(emb).arg(&r.proj).arg(&r.c).arg(&k).arg(&dim);
        b.arg(&r.abil).arg(&rows).arg(out);
        let cfg = LaunchConfig {
            grid_dim: (seqs as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 4 * (r.k as u32 + 1),
        };
        // SAFETY: sizes checked above and in DeviceRouter::upload (proj (k+1)×dim, abil
        // rows×(k+1)); shared memory holds the k+1 projections.
        drv("router_logits", unsafe { b.launch(cfg) })?;
        Ok(())
    }
}

pub(crate) struct DeviceLayer {
    pub(crate) w_qkv: CudaSlice<f16>,
    pub(crate) b_qkv: CudaSlice<f32>,
    pub(crate) w_attn_out: CudaSlice<f16>,
    pub(crate) b_attn_out: CudaSlice<f32>,
    pub(crate) ln1_g: CudaSlice<f32>,
    pub(crate) ln1_b: CudaSlice<f32>,
    pub(crate) w_inter: CudaSlice<f16>,
    pub(crate) b_inter: CudaSlice<f32>,
    pub(crate) w_out: CudaSlice<f16>,
    pub(crate) b_out: CudaSlice<f32>,
    pub(crate) ln2_g: CudaSlice<f32>,
    pub(crate) ln2_b: CudaSlice<f32>,
}

pub(crate) struct DeviceWeights {
    pub(crate) h: usize,
    pub(crate) heads: usize,
    pub(crate) inter: usize,
    pub(crate) eps: f32,
    pub(crate) word: CudaSlice<f16>,
    pub(crate) pos: CudaSlice<f16>,
    pub(crate) token_type: CudaSlice<f16>,
    pub(crate) emb_ln_g: CudaSlice<f32>,
    pub(crate) emb_ln_b: CudaSlice<f32>,
    pub(crate) layers: Vec<DeviceLayer>,
}

impl DeviceWeights {
    pub(crate) fn upload(gpu: &Gpu, w: &weights::HostWeights) -> Result<Self> {
        let c = &w.cfg;
        ensure!(
            c.num_attention_heads > 0 && c.hidden_size == c.num_attention_heads * HEAD_DIM,
            "the CUDA attention kernel needs head dim {HEAD_DIM}; this model has hidden {} / {} heads",
            c.hidden_size,
            c.num_attention_heads
        );
        ensure!(
            c.hidden_size <= MAX_PER_THREAD * ROW_THREADS as usize,
            "hidden size {} exceeds the row kernels' {}",
            c.hidden_size,
            MAX_PER_THREAD * ROW_THREADS as usize
        );
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(DeviceLayer {
                    w_qkv: gpu.upload(&l.w_qkv)?,
                    b_qkv: gpu.upload(&l.b_qkv)?,
                    w_attn_out: gpu.upload(&l.w_attn_out)?,
                    b_attn_out: gpu.upload(&l.b_attn_out)?,
                    ln1_g: gpu.upload(&l.ln1_g)?,
                    ln1_b: gpu.upload(&l.ln1_b)?,
                    w_inter: gpu.upload(&l.w_inter)?,
                    b_inter: gpu.upload(&l.b_inter)?,
                    w_out: gpu.upload(&l.w_out)?,
                    b_out: gpu.upload(&l.b_out)?,
                    ln2_g: gpu.upload(&l.ln2_g)?,
                    ln2_b: gpu.upload(&l.ln2_b)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceWeights {
            h: c.hidden_size,
            heads: c.num_attention_heads,
            inter: c.intermediate_size,
            eps: c.layer_norm_eps as f32,
            word: gpu.upload(&w.word)?,
            pos: gpu.upload(&w.pos)?,
            token_type: gpu.upload(&w.token_type)?,
            emb_ln_g: gpu.upload(&w.emb_ln_g)?,
            emb_ln_b: gpu.upload(&w.emb_ln_b)?,
            layers,
        })
    }
}

/// The router head on the GPU: `[easiness w; P]` and one `[u | b]` row per model, the
/// population prior last (for models without a head of their own).
pub struct DeviceRouter {
    pub(crate) k: usize,
    pub(crate) dim: usize,
    pub(crate) c: f32,
    pub(crate) proj: CudaSlice<f32>,
    pub(crate) abil: CudaSlice<f32>,
    pub(crate) models: Vec<String>,
}

/// The router head as `router_logits` reads it: `[w; P]` ((k + 1) × dim) and one `[u | b]`
/// row per model in name order, the prior last.
pub fn router_layout(r: &RouterHead, dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    ensure!(
        r.proj.len() == r.k * dim && r.easiness.w.len() == dim,
        "router head shapes do not match the encoder's {dim} dimensions"
    );
    let mut proj = r.easiness.w.clone();
    proj.extend_from_slice(&r.proj);
    let mut abil = Vec::with_capacity((r.models.len() + 1) * (r.k + 1));
    for (name, a) in r.models.iter().chain([(&String::new(), &r.prior)]) {
        ensure!(
            a.u.len() == r.k,
            "router ability of {name:?} has {} skills, not {}",
            a.u.len(),
            r.k
        );
        abil.extend_from_slice(&a.u);
        abil.push(a.b);
    }
    Ok((proj, abil))
}

impl DeviceRouter {
    pub(crate) fn upload(gpu: &Gpu, r: &RouterHead, dim: usize) -> Result<Self> {
        let (proj, abil) = router_layout(r, dim)?;
        Ok(DeviceRouter {
            k: r.k,
            dim,
            c: r.easiness.b,
            proj: gpu.upload(&proj)?,
            abil: gpu.upload(&abil)?,
            models: r.models.keys().cloned().collect(),
        })
    }

    /// Column of `model` in the logits (the prior's for a model without a head).
    pub fn column(&self, model: &str) -> usize {
        self.models
            .binary_search_by(|m| m.as_str().cmp(model))
            .unwrap_or(self.models.len())
    }

    /// Columns per embedding: every model, then the prior.
    pub fn width(&self) -> usize {
        self.models.len() + 1
    }
}
