"""The exported-model directory format (torch-free): file names, ``quantization_config`` schema,
per-layer tensor layout, and integrity checks of a safetensors file read from its header.

An exported directory holds::

    config.json              the model's Hugging Face config + "quantization_config" (below)
    model.safetensors        every tensor, no pickle (tied tensors stored once)
    generation_config.json   (optional) the model's generation defaults
    tokenizer files          a Hugging Face tokenizer's own files, or a llama2.c ``tok*.bin``

``quantization_config``::

    quant_method            "rabit"
    format_version          1 (kernels/rabit_format.h)
    k                       binary paths per layer (1..4)
    quantized_modules       module names replaced by packed RaBiT layers
    modules_to_not_convert  nn.Linear modules kept in full precision (e.g. lm_head)
    scale_dtype             "float16"
    packed_dtype            "int32" (the bytes of uint32 words)
    bits_order              "lsb-first" (bit j%32 of word j//32 is column j; 1 = +1)
    word_bits               32
    tokenizer               {"format": "huggingface"} | {"format": "llama2c", "file": NAME} | null

Each quantized module ``M`` of shape [out, in] stores ``M.packed`` int32 [k, out, ceil(in/32)],
``M.g`` float16 [k, out], ``M.h`` float16 [k, in] and, when the layer has one, ``M.bias``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

QUANT_METHOD = "rabit"
FORMAT_VERSION = 1
WORD_BITS = 32
MAX_K = 4
SCALE_DTYPE = "float16"
PACKED_DTYPE = "int32"
BITS_ORDER = "lsb-first"

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"

# safetensors dtype tags -> numpy-style names
ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I8": "int8",
             "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16",
             "U32": "uint32", "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2"}
ST_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_TAGS = ("F16", "BF16", "F32", "F64")


class ExportFormatError(ValueError):
    """An exported model directory is missing, incomplete, corrupted or of another format version."""


def words_per_row(in_features: int) -> int:
    """Number of 32-bit words holding one row of ``in_features`` signs."""
    return (in_features + WORD_BITS - 1) // WORD_BITS


def quantized_layer_bytes(out_features: int, in_features: int, k: int, bias_itemsize: int = 0) -> int:
    """Bytes one packed layer takes on disk: ``K·out·ceil(in/32)·4 + 2·K·(out+in)`` (+ bias)."""
    return k * out_features * words_per_row(in_features) * 4 + 2 * k * (out_features + in_features) \
        + bias_itemsize * out_features


def layer_tensor_specs(name: str, out_features: int, in_features: int, k: int) -> dict[str, tuple[str, tuple]]:
    """``{tensor name: (safetensors dtype tag, shape)}`` of a quantized module (bias not included)."""
    return {f"{name}.packed": ("I32", (k, out_features, words_per_row(in_features))),
            f"{name}.g": ("F16", (k, out_features)),
            f"{name}.h": ("F16", (k, in_features))}


# ----------------------------------------------------------------------------------------------
# config.json


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of an exported directory, with its quantization_config validated."""
    d = Path(model_dir)
    if not d.exists():
        raise FileNotFoundError(f"rabit: model directory {str(d)!r} does not exist; pass the directory "
                                "written by rabit.export.save_pretrained (or `rabit export`)")
    if not d.is_dir():
        raise ExportFormatError(f"rabit: {str(d)!r} is a file, not a model directory; pass the directory "
                                "that holds config.json and model.safetensors")
    path = d / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"rabit: {str(path)!r} not found; {str(d)!r} is not an exported model "
                                "directory (re-export it with rabit.export.save_pretrained)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportFormatError(f"rabit: {str(path)!r} is not valid JSON ({e}); the file is corrupted, "
                                "re-export the model") from None
    if not isinstance(config, dict):
        raise ExportFormatError(f"rabit: {str(path)!r} must hold a JSON object")
    validate_quantization_config(config.get("quantization_config"), str(path))
    return config


def validate_quantization_config(qc: Any, where: str = "config.json") -> dict[str, Any]:
    """Check a ``quantization_config`` dict against format version 1; returns it unchanged."""
    if qc is None:
        raise ExportFormatError(f"rabit: {where} has no quantization_config; this is not a rabit export "
                                "(load a full-precision model with transformers instead, or re-export)")
    if not isinstance(qc, dict):
        raise ExportFormatError(f"rabit: {where}: quantization_config must be a JSON object")
    if qc.get("quant_method") != QUANT_METHOD:
        raise ExportFormatError(f"rabit: {where}: quant_method is {qc.get('quant_method')!r}, not "
                                f"{QUANT_METHOD!r}; this model was not exported by rabit")
    if "format_version" not in qc:
        raise ExportFormatError(f"rabit: {where}: quantization_config has no format_version; the file was "
                                f"not written by rabit.export (expected format_version {FORMAT_VERSION})")
    version = qc["format_version"]
    if version != FORMAT_VERSION:
        raise ExportFormatError(f"rabit: {where}: format_version {version!r} is not supported; this rabit "
                                f"reads format_version {FORMAT_VERSION} (upgrade rabit or re-export the model)")
    k = qc.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ExportFormatError(f"rabit: {where}: k={k!r}; expected an integer in 1..{MAX_K}")
    mods = qc.get("quantized_modules")
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) and m for m in mods):
        raise ExportFormatError(f"rabit: {where}: quantized_modules must be a non-empty list of module names")
    if len(set(mods)) != len(mods):
        raise ExportFormatError(f"rabit: {where}: quantized_modules lists a module twice")
    for key, want in (("scale_dtype", SCALE_DTYPE), ("bits_order", BITS_ORDER), ("word_bits", WORD_BITS),
                      ("packed_dtype", PACKED_DTYPE)):
        if key in qc and qc[key] != want:
            raise ExportFormatError(f"rabit: {where}: {key}={qc[key]!r}; format_version {FORMAT_VERSION} "
                                    f"requires {want!r}")
    tok = qc.get("tokenizer")
    if tok is not None and (not isinstance(tok, dict) or tok.get("format") not in ("huggingface", "llama2c")):
        raise ExportFormatError(f"rabit: {where}: tokenizer={tok!r}; expected null, "
                                "{'format': 'huggingface'} or {'format': 'llama2c', 'file': NAME}")
    if tok is not None and tok["format"] == "llama2c":
        name = tok.get("file")
        # a bare file name: the tokenizer is read from the model directory and nowhere else
        if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", ".."):
            raise ExportFormatError(f"rabit: {where}: tokenizer file {name!r}; expected the name of a file in the "
                                    "model directory (no path)")
    return qc


# ----------------------------------------------------------------------------------------------
# safetensors header


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype tag, shape)}`` from a safetensors file's header, after checking the file is whole.

    Reads only the header; checks that the JSON is valid, that every tensor's byte range matches its
    dtype and shape, that the ranges tile the data area, and that the file is exactly as long as the
    header says (a truncated or padded file is reported as such).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"rabit: weights file {str(p)!r} not found; the export is incomplete, "
                                "re-export the model")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ExportFormatError(f"rabit: {str(p)!r} is truncated ({size} bytes): not a safetensors file; "
                                    "re-export or re-copy it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ExportFormatError(f"rabit: {str(p)!r} is truncated or corrupted: its header claims {n} bytes "
                                    f"but the file has {size}; re-export or re-copy it")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ExportFormatError(f"rabit: {str(p)!r} has a corrupted safetensors header; re-export or "
                                "re-copy it") from None
    if not isinstance(header, dict):
        raise ExportFormatError(f"rabit: {str(p)!r} has a corrupted safetensors header")
    header.pop("__metadata__", None)
    out, ranges = {}, []
    for name, info in header.items():
        try:
            tag, shape, (a, b) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ExportFormatError(f"rabit: {str(p)!r}: header entry of {name!r} is corrupted") from None
        if tag not in ST_ITEMSIZE:
            raise ExportFormatError(f"rabit: {str(p)!r}: tensor {name!r} has unknown dtype {tag!r}")
        if b - a != ST_ITEMSIZE[tag] * math.prod(shape) or a < 0:
            raise ExportFormatError(f"rabit: {str(p)!r}: tensor {name!r} byte range [{a}, {b}) does not fit "
                                    f"its shape {list(shape)} and dtype {tag}; the file is corrupted")
        out[name] = (tag, shape)
        ranges.append((a, b))
    end = 0
    for a, b in sorted(ranges):
        if a != end:
            raise ExportFormatError(f"rabit: {str(p)!r}: tensor data is not contiguous; the file is corrupted")
        end = b
    expected = 8 + n + end
    if size < expected:
        raise ExportFormatError(f"rabit: {str(p)!r} is truncated: {size} bytes but the header describes "
                                f"{expected}; re-export or re-copy it")
    if size > expected:
        raise ExportFormatError(f"rabit: {str(p)!r} has {size - expected} bytes of trailing garbage "
                                f"(expected {expected} bytes); re-export or re-copy it")
    return out


def check_tensor(name: str, found: dict[str, tuple[str, tuple]], want_shape: tuple, want_tags: tuple[str, ...],
                 path: str) -> None:
    """Raise :class:`ExportFormatError` naming ``name`` when it is missing or has the wrong shape/dtype."""
    if name not in found:
        raise ExportFormatError(f"rabit: {path}: tensor {name!r} is missing; the export is incomplete or was "
                                "written for another model, re-export it")
    tag, shape = found[name]
    if tuple(shape) != tuple(want_shape):
        raise ExportFormatError(f"rabit: {path}: tensor {name!r} has shape {list(shape)} but the model needs "
                                f"{list(want_shape)}; config.json and the weights do not match, re-export")
    if tag not in want_tags:
        want = " or ".join(ST_DTYPES[t] for t in want_tags)
        raise ExportFormatError(f"rabit: {path}: tensor {name!r} has dtype {ST_DTYPES.get(tag, tag)} but the "
                                f"format needs {want}; re-export the model")
