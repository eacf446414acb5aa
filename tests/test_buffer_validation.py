"""Buffer on a CPU: every bad argument is rejected before any kernel runs, and the plumbing
between validated arguments and the intranode kernel functions is right.

How: ``Buffer._host_mode`` builds a Buffer that owns no CUDA resources (arrays are NumPy arrays on
the host, streams are no-ops) and otherwise runs the same code as on a GPU. The kernel functions of
``numba_ep.kernels.intranode`` (and the layout kernel) are replaced by recorders:

- ``kernels`` (mode "raise"): every kernel entry point raises ``KernelCalled``, so a validation
  test that gets its ValueError/TypeError proves no kernel was reached;
- ``emulated`` (mode "reference"): the entry points answer from ``numba_ep.reference`` (what the
  real kernels compute) and record their arguments, so tests can check what the Buffer allocates
  and passes, and what it returns.
"""
import copy
import gc
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from kernels_for_tests import KernelCalled, raises, stub_kernels  # noqa: E402
from numba_ep.cpu.intranode import write_dispatch_outputs  # noqa: E402
from numba_ep import reference
from numba_ep.buffer import MAX_TOPK, Buffer, _Handle, check_array, check_expert_ids
from numba_ep.config import Config
from numba_ep.interop import EventOverlap, array_info, bytes_view, device_view, to_caller
from numba_ep.kernels import intranode, layout

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
CONFIG = Config(8, 6, 64)          # 4 channels; combine needs >= 64 slots
C = CONFIG.num_channels
BIG = 1 << 30                      # num_nvl_bytes of the fake IPC buffer (never allocated)


ENTRY_POINTS = ("IntranodeContext", "notify_dispatch", "wait_recv_counts", "cached_notify",
                "dispatch", "combine")


@pytest.fixture
def kernels(monkeypatch):
    """Every kernel entry point raises KernelCalled(name) and is recorded in ``calls``."""
    calls, make = stub_kernels(monkeypatch, intranode, ENTRY_POINTS)
    monkeypatch.setattr(layout, "get_dispatch_layout", make("layout"))
    return calls


def group(rank=0, size=2):
    return SimpleNamespace(rank=rank, size=size)


def host_buffer(rank=0, size=2, nbytes=BIG, **kw):
    return Buffer._host_mode(group(rank, size), num_nvl_bytes=nbytes, **kw)


def make_inputs(rng, T, H=256, K=4, E=16, R=2, dtype=BF16):
    x = rng.standard_normal((T, H)).astype(np.float32).astype(dtype)
    scores = rng.random((T, E))
    topk = np.argsort(-scores, axis=1)[:, :K].astype(np.int64)
    topk[rng.random((T, K)) < 0.2] = -1
    weights = rng.standard_normal((T, K)).astype(np.float32)
    per_rank, _, per_expert, in_rank = reference.get_dispatch_layout(topk, E, R)
    return SimpleNamespace(x=x, topk=topk, weights=weights, per_rank=per_rank,
                           per_expert=per_expert, in_rank=in_rank, E=E, H=H, K=K, T=T)


def dispatch_kwargs(inp, **over):
    kw = dict(num_tokens_per_rank=inp.per_rank, is_token_in_rank=inp.in_rank,
              num_tokens_per_expert=inp.per_expert, topk_idx=inp.topk, topk_weights=inp.weights,
              config=CONFIG)
    kw.update(over)
    return kw


@pytest.fixture
def inp():
    return make_inputs(np.random.default_rng(1), T=37)


def fake_handle(T=37, R=2, N=20, channels=C, **over):
    items = dict(rank_prefix=np.zeros((R, R), np.int32), chan=np.zeros((R, channels), np.int32),
                 recv_chan=np.zeros((R, channels), np.int32), src=np.zeros(N, np.int32),
                 in_rank=np.zeros((T, R), bool), send_head=np.full((T, R), -1, np.int32))
    items.update(over)
    return tuple(items.values())


# ============================================================================ dispatch validation

def bad_dispatch_cases():
    """(id, mutate(inp) -> (x, kwargs), exception, message fragments)."""
    def nc(a):  # a non-contiguous copy with the same shape
        b = np.empty((a.shape[0], a.shape[1] * 2), a.dtype)
        b[:, ::2] = a
        return b[:, ::2]

    return [
        ("x-not-array", lambda i: (3.0, {}), TypeError, ["x", "CuPy array or a torch tensor"]),
        ("x-1d", lambda i: (i.x[0], {}), ValueError, ["x", "2-D", "[256]"]),
        ("x-3d", lambda i: (i.x[None], {}), ValueError, ["x", "2-D"]),
        ("x-row-bytes", lambda i: (i.x[:, :100].copy(), {}), ValueError,
         ["x", "multiple of 16 bytes", "100 x 2 B = 200 B"]),
        ("x-noncontig", lambda i: (nc(i.x), {}), ValueError, ["x", "C-contiguous"]),
        ("x-tuple-len", lambda i: ((i.x, i.x, i.x), {}), TypeError, ["x", "pair"]),
        ("scales-dtype", lambda i: ((i.x.astype(FP8), np.ones((i.T, 2), np.float16)), {}),
         TypeError, ["x[1] (x_scales)", "float32 or int32", "float16"]),
        ("scales-rows", lambda i: ((i.x.astype(FP8), np.ones((i.T + 1, 2), np.float32)), {}),
         ValueError, ["x[1] (x_scales)", f"[{37}, *]", f"[{38}, 2]"]),
        ("scales-3d", lambda i: ((i.x.astype(FP8), np.ones((i.T, 2, 1), np.float32)), {}),
         ValueError, ["x[1] (x_scales)"]),
        ("fp8-noncontig", lambda i: ((nc(i.x.astype(FP8)), np.ones((i.T, 2), np.float32)), {}),
         ValueError, ["x[0] (x_fp8)", "C-contiguous"]),
        ("topk-dtype", lambda i: (i.x, dict(topk_idx=i.topk.astype(np.int32))), TypeError,
         ["topk_idx", "int64", "int32"]),
        ("topk-rows", lambda i: (i.x, dict(topk_idx=i.topk[:-1], topk_weights=i.weights[:-1])),
         ValueError, ["topk_idx", "[37, *]", "[36, 4]"]),
        ("topk-too-many", lambda i: (i.x, dict(topk_idx=np.zeros((i.T, MAX_TOPK + 1), np.int64),
                                               topk_weights=np.zeros((i.T, 17), np.float32))),
         ValueError, ["topk_idx", f"num_topk <= {MAX_TOPK}"]),
        ("topk-noncontig", lambda i: (i.x, dict(topk_idx=nc(i.topk))), ValueError,
         ["topk_idx", "C-contiguous"]),
        ("topk-1d", lambda i: (i.x, dict(topk_idx=i.topk[:, 0])), ValueError, ["topk_idx", "2-D"]),
        ("weights-dtype", lambda i: (i.x, dict(topk_weights=i.weights.astype(np.float64))),
         TypeError, ["topk_weights", "float32", "float64"]),
        ("weights-shape", lambda i: (i.x, dict(topk_weights=i.weights[:, :2].copy())), ValueError,
         ["topk_weights", "[37, 4]", "[37, 2]"]),
        ("weights-without-idx", lambda i: (i.x, dict(topk_idx=None)), ValueError,
         ["topk_idx / topk_weights", "both or neither"]),
        ("idx-without-weights", lambda i: (i.x, dict(topk_weights=None)), ValueError,
         ["both or neither"]),
        ("expert-id-too-big", lambda i: (i.x, dict(topk_idx=_with(i.topk, (3, 1), 16))),
         ValueError, ["topk_idx", "[-1, 16)", "got 16 at [3, 1]"]),
        ("expert-id-below-minus-one", lambda i: (i.x, dict(topk_idx=_with(i.topk, (0, 0), -2))),
         ValueError, ["topk_idx", "got -2 at [0, 0]"]),
        ("per-rank-missing", lambda i: (i.x, dict(num_tokens_per_rank=None)), ValueError,
         ["num_tokens_per_rank", "required"]),
        ("in-rank-missing", lambda i: (i.x, dict(is_token_in_rank=None)), ValueError,
         ["is_token_in_rank", "required"]),
        ("per-expert-missing", lambda i: (i.x, dict(num_tokens_per_expert=None)), ValueError,
         ["num_tokens_per_expert", "required"]),
        ("per-rank-dtype", lambda i: (i.x, dict(num_tokens_per_rank=i.per_rank.astype(np.int64))),
         TypeError, ["num_tokens_per_rank", "int32", "int64"]),
        ("per-rank-shape", lambda i: (i.x, dict(num_tokens_per_rank=np.zeros(3, np.int32))),
         ValueError, ["num_tokens_per_rank", "[2]", "[3]"]),
        ("in-rank-dtype", lambda i: (i.x, dict(is_token_in_rank=i.in_rank.astype(np.uint8))),
         TypeError, ["is_token_in_rank", "bool", "uint8"]),
        ("in-rank-shape", lambda i: (i.x, dict(is_token_in_rank=np.zeros((i.T, 3), bool))),
         ValueError, ["is_token_in_rank", "[37, 2]", "[37, 3]"]),
        ("in-rank-noncontig", lambda i: (i.x, dict(is_token_in_rank=np.asfortranarray(i.in_rank))),
         ValueError, ["is_token_in_rank", "C-contiguous"]),
        ("experts-not-multiple", lambda i: (i.x, dict(num_tokens_per_expert=np.zeros(15, np.int32))),
         ValueError, ["num_tokens_per_expert", "multiple of the rank count 2", "15"]),
        ("too-many-local-experts",
         lambda i: (i.x, dict(num_tokens_per_expert=np.zeros(2 * 1025, np.int32))),
         ValueError, ["num_tokens_per_expert", "1024"]),
        ("alignment", lambda i: (i.x, dict(expert_alignment=0)), ValueError,
         ["expert_alignment", "got 0"]),
        ("alignment-type", lambda i: (i.x, dict(expert_alignment=1.5)), TypeError,
         ["expert_alignment"]),
        ("worst-negative", lambda i: (i.x, dict(num_worst_tokens=-1)), ValueError,
         ["num_worst_tokens"]),
        ("config-type", lambda i: (i.x, dict(config=(24, 8, 256))), TypeError,
         ["config", "numba_ep.Config"]),
        ("allocate-without-event", lambda i: (i.x, dict(allocate_on_comm_stream=True,
                                                        async_finish=True)),
         ValueError, ["allocate_on_comm_stream", "previous_event"]),
        ("allocate-without-async", lambda i: (i.x, dict(allocate_on_comm_stream=True,
                                                        previous_event=EventOverlap())),
         ValueError, ["allocate_on_comm_stream", "async_finish"]),
        ("event-type", lambda i: (i.x, dict(previous_event="now")), TypeError,
         ["previous_event", "EventOverlap"]),
        ("async-type", lambda i: (i.x, dict(async_finish="yes")), TypeError, ["async_finish"]),
        ("cached-with-topk", lambda i: (i.x, dict(handle=fake_handle())), ValueError,
         ["topk_idx / topk_weights", "cached"]),
    ]


def _with(a, where, value):
    a = a.copy()
    a[where] = value
    return a


@pytest.mark.parametrize("case", bad_dispatch_cases(), ids=lambda c: c[0])
def test_dispatch_rejects_before_any_kernel(case, kernels, inp):
    _, mutate, exc, fragments = case
    x, over = mutate(inp)
    buf = host_buffer()
    raises(exc, lambda: buf.dispatch(x, **dispatch_kwargs(inp, **over)), *fragments)
    assert kernels == []


def test_valid_dispatch_reaches_notify_first(kernels, inp, monkeypatch):
    """The same inputs without a mutation pass validation: the context is made, then notify
    runs (first kernel); cached mode runs cached_notify first; combine too."""
    buf = host_buffer()
    raises(KernelCalled, lambda: buf.dispatch(inp.x, **dispatch_kwargs(inp)), "IntranodeContext")
    monkeypatch.setattr(intranode, "IntranodeContext", lambda *a, **k: object())
    raises(KernelCalled, lambda: buf.dispatch(inp.x, **dispatch_kwargs(inp)), "notify_dispatch")
    h = fake_handle(T=inp.T)
    raises(KernelCalled, lambda: buf.dispatch(inp.x, handle=h, config=CONFIG), "cached_notify")
    raises(KernelCalled, lambda: buf.combine(np.zeros((20, inp.H), BF16), h, config=CONFIG),
           "cached_notify")
    assert kernels == ["IntranodeContext", "notify_dispatch", "cached_notify", "cached_notify"]


def test_strided_scales_and_1d_scales_are_accepted(kernels, inp):
    buf = host_buffer()
    x8 = inp.x.astype(FP8)
    col_major = np.ascontiguousarray(np.ones((inp.T, 2), np.float32).T).T  # DeepEP's test layout
    assert not col_major.flags.c_contiguous
    for scales in (col_major, np.ones(inp.T, np.float32), np.ones((inp.T, 2), np.int32)):
        raises(KernelCalled, lambda: buf.dispatch((x8, scales), **dispatch_kwargs(inp)))
    assert kernels == ["IntranodeContext"] * 3


def test_buffer_too_small_names_the_bytes_needed(kernels, inp):
    need = intranode.nvl_bytes_needed(2, C, 64, inp.H * 2, inp.K, 0)
    buf = host_buffer(nbytes=need - 128)
    err = raises(ValueError, lambda: buf.dispatch(inp.x, **dispatch_kwargs(inp)),
                 "num_nvl_bytes", f"needs {need} bytes", f"has {need - 128}")
    assert "get_nvl_buffer_size_hint" in str(err)
    # FP8 with scales needs the scale ring too
    need8 = intranode.nvl_bytes_needed(2, C, 64, inp.H, inp.K, 2)
    buf8 = host_buffer(nbytes=need8 - 128)
    raises(ValueError, lambda: buf8.dispatch((inp.x.astype(FP8), np.ones((inp.T, 2), np.float32)),
                                             **dispatch_kwargs(inp)), f"needs {need8} bytes")
    # exactly enough passes validation
    ok = host_buffer(nbytes=need)
    raises(KernelCalled, lambda: ok.dispatch(inp.x, **dispatch_kwargs(inp)))
    # no NVLink buffer at all
    none = host_buffer(nbytes=0)
    raises(ValueError, lambda: none.dispatch(inp.x, **dispatch_kwargs(inp)), "has 0")
    assert kernels == ["IntranodeContext"]


def test_device_mismatch_is_named(kernels, inp):
    buf = host_buffer()
    buf.device = 1  # as if this rank's GPU were device 1: host arrays are then on the wrong device
    raises(ValueError, lambda: buf.dispatch(inp.x, **dispatch_kwargs(inp)),
           "x: expected an array on CUDA device 1 (this rank's device)", "the host")
    assert kernels == []


def test_rank_counts_beyond_a_node(kernels, inp):
    # 16 ranks are 2 nodes of 8: internode mode, which needs the NVSHMEM buffer
    buf = host_buffer(size=16)
    raises(ValueError, lambda: buf.dispatch(inp.x, **dispatch_kwargs(inp)),
           "num_rdma_bytes", "internode")
    raises(ValueError, lambda: buf.combine(inp.x, fake_handle(R=16)), "num_rdma_bytes")
    assert kernels == []


def test_num_sms_beyond_the_gpu(kernels, inp):
    buf = host_buffer(device_sms=6)
    raises(ValueError, lambda: buf.dispatch(inp.x, **dispatch_kwargs(inp)),
           "config: num_sms=8", "6 SMs")
    assert kernels == []


def test_expert_id_check_is_skipped_with_num_worst_tokens(kernels, inp):
    """Documented: no host synchronisation (CUDA-graph capturable) -> no range check."""
    buf = host_buffer()
    bad = _with(inp.topk, (0, 0), 99)
    raises(ValueError, lambda: buf.dispatch(inp.x, **dispatch_kwargs(inp, topk_idx=bad)), "99")
    assert kernels == []
    raises(KernelCalled, lambda: buf.dispatch(inp.x, **dispatch_kwargs(
        inp, topk_idx=bad, num_worst_tokens=2 * inp.T)))


# ============================================================================ check_expert_ids

def test_check_expert_ids_numpy_and_torch():
    ok = np.array([[-1, 0], [15, 3]], np.int64)
    check_expert_ids(ok, 16)
    check_expert_ids(np.zeros((0, 4), np.int64), 1)
    raises(ValueError, lambda: check_expert_ids(ok, 15), "[-1, 15)", "got 15 at [1, 0]")
    raises(ValueError, lambda: check_expert_ids(np.array([[0, -5]]), 4, name="ids"),
           "ids:", "got -5 at [0, 1]")
    torch = pytest.importorskip("torch")
    check_expert_ids(torch.tensor(ok), 16)
    raises(ValueError, lambda: check_expert_ids(torch.tensor(ok), 10), "got 15 at [1, 0]")


# ============================================================================ layout validation

@pytest.mark.parametrize("mutate, exc, fragments", [
    (lambda t: (t.astype(np.int32), 16), TypeError, ["topk_idx", "int64"]),
    (lambda t: (t[:, 0], 16), ValueError, ["topk_idx", "2-D"]),
    (lambda t: (np.asfortranarray(t), 16), ValueError, ["topk_idx", "C-contiguous"]),
    (lambda t: (t, 15), ValueError, ["num_experts", "multiple of the rank count 2"]),
    (lambda t: (t, 0), ValueError, ["num_experts"]),
    (lambda t: (_with(t, (2, 2), 16), 16), ValueError, ["topk_idx", "got 16 at [2, 2]"]),
])
def test_layout_rejects_before_any_kernel(mutate, exc, fragments, kernels, inp):
    topk, E = mutate(inp.topk)
    buf = host_buffer()
    raises(exc, lambda: buf.get_dispatch_layout(topk, E), *fragments)
    assert kernels == []


def test_layout_plumbing(monkeypatch, inp):
    seen = {}

    def fake_layout(topk, num_experts, num_ranks, num_gpus_per_node=None, stream=None):
        seen.update(num_experts=num_experts, num_ranks=num_ranks, gpus=num_gpus_per_node)
        return reference.get_dispatch_layout(topk, num_experts, num_ranks, num_gpus_per_node)

    monkeypatch.setattr(layout, "get_dispatch_layout", fake_layout)
    buf = host_buffer()
    per_rank, per_rdma, per_expert, in_rank, event = buf.get_dispatch_layout(inp.topk, inp.E)
    assert seen == dict(num_experts=16, num_ranks=2, gpus=None)
    assert per_rdma is None and isinstance(event, EventOverlap) and event.event is None
    np.testing.assert_array_equal(per_rank, inp.per_rank)
    np.testing.assert_array_equal(per_expert, inp.per_expert)
    np.testing.assert_array_equal(in_rank, inp.in_rank)


# ============================================================================ combine validation

def test_combine_validation(kernels, inp):
    buf = host_buffer()
    N, T, H = 20, inp.T, inp.H
    h = fake_handle(N=N)
    y = np.zeros((N, H), BF16)
    w = np.zeros((N, 4), np.float32)
    bias = np.zeros((T, H), BF16)
    cases = [
        (lambda: buf.combine(y, None, config=CONFIG), ValueError, ["handle", "None"]),
        (lambda: buf.combine(y, h[:5], config=CONFIG), TypeError, ["handle", "6-tuple"]),
        (lambda: buf.combine(y.astype(np.float32), h, config=CONFIG), TypeError,
         ["x", "bfloat16", "float32"]),
        (lambda: buf.combine(y[:-1], h, config=CONFIG), ValueError, ["x", f"[{N}, *]", "[19, 256]"]),
        (lambda: buf.combine(y[:, :4].copy(), h, config=CONFIG), ValueError,
         ["x", "multiple of 16 bytes"]),
        (lambda: buf.combine(y, h, topk_weights=w.astype(np.float16), config=CONFIG), TypeError,
         ["topk_weights", "float32"]),
        (lambda: buf.combine(y, h, topk_weights=w[:-1], config=CONFIG), ValueError,
         ["topk_weights", f"[{N}, 1..{MAX_TOPK}]"]),
        (lambda: buf.combine(y, h, bias=bias[:-1], config=CONFIG), ValueError,
         ["bias[0]", f"[{T}, {H}]"]),
        (lambda: buf.combine(y, h, bias=(bias, bias.astype(np.float32)), config=CONFIG), TypeError,
         ["bias[1]", "bfloat16"]),
        (lambda: buf.combine(y, h, bias=(bias, bias, bias), config=CONFIG), ValueError,
         ["bias", "pair"]),
        (lambda: buf.combine(y, h, config=Config(10, 6, 64)), ValueError,
         ["config", "5 channels", "4 channels"]),
        (lambda: buf.combine(y, h, config=Config(8, 6, 32)), ValueError,
         ["num_max_nvl_chunked_recv_tokens >= 64", "32"]),
        (lambda: buf.combine(y, fake_handle(N=N, rank_prefix=np.zeros((2, 2), np.int64)),
                             config=CONFIG), TypeError, ["handle[0] (rank_prefix_matrix)", "int32"]),
        (lambda: buf.combine(y, fake_handle(N=N, send_head=np.zeros((T, 3), np.int32)),
                             config=CONFIG), ValueError, ["handle[5] (send_head)", f"[{T}, 2]"]),
        (lambda: buf.combine(y, fake_handle(N=N, in_rank=np.zeros((T, 2), np.int32)),
                             config=CONFIG), TypeError, ["handle[4] (is_token_in_rank)", "bool"]),
        (lambda: buf.combine(y, h, config=CONFIG, allocate_on_comm_stream=True), ValueError,
         ["allocate_on_comm_stream"]),
    ]
    for call, exc, fragments in cases:
        raises(exc, call, *fragments)
    assert kernels == []
    need = intranode.nvl_bytes_needed(2, C, 64, H * 2, 4, 0)
    small = host_buffer(nbytes=need - 128)
    raises(ValueError, lambda: small.combine(y, h, topk_weights=w, config=CONFIG),
           f"needs {need} bytes")
    # valid: the first thing that runs is the context / cached_notify
    raises(KernelCalled, lambda: buf.combine(y, h, topk_weights=w, bias=(bias, None),
                                             config=CONFIG))
    assert kernels == ["IntranodeContext"]


# ============================================================================ handles

def test_handle_from_another_buffer(kernels, inp):
    a, b = host_buffer(), host_buffer()
    h = _tag(fake_handle(), a)
    y = np.zeros((20, inp.H), BF16)
    raises(ValueError, lambda: b.combine(y, h, config=CONFIG), f"another Buffer (#{a._id}",
           "still alive", f"this is #{b._id}")
    raises(ValueError, lambda: b.dispatch(inp.x, handle=h, config=CONFIG), "another Buffer")
    a.explicitly_destroy = True
    a.destroy()
    raises(ValueError, lambda: b.combine(y, h, config=CONFIG), "since destroyed")
    # a plain tuple carries no owner and is only checked for shape
    raises(KernelCalled, lambda: b.combine(y, fake_handle(), config=CONFIG))


def _tag(items, buf):
    from numba_ep.buffer import _tag_handle

    return _tag_handle(items, buf._id, items, C, None)


def test_handle_behaves_like_a_six_tuple():
    items = fake_handle()
    h = _tag(items, host_buffer())
    assert isinstance(h, tuple) and len(h) == 6
    a, b, c, d, e, f = h
    assert d is items[3] and h[5] is items[5]
    h2 = copy.copy(h)
    assert isinstance(h2, _Handle) and h2.buffer_id == h.buffer_id and len(h2) == 6


def test_cached_dispatch_checks_the_handle(kernels, inp):
    buf = host_buffer()
    h = fake_handle(T=inp.T)
    raises(ValueError, lambda: buf.dispatch(inp.x[:-1], handle=h, config=CONFIG),
           "x", f"{inp.T} tokens", f"got {inp.T - 1}")
    raises(ValueError, lambda: buf.dispatch(inp.x, handle=h, config=Config(10, 6, 64)),
           "channels")
    raises(ValueError, lambda: buf.dispatch(inp.x, handle=h, config=CONFIG, num_worst_tokens=5),
           "num_worst_tokens", "20 rows")
    assert kernels == []


# ============================================================================ lifecycle

def test_destroy_and_use_after(kernels, inp):
    buf = host_buffer()
    raises(RuntimeError, buf.destroy, "explicitly_destroy=True")
    buf.explicitly_destroy = True
    buf.destroy()
    buf.destroy()  # idempotent
    raises(RuntimeError, lambda: buf.dispatch(inp.x, **dispatch_kwargs(inp)), "destroyed")
    raises(RuntimeError, lambda: buf.combine(inp.x, fake_handle()), "destroyed")
    raises(RuntimeError, lambda: buf.get_dispatch_layout(inp.topk, 16), "destroyed")
    assert kernels == []


def test_broken_buffer_refuses_calls(kernels, inp, monkeypatch):
    from numba_ep.errors import CommTimeoutError

    buf = host_buffer()

    def timeout(*a, **k):
        raise CommTimeoutError("notify_dispatch: rank 0 waited 2 s for rank 1", peer=1)

    monkeypatch.setattr(intranode, "IntranodeContext", lambda *a, **k: object())
    monkeypatch.setattr(intranode, "notify_dispatch", timeout)
    raises(CommTimeoutError, lambda: buf.dispatch(inp.x, **dispatch_kwargs(inp)), "rank 1")
    raises(RuntimeError, lambda: buf.dispatch(inp.x, **dispatch_kwargs(inp)), "unusable",
           "rank 1")


def test_shrink_mode_is_not_faked():
    # low-latency mode itself: tests/test_buffer_low_latency.py
    buf = host_buffer()
    for name in ("low_latency_update_mask_buffer", "low_latency_query_mask_buffer",
                 "low_latency_clean_mask_buffer"):
        raises(NotImplementedError, lambda: getattr(buf, name)(), "shrink mode",
               "not implemented yet")


@pytest.mark.parametrize("kwargs, exc, fragments", [
    (dict(num_nvl_bytes=1000), ValueError, ["num_nvl_bytes", "multiple of 128", "1024"]),
    (dict(num_nvl_bytes=-128), ValueError, ["num_nvl_bytes"]),
    (dict(num_nvl_bytes=1.5), TypeError, ["num_nvl_bytes"]),
    (dict(num_rdma_bytes=100), ValueError, ["num_rdma_bytes", "multiple of 128"]),
    (dict(timeout_s=0), ValueError, ["timeout_s"]),
    (dict(timeout_s=-1.0), ValueError, ["timeout_s"]),
    (dict(use_fabric=True), NotImplementedError, ["use_fabric"]),
    (dict(group=object(), comm=object()), ValueError, ["group or comm"]),
])
def test_constructor_rejects_before_touching_cuda(kwargs, exc, fragments):
    raises(exc, lambda: Buffer(**kwargs), *fragments)


def test_set_num_sms_and_static_helpers():
    assert Buffer.is_sm90_compiled() is True
    raises(ValueError, lambda: Buffer.set_num_sms(7), "even")


def test_garbage_collected_host_buffer_unregisters():
    from numba_ep.buffer import _live_buffers

    buf = host_buffer()
    bid = buf._id
    assert bid in _live_buffers
    del buf
    gc.collect()
    assert bid not in _live_buffers


# ============================================================================ plumbing (emulated)

class Emulator:
    """Kernel entry points answered from the reference, recording what the Buffer passes."""

    def __init__(self, monkeypatch, ref, rank):
        self.ref, self.rank, self.calls = ref, rank, []
        mine = ref[rank]
        emu = self

        class Ctx:
            def __init__(self, ipc, rank, num_ranks, timeout_s=None):
                emu.calls.append(("ctx", rank, num_ranks, timeout_s))

        def notify_dispatch(ctx, per_rank, in_rank, per_expert, E, C_, align, stream):
            self.calls.append(("notify", E, C_, align))
            return (mine["rank_prefix_matrix"].copy(), mine["channel_prefix_matrix"].copy(),
                    mine["recv_channel_prefix_matrix"].copy())

        def wait_recv_counts(ctx, L):
            self.calls.append(("wait", L))
            return mine["num_recv_tokens"], self.per_expert_list

        def cached_notify(ctx, C_, stream):
            self.calls.append(("cached_notify", C_))

        def dispatch(ctx, x_b, sc, topk, w, in_rank, chan, rank_prefix, recv_chan, rx, rsc, rtopk,
                     rw, rsrc, send_head, E, slots, C_, worst, stream):
            self.calls.append(("dispatch", dict(
                x_b=x_b, sc=sc, topk=topk, w=w, in_rank=in_rank, rx=rx, rsc=rsc, rtopk=rtopk,
                rw=rw, rsrc=rsrc, send_head=send_head, E=E, slots=slots, C=C_, worst=worst,
                rank_prefix=rank_prefix)))
            write_dispatch_outputs(mine, rx, rsc, rtopk, rw, rsrc, send_head)

        def combine(ctx, x, w, b0, b1, src, rank_prefix, recv_chan, send_head, out, out_w, slots,
                    C_, stream):
            self.calls.append(("combine", dict(x=x, w=w, b0=b0, b1=b1, out=out, out_w=out_w,
                                               slots=slots, C=C_, send_head=send_head)))
            out[:] = 7

        for name, fn in (("IntranodeContext", Ctx), ("notify_dispatch", notify_dispatch),
                         ("wait_recv_counts", wait_recv_counts), ("cached_notify", cached_notify),
                         ("dispatch", dispatch), ("combine", combine)):
            monkeypatch.setattr(intranode, name, fn)

    def names(self):
        return [c[0] for c in self.calls]


def two_rank_problem(seed=3, T=(37, 12), fp8=False, align=1, worst=0):
    rng = np.random.default_rng(seed)
    inputs = [make_inputs(rng, t) for t in T]
    scales = None
    xs = [i.x for i in inputs]
    if fp8:
        casts = [reference.per_token_cast_to_fp8(i.x) for i in inputs]
        xs = [c[0] for c in casts]
        scales = [c[1] for c in casts]
    ref = reference.intranode_dispatch(xs, [i.topk for i in inputs], [i.weights for i in inputs],
                                       16, C, x_scales=scales, expert_alignment=align,
                                       num_worst_tokens=worst)
    return inputs, xs, scales, ref


@pytest.mark.parametrize("rank", [0, 1])
def test_dispatch_plumbing_bf16(monkeypatch, rank):
    inputs, xs, _, ref = two_rank_problem(align=4)
    emu = Emulator(monkeypatch, ref, rank)
    emu.per_expert_list = ref[rank]["num_recv_tokens_per_expert_list"]
    buf = host_buffer(rank=rank, timeout_s=7)
    i = inputs[rank]
    recv_x, recv_topk, recv_w, counts, handle, event = buf.dispatch(
        i.x, expert_alignment=4, **dispatch_kwargs(i))
    assert emu.names() == ["ctx", "notify", "wait", "dispatch"]
    assert emu.calls[0] == ("ctx", rank, 2, 7.0)
    assert emu.calls[1] == ("notify", 16, C, 4)
    assert emu.calls[2] == ("wait", 8)
    d = emu.calls[3][1]
    N = ref[rank]["num_recv_tokens"]
    assert d["x_b"].dtype == np.uint8 and d["x_b"].shape == (i.T, i.H * 2)
    assert d["rx"].shape == (N, i.H * 2) and d["rx"].dtype == np.uint8
    assert d["rtopk"].shape == (N, 4) and d["rtopk"].dtype == np.int64
    assert d["rw"].dtype == np.float32 and d["rsrc"].shape == (N,) and d["rsrc"].dtype == np.int32
    assert d["send_head"].shape == (i.T, 2) and d["send_head"].dtype == np.int32
    assert (d["sc"], d["rsc"], d["E"], d["slots"], d["C"], d["worst"]) == (None, None, 16, 64, C, 0)
    # outputs in the caller's dtype and the DeepEP tuple shape
    assert recv_x.dtype == BF16 and recv_x.shape == (N, i.H)
    np.testing.assert_array_equal(recv_x.view(np.uint16), ref[rank]["recv_x"].view(np.uint16))
    np.testing.assert_array_equal(recv_topk, ref[rank]["recv_topk_idx"])
    assert counts == ref[rank]["num_recv_tokens_per_expert_list"] and all(c % 4 == 0 for c in counts)
    assert isinstance(handle, _Handle) and handle.buffer_id == buf._id and len(handle) == 6
    rp, cp, rcp, src, in_rank, send_head = handle
    np.testing.assert_array_equal(rp, ref[rank]["rank_prefix_matrix"])
    np.testing.assert_array_equal(src, ref[rank]["recv_src_idx"])
    np.testing.assert_array_equal(send_head, ref[rank]["send_head"])
    assert in_rank is i.in_rank
    assert event.event is None

    # cached dispatch: no notify, no wait, no send_head, N from the handle
    emu.calls.clear()
    recv_again, a, b, c, dd, _ = buf.dispatch(i.x, handle=handle, config=CONFIG)
    assert (a, b, c, dd) == (None, None, None, None)
    assert emu.names() == ["cached_notify", "dispatch"]
    d = emu.calls[1][1]
    assert d["send_head"] is None and d["topk"] is None and d["rtopk"] is None
    assert d["rx"].shape == (N, i.H * 2) and d["rank_prefix"] is handle.dev[0]
    np.testing.assert_array_equal(recv_again.view(np.uint16), recv_x.view(np.uint16))

    # combine: bf16 in, bias pair, weights
    emu.calls.clear()
    y = np.ones((N, i.H), BF16)
    bias1 = np.zeros((i.T, i.H), np.uint16)  # the integer carrier is accepted on the host too
    combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=(None, bias1),
                                          config=CONFIG)
    assert emu.names() == ["cached_notify", "combine"]
    cmb = emu.calls[1][1]
    assert cmb["x"].dtype == np.uint16 and cmb["x"].shape == (N, i.H)
    assert cmb["b0"] is None and cmb["b1"].dtype == np.uint16
    assert cmb["out"].shape == (i.T, i.H) and cmb["out_w"].shape == (i.T, 4)
    assert cmb["send_head"] is handle.dev[5] and cmb["C"] == C and cmb["slots"] == 64
    assert combined.dtype == BF16 and combined.shape == (i.T, i.H)
    assert (combined.view(np.uint16) == 7).all()
    assert combined_w.dtype == np.float32


def test_dispatch_plumbing_fp8_worst_tokens(monkeypatch):
    T = (37, 12)
    worst = sum(T)
    inputs, xs, scales, ref = two_rank_problem(fp8=True, worst=worst)
    emu = Emulator(monkeypatch, ref, 0)
    buf = host_buffer()
    i = inputs[0]
    col_major = np.ascontiguousarray(scales[0].T).T
    (rx, rsc), rtopk, rw, counts, handle, _ = buf.dispatch(
        (xs[0], col_major), num_worst_tokens=worst, **dispatch_kwargs(i))
    assert emu.names() == ["ctx", "notify", "dispatch"]  # no host wait
    d = emu.calls[-1][1]
    assert d["sc"].strides == col_major.strides and d["worst"] == worst
    assert d["rsc"].shape == (worst, i.H // 128) and d["rx"].shape == (worst, i.H)
    assert counts == [] and handle.num_recv_tokens is None
    assert rx.dtype == FP8 and rx.shape == (worst, i.H)
    assert rsc.dtype == np.float32 and rsc.shape == (worst, i.H // 128)
    n = ref[0]["num_recv_tokens"]
    np.testing.assert_array_equal(rsc[:n], ref[0]["recv_x_scales"][:n])
    assert (rtopk[n:] == -1).all()
    # 1-D int32 scales come back 1-D int32
    emu.calls.clear()
    s1 = np.arange(i.T, dtype=np.int32)
    emu.ref = ref
    ref[0]["recv_x_scales"] = np.zeros((worst, 1), np.float32)
    (rx, rsc), *_ = buf.dispatch((xs[0], s1), num_worst_tokens=worst, **dispatch_kwargs(i))
    assert rsc.dtype == np.int32 and rsc.shape == (worst,)
    assert emu.calls[-1][1]["sc"].shape == (i.T, 1)


# ============================================================================ interop

def test_array_info_kinds():
    a = np.zeros((3, 4), BF16)
    info = array_info(a)
    assert (info.kind, info.dtype, info.itemsize, info.shape, info.device, info.c_contiguous) == \
        ("numpy", "bfloat16", 2, (3, 4), None, True)
    assert array_info(np.zeros((4, 3), np.float32).T).strides == (1, 3)
    raises(TypeError, lambda: array_info([1, 2], "foo"), "foo")
    torch = pytest.importorskip("torch")
    t = torch.zeros(3, 4, dtype=torch.bfloat16)
    ti = array_info(t)
    assert (ti.kind, ti.dtype, ti.itemsize, ti.device, ti.c_contiguous) == \
        ("torch", "bfloat16", 2, None, True)
    assert array_info(t.t()).c_contiguous is False
    # a CPU tensor: a NumPy view with the carrier dtype (the CPU backend), sharing memory;
    # a GPU Buffer rejects it earlier, in check_array (wrong device)
    v = device_view(t, "x")
    assert isinstance(v, np.ndarray) and v.dtype == np.uint16 and v.shape == (3, 4)
    v[0, 0] = 0x3F80  # bf16 1.0
    assert float(t[0, 0]) == 1.0
    raises(ValueError, lambda: check_array(t, "x", device=0), "CUDA device 0", "host")


def test_cupy_dtype_of_each_torch_dtype():
    """The dtype device_view gives a CUDA tensor's CuPy view (built from its pointer on a GPU):
    carriers for what CuPy lacks, the same dtype otherwise, a clear error for the rest."""
    torch = pytest.importorskip("torch")
    from numba_ep.interop import _cupy_dtype_for

    want = {torch.bfloat16: np.uint16, torch.float8_e4m3fn: np.uint8, torch.float8_e5m2: np.uint8,
            torch.bool: np.bool_, torch.float32: np.float32, torch.float16: np.float16,
            torch.int64: np.int64, torch.int32: np.int32, torch.uint8: np.uint8}
    for td, nd in want.items():
        assert _cupy_dtype_for(td) == np.dtype(nd), td
        assert _cupy_dtype_for(td) == np.dtype(nd), td   # remembered
    with pytest.raises(TypeError):
        _cupy_dtype_for(torch.complex32)


def test_torch_callers_stream_wrapper_is_made_once_per_stream(monkeypatch):
    """caller_stream wraps torch's current stream in a CuPy ExternalStream (a few us to make);
    one wrapper per (handle, device) is kept and reused, a new handle gets its own."""
    pytest.importorskip("cupy")
    from numba_ep import interop

    handle = {"h": 0x1234}
    monkeypatch.setattr(interop, "current_stream_handle", lambda torch_side, device: handle["h"])
    monkeypatch.setattr(interop, "_external_streams", {})
    a = interop.caller_stream(True, 0)
    assert a.ptr == 0x1234 and interop.caller_stream(True, 0) is a
    handle["h"] = 0x5678
    b = interop.caller_stream(True, 0)
    assert b is not a and b.ptr == 0x5678
    assert interop.caller_stream(True, 1) is not b   # another device, another wrapper
    assert len(interop._external_streams) == 3


def test_bf16_and_fp8_carriers_on_the_host():
    x = np.arange(12, dtype=np.float32).reshape(3, 4).astype(BF16)
    b = bytes_view(x)
    assert b.dtype == np.uint8 and b.shape == (3, 8)
    back = to_caller(b, False, dtype=x.dtype)
    assert back.dtype == BF16 and back.shape == (3, 4)
    np.testing.assert_array_equal(back.astype(np.float32), x.astype(np.float32))
    assert to_caller(x.view(np.uint16), False) is not None
    # the CuPy convention: uint16 stands for bfloat16, uint8 for float8_e4m3fn
    check_array(x.view(np.uint16), "x", dtypes=("bfloat16",))
    check_array(np.zeros(3, np.uint8), "x", dtypes=("float8_e4m3fn",))
    raises(TypeError, lambda: check_array(x.view(np.int16), "x", dtypes=("bfloat16",)),
           "bfloat16 (CuPy: uint16)", "int16")


def test_bytes_view_of_an_empty_torch_tensor():
    """A rank with no tokens: torch gives empty tensors arbitrary strides, which .view(uint8)
    refuses; bytes_view still returns [0, row_bytes] (found by the internode GPU test)."""
    torch = pytest.importorskip("torch")
    t = torch.empty_strided((0, 512), (0, 0), dtype=torch.bfloat16)
    b = bytes_view(t, "x")
    assert b.shape == (0, 1024) and b.dtype == np.uint8


def test_to_caller_torch_views_on_the_host():
    """to_caller's torch branch (DLPack from a NumPy stand-in for CuPy): BF16 rows travel as bytes
    and come back as bfloat16, bool as bytes viewed back, other dtypes as themselves."""
    torch = pytest.importorskip("torch")
    x = (np.arange(24, dtype=np.float32).reshape(3, 8) - 5).astype(BF16)
    t = to_caller(x.view(np.uint8), True, torch_dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == (3, 8)
    np.testing.assert_array_equal(t.float().numpy(), x.astype(np.float32))
    t16 = to_caller(x.view(np.uint16), True, torch_dtype=torch.bfloat16)
    assert torch.equal(t16, t)
    b = to_caller(np.array([[True, False], [False, True]]), True)
    assert b.dtype == torch.bool and b.tolist() == [[True, False], [False, True]]
    i = to_caller(np.arange(6, dtype=np.int32).reshape(2, 3), True)
    assert i.dtype == torch.int32 and i.tolist() == [[0, 1, 2], [3, 4, 5]]
    f = to_caller(np.ones(4, np.float32).view(np.int32), True, torch_dtype=torch.float32)
    assert f.dtype == torch.float32 and f.tolist() == [1.0] * 4
    q = to_caller(np.zeros((2, 4), np.uint8), True, torch_dtype=torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == (2, 4)


def test_a_tagged_handle_is_validated_once_per_buffer_and_channel_count(kernels, inp):
    buf = host_buffer()
    h = _tag(fake_handle(T=inp.T), buf)
    raises(KernelCalled, lambda: buf.dispatch(inp.x, handle=h, config=CONFIG))
    assert h.checked[:2] == (buf._id, C)
    # Remembered: the second call does not look at the arrays again...
    infos = h.checked[2]
    raises(KernelCalled, lambda: buf.dispatch(inp.x, handle=h, config=CONFIG))
    assert h.checked[2] is infos
    # ...but every per-call rule still applies: tokens, channel count, another Buffer.
    raises(ValueError, lambda: buf.dispatch(inp.x[:-1], handle=h, config=CONFIG), "x",
           f"{inp.T} tokens")
    raises(ValueError, lambda: buf.dispatch(inp.x, handle=h, config=Config(10, 6, 64)),
           "channels")
    raises(ValueError, lambda: host_buffer().dispatch(inp.x, handle=h, config=CONFIG),
           "another Buffer")


def test_cupy_arrays_are_described_from_their_own_attributes():
    """array_info / address read CuPy's attributes directly (no dtype.name, no flags object);
    the answers must match what those slower paths would say."""
    from kernels_for_tests import cupy_view

    from numba_ep.interop import address, is_array, is_cupy

    a = cupy_view((6, 16), np.uint16, ptr=0x7000)
    assert is_cupy(a) and is_array(a) and address(a) == 0x7000
    info = array_info(a, "x")
    assert info == ("cupy", "uint16", 2, (6, 16), (16, 1), 0, True)
    t = cupy_view((16, 6), np.float32, strides=(4, 64))       # a transposed view
    info = array_info(t, "t")
    assert info.c_contiguous is False and info.strides == (1, 16) and info.dtype == "float32"
    raises(ValueError, lambda: check_array(t, "t", device=0), "t: expected a C-contiguous")
    e = cupy_view((0, 16), np.uint16, strides=(0, 0))           # empty: contiguous
    assert array_info(e, "e").c_contiguous is True
    assert not is_cupy(np.zeros(3)) and not is_cupy(None)


# ============================================================================ bench intranode

def test_bench_intranode_takes_the_slowest_rank_and_the_mean_bandwidth(monkeypatch):
    import numba_ep.group
    from numba_ep import bench

    seen = {}

    def fake_spawn(fn, n, **kwargs):
        seen.update(fn=fn, n=n, **kwargs)
        return [{"dispatch BF16, us (back-to-back calls, DeepEP's method)": 250.0 + r,
                 "dispatch BF16, device us (graph replay)": 240.0 - r,
                 "dispatch BF16, host us per call": 150.0 + 10 * r,
                 "dispatch BF16, logical GB/s": 400.0 + 20 * r,
                 "remote rows": 4000.0 + 2 * r} for r in range(n)]

    monkeypatch.setattr(numba_ep.group, "spawn", fake_spawn)
    rows = bench.bench_intranode(2)
    assert seen["fn"] is bench.intranode_rank and seen["n"] == 2
    assert rows["ranks"] == 2.0
    assert rows["dispatch BF16, us (back-to-back calls, DeepEP's method)"] == 251.0   # slowest
    assert rows["dispatch BF16, device us (graph replay)"] == 240.0
    assert rows["dispatch BF16, host us per call"] == 160.0
    assert rows["dispatch BF16, logical GB/s"] == 410.0                            # mean
    assert rows["remote rows"] == 4001.0
    assert rows["DeepEP V1 2xH100: dispatch BF16 / FP8 / combine, us"] == "356 / 253 / 414"


def test_gpus_per_node_resolution(monkeypatch):
    """Which ranks share a node: the env override, else the ranks per host, else up to 8."""
    from numba_ep.buffer import _resolve_gpus_per_node

    monkeypatch.delenv("NUMBA_EP_GPUS_PER_NODE", raising=False)
    g = SimpleNamespace
    assert _resolve_gpus_per_node(g(rank=0, size=4, local_size=4)) == 4
    assert _resolve_gpus_per_node(g(rank=0, size=16, local_size=8)) == 8   # two hosts of 8
    assert _resolve_gpus_per_node(g(rank=0, size=8, local_size=2)) == 2
    assert _resolve_gpus_per_node(g(rank=0, size=16, local_size=16)) == 8  # DeepEP's node size
    monkeypatch.setenv("NUMBA_EP_GPUS_PER_NODE", "2")
    assert _resolve_gpus_per_node(g(rank=0, size=4, local_size=4)) == 2
    monkeypatch.setenv("NUMBA_EP_GPUS_PER_NODE", "3")
    raises(ValueError, lambda: _resolve_gpus_per_node(g(rank=0, size=4, local_size=4)),
           "NUMBA_EP_GPUS_PER_NODE", "divisor of the rank count 4", "'3'")
    monkeypatch.delenv("NUMBA_EP_GPUS_PER_NODE")
    assert Buffer.get_num_gpus_per_node() == 1   # no group: this process alone


def test_device_guard_switches_only_when_needed_and_restores(monkeypatch):
    """Buffer._guard (every GPU call runs inside it): the Buffer's device is made current only
    when another one is, the caller's comes back afterwards, also after an error, and a
    CommTimeoutError inside makes the Buffer unusable."""
    from cupy.cuda import runtime

    from numba_ep.errors import CommTimeoutError

    current, calls = [0], []
    monkeypatch.setattr(runtime, "getDevice", lambda: current[0])

    def set_device(d):
        calls.append(d)
        current[0] = d
    monkeypatch.setattr(runtime, "setDevice", set_device)
    buf = Buffer._host_mode(SimpleNamespace(rank=0, size=2))
    buf._host, buf.device = False, 1        # as a GPU Buffer on device 1
    try:
        with buf._guard():
            assert current[0] == 1
        assert calls == [1, 0] and current[0] == 0
        calls.clear()
        current[0] = 1
        with buf._guard():
            pass
        assert calls == []                  # already current: no switch
        current[0] = 0
        with pytest.raises(ValueError):
            with buf._guard():
                raise ValueError("not a timeout")
        assert current[0] == 0 and buf._broken is None
        with pytest.raises(CommTimeoutError):
            with buf._guard():
                raise CommTimeoutError("rank 1 did not arrive")
        assert current[0] == 0 and "rank 1 did not arrive" in buf._broken
    finally:
        buf._host = True                    # nothing of a GPU Buffer to release


@pytest.mark.parametrize("torch_side, capturing, on_comm, views, want", [
    (True, False, False, True, "torch"),      # a torch caller's outputs: made by torch
    (True, False, True, True, "comm"),        # allocate_on_comm_stream: CuPy on the comm stream
    (True, True, False, True, "caller"),      # a CuPy capture: CuPy's pool (torch can't know)
    (True, False, False, False, "caller"),    # TORCH_OUTPUT_VIEWS off: CuPy's pool, DLPack
    (False, False, False, True, "caller"),    # a CuPy caller
])
def test_where_a_calls_outputs_are_made(monkeypatch, torch_side, capturing, on_comm, views,
                                        want):
    """_Call.alloc, the step in which a normal-mode call makes its outputs: torch's allocator
    for torch callers (handed back as views of their tensors), except on the comm stream, during
    a CuPy graph capture, or with interop.TORCH_OUTPUT_VIEWS off."""
    from cupy.cuda import runtime

    from numba_ep import buffer as B
    from numba_ep import interop

    streams = {True: SimpleNamespace(ptr=11), False: SimpleNamespace(ptr=22)}
    monkeypatch.setattr(B, "caller_stream", lambda torch_side, device: streams[torch_side])
    monkeypatch.setattr(runtime, "streamIsCapturing", lambda ptr: capturing)
    monkeypatch.setattr(interop, "TORCH_OUTPUT_VIEWS", views)
    buf = SimpleNamespace(_host=False, _comm_stream=SimpleNamespace(ptr=33), _handoff_events=(),
                          device=3)
    call = B._Call(buf, torch_side, None, False, on_comm)
    got = call.alloc()
    if want == "torch":
        assert isinstance(got, B._TorchAllocations)
        assert got.stream is streams[True] and got.device == 3
    else:
        assert got is {"comm": buf._comm_stream, "caller": streams[torch_side]}[want]
