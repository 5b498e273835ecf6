"""Loading of the compiled extensions with clear errors when one is missing, stale (built from
other native sources than those in the checkout) or built against another torch."""

from __future__ import annotations

import importlib
from pathlib import Path

from ._source_hash import source_hash

REBUILD = "pip install --no-build-isolation -e .  (in the rabit checkout, after `pip install torch==2.13.0`)"
CHECKOUT = Path(__file__).resolve().parent.parent


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def load_extension(name: str):
    """Import ``rabit.<name>`` and check it was built from the sources present (editable installs)."""
    try:
        ext = importlib.import_module(f"rabit.{name}")
    except ImportError as e:
        raise ImportError(
            f"rabit: the compiled extension rabit.{name} is missing or does not load ({e}). Rebuild it with: {REBUILD}"
        ) from None  # the message carries the cause; its chained traceback would bury the fix
    if (CHECKOUT / "kernels").is_dir() and (CHECKOUT / "csrc").is_dir():
        here = source_hash(CHECKOUT)
        if ext.SOURCE_HASH != here:
            raise ImportError(
                f"rabit: the compiled extension rabit.{name} is stale: it was built from native sources with hash "
                f"{ext.SOURCE_HASH}, but {CHECKOUT} now has {here}. Rebuild it with: {REBUILD}"
            )
    return ext


def load_torch_extension():
    import torch

    ext = load_extension("_C")
    built = getattr(ext, "TORCH_VERSION", None)
    if built and _minor(built) != _minor(torch.__version__):
        raise ImportError(
            f"rabit: rabit._C was built against torch {built} but torch {torch.__version__} is installed; "
            f"rebuild it with: {REBUILD}"
        )
    return ext
