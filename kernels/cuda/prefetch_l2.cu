/* L2 prefetch of tensors that a later kernel of the stream reads: a decoder's next layer weights, fetched from HBM
   while the kernels before their use run. The decode kernels are latency bound (docs/kernels.md "What bounds the
   decode kernels"): each reaches a third of the HBM bandwidth or less, so the bandwidth left over can bring the
   next layer's bits into the L2 before its kernel starts. */
#include <cstdlib>

#include "common.cuh"
#include "rabit_cuda.cuh"

namespace rabit_cuda {

namespace {

struct PrefetchArgs {
    const char *p[kPrefetchMaxTensors];
    int64_t bytes[kPrefetchMaxTensors];  // multiples of 16 from 16-byte-aligned p (the bulk prefetch's rule)
    int n;
    int64_t chunk;  // bytes per thread and tensor, a multiple of 16
};

__global__ void prefetch_l2_kernel(PrefetchArgs a) {
    // Nothing here is read back: the kernels after this one may be scheduled at once.
    pdl_launch_dependents();
    const int64_t off = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * a.chunk;
    for (int i = 0; i < a.n; ++i) {
        if (off >= a.bytes[i]) continue;
        const int64_t n = min64(a.chunk, a.bytes[i] - off);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(a.p[i] + off), "r"(static_cast<uint32_t>(n))
                     : "memory");
#else
        for (int64_t b = 0; b < n; b += 128) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(a.p[i] + off + b));
#endif
    }
    // Complete only after the kernel before: a kernel after this one that waits for it (pdl_wait) then also waits
    // for that one, so the stream's order holds through this launch.
    pdl_wait();
}

int64_t env_int(const char *name, int64_t dflt) {
    const char *v = getenv(name);
    return v && *v ? atoll(v) : dflt;
}

}  // namespace

cudaError_t prefetch_l2(const void *const *ptrs, const int64_t *bytes, int n, cudaStream_t stream) {
    if (n < 0 || n > kPrefetchMaxTensors) return cudaErrorInvalidValue;
    PrefetchArgs a = {};
    int64_t most = 0;
    for (int i = 0; i < n; ++i) {
        const uintptr_t p = reinterpret_cast<uintptr_t>(ptrs[i]);
        const uintptr_t start = (p + 15) & ~static_cast<uintptr_t>(15);
        const int64_t left = bytes[i] - static_cast<int64_t>(start - p);
        if (left < 16) continue;  // too small to prefetch in bulk; a hint, so leaving it out changes no result
        a.p[a.n] = reinterpret_cast<const char *>(start);
        a.bytes[a.n] = left & ~static_cast<int64_t>(15);
        most = max64(most, a.bytes[a.n]);
        ++a.n;
    }
    if (a.n == 0) return cudaSuccess;
    a.chunk = env_int("RABIT_PF_CHUNK", 16384) & ~static_cast<int64_t>(15);
    if (a.chunk < 16) a.chunk = 16;
    const int threads = static_cast<int>(env_int("RABIT_PF_THREADS", 32));
    const int64_t work = (most + a.chunk - 1) / a.chunk;
    return launch_pdl(prefetch_l2_kernel, dim3(static_cast<unsigned>((work + threads - 1) / threads)), threads, 0, a,
                      stream);
}

}  // namespace rabit_cuda
