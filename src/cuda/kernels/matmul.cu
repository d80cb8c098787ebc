// out[t, r] (op)= scale * (W[r] . x[t]) + bias[r] for a group of tokens:
// one warp per weight row, each row read once for up to MM_TOKENS tokens.
//
// Launch: block = MM_WARPS * 32 threads (one row per warp), grid.x = rows
// in groups of MM_WARPS, grid.y = tokens in groups of MM_TOKENS.
//
// Quantized rows: each lane takes whole 32-value blocks (lane, lane + 32,
// ...), so a warp has 32 blocks of the row in flight per step: decode is a
// stream of weight bytes, and that is what bounds it. Float rows: lanes
// take adjacent values, so each warp load is one contiguous run.

#define MM_WARPS 4
#define MM_TOKENS 8

// How the result meets `out`: the epilogue of every projection.
#define OUT_SET 0       // out = v                       (q, k, v; up; logits)
#define OUT_ADD 1       // out += v                      (residual: attention out, down)
#define OUT_MUL_SILU 2  // out = out * silu(v)           (gate, with out holding up)

__device__ __forceinline__ void mm_store(float* out, int mode, float v) {
    if (mode == OUT_SET) {
        *out = v;
    } else if (mode == OUT_ADD) {
        *out += v;
    } else {
        *out = *out * (v / (1.0f + expf(-v)));
    }
}

// Reduces each token's partial sums across the warp and lane 0 stores them.
__device__ __forceinline__ void mm_finish(float (&acc)[MM_TOKENS], int nt, int r, int rows, int t0,
                                          const float* bias, float scale, int mode, float* out) {
    // nt is the same for the whole warp: a decode step reduces one sum.
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++)
        if (t < nt) acc[t] = warp_sum(acc[t]);
    if ((threadIdx.x & 31) != 0) return;
    float b = bias ? bias[r] : 0.0f;
    for (int t = 0; t < nt; t++) mm_store(out + (size_t)(t0 + t) * rows + r, mode, acc[t] * scale + b);
}

// 32 weights of one quantized block as small integers, and its scale.
__device__ __forceinline__ float unpack_q4_0(const u8* blk, float (&q)[32]) {
    const u16* p = (const u16*)blk;  // blocks are 18 bytes: 2-byte aligned
#pragma unroll
    for (int k = 0; k < 8; k++) {
        u32 v = p[1 + k];
        u32 lo = v & 0xff, hi = v >> 8;
        q[2 * k] = (float)((int)(lo & 15) - 8);
        q[2 * k + 1] = (float)((int)(hi & 15) - 8);
        q[2 * k + 16] = (float)((int)(lo >> 4) - 8);
        q[2 * k + 17] = (float)((int)(hi >> 4) - 8);
    }
    return f16_to_f32(p[0]);
}

__device__ __forceinline__ float unpack_q8_0(const u8* blk, float (&q)[32]) {
    const u16* p = (const u16*)blk;  // blocks are 34 bytes: 2-byte aligned
#pragma unroll
    for (int k = 0; k < 16; k++) {
        u32 v = p[1 + k];
        q[2 * k] = (float)(i8)(v & 0xff);
        q[2 * k + 1] = (float)(i8)(v >> 8);
    }
    return f16_to_f32(p[0]);
}

template <int TYPE>
__device__ void matmul_quant(const u8* w, int rows, int cols, const float* x, int n_tok,
                             const float* bias, float scale, int mode, float* out) {
    const int block_bytes = TYPE == TYPE_Q4_0 ? 18 : 34;
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * MM_WARPS + (threadIdx.x >> 5);
    if (r >= rows) return;  // the whole warp: no shuffle is left waiting
    int t0 = blockIdx.y * MM_TOKENS;
    int nt = min(MM_TOKENS, n_tok - t0);
    int nb = cols / 32;
    const u8* row = w + (size_t)r * nb * block_bytes;
    float acc[MM_TOKENS];
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.0f;
    for (int b = lane; b < nb; b += 32) {
        float q[32];
        float d = TYPE == TYPE_Q4_0 ? unpack_q4_0(row + (size_t)b * block_bytes, q)
                                    : unpack_q8_0(row + (size_t)b * block_bytes, q);
#pragma unroll
        for (int t = 0; t < MM_TOKENS; t++) {
            if (t < nt) {
                const float4* xv = (const float4*)(x + (size_t)(t0 + t) * cols + b * 32);
                float s = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    float4 v = xv[i];
                    s += q[4 * i] * v.x + q[4 * i + 1] * v.y + q[4 * i + 2] * v.z + q[4 * i + 3] * v.w;
                }
                acc[t] += d * s;
            }
        }
    }
    mm_finish(acc, nt, r, rows, t0, bias, scale, mode, out);
}

template <int TYPE>
__device__ void matmul_float(const u8* w, int rows, int cols, const float* x, int n_tok,
                             const float* bias, float scale, int mode, float* out) {
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * MM_WARPS + (threadIdx.x >> 5);
    if (r >= rows) return;
    int t0 = blockIdx.y * MM_TOKENS;
    int nt = min(MM_TOKENS, n_tok - t0);
    float acc[MM_TOKENS];
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.0f;
    for (int c = lane; c < cols; c += 32) {
        float wv = TYPE == TYPE_F32 ? ((const float*)w)[(size_t)r * cols + c]
                                    : f16_to_f32(((const u16*)w)[(size_t)r * cols + c]);
#pragma unroll
        for (int t = 0; t < MM_TOKENS; t++)
            if (t < nt) acc[t] += wv * x[(size_t)(t0 + t) * cols + c];
    }
    mm_finish(acc, nt, r, rows, t0, bias, scale, mode, out);
}

// The 32 values of k-quant sub-block s (of a row), each times its scale,
// and the minimum the sub-block subtracts (Q4_K/Q5_K; 0 for Q6_K).
template <int TYPE>
__device__ __forceinline__ float unpack_k(const u8* row, int s, float (&q)[32]) {
    int j = s % 8;
    if (TYPE == TYPE_Q6_K) {
        const u8* blk = row + (size_t)(s / 8) * Q6_K_BYTES;
        float d = f16_to_f32((u16)(blk[208] | (blk[209] << 8)));  // 2-byte aligned at best
        const i8* sc = (const i8*)(blk + 192);
        float d0 = d * (float)sc[2 * j], d1 = d * (float)sc[2 * j + 1];
#pragma unroll
        for (int l = 0; l < 32; l++) q[l] = (l < 16 ? d0 : d1) * (float)level_q6_k(blk, 32 * j + l);
        return 0.0f;
    }
    const u8* blk = row + (size_t)(s / 8) * (TYPE == TYPE_Q4_K ? Q4_K_BYTES : Q5_K_BYTES);
    int sc, m;
    scale_min_k4(j, blk + 4, sc, m);
    float dj = f16_to_f32(((const u16*)blk)[0]) * (float)sc;
#pragma unroll
    for (int l = 0; l < 32; l++) q[l] = dj * (float)level_q45_k(TYPE, blk, 32 * j + l);
    return f16_to_f32(((const u16*)blk)[1]) * (float)m;
}

// k-quant rows: lanes take 32-value sub-blocks (a 4096-wide row has 128, so
// every lane is busy at decode; whole super-blocks would leave half idle).
template <int TYPE>
__device__ void matmul_kquant(const u8* w, int rows, int cols, const float* x, int n_tok,
                              const float* bias, float scale, int mode, float* out) {
    const int block_bytes = TYPE == TYPE_Q4_K ? Q4_K_BYTES : TYPE == TYPE_Q5_K ? Q5_K_BYTES : Q6_K_BYTES;
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * MM_WARPS + (threadIdx.x >> 5);
    if (r >= rows) return;
    int t0 = blockIdx.y * MM_TOKENS;
    int nt = min(MM_TOKENS, n_tok - t0);
    const u8* row = w + (size_t)r * (cols / 256) * block_bytes;
    float acc[MM_TOKENS];
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.0f;
    for (int s = lane; s < cols / 32; s += 32) {
        float q[32];
        float mn = unpack_k<TYPE>(row, s, q);
#pragma unroll
        for (int t = 0; t < MM_TOKENS; t++) {
            if (t < nt) {
                const float4* xv = (const float4*)(x + (size_t)(t0 + t) * cols + s * 32);
                float dot = 0.0f, sum = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    float4 v = xv[i];
                    dot += q[4 * i] * v.x + q[4 * i + 1] * v.y + q[4 * i + 2] * v.z + q[4 * i + 3] * v.w;
                    sum += v.x + v.y + v.z + v.w;
                }
                acc[t] += dot - mn * sum;
            }
        }
    }
    mm_finish(acc, nt, r, rows, t0, bias, scale, mode, out);
}

#define MATMUL_ENTRY(NAME, BODY, TYPE)                                                          \
    extern "C" __global__ void __launch_bounds__(MM_WARPS * 32)                                 \
        NAME(const u8* w, int rows, int cols, const float* x, int n_tok, const float* bias,     \
             float scale, int mode, float* out) {                                               \
        BODY<TYPE>(w, rows, cols, x, n_tok, bias, scale, mode, out);                            \
    }

MATMUL_ENTRY(matmul_q4_0, matmul_quant, TYPE_Q4_0)
MATMUL_ENTRY(matmul_q8_0, matmul_quant, TYPE_Q8_0)
MATMUL_ENTRY(matmul_f16, matmul_float, TYPE_F16)
MATMUL_ENTRY(matmul_f32, matmul_float, TYPE_F32)
MATMUL_ENTRY(matmul_q4_k, matmul_kquant, TYPE_Q4_K)
MATMUL_ENTRY(matmul_q5_k, matmul_kquant, TYPE_Q5_K)
MATMUL_ENTRY(matmul_q6_k, matmul_kquant, TYPE_Q6_K)
