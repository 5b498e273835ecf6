/*
 * float16 / bfloat16 <-> float32 conversions in portable C, round-to-nearest-even, matching
 * PyTorch's CPU casts bit for bit (tested exhaustively over all 65,536 half values).
 */
#ifndef RABIT_DTYPE_H
#define RABIT_DTYPE_H

#include <stdint.h>
#include <string.h>

#include "rabit_kernels.h"

static inline uint32_t rabit_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float rabit_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float rabit_bf16_to_f32(uint16_t v) { return rabit_bits_f32((uint32_t)v << 16); }

static inline uint16_t rabit_f32_to_bf16(float f) {
    uint32_t u = rabit_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float rabit_f16_to_f32(uint16_t v) {
    uint32_t sign = (uint32_t)(v & 0x8000u) << 16;
    uint32_t exp = (v >> 10) & 0x1fu;
    uint32_t mant = v & 0x3ffu;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24 is exact in float32 */
        float f = (float)mant * 5.9604644775390625e-8f;
        return rabit_bits_f32(rabit_f32_bits(f) | sign);
    }
    if (exp == 31) return rabit_bits_f32(sign | 0x7f800000u | (mant << 13));
    return rabit_bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

static inline uint16_t rabit_f32_to_f16(float f) {
    /* Round-to-nearest-even through the float unit for subnormals and integer bias otherwise. */
    const uint32_t f32_inf = 255u << 23;
    const uint32_t f16_max = (127u + 16u) << 23; /* 65536: at or above rounds to Inf */
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t u = rabit_f32_bits(f);
    uint32_t sign = u & 0x80000000u;
    uint16_t o;
    u ^= sign;
    if (u >= f16_max) {
        o = (u > f32_inf) ? 0x7e00u : 0x7c00u;
    } else if (u < (113u << 23)) {
        float t = rabit_bits_f32(u) + rabit_bits_f32(denorm_magic);
        o = (uint16_t)(rabit_f32_bits(t) - denorm_magic);
    } else {
        uint32_t mant_odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        u += mant_odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

/* Read n elements of dtype dt starting at element offset `off` into float32. */
static inline void rabit_load_f32(const void *src, rabit_dtype dt, int64_t off, int64_t n, float *dst) {
    int64_t i;
    if (dt == RABIT_F32) {
        memcpy(dst, (const float *)src + off, (size_t)n * sizeof(float));
    } else if (dt == RABIT_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (i = 0; i < n; i++) dst[i] = rabit_bf16_to_f32(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)src + off;
        for (i = 0; i < n; i++) dst[i] = rabit_f16_to_f32(s[i]);
    }
}

/* Write n float32 values as dtype dt at element offset `off`. */
static inline void rabit_store_f32(void *dst, rabit_dtype dt, int64_t off, int64_t n, const float *src) {
    int64_t i;
    if (dt == RABIT_F32) {
        memcpy((float *)dst + off, src, (size_t)n * sizeof(float));
    } else if (dt == RABIT_BF16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (i = 0; i < n; i++) d[i] = rabit_f32_to_bf16(src[i]);
    } else {
        uint16_t *d = (uint16_t *)dst + off;
        for (i = 0; i < n; i++) d[i] = rabit_f32_to_f16(src[i]);
    }
}

static inline int rabit_dtype_valid(rabit_dtype dt) { return dt == RABIT_F32 || dt == RABIT_F16 || dt == RABIT_BF16; }

#endif /* RABIT_DTYPE_H */
