//! Text in, embeddings out: tokenizer pool → embedding cache → batcher → backend. Shared by
//! the decision layer (`service`) and the offline commands. One `TextPipeline` per process.
#![forbid(unsafe_code)]
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::oneshot;

use crate::batch::{BatchError, Batcher, Fallback, JobOutput, Options, Priority};
use crate::config::Config;
use crate::engine;
use crate::metrics as m;
use crate::model::{Encoded, MiniLm, TextTokenizer, TokenizeError, TruncSide};

/// Why a text was not embedded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("tokenizer worker stopped")]
    WorkerStopped,
}

/// Texts of at least this many bytes are tokenized on a pool of their own, so that small
/// requests never queue behind them (non-ASCII text takes the `tokenizers` path, about 1 s
/// per 256 KiB).
const LARGE_TEXT: usize = 16 << 10;

/// Bytes of text in the tokenizer stage (waiting or being tokenized), bounded.
struct Backlog {
    bytes: AtomicUsize,
    cap: usize,
}

/// A text's share of the backlog, given back when its tokenizing ends (or never starts).
struct Admitted {
    backlog: Arc<Backlog>,
    bytes: usize,
}

impl Backlog {
    fn admit(self: &Arc<Self>, bytes: usize) -> Option<Admitted> {
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&n| n <= self.cap)
            })
            .ok()?;
        metrics::gauge!(m::TOKENIZE_BACKLOG).increment(bytes as f64);
        Some(Admitted {
            backlog: self.clone(),
            bytes,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.backlog.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        metrics::gauge!(m::TOKENIZE_BACKLOG).decrement(self.bytes as f64);
    }
}

/// Tokenizer pool + batcher + backend: text in, embeddings out.
pub struct TextPipeline {
    pub tokenizer: Arc<TextTokenizer>,
    tok_pool: rayon::ThreadPool,
    /// One thread for texts of [`LARGE_TEXT`] bytes or more.
    big_pool: rayon::ThreadPool,
    backlog: Arc<Backlog>,
    pub batcher: Batcher,
    pub model_revision: String,
    /// The revision these weights were exported from, when they are an f16 export.
    pub model_source_revision: Option<String>,
    /// The backend's arithmetic (`Backend::numerics`), e.g. "bf16".
    pub numerics: &'static str,
    cache: EmbeddingCache,
    /// The weights, kept for Route's fast path when it is on and a student fits them.
    student: Option<Arc<MiniLm>>,
}

/// Route's fast path, after tokenizing once: the embedding already cached, or the static
/// student's with the tokens kept for the encoder in case the caller defers.
pub enum FastEncoded {
    Cached(EncodedInput),
    Student(StudentEncoded),
}

pub struct StudentEncoded {
    pub embedding: Vec<f32>,
    pub enc_len: usize,
    pub truncated: bool,
    /// Tokenizing and the student together.
    pub tokenize: Duration,
    enc: Encoded,
    key: CacheKey,
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
            Input::Single(t, side) => return Self::key_single(t, *side),
            Input::Answer(t, limit) => {
                h.update([1u8, 0]);
                h.update((*limit as u64).to_le_bytes());
                h.update(t.as_bytes());
            }
        }
        h.finalize().into()
    }

    /// `key(&Input::Single(text, side))` without owning the text.
    fn key_single(text: &str, side: TruncSide) -> CacheKey {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update([0u8, side as u8]);
        h.update(0u64.to_le_bytes());
        h.update(text.as_bytes());
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

/// What one input became: its embedding plus the timings of each stage.
#[derive(Debug)]
pub struct EncodedInput {
    pub enc_len: usize,
    pub truncated: bool,
    pub embedding: Vec<f32>,
    pub tokenize: Duration,
    pub queue: Duration,
    pub inference: Duration,
}

impl TextPipeline {
    pub fn start(cfg: &Config) -> Result<TextPipeline> {
        let tokenizer = TextTokenizer::from_file(
            &cfg.model_dir.join("tokenizer.json"),
            cfg.batch.max_input_tokens,
            // Pairs are not encoded jointly by the service; this bounds encode_pair and the
            // answers, which may be longer than prompts (they were cut to max_input_tokens).
            cfg.batch.max_input_tokens.max(cfg.batch.max_answer_tokens),
        )
        .map_err(|e| anyhow::anyhow!("{e} (run scripts/setup-model.sh)"))?;
        let model = Arc::new(load_model(&cfg.model_dir)?);
        let model_revision = model.revision().to_string();
        let model_source_revision = model.source_revision().map(String::from);
        let student = match (cfg.policy.fast_path_stability, model.student()) {
            (None, _) => None,
            (Some(_), Some(_)) => Some(model.clone()),
            (Some(_), None) => {
                tracing::warn!(
                    revision = %model_revision,
                    "policy.fast_path_stability is set but no static student fits these weights \
                     (tiergate distill-static): Route's fast path is off"
                );
                None
            }
        };
        let (backend, fallback) = engine::select_with_fallback(
            cfg.backend,
            model,
            &cfg.model_dir,
            cfg.compute_threads(),
            cfg.precision,
        )?;
        let numerics = backend.numerics();
        let limits = cfg.batch.limits_for(backend.device());
        let h = &cfg.health;
        let opts = Options {
            max_consecutive_faults: h.max_consecutive_faults,
            watchdog: (h.batch_watchdog_s > 0).then(|| Duration::from_secs(h.batch_watchdog_s)),
            max_queue_delay: cfg.batch.max_queue_delay(),
            // The fallback runs on the CPU.
            fallback: fallback.map(|build| Fallback {
                build,
                limits: cfg.batch.limits_for(crate::base::Device::Cpu),
            }),
        };
        let batcher = Batcher::start_with(backend, limits, opts)?;
        let tok_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.tokenize)
            .thread_name(|i| format!("tiergate-tok-{i}"))
            .build()
            .context("tokenizer thread pool")?;
        let big_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "tiergate-tok-large".into())
            .build()
            .context("tokenizer thread pool (large texts)")?;
        Ok(TextPipeline {
            tokenizer: Arc::new(tokenizer),
            tok_pool,
            big_pool,
            backlog: Arc::new(Backlog {
                bytes: AtomicUsize::new(0),
                cap: cfg.batch.max_tokenize_bytes,
            }),
            batcher,
            model_revision,
            model_source_revision,
            numerics,
            cache: EmbeddingCache {
                cap: cfg.batch.embedding_cache,
                inner: Default::default(),
            },
            student,
        })
    }

    /// Whether Route's fast path can run (on at start, and a student fits the weights).
    pub fn has_student(&self) -> bool {
        self.student.is_some()
    }

    pub fn dim(&self) -> usize {
        self.batcher.dim()
    }

    /// Whether heads fitted on encoder revision `rev` fit these weights: the same weights, or
    /// the weights this f16 export was made from.
    pub fn fits_revision(&self, rev: &str) -> bool {
        crate::model::encoder::revision_fits(
            &self.model_revision,
            self.model_source_revision.as_deref(),
            rev,
        )
    }

    /// Runs `f` on a text of `bytes` bytes on a tokenizer pool, off the async runtime, once
    /// the text is admitted to the bounded backlog (else RESOURCE_EXHAUSTED at once). Work
    /// whose client left or whose deadline passed while it waited is skipped, and a panic
    /// becomes this request's error: the pool and the process live on.
    async fn on_pool<T: Send + 'static>(
        &self,
        bytes: usize,
        deadline: Option<Instant>,
        f: impl FnOnce(&TextTokenizer) -> Result<T, EncodeError> + Send + 'static,
    ) -> Result<T, EncodeError> {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            metrics::counter!(m::DROPPED, "reason" => "deadline", "stage" => "tokenize")
                .increment(1);
            return Err(BatchError::DeadlineExceeded.into());
        }
        let admitted = self.backlog.admit(bytes).ok_or_else(|| {
            metrics::counter!(m::DROPPED, "reason" => "tokenizer_backlog", "stage" => "tokenize")
                .increment(1);
            EncodeError::Batch(BatchError::Overloaded(format!(
                "tokenizer backlog full ({} bytes, batch.max_tokenize_bytes)",
                self.backlog.cap
            )))
        })?;
        let (tx, rx) = oneshot::channel();
        let tok = self.tokenizer.clone();
        let pool = if bytes >= LARGE_TEXT {
            &self.big_pool
        } else {
            &self.tok_pool
        };
        pool.spawn(move || {
            let _admitted = admitted;
            if tx.is_closed() {
                metrics::counter!(m::DROPPED, "reason" => "client_gone", "stage" => "tokenize")
                    .increment(1);
                return;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                metrics::counter!(m::DROPPED, "reason" => "deadline", "stage" => "tokenize")
                    .increment(1);
                let _ = tx.send(Err(BatchError::DeadlineExceeded.into()));
                return;
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&tok)))
                .unwrap_or_else(|_| {
                    Err(EncodeError::Batch(BatchError::Internal(
                        "the tokenizer panicked on this input".into(),
                    )))
                });
            // The text's share of the backlog is free once tokenized: give it back before the
            // reply, so a caller that sees the reply never sees the share still taken.
            drop(_admitted);
            let _ = tx.send(r);
        });
        rx.await.map_err(|_| EncodeError::WorkerStopped)?
    }

    pub async fn tokenize_single(
        &self,
        text: String,
        side: TruncSide,
        deadline: Option<Instant>,
    ) -> Result<Encoded, EncodeError> {
        self.on_pool(text.len(), deadline, move |t| {
            Ok(t.encode_single(&text, side)?)
        })
        .await
    }

    pub async fn tokenize_answer(
        &self,
        answer: String,
        limit: usize,
        deadline: Option<Instant>,
    ) -> Result<Encoded, EncodeError> {
        self.on_pool(answer.len(), deadline, move |t| {
            Ok(t.encode_answer(&answer, limit)?)
        })
        .await
    }

    /// Tokenizes (single text or pair) and embeds through the batcher.
    pub async fn encode(
        &self,
        rpc: &'static str,
        input: Input,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<EncodedInput, EncodeError> {
        let t0 = Instant::now();
        let key = EmbeddingCache::key(&input);
        if let Some(e) = self.cached(&key) {
            return Ok(e);
        }
        let enc = match input {
            Input::Single(text, side) => self.tokenize_single(text, side, deadline).await?,
            Input::Answer(a, limit) => self.tokenize_answer(a, limit, deadline).await?,
        };
        let tokenize = t0.elapsed();
        record_tokenized(rpc, tokenize, enc.truncated);
        self.embed_tokens(key, enc, tokenize, priority, deadline)
            .await
    }

    /// The cached embedding of `key`, if any, counted as a cache hit or miss.
    fn cached(&self, key: &CacheKey) -> Option<EncodedInput> {
        let Some((enc_len, truncated, embedding)) = self.cache.get(key) else {
            metrics::counter!(m::EMBEDDING_CACHE, "result" => "miss").increment(1);
            return None;
        };
        metrics::counter!(m::EMBEDDING_CACHE, "result" => "hit").increment(1);
        Some(EncodedInput {
            enc_len,
            truncated,
            embedding: embedding.to_vec(),
            tokenize: Duration::ZERO,
            queue: Duration::ZERO,
            inference: Duration::ZERO,
        })
    }

    /// Route's fast path: the cached embedding if there is one, else the prompt tokenized
    /// once and the static student's embedding of it, on the tokenizer pool. An internal
    /// error when the fast path is off (`has_student`).
    pub async fn encode_fast(
        &self,
        rpc: &'static str,
        text: String,
        side: TruncSide,
        deadline: Option<Instant>,
    ) -> Result<FastEncoded, EncodeError> {
        let Some(model) = self.student.clone() else {
            return Err(BatchError::Internal("Route's fast path is off".into()).into());
        };
        let t0 = Instant::now();
        let key = EmbeddingCache::key_single(&text, side);
        if let Some(e) = self.cached(&key) {
            return Ok(FastEncoded::Cached(e));
        }
        let (enc, emb) = self
            .on_pool(text.len(), deadline, move |t| {
                let enc = t.encode_single(&text, side)?;
                let emb = model.student_embed(&enc.ids);
                Ok((enc, emb))
            })
            .await?;
        let tokenize = t0.elapsed();
        record_tokenized(rpc, tokenize, enc.truncated);
        // `self.student` is only kept when a student fits, so this is never None.
        let embedding = emb
            .ok_or_else(|| EncodeError::Batch(BatchError::Internal("no static student".into())))?;
        Ok(FastEncoded::Student(StudentEncoded {
            embedding,
            enc_len: enc.ids.len(),
            truncated: enc.truncated,
            tokenize,
            enc,
            key,
        }))
    }

    /// The encoder's embedding of a text the fast path deferred, from its kept tokens.
    pub async fn encode_deferred(
        &self,
        s: StudentEncoded,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<EncodedInput, EncodeError> {
        self.embed_tokens(s.key, s.enc, s.tokenize, priority, deadline)
            .await
    }

    /// The encoder's embedding of tokens, through the batcher, then cached.
    async fn embed_tokens(
        &self,
        key: CacheKey,
        enc: Encoded,
        tokenize: Duration,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<EncodedInput, EncodeError> {
        let enc_len = enc.ids.len();
        let truncated = enc.truncated;
        let JobOutput {
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

/// Tokenizing's metrics, once per text tokenized.
fn record_tokenized(rpc: &'static str, tokenize: Duration, truncated: bool) {
    metrics::histogram!(m::TOKENIZE_SECONDS).record(tokenize.as_secs_f64());
    if truncated {
        metrics::counter!(m::TRUNCATIONS, "rpc" => rpc).increment(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(max_tokenize_bytes: usize) -> TextPipeline {
        let mut cfg = Config::embedded().expect("embedded config");
        cfg.batch.max_tokenize_bytes = max_tokenize_bytes;
        TextPipeline::start(&cfg).expect("pipeline (run scripts/setup-model.sh)")
    }

    /// Prompts cut to 64 tokens leave answers their own limit (they were cut to 64 too, while
    /// the heads read 128).
    #[tokio::test]
    async fn answers_keep_their_limit_when_prompts_are_shorter() {
        let mut cfg = Config::embedded().expect("embedded config");
        cfg.batch.max_input_tokens = 64;
        cfg.validate().expect("a valid config");
        let p = TextPipeline::start(&cfg).expect("pipeline (run scripts/setup-model.sh)");
        let long = "the answer is forty two ".repeat(100);
        let a = p
            .tokenize_answer(long.clone(), 128, None)
            .await
            .expect("answer");
        assert_eq!(a.ids.len(), 128);
        let s = p
            .tokenize_single(long, TruncSide::HeadTail, None)
            .await
            .expect("prompt");
        assert_eq!(s.ids.len(), 64);
    }

    #[tokio::test]
    async fn a_panic_while_tokenizing_is_that_requests_error() {
        let p = pipeline(1 << 20);
        let e = p
            .on_pool(10, None, |_| -> Result<(), EncodeError> {
                panic!("a tokenizer bug on a crafted input")
            })
            .await
            .expect_err("the panic is an error");
        assert!(
            matches!(e, EncodeError::Batch(BatchError::Internal(_))),
            "{e:?}"
        );
        // The pool lives on and the text's share of the backlog came back.
        let ok = p
            .tokenize_single("still tokenizing".into(), TruncSide::HeadTail, None)
            .await
            .expect("tokenize");
        assert!(ok.ids.len() > 2);
        assert_eq!(p.backlog.bytes.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn no_tokenizing_past_the_deadline_or_beyond_the_backlog() {
        let p = pipeline(1000);
        let past = Some(Instant::now());
        let e = p
            .encode(
                "route",
                Input::Single("x".repeat(10), TruncSide::HeadTail),
                Priority::Normal,
                past,
            )
            .await
            .expect_err("deadline passed");
        assert!(
            matches!(e, EncodeError::Batch(BatchError::DeadlineExceeded)),
            "{e:?}"
        );
        // 1,001 bytes never fit a 1,000-byte backlog: refused before any work.
        let e = p
            .tokenize_single("y".repeat(1001), TruncSide::HeadTail, None)
            .await
            .expect_err("over the backlog");
        assert!(
            matches!(e, EncodeError::Batch(BatchError::Overloaded(_))),
            "{e:?}"
        );
        // While 600 bytes are admitted, another 600 are not; once they are released, they are.
        let held = p.backlog.admit(600).expect("room");
        assert!(p.backlog.admit(600).is_none());
        drop(held);
        assert!(p.backlog.admit(600).is_some());
        assert_eq!(p.backlog.bytes.load(Ordering::Acquire), 0);
    }
}
