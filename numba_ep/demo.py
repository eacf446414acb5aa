"""What ``python -m numba_ep demo`` runs.

CPU-only machine: the layout kernel in numba's CUDA simulator (small problem) checked against the
NumPy reference, then a reference dispatch -> combine round trip on a small random problem.
GPU machine: one process per GPU; on each, the layout kernel at full size against the reference,
an IPC buffer exchange and a device barrier across all ranks, and whatever dispatch/combine paths
the library has.
"""
from __future__ import annotations

import time

import numpy as np


def _random_topk(rng, num_tokens, num_experts, num_topk, drop=0.1):
    """Distinct experts per token (like a router's top-k), with some slots set to -1."""
    scores = rng.random((num_tokens, num_experts))
    idx = np.argsort(-scores, axis=1)[:, :num_topk].astype(np.int64)
    idx[rng.random(idx.shape) < drop] = -1
    return idx


def cpu_demo() -> int:
    """Simulator + reference demo; returns a process exit code."""
    from numba_ep import reference
    from numba_ep.kernels.layout import get_dispatch_layout

    rng = np.random.default_rng()
    R, E, K, T = 2, 8, 2, 5
    print("numba_ep demo on the CPU (no GPU visible): numba CUDA simulator + NumPy reference")
    topk = _random_topk(rng, T, E, K)
    t0 = time.perf_counter()
    got = get_dispatch_layout(topk, E, R, num_gpus_per_node=1)
    want = reference.get_dispatch_layout(topk, E, R, num_gpus_per_node=1)
    ok_layout = all(np.array_equal(g, w) for g, w in zip(got, want))
    print(f"  layout kernel in the simulator: {T} tokens, top-{K} of {E} experts, {R} ranks: "
          f"{'matches the reference' if ok_layout else 'MISMATCH'} "
          f"({time.perf_counter() - t0:.1f} s)")

    # Reference round trip: dispatch to R ranks, combine back; every token comes back multiplied
    # by the number of ranks it visited (normal combine is an unweighted sum).
    T, H, E, K, C = 64, 256, 16, 4, 4
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]
    idx = [_random_topk(rng, T, E, K) for _ in range(R)]
    w = [rng.random((T, K)).astype(np.float32) for _ in range(R)]
    out = reference.intranode_dispatch(xs, idx, w, E, C)
    combined = reference.intranode_combine([o["recv_x"] for o in out], out)
    ok_rt = True
    for r in range(R):
        visits = out[r]["is_token_in_rank"].sum(1, keepdims=True).astype(np.float32)
        ok_rt &= bool(np.allclose(combined[r][0], xs[r] * visits, rtol=1e-6, atol=1e-6))
    n_recv = [o["num_recv_tokens"] for o in out]
    print(f"  reference dispatch -> combine: {R} ranks x {T} tokens x {H}, top-{K} of {E} experts, "
          f"{C} channels; received {n_recv} tokens; round trip "
          f"{'matched' if ok_rt else 'DID NOT match'}")
    # The Buffer API itself on the CPU backend: two spawned ranks, NumPy arrays in and out.
    from numba_ep.group import spawn

    t0 = time.perf_counter()
    results = spawn(_cpu_rank, R, timeout=300)
    ok_buf = all(ok for ok, _ in results)
    for r, (_, line) in enumerate(results):
        print(f"  [rank {r}] {line}")
    print(f"  Buffer on the CPU backend, {R} spawned ranks: "
          f"{'ok' if ok_buf else 'FAILED'} ({time.perf_counter() - t0:.1f} s)")
    ok = ok_layout and ok_rt and ok_buf
    print("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _experts_for(group, about):
    """``about`` experts rounded up to a multiple of the rank count (any rank count works)."""
    return -(-about // group.size) * group.size


def _cpu_rank(group, num_experts=None, num_tokens=256, num_topk=4, hidden=1024):
    """One rank of the CPU demo: Buffer.get_dispatch_layout -> dispatch -> combine(recv_x) with
    NumPy arrays (numba_ep.cpu backend); combine must give x times the ranks it visited.
    ``num_experts`` defaults to about 16 (a multiple of the rank count)."""
    import os

    import ml_dtypes

    from numba_ep import reference
    from numba_ep.buffer import Buffer

    os.environ["NUMBA_EP_BACKEND"] = "cpu"
    num_experts = num_experts or _experts_for(group, 16)
    rng = np.random.default_rng()
    x = rng.standard_normal((num_tokens, hidden)).astype(ml_dtypes.bfloat16)
    topk = _random_topk(rng, num_tokens, num_experts, num_topk)
    w = rng.random((num_tokens, num_topk)).astype(np.float32)
    cfg = Buffer.get_dispatch_config(group.size)
    buf = Buffer(group, cfg.get_nvl_buffer_size_hint(hidden * 2, group.size),
                 explicitly_destroy=True)
    try:
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, num_experts)
        recv_x, recv_topk, recv_w, counts, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk, topk_weights=w)
        combined, _, _ = buf.combine(recv_x, handle)
        visits = in_rank.sum(1, keepdims=True).astype(np.float32)
        exact = (x.astype(np.float32) * visits).astype(ml_dtypes.bfloat16)
        # Values, not bits: a token sent nowhere (every top-k slot -1) comes back as +0.0
        # where x * 0 is -0.0 for negative x.
        ok = np.array_equal(combined.astype(np.float32), exact.astype(np.float32))
        line = (f"dispatch {num_tokens} x {hidden} BF16, top-{num_topk} of {num_experts}: "
                f"received {recv_x.shape[0]} rows, per-expert {counts}; combine "
                f"{'= x * visits, exactly' if ok else 'WRONG'}")
        ok = ok and reference.calc_diff(combined.astype(np.float64),
                                        exact.astype(np.float64)) == 0
    finally:
        buf.destroy()
    return ok, line


def _gpu_rank(group, num_experts=None, num_tokens=4096, num_topk=8, hidden=7168):
    """One rank of the GPU demo (runs in its own process). ``num_experts`` defaults to about 256
    (a multiple of the rank count)."""
    import pickle

    import cupy as cp
    import ml_dtypes

    from numba_ep import reference
    from numba_ep.buffer import Buffer
    from numba_ep.kernels.barrier import barrier
    from numba_ep.kernels.layout import get_dispatch_layout
    from numba_ep.memory import IpcBuffer

    num_experts = num_experts or _experts_for(group, 256)
    lines = []
    rng = np.random.default_rng()
    topk = _random_topk(rng, num_tokens, num_experts, num_topk)
    got = get_dispatch_layout(cp.asarray(topk), num_experts, group.size)
    want = reference.get_dispatch_layout(topk, num_experts, group.size)
    ok = all(np.array_equal(cp.asnumpy(g) if g is not None else None, w) if w is not None else g is None
             for g, w in zip(got, want))
    lines.append(f"layout {num_tokens}x top-{num_topk} of {num_experts}: {'ok' if ok else 'WRONG'}")
    with IpcBuffer(group, 1 << 20) as buf:
        barrier(buf, group.rank, group.size)  # compiles (or loads) the kernel once
        t0 = time.perf_counter()
        for _ in range(10):
            barrier(buf, group.rank, group.size)
        dt = (time.perf_counter() - t0) / 10
        lines.append(f"IPC buffer + device barrier across {group.size} ranks: ok "
                     f"({dt * 1e6:.0f} us per checked barrier)")

    # Intranode dispatch -> combine through the DeepEP-style Buffer, checked against the reference.
    x = rng.standard_normal((num_tokens, hidden)).astype(ml_dtypes.bfloat16)
    w = rng.random((num_tokens, num_topk)).astype(np.float32)
    gathered = [pickle.loads(b) for b in group.allgather_bytes(pickle.dumps((x.view(np.uint16), topk, w)))]
    xs, topks, ws = map(list, zip(*gathered))
    cfg = Buffer.get_dispatch_config(group.size)
    ref = reference.intranode_dispatch([a.view(ml_dtypes.bfloat16) for a in xs], topks, ws,
                                       num_experts, cfg.num_sms // 2)[group.rank]
    hint = max(cfg.get_nvl_buffer_size_hint(hidden * 2, group.size),
               Buffer.get_combine_config(group.size).get_nvl_buffer_size_hint(hidden * 2, group.size))
    buffer = Buffer(group, hint, explicitly_destroy=True)
    try:
        topk_d = cp.asarray(topk)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_d, num_experts)
        t0 = time.perf_counter()
        recv_x, recv_topk, recv_w, per_expert_list, handle, _ = buffer.dispatch(
            cp.asarray(x.view(np.uint16)), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_d, topk_weights=cp.asarray(w),
            config=cfg)
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
        cp.cuda.Device().synchronize()
        dt = time.perf_counter() - t0
        ok_d = (np.array_equal(cp.asnumpy(recv_x), ref["recv_x"].view(np.uint16))
                and np.array_equal(cp.asnumpy(recv_topk), ref["recv_topk_idx"])
                and per_expert_list == list(ref["num_recv_tokens_per_expert_list"]))
        visits = ref["is_token_in_rank"].sum(1, keepdims=True).astype(np.float32)
        got_c = cp.asnumpy(combined).view(ml_dtypes.bfloat16).astype(np.float32)
        sent = visits[:, 0] > 0  # tokens whose every slot is -1 come back as zeros
        diff = reference.calc_diff(got_c[sent] / visits[sent], x.astype(np.float32)[sent])
        ok_c = diff < 5e-6
        lines.append(f"Buffer.dispatch -> combine, {num_tokens} x {hidden} BF16, top-{num_topk}: "
                     f"received {recv_x.shape[0]} rows, dispatch {'exact' if ok_d else 'WRONG'}, "
                     f"combine calc_diff {diff:.2e} ({'ok' if ok_c else 'WRONG'}); first call "
                     f"{dt * 1e3:.0f} ms incl. compiling")
        ok = ok and ok_d and ok_c
    finally:
        group.barrier()
        buffer.destroy()
    return ok, lines


def mpi_demo(cpu=False) -> int:
    """This process as one rank of the MPI job: ``_gpu_rank`` on its GPU, or with ``cpu`` the
    Buffer round trip of ``_cpu_rank`` on the CPU backend (so ``mpirun`` works on a machine
    without a GPU too); prints this rank's report."""
    from numba_ep.group import as_group

    group = as_group(None)
    if cpu:
        ok, line = _cpu_rank(group)
        lines = [f"CPU backend, {group.size} MPI ranks: {line}"]
    else:
        ok, lines = _gpu_rank(group)
    for line in lines:
        print(f"[rank {group.rank}] {line}", flush=True)
    return 0 if ok else 1


def gpu_demo(num_ranks=None) -> int:
    """Run ``_gpu_rank`` on every local GPU, one spawned process each; print each report."""
    from numba_ep.group import gpu_count, spawn

    n = num_ranks or gpu_count()
    print(f"numba_ep demo on {n} GPU(s), one process each")
    results = spawn(_gpu_rank, n)
    for r, (ok, lines) in enumerate(results):
        for line in lines:
            print(f"[rank {r}] {line}")
    good = all(ok for ok, _ in results)
    print("demo " + ("passed" if good else "FAILED"))
    return 0 if good else 1
