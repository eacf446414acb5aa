"""numba_ep.Buffer internode normal mode on GPUs, against numba_ep.reference.

One host plays several nodes: NUMBA_EP_GPUS_PER_NODE=G makes R ranks (one per GPU) R/G nodes,
and every transfer between "nodes" goes through NVSHMEM puts and signals, the network path of
numba_ep.kernels.internode, while ranks of one node pull over NVLink. Layouts R x G run as far
as the host's GPUs allow (2 x 1 on two GPUs; 2 x 2 and 4 x 1 on four; 2 x 4 and 4 x 2 on eight);
others skip and say so. Each runs workers_internode.suite: three small round trips in a row
(ranks with 0, 1 and many tokens, -1 slots), one with torch tensors, and 2048 tokens x 7168 with
top-8 of 256 experts. Inputs are fresh random every run (the seed is printed).
"""
import os
import secrets

import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from rank_counts import GPUS

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers_internode.py")
LAYOUTS = ((2, 1), (4, 2), (4, 1), (8, 4), (8, 2))   # (ranks, GPUs per node)


def _layout(r, g):
    marks = [pytest.mark.gpu, pytest.mark.multigpu]
    if 0 < GPUS < r:
        marks.append(pytest.mark.skip(reason=f"{r // g} nodes x {g} needs {r} GPUs in this host "
                                             f"(found {GPUS})"))
    return pytest.param(r, g, marks=marks, id=f"{r // g}x{g}")


@pytest.fixture(scope="module")
def compiled():
    """Every kernel of the suite for the layouts this host runs, compiled in parallel into the
    disk cache before the ranks start."""
    if GPUS < 2:
        pytest.skip(f"needs at least 2 CUDA GPUs (found {GPUS})")
    from parallel_compile import compile_for

    return compile_for("workers_internode", [(r, g) for r, g in LAYOUTS if r <= GPUS])


@pytest.mark.parametrize("nranks,gpus_per_node", [_layout(r, g) for r, g in LAYOUTS])
def test_internode_round_trips(ranks, compiled, monkeypatch, nranks, gpus_per_node):
    monkeypatch.setenv("NUMBA_EP_GPUS_PER_NODE", str(gpus_per_node))
    seed = secrets.randbits(30)
    print(f"seed = {seed}")
    results = ranks(f"{WORKERS}:suite", nranks, seed, timeout=180, group_timeout=150)
    assert len(results) == nranks
    assert all(len(r) == 5 for r in results)
    # the checks are not vacuous: rows moved in every round trip, somewhere
    for i in range(5):
        assert sum(r[i] for r in results) > 0, results


@pytest.mark.gpu
@pytest.mark.multigpu
def test_timeout_names_the_absent_node(ranks, compiled, monkeypatch):
    """No silent hang across nodes: a rank whose peer on the other node never dispatches gets
    CommTimeoutError naming it, within seconds, and its Buffer refuses further work."""
    monkeypatch.setenv("NUMBA_EP_GPUS_PER_NODE", "1")
    results = ranks(f"{WORKERS}:timeout_absent_peer", 2, 2.0, timeout=120, group_timeout=90)
    r0 = results[0]
    assert r0["error"] is not None, "dispatch without its peer must time out"
    assert "rank 1" in r0["error"] and r0["what"] == "internode_notify", r0
    assert r0["elapsed"] < 30, f"took {r0['elapsed']:.1f} s with timeout_s=2"
    assert "unusable" in r0["after"], r0["after"]
    assert results[1] == {"rank": 1}
