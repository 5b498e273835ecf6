"""A NumPy Llama decoder over a rabit export: no torch, packed layers through ``rabit._core``.

Computes what ``transformers.LlamaForCausalLM`` computes (float32 throughout):

* embeddings, RMSNorm ``w * x / sqrt(mean(x²) + eps)``;
* RoPE with the HF rotate-half convention (``q·cos + rotate_half(q)·sin``, frequency pairs (i, i+d/2)),
  ``inv_freq = 1 / theta^(2i/d)`` from ``rope_parameters.rope_theta`` (or legacy ``rope_theta``);
  only ``rope_type: "default"`` is implemented;
* grouped-query causal attention (scale ``head_dim^-0.5``) over a growing KV cache: NumPy for the prompt, and for
  each decoding step (one new token) ``rabit._core.decode_attention``, the C kernel of ``rabit.decode_attention``
  (rotary embedding, cache write and attention in one call, sums in double); ``fused_attention = False`` runs
  the NumPy attention there too;
* SwiGLU MLP ``down(silu(gate(x)) * up(x))``; final norm; ``lm_head`` (tied to the embedding when the
  config says so).

Packed layers run ``rabit._core.packed_linear`` (float16 scales are widened to float32 once, at load);
any linear the export kept dense (e.g. an untied ``lm_head``) is a NumPy matmul.

Opt-in int8 classes (``LlamaRuntime.load(..., int8_activations=True, head_dtype="int8")``), the torch decoder's
``StaticDecoder(int8_activations=True, head_dtype="int8")`` with the same kernels: decoding steps run the packed
layers on int8 activation tables (``rabit._core.packed_linear_i8``; so does a one-token prompt, as in the torch
decoder; longer prompts stay float32), and the dense
``lm_head`` runs on int8 blocks (``rabit._core.int8_linear``, llama.cpp's Q8_0 kind). Faster on the CPU, with a
relative error of ~1e-2 per layer instead of float32's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ExportFormatError,
    check_tensor,
    layer_tensor_specs,
    read_config,
    read_safetensors_header,
)

_FLOATS = ("F16", "F32")  # NumPy has no bfloat16: export such models with unquantized_dtype=float16


def _core():
    from .. import _core  # the compiled NumPy extension (no torch)

    return _core


class PackedLinear:
    """``y = Σ_k g_k ⊙ (B_k (h_k ⊙ x)) + b`` from packed uint32 sign planes; with ``int8_activations`` a single row
    of x (a decoding step) runs on int8 activation tables (``rabit._core.packed_linear_i8``)."""

    def __init__(self, packed: np.ndarray, g: np.ndarray, h: np.ndarray, bias: np.ndarray | None,
                 int8_activations: bool = False):
        self.packed = np.ascontiguousarray(packed.view(np.uint32))
        self.g = np.ascontiguousarray(g, dtype=np.float32)
        self.h = np.ascontiguousarray(h, dtype=np.float32)
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        self.in_features = self.h.shape[1]
        self.out_features = self.g.shape[1]
        self._kernel = _core().packed_linear
        # the words rearranged once for the int8 kernel (as many bytes as the packed bits)
        self.layout = _core().i8_layout(self.packed, self.in_features) if int8_activations else None
        self._kernel_i8 = _core().packed_linear_i8

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.layout is not None and x.shape[0] == 1:
            return self._kernel_i8(x, self.layout, self.g, self.h, self.bias)
        return self._kernel(x, self.packed, self.g, self.h, self.bias)


class Int8Linear:
    """A dense linear on int8 weights and activations (``rabit._core.int8_linear``): the opt-in LM head."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None):
        self.qweight, self.scales = _core().int8_weight(np.ascontiguousarray(weight, dtype=np.float32))
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        self.out_features, self.in_features = weight.shape
        self._kernel = _core().int8_linear

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._kernel(np.ascontiguousarray(x, dtype=np.float32), self.qweight, self.scales, self.out_features,
                            self.bias)


class DenseLinear:
    """``y = x Wᵀ + b`` for layers the export kept in full precision."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None):
        self.weight_t = np.ascontiguousarray(weight.astype(np.float32, copy=False).T)
        self.bias = None if bias is None else bias.astype(np.float32)
        self.in_features, self.out_features = self.weight_t.shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


class KVCache:
    """Per-layer key/value arrays ``[n_kv_heads, T, head_dim]`` that grow by doubling."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, capacity: int = 64):
        self.k = [np.zeros((n_kv, capacity, head_dim), np.float32) for _ in range(n_layers)]
        self.v = [np.zeros((n_kv, capacity, head_dim), np.float32) for _ in range(n_layers)]
        self.length = 0

    def reserve(self, layer: int, total: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``layer``'s whole key and value arrays ``[n_kv, capacity, hd]``, grown to hold ``total`` positions."""
        cap = self.k[layer].shape[1]
        if total > cap:
            new = max(2 * cap, total)
            for store in (self.k, self.v):
                grown = np.zeros((store[layer].shape[0], new, store[layer].shape[2]), np.float32)
                grown[:, :self.length] = store[layer][:, :self.length]
                store[layer] = grown
        return self.k[layer], self.v[layer]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store ``k, v [n_kv, t, hd]`` after the cached positions; return the full ``[n_kv, T, hd]``."""
        start, t = self.length, k.shape[1]
        self.reserve(layer, start + t)
        self.k[layer][:, start:start + t] = k
        self.v[layer][:, start:start + t] = v
        return self.k[layer][:, :start + t], self.v[layer][:, :start + t]


def _get(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def _one_sequence(ids) -> np.ndarray:
    """``ids`` as int64 ``[T]``: a [B, T] batch would be read as one sequence of B*T tokens, and 1.9 as token 1."""
    raw = np.asarray(ids)
    if raw.ndim > 1:
        raise ValueError(f"rabit.runtime: expected the ids of one sequence, [T]; got shape {raw.shape} (batches are "
                         "not supported: one call per sequence)")
    if raw.size and not np.issubdtype(raw.dtype, np.integer):
        raise TypeError(f"rabit.runtime: token ids must be integers, got {raw.dtype}")
    return raw.astype(np.int64).reshape(-1)


def _check_head_dtype(head_dtype) -> None:
    if head_dtype not in (None, "float32", "int8"):
        raise ValueError(f"rabit.runtime: head_dtype must be None, 'float32' or 'int8', got {head_dtype!r} (NumPy has "
                         "no fast half-precision matmul; the torch runtime takes float16 and bfloat16)")


class LlamaRuntime:
    """Greedy-decoding Llama over an exported directory, in NumPy. Build with :meth:`load`."""

    # decoding steps run rabit._core.decode_attention; False: the NumPy attention (the reference it is tested against)
    fused_attention: bool = True

    def __init__(self, config: dict[str, Any], tensors: dict[str, np.ndarray], path: str = "",
                 int8_activations: bool = False, head_dtype: str | None = None):
        _check_head_dtype(head_dtype)
        self.config = config
        self.path = path
        self.int8_activations = bool(int8_activations)
        self.head_dtype = head_dtype or "float32"
        qc = config["quantization_config"]
        self.k = qc["k"]
        self.quantized = set(qc["quantized_modules"])
        # the int8 classes' refusals before any layer is built
        if self.head_dtype == "int8" and "lm_head" in self.quantized:
            raise ValueError(f"rabit.runtime: head_dtype='int8' needs a dense lm_head, but {path or 'this export'} "
                             "packs it; load without head_dtype")
        if self.int8_activations and not any(m != "lm_head" for m in self.quantized):
            raise ValueError(f"rabit.runtime: int8_activations=True runs the packed decoder layers on int8 tables, "
                             f"but {path or 'this export'} has none; load without int8_activations")
        c = self._arch(config)
        self.__dict__.update(c)
        self._tensors = tensors
        self.embed = tensors["model.embed_tokens.weight"].astype(np.float32)
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "in_norm": self._f32(p + "input_layernorm.weight"),
                "post_norm": self._f32(p + "post_attention_layernorm.weight"),
                **{n: self._linear(p + path) for n, path in
                   (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                    ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                    ("down", "mlp.down_proj"))},
            })
        self.norm = self._f32("model.norm.weight")
        if "lm_head" in self.quantized or "lm_head.weight" in tensors:
            self.lm_head = self._linear("lm_head", head=True)
        elif self.tied:
            self.lm_head = (Int8Linear if self.head_dtype == "int8" else DenseLinear)(self.embed, None)
        else:
            raise ExportFormatError(f"rabit.runtime: {path}: lm_head.weight is missing and the config does not tie "
                                    "it to the embedding; re-export the model")
        half = self.head_dim // 2
        self.inv_freq = (1.0 / (self.rope_theta ** (np.arange(0, 2 * half, 2, dtype=np.float32) / self.head_dim))
                         ).astype(np.float32)
        self._rot = (np.zeros((0, self.head_dim), np.float32),) * 2  # (cos, sin), replaced as one tuple
        del self._tensors

    # -- construction -------------------------------------------------------------------------

    @staticmethod
    def _arch(cfg: dict) -> dict[str, Any]:
        mt = cfg.get("model_type")
        if mt != "llama":
            raise ExportFormatError(f"rabit.runtime: model_type {mt!r} is not supported; the NumPy runtime runs "
                                    "Llama-family exports (model_type 'llama'); use the torch path "
                                    "(rabit.export.from_pretrained) for other architectures")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ExportFormatError(f"rabit.runtime: hidden_act {act!r} is not supported (only 'silu')")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ExportFormatError(f"rabit.runtime: rope_type {rope_type!r} is not supported (only 'default')")
        for key in ("num_attention_heads", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
            v = cfg.get(key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ExportFormatError(f"rabit.runtime: config.json's {key} must be a positive integer, got {v!r}; "
                                        "the export's config.json is damaged, re-export it")
        n_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = _get(cfg, "head_dim", default=hidden // n_heads)
        n_kv = _get(cfg, "num_key_value_heads", default=n_heads)
        if not (isinstance(n_kv, int) and n_kv >= 1 and isinstance(head_dim, int) and head_dim >= 1):
            raise ExportFormatError(f"rabit.runtime: config.json's num_key_value_heads ({n_kv!r}) and head_dim "
                                    f"({head_dim!r}) must be positive integers; re-export the model")
        if n_heads % n_kv:
            raise ExportFormatError(f"rabit.runtime: num_attention_heads {n_heads} is not a multiple of "
                                    f"num_key_value_heads {n_kv}")
        return dict(hidden=hidden, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv=n_kv,
                    head_dim=head_dim, eps=float(_get(cfg, "rms_norm_eps", default=1e-6)),
                    rope_theta=float(_get(rope, "rope_theta", default=_get(cfg, "rope_theta", default=10000.0))),
                    vocab=cfg["vocab_size"], intermediate=cfg["intermediate_size"],
                    tied=bool(cfg.get("tie_word_embeddings", True)),
                    attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
                    max_positions=cfg.get("max_position_embeddings"))

    def _f32(self, name: str) -> np.ndarray:
        return self._tensors[name].astype(np.float32)

    def _linear(self, name: str, head: bool = False):
        t = self._tensors
        bias = t.get(name + ".bias")
        if name in self.quantized:
            return PackedLinear(t[name + ".packed"], t[name + ".g"], t[name + ".h"], bias,
                                int8_activations=self.int8_activations and not head)
        if head and self.head_dtype == "int8":
            return Int8Linear(t[name + ".weight"].astype(np.float32), bias)
        return DenseLinear(t[name + ".weight"], bias)

    @classmethod
    def expected_tensors(cls, config: dict) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
        """``{name: (allowed dtype tags, shape)}`` an export of this Llama config must contain."""
        c = cls._arch(config)
        k, q = config["quantization_config"]["k"], set(config["quantization_config"]["quantized_modules"])
        hd, h = c["head_dim"], c["hidden"]
        want = {"model.embed_tokens.weight": (_FLOATS, (c["vocab"], h)), "model.norm.weight": (_FLOATS, (h,))}
        linears = set()

        def linear(name, out, inp, bias):
            linears.add(name)
            if name in q:
                want.update({n: ((tag,), s) for n, (tag, s) in layer_tensor_specs(name, out, inp, k).items()})
            else:
                want[name + ".weight"] = (_FLOATS, (out, inp))
            if bias:
                want[name + ".bias"] = (_FLOATS, (out,))

        for i in range(c["n_layers"]):
            p = f"model.layers.{i}."
            want[p + "input_layernorm.weight"] = (_FLOATS, (h,))
            want[p + "post_attention_layernorm.weight"] = (_FLOATS, (h,))
            ab, mb = c["attention_bias"], c["mlp_bias"]
            linear(p + "self_attn.q_proj", c["n_heads"] * hd, h, ab)
            linear(p + "self_attn.k_proj", c["n_kv"] * hd, h, ab)
            linear(p + "self_attn.v_proj", c["n_kv"] * hd, h, ab)
            linear(p + "self_attn.o_proj", h, c["n_heads"] * hd, ab)
            linear(p + "mlp.gate_proj", c["intermediate"], h, mb)
            linear(p + "mlp.up_proj", c["intermediate"], h, mb)
            linear(p + "mlp.down_proj", h, c["intermediate"], mb)
        if not c["tied"] or "lm_head" in q:
            linear("lm_head", c["vocab"], h, False)
        unknown = sorted(q - linears)
        if unknown:
            raise ExportFormatError(f"rabit.runtime: quantization_config lists {unknown[:3]}, which a Llama model "
                                    "with this config does not have; config.json is inconsistent, re-export")
        return want

    @classmethod
    def load(cls, model_dir: str | os.PathLike, int8_activations: bool = False,
             head_dtype: str | None = None) -> "LlamaRuntime":
        """Validate and load an exported directory (config.json + model.safetensors). ``int8_activations`` and
        ``head_dtype="int8"``: the opt-in int8 classes (module docstring)."""
        _check_head_dtype(head_dtype)  # before the weights are read
        d = Path(model_dir)
        config = read_config(d)
        path = d / WEIGHTS_NAME
        found = read_safetensors_header(path)
        want = cls.expected_tensors(config)
        for name, (tags, shape) in want.items():
            check_tensor(name, found, shape, tags, str(path))
        extra = sorted(set(found) - set(want))
        if extra:
            raise ExportFormatError(f"rabit.runtime: {path}: unexpected tensors {extra[:5]}; the weights do not "
                                    f"match {CONFIG_NAME}, re-export the model")
        tensors = _load_numpy(path)
        for name, t in tensors.items():
            if t.dtype.kind == "f" and not np.isfinite(t).all():
                what = "scale" if name.endswith((".g", ".h")) else "tensor"
                raise ExportFormatError(f"rabit.runtime: {path}: {what} {name!r} contains NaN or Inf; the file is "
                                        "corrupted or the model diverged before export")
        return cls(config, tensors, str(d), int8_activations=int8_activations, head_dtype=head_dtype)

    # -- forward --------------------------------------------------------------------------------

    def new_cache(self) -> KVCache:
        return KVCache(self.n_layers, self.n_kv, self.head_dim)

    def _rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
        return w * (x / np.sqrt(var + np.float32(self.eps)))

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rot * sin

    def _rotary(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin ``[>= n, head_dim]`` float32 for positions 0.. (grown by doubling): the prompt's rows and the
        decode kernel's table are the same numbers."""
        rot = self._rot
        if rot[0].shape[0] < n:
            pos = np.arange(max(n, 2 * rot[0].shape[0], 64), dtype=np.float32)
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = np.concatenate([freqs, freqs], axis=-1)
            rot = self._rot = (np.cos(emb), np.sin(emb))  # one assignment: another thread never sees a mixed pair
        return rot

    def _attention(self, layer: dict, x: np.ndarray, cache: KVCache, i: int, cos, sin) -> np.ndarray:
        t = x.shape[0]
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        if t == 1 and self.fused_attention:
            keys, values = cache.reserve(i, cache.length + 1)
            tab_cos, tab_sin = self._rotary(keys.shape[1])
            out = _core().decode_attention(layer["q"](x).reshape(1, nh, hd), layer["k"](x).reshape(1, nkv, hd),
                                           layer["v"](x).reshape(1, nkv, hd), keys[None], values[None], tab_cos,
                                           tab_sin, cache.length, hd ** -0.5)
            return layer["o"](out.reshape(1, nh * hd))
        q = layer["q"](x).reshape(t, nh, hd).transpose(1, 0, 2)
        k = layer["k"](x).reshape(t, nkv, hd).transpose(1, 0, 2)
        v = layer["v"](x).reshape(t, nkv, hd).transpose(1, 0, 2)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        keys, values = cache.append(i, k, v)
        total = keys.shape[1]
        group = nh // nkv
        qg = q.reshape(nkv, group * t, hd)  # heads of one KV group share its keys
        scores = (qg @ keys.transpose(0, 2, 1)).reshape(nh, t, total) * np.float32(hd ** -0.5)
        past = total - t
        mask = np.arange(total)[None, :] > (past + np.arange(t))[:, None]
        scores = np.where(mask[None], np.float32(-np.inf), scores)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = (scores / scores.sum(-1, keepdims=True)).astype(np.float32)
        out = (probs.reshape(nkv, group * t, total) @ values).reshape(nh, t, hd)
        return layer["o"](np.ascontiguousarray(out.transpose(1, 0, 2).reshape(t, nh * hd)))

    def _mlp(self, layer: dict, x: np.ndarray) -> np.ndarray:
        gate = layer["gate"](x)
        act = gate / (np.float32(1.0) + np.exp(-gate))
        return layer["down"](act * layer["up"](x))

    def forward(self, ids, cache: KVCache | None = None) -> np.ndarray:
        """Logits ``[T, vocab]`` float32 of token ids ``[T]`` continuing ``cache`` (updated in place)."""
        ids = _one_sequence(ids)
        if ids.size == 0:
            raise ValueError("rabit.runtime: forward needs at least one token id")
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise ValueError(f"rabit.runtime: token ids must be in [0, {self.vocab}), got {ids.min()}..{ids.max()}")
        cache = cache if cache is not None else self.new_cache()
        end = cache.length + ids.size
        tab_cos, tab_sin = self._rotary(end)
        cos, sin = tab_cos[None, cache.length:end], tab_sin[None, cache.length:end]
        x = self.embed[ids]
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer, self._rms(x, layer["in_norm"]), cache, i, cos, sin)
            x = x + self._mlp(layer, self._rms(x, layer["post_norm"]))
        cache.length += ids.size
        return self.lm_head(self._rms(x, self.norm))

    def generate(self, ids, max_new_tokens: int = 32, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of ``ids``: returns prompt + new token ids (stops after ``eos_token_id``)."""
        if not (isinstance(max_new_tokens, (int, np.integer)) and not isinstance(max_new_tokens, bool)
                and max_new_tokens >= 0):
            raise ValueError(f"rabit.runtime: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        out = [int(i) for i in _one_sequence(ids)]
        if self.max_positions and len(out) + max_new_tokens > self.max_positions:
            raise ValueError(f"rabit.runtime: {len(out)} prompt + {max_new_tokens} new tokens exceed the model's "
                             f"max_position_embeddings {self.max_positions}; shorten the prompt or max_new_tokens")
        cache = self.new_cache()
        logits = self.forward(out, cache)
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(logits[-1]))
            out.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
            logits = self.forward([nxt], cache)
        return out


def _load_numpy(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ExportFormatError(f"rabit.runtime: cannot read {str(path)!r}: {e}; the file is corrupted, "
                                "re-export it") from None
    return tensors
