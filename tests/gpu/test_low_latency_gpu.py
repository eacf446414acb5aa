"""Low-latency dispatch and combine on real GPUs (1 and 2 ranks, one GPU each, NVLink).

What runs (targets in workers_low_latency.py, one process per rank through the ``ranks``
fixture; NVSHMEM is initialised in each rank with NVSHMEM_DISABLE_NVLS=1):

- ``ll_matrix`` on EP1 and EP2, fresh random inputs per row of MATRIX: FP8 (plain,
  round_scale, round_scale + UE8M0), BF16, LogFMT on/off (with the wire bytes compared to the
  reference encoder), zero-copy combine, receive hooks, ``out=``, -1 slots, T = M, M - 3, 17, 1
  and 0 tokens, hidden 7168 (16-byte path, E = 288) and 640 (4-byte path, grids of 4 blocks).
  Dispatch must equal reference.low_latency_dispatch exactly (check_low_latency_dispatch);
  combine must match reference.low_latency_combine (calc_diff < 1e-5) and, end to end as
  DeepEP's test, x * sum(weights) (calc_diff < 9e-4 through FP8/LogFMT, < 1e-5 BF16).
- ``ll_repeat``: 100 dispatch+combine pairs in a row with changing options and inputs (the
  double-buffered halves alternate every call), then an odd number of calls.
- ``ll_graph``: dispatch -> combine captured in a CUDA graph on a CuPy stream, replayed with new
  inputs copied into the captured input arrays.
- ``ll_timeout`` (EP2): rank 1 sits out; rank 0 gets CommTimeoutError naming rank 1.
- ``ll_bench`` (EP2): bench_low_latency runs and reports plausible numbers.

Kernels are compiled once, in parallel, before the ranks start (the ``compiled`` fixture), so
the ranks only load cubins. Expected wall time on 2 H100s: ~2-3 minutes cold, ~1.5 warm.

Run on the GPU machine, from the repository root:
``source .device-bundle/activate && python -m pytest tests/gpu/test_low_latency_gpu.py -v -s``
(on one GPU the EP2 tests skip; ``-s`` shows the benchmark numbers).
"""
import os

import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep.group import gpu_count  # noqa: E402
from rank_counts import ep_params, runnable_rank_counts  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "workers_low_latency.py")


GPUS = gpu_count()
needs_2 = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs in this host (found {GPUS})")


@pytest.fixture(scope="module")
def compiled():
    """Compile every kernel the workers use, in parallel processes, into the disk cache.

    Runs outside the ranks (so that two ranks do not compile the same kernel twice and each
    rank starts with cubins ready); its child processes each make a CUDA context on GPU 0.
    """
    if GPUS < 1:
        pytest.skip(f"needs a CUDA GPU (found {GPUS})")
    from parallel_compile import compile_for

    return compile_for("workers_low_latency", runnable_rank_counts())


def _run(ranks, name, nranks, *args):
    return ranks(f"{WORKERS}:{name}", nranks, *args, timeout=600, group_timeout=300)


@pytest.mark.parametrize("nranks", ep_params())
def test_matrix(ranks, compiled, nranks):
    reports = _run(ranks, "ll_matrix", nranks)
    assert len(reports) == nranks
    for report in reports:
        assert len(report) == 11
        if nranks > 1:
            wire = [info for _, info in report if "wire_rows" in info]
            assert wire and all(i["wire_rows"] > 0 for i in wire)
            assert sum(i["wire_encoded_divisions"] for i in wire) > 0, "no division was encoded"


@pytest.mark.parametrize("nranks", ep_params(2))
def test_matrix_over_nvshmem_puts(ranks, compiled, nranks, monkeypatch):
    """The path to peers on other nodes (NVSHMEM puts and signals instead of NVLink stores),
    forced for every peer of one host (NUMBA_EP_LL_TRANSPORT=nvshmem, which the ranks inherit):
    the same matrix, the same exact checks."""
    monkeypatch.setenv("NUMBA_EP_LL_TRANSPORT", "nvshmem")
    reports = _run(ranks, "ll_matrix", nranks)
    assert len(reports) == nranks and all(len(r) == 11 for r in reports)


@pytest.mark.parametrize("nranks", ep_params())
def test_repeat(ranks, compiled, nranks):
    iterations = 40 if nranks == 1 else 100
    res = _run(ranks, "ll_repeat", nranks, iterations)
    assert [r["iterations"] for r in res] == [iterations] * nranks
    assert len({r["half"] for r in res}) == 1, "every rank ends on the same buffer half"


@pytest.mark.parametrize("nranks", ep_params())
def test_cuda_graph(ranks, compiled, nranks):
    res = _run(ranks, "ll_graph", nranks)
    assert [r["replays"] for r in res] == [3] * nranks


@pytest.mark.gpu
@pytest.mark.multigpu
@needs_2
def test_timeout_names_the_missing_peer(ranks, compiled):
    seen0, seen1 = _run(ranks, "ll_timeout", 2)
    assert len(seen0) == 2 and seen1 == []
    assert "rank 0 waited" in seen0[0] and "for rank 1" in seen0[0]


@pytest.mark.gpu
@pytest.mark.multigpu
@needs_2
def test_bench_runs(ranks, compiled):
    res = _run(ranks, "ll_bench", 2)
    for r in res:
        print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()})
