"""Benchmark of the rabit CUDA kernels against cuBLAS fp16 (F.linear) measured in the same run.

    python benchmarks/bench_kernels.py [--out DIR] [--quick] [--gemv-only | --prefill-only]
        [--decode-kernels b1,i8,f16] [--prefill-kernels wgmma,mma]

Writes bench_kernels_<gpu>_<date>.json (into --out, else $OUT, else benchmarks/results/) and prints a table.

Method: every timed call reads weights from a pool of copies larger than 2 x 50 MB (more than the L2), so
that HBM, not L2, is measured; the calls over the pool are captured in one CUDA graph, replayed many
times, timed with CUDA events, and the median time per call is reported. GEMV bandwidth counts the
bytes that must move: packed bits + fp16 scales + x + y (rabit) or the fp16 weight + x + y (cuBLAS).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rabit  # noqa: E402
from rabit import reference as R  # noqa: E402
from timing import copy_bandwidth_gbps, device_tag, event_time_us, graph_time_us, write_result  # noqa: E402

DEV = "cuda"
POOL_BYTES = 160 << 20  # > 2 x 50 MB of L2
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (14336, 4096), (4096, 14336)]  # (out, in)
MS = [1, 2, 4, 8, 16, 128, 2048]
K = 2


def make_packed(out, in_features, n):
    """n independent packed layers (K=2, fp16 scales, the export format)."""
    layers = []
    for _ in range(n):
        w = torch.randn(out, in_features, device=DEV)
        g = (w.abs().mean(1) * torch.tensor([[1.0], [0.4]], device=DEV))
        h = torch.rand(K, in_features, device=DEV) + 0.5
        _, packed = rabit.residual_binarize(w, g, h)
        layers.append((packed, g.half(), h.half()))
        del w
    return layers


# the decode kernels RABIT_CUDA_DECODE can force, and the largest M each applies to (b1: M <= 2; int8 and fp16: the
# whole decode range, M <= 16)
DECODE_KERNELS = {"b1": 2, "i8": 16, "f16": 16}


# the prefill kernels RABIT_CUDA_PREFILL can force (M > 16): wgmma (sm_90a) and mma.sync (any GPU)
PREFILL_KERNELS = ("wgmma", "mma")
FORCE_ENV = ("RABIT_CUDA_DECODE", "RABIT_CUDA_PREFILL")  # set by kernel_env
KERNEL_ENV = FORCE_ENV + ("RABIT_CUDA_PREFILL_SPLITS",)  # must be unset at the start: they change the default


def kernel_env(name):
    """Force a decode or prefill kernel by name (None: the default dispatch). The variable is read at each launch,
    so a graph captured after this call holds that kernel."""
    for var in FORCE_ENV:
        os.environ.pop(var, None)
    if name is not None:
        os.environ["RABIT_CUDA_PREFILL" if name in PREFILL_KERNELS else "RABIT_CUDA_DECODE"] = name


def kernel_applies(name, m):
    return m > 16 if name in PREFILL_KERNELS else m <= DECODE_KERNELS[name]


def bench_linear(out, in_features, quick, ms, kernels=()):
    res = []
    packed_bytes = K * out * R.words_per_row(in_features) * 4
    scale_bytes = 2 * K * (out + in_features)
    dense_bytes = out * in_features * 2
    n_packed = max(2, -(-POOL_BYTES // (packed_bytes + scale_bytes)))
    n_dense = max(2, -(-POOL_BYTES // dense_bytes))
    packed_pool = make_packed(out, in_features, min(n_packed, 64))
    dense_pool = [torch.randn(out, in_features, device=DEV).half() * 0.02 for _ in range(n_dense)]
    for m in ms:
        x = torch.randn(m, in_features, device=DEV).half()
        p0, g0, h0 = packed_pool[0]
        # float64 reference: on the CPU where that is quick, else on the GPU
        on = (lambda t: t.cpu()) if m <= 64 else (lambda t: t)
        y64 = R.packed_linear(on(x), on(p0), on(g0), on(h0), compute_dtype=torch.float64)
        pool = packed_pool if m < 1024 else packed_pool[:2]
        dpool = dense_pool if m < 1024 else dense_pool[:2]
        calls, reps = (200, 30) if m < 1024 else (20, 20)

        def time_rabit(kernel):
            kernel_env(kernel)
            try:
                y = rabit.packed_linear(x, p0, g0, h0)  # correctness guard: never time a wrong kernel
                rel = ((y.to(y64.device).double() - y64).norm() / y64.norm()).item()
                if not rel < 1e-2:
                    raise RuntimeError(f"{out}x{in_features} M={m} kernel {kernel or 'default'}: rel err {rel}")
                t, sd = graph_time_us([lambda p=p, g=g, h=h: rabit.packed_linear(x, p, g, h) for p, g, h in pool],
                                      min_calls=calls, reps=reps)
            finally:
                kernel_env(None)
            return t, sd, rel

        t_r, sd_r, rel = time_rabit(None)
        forced = {}
        for kern in kernels:
            if kernel_applies(kern, m):
                t_k, sd_k, rel_k = time_rabit(kern)
                forced[kern] = dict(us=round(t_k, 3), sd_us=round(sd_k, 3), rel_err_vs_fp64=rel_k)
        t_c, sd_c = graph_time_us([lambda w=w: F.linear(x, w) for w in dpool], min_calls=calls, reps=reps)
        io = 2 * m * (in_features + out)
        row = dict(out=out, in_=in_features, M=m, K=K, rabit_us=round(t_r, 3), rabit_sd_us=round(sd_r, 3),
                   cublas_fp16_us=round(t_c, 3), cublas_sd_us=round(sd_c, 3), speedup=round(t_c / t_r, 3),
                   rabit_bytes=packed_bytes + scale_bytes + io, cublas_bytes=dense_bytes + io,
                   rabit_GBps=round((packed_bytes + scale_bytes + io) / (t_r * 1e-6) / 1e9, 1),
                   cublas_GBps=round((dense_bytes + io) / (t_c * 1e-6) / 1e9, 1),
                   path="decode" if m <= 16 else "prefill", rel_err_vs_fp64=rel,
                   pool=(len(pool), len(dpool)))
        if forced:
            row["kernels_forced"] = forced
        if m >= 1024:
            row["rabit_TFLOPs"] = round(2 * m * out * in_features / (t_r * 1e-6) / 1e12, 1)
            row["cublas_TFLOPs"] = round(2 * m * out * in_features / (t_c * 1e-6) / 1e12, 1)
        res.append(row)
        print(f"  {out}x{in_features} M={m}: rabit {t_r:.2f} us, cuBLAS fp16 {t_c:.2f} us, x{t_c / t_r:.2f}"
              + (f", rel err {rel:.2e}" if rel is not None else "")
              + "".join(f", {k} {v['us']:.2f} us" for k, v in forced.items()), flush=True)
    del packed_pool, dense_pool
    torch.cuda.empty_cache()
    return res


def bench_ops(out, in_features):
    """The QAT forward and backward ops alone (bandwidth-bound), latent W float32, Ŵ / grad fp16."""
    w = torch.randn(out, in_features, device=DEV)
    g = (w.abs().mean(1) * torch.tensor([[1.0], [0.4]], device=DEV))
    h = torch.rand(K, in_features, device=DEV) + 0.5
    _, packed = rabit.residual_binarize(w, g, h)
    grad = torch.randn(out, in_features, device=DEV).half()
    t_f = event_time_us(lambda: rabit.residual_binarize(w, g, h, torch.float16))
    t_b = event_time_us(lambda: rabit.residual_binarize_backward(grad, w, g, h, packed))
    n = out * in_features
    f_bytes = n * 4 + n * 2 + K * n // 8
    b_bytes = n * 2 + n * 4 + K * n // 8
    return dict(out=out, in_=in_features, fwd_us=round(t_f, 2), fwd_GBps=round(f_bytes / (t_f * 1e-6) / 1e9, 1),
                bwd_us=round(t_b, 2), bwd_GBps=round(b_bytes / (t_b * 1e-6) / 1e9, 1),
                note="fwd: W fp32 -> Ŵ fp16 + bits, incl. the NaN-flag readback (one sync); bwd: G fp16 -> dW fp32, dg, dh")


def bench_qat(out, in_features, tokens):
    x = torch.randn(tokens, in_features, device=DEV).half()
    dy = torch.randn(tokens, out, device=DEV).half()

    w = torch.randn(out, in_features, device=DEV).mul_(0.02).requires_grad_()
    g = (w.detach().abs().mean(1) * torch.tensor([[1.0], [0.4]], device=DEV)).requires_grad_()
    h = (torch.rand(K, in_features, device=DEV) + 0.5).requires_grad_()

    def ours():  # as the trainer runs it: no NaN check (a device sync) per layer (rabit/train.py)
        what, _ = rabit.residual_binarize(w, g, h, torch.float16, check_finite=False)
        F.linear(x, what).backward(dy)

    def plain():  # the same math from plain PyTorch ops (rabit.reference) and autograd
        signs = R.residual_signs(w.detach(), g.detach(), h.detach())
        what = R.dequantize(signs, g, h) + (w - w.detach())
        F.linear(x, what.half()).backward(dy)

    w16 = (torch.randn(out, in_features, device=DEV) * 0.02).half().requires_grad_()

    def dense():
        F.linear(x, w16).backward(dy)

    res = {}
    for name, fn in (("rabit", ours), ("fp16_linear", dense), ("plain_pytorch", plain)):
        fn()
        torch.cuda.synchronize()
        for p in (w, g, h, w16):
            p.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        for p in (w, g, h, w16):
            p.grad = None

        def step(fn=fn):
            fn()
            for p in (w, g, h, w16):
                p.grad = None

        t = event_time_us(step, reps=10 if name != "plain_pytorch" else 5, warmup=2)
        res[name] = dict(us=round(t, 1), peak_extra_MB=round(peak / 2**20, 1))
    res["ratio_vs_fp16_linear"] = round(res["rabit"]["us"] / res["fp16_linear"]["us"], 3)
    res["speedup_vs_plain_pytorch"] = round(res["plain_pytorch"]["us"] / res["rabit"]["us"], 3)
    res.update(out=out, in_=in_features, tokens=tokens, K=K,
               note="latent W fp32, Ŵ fp16; step = residual_binarize + F.linear fwd + backward (cuBLAS dX, dŴ + "
                    "rabit backward); peak_extra = peak allocated during the step above the resident tensors "
                    "(grads included)")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gemv-only", action="store_true", help="only packed_linear at M <= 16 (no prefill, no QAT)")
    ap.add_argument("--prefill-only", action="store_true", help="only packed_linear at M > 16 (no decode, no QAT)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--decode-kernels", default="",
                    help="comma-separated decode kernels to time as well, each forced where it applies: "
                         + ", ".join(f"{k} (M <= {v})" for k, v in DECODE_KERNELS.items()))
    ap.add_argument("--prefill-kernels", default="",
                    help=f"comma-separated prefill kernels to time as well (M > 16): {', '.join(PREFILL_KERNELS)}")
    args = ap.parse_args()
    kernels = [k for k in args.decode_kernels.split(",") if k]
    if any(k not in DECODE_KERNELS for k in kernels):
        ap.error(f"--decode-kernels: expected names from {sorted(DECODE_KERNELS)}, got {args.decode_kernels!r}")
    prefill = [k for k in args.prefill_kernels.split(",") if k]
    if any(k not in PREFILL_KERNELS for k in prefill):
        ap.error(f"--prefill-kernels: expected names from {list(PREFILL_KERNELS)}, got {args.prefill_kernels!r}")
    if args.gemv_only and args.prefill_only:
        ap.error("--gemv-only and --prefill-only exclude each other")
    if any(v in os.environ for v in KERNEL_ENV):
        ap.error(f"unset {' and '.join(KERNEL_ENV)}: the default dispatch is the measured one "
                 "(--decode-kernels / --prefill-kernels time others)")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True  # cuBLAS default
    prop = torch.cuda.get_device_properties(0)
    info = dict(device=prop.name, sms=prop.multi_processor_count, l2_MB=getattr(prop, "L2_cache_size", 0) / 2**20,
                torch=torch.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                K=K, scales="float16", x="float16", method=__doc__.split("Method: ")[1].strip(),
                decode_kernel="default dispatch: 1-bit MMA for M = 1 and in > 7680, fp16 MMA for M >= 5, else int8 MMA "
                              "(kernels_forced: each forced with RABIT_CUDA_DECODE where it applies)",
                prefill_kernel="default dispatch: wgmma on sm_90a builds and compute capability 9.0, else mma.sync "
                               "(kernels_forced: each forced with RABIT_CUDA_PREFILL for M > 16)")
    print(f"{info['device']}, torch {info['torch']}, CUDA {info['cuda']}", flush=True)
    bw = copy_bandwidth_gbps(DEV)
    info["copy_GBps"] = round(bw, 1)
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)
    shapes = SHAPES if not args.quick else SHAPES[:2]
    linear = []
    ms = MS if not args.quick else [1, 8, 2048]
    if args.gemv_only:
        ms = [m for m in ms if m <= 16]
    if args.prefill_only:
        ms = [m for m in ms if m > 16]
    for out, in_features in shapes:
        linear += bench_linear(out, in_features, args.quick, ms, kernels=kernels + prefill)
    for r in linear:
        if r["M"] == 1:
            r["rabit_pct_copy_bw"] = round(100 * r["rabit_GBps"] / bw, 1)
            r["cublas_pct_copy_bw"] = round(100 * r["cublas_GBps"] / bw, 1)
    only = args.gemv_only or args.prefill_only
    ops = [] if only else [bench_ops(4096, 4096), bench_ops(11008, 4096)]
    qat = [] if only else [bench_qat(4096, 4096, 2048)] + ([] if args.quick else [bench_qat(11008, 4096, 2048)])
    result = dict(info=info, packed_linear=linear, qat_ops=ops, qat_step=qat)

    gpu = device_tag(prop.name)
    tag = f"_{args.tag}" if args.tag else ""
    write_result(result, args.out, f"bench_kernels_{gpu}_{datetime.date.today().isoformat()}{tag}.json")

    print(f"{'shape (out x in)':>18} {'M':>5} {'rabit us':>9} {'cuBLAS us':>10} {'speedup':>8} {'%copyBW':>8}")
    for r in linear:
        pct = f"{r.get('rabit_pct_copy_bw', ''):>8}"
        print(f"{r['out']:>8} x {r['in_']:<7} {r['M']:>5} {r['rabit_us']:>9.2f} {r['cublas_fp16_us']:>10.2f} "
              f"{r['speedup']:>8.2f} {pct}")
    for o in ops:
        print(f"ops {o['out']}x{o['in_']}: fwd {o['fwd_us']} us ({o['fwd_GBps']} GB/s), "
              f"bwd {o['bwd_us']} us ({o['bwd_GBps']} GB/s)")
    for q in qat:
        print(f"QAT step {q['out']}x{q['in_']} T={q['tokens']}: rabit {q['rabit']['us']} us "
              f"(+{q['rabit']['peak_extra_MB']} MB), fp16 Linear {q['fp16_linear']['us']} us "
              f"(+{q['fp16_linear']['peak_extra_MB']} MB), plain PyTorch {q['plain_pytorch']['us']} us; "
              f"ratio {q['ratio_vs_fp16_linear']}, vs plain x{q['speedup_vs_plain_pytorch']}")


if __name__ == "__main__":
    main()
