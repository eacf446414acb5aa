"""Buffer: DeepEP V1's ``deep_ep.Buffer`` for numba_ep (intranode and internode normal mode,
low-latency mode).

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

Without a GPU (or with ``NUMBA_EP_BACKEND=cpu``) the Buffer runs on the CPU backend: NumPy arrays
or torch CPU tensors in and out, every call synchronous (empty events), each kernel entry point
answered by ``numba_ep.cpu`` (the NumPy reference over all-gathers between the ranks). Everything
above the kernels (checks, handles, configs, size checks) is the same code as on the GPU.

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
another Buffer, and the rank count (1..8 per node; ranks on several nodes take internode mode,
``numba_ep.kernels.internode``, which needs ``num_rdma_bytes``).

Errors during a call: a ``CommTimeoutError`` (a peer did not answer within ``timeout_s``; device
waits record it, the host raises it, at the latest at the next call) makes the Buffer unusable:
destroy it and build a new one on every rank.

CUDA graphs: a dispatch with ``num_worst_tokens > 0`` (or a cached dispatch) and a combine can be
captured; a plain dispatch cannot (the host waits for the received counts). Internode calls
refuse capture (RuntimeError): each takes fresh epoch values a replay would repeat.

Low-latency mode
----------------
For small batches (decoding). The Buffer needs an NVSHMEM buffer (``num_rdma_bytes`` at least
``Buffer.get_low_latency_rdma_size_hint(M, H, R, E)``); construction then initialises NVSHMEM
over the group and allocates it, and ``destroy()`` frees it and finalises NVSHMEM (collective)::

    buf = Buffer(group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(M, H, R, E),
                 low_latency_mode=True, explicitly_destroy=True)
    recv_x, recv_count, handle, _, hook = buf.low_latency_dispatch(
        x, topk_idx, M, E, return_recv_hook=True)      # send phase only
    ... other work ...; hook()                          # receive phase
    y = experts(recv_x, recv_count)                     # [L, R*M, H] BF16
    combined_x, _, _ = buf.low_latency_combine(y, topk_idx, topk_weights, handle)

The kernels are ``numba_ep.kernels.low_latency`` (its docstring has the algorithm and the rules
of use); the Buffer validates every argument first (once per set of shapes, dtypes and options,
then remembered) and keeps one ``LowLatencyContext`` per (M, H, E) shape over its NVSHMEM
buffer. Unlike the other calls, it converts nothing: the kernels take CuPy arrays and torch
tensors as they are, and the outputs are made in the caller's kind on the caller's current
stream (torch tensors from torch's caching allocator, FP8 as ``torch.float8_e4m3fn``; CuPy
arrays from CuPy's pool), so an eager step costs little more host time than the kernel layer's.

- Streams: DeepEP's low-latency semantics: the kernels run on the caller's current stream
  (torch's or CuPy's, as for the other calls), not the communication stream; nothing waits on
  the host. ``async_finish=True`` returns an ``EventOverlap`` recorded on that stream after the
  kernels, holding every input and output in ``extra_tensors``; otherwise the event is empty.
  ``return_recv_hook=True`` launches only the send phase and returns ``hook``; ``hook()``
  launches the receive phase on the same stream (the outputs are complete after it). The two
  are mutually exclusive. A hook must be called before the next low-latency call (the Buffer
  raises otherwise; ``clean_low_latency_buffer`` drops an uncalled one).
- Shapes: the NVSHMEM buffer is laid out for one (M, H, E) at a time. The first call of a
  Buffer may use any shape (its buffer is zero); another shape needs
  ``clean_low_latency_buffer(M, H, E)`` on every rank first (DeepEP's rule, enforced here).
  All ranks make the same sequence of low-latency calls with the same M, H, E.
- Not range-checked on the device: the expert ids (a check would synchronise every call).
- ``dispatch_wait_recv_cost_stats`` / ``combine_wait_recv_cost_stats`` (int64 ``[R]``) count
  nanoseconds of %globaltimer where DeepEP counts clock cycles: the same slow-rank diagnosis in
  units that do not depend on the clock.
- Shrink mode (``enable_shrink``, the mask-buffer methods) is not implemented.
- Timeouts: a receive phase that waits longer than ``timeout_s`` for a peer records it; the
  next call (or hook) on this Buffer raises ``CommTimeoutError`` and the Buffer is unusable.
- CuPy callers: BF16 is ``uint16`` and FP8 ``uint8`` (recv_x of an FP8 dispatch), as above.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import numbers
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from numba_ep import config as _config
from numba_ep import interop
from numba_ep.config import Config
from numba_ep.errors import CommTimeoutError
from numba_ep.interop import (CUPY_CARRIER, ArrayInfo, EventOverlap, array_info, array_key,
                              bytes_view, caller_stream, current_stream_handle, device_view,
                              is_array, record_event, to_caller, torch_allocations,
                              torch_cuda_active)

__all__ = ["Buffer", "Config", "EventOverlap", "check_expert_ids", "MAX_TOPK", "MAX_RANKS"]

#: largest top-k the normal kernels accept
MAX_TOPK = 16
#: ranks of intranode mode
MAX_RANKS = _config.MAX_INTRANODE_RANKS
#: local experts per rank the notify kernel counts
MAX_LOCAL_EXPERTS = 1024

#: largest top-k of low-latency mode (numba_ep.kernels.low_latency.MAX_TOPK)
LL_MAX_TOPK = 16
#: local experts per rank of low-latency mode (numba_ep.kernels.low_latency.MAX_LOCAL_EXPERTS)
LL_MAX_LOCAL_EXPERTS = 4096
#: largest hidden size of LogFMT combine (numba_ep.kernels.low_latency.LOGFMT_MAX_HIDDEN)
LL_LOGFMT_MAX_HIDDEN = 16384

_SHRINK_MSG = ("low-latency shrink mode (enable_shrink: mask buffer, masked ranks) is not "
               "implemented yet")
_INT32_MAX = 2**31 - 1
#: NVSHMEM heap beyond num_rdma_bytes (NVSHMEM's own allocations, alignment)
_NVSHMEM_HEAP_MARGIN = 512 << 20
_heap_env_ours = None  # the NVSHMEM_SYMMETRIC_SIZE this module set, if it set one

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


_INTERNODE_HANDLE_ITEMS = (
    "is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix",
    "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum",
    "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum", "recv_src_meta",
    "send_rdma_head", "send_nvl_head")


#: ``Buffer._ll_active`` after internode use: the NVSHMEM buffer holds internode flags
_INTERNODE_ACTIVE = "internode"


class _InternodeHandle(tuple):
    """DeepEP's internode dispatch handle, a 10-tuple (see ``numba_ep.kernels.internode``)::

        (is_token_in_rank [T, R] bool, rdma_channel_prefix_matrix [N_nodes, C],
         gbl_channel_prefix_matrix [R, C], recv_rdma_channel_prefix_matrix [N_nodes, C],
         recv_rdma_rank_prefix_sum [N_nodes], recv_gbl_channel_prefix_matrix [R, C],
         recv_gbl_rank_prefix_sum [R], recv_src_meta [N, 2], send_rdma_head [T, N_nodes],
         send_nvl_head [N_rdma_recv, G])   (int32 but the first)
    """

    def __new__(cls, items):
        return tuple.__new__(cls, items)

    def __repr__(self):
        return (f"_InternodeHandle(buffer_id={getattr(self, 'buffer_id', None)}, "
                f"shapes={[tuple(a.shape) for a in self]})")


#: argument types whose value, with the type, decides what a check says (_ll_checked_plan)
_PLAIN_SCALARS = frozenset((int, bool, type(None)))


class _LowLatencyHandle(tuple):
    """DeepEP's low-latency handle, a 5-tuple::

        (src_info [L, R*M] int32, layout_range [L, R] int64,
         num_max_dispatch_tokens_per_rank M, hidden H, num_experts E)

    It unpacks and indexes like a plain tuple (a plain tuple of the same items is accepted
    too). It also remembers the Buffer that made it (``buffer_id``) and the device views of its
    arrays (``dev``).
    """

    def __new__(cls, items):
        return tuple.__new__(cls, items)

    def __repr__(self):
        return (f"_LowLatencyHandle(buffer_id={getattr(self, 'buffer_id', None)}, "
                f"M={self[2]}, H={self[3]}, E={self[4]})")


class _LowLatencyHook:
    """The receive phase of one low-latency call (``hook()`` launches it, once, on the stream
    the call used). Holds the call's outputs until then."""

    def __init__(self, buffer, ll_hook, what):
        self._buffer = buffer
        self._hook = ll_hook
        self.what = what
        self._generation = buffer._ll_generation

    @property
    def called(self) -> bool:
        return bool(self._hook.called)

    def __call__(self):
        buf = self._buffer
        buf._check_usable(f"{self.what} receive hook")
        if self.called:
            raise RuntimeError(f"{self.what}: the receive hook was already called")
        if buf._ll_generation != self._generation:
            raise RuntimeError(f"{self.what}: this receive hook is stale: "
                               "clean_low_latency_buffer ran after its call")
        with buf._guard():
            self._hook()

    def __repr__(self):
        return f"<{self.what} receive hook{' (done)' if self.called else ''}>"


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


@dataclass
class _LowLatencyPlan:
    """What a low-latency call decided while validating."""
    torch_out: bool
    M: int
    H: int
    E: int
    async_finish: bool
    return_recv_hook: bool
    use_fp8: bool = False
    round_scale: bool = False
    use_ue8m0: bool = False
    use_logfmt: bool = False
    zero_copy: bool = False


# -------------------------------------------------------------------------------------------------
# Streams of one call
# -------------------------------------------------------------------------------------------------

class _TorchAllocations:
    """``with``: CuPy on the caller's stream, its allocations made by torch
    (``interop.torch_allocations``)."""

    __slots__ = ("stream", "device", "_alloc")

    def __init__(self, stream, device):
        self.stream, self.device = stream, device

    def __enter__(self):
        self.stream.__enter__()
        self._alloc = torch_allocations(int(self.device))
        self._alloc.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self._alloc.__exit__(*exc)
        finally:
            self.stream.__exit__(*exc)
        return False


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
        self.capturing = self.torch_alloc = False
        if self.host:
            self.caller = self.comm = None
            return
        import cupy

        self.comm = buf._comm_stream
        self.handoff = buf._handoff_events
        self.device = buf.device
        self.caller = caller_stream(torch_side, buf.device if torch_side else None)
        self.capturing = bool(cupy.cuda.runtime.streamIsCapturing(self.caller.ptr))
        self.torch_alloc = (torch_side and not self.capturing and interop.TORCH_OUTPUT_VIEWS)

    def begin(self):
        if self.host:
            return
        import cupy

        ev = self.previous_event.event if self.previous_event is not None else None
        if ev is None:
            ev = self.handoff[0]
            cupy.cuda.runtime.eventRecord(ev.ptr, self.caller.ptr)
        cupy.cuda.runtime.streamWaitEvent(self.comm.ptr, ev.ptr, 0)

    def on_caller(self):
        return contextlib.nullcontext() if self.host else self.caller

    def on_comm(self):
        return contextlib.nullcontext() if self.host else self.comm

    def alloc(self):
        """Where outputs are made: on the comm stream when asked; for torch callers on their
        stream by torch's allocator (handed back as views of their tensors, not DLPack; not
        while a CuPy graph capture is under way, which torch's allocator would not know of)."""
        if self.allocate_on_comm_stream:
            return self.on_comm()
        if self.torch_alloc:
            return _TorchAllocations(self.caller, self.device)
        return self.on_caller()

    def finish(self, keep) -> EventOverlap:
        if self.host:
            return EventOverlap(None, torch_side=self.torch_side)
        import cupy

        if self.async_finish:  # the caller keeps this event: a fresh one
            return EventOverlap(record_event(self.comm.ptr),
                                extra_tensors=tuple(k for k in keep if k is not None),
                                torch_side=self.torch_side)
        ev = self.handoff[1]
        cupy.cuda.runtime.eventRecord(ev.ptr, self.comm.ptr)
        cupy.cuda.runtime.streamWaitEvent(self.caller.ptr, ev.ptr, 0)
        return EventOverlap(None, torch_side=self.torch_side)


# -------------------------------------------------------------------------------------------------
# Buffer
# -------------------------------------------------------------------------------------------------

class Buffer:
    """DeepEP V1's communication buffer (normal mode within a node or across nodes, and
    low-latency mode) for one rank of an EP group.

    Args:
        group: a ``numba_ep.Group``, an mpi4py communicator, a torch ``ProcessGroup``, or None
            (``numba_ep.group.as_group``: the spawn group, MPI COMM_WORLD under mpirun, torch's
            default group, else a single rank).
        num_nvl_bytes: bytes of NVLink buffer per rank (a multiple of 128; 0 = none). Every rank
            must pass the same value. Size it with ``Config.get_nvl_buffer_size_hint``.
        num_rdma_bytes: bytes of NVSHMEM symmetric buffer per rank (a multiple of 128; 0 = none),
            the same on every rank. If > 0, construction initialises NVSHMEM over the group
            (``numba_ep.memory.nvshmem_init``, one world per process, NVSHMEM_DISABLE_NVLS=1)
            and allocates it (``SymmetricBuffer``, zero-filled). Low-latency mode uses it; size
            it with ``Buffer.get_low_latency_rdma_size_hint(M, H, R, E)`` (the largest shape
            you will use). Internode normal mode (ranks on several nodes, see
            ``num_gpus_per_node``) keeps all its buffers here, sized for the whole batch: see
            ``Config.get_rdma_buffer_size_hint(hidden_bytes, R, num_max_tokens, G)``.
        low_latency_mode: DeepEP's switch for the low-latency API; needs ``num_rdma_bytes > 0``.
            The ``low_latency_*`` methods work whenever the NVSHMEM buffer is large enough.
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, enable_shrink: stored as
            attributes (no IBGDA QPs here; peers NVSHMEM maps are always reached by NVLink
            stores; shrink mode is not implemented).
        allow_mnnvl: if False (default), NVSHMEM_DISABLE_MNNVL=1 is set where unset.
        use_fabric: fabric (cuMem) handles are not supported (NotImplementedError if True).
        explicitly_destroy: if True the caller must call ``destroy()`` (collective); else the
            buffer is released when garbage-collected (locally, without a barrier). NVSHMEM
            memory can only be freed collectively, so garbage collection leaves it allocated
            until NVSHMEM is finalised: use ``explicitly_destroy=True`` with ``num_rdma_bytes``.
        comm: an mpi4py communicator, instead of ``group``.
        timeout_s: seconds any wait (device spin or host wait) may take before it raises
            ``CommTimeoutError`` naming the rank it waited for; None = env
            ``NUMBA_EP_TIMEOUT_S`` or 100 s.

    Construction is collective (the ranks exchange CUDA IPC handles, and initialise NVSHMEM
    when ``num_rdma_bytes > 0``). It picks this rank's GPU (``numba_ep.group.current_device``:
    ``local_rank % device count`` unless already chosen).
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
        self._sym = None
        num_nvl_bytes = _check_int("num_nvl_bytes", num_nvl_bytes, 0, 2**62)
        num_rdma_bytes = _check_int("num_rdma_bytes", num_rdma_bytes, 0, 2**62)
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if v % 128:
                raise ValueError(f"{name}: expected a multiple of 128 bytes, got {v} "
                                 f"(round up to {(v + 127) // 128 * 128})")
        if low_latency_mode and num_rdma_bytes == 0:
            raise ValueError("num_rdma_bytes: low_latency_mode=True needs an NVSHMEM buffer; pass "
                             "num_rdma_bytes >= Buffer.get_low_latency_rdma_size_hint(M, hidden, "
                             "num_ranks, num_experts), got 0")
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
        #: ranks per node (beyond DeepEP, where it is 8): fewer than the rank count means
        #: internode normal mode (see ``_resolve_gpus_per_node``)
        self.num_gpus_per_node = _resolve_gpus_per_node(self.group)
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
        self._cpu = False
        self._kernels = _device_kernels()
        self._ctx = None
        self._broken = None
        self._init_low_latency_state()
        if _cpu_backend_selected():
            self._init_cpu_backend()
            return

        import cupy

        self.device = current_device(self.group)
        with cupy.cuda.Device(self.device):
            if num_nvl_bytes > 0:
                from numba_ep.memory import IpcBuffer

                self._ipc = IpcBuffer(self.group, num_nvl_bytes, device=self.device)
            if num_rdma_bytes > 0:
                try:
                    self._sym = _allocate_symmetric(self.group, self.device, num_rdma_bytes,
                                                    self.allow_mnnvl)
                except BaseException:
                    if self._ipc is not None:
                        self._ipc.close(barrier=False)
                        self._ipc = None
                    raise
            self._comm_stream = cupy.cuda.Stream(non_blocking=True, priority=_high_priority())
            # Reused by every synchronous call for its two stream hand-offs: a wait enqueued on
            # an event is fixed when enqueued, so re-recording the event later is harmless.
            self._handoff_events = (cupy.cuda.Event(disable_timing=True),
                                    cupy.cuda.Event(disable_timing=True))
            self._device_sms = int(cupy.cuda.Device(self.device).attributes["MultiProcessorCount"])
            from numba_ep.kernels.waits import error_record

            error_record()  # created now, on this device, before any kernel needs it
        self._register()

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def _host_mode(cls, group, num_nvl_bytes=0, timeout_s=None, device_sms=None,
                   num_rdma_bytes=0, low_latency_mode=False):
        """A Buffer that owns no CUDA resources, for tests and the simulator.

        Arrays are NumPy arrays on the host (expected device: the host), streams are no-ops, and
        every kernel call goes to ``numba_ep.kernels.intranode`` / ``.low_latency`` as usual
        (tests replace those functions). ``group`` needs only ``rank`` and ``size``.
        ``num_nvl_bytes`` / ``num_rdma_bytes`` size fake IPC / NVSHMEM buffers the size checks
        see (nothing is allocated, NVSHMEM is not initialised).
        """
        from types import SimpleNamespace

        self = cls.__new__(cls)
        self._destroyed = True
        self.group = group
        self.rank, self.group_size = int(group.rank), int(group.size)
        self.num_gpus_per_node = _resolve_gpus_per_node(group)
        self.num_nvl_bytes = _check_int("num_nvl_bytes", num_nvl_bytes, 0, 2**62)
        self.num_rdma_bytes = _check_int("num_rdma_bytes", num_rdma_bytes, 0, 2**62)
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = 24
        self.allow_nvlink_for_low_latency_mode = True
        self.allow_mnnvl = self.use_fabric = self.enable_shrink = False
        self.explicitly_destroy = False
        self.timeout_s = _check_timeout(timeout_s)
        self._host = True
        self._cpu = False
        self._kernels = _device_kernels()
        self._ctx = None
        self._broken = None
        self.device = None
        self._ipc = SimpleNamespace(nbytes=num_nvl_bytes) if num_nvl_bytes else None
        self._sym = SimpleNamespace(nbytes=num_rdma_bytes) if num_rdma_bytes else None
        self._comm_stream = None
        self._device_sms = device_sms
        self._init_low_latency_state()
        self._register()
        return self

    def _init_cpu_backend(self):
        """No GPU: arrays are NumPy arrays, and the kernels are ``numba_ep.cpu``'s (the NumPy
        reference over the group's all-gathers). Buffer sizes are still checked as on a GPU."""
        from types import SimpleNamespace

        from numba_ep.cpu import intranode, layout, low_latency

        self._host = True
        self._cpu = True
        self._kernels = SimpleNamespace(intranode=intranode, layout=layout,
                                        low_latency=low_latency)
        self.device = None
        self._ipc = SimpleNamespace(nbytes=self.num_nvl_bytes) if self.num_nvl_bytes else None
        self._sym = SimpleNamespace(nbytes=self.num_rdma_bytes) if self.num_rdma_bytes else None
        self._comm_stream = None
        self._device_sms = Buffer.num_sms
        self._register()

    def _init_low_latency_state(self):
        #: LowLatencyContext per (M, hidden, num_experts), created on first use
        self._ll_ctxs = {}
        #: the shape the NVSHMEM buffer is laid out for (None: never used, still zero)
        self._ll_active = None
        #: the receive hook of the last low-latency call, until it is called
        self._ll_pending = None
        #: bumped by clean_low_latency_buffer: hooks of earlier calls become invalid
        self._ll_generation = 0
        #: NVSHMEM bytes each low-latency shape (M, hidden, num_experts) needs, once computed
        self._ll_need = {}
        self._ll_checked = {}   # call key -> _LowLatencyPlan (see _ll_checked_plan)
        self._ll_kw = {}        # torch caller? -> kernel-layer keywords (_ll_gpu_call)
        #: the InternodeContext over the NVSHMEM buffer, created on first internode use
        self._ictx = None

    def _register(self):
        self._id = next(_buffer_ids)
        _live_buffers[self._id] = self
        self._destroyed = False

    @property
    def backend(self) -> str:
        """``"cuda"`` (numba_ep's GPU kernels) or ``"cpu"`` (``numba_ep.cpu``: NumPy arrays or
        torch CPU tensors in and out)."""
        return "cpu" if self._host else "cuda"

    def __repr__(self):
        state = ("destroyed" if self._destroyed else "cpu backend" if self._cpu
                 else "host mode" if self._host
                 else f"device={self.device}")
        return (f"Buffer(#{getattr(self, '_id', '?')}, rank={self.rank}/{self.group_size}, "
                f"num_nvl_bytes={self.num_nvl_bytes}, num_rdma_bytes={self.num_rdma_bytes}, "
                f"{state})")

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
        ``previous_event``. On the CPU backend (no GPU) calls are synchronous and the event
        is empty."""
        from numba_ep.interop import current_stream_handle

        if _cpu_backend_selected():
            return EventOverlap(None)
        torch_side = torch_cuda_active()
        return EventOverlap(record_event(current_stream_handle(torch_side)), torch_side=torch_side)

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: numba_ep compiles its kernels for the GPU at hand, SM90 included."""
        return True

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """Tuned dispatch ``Config`` for ``num_ranks`` with ``Buffer.num_sms`` SMs (1..8 ranks:
        numba_ep's tables; more: DeepEP's internode rows, see ``numba_ep.config``)."""
        return _config.get_dispatch_config(num_ranks, num_sms=Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """Tuned combine ``Config`` for ``num_ranks`` with ``Buffer.num_sms`` SMs (as
        ``get_dispatch_config``)."""
        return _config.get_combine_config(num_ranks, num_sms=Buffer.num_sms)

    @staticmethod
    def get_num_gpus_per_node(group=None) -> int:
        """The ranks of ``group`` that share a node (its NVLink domain), as a Buffer over it
        will use: env ``NUMBA_EP_GPUS_PER_NODE`` (a divisor of the rank count; below the GPUs
        of one host it makes that host play several nodes), else the ranks per host when the
        group spans hosts, else all ranks up to 8. Fewer than the rank count means internode
        mode, which needs ``num_rdma_bytes`` (``Config.get_rdma_buffer_size_hint``)."""
        from numba_ep.group import as_group

        return _resolve_gpus_per_node(as_group(group))

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
        """A raw view of this rank's NVLink buffer, or with ``use_rdma_buffer=True`` of its
        NVSHMEM buffer.

        ``dtype``: a torch dtype (returns a torch tensor) or a NumPy/CuPy dtype (returns a CuPy
        array). ``size``: the shape (None = every whole element after ``offset``). ``offset``: in
        bytes.
        """
        self._check_usable("get_local_buffer_tensor", check_errors=False)
        mem, what = (self._sym, "NVSHMEM") if use_rdma_buffer else (self._ipc, "NVLink")
        if mem is None:
            raise ValueError(f"get_local_buffer_tensor: this Buffer has no {what} buffer "
                             f"({'num_rdma_bytes' if use_rdma_buffer else 'num_nvl_bytes'}=0)")
        offset = _check_int("offset", offset, 0, mem.nbytes)
        torch_side = type(dtype).__module__.startswith("torch")
        itemsize = dtype.itemsize if torch_side else np.dtype(dtype).itemsize
        avail = (mem.nbytes - offset) // itemsize
        shape = (avail,) if size is None else tuple(int(s) for s in size)
        count = int(np.prod(shape)) if shape else 1
        if count > avail:
            raise ValueError(f"size: {list(shape)} x {itemsize} B from offset {offset} does not "
                             f"fit the {mem.nbytes}-byte {what} buffer")
        raw = mem.local[offset: offset + count * itemsize]
        if torch_side:
            return to_caller(raw, True, torch_dtype=dtype).view(shape)
        return raw.view(np.dtype(dtype)).reshape(shape)

    def destroy(self) -> None:
        """Release the NVLink buffer, and the NVSHMEM buffer with this Buffer's reference to
        NVSHMEM (``nvshmem_finalize``; the last reference finalises it). Collective: every rank
        calls it. Only for ``Buffer(explicitly_destroy=True)``. Idempotent; every other method
        raises RuntimeError afterwards.

        A rank that never calls it is named in a ``CommTimeoutError`` after the group's timeout,
        and so is a rank that calls it after the others gave up on it. NVSHMEM's own free and
        finalize wait without a timeout, so on such an error this rank leaves its NVSHMEM buffer
        allocated and NVSHMEM initialised (until the process exits) rather than hang."""
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

        try:
            with cupy.cuda.Device(self.device):
                cupy.cuda.runtime.deviceSynchronize()
                if self._ipc is not None:
                    self._ipc.close()  # collective: barrier, unmap peers, barrier, free
                elif self._sym is None:
                    self.group.barrier()
                if self._sym is not None:
                    self._release_nvshmem()
        finally:
            self._ipc = None
            self._sym = None
            self._ctx = None
            self._ll_ctxs = {}
            self._ll_pending = None
            self._comm_stream = None

    def _release_nvshmem(self):
        """``nvshmem_free`` of this Buffer's symmetric buffer, then its ``nvshmem_finalize``.
        Both wait for every PE and have no timeout, so they come after
        ``memory.meet_before_nvshmem_collective`` (two bounded barriers); if that raises, the
        buffer stays allocated."""
        from numba_ep.memory import meet_before_nvshmem_collective, nvshmem_finalize

        meet_before_nvshmem_collective(self.group)
        sym, self._sym = self._sym, None
        try:
            sym.close()    # collective nvshmem_free
        finally:
            nvshmem_finalize()

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
            try:
                # every kernel records its timeouts here, the low-latency contexts' too
                _error_record().check()
            except CommTimeoutError as e:
                self._broken = f"CommTimeoutError: {e}"
                raise

    @property
    def _spans_nodes(self) -> bool:
        return self.num_gpus_per_node < self.group_size

    def _internode(self, what) -> bool:
        """True: this call takes internode normal mode (``numba_ep.kernels.internode``)."""
        if self._spans_nodes:
            if not self._cpu and self._sym is None:
                raise ValueError(
                    f"num_rdma_bytes: {what} over {self.group_size} ranks on nodes of "
                    f"{self.num_gpus_per_node} GPUs takes internode mode, which needs the NVSHMEM "
                    f"buffer; construct the Buffer with num_rdma_bytes > 0 (internode dispatch "
                    f"says how many bytes it needs), got 0")
            return True
        if self.group_size > MAX_RANKS:
            raise NotImplementedError(
                f"{what}: intranode mode supports 1..{MAX_RANKS} ranks, got {self.group_size} "
                f"in one node (NUMBA_EP_GPUS_PER_NODE={self.num_gpus_per_node})")
        return False

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

        if self._spans_nodes:   # internode mode keeps everything in the NVSHMEM buffer
            return
        need = int(intranode.nvl_bytes_needed(self.group_size, num_channels, num_recv_slots,
                                              row_bytes, num_topk, num_scales))  # memoised
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
        checked = getattr(handle, "checked", None)
        if checked is not None and checked[:2] == (self._id, num_channels):
            return checked[2]  # a handle's arrays cannot be swapped: validated once per Buffer
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
        infos = (i0, i1, i2, i3, i4, i5)
        if isinstance(handle, _Handle):
            handle.checked = (self._id, num_channels, infos)
        return infos

    # --------------------------------------------------------------------------- context

    def _context(self):
        intranode = self._kernels.intranode
        if self._ctx is None:
            # (the CPU backend's internode mode needs no NVLink buffer, as on GPUs)
            if self._ipc is None and not (self._cpu and self._spans_nodes):
                raise ValueError("num_nvl_bytes: this Buffer has no NVLink buffer "
                                 "(num_nvl_bytes=0); intranode dispatch/combine need one")
            if self._cpu:
                self._ctx = intranode.IntranodeContext(self.group, timeout_s=self.timeout_s)
            else:
                self._ctx = intranode.IntranodeContext(self._ipc, self.rank, self.group_size,
                                                       timeout_s=self.timeout_s)
        return self._ctx

    def _guard(self):
        """``with`` this: the Buffer's device is current inside, and a communication timeout
        inside makes the Buffer unusable."""
        return _DeviceGuard(self)

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
        layout = self._kernels.layout
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
                    topk, num_experts, R, stream=call.comm,
                    num_gpus_per_node=self.num_gpus_per_node if self._spans_nodes else None)
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
                unless cached). num_tokens_per_rdma_rank ``[num_nodes] int32``: required across
                nodes (internode mode, from ``get_dispatch_layout``), ignored within a node.
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
            (see ``_Handle``; across nodes DeepEP's 10-item ``_InternodeHandle``). Cached mode
            returns ``(recv_x, None, None, None, None, event)``.
        """
        self._check_usable("dispatch")
        if self._internode("dispatch"):
            return self._internode_dispatch(
                x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
                config, previous_event, async_finish, allocate_on_comm_stream)
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

    def _validate_x(self, x):
        """``x`` or ``(x_fp8, x_scales)`` of a dispatch: ``(x, its name, its ArrayInfo, scales or
        None, their ArrayInfo or None)``."""
        dev = self.device
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
        scales_info = None
        if scales is not None:
            scales_info = check_array(scales, "x[1] (x_scales)", dtypes=("float32", "int32"),
                                      device=dev, contiguous=False)
            if scales_info.ndim not in (1, 2) or scales_info.shape[0] != T:
                raise ValueError(f"x[1] (x_scales): expected shape [num_tokens, num_scales] = "
                                 f"[{T}, *] or [num_tokens] = [{T}], got {list(scales_info.shape)}")
            if scales_info.ndim == 2 and scales_info.shape[1] < 1:
                raise ValueError("x[1] (x_scales): expected at least one scale per token, got "
                                 f"shape {list(scales_info.shape)}")
        return x, xname, x_info, scales, scales_info

    def _validate_dispatch(self, x, handle, num_tokens_per_rank, is_token_in_rank,
                           num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                           num_worst_tokens, config) -> _DispatchPlan:
        R, dev = self.group_size, self.device
        config = self._check_config(config, "dispatch", self.get_dispatch_config)
        C = config.num_channels
        x, xname, x_info, scales, scales_info = self._validate_x(x)
        T, H = x_info.shape
        row_bytes = H * x_info.itemsize
        S = 0 if scales_info is None else 1 if scales_info.ndim == 1 else scales_info.shape[1]
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
        intranode = self._kernels.intranode
        xp = _xp(self)
        R, T, C, K, S = self.group_size, p.num_tokens, p.num_channels, p.num_topk, p.num_scales
        slots = p.config.num_max_nvl_chunked_recv_tokens
        with call.on_caller():
            x_b = bytes_view(p.x, "x")
            sc = _scales_view(p.scales)
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
        if self._internode("combine"):
            return self._internode_combine(x, handle, topk_weights, bias, config, previous_event,
                                           async_finish, allocate_on_comm_stream)
        plan = self._validate_combine(x, handle, topk_weights, bias, config)
        async_finish, allocate = self._check_events(previous_event, async_finish,
                                                    allocate_on_comm_stream)
        with self._guard():
            call = _Call(self, plan.torch_out, previous_event, async_finish, allocate)
            return self._run_combine(plan, call)

    def _validate_bias(self, bias, T, H):
        """A combine's ``bias``: None, an array or a pair; returns ``[bias0, bias1]`` (None for
        an absent one), each checked to be BF16 ``[T, H]``."""
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
                            desc="[num_tokens, hidden]", device=self.device)
        return parts

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
        parts = self._validate_bias(bias, T, H)
        slots = config.num_max_nvl_chunked_recv_tokens
        if slots < intranode.MIN_RECV_SLOTS:
            raise ValueError(f"config: combine needs num_max_nvl_chunked_recv_tokens >= "
                             f"{intranode.MIN_RECV_SLOTS}, got {slots}")
        self._check_buffer_size("combine", C, slots, H * 2, K, 0)
        return _CombinePlan(torch_out=x_info.kind == "torch", x=x, x_info=x_info, handle=handle,
                            topk_weights=topk_weights, bias0=parts[0], bias1=parts[1],
                            num_tokens=T, num_topk=K, num_channels=C, config=config)

    def _run_combine(self, p: _CombinePlan, call: _Call):
        intranode = self._kernels.intranode
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

    # --------------------------------------------------------------------------- internode
    # Ranks on several nodes (num_gpus_per_node < R): numba_ep.kernels.internode on GPUs,
    # numba_ep.cpu.internode (the reference) on the CPU backend; the same checks and handle.

    def _internode_dispatch(self, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                            is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                            expert_alignment, num_worst_tokens, config, previous_event,
                            async_finish, allocate_on_comm_stream):
        R, G = self.group_size, self.num_gpus_per_node
        if _check_int("num_worst_tokens", num_worst_tokens, 0):
            raise ValueError(f"num_worst_tokens: internode mode receives exactly the real count "
                             f"(as DeepEP's); pass 0, got {num_worst_tokens}")
        self._check_events(previous_event, async_finish, allocate_on_comm_stream)
        config = self._check_config(config, "dispatch", self.get_dispatch_config)
        if handle is None:
            p = self._validate_dispatch(x, None, num_tokens_per_rank, is_token_in_rank,
                                        num_tokens_per_expert, topk_idx, topk_weights,
                                        expert_alignment, 0, config)
            if num_tokens_per_rdma_rank is None:
                raise ValueError("num_tokens_per_rdma_rank: required for a non-cached internode "
                                 "dispatch (from get_dispatch_layout), got None")
            check_array(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", dtypes=("int32",),
                        shape=(R // G,), desc="[num_nodes]", device=self.device)
            x, scales, torch_out, in_rank = p.x, p.scales, p.torch_out, p.is_token_in_rank
            scales_info, E, alignment = p.scales_info, p.num_experts, p.expert_alignment
        else:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("topk_idx / topk_weights: must be None in cached mode (when a "
                                 "handle is given); the handle already fixes the routing")
            h = self._check_internode_handle(handle, "a cached dispatch")
            x, xname, x_info, scales, scales_info = self._validate_x(x)
            if x_info.shape[0] != h["is_token_in_rank"].shape[0]:
                raise ValueError(f"{xname}: the handle was made for "
                                 f"{h['is_token_in_rank'].shape[0]} tokens, got "
                                 f"{x_info.shape[0]}")
            torch_out, in_rank, E, alignment = x_info.kind == "torch", handle[0], None, 1
        cached = handle is not None
        if not self._cpu:
            return self._internode_dispatch_gpu(
                x, scales, scales_info, torch_out, in_rank, handle,
                None if cached else topk_idx, None if cached else topk_weights,
                None if cached else num_tokens_per_expert, E, alignment, config,
                previous_event, async_finish, allocate_on_comm_stream)
        from numba_ep.cpu import internode

        sc = device_view(scales, "x_scales")
        if sc is not None and sc.ndim == 1:
            sc = sc[:, None]
        with self._guard():
            res = internode.dispatch(
                self._context(), G, config.num_channels, device_view(x, "x"), sc,
                None if cached else device_view(topk_idx, "topk_idx"),
                None if cached else device_view(topk_weights, "topk_weights"),
                device_view(in_rank, "is_token_in_rank"),
                None if cached else device_view(num_tokens_per_expert, "num_tokens_per_expert"),
                E, alignment)
        recv_x = to_caller(res["recv_x"], torch_out, torch_dtype=x.dtype if torch_out else None)
        if scales is not None:
            out_sc = res["recv_x_scales"]  # the dtype of x_scales (float32 or int32)
            out_sc = out_sc[:, 0] if scales_info.ndim == 1 else out_sc
            recv_x = (recv_x, to_caller(out_sc, torch_out,
                                        torch_dtype=scales.dtype if torch_out else None))
        event = EventOverlap(None, torch_side=torch_out)
        if cached:
            return recv_x, None, None, None, None, event
        items = [to_caller(res[k], torch_out) for k in _INTERNODE_HANDLE_ITEMS]
        items[0] = in_rank
        out = _InternodeHandle(items)
        out.buffer_id, out.num_channels = self._id, config.num_channels
        return (recv_x, to_caller(res["recv_topk_idx"], torch_out),
                to_caller(res["recv_topk_weights"], torch_out),
                [int(v) for v in res["num_recv_tokens_per_expert_list"]], out, event)

    def _internode_combine(self, x, handle, topk_weights, bias, config, previous_event,
                           async_finish, allocate_on_comm_stream):
        self._check_events(previous_event, async_finish, allocate_on_comm_stream)
        self._check_config(config, "combine", self.get_combine_config)
        if handle is None:
            raise ValueError("handle: combine needs the handle its dispatch returned, got None")
        h = self._check_internode_handle(handle, "combine")
        N, T = h["recv_src_meta"].shape[0], h["is_token_in_rank"].shape[0]
        x_info = check_array(x, "x", dtypes=("bfloat16",), ndim=2, desc="[num_recv_tokens, hidden]",
                             device=self.device, row_multiple=16)
        if x_info.shape[0] != N:
            raise ValueError(f"x: expected shape [num_recv_tokens, hidden] = [{N}, *] (rows of "
                             f"the dispatch's recv_x), got {list(x_info.shape)}")
        H = x_info.shape[1]
        if topk_weights is not None:
            w_info = check_array(topk_weights, "topk_weights", dtypes=("float32",), ndim=2,
                                 desc="[num_recv_tokens, num_topk]", device=self.device)
            if w_info.shape[0] != N or not 1 <= w_info.shape[1] <= MAX_TOPK:
                raise ValueError(f"topk_weights: expected shape [num_recv_tokens, num_topk] = "
                                 f"[{N}, 1..{MAX_TOPK}], got {list(w_info.shape)}")
        b0, b1 = self._validate_bias(bias, T, H)
        if not self._cpu:
            return self._internode_combine_gpu(x, x_info, handle, h, topk_weights, b0, b1,
                                               previous_event, async_finish,
                                               allocate_on_comm_stream)
        from numba_ep.cpu import internode
        from numba_ep.reference import bfloat16

        def bf16(a, name):
            v = device_view(a, name)
            return None if v is None else np.asarray(v).view(bfloat16)

        torch_out = x_info.kind == "torch"
        with self._guard():
            combined, combined_w = internode.combine(
                self._context(), bf16(x, "x"), device_view(topk_weights, "topk_weights"), h,
                bf16(b0, "bias[0]"), bf16(b1, "bias[1]"))
        out = to_caller(combined.view(np.uint16), torch_out,
                        torch_dtype=x.dtype if torch_out else None,
                        dtype=None if torch_out else x.dtype)
        return (out, None if combined_w is None else to_caller(combined_w, torch_out),
                EventOverlap(None, torch_side=torch_out))

    def _internode_context(self):
        """The InternodeContext of this Buffer (created on first use). The first internode call
        after construction or after low-latency use zeroes the header of the NVSHMEM buffer
        between two barriers of the group (collective, like every internode call).

        The barriers are the group's host-side ones, not NVSHMEM barriers on the stream: those
        have no timeout, so a rank that never comes would hang this rank's stream, and every
        later synchronisation (even ``destroy``) with it. The group's barrier raises
        CommTimeoutError naming the missing rank instead (torch groups: after the process
        group's own timeout).
        This runs once per switch of mode, so the host waits here do not matter for speed."""
        from numba_ep.kernels import internode

        ctx = self._ictx
        if ctx is None:
            ctx = self._ictx = internode.InternodeContext(
                self._sym, self.rank, self.group_size, self.num_gpus_per_node,
                timeout_s=self.timeout_s)
        if self._ll_active != _INTERNODE_ACTIVE:
            if not self._host:   # (host mode, for tests, has no device memory to clear)
                import cupy
                import nvshmem.bindings as nvb

                from numba_ep.launch import stream_handle

                # Every rank's earlier work on this memory (its low-latency puts into peers) is
                # done before anyone clears; every header is clear before anyone notifies.
                nvb.quiet_on_stream(stream_handle(self._comm_stream))   # local: no peer waits
                self._comm_stream.synchronize()
                self.group.barrier()
                hdr = internode.header(self.group_size, ctx.num_nodes)["bytes"]
                cupy.cuda.runtime.memsetAsync(ctx.base, 0, hdr, self._comm_stream.ptr)
                self._comm_stream.synchronize()
                self.group.barrier()
            self._ll_active = _INTERNODE_ACTIVE
            self._ll_pending = None
        return ctx

    def _internode_dispatch_gpu(self, x, scales, scales_info, torch_out, in_rank, handle,
                                topk_idx, topk_weights, num_tokens_per_expert, E, alignment,
                                config, previous_event, async_finish, allocate):
        from numba_ep.kernels import internode

        xp = _xp(self)
        R, G = self.group_size, self.num_gpus_per_node
        C = config.num_channels
        cached = handle is not None
        with self._guard():
            call = _Call(self, torch_out, previous_event, async_finish, allocate)
            _refuse_capture(call, "dispatch")
            with call.on_caller():
                x_b = bytes_view(x, "x")
                sc = _scales_view(scales)
                topk = device_view(topk_idx, "topk_idx")
                weights = device_view(topk_weights, "topk_weights")
                in_rank_d = device_view(in_rank, "is_token_in_rank")
                per_expert = device_view(num_tokens_per_expert, "num_tokens_per_expert")
            call.begin()
            if topk is not None and not call.capturing:
                with call.on_comm():
                    check_expert_ids(topk, E, "topk_idx")
            ctx = self._internode_context()
            E_meta = 0 if cached or (topk is None and per_expert is None) else E
            T, K = x_b.shape[0], 0 if topk is None else topk.shape[1]
            # A cached dispatch of this Buffer's own handle knows its sizes: no host wait.
            known = (cached and getattr(handle, "buffer_id", None) == self._id
                     and getattr(handle, "max_tokens", None) is not None)
            with call.alloc():
                prefixes = internode.notify(ctx, in_rank_d, per_expert, E_meta, C, alignment,
                                            call.comm, counts=not known)
                if known:
                    num_recv = handle.dev["recv_src_meta"].shape[0]
                    num_rdma = handle.dev["send_nvl_head"].shape[0]
                    max_tokens, per_expert_list = handle.max_tokens, []
                else:
                    num_recv, num_rdma, max_tokens, per_expert_list = internode.wait_counts(
                        ctx, E_meta // R)
                recv_x_b = xp.empty((num_recv, x_b.shape[1]), dtype=np.uint8)
                recv_sc = (xp.empty((num_recv, sc.shape[1]), dtype=np.float32)
                           if sc is not None else None)
                recv_topk = xp.empty((num_recv, K), dtype=np.int64) if topk is not None else None
                recv_w = xp.empty((num_recv, K), dtype=np.float32) if topk is not None else None
                recv_meta = xp.empty((num_recv, 2), dtype=np.int32)
                rdma_head = xp.empty((T, R // G), dtype=np.int32)
                nvl_head = xp.empty((num_rdma, G), dtype=np.int32)
            internode.dispatch(ctx, x_b, sc, topk, weights, in_rank_d, prefixes, max_tokens,
                               E_meta, C, recv_x_b, recv_sc, recv_topk, recv_w, recv_meta,
                               rdma_head, nvl_head, call.comm)
            event = call.finish((x, scales, topk_idx, topk_weights, in_rank,
                                 num_tokens_per_expert, x_b, sc, topk, weights, in_rank_d,
                                 per_expert, *prefixes, recv_x_b, recv_sc, recv_topk, recv_w,
                                 recv_meta, rdma_head, nvl_head))
            with call.on_caller():
                recv_x = to_caller(recv_x_b, torch_out,
                                   torch_dtype=x.dtype if torch_out else None,
                                   dtype=None if torch_out else x.dtype)
                if recv_sc is not None:
                    out_sc = recv_sc[:, 0] if scales_info.ndim == 1 else recv_sc
                    sdt = scales.dtype
                    recv_x = (recv_x, to_caller(out_sc, torch_out,
                                                torch_dtype=sdt if torch_out else None,
                                                dtype=None if torch_out else sdt))
                if cached:
                    return recv_x, None, None, None, None, event
                dev = (in_rank_d, *prefixes, recv_meta, rdma_head, nvl_head)
                items = [in_rank] + [to_caller(a, torch_out) for a in dev[1:]]
                out = _InternodeHandle(items)
                out.buffer_id, out.num_channels, out.max_tokens = self._id, C, max_tokens
                out.dev = dict(zip(_INTERNODE_HANDLE_ITEMS, dev))
                return (recv_x, to_caller(recv_topk, torch_out), to_caller(recv_w, torch_out),
                        per_expert_list if E_meta else [], out, event)

    def _internode_combine_gpu(self, x, x_info, handle, h, topk_weights, b0, b1,
                               previous_event, async_finish, allocate):
        from numba_ep.kernels import internode

        xp = _xp(self)
        max_tokens = getattr(handle, "max_tokens", None)
        if max_tokens is None or getattr(handle, "buffer_id", None) != self._id:
            raise ValueError("handle: a GPU internode combine needs the handle object this "
                             "Buffer's dispatch returned (it carries the batch's largest token "
                             f"count), got a {type(handle).__name__}")
        torch_out = x_info.kind == "torch"
        T, H = h["is_token_in_rank"].shape[0], x_info.shape[1]
        C = h["gbl_channel_prefix_matrix"].shape[1]
        with self._guard():
            call = _Call(self, torch_out, previous_event, async_finish, allocate)
            _refuse_capture(call, "combine")
            with call.on_caller():
                xv = _as_u16(device_view(x, "x"))
                w = device_view(topk_weights, "topk_weights")
                bias0 = _as_u16(device_view(b0, "bias[0]"))
                bias1 = _as_u16(device_view(b1, "bias[1]"))
            call.begin()   # first: a header clear (after low-latency use) must follow the caller
            ctx = self._internode_context()
            with call.alloc():
                out = xp.empty((T, H), dtype=np.uint16)
                out_w = xp.empty((T, w.shape[1]), dtype=np.float32) if w is not None else None
            internode.combine(ctx, xv, w, handle.dev, max_tokens, bias0, bias1, out, out_w, C,
                              call.comm)
            event = call.finish((x, topk_weights, b0, b1, xv, w, bias0, bias1, out, out_w,
                                 *handle.dev.values()))
            with call.on_caller():
                combined = to_caller(out, torch_out, torch_dtype=x.dtype if torch_out else None,
                                     dtype=None if torch_out else x.dtype)
                combined_w = to_caller(out_w, torch_out)
        return combined, combined_w, event

    def _check_internode_handle(self, handle, what):
        """The 10 items of an internode dispatch handle as device (or host) views by name. A
        handle this Buffer's GPU dispatch made carries them already (``dev``; the tuple is
        immutable), so only foreign handles are checked and converted, item by item."""
        if getattr(handle, "buffer_id", None) == self._id and getattr(handle, "dev", None):
            return handle.dev
        if not isinstance(handle, (tuple, list)) or len(handle) != len(_INTERNODE_HANDLE_ITEMS):
            got = (f"a {type(handle).__name__} of length {len(handle)}"
                   if isinstance(handle, (tuple, list)) else type(handle).__name__)
            raise TypeError(f"handle: {what} needs the 10-item handle of an internode dispatch, "
                            f"got {got}")
        R, nodes = self.group_size, self.group_size // self.num_gpus_per_node
        infos = [check_array(a, f"handle[{i}] ({name})", device=self.device, contiguous=False)
                 for i, (name, a) in enumerate(zip(_INTERNODE_HANDLE_ITEMS, handle))]
        T = infos[0].shape[0]
        for i, shape in ((0, (T, R)), (4, (nodes,)), (6, (R,))):
            if infos[i].shape != shape:
                raise ValueError(f"handle[{i}] ({_INTERNODE_HANDLE_ITEMS[i]}): expected shape "
                                 f"{list(shape)} for {R} ranks on {nodes} nodes, got "
                                 f"{list(infos[i].shape)}")
        return {name: device_view(a, name) for name, a in zip(_INTERNODE_HANDLE_ITEMS, handle)}

    # --------------------------------------------------------------------------- low latency

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        """Zero the signal words of the NVSHMEM buffer for shape ``(M, hidden, num_experts)``
        and restart its call sequence (collective: every rank calls it, with the same shape).

        Needed before the first low-latency call of a new shape (this Buffer raises otherwise),
        and to start over after a receive hook was dropped. Runs on the caller's current stream
        (make the stream of the low-latency calls that follow current, or order the two). The
        host waits for that stream and meets the other ranks in two barriers of the group, so
        a rank that never calls it makes the others raise CommTimeoutError naming it (the
        group's timeout; torch groups: the process group's), and this Buffer is unusable after
        that.
        Under CUDA-graph capture the barriers are NVSHMEM's, on the stream, without a timeout.
        """
        what = "clean_low_latency_buffer"
        self._check_usable(what)
        M, H, E = self._check_ll_shape_args(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._check_ll_size(what, M, H, E)
        ll = self._kernels.low_latency

        with self._guard():
            ctx = self._ll_context(M, H, E)
            stream = self._ll_stream(torch_cuda_active())
            kw = {}
            if not self._host:
                import cupy

                # Outside graph capture the group's barriers (bounded, naming a missing rank)
                # stand in for NVSHMEM's (unbounded); a capture keeps NVSHMEM's, on the stream.
                if not cupy.cuda.runtime.streamIsCapturing(stream.ptr):
                    kw["host_barrier"] = self.group.barrier
            ll.clean_low_latency_buffer(ctx, stream, **kw)
            self._ll_active = (M, H, E)
            self._ll_pending = None
            self._ll_generation += 1

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        """Send every (token, top-k slot) to its expert's rank; receive my experts' tokens.

        Args (T tokens here, M = num_max_dispatch_tokens_per_rank, H hidden, K top-k, E experts,
        R ranks, L = E / R local experts):
            x: ``[T, H]`` BF16 (torch.bfloat16 / CuPy uint16), C-contiguous; ``T <= M``,
                ``H % 128 == 0``.
            topk_idx: ``[T, K]`` int64 global expert ids, -1 = unused slot; ``1 <= K <= 16``.
                Not range-checked (that would cost a host synchronisation per call).
            num_max_dispatch_tokens_per_rank: M, the same on every rank and every call of a
                sequence (a new (M, H, E) needs ``clean_low_latency_buffer`` first).
            num_experts: E, a multiple of R.
            cumulative_local_expert_recv_stats: optional ``[L] int32``, incremented by the
                number of tokens each local expert received.
            dispatch_wait_recv_cost_stats: optional ``[R] int64``: entry r grows by the
                nanoseconds the receive phase waited for rank r's tokens, summed over my local
                experts (DeepEP: clock cycles).
            use_fp8: cast to float8_e4m3fn with one float32 scale per 128 channels (else BF16).
            round_scale: power-of-two scales. use_ue8m0: scales as packed UE8M0 exponents
                (needs use_fp8, round_scale and ``H % 512 == 0``).
            async_finish: also return an event recorded after the kernels (see the module
                docstring, "Low-latency mode"). return_recv_hook: launch only the send phase and
                return a hook that launches the receive phase. Not both.

        Returns ``(recv_x, recv_count, handle, event, hook)``:
            recv_x: FP8: ``(x_fp8 [L, R*M, H] float8_e4m3fn (CuPy uint8), scales)`` with scales
            ``[L, R*M, H/128] float32`` (UE8M0: ``[L, R*M, H/512] int32``), column-major in the
            last two dims; BF16: ``[L, R*M, H]``. Only the first ``recv_count[i]`` rows of local
            expert i are valid. recv_count ``[L] int32``. handle ``(src_info [L, R*M] int32,
            layout_range [L, R] int64, M, H, E)``: ``src_info`` is the row's token index at its
            source rank, ``layout_range[i, r] = (begin << 32) | count`` the rows of expert i
            that came from rank r. event: an ``EventOverlap``. hook: a callable or None.
        All arrays are in the kind of ``x`` and complete once the receive phase has run on the
        caller's stream (after ``hook()`` in hook mode).
        """
        what = "low_latency_dispatch"
        p = self._ll_prologue(what, self._validate_ll_dispatch, (
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
            cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8,
            round_scale, use_ue8m0, async_finish, return_recv_hook))
        ll = self._kernels.low_latency

        stats, wait = cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats
        with self._guard():
            ctx = self._ll_context(p.M, p.H, p.E)
            if self._host:
                stream, kw = None, {}
                xv, topk = _as_u16(device_view(x, "x")), device_view(topk_idx, "topk_idx")
                stats = device_view(stats, "cumulative_local_expert_recv_stats")
                wait = device_view(wait, "dispatch_wait_recv_cost_stats")
            else:
                stream, kw = self._ll_gpu_call(p.torch_out)
                xv, topk = x, topk_idx
            recv_x, scales, count, src, lr, ll_hook = ll.low_latency_dispatch(
                ctx, xv, topk, use_fp8=p.use_fp8, round_scale=p.round_scale,
                use_ue8m0=p.use_ue8m0, cumulative_local_expert_recv_stats=stats,
                return_recv_hook=p.return_recv_hook, stream=stream, wait_recv_cost_stats=wait,
                **kw)
            self._ll_active = (p.M, p.H, p.E)
            hook = self._ll_hook(ll_hook, what)
            event = self._ll_event(stream, p.torch_out, p.async_finish, (
                x, topk_idx, cumulative_local_expert_recv_stats, xv, topk, stats, recv_x,
                scales, count, src, lr, dispatch_wait_recv_cost_stats, wait))
            dev = (src, lr)   # what the combine passes to the kernels
            if self._host:
                torch_out = p.torch_out
                if p.use_fp8:
                    recv_x = to_caller(recv_x, torch_out, torch_dtype=_torch_dtype(
                        "float8_e4m3fn") if torch_out else None)
                    scales = to_caller(scales, torch_out)
                else:
                    recv_x = to_caller(recv_x, torch_out,
                                       torch_dtype=x.dtype if torch_out else None,
                                       dtype=None if torch_out else x.dtype)
                src, lr = to_caller(src, torch_out), to_caller(lr, torch_out)
                count = to_caller(count, torch_out)
        recv = (recv_x, scales) if p.use_fp8 else recv_x
        handle = _LowLatencyHandle((src, lr, p.M, p.H, p.E))
        handle.buffer_id, handle.dev = self._id, dev
        return recv, count, handle, event, hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out=None,
                            combine_wait_recv_cost_stats=None):
        """Send my experts' outputs back to the tokens' ranks; take each token's weighted sum.

        Args (shapes as in ``low_latency_dispatch``):
            x: ``[L, R*M, H]`` BF16, C-contiguous: my local experts' outputs in the dispatch's
                packed layout (only rows below ``recv_count`` are read). With ``zero_copy`` the
                outputs are already in ``get_next_low_latency_combine_buffer(handle)`` and x
                (normally that very view, strided) is only shape-checked.
            topk_idx ``[T, K] int64`` and topk_weights ``[T, K] float32``: this rank's ORIGINAL
                routing (what its dispatch was given).
            handle: the dispatch's handle (same Buffer).
            use_logfmt: LogFMT-10 on the wire (``H <= 16384``; not with zero_copy).
            zero_copy: see x.
            async_finish, return_recv_hook: as in ``low_latency_dispatch`` (not both).
            out: optional ``[T, H]`` BF16, C-contiguous: written in place and returned.
            combine_wait_recv_cost_stats: optional ``[R] int64``: entry r grows by the
                nanoseconds the receive phase waited for rank r's rows (DeepEP: clock cycles).

        Returns ``(combined_x [T, H] BF16, event, hook)``, ``combined_x[t] = sum over k with
        topk_idx[t, k] >= 0 of topk_weights[t, k] * y_{topk_idx[t, k]}[t]`` (float32 sums), in
        the kind of ``x``; complete once the receive phase ran (after ``hook()``).
        """
        what = "low_latency_combine"
        p = self._ll_prologue(what, self._validate_ll_combine, (
            x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish,
            return_recv_hook, out, combine_wait_recv_cost_stats))
        ll = self._kernels.low_latency

        with self._guard():
            ctx = self._ll_context(p.M, p.H, p.E)
            src, lr = self._ll_handle_views(handle)
            wait = combine_wait_recv_cost_stats
            if self._host:
                stream, kw = None, {}
                xv, out_v = _as_u16(device_view(x, "x")), _as_u16(device_view(out, "out"))
                topk = device_view(topk_idx, "topk_idx")
                w = device_view(topk_weights, "topk_weights")
                wait = device_view(wait, "combine_wait_recv_cost_stats")
            else:
                stream, kw = self._ll_gpu_call(p.torch_out)
                xv, topk, w, out_v = x, topk_idx, topk_weights, out
            res, ll_hook = ll.low_latency_combine(
                ctx, xv, topk, w, src, lr, use_logfmt=p.use_logfmt, zero_copy=p.zero_copy,
                out=out_v, return_recv_hook=p.return_recv_hook, stream=stream,
                wait_recv_cost_stats=wait, **kw)
            self._ll_active = (p.M, p.H, p.E)
            hook = self._ll_hook(ll_hook, what)
            event = self._ll_event(stream, p.torch_out, p.async_finish,
                                   (x, topk_idx, topk_weights, handle, out, xv, topk, w, src, lr,
                                    out_v, res, combine_wait_recv_cost_stats, wait))
            if out is not None:
                return out, event, hook
            if self._host:
                res = to_caller(res, p.torch_out, torch_dtype=x.dtype if p.torch_out else None,
                                dtype=None if p.torch_out else x.dtype)
        return res, event, hook

    def get_next_low_latency_combine_buffer(self, handle):
        """The zero-copy input of the next ``low_latency_combine``: a BF16 view ``[L, R*M, H]``
        of the NVSHMEM send rows the next low-latency call uses (row stride ``H + H/128*2``
        elements, not contiguous), in the kind of ``handle[0]``. Write the expert outputs into
        it, then call ``low_latency_combine(view, ..., zero_copy=True)`` as the very next
        low-latency call. The view is overwritten by the calls after that."""
        what = "get_next_low_latency_combine_buffer"
        self._check_usable(what)
        M, H, E, infos = self._check_ll_handle(handle)
        self._check_ll_size(what, M, H, E)
        self._check_ll_sequence(what, M, H, E, hooks=False)
        ll = self._kernels.low_latency

        torch_out = infos[0].kind == "torch"
        with self._guard():
            ctx = self._ll_context(M, H, E)
            view = ll.next_combine_buffer(ctx)
            return to_caller(view, torch_out,
                             torch_dtype=_torch_dtype("bfloat16") if torch_out else None)

    def low_latency_update_mask_buffer(self, *args, **kwargs):
        """Shrink mode: not implemented yet (raises NotImplementedError)."""
        raise NotImplementedError(_SHRINK_MSG)

    def low_latency_query_mask_buffer(self, *args, **kwargs):
        """Shrink mode: not implemented yet (raises NotImplementedError)."""
        raise NotImplementedError(_SHRINK_MSG)

    def low_latency_clean_mask_buffer(self, *args, **kwargs):
        """Shrink mode: not implemented yet (raises NotImplementedError)."""
        raise NotImplementedError(_SHRINK_MSG)

    # ----------------------------------------------------------------- low latency: checks

    def _ll_gpu_call(self, torch_side):
        """``(stream handle, kernel-layer keywords)`` of a low-latency call on a GPU.

        The kernels run on the caller's current stream (torch's for torch callers, else
        CuPy's). They take the caller's arrays as they are, CuPy arrays or torch tensors, since
        they only read shapes and addresses (``checked``: this Buffer has checked the rest).
        Their outputs are CuPy arrays on that stream by default (CuPy callers' BF16 is uint16
        already); for torch callers ``empty`` makes torch tensors instead. A DLPack conversion
        or CuPy view per array made a torch caller's step cost 3.7 times a CuPy caller's host
        time."""
        kw = self._ll_kw.get(torch_side)
        if kw is None:
            kw = self._ll_kw[torch_side] = (
                {"checked": True, "empty": _torch_empty(self.device)} if torch_side
                else {"checked": True})
        return current_stream_handle(torch_side, self.device), kw

    def _ll_prologue(self, what, validate, args):
        """The start of every low-latency call: the Buffer is usable, the arguments pass
        ``validate`` (remembered, see below), and the call may come now (sequence rules)."""
        self._check_usable(what)
        p = self._ll_checked_plan(what, validate, args)
        self._check_ll_sequence(what, p.M, p.H, p.E)
        return p

    def _ll_checked_plan(self, kind, validate, args):
        """``validate(*args)``, remembered. A decoding loop passes arrays of the same shapes,
        dtypes, strides and devices and the same options call after call, so the outcome of the
        checks (a _LowLatencyPlan) is kept per key and the checks run once per key: the eager
        host time of a step is what a decoding step waits for. Ints and bools are keyed with
        their type (a ``True`` never stands in for a ``1``); arrays by ``array_key``; a handle
        only when this Buffer made it (its arrays are then this Buffer's own, in a tuple that
        cannot change). Anything else is checked in full every time. What depends on the
        Buffer's state (the call sequence) is the caller's to check, every call."""
        types = tuple(map(type, args))
        key = [kind, types]
        for a, t in zip(args, types):
            if t in _PLAIN_SCALARS:
                key.append(a)   # (with its type in ``types``)
            elif t is _LowLatencyHandle:
                if a.buffer_id != self._id:
                    return validate(*args)
                key.append((a.buffer_id, a[2], a[3], a[4]))
            else:
                k = array_key(a)
                if k is None:
                    return validate(*args)
                key.append(k)
        key = tuple(key)
        plan = self._ll_checked.get(key)
        if plan is None:
            plan = validate(*args)
            if len(self._ll_checked) >= 256:   # token counts vary: bound the memo
                self._ll_checked.clear()
            self._ll_checked[key] = plan
        return plan

    def _check_ll_shape_args(self, num_max_dispatch_tokens_per_rank, hidden, num_experts,
                             prefix=""):
        """Validate (M, H, E); ``prefix`` names where they came from (e.g. a handle)."""
        R = self.group_size
        M = _check_int(f"{prefix}num_max_dispatch_tokens_per_rank",
                       num_max_dispatch_tokens_per_rank, 1)
        H = _check_int(f"{prefix}hidden", hidden, 1)
        E = _check_int(f"{prefix}num_experts", num_experts, 1)
        if H % 128:
            raise ValueError(f"{prefix}hidden: low-latency mode needs a multiple of 128, got {H}")
        if E % R:
            raise ValueError(f"{prefix}num_experts: expected a multiple of the rank count {R}, "
                             f"got {E}")
        if E // R > LL_MAX_LOCAL_EXPERTS:
            raise ValueError(f"{prefix}num_experts: at most {LL_MAX_LOCAL_EXPERTS} experts per "
                             f"rank in low-latency mode, got {E} experts over {R} ranks")
        return M, H, E

    def _check_ll_size(self, what, M, H, E):
        R = self.group_size
        # The hint lays out the whole buffer (~15 us of Python): once per shape and Buffer.
        need = self._ll_need.get((M, H, E))
        if need is None:
            need = self._ll_need[(M, H, E)] = int(self.get_low_latency_rdma_size_hint(M, H, R, E))
        have = 0 if self._sym is None else int(self._sym.nbytes)
        if need > have:
            raise ValueError(
                f"num_rdma_bytes: {what} with num_max_dispatch_tokens_per_rank={M}, hidden={H}, "
                f"num_ranks={R}, num_experts={E} needs {need} bytes of NVSHMEM buffer "
                f"(Buffer.get_low_latency_rdma_size_hint({M}, {H}, {R}, {E})) but the Buffer has "
                f"{have}; construct it with Buffer(group, num_rdma_bytes={need}, "
                "low_latency_mode=True) or more")

    def _check_ll_sequence(self, what, M, H, E, hooks=True):
        """The NVSHMEM buffer is laid out for one shape at a time, and (``hooks``) a receive
        hook must run before the next low-latency call."""
        active = self._ll_active
        if active == _INTERNODE_ACTIVE:
            raise ValueError(
                f"{what}: the NVSHMEM buffer was last used by internode dispatch/combine; call "
                f"clean_low_latency_buffer({M}, {H}, {E}) on every rank first")
        if active is not None and active != (M, H, E):
            raise ValueError(
                f"{what}: the low-latency buffer is in use for num_max_dispatch_tokens_per_rank="
                f"{active[0]}, hidden={active[1]}, num_experts={active[2]}; a new shape (M={M}, "
                f"H={H}, E={E}) needs clean_low_latency_buffer({M}, {H}, {E}) on every rank first")
        pending = self._ll_pending
        if hooks and pending is not None and not pending.called:
            raise RuntimeError(
                f"{what}: the receive hook of the previous {pending.what} has not been called; "
                "call it first (a receive phase must run before the next low-latency call), or "
                "call clean_low_latency_buffer(...) on every rank to start over")

    def _check_ll_flags(self, async_finish, return_recv_hook):
        async_finish = _check_flag("async_finish", async_finish)
        return_recv_hook = _check_flag("return_recv_hook", return_recv_hook)
        if async_finish and return_recv_hook:
            raise ValueError("async_finish=True and return_recv_hook=True are mutually exclusive "
                             "(DeepEP's rule): with a hook the receive phase has not run yet, so "
                             "there is nothing to wait for")
        return async_finish, return_recv_hook

    def _check_cost_stats(self, stats, name):
        if stats is not None:
            check_array(stats, name, dtypes=("int64",), shape=(self.group_size,),
                        desc="[num_ranks]", device=self.device)

    def _validate_ll_dispatch(self, x, topk_idx, M, E, stats, wait_stats, use_fp8, round_scale,
                              use_ue8m0, async_finish, return_recv_hook) -> _LowLatencyPlan:
        dev = self.device
        use_fp8 = _check_flag("use_fp8", use_fp8)
        round_scale = _check_flag("round_scale", round_scale)
        use_ue8m0 = _check_flag("use_ue8m0", use_ue8m0)
        async_finish, return_recv_hook = self._check_ll_flags(async_finish, return_recv_hook)
        M = _check_int("num_max_dispatch_tokens_per_rank", M, 1)
        x_info = check_array(x, "x", dtypes=("bfloat16",), ndim=2, desc="[num_tokens, hidden]",
                             device=dev)
        T, H = x_info.shape
        if T > M:
            raise ValueError(f"x: {T} tokens, more than num_max_dispatch_tokens_per_rank={M} "
                             f"(shape {list(x_info.shape)})")
        if H == 0 or H % 128:
            raise ValueError(f"x: low-latency mode needs a hidden size that is a positive "
                             f"multiple of 128, got shape {list(x_info.shape)}")
        M, H, E = self._check_ll_shape_args(M, H, E)
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError("use_ue8m0=True needs use_fp8=True and round_scale=True")
        if use_ue8m0 and H % 512:
            raise ValueError(f"use_ue8m0=True needs a hidden size that is a multiple of 512, got "
                             f"{H}")
        k_info = check_array(topk_idx, "topk_idx", dtypes=("int64",), ndim=2,
                             desc="[num_tokens, num_topk]", device=dev)
        if k_info.shape[0] != T or not 1 <= k_info.shape[1] <= LL_MAX_TOPK:
            raise ValueError(f"topk_idx: expected shape [num_tokens, num_topk] = [{T}, "
                             f"1..{LL_MAX_TOPK}], got {list(k_info.shape)}")
        if stats is not None:
            check_array(stats, "cumulative_local_expert_recv_stats", dtypes=("int32",),
                        shape=(E // self.group_size,), desc="[num_local_experts]", device=dev)
        self._check_cost_stats(wait_stats, "dispatch_wait_recv_cost_stats")
        self._check_ll_size("low_latency_dispatch", M, H, E)
        return _LowLatencyPlan(torch_out=x_info.kind == "torch", M=M, H=H, E=E,
                               use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
                               async_finish=async_finish, return_recv_hook=return_recv_hook)

    def _check_ll_handle(self, handle):
        """Validate a low-latency handle; return (M, H, E, (src_info info, layout_range info))."""
        if not isinstance(handle, tuple) or len(handle) != 5:
            raise TypeError("handle: expected the 5-tuple (src_info, layout_range, "
                            "num_max_dispatch_tokens_per_rank, hidden, num_experts) that "
                            f"low_latency_dispatch returned, got {type(handle).__name__}"
                            + (f" of length {len(handle)}" if isinstance(handle, tuple) else ""))
        owner = getattr(handle, "buffer_id", None)
        if owner is not None and owner != self._id:
            alive = owner in _live_buffers
            raise ValueError(f"handle: made by another Buffer (#{owner}, "
                             f"{'still alive' if alive else 'since destroyed'}); a handle is "
                             f"only valid with the Buffer whose dispatch returned it (this is "
                             f"#{self._id})")
        M, H, E = self._check_ll_shape_args(handle[2], handle[3], handle[4], prefix="handle: ")
        R, dev = self.group_size, self.device
        L = E // R
        i0 = check_array(handle[0], "handle[0] (src_info)", dtypes=("int32",), shape=(L, R * M),
                         desc="[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank]",
                         device=dev)
        i1 = check_array(handle[1], "handle[1] (layout_range)", dtypes=("int64",), shape=(L, R),
                         desc="[num_local_experts, num_ranks]", device=dev)
        return M, H, E, (i0, i1)

    def _validate_ll_combine(self, x, topk_idx, topk_weights, handle, use_logfmt, zero_copy,
                             async_finish, return_recv_hook, out, wait_stats) -> _LowLatencyPlan:
        dev, R = self.device, self.group_size
        use_logfmt = _check_flag("use_logfmt", use_logfmt)
        zero_copy = _check_flag("zero_copy", zero_copy)
        async_finish, return_recv_hook = self._check_ll_flags(async_finish, return_recv_hook)
        if use_logfmt and zero_copy:
            raise ValueError("use_logfmt=True cannot be combined with zero_copy=True (the "
                             "zero-copy rows are sent as they are)")
        M, H, E, _ = self._check_ll_handle(handle)
        L = E // R
        if use_logfmt and H > LL_LOGFMT_MAX_HIDDEN:
            raise ValueError(f"use_logfmt=True supports hidden sizes up to "
                             f"{LL_LOGFMT_MAX_HIDDEN}, got {H}")
        x_info = check_array(x, "x", dtypes=("bfloat16",), shape=(L, R * M, H),
                             desc="[num_local_experts, num_ranks * "
                                  "num_max_dispatch_tokens_per_rank, hidden]",
                             device=dev, contiguous=not zero_copy)
        k_info = check_array(topk_idx, "topk_idx", dtypes=("int64",), ndim=2,
                             desc="[num_tokens, num_topk]", device=dev)
        T, K = k_info.shape
        if T > M or not 1 <= K <= LL_MAX_TOPK:
            raise ValueError(f"topk_idx: expected shape [num_tokens, num_topk] with num_tokens <= "
                             f"num_max_dispatch_tokens_per_rank={M} and 1 <= num_topk <= "
                             f"{LL_MAX_TOPK}, got {list(k_info.shape)}")
        check_array(topk_weights, "topk_weights", dtypes=("float32",), shape=(T, K),
                    desc="[num_tokens, num_topk]", device=dev)
        if out is not None:
            check_array(out, "out", dtypes=("bfloat16",), shape=(T, H),
                        desc="[num_tokens, hidden]", device=dev)
        self._check_cost_stats(wait_stats, "combine_wait_recv_cost_stats")
        self._check_ll_size("low_latency_combine", M, H, E)
        return _LowLatencyPlan(torch_out=x_info.kind == "torch", M=M, H=H, E=E,
                               use_logfmt=use_logfmt, zero_copy=zero_copy,
                               async_finish=async_finish, return_recv_hook=return_recv_hook)

    # ----------------------------------------------------------------- low latency: plumbing

    def _ll_context(self, M, H, E):
        """The LowLatencyContext of shape (M, H, E) over the NVSHMEM buffer (cached)."""
        ll = self._kernels.low_latency

        ctx = self._ll_ctxs.get((M, H, E))
        if ctx is None:
            if self._cpu:
                ctx = ll.LowLatencyContext(self.group, M, H, E, timeout_s=self.timeout_s)
            else:
                ctx = ll.LowLatencyContext(self._sym, self.rank, self.group_size, M, H, E,
                                           timeout_s=self.timeout_s)
            self._ll_ctxs[(M, H, E)] = ctx
        return ctx

    def _ll_stream(self, torch_side):
        """The caller's current stream (kernels of low-latency mode run there); None in host
        mode."""
        if self._host:
            return None
        return caller_stream(torch_side, self.device if torch_side else None)

    def _ll_event(self, stream, torch_side, async_finish, keep) -> EventOverlap:
        """``stream``: a raw handle (None in host mode)."""
        if self._host or not async_finish:
            return EventOverlap(None, torch_side=torch_side)
        return EventOverlap(record_event(stream),
                            extra_tensors=tuple(k for k in keep if k is not None),
                            torch_side=torch_side)

    def _ll_hook(self, ll_hook, what):
        if ll_hook is None:
            return None
        hook = _LowLatencyHook(self, ll_hook, what)
        self._ll_pending = hook
        return hook

    def _ll_handle_views(self, handle):
        dev = getattr(handle, "dev", None)
        if dev is not None and getattr(handle, "buffer_id", None) == self._id:
            return dev
        return device_view(handle[0], "handle[0]"), device_view(handle[1], "handle[1]")


# -------------------------------------------------------------------------------------------------
# small helpers
# -------------------------------------------------------------------------------------------------

def _device_kernels():
    """The GPU kernel modules a Buffer calls (tests replace functions in them)."""
    from types import SimpleNamespace

    from numba_ep.kernels import intranode, layout, low_latency

    return SimpleNamespace(intranode=intranode, layout=layout, low_latency=low_latency)


def _cpu_backend_selected() -> bool:
    """``NUMBA_EP_BACKEND=cpu``, or no CUDA GPU visible (and not ``NUMBA_EP_BACKEND=cuda``)."""
    choice = os.environ.get("NUMBA_EP_BACKEND", "").strip().lower()
    if choice not in ("", "cpu", "cuda"):
        raise ValueError(f"NUMBA_EP_BACKEND: expected 'cpu' or 'cuda' (or unset), got {choice!r}")
    if choice:
        return choice == "cpu"
    return _no_gpu()


@functools.lru_cache(maxsize=1)
def _no_gpu() -> bool:
    from numba_ep.group import gpu_count

    return gpu_count() == 0


def _scales_view(scales):
    """The kernels' view of a dispatch's ``x_scales`` (None stays None): float32 ``[T, S]``
    with the caller's strides; int32 UE8M0 words travel as raw 32-bit values, and ``[T]``
    scales become ``[T, 1]``."""
    sc = device_view(scales, "x_scales")
    if sc is None:
        return None
    if sc.dtype != np.float32:
        sc = sc.view(np.float32)
    return sc[:, None] if sc.ndim == 1 else sc


def _refuse_capture(call, what):
    """Internode calls cannot be captured in a CUDA graph: each call passes new epoch values to
    its kernels, which a replay would repeat (its waits would pass at once, on stale flags),
    and a dispatch without this Buffer's own handle also waits on the host for notify's
    counts."""
    if call.capturing:
        raise RuntimeError(
            f"{what}: internode mode cannot be captured in a CUDA graph (every call's kernels "
            f"take new epoch values that a replay would repeat); run it eagerly, or keep the "
            f"ranks on one node for graph capture")


_error_record_fn = None


def _error_record():
    """The process's kernel error record (``numba_ep.kernels.waits.error_record()``). Imported
    on first use: a ``from ... import`` runs importlib's Python code on every execution (~1 us),
    and every low-latency call checks the record."""
    global _error_record_fn
    if _error_record_fn is None:
        from numba_ep.kernels.waits import error_record

        _error_record_fn = error_record
    return _error_record_fn()


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


class _DeviceGuard:
    """See ``Buffer._guard``. A plain class: the eager low-latency path enters it twice per
    step, and a generator-based context manager plus ``cupy.cuda.Device`` cost ~1.7 us there."""

    __slots__ = ("_buf", "_prev")
    _runtime = None   # cupy.cuda.runtime, imported on first use (see _error_record)

    def __init__(self, buf):
        self._buf = buf
        self._prev = None

    def __enter__(self):
        buf = self._buf
        if not buf._host:
            runtime = _DeviceGuard._runtime
            if runtime is None:
                from cupy.cuda import runtime

                _DeviceGuard._runtime = runtime
            cur = runtime.getDevice()
            if cur != buf.device:
                runtime.setDevice(buf.device)
                self._prev = cur
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._prev is not None:
            _DeviceGuard._runtime.setDevice(self._prev)
        if exc_type is not None and issubclass(exc_type, CommTimeoutError):
            self._buf._broken = f"CommTimeoutError: {exc}"
        return False


def _torch_empty(device):
    """The low-latency kernels' output allocator for torch callers: torch tensors on
    ``device`` (torch's current stream), with the kernels' carrier dtypes as torch dtypes."""
    import torch

    dtypes = {np.uint8: torch.float8_e4m3fn, np.uint16: torch.bfloat16, np.int32: torch.int32,
              np.int64: torch.int64, np.float32: torch.float32}
    dev = torch.device("cuda", device)

    def empty(shape, dtype):
        return torch.empty(shape, dtype=dtypes[dtype], device=dev)
    return empty


def _torch_dtype(name):
    import torch

    return getattr(torch, name)


def _allocate_symmetric(group, device, nbytes, allow_mnnvl):
    """Join (or start) this process's NVSHMEM world and allocate ``nbytes`` of symmetric
    memory (collective). On failure the NVSHMEM reference is dropped again."""
    import os

    from numba_ep.memory import SymmetricBuffer, nvshmem_finalize, nvshmem_init, nvshmem_runtime

    global _heap_env_ours
    if not allow_mnnvl:
        os.environ.setdefault("NVSHMEM_DISABLE_MNNVL", "1")
    if nvshmem_runtime() is None:
        # The heap is sized once, when NVSHMEM starts. A size this module set for an earlier
        # (since finalised) world is raised when this buffer needs more; a user's is kept.
        want = str(nbytes + _NVSHMEM_HEAP_MARGIN)
        cur = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
        if cur is None or (cur == _heap_env_ours and int(cur) < int(want)):
            os.environ["NVSHMEM_SYMMETRIC_SIZE"] = _heap_env_ours = want
    nvshmem_init(group, device)
    try:
        return SymmetricBuffer(nbytes)
    except CommTimeoutError:
        # A rank never came to the allocation: nvshmem_finalize would wait for it (no timeout),
        # so this process keeps its NVSHMEM reference, as destroy() does after such an error.
        raise
    except BaseException:
        nvshmem_finalize()
        raise


def _resolve_gpus_per_node(group) -> int:
    """Ranks per node (NVLink domain): env ``NUMBA_EP_GPUS_PER_NODE`` (a divisor of the rank
    count: also to emulate several nodes on one machine); else the ranks sharing this host when
    the group spans several hosts; else all ranks up to 8 (DeepEP's node size)."""
    R = int(group.size)
    env = os.environ.get("NUMBA_EP_GPUS_PER_NODE", "").strip()
    if env:
        G = int(env) if env.isdigit() else 0
        if not 1 <= G <= R or R % G:
            raise ValueError(f"NUMBA_EP_GPUS_PER_NODE: expected a divisor of the rank count {R}, "
                             f"got {env!r}")
        return G
    local = int(getattr(group, "local_size", R) or R)
    if local < R and R % local == 0:
        return local
    return R if R <= MAX_RANKS else MAX_RANKS


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
