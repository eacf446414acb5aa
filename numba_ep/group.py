"""Process groups: who the other ranks are, and how to swap a few bytes with them.

numba_ep needs very little from a process group: every rank's ``rank`` and the group's ``size``, an
all-gather of small byte strings (CUDA IPC handles, NVSHMEM's unique id, sizes to check), a
barrier, and which ranks share this host (``local_rank`` / ``local_size``, used to pick a GPU and
to check that CUDA IPC can reach every peer). ``Group`` is that interface; four implementations
carry it:

- ``MPIGroup(comm)``: an mpi4py communicator (a job started by ``mpirun``).
- ``TorchGroup(process_group)``: a ``torch.distributed`` process group (``torchrun``).
- ``LocalGroup``: processes started by ``numba_ep.spawn`` (no MPI, no torch; works from Jupyter).
- ``SingleRankGroup``: one rank, no communication at all.

``as_group(obj)`` turns whatever the caller has (a Group, a communicator, a process group or None)
into a Group.

Who waits on whom
-----------------
Every collective is called by all ranks in the same order. ``allgather_bytes`` returns when every
rank has contributed; ``barrier`` is an all-gather of nothing. In a ``LocalGroup`` and an
``MPIGroup`` each wait is bounded by ``timeout`` (default: env ``NUMBA_EP_TIMEOUT_S``, else 100 s);
when it runs out the waiting rank raises ``numba_ep.errors.CommTimeoutError`` naming the ranks
that never arrived. Torch waits are bounded by the process group's own timeout.

The LocalGroup store
--------------------
A directory (under /dev/shm when it is writable, so nothing touches a disk) shared by the ranks:

    ag.<seq>.<rank>   rank's contribution to the seq-th collective; written to a temporary name
                      and renamed, so a file that exists is complete
    abort             written once by the first rank that fails (or by spawn's parent); every rank
                      waiting in a collective sees it within ~10 ms and raises PeerFailedError
    result.<rank>     spawn: the pickled return value or traceback of the rank
    stack.<rank>      spawn: Python stacks of a hung rank, dumped on SIGUSR1 before it is killed

Collective number ``seq`` completes for rank r only once every rank has written ``ag.<seq>.*``,
which every rank does only after reading all of ``ag.<seq-1>.*``; so after completing ``seq`` a
rank deletes its own ``ag.<seq-1>`` file, and the store never holds more than two rounds.

spawn
-----
``spawn(fn, nranks, *args, **kwargs)`` starts one process per rank (multiprocessing's 'spawn'
start method: a fresh interpreter, no inherited CUDA state), calls ``fn(group, *args, **kwargs)``
in each and returns the results in rank order. The parent never touches CUDA. Each child finds its
GPU through ``current_device()``: ``devices[rank]`` when given, else ``local_rank % device count``;
the choice is published in env ``NUMBA_EP_DEVICE``.

``fn`` must be importable by the children: a function defined at the top level of a module (or of
a script run as ``python script.py`` behind ``if __name__ == "__main__":``). Functions defined in a
Jupyter cell live in the notebook's ``__main__``, which a spawned interpreter cannot import; for
notebooks write the function to a file (``%%writefile ep_worker.py``) and pass
``"ep_worker:main"`` or ``"/path/to/ep_worker.py:main"``: a string ``"module:function"`` or
``"file.py:function"`` is imported inside each child.
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback

from numba_ep.errors import CommTimeoutError, NumbaEPError

__all__ = [
    "Group",
    "LocalGroup",
    "MPIGroup",
    "TorchGroup",
    "SingleRankGroup",
    "PeerFailedError",
    "SpawnError",
    "as_group",
    "spawn",
    "current_device",
    "default_timeout",
]

ENV_TIMEOUT = "NUMBA_EP_TIMEOUT_S"
ENV_DEVICE = "NUMBA_EP_DEVICE"
ENV_GRACE = "NUMBA_EP_SPAWN_GRACE_S"
DEFAULT_TIMEOUT_S = 100.0
DEFAULT_GRACE_S = 5.0


class PeerFailedError(NumbaEPError):
    """Raised inside a collective when another rank of the group has already failed."""


class SpawnError(NumbaEPError):
    """One or more ranks started by ``spawn`` failed, hung or died.

    ``failures`` maps rank -> text (the traceback of the exception that rank raised, or what
    happened to it); ``results`` holds the return values of the ranks that finished (None elsewhere).
    """

    def __init__(self, message, failures=None, results=None):
        super().__init__(message)
        self.failures = dict(failures or {})
        self.results = results


def _env_float(name, default):
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not a number of seconds") from None


def default_timeout():
    """Seconds a blocking group call waits: env ``NUMBA_EP_TIMEOUT_S``, else 100."""
    return _env_float(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)


def _host_key():
    """A string equal for processes on the same host (hostname + kernel boot id)."""
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        pass
    return f"{socket.gethostname()}/{boot}"


def _local_placement(keys, rank):
    """(local_rank, local_size) of ``rank`` given every rank's host key."""
    same = [r for r, k in enumerate(keys) if k == keys[rank]]
    return same.index(rank), len(same)


def _fmt_ranks(ranks):
    ranks = sorted(ranks)
    return ", ".join(str(r) for r in ranks)


def _poll_gather(group, seq, what, data, fetch, abort_text=None):
    """The waiting half of a bounded all-gather, shared by LocalGroup and MPIGroup.

    ``fetch(r)`` returns rank r's bytes of round ``seq``, or None while they have not arrived.
    Polls with a nap growing from 20 us to 2 ms until every rank's bytes are in (returns them
    in rank order, ``data`` at ``group.rank``), or ``group.timeout`` passes (CommTimeoutError
    naming the ranks that never arrived), or ``abort_text()`` (checked every 10 ms) gives a
    reason (PeerFailedError)."""
    out = [None] * group.size
    out[group.rank] = data
    missing = set(range(group.size)) - {group.rank}
    start = time.monotonic()
    deadline = start + group.timeout
    next_abort_check = start + 0.01
    nap = 20e-6
    while missing:
        for r in list(missing):
            got = fetch(r)
            if got is not None:
                out[r] = got
                missing.discard(r)
        if not missing:
            break
        now = time.monotonic()
        if abort_text is not None and now >= next_abort_check:
            next_abort_check = now + 0.01
            text = abort_text()
            if text is not None:
                raise PeerFailedError(
                    f"rank {group.rank}: {what} #{seq} abandoned while waiting for rank(s) "
                    f"{_fmt_ranks(missing)}: {text}")
        if now >= deadline:
            peers = tuple(sorted(missing))
            raise CommTimeoutError(
                f"rank {group.rank}: {what} #{seq} timed out after {group.timeout:g} s; "
                f"rank(s) {_fmt_ranks(peers)} of {group.size} never arrived "
                f"(set {ENV_TIMEOUT} or pass timeout= to wait longer)",
                what=what, rank=group.rank, peer=peers[0] if len(peers) == 1 else peers)
        time.sleep(nap)
        nap = min(nap * 2, 2e-3)
    return out


# -------------------------------------------------------------------------------------------------
# The interface
# -------------------------------------------------------------------------------------------------


class Group:
    """A set of ranks that can all-gather bytes and wait for each other.

    Attributes: ``rank``, ``size``, ``local_rank``, ``local_size`` (ranks on this host).
    Every method is a collective: all ranks call it, in the same order.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (lengths may differ), in rank order."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Return once every rank has called barrier."""
        self.allgather_bytes(b"")

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """``root``'s ``data`` on every rank (others may pass None)."""
        self._check_root(root)
        mine = bytes(data) if (self.rank == root and data is not None) else b""
        return self.allgather_bytes(mine)[root]

    def allgather_object(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        return [pickle.loads(b) for b in self.allgather_bytes(pickle.dumps(obj))]

    @property
    def all_local(self) -> bool:
        """True when every rank of the group runs on this host."""
        return self.local_size == self.size

    def close(self) -> None:
        """Release what the group holds (not the caller's communicator). Idempotent."""

    def _check_root(self, root):
        if not (0 <= int(root) < self.size):
            raise ValueError(f"root={root} is not a rank of a group of size {self.size}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
                f"local_rank={self.local_rank}, local_size={self.local_size})")


def _as_bytes(data):
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"allgather_bytes needs bytes, got {type(data).__name__}")


class SingleRankGroup(Group):
    """A group of one rank: every collective returns at once."""

    def __init__(self):
        self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1

    def allgather_bytes(self, data):
        return [_as_bytes(data)]

    def barrier(self):
        pass


# -------------------------------------------------------------------------------------------------
# LocalGroup: a directory store shared by processes on one host
# -------------------------------------------------------------------------------------------------


class _PolledGroup(Group):
    """A group whose ``allgather_bytes(data, _what=...)`` polls with ``_poll_gather``: barrier
    and broadcast are all-gathers that say what they were in a timeout's message."""

    def barrier(self):
        self.allgather_bytes(b"", _what="barrier")

    def broadcast_bytes(self, data, root=0):
        self._check_root(root)
        mine = bytes(data) if (self.rank == root and data is not None) else b""
        return self.allgather_bytes(mine, _what=f"broadcast_bytes(root={root})")[root]


class LocalGroup(_PolledGroup):
    """Ranks on one host exchanging bytes through files in a shared directory.

    ``spawn`` builds one per child; to use it without spawn, give every process the same
    ``path`` (an empty directory), its ``rank`` and the ``size``. ``timeout`` (seconds) bounds
    every wait; None means env ``NUMBA_EP_TIMEOUT_S`` or 100 s.
    """

    def __init__(self, path, rank, size, timeout=None):
        size, rank = int(size), int(rank)
        if size < 1 or not (0 <= rank < size):
            raise ValueError(f"LocalGroup: rank={rank} is not in range for size={size}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"LocalGroup: store directory {path!r} does not exist")
        self.path = os.fspath(path)
        self.rank, self.size = rank, size
        # Every rank is on this host by construction (the store is a local directory).
        self.local_rank, self.local_size = rank, size
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self._seq = 0
        self._closed = False

    def _file(self, seq, rank):
        return os.path.join(self.path, f"ag.{seq}.{rank}")

    def _abort_text(self):
        try:
            with open(os.path.join(self.path, "abort")) as f:
                return f.read()
        except OSError:
            return None

    def abort(self, reason):
        """Tell every rank waiting in a collective to give up (first reason wins)."""
        _write_abort(self.path, reason)

    def allgather_bytes(self, data, *, _what="allgather_bytes"):
        if self._closed:
            raise NumbaEPError(f"rank {self.rank}: {_what} on a closed LocalGroup")
        data = _as_bytes(data)
        seq = self._seq
        self._seq += 1
        _atomic_write(self._file(seq, self.rank), data)

        def fetch(r):
            try:
                with open(self._file(seq, r), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None

        out = _poll_gather(self, seq, _what, data, fetch, self._abort_text)

        # Everyone wrote round seq, so everyone has finished reading round seq-1.
        if seq > 0:
            try:
                os.unlink(self._file(seq - 1, self.rank))
            except FileNotFoundError:
                pass
        return out

    def close(self):
        self._closed = True


def _atomic_write(path, data: bytes):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_abort(store, reason):
    try:
        fd = os.open(os.path.join(store, "abort.tmp%d" % os.getpid()),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(reason)
        # link() fails if 'abort' already exists: the first reason wins.
        os.link(os.path.join(store, "abort.tmp%d" % os.getpid()), os.path.join(store, "abort"))
    except OSError:
        pass
    finally:
        try:
            os.unlink(os.path.join(store, "abort.tmp%d" % os.getpid()))
        except OSError:
            pass


# -------------------------------------------------------------------------------------------------
# MPIGroup and TorchGroup
# -------------------------------------------------------------------------------------------------


class MPIGroup(_PolledGroup):
    """An mpi4py communicator, with every wait bounded as in LocalGroup.

    ``timeout`` (seconds; None: env ``NUMBA_EP_TIMEOUT_S``, else 100 s) bounds each collective.
    MPI's own collectives wait forever, so these are built from point-to-point messages: each
    rank sends its bytes to every other rank (``isend``, tagged with the collective's number)
    and polls for theirs (``improbe``), so that a rank that never arrives is named in a
    CommTimeoutError. A rank that arrives late still receives the bytes sent to it, as in
    LocalGroup. This is O(size) messages per rank: meant for set-up and the occasional barrier,
    not for data. ``local_rank`` / ``local_size`` come from gathering every rank's host name.
    """

    _TAG_BASE, _TAG_SPAN = 0x4E45, 16384   # tags stay below MPI's guaranteed upper bound 32767

    def __init__(self, comm=None, timeout=None):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self._seq = 0
        self._sends = []   # isend requests not yet known to be complete
        keys = self.allgather_object(_host_key())
        self.local_rank, self.local_size = _local_placement(keys, self.rank)

    def allgather_bytes(self, data, *, _what="allgather_bytes"):
        data = _as_bytes(data)
        seq = self._seq
        self._seq += 1
        tag = self._TAG_BASE + seq % self._TAG_SPAN
        for r in range(self.size):
            if r != self.rank:
                self._sends.append(self.comm.isend(data, dest=r, tag=tag))

        def fetch(r):
            msg = self.comm.improbe(source=r, tag=tag)
            return None if msg is None else msg.recv()

        out = _poll_gather(self, seq, _what, data, fetch)
        self._sends = [q for q in self._sends if not q.Test()]
        return out

    def close(self):
        self._sends = []


class TorchGroup(Group):
    """A torch.distributed process group (None: the default group).

    Waits are bounded by the process group's own timeout. ``local_rank`` / ``local_size`` come
    from gathering every rank's host name once at construction.
    """

    def __init__(self, process_group=None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise NumbaEPError("TorchGroup: torch.distributed is not initialized "
                               "(call torch.distributed.init_process_group first)")
        self._dist = dist
        self.pg = process_group
        self.rank = dist.get_rank(process_group)
        self.size = dist.get_world_size(process_group)
        keys = self.allgather_object(_host_key())
        self.local_rank, self.local_size = _local_placement(keys, self.rank)

    def allgather_bytes(self, data):
        out = [None] * self.size
        self._dist.all_gather_object(out, _as_bytes(data), group=self.pg)
        return [bytes(b) for b in out]

    def barrier(self):
        self._dist.barrier(group=self.pg)


# -------------------------------------------------------------------------------------------------
# as_group and the current device
# -------------------------------------------------------------------------------------------------

_SPAWN_GROUP = None  # the LocalGroup of this process when it was started by spawn
_WORLD_GROUP = None  # the cached group that as_group(None) built (MPI world)
_CURRENT_DEVICE = None


def _launched_by_mpirun():
    return any(k in os.environ for k in
               ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE",
                "MPI_LOCALNRANKS"))


def _is_mpi_comm(obj):
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and isinstance(obj, mpi.Comm)


def _is_torch_pg(obj):
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return False
    pg_type = getattr(dist, "ProcessGroup", None)
    return pg_type is not None and isinstance(obj, pg_type)


def as_group(obj=None) -> Group:
    """Return a Group for ``obj``.

    ``obj`` may be a Group (returned as is), an mpi4py communicator, a torch.distributed
    ProcessGroup, or None. None means, in this order: the group of this process if ``spawn``
    started it; MPI COMM_WORLD if the process was launched by mpirun and mpi4py imports; the
    default torch.distributed group if it is initialized; else a one-rank group.
    """
    global _WORLD_GROUP
    if isinstance(obj, Group):
        return obj
    if obj is None:
        if _SPAWN_GROUP is not None:
            return _SPAWN_GROUP
        if _WORLD_GROUP is not None:
            return _WORLD_GROUP
        if _launched_by_mpirun():
            try:
                from mpi4py import MPI
            except ImportError:
                MPI = None
            if MPI is not None:
                _WORLD_GROUP = MPIGroup(MPI.COMM_WORLD)
                return _WORLD_GROUP
            import warnings

            warnings.warn("numba_ep: this process was started by mpirun but mpi4py does not "
                          "import; as_group(None) falls back to a one-rank group "
                          "(pip install numba_ep[mpi])", RuntimeWarning, stacklevel=2)
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            _WORLD_GROUP = TorchGroup(None)
            return _WORLD_GROUP
        return SingleRankGroup()
    if _is_mpi_comm(obj):
        return MPIGroup(obj)
    if _is_torch_pg(obj):
        return TorchGroup(obj)
    raise TypeError(
        "expected a numba_ep Group, an mpi4py communicator, a torch.distributed ProcessGroup or "
        f"None; got {type(obj).__module__}.{type(obj).__qualname__}")


def gpu_count() -> int:
    """CUDA devices the driver sees, without creating a context or importing numba (0 under the
    numba simulator, without a driver, or without a device). The one place that answers
    "is there a GPU here" for the CLI, spawn and the tests."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return 0
    try:
        from cuda.bindings import driver

        (err,) = driver.cuInit(0)
        if err != driver.CUresult.CUDA_SUCCESS:
            return 0
        err, n = driver.cuDeviceGetCount()
        return int(n) if err == driver.CUresult.CUDA_SUCCESS else 0
    except Exception:
        return 0


def current_device(group=None) -> int:
    """The CUDA device of this process, made current for CuPy and cuda.core on first call.

    Chosen once per process: env ``NUMBA_EP_DEVICE`` if set (spawn sets it from ``devices=``);
    else, in a group with several ranks on this host, ``local_rank % device count``; else the
    device that is current already. The choice is written back to ``NUMBA_EP_DEVICE``.
    Raises NumbaEPError when no CUDA device is visible.
    """
    global _CURRENT_DEVICE
    if _CURRENT_DEVICE is not None:
        return _CURRENT_DEVICE
    import cupy

    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device
        raise NumbaEPError(f"no CUDA device is usable in this process: {e}") from e
    if count < 1:
        raise NumbaEPError("no CUDA device is visible in this process")
    env = os.environ.get(ENV_DEVICE, "").strip()
    if env:
        dev = int(env)
    else:
        g = as_group(group) if group is not None else (_SPAWN_GROUP or _WORLD_GROUP)
        if g is not None and g.local_size > 1:
            dev = g.local_rank % count
        else:
            dev = cupy.cuda.runtime.getDevice()
    if not (0 <= dev < count):
        raise NumbaEPError(f"CUDA device {dev} asked for, but only {count} are visible")
    cupy.cuda.Device(dev).use()
    try:
        from cuda.core import Device
    except ImportError:  # older cuda-python layout
        from cuda.core.experimental import Device
    Device(dev).set_current()
    os.environ[ENV_DEVICE] = str(dev)
    _CURRENT_DEVICE = dev
    return dev


# -------------------------------------------------------------------------------------------------
# spawn
# -------------------------------------------------------------------------------------------------


def _resolve_target(spec):
    """A callable from a callable, "package.module:function" or "path/file.py:function"."""
    if callable(spec):
        return spec
    module_name, _, func_name = spec.rpartition(":")
    import importlib
    import importlib.util

    if module_name.endswith(".py"):
        path = os.path.abspath(module_name)
        name = "_numba_ep_target_" + os.path.splitext(os.path.basename(path))[0]
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    func = module
    for part in func_name.split("."):
        func = getattr(func, part)
    return func


def _check_target(fn):
    if isinstance(fn, str):
        module_name, sep, func_name = fn.rpartition(":")
        if not sep or not module_name or not func_name:
            raise ValueError(f"spawn target {fn!r} must look like 'module:function' or "
                             "'path/to/file.py:function'")
        if module_name.endswith(".py") and not os.path.isfile(module_name):
            raise FileNotFoundError(f"spawn target file {module_name!r} does not exist")
        return fn
    if not callable(fn):
        raise TypeError(f"spawn needs a function or a 'module:function' string, got {type(fn).__name__}")
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__" and not hasattr(main, "__file__"):
        raise TypeError(
            f"spawn: {getattr(fn, '__qualname__', fn)!r} is defined in an interactive session "
            "(a notebook cell or the REPL); spawned processes cannot import it. Put it in a file "
            "(in Jupyter: %%writefile ep_worker.py) and pass 'ep_worker:function' or "
            "'/path/ep_worker.py:function' instead.")
    try:
        pickle.dumps(fn)
    except Exception as e:
        raise TypeError(
            f"spawn: {getattr(fn, '__qualname__', fn)!r} cannot be sent to another process ({e}). "
            "Use a function defined at the top level of an importable module, or pass "
            "'module:function'.") from e
    return fn


def _child_main(target, rank, size, store, device, group_timeout, args, kwargs):
    """Entry point of each spawned rank."""
    global _SPAWN_GROUP
    os.environ["NUMBA_EP_RANK"] = str(rank)
    os.environ["NUMBA_EP_WORLD_SIZE"] = str(size)
    os.environ["NUMBA_EP_LOCAL_RANK"] = str(rank)
    if device is not None:
        os.environ[ENV_DEVICE] = str(device)
    else:
        os.environ.pop(ENV_DEVICE, None)  # chosen from local_rank by current_device()
    # A crash in native code (a segfault, or glibc aborting on a bad free, also while the
    # interpreter shuts down) then prints this rank's Python stack to its stderr.
    try:
        faulthandler.enable(all_threads=True)
    except (RuntimeError, ValueError, OSError):   # a stderr without a file descriptor
        pass
    stack_file = None
    if hasattr(faulthandler, "register") and hasattr(signal, "SIGUSR1"):
        stack_file = open(os.path.join(store, f"stack.{rank}"), "w")
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    import numba_ep  # noqa: F401  (installs the NumPy shim before anything imports numba.cuda)

    group = LocalGroup(store, rank, size, timeout=group_timeout)
    _SPAWN_GROUP = group
    failed = False
    try:
        if gpu_count() > 0:
            current_device(group)  # this rank's GPU is current before fn runs
        fn = _resolve_target(target)
        result = fn(group, *args, **kwargs)
        try:
            payload = pickle.dumps(("ok", result))
        except Exception as e:
            failed = True
            payload = pickle.dumps(("err", f"the return value of rank {rank} "
                                    f"({type(result).__name__}) cannot be pickled: {e}", False))
    except BaseException as e:
        failed = True
        secondary = isinstance(e, PeerFailedError)
        if not secondary:
            _write_abort(store, f"rank {rank} failed with {type(e).__name__}: {e}")
        payload = pickle.dumps(("err", traceback.format_exc(), secondary))
    group.close()
    _atomic_write(os.path.join(store, f"result.{rank}"), payload)
    sys.stdout.flush()
    sys.stderr.flush()
    if failed:
        sys.exit(1)


def _signal_name(code):
    try:
        return signal.Signals(-code).name
    except (ValueError, TypeError):
        return str(-code)


def spawn(fn, nranks, *args, timeout=None, devices=None, group_timeout=None, grace=None, **kwargs):
    """Run ``fn(group, *args, **kwargs)`` in ``nranks`` new processes; return results by rank.

    - ``fn``: a top-level function of an importable module, or a string ``"module:function"`` /
      ``"path/to/file.py:function"`` (use the string form from Jupyter).
    - ``timeout``: seconds for the whole run (None: no limit). Ranks still running then get their
      Python stacks dumped and are killed; SpawnError says which and shows the stacks.
    - ``devices``: CUDA device of each rank (default ``rank % visible device count``).
    - ``group_timeout``: timeout of each group collective (default env ``NUMBA_EP_TIMEOUT_S``/100 s).
    - ``grace``: once a rank has failed, how long the others get to finish before they are
      terminated (default env ``NUMBA_EP_SPAWN_GRACE_S``, else 5 s). Ranks waiting in a group
      collective notice the failure and stop at once.

    Raises SpawnError (with every failed rank's traceback) if any rank raises, dies or hangs.
    The keyword names above are taken by spawn and cannot be passed on to ``fn``.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait as mp_wait

    if not isinstance(nranks, int) or isinstance(nranks, bool) or nranks < 1:
        raise ValueError(f"spawn: nranks must be a positive int, got {nranks!r}")
    target = _check_target(fn)
    if devices is not None:
        devices = [int(d) for d in devices]
        if len(devices) < nranks:
            raise ValueError(f"spawn: devices={devices} names fewer devices than nranks={nranks}")
    grace = _env_float(ENV_GRACE, DEFAULT_GRACE_S) if grace is None else float(grace)

    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    store = tempfile.mkdtemp(prefix="numba_ep_spawn_", dir=base)
    ctx = mp.get_context("spawn")
    procs = []
    results = [None] * nranks
    failures = {}       # rank -> text, ranks that failed first-hand
    secondary = {}      # rank -> text, ranks that stopped because another failed
    try:
        for r in range(nranks):
            p = ctx.Process(
                target=_child_main, name=f"numba_ep-rank{r}",
                args=(target, r, nranks, store, None if devices is None else devices[r],
                      group_timeout, args, kwargs))
            try:
                p.start()
            except Exception as e:
                raise TypeError(f"spawn: could not start rank {r} ({type(e).__name__}: {e}); "
                                "are fn and every argument picklable?") from e
            procs.append(p)

        start = time.monotonic()
        deadline = None if timeout is None else start + float(timeout)
        first_failure_at = None
        pending = set(range(nranks))
        hung = []
        while pending:
            limits = [t for t in (deadline, None if first_failure_at is None
                                  else first_failure_at + grace) if t is not None]
            wait_s = None if not limits else max(0.0, min(limits) - time.monotonic())
            ready = mp_wait([procs[r].sentinel for r in pending], timeout=wait_s)
            for r in sorted(pending):
                p = procs[r]
                if p.sentinel not in ready:
                    continue
                p.join()
                pending.discard(r)
                status, text = _read_result(store, r, p.exitcode)
                if status == "ok":
                    results[r] = text
                    if p.exitcode:
                        _warn_exit_after_result(r, p.exitcode)
                    continue
                if status == "secondary":
                    secondary[r] = text
                else:
                    failures[r] = text
                    _write_abort(store, f"rank {r} failed")
                if first_failure_at is None:
                    first_failure_at = time.monotonic()
            now = time.monotonic()
            if pending and deadline is not None and now >= deadline:
                hung = sorted(pending)
                stacks = _dump_stacks(store, procs, hung)
                for r in hung:
                    failures[r] = (f"still running after timeout={timeout:g} s; killed.\n"
                                   f"Its Python stacks at that moment:\n{stacks.get(r) or '(none)'}")
                _write_abort(store, f"spawn timeout: rank(s) {_fmt_ranks(hung)} hung")
                _terminate([procs[r] for r in hung])
                pending.clear()
            elif pending and first_failure_at is not None and now >= first_failure_at + grace:
                for r in sorted(pending):
                    secondary[r] = (f"still running {grace:g} s after another rank failed; "
                                    "terminated")
                _terminate([procs[r] for r in pending])
                pending.clear()
    finally:
        _terminate([p for p in procs if p.is_alive()])
        shutil.rmtree(store, ignore_errors=True)

    if failures or secondary:
        if not failures:  # only knock-on failures: report them as the failures
            failures, secondary = secondary, {}
        lines = [f"numba_ep.spawn: {len(failures)} of {nranks} rank(s) failed: "
                 f"rank(s) {_fmt_ranks(failures)}"]
        for r in sorted(failures):
            lines.append(f"\n----- rank {r} -----\n{failures[r].rstrip()}")
        for r in sorted(secondary):
            first = secondary[r].strip().splitlines()[-1] if secondary[r].strip() else ""
            lines.append(f"\n(rank {r} stopped because of the above: {first})")
        all_failures = dict(secondary)
        all_failures.update(failures)
        raise SpawnError("\n".join(lines), failures=all_failures, results=results)
    return results


def _warn_exit_after_result(rank, exitcode):
    """A rank returned its result, then its process ended badly (a crash in some library's exit
    code, say): the result stands, but the crash is not hidden."""
    import warnings

    how = (f"was killed by signal {_signal_name(exitcode)}" if exitcode < 0
           else f"exited with code {exitcode}")
    warnings.warn(f"numba_ep.spawn: rank {rank} returned its result, then its process {how} "
                  "while shutting down (its stderr above may show where); the result is kept",
                  RuntimeWarning, stacklevel=3)


def _read_result(store, rank, exitcode):
    """('ok', value) | ('failed', text) | ('secondary', text) for a finished rank."""
    try:
        with open(os.path.join(store, f"result.{rank}"), "rb") as f:
            payload = pickle.load(f)
    except FileNotFoundError:
        how = (f"killed by signal {_signal_name(exitcode)}" if exitcode is not None and exitcode < 0
               else f"exited with code {exitcode}")
        return "failed", f"rank {rank} {how} without reporting a result (crash, os._exit or OOM?)"
    except Exception as e:
        return "failed", f"rank {rank}'s result could not be unpickled in the parent: {e!r}"
    if payload[0] == "ok":
        return "ok", payload[1]
    return ("secondary" if payload[2] else "failed"), payload[1]


def _dump_stacks(store, procs, ranks):
    if not hasattr(signal, "SIGUSR1"):
        return {}
    for r in ranks:
        try:
            os.kill(procs[r].pid, signal.SIGUSR1)
        except OSError:
            pass
    time.sleep(0.3)
    out = {}
    for r in ranks:
        try:
            with open(os.path.join(store, f"stack.{r}")) as f:
                out[r] = f.read()
        except OSError:
            out[r] = None
    return out


def _terminate(procs, wait_s=1.0):
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(1.0)
