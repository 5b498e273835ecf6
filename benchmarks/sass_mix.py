"""Static SASS instruction mix of rabit's CUDA kernels, without a GPU.

Compiles one kernel source to a cubin (nvcc), disassembles it (cuobjdump -sass) and prints, for each kernel whose
mangled name matches a regular expression, its instruction count, its tensor-core instructions (HMMA / IMMA / BMMA),
instructions per MMA, local-memory spills (STL / LDL), the global loads that are read before the next one issues
(waited for one at a time: a latency chain; the thirty-sixth session found such chains in the row-scale, prologue,
CUDA-core and attention loads) and the most frequent opcodes. The counts are static (each
unrolled instruction once), so they compare versions of one kernel, not times; the thirty-fifth session found with
them that nvcc re-read parameters and rebuilt addresses in the fp16 decode loop (docs/kernels.md).

    python benchmarks/sass_mix.py 'gemv_f16_kernelILi2ELi2ELb0'            # kernels/cuda/packed_decode.cu, sm_90a
    python benchmarks/sass_mix.py prefill_wgmma --cu kernels/cuda/packed_prefill.cu
    python benchmarks/sass_mix.py gemv_i8 --cubin /tmp/decode.cubin          # an existing cubin

Needs nvcc and cuobjdump on PATH. This machine's CUDA toolkit has no cuobjdump; PyPI has it:
`pip download --no-deps nvidia-cuda-cuobjdump` and take nvidia/cu13/bin/cuobjdump from the wheel (a zip).
"""
import argparse
import collections
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
MMA = ("HMMA", "IMMA", "BMMA", "HGMMA", "IGMMA")
INSTR = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sass_of(cubin):
    return subprocess.run(["cuobjdump", "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout


def functions(sass, pattern):
    """(kernel name, its listing) for every function whose name matches pattern."""
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        if re.search(pattern, name):
            yield name, block


def mix(block):
    """Counter of the opcodes of one function's listing."""
    return collections.Counter(m.group(1) for m in map(INSTR.match, block.split("\n")) if m)


def mixes(sass, pattern):
    """(kernel name, Counter of opcodes) for every function whose name matches pattern."""
    for name, block in functions(sass, pattern):
        yield name, mix(block)


GLOBAL_LOAD = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?LDG(\S*)\s+R(\d+)")
REG = re.compile(r"\bR(\d+)\b")


def waited_loads(block):
    """(waited, total): the global loads (LDG) of one function whose first reader comes before the next LDG is
    issued, i.e. loads that a warp waits for one at a time, as (load, first reader) SASS lines, and the number of
    LDGs. Program order, with two cues of control flow (an unconditional jump ends a path; a register written before
    it is read was another path's), blind to the scheduler's latencies: a count to compare versions of one kernel.
    nvcc puts a dtype conversion right after its load (rabit's ld_any), so such loads ran one after another
    (thirty-sixth session)."""
    loads, first_read, pending = [], {}, {}  # load line numbers; load -> line of its first reader; register -> load
    lines = [line.split(";")[0] for line in block.split("\n") if INSTR.match(line)]
    for i, text in enumerate(lines):
        ins = INSTR.match(text)
        op, operands = ins.group(1), text[ins.end():]
        # the registers an instruction reads: after its first operand (the destination), or all of a store's
        dest, _, reads = ("", "", operands) if op.startswith("ST") else operands.partition(",")
        for r in REG.findall(reads):
            k = pending.pop(int(r), None)
            if k is not None and k not in first_read:
                first_read[k] = i
        for r in REG.findall(dest):  # overwritten unread (another path's use of the register)
            pending.pop(int(r), None)
        if op in ("BRA", "EXIT") and not re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+@", text):
            pending.clear()  # the next lines are another path: the loads are read after the jump, not there
        m = GLOBAL_LOAD.match(text)
        if m:
            width = 4 if ".128" in m.group(1) else 2 if ".64" in m.group(1) else 1
            loads.append(i)
            for r in range(int(m.group(2)), int(m.group(2)) + width):
                pending[r] = len(loads) - 1
    nxt = loads[1:] + [len(lines)]
    waited = [(lines[loads[k]].strip(), lines[first_read[k]].strip()) for k, line in enumerate(nxt)
              if first_read.get(k, line) < line]
    return waited, len(loads)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pattern", help="regular expression matched against the mangled kernel names")
    ap.add_argument("--cu", default="kernels/cuda/packed_decode.cu", help="source to compile (default: %(default)s)")
    ap.add_argument("--arch", default="sm_90a", help="nvcc -arch (default: %(default)s)")
    ap.add_argument("--cubin", help="disassemble this cubin instead of compiling --cu")
    ap.add_argument("--top", type=int, default=12, help="opcodes listed per kernel (default: %(default)s)")
    ap.add_argument("--waits", action="store_true", help="list each load waited for one at a time and its reader")
    args = ap.parse_args()
    missing = [t for t in (["cuobjdump"] if args.cubin else ["nvcc", "cuobjdump"]) if shutil.which(t) is None]
    if missing:
        sys.exit(f"sass_mix: {' and '.join(missing)} not on PATH (see this script's docstring for cuobjdump)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(args.cubin) if args.cubin else pathlib.Path(tmp) / "k.cubin"
        if not args.cubin:
            src = (ROOT / args.cu).resolve()
            if not src.is_file():
                sys.exit(f"sass_mix: no source {src}")
            print(f"compiling {src.relative_to(ROOT)} for {args.arch} (a minute or two) ...", flush=True)
            subprocess.run(["nvcc", "-std=c++17", "-O3", f"-arch={args.arch}", "-cubin", str(src), "-o", str(cubin)],
                           check=True, cwd=src.parent)
        found = False
        for name, block in functions(sass_of(cubin), args.pattern):
            found = True
            ops = mix(block)
            total, mma = sum(ops.values()), sum(ops[o] for o in MMA)
            per = f"{total / mma:.1f} per MMA" if mma else "no MMA"
            waited, ldg = waited_loads(block)
            print(f"{name}\n  {total} instructions, {mma} MMA ({per}), spills: STL {ops['STL']} LDL {ops['LDL']}, "
                  f"global loads waited for one at a time: {len(waited)} of {ldg}")
            print("  " + "  ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))
            if args.waits:
                for load, reader in waited:
                    print(f"    {load}\n      read by {reader}")
        if not found:
            sys.exit(f"sass_mix: no kernel matches {args.pattern!r}")


if __name__ == "__main__":
    main()
