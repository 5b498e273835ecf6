/*
 * Prefill GEMM of packed_linear (fp16/bf16 x, M > kDecodeMaxM): y = x What^T + bias, where the weight tile
 * What[o][j] = sum_k g_k[o] B_k[o][j] h_k[j] is formed from the sign bits in float32 exactly as
 * rabit.reference.dequantize forms it (the product per path, added in path order) and rounded once to x's dtype.
 * No unpacked weight is ever written to device memory. The accuracy is that of a dense fp16/bf16 layer holding What
 * in x's dtype; both kernels below form the same What, bit for bit, and differ only in the order of the float32
 * accumulation (none, on the H100 and H200, without the wgmma kernel's k-split).
 *
 *   wgmma (sm_90a: H100, H200; x rows 16-byte aligned): a block of three warpgroups owns 128 weight rows and 128 or
 *     256 tokens. The producer warpgroup loads x by TMA (into the 128-byte-swizzled K-major layout that wgmma reads)
 *     and h and the bit words by cp.async, 6-13 stages deep, against full/empty mbarriers. Each thread of the two
 *     consumer warpgroups builds its part of What straight into the registers of wgmma's A operand (the m64n128k16
 *     register fragment), one 64-column k-block ahead of the tensor cores. With few output tiles a cluster of blocks
 *     splits the k-blocks and rank 0 adds the partial sums in rank order.
 *   mma.sync (sm_80, and any x the wgmma kernel does not take): What expanded into shared memory, one 128 x 32
 *     tile per k-step, x by cp.async, mma.m16n8k16.
 *
 * RABIT_CUDA_PREFILL=mma or wgmma forces one, RABIT_CUDA_PREFILL_SPLITS=n the k-split (tests, benchmarks); wgmma
 * where it cannot run is an error. docs/kernels.md has the measurements.
 */
#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled (the driver call comes through the runtime: no -lcuda)
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "common.cuh"
#include "rabit_cuda.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define RABIT_DEVICE_WGMMA 1
#endif

namespace rabit_cuda {

namespace {

constexpr int PF_BM = 256, PF_BN = 128, PF_BK = 32, PF_LD = PF_BK + 8;  // smem row stride in halves (80 B)
constexpr int PF_SMEM = 2 * (PF_BM + PF_BN) * PF_LD * 2;                  // bytes, two stages

struct PrefillArgs {
    const void *x;
    int64_t M;
    const rabit_word_t *packed;
    const float *g, *h, *bias;
    void *y;
    int64_t out, in, nw;
    int xvec;     // x rows 16-byte aligned (in % 8 == 0)
    int splits;   // wgmma kernel: blocks of a cluster that split the k-blocks (1: no split)
    int nw_even;  // bit rows hold an even number of words: a row's k-block pair is 8-byte aligned
    int bits_tma; // wgmma kernel: h and the bit words come by TMA (rows of 16-byte multiples); else by cp.async
};

/* 16 bytes global -> shared, bypassing L1; src_bytes < 16 zero-fills the rest (0: a zero fill, src not read). */
__device__ __forceinline__ void cp_async16_s(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&v);
}

/* 256 threads = 8 warps as 4 (M) x 2 (N); warp tile 64 x 64; mma m16n8k16 with float32 accumulation. */
template <typename T, int K>
__global__ void __launch_bounds__(256, 1) prefill_kernel(const PrefillArgs a) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *As = reinterpret_cast<T *>(smem_raw);   // [2][BM][LD]
    T *Ws = As + 2 * PF_BM * PF_LD;            // [2][BN][LD]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int64_t m_base = static_cast<int64_t>(blockIdx.y) * PF_BM;
    const int64_t n_base = static_cast<int64_t>(blockIdx.x) * PF_BN;
    const int64_t in = a.in, nw = a.nw;
    const int nk = static_cast<int>((in + PF_BK - 1) / PF_BK);
    const T *x = static_cast<const T *>(a.x);

    // weight-tile role of this thread: row wr_ (of BN), 16 columns starting at wc_
    const int wr_ = tid >> 1, wc_ = (tid & 1) * 16;
    const int64_t wo = n_base + wr_;
    const bool wvalid = wo < a.out;
    float gk[K];
#pragma unroll
    for (int k = 0; k < K; k++) gk[k] = wvalid ? __ldg(a.g + k * a.out + wo) : 0.0f;

    auto load_x = [&](int kt, int st) {
        const int64_t kk = static_cast<int64_t>(kt) * PF_BK;
#pragma unroll
        for (int i = 0; i < (PF_BM * PF_BK / 8) / 256; i++) {
            const int c = tid + i * 256;
            const int r = c >> 2, c8 = (c & 3) * 8;
            T *dst = As + (st * PF_BM + r) * PF_LD + c8;
            const int64_t m = m_base + r, col = kk + c8;
            if (a.xvec) {
                const bool ok = m < a.M && col < in;
                cp_async16_s(smem_u32(dst), ok ? static_cast<const void *>(x + m * in + col) : static_cast<const void *>(x),
                             ok ? 16 : 0);
            } else {
                uint16_t v[8];
#pragma unroll
                for (int e = 0; e < 8; e++)
                    v[e] = (m < a.M && col + e < in) ? reinterpret_cast<const uint16_t *>(x)[m * in + col + e] : 0;
                *reinterpret_cast<uint4 *>(dst) =
                    make_uint4(v[0] | (uint32_t(v[1]) << 16), v[2] | (uint32_t(v[3]) << 16),
                               v[4] | (uint32_t(v[5]) << 16), v[6] | (uint32_t(v[7]) << 16));
            }
        }
    };
    auto load_bits = [&](int kt, uint32_t (&bw)[K]) {
#pragma unroll
        for (int k = 0; k < K; k++) bw[k] = wvalid ? (__ldg(a.packed + (k * a.out + wo) * nw + kt) >> wc_) : 0u;
    };
    auto dequant = [&](int kt, const uint32_t (&bw)[K], int st) {
        const int64_t c0 = static_cast<int64_t>(kt) * PF_BK + wc_;
        float v[16];
#pragma unroll
        for (int e = 0; e < 16; e++) v[e] = 0.0f;
#pragma unroll
        for (int k = 0; k < K; k++) {
            float hv[16];
            if (c0 + 16 <= in) {
                const float4 *hp = reinterpret_cast<const float4 *>(a.h + k * in + c0);
                if ((reinterpret_cast<uintptr_t>(hp) & 15) == 0) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const float4 f = __ldg(hp + e);
                        hv[4 * e] = f.x; hv[4 * e + 1] = f.y; hv[4 * e + 2] = f.z; hv[4 * e + 3] = f.w;
                    }
                } else {
#pragma unroll
                    for (int e = 0; e < 16; e++) hv[e] = __ldg(a.h + k * in + c0 + e);
                }
            } else {
#pragma unroll
                for (int e = 0; e < 16; e++) hv[e] = (c0 + e < in) ? __ldg(a.h + k * in + c0 + e) : 0.0f;
            }
            const uint32_t gbits = __float_as_uint(gk[k]);
#pragma unroll
            for (int e = 0; e < 16; e++) {
                // +-g_k by the sign bit (bit clear = -1), times h_k, added in path order: rabit.reference.dequantize
                const float sg = __uint_as_float(gbits ^ ((~bw[k] << (31 - e)) & 0x80000000u));
                const float p = __fmul_rn(sg, hv[e]);
                v[e] = k == 0 ? p : __fadd_rn(v[e], p);
            }
        }
        uint32_t p[8];
#pragma unroll
        for (int e = 0; e < 8; e++) p[e] = pack2<T>(v[2 * e], v[2 * e + 1]);
        uint4 *dst = reinterpret_cast<uint4 *>(Ws + (st * PF_BN + wr_) * PF_LD + wc_);
        dst[0] = make_uint4(p[0], p[1], p[2], p[3]);
        dst[1] = make_uint4(p[4], p[5], p[6], p[7]);
    };

    float acc[4][8][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    uint32_t bw[K];
    load_x(0, 0);
    load_bits(0, bw);
    dequant(0, bw, 0);
    cp_async_wait_all();
    __syncthreads();

    for (int kt = 0; kt < nk; kt++) {
        const int st = kt & 1;
        const bool more = kt + 1 < nk;
        if (more) {
            load_x(kt + 1, st ^ 1);
            load_bits(kt + 1, bw);
        }
#pragma unroll
        for (int ks = 0; ks < PF_BK; ks += 16) {
            uint32_t af[4][4], bf[8][2];
#pragma unroll
            for (int mt = 0; mt < 4; mt++)
                ldmatrix_x4(af[mt], As + (st * PF_BM + wm * 64 + mt * 16 + (lane & 15)) * PF_LD + ks + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < 4; np++) {
                uint32_t r[4];
                ldmatrix_x4(r, Ws + (st * PF_BN + wn * 64 + np * 16 + (lane & 7) + (lane >> 4) * 8) * PF_LD + ks +
                                   ((lane >> 3) & 1) * 8);
                bf[2 * np][0] = r[0];
                bf[2 * np][1] = r[1];
                bf[2 * np + 1][0] = r[2];
                bf[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < 4; mt++)
#pragma unroll
                for (int nt = 0; nt < 8; nt++) {
                    if (DT<T>::code == RABIT_BF16)
                        mma_bf16(acc[mt][nt], af[mt][0], af[mt][1], af[mt][2], af[mt][3], bf[nt][0], bf[nt][1]);
                    else
                        mma_f16(acc[mt][nt], af[mt][0], af[mt][1], af[mt][2], af[mt][3], bf[nt][0], bf[nt][1]);
                }
        }
        if (more) dequant(kt + 1, bw, st ^ 1);
        cp_async_wait_all();
        __syncthreads();
    }

    // epilogue: + bias, round to T
    const int g = lane >> 2, t = lane & 3;
    T *y = static_cast<T *>(a.y);
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        const int64_t o = n_base + wn * 64 + nt * 8 + 2 * t;
        const float b0 = (a.bias && o < a.out) ? __ldg(a.bias + o) : 0.0f;
        const float b1 = (a.bias && o + 1 < a.out) ? __ldg(a.bias + o + 1) : 0.0f;
#pragma unroll
        for (int mt = 0; mt < 4; mt++)
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                const int64_t m = m_base + wm * 64 + mt * 16 + g + hh * 8;
                if (m >= a.M) continue;
                const float v0 = acc[mt][nt][2 * hh] + b0, v1 = acc[mt][nt][2 * hh + 1] + b1;
                if (o + 1 < a.out && ((a.out & 1) == 0)) {
                    *reinterpret_cast<uint32_t *>(y + m * a.out + o) = pack2<T>(v0, v1);
                } else {
                    if (o < a.out) st_any(y, DT<T>::code, m * a.out + o, v0);
                    if (o + 1 < a.out) st_any(y, DT<T>::code, m * a.out + o + 1, v1);
                }
            }
    }
}


/* ---------------------------------------------------------------------------------------------- wgmma (sm_90a) */
constexpr int WG_BM = 128;    // weight rows per block: two warpgroups of 64
constexpr int WG_BK = 64;     // columns per k-block: one 128-byte swizzle row of x per token
constexpr int WG_THREADS = 384;  // a producer warpgroup and two consumer warpgroups

template <int K, int NB>
struct WgLayout {
    static constexpr int x_stage = NB * 128 * WG_BK * 2;  // bytes: NB * 128 tokens x 64 columns of x
    static constexpr int h_stage = K * WG_BK * 4;         // bytes: K paths x 64 columns of h (float32)
    // bytes: K paths x 128 rows x 4 bit words, the words of this k-block and the next (by TMA: a box's rows are 16
    // bytes at least; each even k-block's stage holds the pair), or by cp.async the first 2 words of each row's 4
    static constexpr int b_stage = K * WG_BM * 16;
    // stages of x, h and bits in shared memory: as many as fit (the bits' loads from device memory wait ~1-2 us);
    // 1024: slack to align x
    static constexpr int stages = (227 * 1024 - 1024 - 512) / (x_stage + h_stage + b_stage);
    static constexpr int smem = 1024 + stages * (x_stage + h_stage + b_stage);
};

#ifdef RABIT_DEVICE_WGMMA
__device__ __forceinline__ void cp_async4_s(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async8_s(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
/* Arrives on the mbarrier once all of this thread's earlier cp.async copies have landed (counted in its init). */
__device__ __forceinline__ void cp_async_arrive_noinc(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
constexpr int WG_PRODUCER_REGS = 24, WG_CONSUMER_REGS = 240;
/* Register budgets of the producer and consumer warpgroups (setmaxnreg: 24 + 2 x 240 <= 3 x 168, the entry cap). */
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
/* The x tiles come by the tensor memory accelerator (TMA), each stage's arrival counted in bytes on an mbarrier.
   (Loaded by cp.async from all threads they held the loop to ~1,000 cycles per k-block on an H100, as long as the
   tensor cores' work: measured with the build and the MMAs left out.) */
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred P1;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\nbra WAIT;\nDONE:\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap *map, int c0, int c1, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Keeps the compiler from moving accumulator reads or writes across an asynchronous wgmma. */
template <int N>
__device__ __forceinline__ void keep(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

/* Ends the computation of A and the descriptors here, before wgmma.fence: volatile asm keeps its order, so the
   compiler cannot sink an instruction that defines a wgmma operand in between the wgmmas. */
template <int NB>
__device__ __forceinline__ void pin(uint32_t (&A)[4][4], uint64_t (&desc)[4][NB]) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
        asm volatile("" : "+r"(A[j][0]), "+r"(A[j][1]), "+r"(A[j][2]), "+r"(A[j][3]));
#pragma unroll
        for (int nb = 0; nb < NB; nb++) asm volatile("" : "+l"(desc[j][nb]));
    }
}

/* Shared-memory matrix descriptor of a K-major tile with 128-byte swizzle: rows of 128 bytes, 8-row groups 1024
   bytes apart (stride byte offset); the leading byte offset is unused in this layout. */
__device__ __forceinline__ uint64_t desc_sw128(uint32_t saddr) {
    return static_cast<uint64_t>((saddr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(1) << 16) |
           (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

/* D[64 x 128] += A[64 x 16] (registers) B[16 x 128] (shared memory, K-major), float32 accumulation; TY: "f16" or
   "bf16", the type of A and B. */
#define RABIT_WGMMA_N128(TY) \
    asm volatile( \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
        "{" \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
        "}, {%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))

template <typename T>
__device__ __forceinline__ void wgmma_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
    if (DT<T>::code == RABIT_BF16)
        RABIT_WGMMA_N128("bf16");
    else
        RABIT_WGMMA_N128("f16");
}
#endif  // RABIT_DEVICE_WGMMA

/* 384 threads = three warpgroups. Warpgroup 0 is the producer: it loads each stage (x by TMA, h and the bit words by
   cp.async) once the consumers have released it. Warpgroups 1 and 2 are the consumers: each owns 64 of
   the block's 128 weight rows, builds their Ŵ and runs the wgmmas, and neither waits for the other (no block-wide
   barrier in the loop). */
template <typename T, int K, int NB>
__global__ void __launch_bounds__(WG_THREADS, 1) prefill_wgmma_kernel(const PrefillArgs a,
                                                                      const __grid_constant__ CUtensorMap tmx,
                                                                      const __grid_constant__ CUtensorMap tmh,
                                                                      const __grid_constant__ CUtensorMap tmb) {
#ifdef RABIT_DEVICE_WGMMA
    using L = WgLayout<K, NB>;
    constexpr int WG_STAGES = L::stages;
    // per stage: full (x landed: the TMAs' bytes, and, where h and bits come by cp.async, the producer's 128
    // arrivals for them) and empty (both consumer warpgroups are done with it)
    __shared__ __align__(8) uint64_t full[WG_STAGES], empty[WG_STAGES];
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t raw_s = smem_u32(smem_raw);
    unsigned char *base = smem_raw + (((raw_s + 1023u) & ~1023u) - raw_s);  // the swizzle needs 1024-byte alignment
    const uint32_t xs_s = smem_u32(base);                                    // [S][NB * 128 tokens][128 bytes]
    const float *hsm = reinterpret_cast<const float *>(base + WG_STAGES * L::x_stage);  // [S][K][WG_BK]
    // [S][K][BM][2 x uint2]: by TMA the even k-block's stage holds row r's words of the k-block pair at 2r, 2r + 1;
    // by cp.async each stage holds its own k-block's at 2r (one layout for the consumers' reads: bit_base, set by step)
    const uint2 *bsm = reinterpret_cast<const uint2 *>(base + WG_STAGES * (L::x_stage + L::h_stage));

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
    const uint32_t full_s = smem_u32(full), empty_s = smem_u32(empty);
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < WG_STAGES; s++) {
            mbar_init(full_s + 8 * s, a.bits_tma ? 1 : 1 + 128);
            mbar_init(empty_s + 8 * s, 2);
        }
        mbar_fence_init();
    }
    __syncthreads();
    const int64_t o_base = static_cast<int64_t>(blockIdx.x) * WG_BM;
    const int64_t n_base = static_cast<int64_t>(blockIdx.y) * (NB * 128);
    const int64_t in = a.in, nw = a.nw, out = a.out;
    const int nk = static_cast<int>((in + WG_BK - 1) / WG_BK);
    // this block's share of the k-blocks: all of them, or with a.splits > 1 the blockIdx.z-th of a.splits ranges,
    // whose partial sums the cluster's rank-0 block adds up in rank order at the end
    const int kb_lo = static_cast<int>(static_cast<int64_t>(blockIdx.z) * nk / a.splits);  // splits <= nk: none empty
    const int nloc = static_cast<int>((static_cast<int64_t>(blockIdx.z) + 1) * nk / a.splits) - kb_lo;

    if (wg == 0) {  // ------------------------------------------------------------------------------ producer
        setmaxnreg_dec<WG_PRODUCER_REGS>();
        // h and the bit words by TMA where their rows allow it: thread 0 issues every copy of a stage; an even
        // k-block's stage also gets the bit words of the next k-block (a box row is 16 bytes: 4 words, 2 k-blocks).
        // Before (sixteenth session), 128 threads copied them in 8- and 16-byte pieces: alone, those copies took
        // 53.6 us at 4096 x 4096, M = 2048, more than the 32 KB a stage of x by TMA (43.9; H100; docs/kernels.md)
        if (a.bits_tma) {
            if (tid == 0) {
                for (int i = 0; i < nloc; i++) {
                    const int kb = kb_lo + i, st = i % WG_STAGES;
                    if (i >= WG_STAGES) mbar_wait(empty_s + 8 * st, (i / WG_STAGES - 1) & 1);
                    const uint32_t bar = full_s + 8 * st;
                    // pairs are even global k-blocks (kb, kb + 1), so that a box starts on a 16-byte boundary: the
                    // even one's stage takes both's bits, and so does the first k-block of a split range that
                    // starts at an odd one (it loads the pair (kb - 1, kb) and reads its second half)
                    const bool pair = (kb & 1) == 0 || i == 0;
                    // the whole boxes count, the zero-filled parts past the tensors' edges too
                    mbar_expect_tx(bar, L::x_stage + L::h_stage + (pair ? L::b_stage : 0));
                    tma_load_2d(xs_s + st * L::x_stage, &tmx, kb * WG_BK, static_cast<int>(n_base), bar);
                    tma_load_2d(smem_u32(hsm + st * K * WG_BK), &tmh, kb * WG_BK, 0, bar);
                    if (pair)
#pragma unroll
                        for (int k = 0; k < K; k++)
                            tma_load_2d(smem_u32(bsm + (st * K + k) * 2 * WG_BM), &tmb, 2 * (kb & ~1),
                                        static_cast<int>(k * out + o_base), bar);
                }
            }
        } else {
        // all 128 threads copy (one warp alone was slower than the consumers: measured): thread r takes row r's bit
        // words of every path, the first K x 16 threads one 16-byte piece of h each, thread 0 the TMA of x
        const int r = tid;
        const int64_t o = o_base + r;
        for (int i = 0; i < nloc; i++) {
            const int kb = kb_lo + i, st = i % WG_STAGES;
            if (i >= WG_STAGES) mbar_wait(empty_s + 8 * st, (i / WG_STAGES - 1) & 1);
            const int64_t col0 = static_cast<int64_t>(kb) * WG_BK;
            const uint32_t bar = full_s + 8 * st;
            if (r == 0) {  // the whole box counts, the zero-filled part past the tensor's edges too
                mbar_expect_tx(bar, L::x_stage);
                tma_load_2d(xs_s + st * L::x_stage, &tmx, static_cast<int>(col0), static_cast<int>(n_base), bar);
            }
            if (r < K * 16) {  // h (zero past `in`)
                const int k = r >> 4, q = r & 15;
                const int64_t col = col0 + q * 4;
                const bool ok = col < in;
                cp_async16_s(smem_u32(hsm + (st * K + k) * WG_BK + q * 4),
                             ok ? static_cast<const void *>(a.h + k * in + col) : a.h, ok ? 16 : 0);
            }
            // bit words 2 kb, 2 kb + 1 of row r, every path (zero past the last row or word); not unrolled: the
            // producer lives on WG_PRODUCER_REGS registers
            const int64_t w0 = 2 * static_cast<int64_t>(kb);
#pragma unroll 1
            for (int k = 0; k < K; k++) {
                const rabit_word_t *src = a.packed + (k * out + o) * nw + w0;
                const uint32_t dst = smem_u32(bsm + (st * K + k) * 2 * WG_BM + 2 * r);
                if (a.nw_even) {  // the pair is 8-byte aligned, and both words exist
                    cp_async8_s(dst, o < out ? static_cast<const void *>(src) : a.packed, o < out ? 8 : 0);
                } else {
                    const bool ok0 = o < out, ok1 = o < out && w0 + 1 < nw;
                    cp_async4_s(dst, ok0 ? static_cast<const void *>(src) : a.packed, ok0 ? 4 : 0);
                    cp_async4_s(dst + 4, ok1 ? static_cast<const void *>(src + 1) : a.packed, ok1 ? 4 : 0);
                }
            }
            cp_async_arrive_noinc(bar);  // arrives when this thread's copies have landed
        }
        }
        if (a.splits > 1) {  // the consumers' two cluster barriers (below)
            cluster_sync();
            cluster_sync();
        }
    } else {  // --------------------------------------------------------------------------------------------- consumers
    setmaxnreg_inc<WG_CONSUMER_REGS>();
    const int gq = lane >> 2, t = lane & 3;
    const int rloc = (wg - 1) * 64 + (warp & 3) * 16 + gq;  // this thread's first row in the block (the second: + 8)
    int64_t row[2];
    row[0] = o_base + rloc;
    row[1] = row[0] + 8;
    uint32_t gbits[2][K];  // g_k[row] (0 past the last row, so those rows of What are 0)
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int k = 0; k < K; k++) gbits[i][k] = row[i] < out ? __float_as_uint(__ldg(a.g + k * out + row[i])) : 0u;

    // where build() finds the bit words of the k-block being built (set by step): row r of path k at
    // bsm[bit_base + k * 2 * WG_BM + 2 r]
    int bit_base = 0;
    // What of k-block kb in the m64n128k16 A fragment: for k16 step j, columns 16j + 2t + {0, 1, 8, 9}
    auto build = [&](int st, uint32_t (&A)[4][4]) {
        const float *hk = hsm + st * K * WG_BK + 2 * t;
        uint32_t bw[2][K][2];  // this thread's rows' bit words, inverted: a set bit now means -1
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int k = 0; k < K; k++) {
                const uint2 b = bsm[bit_base + k * 2 * WG_BM + 2 * (rloc + 8 * i)];
                bw[i][k][0] = ~b.x;
                bw[i][k][1] = ~b.y;
            }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float v[2][4];
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int e = 0; e < 4; e++) v[i][e] = 0.0f;
#pragma unroll
            for (int k = 0; k < K; k++) {
                const float2 h01 = *reinterpret_cast<const float2 *>(hk + k * WG_BK + 16 * j);
                const float2 h89 = *reinterpret_cast<const float2 *>(hk + k * WG_BK + 16 * j + 8);
                const float hv[4] = {h01.x, h01.y, h89.x, h89.y};
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const uint32_t w = bw[i][k][j >> 1] >> (16 * (j & 1) + 2 * t);
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int pos = (e & 1) + 8 * (e >> 1);
                        // +-g_k by the (inverted) sign bit, times h_k, added in path order, as prefill_kernel
                        const float sg = __uint_as_float(gbits[i][k] ^ ((w << (31 - pos)) & 0x80000000u));
                        const float p = __fmul_rn(sg, hv[e]);
                        v[i][e] = k == 0 ? p : __fadd_rn(v[i][e], p);
                    }
                }
            }
            A[j][0] = pack2<T>(v[0][0], v[0][1]);
            A[j][1] = pack2<T>(v[1][0], v[1][1]);
            A[j][2] = pack2<T>(v[0][2], v[0][3]);
            A[j][3] = pack2<T>(v[1][2], v[1][3]);
        }
    };

    float acc[NB][64];
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
        for (int e = 0; e < 64; e++) acc[nb][e] = 0.0f;
    uint32_t A0[4][4], A1[4][4];  // What of two k-blocks: one being built while the tensor cores read the other

    auto step = [&](int i, uint32_t (&A)[4][4]) {  // the block's i-th k-block
        const int st = i % WG_STAGES;
        mbar_wait(full_s + 8 * st, (i / WG_STAGES) & 1);  // x, h and the bits of the k-block have landed
        // by TMA, an odd k-block's bits came with the previous (even) one's, which are complete and still held: that
        // stage is released only after this build (the arrival below, one step on); the first k-block of a range
        // that starts at an odd one has its pair's box in its own stage
        const int kb = kb_lo + i, lead = (kb & 1) && i > 0 ? i - 1 : i;
        bit_base = a.bits_tma ? (lead % WG_STAGES) * K * 2 * WG_BM + (kb & 1) : st * K * 2 * WG_BM;
        build(st, A);
#pragma unroll
        for (int nb = 0; nb < NB; nb++) keep(acc[nb]);
        // every operand register is ready before the fence: an instruction that defines one between the wgmmas
        // would make ptxas serialize them (C7513)
        const uint32_t xb = xs_s + st * L::x_stage;
        uint64_t desc[4][NB];
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int nb = 0; nb < NB; nb++) desc[j][nb] = desc_sw128(xb + nb * 128 * 128 + j * 32);
        pin(A, desc);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int nb = 0; nb < NB; nb++) wgmma_n128<T>(acc[nb], A[j], desc[j][nb]);
        wgmma_commit();
#pragma unroll
        for (int nb = 0; nb < NB; nb++) keep(acc[nb]);
        wgmma_wait<1>();  // k-block i - 1 is done: its A registers may be rebuilt, its stage released
#pragma unroll
        for (int nb = 0; nb < NB; nb++) keep(acc[nb]);
        if (i > 0 && (tid & 127) == 0) mbar_arrive(empty_s + 8 * ((i - 1) % WG_STAGES));
    };
    // two k-blocks per trip and no branch inside: a conditional wgmma would make the compiler copy accumulators
    // between wgmmas (ptxas C7513: serialized wgmmas)
    int i = 0;
    for (; i + 1 < nloc; i += 2) {
        step(i, A0);
        step(i + 1, A1);
    }
    if (i < nloc) step(i, A0);
    wgmma_wait<0>();
#pragma unroll
    for (int nb = 0; nb < NB; nb++) keep(acc[nb]);

    if (a.splits > 1) {
        // the other ranks leave their partial sums in their shared memory (over the x stages, all consumed now),
        // rank 0 adds them in rank order: the same result on every run
        float *red = reinterpret_cast<float *>(base);  // [NB * 64][256 consumer threads]
        const int ct = tid - 128;
        const uint32_t rank = cluster_rank();
        // both consumer warpgroups are past their last wgmma before either overwrites the stages
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
        if (rank != 0) {
#pragma unroll
            for (int nb = 0; nb < NB; nb++)
#pragma unroll
                for (int e = 0; e < 64; e++) red[(nb * 64 + e) * 256 + ct] = acc[nb][e];
        }
        cluster_sync();
        if (rank == 0) {
            for (int r = 1; r < a.splits; r++) {
                const uint32_t rb = cluster_map(smem_u32(red + ct), r);
#pragma unroll
                for (int nb = 0; nb < NB; nb++)
#pragma unroll
                    for (int e = 0; e < 64; e++)
                        acc[nb][e] = __fadd_rn(acc[nb][e], ld_cluster_f32(rb + (nb * 64 + e) * 256 * 4));
            }
        }
        cluster_sync();  // the other ranks' shared memory outlives rank 0's reads
        if (rank != 0) return;
    }

    // epilogue: acc[nb][4c + 2i + e] is (row[i], token n_base + 128 nb + 8c + 2t + e); + bias, round to T
    T *y = static_cast<T *>(a.y);
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int64_t o = row[i];
        if (o >= out) continue;
        const float b = a.bias ? __ldg(a.bias + o) : 0.0f;
#pragma unroll
        for (int nb = 0; nb < NB; nb++)
#pragma unroll
            for (int c = 0; c < 16; c++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int64_t n = n_base + nb * 128 + c * 8 + 2 * t + e;
                    if (n < a.M) st_any(y, DT<T>::code, n * out + o, acc[nb][4 * c + 2 * i + e] + b);
                }
    }
    }  // consumers
#else
    __trap();  // launched only where the sm_90a build runs (prefill_plan)
#endif
}

template <typename T, int K>
cudaError_t launch_prefill_t(const PrefillArgs &a, cudaStream_t s) {
    static bool attr_set[64] = {};  // per instantiation and device
    const cudaError_t e = set_smem_limit_once(prefill_kernel<T, K>, PF_SMEM, attr_set);
    if (e != cudaSuccess) return e;
    const dim3 grid(static_cast<unsigned>((a.out + PF_BN - 1) / PF_BN), static_cast<unsigned>((a.M + PF_BM - 1) / PF_BM));
    prefill_kernel<T, K><<<grid, 256, PF_SMEM, s>>>(a);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_prefill_k(const PrefillArgs &a, int K, cudaStream_t s) {
    return with_paths(K, [&](auto k) { return launch_prefill_t<T, decltype(k)::value>(a, s); });
}

template <typename T, int K, int NB>
cudaError_t launch_wgmma_t(const PrefillArgs &a, const CUtensorMap *maps, cudaStream_t s) {
    static bool attr_set[64] = {};  // per instantiation and device
    constexpr int smem = WgLayout<K, NB>::smem;
    const cudaError_t e = set_smem_limit_once(prefill_wgmma_kernel<T, K, NB>, smem, attr_set);
    if (e != cudaSuccess) return e;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>((a.out + WG_BM - 1) / WG_BM),
                       static_cast<unsigned>((a.M + NB * 128 - 1) / (NB * 128)), static_cast<unsigned>(a.splits));
    cfg.blockDim = dim3(WG_THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = static_cast<unsigned>(a.splits);
    cfg.attrs = attr;
    cfg.numAttrs = a.splits > 1 ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, prefill_wgmma_kernel<T, K, NB>, a, maps[0], maps[1], maps[2]);
}

template <typename T, int NB>
cudaError_t launch_wgmma_k(const PrefillArgs &a, const CUtensorMap *maps, int K, cudaStream_t s) {
    return with_paths(K, [&](auto k) { return launch_wgmma_t<T, decltype(k)::value, NB>(a, maps, s); });
}

/* The driver's tensor-map encoder, through the runtime (null where the driver lacks it). */
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void *p = nullptr;
        cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
        const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
#else
        const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q);
#endif
        return e == cudaSuccess && q == cudaDriverEntryPointSuccess ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p)
                                                                    : nullptr;
    }();
    return fn;
}

/* A row-major 2-D tensor [rows][cols] of `elem_bytes`-byte elements at `base` (rows `cols` elements apart) as boxes
   of box_cols x box_rows; outside the tensor, zeros. False where the driver has no encoder or refuses the layout. */
bool encode_2d(CUtensorMap *map, CUtensorMapDataType dtype, int elem_bytes, const void *base, uint64_t cols,
               uint64_t rows, uint32_t box_cols, uint32_t box_rows, CUtensorMapSwizzle swizzle,
               CUtensorMapL2promotion promotion) {
    const PFN_cuTensorMapEncodeTiled_v12000 enc = tensor_map_encoder();
    if (!enc) return false;
    const cuuint64_t dims[2] = {cols, rows};
    const cuuint64_t strides[1] = {cols * elem_bytes};  // bytes between rows
    const cuuint32_t box[2] = {box_cols, box_rows};
    const cuuint32_t elem[2] = {1, 1};
    return enc(map, dtype, 2, const_cast<void *>(base), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
               swizzle, promotion, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* x [M][in] as tiles of 64 columns x `rows` tokens in the 128-byte swizzle wgmma reads. */
bool encode_x_map(CUtensorMap *map, const PrefillArgs &a, rabit_dtype xdt, int rows) {
    return encode_2d(map, xdt == RABIT_F16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                     a.x, a.in, a.M, WG_BK, rows, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
}

/* h [K][in] float32 as boxes of 64 columns x K paths (no swizzle). */
bool encode_h_map(CUtensorMap *map, const PrefillArgs &a, int K) {
    return encode_2d(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, a.h, a.in, K, WG_BK, K, CU_TENSOR_MAP_SWIZZLE_NONE,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_128B);
}

/* The bit words [K * out][nw] as boxes of 4 words (two k-blocks) x 128 rows. A box of the last row block of path
   k < K - 1 reaches into path k + 1's first rows: those rows are past `out`, and their g is 0 in the consumers
   (What 0), so their bits do not count. Needs rows of a multiple of 16 bytes (nw % 4 == 0). */
bool encode_bits_map(CUtensorMap *map, const PrefillArgs &a, int K) {
    if (a.nw % 4 != 0 || reinterpret_cast<uintptr_t>(a.packed) % 16 != 0) return false;
    return encode_2d(map, CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, a.packed, a.nw, static_cast<uint64_t>(K) * a.out, 4,
                     WG_BM, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_128B);
}

/* An environment setting as an integer in [lo, hi]; `bad` when set to anything else, `unset` when unset or empty. */
int env_int(const char *name, int lo, int hi, int unset, int bad) {
    const char *v = getenv(name);
    if (!v || !*v) return unset;
    char *end = nullptr;
    const long n = strtol(v, &end, 10);
    return *end == '\0' && n >= lo && n <= hi ? static_cast<int>(n) : bad;
}

}  // namespace

/* The wgmma kernel needs the sm_90a build (setup.py defines RABIT_SM90A when TORCH_CUDA_ARCH_LIST has 9.0a), a
   compute-capability 9.0 device and 16-byte-aligned rows of x and h (TMA, 16-byte copies).
   Its k-split: with few output tiles (M = 128 at 4096 rows: 32 tiles on 132 SMs) idle SMs take shares of k, at most
   4, at least 4 k-blocks each, all blocks within 3/4 of the SMs: a cluster must fit in one GPC, and 32 clusters of 4
   did not fit at once on an H100 (4096 x 4096, M = 128: 42.9 us with 4, 26.8 with 3, 32.1 with 2, 50.9 with 1,
   59.7 with 8; 2026-11-26). RABIT_CUDA_PREFILL=mma|wgmma and RABIT_CUDA_PREFILL_SPLITS=1..8 force them. */
PrefillPlan prefill_plan(int64_t M, int64_t out, int64_t in, bool x_aligned, bool h_aligned) {
    PrefillPlan p = {PREFILL_MMA, 1, nullptr};
    const char *v = getenv("RABIT_CUDA_PREFILL");
    const bool force_mma = v && strcmp(v, "mma") == 0, force_wgmma = v && strcmp(v, "wgmma") == 0;
    if (v && *v && !force_mma && !force_wgmma) {
        p.error = "RABIT_CUDA_PREFILL must be mma or wgmma (or unset, to let rabit choose)";
        return p;
    }
    bool runs = false;
#ifdef RABIT_SM90A
    const DevInfo &d = device_info();
    runs = d.major == 9 && d.minor == 0 && in % 8 == 0 && x_aligned && h_aligned;
#else
    (void)x_aligned;
    (void)h_aligned;
#endif
    if (force_wgmma && !runs) {
        p.error = "RABIT_CUDA_PREFILL=wgmma forces the wgmma prefill kernel, which cannot run here: it needs an sm_90a "
                  "build (TORCH_CUDA_ARCH_LIST with 9.0a), a compute-capability 9.0 GPU and x and h rows 16-byte "
                  "aligned (in_features % 8 == 0). Unset RABIT_CUDA_PREFILL or set it to mma.";
        return p;
    }
    if (!runs || force_mma) return p;
    p.kernel = PREFILL_WGMMA;
    const int64_t nk = (in + WG_BK - 1) / WG_BK, nb = M > 128 ? 2 : 1;
    const int forced = env_int("RABIT_CUDA_PREFILL_SPLITS", 1, 8, 0, -1);
    if (forced < 0) {
        p.error = "RABIT_CUDA_PREFILL_SPLITS must be an integer from 1 to 8 (the blocks that split the wgmma prefill "
                  "kernel's columns); unset it to let rabit choose.";
        return p;
    }
    const int64_t tiles = ((out + WG_BM - 1) / WG_BM) * ((M + nb * 128 - 1) / (nb * 128));
    const int64_t s = forced ? forced : min64(min64(3 * device_info().sms / (4 * max64(tiles, 1)), 4), max64(nk / 4, 1));
    p.splits = static_cast<int>(max64(min64(s, nk), 1));
    return p;
}

cudaError_t packed_prefill(const void *x, rabit_dtype xdt, int64_t M, const rabit_word_t *packed, const float *g,
                           const float *h, const float *bias, int K, int64_t out, int64_t in, void *y,
                           cudaStream_t s) {
    if (xdt != RABIT_F16 && xdt != RABIT_BF16) return cudaErrorInvalidValue;
    const PrefillPlan plan = prefill_plan(M, out, in, reinterpret_cast<uintptr_t>(x) % 16 == 0,
                                          reinterpret_cast<uintptr_t>(h) % 16 == 0);
    if (plan.error) return cudaErrorInvalidValue;  // the glue reports plan.error before it calls this
    PrefillArgs a;
    a.x = x; a.M = M; a.packed = packed; a.g = g; a.h = h; a.bias = bias;
    a.y = y; a.out = out; a.in = in; a.nw = RABIT_WORDS(in);
    a.xvec = (in % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0);
    a.nw_even = a.nw % 2 == 0 && reinterpret_cast<uintptr_t>(packed) % 8 == 0;
    a.splits = plan.splits;
    // 256 tokens per block once there are that many; below, 128 (half the idle rows)
    const int nb = M > 128 ? 2 : 1;
    CUtensorMap maps[3] = {};  // x, h, bits
    // (a driver without the tensor-map encoder gets the mma.sync kernel: the same values, slower); h and the bits by
    // TMA where their maps can be made (rows of the bits a multiple of 16 bytes), else by cp.async: the same values.
    // With the k-split too, since bit boxes start at even global k-blocks (16-byte aligned; a split range starting at
    // an odd k-block had its boxes 8 bytes off, the illegal instruction of the sixteenth session).
    const bool wgmma = plan.kernel == PREFILL_WGMMA && encode_x_map(&maps[0], a, xdt, nb * 128);
    a.bits_tma = wgmma && encode_h_map(&maps[1], a, K) && encode_bits_map(&maps[2], a, K);
    if (wgmma) {
        if (nb == 2)
            return xdt == RABIT_F16 ? launch_wgmma_k<__half, 2>(a, maps, K, s) : launch_wgmma_k<__nv_bfloat16, 2>(a, maps, K, s);
        return xdt == RABIT_F16 ? launch_wgmma_k<__half, 1>(a, maps, K, s) : launch_wgmma_k<__nv_bfloat16, 1>(a, maps, K, s);
    }
    return xdt == RABIT_F16 ? launch_prefill_k<__half>(a, K, s) : launch_prefill_k<__nv_bfloat16>(a, K, s);
}

}  // namespace rabit_cuda
