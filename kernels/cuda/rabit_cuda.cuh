/*
 * rabit CUDA kernels: host-side launchers over raw device pointers, no torch (csrc/cuda/ops_cuda.cu is
 * the ATen glue). Same shapes, packed format (rabit_format.h) and arithmetic rules as the C kernels in
 * kernels/cpu/. Every launcher enqueues on `stream` and returns the launch's cudaError_t.
 *
 * Dtype codes are rabit_dtype (rabit_kernels.h). Scales g, h of residual_binarize(_backward) are float32
 * (the glue converts them, like the CPU glue); packed_linear reads g, h, bias in their own dtypes.
 */
#ifndef RABIT_CUDA_CUH
#define RABIT_CUDA_CUH

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "../rabit_format.h"
#include "../rabit_kernels.h"

namespace rabit_cuda {

/* Bits of the error flag written by residual_binarize (checked by the glue after the kernel). */
enum { FLAG_W_NONFINITE = 1, FLAG_G_NONFINITE = 2, FLAG_H_NONFINITE = 4 };

/* The backward's warps each own a chunk of kBwdCols columns; its blocks are row groups of one chunk. The
   workspace holds float64 partial sums: dg partials [ceil(in / kBwdCols)][K][out], one per chunk, then dh
   partials [groups][K][in], one per row group, with groups <= a bound of K, out and in alone (binarize.cu). */
constexpr int kBwdCols = 128;
size_t backward_workspace_doubles(int K, int64_t out, int64_t in);

/* For fp16/bf16 x: a decode kernel for M <= kDecodeMaxM (decode_kernel() says which), a tensor-core GEMM on Ŵ
   formed from the bits ("prefill", packed_prefill.cu: wgmma on sm_90a, else mma.sync) above. For float32 x: the
   bf16-split decode kernel at every M (chunks of kDecodeMaxM rows). */
constexpr int kDecodeMaxM = 16;

/* flag: device int, zeroed by the caller; receives FLAG_* bits (null: not checked). what or packed may be null. */
cudaError_t residual_binarize(const void *W, rabit_dtype wdt, const float *g, const float *h, int K, int64_t out,
                              int64_t in, void *what, rabit_dtype odt, rabit_word_t *packed, int *flag,
                              cudaStream_t stream);

/* dg, dh: float32 [K][out], [K][in]; ws: backward_workspace_doubles() doubles. dW null: dg and dh only (W and the
   STE unused), as rabit_residual_binarize_backward_cpu. */
cudaError_t residual_binarize_backward(const void *G, rabit_dtype gdt, const void *W, rabit_dtype wdt, const float *g,
                                       const float *h, const rabit_word_t *packed, int K, int64_t out, int64_t in,
                                       rabit_ste ste, float ste_param, void *dW, float *dg, float *dh, double *ws,
                                       cudaStream_t stream);

/* Ŵ [out][in] in dtype dt from the planes and float32 g, h (dequantize.cu): residual_binarize's Ŵ for its planes. */
cudaError_t dequantize(const rabit_word_t *packed, const float *g, const float *h, int K, int64_t out, int64_t in,
                       void *what, rabit_dtype dt, cudaStream_t stream);

cudaError_t pack_signs(const float *signs, int64_t rows, int64_t in, rabit_word_t *packed, cudaStream_t stream);

cudaError_t unpack_signs(const rabit_word_t *packed, int64_t rows, int64_t in, void *out, rabit_dtype dt,
                         cudaStream_t stream);

/* y [M][out] in xdt = sum_k g_k * (B_k (h_k * x)) + bias. g, h, bias in their own dtypes (bias nullable).
   For the prefill path (fp16/bf16 x, M > kDecodeMaxM) g, h and bias must be float32. workspace: device
   memory of packed_linear_workspace_bytes() bytes (16-byte aligned; null when that is 0). */
cudaError_t packed_linear(const void *x, rabit_dtype xdt, int64_t M, const rabit_word_t *packed, const void *g,
                          rabit_dtype gdt, const void *h, rabit_dtype hdt, const void *bias, rabit_dtype bdt, int K,
                          int64_t out, int64_t in, void *y, void *workspace, cudaStream_t stream);
size_t packed_linear_workspace_bytes(rabit_dtype xdt, int64_t M, int K, int64_t in, int64_t out);

/* The prefill path (packed_prefill.cu): g, h, bias float32 [K][out], [K][in], [out] (bias nullable). */
cudaError_t packed_prefill(const void *x, rabit_dtype xdt, int64_t M, const rabit_word_t *packed, const float *g,
                           const float *h, const float *bias, int K, int64_t out, int64_t in, void *y,
                           cudaStream_t stream);

/* How packed_prefill runs a call with these arguments on the current device: the kernel and the wgmma kernel's
   k-split over a thread-block cluster, or, where a RABIT_CUDA_PREFILL / RABIT_CUDA_PREFILL_SPLITS setting cannot
   hold, `error` (a static message; packed_prefill then returns cudaErrorInvalidValue). */
enum PrefillKernel { PREFILL_MMA = 0, PREFILL_WGMMA = 1 };
struct PrefillPlan {
    PrefillKernel kernel;
    int splits;
    const char *error;
};
PrefillPlan prefill_plan(int64_t M, int64_t out, int64_t in, bool x_aligned, bool h_aligned);

/* Which packed_linear path a call with these arguments takes: 0 = decode (float32 x), 1 = prefill
   (fp16/bf16 x, M > kDecodeMaxM), 2 = a decode kernel of fp16/bf16 x (M <= kDecodeMaxM). */
int packed_linear_path(rabit_dtype xdt, int64_t M);

/* The decode kernels of path 2: in packed_decode.cu the int8 MMA one on exact integer digits of x*h (float32-level
   accuracy), its 1-bit MMA variant (M <= kB1MaxM; bit-identical outputs), and the fp16 MMA one (x*h rounded once
   to fp16: the accuracy of a dense fp16 layer); in packed_decode_simt.cu the CUDA-core one of one launch for narrow
   layers (M <= kSimtMaxM, in <= kSimtMaxIn; float32 products and sums: float32-level accuracy, not bit-identical to
   int8). decode_kernel() is the choice packed_linear makes for a layer of K paths and out x in on the current device (a
   layer group runs as one launch when its layers' choices agree), and packed_linear_fused's: every kernel has the
   glue's epilogue. */
enum DecodeKernel { DECODE_I8 = 0, DECODE_B1 = 1, DECODE_F16 = 2, DECODE_SIMT = 3, DECODE_B1P = 4, DECODE_B1P_I8 = 5 };
/* DECODE_B1P_I8 is never decode_kernel()'s choice: the int8 activation class (rabit.packed_linear_i8 and
   packed_linear_fused_i8 on CUDA), an accuracy class a caller opts into. x*h is quantized per sub-group of 128 columns
   (of a 512-column group: blocks of 32 columns, every fourth) to Q = rint(x*h * 127 / amax) with the scale amax / 127
   (llama.cpp's int8 activations; relative error ~1e-2 of a layer's output; rabit.reference.int8_activations_cuda), and
   the persistent 1-bit kernel multiplies the weights' bits with Q's 8 bit planes: 4 binary MMAs (k = 128, one a
   sub-group) a group and path instead of 8 (k = 256), fragments a quarter the size. It runs where decode_i8_applies holds: M = 1 and a
   layer's fragments (512 bytes a group and path) fit in one block's shared memory. */
bool decode_i8_applies(int64_t M, int64_t in, int K);
/* The persistent 1-bit kernel (DECODE_B1P) runs a call of M rows of x, `ngroups` 512-column groups and K paths a layer
   where this holds (M = 1, and a layer's fragments fit in one block's shared memory); elsewhere a DECODE_B1P call runs
   the 1-bit kernel, whose outputs are the same bit for bit. decode_b1p_default: whether packed_linear takes it by
   default at M = 1 for a launch of launch_out rows in all (docs/kernels.md, "Persistent 1-bit kernel"): two blocks an
   SM fit (K <= 3, the fragments in half the SM's shared memory) and the launch has at least 1.2 tiles of 16 rows for
   each of them: on an H200 it was faster than the int8 and 1-bit kernels from 320 tiles (5120 x 4096, 1.21 a block)
   on, and slower at 256 (4096 x 4096, one tile a block), where copying the fragments into every block costs more
   than re-reading them per tile. */
bool decode_b1p_applies(int64_t M, int64_t ngroups, int K);
bool decode_b1p_default(int K, int64_t in, int64_t launch_out);
constexpr int kB1MaxM = 2;
/* rabit.packed_linear_fused runs the decode kernel of its shape with the glue (DecodeFusion) up to this M. */
constexpr int kFusedMaxM = 4;
/* ... and with a norm (norm_weight) rows of at most kFusedMaxGroups x 512 columns (the MMA kernels' epilogue holds one
   partial sum of squares a group in shared memory). */
constexpr int kFusedMaxGroups = 64;
constexpr int64_t kFusedNormMaxIn = int64_t{kFusedMaxGroups} * 512;
constexpr int kSimtMaxM = 4;
constexpr int64_t kSimtMaxIn = 2048;
/* The CUDA-core kernel can run a layer of K paths and `in` columns at this M on the current device. */
bool simt_applies(int K, int64_t M, int64_t in);
DecodeKernel decode_kernel(int K, int64_t M, int64_t in, int64_t out, int64_t launch_out = 0);

/* A decode call runs up to kDecodeMaxLayers layers that read the same x [M, in] (q/k/v, gate/up) as one prologue
   and one main kernel: layer l is packed [K][out][words], g [K][out], h [K][in], bias [out] (nullable), y [M][out].
   The layers share K, in and the dtypes of g, h and bias; each y equals a call for its layer alone bit for bit. */
constexpr int kDecodeMaxLayers = 4;
struct DecodeLayer {
    const rabit_word_t *packed;
    const void *g;
    const void *h;
    const void *bias;
    void *y;
    int64_t out;
};
/* The decoder's glue that the decode kernels can take in (rabit.packed_linear_fused): every layer reads
   u = silu(x) * up where up [M][in] (x's dtype) is given, else u = x; with norm_weight [in] (dtype norm_dt) the
   RMSNorm u * rsqrt(mean(u^2) + eps) * norm_weight instead of u; with residual [M][out] (x's dtype; one layer only)
   y = residual + the layer's output, rounded once. Null members are off. prefetch_weights (the DECODE_SIMT kernel;
   the MMA kernels' prologue reads nothing before the kernel ahead ends): the layers' parameters (bits, g, h, bias,
   norm_weight) are loaded before the kernel waits for the one before it in the stream (programmatic dependent
   launch), which is right only where that kernel does not write them. */
struct DecodeFusion {
    const void *norm_weight;
    rabit_dtype norm_dt;
    float eps;
    const void *up;
    const void *residual;
    bool prefetch_weights;
};
/* Workspace of a decode call over `paths` = layers * K paths with kernel kern (0 for DECODE_SIMT). */
size_t decode_workspace_bytes(int paths, int64_t M, int64_t in, DecodeKernel kern);
/* fusion: null for the plain layers (the CUDA-core kernel has a separate instantiation for the glue: it costs
   registers); a residual needs n == 1. */
cudaError_t decode_gemv(const void *x, rabit_dtype xdt, int64_t M, const DecodeLayer *layers, int n,
                        rabit_dtype gdt, rabit_dtype hdt, rabit_dtype bdt, int K, int64_t in, void *workspace,
                        DecodeKernel kern, cudaStream_t stream, const DecodeFusion *fusion = nullptr);
/* The DECODE_SIMT kernel (decode_gemv's for that kern; no workspace): simt_applies(K, M, in) must hold. */
cudaError_t decode_gemv_simt(const void *x, rabit_dtype xdt, int64_t M, const DecodeLayer *layers, int n,
                             rabit_dtype gdt, rabit_dtype hdt, rabit_dtype bdt, int K, int64_t in, cudaStream_t stream,
                             const DecodeFusion *fusion = nullptr);

/* Decode-step attention (decode_attention.cu; the math of rabit/reference.py's decode_attention): the new token's
   q [B][H][D] and k, v [B][Hkv][D] (element strides per row and head; dense last dimension), caches
   [B][Hkv][S][D], cos/sin [>= S][D], all of dtype dt; pos: one int64 on the device. Writes rope(k), v into the
   caches at pos and out [B][H][D]. A pos outside [0, S) makes the outputs NaN and leaves the caches alone.
   Workspace: part, decode_attention_split(S, B * Hkv).splits * B * H * (D + 2) floats (with G = H / Hkv: [B*Hkv][splits][G][D+2]),
   and count, B * Hkv ints that must be zero (the glue zeroes them before each call). */
constexpr int kAttnMaxGroup = 8;
struct AttnTensors {
    const void *q, *k, *v;
    int64_t q_b, q_h, k_b, k_h, v_b, v_h;
    void *k_cache, *v_cache;
    const void *cos, *sin;
    const int64_t *pos;
    void *out;
};
/* Why the kernel cannot take (dt, G = H / Hkv, D), or nullptr; every row must also be 16-byte aligned. */
const char *decode_attention_unsupported(rabit_dtype dt, int G, int D);
/* How a call splits the cache: `splits` blocks per (row, KV head), each over `chunks_per_block` chunks of positions;
   part and count are needed with splits > 1 and no cluster only. */
constexpr int kAttnMaxCluster = 8;
struct AttnSplit {
    int splits, chunks_per_block;
    bool cluster;       // the blocks combine in a thread-block cluster (sm_90): no part, no count
    const char *error;  // a RABIT_CUDA_ATTENTION_COMBINE setting that cannot hold (decode_attention then fails)
};
AttnSplit decode_attention_split(int64_t S, int64_t rows_heads);
/* sp: decode_attention_split(S, B * Hkv), the one the workspace was sized by. */
cudaError_t decode_attention(const AttnTensors &t, rabit_dtype dt, int B, int H, int Hkv, int D, int S, float scale,
                             const AttnSplit &sp, float *part, int *count, cudaStream_t stream);

}  // namespace rabit_cuda

#endif /* RABIT_CUDA_CUH */
