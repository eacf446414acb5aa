"""Buffer low-latency mode on a CPU: validation happens before any kernel, and the plumbing
between the Buffer and numba_ep.kernels.low_latency is right.

How (as tests/test_buffer_validation.py): ``Buffer._host_mode`` builds a Buffer without CUDA
resources whose arrays are NumPy arrays on the host. ``num_rdma_bytes`` sizes a fake NVSHMEM
buffer that only the size checks see. The entry points of ``numba_ep.kernels.low_latency`` are
replaced:

- ``kernels``: every entry point raises ``KernelCalled`` and is recorded, so a test that gets its
  ValueError/TypeError proves no kernel (and no context) was reached;
- ``emulated``: the real ``LowLatencyContext`` (it only validates and computes the layout) over a
  fake symmetric buffer, and dispatch / combine / hooks / clean / next_combine_buffer answered
  from ``numba_ep.reference`` for a one-rank world, recording what the Buffer passes.
"""
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from kernels_for_tests import KernelCalled, raises, stub_kernels  # noqa: E402
from numba_ep import reference
from numba_ep.buffer import (LL_LOGFMT_MAX_HIDDEN, LL_MAX_LOCAL_EXPERTS, LL_MAX_TOPK, Buffer,
                             _LowLatencyHandle)
from numba_ep.errors import CommTimeoutError
from numba_ep.interop import EventOverlap
from numba_ep.kernels import low_latency as ll

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
M, H, E, K = 8, 256, 8, 3          # small shape: L = E / R experts per rank
ENTRY_POINTS = ("LowLatencyContext", "low_latency_dispatch", "low_latency_combine",
                "next_combine_buffer", "clean_low_latency_buffer")


@pytest.fixture
def kernels(monkeypatch):
    """Every kernel entry point raises KernelCalled(name) and is recorded in ``calls``."""
    calls, _ = stub_kernels(monkeypatch, ll, ENTRY_POINTS)
    return calls


def hint(m=M, h=H, r=2, e=E):
    return Buffer.get_low_latency_rdma_size_hint(m, h, r, e)


def ll_buffer(rank=0, size=2, nbytes=None, **kw):
    nbytes = hint(r=size) if nbytes is None else nbytes
    return Buffer._host_mode(SimpleNamespace(rank=rank, size=size), num_rdma_bytes=nbytes,
                             low_latency_mode=True, **kw)


def make_inputs(seed=0, T=6, h=H, k=K, e=E):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((T, h)) * 0.5).astype(np.float32).astype(BF16)
    topk = np.argsort(-rng.random((T, e)), axis=1)[:, :k].astype(np.int64)
    if T:
        topk[0, -1] = -1
    w = (rng.random((T, k)) + 0.1).astype(np.float32)
    return x, topk, w


def fake_handle(size=2, m=M, h=H, e=E, **over):
    L = e // size
    items = dict(src=np.zeros((L, size * m), np.int32), lr=np.zeros((L, size), np.int64),
                 m=m, h=h, e=e)
    items.update(over)
    return tuple(items.values())


# ============================================================================ constructor

def test_low_latency_mode_needs_rdma_bytes_before_touching_cuda():
    raises(ValueError, lambda: Buffer(low_latency_mode=True), "num_rdma_bytes",
           "get_low_latency_rdma_size_hint", "got 0")
    raises(ValueError, lambda: Buffer(num_rdma_bytes=1000, low_latency_mode=True),
           "num_rdma_bytes", "multiple of 128", "1024")


def test_limits_mirror_the_kernels():
    assert LL_MAX_TOPK == ll.MAX_TOPK
    assert LL_MAX_LOCAL_EXPERTS == ll.MAX_LOCAL_EXPERTS
    assert LL_LOGFMT_MAX_HIDDEN == ll.LOGFMT_MAX_HIDDEN


def test_repr_and_rdma_buffer_tensor_without_a_buffer():
    buf = Buffer._host_mode(SimpleNamespace(rank=0, size=2))
    assert "num_rdma_bytes=0" in repr(buf)
    raises(ValueError, lambda: buf.get_local_buffer_tensor(np.uint8, use_rdma_buffer=True),
           "no NVSHMEM buffer", "num_rdma_bytes=0")


# ============================================================================ dispatch validation

def bad_dispatch_cases():
    """(id, mutate(x, topk) -> (args, kwargs), exception, message fragments)."""
    return [
        ("hook-and-async", lambda x, t: ((x, t, M, E), dict(async_finish=True,
                                                            return_recv_hook=True)),
         ValueError, ["mutually exclusive"]),
        ("T>M", lambda x, t: ((np.concatenate([x, x]), np.concatenate([t, t]), 10, E), {}),
         ValueError, ["12 tokens", "num_max_dispatch_tokens_per_rank=10"]),
        ("x-float32", lambda x, t: ((x.astype(np.float32), t, M, E), {}), TypeError,
         ["x", "bfloat16", "float32"]),
        ("x-fp8", lambda x, t: ((x.astype(FP8), t, M, E), {}), TypeError, ["x", "bfloat16"]),
        ("x-1d", lambda x, t: ((x[0], t, M, E), {}), ValueError, ["x", "2-D"]),
        ("x-strided", lambda x, t: ((np.repeat(x, 2, axis=1)[:, ::2], t, M, E), {}),
         ValueError, ["x", "C-contiguous"]),
        ("hidden-not-128", lambda x, t: ((x[:, :200].copy(), t, M, E), {}), ValueError,
         ["multiple of 128", "[6, 200]"]),
        ("topk-int32", lambda x, t: ((x, t.astype(np.int32), M, E), {}), TypeError,
         ["topk_idx", "int64", "int32"]),
        ("topk-rows", lambda x, t: ((x, t[:5], M, E), {}), ValueError,
         ["topk_idx", "[6, 1..16]", "[5, 3]"]),
        ("topk-17", lambda x, t: ((x, np.zeros((6, 17), np.int64), M, E), {}), ValueError,
         ["topk_idx", "1..16"]),
        ("E-not-multiple", lambda x, t: ((x, t, M, 7), {}), ValueError,
         ["num_experts", "multiple of the rank count 2", "7"]),
        ("E-too-many", lambda x, t: ((x, t, M, 2 * (LL_MAX_LOCAL_EXPERTS + 1)), {}), ValueError,
         ["num_experts", f"at most {LL_MAX_LOCAL_EXPERTS}"]),
        ("M-zero", lambda x, t: ((x[:0], t[:0], 0, E), {}), ValueError,
         ["num_max_dispatch_tokens_per_rank"]),
        ("M-float", lambda x, t: ((x, t, 8.0, E), {}), TypeError,
         ["num_max_dispatch_tokens_per_rank", "int"]),
        ("ue8m0-no-round", lambda x, t: ((x, t, M, E), dict(use_ue8m0=True)), ValueError,
         ["use_ue8m0", "round_scale"]),
        ("ue8m0-bf16", lambda x, t: ((x, t, M, E), dict(use_ue8m0=True, round_scale=True,
                                                        use_fp8=False)),
         ValueError, ["use_ue8m0", "use_fp8"]),
        ("ue8m0-hidden", lambda x, t: ((np.zeros((6, 384), BF16), t, M, E),
                                       dict(use_ue8m0=True, round_scale=True)),
         ValueError, ["multiple of 512", "384"]),
        ("stats-dtype", lambda x, t: ((x, t, M, E), dict(
            cumulative_local_expert_recv_stats=np.zeros(4, np.int64))), TypeError,
         ["cumulative_local_expert_recv_stats", "int32"]),
        ("stats-shape", lambda x, t: ((x, t, M, E), dict(
            cumulative_local_expert_recv_stats=np.zeros(8, np.int32))), ValueError,
         ["cumulative_local_expert_recv_stats", "[num_local_experts] = [4]", "[8]"]),
        ("wait-stats", lambda x, t: ((x, t, M, E), dict(
            dispatch_wait_recv_cost_stats=np.zeros(2, np.int32))), TypeError,
         ["dispatch_wait_recv_cost_stats", "int64"]),
        ("wait-stats-shape", lambda x, t: ((x, t, M, E), dict(
            dispatch_wait_recv_cost_stats=np.zeros(3, np.int64))), ValueError,
         ["dispatch_wait_recv_cost_stats", "[num_ranks] = [2]"]),
        ("flag-not-bool", lambda x, t: ((x, t, M, E), dict(use_fp8=1)), TypeError,
         ["use_fp8", "bool"]),
        ("buffer-too-small", lambda x, t: ((x, t, 16, E), {}), ValueError,
         ["num_rdma_bytes", str(hint(m=16)), f"has {hint()}",
          f"get_low_latency_rdma_size_hint(16, {H}, 2, {E})"]),
    ]


@pytest.mark.parametrize("case", bad_dispatch_cases(), ids=lambda c: c[0])
def test_dispatch_rejects_before_any_kernel(case, kernels):
    _, mutate, exc, fragments = case
    x, topk, _ = make_inputs()
    args, kwargs = mutate(x, topk)
    buf = ll_buffer()
    raises(exc, lambda: buf.low_latency_dispatch(*args, **kwargs), *fragments)
    assert kernels == []


def test_buffer_without_rdma_bytes_names_the_size(kernels):
    x, topk, _ = make_inputs()
    buf = Buffer._host_mode(SimpleNamespace(rank=1, size=2), num_nvl_bytes=1 << 20)
    need = hint()
    raises(ValueError, lambda: buf.low_latency_dispatch(x, topk, M, E), "needs " + str(need),
           "Buffer has 0", f"num_rdma_bytes={need}")
    raises(ValueError, lambda: buf.clean_low_latency_buffer(M, H, E), str(need))
    raises(ValueError, lambda: buf.get_next_low_latency_combine_buffer(fake_handle()), str(need))
    assert kernels == []


def test_clean_validates_its_shape(kernels):
    buf = ll_buffer()
    raises(ValueError, lambda: buf.clean_low_latency_buffer(M, 200, E), "hidden",
           "multiple of 128")
    raises(ValueError, lambda: buf.clean_low_latency_buffer(M, H, 5), "num_experts", "5")
    raises(TypeError, lambda: buf.clean_low_latency_buffer(M, H, None), "num_experts")
    raises(ValueError, lambda: buf.clean_low_latency_buffer(2 * M, H, E), str(hint(m=2 * M)))
    assert kernels == []


# ============================================================================ combine validation

def bad_combine_cases():
    """(id, mutate(y, topk, w, handle) -> (args, kwargs), exception, fragments)."""
    L = E // 2
    return [
        ("hook-and-async", lambda y, t, w, h: ((y, t, w, h), dict(async_finish=True,
                                                                  return_recv_hook=True)),
         ValueError, ["mutually exclusive"]),
        ("logfmt-zero-copy", lambda y, t, w, h: ((y, t, w, h), dict(use_logfmt=True,
                                                                    zero_copy=True)),
         ValueError, ["use_logfmt", "zero_copy"]),
        ("x-shape", lambda y, t, w, h: ((y[:, :M], t, w, h), {}), ValueError,
         ["x", f"[{L}, {2 * M}, {H}]", f"[{L}, {M}, {H}]"]),
        ("x-float32", lambda y, t, w, h: ((y.astype(np.float32), t, w, h), {}), TypeError,
         ["x", "bfloat16"]),
        ("x-strided", lambda y, t, w, h: ((np.repeat(y, 2, axis=2)[:, :, ::2], t, w, h), {}),
         ValueError, ["x", "C-contiguous"]),
        ("topk-T>M", lambda y, t, w, h: ((y, np.zeros((M + 1, K), np.int64), w, h), {}),
         ValueError, ["topk_idx", f"num_max_dispatch_tokens_per_rank={M}", f"[{M + 1}, {K}]"]),
        ("topk-dtype", lambda y, t, w, h: ((y, t.astype(np.int32), w, h), {}), TypeError,
         ["topk_idx", "int64"]),
        ("weights-shape", lambda y, t, w, h: ((y, t, w[:, :2], h), {}), ValueError,
         ["topk_weights", f"[6, {K}]"]),
        ("weights-dtype", lambda y, t, w, h: ((y, t, w.astype(np.float64), h), {}), TypeError,
         ["topk_weights", "float32"]),
        ("out-shape", lambda y, t, w, h: ((y, t, w, h), dict(out=np.zeros((5, H), BF16))),
         ValueError, ["out", f"[6, {H}]"]),
        ("out-dtype", lambda y, t, w, h: ((y, t, w, h), dict(out=np.zeros((6, H), np.float32))),
         TypeError, ["out", "bfloat16"]),
        ("wait-stats", lambda y, t, w, h: ((y, t, w, h), dict(
            combine_wait_recv_cost_stats=np.zeros(2, np.float32))), TypeError,
         ["combine_wait_recv_cost_stats", "int64"]),
        # the handle
        ("handle-list", lambda y, t, w, h: ((y, t, w, list(h)), {}), TypeError,
         ["handle", "5-tuple", "list"]),
        ("handle-6", lambda y, t, w, h: ((y, t, w, h + (0,)), {}), TypeError,
         ["handle", "5-tuple", "length 6"]),
        ("handle-src-shape", lambda y, t, w, h: ((y, t, w, fake_handle(
            src=np.zeros((L, M), np.int32))), {}), ValueError,
         ["handle[0] (src_info)", f"[{L}, {2 * M}]", f"[{L}, {M}]"]),
        ("handle-src-dtype", lambda y, t, w, h: ((y, t, w, fake_handle(
            src=np.zeros((L, 2 * M), np.int64))), {}), TypeError,
         ["handle[0] (src_info)", "int32"]),
        ("handle-range-dtype", lambda y, t, w, h: ((y, t, w, fake_handle(
            lr=np.zeros((L, 2), np.int32))), {}), TypeError,
         ["handle[1] (layout_range)", "int64"]),
        ("handle-range-shape", lambda y, t, w, h: ((y, t, w, fake_handle(
            lr=np.zeros((L, 3), np.int64))), {}), ValueError,
         ["handle[1] (layout_range)", f"[{L}, 2]"]),
        ("handle-M", lambda y, t, w, h: ((y, t, w, h[:2] + ("8",) + h[3:]), {}), TypeError,
         ["handle: num_max_dispatch_tokens_per_rank"]),
        ("handle-E", lambda y, t, w, h: ((y, t, w, fake_handle(e=9)), {}), ValueError,
         ["handle: num_experts", "multiple of the rank count 2"]),
        ("handle-hidden", lambda y, t, w, h: ((y, t, w, fake_handle(h=100)), {}), ValueError,
         ["handle: hidden", "multiple of 128"]),
        ("buffer-too-small", lambda y, t, w, h: ((np.zeros((L, 4 * M, H), BF16), t, w,
                                                  fake_handle(m=2 * M)), {}),
         ValueError, ["num_rdma_bytes", str(hint(m=2 * M))]),
        ("logfmt-hidden", lambda y, t, w, h: ((np.zeros((L, 2 * M, 2 * LL_LOGFMT_MAX_HIDDEN),
                                                        BF16), t, w,
                                               fake_handle(h=2 * LL_LOGFMT_MAX_HIDDEN)),
                                              dict(use_logfmt=True)),
         ValueError, ["use_logfmt", str(LL_LOGFMT_MAX_HIDDEN)]),
    ]


@pytest.mark.parametrize("case", bad_combine_cases(), ids=lambda c: c[0])
def test_combine_rejects_before_any_kernel(case, kernels):
    _, mutate, exc, fragments = case
    _, topk, w = make_inputs()
    y = np.zeros((E // 2, 2 * M, H), BF16)
    args, kwargs = mutate(y, topk, w, fake_handle())
    buf = ll_buffer()
    raises(exc, lambda: buf.low_latency_combine(*args, **kwargs), *fragments)
    assert kernels == []


def test_handle_from_another_buffer(kernels):
    _, topk, w = make_inputs()
    buf, other = ll_buffer(), ll_buffer()
    h = _LowLatencyHandle(fake_handle())
    h.buffer_id = other._id
    y = np.zeros((E // 2, 2 * M, H), BF16)
    raises(ValueError, lambda: buf.low_latency_combine(y, topk, w, h), "another Buffer",
           f"#{other._id}", "still alive")
    raises(ValueError, lambda: buf.get_next_low_latency_combine_buffer(h), "another Buffer")
    # a plain tuple (no owner) is accepted: the check goes on to the kernels
    raises(KernelCalled, lambda: buf.low_latency_combine(y, topk, w, tuple(h)))
    assert kernels == ["LowLatencyContext"]


def test_destroyed_buffer_refuses_low_latency_calls(kernels):
    x, topk, w = make_inputs()
    buf = ll_buffer()
    buf.explicitly_destroy = True
    buf.destroy()
    raises(RuntimeError, lambda: buf.low_latency_dispatch(x, topk, M, E), "destroyed")
    raises(RuntimeError, lambda: buf.clean_low_latency_buffer(M, H, E), "destroyed")
    raises(RuntimeError, lambda: buf.get_next_low_latency_combine_buffer(fake_handle()),
           "destroyed")
    assert kernels == []


# ============================================================================ plumbing (emulated)

class Emulator:
    """The low-latency kernel functions of a one-rank world, answered from the reference."""

    def __init__(self, monkeypatch):
        self.calls = []
        real_ctx = ll.LowLatencyContext
        self.contexts = []

        def ctx_factory(*args, **kwargs):
            ctx = real_ctx(*args, **kwargs)
            self.contexts.append(ctx)
            self.calls.append(("ctx", args[1:], kwargs))
            return ctx

        def dispatch(ctx, x, topk, use_fp8=True, round_scale=False, use_ue8m0=False,
                     cumulative_local_expert_recv_stats=None, return_recv_hook=False,
                     stream=None, wait_recv_cost_stats=None):
            self.calls.append(("dispatch", dict(x=x, topk=topk, use_fp8=use_fp8,
                                                round_scale=round_scale, use_ue8m0=use_ue8m0,
                                                stats=cumulative_local_expert_recv_stats,
                                                hook=return_recv_hook, stream=stream, ctx=ctx,
                                                wait_recv_cost_stats=wait_recv_cost_stats)))
            want = reference.low_latency_dispatch(
                [x.view(BF16)], [topk], ctx.num_max_dispatch_tokens_per_rank, ctx.num_experts,
                use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0)[0]
            ctx.buffer_idx ^= 1
            rx = want["recv_x"]
            rx = rx.view(np.uint8) if use_fp8 else rx.view(np.uint16)
            sc = want["recv_x_scales"]
            if sc is not None:  # a transposed view of column-major storage, as the GPU's
                sc = np.ascontiguousarray(sc.transpose(0, 2, 1)).transpose(0, 2, 1)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats += want["recv_count"]
            hook = FakeHook(self, "dispatch") if return_recv_hook else None
            return rx, sc, want["recv_count"], want["src_info"], want["layout_range"], hook

        def combine(ctx, x, topk, w, src, lr, use_logfmt=False, zero_copy=False, out=None,
                    return_recv_hook=False, stream=None, wait_recv_cost_stats=None):
            self.calls.append(("combine", dict(x=x, topk=topk, w=w, src=src, lr=lr,
                                               use_logfmt=use_logfmt, zero_copy=zero_copy,
                                               out=out, hook=return_recv_hook, stream=stream,
                                               ctx=ctx,
                                               wait_recv_cost_stats=wait_recv_cost_stats)))
            handle = {"src_info": src, "layout_range": lr, "num_experts": ctx.num_experts,
                      "num_max_dispatch_tokens_per_rank": ctx.num_max_dispatch_tokens_per_rank}
            res = reference.low_latency_combine([x.view(BF16)], [topk], [w], [handle],
                                                use_logfmt=use_logfmt)[0].view(np.uint16)
            ctx.buffer_idx ^= 1
            if out is None:
                out = res
            else:
                out[...] = res
            hook = FakeHook(self, "combine") if return_recv_hook else None
            return out, hook

        def next_buffer(ctx):
            self.calls.append(("next", ctx))
            return self.next_view

        def clean(ctx, stream=None):
            self.calls.append(("clean", ctx, stream))
            ctx.buffer_idx = 0

        monkeypatch.setattr(ll, "LowLatencyContext", ctx_factory)
        monkeypatch.setattr(ll, "low_latency_dispatch", dispatch)
        monkeypatch.setattr(ll, "low_latency_combine", combine)
        monkeypatch.setattr(ll, "next_combine_buffer", next_buffer)
        monkeypatch.setattr(ll, "clean_low_latency_buffer", clean)
        self.next_view = None

    def names(self):
        return [c[0] for c in self.calls]


class FakeHook:
    def __init__(self, emu, what):
        self.emu, self.what, self.called = emu, what, False

    def __call__(self, stream=None):
        self.called = True
        self.emu.calls.append(("hook", self.what))


def one_rank_buffer(m=M, h=H, e=E, timeout_s=None, **kw):
    buf = Buffer._host_mode(SimpleNamespace(rank=0, size=1), timeout_s=timeout_s,
                            num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(m, h, 1, e),
                            low_latency_mode=True, **kw)
    # enough of a SymmetricBuffer for the real LowLatencyContext (it never touches memory)
    buf._sym = SimpleNamespace(nbytes=buf.num_rdma_bytes, ptr=1 << 32, peer_ptrs=[1 << 32])
    return buf


def reference_round(x, topk, w, use_fp8):
    d = reference.low_latency_dispatch([x], [topk], M, E, use_fp8=use_fp8)[0]
    # the stand-in expert: the received rows themselves (bf16)
    y = (reference.per_token_cast_back(d["recv_x"], d["recv_x_scales"]) if use_fp8
         else d["recv_x"].astype(np.float32)).astype(BF16)
    handle = {k: d[k] for k in ("src_info", "layout_range", "num_experts",
                                "num_max_dispatch_tokens_per_rank")}
    out = reference.low_latency_combine([y], [topk], [w], [handle])[0]
    return d, y, out


@pytest.mark.parametrize("use_fp8", [True, False])
def test_dispatch_combine_plumbing(monkeypatch, use_fp8):
    emu = Emulator(monkeypatch)
    buf = one_rank_buffer(timeout_s=3)
    x, topk, w = make_inputs(T=7)
    stats = np.full(E, 2, np.int32)
    recv_x, recv_count, handle, event, hook = buf.low_latency_dispatch(
        x, topk, M, E, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8)
    assert emu.names() == ["ctx", "dispatch"]
    assert emu.calls[0][1] == (0, 1, M, H, E) and emu.calls[0][2] == {"timeout_s": 3.0}
    d = emu.calls[1][1]
    assert d["x"].dtype == np.uint16 and d["x"].shape == (7, H)   # bf16 goes in as its bits
    assert d["topk"] is topk and d["stats"] is stats and d["stream"] is None
    assert d["use_fp8"] is use_fp8 and d["hook"] is False
    want, y, want_out = reference_round(x, topk, w, use_fp8)
    if use_fp8:
        rx, sc = recv_x
        assert rx.dtype == np.uint8 and rx.shape == (E, M, H)      # FP8 bytes (CuPy's carrier)
        assert sc.dtype == np.float32 and sc.shape == (E, M, H // 128)
        assert sc.strides[1] == 4, "scales stay column-major"
    else:
        assert recv_x.dtype == BF16 and recv_x.shape == (E, M, H)  # the caller's dtype
        rx, sc = recv_x, None
    got = {"recv_x": rx, "recv_x_scales": sc, "recv_count": recv_count,
           "src_info": handle[0], "layout_range": handle[1]}
    reference.check_low_latency_dispatch(got, want)
    assert (stats == want["recv_count"] + 2).all()
    assert isinstance(handle, tuple) and len(handle) == 5 and handle[2:] == (M, H, E)
    assert handle.buffer_id == buf._id
    assert hook is None and isinstance(event, EventOverlap) and event.event is None

    combined, event, hook = buf.low_latency_combine(y, topk, w, handle)
    assert emu.names() == ["ctx", "dispatch", "combine"]   # the context is cached
    c = emu.calls[2][1]
    assert c["ctx"] is d["ctx"] and c["x"].dtype == np.uint16 and c["out"] is None
    assert c["src"] is handle.dev[0] and c["lr"] is handle.dev[1]
    assert (c["use_logfmt"], c["zero_copy"], c["hook"]) == (False, False, False)
    assert combined.dtype == BF16 and combined.shape == (7, H)
    np.testing.assert_array_equal(combined.view(np.uint16), want_out.view(np.uint16))
    assert hook is None and event.event is None


def test_hooks_out_and_sequence_rules(monkeypatch):
    emu = Emulator(monkeypatch)
    buf = one_rank_buffer()
    x, topk, w = make_inputs(T=5)
    recv_x, _, handle, _, hook = buf.low_latency_dispatch(x, topk, M, E, use_fp8=False,
                                                          return_recv_hook=True)
    assert callable(hook) and not hook.called and emu.calls[-1][1]["hook"] is True
    # the receive phase must run before the next low-latency call
    raises(RuntimeError, lambda: buf.low_latency_combine(recv_x, topk, w, handle),
           "receive hook", "low_latency_dispatch", "has not been called")
    assert emu.names() == ["ctx", "dispatch"]
    # ... but the zero-copy view may be fetched (it is the next call's send half)
    emu.next_view = np.zeros((E, M, H), BF16)
    assert buf.get_next_low_latency_combine_buffer(handle) is emu.next_view
    assert emu.calls[-1] == ("next", emu.contexts[0])
    hook()
    assert hook.called and emu.calls[-1] == ("hook", "dispatch")
    raises(RuntimeError, hook, "already called")

    out = np.zeros((5, H), BF16)
    combined, _, chook = buf.low_latency_combine(recv_x, topk, w, handle, out=out,
                                                 return_recv_hook=True)
    assert combined is out and emu.calls[-1][1]["out"].dtype == np.uint16
    _, _, want_out = reference_round(x, topk, w, False)
    np.testing.assert_array_equal(out.view(np.uint16), want_out.view(np.uint16))
    chook()

    # a new shape needs clean_low_latency_buffer first
    x2, topk2, _ = make_inputs(T=3, h=128)
    raises(ValueError, lambda: buf.low_latency_dispatch(x2, topk2, M, E),
           f"M={M}, H=128, E={E}", f"clean_low_latency_buffer({M}, 128, {E})",
           f"hidden={H}")
    n = len(emu.calls)
    buf.num_rdma_bytes = buf._sym.nbytes = max(buf.num_rdma_bytes, hint(M, 128, 1, E))
    buf.clean_low_latency_buffer(M, 128, E)
    assert emu.names()[n:] == ["ctx", "clean"] and emu.calls[-1][2] is None
    buf.low_latency_dispatch(x2, topk2, M, E)
    assert emu.calls[-1][1]["ctx"] is emu.contexts[1] and emu.contexts[1].hidden == 128
    # back to the first shape: its cached context is cleaned again, not rebuilt
    buf.clean_low_latency_buffer(M, H, E)
    assert emu.calls[-1] == ("clean", emu.contexts[0], None) and len(emu.contexts) == 2


def test_clean_drops_a_pending_hook_and_makes_it_stale(monkeypatch):
    Emulator(monkeypatch)
    buf = one_rank_buffer()
    x, topk, _ = make_inputs()
    *_, hook = buf.low_latency_dispatch(x, topk, M, E, return_recv_hook=True)
    buf.clean_low_latency_buffer(M, H, E)
    buf.low_latency_dispatch(x, topk, M, E)          # no "hook not called" error any more
    raises(RuntimeError, hook, "stale", "clean_low_latency_buffer")
    assert not hook.called


def test_zero_copy_and_logfmt_flags_reach_the_kernel(monkeypatch):
    emu = Emulator(monkeypatch)
    buf = one_rank_buffer()
    x, topk, w = make_inputs()
    _, _, handle, _, _ = buf.low_latency_dispatch(x, topk, M, E, use_fp8=False)
    # a strided view, as get_next_low_latency_combine_buffer returns, is fine with zero_copy
    padded = np.zeros((E, M, H + H // 128 * 2), BF16)
    view = padded[:, :, :H]
    emu.next_view = view
    assert buf.get_next_low_latency_combine_buffer(handle) is view
    buf.low_latency_combine(view, topk, w, handle, zero_copy=True)
    assert emu.calls[-1][1]["zero_copy"] is True
    raises(ValueError, lambda: buf.low_latency_combine(view, topk, w, handle), "C-contiguous")
    buf.low_latency_combine(np.zeros((E, M, H), BF16), topk, w, handle, use_logfmt=True)
    assert emu.calls[-1][1]["use_logfmt"] is True and emu.calls[-1][1]["zero_copy"] is False


def test_cost_stats_reach_the_receive_kernels(monkeypatch):
    """The wait-cost arrays go to the kernel launchers, which time the receive phases' waits
    (GPU tests check that they grow); the Buffer passes them through, unchanged."""
    emu = Emulator(monkeypatch)
    buf = one_rank_buffer()
    x, topk, w = make_inputs()
    wait = np.zeros(1, np.int64)
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(
        x, topk, M, E, use_fp8=False, dispatch_wait_recv_cost_stats=wait)
    assert emu.calls[-1][1]["wait_recv_cost_stats"] is wait
    buf.low_latency_dispatch(x, topk, M, E, use_fp8=False)
    assert emu.calls[-1][1]["wait_recv_cost_stats"] is None
    buf.low_latency_combine(recv_x, topk, w, handle, combine_wait_recv_cost_stats=wait)
    assert emu.calls[-1][1]["wait_recv_cost_stats"] is wait


def test_async_finish_on_the_host_returns_an_event(monkeypatch):
    Emulator(monkeypatch)
    buf = one_rank_buffer()
    x, topk, _ = make_inputs()
    _, _, _, event, hook = buf.low_latency_dispatch(x, topk, M, E, async_finish=True)
    assert isinstance(event, EventOverlap) and hook is None
    event.current_stream_wait()                       # a no-op without an event


def test_timeout_makes_the_buffer_unusable(monkeypatch):
    Emulator(monkeypatch)
    buf = one_rank_buffer()
    x, topk, _ = make_inputs()

    def timeout(*a, **k):
        raise CommTimeoutError("low_latency_dispatch: rank 0 waited 2 s for rank 1", peer=1)

    monkeypatch.setattr(ll, "low_latency_dispatch", timeout)
    raises(CommTimeoutError, lambda: buf.low_latency_dispatch(x, topk, M, E), "rank 1")
    raises(RuntimeError, lambda: buf.low_latency_dispatch(x, topk, M, E), "unusable", "rank 1")
    raises(RuntimeError, lambda: buf.clean_low_latency_buffer(M, H, E), "unusable")


# ============================================================================ bench low-latency

def test_bench_low_latency_rows(monkeypatch):
    import numba_ep.group
    from numba_ep import bench
    from numba_ep.bench_ll import bench_low_latency as measure

    seen = {}

    def fake_spawn(fn, n, **kwargs):
        seen.update(fn=fn, n=n, **kwargs)
        keys = ("dispatch", "combine", "dispatch+combine", "dispatch_send", "dispatch_recv",
                "combine_send", "combine_recv", "host_dispatch+combine",
                "graph_dispatch+combine", "host_graph_replay", "host_buffer",
                "host_buffer_full_checks")
        return [dict({k: 10.0 * (r + 1) + i for i, k in enumerate(keys)},
                     dispatch_GBps=100.0 + r, combine_GBps=200.0 + r, rank=r) for r in range(n)]

    monkeypatch.setattr(numba_ep.group, "spawn", fake_spawn)
    rows = bench.bench_low_latency(2)
    assert seen["fn"] is measure and seen["n"] == 2
    assert (seen["num_tokens"], seen["hidden"], seen["num_topk"], seen["num_experts"]) == \
        (128, 7168, 8, 288)
    assert rows["dispatch (FP8), us"] == 20.0                  # the slowest rank
    assert rows["combine (BF16), us"] == 21.0
    assert rows["dispatch + combine, us"] == 22.0
    assert rows["hook mode: combine recv phase, us"] == 26.0
    assert rows["host time per dispatch + combine (enqueue), us"] == 27.0
    assert rows["dispatch + combine as a CUDA-graph replay, GPU us"] == 28.0
    assert rows["host time per dispatch + combine through Buffer, us"] == 30.0
    assert rows["  same, argument checks redone every call, us"] == 31.0
    assert rows["  DeepEP V1 2xH100 dispatch, us"] == "30-35"
    assert rows["  DeepEP V1 2xH100 combine, us"] == "41-43"
    assert rows["  DeepEP V1 2xH100 dispatch+combine, us"] == "76"
    assert rows["dispatch logical GB/s (FP8 messages)"] == 100.5


def test_cli_accepts_bench_low_latency(monkeypatch):
    import numba_ep.__main__ as cli
    import numba_ep.group
    from numba_ep import bench

    got = {}
    monkeypatch.setattr(numba_ep.group, "gpu_count", lambda: 2)
    monkeypatch.setattr(bench, "main", lambda name, json_path=None, ranks=None,
                        kernel_times=False:
                        got.update(name=name, ranks=ranks, kernel_times=kernel_times) or 0)
    assert cli.main(["bench", "low-latency", "--ranks", "2"]) == 0
    assert got == {"name": "low-latency", "ranks": 2, "kernel_times": False}
    assert cli.main(["bench", "low-latency", "--kernel-times"]) == 0
    assert got == {"name": "low-latency", "ranks": None, "kernel_times": True}


def test_checks_remembered_per_key_still_refuse_what_differs(monkeypatch):
    """The checks' outcome is remembered per (shapes, dtypes, strides, devices, options): after a
    good call, an argument that differs in any of those, or a scalar of another type, is still
    refused by the full checks, and the sequence rules (a pending hook) still hold."""
    Emulator(monkeypatch)
    buf = one_rank_buffer()
    x, topk, w = make_inputs(T=5)
    for _ in range(2):   # the second call is answered from the memo
        _, _, handle, _, _ = buf.low_latency_dispatch(x, topk, M, E, use_fp8=False)
        y = np.zeros((E, M, H), BF16)
        buf.low_latency_combine(y, topk, w, handle)
    assert len(buf._ll_checked) == 2
    raises(TypeError, lambda: buf.low_latency_dispatch(x.view(np.float16), topk, M, E),
           "x", "bfloat16", "float16")
    raises(ValueError, lambda: buf.low_latency_dispatch(x[:, :128:2], topk[:, :1], M, E),
           "x")
    raises(TypeError, lambda: buf.low_latency_dispatch(x, topk, True, E),
           "num_max_dispatch_tokens_per_rank", "bool")
    raises(TypeError, lambda: buf.low_latency_dispatch(x, topk, M, E, use_fp8=1), "use_fp8")
    raises(ValueError, lambda: buf.low_latency_combine(y, np.ascontiguousarray(topk[:, :2]), w,
                                                       handle), "topk_weights", "shape")
    raises(ValueError, lambda: buf.low_latency_combine(y, topk[:, :2], w, handle),
           "topk_idx", "C-contiguous")
    raises(ValueError, lambda: buf.low_latency_combine(y[:, :, :128], topk, w, handle), "x")
    raises(ValueError, lambda: buf.low_latency_combine(y, topk, w, fake_handle(size=1, m=M + 1)),
           "x", "shape")
    # a hook left pending is caught on a remembered key too
    _, _, handle, _, hook = buf.low_latency_dispatch(x, topk, M, E, use_fp8=False,
                                                     return_recv_hook=True)
    raises(RuntimeError, lambda: buf.low_latency_dispatch(x, topk, M, E, use_fp8=False,
                                                          return_recv_hook=True), "hook")
    hook()
    buf.low_latency_dispatch(x, topk, M, E, use_fp8=False, return_recv_hook=True)[4]()


def test_gpu_calls_make_outputs_in_the_callers_kind(monkeypatch):
    """On a GPU the low-latency kernels make their outputs through the Buffer's allocator for
    torch callers: torch dtypes (FP8 as float8_e4m3fn, BF16 as bfloat16) on the Buffer's
    device; CuPy callers keep the kernels' CuPy default (their BF16 is uint16 already). The
    kernels read torch tensors' addresses; the stream is the caller's current one."""
    torch = pytest.importorskip("torch")
    import numba_ep.buffer as buffer_mod
    from numba_ep.buffer import _torch_empty

    made = []
    monkeypatch.setattr(torch, "empty", lambda shape, dtype, device: made.append(
        (shape, dtype, device)))
    empty = _torch_empty(3)
    for dt in (np.uint8, np.uint16, np.int32, np.int64, np.float32):
        empty((2, 5), dt)
    assert [m[1] for m in made] == [torch.float8_e4m3fn, torch.bfloat16, torch.int32,
                                    torch.int64, torch.float32]
    assert all(m[0] == (2, 5) and m[2] == torch.device("cuda", 3) for m in made)

    monkeypatch.setattr(buffer_mod, "current_stream_handle",
                        lambda torch_side, device: 1000 + torch_side)
    buf = ll_buffer()
    buf.device = 3
    stream, kw = buf._ll_gpu_call(False)
    assert stream == 1000 and kw == {"checked": True}
    stream, kw = buf._ll_gpu_call(True)
    assert stream == 1001 and kw["checked"] is True
    made.clear()
    kw["empty"]((4,), np.uint8)
    assert made == [((4,), torch.float8_e4m3fn, torch.device("cuda", 3))]
    assert buf._ll_gpu_call(True)[1] is kw            # built once per Buffer
    t = torch.zeros(6, dtype=torch.int32)[2:]
    assert ll._addr(t) == t.data_ptr() and ll._addr(None) == 0
