//! The CUDA backend: weights on the device, scratch buffers, eager or graph-replayed forwards.
use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaGraph, CudaSlice};
use half::f16;

use super::gpu::*;
use super::vocab::DeviceVocab;
use super::weights;
use crate::base::{Backend, BackendError, Device, PackedBatch};
use crate::model::heads::RouterHead;
use crate::model::wordpiece::WordPieceTable;
use crate::model::MiniLm;

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

    fn device(&self) -> Device {
        Device::Cuda
    }

    fn embed(&mut self, batch: &PackedBatch) -> Result<Vec<f32>, BackendError> {
        self.model.validate(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.forward(batch)
            .map_err(|e| BackendError::Fault(format!("cuda: {e:#}")))
    }
}
