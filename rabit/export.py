"""Export a packed RaBiT model to a Hugging Face-style directory and load it back (no pickle).

    rabit.convert_(model)                                   # RaBiTLinear -> PackedRaBiTLinear
    rabit.export.save_pretrained(model, "out/", tokenizer)  # config.json + model.safetensors (+ tokenizer)
    model = rabit.export.from_pretrained("out/")            # PackedRaBiTLinear model, strict load
    tok = rabit.export.load_tokenizer("out/")

The directory layout and the ``quantization_config`` schema are defined in :mod:`rabit.runtime.format`
(torch-free, shared with the NumPy runtime). Importing this module registers ``quant_method: "rabit"``
with transformers (lazily, see :mod:`rabit.hf_quantizer`), so the same directory also loads with
``transformers.AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import hf_quantizer
from ._checks import FLOAT_DTYPES
from .nn import PackedRaBiTLinear, RaBiTLinear
from .runtime.format import (
    BITS_ORDER,
    CONFIG_NAME,
    FLOAT_TAGS,
    FORMAT_VERSION,
    GENERATION_CONFIG_NAME,
    PACKED_DTYPE,
    QUANT_METHOD,
    SCALE_DTYPE,
    ST_ITEMSIZE,
    WEIGHTS_NAME,
    WORD_BITS,
    ExportFormatError,
    check_tensor,
    layer_tensor_specs,
    read_config,
    read_safetensors_header,
)

hf_quantizer.install_lazy_registration()  # AutoModelForCausalLM.from_pretrained understands rabit exports

__all__ = ["ExportFormatError", "attach_quantization_config", "export_state_dict", "from_pretrained",
           "load_pretrained", "load_tokenizer", "quantization_config_for", "save_pretrained"]

_ST_TAG = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
           torch.int32: "I32"}


# ----------------------------------------------------------------------------------------------
# What gets written


def _packed_layers(model: nn.Module) -> list[tuple[str, PackedRaBiTLinear]]:
    """The model's packed layers; errors for QAT layers (not packed yet) or a model with none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"rabit.export: expected a torch.nn.Module, got {type(model).__name__}")
    qat = [n for n, m in model.named_modules() if isinstance(m, RaBiTLinear)]
    if qat:
        raise ValueError(f"rabit.export: the model still has {len(qat)} QAT RaBiTLinear layers (e.g. {qat[0]!r}); "
                         "pack them first with rabit.convert_(model)")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedRaBiTLinear)]
    if not layers:
        raise ValueError("rabit.export: the model has no PackedRaBiTLinear layers; quantize it with "
                         "rabit.quantize_ (then train) and pack it with rabit.convert_ before exporting")
    ks = {m.k for _, m in layers}
    if len(ks) > 1:
        raise ValueError(f"rabit.export: layers use different numbers of paths {sorted(ks)}; format "
                         f"version {FORMAT_VERSION} stores one k per model")
    for name, m in layers:
        for t in ("g", "h"):
            s = getattr(m, t)
            if s.dtype != torch.float16:
                raise ValueError(f"rabit.export: {name}.{t} is {s.dtype}, but the format stores float16 scales; "
                                 "pack with rabit.convert_(model, scale_dtype=torch.float16) (the default)")
            if not torch.isfinite(s).all():
                raise ValueError(f"rabit.export: {name}.{t} contains NaN or Inf; the model diverged, do not export it")
        _check_padding(name, m)
    return layers


def _check_padding(name: str, m: PackedRaBiTLinear) -> None:
    """The format requires the unused bits of each row's last word to be 0."""
    rem = m.in_features % WORD_BITS
    if rem:
        last = m.packed[..., -1].to(torch.int64) & 0xFFFFFFFF
        if bool((last >> rem).any()):
            raise ValueError(f"rabit.export: {name}.packed has set padding bits past column {m.in_features - 1}; "
                             "the writer must clear them (kernels/rabit_format.h)")


def quantization_config_for(model: nn.Module, tokenizer_entry: dict | None = None) -> dict[str, Any]:
    """The ``quantization_config`` dict (format version 1) describing ``model``'s packed layers."""
    layers = _packed_layers(model)
    packed = {n for n, _ in layers}
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in packed]
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "k": layers[0][1].k,
        "bits": layers[0][1].k,  # weight bits per element (one per path), for tools that read "bits"
        "quantized_modules": [n for n, _ in layers],
        "modules_to_not_convert": dense,
        "scale_dtype": SCALE_DTYPE,
        "packed_dtype": PACKED_DTYPE,
        "bits_order": BITS_ORDER,
        "word_bits": WORD_BITS,
        "tokenizer": tokenizer_entry,
    }


def export_state_dict(model: nn.Module, unquantized_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """CPU tensors to write: packed planes (int32), fp16 scales, and every other tensor once.

    Tied tensors (e.g. ``lm_head.weight`` sharing the embedding) are written once, under their first
    name; the loader re-ties them from the config. ``unquantized_dtype`` casts every floating tensor
    that is not a scale (embeddings, norms, dense linears, biases); ``None`` keeps the model's dtypes.
    """
    layers = dict(_packed_layers(model))
    scale_names = {f"{n}.{t}" for n in layers for t in ("g", "h")}
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device) if t.numel() else None
        if key is not None and key in seen:
            continue  # a tied alias
        seen.add(key)
        t = t.detach()
        if unquantized_dtype is not None and t.is_floating_point() and name not in scale_names:
            t = t.to(unquantized_dtype)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"rabit.export: tensor {name!r} contains NaN or Inf; do not export a diverged model")
        out[name] = t.to("cpu").contiguous().clone()
    return out


def attach_quantization_config(model: nn.Module) -> nn.Module:
    """Set ``model.config.quantization_config`` so that ``model.save_pretrained(dir)`` writes a directory
    that :func:`from_pretrained` and transformers' ``AutoModelForCausalLM.from_pretrained`` can load."""
    from .hf_quantizer import RabitQuantConfig

    if getattr(model, "config", None) is None:
        raise TypeError("rabit.export: the model has no Hugging Face config; only PreTrainedModel can be saved")
    model.config.quantization_config = RabitQuantConfig.from_dict(quantization_config_for(model))
    return model


# ----------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def _atomic_directory(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success it is renamed to ``final``.

    A crash or an exception leaves ``final`` untouched (a stale ``.NAME.tmp-*`` sibling may remain).
    With ``overwrite`` an existing ``final`` is moved aside, replaced, then deleted.
    """
    final = final.resolve()
    if final.exists():
        if not final.is_dir():
            raise FileExistsError(f"rabit.export: {str(final)!r} exists and is a file; choose another output path")
        if any(final.iterdir()) and not overwrite:
            raise FileExistsError(f"rabit.export: {str(final)!r} exists and is not empty; pass overwrite=True "
                                  "(CLI: --overwrite) or choose another output directory")
    from .data import make_output_dir

    make_output_dir(final.parent)  # a file in the way is named (mkdir's bare "[Errno 17] File exists" was not)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                # safetensors writes its file 0600; give every file what a plain open() would
                os.chmod(f, 0o666 & ~_umask())
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_llama2c_tokenizer(tok) -> bool:
    from .models.llama2c import Llama2cTokenizer

    return isinstance(tok, Llama2cTokenizer)


def _save_tokenizer(tokenizer, tmp: Path) -> dict | None:
    if tokenizer is None:
        return None
    if _is_llama2c_tokenizer(tokenizer):
        src = Path(tokenizer.path)
        shutil.copyfile(src, tmp / src.name)
        return {"format": "llama2c", "file": src.name, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer.save_pretrained(str(tmp))
        return {"format": "huggingface"}
    raise TypeError(f"rabit.export: cannot save a tokenizer of type {type(tokenizer).__name__}; pass a Hugging "
                    "Face tokenizer, a rabit Llama2cTokenizer, or tokenizer=None")


def _check_file_names(model_dir: Path, tokenizer_entry: dict | None) -> None:
    if tokenizer_entry and tokenizer_entry.get("format") == "llama2c":
        if tokenizer_entry["file"] in (CONFIG_NAME, WEIGHTS_NAME, GENERATION_CONFIG_NAME):
            raise ValueError(f"rabit.export: the tokenizer file name {tokenizer_entry['file']!r} clashes with "
                             "the export's own files; rename the tokenizer file")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, tokenizer=None,
                    unquantized_dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a packed model as ``config.json`` + ``model.safetensors`` (+ tokenizer), atomically.

    Args:
        model: a Hugging Face causal LM whose RaBiT layers were packed by :func:`rabit.convert_`.
        save_directory: output directory; it must not exist or be empty unless ``overwrite``.
        tokenizer: a Hugging Face tokenizer (saved with its own ``save_pretrained``), a
            :class:`rabit.models.Llama2cTokenizer` (its ``tok*.bin`` is copied and recorded), or None.
        unquantized_dtype: cast embeddings, norms, dense linears and biases to this dtype
            (e.g. ``torch.float16`` for the smallest file); ``None`` keeps the model's own dtypes, so
            the reloaded model reproduces ``model``'s logits exactly.
        overwrite: replace an existing non-empty directory.
    Returns the directory path. Everything is written to a temporary sibling first and renamed at the
    end, so an interrupted export never leaves a half-written model under ``save_directory``.
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise TypeError("rabit.export.save_pretrained: the model has no Hugging Face config; export needs a "
                        "transformers PreTrainedModel (e.g. LlamaForCausalLM)")
    if unquantized_dtype is not None and unquantized_dtype not in FLOAT_DTYPES:
        # float64 would reach the packed layers as float64 activations, which they do not take
        raise TypeError(f"rabit.export.save_pretrained: unquantized_dtype must be None, torch.float16, "
                        f"torch.bfloat16 or torch.float32, got {unquantized_dtype}")
    tensors = export_state_dict(model, unquantized_dtype)
    final = Path(save_directory)
    with _atomic_directory(final, overwrite) as tmp:
        tok_entry = _save_tokenizer(tokenizer, tmp)
        _check_file_names(tmp, tok_entry)
        qc = quantization_config_for(model, tok_entry)
        save_file(tensors, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", "quant_method": QUANT_METHOD, "format_version": str(FORMAT_VERSION)})
        cfg = copy.deepcopy(config)
        cfg.quantization_config = qc
        cfg.architectures = [type(model).__name__]
        float_dtypes = {t.dtype for n, t in tensors.items() if t.is_floating_point() and not n.endswith((".g", ".h"))}
        if len(float_dtypes) == 1:
            cfg.dtype = next(iter(float_dtypes))
        (tmp / CONFIG_NAME).write_text(cfg.to_json_string(use_diff=True), encoding="utf-8")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
    return final


# ----------------------------------------------------------------------------------------------
# Loading


def _torch_dtype(name) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ExportFormatError(f"rabit: config.json has dtype {name!r}, which is not a floating-point dtype")
    return dt


def build_skeleton(config_dict: dict[str, Any], dtype: torch.dtype | None = None) -> nn.Module:
    """The HF causal-LM skeleton of an exported ``config.json``, with the quantized linears already
    replaced by (zero) :class:`PackedRaBiTLinear` layers. No weights are downloaded or initialised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights  # transformers 5.x
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    qc = config_dict["quantization_config"]
    cfg_dict = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise ExportFormatError("rabit: config.json has no model_type; it is not a Hugging Face config")
    try:
        config = AutoConfig.for_model(model_type, **cfg_dict)
    except ValueError as e:
        raise ExportFormatError(f"rabit: config.json: unknown model_type {model_type!r} for this transformers "
                                f"({e}); upgrade transformers") from None
    dtype = dtype or _torch_dtype(cfg_dict.get("dtype") or cfg_dict.get("torch_dtype")) or torch.float32
    if dtype not in FLOAT_DTYPES:  # float64 activations would reach the packed layers, which do not take them
        raise TypeError(f"rabit: the unquantized tensors of a rabit model load as float32, float16 or bfloat16, not "
                        f"{dtype}; pass dtype=torch.float32 (or fix the dtype in config.json)")
    with no_init_weights():  # dense weights are allocated but never touched: they are replaced or loaded
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replace_linears(model, qc["quantized_modules"], qc["k"], dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def replace_linears(model: nn.Module, names: list[str], k: int, bias_dtype: torch.dtype | None = None,
                    device=None) -> None:
    """Swap each named nn.Linear of ``model`` for an empty PackedRaBiTLinear of the same shape."""
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ExportFormatError(f"rabit: quantization_config lists {name!r}, which this model does not have; "
                                    "config.json and quantized_modules do not match, re-export") from None
        if not isinstance(lin, nn.Linear):
            raise ExportFormatError(f"rabit: quantization_config lists {name!r}, but it is a "
                                    f"{type(lin).__name__}, not nn.Linear; re-export the model")
        dev = device if device is not None else lin.weight.device
        new = PackedRaBiTLinear(lin.in_features, lin.out_features, k=k, bias=lin.bias is not None,
                                bias_dtype=bias_dtype or lin.weight.dtype, device=dev)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def expected_tensors(model: nn.Module, k: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``{name: (allowed dtype tags, shape)}`` the weights file must hold for ``model`` (tied stored once)."""
    want, seen = {}, set()
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedRaBiTLinear)}
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        mod, _, leaf = name.rpartition(".")
        if mod in packed and leaf in ("packed", "g", "h"):
            m = packed[mod]
            tag, shape = layer_tensor_specs(mod, m.out_features, m.in_features, k)[name]
            want[name] = ((tag,), shape)
        elif t.is_floating_point():
            want[name] = (FLOAT_TAGS, tuple(t.shape))
        else:
            want[name] = ((_ST_TAG.get(t.dtype, str(t.dtype)),), tuple(t.shape))
    return want


def validate_weights_file(path: Path, want: dict) -> None:
    found = read_safetensors_header(path)
    for name, (tags, shape) in want.items():
        check_tensor(name, found, shape, tags, str(path))
    extra = sorted(set(found) - set(want))
    if extra:
        raise ExportFormatError(f"rabit: {path}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}; "
                                "the weights do not match config.json, re-export the model")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ExportFormatError(f"rabit: cannot read {str(path)!r}: {e}; the file is corrupted, re-export it") from None


def check_finite_scales(tensors: dict[str, torch.Tensor], path: str = WEIGHTS_NAME) -> None:
    """Raise naming the first scale (``*.g`` / ``*.h``) or other float tensor that holds NaN or Inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            what = "scale" if name.endswith((".g", ".h")) else "tensor"
            raise ExportFormatError(f"rabit: {path}: {what} {name!r} contains NaN or Inf; the file is corrupted "
                                    "or the model diverged before export")


def from_pretrained(model_directory: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild an exported model: HF skeleton from ``config.json``, PackedRaBiTLinear layers, strict load.

    Args:
        model_directory: a directory written by :func:`save_pretrained` (or by ``model.save_pretrained``
            after :func:`attach_quantization_config`).
        device: where to put the model.
        dtype: dtype of the unquantized tensors and biases (default: the dtype in config.json);
            scales stay float16 and the packed planes int32.
    Returns the model in eval mode. Raises FileNotFoundError / :class:`ExportFormatError` naming the
    missing file, the wrong format version, or the missing/mis-shaped/mis-typed/non-finite tensor.
    """
    d = Path(model_directory)
    config = read_config(d)
    qc = config["quantization_config"]
    weights = d / WEIGHTS_NAME
    model = build_skeleton(config, dtype)
    validate_weights_file(weights, expected_tensors(model, qc["k"]))
    tensors = _load_tensors(weights)
    check_finite_scales(tensors, str(weights))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(model.state_dict(keep_vars=True)) - set(expected_tensors(model, qc["k"]))
    if set(missing) - tied or unexpected:
        raise ExportFormatError(f"rabit: {weights}: does not fit the model (missing {sorted(set(missing) - tied)[:5]}, "
                                f"unexpected {sorted(unexpected)[:5]}); re-export it")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    from .hf_quantizer import RabitQuantConfig

    model.config.quantization_config = RabitQuantConfig.from_dict(qc)
    if (d / GENERATION_CONFIG_NAME).is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(d))
    return model.to(device).eval()


def load_tokenizer(model_directory: str | os.PathLike):
    """The tokenizer saved with an export: a Hugging Face tokenizer or a :class:`Llama2cTokenizer`."""
    d = Path(model_directory)
    entry = read_config(d)["quantization_config"].get("tokenizer")
    if entry is None:
        raise FileNotFoundError(f"rabit: {str(d)!r} was exported without a tokenizer; pass tokenizer= to "
                                "rabit.export.save_pretrained, or load the base model's tokenizer yourself")
    if entry["format"] == "llama2c":
        from .models.llama2c import Llama2cTokenizer

        path = d / entry.get("file", "")
        if not path.is_file():
            raise FileNotFoundError(f"rabit: tokenizer file {str(path)!r} recorded in config.json is missing; "
                                    "re-export the model with its tokenizer")
        return Llama2cTokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def load_pretrained(model_directory: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` of an exported directory (tokenizer None when none was exported)."""
    model = from_pretrained(model_directory, device=device, dtype=dtype)
    try:
        tok = load_tokenizer(model_directory)
    except FileNotFoundError:
        if read_config(model_directory)["quantization_config"].get("tokenizer") is not None:
            raise
        tok = None
    return model, tok


def directory_bytes(model_directory: str | os.PathLike) -> int:
    """Total size of the files in a directory (recursive)."""
    return sum(f.stat().st_size for f in Path(model_directory).rglob("*") if f.is_file())


def describe(model_directory: str | os.PathLike) -> dict[str, Any]:
    """A JSON-serialisable summary of an export: k, layer count, bytes of the packed layers and in total."""
    d = Path(model_directory)
    config = read_config(d)
    qc = config["quantization_config"]
    found = read_safetensors_header(d / WEIGHTS_NAME)

    def nbytes(n):
        tag, shape = found[n]
        return ST_ITEMSIZE[tag] * math.prod(shape)

    q = set(qc["quantized_modules"])
    qbytes = sum(nbytes(n) for n in found if n.rpartition(".")[0] in q)
    return {"path": str(d), "k": qc["k"], "format_version": qc["format_version"],
            "quantized_modules": len(q), "quantized_bytes": qbytes,
            "other_tensor_bytes": sum(nbytes(n) for n in found) - qbytes,
            "directory_bytes": directory_bytes(d), "tokenizer": qc.get("tokenizer")}
