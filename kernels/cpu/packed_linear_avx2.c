/*
 * AVX2 packed GEMV/GEMM over the nibble tables (packed_linear.h): the eight lanes are eight output rows,
 * RABIT_AVX2_ROWS / 8 vectors per block so that each table load serves all of them (the tables stream from L2).
 * Per nibble of a word: the rows' nibbles pick their entries of the shared 8-entry table with one
 * vpermps (index n, or ~n when bit 3 is set), the sign is flipped where bit 3 is set, and the result is
 * added: no multiplies, ~9 instructions for 32 weights. The rows' words are read 8 at a time and transposed, so
 * that a lane holds its row's word. Compiled with a target attribute, called only
 * when the CPU reports AVX2 (no -march=native in the build).
 */
#include "../rabit_dtype.h"
#include "packed_linear.h"

#ifdef RABIT_HAVE_AVX2_KERNEL
#include <immintrin.h>

#define RABIT_AVX2 __attribute__((target("avx2")))

#define RABIT_AVX2_VECS (RABIT_AVX2_ROWS / 8)
#define RABIT_AVX2_PF_DIST 32 /* words: one 128-byte stretch of each row ahead (8, 32, 64 timed here; 32 best) */

/* r[i] = words w0 .. w0+7 of row i  ->  r[j] = word w0 + j of rows 0 .. 7 (lane = row). */
RABIT_AVX2 static inline void rabit_transpose8(__m256i r[8]) {
    __m256i t[8], u[8];
    int i;
    for (i = 0; i < 8; i += 2) { /* 128-bit half L of t[i]: rows i, i+1 of words 4L, 4L+1; of t[i+1]: 4L+2, 4L+3 */
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (i = 0; i < 8; i += 4) { /* half L of u[i + j]: rows i .. i+3 of word 4L + j */
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (i = 0; i < 4; i++) { /* rows 0-3 from u[i], rows 4-7 from u[4 + i] */
        r[i] = _mm256_permute2x128_si256(u[i], u[4 + i], 0x20);
        r[i + 4] = _mm256_permute2x128_si256(u[i], u[4 + i], 0x31);
    }
}

/* rabit_lut_block_fn over RABIT_AVX2_ROWS rows. The rows' words come 8 at a time as one 32-byte load per row and an
   8 x 8 transpose per 8 rows (before: 8 scalar loads and inserts per word and 8 rows, ~1.3x the time of this on the
   2-core AMD EPYC VM), and each row's stream is prefetched ahead (16 streams). */
RABIT_AVX2 void rabit_lut_block_avx2(const float *t, const rabit_word_t *const *pw, int64_t nw, float *a) {
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u), nib1 = _mm256_set1_epi32(0x11111111);
    __m256 acc[RABIT_AVX2_VECS][2];
    /* the block's words, transposed: tw[j][r] = word w0 + j of row r; tx: their table indices (below) */
    __attribute__((aligned(32))) rabit_word_t tw[8][RABIT_AVX2_ROWS], tx[8][RABIT_AVX2_ROWS];
    int64_t w0;
    int b, i, j;
    for (b = 0; b < RABIT_AVX2_VECS; b++) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    for (w0 = 0; w0 < nw; w0 += 8) {
        const int n = nw - w0 < 8 ? (int)(nw - w0) : 8;
        /* a row's last partial chunk by a masked load: its words past the row's end are not read */
        const __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (b = 0; b < RABIT_AVX2_VECS; b++) {
            __m256i r[8];
            for (i = 0; i < 8; i++) {
                const rabit_word_t *row = pw[8 * b + i] + w0;
                r[i] = n == 8 ? _mm256_loadu_si256((const __m256i *)row) : _mm256_maskload_epi32((const int *)row, mk);
                _mm_prefetch((const char *)(row + RABIT_AVX2_PF_DIST), _MM_HINT_T0);
            }
            rabit_transpose8(r);
            for (j = 0; j < 8; j++) {
                /* the words with bits 0..2 of every nibble flipped where its bit 3 is set (t = bit 3 per nibble;
                   8t - t = 7 there, no borrow across nibbles): a nibble's table index, taken once per word
                   instead of an arithmetic shift and an xor per nibble (~2 of 8 ALU instructions a nibble) */
                const __m256i t3 = _mm256_and_si256(_mm256_srli_epi32(r[j], 3), nib1);
                _mm256_store_si256((__m256i *)&tw[j][8 * b], r[j]);
                _mm256_store_si256((__m256i *)&tx[j][8 * b],
                                   _mm256_xor_si256(r[j], _mm256_sub_epi32(_mm256_slli_epi32(t3, 3), t3)));
            }
        }
        for (j = 0; j < n; j++, t += RABIT_LUT_PER_WORD) {
#define RABIT_NIBBLE(Q)                                                                               \
    do {                                                                                              \
        const __m256 tab_ = _mm256_loadu_ps(t + 8 * (Q));                                             \
        for (b = 0; b < RABIT_AVX2_VECS; b++) {                                                       \
            const __m256i w_ = _mm256_load_si256((const __m256i *)&tw[j][8 * b]);                     \
            const __m256i x_ = _mm256_load_si256((const __m256i *)&tx[j][8 * b]);                     \
            /* nibble bit 3 -> bit 31: the sign of the entry; vpermps reads only bits 0..2 of n */    \
            const __m256i s_ = _mm256_and_si256(_mm256_slli_epi32(w_, 28 - 4 * (Q)), sign);           \
            __m256 v_ = _mm256_permutevar8x32_ps(tab_, (Q) ? _mm256_srli_epi32(x_, 4 * (Q)) : x_);     \
            v_ = _mm256_xor_ps(v_, _mm256_castsi256_ps(s_));                                          \
            acc[b][(Q) & 1] = _mm256_add_ps(acc[b][(Q) & 1], v_);                                     \
        }                                                                                             \
    } while (0)
            RABIT_NIBBLE(0);
            RABIT_NIBBLE(1);
            RABIT_NIBBLE(2);
            RABIT_NIBBLE(3);
            RABIT_NIBBLE(4);
            RABIT_NIBBLE(5);
            RABIT_NIBBLE(6);
            RABIT_NIBBLE(7);
#undef RABIT_NIBBLE
        }
    }
    for (b = 0; b < RABIT_AVX2_VECS; b++) _mm256_storeu_ps(a + 8 * b, _mm256_add_ps(acc[b][0], acc[b][1]));
}

/* rabit_dequantize_row_scalar with 8 columns a vector: lane l of byte q tests bit 8q + l with a constant mask and,
   where it is clear, flips the sign bit of g * h (exactly (-g) * h); the tail past the last whole word is scalar. */
RABIT_AVX2 void rabit_dequantize_row_avx2(const rabit_word_t *pw, float g, const float *h, int64_t in, int first,
                                          float *acc) {
    const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    const __m256 gv = _mm256_set1_ps(g);
    const int64_t whole = in / RABIT_WORD_BITS;
    int64_t w;
    for (w = 0; w < whole; w++) {
        const rabit_word_t word = pw[w];
        int q;
        for (q = 0; q < 4; q++) {
            const int64_t j = w * RABIT_WORD_BITS + 8 * q;
            const __m256i bits = _mm256_and_si256(_mm256_set1_epi32((int)((word >> (8 * q)) & 0xFFu)), lane_bits);
            const __m256i clear = _mm256_cmpeq_epi32(bits, _mm256_setzero_si256());
            __m256 v = _mm256_mul_ps(gv, _mm256_loadu_ps(h + j));
            v = _mm256_xor_ps(v, _mm256_castsi256_ps(_mm256_and_si256(clear, sign)));
            _mm256_storeu_ps(acc + j, first ? v : _mm256_add_ps(_mm256_loadu_ps(acc + j), v));
        }
    }
    if (whole * RABIT_WORD_BITS < in)
        rabit_dequantize_row_scalar(pw + whole, g, h + whole * RABIT_WORD_BITS, in - whole * RABIT_WORD_BITS, first,
                                    acc + whole * RABIT_WORD_BITS);
}

/* rabit_lut8_build_scalar with the 8 entries of a nibble in one vector: lane i negates c_j (a sign-bit flip, exact)
   where bit j of i is clear, then ((s0 + s1) + s2) - c3 as in the scalar code. */
RABIT_AVX2 void rabit_lut8_build_avx2(const float *xh, int64_t n, float *lut) {
    const __m256 m0 = _mm256_castsi256_ps(_mm256_setr_epi32(INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0));
    const __m256 m1 = _mm256_castsi256_ps(_mm256_setr_epi32(INT32_MIN, INT32_MIN, 0, 0, INT32_MIN, INT32_MIN, 0, 0));
    const __m256 m2 = _mm256_castsi256_ps(_mm256_setr_epi32(INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, 0, 0, 0, 0));
    int64_t j;
    for (j = 0; j < n; j++) {
        const float *c = xh + 4 * j;
        const __m256 s0 = _mm256_xor_ps(_mm256_broadcast_ss(c), m0);
        const __m256 s1 = _mm256_xor_ps(_mm256_broadcast_ss(c + 1), m1);
        const __m256 s2 = _mm256_xor_ps(_mm256_broadcast_ss(c + 2), m2);
        const __m256 t = _mm256_sub_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), s2), _mm256_broadcast_ss(c + 3));
        _mm256_storeu_ps(lut + 8 * j, t);
    }
}
__attribute__((target("avx2,f16c"))) void rabit_f16_to_f32_f16c(const uint16_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = rabit_f16_to_f32(src[i]);
}
#endif
