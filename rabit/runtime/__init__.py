"""rabit.runtime: run an exported RaBiT model with NumPy and ``rabit._core`` only (no torch import).

    from rabit import runtime
    model, tok = runtime.load("exported_dir")          # LlamaRuntime, tokenizer (or None)
    text = runtime.generate_text("exported_dir", "Once upon a time", max_new_tokens=32)
    logits = model.forward(tok.encode("Once upon a time"))   # [T, vocab] float32

Supports Llama-family exports (``model_type: "llama"``, default RoPE, SiLU MLP). The directory
format is documented in :mod:`rabit.runtime.format`.
"""

from __future__ import annotations

import os

from .format import FORMAT_VERSION, QUANT_METHOD, ExportFormatError, read_config, read_safetensors_header
from .model import KVCache, LlamaRuntime
from .tokenizer import HFTokenizer, Llama2cTokenizer, load_tokenizer

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "ExportFormatError", "HFTokenizer", "KVCache", "Llama2cTokenizer",
           "LlamaRuntime", "generate_text", "load", "load_tokenizer", "read_config", "read_safetensors_header"]


def load(model_dir: str | os.PathLike, tokenizer: bool = True, int8_activations: bool = False,
         head_dtype: str | None = None):
    """``(LlamaRuntime, tokenizer)`` of an exported directory; the tokenizer is None if none was exported
    (or when ``tokenizer=False``). ``int8_activations`` / ``head_dtype="int8"``: the opt-in int8 classes of
    :meth:`LlamaRuntime.load`."""
    model = LlamaRuntime.load(model_dir, int8_activations=int8_activations, head_dtype=head_dtype)
    tok = None
    if tokenizer and model.config["quantization_config"].get("tokenizer") is not None:
        tok = load_tokenizer(model_dir, model.config)
    return model, tok


def generate_text(model_or_dir, prompt: str, max_new_tokens: int = 32, tokenizer=None,
                  stop_at_eos: bool = True) -> str:
    """Greedy continuation of ``prompt`` (prompt included), decoded; ``model_or_dir`` is a directory or a
    loaded :class:`LlamaRuntime` (then pass ``tokenizer``)."""
    if isinstance(model_or_dir, LlamaRuntime):
        model, tok = model_or_dir, tokenizer
    else:
        model, tok = load(model_or_dir)
        tok = tokenizer or tok
    if tok is None:
        raise FileNotFoundError("rabit.runtime: no tokenizer; the export has none, pass tokenizer= or use "
                                "LlamaRuntime.generate on token ids")
    eos = getattr(tok, "eos_token_id", None) if stop_at_eos else None
    ids = model.generate(tok.encode(prompt), max_new_tokens=max_new_tokens, eos_token_id=eos)
    return tok.decode(ids)
