"""Shared test harness.

Markers (declared in pyproject.toml):
- ``gpu``: needs one CUDA GPU; skipped with a reason on machines without one (CI).
- ``multigpu``: needs two or more GPUs in this host; skipped with a reason otherwise.

Fixtures / helpers:
- ``sm90``: pretends the current device is compute capability 9.0 so that kernels calling device
  functions can be compiled to sm_90 PTX on a CPU-only machine.
- ``run_on_ranks(fn, nranks, *args)``: runs ``fn(group, *args)`` in ``nranks`` spawned processes
  (one per GPU, rank r on GPU r % count) and returns their results; a failure on any rank fails the
  test with every rank's traceback. ``fn`` must live in an importable module (tests/gpu/workers_*.py).
"""
import os
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so spawned ranks can import tests' worker modules

import numba_ep  # noqa: E402,F401  (NumPy shim first)


from numba_ep.group import gpu_count  # noqa: E402

GPU_COUNT = gpu_count()


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible here)")
    few_gpu = pytest.mark.skip(reason=f"needs at least 2 CUDA GPUs in this host (found {GPU_COUNT})")
    for item in items:
        if "multigpu" in item.keywords and GPU_COUNT < 2:
            item.add_marker(few_gpu)
        elif "gpu" in item.keywords and GPU_COUNT < 1:
            item.add_marker(no_gpu)


@pytest.fixture
def sm90(monkeypatch):
    """Compile for sm_90 without a GPU: numba asks the current device for its compute capability."""
    import numba.cuda.dispatcher as dispatcher

    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=(9, 0)))
    yield (9, 0)


@pytest.fixture(scope="session")
def gpu_count():
    return GPU_COUNT


def run_on_ranks(fn, nranks, *args, timeout=600, **kwargs):
    """Run ``fn(group, *args, **kwargs)`` on ``nranks`` spawned ranks; return per-rank results."""
    from numba_ep.group import spawn

    return spawn(fn, nranks, *args, timeout=timeout, **kwargs)


@pytest.fixture
def ranks():
    """The ``run_on_ranks`` helper as a fixture."""
    return run_on_ranks
