"""packed_linear (int8 decode: prologue + main kernel) next to cuBLAS fp16, for Nsight Compute.

Warm-up calls run first; only the calls between cudaProfilerStart/Stop are meant to be profiled:

    ncu --profile-from-start off --metrics gpu__time_duration.sum python3 benchmarks/profile_gemv.py
    ncu --profile-from-start off --set full python3 benchmarks/profile_gemv.py --shapes 4096x4096 --ms 1

(ncu runs kernels one at a time: the durations are per kernel, without the overlap that programmatic
dependent launch gives the pair in a real run. Add --cache-control all for cold caches.)"""
import argparse

import torch
import torch.nn.functional as F

import rabit

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"], help="OUTxIN")
ap.add_argument("--ms", nargs="+", type=int, default=[1, 4, 16], help="batch rows M")
ap.add_argument("--cublas", action=argparse.BooleanOptionalAction, default=True, help="also profile F.linear")
args = ap.parse_args()

for shape in args.shapes:
    out, in_features = (int(v) for v in shape.split("x"))
    packed = torch.randint(-2**31, 2**31 - 1, (2, out, in_features // 32), dtype=torch.int32, device="cuda")
    g = torch.rand(2, out, device="cuda").half()
    h = torch.rand(2, in_features, device="cuda").half()
    w = torch.randn(out, in_features, device="cuda").half()
    for m in args.ms:
        x = torch.randn(m, in_features, device="cuda").half()
        for _ in range(20):  # warm-up: module load, kernel attributes, caching allocator
            rabit.packed_linear(x, packed, g, h)
            F.linear(x, w)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        rabit.packed_linear(x, packed, g, h)
        if args.cublas:
            F.linear(x, w)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print(f"profiled {shape} M={m}", flush=True)
