"""Tokenizers for the torch-free runtime: llama2.c ``tok*.bin`` and Hugging Face ``tokenizer.json``.

:class:`Llama2cTokenizer` here is a torch-free copy of ``rabit.models.llama2c.Llama2cTokenizer``'s
encode/decode (that module imports torch); ``tests/test_runtime.py`` checks the two agree.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from .format import ExportFormatError, read_config


class Llama2cTokenizer:
    """llama2.c BPE-by-score tokenizer (dummy-prefix space, byte fallback at id+3), as ``run.c``."""

    bos_id = 1
    eos_id = 2

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"rabit.runtime: llama2.c tokenizer {str(path)!r} not found; re-export the "
                                    "model with its tokenizer")
        data = path.read_bytes()
        if len(data) < 4:
            raise ExportFormatError(f"rabit.runtime: llama2.c tokenizer {path} is truncated; re-copy it")
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        off = 4
        while off < len(data):
            if off + 8 > len(data):
                raise ExportFormatError(f"rabit.runtime: llama2.c tokenizer {path} is truncated; re-copy it")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or off + n > len(data):
                raise ExportFormatError(f"rabit.runtime: llama2.c tokenizer {path} is corrupted; re-copy it")
            self.pieces.append(data[off:off + n])
            self.scores.append(score)
            off += n
        if len(self.pieces) < 3 + 256:
            raise ExportFormatError(f"rabit.runtime: llama2.c tokenizer {path} has only {len(self.pieces)} "
                                    "entries; expected at least 259")
        self.path = path
        self._ids: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self._ids.setdefault(p, i)
        self._split_words = not any(b" " in p[1:] for p in self.pieces)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def eos_token_id(self) -> int:
        return self.eos_id

    def _bpe(self, text: str) -> list[int]:
        ids: list[int] = []
        for ch in text:
            i = self._ids.get(ch.encode("utf-8", "surrogatepass"))
            if i is not None:
                ids.append(i)
            else:
                ids.extend(b + 3 for b in ch.encode("utf-8", "surrogatepass"))
        while True:
            best, best_i, best_id = -1e10, -1, -1
            for k in range(len(ids) - 1):
                j = self._ids.get(self.pieces[ids[k]] + self.pieces[ids[k + 1]])
                if j is not None and self.scores[j] > best:
                    best, best_i, best_id = self.scores[j], k, j
            if best_i < 0:
                return ids
            ids[best_i:best_i + 2] = [best_id]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = [self.bos_id] if bos else []
        if text:
            text = " " + text
            words = re.split(r"(?= )", text) if self._split_words else [text]
            for w in words:
                if w:
                    ids.extend(self._bpe(w))
        return ids

    def decode(self, ids) -> str:
        out = bytearray()
        prev = -1
        for t in ids:
            t = int(t)
            if t in (self.bos_id, self.eos_id):
                prev = t
                continue
            piece = self.pieces[t]
            if prev == self.bos_id and piece[:1] == b" ":
                piece = piece[1:]
            m = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", piece)
            out += bytes([int(m.group(1), 16)]) if m else piece
            prev = t
        return out.decode("utf-8", errors="replace")


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
