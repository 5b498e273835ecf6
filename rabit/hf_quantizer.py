"""Hugging Face integration: once ``quant_method: "rabit"`` is registered,

    AutoModelForCausalLM.from_pretrained(exported_dir)

loads a rabit export without ``trust_remote_code``: transformers reads the quantization_config from
config.json, builds the model on the meta device, and ``RabitHfQuantizer`` swaps the listed
``quantized_modules`` for :class:`rabit.nn.PackedRaBiTLinear` before the weights are loaded into their
``packed`` / ``g`` / ``h`` buffers (the loader keeps each buffer's dtype, so the scales stay float16).
Registration uses the public ``register_quantization_config`` / ``register_quantizer`` hooks of
``transformers.quantizers.auto``.

* :func:`register` registers now (imports transformers, ~1 s); ``import rabit.export`` calls it.
* :func:`install_lazy_registration` registers the moment ``transformers.quantizers.auto`` is first
  imported (immediately if it already is), so ``import rabit`` can enable it without importing
  transformers. This module itself imports neither transformers nor torch at import time.

transformers' loader is more lenient than :func:`rabit.export.from_pretrained` (it warns about missing
tensors instead of failing), so the quantizer re-checks after loading that every packed layer was
filled from the file and that no scale is NaN/Inf.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from typing import Any

from .runtime.format import (
    BITS_ORDER,
    FORMAT_VERSION,
    PACKED_DTYPE,
    QUANT_METHOD,
    SCALE_DTYPE,
    WORD_BITS,
    ExportFormatError,
    validate_quantization_config,
)

__all__ = ["RabitHfQuantizer", "RabitQuantConfig", "install_lazy_registration", "register"]  # noqa: F822 (lazy)

_AUTO = "transformers.quantizers.auto"
_CLASSES: dict[str, type] = {}


def _build_classes() -> dict[str, type]:
    """Define the config and quantizer classes (needs transformers and torch)."""
    if _CLASSES:
        return _CLASSES
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .nn import PackedRaBiTLinear

    class RabitQuantConfig(QuantizationConfigMixin):
        """``quantization_config`` of a rabit export (schema: :mod:`rabit.runtime.format`).

        Only loading pre-packed models is supported: rabit quantizes by QAT (``rabit.quantize_`` +
        training), which cannot happen inside ``from_pretrained``.
        """

        def __init__(self, k: int = 2, quantized_modules: list[str] | None = None,
                     modules_to_not_convert: list[str] | None = None, format_version: int = FORMAT_VERSION,
                     scale_dtype: str = SCALE_DTYPE, packed_dtype: str = PACKED_DTYPE, bits_order: str = BITS_ORDER,
                     word_bits: int = WORD_BITS, tokenizer: dict | None = None, bits: int | None = None,
                     quant_method: str = QUANT_METHOD, **kwargs: Any):
            self.quant_method = quant_method
            self.format_version = format_version
            self.k = k
            self.bits = k if bits is None else bits
            self.quantized_modules = list(quantized_modules or [])
            self.modules_to_not_convert = list(modules_to_not_convert or [])
            self.scale_dtype = scale_dtype
            self.packed_dtype = packed_dtype
            self.bits_order = bits_order
            self.word_bits = word_bits
            self.tokenizer = tokenizer
            for key, value in kwargs.items():  # keep unknown (optional) keys on a round trip
                setattr(self, key, value)
            self.post_init()

        def post_init(self) -> None:
            validate_quantization_config(self.to_dict(), "quantization_config")

        def to_dict(self) -> dict[str, Any]:
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    class RabitHfQuantizer(HfQuantizer):
        """Loads rabit exports in ``from_pretrained``: swaps the quantized nn.Linear layers for packed ones."""

        requires_calibration = True  # only pre-packed checkpoints: quantizing needs rabit's QAT

        def validate_environment(self, *args, **kwargs) -> None:
            if not self.pre_quantized:
                raise ValueError("rabit: quantizing inside from_pretrained is not supported; quantize with "
                                 "rabit.quantize_ + training, pack with rabit.convert_, and export with "
                                 "rabit.export.save_pretrained")
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise ValueError("rabit: disk offload is not supported for packed RaBiT layers")

        def _process_model_before_weight_loading(self, model, **kwargs):
            from pathlib import Path

            from .export import WEIGHTS_NAME, expected_tensors, replace_linears, validate_weights_file

            replace_linears(model, self.quantization_config.quantized_modules, self.quantization_config.k)
            # transformers only warns about missing or unexpected tensors (a layer left out of quantized_modules
            # would come up as a randomly initialised nn.Linear): a local export's file is checked as
            # rabit.export.from_pretrained checks it, against the skeleton's names, shapes and dtypes
            weights = Path(getattr(model.config, "_name_or_path", "") or "") / WEIGHTS_NAME
            if weights.is_file():
                want = expected_tensors(model, self.quantization_config.k)
                out_emb = model.get_output_embeddings()
                if getattr(model.config, "tie_word_embeddings", False) and out_emb is not None:
                    # not tied yet on this skeleton: the file stores the shared matrix once, as the input embedding
                    names = {id(m): n for n, m in model.named_modules()}
                    want.pop(f"{names[id(out_emb)]}.weight", None)
                validate_weights_file(weights, want)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            for name, m in model.named_modules():
                if not isinstance(m, PackedRaBiTLinear):
                    continue
                for t in ("packed", "g", "h"):
                    if getattr(m, t).device.type == "meta":
                        raise ExportFormatError(f"rabit: tensor {name}.{t} was not in the checkpoint; the export "
                                                "is incomplete, re-export it")
                for t in ("g", "h"):
                    if not torch.isfinite(getattr(m, t)).all():
                        raise ExportFormatError(f"rabit: scale {name}.{t} contains NaN or Inf; the checkpoint is "
                                                "corrupted or the model diverged before export")
            return model

        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    for cls in (RabitQuantConfig, RabitHfQuantizer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    _CLASSES.update(RabitQuantConfig=RabitQuantConfig, RabitHfQuantizer=RabitHfQuantizer)
    return _CLASSES


def __getattr__(name: str):
    if name in ("RabitQuantConfig", "RabitHfQuantizer"):
        return _build_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register ``quant_method: "rabit"`` with transformers now (idempotent)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    classes = _build_classes()
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not classes["RabitQuantConfig"]:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a stale class from a module reload
        register_quantization_config(QUANT_METHOD)(classes["RabitQuantConfig"])
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not classes["RabitHfQuantizer"]:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(classes["RabitHfQuantizer"])


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of transformers' quantizer registry to call register()."""

    def find_spec(self, name, path=None, target=None):
        if name != _AUTO:
            return None
        sys.meta_path.remove(self)  # one shot
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                original = spec.loader.exec_module

                def exec_module(module, _original=original):
                    _original(module)
                    try:
                        register()
                    except Exception as e:  # never break transformers' own import; say why it failed
                        warnings.warn(f"rabit: could not register quant_method 'rabit' with transformers ({e}); "
                                      "rabit exports will not load through AutoModel.from_pretrained, use "
                                      "rabit.export.from_pretrained", RuntimeWarning, stacklevel=2)

                spec.loader.exec_module = exec_module
                return spec
        return None


def install_lazy_registration() -> None:
    """Register with transformers as soon as its quantizer registry is imported (now, if it already is)."""
    if _AUTO in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
