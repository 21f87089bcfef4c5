//! int8 GEMM for the encoder's linear layers on CPUs without AVX512-BF16 (AVX2 is enough).
//!
//! Weights are quantized once, per output channel, and packed; activations per row (token) on
//! every call. Both are symmetric: activations `-Q..=Q` with `Q = 127`, weights `-Q..=Q` on
//! the VNNI kernels and `-Q7..=Q7` (`Q7 = 63`, 7 bits) on the AVX2 kernel (below). The
//! product is exact in i32:
//!
//! `c[r][n] = s_a[r] · s_w[n] · Σ_k a_q[r][k] · w_q[k][n]`
//!
//! Every vector kernel feeds activations in as `a + 128` (u8) and subtracts each column's
//! `128 · Σ_k w[k][c]`, kept from packing (the scalar reference multiplies signed bytes). With AVX-512 VNNI (Cascade Lake and later Xeons,
//! Zen 4/5) `vpdpbusd` sums four u8 × s8 products straight into i32 without saturating;
//! AVX-VNNI (the VEX form on ymm, on CPUs without AVX-512) runs the same scheme on a 4 × 16
//! tile. AVX2 has no int8 dot product with i32 accumulation: `vpmaddubsw` multiplies u8 by s8
//! and adds pairs into a *saturating* i16, and `vpmaddwd` by ones widens pairs to i32. With
//! 7-bit weights a pair is at most 2 · 255 · 63 = 32,130, so it never saturates and the AVX2
//! kernel equals the scalar reference bit for bit on its own weights. (ONNX Runtime's u8 × s8
//! path uses 8-bit weights and can saturate, which is how it loses this model: min cosine
//! 0.82 against f32 on the dev prompts.) The 7-bit weights passed the dev accuracy gate
//! (benches/README.md, 2026-12-04); they replace a sign trick (`|a|` times `w` with `a`'s
//! sign, `vpsignb`) that kept 8-bit weights at three more instructions per row and group of
//! four k (×1.15 on the dev mix). So the kernel decides the weights' width:
//! `TIERGATE_INT8_KERNEL=avx2` on a VNNI CPU computes exactly what an AVX2-only CPU does.
//!
//! Outlier channels: a few hidden channels carry activations far larger than the rest, and a
//! per-token scale set by them leaves the others few levels. [`PackedI8::pack_smoothed`] moves
//! that range into the weights (SmoothQuant): input channel `c` is divided by
//! `t_c = sqrt(max|a_c| / max|w_c|)` before quantizing and its weight row multiplied by it,
//! the product unchanged; `max|a_c|` comes from calibration prompts (`Smoothing`).
//!
//! Layout: B (k × n, row-major f32) becomes panels of `NR` columns; inside a panel, group `g`
//! of four rows holds for each column the four bytes `w[4g..4g+4][c]`, which is what one
//! 32-bit lane multiplies against a broadcast `a[4g..4g+4]`.
use rayon::prelude::*;

use super::par::SendPtr;

/// Levels each side of zero: activations, and weights on every kernel but AVX2.
pub const Q: i32 = 127;
/// Levels each side of zero of the AVX2 kernel's weights.
pub const Q7: i32 = 63;
// A pair of u8 × s7 products must fit vpmaddubsw's i16 exactly.
const _: () = assert!(2 * (2 * Q + 1) * Q7 <= i16::MAX as i32);

/// Columns per panel: two ymm accumulators per row.
const NR: usize = 16;
/// Rows per micro-tile: 4 × 2 accumulators, leaving registers for B, the broadcast and temps.
const MR: usize = 4;
/// Rows per micro-tile of the AVX-512 VNNI kernel: one zmm accumulator per row.
const MR_VNNI: usize = 8;
/// Quantized activations are padded to a multiple of every kernel's row count.
const ROW_PAD: usize = 8;
/// Rows per task, so a task's A rows (≤ 64 × 1536 bytes) stay in L2 across its panels.
const MC: usize = 64;
/// Panels per task: enough work per task to amortise scheduling at batch 1.
const PC: usize = 4;

/// True when this CPU has a vector kernel (otherwise the scalar reference runs: the VNNI
/// kernels' numbers, 8-bit weights, much slower).
pub fn available() -> bool {
    best_kernel() != Kernel::Scalar
}

/// The inner kernels. Given the same packed weights all compute the same integers; the AVX2
/// kernel needs weights packed at 7 bits ([`Kernel::weight_levels`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    /// `vpmaddubsw` + `vpmaddwd` on 7-bit weights, 4 × 16 tile.
    Avx2,
    /// VEX `vpdpbusd` on ymm (AVX-VNNI: what Intel's client cores since Alder Lake and its
    /// E-core Xeons (Sierra Forest) have instead of AVX-512), 4 × 16 tile.
    AvxVnni,
    /// `vpdpbusd` on zmm, 8 × 16 tile.
    Avx512Vnni,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::AvxVnni => "avx-vnni",
            Kernel::Avx512Vnni => "avx512-vnni",
        }
    }

    /// A `vpdpbusd` kernel: four u8 × s8 products summed into i32 per instruction, without
    /// saturating (so 8-bit weights), and int8 beats bf16 and f32 wherever one runs.
    pub fn is_vnni(self) -> bool {
        matches!(self, Kernel::AvxVnni | Kernel::Avx512Vnni)
    }

    /// Levels each side of zero of the weights this kernel multiplies: [`Q7`] for AVX2 (so
    /// `vpmaddubsw` cannot saturate), [`Q`] elsewhere.
    pub fn weight_levels(self) -> i32 {
        match self {
            Kernel::Avx2 => Q7,
            _ => Q,
        }
    }

    /// The weights' width in bits: 7 on AVX2, 8 elsewhere (logs and the numerics' name).
    pub fn weight_bits(self) -> u32 {
        if self.weight_levels() == Q {
            8
        } else {
            7
        }
    }

    /// Whether weights packed at ±`levels` are exact on this kernel (no narrower than it).
    pub fn takes(self, levels: i32) -> bool {
        levels <= self.weight_levels()
    }

    fn rows(self) -> usize {
        match self {
            Kernel::Avx512Vnni => MR_VNNI,
            _ => MR,
        }
    }
}

/// Every kernel this CPU can run, the fastest last.
pub fn kernels() -> Vec<Kernel> {
    #[allow(unused_mut)]
    let mut k = vec![Kernel::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            k.push(Kernel::Avx2);
            if has!("avxvnni") {
                k.push(Kernel::AvxVnni);
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                k.push(Kernel::Avx512Vnni);
            }
        }
    }
    k
}

/// Picks a named int8 kernel this CPU has (`scalar`, `avx2`, `avx-vnni`, `avx512-vnni`), so an
/// AVX-512 machine can measure the path AVX2-only node pools run, with their numerics: the
/// weights are packed at the named kernel's width.
pub const KERNEL_ENV: &str = "TIERGATE_INT8_KERNEL";

/// The kernel [`KERNEL_ENV`] names (`None` when unset or empty); an unknown name or one this
/// CPU lacks is an error. Entry points call this at start so a bad value is refused there.
pub fn kernel_from_env() -> Result<Option<Kernel>, String> {
    match std::env::var_os(KERNEL_ENV) {
        Some(v) => parse_kernel(&v.to_string_lossy()),
        None => Ok(None),
    }
}

/// A [`KERNEL_ENV`] value: blank is `None`; else a kernel this CPU has, by [`Kernel::name`].
fn parse_kernel(v: &str) -> Result<Option<Kernel>, String> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let all = [
        Kernel::Scalar,
        Kernel::Avx2,
        Kernel::AvxVnni,
        Kernel::Avx512Vnni,
    ];
    let Some(k) = all.into_iter().find(|k| k.name() == v) else {
        return Err(format!(
            "{KERNEL_ENV}={v:?}: unknown int8 kernel (scalar, avx2, avx-vnni, avx512-vnni)"
        ));
    };
    if !kernels().contains(&k) {
        return Err(format!("{KERNEL_ENV}={v}: this CPU cannot run that kernel"));
    }
    Ok(Some(k))
}

/// The fastest kernel this CPU has.
pub fn best_kernel() -> Kernel {
    kernels().last().copied().unwrap_or(Kernel::Scalar)
}

/// The kernel [`matmul`] runs on this CPU: the fastest, or the one [`KERNEL_ENV`] names.
pub fn kernel() -> Kernel {
    static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        let best = best_kernel();
        match kernel_from_env() {
            Ok(k) => k.unwrap_or(best),
            // Entry points refuse a bad value first; a library caller gets the best kernel.
            Err(e) => {
                tracing::warn!("{e}; using {}", best.name());
                best
            }
        }
    })
}

/// A weight matrix, quantized per output column and packed for [`matmul`].
pub struct PackedI8 {
    k: usize,
    n: usize,
    k4: usize,
    /// `panels × k4 × NR × 4` bytes.
    data: Vec<i8>,
    /// Per column: the dequantization scale.
    scale: Vec<f32>,
    /// Levels each side of zero the weights were quantized to.
    levels: i32,
    /// Per column (padded to whole panels): `128 · Σ_k w_q[k][c]`, what the vector kernels'
    /// unsigned activations add.
    comp: Vec<i32>,
    /// Per input channel: what activations are multiplied by before quantizing (`1 / t_c`),
    /// when smoothed.
    act_mul: Option<Vec<f32>>,
}

impl PackedI8 {
    /// Quantizes and packs row-major `b` (k × n) for [`kernel`]. A partial last group of rows
    /// and a partial last panel are zero-padded.
    pub fn pack(b: &[f32], k: usize, n: usize) -> Self {
        Self::pack_for(kernel(), b, k, n)
    }

    /// [`Self::pack`] for a given kernel (its weight width).
    pub fn pack_for(kern: Kernel, b: &[f32], k: usize, n: usize) -> Self {
        Self::pack_inner(b, k, n, None, kern.weight_levels())
    }

    /// [`Self::pack`] with input channel `c`'s range moved into the weights, given the
    /// largest `|a_c|` seen on calibration prompts (`act_max.len() == k`).
    pub fn pack_smoothed(b: &[f32], k: usize, n: usize, act_max: &[f32]) -> Self {
        assert_eq!(b.len(), k * n, "PackedI8::pack_smoothed: shapes");
        assert_eq!(
            act_max.len(),
            k,
            "PackedI8::pack_smoothed: one maximum per input channel"
        );
        let t: Vec<f32> = (0..k)
            .map(|c| {
                let w = (0..n).fold(0.0f32, |m, j| m.max(b[c * n + j].abs()));
                let a = act_max[c];
                if a > 0.0 && w > 0.0 && a.is_finite() {
                    (a / w).sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        let scaled: Vec<f32> = b
            .chunks(n.max(1))
            .zip(&t)
            .flat_map(|(row, &tc)| row.iter().map(move |&w| w * tc))
            .collect();
        let inv = t.iter().map(|&tc| 1.0 / tc).collect();
        Self::pack_inner(&scaled, k, n, Some(inv), kernel().weight_levels())
    }

    fn pack_inner(b: &[f32], k: usize, n: usize, act_mul: Option<Vec<f32>>, levels: i32) -> Self {
        assert_eq!(
            b.len(),
            k * n,
            "PackedI8::pack: {} values for {k}×{n}",
            b.len()
        );
        let k4 = k.div_ceil(4);
        let mut scale = vec![0.0f32; n];
        for (c, s) in scale.iter_mut().enumerate() {
            let amax = (0..k).map(|r| b[r * n + c].abs()).fold(0.0f32, f32::max);
            *s = if amax > 0.0 {
                amax / levels as f32
            } else {
                1.0
            };
        }
        let q = |r: usize, c: usize| -> i8 {
            let v = (b[r * n + c] / scale[c]).round();
            v.clamp(-levels as f32, levels as f32) as i8
        };
        let panels = n.div_ceil(NR);
        let mut data = vec![0i8; panels * k4 * NR * 4];
        if !data.is_empty() {
            data.par_chunks_mut(k4 * NR * 4)
                .enumerate()
                .for_each(|(p, panel)| {
                    for g in 0..k4 {
                        for c in 0..NR.min(n - p * NR) {
                            for i in 0..4 {
                                let r = 4 * g + i;
                                if r < k {
                                    panel[(g * NR + c) * 4 + i] = q(r, p * NR + c);
                                }
                            }
                        }
                    }
                });
        }
        let mut comp = vec![0i32; panels * NR];
        for (p, panel) in data.chunks(k4.max(1) * NR * 4).enumerate() {
            for (i, &w) in panel.iter().enumerate() {
                comp[p * NR + (i / 4) % NR] += 128 * w as i32;
            }
        }
        Self {
            k,
            n,
            k4,
            data,
            scale,
            levels,
            comp,
            act_mul,
        }
    }

    /// Levels each side of zero the weights were quantized to ([`Kernel::weight_levels`]).
    pub fn levels(&self) -> i32 {
        self.levels
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// The value the kernel multiplies by at (row, col), dequantized (smoothing undone).
    pub fn get(&self, row: usize, col: usize) -> f32 {
        let (p, c) = (col / NR, col % NR);
        let v = self.data[((p * self.k4 + row / 4) * NR + c) * 4 + row % 4];
        let m = self.act_mul.as_ref().map_or(1.0, |m| m[row]);
        v as f32 * self.scale[col] * m
    }

    /// Bytes held (weights and scales).
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * self.n
    }
}

/// Activations of one call: rows quantized to `-Q..=Q`, `k4 · 4` bytes per row (zero
/// padded), rows padded to a multiple of `ROW_PAD`.
struct QuantRows {
    data: Vec<i8>,
    scale: Vec<f32>,
}

fn quantize_rows(a: &[f32], m: usize, k: usize, act_mul: Option<&[f32]>) -> QuantRows {
    let lda = k.div_ceil(4) * 4;
    let rows = m.div_ceil(ROW_PAD) * ROW_PAD;
    let mut q = QuantRows {
        data: vec![0i8; rows * lda],
        scale: vec![0.0f32; rows],
    };
    q.data
        .par_chunks_mut(lda * 16)
        .zip(q.scale.par_chunks_mut(16))
        .zip(a.par_chunks(k * 16))
        .for_each(|((d, s), src)| {
            let mut tmp = Vec::new();
            for ((d, s), row) in d.chunks_mut(lda).zip(s.iter_mut()).zip(src.chunks(k)) {
                let row = match act_mul {
                    Some(mul) => {
                        tmp.clear();
                        tmp.extend(row.iter().zip(mul).map(|(&x, &f)| x * f));
                        &tmp[..]
                    }
                    None => row,
                };
                *s = quantize_row_dispatch(row, d);
            }
        });
    q
}

/// [`quantize_row`], vectorized where the CPU has AVX2 (same bytes either way).
fn quantize_row_dispatch(row: &[f32], d: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX2 and FMA were detected; `d` holds at least `row.len()` bytes.
        return unsafe { x86::quantize_row(row, d) };
    }
    quantize_row(row, d)
}

/// One row's scale and its bytes, `round(x / s)` with `s = max|x| / Q` (the division as a
/// multiply by `1 / s`); a row of zeros has scale 0. Non-finite values are the caller's
/// to avoid (the encoder's activations are finite).
fn quantize_row(row: &[f32], d: &mut [i8]) -> f32 {
    let amax = row.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    if amax == 0.0 {
        d[..row.len()].fill(0);
        return 0.0;
    }
    let s = amax / Q as f32;
    let inv = 1.0 / s;
    for (o, &x) in d.iter_mut().zip(row) {
        *o = (x * inv).round_ties_even().clamp(-Q as f32, Q as f32) as i8;
    }
    s
}

/// `dst[m,n] (+)= a[m,k] · B` with `a` and `dst` row-major and contiguous; with
/// `accumulate` the product is added to what `dst` holds. Parallel over the current rayon
/// pool. Panics on mismatched shapes.
pub fn matmul(dst: &mut [f32], a: &[f32], b: &PackedI8, m: usize, accumulate: bool) {
    matmul_on(kernel(), dst, a, b, m, accumulate)
}

/// [`matmul`] on a given kernel (tests, benches), which must be one of [`kernels`].
pub fn matmul_on(
    kern: Kernel,
    dst: &mut [f32],
    a: &[f32],
    b: &PackedI8,
    m: usize,
    accumulate: bool,
) {
    assert!(
        kernels().contains(&kern),
        "int8::matmul: {kern:?} unavailable"
    );
    assert!(
        kern.takes(b.levels),
        "int8::matmul: {kern:?} needs weights packed at ±{} levels, not ±{}",
        kern.weight_levels(),
        b.levels
    );
    let (k, n) = (b.k, b.n);
    assert!(
        dst.len() == m * n && a.len() == m * k,
        "int8::matmul: shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let mut q = quantize_rows(a, m, k, b.act_mul.as_deref());
    if kern != Kernel::Scalar {
        // a + 128 as u8 (two's complement: flipping the top bit), the unsigned operand of
        // vpdpbusd and vpmaddubsw.
        q.data.iter_mut().for_each(|x| *x ^= i8::MIN);
    }
    let mr = kern.rows();
    let panels = n.div_ceil(NR);
    let groups = panels.div_ceil(PC);
    let blocks = m.div_ceil(MC);
    let out = SendPtr(dst.as_mut_ptr());
    let lda = b.k4 * 4;
    (0..blocks * groups).into_par_iter().for_each(|task| {
        let (blk, grp) = (task / groups, task % groups);
        let row_end = ((blk + 1) * MC).min(m);
        for p in grp * PC..((grp + 1) * PC).min(panels) {
            let panel = &b.data[p * b.k4 * NR * 4..(p + 1) * b.k4 * NR * 4];
            let cols = (n - p * NR).min(NR);
            let mut r0 = blk * MC;
            while r0 < row_end {
                let rows = (row_end - r0).min(mr);
                let t = Tile {
                    a: &q.data[r0 * lda..(r0 + mr) * lda],
                    k4: b.k4,
                    panel,
                    a_scale: &q.scale[r0..r0 + mr],
                    w_scale: &b.scale[p * NR..p * NR + cols],
                    comp: &b.comp[p * NR..p * NR + cols],
                    rows,
                    accumulate,
                };
                // SAFETY: the tile writes rows r0..r0+rows and columns p·NR..p·NR+cols of
                // `dst`, inside its m × n bounds (row stride n) and disjoint from every other
                // task's region; `t`'s slices hold `mr` rows of A (MC and ROW_PAD are
                // multiples of it) and a whole panel; `kern` was detected on this CPU.
                unsafe {
                    let c = out.get().add(r0 * n + p * NR);
                    match kern {
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 => x86::tile(&t, c, n),
                        #[cfg(target_arch = "x86_64")]
                        Kernel::AvxVnni => x86::tile_avx_vnni(&t, c, n),
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx512Vnni => x86::tile_vnni(&t, c, n),
                        _ => tile_scalar(&t, c, n),
                    }
                }
                r0 += mr;
            }
        }
    });
}

/// One MR × NR tile's inputs.
struct Tile<'a> {
    /// Quantized activations: as i8 for the scalar kernel, as `a + 128` (u8) for the others.
    a: &'a [i8],
    k4: usize,
    panel: &'a [i8],
    a_scale: &'a [f32],
    w_scale: &'a [f32],
    /// Per column, what unsigned activations add to the sums.
    comp: &'a [i32],
    rows: usize,
    accumulate: bool,
}

/// The same integer sums and the same f32 epilogue as the vector kernel.
///
/// # Safety
/// `c` must be valid for writes of `t.rows` rows of `t.w_scale.len()` floats at stride `ldc`.
unsafe fn tile_scalar(t: &Tile<'_>, c: *mut f32, ldc: usize) {
    let lda = t.k4 * 4;
    for r in 0..t.rows {
        for (col, &ws) in t.w_scale.iter().enumerate() {
            let mut acc = 0i32;
            for g in 0..t.k4 {
                for i in 0..4 {
                    let a = t.a[r * lda + 4 * g + i] as i32;
                    let w = t.panel[(g * NR + col) * 4 + i] as i32;
                    acc += a * w;
                }
            }
            let v = acc as f32 * (t.a_scale[r] * ws);
            // SAFETY: (the caller's contract) row r < rows and col < cols are inside dst.
            unsafe {
                let p = c.add(r * ldc + col);
                *p = if t.accumulate { *p + v } else { v };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, MR, MR_VNNI, NR, Q};
    use std::arch::x86_64::*;

    /// [`super::quantize_row`] eight floats at a time; `vcvtps2dq` rounds to nearest even
    /// (the default MXCSR mode), as `round_ties_even` does.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_row(row: &[f32], d: &mut [i8]) -> f32 {
        assert!(d.len() >= row.len());
        let p = row.as_ptr();
        let n8 = row.len() / 8 * 8;
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
        let mut m = _mm256_setzero_ps();
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 <= n8 <= row.len().
            m = _mm256_max_ps(
                m,
                _mm256_and_ps(unsafe { _mm256_loadu_ps(p.add(i)) }, abs_mask),
            );
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        let amax = lanes
            .iter()
            .chain(&row[n8..])
            .fold(0.0f32, |m, &x| m.max(x.abs()));
        if amax == 0.0 {
            d[..row.len()].fill(0);
            return 0.0;
        }
        let s = amax / Q as f32;
        let inv = 1.0 / s;
        let vinv = _mm256_set1_ps(inv);
        // packs works within 128-bit lanes; this puts the 32-bit groups back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let n32 = row.len() / 32 * 32;
        for i in (0..n32).step_by(32) {
            // SAFETY: i + 32 <= row.len() <= d.len(). |x · inv| ≤ Q (up to rounding of
            // `inv`, which the saturating packs absorb into ±127 = ±Q).
            unsafe {
                let q = |j: usize| {
                    _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(i + j)), vinv))
                };
                let w0 = _mm256_packs_epi32(q(0), q(8));
                let w1 = _mm256_packs_epi32(q(16), q(24));
                let b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w0, w1), order);
                _mm256_storeu_si256(d.as_mut_ptr().add(i) as *mut __m256i, b);
            }
        }
        for (o, &x) in d[n32..].iter_mut().zip(&row[n32..]) {
            *o = (x * inv).round_ties_even().clamp(-Q as f32, Q as f32) as i8;
        }
        s
    }

    /// Subtracts what the `+ 128` of unsigned activations added: `t.comp` per column (a
    /// partial panel's missing columns compensate nothing; their sums are never stored).
    #[target_feature(enable = "avx2")]
    fn uncompensate(acc: &mut [[__m256i; 2]; MR], t: &Tile<'_>) {
        let mut comp = [0i32; NR];
        comp[..t.comp.len()].copy_from_slice(t.comp);
        // SAFETY: `comp` holds NR = 16 i32s.
        let comp = unsafe {
            [
                _mm256_loadu_si256(comp.as_ptr() as *const __m256i),
                _mm256_loadu_si256(comp.as_ptr().add(8) as *const __m256i),
            ]
        };
        for acc_r in acc.iter_mut() {
            for (v, cv) in acc_r.iter_mut().zip(comp) {
                *v = _mm256_sub_epi32(*v, cv);
            }
        }
    }

    /// `c[r][0..cols] (+)= tile` for r < rows: `vpmaddubsw` of `a + 128` (u8) and 7-bit
    /// weights (a pair ≤ 2 · 255 · 63, exact in i16), `vpmaddwd` by ones into i32, `t.comp`
    /// taken out at the end.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `c` as for [`super::tile_scalar`]. (The sums are
    /// right only for weights within ±[`super::Q7`], which `matmul_on` checks.)
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(t: &Tile<'_>, c: *mut f32, ldc: usize) {
        assert!(t.a.len() >= MR * t.k4 * 4);
        debug_assert!(t.panel.len() >= t.k4 * NR * 4);
        let lda = t.k4 * 4;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        let (ap, bp) = (t.a.as_ptr(), t.panel.as_ptr());
        for g in 0..t.k4 {
            // SAFETY: g < k4 keeps every read inside `t.a` (MR rows of lda bytes each) and
            // the panel.
            unsafe {
                let b = bp.add(g * NR * 4);
                let b0 = _mm256_loadu_si256(b as *const __m256i);
                let b1 = _mm256_loadu_si256(b.add(32) as *const __m256i);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let word = (ap.add(r * lda + 4 * g) as *const i32).read_unaligned();
                    let av = _mm256_set1_epi32(word);
                    let p0 = _mm256_maddubs_epi16(av, b0);
                    let p1 = _mm256_maddubs_epi16(av, b1);
                    acc_r[0] = _mm256_add_epi32(acc_r[0], _mm256_madd_epi16(p0, ones));
                    acc_r[1] = _mm256_add_epi32(acc_r[1], _mm256_madd_epi16(p1, ones));
                }
            }
        }
        uncompensate(&mut acc, t);
        // SAFETY: the caller's contract, passed on.
        unsafe { store_ymm(&acc, t, c, ldc) }
    }

    /// [`tile`] with VEX `vpdpbusd` (one instruction for the AVX2 kernel's three, no
    /// saturation, so 8-bit weights), as in [`tile_vnni`].
    ///
    /// # Safety
    /// AVX2, FMA and AVX-VNNI must be available; `c` as for [`super::tile_scalar`].
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn tile_avx_vnni(t: &Tile<'_>, c: *mut f32, ldc: usize) {
        debug_assert!(t.a.len() >= MR * t.k4 * 4 && t.panel.len() >= t.k4 * NR * 4);
        let lda = t.k4 * 4;
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        let (ap, bp) = (t.a.as_ptr(), t.panel.as_ptr());
        for g in 0..t.k4 {
            // SAFETY: as in [`tile`].
            unsafe {
                let b = bp.add(g * NR * 4);
                let b0 = _mm256_loadu_si256(b as *const __m256i);
                let b1 = _mm256_loadu_si256(b.add(32) as *const __m256i);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let word = (ap.add(r * lda + 4 * g) as *const i32).read_unaligned();
                    let av = _mm256_set1_epi32(word);
                    acc_r[0] = _mm256_dpbusd_avx_epi32(acc_r[0], av, b0);
                    acc_r[1] = _mm256_dpbusd_avx_epi32(acc_r[1], av, b1);
                }
            }
        }
        uncompensate(&mut acc, t);
        // SAFETY: the caller's contract, passed on.
        unsafe { store_ymm(&acc, t, c, ldc) }
    }

    /// The AVX2 kernels' epilogue: `c[r][0..cols] (+)= sums · a_scale[r] · w_scale`.
    ///
    /// # Safety
    /// AVX2 must be available; `c` as for [`super::tile_scalar`].
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_ymm(acc: &[[__m256i; 2]; MR], t: &Tile<'_>, c: *mut f32, ldc: usize) {
        let cols = t.w_scale.len();
        for (r, acc_r) in acc.iter().enumerate().take(t.rows) {
            let a_scale = _mm256_set1_ps(t.a_scale[r]);
            for (h, &v) in acc_r.iter().enumerate() {
                let col = h * 8;
                if col >= cols {
                    break;
                }
                let lanes = (cols - col).min(8);
                // SAFETY: (the caller's contract) row r < rows and columns < cols are inside
                // dst and this tile's scales; a full group of 8 is read and written plainly,
                // a partial one through a mask (masked stores are slow on AMD, so only the
                // last panel of an odd width pays for them).
                unsafe {
                    let p = c.add(r * ldc + col);
                    if lanes == 8 {
                        // One product of scales, then one multiply: as the scalar epilogue.
                        let ws = _mm256_loadu_ps(t.w_scale.as_ptr().add(col));
                        let y = _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(a_scale, ws));
                        let y = if t.accumulate {
                            _mm256_add_ps(_mm256_loadu_ps(p), y)
                        } else {
                            y
                        };
                        _mm256_storeu_ps(p, y);
                    } else {
                        // Lanes < `lanes` have their sign bit set.
                        let mask = _mm256_cmpgt_epi32(
                            _mm256_set1_epi32(lanes as i32),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                        );
                        let ws = _mm256_maskload_ps(t.w_scale.as_ptr().add(col), mask);
                        let y = _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(a_scale, ws));
                        let y = if t.accumulate {
                            _mm256_add_ps(_mm256_maskload_ps(p, mask), y)
                        } else {
                            y
                        };
                        _mm256_maskstore_ps(p, mask, y);
                    }
                }
            }
        }
    }

    /// [`tile`] with `vpdpbusd` on zmm: `t.a` holds `a + 128` as u8, and `t.comp` takes the
    /// 128s back out, so the sums are [`super::tile_scalar`]'s exactly (no step can saturate:
    /// |sum| ≤ k · 255 · 127).
    ///
    /// # Safety
    /// AVX-512 F, BW and VNNI must be available; `c` as for [`super::tile_scalar`]; `t.a`
    /// holds `MR_VNNI` rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_vnni(t: &Tile<'_>, c: *mut f32, ldc: usize) {
        debug_assert!(t.a.len() >= MR_VNNI * t.k4 * 4 && t.panel.len() >= t.k4 * NR * 4);
        let lda = t.k4 * 4;
        let mut acc = [_mm512_setzero_si512(); MR_VNNI];
        let (ap, bp) = (t.a.as_ptr(), t.panel.as_ptr());
        for g in 0..t.k4 {
            // SAFETY: g < k4 keeps every read inside `t.a` (MR_VNNI rows of lda bytes) and
            // the panel (64 bytes per group).
            unsafe {
                let b = _mm512_loadu_si512(bp.add(g * NR * 4) as *const __m512i);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let word = (ap.add(r * lda + 4 * g) as *const i32).read_unaligned();
                    *acc_r = _mm512_dpbusd_epi32(*acc_r, _mm512_set1_epi32(word), b);
                }
            }
        }
        let cols = t.w_scale.len();
        let mask: __mmask16 = if cols >= NR {
            !0
        } else {
            ((1u32 << cols) - 1) as __mmask16
        };
        // SAFETY: the mask covers the `cols` entries `t.w_scale` and `t.comp` hold.
        let (ws, comp) = unsafe {
            (
                _mm512_maskz_loadu_ps(mask, t.w_scale.as_ptr()),
                _mm512_maskz_loadu_epi32(mask, t.comp.as_ptr()),
            )
        };
        for (r, &v) in acc.iter().enumerate().take(t.rows) {
            let scale = _mm512_mul_ps(_mm512_set1_ps(t.a_scale[r]), ws);
            let y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, comp)), scale);
            // SAFETY: (the caller's contract) row r < rows and the masked columns < cols
            // are inside dst.
            unsafe {
                let p = c.add(r * ldc);
                let y = if t.accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), y)
                } else {
                    y
                };
                _mm512_mask_storeu_ps(p, mask, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// f64 product of the f32 inputs, for the quantization error bound.
    fn exact(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|t| a[i * k + t] as f64 * b[t * n + j] as f64)
                    .sum();
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    /// Every kernel this CPU has against the scalar one (same integers, same epilogue: equal
    /// bit for bit), all near the exact product, and accumulating adds.
    #[test]
    fn kernels_match_scalar_and_exact_on_ragged_shapes() {
        let mut seed = 11u64;
        eprintln!("int8 kernels here: {:?}", kernels());
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 13),
            (7, 33, 70),
            (9, 64, 16),
            (67, 384, 129),
            (13, 1536, 384),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 4.0).collect();
            let bw: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
            let want = exact(&a, &bw, m, k, n);
            // Each weight width against the kernels that take it (every kernel takes 7 bits).
            for levels in [Q, Q7] {
                let b = PackedI8::pack_inner(&bw, k, n, None, levels);
                let mut scalar = vec![0.0f32; m * n];
                matmul_on(Kernel::Scalar, &mut scalar, &a, &b, m, false);
                // Quantization error: each of k products off by about half a step of each side.
                let tol = 0.02 * (Q as f32 / levels as f32) * (k as f32).sqrt() + 1e-6;
                for (g, w) in scalar.iter().zip(&want) {
                    assert!((g - w).abs() <= tol, "{m}×{k}×{n}: {g} vs {w}");
                }
                for kern in kernels().into_iter().filter(|k| k.takes(levels)) {
                    let mut got = vec![0.0f32; m * n];
                    matmul_on(kern, &mut got, &a, &b, m, false);
                    assert_eq!(got, scalar, "{m}×{k}×{n}: {kern:?} and scalar differ");
                    let mut acc = vec![1.0f32; m * n];
                    matmul_on(kern, &mut acc, &a, &b, m, true);
                    let mut acc_scalar = vec![1.0f32; m * n];
                    matmul_on(Kernel::Scalar, &mut acc_scalar, &a, &b, m, true);
                    assert_eq!(acc, acc_scalar, "{m}×{k}×{n}: {kern:?} accumulating");
                    for (x, g) in acc.iter().zip(&got) {
                        assert!((x - (g + 1.0)).abs() <= 1e-5 * g.abs().max(1.0));
                    }
                }
            }
        }
    }

    /// The widest products each width allows (activations at ±Q, so `a + 128` at 255 and 1,
    /// weights at their extremes): no kernel saturates, all equal the scalar sums.
    #[test]
    fn extreme_products_do_not_saturate() {
        let (m, k, n) = (8, 64, 16);
        // Rows alternate all-max and all-min activations; columns all-max, all-min or mixed.
        let a: Vec<f32> = (0..m * k)
            .map(|i| if (i / k) % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let bw: Vec<f32> = (0..k * n)
            .map(|i| match (i % n) % 3 {
                0 => 1.0,
                1 => -1.0,
                _ if (i / n) % 2 == 0 => 1.0,
                _ => -1.0,
            })
            .collect();
        for levels in [Q, Q7] {
            let b = PackedI8::pack_inner(&bw, k, n, None, levels);
            let mut scalar = vec![0.0f32; m * n];
            matmul_on(Kernel::Scalar, &mut scalar, &a, &b, m, false);
            let want = exact(&a, &bw, m, k, n);
            assert_eq!(scalar, want, "±1 inputs are exact at ±{levels} levels");
            for kern in kernels().into_iter().filter(|k| k.takes(levels)) {
                let mut got = vec![0.0f32; m * n];
                matmul_on(kern, &mut got, &a, &b, m, false);
                assert_eq!(got, scalar, "{kern:?} at ±{levels} levels");
            }
        }
    }

    /// Weights packed wider than a kernel takes are refused, not silently saturated.
    #[test]
    fn a_kernel_refuses_weights_wider_than_it_takes() {
        if !kernels().contains(&Kernel::Avx2) {
            return;
        }
        let b = PackedI8::pack_for(Kernel::Scalar, &[0.5; 16], 4, 4);
        assert_eq!(b.levels(), Q);
        let mut c = vec![0.0f32; 4];
        let r = std::panic::catch_unwind(move || {
            matmul_on(Kernel::Avx2, &mut c, &[1.0; 4], &b, 1, false)
        });
        assert!(
            r.is_err(),
            "8-bit weights on the AVX2 kernel must be refused"
        );
        assert_eq!(
            PackedI8::pack_for(Kernel::Avx2, &[0.5; 16], 4, 4).levels(),
            Q7
        );
    }

    #[test]
    fn kernel_names_parse_to_kernels_this_cpu_has() {
        assert_eq!(parse_kernel(" "), Ok(None));
        assert_eq!(parse_kernel("scalar"), Ok(Some(Kernel::Scalar)));
        let err = parse_kernel("sse9").unwrap_err();
        assert!(
            err.contains(KERNEL_ENV) && err.contains("avx-vnni"),
            "{err}"
        );
        for k in [Kernel::Avx2, Kernel::AvxVnni, Kernel::Avx512Vnni] {
            let got = parse_kernel(k.name());
            if kernels().contains(&k) {
                assert_eq!(got, Ok(Some(k)));
            } else {
                assert!(got.unwrap_err().contains("cannot run"), "{k:?}");
            }
        }
    }

    #[test]
    fn vector_quantizer_matches_scalar() {
        let mut seed = 5u64;
        for len in [0, 1, 7, 8, 31, 32, 33, 384, 1536, 1541] {
            let mut row: Vec<f32> = (0..len).map(|_| lcg(&mut seed) * 6.0).collect();
            if len > 3 {
                row[1] = 40.0; // an outlier channel
                row[2] = 0.0;
            }
            let (mut a, mut b) = (vec![0i8; len], vec![0i8; len]);
            let pa = quantize_row(&row, &mut a);
            let pb = quantize_row_dispatch(&row, &mut b);
            assert_eq!((pa, &a), (pb, &b), "len {len}");
            assert!(a.iter().all(|&x| (x as i32).abs() <= Q));
            if len > 3 {
                assert_eq!(a[1] as i32, Q, "the largest magnitude maps to Q");
            }
        }
    }

    /// Smoothing leaves the product as it was, and an outlier channel no longer costs the
    /// other channels their resolution.
    #[test]
    fn smoothing_keeps_the_product_and_helps_outliers() {
        let (m, k, n) = (9, 64, 40);
        let mut seed = 3u64;
        let mut a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        for r in 0..m {
            a[r * k + 5] = 60.0 * (1.0 + r as f32); // channel 5 is an outlier on every row
        }
        let bw: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
        let want = exact(&a, &bw, m, k, n);
        let mut act_max = vec![0.0f32; k];
        for r in 0..m {
            for c in 0..k {
                act_max[c] = act_max[c].max(a[r * k + c].abs());
            }
        }
        let err = |b: &PackedI8| {
            let mut got = vec![0.0f32; m * n];
            matmul(&mut got, &a, b, m, false);
            got.iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0.0f32, f32::max)
        };
        let plain = PackedI8::pack(&bw, k, n);
        let smooth = PackedI8::pack_smoothed(&bw, k, n, &act_max);
        // Each weight comes back within half a step of its smoothed row.
        let mul = smooth.act_mul.as_deref().unwrap_or(&[]);
        for r in [0, 5, 63] {
            let step = smooth.scale[3] * mul[r];
            assert!((smooth.get(r, 3) - bw[r * n + 3]).abs() <= step / 2.0 + 1e-6);
        }
        let (e_plain, e_smooth) = (err(&plain), err(&smooth));
        assert!(
            e_smooth < e_plain / 2.0,
            "smoothed {e_smooth} vs plain {e_plain}"
        );
    }

    #[test]
    fn rows_of_constants_and_zeros_are_exact() {
        let (k, n) = (8, 3);
        let bw: Vec<f32> = (0..k * n).map(|i| (i as f32 - 10.0) / 16.0).collect();
        let b = PackedI8::pack(&bw, k, n);
        let a = [0.0f32; 8];
        let mut d = vec![7.0f32; 3];
        matmul(&mut d, &a, &b, 1, false);
        assert_eq!(d, vec![0.0; 3]);
        // Weights that are multiples of their column's step come back exactly.
        for r in 0..k {
            for c in 0..n {
                let w = bw[r * n + c];
                assert!((b.get(r, c) - w).abs() <= b.scale[c] / 2.0 + 1e-7);
            }
        }
    }

    #[test]
    fn empty_shapes_are_no_ops() {
        let b = PackedI8::pack(&[1.0; 6], 2, 3);
        let mut d: Vec<f32> = Vec::new();
        matmul(&mut d, &[], &b, 0, false);
        assert!(d.is_empty());
        let b = PackedI8::pack(&[], 0, 3);
        let mut d = vec![5.0f32; 6];
        matmul(&mut d, &[], &b, 2, true);
        assert_eq!(d, vec![5.0; 6]);
        matmul(&mut d, &[], &b, 2, false);
        assert_eq!(d, vec![0.0; 6]);
    }
}
