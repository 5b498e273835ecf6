"""Shared test setup: a fresh seed per test (derived from a per-run base and the test's id, printed
on failure so any failure can be replayed with RABIT_TEST_SEED=<base>), and device discovery."""

import os
import random
import zlib

import numpy as np
import pytest
import torch

BASE_SEED = int(os.environ.get("RABIT_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"rabit test seed base: RABIT_TEST_SEED={BASE_SEED}"


@pytest.fixture(autouse=True)
def _seed(request):
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        rep.sections.append(("rabit seed", f"RABIT_TEST_SEED={BASE_SEED} (test seed {dict(item.user_properties).get('seed')})"))


def available_devices():
    """Devices to parametrize over: "cpu", and "cuda" (marked `cuda`, so that `pytest -m cuda` runs it) where a GPU
    and the CUDA kernels are there."""
    devs = ["cpu"]
    if torch.cuda.is_available() and torch.ops.rabit.residual_binarize.default.has_kernel_for_dispatch_key("CUDA"):
        devs.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return devs


def pytest_collection_modifyitems(config, items):
    # `cuda`-marked tests skip cleanly on machines without a GPU (CI)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
