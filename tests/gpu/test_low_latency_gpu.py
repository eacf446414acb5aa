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

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "workers_low_latency.py")


GPUS = gpu_count()
needs_1 = pytest.mark.skipif(GPUS < 1, reason=f"needs a CUDA GPU (found {GPUS})")
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

    return compile_for("workers_low_latency", GPUS)


def _run(ranks, name, nranks, *args):
    return ranks(f"{WORKERS}:{name}", nranks, *args, timeout=600, group_timeout=300)


@pytest.mark.gpu
@needs_1
def test_matrix_ep1(ranks, compiled):
    (report,) = _run(ranks, "ll_matrix", 1)
    assert len(report) == 11


@pytest.mark.gpu
@pytest.mark.multigpu
@needs_2
def test_matrix_ep2(ranks, compiled):
    reports = _run(ranks, "ll_matrix", 2)
    for report in reports:
        assert len(report) == 11
        wire = [info for _, info in report if "wire_rows" in info]
        assert wire and all(i["wire_rows"] > 0 for i in wire)
        assert sum(i["wire_encoded_divisions"] for i in wire) > 0, "no division was encoded"


@pytest.mark.gpu
@needs_1
def test_repeat_ep1(ranks, compiled):
    (res,) = _run(ranks, "ll_repeat", 1, 40)
    assert res["iterations"] == 40


@pytest.mark.gpu
@pytest.mark.multigpu
@needs_2
def test_repeat_100_ep2(ranks, compiled):
    res = _run(ranks, "ll_repeat", 2, 100)
    assert [r["iterations"] for r in res] == [100, 100]
    assert res[0]["half"] == res[1]["half"]


@pytest.mark.gpu
@needs_1
def test_cuda_graph_ep1(ranks, compiled):
    (res,) = _run(ranks, "ll_graph", 1)
    assert res["replays"] == 3


@pytest.mark.gpu
@pytest.mark.multigpu
@needs_2
def test_cuda_graph_ep2(ranks, compiled):
    res = _run(ranks, "ll_graph", 2)
    assert all(r["replays"] == 3 for r in res)


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
