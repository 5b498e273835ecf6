/*
 * A dense linear on int8 weights and int8 activations, for the one large layer a packed model keeps dense: the LM head
 * (SmolLM2-135M: 49152 x 576, a third of a CPU decode step in float16). The weight is quantized once, llama.cpp's
 * Q8_0 kind: per row and block of 32 columns a float32 scale d = amax / 127 and q = rint(w * (127 / amax)) in
 * [-127, 127] (columns past `in` are 0). x is quantized the same way per row and block when the op runs. A weight
 * that came from a Q8_0 file (SmolLM2's embeddings) round-trips exactly: its amax is 127 d.
 *
 * Output, per row m of x and output o: y = Σ_b (d_w[b][o] * d_x[b]) * (float)dot_b in float32, in block order from 0
 * (acc = acc + term), where dot_b is the exact integer dot product of the block's 32 int8 pairs; then + bias, rounded
 * once to x's dtype. The scalar and AVX2 kernels give the same bits (integer dots are exact, the float operations are
 * the same ones, no FMA); rabit.reference.int8_linear is the same arithmetic in PyTorch. A block of x whose amax is
 * NaN or Inf makes the row's outputs NaN; a block below 2^-120 counts as zero (127 / amax would overflow).
 *
 * Layout, in groups of 8 rows (out padded to a multiple of 8 with zero rows): q [out8 / 8][nb][8][32] int8 and
 * d [out8 / 8][nb][8] float32 (nb = in_pad / 32, in_pad = in rounded up to 32): a thread reads each of the two as one
 * forward stream, a block's 8 rows and their 8 scales at a time. (Row-major q and d [nb][out], read 8 rows and 18
 * scale lines at a time, took 4.4 ms for SmolLM2's head on this project's 2-core VM, this layout 2.0-2.3 ms: the
 * prefetchers do not follow that many streams.)
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../rabit_dtype.h"
#include "packed_linear.h"

#define Q8_BLOCK 32

int64_t rabit_int8_in_pad(int64_t in) { return (in + Q8_BLOCK - 1) / Q8_BLOCK * Q8_BLOCK; }

/* One row of in_pad float32 values (zero past the row's data) into q (block b at q + b * qstride) and a scale per
   block (at d + b * dstride); returns 1 when a block holds NaN or Inf (its scale is then NaN and its q zero), else 0. */
static int q8_row(const float *v, int64_t in_pad, int8_t *q, int64_t qstride, float *d, int64_t dstride) {
    int64_t b, j, nb = in_pad / Q8_BLOCK;
    int bad = 0;
    for (b = 0; b < nb; b++) {
        const float *vb = v + b * Q8_BLOCK;
        int8_t *qb = q + b * qstride;
        float amax = 0.0f;
        int finite = 1;
        for (j = 0; j < Q8_BLOCK; j++) {
            const float a = fabsf(vb[j]);
            if (!isfinite(a)) finite = 0;
            else if (a > amax) amax = a;
        }
        if (!finite) {
            bad = 1;
            d[b * dstride] = NAN;
            memset(qb, 0, Q8_BLOCK);
            continue;
        }
        if (amax < RABIT_I8_MIN_AMAX) amax = 0.0f;
        d[b * dstride] = amax / 127.0f;
        {
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (j = 0; j < Q8_BLOCK; j++) {
                const float r = rintf(vb[j] * inv);
                qb[j] = (int8_t)(r > 127.0f ? 127 : r < -127.0f ? -127 : (int)r);
            }
        }
    }
    return bad;
}

rabit_status rabit_int8_weight_cpu(const void *w, rabit_dtype dt, int64_t out, int64_t in, int8_t *q, float *d) {
    const int64_t in_pad = rabit_int8_in_pad(in), nb = in_pad / Q8_BLOCK, out8 = (out + 7) / 8 * 8;
    int bad = 0;
    int64_t o;
    if (!w || !q || !d || out < 1 || in < 1) return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(dt)) return RABIT_ERR_UNSUPPORTED;
#pragma omp parallel for schedule(static) reduction(| : bad)
    for (o = 0; o < out8; o++) {
        /* row o's block b: q + ((o / 8) * nb + b) * 256 + (o % 8) * 32, its scale d[((o / 8) * nb + b) * 8 + o % 8] */
        int8_t *qo = q + (o / 8) * nb * 8 * Q8_BLOCK + (o % 8) * Q8_BLOCK;
        float *d_o = d + (o / 8) * nb * 8 + o % 8;
        float row[Q8_BLOCK * 64];
        int64_t c0;
        if (o >= out) { /* padding rows: zero values, zero scales */
            int64_t b;
            for (b = 0; b < nb; b++) {
                memset(qo + b * 8 * Q8_BLOCK, 0, Q8_BLOCK);
                d_o[b * 8] = 0.0f;
            }
            continue;
        }
        /* a row in chunks of up to 64 blocks, so that the scratch stays on the stack for any width */
        for (c0 = 0; c0 < in_pad; c0 += Q8_BLOCK * 64) {
            const int64_t n = in_pad - c0 < Q8_BLOCK * 64 ? in_pad - c0 : Q8_BLOCK * 64;
            const int64_t have = in - c0 < n ? in - c0 : n;
            rabit_load_f32(w, dt, o * in + c0, have, row);
            memset(row + have, 0, (size_t)(n - have) * sizeof(float));
            bad |= q8_row(row, n, qo + (c0 / Q8_BLOCK) * 8 * Q8_BLOCK, 8 * Q8_BLOCK, d_o + (c0 / Q8_BLOCK) * 8, 8);
        }
    }
    return bad ? RABIT_ERR_NONFINITE : RABIT_OK;
}

/* y[r] for the 8 rows of one group (r < n valid), one quantized row of x (qx [in_pad], dx [nb]), scalar. */
static void q8_group_scalar(const int8_t *q, const float *d, int64_t nb, const int8_t *qx, const float *dx, int n,
                            float *y) {
    int64_t b;
    int r, j;
    for (r = 0; r < n; r++) {
        float acc = 0.0f;
        for (b = 0; b < nb; b++) {
            const int8_t *w = q + (b * 8 + r) * Q8_BLOCK;
            int32_t dot = 0;
            for (j = 0; j < Q8_BLOCK; j++) dot += (int32_t)w[j] * qx[b * Q8_BLOCK + j];
            acc = acc + (d[b * 8 + r] * dx[b]) * (float)dot;
        }
        y[r] = acc;
    }
}

#ifdef RABIT_HAVE_AVX2_KERNEL
#include <immintrin.h>

/* One row's block dot products as 8 int32 partial sums: |w| (unsigned) times x with w's sign (vpsignb), vpmaddubsw
   into int16 pairs (at most 2 x 127 x 127, no saturation), vpmaddwd against ones into int32. */
__attribute__((target("avx2"))) static inline __m256i q8_dot8(const int8_t *w, __m256i x) {
    const __m256i wv = _mm256_loadu_si256((const __m256i *)w);
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(x, wv));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* The group's 8 block dots reduced into one vector (lane r: row r) by hadds (integer, exact in any order), then the
   scalar kernel's float operations lane by lane: the same bits. */
__attribute__((target("avx2"))) static void q8_group_avx2(const int8_t *q, const float *d, int64_t nb,
                                                          const int8_t *qx, const float *dx, int n, float *y) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b;
    for (b = 0; b < nb; b++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(qx + b * Q8_BLOCK));
        const int8_t *w = q + b * 8 * Q8_BLOCK;
        const __m256i s01 = _mm256_hadd_epi32(q8_dot8(w, x), q8_dot8(w + 32, x));
        const __m256i s23 = _mm256_hadd_epi32(q8_dot8(w + 64, x), q8_dot8(w + 96, x));
        const __m256i s45 = _mm256_hadd_epi32(q8_dot8(w + 128, x), q8_dot8(w + 160, x));
        const __m256i s67 = _mm256_hadd_epi32(q8_dot8(w + 192, x), q8_dot8(w + 224, x));
        const __m256i s0123 = _mm256_hadd_epi32(s01, s23), s4567 = _mm256_hadd_epi32(s45, s67);
        /* lanes [r0 r1 r2 r3 | r0 r1 r2 r3] (the rows' low and high halves), the same for r4..r7 */
        const __m256i dot = _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20),
                                             _mm256_permute2x128_si256(s0123, s4567, 0x31));
        const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(d + b * 8), _mm256_set1_ps(dx[b]));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(s, _mm256_cvtepi32_ps(dot)));
    }
    if (n == 8) {
        _mm256_storeu_ps(y, acc);
    } else {
        float t[8];
        int r;
        _mm256_storeu_ps(t, acc);
        for (r = 0; r < n; r++) y[r] = t[r];
    }
}
#endif

typedef void (*q8_group_fn)(const int8_t *q, const float *d, int64_t nb, const int8_t *qx, const float *dx, int n,
                            float *y);

rabit_status rabit_int8_linear_cpu(const void *x, rabit_dtype xdt, int64_t M, int64_t in, const int8_t *q,
                                   const float *d, const float *bias, int64_t out, void *y) {
    const int64_t in_pad = rabit_int8_in_pad(in), nb = in_pad / Q8_BLOCK, ngroups = (out + 7) / 8;
    q8_group_fn group = q8_group_scalar;
    float *buf, *row, *dx, *yf;
    int8_t *qx;
    int64_t m, o;
    if (!x || !q || !d || !y || M < 0 || in < 1 || out < 1) return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(xdt)) return RABIT_ERR_UNSUPPORTED;
    if (M == 0) return RABIT_OK;
#ifdef RABIT_HAVE_AVX2_KERNEL
    if (rabit_cpu_table_kernel() != RABIT_CPU_REF && rabit_cpu_has_avx2()) group = q8_group_avx2;
#endif
    /* scratch: x's row (in_pad floats), its scales, y (float32), the row's int8 values */
    buf = (float *)malloc(sizeof(float) * (size_t)(in_pad + nb + M * out) + (size_t)in_pad);
    if (!buf) return RABIT_ERR_NOMEM;
    row = buf;
    dx = row + in_pad;
    yf = dx + nb;
    qx = (int8_t *)(yf + M * out);
    memset(row, 0, sizeof(float) * (size_t)in_pad); /* zero past `in` */
    for (m = 0; m < M; m++) {
        float *ym = yf + m * out;
        rabit_cpu_load_f32(x, xdt, m * in, in, row);
        q8_row(row, in_pad, qx, Q8_BLOCK, dx, 1);
        /* the groups of 8 rows split over the threads; each output is computed whole by one thread */
#pragma omp parallel for schedule(static) if (out * in_pad >= RABIT_PARALLEL_MIN_WORDS * 32)
        for (o = 0; o < ngroups; o++)
            group(q + o * nb * 8 * Q8_BLOCK, d + o * nb * 8, nb, qx, dx, out - o * 8 < 8 ? (int)(out - o * 8) : 8,
                  ym + o * 8);
        if (bias)
            for (o = 0; o < out; o++) ym[o] = ym[o] + bias[o];
    }
    rabit_store_f32(y, xdt, 0, M * out, yf);
    free(buf);
    return RABIT_OK;
}
