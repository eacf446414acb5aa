"""Low-latency mode on the CPU: ``numba_ep.kernels.low_latency``'s entry points (the ones the
Buffer's ``low_latency_*`` methods call), answered by ``reference.low_latency_dispatch`` /
``low_latency_combine`` over what every rank contributes.

Who waits on whom: dispatch and combine are collective here (an all-gather over the group) in
their send phase, as on the GPU every rank's send must happen before any receive completes. So
the work is done when the call returns and a receive hook (``return_recv_hook=True``) has
nothing left to do; it is still returned, and must still be called, as on the GPU. The
double-buffered halves are kept only for the zero-copy send rows (``next_combine_buffer``).
"""
import numpy as np

from numba_ep import reference
from numba_ep.cpu.intranode import _gather, _host
from numba_ep.kernels.low_latency import _Hook


class LowLatencyContext:
    """Shape (M, H, E) of a sequence of low-latency calls, over the Buffer's group."""

    def __init__(self, group, num_max_dispatch_tokens_per_rank, hidden, num_experts,
                 timeout_s=None):
        R = group.size
        self.group, self.rank, self.num_ranks = group, group.rank, R
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.hidden, self.num_experts = hidden, num_experts
        self.num_local_experts = num_experts // R
        self.timeout_s = timeout_s
        self.buffer_idx = 0
        # Zero-copy send rows of each half, padded like the GPU's (H + H/128*2 elements a row);
        # made on the first next_combine_buffer (at DeepSeek sizes they are ~0.5 GB each).
        self._send_rows = [None, None]

    def check(self):
        """Nothing can time out on the CPU (the all-gathers have the group's own timeout)."""


def clean_low_latency_buffer(ctx, stream=None):
    """Restart the sequence of calls at half 0 (collective, like the GPU's)."""
    ctx.group.barrier()
    ctx.buffer_idx = 0
    for rows in ctx._send_rows:
        if rows is not None:
            rows[...] = 0


def _done_hook(what, return_recv_hook):
    return _Hook(lambda stream: None, None, what) if return_recv_hook else None


def low_latency_dispatch(ctx, x, topk_idx, use_fp8=True, round_scale=False, use_ue8m0=False,
                         cumulative_local_expert_recv_stats=None, return_recv_hook=False,
                         stream=None, wait_recv_cost_stats=None):
    """As ``numba_ep.kernels.low_latency.low_latency_dispatch``, with NumPy arrays: returns
    ``(recv_x [L, R*M, H] uint8 or uint16, scales view [L, R*M, S] (column-major storage) or
    None, recv_count [L] int32, src_info [L, R*M] int32, layout_range [L, R] int64, hook)``.
    ``wait_recv_cost_stats`` stays as it is (nothing waits). Collective."""
    parts = _gather(ctx, (_host(x), _host(topk_idx)))
    bf16 = reference.bfloat16
    mine = reference.low_latency_dispatch(
        [p[0].view(bf16) for p in parts], [p[1] for p in parts],
        ctx.num_max_dispatch_tokens_per_rank, ctx.num_experts, use_fp8=use_fp8,
        round_scale=round_scale, use_ue8m0=use_ue8m0)[ctx.rank]
    recv_x = mine["recv_x"].view(np.uint8 if use_fp8 else np.uint16)
    scales = None
    if use_fp8:  # stored [L, S, R*M] like the GPU's, handed out as the transposed view
        s = mine["recv_x_scales"]
        scales = np.ascontiguousarray(s.transpose(0, 2, 1)).transpose(0, 2, 1)
    count = mine["recv_count"].astype(np.int32)
    if cumulative_local_expert_recv_stats is not None:
        cumulative_local_expert_recv_stats += count
    ctx.buffer_idx ^= 1
    return (recv_x, scales, count, mine["src_info"].astype(np.int32),
            mine["layout_range"].astype(np.int64), _done_hook("low_latency_dispatch",
                                                              return_recv_hook))


def next_combine_buffer(ctx):
    """The zero-copy send rows of the next call: a uint16 view ``[L, R*M, H]`` (padded rows)."""
    h = ctx.buffer_idx
    if ctx._send_rows[h] is None:
        L, RM, H = ctx.num_local_experts, ctx.num_ranks * ctx.num_max_dispatch_tokens_per_rank, \
            ctx.hidden
        ctx._send_rows[h] = np.zeros((L, RM, H + H // 64), np.uint16)
    return ctx._send_rows[h][:, :, :ctx.hidden]


def low_latency_combine(ctx, x, topk_idx, topk_weights, src_info, layout_range, use_logfmt=False,
                        zero_copy=False, out=None, return_recv_hook=False, stream=None,
                        wait_recv_cost_stats=None):
    """As ``numba_ep.kernels.low_latency.low_latency_combine``, with NumPy arrays: returns
    ``(out [T, H] uint16 bits of bf16, hook)``. With ``zero_copy`` the rows are read from
    ``next_combine_buffer(ctx)`` (x is that view). Collective."""
    rows = next_combine_buffer(ctx) if zero_copy else x
    parts = _gather(ctx, dict(y=_host(rows), topk=_host(topk_idx), w=_host(topk_weights),
                              src=_host(src_info), lr=_host(layout_range)))
    bf16 = reference.bfloat16
    handles = [dict(src_info=p["src"], layout_range=p["lr"], num_experts=ctx.num_experts,
                    num_max_dispatch_tokens_per_rank=ctx.num_max_dispatch_tokens_per_rank)
               for p in parts]
    combined = reference.low_latency_combine(
        [p["y"].view(bf16) for p in parts], [p["topk"] for p in parts], [p["w"] for p in parts],
        handles, use_logfmt=use_logfmt)[ctx.rank].view(np.uint16)
    if out is None:
        out = combined.copy()
    else:
        out[...] = combined
    ctx.buffer_idx ^= 1
    return out, _done_hook("low_latency_combine", return_recv_hook)
