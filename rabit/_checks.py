"""Input checks shared by the modules that take token ids (training, calibration, evaluation, decoding): one
message for one mistake, wherever it is made."""

from __future__ import annotations

import dataclasses
import numbers

import torch

#: The activation and scale dtypes the packed ops take (their C checks say the same).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_int(value) -> bool:
    """An int, and not a bool (True is an int to Python, not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_number_fields(config, who: str) -> None:
    """A dataclass's fields whose default is a float take a real number (an int too), not a string or a bool: a
    string would otherwise fail later, in a comparison, with an error that does not name the field."""
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if v is None and "None" in str(f.type):  # an optional number (e.g. grad_clip=None: no clipping)
            continue
        if isinstance(f.default, float) and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise TypeError(f"{who}: {f.name} must be a number, got {v!r} ({type(v).__name__})")


def check_token_ids(token_ids: torch.Tensor, vocab_size: int, who: str = "rabit") -> None:
    """Integer ids inside ``[0, vocab_size)``: an id outside would fail deep in the embedding with an IndexError."""
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(f"{who}: token ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise TypeError(f"{who}: token ids must be an integer tensor, got {token_ids.dtype}")
    if token_ids.numel() == 0:
        return
    lo, hi = int(token_ids.min()), int(token_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{who}: token ids span [{lo}, {hi}] but the model's vocabulary is [0, {vocab_size}); "
                         "were the tokens made with another tokenizer?")


def check_positive_int(value, name: str, who: str = "rabit") -> None:
    if not (is_int(value) and value >= 1):
        raise ValueError(f"{who}: {name} must be an integer >= 1, got {value!r}")


def validate_token_ids(token_ids: torch.Tensor, vocab_size: int, batch_size: int | None = None,
                       max_positions: int | None = None, who: str = "rabit") -> torch.Tensor:
    """Training or calibration token ids: ``[N, T]`` integers in ``[0, vocab_size)``, T >= 2, at most
    ``max_positions`` per sequence and at least ``batch_size`` sequences; returns them as int64."""
    check_token_ids(token_ids, vocab_size, who)
    if token_ids.dim() != 2:
        raise ValueError(f"{who}: token ids must be 2-D [n_seqs, seq_len], got shape {tuple(token_ids.shape)}")
    n, t = token_ids.shape
    if t < 2:
        raise ValueError(f"{who}: sequences must have at least 2 tokens to predict anything (seq_len={t})")
    if n < 1:
        raise ValueError(f"{who}: token ids have no sequences; expected at least one sequence")
    if batch_size is not None and batch_size > n:
        raise ValueError(f"{who}: batch_size={batch_size} is larger than the number of sequences ({n}); "
                         "use more data or a smaller batch_size")
    if max_positions is not None and t > max_positions:
        raise ValueError(f"{who}: sequences of {t} tokens exceed the model's max_position_embeddings={max_positions}")
    return token_ids.long()
