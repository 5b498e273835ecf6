"""Distillation data for RaBiT QAT.

The project has no training text (see ``shared/README.md``): the published data-free recipe of
LLM-QAT (Liu et al. 2023, arXiv 2305.17888) samples sequences from the FP teacher itself and
distils the student on them. That is what :func:`generate_teacher_data` does. A user who has text
of their own can turn it into training windows with :func:`tokens_from_text_file`.

Token tensors are stored as safetensors (or ``.npy``), never pickle, and every write goes to a
temporary file first and is then moved into place with ``os.replace``, so a crash never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .sampling import row_keys, sample_next, uniforms
from .static_decode import StaticDecoder, check_model

logger = logging.getLogger(__name__)

#: Bumped whenever the meaning of the cache metadata changes, so old caches are regenerated.
CACHE_FORMAT = "rabit-teacher-tokens/4"  # 2: counter-based draws (rabit.sampling); 3: salted hash;
# 4: Llama-family teachers on CUDA sampled by StaticDecoder (same draws; rounding may move a token)

#: How a teacher sequence begins (generate_teacher_data's ``start``): "bos" (BOS, then sampled tokens) or
#: "random-token" (BOS and one token drawn uniformly from the vocabulary: LLM-QAT's varied first token).
DATA_STARTS = ("bos", "random-token")


def bos_token_id(model: Any) -> int:
    """The token a teacher sequence starts with: the model config's BOS, or 1 (Llama's) where the config has none."""
    bos = model.config.bos_token_id
    return int(bos if bos is not None else 1)


# --------------------------------------------------------------------------------------------
# Tokenizer adapter
# --------------------------------------------------------------------------------------------


def encode_text(tokenizer: Any, text: str, bos: bool = True) -> list[int]:
    """Token ids of ``text`` with a leading BOS, for either tokenizer family the project uses.

    * rabit's llama2.c tokenizer: ``tokenizer.encode(text, bos=True)``;
    * Hugging Face tokenizers (``PreTrainedTokenizerBase``): ``tokenizer(text)["input_ids"]``,
      whose special-token handling adds BOS for Llama-family models (the GPTQ/QuIP# protocol).
    """
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a hard dependency of the package
        PreTrainedTokenizerBase = ()  # type: ignore[assignment]
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return list(tokenizer(text, add_special_tokens=bos, verbose=False)["input_ids"])
    if not hasattr(tokenizer, "encode"):
        raise TypeError(
            f"rabit: tokenizer of type {type(tokenizer).__name__} has no encode(); pass the "
            "tokenizer returned by rabit.models.load_model / load_stories260k or a Hugging Face tokenizer"
        )
    return list(tokenizer.encode(text, bos=bos))


# --------------------------------------------------------------------------------------------
# Autoregressive decoding with a KV cache (shared by sampling and the tokens/s benchmark)
# --------------------------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (the whole model is expected on one device)."""
    try:
        return next(model.parameters()).device
    except StopIteration as e:
        raise ValueError("rabit: the model has no parameters; cannot infer its device") from e


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5.x renamed forward(past_key_values=) to forward(cache=) and warns on the old name.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def decode_loop(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int,
    choose: Callable[[torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """Extend ``prompt_ids [B, P]`` by ``new_tokens`` tokens with a KV cache.

    ``choose(logits [B, V] float32, pos) -> [B]`` picks the token placed at sequence position ``pos``
    (:func:`greedy`, or a sampler). One model call per new token; the prompt is processed in one call. The
    sequence never stops early at EOS: distillation and timing both need fixed-length output, and the teacher
    itself defines what comes after an EOS (stories260K, like llama2.c's training data, just starts the next
    story).
    """
    from transformers import DynamicCache

    out = torch.empty(prompt_ids.shape[0], prompt_ids.shape[1] + new_tokens, dtype=torch.long,
                      device=prompt_ids.device)
    out[:, : prompt_ids.shape[1]] = prompt_ids
    if new_tokens == 0:
        return out
    cache = DynamicCache(config=getattr(model, "config", None))
    cache_kw = _cache_kwarg(model)
    step_input = prompt_ids
    pos = prompt_ids.shape[1]
    for i in range(new_tokens):
        # logits_to_keep=1: only the last position's logits are needed (saves the lm_head GEMM
        # over the whole prompt in the first call).
        logits = model(input_ids=step_input, use_cache=True, logits_to_keep=1,
                       **{cache_kw: cache}).logits[:, -1, :]
        nxt = choose(logits.float(), pos + i)
        out[:, pos + i] = nxt
        step_input = nxt[:, None]
    return out


def greedy(logits: torch.Tensor, pos: int) -> torch.Tensor:
    """:func:`decode_loop`'s ``choose`` for greedy decoding."""
    return logits.argmax(-1)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# Teacher sampling (LLM-QAT data-free recipe)
# --------------------------------------------------------------------------------------------


def generate_teacher_data(
    model: torch.nn.Module,
    n_seqs: int,
    seq_len: int,
    batch_size: int,
    bos_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    start: str = "bos",
    greedy_tokens: int = 0,
    dtype: torch.dtype | str | None = None,
    prefix: Sequence[int] = (),
) -> torch.Tensor:
    """Sample ``n_seqs`` sequences of ``seq_len`` tokens from the teacher: ``LongTensor[n, seq_len]``.

    Every row starts with ``bos_id``. With ``start="bos"`` (default) token 1 is sampled from the teacher's
    distribution after BOS and every later token from its distribution given the prefix, at ``temperature``,
    from the ``top_k`` most likely tokens when given: an unbiased sample of the teacher (at temperature 1).
    LLM-QAT's data-free recipe (Liu et al. 2023) varies the beginnings instead: ``start="random-token"`` makes
    token 1 a token drawn uniformly from the whole vocabulary (``model.config.vocab_size``; special tokens
    included, as in LLM-QAT), and ``greedy_tokens=n`` takes the n tokens after the start by argmax before
    sampling the rest (LLM-QAT: 3-5). From BOS alone greedy tokens would make every row begin alike, so
    ``greedy_tokens`` needs the random start.

    ``prefix`` (token ids; with ``start="bos"`` only) follows BOS in every row before the sampling starts: a
    prompt that steers the teacher toward a kind of text (a chat request for encyclopedia articles, say). Its
    tokens stay in the rows, so the student is trained on them too.

    Draws are counter-based (:mod:`rabit.sampling`): row r's random numbers depend only on (seed, r), not
    on the batch size or the device; the tokens can still differ between them where float rounding moves
    the teacher's probabilities across a draw. On CUDA, models that :class:`~rabit.static_decode.StaticDecoder`
    runs (Llama family, on one device) are sampled by it (static KV cache, one CUDA graph per step; see
    ``_static_sampler_applies``); otherwise :func:`decode_loop` runs the HF forward token by token. Both use the
    same draws. The model is left in the train/eval mode it was in.

    ``dtype`` (None: the model's own) is the precision the teacher samples in. A float16 or bfloat16 copy of a
    float32 teacher samples 1.8-2.1x faster on an H100/H200 (SmolLM2-135M). Its next-token distributions
    differ from float32's by ~0.25 % total variation in float16 and ~1.9 % in bfloat16
    (``benchmarks/bench_sampling.py --model``). Even so, with the same draws the rows leave the float32 sample's
    within a few tokens: a small shift of the cumulative probability already moves a draw to another token. The
    copy is made for the call and dropped after it.
    """
    if n_seqs < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(
            f"rabit: need n_seqs >= 1, seq_len >= 2 (BOS + one sampled token) and batch_size >= 1; "
            f"got n_seqs={n_seqs}, seq_len={seq_len}, batch_size={batch_size}"
        )
    check_sampling_options(temperature, top_k, start, greedy_tokens, dtype)
    prefix = [int(t) for t in prefix]
    if prefix and start != "bos":
        raise ValueError(f"rabit: a prefix follows BOS; it does not combine with start={start!r}")
    prompt_len = (1 if start == "bos" else 2) + len(prefix)
    if seq_len <= prompt_len:
        raise ValueError(f"rabit: seq_len={seq_len} leaves no sampled token after the {prompt_len}-token start "
                         f"{start!r}")
    dev = model_device(model)
    if device is not None and torch.device(device).type != dev.type:
        raise ValueError(
            f"rabit: the model is on {dev} but device={device!r} was requested; move it first "
            f"with model.to({str(device)!r})"
        )
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(
            f"rabit: seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and not 0 <= bos_id < vocab:
        raise ValueError(f"rabit: bos_id={bos_id} is outside the vocabulary [0, {vocab})")
    if start == "random-token" and not vocab:
        raise ValueError("rabit: start='random-token' needs model.config.vocab_size")
    if vocab is not None and any(not 0 <= t < vocab for t in prefix):
        raise ValueError(f"rabit: prefix token ids must lie in the vocabulary [0, {vocab}) (got {prefix})")
    dtype = sampling_dtype(model, dtype)
    if dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)  # the caller's teacher stays as it is

    prefix_row = torch.tensor([prefix], dtype=torch.long, device=dev)  # [1, len(prefix)], once for every batch

    def prompts(first: int, rows: int) -> torch.Tensor:
        """[rows, prompt_len] starts of rows first .. first + rows - 1 (their own draws: (seed, row))."""
        bos = torch.full((rows, 1), bos_id, dtype=torch.long, device=dev)
        if start == "bos":
            return torch.cat([bos, prefix_row.expand(rows, -1)], 1)
        # position 1 holds the start token, so its draw is not used by the sampler
        u = uniforms(row_keys(seed, torch.arange(first, first + rows, device=dev)), 1)
        return torch.cat([bos, (u * vocab).long().clamp_(max=vocab - 1)[:, None]], 1)

    out = torch.empty(n_seqs, seq_len, dtype=torch.long)
    bar = _progress_bar(total=n_seqs * (seq_len - prompt_len), desc="teacher data", unit="tok", enable=progress)
    t0 = time.perf_counter()
    static = _static_sampler_applies(model, seq_len)
    with _eval_mode(model):
        if static:  # one decoder (one captured graph) for every batch; the last one may use fewer of its rows
            # group_projections=False, fused_attention=False: the teacher's layers and attention run as they did
            # (stacked FP weights and the fused attention may round otherwise in the last bits), so the sampled
            # sequences stay those of the cached token files and of the published runs, and the teacher is not
            # rearranged
            dec = StaticDecoder(model, batch_size=min(batch_size, n_seqs), max_len=seq_len, temperature=temperature,
                                top_k=top_k, greedy_tokens=greedy_tokens, group_projections=False,
                                fused_attention=False)
        for first in range(0, n_seqs, batch_size):
            b = min(batch_size, n_seqs - first)
            if static:  # all dec.B rows run; rows past n_seqs are dropped (each row's draws are its own)
                ids = dec.generate(prompts(first, dec.B), seq_len - prompt_len, seed=seed, first_row=first)[:b]
            else:
                keys = row_keys(seed, torch.arange(first, first + b, device=dev))

                def choose(logits: torch.Tensor, pos: int) -> torch.Tensor:
                    if pos < prompt_len + greedy_tokens:
                        return greedy(logits, pos)
                    return sample_next(logits, keys, pos, temperature, top_k)

                ids = decode_loop(model, prompts(first, b), seq_len - prompt_len, choose)
            out[first : first + b] = ids.cpu()
            bar.update(b * (seq_len - prompt_len))
    bar.close()
    logger.info("rabit: sampled %d x %d teacher tokens in %.1f s", n_seqs, seq_len, time.perf_counter() - t0)
    return out


SAMPLING_DTYPES = ("float32", "bfloat16", "float16")


def check_sampling_options(temperature: float, top_k: int | None, start: str, greedy_tokens: int,
                           dtype: torch.dtype | str | None = None, who: str = "rabit",
                           names: dict[str, str] | None = None) -> None:
    """Raise ValueError for the first bad sampling option of :func:`generate_teacher_data`. ``who`` and ``names``
    (argument name -> the caller's name for it) make the message speak the caller's language
    (``rabit train: data_top_k must be ...``)."""
    n = {k: (names or {}).get(k, k) for k in ("temperature", "top_k", "start", "greedy_tokens", "dtype")}
    if not temperature > 0:
        raise ValueError(f"{who}: {n['temperature']} must be > 0 (got {temperature}); use {n['top_k']}=1 for greedy")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{who}: {n['top_k']} must be >= 1 or None (got {top_k})")
    if start not in DATA_STARTS:
        raise ValueError(f"{who}: {n['start']} must be one of {DATA_STARTS} (got {start!r})")
    if greedy_tokens < 0:
        raise ValueError(f"{who}: {n['greedy_tokens']} must be >= 0 (got {greedy_tokens})")
    if greedy_tokens and start == "bos":
        raise ValueError(f"{who}: {n['greedy_tokens']} > 0 with {n['start']}='bos' would begin every sequence with the "
                         f"same tokens; use {n['start']}='random-token' (LLM-QAT's recipe)")
    if dtype is not None:
        _check_sampling_dtype(dtype, f"{who}: the sampling {n['dtype']}")


def _check_sampling_dtype(dtype: torch.dtype | str, what: str) -> None:
    if not (dtype in SAMPLING_DTYPES if isinstance(dtype, str) else
            dtype in (torch.float32, torch.bfloat16, torch.float16)):
        raise ValueError(f"{what} must be one of {SAMPLING_DTYPES} (got {dtype!r})")


def sampling_dtype(model: torch.nn.Module, dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype :func:`generate_teacher_data` samples in: ``dtype`` (a torch dtype or one of
    :data:`SAMPLING_DTYPES`), or the model's own for None."""
    if dtype is None:
        return next(model.parameters()).dtype
    _check_sampling_dtype(dtype, "rabit: the sampling dtype")
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _static_sampler_applies(model: torch.nn.Module, seq_len: int) -> bool:
    """Whether :func:`generate_teacher_data` samples with StaticDecoder: on CUDA (one CUDA graph per step; 2.9x the
    HF loop on an H200, benchmarks/bench_sampling.py: 7.4 s against 21.7 s for 512 x 512), for a model on one device
    whose layout StaticDecoder runs, and seq_len >= 3 (the graph's capture needs it). On the CPU it was no faster
    (stories260K, 1,024 x 256: HF loop 10-13 s; StaticDecoder 8-22 s with grouped matmuls, 10-14 s with SDPA), so
    the CPU keeps the HF loop, as do models spread over devices (StaticDecoder would bypass accelerate's hooks)."""
    if model_device(model).type != "cuda" or seq_len < 3 or getattr(model, "hf_device_map", None):
        return False
    if len({p.device for p in model.parameters()}) > 1:
        return False
    try:
        check_model(model, seq_len)
    except (TypeError, ValueError):  # not a layout StaticDecoder runs: the HF forward, token by token
        return False
    return True


def _progress_bar(total: int, desc: str, unit: str, enable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enable, leave=False,
                dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create the output directory ``path`` with its parents; a file in its way is named at once, before any work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # path, or one of its parents, is a file
        raise FileExistsError(f"rabit: output {str(path)!r} is a file or lies under one; pass a directory "
                              "(new or existing) as the output") from None
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` and then ``os.replace`` it.

    The temporary file lives in the same directory, so the final rename is atomic on POSIX and
    Windows; if ``write`` raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600 (and some writers recreate it); give the result the
        # permissions a plain open() would have given it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:  # flush to disk before the rename makes the file visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON dump of ``obj`` to ``path``, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    atomic_write(path, write)


def _token_storage_dtype(ids: torch.Tensor) -> np.dtype:
    # int32 halves the file size and covers every vocabulary the project uses (49,152 ids at most).
    if ids.numel() and (int(ids.min()) < -(2**31) or int(ids.max()) >= 2**31):
        raise ValueError("rabit: token ids do not fit in int32")
    return np.dtype(np.int32)


def save_tokens(path: str | os.PathLike, ids: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
    """Save an integer tensor of token ids atomically.

    ``.safetensors`` (recommended; keeps ``metadata``, a dict of strings) or ``.npy`` (no metadata).
    Ids are stored as int32 and come back from :func:`load_tokens` as int64.
    """
    path = Path(path)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"rabit: token ids must be an integer tensor, got {ids.dtype}")
    arr = ids.detach().cpu().numpy().astype(_token_storage_dtype(ids))
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        meta = {k: str(v) for k, v in (metadata or {}).items()}
        atomic_write(path, lambda tmp: save_file({"input_ids": np.ascontiguousarray(arr)}, tmp, metadata=meta))
    elif path.suffix == ".npy":
        if metadata:
            raise ValueError("rabit: .npy files cannot hold metadata; save to a .safetensors path instead")

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)

        atomic_write(path, write)
    else:
        raise ValueError(f"rabit: unsupported token file suffix {path.suffix!r}; use .safetensors or .npy")


@contextlib.contextmanager
def readable_safetensors(path: str | os.PathLike, what: str, fix: str):
    """Inside it, safetensors' error for a truncated or corrupt file is a ValueError naming the file and ``fix``."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise ValueError(f"rabit: {what} {str(path)!r} is not a readable safetensors file ({e}); {fix}") from None


_TOKEN_FILE_FIX = "it is truncated or corrupt: delete it (a cached teacher-data file is sampled again) or re-copy it"


def load_tokens(path: str | os.PathLike) -> torch.Tensor:
    """Load token ids written by :func:`save_tokens` as a LongTensor (no pickle is ever loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rabit: token file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        with readable_safetensors(path, "token file", _TOKEN_FILE_FIX):
            tensors = load_file(str(path))
        if "input_ids" not in tensors:
            raise ValueError(f"rabit: {str(path)!r} has no 'input_ids' tensor; was it written by save_tokens?")
        arr = tensors["input_ids"]
    elif path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            # numpy calls any unreadable header "pickled data" and suggests allow_pickle, which is never the fix here
            raise ValueError(f"rabit: token file {str(path)!r} is not a readable .npy array ({type(e).__name__}); "
                             f"{_TOKEN_FILE_FIX}") from None
    else:
        raise ValueError(f"rabit: unsupported token file suffix {path.suffix!r}; use .safetensors or .npy")
    if not np.issubdtype(arr.dtype, np.integer):  # float ids would be truncated silently
        raise ValueError(f"rabit: token file {str(path)!r} holds {arr.dtype} values, not integer token ids")
    return torch.from_numpy(arr.astype(np.int64))


def read_token_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata dict of a ``.safetensors`` token file (empty for ``.npy``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with readable_safetensors(path, "token file", _TOKEN_FILE_FIX), safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


# --------------------------------------------------------------------------------------------
# Cached teacher data
# --------------------------------------------------------------------------------------------


def _default_model_name(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
    return str(name) if name else type(model).__name__


def cached_teacher_data(
    cache_path: str | os.PathLike,
    model: torch.nn.Module,
    n_seqs: int,
    seq_len: int,
    batch_size: int,
    bos_id: int,
    model_name: str | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    start: str = "bos",
    greedy_tokens: int = 0,
    dtype: torch.dtype | str | None = None,
    prefix: Sequence[int] = (),
) -> torch.Tensor:
    """:func:`generate_teacher_data` once, then reuse the ``.safetensors`` file at ``cache_path``.

    The cache's metadata records the model name, n_seqs, seq_len, seed, temperature, top_k, bos_id,
    start, greedy_tokens, the prefix and the sampling dtype. A cache of more sequences than asked for, the same otherwise, serves
    its first ``n_seqs`` (row r's draws depend only on (seed, r), so they are the smaller sample). If anything else
    differs from this call, the cache is regenerated (and overwritten) with a warning that names the differing
    fields. ``model_name`` defaults to the model config's
    ``name_or_path`` (or the class name); pass a distinct name when two teachers share a class.
    """
    cache_path = Path(cache_path)
    if cache_path.suffix != ".safetensors":
        raise ValueError(f"rabit: cache_path must end in .safetensors (got {str(cache_path)!r})")
    want = {
        "format": CACHE_FORMAT,
        "model": model_name or _default_model_name(model),
        "n_seqs": str(n_seqs),
        "seq_len": str(seq_len),
        "seed": str(seed),
        "temperature": repr(float(temperature)),
        "top_k": str(top_k),
        "bos_id": str(bos_id),
        "start": start,
        "greedy_tokens": str(greedy_tokens),
        "dtype": str(sampling_dtype(model, dtype)).removeprefix("torch."),
        "prefix": " ".join(str(int(t)) for t in prefix),
    }
    if cache_path.is_file():
        # caches written before start / greedy_tokens / dtype existed hold BOS-started samples of a float32 teacher
        # (and, before the prefix existed, no prefix)
        have = {"start": "bos", "greedy_tokens": "0", "dtype": "float32", "prefix": "",
                **read_token_metadata(cache_path)}
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        # row r's draws depend on (seed, r) alone, so the first n rows of a larger sample are the n-row sample
        larger = set(diff) == {"n_seqs"} and have["n_seqs"].isdigit() and int(have["n_seqs"]) > n_seqs
        if not diff or larger:
            ids = load_tokens(cache_path)
            if tuple(ids.shape) == (int(have["n_seqs"]), seq_len):
                logger.info("rabit: reusing teacher data from %s%s", cache_path,
                            f" (its first {n_seqs} of {len(ids)} sequences)" if larger else "")
                return ids[:n_seqs]
            diff = {"shape": (tuple(ids.shape), (int(have["n_seqs"]), seq_len))}
        detail = ", ".join(f"{k}: cached {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        logger.warning("rabit: teacher-data cache %s does not match this request (%s); regenerating it",
                       cache_path, detail)
    ids = generate_teacher_data(model, n_seqs, seq_len, batch_size, bos_id, temperature=temperature,
                                top_k=top_k, seed=seed, device=device, progress=progress, start=start,
                                greedy_tokens=greedy_tokens, dtype=dtype, prefix=prefix)
    save_tokens(cache_path, ids, metadata=want)
    return ids


# --------------------------------------------------------------------------------------------
# User text
# --------------------------------------------------------------------------------------------


def tokens_from_text_file(path: str | os.PathLike, tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Tokenize a UTF-8 text file once and cut it into non-overlapping rows: ``LongTensor[n, seq_len]``.

    The text gets one BOS at its start (as the perplexity protocol does); the tail that does not
    fill a whole row is dropped. Raises FileNotFoundError for a missing file and ValueError for an
    empty file or one with fewer than ``seq_len`` tokens. Do not pass an evaluation split here.
    """
    if seq_len < 2:
        raise ValueError(f"rabit: seq_len must be >= 2 (got {seq_len})")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rabit: text file {str(path)!r} does not exist (or is not a file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"rabit: text file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); pass a "
                         f"plain-text file") from None
    if not text.strip():
        raise ValueError(f"rabit: text file {str(path)!r} is empty; it needs at least {seq_len} tokens of text")
    ids = encode_text(tokenizer, text, bos=True)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(
            f"rabit: text file {str(path)!r} gives only {len(ids)} tokens, fewer than one row of "
            f"seq_len={seq_len}; use more text or a smaller seq_len"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
