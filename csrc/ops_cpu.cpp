// CPU implementations of the rabit ops: check inputs, then call the torch-free C kernels.
#include <torch/all.h>
#include <torch/library.h>

#include "../kernels/rabit_kernels.h"
#include "checks.h"

namespace rabit {

static at::Tensor scales_f32(const at::Tensor &s) { return s.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor> residual_binarize_cpu(const at::Tensor &weight, const at::Tensor &g,
                                                         const at::Tensor &h, std::optional<at::ScalarType> out_dtype,
                                                         c10::string_view ste, double ste_param,
                                                         bool check_finite) {
    const char *op = "rabit.residual_binarize";
    const auto [K, out, in] = check_residual_binarize_args(op, weight, g, h, ste, ste_param);
    if (check_finite) check_finite_scales(op, g, h);
    const at::ScalarType odt = out_dtype.value_or(weight.scalar_type());
    const rabit_dtype ordt = to_rabit_dtype(odt);
    at::Tensor gf = scales_f32(g), hf = scales_f32(h);
    at::Tensor what = at::empty({out, in}, weight.options().dtype(odt));
    at::Tensor packed = at::empty({K, out, words_per_row(in)}, weight.options().dtype(at::kInt));
    rabit_status st = rabit_residual_binarize_cpu(weight.data_ptr(), to_rabit_dtype(weight.scalar_type()),
                                                  gf.data_ptr<float>(), hf.data_ptr<float>(), K, out, in,
                                                  what.data_ptr(), ordt,
                                                  reinterpret_cast<rabit_word_t *>(packed.data_ptr<int32_t>()));
    // The kernel computes every output before it reports non-finite input, so ignoring the report
    // leaves the non-finite results in place (the CUDA kernel does the same).
    if (!check_finite && st == RABIT_ERR_NONFINITE) st = RABIT_OK;
    check_status(op, st);
    return {what, packed};
}

namespace {

// dW (weight given), dg and dh in one pass of the backward kernel; without a weight (scale_grads) it writes no dW.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const char *op, const at::Tensor &grad,
                                                            const at::Tensor *weight, const at::Tensor &g,
                                                            const at::Tensor &h, const at::Tensor &packed, LayerDims d,
                                                            rabit_ste ste, double ste_param) {
    at::Tensor gf = scales_f32(g), hf = scales_f32(h);
    at::Tensor dW = weight ? at::empty_like(*weight) : at::Tensor();
    at::Tensor dg = at::empty({d.K, d.out}, grad.options().dtype(at::kFloat));
    at::Tensor dh = at::empty({d.K, d.in}, grad.options().dtype(at::kFloat));
    const rabit_dtype gdt = to_rabit_dtype(grad.scalar_type());
    check_status(op, rabit_residual_binarize_backward_cpu(
                         grad.data_ptr(), gdt, weight ? weight->data_ptr() : nullptr,
                         weight ? to_rabit_dtype(weight->scalar_type()) : gdt, gf.data_ptr<float>(),
                         hf.data_ptr<float>(), reinterpret_cast<const rabit_word_t *>(packed.data_ptr<int32_t>()),
                         d.K, d.out, d.in, ste, static_cast<float>(ste_param), weight ? dW.data_ptr() : nullptr,
                         dg.data_ptr<float>(), dh.data_ptr<float>()));
    return {dW, dg.to(g.scalar_type()), dh.to(h.scalar_type())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_binarize_backward_cpu(
    const at::Tensor &grad, const at::Tensor &weight, const at::Tensor &g, const at::Tensor &h,
    const at::Tensor &packed, c10::string_view ste, double ste_param) {
    const char *op = "rabit.residual_binarize_backward";
    const LayerDims d = check_backward_args(op, grad, weight, g, h, packed);
    return backward_cpu(op, grad, &weight, g, h, packed, d, check_ste(op, ste, ste_param), ste_param);
}

std::tuple<at::Tensor, at::Tensor> scale_grads_cpu(const at::Tensor &grad, const at::Tensor &g, const at::Tensor &h,
                                                   const at::Tensor &packed) {
    const char *op = "rabit.scale_grads";
    const LayerDims d = check_scale_grads_args(op, grad, g, h, packed);
    auto [dW, dg, dh] = backward_cpu(op, grad, nullptr, g, h, packed, d, RABIT_STE_IDENTITY, 1.0);
    return {dg, dh};
}

at::Tensor pack_signs_cpu(const at::Tensor &signs) {
    const char *op = "rabit.pack_signs";
    check_pack_args(op, signs);
    at::Tensor s = signs_as_f32(signs);
    const int64_t in = s.size(-1), rows = s.numel() / in;
    std::vector<int64_t> shape(signs.sizes().begin(), signs.sizes().end());
    shape.back() = words_per_row(in);
    at::Tensor packed = at::empty(shape, signs.options().dtype(at::kInt));
    if (rows == 0) return packed;  // no rows: nothing to pack (the kernel takes no null data pointer)
    check_status(op, rabit_pack_signs_cpu(s.data_ptr<float>(), rows, in,
                                          reinterpret_cast<rabit_word_t *>(packed.data_ptr<int32_t>())));
    return packed;
}

at::Tensor unpack_signs_cpu(const at::Tensor &packed, int64_t in_features, std::optional<at::ScalarType> dtype) {
    const char *op = "rabit.unpack_signs";
    check_unpack_args(op, packed, in_features);
    const at::ScalarType dt = dtype.value_or(at::kFloat);
    const rabit_dtype rdt = to_rabit_dtype(dt);
    std::vector<int64_t> shape(packed.sizes().begin(), packed.sizes().end());
    shape.back() = in_features;
    at::Tensor out = at::empty(shape, packed.options().dtype(dt));
    const int64_t rows = packed.numel() / packed.size(-1);
    if (rows == 0) return out;
    check_status(op, rabit_unpack_signs_cpu(reinterpret_cast<const rabit_word_t *>(packed.data_ptr<int32_t>()), rows,
                                            in_features, out.data_ptr(), rdt));
    return out;
}

at::Tensor dequantize_cpu(const at::Tensor &packed, const at::Tensor &g, const at::Tensor &h,
                          std::optional<at::ScalarType> dtype) {
    const char *op = "rabit.dequantize";
    const auto [K, out, in] = check_dequantize_args(op, packed, g, h);
    const at::ScalarType dt = dtype.value_or(at::kFloat);
    const rabit_dtype rdt = to_rabit_dtype(dt);
    at::Tensor gf = scales_f32(g), hf = scales_f32(h);
    at::Tensor what = at::empty({out, in}, packed.options().dtype(dt));
    check_status(op, rabit_dequantize_cpu(reinterpret_cast<const rabit_word_t *>(packed.data_ptr<int32_t>()),
                                          gf.data_ptr<float>(), hf.data_ptr<float>(), K, out, in, what.data_ptr(), rdt));
    return what;
}

namespace {

// x [M, in] times Ŵᵀ for M >= RABIT_CPU_GEMM_MIN_ROWS (rabit_cpu_use_gemm): Ŵ dequantized a tile of rows at a time
// (float32, the forward's values) into ATen's float32 GEMM, y[:, tile] = x Ŵ_tileᵀ (+ bias). Float32 accumulation as
// in the table kernels, in BLAS's order instead of theirs.
at::Tensor packed_linear_gemm(const char *op, const at::Tensor &x, const at::Tensor &packed, const at::Tensor &gf,
                              const at::Tensor &hf, const at::Tensor &bf, int64_t K, int64_t out, int64_t in) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor yf = at::empty({x.size(0), out}, xf.options());
    const int64_t rows = rabit_cpu_gemm_tile_rows(out, in);
    at::Tensor tile = at::empty({rows, in}, xf.options());
    const auto *words = reinterpret_cast<const rabit_word_t *>(packed.data_ptr<int32_t>());
    for (int64_t o0 = 0; o0 < out; o0 += rows) {
        const int64_t n = std::min(rows, out - o0);
        at::Tensor t = tile.narrow(0, 0, n);
        check_status(op, rabit_dequantize_rows_cpu(words, gf.data_ptr<float>(), hf.data_ptr<float>(), K, out, in, o0,
                                                   o0 + n, t.data_ptr(), RABIT_F32));
        at::Tensor ys = yf.narrow(1, o0, n);
        if (bf.defined())
            at::addmm_out(ys, bf.narrow(0, o0, n), xf, t.t());
        else
            at::mm_out(ys, xf, t.t());
    }
    return x.scalar_type() == at::kFloat ? yf : yf.to(x.scalar_type());
}

at::Tensor packed_linear_cpu_impl(const char *op, const at::Tensor &x, const at::Tensor &packed, const at::Tensor &g,
                                  const at::Tensor &h, const std::optional<at::Tensor> &bias) {
    const auto [K, out, in] = check_packed_linear_args(op, x, packed, g, h, bias);
    at::Tensor bf;
    if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
    if (x.size(0) > 0 && rabit_cpu_use_gemm(x.size(0)))
        return packed_linear_gemm(op, x, packed, scales_f32(g), scales_f32(h), bf, K, out, in);
    // the table kernels read g and h in their own dtype (converted in the C core: no tensors made per call)
    const at::Tensor gc = g.contiguous(), hc = h.contiguous();
    at::Tensor y = at::empty({x.size(0), out}, x.options());
    if (x.size(0) == 0) return y;  // no rows: nothing to compute (the C kernel takes M >= 1), as on CUDA
    check_status(op, rabit_packed_linear_cpu(x.data_ptr(), to_rabit_dtype(x.scalar_type()), x.size(0),
                                             reinterpret_cast<const rabit_word_t *>(packed.data_ptr<int32_t>()),
                                             gc.data_ptr(), to_rabit_dtype(gc.scalar_type()), hc.data_ptr(),
                                             to_rabit_dtype(hc.scalar_type()),
                                             bias.has_value() ? bf.data_ptr<float>() : nullptr, K, out, in,
                                             y.data_ptr()));
    return y;
}

}  // namespace

at::Tensor packed_linear_cpu(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &g, const at::Tensor &h,
                             const std::optional<at::Tensor> &bias) {
    return packed_linear_cpu_impl("rabit.packed_linear", x, packed, g, h, bias);
}

at::Tensor i8_layout_cpu(const at::Tensor &packed, int64_t in_features) {
    const char *op = "rabit.i8_layout";
    RABIT_CHECK_DIM(op, packed, 3);
    TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features must be positive, got ", in_features);
    const int64_t K = packed.size(0), out = packed.size(1);
    TORCH_CHECK_VALUE(K >= 1 && K <= RABIT_MAX_K && out >= 1, op, ": expected packed [K, out, words] with 1 <= K <= ",
                      RABIT_MAX_K, " and out >= 1, got ", packed.sizes());
    check_packed(op, packed, K, out, in_features);
    const int64_t nbytes = rabit_i8_layout_bytes(K, out, in_features);
    at::Tensor layout = at::empty({nbytes}, packed.options().dtype(at::kByte));
    check_status(op, rabit_i8_layout_cpu(reinterpret_cast<const rabit_word_t *>(packed.data_ptr<int32_t>()), K, out,
                                         in_features, layout.data_ptr<uint8_t>()));
    return layout;
}

namespace {

// packed_linear_i8's checks (its own: a layout instead of packed words; the layer's K, out, in from g and h)
LayerDims check_packed_linear_i8_args(const char *op, const at::Tensor &x, const at::Tensor &layout,
                                      const at::Tensor &g, const at::Tensor &h, const std::optional<at::Tensor> &bias) {
    RABIT_CHECK_DIM(op, x, 2);
    RABIT_CHECK_FLOAT(op, x);
    RABIT_CHECK_CONTIGUOUS(op, x);
    RABIT_CHECK_DIM(op, g, 2);
    RABIT_CHECK_DIM(op, h, 2);
    RABIT_CHECK_FLOAT(op, g);
    RABIT_CHECK_FLOAT(op, h);
    const int64_t K = g.size(0), out = g.size(1), in = h.size(1);
    TORCH_CHECK_VALUE(K >= 1 && K <= RABIT_MAX_K && h.size(0) == K && out >= 1 && in >= 1, op,
                      ": expected g [K, out] and h [K, in] with the same 1 <= K <= ", RABIT_MAX_K, ", got g ",
                      g.sizes(), " and h ", h.sizes());
    TORCH_CHECK_VALUE(x.size(1) == in, op, ": x is ", x.sizes(), " but h is ", h.sizes(),
                      "; x must be [M, in] with the layer's in=", in);
    TORCH_CHECK_VALUE(layout.dim() == 1 && layout.scalar_type() == at::kByte && layout.is_contiguous() &&
                          layout.size(0) == rabit_i8_layout_bytes(K, out, in),
                      op, ": expected layout to be a contiguous uint8 vector of ", rabit_i8_layout_bytes(K, out, in),
                      " bytes (rabit.i8_layout(packed, ", in, ") of this layer), got ", layout.scalar_type(), " ",
                      layout.sizes());
    RABIT_CHECK_SAME_DEVICE(op, x, layout);
    RABIT_CHECK_SAME_DEVICE(op, g, layout);
    RABIT_CHECK_SAME_DEVICE(op, h, layout);
    check_bias(op, bias, out, layout, "layout");
    return {K, out, in};
}

at::Tensor packed_linear_i8_impl(const char *op, const at::Tensor &x, const at::Tensor &layout, const at::Tensor &g,
                                 const at::Tensor &h, const std::optional<at::Tensor> &bias) {
    const auto [K, out, in] = check_packed_linear_i8_args(op, x, layout, g, h, bias);
    at::Tensor bf;
    if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
    const at::Tensor gc = g.contiguous(), hc = h.contiguous();
    at::Tensor y = at::empty({x.size(0), out}, x.options());
    if (x.size(0) == 0) return y;
    check_status(op, rabit_packed_linear_i8_cpu(x.data_ptr(), to_rabit_dtype(x.scalar_type()), x.size(0),
                                                layout.data_ptr<uint8_t>(), gc.data_ptr(),
                                                to_rabit_dtype(gc.scalar_type()), hc.data_ptr(),
                                                to_rabit_dtype(hc.scalar_type()),
                                                bias.has_value() ? bf.data_ptr<float>() : nullptr, K, out, in,
                                                y.data_ptr()));
    return y;
}

// The fused glue around n layers that read u (packed_linear_fused's spec), in the C core (kernels/cpu/fused_glue.c):
// u = silu(x) * up or x, normed; per layer linear(l, u) (float32 [M, out]), times the norm's row scale, + bias,
// + residual, rounded once to x's dtype. The arguments were checked (check_fused_args: contiguous, x's device).
template <class Linear>
std::vector<at::Tensor> fused_glue(const char *op, const at::Tensor &x, int64_t n, at::TensorList bias,
                                   const std::optional<at::Tensor> &norm_weight, double eps,
                                   const std::optional<at::Tensor> &up, const std::optional<at::Tensor> &residual,
                                   Linear &&linear) {
    const int64_t M = x.size(0), in = x.size(1);
    const rabit_dtype dt = to_rabit_dtype(x.scalar_type());
    at::Tensor u = at::empty({M, in}, x.options().dtype(at::kFloat)), rs;
    if (norm_weight.has_value()) rs = at::empty({M}, u.options());
    std::vector<at::Tensor> ys;
    if (M == 0) {  // no rows: empty outputs (the layers' shapes)
        for (int64_t l = 0; l < n; l++) ys.push_back(linear(l, u).to(x.scalar_type()));
        return ys;
    }
    check_status(op, rabit_glue_input_cpu(x.data_ptr(), up.has_value() ? up->data_ptr() : nullptr, dt, M, in,
                                          norm_weight.has_value() ? norm_weight->data_ptr() : nullptr,
                                          norm_weight.has_value() ? to_rabit_dtype(norm_weight->scalar_type()) : dt,
                                          static_cast<float>(eps), u.data_ptr<float>(),
                                          rs.defined() ? rs.data_ptr<float>() : nullptr));
    for (int64_t l = 0; l < n; l++) {
        const at::Tensor yl = linear(l, u);
        const at::Tensor b = bias.empty() ? at::Tensor() : bias[l].contiguous();
        at::Tensor y = at::empty({M, yl.size(1)}, x.options());
        check_status(op, rabit_glue_output_cpu(yl.data_ptr<float>(), M, yl.size(1),
                                               rs.defined() ? rs.data_ptr<float>() : nullptr,
                                               b.defined() ? b.data_ptr() : nullptr,
                                               b.defined() ? to_rabit_dtype(b.scalar_type()) : dt,
                                               residual.has_value() ? residual->data_ptr() : nullptr, dt,
                                               y.data_ptr()));
        ys.push_back(y);
    }
    return ys;
}

}  // namespace

at::Tensor packed_linear_i8_cpu(const at::Tensor &x, const at::Tensor &layout, const at::Tensor &g,
                                const at::Tensor &h, const std::optional<at::Tensor> &bias) {
    return packed_linear_i8_impl("rabit.packed_linear_i8", x, layout, g, h, bias);
}

// One call per layer: on the CPU a launch costs nothing worth saving (the CUDA glue runs decode groups as one).
std::vector<at::Tensor> packed_linear_group_cpu(const at::Tensor &x, at::TensorList packed, at::TensorList g,
                                                at::TensorList h, at::TensorList bias) {
    const char *op = "rabit.packed_linear_group";
    const int64_t n = check_group_lists(op, packed, g, h, bias);
    std::vector<at::Tensor> ys;
    for (int64_t l = 0; l < n; l++)
        ys.push_back(
            packed_linear_cpu_impl(layer_op(op, l).c_str(), x, packed[l], g[l], h[l], layer_bias(bias, l)));
    return ys;
}

// The composition the fused CUDA kernel computes: float32 input u, the layers on it through the CPU kernel, the
// norm's per-row scale, bias and residual after the sums, one rounding to x's dtype.
std::vector<at::Tensor> packed_linear_fused_cpu(const at::Tensor &x, at::TensorList packed, at::TensorList g,
                                                at::TensorList h, at::TensorList bias,
                                                const std::optional<at::Tensor> &norm_weight, double eps,
                                                const std::optional<at::Tensor> &up,
                                                const std::optional<at::Tensor> &residual,
                                                bool /*prefetch_weights: the CPU op has no early start*/) {
    const char *op = "rabit.packed_linear_fused";
    const int64_t n = check_group_lists(op, packed, g, h, bias);
    for (int64_t l = 0; l < n; l++)
        check_packed_linear_args(layer_op(op, l).c_str(), x, packed[l], g[l], h[l], layer_bias(bias, l));
    check_fused_args(op, x, n, packed[0].size(1), norm_weight, eps, up, residual);
    return fused_glue(op, x, n, bias, norm_weight, eps, up, residual, [&](int64_t l, const at::Tensor &u) {
        return packed_linear_cpu_impl(layer_op(op, l).c_str(), u, packed[l], g[l], h[l], std::nullopt);
    });
}

// packed_linear_fused with packed_linear_i8 as the layers' product (CPU only)
std::vector<at::Tensor> packed_linear_fused_i8_cpu(const at::Tensor &x, at::TensorList layout, at::TensorList g,
                                                   at::TensorList h, at::TensorList bias,
                                                   const std::optional<at::Tensor> &norm_weight, double eps,
                                                   const std::optional<at::Tensor> &up,
                                                   const std::optional<at::Tensor> &residual) {
    const char *op = "rabit.packed_linear_fused_i8";
    const int64_t n = check_group_lists(op, layout, g, h, bias);
    for (int64_t l = 0; l < n; l++)
        check_packed_linear_i8_args(layer_op(op, l).c_str(), x, layout[l], g[l], h[l], layer_bias(bias, l));
    check_fused_args(op, x, n, g[0].size(1), norm_weight, eps, up, residual);
    return fused_glue(op, x, n, bias, norm_weight, eps, up, residual, [&](int64_t l, const at::Tensor &u) {
        return packed_linear_i8_impl(layer_op(op, l).c_str(), u, layout[l], g[l], h[l], std::nullopt);
    });
}

// int8 weights (a scale per row and 32 columns) for the dense LM head of a packed model (kernels/cpu/int8_linear.c)
std::tuple<at::Tensor, at::Tensor> int8_weight_cpu(const at::Tensor &weight) {
    const char *op = "rabit.int8_weight";
    RABIT_CHECK_DIM(op, weight, 2);
    RABIT_CHECK_FLOAT(op, weight);
    const int64_t out = weight.size(0), in = weight.size(1);
    TORCH_CHECK_VALUE(out >= 1 && in >= 1, op, ": expected a non-empty weight [out, in], got ", weight.sizes());
    const at::Tensor w = weight.contiguous();
    const int64_t nb = rabit_int8_in_pad(in) / 32, groups = (out + 7) / 8;
    at::Tensor q = at::empty({groups, nb, 8, 32}, w.options().dtype(at::kChar));
    at::Tensor d = at::empty({groups, nb, 8}, w.options().dtype(at::kFloat));
    const rabit_status st = rabit_int8_weight_cpu(w.data_ptr(), to_rabit_dtype(w.scalar_type()), out, in,
                                                  q.data_ptr<int8_t>(), d.data_ptr<float>());
    TORCH_CHECK_VALUE(st != RABIT_ERR_NONFINITE, op, ": the weight contains NaN or Inf; only finite weights can be "
                      "quantized");
    check_status(op, st);
    return {q, d};
}

at::Tensor int8_linear_cpu(const at::Tensor &x, const at::Tensor &qweight, const at::Tensor &scales,
                           int64_t out_features, const std::optional<at::Tensor> &bias) {
    const char *op = "rabit.int8_linear";
    RABIT_CHECK_DIM(op, x, 2);
    RABIT_CHECK_FLOAT(op, x);
    RABIT_CHECK_CONTIGUOUS(op, x);
    const int64_t in = x.size(1), nb = rabit_int8_in_pad(in) / 32, out = out_features;
    TORCH_CHECK_VALUE(out >= 1, op, ": out_features must be >= 1, got ", out);
    TORCH_CHECK_VALUE(in >= 1, op, ": expected x [M, in] with in >= 1, got ", x.sizes());
    const int64_t groups = (out + 7) / 8;
    TORCH_CHECK_VALUE(qweight.scalar_type() == at::kChar && qweight.is_contiguous() &&
                          qweight.sizes() == at::IntArrayRef({groups, nb, 8, 32}),
                      op, ": expected qweight to be a contiguous int8 [", groups, ", ", nb,
                      ", 8, 32] (rabit.int8_weight of an [", out, ", ", in, "] weight), got ", qweight.scalar_type(),
                      " ", qweight.sizes(), "; x is ", x.sizes());
    TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                          scales.sizes() == at::IntArrayRef({groups, nb, 8}),
                      op, ": expected scales to be a contiguous float32 [", groups, ", ", nb,
                      ", 8] (rabit.int8_weight's second output), got ", scales.scalar_type(), " ", scales.sizes());
    RABIT_CHECK_SAME_DEVICE(op, x, qweight);
    RABIT_CHECK_SAME_DEVICE(op, scales, qweight);
    check_bias(op, bias, out, qweight, "qweight");
    at::Tensor bf;
    if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
    at::Tensor y = at::empty({x.size(0), out}, x.options());
    if (x.size(0) == 0) return y;
    check_status(op, rabit_int8_linear_cpu(x.data_ptr(), to_rabit_dtype(x.scalar_type()), x.size(0), in,
                                           qweight.data_ptr<int8_t>(), scales.data_ptr<float>(),
                                           bias.has_value() ? bf.data_ptr<float>() : nullptr, out, y.data_ptr()));
    return y;
}

at::Tensor decode_attention_cpu(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, at::Tensor &k_cache,
                                at::Tensor &v_cache, const at::Tensor &cos, const at::Tensor &sin,
                                const at::Tensor &pos, double scale) {
    const char *op = "rabit.decode_attention";
    const auto d = check_decode_attention_args(op, q, k, v, k_cache, v_cache, cos, sin, pos, scale);
    const int64_t p = pos.item<int64_t>();
    TORCH_CHECK_VALUE(p >= 0 && p < d.S, op, ": pos=", p, " is outside the cache's ", d.S, " positions");
    at::Tensor out = at::empty({d.B, d.H, d.D}, q.options());
    const int64_t qs[2] = {q.stride(0), q.stride(1)}, ks[2] = {k.stride(0), k.stride(1)},
                  vs[2] = {v.stride(0), v.stride(1)};
    check_status(op, rabit_decode_attention_cpu(q.data_ptr(), qs, k.data_ptr(), ks, v.data_ptr(), vs,
                                                to_rabit_dtype(q.scalar_type()), d.B, d.H, d.Hkv, d.D,
                                                k_cache.data_ptr(), v_cache.data_ptr(), d.S, cos.data_ptr(),
                                                sin.data_ptr(), p, static_cast<float>(scale), out.data_ptr()));
    return out;
}

// A decode step's decoder layers in one call (CPU; StaticDecoder's fused-glue step): per layer exactly the calls the
// decoder makes one by one otherwise (packed_linear_fused(_i8) of q/k/v on the input norm, decode_attention, o_proj
// plus the residual, gate/up on the post-attention norm, down_proj of silu(gate) * up plus the residual), so the
// result is theirs bit for bit; what it saves is the ~150 Python calls and dispatches of a 30-layer step.
// weights: per layer kLayerWeights tensors: input norm, post-attention norm, then (packed or int8 layout, g, h) of
// q, k, v, o, gate, up, down; bias: empty, or per layer the 7 linears' biases (an empty tensor for none); eps: the
// two norms' epsilons per layer; caches [layers, B, Hkv, S, D].
constexpr int64_t kLayerWeights = 2 + 7 * 3;

at::Tensor decode_layers_cpu(const at::Tensor &x, at::TensorList weights, at::TensorList bias, at::ArrayRef<double> eps,
                             at::Tensor &k_cache, at::Tensor &v_cache, const at::Tensor &cos, const at::Tensor &sin,
                             const at::Tensor &pos, int64_t n_heads, double scale, bool int8) {
    const char *op = "rabit.decode_layers";
    RABIT_CHECK_DIM(op, x, 2);
    RABIT_CHECK_DIM(op, k_cache, 5);
    const int64_t L = k_cache.size(0), B = x.size(0), Hkv = k_cache.size(2), D = k_cache.size(4);
    TORCH_CHECK_VALUE(L >= 1 && Hkv >= 1 && D >= 2, op, ": expected caches [layers >= 1, B, Hkv >= 1, S, D >= 2], got ",
                      k_cache.sizes());
    TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == L * kLayerWeights, op, ": expected ", kLayerWeights,
                      " weights per layer for the cache's ", L, " layers (", L * kLayerWeights, "), got ",
                      weights.size());
    TORCH_CHECK_VALUE(bias.empty() || static_cast<int64_t>(bias.size()) == L * 7, op, ": expected bias to be empty or "
                      "7 per layer (", L * 7, "), got ", bias.size());
    TORCH_CHECK_VALUE(static_cast<int64_t>(eps.size()) == 2 * L, op, ": expected 2 epsilons per layer (", 2 * L,
                      "), got ", eps.size());
    TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == B && n_heads >= 1 && n_heads % Hkv == 0,
                      op, ": expected caches [layers, B=", B, ", Hkv, S, D] alike and n_heads a multiple of Hkv, got ",
                      k_cache.sizes(), ", ", v_cache.sizes(), " and n_heads=", n_heads);
    // the biases of linears j0 .. j1 - 1 of layer i: empty (the fused ops' "no biases") where the layers have none
    auto group_bias = [&](int64_t i, int64_t j0, int64_t j1) {
        std::vector<at::Tensor> b;
        if (bias.empty()) return b;
        for (int64_t j = j0; j < j1; j++)
            if (bias[i * 7 + j].numel() > 0) b.push_back(bias[i * 7 + j]);
        TORCH_CHECK_VALUE(b.empty() || static_cast<int64_t>(b.size()) == j1 - j0, op, ": layer ", i,
                          ": a q/k/v or gate/up group mixes linears with and without a bias");
        return b;
    };
    auto fused = [&](int64_t i, int64_t j0, int64_t j1, const at::Tensor &in, const std::optional<at::Tensor> &norm,
                     double e, const std::optional<at::Tensor> &up, const std::optional<at::Tensor> &residual) {
        const at::Tensor *w = weights.data() + i * kLayerWeights + 2;
        std::vector<at::Tensor> packed, g, h;
        for (int64_t j = j0; j < j1; j++) {
            packed.push_back(w[3 * j]);
            g.push_back(w[3 * j + 1]);
            h.push_back(w[3 * j + 2]);
        }
        const std::vector<at::Tensor> b = group_bias(i, j0, j1);
        return int8 ? packed_linear_fused_i8_cpu(in, packed, g, h, b, norm, e, up, residual)
                    : packed_linear_fused_cpu(in, packed, g, h, b, norm, e, up, residual, false);
    };
    at::Tensor hs = x;
    for (int64_t i = 0; i < L; i++) {
        const at::Tensor &in_norm = weights[i * kLayerWeights], &post_norm = weights[i * kLayerWeights + 1];
        const std::vector<at::Tensor> qkv = fused(i, 0, 3, hs, in_norm, eps[2 * i], std::nullopt, std::nullopt);
        at::Tensor kc = k_cache.select(0, i), vc = v_cache.select(0, i);
        const at::Tensor o = decode_attention_cpu(qkv[0].view({B, n_heads, D}), qkv[1].view({B, Hkv, D}),
                                                  qkv[2].view({B, Hkv, D}), kc, vc, cos, sin, pos, scale);
        hs = fused(i, 3, 4, o.view({B, n_heads * D}), std::nullopt, 1e-6, std::nullopt, hs)[0];
        const std::vector<at::Tensor> gu = fused(i, 4, 6, hs, post_norm, eps[2 * i + 1], std::nullopt, std::nullopt);
        hs = fused(i, 6, 7, gu[0], std::nullopt, 1e-6, gu[1], hs)[0];
    }
    return hs;
}

TORCH_LIBRARY_IMPL(rabit, CPU, m) {
    m.impl("residual_binarize", &residual_binarize_cpu);
    m.impl("residual_binarize_backward", &residual_binarize_backward_cpu);
    m.impl("scale_grads", &scale_grads_cpu);
    m.impl("pack_signs", &pack_signs_cpu);
    m.impl("unpack_signs", &unpack_signs_cpu);
    m.impl("dequantize", &dequantize_cpu);
    m.impl("packed_linear", &packed_linear_cpu);
    m.impl("packed_linear_group", &packed_linear_group_cpu);
    m.impl("packed_linear_fused", &packed_linear_fused_cpu);
    m.impl("i8_layout", &i8_layout_cpu);
    m.impl("packed_linear_i8", &packed_linear_i8_cpu);
    m.impl("packed_linear_fused_i8", &packed_linear_fused_i8_cpu);
    m.impl("int8_weight", &int8_weight_cpu);
    m.impl("int8_linear", &int8_linear_cpu);
    m.impl("decode_attention", &decode_attention_cpu);
    m.impl("decode_layers", &decode_layers_cpu);
}

}  // namespace rabit
