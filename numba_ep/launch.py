"""Compile each kernel specialisation once, keep its cubin on disk, launch it through cuda.core.

Why not numba's dispatcher: it costs 12-150 µs per launch (CuPy arrays are the worst), and its
``cache=True`` refuses kernels that link NVSHMEM device code. A low-latency dispatch must finish in
about 30 µs, so every hot kernel here goes through this module instead:

    kernel factory(**constants) --numba--> LLVM --NVVM/nvJitLink--> cubin  (once; ~1-9 s)
          |                                                            |
          |         ~/.cache/numba_ep/<sha256>.cubin + .json  <--------+  (keyed by kernel sources,
          |                                                               constants, signature,
          v                                                               compute capability and
    cuda.core ObjectCode.from_cubin -> CUfunction -> cuLaunchKernel       package versions)
                             (arguments packed into one reused parameter block; also inside
                              CUDA-graph capture)

Kernel conventions that make this cheap (DESIGN.md decision 3): a kernel's parameters are scalars
only (``uint64`` addresses, ``int32``/``int64`` sizes, ``float32``). Addresses become typed pointers
inside the kernel (``numba_ep.kernels.ptx.ptr_f32(addr)``), so the numba ABI of a kernel is exactly
its C signature and a launch is a list of NumPy scalars. Compile-time constants (rank count, hidden
size, top-k, dtype...) are closure variables of a *factory* function, which numba freezes into the
code: ``get_kernel(make_layout_kernel, SIG, num_ranks=8, ...)`` gives a specialised kernel.

Under the numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) ``get_kernel`` returns a
``SimulatorKernel`` that runs the same Python function through the simulator; addresses there are
host addresses of NumPy arrays (``arr.ctypes.data``), which the ptx fallbacks dereference.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import numba_ep  # noqa: F401  (NumPy shim before numba.cuda)
from numba import config as _numba_config
from numba import types as nbtypes

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)

_PKG_DIR = Path(__file__).resolve().parent

# NumPy scalar constructor for each numba scalar type a kernel may take.
_NP_SCALAR = {
    nbtypes.uint64: np.uint64, nbtypes.int64: np.int64,
    nbtypes.uint32: np.uint32, nbtypes.int32: np.int32,
    nbtypes.uint16: np.uint16, nbtypes.int16: np.int16,
    nbtypes.uint8: np.uint8, nbtypes.int8: np.int8,
    nbtypes.float32: np.float32, nbtypes.float64: np.float64,
    nbtypes.boolean: np.bool_,
}


def cache_dir() -> Path:
    """Directory of compiled cubins: ``$NUMBA_EP_CACHE_DIR`` or ``~/.cache/numba_ep``."""
    d = os.environ.get("NUMBA_EP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "numba_ep")
    return Path(d)


_source_digest_value = None


def _source_digest() -> str:
    """Digest of every source file a kernel can depend on: all kernel modules plus this one.

    Coarse on purpose: editing any kernel file invalidates every cached cubin, which costs a few
    seconds of recompilation and can never serve a stale kernel.
    """
    global _source_digest_value
    if _source_digest_value is None:
        h = hashlib.sha256()
        files = sorted((_PKG_DIR / "kernels").glob("*.py")) + [Path(__file__).resolve()]
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        _source_digest_value = h.hexdigest()
    return _source_digest_value


def _versions(nvshmem: bool) -> str:
    import numba
    import numba_ep
    from importlib.metadata import version

    parts = [f"numba={numba.__version__}", f"numba-cuda={version('numba-cuda')}",
             f"numba_ep={numba_ep.__version__}"]
    if nvshmem:
        parts.append(f"nvshmem4py={version('nvshmem4py-cu13')}")
        parts.append(f"nvshmem={version('nvidia-nvshmem-cu13')}")
    return ";".join(parts)


def parse_signature(sig) -> tuple:
    """Argument types of a kernel signature (``"void(uint64, int32)"`` or a tuple of numba types).

    Only scalar argument types are accepted: the fast launch path passes NumPy scalars.
    """
    from numba.cuda.core import sigutils

    args, ret = sigutils.normalize_signature(sig)
    if ret not in (None, nbtypes.void):
        raise TypeError(f"sig: a kernel returns void, got {ret}")
    for i, a in enumerate(args):
        if a not in _NP_SCALAR:
            raise TypeError(f"sig: argument {i} has type {a}; kernels launched through "
                            "numba_ep.launch take scalars only (pass addresses as uint64)")
    return tuple(args)


@dataclass(frozen=True)
class KernelKey:
    """Everything that identifies one compiled specialisation."""
    factory: str                 # module:qualname of the factory
    constants: tuple             # sorted (name, value) pairs handed to the factory
    argtypes: tuple              # numba scalar types
    options: tuple               # sorted compile options (lineinfo, max_registers, ...)
    cc: tuple

    def digest(self, nvshmem: bool) -> str:
        text = json.dumps([self.factory, repr(self.constants), [str(a) for a in self.argtypes],
                           repr(self.options), list(self.cc), _source_digest(), _versions(nvshmem)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def compile_cubin(pyfunc, argtypes, cc=(9, 0), *, lineinfo=False, max_registers=None,
                  launch_bounds=None, fastmath=False):
    """Compile a kernel function to a cubin without touching a GPU.

    Mirrors what numba's dispatcher does for a kernel (kernel fix-up, launch bounds, cudadevrt
    for grid sync, LTO so NVSHMEM's device shims link in), then links with nvJitLink.

    Returns ``(cubin: bytes, meta: dict)`` where meta holds ``entry_name``, ``cooperative`` and
    ``nvshmem`` (whether the module needs ``nvshmem.core.library_init`` after loading).
    """
    from numba.cuda.compiler import compile_cuda, kernel_fixup
    from numba.cuda.cudadrv import nvvm
    from numba.cuda.core.compiler_lock import global_compiler_lock

    with global_compiler_lock:
        nvvm_options = {"fastmath": fastmath, "opt": 3}
        cres = compile_cuda(pyfunc, nbtypes.void, argtypes, debug=False, lineinfo=lineinfo,
                            fastmath=fastmath, nvvm_options=nvvm_options, cc=cc,
                            max_registers=max_registers, lto=True)
        lib = cres.library
        fn = lib.get_function(cres.fndesc.llvm_func_name)
        lib._entry_name = cres.fndesc.llvm_func_name
        kernel_fixup(fn, False)
        nvvm.set_launch_bounds(fn, launch_bounds)
        cooperative = bool(lib.use_cooperative)
        if cooperative:
            lib.needs_cudadevrt = True
        obj = lib.get_cubin(cc=cc)
        cubin = obj.code if hasattr(obj, "code") else bytes(obj)
        meta = {
            "entry_name": lib._entry_name,
            "cooperative": cooperative,
            "nvshmem": bool(lib._setup_functions),
        }
    return bytes(cubin), meta


def _factory_name(factory) -> str:
    return f"{factory.__module__}:{factory.__qualname__}"


def _current_cc() -> tuple:
    from cuda.core import Device

    return tuple(Device().compute_capability)


_STRUCT_CODE = {
    nbtypes.uint64: "Q", nbtypes.int64: "q", nbtypes.uint32: "I", nbtypes.int32: "i",
    nbtypes.uint16: "H", nbtypes.int16: "h", nbtypes.uint8: "B", nbtypes.int8: "b",
    nbtypes.float32: "f", nbtypes.float64: "d", nbtypes.boolean: "?",
}


class CompiledKernel:
    """A loaded kernel specialisation with a fast launch path.

    ``kernel.launch(grid, block, *args, stream=..., shmem=0)`` packs the scalar arguments into a
    preallocated parameter block (one ``struct.pack_into``) and calls the driver's
    ``cuLaunchKernel`` (or ``cuLaunchCooperativeKernel``) directly: no per-argument objects, no
    per-launch allocation. The driver copies the parameters at launch, so the block is reused;
    a lock keeps concurrent launches from different threads apart. ``stream`` may be ``None``
    (CuPy's current stream), an ``int`` handle, or a CuPy / torch / cuda.core stream; launches on
    a stream that is being captured become graph nodes.
    """

    def __init__(self, cubin: bytes, meta: dict, argtypes: tuple, name: str = ""):
        import ctypes
        import struct

        from cuda.core import ObjectCode

        self.name = name
        self.meta = meta
        self.argtypes = argtypes
        self.object_code = ObjectCode.from_cubin(cubin, name=name)
        self.kernel = self.object_code.get_kernel(meta["entry_name"])
        if meta.get("nvshmem"):
            import nvshmem.core as nv

            # Same as the setup callback numba would run on module load: bind NVSHMEM's device
            # state to this module. nvshmem.core.init() must have run in this process first.
            nv.library_init(nv.NvshmemKernelObject.from_obj(self.object_code))
        # Native alignment ("@") puts every parameter where the kernel's ABI expects it.
        self._struct = struct.Struct("@" + "".join(_STRUCT_CODE[a] for a in argtypes))
        self._nargs = len(argtypes)
        self._params = ctypes.create_string_buffer(max(self._struct.size, 8))
        base = ctypes.addressof(self._params)
        offsets = [struct.calcsize("@" + "".join(_STRUCT_CODE[a] for a in argtypes[:i + 1]))
                   - struct.calcsize("@" + _STRUCT_CODE[argtypes[i]]) for i in range(len(argtypes))]
        self._ptrs = (ctypes.c_void_p * max(len(argtypes), 1))(*[base + o for o in offsets])
        self._ptrs_addr = ctypes.addressof(self._ptrs)
        self._lock = threading.Lock()
        self._functions = {}   # device id -> CUfunction
        self._max_dyn_shmem = {}
        self._cooperative = bool(meta.get("cooperative"))
        self._resident = {}    # (device, block, shmem) -> max_resident_blocks

    @property
    def cooperative(self) -> bool:
        return self._cooperative

    def function(self):
        """The CUfunction of this kernel in the current device's context."""
        from cuda.bindings import driver
        from cuda.core import Device

        dev = Device().device_id
        f = self._functions.get(dev)
        if f is None:
            err, f = driver.cuKernelGetFunction(self.kernel.handle)
            _check(err, f"{self.name}: cuKernelGetFunction")
            self._functions[dev] = f
        return f

    def max_resident_blocks(self, block, shmem=0):
        """How many blocks of ``block`` threads (and ``shmem`` bytes of dynamic shared memory)
        the current device holds at once over all its SMs: the largest grid a cooperative
        launch of this kernel accepts. Cached per device."""
        dev = _current_device_id()
        key = (dev, int(block), int(shmem))
        n = self._resident.get(key)
        if n is None:
            driver = _driver()
            f = self._functions.get(dev) or self.function()
            err, per_sm = driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(f, int(block),
                                                                             int(shmem))
            _check(err, f"{self.name}: occupancy of {block}-thread blocks")
            err, sms = driver.cuDeviceGetAttribute(
                driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)
            _check(err, "multiprocessor count")
            if per_sm < 1:
                raise RuntimeError(f"{self.name}: a block of {block} threads does not fit on an "
                                   f"SM (registers or shared memory)")
            n = self._resident[key] = int(per_sm) * int(sms)
        return n

    def _allow_dynamic_shared(self, f, nbytes):
        from cuda.bindings import driver

        attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        (err,) = driver.cuFuncSetAttribute(f, attr, int(nbytes))
        _check(err, f"{self.name}: allowing {nbytes} B of dynamic shared memory")
        self._max_dyn_shmem[id(f)] = nbytes

    def launch(self, grid, block, *args, stream=None, shmem=0, cooperative=None):
        """Launch with scalar arguments (in the order of the kernel signature)."""
        driver = _driver()
        if len(args) != self._nargs:
            raise TypeError(f"{self.name}: expected {self._nargs} arguments, got {len(args)}")
        f = self._functions.get(_current_device_id()) or self.function()
        if shmem > self._max_dyn_shmem.get(id(f), 48 * 1024):
            self._allow_dynamic_shared(f, shmem)
        # ints are the common case: each launch here is on the eager path of a step
        gx, gy, gz = (grid, 1, 1) if type(grid) is int else _dim3(grid)
        bx, by, bz = (block, 1, 1) if type(block) is int else _dim3(block)
        h = stream if type(stream) is int else stream_handle(stream)
        coop = self._cooperative if cooperative is None else cooperative
        with self._lock:
            try:
                self._struct.pack_into(self._params, 0, *args)
            except struct_error as e:
                raise TypeError(f"{self.name}: an argument does not fit its declared type "
                                f"{[str(a) for a in self.argtypes]}: {e}") from None
            if coop:
                (err,) = driver.cuLaunchCooperativeKernel(f, gx, gy, gz, bx, by, bz, shmem, h,
                                                          self._ptrs_addr)
            else:
                (err,) = driver.cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, h,
                                               self._ptrs_addr, 0)
        if err != _SUCCESS:
            _check(err, f"{self.name}: launch grid={grid} block={block} shmem={shmem}")

    __call__ = launch


def _dim3(d):
    if isinstance(d, int):
        return d, 1, 1
    d = tuple(d) + (1, 1)
    return d[0], d[1], d[2]


def _check(err, what):
    from cuda.bindings import driver

    if err != driver.CUresult.CUDA_SUCCESS:
        _, msg = driver.cuGetErrorString(err)
        raise RuntimeError(f"{what} failed: {err.name} ({msg.decode() if msg else ''})")


_driver_module = None


def _driver():
    global _driver_module
    if _driver_module is None:
        from cuda.bindings import driver

        _driver_module = driver
    return _driver_module


_get_device = None


def _current_device_id():
    global _get_device
    if _get_device is None:
        from cupy.cuda.runtime import getDevice

        _get_device = getDevice
    return _get_device()


try:
    from struct import error as struct_error
    from cuda.bindings.driver import CUresult as _CUresult

    _SUCCESS = _CUresult.CUDA_SUCCESS
except ImportError:  # pragma: no cover - CPU-only installs always have cuda.bindings
    _SUCCESS = 0


class SimulatorKernel:
    """The same kernel run by numba's CUDA simulator (CPU only, for small problems)."""

    def __init__(self, pyfunc, argtypes, name=""):
        from numba import cuda

        self.name = name
        self.argtypes = argtypes
        self._conv = tuple(_NP_SCALAR[a] for a in argtypes)
        self._jitted = cuda.jit(pyfunc)

    def launch(self, grid, block, *args, stream=None, shmem=0, cooperative=None):
        if len(args) != len(self._conv):
            raise TypeError(f"{self.name}: expected {len(self._conv)} arguments, got {len(args)}")
        self._jitted[grid, block, 0, shmem](*[c(a) for c, a in zip(self._conv, args)])

    __call__ = launch


_memo = {}
_memo_lock = threading.Lock()


def get_kernel(factory, sig, *, lineinfo=False, max_registers=None, launch_bounds=None,
               fastmath=False, cc=None, **constants):
    """Return the kernel ``factory(**constants)`` compiled for ``sig``, loaded and ready to launch.

    Args:
        factory: a function taking the compile-time constants as keyword arguments and returning
            the (un-jitted) kernel function. It must be defined at module level in numba_ep.
        sig: kernel signature with scalar arguments only, e.g. ``"void(uint64, uint64, int32)"``.
        constants: compile-time constants; ints, floats, bools, strings or tuples of those.
        cc: compute capability; defaults to the current device's.

    The first call for a key compiles (or loads the cubin from ``cache_dir()``); later calls in
    the process return the memoised ``CompiledKernel`` after one dictionary lookup (hot paths call
    this on every launch). A loaded kernel works on every device of the process.
    """
    fast = (factory, sig, lineinfo, max_registers, launch_bounds, fastmath, cc,
            tuple(constants.items()))
    k = _fast_memo.get(fast)
    if k is not None:
        return k
    k = _get_kernel(factory, sig, lineinfo, max_registers, launch_bounds, fastmath, cc, constants)
    _fast_memo[fast] = k
    return k


_fast_memo = {}


def _get_kernel(factory, sig, lineinfo, max_registers, launch_bounds, fastmath, cc, constants):
    """get_kernel's slow path: normalise the key, then load or compile."""
    argtypes = parse_signature(sig)
    name = getattr(factory, "__name__", "kernel").removeprefix("make_")
    if SIMULATOR:
        key = ("sim", _factory_name(factory), tuple(sorted(constants.items())), argtypes)
        with _memo_lock:
            k = _memo.get(key)
            if k is None:
                k = _memo[key] = SimulatorKernel(factory(**constants), argtypes, name)
        return k
    key = _kernel_key(factory, argtypes, lineinfo, max_registers, launch_bounds, fastmath, cc,
                      constants)
    with _memo_lock:
        k = _memo.get(key)
        if k is not None:
            return k
        cubin, meta = load_or_compile(factory, key, constants, lineinfo=lineinfo,
                                      max_registers=max_registers, launch_bounds=launch_bounds,
                                      fastmath=fastmath)
        k = _memo[key] = CompiledKernel(cubin, meta, argtypes, name)
        return k


def _kernel_key(factory, argtypes, lineinfo, max_registers, launch_bounds, fastmath, cc,
                constants) -> KernelKey:
    cc = tuple(cc) if cc is not None else _current_cc()
    options = tuple(sorted(dict(lineinfo=lineinfo, max_registers=max_registers,
                                launch_bounds=launch_bounds, fastmath=fastmath).items()))
    return KernelKey(_factory_name(factory), tuple(sorted(constants.items())), argtypes, options,
                     cc)


def compile_to_cache(factory, sig, *, lineinfo=False, max_registers=None, launch_bounds=None,
                     fastmath=False, cc=None, **constants) -> bool:
    """Put the cubin ``get_kernel`` would load for these arguments into ``cache_dir()``, without
    loading it: no module is created, so kernels that link NVSHMEM need no NVSHMEM runtime
    here. ``cc`` (default: the current device's) picks the target; numba itself still asks for
    a current device while compiling (on a CPU-only machine the tests patch
    ``numba.cuda.dispatcher.get_current_device``). For compiling ahead of time, e.g. in
    parallel processes before the ranks of a job start. Returns True if it compiled (False:
    it was cached)."""
    key = _kernel_key(factory, parse_signature(sig), lineinfo, max_registers, launch_bounds,
                      fastmath, cc, constants)
    meta_path = cache_dir() / f"{key.digest(nvshmem=False)}.json"
    existed = meta_path.exists()
    load_or_compile(factory, key, constants, lineinfo=lineinfo, max_registers=max_registers,
                    launch_bounds=launch_bounds, fastmath=fastmath)
    return not existed


def load_or_compile(factory, key: KernelKey, constants: dict, **options):
    """The cubin and metadata for ``key``: from the disk cache, or compiled and then cached."""
    d = cache_dir()
    # The digest must know whether NVSHMEM versions matter, which only compiling reveals; the
    # cache stores NVSHMEM kernels under a second digest that includes them and points to it.
    plain = key.digest(nvshmem=False)
    meta_path = d / f"{plain}.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            digest = key.digest(nvshmem=True) if meta.get("nvshmem") else plain
            cubin_path = d / f"{digest}.cubin"
            if meta.get("digest") == digest and cubin_path.exists():
                return cubin_path.read_bytes(), meta
        except (OSError, ValueError):
            pass  # a corrupt or partial entry: recompile and overwrite it
    cubin, meta = compile_cubin(factory(**constants), key.argtypes, key.cc, **options)
    digest = key.digest(nvshmem=True) if meta["nvshmem"] else plain
    meta["digest"] = digest
    meta["factory"] = key.factory
    meta["constants"] = repr(key.constants)
    try:
        d.mkdir(parents=True, exist_ok=True)
        # Write to temporaries then rename: several ranks may compile the same kernel at once.
        tmp = d / f".{digest}.{os.getpid()}.tmp"
        tmp.write_bytes(cubin)
        os.replace(tmp, d / f"{digest}.cubin")
        tmp = d / f".{plain}.{os.getpid()}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)
    except OSError:
        pass  # a read-only cache directory only costs recompilation next time
    return cubin, meta


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------

def stream_handle(stream) -> int:
    """The raw ``cudaStream_t`` of ``stream`` as an int (0 = legacy default stream).

    Accepts None (CuPy's current stream), an int, or an object with ``.ptr`` (CuPy),
    ``.cuda_stream`` (torch) or ``.handle`` (cuda.core).
    """
    if isinstance(stream, int):
        return stream
    if stream is None:
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    if isinstance(stream, np.integer):
        return int(stream)
    for attr in ("ptr", "cuda_stream"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    if hasattr(stream, "handle"):
        return int(stream.handle)
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    raise TypeError(f"stream: expected None, an int handle or a CuPy/torch/cuda.core stream, "
                    f"got {type(stream).__name__}")
