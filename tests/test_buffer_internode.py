"""Buffer's internode GPU path above the kernels, on the CPU (no GPU needed).

``Buffer._host_mode`` runs every line of ``Buffer.dispatch`` / ``combine`` that a GPU run does
(checks, allocation, the handle and its device views, cached mode), with
``numba_ep.kernels.internode``'s entry points replaced by an emulator that answers from
``reference.internode_dispatch`` and records what it was given. The kernels themselves run in
tests/gpu/test_internode_gpu.py.
"""
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep import reference
from numba_ep.buffer import Buffer
from numba_ep.config import Config
from numba_ep.cpu.internode import HANDLE_ITEMS
from numba_ep.kernels import internode

BF16 = np.dtype(ml_dtypes.bfloat16)
R, G, E, K, H = 4, 2, 16, 4, 256
CONFIG = Config(8, 6, 64)
C = CONFIG.num_channels
BIG = 1 << 30


def problem(seed, tokens=(37, 0, 1, 20)):
    rng = np.random.default_rng(seed)
    xs, topks, ws = [], [], []
    for t in tokens:
        xs.append(rng.standard_normal((t, H)).astype(np.float32).astype(BF16))
        k = np.argsort(rng.random((t, E)), axis=1)[:, :K].astype(np.int64)
        k[rng.random(k.shape) < 0.2] = -1
        topks.append(k)
        ws.append(rng.random((t, K)).astype(np.float32))
    return xs, topks, ws


class Emulator:
    """Stand-ins for the internode entry points of rank ``rank``, answering from the reference
    of the whole group; ``calls`` records (name, arguments)."""

    def __init__(self, monkeypatch, rank, xs, topks, ws):
        self.calls = []
        want = reference.internode_dispatch(xs, topks, ws, E, C, G)
        self.want = want
        mine = want[rank]
        casts = [reference.per_token_cast_to_fp8(x) for x in xs]
        self.want8 = want8 = reference.internode_dispatch(
            [c[0] for c in casts], None, None, None, C, G, x_scales=[c[1] for c in casts],
            is_token_in_rank=[w["is_token_in_rank"] for w in want])[rank]
        tmax = max(len(x) for x in xs)
        emu = self

        class Ctx:
            def __init__(self, sym, rank_, num_ranks, gpus, timeout_s=None):
                emu.calls.append(("ctx", dict(rank=rank_, R=num_ranks, G=gpus)))
                self.num_nodes = num_ranks // gpus

        def notify(ctx, in_rank, per_expert, E_, C_, align, stream, counts=True):
            emu.calls.append(("notify", dict(E=E_, C=C_, per_expert=per_expert,
                                             counts=counts)))
            return tuple(np.array(mine[k]) for k in HANDLE_ITEMS[1:7])

        def wait_counts(ctx, L):
            emu.calls.append(("wait", dict(L=L)))
            return (int(mine["num_recv_tokens"]), int(mine["num_rdma_recv_tokens"]), tmax,
                    [int(v) for v in mine["num_recv_tokens_per_expert_list"]][:L])

        def dispatch(ctx, x_b, sc, topk, w, in_rank, prefixes, max_tokens, E_, C_, rx, rsc,
                     rtopk, rw, rmeta, rdma_head, nvl_head, stream):
            emu.calls.append(("dispatch", dict(x_b=x_b, sc=sc, topk=topk, max_tokens=max_tokens,
                                               E=E_, C=C_, rx=rx, rsc=rsc)))
            got = want8 if sc is not None else mine   # a cached FP8 dispatch, or the first
            rx[:] = np.asarray(got["recv_x"]).view(np.uint8).reshape(rx.shape)
            if rsc is not None:
                rsc[:] = got["recv_x_scales"]
            if rtopk is not None:
                rtopk[:] = mine["recv_topk_idx"]
                rw[:] = mine["recv_topk_weights"]
            rmeta[:] = mine["recv_src_meta"]
            rdma_head[:] = mine["send_rdma_head"]
            nvl_head[:] = mine["send_nvl_head"]

        def combine(ctx, xv, w, dev, max_tokens, b0, b1, out, out_w, C_, stream):
            emu.calls.append(("combine", dict(xv=xv, w=w, dev=dev, max_tokens=max_tokens,
                                              b0=b0, b1=b1, out=out, out_w=out_w, C=C_)))
            out[:] = 7
            if out_w is not None:
                out_w[:] = 0.5

        for name, fn in (("InternodeContext", Ctx), ("notify", notify),
                         ("wait_counts", wait_counts), ("dispatch", dispatch),
                         ("combine", combine)):
            monkeypatch.setattr(internode, name, fn)

    def names(self):
        return [c[0] for c in self.calls]

    def last(self, name):
        return [c[1] for c in self.calls if c[0] == name][-1]


def host_buffer(rank, rdma=BIG):
    buf = Buffer._host_mode(SimpleNamespace(rank=rank, size=R), num_nvl_bytes=BIG,
                            num_rdma_bytes=rdma)
    buf.num_gpus_per_node = G
    return buf


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_dispatch_cached_dispatch_and_combine_through_the_glue(monkeypatch, rank):
    xs, topks, ws = problem(11)
    emu = Emulator(monkeypatch, rank, xs, topks, ws)
    want = emu.want[rank]
    buf = host_buffer(rank)
    per_rank, per_rdma, per_expert, in_rank = reference.get_dispatch_layout(topks[rank], E, R, G)
    recv_x, recv_topk, recv_w, counts, handle, event = buf.dispatch(
        xs[rank], num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topks[rank],
        topk_weights=ws[rank], config=CONFIG)
    assert emu.names() == ["ctx", "notify", "wait", "dispatch"]
    assert emu.calls[0][1] == dict(rank=rank, R=R, G=G)
    assert emu.last("notify")["E"] == E and emu.last("notify")["C"] == C
    d = emu.last("dispatch")
    assert d["max_tokens"] == 37 and d["E"] == E and d["sc"] is None
    assert d["x_b"].dtype == np.uint8 and d["x_b"].shape == (len(xs[rank]), 2 * H)
    # outputs in the caller's kind and dtype, the handle in DeepEP's order
    assert recv_x.dtype == BF16 and recv_x.shape == (want["num_recv_tokens"], H)
    np.testing.assert_array_equal(recv_x.view(np.uint16), want["recv_x"].view(np.uint16))
    np.testing.assert_array_equal(recv_topk, want["recv_topk_idx"])
    np.testing.assert_array_equal(recv_w, want["recv_topk_weights"])
    assert counts == [int(v) for v in want["num_recv_tokens_per_expert_list"]]
    assert len(handle) == 10 and handle.max_tokens == 37 and handle.num_channels == C
    assert handle[0] is in_rank
    for name, item in zip(HANDLE_ITEMS[1:], handle[1:]):
        np.testing.assert_array_equal(item, want[name], err_msg=name)
    assert set(handle.dev) == set(HANDLE_ITEMS)
    assert event.event is None

    # cached: FP8 with column-major scales; no top-k, no per-expert counts (E = 0 to notify)
    x8, s8 = reference.per_token_cast_to_fp8(xs[rank])
    waits = emu.names().count("wait")
    (r8, rs8), *rest = buf.dispatch((x8, np.asfortranarray(s8)), handle=handle, config=CONFIG)
    assert rest[:4] == [None, None, None, None]
    # the handle knows the sizes: no host wait, and notify leaves the host counters alone
    assert emu.names().count("wait") == waits and emu.last("notify")["counts"] is False
    d = emu.last("dispatch")
    assert emu.last("notify")["E"] == 0 and emu.last("notify")["per_expert"] is None
    assert d["topk"] is None and d["sc"].shape == (len(xs[rank]), H // 128)
    if len(xs[rank]) > 1:   # column-major scales are passed as they are (strided)
        assert d["sc"].strides == (4, 4 * len(xs[rank]))
    assert r8.dtype == x8.dtype and rs8.shape == (want["num_recv_tokens"], H // 128)
    np.testing.assert_array_equal(r8.view(np.uint8), emu.want8["recv_x"].view(np.uint8))
    np.testing.assert_array_equal(rs8, emu.want8["recv_x_scales"])

    # combine: the handle's device views and Tm reach the kernel; outputs come back
    y = np.ones((want["num_recv_tokens"], H), BF16)
    bias = (np.zeros((len(xs[rank]), H), BF16), np.ones((len(xs[rank]), H), BF16))
    out, out_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=bias, config=CONFIG)
    c = emu.last("combine")
    assert c["max_tokens"] == 37 and c["C"] == C and c["dev"] is handle.dev
    assert c["xv"].dtype == np.uint16 and c["b0"] is not None and c["b1"] is not None
    assert out.dtype == BF16 and out.shape == (len(xs[rank]), H)
    assert (out.view(np.uint16) == 7).all() and (out_w == 0.5).all()


def test_internode_refusals(monkeypatch):
    xs, topks, ws = problem(12)
    Emulator(monkeypatch, 0, xs, topks, ws)
    buf = host_buffer(0)
    per_rank, per_rdma, per_expert, in_rank = reference.get_dispatch_layout(topks[0], E, R, G)
    kw = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
              num_tokens_per_expert=per_expert, topk_idx=topks[0], topk_weights=ws[0],
              config=CONFIG)
    with pytest.raises(ValueError, match="num_tokens_per_rdma_rank: required"):
        buf.dispatch(xs[0], **kw)
    with pytest.raises(ValueError, match="num_worst_tokens"):
        buf.dispatch(xs[0], num_tokens_per_rdma_rank=per_rdma, num_worst_tokens=64, **kw)
    _, _, _, _, handle, _ = buf.dispatch(xs[0], num_tokens_per_rdma_rank=per_rdma, **kw)
    y = np.ones((handle[7].shape[0], H), BF16)
    # a plain tuple lacks the batch's largest token count, which the GPU combine needs
    with pytest.raises(ValueError, match="handle object this Buffer's dispatch returned"):
        buf.combine(y, tuple(handle))
    with pytest.raises(TypeError, match="10-item handle"):
        buf.combine(y, tuple(handle)[:6])
    # no NVSHMEM buffer: internode mode says what it needs
    with pytest.raises(ValueError, match="num_rdma_bytes"):
        host_buffer(0, rdma=0).dispatch(xs[0], num_tokens_per_rdma_rank=per_rdma, **kw)
    # low-latency calls after internode use ask for a clean first
    with pytest.raises(ValueError, match="clean_low_latency_buffer"):
        buf._check_ll_sequence("low_latency_dispatch", 128, H, E)


def test_internode_refuses_graph_capture(monkeypatch):
    """Under capture, dispatch and combine raise before enqueuing anything."""
    import numba_ep.buffer as B

    xs, topks, ws = problem(13)
    emu = Emulator(monkeypatch, 0, xs, topks, ws)
    buf = host_buffer(0)
    per_rank, per_rdma, per_expert, in_rank = reference.get_dispatch_layout(topks[0], E, R, G)
    _, _, _, _, handle, _ = buf.dispatch(
        xs[0], num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topks[0],
        topk_weights=ws[0], config=CONFIG)
    before = len(emu.calls)
    real = B._Call.__init__

    def capturing(self, *a, **kw):
        real(self, *a, **kw)
        self.capturing = True

    monkeypatch.setattr(B._Call, "__init__", capturing)
    with pytest.raises(RuntimeError, match="dispatch: internode mode cannot be captured"):
        buf.dispatch(xs[0], handle=handle, config=CONFIG)
    y = np.ones((handle[7].shape[0], H), BF16)
    with pytest.raises(RuntimeError, match="combine: internode mode cannot be captured"):
        buf.combine(y, handle)
    assert len(emu.calls) == before   # nothing reached the kernels


def test_sixteen_ranks_need_no_nvlink_buffer(monkeypatch):
    """2 nodes of 8: internode mode keeps everything in the NVSHMEM buffer, so a Buffer without
    num_nvl_bytes gets past every check to the kernels (DeepEP's tables give its config)."""
    class Reached(Exception):
        pass

    def ctx(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(internode, "InternodeContext", ctx)
    R16, T = 16, 10
    buf = Buffer._host_mode(SimpleNamespace(rank=3, size=R16), num_rdma_bytes=BIG)
    assert buf.num_gpus_per_node == 8
    rng = np.random.default_rng(5)
    x = rng.standard_normal((T, H)).astype(np.float32).astype(BF16)
    topk = np.argsort(rng.random((T, 64)), axis=1)[:, :K].astype(np.int64)
    per_rank, per_rdma, per_expert, in_rank = reference.get_dispatch_layout(topk, 64, R16, 8)
    with pytest.raises(Reached):
        buf.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                     is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk,
                     topk_weights=np.ones((T, K), np.float32))
