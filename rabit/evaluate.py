"""Metrics: perplexity (the quantization literature's protocol), agreement with the FP teacher,
decoding speed and weight bytes.

Evaluation runs in the model's own dtype with no autocast by default (``autocast="none"``), so a
number does not depend on the device's autocast policy and can be compared with published fp16/fp32
figures. Pass ``autocast="auto"`` to evaluate as training runs (bf16 on CUDA).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._checks import check_positive_int, check_token_ids
from .data import decode_loop, encode_text, greedy, model_device
from .train import autocast_context

SHARED_ENV = "RABIT_SHARED"
WIKITEXT2_RAW_TEST = Path("data") / "wikitext-2-raw" / "wiki.test.raw"


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


@dataclass
class PerplexityResult:
    """Perplexity over non-overlapping windows; ``float(result)`` is the perplexity."""

    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # predicted tokens (ctx - 1 per window)
    windows: int
    ctx: int
    # mean NLL of the tokens at window positions [lo, hi) (position j is predicted from the j tokens before it),
    # keyed "lo-hi": shows whether a model loses more late in the window, beyond the lengths it was trained on
    nll_by_position: dict[str, float] = field(default_factory=dict)

    def __float__(self) -> float:
        return self.ppl

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _windows(token_ids: torch.Tensor, ctx: int | None) -> torch.Tensor:
    """``[W, ctx]`` non-overlapping windows: of the stream (1-D) or of each row (2-D); tails dropped."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype.is_floating_point:
        raise TypeError("rabit: token_ids must be an integer torch.Tensor, 1-D stream or [N, T]")
    if token_ids.dim() == 1:
        token_ids = token_ids[None]
    elif token_ids.dim() != 2:
        raise ValueError(f"rabit: token_ids must be 1-D or 2-D, got shape {tuple(token_ids.shape)}")
    t = token_ids.shape[1]
    ctx = t if ctx is None else ctx
    if ctx < 2:
        raise ValueError(f"rabit: ctx must be >= 2 (got {ctx})")
    n = t // ctx
    if n == 0 or token_ids.shape[0] == 0:
        raise ValueError(f"rabit: {t} tokens per row are fewer than one window of ctx={ctx}; lower ctx")
    return token_ids[:, : n * ctx].reshape(-1, ctx)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 → float32 for softmax statistics; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor, autocast: str) -> torch.Tensor:
    dev = model_device(model)
    with autocast_context(dev, autocast):
        return model(input_ids=ids.to(dev), use_cache=False).logits


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    ctx: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    autocast: str = "none",
) -> PerplexityResult:
    """Perplexity of ``model`` on ``token_ids``: exp of the mean token NLL over non-overlapping windows.

    ``token_ids`` is a 1-D stream (cut into windows of ``ctx``, the GPTQ/QuIP#/QTIP protocol) or
    ``[N, T]`` rows (each row cut into windows of ``ctx``, default ``T``; windows never cross rows).
    A window of ctx tokens scores its last ctx-1 tokens; the tail that does not fill a window is
    dropped. Returns a :class:`PerplexityResult` (``float(r)`` is the perplexity).
    """
    wins = _windows(token_ids, ctx)
    check_positive_int(batch_size, "batch_size", "rabit.perplexity")  # range(0, W, -1) would score nothing: ppl 1.0
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:  # a Hugging Face model: ids outside the vocabulary fail deep in the embedding otherwise
        check_token_ids(wins, emb.num_embeddings, "rabit.perplexity")
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    by_pos = torch.zeros(wins.shape[1] - 1, dtype=torch.float64)  # NLL summed over windows, per position 1..ctx-1
    try:
        for i in tqdm(range(0, wins.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False):
            x = wins[i : i + batch_size]
            logits = _logits(model, x, autocast)
            tgt = x[:, 1:].to(logits.device)
            nll = F.cross_entropy(_upcast(logits[:, :-1]).reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                  reduction="none")
            by_pos += nll.view(tgt.shape).double().sum(0).cpu()
    finally:
        model.train(was_training)
    count = by_pos.numel() * wins.shape[0]
    mean = float(by_pos.sum()) / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=count, windows=wins.shape[0], ctx=wins.shape[1],
                            nll_by_position=_position_buckets(by_pos / wins.shape[0]))


# window positions at which the per-position NLL is split: the training lengths in use (256, 512) and the ctx values
POSITION_EDGES = (1, 64, 256, 512, 1024, 2048, 4096, 8192)


def _position_buckets(mean_nll: torch.Tensor) -> dict[str, float]:
    """Mean of ``mean_nll[j - 1]`` (the NLL at position j) over each [lo, hi) of POSITION_EDGES within the window."""
    last = mean_nll.numel() + 1  # positions run 1 .. ctx-1
    edges = [e for e in POSITION_EDGES if e < last] + [last]
    return {f"{lo}-{hi}": float(mean_nll[lo - 1 : hi - 1].mean()) for lo, hi in zip(edges[:-1], edges[1:])}


def shared_dir(path: str | os.PathLike | None = None) -> Path:
    """The project's shared folder: ``path``, else ``$RABIT_SHARED``, else ``<repo>/../shared``."""
    if path is not None:
        return Path(path)
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env)
    guess = Path(__file__).resolve().parent.parent.parent / "shared"
    if guess.is_dir():
        return guess
    raise FileNotFoundError(
        f"rabit: cannot find the shared data folder (looked for {str(guess)!r}); set the environment "
        f"variable {SHARED_ENV} to the folder that holds data/wikitext-2-raw/wiki.test.raw"
    )


def wikitext2_text(path: str | os.PathLike | None = None) -> str:
    """WikiText-2 raw test text, rows joined with ``"\\n\\n"`` (the literature's protocol).

    ``path`` is the ``wiki.test.raw`` file itself; by default it is looked up in :func:`shared_dir`.
    """
    file = Path(path) if path is not None else shared_dir() / WIKITEXT2_RAW_TEST
    if not file.is_file():
        raise FileNotFoundError(f"rabit: WikiText-2 test file {str(file)!r} not found; pass path= or set "
                                f"{SHARED_ENV} to the shared folder")
    # The shared copy has its empty rows dropped upstream; skip any that remain so the join
    # reproduces the standard "\n\n".join(dataset["text"]) text up to whitespace.
    rows = [r for r in file.read_text(encoding="utf-8").split("\n") if r]
    return "\n\n".join(rows)


def wikitext2_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    ctx: int = 2048,
    path: str | os.PathLike | None = None,
    batch_size: int = 1,
    progress: bool = True,
    autocast: str = "none",
) -> PerplexityResult:
    """WikiText-2 raw test perplexity: join rows with "\\n\\n", tokenize once (with BOS), windows of ctx.

    Reference (shared/README.md): SmolLM2-135M-Instruct, fp32, ctx 2048 → 22.23 over 147 windows.
    """
    return perplexity(model, wikitext2_ids(tokenizer, path), ctx=ctx, batch_size=batch_size, progress=progress,
                      autocast=autocast)


def wikitext2_ids(tokenizer: Any, path: str | os.PathLike | None = None) -> torch.Tensor:
    """The WikiText-2 raw test split as one LongTensor of token ids (rows joined by "\n\n", BOS first): the
    input of :func:`wikitext2_perplexity`, for callers that evaluate it several times."""
    return torch.tensor(encode_text(tokenizer, wikitext2_text(path), bos=True), dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Agreement with the teacher
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def compare_to_teacher(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    token_ids: torch.Tensor,
    batch_size: int = 8,
    progress: bool = False,
    autocast: str = "none",
) -> dict[str, float]:
    """How closely ``student`` follows ``teacher`` on rows ``token_ids [N, T]``.

    Returns ``kl`` (mean per-token KL(teacher ‖ student), nats), ``top1_agreement`` (fraction of
    positions where both argmaxes agree), ``student_ppl`` and ``teacher_ppl`` (next-token
    perplexity of the rows). KL and agreement use all T positions; perplexity the last T-1 tokens.
    """
    if token_ids.dim() == 1:
        token_ids = token_ids[None]
    if token_ids.dim() != 2 or token_ids.shape[1] < 2:
        raise ValueError(f"rabit: token_ids must be [N, T] with T >= 2, got shape {tuple(token_ids.shape)}")
    from tqdm.auto import tqdm

    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    kl_sum, agree, positions, s_nll, t_nll, predicted = 0.0, 0, 0, 0.0, 0.0, 0
    try:
        for i in tqdm(range(0, token_ids.shape[0], batch_size), desc="compare", disable=not progress, leave=False):
            x = token_ids[i : i + batch_size]
            s = _upcast(_logits(student, x, autocast))
            t = _upcast(_logits(teacher, x, autocast)).to(s.device, s.dtype)
            v = s.shape[-1]
            s_logp = F.log_softmax(s, -1).reshape(-1, v)
            t_logp = F.log_softmax(t, -1).reshape(-1, v)
            kl_sum += float(F.kl_div(s_logp, t_logp, log_target=True, reduction="sum"))
            agree += int((s_logp.argmax(-1) == t_logp.argmax(-1)).sum())
            positions += s_logp.shape[0]
            tgt = x[:, 1:].reshape(-1).to(s.device)
            s_nll += float(F.cross_entropy(s[:, :-1].reshape(-1, v), tgt, reduction="sum"))
            t_nll += float(F.cross_entropy(t[:, :-1].reshape(-1, v), tgt, reduction="sum"))
            predicted += tgt.numel()
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return {
        "kl": kl_sum / positions,
        "top1_agreement": agree / positions,
        "student_ppl": math.exp(s_nll / predicted),
        "teacher_ppl": math.exp(t_nll / predicted),
    }


# --------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def tokens_per_second(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int = 64,
    warmup: int = 1,
    repeats: int = 3,
    autocast: str = "none",
) -> dict[str, float]:
    """Greedy decoding speed with a KV cache: new tokens per second (best of ``repeats``).

    ``prompt_ids`` is 1-D (batch 1) or ``[B, P]``; every row produces ``new_tokens`` tokens (no early
    stop at EOS, so the work is fixed). ``warmup`` untimed runs first (allocator, kernels, caches).
    Returns ``tokens_per_s`` (B·new_tokens / best time), ``seconds`` (best), ``batch``, ``new_tokens``.
    """
    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"rabit: need new_tokens >= 1, repeats >= 1, warmup >= 0 "
                         f"(got {new_tokens}, {repeats}, {warmup})")
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    dev = model_device(model)
    prompt_ids = prompt_ids.to(dev)
    was_training = model.training
    model.eval()

    times = []
    try:
        with autocast_context(dev, autocast):
            for i in range(warmup + repeats):
                _sync(dev)
                t0 = time.perf_counter()
                decode_loop(model, prompt_ids, new_tokens, greedy)
                _sync(dev)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    best = min(times)
    b = prompt_ids.shape[0]
    return {"tokens_per_s": b * new_tokens / best, "seconds": best, "batch": b, "new_tokens": new_tokens}


# --------------------------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------------------------


def _is_linear_layer(module: torch.nn.Module) -> bool:
    # nn.Linear, or one of rabit's replacements for it (RaBiTLinear, PackedRaBiTLinear), detected by
    # the module that defines the class so this file need not import the compiled extension.
    return isinstance(module, torch.nn.Linear) or type(module).__module__ in ("rabit.nn", "rabit._nn")


def _tensor_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = (t.data_ptr(), t.dtype, t.numel()) if t.numel() else None
        if key in seen:
            continue  # tied weights (embedding = lm_head) are stored once
        if key is not None:
            seen.add(key)
        total += t.numel() * t.element_size()
    return total


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the decoder linear layers vs the whole model (parameters and buffers).

    "Linear layers" are the ``nn.Linear`` modules and their rabit replacements, except the output
    head (``get_output_embeddings()``, never quantized). Packed int32 sign words count at 4 bytes
    each, i.e. at their real size; tied tensors count once. Returns ``linear_bytes``,
    ``total_bytes``, ``other_bytes`` and ``linear_modules``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: set = set()
    linear, n_linear = 0, 0
    for module in model.modules():
        if module is head or not _is_linear_layer(module):
            continue
        n_linear += 1
        linear += _tensor_bytes(list(module.parameters()) + list(module.buffers()), seen)
    rest = _tensor_bytes(list(model.parameters()) + list(model.buffers()), seen)
    return {"linear_bytes": linear, "total_bytes": linear + rest, "other_bytes": rest, "linear_modules": n_linear}
