"""The llama2.c tokenizer (``tok*.bin``), torch-free: shared by rabit.models (torch) and rabit.runtime
(NumPy only)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "stories260K"
TOK512_BIN = ASSET_DIR / "tok512.bin"


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"rabit: {what} file {path} not found; pass the path of an existing "
                                f"file (the vendored stories260K files live in {ASSET_DIR})")


def _read_file(path: Path, what: str) -> bytes:
    _require_file(path, what)
    return path.read_bytes()



# ----------------------------------------------------------------------------------------------
# Tokenizer


class Encoding(dict):
    """A tokenizer's output: a dict whose keys read as attributes too (``enc.input_ids``), as Hugging Face's."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"rabit: the encoding has no {name!r}; it holds {sorted(self)}") from None


class Llama2cTokenizer:
    """The llama2.c tokenizer (``tok*.bin``: int32 max_token_length, then per entry float32 score,
    int32 length, bytes), encoding and decoding exactly as ``run.c`` does.

    Encoding: a dummy-prefix ``" "`` token for non-empty text, one token per UTF-8 code point
    (byte fallback ``id = byte + 3`` for code points missing from the vocab), then repeatedly
    merge the adjacent pair whose concatenation is in the vocab with the highest score (leftmost
    on ties). Decoding: a piece right after BOS loses its leading space, ``<0xXX>`` pieces are raw
    bytes, and the bytes are decoded as UTF-8 with ``errors="replace"``.

    Also callable like a (tiny) Hugging Face tokenizer: ``tok(text, return_tensors="pt")``.
    """

    bos_id = 1
    eos_id = 2

    def __init__(self, path: str | Path = TOK512_BIN):
        path = Path(path)
        data = _read_file(path, "llama2.c tokenizer")
        if len(data) < 4:
            raise ValueError(f"rabit: llama2.c tokenizer {path} is truncated: {len(data)} bytes, "
                             "expected at least a 4-byte header; re-copy the file")
        (self.max_token_length,) = struct.unpack_from("<i", data, 0)
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        off = 4
        while off < len(data):
            if off + 8 > len(data):
                raise ValueError(f"rabit: llama2.c tokenizer {path} is truncated inside entry "
                                 f"{len(self.pieces)} (byte {off} of {len(data)}); re-copy the file")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or off + n > len(data):
                raise ValueError(f"rabit: llama2.c tokenizer {path} is truncated or corrupted at "
                                 f"entry {len(self.pieces)} (length {n} at byte {off - 4}); "
                                 "re-copy the file")
            self.pieces.append(data[off:off + n])
            self.scores.append(score)
            off += n
        if len(self.pieces) < 3 + 256:
            raise ValueError(f"rabit: llama2.c tokenizer {path} has only {len(self.pieces)} entries; "
                             "expected <unk>, <s>, </s> and 256 byte-fallback pieces at least")
        self.path = path
        self._ids: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self._ids.setdefault(p, i)  # run.c's bsearch finds *a* match; duplicates do not occur
        # Merges never cross a space when no piece has a space after its first byte, so text can
        # be encoded word by word (same result as run.c's global loop, but linear, and cacheable).
        self._split_words = not any(b" " in p[1:] for p in self.pieces)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    # Hugging Face-style aliases, so generate()/eval code can read them.
    bos_token_id = bos_id
    eos_token_id = eos_id
    pad_token_id = eos_id

    def __len__(self) -> int:
        return self.vocab_size

    def _bpe(self, text: str) -> list[int]:
        ids: list[int] = []
        for ch in text:
            i = self._ids.get(ch.encode("utf-8", "surrogatepass"))
            if i is not None:
                ids.append(i)
            else:
                ids.extend(b + 3 for b in ch.encode("utf-8", "surrogatepass"))
        while True:
            best, best_i = -1e10, -1
            for k in range(len(ids) - 1):
                j = self._ids.get(self.pieces[ids[k]] + self.pieces[ids[k + 1]])
                if j is not None and self.scores[j] > best:
                    best, best_i, best_id = self.scores[j], k, j
            if best_i < 0:
                return ids
            ids[best_i:best_i + 2] = [best_id]

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text`` as llama2.c ``encode()`` produces them."""
        ids = [self.bos_id] if bos else []
        if text:
            text = " " + text  # the dummy prefix is exactly the " " piece, merged like any other
            words = re.split(r"(?= )", text) if self._split_words else [text]
            for w in words:
                if not w:
                    continue
                got = self._cache.get(w)
                if got is None:
                    got = self._bpe(w)
                    if len(self._cache) < 100_000:
                        self._cache[w] = got
                ids.extend(got)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (list or tensor) as ``run.c`` prints it; BOS/EOS are not printed."""
        if hasattr(ids, "tolist"):
            ids = ids.reshape(-1).tolist()
        out = bytearray()
        prev = -1
        for t in ids:
            t = int(t)
            if not 0 <= t < len(self.pieces):  # a negative id would silently index from the end
                raise ValueError(f"rabit: token id {t} is outside this tokenizer's vocabulary "
                                 f"(0..{len(self.pieces) - 1}); were the ids made with another tokenizer?")
            if t in (self.bos_id, self.eos_id):
                prev = t
                continue
            piece = self.pieces[t]
            if prev == self.bos_id and piece[:1] == b" ":
                piece = piece[1:]  # sentencepiece strips the dummy prefix after BOS
            m = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", piece)
            out += bytes([int(m.group(1), 16)]) if m else piece
            prev = t
        return out.decode("utf-8", errors="replace")

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def __call__(self, text, return_tensors: str | None = None, bos: bool = True, eos: bool = False):
        """``{"input_ids", "attention_mask"}`` for a string (or a list of equal-length encodings), readable as
        ``enc["input_ids"]`` or ``enc.input_ids`` like a Hugging Face tokenizer's output."""
        batch = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, bos=bos, eos=eos) for t in batch]
        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError("rabit: Llama2cTokenizer does not pad; encode texts one at a time "
                                 "or pass texts that tokenize to equal lengths")
            import torch  # only for return_tensors='pt'

            t = torch.tensor(ids, dtype=torch.long)
            return Encoding(input_ids=t, attention_mask=torch.ones_like(t))
        if return_tensors is not None:
            raise ValueError(f"rabit: Llama2cTokenizer supports return_tensors='pt' or None, "
                             f"not {return_tensors!r}")
        if isinstance(text, str):
            return Encoding(input_ids=ids[0], attention_mask=[1] * len(ids[0]))
        return Encoding(input_ids=ids, attention_mask=[[1] * len(x) for x in ids])


# ----------------------------------------------------------------------------------------------
# Checkpoint
