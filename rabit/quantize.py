"""Model-level API: swap a Transformers model's nn.Linear layers for RaBiT layers, and pack them.

    rabit.quantize_(model, RabitConfig(k=2), calib_input_ids=ids)   # nn.Linear -> RaBiTLinear (QAT form)
    ... train ...
    rabit.convert_(model)                                           # RaBiTLinear -> PackedRaBiTLinear
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import FLOAT_DTYPES, check_number_fields, is_int
from .calibrate import collect_calibration_stats
from .init import (
    INIT_MODES,
    check_init_options,
    init_independent_linear,
    init_rabit_linear,
)
from .nn import QAT_LAYERS, IndependentRaBiTLinear, PackedRaBiTLinear, RaBiTLinear
from .runtime.format import MAX_K


@dataclass
class RabitConfig:
    """How `quantize_` converts a model.

    k: binary paths per layer (RaBiT validates 2; 1..4 supported).
    latents: ``"coupled"`` (RaBiT: one shared latent, paths re-derived by the residual chain) or
        ``"independent"`` (the baseline: one latent per path, DB-LLM-style standard QAT).
    include / exclude: glob patterns on fully qualified module names (``*`` crosses dots). An empty
        include means every nn.Linear; exclude wins. ``lm_head`` stays in full precision by default.
    init_iters: Gauss–Seidel rounds T of iterative residual SVID (0 = greedy SVID).
    init_mode: ``"coupled"`` (signs on the coupled chain, RaBiT) or ``"independent"``.
    alpha_in / alpha_out: preconditioning exponents of the input-activation and output-gradient
        RMS (used only when calibration data is given).
    latent_init: ``"pretrained"`` (latent = W) or ``"reconstruction"`` (latent = the init's Ŵ).
    ste / ste_param: straight-through estimator of the backward (identity, clipped, tanh).
    """

    k: int = 2
    latents: str = "coupled"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head",)
    init_iters: int = 5
    init_mode: str = "coupled"
    alpha_in: float = 0.5
    alpha_out: float = 0.5
    latent_init: str = "pretrained"
    ste: str = "identity"
    ste_param: float = 1.0

    def __post_init__(self):
        check_number_fields(self, "RabitConfig")
        if not (is_int(self.k) and 1 <= self.k <= MAX_K):
            raise ValueError(f"RabitConfig: k={self.k!r} is not supported; use an integer k in 1..{MAX_K} (RaBiT uses 2)")
        for field in ("include", "exclude"):
            patterns = getattr(self, field)
            # tuple("lm_head") would be ('l', 'm', ...): a lone string is refused, not split into characters
            if isinstance(patterns, str):
                raise TypeError(f"RabitConfig: {field} must be a tuple of glob patterns, got the string "
                                f"{patterns!r}; write {field}=({patterns!r},) for one pattern")
            if not all(isinstance(p, str) for p in patterns):
                raise TypeError(f"RabitConfig: {field} must be a tuple of glob patterns (strings), got {patterns!r}")
        if self.latents not in ("coupled", "independent"):
            raise ValueError(f"RabitConfig: latents must be 'coupled' or 'independent', got {self.latents!r}")
        check_init_options("RabitConfig", self.init_iters, self.latent_init, self.ste)
        if self.init_mode not in INIT_MODES:
            raise ValueError(f"RabitConfig: init_mode {self.init_mode!r} is unknown; use one of {INIT_MODES}")
        if self.ste != "identity" and not self.ste_param > 0:
            raise ValueError(f"RabitConfig: ste_param must be > 0 for ste={self.ste!r}")
        if not (self.alpha_in >= 0 and self.alpha_out >= 0 and math.isfinite(self.alpha_in + self.alpha_out)):
            raise ValueError(f"RabitConfig: alpha_in and alpha_out must be finite and >= 0, got {self.alpha_in} "
                             f"and {self.alpha_out}")
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)

    def selects(self, name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        return not self.include or any(fnmatch.fnmatchcase(name, p) for p in self.include)


def _check_not_meta(model: nn.Module, who: str) -> None:
    """The init and the packing read the weights' values: a meta model has none (torch would fail in .item())."""
    meta = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        raise ValueError(f"{who}: the model's weights are on the meta device ({meta!r} first), so there are no values "
                         "to quantize; load the weights first (e.g. from_pretrained without device_map='meta')")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def target_linears(model: nn.Module, config: RabitConfig) -> list[tuple[str, nn.Linear]]:
    """The (name, module) pairs `quantize_` converts.

    An include pattern that matches modules but no nn.Linear among them is an error: the user pointed
    at something rabit cannot convert (e.g. a whole MLP block instead of its projections).
    """
    modules = [(n, m) for n, m in model.named_modules() if n]
    for pattern in config.include:
        hits = [(n, m) for n, m in modules if fnmatch.fnmatchcase(n, pattern)]
        if hits and not any(isinstance(m, nn.Linear) for _, m in hits):
            name, mod = hits[0]
            raise TypeError(f"rabit.quantize_: include pattern {pattern!r} matches {name!r}, a "
                            f"{type(mod).__name__}, not nn.Linear; match its linear layers instead (e.g. "
                            f"{pattern + '.*'!r})")
    return [(n, m) for n, m in modules if isinstance(m, nn.Linear) and config.selects(n)]


def quantize_(model: nn.Module, config: RabitConfig | None = None, calib_input_ids: Tensor | None = None,
              calib_batch_size: int = 8, progress: bool = True) -> nn.Module:
    """Swap the selected nn.Linear layers of ``model`` for initialised RaBiTLinear layers, in place.

    ``calib_input_ids`` ([N, T] token ids; never a test split) enables the I/O preconditioning of the
    init: per-layer input-activation and output-gradient RMS from a forward/backward pass of the
    model's own next-token loss. Without it the init fits the weights unweighted.
    """
    config = config or RabitConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"rabit.quantize_: expected a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, (*QAT_LAYERS, PackedRaBiTLinear)) for m in model.modules()):
        raise ValueError("rabit.quantize_: the model already has RaBiT layers; quantize the original FP model")
    _check_not_meta(model, "rabit.quantize_")
    targets = target_linears(model, config)
    if not targets:
        raise ValueError(f"rabit.quantize_: no nn.Linear matched include={config.include} exclude={config.exclude}")
    for name, lin in targets:
        if lin.weight.dtype not in FLOAT_DTYPES:  # the RaBiT ops take these; float64 would fail at the first forward
            raise TypeError(f"rabit.quantize_: {name} has {lin.weight.dtype} weights; the RaBiT layers take float32, "
                            "float16 or bfloat16: convert the model first (model.float())")
    stats = {}
    if calib_input_ids is not None:
        stats = collect_calibration_stats(model, calib_input_ids, [n for n, _ in targets], calib_batch_size, progress)
    for name, lin in tqdm(targets, desc="rabit init", disable=not progress):
        s_in, s_out = stats.get(name, (None, None))
        init = dict(s_in=s_in, s_out=s_out, alpha_in=config.alpha_in, alpha_out=config.alpha_out,
                    iters=config.init_iters)
        if config.latents == "coupled":
            m = RaBiTLinear.from_linear(lin, k=config.k, ste=config.ste, ste_param=config.ste_param)
            m.init_error = init_rabit_linear(m, mode=config.init_mode, latent_init=config.latent_init, **init)
        else:
            m = IndependentRaBiTLinear.from_linear(lin, k=config.k, ste=config.ste, ste_param=config.ste_param)
            m.init_error = init_independent_linear(m, lin.weight, **init)
        _set_submodule(model, name, m)
    model.rabit_config = config
    return model


@torch.no_grad()
def convert_(model: nn.Module, scale_dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace every RaBiTLinear by a PackedRaBiTLinear (frozen signs, packed bits, scales in scale_dtype)."""
    if scale_dtype not in FLOAT_DTYPES:  # what the packed ops take; an int8 g would be all zeros
        raise TypeError(f"rabit.convert_: scale_dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}, "
                        f"got {scale_dtype}")
    names = [n for n, m in model.named_modules() if isinstance(m, QAT_LAYERS)]
    if not names:
        raise ValueError("rabit.convert_: the model has no RaBiTLinear layers; call rabit.quantize_ first")
    _check_not_meta(model, "rabit.convert_")
    packed = {}
    for name in names:  # every layer is built before any is swapped, so a failure leaves the model as it was
        try:
            packed[name] = PackedRaBiTLinear.from_rabit_linear(model.get_submodule(name), scale_dtype)
        except ValueError as e:
            raise ValueError(f"rabit.convert_: layer {name}: {e}") from None
    for name, layer in packed.items():
        _set_submodule(model, name, layer)
    return model
