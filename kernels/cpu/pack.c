/* Bit packing of sign planes (format in rabit_format.h) and the CPU kernel selection. */
#include "../rabit_dtype.h"
#include "../rabit_kernels.h"

const char *rabit_status_string(rabit_status s) {
    switch (s) {
        case RABIT_OK: return "ok";
        case RABIT_ERR_ARG: return "invalid argument (size, K or null pointer)";
        case RABIT_ERR_NOMEM: return "out of memory";
        case RABIT_ERR_NONFINITE: return "the weight contains NaN or Inf";
        case RABIT_ERR_UNSUPPORTED: return "unsupported dtype or kernel";
    }
    return "unknown error";
}

rabit_status rabit_pack_signs_cpu(const float *signs, int64_t rows, int64_t in, rabit_word_t *packed) {
    const int64_t nw = RABIT_WORDS(in);
    int64_t r;
    if (!signs || !packed || rows < 0 || in < 1) return RABIT_ERR_ARG;
#pragma omp parallel for schedule(static) if (rows * nw >= RABIT_PARALLEL_MIN_WORDS)
    for (r = 0; r < rows; r++) {
        int64_t w, j;
        for (w = 0; w < nw; w++) {
            const int64_t j0 = w * RABIT_WORD_BITS;
            const int64_t j1 = j0 + RABIT_WORD_BITS < in ? j0 + RABIT_WORD_BITS : in;
            rabit_word_t word = 0; /* padding bits stay clear */
            for (j = j0; j < j1; j++) word |= (rabit_word_t)(signs[r * in + j] >= 0.0f) << (j - j0);
            packed[r * nw + w] = word;
        }
    }
    return RABIT_OK;
}

rabit_status rabit_unpack_signs_cpu(const rabit_word_t *packed, int64_t rows, int64_t in, void *out, rabit_dtype dt) {
    const int64_t nw = RABIT_WORDS(in);
    /* ±1 in each dtype's bit pattern */
    const uint16_t plus16 = dt == RABIT_BF16 ? 0x3f80u : 0x3c00u;
    const uint16_t minus16 = dt == RABIT_BF16 ? 0xbf80u : 0xbc00u;
    int64_t r;
    if (!packed || !out || rows < 0 || in < 1) return RABIT_ERR_ARG;
    if (!rabit_dtype_valid(dt)) return RABIT_ERR_UNSUPPORTED;
#pragma omp parallel for schedule(static) if (rows * nw >= RABIT_PARALLEL_MIN_WORDS)
    for (r = 0; r < rows; r++) {
        int64_t j;
        for (j = 0; j < in; j++) {
            const int bit = (packed[r * nw + j / RABIT_WORD_BITS] >> (j % RABIT_WORD_BITS)) & 1u;
            if (dt == RABIT_F32)
                ((float *)out)[r * in + j] = bit ? 1.0f : -1.0f;
            else
                ((uint16_t *)out)[r * in + j] = bit ? plus16 : minus16;
        }
    }
    return RABIT_OK;
}
