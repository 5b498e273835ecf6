"""Tokenizers for the torch-free runtime: llama2.c ``tok*.bin`` and Hugging Face ``tokenizer.json``.

:class:`Llama2cTokenizer` here is a torch-free copy of ``rabit.models.llama2c.Llama2cTokenizer``'s
encode/decode (that module imports torch); ``tests/test_runtime.py`` checks the two agree.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..llama2c_tokenizer import Llama2cTokenizer  # noqa: F401  (torch-free, shared with rabit.models)
from .format import read_config


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (no transformers, no torch)."""

    def __init__(self, model_dir: str | os.PathLike, eos_token_id: int | None = None):
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"rabit.runtime: {str(path)!r} not found; the torch-free runtime needs a fast "
                                    "tokenizer's tokenizer.json (re-export with a Hugging Face fast tokenizer)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("rabit.runtime: reading tokenizer.json needs the `tokenizers` package: "
                              "pip install tokenizers") from None
        self._tok = Tokenizer.from_file(str(path))
        self.eos_token_id = eos_token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=bos).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(model_dir: str | os.PathLike, config: dict | None = None):
    """The tokenizer an export recorded in ``quantization_config.tokenizer``; error if none was saved."""
    config = config or read_config(model_dir)
    entry = config["quantization_config"].get("tokenizer")
    if entry is None:
        raise FileNotFoundError(f"rabit.runtime: {str(model_dir)!r} was exported without a tokenizer; pass token "
                                "ids instead of text, or re-export with tokenizer=")
    if entry["format"] == "llama2c":
        return Llama2cTokenizer(Path(model_dir) / entry.get("file", ""))
    eos = config.get("eos_token_id")
    return HFTokenizer(model_dir, eos if isinstance(eos, int) else None)
