"""Intranode normal mode on the CPU: ``numba_ep.kernels.intranode``'s entry points (the ones
``Buffer.dispatch`` / ``Buffer.combine`` call), answered by ``reference.intranode_dispatch`` /
``intranode_combine`` over what every rank contributes.

Who waits on whom: every entry point that moves data is collective (an all-gather of each rank's
inputs over the Buffer's group), as the GPU kernels are (they meet in device barriers); the
Buffer calls them in the same order on every rank. Outputs are written into the arrays the
Buffer allocated, exactly as the kernels write them.
"""
import pickle

import numpy as np

from numba_ep import reference


class IntranodeContext:
    """What a call needs: the group (for the all-gathers) and this rank's place in it."""

    def __init__(self, group, timeout_s=None):
        self.group = group
        self.rank, self.num_ranks = group.rank, group.size
        self.timeout_s = timeout_s
        self.counts = None      # (num_recv_tokens, per-expert list) from the last notify


def _gather(ctx, obj):
    """``obj`` of every rank, in rank order."""
    blobs = ctx.group.allgather_bytes(pickle.dumps(obj, protocol=5))
    return [pickle.loads(b) for b in blobs]


def _host(a):
    return None if a is None else np.ascontiguousarray(a)


def _routing_only(ctx, in_rank, per_expert, num_experts, num_channels, expert_alignment):
    """The counts and prefix matrices of a dispatch, from every rank's routing (rows of one
    byte stand in for the data)."""
    routes = _gather(ctx, (_host(in_rank), _host(per_expert)))
    xs = [np.zeros((r.shape[0], 1), np.uint8) for r, _ in routes]
    return reference.intranode_dispatch(
        xs, None, None, num_experts, num_channels, expert_alignment=expert_alignment,
        is_token_in_rank=[r for r, _ in routes],
        num_tokens_per_expert=None if routes[0][1] is None else [e for _, e in routes])[ctx.rank]


def notify_dispatch(ctx, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                    num_experts, num_channels, expert_alignment, stream):
    """Returns ``(rank_prefix_matrix [R, R], channel_prefix_matrix [R, C],
    recv_channel_prefix_matrix [R, C])`` int32, and keeps the received counts for
    ``wait_recv_counts``. Collective."""
    mine = _routing_only(ctx, is_token_in_rank, num_tokens_per_expert, num_experts, num_channels,
                         expert_alignment)
    ctx.counts = (mine["num_recv_tokens"], list(mine["num_recv_tokens_per_expert_list"]))
    return (mine["rank_prefix_matrix"].astype(np.int32),
            mine["channel_prefix_matrix"].astype(np.int32),
            mine["recv_channel_prefix_matrix"].astype(np.int32))


def wait_recv_counts(ctx, num_local_experts):
    """``(num_recv_tokens, num_recv_tokens_per_expert_list)`` of the last notify_dispatch."""
    n, per_expert = ctx.counts
    assert len(per_expert) == num_local_experts, (per_expert, num_local_experts)
    return n, per_expert


def cached_notify(ctx, num_channels, stream):
    """Nothing to reset on the CPU; kept so the Buffer's call sequence is the GPU's."""


def dispatch(ctx, x_bytes, x_scales, topk_idx, topk_weights, is_token_in_rank,
             channel_prefix_matrix, rank_prefix_matrix, recv_channel_prefix_matrix, recv_x_bytes,
             recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, send_head,
             num_experts, num_recv_slots, num_channels, num_worst_tokens, stream):
    """Fill the ``recv_*`` arrays (and ``send_head`` unless cached) as the dispatch kernel does.
    ``x_bytes`` [T, row] uint8; the rest as in ``numba_ep.kernels.intranode.dispatch``.
    Collective."""
    parts = _gather(ctx, (_host(x_bytes), _host(x_scales), _host(topk_idx),
                          _host(topk_weights), _host(is_token_in_rank)))
    with_topk = parts[0][2] is not None
    mine = reference.intranode_dispatch(
        [p[0] for p in parts], [p[2] for p in parts] if with_topk else None,
        [p[3] for p in parts] if with_topk else None,
        num_experts if with_topk else None, num_channels,  # a cached dispatch passes 0
        x_scales=[p[1] for p in parts] if parts[0][1] is not None else None,
        num_worst_tokens=num_worst_tokens,
        is_token_in_rank=None if with_topk else [p[4] for p in parts])[ctx.rank]
    rows = recv_x_bytes.shape[0]
    if mine["num_recv_tokens"] > rows:
        raise ValueError(f"num_worst_tokens: rank {ctx.rank} receives {mine['num_recv_tokens']} "
                         f"rows, more than the {rows} it was given")
    write_dispatch_outputs(mine, recv_x_bytes, recv_x_scales, recv_topk_idx, recv_topk_weights,
                           recv_src_idx, send_head)


def write_dispatch_outputs(mine, recv_x_bytes, recv_x_scales, recv_topk_idx, recv_topk_weights,
                           recv_src_idx, send_head):
    """Write one rank's ``reference.intranode_dispatch`` result into the Buffer's output arrays
    as the dispatch kernel writes them (rows past the real count: only ``recv_topk_idx`` = -1)."""
    n = mine["num_recv_tokens"]
    recv_x_bytes[:n] = mine["recv_x"][:n].view(np.uint8).reshape(n, recv_x_bytes.shape[1])
    recv_src_idx[:n] = mine["recv_src_idx"][:n]
    if recv_x_scales is not None:
        recv_x_scales[:n] = mine["recv_x_scales"][:n].view(np.float32)
    if recv_topk_idx is not None:
        recv_topk_idx[:n] = mine["recv_topk_idx"][:n]
        recv_topk_idx[n:] = -1
        recv_topk_weights[:n] = mine["recv_topk_weights"][:n]
    if send_head is not None:
        send_head[:] = mine["send_head"]


def combine(ctx, x_bf16, topk_weights, bias0, bias1, recv_src_idx, rank_prefix_matrix,
            recv_channel_prefix_matrix, send_head, out, out_topk_weights, num_recv_slots,
            num_channels, stream):
    """``out[t]`` (uint16 bits of bf16) = bias0 + bias1 + the rows of every rank that received
    my token t, summed in float32 in the reference's order; ``out_topk_weights`` likewise.
    Collective."""
    parts = _gather(ctx, dict(x=_host(x_bf16), w=_host(topk_weights), src=_host(recv_src_idx),
                              rank_prefix=_host(rank_prefix_matrix),
                              recv_chan=_host(recv_channel_prefix_matrix), head=_host(send_head)))
    handles = [dict(is_token_in_rank=p["head"] >= 0, send_head=p["head"],
                    rank_prefix_matrix=p["rank_prefix"],
                    recv_channel_prefix_matrix=p["recv_chan"],
                    channel_prefix_matrix=np.zeros((ctx.num_ranks, num_channels), np.int32),
                    recv_src_idx=p["src"]) for p in parts]
    bf16 = reference.bfloat16
    bias = [None] * ctx.num_ranks
    bias[ctx.rank] = tuple(None if b is None else np.asarray(b).view(bf16) for b in (bias0, bias1))
    with_w = parts[0]["w"] is not None
    combined, weights = reference.intranode_combine(
        [p["x"].view(bf16) for p in parts], handles,
        topk_weights=[p["w"] for p in parts] if with_w else None, bias=bias)[ctx.rank]
    out[:] = combined.view(np.uint16)
    if out_topk_weights is not None:
        out_topk_weights[:] = weights
