"""Twenty-eighth session's probe of the streamed decode kernel (kept only in the experiment's commit): M = 1
packed_linear / packed_linear_group time (CUDA graphs over a weight pool larger than L2) of the int8 and 1-bit kernels
against the streamed kernel with and without its in-kernel prologue (RABIT_CUDA_STREAM_PROBE=1 skips the prologue: its
outputs are garbage, only its time counts). JSON to $OUT or benchmarks/results/.
    python benchmarks/probe_stream.py --tag TAG"""
import datetime
import os
import sys

import torch

sys.path.insert(0, "benchmarks")
import rabit  # noqa: E402
from bench_kernels import POOL_BYTES, make_packed  # noqa: E402
from timing import graph_time_us, write_result  # noqa: E402

VARIANTS = [("i8", {"RABIT_CUDA_DECODE": "i8"}), ("b1", {"RABIT_CUDA_DECODE": "b1"}),
            ("stream", {"RABIT_CUDA_DECODE": "stream"}),
            ("noprologue", {"RABIT_CUDA_DECODE": "stream", "RABIT_CUDA_STREAM_PROBE": "1"})]
rows = []


def timed(fns):
    res = {}
    for name, env in VARIANTS:
        os.environ.update(env)
        try:
            res[name] = round(graph_time_us(fns, min_calls=200, reps=20)[0], 2)
        finally:
            for k in env:
                os.environ.pop(k, None)
    return res


for out, inn in [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (14336, 4096), (4096, 14336)]:
    per = 2 * out * (inn // 32) * 4
    pool = make_packed(out, inn, min(64, max(2, -(-POOL_BYTES // per))))
    x = torch.randn(1, inn, device="cuda").half()
    r = timed([lambda p=p, g=g, h=h: rabit.packed_linear(x, p, g, h) for p, g, h in pool])
    rows.append(dict(shape=f"{out}x{inn}", **r))
    print(rows[-1], flush=True)
for name, outs in [("qkv 3x4096^2", [4096] * 3), ("gate/up 2x11008x4096", [11008] * 2)]:
    per = sum(2 * o * 128 * 4 for o in outs)
    n = min(32, max(2, -(-POOL_BYTES // per)))
    pools = [make_packed(o, 4096, n) for o in outs]
    x = torch.randn(1, 4096, device="cuda").half()
    fns = []
    for i in range(n):
        ls = [pl[i] for pl in pools]
        fns.append(lambda ls=ls: rabit.packed_linear_group(x, [a[0] for a in ls], [a[1] for a in ls],
                                                           [a[2] for a in ls]))
    r = timed(fns)
    rows.append(dict(shape=name, **r))
    print(rows[-1], flush=True)
tag = sys.argv[sys.argv.index("--tag") + 1] if "--tag" in sys.argv else ""
doc = dict(benchmark="probe_stream", device=torch.cuda.get_device_name(), versions=dict(torch=torch.__version__),
           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           unit="us per call, median of 20 graph replays", rows=rows)
write_result(doc, None, f"probe_stream_{torch.cuda.get_device_name().replace(' ', '_')}_{datetime.date.today()}{tag}.json")
