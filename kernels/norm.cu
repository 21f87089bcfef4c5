// Row kernels over the packed [tokens, hidden] activations (no padding): embedding gather +
// LayerNorm, bias + residual + LayerNorm, and mean pooling + L2 norm. One block per row (token
// or sequence); blockDim.x (a multiple of 32) threads stride over the hidden dimension.
// LayerNorm statistics are f32 and two-pass (mean, then variance of the centred row), as in the
// CPU reference `model::encoder::layer_norm`. Halves travel as raw bits (unsigned short) and are
// converted with PTX cvt, so NVRTC needs no cuda_fp16.h.

// hidden <= MAX_PER_THREAD * blockDim.x; the host checks this before launching.
#define MAX_PER_THREAD 8

typedef unsigned short half_bits;

__device__ __forceinline__ float h2f(half_bits h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ half_bits f2h(float f) {
    half_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Sum of `v` over the block, returned to every thread. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // a previous call may still be reading scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// LayerNorm of the row held in `v` (column threadIdx.x + i * blockDim.x in v[i]); writes the
// f32 residual stream and its f16 copy (the next GEMM's input).
__device__ void layer_norm_store(float (&v)[MAX_PER_THREAD], int h, const float* gamma,
                                 const float* beta, float eps, float* out32, half_bits* out16) {
    __shared__ float scratch[32];
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < h) s += v[i];
    }
    const float mean = block_sum(s, scratch) / (float)h;
    float q = 0.0f;
#pragma unroll
    for (int i = 0; i < MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < h) {
            v[i] -= mean;
            q += v[i] * v[i];
        }
    }
    const float inv = 1.0f / sqrtf(block_sum(q, scratch) / (float)h + eps);
#pragma unroll
    for (int i = 0; i < MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < h) {
            const float y = v[i] * inv * gamma[c] + beta[c];
            out32[c] = y;
            out16[c] = f2h(y);
        }
    }
}

// x[t] = LN(word[ids[t]] + pos[positions[t]] + type[types[t]]); positions restart at 0 for
// every sequence of the packed batch (computed on the host). Grid: one block per token.
extern "C" __global__ void embed_layernorm(const unsigned* ids, const unsigned* types,
                                           const unsigned* positions, const half_bits* word,
                                           const half_bits* pos, const half_bits* type,
                                           const float* gamma, const float* beta, int h,
                                           float eps, float* x32, half_bits* x16) {
    const size_t t = blockIdx.x;
    const half_bits* w = word + (size_t)ids[t] * h;
    const half_bits* p = pos + (size_t)positions[t] * h;
    const half_bits* ty = type + (size_t)types[t] * h;
    float v[MAX_PER_THREAD];
#pragma unroll
    for (int i = 0; i < MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        v[i] = c < h ? h2f(w[c]) + h2f(p[c]) + h2f(ty[c]) : 0.0f;
    }
    layer_norm_store(v, h, gamma, beta, eps, x32 + t * h, x16 + t * h);
}

// x[t] = LN(x[t] + y[t] + bias): the attention-output and FFN-output epilogues, where y is the
// GEMM's f32 output. Grid: one block per token.
extern "C" __global__ void bias_residual_layernorm(const float* y, const float* bias,
                                                   const float* gamma, const float* beta, int h,
                                                   float eps, float* x32, half_bits* x16) {
    const size_t t = blockIdx.x;
    const float* yr = y + t * h;
    const float* xr = x32 + t * h;
    float v[MAX_PER_THREAD];
#pragma unroll
    for (int i = 0; i < MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        v[i] = c < h ? xr[c] + yr[c] + bias[c] : 0.0f;
    }
    layer_norm_store(v, h, gamma, beta, eps, x32 + t * h, x16 + t * h);
}

// out[s] = normalize(mean of x over sequence s's rows), clamped like torch's F.normalize
// (norm >= 1e-12); an empty sequence gives zeros. Grid: one block per sequence.
extern "C" __global__ void mean_pool_l2(const float* x32, const unsigned* cu_seqlens, int h,
                                        float* out) {
    __shared__ float scratch[32];
    const int s = blockIdx.x;
    const unsigned start = cu_seqlens[s], end = cu_seqlens[s + 1];
    const float inv_rows = 1.0f / (float)max(end - start, 1u);
    float v[MAX_PER_THREAD];
    float q = 0.0f;
#pragma unroll
    for (int i = 0; i < MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        float acc = 0.0f;
        if (c < h) {
            for (unsigned r = start; r < end; r++) acc += x32[(size_t)r * h + c];
        }
        v[i] = acc * inv_rows;
        q += v[i] * v[i];
    }
    const float inv = 1.0f / fmaxf(sqrtf(block_sum(q, scratch)), 1e-12f);
#pragma unroll
    for (int i = 0; i < MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < h) out[(size_t)s * h + c] = v[i] * inv;
    }
}
