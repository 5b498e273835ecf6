#!/usr/bin/env bash
# The method table on the lent GPU machine (no network there): reassemble the SmolLM2 GGUF carried in
# two halves (.gguf/, git-ignored), install the carried gguf wheel, build rabit, run the table.
#   usage: bash benchmarks/device_method_table.sh TOKENS METHOD...
set -euo pipefail
tokens=$1; shift
g=/root/g/smol.gguf
if [ ! -f $g ]; then cat /root/g/part_aa .gguf/part_ab .gguf/part_ac > $g; fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $g" | sha256sum -c
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site RABIT_SMOLLM2_GGUF=$g RABIT_SHARED=/root/g/shared PYTHONUNBUFFERED=1 TQDM_DISABLE=1
cp -r .gguf/shared /root/g/ 2>/dev/null || true
RABIT_NO_CUDA=${RABIT_NO_CUDA:-1} python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/method_table.py --model smollm2-135m --tokens "$tokens" --methods "$@" --out "$OUT/table" \
  2>&1 | tee "$OUT/log.txt"
