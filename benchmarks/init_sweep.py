"""Which init settings should be the defaults? One stories260K quickstart run (400 coupled-QAT steps on the CPU) with
the RaBiT init changed in one setting, and the held-out KL / PPL / top-1 against the FP model after the init alone and
after training; prints one JSON line.

    python benchmarks/init_sweep.py SEED [alpha_in=A] [alpha_out=A] [init_iters=T] [latent_init=reconstruction] ...

Each KEY=VALUE sets a field of rabit.RabitConfig for this process: the quickstart builds its student with
RabitConfig(), so the sweep swaps in a subclass whose defaults are the chosen values (an experiment, not an option
of the quickstart). No arguments after the seed: the defaults.
"""
import dataclasses
import json
import sys

import rabit.quantize as Q
from rabit.quickstart import run_quickstart

seed, overrides = int(sys.argv[1]), {}
fields = {f.name: f for f in dataclasses.fields(Q.RabitConfig)}
for arg in sys.argv[2:]:
    key, _, value = arg.partition("=")
    if key not in fields:
        sys.exit(f"init_sweep.py: {key!r} is no RabitConfig field; use one of {sorted(fields)}")
    default = fields[key].default
    overrides[key] = type(default)(value) if not isinstance(default, str) else value
if overrides:
    Q.RabitConfig = dataclasses.make_dataclass(
        "SweptRabitConfig", [(k, type(v), dataclasses.field(default=v)) for k, v in overrides.items()],
        bases=(Q.RabitConfig,))
    Q.RabitConfig()  # the field checks of __post_init__, before any work
r = run_quickstart(steps=400, seed=seed, progress=False, report=False)
print(json.dumps({"seed": seed, "overrides": overrides, "init_only": r["init_only"],
                  "kl": r["rabit_2bit"]["kl_to_fp"], "ppl": r["rabit_2bit"]["ppl"], "fp_ppl": r["fp"]["ppl"],
                  "top1": r["rabit_2bit"]["top1_agreement"], "final_train_kl": r["train"]["final_kl"],
                  "train_s": r["timings"]["train_s"]}), flush=True)
