/*
 * Internal interface of the CPU packed GEMV/GEMM. The driver (packed_linear.c) forms
 * xh[m][k][:] = h_k * x_m once per call, zero-padded to whole words, and hands row ranges to one
 * of the row kernels below.
 *
 * Summation order (shared by every CPU kernel, so that they agree bit for bit): for one output
 * row o and path k, element j goes to lane j % 8 of accumulator (j / 8) % 2, in increasing j;
 * then s[l] = acc0[l] + acc1[l], t[l] = s[l] + s[l+4], u[l] = t[l] + t[l+2], a = u[0] + u[1];
 * finally y = ((0 + g_0*a_0) + g_1*a_1) + ... + bias.
 */
#ifndef RABIT_CPU_PACKED_LINEAR_H
#define RABIT_CPU_PACKED_LINEAR_H

#include "../rabit_kernels.h"

typedef void (*rabit_rows_fn)(const float *xh, int64_t M, int64_t in_pad, const rabit_word_t *packed,
                              const float *g, const float *bias, int64_t K, int64_t out, int64_t in,
                              int64_t o0, int64_t o1, float *y);

void rabit_packed_rows_ref(const float *xh, int64_t M, int64_t in_pad, const rabit_word_t *packed, const float *g,
                           const float *bias, int64_t K, int64_t out, int64_t in, int64_t o0, int64_t o1, float *y);

#if defined(__x86_64__) || defined(_M_X64)
#define RABIT_HAVE_AVX2_KERNEL 1
void rabit_packed_rows_avx2(const float *xh, int64_t M, int64_t in_pad, const rabit_word_t *packed, const float *g,
                            const float *bias, int64_t K, int64_t out, int64_t in, int64_t o0, int64_t o1, float *y);
#endif

/* The lane reduction of the order above, in scalar C. */
static inline float rabit_lane_sum(const float *acc0, const float *acc1) {
    float s[8], t[4];
    int l;
    for (l = 0; l < 8; l++) s[l] = acc0[l] + acc1[l];
    for (l = 0; l < 4; l++) t[l] = s[l] + s[l + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
}

#endif
