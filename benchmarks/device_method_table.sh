#!/usr/bin/env bash
# The method table on the lent GPU machine (no network there): reassemble the SmolLM2 GGUF carried in
# parts (.gguf/, git-ignored; part_aa may already sit in /root/g from an earlier call), install the carried
# wheels, build rabit with its CUDA kernels unless it is already built, run the table in $TABLE_DIR and
# copy its JSON (not the multi-GB checkpoints) to $OUT; then the inter-path correlations of rabit and
# independent when both were run.
#   usage: [TABLE_DIR=/root/table] bash benchmarks/device_method_table.sh TOKENS METHOD... [-- METHOD_TABLE_ARGS...]
# TABLE_DIR keeps each method's checkpoint: a later call with another --seed or other data needs another TABLE_DIR
# (the trainer refuses to resume a checkpoint of a different run, and says so).
# The zero-shot tasks of the trained models run in a later call on the same warm machine:
# benchmarks/device_tasks.sh (training and the tasks of the FP and a 2-bit model do not fit one 10-minute call).
set -euo pipefail
tokens=$1; shift
methods=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do methods+=("$1"); shift; done
[ $# -gt 0 ] && shift
mkdir -p /root/g
g=/root/g/smol.gguf
if [ ! -f $g ]; then
  [ -f /root/g/part_aa ] || cp .gguf/part_aa /root/g/
  cat /root/g/part_aa .gguf/part_ab .gguf/part_ac > $g
fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $g" | sha256sum -c
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site RABIT_SMOLLM2_GGUF=$g RABIT_SHARED=/root/g/shared PYTHONUNBUFFERED=1 TQDM_DISABLE=1
cp -r .gguf/shared /root/g/ 2>/dev/null || true
if ! python3 -c "import torch; from rabit._ops import has_native_kernels as h; assert h('cuda')" 2>/dev/null; then
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
table=${TABLE_DIR:-/root/table}
python3 benchmarks/method_table.py --model smollm2-135m --tokens "$tokens" --methods "${methods[@]}" --out $table \
  "$@" 2>&1 | tee "$OUT/log.txt"
mkdir -p "$OUT/table"
cp $table/table.json "$OUT/table/"
for m in "${methods[@]}"; do cp $table/$m/result.json "$OUT/table/result_$m.json"; done
if [[ " ${methods[*]} " == *" rabit "* && " ${methods[*]} " == *" independent "* ]]; then
  python3 benchmarks/path_correlation.py --model smollm2-135m --table $table --methods rabit independent \
    --plot "$OUT/path_correlation_smollm2.png" --json "$OUT/path_correlation_smollm2.json" 2>&1 | tee -a "$OUT/log.txt"
fi
