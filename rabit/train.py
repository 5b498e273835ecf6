"""Coupled QAT for RaBiT: distil a quantized student from its FP teacher.

Loss (RaBiT §4, LittleBit's ``kd_utils``)::

    L = KL(teacher ‖ student)  per token, on the logits (temperature τ, scaled by τ²)
      + γ · Σ_layers MSE(student hidden_l, teacher hidden_l)   over hidden_states[1:]

Optimizers: the 2-D latent weights of RaBiTLinear modules (``module.is_rabit_latent``) go to Muon
(the paper trains with Muon; :class:`rabit.muon.GroupedMuon`, torch's Muon with batched iterations), everything else that is trainable (the scales g/h, norms, biases)
goes to AdamW without weight decay. The schedule is linear warm-up then cosine to a floor.

Checkpoints are one safetensors file (student weights, optimizer state, RNG state; the rest as
JSON metadata), written atomically, so ``train(..., out_dir=d)`` after a crash continues from the
last checkpoint and ends with the same weights an uninterrupted run would have on CPU. The batch
for step ``s`` is a pure function of (seed, s), so resuming needs no data-loader state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._checks import check_number_fields, is_int, validate_token_ids
from .data import atomic_write, make_output_dir, model_device, write_json_atomic
from .muon import GroupedMuon
from .nn import PackedRaBiTLinear

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
HISTORY_NAME = "history.json"
CONFIG_NAME = "train_config.json"
CHECKPOINT_FORMAT = "rabit-train-checkpoint/1"

AUTOCAST_MODES = ("auto", "bf16", "none")
OPTIMIZERS = ("muon", "adamw")
MUON_ADJUST_LR = ("match_rms_adamw", "original")  # what torch.optim.Muon takes as adjust_lr_fn
# Fields a resumed run may change: they change how often it logs or checks, or (compile) the rounding order only.
_RESUME_FREE_FIELDS = frozenset({"log_every", "checkpoint_every", "layer_finite_checks", "compile"})


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyper-parameters of one QAT run. Every field is validated in ``__post_init__``.

    Learning rates: ``lr_latent`` is Muon's (with ``muon_adjust_lr="match_rms_adamw"`` it is on the
    same scale as an AdamW LR, so it transfers across layer shapes); ``lr_scales`` is AdamW's for
    g/h, norms and biases. The paper does not publish its values (method notes §4, §8.4).
    """

    steps: int = 1000
    batch_size: int = 8
    lr_latent: float = 1e-3
    lr_scales: float = 1e-3
    weight_decay: float = 0.0  # on the latents only; scales and norms never get weight decay
    warmup_steps: int | None = None  # if None, warmup_fraction * steps
    warmup_fraction: float = 0.02
    # cosine floor, as a fraction of the peak LR. 0: on stories260K (2 seeds) the cosine to zero beat a floor of 0.1
    # by 14 % in held-out KL (the last, small steps stop flipping signs); the best SmolLM2 runs (15 M tokens) use it,
    # but it has not been compared with the floor there at that budget
    min_lr_ratio: float = 0.0
    # hidden-state MSE weight. The paper uses 100 for 7B Llamas; here every γ > 0 measured did worse on held-out text
    # than KL alone (stories260K: 0.1-100; SmolLM2: 0.003, 0.03, 1; docs/results.md), as in `rabit train`
    gamma: float = 0.0
    kl_temperature: float = 1.0
    optimizer: str = "muon"  # for the latents: "muon" | "adamw"
    muon_momentum: float = 0.95
    muon_adjust_lr: str = "match_rms_adamw"
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0  # None or 0: no clipping (the norm is still checked for NaN)
    autocast: str = "auto"  # "auto": bf16 on CUDA, none on CPU; "bf16"; "none"
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer of student and teacher, and the loss: fuses the elementwise work between the
    # GEMMs (RMSNorm, rotary, SwiGLU, casts, the log-softmaxes). Regional: the layers share one compiled graph, so it
    # compiles once per run (7-15 s on an H200), not once per layer. Same math, other rounding order. "auto": on CUDA
    # (a RaBiT step 1.89x faster and half the memory on an H200; every method's PPL within run-to-run spread of eager,
    # docs/results.md), off on the CPU (no gain on stories260K, ~19 s of compiling)
    compile: bool | str = "auto"
    # keep the RaBiT layers' own NaN/Inf check on every call (a device sync per layer per step on CUDA); off by
    # default, the loop checks the parameters itself (see _disable_finite_checks)
    layer_finite_checks: bool = False
    freeze_embeddings: bool = True  # keep token embeddings / lm_head frozen (LittleBit practice)
    log_every: int = 10
    checkpoint_every: int = 100  # 0: only at the end
    seed: int = 0

    def __post_init__(self) -> None:
        check_number_fields(self, "rabit: TrainConfig")

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"rabit: TrainConfig: {msg}")

        need(is_int(self.steps) and self.steps >= 1, f"steps must be an int >= 1 (got {self.steps!r})")
        need(is_int(self.batch_size) and self.batch_size >= 1,
             f"batch_size must be an int >= 1 (got {self.batch_size!r})")
        for name in ("lr_latent", "lr_scales"):
            v = getattr(self, name)
            need(math.isfinite(v) and v >= 0, f"{name} must be a finite number >= 0 (got {v!r})")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be a finite number >= 0 (got {self.weight_decay!r})")
        need(0 <= self.muon_momentum < 1, f"muon_momentum must be in [0, 1) (got {self.muon_momentum!r})")
        need(self.warmup_steps is None or is_int(self.warmup_steps) and self.warmup_steps >= 0,
             f"warmup_steps must be an int >= 0 or None (got {self.warmup_steps!r})")
        need(0 <= self.warmup_fraction < 1, f"warmup_fraction must be in [0, 1) (got {self.warmup_fraction!r})")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio!r})")
        need(math.isfinite(self.gamma) and self.gamma >= 0, f"gamma must be a finite number >= 0 (got {self.gamma!r})")
        need(self.muon_adjust_lr in MUON_ADJUST_LR,
             f"muon_adjust_lr must be one of {MUON_ADJUST_LR} (got {self.muon_adjust_lr!r})")
        betas = self.adam_betas
        need(not isinstance(betas, str) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas),
             f"adam_betas must be two numbers in [0, 1) (got {betas!r})")
        need(math.isfinite(self.kl_temperature) and self.kl_temperature > 0,
             f"kl_temperature must be a finite number > 0 (got {self.kl_temperature!r})")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r})")
        need(isinstance(self.compile, bool) or self.compile == "auto",
             f"compile must be True, False or 'auto' (got {self.compile!r})")
        need(self.autocast in AUTOCAST_MODES, f"autocast must be one of {AUTOCAST_MODES} (got {self.autocast!r})")
        need(self.grad_clip is None or self.grad_clip >= 0, f"grad_clip must be >= 0 or None (got {self.grad_clip!r})")
        need(is_int(self.log_every) and self.log_every >= 1, f"log_every must be an int >= 1 (got {self.log_every!r})")
        need(is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
             f"checkpoint_every must be an int >= 0 (got {self.checkpoint_every!r})")
        need(is_int(self.seed), f"seed must be an int (got {self.seed!r})")
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]  # JSON gives lists

    @property
    def num_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.steps)
        return int(self.warmup_fraction * self.steps)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak LR at 0-based ``step``: linear warm-up, then cosine to the floor."""
        w = self.num_warmup_steps
        if step < w:
            return (step + 1) / w
        progress = (step - w) / max(1, self.steps - w - 1)
        progress = min(1.0, progress)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d


@dataclass
class TrainResult:
    """What :func:`train` returns; ``to_dict()`` is JSON-serialisable."""

    steps: int  # total steps completed (including those before a resume)
    start_step: int  # 0, or the step the run resumed from
    final_loss: float | None
    final_kl: float | None
    final_mse: float | None
    tokens_per_s: float | None  # mean over the steps run in this call
    elapsed_s: float  # training time of this call, without the evaluations of eval_fn
    eval_s: float = 0.0  # time spent in eval_fn in this call
    compiled: bool = False  # whether this call ran compiled (TrainConfig.compile, "auto" resolved)
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def resolve_autocast_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device`` (None: no autocast)."""
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "none":
        return None
    raise ValueError(f"rabit: autocast must be one of {AUTOCAST_MODES} (got {mode!r})")


def autocast_context(device: torch.device, mode: str):
    """``torch.autocast`` for ``mode`` on ``device``, or a no-op context."""
    dtype = resolve_autocast_dtype(device, mode)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _vocab_size(model: torch.nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    if v is None:
        raise ValueError("rabit: cannot find the model's vocabulary size (no get_input_embeddings / config.vocab_size)")
    return int(v)


def data_fingerprint(token_ids: torch.Tensor) -> str:
    """sha256 of the token ids (as little-endian int64), to detect a resume on different data."""
    arr = token_ids.detach().to("cpu", torch.int64).contiguous().numpy()
    return f"{tuple(arr.shape)}:" + hashlib.sha256(arr.tobytes()).hexdigest()[:32]


class BatchSampler:
    """Batch ``s`` = rows ``[s·B, (s+1)·B)`` of an endless concatenation of seeded permutations.

    Stateless on purpose: the batch of any step follows from (seed, step), so a resumed run sees
    exactly the batches the uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen)}  # keep only the current one
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        start, parts, need = step * self.batch_size, [], self.batch_size
        while need:
            epoch, offset = divmod(start, self.n)
            take = min(need, self.n - offset)
            parts.append(self._perm(epoch)[offset : offset + take])
            start, need = start + take, need - take
        return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def distillation_loss(student_out, teacher_out, gamma: float, temperature: float = 1.0):
    """``(loss, kl, mse)`` for HF model outputs of student and teacher on the same batch.

    kl: per-token KL(teacher ‖ student) (``batchmean`` over all B·T positions), times τ² so its
    gradient scale does not depend on τ (Hinton et al. 2015). mse: Σ over ``hidden_states[1:]`` of
    the mean squared error (None when gamma == 0, where hidden states are not requested).
    """
    s_logits, t_logits = student_out.logits, teacher_out.logits
    if s_logits.shape != t_logits.shape:
        raise ValueError(f"rabit: student logits {tuple(s_logits.shape)} and teacher logits "
                         f"{tuple(t_logits.shape)} differ; are they the same architecture and vocabulary?")
    v = s_logits.shape[-1]
    # float32 for the softmaxes: bf16 logits lose the small probabilities KL depends on.
    s_logp = F.log_softmax(s_logits.float().reshape(-1, v) / temperature, dim=-1)
    t_logp = F.log_softmax(t_logits.float().reshape(-1, v) / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * (temperature**2)
    if gamma == 0:
        return kl, kl, None
    s_h, t_h = student_out.hidden_states, teacher_out.hidden_states
    if s_h is None or t_h is None or len(s_h) != len(t_h):
        raise ValueError("rabit: student and teacher must return the same number of hidden states "
                         "(output_hidden_states=True) when gamma > 0")
    mse = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(s_h[1:], t_h[1:]))
    return kl + gamma * mse, kl, mse


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


def latent_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, param)`` of the latent weights of every module with ``is_rabit_latent = True``: its
    ``rabit_latents()`` when it has them (one latent per path in the independent baseline), else its
    2-D ``weight``."""
    out = []
    for mname, module in model.named_modules():
        if not getattr(module, "is_rabit_latent", False):
            continue
        prefix = f"{mname}." if mname else ""
        if hasattr(module, "rabit_latents"):
            ids = {id(p) for p in module.rabit_latents()}
            cands = [(f"{prefix}{n}", p) for n, p in module.named_parameters() if id(p) in ids]
        else:
            cands = [(f"{prefix}weight", getattr(module, "weight", None))]
        out += [(n, p) for n, p in cands
                if isinstance(p, torch.nn.Parameter) and p.dim() == 2 and p.requires_grad]
    return out


def build_optimizers(student: torch.nn.Module, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """Muon for the latents (or AdamW when ``config.optimizer == "adamw"``), AdamW for the rest.

    Each param group carries ``base_lr``; :func:`_set_lr` scales it by the schedule every step.
    """
    latents = latent_parameters(student)
    latent_ids = {id(p) for _, p in latents}
    others, seen = [], set(latent_ids)
    for _, p in student.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            others.append(p)
    if not latents and config.optimizer == "muon":
        logger.warning("rabit: no RaBiTLinear latent weights found (modules with is_rabit_latent); "
                       "Muon is unused and every trainable parameter uses AdamW at lr_scales=%g. "
                       "Call rabit.quantize_(model) first to train a 2-bit student.", config.lr_scales)
    latent_params = [p for _, p in latents]
    optimizers: list[torch.optim.Optimizer] = []
    adam_groups = []
    if latent_params and config.optimizer == "muon":
        # torch.optim.Muon's math with the Newton–Schulz iterations batched per shape (rabit/muon.py)
        optimizers.append(GroupedMuon(
            [{"params": latent_params, "base_lr": config.lr_latent, "name": "latent"}],
            lr=config.lr_latent, weight_decay=config.weight_decay, momentum=config.muon_momentum,
            adjust_lr_fn=config.muon_adjust_lr,
        ))
    elif latent_params:
        adam_groups.append({"params": latent_params, "lr": config.lr_latent, "base_lr": config.lr_latent,
                            "weight_decay": config.weight_decay, "name": "latent"})
    if others:
        adam_groups.append({"params": others, "lr": config.lr_scales, "base_lr": config.lr_scales,
                            "weight_decay": 0.0, "name": "scales"})
    if adam_groups:
        # fused: one kernel for all the scales, norms and biases (hundreds of small tensors) on CUDA
        fused = all(p.is_cuda for g in adam_groups for p in g["params"])
        optimizers.append(torch.optim.AdamW(adam_groups, betas=config.adam_betas, fused=fused or None))
    if not optimizers:
        raise ValueError("rabit: the student has no trainable parameters (all requires_grad=False)")
    return optimizers


def _set_lr(optimizers: Iterable[torch.optim.Optimizer], factor: float) -> dict[str, float]:
    lrs = {}
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
            lrs[f"lr_{g.get('name', 'group')}"] = g["lr"]
    return lrs


# --------------------------------------------------------------------------------------------
# Checkpoints (one safetensors file; everything not a tensor goes into JSON metadata)
# --------------------------------------------------------------------------------------------


def _state_dict_dedup(sd: dict[str, torch.Tensor], prefix: str):
    """CPU copies of ``sd`` with tied tensors stored once; returns (tensors, aliases)."""
    tensors, aliases, seen = {}, {}, {}
    for k, t in sd.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device) if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[prefix + k] = t.detach().to("cpu").contiguous().clone()
    return tensors, aliases


def _optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str):
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                name = f"{prefix}.state.{pid}.{k}"
                tensors[name] = v.detach().to("cpu").contiguous().clone()
                entry[k] = {"tensor": name}
            else:
                entry[k] = {"value": v}
        state_meta[str(pid)] = entry
    return tensors, {"type": type(opt).__name__, "state": state_meta, "param_groups": sd["param_groups"]}


def _optimizer_from_flat(opt: torch.optim.Optimizer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    if meta["type"] != type(opt).__name__:
        raise ValueError(f"rabit: checkpoint has a {meta['type']} optimizer where this run builds "
                         f"{type(opt).__name__}; was it written with another optimizer setting?")
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entry.items()}
    groups = []
    for saved, current in zip(meta["param_groups"], opt.param_groups):
        # JSON turns tuples (betas, ns_coefficients) into lists; give them back their type.
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v
                       for k, v in saved.items()})
    if len(groups) != len(opt.param_groups):
        raise ValueError("rabit: the checkpoint's optimizer has a different number of parameter groups")
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors() -> dict[str, torch.Tensor]:
    t = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"rng.cuda.{i}"] = s
    return t


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([tensors[k] for k in sorted(cuda, key=lambda k: int(k.split(".")[-1]))])
        else:
            logger.warning("rabit: checkpoint has CUDA RNG state for %d devices, this machine has %d; "
                           "CUDA RNG not restored", len(cuda), torch.cuda.device_count())


def save_checkpoint(path: str | os.PathLike, student: torch.nn.Module, optimizers, step: int,
                    config: TrainConfig, fingerprint: str) -> None:
    """Write student weights, optimizer and RNG state at ``step`` to one safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors, aliases = _state_dict_dedup(student.state_dict(), "student.")
    opt_meta = []
    for i, opt in enumerate(optimizers):
        t, m = _optimizer_to_flat(opt, f"optim{i}")
        tensors.update(t)
        opt_meta.append(m)
    tensors.update(_rng_tensors())
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": config.to_dict(),
        "data": fingerprint,
        "aliases": aliases,
        "optimizers": opt_meta,
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"rabit": json.dumps(meta)}))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a checkpoint written by :func:`save_checkpoint` (no pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .data import readable_safetensors

    fix = "it is truncated or corrupt: delete it to train from the start, or restore a good copy"
    with readable_safetensors(path, "checkpoint", fix), safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("rabit")
    if raw is None:
        raise ValueError(f"rabit: {str(path)!r} is not a rabit training checkpoint (no 'rabit' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"rabit: {str(path)!r} has unreadable 'rabit' metadata; {fix}")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"rabit: {str(path)!r} has checkpoint format {meta.get('format')!r}; "
                         f"this version reads {CHECKPOINT_FORMAT!r}")
    with readable_safetensors(path, "checkpoint", fix):
        return meta, load_file(str(path))


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the student; ``detail`` names the first tensor that does not."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(f"rabit: checkpoint does not fit this student ({detail}); was the student quantized with the "
                         "same settings?")


def load_student_weights(student: torch.nn.Module, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the checkpoint's student weights into ``student`` (strict: every key must match)."""
    sd = {k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")}
    for alias, target in meta["aliases"].items():
        sd[alias] = sd[target]
    try:
        missing, unexpected = student.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # torch's report ("size mismatch for ..."), whose first line names no tensor
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith("size mismatch")), lines[-1] if lines else "")
        raise CheckpointMismatchError(detail[:400]) from None
    if missing or unexpected:
        raise CheckpointMismatchError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def _check_resume_compatible(meta: dict, config: TrainConfig, fingerprint: str, path: Path) -> None:
    saved = meta["config"]
    now = config.to_dict()
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in _RESUME_FREE_FIELDS and saved.get(k) != v}
    problems = [f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()]
    if meta["data"] != fingerprint:
        problems.append(f"token data: checkpoint {meta['data']} vs now {fingerprint}")
    if problems:
        raise ValueError(f"rabit: cannot resume from {str(path)!r}, the run differs: " + "; ".join(problems)
                         + ". Use the same config and data, or start afresh elsewhere: another out_dir (--out on the "
                           "command line) or resume=False.")


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def _set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Switch Hugging Face activation checkpointing on/off (transformers >= 5.x renamed the API)."""
    # Non-reentrant checkpointing: works with frozen embeddings (inputs that need no grad).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_enable"):
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()
    else:
        raise ValueError("rabit: gradient_checkpointing=True needs a Hugging Face model "
                         f"(activation_checkpointing_enable); {type(model).__name__} has none")


def _decoder_layers(*models: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of each model, the unit that ``compile=True`` compiles: Hugging Face names their class in
    ``_no_split_modules`` (the decoder layers). One compiled graph then serves every layer of the same shapes."""
    layers = []
    for model in models:
        names = set(getattr(model, "_no_split_modules", None) or ())
        found = [m for m in model.modules() if type(m).__name__ in names]
        if not found:
            raise ValueError(f"rabit: compile=True compiles a model's decoder layers, and {type(model).__name__} names "
                             "none (no _no_split_modules); train it with compile=False (rabit train --no-compile)")
        layers += found
    return layers


def forget_compiled(*functions: Callable) -> None:
    """Drop torch.compile's graphs of these functions (and bound methods). Dynamo keeps them per code object, so
    every training run in one process (each method of a results table) would add its own, and past
    ``torch._dynamo.config.recompile_limit`` (8) torch warns once and runs the function eagerly from then on: slower,
    silently. Dropping them when a run ends lets the next run compile afresh."""
    for code in {getattr(f, "__func__", f).__code__ for f in functions}:
        torch._dynamo.reset_code(code)


@contextlib.contextmanager
def compiled_forwards(modules: Iterable[torch.nn.Module]):
    """Within the block each module runs a torch.compile'd forward (shapes static); after it, its eager one, and the
    graphs are dropped (:func:`forget_compiled`)."""
    modules = list(modules)
    own = [m.__dict__.get("forward") for m in modules]  # a forward set on the instance before, to put back
    eager = [m.forward for m in modules]
    try:
        for m in modules:
            # an instance attribute shadows the class's forward; deleting it brings the eager one back
            m.forward = torch.compile(m.forward, dynamic=False)
        yield
    finally:
        for m, f in zip(modules, own):
            if f is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = f
        forget_compiled(*eager)


@contextlib.contextmanager
def _compiled_training(modules: Iterable[torch.nn.Module], loss_fn: Callable):
    """The modules' forwards compiled (:func:`compiled_forwards`) and ``loss_fn`` compiled, yielded; on exit the eager
    forwards come back and every graph of the run is dropped."""
    with compiled_forwards(modules):
        try:
            yield torch.compile(loss_fn, dynamic=False)
        finally:
            forget_compiled(loss_fn)


def _forward(model, input_ids, hidden: bool):
    return model(input_ids=input_ids, output_hidden_states=hidden, use_cache=False)


def _disable_finite_checks(model: torch.nn.Module) -> Callable[[], None]:
    """Switch off the per-layer NaN/Inf check of the RaBiT layers for training; returns the function that puts
    them back. On CUDA each check is a device synchronisation (one per layer per step). The loop keeps the same
    guarantee more cheaply: it checks every trainable parameter at the start, at each checkpoint (or after the
    last step without one), and the loss and gradient norm every step; finite parameters updated with finite
    gradients stay finite."""
    mods = [m for m in model.modules() if hasattr(m, "check_finite")]
    saved = [m.__dict__.get("check_finite") for m in mods]
    for m in mods:
        m.check_finite = False

    def restore() -> None:
        for m, v in zip(mods, saved):
            if v is None:
                del m.check_finite  # back to the class default
            else:
                m.check_finite = v

    return restore


def train(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    token_ids: torch.Tensor,
    config: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    eval_fn: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
    eval_every: int = 0,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` on ``token_ids [N, T]`` for ``config.steps`` steps.

    ``student`` is trained in place (both models on one device; the teacher is only run forward,
    under no_grad). With ``out_dir``, a checkpoint is written every ``config.checkpoint_every``
    steps and at the end, plus ``history.json`` and ``train_config.json``; with ``resume=True`` an
    existing checkpoint there is loaded and training continues from its step (the config and data
    must match). Raises :class:`TrainingDivergedError` on a NaN/inf loss or gradient.

    ``eval_fn(student) -> dict`` (e.g. a WikiText-2 perplexity) runs every ``eval_every`` steps and at
    the end, in eval mode under no_grad; its result is stored as ``"eval"`` in that step's history entry
    (a curve of the metric against training tokens). It does not change the training trajectory.
    """
    config = config or TrainConfig()
    if eval_every < 0:
        raise ValueError(f"rabit: eval_every must be >= 0 (got {eval_every})")
    packed = [n for n, m in student.named_modules() if isinstance(m, PackedRaBiTLinear)]
    if packed:  # frozen bits, no latent: only norms and biases would train
        raise ValueError(f"rabit: the student has packed layers ({packed[0]}, ... {len(packed)} in all), which do "
                         "not train; train the model before rabit.convert_, or quantize the FP model again")
    dev = model_device(student)
    if model_device(teacher) != dev:
        raise ValueError(f"rabit: student is on {dev} but teacher on {model_device(teacher)}; "
                         "put both on the same device")
    vocab = _vocab_size(student)
    if _vocab_size(teacher) != vocab:
        raise ValueError(f"rabit: student vocabulary {vocab} != teacher vocabulary {_vocab_size(teacher)}")
    max_pos = getattr(getattr(student, "config", None), "max_position_embeddings", None)
    token_ids = validate_token_ids(token_ids, vocab, config.batch_size, max_pos)
    fingerprint = data_fingerprint(token_ids)

    if config.freeze_embeddings:
        for get in ("get_input_embeddings", "get_output_embeddings"):
            mod = getattr(student, get, lambda: None)()
            if mod is not None:
                for p in mod.parameters():
                    p.requires_grad_(False)
    optimizers = build_optimizers(student, config)
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]

    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT_NAME if out else None
    start_step, history = 0, []
    if out is not None:
        make_output_dir(out)
        if resume and ckpt_path.is_file():
            meta, tensors = read_checkpoint(ckpt_path)
            _check_resume_compatible(meta, config, fingerprint, ckpt_path)
            load_student_weights(student, meta, tensors)
            if len(meta["optimizers"]) != len(optimizers):
                raise ValueError("rabit: the checkpoint has a different optimizer layout than this run")
            for opt, m in zip(optimizers, meta["optimizers"]):
                _optimizer_from_flat(opt, m, tensors)
            _restore_rng(tensors)
            start_step = int(meta["step"])
            history = _read_history(out / HISTORY_NAME, start_step)
            logger.info("rabit: resuming from %s at step %d", ckpt_path, start_step)
        write_json_atomic(out / CONFIG_NAME, config.to_dict())
    if start_step == 0:
        # Llama students use no randomness, but a model with dropout must be reproducible too.
        torch.manual_seed(config.seed)

    # checked before the student's mode, checkpointing or a progress bar change, so an error leaves it as it was
    bad = _nonfinite_parameter(student, params)
    if bad is not None:
        where = "the student" if start_step == 0 else f"the checkpoint of step {start_step} in {str(out)!r}"
        raise ValueError(f"rabit: {bad} holds NaN or Inf in {where}; training needs finite weights and scales")
    use_compile = dev.type == "cuda" if config.compile == "auto" else bool(config.compile)
    compiled = []
    if use_compile:
        try:
            compiled = _decoder_layers(student, teacher)
        except ValueError:
            if config.compile is True:
                raise
            # "auto" compiles where it can: a model naming no decoder layers trains eagerly (same math)
            logger.info("rabit: %s names no decoder layers to compile; training eagerly", type(student).__name__)
            use_compile = False
    sampler = BatchSampler(token_ids.shape[0], config.batch_size, config.seed)
    hidden = config.gamma > 0
    tokens_per_step = config.batch_size * token_ids.shape[1]
    was_training, teacher_training = student.training, teacher.training
    gc_enabled = False
    if config.gradient_checkpointing:
        _set_checkpointing(student, True)
        gc_enabled = True
    student.train()
    teacher.eval()

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start_step, desc="QAT", unit="step", disable=not progress,
               dynamic_ncols=True, leave=False)
    t_start = time.perf_counter()
    t_log, acc, n_acc = t_start, {"loss": 0.0, "kl": 0.0, "mse": 0.0}, 0
    eval_s = 0.0
    last_saved = start_step if ckpt_path is not None and ckpt_path.is_file() and resume else None

    def diverged(step: int, what: str) -> TrainingDivergedError:
        if out is not None:
            write_json_atomic(out / HISTORY_NAME, history)
        kept = (f"the last good checkpoint (step {last_saved}) is kept in {str(out)!r}"
                if last_saved is not None else "no checkpoint was written")
        return TrainingDivergedError(
            f"rabit: {what} at step {step + 1}; stopping ({kept}). Lower the learning rates "
            f"(lr_latent={config.lr_latent:g}, lr_scales={config.lr_scales:g}), lengthen the warm-up "
            f"or enable grad_clip, and run again.")

    restore_checks = (lambda: None) if config.layer_finite_checks else _disable_finite_checks(student)
    loss_fn = distillation_loss
    exit_stack = contextlib.ExitStack()  # the compiled run's context, entered only when compiling
    try:
        if use_compile:  # the first step compiles (seconds to a minute): say so rather than look stuck
            loss_fn = exit_stack.enter_context(_compiled_training(compiled, distillation_loss))
            bar.set_postfix_str("compiling the decoder layers and the loss (first step)")
        for step in range(start_step, config.steps):
            x = token_ids[sampler.indices(step)].to(dev, non_blocking=True)
            lrs = _set_lr(optimizers, config.lr_factor(step))
            with torch.no_grad(), autocast_context(dev, config.autocast):
                t_out = _forward(teacher, x, hidden)
            with autocast_context(dev, config.autocast):
                s_out = _forward(student, x, hidden)
            loss, kl, mse = loss_fn(s_out, t_out, config.gamma, config.kl_temperature)
            del t_out, s_out
            # One host sync per step: needed for the NaN check and the progress bar anyway.
            loss_v, kl_v = float(loss.detach()), float(kl.detach())
            mse_v = float(mse.detach()) if mse is not None else 0.0
            if not math.isfinite(loss_v):
                raise diverged(step, f"the loss became {loss_v} (kl={kl_v:.4g}, mse={mse_v:.4g})")
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf")))
            if not math.isfinite(gnorm):
                raise diverged(step, f"the gradient norm became {gnorm} (loss {loss_v:.4g})")
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)

            acc["loss"] += loss_v
            acc["kl"] += kl_v
            acc["mse"] += mse_v
            n_acc += 1
            done = step + 1
            now = time.perf_counter()
            run_eval = eval_fn is not None and (done == config.steps or (eval_every and done % eval_every == 0))
            if run_eval or done % config.log_every == 0 or done == config.steps or done == 1:
                tps = n_acc * tokens_per_step / max(now - t_log, 1e-9)
                entry = {"step": done, "tokens": done * tokens_per_step, "loss": acc["loss"] / n_acc, "kl": acc["kl"] / n_acc,
                         "mse": acc["mse"] / n_acc if hidden else None, **lrs, "grad_norm": gnorm,
                         "tokens_per_s": tps, "elapsed_s": now - t_start - eval_s}
                if run_eval:
                    t_eval = time.perf_counter()
                    entry["eval"] = _evaluate(student, eval_fn)
                    now = time.perf_counter()
                    eval_s += now - t_eval  # evaluation time is not training time
                history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", kl=f"{entry['kl']:.4f}", tok_s=f"{tps:,.0f}")
                t_log, acc, n_acc = now, {"loss": 0.0, "kl": 0.0, "mse": 0.0}, 0
            elif use_compile and step == start_step:
                bar.set_postfix_str("compiled")
            bar.update(1)
            at_checkpoint = config.checkpoint_every and done % config.checkpoint_every == 0
            # the parameters are checked where a checkpoint is written, and after the last step in any case
            if done == config.steps or (ckpt_path is not None and at_checkpoint):
                bad = _nonfinite_parameter(student, params)
                if bad is not None:
                    raise diverged(step, f"{bad} became NaN or Inf")
                if ckpt_path is not None:
                    # History first: a crash between the two writes then leaves extra history entries,
                    # which a resume drops, rather than a checkpoint whose history is missing.
                    write_json_atomic(out / HISTORY_NAME, history)
                    save_checkpoint(ckpt_path, student, optimizers, done, config, fingerprint)
                    last_saved = done
    finally:
        exit_stack.close()
        restore_checks()
        bar.close()
        student.train(was_training)
        teacher.train(teacher_training)
        if gc_enabled:
            _set_checkpointing(student, False)

    elapsed = time.perf_counter() - t_start - eval_s
    ran = config.steps - start_step
    last = history[-1] if history else {}
    return TrainResult(
        steps=config.steps,
        start_step=start_step,
        final_loss=last.get("loss"),
        final_kl=last.get("kl"),
        final_mse=last.get("mse"),
        tokens_per_s=ran * tokens_per_step / elapsed if ran else None,
        elapsed_s=elapsed,
        eval_s=eval_s,
        history=history,
        checkpoint=str(ckpt_path) if ckpt_path is not None else None,
        compiled=use_compile,
    )


def _nonfinite_parameter(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> str | None:
    """The name of a parameter holding NaN/Inf, or None: one device sync for all of them."""
    if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    bad = next(p for p in params if not bool(torch.isfinite(p).all()))
    return names.get(id(bad), f"a parameter of shape {tuple(bad.shape)}")


def _evaluate(student: torch.nn.Module, eval_fn: Callable[[torch.nn.Module], dict[str, Any]]) -> dict[str, Any]:
    was_training = student.training
    student.eval()
    try:
        # eager even inside a compiled run: an evaluation's modes and window shapes would each compile graphs of their
        # own (seconds each, for a few calls), and count towards dynamo's recompile limit
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            return dict(eval_fn(student))
    finally:
        student.train(was_training)


def _read_history(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """History entries up to the checkpoint's step (later ones are redone after a resume)."""
    if not path.is_file():
        return []
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        return [e for e in entries if e["step"] <= upto_step]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
        raise ValueError(f"rabit: {str(path)!r} is not a training history (a JSON list of steps); it is corrupt: "
                         "delete it (the history restarts at the checkpoint) or restore a good copy") from None
