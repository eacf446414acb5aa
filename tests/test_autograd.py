"""numba_ep.autograd: differentiable dispatch and combine. The gradients are checked exactly
(tests/workers_autograd.py) on spawned CPU-backend ranks, including a rank count that is not a
power of two and ranks with different token counts; a whole MoE layer's gradients against the
dense layer are checked by examples/moe_layer.py (tests/test_examples.py). Needs torch."""
import secrets

import pytest

torch = pytest.importorskip("torch")

from numba_ep import autograd  # noqa: E402
from numba_ep.group import spawn  # noqa: E402


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("NUMBA_EP_BACKEND", "cpu")  # spawned ranks inherit it


@pytest.mark.parametrize("nranks", [1, 2, 3])
def test_gradients_are_exact(cpu_backend, nranks):
    seed = secrets.randbits(32)
    # tests/ is on sys.path (conftest), and spawned ranks inherit it
    results = spawn("workers_autograd:gradients", nranks, seed, timeout=300)
    for r, res in enumerate(results):
        bad = [k for k in ("x_grad_ok", "w_grad_ok", "y_grad_ok", "counts_ok") if not res[k]]
        assert not bad, f"seed {seed}, rank {r}: {bad} ({res})"
        assert res["y_grad_dtype"] == "torch.float32", res   # the dtype y came in
    assert sum(res["received"] for res in results) > 0


def test_arguments_are_checked_before_anything_runs():
    x = torch.zeros(4, 8, dtype=torch.float32)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    w = torch.zeros(4, 2, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"dispatch: x must be a 2-D torch.bfloat16 tensor, got "
                                        r"torch.float32 tensor of shape \(4, 8\)"):
        autograd.dispatch(None, x, idx, w, 4)
    with pytest.raises(TypeError, match="topk_weights must be a float32 torch tensor, got "
                                        "torch.float64"):
        autograd.dispatch(None, x.bfloat16(), idx, w.double(), 4)
    with pytest.raises(TypeError, match=r"combine: x must be a 2-D floating-point torch tensor, "
                                        r"got torch.int64 tensor of shape \(4, 2\)"):
        autograd.combine(None, idx, None)
