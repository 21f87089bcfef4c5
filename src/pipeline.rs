//! The data path shared by the server and the offline commands: tokenizer pool → batcher →
//! backend → heads. One `Pipeline` per process.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::oneshot;

use crate::batch::{Batcher, Embedded, Priority};
use crate::config::Config;
use crate::engine;
use crate::error::TgError;
use crate::metrics as m;
use crate::model::encoder::MiniLm;
use crate::model::heads::Heads;
use crate::model::tokenize::{Encoded, TextTokenizer, TruncSide};
use crate::policy::Catalog;

/// Tokenizer pool + batcher + backend: text in, embeddings out.
pub struct Encoder {
    pub tokenizer: Arc<TextTokenizer>,
    tok_pool: rayon::ThreadPool,
    pub batcher: Batcher,
    pub model_revision: String,
    /// The backend's arithmetic (`Backend::numerics`), e.g. "bf16".
    pub numerics: &'static str,
    cache: EmbeddingCache,
}

/// Recent embeddings by input: a gateway's Verify after Route sends the same prompt again,
/// and retried or repeated prompts are common. Bounded, first-in first-out. Keyed by a
/// SHA-256 of the input, so one client cannot craft a text that collides with another's
/// and be served its embedding (a 64-bit unkeyed hash would allow that).
struct EmbeddingCache {
    cap: usize,
    inner: std::sync::Mutex<(
        std::collections::HashMap<CacheKey, CachedEmbedding>,
        std::collections::VecDeque<CacheKey>,
    )>,
}

type CacheKey = [u8; 32];

/// (tokens, truncated, embedding).
type CachedEmbedding = (usize, bool, Arc<Vec<f32>>);

impl EmbeddingCache {
    fn key(input: &Input) -> CacheKey {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        // A fixed-width prefix (kind, option) before the text: no two inputs share bytes.
        match input {
            Input::Single(t, side) => {
                h.update([0u8, *side as u8]);
                h.update(0u64.to_le_bytes());
                h.update(t.as_bytes());
            }
            Input::Answer(t, limit) => {
                h.update([1u8, 0]);
                h.update((*limit as u64).to_le_bytes());
                h.update(t.as_bytes());
            }
        }
        h.finalize().into()
    }

    fn get(&self, k: &CacheKey) -> Option<CachedEmbedding> {
        if self.cap == 0 {
            return None;
        }
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.get(k).cloned()
    }

    fn put(&self, k: CacheKey, v: CachedEmbedding) {
        if self.cap == 0 {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.0.insert(k, v).is_none() {
            g.1.push_back(k);
            while g.1.len() > self.cap {
                if let Some(old) = g.1.pop_front() {
                    g.0.remove(&old);
                }
            }
        }
    }
}

/// The encoder plus the heads and catalog that turn embeddings into decisions.
pub struct Pipeline {
    pub enc: Encoder,
    pub heads: Arc<Heads>,
    pub catalog: Catalog,
}

/// What one input became: its embedding plus the timings of each stage.
pub struct EncodedInput {
    pub enc_len: usize,
    pub truncated: bool,
    pub embedding: Vec<f32>,
    pub tokenize: Duration,
    pub queue: Duration,
    pub inference: Duration,
}

impl Pipeline {
    pub fn start(cfg: &Config) -> Result<Pipeline> {
        let heads = Heads::load(&cfg.heads)?;
        Self::start_with_heads(cfg, heads)
    }

    pub fn start_with_heads(cfg: &Config, heads: Heads) -> Result<Pipeline> {
        let catalog = Catalog::build(cfg, &heads)?;
        let enc = Encoder::start(cfg)?;
        if enc.dim() != heads.dim {
            anyhow::bail!(
                "heads have dim {} but the encoder has {}",
                heads.dim,
                enc.dim()
            );
        }
        // Other truncation limits are allowed (shorter is faster) but shift what the heads see.
        for (key, serving, fitted) in [
            (
                "batch.max_input_tokens",
                cfg.batch.max_input_tokens,
                heads.max_input_tokens,
            ),
            (
                "batch.max_answer_tokens",
                cfg.batch.max_answer_tokens,
                heads.max_answer_tokens,
            ),
        ] {
            if serving != fitted {
                tracing::warn!(
                    key,
                    serving,
                    fitted,
                    "the heads were fitted at another truncation limit; probabilities may drift"
                );
            }
        }
        if enc.model_revision != heads.encoder_revision {
            tracing::warn!(
                encoder = %enc.model_revision,
                heads = %heads.encoder_revision,
                "heads were fitted on another encoder revision"
            );
        }
        Ok(Pipeline {
            enc,
            heads: Arc::new(heads),
            catalog,
        })
    }

    pub fn revision(&self) -> String {
        format!("{}+{}", self.enc.model_revision, self.heads.revision)
    }

    pub async fn encode(
        &self,
        rpc: &'static str,
        input: Input,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<EncodedInput, TgError> {
        self.enc.encode(rpc, input, priority, deadline).await
    }
}

impl Encoder {
    pub fn start(cfg: &Config) -> Result<Encoder> {
        let tokenizer = TextTokenizer::from_file(
            &cfg.model_dir.join("tokenizer.json"),
            cfg.batch.max_input_tokens,
            // Pairs are not encoded jointly by the service; the limit only bounds encode_pair.
            cfg.batch.max_input_tokens,
        )
        .map_err(|e| anyhow::anyhow!("{e} (run scripts/setup-model.sh)"))?;
        let model = load_model(&cfg.model_dir)?;
        let model_revision = model.revision().to_string();
        let backend = engine::select(
            cfg.backend,
            Arc::new(model),
            &cfg.model_dir,
            cfg.compute_threads(),
            cfg.precision,
        )?;
        let numerics = backend.numerics();
        let limits = cfg.batch.limits_for(backend.name());
        let batcher = Batcher::start(backend, limits)?;
        let tok_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.tokenize)
            .thread_name(|i| format!("tiergate-tok-{i}"))
            .build()
            .context("tokenizer thread pool")?;
        Ok(Encoder {
            tokenizer: Arc::new(tokenizer),
            tok_pool,
            batcher,
            model_revision,
            numerics,
            cache: EmbeddingCache {
                cap: cfg.batch.embedding_cache,
                inner: Default::default(),
            },
        })
    }

    pub fn dim(&self) -> usize {
        self.batcher.dim()
    }

    /// Runs `f` on the tokenizer pool, off the async runtime.
    async fn on_pool<T: Send + 'static>(
        &self,
        f: impl FnOnce(&TextTokenizer) -> Result<T, TgError> + Send + 'static,
    ) -> Result<T, TgError> {
        let (tx, rx) = oneshot::channel();
        let tok = self.tokenizer.clone();
        self.tok_pool.spawn(move || {
            let _ = tx.send(f(&tok));
        });
        rx.await
            .map_err(|_| TgError::Internal("tokenizer worker stopped".into()))?
    }

    pub async fn tokenize_single(&self, text: String, side: TruncSide) -> Result<Encoded, TgError> {
        self.on_pool(move |t| t.encode_single(&text, side)).await
    }

    pub async fn tokenize_answer(&self, answer: String, limit: usize) -> Result<Encoded, TgError> {
        self.on_pool(move |t| t.encode_answer(&answer, limit)).await
    }

    /// Tokenizes (single text or pair) and embeds through the batcher.
    pub async fn encode(
        &self,
        rpc: &'static str,
        input: Input,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<EncodedInput, TgError> {
        let t0 = Instant::now();
        let key = EmbeddingCache::key(&input);
        if let Some((enc_len, truncated, embedding)) = self.cache.get(&key) {
            metrics::counter!(m::EMBEDDING_CACHE, "result" => "hit").increment(1);
            return Ok(EncodedInput {
                enc_len,
                truncated,
                embedding: embedding.to_vec(),
                tokenize: Duration::ZERO,
                queue: Duration::ZERO,
                inference: Duration::ZERO,
            });
        }
        metrics::counter!(m::EMBEDDING_CACHE, "result" => "miss").increment(1);
        let enc = match input {
            Input::Single(text, side) => self.tokenize_single(text, side).await?,
            Input::Answer(a, limit) => self.tokenize_answer(a, limit).await?,
        };
        let tokenize = t0.elapsed();
        metrics::histogram!(m::TOKENIZE_SECONDS).record(tokenize.as_secs_f64());
        if enc.truncated {
            metrics::counter!(m::TRUNCATIONS, "rpc" => rpc).increment(1);
        }
        let enc_len = enc.ids.len();
        let truncated = enc.truncated;
        let Embedded {
            embedding,
            queue,
            inference,
            ..
        } = self
            .batcher
            .embed(enc.ids, enc.type_ids, priority, deadline)
            .await?;
        self.cache
            .put(key, (enc_len, truncated, Arc::new(embedding.clone())));
        Ok(EncodedInput {
            enc_len,
            truncated,
            embedding,
            tokenize,
            queue,
            inference,
        })
    }
}

pub enum Input {
    Single(String, TruncSide),
    /// An answer on its own, mostly its tail, at most this many tokens.
    Answer(String, usize),
}

pub fn load_model(dir: &Path) -> Result<MiniLm> {
    MiniLm::load(dir).with_context(|| {
        format!(
            "loading the encoder from {} (run scripts/setup-model.sh)",
            dir.display()
        )
    })
}
