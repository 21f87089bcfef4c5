//! Micro-benchmarks of the request path's parts: tokenization, the encoder forward pass by
//! batch shape, the heads, and the batcher's own overhead per request.
//!
//! `cargo bench --bench micro` (needs models/base from scripts/setup-model.sh, and
//! models/heads.json for the heads group). Speed is measured here, never asserted in tests.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use divan::{black_box, Bencher};
use tiergate::base::dot;
use tiergate::base::{Backend, PackedBatch};
use tiergate::batch::{Batcher, Limits, Priority};
use tiergate::engine::cpu::CpuBackend;
use tiergate::model::encoder::{MiniLm, Precision};
use tiergate::model::heads::Heads;
use tiergate::model::tokenize::{TextTokenizer, TruncSide};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> &'static Arc<MiniLm> {
    static M: OnceLock<Arc<MiniLm>> = OnceLock::new();
    M.get_or_init(|| match MiniLm::load(&root().join("models/base")) {
        Ok(m) => Arc::new(m),
        Err(e) => panic!("{e:#}"),
    })
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The server's backend: its own pool over all cores (the default `threads.compute = 0`).
fn backend() -> &'static Mutex<CpuBackend> {
    static B: OnceLock<Mutex<CpuBackend>> = OnceLock::new();
    B.get_or_init(
        || match CpuBackend::new(model().clone(), threads(), Precision::Auto) {
            Ok(b) => Mutex::new(b),
            Err(e) => panic!("{e}"),
        },
    )
}

/// `n` sequences of `len` tokens: [CLS] ... [SEP] with ordinary word-piece ids in between.
fn batch(n: usize, len: usize) -> PackedBatch {
    let mut b = PackedBatch::new();
    for s in 0..n {
        let mut ids = vec![101u32];
        ids.extend((0..len - 2).map(|i| 2000 + ((i * 37 + s * 101) % 20_000) as u32));
        ids.push(102);
        b.push(&ids, &vec![0; len]);
    }
    b
}

const PARAGRAPH: &str = "The following are multiple choice questions (with answers) about \
    physics. Think step by step and then finish your answer with \"the answer is (X)\" where X \
    is the correct letter choice. A 2 kg block slides down a frictionless incline of 30 degrees \
    starting from rest; how fast is it moving after travelling 4 metres along the slope? ";

mod tokenize {
    use super::*;

    fn tok() -> &'static TextTokenizer {
        static T: OnceLock<TextTokenizer> = OnceLock::new();
        T.get_or_init(|| {
            match TextTokenizer::from_file(&root().join("models/base/tokenizer.json"), 256, 384) {
                Ok(t) => t,
                Err(e) => panic!("{e}"),
            }
        })
    }

    /// Repeats of PARAGRAPH (~75 tokens each): 1 fits, 4 is ~300 tokens (truncated to 256),
    /// 40 is a ~12 KB prompt (the truncation path on a long input).
    #[divan::bench(args = [1, 4, 40])]
    fn encode_single(b: Bencher<'_, '_>, repeats: usize) {
        let text = PARAGRAPH.repeat(repeats);
        b.counter(divan::counter::BytesCount::new(text.len()))
            .bench(|| tok().encode_single(black_box(&text), TruncSide::HeadTail));
    }

    /// The same through the tokenizers crate alone (the path before the ASCII fast path, and
    /// still the one for non-ASCII text): the peer of `encode_single`.
    #[divan::bench(args = [1, 4, 40])]
    fn encode_single_crate_only(b: Bencher<'_, '_>, repeats: usize) {
        static T: OnceLock<TextTokenizer> = OnceLock::new();
        let t = T.get_or_init(|| {
            match TextTokenizer::from_file(&root().join("models/base/tokenizer.json"), 256, 384) {
                Ok(t) => t.crate_only(),
                Err(e) => panic!("{e}"),
            }
        });
        let text = PARAGRAPH.repeat(repeats);
        b.counter(divan::counter::BytesCount::new(text.len()))
            .bench(|| t.encode_single(black_box(&text), TruncSide::HeadTail));
    }

    /// The ASCII WordPiece reference the GPU kernel mirrors (model::wordpiece), on the same
    /// text as `encode_single` (raw ids, no truncation): a peer for the tokenizers crate.
    #[divan::bench(args = [1, 4, 40])]
    fn wordpiece_ascii(b: Bencher<'_, '_>, repeats: usize) {
        static W: OnceLock<tiergate::model::wordpiece::WordPieceTable> = OnceLock::new();
        let w = W.get_or_init(|| {
            let p = root().join("models/base/tokenizer.json");
            match tiergate::model::wordpiece::WordPieceTable::from_file(&p) {
                Ok(t) => t,
                Err(e) => panic!("{e:#}"),
            }
        });
        let text = PARAGRAPH.repeat(repeats);
        b.counter(divan::counter::BytesCount::new(text.len()))
            .bench(|| w.encode_ascii(black_box(&text)));
    }

    #[divan::bench]
    fn encode_pair(b: Bencher<'_, '_>) {
        let (p, a) = (PARAGRAPH.repeat(2), PARAGRAPH.repeat(3));
        b.bench(|| tok().encode_pair(black_box(&p), black_box(&a)));
    }
}

mod encoder {
    use super::*;

    /// (sequences, tokens each). Throughput is reported in sequences.
    const SHAPES: [(usize, usize); 5] = [(1, 32), (1, 64), (1, 128), (8, 128), (32, 128)];

    #[divan::bench(args = SHAPES, max_time = 4)]
    fn forward(b: Bencher<'_, '_>, (n, len): (usize, usize)) {
        let batch = batch(n, len);
        let Ok(mut be) = backend().lock() else {
            panic!("backend lock poisoned")
        };
        b.counter(divan::counter::ItemsCount::new(n))
            .bench_local(|| be.embed(black_box(&batch)));
    }

    /// Route's fast path: the static student's embedding of one sequence of `len` tokens.
    #[divan::bench(args = [64, 186, 256])]
    fn student(b: Bencher<'_, '_>, len: usize) {
        let batch = batch(1, len);
        let m = model();
        if m.student().is_none() {
            eprintln!("skipped: no static student fits these weights");
            return;
        }
        b.bench(|| m.student_embed(black_box(&batch.ids)));
    }
}

/// The linear-layer kernels alone on the FFN-in shape (tokens × 384 → 1536): the divan
/// throughput is in FLOP (2·m·k·n per call), so bf16, int8 and f32 read as GFLOP/s (int8: 2·MACs/s) side by side.
mod linear {
    use super::*;
    use tiergate::model::{bf16, int8};

    const M: [usize; 2] = [64, 1024];
    const K: usize = 384;
    const N: usize = 1536;

    fn data(m: usize) -> (Vec<f32>, Vec<f32>) {
        let a = (0..m * K)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let w = (0..K * N)
            .map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        (a, w)
    }

    fn pool() -> &'static rayon::ThreadPool {
        static P: OnceLock<rayon::ThreadPool> = OnceLock::new();
        P.get_or_init(|| {
            match rayon::ThreadPoolBuilder::new()
                .num_threads(threads())
                .build()
            {
                Ok(p) => p,
                Err(e) => panic!("{e}"),
            }
        })
    }

    #[divan::bench(args = M, max_time = 3)]
    fn bf16_packed(b: Bencher<'_, '_>, m: usize) {
        if !bf16::available() {
            eprintln!("linear::bf16_packed skipped: no AVX512-BF16");
            return;
        }
        let (a, w) = data(m);
        let packed = bf16::PackedB::pack(&w, K, N);
        let mut c = vec![0.0f32; m * N];
        b.counter(divan::counter::ItemsCount::new(2 * m * K * N))
            .bench_local(|| {
                pool().install(|| bf16::matmul(&mut c, black_box(&a), &packed, m, false))
            });
    }

    #[divan::bench(args = M, max_time = 3)]
    fn int8_packed(b: Bencher<'_, '_>, m: usize) {
        let (a, w) = data(m);
        let packed = int8::PackedI8::pack(&w, K, N);
        let mut c = vec![0.0f32; m * N];
        b.counter(divan::counter::ItemsCount::new(2 * m * K * N))
            .bench_local(|| {
                pool().install(|| int8::matmul(&mut c, black_box(&a), &packed, m, false))
            });
    }

    /// One named kernel (skipped where this CPU lacks it), beside what `int8_packed` runs.
    fn int8_on(b: Bencher<'_, '_>, m: usize, kern: int8::Kernel) {
        if !int8::kernels().contains(&kern) {
            return;
        }
        let (a, w) = data(m);
        let packed = int8::PackedI8::pack_for(kern, &w, K, N);
        let mut c = vec![0.0f32; m * N];
        b.counter(divan::counter::ItemsCount::new(2 * m * K * N))
            .bench_local(|| {
                pool().install(|| int8::matmul_on(kern, &mut c, black_box(&a), &packed, m, false))
            });
    }

    /// The AVX2 kernel, what AVX2-only CPUs run.
    #[divan::bench(args = M, max_time = 3)]
    fn int8_packed_avx2(b: Bencher<'_, '_>, m: usize) {
        int8_on(b, m, int8::Kernel::Avx2);
    }

    /// The AVX-VNNI kernel (ymm), what AVX-VNNI CPUs without AVX-512 run.
    #[divan::bench(args = M, max_time = 3)]
    fn int8_packed_avx_vnni(b: Bencher<'_, '_>, m: usize) {
        int8_on(b, m, int8::Kernel::AvxVnni);
    }

    #[divan::bench(args = M, max_time = 3)]
    fn f32_gemm(b: Bencher<'_, '_>, m: usize) {
        let (a, w) = data(m);
        let mut c = vec![0.0f32; m * N];
        b.counter(divan::counter::ItemsCount::new(2 * m * K * N))
            .bench_local(|| {
                pool().install(|| {
                    tiergate::model::encoder::matmul(&mut c, black_box(&a), &w, m, K, N, false)
                })
            });
    }
}

mod heads {
    use super::*;

    fn heads() -> &'static Heads {
        static H: OnceLock<Heads> = OnceLock::new();
        H.get_or_init(|| match Heads::load(&root().join("models/heads.json")) {
            Ok(h) => h,
            Err(e) => panic!("{e:#}"),
        })
    }

    fn unit(dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 40.0)
            .collect();
        let n = dot(&v, &v).sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    #[divan::bench]
    fn dot_384(b: Bencher<'_, '_>) {
        let (x, y) = (unit(384), unit(384));
        b.bench(|| dot(black_box(&x), black_box(&y)));
    }

    /// One Route decision's head work as the server does it: the prompt's projection once,
    /// then p_pass for every model the heads know.
    #[divan::bench]
    fn route_p_all_models(b: Bencher<'_, '_>) {
        let h = heads();
        let e = unit(h.dim);
        let names: Vec<&String> = h.models.keys().collect();
        b.counter(divan::counter::ItemsCount::new(names.len()))
            .bench(|| {
                let pf = h.router.prompt_features(black_box(&e));
                names
                    .iter()
                    .map(|m| {
                        let z = h.router.logit_from(&pf, h.router.ability(m));
                        1.0 / (1.0 + (-(z as f64)).exp())
                    })
                    .sum::<f64>()
            });
    }

    /// One Verify decision's head work on a long multiple-choice pair (an MMLU-Pro-sized
    /// prompt with ten options, a ~2,000-character chain of thought): the text features
    /// (options parsed, pick found, repetition counted) plus the logistic head.
    #[divan::bench]
    fn verify_p_mc_pair(b: Bencher<'_, '_>) {
        let h = heads();
        let e = unit(h.dim);
        let opts: Vec<String> = (0..10)
            .map(|i| format!("\"{} metres per second, option {i}\"", 3 * i + 7))
            .collect();
        let prompt = format!(
            "{}\nOptions: [{}]",
            "A ball is thrown upwards at 20 m/s. What is its speed after 1.5 s? ".repeat(6),
            opts.join(", ")
        );
        let answer = format!(
            "{}The answer is (C).",
            "Using v = u - g t with g = 9.8 m/s^2 gives v = 20 - 14.7 = 5.3 m/s. ".repeat(30)
        );
        let model = h.models.keys().next().cloned().unwrap_or_default();
        let a = tiergate::model::heads::AnswerInput {
            text: &answer,
            prompt: &prompt,
            embedding: &e,
            truncated: false,
        };
        b.bench(|| h.verify_p(&model, black_box(&e), black_box(&a)));
    }
}

/// The batcher's cost per request: the same 1-sequence batch through `Batcher` (queue, forming
/// thread, backend thread, oneshot reply) against a direct `embed` on an identical backend.
/// The difference of the two is the overhead.
mod batcher {
    use super::*;

    fn batcher() -> &'static Batcher {
        static B: OnceLock<Batcher> = OnceLock::new();
        B.get_or_init(|| {
            let be = match CpuBackend::new(model().clone(), threads(), Precision::Auto) {
                Ok(b) => b,
                Err(e) => panic!("{e}"),
            };
            let b = Batcher::start(
                Box::new(be),
                Limits {
                    max_batch_tokens: 8192,
                    max_batch_requests: 64,
                    max_queue: 1024,
                },
            );
            match b {
                Ok(b) => b,
                Err(e) => panic!("{e}"),
            }
        })
    }

    const LENS: [usize; 2] = [2, 32];

    #[divan::bench(args = LENS)]
    fn direct(b: Bencher<'_, '_>, len: usize) {
        let batch = batch(1, len);
        let Ok(mut be) = backend().lock() else {
            panic!("backend lock poisoned")
        };
        b.bench_local(|| be.embed(black_box(&batch)));
    }

    #[divan::bench(args = LENS)]
    fn via_batcher(b: Bencher<'_, '_>, len: usize) {
        let batch = batch(1, len);
        let bt = batcher();
        b.bench_local(|| {
            let rx = bt.submit(
                batch.ids.clone(),
                batch.type_ids.clone(),
                Priority::Normal,
                None,
            );
            match rx {
                Ok(rx) => rx.blocking_recv().ok(),
                Err(e) => panic!("{e}"),
            }
        });
    }
}

fn main() {
    let base = root().join("models/base");
    if !Path::new(&base).join("model.safetensors").exists() {
        eprintln!(
            "micro: {} missing; run scripts/setup-model.sh",
            base.display()
        );
        return;
    }
    divan::main();
}
