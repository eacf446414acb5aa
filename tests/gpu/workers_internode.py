"""Spawn targets for test_internode_gpu.py: numba_ep.Buffer in internode normal mode on GPUs, one
function per rank. NUMBA_EP_GPUS_PER_NODE (set by the test) splits the ranks into nodes, so one
host runs the network code path: peers on other "nodes" are reached by NVSHMEM puts only.

Every rank builds every rank's inputs from the seed and runs numba_ep.reference for the whole
group: dispatch must equal reference.internode_dispatch bit for bit (recv_x, scales, top-k,
weights, per-expert counts and all 10 handle items); combine must pass DeepEP's calc_diff bound
(5e-6; the GPU sums each node's rows first and sends that partial sum as BF16, the reference
sums everything in fp32) and weights must match to float32 rounding.
"""
import numpy as np

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep import reference as ref

BF16 = ref.bfloat16

#: (tokens per rank by rank % 6, hidden, experts per rank, top-k, share of -1 slots)
SMALL = ((0, 37, 1, 300, 64, 9), 512, 4, 4, 0.2)
BIG = ((2048,) * 6, 7168, None, 8, 0.0)       # None: 256 experts
RDMA_BYTES = 1 << 30


def _experts(case, R):
    return 256 if case[2] is None else case[2] * R


def kernel_specs(layout):
    """Every kernel the suite launches at ``layout = (R, G)``: for tests/gpu/parallel_compile."""
    from numba_ep import Buffer
    from numba_ep.kernels import internode as I

    R, G = layout
    C = Buffer.get_dispatch_config(R).num_channels
    nf = False   # one host: NVSHMEM maps every rank, so no put needs a NIC fence
    specs = [I.sync_spec(R, G), I.notify_spec(R, G, C, 0)]
    for case in (SMALL, BIG):
        E, H, K = _experts(case, R), case[1], case[3]
        specs += [I.notify_spec(R, G, C, E), I.dispatch_spec(R, G, C, E, 2 * H, 0, K, nf),
                  I.combine_spec(R, G, C, H, K, nf), I.combine_spec(R, G, C, H, 0, nf)]
    H = SMALL[1]
    specs.append(I.dispatch_spec(R, G, C, 0, H, H // 128, 0, nf))   # cached FP8 with scales
    return specs


def _inputs(seed, case, R):
    tokens, H, _, K, masked = case
    E = _experts(case, R)
    xs, topks, ws = [], [], []
    for r in range(R):
        g = np.random.default_rng([seed, r])
        t = tokens[r % 6]
        xs.append(g.standard_normal((t, H)).astype(np.float32).astype(BF16))
        k = np.argsort(g.random((t, E)), axis=1)[:, :K].astype(np.int64)
        k[g.random(k.shape) < masked] = -1
        topks.append(k)
        ws.append(g.random((t, K)).astype(np.float32))
    return xs, topks, ws, E


def _host(a):
    """NumPy copy of a CuPy array or a torch tensor (bf16 as uint16 bits, fp8 as uint8)."""
    import cupy

    if isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    if hasattr(a, "cpu"):
        import torch

        if a.dtype == torch.bfloat16:
            return a.view(torch.int16).cpu().numpy().view(np.uint16)
        if a.dtype == torch.float8_e4m3fn:
            return a.view(torch.uint8).cpu().numpy()
        return a.cpu().numpy()
    return np.asarray(a)


def _bits(a):
    a = _host(a)
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _round_trip(buf, seed, case, torch_side=False):
    """Layout, dispatch, cached FP8 dispatch, combine (weights, bias pair) of one case, each
    checked on this rank. Returns the rows this rank received."""
    import cupy

    from numba_ep import Buffer
    from numba_ep.cpu.internode import HANDLE_ITEMS

    R, rank, G = buf.group_size, buf.rank, buf.num_gpus_per_node
    xs, topks, ws, E = _inputs(seed, case, R)
    H = case[1]
    cfg = Buffer.get_dispatch_config(R)
    C = cfg.num_channels
    if torch_side:
        import torch

        dev = torch.device("cuda", buf.device)

        def put(a):
            if a.dtype == BF16:
                return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(dev)
            return torch.from_numpy(np.ascontiguousarray(a)).to(dev)
    else:   # CuPy has no bfloat16: its arrays carry BF16 as uint16 bits
        def put(a):
            return cupy.asarray(a.view(np.uint16) if a.dtype == BF16 else a)
    x = put(xs[rank])
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(put(topks[rank]), E)
    want_layout = ref.get_dispatch_layout(topks[rank], E, R, G)
    np.testing.assert_array_equal(_host(per_rdma), want_layout[1])

    all_want = ref.internode_dispatch(xs, topks, ws, E, C, G)
    want = all_want[rank]
    recv_x, recv_topk, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=put(topks[rank]),
        topk_weights=put(ws[rank]), config=cfg)
    assert len(handle) == 10
    np.testing.assert_array_equal(_bits(recv_x), want["recv_x"].view(np.uint16))
    np.testing.assert_array_equal(_host(recv_topk), want["recv_topk_idx"])
    np.testing.assert_array_equal(_host(recv_w), want["recv_topk_weights"])
    assert counts == [int(v) for v in want["num_recv_tokens_per_expert_list"]], counts
    for name, item in zip(HANDLE_ITEMS, handle):
        np.testing.assert_array_equal(_host(item), want[name], err_msg=name)

    # cached: FP8 rows with column-major scales follow the same routes
    casts = [ref.per_token_cast_to_fp8(v) for v in xs]
    want8 = ref.internode_dispatch([c[0] for c in casts], None, None, None, C, G,
                                   x_scales=[c[1] for c in casts],
                                   is_token_in_rank=[ref.get_dispatch_layout(t, E, R)[3]
                                                     for t in topks])[rank]
    x8, s8 = casts[rank]
    if torch_side:
        x8d = torch.from_numpy(x8.view(np.uint8)).to(dev).view(torch.float8_e4m3fn)
        s8d = torch.from_numpy(s8.T.copy()).to(dev).T
    else:
        x8d = cupy.asarray(x8.view(np.uint8))
        s8d = cupy.asfortranarray(cupy.asarray(s8))
    (r8, rs8), *rest = buf.dispatch((x8d, s8d), handle=handle, config=cfg)
    assert rest[:4] == [None, None, None, None]
    np.testing.assert_array_equal(_host(r8).view(np.uint8), want8["recv_x"].view(np.uint8))
    np.testing.assert_array_equal(_host(rs8), want8["recv_x_scales"])

    # combine: random expert outputs, the received weights, a bias pair
    ys = [np.random.default_rng([seed, r, 7]).standard_normal(
        (int(all_want[r]["num_recv_tokens"]), H)).astype(np.float32).astype(BF16)
        for r in range(R)]
    tokens = [len(v) for v in xs]
    biases = [(np.random.default_rng([seed, r, 8]).standard_normal((t, H)).astype(np.float32)
               .astype(BF16), np.full((t, H), 0.5, BF16)) for r, t in enumerate(tokens)]
    want_c = ref.internode_combine(ys, all_want, [w["recv_topk_weights"] for w in all_want],
                                   biases)[rank]
    y = put(ys[rank])
    b = tuple(put(v) for v in biases[rank])
    combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=b,
                                          config=Buffer.get_combine_config(R))
    got = _bits(combined).view(BF16)
    diff = ref.calc_diff(got.astype(np.float64), want_c[0].astype(np.float64))
    assert diff < 5e-6, f"combine calc_diff {diff}"
    np.testing.assert_allclose(_host(combined_w), want_c[1],
                               rtol=1e-6, atol=1e-7)
    # without weights or bias: DeepEP's own check, combine(recv_x) = x * copies
    combined2, none_w, _ = buf.combine(recv_x, handle)
    assert none_w is None
    copies = _host(in_rank).sum(axis=1).astype(np.float32)
    got2 = _bits(combined2).view(BF16)
    want2 = (xs[rank].astype(np.float32) * copies[:, None]).astype(np.float64)
    diff2 = ref.calc_diff(got2.astype(np.float64), want2)
    assert diff2 < 5e-6, f"combine(recv_x) calc_diff {diff2}"
    return int(want["num_recv_tokens"])


def suite(group, seed):
    """The small case three times in a row (fresh inputs; epochs and meta halves advance), the
    small case with torch tensors, then the large one (2048 tokens x 7168, top-8 of 256)."""
    from numba_ep import Buffer

    R = group.size
    cfg = Buffer.get_dispatch_config(R)
    buf = Buffer(group, cfg.get_nvl_buffer_size_hint(2 * 7168, R), num_rdma_bytes=RDMA_BYTES,
                 explicitly_destroy=True)
    try:
        assert buf.num_gpus_per_node < R, "the test sets NUMBA_EP_GPUS_PER_NODE below R"
        received = [_round_trip(buf, seed + i, SMALL) for i in range(3)]
        received.append(_round_trip(buf, seed + 3, SMALL, torch_side=True))
        received.append(_round_trip(buf, seed + 4, BIG))
    finally:
        buf.destroy()
    return received


def timeout_absent_peer(group, timeout_s=2.0):
    """2 ranks as 2 nodes of 1: after one round trip together, rank 1 skips a dispatch; rank 0
    must raise CommTimeoutError naming rank 1 within seconds (its notify waits for rank 1's
    meta), and refuse further work. Both ranks then destroy the Buffer together.

    The round trip first matters: the first internode call of a Buffer clears its header between
    two group barriers, which would catch the absent rank before notify does."""
    import time

    import cupy

    from numba_ep import Buffer
    from numba_ep.errors import CommTimeoutError

    rank = group.rank
    xs, topks, ws, E = _inputs(7, SMALL, group.size)
    buf = Buffer(group, num_rdma_bytes=64 << 20, timeout_s=timeout_s, explicitly_destroy=True)
    x = cupy.asarray(xs[rank].view(np.uint16))
    topk, w = cupy.asarray(topks[rank]), cupy.asarray(ws[rank])
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, E)
    kw = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
              is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk,
              topk_weights=w, config=Buffer.get_dispatch_config(group.size))
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, **kw)
    buf.combine(recv_x, handle, topk_weights=recv_w)
    cupy.cuda.get_current_stream().synchronize()
    group.barrier()
    result = {"rank": rank}
    if rank == 0:
        t0 = time.monotonic()
        try:
            buf.dispatch(x, **kw)
            result["error"] = None
        except CommTimeoutError as e:
            result.update(error=str(e), peer=e.peer, what=e.what)
        result["elapsed"] = time.monotonic() - t0
        try:
            buf.dispatch(x, **kw)
            result["after"] = "no error"
        except RuntimeError as e:
            result["after"] = str(e)
    group.barrier()       # rank 1 waits here while rank 0 times out
    buf.destroy()         # collective
    return result
