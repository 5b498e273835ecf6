"""Experiment (thirty-third session, H200): do the decode kernels run faster with their weights in the L2, and does an
L2 prefetch of the next linear's weights during decode pay? Needs the rabit.prefetch_l2 op of the commit that added
this file (reverted by the next). Writes $OUT/l2pf.json."""
import json
import os
import statistics
import sys
import torch
sys.path.insert(0, "benchmarks")
import rabit
from rabit.static_decode import StaticDecoder
from bench_decode import random_llama, pack_random_
from timing import graph_time_us

dev = torch.device("cuda")
res = {}
# 1. per-kernel: bits hot in L2 vs cold (pool > L2)
def make(o, i):
    p = torch.randint(-2**31, 2**31-1, (2, o, (i+31)//32), dtype=torch.int32, device=dev)
    g = (torch.rand(2, o, device=dev) * 0.01).half(); h = (0.5 + torch.rand(2, i, device=dev)).half()
    return p, g, h
for M in (1, 4, 16):
  for o, i in ((4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008)):
    x = torch.randn(M, i, device=dev).half()
    nb = o * i * 2 // 8
    pool = [make(o, i) for _ in range(max(2, -(-160_000_000 // nb)))]
    cold, _ = graph_time_us([lambda p=p: rabit.packed_linear(x, *p) for p in pool], reps=20)
    hot, _ = graph_time_us([lambda p=pool[0]: rabit.packed_linear(x, *p)], reps=20)
    # prefetch of the next pool entry before each call (pf of entry j+1 issued before call j)
    def pfcall(j):
        nxt = pool[(j + 1) % len(pool)]
        torch.ops.rabit.prefetch_l2(list(nxt))
        rabit.packed_linear(x, *pool[j])
    pf, _ = graph_time_us([lambda j=j: pfcall(j) for j in range(len(pool))], reps=20)
    pfo, _ = graph_time_us([lambda j=j: torch.ops.rabit.prefetch_l2(list(pool[(j+1) % len(pool)])) for j in range(len(pool))], reps=20)
    res[f"kernel_M{M}_{o}x{i}"] = dict(cold=cold, hot=hot, prefetch_next=pf, prefetch_only=pfo)
    print(M, o, i, f"cold {cold:.2f} hot {hot:.2f} pf-next {pf:.2f} pf-only {pfo:.2f}", flush=True)
    pool = None  # free the copies before the next shape

# 2. decode with prefetch
class PFDecoder(StaticDecoder):
    pf_dist = 1
    pf_where = "pre"
    def _plan(self):
        calls = []
        for layer in self.base.layers:
            a, mlp = layer.self_attn, layer.mlp
            for mods in ((a.q_proj, a.k_proj, a.v_proj), (a.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)):
                ts = []
                for m in mods:
                    ts += [m.packed, m.g, m.h]
                calls.append(ts)
        return calls
    @torch.no_grad()
    def forward_fused(self, tokens, pos):
        if not hasattr(self, "_pfplan"):
            self._pfplan = self._plan()
        plan, d = self._pfplan, self.pf_dist
        j = 0
        def pf(j):
            if d > 0 and j + d < len(plan):
                torch.ops.rabit.prefetch_l2(plan[j + d])
        B = tokens.shape[0]
        h = self.base.embed_tokens(tokens).view(B, -1)
        pre = self.pf_where == "pre"
        for i, layer in enumerate(self.base.layers):
            a, mlp = layer.self_attn, layer.mlp
            if pre: pf(j)
            q, k, v = self._fused((a.q_proj, a.k_proj, a.v_proj), h, norm=layer.input_layernorm)
            if not pre: pf(j)
            j += 1
            o = self.attend_fused(i, q, k, v, pos).view(B, -1)
            if pre: pf(j)
            h = self._fused((a.o_proj,), o, residual=h)[0]
            if not pre: pf(j)
            j += 1
            if pre: pf(j)
            gate, up = self._fused((mlp.gate_proj, mlp.up_proj), h, norm=layer.post_attention_layernorm)
            if not pre: pf(j)
            j += 1
            if pre: pf(j)
            h = self._fused((mlp.down_proj,), gate, up=up, residual=h)[0]
            if not pre: pf(j)
            j += 1
        n = self.base.norm
        return self.model.lm_head(self._decode_fns[0](h, n.weight, n.variance_epsilon))

model = pack_random_(random_llama("llama2-7b-shape", dev, torch.float16))
prompt, new = 128, 256
variants = [("base", 0, "pre"), ("pre1", 1, "pre"), ("post1", 1, "post"), ("pre2", 2, "pre")]
for batch in (1, 4, 16):
    ids = torch.randint(3, 32000, (batch, prompt), generator=torch.Generator().manual_seed(1))
    ref = None
    for rnd in range(2):
      for name, d, where in variants:
        PFDecoder.pf_dist, PFDecoder.pf_where = d, where
        dec = PFDecoder(model, batch_size=batch, max_len=prompt + new + 1, compile=True)
        dec.prefill(ids); dec.decode(4)
        ts = []
        for _ in range(3):
            dec.prefill(ids); torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
            e0.record(); dec.decode(new); e1.record(); e1.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3)
        t = statistics.median(ts)
        toks = dec._out[:, :prompt + new].clone()
        same = None if ref is None else bool(torch.equal(toks, ref))
        if ref is None: ref = toks
        tps = batch * new / t
        res.setdefault(f"decode_b{batch}_{name}", []).append(tps)
        print(f"batch {batch} {name} round {rnd}: {tps:.1f} tok/s ({t/new*1e3:.3f} ms/token) same_tokens={same}", flush=True)
        del dec; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "l2pf.json"), "w"), indent=1)
