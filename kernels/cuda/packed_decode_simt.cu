/*
 * The CUDA-core decode kernel (DECODE_SIMT): fp16/bf16 x, M <= kSimtMaxM, in <= kSimtMaxIn. One launch, no
 * prologue, no workspace. Small layers (SmolLM2's 576 x 576 ... 1536 x 576) are latency-bound on the MMA kernels:
 * their prologue and main launch cost ~5.8 us a linear against ~3.9 us for cuBLAS (docs/kernels.md), while the
 * arithmetic of a whole layer on the CUDA cores is a fraction of a microsecond. So here every block builds
 * xh_k = h_k * x (float32) of all columns in shared memory itself (each warp the words it reads, or for long rows the
 * whole block all of them: gemv_simt_kernel), and then
 *
 *   y[m][o] = sum_k g_k[o] * sum_j s_k[o][j] * xh_k[m][j],   s = +1 for a set bit, -1 for a clear one
 *
 * with one thread per (output row, 32-column word): a block of 16 warps takes R output rows (R = 32, 16 or 8 by
 * the row length, so that every thread has one word of each path), lane = (word lane / R of the warp's, row
 * lane % R). The lanes of a row-set read the same xh at the same time (a shared-memory broadcast, 16 bytes at a
 * time), and a weight costs a shift, one LOP3 (sign flip) and an FADD per row of x. A row's words are added by a
 * fixed shuffle butterfly within the warp, then warp by warp in order, per path; times g in path order, the bias
 * and one rounding: deterministic, and a row's result does not depend on the other layers of a group launch (a
 * group equals its separate calls bit for bit). float32 products and sums: float32-level accuracy like the int8
 * kernel, not bit-identical to it. A non-finite xh makes that row of x's outputs NaN, as in the MMA kernels.
 *
 * The fused instantiation (F, rabit.packed_linear_fused) also takes a decoder's glue: silu(x) * up as the input, an
 * RMSNorm of it, a residual added to the output; with DecodeFusion::prefetch_weights it loads the layer's parameters
 * before it waits for the kernel ahead (docs/kernels.md, "Fused decoder glue").
 */
#include <cuda_runtime.h>

#include "common.cuh"
#include "rabit_cuda.cuh"

namespace rabit_cuda {

namespace {

constexpr int kSimtWarps = 16;
constexpr int kSimtThreads = 32 * kSimtWarps;

/* Output rows a block (R = rows a warp, the lanes' row index lane % R): every thread gets one word per path
   (slices = kSimtWarps * 32 / R >= words per row). Depends on `in` only, so a layer's rows are summed the same
   way alone and in a group. */
inline int simt_rows(int64_t in) {
    const int64_t nw = RABIT_WORDS(in);
    return nw <= kSimtWarps ? 32 : nw <= 2 * kSimtWarps ? 16 : 8;
}
static_assert(kSimtMaxIn % kSimtThreads == 0, "the block's build: whole columns a thread");
static_assert(kSimtMaxIn <= 32 * 4 * kSimtWarps, "simt_rows(kSimtMaxIn) must give every slice one word");

struct SimtArgs {
    const void *x;
    int xdt;
    int64_t in;
    int nw;     // words per row of bits
    int pitch;  // floats per (path, row of x) in shared memory: nw * kSimtWordPitch
    int layers;
    int gdt, hdt, bdt;
    int64_t tile0[kDecodeMaxLayers];  // layer l's first tile of R rows
    const rabit_word_t *packed[kDecodeMaxLayers];
    const void *g[kDecodeMaxLayers];
    const void *h[kDecodeMaxLayers];
    const void *bias[kDecodeMaxLayers];
    void *y[kDecodeMaxLayers];
    int64_t out[kDecodeMaxLayers];
    DecodeFusion f;  // read by the fused instantiations only (F = true)
};

/* xh of word w starts at float w * kSimtWordPitch: 4 floats of padding put the words that the lanes of a warp read
   at once (2 or 4 of them) in different banks. Zeros past `in`. */
constexpr int kSimtWordPitch = 36;

/* Component e of v (e a compile-time constant after unrolling). */
__device__ __forceinline__ float comp(const float4 &v, int e) { return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w; }

/* Thread (warp, lane): row lane % R of the block's R rows, word (slice) warp * (32 / R) + lane / R of every path.
   A non-finite x*h is stored as NaN: every weight is +-1, so it reaches every output row's sum and makes that row
   of x's outputs NaN (the MMA kernels' contract) with no flag to share between warps.
   F: the decoder's glue fused in (DecodeFusion): the input built as silu(x) * up, an RMSNorm of it (its weight folded
   into the build, its per-row scale 1 / rms applied to the sums: the norm is linear in x once the scale is known, so
   the normalised x is never stored), a residual added in the epilogue. A separate instantiation, so that the plain
   kernel's registers and schedule stay those measured. */
template <int K, int M, int R, bool F>
__global__ void __launch_bounds__(kSimtThreads) gemv_simt_kernel(const SimtArgs a) {
    extern __shared__ __align__(16) float xs[];   // [K][M][pitch] xh (kSimtWordPitch floats a word)
    __shared__ float red[kSimtWarps][K][M][R];    // the warps' partial sums
    __shared__ float sq[F ? kSimtWarps : 1][M];   // F with a norm: the warps' sums of squares of the input
    constexpr int WW = 32 / R;                    // words a warp
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, r = lane % R;
    const int w = warp * WW + lane / R;
    // who builds which columns of xh: the warp its own words' (lane: bit `lane` of each), or the block all of them
    // (thread: columns tid, tid + 512, ...; then a block barrier). Measured (H200, session 22): the warp's build is
    // faster for R >= 16 (in <= 1024; 3.41 against 3.48 us at 576 x 576, M = 1; 5.29 against 5.77 at M = 4) and
    // slower at R = 8 in SmolLM2's down_proj (576 x 1536: 4.68 against 4.25 us), so the block builds there
    constexpr bool kWarpBuild = R >= 16;
    constexpr int NC = kWarpBuild ? WW : static_cast<int>(kSimtMaxIn / kSimtThreads);
    const int col0 = kWarpBuild ? warp * WW * 32 + lane : tid, col_step = kWarpBuild ? 32 : kSimtThreads;

    int64_t tile = blockIdx.x;
    int l = 0;
#pragma unroll
    for (int i = 1; i < kDecodeMaxLayers; i++)
        if (i < a.layers && tile >= a.tile0[i]) l = i;
    tile -= pick(a.tile0, l);
    const int64_t out = pick(a.out, l), o = tile * R + r;
    const bool valid = o < out, word = w < a.nw;
    const int nw = a.nw, pitch = a.pitch;
    // the layer's parameters are loaded before the wait where the caller says that the kernel before does not write
    // them (DecodeFusion::prefetch_weights: a decoder's weights); x and what else comes from that kernel after it
    const bool early = F && a.f.prefetch_weights;
    if (!early) pdl_wait();

    // loads first, all in flight together: this thread's word of every path, g and bias of the finishing
    // threads' rows, x and h of the columns this thread builds
    const rabit_word_t *packed = pick(a.packed, l);
    uint32_t bits[K];
#pragma unroll
    for (int k = 0; k < K; k++) bits[k] = (valid && word) ? __ldcs(packed + (k * out + o) * nw + w) : 0u;
    // The values are loaded as stored (ld_raw) and converted below, once all are requested: converted at each load
    // (ld_any), each was waited for right after it, so the loads ran one after another (SASS, nvcc 13; thirty-sixth
    // session). A raw 0 is 0.0 in every dtype; the norm's weight defaults to 1 at the conversion.
    const bool fin = tid < M * R && valid;  // finishes row r of x row tid / R
    const void *bias = pick(a.bias, l);
    uint32_t gq[K], bq = 0u;
#pragma unroll
    for (int k = 0; k < K; k++) gq[k] = fin ? ld_raw(pick(a.g, l), a.gdt, k * out + o) : 0u;
    if (fin && bias) bq = ld_raw(bias, a.bdt, o);
    const void *h = pick(a.h, l);
    uint32_t xq[NC][M], hq[NC][K];
    uint32_t uq[F ? NC : 1][M], nq[F ? NC : 1];  // F: up and the norm's weight of the thread's columns
    uint32_t rq = 0u;                            // F: the residual of the finishing thread's output
    const bool has_nw = F && a.f.norm_weight;
#pragma unroll
    for (int c = 0; c < NC; c++) {
        const int64_t j = col0 + int64_t{c} * col_step;
        const bool in_range = j < a.in;
#pragma unroll
        for (int k = 0; k < K; k++) hq[c][k] = in_range ? ld_raw(h, a.hdt, k * a.in + j) : 0u;
        if constexpr (F) nq[c] = in_range && has_nw ? ld_raw(a.f.norm_weight, a.f.norm_dt, j) : 0u;
    }
    if (early) pdl_wait();  // x (and up, residual) may come from the kernel before
#pragma unroll
    for (int c = 0; c < NC; c++) {
        const int64_t j = col0 + int64_t{c} * col_step;
        const bool in_range = j < a.in;
#pragma unroll
        for (int m = 0; m < M; m++) xq[c][m] = in_range ? ld_raw(a.x, a.xdt, m * a.in + j) : 0u;
        if constexpr (F) {
#pragma unroll
            for (int m = 0; m < M; m++) uq[c][m] = in_range && a.f.up ? ld_raw(a.f.up, a.xdt, m * a.in + j) : 0u;
        }
    }
    if constexpr (F)
        if (fin && a.f.residual) rq = ld_raw(a.f.residual, a.xdt, (tid / R) * out + o);
    // every block has issued its loads: the next kernel may be scheduled (it waits for this grid's end before
    // it reads anything); measured: the attention after a q/k/v group starts sooner, ~20 us a SmolLM2 step
    pdl_launch_dependents();
    float gv[K], bv = raw_to_f32(bq, a.bdt);
#pragma unroll
    for (int k = 0; k < K; k++) gv[k] = raw_to_f32(gq[k], a.gdt);
    float xv[NC][M], hv[NC][K];
    float uv[F ? NC : 1][M], nv[F ? NC : 1];
    const float rv = F ? raw_to_f32(rq, a.xdt) : 0.0f;
#pragma unroll
    for (int c = 0; c < NC; c++) {
        const bool in_range = col0 + int64_t{c} * col_step < a.in;
#pragma unroll
        for (int k = 0; k < K; k++) hv[c][k] = raw_to_f32(hq[c][k], a.hdt);
#pragma unroll
        for (int m = 0; m < M; m++) xv[c][m] = raw_to_f32(xq[c][m], a.xdt);
        if constexpr (F) {
            nv[c] = in_range && has_nw ? raw_to_f32(nq[c], a.f.norm_dt) : 1.0f;
#pragma unroll
            for (int m = 0; m < M; m++) uv[c][m] = raw_to_f32(uq[c][m], a.xdt);
        }
    }

    // xh_k[m][j] = h_k[j] * x[m][j] (zeros from `in` to the end of the last word); F: x[m][j] is first replaced by
    // silu(x) * up (with up), its square summed for the norm, and it is multiplied by the norm's weight (1 without)
    float ss[M];
#pragma unroll
    for (int m = 0; m < M; m++) ss[m] = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; c++) {
        const int j = col0 + c * col_step;
        if ((j >> 5) >= nw) break;
        if constexpr (F) {
#pragma unroll
            for (int m = 0; m < M; m++) {
                float e = xv[c][m];
                if (a.f.up) e = __fmul_rn(silu_f(e), uv[c][m]);
                ss[m] = __fadd_rn(ss[m], __fmul_rn(e, e));
                xv[c][m] = __fmul_rn(e, nv[c]);
            }
        }
#pragma unroll
        for (int k = 0; k < K; k++)
#pragma unroll
            for (int m = 0; m < M; m++) {
                const float v = __fmul_rn(hv[c][k], xv[c][m]);
                xs[(k * M + m) * pitch + (j >> 5) * kSimtWordPitch + (j & 31)] =
                    is_finite_f(v) ? v : __uint_as_float(0x7fc00000u);
            }
    }
    if constexpr (F) {
        if (a.f.norm_weight) {  // the warp's sum of squares per row of x (every column is some thread's, once)
#pragma unroll
            for (int m = 0; m < M; m++) {
                float p = ss[m];
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) p = __fadd_rn(p, __shfl_xor_sync(0xffffffffu, p, off));
                if (lane == 0) sq[warp][m] = p;
            }
        }
    }
    if (kWarpBuild)
        __syncwarp();
    else
        __syncthreads();

    // this thread's word: two chains per (path, row of x), even and odd columns; then the warp's words of a row
    // added by a fixed butterfly over the lanes of that row
#pragma unroll
    for (int k = 0; k < K; k++) {
        float acc[M][2];
#pragma unroll
        for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = 0.0f;
        if (word) {
            const uint32_t clear = ~bits[k];  // bit b clear: column 32w + b subtracts
#pragma unroll
            for (int q = 0; q < 8; q++) {
                float4 v[M];
#pragma unroll
                for (int m = 0; m < M; m++)
                    v[m] = *reinterpret_cast<const float4 *>(xs + (k * M + m) * pitch + w * kSimtWordPitch + 4 * q);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const uint32_t flip = (clear << (31 - (4 * q + e))) & 0x80000000u;
#pragma unroll
                    for (int m = 0; m < M; m++)
                        acc[m][e & 1] =
                            __fadd_rn(acc[m][e & 1], __uint_as_float(__float_as_uint(comp(v[m], e)) ^ flip));
                }
            }
        }
#pragma unroll
        for (int m = 0; m < M; m++) {
            float p = __fadd_rn(acc[m][0], acc[m][1]);
#pragma unroll
            for (int off = R; off < 32; off <<= 1) p = __fadd_rn(p, __shfl_xor_sync(0xffffffffu, p, off));
            if (lane < R) red[warp][k][m][lane] = p;
        }
    }
    __syncthreads();

    // thread (m, r): the warps in order per path, times g, the paths in order, bias, one rounding (a NaN sum, from
    // a non-finite xh, stays NaN through all of it)
    if (fin) {
        const int m = tid / R;
        float v = 0.0f;
#pragma unroll
        for (int k = 0; k < K; k++) {
            float s = 0.0f;
#pragma unroll
            for (int wp = 0; wp < kSimtWarps; wp++) s = __fadd_rn(s, red[wp][k][m][r]);
            v = __fadd_rn(v, __fmul_rn(gv[k], s));
        }
        if constexpr (F) {
            if (a.f.norm_weight) {  // HF's RMSNorm: x * rsqrt(mean(x^2) + eps), the warps' sums in order
                float s = 0.0f;
#pragma unroll
                for (int wp = 0; wp < kSimtWarps; wp++) s = __fadd_rn(s, sq[wp][m]);
                v = __fmul_rn(v, rsqrtf(__fadd_rn(__fdiv_rn(s, static_cast<float>(a.in)), a.f.eps)));
            }
        }
        if (bias) v = __fadd_rn(v, bv);
        if constexpr (F)
            if (a.f.residual) v = __fadd_rn(v, rv);
        st_any(pick(a.y, l), a.xdt, m * out + o, v);
    }
}

template <int K, int M, int R, bool F>
cudaError_t launch_simt_t(const SimtArgs &a, unsigned tiles, int smem, cudaStream_t s) {
    static bool attr_set[64] = {};  // per instantiation and device
    // the most dynamic shared memory this instantiation can ask for (in = kSimtMaxIn), within what the device
    // allows beside the static arrays
    constexpr int most = K * M * static_cast<int>(kSimtMaxIn / 32) * kSimtWordPitch * 4, fixed = kSimtWarps * (K * R + 1) * M * 4 + 1024;
    const int optin = device_info().smem_optin - fixed;
    const cudaError_t e = set_smem_limit_once(gemv_simt_kernel<K, M, R, F>, most < optin ? most : optin, attr_set);
    if (e != cudaSuccess) return e;
    return launch_pdl(gemv_simt_kernel<K, M, R, F>, dim3(tiles), kSimtThreads, smem, a, s);
}

template <int K, int M, bool F>
cudaError_t launch_simt_r(const SimtArgs &a, int R, unsigned tiles, int smem, cudaStream_t s) {
    switch (R) {
        case 32: return launch_simt_t<K, M, 32, F>(a, tiles, smem, s);
        case 16: return launch_simt_t<K, M, 16, F>(a, tiles, smem, s);
        case 8: return launch_simt_t<K, M, 8, F>(a, tiles, smem, s);
    }
    return cudaErrorInvalidValue;
}

template <int K, bool F>
cudaError_t launch_simt_k(const SimtArgs &a, int M, int R, unsigned tiles, int smem, cudaStream_t s) {
    switch (M) {
        case 1: return launch_simt_r<K, 1, F>(a, R, tiles, smem, s);
        case 2: return launch_simt_r<K, 2, F>(a, R, tiles, smem, s);
        case 3: return launch_simt_r<K, 3, F>(a, R, tiles, smem, s);
        case 4: return launch_simt_r<K, 4, F>(a, R, tiles, smem, s);
    }
    return cudaErrorInvalidValue;
}

}  // namespace

bool simt_applies(int K, int64_t M, int64_t in) {
    if (K < 1 || K > RABIT_MAX_K || M < 1 || M > kSimtMaxM || in < 1 || in > kSimtMaxIn) return false;
    // shared memory: x*h, the warps' partial sums (and 1 KB of slack): up to ~155 KB at K = M = 4 and
    // in = 2048, more than some GPUs give a block (sm_86, sm_89: 99 KB), which then take another kernel
    const int64_t bytes =
        4 * (int64_t{K} * M * RABIT_WORDS(in) * kSimtWordPitch + int64_t{kSimtWarps} * (K * simt_rows(in) + 1) * M) + 1024;
    return bytes <= device_info().smem_optin;
}

cudaError_t decode_gemv_simt(const void *x, rabit_dtype xdt, int64_t M, const DecodeLayer *layers, int n,
                             rabit_dtype gdt, rabit_dtype hdt, rabit_dtype bdt, int K, int64_t in, cudaStream_t s,
                             const DecodeFusion *fusion) {
    if (!simt_applies(K, M, in) || xdt == RABIT_F32 || n < 1 || n > kDecodeMaxLayers ||
        (fusion && fusion->residual && n != 1))
        return cudaErrorInvalidValue;
    SimtArgs a{};
    a.x = x; a.xdt = xdt; a.in = in; a.gdt = gdt; a.hdt = hdt; a.bdt = bdt;
    a.nw = static_cast<int>(RABIT_WORDS(in));
    a.pitch = a.nw * kSimtWordPitch;
    a.layers = n;
    const int R = simt_rows(in);
    int64_t tiles = 0;
    for (int l = 0; l < n; l++) {
        a.tile0[l] = tiles;
        a.packed[l] = layers[l].packed; a.g[l] = layers[l].g; a.h[l] = layers[l].h; a.bias[l] = layers[l].bias;
        a.y[l] = layers[l].y; a.out[l] = layers[l].out;
        tiles += (layers[l].out + R - 1) / R;
    }
    if (tiles == 0) return cudaSuccess;
    const int smem = static_cast<int>(4 * static_cast<int64_t>(K) * M * a.pitch);
    if (fusion) a.f = *fusion;
    return with_paths(K, [&](auto k) {
        return fusion ? launch_simt_k<decltype(k)::value, true>(a, static_cast<int>(M), R, static_cast<unsigned>(tiles),
                                                                smem, s)
                      : launch_simt_k<decltype(k)::value, false>(a, static_cast<int>(M), R,
                                                                 static_cast<unsigned>(tiles), smem, s);
    });
}

}  // namespace rabit_cuda
