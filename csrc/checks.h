// Input checks shared by the torch glue. Every message names the op, the argument, what was
// expected, what was given, and the fix. Shape problems raise ValueError, dtype problems TypeError.
#pragma once

#include <torch/all.h>

#include "../kernels/rabit_kernels.h"

#define RABIT_CHECK_DIM(op, x, n)                                                                    \
    TORCH_CHECK_VALUE((x).dim() == (n), op, ": expected a " #n "-D " #x ", got ", (x).dim(), "-D ", \
                      "shape ", (x).sizes())
#define RABIT_CHECK_CONTIGUOUS(op, x) \
    TORCH_CHECK_VALUE((x).is_contiguous(), op, ": expected " #x " to be contiguous; call .contiguous() on it")
#define RABIT_CHECK_SIZE(op, x, d, expected, what)                                                          \
    TORCH_CHECK_VALUE((x).size(d) == (expected), op, ": " #x " has size ", (x).size(d), " in dimension ", d, \
                      " but ", what, " is ", (expected), " (shape ", (x).sizes(), ")")
#define RABIT_CHECK_SAME_DEVICE(op, x, ref)                                                               \
    TORCH_CHECK_VALUE((x).device() == (ref).device(), op, ": " #x " is on ", (x).device(), " but " #ref " is on ", (ref).device(), "; move both to one device")
#define RABIT_CHECK_FLOAT(op, x)                                                                           \
    TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||                 \
                         (x).scalar_type() == at::kBFloat16,                                                \
                     op, ": expected " #x " to be float32, float16 or bfloat16, got ", (x).scalar_type())
#define RABIT_CHECK_PACKED_DTYPE(op, x)                                                                    \
    TORCH_CHECK_TYPE((x).scalar_type() == at::kInt, op, ": expected " #x " to hold int32 words (the packed " \
                     "format), got ", (x).scalar_type(), "; create it with rabit.pack_signs")

namespace rabit {

inline rabit_dtype to_rabit_dtype(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return RABIT_F32;
        case at::kHalf: return RABIT_F16;
        case at::kBFloat16: return RABIT_BF16;
        default: TORCH_CHECK_TYPE(false, "rabit: unsupported dtype ", t, "; use float32, float16 or bfloat16");
    }
}

inline int64_t words_per_row(int64_t in) { return RABIT_WORDS(in); }

// Scales g [K, out] and h [K, in]: any float dtype, finite, on the weight's device.
inline void check_scales(const char *op, const at::Tensor &g, const at::Tensor &h, int64_t out, int64_t in,
                         const at::Tensor &ref) {
    RABIT_CHECK_DIM(op, g, 2);
    RABIT_CHECK_DIM(op, h, 2);
    RABIT_CHECK_FLOAT(op, g);
    RABIT_CHECK_FLOAT(op, h);
    RABIT_CHECK_SAME_DEVICE(op, g, ref);
    RABIT_CHECK_SAME_DEVICE(op, h, ref);
    const int64_t K = g.size(0);
    TORCH_CHECK_VALUE(K >= 1 && K <= RABIT_MAX_K, op, ": g has K=", K, " paths; rabit supports K=1..", RABIT_MAX_K);
    TORCH_CHECK_VALUE(h.size(0) == K, op, ": g has ", K, " paths but h has ", h.size(0),
                      "; g is [K, out] and h is [K, in]");
    TORCH_CHECK_VALUE(g.size(1) == out, op, ": g is ", g.sizes(), " but the layer has out=", out,
                      "; g must be [K, out]");
    TORCH_CHECK_VALUE(h.size(1) == in, op, ": h is ", h.sizes(), " but the layer has in=", in,
                      "; h must be [K, in]");
}

inline void check_status(const char *op, rabit_status s) {
    TORCH_CHECK_VALUE(s != RABIT_ERR_NONFINITE, op, ": the latent weight contains NaN or Inf; "
                      "check the learning rate or the checkpoint it was loaded from");
    TORCH_CHECK(s == RABIT_OK, op, ": kernel failed: ", rabit_status_string(s));
}

inline void check_finite_scales(const char *op, const at::Tensor &g, const at::Tensor &h) {
    TORCH_CHECK_VALUE(at::isfinite(g).all().item<bool>(), op, ": g contains NaN or Inf");
    TORCH_CHECK_VALUE(at::isfinite(h).all().item<bool>(), op, ": h contains NaN or Inf");
}

inline rabit_ste parse_ste(const char *op, c10::string_view ste) {
    if (ste == "identity") return RABIT_STE_IDENTITY;
    if (ste == "clipped") return RABIT_STE_CLIPPED;
    if (ste == "tanh") return RABIT_STE_TANH;
    TORCH_CHECK_VALUE(false, op, ": unknown ste '", std::string(ste), "'; use 'identity', 'clipped' or 'tanh'");
}

// ---- per-op argument validation, shared by the CPU and CUDA glue (same checks, same messages) ----

struct LayerDims {
    int64_t K, out, in;
};

inline void check_weight(const char *op, const at::Tensor &weight) {
    RABIT_CHECK_DIM(op, weight, 2);
    RABIT_CHECK_FLOAT(op, weight);
    RABIT_CHECK_CONTIGUOUS(op, weight);
    TORCH_CHECK_VALUE(weight.size(0) >= 1 && weight.size(1) >= 1, op, ": weight is empty (shape ", weight.sizes(), ")");
}

inline void check_packed(const char *op, const at::Tensor &packed, int64_t K, int64_t out, int64_t in) {
    RABIT_CHECK_DIM(op, packed, 3);
    RABIT_CHECK_PACKED_DTYPE(op, packed);
    RABIT_CHECK_CONTIGUOUS(op, packed);
    TORCH_CHECK_VALUE(packed.size(0) == K && packed.size(1) == out && packed.size(2) == words_per_row(in), op,
                      ": packed is ", packed.sizes(), " but K=", K, ", out=", out, ", in=", in, " need [", K, ", ",
                      out, ", ", words_per_row(in), "]");
}

inline rabit_ste check_ste(const char *op, c10::string_view ste, double ste_param) {
    const rabit_ste s = parse_ste(op, ste);
    TORCH_CHECK_VALUE(s == RABIT_STE_IDENTITY || ste_param > 0, op, ": ste_param must be > 0 for ste='",
                      std::string(ste), "', got ", ste_param);
    return s;
}

inline LayerDims check_residual_binarize_args(const char *op, const at::Tensor &weight, const at::Tensor &g,
                                              const at::Tensor &h, c10::string_view ste, double ste_param) {
    check_weight(op, weight);
    check_ste(op, ste, ste_param);
    const int64_t out = weight.size(0), in = weight.size(1);
    check_scales(op, g, h, out, in, weight);
    return {g.size(0), out, in};
}

inline LayerDims check_scale_grads_args(const char *op, const at::Tensor &grad, const at::Tensor &g,
                                        const at::Tensor &h, const at::Tensor &packed) {
    RABIT_CHECK_DIM(op, grad, 2);
    RABIT_CHECK_FLOAT(op, grad);
    RABIT_CHECK_CONTIGUOUS(op, grad);
    const int64_t out = grad.size(0), in = grad.size(1);
    TORCH_CHECK_VALUE(out >= 1 && in >= 1, op, ": grad is empty (shape ", grad.sizes(), ")");
    check_scales(op, g, h, out, in, grad);
    check_packed(op, packed, g.size(0), out, in);
    RABIT_CHECK_SAME_DEVICE(op, packed, grad);
    return {g.size(0), out, in};
}

// scale_grads' checks plus the weight: grad must be ∂L/∂Ŵ of the weight's shape, on its device
inline LayerDims check_backward_args(const char *op, const at::Tensor &grad, const at::Tensor &weight,
                                     const at::Tensor &g, const at::Tensor &h, const at::Tensor &packed) {
    check_weight(op, weight);
    RABIT_CHECK_DIM(op, grad, 2);
    TORCH_CHECK_VALUE(grad.sizes() == weight.sizes(), op, ": grad is ", grad.sizes(), " but weight is ",
                      weight.sizes(), "; grad must be ∂L/∂Ŵ of the weight's shape");
    RABIT_CHECK_SAME_DEVICE(op, grad, weight);
    return check_scale_grads_args(op, grad, g, h, packed);
}

inline void check_pack_args(const char *op, const at::Tensor &signs) {
    TORCH_CHECK_VALUE(signs.dim() >= 1 && signs.size(-1) >= 1, op, ": expected signs with a non-empty last "
                      "dimension (the in-features), got shape ", signs.sizes());
    TORCH_CHECK_TYPE(signs.is_floating_point() || signs.scalar_type() == at::kInt || signs.scalar_type() == at::kChar ||
                         signs.scalar_type() == at::kLong || signs.scalar_type() == at::kShort,
                     op, ": expected a float or signed integer tensor of signs, got ", signs.scalar_type());
}

// The signs as float32 for the packing kernels (bit = value >= 0). Every accepted dtype but float64 converts with
// its sign kept; a float64 value below float32's range rounds to -0.0, whose bit would be 1, so float64 is compared
// in its own dtype.
inline at::Tensor signs_as_f32(const at::Tensor &signs) {
    if (signs.scalar_type() == at::kDouble) return at::where(signs >= 0, 1.0, -1.0).to(at::kFloat).contiguous();
    return signs.to(at::kFloat).contiguous();
}

inline void check_unpack_args(const char *op, const at::Tensor &packed, int64_t in_features) {
    RABIT_CHECK_PACKED_DTYPE(op, packed);
    RABIT_CHECK_CONTIGUOUS(op, packed);
    TORCH_CHECK_VALUE(packed.dim() >= 1, op, ": expected packed words with at least 1 dimension");
    TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features must be >= 1, got ", in_features);
    TORCH_CHECK_VALUE(packed.size(-1) == words_per_row(in_features), op, ": packed rows hold ", packed.size(-1),
                      " words but in_features=", in_features, " needs ", words_per_row(in_features));
}

inline LayerDims check_dequantize_args(const char *op, const at::Tensor &packed, const at::Tensor &g,
                                       const at::Tensor &h) {
    RABIT_CHECK_DIM(op, packed, 3);
    RABIT_CHECK_DIM(op, h, 2);
    const int64_t out = packed.size(1), in = h.size(1);
    TORCH_CHECK_VALUE(in >= 1, op, ": h has no input features (shape ", h.sizes(), ")");
    check_scales(op, g, h, out, in, packed);  // `in` comes from h
    // K from the scales, so that packed's K is checked against it (from packed it checked nothing, and a packed
    // with more paths than g and h made the kernels read past them)
    const int64_t K = g.size(0);
    check_packed(op, packed, K, out, in);
    return {K, out, in};
}

// A layer's optional bias: 1-D float of `out` elements on ref's device (ref_name: how the message names ref).
inline void check_bias(const char *op, const std::optional<at::Tensor> &bias, int64_t out, const at::Tensor &ref,
                       const char *ref_name) {
    if (!bias.has_value()) return;
    RABIT_CHECK_DIM(op, (*bias), 1);
    RABIT_CHECK_FLOAT(op, (*bias));
    TORCH_CHECK_VALUE(bias->size(0) == out, op, ": bias has ", bias->size(0), " elements but out=", out);
    TORCH_CHECK_VALUE(bias->device() == ref.device(), op, ": (*bias) is on ", bias->device(), " but ", ref_name,
                      " is on ", ref.device(), "; move both to one device");
}

inline LayerDims check_packed_linear_args(const char *op, const at::Tensor &x, const at::Tensor &packed,
                                          const at::Tensor &g, const at::Tensor &h,
                                          const std::optional<at::Tensor> &bias) {
    RABIT_CHECK_DIM(op, x, 2);
    RABIT_CHECK_FLOAT(op, x);
    RABIT_CHECK_CONTIGUOUS(op, x);
    RABIT_CHECK_DIM(op, packed, 3);
    const int64_t out = packed.size(1), in = x.size(1);
    TORCH_CHECK_VALUE(in >= 1, op, ": x has no input features (shape ", x.sizes(), ")");
    // `in` comes from x (the packed words round it up to 32), so a width mismatch is named as x against h
    TORCH_CHECK_VALUE(h.dim() != 2 || h.size(1) == in, op, ": x is ", x.sizes(), " but h is ", h.sizes(),
                      "; x must be [M, in] with the layer's in=", h.size(1), " (h is [K, in])");
    check_scales(op, g, h, out, in, packed);
    const int64_t K = g.size(0);              // as in check_dequantize_args: packed's K is checked against it
    check_packed(op, packed, K, out, in);
    RABIT_CHECK_SAME_DEVICE(op, x, packed);
    check_bias(op, bias, out, packed, "packed");
    return {K, out, in};
}

// packed_linear_group: one entry per layer in packed, g, h, and in bias unless it is empty (no layer has a bias);
// the layer's checks are packed_linear's, named "<op> (layer l)".
inline int64_t check_group_lists(const char *op, at::TensorList packed, at::TensorList g, at::TensorList h,
                                 at::TensorList bias) {
    const int64_t n = static_cast<int64_t>(packed.size());
    TORCH_CHECK_VALUE(n >= 1, op, ": expected at least one layer, got an empty packed list");
    TORCH_CHECK_VALUE(static_cast<int64_t>(g.size()) == n && static_cast<int64_t>(h.size()) == n &&
                          (bias.empty() || static_cast<int64_t>(bias.size()) == n),
                      op, ": packed, g, h and bias must list the same layers (bias may be empty: no biases), got ", n,
                      ", ", g.size(), ", ", h.size(), " and ", bias.size(), " entries");
    return n;
}

inline std::optional<at::Tensor> layer_bias(at::TensorList bias, int64_t l) {
    return bias.empty() ? std::nullopt : std::optional<at::Tensor>(bias[l]);
}

inline std::string layer_op(const char *op, int64_t l) { return std::string(op) + " (layer " + std::to_string(l) + ")"; }

// packed_linear_fused's glue arguments (the layers are checked as packed_linear_group's): norm_weight [in] of a float
// dtype, eps finite and >= 0, up of x's shape and dtype, residual [M, out] of x's dtype for a single layer; all on
// x's device and contiguous.
inline void check_fused_args(const char *op, const at::Tensor &x, int64_t n, int64_t out,
                             const std::optional<at::Tensor> &norm_weight, double eps,
                             const std::optional<at::Tensor> &up, const std::optional<at::Tensor> &residual) {
    TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
    // device and layout, named by the argument (the RABIT_CHECK_* macros would name a local variable)
    auto on_x = [&](const at::Tensor &t, const char *name) {
        TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
                          "; move both to one device");
        TORCH_CHECK_VALUE(t.is_contiguous(), op, ": expected ", name, " to be contiguous; call .contiguous() on it");
    };
    if (norm_weight.has_value()) {
        const at::Tensor &w = *norm_weight;
        TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kHalf ||
                             w.scalar_type() == at::kBFloat16,
                         op, ": expected norm_weight to be float32, float16 or bfloat16, got ", w.scalar_type());
        TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == x.size(1), op, ": norm_weight must be [in=", x.size(1),
                          "] (one weight per input column), got ", w.sizes());
        on_x(w, "norm_weight");
    }
    if (up.has_value()) {
        const at::Tensor &u = *up;
        TORCH_CHECK_VALUE(u.sizes() == x.sizes(), op, ": up must have x's shape ", x.sizes(), " (silu(x) * up is the "
                          "layers' input), got ", u.sizes());
        TORCH_CHECK_TYPE(u.scalar_type() == x.scalar_type(), op, ": up must have x's dtype ", x.scalar_type(),
                         ", got ", u.scalar_type());
        on_x(u, "up");
    }
    if (residual.has_value()) {
        const at::Tensor &r = *residual;
        TORCH_CHECK_VALUE(n == 1, op, ": a residual is added to a single layer's output, got ", n,
                          " layers; call the op once per layer");
        TORCH_CHECK_VALUE(r.dim() == 2 && r.size(0) == x.size(0) && r.size(1) == out, op, ": residual must be [M=",
                          x.size(0), ", out=", out, "] (the layer's output shape), got ", r.sizes());
        TORCH_CHECK_TYPE(r.scalar_type() == x.scalar_type(), op, ": residual must have x's dtype ", x.scalar_type(),
                         ", got ", r.scalar_type());
        on_x(r, "residual");
    }
}

// decode_attention: q [B, H, D], k and v [B, Hkv, D] (any strides with a dense last dimension), caches
// [B, Hkv, S, D] dense, cos and sin [P >= S, D] dense, all of one float dtype on one device; pos: one int64 on that
// device. Returns the sizes.
// Whether the memory spans of a and b (first to last element, any strides) overlap within one storage.
inline bool spans_overlap(const at::Tensor &a, const at::Tensor &b) {
    if (!a.has_storage() || !b.has_storage() || a.numel() == 0 || b.numel() == 0 ||
        !a.storage().is_alias_of(b.storage()))
        return false;
    auto span = [](const at::Tensor &t) {
        int64_t last = 0;
        for (int64_t d = 0; d < t.dim(); d++) last += (t.size(d) - 1) * t.stride(d);
        const auto *p = static_cast<const char *>(t.data_ptr());
        return std::make_pair(p, p + (last + 1) * t.element_size());
    };
    const auto [a0, a1] = span(a);
    const auto [b0, b1] = span(b);
    return a0 < b1 && b0 < a1;
}

struct AttentionDims {
    int64_t B, H, Hkv, D, S;
};

inline AttentionDims check_decode_attention_args(const char *op, const at::Tensor &q, const at::Tensor &k,
                                                 const at::Tensor &v, const at::Tensor &k_cache,
                                                 const at::Tensor &v_cache, const at::Tensor &cos,
                                                 const at::Tensor &sin, const at::Tensor &pos, double scale) {
    RABIT_CHECK_DIM(op, q, 3);
    RABIT_CHECK_DIM(op, k, 3);
    RABIT_CHECK_DIM(op, v, 3);
    RABIT_CHECK_DIM(op, k_cache, 4);
    RABIT_CHECK_DIM(op, v_cache, 4);
    RABIT_CHECK_DIM(op, cos, 2);
    RABIT_CHECK_DIM(op, sin, 2);
    RABIT_CHECK_FLOAT(op, q);
    for (const at::Tensor *t : {&k, &v, &k_cache, &v_cache, &cos, &sin})
        TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": q, k, v, the caches, cos and sin must share one "
                         "dtype; q is ", q.scalar_type(), " but another is ", t->scalar_type());
    for (const at::Tensor *t : {&k, &v, &k_cache, &v_cache, &cos, &sin, &pos})
        TORCH_CHECK_VALUE(t->device() == q.device(), op, ": every argument must be on q's device (", q.device(),
                          "), got one on ", t->device(), "; pos too (a 1-element tensor, so that a CUDA graph can "
                          "replay the call)");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), S = k_cache.size(2);
    TORCH_CHECK_VALUE(B >= 1 && H >= 1 && Hkv >= 1 && S >= 1, op, ": empty input: q is ", q.sizes(), ", k is ",
                      k.sizes(), ", k_cache is ", k_cache.sizes());
    TORCH_CHECK_VALUE(D >= 2 && D % 2 == 0, op, ": the head dimension must be even (rotary halves), got ", D);
    TORCH_CHECK_VALUE(H % Hkv == 0, op, ": q has ", H, " heads, which is not a multiple of k's ", Hkv, " KV heads");
    TORCH_CHECK_VALUE(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == D, op, ": k and v must be [B=", B,
                      ", Hkv, D=", D, "], got ", k.sizes(), " and ", v.sizes());
    TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == B && k_cache.size(1) == Hkv &&
                          k_cache.size(3) == D,
                      op, ": the caches must be [B=", B, ", Hkv=", Hkv, ", S, D=", D, "], got ", k_cache.sizes(),
                      " and ", v_cache.sizes());
    TORCH_CHECK_VALUE(cos.sizes() == sin.sizes() && cos.size(0) >= S && cos.size(1) == D, op,
                      ": cos and sin must be [P >= S=", S, ", D=", D, "] (one row per cache position), got ",
                      cos.sizes(), " and ", sin.sizes());
    for (const at::Tensor *t : {&q, &k, &v})
        TORCH_CHECK_VALUE(t->stride(2) == 1, op, ": q, k and v need a dense last dimension (stride 1), got strides ",
                          t->strides(), "; call .contiguous() on it");
    RABIT_CHECK_CONTIGUOUS(op, k_cache);
    RABIT_CHECK_CONTIGUOUS(op, v_cache);
    RABIT_CHECK_CONTIGUOUS(op, cos);
    RABIT_CHECK_CONTIGUOUS(op, sin);
    TORCH_CHECK_TYPE(pos.scalar_type() == at::kLong && pos.numel() == 1, op,
                     ": pos must be a 1-element int64 tensor (the cache position of the new token), got ",
                     pos.scalar_type(), " with ", pos.numel(), " elements");
    TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale must be finite and > 0, got ", scale);
    // the op writes the caches while it reads q, k, v and the other cache (on CUDA through the read-only cache path)
    const std::pair<const at::Tensor *, const char *> args[] = {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&k_cache, "k_cache"}};
    for (const at::Tensor *w : {&k_cache, &v_cache})
        for (const auto &[t, name] : args)
            if (t != w)
                TORCH_CHECK_VALUE(!spans_overlap(*t, *w), op, ": ", name,
                                  " shares memory with ", w == &k_cache ? "k_cache" : "v_cache",
                                  ", which the op writes; give the caches storage of their own");
    return {B, H, Hkv, D, S};
}

}  // namespace rabit
