/* A/B of two builds of the AVX2 table kernel's block function (kernels/cpu/packed_linear_avx2.c), alternated in one
   process on the same words and tables (a noisy VM moves whole-op timings by up to 1.5x between runs; this does
   not), single thread, one path of an out x in layer in blocks of 32 rows as the driver calls it; best of REPS per
   round, mean of 5 rounds; exits 1 unless the two outputs are identical bit for bit. Build (OLD: a commit's file):
     git show OLD:kernels/cpu/packed_linear_avx2.c > /tmp/old.c   (its two #include paths made absolute)
     F="-O3 -std=c11 -ffp-contract=off"; R="-Drabit_dequantize_row_avx2=%s_deq -Drabit_lut8_build_avx2=%s_build \
       -Drabit_f16_to_f32_f16c=%s_f16"
     gcc $F -c /tmp/old.c -o old.o -Drabit_lut_block_avx2=old_block $(printf "$R" old old old)
     gcc $F -c kernels/cpu/packed_linear_avx2.c -o new.o -Drabit_lut_block_avx2=new_block $(printf "$R" new new new)
     gcc $F -D_POSIX_C_SOURCE=199309L benchmarks/cpu_table_kernel_ab.c old.o new.o -o ab && ./ab 576 1536 20 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef uint32_t rabit_word_t;
typedef void (*block_fn)(const float *t, const rabit_word_t *const *pw, int64_t nw, float *a);
void old_block(const float *t, const rabit_word_t *const *pw, int64_t nw, float *a);
void new_block(const float *t, const rabit_word_t *const *pw, int64_t nw, float *a);
/* the dequantization rows in the same files call it; the A/B does not */
void rabit_dequantize_row_scalar(const rabit_word_t *pw, float g, const float *h, int64_t in, int first, float *acc) {
    (void)pw, (void)g, (void)h, (void)in, (void)first, (void)acc;
    abort();
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static double best_of(block_fn f, const float *lut, const rabit_word_t *w, int out, int64_t nw, float *y, int reps) {
    double best = 1e9;
    for (int r = 0; r < reps; r++) {
        const double t0 = now();
        for (int o0 = 0; o0 < out; o0 += 32) {
            const rabit_word_t *pw[32];
            for (int i = 0; i < 32; i++) pw[i] = w + (int64_t)(o0 + (o0 + i < out ? i : 0)) * nw;
            f(lut, pw, nw, y + o0);
        }
        const double t = now() - t0;
        if (t < best) best = t;
    }
    return best;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s OUT IN REPS\n", argv[0]);
        return 2;
    }
    const int out = atoi(argv[1]), in = atoi(argv[2]), reps = atoi(argv[3]);
    const int64_t nw = (in + 31) / 32;
    srand(7);
    rabit_word_t *w = aligned_alloc(64, ((size_t)out + 32) * nw * sizeof *w + 256);
    float *lut = aligned_alloc(64, (size_t)nw * 64 * sizeof *lut);
    float *y0 = calloc(out + 64, sizeof *y0), *y1 = calloc(out + 64, sizeof *y1);
    for (size_t i = 0; i < ((size_t)out + 32) * nw; i++) w[i] = ((uint32_t)rand() << 16) ^ (uint32_t)rand();
    for (size_t i = 0; i < (size_t)nw * 64; i++) lut[i] = (float)rand() / RAND_MAX * 2 - 1;
    double to = 0, tn = 0;
    for (int round = 0; round < 5; round++) {
        to += best_of(old_block, lut, w, out, nw, y0, reps);
        tn += best_of(new_block, lut, w, out, nw, y1, reps);
    }
    const int same = memcmp(y0, y1, sizeof(float) * out) == 0;
    printf("%dx%d: old %.2f us, new %.2f us (x%.2f), bit-identical %s\n", out, in, to / 5 * 1e6, tn / 5 * 1e6, to / tn,
           same ? "yes" : "NO");
    return !same;
}
