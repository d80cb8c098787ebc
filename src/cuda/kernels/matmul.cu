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
