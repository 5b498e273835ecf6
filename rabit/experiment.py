"""One row of the results table: a method, a model, a token budget → a JSON of WikiText-2 PPL,
peak memory and time (``rabit train --model smollm2-135m --method rabit --out DIR``).

Methods, all in the same harness at the same token budget (rabit-method.md §7, issue "The RaBiT
method on a real model"):

    rabit         coupled QAT, calibrated init (I/O preconditioning + iterative residual SVID)
    rabit-plain   coupled QAT, plain init (greedy SVID, no preconditioning)
    independent   independent-latent two-path QAT (DB-LLM-style "standard" QAT), same init
    path-freeze   path freezing: path 1 (K = 1) trained alone for half the steps, frozen; path 2 fitted to
                  the weight residual and trained alone for the other half (rabit.path_freeze); norms and
                  biases train in both stages
    onebit        K = 1 (OneBit-style sign + two scale vectors) QAT, same init
    ptq           the calibrated init alone, no training

Every method but ptq and path-freeze first trains each decoder layer alone against its FP layer on the calibration
sequences (block-wise reconstruction, rabit.block_recon; ``block_steps``), then distils the whole model.

Training data is sampled from the FP teacher (LLM-QAT's data-free recipe) and calibration uses
the same sequences; the WikiText-2 test split is only ever evaluated.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

METHODS = ("rabit", "rabit-plain", "independent", "path-freeze", "onebit", "ptq")
# block-reconstruction steps per decoder layer where ExperimentConfig.block_steps is None (a method that trains)
DEFAULT_BLOCK_STEPS = 200
# where run_experiment's trainer writes (checkpoint, history) below the run folder; path freezing trains two stages,
# the second holding the final model. `rabit export --checkpoint` and benchmarks/path_correlation.py look there too.
TRAIN_SUBDIR = "train"
PATH_FREEZE_SUBDIRS = ("train_path1", "train_path2")
# how the teacher samples the training data: rabit.data.generate_teacher_data's argument -> ExperimentConfig's field
SAMPLING_FIELDS = {"temperature": "data_temperature", "top_k": "data_top_k", "start": "data_start",
                   "greedy_tokens": "data_greedy", "dtype": "data_dtype"}


@dataclass
class ExperimentConfig:
    model: str = "smollm2-135m"
    method: str = "rabit"
    # The defaults are the best SmolLM2 recipe measured (docs/results.md, 2026-11-26: WikiText-2 PPL 55.9 / 59.2 on two
    # seeds, 7-8 minutes per run on an H200 with the teacher data): 15 M tokens at batch 32 over 8,192 sequences
    # (3.6 epochs), cosine to zero. Batch 16 is better at equal tokens but not at equal time; the 2.5 M-token
    # all-methods table used --tokens 2.5e6 --batch-size 16 --data-seqs 1024 --min-lr-ratio 0.1.
    tokens: int = 15_000_000  # training tokens (steps = tokens / (batch * train_len))
    seq_len: int = 512  # length of the teacher-sampled sequences
    # train on the sequences cut into pieces of this many tokens (0: whole sequences); a divisor of seq_len. Pieces
    # after a sequence's first do not start with BOS. It isolates the effect of the training length at fixed data.
    train_seq_len: int = 0
    batch_size: int = 32
    data_seqs: int = 8192  # distinct teacher-sampled sequences (reused over epochs)
    calib_seqs: int = 64
    gen_batch: int = 512  # sequences sampled at once (one model call per token for the whole batch)
    # how the teacher samples its training sequences (rabit.data.generate_teacher_data)
    data_temperature: float = 1.0
    data_top_k: int | None = None
    data_start: str = "bos"  # or "random-token": LLM-QAT's uniformly drawn first token
    data_greedy: int = 0  # tokens after a random start taken by argmax (LLM-QAT: 3-5)
    # the precision the teacher samples in (rabit.data.SAMPLING_DTYPES): a half-precision copy samples about twice as
    # fast on a GPU; float32 is the teacher's own and what every run of docs/results.md before 2026-11-27 used
    data_dtype: str = "float32"
    # text that follows BOS in every teacher sequence before the sampling starts (rabit.data.generate_teacher_data's
    # prefix, tokenized without BOS): a prompt that steers the teacher toward a kind of text; None: BOS alone
    data_prefix: str | None = None
    # a UTF-8 text file to train and calibrate on instead of teacher samples: tokenized once, BOS at its start, cut
    # into rows of seq_len tokens, the first data_seqs of them used. Never an evaluation split.
    text: str | None = None
    # the init (RabitConfig): Gauss-Seidel rounds T, preconditioning exponents, what the latent starts as. rabit-plain
    # is the plain init (T = 0, no preconditioning) and takes none of the first three
    init_iters: int = 5
    alpha_in: float = 0.5
    alpha_out: float = 0.5
    latent_init: str = "pretrained"
    # block-wise reconstruction (rabit.block_recon) after the init, before the distillation: steps per decoder layer
    # on the calibration sequences (0: none), and whose inputs each layer learns from. None: DEFAULT_BLOCK_STEPS for
    # the methods that train every path at once, 0 for ptq (the init alone) and path-freeze (two stages of their
    # own). On SmolLM2 at 5 M tokens (docs/results.md, twenty-sixth session) 50 steps on the teacher's inputs lowered
    # the held-out KL by 7.1 % and 4.7 % on two seeds (PPL 60.9 / 60.5 against 70.1 / 65.5), 200 steps by 12.7 %
    # (PPL 58.7), at 16-69 s on an H200
    block_steps: int | None = None
    block_inputs: str = "teacher"
    # the sequences the block stage fits each layer on: the first block_seqs rows of the training data (None: the
    # calib_seqs calibration rows). More rows fit the layer map on more of the data at the same steps, rather than
    # cycling over the 64 calibration rows
    block_seqs: int | None = None
    lr_latent: float = 1e-3
    lr_scales: float = 1e-3
    # Muon's momentum and the latents' decoupled weight decay (TrainConfig's defaults); exposed for the sweeps of
    # docs/results.md
    muon_momentum: float = 0.95
    weight_decay: float = 0.0
    kl_temperature: float = 1.0  # the distillation's softmax temperature (the loss is scaled by its square)
    # train the token embeddings and lm_head (full precision) with the scales; frozen by default (LittleBit practice)
    train_embeddings: bool = False
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak learning rates (TrainConfig's default too)
    gamma: float = 0.0  # KL only: γ > 0 gave a higher held-out KL in short runs (quickstart sweep)
    optimizer: str = "muon"
    # torch.compile the decoder layers and the loss while training (TrainConfig.compile); "auto": on CUDA only
    compile: bool | str = "auto"
    ste: str = "identity"
    ppl_ctx: tuple[int, ...] = (2048, 4096)
    # WikiText-2 PPL (first ppl_ctx) this many times during training: PPL vs tokens. path-freeze evaluates every
    # steps // curve_points steps of each of its two stages, so its stage-2 points may sit off the others' grid.
    curve_points: int = 0
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"rabit train: unknown method {self.method!r}; use one of {METHODS}")
        if self.tokens < 0:
            raise ValueError("rabit train: tokens must be >= 0")
        if self.curve_points < 0:
            raise ValueError("rabit train: curve_points must be >= 0")
        from .data import check_sampling_options

        check_sampling_options(**{arg: getattr(self, f) for arg, f in SAMPLING_FIELDS.items()}, who="rabit train",
                               names=SAMPLING_FIELDS)
        if self.gen_batch < 1:
            raise ValueError(f"rabit train: gen_batch must be >= 1 (got {self.gen_batch})")
        defaults = {f.name: f.default for f in fields(self)}
        chosen = [f for f in (*SAMPLING_FIELDS.values(), "data_prefix") if getattr(self, f) != defaults[f]]
        if self.data_prefix == "":
            raise ValueError("rabit train: data_prefix must be non-empty text (None: BOS alone)")
        if self.data_prefix is not None and self.data_start != "bos":
            raise ValueError(f"rabit train: data_prefix follows BOS; it does not combine with "
                             f"data_start={self.data_start!r}")
        if self.text is not None and chosen:
            raise ValueError(f"rabit train: the teacher-sampling options ({', '.join(chosen)}) do not apply to training "
                             f"on a text file; drop them or the text")
        if self.train_seq_len and (self.train_seq_len < 2 or self.seq_len % self.train_seq_len):
            raise ValueError(f"rabit train: train_seq_len must be a divisor >= 2 of seq_len {self.seq_len} "
                             f"(got {self.train_seq_len})")
        set_init = [f for f in ("init_iters", "alpha_in", "alpha_out") if getattr(self, f) != defaults[f]]
        if self.method == "rabit-plain" and set_init:
            raise ValueError(f"rabit train: rabit-plain is the plain init (no Gauss-Seidel rounds, no preconditioning); "
                             f"{', '.join(set_init)} do not apply to it: drop them, or use --method rabit")
        from .block_recon import BLOCK_INPUTS
        from .init import check_init_options

        if not (self.block_steps is None or isinstance(self.block_steps, int) and self.block_steps >= 0):
            raise ValueError(f"rabit train: block_steps must be an int >= 0 or None (got {self.block_steps!r})")
        if self.block_inputs not in BLOCK_INPUTS:
            raise ValueError(f"rabit train: block_inputs must be one of {BLOCK_INPUTS} (got {self.block_inputs!r})")
        if not (self.block_seqs is None or isinstance(self.block_seqs, int) and 1 <= self.block_seqs):
            raise ValueError(f"rabit train: block_seqs must be an int >= 1 or None (got {self.block_seqs!r})")
        if self.block_steps and self.method in ("ptq", "path-freeze"):
            raise ValueError(f"rabit train: --block-steps trains each layer after the init; {self.method} does not "
                             f"(ptq is the init alone, path-freeze trains its paths in two stages): drop it")

        check_init_options("rabit train", self.init_iters, self.latent_init, self.ste)
        # the sizes, before train_config() divides the tokens by batch_size x seq_len
        for name in ("batch_size", "seq_len", "data_seqs", "calib_seqs"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"rabit train: {name} must be an int >= 1 (got {getattr(self, name)!r})")
        if self.block_seqs is not None and self.block_seqs > self.data_seqs:
            raise ValueError(f"rabit train: block_seqs {self.block_seqs} is more than the {self.data_seqs} training "
                             f"sequences (data_seqs); lower it or raise data_seqs")
        if self.block_steps_run and self.block_seqs is None and self.text is None and self.calib_seqs > self.data_seqs:
            # caught here, before the teacher data are sampled (a text file's row count is checked when it is read)
            raise ValueError(f"rabit train: the block stage fits each layer on {self.calib_seqs} sequences (the "
                             f"calibration rows) but data_seqs is {self.data_seqs}; raise data_seqs, or pass "
                             f"--block-seqs N (N <= data_seqs) or --block-steps 0")
        try:
            self.train_config()
        except ValueError as e:  # the trainer's own check, named for this command
            raise ValueError(str(e).replace("rabit: TrainConfig:", "rabit train:")) from None
        if self.method == "path-freeze" and self.steps < 2:
            raise ValueError("rabit train: path-freeze trains two stages; give it tokens for at least 2 steps")

    def train_config(self):
        """The trainer's :class:`rabit.train.TrainConfig` of this experiment (steps >= 1 even for ptq, which does
        not train: the config is built in ``__post_init__`` too, so that a bad option fails before any work)."""
        from .train import TrainConfig

        steps = max(1, self.steps)
        return TrainConfig(steps=steps, batch_size=self.batch_size, lr_latent=self.lr_latent,
                           lr_scales=self.lr_scales, min_lr_ratio=self.min_lr_ratio, gamma=self.gamma,
                           muon_momentum=self.muon_momentum, weight_decay=self.weight_decay,
                           kl_temperature=self.kl_temperature, freeze_embeddings=not self.train_embeddings,
                           optimizer=self.optimizer, compile=self.compile, seed=self.seed,
                           log_every=max(1, steps // 50), checkpoint_every=max(1, steps // 4))

    def sampling_kwargs(self) -> dict[str, Any]:
        """How the teacher samples the training data: keyword arguments of rabit.data.cached_teacher_data."""
        return {arg: getattr(self, f) for arg, f in SAMPLING_FIELDS.items()} | {"seed": self.seed}

    @property
    def block_steps_run(self) -> int:
        """The block-reconstruction steps per layer this run takes (block_steps resolved for the method)."""
        if self.block_steps is not None:
            return self.block_steps
        return 0 if self.method in ("ptq", "path-freeze") else DEFAULT_BLOCK_STEPS

    @property
    def block_rows(self) -> int:
        """How many rows of the training data the block stage fits each layer on (block_seqs resolved)."""
        return self.calib_seqs if self.block_seqs is None else self.block_seqs

    @property
    def train_len(self) -> int:
        """Tokens per training sequence."""
        return self.train_seq_len or self.seq_len

    @property
    def steps(self) -> int:
        return 0 if self.method == "ptq" else max(1, round(self.tokens / (self.batch_size * self.train_len)))

    def rabit_config(self):
        from .quantize import RabitConfig

        plain = self.method == "rabit-plain"
        return RabitConfig(
            k=1 if self.method in ("onebit", "path-freeze") else 2,  # path freezing: stage 1 is one path
            latents="independent" if self.method == "independent" else "coupled",
            init_iters=0 if plain else self.init_iters,
            alpha_in=0.0 if plain else self.alpha_in,
            alpha_out=0.0 if plain else self.alpha_out,
            latent_init=self.latent_init,
            ste=self.ste,
        )


def add_config_arguments(p, d: ExperimentConfig | None = None) -> None:
    """The options of one experiment (``rabit train`` and ``benchmarks/method_table.py`` share them)."""
    from ._cli_args import non_negative_int, positive_int, token_count
    from .block_recon import BLOCK_INPUTS
    from .data import DATA_STARTS, SAMPLING_DTYPES
    from .init import LATENT_INITS
    from .reference import STE_VARIANTS

    d = d or ExperimentConfig()
    p.add_argument("--model", default=d.model, help=f"model name or path (default {d.model})")
    p.add_argument("--tokens", type=token_count, default=d.tokens, help="training tokens (default %(default).3g)")
    p.add_argument("--seq-len", type=positive_int, default=d.seq_len, help="length of the teacher-sampled sequences (default %(default)s)")
    p.add_argument("--train-seq-len", type=non_negative_int, default=d.train_seq_len,
                   help="train on the sequences cut into pieces of this length, a divisor of --seq-len "
                        "(default 0: whole sequences)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="sequences per training step (default %(default)s)")
    p.add_argument("--data-seqs", type=positive_int, default=d.data_seqs,
                   help="teacher-sampled sequences, reused over epochs (default %(default)s)")
    p.add_argument("--data-temperature", type=float, default=d.data_temperature,
                   help="sampling temperature of the teacher data (default %(default)s)")
    p.add_argument("--data-top-k", type=positive_int, default=d.data_top_k,
                   help="sample the teacher data from its k most likely tokens only (default: all)")
    p.add_argument("--data-start", choices=DATA_STARTS, default=d.data_start,
                   help="how teacher sequences begin: BOS, or BOS and a token drawn uniformly from the vocabulary "
                        "(LLM-QAT) (default %(default)s)")
    p.add_argument("--data-greedy", type=non_negative_int, default=d.data_greedy, metavar="N",
                   help="with --data-start random-token: take the N tokens after it by argmax, then sample "
                        "(LLM-QAT: 3-5; default %(default)s)")
    p.add_argument("--data-dtype", choices=SAMPLING_DTYPES, default=d.data_dtype,
                   help="precision the teacher samples its data in: a half-precision copy is about twice as fast on "
                        "a GPU (default %(default)s, the teacher's own)")
    p.add_argument("--data-prefix", default=d.data_prefix, metavar="TEXT",
                   help="begin every teacher sequence with this text after BOS (a prompt that steers the teacher, "
                        "e.g. a chat request; its tokens stay in the training rows; default: BOS alone)")
    p.add_argument("--gen-batch", type=positive_int, default=d.gen_batch,
                   help="teacher sequences sampled at once (default %(default)s)")
    p.add_argument("--text", default=d.text, metavar="FILE",
                   help="train and calibrate on this UTF-8 text file instead of teacher-sampled data: rows of "
                        "--seq-len tokens, at most --data-seqs of them (never an evaluation split)")
    p.add_argument("--lr-latent", type=float, default=d.lr_latent, help="Muon learning rate of the latent weights (default %(default)g)")
    p.add_argument("--lr-scales", type=float, default=d.lr_scales, help="AdamW learning rate of scales and norms (default %(default)g)")
    p.add_argument("--muon-momentum", type=float, default=d.muon_momentum,
                   help="Muon's momentum for the latent weights (default %(default)g)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="decoupled weight decay of the latent weights, never of scales or norms (default %(default)g)")
    p.add_argument("--kl-temperature", type=float, default=d.kl_temperature,
                   help="softmax temperature of the distillation KL, scaled by its square (default %(default)g)")
    p.add_argument("--train-embeddings", action="store_true", default=d.train_embeddings,
                   help="also train the full-precision token embeddings and lm_head (AdamW at --lr-scales)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="cosine floor as a fraction of the peak learning rates (default %(default)s)")
    p.add_argument("--gamma", type=float, default=d.gamma, help="hidden-state MSE weight (default %(default)g)")
    p.add_argument("--init-iters", type=non_negative_int, default=d.init_iters, metavar="T",
                   help="Gauss-Seidel rounds of the residual SVID init (default %(default)s; 0: greedy SVID)")
    p.add_argument("--alpha-in", type=float, default=d.alpha_in,
                   help="the init's preconditioning exponent of the input-activation RMS (default %(default)s)")
    p.add_argument("--alpha-out", type=float, default=d.alpha_out,
                   help="the init's preconditioning exponent of the output-gradient RMS (default %(default)s)")
    p.add_argument("--latent-init", choices=LATENT_INITS, default=d.latent_init,
                   help="what the latent weight starts as: the pretrained W, or the init's reconstruction "
                        "(default %(default)s)")
    p.add_argument("--block-steps", type=non_negative_int, default=d.block_steps, metavar="N",
                   help="after the init, train each decoder layer alone for N steps to reproduce its FP layer on the "
                        f"calibration sequences (block-wise reconstruction; default {DEFAULT_BLOCK_STEPS}, 0 for ptq "
                        "and path-freeze, which take no other value)")
    p.add_argument("--block-seqs", type=positive_int, default=d.block_seqs, metavar="N",
                   help="with --block-steps: fit each layer on the first N training sequences (default: the "
                        f"{d.calib_seqs} calibration sequences)")
    p.add_argument("--block-inputs", choices=BLOCK_INPUTS, default=d.block_inputs,
                   help="with --block-steps: each layer learns from the teacher's inputs to it, or from the "
                        "student's earlier layers' outputs (default %(default)s)")
    p.add_argument("--ste", choices=STE_VARIANTS, default=d.ste,
                   help="straight-through estimator of the binarization's backward (default %(default)s)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                   help="torch.compile the decoder layers and the loss while training: faster steps and less memory "
                        "after a one-time compile (TrainConfig.compile; default: on CUDA, not on the CPU)")
    p.add_argument("--seed", type=non_negative_int, default=d.seed, help="seed of the teacher data and training (default %(default)s)")
    p.add_argument("--curve", type=non_negative_int, default=d.curve_points, metavar="N",
                   help="also evaluate WikiText-2 PPL (ctx 2048; method_table.py: its first --ctx) N times during "
                        "training: the PPL-vs-tokens curve in result.json (default 0: only at the end)")


def config_from_args(args, **overrides: Any) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of options added by :func:`add_config_arguments`."""
    return ExperimentConfig(model=args.model, tokens=int(args.tokens), seq_len=args.seq_len,
                            train_seq_len=args.train_seq_len,
                            batch_size=args.batch_size, data_seqs=args.data_seqs,
                            data_temperature=args.data_temperature, data_top_k=args.data_top_k,
                            data_start=args.data_start, data_greedy=args.data_greedy,
                            data_dtype=args.data_dtype, data_prefix=args.data_prefix, gen_batch=args.gen_batch,
                            text=args.text,
                            lr_latent=args.lr_latent, lr_scales=args.lr_scales, min_lr_ratio=args.min_lr_ratio,
                            muon_momentum=args.muon_momentum, weight_decay=args.weight_decay,
                            kl_temperature=args.kl_temperature, train_embeddings=args.train_embeddings,
                            gamma=args.gamma, init_iters=args.init_iters, alpha_in=args.alpha_in,
                            alpha_out=args.alpha_out, latent_init=args.latent_init, ste=args.ste,
                            block_steps=args.block_steps, block_inputs=args.block_inputs,
                            block_seqs=args.block_seqs,
                            compile=args.compile, seed=args.seed, curve_points=args.curve,
                            **overrides)


def training_data(cfg: ExperimentConfig, teacher, tok, cache_dir: str | Path, device, progress: bool = True
                  ) -> torch.Tensor:
    """The training (and calibration) sequences ``LongTensor[n, seq_len]`` of an experiment: the first
    ``cfg.data_seqs`` rows of ``cfg.text`` when it is set, else ``cfg.data_seqs`` sequences sampled from the teacher
    (cached in ``cache_dir/teacher_data.safetensors``)."""
    from .data import bos_token_id, cached_teacher_data, encode_text, tokens_from_text_file

    if cfg.text is not None:
        rows = tokens_from_text_file(cfg.text, tok, cfg.seq_len)
        print(f"rabit train: {cfg.text}: {rows.numel():,} tokens in {len(rows)} rows of {cfg.seq_len}; training on "
              f"{min(len(rows), cfg.data_seqs)} of them" + (" (--data-seqs)" if len(rows) > cfg.data_seqs else ""),
              flush=True)
        return rows[: cfg.data_seqs]
    prefix = []
    if cfg.data_prefix:
        prefix = encode_text(tok, cfg.data_prefix, bos=False)
        print(f"rabit train: every teacher sequence begins with BOS and the {len(prefix)} tokens of {cfg.data_prefix!r}",
              flush=True)
    return cached_teacher_data(Path(cache_dir) / "teacher_data.safetensors", teacher, cfg.data_seqs, cfg.seq_len,
                               cfg.gen_batch, bos_token_id(teacher), model_name=cfg.model, device=device, progress=progress,
                               prefix=prefix, **cfg.sampling_kwargs())


def _peak_memory(dev: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, device: str = "cuda", progress: bool = True,
                   teacher_data: torch.Tensor | None = None, heldout: torch.Tensor | None = None) -> dict[str, Any]:
    """Quantize, train and evaluate one method; writes ``result.json`` in ``out_dir`` and returns it.

    ``heldout`` ([N, T] sequences sampled from the teacher with another seed) adds KL, top-1 agreement
    and perplexity against the teacher: the measure for models WikiText does not fit (stories260K);
    pass ``cfg.ppl_ctx=()`` to skip WikiText."""
    from .data import make_output_dir, write_json_atomic
    from .evaluate import perplexity, wikitext2_ids
    from .models import load_model
    from .quantize import quantize_
    from .train import CHECKPOINT_NAME, train

    from ._ops import has_native_kernels, use_reference_kernels

    out = make_output_dir(out_dir)
    dev = torch.device(device)
    kernels = "native"
    if not has_native_kernels(dev.type):
        # a CPU-only build on a GPU machine: run the plain-PyTorch reference ops there, and say so
        print(f"rabit train: no compiled rabit kernels for {dev.type}; using rabit.reference ops", flush=True)
        use_reference_kernels(dev.type)
        kernels = "reference"
    t_all = time.perf_counter()
    teacher, tok = load_model(cfg.model, device=str(dev))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # tokenized once (the curve and the final numbers), and first: a missing WikiText file is said before the work
    wiki_ids = wikitext2_ids(tok) if cfg.ppl_ctx else None
    t0 = time.perf_counter()
    if teacher_data is None:
        teacher_data = training_data(cfg, teacher, tok, out, dev, progress)
    data_s = time.perf_counter() - t0

    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    calib_rows = teacher_data[: cfg.calib_seqs].to(dev)  # whole sequences, before any train_seq_len cut
    if cfg.block_steps_run and cfg.block_rows > len(teacher_data):
        raise ValueError(f"rabit train: the block stage wants {cfg.block_rows} sequences (block_seqs) but the training "
                         f"data has {len(teacher_data)}; lower block_seqs")
    block_rows = teacher_data[: cfg.block_rows]  # whole sequences too; moved to the device by the block stage
    calib = calib_rows if cfg.method != "rabit-plain" else None
    if cfg.train_seq_len and cfg.train_seq_len != teacher_data.shape[1]:  # after the calibration rows: whole sequences
        if teacher_data.shape[1] % cfg.train_seq_len:
            raise ValueError(f"rabit train: train_seq_len {cfg.train_seq_len} does not divide the teacher sequences' "
                             f"length {teacher_data.shape[1]}")
        teacher_data = teacher_data.reshape(-1, cfg.train_seq_len)
    quantize_(student, cfg.rabit_config(), calib_input_ids=calib, progress=progress)
    init_s = time.perf_counter() - t0
    blocks, blocks_s = [], 0.0
    # a run resumed from its checkpoint loads the trained layers there: the block stage would be thrown away
    resuming = cfg.method != "path-freeze" and (out / TRAIN_SUBDIR / CHECKPOINT_NAME).is_file()
    if resuming and cfg.block_steps_run:
        print(f"rabit train: resuming from {out / TRAIN_SUBDIR / CHECKPOINT_NAME}; skipping the block reconstruction",
              flush=True)
    if cfg.block_steps_run and not resuming:
        from .block_recon import reconstruct_blocks

        t0 = time.perf_counter()
        # by default the init's calibration sequences (rabit-plain's init takes none; it gets the same rows here)
        blocks = reconstruct_blocks(student, teacher, block_rows, cfg.train_config(),
                                    cfg.block_steps_run, cfg.block_inputs, progress=progress)
        blocks_s = time.perf_counter() - t0

    eval_fn, eval_every = None, 0
    if cfg.curve_points and cfg.ppl_ctx and cfg.steps:
        def eval_fn(model, ctx=cfg.ppl_ctx[0]):
            return {f"wikitext2_ppl_{ctx}": float(perplexity(model, wiki_ids, ctx=ctx, progress=False))}

        eval_every = max(1, cfg.steps // cfg.curve_points)
    init_eval = None
    if eval_fn is not None:
        from .train import _evaluate

        init_eval = _evaluate(student, eval_fn)  # the curve's first point: the init alone
    train_res, train_s, train_peak = None, 0.0, None
    if cfg.steps:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        tc = cfg.train_config()
        t0 = time.perf_counter()
        if cfg.method == "path-freeze":
            # half the budget on path 1 alone, then path 2 fitted to the residual and trained alone
            from .path_freeze import add_residual_path_

            half = cfg.steps // 2
            first = train(student, teacher, teacher_data, replace(tc, steps=half,
                          checkpoint_every=max(1, half // 2)), out_dir=out / PATH_FREEZE_SUBDIRS[0], progress=progress,
                          eval_fn=eval_fn, eval_every=eval_every)
            add_residual_path_(student, teacher)
            rest = cfg.steps - half
            train_res = train(student, teacher, teacher_data, replace(tc, steps=rest, seed=cfg.seed + 1,
                              checkpoint_every=max(1, rest // 2)), out_dir=out / PATH_FREEZE_SUBDIRS[1], progress=progress,
                              eval_fn=eval_fn, eval_every=eval_every)
            for h in train_res.history:
                h["step"] += half
                h["tokens"] = h["step"] * cfg.batch_size * cfg.train_len
            train_res.history = first.history + train_res.history
            eval_total = sum(r.eval_s for r in (first, train_res))
        else:
            train_res = train(student, teacher, teacher_data, tc, out_dir=out / TRAIN_SUBDIR, progress=progress,
                              eval_fn=eval_fn, eval_every=eval_every)
            eval_total = train_res.eval_s
        # training time without the curve's evaluations (checkpoint writes stay in)
        train_s = time.perf_counter() - t0 - eval_total
        train_peak = _peak_memory(dev)

    agreement = None
    if heldout is not None:
        from .evaluate import compare_to_teacher

        agreement = compare_to_teacher(student, teacher, heldout.to(dev))
    ppl = {}
    for ctx in cfg.ppl_ctx:
        r = perplexity(student, wiki_ids, ctx=ctx, progress=progress)
        ppl[str(ctx)] = {"ppl": float(r), "tokens": r.tokens, "windows": r.windows,
                         "nll_by_position": r.nll_by_position}
    res = {
        "model": cfg.model,
        "method": cfg.method,
        "config": asdict(cfg),
        "steps": cfg.steps,
        "train_tokens": cfg.steps * cfg.batch_size * cfg.train_len,
        "wikitext2_ppl": ppl,
        "heldout_vs_teacher": agreement,
        "train_peak_memory_bytes": train_peak,
        "block_steps": cfg.block_steps_run,
        "block_seqs": cfg.block_rows if cfg.block_steps_run else 0,
        "block_reconstruction": blocks,
        "time_s": {"data": round(data_s, 1), "init": round(init_s, 1), "blocks": round(blocks_s, 1),
                   "train": round(train_s, 1),
                   "total": round(time.perf_counter() - t_all, 1)},
        "history": train_res.history if train_res is not None else [],
        # WikiText-2 PPL against training tokens (curve_points > 0): the init's value, then each evaluation
        "ppl_curve": ([{"tokens": 0, **init_eval}] if init_eval else []) + [
            {"tokens": h["tokens"], **h["eval"]} for h in (train_res.history if train_res else []) if "eval" in h],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "kernels": kernels,
        "compiled": bool(train_res and train_res.compiled),  # compile="auto" resolved
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "note": "SmolLM2-135M-Instruct dequantized from Q4_1 is the FP reference" if "smollm2" in cfg.model else "",
    }
    write_json_atomic(out / "result.json", res)
    return res
