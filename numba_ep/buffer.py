"""Buffer: DeepEP V1's ``deep_ep.Buffer`` for numba_ep (intranode normal mode).

One ``Buffer`` per rank owns the NVLink buffer every peer can write (``numba_ep.memory.IpcBuffer``),
a high-priority communication stream, and the bookkeeping of the calls made through it:

    buf = Buffer(group, num_nvl_bytes)                      # collective
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
    ... experts ...
    combined_x, combined_weights, _ = buf.combine(expert_out, handle, topk_weights=recv_topk_weights)

Names, arguments, return tuples, handle contents and semantics are DeepEP V1's
(``/work/shared/notes/deepep-v1.md`` §1): code written for DeepEP runs by changing the import.

Array kinds
-----------
Inputs may be CuPy arrays or torch CUDA tensors; outputs come back in the kind of the main input
(``x``, or ``topk_idx`` for ``get_dispatch_layout``), zero-copy. CuPy has no bfloat16 or float8:
a CuPy caller passes BF16 data as ``uint16`` arrays and FP8 (e4m3) data as ``uint8`` arrays and gets
outputs with the same dtypes; torch callers use ``torch.bfloat16`` / ``torch.float8_e4m3fn``
(see ``numba_ep.interop``). Dispatch copies rows as raw bytes, so ``x`` may have any dtype whose
row is a multiple of 16 bytes; combine needs BF16.

Streams and events (the same for every call)
--------------------------------------------
1. Kernels run on the Buffer's communication stream (``get_comm_stream()``).
2. That stream first waits on ``previous_event`` if given, else on the caller's current stream
   (torch's current stream for torch callers, CuPy's for CuPy callers).
3. ``async_finish=False``: the caller's stream waits on the communication stream before the call
   returns (no host synchronisation). ``async_finish=True``: the call returns an
   ``EventOverlap`` recorded on the communication stream whose ``extra_tensors`` keep every input
   and output alive until it is dropped (numba_ep's stand-in for torch's ``record_stream``, which
   CUDA graphs forbid). Keep the event until you have waited on it.
4. ``allocate_on_comm_stream=True`` (needs ``previous_event`` and ``async_finish``): outputs are
   allocated from CuPy's pool with the communication stream current, so their memory belongs to
   that stream.

Validation
----------
Every argument is checked before any kernel runs, with an error naming the argument, what was
expected and what came in: dtypes, shapes, device (all on this rank's GPU), C-contiguity (scales
may be strided), top-k at most 16, expert ids in ``[-1, num_experts)`` (a small device reduction
and one scalar copy; skipped when ``num_worst_tokens > 0`` and under CUDA-graph capture, which must
not synchronise), the NVLink buffer size (the bytes needed are in the message), handles made by
another Buffer, and the rank count (1..8; more is internode mode, not implemented yet).

Errors during a call: a ``CommTimeoutError`` (a peer did not answer within ``timeout_s``; device
waits record it, the host raises it, at the latest at the next call) makes the Buffer unusable:
destroy it and build a new one on every rank.

CUDA graphs: a dispatch with ``num_worst_tokens > 0`` (or a cached dispatch) and a combine can be
captured; a plain dispatch cannot (the host waits for the received counts).
"""
from __future__ import annotations

import contextlib
import itertools
import numbers
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from numba_ep import config as _config
from numba_ep.config import Config
from numba_ep.errors import CommTimeoutError
from numba_ep.interop import (CUPY_CARRIER, ArrayInfo, EventOverlap, array_info, bytes_view,
                              caller_stream, device_view, is_array, record_event, to_caller,
                              torch_cuda_active)

__all__ = ["Buffer", "Config", "EventOverlap", "check_expert_ids", "MAX_TOPK", "MAX_RANKS"]

#: largest top-k the normal kernels accept
MAX_TOPK = 16
#: ranks of intranode mode
MAX_RANKS = _config.MAX_INTRANODE_RANKS
#: local experts per rank the notify kernel counts
MAX_LOCAL_EXPERTS = 1024

_LOW_LATENCY_MSG = "low-latency mode is not implemented yet (issue: low-latency)"
_INT32_MAX = 2**31 - 1

_buffer_ids = itertools.count(1)
_live_buffers: "weakref.WeakValueDictionary[int, Buffer]" = weakref.WeakValueDictionary()


# -------------------------------------------------------------------------------------------------
# The handle
# -------------------------------------------------------------------------------------------------

class _Handle(tuple):
    """DeepEP's intranode dispatch handle, a 6-tuple::

        (rank_prefix_matrix [R, R] int32, channel_prefix_matrix [R, C] int32,
         recv_channel_prefix_matrix [R, C] int32, recv_src_idx [N] int32,
         is_token_in_rank [T, R] bool, send_head [T, R] int32)

    It unpacks and indexes like a plain tuple. It also remembers the Buffer that made it
    (``buffer_id``), the device views of its arrays, the channel count and the number of real
    received rows (``num_recv_tokens``; None after a ``num_worst_tokens`` dispatch).
    """

    def __new__(cls, items):
        return tuple.__new__(cls, items)

    def __repr__(self):
        return (f"_Handle(buffer_id={getattr(self, 'buffer_id', None)}, "
                f"shapes={[tuple(a.shape) for a in self]})")


def _tag_handle(items, buffer_id, dev, num_channels, num_recv_tokens):
    h = _Handle(items)
    h.buffer_id = buffer_id
    h.dev = tuple(dev)
    h.num_channels = num_channels
    h.num_recv_tokens = num_recv_tokens
    return h


# -------------------------------------------------------------------------------------------------
# Validation helpers: module level, no GPU needed (they only read array metadata)
# -------------------------------------------------------------------------------------------------

def _dtype_text(dtypes) -> str:
    parts = []
    for d in dtypes:
        carrier = CUPY_CARRIER.get(d)
        parts.append(f"{d} (CuPy: {carrier})" if carrier else d)
    return " or ".join(parts)


def _dtype_ok(info: ArrayInfo, dtypes) -> bool:
    if info.dtype in dtypes:
        return True
    if info.kind in ("cupy", "numpy"):
        return any(CUPY_CARRIER.get(d) == info.dtype for d in dtypes)
    return False


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_array(a, name, *, dtypes=None, ndim=None, shape=None, desc=None, device=None,
                contiguous=True, row_multiple=None) -> ArrayInfo:
    """Check one array argument; return its ArrayInfo. Raises TypeError / ValueError naming
    ``name`` with what was expected and what came in.

    - ``dtypes``: accepted dtype names (CuPy/NumPy carriers of bfloat16 / float8 count too);
    - ``ndim`` and ``shape`` (ints, or None for "any"); ``desc`` names the dimensions;
    - ``device``: the CUDA device id it must live on, or None for host memory (host mode);
    - ``contiguous``: must be C-contiguous;
    - ``row_multiple``: bytes per row (last dim * itemsize) must be a multiple of this.
    """
    if not is_array(a):
        raise TypeError(f"{name}: expected a CuPy array or a torch tensor, got "
                        f"{type(a).__module__}.{type(a).__qualname__}")
    info = array_info(a, name)
    if dtypes is not None and not _dtype_ok(info, dtypes):
        raise TypeError(f"{name}: expected dtype {_dtype_text(dtypes)}, got {info.dtype}")
    if ndim is not None and info.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array{' ' + desc if desc else ''}, got "
                         f"shape {list(info.shape)}")
    if shape is not None:
        if len(shape) != info.ndim or any(s is not None and s != g
                                          for s, g in zip(shape, info.shape)):
            what = f"{desc} = {_fmt_shape(shape)}" if desc else _fmt_shape(shape)
            raise ValueError(f"{name}: expected shape {what}, got {list(info.shape)}")
    if info.device != device:
        expected = ("the host (host mode)" if device is None
                    else f"CUDA device {device} (this rank's device)")
        raise ValueError(f"{name}: expected an array on {expected}, got one on {info.where()}")
    if contiguous and not info.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {list(info.strides)} "
                         f"(elements) for shape {list(info.shape)}; pass .contiguous() / "
                         "cupy.ascontiguousarray(...)")
    if row_multiple is not None and info.ndim >= 1:
        row = info.shape[-1] * info.itemsize
        if row % row_multiple:
            raise ValueError(f"{name}: a row must be a multiple of {row_multiple} bytes "
                             f"(last dimension x element size); got {info.shape[-1]} x "
                             f"{info.itemsize} B = {row} B")
    return info


def _check_int(name, value, minimum, maximum=_INT32_MAX) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral,)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not minimum <= value <= maximum:
        raise ValueError(f"{name}: expected an int in [{minimum}, {maximum}], got {value}")
    return value


def _check_flag(name, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_expert_ids(topk_idx, num_experts, name="topk_idx") -> None:
    """Raise ValueError if an entry of ``topk_idx`` is outside ``[-1, num_experts)``.

    Works on NumPy, CuPy (current stream) and torch arrays. On a GPU it costs two small
    reductions and one 16-byte device-to-host copy, which synchronises the current stream: do not
    call it under CUDA-graph capture.
    """
    size = int(np.prod(topk_idx.shape)) if len(topk_idx.shape) else 1
    if size == 0:
        return
    lo_hi = _min_max(topk_idx)
    lo, hi = int(lo_hi[0]), int(lo_hi[1])
    if lo >= -1 and hi < num_experts:
        return
    host = _to_numpy(topk_idx)
    bad = np.argwhere((host < -1) | (host >= num_experts))
    where = tuple(int(i) for i in bad[0])
    raise ValueError(
        f"{name}: expert ids must be in [-1, {num_experts}) (num_experts={num_experts}; -1 = "
        f"unused slot); got {int(host[where])} at {list(where)} ({len(bad)} bad entries, "
        f"min {lo}, max {hi})")


def _min_max(a):
    mod = type(a).__module__
    if isinstance(a, np.ndarray):
        return np.array([a.min(), a.max()])
    if mod.startswith("torch"):
        import torch

        return torch.stack([a.min(), a.max()]).cpu().numpy()
    import cupy

    return cupy.stack([a.min(), a.max()]).get()


def _to_numpy(a):
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    return a.get()


@dataclass
class _DispatchPlan:
    """Everything dispatch decided while validating (no device work yet)."""
    torch_out: bool
    x: Any
    x_info: ArrayInfo
    scales: Any
    scales_info: ArrayInfo | None
    topk_idx: Any
    topk_weights: Any
    handle: tuple | None
    num_tokens_per_rank: Any
    is_token_in_rank: Any
    num_tokens_per_expert: Any
    num_tokens: int
    row_bytes: int
    num_topk: int
    num_scales: int
    num_experts: int
    num_channels: int
    num_recv_cached: int | None
    expert_alignment: int
    num_worst_tokens: int
    config: Config


@dataclass
class _CombinePlan:
    torch_out: bool
    x: Any
    x_info: ArrayInfo
    handle: tuple
    topk_weights: Any
    bias0: Any
    bias1: Any
    num_tokens: int
    num_topk: int
    num_channels: int
    config: Config


# -------------------------------------------------------------------------------------------------
# Streams of one call
# -------------------------------------------------------------------------------------------------

class _Call:
    """The stream choreography of one call (module docstring, "Streams and events").

    ``begin()`` makes the communication stream wait; ``on_caller()`` / ``on_comm()`` /
    ``alloc()`` make CuPy use a stream inside a ``with``; ``finish(keep)`` returns the event.
    In host mode (no GPU) every step is a no-op.
    """

    def __init__(self, buf, torch_side, previous_event, async_finish, allocate_on_comm_stream):
        self.host = buf._host
        self.torch_side = torch_side
        self.previous_event = previous_event
        self.async_finish = async_finish
        self.allocate_on_comm_stream = allocate_on_comm_stream
        self.capturing = False
        if self.host:
            self.caller = self.comm = None
            return
        import cupy

        self.comm = buf._comm_stream
        self.caller = caller_stream(torch_side, buf.device if torch_side else None)
        self.capturing = bool(cupy.cuda.runtime.streamIsCapturing(self.caller.ptr))

    def begin(self):
        if self.host:
            return
        import cupy

        ev = self.previous_event.event if self.previous_event is not None else None
        if ev is None:
            ev = record_event(self.caller.ptr)
        cupy.cuda.runtime.streamWaitEvent(self.comm.ptr, ev.ptr, 0)

    def on_caller(self):
        return contextlib.nullcontext() if self.host else self.caller

    def on_comm(self):
        return contextlib.nullcontext() if self.host else self.comm

    def alloc(self):
        return self.on_comm() if self.allocate_on_comm_stream else self.on_caller()

    def finish(self, keep) -> EventOverlap:
        if self.host:
            return EventOverlap(None, torch_side=self.torch_side)
        import cupy

        ev = record_event(self.comm.ptr)
        if self.async_finish:
            return EventOverlap(ev, extra_tensors=tuple(k for k in keep if k is not None),
                                torch_side=self.torch_side)
        cupy.cuda.runtime.streamWaitEvent(self.caller.ptr, ev.ptr, 0)
        return EventOverlap(None, torch_side=self.torch_side)


# -------------------------------------------------------------------------------------------------
# Buffer
# -------------------------------------------------------------------------------------------------

class Buffer:
    """DeepEP V1's communication buffer (intranode normal mode) for one rank of an EP group.

    Args:
        group: a ``numba_ep.Group``, an mpi4py communicator, a torch ``ProcessGroup``, or None
            (``numba_ep.group.as_group``: the spawn group, MPI COMM_WORLD under mpirun, torch's
            default group, else a single rank).
        num_nvl_bytes: bytes of NVLink buffer per rank (a multiple of 128; 0 = none). Every rank
            must pass the same value. Size it with ``Config.get_nvl_buffer_size_hint``.
        num_rdma_bytes: NVSHMEM buffer bytes (a multiple of 128). Kept for DeepEP compatibility;
            nothing is allocated (low-latency and internode modes are not implemented yet).
        low_latency_mode, num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl,
            enable_shrink: DeepEP's low-latency / NVSHMEM options, stored as attributes.
        use_fabric: fabric (cuMem) handles are not supported (NotImplementedError if True).
        explicitly_destroy: if True the caller must call ``destroy()`` (collective); else the
            buffer is released when garbage-collected (locally, without a barrier).
        comm: an mpi4py communicator, instead of ``group``.
        timeout_s: seconds any wait (device spin or host wait) may take before it raises
            ``CommTimeoutError`` naming the rank it waited for; None = env
            ``NUMBA_EP_TIMEOUT_S`` or 100 s.

    Construction is collective (the ranks exchange CUDA IPC handles). It picks this rank's GPU
    (``numba_ep.group.current_device``: ``local_rank % device count`` unless already chosen).
    """

    #: SMs the normal kernels use by default (DeepEP's class attribute); see ``set_num_sms``
    num_sms: int = 20

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None, timeout_s: float | None = None):
        self._destroyed = True  # until construction completes (for __del__)
        self._ipc = None
        num_nvl_bytes = _check_int("num_nvl_bytes", num_nvl_bytes, 0, 2**62)
        num_rdma_bytes = _check_int("num_rdma_bytes", num_rdma_bytes, 0, 2**62)
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if v % 128:
                raise ValueError(f"{name}: expected a multiple of 128 bytes, got {v} "
                                 f"(round up to {(v + 127) // 128 * 128})")
        timeout_s = _check_timeout(timeout_s)
        if use_fabric:
            raise NotImplementedError("use_fabric=True (cuMem fabric handles) is not supported; "
                                      "numba_ep shares NVLink buffers by CUDA IPC")
        if comm is not None and group is not None:
            raise ValueError("pass either group or comm, not both")
        from numba_ep.group import as_group, current_device

        self.group = as_group(comm if comm is not None else group)
        self.rank = self.group.rank
        self.group_size = self.group.size
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = bool(allow_nvlink_for_low_latency_mode)
        self.allow_mnnvl = bool(allow_mnnvl)
        self.use_fabric = False
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = bool(enable_shrink)
        self.timeout_s = timeout_s
        self._host = False
        self._ctx = None
        self._broken = None

        import cupy

        self.device = current_device(self.group)
        with cupy.cuda.Device(self.device):
            if num_nvl_bytes > 0:
                from numba_ep.memory import IpcBuffer

                self._ipc = IpcBuffer(self.group, num_nvl_bytes, device=self.device)
            self._comm_stream = cupy.cuda.Stream(non_blocking=True, priority=_high_priority())
            self._device_sms = int(cupy.cuda.Device(self.device).attributes["MultiProcessorCount"])
            from numba_ep.kernels.waits import error_record

            error_record()  # created now, on this device, before any kernel needs it
        self._register()

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def _host_mode(cls, group, num_nvl_bytes=0, timeout_s=None, device_sms=None):
        """A Buffer that owns no CUDA resources, for tests and the simulator.

        Arrays are NumPy arrays on the host (expected device: the host), streams are no-ops, and
        every kernel call goes to ``numba_ep.kernels.intranode`` as usual (tests replace those
        functions). ``group`` needs only ``rank`` and ``size``. ``num_nvl_bytes`` sizes a fake
        IPC buffer the size checks see.
        """
        from types import SimpleNamespace

        self = cls.__new__(cls)
        self._destroyed = True
        self.group = group
        self.rank, self.group_size = int(group.rank), int(group.size)
        self.num_nvl_bytes = _check_int("num_nvl_bytes", num_nvl_bytes, 0, 2**62)
        self.num_rdma_bytes = 0
        self.low_latency_mode = False
        self.num_qps_per_rank = 24
        self.allow_nvlink_for_low_latency_mode = True
        self.allow_mnnvl = self.use_fabric = self.enable_shrink = False
        self.explicitly_destroy = False
        self.timeout_s = _check_timeout(timeout_s)
        self._host = True
        self._ctx = None
        self._broken = None
        self.device = None
        self._ipc = SimpleNamespace(nbytes=num_nvl_bytes) if num_nvl_bytes else None
        self._comm_stream = None
        self._device_sms = device_sms
        self._register()
        return self

    def _register(self):
        self._id = next(_buffer_ids)
        _live_buffers[self._id] = self
        self._destroyed = False

    def __repr__(self):
        state = ("destroyed" if self._destroyed else "host mode" if self._host
                 else f"device={self.device}")
        return (f"Buffer(#{getattr(self, '_id', '?')}, rank={self.rank}/{self.group_size}, "
                f"num_nvl_bytes={self.num_nvl_bytes}, {state})")

    # --------------------------------------------------------------------- static / class methods

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set ``Buffer.num_sms`` (even, >= 2): the SMs the default configs use."""
        n = _check_int("new_num_sms", new_num_sms, 2)
        if n % 2:
            raise ValueError(f"new_num_sms: expected an even number (a channel is 2 SMs), got {n}")
        Buffer.num_sms = n

    @staticmethod
    def capture() -> EventOverlap:
        """An ``EventOverlap`` recorded on the caller's current stream (torch's current stream
        when torch has initialised CUDA in this process, else CuPy's); pass it as
        ``previous_event``."""
        from numba_ep.interop import current_stream_handle

        torch_side = torch_cuda_active()
        return EventOverlap(record_event(current_stream_handle(torch_side)), torch_side=torch_side)

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: numba_ep compiles its kernels for the GPU at hand, SM90 included."""
        return True

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """Tuned dispatch ``Config`` for ``num_ranks`` in 1..8 with ``Buffer.num_sms`` SMs."""
        return _config.get_dispatch_config(num_ranks, num_sms=Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """Tuned combine ``Config`` for ``num_ranks`` in 1..8 with ``Buffer.num_sms`` SMs."""
        return _config.get_combine_config(num_ranks, num_sms=Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        """Bytes of NVSHMEM buffer low-latency mode needs (multiple of 128)."""
        return _config.low_latency_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks,
                                             num_experts)

    # ----------------------------------------------------------------------------- resources

    def get_comm_stream(self):
        """The communication stream, a ``cupy.cuda.Stream`` (torch users:
        ``torch.cuda.ExternalStream(buf.get_comm_stream().ptr)``)."""
        self._check_usable("get_comm_stream", check_errors=False)
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype, size=None, offset: int = 0,
                                use_rdma_buffer: bool = False):
        """A raw view of this rank's NVLink buffer.

        ``dtype``: a torch dtype (returns a torch tensor) or a NumPy/CuPy dtype (returns a CuPy
        array). ``size``: the shape (None = every whole element after ``offset``). ``offset``: in
        bytes. ``use_rdma_buffer=True`` is not available (no RDMA buffer yet).
        """
        self._check_usable("get_local_buffer_tensor", check_errors=False)
        if use_rdma_buffer:
            raise NotImplementedError("use_rdma_buffer=True: the RDMA (NVSHMEM) buffer is not "
                                      "implemented yet (issues: low-latency, internode)")
        if self._ipc is None:
            raise ValueError("get_local_buffer_tensor: this Buffer has no NVLink buffer "
                             "(num_nvl_bytes=0)")
        offset = _check_int("offset", offset, 0, self._ipc.nbytes)
        torch_side = type(dtype).__module__.startswith("torch")
        itemsize = dtype.itemsize if torch_side else np.dtype(dtype).itemsize
        avail = (self._ipc.nbytes - offset) // itemsize
        shape = (avail,) if size is None else tuple(int(s) for s in size)
        count = int(np.prod(shape)) if shape else 1
        if count > avail:
            raise ValueError(f"size: {list(shape)} x {itemsize} B from offset {offset} does not "
                             f"fit the {self._ipc.nbytes}-byte NVLink buffer")
        raw = self._ipc.local[offset: offset + count * itemsize]
        if torch_side:
            return to_caller(raw, True, torch_dtype=dtype).view(shape)
        return raw.view(np.dtype(dtype)).reshape(shape)

    def destroy(self) -> None:
        """Release the NVLink buffer (collective: every rank calls it). Only for
        ``Buffer(explicitly_destroy=True)``. Idempotent; every other method raises
        RuntimeError afterwards."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy() is only for Buffer(..., explicitly_destroy=True); this "
                               "Buffer is released when it is garbage-collected")
        if self._destroyed:
            return
        self._destroyed = True
        _live_buffers.pop(getattr(self, "_id", None), None)
        if self._host:
            return
        import cupy

        with cupy.cuda.Device(self.device):
            cupy.cuda.runtime.deviceSynchronize()
            if self._ipc is not None:
                self._ipc.close()  # collective: barrier, unmap peers, barrier, free
            else:
                self.group.barrier()
        self._ipc = None
        self._ctx = None
        self._comm_stream = None

    def __del__(self):
        try:
            if getattr(self, "_destroyed", True) or getattr(self, "_host", True):
                return
            self._destroyed = True
            if self.explicitly_destroy:
                warnings.warn(f"{self!r} was created with explicitly_destroy=True but dropped "
                              "without destroy(); releasing it locally", ResourceWarning)
            if self._ipc is not None:
                self._ipc.close(barrier=False)
        except Exception:
            pass

    # --------------------------------------------------------------------------- checks

    def _check_usable(self, what, check_errors=True):
        if self._destroyed:
            raise RuntimeError(f"{what}: this Buffer was destroyed; create a new one")
        if self._broken is not None:
            raise RuntimeError(f"{what}: this Buffer is unusable after an earlier failure "
                               f"({self._broken}); destroy it and create a new one on every rank")
        if check_errors and not self._host:
            from numba_ep.kernels.waits import error_record

            try:
                error_record().check()
            except CommTimeoutError as e:
                self._broken = f"CommTimeoutError: {e}"
                raise

    def _check_intranode(self, what):
        if self.group_size > MAX_RANKS:
            raise NotImplementedError(
                f"{what}: {self.group_size} ranks need internode normal mode (more than "
                f"{MAX_RANKS} ranks), which is not implemented yet (issue: internode); "
                f"intranode mode supports 1..{MAX_RANKS} ranks")

    def _check_config(self, config, what, default):
        if config is None:
            return default(self.group_size)
        if not isinstance(config, Config):
            raise TypeError(f"config: expected a numba_ep.Config, got {type(config).__name__}")
        if self._device_sms is not None and config.num_sms > self._device_sms:
            raise ValueError(f"config: num_sms={config.num_sms} but this GPU has "
                             f"{self._device_sms} SMs; the {what} kernel needs all its blocks "
                             "resident at once")
        return config

    def _check_events(self, previous_event, async_finish, allocate_on_comm_stream):
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event: expected an EventOverlap (e.g. Buffer.capture()) "
                            f"or None, got {type(previous_event).__name__}")
        async_finish = _check_flag("async_finish", async_finish)
        allocate = _check_flag("allocate_on_comm_stream", allocate_on_comm_stream)
        if allocate and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True requires previous_event and "
                             "async_finish=True")
        return async_finish, allocate

    def _check_buffer_size(self, what, num_channels, num_recv_slots, row_bytes, num_topk,
                           num_scales):
        from numba_ep.kernels import intranode

        need = int(intranode.nvl_bytes_needed(self.group_size, num_channels, num_recv_slots,
                                              row_bytes, num_topk, num_scales))
        have = 0 if self._ipc is None else int(self._ipc.nbytes)
        if need > have:
            raise ValueError(
                f"num_nvl_bytes: this {what} needs {need} bytes of NVLink buffer "
                f"({self.group_size} ranks, {num_channels} channels x {num_recv_slots} ring slots, "
                f"{row_bytes}-byte rows, top-k {num_topk}, {num_scales} scales per token) but the "
                f"Buffer has {have}; construct it with num_nvl_bytes >= {need} "
                "(Config.get_nvl_buffer_size_hint gives a size that covers both directions)")

    def _check_handle(self, handle, num_channels, what):
        """Validate a dispatch handle; return (tuple of the 6 arrays, their ArrayInfos)."""
        if not isinstance(handle, tuple) or len(handle) != 6:
            raise TypeError(f"handle: expected the 6-tuple an intranode dispatch returned, got "
                            f"{type(handle).__name__}"
                            + (f" of length {len(handle)}" if isinstance(handle, tuple) else ""))
        owner = getattr(handle, "buffer_id", None)
        if isinstance(handle, _Handle) and owner is not None and owner != self._id:
            alive = owner in _live_buffers
            raise ValueError(f"handle: made by another Buffer (#{owner}, "
                             f"{'still alive' if alive else 'since destroyed'}); a handle is "
                             f"only valid with the Buffer whose dispatch returned it (this is "
                             f"#{self._id})")
        R, dev = self.group_size, self.device
        names = ("handle[0] (rank_prefix_matrix)", "handle[1] (channel_prefix_matrix)",
                 "handle[2] (recv_channel_prefix_matrix)", "handle[3] (recv_src_idx)",
                 "handle[4] (is_token_in_rank)", "handle[5] (send_head)")
        for a, n in zip(handle, names):
            if not is_array(a):
                raise TypeError(f"{n}: expected an array, got {type(a).__name__}")
        i0 = check_array(handle[0], names[0], dtypes=("int32",), shape=(R, R),
                         desc="[num_ranks, num_ranks]", device=dev)
        i1 = check_array(handle[1], names[1], dtypes=("int32",), ndim=2, device=dev)
        C = i1.shape[1]
        if i1.shape[0] != R:
            raise ValueError(f"{names[1]}: expected shape [num_ranks, num_channels] = [{R}, *], "
                             f"got {list(i1.shape)}")
        i2 = check_array(handle[2], names[2], dtypes=("int32",), shape=(R, C),
                         desc="[num_ranks, num_channels]", device=dev)
        i3 = check_array(handle[3], names[3], dtypes=("int32",), ndim=1, device=dev)
        i4 = check_array(handle[4], names[4], dtypes=("bool",), ndim=2, device=dev)
        T = i4.shape[0]
        if i4.shape[1] != R:
            raise ValueError(f"{names[4]}: expected shape [num_tokens, num_ranks] = [*, {R}], "
                             f"got {list(i4.shape)}")
        i5 = check_array(handle[5], names[5], dtypes=("int32",), shape=(T, R),
                         desc="[num_tokens, num_ranks]", device=dev)
        if C != num_channels:
            raise ValueError(
                f"config: num_sms={2 * num_channels} gives {num_channels} channels, but the handle "
                f"was made by a dispatch with {C} channels (num_sms={2 * C}); {what} must use the "
                "dispatch's channel count")
        return (i0, i1, i2, i3, i4, i5)

    # --------------------------------------------------------------------------- context

    def _context(self):
        from numba_ep.kernels import intranode

        if self._ctx is None:
            if self._ipc is None:
                raise ValueError("num_nvl_bytes: this Buffer has no NVLink buffer "
                                 "(num_nvl_bytes=0); intranode dispatch/combine need one")
            self._ctx = intranode.IntranodeContext(self._ipc, self.rank, self.group_size,
                                                   timeout_s=self.timeout_s)
        return self._ctx

    def _device_scope(self):
        if self._host:
            return contextlib.nullcontext()
        import cupy

        return cupy.cuda.Device(self.device)

    @contextlib.contextmanager
    def _guard(self):
        """Device scope; a communication timeout inside makes the Buffer unusable."""
        with self._device_scope():
            try:
                yield
            except CommTimeoutError as e:
                self._broken = f"CommTimeoutError: {e}"
                raise

    # --------------------------------------------------------------------------- layout

    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Who sends how many tokens where, from the router's choice.

        Args:
            topk_idx: ``[T, K]`` int64, C-contiguous, on this rank's GPU; global expert ids in
                ``[-1, num_experts)``, -1 = unused slot.
            num_experts: E, a positive multiple of the rank count.
            previous_event, async_finish, allocate_on_comm_stream: see the module docstring.

        Returns ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank (None within a node),
        num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool, event)``, in the kind of
        ``topk_idx``. Expert ids are range-checked on the device (one small synchronising copy)
        unless the caller's stream is being captured into a CUDA graph.
        """
        self._check_usable("get_dispatch_layout")
        R = self.group_size
        info = check_array(topk_idx, "topk_idx", dtypes=("int64",), ndim=2,
                           desc="[num_tokens, num_topk]", device=self.device)
        num_experts = _check_int("num_experts", num_experts, 1)
        if num_experts % R:
            raise ValueError(f"num_experts: expected a multiple of the rank count {R}, got "
                             f"{num_experts}")
        async_finish, allocate = self._check_events(previous_event, async_finish,
                                                    allocate_on_comm_stream)
        torch_out = info.kind == "torch"
        from numba_ep.kernels import layout

        with self._guard():
            call = _Call(self, torch_out, previous_event, async_finish, allocate)
            with call.on_caller():
                topk = device_view(topk_idx, "topk_idx")
            call.begin()
            if not call.capturing:
                with call.on_comm():
                    check_expert_ids(topk, num_experts, "topk_idx")
            with call.alloc():
                per_rank, per_rdma, per_expert, in_rank = layout.get_dispatch_layout(
                    topk, num_experts, R, num_gpus_per_node=_gpus_per_node(R), stream=call.comm)
            event = call.finish((topk_idx, topk, per_rank, per_rdma, per_expert, in_rank))
            with call.on_caller():
                outs = [to_caller(a, torch_out) for a in (per_rank, per_rdma, per_expert, in_rank)]
        return (*outs, event)

    # --------------------------------------------------------------------------- dispatch

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None,
                 topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Config | None = None, previous_event=None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """Send every token to each rank that hosts one of its experts (once per rank).

        Args (T tokens here, H hidden, K top-k <= 16, E experts, R ranks, S scales per token):
            x: ``[T, H]`` (BF16: torch.bfloat16 / CuPy uint16; any dtype with rows of a multiple
                of 16 bytes), or a pair ``(x_fp8 [T, H], x_scales)`` with FP8 data
                (torch.float8_e4m3fn / CuPy uint8) and ``x_scales [T, S]`` (or ``[T]``) float32
                (or int32: packed UE8M0), any strides. Data C-contiguous.
            handle: a previous dispatch's handle: cached mode (no notify, no host wait; then
                ``topk_idx`` / ``topk_weights`` must be None and the counts are not needed).
            num_tokens_per_rank ``[R] int32``, is_token_in_rank ``[T, R] bool``,
                num_tokens_per_expert ``[E] int32``: from ``get_dispatch_layout`` (required
                unless cached). num_tokens_per_rdma_rank: ignored within a node.
            topk_idx ``[T, K] int64`` and topk_weights ``[T, K] float32``: both or neither.
            expert_alignment: round each per-expert count up to a multiple of this (>= 1).
            num_worst_tokens: if > 0, receive exactly this many rows (it must be at least the
                real count, which nothing checks on the host): no host wait (CUDA-graph safe),
                the per-expert list is empty, rows past the real count have ``recv_topk_idx``
                -1 and unspecified data. Expert ids are then not range-checked.
            config: default ``Buffer.get_dispatch_config(R)``.
            previous_event, async_finish, allocate_on_comm_stream: see the module docstring.

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)``:
            recv_x ``[N, H]`` dtype of x (a pair with ``recv_x_scales [N, S]`` in FP8 mode), rows
            by source rank, then the source's token order; recv_topk_idx ``[N, K] int64`` local
            expert ids (-1 where the expert is elsewhere); recv_topk_weights ``[N, K] float32``
            (0 where the id is -1); the per-expert list ``list[int]`` of length E/R; the handle
            (see ``_Handle``). Cached mode returns ``(recv_x, None, None, None, None, event)``.
        """
        self._check_usable("dispatch")
        self._check_intranode("dispatch")
        plan = self._validate_dispatch(
            x, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
            topk_weights, expert_alignment, num_worst_tokens, config)
        async_finish, allocate = self._check_events(previous_event, async_finish,
                                                    allocate_on_comm_stream)
        with self._guard():
            call = _Call(self, plan.torch_out, previous_event, async_finish, allocate)
            if call.capturing and plan.handle is None and plan.num_worst_tokens == 0:
                raise RuntimeError(
                    "dispatch: under CUDA-graph capture a non-cached dispatch needs "
                    "num_worst_tokens > 0 (the host cannot wait for the received counts while "
                    "capturing); or pass a cached handle")
            return self._run_dispatch(plan, call)

    def _validate_dispatch(self, x, handle, num_tokens_per_rank, is_token_in_rank,
                           num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                           num_worst_tokens, config) -> _DispatchPlan:
        R, dev = self.group_size, self.device
        config = self._check_config(config, "dispatch", self.get_dispatch_config)
        C = config.num_channels
        # x or (x, scales)
        scales = None
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise TypeError(f"x: expected an array or a pair (x_fp8, x_scales), got a "
                                f"{type(x).__name__} of length {len(x)}")
            x, scales = x
            xname = "x[0] (x_fp8)"
        else:
            xname = "x"
        x_info = check_array(x, xname, ndim=2, desc="[num_tokens, hidden]", device=dev,
                             row_multiple=16)
        T, H = x_info.shape
        if H == 0:
            raise ValueError(f"{xname}: expected hidden >= 1, got shape {list(x_info.shape)}")
        row_bytes = H * x_info.itemsize
        scales_info = None
        S = 0
        if scales is not None:
            scales_info = check_array(scales, "x[1] (x_scales)", dtypes=("float32", "int32"),
                                      device=dev, contiguous=False)
            if scales_info.ndim not in (1, 2) or scales_info.shape[0] != T:
                raise ValueError(f"x[1] (x_scales): expected shape [num_tokens, num_scales] = "
                                 f"[{T}, *] or [num_tokens] = [{T}], got {list(scales_info.shape)}")
            S = 1 if scales_info.ndim == 1 else scales_info.shape[1]
            if S < 1:
                raise ValueError("x[1] (x_scales): expected at least one scale per token, got "
                                 f"shape {list(scales_info.shape)}")
        expert_alignment = _check_int("expert_alignment", expert_alignment, 1)
        num_worst_tokens = _check_int("num_worst_tokens", num_worst_tokens, 0)

        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("topk_idx / topk_weights: must be None in cached mode (when a "
                                 "handle is given); the handle already fixes the routing")
            infos = self._check_handle(handle, C, "a cached dispatch")
            if infos[4].shape[0] != T:
                raise ValueError(f"{xname}: the handle was made for {infos[4].shape[0]} tokens "
                                 f"(is_token_in_rank rows), got {T}")
            N = infos[3].shape[0]
            if num_worst_tokens not in (0, N):
                raise ValueError(f"num_worst_tokens: a cached dispatch receives the handle's {N} "
                                 f"rows; pass 0 (or {N}), got {num_worst_tokens}")
            self._check_buffer_size("dispatch", C, config.num_max_nvl_chunked_recv_tokens,
                                    row_bytes, 0, S)
            return _DispatchPlan(
                torch_out=x_info.kind == "torch", x=x, x_info=x_info, scales=scales,
                scales_info=scales_info, topk_idx=None, topk_weights=None, handle=handle,
                num_tokens_per_rank=None, is_token_in_rank=handle[4], num_tokens_per_expert=None,
                num_tokens=T, row_bytes=row_bytes, num_topk=0, num_scales=S, num_experts=0,
                num_channels=C, num_recv_cached=N, expert_alignment=expert_alignment,
                num_worst_tokens=0, config=config)

        for name, v in (("num_tokens_per_rank", num_tokens_per_rank),
                        ("is_token_in_rank", is_token_in_rank),
                        ("num_tokens_per_expert", num_tokens_per_expert)):
            if v is None:
                raise ValueError(f"{name}: required for a non-cached dispatch (from "
                                 "get_dispatch_layout), got None")
        check_array(num_tokens_per_rank, "num_tokens_per_rank", dtypes=("int32",), shape=(R,),
                    desc="[num_ranks]", device=dev)
        check_array(is_token_in_rank, "is_token_in_rank", dtypes=("bool",), shape=(T, R),
                    desc="[num_tokens, num_ranks]", device=dev)
        e_info = check_array(num_tokens_per_expert, "num_tokens_per_expert", dtypes=("int32",),
                             ndim=1, desc="[num_experts]", device=dev)
        E = e_info.shape[0]
        if E == 0 or E % R:
            raise ValueError(f"num_tokens_per_expert: its length is num_experts, which must be a "
                             f"positive multiple of the rank count {R}; got {E}")
        if E // R > MAX_LOCAL_EXPERTS:
            raise ValueError(f"num_tokens_per_expert: at most {MAX_LOCAL_EXPERTS} experts per rank, "
                             f"got {E} experts over {R} ranks")
        if (topk_idx is None) != (topk_weights is None):
            raise ValueError("topk_idx / topk_weights: pass both or neither (got "
                             f"topk_idx={'None' if topk_idx is None else 'an array'}, "
                             f"topk_weights={'None' if topk_weights is None else 'an array'})")
        K = 0
        if topk_idx is not None:
            k_info = check_array(topk_idx, "topk_idx", dtypes=("int64",), ndim=2,
                                 desc="[num_tokens, num_topk]", device=dev)
            K = k_info.shape[1]
            if k_info.shape[0] != T:
                raise ValueError(f"topk_idx: expected shape [num_tokens, num_topk] = [{T}, *], got "
                                 f"{list(k_info.shape)}")
            if not 1 <= K <= MAX_TOPK:
                raise ValueError(f"topk_idx: expected 1 <= num_topk <= {MAX_TOPK}, got shape "
                                 f"{list(k_info.shape)}")
            check_array(topk_weights, "topk_weights", dtypes=("float32",), shape=(T, K),
                        desc="[num_tokens, num_topk]", device=dev)
        self._check_buffer_size("dispatch", C, config.num_max_nvl_chunked_recv_tokens, row_bytes,
                                K, S)
        return _DispatchPlan(
            torch_out=x_info.kind == "torch", x=x, x_info=x_info, scales=scales,
            scales_info=scales_info, topk_idx=topk_idx, topk_weights=topk_weights, handle=None,
            num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert, num_tokens=T, row_bytes=row_bytes,
            num_topk=K, num_scales=S, num_experts=E, num_channels=C, num_recv_cached=None,
            expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, config=config)

    def _run_dispatch(self, p: _DispatchPlan, call: _Call):
        from numba_ep.kernels import intranode

        xp = _xp(self)
        R, T, C, K, S = self.group_size, p.num_tokens, p.num_channels, p.num_topk, p.num_scales
        slots = p.config.num_max_nvl_chunked_recv_tokens
        with call.on_caller():
            x_b = bytes_view(p.x, "x")
            sc = None
            if p.scales is not None:
                sc = device_view(p.scales, "x_scales")
                if sc.dtype != np.float32:
                    sc = sc.view(np.float32)       # int32 UE8M0 words travel as raw 32-bit values
                if sc.ndim == 1:
                    sc = sc[:, None]
            topk = device_view(p.topk_idx, "topk_idx")
            weights = device_view(p.topk_weights, "topk_weights")
            if p.handle is not None:
                dev_handle = getattr(p.handle, "dev", None)
                if dev_handle is None or getattr(p.handle, "buffer_id", None) != self._id:
                    dev_handle = tuple(device_view(a, f"handle[{i}]")
                                       for i, a in enumerate(p.handle))
                in_rank = dev_handle[4]
            else:
                per_rank = device_view(p.num_tokens_per_rank, "num_tokens_per_rank")
                in_rank = device_view(p.is_token_in_rank, "is_token_in_rank")
                per_expert = device_view(p.num_tokens_per_expert, "num_tokens_per_expert")
        call.begin()
        if topk is not None and p.num_worst_tokens == 0 and not call.capturing:
            with call.on_comm():
                check_expert_ids(topk, p.num_experts, "topk_idx")
        ctx = self._context()

        per_expert_list = None
        with call.alloc():
            if p.handle is not None:
                intranode.cached_notify(ctx, C, call.comm)
                rank_prefix, chan_prefix, recv_chan_prefix, recv_src_idx, _, _ = dev_handle
                N = p.num_recv_cached
                send_head = None
            else:
                rank_prefix, chan_prefix, recv_chan_prefix = intranode.notify_dispatch(
                    ctx, per_rank, in_rank, per_expert, p.num_experts, C, p.expert_alignment,
                    call.comm)
                if p.num_worst_tokens > 0:
                    N, per_expert_list = p.num_worst_tokens, []
                else:
                    N, per_expert_list = intranode.wait_recv_counts(ctx, p.num_experts // R)
                    N = int(N)
                    per_expert_list = [int(v) for v in per_expert_list]
                recv_src_idx = xp.empty((N,), dtype=np.int32)
                send_head = xp.empty((T, R), dtype=np.int32)
            recv_x_b = xp.empty((N, p.row_bytes), dtype=np.uint8)
            recv_sc = xp.empty((N, S), dtype=np.float32) if sc is not None else None
            recv_topk = xp.empty((N, K), dtype=np.int64) if topk is not None else None
            recv_w = xp.empty((N, K), dtype=np.float32) if topk is not None else None

        intranode.dispatch(ctx, x_b, sc, topk, weights, in_rank, chan_prefix, rank_prefix,
                           recv_chan_prefix, recv_x_b, recv_sc, recv_topk, recv_w, recv_src_idx,
                           send_head, p.num_experts, slots, C, p.num_worst_tokens, call.comm)
        event = call.finish((p.x, p.scales, p.topk_idx, p.topk_weights, p.num_tokens_per_rank,
                             p.is_token_in_rank, p.num_tokens_per_expert, x_b, sc, topk, weights,
                             in_rank, rank_prefix, chan_prefix, recv_chan_prefix, recv_src_idx,
                             send_head, recv_x_b, recv_sc, recv_topk, recv_w))

        # Outputs in the caller's kind.
        torch_out = p.torch_out
        with call.on_caller():
            recv_x = to_caller(recv_x_b, torch_out,
                               torch_dtype=p.x.dtype if torch_out else None,
                               dtype=None if torch_out else p.x.dtype)
            if recv_sc is not None:
                out_sc = recv_sc[:, 0] if p.scales_info.ndim == 1 else recv_sc
                sdt = p.scales.dtype
                recv_x = (recv_x, to_caller(out_sc, torch_out,
                                            torch_dtype=sdt if torch_out else None,
                                            dtype=None if torch_out else sdt))
            if p.handle is not None:
                return recv_x, None, None, None, None, event
            rt_topk = to_caller(recv_topk, torch_out)
            rt_w = to_caller(recv_w, torch_out)
            items = (to_caller(rank_prefix, torch_out), to_caller(chan_prefix, torch_out),
                     to_caller(recv_chan_prefix, torch_out), to_caller(recv_src_idx, torch_out),
                     p.is_token_in_rank, to_caller(send_head, torch_out))
        handle = _tag_handle(items, self._id,
                             (rank_prefix, chan_prefix, recv_chan_prefix, recv_src_idx, in_rank,
                              send_head), C, None if p.num_worst_tokens > 0 else N)
        return recv_x, rt_topk, rt_w, per_expert_list, handle, event

    # --------------------------------------------------------------------------- combine

    def combine(self, x, handle, topk_weights=None, bias=None, config: Config | None = None,
                previous_event=None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """Send every received row back to its source and sum the copies of each token.

        Args (N rows received by this rank's dispatch, T its own tokens, H hidden):
            x: ``[N, H]`` BF16 (torch.bfloat16 / CuPy uint16), C-contiguous, rows in the order of
                the dispatch's ``recv_x``; already reduced over this rank's local experts.
            handle: the handle the dispatch returned (same Buffer).
            topk_weights: ``[N, K] float32`` or None; summed the same way.
            bias: None, a ``[T, H]`` BF16 array, or a pair of them (either may be None); added.
            config: default ``Buffer.get_combine_config(R)``; its ``num_sms`` must match the
                dispatch's, and ``num_max_nvl_chunked_recv_tokens`` must be >= 64.
            previous_event, async_finish, allocate_on_comm_stream: see the module docstring.

        Returns ``(combined_x [T, H] BF16, combined_topk_weights [T, K] float32 or None, event)``:
        ``combined_x[t] = bias0[t] + bias1[t] + sum of x_r[row of t on r]`` over the ranks r that
        received t, accumulated in float32 (no weighting).
        """
        self._check_usable("combine")
        self._check_intranode("combine")
        plan = self._validate_combine(x, handle, topk_weights, bias, config)
        async_finish, allocate = self._check_events(previous_event, async_finish,
                                                    allocate_on_comm_stream)
        with self._guard():
            call = _Call(self, plan.torch_out, previous_event, async_finish, allocate)
            return self._run_combine(plan, call)

    def _validate_combine(self, x, handle, topk_weights, bias, config) -> _CombinePlan:
        from numba_ep.kernels import intranode

        dev = self.device
        config = self._check_config(config, "combine", self.get_combine_config)
        C = config.num_channels
        if handle is None:
            raise ValueError("handle: combine needs the handle its dispatch returned, got None")
        infos = self._check_handle(handle, C, "combine")
        N, T = infos[3].shape[0], infos[4].shape[0]
        x_info = check_array(x, "x", dtypes=("bfloat16",), ndim=2, desc="[num_recv_tokens, hidden]",
                             device=dev, row_multiple=16)
        if x_info.shape[0] != N:
            raise ValueError(f"x: expected shape [num_recv_tokens, hidden] = [{N}, *] (rows of "
                             f"the dispatch's recv_x), got {list(x_info.shape)}")
        H = x_info.shape[1]
        if H == 0:
            raise ValueError(f"x: expected hidden >= 1, got shape {list(x_info.shape)}")
        K = 0
        if topk_weights is not None:
            w_info = check_array(topk_weights, "topk_weights", dtypes=("float32",), ndim=2,
                                 desc="[num_recv_tokens, num_topk]", device=dev)
            K = w_info.shape[1]
            if w_info.shape[0] != N or not 1 <= K <= MAX_TOPK:
                raise ValueError(f"topk_weights: expected shape [num_recv_tokens, num_topk] = "
                                 f"[{N}, 1..{MAX_TOPK}], got {list(w_info.shape)}")
        if bias is None:
            parts = []
        elif isinstance(bias, (tuple, list)):
            if len(bias) > 2:
                raise ValueError(f"bias: expected an array or a pair of arrays, got a "
                                 f"{type(bias).__name__} of length {len(bias)}")
            parts = list(bias)
        else:
            parts = [bias]
        parts += [None] * (2 - len(parts))
        for i, b in enumerate(parts):
            if b is not None:
                check_array(b, f"bias[{i}]", dtypes=("bfloat16",), shape=(T, H),
                            desc="[num_tokens, hidden]", device=dev)
        slots = config.num_max_nvl_chunked_recv_tokens
        if slots < intranode.MIN_RECV_SLOTS:
            raise ValueError(f"config: combine needs num_max_nvl_chunked_recv_tokens >= "
                             f"{intranode.MIN_RECV_SLOTS}, got {slots}")
        self._check_buffer_size("combine", C, slots, H * 2, K, 0)
        return _CombinePlan(torch_out=x_info.kind == "torch", x=x, x_info=x_info, handle=handle,
                            topk_weights=topk_weights, bias0=parts[0], bias1=parts[1],
                            num_tokens=T, num_topk=K, num_channels=C, config=config)

    def _run_combine(self, p: _CombinePlan, call: _Call):
        from numba_ep.kernels import intranode

        xp = _xp(self)
        T, K, C = p.num_tokens, p.num_topk, p.num_channels
        H = p.x_info.shape[1]
        with call.on_caller():
            xv = _as_u16(device_view(p.x, "x"))
            w = device_view(p.topk_weights, "topk_weights")
            b0 = _as_u16(device_view(p.bias0, "bias[0]"))
            b1 = _as_u16(device_view(p.bias1, "bias[1]"))
            dev_handle = getattr(p.handle, "dev", None)
            if dev_handle is None or getattr(p.handle, "buffer_id", None) != self._id:
                dev_handle = tuple(device_view(a, f"handle[{i}]") for i, a in enumerate(p.handle))
            rank_prefix, _, recv_chan_prefix, recv_src_idx, _, send_head = dev_handle
        ctx = self._context()
        call.begin()
        with call.alloc():
            out = xp.empty((T, H), dtype=np.uint16)
            out_w = xp.empty((T, K), dtype=np.float32) if w is not None else None
        intranode.cached_notify(ctx, C, call.comm)
        intranode.combine(ctx, xv, w, b0, b1, recv_src_idx, rank_prefix, recv_chan_prefix,
                          send_head, out, out_w, p.config.num_max_nvl_chunked_recv_tokens, C,
                          call.comm)
        event = call.finish((p.x, p.topk_weights, p.bias0, p.bias1, xv, w, b0, b1, rank_prefix,
                             recv_chan_prefix, recv_src_idx, send_head, out, out_w))
        torch_out = p.torch_out
        with call.on_caller():
            combined = to_caller(out, torch_out, torch_dtype=p.x.dtype if torch_out else None,
                                 dtype=None if torch_out else p.x.dtype)
            combined_w = to_caller(out_w, torch_out)
        return combined, combined_w, event

    # --------------------------------------------------------------------------- low latency

    def clean_low_latency_buffer(self, *args, **kwargs):
        """Low-latency mode: not implemented yet (raises NotImplementedError)."""
        raise NotImplementedError(_LOW_LATENCY_MSG)

    def low_latency_dispatch(self, *args, **kwargs):
        """Low-latency mode: not implemented yet (raises NotImplementedError)."""
        raise NotImplementedError(_LOW_LATENCY_MSG)

    def low_latency_combine(self, *args, **kwargs):
        """Low-latency mode: not implemented yet (raises NotImplementedError)."""
        raise NotImplementedError(_LOW_LATENCY_MSG)

    def get_next_low_latency_combine_buffer(self, *args, **kwargs):
        """Low-latency mode: not implemented yet (raises NotImplementedError)."""
        raise NotImplementedError(_LOW_LATENCY_MSG)

    def low_latency_update_mask_buffer(self, *args, **kwargs):
        """Low-latency mode: not implemented yet (raises NotImplementedError)."""
        raise NotImplementedError(_LOW_LATENCY_MSG)

    def low_latency_query_mask_buffer(self, *args, **kwargs):
        """Low-latency mode: not implemented yet (raises NotImplementedError)."""
        raise NotImplementedError(_LOW_LATENCY_MSG)

    def low_latency_clean_mask_buffer(self, *args, **kwargs):
        """Low-latency mode: not implemented yet (raises NotImplementedError)."""
        raise NotImplementedError(_LOW_LATENCY_MSG)


# -------------------------------------------------------------------------------------------------
# small helpers
# -------------------------------------------------------------------------------------------------

def _xp(buf):
    if buf._host:
        return np
    import cupy

    return cupy


def _as_u16(a):
    """A bf16 device array as uint16 (the kernels' view of BF16); None stays None."""
    if a is None or a.dtype == np.uint16:
        return a
    return a.view(np.uint16)


def _gpus_per_node(num_ranks):
    """GPUs per NVLink domain for the per-node layout counts (None: one node)."""
    return MAX_RANKS if num_ranks > MAX_RANKS and num_ranks % MAX_RANKS == 0 else None


def _check_timeout(timeout_s):
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not timeout_s > 0:
        raise ValueError(f"timeout_s: expected a positive number of seconds or None, got "
                         f"{timeout_s!r}")
    return float(timeout_s)


def _high_priority() -> int:
    """The highest stream priority of the current device (numerically lowest); 0 if unknown."""
    try:
        from cuda.bindings import runtime as rt

        err, _least, greatest = rt.cudaDeviceGetStreamPriorityRange()
        if int(err) == 0:
            return int(greatest)
    except Exception:
        pass
    return 0
