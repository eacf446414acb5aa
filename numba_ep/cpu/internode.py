"""Internode normal mode on the CPU: what ``Buffer.dispatch`` / ``Buffer.combine`` do when the
group spans several nodes (``Buffer.num_gpus_per_node < R``), answered by
``reference.internode_dispatch`` / ``internode_combine`` over what every rank contributes.

The GPU kernels (``numba_ep.kernels.internode``) meet the same Buffer-level contract: DeepEP's
10-item handle, in this order::

    (is_token_in_rank [T, R] bool, rdma_channel_prefix_matrix [N_nodes, C] int32,
     gbl_channel_prefix_matrix [R, C] int32, recv_rdma_channel_prefix_matrix [N_nodes, C] int32,
     recv_rdma_rank_prefix_sum [N_nodes] int32, recv_gbl_channel_prefix_matrix [R, C] int32,
     recv_gbl_rank_prefix_sum [R] int32, recv_src_meta [N, 2] int32,
     send_rdma_head [T, N_nodes] int32, send_nvl_head [N_rdma_recv, G] int32)

Who waits on whom: both calls are collective (an all-gather over the group), in the same order
on every rank.
"""

from numba_ep import reference
from numba_ep.cpu.intranode import _gather, _host

#: the handle's items, in DeepEP's order
HANDLE_ITEMS = ("is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix",
                "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum",
                "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum", "recv_src_meta",
                "send_rdma_head", "send_nvl_head")


def dispatch(ctx, num_gpus_per_node, num_channels, x, x_scales, topk_idx, topk_weights,
             is_token_in_rank, num_tokens_per_expert, num_experts, expert_alignment):
    """One rank's ``reference.internode_dispatch`` result (a dict with the intranode outputs and
    the handle items), from every rank's host arrays. ``x`` is any [T, H] array (rows travel as
    bytes); without ``topk_idx`` the routing is ``is_token_in_rank`` (a cached dispatch).
    Collective."""
    parts = _gather(ctx, (_host(x), _host(x_scales), _host(topk_idx), _host(topk_weights),
                          _host(is_token_in_rank), _host(num_tokens_per_expert)))
    with_topk = parts[0][2] is not None
    with_counts = parts[0][5] is not None
    return reference.internode_dispatch(
        [p[0] for p in parts], [p[2] for p in parts] if with_topk else None,
        [p[3] for p in parts] if with_topk else None,
        num_experts if (with_topk or with_counts) else None, num_channels, num_gpus_per_node,
        x_scales=[p[1] for p in parts] if parts[0][1] is not None else None,
        expert_alignment=expert_alignment,
        is_token_in_rank=None if with_topk else [p[4] for p in parts],
        num_tokens_per_expert=[p[5] for p in parts] if not with_topk and with_counts
        else None)[ctx.rank]


def combine(ctx, x_bf16, topk_weights, handle, bias0, bias1):
    """``(combined [T, H] bf16, combined_topk_weights [T, K] float32 or None)`` of this rank
    from every rank's ``x`` ([N, H] bf16 rows of its dispatch) and handle (a dict of
    HANDLE_ITEMS). Collective."""
    parts = _gather(ctx, (_host(x_bf16), _host(topk_weights),
                          {k: _host(v) for k, v in handle.items()}))
    bias = [None] * ctx.num_ranks
    bias[ctx.rank] = (bias0, bias1)
    with_w = parts[0][1] is not None
    return reference.internode_combine(
        [p[0] for p in parts], [p[2] for p in parts],
        topk_weights=[p[1] for p in parts] if with_w else None, bias=bias)[ctx.rank]
