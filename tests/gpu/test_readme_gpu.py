"""The README's decoding example, run as written on 1 and 2 GPUs (workers_readme.py): the CUDA
graph it captures is replayed with new tokens, and every replay's combined output is checked."""
import os

import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep.group import gpu_count  # noqa: E402
from rank_counts import ep  # noqa: E402

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers_readme.py")


@pytest.mark.parametrize("nranks", [ep(1), ep(2)])
def test_readme_decoding_example(ranks, nranks):
    if gpu_count() < 1:
        pytest.skip("needs a CUDA GPU (found 0)")
    diffs = ranks(f"{WORKERS}:decoding_example", nranks, timeout=300, group_timeout=200)
    for r, d in enumerate(diffs):
        assert len(d) == 3 and max(d) < 1e-5, f"rank {r}: calc_diff per replay {d}"
