"""The dense float32 output head at M = 1 on the CPU: how fast torch reads it, and how fast it could.

    python benchmarks/bench_cpu_head.py [--tag TAG] [--out DIR]

The FP32 lm_head is not packed (embeddings and head stay full precision), and on this project's 2-core VM it is half
of SmolLM2-135M's packed decode step (docs/kernels.md). For head shapes [vocab, hidden], same run, the median of 5
rounds of 4 calls after 2 warm-up calls: torch F.linear on the row-major weight (what nn.Linear runs), x @ W^T from
a [hidden, vocab] contiguous copy (the other GEMV layout of the same BLAS), and W.sum() as a plain read of the
weight's bytes (the bandwidth a GEMV could reach). Run it on an idle machine: both cores are in use. Also the largest |difference| between the two products, relative to the largest
output. Writes bench_cpu_head_<date>[_TAG].json (into --out, else $OUT, else benchmarks/results/).
"""

import argparse

import torch
import torch.nn.functional as F

from bench_cpu_call_overhead import median_us
from timing import write_cpu_result

REPS = dict(n=4, rounds=5, warmup=2)  # the median of 5 rounds of 4 calls, after 2 warm-up calls
SHAPES = [(4096, 576), (16384, 576), (49152, 576), (32000, 2048), (32000, 4096)]  # SmolLM2 is 49,152 x 576


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for vocab, hidden in SHAPES:
            w = torch.randn(vocab, hidden)
            wt = w.t().contiguous()
            x = torch.randn(1, hidden)
            mb = w.numel() * 4 / 1e6
            row = dict(vocab=vocab, hidden=hidden, megabytes=round(mb, 1),
                       linear_row_major_ms=round(median_us(lambda: F.linear(x, w), **REPS) / 1e3, 3),
                       matmul_transposed_copy_ms=round(median_us(lambda: x @ wt, **REPS) / 1e3, 3),
                       read_sum_ms=round(median_us(lambda: w.sum(), **REPS) / 1e3, 3))
            for k in ("linear_row_major", "matmul_transposed_copy", "read_sum"):
                row[f"{k}_GBps"] = round(mb / row[f"{k}_ms"], 1)
            ref = F.linear(x, w)
            row["max_rel_difference"] = float((ref - x @ wt).abs().max() / ref.abs().max())
            rows.append(row)
            print(f"{vocab}x{hidden} ({mb:.0f} MB): F.linear {row['linear_row_major_ms']} ms "
                  f"({row['linear_row_major_GBps']} GB/s), x @ W^T copy {row['matmul_transposed_copy_ms']} ms "
                  f"({row['matmul_transposed_copy_GBps']} GB/s), read {row['read_sum_ms']} ms "
                  f"({row['read_sum_GBps']} GB/s)", flush=True)
    write_cpu_result("bench_cpu_head", __doc__.split("\n\n")[2].strip(), rows, args.out, args.tag,
                     blas="MKL" if "Math Kernel Library" in torch.__config__.show() else "not MKL (torch.__config__.show())")

if __name__ == "__main__":
    main()
