"""benchmarks/bench_llamacpp_cpu.py: the re-quantization call it makes into llama.cpp, on a stand-in module (the real
llama-cpp-python is a source build, not a test dependency), and its errors."""

import json
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_llamacpp_cpu as B  # noqa: E402


def _fake_llama_cpp(rc=0):
    calls = []
    params = types.SimpleNamespace(ftype=None, allow_requantize=False, nthread=0)
    mod = types.SimpleNamespace(
        LLAMA_FTYPE_MOSTLY_Q2_K=10, LLAMA_FTYPE_ALL_F32=0,
        llama_model_quantize_default_params=lambda: params,
        llama_model_quantize=lambda src, dst, p: calls.append((src, dst, p.ftype, p.allow_requantize)) or rc)
    return mod, calls


def test_quantize_asks_llama_cpp_for_the_named_type_with_requantizing_allowed(tmp_path):
    mod, calls = _fake_llama_cpp()
    out = B.quantize(mod, Path("/m/a.gguf"), "Q2_K", tmp_path / "b.gguf")
    assert out == tmp_path / "b.gguf"
    assert calls == [(b"/m/a.gguf", str(tmp_path / "b.gguf").encode(), 10, True)]
    B.quantize(mod, Path("/m/a.gguf"), "F32", tmp_path / "c.gguf")
    assert calls[-1][2] == 0  # F32 is ALL_F32, not MOSTLY_F32


def test_quantize_names_an_unknown_type_and_a_failed_call(tmp_path):
    mod, _ = _fake_llama_cpp()
    with pytest.raises(SystemExit, match="no file type 'Q9_X'"):
        B.quantize(mod, Path("/m/a.gguf"), "Q9_X", tmp_path / "b.gguf")
    mod, _ = _fake_llama_cpp(rc=1)
    with pytest.raises(SystemExit, match="to Q2_K failed"):
        B.quantize(mod, Path("/m/a.gguf"), "Q2_K", tmp_path / "b.gguf")


def test_without_llama_cpp_it_says_how_to_build_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    with pytest.raises(SystemExit, match="pip install --no-deps llama-cpp-python"):
        B.main([])


def test_cpu_results_name_the_processor_and_its_simd_flags(tmp_path):
    """Every CPU benchmark's JSON (timing.write_cpu_result) records the processor's name and the SIMD flags the CPU
    kernels dispatch on: the project's VMs share a name and differ in AVX-512."""
    import timing
    from rabit.bench import SIMD_FLAGS, cpu_flags, cpu_name

    path = timing.write_cpu_result("probe", "none", [{"a": 1}], str(tmp_path), "t")
    doc = json.loads(Path(path).read_text())
    assert doc["device"] == cpu_name() != "" and doc["cpu_flags"] == cpu_flags()
    assert set(doc["cpu_flags"]) <= set(SIMD_FLAGS) and doc["rows"] == [{"a": 1}]
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni xsave\n")
    assert cpu_flags(str(info)) == ["avx2", "fma", "avx512f", "avx512_vnni"]
    assert cpu_flags(str(tmp_path / "missing")) == []
