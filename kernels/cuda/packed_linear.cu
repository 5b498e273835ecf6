/*
 * Packed GEMV / GEMM on the GPU, straight from the sign planes (kernels/rabit_format.h); see
 * docs/kernels.md for the design and the measured numbers.
 *
 * decode (float32 x, any M in chunks of 16 rows; fp16/bf16 x at M <= 16 take packed_decode.cu):
 *   y[m][o] = sum_k g_k[o] * sum_j B_k[o][j] * xh_k[m][j],   xh_k = h_k * x   (float32)
 *   Each xh value is split into NSPLIT = 3 bfloat16 parts (hi + lo + lo2: all 24 significant bits), so
 *   the tensor-core products (+-1) x (bf16 part) are exact and accumulate in float32: the result has
 *   float32-level accuracy. The +-1 operand A of mma.m16n8k16 is expanded from the bits in registers
 *   (two instructions per pair of weights; no unpacked weight anywhere in memory); the split
 *   activations, the B operand, live in shared memory in fragment order, built once per block from
 *   16-byte loads of x and h. All K paths run in one kernel over one read of the bit planes; g is
 *   applied in the epilogue.
 *
 * prefill (fp16/bf16 x, M > 16): packed_prefill.cu.
 */
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "common.cuh"
#include "rabit_cuda.cuh"

namespace rabit_cuda {

namespace {

/* Two bf16 +-1 from bits (15 - sh) and (31 - sh) of w after the shift: set bit = +1. */
__device__ __forceinline__ uint32_t pm1_pair(uint32_t w, int sh) {
    return ((w << sh) & 0x80008000u) ^ 0xBF80BF80u;
}

__device__ __forceinline__ float bf16_round(float f) { return __bfloat162float(__float2bfloat16_rn(f)); }

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

/* Only float32 x comes to the decode kernel (packed_linear_path): each x value is split into three bf16 parts
   that together carry all 24 bits of its mantissa, one B column per part. */
constexpr int kSplit = 3;

struct DecodeArgs {
    const void *x;
    int xdt;
    int64_t M;
    const rabit_word_t *packed;
    const void *g;
    int gdt;
    const void *h;
    int hdt;
    const void *bias;
    int bdt;
    void *y;
    int64_t out, in, nw;
    int ncols;  // B columns per 16-row chunk of x: ncols = min(M,16) * kSplit
    int RT, CS;         // row tiles x column slices = 8 warps
    int SU, nslabs, NUT;
    int vec;         // bit rows allow WPT-word vector loads
    int xvec, hvec;  // x / h rows allow 16-byte loads
};

/* Raw bits of 8 consecutive elements p[off .. off+7] (16-byte loads when `vec` and all 8 are in range; else
   float32 values from scalar loads, zero past nvalid). Nothing here uses the loaded data, so the loads of
   several calls stay in flight together; raw8_cvt converts afterwards. */
struct Raw8 {
    uint4 a, b;
};
__device__ __forceinline__ Raw8 raw8_load(const void *p, int dt, int64_t off, int64_t nvalid, bool vec) {
    Raw8 r;
    r.a = make_uint4(0, 0, 0, 0);
    r.b = r.a;
    if (vec && nvalid >= 8) {
        if (dt == RABIT_F32) {
            const uint4 *q = reinterpret_cast<const uint4 *>(static_cast<const float *>(p) + off);
            r.a = __ldg(q);
            r.b = __ldg(q + 1);
        } else {
            r.a = __ldg(reinterpret_cast<const uint4 *>(static_cast<const unsigned short *>(p) + off));
        }
    } else {
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = e < nvalid ? ld_any(p, dt, off + e) : 0.0f;
        r.a = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
        r.b = make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]), __float_as_uint(v[7]));
    }
    return r;
}
/* packed16: r holds 8 values of a 16-bit dtype (the vector path of raw8_load); else 8 float32. */
__device__ __forceinline__ void raw8_cvt(const Raw8 &r, int dt, bool packed16, float v[8]) {
    const uint32_t w[8] = {r.a.x, r.a.y, r.a.z, r.a.w, r.b.x, r.b.y, r.b.z, r.b.w};
    if (!packed16) {
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = __uint_as_float(w[i]);
    } else if (dt == RABIT_BF16) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = __uint_as_float(w[i] << 16);
            v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
            v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
        }
    }
}

/*
 * Column mapping of one "unit" = 128*WPT columns = 4*WPT words: lane (g, t) loads words t*WPT .. t*WPT+WPT-1
 * of rows g and g+8 of its 16-row tile. MMA step s = 8j + q (j < WPT, q < 8) uses, for k-indices
 * (2t, 2t+1, 2t+8, 2t+9), the columns c0 + (0, 16, 1, 17) with c0 = 32*(t*WPT + j) + 2q: two bits 16 apart
 * fill one register of two bf16 +-1 (pm1_pair), and the same permutation of k is applied to the B operand,
 * which shared memory holds as uint2 {b0b1, b2b3} per (path, unit, step, column n, t).
 */
template <int K, int NT, int WPT>
__global__ void __launch_bounds__(256, 2) decode_kernel(const DecodeArgs a) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    uint2 *Bs = reinterpret_cast<uint2 *>(smem_raw);
    constexpr int SPU = 8 * WPT;      // mma steps per unit
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int rt = warp / a.CS, cs = warp - rt * a.CS;
    const int64_t row_base = static_cast<int64_t>(blockIdx.x) * a.RT * 16;
    const int64_t row0 = row_base + rt * 16;
    const int64_t m0 = static_cast<int64_t>(blockIdx.z) * kDecodeMaxM;
    const int Mc = static_cast<int>(min64(kDecodeMaxM, a.M - m0));
    const int ncols = a.ncols, NTT = ncols * 4;
    const bool active = row0 < a.out;
    const int64_t oA = row0 + g, oB = row0 + g + 8;
    const bool vA = oA < a.out, vB = oB < a.out;
    const int64_t nw = a.nw, in = a.in;

    constexpr int NA = NT == 1 ? 2 : 1;  // independent accumulator chains per (path, n-tile)
    float acc[K][NT][NA][4];
#pragma unroll
    for (int k = 0; k < K; k++)
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int c = 0; c < NA; c++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[k][n][c][i] = 0.0f;

    uint32_t cur[K][2][WPT];
    auto load_unit = [&](int64_t u, uint32_t (&dst)[K][2][WPT]) {
        const int64_t w0 = u * (4 * WPT) + t * WPT;
#pragma unroll
        for (int k = 0; k < K; k++) {
            const rabit_word_t *pa = a.packed + (k * a.out + oA) * nw + w0;
            const rabit_word_t *pb = a.packed + (k * a.out + oB) * nw + w0;
            if (a.vec) {
                const bool ina = vA && w0 < nw, inb = vB && w0 < nw;
                if (WPT == 4) {
                    const uint4 za = ina ? __ldcs(reinterpret_cast<const uint4 *>(pa)) : make_uint4(0, 0, 0, 0);
                    const uint4 zb = inb ? __ldcs(reinterpret_cast<const uint4 *>(pb)) : make_uint4(0, 0, 0, 0);
                    dst[k][0][0] = za.x; dst[k][0][1 % WPT] = za.y; dst[k][0][2 % WPT] = za.z; dst[k][0][3 % WPT] = za.w;
                    dst[k][1][0] = zb.x; dst[k][1][1 % WPT] = zb.y; dst[k][1][2 % WPT] = zb.z; dst[k][1][3 % WPT] = zb.w;
                } else if (WPT == 2) {
                    const uint2 za = ina ? __ldcs(reinterpret_cast<const uint2 *>(pa)) : make_uint2(0, 0);
                    const uint2 zb = inb ? __ldcs(reinterpret_cast<const uint2 *>(pb)) : make_uint2(0, 0);
                    dst[k][0][0] = za.x; dst[k][0][1 % WPT] = za.y;
                    dst[k][1][0] = zb.x; dst[k][1][1 % WPT] = zb.y;
                } else {
                    dst[k][0][0] = ina ? __ldcs(pa) : 0u;
                    dst[k][1][0] = inb ? __ldcs(pb) : 0u;
                }
            } else {
#pragma unroll
                for (int j = 0; j < WPT; j++) {
                    dst[k][0][j] = (vA && w0 + j < nw) ? __ldcs(pa + j) : 0u;
                    dst[k][1][j] = (vB && w0 + j < nw) ? __ldcs(pb + j) : 0u;
                }
            }
        }
    };

    for (int slab = 0; slab < a.nslabs; ++slab) {
        const int u0 = slab * a.SU;
        const int su = static_cast<int>(min64(a.SU, a.NUT - u0));
        // first unit of this warp: its loads fly during the build
        if (active && cs < su) load_unit(u0 + cs, cur);
        if (slab > 0) __syncthreads();  // everyone is done reading the previous slab

        // ---- build the split activations of this slab. One item = one word (32 columns) of one x row, done
        // in two halves: columns {8hp..8hp+7} and {16+8hp..16+8hp+7} feed steps q = 4hp..4hp+3. x is read once
        // per half (16-byte loads), then for each path h_k (16-byte loads); xh = h*x is split into bf16 parts
        // and each part scattered as uint2 {b0b1, b2b3} to its fragment slot.
        {
            const int nws = su * 4 * WPT;
            const int items = Mc * nws;
            for (int it = tid; it < items; it += 256) {
                const int m = it / nws, wl = it - m * nws;
                const int ul = wl / (4 * WPT), wiu = wl - ul * (4 * WPT);
                const int bt = wiu / WPT, j = wiu - bt * WPT;
                const int64_t cb = (static_cast<int64_t>(u0) * 4 * WPT + wl) * 32;
                const int64_t xrow = (m0 + m) * in;
#pragma unroll 1
                for (int hp = 0; hp < 2; hp++) {
                    const int64_t c1 = cb + 8 * hp, c2 = cb + 16 + 8 * hp;
                    // all loads of this half first (one memory round trip), conversions after
                    const Raw8 xr0 = raw8_load(a.x, a.xdt, xrow + c1, in - c1, a.xvec);
                    const Raw8 xr1 = raw8_load(a.x, a.xdt, xrow + c2, in - c2, a.xvec);
                    Raw8 hr[K][2];
#pragma unroll
                    for (int k = 0; k < K; k++) {
                        hr[k][0] = raw8_load(a.h, a.hdt, k * in + c1, in - c1, a.hvec);
                        hr[k][1] = raw8_load(a.h, a.hdt, k * in + c2, in - c2, a.hvec);
                    }
                    const bool x16a = a.xvec && a.xdt != RABIT_F32 && in - c1 >= 8;
                    const bool x16b = a.xvec && a.xdt != RABIT_F32 && in - c2 >= 8;
                    const bool h16a = a.hvec && a.hdt != RABIT_F32 && in - c1 >= 8;
                    const bool h16b = a.hvec && a.hdt != RABIT_F32 && in - c2 >= 8;
                    float xv[16];
                    raw8_cvt(xr0, a.xdt, x16a, xv);
                    raw8_cvt(xr1, a.xdt, x16b, xv + 8);
#pragma unroll
                    for (int k = 0; k < K; k++) {
                        float f[16];
                        raw8_cvt(hr[k][0], a.hdt, h16a, f);
                        raw8_cvt(hr[k][1], a.hdt, h16b, f + 8);
#pragma unroll
                        for (int e = 0; e < 16; e++) f[e] = __fmul_rn(f[e], xv[e]);
                        uint2 *dst = Bs + static_cast<size_t>((k * su + ul) * SPU + 8 * j + 4 * hp) * NTT + bt;
#pragma unroll 1
                        for (int sp = 0; sp < kSplit; sp++) {
                            const int n = m * kSplit + sp;
#pragma unroll
                            for (int qq = 0; qq < 4; qq++) {
                                const int es[4] = {2 * qq, 8 + 2 * qq, 2 * qq + 1, 8 + 2 * qq + 1};
                                float pp[4];
#pragma unroll
                                for (int e = 0; e < 4; e++) {
                                    pp[e] = bf16_round(f[es[e]]);
                                    f[es[e]] = __fsub_rn(f[es[e]], pp[e]);  // exact: the residual for the next part
                                }
                                dst[qq * NTT + n * 4] = make_uint2(pack_bf16(pp[0], pp[1]), pack_bf16(pp[2], pp[3]));
                            }
                        }
                    }
                }
            }
        }
        __syncthreads();

        // ---- stream this warp's units of the slab through the tensor cores
        if (active) {
            for (int ul = cs; ul < su; ul += a.CS) {
                uint32_t nxt[K][2][WPT];
                const bool more = ul + a.CS < su;
                if (more) load_unit(u0 + ul + a.CS, nxt);
#pragma unroll
                for (int k = 0; k < K; k++) {
                    const uint2 *bp = Bs + static_cast<size_t>(k * su + ul) * SPU * NTT + t;
#pragma unroll
                    for (int j = 0; j < WPT; j++) {
                        const uint32_t wa = cur[k][0][j], wb = cur[k][1][j];
#pragma unroll
                        for (int q = 0; q < 8; q++) {
                            const int s = j * 8 + q;
                            const uint32_t a0 = pm1_pair(wa, 15 - 2 * q), a1 = pm1_pair(wb, 15 - 2 * q);
                            const uint32_t a2 = pm1_pair(wa, 14 - 2 * q), a3 = pm1_pair(wb, 14 - 2 * q);
#pragma unroll
                            for (int nt = 0; nt < NT; nt++) {
                                const int n = min(nt * 8 + g, ncols - 1);  // columns past ncols: any finite data
                                const uint2 b = bp[s * NTT + n * 4];
                                mma_bf16(acc[k][nt][q & (NA - 1)], a0, a1, a2, a3, b.x, b.y);
                            }
                        }
                    }
                }
                if (more) {
#pragma unroll
                    for (int k = 0; k < K; k++)
#pragma unroll
                        for (int r = 0; r < 2; r++)
#pragma unroll
                            for (int j = 0; j < WPT; j++) cur[k][r][j] = nxt[k][r][j];
                }
            }
        }
    }

    // ---- epilogue: g per path, then the column slices and the splits through shared memory
    __syncthreads();
    float *red = reinterpret_cast<float *>(smem_raw);  // [CS][16*RT][ncols]
    const int R16 = 16 * a.RT;
    if (active) {
        float gA[K], gB[K];
#pragma unroll
        for (int k = 0; k < K; k++) {
            gA[k] = vA ? ld_any(a.g, a.gdt, k * a.out + oA) : 0.0f;
            gB[k] = vB ? ld_any(a.g, a.gdt, k * a.out + oB) : 0.0f;
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int n = nt * 8 + 2 * t + (i & 1);
                const int rl = rt * 16 + g + (i >> 1) * 8;
                float v = 0.0f;
#pragma unroll
                for (int k = 0; k < K; k++) {
                    float ak = acc[k][nt][0][i];
#pragma unroll
                    for (int c = 1; c < NA; c++) ak = __fadd_rn(ak, acc[k][nt][c][i]);
                    v = __fadd_rn(v, __fmul_rn((i >> 1) ? gB[k] : gA[k], ak));
                }
                if (n < ncols) red[(cs * R16 + rl) * ncols + n] = v;
            }
    }
    __syncthreads();
    for (int idx = tid; idx < R16 * Mc; idx += 256) {
        const int m = idx / R16, rl = idx - m * R16;
        const int64_t o = row_base + rl;
        if (o >= a.out) continue;
        float s = 0.0f;
        for (int c = 0; c < a.CS; c++)
            for (int sp = 0; sp < kSplit; sp++) s = __fadd_rn(s, red[(c * R16 + rl) * ncols + m * kSplit + sp]);
        if (a.bias) s = __fadd_rn(s, ld_any(a.bias, a.bdt, o));
        st_any(a.y, a.xdt, (m0 + m) * a.out + o, s);
    }
}

/* ------------------------------------------------------------------------------------------------ host */
template <int K, int NT, int WPT>
cudaError_t launch_decode_t(DecodeArgs a, int smem, unsigned gx, unsigned gz, cudaStream_t s) {
    static bool attr_set[64] = {};  // per instantiation and device
    if (smem > 48 * 1024) {  // only large slabs need the opt-in limit (and the device lookup)
        const cudaError_t e = set_smem_limit_once(decode_kernel<K, NT, WPT>, device_info().smem_optin, attr_set);
        if (e != cudaSuccess) return e;
    }
    decode_kernel<K, NT, WPT><<<dim3(gx, 1, gz), 256, smem, s>>>(a);
    return cudaGetLastError();
}

template <int K>
cudaError_t launch_decode_k(const DecodeArgs &a, int NT, int smem, unsigned gx, unsigned gz, cudaStream_t s) {
    switch (NT) {
        case 1: return launch_decode_t<K, 1, 4>(a, smem, gx, gz, s);
        case 2: return launch_decode_t<K, 2, 2>(a, smem, gx, gz, s);
        case 4: return launch_decode_t<K, 4, 1>(a, smem, gx, gz, s);
        case 6: return launch_decode_t<K, 6, 1>(a, smem, gx, gz, s);
    }
    return cudaErrorInvalidValue;
}

cudaError_t launch_decode(const void *x, rabit_dtype xdt, int64_t M, const rabit_word_t *packed, const void *g,
                          rabit_dtype gdt, const void *h, rabit_dtype hdt, const void *bias, rabit_dtype bdt, int K,
                          int64_t out, int64_t in, void *y, cudaStream_t s) {
    const DevInfo &dev = device_info();
    DecodeArgs a;
    a.x = x; a.xdt = xdt; a.M = M; a.packed = packed; a.g = g; a.gdt = gdt; a.h = h; a.hdt = hdt;
    a.bias = bias; a.bdt = bdt; a.y = y; a.out = out; a.in = in; a.nw = RABIT_WORDS(in);
    const int mchunk = static_cast<int>(min64(M, kDecodeMaxM));
    a.ncols = mchunk * kSplit;
    int NT = (a.ncols + 7) / 8;
    if (NT == 3) NT = 4;
    if (NT == 5) NT = 6;
    const int WPT = NT == 1 ? 4 : (NT == 2 ? 2 : 1);
    const int64_t unit_bytes = static_cast<int64_t>(8 * WPT) * a.ncols * 4 * 8;  // per path
    a.NUT = static_cast<int>((in + 128 * WPT - 1) / (128 * WPT));
    int64_t budget = 96 * 1024;
    int64_t fit = budget / (K * unit_bytes);
    if (fit < 1) {
        budget = dev.smem_optin - 1024;
        fit = budget / (K * unit_bytes);
    }
    if (fit < 1) return cudaErrorInvalidConfiguration;  // cannot happen for K <= 4, M chunk <= 16
    int CS = 8;
    while (CS > 1 && (CS > fit || CS > a.NUT)) CS >>= 1;
    a.CS = CS;
    a.RT = 8 / CS;
    const int64_t cap = (fit / CS) * CS;
    a.nslabs = static_cast<int>((a.NUT + cap - 1) / cap);
    a.SU = static_cast<int>((a.NUT + a.nslabs - 1) / a.nslabs);
    const int64_t smem_b = static_cast<int64_t>(K) * a.SU * unit_bytes;
    const int64_t smem_r = static_cast<int64_t>(CS) * 16 * a.RT * a.ncols * 4;
    const int smem = static_cast<int>(smem_b > smem_r ? smem_b : smem_r);
    a.vec = (a.nw % WPT == 0) && (reinterpret_cast<uintptr_t>(packed) % (4 * WPT) == 0);
    const int64_t tiles = (out + 16 * a.RT - 1) / (16 * a.RT);
    const unsigned gx = static_cast<unsigned>(tiles);
    auto vec16 = [&](const void *p, int dt) {
        return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (in % (dt == RABIT_F32 ? 4 : 8) == 0);
    };
    a.xvec = vec16(x, xdt);
    a.hvec = vec16(h, hdt);
    const unsigned gz = static_cast<unsigned>((M + kDecodeMaxM - 1) / kDecodeMaxM);
    return with_paths(K, [&](auto k) { return launch_decode_k<decltype(k)::value>(a, NT, smem, gx, gz, s); });
}

}  // namespace

int packed_linear_path(rabit_dtype xdt, int64_t M) {
    if (xdt == RABIT_F32) return 0;
    return M > kDecodeMaxM ? 1 : 2;
}

/* Which decode kernel runs (fp16/bf16 x, M <= kDecodeMaxM). Measured on an H200 (docs/kernels.md, 2026-11-26):
   the 1-bit kernel is faster than int8 at M = 1 for long rows (in = 11008: 12.2 against 13.6 us; in = 14336: 13.7
   against 15.7 us) and slower for 8 groups per row (in = 4096: 8.2 against 7.6 us at 4096 x 4096) and at M = 2
   (two blocks per SM do not fit its registers), so it runs for M = 1 and in > 7680 (at least 16 groups of 512
   columns); the two give bit-identical outputs. The fp16 kernel runs from M = kF16MinM on, where the int8 kernel's
   digits (4 n-columns per row of x) make it slow: since its prologue runs one block per row of x (thirty-eighth
   session, H200, bench_kernels_NVIDIA_H200_2026-11-29_s38-land.json, forced column) its time hardly grows with M up
   to 8: 4096 x 4096 at M = 2 / 4 6.21 / 6.27 against int8's 8.62 / 12.18 us; at M = 4 it was 1.3-1.9x faster at all
   nine 7B and 2048-wide shapes, at M = 2 faster at six and 1-2 % slower at three (in = 4096 with 11008-14336 rows,
   4096 x 14336). It rounds x*h to fp16, so from that M on a layer is as accurate as a dense fp16 layer rather than
   float32-accurate (relative error against float64 3.0e-4 against int8's 2.05e-4 there). Small narrow layers take the CUDA-core kernel of one launch (twenty-first session,
   H200, µs against int8 at M = 1 / 2 / 4; bench_kernels_NVIDIA_H200_2026-11-27_s21-narrow-simt.json): SmolLM2's
   576 x 576 3.99 / 4.87 / 6.41 against 6.08 / 6.71 / 8.32, 576 x 1536 4.77 / 5.93 / 7.92 against 6.13 / 6.79 / 8.39;
   but 2048 x 2048 6.47 / 8.68 / 12.31 against 6.52 / 7.17 / 8.71 and 8192 x 2048 13.84 against 9.93 at M = 1
   (every block builds x*h of all columns, and a thread's additions grow with M). So it runs for M <= kSimtDefaultMaxM,
   in <= kSimtDefaultMaxIn and out * in <= kSimtDefaultMaxWeights. kSimtDefaultMaxM is 2 since the fp16 kernel
   (a path per warp on these layers) took M = 2-4 (thirty-ninth session, H200, µs, forced simt against f16;
   bench_kernels_NVIDIA_H200_2026-11-29_s39-ps-narrow-forced.json): M = 2 576 x 576 3.00 / 3.32, 1536 x 576 3.11 /
   3.40, 576 x 1536 3.66 / 3.56; M = 4 3.52 / 3.31, 3.65 / 3.45, 4.72 / 3.49 (the four SmolLM2 shapes). RABIT_CUDA_DECODE=i8, f16 (any M), b1, b1p (M <= 2)
   or simt (where simt_applies) forces one (benchmarks, tests); elsewhere the default runs. simt_applies also asks
   whether the device's shared memory holds the kernel's (not every GPU does for K = 4 at M = 4). At M = 1 a launch
   with enough 16-row tiles (all its layers together: launch_out; 1.2 a resident block) takes the persistent 1-bit
   kernel first
   (decode_b1p_default, thirtieth session: 12.6-14.6 against 15.4-17.7 us at the 7B shapes with 11008-14336 rows,
   q/k/v 15.2 against 16.9, gate/up 19.8 against 24.9). RABIT_CUDA_DECODE=b1p forces it (M <= 2; at M = 2, and
   where its fragments do not fit in shared memory, the 1-bit kernel runs). */
constexpr int64_t kB1MinIn = 15 * 512 + 1;  // at least 16 groups of 512 columns per row
constexpr int64_t kF16MinM = 2;
constexpr int64_t kSimtDefaultMaxM = 2;
constexpr int64_t kSimtDefaultMaxIn = 1536;
constexpr int64_t kSimtDefaultMaxWeights = int64_t{3} << 20;

DecodeKernel decode_kernel(int K, int64_t M, int64_t in, int64_t out, int64_t launch_out) {
    if (launch_out <= 0) launch_out = out;
    const char *v = getenv("RABIT_CUDA_DECODE");
    if (v && strcmp(v, "i8") == 0) return DECODE_I8;
    if (v && strcmp(v, "f16") == 0) return DECODE_F16;
    if (v && strcmp(v, "b1") == 0 && M <= kB1MaxM) return DECODE_B1;
    if (v && strcmp(v, "b1p") == 0 && M <= kB1MaxM) return DECODE_B1P;
    if (v && strcmp(v, "simt") == 0 && simt_applies(K, M, in)) return DECODE_SIMT;
    if (M <= kSimtDefaultMaxM && in <= kSimtDefaultMaxIn && out * in <= kSimtDefaultMaxWeights &&
        simt_applies(K, M, in))
        return DECODE_SIMT;
    if (M == 1 && decode_b1p_default(K, in, launch_out)) return DECODE_B1P;
    if (M == 1 && in >= kB1MinIn) return DECODE_B1;
    return M >= kF16MinM ? DECODE_F16 : DECODE_I8;
}

size_t packed_linear_workspace_bytes(rabit_dtype xdt, int64_t M, int K, int64_t in, int64_t out) {
    return packed_linear_path(xdt, M) == 2 && M > 0 ? decode_workspace_bytes(K, M, in, decode_kernel(K, M, in, out)) : 0;
}

cudaError_t packed_linear(const void *x, rabit_dtype xdt, int64_t M, const rabit_word_t *packed, const void *g,
                          rabit_dtype gdt, const void *h, rabit_dtype hdt, const void *bias, rabit_dtype bdt, int K,
                          int64_t out, int64_t in, void *y, void *workspace, cudaStream_t s) {
    if (M == 0) return cudaSuccess;
    if (K < 1 || K > RABIT_MAX_K) return cudaErrorInvalidValue;
    const int path = packed_linear_path(xdt, M);
    if (path == 0) return launch_decode(x, xdt, M, packed, g, gdt, h, hdt, bias, bdt, K, out, in, y, s);
    if (path == 2)
    {
        const DecodeLayer layer{packed, g, h, bias, y, out};
        return decode_gemv(x, xdt, M, &layer, 1, gdt, hdt, bdt, K, in, workspace, decode_kernel(K, M, in, out), s);
    }
    if (gdt != RABIT_F32 || hdt != RABIT_F32 || (bias && bdt != RABIT_F32)) return cudaErrorInvalidValue;
    return packed_prefill(x, xdt, M, packed, static_cast<const float *>(g), static_cast<const float *>(h),
                          static_cast<const float *>(bias), K, out, in, y, s);
}

}  // namespace rabit_cuda
