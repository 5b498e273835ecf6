"""What int8 activations (StaticDecoder int8_activations, rabit.packed_linear_fused_i8) cost in accuracy on a trained
packed model: teacher-forced decode steps of held-out sequences through two decoders, the default (float32-level
kernels) and int8 activations, compared by perplexity, KL(default || int8) and top-1 agreement per position. On the CPU
the int8 class is the int8 lookup tables (a scale per 128 columns); --head-dtype int8 also gives the int8 decoder the
int8 head (StaticDecoder head_dtype "int8", rabit.int8_linear): the fastest CPU setting against the default one. On
CUDA (--device cuda: the model in float16, one sequence at a time, as int8 activations decode at batch 1 there) it is
the int8 bit planes on binary tensor cores (a scale per 128 columns).

    python benchmarks/int8_accuracy.py --model EXPORTED_DIR --ids EVAL.safetensors [--seqs 16] [--len 128]
                                       [--device cpu|cuda] [--head-dtype int8] [--out DIR] [--tag TAG]

--model: an exported rabit directory (`rabit export`); --ids: a safetensors file of held-out token ids
(``input_ids`` [N, T], e.g. the teacher_eval.safetensors of `rabit quickstart --out DIR`, sampled from the FP model
with another seed than its training data). Each sequence's first token is prefilled (the float kernels in both
decoders), then every next position runs as one decode step with the true token, so positions 2 .. len are scored
from decode steps only. Writes int8_accuracy_cpu_<date>[_<tag>].json (timing.write_cpu_result) or
int8_accuracy_cuda_<device>_<date>[_<tag>].json.
"""
import argparse
import math

import torch
from safetensors.torch import load_file

from rabit.export import from_pretrained
from rabit.static_decode import StaticDecoder
from timing import device_tag, write_cpu_result, write_result


@torch.inference_mode()
def step_logprobs(dec: StaticDecoder, ids: torch.Tensor) -> torch.Tensor:
    """log-softmax of the decode steps' logits at positions 1 .. T-1 (each predicting the next token): [B, T-1, V]."""
    ids = ids.to(dec.device)
    dec.prefill(ids[:, :1])
    out = [torch.log_softmax(dec.forward(ids[:, t:t + 1], torch.tensor([t], device=dec.device)).float(), -1).cpu()
           for t in range(1, ids.shape[1])]
    return torch.stack(out, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--head-dtype", choices=["float32", "int8"], default="float32",
                    help="the int8 decoder's head on the CPU (the default decoder keeps lm_head as it is)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.device == "cuda" and args.head_dtype == "int8":
        ap.error("--head-dtype int8 is a CPU class; drop it with --device cuda")
    model = from_pretrained(args.model).eval()
    if args.device == "cuda":
        model = model.to("cuda", torch.float16)
    ids = load_file(args.ids)["input_ids"][: args.seqs, : args.len].long()
    # CUDA: one sequence a decoder call (int8 activations decode batch 1 there); eager steps (no graph to capture)
    chunks = ids.split(1) if args.device == "cuda" else [ids]
    lp = {}
    for name, i8 in (("default", False), ("int8", True)):
        head = "int8" if i8 and args.head_dtype == "int8" else None
        dec = StaticDecoder(model, batch_size=chunks[0].shape[0], max_len=ids.shape[1] + 1, int8_activations=i8,
                            head_dtype=head, cuda_graph=False)
        lp[name] = torch.cat([step_logprobs(dec, c) for c in chunks])
    target = ids[:, 2:]  # scored: the tokens predicted by the decode steps at positions 1 .. T-2
    nll = {k: -v[:, :-1].gather(-1, target[..., None]).mean().item() for k, v in lp.items()}
    a, b = lp["default"][:, :-1], lp["int8"][:, :-1]
    kl = (a.exp() * (a - b)).sum(-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    row = dict(model=args.model, ids=args.ids, sequences=int(ids.shape[0]), length=int(ids.shape[1]),
               scored_tokens=int(target.numel()), int8_decoder_head=args.head_dtype,
               ppl_default=round(math.exp(nll["default"]), 4),
               ppl_int8=round(math.exp(nll["int8"]), 4), kl_default_to_int8=float(f"{kl:.4g}"),
               top1_agreement=round(top1, 4))
    print(f"decode-step PPL default {row['ppl_default']}, int8 {row['ppl_int8']}; "
          f"KL {row['kl_default_to_int8']}, top-1 agreement {row['top1_agreement']:.2%} over "
          f"{row['scored_tokens']} tokens", flush=True)
    method = ("teacher-forced decode steps (StaticDecoder.forward, one token a step) of held-out sequences, the "
              "default decoder vs int8 activations (and --head-dtype)")
    if args.device == "cpu":
        write_cpu_result("int8_accuracy_cpu", method, [row], args.out, args.tag)
        return
    import datetime
    import platform

    name = torch.cuda.get_device_name()
    doc = dict(benchmark="int8_accuracy_cuda", device=name, model_dtype="float16",
               versions=dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version()),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), method=method,
               rows=[row])
    write_result(doc, args.out, f"int8_accuracy_cuda_{device_tag(name)}_{datetime.date.today().isoformat()}"
                 f"{'_' + args.tag if args.tag else ''}.json")

if __name__ == "__main__":
    main()
