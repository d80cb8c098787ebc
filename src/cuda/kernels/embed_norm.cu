// Embedding lookup and LayerNorm: one thread block per token row.

// x[t] = wte[tokens[t]] * scale
extern "C" __global__ void embed(const u8* wte, int type, int d, const u32* tokens, float scale,
                                 float* x) {
    int t = blockIdx.x;
    const u8* row = wte + row_bytes(type, d) * tokens[t];
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        x[(size_t)t * d + c] = load_value(type, row, c) * scale;
}

// out[i] = LayerNorm(x[rows ? rows[i] : i]) with biased variance, two
// passes (mean, then the mean of squared deviations) as the CPU computes it.
extern "C" __global__ void layer_norm(const float* x, const int* rows, int d, const float* w,
                                      const float* b, float eps, float* out) {
    __shared__ float sh[32];
    int src = rows ? rows[blockIdx.x] : blockIdx.x;
    const float* xr = x + (size_t)src * d;
    float* o = out + (size_t)blockIdx.x * d;
    float s = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) s += xr[c];
    float mean = block_reduce(s, sh, false) / (float)d;
    float v = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float e = xr[c] - mean;
        v += e * e;
    }
    float var = block_reduce(v, sh, false) / (float)d;
    float inv = 1.0f / sqrtf(var + eps);
    for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = (xr[c] - mean) * inv * w[c] + b[c];
}
