"""The PyTorch API of rabit, imported by ``rabit/__init__`` when torch is installed."""

from ._load import load_torch_extension

_C = load_torch_extension()

from . import reference  # noqa: E402
from ._ops import (  # noqa: E402
    decode_attention,
    dequantize,
    i8_layout,
    pack_signs,
    packed_linear,
    packed_linear_fused,
    packed_linear_fused_i8,
    packed_linear_group,
    packed_linear_i8,
    int8_linear,
    int8_weight,
    qat_linear,
    residual_binarize,
    residual_binarize_backward,
    scale_grads,
    unpack_signs,
)
from .nn import IndependentRaBiTLinear, PackedRaBiTLinear, RaBiTLinear  # noqa: E402
from .quantize import RabitConfig, convert_, quantize_  # noqa: E402

FORMAT_VERSION = _C.FORMAT_VERSION

# AutoModelForCausalLM.from_pretrained(<rabit dir>) works after `import rabit`; transformers is not imported here.
from .hf_quantizer import install_lazy_registration  # noqa: E402

install_lazy_registration()


#: Rows of x from which the CPU packed linear multiplies by Ŵ dequantized tile by tile in a float32 GEMM (BLAS)
#: instead of the table kernels, under ``set_cpu_kernel("auto")``.
CPU_GEMM_MIN_ROWS = _C.CPU_GEMM_MIN_ROWS


#: The names :func:`set_cpu_kernel` takes (the C core's table of them; tests hold the two together): ``"auto"``,
#: the table kernels narrowest first, and the dequantized GEMM.
CPU_KERNELS = ("auto", "ref", "avx2", "avx512", "gemm")


def set_cpu_kernel(name: str) -> None:
    """Choose the torch ops' CPU packed GEMV/GEMM (for the whole process; the NumPy module has its own setting,
    ``rabit._core.set_cpu_kernel``): ``"auto"`` (default: the best table kernel below :data:`CPU_GEMM_MIN_ROWS` rows
    of x, the dequantized GEMM from there), or one implementation at every M: the table kernels ``"ref"`` (scalar),
    ``"avx2"`` and ``"avx512"`` (bit-identical to each other), or ``"gemm"``. RuntimeError if this CPU lacks the
    instructions."""
    _C.set_cpu_kernel(name)


def cpu_kernel() -> str:
    """The table kernel ``"auto"`` runs below :data:`CPU_GEMM_MIN_ROWS` rows (the widest of ``"avx512"``,
    ``"avx2"``, ``"ref"`` this CPU runs), or the implementation forced by :func:`set_cpu_kernel`."""
    return _C.cpu_kernel()


__all__ = [
    "CPU_GEMM_MIN_ROWS",
    "CPU_KERNELS",
    "FORMAT_VERSION",
    "IndependentRaBiTLinear",
    "PackedRaBiTLinear",
    "RaBiTLinear",
    "RabitConfig",
    "convert_",
    "cpu_kernel",
    "decode_attention",
    "dequantize",
    "i8_layout",
    "pack_signs",
    "packed_linear",
    "packed_linear_fused",
    "packed_linear_fused_i8",
    "packed_linear_group",
    "packed_linear_i8",
    "int8_linear",
    "int8_weight",
    "qat_linear",
    "quantize_",
    "reference",
    "residual_binarize",
    "residual_binarize_backward",
    "scale_grads",
    "set_cpu_kernel",
    "unpack_signs",
]
