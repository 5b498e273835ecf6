"""Helpers shared by the benchmarks: CUDA-graph and event timing with warm-up outside the timed region, the
device's measured copy bandwidth, and where and how a benchmark writes its JSON."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rabit.bench import cpu_flags, cpu_name
from rabit.data import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def device_tag(name: str) -> str:
    """A device name as a file-name part: "NVIDIA H200" -> "NVIDIA_H200"."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def write_result(doc, out: str | None, filename: str, quiet: bool = False) -> Path:
    """Write ``doc`` as JSON to ``out`` (a benchmark's --out), else $OUT (the GPU machine's return folder), else
    benchmarks/results/, atomically (a benchmark killed mid-write leaves the previous file); returns the path."""
    path = Path(out or os.environ.get("OUT") or RESULTS) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, doc)
    if not quiet:
        print(f"wrote {path}", flush=True)
    return path


def write_cpu_result(benchmark: str, method: str, rows: list, out: str | None, tag: str = "", **fields) -> Path:
    """A CPU benchmark's JSON: the processor (name and SIMD flags), torch's threads, the versions, the date (UTC),
    ``fields``, how it timed (``method``) and its ``rows``, written by :func:`write_result` as
    ``<benchmark>_<date>[_<tag>].json``."""
    doc = dict(benchmark=benchmark, device=cpu_name(), cpu_flags=cpu_flags(), threads=torch.get_num_threads(),
               **fields,
               versions=dict(torch=torch.__version__, python=platform.python_version()),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), method=method,
               rows=rows)
    return write_result(doc, out, f"{benchmark}_{datetime.date.today().isoformat()}{'_' + tag if tag else ''}.json")


def capture_graph(fns, min_calls=200):
    """A CUDA graph of the callables in `fns` back to back, repeated to at least `min_calls` calls, warmed up
    outside the capture; returns (graph, calls in it)."""
    calls = list(fns) * max(1, -(-min_calls // len(fns)))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # warm-up (and one-time kernel attributes) outside the capture
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    g.replay()
    torch.cuda.synchronize()
    return g, len(calls)


def replay_us(graph, calls):
    """One replay of a captured graph between CUDA events: µs per call."""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    graph.replay()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) * 1e3 / calls


def graph_time_us(fns, reps=30, min_calls=200):
    """(median, pstdev) time per call (µs) of the callables in `fns`, captured back to back in one CUDA graph
    (repeated to at least `min_calls` calls) and replayed `reps` times."""
    g, calls = capture_graph(fns, min_calls)
    times = [replay_us(g, calls) for _ in range(reps)]
    del g
    return statistics.median(times), statistics.pstdev(times)


def interleaved_graph_times_us(named_fns, rounds=30, min_calls=8):
    """{name: [µs per call, one per round]} for several variants, each captured in its own graph, replayed in
    turn round after round: the GPU's clock and temperature drift over a run (on an H100 the same fp16 layer
    measured 282-294 µs in three back-to-back runs), so ratios of variants are taken within a round, where each
    saw the same conditions, not between separate runs. `named_fns`: {name: callable or list of callables}."""
    graphs = {name: capture_graph(fns if isinstance(fns, (list, tuple)) else [fns], min_calls)
              for name, fns in named_fns.items()}
    times = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, (g, calls) in graphs.items():
            times[name].append(replay_us(g, calls))
    del graphs
    return times


def event_time_us(fn, reps=20, warmup=3):
    """Median time (µs) of fn() between CUDA events, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device="cuda"):
    """Measured copy bandwidth in GB/s, counting bytes read + written: a 1 GiB tensor copy in a CUDA graph
    (CPU: 256 MiB, wall clock, median of 10). The data is random, not zeros."""
    dev = torch.device(device)
    n = (1 << 30) if dev.type == "cuda" else (256 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    a.random_()
    b = torch.empty_like(a)
    if dev.type == "cuda":
        t_us, _ = graph_time_us([lambda: b.copy_(a)], reps=10, min_calls=5)
        return 2 * n / (t_us * 1e-6) / 1e9
    b.copy_(a)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times) / 1e9
