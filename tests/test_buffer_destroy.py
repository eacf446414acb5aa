"""Buffer.destroy's order of collective steps, checked without a GPU: the NVSHMEM free and
finalize (which wait for every PE with no timeout) come only after two of the group's bounded
barriers, and a barrier that times out keeps this rank out of them. The GPU side of the same
promise: ``test_destroy_names_a_rank_that_never_comes`` in
tests/gpu/test_buffer_low_latency_gpu.py."""
import contextlib

import cupy
import pytest

import numba_ep
import numba_ep.memory
from numba_ep.errors import CommTimeoutError


class _Group:
    """A two-rank group that logs its barriers; barrier number ``fail_at`` times out."""

    rank, size = 0, 2

    def __init__(self, log, fail_at=None):
        self.log, self.fail_at, self.n = log, fail_at, 0

    def barrier(self):
        self.n += 1
        if self.n == self.fail_at:
            raise CommTimeoutError("rank 0: barrier timed out; rank(s) 1 of 2 never arrived",
                                   what="barrier", rank=0, peer=1)
        self.log.append("barrier")


class _Sym:
    def __init__(self, log):
        self.log, self.nbytes = log, 1 << 20

    def close(self):
        self.log.append("nvshmem_free")


def _gpu_buffer(monkeypatch, log, fail_at=None):
    """A Buffer as a GPU rank in low-latency mode holds it (NVSHMEM buffer, no NVLink buffer),
    with CUDA and NVSHMEM replaced by loggers."""
    monkeypatch.setattr(cupy.cuda, "Device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(cupy.cuda.runtime, "deviceSynchronize", lambda: log.append("sync"))
    monkeypatch.setattr(numba_ep.memory, "nvshmem_finalize", lambda: log.append("finalize"))
    buf = numba_ep.Buffer.__new__(numba_ep.Buffer)
    buf.__dict__.update(explicitly_destroy=True, _destroyed=False, _host=False, _id=None,
                        device=0, _ipc=None, _sym=_Sym(log), group=_Group(log, fail_at),
                        _ctx=None, _ll_ctxs={}, _ll_pending=None, _comm_stream=None)
    return buf


def test_destroy_meets_twice_before_nvshmem_collectives(monkeypatch):
    log = []
    buf = _gpu_buffer(monkeypatch, log)
    buf.destroy()
    assert log == ["sync", "barrier", "barrier", "nvshmem_free", "finalize"]
    buf.destroy()                      # idempotent: nothing more happens
    assert log == ["sync", "barrier", "barrier", "nvshmem_free", "finalize"]
    with pytest.raises(RuntimeError, match="destroyed"):
        buf.clean_low_latency_buffer(8, 128, 4)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_destroy_never_enters_nvshmem_after_a_timeout(monkeypatch, fail_at):
    """Barrier 1 times out when a peer never calls destroy; barrier 2 when this rank came after
    the peer gave up. Either way: the error names the peer, and no NVSHMEM collective runs."""
    log = []
    buf = _gpu_buffer(monkeypatch, log, fail_at=fail_at)
    with pytest.raises(CommTimeoutError) as e:
        buf.destroy()
    assert e.value.peer == 1
    assert "nvshmem_free" not in log and "finalize" not in log
    assert buf._sym is None and buf._destroyed
    buf.destroy()                      # a second call does not try again
    assert "nvshmem_free" not in log


@pytest.mark.parametrize("error, finalized", [
    (CommTimeoutError("rank 0: barrier timed out; rank(s) 1 of 2 never arrived", peer=1), False),
    (MemoryError("out of symmetric heap"), True)])
def test_failed_allocation_finalizes_only_when_no_rank_is_missing(monkeypatch, error, finalized):
    """A Buffer's NVSHMEM allocation that fails drops its NVSHMEM reference again, unless a rank
    never came (the allocation's barriers timed out): then nvshmem_finalize, which waits for
    every PE with no timeout, would hang, so the reference stays."""
    from numba_ep import buffer as B

    log = []

    def fail(nbytes):
        raise error

    monkeypatch.setattr(numba_ep.memory, "nvshmem_init", lambda g, d: log.append("init"))
    monkeypatch.setattr(numba_ep.memory, "SymmetricBuffer", fail)
    monkeypatch.setattr(numba_ep.memory, "nvshmem_finalize", lambda: log.append("finalize"))
    monkeypatch.setattr(numba_ep.memory, "nvshmem_runtime", lambda: object())
    with pytest.raises(type(error)):
        B._allocate_symmetric(_Group(log), 0, 1 << 20, allow_mnnvl=False)
    assert log == (["init", "finalize"] if finalized else ["init"])
