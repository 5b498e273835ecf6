// CPU implementations of the rabit ops: check inputs, then call the torch-free C kernels.
#include <torch/all.h>
#include <torch/library.h>

#include "../kernels/rabit_kernels.h"
#include "checks.h"

namespace rabit {

static at::Tensor scales_f32(const at::Tensor &s) { return s.to(at::kFloat).contiguous(); }

static void check_weight(const char *op, const at::Tensor &weight) {
    RABIT_CHECK_DIM(op, weight, 2);
    RABIT_CHECK_FLOAT(op, weight);
    RABIT_CHECK_CONTIGUOUS(op, weight);
    TORCH_CHECK_VALUE(weight.size(0) >= 1 && weight.size(1) >= 1, op, ": weight is empty (shape ", weight.sizes(), ")");
}

static void check_packed(const char *op, const at::Tensor &packed, int64_t K, int64_t out, int64_t in) {
    RABIT_CHECK_DIM(op, packed, 3);
    RABIT_CHECK_PACKED_DTYPE(op, packed);
    RABIT_CHECK_CONTIGUOUS(op, packed);
    TORCH_CHECK_VALUE(packed.size(0) == K && packed.size(1) == out && packed.size(2) == words_per_row(in), op,
                      ": packed is ", packed.sizes(), " but K=", K, ", out=", out, ", in=", in, " need [", K, ", ",
                      out, ", ", words_per_row(in), "]");
}

std::tuple<at::Tensor, at::Tensor> residual_binarize_cpu(const at::Tensor &weight, const at::Tensor &g,
                                                         const at::Tensor &h, std::optional<at::ScalarType> out_dtype,
                                                         c10::string_view ste, double ste_param) {
    const char *op = "rabit.residual_binarize";
    check_weight(op, weight);
    TORCH_CHECK_VALUE(parse_ste(op, ste) == RABIT_STE_IDENTITY || ste_param > 0, op, ": ste_param must be > 0 for ste='",
                      std::string(ste), "', got ", ste_param);
    const int64_t out = weight.size(0), in = weight.size(1);
    check_scales(op, g, h, out, in, weight);
    check_finite_scales(op, g, h);
    const at::ScalarType odt = out_dtype.value_or(weight.scalar_type());
    const rabit_dtype ordt = to_rabit_dtype(odt);
    const int64_t K = g.size(0);
    at::Tensor gf = scales_f32(g), hf = scales_f32(h);
    at::Tensor what = at::empty({out, in}, weight.options().dtype(odt));
    at::Tensor packed = at::empty({K, out, words_per_row(in)}, weight.options().dtype(at::kInt));
    check_status(op, rabit_residual_binarize_cpu(weight.data_ptr(), to_rabit_dtype(weight.scalar_type()),
                                                 gf.data_ptr<float>(), hf.data_ptr<float>(), K, out, in,
                                                 what.data_ptr(), ordt,
                                                 reinterpret_cast<rabit_word_t *>(packed.data_ptr<int32_t>())));
    return {what, packed};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_binarize_backward_cpu(
    const at::Tensor &grad, const at::Tensor &weight, const at::Tensor &g, const at::Tensor &h,
    const at::Tensor &packed, c10::string_view ste, double ste_param) {
    const char *op = "rabit.residual_binarize_backward";
    check_weight(op, weight);
    const int64_t out = weight.size(0), in = weight.size(1);
    RABIT_CHECK_DIM(op, grad, 2);
    RABIT_CHECK_FLOAT(op, grad);
    RABIT_CHECK_CONTIGUOUS(op, grad);
    TORCH_CHECK_VALUE(grad.sizes() == weight.sizes(), op, ": grad is ", grad.sizes(), " but weight is ",
                      weight.sizes(), "; grad must be ∂L/∂Ŵ of the weight's shape");
    check_scales(op, g, h, out, in, weight);
    const int64_t K = g.size(0);
    check_packed(op, packed, K, out, in);
    const rabit_ste s = parse_ste(op, ste);
    TORCH_CHECK_VALUE(s == RABIT_STE_IDENTITY || ste_param > 0, op, ": ste_param must be > 0 for ste='",
                      std::string(ste), "', got ", ste_param);
    at::Tensor gf = scales_f32(g), hf = scales_f32(h);
    at::Tensor dW = at::empty_like(weight);
    at::Tensor dg = at::empty({K, out}, weight.options().dtype(at::kFloat));
    at::Tensor dh = at::empty({K, in}, weight.options().dtype(at::kFloat));
    check_status(op, rabit_residual_binarize_backward_cpu(
                         grad.data_ptr(), to_rabit_dtype(grad.scalar_type()), weight.data_ptr(),
                         to_rabit_dtype(weight.scalar_type()), gf.data_ptr<float>(), hf.data_ptr<float>(),
                         reinterpret_cast<const rabit_word_t *>(packed.data_ptr<int32_t>()), K, out, in, s,
                         static_cast<float>(ste_param), dW.data_ptr(), dg.data_ptr<float>(), dh.data_ptr<float>()));
    return {dW, dg.to(g.scalar_type()), dh.to(h.scalar_type())};
}

at::Tensor pack_signs_cpu(const at::Tensor &signs) {
    const char *op = "rabit.pack_signs";
    TORCH_CHECK_VALUE(signs.dim() >= 1 && signs.size(-1) >= 1, op, ": expected signs with a non-empty last "
                      "dimension (the in-features), got shape ", signs.sizes());
    TORCH_CHECK_TYPE(signs.is_floating_point() || signs.scalar_type() == at::kInt || signs.scalar_type() == at::kChar ||
                         signs.scalar_type() == at::kLong || signs.scalar_type() == at::kShort,
                     op, ": expected a float or signed integer tensor of signs, got ", signs.scalar_type());
    // Converting to float32 preserves every sign, so the bits do not depend on the input dtype.
    at::Tensor s = signs.to(at::kFloat).contiguous();
    const int64_t in = s.size(-1), rows = s.numel() / in;
    std::vector<int64_t> shape(signs.sizes().begin(), signs.sizes().end());
    shape.back() = words_per_row(in);
    at::Tensor packed = at::empty(shape, signs.options().dtype(at::kInt));
    check_status(op, rabit_pack_signs_cpu(s.data_ptr<float>(), rows, in,
                                          reinterpret_cast<rabit_word_t *>(packed.data_ptr<int32_t>())));
    return packed;
}

at::Tensor unpack_signs_cpu(const at::Tensor &packed, int64_t in_features, std::optional<at::ScalarType> dtype) {
    const char *op = "rabit.unpack_signs";
    RABIT_CHECK_PACKED_DTYPE(op, packed);
    RABIT_CHECK_CONTIGUOUS(op, packed);
    TORCH_CHECK_VALUE(packed.dim() >= 1, op, ": expected packed words with at least 1 dimension");
    TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features must be >= 1, got ", in_features);
    TORCH_CHECK_VALUE(packed.size(-1) == words_per_row(in_features), op, ": packed rows hold ", packed.size(-1),
                      " words but in_features=", in_features, " needs ", words_per_row(in_features));
    const at::ScalarType dt = dtype.value_or(at::kFloat);
    const rabit_dtype rdt = to_rabit_dtype(dt);
    std::vector<int64_t> shape(packed.sizes().begin(), packed.sizes().end());
    shape.back() = in_features;
    at::Tensor out = at::empty(shape, packed.options().dtype(dt));
    const int64_t rows = packed.numel() / packed.size(-1);
    check_status(op, rabit_unpack_signs_cpu(reinterpret_cast<const rabit_word_t *>(packed.data_ptr<int32_t>()), rows,
                                            in_features, out.data_ptr(), rdt));
    return out;
}

at::Tensor packed_linear_cpu(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &g, const at::Tensor &h,
                             const std::optional<at::Tensor> &bias) {
    const char *op = "rabit.packed_linear";
    RABIT_CHECK_DIM(op, x, 2);
    RABIT_CHECK_FLOAT(op, x);
    RABIT_CHECK_CONTIGUOUS(op, x);
    RABIT_CHECK_DIM(op, packed, 3);
    const int64_t K = packed.size(0), out = packed.size(1), in = x.size(1);
    TORCH_CHECK_VALUE(in >= 1, op, ": x has no input features (shape ", x.sizes(), ")");
    check_scales(op, g, h, out, in, packed);  // `in` comes from x: a mismatch names h and x's width
    check_packed(op, packed, K, out, in);
    RABIT_CHECK_SAME_DEVICE(op, x, packed);
    at::Tensor bf;
    if (bias.has_value()) {
        RABIT_CHECK_DIM(op, (*bias), 1);
        RABIT_CHECK_FLOAT(op, (*bias));
        TORCH_CHECK_VALUE(bias->size(0) == out, op, ": bias has ", bias->size(0), " elements but out=", out);
        bf = bias->to(at::kFloat).contiguous();
    }
    at::Tensor gf = scales_f32(g), hf = scales_f32(h);
    at::Tensor y = at::empty({x.size(0), out}, x.options());
    check_status(op, rabit_packed_linear_cpu(x.data_ptr(), to_rabit_dtype(x.scalar_type()), x.size(0),
                                             reinterpret_cast<const rabit_word_t *>(packed.data_ptr<int32_t>()),
                                             gf.data_ptr<float>(), hf.data_ptr<float>(),
                                             bias.has_value() ? bf.data_ptr<float>() : nullptr, K, out, in,
                                             y.data_ptr()));
    return y;
}

TORCH_LIBRARY_IMPL(rabit, CPU, m) {
    m.impl("residual_binarize", &residual_binarize_cpu);
    m.impl("residual_binarize_backward", &residual_binarize_backward_cpu);
    m.impl("pack_signs", &pack_signs_cpu);
    m.impl("unpack_signs", &unpack_signs_cpu);
    m.impl("packed_linear", &packed_linear_cpu);
}

}  // namespace rabit
