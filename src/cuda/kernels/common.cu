// Shared by every kernel file (they are compiled as one NVRTC program, this
// file first). No headers: NVRTC needs none for what is used here.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

// ggml type ids of the weight formats the GPU reads as stored.
#define TYPE_F32 0
#define TYPE_F16 1
#define TYPE_Q4_0 2
#define TYPE_Q8_0 8
#define TYPE_Q4_K 12
#define TYPE_Q5_K 13
#define TYPE_Q6_K 14

// Positions per KV block, as in the host's pool (kv_pool::BLOCK).
#define KV_BLOCK 16

#define NEG_INF __int_as_float(0xff800000)

// CRYSTALD_HOST_F16: compiled for the CPU by the tests' driver emulation
// (tests/cuda_emu), which supplies the same conversions.
__device__ __forceinline__ float f16_to_f32(u16 h) {
#ifdef CRYSTALD_HOST_F16
    return host_f16_to_f32(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// Round to nearest even, as the CPU's f16 conversion.
__device__ __forceinline__ u16 f32_to_f16(float f) {
#ifdef CRYSTALD_HOST_F16
    return host_f32_to_f16(f);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or max) over the whole thread block; every thread gets the result.
// `sh` holds 32 floats. Block size: a multiple of 32, at most 1024.
__device__ float block_reduce(float v, float* sh, bool is_max) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < warps ? sh[lane] : (is_max ? NEG_INF : 0.0f);
        t = is_max ? warp_max(t) : warp_sum(t);
        if (lane == 0) sh[0] = t;
    }
    __syncthreads();
    return sh[0];
}

// Bytes of one k-quant super-block (256 values).
#define Q4_K_BYTES 144
#define Q5_K_BYTES 176
#define Q6_K_BYTES 210

// Sub-block j's 6-bit scale and minimum in a Q4_K/Q5_K super-block
// (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Value i (0..256) of a Q4_K/Q5_K super-block as its level (0..15 / 0..31).
__device__ __forceinline__ int level_q45_k(int type, const u8* blk, int i) {
    int j = i / 32, l = i % 32;
    const u8* qs = blk + (type == TYPE_Q4_K ? 16 : 48);
    int q = (qs[(j / 2) * 32 + l] >> ((j & 1) * 4)) & 15;
    if (type == TYPE_Q5_K) q |= ((blk[16 + l] >> j) & 1) << 4;
    return q;
}

// Value i (0..256) of a Q6_K super-block as its level minus 32.
__device__ __forceinline__ int level_q6_k(const u8* blk, int i) {
    int half = i / 128, r = i % 128, quarter = r / 32, l = r % 32;
    int ql = blk[half * 64 + (quarter % 2) * 32 + l];
    int low = quarter < 2 ? (ql & 15) : (ql >> 4);
    int high = (blk[128 + half * 32 + l] >> (2 * quarter)) & 3;
    return (low | (high << 4)) - 32;
}

// One value of a stored row, dequantized exactly as quant::dequantize_row
// (the same products in the same order, so the embedding is bit-exact).
__device__ __forceinline__ float load_value(int type, const u8* row, int c) {
    switch (type) {
    case TYPE_F32:
        return ((const float*)row)[c];
    case TYPE_F16:
        return f16_to_f32(((const u16*)row)[c]);
    case TYPE_Q4_0: {
        const u8* b = row + (c / 32) * 18;
        float d = f16_to_f32(*(const u16*)b);
        int j = c % 32;
        int q = j < 16 ? (b[2 + j] & 15) : (b[2 + j - 16] >> 4);
        return (float)(q - 8) * d;
    }
    case TYPE_Q8_0: {
        const u8* b = row + (c / 32) * 34;
        float d = f16_to_f32(*(const u16*)b);
        return (float)((const i8*)(b + 2))[c % 32] * d;
    }
    case TYPE_Q4_K:
    case TYPE_Q5_K: {
        const u8* b = row + (c / 256) * (type == TYPE_Q4_K ? Q4_K_BYTES : Q5_K_BYTES);
        int sc, m;
        scale_min_k4((c % 256) / 32, b + 4, sc, m);
        float dj = f16_to_f32(((const u16*)b)[0]) * (float)sc;
        float mj = f16_to_f32(((const u16*)b)[1]) * (float)m;
        return dj * (float)level_q45_k(type, b, c % 256) - mj;
    }
    default: {  // TYPE_Q6_K
        const u8* b = row + (c / 256) * Q6_K_BYTES;
        float d = f16_to_f32((u16)(b[208] | (b[209] << 8)));
        return d * (float)((const i8*)(b + 192))[(c % 256) / 16] * (float)level_q6_k(b, c % 256);
    }
    }
}

__device__ __forceinline__ size_t row_bytes(int type, int cols) {
    switch (type) {
    case TYPE_F32: return (size_t)cols * 4;
    case TYPE_F16: return (size_t)cols * 2;
    case TYPE_Q4_0: return (size_t)(cols / 32) * 18;
    case TYPE_Q8_0: return (size_t)(cols / 32) * 34;
    case TYPE_Q4_K: return (size_t)(cols / 256) * Q4_K_BYTES;
    case TYPE_Q5_K: return (size_t)(cols / 256) * Q5_K_BYTES;
    default: return (size_t)(cols / 256) * Q6_K_BYTES;
    }
}
