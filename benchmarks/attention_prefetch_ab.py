"""Experiment (thirty-third session, H200): StaticDecoder with decode_attention(prefetch_cache=True) against False in
one process, FP16 and packed, SmolLM2 and Llama-2-7B shapes, batch 1 and 4. Needs the prefetch_cache flag of the commit
that added this file (reverted by the next). Writes $OUT/attn_ab.json."""
import json
import os
import statistics
import sys
import torch
sys.path.insert(0, "benchmarks")
import rabit.static_decode as sd
from bench_decode import random_llama, pack_random_
orig = sd.decode_attention
FLAG = {"on": True}
sd.decode_attention = lambda *a, prefetch_cache=True, **k: orig(*a, prefetch_cache=FLAG["on"], **k)
dev = torch.device("cuda")
res = {}
for name in ("smollm2-135m-shape", "llama2-7b-shape"):
    fp = random_llama(name, dev, torch.float16)
    for variant in ("fp", "rabit"):
        model = fp if variant == "fp" else pack_random_(fp)
        for batch in (1, 4):
            ids = torch.randint(3, model.config.vocab_size, (batch, 128), generator=torch.Generator().manual_seed(1))
            ref = None
            for rnd in range(2):
                for on in (False, True):
                    FLAG["on"] = on
                    dec = sd.StaticDecoder(model, batch_size=batch, max_len=128 + 256 + 1, compile=True)
                    dec.prefill(ids); dec.decode(4)
                    ts = []
                    for _ in range(3):
                        dec.prefill(ids); torch.cuda.synchronize()
                        e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
                        e0.record(); dec.decode(256); e1.record(); e1.synchronize()
                        ts.append(e0.elapsed_time(e1) / 1e3)
                    toks = dec._out[:, :384].clone()
                    same = None if ref is None else bool(torch.equal(toks, ref))
                    ref = toks if ref is None else ref
                    tps = batch * 256 / statistics.median(ts)
                    res.setdefault(f"{name}|{variant}|b{batch}|{'on' if on else 'off'}", []).append(round(tps, 1))
                    print(name, variant, batch, "prefetch" if on else "plain", rnd, round(tps, 1), "same", same, flush=True)
                    del dec
        del model
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "attn_ab.json"), "w"), indent=1)
