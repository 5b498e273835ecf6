"""CPU time of one model forward over a window of tokens (what a perplexity evaluation or a long prompt's prefill
costs): FP32 torch against the packed model with the default CPU kernels (`rabit.set_cpu_kernel("auto")`: the table
kernels below `rabit.CPU_GEMM_MIN_ROWS` rows of x, Ŵ dequantized into a float32 BLAS GEMM from there) and with the
table kernel that auto runs below that (the widest of `avx512`, `avx2`, `ref` this CPU runs) forced at every M. Same
process, the three alternating in each round.

The packed model is the FP model's decoder linears replaced by packed layers with random bits and scales (speed only,
as in bench_decode.py), so the logits are not meaningful.

    python benchmarks/bench_cpu_window.py [--models smollm2-135m] [--tokens 128 512 2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

from bench_decode import pack_random_
from timing import write_result

import rabit
from rabit.models import load_model


def forward_s(model, ids) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048], help="window lengths")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    table = rabit.cpu_kernel()  # under "auto": the widest table kernel this CPU runs
    rows = []
    for name in args.models.split(","):
        fp, _ = load_model(name, dtype=torch.float32, device="cpu")
        fp.eval()
        packed = pack_random_(copy.deepcopy(fp))
        for t in args.tokens:
            ids = torch.randint(3, fp.config.vocab_size, (1, t), generator=torch.Generator().manual_seed(t))
            variants = {"fp32": (fp, "auto"), "rabit": (packed, "auto"), f"rabit_{table}": (packed, table)}
            times = {k: [] for k in variants}
            for _ in range(args.rounds + 1):  # the first round warms up and is dropped
                for k, (model, kernel) in variants.items():
                    rabit.set_cpu_kernel(kernel)
                    times[k].append(forward_s(model, ids))
            rabit.set_cpu_kernel("auto")
            med = {k: statistics.median(v[1:]) for k, v in times.items()}
            row = {"model": name, "tokens": t, **{f"{k}_s": round(v, 4) for k, v in med.items()},
                   "rabit_vs_table": round(med[f"rabit_{table}"] / med["rabit"], 3),
                   "rabit_vs_fp32": round(med["fp32"] / med["rabit"], 3),
                   "all_rounds_s": {k: [round(x, 4) for x in v[1:]] for k, v in times.items()}}
            rows.append(row)
            print(f"{name:14s} {t:5d} tokens: fp32 {med['fp32']:.3f} s, rabit {med['rabit']:.3f} s, rabit with the "
                  f"{table} kernel at every M {med[f'rabit_{table}']:.3f} s ({row['rabit_vs_table']:.2f}x)", flush=True)
        del fp, packed
    doc = {"benchmark": "bench_cpu_window", "device": f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores",
           "threads": torch.get_num_threads(), "cpu_gemm_min_rows": rabit.CPU_GEMM_MIN_ROWS,
           "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "rabit": rabit.__version__},
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rounds": args.rounds,
           "method": "median over rounds of one forward (batch 1, no KV cache, logits of the last position), the "
           "variants alternating in one process; packed weights are random bits", "rows": rows}
    tag = f"_{args.tag}" if args.tag else ""
    write_result(doc, args.out, f"bench_cpu_window_{time.strftime('%Y-%m-%d')}{tag}.json")


if __name__ == "__main__":
    main()
