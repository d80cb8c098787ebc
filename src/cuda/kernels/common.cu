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

// One value of a stored row, dequantized exactly as quant::dequantize_row.
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
    default: {  // TYPE_Q8_0
        const u8* b = row + (c / 32) * 34;
        float d = f16_to_f32(*(const u16*)b);
        return (float)((const i8*)(b + 2))[c % 32] * d;
    }
    }
}

__device__ __forceinline__ size_t row_bytes(int type, int cols) {
    switch (type) {
    case TYPE_F32: return (size_t)cols * 4;
    case TYPE_F16: return (size_t)cols * 2;
    case TYPE_Q4_0: return (size_t)(cols / 32) * 18;
    default: return (size_t)(cols / 32) * 34;
    }
}
