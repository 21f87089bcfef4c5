//! The CUDA backend. Runs everywhere: kernel sources are compiled by NVRTC whenever libnvrtc
//! loads (no GPU needed; `scripts/nvrtc-env.sh` puts the PyPI wheel on LD_LIBRARY_PATH), and
//! without a GPU `backend = auto` must fall back to the CPU. With a GPU, each kernel is checked
//! against its CPU reference in `model::encoder` and the whole backend against the CPU backend.
//! Tests that need a GPU are `#[ignore = "needs a CUDA GPU"]` (the summary counts them as
//! ignored); scripts/test.sh runs them where a GPU is present.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tiergate::base::{cosine, sigmoid, Backend, BackendError, Device, PackedBatch};
use tiergate::config::BackendKind;
use tiergate::engine::cpu::CpuBackend;
use tiergate::engine::cuda::{self, kernel_check, kernels, CudaBackend};
use tiergate::model::encoder::{self, MiniLm, Precision};
use tiergate::model::heads::{AnswerInput, Heads};
use tiergate::model::tokenize::{TextTokenizer, TruncSide};
use tiergate::model::wordpiece::WordPieceTable;

/// The repository; `TIERGATE_ROOT` when this test binary runs elsewhere than it was built
/// (carried to a GPU machine, benches/GPU.md).
fn root() -> PathBuf {
    std::env::var_os("TIERGATE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn model_dir() -> PathBuf {
    root().join("models/base")
}

fn load_model() -> Arc<MiniLm> {
    match MiniLm::load(&model_dir()) {
        Ok(m) => Arc::new(m),
        Err(e) => panic!("{e:#}; run scripts/setup-model.sh first"),
    }
}

/// GPU tests are `#[ignore]`d; run by hand (`--ignored`) without a GPU they fail loudly
/// instead of passing vacuously.
fn require_gpu() {
    if let Err(why) = cuda::probe() {
        panic!("this test needs a CUDA device: {why}");
    }
}

#[test]
fn nvrtc_compiles_every_kernel() {
    // Every .cu file under kernels/ must be embedded (so none is forgotten by the backend).
    let mut on_disk: Vec<String> = std::fs::read_dir(root().join("kernels"))
        .expect("kernels/ is readable")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = kernels::SOURCES.iter().map(|s| s.0.to_string()).collect();
    embedded.sort();
    assert_eq!(
        on_disk, embedded,
        "kernels/*.cu and kernels::SOURCES differ"
    );

    if !cuda::nvrtc_available() {
        println!(
            "SKIPPED: libnvrtc not found; `. scripts/nvrtc-env.sh` (pip nvidia-cuda-nvrtc) \
             puts it on LD_LIBRARY_PATH"
        );
        return;
    }
    for arch in ["compute_80", "compute_90"] {
        for (file, _, names) in kernels::SOURCES {
            // Compile the file as it is on disk now (the embedded copy is the same file).
            let src = std::fs::read_to_string(root().join("kernels").join(file))
                .unwrap_or_else(|e| panic!("reading kernels/{file}: {e}"));
            let ptx = match kernels::compile(file, &src, arch) {
                Ok(p) => p.to_src(),
                Err(log) => panic!("{arch}: {log}"),
            };
            for n in *names {
                assert!(
                    ptx.contains(&format!(".entry {n}(")),
                    "{file} ({arch}) defines no kernel {n}"
                );
            }
        }
    }
    println!("nvrtc: all kernels compile for compute_80 and compute_90");
}

#[test]
fn selection_without_a_gpu_falls_back_to_the_cpu() {
    if cuda::probe().is_ok() {
        println!("SKIPPED: a CUDA device is present (this test covers machines without one)");
        return;
    }
    let model = load_model();
    let b = tiergate::engine::select(
        BackendKind::Auto,
        model.clone(),
        Path::new("models/base"),
        1,
        Precision::Auto,
    )
    .unwrap();
    assert_eq!(b.name(), "cpu");
    let err = match tiergate::engine::select(
        BackendKind::Cuda,
        model,
        Path::new("models/base"),
        1,
        Precision::F32,
    ) {
        Ok(b) => panic!("backend cuda without a GPU gave {}", b.name()),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("backend cuda"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU; scripts/test.sh runs it where nvidia-smi lists one"]
fn cuda_backend_matches_the_cpu_backend_on_real_prompts() {
    require_gpu();
    let model = load_model();
    let tok = TextTokenizer::from_file(&model_dir().join("tokenizer.json"), 512, 512).unwrap();
    let long = "Explain, step by step, how a B-tree keeps itself balanced on insertion and \
                deletion, and compare it with a red-black tree. "
        .repeat(40);
    let prompts = [
        "Prove that sqrt(2) is irrational.",
        "What is 12*12?",
        "Write a haiku about autumn rain.",
        "Translate 'good morning' into French, German and Japanese.",
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# make this iterative",
        "Summarise the causes of the First World War in three sentences.",
        "x",
        long.as_str(),
    ];
    let mut batch = PackedBatch::new();
    for p in prompts {
        let e = tok.encode_single(p, TruncSide::HeadTail).unwrap();
        batch.push(&e.ids, &e.type_ids);
    }
    let pair = tok
        .encode_pair(
            "What is 2+2?",
            "2+2 equals 4, because adding two and two gives four.",
        )
        .unwrap();
    batch.push(&pair.ids, &pair.type_ids);
    assert!(
        batch.seq(7).len() == 512,
        "the long prompt fills all positions"
    );

    let mut gpu = CudaBackend::new(model.clone(), &model_dir()).unwrap();
    let mut cpu = CpuBackend::new(model.clone(), 2, Precision::F32).unwrap();
    let want = cpu.embed(&batch).unwrap();
    // Twice: the second call reuses the scratch buffers.
    for _ in 0..2 {
        let got = gpu.embed(&batch).unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (w, g)) in want
            .chunks_exact(384)
            .zip(got.chunks_exact(384))
            .enumerate()
        {
            let c = cosine(w, g);
            assert!(c >= 0.999, "sequence {i}: cosine {c}");
            let norm: f32 = g.iter().map(|v| v * v).sum();
            assert!((norm - 1.0).abs() < 1e-4, "sequence {i}: |e|² = {norm}");
        }
    }
    // Decisions, not just vectors: every model's p_pass from the router head run on the GPU
    // (on GPU embeddings) within 0.005 of the CPU heads on CPU embeddings, and the verifier's
    // p_pass for the answer within 0.005 whichever backend embedded prompt and answer.
    let heads = Heads::load(&root().join("models/heads.json")).unwrap();
    gpu.set_router(&heads.router).unwrap();
    let (emb, logits) = gpu.embed_route(&batch).unwrap();
    let r = gpu.router().unwrap();
    let mut worst = 0.0f64;
    for (s, w) in want.chunks_exact(384).enumerate() {
        for m in heads
            .router
            .models
            .keys()
            .map(String::as_str)
            .chain(["no-such-model"])
        {
            let cpu_p = heads.route_p(m, w);
            let gpu_p = sigmoid(logits[s * r.width() + r.column(m)] as f64);
            worst = worst.max((cpu_p - gpu_p).abs());
        }
    }
    assert!(worst <= 0.005, "route p_pass differs by {worst}");
    let answer_text = "2+2 equals 4, because adding two and two gives four.";
    let a = tok.encode_single(answer_text, TruncSide::Tail).unwrap();
    let mut ab = PackedBatch::new();
    ab.push(&a.ids, &a.type_ids);
    let (a_cpu, a_gpu) = (cpu.embed(&ab).unwrap(), gpu.embed(&ab).unwrap());
    let p_emb = |e: &[f32]| e[384..768].to_vec(); // sequence 1: "What is 12*12?"
    for m in heads.router.models.keys().take(8) {
        let p = |pe: &[f32], ae: &[f32]| {
            heads.verify_p(
                m,
                pe,
                &AnswerInput {
                    text: answer_text,
                    prompt: prompts[1],
                    embedding: ae,
                    truncated: false,
                },
            )
        };
        let (pc, pg) = (p(&p_emb(&want), &a_cpu), p(&p_emb(&emb), &a_gpu));
        assert!(
            (pc - pg).abs() <= 0.005,
            "{m}: verify p {pc} (cpu) vs {pg} (gpu)"
        );
    }
    println!("route p_pass max |cpu - gpu| = {worst:.2e}");

    // This batch (under 1,000 tokens) replays a CUDA graph by default; eager launches must
    // give the same embeddings.
    assert!(gpu.graphs() >= 1, "a small batch should have been captured");
    gpu.set_graph_max_tokens(0);
    let eager = gpu.embed(&batch).unwrap();
    for (i, (g, e)) in emb
        .chunks_exact(384)
        .zip(eager.chunks_exact(384))
        .enumerate()
    {
        let c = cosine(g, e);
        assert!(c >= 0.99999, "sequence {i}: graph vs eager cosine {c}");
    }
    assert_eq!(gpu.graphs(), 0);
    gpu.set_graph_max_tokens(cuda::DEFAULT_GRAPH_MAX_TOKENS);

    // A batch of one, and an empty batch; invalid batches are refused like on the CPU.
    let mut one = PackedBatch::new();
    one.push(&batch.ids[batch.seq(0)], &batch.type_ids[batch.seq(0)]);
    let g = gpu.embed(&one).unwrap();
    assert!(cosine(&g, &want[..384]) >= 0.999);
    assert!(gpu.embed(&PackedBatch::new()).unwrap().is_empty());
    let mut bad = PackedBatch::new();
    bad.push(&[101, 999_999, 102], &[0; 3]);
    assert!(gpu.embed(&bad).is_err());
}

#[test]
#[ignore = "needs a CUDA GPU; scripts/test.sh runs it where nvidia-smi lists one"]
fn each_kernel_matches_its_cpu_reference() {
    require_gpu();
    let heads = Heads::load(&root().join("models/heads.json")).unwrap();
    let table = WordPieceTable::from_file(&model_dir().join("tokenizer.json")).unwrap();
    let harness = cuda::KernelHarness::new().unwrap();
    let checks = kernel_check::kernel_checks(&harness, &heads, Some(&table)).unwrap();
    assert!(checks.len() >= 9, "{checks:?}");
    for c in &checks {
        println!("{c:?}");
        assert!(c.passed(), "{c:?}");
    }
}

#[test]
fn random_weights_model_loads_on_the_cpu() {
    // The gpu-check --random-weights path: the written model must be a valid MiniLM-L6.
    let dir = tempfile::tempdir().unwrap();
    cuda::write_random_model(dir.path(), 7).unwrap();
    let m = MiniLm::load(dir.path()).unwrap();
    assert_eq!((m.dim(), m.max_positions()), (384, 512));
    let mut b = PackedBatch::new();
    b.push(&[101, 2000, 3000, 102], &[0; 4]);
    let e = m.forward(&b);
    let norm: f32 = e.iter().map(|v| v * v).sum();
    assert!((norm - 1.0).abs() < 1e-4);
}

/// The start-up self-check that keeps a disagreeing GPU from serving: equal backends pass,
/// a backend with a fault (here: the CPU's output with its sign flipped on one sequence) fails.
#[test]
fn self_check_detects_a_disagreeing_backend() {
    struct Faulty(CpuBackend);
    impl Backend for Faulty {
        fn numerics(&self) -> &'static str {
            self.0.numerics()
        }
        fn name(&self) -> &'static str {
            "faulty"
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn dim(&self) -> usize {
            self.0.dim()
        }
        fn max_seq_len(&self) -> usize {
            self.0.max_seq_len()
        }
        fn embed(&mut self, b: &PackedBatch) -> Result<Vec<f32>, BackendError> {
            let mut v = self.0.embed(b)?;
            let d = self.0.dim();
            v[d..2 * d].iter_mut().for_each(|x| *x = -*x);
            Ok(v)
        }
    }
    let model =
        Arc::new(MiniLm::load(Path::new("models/base")).expect("run scripts/setup-model.sh"));
    let mut a = CpuBackend::new(model.clone(), 1, Precision::F32).unwrap();
    let mut b = CpuBackend::new(model.clone(), 2, Precision::F32).unwrap();
    let ok = tiergate::engine::self_check(&mut a, &mut b).unwrap();
    assert!(ok > 0.9999, "{ok}");
    let mut f = Faulty(CpuBackend::new(model, 1, Precision::F32).unwrap());
    let bad = tiergate::engine::self_check(&mut a, &mut f).unwrap();
    assert!(bad < 0.0, "{bad}");
}

/// The f16 copy carried to GPU machines (`tiergate export-f16`): half the bytes, loads in the
/// CPU encoder and embeds real prompts like the f32 original.
#[test]
fn f16_export_is_half_the_size_and_embeds_like_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = encoder::export_f16(&model_dir(), dir.path()).unwrap();
    let orig = std::fs::metadata(model_dir().join("model.safetensors"))
        .unwrap()
        .len();
    assert!(
        bytes < orig / 2 + (1 << 20) && bytes < 45 << 20,
        "{bytes} bytes vs {orig}"
    );
    assert!(dir.path().join("tokenizer.json").exists());
    let (a, b) = (load_model(), MiniLm::load(dir.path()).unwrap());
    assert_ne!(
        a.revision(),
        b.revision(),
        "a different file has its own revision"
    );
    // It records where it came from, so what was fitted on the original still fits it.
    assert_eq!(a.source_revision(), None);
    assert_eq!(b.source_revision(), Some(a.revision()));
    assert!(b.fits_revision(a.revision()) && b.fits_revision(b.revision()));
    assert!(
        !a.fits_revision(b.revision()),
        "the original does not fit the export's own"
    );
    assert!(
        a.int8_smoothed() && a.student().is_some(),
        "embedded ranges fit models/base"
    );
    assert!(
        b.int8_smoothed() && b.student().is_some(),
        "and its f16 export"
    );
    // An export of the export names the first source, not the intermediate copy.
    let again = tempfile::tempdir().unwrap();
    encoder::export_f16(dir.path(), again.path()).unwrap();
    let c = MiniLm::load(again.path()).unwrap();
    assert_eq!(c.source_revision(), Some(a.revision()));
    let tok = TextTokenizer::from_file(&model_dir().join("tokenizer.json"), 256, 256).unwrap();
    let mut batch = PackedBatch::new();
    for p in [
        "Prove that sqrt(2) is irrational.",
        "Write a haiku about autumn rain, then explain its imagery line by line.",
        "x",
    ] {
        let e = tok.encode_single(p, TruncSide::HeadTail).unwrap();
        batch.push(&e.ids, &e.type_ids);
    }
    let (x, y) = (a.forward(&batch), b.forward(&batch));
    for (i, (p, q)) in x.chunks_exact(384).zip(y.chunks_exact(384)).enumerate() {
        let c = cosine(p, q);
        assert!(c >= 0.9999, "sequence {i}: cosine {c}");
    }
}

#[test]
fn graph_token_buckets_hold_the_batch_with_at_most_half_again() {
    let mut last = 0;
    for t in 0..70_000usize {
        let b = cuda::token_bucket(t);
        assert!(b >= t.max(512), "{t} -> {b}");
        assert!(b >= last, "buckets grow with the batch");
        if t >= 512 {
            assert!(2 * b <= 3 * t, "{t} -> {b}");
        }
        last = b;
    }
    let distinct: std::collections::BTreeSet<usize> =
        (0..=32_768).map(cuda::token_bucket).collect();
    assert_eq!(
        distinct.into_iter().collect::<Vec<_>>(),
        [512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768]
    );
}

/// The texts the WordPiece kernel is checked on cover what they should: declined texts (non-ASCII,
/// added-token literals), words over 100 characters, control bytes; and the CPU reference
/// agrees with the tokenizers crate on all the texts it takes.
#[test]
fn wordpiece_check_texts_cover_the_cases_and_match_tokenizers() {
    let path = model_dir().join("tokenizer.json");
    let table = WordPieceTable::from_file(&path).unwrap();
    let hf = TextTokenizer::from_file(&path, 512, 512)
        .unwrap()
        .crate_only();
    let texts = kernel_check::wordpiece_texts(2000);
    let (mut declined, mut long, mut control) = (0, 0, 0);
    for t in &texts {
        match table.encode_ascii(t) {
            None => declined += 1,
            Some(ids) => {
                let want = hf.raw_ids(t).unwrap();
                assert_eq!(ids, want, "{t:?}");
            }
        }
        long += usize::from(t.split(' ').any(|w| w.len() > 100));
        control += usize::from(t.bytes().any(|b| b == 1 || b == 0x7f));
    }
    assert!(declined > 100 && declined < 1900, "{declined}");
    assert!(long > 50 && control > 500, "{long} {control}");
}
