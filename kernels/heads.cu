// The router head on the pooled embeddings, every model at once. CPU reference:
// `model::heads::RouterHead` (prompt_features, then logit_from per model):
//   logit[s, m] = (w·e_s + c) + u_m · (P e_s) + b_m
// rows = [w; P] ((k + 1) × dim, row-major), abil = [u_m | b_m] (models × (k + 1)).
// Grid: one block per sequence; each warp reduces some of the k + 1 dot products over dim,
// then threads stride over models. Shared memory: (k + 1) floats (dynamic).

extern "C" __global__ void router_logits(const float* emb, const float* rows, float c, int k,
                                         int dim, const float* abil, int models, float* out) {
    extern __shared__ float z[];
    const int s = blockIdx.x;
    const float* e = emb + (size_t)s * dim;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int j = warp; j <= k; j += warps) {
        const float* r = rows + (size_t)j * dim;
        float acc = 0.0f;
        for (int d = lane; d < dim; d += 32) acc += r[d] * e[d];
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) z[j] = acc;
    }
    __syncthreads();
    const float easiness = z[0] + c;
    for (int m = threadIdx.x; m < models; m += blockDim.x) {
        const float* a = abil + (size_t)m * (k + 1);
        float logit = easiness + a[k];
        for (int j = 0; j < k; j++) logit += a[j] * z[1 + j];
        out[(size_t)s * models + m] = logit;
    }
}
