/*
 * The decoder glue around the CPU packed_linear_fused ops' layers (csrc/ops_cpu.cpp): the layers' input u and the
 * RMSNorm's row scale before them, the row scale, bias and residual after them. Plain float32 loops (the sum of
 * squares in double): the ATen ops they replaced cost ~25 us a call at SmolLM2's sizes, a fifth of a decode step.
 * Same math as rabit.reference.packed_linear_fused; the tests hold them to it by the 2x rule, as the CUDA kernels.
 */
#include <math.h>

#include "../rabit_dtype.h"
#include "../rabit_kernels.h"

rabit_status rabit_glue_input_cpu(const void *x, const void *up, rabit_dtype dt, int64_t M, int64_t in,
                                  const void *norm_weight, rabit_dtype nwdt, float eps, float *u, float *rs) {
    int64_t m, j;
    if (!x || !u || M < 0 || in < 1 || (norm_weight && !rs)) return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(dt) || (norm_weight && !rabit_dtype_valid(nwdt))) return RABIT_ERR_UNSUPPORTED;
    for (m = 0; m < M; m++) {
        float *um = u + m * in;
        rabit_load_f32(x, dt, m * in, in, um);
        if (up) {
            float upv[256];
            for (j = 0; j < in; j += 256) {
                const int64_t n = in - j < 256 ? in - j : 256;
                int64_t i;
                rabit_load_f32(up, dt, m * in + j, n, upv);
                for (i = 0; i < n; i++) {
                    const float v = um[j + i];
                    um[j + i] = v / (1.0f + expf(-v)) * upv[i]; /* silu(x) * up */
                }
            }
        }
        if (norm_weight) {
            double ss = 0.0;
            float w[256];
            for (j = 0; j < in; j++) ss += (double)um[j] * um[j];
            rs[m] = 1.0f / sqrtf((float)(ss / (double)in) + eps);
            for (j = 0; j < in; j += 256) {
                const int64_t n = in - j < 256 ? in - j : 256;
                int64_t i;
                rabit_load_f32(norm_weight, nwdt, j, n, w);
                for (i = 0; i < n; i++) um[j + i] = um[j + i] * w[i];
            }
        }
    }
    return RABIT_OK;
}

rabit_status rabit_glue_output_cpu(const float *yl, int64_t M, int64_t out, const float *rs, const void *bias,
                                   rabit_dtype bdt, const void *residual, rabit_dtype dt, void *y) {
    float row[256], add[256];
    int64_t m, o0, i;
    if (!yl || !y || M < 0 || out < 1) return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(dt) || (bias && !rabit_dtype_valid(bdt))) return RABIT_ERR_UNSUPPORTED;
    for (m = 0; m < M; m++)
        for (o0 = 0; o0 < out; o0 += 256) {
            const int64_t n = out - o0 < 256 ? out - o0 : 256;
            for (i = 0; i < n; i++) row[i] = rs ? yl[m * out + o0 + i] * rs[m] : yl[m * out + o0 + i];
            if (bias) {
                rabit_load_f32(bias, bdt, o0, n, add);
                for (i = 0; i < n; i++) row[i] = row[i] + add[i];
            }
            if (residual) {
                rabit_load_f32(residual, dt, m * out + o0, n, add);
                for (i = 0; i < n; i++) row[i] = row[i] + add[i];
            }
            rabit_store_f32(y, dt, m * out + o0, n, row);
        }
    return RABIT_OK;
}
