//! Encoder weights for the GPU, read from the same `model.safetensors` as the CPU encoder
//! (whose tensors are private to it). GEMM weights and embedding tables become f16; biases and
//! LayerNorm parameters stay f32 (a few KB, and they feed f32 epilogues).
use std::path::Path;

use anyhow::{Context, Result};
use half::f16;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::model::encoder::{read_tensor, BertConfig};

pub(crate) struct HostLayer {
    /// `[3*hidden, hidden]` row-major (HF `[out, in]`): rows are Q | K | V.
    pub w_qkv: Vec<f16>,
    pub b_qkv: Vec<f32>,
    /// `[hidden, hidden]`
    pub w_attn_out: Vec<f16>,
    pub b_attn_out: Vec<f32>,
    pub ln1_g: Vec<f32>,
    pub ln1_b: Vec<f32>,
    /// `[intermediate, hidden]`
    pub w_inter: Vec<f16>,
    pub b_inter: Vec<f32>,
    /// `[hidden, intermediate]`
    pub w_out: Vec<f16>,
    pub b_out: Vec<f32>,
    pub ln2_g: Vec<f32>,
    pub ln2_b: Vec<f32>,
}

pub(crate) struct HostWeights {
    pub cfg: BertConfig,
    /// First 12 hex chars of the file's sha256, as `MiniLm::revision`.
    pub revision: String,
    pub word: Vec<f16>,
    pub pos: Vec<f16>,
    pub token_type: Vec<f16>,
    pub emb_ln_g: Vec<f32>,
    pub emb_ln_b: Vec<f32>,
    pub layers: Vec<HostLayer>,
}

fn to_f16(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

impl HostWeights {
    /// Reads `config.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: BertConfig = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("parsing {}", cfg_path.display()))?;
        let st_path = dir.join("model.safetensors");
        let file = std::fs::File::open(&st_path)
            .with_context(|| format!("opening {}", st_path.display()))?;
        // SAFETY: read-only map, dropped before returning; model files are not modified while
        // the service runs (the same contract as the CPU encoder's loader).
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", st_path.display()))?;
        let revision: String = Sha256::digest(&mmap[..])[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let name = st_path.display().to_string();
        let st = SafeTensors::deserialize(&mmap).with_context(|| format!("parsing {name}"))?;
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        // BertModel exports have no "bert." prefix; task-model exports do.
        let prefix = if st.tensor("embeddings.word_embeddings.weight").is_ok() {
            ""
        } else {
            "bert."
        };
        let get =
            |n: &str, shape: &[usize]| read_tensor(&st, &name, &format!("{prefix}{n}"), shape);
        let word = to_f16(&get(
            "embeddings.word_embeddings.weight",
            &[cfg.vocab_size, h],
        )?);
        let pos = to_f16(&get(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
        )?);
        let token_type = to_f16(&get(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, h],
        )?);
        let emb_ln_g = get("embeddings.LayerNorm.weight", &[h])?;
        let emb_ln_b = get("embeddings.LayerNorm.bias", &[h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            let g = |n: &str, shape: &[usize]| get(&format!("{p}{n}"), shape);
            // [out, in] row-major matrices stack along `out`, so Q|K|V is a concatenation.
            let mut w_qkv = g("attention.self.query.weight", &[h, h])?;
            w_qkv.extend(g("attention.self.key.weight", &[h, h])?);
            w_qkv.extend(g("attention.self.value.weight", &[h, h])?);
            let mut b_qkv = g("attention.self.query.bias", &[h])?;
            b_qkv.extend(g("attention.self.key.bias", &[h])?);
            b_qkv.extend(g("attention.self.value.bias", &[h])?);
            layers.push(HostLayer {
                w_qkv: to_f16(&w_qkv),
                b_qkv,
                w_attn_out: to_f16(&g("attention.output.dense.weight", &[h, h])?),
                b_attn_out: g("attention.output.dense.bias", &[h])?,
                ln1_g: g("attention.output.LayerNorm.weight", &[h])?,
                ln1_b: g("attention.output.LayerNorm.bias", &[h])?,
                w_inter: to_f16(&g("intermediate.dense.weight", &[inter, h])?),
                b_inter: g("intermediate.dense.bias", &[inter])?,
                w_out: to_f16(&g("output.dense.weight", &[h, inter])?),
                b_out: g("output.dense.bias", &[h])?,
                ln2_g: g("output.LayerNorm.weight", &[h])?,
                ln2_b: g("output.LayerNorm.bias", &[h])?,
            });
        }
        Ok(Self {
            cfg,
            revision,
            word,
            pos,
            token_type,
            emb_ln_g,
            emb_ln_b,
            layers,
        })
    }
}

/// Writes a MiniLM-L6-shaped model with deterministic random f16 weights (`config.json` and
/// `model.safetensors`) into `dir`, for timing without the real model. Both the CPU encoder
/// and the CUDA backend load it, so it also serves CPU-vs-GPU comparisons.
pub fn write_random_model(dir: &Path, seed: u64) -> Result<()> {
    let (h, heads, layers, inter, vocab, positions, types) = (
        384usize, 12usize, 6usize, 1536usize, 30522usize, 512usize, 2usize,
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = serde_json::json!({
        "hidden_size": h, "num_attention_heads": heads, "num_hidden_layers": layers,
        "intermediate_size": inter, "layer_norm_eps": 1e-12,
        "max_position_embeddings": positions, "vocab_size": vocab, "type_vocab_size": types,
        "hidden_act": "gelu", "position_embedding_type": "absolute",
    });
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, cfg.to_string())
        .with_context(|| format!("writing {}", cfg_path.display()))?;

    // splitmix64: reproducible without a rand dependency.
    let mut state = seed;
    let mut uniform = move |scale: f32| {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    };
    let mut tensors: Vec<crate::model::encoder::RawTensor> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, f: &mut dyn FnMut() -> f32| {
        let n: usize = shape.iter().product();
        let bytes = (0..n)
            .flat_map(|_| f16::from_f32(f()).to_le_bytes())
            .collect();
        tensors.push((name, Dtype::F16, shape, bytes));
    };
    let mut one = || 1.0f32;
    let mut zero = || 0.0f32;
    let mut w = || uniform(0.05);
    add(
        "embeddings.word_embeddings.weight".into(),
        vec![vocab, h],
        &mut w,
    );
    add(
        "embeddings.position_embeddings.weight".into(),
        vec![positions, h],
        &mut w,
    );
    add(
        "embeddings.token_type_embeddings.weight".into(),
        vec![types, h],
        &mut w,
    );
    add("embeddings.LayerNorm.weight".into(), vec![h], &mut one);
    add("embeddings.LayerNorm.bias".into(), vec![h], &mut zero);
    for l in 0..layers {
        let p = format!("encoder.layer.{l}.");
        for (n, shape) in [
            ("attention.self.query", [h, h]),
            ("attention.self.key", [h, h]),
            ("attention.self.value", [h, h]),
            ("attention.output.dense", [h, h]),
            ("intermediate.dense", [inter, h]),
            ("output.dense", [h, inter]),
        ] {
            add(format!("{p}{n}.weight"), shape.to_vec(), &mut w);
            add(format!("{p}{n}.bias"), vec![shape[0]], &mut w);
        }
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}{n}.weight"), vec![h], &mut one);
            add(format!("{p}{n}.bias"), vec![h], &mut zero);
        }
    }
    crate::model::encoder::write_safetensors(&dir.join("model.safetensors"), &tensors)
}
