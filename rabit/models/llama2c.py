"""Load llama2.c checkpoints (legacy "version 0" ``.bin``) and tokenizers into Hugging Face form.

The embedded default model is Karpathy's tinyllamas ``stories260K`` (dim 64, 5 layers, vocab 512),
vendored under ``rabit/assets/stories260K``. It becomes an ordinary
``transformers.LlamaForCausalLM``, so the rest of rabit treats it like any other Llama.

File layout (llama2.c ``run.c``): 7 int32 header fields ``dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len`` (a negative vocab_size means the classifier is *not* tied to the
embedding), then float32 arrays in ``nn.Linear`` (out, in) layout::

    tok_embeddings (V, dim), rms_att (L, dim), wq (L, dim, dim), wk (L, kv_dim, dim),
    wv (L, kv_dim, dim), wo (L, dim, dim), rms_ffn (L, dim), w1 (L, hidden, dim),
    w2 (L, dim, hidden), w3 (L, hidden, dim), rms_final (dim),
    freq_cis_real, freq_cis_imag (seq_len, head_size/2 each; unused), [wcls (V, dim) if untied]
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "stories260K"
STORIES260K_BIN = ASSET_DIR / "stories260K.bin"
TOK512_BIN = ASSET_DIR / "tok512.bin"

_HEADER = struct.Struct("<7i")
# llama2.c's newer export formats start with this magic ("ak42"); they are not supported here.
_V1_MAGIC = 0x616B3432

from ..llama2c_tokenizer import Llama2cTokenizer, _read_file, _require_file  # noqa: E402,F401


def read_llama2c_header(path: str | Path) -> dict:
    """The 7-field header of a legacy llama2.c checkpoint as a dict (plus ``shared_classifier``)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise ValueError(f"rabit: llama2.c checkpoint {path} is truncated: expected a "
                         f"{_HEADER.size}-byte header, got {len(head)} bytes; re-copy the file")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _HEADER.unpack(head)
    if struct.unpack_from("<I", head)[0] == _V1_MAGIC:
        raise ValueError(f"rabit: {path} is a llama2.c version-1+ export (magic 'ak42'); only the "
                         "legacy version-0 format is supported: re-export with `export.py --version 0`")
    cfg = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads,
               n_kv_heads=n_kv_heads, vocab_size=abs(vocab), seq_len=seq_len,
               shared_classifier=vocab > 0)
    ok = (all(0 < v < 1 << 20 for v in (dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab),
                                        seq_len))
          and dim % n_heads == 0 and (dim // n_heads) % 2 == 0 and n_heads % n_kv_heads == 0)
    if not ok:
        raise ValueError(f"rabit: llama2.c checkpoint {path} has a corrupted header {cfg}; "
                         "expected positive sizes with dim divisible by n_heads, an even head size "
                         "and n_heads divisible by n_kv_heads; re-copy or re-export the file")
    return cfg


def _permute(w: torch.Tensor, n: int) -> torch.Tensor:
    """llama2.c stores q/k rows for interleaved RoPE pairs; HF Llama rotates half-split pairs."""
    d_out, d_in = w.shape
    return w.reshape(n, d_out // n // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def load_llama2c(checkpoint: str | Path, tokenizer_path: str | Path | None = None,
                 dtype: torch.dtype = torch.float32, what: str = "llama2.c"):
    """Load a legacy llama2.c checkpoint as ``(LlamaForCausalLM in eval mode, Llama2cTokenizer)``.

    ``tokenizer_path`` defaults to ``tok{vocab}.bin`` or ``tokenizer.bin`` beside the checkpoint,
    then to the vendored ``tok512.bin`` when the vocab is 512.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    checkpoint = Path(checkpoint)
    _require_file(checkpoint, f"{what} checkpoint")
    h = read_llama2c_header(checkpoint)
    dim, hid, L, V = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"]
    nh, nkv, seq = h["n_heads"], h["n_kv_heads"], h["seq_len"]
    hs = dim // nh
    kv_dim = nkv * hs
    shapes = [("emb", (V, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)),
              ("wk", (L, kv_dim, dim)), ("wv", (L, kv_dim, dim)), ("wo", (L, dim, dim)),
              ("rms_ffn", (L, dim)), ("w1", (L, hid, dim)), ("w2", (L, dim, hid)),
              ("w3", (L, hid, dim)), ("rms_final", (dim,)), ("freq", (2, seq, hs // 2))]
    if not h["shared_classifier"]:
        shapes.append(("wcls", (V, dim)))
    n_floats = sum(int(np.prod(s)) for _, s in shapes)
    expected = _HEADER.size + 4 * n_floats
    size = checkpoint.stat().st_size
    if size != expected:
        kind = "truncated" if size < expected else "corrupted (trailing data)"
        raise ValueError(f"rabit: {what} checkpoint {checkpoint} is {kind}: expected {expected} "
                         f"bytes, got {size}; re-copy the file (header: {h})")

    flat = np.fromfile(checkpoint, dtype="<f4", offset=_HEADER.size)
    w, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = torch.from_numpy(flat[off:off + n].copy()).reshape(shape)
        off += n
    bad = [k for k, t in w.items() if k != "freq" and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"rabit: {what} checkpoint {checkpoint} is corrupted: non-finite values "
                         f"in {bad}; re-copy the file")

    config = LlamaConfig(
        vocab_size=V, hidden_size=dim, intermediate_size=hid, num_hidden_layers=L,
        num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hs,
        max_position_embeddings=seq, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=h["shared_classifier"], bos_token_id=1, eos_token_id=2,
        attention_bias=False, mlp_bias=False, hidden_act="silu")
    sd = {"model.embed_tokens.weight": w["emb"], "model.norm.weight": w["rms_final"],
          "lm_head.weight": w["emb"] if h["shared_classifier"] else w["wcls"]}
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        sd[p + "self_attn.q_proj.weight"] = _permute(w["wq"][i], nh)
        sd[p + "self_attn.k_proj.weight"] = _permute(w["wk"][i], nkv)
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
    model = LlamaForCausalLM(config)
    model.load_state_dict(sd, strict=True)
    if h["shared_classifier"]:
        model.tie_weights()
    # Stories end with EOS rather than padding; this also silences generate()'s pad warning.
    model.generation_config.pad_token_id = 2
    model = model.to(dtype).eval()

    tok = Llama2cTokenizer(_find_tokenizer(checkpoint, V, tokenizer_path))
    if tok.vocab_size != V:
        raise ValueError(f"rabit: tokenizer {tok.path} has {tok.vocab_size} entries but checkpoint "
                         f"{checkpoint} has vocab {V}; pass the matching tokenizer_path")
    return model, tok


def _find_tokenizer(checkpoint: Path, vocab: int, tokenizer_path) -> Path:
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    for cand in (checkpoint.parent / f"tok{vocab}.bin", checkpoint.parent / "tokenizer.bin"):
        if cand.is_file():
            return cand
    if vocab == 512:
        return TOK512_BIN
    raise FileNotFoundError(f"rabit: no tokenizer found for {checkpoint} (looked for tok{vocab}.bin "
                            "and tokenizer.bin beside it); pass tokenizer_path=")


def load_stories260k(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for tinyllamas stories260K; ``path=None`` uses the vendored copy.

    ``path`` may be the ``.bin`` checkpoint or a directory holding ``stories260K.bin`` and
    ``tok512.bin``. The model is a ``LlamaForCausalLM`` in eval mode.
    """
    ckpt = STORIES260K_BIN if path is None else Path(path)
    if ckpt.is_dir():
        ckpt = ckpt / "stories260K.bin"
    return load_llama2c(ckpt, dtype=dtype, what="stories260K")
