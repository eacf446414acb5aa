"""Bounded spin-waits and the error record a kernel leaves when one times out.

No kernel in numba_ep spins forever (DESIGN.md decision 5). Every wait reads ``%globaltimer``;
past ``timeout_ns`` the waiting thread writes what it waited for into a small record in
host-mapped pinned memory and the kernel returns. The host reads the record (no device sync
needed: the memory is the host's) and raises ``CommTimeoutError`` naming the kernel, the rank, the
peer and the channel, instead of hanging.

Record layout (int64 words, host-mapped, one per process, zero = no error):

    [0] flag: 1 once a timeout was recorded (written last, with a system-scope release)
    [1] kernel id (KERNEL_NAMES)   [2] rank that waited   [3] peer it waited for
    [4] channel (-1 if none)       [5] expected value     [6] value seen last
    [7] nanoseconds waited

Several threads may time out together; each writes a whole record before releasing the flag, so
the host sees one consistent-enough account (the last writer's fields may mix with another's only
if two threads time out within the same few nanoseconds; both describe real timeouts).
"""
from __future__ import annotations

import numpy as np

from numba import cuda, int64

from numba_ep.errors import CommTimeoutError
from numba_ep.kernels import ptx

KERNEL_NAMES = {
    1: "barrier",
    2: "notify_dispatch",
    3: "dispatch",
    4: "combine",
    5: "cached_notify",
    6: "low_latency_dispatch",
    7: "low_latency_combine",
    8: "test",
    9: "internode_notify",
    10: "internode_dispatch",
    11: "internode_combine",
    12: "internode_sync",
}
KERNEL_IDS = {v: k for k, v in KERNEL_NAMES.items()}

RECORD_WORDS = 8
DEFAULT_TIMEOUT_S = 100.0


@cuda.jit(device=True)
def record_timeout(err_addr, kernel_id, rank, peer, channel, expected, seen, waited_ns):
    """Write a timeout record at ``err_addr`` (host-mapped int64[8]) and publish its flag."""
    rec = ptx.ptr_i64(err_addr)
    rec[1] = int64(kernel_id)
    rec[2] = int64(rank)
    rec[3] = int64(peer)
    rec[4] = int64(channel)
    rec[5] = int64(expected)
    rec[6] = int64(seen)
    rec[7] = int64(waited_ns)
    ptx.st_release_sys_u64(err_addr, 1)


@cuda.jit(device=True)
def timed_out(start_ns, timeout_ns):
    """True once more than ``timeout_ns`` has passed since ``start_ns`` (from ptx.globaltimer)."""
    return int64(ptx.globaltimer() - start_ns) > timeout_ns


def timeout_ns(seconds=None) -> int:
    """Nanoseconds for a kernel's ``timeout_ns`` argument; None = ``$NUMBA_EP_TIMEOUT_S`` or 100 s."""
    import os

    if seconds is None:
        seconds = float(os.environ.get("NUMBA_EP_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if seconds <= 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {seconds}")
    return int(seconds * 1e9)


class ErrorRecord:
    """The host-mapped timeout record of this process (see the module docstring).

    ``device_address`` goes to kernels as their ``err_addr`` argument; ``check()`` raises
    ``CommTimeoutError`` if any kernel recorded a timeout since the last ``clear()``.
    """

    def __init__(self):
        from numba_ep.launch import SIMULATOR

        if SIMULATOR:
            self._host = np.zeros(RECORD_WORDS, dtype=np.int64)
            self.device_address = self._host.ctypes.data
            self._mem = None
            return
        self._mem, self._host, self.device_address = mapped_host_array(RECORD_WORDS, np.int64)
        self._host[:] = 0

    @property
    def words(self) -> np.ndarray:
        """The record as seen by the host (a live view)."""
        return self._host

    def clear(self) -> None:
        self._host[:] = 0

    def check(self, rank_hint=None) -> None:
        """Raise ``CommTimeoutError`` if a kernel recorded a timeout."""
        if self._host[0] == 0:  # the common case, one read of mapped memory
            return
        w = self._host.copy()
        kernel = KERNEL_NAMES.get(int(w[1]), f"kernel {int(w[1])}")
        rank, peer, channel = int(w[2]), int(w[3]), int(w[4])
        where = f" on channel {channel}" if channel >= 0 else ""
        msg = (f"{kernel}: rank {rank} waited {w[7] / 1e9:.3g} s for rank {peer}{where} "
               f"(expected {int(w[5])}, saw {int(w[6])}); rank {peer} stalled, died, or was "
               f"given different arguments. The kernel gave up instead of hanging; results of this "
               f"call are invalid.")
        self.clear()
        raise CommTimeoutError(msg, what=kernel, rank=rank, peer=peer)


def wait_host_count(ctx, what):
    """Busy-wait (host) until a kernel has published ``ctx.counters[0] >= 0`` (host-mapped
    int32 words it releases last), checking the error record now and then; raises
    CommTimeoutError (naming ``what`` and ``ctx.rank``) if a kernel recorded a timeout or
    nothing arrived within ``ctx.timeout_ns`` plus 5 s. ``ctx`` needs ``counters``, ``errors``,
    ``timeout_ns`` and ``rank``."""
    import time

    deadline = time.monotonic() + ctx.timeout_ns / 1e9 + 5.0
    spins = 0
    while ctx.counters[0] < 0:
        spins += 1
        if spins % 1024 == 0:
            ctx.errors.check()
            if time.monotonic() > deadline:
                raise CommTimeoutError(
                    f"{what}: rank {ctx.rank} got no received-token count from the GPU within "
                    f"{ctx.timeout_ns / 1e9:.3g} s", what=what, rank=ctx.rank)
            time.sleep(0)
    ctx.errors.check()


def mapped_host_array(n, dtype):
    """``n`` elements of pinned host memory the GPU can read and write directly.

    Returns ``(owner, host_view, device_address)``: keep ``owner`` alive as long as the view is
    used. With unified addressing (every 64-bit CUDA platform) the device address of mapped
    memory equals the host pointer; the runtime is asked anyway, so nothing relies on that.
    """
    import cupy
    from cuda.bindings import runtime

    nbytes = int(n) * np.dtype(dtype).itemsize
    mem = cupy.cuda.PinnedMemory(nbytes, flags=2)  # cudaHostAllocMapped
    view = np.frombuffer(ctypes_buffer(mem.ptr, nbytes), dtype=dtype)
    err, dptr = runtime.cudaHostGetDevicePointer(mem.ptr, 0)
    if err != runtime.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaHostGetDevicePointer failed: {err}")
    return mem, view, int(dptr)


def ctypes_buffer(ptr: int, nbytes: int):
    """A writable ctypes byte array over host memory at ``ptr`` (for NumPy views)."""
    import ctypes

    return (ctypes.c_byte * nbytes).from_address(ptr)


_record = None


def error_record() -> ErrorRecord:
    """The process-wide error record (created on first use, on the current device's context)."""
    global _record
    if _record is None:
        _record = ErrorRecord()
    return _record
