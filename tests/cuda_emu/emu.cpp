// A stand-in CUDA driver (libcuda.so) that runs crystald's kernels on the
// CPU, so the GPU backend is tested end to end on machines without a GPU:
// crystald opens it through CRYSTALD_CUDA_DRIVER, compiles the real kernels
// with NVRTC as on a GPU (the PTX is checked, then set aside), uploads the
// weights, launches, copies back, all through the same driver calls.
//
// The kernels are the same source files, compiled here as C++. A thread
// block runs on one OS thread, each CUDA thread a fiber (its own stack,
// switched by hand-written x86-64 code); fibers switch only where CUDA
// threads synchronise: __syncthreads() waits for the live threads of the
// block, __shfl_xor_sync for the live lanes of the warp, which then read
// each other's values as the hardware exchanges them. Blocks run one after
// another, so `__shared__` arrays are plain statics. What this cannot show:
// timing, memory-model and alignment faults of real hardware.
//
// Build: g++ -std=c++17 -O2 -shared -fPIC -o libcuda-emu.so emu.cpp
// (tests/device.rs does, with -I naming src/cuda/kernels).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include <mutex>

// ---- what CUDA C provides, for the kernel sources ----------------------

struct Dim3 { unsigned x, y, z; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };

static Dim3 g_block_idx, g_block_dim;
struct Fiber;
static Fiber* g_current;
static unsigned current_tid();

#define blockIdx g_block_idx
#define blockDim g_block_dim
#define threadIdx (Dim3{current_tid(), 0, 0})
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)

static inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
using std::min;
using std::max;
static void __syncthreads();
static float __shfl_xor_sync(unsigned mask, float v, int lane_mask);

// The kernels convert f16 with PTX `cvt` on a GPU; here with the
// compiler's _Float16 (IEEE binary16, round to nearest even, as cvt.rn).
#define CRYSTALD_HOST_F16 1
static inline float host_f16_to_f32(unsigned short h) {
    _Float16 v; std::memcpy(&v, &h, 2); return (float)v;
}
static inline unsigned short host_f32_to_f16(float f) {
    _Float16 v = (_Float16)f; unsigned short h; std::memcpy(&h, &v, 2); return h;
}

#include "common.cu"
#include "embed_norm.cu"
#include "matmul.cu"
#include "attention.cu"

// ---- fibers ---------------------------------------------------------------

extern "C" void emu_switch(void** save_sp, void* to_sp);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");

enum State { RUNNABLE, AT_BARRIER, AT_SHUFFLE, DONE };

struct Fiber {
    unsigned tid;
    State state;
    void* sp;
    float shuffle_in, shuffle_out;
    int shuffle_lane_mask;
};

typedef void (*Trampoline)(void** params);

static const size_t STACK_BYTES = 256 * 1024;
static std::vector<Fiber> g_fibers;
static std::vector<char*> g_stacks;
static void* g_scheduler_sp;
static Trampoline g_entry;
static void** g_params;

static unsigned current_tid() { return g_current->tid; }

static void yield_to_scheduler() { emu_switch(&g_current->sp, g_scheduler_sp); }

static void __syncthreads() {
    g_current->state = AT_BARRIER;
    yield_to_scheduler();
}

static float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    g_current->shuffle_in = v;
    g_current->shuffle_lane_mask = lane_mask;
    g_current->state = AT_SHUFFLE;
    yield_to_scheduler();
    return g_current->shuffle_out;
}

static void fiber_main() {
    g_entry(g_params);
    g_current->state = DONE;
    yield_to_scheduler();
    std::abort();  // a finished fiber is never resumed
}

static void start_fiber(Fiber& f, char* stack) {
    uintptr_t top = ((uintptr_t)(stack + STACK_BYTES)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;               // fiber_main's return address: never used
    *--sp = (void*)&fiber_main;    // where emu_switch's `ret` goes first
    for (int i = 0; i < 6; i++) *--sp = nullptr;  // rbp rbx r12-r15
    f.sp = sp;
    f.state = RUNNABLE;
}

// Runs one thread block to the end.
static void run_block(unsigned threads) {
    if (g_fibers.size() < threads) g_fibers.resize(threads);
    while (g_stacks.size() < threads) g_stacks.push_back((char*)std::malloc(STACK_BYTES));
    for (unsigned t = 0; t < threads; t++) {
        g_fibers[t].tid = t;
        start_fiber(g_fibers[t], g_stacks[t]);
    }
    for (;;) {
        bool ran = false;
        for (unsigned t = 0; t < threads; t++) {
            if (g_fibers[t].state != RUNNABLE) continue;
            g_current = &g_fibers[t];
            emu_switch(&g_scheduler_sp, g_fibers[t].sp);
            ran = true;
        }
        if (ran) continue;
        // Nobody can run: release a warp whose live lanes all wait at a
        // shuffle, else the block if all its live threads wait at a barrier.
        bool released = false;
        for (unsigned w = 0; w * 32 < threads; w++) {
            unsigned lo = w * 32, hi = std::min(threads, lo + 32);
            bool all = true, any = false;
            for (unsigned t = lo; t < hi; t++) {
                if (g_fibers[t].state == DONE) continue;
                any = true;
                all &= g_fibers[t].state == AT_SHUFFLE;
            }
            if (!any || !all) continue;
            for (unsigned t = lo; t < hi; t++) {
                Fiber& f = g_fibers[t];
                if (f.state == DONE) continue;
                unsigned src = lo + ((t - lo) ^ (unsigned)f.shuffle_lane_mask);
                if (src >= hi || g_fibers[src].state != AT_SHUFFLE) {
                    std::fprintf(stderr, "cuda-emu: shuffle with an inactive lane\n");
                    std::abort();
                }
                f.shuffle_out = g_fibers[src].shuffle_in;
            }
            for (unsigned t = lo; t < hi; t++)
                if (g_fibers[t].state == AT_SHUFFLE) g_fibers[t].state = RUNNABLE;
            released = true;
        }
        if (released) continue;
        bool all_done = true, all_barrier = true;
        for (unsigned t = 0; t < threads; t++) {
            all_done &= g_fibers[t].state == DONE;
            all_barrier &= g_fibers[t].state == DONE || g_fibers[t].state == AT_BARRIER;
        }
        if (all_done) return;
        if (!all_barrier) {
            std::fprintf(stderr, "cuda-emu: deadlock (threads wait at different sync points)\n");
            std::abort();
        }
        for (unsigned t = 0; t < threads; t++)
            if (g_fibers[t].state == AT_BARRIER) g_fibers[t].state = RUNNABLE;
    }
}

// ---- the kernels by name, with their parameters unpacked ------------------

#define P(i, T) (*(T*)params[i])

static void t_embed(void** params) {
    embed(P(0, const u8*), P(1, int), P(2, int), P(3, const u32*), P(4, float), P(5, float*));
}
static void t_layer_norm(void** params) {
    layer_norm(P(0, const float*), P(1, const int*), P(2, int), P(3, const float*),
               P(4, const float*), P(5, float), P(6, float*));
}
#define T_MATMUL(NAME)                                                                     \
    static void t_##NAME(void** params) {                                                  \
        NAME(P(0, const u8*), P(1, int), P(2, int), P(3, const float*), P(4, int),         \
             P(5, const float*), P(6, float), P(7, int), P(8, float*));                    \
    }
T_MATMUL(matmul_q4_0)
T_MATMUL(matmul_q8_0)
T_MATMUL(matmul_f16)
T_MATMUL(matmul_f32)
T_MATMUL(matmul_q4_k)
T_MATMUL(matmul_q5_k)
T_MATMUL(matmul_q6_k)
static void t_rope_store(void** params) {
    rope_store(P(0, float*), P(1, int), P(2, int), P(3, int), P(4, const float2*),
               P(5, const int*), P(6, const u32*), P(7, int), P(8, int), P(9, void*),
               P(10, void*), P(11, int));
}
static void t_attention(void** params) {
    attention(P(0, const float*), P(1, int), P(2, int), P(3, const int*), P(4, const u32*),
              P(5, const int*), P(6, int), P(7, int), P(8, const void*), P(9, const void*),
              P(10, int), P(11, float), P(12, float*), P(13, int), P(14, float*));
}

struct Kernel { const char* name; Trampoline run; };
static const Kernel KERNELS[] = {
    {"embed", t_embed},
    {"layer_norm", t_layer_norm},
    {"matmul_q4_0", t_matmul_q4_0},
    {"matmul_q8_0", t_matmul_q8_0},
    {"matmul_f16", t_matmul_f16},
    {"matmul_f32", t_matmul_f32},
    {"matmul_q4_k", t_matmul_q4_k},
    {"matmul_q5_k", t_matmul_q5_k},
    {"matmul_q6_k", t_matmul_q6_k},
    {"rope_store", t_rope_store},
    {"attention", t_attention},
};

// ---- the driver API crystald calls ----------------------------------------

typedef int CUresult;
static const CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_FOUND = 500,
                      INVALID_IMAGE = 200;
// GPU memory: 8 GiB, or CRYSTALD_EMU_GPU_BYTES (the tests of a model that
// does not fit).
static size_t total_bytes() {
    static size_t total = [] {
        const char* v = std::getenv("CRYSTALD_EMU_GPU_BYTES");
        return v ? (size_t)std::strtoull(v, nullptr, 10) : (size_t)8 << 30;
    }();
    return total;
}
#define TOTAL total_bytes()
static size_t g_allocated;
// One launch at a time, process-wide (tests share a process across
// threads): the scheduler's state above is global, as a GPU's one queue.
static std::mutex g_lock;

extern "C" {
CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int* v) { *v = 12020; return OK; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
CUresult cuDeviceGet(int* d, int i) { *d = i; return i == 0 ? OK : INVALID_VALUE; }
CUresult cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, len, "crystald CPU emulation");
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
    case 16: *v = 8; break;           // multiprocessors
    case 18: *v = 1; break;           // integrated, like a Jetson
    case 36: *v = 3200000; break;     // memory clock, kHz
    case 37: *v = 128; break;         // bus width, bits
    case 75: *v = 8; break;           // compute capability 8.7
    case 76: *v = 7; break;
    default: return INVALID_VALUE;
    }
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* b, int) { *b = TOTAL; return OK; }
static int g_ctx;
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = &g_ctx; return OK; }
CUresult cuCtxSetCurrent(void*) { return OK; }
CUresult cuCtxSynchronize() { return OK; }
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    std::lock_guard<std::mutex> hold(g_lock);
    *free_b = TOTAL - g_allocated;
    *total = TOTAL;
    return OK;
}
CUresult cuMemAlloc_v2(uint64_t* p, size_t n) {
    std::lock_guard<std::mutex> hold(g_lock);
    if (g_allocated + n > TOTAL) return OUT_OF_MEMORY;
    // The size goes in front of the allocation, for cuMemFree's count.
    char* m = (char*)std::aligned_alloc(256, 256 + ((n + 255) / 256) * 256);
    if (!m) return OUT_OF_MEMORY;
    *(size_t*)m = n;
    g_allocated += n;
    *p = (uint64_t)(m + 256);
    return OK;
}
CUresult cuMemFree_v2(uint64_t p) {
    std::lock_guard<std::mutex> hold(g_lock);
    char* m = (char*)p - 256;
    g_allocated -= *(size_t*)m;
    std::free(m);
    return OK;
}
CUresult cuMemcpyHtoD_v2(uint64_t dst, const void* src, size_t n) {
    std::memcpy((void*)dst, src, n);
    return OK;
}
CUresult cuMemcpyDtoH_v2(void* dst, uint64_t src, size_t n) {
    std::memcpy(dst, (const void*)src, n);
    return OK;
}
CUresult cuModuleLoadData(void** module, const void* image) {
    // The real driver would JIT this PTX; it must at least be PTX.
    if (!std::strstr((const char*)image, ".entry")) return INVALID_IMAGE;
    *module = &g_ctx;
    return OK;
}
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    for (const Kernel& k : KERNELS)
        if (std::strcmp(k.name, name) == 0) {
            *f = (void*)&k;
            return OK;
        }
    return NOT_FOUND;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned, void*, void** params, void**) {
    if (gz != 1 || by != 1 || bz != 1 || bx == 0 || bx > 1024 || bx % 32 != 0)
        return INVALID_VALUE;
    std::lock_guard<std::mutex> hold(g_lock);
    g_entry = ((const Kernel*)f)->run;
    g_params = params;
    g_block_dim = Dim3{bx, 1, 1};
    for (unsigned y = 0; y < gy; y++)
        for (unsigned x = 0; x < gx; x++) {
            g_block_idx = Dim3{x, y, 0};
            run_block(bx);
        }
    return OK;
}
CUresult cuGetErrorName(CUresult r, const char** s) {
    switch (r) {
    case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
    default: *s = nullptr; return INVALID_VALUE;
    }
    return OK;
}
}
