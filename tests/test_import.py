"""Import behaviour: no CUDA initialisation, and clear errors for a missing or stale extension."""

import shutil
import subprocess
import sys
from pathlib import Path

import rabit

ROOT = Path(rabit.__file__).resolve().parent.parent


def test_import_does_not_initialise_cuda():
    code = "import torch, rabit; assert not torch.cuda.is_initialized(); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _copy_checkout(tmp_path):
    dst = tmp_path / "checkout"
    for d in ("rabit", "kernels", "csrc"):
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    return dst


def _import_in(root, prelude=""):
    return subprocess.run([sys.executable, "-c", prelude + "import rabit"], capture_output=True, text=True, cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_stale_extension_is_refused(tmp_path):
    root = _copy_checkout(tmp_path)
    with open(root / "kernels" / "cpu" / "pack.c", "a") as f:
        f.write("\n/* an edit after the build */\n")
    r = _import_in(root)
    assert r.returncode != 0
    assert "rabit._C is stale" in r.stderr and "pip install --no-build-isolation -e ." in r.stderr


def test_missing_extension_is_reported(tmp_path):
    # an editable install maps rabit._C to the build's own file, so block the import instead of deleting it
    r = _import_in(_copy_checkout(tmp_path), "import sys; sys.modules['rabit._C'] = None; ")
    assert r.returncode != 0
    assert "rabit._C is missing" in r.stderr and "pip install --no-build-isolation -e ." in r.stderr


def test_fresh_copy_imports(tmp_path):
    r = _import_in(_copy_checkout(tmp_path))
    assert r.returncode == 0, r.stderr
