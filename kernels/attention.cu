// Multi-head self-attention over a packed variable-length batch (cu_seqlens, no padding):
// each sequence attends only within itself. CPU reference: `model::encoder::softmax_inplace`
// over scale·QKᵀ, then ·V, per (sequence, head).
//
// Grid: x = sequence * heads + head, y = chunk of blockDim.x queries; one thread per query.
// Keys and values stream through shared memory in tiles of KEY_TILE rows; each thread keeps its
// query, its output accumulator and a running max / sum (online softmax), so any sequence
// length works with fixed shared memory. qkv is the QKV GEMM's f32 output [tokens, 3*hidden]
// (Q | K | V, heads side by side within each); the QKV bias is added here.

#define HEAD_DIM 32
#define KEY_TILE 64
// Scores held in registers at once: the accumulator is rescaled once per SUB keys.
#define SUB 16
// NVRTC has no math.h, so no INFINITY macro.
#define NEG_INF __int_as_float(0xff800000)

typedef unsigned short half_bits;

__device__ __forceinline__ half_bits f2h(float f) {
    half_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

extern "C" __global__ void attention_varlen(const float* qkv, const float* bias,
                                            const unsigned* cu_seqlens, int heads, float scale,
                                            half_bits* ctx) {
    __shared__ float ks[KEY_TILE][HEAD_DIM];
    __shared__ float vs[KEY_TILE][HEAD_DIM];
    const int seq = blockIdx.x / heads, head = blockIdx.x % heads;
    const int start = (int)cu_seqlens[seq];
    const int len = (int)cu_seqlens[seq + 1] - start;
    const int q0 = blockIdx.y * blockDim.x;
    // Uniform for the whole block, so no barrier below is skipped by only some threads.
    if (q0 >= len) return;
    const int h = heads * HEAD_DIM;
    const int stride = 3 * h;
    const int qi = q0 + threadIdx.x;
    const bool active = qi < len;

    const float* bq = bias + head * HEAD_DIM;
    const float* bk = bq + h;
    const float* bv = bq + 2 * h;
    float q[HEAD_DIM], acc[HEAD_DIM];
#pragma unroll
    for (int d = 0; d < HEAD_DIM; d++) {
        q[d] = active ? (qkv[(size_t)(start + qi) * stride + head * HEAD_DIM + d] + bq[d]) * scale
                      : 0.0f;
        acc[d] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;

    for (int k0 = 0; k0 < len; k0 += KEY_TILE) {
        const int n = min(KEY_TILE, len - k0);
        __syncthreads();  // the previous tile is no longer read
        for (int i = threadIdx.x; i < KEY_TILE * HEAD_DIM; i += blockDim.x) {
            const int r = i / HEAD_DIM, d = i % HEAD_DIM;
            float kv = 0.0f, vv = 0.0f;
            // Rows past the sequence are zeroed: masked scores get p = 0, and 0 * garbage
            // could be NaN.
            if (r < n) {
                const float* src = qkv + (size_t)(start + k0 + r) * stride + h + head * HEAD_DIM + d;
                kv = src[0] + bk[d];
                vv = src[h] + bv[d];
            }
            ks[r][d] = kv;
            vs[r][d] = vv;
        }
        __syncthreads();
        if (!active) continue;
        for (int j0 = 0; j0 < n; j0 += SUB) {
            float s[SUB];
            float tile_max = NEG_INF;
#pragma unroll
            for (int j = 0; j < SUB; j++) {
                float dot = 0.0f;
#pragma unroll
                for (int d = 0; d < HEAD_DIM; d++) dot += q[d] * ks[j0 + j][d];
                s[j] = j0 + j < n ? dot : NEG_INF;
                tile_max = fmaxf(tile_max, s[j]);
            }
            // tile_max is finite: every sub-tile holds at least one key of the sequence.
            const float m_new = fmaxf(m, tile_max);
            const float corr = expf(m - m_new);  // 0 on the first sub-tile (m = -inf)
            l *= corr;
#pragma unroll
            for (int d = 0; d < HEAD_DIM; d++) acc[d] *= corr;
#pragma unroll
            for (int j = 0; j < SUB; j++) {
                const float p = expf(s[j] - m_new);
                l += p;
#pragma unroll
                for (int d = 0; d < HEAD_DIM; d++) acc[d] += p * vs[j0 + j][d];
            }
            m = m_new;
        }
    }
    if (active) {
        const float inv = 1.0f / l;
        half_bits* out = ctx + (size_t)(start + qi) * h + head * HEAD_DIM;
#pragma unroll
        for (int d = 0; d < HEAD_DIM; d++) out[d] = f2h(acc[d] * inv);
    }
}
