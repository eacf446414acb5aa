"""Differentiable dispatch and combine (normal mode) for training MoE layers in PyTorch.

DeepEP leaves the backward pass to its users; every training framework writes the same two
``torch.autograd.Function`` wrappers. They are here, over ``Buffer``:

    dispatch    forward: token t of this rank is copied to every rank that hosts one of its
                experts (Buffer.get_dispatch_layout + Buffer.dispatch).
                backward: a copy's gradient is the sum of its copies' gradients, and that sum
                over the ranks the token visited is exactly what combine computes:
                    grad_x = Buffer.combine(grad_recv_x, handle)
                The routing weights travel too (recv_topk_weights[row, k] = topk_weights[t, k]
                where slot k's expert is local, else 0); their gradient is summed the same way
                (combine's ``topk_weights``), after zeroing the slots that were not copied.
    combine     forward: out[t] = sum of x_r[row of t on r] over the ranks r that received t
                (Buffer.combine).
                backward: each summand's gradient is grad_out[t], and sending grad_out[t] back
                to every rank that holds a row of t is a cached dispatch on the same handle:
                    grad_x = Buffer.dispatch(grad_out, handle=handle)[0]

So the backward of a dispatch is a combine, and the backward of a combine is a dispatch: the same
kernels, the same bytes on the wire, in the other direction. Both are collectives in backward as
in forward: every rank must run its backward pass, and in the same order (autograd's order is
the reverse of the forward's, so the same model code on every rank gives the same order).

Data types: x is BF16 (torch.bfloat16) in both directions, as Buffer.combine is BF16-only;
topk_weights float32. Gradients come back in the same dtypes. FP8 dispatch has no gradient and is
not offered here; use Buffer.dispatch for inference.
"""
from __future__ import annotations

try:
    import torch
except ImportError as e:  # the rest of numba_ep works without torch; this module cannot
    raise ImportError("numba_ep.autograd needs PyTorch (pip install -e \".[torch]\")") from e

__all__ = ["dispatch", "combine"]


def _check_bf16(func, name, t, ndim=2):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bfloat16 or t.dim() != ndim:
        got = (f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise TypeError(f"numba_ep.autograd.{func}: {name} must be a {ndim}-D torch.bfloat16 "
                        f"tensor, got {got}")


def _bf16(t):
    """A C-contiguous BF16 tensor with no autograd history, as the Buffer wants it."""
    return t.detach().to(torch.bfloat16).contiguous()


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, box, buffer, x, topk_weights, topk_idx, num_experts, config,
                expert_alignment):
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx,
                                                                               num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x.detach(), num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk_idx,
            topk_weights=topk_weights.detach(), expert_alignment=expert_alignment,
            config=config)
        box["counts"], box["handle"] = counts, handle
        ctx.buffer, ctx.handle, ctx.config = buffer, handle, config
        ctx.save_for_backward(recv_idx)
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_w, recv_idx

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_w, _grad_recv_idx):
        # (autograd hands zeros, not None, for an output that was not used)
        (recv_idx,) = ctx.saved_tensors
        w = None
        if ctx.needs_input_grad[3]:
            # slots whose expert is not on this rank were copied as 0, not as the weight
            w = grad_recv_w.masked_fill(recv_idx < 0, 0).float().contiguous()
        grad_x, grad_w, _ = ctx.buffer.combine(_bf16(grad_recv_x), ctx.handle, topk_weights=w,
                                               config=ctx.config)
        return None, None, grad_x, grad_w, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, x, handle, config):
        combined, _, _ = buffer.combine(_bf16(x), handle, config=config)
        ctx.buffer, ctx.handle, ctx.x_dtype = buffer, handle, x.dtype
        return combined

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = ctx.buffer.dispatch(_bf16(grad_out), handle=ctx.handle)[0]
        return None, grad_x.to(ctx.x_dtype), None, None


def dispatch(buffer, x, topk_idx, topk_weights, num_experts: int, config=None,
             expert_alignment: int = 1):
    """Differentiable ``Buffer.dispatch`` (with its layout): send each token to the ranks of its
    experts.

    Args (T tokens on this rank, H hidden, K slots, E experts):
        buffer: a ``numba_ep.Buffer`` (normal mode; intranode or internode).
        x: ``[T, H] torch.bfloat16``; may require grad.
        topk_idx: ``[T, K] int64`` expert ids, -1 for an unused slot.
        topk_weights: ``[T, K] float32``; may require grad.
        num_experts: E (divisible by the rank count).
        config, expert_alignment: as in ``Buffer.dispatch``.

    Returns ``(recv_x [N, H] bfloat16, recv_topk_idx [N, K] int64, recv_topk_weights [N, K]
    float32, num_recv_tokens_per_expert_list list[int], handle)`` as ``Buffer.dispatch`` does
    (without the event). ``recv_x`` and ``recv_topk_weights`` carry gradients back to ``x`` and
    ``topk_weights``: backward runs ``Buffer.combine`` on every rank. Pass ``handle`` to
    ``combine`` below.
    """
    _check_bf16("dispatch", "x", x)
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32:
        raise TypeError("numba_ep.autograd.dispatch: topk_weights must be a float32 torch "
                        f"tensor, got {getattr(topk_weights, 'dtype', type(topk_weights))}")
    box = {}
    recv_x, recv_w, recv_idx = _Dispatch.apply(box, buffer, x, topk_weights, topk_idx,
                                               int(num_experts), config, int(expert_alignment))
    return recv_x, recv_idx, recv_w, box["counts"], box["handle"]


def combine(buffer, x, handle, config=None):
    """Differentiable ``Buffer.combine``: sum each token's rows over the ranks it visited.

    Args: ``x [N, H]`` (rows as ``recv_x`` of the dispatch that made ``handle``; cast to
    bfloat16, so a float32 expert output may come straight in), ``handle`` from ``dispatch``
    above (or ``Buffer.dispatch``), ``config`` as in ``Buffer.combine``.

    Returns ``combined_x [T, H] torch.bfloat16``. Its gradient reaches ``x`` by a cached
    ``Buffer.dispatch`` on ``handle`` (every rank runs it in backward).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
               else type(x).__name__)
        raise TypeError(f"numba_ep.autograd.combine: x must be a 2-D floating-point torch "
                        f"tensor, got {got}")
    return _Combine.apply(buffer, x, handle, config)
