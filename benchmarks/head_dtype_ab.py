"""A/B of StaticDecoder's head_dtype on the CPU: a decode step with lm_head in float32 against a float16 (or
bfloat16) copy of it, the two decoders alternated in one process so that a noisy machine affects both alike.

    python benchmarks/head_dtype_ab.py [--model smollm2-135m] [--rounds 5] [--new 64] [--out DIR]

The model's linears are packed with random bits (bench_decode.py's pack_random_: speed, not accuracy); the prompt
is 128 random tokens. Writes head_dtype_ab_<model>_cpu_<date>.json: ms per decoded token per round and the medians.
"""
import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import bench_decode as B
from rabit.static_decode import StaticDecoder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--head-dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    dev = torch.device("cpu")
    model, weights = B.load(args.model, dev, torch.float32)
    model = B.pack_random_(model)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    n = args.prompt + args.new + 1
    decs = {"float32": StaticDecoder(model, max_len=n),
            args.head_dtype: StaticDecoder(model, max_len=n, head_dtype=args.head_dtype)}
    ms = {k: [] for k in decs}
    for _ in range(args.rounds):
        for k, dec in decs.items():
            dec.prefill(ids)
            dec.decode(2)  # warm-up
            dec.prefill(ids)
            t = time.perf_counter()
            dec.decode(args.new)
            ms[k].append(round((time.perf_counter() - t) / args.new * 1e3, 3))
    med = {k: statistics.median(v) for k, v in ms.items()}
    for k in decs:
        print(f"lm_head {k:9s}: {med[k]:7.2f} ms/token ({1e3 / med[k]:.1f} tok/s); rounds {ms[k]}")
    doc = {"benchmark": "head_dtype_ab", "model": args.model, "weights": weights + " (packed linears)",
           "device": f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads", "device_type": "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "prompt_tokens": args.prompt, "new_tokens": args.new, "rounds": args.rounds,
           "ms_per_token": ms, "median_ms_per_token": med,
           "speedup": round(med["float32"] / med[args.head_dtype], 3)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"head_dtype_ab_{args.model}_cpu_{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
