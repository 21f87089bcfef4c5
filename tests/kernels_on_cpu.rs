//! Our CUDA kernels' own source (`kernels/*.cu`), compiled for the CPU by the host C++
//! compiler with a small SIMT stand-in: every thread of a block is an OS thread,
//! `__syncthreads` a block barrier, `__shfl_xor_sync` an exchange through a warp barrier,
//! `__shared__` a static, the f16 conversions `_Float16`. Each block runs after the previous;
//! kernels without barriers or shuffles run their threads one after another.
//! The same checks as on a GPU (`engine::cuda::kernel_check`) then compare every kernel with
//! its CPU reference, so kernel logic (indexing, reductions, online softmax, tiling, the word
//! rules) is tested without a GPU. What this cannot see: the CUDA compiler, real warp
//! scheduling and memory ordering, cuBLAS. The GPU run covers those
//! (`each_kernel_matches_its_cpu_reference`).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use tiergate::engine::cuda::{kernel_check, kernels, router_layout};
use tiergate::model::heads::{Heads, RouterHead};
use tiergate::model::wordpiece::WordPieceTable;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const SHIM: &str = r#"
#include <algorithm>
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
using std::max;
using std::min;
struct Dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;
struct Warp { std::barrier<> bar{32}; float vals[32]; };
static thread_local std::barrier<>* tl_block;
static thread_local Warp* tl_warp;
static void __syncthreads() { tl_block->arrive_and_wait(); }
static float __shfl_xor_sync(unsigned, float v, int o) {
    Warp& w = *tl_warp;
    const unsigned lane = threadIdx.x & 31;
    w.vals[lane] = v;
    w.bar.arrive_and_wait();
    const float r = w.vals[lane ^ (unsigned)o];
    w.bar.arrive_and_wait();
    return r;
}
static float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static unsigned short f2h_bits(float f) { _Float16 h = (_Float16)f; unsigned short b; memcpy(&b, &h, 2); return b; }
static float h2f_bits(unsigned short b) { _Float16 h; memcpy(&h, &b, 2); return (float)h; }
static float g_dyn_shared[1 << 14];

template <class K> static void launch(Dim3 grid, Dim3 block, K k) {
    blockDim = block;
    gridDim = grid;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                std::barrier<> bar(block.x);
                std::vector<Warp> warps(block.x / 32);
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < block.x; t++)
                    ts.emplace_back([&, t] {
                        threadIdx = Dim3{t, 0, 0};
                        blockIdx = Dim3{x, y, z};
                        tl_block = &bar;
                        tl_warp = &warps[t / 32];
                        k();
                    });
                for (auto& th : ts) th.join();
            }
}
// Kernels with no barrier or shuffle (bias_gelu, wordpiece_ascii): threads one after another
// on this thread, thousands of times faster than a thread each.
template <class K> static void launch_serial(Dim3 grid, Dim3 block, K k) {
    blockDim = block;
    gridDim = grid;
    tl_block = nullptr;
    tl_warp = nullptr;
    for (unsigned x = 0; x < grid.x; x++)
        for (unsigned t = 0; t < block.x; t++) {
            threadIdx = Dim3{t, 0, 0};
            blockIdx = Dim3{x, 0, 0};
            k();
        }
}
"#;

const DRIVER: &str = r#"
static std::vector<std::vector<char>> arrays(const char* path) {
    std::vector<std::vector<char>> out;
    FILE* f = fopen(path, "rb");
    uint64_t n;
    while (fread(&n, 8, 1, f) == 1) {
        std::vector<char> a(n + 8);
        if (n && fread(a.data(), 1, n, f) != n) throw 1;
        a.resize(n);
        out.push_back(std::move(a));
    }
    fclose(f);
    return out;
}
template <class T> static T* P(std::vector<std::vector<char>>& a, int i) { return (T*)a[i].data(); }
template <class T> static size_t N(std::vector<std::vector<char>>& a, int i) { return a[i].size() / sizeof(T); }
static void put(const char* path, const void* p, size_t bytes) {
    FILE* f = fopen(path, "wb");
    fwrite(p, 1, bytes, f);
    fclose(f);
}
static Dim3 d1(unsigned x) { return Dim3{x, 1, 1}; }

int main(int argc, char** argv) {
    const std::string k = argv[1];
    auto a = arrays(argv[2]);
    const unsigned RT = 128;  // ROW_THREADS in src/engine/cuda/mod.rs
    if (k == "embed_layernorm") {  // ids types positions word pos type gamma beta [eps]
        const int h = (int)N<float>(a, 6); const size_t t = N<unsigned>(a, 0);
        const float eps = P<float>(a, 8)[0];
        std::vector<float> x32(t * h); std::vector<unsigned short> x16(t * h);
        launch(d1(t), d1(RT), [&] { norm::embed_layernorm(P<unsigned>(a, 0), P<unsigned>(a, 1), P<unsigned>(a, 2), P<unsigned short>(a, 3), P<unsigned short>(a, 4), P<unsigned short>(a, 5), P<float>(a, 6), P<float>(a, 7), h, eps, x32.data(), x16.data()); });
        put(argv[3], x32.data(), x32.size() * 4);
    } else if (k == "bias_residual_layernorm") {  // y bias gamma beta x [eps]
        const int h = (int)N<float>(a, 2); const size_t t = N<float>(a, 4) / h;
        std::vector<unsigned short> x16(t * h);
        launch(d1(t), d1(RT), [&] { norm::bias_residual_layernorm(P<float>(a, 0), P<float>(a, 1), P<float>(a, 2), P<float>(a, 3), h, P<float>(a, 5)[0], P<float>(a, 4), x16.data()); });
        put(argv[3], P<float>(a, 4), N<float>(a, 4) * 4);
    } else if (k == "bias_gelu") {  // y bias
        const unsigned long long total = N<float>(a, 0); const unsigned cols = N<float>(a, 1);
        std::vector<unsigned short> out(total);
        const unsigned blocks = (unsigned)std::min<unsigned long long>(std::max<unsigned long long>((total + 255) / 256, 1), 8192);
        launch_serial(d1(blocks), d1(256), [&] { gelu::bias_gelu(P<float>(a, 0), P<float>(a, 1), cols, total, out.data()); });
        put(argv[3], out.data(), out.size() * 2);
    } else if (k == "attention_varlen") {  // qkv bias cu [heads max_len]
        const int heads = (int)P<unsigned>(a, 3)[0]; const unsigned max_len = P<unsigned>(a, 3)[1];
        const size_t seqs = N<unsigned>(a, 2) - 1, h = heads * 32, t = N<float>(a, 0) / (3 * h);
        std::vector<unsigned short> ctx(t * h);
        launch(Dim3{(unsigned)(seqs * heads), std::max((max_len + RT - 1) / RT, 1u), 1}, d1(RT), [&] { attention::attention_varlen(P<float>(a, 0), P<float>(a, 1), P<unsigned>(a, 2), heads, 1.0f / sqrtf(32.0f), ctx.data()); });
        put(argv[3], ctx.data(), ctx.size() * 2);
    } else if (k == "mean_pool_l2") {  // x cu [h]
        const int h = (int)P<unsigned>(a, 2)[0]; const size_t seqs = N<unsigned>(a, 1) - 1;
        std::vector<float> out(seqs * h);
        launch(d1(seqs), d1(RT), [&] { norm::mean_pool_l2(P<float>(a, 0), P<unsigned>(a, 1), h, out.data()); });
        put(argv[3], out.data(), out.size() * 4);
    } else if (k == "router_logits") {  // emb rows abil [c] [k dim models]
        const unsigned* p = P<unsigned>(a, 4);
        const int kk = (int)p[0], dim = (int)p[1], models = (int)p[2];
        const size_t seqs = N<float>(a, 0) / dim;
        std::vector<float> out(seqs * models);
        launch(d1(seqs), d1(RT), [&] { heads::router_logits(P<float>(a, 0), P<float>(a, 1), P<float>(a, 3)[0], kk, dim, P<float>(a, 2), models, out.data()); });
        put(argv[3], out.data(), out.size() * 4);
    } else if (k == "wordpiece_ascii") {  // text slots entries bytes [unk max_chars max_piece]
        const unsigned long long n = N<unsigned char>(a, 0);
        const unsigned* p = P<unsigned>(a, 4);
        std::vector<unsigned> ids(n + 1); std::vector<unsigned char> counts(n + 1);
        launch_serial(d1((unsigned)((n + 255) / 256)), d1(256), [&] { wordpiece::wordpiece_ascii(P<unsigned char>(a, 0), n, P<unsigned>(a, 1), (unsigned)(N<unsigned>(a, 1) - 1), P<unsigned>(a, 2), P<unsigned char>(a, 3), p[0], (int)p[1], (int)p[2], ids.data(), counts.data()); });
        std::vector<char> out(n * 5);
        memcpy(out.data(), ids.data(), n * 4);
        memcpy(out.data() + n * 4, counts.data(), n);
        put(argv[3], out.data(), out.size());
    } else {
        fprintf(stderr, "unknown kernel %s\n", k.c_str());
        return 2;
    }
    return 0;
}
"#;

/// The kernel file with the three CUDA-only spellings replaced by their stand-ins; each
/// replacement must find its text, so a kernel edit cannot silently skip it.
fn for_cpu(src: &str) -> String {
    let mut s = src.to_string();
    for (from, to) in [
        (
            r#"asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));"#,
            "h = f2h_bits(f);",
        ),
        (
            r#"asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));"#,
            "f = h2f_bits(h);",
        ),
        ("extern __shared__ float z[];", "float* z = g_dyn_shared;"),
    ] {
        s = s.replace(from, to);
    }
    s
}

struct CpuKernels {
    dir: tempfile::TempDir,
    exe: PathBuf,
}

impl CpuKernels {
    /// None (with a visible SKIPPED) when there is no C++20 compiler.
    fn build() -> Option<CpuKernels> {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        if Command::new(&cxx).arg("--version").output().is_err() {
            println!("SKIPPED: no C++ compiler ({cxx}) to run kernels/*.cu on the CPU");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut src = SHIM.to_string();
        for (file, text, _) in kernels::SOURCES {
            let ns = file.trim_end_matches(".cu");
            let cpu = for_cpu(text);
            assert!(
                !cpu.contains("asm("),
                "{file}: an asm statement without a CPU stand-in"
            );
            src.push_str(&format!(
                "namespace {ns} {{\n#line 1 \"{file}\"\n{cpu}\n}}\n"
            ));
        }
        src.push_str(DRIVER);
        std::fs::write(dir.path().join("kernels.cpp"), src).unwrap();
        let k = CpuKernels {
            exe: dir.path().join("kernels"),
            dir,
        };
        k.compile();
        Some(k)
    }

    /// (Re)builds the executable from `kernels.cpp` in the work folder.
    fn compile(&self) {
        let out = Command::new(std::env::var("CXX").unwrap_or_else(|_| "c++".into()))
            .args(["-O1", "-std=c++20", "-pthread", "-x", "c++"])
            .arg(self.dir.path().join("kernels.cpp"))
            .arg("-o")
            .arg(&self.exe)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "compiling the kernels for the CPU:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn run(&self, kernel: &str, arrays: &[Vec<u8>]) -> Result<Vec<u8>> {
        let (inp, out) = (
            self.dir.path().join(format!("{kernel}.in")),
            self.dir.path().join(format!("{kernel}.out")),
        );
        let mut buf = Vec::new();
        for a in arrays {
            buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
            buf.extend_from_slice(a);
        }
        std::fs::write(&inp, buf)?;
        let st = Command::new(&self.exe)
            .arg(kernel)
            .arg(&inp)
            .arg(&out)
            .status()?;
        ensure!(st.success(), "{kernel} failed on the CPU: {st}");
        std::fs::read(&out).with_context(|| out.display().to_string())
    }
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn f16s(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect()
}
fn from_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
fn from_f16s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

impl kernel_check::KernelRunner for CpuKernels {
    fn gemm(&self, _: &[f32], _: &[f32], _: usize, _: usize, _: usize) -> Result<Option<Vec<f32>>> {
        Ok(None) // cuBLAS: only on a GPU
    }
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
        let a = [
            u32s(ids),
            u32s(type_ids),
            u32s(positions),
            f16s(word),
            f16s(pos),
            f16s(types),
            f32s(gamma),
            f32s(beta),
            f32s(&[eps]),
        ];
        Ok(from_f32s(&self.run("embed_layernorm", &a)?))
    }
    fn bias_residual_layernorm(
        &self,
        x: &[f32],
        y: &[f32],
        bias: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) -> Result<Vec<f32>> {
        let a = [
            f32s(y),
            f32s(bias),
            f32s(gamma),
            f32s(beta),
            f32s(x),
            f32s(&[eps]),
        ];
        Ok(from_f32s(&self.run("bias_residual_layernorm", &a)?))
    }
    fn bias_gelu(&self, y: &[f32], bias: &[f32]) -> Result<Vec<f32>> {
        Ok(from_f16s(&self.run("bias_gelu", &[f32s(y), f32s(bias)])?))
    }
    fn attention(&self, qkv: &[f32], bias: &[f32], cu: &[u32], heads: usize) -> Result<Vec<f32>> {
        let max_len = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let a = [
            f32s(qkv),
            f32s(bias),
            u32s(cu),
            u32s(&[heads as u32, max_len]),
        ];
        Ok(from_f16s(&self.run("attention_varlen", &a)?))
    }
    fn router_logits(&self, emb: &[f32], r: &RouterHead) -> Result<Vec<f32>> {
        let dim = r.easiness.w.len();
        let (rows, abil) = router_layout(r, dim)?;
        let a = [
            f32s(emb),
            f32s(&rows),
            f32s(&abil),
            f32s(&[r.easiness.b]),
            u32s(&[r.k as u32, dim as u32, r.models.len() as u32 + 1]),
        ];
        Ok(from_f32s(&self.run("router_logits", &a)?))
    }
    fn mean_pool_l2(&self, x: &[f32], cu: &[u32], h: usize) -> Result<Vec<f32>> {
        let a = [f32s(x), u32s(cu), u32s(&[h as u32])];
        Ok(from_f32s(&self.run("mean_pool_l2", &a)?))
    }
    fn wordpiece(&self, t: &WordPieceTable, texts: &[&str]) -> Result<Vec<Option<Vec<u32>>>> {
        let (buf, spans) = t.pack(texts);
        let flat: Vec<u32> = t.entries.iter().flatten().copied().collect();
        let a = [
            buf.clone(),
            u32s(&t.slots),
            u32s(&flat),
            t.bytes.clone(),
            u32s(&[t.unk, t.max_chars, t.max_piece]),
        ];
        let raw = self.run("wordpiece_ascii", &a)?;
        let n = buf.len();
        ensure!(raw.len() == 5 * n, "wordpiece output size");
        let ids: Vec<u32> = raw[..4 * n]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(WordPieceTable::stitch(&spans, &ids, &raw[4 * n..]))
    }
}

fn heads() -> Heads {
    Heads::load(&root().join("models/heads.json")).unwrap()
}

fn table() -> WordPieceTable {
    let p: &Path = &root().join("models/base/tokenizer.json");
    WordPieceTable::from_file(p).expect("run scripts/setup-model.sh")
}

#[test]
fn every_kernel_source_run_on_the_cpu_matches_its_reference() {
    let Some(k) = CpuKernels::build() else {
        return;
    };
    let checks = kernel_check::kernel_checks(&k, &heads(), Some(&table())).unwrap();
    // Every kernel but cuBLAS's GEMM.
    let names: Vec<&str> = checks.iter().map(|c| c.kernel).collect();
    for n in kernels::SOURCES.iter().flat_map(|s| s.2.iter()) {
        assert!(names.contains(n), "{n} was not checked: {names:?}");
    }
    for c in &checks {
        println!("{c:?}");
        assert!(c.passed(), "{c:?}");
    }
}

/// The WordPiece kernel on real prompts and answers too (the checks above use synthetic text).
#[test]
fn wordpiece_kernel_on_the_cpu_equals_the_reference_on_dev_texts() {
    use kernel_check::KernelRunner;
    let Some(k) = CpuKernels::build() else {
        return;
    };
    let rows = tiergate::eval::data::read_rows(&root().join("../shared/data/dev.jsonl.gz"))
        .expect("../shared/data/dev.jsonl.gz");
    let texts: Vec<&str> = rows
        .iter()
        .step_by(11)
        .take(1500)
        .map(|r| r.prompt.as_str())
        .chain(
            rows.iter()
                .step_by(13)
                .filter_map(|r| r.response.as_deref())
                .take(1500),
        )
        .collect();
    let t = table();
    let got = k.wordpiece(&t, &texts).unwrap();
    let mut taken = 0;
    for (g, text) in got.iter().zip(&texts) {
        assert_eq!(*g, t.encode_ascii(text), "{text:?}");
        taken += usize::from(g.is_some());
    }
    assert!(
        taken > 2000,
        "{taken} of {} texts went through the kernel",
        texts.len()
    );
}

/// Heads of another width are refused with an error, not read out of bounds (the router
/// check projects 384-wide embeddings through them).
#[test]
fn heads_of_another_width_are_refused() {
    let Some(k) = CpuKernels::build() else {
        return;
    };
    let mut h = heads();
    h.dim = 128;
    let e = kernel_check::kernel_checks(&k, &h, None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("dim 128"), "{e}");
}

/// The stand-in can fail: kernels with deliberate bugs (LayerNorm variance over h - 1, the
/// attention scores 1% off, one letter lowercased wrong) must fail the same checks.
#[test]
fn the_cpu_stand_in_catches_a_broken_kernel() {
    let Some(k) = CpuKernels::build() else {
        return;
    };
    let checks = kernel_check::kernel_checks(&k, &heads(), None).unwrap();
    assert!(checks.iter().all(|c| c.passed()));
    // Rebuild with mutated sources through the same path: edit the generated file.
    let src = std::fs::read_to_string(k.dir.path().join("kernels.cpp")).unwrap();
    let broken = src
        .replacen(
            "const float inv = 1.0f / sqrtf(block_sum(q, scratch) / (float)h + eps);",
            "const float inv = 1.0f / sqrtf(block_sum(q, scratch) / (float)(h - 1) + eps);",
            1,
        )
        .replacen(
            "dot += q[d] * ks[j0 + j][d];",
            "dot += q[d] * ks[j0 + j][d] * 1.01f;",
            1,
        )
        .replacen("? b + 32 : b", "? b + 31 : b", 1);
    assert_ne!(src, broken, "the mutations must apply");
    std::fs::write(k.dir.path().join("kernels.cpp"), broken).unwrap();
    k.compile();
    let checks = kernel_check::kernel_checks(&k, &heads(), Some(&table())).unwrap();
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.kernel)
        .collect();
    assert!(
        failed.contains(&"embed_layernorm")
            && failed.contains(&"attention_varlen")
            && failed.contains(&"wordpiece_ascii"),
        "{checks:?}"
    );
}
