//! `tiergate gpu-check`: CPU-vs-GPU agreement on real prompts, then GPU forward throughput at
//! a few token budgets (wall clock per forward, median of repeated runs).
#![forbid(unsafe_code)]
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::base::{cosine, sigmoid, Backend, PackedBatch};
use crate::engine::cpu::CpuBackend;
use crate::engine::cuda::{
    self, kernel_check, probe, write_random_model, CudaBackend, KernelHarness,
};
use crate::eval::data::Row;
use crate::model::encoder::{MiniLm, Precision};
use crate::model::tokenize::{TextTokenizer, TruncSide};
use crate::model::wordpiece::WordPieceTable;

#[derive(Debug, Clone, clap::Args)]
pub struct GpuCheckArgs {
    /// Encoder directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, default_value = "models/base")]
    pub model_dir: PathBuf,
    /// Number of distinct prompts compared between CPU and GPU.
    #[arg(long, default_value_t = 64)]
    pub prompts: usize,
    /// Token budgets (tokens per batch) to time the GPU forward at.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,8192,32768")]
    pub budgets: Vec<usize>,
    /// Prompts to use (JSONL or JSONL.gz rows with a `prompt` field).
    #[arg(long, default_value = "../shared/data/dev.jsonl.gz")]
    pub data: PathBuf,
    /// Random MiniLM-L6-shaped weights and synthetic token ids instead of the real model and
    /// prompts (timing without the model; the CPU comparison then runs on those weights).
    #[arg(long)]
    pub random_weights: bool,
    /// Trained heads: the router head runs on the GPU and its p_pass is compared with the CPU.
    #[arg(long, default_value = "models/heads.json")]
    pub heads: PathBuf,
    /// Timed runs per budget (after 3 warm-up runs).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
}

/// Removes the random-weights directory however `run` ends.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `n` synthetic sequences: [CLS] ids [SEP], lengths cycling over 8..=512.
fn synthetic(n: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    const LENS: [usize; 7] = [8, 24, 64, 128, 200, 384, 512];
    (0..n)
        .map(|i| {
            let len = LENS[i % LENS.len()];
            let mut ids: Vec<u32> = (0..len)
                .map(|j| 1000 + ((i * 7919 + j * 104_729) % 28_000) as u32)
                .collect();
            ids[0] = 101;
            ids[len - 1] = 102;
            (ids, vec![0; len])
        })
        .collect()
}

fn real_prompts(a: &GpuCheckArgs, rows: &[Row]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let tok = TextTokenizer::from_file(&a.model_dir.join("tokenizer.json"), 512, 512)?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    // Rows repeat each prompt once per model; keep each prompt once.
    for r in rows.iter().filter(|r| seen.insert(r.prompt_id.as_str())) {
        if out.len() == a.prompts {
            break;
        }
        let e = tok.encode_single(&r.prompt, TruncSide::HeadTail)?;
        out.push((e.ids, e.type_ids));
    }
    if out.is_empty() {
        bail!("{}: no prompts", a.data.display());
    }
    Ok(out)
}

fn pack<'a>(seqs: impl IntoIterator<Item = &'a (Vec<u32>, Vec<u32>)>) -> PackedBatch {
    let mut b = PackedBatch::new();
    for (ids, types) in seqs {
        b.push(ids, types);
    }
    b
}

/// Sequences taken in turn (cycling) while they fit in `budget` tokens.
fn fill(seqs: &[(Vec<u32>, Vec<u32>)], budget: usize) -> PackedBatch {
    let mut b = PackedBatch::new();
    let mut misses = 0;
    for s in seqs.iter().cycle() {
        if b.tokens() + s.0.len() <= budget {
            b.push(&s.0, &s.1);
            misses = 0;
        } else {
            misses += 1;
            if misses == seqs.len() {
                break; // nothing left fits
            }
        }
    }
    b
}

/// WordPiece on the GPU against the `tokenizers` crate on the data's prompts and answers:
/// the same ids for every text the GPU takes, and wall-clock throughput of both (the GPU's
/// including transfers and stitching the words together on the host). Some(failure).
fn check_tokenizer(
    gpu: &mut CudaBackend,
    table: &WordPieceTable,
    tok_path: &std::path::Path,
    rows: &[Row],
) -> Result<Option<String>> {
    let mut seen = std::collections::HashSet::new();
    let texts: Vec<&str> = rows
        .iter()
        .flat_map(|r| [Some(r.prompt.as_str()), r.response.as_deref()])
        .flatten()
        .filter(|t| seen.insert(*t))
        .take(4000)
        .collect();
    let bytes: usize = texts.iter().map(|t| t.len()).sum();
    // The crate alone: the server's path for text the fast path declines.
    let hf = TextTokenizer::from_file(tok_path, 512, 512)?.crate_only();
    gpu.set_vocab(table)?;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut ms = Vec::new();
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            f()?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[2])
    };
    let mut got = Vec::new();
    let gpu_ms = time(&mut || {
        got = gpu.tokenize(&texts)?;
        Ok(())
    })?;
    let mut want = Vec::new();
    let cpu_ms = time(&mut || {
        want = texts
            .iter()
            .map(|t| hf.raw_ids(t))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(())
    })?;
    // The CPU side of the same algorithm (what the server's tokenizer uses for ASCII text).
    let ours_ms = time(&mut || {
        for t in &texts {
            black_box(table.encode_ascii(t));
        }
        Ok(())
    })?;
    let (mut taken, mut taken_bytes, mut differ) = (0, 0, 0);
    for ((g, w), t) in got.iter().zip(&want).zip(&texts) {
        if let Some(g) = g {
            taken += 1;
            taken_bytes += t.len();
            differ += usize::from(g != w);
        }
    }
    let mbs = |b: usize, ms: f64| b as f64 / 1e6 / (ms / 1e3);
    println!(
        "wordpiece on {} texts ({:.1} MB): GPU takes {taken} ({:.1}% of bytes), {differ} differ from tokenizers; \
         wall clock GPU {gpu_ms:.1} ms ({:.0} MB/s of the bytes it takes), CPU WordPiece 1 thread {ours_ms:.1} ms ({:.0} MB/s), \
         tokenizers 1 thread {cpu_ms:.1} ms ({:.1} MB/s, all texts)",
        texts.len(),
        bytes as f64 / 1e6,
        100.0 * taken_bytes as f64 / bytes.max(1) as f64,
        mbs(taken_bytes, gpu_ms),
        mbs(taken_bytes, ours_ms),
        mbs(bytes, cpu_ms)
    );
    Ok((differ > 0).then(|| format!("wordpiece: {differ} texts differ from tokenizers")))
}

pub fn run(a: GpuCheckArgs) -> Result<()> {
    let info = probe().map_err(|e| anyhow::anyhow!("gpu-check needs a CUDA device: {e}"))?;
    println!(
        "device: {} (compute {}.{}), {} device(s); driver CUDA {}.{}, NVRTC {}.{}",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.devices,
        info.driver_version.0,
        info.driver_version.1,
        info.nvrtc_version.0,
        info.nvrtc_version.1
    );
    if info.nvrtc_version > info.driver_version {
        println!(
            "warning: NVRTC is newer than the driver: its PTX will not load \
             (put the driver's CUDA version of libnvrtc first on LD_LIBRARY_PATH)"
        );
    }
    let (dir, _cleanup) = if a.random_weights {
        let dir = std::env::temp_dir().join(format!("tiergate-random-{}", std::process::id()));
        write_random_model(&dir, 0x5eed)?;
        (dir.clone(), Some(TempDir(dir)))
    } else {
        (a.model_dir.clone(), None)
    };
    let model = Arc::new(MiniLm::load(&dir).with_context(|| format!("loading {}", dir.display()))?);
    let heads = crate::model::heads::Heads::load(&a.heads)?;
    // Before any GPU work, as every offline command does.
    heads.check_width(&a.heads, model.dim(), &dir)?;
    let t0 = std::time::Instant::now();
    let mut gpu = CudaBackend::new(model.clone(), &dir)?;
    println!(
        "cuda backend on {} ready in {:.2}s (NVRTC compile + weight upload)",
        gpu.device_name(),
        t0.elapsed().as_secs_f64()
    );

    // Each kernel against its CPU reference, on synthetic data.
    let tok_path = a.model_dir.join("tokenizer.json");
    let table = if tok_path.exists() {
        Some(WordPieceTable::from_file(&tok_path)?)
    } else {
        println!(
            "{}: missing; the WordPiece kernel is not checked",
            tok_path.display()
        );
        None
    };
    let mut failed = Vec::new();
    println!(
        "\n{:<26} {:>10} {:>10}  result",
        "kernel", "max error", "tolerance"
    );
    let harness = KernelHarness::new()?;
    for c in kernel_check::kernel_checks(&harness, &heads, table.as_ref())? {
        println!(
            "{:<26} {:>10.2e} {:>10.0e}  {} ({})",
            c.kernel,
            c.max_err,
            c.tolerance,
            if c.passed() { "ok" } else { "FAILED" },
            c.kind
        );
        if !c.passed() {
            failed.push(format!("kernel {}", c.kernel));
        }
    }
    println!();

    // The data file is read once, for the prompts and the tokenizer comparison.
    let rows = if a.random_weights {
        Vec::new()
    } else {
        crate::eval::data::read_rows(&a.data)?
    };
    let seqs = if a.random_weights {
        synthetic(a.prompts.max(1))
    } else {
        real_prompts(&a, &rows)?
    };
    let batch = pack(&seqs);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cpu = CpuBackend::new(model.clone(), threads, Precision::F32)?;
    let want = cpu.embed(&batch)?;
    let dim = model.dim();
    // Both ways of running the forward: kernels launched one by one, and one replayed graph.
    let mut min_cos = f64::INFINITY;
    for (mode, graph_max) in [("eager", 0), ("graph", usize::MAX)] {
        gpu.set_graph_max_tokens(graph_max);
        if graph_max > 0 {
            // A new bucket runs eagerly once while its graph is captured; compare a replay.
            gpu.embed(&batch)?;
        }
        let got = gpu.embed(&batch)?;
        let (mut low, mut max_abs, mut worst) = (f64::INFINITY, 0.0f32, 0);
        for (i, (w, g)) in want
            .chunks_exact(dim)
            .zip(got.chunks_exact(dim))
            .enumerate()
        {
            let cos = cosine(w, g);
            if cos < low {
                (low, worst) = (cos, i);
            }
            max_abs = w
                .iter()
                .zip(g)
                .fold(max_abs, |m, (&x, &y)| m.max((x - y).abs()));
        }
        println!(
            "cpu vs gpu ({mode}) on {} {} ({} tokens): min cosine {low:.6} (sequence {worst}, {} tokens), max abs diff {max_abs:.2e}",
            seqs.len(),
            if a.random_weights { "synthetic sequences" } else { "prompts" },
            batch.tokens(),
            seqs[worst].0.len()
        );
        min_cos = min_cos.min(low);
    }
    // The graph run must really have been a graph (a failed capture falls back to eager).
    let captured = gpu.graphs();
    println!("CUDA graphs captured: {captured}");
    if captured == 0 {
        failed.push("no CUDA graph was captured (see the warning above)".into());
    }
    gpu.set_graph_max_tokens(cuda::DEFAULT_GRAPH_MAX_TOKENS);

    if let (Some(t), false) = (&table, a.random_weights) {
        if let Some(f) = check_tokenizer(&mut gpu, t, &tok_path, &rows)? {
            failed.push(f);
        }
    }

    // Edges: a batch of one, an empty batch, an id outside the vocabulary.
    let one = pack(&seqs[..1]);
    let e1 = gpu.embed(&one)?;
    let c1 = cosine(&e1, &want[..dim]);
    let empty = gpu.embed(&PackedBatch::new())?;
    let mut bad = PackedBatch::new();
    bad.push(&[101, u32::MAX, 102], &[0; 3]);
    let refused = gpu.embed(&bad).is_err();
    println!(
        "batch of one: cosine {c1:.6}; empty batch: {} values; out-of-vocabulary id: {}",
        empty.len(),
        if refused { "refused" } else { "ACCEPTED" }
    );
    if c1 < 0.999 || !empty.is_empty() || !refused {
        failed.push("edge cases".to_string());
    }

    // Decisions: every model's route p_pass, router head on the GPU (on GPU embeddings)
    // against the CPU heads on CPU embeddings.
    gpu.set_router(&heads.router)?;
    let (_, logits) = gpu.embed_route(&batch)?;
    let r = gpu.router().context("router head not on the GPU")?;
    let mut worst_p = 0.0f64;
    let names: Vec<&str> = heads.router.models.keys().map(String::as_str).collect();
    for (s, w) in want.chunks_exact(dim).enumerate() {
        for m in &names {
            let cpu_p = heads.route_p(m, w);
            let gpu_p = sigmoid(logits[s * r.width() + r.column(m)] as f64);
            worst_p = worst_p.max((cpu_p - gpu_p).abs());
        }
    }
    println!(
        "route p_pass, {} models x {} sequences: max |cpu - gpu| {worst_p:.2e}",
        names.len(),
        seqs.len()
    );

    println!(
        "\nforward time (wall clock: packing, upload, kernels, download), {} runs after 3 warm-up:",
        a.runs.max(1)
    );
    println!(
        "{:>8} {:>8} {:>6} {:>8} {:>11} {:>11} {:>11} {:>12}",
        "budget", "tokens", "seqs", "bucket", "eager ms", "graph ms", "graph/eager", "tokens/s"
    );
    for &budget in &a.budgets {
        let b = fill(&seqs, budget);
        if b.is_empty() {
            println!("{budget:>8} (no sequence fits)");
            continue;
        }
        let mut medians = [0.0f32; 2];
        for (i, graph_max) in [0, usize::MAX].into_iter().enumerate() {
            gpu.set_graph_max_tokens(graph_max);
            for _ in 0..3 {
                gpu.embed_timed(&b)?;
            }
            let mut ms = (0..a.runs.max(1))
                .map(|_| gpu.embed_timed(&b).map(|r| r.1))
                .collect::<Result<Vec<f32>>>()?;
            ms.sort_by(f32::total_cmp);
            medians[i] = ms[ms.len() / 2];
        }
        let best = medians[0].min(medians[1]);
        println!(
            "{budget:>8} {:>8} {:>6} {:>8} {:>11.3} {:>11.3} {:>11.2} {:>12.0}",
            b.tokens(),
            b.len(),
            cuda::token_bucket(b.tokens()),
            medians[0],
            medians[1],
            medians[1] / medians[0],
            b.tokens() as f64 / (best as f64 / 1e3)
        );
    }
    if worst_p > 0.005 {
        failed.push(format!("route p_pass differs by {worst_p:.4} (> 0.005)"));
    }
    if min_cos < 0.999 {
        failed.push(format!("min cosine {min_cos:.6} < 0.999"));
    }
    if !failed.is_empty() {
        bail!("the GPU disagrees with the CPU: {}", failed.join("; "));
    }
    println!("\nall checks passed");
    Ok(())
}
