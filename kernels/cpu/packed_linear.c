/* Packed GEMV/GEMM driver: input scaling, kernel choice, threading over output rows. */
#include <stdlib.h>
#include <string.h>

#include "../rabit_dtype.h"
#include "packed_linear.h"

static rabit_cpu_kernel rabit_forced_kernel = RABIT_CPU_AUTO;

int rabit_cpu_has_avx2(void) {
#if defined(RABIT_HAVE_AVX2_KERNEL) && (defined(__GNUC__) || defined(__clang__))
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

static int rabit_cpu_has_avx512(void) {
#ifdef RABIT_HAVE_AVX512_KERNEL
    return __builtin_cpu_supports("avx512f") && rabit_cpu_has_avx2(); /* its dequantization rows are AVX2 */
#else
    return 0;
#endif
}

/* rabit_load_f32 for the drivers' x rows and scales (packed_linear.h): fp16 by F16C where the CPU has it (the scalar conversion of
   SmolLM2's 4,224 scales of a 576 x 1536 layer took ~4 us a call, more than the ATen conversion it replaced). */
void rabit_cpu_load_f32(const void *src, rabit_dtype dt, int64_t off, int64_t n, float *dst) {
#if defined(RABIT_HAVE_AVX2_KERNEL) && (defined(__GNUC__) || defined(__clang__))
    if (dt == RABIT_F16 && rabit_cpu_has_avx2() && __builtin_cpu_supports("f16c")) {
        rabit_f16_to_f32_f16c((const uint16_t *)src + off, n, dst);
        return;
    }
#endif
    rabit_load_f32(src, dt, off, n, dst);
}

/* in rabit_cpu_kernel's order */
static const char *const rabit_cpu_kernel_names[] = {"auto", "ref", "avx2", "gemm", "avx512"};
#define RABIT_CPU_KERNEL_COUNT ((int)(sizeof rabit_cpu_kernel_names / sizeof rabit_cpu_kernel_names[0]))

rabit_status rabit_cpu_set_kernel(rabit_cpu_kernel k) {
    if ((int)k < 0 || (int)k >= RABIT_CPU_KERNEL_COUNT) return RABIT_ERR_ARG;
    if ((k == RABIT_CPU_AVX2 && !rabit_cpu_has_avx2()) || (k == RABIT_CPU_AVX512 && !rabit_cpu_has_avx512()))
        return RABIT_ERR_UNSUPPORTED;
    rabit_forced_kernel = k;
    return RABIT_OK;
}

rabit_cpu_kernel rabit_cpu_table_kernel(void) {
    if (rabit_forced_kernel != RABIT_CPU_AUTO && rabit_forced_kernel != RABIT_CPU_GEMM) return rabit_forced_kernel;
    return rabit_cpu_has_avx512() ? RABIT_CPU_AVX512 : rabit_cpu_has_avx2() ? RABIT_CPU_AVX2 : RABIT_CPU_REF;
}

rabit_cpu_kernel rabit_cpu_active_kernel(void) {
    return rabit_forced_kernel == RABIT_CPU_GEMM ? RABIT_CPU_GEMM : rabit_cpu_table_kernel();
}

int rabit_cpu_use_gemm(int64_t M) {
    if (rabit_forced_kernel == RABIT_CPU_AUTO) return M >= RABIT_CPU_GEMM_MIN_ROWS;
    return rabit_forced_kernel == RABIT_CPU_GEMM;
}

rabit_status rabit_cpu_kernel_from_name(const char *name, rabit_cpu_kernel *k) {
    int i;
    if (!name || !k) return RABIT_ERR_ARG;
    for (i = 0; i < RABIT_CPU_KERNEL_COUNT; i++)
        if (!strcmp(name, rabit_cpu_kernel_names[i])) {
            *k = (rabit_cpu_kernel)i;
            return RABIT_OK;
        }
    return RABIT_ERR_ARG;
}

const char *rabit_cpu_active_kernel_name(void) { return rabit_cpu_kernel_names[rabit_cpu_active_kernel()]; }

int64_t rabit_cpu_gemm_tile_rows(int64_t out, int64_t in) {
    const int64_t rows = in > 0 ? RABIT_CPU_GEMM_TILE_ELEMS / in : out;
    return rows < 1 ? 1 : rows > out ? out : rows;
}

/* Output rows o0..o1 (at most block_rows) through a SIMD table kernel, every row of x and path, then g and the bias
   in the order of packed_linear.h. */
static void rabit_packed_rows_blocked(rabit_lut_block_fn block_fn, int block_rows, int64_t per_word, const float *lut,
                                      int64_t M, const rabit_word_t *packed, const float *g, const float *bias,
                                      int64_t K, int64_t out, int64_t in, int64_t o0, int64_t o1, float *y) {
    const int64_t nw = RABIT_WORDS(in);
    const int rows = (int)(o1 - o0);
    const rabit_word_t *pw[RABIT_MAX_BLOCK_ROWS];
    float a[RABIT_MAX_BLOCK_ROWS], yo[RABIT_MAX_BLOCK_ROWS];
    int64_t m, k;
    int r;
    for (m = 0; m < M; m++) {
        for (r = 0; r < rows; r++) yo[r] = 0.0f;
        for (k = 0; k < K; k++) {
            /* lanes past the last row read row o0 again; their sums are dropped */
            for (r = 0; r < block_rows; r++) pw[r] = packed + (k * out + o0 + (r < rows ? r : 0)) * nw;
            block_fn(lut + (m * K + k) * nw * per_word, pw, nw, a);
            for (r = 0; r < rows; r++) yo[r] = yo[r] + g[k * out + o0 + r] * a[r];
        }
        for (r = 0; r < rows; r++) y[m * out + o0 + r] = bias ? yo[r] + bias[o0 + r] : yo[r];
    }
}

/* What a table kernel needs from the driver: its block function (NULL: the scalar row kernel), its table builder,
   table floats per word, and the output rows per scheduled chunk (its block's rows; 16 for the scalar kernel). */
typedef struct {
    rabit_lut_block_fn block;
    rabit_lut_build_fn build;
    int64_t per_word;
    int rows;
} rabit_table_impl;

static rabit_table_impl rabit_table_impl_of(rabit_cpu_kernel k) {
    switch (k) {
#ifdef RABIT_HAVE_AVX2_KERNEL
    case RABIT_CPU_AVX2:
        return (rabit_table_impl){rabit_lut_block_avx2, rabit_lut8_build_avx2, RABIT_LUT_PER_WORD, RABIT_AVX2_ROWS};
#endif
#ifdef RABIT_HAVE_AVX512_KERNEL
    case RABIT_CPU_AVX512:
        return (rabit_table_impl){rabit_lut_block_avx512, rabit_lut16_build_avx512, RABIT_LUT16_PER_WORD,
                                  RABIT_AVX512_ROWS};
#endif
    default:
        return (rabit_table_impl){NULL, rabit_lut8_build_scalar, RABIT_LUT_PER_WORD, 16};
    }
}

/* Floats rounded up to a multiple of 16 (64 bytes): the parts of the driver's one scratch block stay 64-byte aligned. */
static int64_t rabit_up16(int64_t n) { return (n + 15) & ~(int64_t)15; }

rabit_status rabit_packed_linear_cpu(const void *x, rabit_dtype xdt, int64_t M, const rabit_word_t *packed,
                                     const void *g, rabit_dtype gdt, const void *h, rabit_dtype hdt,
                                     const float *bias, int64_t K, int64_t out, int64_t in, void *y) {
    const int64_t nw = RABIT_WORDS(in), in_pad = nw * RABIT_WORD_BITS;
    /* always a table kernel: a binding that takes the GEMM path does not call this */
    const rabit_table_impl impl = rabit_table_impl_of(rabit_cpu_table_kernel());
    float *buf, *xh, *lut, *yf, *row, *gf, *hf;
    const float *gs, *hs; /* g and h as float32: the caller's, or converted into gf, hf */
    int64_t n_xh, n_lut, n_y, n_row, n_g, m, k, j, blk;
    if (!x || !packed || !g || !h || !y || M < 0 || K < 1 || K > RABIT_MAX_K || out < 1 || in < 1)
        return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(xdt) || !rabit_dtype_valid(gdt) || !rabit_dtype_valid(hdt)) return RABIT_ERR_UNSUPPORTED;
    if (M == 0) return RABIT_OK;
    /* one scratch block per call (it was four allocations, and g and h converted to float32 by the binding in two
       more tensors: at decode sizes that overhead was as long as the kernel, 1.2 of 3.3 us at 64 x 64) */
    n_xh = rabit_up16(M * K * in_pad);
    n_lut = rabit_up16(M * K * nw * impl.per_word);
    n_y = rabit_up16(M * out);
    n_row = rabit_up16(in);
    n_g = rabit_up16(K * out);
    buf = (float *)aligned_alloc(64, (size_t)(n_xh + n_lut + n_y + n_row + n_g + rabit_up16(K * in)) * sizeof(float));
    if (!buf) return RABIT_ERR_NOMEM;
    xh = buf;
    lut = xh + n_xh;
    yf = lut + n_lut;
    row = yf + n_y;
    gf = row + n_row;
    hf = gf + n_g;
    memset(xh, 0, (size_t)n_xh * sizeof(float)); /* zero padding past `in` */
    /* exact: every fp16 and bf16 value is a float32; float32 scales are read in place */
    if (gdt != RABIT_F32) rabit_cpu_load_f32(g, gdt, 0, K * out, gf);
    if (hdt != RABIT_F32) rabit_cpu_load_f32(h, hdt, 0, K * in, hf);
    gs = gdt == RABIT_F32 ? (const float *)g : gf;
    hs = hdt == RABIT_F32 ? (const float *)h : hf;
    /* h is applied to x once per call, not once per output row */
    for (m = 0; m < M; m++) {
        rabit_cpu_load_f32(x, xdt, m * in, in, row);
        for (k = 0; k < K; k++)
            for (j = 0; j < in; j++) xh[(m * K + k) * in_pad + j] = hs[k * in + j] * row[j];
    }
    /* the nibble tables (packed_linear.h), once per call: 2 floats per column and path (4 for 16 entries) */
    impl.build(xh, M * K * in_pad / 4, lut);
#pragma omp parallel for schedule(static) if (M * out * nw * K >= RABIT_PARALLEL_MIN_WORDS)
    for (blk = 0; blk < (out + impl.rows - 1) / impl.rows; blk++) {
        const int64_t o0 = blk * impl.rows;
        const int64_t o1 = o0 + impl.rows < out ? o0 + impl.rows : out;
        if (impl.block)
            rabit_packed_rows_blocked(impl.block, impl.rows, impl.per_word, lut, M, packed, gs, bias, K, out, in, o0,
                                      o1, yf);
        else
            rabit_packed_rows_ref(lut, M, packed, gs, bias, K, out, in, o0, o1, yf);
    }
    rabit_store_f32(y, xdt, 0, M * out, yf);
    free(buf);
    return RABIT_OK;
}
