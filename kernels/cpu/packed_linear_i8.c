/*
 * Packed GEMV/GEMM on int8 activations (an opt-in accuracy class, like the GPU's fp16 decode kernel): T-MAC's int8
 * tables looked up 32 at a time with vpshufb, where the float32 table kernel (packed_linear.h) looks up 8 with
 * vpermps and flips signs.
 *
 * Tables, per row of x, path k and group of 4 columns (c = 4t .. 4t+3): the 8 float32 entries of packed_linear.h,
 * e[i] = ((s0 + s1) + s2) - xh3 (s_j = ±xh_j by bit j of i), and e[n] = -e[~n & 7] for n = 8..15 (bit j of n set:
 * +xh_j). Per block of 128 columns (32 groups) mx = the largest |e| (the largest sum of |xh| of a group, as
 * computed), scale s = mx / 127, and entry q[n] = rint(e[n] * (127 / mx)), in [-127, 127] (0 where mx < 2^-120,
 * taken as 0). A row's
 * block sum is the exact integer sum of its 32 groups' entries; y = Σ_k g_k Σ_blocks s_b * sum_b, in float32, in
 * this order: rs = 0; rs = rs + s_b * (float)sum_b for b = 0, 1, ...; y = ((0 + g_0*rs_0) + g_1*rs_1) + ... + bias.
 * The scalar and AVX2 kernels give the same bits (integer sums are exact); rabit.reference.packed_linear_i8 is the
 * same arithmetic in PyTorch. A NaN or Inf in a row of x makes that row's outputs NaN.
 *
 * Accuracy: the int8 rounding of the tables, a relative error of ~1e-2 of a layer's output (docs/kernels.md), the
 * class of llama.cpp's int8 activations (Q8_K), not the float32 level of rabit_packed_linear_cpu.
 *
 * Layout (rabit_i8_layout_cpu, built once from the packed words): per path k, block of 16 rows and chunk of 16
 * columns (groups G0..G3), 32 bytes: byte 2r = nibble(row r, G0) | nibble(row r, G2) << 4, byte 2r + 1 =
 * nibble(row r, G1) | nibble(row r, G3) << 4; rows past `out` and columns past `in` are zero bits (their x is 0).
 * A nibble's bit j is column 4t + j's sign bit (set: +1), as in the packed words. One bit a weight, as the packed
 * words, but padded to multiples of 16 rows and 128 columns (+11 % at SmolLM2's 576 columns).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../rabit_dtype.h"
#include "packed_linear.h"

#define I8_ROWS 16    /* rows of a layout vector */
#define I8_CHUNK 16   /* columns of a layout vector */
#define I8_BLOCK 128  /* columns per table scale (8 chunks): a block's integer sum fits int16 (32 x 127) */
#define I8_CHUNKS_PER_BLOCK (I8_BLOCK / I8_CHUNK)

static int64_t i8_in_pad(int64_t in) { return (in + I8_BLOCK - 1) / I8_BLOCK * I8_BLOCK; }
static int64_t i8_row_blocks(int64_t out) { return (out + I8_ROWS - 1) / I8_ROWS; }

int64_t rabit_i8_layout_bytes(int64_t K, int64_t out, int64_t in) {
    return K * i8_row_blocks(out) * (i8_in_pad(in) / I8_CHUNK) * 32;
}

static unsigned i8_nibble(const rabit_word_t *packed, int64_t nw, int64_t K_out_row, int64_t col, int64_t in) {
    if (col >= in) return 0u;
    return (packed[K_out_row * nw + col / RABIT_WORD_BITS] >> (col % RABIT_WORD_BITS)) & 15u;
}

rabit_status rabit_i8_layout_cpu(const rabit_word_t *packed, int64_t K, int64_t out, int64_t in, uint8_t *layout) {
    const int64_t nw = RABIT_WORDS(in), nrb = i8_row_blocks(out), nch = i8_in_pad(in) / I8_CHUNK;
    int64_t k, rb, c;
    if (!packed || !layout || K < 1 || K > RABIT_MAX_K || out < 1 || in < 1) return RABIT_ERR_ARG;
    for (k = 0; k < K; k++)
        for (rb = 0; rb < nrb; rb++)
            for (c = 0; c < nch; c++) {
                uint8_t *v = layout + ((k * nrb + rb) * nch + c) * 32;
                int r;
                for (r = 0; r < I8_ROWS; r++) {
                    const int64_t o = rb * I8_ROWS + r, col = c * I8_CHUNK;
                    unsigned n0 = 0, n1 = 0, n2 = 0, n3 = 0;
                    if (o < out) {
                        /* col is a multiple of 16, so each group's 4 bits lie in one word (4 | 32) */
                        n0 = i8_nibble(packed, nw, k * out + o, col, in);
                        n1 = i8_nibble(packed, nw, k * out + o, col + 4, in);
                        n2 = i8_nibble(packed, nw, k * out + o, col + 8, in);
                        n3 = i8_nibble(packed, nw, k * out + o, col + 12, in);
                    }
                    v[2 * r] = (uint8_t)(n0 | n2 << 4);
                    v[2 * r + 1] = (uint8_t)(n1 | n3 << 4);
                }
            }
    return RABIT_OK;
}

/* The int8 tables of one row of xh (in_pad columns, zero past `in`): q [in_pad / 4][16], s [in_pad / 128]. Scalar:
   the float32 entries of rabit_lut8_build_scalar, then the rounding above. */
static void i8_tables_scalar(const float *xh, int64_t in_pad, int8_t *q, float *s) {
    const int64_t nb = in_pad / I8_BLOCK;
    float e[I8_BLOCK / 4][8];
    int64_t b;
    for (b = 0; b < nb; b++) {
        float mx = 0.0f;
        int finite = 1, t, i;
        rabit_lut8_build_scalar(xh + b * I8_BLOCK, I8_BLOCK / 4, &e[0][0]);
        for (t = 0; t < I8_BLOCK / 4; t++)
            for (i = 0; i < 8; i++) {
                const float a = fabsf(e[t][i]);
                if (!isfinite(a)) finite = 0;
                else if (a > mx) mx = a;
            }
        if (!finite) { /* the row's outputs become NaN (s = NaN), whatever the integer sums */
            s[b] = NAN;
            memset(q + b * I8_BLOCK / 4 * 16, 0, I8_BLOCK / 4 * 16);
            continue;
        }
        if (mx < RABIT_I8_MIN_AMAX) mx = 0.0f;
        s[b] = mx / 127.0f;
        {
            const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
            for (t = 0; t < I8_BLOCK / 4; t++) {
                int8_t *qt = q + (b * I8_BLOCK / 4 + t) * 16;
                for (i = 0; i < 8; i++) {
                    const int v = (int)rintf(e[t][i] * inv);
                    qt[i] = (int8_t)v;
                    qt[15 - i] = (int8_t)-v; /* n = 15 - i = ~i & 15: bit 3 set, e[n] = -e[i] (rint is odd) */
                }
            }
        }
    }
}

/* Rows rb*16 .. +15 of one path, every block: rs[r] = Σ_b s_b * sum_b(r), scalar. */
static void i8_rows_scalar(const uint8_t *lay, const int8_t *q, const float *s, int64_t nch, float *rs) {
    int64_t c;
    int r;
    int32_t acc[I8_ROWS] = {0};
    for (r = 0; r < I8_ROWS; r++) rs[r] = 0.0f;
    for (c = 0; c < nch; c++) {
        const uint8_t *v = lay + c * 32;
        const int8_t *t = q + c * 4 * 16; /* groups 4c .. 4c + 3 */
        for (r = 0; r < I8_ROWS; r++) {
            const unsigned b0 = v[2 * r], b1 = v[2 * r + 1];
            acc[r] += t[b0 & 15u] + t[16 + (b1 & 15u)] + t[32 + (b0 >> 4)] + t[48 + (b1 >> 4)];
        }
        if ((c + 1) % I8_CHUNKS_PER_BLOCK == 0) {
            const float sb = s[c / I8_CHUNKS_PER_BLOCK];
            for (r = 0; r < I8_ROWS; r++) {
                rs[r] = rs[r] + sb * (float)acc[r];
                acc[r] = 0;
            }
        }
    }
}

#ifdef RABIT_HAVE_AVX2_KERNEL
#include <immintrin.h>

/* The same sums with 16 rows a vector: per 32 layout bytes two nibble vectors, four vpshufb (a table per group,
   broadcast to both 128-bit halves: rows 0-7 and 8-15), two byte blends (even bytes: G0 / G2, odd: G1 / G3) and two
   vpmaddubsw against ones, which add a row's two bytes into its int16 lane; flushed to float32 per block. */
__attribute__((target("avx2"))) static void i8_rows_avx2(const uint8_t *lay, const int8_t *q, const float *s,
                                                         int64_t nch, float *rs) {
    const __m256i lo4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi8(1);
    const __m256i odd = _mm256_set1_epi16((short)0xFF00);
    __m256 r0 = _mm256_setzero_ps(), r1 = _mm256_setzero_ps();
    int64_t c0;
    for (c0 = 0; c0 < nch; c0 += I8_CHUNKS_PER_BLOCK) {
        __m256i acc = _mm256_setzero_si256();
        int c;
        /* the layout 1 KB ahead (this path's next row block follows its last chunk): 9-15 % faster on weights cycled
           through more than the L3, as in a decode step (a C A/B on the 2-core AVX2 VM, 512 / 1024 / 2048 bytes) */
        for (c = 0; c < I8_CHUNKS_PER_BLOCK * 32; c += 64) _mm_prefetch((const char *)(lay + c0 * 32 + 1024 + c), _MM_HINT_T0);
        for (c = 0; c < I8_CHUNKS_PER_BLOCK; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(lay + (c0 + c) * 32));
            const int8_t *t = q + (c0 + c) * 64;
            const __m256i ta = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t));
            const __m256i tb = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(t + 16)));
            const __m256i tc = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(t + 32)));
            const __m256i td = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(t + 48)));
            const __m256i nl = _mm256_and_si256(v, lo4), nh = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
            const __m256i ab = _mm256_blendv_epi8(_mm256_shuffle_epi8(ta, nl), _mm256_shuffle_epi8(tb, nl), odd);
            const __m256i cd = _mm256_blendv_epi8(_mm256_shuffle_epi8(tc, nh), _mm256_shuffle_epi8(td, nh), odd);
            acc = _mm256_add_epi16(acc, _mm256_add_epi16(_mm256_maddubs_epi16(ones, ab), _mm256_maddubs_epi16(ones, cd)));
        }
        {
            const __m256 sb = _mm256_set1_ps(s[c0 / I8_CHUNKS_PER_BLOCK]);
            const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc)));
            const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc, 1)));
            r0 = _mm256_add_ps(r0, _mm256_mul_ps(sb, f0));
            r1 = _mm256_add_ps(r1, _mm256_mul_ps(sb, f1));
        }
    }
    _mm256_storeu_ps(rs, r0);
    _mm256_storeu_ps(rs + 8, r1);
}

/* i8_tables_scalar with a group's 8 entries in one vector (rabit_lut8_build_avx2's, the same bits), the block's
   max by vmaxps (a NaN or Inf is caught apart: vmaxps would drop a NaN), the rounding by vcvtps2dq (nearest-even,
   as rintf) and the 16 bytes of a group (v, then -v reversed) by two packs and two permutes. */
__attribute__((target("avx2"))) static void i8_tables_avx2(const float *xh, int64_t in_pad, int8_t *q, float *s) {
    const int64_t nb = in_pad / I8_BLOCK;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)), inf = _mm256_set1_ps(INFINITY);
    const __m256i rev = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    __attribute__((aligned(32))) float e[I8_BLOCK / 4][8];
    int64_t b;
    for (b = 0; b < nb; b++) {
        __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        float m8[8], mxs = 0.0f;
        int t, i;
        rabit_lut8_build_avx2(xh + b * I8_BLOCK, I8_BLOCK / 4, &e[0][0]);
        for (t = 0; t < I8_BLOCK / 4; t++) {
            const __m256 a = _mm256_and_ps(_mm256_load_ps(e[t]), absmask);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ)); /* NaN or Inf */
            mx = _mm256_max_ps(mx, a);
        }
        if (_mm256_movemask_ps(bad)) {
            s[b] = NAN;
            memset(q + b * I8_BLOCK / 4 * 16, 0, I8_BLOCK / 4 * 16);
            continue;
        }
        _mm256_storeu_ps(m8, mx);
        for (i = 0; i < 8; i++) mxs = m8[i] > mxs ? m8[i] : mxs;
        if (mxs < RABIT_I8_MIN_AMAX) mxs = 0.0f;
        s[b] = mxs / 127.0f;
        {
            const __m256 inv = _mm256_set1_ps(mxs > 0.0f ? 127.0f / mxs : 0.0f);
            for (t = 0; t < I8_BLOCK / 4; t++) {
                const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(e[t]), inv));
                const __m256i nr = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_permutevar8x32_epi32(v, rev));
                /* int16 [v0-3 nr0-3 | v4-7 nr4-7] -> [v0-7 | nr0-7] -> bytes [v0-7 v0-7 | nr0-7 nr0-7] */
                const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(v, nr), 0xD8);
                const __m256i by = _mm256_permute4x64_epi64(_mm256_packs_epi16(w, w), 0x08);
                _mm_storeu_si128((__m128i *)(q + (b * I8_BLOCK / 4 + t) * 16), _mm256_castsi256_si128(by));
            }
        }
    }
}
#endif

typedef void (*i8_rows_fn)(const uint8_t *lay, const int8_t *q, const float *s, int64_t nch, float *rs);
typedef void (*i8_tables_fn)(const float *xh, int64_t in_pad, int8_t *q, float *s);

rabit_status rabit_packed_linear_i8_cpu(const void *x, rabit_dtype xdt, int64_t M, const uint8_t *layout,
                                        const void *g, rabit_dtype gdt, const void *h, rabit_dtype hdt,
                                        const float *bias, int64_t K, int64_t out, int64_t in, void *y) {
    const int64_t in_pad = i8_in_pad(in), nch = in_pad / I8_CHUNK, nrb = i8_row_blocks(out);
    const int64_t nq = K * (in_pad / 4) * 16, ns = K * (in_pad / I8_BLOCK);
    i8_rows_fn rows = i8_rows_scalar;
    i8_tables_fn tables = i8_tables_scalar;
    float *buf, *xh, *row, *gc, *hc, *s, *yf;
    const float *gf, *hf;
    int8_t *q;
    int64_t m;
    if (!x || !layout || !g || !h || !y || M < 0 || K < 1 || K > RABIT_MAX_K || out < 1 || in < 1)
        return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(xdt) || !rabit_dtype_valid(gdt) || !rabit_dtype_valid(hdt)) return RABIT_ERR_UNSUPPORTED;
    if (M == 0) return RABIT_OK;
#ifdef RABIT_HAVE_AVX2_KERNEL
    if (rabit_cpu_table_kernel() != RABIT_CPU_REF && rabit_cpu_has_avx2()) {
        rows = i8_rows_avx2;
        tables = i8_tables_avx2;
    }
#endif
    /* one scratch block: xh of one row (all paths), x's row, g, h, scales, y (float32), then the int8 tables */
    buf = (float *)aligned_alloc(64, (size_t)((K * in_pad + in + K * out + K * in + ns + M * out + nq / 4 + 31) & ~15) *
                                         sizeof(float));
    if (!buf) return RABIT_ERR_NOMEM;
    xh = buf;
    row = xh + K * in_pad;
    gc = row + in;
    hc = gc + K * out;
    s = hc + K * in;
    yf = s + ns;
    q = (int8_t *)(yf + M * out);
    /* float32 scales are read in place (a decoder keeps float32 copies: ~0.4 ms of conversions a SmolLM2 step) */
    if (gdt == RABIT_F32) gf = (const float *)g;
    else rabit_cpu_load_f32(g, gdt, 0, K * out, gc), gf = gc;
    if (hdt == RABIT_F32) hf = (const float *)h;
    else rabit_cpu_load_f32(h, hdt, 0, K * in, hc), hf = hc;
    memset(xh, 0, (size_t)(K * in_pad) * sizeof(float)); /* zero past `in` */
    for (m = 0; m < M; m++) {
        rabit_cpu_load_f32(x, xdt, m * in, in, row);
        /* one team for the row: the paths' tables split over the threads (the next loop waits for them at the
           implicit barrier), then the row blocks; each table and output is computed whole by one thread */
#pragma omp parallel if (out * RABIT_WORDS(in) * K >= RABIT_PARALLEL_MIN_WORDS)
        {
            int64_t kt, rb;
#pragma omp for schedule(static)
            for (kt = 0; kt < K; kt++) {
                int64_t jj;
                for (jj = 0; jj < in; jj++) xh[kt * in_pad + jj] = hf[kt * in + jj] * row[jj];
                tables(xh + kt * in_pad, in_pad, q + kt * (in_pad / 4) * 16, s + kt * (in_pad / I8_BLOCK));
            }
#pragma omp for schedule(static)
            for (rb = 0; rb < nrb; rb++) {
                float yo[I8_ROWS] = {0}, rs[I8_ROWS];
                const int64_t o0 = rb * I8_ROWS;
                const int n = out - o0 < I8_ROWS ? (int)(out - o0) : I8_ROWS;
                int64_t kk;
                int r;
                for (kk = 0; kk < K; kk++) {
                    rows(layout + (kk * nrb + rb) * nch * 32, q + kk * (in_pad / 4) * 16,
                         s + kk * (in_pad / I8_BLOCK), nch, rs);
                    for (r = 0; r < n; r++) yo[r] = yo[r] + gf[kk * out + o0 + r] * rs[r];
                }
                for (r = 0; r < n; r++) yf[m * out + o0 + r] = bias ? yo[r] + bias[o0 + r] : yo[r];
            }
        }
    }
    rabit_store_f32(y, xdt, 0, M * out, yf);
    free(buf);
    return RABIT_OK;
}
