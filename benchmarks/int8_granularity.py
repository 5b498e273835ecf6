"""How coarse an int8 activation scale can be: the FP SmolLM2-135M (float32, CPU) with every decoder linear's input x
quantized to int8 (Q = round(x * 127 / amax), x ≈ Q * amax / 127) with one scale per block of columns, against the
unquantized model: KL(FP || quantized), top-1 agreement and perplexity of teacher-forced WikiText-2 *validation* text
(evaluation only). Blocks: contiguous runs of N columns (--blocks), and "cuda": the CUDA int8 class's sub-groups
(blocks of 32 columns, every fourth, of a 512-column group: rabit.reference.int8_activations_cuda). A proxy for the
packed classes (they quantize h ⊙ x, not x, of a 2-bit model): it isolates what the scale granularity costs on a real
model's activations.

    python benchmarks/int8_granularity.py [--blocks 512,cuda,128,32] [--seqs 8] [--len 256] [--out DIR] [--tag TAG]
"""
import argparse
import math

import torch

from rabit.evaluate import shared_dir
from rabit.models import load_model
from rabit.reference import dequantize_int8_activations_cuda, int8_activations_cuda
from timing import write_cpu_result


def quantize_blocks(x: torch.Tensor, block: str) -> torch.Tensor:
    """x [..., n] quantized to int8 per block ("cuda": the CUDA class's sub-groups) and dequantized."""
    n = x.shape[-1]
    if block == "cuda":
        xq = dequantize_int8_activations_cuda(*int8_activations_cuda(x.reshape(-1, n), torch.ones(1, n)))[0]
        return xq[:, :n].to(x.dtype).reshape(x.shape)
    xb = torch.nn.functional.pad(x, (0, -n % int(block))).unflatten(-1, (-1, int(block)))
    s = xb.abs().amax(-1, keepdim=True) / 127
    return (torch.round(xb / torch.where(s > 0, s, 1.0)) * s).flatten(-2)[..., :n]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="512,cuda,128,32")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    model, tok = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    model.eval()
    text = (shared_dir() / "data/wikitext-2/wiki.valid.tokens").read_text()
    ids = torch.tensor(tok(text[: 100 * args.seqs * args.len])["input_ids"][: args.seqs * args.len]).view(args.seqs, -1)
    block = None

    def hook(_mod, inputs):
        return None if block is None else (quantize_blocks(inputs[0], block),)

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_pre_hook(hook)
    rows = []
    with torch.inference_mode():
        ref = torch.log_softmax(model(ids).logits.float(), -1)
        nll_fp = -ref[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
        for block in args.blocks.split(","):
            lp = torch.log_softmax(model(ids).logits.float(), -1)
            nll = -lp[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
            rows.append(dict(block=block, ppl=round(math.exp(nll), 4), ppl_fp=round(math.exp(nll_fp), 4),
                             kl_fp_to_quantized=float(f"{(ref.exp() * (ref - lp)).sum(-1).mean().item():.4g}"),
                             top1_agreement=round((ref.argmax(-1) == lp.argmax(-1)).float().mean().item(), 4)))
            print(rows[-1], flush=True)
    write_cpu_result("int8_granularity", "FP SmolLM2-135M, every decoder linear's input fake-quantized to int8 per "
                     f"block; teacher-forced WikiText-2 validation text, {args.seqs} x {ids.shape[1]} tokens", rows,
                     args.out, args.tag)


if __name__ == "__main__":
    main()
