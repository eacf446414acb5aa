"""get_dispatch_layout on the CPU: sm_90 compile checks and a run in numba's CUDA simulator,
both against the NumPy reference."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import numba_ep  # noqa: F401
from numba_ep import launch
from numba_ep.kernels import layout


def test_layout_compiles_for_sm90(sm90):
    for R, G in [(1, 1), (2, 2), (8, 4), (5, 5), (16, 8)]:
        k = layout.make_layout_kernel(num_experts=R * 8, num_ranks=R, num_topk=8, gpus_per_node=G)
        cubin, meta = launch.compile_cubin(k, launch.parse_signature(layout.LAYOUT_SIG), (9, 0))
        assert cubin[:4] == b"\x7fELF"


def test_layout_validation():
    with pytest.raises(TypeError, match="topk_idx: expected dtype int64"):
        layout.check_topk_idx(np.zeros((3, 2), np.int32), 8, 2)
    with pytest.raises(ValueError, match="2-D"):
        layout.check_topk_idx(np.zeros(3, np.int64), 8, 2)
    with pytest.raises(ValueError, match="num_experts"):
        layout.check_topk_idx(np.zeros((3, 2), np.int64), 9, 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        layout.check_topk_idx(np.zeros((2, 3), np.int64).T, 8, 2)


SIM_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    import numba_ep
    from numba_ep import reference
    from numba_ep.kernels.layout import get_dispatch_layout
    rng = np.random.default_rng(int(sys.argv[1]))
    cases = [(5, 2, 8, 2, 1), (0, 3, 6, 2, 3), (1, 1, 4, 1, 1), (9, 4, 12, 3, 1), (7, 6, 24, 4, 2)]
    for T, R, E, K, G in cases:
        topk = rng.integers(-1, E, size=(T, K)).astype(np.int64)
        got = get_dispatch_layout(topk, E, R, num_gpus_per_node=G)
        want = reference.get_dispatch_layout(topk, E, R, num_gpus_per_node=G)
        for name, g, w in zip(["per_rank", "per_rdma", "per_expert", "in_rank"], got, want):
            if w is None:
                assert g is None, name
            else:
                assert np.array_equal(g, w), (name, T, R, E, K, G, g, w)
    print("simulator layout ok")
""")


def test_layout_in_simulator_matches_reference():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    seed = str(np.random.SeedSequence().entropy % (2**31))
    r = subprocess.run([sys.executable, "-c", SIM_SCRIPT, seed], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"seed {seed}\n{r.stdout}\n{r.stderr}"
    assert "simulator layout ok" in r.stdout
