// Probe, not part of the package (thirty-seventh session; committed, then removed by the next commit): a packed GEMV
// over int8 nibble tables looked up with vpshufb (T-MAC style), for K binary paths at M = 1, to see how much faster
// than the float32 vpermps table kernel (kernels/cpu/packed_linear_avx2.c) such tables run on this AVX2 VM, and at
// what error. Build: gcc -O3 -o probe benchmarks/cpu_int8_lut_probe.c -lm; run: ./probe OUT IN REPS (IN % 128 == 0).
// Layout (prepared offline): for path k, row block of 16 rows, column-group pair p (8 columns): 32 bytes,
// byte 2r = nibble of row r for group 2p (4 columns), byte 2r+1 = nibble of row r for group 2p+1.
// Tables: per group g, 16 int8 entries: round(sum_j s_j x_{4g+j} / S_blk) with a scale per 128-column block.
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

// bits[k][o][c] in {0,1} (1 = +1)
__attribute__((target("avx2")))
void gemv_tmac(int K, int out, int in, const uint8_t *lay, const int8_t *tab, const float *tscale, const float *g, float *y) {
    const int np = in / 8, nblk = in / 128;  // in multiple of 128 for the prototype
    const __m256i lo = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi8(1), odd = _mm256_set1_epi16((short)0xFF00);
    for (int o0 = 0; o0 < out; o0 += 16) {
        float yr[16] = {0};
        for (int k = 0; k < K; k++) {
            const uint8_t *L = lay + ((size_t)k * (out / 16) + o0 / 16) * (size_t)np * 32;
            float rs[16] = {0};
            for (int b = 0; b < nblk; b++) {
                __m256i acc = _mm256_setzero_si256();  // int16 per (row, parity) pair-sum
                for (int p = b * 16; p < b * 16 + 16; p++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(L + (size_t)p * 32));
                    const __m128i t0 = _mm_loadu_si128((const __m128i *)(tab + ((size_t)k * (in / 4) + 2 * p) * 16));
                    const __m128i t1 = _mm_loadu_si128((const __m128i *)(tab + ((size_t)k * (in / 4) + 2 * p + 1) * 16));
                    const __m256i T0 = _mm256_broadcastsi128_si256(t0), T1 = _mm256_broadcastsi128_si256(t1);
                    const __m256i idx = _mm256_and_si256(v, lo);
                    const __m256i a = _mm256_shuffle_epi8(T0, idx), c = _mm256_shuffle_epi8(T1, idx);
                    const __m256i t = _mm256_blendv_epi8(a, c, odd);  // even bytes from table 2p, odd from 2p+1
                    acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(ones, t));
                }
                // int16 (16 rows) -> float with the block's scale
                const __m256i a32lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc));
                const __m256i a32hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc, 1));
                const float s = tscale[k * nblk + b];
                float tmp[16];
                _mm256_storeu_ps(tmp, _mm256_cvtepi32_ps(a32lo));
                _mm256_storeu_ps(tmp + 8, _mm256_cvtepi32_ps(a32hi));
                for (int r = 0; r < 16; r++) rs[r] += s * tmp[r];
            }
            for (int r = 0; r < 16; r++) yr[r] += g[k * out + o0 + r] * rs[r];
        }
        memcpy(y + o0, yr, sizeof yr);
    }
}

int main(int argc, char **argv) {
    int out = atoi(argv[1]), in = atoi(argv[2]), K = 2, reps = atoi(argv[3]);
    srand(1);
    float *x = malloc(sizeof(float) * in), *h = malloc(sizeof(float) * K * in), *g = malloc(sizeof(float) * K * out);
    uint8_t *bits = malloc((size_t)K * out * in);
    for (int i = 0; i < in; i++) x[i] = (float)rand() / RAND_MAX * 2 - 1;
    for (int i = 0; i < K * in; i++) h[i] = 0.5f + (float)rand() / RAND_MAX;
    for (int i = 0; i < K * out; i++) g[i] = 0.5f + (float)rand() / RAND_MAX;
    for (size_t i = 0; i < (size_t)K * out * in; i++) bits[i] = rand() & 1;
    // layout
    const int np = in / 8, ng = in / 4, nblk = in / 128;
    uint8_t *lay = aligned_alloc(64, (size_t)K * out * np * 2 + 64);
    for (int k = 0; k < K; k++)
        for (int o0 = 0; o0 < out; o0 += 16)
            for (int p = 0; p < np; p++)
                for (int r = 0; r < 16; r++)
                    for (int par = 0; par < 2; par++) {
                        int gi = 2 * p + par, n = 0;
                        for (int j = 0; j < 4; j++) n |= bits[((size_t)k * out + o0 + r) * in + 4 * gi + j] << j;
                        lay[((((size_t)k * (out / 16) + o0 / 16) * np + p) * 32) + 2 * r + par] = (uint8_t)n;
                    }
    int8_t *tab = malloc((size_t)K * ng * 16);
    float *tscale = malloc(sizeof(float) * K * nblk);
    float *y = malloc(sizeof(float) * out), *yref = malloc(sizeof(float) * out);
    double t_build = 0, t_gemv = 0;
    float *xh = malloc(sizeof(float) * in);
    for (int rep = 0; rep < reps; rep++) {
        double t0 = now();
        // tables (per call): xh = h*x; per 128-column block a scale so that |entry| <= 127
        for (int k = 0; k < K; k++) {
            for (int i = 0; i < in; i++) xh[i] = h[k * in + i] * x[i];
            for (int b = 0; b < nblk; b++) {
                float mx = 0;
                for (int gi = b * 32; gi < b * 32 + 32; gi++) {
                    float s = fabsf(xh[4 * gi]) + fabsf(xh[4 * gi + 1]) + fabsf(xh[4 * gi + 2]) + fabsf(xh[4 * gi + 3]);
                    if (s > mx) mx = s;
                }
                float sc = mx > 0 ? mx / 127.0f : 1.0f, inv = 1.0f / sc;
                tscale[k * nblk + b] = sc;
                for (int gi = b * 32; gi < b * 32 + 32; gi++)
                    for (int n = 0; n < 16; n++) {
                        float s = 0;
                        for (int j = 0; j < 4; j++) s += ((n >> j) & 1 ? 1.f : -1.f) * xh[4 * gi + j];
                        tab[((size_t)k * ng + gi) * 16 + n] = (int8_t)lrintf(s * inv);
                    }
            }
        }
        double t1 = now();
        gemv_tmac(K, out, in, lay, tab, tscale, g, y);
        double t2 = now();
        if (rep > 0) { t_build += t1 - t0; t_gemv += t2 - t1; }
    }
    // reference (float64)
    double err = 0, nrm = 0;
    for (int o = 0; o < out; o++) {
        double s = 0;
        for (int k = 0; k < K; k++) {
            double a = 0;
            for (int i = 0; i < in; i++) a += (bits[((size_t)k * out + o) * in + i] ? 1 : -1) * (double)h[k * in + i] * x[i];
            s += g[k * out + o] * a;
        }
        err += (y[o] - s) * (y[o] - s); nrm += s * s;
    }
    printf("%dx%d: tables %.1f us, gemv %.1f us (one thread), rel err %.2e, %.1f G binary weights/s\n", out, in,
           t_build / (reps - 1) * 1e6, t_gemv / (reps - 1) * 1e6, sqrt(err / nrm), 2.0 * out * in / (t_gemv / (reps - 1)) / 1e9);
    return 0;
}
