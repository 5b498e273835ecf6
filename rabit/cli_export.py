"""CLI subcommands ``export``, ``eval`` and ``generate`` for ``rabit <command>``.

Wiring into ``rabit/cli.py`` (same shape as its ``COMMANDS``: name -> (add parser, run))::

    from .cli_export import COMMANDS as _EXPORT_COMMANDS
    COMMANDS.update(_EXPORT_COMMANDS)

Each handler takes the parsed
``argparse.Namespace`` and returns a JSON-serialisable dict; without ``--json`` it also prints a short
human-readable report on stdout. Errors the user can fix raise :class:`rabit._cli_args.CommandError` (or
ValueError, FileNotFoundError), which ``rabit.cli.main``, the one entry point, turns into exit status 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

from ._cli_args import CommandError
from ._cli_args import add_common as _add_common
from ._cli_args import non_negative_int as _non_negative_int
from ._cli_args import positive_int as _positive_int

# ----------------------------------------------------------------------------------------------
# argument types


def _task_list(text: str) -> list[str]:
    from .lm_eval_tasks import TASKS

    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    bad = [t for t in names if t not in TASKS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad or [text]}; choose from {', '.join(TASKS)} or 'all'")
    return names


def _is_export_dir(path: str) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / "config.json").is_file()):
        return False
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # let the loader report the corrupted file
    if not isinstance(cfg, dict):
        return True  # the loader says: config.json must hold a JSON object
    qc = cfg.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "rabit"


def _load_any(model: str, device: str = "cpu"):
    """``(model, tokenizer, kind)`` for an export directory or anything rabit.models.load_model takes."""
    if _is_export_dir(model):
        from .export import load_pretrained

        m, tok = load_pretrained(model, device=device)
        return m, tok, "rabit-export"
    p = Path(model)
    if p.exists() and p.is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"rabit: {model!r} is a directory without config.json; pass an exported model "
                                "directory, a Hugging Face model directory, or a model name")
    from .models import load_model

    m, tok = load_model(model, device=device)
    return m, tok, "full-precision"


def _emit(args, lines: list[str]) -> None:
    if not getattr(args, "json", False):
        print("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# export


def add_export(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export", help="pack a trained RaBiT model (QAT checkpoint) into an exported directory",
        description="Write config.json + model.safetensors (+ tokenizer) with the K packed sign planes, fp16 "
                    "scales and every unquantized tensor: the QAT student saved by rabit's trainer "
                    "(checkpoint.safetensors) is rebuilt on top of --model and packed. For a post-training "
                    "(untrained) 2-bit model use `rabit quantize`.")
    p.add_argument("--model", default="stories260k",
                   help="base model: 'stories260k', 'smollm2-135m', a HF model dir, a llama2.c .bin or a .gguf "
                        "(default stories260k)")
    p.add_argument("--checkpoint", metavar="PATH", required=True,
                   help="QAT checkpoint: the folder of `rabit train --out DIR`, the trainer's output folder (DIR/train), or "
                        "its checkpoint.safetensors")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory (must not exist or be empty)")
    _add_layer_selection(p)
    _add_pack_options(p)
    _add_common(p)
    return p


def _add_layer_selection(p: argparse.ArgumentParser) -> None:
    """--k / --include / --exclude: which linears become RaBiT layers (rabit.RabitConfig)."""
    p.add_argument("--k", type=int, choices=(1, 2, 3, 4), default=2, help="binary paths per layer (default 2)")
    p.add_argument("--include", nargs="*", default=[], metavar="GLOB",
                   help="module-name globs to quantize (default: every nn.Linear)")
    p.add_argument("--exclude", nargs="*", default=["lm_head"], metavar="GLOB",
                   help="module-name globs kept in full precision (default: lm_head)")


def _add_pack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fp16", action="store_true",
                   help="store embeddings, norms and other unquantized tensors as float16 (smaller file)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")


def _checkpoint_file(path: str) -> Path:
    from .experiment import PATH_FREEZE_SUBDIRS, TRAIN_SUBDIR
    from .train import CHECKPOINT_NAME

    p = Path(path)
    if not p.is_dir():
        if p.is_file():
            return p
        raise FileNotFoundError(f"rabit: QAT checkpoint {str(p)!r} not found; pass the training output directory "
                                "or its checkpoint.safetensors")
    # the trainer's own output folder, then the layout of `rabit train --out DIR` (benchmarks/method_table.py writes
    # the same per method): its trainer writes to DIR/train, path freezing's final stage to DIR/train_path2
    tried = [p / sub / CHECKPOINT_NAME for sub in ("", TRAIN_SUBDIR, PATH_FREEZE_SUBDIRS[-1])]
    for f in tried:
        if f.is_file():
            return f
    raise FileNotFoundError(f"rabit: no QAT checkpoint in {str(p)!r} (looked for "
                            f"{', '.join(repr(str(f)) for f in tried)}); pass the training output directory "
                            "(rabit train --out DIR) or its checkpoint.safetensors")


def _prepare(args: argparse.Namespace):
    """Output checks, then (model, tokenizer) for --model; shared by export and quantize."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CommandError(f"rabit: output {str(out)!r} exists and is not an empty directory; pass --overwrite or "
                       "choose another --out")
    if _is_export_dir(args.model):
        raise CommandError(f"rabit: {args.model!r} is already an exported (packed) model; pass the base model")
    model, tok, _ = _load_any(args.model)
    return out, model, tok


def _pack_and_save(args: argparse.Namespace, model, tok, out: Path, **info_extra) -> dict[str, Any]:
    import torch

    from .export import describe, save_pretrained
    from .quantize import convert_

    convert_(model)
    save_pretrained(model, out, tokenizer=tok, unquantized_dtype=torch.float16 if args.fp16 else None,
                    overwrite=args.overwrite)
    info = describe(out)
    info.update(source_model=args.model, **info_extra)
    _emit(args, [f"exported {info['quantized_modules']} packed layers (k={info['k']}) to {out}",
                 f"  packed layers {info['quantized_bytes'] / 1e6:.3f} MB, other tensors "
                 f"{info['other_tensor_bytes'] / 1e6:.3f} MB, directory {info['directory_bytes'] / 1e6:.3f} MB"])
    return info


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    from .quantize import RabitConfig, quantize_
    from .train import CheckpointMismatchError, load_student_weights, read_checkpoint

    ckpt = _checkpoint_file(args.checkpoint)
    meta, tensors = read_checkpoint(ckpt)
    # every quantized layer's row scale g is (k, out): a --k that differs is named before the model is loaded
    ks = sorted({int(t.shape[0]) for name, t in tensors.items() if name.endswith(".g") and t.ndim == 2})
    if len(ks) == 1 and ks[0] != args.k:
        raise CommandError(f"rabit: QAT checkpoint {str(ckpt)!r} has k={ks[0]} binary paths per layer, not --k "
                           f"{args.k}; pass --k {ks[0]}")
    out, model, tok = _prepare(args)
    # the skeleton only: the checkpoint overwrites latents and scales, so no init rounds are needed
    cfg = RabitConfig(k=args.k, include=tuple(args.include), exclude=tuple(args.exclude), init_iters=0)
    quantize_(model, cfg, progress=not args.quiet)
    try:
        load_student_weights(model, meta, tensors)
    except CheckpointMismatchError as e:
        raise CommandError(f"rabit: QAT checkpoint {str(ckpt)!r} does not fit --model {args.model!r} with --k "
                           f"{args.k} --include {args.include} --exclude {args.exclude} ({e.detail}); pass the "
                           "options the student was quantized with") from None
    return _pack_and_save(args, model, tok, out, checkpoint=str(ckpt), trained=True)


# ----------------------------------------------------------------------------------------------
# quantize: post-training (calibrated init only)


def add_quantize(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize", help="post-training 2-bit quantization (calibrated RaBiT init, no training) to a packed dir",
        description="Sample calibration sequences from the FP model itself (never a test split), run the "
                    "function-preserving init (I/O preconditioning + iterative residual SVID), pack and save. "
                    "Without QAT a 2-bit model is far from the FP one; train with `rabit train` for quality.")
    p.add_argument("--model", default="stories260k", help="base model (default stories260k)")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory (must not exist or be empty)")
    _add_layer_selection(p)
    p.add_argument("--init-iters", type=_non_negative_int, default=5, help="residual-SVID rounds (default 5)")
    p.add_argument("--calib-seqs", type=_non_negative_int, default=32,
                   help="teacher-sampled calibration sequences; 0 = no preconditioning (default 32)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="calibration sequence length (default 256)")
    _add_pack_options(p)
    _add_common(p)
    return p


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from .data import bos_token_id, generate_teacher_data
    from .quantize import RabitConfig, quantize_

    out, model, tok = _prepare(args)
    calib = None
    if args.calib_seqs:
        calib = generate_teacher_data(model, args.calib_seqs, args.seq_len, min(args.calib_seqs, 64),
                                      bos_token_id(model), seed=0, progress=not args.quiet)
    cfg = RabitConfig(k=args.k, include=tuple(args.include), exclude=tuple(args.exclude), init_iters=args.init_iters)
    quantize_(model, cfg, calib_input_ids=calib, progress=not args.quiet)
    return _pack_and_save(args, model, tok, out, checkpoint=None, trained=False,
                          calibration_sequences=int(args.calib_seqs))


# ----------------------------------------------------------------------------------------------
# eval


def add_eval(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="perplexity on WikiText-2 and/or zero-shot lm-eval tasks",
        description="Evaluate an exported (packed) directory or a full-precision model: --ppl gives the "
                    "WikiText-2 raw test perplexity (non-overlapping windows of --ctx tokens), --tasks runs "
                    "lm-eval-harness offline on the local task files.")
    p.add_argument("model", help="exported directory, or a model name/path as for `rabit export --model`")
    p.add_argument("--ppl", action="store_true", help="WikiText-2 raw test perplexity")
    p.add_argument("--ctx", type=_positive_int, default=2048, help="perplexity window (default 2048)")
    p.add_argument("--wikitext", metavar="FILE", default=None,
                   help="wiki.test.raw (default: $RABIT_SHARED/data/wikitext-2-raw/wiki.test.raw)")
    p.add_argument("--tasks", type=_task_list, default=None, metavar="T1,T2",
                   help="comma-separated lm-eval tasks (boolq, piqa, hellaswag, winogrande, arc_easy, "
                        "arc_challenge, openbookqa, lambada_openai) or 'all'")
    p.add_argument("--limit", type=_positive_int, default=None, help="items per task (default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="batch size (default 8)")
    p.add_argument("--task-data", metavar="DIR", default=None,
                   help="folder of the task files (default: $RABIT_TASK_DATA or the shared folder)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    _add_common(p)
    return p


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    if not args.ppl and not args.tasks:
        raise CommandError("rabit: nothing to evaluate; pass --ppl and/or --tasks")
    if args.wikitext is not None and not Path(args.wikitext).is_file():
        raise FileNotFoundError(f"rabit: --wikitext file {args.wikitext!r} not found")
    model, tok, kind = _load_any(args.model, device=args.device)
    if tok is None:
        raise CommandError(f"rabit: {args.model!r} has no tokenizer; re-export it with its tokenizer")
    result: dict[str, Any] = {"model": args.model, "kind": kind}
    lines = [f"{args.model} ({kind})"]
    if args.ppl:
        from .evaluate import wikitext2_perplexity

        ctx = min(args.ctx, getattr(model.config, "max_position_embeddings", args.ctx) or args.ctx)
        r = wikitext2_perplexity(model, tok, ctx=ctx, path=args.wikitext, batch_size=1, progress=not args.quiet)
        result["wikitext2"] = r.to_dict()
        lines.append(f"  WikiText-2 PPL (ctx {ctx}): {r.ppl:.3f} over {r.tokens} tokens")
    if args.tasks:
        from .lmeval import evaluate

        r = evaluate(model, tok, args.tasks, limit=args.limit, batch_size=args.batch_size, task_data=args.task_data)
        result["lm_eval"] = r
        for t, metrics in r["results"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr"))
            lines.append(f"  {t} (n={r['n_samples'].get(t)}): {shown}")
    _emit(args, lines)
    return result


# ----------------------------------------------------------------------------------------------
# generate


def add_generate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate", help="text generation from an exported directory (torch or NumPy runtime)",
        description="Greedy (or, with --temperature, sampled) continuation of --prompt. --runtime numpy runs the "
                    "torch-free rabit.runtime on an exported Llama directory; --runtime torch (default) runs the "
                    "PyTorch model (an exported directory or any model name/path).")
    p.add_argument("model", help="exported directory (or, with --runtime torch, a model name/path)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--runtime", choices=("torch", "numpy"), default="torch", help="backend (default torch)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sample at this temperature instead of greedy decoding (torch runtime, Llama-family "
                        "models: rabit.sampling's counter-based draws, reproducible from --seed on any device)")
    p.add_argument("--top-k", type=_positive_int, default=None, help="with --temperature: sample from the k most "
                                                                      "likely tokens only")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the sampled draws (default 0)")
    p.add_argument("--device", default="cpu",
                   help="torch device (default cpu); on cuda the model runs in fp16 with a static KV cache and "
                        "one CUDA graph per token (rabit.static_decode, the path of benchmarks/bench_decode.py)")
    p.add_argument("--compile", action="store_true",
                   help="fuse the elementwise glue with torch.compile, as benchmarks/bench_decode.py does on "
                        "CUDA (a one-time compilation of tens of seconds, counted in load_s with the CUDA-graph "
                        "capture: generate_s and tokens_per_s cover the prompt's prefill and the decoding)")
    p.add_argument("--head-dtype", choices=("float16", "bfloat16", "int8"), default=None,
                   help="compute the logits from a float16 / bfloat16 copy of lm_head, or from int8 blocks of it "
                        "(llama.cpp's Q8_0 kind, rabit.int8_linear: a quarter of the bytes, ~1e-2 relative error) "
                        "(CPU, Llama-family models: the largest matrix a small model reads per token; the logits "
                        "round otherwise than float32's, so a near-tie can decode otherwise; default: lm_head in "
                        "float32; --runtime numpy takes int8 only)")
    p.add_argument("--int8-activations", action="store_true",
                   help="packed Llama-family models: decode steps run the packed linears on int8 activations "
                        "(rabit.packed_linear_fused_i8, the class of llama.cpp's int8 activations): faster, at ~1e-2 "
                        "relative error per layer, so the tokens can differ from the default's; CPU: int8 tables "
                        "(--runtime numpy: rabit._core.packed_linear_i8, the same kernel); CUDA: int8 bit planes on "
                        "binary tensor cores")
    _add_common(p)
    return p


def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    sampled = args.temperature is not None
    if args.top_k is not None and not sampled:
        raise CommandError("rabit: --top-k needs --temperature (without it, generate decodes greedily)")
    if sampled and not args.temperature > 0:
        raise CommandError(f"rabit: --temperature must be > 0, got {args.temperature}")
    if args.runtime == "numpy":
        if sampled:
            raise CommandError("rabit: --runtime numpy decodes greedily; drop --temperature or use --runtime torch")
        if args.compile:
            raise CommandError("rabit: --runtime numpy has no --compile (it runs the NumPy kernels); drop it or use "
                               "--runtime torch")
        if args.head_dtype not in (None, "int8"):
            raise CommandError(f"rabit: --runtime numpy takes --head-dtype int8 only (NumPy has no fast "
                               f"{args.head_dtype} matmul); drop it or use --runtime torch")
        if not _is_export_dir(args.model):
            raise CommandError(f"rabit: --runtime numpy needs an exported rabit directory, got {args.model!r}; "
                           "export it first with `rabit export`")
        from . import runtime

        model, tok = runtime.load(args.model, int8_activations=args.int8_activations, head_dtype=args.head_dtype)
        if tok is None:
            raise CommandError(f"rabit: {args.model!r} was exported without a tokenizer")
        prompt_ids = tok.encode(args.prompt)
        t1 = time.perf_counter()
        ids = model.generate(prompt_ids, args.max_new_tokens, eos_token_id=getattr(tok, "eos_token_id", None))
        text = tok.decode(ids)
    else:
        import torch

        from .data import encode_text
        from .static_decode import SUPPORTED, StaticDecoder

        model, tok, _ = _load_any(args.model, device=args.device)
        if args.head_dtype and args.device.startswith("cuda"):
            raise CommandError("rabit: --head-dtype is for the CPU (on cuda the whole model runs in fp16); drop it")
        if args.int8_activations and torch.device(args.device).type not in ("cpu", "cuda"):
            raise CommandError(f"rabit: --int8-activations runs on the CPU and on CUDA, not on {args.device}; drop it")
        for flag, given in (("--compile", args.compile), ("--temperature", sampled), ("--head-dtype", args.head_dtype),
                            ("--int8-activations", args.int8_activations)):
            if given and model.config.model_type not in SUPPORTED:
                raise CommandError(f"rabit: {flag} applies to the static decoder of {', '.join(sorted(SUPPORTED))} "
                               f"models; {model.config.model_type!r} runs HF generate: drop {flag}")
        if tok is None:
            raise CommandError(f"rabit: {args.model!r} has no tokenizer; re-export it with its tokenizer")
        if args.device.startswith("cuda") and model.dtype not in (torch.float16, torch.bfloat16):
            model = model.half()  # 16-bit activations on the GPU (a bf16 model stays bf16)
        prompt_ids = encode_text(tok, args.prompt, bos=True)
        # HF and the static decoder would go on past the trained positions; the numpy runtime refuses, so does this
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and len(prompt_ids) + args.max_new_tokens > limit:
            raise CommandError(f"rabit: {len(prompt_ids)} prompt + {args.max_new_tokens} new tokens exceed the "
                               f"model's max_position_embeddings {limit}; shorten --prompt or --max-new-tokens")
        x = torch.tensor([prompt_ids])
        eos = getattr(tok, "eos_token_id", None)
        if model.config.model_type in SUPPORTED:  # static KV cache (+ CUDA graph on GPU)
            dec = StaticDecoder(model, batch_size=1, max_len=len(prompt_ids) + args.max_new_tokens + 1,
                                compile=args.compile, temperature=args.temperature, top_k=args.top_k,
                                head_dtype=args.head_dtype,
                                int8_activations=args.int8_activations).warm_up()  # one-time capture/compile: load time
            t1 = time.perf_counter()
            out = dec.generate(x, args.max_new_tokens, eos_token_id=eos, seed=args.seed)
        else:
            t1 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(x.to(args.device), attention_mask=torch.ones_like(x).to(args.device),
                                     max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=eos)
        ids = out[0].tolist()
        if eos is not None and eos in ids[len(prompt_ids):]:  # drop the EOS padding after the first EOS
            ids = ids[: ids.index(eos, len(prompt_ids)) + 1]
        text = tok.decode(ids, skip_special_tokens=True)
    t2 = time.perf_counter()
    new = len(ids) - len(prompt_ids)
    result = {"model": args.model, "runtime": args.runtime, "prompt": args.prompt, "text": text,
              "sampling": {"temperature": args.temperature, "top_k": args.top_k, "seed": args.seed} if sampled else None,
              "head_dtype": args.head_dtype, "int8_activations": args.int8_activations,
              "prompt_tokens": len(prompt_ids), "new_tokens": new,
              "load_s": round(t1 - t0, 4),
              "generate_s": round(t2 - t1, 4), "tokens_per_s": round(new / (t2 - t1), 2) if t2 > t1 else None}
    _emit(args, [text])
    return result


# ----------------------------------------------------------------------------------------------
# registration


COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], dict[str, Any]]]] = {
    "quantize": (add_quantize, run_quantize),
    "export": (add_export, run_export),
    "eval": (add_eval, run_eval),
    "generate": (add_generate, run_generate),
}
