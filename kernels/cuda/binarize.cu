/*
 * Coupled residual binarization on the GPU: forward (signs + Ŵ in one kernel), the one-pass backward,
 * and the pack/unpack kernels. The float arithmetic follows rabit/reference.py operation by operation
 * with explicit round-to-nearest intrinsics (__fmul_rn / __fsub_rn / __fadd_rn, never contracted into an
 * FMA; the build also passes --fmad=false), so signs and Ŵ are bit-exact with the CPU kernels.
 * The forward is a streaming kernel: 16-byte loads and stores, lanes of 8 columns whose sign bits meet in
 * the packed words by shuffle, each warp on one column chunk for all its rows with the next rows' loads
 * in flight while it computes (see the comment above rb_forward_kernel). The backward streams G through a
 * per-warp cp.async ring and reduces dg, dh in float64 in a fixed order (see the comment above it).
 */
#include <cuda_runtime.h>

#include "common.cuh"
#include "rabit_cuda.cuh"

namespace rabit_cuda {

namespace {

constexpr unsigned FULL = 0xffffffffu;

template <typename T>
struct TypeTag {
    using type = T;
};

/* ------------------------------------------------------------------------------------------------
 * forward: a pure stream (W in; Ŵ and the sign words out), so the design is about bytes in flight and
 * instructions per element. Lane l owns V = 8 consecutive columns: one 16-byte load of W per row (8
 * 16-bit values; two for 8 float32), h as float4s kept in registers, Ŵ in 8- or 16-byte stores (the
 * output dtype OT is a template argument, so there is no run-time switch per element). A warp covers a
 * chunk of 256 columns = 8 packed words: the 4 lanes of a word each place their 8 bits at bit 8 (l % 4)
 * and OR them with a 2-step shuffle butterfly, then lane `sub` of the 4 stores the word of path `sub`
 * (K <= 4).
 * A warp keeps its chunk for life (h loaded once) and walks the rows p, p + P, p + 2P, ... in groups of
 * R (2 for K <= 2; 1 for K = 3, 4, which need the registers for h) from two register buffers used in
 * turn: the next group's loads are issued before the current group's math, so a group of loads is
 * always in flight per warp. The grid is one wave of nch chunks x P row phases ~= the resident warps of
 * the device, so at any moment the device streams through about P consecutive rows (measured faster
 * than contiguous runs of rows per warp, and than half the warps with twice the rows each).
 * VEC = false is the same scheme with element loads and stores and V = 4, for rows that are not 16-byte
 * aligned (in % (16 / sizeof(WT)) != 0) or unaligned base pointers. Lane r*K + k fetches g[k] of row r
 * of a group, the others take it by shuffle. Columns past `in` are computed on zeros (finite, so no
 * flag) and masked out of the words. Per element the arithmetic is the reference chain, unchanged:
 * b = rv >= 0, v = __fmul_rn(b ? g : -g, h), rv = __fsub_rn(rv, v), acc = k ? __fadd_rn(acc, v) : v.
 * ---------------------------------------------------------------------------------------------- */
constexpr int kFwdThreads = 128;

/* !isfinite(x) as one compare (NaN compares false); same answer as is_finite_f for every bit pattern */
__device__ __forceinline__ bool not_finite(float x) { return !(fabsf(x) <= 3.40282347e38f); }

/* A W element's float32 value from its raw bits (the low 16 bits for the 16-bit types; exact). */
template <typename WT>
__device__ __forceinline__ float raw_to_f(uint32_t u) {
    if constexpr (sizeof(WT) == 4) return __uint_as_float(u);
    else if constexpr (DT<WT>::code == RABIT_BF16) return __uint_as_float(u << 16);
    else return __half2float(__ushort_as_half(static_cast<unsigned short>(u)));
}

/* Vector stores the compiler may not split (it turned an 8-byte store into two 4-byte ones). */
__device__ __forceinline__ void st_v2(void *p, uint32_t a, uint32_t b) {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};\n" ::"l"(p), "r"(a), "r"(b) : "memory");
}
__device__ __forceinline__ void st_v4(void *p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

/* two 16-bit outputs (round to nearest, as st_any) in one word, lo at the lower address */
template <typename OT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    return static_cast<uint32_t>(f32_to_16(lo, DT<OT>::code)) |
           (static_cast<uint32_t>(f32_to_16(hi, DT<OT>::code)) << 16);
}

/* One lane's V elements of one row as raw 32-bit words: VEC, the 16-byte units as loaded; else one
   element a word. Invalid elements are 0. Raw bits, not floats: a conversion here would wait for the load.
   With VEC, nvalid is a multiple of U (in % U == 0). */
template <typename WT, bool VEC>
struct FwdLane {
    static constexpr int U = 16 / static_cast<int>(sizeof(WT));  // elements of a 16-byte unit
    static constexpr int V = VEC ? 8 : 4;                         // columns of a lane
    static constexpr int NUNITS = VEC ? V / U : 0;
    static constexpr int NU = VEC ? 4 * NUNITS : V;
    __device__ static __forceinline__ void load(const WT *p, int nvalid, uint32_t (&u)[NU]) {
        if constexpr (VEC) {
#pragma unroll
            for (int m = 0; m < NUNITS; m++) {
                uint4 q = make_uint4(0, 0, 0, 0);
                if (m * U < nvalid) q = __ldcs(reinterpret_cast<const uint4 *>(p) + m);
                u[4 * m] = q.x; u[4 * m + 1] = q.y; u[4 * m + 2] = q.z; u[4 * m + 3] = q.w;
            }
        } else {
#pragma unroll
            for (int i = 0; i < V; i++) {
                if constexpr (sizeof(WT) == 4) u[i] = i < nvalid ? __float_as_uint(__ldg(p + i)) : 0u;
                else u[i] = i < nvalid ? __ldg(reinterpret_cast<const unsigned short *>(p) + i) : 0u;
            }
        }
    }
    __device__ static __forceinline__ float value(const uint32_t (&u)[NU], int i) {
        if constexpr (VEC && sizeof(WT) == 2) return raw_to_f<WT>((i & 1) ? u[i >> 1] >> 16 : u[i >> 1]);
        else return raw_to_f<WT>(u[i]);
    }
};

/* V results -> Ŵ at p in dtype OT, round to nearest. VEC: one store per 16-byte unit of W (U elements:
   U * sizeof(OT) bytes, aligned as the unit is), or one 16-byte store for the 8 16-bit outputs of a
   float32 lane when p happens to be 16-byte aligned (in % 8 == 0, or every other row). */
template <typename OT, int U, int V, bool VEC>
__device__ __forceinline__ void fwd_store(OT *p, int nvalid, const float (&a)[V]) {
    if constexpr (VEC) {
        if constexpr (sizeof(OT) == 2 && U == 4 && V == 8) {
            if (nvalid == V && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
                st_v4(p, pack2<OT>(a[0], a[1]), pack2<OT>(a[2], a[3]), pack2<OT>(a[4], a[5]), pack2<OT>(a[6], a[7]));
                return;
            }
        }
#pragma unroll
        for (int m = 0; m < V / U; m++) {
            if (m * U >= nvalid) break;
            const float *x = a + m * U;
            OT *q = p + m * U;
            if constexpr (sizeof(OT) == 4) {
#pragma unroll
                for (int t = 0; t < U / 4; t++)
                    st_v4(q + 4 * t, __float_as_uint(x[4 * t]), __float_as_uint(x[4 * t + 1]),
                          __float_as_uint(x[4 * t + 2]), __float_as_uint(x[4 * t + 3]));
            } else if constexpr (U == 4) {
                st_v2(q, pack2<OT>(x[0], x[1]), pack2<OT>(x[2], x[3]));
            } else {
                st_v4(q, pack2<OT>(x[0], x[1]), pack2<OT>(x[2], x[3]), pack2<OT>(x[4], x[5]), pack2<OT>(x[6], x[7]));
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < V; i++) {
            if (i >= nvalid) break;
            if constexpr (sizeof(OT) == 4) p[i] = a[i];
            else reinterpret_cast<unsigned short *>(p)[i] = f32_to_16(a[i], DT<OT>::code);
        }
    }
}

// minBlocks spelled out: with __launch_bounds__(128) alone, ptxas (13.0, sm_90a) held some instantiations to 64
// registers and spilled
template <int K, typename WT, typename OT, bool VEC>
__global__ void __launch_bounds__(kFwdThreads, 1)
    rb_forward_kernel(const WT *__restrict__ W, const float *__restrict__ g, const float *__restrict__ h, int64_t out,
                      int64_t in, int64_t nch, int64_t P, OT *__restrict__ what, rabit_word_t *__restrict__ packed,
                      int *__restrict__ flag) {
    using L = FwdLane<WT, VEC>;
    constexpr int U = L::U, V = L::V, NU = L::NU, LPW = 32 / V, R = K <= 2 ? 2 : 1;
    static_assert(R * K <= 32 && K <= LPW, "one g value per lane; one storing lane per path");
    const int lane = threadIdx.x & 31;
    const int64_t gw = static_cast<int64_t>(blockIdx.x) * (kFwdThreads / 32) + (threadIdx.x >> 5);
    const int64_t p = gw / nch;  // once per warp
    if (p >= P) return;          // the whole warp leaves together (P <= out)
    const int64_t c = gw - p * nch;
    const int64_t col0 = c * (32 * V) + lane * V;
    const int nvalid = static_cast<int>(max64(0, min64(V, in - col0)));
    const uint32_t vmask = (1u << nvalid) - 1u;  // V < 32
    const int64_t nw = RABIT_WORDS(in);
    // column col0 + i is bit sub * V + i of word wi (col0 = 32 wi + sub V)
    const int sub = lane % LPW;
    const int64_t wi = c * V + lane / LPW;
    bool wbad = false, gbad = false, hbad = false;

    float hv[K][V];
#pragma unroll
    for (int k = 0; k < K; k++) {
        const float *hp = h + k * in + col0;
        if constexpr (VEC) {
#pragma unroll
            for (int t = 0; t < V / 4; t++) {
                float4 q = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (4 * t < nvalid) q = __ldg(reinterpret_cast<const float4 *>(hp) + t);
                hv[k][4 * t] = q.x; hv[k][4 * t + 1] = q.y; hv[k][4 * t + 2] = q.z; hv[k][4 * t + 3] = q.w;
            }
        } else {
#pragma unroll
            for (int i = 0; i < V; i++) hv[k][i] = i < nvalid ? __ldg(hp + i) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < V; i++) hbad |= not_finite(hv[k][i]);
    }

    // a group: rows o0 + r P, r < R; lane r K + k holds g[k] of row o0 + r P
    const int gr = lane / K, gpath = lane % K;
    auto load_group = [&](int64_t o0, uint32_t (&u)[R][NU], float &gl) {
        const WT *wp = W + o0 * in + col0;
#pragma unroll
        for (int r = 0; r < R; r++)
            if (o0 + r * P < out) L::load(wp + r * P * in, nvalid, u[r]);
        gl = 0.0f;
        if (gr < R && o0 + gr * P < out) gl = __ldg(g + gpath * out + o0 + gr * P);
    };
    auto process = [&](int64_t o0, const uint32_t (&u)[R][NU], float gl) {
        // checked here, not at the load: a use right after the load would stall the warp on it
        gbad |= not_finite(gl);  // 0 in lanes that hold no g
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int64_t o = o0 + r * P;
            if (o >= out) break;  // uniform over the warp
            float gk[K], ngk[K];
#pragma unroll
            for (int k = 0; k < K; k++) {
                gk[k] = __shfl_sync(FULL, gl, r * K + k);
                ngk[k] = -gk[k];
            }
            uint32_t bits[K];
#pragma unroll
            for (int k = 0; k < K; k++) bits[k] = 0u;
            float acc[V];
#pragma unroll
            for (int i = 0; i < V; i++) {
                float rv = L::value(u[r], i);
                wbad |= not_finite(rv);
                float a = 0.0f;
#pragma unroll
                for (int k = 0; k < K; k++) {
                    const bool b = rv >= 0.0f;  // sign(0) = +1
                    if (b) bits[k] |= 1u << i;
                    const float v = __fmul_rn(b ? gk[k] : ngk[k], hv[k][i]);
                    rv = __fsub_rn(rv, v);
                    a = k ? __fadd_rn(a, v) : v;
                }
                acc[i] = a;
            }
            if (what) fwd_store<OT, U, V, VEC>(what + o * in + col0, nvalid, acc);
            if (packed) {
                uint32_t word[K];
#pragma unroll
                for (int k = 0; k < K; k++) word[k] = (bits[k] & vmask) << (sub * V);  // padding bits stay clear
#pragma unroll
                for (int m = 1; m < LPW; m <<= 1)
#pragma unroll
                    for (int k = 0; k < K; k++) word[k] |= __shfl_xor_sync(FULL, word[k], m);
                // every lane of the word's group now holds all K words: lane sub stores path sub
                uint32_t mine = word[0];
#pragma unroll
                for (int k = 1; k < K; k++)
                    if (sub == k) mine = word[k];
                if (sub < K && wi < nw) packed[(sub * out + o) * nw + wi] = mine;
            }
        }
    };
    // two buffers in turn (a copy between them would cost a move per register per group)
    uint32_t ua[R][NU], ub[R][NU];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int m = 0; m < NU; m++) ua[r][m] = ub[r][m] = 0u;
    float ga = 0.0f, gb = 0.0f;
    const int64_t gs = R * P;  // rows between groups
    load_group(p, ua, ga);
    for (int64_t o0 = p; o0 < out; o0 += 2 * gs) {
        if (o0 + gs < out) load_group(o0 + gs, ub, gb);  // in flight during this group's math
        process(o0, ua, ga);
        if (o0 + gs >= out) break;
        if (o0 + 2 * gs < out) load_group(o0 + 2 * gs, ua, ga);
        process(o0 + gs, ub, gb);
    }
    int bad = (wbad ? FLAG_W_NONFINITE : 0) | (gbad ? FLAG_G_NONFINITE : 0) | (hbad ? FLAG_H_NONFINITE : 0);
    bad = __reduce_or_sync(FULL, bad);
    if (bad && lane == 0 && flag) atomicOr(flag, bad);
}

template <int K, typename WT, typename OT, bool VEC>
cudaError_t launch_forward_t(const WT *W, const float *g, const float *h, int64_t out, int64_t in, void *what,
                             rabit_word_t *packed, int *flag, cudaStream_t s) {
    constexpr int V = FwdLane<WT, VEC>::V;
    constexpr int wpb = kFwdThreads / 32;
    auto *kern = rb_forward_kernel<K, WT, OT, VEC>;
    static std::atomic<int> resident[64];  // resident blocks an SM of this instantiation, per device
    const int bps = resident_blocks_once(kern, kFwdThreads, 0, resident);
    // one wave: P row phases per chunk so that nch * P ~= the resident warps; P = ceil(out / per) gives
    // every warp per or per - 1 rows
    const int64_t nch = (in + 32 * V - 1) / (32 * V);
    const int64_t warps = static_cast<int64_t>(device_info().sms) * bps * wpb;
    const int64_t want = max64(1, warps / nch);
    const int64_t per = (out + want - 1) / want;
    const int64_t P = (out + per - 1) / per;
    const int64_t blocks = (nch * P + wpb - 1) / wpb;
    kern<<<static_cast<unsigned>(blocks), kFwdThreads, 0, s>>>(W, g, h, out, in, nch, P, static_cast<OT *>(what),
                                                                 packed, flag);
    return cudaGetLastError();
}

template <int K, typename WT>
cudaError_t launch_forward_w(const WT *W, const float *g, const float *h, int64_t out, int64_t in, void *what,
                             rabit_dtype odt, rabit_word_t *packed, int *flag, cudaStream_t s) {
    constexpr int U = FwdLane<WT, true>::U;
    // 16-byte units of W, h and Ŵ (in % U == 0: every row starts where the first one does, modulo 16)
    const bool vec = in % U == 0 && aligned16(W) && aligned16(h) && (what == nullptr || aligned16(what));
    auto go = [&](auto ot) {
        using OT = typename decltype(ot)::type;
        return vec ? launch_forward_t<K, WT, OT, true>(W, g, h, out, in, what, packed, flag, s)
                   : launch_forward_t<K, WT, OT, false>(W, g, h, out, in, what, packed, flag, s);
    };
    if (odt == RABIT_F32) return go(TypeTag<float>());
    if (odt == RABIT_BF16) return go(TypeTag<__nv_bfloat16>());
    return go(TypeTag<__half>());
}

template <int K>
cudaError_t launch_forward(const void *W, rabit_dtype wdt, const float *g, const float *h, int64_t out, int64_t in,
                           void *what, rabit_dtype odt, rabit_word_t *packed, int *flag, cudaStream_t s) {
    if (out <= 0 || in <= 0) return cudaSuccess;  // nothing to write (an empty grid would be a launch error)
    if (wdt == RABIT_F32)
        return launch_forward_w<K>(static_cast<const float *>(W), g, h, out, in, what, odt, packed, flag, s);
    if (wdt == RABIT_F16)
        return launch_forward_w<K>(static_cast<const __half *>(W), g, h, out, in, what, odt, packed, flag, s);
    return launch_forward_w<K>(static_cast<const __nv_bfloat16 *>(W), g, h, out, in, what, odt, packed, flag, s);
}

/* ------------------------------------------------------------------------------------------------
 * backward: a stream like the forward (G, the sign words and, for a non-identity STE, W in; dW out), plus two
 * float64 reductions: dg[k][o] over the columns of a row, dh[k][j] over the rows of a column.
 * A warp owns one chunk of kBwdCols = 128 columns for its whole life (lane l: columns 4l..4l+3, with h[k] and
 * the dh[k] sums of its 4 columns as float64 in registers, 2 x 4K) and takes its rows two at a time (a step: 8
 * elements a lane, 4 columns x 2 rows; half the registers of 8 columns x 1 row, which is what lets K <= 3 run two
 * blocks an SM at <= 128 registers). Rows come in batches of B (4 for K <= 2, 2 for K = 3, 4): a warp takes
 * batches p, p + P, p + 2P, ... (p its row phase, P the phases of a chunk). The grid is one wave (nch chunks x nq
 * blocks of kBwdWarps = 8 warps, sized by an occupancy query), so the device streams through about P B
 * consecutive rows at a time.
 * Loads are cp.async copies into a per-warp shared-memory ring of S steps (16 rows for 16-bit G, 8 with W or for
 * float32 G, 4 for both; at least two batches), one commit group a batch: wait_group D - 1 (D = the ring's
 * batches) finds the current batch landed while the next D - 1 stay in flight. A step's G (and W) is copied in
 * 16-byte units, unit u by lane u % 32; the batch's B x K x 4 sign words and B x K g values one each by lanes
 * 0..4BK-1 and 0..BK-1. Rows past `out`, columns past `in` and words past the row are zero fills, so the copies
 * need no lane branches (each lane's offsets are computed once). The element path (VEC = false: in % 8 != 0, a
 * base pointer not 16-byte aligned, or a ring too large for the device) loads G and W of the next step into
 * registers with element loads while it computes this one, and keeps the ring for the signs and g.
 * Per element: s = bit ? G : -G in float64 (exact; the sign flipped with an integer xor, where -G was a float64
 * add), pg[row][k] += s h[k] (fma, in column order over the lane's 4 columns), dh[k][j] += s g[k][row] (fma, in
 * row order over the warp's rows); dW = G (times the STE factor) in W's dtype, one 16-byte (float32) or 8-byte
 * store per row a lane, so that each store instruction of a warp covers 512 or 256 contiguous bytes (a lane of 8
 * consecutive columns stores float32 as two interleaved 16-byte halves: the same f16 -> f32 stream ran 1.45x
 * slower that way). After a batch the warp reduce-scatters its B K row sums (padded to 4 or 8; lanes trade halves
 * of their values: 7 + 2 float64 shuffles for 8 sums, against 8 x 5 for a butterfly each); each sum sees the xor
 * butterfly's additions, as a 5-step xor butterfly over the warp (the kernel this replaced) would. At the end the 8 warps of a block add their dh registers in shared
 * memory in warp order.
 * Partials go to the float64 workspace (dg [nch][K][out], dh [nq][K][in]); rb_backward_finalize, launched
 * with programmatic dependent launch so that it is scheduled while the last blocks run, adds them in a fixed
 * order. Every sum has a fixed order: the result does not depend on scheduling, and there are no atomics.
 * Measured on an H200 at 4096 x 4096, K = 2, G fp16 -> dW fp32: 38.6 us (the kernel this replaced: 52.3 us; the
 * f16 -> f32 copy alone with the same store pattern: 28.5 us). The main loop issues ~140 instructions a row a
 * warp (ncu: ~0.64 IPC a scheduler at 4 warps, DRAM ~45% busy), so it is bound by issue and latency, not bytes.
 * ---------------------------------------------------------------------------------------------- */
__device__ __forceinline__ float ste_factor(float w, int ste, float c) {
    if (ste == RABIT_STE_CLIPPED) return fabsf(w) <= c ? 1.0f : 0.0f;
    const float t = tanhf(__fdiv_rn(w, c));
    return __fsub_rn(1.0f, __fmul_rn(t, t));
}

constexpr int kBwdWarps = 8;  // warps of a block, all on one chunk of kBwdCols columns
constexpr int kBwdThreads = kBwdWarps * 32;
static_assert(kBwdCols == 32 * 4, "a lane owns 4 columns of a chunk");

/* Rows of a batch (pairs of rows: the steps), and its B K row sums padded to a power of two: one reduce-scatter a
   batch */
__host__ __device__ constexpr int bwd_batch(int K) { return K <= 2 ? 4 : 2; }
__host__ __device__ constexpr int bwd_sums(int K) { return K == 1 ? 4 : 8; }
/* Ring steps (pairs of rows): about 4 KB of G (and W) a warp, and at least two batches. Twice as deep measured 2%
   faster for K = 2 and 3-7% slower for K = 3, 4 and the tanh STE (H200). */
template <typename GT, bool HW>
__host__ __device__ constexpr int bwd_ring_steps(int K) {
    const int s = sizeof(GT) == 2 ? (HW ? 4 : 8) : (HW ? 2 : 4);
    return s >= bwd_batch(K) ? s : bwd_batch(K);
}
/* one ring stage (a step, two rows): G and W (VEC only), the 2 x K x 4 sign words, the 2 x K g values */
__host__ __device__ constexpr int bwd_stage_bytes(int K, int gsz, int wsz, bool vec) {
    return (vec ? 2 * kBwdCols * (gsz + wsz) : 0) + 32 * K + (K <= 2 ? 16 : 32);
}
/* A grid of at most this many blocks covers a wave of any device (at most 2 resident blocks an SM). */
constexpr int64_t kBwdMaxBlocks = 1024;
/* dh partials: at most this many row groups (blocks) per chunk; the launcher uses no more. */
int64_t bwd_groups_max(int K, int64_t out, int64_t in) {
    const int64_t nch = (in + kBwdCols - 1) / kBwdCols, nbat = (out + bwd_batch(K) - 1) / bwd_batch(K);
    return max64(1, min64((nbat + kBwdWarps - 1) / kBwdWarps, (kBwdMaxBlocks + nch - 1) / nch));
}

/* 8 raw elements (16-bit: 4 words; float32: 8 words) -> float32, exact */
template <typename T>
__device__ __forceinline__ void decode8(const uint32_t *w, float (&v)[8]) {
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if constexpr (sizeof(T) == 4) v[i] = __uint_as_float(w[i]);
        else v[i] = raw_to_f<T>((i & 1) ? w[i >> 1] >> 16 : w[i >> 1] & 0xffffu);
    }
}

/* Sums over the 32 lanes of NV values per lane (a reduce-scatter): while more than one value is left, the lanes
   of a pair (mask 16, 8, ...) each keep one half and add the other lane's copy of it, then the last value is
   butterflied. Value v ends complete in lanes v << (5 - log2 NV) and up. Each value sees exactly the additions
   of a 5-step xor butterfly, in the same order: the same bits. */
template <int N, int M, int NV>
__device__ __forceinline__ double reduce_scatter_step(double (&v)[NV], int lane) {
    if constexpr (N > 1) {
        const bool up = lane & M;
#pragma unroll
        for (int j = 0; j < N / 2; j++) {
            const double send = up ? v[j] : v[j + N / 2];
            const double keep = up ? v[j + N / 2] : v[j];
            v[j] = keep + __shfl_xor_sync(FULL, send, M);
        }
        return reduce_scatter_step<N / 2, M / 2>(v, lane);
    } else {
        double t = v[0];
#pragma unroll
        for (int m = M; m > 0; m >>= 1) t += __shfl_xor_sync(FULL, t, m);
        return t;
    }
}
template <int NV>
__device__ __forceinline__ double warp_reduce_scatter(double (&v)[NV], int lane) {
    static_assert(NV >= 1 && NV <= 32 && (NV & (NV - 1)) == 0, "a power of two");
    return reduce_scatter_step<NV, 16>(v, lane);
}

/* The lane's 8 elements (as float32, exact) of a ring stage: its 4 columns of the step's two rows, each row
   128 elements of type T in natural order */
template <typename T>
__device__ __forceinline__ void lds_lane8(const unsigned char *st, int lane, float (&v)[8]) {
    if constexpr (sizeof(T) == 4) {
        const uint4 a = *reinterpret_cast<const uint4 *>(st + 16 * lane);
        const uint4 b = *reinterpret_cast<const uint4 *>(st + 512 + 16 * lane);
        const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        decode8<T>(w, v);
    } else {
        const uint2 a = *reinterpret_cast<const uint2 *>(st + 8 * lane);
        const uint2 b = *reinterpret_cast<const uint2 *>(st + 256 + 8 * lane);
        const uint32_t w[4] = {a.x, a.y, b.x, b.y};
        decode8<T>(w, v);
    }
}

/* 4 results -> dtype dt at p (aligned to their size), round to nearest: one instruction */
__device__ __forceinline__ void bwd_store4(char *p, int dt, const float *x) {
    if (dt == RABIT_F32)
        st_v4(p, __float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]), __float_as_uint(x[3]));
    else if (dt == RABIT_F16)
        st_v2(p, pack2<__half>(x[0], x[1]), pack2<__half>(x[2], x[3]));
    else
        st_v2(p, pack2<__nv_bfloat16>(x[0], x[1]), pack2<__nv_bfloat16>(x[2], x[3]));
}

/* s = bit ? x : -x for bit = !(nbits >> j & 1): flips the sign bit (integer ops; -x would be a float64 add) */
__device__ __forceinline__ double apply_sign(double x, uint32_t nbits, int j) {
    return __hiloint2double(__double2hiint(x) ^ static_cast<int>((nbits << (31 - j)) & 0x80000000u),
                            __double2loint(x));
}

// VEC, K <= 3: two blocks an SM (128 registers); K = 4 (measured faster at 164 registers, one block) and the
// element path (more registers for its loads in flight): one. HW: a non-identity STE, which reads W.
template <int K, typename GT, bool VEC, bool HW>
__global__ void __launch_bounds__(kBwdThreads, VEC && K <= 3 ? 2 : 1)
    rb_backward_kernel(const GT *__restrict__ G, const void *__restrict__ W, int wdt, const float *__restrict__ g,
                       const float *__restrict__ h, const rabit_word_t *__restrict__ packed, int64_t out,
                       int64_t in, int ste, float cst, void *__restrict__ dW, double *__restrict__ pdg,
                       double *__restrict__ pdh, int64_t nch, int64_t nq) {
    constexpr int B = bwd_batch(K), BS = B / 2, NV = bwd_sums(K), S = bwd_ring_steps<GT, HW>(K), D = S / BS;
    constexpr int RS = NV == 4 ? 3 : 2;  // sum v lands in lanes v << RS ..
    static_assert(B * K <= NV && (1 << (5 - RS)) == NV && (D & (D - 1)) == 0 && D >= 2, "batch and ring sizes");
    extern __shared__ __align__(16) unsigned char bsm[];
    pdl_launch_dependents();  // the finalize kernel may be scheduled; it waits for this whole grid
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t ch = blockIdx.x % nch, q = blockIdx.x / nch;
    const int64_t P = nq * kBwdWarps, p = q * kBwdWarps + warp;
    const int64_t nw = RABIT_WORDS(in);
    const int64_t cbase = ch * kBwdCols;  // the chunk's first column; the lane's are cbase + 4 lane + j, j < 4
    const int ncol = static_cast<int>(min64(4, max64(0, in - cbase - 4 * lane)));
    const int sh = 4 * (lane & 7);  // its bits in word lane / 8 of the chunk's 4
    const int wsz = HW ? (wdt == RABIT_F32 ? 4 : 2) : 0, dsz = wdt == RABIT_F32 ? 4 : 2;
    constexpr int GB = VEC ? 2 * kBwdCols * static_cast<int>(sizeof(GT)) : 0;
    const int WB = VEC ? 2 * kBwdCols * wsz : 0;
    const int SGO = GB + WB, GO = SGO + 32 * K, STG = GO + (K <= 2 ? 16 : 32);  // G, W, signs [2][K][4], g [2][K]
    const uint32_t ring = smem_u32(bsm) + warp * S * STG;
    const unsigned char *ringp = bsm + warp * S * STG;
    const int64_t nbat = (out + B - 1) / B;
    const int64_t nt = p < nbat ? (nbat - p + P - 1) / P : 0;  // this warp's batches: p, p + P, ...

    double hd[K][4], dh[K][4];
#pragma unroll
    for (int k = 0; k < K; k++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            hd[k][j] = j < ncol ? static_cast<double>(__ldg(h + k * in + cbase + 4 * lane + j)) : 0.0;
            dh[k][j] = 0.0;
        }

    // The copies of a batch (rows r0 + b, b < nr <= B; step s = rows 2s, 2s + 1): 16-byte unit u of a step's G
    // (its two rows' 128-column segments, natural order) is copied by lane u % 32, and W likewise; the batch's
    // B x K x 4 sign words and B x K g values by one lane each (word j: row j / 4K, plane j / 4 % K, word j % 4 of
    // the chunk). Missing rows, columns past `in` and words past the row are zero fills: no lane branches.
    constexpr int GU = static_cast<int>(sizeof(GT)) / 2;  // G units a lane a step
    const int64_t gstride = in * static_cast<int64_t>(sizeof(GT)), wstride = in * wsz;
    const int rowbytes_g = kBwdCols * static_cast<int>(sizeof(GT)), rowbytes_w = kBwdCols * wsz;
    int grow[GU];  // row (0, 1) of the step and byte offset of the lane's units
    int gcol[GU];
#pragma unroll
    for (int u = 0; u < GU; u++) {
        const int off = 16 * (lane + 32 * u);
        grow[u] = off / rowbytes_g;
        gcol[u] = off % rowbytes_g;
    }
    const int wrow = HW && wsz ? (16 * lane) / rowbytes_w : 0, wcol = HW && wsz ? (16 * lane) % rowbytes_w : 0;
    const int wrow2 = HW && wsz ? (16 * lane + 512) / rowbytes_w : 0, wcol2 = HW && wsz ? (16 * lane + 512) % rowbytes_w : 0;
    const int sj = lane, sb = sj / (4 * K), sk = (sj / 4) % K, sw = sj % 4;
    const bool sok = sj < 4 * B * K && ch * 4 + sw < nw;
    const int64_t srel = (sk * out + sb) * nw + ch * 4 + sw;
    const uint32_t sdst = ring + (sb / 2) * STG + SGO + 4 * (((sb & 1) * K + sk) * 4 + sw);
    const int gb = lane / K, gk = lane % K;  // lane < B K: g[gk][r0 + gb]
    const uint32_t kdst = ring + (gb / 2) * STG + GO + 4 * ((gb & 1) * K + gk);
    auto issue_batch = [&](int64_t tb, uint32_t soff) {
        const int64_t r0 = (p + P * tb) * B;
        const int nr = static_cast<int>(min64(B, out - r0));
        if constexpr (VEC) {
            const char *gs = reinterpret_cast<const char *>(G + r0 * in + cbase);
#pragma unroll
            for (int s = 0; s < BS; s++)
#pragma unroll
                for (int u = 0; u < GU; u++) {
                    const int r = 2 * s + grow[u];
                    const bool ok = r < nr && cbase + gcol[u] / static_cast<int>(sizeof(GT)) < in;
                    cp_async16(ring + soff + s * STG + 16 * (lane + 32 * u),
                               ok ? gs + r * gstride + gcol[u] : reinterpret_cast<const char *>(G), ok ? 16 : 0);
                }
            if constexpr (HW) {
                const char *ws = static_cast<const char *>(W) + (r0 * in + cbase) * wsz;
#pragma unroll
                for (int s = 0; s < BS; s++) {
                    const int r = 2 * s + wrow;
                    const bool ok = r < nr && cbase + wcol / wsz < in;
                    cp_async16(ring + soff + s * STG + GB + 16 * lane, ok ? ws + r * wstride + wcol : W, ok ? 16 : 0);
                    if (wsz == 4) {
                        const int r2 = 2 * s + wrow2;
                        const bool ok2 = r2 < nr && cbase + wcol2 / 4 < in;
                        cp_async16(ring + soff + s * STG + GB + 16 * lane + 512, ok2 ? ws + r2 * wstride + wcol2 : W,
                                   ok2 ? 16 : 0);
                    }
                }
            }
        }
        if (sj < 4 * B * K) {
            const bool ok = sok && sb < nr;
            cp_async4(sdst + soff, ok ? packed + r0 * nw + srel : packed, ok ? 4 : 0);
        }
        if (lane < B * K) {
            const bool ok = gb < nr;
            cp_async4(kdst + soff, ok ? g + gk * out + r0 + gb : g, ok ? 4 : 0);
        }
    };
    // element path (!VEC): G and W of the next step in registers (raw bits), loaded while this one is computed
    uint32_t gnx[8], wnx[8];
#pragma unroll
    for (int i = 0; i < 8; i++) gnx[i] = wnx[i] = 0u;
    auto load_elems = [&](int64_t o) {  // rows o, o + 1
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int64_t e = (o + (i >> 2)) * in + cbase + 4 * lane + (i & 3);
            const bool ok = (i & 3) < ncol && o + (i >> 2) < out;
            if constexpr (sizeof(GT) == 4) gnx[i] = ok ? __float_as_uint(__ldg(reinterpret_cast<const float *>(G) + e)) : 0u;
            else gnx[i] = ok ? __ldg(reinterpret_cast<const unsigned short *>(G) + e) : 0u;
            if constexpr (HW) {
                if (wdt == RABIT_F32) wnx[i] = ok ? __float_as_uint(__ldg(static_cast<const float *>(W) + e)) : 0u;
                else wnx[i] = ok ? __ldg(static_cast<const unsigned short *>(W) + e) : 0u;
            }
        }
    };
    if constexpr (!VEC) {
        if (nt > 0) load_elems(p * B);
    }
    // batch t of this warp: rows (p + P t) B + b, b < B, in ring stages (t % D) BS + b / 2; one commit group a batch
#pragma unroll
    for (int d = 0; d < D; d++) {
        if (d < nt) issue_batch(d, d * BS * STG);
        cp_commit();
    }
    const int64_t dstride = in * dsz;
    const bool store = dW != nullptr;  // null: dg and dh only (uniform over the grid)
    char *const dlane = store ? static_cast<char *>(dW) + (cbase + 4 * lane) * dsz : nullptr;
    for (int64_t t = 0; t < nt; t++) {
        const int64_t base = (p + P * t) * B;
        const int nr = static_cast<int>(min64(B, out - base));
        const int soff = static_cast<int>(t & (D - 1)) * BS * STG;
        cp_wait<D - 1>();  // batch t has landed (D - 1 later batches may be in flight)
        __syncwarp();      // the signs and g were copied by other lanes
        double pg[NV];     // [b K + k]; the rest stay 0
#pragma unroll
        for (int v = 0; v < NV; v++) pg[v] = 0.0;
        char *drow = store ? dlane + base * dstride : nullptr;
#pragma unroll
        for (int s = 0; s < BS; s++) {
            if (2 * s >= nr) break;  // uniform over the warp; a missing second row is all zeros
            const unsigned char *st = ringp + soff + s * STG;
            float gv[8], wv[8];
            if constexpr (VEC) {
                lds_lane8<GT>(st, lane, gv);
                if constexpr (HW) {
                    if (wdt == RABIT_F32) lds_lane8<float>(st + GB, lane, wv);
                    else if (wdt == RABIT_F16) lds_lane8<__half>(st + GB, lane, wv);
                    else lds_lane8<__nv_bfloat16>(st + GB, lane, wv);
                }
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    gv[i] = raw_to_f<GT>(gnx[i]);
                    if constexpr (HW)
                        wv[i] = wdt == RABIT_F32 ? __uint_as_float(wnx[i])
                                : wdt == RABIT_F16 ? raw_to_f<__half>(wnx[i]) : raw_to_f<__nv_bfloat16>(wnx[i]);
                }
                const int64_t nx = s + 1 < BS ? base + 2 * s + 2 : (p + P * (t + 1)) * B;
                if (nx < out && (s + 1 < BS || t + 1 < nt)) load_elems(nx);
            }
            const uint32_t *sw = reinterpret_cast<const uint32_t *>(st + SGO);  // [row][k][4]
            uint32_t nbits[2][K];  // complemented: a set bit negates
#pragma unroll
            for (int r = 0; r < 2; r++)
#pragma unroll
                for (int k = 0; k < K; k++) nbits[r][k] = ~(sw[(r * K + k) * 4 + (lane >> 3)] >> sh);
            const float *gp = reinterpret_cast<const float *>(st + GO);  // [row][k]
            double gko[2][K];
#pragma unroll
            for (int r = 0; r < 2; r++)
#pragma unroll
                for (int k = 0; k < K; k++) gko[r][k] = static_cast<double>(gp[r * K + k]);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int r = i >> 2, j = i & 3;
                const double gd = static_cast<double>(gv[i]);
#pragma unroll
                for (int k = 0; k < K; k++) {
                    const double sg = apply_sign(gd, nbits[r][k], j);
                    pg[(2 * s + r) * K + k] = __fma_rn(sg, hd[k][j], pg[(2 * s + r) * K + k]);
                    dh[k][j] = __fma_rn(sg, gko[r][k], dh[k][j]);
                }
            }
            if constexpr (HW) {
#pragma unroll
                for (int i = 0; i < 8; i++) gv[i] = __fmul_rn(gv[i], ste_factor(wv[i], ste, cst));
            }
            if (store) {
                if constexpr (VEC) {
                    if (ncol > 0) {
                        bwd_store4(drow, wdt, gv);
                        if (2 * s + 1 < nr) bwd_store4(drow + dstride, wdt, gv + 4);
                    }
                } else {
#pragma unroll
                    for (int i = 0; i < 8; i++)
                        if ((i & 3) < ncol && 2 * s + (i >> 2) < nr)
                            st_any(dW, wdt, (base + 2 * s + (i >> 2)) * in + cbase + 4 * lane + (i & 3), gv[i]);
                }
            }
            if (store) drow += 2 * dstride;
        }
        __syncwarp();  // every lane has read the batch's stages: refill them with batch t + D
        if (t + D < nt) issue_batch(t + D, soff);
        cp_commit();
        const double tot = warp_reduce_scatter<NV>(pg, lane);
        const int v = lane >> RS;
        if ((lane & ((1 << RS) - 1)) == 0 && v < B * K && v / K < nr) pdg[(ch * K + v % K) * out + base + v / K] = tot;
    }
    // dh: the block's 8 warps in warp order, through the ring's memory
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncthreads();
    double *red = reinterpret_cast<double *>(bsm);  // [kBwdWarps][K][kBwdCols]
#pragma unroll
    for (int k = 0; k < K; k++)
#pragma unroll
        for (int j = 0; j < 4; j++) red[(warp * K + k) * kBwdCols + 4 * lane + j] = dh[k][j];
    __syncthreads();
    for (int e = threadIdx.x; e < K * kBwdCols; e += kBwdThreads) {
        const int k = e / kBwdCols, cc = e % kBwdCols;
        double s = 0.0;
#pragma unroll
        for (int w = 0; w < kBwdWarps; w++) s += red[(w * K + k) * kBwdCols + cc];
        if (cbase + cc < in) pdh[(q * K + k) * in + cbase + cc] = s;
    }
}

struct BwdFinalizeArgs {
    const double *pdg, *pdh;
    int64_t n1, n2;  // K out, K in
    int64_t nch, nq;
    float *dg, *dh;
};
/* dg = the sum of the chunks' partials, dh = of the groups' partials, in a fixed order: a block takes 32 sums; warp w
   adds quarter w of a sum's partials in order (loads issued 8 at a time), then the four quarters are added in order.
   The split depends on the partial count alone, never on the launch. */
__global__ void __launch_bounds__(128) rb_backward_finalize(const BwdFinalizeArgs a) {
    __shared__ double part[4][32];
    pdl_wait();  // the partials are complete past here
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int64_t i = static_cast<int64_t>(blockIdx.x) * 32 + l;
    const bool ok = i < a.n1 + a.n2, isg = i < a.n1;
    double s = 0.0;
    if (ok) {
        const double *src = isg ? a.pdg + i : a.pdh + (i - a.n1);
        const int64_t n = isg ? a.nch : a.nq, stride = isg ? a.n1 : a.n2;
        const int64_t lo = n * w / 4, hi = n * (w + 1) / 4;
        constexpr int U = 8;
        for (int64_t c0 = lo; c0 < hi; c0 += U) {
            double v[U];
#pragma unroll
            for (int u = 0; u < U; u++) v[u] = c0 + u < hi ? src[(c0 + u) * stride] : 0.0;
#pragma unroll
            for (int u = 0; u < U; u++)
                if (c0 + u < hi) s += v[u];
        }
    }
    part[w][l] = s;
    __syncthreads();
    if (w == 0 && ok) {
        const double t = ((part[0][l] + part[1][l]) + part[2][l]) + part[3][l];
        if (isg) a.dg[i] = static_cast<float>(t);
        else a.dh[i - a.n1] = static_cast<float>(t);
    }
}

template <int K, typename GT, bool VEC, bool HW>
cudaError_t launch_backward_t(const GT *G, const void *W, rabit_dtype wdt, const float *g, const float *h,
                              const rabit_word_t *packed, int64_t out, int64_t in, rabit_ste ste, float c, void *dW,
                              float *dg, float *dh, double *ws, cudaStream_t s) {
    auto *kern = rb_backward_kernel<K, GT, VEC, HW>;
    const int wsz = HW ? (wdt == RABIT_F32 ? 4 : 2) : 0;
    const int64_t smem = max64(int64_t(kBwdWarps) * bwd_ring_steps<GT, HW>(K) * bwd_stage_bytes(K, sizeof(GT), wsz, VEC),
                               int64_t(kBwdWarps) * K * kBwdCols * 8);
    const DevInfo &di = device_info();
    if constexpr (VEC) {  // too large for this device's blocks: the element path
        if (smem > di.smem_optin)
            return launch_backward_t<K, GT, false, HW>(G, W, wdt, g, h, packed, out, in, ste, c, dW, dg, dh, ws, s);
    }
    // the shared-memory limit before the occupancy query, which depends on it; resident blocks an SM per device
    // and W size (0, 2, 4 bytes: the ring's size)
    static bool smem_set[64];
    static std::atomic<int> resident_bps[3][64];
    const cudaError_t e0 = set_smem_limit_once(kern, di.smem_optin, smem_set);
    if (e0 != cudaSuccess) return e0;
    const int bps = resident_blocks_once(kern, kBwdThreads, static_cast<size_t>(smem), resident_bps[wsz / 2]);
    // one wave: nq row groups per chunk so that nch * nq <= the resident blocks
    const int64_t nch = (in + kBwdCols - 1) / kBwdCols;
    const int64_t resident = static_cast<int64_t>(di.sms) * bps;
    const int64_t nq = max64(1, min64(resident / nch, bwd_groups_max(K, out, in)));
    double *pdg = ws, *pdh = ws + nch * K * out;
    kern<<<static_cast<unsigned>(nch * nq), kBwdThreads, static_cast<size_t>(smem), s>>>(
        G, W, wdt, g, h, packed, out, in, ste, c, dW, pdg, pdh, nch, nq);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    const BwdFinalizeArgs a{pdg, pdh, K * out, K * in, nch, nq, dg, dh};
    return launch_pdl(rb_backward_finalize, dim3(static_cast<unsigned>((a.n1 + a.n2 + 31) / 32)), 128, 0, a, s);
}

template <int K, typename GT>
cudaError_t launch_backward(const GT *G, const void *W, rabit_dtype wdt, const float *g, const float *h,
                            const rabit_word_t *packed, int64_t out, int64_t in, rabit_ste ste, float c, void *dW,
                            float *dg, float *dh, double *ws, cudaStream_t s) {
    if (out < 1 || in < 1) return cudaErrorInvalidValue;  // the glue rejects empty weights (no workspace for them)
    const bool hw = dW != nullptr && ste != RABIT_STE_IDENTITY;  // W is read only for a non-identity STE's dW
    const bool vec = in % 8 == 0 && aligned16(G) && (!dW || aligned16(dW)) && (!hw || aligned16(W));
    auto go = [&](auto v, auto w) {
        return launch_backward_t<K, GT, decltype(v)::value, decltype(w)::value>(G, W, wdt, g, h, packed, out, in, ste,
                                                                                 c, dW, dg, dh, ws, s);
    };
    using T = std::true_type;
    using F = std::false_type;
    return vec ? (hw ? go(T(), T()) : go(T(), F())) : (hw ? go(F(), T()) : go(F(), F()));
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
    if (K < 1 || out < 1 || in < 1) return 0;
    const int64_t nch = (in + kBwdCols - 1) / kBwdCols;
    return static_cast<size_t>(nch * K * out + bwd_groups_max(K, out, in) * K * in);
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
