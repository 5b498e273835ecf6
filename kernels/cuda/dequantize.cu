/*
 * Ŵ = Σ_k g_k ⊙ B_k ⊙ h_k from the packed planes, with residual_binarize's arithmetic (binarize.cu): per path
 * v = (±g_k) · h_k rounded once (__fmul_rn), summed in path order (__fadd_rn). For the planes a forward wrote, this
 * is its Ŵ bit for bit: rabit.qat_linear's backward rebuilds Ŵ from the 1-bit-per-weight planes it kept instead
 * of keeping Ŵ, reading K bits per weight where a second forward would read the 32-bit latent.
 */
#include <cuda_runtime.h>

#include "common.cuh"
#include "rabit_cuda.cuh"

namespace rabit_cuda {

namespace {

/* out[0..7] in dtype OT at p (vec: 16-byte aligned, all 8 valid) */
template <typename OT>
__device__ __forceinline__ void store8(OT *p, const float (&v)[8], int n, bool vec);
template <>
__device__ __forceinline__ void store8<float>(float *p, const float (&v)[8], int n, bool vec) {
    if (vec) {
        reinterpret_cast<float4 *>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4 *>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        for (int i = 0; i < n; i++) p[i] = v[i];
    }
}
template <typename OT>
__device__ __forceinline__ void store8(OT *p, const float (&v)[8], int n, bool vec) {
    constexpr int dt = DT<OT>::code;
    uint32_t u[8];
#pragma unroll
    for (int i = 0; i < 8; i++) u[i] = f32_to_16(v[i], dt);
    if (vec) {
        *reinterpret_cast<uint4 *>(p) = make_uint4(u[0] | (u[1] << 16), u[2] | (u[3] << 16), u[4] | (u[5] << 16),
                                                   u[6] | (u[7] << 16));
    } else {
        for (int i = 0; i < n; i++) reinterpret_cast<unsigned short *>(p)[i] = static_cast<unsigned short>(u[i]);
    }
}

/* One thread: 8 consecutive columns (one byte of each plane's word) of kRows consecutive rows, h of its columns
   loaded once into registers (per row, h would be K x 32 bytes of loads for 16 bytes of Ŵ: the kernel's main cost);
   a block: 128 x 8 = 1024 columns (grid.x: row groups, so any `out` fits; grid.y: column blocks). */
template <int K>
constexpr int rows_per_block() { return K <= 2 ? 8 : 4; }  // K = 3, 4: 4 rows keep the preloads within registers

template <int K, typename OT>
__global__ void __launch_bounds__(128) dequantize_kernel(const rabit_word_t *__restrict__ packed,
                                                         const float *__restrict__ g, const float *__restrict__ h,
                                                         int64_t out, int64_t in, OT *__restrict__ what, bool vec) {
    const int64_t j0 = (static_cast<int64_t>(blockIdx.y) * 128 + threadIdx.x) * 8;
    if (j0 >= in) return;
    const int n = static_cast<int>(min64(8, in - j0));
    const int64_t nw = RABIT_WORDS(in);
    const int64_t w = j0 >> 5;
    const int sh = static_cast<int>(j0 & 31);
    float hv[K][8];
#pragma unroll
    for (int k = 0; k < K; k++) {
        const float *hk = h + k * in + j0;
        if (vec) {
            const float4 a = __ldg(reinterpret_cast<const float4 *>(hk));
            const float4 b = __ldg(reinterpret_cast<const float4 *>(hk) + 1);
            hv[k][0] = a.x, hv[k][1] = a.y, hv[k][2] = a.z, hv[k][3] = a.w;
            hv[k][4] = b.x, hv[k][5] = b.y, hv[k][6] = b.z, hv[k][7] = b.w;
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) hv[k][i] = i < n ? __ldg(hk + i) : 0.0f;
        }
    }
    constexpr int kRows = rows_per_block<K>();
    const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kRows;
    const int rows = static_cast<int>(min64(kRows, out - o0));
    // every row's words and g first, so their loads are in flight together rather than one row at a time
    uint32_t bits[kRows][K];
    float gk[kRows][K];
#pragma unroll
    for (int r = 0; r < kRows; r++)
#pragma unroll
        for (int k = 0; k < K; k++) {
            bits[r][k] = r < rows ? __ldg(packed + (k * out + o0 + r) * nw + w) >> sh : 0u;
            gk[r][k] = r < rows ? __ldg(g + k * out + o0 + r) : 0.0f;
        }
#pragma unroll
    for (int r = 0; r < kRows; r++) {
        if (r >= rows) break;
        const int64_t o = o0 + r;
        float acc[8];
#pragma unroll
        for (int k = 0; k < K; k++) {
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float v = __fmul_rn(((bits[r][k] >> i) & 1u) ? gk[r][k] : -gk[r][k], hv[k][i]);
                acc[i] = k ? __fadd_rn(acc[i], v) : v;
            }
        }
        store8<OT>(what + o * in + j0, acc, n, vec);
    }
}

}  // namespace

cudaError_t dequantize(const rabit_word_t *packed, const float *g, const float *h, int K, int64_t out, int64_t in,
                       void *what, rabit_dtype dt, cudaStream_t s) {
    if (out == 0 || in == 0) return cudaSuccess;
    if ((in + 1023) / 1024 > 65535) return cudaErrorInvalidValue;
    // 16-byte accesses need every row of h and Ŵ to start 16-byte aligned: in % 8 == 0 (h is float32, Ŵ at least
    // 2 bytes an element) and aligned base pointers
    const bool vec = in % 8 == 0 && aligned16(h) && aligned16(what);
    return with_paths(K, [&](auto kc) {
        constexpr int KK = decltype(kc)::value;
        const int64_t groups = (out + rows_per_block<KK>() - 1) / rows_per_block<KK>();
        if (groups > 0x7fffffff) return cudaErrorInvalidValue;
        const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>((in + 1023) / 1024));
        if (dt == RABIT_F32)
            dequantize_kernel<KK, float><<<grid, 128, 0, s>>>(packed, g, h, out, in, static_cast<float *>(what), vec);
        else if (dt == RABIT_F16)
            dequantize_kernel<KK, __half><<<grid, 128, 0, s>>>(packed, g, h, out, in, static_cast<__half *>(what), vec);
        else
            dequantize_kernel<KK, __nv_bfloat16>
                <<<grid, 128, 0, s>>>(packed, g, h, out, in, static_cast<__nv_bfloat16 *>(what), vec);
        return cudaGetLastError();
    });
}

}  // namespace rabit_cuda
