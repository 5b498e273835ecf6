#!/usr/bin/env bash
# Where the wgmma prefill kernel's time goes (docs/kernels.md, "Where the time goes"): builds standalone timers of
# kernels/cuda/packed_prefill.cu at 4096 x 4096 (K = 2, fp16 x, M = 2048 and 128), each from a copy of the source
# with one stage left out, and prints the time per call of each. Needs nvcc and an H100/H200; run from the repository
# root: bash benchmarks/prefill_breakdown/run.sh
#   whole      the kernel as it is
#   nobuild    Ŵ built for the first two k-blocks only (the A registers are then reused): no build cost
#   nomma      no wgmma issued: loads, barriers and the build
#   loadsonly  neither: loads and barriers
#   xonly      loadsonly without the copies of h and the bit words: x by TMA and the barriers
#   noxload    loadsonly without the TMA of x: h and the bit words and the barriers
# The copies are edited with sed; each edit must change exactly one line, or the script stops (the source moved on).
# Timing: 5 warm-up calls, then 50 back-to-back launches between CUDA events (host work included, no graph).
set -euo pipefail
here=benchmarks/prefill_breakdown
work=$(mktemp -d)
mkdir -p "$work/cuda"
cp kernels/*.h "$work/"
cp kernels/cuda/*.cuh "$work/cuda/"
no_build='s/^        build(st, A);$/        if (i < 2) build(st, A);/'
no_mma='s/^            for (int nb = 0; nb < NB; nb++) wgmma_n128<T>(acc\[nb\], A\[j\], desc\[j\]\[nb\]);$/            for (int nb = 0; nb < NB; nb++) if (i < 0) wgmma_n128<T>(acc[nb], A[j], desc[j][nb]);/'
# (x, h and the bit words by TMA: the kernel's path where the bit rows are multiples of 16 bytes, as at 4096 x 4096)
x_only='s/^                    mbar_expect_tx(bar, L::x_stage + L::h_stage + (pair ? L::b_stage : 0));$/                    mbar_expect_tx(bar, L::x_stage);/;/^                    tma_load_2d(smem_u32(hsm + st \* K \* WG_BK), \&tmh, /d;s/^                    if (pair)$/                    if (false)/'
no_x='s/^                    mbar_expect_tx(bar, L::x_stage + L::h_stage + (pair ? L::b_stage : 0));$/                    mbar_expect_tx(bar, L::h_stage + (pair ? L::b_stage : 0));/;/^                    tma_load_2d(xs_s + st \* L::x_stage, \&tmx, kb \* WG_BK, /d'
declare -A edits=([whole]="" [nobuild]="$no_build" [nomma]="$no_mma" [loadsonly]="$no_build;$no_mma"
                  [xonly]="$no_build;$no_mma;$x_only" [noxload]="$no_build;$no_mma;$no_x")
declare -A nlines=([whole]=0 [nobuild]=1 [nomma]=1 [loadsonly]=2 [xonly]=5 [noxload]=4)
variants="whole nobuild nomma loadsonly xonly noxload"
for v in $variants; do
    src="$work/cuda/$v.cu"
    if [ -n "${edits[$v]}" ]; then sed "${edits[$v]}" kernels/cuda/packed_prefill.cu > "$src"; else cp kernels/cuda/packed_prefill.cu "$src"; fi
    changed=$(diff kernels/cuda/packed_prefill.cu "$src" | grep -c '^<' || true)
    if [ "$changed" != "${nlines[$v]}" ]; then
        echo "$v: expected ${nlines[$v]} edited line(s), got $changed: update the sed patterns in $0" >&2
        exit 1
    fi
    cat "$src" "$here/timer_main.cu" > "$work/cuda/${v}_all.cu"
    nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DRABIT_SM90A=1 --fmad=false --expt-relaxed-constexpr \
        -DVARIANT="\"$v\"" -I"$work/cuda" -o "$work/$v" "$work/cuda/${v}_all.cu" &
done
wait
nvidia-smi --query-gpu=name --format=csv,noheader
for v in $variants; do "$work/$v"; done
rm -rf "$work"
