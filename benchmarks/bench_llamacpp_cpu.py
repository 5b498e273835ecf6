"""A peer on the CPU: llama.cpp (llama-cpp-python) decoding SmolLM2-135M at its low-bit types, beside rabit's packed
decoder and FP32 torch, on the same machine and in the same run.

    python benchmarks/bench_llamacpp_cpu.py [--types Q2_K,Q4_0,F16] [--prompt 128] [--new 64] [--reps 3]
                                            [--interleave N] [--tag T]

llama.cpp: llama-cpp-python (a source build on this machine: `CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-deps
llama-cpp-python`), the SmolLM2 GGUF (Q4_1, rabit.models.smollm2.find_smollm2_gguf) re-quantized with
llama_model_quantize to each --types entry (allow_requantize: from Q4_1's values, speed only). llama.cpp's k-quants
need rows of a multiple of 256 columns; SmolLM2's 576-column matrices then fall back to another type (llama.cpp's
choice, printed by its quantizer and recorded as the file's size in bits per weight), so "Q2_K" is a mixed model.
Decoding: greedy, `prompt` random token ids, then `new` tokens one by one through
Llama.eval; tokens/s of the decode part only (the prompt's eval is timed apart), median of --reps. The Python
wrapper's per-token cost (Llama.eval, the logits read through its private context handle) counts against llama.cpp,
so its figures are a lower bound of what llama.cpp itself does. The prompt ids come from the same seeded generator as
bench_decode.measure's, so every runner sees the same prompt.
rabit and FP32 torch: bench_decode.measure (StaticDecoder, the same prompt length and new tokens; pretrained FP
weights, random packed bits for rabit: speed only), with lm_head as it is and as a float16 copy, and rabit also with
int8 activation tables (StaticDecoder int8_activations) with the float16 head and with the int8 head (head_dtype
"int8", llama.cpp's Q8_0 kind: the source GGUF stores SmolLM2's embeddings, the tied head, as Q8_0).
Threads: torch.get_num_threads() for every runner. Writes bench_llamacpp_cpu_<date>[_<tag>].json (--out, else $OUT,
else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import load, measure, pack_random_  # noqa: E402
from rabit.static_decode import StaticDecoder  # noqa: E402
from rabit.models.smollm2 import find_smollm2_gguf  # noqa: E402
from timing import write_cpu_result  # noqa: E402


def quantize(llama_cpp, src: Path, ftype_name: str, dst: Path) -> Path:
    """The GGUF at src re-quantized to llama.cpp's LLAMA_FTYPE_MOSTLY_<ftype_name> (or ALL_F32 for "F32")."""
    name = "LLAMA_FTYPE_ALL_F32" if ftype_name == "F32" else f"LLAMA_FTYPE_MOSTLY_{ftype_name}"
    if not hasattr(llama_cpp, name):
        raise SystemExit(f"bench_llamacpp_cpu: llama.cpp has no file type {ftype_name!r} ({name})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, name)
    params.allow_requantize = True
    params.nthread = torch.get_num_threads()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"bench_llamacpp_cpu: llama_model_quantize to {ftype_name} failed (return code {rc})")
    return dst


def llamacpp_runner(llama_cpp, path: Path, prompt_ids: list[int], new: int):
    """A llama.cpp model at path and a function that runs one round of greedy decoding with it: prompt eval, then `new`
    single-token evals; returns (prompt seconds, decode seconds, tokens)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt_ids) + new + 8, n_batch=len(prompt_ids),
                          n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
                          logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def run():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        t1 = time.perf_counter()
        out = []
        for _ in range(new):
            # the last token's logits from llama.cpp's buffer (with logits_all=False the wrapper keeps none)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
            tok = int(logits.argmax())
            out.append(tok)
            llm.eval([tok])
        return t1 - t0, time.perf_counter() - t1, out

    return llm, run


def llamacpp_decode(llama_cpp, path: Path, prompt_ids: list[int], new: int, reps: int) -> dict:
    """Greedy decoding with llama.cpp, median of reps rounds after a warm-up round; tokens/s of the decode part."""
    _, run = llamacpp_runner(llama_cpp, path, prompt_ids, new)
    rounds = [run() for _ in range(reps + 1)][1:]  # the first round warms up
    prefill, decode, tokens = [r[0] for r in rounds], [r[1] for r in rounds], rounds[-1][2]
    return dict(file_bytes=path.stat().st_size, prefill_ms=round(statistics.median(prefill) * 1e3, 2),
                decode_ms_per_token=round(statistics.median(decode) / new * 1e3, 3),
                tokens_per_s=round(new / statistics.median(decode), 1), first_tokens=tokens[:8])


def interleaved(llama_cpp, path: Path, model, prompt_ids: list[int], new: int, rounds: int) -> dict:
    """llama.cpp (the file at path) and rabit's fastest CPU decoder (int8 activations, int8 head) alternated round by
    round, so that the VM's drifts (up to a third between runs) fall on both alike: tokens/s of each round's decode
    part, the medians and the rounds rabit won."""
    _, run_llama = llamacpp_runner(llama_cpp, path, prompt_ids, new)
    dec = StaticDecoder(model, batch_size=1, max_len=len(prompt_ids) + new + 1, head_dtype="int8",
                        int8_activations=True)
    ids = torch.tensor([prompt_ids])

    def run_rabit():
        dec.prefill(ids)
        t = time.perf_counter()
        dec.decode(new)
        return time.perf_counter() - t

    run_llama()  # warm-up rounds
    dec.prefill(ids)
    dec.decode(4)
    tps = {"llama.cpp": [], "rabit": []}
    for _ in range(rounds):
        tps["llama.cpp"].append(round(new / run_llama()[1], 1))
        tps["rabit"].append(round(new / run_rabit(), 1))
    med = {k: statistics.median(v) for k, v in tps.items()}
    return dict(runner="interleaved", llama_cpp_file=path.name, rabit="head int8, int8 activations",
                tokens_per_s_rounds=tps, median_tokens_per_s=med, rabit_over_llama_cpp=round(med["rabit"] /
                                                                                          med["llama.cpp"], 3),
                rounds_won_by_rabit=sum(r > lc for r, lc in zip(tps["rabit"], tps["llama.cpp"])))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q2_K,Q4_0,F16", help="llama.cpp file types to re-quantize the GGUF to")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gguf", default=None, help="the SmolLM2 GGUF (default: $RABIT_SMOLLM2_GGUF, else the wheel's)")
    ap.add_argument("--interleave", type=int, default=0,
                    help="then N rounds of llama.cpp (the first --types file) and rabit's fastest CPU decoder "
                         "alternated (default 0: none)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError as e:
        raise SystemExit(f"bench_llamacpp_cpu: llama-cpp-python is not installed ({e}); build it with "
                         "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install --no-deps llama-cpp-python") from None
    src = find_smollm2_gguf(args.gguf)
    rows = []
    model, weights = load("smollm2-135m", "cpu", torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.types.split(","):
            path = quantize(llama_cpp, src, t, Path(tmp) / f"smollm2-{t}.gguf")
            r = llamacpp_decode(llama_cpp, path, prompt_ids, args.new, args.reps)
            r.update(runner="llama.cpp", type=t, bits_per_weight=round(8 * r["file_bytes"] / n_params, 2))
            rows.append(r)
            print(f"llama.cpp {t:6s}: {r['tokens_per_s']:7.1f} tok/s, {r['decode_ms_per_token']:7.2f} ms/token, "
                  f"file {r['file_bytes'] / 2**20:.1f} MiB ({r['bits_per_weight']} bits/weight)", flush=True)
        for variant in ("fp", "rabit"):
            if variant == "rabit":
                model = pack_random_(model)
            # rabit also with int8 activation tables (StaticDecoder int8_activations: llama.cpp's activation class), with
            # the float16 head and with the int8 head (head_dtype="int8": llama.cpp's Q8_0 kind, as its SmolLM2 files')
            extra = (("float16", True), ("int8", True)) if variant == "rabit" else ()
            for head, i8 in ((None, False), ("float16", False)) + extra:
                _, _, r = measure(model, 1, args.prompt, args.new, torch.device("cpu"), args.reps, False, head_dtype=head,
                                  int8_activations=i8)
                row = dict(runner="torch FP32" if variant == "fp" else "rabit packed (K=2)", type=variant,
                           head_dtype=head or "float32", int8_activations=i8, tokens_per_s=r["tokens_per_s"],
                           decode_ms_per_token=r["decode_ms_per_token"], prefill_ms=r["prefill_ms"], split_ms=r["split_ms"])
                rows.append(row)
                print(f"{row['runner']:22s} head {row['head_dtype']:8s}{' int8 act.' if i8 else '':10s}: "
                      f"{row['tokens_per_s']:7.1f} tok/s, {row['decode_ms_per_token']:7.2f} ms/token", flush=True)
        if args.interleave:
            first = Path(tmp) / f"smollm2-{args.types.split(',')[0]}.gguf"
            r = interleaved(llama_cpp, first, model, prompt_ids, args.new, args.interleave)
            rows.append(r)
            print(f"interleaved, {args.interleave} rounds: llama.cpp {first.name} {r['median_tokens_per_s']['llama.cpp']}"
                  f" tok/s, rabit {r['median_tokens_per_s']['rabit']} ({r['rabit_over_llama_cpp']}x; rabit faster in "
                  f"{r['rounds_won_by_rabit']} of {args.interleave})", flush=True)
    write_cpu_result("bench_llamacpp_cpu", "greedy decode of --new tokens after a --prompt-token prompt, decode part "
                     "only, median of --reps (llama.cpp: Llama.eval per token; rabit and FP32: StaticDecoder)", rows,
                     args.out, args.tag, model="smollm2-135m", gguf=src.name, weights=weights,
                     prompt_tokens=args.prompt, new_tokens=args.new, llama_cpp_version=llama_cpp.__version__,
                     command=" ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])))


if __name__ == "__main__":
    main()
