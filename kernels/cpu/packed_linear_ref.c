/* Scalar packed GEMV/GEMM: always compiled; the oracle for the SIMD kernels. */
#include "packed_linear.h"

void rabit_packed_rows_ref(const float *xh, int64_t M, int64_t in_pad, const rabit_word_t *packed, const float *g,
                           const float *bias, int64_t K, int64_t out, int64_t in, int64_t o0, int64_t o1, float *y) {
    const int64_t nw = RABIT_WORDS(in);
    int64_t o, m, k, j;
    for (o = o0; o < o1; o++) {
        for (m = 0; m < M; m++) {
            float yo = 0.0f;
            for (k = 0; k < K; k++) {
                const float *x = xh + (m * K + k) * in_pad;
                const rabit_word_t *pw = packed + (k * out + o) * nw;
                float acc[2][8] = {{0}};
                for (j = 0; j < in; j++) {
                    const int bit = (pw[j / RABIT_WORD_BITS] >> (j % RABIT_WORD_BITS)) & 1u;
                    float *a = &acc[(j >> 3) & 1][j & 7];
                    *a = *a + (bit ? x[j] : -x[j]);
                }
                yo = yo + g[k * out + o] * rabit_lane_sum(acc[0], acc[1]);
            }
            if (bias) yo = yo + bias[o];
            y[m * out + o] = yo;
        }
    }
}
