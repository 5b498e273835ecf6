"""gemlite (mobiusml's Triton low-bit kernels) vs rabit.packed_linear vs cuBLAS fp16 F.linear at decode batches.

    PYTHONPATH=/tmp/site python benchmarks/bench_gemlite.py [--out DIR] [--shapes 4096x4096,...] [--ms 1,2,4]
                                      [--quick] [--group-size 128|in] [--autotune fast] [--jobs 12]

Writes bench_gemlite_<gpu>_<date>.json (into --out, else $OUT, else benchmarks/results/) after every shape, so
a run cut short keeps what it measured, and prints a table.

Method: as bench_kernels.py. Every timed call reads its weights from a pool of copies larger than the L2
(POOL_BYTES), so HBM is measured; the calls over the pool are captured in one CUDA graph and the median time
per call is reported (timing.graph_time_us). Where a capture fails, CUDA events around an eager loop over the
pool are used instead (launch overhead included); each entry records its "timing".
gemlite: GemLiteLinearTriton(W_nbits 1 or 2, group_size, fp16 in/out).pack(W_q uint8, scales fp16, zeros fp16),
HQQ's format W = (W_q - zeros) * scales with random values (speed only), checked at every (shape, M) against
x @ W_deq.T. gemlite's own dispatch picks the kernel (GEMV_REVSPLITK for M <= 4, GEMM_SPLITK above) and its
default "fast" Triton autotune tunes it; to save time only, the autotuner measures each config for a shorter
window (TUNE_MS), and --jobs processes compile all configs beforehand into Triton's disk cache.
Bytes that must move: packed bits + scales (+ zeros) + x + y; fp16 weight + x + y for cuBLAS.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rabit  # noqa: E402
from rabit import reference as R  # noqa: E402
from bench_kernels import K, POOL_BYTES, SHAPES, make_packed  # noqa: E402
from timing import copy_bandwidth_gbps, device_tag, event_time_us, graph_time_us, write_result  # noqa: E402

try:
    import triton
    import gemlite
    from gemlite import DType
    GEMLITE_ERR = None
except Exception as e:  # a missing or broken gemlite must not cost the cuBLAS / rabit columns
    gemlite, GEMLITE_ERR = None, repr(e)

DEV = "cuda"
MS = [1, 2, 4, 8, 16]
NBITS = (1, 2)
TUNE_MS = (5, 20)  # Triton autotuner's warm-up / measure window per config (ms); Triton's default is (25, 100)
METHODS = ("cublas_fp16", "rabit_k2", "gemlite_1bit", "gemlite_2bit")


def n_copies(nbytes, cap=64):
    return min(max(2, -(-POOL_BYTES // nbytes)), cap)


def setup_gemlite(mode):
    """gemlite's autotune mode for all its kernels, then the shorter measure window for each Triton autotuner."""
    gemlite.set_autotune(mode)  # reloads gemlite's kernel modules: new Autotuner objects, patched below
    from triton.runtime.autotuner import Autotuner
    from triton.testing import do_bench

    def bench(fn, quantiles):
        return do_bench(fn, warmup=TUNE_MS[0], rep=TUNE_MS[1], quantiles=quantiles)

    for name, mod in list(sys.modules.items()):
        if name.startswith("gemlite.triton_kernels.") and mod is not None:
            for obj in vars(mod).values():
                if isinstance(obj, Autotuner):
                    obj.do_bench = bench  # shadows Autotuner's cached_property of that name


def make_gemlite(out, in_features, nbits, g, n):
    """n packed gemlite layers (random W_q, scales, zeros) and layer 0's dequantized weight in float32."""
    layers, w_deq = [], None
    for i in range(n):
        wq = torch.randint(0, 2**nbits, (out, in_features), dtype=torch.uint8, device=DEV)
        s = (torch.rand(out, in_features // g, device=DEV) * 0.01 + 0.005).half()
        z = (torch.rand(out, in_features // g, device=DEV) + (2**nbits - 2) / 2).half()  # about mid-range
        layer = gemlite.GemLiteLinearTriton(nbits, group_size=g, in_features=in_features, out_features=out,
                                            input_dtype=DType.FP16, output_dtype=DType.FP16)
        layers.append(layer.pack(wq, s.clone(), z.clone(), bias=None))  # clones: no storage shared in a pool
        if i == 0:
            w_deq = (wq.float() - z.float().repeat_interleave(g, 1)) * s.float().repeat_interleave(g, 1)
    return layers, w_deq


def prewarm(out, in_features, nbits, g, ms, mode):
    """Child process: one layer run at every M, so every autotune config gets compiled into Triton's disk cache."""
    try:
        setup_gemlite(mode)
        layer = make_gemlite(out, in_features, nbits, g, 1)[0][0]
        for m in ms:
            layer(torch.randn(m, in_features, device=DEV, dtype=torch.float16))
        torch.cuda.synchronize()
    except Exception as e:
        return f"{out}x{in_features} W{nbits}: {e!r}"[:300]


def entry(fns, nbytes, bw, t_ref=None, **extra):
    """Time the calls of one pool: one CUDA graph over it, else CUDA events around an eager loop over it."""
    try:
        t, sd = graph_time_us(fns)
        sd, how = round(sd, 3), "cuda_graph"
    except Exception as e:
        torch.cuda.synchronize()
        t, sd = event_time_us(lambda: [f() for f in fns], reps=10, warmup=1) / len(fns), None
        how = f"events_eager (graph capture failed: {type(e).__name__}: {str(e)[:150]})"
    gbps = nbytes / (t * 1e-6) / 1e9
    return dict(us=round(t, 3), sd_us=sd, timing=how, bytes=nbytes, GBps=round(gbps, 1),
                pct_copy_bw=round(100 * gbps / bw, 1),
                speedup_vs_cublas=None if t_ref is None else round(t_ref / t, 3), **extra)


def rel_err(y, x, w):
    ref = x.float() @ w.T
    return ((y.float() - ref).norm() / ref.norm()).item()


def bench_shape(out, in_features, ms, bw, group):
    rows = [dict(out=out, in_=in_features, M=m) for m in ms]
    dense_bytes = out * in_features * 2
    packed_bytes = K * out * R.words_per_row(in_features) * 4 + 2 * K * (out + in_features)
    dense_pool = [torch.randn(out, in_features, device=DEV).half() * 0.02 for _ in range(n_copies(dense_bytes, 999))]
    packed_pool = make_packed(out, in_features, n_copies(packed_bytes))
    p0, g0, h0 = packed_pool[0]
    w_rabit = R.dequantize(R.unpack_signs(p0, in_features), g0, h0)
    for r in rows:
        m, io = r["M"], 2 * r["M"] * (in_features + out)
        x = torch.randn(m, in_features, device=DEV).half()
        r["cublas_fp16"] = entry([lambda w=w: F.linear(x, w) for w in dense_pool], dense_bytes + io, bw,
                                 pool=len(dense_pool))
        r["rabit_k2"] = entry([lambda p=p, g=g, h=h: rabit.packed_linear(x, p, g, h) for p, g, h in packed_pool],
                              packed_bytes + io, bw, r["cublas_fp16"]["us"], pool=len(packed_pool),
                              rel_err=rel_err(rabit.packed_linear(x, p0, g0, h0), x, w_rabit))
    del dense_pool, packed_pool, w_rabit
    torch.cuda.empty_cache()

    for nbits in NBITS:
        key = f"gemlite_{nbits}bit"
        try:  # one unsupported config must not stop the run: its error goes into the JSON instead
            if gemlite is None:
                raise RuntimeError(f"import gemlite failed: {GEMLITE_ERR}")
            pool, w_deq = make_gemlite(out, in_features, nbits, group,
                                       n_copies(out * in_features * nbits // 8 + 4 * out * (in_features // group)))
            w_bytes = sum(t.numel() * t.element_size() for t in (pool[0].W_q, pool[0].scales, pool[0].zeros))
        except Exception as e:
            rows = [dict(r, **{key: dict(error=repr(e)[:500])}) for r in rows]
            continue
        for r in rows:
            m = r["M"]
            try:
                x = torch.randn(m, in_features, device=DEV).half()
                err = rel_err(pool[0](x), x, w_deq)  # also the autotune call, outside any capture
                r[key] = entry([lambda lay=lay: lay(x) for lay in pool], w_bytes + 2 * m * (in_features + out), bw,
                               r["cublas_fp16"]["us"], pool=len(pool), rel_err=err,
                               kernel=gemlite.core.get_matmul_type(m, nbits))
            except Exception as e:
                torch.cuda.synchronize()
                r[key] = dict(error=repr(e)[:500])
        del pool, w_deq
        torch.cuda.empty_cache()

    for r in rows:
        print(f"  {out}x{in_features} M={r['M']}: cuBLAS {r['cublas_fp16']['us']:.2f} us, " + ", ".join(
            f"{k} {r[k]['us']:.2f} us (x{r[k]['speedup_vs_cublas']:.2f}, rel err {r[k]['rel_err']:.1e})"
            if "us" in r[k] else f"{k} ERROR {r[k]['error'][:100]}" for k in METHODS[1:]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=None, help="subset, e.g. 4096x4096,11008x4096 (out x in)")
    ap.add_argument("--ms", default=None, help="batch sizes, e.g. 1,2,4,8,16")
    ap.add_argument("--quick", action="store_true", help="the first two shapes at M = 1, 4")
    ap.add_argument("--group-size", default="128", help="gemlite group size: an int dividing in, or 'in'")
    ap.add_argument("--autotune", default="fast", choices=["fast", "default", "max"], help="gemlite's mode")
    ap.add_argument("--jobs", type=int, default=12, help="processes compiling gemlite's kernels ahead (0: none)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    if args.quick:
        shapes, ms = SHAPES[:2], [1, 4]
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True  # cuBLAS default
    t0 = time.time()
    prop = torch.cuda.get_device_properties(0)
    print(f"{prop.name}, torch {torch.__version__}, gemlite {getattr(gemlite, '__version__', GEMLITE_ERR)}")
    info = dict(device=prop.name, sms=prop.multi_processor_count, l2_MB=getattr(prop, "L2_cache_size", 0) / 2**20,
                torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__ if gemlite else None,
                gemlite=getattr(gemlite, "__version__", None), gemlite_import_error=GEMLITE_ERR,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                rabit=dict(K=K, scales="float16", x="float16"), method=__doc__.split("Method: ")[1].strip())
    gs = {o_i: o_i[1] if args.group_size == "in" else int(args.group_size) for o_i in shapes}
    if gemlite is not None:
        setup_gemlite(args.autotune)
        info["gemlite_config"] = dict(
            W_nbits=list(NBITS), group_size=args.group_size, scales="float16", zeros="float16",
            format="HQQ: W = (W_q - zeros) * scales, GemLiteLinearTriton.pack defaults (fma_mode, bias None)",
            packing_bitwidth=gemlite.GemLiteLinearTriton.PACKING_BITWIDTH, input_dtype="FP16", output_dtype="FP16",
            acc_dtype=gemlite.core.GEMLITE_ACC_DTYPE[DType.FP16].name, autotune=args.autotune,
            autotune_bench_ms=dict(warmup=TUNE_MS[0], rep=TUNE_MS[1]),
            kernel_by_M={m: gemlite.core.get_matmul_type(m, 2) for m in ms})
        tasks = [(o, i, nb, gs[(o, i)], ms, args.autotune) for o, i in shapes for nb in NBITS]
        if args.jobs > 0:  # the with-block waits for every child to exit, before anything is timed
            try:
                with ProcessPoolExecutor(min(args.jobs, len(tasks)), multiprocessing.get_context("spawn")) as ex:
                    errs = [e for e in ex.map(prewarm, *zip(*tasks)) if e]
            except Exception as e:
                errs = [f"prewarm pool: {e!r}"]
            info["prewarm"] = dict(jobs=args.jobs, seconds=round(time.time() - t0, 1), errors=errs)
            print(f"gemlite kernels compiled ahead in {time.time() - t0:.0f} s; errors: {errs}", flush=True)
    bw = copy_bandwidth_gbps(DEV)
    info["copy_GBps"] = round(bw, 1)
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)

    gpu = device_tag(prop.name)
    name = f"bench_gemlite_{gpu}_{datetime.date.today().isoformat()}.json"
    rows = []
    for out, in_features in shapes:
        rows += bench_shape(out, in_features, ms, bw, gs[(out, in_features)])
        info["seconds"] = round(time.time() - t0, 1)
        path = write_result(dict(info=info, rows=rows), args.out, name, quiet=True)
    print(f"\nwrote {path} ({time.time() - t0:.0f} s)\n")

    print(f"{'shape (out x in)':>18} {'M':>3} {'cuBLAS us':>10}" + "".join(f"{k:>24}" for k in METHODS[1:])
          + "\n(each: us, speed-up vs cuBLAS, % of copy bandwidth for the bytes that must move)")
    for r in rows:
        cells = [f"{r[k]['us']:.2f} x{r[k]['speedup_vs_cublas']:.2f} {r[k]['pct_copy_bw']:.0f}%" if "us" in r[k]
                 else "error" for k in METHODS[1:]]
        print(f"{r['out']:>8} x {r['in_']:<7} {r['M']:>3} {r['cublas_fp16']['us']:>10.2f}"
              + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
