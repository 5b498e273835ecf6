/*
 * rabit C kernels: raw pointers, no torch, no Python. Every entry point validates its
 * arguments and returns a rabit_status instead of aborting; the glue layers (csrc/) turn a
 * status into a Python exception that names the op.
 *
 * Shapes: W [out][in], g [K][out], h [K][in], packed [K][out][RABIT_WORDS(in)] (rabit_format.h),
 * x [M][in], y [M][out]. All arrays are dense row-major. Scales are float32 here; the glue converts
 * stored float16 scales once per call (they are vectors, so that costs nothing).
 */
#ifndef RABIT_KERNELS_H
#define RABIT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "rabit_format.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Below this much work (in packed words) a kernel runs on one thread: waking an OpenMP team costs
   more than a small layer's whole product, and on a busy machine far more (milliseconds). */
#define RABIT_PARALLEL_MIN_WORDS 16384

typedef enum {
    RABIT_OK = 0,
    RABIT_ERR_ARG = 1,        /* bad size, K out of range, null pointer */
    RABIT_ERR_NOMEM = 2,      /* scratch allocation failed */
    RABIT_ERR_NONFINITE = 3,  /* NaN or Inf in the latent weight */
    RABIT_ERR_UNSUPPORTED = 4 /* dtype or kernel variant not available */
} rabit_status;

typedef enum { RABIT_F32 = 0, RABIT_F16 = 1, RABIT_BF16 = 2 } rabit_dtype;

typedef enum { RABIT_STE_IDENTITY = 0, RABIT_STE_CLIPPED = 1, RABIT_STE_TANH = 2 } rabit_ste;

/* Which CPU implementation the packed GEMV/GEMM uses. AUTO: the best table kernel the CPU supports for x of fewer
   than RABIT_CPU_GEMM_MIN_ROWS rows, and from there Ŵ dequantized tile by tile into a float32 GEMM, which the
   bindings run with their BLAS (ATen, NumPy): the table kernels' work grows with every row of x, the
   dequantization is paid once per call. REF, AVX2, AVX512: that table kernel at every M (bit-identical to each
   other); GEMM: the GEMM at every M. */
typedef enum {
    RABIT_CPU_AUTO = 0,
    RABIT_CPU_REF = 1,
    RABIT_CPU_AVX2 = 2,
    RABIT_CPU_GEMM = 3,
    RABIT_CPU_AVX512 = 4
} rabit_cpu_kernel;

/* Rows of x from which AUTO takes the GEMM: on this project's 2-core VM the GEMM (with AVX2 dequantization) was
   1.01-1.54x the AVX2 table kernel at 32 rows, about even at 24, and 1.8-2.5x at 128; against the faster AVX-512
   table kernel the crossover is 48-96 rows, depending on the shape (docs/kernels.md). One constant for both. */
#define RABIT_CPU_GEMM_MIN_ROWS 32
/* Elements of one dequantized tile of Ŵ in the GEMM path (4 MiB of float32): whole rows, at least one (out > 0). */
#define RABIT_CPU_GEMM_TILE_ELEMS (1 << 20)

const char *rabit_status_string(rabit_status s);

/* Select the packed-GEMV implementation for this copy of the C core (each extension module links its own);
   UNSUPPORTED if the CPU lacks it. */
rabit_status rabit_cpu_set_kernel(rabit_cpu_kernel k);
/* The table kernel AUTO resolves to on this CPU, or the one forced by rabit_cpu_set_kernel (GEMM when forced). */
rabit_cpu_kernel rabit_cpu_active_kernel(void);
/* Whether a packed linear of an x with M rows runs as the dequantized GEMM (the binding's job) rather than
   rabit_packed_linear_cpu's table kernels. */
int rabit_cpu_use_gemm(int64_t M);
/* Rows of Ŵ per tile of the GEMM path for `in` columns. */
int64_t rabit_cpu_gemm_tile_rows(int64_t out, int64_t in);
/* The kernel named "auto", "ref", "avx2", "avx512" or "gemm" into *k: RABIT_OK, or RABIT_ERR_ARG for another name. */
rabit_status rabit_cpu_kernel_from_name(const char *name, rabit_cpu_kernel *k);
/* The name of rabit_cpu_active_kernel(): "ref", "avx2", "avx512" or "gemm". */
const char *rabit_cpu_active_kernel_name(void);
#define RABIT_CPU_KERNEL_NAMES "'auto', 'ref', 'avx2', 'avx512' or 'gemm'"

/*
 * Coupled residual binarization (forward). From latent W (dtype wdt) and scales g, h:
 *   what   (nullable) Ŵ = sum_k g_k*B_k*h_k, written in dtype what_dt;
 *   packed (nullable) the K sign planes.
 * Arithmetic is float32, no FMA, in the order of rabit/reference.py, so signs are bit-exact.
 * Returns RABIT_ERR_NONFINITE if W holds NaN or Inf; every output is still computed, as on the GPU
 * (a NaN entry has sign -1 in every path: NaN >= 0 is false).
 */
rabit_status rabit_residual_binarize_cpu(const void *W, rabit_dtype wdt, const float *g, const float *h,
                                         int64_t K, int64_t out, int64_t in, void *what, rabit_dtype what_dt,
                                         rabit_word_t *packed);

/*
 * Backward in one pass over G = dL/dŴ (dtype gdt), signs read from `packed`:
 *   dW = G * ste(W)   (dtype wdt; W is only read for the clipped and tanh variants)
 *   dg[k][o] = sum_j G[o][j] B_k[o][j] h_k[j]      dh[k][j] = sum_o G[o][j] B_k[o][j] g_k[o]
 * dg, dh are float32, accumulated in double; the result does not depend on thread scheduling.
 * dW = NULL: dg and dh only (W, wdt, ste and ste_param are then unused): with the identity STE and a float32 G of
 * the weight's dtype, dW is G itself, and the caller has it already.
 */
rabit_status rabit_residual_binarize_backward_cpu(const void *G, rabit_dtype gdt, const void *W, rabit_dtype wdt,
                                                  const float *g, const float *h, const rabit_word_t *packed,
                                                  int64_t K, int64_t out, int64_t in, rabit_ste ste,
                                                  float ste_param, void *dW, float *dg, float *dh);

/*
 * Ŵ = sum_k g_k*B_k*h_k from the packed planes, in dtype dt, with the forward's arithmetic: for the planes
 * rabit_residual_binarize_cpu wrote, its Ŵ bit for bit.
 */
rabit_status rabit_dequantize_cpu(const rabit_word_t *packed, const float *g, const float *h, int64_t K, int64_t out,
                                  int64_t in, void *what, rabit_dtype dt);

/* Rows o0 .. o1-1 of that Ŵ (same values), into what[(o - o0) * in + j]: a tile for a blocked GEMM. */
rabit_status rabit_dequantize_rows_cpu(const rabit_word_t *packed, const float *g, const float *h, int64_t K,
                                       int64_t out, int64_t in, int64_t o0, int64_t o1, void *what, rabit_dtype dt);

/* Pack rows of signs (float32; bit = value >= 0) into words; padding bits are cleared. */
rabit_status rabit_pack_signs_cpu(const float *signs, int64_t rows, int64_t in, rabit_word_t *packed);

/* Unpack words to ±1 in dtype dt (padding bits ignored). */
rabit_status rabit_unpack_signs_cpu(const rabit_word_t *packed, int64_t rows, int64_t in, void *out,
                                    rabit_dtype dt);

/*
 * y[m][o] = sum_k g[k][o] * sum_j B_k[o][j] * (h[k][j] * x[m][j])  (+ bias[o])
 * x and y have dtype xdt; g [K][out] and h [K][in] dtypes gdt and hdt (read as float32, exactly); bias (nullable) is
 * float32. Float32 accumulation.
 */
rabit_status rabit_packed_linear_cpu(const void *x, rabit_dtype xdt, int64_t M, const rabit_word_t *packed,
                                     const void *g, rabit_dtype gdt, const void *h, rabit_dtype hdt,
                                     const float *bias, int64_t K, int64_t out, int64_t in, void *y);

/*
 * rabit_packed_linear_cpu on int8 activations (kernels/cpu/packed_linear_i8.c): the same y, with x*h turned into int8
 * tables per 128 columns (a relative error of ~1e-2, the class of llama.cpp's int8 activations), from `layout`, the
 * packed words rearranged once by rabit_i8_layout_cpu (rabit_i8_layout_bytes(K, out, in) bytes). x and y dtype xdt;
 * g, h as in rabit_packed_linear_cpu; bias (nullable) float32.
 */
int64_t rabit_i8_layout_bytes(int64_t K, int64_t out, int64_t in);
rabit_status rabit_i8_layout_cpu(const rabit_word_t *packed, int64_t K, int64_t out, int64_t in, uint8_t *layout);
rabit_status rabit_packed_linear_i8_cpu(const void *x, rabit_dtype xdt, int64_t M, const uint8_t *layout,
                                        const void *g, rabit_dtype gdt, const void *h, rabit_dtype hdt,
                                        const float *bias, int64_t K, int64_t out, int64_t in, void *y);

/*
 * A dense linear on int8 weights and int8 activations (kernels/cpu/int8_linear.c; llama.cpp's Q8_0 kind): for a
 * packed model's dense LM head. rabit_int8_weight_cpu quantizes w [out][in] (dtype dt) once into q [G][nb][8][32]
 * int8 and d [G][nb][8] float32 (groups of 8 rows, G = ceil(out / 8), zero rows past out; nb = rabit_int8_in_pad(in)
 * / 32 blocks of 32 columns, zero past in);
 * RABIT_ERR_NONFINITE for NaN or Inf in w. rabit_int8_linear_cpu: y [M][out] (dtype xdt) from x [M][in] (dtype xdt),
 * x quantized per row and 32 columns the same way, float32 sums of the blocks' exact integer dots; bias (nullable)
 * float32. A relative error of ~1e-2 (int8 activations), not float32's.
 */
int64_t rabit_int8_in_pad(int64_t in);
rabit_status rabit_int8_weight_cpu(const void *w, rabit_dtype dt, int64_t out, int64_t in, int8_t *q, float *d);
rabit_status rabit_int8_linear_cpu(const void *x, rabit_dtype xdt, int64_t M, int64_t in, const int8_t *q,
                                   const float *d, const float *bias, int64_t out, void *y);

/*
 * The CPU fused ops' glue (kernels/cpu/fused_glue.c), float32 inside. Input: u[m] = silu(x[m]) * up[m] (up nullable,
 * x's dtype dt) or x[m]; with norm_weight (nullable, dtype nwdt) rs[m] = 1 / sqrt(mean(u[m]^2) + eps) and u[m] *=
 * norm_weight. Output: y[m] = yl[m] * rs[m] (rs nullable) + bias (nullable, dtype bdt) + residual[m] (nullable, dtype
 * dt), rounded once to dt.
 */
rabit_status rabit_glue_input_cpu(const void *x, const void *up, rabit_dtype dt, int64_t M, int64_t in,
                                  const void *norm_weight, rabit_dtype nwdt, float eps, float *u, float *rs);
rabit_status rabit_glue_output_cpu(const float *yl, int64_t M, int64_t out, const float *rs, const void *bias,
                                   rabit_dtype bdt, const void *residual, rabit_dtype dt, void *y);

/*
 * One decoding step of attention for one new token per row, all rows at cache position pos:
 *   k_cache[b][kh][pos] = rope(k[b][kh]),  v_cache[b][kh][pos] = v[b][kh]
 *   out[b][hd] = softmax_p(scale * rope(q[b][hd]) . k_cache[b][kh][p], p <= pos) v_cache[b][kh][p]
 * with kh = hd / (H / Hkv) (grouped-query attention). rope(x) = x * cos[pos] + rotate_half(x) * sin[pos] (HF's
 * rotate_half form: rotate_half(x) = (-x[D/2:], x[:D/2])), float32 without FMA, rounded once to dtype dt; the
 * scores and the weighted sums in float32 (the sum of weights in double), the output rounded once to dt.
 * q [B][H][D], k and v [B][Hkv][D] with element strides (batch, head) given in qs, ks, vs (the last dimension
 * is dense); caches [B][Hkv][S][D] dense; cos, sin [>= S][D]; every array of dtype dt. Needs D even and
 * 0 <= pos < S.
 */
rabit_status rabit_decode_attention_cpu(const void *q, const int64_t qs[2], const void *k, const int64_t ks[2],
                                        const void *v, const int64_t vs[2], rabit_dtype dt, int64_t B, int64_t H,
                                        int64_t Hkv, int64_t D, void *k_cache, void *v_cache, int64_t S,
                                        const void *cos, const void *sin, int64_t pos, float scale, void *out);

#ifdef __cplusplus
}
#endif

#endif /* RABIT_KERNELS_H */
