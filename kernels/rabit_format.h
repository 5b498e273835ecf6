/*
 * rabit packed sign-plane format, version 1. This header is the single definition of the
 * format; the C, CUDA, PyTorch and NumPy code and the exported quantization_config all follow it.
 *
 * A RaBiT linear layer of shape [out, in] with K binary paths stores its signs as K planes:
 *
 *   packed : uint32 words, shape [K][out][RABIT_WORDS(in)], row-major, contiguous.
 *            (PyTorch holds the same bytes as an int32 tensor; NumPy as uint32.)
 *
 *   Element (k, o, j) of the sign tensor B in {-1, +1} lives in
 *       word  packed[k][o][j / 32]
 *       bit   j % 32           (LSB-first: bit 0 is column 32*w, bit 31 is column 32*w + 31)
 *   A set bit (1) means +1, a clear bit (0) means -1.
 *   sign(0) is +1, so a zero residual produces a set bit.
 *
 *   Padding: when in is not a multiple of 32, the bits of the last word past column in-1 are 0.
 *   Writers must clear them; readers must ignore them (never assume they are 0 when reading
 *   files written by someone else).
 *
 *   Scales: g [K][out] and h [K][in]. Exported files keep them as float16; kernels compute in
 *   float32. The layer computes  y = sum_k g_k * (B_k (h_k * x))  (+ bias).
 */
#ifndef RABIT_FORMAT_H
#define RABIT_FORMAT_H

#include <stdint.h>

#define RABIT_FORMAT_VERSION 1
#define RABIT_WORD_BITS 32
#define RABIT_MAX_K 4

/* Number of uint32 words that hold one row of `in` signs. */
#define RABIT_WORDS(in) (((in) + RABIT_WORD_BITS - 1) / RABIT_WORD_BITS)

typedef uint32_t rabit_word_t;

#if defined(__cplusplus)
static_assert(sizeof(rabit_word_t) * 8 == RABIT_WORD_BITS, "rabit word must be 32 bits");
#else
_Static_assert(sizeof(rabit_word_t) * 8 == RABIT_WORD_BITS, "rabit word must be 32 bits");
#endif

#endif /* RABIT_FORMAT_H */
