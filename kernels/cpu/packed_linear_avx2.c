/*
 * AVX2 packed GEMV/GEMM. Each 32-bit sign word is broadcast, shifted so that bit j lands in the
 * float sign position of lane j, and XORed into h*x: a set bit keeps +x, a clear bit gives -x.
 * No multiplies in the inner loop; four output rows share each load of h*x. Compiled with a
 * target attribute, called only when the CPU reports AVX2 (no -march=native in the build).
 */
#include "packed_linear.h"

#ifdef RABIT_HAVE_AVX2_KERNEL
#include <immintrin.h>

#define RABIT_AVX2 __attribute__((target("avx2")))

RABIT_AVX2 static inline float rabit_hsum_avx2(__m256 acc0, __m256 acc1) {
    const __m256 s = _mm256_add_ps(acc0, acc1);
    const __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    const __m128 u = _mm_add_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps(u, u, 1)));
}

/* ROWS output rows of one (m, k) pair: returns the K-path partial sums a_r. */
#define RABIT_ROW_BLOCK 4

RABIT_AVX2 static void rabit_block_avx2(const float *x, const rabit_word_t *const *pw, int rows, int64_t nw,
                                        float *a) {
    const __m256i signbit = _mm256_set1_epi32((int)0x80000000u);
    const __m256i sh0 = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    const __m256i sh1 = _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16);
    const __m256i sh2 = _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8);
    const __m256i sh3 = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    __m256 acc[RABIT_ROW_BLOCK][2];
    int64_t w;
    int r;
    for (r = 0; r < RABIT_ROW_BLOCK; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#define RABIT_STEP(R, SH, XV, A)                                                                      \
    do {                                                                                              \
        const __m256i s_ = _mm256_sllv_epi32(wv[R], SH);                                              \
        const __m256 flip_ = _mm256_castsi256_ps(_mm256_andnot_si256(s_, signbit));                   \
        acc[R][A] = _mm256_add_ps(acc[R][A], _mm256_xor_ps(XV, flip_));                               \
    } while (0)
    if (rows == RABIT_ROW_BLOCK) {
        for (w = 0; w < nw; w++) {
            const float *xw = x + w * RABIT_WORD_BITS;
            const __m256 x0 = _mm256_loadu_ps(xw), x1 = _mm256_loadu_ps(xw + 8);
            const __m256 x2 = _mm256_loadu_ps(xw + 16), x3 = _mm256_loadu_ps(xw + 24);
            __m256i wv[RABIT_ROW_BLOCK];
            for (r = 0; r < RABIT_ROW_BLOCK; r++) wv[r] = _mm256_set1_epi32((int)pw[r][w]);
            for (r = 0; r < RABIT_ROW_BLOCK; r++) {
                RABIT_STEP(r, sh0, x0, 0);
                RABIT_STEP(r, sh1, x1, 1);
                RABIT_STEP(r, sh2, x2, 0);
                RABIT_STEP(r, sh3, x3, 1);
            }
        }
    } else {
        for (r = 0; r < rows; r++) {
            for (w = 0; w < nw; w++) {
                const float *xw = x + w * RABIT_WORD_BITS;
                __m256i wv[RABIT_ROW_BLOCK];
                wv[r] = _mm256_set1_epi32((int)pw[r][w]);
                RABIT_STEP(r, sh0, _mm256_loadu_ps(xw), 0);
                RABIT_STEP(r, sh1, _mm256_loadu_ps(xw + 8), 1);
                RABIT_STEP(r, sh2, _mm256_loadu_ps(xw + 16), 0);
                RABIT_STEP(r, sh3, _mm256_loadu_ps(xw + 24), 1);
            }
        }
    }
#undef RABIT_STEP
    for (r = 0; r < rows; r++) a[r] = rabit_hsum_avx2(acc[r][0], acc[r][1]);
}

RABIT_AVX2 void rabit_packed_rows_avx2(const float *xh, int64_t M, int64_t in_pad, const rabit_word_t *packed,
                                       const float *g, const float *bias, int64_t K, int64_t out, int64_t in,
                                       int64_t o0, int64_t o1, float *y) {
    const int64_t nw = RABIT_WORDS(in);
    int64_t o, m, k;
    for (o = o0; o < o1; o += RABIT_ROW_BLOCK) {
        const int rows = (int)(o1 - o < RABIT_ROW_BLOCK ? o1 - o : RABIT_ROW_BLOCK);
        for (m = 0; m < M; m++) {
            float yo[RABIT_ROW_BLOCK] = {0};
            int r;
            for (k = 0; k < K; k++) {
                const rabit_word_t *pw[RABIT_ROW_BLOCK];
                float a[RABIT_ROW_BLOCK];
                for (r = 0; r < rows; r++) pw[r] = packed + (k * out + o + r) * nw;
                rabit_block_avx2(xh + (m * K + k) * in_pad, pw, rows, nw, a);
                for (r = 0; r < rows; r++) yo[r] = yo[r] + g[k * out + o + r] * a[r];
            }
            for (r = 0; r < rows; r++) y[m * out + o + r] = bias ? yo[r] + bias[o + r] : yo[r];
        }
    }
}
#endif
