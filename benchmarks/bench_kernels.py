"""Benchmark of the rabit CUDA kernels against cuBLAS fp16 (F.linear) measured in the same run.

    python benchmarks/bench_kernels.py [--out DIR] [--quick] [--gemv-only | --prefill-only | --qat-only | --group-only]
        [--decode-kernels b1,b1p,i8,f16,simt] [--ms 1,2] [--prefill-kernels wgmma,mma] [--shapes llama|narrow]

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
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rabit  # noqa: E402
from rabit import reference as R  # noqa: E402
from rabit import _ops as _qat_ops  # noqa: E402  (the two-stream threshold of qat_linear's backward)
from timing import (copy_bandwidth_gbps, device_tag, event_time_us, graph_time_us,  # noqa: E402
                    interleaved_graph_times_us, write_result)

DEV = "cuda"
POOL_BYTES = 160 << 20  # > 2 x 50 MB of L2
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (14336, 4096), (4096, 14336)]  # (out, in)
# --shapes narrow: SmolLM2-135M's layers (576 wide, MLP 1536, k/v 192) and 2048-wide ones (Llama-3.2-1B's)
NARROW_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (2048, 2048), (8192, 2048), (2048, 8192)]
# --shapes tall: 4096-wide layers from 4096 to 11008 rows (256 to 688 tiles of 16 rows), where the default decode kernel at
# M = 1 changes to the persistent 1-bit one (decode_b1p_default), and layer groups around that point
TALL_SHAPES = [(o, 4096) for o in (4096, 5120, 6144, 7168, 8192, 9216, 10240, 11008)]
MS = [1, 2, 4, 8, 16, 128, 2048]
K = 2
QAT_ROUNDS = 30  # interleaved graph replays of the QAT-step variants (timing.interleaved_graph_times_us)


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


# the decode kernels RABIT_CUDA_DECODE can force, and the largest M each applies to (b1: M <= 2; b1p: M = 1, where its
# fragments fit in shared memory, else b1; int8 and fp16: the whole decode range, M <= 16; simt: M <= 4 and
# in <= SIMT_MAX_IN)
DECODE_KERNELS = {"b1": 2, "b1p": 1, "i8": 16, "f16": 16, "simt": 4}
SIMT_MAX_IN = 2048  # kSimtMaxIn in kernels/cuda/rabit_cuda.cuh


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


def kernel_applies(name, m, in_features):
    if name in PREFILL_KERNELS:
        return m > 16
    return m <= DECODE_KERNELS[name] and (name != "simt" or in_features <= SIMT_MAX_IN)


def time_int8_class(x, pool, y64):
    """rabit.packed_linear_i8 (the int8 activation class, one row) on the pool's layers, after a guard against its
    reference (rabit.reference.packed_linear_i8_cuda: within the kernel's float32 sums and fp16 rounding)."""
    p0, g0, h0 = pool[0]
    y = rabit.packed_linear_i8(x, p0, g0, h0).cpu().double()
    ref = R.packed_linear_i8_cuda(x.cpu(), p0.cpu(), g0.cpu(), h0.cpu())
    dev = ((y - ref).norm() / ref.norm()).item()
    if not dev < 2e-3:
        raise RuntimeError(f"packed_linear_i8 {tuple(p0.shape)}: {dev} away from its class's reference")
    t, sd = graph_time_us([lambda p=p, g=g, h=h: rabit.packed_linear_i8(x, p, g, h) for p, g, h in pool],
                          min_calls=200, reps=30)
    return dict(us=round(t, 3), sd_us=round(sd, 3), rel_err_vs_fp64=((y - y64).norm() / y64.norm()).item(),
                rel_dev_vs_class_reference=dev)


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
            if kernel_applies(kern, m, in_features):
                t_k, sd_k, rel_k = time_rabit(kern)
                forced[kern] = dict(us=round(t_k, 3), sd_us=round(sd_k, 3), rel_err_vs_fp64=rel_k)
        int8 = time_int8_class(x, pool, y64) if m == 1 else None
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
        if int8:
            row["int8_activations"] = int8
        if m >= 1024:
            row["rabit_TFLOPs"] = round(2 * m * out * in_features / (t_r * 1e-6) / 1e12, 1)
            row["cublas_TFLOPs"] = round(2 * m * out * in_features / (t_c * 1e-6) / 1e12, 1)
        res.append(row)
        print(f"  {out}x{in_features} M={m}: rabit {t_r:.2f} us, cuBLAS fp16 {t_c:.2f} us, x{t_c / t_r:.2f}"
              + (f", rel err {rel:.2e}" if rel is not None else "")
              + "".join(f", {k} {v['us']:.2f} us" for k, v in forced.items())
              + (f"; int8 activations {int8['us']:.2f} us (x{t_c / int8['us']:.2f}, rel err "
                 f"{int8['rel_err_vs_fp64']:.2e})" if int8 else ""), flush=True)
    del packed_pool, dense_pool
    torch.cuda.empty_cache()
    return res


# layers that read the same x, as a decoder's q/k/v and gate/up (name: [(out, in)] per layer)
GROUPS = {"llama2-7b qkv": [(4096, 4096)] * 3, "llama2-7b gate/up": [(11008, 4096)] * 2,
          "llama3-8b qkv": [(4096, 4096), (1024, 4096), (1024, 4096)], "llama3-8b gate/up": [(14336, 4096)] * 2}
NARROW_GROUPS = {"smollm2-135m qkv": [(576, 576), (192, 576), (192, 576)], "smollm2-135m gate/up": [(1536, 576)] * 2}
TALL_GROUPS = {"2 x 2560x4096": [(2560, 4096)] * 2, "2 x 4096x4096": [(4096, 4096)] * 2,
               "2 x 5120x4096": [(5120, 4096)] * 2}
GROUP_MS = [1, 2, 4, 8, 16]


def bench_group(name, layers, ms, kernels=()):
    """rabit.packed_linear_group (one launch of the decode kernels for all layers) against packed_linear per layer,
    and cuBLAS fp16 per layer and on the layers' weights stacked into one matrix, all in the same run; the group
    also with each of `kernels` forced where it applies."""
    in_features = layers[0][1]
    set_bytes = sum(K * o * R.words_per_row(i) * 4 + 2 * K * (o + i) for o, i in layers)
    dense_set = sum(o * i * 2 for o, i in layers)
    packed_pool = [[make_packed(o, i, 1)[0] for o, i in layers] for _ in range(min(64, -(-POOL_BYTES // set_bytes)))]
    dense_pool = [[torch.randn(o, i, device=DEV).half() * 0.02 for o, i in layers]
                  for _ in range(max(2, -(-POOL_BYTES // dense_set)))]
    stacked_pool = [torch.cat(ws) for ws in dense_pool]
    group_args = [[list(t) for t in zip(*ls)] for ls in packed_pool]  # ([packed], [g], [h]) of each set
    res = []
    for m in ms:
        x = torch.randn(m, in_features, device=DEV).half()
        for ls, args in list(zip(packed_pool, group_args))[:2]:  # correctness guard: bit for bit per layer
            ys = rabit.packed_linear_group(x, *args)
            if not all(torch.equal(y, rabit.packed_linear(x, *lay)) for y, lay in zip(ys, ls)):
                raise RuntimeError(f"{name} M={m}: packed_linear_group differs from packed_linear")
        calls = dict(min_calls=200, reps=30)
        t_g, _ = graph_time_us([lambda args=args: rabit.packed_linear_group(x, *args) for args in group_args],
                               **calls)
        t_s, _ = graph_time_us([lambda ls=ls: [rabit.packed_linear(x, *lay) for lay in ls] for ls in packed_pool],
                               **calls)
        t_c, _ = graph_time_us([lambda ws=ws: [F.linear(x, w) for w in ws] for ws in dense_pool], **calls)
        t_cs, _ = graph_time_us([lambda w=w: F.linear(x, w) for w in stacked_pool], **calls)
        forced = {}
        for kern in kernels:
            if kern in DECODE_KERNELS and kernel_applies(kern, m, in_features):
                kernel_env(kern)
                try:
                    t_k, _ = graph_time_us([lambda args=args: rabit.packed_linear_group(x, *args)
                                            for args in group_args], **calls)
                finally:
                    kernel_env(None)
                forced[kern] = round(t_k, 3)
        t_i8 = None
        if m == 1:  # the int8 activation class: the group as one packed_linear_fused_i8 launch, each layer's own bits
            for ls, args in list(zip(packed_pool, group_args))[:2]:
                ys = rabit.packed_linear_fused_i8(x, *args)
                if not all(torch.equal(y, rabit.packed_linear_i8(x, *lay)) for y, lay in zip(ys, ls)):
                    raise RuntimeError(f"{name}: packed_linear_fused_i8 differs from packed_linear_i8")
            t_i8, _ = graph_time_us([lambda args=args: rabit.packed_linear_fused_i8(x, *args) for args in group_args],
                                    **calls)
        # *_per_layer_us: one call per layer, the time of all of them together
        row = dict(group=name, layers=[list(lay) for lay in layers], M=m, K=K, rabit_group_us=round(t_g, 3),
                   rabit_per_layer_us=round(t_s, 3), cublas_fp16_per_layer_us=round(t_c, 3),
                   cublas_fp16_stacked_us=round(t_cs, 3), group_gain=round(t_s / t_g, 3),
                   speedup_vs_cublas_per_layer=round(t_c / t_g, 3), speedup_vs_cublas_stacked=round(t_cs / t_g, 3),
                   pool=(len(packed_pool), len(dense_pool)))
        if forced:
            row["group_us_kernels_forced"] = forced
        if t_i8 is not None:
            row["int8_activations_group_us"] = round(t_i8, 3)
        res.append(row)
        print(f"  {name} M={m}: group {t_g:.2f} us, per layer {t_s:.2f} us (x{t_s / t_g:.2f}); cuBLAS fp16 per layer "
              f"{t_c:.2f} us (x{t_c / t_g:.2f}), stacked {t_cs:.2f} us (x{t_cs / t_g:.2f})"
              + "".join(f", {k} {v:.2f} us" for k, v in forced.items())
              + (f"; int8 activations {t_i8:.2f} us (x{t_c / t_i8:.2f} per layer, x{t_cs / t_i8:.2f} stacked)"
                 if t_i8 is not None else ""), flush=True)
    del packed_pool, dense_pool, stacked_pool
    torch.cuda.empty_cache()
    return res


def bench_ops(out, in_features):
    """The QAT forward and backward ops alone (bandwidth-bound), latent W float32, Ŵ / grad fp16."""
    w = torch.randn(out, in_features, device=DEV)
    g = (w.abs().mean(1) * torch.tensor([[1.0], [0.4]], device=DEV))
    h = torch.rand(K, in_features, device=DEV) + 0.5
    _, packed = rabit.residual_binarize(w, g, h)
    grad = torch.randn(out, in_features, device=DEV).half()
    t_f = event_time_us(lambda: rabit.residual_binarize(w, g, h, torch.float16))  # a sync: no graph
    # the others as CUDA graphs (GPU time, no launch overhead) cycling over 3 layers, > 2 x 50 MB of L2 at 4096²
    ws = [w] + [torch.randn_like(w) for _ in range(2)]
    grads = [grad] + [torch.randn_like(grad) for _ in range(2)]
    packs = [rabit.residual_binarize(x, g, h)[1] for x in ws]
    t_fn = graph_time_us([lambda x=x: rabit.residual_binarize(x, g, h, torch.float16, check_finite=False)
                          for x in ws], min_calls=24)[0]
    t_b = graph_time_us([lambda x=x, d=d, p=p: rabit.residual_binarize_backward(d, x, g, h, p)
                         for x, d, p in zip(ws, grads, packs)], min_calls=24)[0]
    # float32 g, h as RaBiTLinear holds them (fp16 scales would add two conversion kernels to every call)
    t_d = graph_time_us([lambda p=p: rabit.dequantize(p, g, h, torch.float16) for p in packs], min_calls=24)[0]
    grads32 = [d.float() for d in grads]
    t_s = graph_time_us([lambda d=d, p=p: rabit.scale_grads(d, g, h, p) for d, p in zip(grads32, packs)],
                        min_calls=24)[0]
    del grads32
    n = out * in_features
    f_bytes = n * 4 + n * 2 + K * n // 8
    b_bytes = n * 2 + n * 4 + K * n // 8
    d_bytes = n * 2 + K * n // 8
    s_bytes = n * 4 + K * n // 8
    gbps = lambda nbytes, t: round(nbytes / (t * 1e-6) / 1e9, 1)  # noqa: E731
    return dict(out=out, in_=in_features, fwd_us=round(t_f, 2), fwd_GBps=gbps(f_bytes, t_f),
                fwd_unchecked_us=round(t_fn, 2), fwd_unchecked_GBps=gbps(f_bytes, t_fn),
                bwd_us=round(t_b, 2), bwd_GBps=gbps(b_bytes, t_b),
                dequantize_us=round(t_d, 2), dequantize_GBps=gbps(d_bytes, t_d),
                scale_grads_us=round(t_s, 2), scale_grads_GBps=gbps(s_bytes, t_s),
                note="fwd: W fp32 -> Ŵ fp16 + bits, incl. the NaN-flag readback (one sync), one call between CUDA "
                     "events; fwd_unchecked: the same without the check (as the trainer runs it); bwd: G fp16 -> dW "
                     "fp32, dg, dh; dequantize: bits -> Ŵ fp16 (qat_linear's backward); scale_grads: G fp32 -> dg, dh (no "
                     "dW: qat_linear's backward with the identity STE and a float32 latent, whose dW is the float32 "
                     "dŴ from cuBLAS); g, h float32; these four timed as CUDA graphs of 24 calls cycling over 3 "
                     "layers' tensors")


def bench_qat(out, in_features, tokens, x_grad):
    """One layer's QAT step against an fp16 nn.Linear's forward + backward, and the same math in plain PyTorch.
    x_grad: whether x requires grad (a layer inside a network: backward also computes dX), else only the weight
    side of the backward runs. Each step is timed twice: eagerly (CPU launch overhead included, as a Python
    training loop sees one layer alone) and as a CUDA graph of forward + backward (GPU time only)."""
    x = torch.randn(tokens, in_features, device=DEV).half().requires_grad_(x_grad)
    dy = torch.randn(tokens, out, device=DEV).half()
    overlap_default = _qat_ops.OVERLAP_MIN_WEIGHTS

    w = torch.randn(out, in_features, device=DEV).mul_(0.02).requires_grad_()
    g = (w.detach().abs().mean(1) * torch.tensor([[1.0], [0.4]], device=DEV)).requires_grad_()
    h = (torch.rand(K, in_features, device=DEV) + 0.5).requires_grad_()
    w16 = (torch.randn(out, in_features, device=DEV) * 0.02).half().requires_grad_()
    params = (x, w, g, h, w16)

    def ours():  # what RaBiTLinear runs in training: one op, no NaN check (a device sync) per layer (rabit/train.py)
        return rabit.qat_linear(x, w, g, h, check_finite=False)

    def unfused():  # residual_binarize, then F.linear, whose autograd keeps Ŵ for dX
        what, _ = rabit.residual_binarize(w, g, h, torch.float16, check_finite=False)
        return F.linear(x, what)

    def plain():  # the same math from plain PyTorch ops (rabit.reference) and autograd
        signs = R.residual_signs(w.detach(), g.detach(), h.detach())
        what = R.dequantize(signs, g, h) + (w - w.detach())
        return F.linear(x, what.half())

    def dense():
        return F.linear(x, w16)

    # qat_linear's schedule per variant (module state, read while a step runs or is captured)
    flags = {"rabit_serial": (1 << 62, True), "rabit_fp16_dwhat": (overlap_default, False)}

    def make_step(name, fn):
        def step():
            _qat_ops.OVERLAP_MIN_WEIGHTS, _qat_ops.FLOAT32_DWHAT = flags.get(name, (overlap_default, True))
            fn().backward(dy)
            for p in params:
                p.grad = None
        return step

    res = {}
    variants = (("rabit", ours), ("rabit_serial", ours), ("rabit_fp16_dwhat", ours), ("rabit_unfused", unfused),
                ("fp16_linear", dense), ("plain_pytorch", plain))
    for name, fn in variants:
        step = make_step(name, fn)
        step()
        torch.cuda.synchronize()
        for p in params:
            p.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = fn()  # with the flags step() set
        # kept from the forward for the backward, beyond the output itself: the activation memory of the layer
        saved = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
        y.backward(dy)
        del y
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        for p in params:
            p.grad = None

        t = event_time_us(step, reps=10 if name != "plain_pytorch" else 5, warmup=2)
        res[name] = dict(us=round(t, 1), peak_extra_MB=round(peak / 2**20, 1), saved_MB=round(saved / 2**20, 2))
        if name == "plain_pytorch":
            try:
                res[name]["graph_us"] = round(graph_time_us([step], reps=10, min_calls=2)[0], 1)
            except RuntimeError as e:  # recorded in the JSON, never replaced by another number
                res[name]["graph_us"], res[name]["graph_error"] = None, str(e)[:300]
        for p in params:
            p.grad = None
        torch.cuda.empty_cache()
    # GPU time: each variant's step captured in a CUDA graph (flags as set at capture), the graphs replayed in turn
    # for QAT_ROUNDS rounds; a ratio is the median over rounds of the two variants' times in the same round
    times = interleaved_graph_times_us({name: make_step(name, fn) for name, fn in variants[:-1]}, rounds=QAT_ROUNDS)
    _qat_ops.OVERLAP_MIN_WEIGHTS, _qat_ops.FLOAT32_DWHAT = overlap_default, True
    for p in params:
        p.grad = None  # the graphs' gradients lived in their memory pools
    torch.cuda.empty_cache()
    for name, ts in times.items():
        res[name]["graph_us"] = round(statistics.median(ts), 1)
        res[name]["graph_us_min_max"] = [round(min(ts), 1), round(max(ts), 1)]
    fp = res["fp16_linear"]
    for name in ("rabit", "rabit_serial", "rabit_fp16_dwhat", "rabit_unfused"):
        ratios = [a / b for a, b in zip(times[name], times["fp16_linear"])]
        res[name]["ratio_vs_fp16_linear"] = round(res[name]["us"] / fp["us"], 3)
        res[name]["graph_ratio_vs_fp16_linear"] = round(statistics.median(ratios), 3)
        res[name]["graph_ratio_min_max"] = [round(min(ratios), 3), round(max(ratios), 3)]
    res["ratio_vs_fp16_linear"] = res["rabit"]["graph_ratio_vs_fp16_linear"]
    plain_graph = res["plain_pytorch"]["graph_us"]
    res["speedup_vs_plain_pytorch"] = round(plain_graph / res["rabit"]["graph_us"], 3) if plain_graph else None
    res["eager_speedup_vs_plain_pytorch"] = round(res["plain_pytorch"]["us"] / res["rabit"]["us"], 3)
    res.update(out=out, in_=in_features, tokens=tokens, K=K, x_requires_grad=x_grad,
               packed_MB=round(K * out * R.words_per_row(in_features) * 4 / 2**20, 2),
               note="latent W fp32, Ŵ fp16; step = forward + backward (cuBLAS "
                    + ("dX and dŴ" if x_grad else "dŴ only: x does not require grad")
                    + " + rabit backward). rabit = rabit.qat_linear (RaBiTLinear's op: Ŵ derived again in the "
                      "backward; with dX and >= rabit._ops.OVERLAP_MIN_WEIGHTS weights its backward runs dequantize "
                      "beside the dŴ GEMM and the fused backward beside the dX GEMM, on two streams; with the identity "
                      "STE and the float32 latent, dŴ = dW comes from cuBLAS in float32 and scale_grads reduces it to "
                      "dg, dh), rabit_serial = the same on one stream, rabit_fp16_dwhat = rabit with dŴ in fp16 and "
                      "residual_binarize_backward writing dW (the schedule before scale_grads), rabit_unfused = residual_binarize + F.linear (keeps Ŵ). us: eager, one step "
                      "between CUDA events (CPU launch overhead included); graph_us: forward + backward captured "
                      f"in a CUDA graph (GPU time), the variants' graphs replayed in turn for {QAT_ROUNDS} rounds, "
                      "median (and min, max) over rounds; graph_ratio_vs_fp16_linear: median over rounds of the "
                      "ratio within a round (min, max beside it); speedup_vs_plain_pytorch: from the medians. "
                      "peak_extra = peak "
                      "allocated during the step above the resident tensors (grads included); saved = allocated "
                      "after the forward minus before, less the output: what the layer keeps for its backward "
                      "(target: at most K bits per weight, packed_MB)")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gemv-only", action="store_true", help="only packed_linear at M <= 16 (no prefill, no QAT)")
    ap.add_argument("--prefill-only", action="store_true", help="only packed_linear at M > 16 (no decode, no QAT)")
    ap.add_argument("--qat-only", action="store_true", help="only the QAT ops and the QAT step")
    ap.add_argument("--group-only", action="store_true",
                    help="only packed_linear_group (q/k/v and gate/up layer groups, M <= 16)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--decode-kernels", default="",
                    help="comma-separated decode kernels to time as well, each forced where it applies: "
                         + ", ".join(f"{k} (M <= {v})" for k, v in DECODE_KERNELS.items()))
    ap.add_argument("--shapes", choices=("llama", "narrow", "tall"), default="llama",
                    help="llama: the Llama-2-7B / Llama-3-8B shapes of the targets; narrow: SmolLM2-135M's and "
                         "2048-wide layers (linears and layer groups); tall: 4096-wide layers of 4096-11008 rows, "
                         "where the M = 1 default changes to the persistent 1-bit kernel")
    ap.add_argument("--ms", default="",
                    help=f"comma-separated batch sizes M to time (default: {MS} for linears, {GROUP_MS} for layer "
                         "groups, which take M <= 16 only)")
    ap.add_argument("--prefill-kernels", default="",
                    help=f"comma-separated prefill kernels to time as well (M > 16): {', '.join(PREFILL_KERNELS)}")
    args = ap.parse_args()
    kernels = [k for k in args.decode_kernels.split(",") if k]
    if any(k not in DECODE_KERNELS for k in kernels):
        ap.error(f"--decode-kernels: expected names from {sorted(DECODE_KERNELS)}, got {args.decode_kernels!r}")
    try:
        only_ms = [int(m) for m in args.ms.split(",") if m]
    except ValueError:
        ap.error(f"--ms: expected comma-separated integers, got {args.ms!r}")
    if any(m < 1 for m in only_ms):
        ap.error(f"--ms: expected positive batch sizes, got {args.ms!r}")
    prefill = [k for k in args.prefill_kernels.split(",") if k]
    if any(k not in PREFILL_KERNELS for k in prefill):
        ap.error(f"--prefill-kernels: expected names from {list(PREFILL_KERNELS)}, got {args.prefill_kernels!r}")
    if args.gemv_only + args.prefill_only + args.qat_only + args.group_only > 1:
        ap.error("--gemv-only, --prefill-only, --qat-only and --group-only exclude each other")
    if any(v in os.environ for v in KERNEL_ENV):
        ap.error(f"unset {' and '.join(KERNEL_ENV)}: the default dispatch is the measured one "
                 "(--decode-kernels / --prefill-kernels time others)")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True  # cuBLAS default
    prop = torch.cuda.get_device_properties(0)
    info = dict(device=prop.name, sms=prop.multi_processor_count, l2_MB=getattr(prop, "L2_cache_size", 0) / 2**20,
                torch=torch.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                K=K, scales="float16", x="float16", method=__doc__.split("Method: ")[1].strip(),
                decode_kernel="default dispatch: CUDA-core (simt) for M <= 2, in <= 1536 and out x in <= 3 x 2^20; "
                              "elsewhere fp16 MMA for M >= 2; at M = 1 the persistent 1-bit MMA kernel for launches of at least 2.4 x SMs 16-row tiles whose "
                              "fragments fit two blocks an SM (K <= 3), else 1-bit MMA for in > 7680, else int8 MMA "
                              "(kernels_forced: each forced with RABIT_CUDA_DECODE where it applies)",
                shapes=args.shapes,
                prefill_kernel="default dispatch: wgmma on sm_90a builds and compute capability 9.0, else mma.sync "
                               "(kernels_forced: each forced with RABIT_CUDA_PREFILL for M > 16)")
    print(f"{info['device']}, torch {info['torch']}, CUDA {info['cuda']}", flush=True)
    bw = copy_bandwidth_gbps(DEV)
    info["copy_GBps"] = round(bw, 1)
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)
    shapes = {"llama": SHAPES, "narrow": NARROW_SHAPES, "tall": TALL_SHAPES}[args.shapes]
    shapes = shapes if not args.quick else shapes[:2]
    linear = []
    ms = only_ms or (MS if not args.quick else [1, 8, 2048])
    if args.gemv_only:
        ms = [m for m in ms if m <= 16]
    if args.prefill_only:
        ms = [m for m in ms if m > 16]
    only = args.gemv_only or args.prefill_only or args.qat_only or args.group_only
    for out, in_features in [] if args.qat_only or args.group_only else shapes:
        linear += bench_linear(out, in_features, args.quick, ms, kernels=kernels + prefill)
    groups = [] if only and not args.group_only else [
        r for name, layers in {"llama": GROUPS, "narrow": NARROW_GROUPS, "tall": TALL_GROUPS}[args.shapes].items()
        for r in bench_group(name, layers,
                             [m for m in only_ms if m <= 16] if only_ms else [1, 16] if args.quick else GROUP_MS,
                             kernels)]
    for r in linear:
        if r["M"] == 1:
            r["rabit_pct_copy_bw"] = round(100 * r["rabit_GBps"] / bw, 1)
            r["cublas_pct_copy_bw"] = round(100 * r["cublas_GBps"] / bw, 1)
    ops = [] if only and not args.qat_only else [bench_ops(4096, 4096), bench_ops(11008, 4096)]
    qat = [] if only and not args.qat_only else [
        bench_qat(o, i, 2048, x_grad) for o, i in ([(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)])
        for x_grad in (False, True)]
    result = dict(info=info, packed_linear=linear, packed_linear_group=groups, qat_ops=ops, qat_step=qat)

    gpu = device_tag(prop.name)
    tag = f"_{args.tag}" if args.tag else ""
    write_result(result, args.out, f"bench_kernels_{gpu}_{datetime.date.today().isoformat()}{tag}.json")

    print(f"{'shape (out x in)':>18} {'M':>5} {'rabit us':>9} {'cuBLAS us':>10} {'speedup':>8} {'%copyBW':>8}")
    for r in linear:
        pct = f"{r.get('rabit_pct_copy_bw', ''):>8}"
        print(f"{r['out']:>8} x {r['in_']:<7} {r['M']:>5} {r['rabit_us']:>9.2f} {r['cublas_fp16_us']:>10.2f} "
              f"{r['speedup']:>8.2f} {pct}")
    for o in ops:
        print(f"ops {o['out']}x{o['in_']}: fwd {o['fwd_us']} us ({o['fwd_GBps']} GB/s), unchecked "
              f"{o['fwd_unchecked_us']} us ({o['fwd_unchecked_GBps']} GB/s), dequantize {o['dequantize_us']} us "
              f"({o['dequantize_GBps']} GB/s), scale_grads {o['scale_grads_us']} us ({o['scale_grads_GBps']} GB/s), "
              f"bwd {o['bwd_us']} us ({o['bwd_GBps']} GB/s)")
    for q in qat:
        r, u, d = q["rabit"], q["rabit_unfused"], q["fp16_linear"]
        print(f"QAT step {q['out']}x{q['in_']} T={q['tokens']} dX={q['x_requires_grad']}: graph us rabit "
              f"{r['graph_us']} / serial {q['rabit_serial']['graph_us']} "
              f"(ratio {q['rabit_serial']['graph_ratio_vs_fp16_linear']}) / fp16 dŴ {q['rabit_fp16_dwhat']['graph_us']} "
              f"(ratio {q['rabit_fp16_dwhat']['graph_ratio_vs_fp16_linear']}) / unfused {u['graph_us']} / fp16 Linear {d['graph_us']} (ratio {r['graph_ratio_vs_fp16_linear']}"
              f" / {u['graph_ratio_vs_fp16_linear']}); saved MB {r['saved_MB']} / {u['saved_MB']} / {d['saved_MB']} "
              f"(packed {q['packed_MB']}); peak MB +{r['peak_extra_MB']} / +{u['peak_extra_MB']} / "
              f"+{d['peak_extra_MB']}; eager us {r['us']} / {u['us']} / {d['us']}; plain PyTorch graph "
              f"{q['plain_pytorch']['graph_us']} us (rabit x{q['speedup_vs_plain_pytorch']} faster), eager "
              f"{q['plain_pytorch']['us']} us (x{q['eager_speedup_vs_plain_pytorch']})")


if __name__ == "__main__":
    main()
