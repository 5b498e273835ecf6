"""Hash of the native sources (kernels/, csrc/), shared by setup.py and the import-time check.

setup.py bakes this hash into both extensions; ``import rabit`` recomputes it from the source tree
when one is present (an editable install) and refuses an extension built from other sources,
which would otherwise run stale kernels without a word.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

NATIVE_DIRS = ("kernels", "csrc")
NATIVE_SUFFIXES = (".c", ".h", ".cpp", ".cu", ".cuh")


def native_sources(root: Path) -> list[Path]:
    files = []
    for d in NATIVE_DIRS:
        files += [p for p in (root / d).rglob("*") if p.is_file() and p.suffix in NATIVE_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def source_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in native_sources(root):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]
