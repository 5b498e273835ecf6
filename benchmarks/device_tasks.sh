#!/usr/bin/env bash
# lm-eval's zero-shot tasks (`rabit eval --tasks`) of the FP SmolLM2 and of the 2-bit models that
# benchmarks/device_method_table.sh trained in TABLE_DIR, on the lent GPU machine, in a later call on the same warm
# machine (it reuses the reassembled GGUF in /root/g, the carried wheels and the build). Each coupled model (rabit,
# rabit-plain, onebit) is exported with `rabit export --checkpoint TABLE_DIR/METHOD` and evaluated from the export;
# the results go to $OUT/tasks_<fp|method>.json, lm-eval's log to $OUT/tasks.log.
#   usage: TABLE_DIR=/root/table [TASKS=all] [LIMIT=N] bash benchmarks/device_tasks.sh fp|METHOD...
# Carry .whl and .gguf/shared (the task files are in .gguf/shared/data/tasks). Measured on an H200 (docs/results.md,
# "zero-shot tasks"): the whole task set takes ~2 min for the FP model and ~3.5 min for a 2-bit export, plus ~30 s
# for the export, so evaluate at most two models a call.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: TABLE_DIR=DIR [TASKS=all] [LIMIT=N] bash $0 fp|rabit|rabit-plain|onebit..." >&2; exit 2; }
g=/root/g/smol.gguf
[ -f $g ] || { echo "$g is missing: run benchmarks/device_method_table.sh first on this machine" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site RABIT_SMOLLM2_GGUF=$g RABIT_SHARED=/root/g/shared PYTHONUNBUFFERED=1 TQDM_DISABLE=1
cp -r .gguf/shared /root/g/ 2>/dev/null || true
table=${TABLE_DIR:-/root/table}
args=(--tasks "${TASKS:-all}" --batch-size 64 --device cuda --quiet --json)
[ -n "${LIMIT:-}" ] && args+=(--limit "$LIMIT")
for m in "$@"; do
  case $m in
    fp) model=smollm2-135m ;;
    rabit|rabit-plain|onebit)  # the coupled layers that `rabit export` rebuilds from a QAT checkpoint
      k=2; [ "$m" = onebit ] && k=1
      python3 -m rabit export --model smollm2-135m --checkpoint "$table/$m" --k $k --out "$table/export_$m" \
        --overwrite --quiet || { echo "export of $m failed"; continue; }
      model=$table/export_$m ;;
    *) echo "tasks: $m is not exported by rabit export (ptq: no checkpoint; independent, path-freeze: other layers); skipped"
       continue ;;
  esac
  start=$(date +%s)
  if python3 -m rabit eval "$model" "${args[@]}" > "$OUT/tasks_$m.json" 2>> "$OUT/tasks.log"; then
    echo "tasks of $m: $(( $(date +%s) - start )) s -> tasks_$m.json"
  else
    echo "lm-eval of $m failed (tasks.log)"
  fi
done
