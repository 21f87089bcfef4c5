//! bf16 GEMM for the encoder's linear layers on CPUs with AVX512-BF16 (Zen 4, Sapphire
//! Rapids and later). `vdpbf16ps` does two multiply-adds per f32 lane, twice the f32 FMA
//! rate, and accumulates in f32. Weights are rounded and packed once (first use), so no call
//! re-packs them (the f32 `gemm` crate re-packs all 42 MB per forward pass); activations
//! are rounded to bf16 (round-to-nearest-even) per call.
//!
//! Layout: B (k×n, row-major f32) becomes panels of `NR` columns; inside a panel, row pair
//! `j` holds for each column the u32 `(bf16 b[2j+1][c] << 16) | bf16 b[2j][c]`, which is what
//! one 32-bit lane of `vdpbf16ps` multiplies against a broadcast pair `(a[2j], a[2j+1])`.
use rayon::prelude::*;

// Tasks write disjoint (row block × panel) regions of the output (see `matmul`).
use super::par::SendPtr;

/// Columns per panel: four zmm accumulators per row.
const NR: usize = 64;
/// Rows per micro-tile: 6 × 4 = 24 accumulators, leaving registers for B and the broadcast.
const MR: usize = 6;
/// Rows per task: a task's A rows (≤ 96 × 1536 bf16 = 288 KB) stay in L2 across its panel.
const MC: usize = MR * 16;

/// True when this CPU runs the bf16 kernel (checked at run time, once per call site).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether bf16 is worth taking over f32 when nothing better is (`precision = auto`). Only
/// on AMD: bf16 ran ×1.6 f32 on a 2-core Zen 5, but ×0.67–0.96 of f32 on a
/// Sapphire-Rapids-class Xeon at 2 and 16 threads (benches/README.md, 2026-12-04), where
/// `vdpbf16ps` likely has fewer ports than the FMAs it replaces.
pub fn preferred() -> bool {
    available() && cpu_vendor_is_amd()
}

fn cpu_vendor_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU (the intrinsic is safe on newer
        // toolchains, hence the allow).
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        // The vendor string is EBX, EDX, ECX: "Auth" "enti" "cAMD".
        (r.ebx, r.edx, r.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Round-to-nearest-even f32 → bf16 bits (what `vcvtne2ps2bf16` does).
fn bf16_bits(x: f32) -> u32 {
    half::bf16::from_f32(x).to_bits() as u32
}

/// A weight matrix, rounded to bf16 and packed for [`matmul`].
pub struct PackedB {
    k: usize,
    n: usize,
    k2: usize,
    data: Vec<u32>,
}

impl PackedB {
    /// Packs row-major `b` (k × n). Odd `k` and a partial last panel are zero-padded.
    pub fn pack(b: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(
            b.len(),
            k * n,
            "PackedB::pack: {} values for {k}×{n}",
            b.len()
        );
        let k2 = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * k2 * NR];
        if data.is_empty() {
            return Self { k, n, k2, data }; // k or n is 0: `matmul` never reads it
        }
        data.par_chunks_mut(k2 * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..k2 {
                    for c in 0..NR {
                        let col = p * NR + c;
                        if col >= n {
                            break;
                        }
                        let lo = bf16_bits(b[2 * j * n + col]);
                        let hi = if 2 * j + 1 < k {
                            bf16_bits(b[(2 * j + 1) * n + col])
                        } else {
                            0
                        };
                        panel[j * NR + c] = (hi << 16) | lo;
                    }
                }
            });
        Self { k, n, k2, data }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// The value the kernel multiplies by at (row, col): the weight after rounding.
    pub fn get(&self, row: usize, col: usize) -> f32 {
        let (p, c) = (col / NR, col % NR);
        let v = self.data[p * self.k2 * NR + (row / 2) * NR + c];
        let bits = if row.is_multiple_of(2) {
            v & 0xffff
        } else {
            v >> 16
        };
        half::bf16::from_bits(bits as u16).to_f32()
    }
}

/// Rounds the rows of `a` (m × k) to bf16 pairs, `k2` u32 per row, rows padded to a
/// multiple of `MR` with zeros.
fn round_rows(a: &[f32], m: usize, k: usize) -> Vec<u32> {
    let k2 = k.div_ceil(2);
    let mut out = vec![0u32; m.div_ceil(MR) * MR * k2];
    out.par_chunks_mut(k2 * 16)
        .zip(a.par_chunks(k * 16))
        .for_each(|(dst, src)| {
            for (d, s) in dst.chunks_mut(k2).zip(src.chunks(k)) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `matmul` runs only where `available()` holds; `d` holds
                // k.div_ceil(2) words for the k floats of `s`.
                unsafe {
                    x86::round_row(s, d)
                }
                #[cfg(not(target_arch = "x86_64"))]
                round_row_scalar(s, d);
            }
        });
    out
}

#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn round_row_scalar(s: &[f32], d: &mut [u32]) {
    for (j, w) in d.iter_mut().enumerate() {
        let lo = bf16_bits(s[2 * j]);
        let hi = s.get(2 * j + 1).map_or(0, |&v| bf16_bits(v));
        *w = (hi << 16) | lo;
    }
}

/// `dst[m,n] (+)= a[m,k] · B` with `a` and `dst` row-major and contiguous; with
/// `accumulate` the product is added to what `dst` holds. Parallel over the current
/// rayon pool. Panics on mismatched shapes or when [`available`] is false.
pub fn matmul(dst: &mut [f32], a: &[f32], b: &PackedB, m: usize, accumulate: bool) {
    let (k, n) = (b.k, b.n);
    assert!(
        dst.len() == m * n && a.len() == m * k,
        "bf16::matmul: shapes"
    );
    assert!(available(), "bf16::matmul on a CPU without AVX512-BF16");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let k2 = b.k2;
    let ar = round_rows(a, m, k);
    let panels = n.div_ceil(NR);
    let blocks = m.div_ceil(MC);
    let out = SendPtr(dst.as_mut_ptr());
    (0..blocks * panels).into_par_iter().for_each(|task| {
        let (blk, p) = (task / panels, task % panels);
        let panel = &b.data[p * k2 * NR..(p + 1) * k2 * NR];
        let cols = (n - p * NR).min(NR);
        let row_end = ((blk + 1) * MC).min(m);
        let mut r0 = blk * MC;
        while r0 < row_end {
            let rows = (row_end - r0).min(MR);
            let a_tile = &ar[r0 * k2..(r0 + MR) * k2];
            // SAFETY: `a_tile` holds MR rows of k2 words (rows padded to MR) and `panel`
            // k2 × NR words; the tile writes rows r0..r0+rows and columns
            // p·NR..p·NR+cols of `dst`, inside its m × n bounds and disjoint from
            // every other task's region.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::tile(
                    a_tile,
                    k2,
                    panel,
                    out.get().add(r0 * n + p * NR),
                    n,
                    rows,
                    cols,
                    accumulate,
                );
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (a_tile, panel, rows, cols, out, k2);
            r0 += MR;
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;
    use std::mem::transmute;

    // There are no cast intrinsics for `__m512bh`; both types are 64 plain bytes.
    #[inline(always)]
    fn bh(v: __m512i) -> __m512bh {
        // SAFETY: same size, every bit pattern valid for both.
        unsafe { transmute::<__m512i, __m512bh>(v) }
    }
    #[inline(always)]
    fn si(v: __m512bh) -> __m512i {
        // SAFETY: as for `bh`.
        unsafe { transmute::<__m512bh, __m512i>(v) }
    }

    /// bf16 pairs of one row; vector conversion in 32-float steps, scalar tail.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_row(s: &[f32], d: &mut [u32]) {
        let full = s.len() / 32;
        for i in 0..full {
            // SAFETY: (the caller's contract) 32 floats at 32·i are inside `s`, 16 words inside `d`.
            unsafe {
                let lo = _mm512_loadu_ps(s.as_ptr().add(32 * i));
                let hi = _mm512_loadu_ps(s.as_ptr().add(32 * i + 16));
                // The second operand fills the low half: floats stay in order.
                let v = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(d.as_mut_ptr().add(16 * i) as *mut _, si(v));
            }
        }
        super::round_row_scalar(&s[32 * full..], &mut d[16 * full..]);
    }

    /// One MR × NR tile: `c[r][0..cols] (+)= Σ_j a[r][j] · panel[j]` for r < rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        a: &[u32],
        k2: usize,
        panel: &[u32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        debug_assert!(a.len() >= MR * k2 && panel.len() >= k2 * NR);
        let mut acc = [[_mm512_setzero_ps(); NR / 16]; MR];
        let (ap, bp) = (a.as_ptr(), panel.as_ptr());
        for j in 0..k2 {
            // SAFETY: (the caller's contract) j < k2 keeps every read inside `a` and `panel`.
            unsafe {
                let b = bp.add(j * NR);
                let bv: [__m512bh; NR / 16] = [
                    bh(_mm512_loadu_si512(b as *const _)),
                    bh(_mm512_loadu_si512(b.add(16) as *const _)),
                    bh(_mm512_loadu_si512(b.add(32) as *const _)),
                    bh(_mm512_loadu_si512(b.add(48) as *const _)),
                ];
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av = bh(_mm512_set1_epi32(*ap.add(r * k2 + j) as i32));
                    for (q, acc_q) in acc_r.iter_mut().enumerate() {
                        *acc_q = _mm512_dpbf16_ps(*acc_q, av, bv[q]);
                    }
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            for (q, &v) in acc_r.iter().enumerate() {
                let col = q * 16;
                if col >= cols {
                    break;
                }
                let lanes = (cols - col).min(16);
                let mask: __mmask16 = if lanes == 16 {
                    0xffff
                } else {
                    (1u16 << lanes) - 1
                };
                // SAFETY: (the caller's contract) row r < rows and the masked columns < cols are inside dst.
                unsafe {
                    let p = c.add(r * ldc + col);
                    let v = if accumulate {
                        _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p))
                    } else {
                        v
                    };
                    _mm512_mask_storeu_ps(p, mask, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPUID vendor test agrees with the kernel's own reading of it.
    #[test]
    fn cpu_vendor_matches_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            return; // not Linux: nothing to compare against
        };
        let vendor = info
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id"))
            .and_then(|v| v.split(':').nth(1))
            .map(str::trim);
        if let Some(v) = vendor {
            assert_eq!(cpu_vendor_is_amd(), v == "AuthenticAMD", "vendor_id {v}");
        }
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Exact reference: the same bf16-rounded inputs, products summed in f64.
    fn reference(a: &[f32], b: &PackedB, m: usize) -> Vec<f32> {
        let (k, n) = (b.k(), b.n());
        let round = |x: f32| half::bf16::from_f32(x).to_f32() as f64;
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|t| round(a[i * k + t]) * b.get(t, j) as f64)
                    .sum();
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn matches_reference_on_ragged_shapes() {
        if !available() {
            eprintln!("SKIPPED: this CPU has no AVX512-BF16");
            return;
        }
        let mut seed = 7u64;
        // Rows not a multiple of MR or MC, odd k, n with a partial panel, and n < 16.
        for &(m, k, n) in &[
            (1, 2, 1),
            (5, 7, 13),
            (7, 33, 70),
            (100, 384, 129),
            (13, 1536, 384),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let bw: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
            let b = PackedB::pack(&bw, k, n);
            for t in 0..k {
                for c in 0..n {
                    let want = half::bf16::from_f32(bw[t * n + c]).to_f32();
                    assert_eq!(b.get(t, c), want);
                }
            }
            let want = reference(&a, &b, m);
            let mut got = vec![0.0f32; m * n];
            matmul(&mut got, &a, &b, m, false);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * (k as f32).sqrt(),
                    "{m}×{k}×{n}: {g} vs {w}"
                );
            }
            // Accumulating adds onto what dst holds.
            let mut acc = vec![1.0f32; m * n];
            matmul(&mut acc, &a, &b, m, true);
            for (g, w) in acc.iter().zip(&want) {
                assert!((g - (w + 1.0)).abs() <= 1e-5 * (k as f32).sqrt() + 1e-6);
            }
        }
    }

    #[test]
    fn empty_shapes_are_no_ops() {
        if !available() {
            eprintln!("SKIPPED: this CPU has no AVX512-BF16");
            return;
        }
        let b = PackedB::pack(&[1.0; 6], 2, 3);
        let mut d: Vec<f32> = Vec::new();
        matmul(&mut d, &[], &b, 0, false);
        assert!(d.is_empty());
        // k = 0: the product is zero (or leaves dst as it is when accumulating).
        let b = PackedB::pack(&[], 0, 3);
        let mut d = vec![5.0f32; 6];
        matmul(&mut d, &[], &b, 2, true);
        assert_eq!(d, vec![5.0; 6]);
        matmul(&mut d, &[], &b, 2, false);
        assert_eq!(d, vec![0.0; 6]);
    }
}
