"""CPU packed GEMV/GEMM against torch F.linear (fp32 and bf16), measured in the same run.

    rabit bench [--threads N] [--m 1 4 128] [--out benchmarks/results]   (or python -m rabit.bench)

Writes benchmarks/results/bench_cpu_gemv_<host>_<date>.json with every timing (median of many
calls, weights cycled through a pool larger than the last-level cache so memory is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import rabit

from ._cli_args import positive_int
from .data import make_output_dir

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TABLE_KERNELS = tuple(k for k in rabit.CPU_KERNELS if k not in ("auto", "gemm"))  # narrowest first


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# the instruction sets the CPU kernels dispatch on (kernels/cpu: AVX2, AVX-512F) and those they could use next
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The SIMD_FLAGS this CPU has (empty where cpuinfo cannot be read): two VMs of one name can differ."""
    try:
        for line in open(cpuinfo):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SIMD_FLAGS if f in have]
    except OSError:
        pass
    return []


def median_time(fn, pool: int, reps: int) -> float:
    for i in range(pool):  # warm-up, one pass over the pool
        fn(i)
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        fn(r % pool)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_shape(out: int, in_features: int, m: int, reps: int, pool_bytes: int) -> dict:
    k = 2
    fp32_bytes = out * in_features * 4
    pool = max(2, min(8, pool_bytes // fp32_bytes + 1))
    ws = [torch.randn(out, in_features) * 0.02 for _ in range(pool)]
    ws_bf16 = [w.bfloat16() for w in ws]
    g = torch.rand(k, out) * 0.01 + 0.01
    h = torch.rand(k, in_features) + 0.5
    packed = [rabit.residual_binarize(w, g, h)[1] for w in ws]
    x = torch.randn(m, in_features)
    xb = x.bfloat16()
    res = {"out": out, "in": in_features, "m": m, "pool": pool}
    with torch.inference_mode():
        res["torch_fp32_s"] = median_time(lambda i: F.linear(x, ws[i]), pool, reps)
        res["torch_bf16_s"] = median_time(lambda i: F.linear(xb, ws_bf16[i]), pool, reps)
        rabit.set_cpu_kernel("auto")  # so that cpu_kernel() names the table kernel auto runs
        table = rabit.cpu_kernel()
        # every table kernel up to the one auto runs (the SIMD ones this CPU has), and the GEMM
        kernels = TABLE_KERNELS[: TABLE_KERNELS.index(table) + 1] + ("gemm",)
        for kernel in kernels:
            if kernel == "ref" and table != "ref" and (out * in_features > 50_000_000 or m >= rabit.CPU_GEMM_MIN_ROWS):
                continue  # the scalar oracle is slow; it is measured at the smaller shapes and batches
            rabit.set_cpu_kernel(kernel)
            res[f"rabit_{kernel}_s"] = median_time(lambda i: rabit.packed_linear(x, packed[i], g, h), pool, reps)
        rabit.set_cpu_kernel("auto")
    # what rabit.packed_linear runs by default (rabit.set_cpu_kernel("auto"))
    res["rabit_default"] = "gemm" if m >= rabit.CPU_GEMM_MIN_ROWS else table
    best = res[f"rabit_{res['rabit_default']}_s"]
    res["speedup_vs_fp32"] = res["torch_fp32_s"] / best
    res["speedup_vs_bf16"] = res["torch_bf16_s"] / best
    packed_bytes = k * out * ((in_features + 31) // 32) * 4 + 4 * k * (out + in_features)
    res["rabit_GBps"] = packed_bytes / best / 1e9
    res["torch_fp32_GBps"] = fp32_bytes / res["torch_fp32_s"] / 1e9
    return res


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="CPU threads (default: all)")
    ap.add_argument("--reps", type=positive_int, default=30, help="timed calls per case (median reported; default %(default)s)")
    ap.add_argument("--m", type=positive_int, nargs="+", default=[1, 4, 128],
                    help="rows of x, M (default 1 4 128: decoding, a small batch, a prefill)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON (default benchmarks/results)")


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out = make_output_dir(args.out)  # before the minutes of timing
    rows = [bench_shape(o, i, m, args.reps, 256 << 20) for (o, i) in SHAPES for m in args.m]
    meta = {"device": cpu_name(), "cpu_flags": cpu_flags(), "threads": args.threads, "cpu_kernel": rabit.cpu_kernel(),
            "torch": torch.__version__, "rabit": rabit.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
            "baseline": "torch F.linear fp32 / bf16, same run, same weights pool", "k": 2}
    path = out / f"bench_cpu_gemv_{platform.node() or 'host'}_{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if getattr(args, "json", False):
        return {"meta": meta, "rows": rows, "json": str(path)}
    print(f"{'shape':>12} {'M':>3} {'fp32 ms':>9} {'bf16 ms':>9} {'rabit ms':>9} {'x fp32':>7} {'x bf16':>7}")
    for r in rows:
        best = r[f"rabit_{r['rabit_default']}_s"]
        print(f"{r['out']:>6}x{r['in']:<5} {r['m']:>3} {1e3 * r['torch_fp32_s']:9.3f} {1e3 * r['torch_bf16_s']:9.3f} "
              f"{1e3 * best:9.3f} {r['speedup_vs_fp32']:7.2f} {r['speedup_vs_bf16']:7.2f}")
    print(f"wrote {path}")
    return {"meta": meta, "rows": rows, "json": str(path)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
