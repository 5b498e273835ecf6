"""benchmarks/sass_mix.py: the opcode counts per kernel, on a canned cuobjdump listing (no nvcc or GPU needed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import sass_mix as S  # noqa: E402

LISTING = """
\tcode for sm_90a
\t\tFunction : _Z3fooILi2EEvv
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
                                                                          /* 0x000e300000000800 */
        /*0010*/                   IMAD.SHL.U32 R67, R40, 0x200, RZ ;     /* 0x0000020028437824 */
        /*0020*/                   LOP3.LUT R68, R67, 0x80008000, R104, 0x6a, !PT ;
        /*0030*/              @!P0 LDG.E.64.CONSTANT R26, desc[UR10][R80.64+0x5b00] ;
        /*0040*/                   HMMA.16816.F32 R96, R68.reuse, R26, R96 ;
        /*0050*/                   HMMA.16816.F32 R76, R68, R66, R76 ;
        /*0060*/                   STL [R1+0x1c], R46 ;
        /*0070*/                   EXIT ;
\t\tFunction : _Z3barv
        /*0000*/                   IMMA.16832.S8.S8 R4, R8, R12, R4 ;
        /*0010*/                   EXIT ;
"""


def test_mixes_counts_opcodes_per_matching_kernel():
    got = dict(S.mixes(LISTING, r"foo"))
    assert list(got) == ["_Z3fooILi2EEvv"]
    ops = got["_Z3fooILi2EEvv"]
    # predicated instructions count under their opcode; encoding-only lines and suffixes are not instructions
    assert ops == {"LDC": 1, "IMAD": 1, "LOP3": 1, "LDG": 1, "HMMA": 2, "STL": 1, "EXIT": 1}
    assert dict(S.mixes(LISTING, r"bar"))["_Z3barv"]["IMMA"] == 1
    assert list(S.mixes(LISTING, r"nothing")) == []


WAITS = """
\t\tFunction : _Z4waitv
        /*0000*/                   LDG.E.U16.CONSTANT R18, desc[UR14][R2.64] ;
        /*0010*/               @P1 HADD2.F32 R17, -RZ, R18.H0_H0 ;
        /*0020*/                   LDG.E.U16.CONSTANT R18, desc[UR14][R4.64] ;
        /*0030*/               @P1 HADD2.F32 R20, -RZ, R18.H0_H0 ;
        /*0040*/                   LDG.E.128 R24, desc[UR14][R6.64] ;
        /*0050*/                   LDG.E.64 R30, desc[UR14][R8.64] ;
        /*0060*/                   IADD3 R10, R27, R31, RZ ;
        /*0070*/                   STG.E desc[UR14][R12.64], R10 ;
        /*0080*/                   LDG.E R40, desc[UR14][R14.64] ;
        /*0090*/                   EXIT ;
		Function : _Z5pathsv
        /*0000*/               @P0 LDG.E.128 R24, desc[UR14][R6.64] ;
        /*0010*/               @P0 BRA 0x60 ;
        /*0020*/                   BRA 0x60 ;
        /*0030*/                   ISETP.GE.U32.AND P5, PT, R25, R20, PT ;
        /*0040*/                   IMAD.MOV.U32 R26, RZ, RZ, R4 ;
        /*0050*/                   LDG.E R40, desc[UR14][R14.64] ;
        /*0060*/                   EXIT ;
"""


def test_waited_loads_counts_loads_read_before_the_next_load():
    # the two 16-bit loads are each read (converted) before the next load: waited one at a time; the 128-bit load is
    # still in flight when the 64-bit one issues (its registers R24..R27 are read only after); the 64-bit one is read
    # before the last load issues; the last load is never read
    (name, block), = S.functions(WAITS, r"wait")
    waited, total = S.waited_loads(block)
    assert total == 5 and len(waited) == 3
    assert waited[0] == ("/*0000*/                   LDG.E.U16.CONSTANT R18, desc[UR14][R2.64]",
                         "/*0010*/               @P1 HADD2.F32 R17, -RZ, R18.H0_H0")
    assert waited[2][0].endswith("LDG.E.64 R30, desc[UR14][R8.64]") and "IADD3" in waited[2][1]


def test_waited_loads_ends_a_path_at_an_unconditional_jump():
    # the ISETP after the unconditional BRA is another path's code: its R25 is not the load's, so nothing is waited
    (name, block), = S.functions(WAITS, r"paths")
    assert S.waited_loads(block) == ([], 2)
