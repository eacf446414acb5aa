"""NumPy reference of every numba_ep operation: the executable specification.

Every GPU kernel of numba_ep is checked against a function in this file. The functions here are
written for clarity, not speed; they run on the host with NumPy and ``ml_dtypes`` only (no GPU, no
numba), and simulate a whole expert-parallel (EP) group at once.

Conventions
-----------
Symbols used in shapes and docstrings:

==========  ===================================================================================
``T``       tokens on one rank (``T_r`` for rank ``r``; ranks may differ, ``T_r = 0`` is allowed)
``H``       hidden size (elements per token row)
``K``       top-k: expert slots per token; a slot holding ``-1`` selects nothing
``E``       experts in the whole group, numbered globally ``0 .. E-1``
``R``       ranks in the EP group
``L``       local experts per rank, ``L = E / R``; expert ``e`` lives on rank ``e // L`` as local
            expert ``e % L``
``C``       channels of the normal (intranode) kernels; channel ``c`` owns a contiguous block of
            each rank's tokens (see :func:`get_channel_task_range`)
``M``       ``num_max_dispatch_tokens_per_rank``: the per-rank token capacity of low-latency mode
``N``       rows received by one rank in normal dispatch
``S``       scale columns per token: ``H / 128`` float32 scales, or ``H / 512`` int32 words of
            packed UE8M0 exponents
==========  ===================================================================================

Multi-rank operations take **per-rank lists** (``x[r]`` is rank ``r``'s input) and return
per-rank lists, as if every rank of the group had called the operation together.

Data types on the host: ``bfloat16`` and ``float8_e4m3fn`` come from ``ml_dtypes``; expert ids are
int64 (``topk_idx_t``), int32 inputs are accepted; gate weights are float32. Conversions to bf16 and
e4m3 round to nearest, ties to even. Floating-point sums are accumulated in float32 in the order a
docstring states, so a GPU kernel that keeps that order matches bit for bit.

Rows of an output that the GPU leaves unspecified (padding beyond a real count) are filled here with
a documented **poison value**: zeros for data, scales and weights, ``-1`` for indices. Checkers must
compare only the valid prefix of such outputs (each result says how long it is).

Errors: invalid inputs raise ``ValueError`` naming the function, the argument, what was expected and
what came in. Checkers (``check_*``) raise ``AssertionError``.

Contents: metric (:func:`calc_diff`); layout (:func:`get_channel_task_range`,
:func:`get_dispatch_layout`); FP8 per-128 codec (:func:`per_token_cast_to_fp8`,
:func:`per_token_cast_back`, :func:`pack_ue8m0`, :func:`unpack_ue8m0`); LogFMT-10 codec
(:func:`logfmt10_encode`, :func:`logfmt10_decode`, :func:`logfmt10_roundtrip`, ...); intranode
normal mode (:func:`intranode_dispatch`, :func:`intranode_combine`); low-latency mode
(:func:`low_latency_dispatch`, :func:`check_low_latency_dispatch`, :func:`low_latency_combine`);
buffer sizes (:func:`low_latency_layout`, :func:`get_low_latency_rdma_size_hint`).
"""
from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float8_e4m3fn = np.dtype(ml_dtypes.float8_e4m3fn)

#: largest finite float8_e4m3fn value
FP8_E4M3_MAX = 448.0
#: floor applied to every per-128 amax before it becomes a scale
FP8_AMAX_FLOOR = 1e-4
#: channels that share one FP8 scale or one LogFMT (amax, amin) pair
BLOCK = 128

__all__ = [
    "calc_diff",
    "get_channel_task_range",
    "get_dispatch_layout",
    "per_token_cast_to_fp8",
    "per_token_cast_back",
    "pack_ue8m0",
    "unpack_ue8m0",
    "log2_f32",
    "logfmt10_params",
    "logfmt10_encode",
    "logfmt10_decode",
    "logfmt10_roundtrip",
    "logfmt10_pack_codes",
    "logfmt10_unpack_codes",
    "logfmt10_bytes_per_token",
    "LogFMT10Encoded",
    "LogFMT10Params",
    "intranode_dispatch",
    "intranode_combine",
    "low_latency_dispatch",
    "check_low_latency_dispatch",
    "low_latency_combine",
    "low_latency_layout",
    "get_low_latency_rdma_size_hint",
]


# ------------------------------------------------------------------------------------------------
# Input validation helpers: every message says function, argument, expected, got.
# ------------------------------------------------------------------------------------------------

def _describe(a) -> str:
    if a is None:
        return "None"
    if isinstance(a, np.ndarray):
        return f"array of shape {a.shape} and dtype {a.dtype}"
    if isinstance(a, (list, tuple)):
        return f"{type(a).__name__} of length {len(a)}"
    return f"{type(a).__name__} {a!r}"


def _bad(func: str, arg: str, expected: str, got) -> ValueError:
    if not isinstance(got, str):
        got = _describe(got)
    return ValueError(f"{func}(): argument '{arg}': expected {expected}, got {got}")


def _array(func: str, arg: str, a, ndim: int | None = None) -> np.ndarray:
    """np.asarray with a clear error for a wrong rank (number of dimensions)."""
    if a is None:
        raise _bad(func, arg, "an array", None)
    a = np.asarray(a)
    if ndim is not None and a.ndim != ndim:
        raise _bad(func, arg, f"a {ndim}-D array", a)
    return a


def _rank_list(func: str, arg: str, a, num_ranks: int | None = None, allow_none: bool = False):
    """Checks that ``a`` is a per-rank list (list or tuple, one entry per rank)."""
    if a is None and allow_none:
        return None
    if not isinstance(a, (list, tuple)):
        raise _bad(func, arg, "a per-rank list (one entry per rank)", a)
    if num_ranks is not None and len(a) != num_ranks:
        raise _bad(func, arg, f"a per-rank list of length {num_ranks}", a)
    return list(a)


def _int_arg(func: str, arg: str, v, minimum: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise _bad(func, arg, f"an integer >= {minimum}", v)
    return int(v)


def _topk_array(func: str, arg: str, idx, num_experts: int) -> np.ndarray:
    """Validates a ``[T, K]`` integer expert-id array with ids in ``[-1, E)``; returns int64."""
    idx = _array(func, arg, idx, ndim=2)
    if not (np.issubdtype(idx.dtype, np.integer)):
        raise _bad(func, arg, "an integer array (int64 or int32)", idx)
    bad = (idx < -1) | (idx >= num_experts)
    if bad.any():
        t, k = (int(i) for i in np.argwhere(bad)[0])
        raise _bad(func, arg, f"expert ids in [-1, {num_experts})",
                   f"{int(idx[t, k])} at [{t}, {k}]")
    return idx.astype(np.int64)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _align_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


# ------------------------------------------------------------------------------------------------
# Metric
# ------------------------------------------------------------------------------------------------

def calc_diff(x, y) -> float:
    """DeepEP's similarity metric between two arrays of the same shape.

    In float64: ``x, y = x + 1, y + 1``; returns ``1 - 2 * sum(x*y) / sum(x*x + y*y)``. It is 0 for
    identical arrays and grows with the squared relative difference. Tolerances used by the tests:
    5e-6 (BF16 normal mode), 9e-4 (low-latency FP8), 1e-5 (low-latency BF16), 1e-9 (weights).
    Two arrays that are both all ``-1`` give 0.0 (the 0/0 case). Any dtype that converts to float64
    is accepted (bf16 and e4m3 included).
    """
    x = np.asarray(x).astype(np.float64) + 1.0
    y = np.asarray(y).astype(np.float64) + 1.0
    if x.shape != y.shape:
        raise _bad("calc_diff", "y", f"the shape of x {x.shape}", f"shape {y.shape}")
    denominator = float(np.sum(x * x + y * y))
    if denominator == 0.0:
        return 0.0
    return float(1.0 - 2.0 * np.sum(x * y) / denominator)


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------

def get_channel_task_range(num_tokens: int, num_channels: int, channel: int) -> tuple[int, int]:
    """Token range ``[start, end)`` owned by ``channel`` in the normal kernels.

    Channels own contiguous blocks of ``ceil(T / C)`` tokens, in order; the last blocks are clipped
    to ``T`` and may be empty (e.g. ``T=3, C=2`` gives ``[0, 2)`` and ``[2, 3)``; ``T=1, C=3`` gives
    ``[0, 1)``, ``[1, 1)``, ``[1, 1)``). Because blocks are contiguous and ordered, "channel, then
    token order" is the same as plain token order.
    """
    func = "get_channel_task_range"
    num_tokens = _int_arg(func, "num_tokens", num_tokens, 0)
    num_channels = _int_arg(func, "num_channels", num_channels, 1)
    channel = _int_arg(func, "channel", channel, 0)
    if channel >= num_channels:
        raise _bad(func, "channel", f"a channel index in [0, {num_channels})", channel)
    per_channel = _ceil_div(num_tokens, num_channels)
    start = min(per_channel * channel, num_tokens)
    end = min(start + per_channel, num_tokens)
    return start, end


def _token_channels(num_tokens: int, num_channels: int) -> np.ndarray:
    """Channel of every token, ``[T] int64``."""
    per_channel = max(_ceil_div(num_tokens, num_channels), 1)
    return np.arange(num_tokens, dtype=np.int64) // per_channel


def get_dispatch_layout(topk_idx, num_experts: int, num_ranks: int, num_gpus_per_node=None):
    """Per-token routing summary computed from one rank's ``topk_idx``.

    Args:
        topk_idx: ``[T, K]`` int64 (or int32) global expert ids in ``[-1, E)``; ``-1`` slots are
            ignored.
        num_experts: ``E``, a multiple of ``num_ranks``.
        num_ranks: ``R``.
        num_gpus_per_node: ``G``, ranks per node for the internode (RDMA) count; ``R % G == 0``.

    Returns:
        ``(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)``

        - ``num_tokens_per_rank [R] int32``: tokens with at least one expert on rank ``r``
          (experts ``[r*L, (r+1)*L)``).
        - ``num_tokens_per_rdma_rank [R // G] int32``: tokens with at least one expert on node
          ``n`` (ranks ``[n*G, (n+1)*G)``); ``None`` when ``G`` is None or ``G >= R``.
        - ``num_tokens_per_expert [E] int32``: (token, slot) pairs selecting expert ``e``; a token
          that lists the same expert twice counts twice.
        - ``is_token_in_rank [T, R] bool``.
    """
    func = "get_dispatch_layout"
    num_ranks = _int_arg(func, "num_ranks", num_ranks, 1)
    num_experts = _int_arg(func, "num_experts", num_experts, 1)
    if num_experts % num_ranks != 0:
        raise _bad(func, "num_experts", f"a multiple of num_ranks={num_ranks}", num_experts)
    idx = _topk_array(func, "topk_idx", topk_idx, num_experts)
    num_local = num_experts // num_ranks
    num_tokens = idx.shape[0]

    valid = idx >= 0
    num_tokens_per_expert = np.bincount(idx[valid], minlength=num_experts).astype(np.int32)

    is_token_in_rank = np.zeros((num_tokens, num_ranks), dtype=bool)
    rows = np.nonzero(valid)[0]
    is_token_in_rank[rows, idx[valid] // num_local] = True
    num_tokens_per_rank = is_token_in_rank.sum(axis=0).astype(np.int32)

    num_tokens_per_rdma_rank = None
    if num_gpus_per_node is not None:
        gpus = _int_arg(func, "num_gpus_per_node", num_gpus_per_node, 1)
        if gpus < num_ranks:
            if num_ranks % gpus != 0:
                raise _bad(func, "num_gpus_per_node", f"a divisor of num_ranks={num_ranks}", gpus)
            in_node = is_token_in_rank.reshape(num_tokens, num_ranks // gpus, gpus).any(axis=2)
            num_tokens_per_rdma_rank = in_node.sum(axis=0).astype(np.int32)
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank


# ------------------------------------------------------------------------------------------------
# FP8 per-128-channel codec (e4m3, float32 or UE8M0 scales)
# ------------------------------------------------------------------------------------------------

def _float_rows(func: str, arg: str, x, multiple: int) -> np.ndarray:
    """``x [..., H]`` as float32 (exact for bf16/fp16/fp8 inputs), with ``H % multiple == 0``."""
    x = _array(func, arg, x)
    if x.ndim < 1:
        raise _bad(func, arg, "an array [..., H]", x)
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype in (bfloat16, float8_e4m3fn)):
        raise _bad(func, arg, "a floating-point array (bfloat16, float16 or float32)", x)
    if x.shape[-1] % multiple != 0:
        raise _bad(func, arg, f"a hidden size (last dimension) that is a multiple of {multiple}",
                   f"H={x.shape[-1]}")
    return x.astype(np.float32)


def _pow2_ceil_exponent(v: np.ndarray) -> np.ndarray:
    """``ceil(log2(v))`` for positive normal float32 ``v``, read from the exponent bits.

    The biased exponent field gives ``floor(log2 v)``; a non-zero mantissa adds one. This is the
    bit trick a GPU uses, so the result is exact (no transcendental function involved).
    """
    bits = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.int32) - 127
    return exponent + ((bits & 0x7FFFFF) != 0).astype(np.int32)


def _pow2_f32(exponent: np.ndarray) -> np.ndarray:
    """``2**exponent`` as float32, built from the exponent bits (``exponent`` in [-126, 127])."""
    return ((np.asarray(exponent, dtype=np.int64) + 127).astype(np.uint32) << 23).view(np.float32)


def per_token_cast_to_fp8(x, round_scale: bool = False, use_ue8m0: bool = False):
    """Quantises rows to float8_e4m3fn with one scale per (token, 128-channel block).

    Args:
        x: ``[T, H]`` (any leading dims allowed: ``[..., H]``) bfloat16, float16 or float32;
            ``H % 128 == 0`` (``H % 512 == 0`` with ``use_ue8m0``). Values must be finite.
        round_scale: make every scale an exact power of two.
        use_ue8m0: return the scales as packed UE8M0 exponents; requires ``round_scale``.

    Returns:
        ``(x_fp8 [T, H] float8_e4m3fn, scales)`` with ``scales`` either ``[T, H/128] float32`` (the
        ``scale_inv`` of each block), or with ``use_ue8m0`` ``[T, H/512] int32`` (see
        :func:`pack_ue8m0`). Dequantise with :func:`per_token_cast_back`.

    Exact arithmetic (every step float32, IEEE round-to-nearest-even, divisions exact as with
    ``div.rn.f32``, i.e. not fastmath; a GPU kernel that does the same gets the same bits):

    1. ``amax = max(max_i |x_i|, 1e-4)`` over the 128 channels of the block (``1e-4`` as float32);
    2. default: ``scale_inv = amax / 448`` and ``scale = 448 / amax`` (two float32 divisions);
       with ``round_scale``: ``scale_inv = 2**ceil(log2(amax / 448))`` where the float32 quotient
       ``amax / 448`` is rounded up to a power of two from its exponent bits, and
       ``scale = 2**-ceil(...)`` (exact);
    3. ``q_i = e4m3(clip(x_i * scale, -448, 448))``: float32 product, saturate to finite, then round
       to nearest even e4m3 (what ``cvt.rn.satfinite.e4m3x2.f32`` does).
    """
    func = "per_token_cast_to_fp8"
    if use_ue8m0 and not round_scale:
        raise _bad(func, "use_ue8m0", "use_ue8m0=True only together with round_scale=True",
                   "round_scale=False")
    xf = _float_rows(func, "x", x, 4 * BLOCK if use_ue8m0 else BLOCK)
    lead, hidden = xf.shape[:-1], xf.shape[-1]
    blocks = xf.reshape(*lead, hidden // BLOCK, BLOCK)

    amax = np.abs(blocks).max(axis=-1, initial=np.float32(0))
    amax = np.maximum(amax, np.float32(FP8_AMAX_FLOOR)).astype(np.float32)
    if round_scale:
        exponent = _pow2_ceil_exponent(amax / np.float32(FP8_E4M3_MAX))
        scale_inv = _pow2_f32(exponent)
        scale = _pow2_f32(-exponent)
    else:
        scale_inv = (amax / np.float32(FP8_E4M3_MAX)).astype(np.float32)
        scale = (np.float32(FP8_E4M3_MAX) / amax).astype(np.float32)

    scaled = (blocks * scale[..., None]).astype(np.float32)
    scaled = np.clip(scaled, np.float32(-FP8_E4M3_MAX), np.float32(FP8_E4M3_MAX))
    x_fp8 = scaled.astype(float8_e4m3fn).reshape(*lead, hidden)
    scales = pack_ue8m0(scale_inv) if use_ue8m0 else scale_inv
    return x_fp8, scales


def pack_ue8m0(scale_inv) -> np.ndarray:
    """Packs power-of-two float32 scales as UE8M0 exponent bytes, four per int32.

    Args:
        scale_inv: ``[..., S] float32``, every value an exact positive normal power of two;
            ``S % 4 == 0``.

    Returns:
        ``[..., S/4] int32``: byte ``j`` (little-endian, bits ``8j .. 8j+7``) of word ``i`` is the
        biased exponent ``(bits(scale_inv[4i + j]) >> 23) & 0xff``. Words whose top byte is >= 128
        are negative as int32.
    """
    func = "pack_ue8m0"
    s = _array(func, "scale_inv", scale_inv)
    if s.ndim < 1 or s.shape[-1] % 4 != 0:
        raise _bad(func, "scale_inv", "an array [..., S] with S a multiple of 4", s)
    s = s.astype(np.float32)
    bits = np.ascontiguousarray(s).view(np.uint32)
    exponent = (bits >> 23) & 0xFF
    bad = ((bits & 0x807FFFFF) != 0) | (exponent == 0) | (exponent == 0xFF)
    if bad.any():
        first = float(s.reshape(-1)[np.flatnonzero(bad)[0]])
        raise _bad(func, "scale_inv",
                   "positive normal powers of two (UE8M0 holds an exponent only)",
                   f"value {first!r}")
    exponent = exponent.reshape(*s.shape[:-1], s.shape[-1] // 4, 4)
    word = (exponent[..., 0] | (exponent[..., 1] << 8) | (exponent[..., 2] << 16)
            | (exponent[..., 3] << 24)).astype(np.uint32)
    return word.view(np.int32)


def unpack_ue8m0(packed) -> np.ndarray:
    """Inverse of :func:`pack_ue8m0`: ``[..., S/4] int32`` -> ``[..., S] float32``.

    Each byte ``b`` becomes the float32 whose bits are ``b << 23`` (``2**(b - 127)``; ``b = 0``
    gives 0.0, ``b = 255`` gives inf).
    """
    func = "unpack_ue8m0"
    p = _array(func, "packed", packed)
    if p.ndim < 1 or p.dtype not in (np.dtype(np.int32), np.dtype(np.uint32)):
        raise _bad(func, "packed", "an int32 array [..., S/4]", p)
    words = p.astype(np.int64) & 0xFFFFFFFF
    shifts = np.array([0, 8, 16, 24], dtype=np.int64)
    exponent = (words[..., None] >> shifts) & 0xFF
    exponent = exponent.reshape(*p.shape[:-1], p.shape[-1] * 4)
    return (exponent.astype(np.uint32) << 23).view(np.float32)


def per_token_cast_back(x_fp8, scales) -> np.ndarray:
    """Dequantises :func:`per_token_cast_to_fp8` output: ``float32 [..., H]``.

    Args:
        x_fp8: ``[..., H]`` float8_e4m3fn (a uint8 array is read as e4m3 bytes).
        scales: ``[..., H/128] float32`` scale_inv values, or ``[..., H/512] int32`` packed UE8M0.

    Returns ``x_fp8 * scale_inv`` per 128-channel block (one float32 multiply per element).
    """
    func = "per_token_cast_back"
    q = _array(func, "x_fp8", x_fp8)
    if q.dtype == np.uint8:
        q = q.view(float8_e4m3fn)
    if q.dtype != float8_e4m3fn:
        raise _bad(func, "x_fp8", "a float8_e4m3fn (or uint8) array [..., H]", q)
    s = _array(func, "scales", scales)
    hidden = q.shape[-1]
    if s.dtype in (np.dtype(np.int32), np.dtype(np.uint32)):
        s = unpack_ue8m0(s)
    elif s.dtype != np.float32:
        raise _bad(func, "scales", "float32 scale_inv or int32 packed UE8M0", s)
    if hidden % BLOCK != 0 or s.shape != (*q.shape[:-1], hidden // BLOCK):
        raise _bad(func, "scales", f"shape {(*q.shape[:-1], hidden // BLOCK)} "
                   f"(one scale per 128 channels of x_fp8 {q.shape})", f"shape {s.shape}")
    blocks = q.astype(np.float32).reshape(*q.shape[:-1], hidden // BLOCK, BLOCK)
    return (blocks * s[..., None]).astype(np.float32).reshape(q.shape)


# ------------------------------------------------------------------------------------------------
# LogFMT-10: 10-bit logarithmic codec of low-latency combine (use_logfmt=True)
# ------------------------------------------------------------------------------------------------
#
# Unit of work: one 128-channel *division* of a bf16 row. The sender stores per division the meta
# pair (amax, amin) as two bf16 values, then either 128 ten-bit codes (160 bytes) or, when the
# division is not encoded, the 128 raw bf16 values (256 bytes). The receiver re-derives from the
# meta alone whether a division is encoded and where its payload starts, so no flag travels.
#
# Wire format of one token row (reference for the kernel; H % 128 == 0, D = H / 128):
#   [D x (bf16 amax, bf16 amin)]               4*D bytes
#   [division 0 payload][division 1 payload]... 160 bytes if encoded else 256 bytes each
# An encoded payload is 8 groups of 16 values, each group 5 little-endian uint32 words made by
# logfmt10_pack_codes (the 16 nine-bit magnitudes as one 144-bit little-endian integer in words
# 0..3 and bits 0..15 of word 4; the 16 sign bits in bits 16..31 of word 4).

class LogFMT10Params(NamedTuple):
    """Per-division parameters derived from the meta (see :func:`logfmt10_params`)."""
    encoded: np.ndarray    #: bool: this division is sent as codes
    log_amax: np.ndarray   #: float32: log2_f32(amax)
    log_amin: np.ndarray   #: float32: max(log2_f32(amin), log_amax - 32)
    step: np.ndarray       #: float32: (log_amax - log_amin) / 510, used by the decoder
    inv_step: np.ndarray   #: float32: 510 / (log_amax - log_amin), used by the encoder


class LogFMT10Encoded(NamedTuple):
    """Result of :func:`logfmt10_encode` for ``x [..., H]`` (``D = H / 128`` divisions)."""
    amax: np.ndarray       #: bfloat16 [..., D]: max |v| of the division
    amin: np.ndarray       #: bfloat16 [..., D]: min |v| over the non-zero v (0 if none)
    encoded: np.ndarray    #: bool [..., D]
    codes: np.ndarray      #: uint16 [..., H]: bits 0..8 magnitude, bit 9 sign; 0 if not encoded
    raw: np.ndarray        #: bfloat16 [..., H]: the input as bf16 (the payload of raw divisions)


def log2_f32(a) -> np.ndarray:
    """``log2`` of non-negative float32 values, correctly rounded to float32 (``log2(0) = -inf``).

    Computed as float64 ``log2`` rounded once to float32. For every positive finite bfloat16 value
    this is the correctly rounded result (tests/test_reference.py checks all of them), so a GPU
    kernel can match it exactly, e.g. with a 128-entry float64 table of ``log2(1 + m/128)`` added
    to the exponent and rounded to float32, or by checking its own ``log2`` against this function
    on all 2**15 bf16 magnitudes.
    """
    a = np.asarray(a, dtype=np.float32).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log2(a).astype(np.float32)


def logfmt10_params(amax, amin) -> LogFMT10Params:
    """Derives the LogFMT-10 parameters of divisions from their (amax, amin) meta.

    With ``la = log2_f32(amax)`` and every operation in float32:

    - ``log_amin = max(log2_f32(amin), la - 32)``: at most 32 octaves of dynamic range;
    - ``encoded = amax > 0 and la < 0 and log_amin < la`` (all magnitudes below 1 and not all
      equal; divisions holding inf or NaN have ``la`` = inf/NaN and are never encoded);
    - ``d = la - log_amin``; ``step = d / 510``; ``inv_step = 510 / d`` (only where encoded; 0
      elsewhere).
    """
    amax = np.asarray(amax).astype(np.float32)
    amin = np.asarray(amin).astype(np.float32)
    with np.errstate(invalid="ignore"):
        log_amax = log2_f32(amax)
        log_amin = np.maximum(log2_f32(amin), (log_amax - np.float32(32)).astype(np.float32))
        encoded = (amax > 0) & (log_amax < 0) & (log_amin < log_amax)
    with np.errstate(invalid="ignore"):
        d = np.where(encoded, log_amax - log_amin, np.float32(1)).astype(np.float32)
    step = np.where(encoded, d / np.float32(510), np.float32(0)).astype(np.float32)
    inv_step = np.where(encoded, np.float32(510) / d, np.float32(0)).astype(np.float32)
    return LogFMT10Params(encoded, log_amax, log_amin.astype(np.float32), step, inv_step)


def _as_bf16(func: str, arg: str, x) -> np.ndarray:
    x = _array(func, arg, x)
    if x.dtype == bfloat16:
        return x
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32).astype(bfloat16)
    raise _bad(func, arg, "a bfloat16 (or float32/float16, rounded to bf16) array", x)


def logfmt10_encode(x) -> LogFMT10Encoded:
    """Encodes rows with LogFMT-10, one 128-channel division at a time.

    Args:
        x: ``[..., H]`` bfloat16 with ``H % 128 == 0`` (float32/float16 input is first rounded to
            bf16, as the combine sends bf16).

    Returns:
        :class:`LogFMT10Encoded`. The exact rules, which a GPU encoder must reproduce code for code
        (all arithmetic float32, round-to-nearest-even, ``log2_f32`` as defined above):

        1. Meta: ``amax = max |v|``, ``amin = min |v|`` over the non-zero ``v`` of the division
           (0 when all are zero). Both are bf16 values, so they travel exactly. On the GPU they can
           be taken as integer max/min of the magnitude bits ``bits(v) & 0x7fff`` (this order puts
           NaN above inf above every finite value).
        2. Parameters from :func:`logfmt10_params`; if not ``encoded`` the raw bf16 is sent.
        3. For each ``v`` of an encoded division with ``a = |v|``:
           ``t = (log2_f32(a) - log_amin) * inv_step`` (one subtraction, then one multiplication:
           no fused multiply-add can apply), ``r = rint(t)``, round to nearest, ties to even
           (``cvt.rni`` / ``rintf`` on the GPU; ``floor(t + 0.5)`` is NOT the same: it differs on
           ties, and the compiler may fuse it into an FMA);
           magnitude code ``c = 0`` if ``a == 0`` or ``r <= -1``, i.e. ``t < -0.5`` (values more than
           half a step below ``2**log_amin``, possible only when the range was clipped to 32
           octaves), else
           ``c = 1 + min(r, 510)`` (so ``1 <= c <= 511``; ``amax`` itself gets 511).
        4. ``code = c | (sign << 9)`` where ``sign`` is bit 15 of the bf16 (so -0.0 has sign 1).
    """
    func = "logfmt10_encode"
    raw = _as_bf16(func, "x", x)
    if raw.ndim < 1 or raw.shape[-1] % BLOCK != 0:
        raise _bad(func, "x", "an array [..., H] with H a multiple of 128", raw)
    lead, hidden = raw.shape[:-1], raw.shape[-1]
    bits = np.ascontiguousarray(raw).view(np.uint16).reshape(*lead, hidden // BLOCK, BLOCK)
    mag_bits = bits & np.uint16(0x7FFF)

    amax_bits = mag_bits.max(axis=-1, initial=0).astype(np.uint16)
    amin_bits = np.where(mag_bits == 0, np.uint16(0xFFFF), mag_bits).min(axis=-1, initial=0xFFFF)
    amin_bits = np.where(amin_bits == 0xFFFF, 0, amin_bits).astype(np.uint16)
    amax = amax_bits.view(bfloat16)
    amin = amin_bits.view(bfloat16)
    p = logfmt10_params(amax, amin)

    a = mag_bits.view(bfloat16).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        t = ((log2_f32(a) - p.log_amin[..., None]) * p.inv_step[..., None]).astype(np.float32)
        r = np.rint(t)
        magnitude = np.where((a == 0) | ~(r > -1), 0, 1 + np.minimum(r, 510))
    magnitude = np.where(p.encoded[..., None], magnitude, 0).astype(np.uint16)
    sign = (bits >> 15).astype(np.uint16)
    codes = np.where(p.encoded[..., None], magnitude | (sign << 9), 0).astype(np.uint16)
    return LogFMT10Encoded(amax, amin, p.encoded, codes.reshape(*lead, hidden), raw)


def logfmt10_decode(enc: LogFMT10Encoded) -> np.ndarray:
    """Decodes :func:`logfmt10_encode` output to ``float32 [..., H]``.

    The encoded flag, ``log_amin`` and ``step`` are re-derived from the meta (``amax``, ``amin``)
    as the receiver does. For an encoded division, magnitude code ``c`` decodes to 0 if ``c == 0``,
    else to ``2**e`` with ``e = float32(c - 1) * step + log_amin`` (float32 multiply, then float32
    add), the sign from bit 9. Raw divisions return the bf16 values. A GPU decoder may use an
    approximate ``exp2`` (``ex2.approx``): only the codes must match bit for bit.
    Relative error of an encoded value ``v`` with ``|v| >= 2**log_amin``: about ``2**(step/2) - 1``
    (at most 2.2% at the full 32-octave range, ``step = 32/510``).
    """
    func = "logfmt10_decode"
    if not isinstance(enc, LogFMT10Encoded):
        raise _bad(func, "enc", "a LogFMT10Encoded (from logfmt10_encode)", enc)
    raw = np.asarray(enc.raw)
    lead, hidden = raw.shape[:-1], raw.shape[-1]
    p = logfmt10_params(enc.amax, enc.amin)
    codes = np.asarray(enc.codes).astype(np.int64).reshape(*lead, hidden // BLOCK, BLOCK)
    magnitude = codes & 0x1FF
    negative = ((codes >> 9) & 1) == 1
    exponent = ((magnitude - 1).astype(np.float32) * p.step[..., None]).astype(np.float32)
    exponent = (exponent + p.log_amin[..., None]).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        value = np.exp2(exponent.astype(np.float64)).astype(np.float32)
    value = np.where(magnitude == 0, np.float32(0), value)
    value = np.where(negative, -value, value)
    raw_f32 = raw.astype(np.float32).reshape(*lead, hidden // BLOCK, BLOCK)
    out = np.where(p.encoded[..., None], value, raw_f32).astype(np.float32)
    return out.reshape(*lead, hidden)


def logfmt10_roundtrip(x) -> np.ndarray:
    """``logfmt10_decode(logfmt10_encode(x))``: what the combine receiver sees, float32
    ``[..., H]``."""
    return logfmt10_decode(logfmt10_encode(x))


def logfmt10_pack_codes(codes) -> np.ndarray:
    """Packs 10-bit codes, 16 at a time, into 5 uint32 words: ``[..., 16n] -> uint32 [..., 5n]``.

    For a group of 16 codes ``c_i`` (magnitude ``m_i = c_i & 0x1ff``, sign ``s_i = c_i >> 9``):
    the 144-bit integer ``sum(m_i << 9i)`` fills words 0..3 and bits 0..15 of word 4 (word ``j``
    holds bits ``32j .. 32j+31``); bit ``16 + i`` of word 4 is ``s_i``.
    """
    func = "logfmt10_pack_codes"
    c = _array(func, "codes", codes)
    if c.ndim < 1 or c.shape[-1] % 16 != 0 or not np.issubdtype(c.dtype, np.integer):
        raise _bad(func, "codes", "an integer array [..., 16n] of 10-bit codes", c)
    lead, n = c.shape[:-1], c.shape[-1] // 16
    c = c.astype(np.uint64).reshape(*lead, n, 16)
    magnitude, sign = c & 0x1FF, (c >> 9) & 1
    words = np.zeros((*lead, n, 5), dtype=np.uint64)
    for i in range(16):
        word, offset = divmod(9 * i, 32)
        words[..., word] |= (magnitude[..., i] << np.uint64(offset)) & 0xFFFFFFFF
        if offset + 9 > 32:
            words[..., word + 1] |= magnitude[..., i] >> np.uint64(32 - offset)
        words[..., 4] |= sign[..., i] << np.uint64(16 + i)
    return words.astype(np.uint32).reshape(*lead, 5 * n)


def logfmt10_unpack_codes(words) -> np.ndarray:
    """Inverse of :func:`logfmt10_pack_codes`: ``uint32 [..., 5n] -> uint16 [..., 16n]``."""
    func = "logfmt10_unpack_codes"
    w = _array(func, "words", words)
    if w.ndim < 1 or w.shape[-1] % 5 != 0 or not np.issubdtype(w.dtype, np.integer):
        raise _bad(func, "words", "an integer array [..., 5n] of packed uint32 words", w)
    lead, n = w.shape[:-1], w.shape[-1] // 5
    w = (w.astype(np.int64) & 0xFFFFFFFF).astype(np.uint64).reshape(*lead, n, 5)
    codes = np.zeros((*lead, n, 16), dtype=np.uint64)
    for i in range(16):
        word, offset = divmod(9 * i, 32)
        m = w[..., word] >> np.uint64(offset)
        if offset + 9 > 32:
            m |= w[..., word + 1] << np.uint64(32 - offset)
        codes[..., i] = (m & 0x1FF) | (((w[..., 4] >> np.uint64(16 + i)) & 1) << np.uint64(9))
    return codes.astype(np.uint16).reshape(*lead, 16 * n)


def logfmt10_bytes_per_token(hidden: int) -> int:
    """Bytes of a LogFMT-10 row when every division is encoded: ``H*10/8 + (H/128)*4``.

    This is the figure used for bandwidth accounting (DeepEP's convention); the receive slot still
    reserves the worst case ``2H + (H/128)*4`` (``combine_msg_bytes`` of
    :func:`low_latency_layout`). ``H`` must be a multiple of 128.
    """
    hidden = _int_arg("logfmt10_bytes_per_token", "hidden", hidden, 1)
    if hidden % BLOCK != 0:
        raise _bad("logfmt10_bytes_per_token", "hidden", "a multiple of 128", hidden)
    return hidden * 10 // 8 + (hidden // BLOCK) * 4


# ------------------------------------------------------------------------------------------------
# Intranode normal mode: dispatch and combine
# ------------------------------------------------------------------------------------------------

def intranode_dispatch(x, topk_idx, topk_weights, num_experts, num_channels, x_scales=None,
                       expert_alignment=1, num_worst_tokens=0, is_token_in_rank=None,
                       num_tokens_per_expert=None):
    """Normal-mode dispatch inside one node: every rank sends each token to every rank that hosts
    one of its experts (once per rank, however many of its experts live there).

    Args (per-rank lists, index = rank, ``R = len(x)``):
        x: ``x[r] [T_r, H]``, any dtype (rows are copied bit for bit); same ``H`` and dtype on all
            ranks.
        topk_idx: ``topk_idx[r] [T_r, K]`` int64/int32 global expert ids in ``[-1, E)``, or None
            (then the routing comes from ``is_token_in_rank`` and no top-k is dispatched).
        topk_weights: ``topk_weights[r] [T_r, K]`` float32, or None. Needs ``topk_idx``.
        num_experts: ``E``, a multiple of ``R`` (may be None when ``topk_idx`` is None and
            ``num_tokens_per_expert`` is not given).
        num_channels: ``C >= 1``.
        x_scales: ``x_scales[r] [T_r, S]`` (float32, or int32 packed UE8M0), or None; copied as is.
        expert_alignment: round each per-expert count up to a multiple of this (``>= 1``).
        num_worst_tokens: if > 0, every rank returns exactly this many rows (no host sync on the
            GPU); ``ValueError`` if a rank receives more.
        is_token_in_rank: ``is_token_in_rank[r] [T_r, R] bool``; used only when ``topk_idx`` is
            None.
        num_tokens_per_expert: ``num_tokens_per_expert[r] [E]`` int; used only when ``topk_idx`` is
            None, to produce ``num_recv_tokens_per_expert_list``.

    Returns a list with one dict per rank ``d`` (``N`` = rows of its outputs: the real count, or
    ``num_worst_tokens``):

    - ``recv_x [N, H]`` (dtype of x): rows ordered by source rank ascending, then channel, then the
      source's token order (channels are contiguous, so: source rank, then token index).
    - ``recv_x_scales [N, S]`` or None.
    - ``recv_topk_idx [N, K] int64``: LOCAL expert ids (``global - d*L`` where the expert is on
      rank d, else -1); None without topk.
    - ``recv_topk_weights [N, K] float32``: the weight where the local id is valid, 0.0 elsewhere;
      None without weights.
    - ``num_recv_tokens_per_expert_list``: list of ``L`` ints, for each local expert the number of
      (token, slot) pairs it received summed over sources, rounded up to ``expert_alignment``.
      Empty list when ``num_worst_tokens > 0``, or when neither ``topk_idx`` nor
      ``num_tokens_per_expert`` was given.
    - ``rank_prefix_matrix [R, R] int32`` (same on every rank): ``[i][j]`` = tokens sent from ranks
      ``0..i`` to rank ``j``. Rank ``s``'s block in ``recv_x`` of rank ``d`` is rows
      ``[rank_prefix_matrix[s-1][d], rank_prefix_matrix[s][d])``.
    - ``channel_prefix_matrix [R, C] int32`` (sender side): ``[dst][c]`` = this rank's tokens in
      channels ``0..c`` that go to ``dst`` (inclusive prefix).
    - ``recv_channel_prefix_matrix [R, C] int32`` (receiver side): ``[src][c]`` = offset of channel
      ``c``'s first token inside the ``src`` block of ``recv_x`` (exclusive prefix).
    - ``recv_src_idx [N] int32``: index of each row in its source rank's ``x``.
    - ``is_token_in_rank [T_d, R] bool``: this rank's own routing (sender side).
    - ``send_head [T_d, R] int32``: for my token ``t`` and destination ``j``: how many earlier
      tokens of ``t``'s channel also go to ``j`` (the ring-slot counter the token takes), or -1 if
      ``t`` does not go to ``j``. The row of ``t`` in rank ``j``'s ``recv_x`` is
      ``rank_prefix_matrix[d-1][j] + recv_channel_prefix_matrix_j[d][c] + send_head[t][j]``.
    - ``num_recv_tokens``: the real number of received rows.

    Padding rows (``num_recv_tokens <= row < num_worst_tokens``) have ``recv_topk_idx = -1`` (a
    guarantee) and poison elsewhere (unspecified on the GPU): zeros in ``recv_x``,
    ``recv_x_scales`` and ``recv_topk_weights``, -1 in ``recv_src_idx``.
    """
    func = "intranode_dispatch"
    x = _rank_list(func, "x", x)
    num_ranks = len(x)
    if num_ranks < 1:
        raise _bad(func, "x", "a per-rank list with at least one rank", x)
    xs = [_array(func, f"x[{r}]", a, ndim=2) for r, a in enumerate(x)]
    hidden, dtype = xs[0].shape[1], xs[0].dtype
    for r, a in enumerate(xs):
        if a.shape[1] != hidden or a.dtype != dtype:
            raise _bad(func, f"x[{r}]", f"[T, {hidden}] of dtype {dtype} like x[0]", a)
    num_tokens = [a.shape[0] for a in xs]
    num_channels = _int_arg(func, "num_channels", num_channels, 1)
    expert_alignment = _int_arg(func, "expert_alignment", expert_alignment, 1)
    num_worst_tokens = _int_arg(func, "num_worst_tokens", num_worst_tokens, 0)

    # --- routing: from topk_idx (normal) or from is_token_in_rank (e.g. cached-style calls)
    num_local = None
    if num_experts is not None:
        num_experts = _int_arg(func, "num_experts", num_experts, 1)
        if num_experts % num_ranks != 0:
            raise _bad(func, "num_experts", f"a multiple of the rank count {num_ranks}",
                       num_experts)
        num_local = num_experts // num_ranks
    topk, weights, per_expert = None, None, None
    if topk_idx is not None:
        if num_experts is None:
            raise _bad(func, "num_experts", "an integer when topk_idx is given", None)
        topk_list = _rank_list(func, "topk_idx", topk_idx, num_ranks)
        topk = [_topk_array(func, f"topk_idx[{r}]", a, num_experts)
                for r, a in enumerate(topk_list)]
        num_topk = topk[0].shape[1]
        for r, a in enumerate(topk):
            if a.shape != (num_tokens[r], num_topk):
                raise _bad(func, f"topk_idx[{r}]", f"shape ({num_tokens[r]}, {num_topk})", a)
        layouts = [get_dispatch_layout(a, num_experts, num_ranks) for a in topk]
        routing = [lay[3] for lay in layouts]
        per_expert = [lay[2] for lay in layouts]
        if topk_weights is not None:
            w_list = _rank_list(func, "topk_weights", topk_weights, num_ranks)
            weights = []
            for r, w in enumerate(w_list):
                w = _array(func, f"topk_weights[{r}]", w, ndim=2)
                if w.shape != topk[r].shape or not np.issubdtype(w.dtype, np.floating):
                    raise _bad(func, f"topk_weights[{r}]", f"float32 of shape {topk[r].shape}", w)
                weights.append(w.astype(np.float32))
    else:
        if topk_weights is not None:
            raise _bad(func, "topk_weights", "None when topk_idx is None", topk_weights)
        itr_list = _rank_list(func, "is_token_in_rank", is_token_in_rank, num_ranks,
                              allow_none=True)
        if itr_list is None:
            raise _bad(func, "is_token_in_rank", "a per-rank list when topk_idx is None", None)
        routing = []
        for r, a in enumerate(itr_list):
            a = _array(func, f"is_token_in_rank[{r}]", a, ndim=2)
            if a.shape != (num_tokens[r], num_ranks) or a.dtype != np.bool_:
                raise _bad(func, f"is_token_in_rank[{r}]", f"bool of shape ({num_tokens[r]}, "
                           f"{num_ranks})", a)
            routing.append(a)
        if num_tokens_per_expert is not None:
            if num_local is None:
                raise _bad(func, "num_experts", "an integer when num_tokens_per_expert is given",
                           None)
            npe = _rank_list(func, "num_tokens_per_expert", num_tokens_per_expert, num_ranks)
            per_expert = []
            for r, a in enumerate(npe):
                a = _array(func, f"num_tokens_per_expert[{r}]", a, ndim=1)
                if a.shape != (num_experts,):
                    raise _bad(func, f"num_tokens_per_expert[{r}]", f"shape ({num_experts},)", a)
                per_expert.append(a.astype(np.int64))

    scales = None
    if x_scales is not None:
        sc_list = _rank_list(func, "x_scales", x_scales, num_ranks)
        scales = [_array(func, f"x_scales[{r}]", a, ndim=2) for r, a in enumerate(sc_list)]
        num_scales, sdtype = scales[0].shape[1], scales[0].dtype
        for r, a in enumerate(scales):
            if a.shape != (num_tokens[r], num_scales) or a.dtype != sdtype:
                raise _bad(func, f"x_scales[{r}]", f"shape ({num_tokens[r]}, {num_scales}) and "
                           f"dtype {sdtype}", a)

    # --- sender side: per (source, destination, channel) counts and ring counters
    channel_prefix, send_head = [], []
    for s in range(num_ranks):
        counts = np.zeros((num_ranks, num_channels), dtype=np.int64)
        head = np.full((num_tokens[s], num_ranks), -1, dtype=np.int32)
        for d in range(num_ranks):
            for c in range(num_channels):
                start, end = get_channel_task_range(num_tokens[s], num_channels, c)
                selected = routing[s][start:end, d]
                counts[d, c] = selected.sum()
                head[start:end, d] = np.where(selected, np.cumsum(selected) - 1, -1)
        channel_prefix.append(np.cumsum(counts, axis=1).astype(np.int32))
        send_head.append(head)
    sent = np.array([[routing[s][:, d].sum() for d in range(num_ranks)]
                     for s in range(num_ranks)], dtype=np.int64).reshape(num_ranks, num_ranks)
    rank_prefix = np.cumsum(sent, axis=0).astype(np.int32)

    # --- receiver side
    results = []
    for d in range(num_ranks):
        num_recv = int(rank_prefix[-1, d])
        if num_worst_tokens > 0 and num_recv > num_worst_tokens:
            raise _bad(func, "num_worst_tokens", f"at least the {num_recv} rows rank {d} receives",
                       num_worst_tokens)
        rows = num_worst_tokens if num_worst_tokens > 0 else num_recv
        src_tokens = [np.nonzero(routing[s][:, d])[0] for s in range(num_ranks)]
        recv_src_idx = np.full(rows, -1, dtype=np.int32)
        recv_src_idx[:num_recv] = np.concatenate(src_tokens) if num_recv else []
        recv_x = np.zeros((rows, hidden), dtype=dtype)
        for s in range(num_ranks):
            begin = int(rank_prefix[s - 1, d]) if s > 0 else 0
            recv_x[begin:begin + len(src_tokens[s])] = xs[s][src_tokens[s]]
        recv_scales = None
        if scales is not None:
            recv_scales = np.zeros((rows, scales[0].shape[1]), dtype=scales[0].dtype)
            if num_recv:
                recv_scales[:num_recv] = np.concatenate(
                    [scales[s][src_tokens[s]] for s in range(num_ranks)])
        recv_channel_prefix = np.zeros((num_ranks, num_channels), dtype=np.int32)
        for s in range(num_ranks):
            recv_channel_prefix[s, 1:] = channel_prefix[s][d, :-1]

        recv_topk_idx = recv_topk_weights = None
        if topk is not None:
            recv_topk_idx = np.full((rows, topk[0].shape[1]), -1, dtype=np.int64)
            if num_recv:
                glob = np.concatenate([topk[s][src_tokens[s]] for s in range(num_ranks)])
                local = glob - d * num_local
                is_local = (glob >= 0) & (local >= 0) & (local < num_local)
                recv_topk_idx[:num_recv] = np.where(is_local, local, -1)
            if weights is not None:
                recv_topk_weights = np.zeros((rows, topk[0].shape[1]), dtype=np.float32)
                if num_recv:
                    w = np.concatenate([weights[s][src_tokens[s]] for s in range(num_ranks)])
                    recv_topk_weights[:num_recv] = np.where(recv_topk_idx[:num_recv] >= 0, w,
                                                            np.float32(0))

        per_expert_list = []
        if num_worst_tokens == 0 and per_expert is not None:
            total = sum(per_expert[s][d * num_local:(d + 1) * num_local] for s in range(num_ranks))
            per_expert_list = [_align_up(int(v), expert_alignment) for v in total]

        results.append({
            "recv_x": recv_x,
            "recv_x_scales": recv_scales,
            "recv_topk_idx": recv_topk_idx,
            "recv_topk_weights": recv_topk_weights,
            "num_recv_tokens_per_expert_list": per_expert_list,
            "rank_prefix_matrix": rank_prefix.copy(),
            "channel_prefix_matrix": channel_prefix[d],
            "recv_channel_prefix_matrix": recv_channel_prefix,
            "recv_src_idx": recv_src_idx,
            "is_token_in_rank": routing[d].copy(),
            "send_head": send_head[d],
            "num_recv_tokens": num_recv,
        })
    return results


def _split_bias(func: str, r: int, b, shape) -> list:
    """Per-rank bias entry -> list of 0, 1 or 2 float32 arrays of ``shape``."""
    if b is None:
        return []
    parts = list(b) if isinstance(b, (tuple, list)) else [b]
    if len(parts) > 2:
        raise _bad(func, f"bias[{r}]", "None, one array or a 2-tuple of arrays", b)
    out = []
    for i, p in enumerate(parts):
        if p is None:
            continue
        p = _array(func, f"bias[{r}][{i}]", p)
        if p.shape != shape:
            raise _bad(func, f"bias[{r}][{i}]", f"shape {shape}", p)
        out.append(p.astype(np.float32))
    return out


def intranode_combine(x, handles, topk_weights=None, bias=None):
    """Normal-mode combine: the exact reverse of :func:`intranode_dispatch`, an UNWEIGHTED sum.

    Args (per-rank lists, ``R = len(x)``):
        x: ``x[r] [N_r, H]`` (bfloat16, float16 or float32): rank ``r``'s expert output, rows in
            the order of its ``recv_x`` (``N_r`` = rows of that ``recv_x``, padding included).
            Each rank must already have reduced its own local experts (e.g. ``sum_k w_k*y_k``).
        handles: ``handles[r]`` = the dict :func:`intranode_dispatch` returned for rank ``r``; the
            keys used are ``is_token_in_rank``, ``send_head``, ``rank_prefix_matrix``,
            ``recv_channel_prefix_matrix``, ``channel_prefix_matrix`` (for ``C``) and
            ``recv_src_idx`` (checked for consistency).
        topk_weights: None, or ``topk_weights[r] [N_r, K] float32`` (rows like ``x[r]``).
        bias: None, or per rank: None, one ``[T_r, H]`` array, or a 2-tuple of them (either may be
            None).

    Returns a list of ``(combined_x [T_r, H] dtype of x, combined_topk_weights [T_r, K] float32
    or None)`` per rank. For token ``t`` of rank ``s``, with ``row_d`` its row on destination ``d``
    (see ``send_head`` in :func:`intranode_dispatch`):

    ``combined_x[t] = cast(((0 + bias0[t]) + bias1[t]) + x_d0[row_d0] + x_d1[row_d1] + ...)``

    accumulated in float32 in exactly that order (bias0, bias1, then destinations ascending), then
    cast to the dtype of ``x`` (round to nearest even). A token sent nowhere gets the bias sum (or
    zeros). ``combined_topk_weights[t] = sum_d topk_weights_d[row_d]`` in float32, destinations
    ascending; since dispatch zeroed non-local slots this rebuilds the original weight row.
    """
    func = "intranode_combine"
    x = _rank_list(func, "x", x)
    num_ranks = len(x)
    handles = _rank_list(func, "handles", handles, num_ranks)
    xs = [_array(func, f"x[{r}]", a, ndim=2) for r, a in enumerate(x)]
    dtype = xs[0].dtype
    if not (np.issubdtype(dtype, np.floating) or dtype == bfloat16):
        raise _bad(func, "x[0]", "a bfloat16, float16 or float32 array", xs[0])
    hidden = xs[0].shape[1]
    for r, a in enumerate(xs):
        rows = len(handles[r]["recv_src_idx"])
        if a.shape != (rows, hidden) or a.dtype != dtype:
            raise _bad(func, f"x[{r}]", f"shape ({rows}, {hidden}) (rows of rank {r}'s recv_x) "
                       f"and dtype {dtype}", a)
    weights = None
    if topk_weights is not None:
        w_list = _rank_list(func, "topk_weights", topk_weights, num_ranks)
        weights = [_array(func, f"topk_weights[{r}]", w, ndim=2) for r, w in enumerate(w_list)]
        num_topk = weights[0].shape[1]
        for r, w in enumerate(weights):
            if w.shape != (xs[r].shape[0], num_topk):
                raise _bad(func, f"topk_weights[{r}]", f"shape ({xs[r].shape[0]}, {num_topk})", w)
        weights = [w.astype(np.float32) for w in weights]
    biases = _rank_list(func, "bias", bias, num_ranks, allow_none=True)

    results = []
    for s in range(num_ranks):
        routing = np.asarray(handles[s]["is_token_in_rank"], dtype=bool)
        head = np.asarray(handles[s]["send_head"])
        num_tokens = routing.shape[0]
        num_channels = np.asarray(handles[s]["channel_prefix_matrix"]).shape[1]
        channel_of = _token_channels(num_tokens, num_channels)

        acc = np.zeros((num_tokens, hidden), dtype=np.float32)
        for b in _split_bias(func, s, None if biases is None else biases[s], (num_tokens, hidden)):
            acc = (acc + b).astype(np.float32)
        acc_w = None if weights is None else np.zeros((num_tokens, weights[0].shape[1]), np.float32)
        for d in range(num_ranks):
            tokens = np.nonzero(routing[:, d])[0]
            if tokens.size == 0:
                continue
            rank_offset = int(handles[d]["rank_prefix_matrix"][s - 1][d]) if s > 0 else 0
            recv_channel_prefix = np.asarray(handles[d]["recv_channel_prefix_matrix"])
            rows = rank_offset + recv_channel_prefix[s][channel_of[tokens]] + head[tokens, d]
            recv_src_idx = np.asarray(handles[d]["recv_src_idx"])
            if (head[tokens, d] < 0).any() or rows.max() >= len(recv_src_idx) or \
                    (recv_src_idx[rows] != tokens).any():
                raise _bad(func, "handles", f"consistent handles (rank {s}'s tokens located "
                           f"through send_head on rank {d} must match its recv_src_idx)",
                           "inconsistent send_head / prefix matrices / recv_src_idx")
            acc[tokens] = (acc[tokens] + xs[d][rows].astype(np.float32)).astype(np.float32)
            if acc_w is not None:
                acc_w[tokens] = (acc_w[tokens] + weights[d][rows]).astype(np.float32)
        results.append((acc.astype(dtype), acc_w))
    return results


# ------------------------------------------------------------------------------------------------
# Internode normal mode (two hops: RDMA between nodes, then NVLink inside the node)
# ------------------------------------------------------------------------------------------------

def _ring_counters(selected: np.ndarray, num_channels: int) -> np.ndarray:
    """For ``selected [T, X] bool``: per column, how many earlier tokens of the same channel are
    selected (the ring-slot counter a token takes), or -1 where not selected. ``[T, X] int32``."""
    num_tokens = selected.shape[0]
    out = np.full(selected.shape, -1, dtype=np.int32)
    for c in range(num_channels):
        start, end = get_channel_task_range(num_tokens, num_channels, c)
        block = selected[start:end]
        out[start:end] = np.where(block, np.cumsum(block, axis=0) - 1, -1)
    return out


def _channel_counts(selected: np.ndarray, num_channels: int) -> np.ndarray:
    """``[X, C] int64``: selected tokens per column and channel."""
    counts = np.zeros((selected.shape[1], num_channels), dtype=np.int64)
    for c in range(num_channels):
        start, end = get_channel_task_range(selected.shape[0], num_channels, c)
        counts[:, c] = selected[start:end].sum(axis=0)
    return counts


def internode_dispatch(x, topk_idx, topk_weights, num_experts, num_channels, num_gpus_per_node,
                       x_scales=None, expert_alignment=1, is_token_in_rank=None,
                       num_tokens_per_expert=None):
    """Normal-mode dispatch across nodes of ``G = num_gpus_per_node`` ranks each (rank
    ``r = n*G + g``: node ``n``, local GPU ``g``; ``R % G == 0``, ``N_nodes = R / G``).

    A token of rank ``(a, i)`` bound for rank ``(b, j)`` travels once per destination node:
    RDMA to ``(b, i)`` (the same local GPU on node ``b``; no hop when ``a == b``), then NVLink
    from that forwarder to ``(b, j)``. The user-visible results are exactly those of
    :func:`intranode_dispatch` of the same inputs (rows by global source rank, then channel, then
    token order; same top-k, weights, per-expert counts). Each rank's dict adds its handle:

    - ``is_token_in_rank [T, R] bool``: mine (sender side).
    - ``rdma_channel_prefix_matrix [N_nodes, C] int32``: my tokens in channels ``0..c`` that go
      to node ``n`` (any of its GPUs); inclusive prefix.
    - ``gbl_channel_prefix_matrix [R, C] int32``: the same per destination rank (=
      ``channel_prefix_matrix``).
    - ``recv_rdma_channel_prefix_matrix [N_nodes, C] int32``: as forwarder ``(b, i)``: tokens of
      rank ``(a, i)`` in channels ``0..c`` that come to my node; inclusive prefix per source node.
    - ``recv_rdma_rank_prefix_sum [N_nodes] int32``: inclusive prefix over source nodes of those
      totals; its last value is ``num_rdma_recv_tokens``. The RDMA-received tokens are numbered
      by source node, then channel, then token order.
    - ``recv_gbl_channel_prefix_matrix [R, C] int32``: row in ``recv_x`` where the block of
      (source rank, channel) starts.
    - ``recv_gbl_rank_prefix_sum [R] int32``: inclusive prefix over source ranks of the rows I
      receive (= column ``d`` of ``rank_prefix_matrix``).
    - ``recv_src_meta [N, 2] int32``: per received row, the source node and a bit mask of the
      GPUs of my node the token goes to (DeepEP's ``SourceMeta``).
    - ``send_rdma_head [T, N_nodes] int32``: my token's slot counter in the RDMA ring of its
      channel toward node ``n`` (earlier tokens of the channel bound for ``n``), or -1.
    - ``send_nvl_head [num_rdma_recv_tokens, G] int32``: as forwarder, each RDMA-received token's
      slot counter in the NVLink ring toward local GPU ``j`` of its channel and source node (one
      sub-ring per source node, so the counter depends on the routing only), or -1.
    - ``num_rdma_recv_tokens``: the RDMA-received token count (including my own node's).

    ``num_worst_tokens`` is not supported here (DeepEP's internode mode asserts it is 0).
    """
    func = "internode_dispatch"
    x = _rank_list(func, "x", x)
    num_ranks = len(x)
    gpus = _int_arg(func, "num_gpus_per_node", num_gpus_per_node, 1)
    if num_ranks % gpus:
        raise _bad(func, "num_gpus_per_node", f"a divisor of the rank count {num_ranks}", gpus)
    nodes = num_ranks // gpus
    C = _int_arg(func, "num_channels", num_channels, 1)
    base = intranode_dispatch(x, topk_idx, topk_weights, num_experts, C, x_scales=x_scales,
                              expert_alignment=expert_alignment,
                              is_token_in_rank=is_token_in_rank,
                              num_tokens_per_expert=num_tokens_per_expert)
    routing = [b["is_token_in_rank"] for b in base]
    in_node = [r.reshape(r.shape[0], nodes, gpus).any(axis=2) for r in routing]
    # [source rank] -> [N_nodes, C] tokens per destination node and channel
    node_counts = [_channel_counts(n, C) for n in in_node]

    results = []
    for d in range(num_ranks):
        b, i = divmod(d, gpus)
        out = dict(base[d])
        out["rdma_channel_prefix_matrix"] = np.cumsum(node_counts[d], axis=1).astype(np.int32)
        out["gbl_channel_prefix_matrix"] = base[d]["channel_prefix_matrix"]
        sources = [a * gpus + i for a in range(nodes)]  # the ranks whose RDMA lands on me
        from_node = np.stack([node_counts[s][b] for s in sources])  # [N_nodes, C]
        out["recv_rdma_channel_prefix_matrix"] = np.cumsum(from_node, axis=1).astype(np.int32)
        out["recv_rdma_rank_prefix_sum"] = np.cumsum(from_node.sum(axis=1)).astype(np.int32)
        rank_prefix = base[d]["rank_prefix_matrix"][:, d].astype(np.int64)
        block_start = np.concatenate([[0], rank_prefix[:-1]])
        out["recv_gbl_channel_prefix_matrix"] = (
            block_start[:, None] + base[d]["recv_channel_prefix_matrix"]).astype(np.int32)
        out["recv_gbl_rank_prefix_sum"] = rank_prefix.astype(np.int32)
        metas = []
        for s in range(num_ranks):
            rows = np.nonzero(routing[s][:, d])[0]
            mask = (routing[s][rows, b * gpus:(b + 1) * gpus].astype(np.int64)
                    << np.arange(gpus, dtype=np.int64)).sum(axis=1)
            metas.append(np.stack([np.full(len(rows), s // gpus), mask], axis=1))
        out["recv_src_meta"] = (np.concatenate(metas).astype(np.int32) if metas
                                else np.zeros((0, 2), np.int32))
        out["send_rdma_head"] = _ring_counters(in_node[d], C)
        nvl = []
        for s in sources:
            fwd = np.nonzero(in_node[s][:, b])[0]  # the tokens of s that come to my node
            to_gpu = routing[s][:, b * gpus:(b + 1) * gpus]
            counters = _ring_counters(to_gpu, C)
            nvl.append(counters[fwd])
        out["send_nvl_head"] = (np.concatenate(nvl).astype(np.int32) if nvl
                                else np.zeros((0, gpus), np.int32))
        out["num_rdma_recv_tokens"] = int(out["recv_rdma_rank_prefix_sum"][-1])
        out["num_gpus_per_node"] = gpus
        results.append(out)
    return results


def internode_combine(x, handles, topk_weights=None, bias=None):
    """Normal-mode combine across nodes: the reverse of :func:`internode_dispatch`, an
    UNWEIGHTED sum over the ranks that received each token; the same values as
    :func:`intranode_combine` (float32 accumulation: bias0, bias1, then destinations ascending),
    though a GPU sums inside each node first and may round differently.

    Args as :func:`intranode_combine`, with ``handles[r]`` the dicts
    :func:`internode_dispatch` returned; only the internode handle items are read (the
    intranode ones are rebuilt from them, as a kernel would have to).
    """
    func = "internode_combine"
    handles = _rank_list(func, "handles", handles)
    num_ranks = len(handles)
    rebuilt = []
    for d, h in enumerate(handles):
        routing = np.asarray(h["is_token_in_rank"], dtype=bool)
        C = np.asarray(h["gbl_channel_prefix_matrix"]).shape[1]
        rank_prefix = np.zeros((num_ranks, num_ranks), np.int32)
        for s in range(num_ranks):
            rank_prefix[:, s] = np.asarray(handles[s]["recv_gbl_rank_prefix_sum"])
        start = np.concatenate([[0], rank_prefix[:-1, d]]).astype(np.int64)
        recv_channel_prefix = np.asarray(h["recv_gbl_channel_prefix_matrix"]) - start[:, None]
        src_idx = np.concatenate([np.nonzero(np.asarray(handles[s]["is_token_in_rank"])[:, d])[0]
                                  for s in range(num_ranks)]) if num_ranks else np.zeros(0)
        rebuilt.append(dict(is_token_in_rank=routing,
                            send_head=_ring_counters(routing, C),
                            rank_prefix_matrix=rank_prefix,
                            recv_channel_prefix_matrix=recv_channel_prefix.astype(np.int32),
                            channel_prefix_matrix=np.asarray(h["gbl_channel_prefix_matrix"]),
                            recv_src_idx=src_idx.astype(np.int32)))
    return intranode_combine(x, rebuilt, topk_weights=topk_weights, bias=bias)


# ------------------------------------------------------------------------------------------------
# Low-latency mode: dispatch, its checker, combine
# ------------------------------------------------------------------------------------------------

def _ll_inputs(func: str, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts):
    """Validates the per-rank inputs shared by low-latency dispatch and combine."""
    x = _rank_list(func, "x", x)
    num_ranks = len(x)
    if num_ranks < 1:
        raise _bad(func, "x", "a per-rank list with at least one rank", x)
    m = _int_arg(func, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
    num_experts = _int_arg(func, "num_experts", num_experts, 1)
    if num_experts % num_ranks != 0:
        raise _bad(func, "num_experts", f"a multiple of the rank count {num_ranks}", num_experts)
    xs = [_array(func, f"x[{r}]", a, ndim=2) for r, a in enumerate(x)]
    hidden, dtype = xs[0].shape[1], xs[0].dtype
    topk_list = _rank_list(func, "topk_idx", topk_idx, num_ranks)
    topk = []
    for r, a in enumerate(xs):
        if a.shape[1] != hidden or a.dtype != dtype:
            raise _bad(func, f"x[{r}]", f"[T, {hidden}] of dtype {dtype} like x[0]", a)
        if a.shape[0] > m:
            raise _bad(func, f"x[{r}]", f"at most num_max_dispatch_tokens_per_rank={m} tokens",
                       f"{a.shape[0]} tokens")
        idx = _topk_array(func, f"topk_idx[{r}]", topk_list[r], num_experts)
        if idx.shape[0] != a.shape[0]:
            raise _bad(func, f"topk_idx[{r}]", f"{a.shape[0]} rows like x[{r}]", idx)
        topk.append(idx)
    return xs, topk, m, num_experts


def low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                         use_fp8=True, round_scale=False, use_ue8m0=False):
    """Low-latency dispatch: every (token, slot) goes to its expert's fixed-size receive region.

    Args (per-rank lists, ``R = len(x)``):
        x: ``x[r] [T_r, H]`` bfloat16 (float16/float32 accepted), ``T_r <= M``; ``H % 128 == 0``
            when ``use_fp8`` (``H % 512`` with ``use_ue8m0``).
        topk_idx: ``topk_idx[r] [T_r, K]`` int64/int32 global expert ids in ``[-1, E)``.
        num_max_dispatch_tokens_per_rank: ``M``.
        num_experts: ``E``, a multiple of ``R``; ``L = E / R``.
        use_fp8, round_scale, use_ue8m0: as :func:`per_token_cast_to_fp8` (each source row is cast
            once, and every expert receiving it gets the same bytes).

    Returns one dict per rank ``d`` with its ``L`` local experts:

    - ``recv_x [L, R*M, H]``: float8_e4m3fn with ``use_fp8``, else the dtype of ``x``.
    - ``recv_x_scales``: ``[L, R*M, H/128] float32``, or ``[L, R*M, H/512] int32`` with UE8M0, or
      None without FP8 (logical shape; the GPU stores it column-major in the last two dims).
    - ``recv_count [L] int32``: rows received by each local expert = (token, slot) pairs selecting
      it, over all sources (a token listing an expert twice is received twice).
    - ``src_info [L, R*M] int32``: index of the row's token in its source rank's ``x``.
    - ``layout_range [L, R] int64``: ``(begin << 32) | count``: rows ``[begin, begin + count)`` of
      local expert ``i`` came from source rank ``r``.
    - ``num_max_dispatch_tokens_per_rank`` (``M``), ``hidden`` (``H``), ``num_experts`` (``E``).

    Canonical order (this reference): inside an expert, source ranks ascending, then token order
    (then slot order for a repeated expert), so ``begin`` is the running sum of counts. The GPU may
    place the source blocks in any order (arrival order) and the rows of a block in any order;
    :func:`check_low_latency_dispatch` accepts both. Rows at or beyond ``recv_count`` are
    unspecified; here they hold poison: zeros in ``recv_x`` and scales, -1 in ``src_info``.
    """
    func = "low_latency_dispatch"
    xs, topk, m, num_experts = _ll_inputs(func, x, topk_idx, num_max_dispatch_tokens_per_rank,
                                          num_experts)
    num_ranks = len(xs)
    num_local = num_experts // num_ranks
    hidden, dtype = xs[0].shape[1], xs[0].dtype
    if use_ue8m0 and not round_scale:
        raise _bad(func, "use_ue8m0", "use_ue8m0=True only together with round_scale=True",
                   "round_scale=False")
    if use_fp8:
        multiple = 4 * BLOCK if use_ue8m0 else BLOCK
        if hidden % multiple != 0:
            raise _bad(func, "x", f"a hidden size that is a multiple of {multiple} with FP8",
                       f"H={hidden}")
        casts = [per_token_cast_to_fp8(a, round_scale=round_scale, use_ue8m0=use_ue8m0)
                 for a in xs]
        data = [c[0] for c in casts]
        scales = [c[1] for c in casts]
        out_dtype, scale_dtype = float8_e4m3fn, scales[0].dtype
        num_scales = hidden // (4 * BLOCK) if use_ue8m0 else hidden // BLOCK
    else:
        data, scales, out_dtype = xs, None, dtype

    results = []
    for d in range(num_ranks):
        recv_x = np.zeros((num_local, num_ranks * m, hidden), dtype=out_dtype)
        recv_scales = (np.zeros((num_local, num_ranks * m, num_scales), dtype=scale_dtype)
                       if use_fp8 else None)
        src_info = np.full((num_local, num_ranks * m), -1, dtype=np.int32)
        layout_range = np.zeros((num_local, num_ranks), dtype=np.int64)
        recv_count = np.zeros(num_local, dtype=np.int32)
        for le in range(num_local):
            expert = d * num_local + le
            begin = 0
            for s in range(num_ranks):
                tokens = np.nonzero(topk[s] == expert)[0]   # row-major: token order, then slot
                count = len(tokens)
                recv_x[le, begin:begin + count] = data[s][tokens]
                if use_fp8:
                    recv_scales[le, begin:begin + count] = scales[s][tokens]
                src_info[le, begin:begin + count] = tokens
                layout_range[le, s] = (begin << 32) | count
                begin += count
            recv_count[le] = begin
        results.append({
            "recv_x": recv_x,
            "recv_x_scales": recv_scales,
            "recv_count": recv_count,
            "src_info": src_info,
            "layout_range": layout_range,
            "num_max_dispatch_tokens_per_rank": m,
            "hidden": hidden,
            "num_experts": num_experts,
        })
    return results


def _unpack_range(v) -> tuple[int, int]:
    """``(begin, count)`` from a ``(begin << 32) | count`` int64."""
    v = int(v) & 0xFFFFFFFFFFFFFFFF
    return v >> 32, v & 0xFFFFFFFF


def _row_bytes(a: np.ndarray) -> np.ndarray:
    """``[rows, ...]`` -> ``uint8 [rows, bytes]`` (bit pattern of each row)."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(a.shape[0], -1) if a.shape[0] else np.zeros((0, 0), np.uint8)


def check_low_latency_dispatch(got: dict, want: dict, exact: bool = True, *,
                               require_token_order: bool = False, tol: float = 1e-4) -> None:
    """Checks one rank's low-latency dispatch result ``got`` against the reference ``want``.

    Both are dicts with the keys of :func:`low_latency_dispatch` (``recv_x``, ``recv_x_scales``,
    ``recv_count``, ``src_info``, ``layout_range``), host arrays; ``recv_x`` may be float8_e4m3fn
    or its uint8 bytes, scales may be strided (column-major). Each side is read through its own
    ``layout_range``, so any order of source blocks inside an expert is accepted, and (unless
    ``require_token_order``) any order of rows inside a block: rows are matched by ``src_info``.
    Rows at or beyond ``recv_count`` are ignored.

    Checked, per local expert and source rank: shapes; ``recv_count``; block counts; that the
    blocks with a non-zero count lie in ``[0, recv_count)``, do not overlap and their counts sum to
    ``recv_count``; ``src_info``; the data rows and scales, bit for bit when ``exact``, else the
    dequantised rows (FP8) or values must have ``calc_diff <= tol`` per block.

    Raises AssertionError with a message naming expert, source rank, token and column.
    """
    for key in ("recv_x", "recv_count", "src_info", "layout_range"):
        for side, res in (("got", got), ("want", want)):
            if key not in res:
                raise AssertionError(f"check_low_latency_dispatch: {side} has no '{key}'")
    gx, wx = np.asarray(got["recv_x"]), np.asarray(want["recv_x"])
    if gx.shape != wx.shape:
        raise AssertionError(f"recv_x shape: got {gx.shape}, want {wx.shape}")
    if gx.dtype.itemsize != wx.dtype.itemsize:
        raise AssertionError(f"recv_x dtype: got {gx.dtype}, want {wx.dtype}")
    if wx.dtype == float8_e4m3fn and gx.dtype == np.uint8:
        gx = gx.view(float8_e4m3fn)
    num_local, slots = wx.shape[:2]
    gs, ws = got.get("recv_x_scales"), want.get("recv_x_scales")
    if (gs is None) != (ws is None):
        raise AssertionError(f"recv_x_scales: got {_describe(gs)}, want {_describe(ws)}")
    if ws is not None:
        gs, ws = np.asarray(gs), np.asarray(ws)
        if gs.shape != ws.shape or gs.dtype != ws.dtype:
            raise AssertionError(f"recv_x_scales: got {_describe(gs)}, want {_describe(ws)}")
    gcount = np.asarray(got["recv_count"]).astype(np.int64)
    wcount = np.asarray(want["recv_count"]).astype(np.int64)
    if gcount.shape != wcount.shape or (gcount != wcount).any():
        raise AssertionError(f"recv_count: got {gcount.tolist()}, want {wcount.tolist()}")
    glr, wlr = np.asarray(got["layout_range"]), np.asarray(want["layout_range"])
    if glr.shape != wlr.shape:
        raise AssertionError(f"layout_range shape: got {glr.shape}, want {wlr.shape}")
    num_ranks = wlr.shape[1]
    gsrc, wsrc = np.asarray(got["src_info"]), np.asarray(want["src_info"])
    if gsrc.shape != wsrc.shape:
        raise AssertionError(f"src_info shape: got {gsrc.shape}, want {wsrc.shape}")

    # 1. geometry of the blocks, from each side's own layout_range
    blocks = []   # per local expert: list of (source rank, got begin, want begin, count)
    for le in range(num_local):
        total = int(wcount[le])
        spans = []
        mine = []
        for s in range(num_ranks):
            gb, gn = _unpack_range(glr[le, s])
            wb, wn = _unpack_range(wlr[le, s])
            if gn != wn:
                raise AssertionError(f"local expert {le}, source rank {s}: layout_range count "
                                     f"got {gn}, want {wn}")
            if gn == 0:
                continue
            if gb + gn > total or gb + gn > slots:
                raise AssertionError(f"local expert {le}, source rank {s}: block [{gb}, "
                                     f"{gb + gn}) outside [0, recv_count={total})")
            spans.append((gb, gn, s))
            mine.append((s, gb, wb, gn))
        spans.sort()
        for (b0, n0, s0), (b1, _, s1) in zip(spans, spans[1:]):
            if b0 + n0 > b1:
                raise AssertionError(f"local expert {le}: blocks of source ranks {s0} "
                                     f"[{b0}, {b0 + n0}) and {s1} starting at {b1} overlap")
        if sum(n for _, n, _ in spans) != total:
            raise AssertionError(f"local expert {le}: layout_range counts sum to "
                                 f"{sum(n for _, n, _ in spans)}, recv_count is {total}")
        blocks.append(mine)

    # 2. contents of every block: src_info, data rows, scales
    for le in range(num_local):
        for s, gb, wb, count in blocks[le]:
            where = f"local expert {le}, source rank {s}"
            g_rows, w_rows = np.arange(gb, gb + count), np.arange(wb, wb + count)
            g_tok, w_tok = gsrc[le, g_rows].astype(np.int64), wsrc[le, w_rows].astype(np.int64)
            if not require_token_order:
                g_order = np.argsort(g_tok, kind="stable")
                w_order = np.argsort(w_tok, kind="stable")
                g_rows, g_tok = g_rows[g_order], g_tok[g_order]
                w_rows, w_tok = w_rows[w_order], w_tok[w_order]
            if (g_tok != w_tok).any():
                i = int(np.nonzero(g_tok != w_tok)[0][0])
                raise AssertionError(f"{where}: src_info got {g_tok.tolist()}, want "
                                     f"{w_tok.tolist()} (first difference at block row {i})")
            pairs = [("recv_x", gx, wx)] + ([("recv_x_scales", gs, ws)] if ws is not None else [])
            if exact:
                for name, ga, wa in pairs:
                    gbytes, wbytes = _row_bytes(ga[le, g_rows]), _row_bytes(wa[le, w_rows])
                    if (gbytes != wbytes).any():
                        i, b = (int(v) for v in np.argwhere(gbytes != wbytes)[0])
                        col = b // ga.dtype.itemsize
                        raise AssertionError(
                            f"{where}, token {int(g_tok[i])}: {name} differs at column {col} "
                            f"(got {ga[le, g_rows[i], col]!r}, want {wa[le, w_rows[i], col]!r})")
            else:
                if ws is not None:
                    gv = per_token_cast_back(gx[le, g_rows], gs[le, g_rows])
                    wv = per_token_cast_back(wx[le, w_rows], ws[le, w_rows])
                else:
                    gv = gx[le, g_rows].astype(np.float32)
                    wv = wx[le, w_rows].astype(np.float32)
                diff = calc_diff(gv, wv)
                if not diff <= tol:
                    raise AssertionError(f"{where}: data calc_diff {diff:.3g} > tol {tol:g}")


def low_latency_combine(expert_out, topk_idx, topk_weights, handles, use_logfmt=False):
    """Low-latency combine: each token gathers its experts' outputs and takes the WEIGHTED sum.

    Args (per-rank lists, ``R = len(expert_out)``):
        expert_out: ``expert_out[r] [L, R*M, H]`` bfloat16 (or float32): rank ``r``'s expert
            outputs in its packed dispatch layout (only rows below ``recv_count`` are read).
        topk_idx: ``topk_idx[r] [T_r, K]``: rank ``r``'s ORIGINAL routing (global ids, -1 = none).
        topk_weights: ``topk_weights[r] [T_r, K] float32``.
        handles: ``handles[r]`` = the dict :func:`low_latency_dispatch` returned for rank ``r``
            (``src_info``, ``layout_range``, ``num_max_dispatch_tokens_per_rank``, ``num_experts``).
        use_logfmt: pass every expert row through :func:`logfmt10_roundtrip` first (the row is
            rounded to bf16 before encoding).

    Returns a list of ``combined_x [T_r, H] bfloat16``:
    ``combined_x[t] = bf16(sum over k ascending with idx != -1 of w_k * y_{e_k}[t])``, where
    ``y_e[t]`` is the row of expert ``e`` (on rank ``e // L``, local ``e % L``) inside the block of
    source rank ``r`` whose ``src_info`` is ``t`` (the first such row if the token chose ``e``
    twice). Accumulation is float32, starting from 0, one product ``w_k * y`` (float32) added per
    k; a GPU kernel may fuse multiply and add, so compare with ``calc_diff``.
    """
    func = "low_latency_combine"
    expert_out = _rank_list(func, "expert_out", expert_out)
    num_ranks = len(expert_out)
    handles = _rank_list(func, "handles", handles, num_ranks)
    for r, h in enumerate(handles):
        if not isinstance(h, dict) or not {"src_info", "layout_range", "num_experts",
                                           "num_max_dispatch_tokens_per_rank"} <= set(h):
            raise _bad(func, f"handles[{r}]", "the dict low_latency_dispatch returned for rank "
                       f"{r}", h)
    m = int(handles[0]["num_max_dispatch_tokens_per_rank"])
    num_experts = int(handles[0]["num_experts"])
    num_local = num_experts // num_ranks
    topk_list = _rank_list(func, "topk_idx", topk_idx, num_ranks)
    topk = [_topk_array(func, f"topk_idx[{r}]", a, num_experts) for r, a in enumerate(topk_list)]
    for r, a in enumerate(topk):
        if a.shape[0] > m:
            raise _bad(func, f"topk_idx[{r}]", f"at most num_max_dispatch_tokens_per_rank={m} "
                       "rows", a)
    w_list = _rank_list(func, "topk_weights", topk_weights, num_ranks)
    weights = []
    for r, w in enumerate(w_list):
        w = _array(func, f"topk_weights[{r}]", w, ndim=2)
        if w.shape != topk[r].shape:
            raise _bad(func, f"topk_weights[{r}]", f"float32 of shape {topk[r].shape}", w)
        weights.append(w.astype(np.float32))
    outs = [_array(func, f"expert_out[{r}]", a, ndim=3) for r, a in enumerate(expert_out)]
    hidden = outs[0].shape[2]
    for r, a in enumerate(outs):
        if a.shape != (num_local, num_ranks * m, hidden):
            raise _bad(func, f"expert_out[{r}]", f"shape ({num_local}, {num_ranks * m}, {hidden})",
                       a)

    # where[s][e, t] = (rank, local expert, row) of y_e[t] for token t of source s; -1 if absent
    where = [np.full((num_experts, m), -1, dtype=np.int64) for _ in range(num_ranks)]
    for d in range(num_ranks):
        src_info = np.asarray(handles[d]["src_info"])
        layout_range = np.asarray(handles[d]["layout_range"])
        for le in range(num_local):
            for s in range(num_ranks):
                begin, count = _unpack_range(layout_range[le, s])
                for row in range(begin + count - 1, begin - 1, -1):   # backwards: first row wins
                    t = int(src_info[le, row])
                    if not 0 <= t < m:
                        raise _bad(func, "handles", f"src_info in [0, {m})",
                                   f"{t} at rank {d}, local expert {le}, row {row}")
                    where[s][d * num_local + le, t] = row

    results = []
    for s in range(num_ranks):
        num_tokens, num_topk = topk[s].shape
        acc = np.zeros((num_tokens, hidden), dtype=np.float32)
        for k in range(num_topk):
            tokens = np.nonzero(topk[s][:, k] >= 0)[0]
            if tokens.size == 0:
                continue
            experts = topk[s][tokens, k]
            rows = where[s][experts, tokens]
            if (rows < 0).any():
                i = int(np.nonzero(rows < 0)[0][0])
                raise _bad(func, "handles", f"a row of expert {int(experts[i])} for token "
                           f"{int(tokens[i])} of rank {s}", "no such row in the dispatch layout")
            y = np.stack([outs[e // num_local][e % num_local, row]
                          for e, row in zip(experts, rows)])
            y = logfmt10_roundtrip(y) if use_logfmt else y.astype(np.float32)
            product = (weights[s][tokens, k][:, None] * y).astype(np.float32)
            acc[tokens] = (acc[tokens] + product).astype(np.float32)
        results.append(acc.astype(bfloat16))
    return results


# ------------------------------------------------------------------------------------------------
# Buffer sizes of low-latency mode
# ------------------------------------------------------------------------------------------------

def low_latency_layout(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                       num_experts: int) -> dict:
    """Byte layout of the low-latency symmetric buffer (two buffers used alternately).

    With ``M, H, R, E`` (``H % 128 == 0``, ``E % R == 0``):

    - ``dispatch_msg_bytes = 16 + max(2H, H + (H/128)*4)``: a 16-byte header (int source token
      index + 3 reserved ints), then the bf16 row, or the FP8 row and its float32 scales;
    - ``combine_msg_bytes = (H/128)*4 + 2H``: the bf16 row, or LogFMT meta + codes;
    - ``send_bytes = max(M * dispatch_msg, E*M * combine_msg)``;
    - ``recv_bytes = max(E*M * dispatch_msg, E*M * combine_msg)`` (dispatch receives
      ``[L][R][M]`` messages, combine ``[E][M]`` rows);
    - ``signal_bytes = align128(E*4)`` (dispatch counts ``int[L*R]`` / combine flags ``int[E]``;
      the only part that must be zero before use);
    - ``total_bytes = 2*(signal + send + recv)``, laid out ``[sig0][sig1][send0][send1][recv0]
      [recv1]``.

    Returns a dict with those keys plus ``signal_offsets``, ``send_offsets``, ``recv_offsets``
    (2-tuples: byte offset of buffer 0 and buffer 1) and ``num_signal_ints`` (``E``).
    """
    func = "low_latency_layout"
    m = _int_arg(func, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
    hidden = _int_arg(func, "hidden", hidden, 1)
    num_ranks = _int_arg(func, "num_ranks", num_ranks, 1)
    num_experts = _int_arg(func, "num_experts", num_experts, 1)
    if hidden % BLOCK != 0:
        raise _bad(func, "hidden", "a multiple of 128", hidden)
    if num_experts % num_ranks != 0:
        raise _bad(func, "num_experts", f"a multiple of num_ranks={num_ranks}", num_experts)
    num_scales = hidden // BLOCK
    dispatch_msg = 16 + max(2 * hidden, hidden + num_scales * 4)
    combine_msg = num_scales * 4 + 2 * hidden
    send = max(m * dispatch_msg, num_experts * m * combine_msg)
    recv = max(num_experts * m * dispatch_msg, num_experts * m * combine_msg)
    signal = _align_up(num_experts * 4, 128)
    return {
        "dispatch_msg_bytes": dispatch_msg,
        "combine_msg_bytes": combine_msg,
        "send_bytes": send,
        "recv_bytes": recv,
        "signal_bytes": signal,
        "total_bytes": 2 * (signal + send + recv),
        "signal_offsets": (0, signal),
        "send_offsets": (2 * signal, 2 * signal + send),
        "recv_offsets": (2 * signal + 2 * send, 2 * signal + 2 * send + recv),
        "num_signal_ints": num_experts,
    }


def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                   num_ranks: int, num_experts: int) -> int:
    """Bytes of symmetric memory low-latency mode needs: ``low_latency_layout(...)["total_bytes"]``
    rounded up to a multiple of 128."""
    layout = low_latency_layout(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)
    return _align_up(layout["total_bytes"], 128)
