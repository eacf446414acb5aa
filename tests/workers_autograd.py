"""Rank functions for tests/test_autograd.py: numba_ep.autograd's gradients, with answers that
are exact integers or exact copies (so any wrong routing of a gradient shows as a mismatch, not
as a tolerance question). Runs on either backend; the test uses the CPU one."""
import numpy as np

import numba_ep


def _buffer(group, hidden):
    R = group.size
    cfgs = (numba_ep.Buffer.get_dispatch_config(R), numba_ep.Buffer.get_combine_config(R))
    hint = max(c.get_nvl_buffer_size_hint(hidden * 2, R) for c in cfgs)
    return numba_ep.Buffer(group, hint, explicitly_destroy=True)


def _routing(torch, rng, T, K, E):
    """Distinct experts per token, about a quarter of the slots -1 (unused)."""
    idx = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    idx[rng.random((T, K)) < 0.25] = -1
    return torch.from_numpy(idx)


def gradients(group, seed, T=37, H=64, K=4, E=12):
    """Rank r dispatches T tokens, then:

    - loss_d = sum(recv_x) + sum(recv_topk_weights * c) over every slot, also the ones whose
      expert is elsewhere (their weights arrive as 0 and do not depend on topk_weights). So
      x.grad[t] = the number of ranks token t reached, and topk_weights.grad[t, k] = c when
      slot k is used, 0 when it is -1: exact.
    - y = a leaf copy of recv_x; out = combine(y); loss_c = sum(out * x): then y.grad[row] must
      equal recv_x[row] exactly (the row's source token, sent back by the cached dispatch).
    """
    import torch

    from numba_ep import autograd

    rng = np.random.default_rng([seed, group.rank])
    R = group.size
    T = T + group.rank              # ranks hold different numbers of tokens
    buf = _buffer(group, H)
    try:
        device = "cpu" if buf.backend == "cpu" else f"cuda:{buf.device}"
        x = torch.from_numpy(rng.integers(-8, 8, (T, H)).astype(np.float32))
        x = x.to(device=device, dtype=torch.bfloat16).requires_grad_()
        idx = _routing(torch, rng, T, K, E).to(device)
        w = torch.from_numpy(rng.random((T, K), dtype=np.float32)).to(device).requires_grad_()

        recv_x, recv_idx, recv_w, counts, handle = autograd.dispatch(buf, x, idx, w, E)
        c = 3.0
        (recv_x.float().sum() + (recv_w * c).sum()).backward()

        L = E // R
        dest = torch.where(idx >= 0, idx // L, -1)
        reached = torch.stack([(dest == r).any(dim=1) for r in range(R)], dim=1).sum(dim=1)
        want_x = reached[:, None].expand(T, H).float()
        want_w = (idx >= 0).float() * c

        y = recv_x.detach().float().requires_grad_()
        out = autograd.combine(buf, y, handle)
        (out.float() * x.detach().float()).sum().backward()
        return {
            "received": int(recv_x.shape[0]),
            "x_grad_ok": bool(torch.equal(x.grad.float().cpu(), want_x.cpu())),
            "w_grad_ok": bool(torch.equal(w.grad.cpu(), want_w.cpu())),
            "y_grad_ok": bool(torch.equal(y.grad.cpu(), recv_x.detach().float().cpu())),
            "y_grad_dtype": str(y.grad.dtype),
            "counts_ok": sum(counts) == int((recv_idx >= 0).sum()),
        }
    finally:
        buf.destroy()
