"""Zero-shot lm-eval-harness evaluation of an in-memory model, offline, on the local task files.

    from rabit.lmeval import evaluate
    res = evaluate(model, tokenizer, ["piqa", "arc_easy"], limit=200, batch_size=16)
    res["results"]["piqa"]["acc"]

Runs ``lm_eval.simple_evaluate`` with ``HFLM(pretrained=<model object>, tokenizer=...)`` and a
``TaskManager`` whose include path holds rabit's task configs (:mod:`rabit.lm_eval_tasks`), with
``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` so nothing is downloaded. A llama2.c tokenizer
(stories260K) is wrapped in :class:`Llama2cHFTokenizer`, a Hugging Face ``PreTrainedTokenizer`` that
encodes exactly as the wrapped tokenizer does, because lm-eval's HFLM accepts only HF tokenizers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from .lm_eval_tasks import TASKS, prepare_task_dir

__all__ = ["Llama2cHFTokenizer", "TASKS", "as_hf_tokenizer", "evaluate"]  # noqa: F822 (built lazily)

_LM_EVAL_HINT = "pip install lm_eval==0.4.13"


def _require_lm_eval():
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(f"rabit: lm-eval-harness is not installed: {_LM_EVAL_HINT}") from None
    import datasets.config as dcfg

    # datasets reads the variables at import time; make an earlier import offline too
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, True)


# ----------------------------------------------------------------------------------------------
# A Hugging Face face for the llama2.c tokenizer


def _make_adapter_class():
    from transformers import PreTrainedTokenizer

    class Llama2cHFTokenizer(PreTrainedTokenizer):
        """HF ``PreTrainedTokenizer`` over a :class:`rabit.models.Llama2cTokenizer`: ``encode`` gives
        BOS + the llama2.c ids (``add_special_tokens=False``: no BOS), ``decode`` its text."""

        vocab_files_names: dict[str, str] = {}
        model_input_names = ["input_ids", "attention_mask"]
        _SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>"}

        def __init__(self, llama2c_tokenizer, **kwargs):
            self.inner = llama2c_tokenizer
            self._id_to_tok = [self._SPECIAL.get(i, p.decode("latin-1")) for i, p in enumerate(self.inner.pieces)]
            self._tok_to_id = {t: i for i, t in enumerate(self._id_to_tok)}
            if len(self._tok_to_id) != len(self._id_to_tok):
                raise ValueError("rabit: the llama2.c vocabulary has duplicate pieces; it cannot be wrapped")
            kwargs.setdefault("bos_token", "<s>")
            kwargs.setdefault("eos_token", "</s>")
            kwargs.setdefault("unk_token", "<unk>")
            kwargs.setdefault("pad_token", "</s>")  # stories end with EOS; lm-eval never scores padding
            kwargs.setdefault("special_tokens_pattern", "bos")
            kwargs.setdefault("clean_up_tokenization_spaces", False)
            kwargs.setdefault("name_or_path", str(getattr(self.inner, "path", "llama2c")))
            super().__init__(**kwargs)

        @property
        def vocab_size(self) -> int:
            return len(self._id_to_tok)

        def get_vocab(self) -> dict[str, int]:
            return dict(self._tok_to_id)

        def _tokenize(self, text, **kwargs):
            return [self._id_to_tok[i] for i in self.inner.encode(text, bos=False)]

        def _convert_token_to_id(self, token):
            return self._tok_to_id.get(token, 0)

        def _convert_id_to_token(self, index):
            return self._id_to_tok[index]

        def convert_tokens_to_string(self, tokens):
            return self._decode([self._convert_token_to_id(t) for t in tokens], skip_special_tokens=True)

        def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
            ids = [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in token_ids]
            out, prev = [], -1
            buf = bytearray()
            for t in ids:
                if t in (1, 2):
                    if not skip_special_tokens:
                        out.append(buf.decode("utf-8", errors="replace") + self._SPECIAL[t])
                        buf = bytearray()
                    prev = t
                    continue
                piece = self.inner.pieces[t]
                if prev == 1 and piece[:1] == b" ":
                    piece = piece[1:]
                m = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", piece)
                buf += bytes([int(m.group(1), 16)]) if m else piece
                prev = t
            return "".join(out) + buf.decode("utf-8", errors="replace")

        def save_vocabulary(self, save_directory, filename_prefix=None):
            prefix = f"{filename_prefix}-" if filename_prefix else ""
            dst = Path(save_directory) / f"{prefix}{Path(self.inner.path).name}"
            shutil.copyfile(self.inner.path, dst)
            return (str(dst),)

    return Llama2cHFTokenizer


_ADAPTER = None


def __getattr__(name):
    if name == "Llama2cHFTokenizer":  # built lazily: importing transformers is slow
        global _ADAPTER
        if _ADAPTER is None:
            _ADAPTER = _make_adapter_class()
        return _ADAPTER
    raise AttributeError(name)


def as_hf_tokenizer(tokenizer):
    """``tokenizer`` if it is a Hugging Face tokenizer; a llama2.c tokenizer wrapped; else TypeError."""
    from transformers import PreTrainedTokenizerBase

    from .models.llama2c import Llama2cTokenizer

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, Llama2cTokenizer):
        return __getattr__("Llama2cHFTokenizer")(tokenizer)
    raise TypeError(f"rabit.lmeval: tokenizer of type {type(tokenizer).__name__} is not supported; pass a Hugging "
                    "Face tokenizer or a rabit Llama2cTokenizer")


# ----------------------------------------------------------------------------------------------
# Evaluation


def _clean(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` -> ``{"acc": x, "acc_stderr": s}``."""
    out = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            name, comma, filt = key.partition(",")
            if not comma or filt != "none":  # "alias", "sample_len", other filters
                continue
            if isinstance(value, (int, float)):
                row[name] = float(value)
        out[task] = row
    return out


def evaluate(model, tokenizer, tasks, limit: int | float | None = None, batch_size: int = 8,
             task_dir: str | os.PathLike | None = None, task_data: str | os.PathLike | None = None,
             num_fewshot: int = 0, bootstrap_iters: int = 1000, max_length: int | None = None,
             device: str | None = None, log_samples: bool = False) -> dict[str, Any]:
    """Run lm-eval tasks on an in-memory Hugging Face causal LM (packed RaBiT layers included).

    Args:
        model: a ``transformers`` PreTrainedModel (e.g. from :func:`rabit.export.from_pretrained`).
        tokenizer: a Hugging Face tokenizer or a :class:`rabit.models.Llama2cTokenizer`.
        tasks: task names from :data:`TASKS` (a string for one task).
        limit: items per task (int) or fraction (float < 1); None for the full split.
        batch_size: lm-eval batch size.
        task_dir: include dir for the resolved task YAMLs (default: a cache folder).
        task_data: folder of the task files (default ``$RABIT_TASK_DATA``, then the shared folder).
        num_fewshot: few-shot examples (0, the zero-shot protocol of the quantization literature).
        bootstrap_iters: bootstrap samples for stderr of non-mean metrics (LAMBADA perplexity).
        max_length: context length for HFLM (default: the model's max_position_embeddings).
        device: HFLM device (default: the model's).
        log_samples: keep per-item outputs under ``"samples"``.
    Returns ``{"results": {task: {metric: value}}, "n_samples": {task: n}, "versions": ..., "config": ...}``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"rabit.lmeval: batch_size must be a positive int, got {batch_size!r}")
    if limit is not None and not limit > 0:
        raise ValueError(f"rabit.lmeval: limit must be > 0 or None, got {limit!r}")
    include = prepare_task_dir(tasks, data_dir=task_data, out_dir=task_dir)
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf_tok = as_hf_tokenizer(tokenizer)
    if device is None:
        device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=hf_tok, batch_size=batch_size, max_length=max_length, device=device)
    tm = TaskManager(include_path=str(include), include_defaults=False)
    # lm-eval prints progress to stdout (e.g. "bootstrapping for stddev: perplexity" for LAMBADA); send it to stderr,
    # so that stdout carries only what the caller prints (`rabit eval --json` must stay valid JSON)
    with contextlib.redirect_stdout(sys.stderr):
        out = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                              bootstrap_iters=bootstrap_iters, log_samples=log_samples, batch_size=batch_size)
    if out is None:
        raise RuntimeError("rabit.lmeval: lm_eval.simple_evaluate returned no results")
    res = {"results": _clean(out["results"]),
           "n_samples": {t: int(v.get("effective", v.get("original", 0))) if isinstance(v, dict) else int(v)
                         for t, v in out.get("n-samples", {}).items()},
           "versions": {t: v for t, v in out.get("versions", {}).items()},
           "config": {"tasks": names, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                      "task_dir": str(include), "lm_eval_version": _lm_eval_version()}}
    if log_samples:
        res["samples"] = out.get("samples", {})
    return res


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
