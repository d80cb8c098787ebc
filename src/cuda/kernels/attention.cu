// Rotary embedding, the KV cache store, and attention over the cache.
//
// The cache mirrors the host pool's block tables: position p of a sequence
// lives in block table[p / KV_BLOCK], slot p % KV_BLOCK, and element
// ((block * n_layer + layer) * KV_BLOCK + slot) * d + i of the K or V store.
// KV_F16 selects f16 storage (else f32).

__device__ __forceinline__ size_t kv_offset(u32 block, int layer, int n_layer, int slot, int d) {
    return (((size_t)block * n_layer + layer) * KV_BLOCK + slot) * d;
}

__device__ __forceinline__ float kv_load(const void* cache, int f16, size_t i) {
    return f16 ? f16_to_f32(((const u16*)cache)[i]) : ((const float*)cache)[i];
}

// For token row t (one thread block each): rotates the first rotary_dim
// dims of every q and k head in adjacent pairs (GPT-J), with cos/sin from
// the host's table, then stores k and v at the row's position.
extern "C" __global__ void rope_store(float* qkv, int d, int n_head, int rotary_dim,
                                      const float2* rope, const int* pos, const u32* block,
                                      int layer, int n_layer, void* k_cache, void* v_cache,
                                      int f16) {
    int t = blockIdx.x;
    int hd = d / n_head, half = rotary_dim / 2;
    float* q = qkv + (size_t)t * 3 * d;
    const float2* cs = rope + (size_t)pos[t] * half;
    for (int i = threadIdx.x; i < 2 * n_head * half; i += blockDim.x) {
        int head = i / half, p = i % half;  // heads 0..n_head are q, then k
        float* x = q + head * hd + 2 * p;
        float a = x[0], b = x[1], c = cs[p].x, s = cs[p].y;
        x[0] = a * c - b * s;
        x[1] = b * c + a * s;
    }
    __syncthreads();
    size_t off = kv_offset(block[t], layer, n_layer, pos[t] % KV_BLOCK, d);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float k = q[d + i], v = q[2 * d + i];
        if (f16) {
            ((u16*)k_cache)[off + i] = f32_to_f16(k);
            ((u16*)v_cache)[off + i] = f32_to_f16(v);
        } else {
            ((float*)k_cache)[off + i] = k;
            ((float*)v_cache)[off + i] = v;
        }
    }
}

// One thread block per (head, token row): scores of q against every key
// of the row's sequence up to its position (a warp per key), softmax, then
// the weighted sum of values (a thread per output dim). `scores` holds
// n_ctx floats per (row, head).
extern "C" __global__ void attention(const float* qkv, int d, int n_head, const int* pos,
                                     const u32* tables, const int* table_at, int layer,
                                     int n_layer, const void* k_cache, const void* v_cache,
                                     int f16, float scale, float* scores, int n_ctx, float* out) {
    __shared__ float sh[32];
    int head = blockIdx.x, t = blockIdx.y;
    int hd = d / n_head;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int n_keys = pos[t] + 1;
    const u32* table = tables + table_at[t];
    const float* q = qkv + (size_t)t * 3 * d + head * hd;
    float* sc = scores + ((size_t)t * n_head + head) * n_ctx;

    for (int j = warp; j < n_keys; j += warps) {
        size_t off = kv_offset(table[j / KV_BLOCK], layer, n_layer, j % KV_BLOCK, d) + head * hd;
        float s = 0.0f;
        for (int i = lane; i < hd; i += 32) s += q[i] * kv_load(k_cache, f16, off + i);
        s = warp_sum(s);
        if (lane == 0) sc[j] = s * scale;
    }
    __syncthreads();
    float m = NEG_INF;
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x) m = fmaxf(m, sc[j]);
    m = block_reduce(m, sh, true);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x) {
        float e = expf(sc[j] - m);
        sc[j] = e;
        sum += e;
    }
    float inv = 1.0f / block_reduce(sum, sh, false);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < n_keys; j++) {
            size_t off = kv_offset(table[j / KV_BLOCK], layer, n_layer, j % KV_BLOCK, d) + head * hd;
            acc += sc[j] * inv * kv_load(v_cache, f16, off + i);
        }
        out[(size_t)t * d + head * hd + i] = acc;
    }
}
