//! CUDA backend: the MiniLM forward pass on one NVIDIA GPU over packed variable-length batches
//! (no padding), numerically mirroring the CPU encoder (`model::encoder`).
//!
//! GEMMs run on cuBLAS (`cublasGemmEx`: f16 inputs, f32 accumulation and f32 output); our own
//! kernels (`kernels/*.cu`, compiled by NVRTC at start) do the embedding gather + LayerNorm, the
//! bias + GELU and bias + residual + LayerNorm epilogues, attention within each sequence, and
//! mean pooling + L2 norm. The residual stream stays f32 with an f16 copy for the next GEMM, so
//! only GEMM inputs are rounded to f16.
//!
//! cudarc loads the CUDA libraries lazily and panics when one is missing, so [`probe`] checks
//! for them (and for a device) before anything else touches CUDA.
pub mod check;
pub mod kernel_check;
pub mod kernels;
mod weights;

use std::panic::catch_unwind;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, ensure, Context, Result};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use half::f16;

use super::{Backend, PackedBatch};
use crate::error::TgError;
use crate::model::encoder::MiniLm;
use crate::model::heads::RouterHead;
use crate::model::wordpiece::WordPieceTable;
pub use weights::write_random_model;

/// What [`probe`] found.
#[derive(Debug, Clone)]
pub struct ProbeInfo {
    pub devices: usize,
    /// Device 0, the one the backend uses.
    pub name: String,
    pub compute_capability: (i32, i32),
    /// The driver's CUDA version and NVRTC's, e.g. (13, 0): PTX from an NVRTC newer than the
    /// driver does not load.
    pub driver_version: (i32, i32),
    pub nvrtc_version: (i32, i32),
}

/// Whether libnvrtc can be loaded (cudarc's own search: its usual names on the loader path).
pub fn nvrtc_available() -> bool {
    // SAFETY: only dlopen()s candidate library names and closes them again.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Checks, without risking cudarc's panics, that the driver, NVRTC and cuBLAS libraries load
/// and that there is at least one CUDA device.
pub fn probe() -> Result<ProbeInfo, String> {
    // SAFETY (all three): dlopen()/dlclose() of candidate names; nothing is called.
    let libs = [
        ("libcuda (the NVIDIA driver)", unsafe {
            cudarc::driver::sys::is_culib_present()
        }),
        ("libnvrtc", nvrtc_available()),
        ("libcublas", unsafe {
            cudarc::cublas::sys::is_culib_present()
        }),
    ];
    let missing: Vec<&str> = libs.iter().filter(|l| !l.1).map(|l| l.0).collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} not found on the library path (ldconfig, LD_LIBRARY_PATH)",
            missing.join(", ")
        ));
    }
    // A library with missing symbols still panics inside cudarc: contain it.
    catch_unwind(|| -> Result<ProbeInfo, String> {
        use cudarc::driver::result::{device, init};
        use cudarc::driver::sys::CUdevice_attribute as A;
        init().map_err(|e| format!("cuInit failed: {e:?}"))?;
        let n = device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
        if n <= 0 {
            return Err("the CUDA driver reports no device".into());
        }
        let dev = device::get(0).map_err(|e| format!("cuDeviceGet(0) failed: {e:?}"))?;
        let name = device::get_name(dev).map_err(|e| format!("cuDeviceGetName: {e:?}"))?;
        // SAFETY: `dev` came from cuDeviceGet.
        let cc = unsafe {
            (
                device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            )
        };
        match cc {
            (Ok(major), Ok(minor)) => {
                let (mut dv, mut nv) = (0, (0, 0));
                // SAFETY: out-pointers to locals; both calls exist in every supported version.
                unsafe {
                    let _ = cudarc::driver::sys::cuDriverGetVersion(&mut dv);
                    let _ = cudarc::nvrtc::sys::nvrtcVersion(&mut nv.0, &mut nv.1);
                }
                Ok(ProbeInfo {
                    devices: n as usize,
                    name,
                    compute_capability: (major, minor),
                    driver_version: (dv / 1000, dv % 1000 / 10),
                    nvrtc_version: nv,
                })
            }
            _ => Err("cannot read the device's compute capability".into()),
        }
    })
    .unwrap_or_else(|_| Err("the CUDA libraries failed to load (see the panic above)".into()))
}

/// Threads per block of the row kernels and of attention; must match the assumptions in
/// `kernels/*.cu` (a multiple of 32; hidden <= 8 * ROW_THREADS; one query per thread).
const ROW_THREADS: u32 = 128;
/// `MAX_PER_THREAD` in norm.cu.
const MAX_PER_THREAD: usize = 8;
/// `HEAD_DIM` in attention.cu.
const HEAD_DIM: usize = 32;
/// cuBLAS workspace (cuBLAS recommends 32 MiB on Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;
/// Batches up to this many tokens (after rounding up to their bucket) replay a CUDA graph by
/// default: small batches are launch-bound (about 50 launches per forward), large ones are not.
pub const DEFAULT_GRAPH_MAX_TOKENS: usize = 8192;
/// Graphs kept; a bucket beyond them runs eagerly.
const MAX_GRAPHS: usize = 32;

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

fn seq_bucket(s: usize) -> usize {
    s.next_power_of_two().max(32)
}

fn drv<T>(what: &str, r: Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| anyhow!("{what}: {e:?}"))
}

/// A CUDA context and stream with our kernels loaded and a cuBLAS handle.
struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    embed_layernorm: CudaFunction,
    bias_residual_layernorm: CudaFunction,
    mean_pool_l2: CudaFunction,
    bias_gelu: CudaFunction,
    attention: CudaFunction,
    router_logits: CudaFunction,
    wordpiece: CudaFunction,
    _workspace: CudaSlice<u8>,
    name: String,
}

fn cfg1(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Gpu {
    /// Opens device 0 and compiles the kernels for it. Call [`probe`] first.
    fn open() -> Result<Gpu> {
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

    fn upload<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        drv("copying to the GPU", self.stream.clone_htod(v))
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        // At least one element: zero-sized allocations are an error in CUDA.
        drv("allocating GPU memory", self.stream.alloc_zeros(n.max(1)))
    }

    fn download<T: DeviceRepr>(&self, v: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let out = drv(
            "copying from the GPU",
            self.stream.clone_dtoh(&v.slice(..n)),
        )?;
        drv("synchronising the stream", self.stream.synchronize())?;
        Ok(out)
    }

    /// `y[t, n] = x[t, k] · w[n, k]ᵀ` (row-major; `w` in HF `[out, in]` layout): f16 inputs,
    /// f32 accumulation and output.
    fn gemm(
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
    fn embed_layernorm(
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
    fn bias_residual_layernorm(
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

    fn bias_gelu(
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
    fn attention(
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

    fn mean_pool_l2(
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
    fn router_logits(
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

/// The WordPiece vocabulary on the GPU (`model::wordpiece` layout) and buffers for the text.
pub struct DeviceVocab {
    table: WordPieceTable,
    slots: CudaSlice<u32>,
    entries: CudaSlice<u32>,
    bytes: CudaSlice<u8>,
    text: Option<(CudaSlice<u8>, CudaSlice<u32>, CudaSlice<u8>)>,
}

impl DeviceVocab {
    fn upload(gpu: &Gpu, table: &WordPieceTable) -> Result<Self> {
        ensure!(
            table.slots.len().is_power_of_two() && table.slots.len() <= u32::MAX as usize,
            "vocabulary table size {} is not a power of two",
            table.slots.len()
        );
        let flat: Vec<u32> = table.entries.iter().flatten().copied().collect();
        Ok(DeviceVocab {
            slots: gpu.upload(&table.slots)?,
            entries: gpu.upload(&flat)?,
            bytes: gpu.upload(&table.bytes)?,
            table: table.clone(),
            text: None,
        })
    }

    /// Token ids of each text without special tokens; `None` for a text the GPU path
    /// declines (non-ASCII, added-token literals: see `WordPieceTable::accepts`).
    fn tokenize(&mut self, gpu: &Gpu, texts: &[&str]) -> Result<Vec<Option<Vec<u32>>>> {
        let (buf, spans) = self.table.pack(texts);
        let n = buf.len();
        if n == 0 {
            return Ok(WordPieceTable::stitch(&spans, &[], &[]));
        }
        if self.text.as_ref().is_none_or(|t| t.0.len() < n) {
            let cap = n.next_power_of_two().max(1 << 16);
            self.text = None;
            self.text = Some((gpu.zeros(cap)?, gpu.zeros(cap)?, gpu.zeros(cap)?));
        }
        let (text, ids, counts) = self.text.as_mut().context("tokenizer buffers missing")?;
        drv(
            "copying text to the GPU",
            gpu.stream.memcpy_htod(&buf, &mut text.slice_mut(..n)),
        )?;
        let (n64, mask, unk, max_chars, max_piece) = (
            n as u64,
            (self.table.slots.len() - 1) as u32,
            self.table.unk,
            self.table.max_chars as i32,
            self.table.max_piece.min(i32::MAX as u32) as i32,
        );
        let mut b = gpu.stream.launch_builder(&gpu.wordpiece);
        b.arg(&*text).arg(&n64).arg(&self.slots).arg(&mask);
        b.arg(&self.entries)
            .arg(&self.bytes)
            .arg(&unk)
            .arg(&max_chars)
            .arg(&max_piece);
        b.arg(&mut *ids).arg(&mut *counts);
        // SAFETY: text/ids/counts hold at least n elements; the table arrays are the ones
        // `WordPieceTable` built (slots a power of two, at most half full, so probing ends;
        // entries index into bytes).
        drv("wordpiece_ascii", unsafe {
            b.launch(cfg1(n.div_ceil(256) as u32, 256))
        })?;
        let ids = gpu.download(ids, n)?;
        let counts = gpu.download(counts, n)?;
        Ok(WordPieceTable::stitch(&spans, &ids, &counts))
    }
}

/// The router head on the GPU: `[easiness w; P]` and one `[u | b]` row per model, the
/// population prior last (for models without a head of their own).
pub struct DeviceRouter {
    k: usize,
    dim: usize,
    c: f32,
    proj: CudaSlice<f32>,
    abil: CudaSlice<f32>,
    models: Vec<String>,
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
    fn upload(gpu: &Gpu, r: &RouterHead, dim: usize) -> Result<Self> {
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

struct DeviceLayer {
    w_qkv: CudaSlice<f16>,
    b_qkv: CudaSlice<f32>,
    w_attn_out: CudaSlice<f16>,
    b_attn_out: CudaSlice<f32>,
    ln1_g: CudaSlice<f32>,
    ln1_b: CudaSlice<f32>,
    w_inter: CudaSlice<f16>,
    b_inter: CudaSlice<f32>,
    w_out: CudaSlice<f16>,
    b_out: CudaSlice<f32>,
    ln2_g: CudaSlice<f32>,
    ln2_b: CudaSlice<f32>,
}

struct DeviceWeights {
    h: usize,
    heads: usize,
    inter: usize,
    eps: f32,
    word: CudaSlice<f16>,
    pos: CudaSlice<f16>,
    token_type: CudaSlice<f16>,
    emb_ln_g: CudaSlice<f32>,
    emb_ln_b: CudaSlice<f32>,
    layers: Vec<DeviceLayer>,
}

impl DeviceWeights {
    fn upload(gpu: &Gpu, w: &weights::HostWeights) -> Result<Self> {
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

/// Activations for up to `tokens` tokens and `seqs` sequences; grown on demand.
struct Scratch {
    tokens: usize,
    seqs: usize,
    /// ids | type ids | positions (each `tokens`) | cu_seqlens (`seqs + 1`): one upload.
    meta: CudaSlice<u32>,
    x32: CudaSlice<f32>,
    x16: CudaSlice<f16>,
    qkv: CudaSlice<f32>,
    ctx16: CudaSlice<f16>,
    y32: CudaSlice<f32>,
    mid32: CudaSlice<f32>,
    mid16: CudaSlice<f16>,
    out: CudaSlice<f32>,
}

impl Scratch {
    fn new(gpu: &Gpu, w: &DeviceWeights, tokens: usize, seqs: usize) -> Result<Self> {
        let (h, i) = (w.h, w.inter);
        Ok(Scratch {
            tokens,
            seqs,
            meta: gpu.zeros(3 * tokens + seqs + 1)?,
            x32: gpu.zeros(tokens * h)?,
            x16: gpu.zeros(tokens * h)?,
            qkv: gpu.zeros(tokens * 3 * h)?,
            ctx16: gpu.zeros(tokens * h)?,
            y32: gpu.zeros(tokens * h)?,
            mid32: gpu.zeros(tokens * i)?,
            mid16: gpu.zeros(tokens * i)?,
            out: gpu.zeros(seqs * h)?,
        })
    }
}

/// The encoder on a GPU. Batches are validated by the CPU model's rules (same config).
pub struct CudaBackend {
    model: Arc<MiniLm>,
    gpu: Gpu,
    w: DeviceWeights,
    scratch: Option<Scratch>,
    router: Option<DeviceRouter>,
    vocab: Option<DeviceVocab>,
    /// Router logits of the last batch, `seqs × router.width()`; grown on demand.
    logits: Option<CudaSlice<f32>>,
    graph_max_tokens: usize,
    /// By (token bucket, sequence bucket); they point into `scratch`.
    graphs: std::collections::HashMap<(usize, usize), Graph>,
}

/// A captured forward. CUDA graphs are not tied to a thread; they only must not be used from
/// two threads at once, and the backend that owns them is used through `&mut self` only.
struct Graph(CudaGraph);
// SAFETY: see above: exclusive access through the owning CudaBackend (Send, not Sync).
unsafe impl Send for Graph {}

impl CudaBackend {
    /// Uploads the weights in `dir` (which must be the ones `model` holds: same revision) to
    /// device 0 and compiles the kernels. `model` validates batches and defines the shapes.
    pub fn new(model: Arc<MiniLm>, dir: &Path) -> Result<Self> {
        let host = weights::HostWeights::load(dir)?;
        ensure!(
            host.revision == model.revision(),
            "{}: revision {} differs from the loaded model's {}",
            dir.display(),
            host.revision,
            model.revision()
        );
        Self::start(model, &host)
    }

    fn start(model: Arc<MiniLm>, host: &weights::HostWeights) -> Result<Self> {
        let gpu = Gpu::open()?;
        let w = DeviceWeights::upload(&gpu, host)?;
        drv("synchronising after the upload", gpu.stream.synchronize())?;
        Ok(CudaBackend {
            model,
            gpu,
            w,
            scratch: None,
            router: None,
            vocab: None,
            logits: None,
            graph_max_tokens: DEFAULT_GRAPH_MAX_TOKENS,
            graphs: Default::default(),
        })
    }

    /// The device, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn device_name(&self) -> &str {
        &self.gpu.name
    }

    /// [`Backend::embed`], also returning the wall-clock time of the whole forward (host
    /// packing, upload, kernels, the synchronising download) in milliseconds: what a batch
    /// costs the batcher. (Not CUDA events: with the CUDA 13 bindings cudarc times events with
    /// cuEventElapsedTime_v2, which drivers before 12.8 lack, and a missing symbol panics.)
    pub fn embed_timed(&mut self, batch: &PackedBatch) -> Result<(Vec<f32>, f32)> {
        self.model.validate(batch)?;
        if batch.is_empty() {
            return Ok((Vec::new(), 0.0));
        }
        let t0 = std::time::Instant::now();
        let out = self.forward(batch)?;
        Ok((out, t0.elapsed().as_secs_f32() * 1e3))
    }

    /// Puts the WordPiece vocabulary on the GPU for [`CudaBackend::tokenize`].
    pub fn set_vocab(&mut self, table: &WordPieceTable) -> Result<()> {
        self.vocab = Some(DeviceVocab::upload(&self.gpu, table)?);
        Ok(())
    }

    /// WordPiece ids of each text on the GPU (no special tokens, no truncation); `None` for
    /// a text to tokenize on the CPU (non-ASCII or holding an added token's literal).
    pub fn tokenize(&mut self, texts: &[&str]) -> Result<Vec<Option<Vec<u32>>>> {
        drv("binding the CUDA context", self.gpu.ctx.bind_to_thread())?;
        let v = self
            .vocab
            .as_mut()
            .context("no vocabulary on the GPU: call set_vocab first")?;
        v.tokenize(&self.gpu, texts)
    }

    /// Puts the router head on the GPU for [`CudaBackend::embed_route`].
    pub fn set_router(&mut self, r: &RouterHead) -> Result<()> {
        self.router = Some(DeviceRouter::upload(&self.gpu, r, self.w.h)?);
        Ok(())
    }

    pub fn router(&self) -> Option<&DeviceRouter> {
        self.router.as_ref()
    }

    /// Embeddings and, computed on the GPU from them, every model's router logit:
    /// `batch.len() × router().width()` (columns by [`DeviceRouter::column`]).
    pub fn embed_route(&mut self, batch: &PackedBatch) -> Result<(Vec<f32>, Vec<f32>)> {
        self.model.validate(batch)?;
        if batch.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let emb = self.forward(batch)?;
        let r = self
            .router
            .as_ref()
            .context("no router head on the GPU: call set_router first")?;
        let n = batch.len() * r.width();
        if self.logits.as_ref().is_none_or(|l| l.len() < n) {
            self.logits = None;
            self.logits = Some(self.gpu.zeros(n.next_power_of_two())?);
        }
        let (out, sc) = match (self.logits.as_mut(), self.scratch.as_ref()) {
            (Some(o), Some(sc)) => (o, sc),
            _ => anyhow::bail!("GPU buffers missing after the forward pass"),
        };
        self.gpu.router_logits(&sc.out, batch.len(), r, out)?;
        let logits = self.gpu.download(out, n)?;
        Ok((emb, logits))
    }

    /// Batches whose token bucket is at most `max_tokens` replay a CUDA graph per (token
    /// bucket, sequence bucket); 0 runs every batch eagerly. Drops the graphs captured so far.
    pub fn set_graph_max_tokens(&mut self, max_tokens: usize) {
        self.graph_max_tokens = max_tokens;
        self.graphs.clear();
    }

    /// Graphs captured so far.
    pub fn graphs(&self) -> usize {
        self.graphs.len()
    }

    fn forward(&mut self, batch: &PackedBatch) -> Result<Vec<f32>> {
        drv("binding the CUDA context", self.gpu.ctx.bind_to_thread())?;
        let (t, s, h) = (batch.tokens(), batch.len(), self.w.h);
        // A graph bakes in shapes and pointers: it runs the batch padded to its buckets, with
        // attention sized for the longest sequence the model takes.
        let key = (token_bucket(t), seq_bucket(s));
        let graph = self.graph_max_tokens > 0
            && key.0 <= self.graph_max_tokens
            && (self.graphs.contains_key(&key) || self.graphs.len() < MAX_GRAPHS);
        let (rt, rs, max_len) = if graph {
            (key.0, key.1, self.model.max_positions())
        } else {
            let longest = (0..s).map(|i| batch.seq(i).len()).max().unwrap_or(0);
            (t, s, longest)
        };
        let need_grow = self
            .scratch
            .as_ref()
            .is_none_or(|sc| sc.tokens < rt || sc.seqs < rs);
        if need_grow {
            // Powers of two, never below what was there: a few sizes cover every batch, so
            // reallocation is rare. Graphs point into the old buffers, so they go with them.
            let (old_t, old_s) = self
                .scratch
                .as_ref()
                .map_or((0, 0), |sc| (sc.tokens, sc.seqs));
            let (ct, cs) = (
                rt.next_power_of_two().max(512).max(old_t),
                seq_bucket(rs).max(old_s),
            );
            self.graphs.clear();
            self.scratch = None; // free the old buffers first
            self.scratch = Some(Scratch::new(&self.gpu, &self.w, ct, cs)?);
        }
        let sc = self
            .scratch
            .as_mut()
            .context("scratch buffers missing after allocation")?;

        // ids | type ids | positions (rt each) | cu_seqlens (rs + 1). Padding rows are token 0
        // at position 0 in no sequence (computed, never read); padding sequences are empty.
        let mut meta = Vec::with_capacity(3 * rt + rs + 1);
        meta.extend_from_slice(&batch.ids);
        meta.resize(rt, 0);
        meta.extend_from_slice(&batch.type_ids);
        meta.resize(2 * rt, 0);
        for i in 0..s {
            meta.extend(0..batch.seq(i).len() as u32);
        }
        meta.resize(3 * rt, 0);
        meta.extend_from_slice(&batch.cu_seqlens);
        meta.resize(3 * rt + rs + 1, t as u32);
        drv(
            "copying the batch to the GPU",
            self.gpu
                .stream
                .memcpy_htod(&meta, &mut sc.meta.slice_mut(..meta.len())),
        )?;

        let shape = Shape {
            t: rt,
            s: rs,
            max_len,
        };
        match (graph, self.graphs.get(&key)) {
            (true, Some(g)) => drv("launching a CUDA graph", g.0.launch())?,
            (true, None) => {
                // This batch runs eagerly first, so cuBLAS meets this bucket's shapes (and
                // loads their kernels) outside the capture; the graph serves the next ones.
                enqueue(&self.gpu, &self.w, sc, shape)?;
                match capture(&self.gpu, &self.w, sc, shape) {
                    Ok(g) => {
                        self.graphs.insert(key, Graph(g));
                    }
                    Err(e) => {
                        // Never fatal: this batch already ran; later ones run eagerly.
                        tracing::warn!(error = %format!("{e:#}"), "CUDA graph capture failed; running eagerly");
                        self.graph_max_tokens = 0;
                    }
                }
            }
            (false, _) => enqueue(&self.gpu, &self.w, sc, shape)?,
        }
        let out = self.gpu.download(&sc.out, s * h)?;
        drv("a CUDA call", self.gpu.ctx.check_err())?;
        Ok(out)
    }
}

/// Rows, sequences and attention's longest sequence of one forward as launched.
#[derive(Clone, Copy)]
struct Shape {
    t: usize,
    s: usize,
    max_len: usize,
}

/// The whole encoder forward on the batch in `sc.meta` (laid out for `sh`), pooled into
/// `sc.out`: the same calls run eagerly or once into a graph.
fn enqueue(gpu: &Gpu, w: &DeviceWeights, sc: &mut Scratch, sh: Shape) -> Result<()> {
    let (t, s, h) = (sh.t, sh.s, w.h);
    let cu_at = 3 * t;
    if t > 0 {
        gpu.embed_layernorm(&sc.meta, t, w, &mut sc.x32, &mut sc.x16)?;
        for l in &w.layers {
            gpu.gemm(&sc.x16, &l.w_qkv, &mut sc.qkv, t, 3 * h, h)?;
            gpu.attention(
                &sc.qkv,
                &l.b_qkv,
                &sc.meta,
                cu_at,
                (s, sh.max_len, w.heads),
                &mut sc.ctx16,
            )?;
            gpu.gemm(&sc.ctx16, &l.w_attn_out, &mut sc.y32, t, h, h)?;
            gpu.bias_residual_layernorm(
                &sc.y32,
                &l.b_attn_out,
                &l.ln1_g,
                &l.ln1_b,
                (t, h, w.eps),
                &mut sc.x32,
                &mut sc.x16,
            )?;
            gpu.gemm(&sc.x16, &l.w_inter, &mut sc.mid32, t, w.inter, h)?;
            gpu.bias_gelu(&sc.mid32, &l.b_inter, (t, w.inter), &mut sc.mid16)?;
            gpu.gemm(&sc.mid16, &l.w_out, &mut sc.y32, t, h, w.inter)?;
            gpu.bias_residual_layernorm(
                &sc.y32,
                &l.b_out,
                &l.ln2_g,
                &l.ln2_b,
                (t, h, w.eps),
                &mut sc.x32,
                &mut sc.x16,
            )?;
        }
    }
    gpu.mean_pool_l2(&sc.x32, &sc.meta, cu_at, (s, h), &mut sc.out)
}

/// Captures [`enqueue`] for `sh` into a graph (nothing runs until it is launched).
fn capture(gpu: &Gpu, w: &DeviceWeights, sc: &mut Scratch, sh: Shape) -> Result<CudaGraph> {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    drv(
        "beginning a graph capture",
        gpu.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
    )?;
    let queued = enqueue(gpu, w, sc, sh);
    // End the capture whatever happened, so the stream is usable again.
    let ended = gpu.stream.end_capture(CUgraphInstantiate_flags(0));
    queued?;
    let g = drv("ending a graph capture", ended)?.context("the capture recorded no graph")?;
    drv("uploading a graph", g.upload())?;
    Ok(g)
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn numerics(&self) -> &'static str {
        "f16"
    }

    fn dim(&self) -> usize {
        self.model.dim()
    }

    fn max_seq_len(&self) -> usize {
        self.model.max_positions()
    }

    fn embed(&mut self, batch: &PackedBatch) -> Result<Vec<f32>, TgError> {
        self.model.validate(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.forward(batch)
            .map_err(|e| TgError::Backend(format!("cuda: {e:#}")))
    }
}

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
