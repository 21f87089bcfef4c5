//! MiniLM (BERT) sentence encoder on the CPU, over packed variable-length batches.
//!
//! All linear layers run as one GEMM over the packed `[total_tokens, hidden]` matrix,
//! so batches carry no padding. Weights are stored as f32, pre-transposed to
//! `[in, out]` row-major (Q, K and V fused into one `[hidden, 3*hidden]` matrix).
//! Elementwise work is fused around the GEMMs: bias is written into the GEMM's
//! destination beforehand, residuals are accumulated by the GEMM itself, and
//! bias+LayerNorm / GELU are single row passes.
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use gemm::Parallelism;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::bf16::{self, PackedB};
use super::int8::{self, PackedI8};
use super::par::SendPtr;
use super::student::{self, StaticStudent};
use crate::base::{BackendError, PackedBatch};

/// Arithmetic of the linear layers (everything else is f32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// int8 where the CPU has AVX2 (on its AVX-512 VNNI or AVX-VNNI kernel where it has
    /// one; 7-bit weights on the AVX2 kernel), bf16 on an AMD AVX512-BF16 CPU without VNNI,
    /// else f32 (each passed the dev accuracy gate, `scripts/precision_gate.py`).
    Auto,
    /// f32 weights and activations (the `gemm` crate): the reference.
    F32,
    /// bf16 weights and activations, f32 accumulation (AVX512-BF16 only).
    Bf16,
    /// int8 weights (per output channel) and activations (per token), i32 accumulation
    /// (`model::int8`; vector kernels on AVX2, AVX-VNNI and AVX-512 VNNI, a scalar
    /// reference elsewhere).
    Int8,
    /// No encoder layers: the static student (`model::student`), Route's fast path, for
    /// measuring it (`tiergate score`); needs a student fitted on these weights.
    Static,
}

impl Precision {
    /// What `self` runs as on this CPU; `Bf16` without AVX512-BF16 is an error.
    pub fn resolve(self) -> Result<Self, BackendError> {
        match self {
            // With a VNNI kernel, int8 is about 1.3x bf16 at batch 1 and batched on the dev
            // mix; both passed the gate (benches/README.md). Decided on the best kernel the
            // CPU has, so `TIERGATE_INT8_KERNEL` never changes which precision runs (only
            // the speed, and the weights' width where it names a kernel of the other width:
            // 7 bits on `avx2`, 8 on the rest).
            Self::Auto if int8::best_kernel().is_vnni() => Ok(Self::Int8),
            Self::Auto if bf16::preferred() => Ok(Self::Bf16),
            // Elsewhere (Arm, pre-AVX2 x86) int8 would run its scalar reference: slower
            // than f32 through `gemm`, which has NEON kernels.
            Self::Auto if int8::available() => Ok(Self::Int8),
            Self::Auto => Ok(Self::F32),
            Self::Bf16 if !bf16::available() => Err(BackendError::Unsupported(
                "precision bf16 needs a CPU with AVX512-BF16; use f32 or auto".into(),
            )),
            p => Ok(p),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
            Self::Static => "static",
        }
    }
}

/// Runs `$f($arg)` compiled for AVX-512 or AVX2+FMA when the CPU has them (the crate
/// targets baseline x86-64, where the elementwise loops only get 4-wide SSE2). `$f` must be
/// `#[inline(always)]` so its body is compiled inside the wrapper.
macro_rules! with_avx2 {
    ($f:ident($arg:expr)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            unsafe fn wider(x: &mut [f32]) {
                $f(x)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn wide(x: &mut [f32]) {
                $f(x)
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                // SAFETY: the features `wider` is compiled for were detected just above.
                return unsafe { wider($arg) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the features `wide` is compiled for were detected just above.
                return unsafe { wide($arg) };
            }
        }
        $f($arg)
    }};
}

/// The subset of a HF BERT `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub layer_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub type_vocab_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_pos")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_pos() -> String {
    "absolute".into()
}

struct Layer {
    /// `[hidden, 3*hidden]`: columns are Q | K | V.
    w_qkv: Vec<f32>,
    b_qkv: Vec<f32>,
    /// `[hidden, hidden]`
    w_attn_out: Vec<f32>,
    b_attn_out: Vec<f32>,
    ln1_g: Vec<f32>,
    ln1_b: Vec<f32>,
    /// `[hidden, intermediate]`
    w_inter: Vec<f32>,
    b_inter: Vec<f32>,
    /// `[intermediate, hidden]`
    w_out: Vec<f32>,
    b_out: Vec<f32>,
    ln2_g: Vec<f32>,
    ln2_b: Vec<f32>,
    /// The four weight matrices rounded and packed for the bf16 kernel, made on first use
    /// (f32-only users, such as the CUDA self-check, never pay the memory).
    packed: std::sync::OnceLock<[PackedB; 4]>,
    /// The same four quantized for the int8 kernel, made on first use.
    packed_i8: std::sync::OnceLock<[PackedI8; 4]>,
}

/// The encoder with its weights in memory.
pub struct MiniLm {
    cfg: BertConfig,
    head_dim: usize,
    eps: f32,
    word: Vec<f32>,
    pos: Vec<f32>,
    token_type: Vec<f32>,
    emb_ln_g: Vec<f32>,
    emb_ln_b: Vec<f32>,
    layers: Vec<Layer>,
    revision: String,
    /// The revision these weights were exported from (`tiergate export-f16`), if any.
    source_revision: Option<String>,
    /// Per-channel activation maxima for the int8 layers' smoothing, when the embedded
    /// calibration was made on these weights.
    act_max: Option<ActStats>,
    /// Route's fast path, when the embedded student was fitted on these weights.
    student: Option<StaticStudent>,
}

/// The largest |input| per channel of each linear layer, over calibration prompts:
/// `layers[l]` holds QKV (hidden), attention out (hidden), FFN in (hidden) and FFN out
/// (intermediate) inputs.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct ActStats {
    /// `revision()` of the weights they were measured on.
    pub model_revision: String,
    /// How they were made (prompts, source), for people.
    #[serde(default)]
    pub made_from: String,
    pub layers: Vec<[Vec<f32>; 4]>,
}

/// Tokens of one group of sequences a layer runs on at once (`forward_impl`): the FFN's
/// 256 × 1536 f32 intermediate is 1.5 MiB, about one core's L2 and its share of L3.
const GROUP_TOKENS: usize = 256;

/// Fitted by `tiergate distill-static` on train prompts (benches/README.md, "Route's fast
/// path").
const EMBEDDED_STUDENT: &[u8] = include_bytes!("../../models/static-student.bin");

/// Measured by `tiergate calibrate-int8` on train prompts (models/README.md).
const EMBEDDED_ACT_STATS: &str = include_str!("../../models/int8-act-max.json");

impl ActStats {
    fn empty(m: &MiniLm) -> Self {
        let (h, inter) = (m.cfg.hidden_size, m.cfg.intermediate_size);
        Self {
            model_revision: m.revision.clone(),
            made_from: String::new(),
            layers: (0..m.layers.len())
                .map(|_| [vec![0.0; h], vec![0.0; h], vec![0.0; h], vec![0.0; inter]])
                .collect(),
        }
    }

    /// The embedded maxima if they fit `m` (same weights, same shapes).
    fn embedded_for(m: &MiniLm) -> Option<Self> {
        let s: Self = serde_json::from_str(EMBEDDED_ACT_STATS).ok()?;
        let e = Self::empty(m);
        let fits = m.fits_revision(&s.model_revision)
            && s.layers.len() == e.layers.len()
            && s.layers
                .iter()
                .zip(&e.layers)
                .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.len() == y.len()));
        fits.then_some(s)
    }

    fn observe(&mut self, l: usize, i: usize, x: &[f32]) {
        let m = &mut self.layers[l][i];
        for row in x.chunks_exact(m.len()) {
            for (a, &v) in m.iter_mut().zip(row) {
                *a = a.max(v.abs());
            }
        }
    }
}

/// Reads named tensors out of a safetensors file, checking shapes.
struct Weights<'a> {
    st: SafeTensors<'a>,
    file: String,
}

impl Weights<'_> {
    /// Tensor `name` as f32, which must have exactly `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        read_tensor(&self.st, &self.file, name, shape)
    }

    /// A HF `Linear` weight (`[out, in]`) transposed to `[in, out]` row-major.
    fn linear_t(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Vec<f32>> {
        let w = self.get(name, &[out_dim, in_dim])?;
        let mut t = vec![0.0; w.len()];
        for (o, row) in w.chunks_exact(in_dim).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                t[i * out_dim + o] = v;
            }
        }
        Ok(t)
    }
}

/// Tensor `name` of a safetensors file as f32 (from f32, f16 or bf16), which must have exactly
/// `shape`; errors name the file and tensor. Shared with the CUDA backend's weight loader.
pub fn read_tensor(
    st: &SafeTensors<'_>,
    file: &str,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .with_context(|| format!("{file}: missing tensor {name}"))?;
    ensure!(
        t.shape() == shape,
        "{file}: tensor {name} has shape {:?}, expected {shape:?}",
        t.shape()
    );
    let data = t.data();
    let out: Vec<f32> = match t.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("{file}: tensor {name} has unsupported dtype {other:?}"),
    };
    ensure!(
        out.len() == shape.iter().product::<usize>(),
        "{file}: tensor {name} holds {} values for shape {shape:?}",
        out.len()
    );
    Ok(out)
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
pub type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Writes `tensors` as a safetensors file at `path`.
pub fn write_safetensors(path: &Path, tensors: &[RawTensor]) -> Result<()> {
    write_safetensors_with(path, tensors, None)
}

/// The safetensors metadata key under which [`export_f16`] records the revision of the weights
/// it was made from.
const SOURCE_REVISION_KEY: &str = "tiergate.source_revision";

/// [`write_safetensors`] with the file's `__metadata__` strings.
fn write_safetensors_with(
    path: &Path,
    tensors: &[RawTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, dtype, shape, b)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .with_context(|| format!("tensor {n}"))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, metadata, path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Copies the encoder in `src` (config.json, model.safetensors, tokenizer.json when present)
/// to `dst` with every floating-point tensor stored as f16: half the size (about 44 MiB for
/// MiniLM-L6), for carrying to a GPU machine. Both backends load it (the CUDA backend rounds
/// to f16 anyway). Its revision is its own, since the file differs, and it records the revision
/// it was made from (an export's own source, when `src` is an export), so heads, int8 ranges and
/// the static student fitted on the source still fit it: f16 rounding moves Route's p by about
/// 2e-4 (benches/GPU.md), far inside what they tolerate.
pub fn export_f16(src: &Path, dst: &Path) -> Result<u64> {
    let st_path = src.join("model.safetensors");
    let bytes =
        std::fs::read(&st_path).with_context(|| format!("reading {}", st_path.display()))?;
    let name = st_path.display().to_string();
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {name}"))?;
    let source = source_revision(&bytes).unwrap_or_else(|| hex12(&Sha256::digest(&bytes)));
    let mut tensors = Vec::new();
    for (n, t) in st.tensors() {
        let out = match t.dtype() {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => {
                let v = read_tensor(&st, &name, &n, t.shape())?;
                if let Some(bad) = v.iter().find(|x| x.is_finite() && x.abs() > 65504.0) {
                    bail!("{name}: tensor {n} holds {bad}, beyond f16's range");
                }
                let b: Vec<u8> = v
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect();
                (Dtype::F16, b)
            }
            // Integer buffers (e.g. position_ids in some exports) are copied as they are.
            other => (other, t.data().to_vec()),
        };
        tensors.push((n, out.0, t.shape().to_vec(), out.1));
    }
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    let out = dst.join("model.safetensors");
    let meta = HashMap::from([(SOURCE_REVISION_KEY.to_string(), source)]);
    write_safetensors_with(&out, &tensors, Some(meta))?;
    for f in ["config.json", "tokenizer.json"] {
        let from = src.join(f);
        if f == "config.json" || from.exists() {
            std::fs::copy(&from, dst.join(f))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    Ok(std::fs::metadata(&out)
        .with_context(|| format!("reading {}", out.display()))?
        .len())
}

/// The revision an export recorded as its source (`tiergate.source_revision` in the file's
/// metadata), if any; a malformed header reads as none here and fails the parse that follows.
fn source_revision(bytes: &[u8]) -> Option<String> {
    let (_, meta) = SafeTensors::read_metadata(bytes).ok()?;
    let rev = meta.metadata().as_ref()?.get(SOURCE_REVISION_KEY)?;
    // A revision is 12 hex chars; anything else in the field is not ours to trust.
    (rev.len() == 12 && rev.bytes().all(|b| b.is_ascii_hexdigit())).then(|| rev.clone())
}

/// Whether something fitted on weights of revision `rev` fits weights of revision `own`,
/// exported from `source` if they are an f16 export: the same weights, or their source.
pub fn revision_fits(own: &str, source: Option<&str>, rev: &str) -> bool {
    own == rev || source == Some(rev)
}

impl MiniLm {
    /// Loads `config.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let cfg: BertConfig = serde_json::from_str(&cfg_text)
            .with_context(|| format!("parsing {}", cfg_path.display()))?;
        ensure!(
            cfg.hidden_act == "gelu",
            "{}: hidden_act {:?} unsupported (only erf \"gelu\")",
            cfg_path.display(),
            cfg.hidden_act
        );
        ensure!(
            cfg.position_embedding_type == "absolute",
            "{}: position_embedding_type {:?} unsupported",
            cfg_path.display(),
            cfg.position_embedding_type
        );
        ensure!(
            cfg.num_attention_heads > 0
                && cfg.hidden_size > 0
                && cfg.hidden_size.is_multiple_of(cfg.num_attention_heads),
            "{}: hidden_size {} not divisible by num_attention_heads {}",
            cfg_path.display(),
            cfg.hidden_size,
            cfg.num_attention_heads
        );
        // Zero would pass the weight shape checks and panic splitting rows (chunks of 0).
        ensure!(
            cfg.intermediate_size > 0,
            "{}: intermediate_size must be > 0",
            cfg_path.display()
        );

        let st_path = dir.join("model.safetensors");
        let file =
            File::open(&st_path).with_context(|| format!("opening {}", st_path.display()))?;
        // SAFETY: the map is read-only and dropped before `load` returns; the model
        // files are not modified while the service runs.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", st_path.display()))?;
        let revision = hex12(&Sha256::digest(&mmap[..]));
        let source_revision = source_revision(&mmap[..]);
        let w = Weights {
            st: SafeTensors::deserialize(&mmap)
                .with_context(|| format!("parsing {}", st_path.display()))?,
            file: st_path.display().to_string(),
        };

        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        // Checkpoints exported from `BertModel` have no "bert." prefix; those from
        // task models (`BertForX`) do.
        let prefix = if w.st.tensor("embeddings.word_embeddings.weight").is_ok() {
            ""
        } else {
            "bert."
        };
        let emb = |n: &str, shape: &[usize]| w.get(&format!("{prefix}embeddings.{n}"), shape);
        let word = emb("word_embeddings.weight", &[cfg.vocab_size, h])?;
        let pos = emb(
            "position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
        )?;
        let token_type = emb("token_type_embeddings.weight", &[cfg.type_vocab_size, h])?;
        let emb_ln_g = emb("LayerNorm.weight", &[h])?;
        let emb_ln_b = emb("LayerNorm.bias", &[h])?;

        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("{prefix}encoder.layer.{l}.");
            let q = w.linear_t(&format!("{p}attention.self.query.weight"), h, h)?;
            let k = w.linear_t(&format!("{p}attention.self.key.weight"), h, h)?;
            let v = w.linear_t(&format!("{p}attention.self.value.weight"), h, h)?;
            let mut w_qkv = Vec::with_capacity(3 * h * h);
            for i in 0..h {
                for m in [&q, &k, &v] {
                    w_qkv.extend_from_slice(&m[i * h..(i + 1) * h]);
                }
            }
            let mut b_qkv = w.get(&format!("{p}attention.self.query.bias"), &[h])?;
            b_qkv.extend(w.get(&format!("{p}attention.self.key.bias"), &[h])?);
            b_qkv.extend(w.get(&format!("{p}attention.self.value.bias"), &[h])?);
            layers.push(Layer {
                w_qkv,
                b_qkv,
                w_attn_out: w.linear_t(&format!("{p}attention.output.dense.weight"), h, h)?,
                b_attn_out: w.get(&format!("{p}attention.output.dense.bias"), &[h])?,
                ln1_g: w.get(&format!("{p}attention.output.LayerNorm.weight"), &[h])?,
                ln1_b: w.get(&format!("{p}attention.output.LayerNorm.bias"), &[h])?,
                w_inter: w.linear_t(&format!("{p}intermediate.dense.weight"), inter, h)?,
                b_inter: w.get(&format!("{p}intermediate.dense.bias"), &[inter])?,
                w_out: w.linear_t(&format!("{p}output.dense.weight"), h, inter)?,
                b_out: w.get(&format!("{p}output.dense.bias"), &[h])?,
                ln2_g: w.get(&format!("{p}output.LayerNorm.weight"), &[h])?,
                ln2_b: w.get(&format!("{p}output.LayerNorm.bias"), &[h])?,
                packed: std::sync::OnceLock::new(),
                packed_i8: std::sync::OnceLock::new(),
            });
        }
        let mut m = Self {
            head_dim: h / cfg.num_attention_heads,
            eps: cfg.layer_norm_eps as f32,
            cfg,
            word,
            pos,
            token_type,
            emb_ln_g,
            emb_ln_b,
            layers,
            revision,
            source_revision,
            act_max: None,
            student: None,
        };
        m.act_max = ActStats::embedded_for(&m);
        m.student = StaticStudent::from_bytes(EMBEDDED_STUDENT)
            .ok()
            .filter(|s| m.fits_revision(&s.info().model_revision) && s.dim() == h);
        Ok(m)
    }

    /// Packs the weights for the bf16 kernel now rather than on the first bf16 forward pass
    /// (a no-op on CPUs without AVX512-BF16, or when already packed).
    pub fn prepare_bf16(&self) {
        if bf16::available() {
            for l in &self.layers {
                self.packed(l);
            }
        }
    }

    /// Quantizes and packs the weights for the int8 kernel now rather than on the first
    /// int8 forward pass (a no-op when already packed).
    pub fn prepare_int8(&self) {
        let kern = int8::kernel();
        tracing::info!(
            kernel = kern.name(),
            weight_bits = kern.weight_bits(),
            smoothed = self.act_max.is_some(),
            "int8 linear layers"
        );
        for (i, l) in self.layers.iter().enumerate() {
            self.packed_i8(i, l);
        }
    }

    /// What `precision` runs as for these weights on this CPU: [`Precision::resolve`], except
    /// that `Auto` keeps off int8 when no smoothing ranges fit these weights (int8 passed the
    /// gate smoothed) and takes what needs no calibration.
    pub fn resolve_precision(&self, precision: Precision) -> Result<Precision, BackendError> {
        let p = precision.resolve()?;
        if precision == Precision::Auto && p == Precision::Int8 && !self.int8_smoothed() {
            return Ok(if bf16::preferred() {
                Precision::Bf16
            } else {
                Precision::F32
            });
        }
        Ok(p)
    }

    /// Whether the int8 layers are smoothed (calibration maxima fit these weights).
    pub fn int8_smoothed(&self) -> bool {
        self.act_max.is_some()
    }

    fn packed_i8<'a>(&self, li: usize, l: &'a Layer) -> &'a [PackedI8; 4] {
        let (h, inter) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let stats = self.act_max.as_ref().map(|s| &s.layers[li]);
        let pack = |i: usize, w: &[f32], k: usize, n: usize| match stats {
            Some(st) => PackedI8::pack_smoothed(w, k, n, &st[i]),
            None => PackedI8::pack(w, k, n),
        };
        l.packed_i8.get_or_init(|| {
            [
                pack(0, &l.w_qkv, h, 3 * h),
                pack(1, &l.w_attn_out, h, h),
                pack(2, &l.w_inter, h, inter),
                pack(3, &l.w_out, inter, h),
            ]
        })
    }

    /// Runs the f32 forward pass on `batch` and returns the largest |input| per channel of
    /// every linear layer (what [`PackedI8::pack_smoothed`] needs), merged into `into`
    /// when given.
    pub fn observe(&self, batch: &PackedBatch, into: Option<ActStats>) -> ActStats {
        let mut st = into.unwrap_or_else(|| ActStats::empty(self));
        self.forward_impl(batch, Precision::F32, Some(&mut st));
        st
    }

    fn packed<'a>(&self, l: &'a Layer) -> &'a [PackedB; 4] {
        let (h, inter) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        l.packed.get_or_init(|| {
            [
                PackedB::pack(&l.w_qkv, h, 3 * h),
                PackedB::pack(&l.w_attn_out, h, h),
                PackedB::pack(&l.w_inter, h, inter),
                PackedB::pack(&l.w_out, inter, h),
            ]
        })
    }

    /// Embedding width (384 for MiniLM-L6).
    pub fn dim(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Longest sequence the position embeddings allow.
    pub fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// First 12 hex chars of the sha256 of `model.safetensors`.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// The revision an f16 export was made from (`tiergate export-f16`), if these weights are one.
    pub fn source_revision(&self) -> Option<&str> {
        self.source_revision.as_deref()
    }

    /// Whether something fitted on weights of revision `rev` (heads, int8 ranges, the static
    /// student) fits these: the same weights, or the weights this export was made from.
    pub fn fits_revision(&self, rev: &str) -> bool {
        revision_fits(&self.revision, self.source_revision.as_deref(), rev)
    }

    /// Checks what [`Self::forward`] would otherwise panic on: token ids, type ids
    /// and sequence lengths within the model's tables, and well-formed offsets.
    pub fn validate(&self, batch: &PackedBatch) -> Result<(), BackendError> {
        let bad = |m: String| Err(BackendError::InvalidBatch(m));
        if batch.ids.len() != batch.type_ids.len() {
            return bad("ids and type_ids differ in length".into());
        }
        match (batch.cu_seqlens.first(), batch.cu_seqlens.last()) {
            (Some(0), Some(&end)) if end as usize == batch.ids.len() => {}
            _ => return bad("cu_seqlens must start at 0 and end at the token count".into()),
        }
        for w in batch.cu_seqlens.windows(2) {
            if w[1] < w[0] {
                return bad("cu_seqlens must be non-decreasing".into());
            }
            if (w[1] - w[0]) as usize > self.max_positions() {
                return bad(format!(
                    "sequence of {} tokens exceeds the model's {} positions",
                    w[1] - w[0],
                    self.max_positions()
                ));
            }
        }
        if let Some(&id) = batch
            .ids
            .iter()
            .find(|&&i| i as usize >= self.cfg.vocab_size)
        {
            return bad(format!("token id {id} outside the vocabulary"));
        }
        if let Some(&t) = batch
            .type_ids
            .iter()
            .find(|&&t| t as usize >= self.cfg.type_vocab_size)
        {
            return bad(format!("token type id {t} out of range"));
        }
        Ok(())
    }

    /// Embeds every sequence of `batch`: `batch.len() * dim()` floats, each row the
    /// L2-normalised mean of its sequence's final hidden states (special tokens
    /// included, as sentence-transformers does). Runs on the current rayon pool.
    ///
    /// Panics if the batch fails [`Self::validate`]; backends validate first.
    pub fn forward(&self, batch: &PackedBatch) -> Vec<f32> {
        self.forward_with(batch, Precision::F32)
    }

    /// [`Self::forward`] with the linear layers in `precision` (resolved as
    /// [`Self::resolve_precision`] does; `Bf16` without AVX512-BF16 falls back to f32).
    pub fn forward_with(&self, batch: &PackedBatch, precision: Precision) -> Vec<f32> {
        self.forward_impl(batch, precision, None)
    }

    fn forward_impl(
        &self,
        batch: &PackedBatch,
        precision: Precision,
        mut observe: Option<&mut ActStats>,
    ) -> Vec<f32> {
        if let Err(e) = self.validate(batch) {
            panic!("MiniLm::forward on an invalid batch: {e}");
        }
        let (h, inter) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let t = batch.tokens();
        if batch.is_empty() {
            return Vec::new();
        }
        let precision = self.resolve_precision(precision).unwrap_or(Precision::F32);
        if precision == Precision::Static {
            if let Some(s) = &self.student {
                return self.student_forward(s, batch);
            }
        }
        let mut x = vec![0.0f32; t * h];
        self.embed_tokens(batch, &mut x);

        // Whole sequences in groups of about GROUP_TOKENS tokens (a longer sequence is a
        // group of its own). Nothing crosses sequences after the embeddings, so each layer
        // runs group by group and a group's activations (its Q|K|V, the FFN's 1536-wide
        // intermediate) stay in cache from one step to the next; a whole batch's are tens of
        // MB. A batch within one group runs as before.
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        let mut g0 = 0;
        for sq in 1..batch.len() {
            if batch.seq(sq).end - batch.seq(g0).start > GROUP_TOKENS {
                groups.push(g0..sq);
                g0 = sq;
            }
        }
        groups.push(g0..batch.len());
        let most = groups
            .iter()
            .map(|g| batch.seq(g.end - 1).end - batch.seq(g.start).start)
            .max()
            .unwrap_or(0);
        let mut qkv = vec![0.0f32; t * 3 * h];
        let mut ctx = vec![0.0f32; t * h];
        let mut mid = vec![0.0f32; most * inter];
        let use_bf16 = precision == Precision::Bf16;
        let use_int8 = precision == Precision::Int8;
        for (li, layer) in self.layers.iter().enumerate() {
            let packed = use_bf16.then(|| self.packed(layer));
            let packed_i8 = use_int8.then(|| self.packed_i8(li, layer));
            // dst (+)= a·W[i] in the chosen precision, over the rows of `a`.
            let mm = |dst: &mut [f32], a: &[f32], i: usize, w: &[f32], k: usize, n: usize| {
                let m = a.len() / k;
                match (packed, packed_i8) {
                    (Some(p), _) => bf16::matmul(dst, a, &p[i], m, true),
                    (None, Some(p)) => int8::matmul(dst, a, &p[i], m, true),
                    (None, None) => matmul(dst, a, w, m, k, n, true),
                }
            };
            for g in &groups {
                let rows = batch.seq(g.start).start..batch.seq(g.end - 1).end;
                let xs = &mut x[rows.start * h..rows.end * h];
                // Q|K|V = x·Wqkv + b (bias pre-filled, GEMM accumulates onto it).
                if let Some(st) = observe.as_deref_mut() {
                    st.observe(li, 0, xs);
                }
                let qs = &mut qkv[rows.start * 3 * h..rows.end * 3 * h];
                fill_rows(qs, &layer.b_qkv);
                mm(qs, xs, 0, &layer.w_qkv, h, 3 * h);
                self.attention(batch, g.clone(), &qkv, &mut ctx);
                let cs = &ctx[rows.start * h..rows.end * h];
                if let Some(st) = observe.as_deref_mut() {
                    st.observe(li, 1, cs);
                }
                // x = LN(x + ctx·Wo + bo): the GEMM adds onto the residual in place.
                mm(xs, cs, 1, &layer.w_attn_out, h, h);
                bias_layer_norm_rows(xs, &layer.b_attn_out, &layer.ln1_g, &layer.ln1_b, self.eps);
                if let Some(st) = observe.as_deref_mut() {
                    st.observe(li, 2, xs);
                }
                // mid = GELU(x·Wi + bi)
                let mid = &mut mid[..rows.len() * inter];
                fill_rows(mid, &layer.b_inter);
                mm(mid, xs, 2, &layer.w_inter, h, inter);
                mid.par_chunks_mut(inter * 8).for_each(gelu_inplace);
                if let Some(st) = observe.as_deref_mut() {
                    st.observe(li, 3, mid);
                }
                // x = LN(x + mid·Wo2 + bo2)
                mm(xs, mid, 3, &layer.w_out, inter, h);
                bias_layer_norm_rows(xs, &layer.b_out, &layer.ln2_g, &layer.ln2_b, self.eps);
            }
        }

        let mut out = vec![0.0f32; batch.len() * h];
        out.par_chunks_mut(h).enumerate().for_each(|(s, o)| {
            mean_pool_normalize(&x[batch.seq(s).start * h..batch.seq(s).end * h], o);
        });
        out
    }

    /// The static student's embedding of each sequence.
    fn student_forward(&self, s: &StaticStudent, batch: &PackedBatch) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let mut out = vec![0.0f32; batch.len() * h];
        out.par_chunks_mut(h).enumerate().for_each(|(i, o)| {
            self.student_into(s, &batch.ids[batch.seq(i)], o);
        });
        out
    }

    /// `s`'s embedding of the tokens `ids` into `out`.
    fn student_into(&self, s: &StaticStudent, ids: &[u32], out: &mut [f32]) {
        let mut b = vec![0.0f32; self.cfg.hidden_size];
        student::bag(&self.word, b.len(), ids, &mut b);
        s.apply(&b, out);
    }

    /// The static student's embedding of one tokenized text (microseconds: a bag of word
    /// vectors and one 384×384 map), if a student fits these weights.
    pub fn student_embed(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let s = self.student.as_ref()?;
        let mut out = vec![0.0f32; self.cfg.hidden_size];
        self.student_into(s, ids, &mut out);
        Some(out)
    }

    /// Whether Route's fast path (the static student) fits these weights.
    pub fn student(&self) -> Option<&StaticStudent> {
        self.student.as_ref()
    }

    /// Replaces the student (`tiergate distill-static` measures the one it just fitted).
    pub fn set_student(&mut self, s: Option<StaticStudent>) {
        self.student = s;
    }

    /// The input word vectors, `vocab × dim`, what the student's bags are made of.
    pub fn word_vectors(&self) -> &[f32] {
        &self.word
    }

    /// word + position (restarting per sequence) + token type embeddings, then LayerNorm.
    fn embed_tokens(&self, batch: &PackedBatch, x: &mut [f32]) {
        let h = self.cfg.hidden_size;
        let mut starts = Vec::with_capacity(batch.tokens());
        for s in 0..batch.len() {
            let r = batch.seq(s);
            starts.extend(std::iter::repeat_n(r.start, r.len()));
        }
        x.par_chunks_mut(h)
            .with_min_len(16)
            .enumerate()
            .for_each(|(i, row)| {
                let (id, ty, p) = (
                    batch.ids[i] as usize,
                    batch.type_ids[i] as usize,
                    i - starts[i],
                );
                let w = &self.word[id * h..(id + 1) * h];
                let pe = &self.pos[p * h..(p + 1) * h];
                let te = &self.token_type[ty * h..(ty + 1) * h];
                for (((r, &a), &b), &c) in row.iter_mut().zip(w).zip(pe).zip(te) {
                    *r = a + b + c;
                }
                layer_norm(row, &self.emb_ln_g, &self.emb_ln_b, self.eps);
            });
    }

    /// Multi-head self-attention of the sequences `seqs` of `batch`, each within itself,
    /// from their rows of `qkv` into their rows of `ctx`; one task per (sequence, head).
    fn attention(
        &self,
        batch: &PackedBatch,
        seqs: std::ops::Range<usize>,
        qkv: &[f32],
        ctx: &mut [f32],
    ) {
        let (h, d, heads) = (
            self.cfg.hidden_size,
            self.head_dim,
            self.cfg.num_attention_heads,
        );
        let scale = 1.0 / (d as f32).sqrt();
        let ctx_ptr = SendPtr(ctx.as_mut_ptr());
        let ctx_len = ctx.len();
        (seqs.start * heads..seqs.end * heads)
            .into_par_iter()
            .for_each_init(Vec::new, |scores: &mut Vec<f32>, task| {
                let (s, head) = (task / heads, task % heads);
                let r = batch.seq(s);
                let l = r.len();
                if l == 0 {
                    return;
                }
                scores.clear();
                scores.resize(l * l, 0.0);
                let q = &qkv[r.start * 3 * h + head * d..];
                let k = &q[h..];
                let v = &q[2 * h..];
                assert!(q.len() >= (l - 1) * 3 * h + d);
                assert!(ctx_len >= (r.end - 1) * h + head * d + d);
                // SAFETY: each task writes only rows r × columns [head*d, (head+1)*d)
                // of ctx, disjoint from every other task; bounds asserted above, and
                // all read strides stay inside `q` (checked by the first assert).
                unsafe {
                    // scores = scale · Q·Kᵀ   (K read transposed through its strides)
                    gemm::gemm(
                        l,
                        l,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        l as isize,
                        false,
                        q.as_ptr(),
                        1,
                        3 * h as isize,
                        k.as_ptr(),
                        3 * h as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                    for row in scores.chunks_exact_mut(l) {
                        softmax_inplace(row);
                    }
                    // ctx[rows, head] = P·V
                    gemm::gemm(
                        l,
                        d,
                        l,
                        ctx_ptr.get().add(r.start * h + head * d),
                        1,
                        h as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        l as isize,
                        v.as_ptr(),
                        1,
                        3 * h as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            });
    }
}

fn hex12(digest: &[u8]) -> String {
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// `dst[m,n] (+)= a[m,k] · b[k,n]`, all row-major and contiguous. With `accumulate`
/// the product is added to what `dst` holds. Parallel over the current rayon pool.
pub fn matmul(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(dst.len() == m * n && a.len() == m * k && b.len() == k * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the slices' lengths match the dimensions and strides (asserted above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
}

/// Copies `row` into every row of `dst` (bias pre-fill before an accumulating GEMM).
fn fill_rows(dst: &mut [f32], row: &[f32]) {
    dst.par_chunks_mut(row.len() * 16).for_each(|chunk| {
        for r in chunk.chunks_exact_mut(row.len()) {
            r.copy_from_slice(row);
        }
    });
}

/// Adds `bias` to each row of `x` then LayerNorms it; rows in parallel.
fn bias_layer_norm_rows(x: &mut [f32], bias: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let h = bias.len();
    x.par_chunks_mut(h).with_min_len(16).for_each(|row| {
        for (r, &b) in row.iter_mut().zip(bias) {
            *r += b;
        }
        layer_norm(row, gamma, beta, eps);
    });
}

/// Sum with 8 independent lanes, so it vectorises without fast-math.
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// LayerNorm of one row in place: `(x - mean) / sqrt(var + eps) * gamma + beta`, with
/// the biased variance computed in a second pass for accuracy.
/// CPU reference for kernels/*.cu (layer norm kernels).
pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = x.len() as f32;
    let mean = sum_lanes(x) / n;
    for v in x.iter_mut() {
        *v -= mean;
    }
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let mut var: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    var = (var + acc.iter().sum::<f32>()) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, &g), &b) in x.iter_mut().zip(gamma).zip(beta) {
        *v = *v * inv * g + b;
    }
}

/// erf for f32 as a rational function on [-4, 4] (±1 beyond, where f32 erf is ±1).
/// Approximation error 6.5e-8; evaluated in f32 the max abs error is 4.2e-7.
/// Branch-free so loops over it vectorise.
/// CPU reference for kernels/*.cu (GELU kernels).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p - 2.101_024e-6;
    p = x2 * p - 5.692_506_4e-5;
    p = x2 * p - 7.349_906_3e-4;
    p = x2 * p - 2.954_6e-3;
    p = x2 * p - 1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
    q = x2 * q - 1.682_827e-3;
    q = x2 * q - 7.373_329e-3;
    q = x2 * q - 1.426_474e-2;
    x * p / q
}

/// Exact (erf) GELU: `x/2 · (1 + erf(x/√2))`, as in HF's `"gelu"`.
/// CPU reference for kernels/*.cu (GELU kernels).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// [`gelu`] over a slice in place.
/// CPU reference for kernels/*.cu (bias+GELU kernel, applied after the bias add).
pub fn gelu_inplace(x: &mut [f32]) {
    with_avx2!(gelu_inplace_impl(x))
}

#[inline(always)]
fn gelu_inplace_impl(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu(*v);
    }
}

/// e^x for f32 (Cephes polynomial, max rel error ~1e-7 over [-87, 88]; inputs are
/// clamped there). Branch-free so the softmax loop vectorises, unlike `f32::exp`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4 * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // The low mantissa bits of `t` hold n; build 2ⁿ from them.
    let n_bits = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    y * f32::from_bits(((n_bits + 127) << 23) as u32)
}

/// Numerically stable softmax of one row in place (max subtracted first).
/// CPU reference for kernels/*.cu (attention softmax).
pub fn softmax_inplace(row: &mut [f32]) {
    with_avx2!(softmax_impl(row))
}

#[inline(always)]
fn softmax_impl(row: &mut [f32]) {
    // Lane-wise max so it vectorises (f32::max folds do not).
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    max = lanes.iter().fold(max, |a, &b| a.max(b));
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    let inv = 1.0 / sum_lanes(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Mean of the rows of `x` (`[len, out.len()]`) into `out`, then L2-normalised.
/// CPU reference for kernels/*.cu (pooling kernel).
pub fn mean_pool_normalize(x: &[f32], out: &mut [f32]) {
    let h = out.len();
    out.fill(0.0);
    let rows = x.len() / h;
    for row in x.chunks_exact(h) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
    let inv_rows = 1.0 / rows.max(1) as f32;
    for o in out.iter_mut() {
        *o *= inv_rows;
    }
    let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt();
    // Same clamp as torch.nn.functional.normalize.
    let inv = 1.0 / norm.max(1e-12);
    for o in out.iter_mut() {
        *o *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config.json with a zero size is refused with the field named, before any weights are
    /// read (a zero intermediate_size used to panic splitting rows).
    #[test]
    fn zero_sizes_in_config_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = serde_json::json!({
            "hidden_act": "gelu", "hidden_size": 384, "intermediate_size": 1536,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
            "num_attention_heads": 12, "num_hidden_layers": 6,
            "position_embedding_type": "absolute", "type_vocab_size": 2, "vocab_size": 30522
        });
        for (field, want) in [
            ("intermediate_size", "intermediate_size must be > 0"),
            ("hidden_size", "not divisible"),
        ] {
            let mut cfg = base.clone();
            cfg[field] = 0.into();
            std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("write");
            let e = MiniLm::load(dir.path()).err().map(|e| format!("{e:#}"));
            assert!(
                e.as_deref().is_some_and(|e| e.contains(want)),
                "{field}: {e:?}"
            );
        }
    }

    #[test]
    fn erf_matches_reference_values() {
        // math.erf in Python (double precision).
        let cases = [
            (0.0, 0.0),
            (0.1, 0.1124629160182849),
            (-0.5, -0.5204998778130465),
            (1.0, 0.8427007929497149),
            (1.7, 0.9837904585907746),
            (2.5, 0.999_593_047_982_555),
            (-3.3, -0.9999969422902035),
            (6.0, 1.0),
        ];
        for (x, want) in cases {
            let got = erf(x as f32) as f64;
            assert!((got - want).abs() < 5e-7, "erf({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(
                ((got - want) / want).abs() < 2e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37);
    }

    #[test]
    fn gelu_reference_values() {
        // torch.nn.functional.gelu (erf form) in double precision.
        for (x, want) in [
            (0.0f32, 0.0f64),
            (1.0, 0.8413447460685429),
            (-1.0, -0.15865525393145707),
            (3.0, 2.995_950_212_953_396),
        ] {
            assert!((gelu(x) as f64 - want).abs() < 1e-6, "gelu({x})");
        }
    }

    #[test]
    fn layer_norm_and_softmax() {
        let mut x: Vec<f32> = (0..384)
            .map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.0)
            .collect();
        let g = vec![1.0; 384];
        let b = vec![0.0; 384];
        layer_norm(&mut x, &g, &b, 1e-12);
        let mean: f64 = x.iter().map(|&v| v as f64).sum::<f64>() / 384.0;
        let var: f64 = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 384.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);

        let mut row = vec![1000.0, 1001.0, 999.0, -1e30];
        softmax_inplace(&mut row);
        let want = [0.24472847, 0.66524096, 0.09003057, 0.0];
        for (g, w) in row.iter().zip(want) {
            assert!((g - w).abs() < 1e-6);
        }
    }

    #[test]
    fn matmul_small() {
        // [2,3]·[3,2]
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let mut c = [1.0; 4];
        matmul(&mut c, &a, &b, 2, 3, 2, true);
        assert_eq!(c, [59.0, 65.0, 140.0, 155.0]);
        matmul(&mut c, &a, &b, 2, 3, 2, false);
        assert_eq!(c, [58.0, 64.0, 139.0, 154.0]);
    }
}
