"""What int8 activation tables (StaticDecoder int8_activations, rabit.packed_linear_fused_i8) cost in accuracy on a
trained packed model: teacher-forced decode steps of held-out sequences through two CPU decoders, float32 tables (the
default) and int8, compared by perplexity, KL(float32 || int8) and top-1 agreement per position. --head-dtype int8
also gives the int8 decoder the int8 head (StaticDecoder head_dtype "int8", rabit.int8_linear): the fastest CPU
setting against the default one.

    python benchmarks/int8_accuracy_cpu.py --model EXPORTED_DIR --ids EVAL.safetensors [--seqs 16] [--len 128]
                                           [--head-dtype int8] [--out DIR] [--tag TAG]

--model: an exported rabit directory (`rabit export`); --ids: a safetensors file of held-out token ids
(``input_ids`` [N, T], e.g. the teacher_eval.safetensors of `rabit quickstart --out DIR`, sampled from the FP model
with another seed than its training data). Each sequence's first token is prefilled (float32 kernels in both
decoders), then every next position runs as one decode step with the true token, so positions 2 .. len are scored
from decode steps only. Writes int8_accuracy_cpu_<date>[_<tag>].json (timing.write_cpu_result).
"""
import argparse
import math

import torch
from safetensors.torch import load_file

from rabit.export import from_pretrained
from rabit.static_decode import StaticDecoder
from timing import write_cpu_result


@torch.inference_mode()
def step_logprobs(dec: StaticDecoder, ids: torch.Tensor) -> torch.Tensor:
    """log-softmax of the decode steps' logits at positions 1 .. T-1 (each predicting the next token): [B, T-1, V]."""
    dec.prefill(ids[:, :1])
    out = [torch.log_softmax(dec.forward(ids[:, t:t + 1], torch.tensor([t])).float(), -1)
           for t in range(1, ids.shape[1])]
    return torch.stack(out, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--head-dtype", choices=["float32", "int8"], default="float32",
                    help="the int8 decoder's head (the float32 decoder keeps lm_head as it is)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    model = from_pretrained(args.model).eval()
    ids = load_file(args.ids)["input_ids"][: args.seqs, : args.len].long()
    lp = {}
    for name, i8 in (("float32", False), ("int8", True)):
        head = "int8" if i8 and args.head_dtype == "int8" else None
        dec = StaticDecoder(model, batch_size=ids.shape[0], max_len=ids.shape[1] + 1, int8_activations=i8,
                            head_dtype=head)
        lp[name] = step_logprobs(dec, ids)
    target = ids[:, 2:]  # scored: the tokens predicted by the decode steps at positions 1 .. T-2
    nll = {k: -v[:, :-1].gather(-1, target[..., None]).mean().item() for k, v in lp.items()}
    a, b = lp["float32"][:, :-1], lp["int8"][:, :-1]
    kl = (a.exp() * (a - b)).sum(-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    row = dict(model=args.model, ids=args.ids, sequences=int(ids.shape[0]), length=int(ids.shape[1]),
               scored_tokens=int(target.numel()), int8_decoder_head=args.head_dtype,
               ppl_float32=round(math.exp(nll["float32"]), 4),
               ppl_int8=round(math.exp(nll["int8"]), 4), kl_float32_to_int8=float(f"{kl:.4g}"),
               top1_agreement=round(top1, 4))
    print(f"decode-step PPL float32 tables {row['ppl_float32']}, int8 {row['ppl_int8']}; "
          f"KL {row['kl_float32_to_int8']}, top-1 agreement {row['top1_agreement']:.2%} over "
          f"{row['scored_tokens']} tokens", flush=True)
    write_cpu_result("int8_accuracy_cpu", "teacher-forced decode steps (StaticDecoder.forward, one token a step) of "
                     "held-out sequences, float32 tables vs int8 activations (and --head-dtype)", [row], args.out, args.tag)


if __name__ == "__main__":
    main()
