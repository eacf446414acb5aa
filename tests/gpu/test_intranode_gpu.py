"""numba_ep.Buffer intranode dispatch / combine on GPUs, against numba_ep.reference.

Every test spawns EP1, EP2, EP4 or EP8 ranks (one per GPU; counts above this host's GPUs skip)
running functions of workers_intranode.py next to this file. Inputs are fresh random every run (the seed is printed in
any failure): dispatch must equal the reference bit for bit (recv_x, scales, top-k ids and weights,
source indices, handle matrices, per-expert counts), combine must be within one BF16 rounding of
the float32 reference and pass DeepEP's calc_diff bounds (5e-6 data, 1e-9 weights).

Suites (each one Buffer, several cases; see workers_intranode.SUITES):
- bf16: H 7168/4096/2048, top-8/6/4 and no top-k, expert_alignment 1 and 128, rings that wrap,
  sync / async_finish / previous_event / allocate_on_comm_stream, bias (one and a pair), a torch
  caller, DeepEP's own combine(recv_x) check.
- fp8: per-128 scales column-major as DeepEP's test passes them, num_worst_tokens, torch FP8.
- edge: 1 and 0 tokens, no tokens anywhere, a rank that receives nothing, tokens sent nowhere,
  top-16 with odd token counts.
Plus CUDA-graph capture and replay (num_worst_tokens), and a timeout when a peer never arrives.
Collects on a CPU machine; the tests skip there.
"""
import os
import secrets

import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from rank_counts import GPUS, ep_params, runnable_rank_counts

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers_intranode.py")
SUITES = ("bf16", "fp8", "edge")


def _target(name):
    return f"{WORKERS}:{name}"


def _seed():
    seed = secrets.randbits(31)
    print(f"seed = {seed}")
    return seed


@pytest.fixture(scope="module")
def compiled():
    """Compile every kernel the suites launch, for every rank count this host runs, in parallel
    processes into the disk cache, so the ranks load cubins instead of compiling ~25 kernels
    one after another each."""
    if GPUS < 1:
        pytest.skip(f"needs a CUDA GPU (found {GPUS})")
    from parallel_compile import compile_for

    return compile_for("workers_intranode", runnable_rank_counts())


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("nranks", ep_params())
def test_dispatch_combine(ranks, compiled, nranks, suite):
    seed = _seed()
    results = ranks(_target("run_suite"), nranks, suite, seed, timeout=300, group_timeout=200)
    assert len(results) == nranks
    names = [[name for name, _ in r] for r in results]
    assert all(n == names[0] for n in names), "every rank must run the same cases"
    assert len(names[0]) >= 3
    # at least one case really moved rows (the checks are not vacuous)
    assert any(isinstance(n, int) and n > 0 for r in results for _, n in r), results


@pytest.mark.parametrize("nranks", ep_params())
def test_cuda_graph_capture_and_replay(ranks, compiled, nranks):
    seed = _seed()
    results = ranks(_target("graph_capture"), nranks, seed, timeout=300, group_timeout=200)
    for seen in results:
        assert len(seen) == 4  # eager run + 3 replays, each checked on the rank
        assert all(n > 0 for n in seen)


@pytest.mark.gpu
@pytest.mark.multigpu
def test_timeout_names_the_absent_rank(ranks):
    results = ranks(_target("timeout_absent_peer"), 2, 2.0, timeout=180, group_timeout=120)
    r0 = results[0]
    assert r0["error"] is not None, "dispatch without its peer must time out"
    assert r0["peer"] == 1 or "rank 1" in r0["error"], r0
    assert "rank 1" in r0["error"], r0["error"]
    assert r0["elapsed"] < 30, f"took {r0['elapsed']:.1f} s with timeout_s=2"
    assert "unusable" in r0["after"], r0["after"]
    assert results[1] == {"rank": 1}
