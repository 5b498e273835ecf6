"""rabit: RaBiT residual-aware binarization training for 2-bit LLMs (arXiv 2602.05367).

Each nn.Linear becomes K (default 2) stacked binary paths ``g_k ⊙ B_k ⊙ h_k`` derived from ONE
latent weight by the coupled residual chain, trained by distillation, then packed to ~2 bits per
weight and run by matmul-free kernels.
"""

import torch  # noqa: F401  (rabit._C needs torch's symbols loaded first)

from ._load import load_torch_extension

_C = load_torch_extension()

from . import reference  # noqa: E402
from ._ops import (  # noqa: E402
    pack_signs,
    packed_linear,
    residual_binarize,
    residual_binarize_backward,
    unpack_signs,
)
from .nn import PackedRaBiTLinear, RaBiTLinear  # noqa: E402
from .quantize import RabitConfig, convert_, quantize_  # noqa: E402

FORMAT_VERSION = _C.FORMAT_VERSION
__version__ = "0.1.0"


def set_cpu_kernel(name: str) -> None:
    """Force the CPU packed GEMV/GEMM implementation: ``"auto"`` (default), ``"ref"`` or ``"avx2"``."""
    _C.set_cpu_kernel(name)


def cpu_kernel() -> str:
    """The CPU packed GEMV/GEMM implementation in use."""
    return _C.cpu_kernel()


__all__ = [
    "FORMAT_VERSION",
    "PackedRaBiTLinear",
    "RaBiTLinear",
    "RabitConfig",
    "convert_",
    "cpu_kernel",
    "pack_signs",
    "packed_linear",
    "quantize_",
    "reference",
    "residual_binarize",
    "residual_binarize_backward",
    "set_cpu_kernel",
    "unpack_signs",
]
