// FFN intermediate epilogue: out = GELU(y + bias) with the exact (erf) GELU of HF's "gelu",
// CPU reference `model::encoder::gelu`. y is the GEMM's f32 output [rows, cols]; out is f16,
// the next GEMM's input. Grid-stride over all elements.

typedef unsigned short half_bits;

__device__ __forceinline__ half_bits f2h(float f) {
    half_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

extern "C" __global__ void bias_gelu(const float* y, const float* bias, unsigned cols,
                                     unsigned long long total, half_bits* out) {
    const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < total; i += step) {
        const float v = y[i] + bias[i % cols];
        out[i] = f2h(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
    }
}
