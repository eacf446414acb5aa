"""CPU tests of the compile-and-cache half of numba_ep.launch (loading and launching need a GPU:
tests/gpu/test_foundation_gpu.py)."""
import json
import os

import pytest

import numba_ep  # noqa: F401
from kernels_for_tests import make_axpy  # noqa: E402
from numba_ep import launch


SIG = "void(uint64, uint64, int32)"


def test_parse_signature_accepts_scalars_only():
    assert len(launch.parse_signature(SIG)) == 3
    with pytest.raises(TypeError, match="argument 0"):
        launch.parse_signature("void(float32[:], int32)")
    with pytest.raises(TypeError, match="returns void"):
        launch.parse_signature("int32(int32)")


def test_compile_cubin_without_gpu(sm90):
    cubin, meta = launch.compile_cubin(make_axpy(2.0), launch.parse_signature(SIG), (9, 0))
    assert cubin[:4] == b"\x7fELF"  # a real cubin
    assert "axpy" in meta["entry_name"]
    assert meta["cooperative"] is False and meta["nvshmem"] is False


def test_cache_round_trip(tmp_path, monkeypatch, sm90):
    monkeypatch.setenv("NUMBA_EP_CACHE_DIR", str(tmp_path))
    argtypes = launch.parse_signature(SIG)
    key = launch.KernelKey("tests:make_axpy", (("alpha", 2.0),), argtypes, (), (9, 0))
    calls = []
    real = launch.compile_cubin

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(launch, "compile_cubin", counting)
    cubin1, meta1 = launch.load_or_compile(make_axpy, key, {"alpha": 2.0})
    cubin2, meta2 = launch.load_or_compile(make_axpy, key, {"alpha": 2.0})
    assert len(calls) == 1, "the second load must come from the disk cache"
    assert cubin1 == cubin2 and meta1["entry_name"] == meta2["entry_name"]
    # A different constant is a different kernel.
    key3 = launch.KernelKey("tests:make_axpy", (("alpha", 3.0),), argtypes, (), (9, 0))
    launch.load_or_compile(make_axpy, key3, {"alpha": 3.0})
    assert len(calls) == 2
    # A corrupt metadata file is recompiled, not trusted.
    meta_file = tmp_path / f"{key.digest(nvshmem=False)}.json"
    meta_file.write_text("{not json")
    launch.load_or_compile(make_axpy, key, {"alpha": 2.0})
    assert len(calls) == 3
    assert "axpy" in json.loads(meta_file.read_text())["entry_name"]


def test_digest_changes_with_every_part():
    argtypes = launch.parse_signature(SIG)
    base = launch.KernelKey("m:f", (("a", 1),), argtypes, (), (9, 0))
    variants = [
        launch.KernelKey("m:g", (("a", 1),), argtypes, (), (9, 0)),
        launch.KernelKey("m:f", (("a", 2),), argtypes, (), (9, 0)),
        launch.KernelKey("m:f", (("a", 1),), argtypes[:2], (), (9, 0)),
        launch.KernelKey("m:f", (("a", 1),), argtypes, (("lineinfo", True),), (9, 0)),
        launch.KernelKey("m:f", (("a", 1),), argtypes, (), (10, 0)),
    ]
    digests = {base.digest(False)} | {v.digest(False) for v in variants}
    assert len(digests) == 1 + len(variants)
    assert base.digest(False) != base.digest(True)


def test_stream_handle_kinds():
    class Torchish:
        cuda_stream = 1234

    class Cupyish:
        ptr = 77

    assert launch.stream_handle(5) == 5
    assert launch.stream_handle(Torchish()) == 1234
    assert launch.stream_handle(Cupyish()) == 77
    with pytest.raises(TypeError, match="stream"):
        launch.stream_handle("default")


def test_compile_to_cache_needs_no_gpu_and_no_nvshmem(tmp_path, monkeypatch, sm90):
    """compile_to_cache fills the disk cache get_kernel reads (also for a kernel that links
    NVSHMEM, with no NVSHMEM runtime) and reports a second call as cached."""
    import sys

    from numba_ep.kernels import barrier, low_latency as ll

    monkeypatch.setenv("NUMBA_EP_CACHE_DIR", str(tmp_path))
    f, sig, kw = barrier.barrier_spec(2)
    assert launch.compile_to_cache(f, sig, cc=(9, 0), **kw) is True
    assert launch.compile_to_cache(f, sig, cc=(9, 0), **kw) is False
    sys.path.insert(0, os.path.dirname(__file__))
    from test_low_latency_compile import fake_ctx

    f, sig, kw = ll.dispatch_kernels(fake_ctx(R=2, transport="nvshmem"), 8)[0]
    assert kw["use_nvshmem"] is True
    assert launch.compile_to_cache(f, sig, cc=(9, 0), **kw) is True
    metas = list(tmp_path.glob("*.json"))
    cubins = list(tmp_path.glob("*.cubin"))
    assert len(metas) == 2 and len(cubins) == 2
    assert any(json.loads(m.read_text())["nvshmem"] for m in metas)


def test_wait_host_count_returns_raises_and_names_the_rank():
    """The host side of notify: spin until a kernel publishes counters[0] >= 0; a recorded
    device timeout, or nothing within the timeout, is a CommTimeoutError naming the rank."""
    import threading
    import time
    from types import SimpleNamespace

    import numpy as np

    from numba_ep.errors import CommTimeoutError
    from numba_ep.kernels.waits import wait_host_count

    checks = []
    ctx = SimpleNamespace(counters=np.full(4, -1, np.int32), rank=3, timeout_ns=int(2e9),
                          errors=SimpleNamespace(check=lambda: checks.append(1)))
    threading.Timer(0.05, lambda: ctx.counters.__setitem__(0, 7)).start()
    wait_host_count(ctx, "notify_dispatch")
    assert ctx.counters[0] == 7 and checks   # the error record is read on the way out

    def recorded():
        raise CommTimeoutError("dispatch: rank 3 waited 1 s for rank 0", what="dispatch", rank=3)

    ctx.counters[0] = -1
    ctx.errors = SimpleNamespace(check=recorded)
    with pytest.raises(CommTimeoutError, match="rank 0"):
        wait_host_count(ctx, "notify_dispatch")

    ctx.errors = SimpleNamespace(check=lambda: None)
    ctx.timeout_ns = 1   # deadline = 5 s past the (tiny) timeout
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match="internode_notify: rank 3 got no received-token"):
        wait_host_count(ctx, "internode_notify")
    assert 4.5 < time.monotonic() - start < 30
