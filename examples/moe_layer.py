"""A mixture-of-experts layer spread over ranks with numba_ep, in PyTorch: forward and backward.

    python examples/moe_layer.py              # every local GPU, one process each
    python examples/moe_layer.py --ranks 3    # 3 processes; on a machine without a GPU the
                                              # Buffer runs on numba_ep's CPU backend (slow)
    python examples/moe_layer.py --ranks 4 --gpus-per-node 2   # as 2 nodes of 2: internode mode
    mpirun -n 2 python examples/moe_layer.py --mpi

Each rank holds TOKENS tokens and EXPERTS / ranks experts. One training step:

    route     logits = x @ router, top-K experts per token, softmax weights over the K
    layout    Buffer.get_dispatch_layout: which ranks each token must visit
    dispatch  each token travels once to every rank that hosts one of its experts, with its
              top-k ids made local there (-1 for experts elsewhere) and its weights
    experts   each rank runs its experts on the rows that chose them and adds them up per row,
              weighted: y[row] = sum over local slots k of w[row, k] * expert_k(x[row])
    combine   y travels back and is summed over the ranks the token visited (an unweighted sum:
              the weights were applied in the previous step)
    backward  numba_ep.autograd: the gradient of a dispatch is a combine, the gradient of a
              combine is a cached dispatch, so gradients reach x, the router and every rank's
              experts (an expert's gradient gathers the tokens of every rank that chose it)

Bytes per forward at the default sizes, per rank: dispatch sends each token to ~R*(1-(1-1/R)^K)
ranks, 2*HIDDEN bytes each, and combine sends the same rows back; backward moves the same bytes
again. Every rank checks its output and the gradients of x, the router and its experts against
the same layer computed densely with autograd (every expert run on every token, no
communication; the experts' dense gradients summed over the ranks).
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
    """One MoE layer, differentiable: x ``[T, HIDDEN] bfloat16`` -> ``[T, HIDDEN] bfloat16``.
    numba_ep.autograd.dispatch is Buffer.get_dispatch_layout + Buffer.dispatch, and its backward
    is a Buffer.combine; numba_ep.autograd.combine's backward is a cached Buffer.dispatch."""
    from numba_ep import autograd

    topk_idx, topk_weights = route(x, router, torch)
    recv_x, recv_idx, recv_w, counts, handle = autograd.dispatch(buf, x, topk_idx, topk_weights,
                                                                 EXPERTS)
    # counts[l] = (token, slot) pairs for local expert l: the sizes a grouped GEMM would use
    y = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
    for local, weights in enumerate(local_experts):
        rows, slots = (recv_idx == local).nonzero(as_tuple=True)
        assert rows.numel() == counts[local]
        if rows.numel():
            y.index_add_(0, rows, recv_w[rows, slots, None] * expert(recv_x[rows].float(),
                                                                      weights))
    return autograd.combine(buf, y, handle), topk_idx, topk_weights


def dense_reference(x, topk_idx, topk_weights, experts, torch):
    """The same layer with every expert local: sum_k w[t, k] * expert_{idx[t, k]}(x[t])."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(EXPERTS):
        rows, slots = (topk_idx == e).nonzero(as_tuple=True)
        if rows.numel():
            out.index_add_(0, rows, topk_weights[rows, slots, None] *
                           expert(x[rows].float(), experts[e]))
    return out


def _leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def rank_main(group=None):
    """One rank: build its experts and tokens, run the layer forward and backward, and compare
    the output and every gradient with the dense layer's."""
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
        experts = [_leaves(expert_weights(e, torch, device)) for e in range(EXPERTS)]
        router = torch.randn(HIDDEN, EXPERTS, generator=torch.Generator().manual_seed(7))
        router = router.to(device).requires_grad_()
        x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(rank))
        x = x.to(device=device, dtype=torch.bfloat16).requires_grad_()
        grad_out = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(99 + rank))
        grad_out = grad_out.to(device)

        # this rank's experts only; backward is collective, like forward
        out, _, _ = moe_forward(buf, x, router, experts[rank * L:(rank + 1) * L], torch)
        (out.float() * grad_out).sum().backward()

        # the dense layer on this rank's tokens, every expert here, from fresh leaves
        dense_experts = [_leaves(w) for w in experts]
        xd, rd = _leaves((x, router))
        idx_d, w_d = route(xd, rd, torch)
        want = dense_reference(xd, idx_d, w_d, dense_experts, torch)
        (want * grad_out).sum().backward()
        # an expert's gradient sums the contributions of every rank's tokens
        mine = [[w.grad.cpu().numpy() for w in pair] for pair in dense_experts]
        every = group.allgather_object(mine)

        def diff(a, b):
            a = a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else a
            b = b.detach().float().cpu().numpy() if isinstance(b, torch.Tensor) else b
            return reference.calc_diff(a, b)

        diffs = {"output": diff(out, want), "x.grad": diff(x.grad, xd.grad),
                 "router.grad": diff(router.grad, rd.grad)}
        diffs["expert grads"] = max(
            diff(experts[e][j].grad, sum(g[e][j] for g in every))
            for e in range(rank * L, (rank + 1) * L) for j in range(2))
    finally:
        buf.destroy()
    # bf16 rows summed over up to TOPK ranks, both ways: a few bf16 roundings of error
    mode = f", {R // buf.num_gpus_per_node} nodes" if buf.num_gpus_per_node < R else ""
    return {"rank": rank, "backend": buf.backend, "mode": mode, "tokens": TOKENS,
            "diffs": diffs, "ok": all(d < 1e-4 for d in diffs.values())}


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
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in r["diffs"].items())
        print(f"rank {r['rank']} ({r['backend']}{r['mode']}): {r['tokens']} tokens through the "
              f"MoE layer and back; calc_diff vs dense: {diffs} {'ok' if r['ok'] else 'WRONG'}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
