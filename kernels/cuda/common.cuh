/* Device helpers shared by the rabit CUDA kernels: dtype loads/stores, finiteness, warp reductions. */
#ifndef RABIT_CUDA_COMMON_CUH
#define RABIT_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>
#include <mutex>
#include <type_traits>

#include "../rabit_format.h"
#include "../rabit_kernels.h"

namespace rabit_cuda {

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* An empty kernel, compiled for the same targets as every other: which of the build's code the current device runs
   tells whether the sm_90 instructions (griddepcontrol, clusters; compiled only from __CUDA_ARCH__ >= 900) exist. */
template <int = 0>
__global__ void sm90_probe_kernel() {}

/* Facts of the current device (the glue sets it to the tensors' device), read once per device. sm90_code: the
   device is sm_90 or later AND runs this build's sm_90 code; a build without it (TORCH_CUDA_ARCH_LIST=8.0+PTX, run
   on an H100 through the JIT) must neither launch with PDL (its kernels would not wait: pdl_wait is compiled out)
   nor take a cluster path. */
struct DevInfo {
    int sms = 0, major = 0, minor = 0, smem_optin = 0, smem_per_sm = 0;
    bool sm90_code = false;
};
inline const DevInfo &device_info() {
    static DevInfo info[64];
    static std::once_flag once[64];  // several host threads may ask at once
    int dev = 0;
    cudaGetDevice(&dev);
    DevInfo &d = info[dev & 63];
    std::call_once(once[dev & 63], [&] {
        cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev);
        cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
        cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
        cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
        cudaFuncAttributes fa = {};
        if (cudaFuncGetAttributes(&fa, sm90_probe_kernel<0>) == cudaSuccess)
            d.sm90_code = d.major >= 9 && fa.ptxVersion >= 90;
        else
            (void)cudaGetLastError();  // no code for this device at all: every launch will say so
    });
    return d;
}

/* f(std::integral_constant<int, K>()) for the run-time path count K = 1..RABIT_MAX_K: the one switch that turns K
   into the template argument of the kernels; cudaErrorInvalidValue for any other K. */
static_assert(RABIT_MAX_K == 4, "with_paths covers K = 1..4");
template <class F>
inline cudaError_t with_paths(int K, F &&f) {
    switch (K) {
        case 1: return f(std::integral_constant<int, 1>());
        case 2: return f(std::integral_constant<int, 2>());
        case 3: return f(std::integral_constant<int, 3>());
        case 4: return f(std::integral_constant<int, 4>());
    }
    return cudaErrorInvalidValue;
}

/* Raise kernel fn's dynamic shared-memory limit to `bytes`, once per device: `done` holds one flag per device and
   belongs to the caller's kernel instantiation (the attribute is a property of the device's function). */
template <class Fn>
inline cudaError_t set_smem_limit_once(Fn *fn, int bytes, bool (&done)[64]) {
    int dev = 0;
    cudaGetDevice(&dev);
    if (done[dev & 63]) return cudaSuccess;
    const cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e == cudaSuccess) done[dev & 63] = true;
    return e;
}

/* Element l of a per-layer array with l a run-time value, by selects: a dynamic index into a kernel parameter
   array would copy the array to local memory. */
template <class T, int N>
__device__ __forceinline__ T pick(const T (&arr)[N], int l) {
    T v = arr[0];
#pragma unroll
    for (int i = 1; i < N; i++)
        if (l == i) v = arr[i];
    return v;
}

/* Whether p may be read or written in 16-byte units (the kernels' vector paths). */
inline bool aligned16(const void *p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

/* Resident blocks an SM of kernel fn with `threads` threads and `smem` dynamic shared memory on the current device,
   asked once per device: `cache` holds one entry per device (0: not asked yet) and belongs to the caller's kernel
   instantiation and launch shape. At least 1; a failed query is cleared (it is not sticky) and counts as 1, since
   the callers only size a grid with it. */
template <class Fn>
inline int resident_blocks_once(Fn *fn, int threads, size_t smem, std::atomic<int> (&cache)[64]) {
    int dev = 0;
    cudaGetDevice(&dev);
    int bps = cache[dev & 63].load(std::memory_order_relaxed);
    if (bps == 0) {
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, fn, threads, smem) != cudaSuccess) {
            (void)cudaGetLastError();
            bps = 0;
        }
        bps = bps < 1 ? 1 : bps;
        cache[dev & 63].store(bps, std::memory_order_relaxed);
    }
    return bps;
}

/* Programmatic dependent launch (sm_90). A kernel launched by launch_pdl may be scheduled before the previous
   kernel in the stream has finished: it must call pdl_wait() before it reads anything an earlier kernel may
   write and before it writes anything (its output may reuse memory an earlier kernel still reads). The earlier
   kernel's pdl_launch_dependents() lets it be scheduled sooner. Both are no-ops below sm_90, where launch_pdl
   is an ordinary launch (so is it where the device runs code of an older target: device_info().sm90_code). */
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/* global -> shared copies; src_bytes < the size zero-fills the rest (0: a zero fill, src not read) */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Thread-block clusters (sm_90): a barrier of all the cluster's threads (release / acquire: shared-memory writes
   before it are visible to the other blocks' reads after it); this block's rank; another block's address of this
   block's shared-memory address `saddr` (smem_u32: the .shared address of a generic pointer into shared memory),
   and a float read there. Below sm_90 they do nothing: no
   launch there has a cluster. */
__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
#endif
}
__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
    return r;
}
__device__ __forceinline__ uint32_t cluster_map(uint32_t saddr, uint32_t rank) {
    uint32_t remote = saddr;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(saddr), "r"(rank));
#endif
    return remote;
}
__device__ __forceinline__ float ld_cluster_f32(uint32_t remote) {
    float v = 0.0f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
#endif
    return v;
}

/* cluster_x > 1: the grid's blocks also form thread-block clusters of cluster_x x 1 x 1 (sm_90). */
template <typename Args>
cudaError_t launch_pdl(void (*kernel)(Args), dim3 grid, int threads, size_t smem, const Args &a, cudaStream_t s,
                       unsigned cluster_x = 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[2];
    int n = 0;
    if (device_info().sm90_code) {
        attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster_x > 1) {
        attr[n].id = cudaLaunchAttributeClusterDimension;
        attr[n].val.clusterDim.x = cluster_x;
        attr[n].val.clusterDim.y = 1;
        attr[n++].val.clusterDim.z = 1;
    }
    cfg.attrs = attr;
    cfg.numAttrs = n;
    return cudaLaunchKernelEx(&cfg, kernel, a);
}

__device__ __forceinline__ bool is_finite_f(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }

/* silu(v) = v / (1 + e^-v) in float32 (a large negative v gives -0): the decode kernels' SwiGLU */
__device__ __forceinline__ float silu_f(float v) { return __fdiv_rn(v, __fadd_rn(1.0f, expf(-v))); }

/* Element i of an array of dtype dt as stored (float32 bits, or the 16 bits zero-extended), and its conversion to
   float32 (exact for all three dtypes): two halves, so that a value loaded well ahead of its use is converted where
   it is used. Converted at the load, the caller waits for the load right there (the persistent 1-bit kernel's
   prefetched row scales did: 13 % of its stall samples, ncu, H200, thirty-sixth session). */
__device__ __forceinline__ uint32_t ld_raw(const void *p, int dt, int64_t i) {
    return dt == RABIT_F32 ? __ldg(reinterpret_cast<const uint32_t *>(p) + i)
                           : static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short *>(p) + i));
}

__device__ __forceinline__ float raw_to_f32(uint32_t u, int dt) {
    if (dt == RABIT_F32) return __uint_as_float(u);
    if (dt == RABIT_BF16) return __uint_as_float(u << 16);
    return __half2float(__ushort_as_half(static_cast<unsigned short>(u)));
}

/* Element i of an array of dtype dt, as float32, converted at once. */
__device__ __forceinline__ float ld_any(const void *p, int dt, int64_t i) { return raw_to_f32(ld_raw(p, dt, i), dt); }

/* float32 -> dtype bits, round to nearest even (PyTorch's casts). */
__device__ __forceinline__ unsigned short f32_to_16(float v, int dt) {
    if (dt == RABIT_BF16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
    return __half_as_ushort(__float2half_rn(v));
}

__device__ __forceinline__ void st_any(void *p, int dt, int64_t i, float v) {
    if (dt == RABIT_F32)
        reinterpret_cast<float *>(p)[i] = v;
    else
        reinterpret_cast<unsigned short *>(p)[i] = f32_to_16(v, dt);
}

template <typename T>
struct DT;
template <>
struct DT<float> {
    static constexpr int code = RABIT_F32;
    __device__ static __forceinline__ float to_f(float v) { return v; }
};
template <>
struct DT<__half> {
    static constexpr int code = RABIT_F16;
    __device__ static __forceinline__ float to_f(__half v) { return __half2float(v); }
};
template <>
struct DT<__nv_bfloat16> {
    static constexpr int code = RABIT_BF16;
    __device__ static __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
};

/* D += A B on the tensor cores, float32 accumulation (m16n8k16, A row-major, B column-major); TY: "f16" or "bf16",
   the type of A and B. */
#define RABIT_MMA_M16N8K16(TY)                                                                                  \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, " \
                 "{%0,%1,%2,%3};\n"                                                                               \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                  \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))

__device__ __forceinline__ void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
    RABIT_MMA_M16N8K16("f16");
}
__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    RABIT_MMA_M16N8K16("bf16");
}

}  // namespace rabit_cuda

#endif
