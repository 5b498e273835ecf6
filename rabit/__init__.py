"""rabit: RaBiT residual-aware binarization training for 2-bit LLMs (arXiv 2602.05367).

Each nn.Linear becomes K (default 2) stacked binary paths ``g_k ⊙ B_k ⊙ h_k`` derived from ONE
latent weight by the coupled residual chain, trained by distillation, then packed to ~2 bits per
weight and run by matmul-free kernels.
"""

try:
    import torch  # noqa: F401  (rabit._C needs torch's symbols loaded first)
except ImportError:  # the torch-free parts (rabit._core, rabit.runtime) still work
    torch = None

__version__ = "0.1.0"

if torch is None:

    _TORCH_FREE = ("_core", "runtime")

    def __getattr__(name):
        if name in _TORCH_FREE:  # `from rabit import _core` looks the attribute up before the submodule
            import importlib

            return importlib.import_module(f"rabit.{name}")
        raise ImportError(f"rabit.{name} needs PyTorch, which is not installed (pip install torch==2.13.0); "
                          "without torch only rabit._core and rabit.runtime are available")

else:
    from ._torch_api import *  # noqa: F401,F403
    from ._torch_api import __all__  # noqa: F401
