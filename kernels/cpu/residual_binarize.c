/*
 * Coupled residual binarization on the CPU: forward (signs + Ŵ) and the one-pass backward.
 * The float arithmetic follows rabit/reference.py operation by operation; the build passes
 * -ffp-contract=off so that `r - (±g)*h` is never fused into an FMA, which would change signs.
 */
#include <stdlib.h>
#include <string.h>
#include <math.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../rabit_dtype.h"
#include "../rabit_kernels.h"
#include "packed_linear.h"

static int rabit_isfinite(float x) { return (rabit_f32_bits(x) & 0x7f800000u) != 0x7f800000u; }

rabit_status rabit_residual_binarize_cpu(const void *W, rabit_dtype wdt, const float *g, const float *h,
                                         int64_t K, int64_t out, int64_t in, void *what, rabit_dtype what_dt,
                                         rabit_word_t *packed) {
    const int64_t nw = RABIT_WORDS(in);
    int nomem = 0, nonfinite = 0;
    int64_t o;
    if (!W || !g || !h || K < 1 || K > RABIT_MAX_K || out < 1 || in < 1 || (!what && !packed)) return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(wdt) || (what && !rabit_dtype_valid(what_dt))) return RABIT_ERR_UNSUPPORTED;

#pragma omp parallel if (out * RABIT_WORDS(in) * K >= RABIT_PARALLEL_MIN_WORDS)
    {
        float *r = (float *)malloc((size_t)in * sizeof(float));
        float *acc = (float *)malloc((size_t)in * sizeof(float));
        if (!r || !acc) {
#pragma omp atomic write
            nomem = 1;
        }
#pragma omp for schedule(static)
        for (o = 0; o < out; o++) {
            int64_t j, k, w;
            int bad = 0;
            if (!r || !acc) continue;
            rabit_load_f32(W, wdt, o * in, in, r);
            for (j = 0; j < in; j++) bad |= !rabit_isfinite(r[j]);
            if (bad) {
                /* Reported after the whole output is computed, as on the GPU, so a caller that ignores
                   the report gets the same outputs on both. */
#pragma omp atomic write
                nonfinite = 1;
            }
            for (k = 0; k < K; k++) {
                const float gk = g[k * out + o];
                const float *hk = h + k * in;
                rabit_word_t *pw = packed ? packed + (k * out + o) * nw : NULL;
                for (w = 0; w < nw; w++) {
                    const int64_t j0 = w * RABIT_WORD_BITS;
                    const int64_t j1 = j0 + RABIT_WORD_BITS < in ? j0 + RABIT_WORD_BITS : in;
                    rabit_word_t word = 0;
                    for (j = j0; j < j1; j++) {
                        const int b = r[j] >= 0.0f; /* sign(0) = +1 */
                        const float v = (b ? gk : -gk) * hk[j];
                        r[j] = r[j] - v;
                        acc[j] = k ? acc[j] + v : v;
                        word |= (rabit_word_t)b << (j - j0);
                    }
                    if (pw) pw[w] = word;
                }
            }
            if (what) rabit_store_f32(what, what_dt, o * in, in, acc);
        }
        free(r);
        free(acc);
    }
    if (nomem) return RABIT_ERR_NOMEM;
    if (nonfinite) return RABIT_ERR_NONFINITE;
    return RABIT_OK;
}

static float rabit_ste_factor(float w, rabit_ste ste, float c) {
    if (ste == RABIT_STE_CLIPPED) return fabsf(w) <= c ? 1.0f : 0.0f;
    if (ste == RABIT_STE_TANH) {
        const float t = tanhf(w / c);
        return 1.0f - t * t;
    }
    return 1.0f;
}

rabit_status rabit_residual_binarize_backward_cpu(const void *G, rabit_dtype gdt, const void *W, rabit_dtype wdt,
                                                  const float *g, const float *h, const rabit_word_t *packed,
                                                  int64_t K, int64_t out, int64_t in, rabit_ste ste,
                                                  float ste_param, void *dW, float *dg, float *dh) {
    const int64_t nw = RABIT_WORDS(in);
    int nthreads = 1, nomem = 0;
    double *partial;
    int64_t i, t;
    if (!G || !g || !h || !packed || !dg || !dh || K < 1 || K > RABIT_MAX_K || out < 1 || in < 1)
        return RABIT_ERR_ARG;
    if (dW && ste != RABIT_STE_IDENTITY && (!W || !(ste_param > 0.0f))) return RABIT_ERR_ARG;
    if (ste != RABIT_STE_IDENTITY && ste != RABIT_STE_CLIPPED && ste != RABIT_STE_TANH) return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(gdt) || !rabit_dtype_valid(wdt)) return RABIT_ERR_UNSUPPORTED;
#ifdef _OPENMP
    if (out * RABIT_WORDS(in) * K >= RABIT_PARALLEL_MIN_WORDS) nthreads = omp_get_max_threads();
#endif
    /* One dh accumulator per thread over a fixed row range, summed in thread order afterwards:
       the column reduction is then deterministic for a given thread count. */
    partial = (double *)calloc((size_t)nthreads * (size_t)(K * in), sizeof(double));
    if (!partial) return RABIT_ERR_NOMEM;

#pragma omp parallel num_threads(nthreads)
    {
        int tid = 0, nt = 1;
        int64_t lo, hi, o, j, k, w;
        float *Gr = (float *)malloc((size_t)in * sizeof(float));
        float *Wr = (float *)malloc((size_t)in * sizeof(float));
        double *dhp;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        dhp = partial + (size_t)tid * (size_t)(K * in);
        lo = out * tid / nt;
        hi = out * (tid + 1) / nt;
        if (!Gr || !Wr) {
#pragma omp atomic write
            nomem = 1;
            lo = hi;
        }
        for (o = lo; o < hi; o++) {
            rabit_load_f32(G, gdt, o * in, in, Gr);
            for (k = 0; k < K; k++) {
                const double gk = g[k * out + o];
                const float *hk = h + k * in;
                const rabit_word_t *pw = packed + (k * out + o) * nw;
                double *dhk = dhp + k * in;
                double acc = 0.0;
                for (w = 0; w < nw; w++) {
                    const int64_t j0 = w * RABIT_WORD_BITS;
                    const int64_t j1 = j0 + RABIT_WORD_BITS < in ? j0 + RABIT_WORD_BITS : in;
                    const rabit_word_t word = pw[w];
                    for (j = j0; j < j1; j++) {
                        const double s = ((word >> (j - j0)) & 1u) ? (double)Gr[j] : -(double)Gr[j];
                        acc += s * hk[j];
                        dhk[j] += s * gk;
                    }
                }
                dg[k * out + o] = (float)acc;
            }
            if (!dW) continue; /* dg, dh only */
            if (ste != RABIT_STE_IDENTITY) {
                rabit_load_f32(W, wdt, o * in, in, Wr);
                for (j = 0; j < in; j++) Gr[j] = Gr[j] * rabit_ste_factor(Wr[j], ste, ste_param);
            }
            rabit_store_f32(dW, wdt, o * in, in, Gr);
        }
        free(Gr);
        free(Wr);
    }
    if (!nomem) {
        for (i = 0; i < K * in; i++) {
            double s = 0.0;
            for (t = 0; t < nthreads; t++) s += partial[(size_t)t * (size_t)(K * in) + (size_t)i];
            dh[i] = (float)s;
        }
    }
    free(partial);
    return nomem ? RABIT_ERR_NOMEM : RABIT_OK;
}

/* 1 << b for b = 0..31, as a table so that a loop over the bits of a word reads constants (vectorizable). */
static const rabit_word_t rabit_bit_masks[RABIT_WORD_BITS] = {
    1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,  1u << 8,  1u << 9,  1u << 10,
    1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15, 1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21,
    1u << 22, 1u << 23, 1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};

void rabit_dequantize_row_scalar(const rabit_word_t *pw, float g, const float *h, int64_t in, int first, float *acc) {
    int64_t wi;
    for (wi = 0; wi < RABIT_WORDS(in); wi++) {
        /* a word at a time: the sign is a flip of the sign bit of g * h_j where the bit is clear ((-g) * h_j is
           exactly -(g * h_j)), with constant masks, so the compiler vectorizes it; the forward's values, so its Ŵ
           comes back bit for bit */
        const rabit_word_t w = pw[wi];
        const int64_t j0 = wi * RABIT_WORD_BITS;
        const int n = (int)(in - j0 < RABIT_WORD_BITS ? in - j0 : RABIT_WORD_BITS);
        float *a = acc + j0;
        const float *hj = h + j0;
        int b;
        for (b = 0; b < n; b++) {
            const uint32_t flip = (w & rabit_bit_masks[b]) ? 0u : 0x80000000u;
            float v = g * hj[b];
            uint32_t u;
            memcpy(&u, &v, sizeof u);
            u ^= flip;
            memcpy(&v, &u, sizeof v);
            a[b] = first ? v : a[b] + v;
        }
    }
}

rabit_status rabit_dequantize_rows_cpu(const rabit_word_t *packed, const float *g, const float *h, int64_t K,
                                       int64_t out, int64_t in, int64_t o0, int64_t o1, void *what, rabit_dtype dt) {
    const int64_t nw = RABIT_WORDS(in);
    void (*row)(const rabit_word_t *, float, const float *, int64_t, int, float *) = rabit_dequantize_row_scalar;
    int nomem = 0;
    int64_t o;
    if (!packed || !g || !h || !what || K < 1 || K > RABIT_MAX_K || out < 0 || in < 1 || o0 < 0 || o1 < o0 ||
        o1 > out)
        return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(dt)) return RABIT_ERR_UNSUPPORTED;
#ifdef RABIT_HAVE_AVX2_KERNEL
    /* bit-identical rows; forcing the scalar table kernel (set_cpu_kernel("ref")) forces the scalar rows, which
       the tests use to compare the two */
    if (rabit_cpu_table_kernel() != RABIT_CPU_REF) row = rabit_dequantize_row_avx2; /* AVX2 or AVX-512 */
#endif
#pragma omp parallel if ((o1 - o0) * nw * K >= RABIT_PARALLEL_MIN_WORDS)
    {
        float *acc = (float *)malloc((size_t)in * sizeof(float));
        if (!acc) {
#pragma omp atomic write
            nomem = 1;
        }
#pragma omp for schedule(static)
        for (o = o0; o < o1; o++) {
            int64_t k;
            if (!acc) continue;
            for (k = 0; k < K; k++)
                row(packed + (k * out + o) * nw, g[k * out + o], h + k * in, in, k == 0, acc);
            rabit_store_f32(what, dt, (o - o0) * in, in, acc);
        }
        free(acc);
    }
    return nomem ? RABIT_ERR_NOMEM : RABIT_OK;
}

rabit_status rabit_dequantize_cpu(const rabit_word_t *packed, const float *g, const float *h, int64_t K, int64_t out,
                                  int64_t in, void *what, rabit_dtype dt) {
    return rabit_dequantize_rows_cpu(packed, g, h, K, out, in, 0, out, what, dt);
}
