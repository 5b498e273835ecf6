/*
 * Decode-step attention (rabit_cuda.cuh, decode_attention): for one new token per row at cache position pos,
 * the rotary embedding of q and k, the cache write of k and v, and softmax attention over positions 0 .. pos, in
 * one launch. The math is rabit/reference.py's decode_attention (and the CPU kernel's, kernels/cpu/
 * decode_attention.c): rotary in float32 without FMA rounded once to the dtype, scores, softmax and sums float32.
 *
 * Why a kernel of our own: a decode step's attention is a few MB of cache per layer, so its time is launches and
 * latency. The unfused step ran a rotary kernel, two cache copies and SDPA over the whole static cache (with a
 * mask) per layer; torch 2.11's flash attention has no split-KV for one query. Here a block takes one (row, KV
 * head, chunk of 64 positions) and only the chunks in use do work (pos is read on the device, so a CUDA graph
 * replays the call at any position); the chunks' partial results are combined by the block that finishes last
 * (a counter per (row, KV head)), so there is no second launch.
 *
 * Layout of the work in a block (4 warps): a cache row of D values is read as 16-byte pieces, SEG lanes per row
 * (SEG = next power of two of D / elements-per-piece), 32 / SEG rows per warp at a time; the query heads of the KV
 * head (G <= 8, grouped-query attention) share every row read. Scores go through shared memory for the softmax of
 * the chunk; the weighted sum of V rows uses the same lane layout and is reduced across rows by shuffles and across
 * warps through shared memory.
 */
#include <cuda_runtime.h>
#include <cstring>

#include "common.cuh"
#include "rabit_cuda.cuh"

namespace rabit_cuda {

namespace {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * 32;
constexpr int kAttnChunk = 64;  // cache positions per block

struct AttnArgs {
    const void *q, *k, *v;
    int64_t q_b, q_h, k_b, k_h, v_b, v_h;  // element strides (row, head) of q, k, v
    void *k_cache, *v_cache;                // [B][Hkv][S][D]
    const void *cos, *sin;                  // [>= S][D]
    const int64_t *pos;
    void *out;      // [B][H][D]
    float *part;    // [B * Hkv][splits][G][D + 2]: a chunk's unnormalised sums, its max score and sum of weights
    int *count;     // [B * Hkv] chunks done, zero on entry
    int dt, H, Hkv, G, D, S, splits, cpb;  // splits: blocks per (row, KV head); cpb: chunks per block
    float scale;
};

__device__ __forceinline__ float round_dt(float v, int dt) {
    if (dt == RABIT_F32) return v;
    const unsigned short u = f32_to_16(v, dt);
    return dt == RABIT_BF16 ? __uint_as_float(static_cast<uint32_t>(u) << 16) : __half2float(__ushort_as_half(u));
}

/* rope of element d of the D values at x (dtype dt) with the tables' row at pos, rounded to dt. The four loads are
   issued before any conversion: converted one at a time (ld_any), each waited for its load, four L2 round trips in
   a row at the head of every block (SASS, nvcc 13; thirty-sixth session). */
__device__ __forceinline__ float rope_elem(const void *x, int64_t off, int d, int D, const AttnArgs &a, int64_t pos) {
    const int half = D / 2;
    const int64_t ir = d < half ? off + d + half : off + d - half;
    const uint32_t ux = ld_raw(x, a.dt, off + d), ur = ld_raw(x, a.dt, ir);
    const uint32_t uc = ld_raw(a.cos, a.dt, pos * D + d), us = ld_raw(a.sin, a.dt, pos * D + d);
    const float xv = raw_to_f32(ux, a.dt), rot = d < half ? -raw_to_f32(ur, a.dt) : raw_to_f32(ur, a.dt);
    const float c = raw_to_f32(uc, a.dt), s = raw_to_f32(us, a.dt);
    return round_dt(__fadd_rn(__fmul_rn(xv, c), __fmul_rn(rot, s)), a.dt);
}

/* The 16-byte piece at element i of a row (16-byte aligned), read once (streamed past L1). */
template <int E>
__device__ __forceinline__ uint4 load_piece(const void *p, int64_t i) {
    return __ldcs(reinterpret_cast<const uint4 *>(reinterpret_cast<const char *>(p) + i * (16 / E)));
}

/* A piece as E = 8 (16-bit dtypes) or 4 (float32) floats. */
template <int E>
__device__ __forceinline__ void unpack_piece(uint4 u, int dt, float (&x)[8]) {
    if (E == 4) {
        x[0] = __uint_as_float(u.x), x[1] = __uint_as_float(u.y), x[2] = __uint_as_float(u.z),
        x[3] = __uint_as_float(u.w);
        return;
    }
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const unsigned short lo = w[j] & 0xffffu, hi = w[j] >> 16;
        if (dt == RABIT_BF16) {
            x[2 * j] = __uint_as_float(static_cast<uint32_t>(lo) << 16);
            x[2 * j + 1] = __uint_as_float(static_cast<uint32_t>(hi) << 16);
        } else {
            x[2 * j] = __half2float(__ushort_as_half(lo));
            x[2 * j + 1] = __half2float(__ushort_as_half(hi));
        }
    }
}

/* GM >= G query heads per KV head; E elements per 16-byte piece; SEG lanes per cache row. */
template <int GM, int E, int SEG, bool CLUSTER>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_kernel(const AttnArgs a) {
    extern __shared__ float smem[];
    constexpr int RPI = 32 / SEG;                          // rows per warp step
    constexpr int NIT = kAttnChunk / (kAttnWarps * RPI);  // steps per warp over the chunk
    constexpr bool kPreV = NIT <= 8;  // V pieces requested with the K pieces (else after the scores: registers)
    const int split = blockIdx.x, kh = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5, D = a.D, G = a.G;
    const int64_t bk = static_cast<int64_t>(b) * a.Hkv + kh;
    float *qs = smem;                    // [G][D] rotated q, rounded to the dtype
    float *knew = qs + GM * D;           // [D] rotated new k
    float *vnew = knew + D;              // [D] new v
    float *w = vnew + D;                 // [G][chunk] scores, then weights
    float *red = w + GM * kAttnChunk;    // [warps][G][D] the warps' weighted sums
    __shared__ float mx[GM], sm[GM], fac[GM];
    __shared__ int last;

    pdl_wait();  // q, k, v come from the kernel before
    // the next kernel (o_proj) may be scheduled now: it waits for this grid's end before it reads anything, and its
    // launch is hidden behind this one (measured on the SmolLM2-shape step, H200: 936 -> 908 us fused glue, 1120 ->
    // 1072 us unfused; docs/kernels.md)
    pdl_launch_dependents();
    const int64_t pos = *a.pos;
    const bool ok = pos >= 0 && pos < a.S;
    const int64_t len = ok ? pos + 1 : 1;
    const int64_t nch = (len + kAttnChunk - 1) / kAttnChunk;  // chunks in use
    const int n_split = static_cast<int>((nch + a.cpb - 1) / a.cpb);  // blocks of this (row, KV head) with work
    if (split >= n_split) {  // no positions of this block in use; in a cluster it still takes part in the barriers
        if (CLUSTER && n_split > 1) cluster_sync(), cluster_sync();
        return;
    }
    if (!ok) {  // no device-side error: the outputs of this row and KV head are NaN, the caches stay untouched
        for (int i = tid; i < G * D; i += kAttnThreads)
            st_any(a.out, a.dt, (static_cast<int64_t>(b) * a.H + kh * G) * D + i, __int_as_float(0x7fffffff));
        return;
    }
    const int64_t row0 = bk * a.S;  // cache row of position 0
    const int64_t ch0 = static_cast<int64_t>(split) * a.cpb;
    const int64_t ch1 = ch0 + a.cpb < nch ? ch0 + a.cpb : nch;  // this block's chunks [ch0, ch1)
    // Warp `warp` takes rows warp * RPI + r + it * kAttnWarps * RPI (it < NIT) of a chunk, lane piece c = lane % SEG.
    // A chunk's K and V pieces are all requested at once (the first chunk's before anything else), so that the
    // block waits for memory once per chunk: a decode step's attention is latency, not bandwidth. Position pos itself
    // comes from the new k and v.
    const int c = lane % SEG, r = lane / SEG, pieces = D / E;
    const bool lane_on = c < pieces;
    uint4 kp[NIT], vp[kPreV ? NIT : 1];
    auto request = [&](int64_t p0) {
#pragma unroll
        for (int it = 0; it < NIT; it++) {
            const int64_t p = p0 + warp * RPI + r + it * kAttnWarps * RPI;
            const bool in = lane_on && p < pos;
            kp[it] = in ? load_piece<E>(a.k_cache, (row0 + p) * D + c * E) : make_uint4(0u, 0u, 0u, 0u);
            if (kPreV) vp[it] = in ? load_piece<E>(a.v_cache, (row0 + p) * D + c * E) : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    request(ch0 * kAttnChunk);
    for (int i = tid; i < G * D; i += kAttnThreads) {
        const int g = i / D, d = i - g * D;
        qs[i] = rope_elem(a.q, b * a.q_b + static_cast<int64_t>(kh * G + g) * a.q_h, d, D, a, pos);
    }
    if (ch1 == nch) {  // this block holds position pos (the last one in use)
        for (int d = tid; d < D; d += kAttnThreads) {
            const float kr = rope_elem(a.k, b * a.k_b + kh * a.k_h, d, D, a, pos);
            const float vv = ld_any(a.v, a.dt, b * a.v_b + kh * a.v_h + d);
            knew[d] = kr;
            vnew[d] = vv;
            st_any(a.k_cache, a.dt, (row0 + pos) * D + d, kr);  // no block reads position pos from the cache
            st_any(a.v_cache, a.dt, (row0 + pos) * D + d, vv);
        }
    }
    if (tid < G) mx[tid] = -INFINITY, sm[tid] = 0.0f;  // running max score and sum of weights per query head

    float acc[GM][8];  // this lane's weighted sums of V pieces, rescaled to the running max
#pragma unroll
    for (int g = 0; g < GM; g++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[g][j] = 0.0f;
    for (int64_t ch = ch0; ch < ch1; ch++) {
        const int64_t p0 = ch * kAttnChunk;
        __syncthreads();  // q, the new k / v and the running stats are in place; w is free
        // scores (every lane runs the shuffles; rows past pos score -inf)
#pragma unroll
        for (int it = 0; it < NIT; it++) {
            const int pl = warp * RPI + r + it * kAttnWarps * RPI;
            const int64_t p = p0 + pl;
            float x[8];
            if (p == pos) {
#pragma unroll
                for (int j = 0; j < 8; j++) x[j] = j < E && lane_on ? knew[c * E + j] : 0.0f;
            } else {
                unpack_piece<E>(kp[it], a.dt, x);
            }
#pragma unroll
            for (int g = 0; g < GM; g++) {
                float sc = 0.0f;
                if (g < G && lane_on) {
#pragma unroll
                    for (int j = 0; j < E; j++) sc = __fadd_rn(sc, __fmul_rn(qs[g * D + c * E + j], x[j]));
                }
#pragma unroll
                for (int o = SEG / 2; o > 0; o >>= 1) sc += __shfl_xor_sync(0xffffffffu, sc, o);
                if (c == 0 && g < G) w[g * kAttnChunk + pl] = p <= pos ? sc * a.scale : -INFINITY;
            }
        }
        __syncthreads();
        // the chunk's weights against the running max: warp g takes heads g, g + 4, ...
        for (int g = warp; g < G; g += kAttnWarps) {
            float m = -INFINITY;
            for (int i = lane; i < kAttnChunk; i += 32) m = fmaxf(m, w[g * kAttnChunk + i]);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            // a NaN score: fmaxf skips it, but its weight below is NaN, so the output is NaN (never a finite guess)
            const float m_old = mx[g], m_new = fmaxf(m_old, m);
            // every score so far -inf (a float32 overflow of q.k): subtract 0, not -inf, so that the weights are 0
            // rather than NaN (as flash attention does)
            const float m_sub = m_new == -INFINITY ? 0.0f : m_new;
            float l = 0.0f;
            for (int i = lane; i < kAttnChunk; i += 32) {
                const float e = expf(w[g * kAttnChunk + i] - m_sub);  // exp(-inf) = 0 for rows out of range
                w[g * kAttnChunk + i] = e;
                l += e;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
            __syncwarp();
            if (lane == 0) {
                const float f = expf(m_old - m_sub);  // 0 for the first chunk (m_old = -inf)
                fac[g] = f;
                sm[g] = sm[g] * f + l;
                mx[g] = m_new;
            }
        }
        __syncthreads();
        // weighted sum of V rows, same rows and pieces as the scores
#pragma unroll
        for (int g = 0; g < GM; g++)
            if (g < G)
#pragma unroll
                for (int j = 0; j < 8; j++) acc[g][j] *= fac[g];
#pragma unroll
        for (int it = 0; it < NIT; it++) {
            const int pl = warp * RPI + r + it * kAttnWarps * RPI;
            const int64_t p = p0 + pl;
            if (p > pos || !lane_on) continue;
            float x[8];
            if (p == pos) {
#pragma unroll
                for (int j = 0; j < E; j++) x[j] = vnew[c * E + j];
            } else {
                unpack_piece<E>(kPreV ? vp[it] : load_piece<E>(a.v_cache, (row0 + p) * D + c * E), a.dt, x);
            }
#pragma unroll
            for (int g = 0; g < GM; g++) {
                if (g >= G) break;
                const float e = w[g * kAttnChunk + pl];
#pragma unroll
                for (int j = 0; j < E; j++) acc[g][j] = __fadd_rn(acc[g][j], __fmul_rn(e, x[j]));
            }
        }
        if (ch + 1 < ch1) request((ch + 1) * kAttnChunk);
    }
    // rows of a warp step -> lanes 0 .. SEG-1, then the warps through shared memory
#pragma unroll
    for (int g = 0; g < GM; g++)
#pragma unroll
        for (int j = 0; j < E; j++)
#pragma unroll
            for (int o = SEG; o < 32; o <<= 1) acc[g][j] += __shfl_xor_sync(0xffffffffu, acc[g][j], o);
    if (r == 0 && lane_on) {
#pragma unroll
        for (int g = 0; g < GM; g++)
            if (g < G)
#pragma unroll
                for (int j = 0; j < E; j++) red[(warp * GM + g) * D + c * E + j] = acc[g][j];
    }
    __syncthreads();

    const int64_t out0 = (static_cast<int64_t>(b) * a.H + kh * G) * D;  // this KV head's first output row
    auto block_sum = [&](int i) {  // element i = g * D + d of the block's weighted sums: the warps' in order
        const int g = i / D, d = i - g * D;
        float t = 0.0f;
#pragma unroll
        for (int wi = 0; wi < kAttnWarps; wi++) t += red[(wi * GM + g) * D + d];
        return t;
    };
    if (n_split == 1) {
        for (int i = tid; i < G * D; i += kAttnThreads) st_any(a.out, a.dt, out0 + i, block_sum(i) / sm[i / D]);
        return;
    }
    if (CLUSTER) {  // several blocks of one cluster: each keeps its part in shared memory, and they combine it there
        for (int i = tid; i < G * D; i += kAttnThreads) qs[i] = block_sum(i);  // (q is no longer needed)
        cluster_sync();
        // rank `split` (cluster rank = blockIdx.x: the cluster spans grid.x) writes outputs split * threads + tid, ...
        const uint32_t q_s = smem_u32(qs), mx_s = smem_u32(mx), sm_s = smem_u32(sm);
        for (int i = split * kAttnThreads + tid; i < G * D; i += n_split * kAttnThreads) {
            const int g = i / D;
            float m = -INFINITY;
            for (int r2 = 0; r2 < n_split; r2++) m = fmaxf(m, ld_cluster_f32(cluster_map(mx_s + 4 * g, r2)));
            float l = 0.0f, t = 0.0f;
            for (int r2 = 0; r2 < n_split; r2++) {
                const float f = expf(ld_cluster_f32(cluster_map(mx_s + 4 * g, r2)) - m);
                l += ld_cluster_f32(cluster_map(sm_s + 4 * g, r2)) * f;
                t += ld_cluster_f32(cluster_map(q_s + 4 * i, r2)) * f;
            }
            st_any(a.out, a.dt, out0 + i, t / l);
        }
        cluster_sync();  // every block's shared memory outlives the others' reads
        return;
    }
    // several blocks without a cluster: write this one's part; the last block to finish combines them all
    float *mine = a.part + (bk * a.splits + split) * G * (D + 2);
    for (int i = tid; i < G * D; i += kAttnThreads) mine[i / D * (D + 2) + i % D] = block_sum(i);
    if (tid < G) {
        mine[tid * (D + 2) + D] = mx[tid];
        mine[tid * (D + 2) + D + 1] = sm[tid];
    }
    __threadfence();  // the part is visible device-wide before the count says so
    __syncthreads();
    if (tid == 0) last = atomicAdd(a.count + bk, 1) == n_split - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float *parts = a.part + bk * a.splits * G * (D + 2);
    if (tid < G) {  // the heads' overall max and sum of weights, into mx / sm
        float m = -INFINITY;
        for (int s = 0; s < n_split; s++) m = fmaxf(m, __ldcg(parts + (s * G + tid) * (D + 2) + D));
        float l = 0.0f;
        for (int s = 0; s < n_split; s++) {
            const float *ps = parts + (s * G + tid) * (D + 2);
            l += __ldcg(ps + D + 1) * expf(__ldcg(ps + D) - m);
        }
        mx[tid] = m;
        sm[tid] = l;
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += kAttnThreads) {
        const int g = i / D, d = i - g * D;
        float t = 0.0f;
        for (int s = 0; s < n_split; s++) {
            const float *ps = parts + (s * G + g) * (D + 2);
            t += __ldcg(ps + d) * expf(__ldcg(ps + D) - mx[g]);
        }
        st_any(a.out, a.dt, out0 + i, t / sm[g]);
    }
}

int gm_of(int G) { return G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8; }

/* With CLUSTER the grid's x extent (a row and KV head's blocks) is one thread-block cluster. */
template <int GM, int E, int SEG, bool CLUSTER>
cudaError_t launch_one(const AttnArgs &a, dim3 grid, size_t smem, cudaStream_t s) {
    return launch_pdl(decode_attention_kernel<GM, E, SEG, CLUSTER>, grid, kAttnThreads, smem, a, s,
                      CLUSTER ? grid.x : 1u);
}

template <int GM, int E, bool CLUSTER>
cudaError_t launch_seg(const AttnArgs &a, dim3 grid, size_t smem, cudaStream_t s) {
    const int pieces = a.D / E;
    if (pieces <= 4) return launch_one<GM, E, 4, CLUSTER>(a, grid, smem, s);
    if (pieces <= 8) return launch_one<GM, E, 8, CLUSTER>(a, grid, smem, s);
    if (pieces <= 16) return launch_one<GM, E, 16, CLUSTER>(a, grid, smem, s);
    return launch_one<GM, E, 32, CLUSTER>(a, grid, smem, s);
}

template <int GM, bool CLUSTER>
cudaError_t launch_gm(const AttnArgs &a, dim3 grid, size_t smem, cudaStream_t s) {
    return a.dt == RABIT_F32 ? launch_seg<GM, 4, CLUSTER>(a, grid, smem, s) : launch_seg<GM, 8, CLUSTER>(a, grid, smem, s);
}

template <bool CLUSTER>
cudaError_t launch_group(const AttnArgs &a, dim3 grid, size_t smem, cudaStream_t s) {
    switch (gm_of(a.G)) {
        case 1: return launch_gm<1, CLUSTER>(a, grid, smem, s);
        case 2: return launch_gm<2, CLUSTER>(a, grid, smem, s);
        case 4: return launch_gm<4, CLUSTER>(a, grid, smem, s);
        default: return launch_gm<8, CLUSTER>(a, grid, smem, s);
    }
}


size_t attention_smem_bytes(int G, int D) {
    const int GM = gm_of(G);
    return sizeof(float) * (static_cast<size_t>(GM) * D + 2 * D + GM * kAttnChunk + kAttnWarps * GM * D);
}

}  // namespace

const char *decode_attention_unsupported(rabit_dtype dt, int G, int D) {
    const int E = dt == RABIT_F32 ? 4 : 8;
    if (G > kAttnMaxGroup) return "more than 8 query heads per KV head";
    if (D % E) return dt == RABIT_F32 ? "a float32 head dimension that is not a multiple of 4"
                                      : "a head dimension that is not a multiple of 8";
    if (D / E > 32) return dt == RABIT_F32 ? "a float32 head dimension above 128" : "a head dimension above 256";
    return nullptr;
}

AttnSplit decode_attention_split(int64_t S, int64_t rows_heads) {
    // Enough blocks for one wave at ~4 resident per SM: with few (row, KV head) pairs (batch 1) a chunk each, so that
    // the positions in use are read in parallel; with many (batch 16) one block loops over several chunks, which
    // saves the blocks' fixed latency and the combine. On sm_90 a row and head's blocks may form one cluster and
    // combine their parts in shared memory (no counter, no memset, no trip through L2): at most 8 blocks (the portable
    // cluster size). RABIT_CUDA_ATTENTION_COMBINE=counter or =cluster forces one way (tests; cluster needs sm_90).
    const char *v = getenv("RABIT_CUDA_ATTENTION_COMBINE");
    // Clusters where there are few (row, KV head) pairs (batch 1, small models): there the combine's latency is the
    // step's; with many, blocks that wait for their cluster's barriers held the SMs longer than the counter's last
    // block alone (Llama-2-7B shapes at batch 4 on an H100: 0.76 against 0.66 ms per step; batch 1: 0.29 against 0.40)
    const bool can = device_info().sm90_code;  // sm_90 device and this build's sm_90 code (common.cuh)
    AttnSplit sp = {1, 1, can && rows_heads <= device_info().sms / 2, nullptr};
    if (v && *v) {
        if (strcmp(v, "counter") == 0) sp.cluster = false;
        else if (strcmp(v, "cluster") != 0)
            sp.error = "RABIT_CUDA_ATTENTION_COMBINE must be counter or cluster (or unset, to let rabit choose)";
        else if (!can)
            sp.error = "RABIT_CUDA_ATTENTION_COMBINE=cluster needs an sm_90 GPU and a build with sm_90 code "
                       "(TORCH_CUDA_ARCH_LIST with 9.0 or 9.0a)";
        else
            sp.cluster = true;
    }
    const int64_t chunks = (S + kAttnChunk - 1) / kAttnChunk;
    int64_t splits = 4 * static_cast<int64_t>(device_info().sms) / (rows_heads > 0 ? rows_heads : 1);
    if (sp.cluster && splits > kAttnMaxCluster) splits = kAttnMaxCluster;
    splits = splits < 1 ? 1 : splits > chunks ? chunks : splits;
    const int64_t cpb = (chunks + splits - 1) / splits;
    sp.splits = static_cast<int>((chunks + cpb - 1) / cpb);
    sp.chunks_per_block = static_cast<int>(cpb);
    return sp;
}

cudaError_t decode_attention(const AttnTensors &t, rabit_dtype dt, int B, int H, int Hkv, int D, int S, float scale,
                             const AttnSplit &sp, float *part, int *count, cudaStream_t stream) {
    if (sp.error || sp.splits < 1 || sp.chunks_per_block < 1) return cudaErrorInvalidValue;
    AttnArgs a;
    a.q = t.q, a.k = t.k, a.v = t.v;
    a.q_b = t.q_b, a.q_h = t.q_h, a.k_b = t.k_b, a.k_h = t.k_h, a.v_b = t.v_b, a.v_h = t.v_h;
    a.k_cache = t.k_cache, a.v_cache = t.v_cache, a.cos = t.cos, a.sin = t.sin, a.pos = t.pos, a.out = t.out;
    a.part = part, a.count = count;
    a.dt = dt, a.H = H, a.Hkv = Hkv, a.G = H / Hkv, a.D = D, a.S = S, a.splits = sp.splits, a.cpb = sp.chunks_per_block;
    a.scale = scale;
    const dim3 grid(a.splits, Hkv, B);
    const size_t smem = attention_smem_bytes(a.G, D);
    return sp.cluster && sp.splits > 1 ? launch_group<true>(a, grid, smem, stream)
                                       : launch_group<false>(a, grid, smem, stream);
}

}  // namespace rabit_cuda
