/*
 * AVX2 packed GEMV/GEMM over the nibble tables (packed_linear.h): the eight lanes are eight output rows,
 * two vectors (16 rows) per block so that each table load serves both (the tables stream from L2).
 * Per nibble of a word: the rows' nibbles pick their entries of the shared 8-entry table with one
 * vpermps (index n, or ~n when bit 3 is set), the sign is flipped where bit 3 is set, and the result is
 * added: no multiplies, ~9 instructions for 32 weights. Compiled with a target attribute, called only
 * when the CPU reports AVX2 (no -march=native in the build).
 */
#include "../rabit_dtype.h"
#include "packed_linear.h"

#ifdef RABIT_HAVE_AVX2_KERNEL
#include <immintrin.h>

#define RABIT_AVX2 __attribute__((target("avx2")))

/* rabit_lut_block_fn over RABIT_AVX2_ROWS rows. */
RABIT_AVX2 void rabit_lut_block_avx2(const float *t, const rabit_word_t *const *pw, int64_t nw, float *a) {
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    __m256 acc[2][2] = {{_mm256_setzero_ps(), _mm256_setzero_ps()}, {_mm256_setzero_ps(), _mm256_setzero_ps()}};
    int64_t w;
    for (w = 0; w < nw; w++, t += RABIT_LUT_PER_WORD) {
        __m256i wv[2];
        int h;
        for (h = 0; h < 2; h++) {
            const rabit_word_t *const *p = pw + 8 * h;
            wv[h] = _mm256_setr_epi32((int)p[0][w], (int)p[1][w], (int)p[2][w], (int)p[3][w], (int)p[4][w],
                                      (int)p[5][w], (int)p[6][w], (int)p[7][w]);
        }
#define RABIT_NIBBLE(Q)                                                                               \
    do {                                                                                              \
        const __m256 tab_ = _mm256_loadu_ps(t + 8 * (Q));                                             \
        int h_;                                                                                       \
        for (h_ = 0; h_ < 2; h_++) {                                                                  \
            const __m256i s_ = _mm256_slli_epi32(wv[h_], 28 - 4 * (Q)); /* nibble bit 3 -> bit 31 */  \
            const __m256i m_ = _mm256_srai_epi32(s_, 31);               /* all ones where set */      \
            const __m256i n_ = _mm256_srli_epi32(wv[h_], 4 * (Q));      /* the nibble in bits 0..3 */ \
            __m256 v_ = _mm256_permutevar8x32_ps(tab_, _mm256_xor_si256(n_, m_));                     \
            v_ = _mm256_xor_ps(v_, _mm256_castsi256_ps(_mm256_and_si256(m_, sign)));                  \
            acc[h_][(Q) & 1] = _mm256_add_ps(acc[h_][(Q) & 1], v_);                                   \
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
    _mm256_storeu_ps(a, _mm256_add_ps(acc[0][0], acc[0][1]));
    _mm256_storeu_ps(a + 8, _mm256_add_ps(acc[1][0], acc[1][1]));
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
