/*
 * Coupled residual binarization on the GPU: forward (signs + Ŵ in one kernel), the one-pass backward,
 * and the pack/unpack kernels. The float arithmetic follows rabit/reference.py operation by operation
 * with explicit round-to-nearest intrinsics (__fmul_rn / __fsub_rn / __fadd_rn, never contracted into an
 * FMA; the build also passes --fmad=false), so signs and Ŵ are bit-exact with the CPU kernels.
 */
#include <cuda_runtime.h>

#include "common.cuh"
#include "rabit_cuda.cuh"

namespace rabit_cuda {

namespace {

constexpr unsigned FULL = 0xffffffffu;

/* ------------------------------------------------------------------------------------------------
 * forward: one warp per (row, segment of 32 words = 1024 columns); 4 warps of a block take 4 rows of
 * the same segment so that h is shared through L1; h of a group of chunks is loaded before the chain. Lane l handles columns 32c + l (c = 0..31); the
 * ballot over the warp is the packed word of chunk c, kept by lane c and written coalesced at the end.
 * ---------------------------------------------------------------------------------------------- */
template <int K, typename WT>
__global__ void __launch_bounds__(128) rb_forward_kernel(const WT *__restrict__ W, const float *__restrict__ g,
                                                         const float *__restrict__ h, int64_t out, int64_t in,
                                                         void *__restrict__ what, int odt,
                                                         rabit_word_t *__restrict__ packed, int *__restrict__ flag) {
    const int lane = threadIdx.x & 31;
    const int64_t o = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
    if (o >= out) return;  // the whole warp leaves together
    const int64_t nw = RABIT_WORDS(in);
    const int64_t w0 = static_cast<int64_t>(blockIdx.y) * 32;
    const int nch = static_cast<int>(min64(32, nw - w0));
    const int64_t j0 = w0 * 32;
    int bad = 0;
    float gk[K];
#pragma unroll
    for (int k = 0; k < K; k++) {
        gk[k] = __ldg(g + k * out + o);
        if (!is_finite_f(gk[k])) bad |= FLAG_G_NONFINITE;
    }
    const WT *wr = W + o * in;
    float r[32];
#pragma unroll
    for (int c = 0; c < 32; c++) {
        const int64_t j = j0 + c * 32 + lane;
        r[c] = (c < nch && j < in) ? DT<WT>::to_f(__ldcs(wr + j)) : 0.0f;
    }
    uint32_t word[K];
#pragma unroll
    for (int k = 0; k < K; k++) word[k] = 0;
    // h for a group of chunks is loaded before the group's chain runs, so its latency is paid once per group
    constexpr int HG = K <= 2 ? 32 : 8;
#pragma unroll
    for (int c0 = 0; c0 < 32; c0 += HG) {
        if (c0 >= nch) break;  // uniform over the warp
        float hv[K][HG];
#pragma unroll
        for (int cc = 0; cc < HG; cc++) {
            const int64_t j = j0 + (c0 + cc) * 32 + lane;
            const bool valid = c0 + cc < nch && j < in;
#pragma unroll
            for (int k = 0; k < K; k++) hv[k][cc] = valid ? __ldg(h + k * in + j) : 0.0f;
        }
#pragma unroll
        for (int cc = 0; cc < HG; cc++) {
            const int c = c0 + cc;
            if (c >= nch) break;  // uniform over the warp
            const int64_t j = j0 + c * 32 + lane;
            const bool valid = j < in;
            float rv = r[c];
            if (valid && !is_finite_f(rv)) bad |= FLAG_W_NONFINITE;
            float acc = 0.0f;
#pragma unroll
            for (int k = 0; k < K; k++) {
                const float hk = hv[k][cc];
                if (valid && !is_finite_f(hk)) bad |= FLAG_H_NONFINITE;
                const bool b = rv >= 0.0f;  // sign(0) = +1
                const uint32_t bal = __ballot_sync(FULL, valid && b);  // padding bits stay clear
                if (lane == c) word[k] = bal;
                const float v = __fmul_rn(b ? gk[k] : -gk[k], hk);
                rv = __fsub_rn(rv, v);
                acc = k ? __fadd_rn(acc, v) : v;
            }
            if (valid && what) st_any(what, odt, o * in + j, acc);
        }
    }
    if (packed && lane < nch) {
#pragma unroll
        for (int k = 0; k < K; k++) packed[(k * out + o) * nw + w0 + lane] = word[k];
    }
    bad = __reduce_or_sync(FULL, bad);
    if (bad && lane == 0 && flag) atomicOr(flag, bad);
}

template <int K>
cudaError_t launch_forward(const void *W, rabit_dtype wdt, const float *g, const float *h, int64_t out, int64_t in,
                           void *what, rabit_dtype odt, rabit_word_t *packed, int *flag, cudaStream_t s) {
    const dim3 grid(static_cast<unsigned>((out + 3) / 4), static_cast<unsigned>((RABIT_WORDS(in) + 31) / 32));
    if (wdt == RABIT_F32)
        rb_forward_kernel<K, float><<<grid, 128, 0, s>>>(static_cast<const float *>(W), g, h, out, in, what, odt,
                                                          packed, flag);
    else if (wdt == RABIT_F16)
        rb_forward_kernel<K, __half><<<grid, 128, 0, s>>>(static_cast<const __half *>(W), g, h, out, in, what, odt,
                                                           packed, flag);
    else
        rb_forward_kernel<K, __nv_bfloat16><<<grid, 128, 0, s>>>(static_cast<const __nv_bfloat16 *>(W), g, h, out,
                                                                  in, what, odt, packed, flag);
    return cudaGetLastError();
}

/* ------------------------------------------------------------------------------------------------
 * backward: block tile = kBwdRows rows x kBwdCols columns, 8 warps x 16 rows; lane l owns the 8
 * consecutive columns 8l..8l+7 of the tile (16-byte loads when rows are 16-byte aligned). Per row the
 * lane forms its share of dg in float64 and the warp reduces it with a fixed butterfly; dh accumulates
 * in float64 registers over the warp's rows, then over the 8 warps in shared memory in warp order.
 * Partials go to a float64 workspace and a second kernel sums them in a fixed order: the result does not
 * depend on scheduling. G is read once, dW written once; signs come from the packed planes.
 * ---------------------------------------------------------------------------------------------- */
__device__ __forceinline__ float ste_factor(float w, int ste, float c) {
    if (ste == RABIT_STE_CLIPPED) return fabsf(w) <= c ? 1.0f : 0.0f;
    const float t = tanhf(__fdiv_rn(w, c));
    return __fsub_rn(1.0f, __fmul_rn(t, t));
}

template <int K, typename GT>
__global__ void __launch_bounds__(256) rb_backward_kernel(const GT *__restrict__ G, const void *__restrict__ W,
                                                          int wdt, const float *__restrict__ g,
                                                          const float *__restrict__ h,
                                                          const rabit_word_t *__restrict__ packed, int64_t out,
                                                          int64_t in, int ste, float c, void *__restrict__ dW,
                                                          double *__restrict__ pdg, double *__restrict__ pdh,
                                                          int vec) {
    __shared__ double red[8][kBwdCols];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t nw = RABIT_WORDS(in);
    const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBwdCols + lane * 8;
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBwdRows + warp * 16;
    const int nvalid = static_cast<int>(max64(0, min64(8, in - col0)));
    const int64_t wi = col0 >> 5;
    const int sh = (lane & 3) * 8;
    double hd[K][8], dh[K][8];
#pragma unroll
    for (int k = 0; k < K; k++)
#pragma unroll
        for (int i = 0; i < 8; i++) {
            hd[k][i] = i < nvalid ? static_cast<double>(__ldg(h + k * in + col0 + i)) : 0.0;
            dh[k][i] = 0.0;
        }
    const bool full = vec && nvalid == 8;
    // one row ahead in flight: raw G words (16-bit dtypes: one uint4; float32: two) and the sign words
    uint4 ra0 = make_uint4(0, 0, 0, 0), ra1 = ra0, rb0 = ra0, rb1 = ra0;
    uint32_t ba[K], bb[K];
    auto load_row = [&](int64_t o, uint4 &q0, uint4 &q1, uint32_t (&bw)[K]) {
        if (full) {
            const uint4 *p = reinterpret_cast<const uint4 *>(G + o * in + col0);
            q0 = __ldcs(p);
            if (sizeof(GT) == 4) q1 = __ldcs(p + 1);
        } else {
            float v[8];
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = i < nvalid ? DT<GT>::to_f(G[o * in + col0 + i]) : 0.0f;
            q0 = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
            q1 = make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]), __float_as_uint(v[7]));
        }
#pragma unroll
        for (int k = 0; k < K; k++) bw[k] = nvalid > 0 ? __ldg(packed + (k * out + o) * nw + wi) : 0u;
    };
    if (row0 < out) load_row(row0, ra0, ra1, ba);
    for (int r = 0; r < 16; r++) {
        const int64_t o = row0 + r;
        if (o >= out) break;  // uniform over the warp
        if (r + 1 < 16 && o + 1 < out) load_row(o + 1, rb0, rb1, bb);
        float gv[8];
        {
            const uint32_t w[8] = {ra0.x, ra0.y, ra0.z, ra0.w, ra1.x, ra1.y, ra1.z, ra1.w};
            if (!full || sizeof(GT) == 4) {
#pragma unroll
                for (int i = 0; i < 8; i++) gv[i] = __uint_as_float(w[i]);
            } else {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    if (DT<GT>::code == RABIT_BF16) {
                        gv[2 * i] = __uint_as_float(w[i] << 16);
                        gv[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
                    } else {
                        gv[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
                        gv[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
                    }
                }
            }
        }
        uint32_t bits[K];
#pragma unroll
        for (int k = 0; k < K; k++) bits[k] = ba[k] >> sh;
        ra0 = rb0;
        ra1 = rb1;
#pragma unroll
        for (int k = 0; k < K; k++) ba[k] = bb[k];
        double pg[K], gko[K];
#pragma unroll
        for (int k = 0; k < K; k++) {
            pg[k] = 0.0;
            gko[k] = static_cast<double>(__ldg(g + k * out + o));
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const double gd = static_cast<double>(gv[i]);
#pragma unroll
            for (int k = 0; k < K; k++) {
                const double s = ((bits[k] >> i) & 1u) ? gd : -gd;
                pg[k] = __fma_rn(s, hd[k][i], pg[k]);
                dh[k][i] = __fma_rn(s, gko[k], dh[k][i]);
            }
        }
#pragma unroll
        for (int k = 0; k < K; k++) {
            const double tot = warp_sum(pg[k]);
            if (lane == 0) pdg[(static_cast<int64_t>(blockIdx.y) * K + k) * out + o] = tot;
        }
        if (ste != RABIT_STE_IDENTITY) {
            float wv[8];
            if (full) {
                if (wdt == RABIT_F32) load8(static_cast<const float *>(W) + o * in + col0, wv);
                else if (wdt == RABIT_F16) load8(static_cast<const __half *>(W) + o * in + col0, wv);
                else load8(static_cast<const __nv_bfloat16 *>(W) + o * in + col0, wv);
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++) wv[i] = i < nvalid ? ld_any(W, wdt, o * in + col0 + i) : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < 8; i++) gv[i] = __fmul_rn(gv[i], ste_factor(wv[i], ste, c));
        }
        if (full) {
            char *base = static_cast<char *>(dW) + (o * in + col0) * (wdt == RABIT_F32 ? 4 : 2);
            store8(base, wdt, gv);
        } else {
            for (int i = 0; i < nvalid; i++) st_any(dW, wdt, o * in + col0 + i, gv[i]);
        }
    }
    // dh: sum the 8 warps' partials in warp order
    for (int k = 0; k < K; k++) {
#pragma unroll
        for (int i = 0; i < 8; i++) red[warp][lane * 8 + i] = dh[k][i];
        __syncthreads();
        const int64_t col = static_cast<int64_t>(blockIdx.y) * kBwdCols + threadIdx.x;
        double s = 0.0;
#pragma unroll
        for (int w = 0; w < 8; w++) s += red[w][threadIdx.x];
        if (col < in) pdh[(static_cast<int64_t>(blockIdx.x) * K + k) * in + col] = s;
        __syncthreads();
    }
}

__global__ void rb_backward_finalize(const double *__restrict__ pdg, const double *__restrict__ pdh, int K,
                                     int64_t out, int64_t in, int nct, int nrt, float *__restrict__ dg,
                                     float *__restrict__ dh) {
    const int64_t n1 = K * out, n2 = K * in;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n1 + n2;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        double s = 0.0;
        if (i < n1) {
            for (int c = 0; c < nct; c++) s += pdg[c * n1 + i];
            dg[i] = static_cast<float>(s);
        } else {
            const int64_t j = i - n1;
            for (int r = 0; r < nrt; r++) s += pdh[r * n2 + j];
            dh[j] = static_cast<float>(s);
        }
    }
}

template <int K, typename GT>
cudaError_t launch_backward(const GT *G, const void *W, rabit_dtype wdt, const float *g, const float *h,
                            const rabit_word_t *packed, int64_t out, int64_t in, rabit_ste ste, float c, void *dW,
                            float *dg, float *dh, double *ws, cudaStream_t s) {
    const int64_t nct = (in + kBwdCols - 1) / kBwdCols, nrt = (out + kBwdRows - 1) / kBwdRows;
    double *pdg = ws, *pdh = ws + nct * K * out;
    const bool aligned = (in % 8 == 0) && (reinterpret_cast<uintptr_t>(G) % 16 == 0) &&
                         (reinterpret_cast<uintptr_t>(dW) % 16 == 0) &&
                         (ste == RABIT_STE_IDENTITY || reinterpret_cast<uintptr_t>(W) % 16 == 0);
    const dim3 grid(static_cast<unsigned>(nrt), static_cast<unsigned>(nct));
    rb_backward_kernel<K, GT><<<grid, 256, 0, s>>>(G, W, wdt, g, h, packed, out, in, ste, c, dW, pdg, pdh,
                                                   aligned ? 1 : 0);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    const int64_t total = K * (out + in);
    const int blocks = static_cast<int>(min64((total + 255) / 256, 4096));
    rb_backward_finalize<<<blocks, 256, 0, s>>>(pdg, pdh, K, out, in, static_cast<int>(nct), static_cast<int>(nrt),
                                                dg, dh);
    return cudaGetLastError();
}

template <int K>
cudaError_t backward_k(const void *G, rabit_dtype gdt, const void *W, rabit_dtype wdt, const float *g, const float *h,
                       const rabit_word_t *packed, int64_t out, int64_t in, rabit_ste ste, float c, void *dW,
                       float *dg, float *dh, double *ws, cudaStream_t s) {
    if (gdt == RABIT_F32)
        return launch_backward<K>(static_cast<const float *>(G), W, wdt, g, h, packed, out, in, ste, c, dW, dg, dh,
                                  ws, s);
    if (gdt == RABIT_F16)
        return launch_backward<K>(static_cast<const __half *>(G), W, wdt, g, h, packed, out, in, ste, c, dW, dg, dh,
                                  ws, s);
    return launch_backward<K>(static_cast<const __nv_bfloat16 *>(G), W, wdt, g, h, packed, out, in, ste, c, dW, dg,
                              dh, ws, s);
}

/* ------------------------------------------------------------------------------------------------ pack */
__global__ void __launch_bounds__(256) pack_kernel(const float *__restrict__ sgn, int64_t rows, int64_t in,
                                                   rabit_word_t *__restrict__ packed) {
    const int lane = threadIdx.x & 31;
    const int64_t o = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
    if (o >= rows) return;
    const int64_t nw = RABIT_WORDS(in);
    const int64_t w0 = static_cast<int64_t>(blockIdx.y) * 32;
    const int nch = static_cast<int>(min64(32, nw - w0));
    uint32_t word = 0;
    for (int c = 0; c < nch; c++) {
        const int64_t j = (w0 + c) * 32 + lane;
        const bool b = j < in && __ldg(sgn + o * in + j) >= 0.0f;
        const uint32_t bal = __ballot_sync(FULL, b);
        if (lane == c) word = bal;
    }
    if (lane < nch) packed[o * nw + w0 + lane] = word;
}

/* ---------------------------------------------------------------------------------------------- unpack */
__global__ void __launch_bounds__(256) unpack_kernel(const rabit_word_t *__restrict__ packed, int64_t rows, int64_t in,
                                                     void *__restrict__ outp, int dt) {
    const int64_t nw = RABIT_WORDS(in);
    const int64_t total = rows * nw;
    const unsigned short plus = dt == RABIT_BF16 ? 0x3f80u : 0x3c00u, minus = dt == RABIT_BF16 ? 0xbf80u : 0xbc00u;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t r = i / nw, w = i - r * nw;
        const uint32_t word = __ldg(packed + i);
        const int64_t j0 = w * 32;
        const int n = static_cast<int>(min64(32, in - j0));
        const int64_t base = r * in + j0;
        if (dt == RABIT_F32) {
            float *o = static_cast<float *>(outp) + base;
            for (int b = 0; b < n; b++) o[b] = ((word >> b) & 1u) ? 1.0f : -1.0f;
        } else {
            unsigned short *o = static_cast<unsigned short *>(outp) + base;
            for (int b = 0; b < n; b++) o[b] = ((word >> b) & 1u) ? plus : minus;
        }
    }
}

}  // namespace

size_t backward_workspace_doubles(int K, int64_t out, int64_t in) {
    const int64_t nct = (in + kBwdCols - 1) / kBwdCols, nrt = (out + kBwdRows - 1) / kBwdRows;
    return static_cast<size_t>(nct * K * out + nrt * K * in);
}

cudaError_t residual_binarize(const void *W, rabit_dtype wdt, const float *g, const float *h, int K, int64_t out,
                              int64_t in, void *what, rabit_dtype odt, rabit_word_t *packed, int *flag,
                              cudaStream_t s) {
    return with_paths(K, [&](auto k) {
        return launch_forward<decltype(k)::value>(W, wdt, g, h, out, in, what, odt, packed, flag, s);
    });
}

cudaError_t residual_binarize_backward(const void *G, rabit_dtype gdt, const void *W, rabit_dtype wdt, const float *g,
                                       const float *h, const rabit_word_t *packed, int K, int64_t out, int64_t in,
                                       rabit_ste ste, float ste_param, void *dW, float *dg, float *dh, double *ws,
                                       cudaStream_t s) {
    return with_paths(K, [&](auto k) {
        return backward_k<decltype(k)::value>(G, gdt, W, wdt, g, h, packed, out, in, ste, ste_param, dW, dg, dh, ws, s);
    });
}

cudaError_t pack_signs(const float *signs, int64_t rows, int64_t in, rabit_word_t *packed, cudaStream_t s) {
    if (rows == 0) return cudaSuccess;
    const dim3 grid(static_cast<unsigned>((rows + 7) / 8), static_cast<unsigned>((RABIT_WORDS(in) + 31) / 32));
    pack_kernel<<<grid, 256, 0, s>>>(signs, rows, in, packed);
    return cudaGetLastError();
}

cudaError_t unpack_signs(const rabit_word_t *packed, int64_t rows, int64_t in, void *out, rabit_dtype dt,
                         cudaStream_t s) {
    const int64_t total = rows * RABIT_WORDS(in);
    if (total == 0) return cudaSuccess;
    const int blocks = static_cast<int>(min64((total + 255) / 256, 65536));
    unpack_kernel<<<blocks, 256, 0, s>>>(packed, rows, in, out, dt);
    return cudaGetLastError();
}

}  // namespace rabit_cuda
