"""Kernel durations of packed_linear (int8 decode: prologue + main) next to cuBLAS fp16, for `ncu`:

    ncu --metrics gpu__time_duration.sum --cache-control all python3 benchmarks/profile_gemv.py

(ncu runs kernels one at a time and, with --cache-control all, from cold caches: the durations are per
kernel, without the overlap that programmatic dependent launch gives the pair in a real run.)"""
import torch
import torch.nn.functional as F

import rabit

for out, in_features in ((4096, 4096), (11008, 4096), (4096, 11008)):
    for m in (1, 4, 16):
        packed = torch.randint(-2**31, 2**31 - 1, (2, out, in_features // 32), dtype=torch.int32, device="cuda")
        g = torch.rand(2, out, device="cuda").half()
        h = torch.rand(2, in_features, device="cuda").half()
        x = torch.randn(m, in_features, device="cuda").half()
        w = torch.randn(out, in_features, device="cuda").half()
        for _ in range(2):
            rabit.packed_linear(x, packed, g, h)
            F.linear(x, w)
        torch.cuda.synchronize()
        print(f"done {out}x{in_features} M={m}", flush=True)
