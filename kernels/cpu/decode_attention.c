/* Decode-step attention on the CPU (rabit_kernels.h): rotary embedding of the new key and query, the cache
   write, and softmax attention over positions 0 .. pos, in one pass per (row, KV head). The rotary embedding is
   that of rabit/reference.py's decode_attention (float32, no FMA: -ffp-contract=off, rounded once to the dtype);
   the dot products and sums are accumulated in double (AVX2 where the CPU has it: the same operations, the same
   bits; 1.15-1.4x faster at SmolLM2's heads, benchmarks/cpu_attention_ab.c). */
#include <math.h>
#include <stdlib.h>

#include "../rabit_dtype.h"
#include "../rabit_kernels.h"
#include "packed_linear.h" /* RABIT_HAVE_AVX2_KERNEL, rabit_cpu_has_avx2 */

#ifdef RABIT_HAVE_AVX2_KERNEL
#include <immintrin.h>
#endif

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

/* q . x over D values, in double: eight partial sums (lane d % 8), added pairwise at the end. Independent chains
   let the compiler vectorize and keep several additions in flight; one chain of D dependent double adds was what
   bounded the kernel. The order is fixed, so the result does not depend on threads or the machine. */
static double dot_f64(const float *a, const float *x, int64_t D) {
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    int j;
    for (; d + 8 <= D; d += 8)
        for (j = 0; j < 8; j++) part[j] += (double)a[d + j] * x[d + j];
    for (j = 0; d < D; d++, j++) part[j] += (double)a[d] * x[d];
    return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

/* acc[d] += (double)e * x[d] for d < D. */
static void axpy_f64(double *acc, float e, const float *x, int64_t D) {
    int64_t d;
    for (d = 0; d < D; d++) acc[d] += (double)e * x[d];
}

#ifdef RABIT_HAVE_AVX2_KERNEL
/* The same two loops with AVX2: lanes 0..3 and 4..7 of dot_f64's partial sums in two vectors, products and sums in
   the same order (no FMA: the build has -ffp-contract=off and the intrinsics are separate), so the results are the
   scalar loops' bit for bit; the portable build vectorizes them only 2-wide (SSE2). */
__attribute__((target("avx2"))) static double dot_f64_avx2(const float *a, const float *x, int64_t D) {
    __m256d p0 = _mm256_setzero_pd(), p1 = _mm256_setzero_pd();
    double part[8];
    int64_t d = 0;
    int j;
    for (; d + 8 <= D; d += 8) {
        const __m256 va = _mm256_loadu_ps(a + d), vx = _mm256_loadu_ps(x + d);
        p0 = _mm256_add_pd(p0, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(va)),
                                             _mm256_cvtps_pd(_mm256_castps256_ps128(vx))));
        p1 = _mm256_add_pd(p1, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(va, 1)),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(vx, 1))));
    }
    _mm256_storeu_pd(part, p0);
    _mm256_storeu_pd(part + 4, p1);
    for (j = 0; d < D; d++, j++) part[j] += (double)a[d] * x[d];
    return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

__attribute__((target("avx2"))) static void axpy_f64_avx2(double *acc, float e, const float *x, int64_t D) {
    const __m256d ve = _mm256_set1_pd((double)e);
    int64_t d = 0;
    for (; d + 4 <= D; d += 4)
        _mm256_storeu_pd(acc + d, _mm256_add_pd(_mm256_loadu_pd(acc + d),
                                                _mm256_mul_pd(ve, _mm256_cvtps_pd(_mm_loadu_ps(x + d)))));
    for (; d < D; d++) acc[d] += (double)e * x[d];
}
#endif

typedef double (*dot_fn)(const float *, const float *, int64_t);
typedef void (*axpy_fn)(double *, float, const float *, int64_t);

/* Thread-local scratch of one (row, KV head) pair: cos, sin rows; x; rotated row; output row; the G query heads'
   rotated rows and scores; their maxima, sums and accumulators (double: a thread sums up to S positions in order,
   where float32 would lose ~sqrt(S) ulps). */
typedef struct {
    float *c, *s, *x, *r, *o, *qr, *sc, *mx;
    double *acc, *l;
} attn_scratch;

static int scratch_alloc(attn_scratch *w, int64_t G, int64_t D, int64_t L) {
    w->c = (float *)malloc(sizeof(float) * (size_t)(5 * D + G * (D + L + 1)));
    w->acc = (double *)malloc(sizeof(double) * (size_t)(G * (D + 1)));
    if (!w->c || !w->acc) return 0;
    w->s = w->c + D, w->x = w->s + D, w->r = w->x + D, w->o = w->r + D, w->qr = w->o + D, w->sc = w->qr + G * D;
    w->mx = w->sc + G * L;
    w->l = w->acc + G * D;
    return 1;
}

/* One (row b, KV head kh) pair: rotary embedding and cache write of its new key and value, then its G query heads
   through the cache rows together, so each K and V row is read once, not G times. */
static void attend_pair(const attn_scratch *w, dot_fn dot, axpy_fn axpy, int64_t b, int64_t kh, const void *q,
                        const int64_t qs[2], const void *k, const int64_t ks[2], const void *v, const int64_t vs[2],
                        rabit_dtype dt, int64_t H, int64_t Hkv, int64_t D, void *k_cache, void *v_cache, int64_t S,
                        int64_t pos, float scale, void *out) {
    const int64_t G = H / Hkv, L = pos + 1, row0 = (b * Hkv + kh) * S; /* cache row of position 0 */
    float *x = w->x, *sc = w->sc, *mx = w->mx;
    double *acc = w->acc, *l = w->l;
    int64_t g, p, d;
    rope_row(k, b * ks[0] + kh * ks[1], dt, w->c, w->s, D, x, w->r);
    rabit_store_f32(k_cache, dt, (row0 + pos) * D, D, w->r);
    rabit_load_f32(v, dt, b * vs[0] + kh * vs[1], D, x);
    rabit_store_f32(v_cache, dt, (row0 + pos) * D, D, x);
    for (g = 0; g < G; g++) {
        rope_row(q, b * qs[0] + (kh * G + g) * qs[1], dt, w->c, w->s, D, x, w->qr + g * D);
        mx[g] = -INFINITY;
        l[g] = 0.0;
    }
    for (p = 0; p < L; p++) {
        rabit_load_f32(k_cache, dt, (row0 + p) * D, D, x);
        for (g = 0; g < G; g++) {
            const float e = (float)dot(w->qr + g * D, x, D) * scale;
            sc[g * L + p] = e;
            if (e > mx[g]) mx[g] = e;
        }
    }
    for (d = 0; d < G * D; d++) acc[d] = 0.0;
    for (p = 0; p < L; p++) {
        rabit_load_f32(v_cache, dt, (row0 + p) * D, D, x);
        for (g = 0; g < G; g++) {
            /* a NaN score leaves the weights NaN: the row's output is NaN, never a finite guess */
            const float e = expf(sc[g * L + p] - mx[g]);
            l[g] += e;
            axpy(acc + g * D, e, x, D);
        }
    }
    for (g = 0; g < G; g++) {
        for (d = 0; d < D; d++) w->o[d] = (float)(acc[g * D + d] / l[g]);
        rabit_store_f32(out, dt, (b * H + kh * G + g) * D, D, w->o);
    }
}

rabit_status rabit_decode_attention_cpu(const void *q, const int64_t qs[2], const void *k, const int64_t ks[2],
                                        const void *v, const int64_t vs[2], rabit_dtype dt, int64_t B, int64_t H,
                                        int64_t Hkv, int64_t D, void *k_cache, void *v_cache, int64_t S,
                                        const void *cos, const void *sin, int64_t pos, float scale, void *out) {
    int nomem = 0;
    int64_t pair;
    dot_fn dot = dot_f64;
    axpy_fn axpy = axpy_f64;
#ifdef RABIT_HAVE_AVX2_KERNEL
    if (rabit_cpu_has_avx2()) dot = dot_f64_avx2, axpy = axpy_f64_avx2;
#endif
    if (!q || !k || !v || !k_cache || !v_cache || !cos || !sin || !out || !qs || !ks || !vs) return RABIT_ERR_ARG;
    if (B < 1 || Hkv < 1 || H < Hkv || H % Hkv || D < 2 || D % 2 || S < 1 || pos < 0 || pos >= S)
        return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(dt)) return RABIT_ERR_UNSUPPORTED;
    /* the (row, KV head) pairs are independent (their own cache rows and outputs), so threads split them; each
       pair is computed whole by one thread, so the results do not depend on the thread count. Worth it from ~64 K
       multiply-adds (SmolLM2's 9 heads of 64 from position ~113 on: ~15 us on one thread, against a few us to start
       the threads). */
#pragma omp parallel if (B * Hkv > 1 && B * H * (pos + 1) * D >= 65536)
    {
        attn_scratch w = {0};
        const int ok = scratch_alloc(&w, H / Hkv, D, pos + 1);
        if (!ok) {
#pragma omp atomic write
            nomem = 1;
        } else {
            rabit_load_f32(cos, dt, pos * D, D, w.c);
            rabit_load_f32(sin, dt, pos * D, D, w.s);
        }
        /* every thread's allocation is settled before any pair runs: out of memory writes no cache at all */
#pragma omp barrier
        int all_ok;
#pragma omp atomic read
        all_ok = nomem;
        all_ok = !all_ok;
#pragma omp for schedule(static)
        for (pair = 0; pair < B * Hkv; pair++)
            if (all_ok)
                attend_pair(&w, dot, axpy, pair / Hkv, pair % Hkv, q, qs, k, ks, v, vs, dt, H, Hkv, D, k_cache,
                            v_cache, S, pos, scale, out);
        free(w.c);
        free(w.acc);
    }
    return nomem ? RABIT_ERR_NOMEM : RABIT_OK;
}
