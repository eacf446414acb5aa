"""Memory the ranks share: NVLink buffers by CUDA IPC, and NVSHMEM symmetric buffers.

Kernels never receive peer *arrays*: they receive a device table of ``uint64`` base addresses, one
per rank, valid in this process (``peer_ptrs_dev``), and turn ``addr + offset`` into typed pointers.
This module builds those tables.

IpcBuffer (intranode normal mode; no NVSHMEM needed)
----------------------------------------------------
Each rank allocates one plain ``cudaMalloc`` block (``cupy.cuda.Memory``, never CuPy's pool: an
IPC handle names a whole allocation and the peer opens that allocation's base), zero-fills it,
exports its IPC handle, and opens every peer's handle. Layout of every rank's block (offsets in
bytes; the same on every rank, so ``ptrs[r] + offset`` addresses rank r's copy of a field):

    [0, nbytes)                                data: the caller's region (nbytes rounded up to 128)
    [signal_offset, signal_offset + 4096)      signals: 1024 int32, zero at start; the intranode
                                               barrier kernel owns them (by convention slot p
                                               counts arrivals from rank p); signal_offset is
                                               nbytes rounded up to 4096
    total = signal_offset + 4096 bytes

Who waits on whom: construction is collective (two all-gathers: handles, then "opened" status);
a rank returns only after every rank has zeroed its block and opened every peer's handle, so the
first kernel may write to peers at once. ``close()`` is collective too: barrier (no rank still
uses any block), close the peer handles, barrier (no rank still maps mine), free.

NVSHMEM (low-latency and internode modes)
-----------------------------------------
``nvshmem_init(group, device)`` starts one NVSHMEM world per process by unique id (rank 0 makes
the id, the group broadcasts it); it is reference counted, and the last ``nvshmem_finalize()``
tears it down. ``SymmetricBuffer(nbytes)`` is a collective ``nvshmem_malloc``: **every rank must
create and close symmetric buffers in the same order and with the same sizes.** Its
``peer_ptrs[pe]`` is the peer's copy as mapped into this process (``nvshmem_ptr``), or 0 where the
peer is not reachable by loads and stores (then use NVSHMEM put/get). Multicast (NVLS) stays off.
"""
from __future__ import annotations

import numbers
import os
import pickle
import traceback

import numpy as np

from numba_ep.errors import NumbaEPError
from numba_ep.group import _host_key, as_group, current_device

__all__ = [
    "IpcBuffer",
    "IpcLayout",
    "ipc_layout",
    "NvshmemRuntime",
    "SymmetricBuffer",
    "nvshmem_init",
    "nvshmem_finalize",
    "nvshmem_environment",
    "ALIGNMENT",
    "SIGNAL_REGION_BYTES",
]

ALIGNMENT = 128               # every buffer size is a multiple of this (DeepEP's rule)
SIGNAL_ALIGN = 4096           # the signal region starts on a 4 KiB boundary
SIGNAL_REGION_BYTES = 4096    # 1024 int32 signal slots per rank


def _round_up(n, m):
    return (n + m - 1) // m * m


def _check_nbytes(nbytes, who):
    if not isinstance(nbytes, numbers.Integral) or isinstance(nbytes, bool):
        raise TypeError(f"{who}: nbytes must be an int, got {type(nbytes).__name__}")
    nbytes = int(nbytes)
    if nbytes < 0:
        raise ValueError(f"{who}: nbytes must be >= 0, got {nbytes}")
    return nbytes


class IpcLayout(tuple):
    """(nbytes, signal_offset, alloc_bytes) of an IpcBuffer block."""

    __slots__ = ()

    def __new__(cls, nbytes, signal_offset, alloc_bytes):
        return tuple.__new__(cls, (nbytes, signal_offset, alloc_bytes))

    nbytes = property(lambda self: self[0])
    signal_offset = property(lambda self: self[1])
    alloc_bytes = property(lambda self: self[2])

    def __repr__(self):
        return (f"IpcLayout(nbytes={self[0]}, signal_offset={self[1]}, alloc_bytes={self[2]})")


def ipc_layout(nbytes) -> IpcLayout:
    """The block layout an ``IpcBuffer(group, nbytes)`` uses (see the module docstring)."""
    n = _round_up(_check_nbytes(nbytes, "ipc_layout"), ALIGNMENT)
    sig = _round_up(n, SIGNAL_ALIGN)
    return IpcLayout(n, sig, sig + SIGNAL_REGION_BYTES)


def _device_u64(values, device):
    import cupy

    with cupy.cuda.Device(device):
        return cupy.asarray(np.asarray(values, dtype=np.uint64))


def _wrap(ptr, nbytes, owner, device, dtype=None):
    """A CuPy array over ``nbytes`` at ``ptr``, mapped in (and used from) ``device``."""
    import cupy

    # device_id must be OUR device: for a peer pointer CUDA would report the owner's device, and
    # CuPy would then refuse to use the array on the current one.
    mem = cupy.cuda.UnownedMemory(int(ptr), int(nbytes), owner, device)
    arr = cupy.ndarray((int(nbytes),), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
    return arr if dtype is None else arr.view(dtype)


def _raise_gathered(what, statuses):
    bad = {r: s["error"] for r, s in enumerate(statuses) if s.get("error")}
    if bad:
        lines = "\n".join(f"  rank {r}: {msg.strip()}" for r, msg in sorted(bad.items()))
        raise NumbaEPError(f"{what} failed on rank(s) {', '.join(map(str, sorted(bad)))}:\n{lines}")


# -------------------------------------------------------------------------------------------------
# IpcBuffer
# -------------------------------------------------------------------------------------------------


class IpcBuffer:
    """One zero-filled cudaMalloc block per rank, every peer's block opened by CUDA IPC.

    Attributes:
      ``group``, ``rank``, ``size``, ``device`` (this rank's CUDA device id);
      ``nbytes`` (data bytes, multiple of 128), ``signal_offset``, ``alloc_bytes``;
      ``ptrs[r]``: base address of rank r's block in this process (own block at ``ptrs[rank]``);
      ``peer_ptrs_dev``: the same as a CuPy uint64 array [size], for kernels;
      ``signal_ptrs[r]`` = ``ptrs[r] + signal_offset``, and ``signal_ptrs_dev``;
      ``local``: CuPy uint8 array over this rank's data region; ``signals``: int32 [1024] over
      this rank's signal region.
    Every rank must pass the same ``nbytes``; all ranks must be on this host.
    """

    def __init__(self, group, nbytes, device=None):
        layout = ipc_layout(_check_nbytes(nbytes, "IpcBuffer"))
        self.group = group = as_group(group)
        self.rank, self.size = group.rank, group.size
        self.nbytes, self.signal_offset, self.alloc_bytes = layout
        self.device = None
        self.ptrs = []
        self.signal_ptrs = []
        self.peer_ptrs_dev = self.signal_ptrs_dev = None
        self.local = self.signals = None
        self._mem = None
        self._opened = {}   # rank -> pointer opened with ipcOpenMemHandle
        self._closed = False

        # Step 1, local: pick the device, allocate, zero, export. Errors travel in the all-gather
        # so that every rank raises the same error instead of some of them waiting forever.
        mine = {"host": _host_key(), "pid": os.getpid(), "nbytes": self.nbytes,
                "device": None, "handle": None, "error": None}
        try:
            import cupy

            self.device = current_device(group) if device is None else int(device)
            with cupy.cuda.Device(self.device):
                self._mem = cupy.cuda.Memory(self.alloc_bytes)
                cupy.cuda.runtime.memset(self._mem.ptr, 0, self.alloc_bytes)
                cupy.cuda.runtime.deviceSynchronize()
                if self.size > 1:
                    mine["handle"] = bytes(cupy.cuda.runtime.ipcGetMemHandle(self._mem.ptr))
            mine["device"] = self.device
        except Exception as e:
            mine["error"] = _describe(e, "allocating the IPC buffer (does this process see a CUDA GPU?)")
        try:
            everyone = group.allgather_object(mine)
            _raise_gathered("IpcBuffer", everyone)
            sizes = sorted({s["nbytes"] for s in everyone})
            if len(sizes) > 1:
                raise NumbaEPError(
                    "IpcBuffer: every rank must ask for the same nbytes; got "
                    + ", ".join(f"rank {r}: {s['nbytes']}" for r, s in enumerate(everyone)))
            away = [r for r, s in enumerate(everyone) if s["host"] != mine["host"]]
            if away:
                raise NumbaEPError(
                    f"IpcBuffer: CUDA IPC needs every rank on one host, but rank(s) "
                    f"{', '.join(map(str, away))} run on another host than rank {self.rank}. "
                    "Use NVSHMEM (SymmetricBuffer) across hosts.")

            # Step 2: open every peer's handle; again gather the outcome so all ranks agree.
            status = {"error": None}
            try:
                import cupy

                with cupy.cuda.Device(self.device):
                    for r, s in enumerate(everyone):
                        if r != self.rank:
                            self._opened[r] = int(cupy.cuda.runtime.ipcOpenMemHandle(
                                s["handle"], cupy.cuda.runtime.cudaIpcMemLazyEnablePeerAccess))
            except Exception as e:
                status["error"] = _describe(
                    e, f"opening the peers' IPC handles on device {self.device} "
                       f"(peer devices: {[s['device'] for s in everyone]})")
            _raise_gathered("IpcBuffer: opening CUDA IPC handles", group.allgather_object(status))
        except BaseException:
            self._release_local()
            raise

        base = int(self._mem.ptr)
        self.ptrs = [base if r == self.rank else self._opened[r] for r in range(self.size)]
        self.signal_ptrs = [p + self.signal_offset for p in self.ptrs]
        self.peer_ptrs_dev = _device_u64(self.ptrs, self.device)
        self.signal_ptrs_dev = _device_u64(self.signal_ptrs, self.device)
        import cupy

        # Views of our own block hold the cupy Memory (not self), so no reference cycle.
        self.local = cupy.ndarray((self.nbytes,), dtype=cupy.uint8,
                                  memptr=cupy.cuda.MemoryPointer(self._mem, 0))
        self.signals = cupy.ndarray((SIGNAL_REGION_BYTES // 4,), dtype=cupy.int32,
                                    memptr=cupy.cuda.MemoryPointer(self._mem, self.signal_offset))

    def peer(self, r, dtype=None):
        """A CuPy array over rank r's data region (``nbytes`` bytes, uint8 or ``dtype``)."""
        if self._closed:
            raise NumbaEPError("IpcBuffer is closed")
        if not (0 <= r < self.size):
            raise IndexError(f"rank {r} is not in a group of size {self.size}")
        if r == self.rank and self.local is not None:
            return self.local if dtype is None else self.local.view(dtype)
        return _wrap(self.ptrs[r], self.nbytes, self, self.device, dtype)

    @property
    def closed(self):
        return self._closed

    def close(self, barrier=True):
        """Close the peers' handles and free this rank's block. Idempotent.

        With ``barrier=True`` (the default) this is a collective: it waits until every rank is
        done with every block before unmapping and freeing. ``barrier=False`` skips the waits
        (for error paths; peers must not touch this rank's block afterwards).
        """
        if self._closed:
            return
        self._closed = True
        import cupy

        synced = False
        try:
            if barrier and self.size > 1:
                with cupy.cuda.Device(self.device):
                    cupy.cuda.runtime.deviceSynchronize()
                self.group.barrier()  # nobody uses any block any more
                synced = True
        finally:
            self.peer_ptrs_dev = self.signal_ptrs_dev = None
            self.local = self.signals = None
            # second barrier (nobody maps my block any more) only if the first one worked
            self._release_local(barrier=synced)

    def _release_local(self, barrier=False):
        import cupy

        errors = []
        if self._opened:
            with cupy.cuda.Device(self.device):
                for r, p in sorted(self._opened.items()):
                    try:
                        cupy.cuda.runtime.ipcCloseMemHandle(p)
                    except Exception as e:  # keep closing the others
                        errors.append(f"rank {r}: {e}")
            self._opened = {}
        if barrier and self.size > 1:
            self.group.barrier()
        self._mem = None  # cudaFree (arrays still referencing it keep it alive until dropped)
        self._closed = True
        if errors:
            raise NumbaEPError("IpcBuffer.close: closing peer handles failed: " + "; ".join(errors))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(barrier=exc_type is None)

    def __del__(self):
        try:
            if not self._closed and self._mem is not None:
                self.close(barrier=False)
        except Exception:
            pass

    def __repr__(self):
        state = "closed" if self._closed else f"device={self.device}"
        return (f"IpcBuffer(rank={self.rank}/{self.size}, nbytes={self.nbytes}, "
                f"alloc_bytes={self.alloc_bytes}, {state})")


def _describe(e, doing):
    """One rank's failure as text for the all-gather (a traceback only for unexpected errors)."""
    text = f"{doing}: {type(e).__name__}: {e}"
    if not isinstance(e, NumbaEPError):
        text += "\n" + traceback.format_exc(limit=-3)
    return text


# -------------------------------------------------------------------------------------------------
# NVSHMEM
# -------------------------------------------------------------------------------------------------

_RUNTIME = None  # the NvshmemRuntime of this process while NVSHMEM is initialized


def nvshmem_environment(all_local: bool) -> dict:
    """Set (only where unset) the NVSHMEM environment numba_ep needs; return what it set.

    ``NVSHMEM_DISABLE_NVLS=1`` always (multicast must stay off on the shared machines). When
    every rank runs on this host: ``NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo``, and
    ``NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=1``. NVSHMEM's proxy thread otherwise spins a whole core
    per rank for the life of the process (a thread at 100 % CPU beside Python's, seen on 1×H100),
    and on one host it has nothing to carry: NVSHMEM honours the variable only where no network
    transport is in use (peers reached over NVLink or PCIe peer access), and what the thread
    would still serve (device-side global exit, NVSHMEM's own device-side wait timeouts) numba_ep
    does not use; its kernels bound their waits with ``%globaltimer`` themselves. Set it to 0 to
    keep the thread.
    """
    wanted = {"NVSHMEM_DISABLE_NVLS": "1"}
    if all_local:
        wanted["NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"] = "lo"
        wanted["NVSHMEM_DISABLE_LOCAL_ONLY_PROXY"] = "1"
    done = {}
    for k, v in wanted.items():
        if k not in os.environ:
            os.environ[k] = v
            done[k] = v
    return done


def check_gpu_sharing(gpus):
    """Refuse, before NVSHMEM starts, a world where GPUs hold different numbers of ranks;
    ``gpus[r]`` is rank r's ``(host, GPU uuid)``.

    Several ranks on one GPU work when every GPU holds as many (6 ranks on 2 H100s, 8 on 4).
    At 3 ranks on 2 GPUs NVSHMEM's init aborted (the PEs sharing a GPU run their host
    collectives without NCCL, the lone one with it, and NVSHMEM refuses the mix) and, with NCCL
    turned off on every rank, hung inside ``nvshmem.core.init`` on all three: a clear error here
    beats both."""
    per_gpu = {}
    for rank, gpu in enumerate(gpus):
        per_gpu.setdefault(gpu, []).append(rank)
    if len({len(r) for r in per_gpu.values()}) > 1:
        shares = "; ".join(
            f"{'ranks' if len(r) > 1 else 'rank'} {', '.join(map(str, r))} on GPU {uuid} of "
            f"{host.split('/')[0]}" for (host, uuid), r in per_gpu.items())
        raise NumbaEPError(
            f"nvshmem_init: NVSHMEM needs the same number of ranks on every GPU, got {shares}. "
            "Run one rank per GPU (or as many on each GPU): with an uneven split NVSHMEM's init "
            "fails or hangs")


class NvshmemRuntime:
    """This process's NVSHMEM world (one per process). Get it from ``nvshmem_init``.

    Attributes: ``group``, ``rank`` (= NVSHMEM PE), ``size`` (PEs), ``device`` (CUDA id),
    ``refs`` (nvshmem_init calls not yet matched by nvshmem_finalize), ``active``.
    Use as a context manager to pair one init with one finalize.
    """

    def __init__(self, group, rank, size, device):
        self.group, self.rank, self.size, self.device = group, rank, size, device
        self.refs = 0
        self.active = True
        self._buffers = []   # live SymmetricBuffers, in creation order
        self._stream = None

    def barrier(self, stream=None):
        """``nvshmem_barrier_all`` on ``stream`` (CuPy or cuda.core; default a private one),
        then wait for it on the host."""
        import nvshmem.core as nv
        from cuda.core import Device, Stream

        if stream is None:
            if self._stream is None:
                self._stream = Device(self.device).create_stream()
            s = self._stream
        elif hasattr(stream, "__cuda_stream__"):
            s = stream  # cuda.core, CuPy >= 14, torch: the CUDA stream protocol
        elif hasattr(stream, "ptr"):
            s = Stream.from_handle(int(stream.ptr))  # an older CuPy stream
        else:
            raise TypeError(f"barrier: not a CUDA stream: {type(stream).__name__}")
        nv.barrier_all(stream=s)
        (s.sync if hasattr(s, "sync") else s.synchronize)()

    def release(self):
        """Same as ``nvshmem_finalize()``."""
        return nvshmem_finalize()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        nvshmem_finalize()

    def __repr__(self):
        return (f"NvshmemRuntime(pe={self.rank}/{self.size}, device={self.device}, refs={self.refs}, "
                f"{'active' if self.active else 'finalized'})")


def meet_before_nvshmem_collective(group) -> None:
    """Two of ``group``'s barriers, before a collective NVSHMEM call (``nvshmem_malloc``,
    ``nvshmem_free``, ``nvshmem_finalize``), which waits for every PE with no timeout.

    The group's barriers are bounded: a rank that never comes is named in a CommTimeoutError.
    One barrier is not enough, because a rank that arrives after the others timed out passes it
    (their arrivals are on record) and would then wait in NVSHMEM alone; it times out in the
    second one instead. Raises what the barriers raise; then skip the NVSHMEM call."""
    group.barrier()
    group.barrier()


def nvshmem_init(group=None, device=None, heap_bytes=None) -> NvshmemRuntime:
    """Initialize NVSHMEM over ``group`` (collective); PE = group rank. Reference counted.

    The first call bootstraps by unique id: rank 0 makes it, ``group.broadcast_bytes`` carries it,
    every rank calls ``nvshmem.core.init(..., initializer_method="uid")`` on ``device`` (default
    ``current_device(group)``). Later calls only count a reference (their group must have the same
    rank and size). ``heap_bytes`` sets NVSHMEM_SYMMETRIC_SIZE if that is unset (first call only).
    """
    global _RUNTIME
    group = as_group(group)
    if _RUNTIME is not None and _RUNTIME.active:
        rt = _RUNTIME
        if (group.rank, group.size) != (rt.rank, rt.size):
            raise NumbaEPError(
                f"NVSHMEM is already initialized in this process as PE {rt.rank} of {rt.size}; "
                f"cannot join another world as rank {group.rank} of {group.size} (one per process)")
        if device is not None and int(device) != rt.device:
            raise NumbaEPError(f"NVSHMEM is already initialized on device {rt.device}, not {device}")
        rt.refs += 1
        return rt

    nvshmem_environment(group.all_local)
    if heap_bytes is not None and "NVSHMEM_SYMMETRIC_SIZE" not in os.environ:
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(int(heap_bytes))

    # Ready? (device chosen, nvshmem4py importable) -- agreed on by all ranks before bootstrapping.
    status = {"error": None}
    dev = None
    try:
        if device is None:
            dev = current_device(group)
        else:
            dev = int(device)
            import cupy

            cupy.cuda.Device(dev).use()
        import nvshmem.core as nv
        from cuda.core import Device

        cdev = Device(dev)
        cdev.set_current()
        status["gpu"] = (_host_key(), str(cdev.uuid))
    except Exception as e:
        status["error"] = _describe(e, "preparing NVSHMEM (CUDA device, nvshmem4py)")
    gathered = group.allgather_object(status)
    _raise_gathered("nvshmem_init", gathered)
    check_gpu_sharing([g["gpu"] for g in gathered])   # the same list, so the same answer, on all

    # The unique id: made by rank 0 (after the environment above, which chooses its socket).
    msg = None
    if group.rank == 0:
        try:
            uid = nv.get_unique_id()
            msg = pickle.dumps(("ok", uid._data.view(np.int8).tobytes()))
        except Exception as e:
            msg = pickle.dumps(("err", _describe(e, "nvshmem.core.get_unique_id on rank 0")))
    kind, payload = pickle.loads(group.broadcast_bytes(msg, root=0))
    if kind != "ok":
        raise NumbaEPError(f"nvshmem_init failed: {payload}")
    if group.rank != 0:
        uid = nv.get_unique_id(empty=True)
        uid._data.view(np.int8)[:] = np.frombuffer(payload, dtype=np.int8)

    status = {"error": None}
    try:
        nv.init(device=cdev, uid=uid, rank=group.rank, nranks=group.size,
                initializer_method="uid")
        pe, npes = nv.my_pe(), nv.n_pes()
        if (pe, npes) != (group.rank, group.size):
            raise NumbaEPError(f"NVSHMEM says PE {pe} of {npes}, the group says rank "
                               f"{group.rank} of {group.size}")
    except Exception as e:
        status["error"] = _describe(e, f"nvshmem.core.init on device {dev}")
    _raise_gathered("nvshmem_init", group.allgather_object(status))

    _RUNTIME = NvshmemRuntime(group, group.rank, group.size, dev)
    _RUNTIME.refs = 1
    return _RUNTIME


def nvshmem_finalize() -> bool:
    """Drop one reference; the last one frees the remaining symmetric buffers (collectively, in
    creation order) and finalizes NVSHMEM. Returns True when NVSHMEM was finalized now.
    A call without a matching ``nvshmem_init`` does nothing and returns False."""
    global _RUNTIME
    rt = _RUNTIME
    if rt is None or not rt.active:
        return False
    rt.refs -= 1
    if rt.refs > 0:
        return False
    import nvshmem.core as nv

    try:
        for buf in list(rt._buffers):
            buf.close()
        rt._stream = None
        nv.finalize()
    finally:
        rt.active = False
        _RUNTIME = None
    return True


def nvshmem_runtime():
    """The active NvshmemRuntime of this process, or None."""
    return _RUNTIME if (_RUNTIME is not None and _RUNTIME.active) else None


def _peer_address(ptr, pe):
    """``nvshmem_ptr(ptr, pe)``: the peer's copy mapped here, or 0 if it is not load/store-able
    (this is what ``nvshmem.core.get_peer_buffer`` wraps, without its bookkeeping)."""
    try:
        import nvshmem.bindings as bindings

        return int(bindings.ptr(int(ptr), int(pe)) or 0)
    except Exception:
        return 0


class SymmetricBuffer:
    """``nbytes`` (rounded up to 128) on NVSHMEM's symmetric heap, zero-filled. Collective.

    Every rank must create and close its SymmetricBuffers in the same order, with the same
    ``nbytes``. Attributes: ``nbytes``, ``ptr`` (local address), ``local`` (CuPy uint8 array),
    ``peer_ptrs[pe]`` (peer's copy mapped here, 0 where not NVLink-reachable), ``peer_ptrs_dev``
    (CuPy uint64 [npes]), ``runtime``. Needs ``nvshmem_init`` first; ``nvshmem_finalize`` frees
    what is still open.
    """

    def __init__(self, nbytes, runtime=None):
        nbytes = _check_nbytes(nbytes, "SymmetricBuffer")
        rt = runtime if runtime is not None else nvshmem_runtime()
        if rt is None or not rt.active:
            raise NumbaEPError("SymmetricBuffer needs NVSHMEM: call numba_ep.memory.nvshmem_init() first")
        if nbytes == 0:
            raise ValueError("SymmetricBuffer: nbytes must be > 0")
        import cupy
        import nvshmem.core as nv

        self.runtime = rt
        self.nbytes = _round_up(nbytes, ALIGNMENT)
        self.device = rt.device
        self._closed = False
        meet_before_nvshmem_collective(rt.group)  # bounded, so that nv.buffer cannot hang
        with cupy.cuda.Device(self.device):
            self._buf = nv.buffer(self.nbytes)  # collective
            rt._buffers.append(self)
            self.ptr = int(self._buf.handle)
            cupy.cuda.runtime.memset(self.ptr, 0, self.nbytes)
            cupy.cuda.runtime.deviceSynchronize()
            self.peer_ptrs = [self.ptr if pe == rt.rank else _peer_address(self.ptr, pe)
                              for pe in range(rt.size)]
            self.peer_ptrs_dev = _device_u64(self.peer_ptrs, self.device)
        self.local = _wrap(self.ptr, self.nbytes, self, self.device)
        rt.group.barrier()  # every rank's copy is zero before anyone writes into it

    def peer(self, pe, dtype=None):
        """A CuPy array over PE ``pe``'s copy (None if it is not load/store-reachable)."""
        if self._closed:
            raise NumbaEPError("SymmetricBuffer is closed")
        p = self.peer_ptrs[pe]
        return None if p == 0 else _wrap(p, self.nbytes, self, self.device, dtype)

    @property
    def closed(self):
        return self._closed

    def close(self):
        """Collective ``nvshmem_free``. Idempotent; a no-op after NVSHMEM was finalized."""
        if self._closed:
            return
        self._closed = True
        rt = self.runtime
        if self in rt._buffers:
            rt._buffers.remove(self)
        self.local = self.peer_ptrs_dev = None
        if rt.active:
            import cupy
            import nvshmem.core as nv

            with cupy.cuda.Device(self.device):
                cupy.cuda.runtime.deviceSynchronize()
                nv.free(self._buf)
        self._buf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"SymmetricBuffer(nbytes={self.nbytes}, pe={self.runtime.rank}/{self.runtime.size}"
                f"{', closed' if self._closed else ''})")
