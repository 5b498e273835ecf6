"""Inter-path correlations of trained method-table runs (checkpoints of benchmarks/method_table.py).

    python benchmarks/path_correlation.py --model stories260k --table DIR --methods rabit independent \
        --plot docs/path_correlation_stories260k.png --json benchmarks/results/path_correlation_...json
"""

import argparse
import copy
import json
from pathlib import Path

import torch

import rabit
from rabit.data import load_tokens
from rabit.diagnostics import path_correlations, plot_path_correlations
from rabit.experiment import TRAIN_SUBDIR, ExperimentConfig
from rabit.models import load_model
from rabit.train import CHECKPOINT_NAME, load_student_weights, read_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--table", required=True, help="output folder of benchmarks/method_table.py")
    ap.add_argument("--methods", nargs="+", default=["rabit", "independent"])
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--plot", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    table = Path(args.table)
    teacher, _ = load_model(args.model, device=args.device)
    # training data, not a test split
    ids = load_tokens(table / "teacher_data.safetensors")[: args.calib_seqs].to(args.device)
    results = {}
    for method in args.methods:
        student = copy.deepcopy(teacher)
        rabit.quantize_(student, ExperimentConfig(method=method).rabit_config(), progress=False)
        meta, tensors = read_checkpoint(table / method / TRAIN_SUBDIR / CHECKPOINT_NAME)
        load_student_weights(student, meta, tensors)
        results[method] = path_correlations(student, teacher, ids)
        mean = {k: sum(r[k] for r in results[method]) / len(results[method]) for k in ("corr_r1_y2", "corr_y1_y2")}
        print(f"{method:>12}: mean Corr(R1,y2) {mean['corr_r1_y2']:.3f}  mean Corr(y1,y2) {mean['corr_y1_y2']:.3f}")
    plot_path_correlations(results, args.plot)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    Path(args.json).write_text(json.dumps({"model": args.model, "device": device, "torch": torch.__version__,
                                           "calib_seqs": args.calib_seqs, "results": results},
                                          indent=1))


if __name__ == "__main__":
    main()
