"""Arrays, streams and events across CuPy, torch and NumPy (the simulator's host arrays).

The library works on CuPy arrays inside; callers may hand in CuPy arrays or torch tensors and get
outputs of the same kind back, zero-copy through DLPack. Kernels take raw addresses, so the one
thing every kind must give is ``address(a)``.
"""
from __future__ import annotations

import numpy as np


def is_torch(a) -> bool:
    """True for a ``torch.Tensor`` (without importing torch when it is not loaded)."""
    t = type(a)
    return t.__module__.startswith("torch") and t.__name__ in ("Tensor", "Parameter")


def array_module(a):
    """``numpy`` for NumPy arrays, else ``cupy`` (CuPy arrays; torch tensors are converted first)."""
    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy


def address(a) -> int:
    """Address of the first element: device address for CuPy/torch, host address for NumPy."""
    if isinstance(a, np.ndarray):
        return a.ctypes.data
    if is_torch(a):
        return int(a.data_ptr())
    return int(a.data.ptr)


def as_cupy(a, name="array"):
    """A CuPy view of ``a`` (CuPy array or CUDA torch tensor), zero-copy; None stays None."""
    if a is None:
        return None
    if is_torch(a):
        import cupy

        if not a.is_cuda:
            raise ValueError(f"{name}: expected a CUDA tensor, got one on {a.device}")
        return cupy.from_dlpack(a.detach())
    import cupy

    if isinstance(a, cupy.ndarray):
        return a
    raise TypeError(f"{name}: expected a CuPy array or a torch tensor, got {type(a).__name__}")


def to_kind(a, torch_out: bool):
    """Return ``a`` (a CuPy array) as a torch tensor when ``torch_out``, else unchanged."""
    if a is None or not torch_out:
        return a
    import torch

    return torch.from_dlpack(a)


def current_stream_handle(torch_side: bool) -> int:
    """Raw handle of the caller's current stream: torch's when the caller uses torch, else CuPy's."""
    if torch_side:
        import torch

        return int(torch.cuda.current_stream().cuda_stream)
    import cupy

    return int(cupy.cuda.get_current_stream().ptr)


class EventOverlap:
    """A CUDA event recorded on a stream, as DeepEP's ``EventOverlap``.

    ``current_stream_wait()`` makes the caller's current stream wait for it; ``with ev: ...`` does
    the same on exit. ``extra_tensors`` keeps arrays alive until the event is dropped (the stand-in
    for ``record_stream``, which CUDA graphs do not allow).
    """

    def __init__(self, event=None, extra_tensors=None, torch_side=False):
        self.event = event
        self.extra_tensors = extra_tensors
        self._torch_side = torch_side

    def current_stream_wait(self) -> None:
        """The caller's current stream waits for the event (no host synchronisation)."""
        if self.event is None:
            return
        import cupy

        handle = current_stream_handle(self._torch_side)
        cupy.cuda.runtime.streamWaitEvent(handle, self.event.ptr, 0)

    def synchronize(self) -> None:
        """Block the host until the event has completed."""
        if self.event is not None:
            self.event.synchronize()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait()
        return False


def record_event(stream_handle: int):
    """A CuPy event recorded on the raw stream ``stream_handle``."""
    import cupy

    ev = cupy.cuda.Event(disable_timing=True)
    cupy.cuda.runtime.eventRecord(ev.ptr, stream_handle)
    return ev
