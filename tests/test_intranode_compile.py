"""Intranode kernels on the CPU: every specialisation compiles and links for sm_90, the PTX holds
the memory-ordering and 16-byte instructions the design relies on, and the ring layout adds up."""
import pytest

import numba_ep  # noqa: F401
from numba import cuda

from numba_ep import launch
from numba_ep.kernels import intranode as I


def _ptx(fn, sig):
    ptx, _ = cuda.compile(fn, launch.parse_signature(sig), device=False, cc=(9, 0), output="ptx",
                          abi="numba")
    return ptx


@pytest.mark.parametrize("R", [1, 2, 3, 5, 7, 8])
def test_kernels_compile_and_link(R, sm90):
    """Exactly what the launchers build (their spec functions, TUNING and launch bounds
    included) compiles and links to an sm_90 cubin for every rank count."""
    C, N, row16, K, S, L = 4, 64, 448, 8, 56, 16
    specs = [I.notify_spec(R, C, L), I.cached_notify_spec(R, C),
             I.dispatch_spec(R, C, N, row16 * 16, K, S, L),
             I.dispatch_spec(R, C, N, row16 * 16, 0, S, L),  # cached
             I.combine_spec(R, C, N, row16 * 16, K)]
    for factory, sig, kw in specs:
        kw = dict(kw)
        bounds = kw.pop("launch_bounds", None)
        cubin, meta = launch.compile_cubin(factory(**kw), launch.parse_signature(sig), (9, 0),
                                           launch_bounds=bounds)
        assert cubin[:4] == b"\x7fELF"


def test_ptx_has_the_ordering_and_vector_instructions(sm90):
    R, C, N, row16, K, S, L = 2, 4, 64, 448, 8, 56, 16
    lay = I.RingLayout(R, C, N, row16 * 16, K, S)
    nc = "ld.global.nc.L1::no_allocate.L2::256B.v4.u32"
    d = _ptx(I.make_dispatch(R, C, N, row16, K, S, L, **lay.constants(), **I.TUNING),
             I.DISPATCH_SIG)
    for frag in ("st.release.sys.global.s32", "ld.acquire.sys.global", "bar.sync", nc,
                 "st.global.L1::no_allocate.v4.u32", "%globaltimer"):
        assert frag in d, frag
    c = _ptx(I.make_combine(R, C, N, row16, K, **lay.constants(), **I.TUNING), I.COMBINE_SIG)
    for frag in ("st.release.sys.global.s32", "ld.acquire.sys.global", "cvt.rn.bf16x2.f32", nc,
                 "st.global.L1::no_allocate.v4.u32"):
        assert frag in c, frag
    # unroll=8: eight 16-byte loads issued back to back before the first store of a round.
    first = d.index(nc)
    assert d[first:d.index("st.global.L1::no_allocate.v4.u32", first)].count(nc) >= 8
    # ring_nc=False: ring slots are read with volatile loads (x still through the nc path).
    v = _ptx(I.make_dispatch(R, C, N, row16, K, S, L, **lay.constants(), ring_nc=False, unroll=4),
             I.DISPATCH_SIG)
    assert "ld.volatile.global.v4.u32" in v and nc in v
    n = _ptx(I.make_notify_dispatch(R, C, L, lay.rank_counts, lay.chan_counts, lay.expert_counts,
                                    lay.tail, lay.head), I.NOTIFY_SIG)
    assert "atom.sys.global.add.s32" in n  # the barrier
    assert "st.release.sys" in n  # the host counter is published last


def test_ring_layout_sizes():
    lay = I.RingLayout(2, 12, 256, 14336, 8, 56)
    slots = 12 * 2 * 256
    assert lay.x >= lay.header_bytes and lay.header_bytes % 128 == 0
    assert lay.src - lay.x >= slots * 14336
    assert lay.total_bytes >= lay.scales + slots * 56 * 4
    assert all(getattr(lay, f) % 128 == 0 for f in ("x", "src", "topk", "weight", "scales"))
    # More slots, wider rows or more top-k never shrink the buffer.
    assert I.nvl_bytes_needed(2, 12, 512, 14336, 8, 56) > lay.total_bytes
    assert I.nvl_bytes_needed(2, 12, 256, 14352, 8, 56) > lay.total_bytes
    assert I.nvl_bytes_needed(2, 12, 256, 14336, 16, 56) > lay.total_bytes
    with pytest.raises(ValueError, match="16-byte"):
        I.RingLayout(2, 12, 256, 14338, 8, 56)


def test_ballot_mask_is_not_sign_extended(sm90):
    """Regression: a warp ballot is a signed 32-bit value in numba; widening it as is turned
    lane 31's bit into 32 phantom selected tokens (seen on H100 as rows overwritten with tokens
    past the end of the input)."""
    import re

    R, C, N, row16, K, S, L = 2, 1, 64, 32, 2, 0, 4
    lay = I.RingLayout(R, C, N, row16 * 16, K, S)
    ptx = _ptx(I.make_dispatch(R, C, N, row16, K, S, L, **lay.constants()), I.DISPATCH_SIG)
    regs = re.findall(r"vote\.sync\.ballot\.b32\s+(%r\d+)", ptx)
    assert regs
    # The token walk must see the ballot zero-extended (the buggy build only sign-extended it).
    assert any(re.search(r"cvt\.u64\.u32\s+%rd\d+,\s*" + re.escape(r) + r";", ptx) for r in regs)


@pytest.mark.parametrize("R", range(1, 9))
def test_every_rank_count_schedules(R):
    """Any rank count 1..8: each peer gets a warp group (named barrier ids 1..R stay under 16),
    and the default configs' buffer size hints hold the rings they describe."""
    from numba_ep.config import get_combine_config, get_dispatch_config

    assert I.WARPS // R >= 1 and R + 1 <= 16
    for cfg in (get_dispatch_config(R), get_combine_config(R)):
        C, N = cfg.num_sms // 2, cfg.num_max_nvl_chunked_recv_tokens
        assert N >= I.MIN_RECV_SLOTS
        hint = cfg.get_nvl_buffer_size_hint(7168 * 2, R)
        assert hint >= I.nvl_bytes_needed(R, C, N, 7168 * 2, 8, 7168 // 128)
        assert hint >= I.nvl_bytes_needed(R, C, N, 7168 * 2, 16, 0)


@pytest.mark.parametrize("R", range(1, 9))
def test_remote_warp_groups_cover_every_peer_once(R):
    """Dispatch receivers and combine senders split their 24 warps over the R - 1 other ranks
    (peer_group): for every rank, each other rank gets one group of WARPS // (R - 1) warps with
    in-group indices 0..n-1 and its own named barrier (ids 1..R-1), and no warp serves two."""
    peer_group = I.peer_group.py_func
    per = I.WARPS // max(R - 1, 1)
    for rank in range(R):
        groups = {}
        for warp in range(I.WARPS):
            peer, wg, grp = peer_group(warp, rank, R, per)
            if peer < 0:
                continue
            assert peer != rank and 0 <= peer < R and 1 <= grp + 1 <= R - 1 < 16
            groups.setdefault(peer, []).append((wg, grp))
        assert set(groups) == set(range(R)) - {rank}
        for peer, members in groups.items():
            assert sorted(wg for wg, _ in members) == list(range(per))
            assert len({grp for _, grp in members}) == 1
        assert len({m[0][1] for m in groups.values()}) == len(groups)  # distinct barriers


@pytest.mark.parametrize("R", [2, 8])
def test_dispatch_and_combine_fit_768_threads_without_spills(R, sm90):
    """With the launch bounds they run under (768 threads, 1 block per SM) ptxas gives each
    thread at most 80 registers; the 8-deep copy unroll must fit them with no spills."""
    import re

    from cuda.core import Linker, LinkerOptions, ObjectCode

    C, N, row16, K, S, L = 12, 256, 896, 8, 56, 16
    lay = I.RingLayout(R, C, N, row16 * 16, K, S)
    for fn, sig in ((I.make_dispatch(R, C, N, row16, K, S, L, **lay.constants(), **I.TUNING),
                     I.DISPATCH_SIG),
                    (I.make_combine(R, C, N, row16, K, **lay.constants(), **I.TUNING),
                     I.COMBINE_SIG)):
        text, _ = cuda.compile(fn, launch.parse_signature(sig), device=False, cc=(9, 0),
                               output="ptx", abi="numba", launch_bounds=(I.THREADS, 1))
        linker = Linker(ObjectCode.from_ptx(text.encode()),
                        options=LinkerOptions(arch="sm_90", verbose=True))
        linker.link("cubin")
        log = linker.get_info_log() or ""
        regs = [int(v) for v in re.findall(r"Used (\d+) registers", log)]
        spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        assert regs and max(regs) <= 65536 // I.THREADS, log
        assert spills and not any(spills), log


def test_kernel_specs_are_what_the_launchers_compile(monkeypatch):
    """The spec functions are the launchers' only route to get_kernel: a launch with the mocked
    get_kernel must ask for exactly the spec's keywords, and the specs of the GPU suites exist for
    every rank count (tests/gpu/parallel_compile.py builds them before the ranks start)."""
    import os
    import sys

    from numba_ep import launch as L

    asked = []
    monkeypatch.setattr(L, "get_kernel", lambda f, sig, **kw: asked.append((f, sig, kw)) or
                        type("K", (), {"launch": lambda *a, **k: None})())
    spec = I.dispatch_spec(4, 12, 256, 7168 * 2, 8, 0, 64)
    I._get(spec)
    assert asked[-1] == spec and spec[2]["launch_bounds"] == (I.THREADS, 1)
    assert spec[2]["off_x"] == I.ring_layout(4, 12, 256, 7168 * 2, 8, 0).x
    assert spec[2]["unroll"] == I.TUNING["unroll"]
    assert I.notify_spec(4, 12, 64)[2]["num_local_experts"] == 64

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gpu"))
    import workers_intranode as W
    from parallel_compile import unique_specs

    for R in (1, 2, 4, 8):
        specs = unique_specs(W.kernel_specs(R))
        names = {f.__name__ for f, _, _ in specs}
        assert names == {"make_barrier_kernel", "make_layout_kernel", "make_notify_dispatch",
                         "make_cached_notify", "make_dispatch", "make_combine"}, names
        assert all(kw["num_ranks"] == R for _, _, kw in specs)
        assert len(specs) >= 5 * len(W.SUITES)
