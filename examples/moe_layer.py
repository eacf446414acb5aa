"""A mixture-of-experts layer spread over ranks with numba_ep, in PyTorch.

    python examples/moe_layer.py              # every local GPU, one process each
    python examples/moe_layer.py --ranks 3    # 3 processes; on a machine without a GPU the
                                              # Buffer runs on numba_ep's CPU backend (slow)
    python examples/moe_layer.py --ranks 4 --gpus-per-node 2   # as 2 nodes of 2: internode mode
    mpirun -n 2 python examples/moe_layer.py --mpi

Each rank holds TOKENS tokens and EXPERTS / ranks experts. One forward pass:

    route     logits = x @ router, top-K experts per token, softmax weights over the K
    layout    Buffer.get_dispatch_layout: which ranks each token must visit
    dispatch  each token travels once to every rank that hosts one of its experts, with its
              top-k ids made local there (-1 for experts elsewhere) and its weights
    experts   each rank runs its experts on the rows that chose them and adds them up per row,
              weighted: y[row] = sum over local slots k of w[row, k] * expert_k(x[row])
    combine   y travels back and is summed over the ranks the token visited (an unweighted sum:
              the weights were applied in the previous step)

Bytes per forward at the default sizes, per rank: dispatch sends each token to ~R*(1-(1-1/R)^K)
ranks, 2*HIDDEN bytes each, and combine sends the same rows back. Every rank checks its output
against the same layer computed densely (every expert run on every token, no communication).
"""
import argparse
import os

import numba_ep

HIDDEN, FFN, EXPERTS, TOPK, TOKENS = 256, 512, 24, 4, 96  # 24 experts: 1, 2, 3, 4, 6 or 8 ranks


def expert_weights(e, torch, device):
    """Expert e's two matrices, the same on every rank (seeded by e)."""
    g = torch.Generator().manual_seed(1000 + e)
    w1 = torch.randn(HIDDEN, FFN, generator=g) / HIDDEN ** 0.5
    w2 = torch.randn(FFN, HIDDEN, generator=g) / FFN ** 0.5
    return w1.to(device), w2.to(device)


def expert(x, weights):
    """A two-layer ReLU MLP in float32: ``[n, HIDDEN] -> [n, HIDDEN]``."""
    w1, w2 = weights
    return (x @ w1).clamp_min(0) @ w2


def route(x, router, torch):
    """Top-K experts per token and their softmax weights: ``[T, K] int64``, ``[T, K] float32``."""
    logits = x.float() @ router
    scores, idx = logits.topk(TOPK, dim=1)
    return idx, torch.softmax(scores, dim=1)


def moe_forward(buf, x, router, local_experts, torch):
    """One MoE layer: x ``[T, HIDDEN] bfloat16`` -> ``[T, HIDDEN] bfloat16``."""
    topk_idx, topk_weights = route(x, router, torch)
    # per_rdma: tokens per node, for internode mode (None when the ranks share one node)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, EXPERTS)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk_idx,
        topk_weights=topk_weights)
    # counts[l] = (token, slot) pairs for local expert l: the sizes a grouped GEMM would use
    y = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
    for local, weights in enumerate(local_experts):
        rows, slots = (recv_idx == local).nonzero(as_tuple=True)
        assert rows.numel() == counts[local]
        if rows.numel():
            y.index_add_(0, rows, recv_w[rows, slots, None] * expert(recv_x[rows].float(),
                                                                      weights))
    combined, _, _ = buf.combine(y.to(torch.bfloat16), handle)
    return combined, topk_idx, topk_weights


def dense_reference(x, topk_idx, topk_weights, torch):
    """The same layer with every expert local: sum_k w[t, k] * expert_{idx[t, k]}(x[t])."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(EXPERTS):
        rows, slots = (topk_idx == e).nonzero(as_tuple=True)
        if rows.numel():
            out.index_add_(0, rows, topk_weights[rows, slots, None] *
                           expert(x[rows].float(), expert_weights(e, torch, x.device)))
    return out


def rank_main(group=None):
    """One rank: build its experts and tokens, run the layer, compare with the dense layer."""
    import torch

    from numba_ep import reference

    group = numba_ep.group.as_group(group)
    R, rank = group.size, group.rank
    if EXPERTS % R:
        raise ValueError(f"--ranks: {EXPERTS} experts must split evenly, got {R} ranks")
    configs = (numba_ep.Buffer.get_dispatch_config(R), numba_ep.Buffer.get_combine_config(R))
    hint = max(cfg.get_nvl_buffer_size_hint(HIDDEN * 2, R) for cfg in configs)
    # Ranks on several nodes need an NVSHMEM buffer; the hint is 0 when they share one.
    gpus = numba_ep.Buffer.get_num_gpus_per_node(group)
    rdma = configs[0].get_rdma_buffer_size_hint(HIDDEN * 2, R, num_max_tokens=TOKENS,
                                                 num_gpus_per_node=gpus)
    buf = numba_ep.Buffer(group, hint, num_rdma_bytes=rdma, explicitly_destroy=True)
    try:
        device = "cpu" if buf.backend == "cpu" else f"cuda:{buf.device}"
        L = EXPERTS // R
        local_experts = [expert_weights(rank * L + i, torch, device) for i in range(L)]
        router = torch.randn(HIDDEN, EXPERTS, generator=torch.Generator().manual_seed(7)).to(device)
        x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(rank))
        x = x.to(device=device, dtype=torch.bfloat16)

        out, topk_idx, topk_weights = moe_forward(buf, x, router, local_experts, torch)
        want = dense_reference(x, topk_idx, topk_weights, torch)
        diff = reference.calc_diff(out.float().cpu().numpy(), want.cpu().numpy())
    finally:
        buf.destroy()
    # bf16 expert outputs summed over up to TOPK ranks: a few bf16 roundings of error
    mode = f", {R // buf.num_gpus_per_node} nodes" if buf.num_gpus_per_node < R else ""
    return {"rank": rank, "backend": buf.backend, "mode": mode, "tokens": TOKENS,
            "calc_diff": diff, "ok": diff < 1e-4}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=None, help="processes (default: local GPUs, "
                   "or 2 without a GPU)")
    p.add_argument("--mpi", action="store_true", help="this process is one MPI rank")
    p.add_argument("--gpus-per-node", type=int, default=None, help="split the ranks into "
                   "nodes of this many (internode mode; sets NUMBA_EP_GPUS_PER_NODE)")
    args = p.parse_args(argv)
    if args.gpus_per_node:
        os.environ["NUMBA_EP_GPUS_PER_NODE"] = str(args.gpus_per_node)   # spawned ranks inherit
    if args.mpi:
        results = [rank_main(None)]
    else:
        n = args.ranks or numba_ep.group.gpu_count() or 2
        results = numba_ep.spawn(rank_main, n)
    for r in results:
        print(f"rank {r['rank']} ({r['backend']}{r['mode']}): {r['tokens']} tokens through the "
              f"MoE layer, "
              f"calc_diff vs dense {r['calc_diff']:.2e} {'ok' if r['ok'] else 'WRONG'}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
