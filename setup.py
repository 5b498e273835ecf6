"""Build of rabit's two native extensions over the same torch-free C kernels (kernels/):

  rabit._C     PyTorch operator library (csrc/ glue; CUDA kernels when torch has CUDA and nvcc exists)
  rabit._core  CPython + NumPy C-API module, usable without torch

Install with `pip install --no-build-isolation -e .` after `pip install torch==2.13.0` (see README).

Build toggles (environment):
  RABIT_NO_CUDA=1     never build CUDA kernels
  RABIT_FORCE_CUDA=1  build CUDA kernels even if torch reports no CUDA (needs nvcc + CUDA torch headers)
  TORCH_CUDA_ARCH_LIST  GPU targets (default "8.0;9.0a"; 9.0a, H100/H200, enables the wgmma prefill kernel)
  DEBUG=1             -O0 -g
"""

import os
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent

try:
    import numpy
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # --no-build-isolation: the build uses what is installed
    sys.exit(f"rabit setup: {e.name} is not installed; run `pip install torch==2.13.0 numpy` first, then "
             "`pip install --no-build-isolation -e .`")

SOURCE_HASH = runpy.run_path(str(ROOT / "rabit" / "_source_hash.py"))["source_hash"](ROOT)
DEBUG = os.environ.get("DEBUG") == "1"
OPT = ["-O0", "-g"] if DEBUG else ["-O3"]
# -ffp-contract=off: the residual chain must not be fused into FMAs, or signs differ from the
# reference. No -march=native: SIMD kernels are picked at run time from the CPU's features.
C_FLAGS = OPT + ["-std=c11", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
CXX_FLAGS = OPT + ["-ffp-contract=off", "-fopenmp"]
DEFINES = [("RABIT_SOURCE_HASH", f'"{SOURCE_HASH}"')]


def rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


KERNEL_C = rel((ROOT / "kernels" / "cpu").glob("*.c"))
KERNEL_CU = rel((ROOT / "kernels" / "cuda").glob("*.cu"))
GLUE_CU = rel((ROOT / "csrc" / "cuda").glob("*.cu"))


def want_cuda():
    if os.environ.get("RABIT_NO_CUDA") == "1":
        return False, "RABIT_NO_CUDA=1"
    if os.environ.get("RABIT_FORCE_CUDA") == "1":
        return True, "RABIT_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found"
    if not KERNEL_CU:
        return False, "no CUDA sources in kernels/cuda"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME}"


def torch_cxx_runtime():
    """Path of the C++ runtime (libstdc++) the imported torch runs with, from this process's memory map (Linux), or
    None. rabit._C is linked against that file by path. Otherwise a compiler whose own directory has only a static
    libstdc++.a (seen on a GPU machine: CXX=/opt/gcc/bin/g++) links a private copy of the C++ runtime into the
    extension; its iostreams and locale are never initialised in a process whose torch uses the shared one, and the
    first error message that formats an integer (every shape check) crashed the process with SIGSEGV."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and "/libstdc++.so" in fields[5]:
                    return fields[5]
    except OSError:
        pass
    return None


CXX_RUNTIME = torch_cxx_runtime()
LINK_ARGS = ["-fopenmp"] + ([CXX_RUNTIME] if CXX_RUNTIME else [])
use_cuda, why = want_cuda()
print(f"rabit setup: building rabit._C {'with' if use_cuda else 'without'} CUDA ({why}); source hash {SOURCE_HASH}; "
      f"C++ runtime {CXX_RUNTIME or 'as the compiler links it (torch loaded none that /proc/self/maps shows)'}")

# The C kernels are compiled once, as C11, into a static library linked into both extensions.
libraries = [("rabit_kernels", {"sources": KERNEL_C, "cflags": C_FLAGS + ["-fPIC"], "macros": DEFINES})]

torch_sources = rel((ROOT / "csrc").glob("*.cpp"))
torch_defines = DEFINES + [("RABIT_TORCH_VERSION", f'"{torch.__version__}"')]
if use_cuda:
    # 9.0a (not plain 9.0): the prefill GEMM's wgmma instructions exist only in the arch-specific sm_90a target
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    if "9.0a" in [a.split("+")[0] for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")]:
        torch_defines = torch_defines + [("RABIT_SM90A", "1")]
    torch_ext = CUDAExtension(
        "rabit._C",
        torch_sources + KERNEL_CU + GLUE_CU,
        define_macros=torch_defines + [("RABIT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": OPT + ["--fmad=false", "-lineinfo", "--expt-relaxed-constexpr"]},
        extra_link_args=LINK_ARGS,
    )
else:
    torch_ext = CppExtension(
        "rabit._C",
        torch_sources,
        define_macros=torch_defines,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_ARGS,
    )

from setuptools import Extension  # noqa: E402
from setuptools.command.build_ext import build_ext as setuptools_build_ext  # noqa: E402

core_ext = Extension(
    "rabit._core",
    ["csrc/core_module.c"],
    include_dirs=[numpy.get_include()],
    define_macros=DEFINES,
    extra_compile_args=C_FLAGS,
    extra_link_args=["-fopenmp"],
)

class BuildExt(BuildExtension):
    """torch's BuildExtension for rabit._C; setuptools' own build for rabit._core. With ninja, torch's build compiles
    every non-CUDA source with the C++ compiler, which would make the C-API module's C source C++ (and its C11 flags
    invalid); that module needs no torch, so it is built first, with the C compiler, before torch wraps it."""

    def build_extensions(self):
        everything = self.extensions
        try:
            self.extensions = [e for e in everything if e is core_ext]
            setuptools_build_ext.build_extensions(self)
            self.extensions = [e for e in everything if e is not core_ext]
            super().build_extensions()
        finally:
            self.extensions = everything


setup(
    libraries=libraries,
    ext_modules=[torch_ext, core_ext],
    # ninja (when installed) compiles the CUDA files in parallel; without it they build one by one
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)},
)
