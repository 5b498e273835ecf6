/* Decode-step attention on the CPU (rabit_kernels.h): rotary embedding of the new key and query, the cache
   write, and softmax attention over positions 0 .. pos, in one pass per (row, KV head). The rotary embedding is
   that of rabit/reference.py's decode_attention (float32, no FMA: -ffp-contract=off, rounded once to the dtype);
   the dot products and sums are accumulated in double. */
#include <math.h>
#include <stdlib.h>

#include "../rabit_dtype.h"
#include "../rabit_kernels.h"

/* rope of the D values at src (dtype dt) with the tables' row at pos, rounded to dt, into dst (float32). */
static void rope_row(const void *src, int64_t off, rabit_dtype dt, const float *c, const float *s, int64_t D,
                     float *x, float *dst) {
    const int64_t half = D / 2;
    int64_t d;
    rabit_load_f32(src, dt, off, D, x);
    for (d = 0; d < D; d++) {
        const float rot = d < half ? -x[d + half] : x[d - half];
        dst[d] = x[d] * c[d] + rot * s[d];
    }
    /* round to dt and back: the value the cache holds, and the query attention uses */
    if (dt != RABIT_F32) {
        uint16_t tmp;
        for (d = 0; d < D; d++) {
            if (dt == RABIT_BF16) {
                tmp = rabit_f32_to_bf16(dst[d]);
                dst[d] = rabit_bf16_to_f32(tmp);
            } else {
                tmp = rabit_f32_to_f16(dst[d]);
                dst[d] = rabit_f16_to_f32(tmp);
            }
        }
    }
}

rabit_status rabit_decode_attention_cpu(const void *q, const int64_t qs[2], const void *k, const int64_t ks[2],
                                        const void *v, const int64_t vs[2], rabit_dtype dt, int64_t B, int64_t H,
                                        int64_t Hkv, int64_t D, void *k_cache, void *v_cache, int64_t S,
                                        const void *cos, const void *sin, int64_t pos, float scale, void *out) {
    int64_t b, kh, g, p, d;
    if (!q || !k || !v || !k_cache || !v_cache || !cos || !sin || !out || !qs || !ks || !vs) return RABIT_ERR_ARG;
    if (B < 1 || Hkv < 1 || H < Hkv || H % Hkv || D < 2 || D % 2 || S < 1 || pos < 0 || pos >= S)
        return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(dt)) return RABIT_ERR_UNSUPPORTED;
    const int64_t G = H / Hkv, L = pos + 1;
    /* scratch: cos, sin rows; x; rotated row; output row; scores; the accumulator (double: one thread sums up to
       S positions in order, where float32 would lose ~sqrt(S) ulps) */
    float *buf = (float *)malloc(sizeof(float) * (size_t)(5 * D + L));
    double *acc = (double *)malloc(sizeof(double) * (size_t)D);
    if (!buf || !acc) {
        free(buf);
        free(acc);
        return RABIT_ERR_NOMEM;
    }
    float *c = buf, *s = c + D, *x = s + D, *r = x + D, *o = r + D, *sc = o + D;
    rabit_load_f32(cos, dt, pos * D, D, c);
    rabit_load_f32(sin, dt, pos * D, D, s);
    for (b = 0; b < B; b++) {
        for (kh = 0; kh < Hkv; kh++) {
            const int64_t row0 = (b * Hkv + kh) * S; /* cache row of position 0 */
            rope_row(k, b * ks[0] + kh * ks[1], dt, c, s, D, x, r);
            rabit_store_f32(k_cache, dt, (row0 + pos) * D, D, r);
            rabit_load_f32(v, dt, b * vs[0] + kh * vs[1], D, x);
            rabit_store_f32(v_cache, dt, (row0 + pos) * D, D, x);
            for (g = 0; g < G; g++) {
                const int64_t hd = kh * G + g;
                float m = -INFINITY;
                double l = 0.0;
                rope_row(q, b * qs[0] + hd * qs[1], dt, c, s, D, x, r);
                for (p = 0; p < L; p++) {
                    double dot = 0.0;
                    rabit_load_f32(k_cache, dt, (row0 + p) * D, D, x);
                    for (d = 0; d < D; d++) dot += (double)r[d] * x[d];
                    sc[p] = (float)dot * scale;
                    if (sc[p] > m) m = sc[p];
                }
                for (d = 0; d < D; d++) acc[d] = 0.0;
                for (p = 0; p < L; p++) {
                    /* a NaN score leaves the weights NaN: the row's output is NaN, never a finite guess */
                    const float e = expf(sc[p] - m);
                    l += e;
                    rabit_load_f32(v_cache, dt, (row0 + p) * D, D, x);
                    for (d = 0; d < D; d++) acc[d] += (double)e * x[d];
                }
                for (d = 0; d < D; d++) o[d] = (float)(acc[d] / l);
                rabit_store_f32(out, dt, (b * H + hd) * D, D, o);
            }
        }
    }
    free(buf);
    free(acc);
    return RABIT_OK;
}
