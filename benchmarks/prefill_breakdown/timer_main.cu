// Standalone timer of rabit_cuda::packed_prefill (benchmarks/prefill_breakdown/run.sh appends it to a copy of the kernel
// source): 4096 x 4096, K = 2, fp16 x, M = 2048 and 128; CUDA events around 50 back-to-back calls after 5 warm-up calls.
#include <cstdio>
#include <vector>
#include <random>
#include <cuda_fp16.h>
#include "rabit_cuda.cuh"
int main() {
    const int out = 4096, in = 4096, K = 2, nw = in / 32;
    const int Ms[2] = {2048, 128};
    std::mt19937 rng(1);
    std::vector<uint32_t> bits((size_t)K * out * nw); for (auto &b : bits) b = rng();
    std::vector<float> g(K * out), h(K * in); for (auto &v : g) v = 0.01f + (rng() % 100) * 1e-4f; for (auto &v : h) v = 0.5f + (rng() % 100) * 1e-2f;
    std::vector<__half> x((size_t)2048 * in); for (auto &v : x) v = __float2half((int)(rng() % 200) / 100.0f - 1.0f);
    uint32_t *db; float *dg, *dh; __half *dx, *dy;
    cudaMalloc(&db, bits.size() * 4); cudaMalloc(&dg, g.size() * 4); cudaMalloc(&dh, h.size() * 4);
    cudaMalloc(&dx, x.size() * 2); cudaMalloc(&dy, (size_t)2048 * out * 2);
    cudaMemcpy(db, bits.data(), bits.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dg, g.data(), g.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dh, h.data(), h.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice);
    for (int mi = 0; mi < 2; mi++) {
        const int M = Ms[mi];
        for (int i = 0; i < 5; i++) rabit_cuda::packed_prefill(dx, RABIT_F16, M, db, dg, dh, nullptr, K, out, in, dy, 0);
        cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
        const int n = 50;
        cudaEventRecord(a);
        for (int i = 0; i < n; i++) rabit_cuda::packed_prefill(dx, RABIT_F16, M, db, dg, dh, nullptr, K, out, in, dy, 0);
        cudaEventRecord(b); cudaEventSynchronize(b);
        float ms; cudaEventElapsedTime(&ms, a, b);
        printf("%s M=%d: %.2f us  (err %s)\n", VARIANT, M, ms * 1000 / n, cudaGetErrorString(cudaGetLastError()));
    }
    return 0;
}
