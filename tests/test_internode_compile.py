"""CPU-only checks of numba_ep.kernels.internode (no GPU needed): the buffer layout the kernels
and the host agree on, the size checks, and that the kernels compile and link NVSHMEM for sm_90.
The kernels themselves run in tests/gpu/test_internode_gpu.py."""
from types import SimpleNamespace

import pytest

import numba_ep  # noqa: F401  (NumPy shim before numba.cuda)
from numba_ep.kernels import ptx as P

pytestmark = pytest.mark.skipif(P.SIMULATOR, reason="compile tests need the real CUDA target, "
                                "not NUMBA_ENABLE_CUDASIM=1")

from numba_ep.kernels import internode as I  # noqa: E402


@pytest.mark.parametrize("R,N", [(2, 2), (4, 2), (16, 2), (32, 4)])
def test_header_regions_are_disjoint_and_aligned(R, N):
    h = I.header(R, N)
    words = {"meta_flag": R, "sync_flag": R, "disp_flag": N * I.MAX_CHANNELS,
             "comb_flag": N * I.MAX_CHANNELS, "staged": 1, "pub": R * I.MAX_CHANNELS,
             "meta_in": 2 * R * I.META_WORDS, "meta_out": R * I.META_WORDS}
    spans = sorted((h[k], h[k] + 4 * w) for k, w in words.items())
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0
    assert spans[-1][1] <= h["bytes"] and h["bytes"] % 128 == 0
    assert all(h[k] % 16 == 0 for k in words)   # meta slots are copied in 16-byte puts


def test_data_regions_follow_the_header():
    R, N, Tm = 4, 2, 300
    rec = I.record_bytes(7168 * 2, 0, 8, R)
    assert rec % 16 == 0 and rec >= 7168 * 2 + 8 * 8 + 4 * R
    send, recv, total = I.dispatch_offsets(R, N, Tm, rec)
    assert send == I.header(R, N)["bytes"] and recv >= send + Tm * rec
    assert total >= recv + N * Tm * rec
    crec = I.combine_record_bytes(7168, 8)
    assert crec == 7168 * 2 + 32
    csend, cred, cstage, ctotal = I.combine_offsets(R, N, Tm, crec, 1000)
    assert csend == send and cred >= csend + N * Tm * crec and cstage >= cred + N * Tm * crec
    assert ctotal >= cstage + 1000 * crec
    # the worst-case hint covers both for 300 tokens per rank
    assert I.rdma_size_hint(Tm, 7168 * 2, R, 2, num_topk=8) >= max(total, ctotal)


def test_peer_table_maps_my_node_only():
    ptrs = [100, 200, 300, 400]
    # rank 2 on nodes of 2: rank 3 is its NVLink peer, ranks 0 and 1 are another node (puts)
    assert I.node_peer_table(ptrs, 2, 2) == [0, 0, 300, 400]
    assert I.node_peer_table(ptrs, 0, 1) == [100, 0, 0, 0]
    with pytest.raises(RuntimeError, match="rank 1 is on this rank's node"):
        I.node_peer_table([100, 0, 300, 400], 0, 2)


def test_nic_fence_only_where_a_rank_of_another_node_is_unmapped():
    # one host: every rank mapped, puts to "other nodes" are NVLink copies by the warp
    assert I.nic_fence_needed([100, 200, 300, 400], 0, 2) is False
    # rank 3 (another node of rank 0) unmapped: a NIC carries puts there
    assert I.nic_fence_needed([100, 200, 300, 0], 0, 2) is True
    # an unmapped rank of my own node is node_peer_table's error, not a NIC's
    assert I.nic_fence_needed([100, 0, 300, 400], 0, 2) is False


@pytest.mark.slow
def test_per_record_fences_only_with_nic_fence(sm90):
    """The dispatch and combine kernels fence each record (dispatch) or partial sum (combine)
    before its put only when compiled with nic_fence; without it the PTX lacks exactly those
    fences (one per kernel in the code), the once-per-call fences stay."""
    from numba import cuda

    from numba_ep.launch import parse_signature

    for make_spec in (lambda nf: I.dispatch_spec(4, 2, 12, 64, 2 * 7168, 0, 8, nf),
                      lambda nf: I.combine_spec(4, 2, 12, 7168, 8, nf)):
        counts = []
        for nf in (True, False):
            factory, sig, kw = make_spec(nf)
            kw = dict(kw)
            kw.pop("launch_bounds")
            text, _ = cuda.compile(factory(**kw), parse_signature(sig), device=False, cc=(9, 0),
                                   output="ptx", abi="numba")
            counts.append(text.count("fence.acq_rel.sys"))
        assert counts[0] == counts[1] + 1, counts


def fake_ctx(R=4, G=2, rank=0, nbytes=1 << 20, unmapped=()):
    """An InternodeContext without a device: only what its checks read."""
    ctx = I.InternodeContext.__new__(I.InternodeContext)
    ctx.buffer = SimpleNamespace(nbytes=nbytes)
    ctx.rank, ctx.num_ranks, ctx.num_gpus_per_node, ctx.num_nodes = rank, R, G, R // G
    return ctx


def test_need_names_the_bytes():
    ctx = fake_ctx()
    ctx.need(1 << 20, "dispatch")
    with pytest.raises(ValueError, match=r"num_rdma_bytes: internode dispatch needs 1048577 bytes"):
        ctx.need((1 << 20) + 1, "dispatch")


@pytest.mark.slow
def test_kernels_compile_and_link_nvshmem(sm90):
    """notify, dispatch (BF16 with top-k; FP8 with scales and no top-k) and combine compile for
    sm_90 and need NVSHMEM's device library, at 2 x 2, 2 x 4 and 16 x 1."""
    from numba_ep.launch import compile_cubin, parse_signature

    for factory, sig, kw in (I.notify_spec(4, 2, 12, 64),
                             I.dispatch_spec(4, 2, 12, 64, 2 * 7168, 0, 8),
                             I.dispatch_spec(4, 2, 12, 0, 7168, 56, 0),
                             I.combine_spec(4, 2, 12, 7168, 8),
                             # 2 nodes of 4 (no machine lent for it yet) and 16 of 1
                             I.dispatch_spec(8, 4, 12, 256, 2 * 7168, 0, 8),
                             I.combine_spec(16, 1, 12, 7168, 8)):
        kw = dict(kw)
        bounds = kw.pop("launch_bounds", None)
        cubin, meta = compile_cubin(factory(**kw), parse_signature(sig), (9, 0),
                                    launch_bounds=bounds)
        assert meta["nvshmem"], factory.__name__
        assert len(cubin) > 1000
