"""Teacher-data sampling speed, and the decode attention behind it (CUDA only).

    python benchmarks/bench_sampling.py [--seqs 512] [--seq-len 512] [--model smollm2-135m] [--parts ...] [--out DIR]

On a model with SmolLM2-135M's shapes and random weights (9 query / 3 KV heads; speed does not depend on the
values), or on the real model with ``--model``, same run (``--parts`` picks the sections; all by default):

* ``attention``: one decode step's attention over all 30 layers, captured in a CUDA graph, for float16 and
  float32 at batch 1, 16 and 512: ``StaticDecoder.attention`` as it is (fp16: SDPA with enable_gqa; float32:
  grouped matmuls) against the two SDPA forms it chose between (``enable_gqa=True``; the query heads grouped
  onto their KV head, one SDPA call).
* ``teacher_data``: ``--seqs`` x ``--seq-len`` tokens sampled at temperature 1 in float32 (the teacher's
  dtype), one batch, by ``rabit.data.generate_teacher_data`` (StaticDecoder: static cache, CUDA graph) and by
  the HF loop (``rabit.data.decode_loop`` over the HF forward, its path for non-Llama models); both draw the
  same random numbers, so the tokens differ only where float rounding moves a probability across a draw (the
  fraction of equal tokens is reported).
* ``dtypes``: ``generate_teacher_data(..., dtype=D)`` for D in float32 (the teacher's own), bfloat16 and float16,
  ``--seqs`` sequences in batches of ``--gen-batch``: time; how far each dtype's next-token distributions are from
  float32's (mean total variation per position, teacher-forced on the float32 sample); and the float32 teacher's
  mean NLL of each dtype's sample (at temperature 1 a faithful sample's NLL is the teacher's entropy rate).
  The tokens themselves are no measure: the inverse-CDF draw is not a maximal coupling, so a shift of the
  cumulative probability smaller than one rare token's interval already changes the token, and a changed token
  changes the rest of the row (with SmolLM2 the half-precision samples leave the float32 one after 2-4 tokens on
  average while their distributions differ by 0.3-2 % total variation). Meaningful with ``--model``.

Writes bench_sampling_<gpu>_<date>.json into --out (else $OUT, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402

from rabit.data import bos_token_id, decode_loop, generate_teacher_data  # noqa: E402
from rabit.models import load_model  # noqa: E402
from rabit.sampling import row_keys, sample_next  # noqa: E402
from rabit.static_decode import StaticDecoder  # noqa: E402
from bench_train import smollm2_shaped  # noqa: E402
from timing import device_tag, graph_time_us, write_result  # noqa: E402


def attention_times(model, dtype, batch, max_len):
    """µs per decode step (all layers) of each attention form, and each form's max deviation from rabit's."""
    dec = StaticDecoder(copy.deepcopy(model).to(dtype), batch_size=batch, max_len=max_len, cuda_graph=False)
    dec.k_cache.normal_()
    dec.v_cache.normal_()
    q = torch.randn(batch, dec.n_heads, 1, dec.head_dim, device=dec.device, dtype=dtype)
    pos = torch.tensor([max_len - 100], device=dec.device)
    n, G, kv = len(dec.base.layers), dec.groups, dec.n_kv
    bool_mask = dec.positions[None, :] <= pos[:, None]

    def rabit_form():
        mask = dec.causal_mask(pos)
        return [dec.attention(i, q, mask) for i in range(n)]

    def sdpa_gqa():
        return [F.scaled_dot_product_attention(q, dec.k_cache[i], dec.v_cache[i], attn_mask=bool_mask,
                                               enable_gqa=True) for i in range(n)]

    def sdpa_grouped():
        m = bool_mask.repeat(G, 1)
        return [F.scaled_dot_product_attention(q.reshape(batch, kv, G, -1), dec.k_cache[i], dec.v_cache[i],
                                               attn_mask=m).reshape(q.shape) for i in range(n)]

    ref = rabit_form()[0].float()
    row = {}
    for name, fn in (("rabit", rabit_form), ("sdpa_enable_gqa", sdpa_gqa), ("sdpa_grouped", sdpa_grouped)):
        us, sd = graph_time_us([fn], reps=10, min_calls=5)
        row[name] = {"us_per_step": round(us, 1), "max_abs_diff_vs_rabit": (fn()[0].float() - ref).abs().max().item()}
    return row


def sampler_times(model, seqs, seq_len):
    """One batch of seqs x seq_len tokens: the HF loop (decode_loop over the HF forward, what
    generate_teacher_data runs for non-Llama models) against generate_teacher_data itself (StaticDecoder). Each
    runs once untimed on a short sequence first, so neither carries first-call costs."""
    keys = row_keys(0, torch.arange(seqs, device="cuda"))

    def hf_loop(length):
        return decode_loop(model, torch.ones(seqs, 1, dtype=torch.long, device="cuda"), length - 1,
                           lambda logits, pos: sample_next(logits, keys, pos)).cpu()

    def teacher_data(length):
        return generate_teacher_data(model, seqs, length, seqs, 1, seed=0, progress=False)

    res, toks, secs = {}, {}, {}
    for name, fn in (("hf_loop", hf_loop), ("generate_teacher_data", teacher_data)):
        fn(8)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        toks[name] = fn(seq_len)
        torch.cuda.synchronize()
        secs[name] = time.perf_counter() - t0
        res[name] = {"s": round(secs[name], 2), "tokens_per_s": round(seqs * (seq_len - 1) / secs[name]),
                     "peak_memory_bytes": torch.cuda.max_memory_allocated()}
    res["speedup"] = round(secs["hf_loop"] / secs["generate_teacher_data"], 2)
    res["equal_token_fraction"] = (toks["hf_loop"] == toks["generate_teacher_data"]).float().mean().item()
    return res


@torch.no_grad()
def teacher_nll(model, ids, batch=32):
    """Mean NLL (nats) of ids[:, 1:] under the float32 model."""
    total, n = 0.0, 0
    for i in range(0, len(ids), batch):
        x = ids[i : i + batch].to(next(model.parameters()).device)
        logits = model(input_ids=x[:, :-1]).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        n += x[:, 1:].numel()
    return total / n


@torch.no_grad()
def total_variation(model, other, ids, batch=16):
    """Mean total variation between the next-token distributions of ``model`` and ``other`` over ids[:, :-1]."""
    total, n = 0.0, 0
    for i in range(0, len(ids), batch):
        x = ids[i : i + batch, :-1].to(next(model.parameters()).device)
        p = torch.softmax(model(input_ids=x).logits.float(), -1)
        q = torch.softmax(other(input_ids=x).logits.float(), -1)
        total += 0.5 * (p - q).abs().sum(-1).sum().item()
        n += x.numel()
    return total / n


def dtype_comparison(model, seqs, seq_len, gen_batch, dtypes):
    """generate_teacher_data in each dtype (same draws): seconds, tokens/s, distance from the float32 sample."""
    bos = bos_token_id(model)
    rows, samples = [], {}
    for name in dtypes:
        generate_teacher_data(model, min(gen_batch, seqs), 8, gen_batch, bos, seed=0, progress=False, dtype=name)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ids = generate_teacher_data(model, seqs, seq_len, gen_batch, bos, seed=0, progress=False, dtype=name)
        torch.cuda.synchronize()
        s = time.perf_counter() - t0
        samples[name] = ids
        row = {"dtype": name, "s": round(s, 2), "tokens_per_s": round(seqs * (seq_len - 1) / s),
               "peak_memory_bytes": torch.cuda.max_memory_allocated(),
               "teacher_nll_float32": round(teacher_nll(model, ids), 4)}
        ref = samples.get("float32")
        if ref is not None and name != "float32":
            half = copy.deepcopy(model).to(getattr(torch, name))
            row["total_variation_vs_float32"] = round(total_variation(model, half, ref[: min(seqs, 64)]), 5)
            del half
        rows.append(row)
        print("dtypes: " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--gen-batch", type=int, default=512, help="sequences sampled at once in the dtypes part")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"],
                    choices=["float32", "bfloat16", "float16"], help="the first is the reference of the others")
    ap.add_argument("--model", default=None, help="a model name or path (default: SmolLM2-135M shapes, random weights)")
    ap.add_argument("--parts", nargs="+", default=["attention", "hf-loop", "dtypes"],
                    choices=["attention", "hf-loop", "dtypes"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="", help="suffix of the JSON's name")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_sampling.py: needs a CUDA GPU")
    if args.model:
        model = load_model(args.model, device="cuda")[0].eval()
    else:
        model = smollm2_shaped("cuda")  # float32, the teacher's dtype; attention_times converts copies
    doc = {"benchmark": "bench_sampling", "device": torch.cuda.get_device_name(),
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "model": args.model or "SmolLM2-135M shapes, random weights",
           "command": " ".join(["bench_sampling.py", *(argv if argv is not None else sys.argv[1:])])}
    if "attention" in args.parts:
        attention = []
        for dtype in (torch.float16, torch.float32):
            for batch in (1, 16, 512):
                row = attention_times(model, dtype, batch, max_len=512)
                attention.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch, **row})
                print(f"attention {attention[-1]['dtype']:>7} batch {batch:>3}: " +
                      "  ".join(f"{k} {v['us_per_step']:8.1f} µs" for k, v in row.items()), flush=True)
        doc["attention_decode_step"] = attention
    if "hf-loop" in args.parts:
        sampling = sampler_times(model, args.seqs, args.seq_len)
        print(f"teacher data {args.seqs} x {args.seq_len}, float32: HF loop {sampling['hf_loop']['s']} s, "
              f"generate_teacher_data {sampling['generate_teacher_data']['s']} s ({sampling['speedup']}x), equal "
              f"tokens {sampling['equal_token_fraction']:.4f}", flush=True)
        doc["teacher_data"] = {"seqs": args.seqs, "seq_len": args.seq_len, **sampling}
    if "dtypes" in args.parts:
        doc["teacher_data_dtypes"] = {"seqs": args.seqs, "seq_len": args.seq_len, "gen_batch": args.gen_batch,
                                      "rows": dtype_comparison(model, args.seqs, args.seq_len, args.gen_batch,
                                                               args.dtypes)}
    tag = f"_{args.tag}" if args.tag else ""
    write_result(doc, args.out, f"bench_sampling_{device_tag(doc['device'])}_{datetime.date.today()}{tag}.json")


if __name__ == "__main__":
    main()
