"""numba_ep.autograd on GPUs (torch CUDA tensors): the exact-gradient checks of
tests/workers_autograd.py, and examples/moe_layer.py's training step (output, x, router and
expert gradients against the dense layer), at EP1, EP2 and EP4 as the host allows. The backward
passes run the Buffer from autograd's own thread. Needs torch with CUDA."""
import os
import secrets

import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep.group import gpu_count  # noqa: E402
from rank_counts import ep  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(os.path.dirname(TESTS), "examples", "moe_layer.py")


def _need_torch_cuda():
    if gpu_count() < 1:
        pytest.skip("needs a CUDA GPU (found 0)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA")


@pytest.mark.parametrize("nranks", [ep(1), ep(2), ep(4)])
def test_gradients_are_exact(ranks, nranks):
    _need_torch_cuda()
    seed = secrets.randbits(32)
    results = ranks(os.path.join(TESTS, "workers_autograd.py") + ":gradients", nranks, seed,
                    timeout=300, group_timeout=200)
    for r, res in enumerate(results):
        bad = [k for k in ("x_grad_ok", "w_grad_ok", "y_grad_ok", "counts_ok") if not res[k]]
        assert not bad, f"seed {seed}, rank {r}: {bad} ({res})"


@pytest.mark.parametrize("nranks", [ep(1), ep(2), ep(4)])
def test_moe_layer_training_step(ranks, nranks):
    _need_torch_cuda()
    results = ranks(f"{EXAMPLE}:rank_main", nranks, timeout=300, group_timeout=200)
    for res in results:
        assert res["backend"] == "cuda" and res["ok"], res
