/*
 * Internal interface of the CPU packed GEMV/GEMM. The driver (packed_linear.c) forms
 * xh[m][k][:] = h_k * x_m once per call, zero-padded to whole words, turns it into nibble lookup tables,
 * and hands row ranges to one of the row kernels below.
 *
 * Lookup tables (T-MAC style, float32): for every nibble q (columns c = 32w + 4q .. 4q+3) and every
 * i = 0..7, lut[m][k][w][q][i] = ((s0 + s1) + s2) - x3 with s_j = +x_{c+j} if bit j of i is set, else
 * -x_{c+j}. A row whose nibble n has bit 3 clear adds lut[..][n & 7]; with bit 3 set it adds
 * -lut[..][~n & 7] (flipping all four signs negates the sum exactly). One lookup replaces four
 * sign-flip-and-adds.
 *
 * Summation order (shared by every CPU kernel, so that they agree bit for bit): for one output row o
 * and path k, the value of nibble q of word w goes to accumulator q % 2, in increasing (w, q); then
 * a = acc0 + acc1; finally y = ((0 + g_0*a_0) + g_1*a_1) + ... + bias.
 */
#ifndef RABIT_CPU_PACKED_LINEAR_H
#define RABIT_CPU_PACKED_LINEAR_H

#include "../rabit_kernels.h"

#define RABIT_LUT_PER_WORD 64    /* 8 nibbles x 8 entries */
#define RABIT_LUT16_PER_WORD 128 /* 8 nibbles x 16 entries: the AVX-512 kernel's tables, rabit_lut_value(t, 0..15) */

void rabit_packed_rows_ref(const float *lut, int64_t M, const rabit_word_t *packed, const float *g,
                           const float *bias, int64_t K, int64_t out, int64_t in, int64_t o0, int64_t o1, float *y);

/* A SIMD table kernel: a[r] = partial sum of row pw[r] (r below its block's rows) of one path over the nw words of
   its tables t, in the summation order above. The driver's row loop around it (rabit_packed_linear_cpu) applies g
   and the bias. Lanes past the layer's last row get a pointer to a valid row; their sums are dropped. */
typedef void (*rabit_lut_block_fn)(const float *t, const rabit_word_t *const *pw, int64_t nw, float *a);
#define RABIT_MAX_BLOCK_ROWS 64
/* The tables of n nibbles of xh (4 columns each) into lut: 8 entries per nibble (scalar, AVX2) or 16 (AVX-512), the
   values above, bit for bit the same in every version. */
typedef void (*rabit_lut_build_fn)(const float *xh, int64_t n, float *lut);
void rabit_lut8_build_scalar(const float *xh, int64_t n, float *lut);

#if defined(__x86_64__) || defined(_M_X64)
#define RABIT_HAVE_AVX2_KERNEL 1
#define RABIT_AVX2_ROWS 32 /* four vectors of 8 rows share every table load (16 and 64 timed slower) */
void rabit_lut_block_avx2(const float *t, const rabit_word_t *const *pw, int64_t nw, float *a);
void rabit_lut8_build_avx2(const float *xh, int64_t n, float *lut);
/* n fp16 values into float32 with F16C (8 a vector; exact, as rabit_f16_to_f32, except that a signalling NaN comes
   out quiet): the driver's conversion of fp16 x rows and scales, a scalar loop of branches otherwise (~1 ns a value). */
void rabit_f16_to_f32_f16c(const uint16_t *src, int64_t n, float *dst);
#if defined(__GNUC__) || defined(__clang__)
#define RABIT_HAVE_AVX512_KERNEL 1
#define RABIT_AVX512_ROWS 64 /* four vectors of 16 rows share every table load */
/* Takes 16-entry tables (RABIT_LUT16_PER_WORD floats per word). */
void rabit_lut_block_avx512(const float *t16, const rabit_word_t *const *pw, int64_t nw, float *a);
void rabit_lut16_build_avx512(const float *xh, int64_t n, float *lut);
#endif
#endif

/* The int8 quantizers (packed_linear_i8.c's tables, int8_linear.c's blocks) take a block whose largest magnitude is
   below this as zero: 127 / amax would overflow float32 near 3.7e-37, and such outputs are below float32's normal
   range anyway. rabit.reference uses the same bound. */
#define RABIT_I8_MIN_AMAX 0x1p-120f

/* rabit_load_f32 (n values from element off of src, dtype dt, into float32), with F16C for fp16 where the CPU has it:
   the drivers' conversion of x rows and scales. */
void rabit_cpu_load_f32(const void *src, rabit_dtype dt, int64_t off, int64_t n, float *dst);

/* Whether this build has AVX2 code (RABIT_HAVE_AVX2_KERNEL) and the CPU runs it: the table kernels' choice, and the
   decode attention's (kernels/cpu/decode_attention.c). */
int rabit_cpu_has_avx2(void);

/* The table kernel in use: REF, AVX2 or AVX512 as forced, else the best this build and CPU run (also under a forced
   GEMM: the table kernels and the dequantization rows follow it). */
rabit_cpu_kernel rabit_cpu_table_kernel(void);

/* One row's Ŵ over `in` columns for path k: acc[j] (= if first) or += (±g) * h[j], the sign from the packed bits
   (set: +), in the forward's float32 arithmetic. Scalar C and AVX2 (bit-identical: the same products and sums; the
   AVX-512 table kernel's dequantization uses the AVX2 rows). */
void rabit_dequantize_row_scalar(const rabit_word_t *pw, float g, const float *h, int64_t in, int first, float *acc);
#ifdef RABIT_HAVE_AVX2_KERNEL
void rabit_dequantize_row_avx2(const rabit_word_t *pw, float g, const float *h, int64_t in, int first, float *acc);
#endif

/* The value nibble n (0..15) of table t (8 entries) contributes, in scalar C. */
static inline float rabit_lut_value(const float *t, unsigned n) {
    return (n & 8u) ? -t[~n & 7u] : t[n & 7u];
}

#endif
