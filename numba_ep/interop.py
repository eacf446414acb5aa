"""Arrays, streams and events across CuPy, torch and NumPy (the simulator's host arrays).

The library works on CuPy arrays inside; callers may hand in CuPy arrays or torch tensors and get
outputs of the same kind back, zero-copy through DLPack. Kernels take raw addresses, so the one
thing every kind must give is ``address(a)``.

BF16 and FP8 across kinds
-------------------------
CuPy has no bfloat16 and no float8 dtypes. numba_ep's convention on the CuPy side:

    bfloat16        travels as ``uint16`` (the same 16 bits)
    float8_e4m3fn   travels as ``uint8``  (the same 8 bits)

A CuPy caller passes bf16 data as a ``uint16`` array (and FP8 as ``uint8``) and gets its outputs
back with the same dtype. A torch caller passes real ``torch.bfloat16`` / ``torch.float8_e4m3fn``
tensors: ``device_view`` / ``bytes_view`` reinterpret them as same-width integers before DLPack
(zero-copy), and ``to_caller(..., torch_dtype=...)`` views the results back. NumPy callers (the
simulator, host-mode tests) may use ``ml_dtypes.bfloat16`` / ``float8_e4m3fn`` or the integer
carriers. ``array_info`` describes any of the three kinds without touching a GPU.
"""
from __future__ import annotations

import numpy as np


_torch_tensor_types = set()   # torch.Tensor and Parameter, learnt as they are seen


def is_torch(a) -> bool:
    """True for a ``torch.Tensor`` (without importing torch when it is not loaded)."""
    t = type(a)
    if t in _torch_tensor_types:
        return True
    if t.__module__.startswith("torch") and t.__name__ in ("Tensor", "Parameter"):
        _torch_tensor_types.add(t)
        return True
    return False


def array_module(a):
    """``numpy`` for NumPy arrays, else ``cupy`` (CuPy arrays; torch tensors are converted first)."""
    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy


_cupy_ndarray = None     # cupy.ndarray, learnt from the first one seen (no cupy import here)


def is_cupy(a) -> bool:
    """True for a CuPy array, by type identity after the first one (hot paths call this)."""
    global _cupy_ndarray
    t = type(a)
    if t is _cupy_ndarray:
        return True
    if _cupy_ndarray is None and t.__name__ == "ndarray" and t.__module__.startswith("cupy"):
        _cupy_ndarray = t
        return True
    return False


def cupy_c_contiguous(a) -> bool:
    """CuPy's own C-order flag of a CuPy array. Read through the (read-only, Cython) attribute
    behind ``flags.c_contiguous``, 10x cheaper than building the flags object; it also knows that
    empty and one-element arrays (whose strides may be anything, e.g. all 0) are C-contiguous."""
    contig = getattr(a, "_c_contiguous", None)
    return a.flags.c_contiguous if contig is None else contig


def address(a) -> int:
    """Address of the first element: device address for CuPy/torch, host address for NumPy."""
    if is_cupy(a):
        return a.data.ptr
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


def current_stream_handle(torch_side: bool, device=None) -> int:
    """Raw handle of the caller's current stream: torch's when the caller uses torch, else CuPy's.

    ``device`` (torch side only): whose current stream; None = torch's current device.
    """
    get = _stream_getters.get(torch_side)
    if get is None:
        get = _stream_getters[torch_side] = _stream_getter(torch_side)
    return get(device)


_stream_getters = {}   # torch_side -> getter(device) -> handle; hot paths call them every call


def _stream_getter(torch_side):
    if not torch_side:
        import cupy

        current = cupy.cuda.get_current_stream
        return lambda device: int(current().ptr)
    import torch

    # torch's own raw getter (what its C++ side and Triton use) costs a tenth of
    # torch.cuda.current_stream(), which builds a Stream object.
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:
        return lambda device: int(torch.cuda.current_stream(device).cuda_stream)
    current_device = torch.cuda.current_device
    return lambda device: int(raw(current_device() if device is None else int(device)))


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


# -------------------------------------------------------------------------------------------------
# Describing and converting arrays of any kind (used by numba_ep.buffer)
# -------------------------------------------------------------------------------------------------

from typing import NamedTuple  # noqa: E402

#: CuPy / NumPy carrier dtype of each dtype CuPy lacks (see "BF16 and FP8 across kinds")
CUPY_CARRIER = {
    "bfloat16": "uint16",
    "float8_e4m3fn": "uint8",
    "float8_e5m2": "uint8",
    "float8_e4m3fnuz": "uint8",
    "float8_e5m2fnuz": "uint8",
    "float8_e8m0fnu": "uint8",
}
# Integer dtype of each width, used to carry other dtypes through DLPack.
_TORCH_INT_CARRIER = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}
_CUPY_UINT = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


class ArrayInfo(NamedTuple):
    """What validation needs to know about an array, for CuPy, torch and NumPy alike.

    ``dtype`` is the dtype's name (``"bfloat16"``, ``"float32"``, ``"uint16"``...), ``strides``
    are in elements, ``device`` is the CUDA device id or None for host memory.
    """
    kind: str            # "cupy", "torch" or "numpy"
    dtype: str
    itemsize: int
    shape: tuple
    strides: tuple
    device: int | None
    c_contiguous: bool

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def where(self) -> str:
        """Human-readable location: 'CUDA device 1' or 'the host (CPU memory)'."""
        return "the host (CPU memory)" if self.device is None else f"CUDA device {self.device}"


def is_array(a) -> bool:
    """True for a NumPy array, a CuPy array or a torch tensor."""
    return is_cupy(a) or isinstance(a, np.ndarray) or is_torch(a)


_DTYPE_NAMES = {}


def _dtype_name(dt) -> str:
    # NumPy computes dtype.name in Python on every access (~4 us); every call validates arrays.
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = _DTYPE_NAMES[dt] = dt.name
    return name


def array_key(a):
    """A hashable summary of all that argument checks look at: type, shape, dtype, strides and
    device; ``()`` for None; None for anything else (callers then check in full). Arrays with
    equal keys pass or fail every check of ``numba_ep.buffer.check_array`` alike, so a check's
    outcome can be remembered per key (a key costs a fraction of ``array_info`` plus the
    checks: 1.7 against 11 us per array under cProfile on the CPU)."""
    if a is None:
        return ()
    t = type(a)
    if is_cupy(a):
        return (t, a.shape, a.dtype, a.strides, a.data.device_id)
    if t is np.ndarray:
        return (t, a.shape, a.dtype, a.strides)
    if is_torch(a):
        return (t, a.shape, a.dtype, a.stride(), a.device)
    return None


def array_info(a, name="array") -> ArrayInfo:
    """Describe ``a`` (CuPy array, torch tensor or NumPy array) without launching anything.

    Raises TypeError naming ``name`` for anything else.
    """
    if is_cupy(a):
        dt = a.dtype
        item = dt.itemsize
        return ArrayInfo("cupy", _dtype_name(dt), item, a.shape,
                         tuple([s // item for s in a.strides]), a.data.device_id,
                         cupy_c_contiguous(a))
    if isinstance(a, np.ndarray):
        item = a.dtype.itemsize
        return ArrayInfo("numpy", _dtype_name(a.dtype), item, tuple(a.shape),
                         tuple(s // item for s in a.strides) if item else tuple(a.strides),
                         None, bool(a.flags.c_contiguous))
    if is_torch(a):
        dev = a.device
        return ArrayInfo("torch", str(a.dtype).removeprefix("torch."), int(a.element_size()),
                         tuple(a.shape), tuple(a.stride()),
                         int(dev.index if dev.index is not None else 0) if dev.type == "cuda" else None,
                         bool(a.is_contiguous()))
    raise TypeError(f"{name}: expected a CuPy array or a torch tensor, got {type(a).__module__}."
                    f"{type(a).__qualname__}")


def device_view(a, name="array"):
    """A zero-copy view of ``a`` that numba_ep's kernels and CuPy can use; None stays None.

    CuPy arrays and NumPy arrays (host mode) come back unchanged. torch CUDA tensors become CuPy
    arrays through DLPack; dtypes CuPy lacks (bfloat16, float8) are reinterpreted first as the
    unsigned integer of the same width (``uint16`` / ``uint8``), keeping shape and strides.
    torch CPU tensors (the CPU backend) become NumPy views by the same rules. Where a tensor
    may live is checked before this (``numba_ep.buffer.check_array``).
    """
    if a is None:
        return None
    if not is_torch(a):
        if isinstance(a, np.ndarray) or is_array(a):
            return a
        raise TypeError(f"{name}: expected a CuPy array or a torch tensor, got "
                        f"{type(a).__module__}.{type(a).__qualname__}")
    if not a.is_cuda:
        return _host_view(a, name)
    return _cupy_view_of_cuda_tensor(a)


_TORCH_TO_CUPY = {}   # torch dtype -> the CuPy dtype of its view (device_view's rules)
_CUPY_NATIVE = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64", "complex64", "complex128"}


def _cupy_dtype_for(torch_dtype):
    dt = _TORCH_TO_CUPY.get(torch_dtype)
    if dt is None:
        name = str(torch_dtype).removeprefix("torch.")
        if name in CUPY_CARRIER:
            dt = np.dtype(CUPY_CARRIER[name])
        elif name in _CUPY_NATIVE:
            dt = np.dtype(name)
        else:
            raise TypeError(f"torch.{name} has no CuPy dtype (CuPy has {sorted(_CUPY_NATIVE)} "
                            f"and carries {sorted(CUPY_CARRIER)} as unsigned integers)")
        _TORCH_TO_CUPY[torch_dtype] = dt
    return dt


def _cupy_view_of_cuda_tensor(t):
    """A CuPy array over a CUDA tensor's memory, built from ``data_ptr()``, shape and strides.

    DLPack does the same in 10-30 us per tensor (a BF16 tensor also needs an int16 view first);
    this costs a few, and the Buffer converts every tensor of every call. The CuPy array keeps
    the tensor alive (the memory's owner)."""
    import cupy

    dt = _cupy_dtype_for(t.dtype)
    item = dt.itemsize
    shape = tuple(t.shape)
    n = t.numel()
    if n == 0:
        return cupy.empty(shape, dtype=dt)
    if t.is_contiguous():   # the common case: CuPy computes C strides itself (cheaper)
        mem = cupy.cuda.UnownedMemory(t.data_ptr(), n * item, t, device_id=t.get_device())
        return cupy.ndarray(shape, dtype=dt, memptr=cupy.cuda.MemoryPointer(mem, 0))
    strides = tuple(s * item for s in t.stride())
    span = item + sum((d - 1) * s for d, s in zip(shape, strides))
    mem = cupy.cuda.UnownedMemory(t.data_ptr(), span, t, device_id=t.get_device())
    return cupy.ndarray(shape, dtype=dt, memptr=cupy.cuda.MemoryPointer(mem, 0),
                        strides=strides)


def _host_view(a, name):
    """A NumPy view of a torch CPU tensor (the CPU backend), with device_view's dtype rules."""
    import torch

    if a.device.type != "cpu":
        raise ValueError(f"{name}: expected a CUDA or CPU tensor, got one on {a.device}")
    t = a.detach()
    dname = str(t.dtype).removeprefix("torch.")
    if dname in CUPY_CARRIER:
        width = t.element_size()
        return t.view(getattr(torch, _TORCH_INT_CARRIER[width])).numpy().view(_CUPY_UINT[width])
    return t.numpy()


def bytes_view(a, name="array"):
    """A zero-copy ``uint8 [rows, row_bytes]`` view of a C-contiguous 2-D array of any dtype
    (CuPy/NumPy array or torch CUDA tensor); row_bytes = columns * element size."""
    if is_torch(a):
        import torch

        if not a.is_contiguous():
            raise ValueError(f"{name}: expected a C-contiguous tensor")
        if a.numel() == 0:  # torch may give an empty tensor any strides, which .view refuses
            return device_view(a.new_empty((a.shape[0], a.shape[1] * a.element_size()),
                                           dtype=torch.uint8), name)
        return device_view(a.detach().view(torch.uint8), name)
    v = device_view(a, name)
    if not v.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array")
    return v.view(np.uint8)


#: Torch callers' normal-mode results are allocated by torch and handed back as views of the
#: owning tensor (``torch_allocations``); False: CuPy's pool and DLPack (for comparisons).
TORCH_OUTPUT_VIEWS = True

_torch_allocators = {}   # device index -> the CuPy allocator function of torch_allocations


def torch_allocations(device_index: int):
    """A ``with`` context in which this thread's CuPy allocations come from torch's caching
    allocator (a flat uint8 tensor each, on torch's current stream of ``device_index``), owned
    by that tensor. ``to_caller`` hands such arrays to torch as views of their owner (a few
    microseconds) instead of through DLPack (10-13 us each), and the memory follows torch's
    rules (its caching allocator, graph pools, ``record_stream``)."""
    import cupy

    fn = _torch_allocators.get(device_index)
    if fn is None:
        import torch

        dev = torch.device("cuda", device_index)
        empty, u8 = torch.empty, torch.uint8
        unowned, pointer = cupy.cuda.UnownedMemory, cupy.cuda.MemoryPointer

        def fn(nbytes):
            t = empty(nbytes, dtype=u8, device=dev)
            return pointer(unowned(t.data_ptr(), nbytes, t, device_index), 0)

        _torch_allocators[device_index] = fn
    return cupy.cuda.using_allocator(fn)


_NP_TO_TORCH = {}   # NumPy dtype -> torch dtype of the same name (to_caller without torch_dtype)


def _owner_view(a, torch_dtype):
    """``a`` as a view of the torch tensor that owns its memory, when ``a`` came from
    ``torch_allocations`` (owner: a flat uint8 tensor) and is C-contiguous; else None."""
    mem = a.data.mem
    owner = getattr(mem, "_owner", None)
    if owner is None or not is_torch(owner) or owner.dim() != 1 or owner.element_size() != 1:
        return None
    if not cupy_c_contiguous(a):
        return None
    target = torch_dtype
    if target is None:
        target = _NP_TO_TORCH.get(a.dtype)
        if target is None:
            import torch

            target = getattr(torch, a.dtype.name, None)
            if target is None:
                return None
            _NP_TO_TORCH[a.dtype] = target
    size = target.itemsize
    off, n = a.data.ptr - mem.ptr, a.nbytes
    if off % size or n % size:
        return None
    shape = a.shape
    if size != a.itemsize:
        if not shape:
            return None
        shape = shape[:-1] + (shape[-1] * a.itemsize // size,)
    # each torch view costs ~1 us: the common case (a whole allocation) takes two
    t = owner if off == 0 and n == owner.numel() else owner[off:off + n]
    return t.view(target).view(shape)


def to_caller(a, torch_out: bool, torch_dtype=None, dtype=None):
    """Hand a device result ``a`` (a CuPy array, or NumPy in host mode) back in the caller's kind.

    - ``torch_out``: return a torch tensor over the same memory: a view of the owning tensor
      when ``a`` was allocated under ``torch_allocations``, else through DLPack. ``torch_dtype``
      (a torch dtype, e.g. ``torch.bfloat16``) reinterprets the bits; when its width differs
      from ``a``'s, the last dimension is rescaled (``a`` must then be contiguous in it), e.g.
      ``uint8 [N, 2H]`` -> ``bfloat16 [N, H]``.
    - else: return ``a``, viewed as ``dtype`` (a NumPy/CuPy dtype) when given.
    None stays None.
    """
    if a is None:
        return None
    if not torch_out:
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.view(dtype)
    if is_cupy(a):
        t = _owner_view(a, torch_dtype)
        if t is not None:
            return t
    import torch

    if a.dtype == np.bool_:  # as bytes, viewed back (see device_view)
        return torch.from_dlpack(a.view(np.uint8)).view(torch.bool)
    if torch_dtype is None:
        return torch.from_dlpack(a)
    carrier = getattr(torch, _TORCH_INT_CARRIER[a.dtype.itemsize])
    t = torch.from_dlpack(a.view(_TORCH_INT_CARRIER[a.dtype.itemsize]))
    assert t.dtype == carrier
    return t if torch_dtype == carrier else t.view(torch_dtype)


def torch_dtype_of(a):
    """The torch dtype of a torch tensor, else None."""
    return a.dtype if is_torch(a) else None


def torch_cuda_active() -> bool:
    """True when torch is imported and has initialised CUDA in this process (then 'the caller's
    current stream' means torch's)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_initialized())
    except Exception:
        return False


def caller_stream(torch_side: bool, device=None):
    """The caller's current stream as a CuPy stream object (``with`` it to make CuPy use it):
    CuPy's current stream, or for torch callers an ``ExternalStream`` over torch's current stream
    of ``device``."""
    import cupy

    if not torch_side:
        return cupy.cuda.get_current_stream()
    dev = -1 if device is None else int(device)
    handle = current_stream_handle(True, device)
    s = _external_streams.get((handle, dev))
    if s is None:
        import warnings

        # ExternalStream is deprecated in CuPy 14 in favour of Stream.from_external, which
        # needs a stream object; this one only records the handle (and works for torch's legacy
        # stream 0). It owns nothing, so one per handle is kept: a later stream with a reused
        # handle is the same stream to the driver (making one costs ~3 us of every call).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            s = cupy.cuda.ExternalStream(handle, dev)
        if len(_external_streams) >= 256:
            _external_streams.clear()
        _external_streams[(handle, dev)] = s
    return s


_external_streams = {}   # (stream handle, device) -> cupy ExternalStream (caller_stream)
