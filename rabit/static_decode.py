"""Fast greedy or sampled decoding of Llama-family models: a static KV cache and, on CUDA, one CUDA graph per step.

HF ``generate()`` spends most of a small model's step in Python and launch overhead, which hides what the
weights cost. :class:`StaticDecoder` runs the same modules (the model's own ``nn.Linear`` or
``PackedRaBiTLinear`` layers, norms, rotary tables) over a preallocated KV cache, so a decode step has fixed
shapes and is captured once as a CUDA graph; every later token is one graph replay with no host
synchronisation. It is the decode path of ``rabit generate --device cuda`` and of
``benchmarks/bench_decode.py``, for FP16 and packed models alike. A layer's q/k/v projections run as one call
and gate/up as another (``group_projections``): packed layers through :func:`rabit.packed_linear_group`, FP
``nn.Linear`` layers on CUDA as one GEMM on their stacked weights (:func:`stack_linears`). A decode step's
attention (rotary embedding, cache write, attention over the positions in use) is one :func:`rabit.decode_attention`
call per layer (``fused_attention``). Where every linear is packed, a decode step's norms, SwiGLU and residual adds run
inside the linears' kernels (``fused_glue``, :func:`rabit.packed_linear_fused`): a layer is five calls (q/k/v with
the input norm, attention, o_proj with the residual add, gate/up with the post-attention norm, down_proj with SwiGLU
and the residual add; on CUDA one launch each for narrow layers, a prologue and a main kernel each for the MMA kernels
of wider ones), so that the decoder's kernels chain by programmatic dependent launch.

    dec = StaticDecoder(model, batch_size=1, max_len=prompt_len + new_tokens)
    tokens = dec.generate(input_ids, max_new_tokens=256)          # [B, prompt + new], greedy
    sampler = StaticDecoder(model, batch_size=8, max_len=512, temperature=1.0)
    tokens = sampler.generate(input_ids, max_new_tokens=500, seed=0)  # sampled (rabit.sampling: counter-based)

Supported: HF models whose ``model.model`` has ``embed_tokens``, ``layers`` (``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``), ``norm`` and
``rotary_emb``: model types in ``SUPPORTED`` (Llama, Mistral, Qwen2). Attention is full causal (a sliding
window is refused when max_len exceeds it).
"""

from __future__ import annotations

import contextlib
import gc

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_token_ids, is_int
from ._ops import decode_attention, has_native_kernels, i8_layout, int8_weight, packed_linear_group
from .nn import PackedRaBiTLinear
from .sampling import row_keys, sample_next

__all__ = ["StaticDecoder", "SUPPORTED", "check_model", "stack_linears"]

# Architectures whose decoder layer is exactly what StaticDecoder.forward computes.
SUPPORTED = frozenset({"llama", "mistral", "qwen2"})


def check_model(model: nn.Module, max_len: int) -> None:
    """Raise TypeError / ValueError (naming what is missing) unless StaticDecoder can run ``model`` over
    ``max_len`` positions: a Llama-family layout of a type in SUPPORTED, HF RMSNorms, SwiGLU, no sliding window
    shorter than max_len."""
    base = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if base is None or not all(hasattr(base, n) for n in needed) or not hasattr(model, "lm_head"):
        raise TypeError(f"StaticDecoder: {type(model).__name__} is not a Llama-family causal LM "
                        f"(needs model.model.{{{', '.join(needed)}}} and model.lm_head)")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in SUPPORTED:
        raise TypeError(f"StaticDecoder: model type {getattr(cfg, 'model_type', None)!r} is not supported; "
                        f"supported: {', '.join(sorted(SUPPORTED))}")
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and max_len > window:
        raise ValueError(f"StaticDecoder: max_len={max_len} exceeds the sliding window ({window}), which "
                         "this decoder does not implement")
    for layer in base.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            if not hasattr(norm, "weight") or not hasattr(norm, "variance_epsilon"):
                raise TypeError(f"StaticDecoder: expected HF RMSNorm layers as {name}, got {type(norm).__name__}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"StaticDecoder: only SwiGLU (hidden_act='silu') MLPs are supported, got {cfg.hidden_act!r}")


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


# The elementwise glue between the linears, written as functions of tensors only (the HF modules' exact math),
# so that torch.compile (compile=True) fuses each into one or two kernels and compiles it once for all layers.
def _rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _add_rms_norm(h: Tensor, delta: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    h = h + delta
    return h, _rms_norm(h, w, eps)


def _rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off for the block (back on after, if it was on). A CPU decode step makes a few
    hundred short-lived tensors, so a collection runs every few steps, and the older generations' walk the model's
    objects: ~6 % of a SmolLM2-135M step on a 2-core VM (interleaved A/B, 8 rounds: 20.3 -> 19.1 ms). The step's
    objects are freed by reference counting; nothing it makes is cyclic."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _layer_calls(layer: nn.Module) -> tuple[tuple[nn.Module, ...], ...]:
    """A decoder layer's linears as a step calls them: (q, k, v), (o,), (gate, up), (down,)."""
    a, m = layer.self_attn, layer.mlp
    return (a.q_proj, a.k_proj, a.v_proj), (a.o_proj,), (m.gate_proj, m.up_proj), (m.down_proj,)


def _adjacent(ts: list[Tensor]) -> Tensor | None:
    """The one tensor that contiguous ts are consecutive row blocks of (one storage, each starting where the last
    ends), or None."""
    t0 = ts[0]
    offset = t0.storage_offset()
    for t in ts:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr() \
                or t.storage_offset() != offset or t.shape[1:] != t0.shape[1:]:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in ts)
    return t0.detach().new_empty(0).set_(t0.untyped_storage(), t0.storage_offset(), (rows, *t0.shape[1:]))


def stack_linears(mods: tuple[nn.Module, ...]) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) of plain nn.Linear layers that read one x, stacked row-wise into one tensor each, so that the
    group is one GEMM; None (nothing changed) when they are not all nn.Linear or differ in dtype, device or bias
    presence. The weights move into the stacked tensors: the modules keep their Parameter objects (an optimizer, tied
    weights and .grad still refer to them) and only their data become views of it, so no memory is added and a second
    call on the same layers finds them stacked already."""
    ws = [getattr(m, "weight", None) for m in mods]
    if not all(type(m) is nn.Linear for m in mods) or len({(w.dtype, w.device) for w in ws}) != 1:
        return None
    has_bias = [m.bias is not None for m in mods]
    if any(has_bias) and not all(has_bias):
        return None
    # outside inference mode: data set inside it would turn the model's weights into inference tensors for good
    with torch.inference_mode(False), torch.no_grad():
        stacked = _adjacent(ws)
        bias = _adjacent([m.bias for m in mods]) if all(has_bias) else None
        if stacked is not None and (bias is not None or not all(has_bias)):
            return stacked, bias  # stacked already (by an earlier decoder of this model)
        stacked = torch.cat([w.detach() for w in ws])
        bias = torch.cat([m.bias.detach() for m in mods]) if all(has_bias) else None
        r = 0
        for m, w in zip(mods, ws):
            n = w.shape[0]
            m.weight.data = stacked[r:r + n]
            if bias is not None:
                m.bias.data = bias[r:r + n]
            r += n
    return stacked, bias


class StaticDecoder:
    """Greedy or sampling decoder over a static KV cache (see the module docstring).

    The decoder holds on to the model's weights as they are when it is built (the captured CUDA graph reads their
    memory, and the stacked FP projections are views of it): updates in place are seen, but a model moved or converted
    afterwards (``.to()``, ``.half()``) needs a new decoder.

    Args:
        model: a Llama-family causal LM (``LlamaForCausalLM`` and alike), in eval mode.
        batch_size: rows decoded together.
        max_len: prompt + generated tokens that the cache holds.
        cuda_graph: capture the decode step as a CUDA graph (default: when the model is on CUDA).
        compile: fuse the elementwise glue (RMSNorm, residual adds, rotary, SwiGLU) with torch.compile; the
            linears and attention run as they are. Costs a one-time compilation; results may differ from
            eager in the last bits (fused float32 arithmetic).
        temperature: None (default) decodes greedily; a value > 0 samples from softmax(logits / temperature)
            with :func:`rabit.sampling.sample_next` (counter-based draws, seeded per generate() call).
        top_k: with temperature, sample from the k most likely tokens only.
        greedy_tokens: with temperature, the first ``greedy_tokens`` tokens after each prompt are taken by argmax
            and only the later ones sampled (LLM-QAT's teacher data, :func:`rabit.data.generate_teacher_data`).
        group_projections: run a layer's q/k/v projections as one call, and gate/up as one. Packed layers:
            :func:`rabit.packed_linear_group` (on CUDA one launch of the decode kernels instead of three or two;
            the outputs are the same bit for bit; where ``fused_glue`` holds, the grouped calls are
            :func:`rabit.packed_linear_fused`, and False also turns the fused glue off, which rounds otherwise). Plain
            ``nn.Linear`` layers on CUDA: one GEMM on their weights
            stacked into one tensor, as serving runtimes do (:func:`stack_linears`: the modules keep their
            Parameters, whose data become views of that tensor; same values, no extra memory). A stacked GEMM may round
            differently from separate ones in the last bits (cuBLAS picks its kernel by shape), so on the CPU,
            where launches cost little, FP layers are not stacked. False runs every linear on its own (benchmarks
            compare both).
        fused_attention: run a decode step's attention as one :func:`rabit.decode_attention` call per layer (rotary
            embedding, cache write and split-KV attention over the positions in use) instead of a rotary kernel, two
            cache copies and SDPA over the whole cache with a mask. None (default): where the kernel supports the
            model (CUDA: at most 8 query heads per KV head and a head dimension that is a multiple of 8 up to 256,
            a multiple of 4 up to 128 for float32; the CPU kernel takes any even one); True: always, with an error where it
            cannot; False: never. Fused and unfused attention round differently in the last bits. Steps of one token
            run fused (a one-token prefill too), longer prefills unfused.
        fused_glue: run a decode step's RMSNorms, SwiGLU and residual adds inside the packed linears' kernel
            (:func:`rabit.packed_linear_fused`) instead of as separate (compiled) kernels. None (default): where it
            can run: with the compiled kernels of the device, the fused attention, grouped projections and every
            decoder linear packed (the projections of a group alike in K, scale dtypes and bias presence); on CUDA
            also fp16/bf16 and a batch size of at most 4 (:func:`rabit.packed_linear_fused`'s bounds there); on the
            CPU any dtype and batch size (there the op is the same math in one C++ call: five calls a layer instead
            of the glue's torch ops); True: always, with an
            error naming what stands in the way; False: never. Fused and unfused glue round differently (the fused
            one keeps the normalised input and the activations in float32 and rounds each output once). Steps of one
            token run fused (a one-token prefill too), longer prefills unfused.
        head_dtype: None (default): the logits come from ``model.lm_head`` as it is. torch.float16 or torch.bfloat16
            (or "float16", "bfloat16") for a float32 model: the decoder keeps a copy of lm_head's weight (and bias) in that dtype, rounds the
            final normalised hidden state to it and returns the logits in float32. That halves the bytes of the
            largest matrix a small model reads per token (SmolLM2-135M: 49152 x 576); the logits then carry the
            rounding of an fp16/bf16 head, as on a GPU, so a near-tie can decode otherwise than the float32 head.
            "int8" (CPU only): the weight as llama.cpp's Q8_0 kind (:func:`rabit.int8_weight`: int8 values, a float32
            scale per row and 32 columns; a quarter of the float32 bytes, and exact for SmolLM2, whose embeddings come
            from a Q8_0 file) and the hidden state quantized the same way (:func:`rabit.int8_linear`): logits with a
            relative error of ~1e-2, the class of llama.cpp's head; 2.0-2.3 ms a step for SmolLM2-135M's head on a
            2-core AVX2 VM against 4.5 in float16.
        int8_activations: with the fused glue, decode steps run the packed linears on int8 activations
            (:func:`rabit.packed_linear_fused_i8`), the counterpart of llama.cpp's int8 activations: faster, at a
            relative error of ~1e-2 per layer output instead of float32 rounding, so the logits and at times the
            greedy tokens differ from the default's. On the CPU x·h becomes int8 lookup tables with a scale per 128
            columns, looked up 32 at a time; the decoder keeps a second copy of the packed bits (rearranged, padded
            to 16 rows and 128 columns), made when it is built: like the fused calls' argument lists, a snapshot of
            the weights then (build a new decoder after changing them). On CUDA (batch_size 1, float16/bfloat16) x·h
            is quantized to int8 with a scale per 128 columns and multiplied bit plane by bit plane with the
            weights' bits on binary tensor cores; no copy. Default False; prefills run the float kernels.
    """

    def __init__(self, model: nn.Module, batch_size: int = 1, max_len: int = 2048, cuda_graph: bool | None = None,
                 compile: bool = False, temperature: float | None = None, top_k: int | None = None,
                 greedy_tokens: int = 0, group_projections: bool = True, fused_attention: bool | None = None,
                 fused_glue: bool | None = None, head_dtype: torch.dtype | str | None = None,
                 int8_activations: bool = False):
        check_model(model, max_len)
        if batch_size < 1 or max_len < 2:
            raise ValueError(f"StaticDecoder: batch_size must be >= 1 and max_len >= 2, got {batch_size}, {max_len}")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"StaticDecoder: temperature must be > 0 or None (greedy), got {temperature}")
        if top_k is not None and (temperature is None or top_k < 1):
            raise ValueError(f"StaticDecoder: top_k must be >= 1 and needs a temperature, got top_k={top_k}, "
                             f"temperature={temperature}")
        if greedy_tokens < 0 or (greedy_tokens and temperature is None):
            raise ValueError(f"StaticDecoder: greedy_tokens must be >= 0 and needs a temperature (greedy decoding "
                             f"takes every token by argmax), got greedy_tokens={greedy_tokens}, "
                             f"temperature={temperature}")
        self.temperature, self.top_k, self.greedy_tokens = temperature, top_k, greedy_tokens
        self._head = self._head_fn(model.lm_head, head_dtype)
        self.group_projections = group_projections
        base, cfg = model.model, model.config
        self.model, self.base = model, base
        self._eager = (_rms_norm, _add_rms_norm, _rope, _swiglu)
        self._decode_fns = self._eager
        self._warm = False  # warm_up() done (without a graph; with one, _graph says it)
        if compile:  # decode steps only (T = 1); the prefill runs eagerly
            from torch import _dynamo

            # one compilation per function and shape; several decoders / models in one process need more
            # than the default limit of recompilations (past it dynamo would silently run eagerly)
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            self._decode_fns = tuple(torch.compile(f, dynamic=False, fullgraph=True) for f in self._eager)
        self.B, self.max_len = batch_size, max_len
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.groups = self.n_heads // self.n_kv  # query heads per KV head (GQA)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        emb = base.embed_tokens.weight
        self.device, self.dtype = emb.device, emb.dtype
        # attention form: grouped matmuls for float32 on CUDA, SDPA with enable_gqa otherwise (measurements in
        # attention()); on the CPU the grouped matmuls were no faster than SDPA and their time varied 2.5-fold between
        # processes (stories260K teacher data, 1,024 x 256: 8-22 s against SDPA's 10-14 s)
        self._grouped_matmuls = self.dtype == torch.float32 and self.device.type == "cuda"
        shape = (len(base.layers), batch_size, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            pos = torch.arange(max_len, device=self.device)[None]
            cos, sin = base.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), pos)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        self.positions = torch.arange(max_len, device=self.device)
        self.fused_attention = self._fusable_attention(fused_attention)
        self.fused_glue = self._fusable_glue(fused_glue)
        self._i8_layouts = self._int8_layouts() if int8_activations else None
        self._fused_args: dict[int, tuple] = {}  # _fused's argument lists per group, keyed by its first module
        self._layers_args: tuple | None = None  # the CPU step's rabit.decode_layers arguments, built on first use
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("StaticDecoder: cuda_graph=True needs the model on a CUDA device")
        if self.cuda_graph and max_len < 3:  # the capture's two warm-up steps write positions 1 and 2
            raise ValueError(f"StaticDecoder: max_len must be >= 3 with a CUDA graph, got {max_len}")
        # static inputs / outputs of the captured step
        self._tok = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._steps_left = max_len - 1  # host copy of max_len - 1 - _pos: the bounds check reads no device value
        self._out = torch.zeros(batch_size, max_len, dtype=torch.long, device=self.device)
        # sampling: the rows' draw keys (generate() sets them from its seed; these are seed 0's)
        self._keys = row_keys(0, torch.arange(batch_size, device=self.device))
        # positions below this one are taken by argmax (prefill() sets it to the prompt length + greedy_tokens)
        self._greedy_end = torch.zeros(1, dtype=torch.long, device=self.device)
        self._graph = None
        # stacked weight (and bias) of each FP group, keyed by the group's first module
        self._stacked: dict[int, tuple[Tensor, Tensor | None]] = {}
        if group_projections and self.device.type == "cuda":
            for layer in base.layers:
                a, m = layer.self_attn, layer.mlp
                for mods in ((a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)):
                    stacked = stack_linears(mods)
                    if stacked is not None:
                        self._stacked[id(mods[0])] = stacked

    @staticmethod
    def _head_fn(lm_head: nn.Module, head_dtype: torch.dtype | str | None):
        """The logits function: lm_head itself, or (head_dtype, a dtype or its name as the CLIs take it) a linear on a
        copy of its weight in that dtype, or ("int8", CPU) rabit.int8_linear on its int8 blocks."""
        if head_dtype is None:
            return lm_head
        head_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(head_dtype, head_dtype)
        if head_dtype not in (torch.float16, torch.bfloat16, "int8"):
            raise ValueError(f"StaticDecoder: head_dtype must be None, torch.float16, torch.bfloat16 or 'int8', got "
                             f"{head_dtype!r}")
        weight = getattr(lm_head, "weight", None)
        if not isinstance(lm_head, nn.Linear) or weight is None or weight.dtype != torch.float32:
            what = f"a {weight.dtype} weight" if isinstance(lm_head, nn.Linear) else f"a {type(lm_head).__name__}"
            raise ValueError(f"StaticDecoder: head_dtype={head_dtype} needs a float32 nn.Linear lm_head, got {what}; "
                             "pass head_dtype=None")
        if head_dtype == "int8":
            if weight.device.type != "cpu":
                raise ValueError(f"StaticDecoder: head_dtype='int8' runs on the CPU only, lm_head is on {weight.device}; "
                                 "use head_dtype float16 there")
            q, scales = int8_weight(weight.detach())
            n_out = weight.shape[0]
            bias = None if lm_head.bias is None else lm_head.bias.detach().float().contiguous()

            def head(x: Tensor) -> Tensor:  # the registered op itself: the wrapper's checks cost ~10 us a step
                y = torch.ops.rabit.int8_linear(x.reshape(-1, x.shape[-1]).float().contiguous(), q, scales, n_out,
                                                bias)
                return y.view(*x.shape[:-1], n_out)

            return head
        w = weight.detach().to(head_dtype)
        b = None if lm_head.bias is None else lm_head.bias.detach().to(head_dtype)

        def head(x: Tensor) -> Tensor:
            return F.linear(x.to(head_dtype), w, b).float()

        return head

    def _fusable_attention(self, wanted: bool | None) -> bool:
        """Whether decode steps run rabit.decode_attention: `wanted`, or (None) where its kernel takes this model."""
        if wanted is False:
            return False
        dev = self.device.type
        if dev not in ("cpu", "cuda"):
            why = f"it has no kernel for {dev}"
        elif not has_native_kernels(dev):  # the reference implementation reads pos on the host: no CUDA graph
            why = f"this build has no compiled {dev} kernels"
        elif dev == "cuda":
            from ._torch_api import _C

            code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}.get(self.dtype)
            why = f"the dtype {self.dtype}" if code is None else \
                _C.cuda_attention_unsupported(code, self.groups, self.head_dim)
        else:
            why = "an odd head dimension" if self.head_dim % 2 else None
        if why is not None and wanted:
            raise ValueError(f"StaticDecoder: fused_attention=True, but rabit.decode_attention cannot run this model: "
                             f"{why}; pass fused_attention=None (fuse where supported) or False")
        return why is None

    def _fusable_glue(self, wanted: bool | None) -> bool:
        """Whether decode steps run forward_fused: `wanted`, or (None) where packed_linear_fused takes this model."""
        if wanted is False:
            return False
        why = self._glue_obstacle()
        if why is not None and wanted:
            raise ValueError(f"StaticDecoder: fused_glue=True, but the glue cannot be fused: {why}; pass "
                             "fused_glue=None (fuse where possible) or False")
        return why is None

    def _glue_obstacle(self) -> str | None:
        """Why packed_linear_fused cannot run this model's decode steps, or None."""
        if self.device.type not in ("cuda", "cpu") or not has_native_kernels(self.device.type):
            return f"it runs on CUDA or the CPU with the compiled kernels only (device {self.device.type})"
        if not self.fused_attention:
            return "the attention is not fused (fused_attention)"
        if not self.group_projections:
            return "group_projections=False"
        norm_max_in = None  # the CPU op takes any batch and width
        if self.device.type == "cuda":
            if self.dtype not in (torch.float16, torch.bfloat16):
                return f"the model's dtype is {self.dtype}, not float16 or bfloat16"
            from ._torch_api import _C

            max_rows, norm_max_in = _C.cuda_fused_bounds()
            if self.B > max_rows:
                return f"the batch size {self.B} is above the fused kernels' {max_rows} rows"
        for layer in self.base.layers:
            if layer.input_layernorm.weight is None or layer.post_attention_layernorm.weight is None:
                return "an RMSNorm has no weight"
            for mods in _layer_calls(layer):
                if not all(isinstance(mod, PackedRaBiTLinear) for mod in mods):
                    return "not every decoder linear is a PackedRaBiTLinear"
                if len({(mod.packed.shape[0], mod.g.dtype, mod.h.dtype, mod.bias is None,
                         None if mod.bias is None else mod.bias.dtype) for mod in mods}) != 1:
                    return "a q/k/v or gate/up group mixes K, scale dtypes or biases"
            if norm_max_in is not None and layer.input_layernorm.weight.numel() > norm_max_in:
                return f"the hidden size is above the fused RMSNorm's {norm_max_in} columns"
        return None

    # ------------------------------------------------------------------ the model, over the static cache
    def layer_linears(self) -> list[nn.Module]:
        """The quantizable linears of every layer, in execution order."""
        mods = []
        for layer in self.base.layers:
            a, m = layer.self_attn, layer.mlp
            mods += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
        return mods

    def projections(self) -> list[tuple[nn.Module, ...]]:
        """The layers' linears as forward() calls them, in execution order: per layer (q, k, v), (o,), (gate, up),
        (down,) where _grouped() holds, else one linear a call."""
        calls = []
        for layer in self.base.layers:
            for mods in _layer_calls(layer):
                calls += [mods] if self._grouped(mods) else [(lin,) for lin in mods]
        return calls

    def _grouped(self, mods: tuple[nn.Module, ...]) -> bool:
        if len(mods) < 2 or not self.group_projections:
            return False
        return id(mods[0]) in self._stacked or all(isinstance(m, PackedRaBiTLinear) for m in mods)

    def project(self, mods: tuple[nn.Module, ...], x: Tensor) -> list[Tensor]:
        """The outputs of the linears mods on x [..., in]: one packed_linear_group call or one GEMM on the stacked FP
        weights where projections() groups them, else each module's own forward."""
        if not self._grouped(mods):
            return [m(x) for m in mods]
        if id(mods[0]) in self._stacked:
            w, b = self._stacked[id(mods[0])]
            return list(F.linear(x, w, b).split([m.out_features for m in mods], dim=-1))
        lead = x.shape[:-1]
        ys = packed_linear_group(x.reshape(-1, x.shape[-1]).contiguous(), [m.packed for m in mods],
                                 [m.g for m in mods], [m.h for m in mods], [m.bias for m in mods])
        return [y.reshape(*lead, m.out_features) for y, m in zip(ys, mods)]

    def causal_mask(self, pos: Tensor) -> Tensor:
        """Which cache positions the queries at positions pos [T] attend to (the same for every layer), in the form
        attention() takes: [T, max_len] booleans for SDPA; with grouped matmuls (float32 on CUDA) an additive
        [G * T, max_len] float mask, repeated for the G = heads / KV heads query heads of a KV head (row g * T + t)."""
        mask = self.positions[None, :] <= pos[:, None]
        if not self._grouped_matmuls:
            return mask
        additive = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        return additive.repeat(self.groups, 1)

    def attention(self, i: int, q: Tensor, mask: Tensor) -> Tensor:
        """Causal attention of q [B, H, T, D] over layer i's cache, with mask = causal_mask(pos)."""
        k, v = self.k_cache[i], self.v_cache[i]
        if not self._grouped_matmuls:  # see __init__ for where each form is used
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.groups > 1)
        # The G query heads of a KV head become G x T query rows of that head (head h = kv * G + g, as HF's
        # repeat_kv), so the cache is read as it is. Measured on an H200 (torch 2.11), one decode step's attention
        # over SmolLM2's 30 layers in a CUDA graph: float32, batch 1 / 512: these matmuls 0.57 / 6.6 ms, SDPA with
        # enable_gqa 0.77 / 57 ms (its float32 path expands the cache G-fold), SDPA on grouped heads 1.5 / 13 ms;
        # float16: SDPA with enable_gqa 0.29 / 1.9 ms, the fastest form there.
        B, H, T, D = q.shape
        s = torch.matmul(q.reshape(B, self.n_kv, self.groups * T, D), k.transpose(-1, -2)) * D ** -0.5
        return torch.matmul((s + mask).softmax(-1), v).reshape(B, H, T, D)

    def attend_fused(self, i: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """Layer i's attention for one new token per row, the projections q [B, 1, H * D], k, v [B, 1, Hkv * D] at
        position pos [1]: one rabit.decode_attention call (rotary embedding, cache write, attention); [B, 1, H * D]."""
        B, H, Hkv, D = q.shape[0], self.n_heads, self.n_kv, self.head_dim
        return decode_attention(q.view(B, H, D), k.view(B, Hkv, D), v.view(B, Hkv, D), self.k_cache[i],
                                self.v_cache[i], self.cos, self.sin, pos, D ** -0.5).view(B, 1, H * D)

    def unfused_inputs(self, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(cos, sin [1, 1, T, D], mask) for attend_unfused at positions pos [T], the same for every layer."""
        return self.cos[pos][None, None], self.sin[pos][None, None], self.causal_mask(pos)

    def attend_unfused(self, i: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, cos: Tensor, sin: Tensor,
                       mask: Tensor, rope=_rope) -> Tensor:
        """Layer i's attention for the projections q [B, T, H * D], k, v [B, T, Hkv * D] of tokens at positions pos
        [T], without rabit.decode_attention: the rotary embedding, the cache write, then attention(), with cos, sin and
        mask from unfused_inputs(pos); returns [B, T, H * D]."""
        B, T = q.shape[:2]
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        self.k_cache[i].index_copy_(2, pos, k)
        self.v_cache[i].index_copy_(2, pos, v)
        return self.attention(i, q, mask).transpose(1, 2).reshape(B, T, H * D)

    def forward(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """Logits of the last position of tokens [B, T] placed at positions pos [T]; fills the cache there."""
        B, T = tokens.shape
        if T == 1 and self.fused_glue:
            return self.forward_fused(tokens, pos)
        layers = self.base.layers
        norm_fn, add_norm, rope, swiglu = self._decode_fns if T == 1 else self._eager
        h = self.base.embed_tokens(tokens)
        fused = T == 1 and self.fused_attention
        # shared by the layers; the fused attention reads the rotary tables at pos itself
        cos, sin, mask = (None, None, None) if fused else self.unfused_inputs(pos)
        n0 = layers[0].input_layernorm
        x = norm_fn(h, n0.weight, n0.variance_epsilon)
        for i, layer in enumerate(layers):
            a, mlp = layer.self_attn, layer.mlp
            q, k, v = self.project((a.q_proj, a.k_proj, a.v_proj), x)
            if fused:
                o = self.attend_fused(i, q, k, v, pos)
            else:
                o = self.attend_unfused(i, q, k, v, pos, cos, sin, mask, rope)
            pn = layer.post_attention_layernorm
            h, x = add_norm(h, a.o_proj(o), pn.weight, pn.variance_epsilon)
            d = mlp.down_proj(swiglu(*self.project((mlp.gate_proj, mlp.up_proj), x)))
            nn_ = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.base.norm
            h, x = add_norm(h, d, nn_.weight, nn_.variance_epsilon)
        return self._head(x[:, -1:])[:, 0]

    def _int8_layouts(self) -> dict[nn.Module, Tensor]:
        """int8_activations: every decoder linear's packed bits in packed_linear_i8's layout, keyed by the module (on
        CUDA the packed buffers themselves: the CUDA class reads them as they are)."""
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"StaticDecoder: int8_activations=True runs on the CPU and on CUDA, the model is on "
                             f"{self.device}; pass int8_activations=False")
        if self.device.type == "cuda" and self.B != 1:
            raise ValueError(f"StaticDecoder: int8_activations=True decodes one row at a time on CUDA, got "
                             f"batch_size={self.B}; pass batch_size=1, or int8_activations=False")
        if not self.fused_glue:
            raise ValueError(f"StaticDecoder: int8_activations=True needs the fused glue, which cannot run here: "
                             f"{self._glue_obstacle() or 'fused_glue=False'}; pass fused_glue=None, or "
                             "int8_activations=False")
        from ._torch_api import _C

        layouts = {}
        for i, layer in enumerate(self.base.layers):
            a, mlp = layer.self_attn, layer.mlp
            for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                if self.device.type == "cpu":
                    layouts[m] = i8_layout(m.packed, m.h.shape[1])
                    continue
                with torch.cuda.device(self.device):  # the class's bound is the GPU's shared memory
                    fits = _C.cuda_int8_applies(m.h.shape[1], m.h.shape[0])
                if not fits:
                    raise ValueError(f"StaticDecoder: int8_activations=True: layer {i}'s {m.in_features}-column "
                                     f"linears are too wide for the CUDA int8 class on this GPU (its fragments "
                                     f"exceed a block's shared memory); pass int8_activations=False")
                layouts[m] = m.packed  # the CUDA class reads the packed words as they are
        return layouts

    def _fused(self, mods: tuple[nn.Module, ...], x: Tensor, norm: nn.Module | None = None, up: Tensor | None = None,
               residual: Tensor | None = None) -> list[Tensor]:
        """packed_linear_fused (or, int8_activations, packed_linear_fused_i8) of the group mods, called as the
        registered op on argument lists built once per group: the public wrappers' checks and list building took
        ~20 us a call on the CPU (a fifth of a q/k/v call; 120 calls a SmolLM2 step). The decoder checked the
        groups when it chose the fused glue, and its weights do not change."""
        args = self._fused_args.get(id(mods[0]))  # a group's first module is in no other group
        if args is None:
            first = [self._i8_layouts[m] for m in mods] if self._i8_layouts is not None else [m.packed for m in mods]
            args = (first, [m.g for m in mods], [m.h for m in mods],
                    [] if mods[0].bias is None else [m.bias for m in mods])
            self._fused_args[id(mods[0])] = args
        nw, eps = (None, 1e-6) if norm is None else (norm.weight, float(norm.variance_epsilon))
        if self._i8_layouts is not None:
            return torch.ops.rabit.packed_linear_fused_i8(x, *args, nw, eps, up, residual)
        # prefetch_weights: a decoder's weights, which no kernel of the step writes
        return torch.ops.rabit.packed_linear_fused(x, *args, nw, eps, up, residual, True)

    def _decode_layers_args(self) -> tuple:
        """rabit.decode_layers' argument lists (weights, bias, eps), built on first use. Like _fused's lists they refer
        to the modules' tensors, except the int8 layouts (made when the decoder is built) and float32 copies of
        float16/bfloat16 scales (made here): after changing the weights, build a new decoder."""
        if self._layers_args is None:
            weights, bias, eps = [], [], []
            for layer in self.base.layers:
                a, mlp = layer.self_attn, layer.mlp
                mods = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
                weights += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
                for m in mods:
                    # float32 scales: the CPU kernels read them in place instead of converting fp16 ones every call
                    weights += [self._i8_layouts[m] if self._i8_layouts is not None else m.packed, m.g.float(),
                                m.h.float()]
                    bias.append(m.bias if m.bias is not None else m.g.new_empty(0))
                eps += [float(layer.input_layernorm.variance_epsilon), float(layer.post_attention_layernorm.variance_epsilon)]
            if all(b.numel() == 0 for b in bias):
                bias = []
            self._layers_args = (weights, bias, eps)
        return self._layers_args

    @torch.no_grad()  # packed_linear_fused has no backward
    def forward_fused(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """forward() of one token per row (tokens [B, 1]) with the glue inside the packed linears (fused_glue): the
        decoder layers (layers_fused), the final norm, the head."""
        B = tokens.shape[0]
        h = self.layers_fused(self.base.embed_tokens(tokens).view(B, -1), pos)
        n = self.base.norm
        return self._head(self._decode_fns[0](h, n.weight, n.variance_epsilon))

    def layers_fused(self, h: Tensor, pos: Tensor, one_call: bool | None = None) -> Tensor:
        """The decoder layers of a fused-glue step on the residual stream h [B, hidden] at position pos: per layer
        q/k/v on the input norm of h, the attention, h + o_proj, gate/up on the post-attention norm of h,
        h + down_proj(silu(gate) * up); returns h after the last layer. one_call (default: on the CPU) runs them as
        one rabit.decode_layers call, the same ops bit for bit without ~150 Python calls and dispatches a step
        (SmolLM2-135M's 30 layers); else one call per group (on CUDA inside the step's graph, where calls cost
        nothing at replay)."""
        if one_call is None:
            one_call = self.device.type == "cpu"
        if one_call and self.device.type != "cpu":
            raise ValueError(f"StaticDecoder.layers_fused: one_call=True runs on the CPU only (rabit.decode_layers), "
                             f"the model is on {self.device}; pass one_call=None or False")
        if one_call:
            return torch.ops.rabit.decode_layers(h, *self._decode_layers_args(), self.k_cache, self.v_cache, self.cos,
                                                 self.sin, pos, self.n_heads, self.head_dim ** -0.5,
                                                 self._i8_layouts is not None)
        B = h.shape[0]
        for i, layer in enumerate(self.base.layers):
            a, mlp = layer.self_attn, layer.mlp
            q, k, v = self._fused((a.q_proj, a.k_proj, a.v_proj), h, norm=layer.input_layernorm)
            o = self.attend_fused(i, q, k, v, pos).view(B, -1)
            h = self._fused((a.o_proj,), o, residual=h)[0]
            gate, up = self._fused((mlp.gate_proj, mlp.up_proj), h, norm=layer.post_attention_layernorm)
            h = self._fused((mlp.down_proj,), gate, up=up, residual=h)[0]
        return h

    # ------------------------------------------------------------------ decoding
    def _step(self) -> None:
        """One step on the static buffers: next token of _tok at _pos (greedy or sampled), recorded in _out."""
        logits = self.forward(self._tok, self._pos)
        if self.temperature is None:
            nxt = logits.argmax(-1, keepdim=True)
        else:  # the token lands at position _pos + 1: that is its draw's counter
            nxt = sample_next(logits, self._keys, self._pos + 1, self.temperature, self.top_k)[:, None]
            if self.greedy_tokens:  # a device-side choice: the captured graph serves every position
                nxt = torch.where(self._pos + 1 < self._greedy_end, logits.argmax(-1, keepdim=True), nxt)
        self._out.index_copy_(1, self._pos + 1, nxt)
        self._tok.copy_(nxt)
        self._pos.add_(1)

    @contextlib.contextmanager
    def _scratch_state(self):
        """Steps run inside start at _pos = 0; two of them write cache positions 0, 1 and _out columns 1, 2. Those
        slices, _tok and _pos are saved and put back afterwards (slices, not whole caches: ~3 GB at the 7B shape
        and batch 16), so the decoder's state is kept."""
        touched = (self._tok, self._pos, self._out[:, 1:3], self.k_cache[:, :, :, :2], self.v_cache[:, :, :, :2])
        saved = tuple(t.clone() for t in touched)
        self._pos.zero_()
        try:
            yield
        finally:
            for dst, src in zip(touched, saved):
                dst.copy_(src)

    def _capture(self) -> None:
        with self._scratch_state():
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                for _ in range(2):  # warm-up outside the capture: cuBLAS handles, kernel attributes
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(s)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._step()

    @torch.no_grad()
    def warm_up(self) -> "StaticDecoder":
        """Do the one-time work now instead of in the first decode call: the CUDA-graph capture (with the
        torch.compile of the glue inside it), or without a graph one compiled step; so that a timed generate()
        measures prefill and decoding only. The decoder's state is kept."""
        if self.cuda_graph and self._graph is None:
            with torch.cuda.device(self.device):
                self._capture()
        elif not self.cuda_graph and self._decode_fns is not self._eager and not self._warm:
            with self._scratch_state(), torch.inference_mode():  # as decode() runs it: no recompilation there
                self._step()
        self._warm = True
        return self

    def _check_prompt(self, input_ids: Tensor) -> int:
        """The prompt's length T, once its shape, ids and length are checked."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != self.B:
            raise ValueError(f"StaticDecoder: expected input_ids of shape [{self.B}, T], got "
                             f"{tuple(getattr(input_ids, 'shape', ())) or type(input_ids).__name__}")
        check_token_ids(input_ids, self.base.embed_tokens.num_embeddings, "StaticDecoder")
        T = input_ids.shape[1]
        if not 1 <= T < self.max_len:
            raise ValueError(f"StaticDecoder: the prompt has {T} tokens; it must have 1 .. max_len-1 = "
                             f"{self.max_len - 1}")
        return T

    def prefill(self, input_ids: Tensor) -> None:
        """Fill the cache with the prompt input_ids [B, T] and set up the first decode step."""
        self._prefill(input_ids, self._check_prompt(input_ids))

    @torch.no_grad()
    def _prefill(self, input_ids: Tensor, T: int) -> None:
        ids = input_ids.to(self.device)
        self.k_cache.zero_()
        self.v_cache.zero_()
        self._out.zero_()
        self._out[:, :T] = ids
        if T > 1:
            self.forward(ids[:, :-1], self.positions[: T - 1])
        self._tok.copy_(ids[:, -1:])
        self._pos.fill_(T - 1)
        self._greedy_end.fill_(T + self.greedy_tokens)
        self._steps_left = self.max_len - T

    @torch.no_grad()
    def decode(self, steps: int) -> None:
        """Run `steps` decoding steps (greedy or sampled) from the current state (graph replays on CUDA); no
        synchronisation."""
        if steps > self._steps_left:
            raise ValueError(f"StaticDecoder: {steps} more tokens would pass max_len={self.max_len}")
        self._steps_left -= steps
        if not self.cuda_graph:
            # inference_mode, not only no_grad: the custom ops' Python autograd wrappers still run under no_grad
            # (~3 us per packed linear on the CPU, docs/kernels.md). _step only writes the decoder's buffers in
            # place, and those stay normal tensors.
            with torch.inference_mode(), _gc_paused():
                for _ in range(steps):
                    self._step()
            return
        with torch.cuda.device(self.device):  # capture and replay on the model's GPU, not the current one
            if self._graph is None:
                self._capture()
            for _ in range(steps):
                self._graph.replay()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None, seed: int = 0,
                 first_row: int = 0) -> Tensor:
        """Continuation: [B, T + n] token ids (n <= max_new_tokens), greedy or sampled (the decoder's temperature).
        With eos_token_id it stops once every row has produced it (checked every 16 tokens, so up to 15 more
        columns may follow), and positions after a row's first EOS hold that EOS. Sampling draws row r's numbers
        from (seed, first_row + r, position) (rabit.sampling.row_keys), so a set sampled in batches gets the same
        draws whatever the batch size. The model's generation_config processors (repetition penalty, suppressed
        tokens, ...) are not applied."""
        if not (is_int(max_new_tokens) and max_new_tokens >= 0):
            raise ValueError(f"StaticDecoder: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        T = self._check_prompt(input_ids)
        if T + max_new_tokens > self.max_len:  # said before any work, not after the chunks that fit
            raise ValueError(f"StaticDecoder: {T} prompt + {max_new_tokens} new tokens exceed max_len={self.max_len}; "
                             "build the decoder with a larger max_len or ask for fewer tokens")
        if self.temperature is not None:
            self._keys.copy_(row_keys(seed, torch.arange(first_row, first_row + self.B, device=self.device)))
        self._prefill(input_ids, T)
        done, chunk = 0, 16
        while done < max_new_tokens:
            n = min(chunk, max_new_tokens - done)
            self.decode(n)
            done += n
            if eos_token_id is not None and bool((self._out[:, T:T + done] == eos_token_id).any(1).all()):
                break
        out = self._out[:, :T + done].clone()
        if eos_token_id is not None:
            gen = out[:, T:]
            gen[(gen == eos_token_id).cumsum(1) > 0] = eos_token_id  # from each row's first EOS on
        return out.cpu()
