"""The Python an eager low-latency step runs on a GPU, measured on any machine (no GPU needed).

``Buffer.low_latency_dispatch`` + ``low_latency_combine`` take their GPU branch here (not host
mode) down to the kernel layer's launches, with the device faked underneath:

- arrays are stand-ins with CuPy's attributes (shape, dtype, strides, ``data.ptr``);
- ``cupy.empty`` returns one preallocated stand-in per shape (an allocation's own cost, ~2.2 us
  on the lent hosts' quiet minutes, is not in these numbers);
- a launch only packs its arguments, as ``ll_host_breakdown.py``'s "launches only packed" rows;
- the device queries a call makes (current device, current stream) return at once.

So what is timed is numba_ep's own Python: the Buffer's checks and memo, the kernel layer's
argument assembly, the handle. It matches a GPU host's "launches only packed" rows less their
six allocations to a microsecond or two on this kind of CPU, and, unlike those rows, it does not
move 2x between runs: measure a change to the eager path here first.

    python scripts/ll_host_overhead.py [--steps 3000] [--profile]

Prints microseconds per step (dispatch + combine) through the kernel layer and through the
Buffer, each the best of seven loops, and with ``--profile`` a cProfile of the Buffer steps.
"""
import argparse
import cProfile
import io
import math
import pstats
import timeit
from types import SimpleNamespace

import numpy as np

import numba_ep  # noqa: F401  (NumPy shim first)

M, H, E, K, R, T = 128, 7168, 288, 8, 2, 128   # DeepEP's decoding shape, 2 ranks
L = E // R


class FakeDeviceArray:
    """What the Buffer and the kernel layer read of a CuPy array. Its class is named like
    CuPy's so that ``numba_ep.interop.is_cupy`` takes it for one."""

    _next_ptr = 1 << 32

    def __init__(self, shape, dtype, strides=None, ptr=None):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        step, rev = self.dtype.itemsize, []
        for n in reversed(self.shape):
            rev.append(step)
            step *= n
        c_strides = tuple(reversed(rev))
        self.strides = c_strides if strides is None else tuple(strides)
        self._c_contiguous = self.strides == c_strides
        if ptr is None:
            ptr = FakeDeviceArray._next_ptr
            FakeDeviceArray._next_ptr += 1 << 30
        self.data = SimpleNamespace(ptr=ptr, device_id=0)
        self.ndim, self.size = len(self.shape), math.prod(self.shape)

    def swapaxes(self, a, b):
        shape, strides = list(self.shape), list(self.strides)
        shape[a], shape[b], strides[a], strides[b] = shape[b], shape[a], strides[b], strides[a]
        return FakeDeviceArray(shape, self.dtype, tuple(strides), self.data.ptr)


FakeDeviceArray.__name__ = FakeDeviceArray.__qualname__ = "ndarray"
FakeDeviceArray.__module__ = "cupy_stand_in"


class PackOnlyKernel:
    """A compiled kernel whose launch packs its arguments and launches nothing."""

    def __init__(self, spec):
        from numba_ep.launch import _STRUCT_CODE, parse_signature
        import ctypes
        import struct

        argtypes = parse_signature(spec[1])
        self._struct = struct.Struct("@" + "".join(_STRUCT_CODE[a] for a in argtypes))
        self._params = ctypes.create_string_buffer(max(self._struct.size, 8))

    def max_resident_blocks(self, block, shmem=0):
        return 2 * 132

    def launch(self, grid, block, *args, stream=None, shmem=0, cooperative=None):
        self._struct.pack_into(self._params, 0, *args)


def fake_device():
    """Patch CuPy's device queries, the kernel layer's allocator, kernel loader and device
    state, and the process error record (this process only: a script, not a library)."""
    import cupy
    from cupy.cuda import runtime

    from numba_ep.kernels import low_latency as ll
    from numba_ep.kernels import waits

    runtime.getDevice = lambda: 0
    stream = SimpleNamespace(ptr=0)
    cupy.cuda.get_current_stream = lambda: stream
    outputs = {}

    def empty(shape, dtype):
        a = outputs.get((shape, dtype))
        if a is None:
            a = outputs[(shape, dtype)] = FakeDeviceArray(shape, dtype)
        return a

    ll._cupy_empty = empty
    ll._get = PackOnlyKernel
    no_error = SimpleNamespace(check=lambda: None, device_address=1 << 12)
    waits.error_record = lambda: no_error

    def prepare(ctx):
        if not ctx._ready:
            ctx._num_sms = 132
            ctx._set_device_state(no_error, FakeDeviceArray((R,), np.uint64),
                                  FakeDeviceArray((1 + E,), np.int32),
                                  FakeDeviceArray((128,), np.float64))

    ll.LowLatencyContext._prepare = prepare


def gpu_branch_buffer():
    """A rank-0 Buffer of 2 ranks that takes the GPU branch of every low-latency call."""
    from numba_ep.buffer import Buffer

    nbytes = Buffer.get_low_latency_rdma_size_hint(M, H, R, E)
    buf = Buffer._host_mode(SimpleNamespace(rank=0, size=R), low_latency_mode=True,
                            num_rdma_bytes=nbytes)
    buf._host, buf.device = False, 0
    base = 1 << 40
    buf._sym = SimpleNamespace(nbytes=nbytes, ptr=base, peer_ptrs=[base, base + (1 << 36)],
                               peer_ptrs_dev=FakeDeviceArray((R,), np.uint64))
    buf._ll_active = (M, H, E)   # as after clean_low_latency_buffer
    return buf


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000, help="steps per timed loop")
    p.add_argument("--profile", action="store_true", help="print a cProfile of Buffer steps")
    a = p.parse_args()

    fake_device()
    from numba_ep.kernels import low_latency as ll

    buf = gpu_branch_buffer()
    ctx = buf._ll_context(M, H, E)
    x, topk = FakeDeviceArray((T, H), np.uint16), FakeDeviceArray((T, K), np.int64)
    w, y = FakeDeviceArray((T, K), np.float32), FakeDeviceArray((L, R * M, H), np.uint16)

    def kernel_step():
        _, _, _, src, lr, _ = ll.low_latency_dispatch(ctx, x, topk, stream=0, checked=True)
        ll.low_latency_combine(ctx, y, topk, w, src, lr, stream=0, checked=True)

    def buffer_step():
        handle = buf.low_latency_dispatch(x, topk, M, E)[2]
        buf.low_latency_combine(y, topk, w, handle)

    # the GPU branch ran if the outputs are the stand-ins (host mode would give NumPy arrays)
    recv, count, handle = buf.low_latency_dispatch(x, topk, M, E)[:3]
    if not (type(count) is FakeDeviceArray and type(recv[0]) is FakeDeviceArray):
        raise RuntimeError("the Buffer did not take its GPU branch; the numbers would be wrong")
    buf.low_latency_combine(y, topk, w, handle)

    rows = {}
    for name, step in (("kernel layer (checked=True)", kernel_step), ("Buffer", buffer_step)):
        step()
        best = min(timeit.repeat(step, number=a.steps, repeat=7))
        rows[name] = best / a.steps * 1e6
    rows["Buffer over the kernel layer"] = rows["Buffer"] - rows["kernel layer (checked=True)"]
    print("host Python us per dispatch + combine (launches packed, allocations excluded)")
    for k, v in rows.items():
        print(f"  {k:<30} {v:8.2f}")
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.steps):
            buffer_step()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue())


if __name__ == "__main__":
    main()
