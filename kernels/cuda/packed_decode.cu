/*
 * Packed GEMV / small GEMM for fp16/bf16 activations (M <= 16): the decode kernels of packed_linear. They share
 * the prologue front, the main-loop pipeline and the epilogue (the dispatch is decode_kernel() in
 * packed_linear.cu): the int8 kernel described here, its 1-bit variant and that variant's persistent schedule
 * (float32-level, all three bit-identical), and the fp16 kernel (x*h rounded once to fp16; its section below); besides, the opt-in int8 activation
 * class (DECODE_B1P_I8: x*h quantized to int8, ~1e-2 relative error; rabit_cuda.cuh) on the persistent kernel. See
 * docs/kernels.md ("int8 decode kernel", "1-bit variant", "fp16 decode kernel", "int8 activations on CUDA") for the
 * designs and the measured numbers.
 *
 * The int8 kernel:
 *   y[m][o] = sum_k g_k[o] * sum_j (2 b_k[o][j] - 1) * xh_k[m][j],   xh_k = h_k * x (float32)
 *           = sum_k g_k[o] * (2 * sum_j b_k[o][j] xh_k[m][j]  -  sum_j xh_k[m][j])
 *
 * b in {0, 1} is the stored bit itself: `(word >> p) & 0x01010101` puts four of them, one per byte, into
 * an int8 A register of mma.m16n8k32.s8 -- two integer instructions per four weights, half of what a
 * bf16 +-1 expansion costs, and half as many MMAs (k = 32).
 *
 * The activations are made exact integers by a prologue kernel: per 512-column group, path and row m,
 * Q = round(xh / S) with S = 2^(e - 30) and 2^e > max|xh| of the group, so |Q| <= 2^30 carries every bit
 * of the largest float32 values and at least 2^-31 * max of the rest; Q is split into four balanced
 * base-256 digits (int8), which occupy four n-columns of the MMA (n = 4m + digit). Products and sums are
 * exact in int32 (|acc| <= 512 * 128); per group the digits recombine exactly in float64,
 * value = S * (2 * sum_j b Q - sum_j Q), and the groups add in float32. So the only error besides the
 * final rounding to x's dtype is the rounding of xh to 2^-31 of its group maximum: float32-level.
 * A non-finite xh makes its group's S NaN, so the output row is NaN (never a silently finite value).
 *
 * Work split: a warp owns MT 16-row tiles and every 8th group; the bits of a group arrive as one 16-byte
 * load per (path, row) per lane, one group ahead; B fragments are read from the prologue's buffer (small,
 * L2-resident) in fragment order. The 8 warps of a block reduce through shared memory at the end.
 *
 * Layer groups: up to kDecodeMaxLayers layers that read the same x (q/k/v, gate/up) run as one prologue and one
 * main kernel. The prologue treats the layers' paths as L*K paths (path l*K + k reads layer l's h_k); the main
 * kernel's 16-row tiles are numbered over the layers in order, and a block takes its layer's pointers and its
 * fragment paths l*K .. l*K + K-1 (layer_args). Each output row is computed exactly as by a call for its layer
 * alone, so a group's outputs equal the separate calls' bit for bit; it saves the launches and the tails of
 * the small grids.
 *
 * The decoder's glue (DecodeFusion, rabit.packed_linear_fused; M <= kFusedMaxM, int8 and 1-bit kernels): the
 * prologue builds x*h from silu(x) * up and the norm's weight and writes each group's sum of u^2; the main kernels'
 * F instantiations scale their row sums by the norm's rsqrt(mean(u^2) + eps) and add the residual before the one
 * rounding (docs/kernels.md, "The glue in the MMA decode kernels").
 */
#include <cuda_runtime.h>

#include <algorithm>

#include "common.cuh"
#include "rabit_cuda.cuh"

namespace rabit_cuda {

namespace {

constexpr int kGroupCols = 512;  // columns per scale group = 16 words
constexpr int kGroupWords = kGroupCols / 32;
constexpr int kMaxNT = 8;           // n-tiles of 8 columns: 4 digits x 2 rows of x each
constexpr int kWarps = 8;
constexpr int kScaleSlots = kMaxNT * 2;  // scale and sum(Q) entries per (group, path): one per row of x

__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* Column (within its group) of byte i of the B register of lane-quad t for bit p, set s, half hh:
   word 4t + 2s + hh of the group, bit p + 8i. The A side takes the same bits from that word. */
__host__ __device__ __forceinline__ int frag_col(int t, int s, int hh, int p, int i) {
    return 32 * (4 * t + 2 * s + hh) + p + 8 * i;
}

/* Balanced base-256 digit d (0 = most significant) of q, |q| <= 2^30: q = sum_d digit_d 256^(3-d), digits
   in [-128, 127], returned as the byte of an int8. */
__device__ __forceinline__ uint32_t digit(int q, int d) {
    const int d3 = static_cast<int8_t>(q & 0xff);
    const int q1 = (q - d3) >> 8;  // exact: q - d3 is a multiple of 256
    const int d2 = static_cast<int8_t>(q1 & 0xff);
    const int q2 = (q1 - d2) >> 8;
    const int d1 = static_cast<int8_t>(q2 & 0xff);
    const int d0 = (q2 - d1) >> 8;  // |d0| <= 65
    const int v = d == 0 ? d0 : d == 1 ? d1 : d == 2 ? d2 : d3;
    return static_cast<uint32_t>(v) & 0xffu;
}

struct PrepArgs {
    const void *x;
    int xdt;
    int M;
    const void *h[kDecodeMaxLayers];  // per layer [K][in]; grid.y = layers * K, path l * K + k reads h[l][k]
    int K;                            // paths per layer
    int hdt;
    int64_t in;
    int NT;
    uint2 *frag;    // [group][L*K][frag_entries(M)], laid out per kernel: int8 [s(2)][p(8)][NT][lane(32)],
                    // 1-bit [s(2)][4M][lane], fp16 [step(32)][NT][lane], DECODE_B1P_I8 [s(2)][lane] (M = 1)
    float *scale;   // [group][L*K][kScaleSlots]: int8 uses 2*NT of them, 1-bit kB1MaxM, fp16 all (one per row of x);
                    // DECODE_B1P_I8 packs kI8Slots a (group, path) ([group][L*K][kI8Slots]: one per sub-group)
    double *qsum;   // same layout; the fp16 kernel does not read it (its prologue writes zeros)
    // the decoder's glue (DecodeFusion, rabit.packed_linear_fused): the input u = silu(x) * up where up is given,
    // else x; with norm_weight, xh = h * (u * norm_weight), and the group's sum of u^2 per row goes to
    // sumsq[group][row] (the main kernels scale their sums by the norm's rsqrt(mean(u^2) + eps): norm_scales)
    const void *up;
    const void *norm_weight;
    int ndt;
    float *sumsq;
    int act8;  // DECODE_B1P_I8 (M = 1): int8 activations, 8 planes (see gemv_b1_prep_kernel)
};

/* Blocks (group, path, part): each computes xh of the group (one column per thread), its max |.| per row and
   Q = xh / S as int32 in shared memory; part z then writes its quarter of the fragments (digits), and part 0
   the scales and sum(Q) per row. Four parts per group keep the serial digit work per thread at one fragment
   entry (for M <= 2): the main kernel waits for the whole prologue, so its latency is what counts. */
constexpr int kPrepThreads = kGroupCols;
constexpr int kPrepParts = 4;

/* Per-row state of a prologue block (in shared memory), for the rows m of x. */
struct PrepRows {
    unsigned int amax[kMaxNT * 2];      // max |xh| of the group, as float bits
    int bad[kMaxNT * 2];                // a non-finite xh in the group
    unsigned long long qs[kMaxNT * 2];  // sum(Q), two's complement int64
    float inv[kMaxNT * 2];              // 1 / S
    float nss[kPrepThreads / 32][kFusedMaxM];  // the fused RMSNorm: the warps' sums of u^2 per row
};

/* The layers' input u of rows m0 + m (m < MR), column j: x, or silu(x) * up (the fused SwiGLU); 0 for rows from M
   on and past `in`. Every row's loads are issued before any conversion: converted one at a time (ld_any), each waited for its
   load, so the MR rows' loads ran one after another after the PDL wait (SASS, nvcc 13: 16 in a row at MR = 16, 32
   with the SwiGLU; thirty-sixth session). */
template <int MR>
__device__ __forceinline__ void prep_inputs(const PrepArgs &a, int m0, int64_t j, float (&u)[kMaxNT * 2]) {
    uint32_t rx[MR], ru[MR];
#pragma unroll
    for (int m = 0; m < MR; m++) {
        const int64_t i = static_cast<int64_t>(m0 + m) * a.in + j;
        const bool in = m0 + m < a.M && j < a.in;
        rx[m] = in ? ld_raw(a.x, a.xdt, i) : 0u;  // 0: 0.0 in every dtype
        ru[m] = in && a.up ? ld_raw(a.up, a.xdt, i) : 0u;
    }
#pragma unroll
    for (int m = 0; m < MR; m++) {
        const float v = raw_to_f32(rx[m], a.xdt);
        u[m] = a.up ? __fmul_rn(silu_f(v), raw_to_f32(ru[m], a.xdt)) : v;
    }
}

/* The common front of the prologues, for this thread's column j of group gr and path k: xh = h * x per row m
   of x, the group's max |xh| per row (bad: a non-finite xh) and inv = 1/S with S = 2^(e - top), 2^e > max, so
   that Q = xh * inv is exact in float32 and |Q| < 2^top (top = 30 for the integer kernels, 15 for the fp16
   one); e >= -96 keeps 1/S finite (groups below 2^-96 keep 2^-126 absolute resolution). Ends with a barrier.
   With the fused glue, xh = h * u (u: prep_inputs), times the norm's weight where it is given; the group's sum of u^2
   per row (warps by a butterfly, then in order) then goes to sumsq from one block per group (path 0, part 0). The norm
   is linear in u once its row scale is known, so that scale is applied to the main kernels' sums (norm_scales).
   The block's rows of x are m0 .. m0 + MR - 1 (xh, amax, bad, qs, inv and the norm's sums indexed from m0; the fp16
   prologue splits the rows over blocks, the others take m0 = 0). norm_sums: whether this block (of path 0) writes its
   rows' sums of u^2 (the int8 prologue's first part; every fp16 block, one per row). */

template <int MR>
__device__ __forceinline__ void prep_front(const PrepArgs &a, int k, int64_t j, int tid, float (&xh)[kMaxNT * 2],
                                           PrepRows &sh, int top, int m0 = 0, bool norm_sums = true) {
    static_assert(MR >= 1 && MR <= kMaxNT * 2, "MR: the rows of x a prologue is built for");
    unsigned int *amax = sh.amax;
    int *bad = sh.bad;
    unsigned long long *qs = sh.qs;
    float *inv = sh.inv;
    pdl_launch_dependents();  // the main kernel may start now: it loads its bits, then waits for this grid
    if (tid < 2 * kMaxNT) {
        amax[tid] = 0u;
        bad[tid] = 0;
        qs[tid] = 0ull;
    }
    const int l = k / a.K;  // k: the path over all layers
    const float hj = j < a.in ? ld_any(pick(a.h, l), a.hdt, (k - l * a.K) * a.in + j) : 0.0f;
    const bool norm = a.norm_weight != nullptr;
    const float nw = norm && j < a.in ? ld_any(a.norm_weight, a.ndt, j) : 1.0f;
    // launched with PDL, this grid may start while the previous kernel runs: x is its output, and the workspace
    // written below may still be read by the previous linear's main kernel. h and the norm's weight, read above,
    // are weights: none of the kernels that let their dependents start early (main, attention, QAT backward) writes
    // them, and any other kernel lets this one start only at its end
    pdl_wait();
    float u2[kFusedMaxM];  // the norm's u^2 of this column per row
    float uv[kMaxNT * 2];
    prep_inputs<MR>(a, m0, j, uv);
#pragma unroll
    for (int m = 0; m < MR; m++) {
        const float u = uv[m];
        if (m < kFusedMaxM) u2[m] = __fmul_rn(u, u);
        xh[m] = (m0 + m < a.M && j < a.in) ? __fmul_rn(hj, norm ? __fmul_rn(u, nw) : u) : 0.0f;
    }
    __syncthreads();
    if (norm) {
#pragma unroll
        for (int m = 0; m < (MR < kFusedMaxM ? MR : kFusedMaxM); m++) {
            if (m0 + m >= a.M) break;
            float v = u2[m];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
            if ((tid & 31) == 0) sh.nss[tid >> 5][m] = v;
        }
    }
#pragma unroll
    for (int m = 0; m < MR; m++) {  // rows from M on are zeros: max 0, S = 1, never read
        // |v| as float bits orders like the values (non-negative), so an integer max is exact
        unsigned int mu = __float_as_uint(fabsf(xh[m]));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mu = max(mu, __shfl_xor_sync(0xffffffffu, mu, o));
        const int nf = __any_sync(0xffffffffu, !is_finite_f(xh[m]));
        if ((tid & 31) == 0) {
            atomicMax(&amax[m], mu);
            if (nf) atomicOr(&bad[m], 1);
        }
    }
    __syncthreads();
    if (tid < MR && m0 + tid < a.M) {
        int e;
        frexpf(__uint_as_float(amax[tid]), &e);
        inv[tid] = amax[tid] ? ldexpf(1.0f, top - max(e, -96)) : 1.0f;
        if (norm && blockIdx.y == 0 && norm_sums) {  // m0 + tid < M <= kFusedMaxM with the glue
            float v = 0.0f;
#pragma unroll
            for (int w = 0; w < kPrepThreads / 32; w++) v = __fadd_rn(v, sh.nss[w][tid]);
            a.sumsq[static_cast<int64_t>(blockIdx.x) * kFusedMaxM + m0 + tid] = v;
        }
    }
    __syncthreads();
}

/* sum(Q) of row m over the block's columns, exact in int64 (512 * 2^30 < 2^63), into qs[m]. */
__device__ __forceinline__ void add_qsum(int q, int tid, unsigned long long *qs_m) {
    long long sq = q;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    if ((tid & 31) == 0) atomicAdd(qs_m, static_cast<unsigned long long>(sq));
}

/* Scale S (NaN if the group had a non-finite xh: it poisons the row) and sum(Q) of rows m < Mp. */
__device__ __forceinline__ void write_scales(const PrepArgs &a, size_t o, int tid, int Mp, const PrepRows &sh) {
    if (tid < Mp) {
        float sc = 0.0f;
        if (tid < a.M) sc = sh.bad[tid] ? __int_as_float(0x7fffffff) : 1.0f / sh.inv[tid];
        a.scale[o + tid] = sc;
        a.qsum[o + tid] = static_cast<double>(static_cast<long long>(sh.qs[tid]));
    }
}

template <int MR>
__global__ void __launch_bounds__(kPrepThreads) gemv_i8_prep_kernel(const PrepArgs a) {
    __shared__ int qv[kMaxNT * 2][kGroupCols];
    __shared__ PrepRows sh;
    const int gr = blockIdx.x, k = blockIdx.y, K = gridDim.y, part = blockIdx.z, tid = threadIdx.x;
    const int64_t j = static_cast<int64_t>(gr) * kGroupCols + tid;  // this thread's column
    const int Mp = 2 * a.NT;
    float xh[kMaxNT * 2];
    prep_front<MR>(a, k, j, tid, xh, sh, 30, 0, part == 0);
#pragma unroll
    for (int m = 0; m < MR; m++) {  // Q = 0 in rows M .. MR - 1 (not read)
        const int q = __float2int_rn(xh[m] * sh.inv[m]);
        qv[m][tid] = q;
        if (part == 0) add_qsum(q, tid, &sh.qs[m]);
    }
    __syncthreads();
    // fragments: entry (s, p, nt, lane) holds, for n = 8 nt + lane/4 -> (row m = n/4, digit n%4), bytes
    // i = 0..3 of b0 (hh = 0) and b1 (hh = 1); this part writes entries [part * E/4, (part + 1) * E/4)
    const int entries = 16 * a.NT * 32, per = entries / kPrepParts;
    uint2 *dst = a.frag + (static_cast<size_t>(gr) * K + k) * entries;
    for (int e = part * per + tid; e < (part + 1) * per; e += kPrepThreads) {
        const int lane = e & 31, nt = (e >> 5) % a.NT, sp = e / (32 * a.NT);
        const int s = sp >> 3, p = sp & 7, t = lane & 3;
        const int n = nt * 8 + (lane >> 2), m = n >> 2, d = n & 3;
        uint32_t b[2] = {0u, 0u};
        if (m < a.M) {
#pragma unroll
            for (int hh = 0; hh < 2; hh++)
#pragma unroll
                for (int i = 0; i < 4; i++) b[hh] |= digit(qv[m][frag_col(t, s, hh, p, i)], d) << (8 * i);
        }
        dst[e] = make_uint2(b[0], b[1]);
    }
    if (part == 0) write_scales(a, (static_cast<size_t>(gr) * K + k) * Mp, tid, Mp, sh);
}

struct MainArgs {
    const rabit_word_t *packed;
    const void *g;
    int gdt;
    const void *bias;
    int bdt;
    void *y;
    int ydt;
    int M;
    int64_t out, nw, ngroups;
    const uint2 *frag;
    const float *scale;
    const double *qsum;
    int vec;  // rows of words allow 16-byte loads
    int KL;   // fragment paths of all layers (layers * K)
    int kb;   // this layer's first fragment path (l * K)
    // the fused glue: residual [M][out] in y's dtype (one layer only), added before the rounding; sumsq: the prologue's
    // per-group sums of u^2 of the norm (null without one), whose row scale rsqrt(sum / in + eps) scales the sums
    const void *residual;
    const float *sumsq;
    int64_t in;
    float eps;
};

/* The fused norm's partial sums, copied to shared memory (cp.async, no registers) by warp 0 after the wait for the
   prologue, while the warps' first loads are in flight (fused_loads); the epilogue waits for them (fused_ready)
   before its barrier. */
struct FusedEpilogue {
    float4 part[kFusedMaxGroups];  // the prologue's sums of u^2 per group, rows 0..3 of x
};

/* Issues the copies of the norm's partial sums and returns this thread's residual (thread idx < 16 M: row idx % 16 of
   the tile, row idx / 16 of x; 0 elsewhere), which the F kernels keep in a register until the epilogue. */
__device__ __forceinline__ float fused_loads(const MainArgs &a, int64_t row0, int tid, FusedEpilogue &fe) {
    if (a.sumsq && tid < 32) {
        for (int64_t gr = tid; gr < a.ngroups; gr += 32) cp_async16(smem_u32(&fe.part[gr]), a.sumsq + gr * kFusedMaxM, 16);
        cp_commit();
    }
    const int64_t o = row0 + (tid & 15);
    return a.residual && tid < 16 * a.M && o < a.out
               ? ld_any(a.residual, a.ydt, static_cast<int64_t>(tid >> 4) * a.out + o)
               : 0.0f;
}

__device__ __forceinline__ void fused_ready() { cp_wait<0>(); }

/* The layers of one launch: MainArgs holds what they share (and layer 0's own fields); tile0[l] is layer l's
   first 16-row tile. */
struct GroupArgs {
    MainArgs a;
    int layers;
    int64_t tile0[kDecodeMaxLayers];
    int64_t tiles;  // of all layers (the others take one tile a block)
    int blk0[kDecodeMaxLayers + 1];  // the persistent kernel: layer l's blocks are blk0[l] .. blk0[l + 1] - 1
    const rabit_word_t *packed[kDecodeMaxLayers];
    const void *g[kDecodeMaxLayers];
    const void *bias[kDecodeMaxLayers];
    void *y[kDecodeMaxLayers];
    int64_t out[kDecodeMaxLayers];
    int vec[kDecodeMaxLayers];
};

/* The arguments of the layer that owns 16-row tile `tile` (of all layers), and the tile's index in that layer.
   The main kernels are built twice: GROUPED = false for one layer reads ga.a as it is (its pointers stay kernel
   parameters, not registers: the K = 2, 3 instances are at the 128 registers that two blocks per SM allow, and
   the selected pointers would make them spill); GROUPED = true selects the block's layer. */
template <int K, bool GROUPED>
__device__ __forceinline__ MainArgs layer_args(const GroupArgs &ga, int64_t &tile) {
    if (!GROUPED) return ga.a;
    int l = 0;
#pragma unroll
    for (int i = 1; i < kDecodeMaxLayers; i++)
        if (i < ga.layers && tile >= ga.tile0[i]) l = i;
    MainArgs a = ga.a;
    a.packed = pick(ga.packed, l);
    a.g = pick(ga.g, l);
    a.bias = pick(ga.bias, l);
    a.y = pick(ga.y, l);
    a.out = pick(ga.out, l);
    a.vec = pick(ga.vec, l);
    a.kb = l * K;
    tile -= pick(ga.tile0, l);
    return a;
}

/* Index of the prologue's (group, path) entry of path k of this block's layer. */
template <int K, bool GROUPED>
__device__ __forceinline__ size_t frag_path(const MainArgs &a, int64_t grp, int k) {
    return GROUPED ? static_cast<size_t>(grp) * a.KL + a.kb + k : static_cast<size_t>(grp) * K + k;
}

template <int K, int MT>
struct Bits {
    uint4 w[K][MT][2];  // [path][m-tile][row g / g+8]: words 4t .. 4t+3 of the group
};

/* Words w0 .. w0 + 3 of a row of bits at p (zeros past the row's nw words, and where the row is past the matrix:
   !row_ok), streamed (__ldcs: each word is read once). */
__device__ __forceinline__ uint4 load_word4(const MainArgs &a, const rabit_word_t *p, bool row_ok, int64_t w0) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (row_ok) {
        if (a.vec) {
            if (w0 < a.nw) v = __ldcs(reinterpret_cast<const uint4 *>(p));
        } else {
            if (w0 < a.nw) v.x = __ldcs(p);
            if (w0 + 1 < a.nw) v.y = __ldcs(p + 1);
            if (w0 + 2 < a.nw) v.z = __ldcs(p + 2);
            if (w0 + 3 < a.nw) v.w = __ldcs(p + 3);
        }
    }
    return v;
}

/* Lane (g, t)'s bits of group gr: words 4t .. 4t+3 of rows g and g+8 of each m-tile, per path (zeros past the
   matrix); with KP >= 0 path KP's only (the others are left unset: a warp of for_each_chunk<KP> reads no other). */
template <int K, int MT, int KP = -1>
__device__ __forceinline__ void load_bits(const MainArgs &a, int64_t row0, int g, int t, int64_t gr,
                                          Bits<K, MT> &dst) {
    const int64_t w0 = gr * kGroupWords + 4 * t, nw = a.nw, out = a.out;
#pragma unroll
    for (int k = KP < 0 ? 0 : KP; k < (KP < 0 ? K : KP + 1); k++)
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int64_t o = row0 + mt * 16 + g + 8 * r;
                dst.w[k][mt][r] = load_word4(a, a.packed + (k * out + o) * nw + w0, o < out, w0);
            }
}

/* g of lane (g, t)'s rows g and g + 8 of each of the block's MT 16-row tiles, per path (0 past the matrix), as
   stored (ld_raw). The int8 and 1-bit kernels convert them (row_scales_f32) once their first bits are in flight:
   converted at the load (ld_any), each load was waited for right after it, so a lane's 2K loads ran one after another
   before the first bits were even requested (SASS, nvcc 13; thirty-sixth session). */
template <int K, int MT>
__device__ __forceinline__ void load_row_scales(const MainArgs &a, int64_t row0, int g, uint32_t (&graw)[K][MT][2]) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int64_t o = row0 + mt * 16 + g + 8 * r;
#pragma unroll
            for (int k = 0; k < K; k++) graw[k][mt][r] = o < a.out ? ld_raw(a.g, a.gdt, k * a.out + o) : 0u;
        }
}

template <int K, int MT>
__device__ __forceinline__ void row_scales_f32(const MainArgs &a, const uint32_t (&graw)[K][MT][2],
                                               float (&gk)[K][MT][2]) {
#pragma unroll
    for (int k = 0; k < K; k++)
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int r = 0; r < 2; r++) gk[k][mt][r] = raw_to_f32(graw[k][mt][r], a.gdt);
}

/* The main loop of the int8 and fp16 kernels: warp w takes groups w, w + 8, ...; the bits of its next group and the
   next chunk of B fragments (of this group, else the first of the warp's next group) are loaded one step ahead of
   the MMAs that use them, so that the loads (bits from DRAM, fragments from L2) overlap the tensor-core work.
   load_chunk(grp, c, Chunk &) reads chunk c of a group; body(gr, c, chunk, bits) does chunk c's MMAs (and the
   flush after a path's last chunk). Fully unrolled over the NCHUNK chunks of a group, so c is a constant in body.
   ready() runs once the first loads are issued, before the first body (the kernels convert their row scales there).
   KP >= 0 (K divides kWarps, and the caller passes KP = warp % K): the warp takes path KP only, of groups warp / K,
   warp / K + kWarps / K, ... (the chunks of that path: KP * NCHUNK / K ..), so that a layer of fewer groups than
   warps keeps K times as many warps busy (a 576-column layer: 2 groups, 2 of 8 warps without it). */
template <int K, int MT, int NCHUNK, bool F, class Chunk, int KP = -1, class LoadChunk, class Ready, class Body>
__device__ __forceinline__ void for_each_chunk(const MainArgs &a, int64_t row0, int g, int t, int warp,
                                               FusedEpilogue &fe, float &res, LoadChunk &&load_chunk,
                                               Ready &&ready, Body &&body) {
    static_assert(KP < 0 || kWarps % K == 0, "a path per warp: K divides the warps");
    constexpr int NC = KP < 0 ? NCHUNK : NCHUNK / K, C0 = KP < 0 ? 0 : KP * NC;  // this warp's chunks of a group
    constexpr int STEP = KP < 0 ? kWarps : kWarps / K;                             // and its next group
    static_assert(NC % 2 == 0, "the next group's first chunk must land in buffer 0");
    Bits<K, MT> cur, nxt;
    int64_t gr = KP < 0 ? warp : warp / K;
    if (gr < a.ngroups) load_bits<K, MT, KP>(a, row0, g, t, gr, cur);
    pdl_wait();  // the bits and g are in flight; the prologue's fragments and scales are complete past here
    // the kernel after (the attention after a q/k/v group) may be scheduled now; it waits for this grid's end.
    // Measured (H200, 7B shapes, batch 1): 2810.8 against 2823.4 us a step, idle time 106 against 137 us. Not in
    // the 1-bit kernel: it runs long rows (down_proj), followed by compiled glue, which is not launched with PDL
    pdl_launch_dependents();
    Chunk ch[2];
    if (gr < a.ngroups) load_chunk(gr, C0, ch[0]);
    if constexpr (F) res = fused_loads(a, row0, warp * 32 + g * 4 + t, fe);
    ready();
    for (; gr < a.ngroups; gr += STEP) {
        const bool more = gr + STEP < a.ngroups;
        if (more) load_bits<K, MT, KP>(a, row0, g, t, gr + STEP, nxt);
#pragma unroll
        for (int i = 0; i < NC; i++) {
            if (i + 1 < NC)
                load_chunk(gr, C0 + i + 1, ch[(i + 1) & 1]);
            else if (more)
                load_chunk(gr + STEP, C0, ch[(i + 1) & 1]);
            body(gr, C0 + i, ch[i & 1], cur);
        }
        if (more) cur = nxt;
    }
}

/* Epilogue of the three main kernels: the warps' partial sums red[warp][row][m] added in warp order (deterministic), the
   fused norm's row scale, the bias, the fused residual, one rounding to y's dtype. */
template <bool F, int ROWS, int MD>
__device__ __forceinline__ void store_rows(const MainArgs &a, const float (&red)[kWarps][ROWS][MD], int64_t row0,
                                           int tid, const FusedEpilogue &fe, float res) {
    static_assert(!F || ROWS * kFusedMaxM <= kWarps * 32, "the F epilogue: one output (and its residual) a thread");
    for (int idx = tid; idx < ROWS * a.M; idx += kWarps * 32) {
        const int m = idx / ROWS, rl = idx - m * ROWS;
        const int64_t o = row0 + rl;
        if (o >= a.out) continue;
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; w++) s = __fadd_rn(s, red[w][rl][m]);
        if constexpr (F) {
            if (a.sumsq) {  // the norm's row scale: the groups' sums of u^2 in order
                float ss = 0.0f;
                for (int64_t gr = 0; gr < a.ngroups; gr++) {
                    const float4 &p = fe.part[gr];
                    ss = __fadd_rn(ss, m == 0 ? p.x : m == 1 ? p.y : m == 2 ? p.z : p.w);
                }
                s = __fmul_rn(s, rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(a.in)), a.eps)));
            }
        }
        if (a.bias) s = __fadd_rn(s, ld_any(a.bias, a.bdt, o));
        if constexpr (F)
            if (a.residual) s = __fadd_rn(s, res);  // this thread's: idx = tid (ROWS * M <= 64 threads)
        st_any(a.y, a.ydt, static_cast<int64_t>(m) * a.out + o, s);
    }
}

/* F: the fused glue's epilogue (MainArgs::residual, sumsq; FusedEpilogue), a separate instantiation (M <= 4) so that
   the plain kernels' registers stay as measured. */
template <int K, int NT, int MT, bool GROUPED, bool F>
__global__ void __launch_bounds__(kWarps * 32, ((K <= 2 && NT <= 2) || (K == 3 && NT == 1)) ? 2 : 1)
    gemv_i8_kernel(const GroupArgs ga) {
    static_assert(MT == 1, "layer groups number 16-row tiles");
    __shared__ float red[kWarps][MT * 16][2 * NT];
    __shared__ FusedEpilogue fe;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    int64_t tile = blockIdx.x;
    const MainArgs a = layer_args<K, GROUPED>(ga, tile);
    const int64_t row0 = tile * MT * 16;
    constexpr int Mp = 2 * NT;

    // g of this lane's rows (g, g+8 of each m-tile), folded into every group's flush
    uint32_t graw[K][MT][2];
    load_row_scales(a, row0, g, graw);
    float gk[K][MT][2];
    float fa[MT][NT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) fa[mt][nt][0] = fa[mt][nt][1] = 0.0f;

    // digit weights of this lane's two accumulator columns n = 2t, 2t+1 (digit = n % 4)
    const double dw0 = (t & 1) ? 256.0 : 16777216.0, dw1 = (t & 1) ? 1.0 : 65536.0;

    // B fragments arrive in chunks of CH (s, p) steps (CH * NT = 8 uint2 = 16 registers), one chunk ahead of
    // the MMAs that use it, so that the fragment reads (L2) overlap the tensor-core work instead of each MMA
    // waiting for its own load. The scales of path k are read when its first chunk is consumed and used at
    // its flush, NCH chunks later.
    constexpr int CH = 8 / NT;
    constexpr int NCH = 16 / CH, NCHUNK = K * NCH;
    struct Chunk {
        uint2 b[CH][NT];
    };
    auto load_chunk = [&](int64_t grp, int c, Chunk &dst) {
        const int k = c / NCH, sp0 = (c % NCH) * CH;
        const uint2 *fp = a.frag + frag_path<K, GROUPED>(a, grp, k) * (16 * NT * 32);
        // The sums of rows m >= M are never stored, so the lanes of such a row (2 nt + 1 = M, lanes 16..31) read
        // row 2 nt's entry (lane & 15, the same 128-byte line: no added traffic) instead of a select per load (a
        // zeroing and a compare each, and registers that made nvcc re-read parameters and rebuild addresses in the
        // loop): M = 1-4 took 4-12 % less time (H200, thirty-sixth session)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const int ln = 2 * nt + (g >> 2) < a.M ? lane : (lane & 15);
#pragma unroll
            for (int j = 0; j < CH; j++) dst.b[j][nt] = __ldg(fp + ((sp0 + j) * NT + nt) * 32 + ln);
        }
    };

    double sck[NT], qsk[NT];
    int acc[MT][NT][4];
    float res = 0.0f;
    for_each_chunk<K, MT, NCHUNK, F, Chunk>(a, row0, g, t, warp, fe, res, load_chunk,
                                         [&] { row_scales_f32(a, graw, gk); },
                                         [&](int64_t gr, int c, const Chunk &cc, const Bits<K, MT> &cur) {
            const int k = c / NCH, sp0 = (c % NCH) * CH;
            if (c % NCH == 0) {
                const size_t so = frag_path<K, GROUPED>(a, gr, k) * Mp;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const int m = 2 * nt + (t >> 1);
                    sck[nt] = __ldg(a.scale + so + m);
                    qsk[nt] = __ldg(a.qsum + so + m);
                }
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
#pragma unroll
                        for (int i = 0; i < 4; i++) acc[mt][nt][i] = 0;
            }
#pragma unroll
            for (int j = 0; j < CH; j++) {
                const int s = (sp0 + j) >> 3, p = (sp0 + j) & 7;
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    const uint4 &wg = cur.w[k][mt][0], &wh = cur.w[k][mt][1];
                    constexpr uint32_t m1 = 0x01010101u;
                    const uint32_t a0 = ((s ? wg.z : wg.x) >> p) & m1, a2 = ((s ? wg.w : wg.y) >> p) & m1;
                    const uint32_t a1 = ((s ? wh.z : wh.x) >> p) & m1, a3 = ((s ? wh.w : wh.y) >> p) & m1;
#pragma unroll
                    for (int nt = 0; nt < NT; nt++) mma_s8(acc[mt][nt], a0, a1, a2, a3, cc.b[j][nt].x, cc.b[j][nt].y);
                }
            }
            if (c % NCH == NCH - 1) {
                // flush path k of the group: recombine the digits exactly, scale, times g, add in float32
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
#pragma unroll
                        for (int r = 0; r < 2; r++) {
                            double v = static_cast<double>(acc[mt][nt][2 * r]) * dw0 +
                                       static_cast<double>(acc[mt][nt][2 * r + 1]) * dw1;
                            v += __shfl_xor_sync(0xffffffffu, v, 1);
                            const float val = static_cast<float>(sck[nt] * (2.0 * v - qsk[nt]));
                            fa[mt][nt][r] = __fmaf_rn(gk[k][mt][r], val, fa[mt][nt][r]);
                        }
            }
        });

    // epilogue: the warps' partial sums in warp order through shared memory, bias, one rounding
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int r = 0; r < 2; r++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                if ((t & 1) == 0) red[warp][mt * 16 + g + 8 * r][2 * nt + (t >> 1)] = fa[mt][nt][r];
    if constexpr (F) fused_ready();
    __syncthreads();
    store_rows<F>(a, red, row0, tid, fe, res);
}

/* ---------------------------------------------------------------------------------------------------------
 * Binary variant (M <= kB1MaxM): the same exact integers Q, as 32 bit planes, against the stored bits with the
 * native 1-bit tensor-core MMA (mma.m16n8k256 .b1, AND + POPC; BMMA on sm_80/sm_90):
 *   sum_j b_j Q_j = sum_p w_p popc(b AND plane_p(Q)),  w_p = 2^p (p < 31), w_31 = -2^31 (two's complement).
 * The A registers are the packed words themselves (no expansion instruction at all), one MMA covers 16 rows x
 * 256 columns x 8 planes, and the popcounts are exact in int32 (<= 512 per group). Per group the planes
 * recombine exactly in float64 to the same sum as the int8 kernel's digits, so both kernels give bit-identical
 * outputs (tested); only the instruction count differs (the int8 kernel: 2 integer instructions per 4
 * weights to build its A operand, 16 MMAs per 512 columns and path).
 * MMA n-index = 32 m + p (row m of x, plane p); k-index t*32 + i (b0) and 128 + t*32 + i (b1) of step s are
 * columns 32 (4t + 2s) + i and 32 (4t + 2s + 1) + i of the group: the words lane (g, t) already holds.
 * ------------------------------------------------------------------------------------------------------- */
__device__ __forceinline__ void mma_b1(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* One k128 half of mma_b1: the same fragments' (a0, a1) or (a2, a3) and b0 or b1. */
__device__ __forceinline__ void mma_b1_k128(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
}

/* The int8 activation class's scales and sum(Q) per (group, path): one per sub-group of 128 columns. */
constexpr int kI8Slots = 4;
static_assert(kI8Slots <= kScaleSlots, "the workspace holds kScaleSlots scales a (group, path)");

/* Blocks (group, path) of 512 threads, one column each. Warp w's ballot of bit p of Q over its 32 columns is
   word w of plane p; lane p keeps it and stores it where the main kernel's lane (g, t) reads it as b0/b1 of
   step s: fragment [group][K][s][nt][lane] (uint2), n = 32 m + p = 8 nt + g, w = 4t + 2s + hh. */
template <int MR>
__global__ void __launch_bounds__(kPrepThreads) gemv_b1_prep_kernel(const PrepArgs a) {
    static_assert(MR <= kB1MaxM, "the 1-bit kernels take M <= kB1MaxM");
    __shared__ PrepRows sh;
    const int gr = blockIdx.x, k = blockIdx.y, K = gridDim.y, tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int64_t j = static_cast<int64_t>(gr) * kGroupCols + tid;
    const int NTB = 4 * a.M;
    float xh[kMaxNT * 2];
    prep_front<MR>(a, k, j, tid, xh, sh, 30);
    const int t = w >> 2, s = (w >> 1) & 1, hh = w & 1;
    if (a.act8) {
        /* DECODE_B1P_I8: the int8 activation class (llama.cpp's Q8 kind, M = 1) with a scale per sub-group of 128
           columns, sb = w & 3: the warps 4t + sb (32 columns each), whose bits are one k128 half (hh) of MMA step s.
           S = amax / 127 of the sub-group, Q = rint(xh * (127 / amax)) in [-127, 127] (0 where amax < 2^-120), its 8
           bit planes (plane 7: -128) as one n-tile, fragment [group][K][s][lane] (64 uint2); S and sum(Q) per
           sub-group in the scale slots ([group][K][kI8Slots]). A non-finite xh anywhere in the group makes every S
           of it NaN. */
        const int sb = w & 3;
        unsigned int mu = __float_as_uint(fabsf(xh[0]));  // bits of a non-negative float order like its value
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mu = max(mu, __shfl_xor_sync(0xffffffffu, mu, o));
        if (lane == 0) atomicMax(&sh.amax[1 + sb], mu);
        __syncthreads();
        const float amax = __uint_as_float(sh.amax[1 + sb]);
        const bool zero = !(amax >= 0x1p-120f);  // also a NaN max (bad: the scale is NaN anyway)
        const float inv = zero ? 0.0f : __fdiv_rn(127.0f, amax);
        const int q = __float2int_rn(__fmul_rn(xh[0], inv));
        add_qsum(q, tid, &sh.qs[1 + sb]);
        uint32_t mine = 0u;
#pragma unroll
        for (int p = 0; p < 8; p++) {
            const uint32_t word = __ballot_sync(0xffffffffu, (static_cast<uint32_t>(q) >> p) & 1u);
            if (lane == p) mine = word;
        }
        uint32_t *d8 = reinterpret_cast<uint32_t *>(a.frag + (static_cast<size_t>(gr) * K + k) * 2 * 32);
        if (lane < 8) d8[(s * 32 + lane * 4 + t) * 2 + hh] = mine;
        __syncthreads();
        if (tid < kI8Slots) {
            const size_t o = (static_cast<size_t>(gr) * K + k) * kI8Slots + tid;
            const float am = __uint_as_float(sh.amax[1 + tid]);
            a.scale[o] = sh.bad[0] ? __int_as_float(0x7fffffff) : !(am >= 0x1p-120f) ? 0.0f : __fdiv_rn(am, 127.0f);
            a.qsum[o] = static_cast<double>(static_cast<long long>(sh.qs[1 + tid]));
        }
        return;
    }
    uint32_t *dst = reinterpret_cast<uint32_t *>(a.frag + (static_cast<size_t>(gr) * K + k) * 2 * NTB * 32);
#pragma unroll
    for (int m = 0; m < MR; m++) {  // MR = M here (1 or 2): every row's planes are read
        const int q = __float2int_rn(xh[m] * sh.inv[m]);  // 0 past `in` (xh = 0 there)
        add_qsum(q, tid, &sh.qs[m]);
        uint32_t mine = 0u;
#pragma unroll
        for (int p = 0; p < 32; p++) {
            const uint32_t word = __ballot_sync(0xffffffffu, (static_cast<uint32_t>(q) >> p) & 1u);
            if (lane == p) mine = word;
        }
        const int n = 32 * m + lane, nt = n >> 3, g = n & 7;
        dst[((s * NTB + nt) * 32 + g * 4 + t) * 2 + hh] = mine;
    }
    __syncthreads();
    write_scales(a, (static_cast<size_t>(gr) * K + k) * kB1MaxM, tid, kB1MaxM, sh);
}

/* Lane (g, t)'s part of row g + 8r's sum from the four n-tiles of BMMA accumulators of one row of x: planes 8 ntl + 2t
   and 8 ntl + 2t + 1 with weights 2^plane, plane 31 -2^31, i.e. 2^(2t) sum_ntl 2^(8 ntl) (c0 + w1 c1), w1 = 2 (-2 for
   ntl = 3 at t = 3). The same integer in two int32 halves (popcounts <= 512: |c0 + w1 c1| <= 1536, |half| <
   2^19) joined in float64: exact (|v| < 2^42). In int64 it cost ~20 instructions a row, in eight float64 FMAs more. */
__device__ __forceinline__ double b1_recombine(const int (&a0)[4], const int (&a1)[4], const int (&a2)[4],
                                               const int (&a3)[4], int r, int t) {
    const int e0 = a0[2 * r] + 2 * a0[2 * r + 1], e1 = a1[2 * r] + 2 * a1[2 * r + 1];
    const int e2 = a2[2 * r] + 2 * a2[2 * r + 1], e3 = a3[2 * r] + (t == 3 ? -2 : 2) * a3[2 * r + 1];
    const int lo = e0 + e1 * 256, hi = e2 + e3 * 256;
    return __fma_rn(static_cast<double>(hi), 65536.0, static_cast<double>(lo)) * static_cast<double>(1 << (2 * t));
}

/* One 16-row tile per block, 8 warps over the groups (as the int8 kernel). Per (group, path): 2 steps x 4M
   n-tiles of BMMA, then the planes recombine in float64 and the 4 lanes of a quad (t) add their planes. The B
   fragments of the next (group, path) are loaded before the MMAs of this one. */
// two blocks per SM where the registers allow it without spills (K = 4 at M = 1 would spill at 128 registers)
template <int K, int M, bool GROUPED, bool F>
__global__ void __launch_bounds__(kWarps * 32, (M == 1 && K <= 3) ? 2 : 1) gemv_b1_kernel(const GroupArgs ga) {
    constexpr int NTB = 4 * M;
    __shared__ float red[kWarps][16][M];
    __shared__ FusedEpilogue fe;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    int64_t tile = blockIdx.x;
    const MainArgs a = layer_args<K, GROUPED>(ga, tile);
    const int64_t row0 = tile * 16;

    auto load = [&](int64_t gr, Bits<K, 1> &dst) { load_bits(a, row0, g, t, gr, dst); };
    struct Frag {
        uint2 b[2][NTB];
    };
    auto load_frag = [&](int64_t gr, int k, Frag &dst) {
        const uint2 *fp = a.frag + frag_path<K, GROUPED>(a, gr, k) * (2 * NTB * 32) + lane;
#pragma unroll
        for (int s = 0; s < 2; s++)
#pragma unroll
            for (int nt = 0; nt < NTB; nt++) dst.b[s][nt] = __ldg(fp + (s * NTB + nt) * 32);
    };

    uint32_t graw[K][1][2];
    load_row_scales(a, row0, g, graw);
    float fa[M][2];
#pragma unroll
    for (int m = 0; m < M; m++) fa[m][0] = fa[m][1] = 0.0f;

    Bits<K, 1> cur, nxt;
    int64_t gr = warp;
    if (gr < a.ngroups) load(gr, cur);
    pdl_wait();  // the bits and g are in flight; the prologue's fragments and scales are complete past here
    Frag fr[2];
    if (gr < a.ngroups) load_frag(gr, 0, fr[0]);
    float res = 0.0f;
    if constexpr (F) res = fused_loads(a, row0, tid, fe);
    float gk[K][1][2];
    row_scales_f32(a, graw, gk);
    for (; gr < a.ngroups; gr += kWarps) {
        const bool more = gr + kWarps < a.ngroups;
        if (more) load(gr + kWarps, nxt);
#pragma unroll
        for (int k = 0; k < K; k++) {
            Frag &f = fr[k & 1];  // K is unrolled: (group, path) items alternate buffers within a group...
            if (k + 1 < K)
                load_frag(gr, k + 1, fr[(k + 1) & 1]);
            else if (more)
                load_frag(gr + kWarps, 0, fr[(k + 1) & 1]);  // ...and K even/odd is fixed, see below
            const size_t so = frag_path<K, GROUPED>(a, gr, k) * kB1MaxM;
            double sck[M], qsk[M];
#pragma unroll
            for (int m = 0; m < M; m++) {
                sck[m] = __ldg(a.scale + so + m);
                qsk[m] = __ldg(a.qsum + so + m);
            }
            int acc[NTB][4];
#pragma unroll
            for (int nt = 0; nt < NTB; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
            const uint4 &wg = cur.w[k][0][0], &wh = cur.w[k][0][1];
#pragma unroll
            for (int s = 0; s < 2; s++)
#pragma unroll
                for (int nt = 0; nt < NTB; nt++)
                    mma_b1(acc[nt], s ? wg.z : wg.x, s ? wh.z : wh.x, s ? wg.w : wg.y, s ? wh.w : wh.y,
                           f.b[s][nt].x, f.b[s][nt].y);
#pragma unroll
            for (int m = 0; m < M; m++)
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    double v = b1_recombine(acc[4 * m], acc[4 * m + 1], acc[4 * m + 2], acc[4 * m + 3], r, t);
                    v += __shfl_xor_sync(0xffffffffu, v, 1);  // exact: integers below 2^53
                    v += __shfl_xor_sync(0xffffffffu, v, 2);
                    const float val = static_cast<float>(sck[m] * (2.0 * v - qsk[m]));
                    fa[m][r] = __fmaf_rn(gk[k][0][r], val, fa[m][r]);
                }
        }
        if constexpr (K % 2 == 1) {
            // odd K: the next group's path 0 went to buffer K & 1 = 1; move it to buffer 0
            fr[0] = fr[1];
        }
        if (more) cur = nxt;
    }

    // epilogue as in the int8 kernel: warps in order through shared memory, bias, one rounding
    if (t == 0) {
#pragma unroll
        for (int m = 0; m < M; m++)
#pragma unroll
            for (int r = 0; r < 2; r++) red[warp][g + 8 * r][m] = fa[m][r];
    }
    if constexpr (F) fused_ready();
    __syncthreads();
    store_rows<F>(a, red, row0, tid, fe, res);
}

/* ---------------------------------------------------------------------------------------------------------
 * Persistent 1-bit kernel (M = 1; RABIT_CUDA_DECODE=b1p, and by default where decode_b1p_default): the 1-bit
 * kernel's arithmetic, bit for bit, with a schedule that keeps each block busy (P8: the int8 activation class's own
 * arithmetic instead, DECODE_B1P_I8). The kernels above run one 16-row
 * tile per block: load the bits, wait, 16-32 MMAs, reduce, store; at 7B shapes a block lives a few microseconds,
 * mostly waiting, and every tile re-reads its groups' fragments from L2 (twice the bytes of the bits). Here a grid of
 * as many blocks as fit on the SMs at once takes the tiles:
 *   - each layer of a group gets a share of the blocks in proportion to its tiles (blk0), and block b of layer l
 *     takes that layer's tiles b, b + nb, ...: a block needs the fragments of its own layer's K paths only;
 *   - warp w takes groups w, w + 8, ... of every tile. After the PDL wait it copies the prologue's fragments of
 *     those groups and K paths (2 KB each at M = 1) into shared memory once, and its MMAs read their B registers
 *     from there for every tile; the warp waits for its own copies only;
 *   - the bits and row scales of the warp's next (tile, group) are loaded while the MMAs of the current one run;
 *   - the warps' partial sums go through a double-buffered shared array, one block barrier per tile, and warp 0's
 *     lanes 0..15 run the epilogue (the warps' sums in warp order, the norm's scale, bias, residual: store_rows'
 *     order); they load the next tile's bias and residual right after.
 * Where the fragments do not fit in shared memory (decode_b1p_applies), or at M = 2, the 1-bit kernel runs.
 * ------------------------------------------------------------------------------------------------------- */
constexpr int kB1PFragEntries = 2 * 4 * 32;  // uint2 per (group, path) at M = 1: 2 steps x 4 n-tiles x 32 lanes
constexpr size_t kB1PStaticSmem = sizeof(float) * 2 * kWarps * 16 + sizeof(FusedEpilogue);

size_t b1p_smem_bytes(int64_t ngroups, int K, bool p8 = false) {
    return static_cast<size_t>(ngroups) * K * (p8 ? 2 * 32 : kB1PFragEntries) * sizeof(uint2);
}

/* Blocks of the persistent kernel an SM's shared memory holds (1 KB a block reserved by the system on sm_80/sm_90). */
int64_t b1p_blocks_per_sm(size_t smem) {
    return device_info().smem_per_sm / static_cast<int64_t>(smem + kB1PStaticSmem + 1024);
}

template <int K>
struct B1Item {  // a warp's share of one (tile, group): the bits and the tile's row scales as stored (ld_raw)
    Bits<K, 1> b;
    uint32_t graw[K][2];
};

template <int K, bool GROUPED, bool F, bool P8 = false>
__global__ void __launch_bounds__(kWarps * 32, K <= 3 ? 2 : 1) gemv_b1p_kernel(const GroupArgs ga) {
    // P8 (DECODE_B1P_I8): the int8 activation class's 8 planes, one n-tile: 64 uint2 a (group, path)
    constexpr int FE = P8 ? 2 * 32 : kB1PFragEntries;
    extern __shared__ __align__(16) uint2 sfrag[];  // [group][path of the block's layer][s][nt][lane]
    __shared__ float red[2][kWarps][16];
    __shared__ FusedEpilogue fe;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    // the block's layer l (blocks blk0[l] .. blk0[l + 1] - 1), its tiles bl, bl + nb, ... of that layer's ltiles
    int l = 0;
    if constexpr (GROUPED) {
#pragma unroll
        for (int i = 1; i < kDecodeMaxLayers; i++)
            if (i < ga.layers && static_cast<int>(blockIdx.x) >= ga.blk0[i]) l = i;
    }
    int64_t first = pick(ga.tile0, l);
    const MainArgs a = layer_args<K, GROUPED>(ga, first);  // first = 0: layer-local tile numbers from here
    const int bl = static_cast<int>(blockIdx.x) - pick(ga.blk0, l), nb = pick(ga.blk0, l + 1) - pick(ga.blk0, l);
    const int64_t ltiles = (a.out + 15) / 16;
    const int64_t ntile = ltiles > bl ? (ltiles - 1 - bl) / nb + 1 : 0;
    const int64_t ngroups = a.ngroups;
    const int ngw = warp < ngroups ? static_cast<int>((ngroups - 1 - warp) / kWarps) + 1 : 0;  // groups a tile

    // a warp's item (i, gi): the block's tile i, the warp's group gi (group warp + 8 gi), loaded in that order
    // (load_next). The next item's bits pointer pt (the warp's rows of tile ni, group 0) and row ot advance a tile at
    // a time instead of being rebuilt from products per item: the 64-bit index math and the bounds branches were
    // most of the loop's instructions (ncu, H200, thirty-sixth session)
    const int64_t nw = a.nw, path_words = a.out * nw, half_words = 8 * nw, tile_words = nb * 16 * nw;
    int64_t ni = 0, ot = static_cast<int64_t>(bl) * 16 + g;
    int ngi = 0;
    const rabit_word_t *pt = a.packed + ot * nw + 4 * t;
    auto load_next = [&](B1Item<K> &dst) {
        const int64_t gw = static_cast<int64_t>(warp + kWarps * ngi) * kGroupWords;
        const rabit_word_t *p = pt + gw;
        int64_t dr0 = 0, dr1 = 8;  // the rows read: ot + dr0 and ot + dr1
        if (a.vec && ot + 8 < a.out && gw + 4 * t + 4 <= nw) {  // both rows inside, 16-byte words inside the row
#pragma unroll
            for (int k = 0; k < K; k++) {
                dst.b.w[k][0][0] = __ldcs(reinterpret_cast<const uint4 *>(p + k * path_words));
                dst.b.w[k][0][1] = __ldcs(reinterpret_cast<const uint4 *>(p + k * path_words + half_words));
            }
        } else {  // rows past the matrix read row out - 1: their sums are never stored
            dr0 = min(int64_t{0}, a.out - 1 - ot);
            dr1 = min(int64_t{8}, a.out - 1 - ot);
#pragma unroll
            for (int k = 0; k < K; k++) {
                dst.b.w[k][0][0] = load_word4(a, p + k * path_words + dr0 * nw, true, gw + 4 * t);
                dst.b.w[k][0][1] = load_word4(a, p + k * path_words + dr1 * nw, true, gw + 4 * t);
            }
        }
#pragma unroll
        for (int k = 0; k < K; k++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                dst.graw[k][r] = ld_raw(a.g, a.gdt, k * a.out + ot + (r ? dr1 : dr0));
            }
        if (++ngi == ngw) {
            ngi = 0;
            ni++;
            pt += tile_words;
            ot += nb * 16;
        }
    };
    B1Item<K> cur, nxt;
    if (ntile > 0 && ngw > 0) load_next(cur);
    pdl_wait();  // the first bits are in flight; the prologue's fragments and scales are complete past here
    pdl_launch_dependents();
    // this warp's groups' fragments of the layer's K paths: 2 KB a (group, path), 4 16-byte copies a lane (P8: 512
    // bytes, one copy)
    for (int gi = 0; gi < ngw; gi++) {
        const int64_t gr = warp + kWarps * gi;
#pragma unroll
        for (int k = 0; k < K; k++) {
            const uint4 *src = reinterpret_cast<const uint4 *>(a.frag + frag_path<K, GROUPED>(a, gr, k) * FE);
            uint2 *dst = sfrag + (gr * K + k) * FE;
#pragma unroll
            for (int j = 0; j < FE / 64; j++)
                cp_async16(smem_u32(dst + 2 * (j * 32 + lane)), src + j * 32 + lane, 16);
        }
    }
    if (F && a.sumsq && warp == 0)
        for (int64_t gr = lane; gr < ngroups; gr += 32) cp_async16(smem_u32(&fe.part[gr]), a.sumsq + gr * kFusedMaxM, 16);
    cp_commit();
    cp_wait<0>();
    __syncwarp();  // the warp's copies, issued by its lanes, are visible to all of them

    // the epilogue's operands (threads 0..15, row tid of the tile): the norm's row scale, computed once as
    // store_rows computes it, and the bias and residual of the block's next tile
    float nscale = 1.0f, eb = 0.0f, er = 0.0f;
    auto load_epi = [&](int64_t i) {
        const int64_t o = (bl + i * nb) * 16 + tid;
        if (o < a.out) {
            if (a.bias) eb = ld_any(a.bias, a.bdt, o);
            if (F && a.residual) er = ld_any(a.residual, a.ydt, o);
        }
    };
    if (tid < 16) {
        if constexpr (F) {
            if (a.sumsq) {
                float ss = 0.0f;
                for (int64_t gr = 0; gr < ngroups; gr++) ss = __fadd_rn(ss, fe.part[gr].x);
                nscale = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(a.in)), a.eps));
            }
        }
        if (ntile > 0) load_epi(0);
    }

    for (int64_t i = 0; i < ntile; i++) {
        float fa[2] = {0.0f, 0.0f};
        for (int gi = 0; gi < ngw; gi++) {
            if (ni < ntile) load_next(nxt);
            const int64_t gr = warp + kWarps * gi;
#pragma unroll
            for (int k = 0; k < K; k++) {
                const uint2 *sf = sfrag + (gr * K + k) * FE + lane;
                const uint4 &wk = cur.b.w[k][0][0], &wh = cur.b.w[k][0][1];
                if constexpr (P8) {
                    // planes 2t, 2t + 1 of rows g, g + 8: weights 2^p, plane 7 -128; a sub-group's plane sums exact in
                    // int32 (|v| < 2^15), scaled by its S in float32, the lanes of a quad (t) summed, sum(Q) after
                    const size_t s8 = frag_path<K, GROUPED>(a, gr, k) * kI8Slots;
                    const int w0 = 1 << (2 * t), w1 = t == 3 ? -128 : 2 << (2 * t);
                    float sc[kI8Slots], off = 0.0f;
#pragma unroll
                    for (int j = 0; j < kI8Slots; j++) {
                        sc[j] = __ldg(a.scale + s8 + j);
                        off = __fmaf_rn(sc[j], static_cast<float>(__ldg(a.qsum + s8 + j)), off);
                    }
                    int a4[kI8Slots][4];
#pragma unroll
                    for (int j = 0; j < kI8Slots; j++) a4[j][0] = a4[j][1] = a4[j][2] = a4[j][3] = 0;
#pragma unroll
                    for (int st = 0; st < 2; st++) {
                        const uint2 b = sf[st * 32];
                        mma_b1_k128(a4[2 * st], st ? wk.z : wk.x, st ? wh.z : wh.x, b.x);
                        mma_b1_k128(a4[2 * st + 1], st ? wk.w : wk.y, st ? wh.w : wh.y, b.y);
                    }
#pragma unroll
                    for (int r = 0; r < 2; r++) {
                        float f = 0.0f;
#pragma unroll
                        for (int j = 0; j < kI8Slots; j++)
                            f = __fmaf_rn(sc[j], static_cast<float>(2 * (a4[j][2 * r] * w0 + a4[j][2 * r + 1] * w1)), f);
                        f = __fadd_rn(f, __shfl_xor_sync(0xffffffffu, f, 1));
                        f = __fadd_rn(f, __shfl_xor_sync(0xffffffffu, f, 2));
                        fa[r] = __fmaf_rn(raw_to_f32(cur.graw[k][r], a.gdt), __fsub_rn(f, off), fa[r]);
                    }
                } else {
                    const size_t so = frag_path<K, GROUPED>(a, gr, k) * kB1MaxM;
                    const double sck = __ldg(a.scale + so), qsk = __ldg(a.qsum + so);
                    int acc[4][4];
#pragma unroll
                    for (int nt = 0; nt < 4; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
#pragma unroll
                    for (int s = 0; s < 2; s++)
#pragma unroll
                        for (int nt = 0; nt < 4; nt++) {
                            const uint2 b = sf[(s * 4 + nt) * 32];
                            mma_b1(acc[nt], s ? wk.z : wk.x, s ? wh.z : wh.x, s ? wk.w : wk.y, s ? wh.w : wh.y, b.x,
                                   b.y);
                        }
#pragma unroll
                    for (int r = 0; r < 2; r++) {
                        double v = b1_recombine(acc[0], acc[1], acc[2], acc[3], r, t);
                        v += __shfl_xor_sync(0xffffffffu, v, 1);  // exact: integers below 2^53
                        v += __shfl_xor_sync(0xffffffffu, v, 2);
                        const float val = static_cast<float>(sck * (2.0 * v - qsk));
                        fa[r] = __fmaf_rn(raw_to_f32(cur.graw[k][r], a.gdt), val, fa[r]);
                    }
                }
            }
            cur = nxt;
        }
        const int buf = static_cast<int>(i & 1);
        if (t == 0) {
            red[buf][warp][g] = fa[0];
            red[buf][warp][g + 8] = fa[1];
        }
        __syncthreads();
        if (tid < 16) {
            const int64_t o = (bl + i * nb) * 16 + tid;
            if (o < a.out) {
                float s = 0.0f;
#pragma unroll
                for (int w = 0; w < kWarps; w++) s = __fadd_rn(s, red[buf][w][tid]);
                if constexpr (F)
                    if (a.sumsq) s = __fmul_rn(s, nscale);
                if (a.bias) s = __fadd_rn(s, eb);
                if constexpr (F)
                    if (a.residual) s = __fadd_rn(s, er);
                st_any(a.y, a.ydt, o, s);
            }
            if (i + 1 < ntile) load_epi(i + 1);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * fp16 variant (the batched decode kernel, M >= kF16MinM): one rounding of the activations instead of exact
 * integers. Per 512-column group, path and row m the prologue writes Q = fp16(xh * 2^(15 - e)), 2^e > max |xh|
 * of the group (|Q| <= 2^15 after rounding: no overflow; 11 significant bits for every value down to 2^-14 of the maximum), and
 * the main kernel multiplies Q by the +-1 weights on the fp16 tensor cores (mma.m16n8k16, float32 accumulation,
 * exact products):
 *   y[m][o] = sum_k g_k[o] * sum_groups S * sum_j (+-1) Q_j,   S = 2^(e - 15).
 * A operand: `((w << s) & 0x80008000) ^ 0xBC00BC00` turns bits 15 - s and 31 - s of a packed word into +-1.0 in
 * the two halves of a register (set bit = +1): 2 instructions per 2 weights, but one MMA serves 8 rows of x
 * (n = m), where the int8 kernel spends 4 n-columns per row on the digits (n = 4m + d): at M = 16 that is 2
 * MMAs per 16 columns instead of 8 per 32, and no float64 flush. Accuracy: that of rounding x*h once to fp16
 * (2^-11 relative per term), the class of the prefill kernel and of a dense fp16 layer, not the float32 level
 * of the integer kernels; tests/test_cuda.py holds it to rabit.reference.round_activations_f16.
 * Step st = 16 q + s (q = 0, 1; s = 0..15) of a group: lane (g, t)'s A registers take bits 15 - s and 31 - s of
 * words 4t + 2q (k = 2t, 2t + 1) and 4t + 2q + 1 (k = 2t + 8, 2t + 9) of rows g (a0, a2) and g + 8 (a1, a3); its
 * B registers hold Q of the same columns for row m = 8 nt + g.
 * ------------------------------------------------------------------------------------------------------- */
constexpr int kF16Steps = 32;   // k16 steps per group and path
constexpr int kF16Pitch = 545;  // shared row pitch: 1 mod 32, room for one pad word per 32 columns

__host__ __device__ __forceinline__ int f16_col(int t, int q, int hh, int bit) { return 32 * (4 * t + 2 * q + hh) + bit; }

/* Two fp16 +-1.0 from bits 15 - s and 31 - s of w: set bit = +1. */
__device__ __forceinline__ uint32_t pm1_f16(uint32_t w, int s) {
    // one shift and one LOP3 ((a & b) ^ c, immLut 0x6a), written out: from the expression above nvcc 13 built the
    // register with ~3.4 instructions (ncu, H200, thirty-fifth session); this made the kernel 5-13 % faster
    uint32_t r;
    asm("lop3.b32 %0, %1, 0x80008000, 0xBC00BC00, 0x6a;\n" : "=r"(r) : "r"(w << s));
    return r;
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
}

/* Rows of x a block of the fp16 prologue takes (blockIdx.z: the block's row of the n-tiles' 8 NT rows; a divisor
   of 8, so that a block's rows are lanes of one n-tile). One block for all rows ran every row's reductions and
   fragments in one block per (group, path): at M = 16 the prologue took 9.4 us at 576 x 576 (ncu, alone), bound by
   its own 1,414 instructions a warp on 4 SMs (thirty-seventh session). H200, one call (thirty-eighth session,
   bench_kernels_NVIDIA_H200_2026-11-29_s38-rb{1,2,8}*.json and ..._s38-tree*.json for 4), µs at 576 x 576 M = 8 /
   16 and 4096 x 4096 M = 8 / 16, 1 / 2 / 4 / 8 rows a block: 4.03 / 4.33 / 4.86 / 6.15, 5.47 / 5.72 / 6.26 / 7.52,
   6.32 / 7.19 / 8.59 / 10.10, 9.03 / 9.50 / 10.70 / 12.23 (one block for all rows: 6.45, 10.59, 10.49, 14.58); one
   row was the fastest at 25 of the 28 shapes and batches, 2 rows by up to 10 % at three layers of 8192+ columns at
   M = 16. */
constexpr int kF16PrepRows = 1;

/* Blocks (group, path, rows) of 512 threads, one column each: xh of rows m0 .. m0 + RB - 1, their scales, xh / S
   in shared memory (padded: a warp's fragment reads hit at most 2 lanes per bank), then their fragment entries of
   [group][K][step][NT][lane] (lanes 4 (m % 8) .. 4 (m % 8) + 3 of n-tile m / 8 hold row m) and scale slots; the last
   block also the slots past the n-tiles' rows. Rows from M on: zero entries. */
template <int RB>
__global__ void __launch_bounds__(kPrepThreads) gemv_f16_prep_kernel(const PrepArgs a) {
    static_assert(8 % RB == 0, "a block's rows lie in one n-tile");
    __shared__ float qv[RB][kF16Pitch];
    __shared__ PrepRows sh;
    const int gr = blockIdx.x, k = blockIdx.y, K = gridDim.y, tid = threadIdx.x, m0 = blockIdx.z * RB;
    const int64_t j = static_cast<int64_t>(gr) * kGroupCols + tid;
    float xh[kMaxNT * 2];
    if (m0 < a.M) {
        prep_front<RB>(a, k, j, tid, xh, sh, 15, m0);
#pragma unroll
        for (int m = 0; m < RB; m++) {
            qv[m][tid + (tid >> 5)] = xh[m] * sh.inv[m];  // exact (a power of two); rounded to fp16 below
        }
    } else {  // rows from M on only (z spans the n-tiles' 8 NT rows): zero entries and slots, no loads or reductions
        pdl_launch_dependents();
        pdl_wait();  // the previous kernel may still read the workspace
    }
    __syncthreads();
    uint2 *dst = a.frag + (static_cast<size_t>(gr) * K + k) * (kF16Steps * a.NT * 32);
    for (int e = tid; e < kF16Steps * RB * 4; e += kPrepThreads) {
        const int t = e & 3, r = (e >> 2) % RB, st = e / (4 * RB);
        const int m = m0 + r, q = st >> 4, s = st & 15;
        uint32_t b[2] = {0u, 0u};
        if (m < a.M) {
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                const int c0 = f16_col(t, q, hh, 15 - s), c1 = f16_col(t, q, hh, 31 - s);
                b[hh] = pack_half2(qv[r][c0 + (c0 >> 5)], qv[r][c1 + (c1 >> 5)]);
            }
        }
        dst[(st * a.NT + (m >> 3)) * 32 + ((m & 7) << 2 | t)] = make_uint2(b[0], b[1]);
    }
    const size_t o = (static_cast<size_t>(gr) * K + k) * kScaleSlots;
    if (tid < RB) {  // the fp16 kernel reads no sum(Q): zeros
        a.scale[o + m0 + tid] = m0 + tid < a.M ? (sh.bad[tid] ? __int_as_float(0x7fffffff) : 1.0f / sh.inv[tid]) : 0.0f;
        a.qsum[o + m0 + tid] = 0.0;
    }
    const int tail = a.NT * 8;  // the slots past the n-tiles' rows, from the last block
    if (blockIdx.z == gridDim.z - 1 && tid < kScaleSlots - tail) {
        a.scale[o + tail + tid] = 0.0f;
        a.qsum[o + tail + tid] = 0.0;
    }
}

/* One 16-row tile per block, 8 warps over the groups (as the int8 kernel). Per (group, path): 32 steps of NT
   MMAs into a fresh float32 accumulator, then times S and g into the running sums. The B fragments arrive in
   chunks of CH steps (8 uint2), one chunk ahead of the MMAs that use them. F: the fused glue's epilogue (M <=
   kFusedMaxM, so NT = 1), a separate instantiation as in the int8 kernel. PS (K = 2 or 4, layers of few groups):
   warp w takes path w % K of its groups (for_each_chunk's KP), the warps' partial sums added in warp order as
   always. */
template <int K, int NT, bool GROUPED, bool F, bool PS>
__global__ void __launch_bounds__(kWarps * 32, K <= 2 ? 2 : 1) gemv_f16_kernel(const GroupArgs ga) {
    static_assert(!F || NT == 1, "the fused glue takes M <= kFusedMaxM rows of x: one n-tile");
    static_assert(!PS || K == 2 || K == 4, "a path per warp: K divides the 8 warps (and K = 1 has one path)");
    __shared__ float red[kWarps][16][8 * NT];
    __shared__ FusedEpilogue fe;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    int64_t tile = blockIdx.x;
    const MainArgs a = layer_args<K, GROUPED>(ga, tile);
    const int64_t row0 = tile * 16;

    // converted at once, unlike the int8 and 1-bit kernels: converted after the first loads (as they do), three of
    // the four batch-8 layer groups took 2-4 % longer (H200, thirty-sixth session)
    uint32_t graw[K][1][2];
    load_row_scales(a, row0, g, graw);
    float gk[K][1][2];
    row_scales_f32(a, graw, gk);
    float fa[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) fa[nt][0] = fa[nt][1] = fa[nt][2] = fa[nt][3] = 0.0f;

    constexpr int CH = 8 / NT, NCH = kF16Steps / CH, NCHUNK = K * NCH;
    struct Chunk {
        uint2 b[CH][NT];
    };
    auto load_chunk = [&](int64_t grp, int c, Chunk &dst) {
        const int k = c / NCH, st0 = (c % NCH) * CH;
        const uint2 *fp = a.frag + frag_path<K, GROUPED>(a, grp, k) * (kF16Steps * NT * 32) + lane;
        // read unconditionally: the prologue wrote zeros for rows m >= M. A select per load (a zeroing, a compare)
        // also held registers, so nvcc re-read parameters and rebuilt 64-bit addresses in the loop: the K = 2,
        // NT = 2 instance had 2,256 SASS instructions for 128 MMAs, now 1,712 (nvcc 13)
#pragma unroll
        for (int j = 0; j < CH; j++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++) dst.b[j][nt] = __ldg(fp + ((st0 + j) * NT + nt) * 32);
    };

    float acc[NT][4], sck[NT][2];
    float res = 0.0f;
    auto body = [&](int64_t gr, int c, const Chunk &cc, const Bits<K, 1> &cur) {
            const int k = c / NCH, st0 = (c % NCH) * CH;
            if (c % NCH == 0) {
                const size_t so = frag_path<K, GROUPED>(a, gr, k) * kScaleSlots;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    sck[nt][0] = __ldg(a.scale + so + nt * 8 + 2 * t);
                    sck[nt][1] = __ldg(a.scale + so + nt * 8 + 2 * t + 1);
                    acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
                }
            }
            const uint4 &wg = cur.w[k][0][0], &wh = cur.w[k][0][1];
#pragma unroll
            for (int j = 0; j < CH; j++) {
                const int st = st0 + j, q = st >> 4, s = st & 15;
                const uint32_t a0 = pm1_f16(q ? wg.z : wg.x, s), a2 = pm1_f16(q ? wg.w : wg.y, s);
                const uint32_t a1 = pm1_f16(q ? wh.z : wh.x, s), a3 = pm1_f16(q ? wh.w : wh.y, s);
#pragma unroll
                for (int nt = 0; nt < NT; nt++) mma_f16(acc[nt], a0, a1, a2, a3, cc.b[j][nt].x, cc.b[j][nt].y);
            }
            if (c % NCH == NCH - 1) {
                // flush path k of the group: S is a power of two (exact), then times g in float32
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        fa[nt][i] = __fmaf_rn(gk[k][0][i >> 1], acc[nt][i] * sck[nt][i & 1], fa[nt][i]);
            }
        };
    auto ready = [] {};
    if constexpr (!PS) {
        for_each_chunk<K, 1, NCHUNK, F, Chunk>(a, row0, g, t, warp, fe, res, load_chunk, ready, body);
    } else {  // the path a compile-time constant in each copy of the loop (it indexes the bits and g in registers)
        const int kp = warp % K;
        if (kp == 0) for_each_chunk<K, 1, NCHUNK, F, Chunk, 0>(a, row0, g, t, warp, fe, res, load_chunk, ready, body);
        else if (kp == 1) for_each_chunk<K, 1, NCHUNK, F, Chunk, 1>(a, row0, g, t, warp, fe, res, load_chunk, ready, body);
        if constexpr (K == 4) {
            if (kp == 2) for_each_chunk<K, 1, NCHUNK, F, Chunk, 2>(a, row0, g, t, warp, fe, res, load_chunk, ready, body);
            else if (kp == 3) for_each_chunk<K, 1, NCHUNK, F, Chunk, 3>(a, row0, g, t, warp, fe, res, load_chunk, ready, body);
        }
    }

    // epilogue as in the int8 kernel; accumulator i of n-tile nt is row g + 8 (i / 2), column m = 8 nt + 2t + i % 2
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) red[warp][g + 8 * (i >> 1)][nt * 8 + 2 * t + (i & 1)] = fa[nt][i];
    if constexpr (F) fused_ready();
    __syncthreads();
    store_rows<F>(a, red, row0, tid, fe, res);
}

int gemv_nt(int64_t M) { return M <= 2 ? 1 : M <= 4 ? 2 : M <= 8 ? 4 : 8; }
int f16_nt(int64_t M) { return M <= 8 ? 1 : 2; }

/* uint2 fragment entries per (group, path): the most any decode kernel needs at this M (the b1 kernel: 256 M). */
size_t frag_entries(int64_t M) {
    const size_t i8 = 16 * gemv_nt(M) * 32, f16 = kF16Steps * f16_nt(M) * 32;
    return i8 > f16 ? i8 : f16;
}

/* The launchers take the layers' total of 16-row tiles as the grid (one tile per block). */
/* A fused call's epilogue (residual or norm) runs the F instantiations; they exist for M <= kFusedMaxM (NT <= 2). */
inline bool fused_epilogue(const GroupArgs &a) { return a.a.residual || a.a.sumsq; }

template <int K, int NT, bool GR>
cudaError_t launch_main_nt(const GroupArgs &a, unsigned tiles, cudaStream_t s) {
    // one 16-row tile per warp (MT = 2 would halve the fragment reads but, with the fragment prefetch, needs
    // more registers than two blocks per SM allow)
    if constexpr (NT <= 2)
        if (fused_epilogue(a)) return launch_pdl(gemv_i8_kernel<K, NT, 1, GR, true>, dim3(tiles), kWarps * 32, 0, a, s);
    return launch_pdl(gemv_i8_kernel<K, NT, 1, GR, false>, dim3(tiles), kWarps * 32, 0, a, s);
}

template <int K, bool GR, bool F>
cudaError_t launch_b1_kf(const GroupArgs &a, unsigned tiles, cudaStream_t s) {
    return a.a.M == 1 ? launch_pdl(gemv_b1_kernel<K, 1, GR, F>, dim3(tiles), kWarps * 32, 0, a, s)
                      : launch_pdl(gemv_b1_kernel<K, 2, GR, F>, dim3(tiles), kWarps * 32, 0, a, s);
}

template <int K, bool GR>
cudaError_t launch_b1_k(const GroupArgs &a, unsigned tiles, cudaStream_t s) {
    return fused_epilogue(a) ? launch_b1_kf<K, GR, true>(a, tiles, s) : launch_b1_kf<K, GR, false>(a, tiles, s);
}

/* The persistent 1-bit kernel: as many blocks as fit on the SMs at once (registers and the fragments' shared memory),
   at most one per tile, shared among the layers in proportion to their tiles (at least one each). */
template <int K, bool GR, bool F, bool P8 = false>
cudaError_t launch_b1p_kf(GroupArgs a, cudaStream_t s) {
    auto *kern = gemv_b1p_kernel<K, GR, F, P8>;
    static bool smem_set[64];
    static std::atomic<int> bps_cache[64];
    const DevInfo &di = device_info();
    const size_t smem = b1p_smem_bytes(a.a.ngroups, K, P8);
    const cudaError_t e = set_smem_limit_once(kern, di.smem_optin - static_cast<int>(kB1PStaticSmem), smem_set);
    if (e != cudaSuccess) return e;
    const int64_t bps = std::min<int64_t>(resident_blocks_once(kern, kWarps * 32, 0, bps_cache), b1p_blocks_per_sm(smem));
    const int64_t grid = std::max<int64_t>(a.layers, std::min<int64_t>(a.tiles, std::max<int64_t>(1, bps) * di.sms));
    // layer l's share of the blocks: its part of the tiles (at least one block; the last layer takes the rest)
    int64_t b = 0;
    for (int l = 0; l < a.layers; l++) {
        a.blk0[l] = static_cast<int>(b);
        const int64_t lt = (a.out[l] + 15) / 16;
        b += l + 1 < a.layers ? std::max<int64_t>(1, std::min<int64_t>(lt, grid * lt / a.tiles)) : 0;
    }
    const int64_t total = std::max<int64_t>(b + 1, grid);
    for (int l = a.layers; l <= kDecodeMaxLayers; l++) a.blk0[l] = static_cast<int>(total);
    return launch_pdl(kern, dim3(static_cast<unsigned>(total)), kWarps * 32, smem, a, s);
}

template <int K, bool GR>
cudaError_t launch_b1p_k(const GroupArgs &a, unsigned tiles, cudaStream_t s, bool act8 = false) {
    if (act8)  // decode_gemv checked that it applies
        return fused_epilogue(a) ? launch_b1p_kf<K, GR, true, true>(a, s) : launch_b1p_kf<K, GR, false, true>(a, s);
    // elsewhere the 1-bit kernel (same outputs): M = 2, or fragments larger than the shared memory
    if (!decode_b1p_applies(a.a.M, a.a.ngroups, K)) return launch_b1_k<K, GR>(a, tiles, s);
    return fused_epilogue(a) ? launch_b1p_kf<K, GR, true>(a, s) : launch_b1p_kf<K, GR, false>(a, s);
}

/* NT: f16_nt(M), the n-tiles the prologue wrote (1 wherever the glue is fused: M <= kFusedMaxM). */
template <int K, bool GR>
cudaError_t launch_f16_k(const GroupArgs &a, int NT, unsigned tiles, cudaStream_t s) {
    // a path per warp where the layers' (group, path) pairs fit the warps at once (in <= 2048 at K = 2, <= 1024 at
    // K = 4): a warp per group left 6 of 8 warps idle at SmolLM2's 576 columns
    constexpr bool kCanSplit = K == 2 || K == 4;
    const bool ps = kCanSplit && a.a.ngroups * K <= kWarps;
    if (NT == 1) {
        if (fused_epilogue(a))
            return ps ? launch_pdl(gemv_f16_kernel<K, 1, GR, true, kCanSplit>, dim3(tiles), kWarps * 32, 0, a, s)
                      : launch_pdl(gemv_f16_kernel<K, 1, GR, true, false>, dim3(tiles), kWarps * 32, 0, a, s);
        return ps ? launch_pdl(gemv_f16_kernel<K, 1, GR, false, kCanSplit>, dim3(tiles), kWarps * 32, 0, a, s)
                  : launch_pdl(gemv_f16_kernel<K, 1, GR, false, false>, dim3(tiles), kWarps * 32, 0, a, s);
    }
    return ps ? launch_pdl(gemv_f16_kernel<K, 2, GR, false, kCanSplit>, dim3(tiles), kWarps * 32, 0, a, s)
              : launch_pdl(gemv_f16_kernel<K, 2, GR, false, false>, dim3(tiles), kWarps * 32, 0, a, s);
}

/* NT: the n-tiles of the prologue's fragments (decode_gemv), for the int8 and fp16 kernels. */
template <int K, bool GR>
cudaError_t launch_main_kg(const GroupArgs &a, DecodeKernel kern, int NT, unsigned tiles, cudaStream_t s,
                           bool act8) {
    if (kern == DECODE_B1) return launch_b1_k<K, GR>(a, tiles, s);
    if (kern == DECODE_B1P) return launch_b1p_k<K, GR>(a, tiles, s, act8);
    if (kern == DECODE_F16) return launch_f16_k<K, GR>(a, NT, tiles, s);
    switch (NT) {
        case 1: return launch_main_nt<K, 1, GR>(a, tiles, s);
        case 2: return launch_main_nt<K, 2, GR>(a, tiles, s);
        case 4: return launch_main_nt<K, 4, GR>(a, tiles, s);
        case 8: return launch_main_nt<K, 8, GR>(a, tiles, s);
    }
    return cudaErrorInvalidValue;
}

template <int K>
cudaError_t launch_main_k(const GroupArgs &a, DecodeKernel kern, int NT, unsigned tiles, cudaStream_t s, bool act8) {
    return a.layers == 1 ? launch_main_kg<K, false>(a, kern, NT, tiles, s, act8)
                         : launch_main_kg<K, true>(a, kern, NT, tiles, s, act8);
}

}  // namespace

bool decode_b1p_applies(int64_t M, int64_t ngroups, int K) {
    return M == 1 && b1p_smem_bytes(ngroups, K) + kB1PStaticSmem <= static_cast<size_t>(device_info().smem_optin);
}

bool decode_b1p_default(int K, int64_t in, int64_t launch_out) {
    const int64_t ngroups = (in + kGroupCols - 1) / kGroupCols;
    const int64_t tiles = (launch_out + 15) / 16;
    return K <= 3 && b1p_blocks_per_sm(b1p_smem_bytes(ngroups, K)) >= 2 &&
           5 * tiles >= 6 * (2 * static_cast<int64_t>(device_info().sms));  // 1.2 tiles a block
}

namespace {
/* The prologue of kernel kern for M rows of x, instantiated for MR rows, the power of two >= M: its per-row loops
   (loads, max reductions, Q and sum(Q)) are unrolled to MR with no exit at M, so the rows' load and shuffle chains
   interleave; rows M .. MR - 1 are zeros and are not read. Bounded at M at run time instead (up to 16 rows, each
   with its exit), they took 0.65-1.7 us more a linear at M = 1 (H200, 7B shapes: 4096^2 8.24 against 6.53 us; same
   outputs bit for bit; docs/kernels.md, "The prologue per row bucket"). */
template <int MR>
cudaError_t launch_prep_mr(DecodeKernel kern, dim3 pg, const PrepArgs &p, cudaStream_t s) {
    if (kern == DECODE_B1 || kern == DECODE_B1P) {
        if constexpr (MR <= kB1MaxM) return launch_pdl(gemv_b1_prep_kernel<MR>, pg, kPrepThreads, 0, p, s);
        return cudaErrorInvalidValue;  // decode_gemv refuses M > kB1MaxM for these kernels before
    }
    if (kern == DECODE_F16)  // blocks of kF16PrepRows rows over the n-tiles' 8 NT rows
        return launch_pdl(gemv_f16_prep_kernel<kF16PrepRows>, dim3(pg.x, pg.y, p.NT * 8 / kF16PrepRows), kPrepThreads,
                          0, p, s);
    return launch_pdl(gemv_i8_prep_kernel<MR>, dim3(pg.x, pg.y, kPrepParts), kPrepThreads, 0, p, s);
}

cudaError_t launch_prep(DecodeKernel kern, int64_t M, dim3 pg, const PrepArgs &p, cudaStream_t s) {
    if (M <= 1) return launch_prep_mr<1>(kern, pg, p, s);
    if (M <= 2) return launch_prep_mr<2>(kern, pg, p, s);
    if (M <= 4) return launch_prep_mr<4>(kern, pg, p, s);
    if (M <= 8) return launch_prep_mr<8>(kern, pg, p, s);
    return launch_prep_mr<16>(kern, pg, p, s);
}
}  // namespace

bool decode_i8_applies(int64_t M, int64_t in, int K) {
    const int64_t ng = (in + kGroupCols - 1) / kGroupCols;
    return M == 1 && K >= 1 && K <= RABIT_MAX_K &&
           b1p_smem_bytes(ng, K, true) + kB1PStaticSmem <= static_cast<size_t>(device_info().smem_optin);
}

size_t decode_workspace_bytes(int paths, int64_t M, int64_t in, DecodeKernel kern) {
    if (kern == DECODE_SIMT) return 0;
    const size_t ng = static_cast<size_t>((in + kGroupCols - 1) / kGroupCols), gk = ng * paths;
    // fragments, sum(Q) and scales per (group, path); the fused norm's sums of squares per group
    return gk * (frag_entries(M) * sizeof(uint2) + kScaleSlots * (sizeof(double) + sizeof(float))) +
           ng * kFusedMaxM * sizeof(float);
}

cudaError_t decode_gemv(const void *x, rabit_dtype xdt, int64_t M, const DecodeLayer *layers, int n,
                        rabit_dtype gdt, rabit_dtype hdt, rabit_dtype bdt, int K, int64_t in, void *workspace,
                        DecodeKernel kern, cudaStream_t s, const DecodeFusion *fusion) {
    const int64_t ng = (in + kGroupCols - 1) / kGroupCols;
    // the int8 activation class: the persistent 1-bit kernel on the 8 bit planes of int8 activations
    const int act8 = kern == DECODE_B1P_I8;
    if (act8) {
        if (!decode_i8_applies(M, in, K)) return cudaErrorInvalidValue;
        kern = DECODE_B1P;
    }
    if (kern == DECODE_SIMT) return decode_gemv_simt(x, xdt, M, layers, n, gdt, hdt, bdt, K, in, s, fusion);
    // the glue: M <= kFusedMaxM, a residual for one layer, a norm over <= kFusedMaxGroups groups
    if (M < 1 || M > kDecodeMaxM || ((kern == DECODE_B1 || kern == DECODE_B1P) && M > kB1MaxM) || xdt == RABIT_F32 || K < 1 ||
        K > RABIT_MAX_K || n < 1 || n > kDecodeMaxLayers ||
        (fusion && (M > kFusedMaxM || (fusion->residual && n != 1) ||
                    (fusion->norm_weight && ng > kFusedMaxGroups))))
        return cudaErrorInvalidValue;
    const int NT = kern == DECODE_F16 ? f16_nt(M) : gemv_nt(M);
    const int KL = n * K;
    uint2 *frag = static_cast<uint2 *>(workspace);
    const size_t gk = static_cast<size_t>(ng) * KL;
    double *qsum = reinterpret_cast<double *>(frag + gk * frag_entries(M));  // 8-byte aligned after uint2s
    float *scale = reinterpret_cast<float *>(qsum + gk * kScaleSlots);
    float *sumsq = scale + gk * kScaleSlots;  // [group][kFusedMaxM]

    PrepArgs p{};
    p.x = x; p.xdt = xdt; p.M = static_cast<int>(M); p.K = K; p.hdt = hdt; p.in = in; p.NT = NT;
    p.frag = frag; p.scale = scale; p.qsum = qsum; p.act8 = act8;
    for (int l = 0; l < n; l++) p.h[l] = layers[l].h;
    if (fusion) {
        p.up = fusion->up;
        p.norm_weight = fusion->norm_weight;
        p.ndt = fusion->norm_dt;
        p.sumsq = sumsq;
    }
    const dim3 pg(static_cast<unsigned>(ng), static_cast<unsigned>(KL));
    // the prologue too is launched with PDL: its launch overlaps the previous kernel's tail (it waits for that
    // kernel in prep_front before it reads x or writes the workspace). H200, same run: 7B decode at batch 1 373.8
    // tok/s against 359.9 with a plain launch, M = 1 GEMV 2-4 % faster at the six 7B shapes (docs/kernels.md)
    const cudaError_t e = launch_prep(kern, M, pg, p, s);
    if (e != cudaSuccess) return e;

    GroupArgs ga{};
    MainArgs &a = ga.a;
    a.gdt = gdt; a.bdt = bdt; a.ydt = xdt;
    a.M = static_cast<int>(M); a.nw = RABIT_WORDS(in); a.ngroups = ng;
    a.frag = frag; a.scale = scale; a.qsum = qsum; a.KL = KL; a.kb = 0;
    a.residual = fusion ? fusion->residual : nullptr;
    a.sumsq = fusion && fusion->norm_weight ? sumsq : nullptr;
    a.in = in;
    a.eps = fusion ? fusion->eps : 0.0f;
    ga.layers = n;
    int64_t tiles = 0;
    for (int l = 0; l < n; l++) {
        const DecodeLayer &L = layers[l];
        ga.tile0[l] = tiles;
        ga.packed[l] = L.packed; ga.g[l] = L.g; ga.bias[l] = L.bias; ga.y[l] = L.y; ga.out[l] = L.out;
        ga.vec[l] = (a.nw % 4 == 0) && (reinterpret_cast<uintptr_t>(L.packed) % 16 == 0);
        tiles += (L.out + 15) / 16;
    }
    ga.tiles = tiles;
    a.packed = ga.packed[0]; a.g = ga.g[0]; a.bias = ga.bias[0]; a.y = ga.y[0]; a.out = ga.out[0]; a.vec = ga.vec[0];
    if (tiles == 0) return cudaSuccess;
    return with_paths(K, [&](auto k) {
        return launch_main_k<decltype(k)::value>(ga, kern, NT, static_cast<unsigned>(tiles), s, p.act8 != 0);
    });
}

}  // namespace rabit_cuda
