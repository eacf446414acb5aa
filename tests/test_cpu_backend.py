"""The CPU backend (numba_ep.cpu): numba_ep.Buffer with NumPy arrays on a machine without a GPU.

The very suites the GPU tests run (tests/gpu/workers_intranode.py: BF16 and FP8, with and without
top-k, cached handles, expert_alignment 128, num_worst_tokens, biases, rings that wrap, 0 and 1
tokens, a rank that receives nothing, top-16) run here through spawned CPU ranks, and must match
numba_ep.reference bit for bit in dispatch and within one BF16 rounding in combine. Torch cases
use CPU tensors (they skip where torch is not installed). NUMBA_EP_BACKEND=cpu forces the backend
even where a GPU is visible.
"""
import os
import secrets

import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep.group import spawn

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu", "workers_intranode.py")


def _has_torch():
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("NUMBA_EP_BACKEND", "cpu")  # spawned ranks inherit it


@pytest.mark.parametrize("nranks", [1, 2, 3])
@pytest.mark.parametrize("suite", ["bf16", "fp8", "edge"])
def test_buffer_suites_on_the_cpu(cpu_backend, nranks, suite):
    seed = secrets.randbits(31)
    print(f"seed = {seed}")
    results = spawn(f"{WORKERS}:run_suite", nranks, suite, seed, timeout=300, group_timeout=200)
    assert len(results) == nranks
    names = [[name for name, _ in r] for r in results]
    assert all(n == names[0] for n in names)
    moved = [n for r in results for _, n in r if isinstance(n, int)]
    assert len(moved) >= 2 and any(n > 0 for n in moved), results
    if _has_torch():  # torch CPU tensors run too; without torch those cases say they skipped
        assert len(moved) == sum(len(r) for r in results), results


def test_buffer_picks_the_cpu_backend(cpu_backend):
    from numba_ep import Buffer

    buf = Buffer(None, 1 << 20)  # a one-rank group
    assert buf.backend == "cpu" and buf.device is None and buf.group_size == 1
    assert "cpu backend" in repr(buf)
    assert Buffer.capture().event is None


LL_WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers_cpu_backend.py")


@pytest.mark.parametrize("nranks", [1, 2, 3])
def test_low_latency_on_the_cpu(cpu_backend, nranks):
    """FP8 (plain, UE8M0) and BF16 dispatch, hooks, zero-copy, out=, LogFMT, 0 and 1 tokens:
    dispatch as the reference (any block order), combine bit-exact with it and within DeepEP's
    end-to-end bound of x * sum of the weights; cumulative stats add up."""
    seed = secrets.randbits(31)
    print(f"seed = {seed}")
    results = spawn(f"{LL_WORKERS}:ll_suite", nranks, seed, timeout=300, group_timeout=200)
    assert len(results) == nranks
    assert all(len(r["moved"]) == 5 for r in results)
    if _has_torch():
        assert all(r["torch_diff"] == 0.0 for r in results), results
    assert sum(sum(r["moved"]) for r in results) > 0


@pytest.mark.parametrize("nranks,gpus_per_node", [(4, 2), (6, 3), (3, 1), (8, 4), (8, 2)])
def test_internode_on_the_cpu(cpu_backend, monkeypatch, nranks, gpus_per_node):
    """Internode normal mode (ranks split into nodes by NUMBA_EP_GPUS_PER_NODE): the Buffer's
    10-item handle and every output equal reference.internode_dispatch / internode_combine.
    8 ranks as 2 x 4 and 4 x 2 are the 8-GPU layouts, which no lent machine has had."""
    monkeypatch.setenv("NUMBA_EP_GPUS_PER_NODE", str(gpus_per_node))
    seed = secrets.randbits(31)
    print(f"seed = {seed}")
    results = spawn(f"{LL_WORKERS}:internode_suite", nranks, seed, timeout=300,
                    group_timeout=200)
    assert sum(r["received"] for r in results) > 0
    for r in results:
        assert r["torch"] == _has_torch()
        assert len(r["refused"]) == 2
        assert "num_worst_tokens" in r["refused"][0] and "10-item handle" in r["refused"][1]
