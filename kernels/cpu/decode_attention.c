/* Decode-step attention on the CPU (rabit_kernels.h): rotary embedding of the new key and query, the cache
   write, and softmax attention over positions 0 .. pos, one pass per (row, query head). The rotary embedding is
   that of rabit/reference.py's decode_attention (float32, no FMA: -ffp-contract=off, rounded once to the dtype).
   Scores and the weighted sums of values in float32 (16 partial sums per dot product; the values summed in chunks of
   64 positions), the softmax's sum of weights in double; AVX2 where the CPU has it: the same operations, the same
   bits. The sums were in double until 2026-11-29; float32 with the cache rows read in place was 1.7-1.8x faster at
   SmolLM2's heads (9 heads, 3 KV heads, 64 wide; positions 130-1500; one thread; benchmarks/cpu_attention_ab.c)
   and stays within the tests' 2x rule against the float32 reference. */
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

/* a . x over D float32 values: sixteen partial sums of products (lane d % 16, no FMA), reduced by halves (lanes j and
   j + 8, then j + 4, j + 2, j + 1). Independent chains keep several additions in flight; the order is fixed, so the
   result does not depend on threads or the machine. */
static float dot_f32(const float *a, const float *x, int64_t D) {
    float part[16] = {0};
    int64_t d = 0;
    int j, n;
    for (; d + 16 <= D; d += 16)
        for (j = 0; j < 16; j++) part[j] = part[j] + a[d + j] * x[d + j];
    for (j = 0; d < D; d++, j++) part[j] = part[j] + a[d] * x[d];
    for (n = 8; n >= 1; n /= 2)
        for (j = 0; j < n; j++) part[j] = part[j] + part[j + n];
    return part[0];
}

/* acc[d] = acc[d] + e * x[d] for d < D (no FMA). */
static void axpy_f32(float *acc, float e, const float *x, int64_t D) {
    int64_t d;
    for (d = 0; d < D; d++) acc[d] = acc[d] + e * x[d];
}

#ifdef RABIT_HAVE_AVX2_KERNEL
/* The same loops with AVX2: lanes 0..7 and 8..15 of dot_f32's partial sums in two vectors, the same products, sums
   and reduction order (no FMA: the build has -ffp-contract=off and the intrinsics are separate), so the results are
   the scalar loops' bit for bit. */
__attribute__((target("avx2"))) static float dot_f32_avx2(const float *a, const float *x, int64_t D) {
    __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
        p0 = _mm256_add_ps(p0, _mm256_mul_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(x + d)));
        p1 = _mm256_add_ps(p1, _mm256_mul_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(x + d + 8)));
    }
    if (d < D) { /* the tail in scalar lanes 0.., as dot_f32 */
        float part[16];
        int j;
        _mm256_storeu_ps(part, p0);
        _mm256_storeu_ps(part + 8, p1);
        for (j = 0; d < D; d++, j++) part[j] = part[j] + a[d] * x[d];
        p0 = _mm256_loadu_ps(part);
        p1 = _mm256_loadu_ps(part + 8);
    }
    {
        const __m256 s8 = _mm256_add_ps(p0, p1);
        const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }
}

__attribute__((target("avx2"))) static void axpy_f32_avx2(float *acc, float e, const float *x, int64_t D) {
    const __m256 ve = _mm256_set1_ps(e);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), _mm256_mul_ps(ve, _mm256_loadu_ps(x + d))));
    for (; d < D; d++) acc[d] = acc[d] + e * x[d];
}
#endif

typedef float (*dot_fn)(const float *, const float *, int64_t);
typedef void (*axpy_fn)(float *, float, const float *, int64_t);
typedef struct {
    dot_fn dot;
    axpy_fn axpy;
} attn_fns;

/* Positions per partial sum of the weighted values: each chunk is summed on its own and then added to the total, so
   that float32 rounding grows with sqrt(chunk) + sqrt(positions / chunk), not sqrt(positions). */
#define ATTN_CHUNK 64

/* Thread-local scratch: cos, sin rows; x; rotated key; output row; rotated query; its scores; the running and chunk
   accumulators of the weighted values. */
typedef struct {
    float *c, *s, *x, *r, *o, *qr, *sc, *acc, *part;
} attn_scratch;

static int scratch_alloc(attn_scratch *w, int64_t D, int64_t L) {
    w->c = (float *)malloc(sizeof(float) * (size_t)(8 * D + L));
    if (!w->c) return 0;
    w->s = w->c + D, w->x = w->s + D, w->r = w->x + D, w->o = w->r + D, w->qr = w->o + D, w->acc = w->qr + D;
    w->part = w->acc + D, w->sc = w->part + D;
    return 1;
}

/* Cache row p (dtype dt) as float32: the cache itself for float32 (no copy), else converted into x. */
static const float *cache_row(const void *cache, rabit_dtype dt, int64_t row, int64_t D, float *x) {
    if (dt == RABIT_F32) return (const float *)cache + row * D;
    rabit_load_f32(cache, dt, row * D, D, x);
    return x;
}

/* One (row b, KV head kh) pair: rotary embedding and cache write of its new key and value, then its G query heads
   through the cache rows together, so each K and V row is read once, not G times. */
/* Row b's new key (rotated) and value into the caches of KV head kh at pos. */
static void write_kv(const attn_scratch *w, int64_t b, int64_t kh, const void *k, const int64_t ks[2], const void *v,
                     const int64_t vs[2], rabit_dtype dt, int64_t Hkv, int64_t D, void *k_cache, void *v_cache,
                     int64_t S, int64_t pos) {
    const int64_t row = (b * Hkv + kh) * S + pos;
    rope_row(k, b * ks[0] + kh * ks[1], dt, w->c, w->s, D, w->x, w->r);
    rabit_store_f32(k_cache, dt, row * D, D, w->r);
    rabit_load_f32(v, dt, b * vs[0] + kh * vs[1], D, w->x);
    rabit_store_f32(v_cache, dt, row * D, D, w->x);
}

/* Query head hd of row b over its KV head's cache rows 0 .. pos: scores, their maximum, the weights' sum (double) and
   the weighted values (float32, in chunks of ATTN_CHUNK positions), one rounding to dt. */
static void attend_head(const attn_scratch *w, const attn_fns *f, int64_t b, int64_t hd, const void *q,
                        const int64_t qs[2], rabit_dtype dt, int64_t H, int64_t Hkv, int64_t D, const void *k_cache,
                        const void *v_cache, int64_t S, int64_t pos, float scale, void *out) {
    const int64_t L = pos + 1, row0 = (b * Hkv + hd / (H / Hkv)) * S; /* cache row of position 0 */
    float *x = w->x, *sc = w->sc, *acc = w->acc, *part = w->part, mx = -INFINITY;
    double l = 0.0;
    int64_t p, p0, d;
    rope_row(q, b * qs[0] + hd * qs[1], dt, w->c, w->s, D, x, w->qr);
    for (p = 0; p < L; p++) {
        const float e = f->dot(w->qr, cache_row(k_cache, dt, row0 + p, D, x), D) * scale;
        sc[p] = e;
        if (e > mx) mx = e;
    }
    for (d = 0; d < D; d++) acc[d] = 0.0f;
    for (p0 = 0; p0 < L; p0 += ATTN_CHUNK) {
        const int64_t p1 = p0 + ATTN_CHUNK < L ? p0 + ATTN_CHUNK : L;
        for (d = 0; d < D; d++) part[d] = 0.0f;
        for (p = p0; p < p1; p++) {
            /* a NaN score leaves the weights NaN: the row's output is NaN, never a finite guess */
            const float e = expf(sc[p] - mx);
            l += e;
            f->axpy(part, e, cache_row(v_cache, dt, row0 + p, D, x), D);
        }
        for (d = 0; d < D; d++) acc[d] = acc[d] + part[d];
    }
    for (d = 0; d < D; d++) w->o[d] = (float)((double)acc[d] / l);
    rabit_store_f32(out, dt, (b * H + hd) * D, D, w->o);
}

rabit_status rabit_decode_attention_cpu(const void *q, const int64_t qs[2], const void *k, const int64_t ks[2],
                                        const void *v, const int64_t vs[2], rabit_dtype dt, int64_t B, int64_t H,
                                        int64_t Hkv, int64_t D, void *k_cache, void *v_cache, int64_t S,
                                        const void *cos, const void *sin, int64_t pos, float scale, void *out) {
    int nomem = 0;
    attn_fns f = {dot_f32, axpy_f32};
#ifdef RABIT_HAVE_AVX2_KERNEL
    if (rabit_cpu_table_kernel() != RABIT_CPU_REF && rabit_cpu_has_avx2()) f.dot = dot_f32_avx2, f.axpy = axpy_f32_avx2;
#endif
    if (!q || !k || !v || !k_cache || !v_cache || !cos || !sin || !out || !qs || !ks || !vs) return RABIT_ERR_ARG;
    if (B < 1 || Hkv < 1 || H < Hkv || H % Hkv || D < 2 || D % 2 || S < 1 || pos < 0 || pos >= S)
        return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(dt)) return RABIT_ERR_UNSUPPORTED;
    /* First every (row, KV head) pair's new key and value into the caches, then every (row, query head): each head's
       scores and sums are its own, computed whole by one thread, so the results do not depend on the thread count
       (nor on how heads are grouped: a head's arithmetic is the same alone). Splitting by query head instead of by KV
       head keeps SmolLM2's 9 heads (3 KV heads) balanced on 2 threads (5 + 4, not 2 + 1 KV heads); each K and V row
       is read G times, from the cache. Worth threads from ~64 K multiply-adds (SmolLM2 from position ~113 on). */
#pragma omp parallel if (B * H > 1 && B * H * (pos + 1) * D >= 65536)
    {
        attn_scratch w = {0};
        int64_t item;
        const int ok = scratch_alloc(&w, D, pos + 1);
        if (!ok) {
#pragma omp atomic write
            nomem = 1;
        } else {
            rabit_load_f32(cos, dt, pos * D, D, w.c);
            rabit_load_f32(sin, dt, pos * D, D, w.s);
        }
        /* every thread's allocation is settled before any work: out of memory writes no cache at all */
#pragma omp barrier
        int all_ok;
#pragma omp atomic read
        all_ok = nomem;
        all_ok = !all_ok;
#pragma omp for schedule(static)
        for (item = 0; item < B * Hkv; item++)
            if (all_ok) write_kv(&w, item / Hkv, item % Hkv, k, ks, v, vs, dt, Hkv, D, k_cache, v_cache, S, pos);
        /* (the implicit barrier: every new key and value is in the caches before any head reads them) */
#pragma omp for schedule(static)
        for (item = 0; item < B * H; item++)
            if (all_ok)
                attend_head(&w, &f, item / H, item % H, q, qs, dt, H, Hkv, D, k_cache, v_cache, S, pos, scale, out);
        free(w.c);
    }
    return nomem ? RABIT_ERR_NOMEM : RABIT_OK;
}
