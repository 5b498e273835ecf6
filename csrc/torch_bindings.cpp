// The rabit operator library: every schema in one place, plus the bare Python module `rabit._C`
// (no pybind11). Implementations live in ops_cpu.cpp and, in CUDA builds, cuda/ops_cuda.cu;
// fake kernels and autograd are registered from Python (rabit/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include <cstring>

#include "../kernels/rabit_format.h"
#include "../kernels/rabit_kernels.h"

#ifndef RABIT_SOURCE_HASH
#define RABIT_SOURCE_HASH "unknown"
#endif

TORCH_LIBRARY(rabit, m) {
    // Coupled residual binarization: (Ŵ = Σ_k g_k⊙B_k⊙h_k in out_dtype (default: weight's), packed planes).
    // ste/ste_param do not change the forward; they choose the straight-through estimator of its backward.
    // check_finite=false: no error for NaN/Inf in weight, g or h; the kernels compute on (a NaN latent entry
    // takes the sign -1). On CUDA the check costs a device synchronisation per call; the trainer turns it off.
    m.def(
        "residual_binarize(Tensor weight, Tensor g, Tensor h, ScalarType? out_dtype=None, str ste=\"identity\", "
        "float ste_param=1.0, bool check_finite=True) -> (Tensor, Tensor)");
    // One pass over grad = ∂L/∂Ŵ: (dW via the straight-through estimator, dg, dh) with signs from packed.
    m.def(
        "residual_binarize_backward(Tensor grad, Tensor weight, Tensor g, Tensor h, Tensor packed, "
        "str ste=\"identity\", float ste_param=1.0) -> (Tensor, Tensor, Tensor)");
    // (dg, dh) of residual_binarize_backward alone, without dW: with the identity STE and a float32 weight, dW is
    // grad itself (in float32), so a caller that has grad in float32 needs only these two reductions.
    m.def("scale_grads(Tensor grad, Tensor g, Tensor h, Tensor packed) -> (Tensor, Tensor)");
    // Pack a [..., in] tensor of signs (bit = value >= 0) into int32 words [..., ceil(in/32)].
    m.def("pack_signs(Tensor signs) -> Tensor");
    // Unpack int32 words [..., words] into ±1 of the given dtype (default float32), [..., in_features].
    m.def("unpack_signs(Tensor packed, int in_features, ScalarType? dtype=None) -> Tensor");
    // Ŵ = Σ_k g_k ⊙ B_k ⊙ h_k [out, in] from the planes [K, out, words] and g [K, out], h [K, in], in dtype (default
    // float32), with residual_binarize's arithmetic: its Ŵ bit for bit for the planes it wrote.
    m.def("dequantize(Tensor packed, Tensor g, Tensor h, ScalarType? dtype=None) -> Tensor");
    // y = Σ_k g_k ⊙ (B_k (h_k ⊙ x)) + bias for x [M, in] straight from the packed planes.
    m.def("packed_linear(Tensor x, Tensor packed, Tensor g, Tensor h, Tensor? bias=None) -> Tensor");
    // packed_linear of several layers that read the same x (q/k/v, gate/up): output l is packed_linear(x, packed[l],
    // g[l], h[l], bias[l]) bit for bit; on CUDA a decode-size x runs the layers in one launch of the decode kernels.
    // bias: one per layer, or empty for none (not Tensor?[]: torch.library's autograd does not reach tensors in a
    // list that holds None, so their gradients would be lost silently).
    m.def("packed_linear_group(Tensor x, Tensor[] packed, Tensor[] g, Tensor[] h, Tensor[] bias) -> Tensor[]");
    // packed_linear on int8 activations (CPU only; an opt-in accuracy class, kernels/cpu/packed_linear_i8.c): x*h
    // as int8 tables per 128 columns, read against `layout`, the packed words rearranged once by i8_layout
    m.def("i8_layout(Tensor packed, int in_features) -> Tensor");
    m.def("packed_linear_i8(Tensor x, Tensor layout, Tensor g, Tensor h, Tensor? bias=None) -> Tensor");
    m.def(
        "packed_linear_fused_i8(Tensor x, Tensor[] layout, Tensor[] g, Tensor[] h, Tensor[] bias, Tensor? norm_weight, "
        "float eps, Tensor? up, Tensor? residual) -> Tensor[]");
    // A dense linear on int8 weights and int8 activations (CPU only, kernels/cpu/int8_linear.c): llama.cpp's Q8_0
    // kind, a scale per row and 32 columns, for a packed model's dense LM head. int8_weight quantizes a weight
    // [out, in] once into (qweight int8 [groups, nb, 8, 32], scales float32 [groups, nb, 8]): groups of 8 rows,
    // nb blocks of 32 columns; int8_linear quantizes x the same way per row and computes y = x W^T (+ bias) from the
    // blocks' exact integer dots, in x's dtype.
    m.def("int8_weight(Tensor weight) -> (Tensor, Tensor)");
    m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, int out_features, Tensor? bias=None) -> Tensor");
    // A decoder's glue fused into packed_linear_group, for decoding (no autograd): the layers read u = silu(x) * up
    // where up is given (else x), RMS-normalised as HF's RMSNorm where norm_weight is given (u * rsqrt(mean(u^2) +
    // eps) * norm_weight, in float32, not rounded); output l = packed_linear(u, layer l), plus residual (a single
    // layer only), rounded once to x's dtype. On CUDA the decode kernel packed_linear runs at that shape, with the
    // glue inside (fp16/bf16 x, M <= 4; an error elsewhere). prefetch_weights: on CUDA the CUDA-core kernel reads the
    // layers' parameters (packed, g, h, bias, norm_weight) before the kernel before it in the stream has finished
    // (programmatic dependent launch): only for parameters that kernel does not write, such as a decoder's weights.
    m.def(
        "packed_linear_fused(Tensor x, Tensor[] packed, Tensor[] g, Tensor[] h, Tensor[] bias, Tensor? norm_weight, "
        "float eps, Tensor? up, Tensor? residual, bool prefetch_weights=False) -> Tensor[]");
    // One decoding step of attention (a new token per row, every row at cache position pos): writes rope(k) and v
    // into the caches at pos and returns softmax(scale * rope(q) K^T) V over positions 0..pos, [B, H, D]; grouped-
    // query heads (H a multiple of Hkv); HF's rotate_half rotary with cos/sin rows [P, D]. For inference: no autograd.
    m.def(
        "decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, "
        "Tensor sin, Tensor pos, float scale) -> Tensor");
    // A decode step's decoder layers in one call (CPU only; StaticDecoder's fused-glue step): per layer the calls the
    // decoder otherwise makes one by one (packed_linear_fused or, int8, packed_linear_fused_i8 of q/k/v on the input
    // norm, decode_attention, o_proj + residual, gate/up on the post-attention norm, down_proj of silu(gate) * up +
    // residual), bit for bit theirs; returns the residual stream after the last layer. weights: per layer the input
    // and post-attention norms' weights, then (packed or i8 layout, g, h) of q, k, v, o, gate, up, down; bias: empty
    // or 7 per layer (an empty tensor for none); eps: 2 per layer; caches [layers, B, Hkv, S, D], written at pos.
    m.def(
        "decode_layers(Tensor x, Tensor[] weights, Tensor[] bias, float[] eps, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cos, Tensor sin, Tensor pos, int n_heads, float scale, bool int8) -> Tensor");
}

static PyObject *rabit_py_set_cpu_kernel(PyObject *, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return nullptr;
    rabit_cpu_kernel k;
    if (rabit_cpu_kernel_from_name(name, &k) != RABIT_OK) {
        PyErr_Format(PyExc_ValueError, "rabit.set_cpu_kernel: unknown kernel '%s'; use " RABIT_CPU_KERNEL_NAMES, name);
        return nullptr;
    }
    if (rabit_cpu_set_kernel(k) != RABIT_OK) {
        PyErr_Format(PyExc_RuntimeError, "rabit.set_cpu_kernel: this CPU cannot run the '%s' kernel", name);
        return nullptr;
    }
    Py_RETURN_NONE;
}

static PyObject *rabit_py_cpu_kernel(PyObject *, PyObject *) {
    return PyUnicode_FromString(rabit_cpu_active_kernel_name());
}

#ifdef RABIT_WITH_CUDA
#include "../kernels/cuda/rabit_cuda.cuh"

// Which prefill kernel (and k-split) packed_linear takes on the current CUDA device for fp16/bf16 x [M, in] with
// 16-byte-aligned rows, as ("wgmma" | "mma", splits); ValueError where a RABIT_CUDA_PREFILL* setting cannot hold.
static PyObject *rabit_py_cuda_prefill_plan(PyObject *, PyObject *args) {
    long long M = 0, out = 0, in = 0;
    if (!PyArg_ParseTuple(args, "LLL", &M, &out, &in)) return nullptr;
    const rabit_cuda::PrefillPlan p = rabit_cuda::prefill_plan(M, out, in, true, true);
    if (p.error) {
        PyErr_SetString(PyExc_ValueError, p.error);
        return nullptr;
    }
    return Py_BuildValue("(si)", p.kernel == rabit_cuda::PREFILL_WGMMA ? "wgmma" : "mma", p.splits);
}

// The bounds of rabit.packed_linear_fused on CUDA, (most rows of x, most columns with a norm): what StaticDecoder asks
// before it fuses its glue.
static PyObject *rabit_py_cuda_fused_bounds(PyObject *, PyObject *) {
    return Py_BuildValue("(iL)", rabit_cuda::kFusedMaxM, static_cast<long long>(rabit_cuda::kFusedNormMaxIn));
}

// Why the CUDA decode_attention kernel cannot run float dtype code dt (0 float32, 1 float16, 2 bfloat16) with G
// query heads per KV head and head dimension D, or None: what StaticDecoder asks before it fuses its attention.
static PyObject *rabit_py_cuda_attention_unsupported(PyObject *, PyObject *args) {
    int dt = 0, G = 0, D = 0;
    if (!PyArg_ParseTuple(args, "iii", &dt, &G, &D)) return nullptr;
    const char *why = rabit_cuda::decode_attention_unsupported(static_cast<rabit_dtype>(dt), G, D);
    if (!why) Py_RETURN_NONE;
    return PyUnicode_FromString(why);
}

// Whether the CUDA int8 activation class (rabit.packed_linear_i8 / packed_linear_fused_i8) can run one row of a layer of
// `in` columns and K paths on the current GPU (its fragments fit a block's shared memory): what StaticDecoder asks
// before it takes int8_activations on CUDA.
static PyObject *rabit_py_cuda_int8_applies(PyObject *, PyObject *args) {
    long long in = 0;
    int K = 0;
    if (!PyArg_ParseTuple(args, "Li", &in, &K)) return nullptr;
    return PyBool_FromLong(rabit_cuda::decode_i8_applies(1, in, K));
}
#endif

static PyMethodDef rabit_methods[] = {
    {"set_cpu_kernel", rabit_py_set_cpu_kernel, METH_O, "Force the CPU packed-GEMV kernel: " RABIT_CPU_KERNEL_NAMES "."},
    {"cpu_kernel", rabit_py_cpu_kernel, METH_NOARGS, "The CPU packed-GEMV kernel in use."},
#ifdef RABIT_WITH_CUDA
    {"cuda_prefill_plan", rabit_py_cuda_prefill_plan, METH_VARARGS,
     "cuda_prefill_plan(M, out, in) -> (kernel, splits): the prefill GEMM packed_linear runs on the current GPU."},
    {"cuda_fused_bounds", rabit_py_cuda_fused_bounds, METH_NOARGS,
     "cuda_fused_bounds() -> (most rows of x, most columns with a norm) that packed_linear_fused takes on CUDA."},
    {"cuda_attention_unsupported", rabit_py_cuda_attention_unsupported, METH_VARARGS,
     "cuda_attention_unsupported(dtype_code, G, D) -> why the CUDA decode_attention kernel cannot run, or None."},
    {"cuda_int8_applies", rabit_py_cuda_int8_applies, METH_VARARGS,
     "cuda_int8_applies(in, K) -> whether the CUDA int8 activation class runs a layer of in columns, K paths here."},
#endif
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef rabit_module = {PyModuleDef_HEAD_INIT, "_C", "rabit operator library", -1, rabit_methods};

extern "C" PyObject *PyInit__C(void) {
    PyObject *m = PyModule_Create(&rabit_module);
    if (!m) return nullptr;
    PyModule_AddIntConstant(m, "FORMAT_VERSION", RABIT_FORMAT_VERSION);
    PyModule_AddIntConstant(m, "CPU_GEMM_MIN_ROWS", RABIT_CPU_GEMM_MIN_ROWS);
    PyModule_AddStringConstant(m, "SOURCE_HASH", RABIT_SOURCE_HASH);
#ifdef RABIT_TORCH_VERSION
    PyModule_AddStringConstant(m, "TORCH_VERSION", RABIT_TORCH_VERSION);
#endif
#ifdef RABIT_WITH_CUDA
    PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
    PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
#ifdef RABIT_SM90A
    PyModule_AddIntConstant(m, "WITH_SM90A", 1);  // the wgmma prefill kernel is built (packed_prefill.cu)
#else
    PyModule_AddIntConstant(m, "WITH_SM90A", 0);
#endif
    return m;
}
