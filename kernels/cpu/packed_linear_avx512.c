/*
 * AVX-512 packed GEMV/GEMM over 16-entry nibble tables (packed_linear.h): the sixteen lanes of a vector are
 * sixteen output rows, RABIT_AVX512_ROWS (64) rows per block so that each table load serves several vectors. A row's
 * nibble n is the index of one vpermps into the nibble's 16-entry table (the 8 entries and their negations,
 * rabit_lut_value's values), so a lookup is a shift, a permute and an add per 16 rows and 4 columns: no index or
 * sign fix-ups as in the 8-entry AVX2 kernel. The packed words of 16 rows are turned into per-word vectors by a
 * 16 x 16 transpose per 16 words. Same tables' values and summation order as the scalar kernel, so bit-identical
 * to it. Compiled with a target attribute, called only when the CPU reports AVX-512F.
 */
#include "packed_linear.h"

#ifdef RABIT_HAVE_AVX512_KERNEL
#include <immintrin.h>

#define RABIT_AVX512 __attribute__((target("avx512f")))
#define RABIT_PF_DIST 32 /* words: two 64-byte lines of each row ahead (measured best of 0, 32, 64, 128 here) */
#define RABIT_AVX512_VECS (RABIT_AVX512_ROWS / 16)

/* r[i] = words w0 .. w0+15 of row i  ->  r[j] = word w0 + j of rows 0 .. 15 (lane = row). */
RABIT_AVX512 static inline void rabit_transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    int i, j;
    for (i = 0; i < 16; i += 2) { /* lane L of t[i]: rows i, i+1 of words 4L, 4L+1 (t[i]), 4L+2, 4L+3 (t[i+1]) */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (i = 0; i < 16; i += 4) { /* lane L of u[i + j]: rows i .. i+3 of word 4L + j */
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (j = 0; j < 4; j++) { /* 128-bit lanes: row groups side by side */
        const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);  /* rows 0-3, 4-7 of words j, j+8 */
        const __m512i v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);  /* ... of words j+4, j+12 */
        const __m512i x0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
        const __m512i x1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
        r[j] = _mm512_shuffle_i32x4(v0, x0, 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(v0, x0, 0xDD);
        r[j + 4] = _mm512_shuffle_i32x4(v1, x1, 0x88);
        r[j + 12] = _mm512_shuffle_i32x4(v1, x1, 0xDD);
    }
}

/* rabit_lut_block_fn over RABIT_AVX512_ROWS rows, on 16-entry tables. */
RABIT_AVX512 void rabit_lut_block_avx512(const float *t, const rabit_word_t *const *pw, int64_t nw, float *a) {
    __m512 acc[RABIT_AVX512_VECS][2];
    /* the block's words, transposed: tw[j][r] = word w0 + j of row r */
    __attribute__((aligned(64))) rabit_word_t tw[16][RABIT_AVX512_ROWS];
    int64_t w0;
    int b, i, j;
    for (b = 0; b < RABIT_AVX512_VECS; b++) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
    for (w0 = 0; w0 < nw; w0 += 16) {
        const int n = nw - w0 < 16 ? (int)(nw - w0) : 16;
        const __mmask16 mk = (__mmask16)((1u << n) - 1u);
        for (b = 0; b < RABIT_AVX512_VECS; b++) {
            __m512i r[16];
            for (i = 0; i < 16; i++) {
                r[i] = _mm512_maskz_loadu_epi32(mk, pw[16 * b + i] + w0);
                /* 64 row streams are more than the hardware prefetcher follows */
                _mm_prefetch((const char *)(pw[16 * b + i] + w0 + RABIT_PF_DIST), _MM_HINT_T0);
            }
            rabit_transpose16(r);
            for (j = 0; j < 16; j++) _mm512_store_si512((void *)&tw[j][16 * b], r[j]);
        }
        for (j = 0; j < n; j++, t += RABIT_LUT16_PER_WORD) {
            __m512i wv[RABIT_AVX512_VECS];
            for (b = 0; b < RABIT_AVX512_VECS; b++) wv[b] = _mm512_load_si512((const void *)&tw[j][16 * b]);
#define RABIT_NIBBLE16(Q)                                                                                \
    do {                                                                                                 \
        const __m512 tab_ = _mm512_loadu_ps(t + 16 * (Q));                                               \
        for (b = 0; b < RABIT_AVX512_VECS; b++) /* vpermps reads the index's low 4 bits: the nibble */ \
            acc[b][(Q) & 1] = _mm512_add_ps(                                                             \
                acc[b][(Q) & 1], _mm512_permutexvar_ps(_mm512_srli_epi32(wv[b], 4 * (Q)), tab_));       \
    } while (0)
            RABIT_NIBBLE16(0);
            RABIT_NIBBLE16(1);
            RABIT_NIBBLE16(2);
            RABIT_NIBBLE16(3);
            RABIT_NIBBLE16(4);
            RABIT_NIBBLE16(5);
            RABIT_NIBBLE16(6);
            RABIT_NIBBLE16(7);
#undef RABIT_NIBBLE16
        }
    }
    for (b = 0; b < RABIT_AVX512_VECS; b++) _mm512_storeu_ps(a + 16 * b, _mm512_add_ps(acc[b][0], acc[b][1]));
}

/* The 16-entry tables: lane e of a nibble's vector is rabit_lut_value(t, e), i.e. t[e] for e < 8 and -t[15 - e]
   (= -t[~e & 7]) above, computed as rabit_lut8_build_scalar computes t[i] (i = e or 15 - e: c_j negated by a sign-bit
   flip where bit j of i is clear, ((s0 + s1) + s2) - c3), then negated for e >= 8. Bit for bit the scalar values. */
RABIT_AVX512 void rabit_lut16_build_avx512(const float *xh, int64_t n, float *lut) {
    __m512i mk[4];
    int64_t j;
    int e, b;
    {
        int32_t lanes[4][16];
        for (e = 0; e < 16; e++) {
            const int i = e < 8 ? e : 15 - e;
            for (b = 0; b < 3; b++) lanes[b][e] = (i >> b) & 1 ? 0 : INT32_MIN;
            lanes[3][e] = e < 8 ? 0 : INT32_MIN;
        }
        for (b = 0; b < 4; b++) mk[b] = _mm512_loadu_si512((const void *)lanes[b]);
    }
    for (j = 0; j < n; j++) {
        const float *c = xh + 4 * j;
        const __m512 s0 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_set1_ps(c[0])), mk[0]));
        const __m512 s1 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_set1_ps(c[1])), mk[1]));
        const __m512 s2 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_set1_ps(c[2])), mk[2]));
        const __m512 t = _mm512_sub_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), s2), _mm512_set1_ps(c[3]));
        _mm512_storeu_ps(lut + 16 * j, _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(t), mk[3])));
    }
}
#endif
