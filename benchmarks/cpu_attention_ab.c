/* A/B of two builds of the CPU decode attention (kernels/cpu/decode_attention.c), alternated in one process on the
   same inputs (as benchmarks/cpu_table_kernel_ab.c does for the table kernel): float32 q, k, v and caches, batch 1,
   best of REPS calls per round, mean of 5 rounds; exits 1 unless the outputs and the caches are identical bit for
   bit. Build (OLD: a commit's file, its two #include paths made absolute; F="-O3 -std=c11 -ffp-contract=off
   -fopenmp"):
     gcc $F -c /tmp/old.c -o old.o -Drabit_decode_attention_cpu=old_attn
     gcc $F -c /tmp/new.c -o new.o -Drabit_decode_attention_cpu=new_attn   (new.c: the current file, paths made absolute)
     gcc $F -D_POSIX_C_SOURCE=199309L -Ikernels benchmarks/cpu_attention_ab.c old.o new.o -o attn_ab -lm
     OMP_NUM_THREADS=1 ./attn_ab H HKV D POS REPS      (SmolLM2: 9 3 64 130 50) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "rabit_kernels.h"

#define ATTN_ARGS                                                                                                   \
    const void *, const int64_t *, const void *, const int64_t *, const void *, const int64_t *, rabit_dtype,      \
        int64_t, int64_t, int64_t, int64_t, void *, void *, int64_t, const void *, const void *, int64_t, float,   \
        void *
rabit_status old_attn(ATTN_ARGS);
rabit_status new_attn(ATTN_ARGS);
typedef rabit_status (*attn_fn)(ATTN_ARGS);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static float rnd(void) { return (float)rand() / RAND_MAX * 2 - 1; }

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s H HKV D POS REPS\n", argv[0]);
        return 2;
    }
    const int64_t H = atoi(argv[1]), Hkv = atoi(argv[2]), D = atoi(argv[3]), pos = atoi(argv[4]), S = pos + 1;
    const int reps = atoi(argv[5]);
    const int64_t qs[2] = {H * D, D}, ks[2] = {Hkv * D, D};
    float *q = malloc(sizeof(float) * H * D), *k = malloc(sizeof(float) * Hkv * D), *v = malloc(sizeof(float) * Hkv * D);
    float *cs = malloc(sizeof(float) * S * D), *sn = malloc(sizeof(float) * S * D), *kc[2], *vc[2], *out[2];
    srand(3);
    for (int64_t i = 0; i < H * D; i++) q[i] = rnd();
    for (int64_t i = 0; i < Hkv * D; i++) k[i] = rnd(), v[i] = rnd();
    for (int64_t i = 0; i < S * D; i++) cs[i] = rnd(), sn[i] = rnd();
    for (int t = 0; t < 2; t++) {
        kc[t] = malloc(sizeof(float) * Hkv * S * D), vc[t] = malloc(sizeof(float) * Hkv * S * D);
        out[t] = malloc(sizeof(float) * H * D);
        srand(9);
        for (int64_t i = 0; i < Hkv * S * D; i++) kc[t][i] = rnd(), vc[t][i] = rnd();
    }
    const attn_fn f[2] = {old_attn, new_attn};
    double tt[2] = {0, 0};
    for (int round = 0; round < 5; round++)
        for (int t = 0; t < 2; t++) {
            double best = 1e9;
            for (int r = 0; r < reps; r++) {
                const double t0 = now();
                if (f[t](q, qs, k, ks, v, ks, RABIT_F32, 1, H, Hkv, D, kc[t], vc[t], S, cs, sn, pos, 0.125f, out[t]))
                    return 2;
                const double dt = now() - t0;
                if (dt < best) best = dt;
            }
            tt[t] += best / 5;
        }
    const int same = !memcmp(out[0], out[1], sizeof(float) * H * D) && !memcmp(kc[0], kc[1], sizeof(float) * Hkv * S * D);
    printf("H=%ld Hkv=%ld D=%ld pos=%ld: old %.2f us, new %.2f us (x%.2f), bit-identical %s\n", (long)H, (long)Hkv,
           (long)D, (long)pos, tt[0] * 1e6, tt[1] * 1e6, tt[0] / tt[1], same ? "yes" : "NO");
    return !same;
}
