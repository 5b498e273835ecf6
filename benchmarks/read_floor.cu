// The floor under any packed GEMV: how long merely reading a layer's packed bits takes, one kernel launch per
// layer, next to cuBLAS fp16 at M = 1 measured in the same run. No arithmetic: each kernel XORs what it loads
// (so the loads cannot be dropped). Three access patterns over the same bytes:
//   contiguous   the whole [K][out][in/32] words, grid-stride, 16 bytes per lane (the best case)
//   rows16       a block per 16 consecutive rows, warp w takes 64-byte pieces w, w+8, ... of each row (the
//                int8 and 1-bit decode kernels' pattern)
//   rowthread    a thread per row, a 1024-column slice per block, 32 bytes per step (a per-row kernel's pattern)
//   ring         the copy engine's pattern of the streamed kernel tried in the twenty-fifth session (docs/kernels.md,
//                "A streamed 1-bit kernel"): a persistent grid of C blocks per SM, each a producer warp that copies
//                tiles of 16 rows x 128 words per path (tensor-map boxes) into a ring of S stages, and 8 consumer warps
//                that only wait for a stage, XOR a word and release it; tiles taken in a fixed order (block b: b,
//                b + grid, ...) or from an atomic counter. That kernel's copies alone reached ~1.5 TB/s whatever S
//                was; this tells whether the copy engine or that kernel caps them.
// Layers cycle through a pool larger than the L2, launches are queued back to back (the launch gap counts, as
// it does for a kernel in a decode step), CUDA events around them.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/read_floor benchmarks/read_floor.cu -lcublas && /tmp/read_floor OUT.json
#include <cublas_v2.h>
#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled (through the runtime: no -lcuda)
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <ctime>
#include <functional>
#include <string>
#include <vector>

#define CHECK(x)                                                                            \
    do {                                                                                    \
        cudaError_t e_ = (x);                                                               \
        if (e_ != cudaSuccess) {                                                            \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));     \
            return 1;                                                                       \
        }                                                                                   \
    } while (0)

constexpr int K = 2;

__global__ void contiguous(const uint4 *p, int64_t n16, uint32_t *sink) {
    uint32_t acc = 0;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n16;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const uint4 v = __ldcs(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;  // never true for the constant fill below; keeps the loads
}

__global__ void rows16(const char *p, int rows, int rowbytes, uint32_t *sink) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    uint32_t acc = 0;
    for (int k = 0; k < K; k++)
        for (int piece = warp; piece * 64 < rowbytes; piece += 8)
            for (int r = 0; r < 2; r++) {
                const int o = blockIdx.x * 16 + g + 8 * r;
                if (o < rows && piece * 64 + 16 * t < rowbytes) {  // rows of 16-byte multiples (in % 128 == 0)
                    const uint4 v = __ldcs(reinterpret_cast<const uint4 *>(p + (static_cast<int64_t>(k) * rows + o) *
                                                                                   rowbytes + piece * 64) + t);
                    acc ^= v.x ^ v.y ^ v.z ^ v.w;
                }
            }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}

__global__ void rowthread(const char *p, int rows, int rowbytes, int slice_bytes, uint32_t *sink) {
    const int o = blockIdx.x * 256 + threadIdx.x;
    const int64_t c0 = static_cast<int64_t>(blockIdx.y) * slice_bytes;
    uint32_t acc = 0;
    if (o < rows)
        for (int k = 0; k < K; k++) {
            const char *row = p + (static_cast<int64_t>(k) * rows + o) * rowbytes + c0;
            for (int b = 0; b < slice_bytes && c0 + b < rowbytes; b += 32) {
                const uint4 v0 = __ldcs(reinterpret_cast<const uint4 *>(row + b));
                const uint4 v1 = __ldcs(reinterpret_cast<const uint4 *>(row + b) + 1);
                acc ^= v0.x ^ v0.y ^ v0.z ^ v0.w ^ v1.x ^ v1.y ^ v1.z ^ v1.w;
            }
        }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}

struct RingArgs {
    CUtensorMap map;  // the words [K * out][nw] as boxes of 128 words x 16 rows
    int tiles, chunks, out, stages;
    unsigned long long *counter;  // atomic order: items from atomicAdd(counter, 1) - base
    long long base;  // the counter's value at this launch's start (each launch adds tiles * chunks + gridDim.x)
    uint32_t *sink;
};
constexpr int kRingBox = 16 * 128 * 4;  // bytes of one box

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile("{\n.reg .pred P1;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n@P1 bra DONE;\n"
                 "bra WAIT;\nDONE:\n}\n" ::"r"(bar), "r"(parity) : "memory");
}

template <bool DYNAMIC>
__global__ void __launch_bounds__(288) ring(const __grid_constant__ RingArgs a) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) uint64_t bars[2 * 8];
    __shared__ int item_of[8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, S = a.stages;
    const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(bars)), empty0 = full0 + 64;
    const uint32_t ring0 = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    if (threadIdx.x == 0) {
        for (int i = 0; i < S; i++) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(full0 + 8 * i) : "memory");
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 8;\n" ::"r"(empty0 + 8 * i) : "memory");
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    const long long items = static_cast<long long>(a.tiles) * a.chunks;
    int slot = 0;
    uint32_t phase = 0;
    if (warp == 8) {  // the producer
        bool wrapped = false;
        long long next = blockIdx.x;
        for (;;) {
            long long it = next;
            if (DYNAMIC) {
                if (lane == 0) it = static_cast<long long>(atomicAdd(a.counter, 1ull)) - a.base;
                it = __shfl_sync(0xffffffffu, it, 0);
            } else {
                next += gridDim.x;
            }
            if (wrapped) mbar_wait(empty0 + 8 * slot, phase ^ 1);
            if (it >= items) {  // no more: tell the consumers (an arrival without bytes)
                if (lane == 0) {
                    item_of[slot] = -1;
                    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(full0 + 8 * slot) : "memory");
                }
                return;
            }
            const int tile = static_cast<int>(it / a.chunks), chunk = static_cast<int>(it % a.chunks);
            if (lane == 0) {
                item_of[slot] = static_cast<int>(it);
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(full0 + 8 * slot),
                             "r"(K * kRingBox) : "memory");
            }
            __syncwarp();
            if (lane < K)
                asm volatile(
                    "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
                    "%3}], [%4];\n" ::"r"(ring0 + (slot * K + lane) * kRingBox),
                    "l"(reinterpret_cast<uint64_t>(&a.map)), "r"(chunk * 128), "r"(lane * a.out + tile * 16),
                    "r"(full0 + 8 * slot)
                    : "memory");
            if (++slot == S) {
                slot = 0;
                phase ^= 1;
                wrapped = true;
            }
        }
    }
    uint32_t acc = 0;
    for (;;) {  // the consumers
        mbar_wait(full0 + 8 * slot, phase);
        if (item_of[slot] < 0) break;
        acc ^= reinterpret_cast<const uint32_t *>(smem)[(slot * K * kRingBox) / 4 + warp * 32 + lane];
        __syncwarp();
        if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(empty0 + 8 * slot) : "memory");
        if (++slot == S) {
            slot = 0;
            phase ^= 1;
        }
    }
    if (acc == 0x9e3779b9u) a.sink[0] = acc;
}

/* The driver's tensor-map encoder through the runtime (as kernels/cuda/packed_prefill.cu). */
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    void *p = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
        return nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "read_floor.json";
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    int rt = 0;
    cudaRuntimeGetVersion(&rt);
    cublasHandle_t cublas;
    if (cublasCreate(&cublas) != CUBLAS_STATUS_SUCCESS) return 1;
    uint32_t *sink;
    CHECK(cudaMalloc(&sink, 4));
    const PFN_cuTensorMapEncodeTiled_v12000 enc = tensor_map_encoder();  // for the ring pattern
    if (!enc) {
        fprintf(stderr, "no tensor-map encoder in this driver\n");
        return 1;
    }
    const int shapes[6][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}, {12288, 4096}, {14336, 4096}, {4096, 14336}};
    const size_t pool_bytes = 160u << 20;  // > 2 x the L2 (50 MB on the H100, 60 MB on the H200)
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    std::string rows_json;
    for (auto &sh : shapes) {
        const int out = sh[0], in = sh[1], rowbytes = in / 8;  // all shapes: in % 128 == 0
        const size_t layer = static_cast<size_t>(K) * out * rowbytes;
        const int P = static_cast<int>(pool_bytes / layer) + 1;
        char *bits;
        CHECK(cudaMalloc(&bits, layer * P));
        CHECK(cudaMemset(bits, 0x5a, layer * P));
        // per layer time of `launch(i)` over the pool, after one warm pass
        auto timeit = [&](const std::function<void(int)> &launch, int n) {
            for (int i = 0; i < n; i++) launch(i);
            cudaEventRecord(e0);
            const int reps = 20 * n;
            for (int i = 0; i < reps; i++) launch(i % n);
            cudaEventRecord(e1);
            cudaEventSynchronize(e1);
            float ms = 0;
            cudaEventElapsedTime(&ms, e0, e1);
            return 1000.0 * ms / reps;
        };
        const double t_contig = timeit([&](int i) {
            contiguous<<<prop.multiProcessorCount * 8, 256>>>(reinterpret_cast<const uint4 *>(bits + layer * i),
                                                              layer / 16, sink);
        }, P);
        const double t_rows16 = timeit([&](int i) {
            rows16<<<(out + 15) / 16, 256>>>(bits + layer * i, out, rowbytes, sink);
        }, P);
        const double t_rowthread = timeit([&](int i) {
            rowthread<<<dim3((out + 255) / 256, (in + 1023) / 1024), 256>>>(bits + layer * i, out, rowbytes, 128, sink);
        }, P);
        CHECK(cudaGetLastError());
        // ring: C blocks per SM (1, 2, 4), S stages (2, 4, 8), fixed or atomic tile order; -1 where C blocks of S
        // stages do not fit an SM
        std::vector<RingArgs> maps(P);
        const int nw = rowbytes / 4;
        for (int i = 0; i < P; i++) {
            RingArgs &r = maps[i];
            const cuuint64_t dims[2] = {static_cast<cuuint64_t>(nw), static_cast<cuuint64_t>(K) * out};
            const cuuint64_t strides[1] = {static_cast<cuuint64_t>(rowbytes)};
            const cuuint32_t box[2] = {128, 16}, elem[2] = {1, 1};
            if (enc(&r.map, CU_TENSOR_MAP_DATA_TYPE_UINT32, 2, bits + layer * i, dims, strides, box, elem,
                    CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
                fprintf(stderr, "tensor map refused\n");
                return 1;
            }
            r.tiles = (out + 15) / 16;
            r.chunks = (nw + 127) / 128;
            r.out = out;
            r.sink = sink;
        }
        unsigned long long *counter;
        CHECK(cudaMalloc(&counter, sizeof *counter));
        std::string ring_json;
        for (int dyn = 0; dyn < 2; dyn++)
            for (int C : {1, 2, 4})
                for (int S : {2, 4, 8}) {
                    const int smem = S * K * kRingBox;
                    auto kern = dyn ? ring<true> : ring<false>;
                    CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
                    int fit = 0;
                    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, kern, 288, smem));
                    char key[32];
                    snprintf(key, sizeof key, "%s_c%d_s%d", dyn ? "atomic" : "fixed", C, S);
                    double t = -1;
                    if (fit >= C) {
                        const int grid = C * prop.multiProcessorCount;
                        long long base = 0;
                        CHECK(cudaMemset(counter, 0, sizeof *counter));
                        t = timeit([&](int i) {
                            RingArgs r = maps[i];
                            r.stages = S;
                            r.counter = counter;
                            r.base = base;
                            base += static_cast<long long>(r.tiles) * r.chunks + grid;
                            kern<<<grid, 288, smem>>>(r);
                        }, P);
                        CHECK(cudaGetLastError());
                    }
                    char b[96];
                    snprintf(b, sizeof b, "%s\"%s\": %.3f", ring_json.empty() ? "" : ", ", key, t);
                    ring_json += b;
                    if (t > 0) printf("    ring %-14s %7.2f us (%5.0f GB/s)\n", key, t, layer / t / 1e3);
                }
        cudaFree(counter);
        CHECK(cudaFree(bits));
        // cuBLAS fp16, M = 1: y[1][out] = x[1][in] W^T with W [out][in] row-major (column-major W^T)
        const size_t wbytes = static_cast<size_t>(out) * in * 2;
        const int PW = static_cast<int>(pool_bytes / wbytes) + 1;
        __half *w, *x, *y;
        CHECK(cudaMalloc(&w, wbytes * PW));
        CHECK(cudaMemset(w, 0, wbytes * PW));
        CHECK(cudaMalloc(&x, in * 2));
        CHECK(cudaMemset(x, 0, in * 2));
        CHECK(cudaMalloc(&y, out * 2));
        const float one = 1.0f, zero = 0.0f;
        const double t_cublas = timeit([&](int i) {
            cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, out, 1, in, &one, w + static_cast<size_t>(out) * in * i,
                         CUDA_R_16F, in, x, CUDA_R_16F, in, &zero, y, CUDA_R_16F, out, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT);
        }, PW);
        CHECK(cudaGetLastError());
        cudaFree(w);
        cudaFree(x);
        cudaFree(y);
        char buf[2048];
        snprintf(buf, sizeof buf,
                 "%s  {\"out\": %d, \"in\": %d, \"K\": %d, \"bits_MB\": %.3f, \"pool\": %d, \"cublas_fp16_m1_us\": %.3f, "
                 "\"contiguous_us\": %.3f, \"rows16_us\": %.3f, \"rowthread_us\": %.3f, \"contiguous_GBps\": %.1f, "
                 "\"ceiling_vs_cublas\": %.3f, \"ring_us\": {%s}}",
                 rows_json.empty() ? "" : ",\n", out, in, K, layer / 1e6, P, t_cublas, t_contig, t_rows16, t_rowthread,
                 layer / t_contig / 1e3, t_cublas / t_contig, ring_json.c_str());
        rows_json += buf;
        printf("%5d x %-5d  %6.2f MB  cuBLAS %6.2f us  read: contiguous %6.2f us (%5.0f GB/s, ceiling x%.2f)  rows16 "
               "%6.2f  rowthread %6.2f\n",
               out, in, layer / 1e6, t_cublas, t_contig, layer / t_contig / 1e3, t_cublas / t_contig, t_rows16,
               t_rowthread);
        fflush(stdout);
    }
    char date[32];
    const time_t now = time(nullptr);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "cannot write %s\n", path);
        return 1;
    }
    fprintf(f,
            "{\"benchmark\": \"read_floor\", \"device\": \"%s\", \"sms\": %d, \"cuda_runtime\": %d, \"date\": \"%s\",\n"
            " \"method\": \"per-layer time of one kernel that only loads the K=2 packed bits (XOR into a register), "
            "layers cycled through a 160 MB pool, launches queued back to back, CUDA events; cuBLAS fp16 GemmEx at "
            "M=1 the same way; ceiling_vs_cublas = cuBLAS / contiguous read; ring_us: the streamed pattern (fixed "
            "or atomic tile order, C blocks a SM, S stages; -1: does not fit)\",\n \"rows\": [\n%s\n]}\n",
            prop.name, prop.multiProcessorCount, rt, date, rows_json.c_str());
    fclose(f);
    printf("wrote %s\n", path);
    cublasDestroy(cublas);
    return 0;
}
