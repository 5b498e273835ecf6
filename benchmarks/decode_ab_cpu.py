"""A/B of two StaticDecoder settings on the CPU, the two decoders alternated in one process so that a noisy machine
affects both alike: `--compare head-dtype`, lm_head in float32 (or the --base-head copy) against a float16 (or
bfloat16, or int8 blocks: --head-dtype) copy of it, with float32 or (--int8-activations) int8 activation tables in
both; `--compare fused-glue`, the glue (norms, SwiGLU, residual adds) as torch ops (fused_glue=False) against inside
rabit.packed_linear_fused (the default), both with the float32 head; `--compare int8`, the fused glue's packed
linears on float32 tables (the default) against int8 activation tables (int8_activations=True,
rabit.packed_linear_fused_i8), both with the --head-dtype head (float16 by default; float32: lm_head as it is).

    python benchmarks/decode_ab_cpu.py [--compare head-dtype|fused-glue|int8] [--model smollm2-135m] [--rounds 5]
                                       [--new 64] [--head-dtype H] [--base-head H] [--int8-activations] [--out DIR]

The model's linears are packed with random bits (bench_decode.py's pack_random_: speed, not accuracy); the prompt
is 128 random tokens. Writes <compare>_ab_<model>_cpu_<date>.json (head_dtype_ab_..., fused_glue_ab_..., int8_ab_...): ms per
decoded token per round, the medians, the paired rounds the second setting won, and whether the two decoded the
same greedy tokens (both settings round otherwise in the last bits, so a near-tie may go either way).
"""
import argparse
import datetime
import platform
import statistics
import time

import torch

import bench_decode as B
from rabit.static_decode import StaticDecoder
from timing import write_result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", choices=["head-dtype", "fused-glue", "int8"], default="head-dtype")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--head-dtype", choices=["float16", "bfloat16", "int8", "float32"], default="float16")
    ap.add_argument("--base-head", choices=["float16", "bfloat16", "int8", "float32"], default="float32",
                    help="--compare head-dtype: the head --head-dtype is compared with (default float32)")
    ap.add_argument("--int8-activations", action="store_true",
                    help="--compare head-dtype: both decoders on int8 activation tables")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default=None, help="folder for the JSON (default: $OUT, else benchmarks/results/)")
    args = ap.parse_args(argv)
    dev = torch.device("cpu")
    model, weights = B.load(args.model, dev, torch.float32)
    model = B.pack_random_(model)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    n = args.prompt + args.new + 1
    if args.compare == "head-dtype" and args.head_dtype == args.base_head:
        ap.error(f"--compare head-dtype compares --base-head {args.base_head} with another --head-dtype")
    if args.compare != "head-dtype" and (args.base_head != "float32" or args.int8_activations):
        ap.error("--base-head and --int8-activations are for --compare head-dtype")
    if args.head_dtype == "int8" and args.compare != "head-dtype":
        ap.error("--head-dtype int8 is for --compare head-dtype")

    def head(name):
        return None if name == "float32" else name

    if args.compare == "head-dtype":
        decs = {name: StaticDecoder(model, max_len=n, head_dtype=head(name), int8_activations=args.int8_activations)
                for name in (args.base_head, args.head_dtype)}
    elif args.compare == "int8":
        decs = {"float32": StaticDecoder(model, max_len=n, head_dtype=head(args.head_dtype)),
                "int8": StaticDecoder(model, max_len=n, head_dtype=head(args.head_dtype), int8_activations=True)}
    else:
        # fused_glue=True: an error that names what stands in the way where the glue cannot be fused
        decs = {"unfused": StaticDecoder(model, max_len=n, fused_glue=False),
                "fused": StaticDecoder(model, max_len=n, fused_glue=True)}
    (a, b), ms, tokens = decs, {k: [] for k in decs}, {}
    for _ in range(args.rounds):
        for k, dec in decs.items():
            dec.prefill(ids)
            dec.decode(2)  # warm-up
            dec.prefill(ids)
            t = time.perf_counter()
            dec.decode(args.new)
            ms[k].append(round((time.perf_counter() - t) / args.new * 1e3, 3))
            tokens[k] = dec._out.clone()  # prompt and decoded tokens
    same = torch.equal(tokens[a], tokens[b])
    if not same:  # both round otherwise in the last bits: a near-tie between two tokens can go either way
        print(f"note: {a} and {b} decoded different tokens")
    med = {k: statistics.median(v) for k, v in ms.items()}
    for k in decs:
        print(f"{args.compare} {k:9s}: {med[k]:7.2f} ms/token ({1e3 / med[k]:.1f} tok/s); rounds {ms[k]}")
    doc = {"benchmark": f"{args.compare.replace('-', '_')}_ab", "compare": args.compare, "model": args.model,
           "head_dtype": {"head-dtype": f"{args.base_head} vs {args.head_dtype}", "fused-glue": "float32"}.get(
               args.compare, args.head_dtype),
           "int8_activations": args.int8_activations if args.compare == "head-dtype" else args.compare == "int8",
           "weights": weights + " (packed linears)",
           "device": f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads", "device_type": "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "prompt_tokens": args.prompt, "new_tokens": args.new, "rounds": args.rounds,
           "ms_per_token": ms, "median_ms_per_token": med, "speedup": round(med[a] / med[b], 3),
           "rounds_won_by_" + b: sum(x < y for x, y in zip(ms[b], ms[a])), "same_tokens": same}
    write_result(doc, args.out, f"{doc['benchmark']}_{args.model}_cpu_{datetime.date.today().isoformat()}.json")


if __name__ == "__main__":
    main()
