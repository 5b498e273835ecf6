/* Scalar packed GEMV/GEMM over the nibble tables: always compiled; the oracle for the SIMD kernels. */
#include "packed_linear.h"

void rabit_packed_rows_ref(const float *lut, int64_t M, const rabit_word_t *packed, const float *g,
                           const float *bias, int64_t K, int64_t out, int64_t in, int64_t o0, int64_t o1, float *y) {
    const int64_t nw = RABIT_WORDS(in);
    int64_t o, m, k, w;
    int q;
    for (o = o0; o < o1; o++) {
        for (m = 0; m < M; m++) {
            float yo = 0.0f;
            for (k = 0; k < K; k++) {
                const float *t = lut + (m * K + k) * nw * RABIT_LUT_PER_WORD;
                const rabit_word_t *pw = packed + (k * out + o) * nw;
                float acc[2] = {0.0f, 0.0f};
                for (w = 0; w < nw; w++)
                    for (q = 0; q < 8; q++)
                        acc[q & 1] = acc[q & 1] + rabit_lut_value(t + w * RABIT_LUT_PER_WORD + 8 * q,
                                                                  (pw[w] >> (4 * q)) & 15u);
                yo = yo + g[k * out + o] * (acc[0] + acc[1]);
            }
            if (bias) yo = yo + bias[o];
            y[m * out + o] = yo;
        }
    }
}

void rabit_lut8_build_scalar(const float *xh, int64_t n, float *lut) {
    int64_t j;
    int i;
    for (j = 0; j < n; j++) {
        const float *c = xh + 4 * j;
        for (i = 0; i < 8; i++) {
            const float s0 = (i & 1) ? c[0] : -c[0], s1 = (i & 2) ? c[1] : -c[1], s2 = (i & 4) ? c[2] : -c[2];
            lut[8 * j + i] = ((s0 + s1) + s2) - c[3];
        }
    }
}
