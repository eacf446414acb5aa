"""Inline-PTX intrinsics for numba-cuda kernels, each with a plain-Python twin for the simulator.

numba-cuda has no public inline-PTX API, so every primitive here is a
``numba.cuda.extending.intrinsic`` whose code generator emits an llvmlite ``ir.InlineAsm`` call.
They cover what DeepEP's kernels get from hand-written PTX (notes/deepep-v1.md section 2.0):
acquire/release loads and stores, system-scope atomics, fences, 16-byte non-coherent loads and
no-allocate stores, Hopper mbarriers and 1-D bulk (TMA) copies, FP8/BF16 packing, ``%globaltimer``
and ``elect.sync``.

Conventions (a contract the kernels are written against)
--------------------------------------------------------
* **Addresses are integers.** A global address is a ``uint64`` (a CuPy array's ``arr.data.ptr``, a
  peer address from a table, ...); a shared-memory address is the ``uint32`` returned by
  :func:`shared_addr`. Address parameters accept any integer type and are converted (global
  addresses to uint64, shared ones truncated to uint32). A *float* address is rejected at typing
  time. numba-cuda 0.30 types ``uint64 + int64`` as int64 (fine), but NumPy, which the simulator
  runs on, makes it float64: write ``addr + numba.uint64(i * 4)`` so both paths stay integral.
* **Typed pointers.** ``p = ptr_f32(addr)`` gives a ``CPointer(float32)``; index it (``p[i] = v``,
  ``x = p[i]``), which compiles to plain ``ld``/``st`` (``st.global.f32`` when numba can see the
  address comes from a kernel parameter). Do not wrap such a pointer in
  ``numba.cuda.np.numpy_support.carray``: numba-cuda 0.30.4 drops stores made through that view.
* **Value parameters** of integer intrinsics accept any integer and are converted (wrapping) to the
  width in the name; float parameters accept any number and are converted to float32.
* **Ordering.** Every intrinsic that touches memory is emitted with ``side_effect=True`` and a
  ``~{memory}`` clobber, so LLVM neither deletes, merges, hoists out of a loop, nor reorders it
  with other memory accesses. (ptxas still schedules the plain ``ld``/``st`` of the data movers
  freely; only the PTX memory model's qualifiers order things on the hardware.) Pure conversions
  have neither, so LLVM may combine them.
* The ``.global`` state space is used for global accesses, as DeepEP does: the address must be a
  global (or generic pointing into global) address, which includes CUDA-IPC peer mappings, NVSHMEM
  peer pointers and host-mapped pinned memory.

Simulator fallback
------------------
With ``NUMBA_ENABLE_CUDASIM=1`` (set before numba is imported) the simulator cannot run intrinsics,
so every name in this module is bound to a plain-Python function instead. Kernels then run as Python
threads over *host* memory: the host passes NumPy addresses (``arr.ctypes.data``) where the GPU
path passes device addresses, and the fallbacks read and write that memory with ctypes:

* ``ptr_*`` return a :class:`HostPointer` supporting ``p[i]`` get/set with C pointer semantics
  (negative indices address memory before ``addr``), values as NumPy scalars of the element type;
* loads/stores are plain ctypes accesses (the GIL makes them sequentially consistent, stronger than
  any PTX ordering); atomics hold one module-level ``threading.Lock``, so they are atomic against
  each other (not against ``cuda.atomic`` on arrays, which the simulator locks separately);
* fences are no-ops; ``globaltimer`` is ``time.monotonic_ns()``; ``nanosleep`` yields the thread;
* ``elect_sync`` returns True on lane 0 of each warp (thread linear id % 32 == 0), which is what the
  hardware elects when the whole warp is converged;
* ``shared_addr(array)`` returns the host address of the simulator's NumPy shared array, as an int
  (not truncated to 32 bits), and the shared-memory intrinsics treat it as a host address;
* mbarriers are emulated faithfully enough for the usual TMA pattern: state lives in a dict keyed
  by the barrier's address (init resets it); arrivals, ``expect_tx`` and completed transaction
  bytes update the pending counts, the phase flips when both reach zero, and
  ``mbarrier_try_wait_parity`` reports completion of the phase with the given parity;
  ``mbarrier_wait_parity`` polls (yielding) and raises ``RuntimeError`` after 60 s instead of
  hanging;
* bulk copies are ``ctypes.memmove`` done at once (then ``complete_tx`` on the mbarrier); the
  commit/wait-group calls are no-ops. Sizes and alignments are checked (``ValueError``) exactly as
  the hardware requires them: multiple of 16 bytes, 16-byte aligned addresses;
* conversions are bit-exact with the GPU: see :func:`f32_to_e4m3_bits` and
  :func:`f32_to_bf16_bits` (NumPy-vectorised; usable on the host in any mode).

The fallbacks are also available in GPU mode as ``FALLBACKS[name]`` (for host-side checks), and
``INTRINSICS[name]`` lists, for each intrinsic, the PTX fragment it must emit (for tests).
"""
import ctypes
import threading
import time
import types as pytypes

import numpy as np
import numba
from numba import types

__all__ = []  # filled in by _export

try:  # numba-cuda decides with its own copy of the config (NUMBA_ENABLE_CUDASIM read at import)
    from numba.cuda.core import config as _cuda_config
except ImportError:  # older numba-cuda: numba's own config
    _cuda_config = numba.config
#: True when the numba CUDA simulator is active: every name here is then its Python fallback.
SIMULATOR = bool(_cuda_config.ENABLE_CUDASIM)

#: name -> python fallback (the simulator implementation), in both modes.
FALLBACKS = {}
#: name -> PTX text fragment the intrinsic emits ('' for those built from plain LLVM IR).
INTRINSICS = {}

if not SIMULATOR:
    from llvmlite import ir
    from numba.core import cgutils
    from numba.core.errors import TypingError
    from numba.cuda.extending import _intrinsic, intrinsic

    _I1 = ir.IntType(1)
    _I32 = ir.IntType(32)
    _I64 = ir.IntType(64)
    _F32 = ir.FloatType()
    _VOID = ir.VoidType()


# --------------------------------------------------------------------------------------------------
# Host-memory helpers for the fallbacks
# --------------------------------------------------------------------------------------------------

_CTYPES = {
    np.dtype(np.uint8): ctypes.c_uint8,
    np.dtype(np.int8): ctypes.c_int8,
    np.dtype(np.uint16): ctypes.c_uint16,
    np.dtype(np.int16): ctypes.c_int16,
    np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
}

_LOCK = threading.Lock()  # serialises every fallback atomic and the mbarrier emulation

_FLOAT_ADDR_MSG = (
    "address is a float; build addresses from integers only. (NumPy, hence the simulator, makes "
    "uint64 + int64 a float64: write addr + numba.uint64(i * 4).)"
)


def _addr(a):
    """A fallback's address argument as a Python int (wrapped to 64 bits)."""
    if isinstance(a, (float, np.floating)):
        raise TypeError(_FLOAT_ADDR_MSG)
    return int(a) & 0xFFFF_FFFF_FFFF_FFFF


def _py_value(dtype, v):
    return float(v) if dtype.kind == "f" else int(v)


def _read(dtype, addr):
    dtype = np.dtype(dtype)
    return dtype.type(_CTYPES[dtype].from_address(_addr(addr)).value)


def _write(dtype, addr, v):
    dtype = np.dtype(dtype)
    # ctypes integer types wrap silently, which is the C (and PTX) behaviour we want.
    _CTYPES[dtype].from_address(_addr(addr)).value = _py_value(dtype, v)


class HostPointer:
    """Simulator stand-in for ``CPointer(T)``: ``p[i]`` reads or writes element ``i`` at
    ``addr + i * itemsize`` in host memory (C pointer arithmetic, negative ``i`` allowed)."""

    __slots__ = ("addr", "dtype", "_ctype")

    def __init__(self, addr, dtype):
        self.addr = _addr(addr)
        self.dtype = np.dtype(dtype)
        self._ctype = _CTYPES[self.dtype]

    def _at(self, i):
        return self._ctype.from_address(self.addr + int(i) * self.dtype.itemsize)

    def __getitem__(self, i):
        return self.dtype.type(self._at(i).value)

    def __setitem__(self, i, v):
        self._at(i).value = _py_value(self.dtype, v)

    def __repr__(self):
        return f"HostPointer(0x{self.addr:x}, {self.dtype})"


def _sim_thread_linear_id():
    t = threading.current_thread()
    return getattr(t, "thread_id", 0)


# --------------------------------------------------------------------------------------------------
# Bit-exact host conversions (used by the fallbacks; also handy for references and tests)
# --------------------------------------------------------------------------------------------------

E4M3_MAX = 448.0


def f32_to_e4m3_bits(x):
    """float32 -> float8 e4m3fn bit patterns (uint8), as ``cvt.rn.satfinite.e4m3x2.f32`` does it:
    round to nearest even, finite values beyond +-448 and +-inf saturate to +-448 (0x7E / 0xFE),
    NaN becomes the canonical positive NaN 0x7F (as NVIDIA's own host emulation in cuda_fp8.hpp;
    the GPU test checks the device agrees), -0.0 stays 0x80."""
    import ml_dtypes

    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        clipped = np.clip(x, np.float32(-E4M3_MAX), np.float32(E4M3_MAX))  # NaN passes through
        bits = clipped.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return np.where(np.isnan(x), np.uint8(0x7F), bits).astype(np.uint8)


def e4m3_bits_to_f32(b):
    """float8 e4m3fn bit patterns (uint8) -> float32, exact (0x7F / 0xFF decode to NaN)."""
    import ml_dtypes

    return np.asarray(b, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def f32_to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), as ``cvt.rn.bf16x2.f32``: round to nearest even,
    overflow to +-inf, denormals kept, NaN becomes the canonical 0x7FFF (as cuda_bf16.hpp's host
    emulation)."""
    import ml_dtypes

    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        bits = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FFF), bits).astype(np.uint16)


def bf16_bits_to_f32(b):
    """bfloat16 bit patterns (uint16) -> float32, exact (a 16-bit left shift)."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# --------------------------------------------------------------------------------------------------
# Machinery: typing checks, inline-asm emission, export of intrinsic-or-fallback
# --------------------------------------------------------------------------------------------------

# Parameter kinds: "addr" (global address -> uint64), "saddr" (shared address -> uint32),
# or a numba type: integer types accept any integer, float32 accepts any number.


def _formal(kind):
    if kind == "addr":
        return types.uint64
    if kind == "saddr":
        return types.uint32
    return kind


def _check_arg(name, i, kind, ty):
    if kind in ("addr", "saddr") or isinstance(kind, types.Integer):
        if isinstance(ty, types.Float):
            what = _FLOAT_ADDR_MSG if kind in ("addr", "saddr") else "expected an integer"
            raise TypingError(f"{name}: argument {i} is {ty}; {what}")
        if not isinstance(ty, (types.Integer, types.Boolean)):
            raise TypingError(f"{name}: argument {i} must be an integer, got {ty}")
    elif isinstance(kind, types.Float):
        if not isinstance(ty, (types.Integer, types.Float)):
            raise TypingError(f"{name}: argument {i} must be a number, got {ty}")


def _export(name, fallback, ptx_fragment, make_intrinsic, doc=None):
    """Bind ``name`` in this module to the intrinsic (GPU mode) or the fallback (simulator).
    The fallback is copied first so that shared implementations get their own name and doc."""
    original = fallback
    fallback = pytypes.FunctionType(original.__code__, original.__globals__, name,
                                    original.__defaults__, original.__closure__)
    fallback.__qualname__ = name
    fallback.__module__ = __name__
    fallback.__doc__ = original.__doc__ if doc is None else doc
    FALLBACKS[name] = fallback
    INTRINSICS[name] = ptx_fragment
    __all__.append(name)
    if SIMULATOR:
        globals()[name] = fallback
    else:
        globals()[name] = make_intrinsic()


def _defn(name, doc, kinds, restype, codegen_body):
    """Build an @intrinsic whose typing checks ``kinds`` and whose signature is fixed:
    ``restype(*formal(kinds))``; numba casts the actual arguments to the formal types.
    ``codegen_body(context, builder, args)`` returns the LLVM value (or None for void)."""

    def typing(*args):
        for i, (k, t) in enumerate(zip(kinds, args)):
            _check_arg(name, i, k, t)
        sig = restype(*[_formal(k) for k in kinds])

        def codegen(context, builder, signature, llargs):
            out = codegen_body(context, builder, llargs)
            return context.get_dummy_value() if out is None else out

        return sig, codegen

    typer = _fixed_arity(len(kinds), typing)
    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


def _fixed_arity(n, typing):
    """A typer ``(typingctx, a0, ..., a{n-1})`` calling ``typing(a0, ...)``: numba folds call
    arguments with the typer's Python signature, so it cannot be ``*args``."""
    if n == 0:
        def typer(typingctx):
            return typing()
    elif n == 1:
        def typer(typingctx, a0):
            return typing(a0)
    elif n == 2:
        def typer(typingctx, a0, a1):
            return typing(a0, a1)
    elif n == 3:
        def typer(typingctx, a0, a1, a2):
            return typing(a0, a1, a2)
    elif n == 4:
        def typer(typingctx, a0, a1, a2, a3):
            return typing(a0, a1, a2, a3)
    elif n == 5:
        def typer(typingctx, a0, a1, a2, a3, a4):
            return typing(a0, a1, a2, a3, a4)
    else:
        raise ValueError(n)
    return typer


def _asm(builder, ret_llty, text, constraints, args, side_effect=True, convergent=False):
    """Emit one inline-asm call. ``args`` are LLVM values; their types make the function type.
    ``convergent`` marks warp-collective instructions so LLVM never moves them into divergent
    control flow."""
    fnty = ir.FunctionType(ret_llty, [a.type for a in args])
    asm = ir.InlineAsm(fnty, text, constraints, side_effect=side_effect)
    return builder.call(asm, list(args), attrs=("convergent",) if convergent else ())


def _llty(nbty):
    if nbty in (types.float32,):
        return _F32
    if nbty is types.void or nbty == types.none:
        return _VOID
    if nbty == types.boolean:
        return _I1
    return ir.IntType(nbty.bitwidth)


def _reg(nbty):
    """Inline-asm register constraint letter for a numba scalar type."""
    if nbty == types.float32:
        return "f"
    if nbty == types.float64:
        return "d"
    return {16: "h", 32: "r", 64: "l"}[nbty.bitwidth]


def _simple(name, doc, kinds, restype, text, memory=True, side_effect=True, fallback=None,
            ptx_fragment=None):
    """An intrinsic that is a single inline-asm statement: ``$0`` is the result (if any), then the
    arguments in order. Constraints are derived from the formal types."""
    formals = [_formal(k) for k in kinds]
    cons = ([] if restype is types.void else ["=" + _reg(restype)]) + [_reg(t) for t in formals]
    if memory:
        cons.append("~{memory}")
    constraints = ",".join(cons)

    def body(context, builder, args):
        out = _asm(builder, _llty(restype), text, constraints, args, side_effect=side_effect)
        return None if restype is types.void else out

    frag = text.split(" ")[0].rstrip(";") if ptx_fragment is None else ptx_fragment
    _export(name, fallback, frag, lambda: _defn(name, doc, kinds, restype, body), doc=doc)


# --------------------------------------------------------------------------------------------------
# Typed pointers
# --------------------------------------------------------------------------------------------------

_PTR_TYPES = {
    "u8": (types.uint8, np.uint8),
    "i8": (types.int8, np.int8),
    "u16": (types.uint16, np.uint16),
    "i16": (types.int16, np.int16),
    "u32": (types.uint32, np.uint32),
    "i32": (types.int32, np.int32),
    "u64": (types.uint64, np.uint64),
    "i64": (types.int64, np.int64),
    "f32": (types.float32, np.float32),
    "f64": (types.float64, np.float64),
}


def _make_ptr(suffix, nbty, npty):
    name = f"ptr_{suffix}"
    doc = (f"{name}(addr) -> CPointer({nbty}): the integer address as a typed pointer (LLVM "
           f"``inttoptr``; no PTX of its own). Index it: ``p[i]`` loads/stores {nbty} at "
           f"addr + i*{np.dtype(npty).itemsize}. Plain (weak) accesses: no ordering.")
    rty = types.CPointer(nbty)

    def body(context, builder, args):
        return builder.inttoptr(args[0], context.get_value_type(rty))

    def fallback(addr):
        return HostPointer(addr, npty)

    _export(name, fallback, "", lambda: _defn(name, doc, ("addr",), rty, body), doc=doc)


for _s, (_nb, _np) in _PTR_TYPES.items():
    _make_ptr(_s, _nb, _np)


# --------------------------------------------------------------------------------------------------
# Loads and stores with memory-model qualifiers
# --------------------------------------------------------------------------------------------------

_SCALARS = {  # suffix -> (numba type, numpy dtype, PTX type)
    "u32": (types.uint32, np.uint32, "u32"),
    "i32": (types.int32, np.int32, "s32"),
    "u64": (types.uint64, np.uint64, "u64"),
}


def _load_fallback(npty):
    def fb(addr):
        return _read(npty, addr)
    return fb


def _store_fallback(npty):
    def fb(addr, value):
        _write(npty, addr, value)
    return fb


_LOAD_MEANING = {
    "acquire.sys": "acquire at system scope: memory operations after it (in program order) are not "
                   "performed before it, and it observes everything a matching st.release / fence "
                   "at sys scope published (any GPU or the CPU). Use it to consume a flag/tail.",
    "acquire.gpu": "acquire at GPU scope: as the sys variant but only synchronises with threads of "
                   "the same GPU (cheaper).",
    "volatile": "volatile: a fresh read each time (never cached in a register or merged), relaxed "
                "ordering (no acquire). Use it to poll values whose ordering you do not need.",
}

for _sfx, (_nb, _npt, _pt) in _SCALARS.items():
    for _sem in ("acquire.sys", "acquire.gpu"):
        _name = f"ld_{_sem.replace('.', '_')}_{_sfx}"
        _text = f"ld.{_sem}.global.{_pt} $0, [$1];"
        _simple(_name, f"{_name}(addr) -> {_nb}: emits ``{_text}``. {_LOAD_MEANING[_sem]}",
                ("addr",), _nb, _text, fallback=_load_fallback(_npt))
    _name = f"ld_volatile_{_sfx}"
    _text = f"ld.volatile.global.{_pt} $0, [$1];"
    _simple(_name, f"{_name}(addr) -> {_nb}: emits ``{_text}``. {_LOAD_MEANING['volatile']}",
            ("addr",), _nb, _text, fallback=_load_fallback(_npt))

_STORE_MEANING = {
    "release.sys": "release at system scope: every memory operation before it (in program order) "
                   "is visible to whoever acquires this value at sys scope (other GPUs, the CPU). "
                   "Use it to publish a flag/tail after writing the data.",
    "release.gpu": "release at GPU scope: as the sys variant, for consumers on the same GPU.",
    "relaxed.sys": "relaxed at system scope: atomic (never torn) and eventually visible to other "
                   "GPUs, but orders nothing. Use it for heads/counters that order nothing.",
}

for _sfx, (_nb, _npt, _pt) in _SCALARS.items():
    for _sem in ("release.sys", "release.gpu", "relaxed.sys"):
        _name = f"st_{_sem.replace('.', '_')}_{_sfx}"
        _text = f"st.{_sem}.global.{_pt} [$0], $1;"
        _simple(_name, f"{_name}(addr, value): emits ``{_text}``. {_STORE_MEANING[_sem]}",
                ("addr", _nb), types.void, _text, fallback=_store_fallback(_npt))


# --------------------------------------------------------------------------------------------------
# Atomics on global addresses
# --------------------------------------------------------------------------------------------------

def _rmw_fallback(npty, op):
    def fb(addr, value):
        with _LOCK:
            old = _read(npty, addr)
            _write(npty, addr, op(int(old), int(value)))
        return old
    return fb


def _red_fallback(npty, op):
    rmw = _rmw_fallback(npty, op)

    def fb(addr, value):
        rmw(addr, value)
    return fb


def _cas_fallback(npty):
    def fb(addr, compare, value):
        with _LOCK:
            old = _read(npty, addr)
            # compare as bit patterns of the width (a negative int32 compare matches its bits)
            bits = 8 * np.dtype(npty).itemsize
            mask = (1 << bits) - 1
            if (int(old) & mask) == (int(compare) & mask):
                _write(npty, addr, value)
        return old
    return fb


def _add(a, b):
    return a + b


_ATOMICS = [
    # name, PTX, numba type, numpy dtype, op, meaning
    ("atomic_add_sys_i32", "atom.sys.global.add.s32 $0, [$1], $2;", types.int32, np.int32, _add,
     "relaxed atomic add at system scope (atomicAdd_system); returns the old value"),
    ("atomic_add_sys_u64", "atom.sys.global.add.u64 $0, [$1], $2;", types.uint64, np.uint64, _add,
     "relaxed 64-bit atomic add at system scope; returns the old value"),
    ("atomic_add_release_gpu_i32", "atom.release.gpu.global.add.s32 $0, [$1], $2;", types.int32,
     np.int32, _add, "atomic add with release semantics at GPU scope: earlier writes are visible "
     "to a GPU-scope acquirer that sees the new count; returns the old value"),
    ("atomic_add_release_sys_i32", "atom.release.sys.global.add.s32 $0, [$1], $2;", types.int32,
     np.int32, _add, "atomic add with release semantics at system scope; returns the old value"),
    ("atomic_add_acq_rel_sys_i32", "atom.acq_rel.sys.global.add.s32 $0, [$1], $2;", types.int32,
     np.int32, _add, "atomic add that both acquires and releases at system scope; returns the "
     "old value"),
    ("atomic_add_gpu_i32", "atom.gpu.global.add.s32 $0, [$1], $2;", types.int32, np.int32, _add,
     "relaxed atomic add at GPU scope (cuda.atomic.add on an address); returns the old value"),
    ("atomic_add_gpu_u64", "atom.gpu.global.add.u64 $0, [$1], $2;", types.uint64, np.uint64, _add,
     "relaxed 64-bit atomic add at GPU scope; returns the old value"),
    ("atomic_max_gpu_i32", "atom.gpu.global.max.s32 $0, [$1], $2;", types.int32, np.int32, max,
     "relaxed atomic signed max at GPU scope; returns the old value"),
    ("atomic_exch_sys_i32", "atom.sys.global.exch.b32 $0, [$1], $2;", types.int32, np.int32,
     lambda a, b: b, "relaxed atomic exchange at system scope; returns the old value"),
]

for _name, _text, _nb, _npt, _op, _meaning in _ATOMICS:
    _simple(_name, f"{_name}(addr, value) -> {_nb}: emits ``{_text}``: {_meaning}.",
            ("addr", _nb), _nb, _text, fallback=_rmw_fallback(_npt, _op))


# PTX has no atom.sub: atomic_sub adds the negated value (negation in LLVM IR, then atom.add).
_SUB_TEXT = "atom.sys.global.add.s32 $0, [$1], $2;"
_SUB_DOC = ("atomic_sub_sys_i32(addr, value) -> int32: emits ``neg.s32`` then "
            f"``{_SUB_TEXT}``: relaxed atomic subtract at system scope (atomicSub_system); "
            "returns the old value.")


def _sub_body(context, builder, args):
    return _asm(builder, _I32, _SUB_TEXT, "=r,l,r,~{memory}", [args[0], builder.neg(args[1])])


_export("atomic_sub_sys_i32", _rmw_fallback(np.int32, lambda a, b: a - b),
        "atom.sys.global.add.s32",
        lambda: _defn("atomic_sub_sys_i32", _SUB_DOC, ("addr", types.int32), types.int32,
                      _sub_body), doc=_SUB_DOC)

_REDS = [
    ("red_add_release_sys_i32", "red.release.sys.global.add.s32 [$0], $1;", types.int32, np.int32,
     "reduction (atomic add, no return value) with release semantics at system scope: cheaper "
     "than atom when the old value is not needed; earlier writes are visible to an acquirer that "
     "sees the sum"),
    ("red_add_release_gpu_i32", "red.release.gpu.global.add.s32 [$0], $1;", types.int32, np.int32,
     "reduction (atomic add, no return) with release semantics at GPU scope"),
    ("red_add_gpu_i32", "red.gpu.global.add.s32 [$0], $1;", types.int32, np.int32,
     "relaxed reduction (atomic add, no return) at GPU scope"),
    ("red_add_sys_i32", "red.sys.global.add.s32 [$0], $1;", types.int32, np.int32,
     "relaxed reduction (atomic add, no return) at system scope"),
]

for _name, _text, _nb, _npt, _meaning in _REDS:
    _simple(_name, f"{_name}(addr, value): emits ``{_text}``: {_meaning}.",
            ("addr", _nb), types.void, _text, fallback=_red_fallback(_npt, _add))

_CAS = [
    ("atomic_cas_sys_i32", "atom.sys.global.cas.b32 $0, [$1], $2, $3;", types.int32, np.int32,
     "relaxed compare-and-swap at system scope"),
    ("atomic_cas_sys_u64", "atom.sys.global.cas.b64 $0, [$1], $2, $3;", types.uint64, np.uint64,
     "relaxed 64-bit compare-and-swap at system scope"),
    ("atomic_cas_gpu_i32", "atom.gpu.global.cas.b32 $0, [$1], $2, $3;", types.int32, np.int32,
     "relaxed compare-and-swap at GPU scope"),
]

for _name, _text, _nb, _npt, _meaning in _CAS:
    _simple(_name, f"{_name}(addr, compare, value) -> {_nb}: emits ``{_text}``: {_meaning}; "
            f"stores value if *addr == compare, and returns the old value.",
            ("addr", _nb, _nb), _nb, _text, fallback=_cas_fallback(_npt))

# Shared-memory spin lock pieces (DeepEP's internode sender window).
_simple("atomic_cas_acquire_cta_shared_i32",
        "atomic_cas_acquire_cta_shared_i32(saddr, compare, value) -> int32: emits "
        "``atom.acquire.cta.shared::cta.cas.b32``: compare-and-swap on shared memory with acquire "
        "semantics at CTA scope (take a lock). Returns the old value.",
        ("saddr", types.int32, types.int32), types.int32,
        "atom.acquire.cta.shared::cta.cas.b32 $0, [$1], $2, $3;", fallback=_cas_fallback(np.int32))
_simple("atomic_exch_release_cta_shared_i32",
        "atomic_exch_release_cta_shared_i32(saddr, value) -> int32: emits "
        "``atom.release.cta.shared::cta.exch.b32``: exchange on shared memory with release "
        "semantics at CTA scope (release a lock). Returns the old value.",
        ("saddr", types.int32), types.int32,
        "atom.release.cta.shared::cta.exch.b32 $0, [$1], $2;",
        fallback=_rmw_fallback(np.int32, lambda a, b: b))
_simple("ld_acquire_cta_shared_i32",
        "ld_acquire_cta_shared_i32(saddr) -> int32: emits ``ld.acquire.cta.shared::cta.s32``: "
        "acquire load of shared memory at CTA scope.",
        ("saddr",), types.int32, "ld.acquire.cta.shared::cta.s32 $0, [$1];",
        fallback=_load_fallback(np.int32))


# --------------------------------------------------------------------------------------------------
# Fences, timer, sleep, election
# --------------------------------------------------------------------------------------------------

def _noop():
    return None


def _fence(name, text, meaning):
    def fb():
        return None
    _simple(name, f"{name}(): emits ``{text}``: {meaning}. (Simulator: no-op.)", (), types.void,
            text, fallback=fb)


_fence("fence_acq_rel_cta", "fence.acq_rel.cta;",
       "orders this thread's memory operations before/after it, at CTA scope")
_fence("fence_acq_rel_gpu", "fence.acq_rel.gpu;",
       "orders this thread's memory operations before/after it, at GPU scope "
       "(like __threadfence)")
_fence("fence_acq_rel_sys", "fence.acq_rel.sys;",
       "orders this thread's memory operations before/after it at system scope: combined with "
       "relaxed flag accesses it gives release/acquire across GPUs and the CPU")
_fence("fence_proxy_async_shared_cta", "fence.proxy.async.shared::cta;",
       "makes this thread's generic-proxy writes to shared memory visible to the async proxy "
       "(bulk copies/TMA) and vice versa: put it between writing shared memory with st/st_shared "
       "and a bulk_store_s2g that reads it")
_fence("fence_mbarrier_init", "fence.mbarrier_init.release.cluster;",
       "releases prior mbarrier_init operations to the cluster (and the async proxy), so other "
       "threads and bulk copies see initialised barriers; follow it with cuda.syncthreads()")


def _globaltimer_fb():
    return np.uint64(time.monotonic_ns())


_simple("globaltimer",
        "globaltimer() -> uint64: emits ``mov.u64 $0, %globaltimer;``: a nanosecond wall clock "
        "common to all SMs of a GPU (resolution ~1 us on some GPUs, updates are not per-cycle). "
        "Bound every spin-wait with it. (Simulator: time.monotonic_ns().)",
        (), types.uint64, "mov.u64 $0, %globaltimer;", memory=False, fallback=_globaltimer_fb,
        ptx_fragment="%globaltimer")


def _nanosleep_fb(ns):
    time.sleep(0)  # yield to the other simulated threads


_simple("nanosleep",
        "nanosleep(ns): emits ``nanosleep.u32 $0;``: suspends the thread for about ns "
        "nanoseconds (0..1e6, hardware picks within [0, 2*ns]); use it as back-off in spin loops. "
        "(Simulator: yields the Python thread.)",
        (types.uint32,), types.void, "nanosleep.u32 $0;", memory=False, fallback=_nanosleep_fb)


def _bar_sync_fb(barrier_id, nthreads):
    raise NotImplementedError("bar_sync: named barriers over a subset of a block cannot be "
                              "emulated by numba's simulator; this kernel needs a GPU")


_simple("bar_sync",
        "bar_sync(barrier_id, nthreads): emits ``bar.sync $0, $1;``: a named barrier (ids 1..15; "
        "0 is __syncthreads) over ``nthreads`` threads, a multiple of 32. Warps of one group of a "
        "block wait for each other without stopping the rest of the block; memory written before "
        "it by the group's threads is visible to the group after it (CTA scope). "
        "(Simulator: not available.)",
        (types.int32, types.int32), types.void, "bar.sync $0, $1;", fallback=_bar_sync_fb)


def _smid_fb():
    return np.uint32(0)


_simple("smid", "smid() -> uint32: emits ``mov.u32 $0, %smid;``: the SM this thread runs on "
        "(diagnostics only). (Simulator: 0.)", (), types.uint32, "mov.u32 $0, %smid;",
        memory=False, fallback=_smid_fb, ptx_fragment="%smid")


def _trap_fb():
    raise RuntimeError("trap() executed in a simulated kernel")


_simple("trap", "trap(): emits ``trap;``: aborts the kernel (the CUDA context becomes unusable). "
        "Prefer recording an error and returning. (Simulator: raises RuntimeError.)",
        (), types.void, "trap;", fallback=_trap_fb)


def _elect_sync_fb():
    return _sim_thread_linear_id() % 32 == 0


# Registers declared inside { } are scoped to the block, so the text can be inlined many times.
_ELECT_TEXT = ("{\n\t.reg .pred %nep_p;\n\t.reg .b32 %nep_l;\n\t"
               "elect.sync %nep_l|%nep_p, 0xffffffff;\n\tselp.u32 $0, 1, 0, %nep_p;\n\t}")


def _elect_body(context, builder, args):
    r = _asm(builder, _I32, _ELECT_TEXT, "=r", [], convergent=True)
    return builder.icmp_unsigned("!=", r, ir.Constant(_I32, 0))


_ELECT_DOC = ("elect_sync() -> bool: emits ``elect.sync %l|%p, 0xffffffff;``: the whole warp must "
              "execute it converged; exactly one lane (the lowest active one) gets True. "
              "(Simulator: True on lane 0 of each warp, i.e. linear thread id % 32 == 0.)")
_export("elect_sync", _elect_sync_fb, "elect.sync",
        lambda: _defn("elect_sync", _ELECT_DOC, (), types.boolean, _elect_body), doc=_ELECT_DOC)


# --------------------------------------------------------------------------------------------------
# 16-byte vector loads and stores (the data movers)
# --------------------------------------------------------------------------------------------------

_V4 = types.UniTuple(types.uint32, 4)


def _ld_v4_fallback(addr):
    a = _addr(addr)
    return tuple(np.uint32(ctypes.c_uint32.from_address(a + 4 * k).value) for k in range(4))


def _st_v4_fallback(addr, a, b, c, d):
    base = _addr(addr)
    for k, v in enumerate((a, b, c, d)):
        ctypes.c_uint32.from_address(base + 4 * k).value = int(v)


def _make_ld_v4(name, text, doc, space_reg="l"):
    kind = "addr" if space_reg == "l" else "saddr"
    cons = f"=r,=r,=r,=r,{space_reg},~{{memory}}"
    struct4 = ir.LiteralStructType([_I32] * 4) if not SIMULATOR else None

    def body(context, builder, args):
        s = _asm(builder, struct4, text, cons, args)
        return context.make_tuple(builder, _V4, [builder.extract_value(s, k) for k in range(4)])

    def fb(addr):
        return _ld_v4_fallback(addr)

    _export(name, fb, text.split(" ")[0], lambda: _defn(name, doc, (kind,), _V4, body), doc=doc)


def _make_st_v4(name, text, doc, space_reg="l"):
    kind = "addr" if space_reg == "l" else "saddr"
    cons = f"{space_reg},r,r,r,r,~{{memory}}"

    def body(context, builder, args):
        _asm(builder, _VOID, text, cons, args)

    def fb(addr, a, b, c, d):
        _st_v4_fallback(addr, a, b, c, d)

    kinds = (kind, types.uint32, types.uint32, types.uint32, types.uint32)
    _export(name, fb, text.split(" ")[0], lambda: _defn(name, doc, kinds, types.void, body),
            doc=doc)


_LD_NC_TEXT = "ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {$0, $1, $2, $3}, [$4];"
_make_ld_v4(
    "ld_nc_v4", _LD_NC_TEXT,
    "ld_nc_v4(addr) -> (u32, u32, u32, u32): 16 bytes at a 16-byte-aligned global address; emits "
    f"``{_LD_NC_TEXT}``: a read through the non-coherent (read-only) path that does not allocate "
    "in L1 and prefetches 256 B into L2. Like DeepEP's ld_nc_global it is formally undefined for "
    "data written during the kernel but correct on Hopper for freshly-arrived buffer data read "
    "after an acquire; use ld_volatile_v4 if in doubt.")
_LD_TEXT = "ld.global.v4.u32 {$0, $1, $2, $3}, [$4];"
_make_ld_v4("ld_v4", _LD_TEXT,
            f"ld_v4(addr) -> (u32, u32, u32, u32): plain 16-byte load, emits ``{_LD_TEXT}`` (weak; "
            "16-byte aligned address).")
_LD_VOL_TEXT = "ld.volatile.global.v4.u32 {$0, $1, $2, $3}, [$4];"
_make_ld_v4("ld_volatile_v4", _LD_VOL_TEXT,
            "ld_volatile_v4(addr) -> (u32, u32, u32, u32): emits "
            f"``{_LD_VOL_TEXT}``: a fresh 16-byte read every time (relaxed, no acquire).")
_ST_NA_TEXT = "st.global.L1::no_allocate.v4.u32 [$0], {$1, $2, $3, $4};"
_make_st_v4("st_na_v4", _ST_NA_TEXT,
            f"st_na_v4(addr, a, b, c, d): emits ``{_ST_NA_TEXT}``: 16-byte store that does "
            "not allocate in L1 (streaming data to a peer or an output). Weak: publish with a "
            "release after it.")
_ST_TEXT = "st.global.v4.u32 [$0], {$1, $2, $3, $4};"
_make_st_v4("st_v4", _ST_TEXT,
            f"st_v4(addr, a, b, c, d): plain 16-byte store, emits ``{_ST_TEXT}``.")
_LDS_TEXT = "ld.shared.v4.u32 {$0, $1, $2, $3}, [$4];"
_make_ld_v4("ld_shared_v4", _LDS_TEXT,
            f"ld_shared_v4(saddr) -> (u32, u32, u32, u32): emits ``{_LDS_TEXT}`` on a "
            "16-byte aligned shared address from shared_addr().", space_reg="r")
_STS_TEXT = "st.shared.v4.u32 [$0], {$1, $2, $3, $4};"
_make_st_v4("st_shared_v4", _STS_TEXT,
            f"st_shared_v4(saddr, a, b, c, d): emits ``{_STS_TEXT}`` on a 16-byte aligned shared "
            "address from shared_addr().", space_reg="r")


# --------------------------------------------------------------------------------------------------
# Shared-memory addresses
# --------------------------------------------------------------------------------------------------

_SHARED_ADDR_DOC = (
    "shared_addr(array) -> uint32: the shared-state-space address of a cuda.shared.array's first "
    "element; emits ``cvta.to.shared.u64`` on its generic pointer, truncated to 32 bits: the "
    "form the mbarrier_*, bulk_* and *_shared_* intrinsics take. Add byte offsets to it as "
    "integers. (Simulator: the NumPy array's host address, as an int.)")


def _shared_addr_fb(array):
    return int(array.ctypes.data)




def _make_shared_addr():
    def typer(typingctx, array):
        if not isinstance(array, types.Array):
            raise TypingError(f"shared_addr: expected a cuda.shared.array, got {array}")
        sig = types.uint32(array)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, value=args[0])
            generic = builder.ptrtoint(ary.data, _I64)
            s64 = _asm(builder, _I64, "cvta.to.shared.u64 $0, $1;", "=l,l", [generic],
                       side_effect=False)
            return builder.trunc(s64, _I32)

        return sig, codegen

    typer.__name__ = typer.__qualname__ = "shared_addr"
    typer.__doc__ = _SHARED_ADDR_DOC
    return intrinsic(typer)


_export("shared_addr", _shared_addr_fb, "cvta.to.shared", _make_shared_addr, doc=_SHARED_ADDR_DOC)


# --------------------------------------------------------------------------------------------------
# mbarriers (shared-memory address as uint32; an 8-byte aligned uint64 slot in shared memory)
# --------------------------------------------------------------------------------------------------

# Simulator emulation: addr -> [expected_arrivals, pending_arrivals, pending_tx_bytes, phase]
_MBARRIERS = {}
_SIM_WAIT_LIMIT_S = 60.0


def _mbar_state(bar):
    st = _MBARRIERS.get(_addr(bar))
    if st is None:
        raise RuntimeError(f"mbarrier at 0x{_addr(bar):x} used before mbarrier_init")
    return st


def _mbar_maybe_flip(st):
    if st[1] == 0 and st[2] == 0:
        st[3] ^= 1
        st[1] = st[0]


def _mbarrier_init_fb(bar, count):
    with _LOCK:
        _MBARRIERS[_addr(bar)] = [int(count), int(count), 0, 0]


def _mbarrier_arrive_fb(bar):
    with _LOCK:
        st = _mbar_state(bar)
        st[1] -= 1
        _mbar_maybe_flip(st)


def _mbarrier_arrive_expect_tx_fb(bar, nbytes):
    with _LOCK:
        st = _mbar_state(bar)
        st[2] += int(nbytes)
        st[1] -= 1
        _mbar_maybe_flip(st)


def _mbarrier_expect_tx_fb(bar, nbytes):
    with _LOCK:
        _mbar_state(bar)[2] += int(nbytes)


def _mbarrier_complete_tx(bar, nbytes):
    with _LOCK:
        st = _mbar_state(bar)
        st[2] -= int(nbytes)
        _mbar_maybe_flip(st)


def _mbarrier_try_wait_parity_fb(bar, phase):
    with _LOCK:
        return _mbar_state(bar)[3] != (int(phase) & 1)


def _mbarrier_wait_parity_fb(bar, phase):
    deadline = time.monotonic() + _SIM_WAIT_LIMIT_S
    while not _mbarrier_try_wait_parity_fb(bar, phase):
        if time.monotonic() > deadline:
            raise RuntimeError(f"simulated mbarrier_wait_parity(0x{_addr(bar):x}, {phase}) did not "
                               f"complete in {_SIM_WAIT_LIMIT_S:.0f} s")
        time.sleep(0)


def _mbarrier_wait_parity_timeout_fb(bar, phase, timeout_ns):
    deadline = time.monotonic_ns() + int(timeout_ns)
    while not _mbarrier_try_wait_parity_fb(bar, phase):
        if time.monotonic_ns() > deadline:
            return False
        time.sleep(0)
    return True


_simple("mbarrier_init",
        "mbarrier_init(bar, count): emits ``mbarrier.init.shared::cta.b64 [bar], count;``: "
        "initialises the 8-byte mbarrier at shared address bar for count arrivals per phase, "
        "current phase 0. One thread does it; then fence_mbarrier_init() and cuda.syncthreads().",
        ("saddr", types.uint32), types.void, "mbarrier.init.shared::cta.b64 [$0], $1;",
        fallback=_mbarrier_init_fb)
_simple("mbarrier_arrive",
        "mbarrier_arrive(bar): emits ``mbarrier.arrive.shared::cta.b64 _, [bar];``: one arrival "
        "(release at CTA scope) on the current phase.",
        ("saddr",), types.void, "mbarrier.arrive.shared::cta.b64 _, [$0];",
        fallback=_mbarrier_arrive_fb)
_simple("mbarrier_arrive_expect_tx",
        "mbarrier_arrive_expect_tx(bar, nbytes): emits "
        "``mbarrier.arrive.expect_tx.shared::cta.b64 _, [bar], nbytes;``: adds nbytes to the "
        "transaction count the current phase waits for (bytes that bulk_load_g2s will deliver), "
        "then arrives once. Issue it before or after the copies; the phase completes when all "
        "arrivals are in and all expected bytes have landed.",
        ("saddr", types.uint32), types.void,
        "mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], $1;",
        fallback=_mbarrier_arrive_expect_tx_fb)
_simple("mbarrier_expect_tx",
        "mbarrier_expect_tx(bar, nbytes): emits "
        "``mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [bar], nbytes;``: adds nbytes to the "
        "expected transaction count without arriving.",
        ("saddr", types.uint32), types.void,
        "mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [$0], $1;",
        fallback=_mbarrier_expect_tx_fb)

_TRY_WAIT_TEXT = ("{\n\t.reg .pred %nep_p;\n\t"
                  "mbarrier.try_wait.parity.shared::cta.b64 %nep_p, [$1], $2;\n\t"
                  "selp.u32 $0, 1, 0, %nep_p;\n\t}")


def _try_wait(builder, bar, phase):
    r = _asm(builder, _I32, _TRY_WAIT_TEXT, "=r,r,r,~{memory}", [bar, phase])
    return builder.icmp_unsigned("!=", r, ir.Constant(_I32, 0))


_TRY_WAIT_DOC = (
    "mbarrier_try_wait_parity(bar, phase) -> bool: emits "
    "``mbarrier.try_wait.parity.shared::cta.b64 p, [bar], phase;``: True once the phase with "
    "parity ``phase & 1`` has completed (acquire at CTA scope: data the bulk copies of that phase "
    "wrote to shared memory is then visible). It may suspend the thread for a system-dependent "
    "time before returning False. The first phase has parity 0; flip your phase bit after each "
    "wait.")
_export("mbarrier_try_wait_parity", _mbarrier_try_wait_parity_fb, "mbarrier.try_wait.parity",
        lambda: _defn("mbarrier_try_wait_parity", _TRY_WAIT_DOC, ("saddr", types.uint32),
                      types.boolean, lambda c, b, a: _try_wait(b, a[0], a[1])), doc=_TRY_WAIT_DOC)


def _wait_body(context, builder, args):
    loop = builder.append_basic_block("mbar_wait")
    done = builder.append_basic_block("mbar_done")
    builder.branch(loop)
    builder.position_at_end(loop)
    builder.cbranch(_try_wait(builder, args[0], args[1]), done, loop)
    builder.position_at_end(done)


_WAIT_DOC = ("mbarrier_wait_parity(bar, phase): loops on ``mbarrier.try_wait.parity`` until the "
             "phase with parity ``phase & 1`` completed. No timeout: use it where completion is "
             "certain (local bulk copies), else mbarrier_wait_parity_timeout. (Simulator: polls; "
             "raises RuntimeError after 60 s.)")
_export("mbarrier_wait_parity", _mbarrier_wait_parity_fb, "mbarrier.try_wait.parity",
        lambda: _defn("mbarrier_wait_parity", _WAIT_DOC, ("saddr", types.uint32), types.void,
                      _wait_body), doc=_WAIT_DOC)


def _wait_timeout_body(context, builder, args):
    bar, phase, timeout = args
    ok = cgutils.alloca_once_value(builder, ir.Constant(_I1, 0))
    start = _asm(builder, _I64, "mov.u64 $0, %globaltimer;", "=l", [])
    loop = builder.append_basic_block("mbar_wait_to")
    check = builder.append_basic_block("mbar_wait_to_check")
    done = builder.append_basic_block("mbar_wait_to_done")
    builder.branch(loop)
    builder.position_at_end(loop)
    got = _try_wait(builder, bar, phase)
    builder.store(got, ok)
    builder.cbranch(got, done, check)
    builder.position_at_end(check)
    now = _asm(builder, _I64, "mov.u64 $0, %globaltimer;", "=l", [])
    expired = builder.icmp_unsigned(">", builder.sub(now, start), timeout)
    builder.cbranch(expired, done, loop)
    builder.position_at_end(done)
    return builder.load(ok)


_WAIT_TO_DOC = ("mbarrier_wait_parity_timeout(bar, phase, timeout_ns) -> bool: loops on "
                "``mbarrier.try_wait.parity`` as mbarrier_wait_parity does, but gives up after "
                "timeout_ns nanoseconds of %globaltimer; "
                "returns True if the phase completed, False on timeout.")
_export("mbarrier_wait_parity_timeout", _mbarrier_wait_parity_timeout_fb,
        "mbarrier.try_wait.parity",
        lambda: _defn("mbarrier_wait_parity_timeout", _WAIT_TO_DOC,
                      ("saddr", types.uint32, types.uint64), types.boolean, _wait_timeout_body),
        doc=_WAIT_TO_DOC)


# --------------------------------------------------------------------------------------------------
# 1-D bulk copies (TMA without a tensor map). nbytes: multiple of 16; addresses 16-byte aligned.
# --------------------------------------------------------------------------------------------------

def _check_bulk(nbytes, *addrs):
    n = int(nbytes)
    if n % 16 or n <= 0:
        raise ValueError(f"bulk copy size must be a positive multiple of 16 bytes, got {n}")
    for a in addrs:
        if _addr(a) % 16:
            raise ValueError(f"bulk copy address 0x{_addr(a):x} is not 16-byte aligned")
    return n


def _bulk_load_g2s_fb(dst_smem, src_global, nbytes, bar):
    n = _check_bulk(nbytes, dst_smem, src_global)
    ctypes.memmove(_addr(dst_smem), _addr(src_global), n)
    _mbarrier_complete_tx(bar, n)


def _bulk_load_g2s_hint_fb(dst_smem, src_global, nbytes, bar, policy):
    _bulk_load_g2s_fb(dst_smem, src_global, nbytes, bar)


def _bulk_store_s2g_fb(dst_global, src_smem, nbytes):
    n = _check_bulk(nbytes, dst_global, src_smem)
    ctypes.memmove(_addr(dst_global), _addr(src_smem), n)


def _bulk_store_s2g_hint_fb(dst_global, src_smem, nbytes, policy):
    _bulk_store_s2g_fb(dst_global, src_smem, nbytes)


_BULK_G2S = ("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
             "[$0], [$1], $2, [$3];")
_simple("bulk_load_g2s",
        f"bulk_load_g2s(dst_smem, src_global, nbytes, bar): emits ``{_BULK_G2S}``: asynchronous "
        "copy of nbytes (a multiple of 16; both addresses 16-byte aligned) from global memory to "
        "shared memory by the TMA unit; on arrival it completes nbytes of transactions on the "
        "mbarrier bar (pair it with mbarrier_arrive_expect_tx(bar, nbytes) and wait on the "
        "phase). One thread issues it. (Simulator: memmove at once, then complete_tx.)",
        ("saddr", "addr", types.uint32, "saddr"), types.void, _BULK_G2S,
        fallback=_bulk_load_g2s_fb, ptx_fragment=_BULK_G2S.split(" ")[0])
_BULK_G2S_HINT = ("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
                  ".L2::cache_hint [$0], [$1], $2, [$3], $4;")
_simple("bulk_load_g2s_hint",
        "bulk_load_g2s_hint(dst_smem, src_global, nbytes, bar, policy): emits "
        f"``{_BULK_G2S_HINT}``: "
        "bulk_load_g2s with an L2 cache policy from createpolicy_evict_first/_normal().",
        ("saddr", "addr", types.uint32, "saddr", types.uint64), types.void, _BULK_G2S_HINT,
        fallback=_bulk_load_g2s_hint_fb, ptx_fragment=_BULK_G2S_HINT.split(" ")[0])
_BULK_S2G = "cp.async.bulk.global.shared::cta.bulk_group [$0], [$1], $2;"
_simple("bulk_store_s2g",
        f"bulk_store_s2g(dst_global, src_smem, nbytes): emits ``{_BULK_S2G}``: asynchronous copy "
        "of nbytes (multiple of 16, 16-byte aligned addresses) from shared to global memory, "
        "tracked by bulk groups: call bulk_commit_group() after, then bulk_wait_group_read_0() "
        "before overwriting the shared source, or bulk_wait_group_0() before relying on the "
        "global writes (e.g. before a release store publishing them). Threads that wrote the "
        "shared source must execute fence_proxy_async_shared_cta() (then sync) before it is "
        "issued. "
        "(Simulator: memmove at once.)",
        ("addr", "saddr", types.uint32), types.void, _BULK_S2G, fallback=_bulk_store_s2g_fb,
        ptx_fragment=_BULK_S2G.split(" ")[0])
_BULK_S2G_HINT = ("cp.async.bulk.global.shared::cta.bulk_group.L2::cache_hint "
                  "[$0], [$1], $2, $3;")
_simple("bulk_store_s2g_hint",
        f"bulk_store_s2g_hint(dst_global, src_smem, nbytes, policy): emits ``{_BULK_S2G_HINT}``: "
        "bulk_store_s2g with an L2 cache policy.",
        ("addr", "saddr", types.uint32, types.uint64), types.void, _BULK_S2G_HINT,
        fallback=_bulk_store_s2g_hint_fb, ptx_fragment=_BULK_S2G_HINT.split(" ")[0])

_simple("bulk_commit_group",
        "bulk_commit_group(): emits ``cp.async.bulk.commit_group;``: closes the current group of "
        "bulk_store_s2g copies issued by this thread. (Simulator: no-op.)",
        (), types.void, "cp.async.bulk.commit_group;", fallback=_noop)
_simple("bulk_wait_group_read_0",
        "bulk_wait_group_read_0(): emits ``cp.async.bulk.wait_group.read 0;``: waits until every "
        "committed bulk group of this thread has finished *reading* its shared source (the shared "
        "buffer may then be reused; global writes may still be in flight). (Simulator: no-op.)",
        (), types.void, "cp.async.bulk.wait_group.read 0;", fallback=_noop,
        ptx_fragment="cp.async.bulk.wait_group.read")
_simple("bulk_wait_group_0",
        "bulk_wait_group_0(): emits ``cp.async.bulk.wait_group 0;``: waits until every committed "
        "bulk group of this thread is complete, global writes included. (Simulator: no-op.)",
        (), types.void, "cp.async.bulk.wait_group 0;", fallback=_noop,
        ptx_fragment="cp.async.bulk.wait_group 0")


def _make_wait_group_n(name, text_fmt, doc):
    def fb(n):
        return None

    def make():
        def typer(typingctx, n):
            if not isinstance(n, types.IntegerLiteral):
                raise TypingError(f"{name}(n): n must be a compile-time integer constant, got {n}")
            value = n.literal_value
            if not 0 <= value <= 63:
                raise TypingError(f"{name}(n): n must be in 0..63, got {value}")
            sig = types.void(n)

            def codegen(context, builder, signature, args):
                _asm(builder, _VOID, text_fmt.format(value), "~{memory}", [])
                return context.get_dummy_value()

            return sig, codegen

        typer.__name__ = typer.__qualname__ = name
        typer.__doc__ = doc
        return _intrinsic(target="cuda", prefer_literal=True)(typer)

    _export(name, fb, text_fmt.split(" ")[0], make, doc=doc)


_make_wait_group_n("bulk_wait_group_read", "cp.async.bulk.wait_group.read {};",
                   "bulk_wait_group_read(n): emits ``cp.async.bulk.wait_group.read n;`` with n a "
                   "compile-time constant: waits until at most n committed bulk groups of this "
                   "thread are still reading their shared sources. (Simulator: no-op.)")
_make_wait_group_n("bulk_wait_group", "cp.async.bulk.wait_group {};",
                   "bulk_wait_group(n): emits ``cp.async.bulk.wait_group n;`` with n a "
                   "compile-time constant: waits until at most n committed bulk groups of this "
                   "thread are pending. (Simulator: no-op.)")


def _policy_fb():
    return np.uint64(0)


_simple("createpolicy_evict_first",
        "createpolicy_evict_first() -> uint64: emits "
        "``createpolicy.fractional.L2::evict_first.b64 $0, 1.0;``: an L2 cache policy for data "
        "read or written once (the *_hint bulk copies take it). (Simulator: 0.)",
        (), types.uint64, "createpolicy.fractional.L2::evict_first.b64 $0, 1.0;", memory=False,
        side_effect=False, fallback=_policy_fb)
_simple("createpolicy_evict_normal",
        "createpolicy_evict_normal() -> uint64: emits "
        "``createpolicy.fractional.L2::evict_normal.b64 $0, 1.0;``: the default L2 policy, for "
        "the *_hint bulk copies. (Simulator: 0.)",
        (), types.uint64, "createpolicy.fractional.L2::evict_normal.b64 $0, 1.0;", memory=False,
        side_effect=False, fallback=_policy_fb)


# --------------------------------------------------------------------------------------------------
# FP8 (e4m3) and BF16 conversions, bitcasts
# --------------------------------------------------------------------------------------------------

def _cvt_e4m3x2_fb(lo, hi):
    b = f32_to_e4m3_bits(np.array([lo, hi], dtype=np.float32))
    return np.uint16(int(b[0]) | (int(b[1]) << 8))


# PTX puts its first source operand in the upper byte: pass hi first so lo lands in the low byte,
# which is the first byte in (little-endian) memory, i.e. array order.
_simple("cvt_e4m3x2",
        "cvt_e4m3x2(lo, hi) -> uint16: emits ``cvt.rn.satfinite.e4m3x2.f32 d, hi, lo;``: two "
        "float32 to two float8 e4m3fn packed with lo in the low byte (so storing the uint16 "
        "writes lo then hi, array order). Round to nearest even; |x| > 448 and inf saturate to "
        "+-448; NaN gives NaN (0x7F). Bit-exact host twin: f32_to_e4m3_bits.",
        (types.float32, types.float32), types.uint16,
        "cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;", memory=False, side_effect=False,
        fallback=_cvt_e4m3x2_fb)


def _e4m3x2_to_f32x2_fb(packed):
    p = int(packed) & 0xFFFF
    f = e4m3_bits_to_f32(np.array([p & 0xFF, p >> 8], dtype=np.uint8))
    return (f[0], f[1])


_F32X2 = types.UniTuple(types.float32, 2)
_E4M3_DEC_TEXT = ("{\n\t.reg .b32 %nep_h2;\n\t.reg .b16 %nep_lo, %nep_hi;\n\t"
                  "cvt.rn.f16x2.e4m3x2 %nep_h2, $2;\n\tmov.b32 {%nep_lo, %nep_hi}, %nep_h2;\n\t"
                  "cvt.f32.f16 $0, %nep_lo;\n\tcvt.f32.f16 $1, %nep_hi;\n\t}")


def _e4m3_dec_body(context, builder, args):
    s = _asm(builder, ir.LiteralStructType([_F32, _F32]), _E4M3_DEC_TEXT, "=f,=f,h", args,
             side_effect=False)
    return context.make_tuple(builder, _F32X2, [builder.extract_value(s, 0),
                                                builder.extract_value(s, 1)])


_E4M3_DEC_DOC = ("e4m3x2_to_f32x2(packed_u16) -> (float32, float32): emits "
                 "``cvt.rn.f16x2.e4m3x2`` then two ``cvt.f32.f16``: decodes two e4m3fn bytes "
                 "(low byte first in the result) exactly; 0x7F/0xFF decode to NaN.")
_export("e4m3x2_to_f32x2", _e4m3x2_to_f32x2_fb, "cvt.rn.f16x2.e4m3x2",
        lambda: _defn("e4m3x2_to_f32x2", _E4M3_DEC_DOC, (types.uint16,), _F32X2, _e4m3_dec_body),
        doc=_E4M3_DEC_DOC)


def _cvt_bf16x2_fb(lo, hi):
    b = f32_to_bf16_bits(np.array([lo, hi], dtype=np.float32))
    return np.uint32(int(b[0]) | (int(b[1]) << 16))


_simple("cvt_bf16x2",
        "cvt_bf16x2(lo, hi) -> uint32: emits ``cvt.rn.bf16x2.f32 d, hi, lo;``: two float32 to "
        "two bfloat16 packed with lo in the low half (array order in memory). Round to nearest "
        "even, overflow to inf, NaN -> 0x7FFF. Bit-exact host twin: f32_to_bf16_bits.",
        (types.float32, types.float32), types.uint32, "cvt.rn.bf16x2.f32 $0, $2, $1;",
        memory=False, side_effect=False, fallback=_cvt_bf16x2_fb)


def _cvt_bf16_fb(x):
    return np.uint16(f32_to_bf16_bits(np.array([x], dtype=np.float32))[0])


_simple("cvt_bf16",
        "cvt_bf16(x) -> uint16: emits ``cvt.rn.bf16.f32``: one float32 to bfloat16 bits, round to "
        "nearest even, NaN -> 0x7FFF.",
        (types.float32,), types.uint16, "cvt.rn.bf16.f32 $0, $1;", memory=False,
        side_effect=False, fallback=_cvt_bf16_fb)


def _bf16x2_to_f32x2_fb(packed):
    p = int(packed) & 0xFFFF_FFFF
    f = bf16_bits_to_f32(np.array([p & 0xFFFF, p >> 16], dtype=np.uint16))
    return (f[0], f[1])


def _bf16_dec_body(context, builder, args):
    (p,) = args
    lo = builder.bitcast(builder.shl(p, ir.Constant(_I32, 16)), _F32)
    hi = builder.bitcast(builder.and_(p, ir.Constant(_I32, 0xFFFF0000)), _F32)
    return context.make_tuple(builder, _F32X2, [lo, hi])


_BF16_DEC_DOC = ("bf16x2_to_f32x2(packed_u32) -> (float32, float32): the two bfloat16 halves "
                 "(low half first) as float32, exactly (LLVM shl/and + bitcast; no PTX cvt "
                 "needed).")
_export("bf16x2_to_f32x2", _bf16x2_to_f32x2_fb, "",
        lambda: _defn("bf16x2_to_f32x2", _BF16_DEC_DOC, (types.uint32,), _F32X2, _bf16_dec_body),
        doc=_BF16_DEC_DOC)


def _bf16_to_f32_fb(bits):
    return bf16_bits_to_f32(np.array([int(bits) & 0xFFFF], dtype=np.uint16))[0]


_BF16_TO_F32_DOC = ("bf16_to_f32(bits_u16) -> float32: one bfloat16 to float32, exactly (LLVM "
                    "shl + bitcast).")
_export("bf16_to_f32", _bf16_to_f32_fb, "",
        lambda: _defn("bf16_to_f32", _BF16_TO_F32_DOC, (types.uint16,), types.float32,
                      lambda c, b, a: b.bitcast(b.shl(b.zext(a[0], _I32), ir.Constant(_I32, 16)),
                                                _F32)), doc=_BF16_TO_F32_DOC)


def _bitcast_f32_u32_fb(x):
    return np.array([x], dtype=np.float32).view(np.uint32)[0]


def _bitcast_u32_f32_fb(x):
    return np.array([int(x) & 0xFFFF_FFFF], dtype=np.uint32).view(np.float32)[0]


_BC_F2U_DOC = "bitcast_f32_u32(x) -> uint32: the bits of a float32 (LLVM bitcast, no PTX)."
_BC_U2F_DOC = "bitcast_u32_f32(u) -> float32: a uint32's bits as a float32 (LLVM bitcast, no PTX)."
_export("bitcast_f32_u32", _bitcast_f32_u32_fb, "",
        lambda: _defn("bitcast_f32_u32", _BC_F2U_DOC, (types.float32,), types.uint32,
                      lambda c, b, a: b.bitcast(a[0], _I32)), doc=_BC_F2U_DOC)
_export("bitcast_u32_f32", _bitcast_u32_f32_fb, "",
        lambda: _defn("bitcast_u32_f32", _BC_U2F_DOC, (types.uint32,), types.float32,
                      lambda c, b, a: b.bitcast(a[0], _F32)), doc=_BC_U2F_DOC)


# Fast approximate math used by codecs (LogFMT); not bit-exact in the simulator.
def _ex2_fb(x):
    return np.float32(2.0 ** float(x)) if float(x) < 128 else np.float32(np.inf)


def _lg2_fb(x):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log2(np.float32(x))


_simple("ex2_approx",
        "ex2_approx(x) -> float32: emits ``ex2.approx.ftz.f32``: 2**x, max relative error ~2^-22 "
        "(subnormal inputs/outputs flushed to zero). (Simulator: exact 2**x in float32, not "
        "bit-exact with the GPU.)",
        (types.float32,), types.float32, "ex2.approx.ftz.f32 $0, $1;", memory=False,
        side_effect=False, fallback=_ex2_fb)
_simple("lg2_approx",
        "lg2_approx(x) -> float32: emits ``lg2.approx.ftz.f32``: log2(x), max absolute error "
        "~2^-22 near 1 (subnormals flushed). (Simulator: np.log2, not bit-exact.)",
        (types.float32,), types.float32, "lg2.approx.ftz.f32 $0, $1;", memory=False,
        side_effect=False, fallback=_lg2_fb)


# Tidy the module namespace: loop variables are not part of the API.
for _v in ("_s", "_nb", "_np", "_sfx", "_npt", "_pt", "_sem", "_name", "_text", "_op", "_meaning"):
    globals().pop(_v, None)
del _v
