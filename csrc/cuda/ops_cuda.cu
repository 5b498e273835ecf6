// CUDA implementations of the rabit ops: the same checks and messages as ops_cpu.cpp (csrc/checks.h),
// then the torch-free launchers of kernels/cuda/ on the current stream of the input's device.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>
#include <torch/library.h>

#include "../../kernels/cuda/rabit_cuda.cuh"
#include "../../kernels/rabit_kernels.h"
#include "../checks.h"

namespace rabit {

namespace {

void check_launch(cudaError_t e) {
    C10_CUDA_CHECK(e);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const rabit_word_t *words(const at::Tensor &t) { return reinterpret_cast<const rabit_word_t *>(t.data_ptr<int32_t>()); }
rabit_word_t *words_mut(at::Tensor &t) { return reinterpret_cast<rabit_word_t *>(t.data_ptr<int32_t>()); }

bool stream_is_capturing(cudaStream_t s) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(s, &st));
    return st != cudaStreamCaptureStatusNone;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> residual_binarize_cuda(const at::Tensor &weight, const at::Tensor &g,
                                                          const at::Tensor &h, std::optional<at::ScalarType> out_dtype,
                                                          c10::string_view ste, double ste_param,
                                                          bool check_finite) {
    const char *op = "rabit.residual_binarize";
    const auto [K, out, in] = check_residual_binarize_args(op, weight, g, h, ste, ste_param);
    const at::ScalarType odt = out_dtype.value_or(weight.scalar_type());
    const rabit_dtype ordt = to_rabit_dtype(odt);
    const c10::cuda::CUDAGuard guard(weight.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor gf = g.to(at::kFloat).contiguous(), hf = h.to(at::kFloat).contiguous();
    at::Tensor what = at::empty({out, in}, weight.options().dtype(odt));
    at::Tensor packed = at::empty({K, out, words_per_row(in)}, weight.options().dtype(at::kInt));
    // Non-finite g, h and W are reported through one device flag, read back after the kernel: one
    // synchronisation instead of three. With check_finite=false there is no flag (no allocation, no memset,
    // no synchronisation: the trainer checks its parameters itself).
    at::Tensor flag;
    int *flag_ptr = nullptr;
    if (check_finite) {
        flag = at::empty({1}, weight.options().dtype(at::kInt));
        flag_ptr = flag.data_ptr<int>();
        C10_CUDA_CHECK(cudaMemsetAsync(flag_ptr, 0, sizeof(int), stream));
    }
    check_launch(rabit_cuda::residual_binarize(weight.data_ptr(), to_rabit_dtype(weight.scalar_type()),
                                               gf.data_ptr<float>(), hf.data_ptr<float>(), static_cast<int>(K), out,
                                               in, what.data_ptr(), ordt, words_mut(packed), flag_ptr, stream));
    // Inside CUDA-graph capture nothing may synchronise: the check is skipped there (docs/kernels.md).
    if (check_finite && !stream_is_capturing(stream)) {
        const int bad = flag.item<int>();
        TORCH_CHECK_VALUE(!(bad & rabit_cuda::FLAG_G_NONFINITE), op, ": g contains NaN or Inf");
        TORCH_CHECK_VALUE(!(bad & rabit_cuda::FLAG_H_NONFINITE), op, ": h contains NaN or Inf");
        check_status(op, (bad & rabit_cuda::FLAG_W_NONFINITE) ? RABIT_ERR_NONFINITE : RABIT_OK);
    }
    return {what, packed};
}

namespace {

// dW (weight given), dg and dh in one pass of the backward kernel; without a weight (scale_grads) it writes no dW.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor &grad, const at::Tensor *weight,
                                                             const at::Tensor &g, const at::Tensor &h,
                                                             const at::Tensor &packed, LayerDims d, rabit_ste ste,
                                                             double ste_param) {
    const c10::cuda::CUDAGuard guard(grad.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor gf = g.to(at::kFloat).contiguous(), hf = h.to(at::kFloat).contiguous();
    at::Tensor dW = weight ? at::empty_like(*weight) : at::Tensor();
    at::Tensor dg = at::empty({d.K, d.out}, grad.options().dtype(at::kFloat));
    at::Tensor dh = at::empty({d.K, d.in}, grad.options().dtype(at::kFloat));
    const int K = static_cast<int>(d.K);
    at::Tensor ws = at::empty({static_cast<int64_t>(rabit_cuda::backward_workspace_doubles(K, d.out, d.in))},
                              grad.options().dtype(at::kDouble));
    const rabit_dtype gdt = to_rabit_dtype(grad.scalar_type());
    check_launch(rabit_cuda::residual_binarize_backward(
        grad.data_ptr(), gdt, weight ? weight->data_ptr() : nullptr, weight ? to_rabit_dtype(weight->scalar_type()) : gdt,
        gf.data_ptr<float>(), hf.data_ptr<float>(), words(packed), K, d.out, d.in, ste, static_cast<float>(ste_param),
        weight ? dW.data_ptr() : nullptr, dg.data_ptr<float>(), dh.data_ptr<float>(), ws.data_ptr<double>(), stream));
    return {dW, dg.to(g.scalar_type()), dh.to(h.scalar_type())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_binarize_backward_cuda(
    const at::Tensor &grad, const at::Tensor &weight, const at::Tensor &g, const at::Tensor &h,
    const at::Tensor &packed, c10::string_view ste, double ste_param) {
    const char *op = "rabit.residual_binarize_backward";
    const LayerDims d = check_backward_args(op, grad, weight, g, h, packed);
    return backward_cuda(grad, &weight, g, h, packed, d, check_ste(op, ste, ste_param), ste_param);
}

std::tuple<at::Tensor, at::Tensor> scale_grads_cuda(const at::Tensor &grad, const at::Tensor &g, const at::Tensor &h,
                                                    const at::Tensor &packed) {
    const LayerDims d = check_scale_grads_args("rabit.scale_grads", grad, g, h, packed);
    auto [dW, dg, dh] = backward_cuda(grad, nullptr, g, h, packed, d, RABIT_STE_IDENTITY, 1.0);
    return {dg, dh};
}

at::Tensor pack_signs_cuda(const at::Tensor &signs) {
    const char *op = "rabit.pack_signs";
    check_pack_args(op, signs);
    const c10::cuda::CUDAGuard guard(signs.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor s = signs_as_f32(signs);
    const int64_t in = s.size(-1), rows = s.numel() / in;
    std::vector<int64_t> shape(signs.sizes().begin(), signs.sizes().end());
    shape.back() = words_per_row(in);
    at::Tensor packed = at::empty(shape, signs.options().dtype(at::kInt));
    if (rows == 0) return packed;  // no rows: nothing to pack (the kernel takes no null data pointer)
    check_launch(rabit_cuda::pack_signs(s.data_ptr<float>(), rows, in, words_mut(packed), stream));
    return packed;
}

at::Tensor unpack_signs_cuda(const at::Tensor &packed, int64_t in_features, std::optional<at::ScalarType> dtype) {
    const char *op = "rabit.unpack_signs";
    check_unpack_args(op, packed, in_features);
    const at::ScalarType dt = dtype.value_or(at::kFloat);
    const rabit_dtype rdt = to_rabit_dtype(dt);
    const c10::cuda::CUDAGuard guard(packed.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    std::vector<int64_t> shape(packed.sizes().begin(), packed.sizes().end());
    shape.back() = in_features;
    at::Tensor out = at::empty(shape, packed.options().dtype(dt));
    const int64_t rows = packed.size(-1) ? packed.numel() / packed.size(-1) : 0;
    if (rows == 0) return out;
    check_launch(rabit_cuda::unpack_signs(words(packed), rows, in_features, out.data_ptr(), rdt, stream));
    return out;
}

at::Tensor dequantize_cuda(const at::Tensor &packed, const at::Tensor &g, const at::Tensor &h,
                           std::optional<at::ScalarType> dtype) {
    const char *op = "rabit.dequantize";
    const auto [K, out, in] = check_dequantize_args(op, packed, g, h);
    const at::ScalarType dt = dtype.value_or(at::kFloat);
    const rabit_dtype rdt = to_rabit_dtype(dt);
    const c10::cuda::CUDAGuard guard(packed.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor gf = g.to(at::kFloat).contiguous(), hf = h.to(at::kFloat).contiguous();
    at::Tensor what = at::empty({out, in}, packed.options().dtype(dt));
    check_launch(rabit_cuda::dequantize(words(packed), gf.data_ptr<float>(), hf.data_ptr<float>(), static_cast<int>(K),
                                        out, in, what.data_ptr(), rdt, stream));
    return what;
}

namespace {

at::Tensor packed_linear_cuda_impl(const char *op, const at::Tensor &x, const at::Tensor &packed, const at::Tensor &g,
                                   const at::Tensor &h, const std::optional<at::Tensor> &bias) {
    const auto [K, out, in] = check_packed_linear_args(op, x, packed, g, h, bias);
    const rabit_dtype xdt = to_rabit_dtype(x.scalar_type());
    const int64_t M = x.size(0);
    const bool prefill = rabit_cuda::packed_linear_path(xdt, M) == 1;
    at::Tensor bt;
    if (bias.has_value()) bt = prefill ? bias->to(at::kFloat).contiguous() : bias->contiguous();
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    // decode reads the scales in their own dtype (no conversion kernels on the GEMV path); prefill wants float32
    at::Tensor gs = prefill ? g.to(at::kFloat).contiguous() : g.contiguous();
    at::Tensor hs = prefill ? h.to(at::kFloat).contiguous() : h.contiguous();
    at::Tensor y = at::empty({M, out}, x.options());
    if (M == 0) return y;
    // scratch of the decode kernels (activations in MMA-fragment order, per-group scales), from the caching allocator
    const size_t ws_bytes = rabit_cuda::packed_linear_workspace_bytes(xdt, M, static_cast<int>(K), in, out);
    at::Tensor ws;
    if (ws_bytes) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    if (prefill) {  // a forced kernel or split that cannot hold is the caller's error, not a CUDA failure
        const rabit_cuda::PrefillPlan plan = rabit_cuda::prefill_plan(
            M, out, in, reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
            reinterpret_cast<uintptr_t>(hs.data_ptr()) % 16 == 0);
        TORCH_CHECK(!plan.error, op, ": ", plan.error);
    }
    check_launch(rabit_cuda::packed_linear(
        x.data_ptr(), xdt, M, words(packed), gs.data_ptr(), to_rabit_dtype(gs.scalar_type()), hs.data_ptr(),
        to_rabit_dtype(hs.scalar_type()), bias.has_value() ? bt.data_ptr() : nullptr,
        bias.has_value() ? to_rabit_dtype(bt.scalar_type()) : RABIT_F32, static_cast<int>(K), out, in, y.data_ptr(),
        ws_bytes ? ws.data_ptr() : nullptr, stream));
    return y;
}

}  // namespace

at::Tensor packed_linear_cuda(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &g, const at::Tensor &h,
                              const std::optional<at::Tensor> &bias) {
    return packed_linear_cuda_impl("rabit.packed_linear", x, packed, g, h, bias);
}

namespace {

// Layers [l0, l0 + nl) of a call (nl <= kDecodeMaxLayers; alike in K and in the dtypes of g, h and bias) as one
// decode_gemv launch of kernel kern, with the decoder's glue where fusion is given; appends their outputs to ys.
void launch_decode_layers(const at::Tensor &x, at::TensorList packed, at::TensorList g, at::TensorList h,
                          at::TensorList bias, int64_t l0, int nl, int K, const std::vector<int64_t> &out,
                          rabit_cuda::DecodeKernel kern, const rabit_cuda::DecodeFusion *fusion,
                          std::vector<at::Tensor> &ys) {
    const int64_t M = x.size(0), in = x.size(1);
    std::vector<at::Tensor> keep;  // contiguous copies of scales and biases that live until the launch
    rabit_cuda::DecodeLayer layers[rabit_cuda::kDecodeMaxLayers];
    bool copied = false;
    for (int i = 0; i < nl; i++) {
        const int64_t l = l0 + i;
        copied = copied || !g[l].is_contiguous() || !h[l].is_contiguous() || (!bias.empty() && !bias[l].is_contiguous());
        at::Tensor gs = g[l].contiguous(), hs = h[l].contiguous();
        at::Tensor bt = bias.empty() ? at::Tensor() : bias[l].contiguous();
        ys.push_back(at::empty({M, out[l]}, x.options()));
        layers[i] = {words(packed[l]), gs.data_ptr(), hs.data_ptr(), bias.empty() ? nullptr : bt.data_ptr(),
                     ys.back().data_ptr(), out[l]};
        keep.insert(keep.end(), {gs, hs, bt});
    }
    // a copy made here is written by the kernel just ahead of the launch: its parameters must then be read after the
    // wait, whatever the caller asked (prefetch_weights changes when they are read, not the result)
    rabit_cuda::DecodeFusion f{};
    if (fusion) {
        f = *fusion;
        f.prefetch_weights = f.prefetch_weights && !copied;
    }
    const size_t ws_bytes = rabit_cuda::decode_workspace_bytes(nl * K, M, in, kern);
    at::Tensor ws;
    if (ws_bytes) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    check_launch(rabit_cuda::decode_gemv(x.data_ptr(), to_rabit_dtype(x.scalar_type()), M, layers, nl,
                                         to_rabit_dtype(g[l0].scalar_type()), to_rabit_dtype(h[l0].scalar_type()),
                                         bias.empty() ? RABIT_F32 : to_rabit_dtype(bias[l0].scalar_type()), K, in,
                                         ws_bytes ? ws.data_ptr() : nullptr, kern,
                                         at::cuda::getCurrentCUDAStream(), fusion ? &f : nullptr));
}

// The decode kernel packed_linear (fused: packed_linear_fused) runs for each layer, in kern; true where the layers
// agree on it and on K, so that one launch can run them all. Each layer's choice knows the rows of the whole call
// (launch_out: the persistent 1-bit kernel pays where the launch has enough tiles, not each layer alone).
bool layer_decode_kernels(const std::vector<int64_t> &K, int64_t M, int64_t in, const std::vector<int64_t> &out,
                          std::vector<rabit_cuda::DecodeKernel> &kern) {
    kern.resize(out.size());
    bool same = true;
    int64_t rows = 0;
    for (size_t l = 0; l < out.size() && l < static_cast<size_t>(rabit_cuda::kDecodeMaxLayers); l++) rows += out[l];
    for (size_t l = 0; l < out.size(); l++) {
        kern[l] = rabit_cuda::decode_kernel(static_cast<int>(K[l]), M, in, out[l], rows);
        same = same && K[l] == K[0] && kern[l] == kern[0];
    }
    return same;
}

}  // namespace

// Layers that take the decode path (fp16/bf16 x, M <= kDecodeMaxM), share K and the dtypes of g, h and bias, and take
// the same decode kernel run in groups of up to kDecodeMaxLayers as one launch (of the kernel and, for the MMA
// kernels, its prologue); any other call runs each layer as
// packed_linear does. Both give each layer's packed_linear output bit for bit (the kernels compute a row the same way
// whatever else the launch holds), so the choice changes the speed only.
std::vector<at::Tensor> packed_linear_group_cuda(const at::Tensor &x, at::TensorList packed, at::TensorList g,
                                                 at::TensorList h, at::TensorList bias) {
    const char *op = "rabit.packed_linear_group";
    const int64_t n = check_group_lists(op, packed, g, h, bias);
    std::vector<int64_t> K(n), out(n);
    for (int64_t l = 0; l < n; l++) {
        const auto dims =
            check_packed_linear_args(layer_op(op, l).c_str(), x, packed[l], g[l], h[l], layer_bias(bias, l));
        K[l] = dims.K;
        out[l] = dims.out;
    }
    const rabit_dtype xdt = to_rabit_dtype(x.scalar_type());
    const int64_t M = x.size(0), in = x.size(1);
    const c10::cuda::CUDAGuard guard(x.device());  // decode_kernel asks the current device
    // the decode kernel packed_linear would run for each layer: one launch only where they agree
    std::vector<rabit_cuda::DecodeKernel> kern;
    bool together = rabit_cuda::packed_linear_path(xdt, M) == 2 && M > 0 && n > 1 &&
                    layer_decode_kernels(K, M, in, out, kern);
    for (int64_t l = 1; l < n; l++)  // bias is every layer's or none (check_group_lists)
        together = together && g[l].scalar_type() == g[0].scalar_type() &&
                   h[l].scalar_type() == h[0].scalar_type() &&
                   (bias.empty() || bias[l].scalar_type() == bias[0].scalar_type());
    std::vector<at::Tensor> ys;
    if (!together) {
        for (int64_t l = 0; l < n; l++)
            ys.push_back(
                packed_linear_cuda_impl(layer_op(op, l).c_str(), x, packed[l], g[l], h[l], layer_bias(bias, l)));
        return ys;
    }
    for (int64_t l0 = 0; l0 < n; l0 += rabit_cuda::kDecodeMaxLayers)
        launch_decode_layers(x, packed, g, h, bias, l0,
                             static_cast<int>(std::min<int64_t>(n - l0, rabit_cuda::kDecodeMaxLayers)),
                             static_cast<int>(K[0]), out, kern[0], nullptr, ys);
    return ys;
}

namespace {

// The int8 activation class on CUDA (DECODE_B1P_I8, rabit_cuda.cuh) runs at this x for a layer of K paths.
void check_i8_cuda(const char *op, const at::Tensor &x, int64_t K, int64_t in) {
    TORCH_CHECK_TYPE(x.scalar_type() != at::kFloat, op, ": on CUDA the int8 activation class takes float16 or bfloat16 "
                     "x, got float32; convert x, or use rabit.packed_linear (float32-level accuracy)");
    TORCH_CHECK_VALUE(rabit_cuda::decode_i8_applies(1, in, static_cast<int>(K)), op, ": a layer of in=", in, " and K=",
                      K, " has int8 activation fragments larger than a block's shared memory on this device; use "
                      "rabit.packed_linear");
}

// packed_linear_fused (int8: packed_linear_fused_i8, whose layouts are the packed words on CUDA) on the decode kernels.
std::vector<at::Tensor> fused_cuda_impl(const char *op, const at::Tensor &x, at::TensorList packed, at::TensorList g,
                                        at::TensorList h, at::TensorList bias,
                                        const std::optional<at::Tensor> &norm_weight, double eps,
                                        const std::optional<at::Tensor> &up, const std::optional<at::Tensor> &residual,
                                        bool prefetch_weights, bool int8) {
    const int64_t n = check_group_lists(op, packed, g, h, bias);
    std::vector<int64_t> out(n);
    int64_t K = 0;
    for (int64_t l = 0; l < n; l++) {
        const auto dims =
            check_packed_linear_args(layer_op(op, l).c_str(), x, packed[l], g[l], h[l], layer_bias(bias, l));
        TORCH_CHECK_VALUE(l == 0 || dims.K == K, op, ": the layers must share K, got ", K, " and ", dims.K,
                          " (layer ", l, ")");
        TORCH_CHECK_TYPE(g[l].scalar_type() == g[0].scalar_type() && h[l].scalar_type() == h[0].scalar_type() &&
                             (bias.empty() || bias[l].scalar_type() == bias[0].scalar_type()),
                         op, ": the layers' g, h and bias must share their dtypes (one launch reads them all), but "
                         "layer ", l, " has ", g[l].scalar_type(), ", ", h[l].scalar_type(), " where layer 0 has ",
                         g[0].scalar_type(), ", ", h[0].scalar_type(), " (bias: compare them too); convert them to one "
                         "dtype, or call the op once per layer");
        K = dims.K;
        out[l] = dims.out;
    }
    check_fused_args(op, x, n, out[0], norm_weight, eps, up, residual);
    const int64_t M = x.size(0), in = x.size(1);
    if (M == 0) {  // nothing to compute: empty outputs, as on the CPU
        std::vector<at::Tensor> empty;
        for (int64_t l = 0; l < n; l++) empty.push_back(at::empty({0, out[l]}, x.options()));
        return empty;
    }
    TORCH_CHECK_TYPE(x.scalar_type() != at::kFloat, op, ": the CUDA kernels take float16 or bfloat16 x, got float32; "
                     "run the unfused ops (StaticDecoder(fused_glue=False))");
    TORCH_CHECK_VALUE(n <= rabit_cuda::kDecodeMaxLayers, op, ": at most ", rabit_cuda::kDecodeMaxLayers,
                      " layers a call, got ", n);
    TORCH_CHECK_VALUE(!int8 || M == 1, op, ": on CUDA the int8 activation class takes one row of x (decoding at "
                      "batch 1), got x ", x.sizes(), "; decode at batch 1, or without int8 activations");
    TORCH_CHECK_VALUE(M <= rabit_cuda::kFusedMaxM, op, ": the fused decode kernels take 1..", rabit_cuda::kFusedMaxM,
                      " rows of x, got x ", x.sizes(), "; run the unfused ops (StaticDecoder(fused_glue=False))");
    TORCH_CHECK_VALUE(!norm_weight.has_value() || in <= rabit_cuda::kFusedNormMaxIn, op, ": the fused RMSNorm takes at "
                      "most ", rabit_cuda::kFusedNormMaxIn, " columns, got x ", x.sizes(), "; run the unfused ops "
                      "(StaticDecoder(fused_glue=False))");
    const c10::cuda::CUDAGuard guard(x.device());  // decode_kernel asks the current device
    if (int8) check_i8_cuda(op, x, K, in);
    rabit_cuda::DecodeFusion f{};
    if (norm_weight.has_value()) {
        f.norm_weight = norm_weight->data_ptr();
        f.norm_dt = to_rabit_dtype(norm_weight->scalar_type());
    }
    f.eps = static_cast<float>(eps);
    f.up = up.has_value() ? up->data_ptr() : nullptr;
    f.residual = residual.has_value() ? residual->data_ptr() : nullptr;
    f.prefetch_weights = prefetch_weights;
    std::vector<rabit_cuda::DecodeKernel> kern(n, rabit_cuda::DECODE_B1P_I8);  // int8: the class's kernel, one launch
    const bool together = int8 || layer_decode_kernels(std::vector<int64_t>(n, K), M, in, out, kern);
    std::vector<at::Tensor> ys;
    if (together)
        launch_decode_layers(x, packed, g, h, bias, 0, static_cast<int>(n), static_cast<int>(K), out, kern[0], &f, ys);
    else
        for (int64_t l = 0; l < n; l++)
            launch_decode_layers(x, packed, g, h, bias, l, 1, static_cast<int>(K), out, kern[l], &f, ys);
    return ys;
}

}  // namespace

// The decode kernel packed_linear runs at this shape, with the glue fused in: one launch where the layers take the same
// kernel, else one a layer (each its own norm). Outside the fused kernels' bounds an error (the unfused ops are the
// way there), not a silent detour.
std::vector<at::Tensor> packed_linear_fused_cuda(const at::Tensor &x, at::TensorList packed, at::TensorList g,
                                                 at::TensorList h, at::TensorList bias,
                                                 const std::optional<at::Tensor> &norm_weight, double eps,
                                                 const std::optional<at::Tensor> &up,
                                                 const std::optional<at::Tensor> &residual,
                                                 bool prefetch_weights) {
    return fused_cuda_impl("rabit.packed_linear_fused", x, packed, g, h, bias, norm_weight, eps, up, residual,
                           prefetch_weights, false);
}

// The int8 activation class on CUDA: `layout` is the layer's packed words (the class's kernel reads them as they are;
// i8_layout on CUDA returns a copy), so a decoder passes its packed buffers themselves.
at::Tensor i8_layout_cuda(const at::Tensor &packed, int64_t in_features) {
    const char *op = "rabit.i8_layout";
    RABIT_CHECK_DIM(op, packed, 3);
    TORCH_CHECK_TYPE(packed.scalar_type() == at::kInt, op, ": expected packed to be int32, got ", packed.scalar_type());
    TORCH_CHECK_VALUE(in_features >= 1 && packed.size(2) == RABIT_WORDS(in_features), op, ": packed rows hold ",
                      packed.size(2), " words but in_features=", in_features, " needs ",
                      in_features >= 1 ? RABIT_WORDS(in_features) : 0);
    return packed.clone(at::MemoryFormat::Contiguous);
}

// One launch per row of x: the class is defined per row, and its kernel takes one (decoding at batch 1).
at::Tensor packed_linear_i8_cuda(const at::Tensor &x, const at::Tensor &layout, const at::Tensor &g,
                                 const at::Tensor &h, const std::optional<at::Tensor> &bias) {
    const char *op = "rabit.packed_linear_i8";
    TORCH_CHECK_VALUE(layout.dim() == 3, op, ": on CUDA the layout is the packed words [K, out, words] "
                      "(rabit.i8_layout of packed words on the GPU), got a ", layout.dim(), "-D layout");
    const auto [K, out, in] = check_packed_linear_args(op, x, layout, g, h, bias);
    const int64_t M = x.size(0);
    if (M == 0) return at::empty({0, out}, x.options());
    const c10::cuda::CUDAGuard guard(x.device());
    check_i8_cuda(op, x, K, in);
    const at::TensorList b = bias.has_value() ? at::TensorList(*bias) : at::TensorList();
    std::vector<at::Tensor> ys;
    for (int64_t m = 0; m < M; m++)
        launch_decode_layers(x.narrow(0, m, 1), at::TensorList(layout), at::TensorList(g), at::TensorList(h), b, 0, 1,
                             static_cast<int>(K), {out}, rabit_cuda::DECODE_B1P_I8, nullptr, ys);
    return M == 1 ? ys[0] : at::cat(ys);
}

std::vector<at::Tensor> packed_linear_fused_i8_cuda(const at::Tensor &x, at::TensorList layout, at::TensorList g,
                                                    at::TensorList h, at::TensorList bias,
                                                    const std::optional<at::Tensor> &norm_weight, double eps,
                                                    const std::optional<at::Tensor> &up,
                                                    const std::optional<at::Tensor> &residual) {
    return fused_cuda_impl("rabit.packed_linear_fused_i8", x, layout, g, h, bias, norm_weight, eps, up, residual,
                           false, true);
}

at::Tensor decode_attention_cuda(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, at::Tensor &k_cache,
                                 at::Tensor &v_cache, const at::Tensor &cos, const at::Tensor &sin,
                                 const at::Tensor &pos, double scale) {
    const char *op = "rabit.decode_attention";
    const auto d = check_decode_attention_args(op, q, k, v, k_cache, v_cache, cos, sin, pos, scale);
    const rabit_dtype dt = to_rabit_dtype(q.scalar_type());
    const char *why = rabit_cuda::decode_attention_unsupported(dt, static_cast<int>(d.H / d.Hkv),
                                                               static_cast<int>(d.D));
    TORCH_CHECK_VALUE(!why, op, ": the CUDA kernel does not support ", why, " (q ", q.sizes(), ", k ", k.sizes(), ", ",
                      q.scalar_type(), "); run the attention unfused (StaticDecoder(fused_attention=False))");
    for (const at::Tensor *t : {&k_cache, &v_cache})
        TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, op,
                          ": the caches must start at a 16-byte aligned address (the kernel reads rows in 16-byte "
                          "pieces); allocate them as tensors of their own");
    TORCH_CHECK_VALUE(d.S <= INT32_MAX && d.B <= 65535 && d.Hkv <= 65535, op, ": too large: B=", d.B, ", Hkv=", d.Hkv,
                      ", S=", d.S);
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor out = at::empty({d.B, d.H, d.D}, q.options());
    const rabit_cuda::AttnSplit sp = rabit_cuda::decode_attention_split(d.S, d.B * d.Hkv);
    TORCH_CHECK_VALUE(!sp.error, op, ": ", sp.error);
    const bool counter = sp.splits > 1 && !sp.cluster;  // blocks combine through device memory and a counter
    at::Tensor part = at::empty({counter ? sp.splits * d.B * d.H * (d.D + 2) : 1}, q.options().dtype(at::kFloat));
    at::Tensor count = at::empty({counter ? d.B * d.Hkv : 1}, q.options().dtype(at::kInt));
    if (counter)  // the blocks' arrival counters start at zero (a memset node in a graph)
        C10_CUDA_CHECK(cudaMemsetAsync(count.data_ptr(), 0, count.nbytes(), stream));
    rabit_cuda::AttnTensors t;
    t.q = q.data_ptr(), t.k = k.data_ptr(), t.v = v.data_ptr();
    t.q_b = q.stride(0), t.q_h = q.stride(1), t.k_b = k.stride(0), t.k_h = k.stride(1), t.v_b = v.stride(0),
    t.v_h = v.stride(1);
    t.k_cache = k_cache.data_ptr(), t.v_cache = v_cache.data_ptr(), t.cos = cos.data_ptr(), t.sin = sin.data_ptr();
    t.pos = pos.data_ptr<int64_t>(), t.out = out.data_ptr();
    check_launch(rabit_cuda::decode_attention(t, dt, static_cast<int>(d.B), static_cast<int>(d.H),
                                              static_cast<int>(d.Hkv), static_cast<int>(d.D), static_cast<int>(d.S),
                                              static_cast<float>(scale), sp, part.data_ptr<float>(),
                                              count.data_ptr<int>(), stream));
    return out;
}

TORCH_LIBRARY_IMPL(rabit, CUDA, m) {
    m.impl("residual_binarize", &residual_binarize_cuda);
    m.impl("residual_binarize_backward", &residual_binarize_backward_cuda);
    m.impl("scale_grads", &scale_grads_cuda);
    m.impl("decode_attention", &decode_attention_cuda);
    m.impl("pack_signs", &pack_signs_cuda);
    m.impl("unpack_signs", &unpack_signs_cuda);
    m.impl("dequantize", &dequantize_cuda);
    m.impl("packed_linear", &packed_linear_cuda);
    m.impl("packed_linear_group", &packed_linear_group_cuda);
    m.impl("packed_linear_fused", &packed_linear_fused_cuda);
    m.impl("i8_layout", &i8_layout_cuda);
    m.impl("packed_linear_i8", &packed_linear_i8_cuda);
    m.impl("packed_linear_fused_i8", &packed_linear_fused_i8_cuda);
}

}  // namespace rabit
