"""Per-call time of the CPU packed linear at decode sizes (M = 1), against torch F.linear in the same run.

    python benchmarks/bench_cpu_call_overhead.py [--tag TAG] [--out DIR]

Small layers (stories260K's 64-wide ones, SmolLM2's 576 / 1536) are where a packed call's fixed costs show: the
torch op under inference_mode (as StaticDecoder runs it), K = 2, with fp16 scales (the export format) and with
float32 ones, and FP32 F.linear of the same shape. Median of 5 rounds of 3,000 calls after 300 warm-up calls.
Writes bench_cpu_call_overhead_<date>[_TAG].json (into --out, else $OUT, else benchmarks/results/).
"""

import argparse
import statistics
import time

import torch

import rabit
from timing import write_cpu_result

SHAPES = [(64, 64), (172, 64), (576, 576), (1536, 576), (576, 1536)]


def median_us(f, n=3000, rounds=5, warmup=300):
    """The median over `rounds` of the mean µs per call of `n` calls, after `warmup` calls."""
    for _ in range(warmup):
        f()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    op = torch.ops.rabit.packed_linear.default
    rows = []
    for out, in_features in SHAPES:
        w = torch.randn(out, in_features)
        g, h = torch.rand(2, out) + 0.1, torch.rand(2, in_features) + 0.5
        _, packed = rabit.residual_binarize(w, g, h)
        x = torch.randn(1, in_features)
        g16, h16 = g.half(), h.half()
        with torch.inference_mode():
            row = dict(out=out, in_=in_features,
                       packed_fp16_scales_us=round(median_us(lambda: op(x, packed, g16, h16, None)), 2),
                       packed_fp32_scales_us=round(median_us(lambda: op(x, packed, g, h, None)), 2),
                       torch_fp32_us=round(median_us(lambda: torch.nn.functional.linear(x, w)), 2))
        rows.append(row)
        print(f"{out}x{in_features}: packed (fp16 scales) {row['packed_fp16_scales_us']:.2f} us, (fp32 scales) "
              f"{row['packed_fp32_scales_us']:.2f} us, F.linear fp32 {row['torch_fp32_us']:.2f} us", flush=True)
    write_cpu_result("bench_cpu_call_overhead", __doc__.split("\n\n")[2].strip(), rows, args.out, args.tag,
                     cpu_kernel=rabit.cpu_kernel())

if __name__ == "__main__":
    main()
