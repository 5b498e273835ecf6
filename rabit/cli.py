"""The ``rabit`` command line: ``rabit <command> [options]`` (also ``python -m rabit``).

Each command is one ``_add_<name>`` function that declares its arguments and a ``_run_<name>``
function that does the work and returns a JSON-serialisable dict; ``main`` prints it with ``--json``.
New commands are added by putting them in ``COMMANDS`` (``export``, ``eval`` and ``generate`` come from
:mod:`rabit.cli_export`; ``quantize``, ``train`` and ``bench`` slot in the same way).
Exit status: 0 on success, 1 when the command fails with a known error, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._cli_args import CommandError
from ._cli_args import add_common as _add_common
from ._cli_args import non_negative_int as _non_negative_int
from ._cli_args import positive_int as _positive_int

# --------------------------------------------------------------------------------------------
# quickstart
# --------------------------------------------------------------------------------------------


def _add_quickstart(sub) -> argparse.ArgumentParser:
    from .quickstart import DEFAULT_STEPS  # light: no compiled code is imported

    p = sub.add_parser(
        "quickstart",
        help="quantize the bundled stories260K to 2 bits and compare it with the FP model",
        description="Sample distillation data from the FP stories260K model, quantize it with RaBiT "
                    "(calibrated init + coupled QAT), pack it to 2 bits and print FP vs 2-bit: perplexity "
                    "on held-out FP-generated text, KL and top-1 agreement with FP, weight bytes, tokens/s. "
                    "About 6 minutes on 2 CPU cores (AVX2).",
    )
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                   help=f"QAT steps (default {DEFAULT_STEPS})")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="keep teacher data, checkpoints, history.json and result.json here; "
                        "an interrupted run resumes from its last checkpoint")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")
    _add_common(p)
    return p


def _run_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    from .quickstart import run_quickstart

    return run_quickstart(out_dir=args.out, steps=args.steps, seed=args.seed, device=args.device,
                          progress=not args.quiet, report=not args.json)


# --------------------------------------------------------------------------------------------
# train: one row of the results table (rabit.experiment)
# --------------------------------------------------------------------------------------------


def _add_train(sub) -> argparse.ArgumentParser:
    from .experiment import METHODS, ExperimentConfig, add_config_arguments

    d = ExperimentConfig()
    p = sub.add_parser(
        "train", help="quantize + QAT a model with one method and report WikiText-2 PPL",
        description="Sample distillation data from the FP model (or take it from --text FILE), quantize with "
                    "METHOD, train on --tokens tokens, evaluate WikiText-2 perplexity (ctx 2048 and 4096); writes "
                    "OUT/result.json.")
    p.add_argument("--method", choices=METHODS, default=d.method, help="rabit (default) or a baseline")
    add_config_arguments(p, d)
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu",
                   help="torch device (default %(default)s: cuda where a GPU is found)")
    p.add_argument("--out", required=True, metavar="DIR")
    _add_common(p)
    return p


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_train(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .experiment import config_from_args, run_experiment

    cfg = config_from_args(args, method=args.method)
    try:
        res = run_experiment(cfg, args.out, device=args.device, progress=not args.quiet)
    except torch.OutOfMemoryError as e:
        # the default recipe (batch 32 x 512) peaks at ~15 GB on SmolLM2-135M compiled (the default on CUDA), ~36 GB
        # eager: more than many cards have
        first = (str(e).strip() or "out of memory").splitlines()[0]
        hint = "" if cfg.compile is not False else "drop --no-compile (compiled: ~15 GB), "
        raise CommandError(
            f"rabit train: out of GPU memory at batch {cfg.batch_size} x {cfg.train_len} ({first}). On SmolLM2-135M "
            "batch 32 needs ~15 GB compiled (the default on CUDA) and ~36 GB with --no-compile: "
            f"{hint}pass a smaller --batch-size (or a shorter --seq-len or --train-seq-len)") from e
    if not args.json:
        print(f"{res['method']} on {res['model']}: WikiText-2 PPL "
              + ", ".join(f"ctx {c}: {v['ppl']:.2f}" for c, v in res["wikitext2_ppl"].items())
              + f"; {res['train_tokens']:,} training tokens; result in {args.out}/result.json")
    return res


def _add_bench(sub) -> argparse.ArgumentParser:
    from .bench import add_arguments

    p = sub.add_parser("bench", help="time the packed CPU GEMV against torch F.linear (fp32, bf16)",
                       description="Llama-2-7B shapes, weights cycled past the cache, median of --reps calls; "
                                   "writes a JSON with the machine, versions and the baseline of the same run.")
    add_arguments(p)
    _add_common(p)
    return p


def _run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from .bench import run

    return run(args)


# name -> (add parser, run)
COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], dict[str, Any]]]] = {
    "quickstart": (_add_quickstart, _run_quickstart),
    "train": (_add_train, _run_train),
    "bench": (_add_bench, _run_bench),
}

# export, eval, generate live in their own module with the same (add parser, run) shape.
from .cli_export import COMMANDS as _EXPORT_COMMANDS

COMMANDS.update(_EXPORT_COMMANDS)


def _torch_missing(e: ImportError) -> bool:
    return e.name == "torch" or (e.name or "").startswith("torch.")


def _needs_torch(name: str) -> tuple[Callable, Callable[[argparse.Namespace], dict[str, Any]]]:
    """(add parser, run) of a command whose parser could not be built because torch is not installed: it still
    shows in --help, and running it says what to install, whatever its arguments."""

    def add(sub) -> argparse.ArgumentParser:
        # no option prefix: every argument, --options too, lands in `rest` instead of failing to parse
        p = sub.add_parser(name, help="(needs PyTorch, which is not installed)", add_help=False, prefix_chars="\0")
        p.add_argument("rest", nargs="*")
        return p

    def run(args: argparse.Namespace) -> dict[str, Any]:
        raise CommandError(_torch_message(name))

    return add, run


def _torch_message(command: str) -> str:
    return (f"rabit: `rabit {command}` needs PyTorch, which is not installed: pip install torch==2.13.0 (without it, "
            "`rabit generate DIR --prompt TEXT --runtime numpy` runs an exported model)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rabit",
        description="RaBiT: 2-bit residual-binarized LLMs by coupled QAT (arXiv 2602.05367).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add, run) in COMMANDS.items():
        try:  # each add_* imports what it needs before it creates its parser
            p = add(sub)
        except ImportError as e:  # torch-free install: the torch-free runtime still has its command
            if not _torch_missing(e):
                raise
            add, run = _needs_torch(name)
            p = add(sub)
        p.set_defaults(_run=run)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rabit")
    except PackageNotFoundError:
        return "(not installed)"


def _known_errors() -> tuple[type[BaseException], ...]:
    # ImportError: the compiled extension is missing or stale; its message says how to rebuild.
    # Anything else is a bug and keeps its traceback.
    known = (CommandError, ValueError, FileNotFoundError, FileExistsError, ImportError)
    try:
        from .train import TrainingDivergedError
    except ImportError as e:  # no torch: no training either
        if not _torch_missing(e):
            raise
        return known
    return known + (TrainingDivergedError,)


def _check_device(args: argparse.Namespace) -> None:
    """A --device torch does not know, or CUDA where torch sees no GPU: said before any work (the numpy runtime takes
    no device)."""
    device = getattr(args, "device", None)
    if device is None or getattr(args, "runtime", "torch") == "numpy":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CommandError(f"rabit: --device {device!r} is not a torch device; pass cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"rabit: --device {device}, but torch sees no CUDA GPU; pass --device cpu")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rabit`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2): argparse already printed why
        return int(e.code) if isinstance(e.code, int) else 2
    if getattr(args, "quiet", False):
        import logging

        logging.getLogger("rabit").setLevel(logging.ERROR)
    try:
        _check_device(args)
        result = args._run(args)
    except KeyboardInterrupt:
        print("rabit: interrupted", file=sys.stderr)
        return 130
    except _known_errors() as e:
        # torch missing at run time: a command whose parser needs no torch (quantize, eval, ...)
        msg = _torch_message(args.command) if isinstance(e, ImportError) and _torch_missing(e) else str(e)
        print(msg if msg.startswith("rabit:") else f"rabit: error: {msg}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
