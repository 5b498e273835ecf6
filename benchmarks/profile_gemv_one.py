"""One warm packed_linear call (4096x4096, M=1, fp16) after warm-up, for `ncu --set full -k regex:gemv_i8 -c 2`."""
import torch

import rabit

out, in_features = 4096, 4096
packed = torch.randint(-2**31, 2**31 - 1, (2, out, in_features // 32), dtype=torch.int32, device="cuda")
g = torch.rand(2, out, device="cuda").half()
h = torch.rand(2, in_features, device="cuda").half()
x = torch.randn(1, in_features, device="cuda").half()
for _ in range(20):
    rabit.packed_linear(x, packed, g, h)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
rabit.packed_linear(x, packed, g, h)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
