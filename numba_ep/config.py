"""Config of the normal (intranode) kernels, tuned defaults per rank count, buffer size hints.

A ``Config`` says how many SMs the normal dispatch / combine kernels take and how large their ring
buffers are, exactly as in DeepEP V1:

    num_sms                             SMs for one dispatch / combine; channels C = num_sms / 2
                                        (one SM sends, its partner receives)
    num_max_nvl_chunked_send_tokens     most tokens a sender moves before it publishes its tail
    num_max_nvl_chunked_recv_tokens     ring capacity in tokens per (channel, peer) over NVLink
    num_max_rdma_chunked_send_tokens    the same two for the RDMA rings of DeepEP's internode mode
    num_max_rdma_chunked_recv_tokens    (kept for compatibility: numba_ep's internode kernels have
                                        no rings and read only num_sms)

Where numba_ep differs from DeepEP: any rank count 1..8 has tuned defaults (DeepEP: 2, 4, 8), any
larger count (internode mode) gets DeepEP's internode row at or below it, and
``num_max_nvl_chunked_recv_tokens`` must be at least 32 because numba_ep's sender publishes its
tail after every 32 tokens it examines, so a ring must hold at least that many.

The NVLink buffer a ``Buffer`` needs is computed by the intranode kernel module itself
(``numba_ep.kernels.intranode.nvl_bytes_needed``): the size hints here only choose its worst-case
arguments (top-k 16, one scale per 128 bytes of a row), so a hint always covers DeepEP's usage
``max(hint(dispatch_config), hint(combine_config))`` with ``hidden_bytes = H * max(elem_size, 2)``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

__all__ = [
    "Config",
    "get_dispatch_config",
    "get_combine_config",
    "low_latency_size_hint",
    "MAX_INTRANODE_RANKS",
    "DEFAULT_NUM_SMS",
    "SIZE_HINT_TOPK",
]

#: ranks one intranode (NVLink) group may have
MAX_INTRANODE_RANKS = 8
#: SMs of the tuned default configs (DeepEP's tests and the measured anchors use 24)
DEFAULT_NUM_SMS = 24
#: top-k the size hints assume (Buffer accepts top-k up to this)
SIZE_HINT_TOPK = 16
#: numba_ep's sender publishes its tail every this many examined tokens
PUBLISH_EVERY_TOKENS = 32

# Tuned NVLink chunk sizes (num_max_nvl_chunked_send_tokens) per rank count. 2, 4 and 8 are
# DeepEP V1's tables; the others are interpolated (fewer ranks -> more warps per peer -> larger
# chunks) and not tuned yet.
_DISPATCH_NVL_SEND = {1: 24, 2: 24, 3: 12, 4: 6, 5: 6, 6: 6, 7: 6, 8: 6}
_COMBINE_NVL_SEND = {1: 10, 2: 10, 3: 10, 4: 9, 5: 8, 6: 6, 7: 5, 8: 4}
_NVL_RECV = 256
_RDMA_SEND, _RDMA_RECV = 6, 128
# DeepEP V1's internode tables, (nvl_send, nvl_recv, rdma_send, rdma_recv) by rank count. numba_ep's
# internode kernels have no rings and read only num_sms; these keep configs DeepEP's.
_INTERNODE_DISPATCH = {16: (36, 288, 20, 128), 24: (32, 288, 8, 128), 32: (32, 288, 8, 128),
                       48: (32, 288, 8, 128), 64: (32, 288, 8, 128), 96: (20, 480, 12, 128),
                       128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128)}
_INTERNODE_COMBINE = {16: (4, 288, 12, 128), 24: (1, 288, 8, 128), 32: (1, 288, 8, 128),
                      48: (1, 288, 8, 128), 64: (1, 288, 8, 128), 96: (1, 480, 8, 128),
                      128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}


def _int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Config: {name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"Config: {name} must be >= {minimum}, got {value}")
    return value


def _ceil_div(a, b):
    return -(-a // b)


@dataclass(frozen=True)
class Config:
    """Performance parameters of the normal kernels (DeepEP V1's ``deep_ep.Config``).

    ``Config(num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
    num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256)``; positional
    arguments work as in DeepEP (``Config(24, 8, 256)``). Immutable.

    Checks (ValueError / TypeError naming the field): ``num_sms`` even and >= 2;
    ``0 < nvl_send < nvl_recv``; ``nvl_recv >= 32`` (numba_ep's sender publishes every 32 examined
    tokens); ``0 < rdma_send < rdma_recv`` after ``rdma_recv`` is rounded up to a multiple of
    ``rdma_send`` as DeepEP does (which also gives DeepEP's ``rdma_send <= rdma_recv / 2``).
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self):
        sms = _int("num_sms", self.num_sms, 2)
        if sms % 2:
            raise ValueError(f"Config: num_sms must be even (one channel = a sender SM and a "
                             f"receiver SM), got {sms}")
        nvl_send = _int("num_max_nvl_chunked_send_tokens", self.num_max_nvl_chunked_send_tokens, 1)
        nvl_recv = _int("num_max_nvl_chunked_recv_tokens", self.num_max_nvl_chunked_recv_tokens, 1)
        if nvl_send >= nvl_recv:
            raise ValueError(
                f"Config: num_max_nvl_chunked_send_tokens ({nvl_send}) must be smaller than "
                f"num_max_nvl_chunked_recv_tokens ({nvl_recv})")
        if nvl_recv < PUBLISH_EVERY_TOKENS:
            raise ValueError(
                f"Config: num_max_nvl_chunked_recv_tokens must be >= {PUBLISH_EVERY_TOKENS} in "
                f"numba_ep (its sender publishes the ring tail every {PUBLISH_EVERY_TOKENS} "
                f"examined tokens, so a ring must hold that many), got {nvl_recv}")
        rdma_send = _int("num_max_rdma_chunked_send_tokens", self.num_max_rdma_chunked_send_tokens, 1)
        rdma_recv = _int("num_max_rdma_chunked_recv_tokens", self.num_max_rdma_chunked_recv_tokens, 1)
        rdma_recv = _ceil_div(rdma_recv, rdma_send) * rdma_send
        if rdma_send >= rdma_recv:
            raise ValueError(
                f"Config: num_max_rdma_chunked_send_tokens ({rdma_send}) must be smaller than "
                f"num_max_rdma_chunked_recv_tokens ({rdma_recv})")
        # (After the rounding, rdma_send < rdma_recv implies DeepEP's rdma_send <= rdma_recv / 2.)
        for name, v in (("num_sms", sms), ("num_max_nvl_chunked_send_tokens", nvl_send),
                        ("num_max_nvl_chunked_recv_tokens", nvl_recv),
                        ("num_max_rdma_chunked_send_tokens", rdma_send),
                        ("num_max_rdma_chunked_recv_tokens", rdma_recv)):
            object.__setattr__(self, name, v)

    @property
    def num_channels(self) -> int:
        """Channels of the normal kernels: ``num_sms // 2``."""
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer (``Buffer(num_nvl_bytes=...)``) that dispatch / combine with this
        config need for rows of ``hidden_bytes`` bytes, top-k <= 16 and scales of up to one float
        per 128 bytes of a row; a multiple of 128.

        ``hidden_bytes`` as in DeepEP: ``hidden * max(element_size, 2)`` (combine is always
        BF16). Rank counts above 8 are sized for their 8-rank NVLink domain.
        """
        from numba_ep.kernels import intranode

        hidden_bytes = _int("hidden_bytes", hidden_bytes, 1)
        num_ranks = _int("num_ranks", num_ranks, 1)
        nbytes = intranode.nvl_bytes_needed(
            min(num_ranks, MAX_INTRANODE_RANKS),
            num_channels=self.num_channels,
            num_recv_slots=self.num_max_nvl_chunked_recv_tokens,
            hidden_bytes=hidden_bytes,
            num_topk=SIZE_HINT_TOPK,
            num_scales=_ceil_div(hidden_bytes, 128))
        return _ceil_div(int(nbytes), 128) * 128

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int,
                                  num_max_tokens: int = 4096, num_gpus_per_node: int = 8) -> int:
        """Bytes of RDMA (NVSHMEM) buffer per rank the normal kernels need: 0 when the ranks fit
        in one node (``num_ranks <= num_gpus_per_node``: intranode mode uses NVLink only).
        Across nodes, the worst case of ``numba_ep.kernels.internode.rdma_size_hint`` for up to
        ``num_max_tokens`` tokens per rank (beyond DeepEP's signature, whose ring buffers do not
        grow with the batch; numba_ep's internode regions do)."""
        hidden_bytes = _int("hidden_bytes", hidden_bytes, 1)
        num_ranks = _int("num_ranks", num_ranks, 1)
        num_max_tokens = _int("num_max_tokens", num_max_tokens, 1)
        num_gpus_per_node = _int("num_gpus_per_node", num_gpus_per_node, 1)
        if num_ranks <= num_gpus_per_node:
            return 0
        if num_ranks % num_gpus_per_node:
            raise ValueError(f"num_gpus_per_node: expected a divisor of num_ranks={num_ranks}, "
                             f"got {num_gpus_per_node}")
        from numba_ep.kernels.internode import rdma_size_hint

        return rdma_size_hint(num_max_tokens, hidden_bytes, num_ranks, num_gpus_per_node)


def _check_ranks(num_ranks):
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, numbers.Integral):
        raise TypeError(f"num_ranks must be an int, got {type(num_ranks).__name__}")
    if int(num_ranks) < 1:
        raise ValueError(f"num_ranks: expected a positive rank count, got {num_ranks}")
    return int(num_ranks)


def _tuned(num_ranks, num_sms, intranode_nvl_send, internode):
    """The config of ``num_ranks``: the intranode tables up to 8; above, DeepEP's internode
    table at the largest listed count <= num_ranks (8's row below 16)."""
    r = _check_ranks(num_ranks)
    sms = DEFAULT_NUM_SMS if num_sms is None else num_sms
    listed = [k for k in internode if k <= r]
    if r <= MAX_INTRANODE_RANKS or not listed:
        return Config(sms, intranode_nvl_send[min(r, MAX_INTRANODE_RANKS)], _NVL_RECV,
                      _RDMA_SEND, _RDMA_RECV)
    return Config(sms, *internode[max(listed)])


def get_dispatch_config(num_ranks: int, num_sms: int | None = None) -> Config:
    """Tuned dispatch config for ``num_ranks``: 1..8 (intranode) tuned here; more ranks
    (internode mode) take DeepEP's table (16, 24, 32, 48, 64, 96, 128, 144, 160 ranks; other
    counts the largest listed below them).

    ``num_sms`` defaults to 24 (``Buffer.get_dispatch_config`` passes ``Buffer.num_sms`` instead,
    as DeepEP does). Chunk sizes for 2, 4, 8 ranks are DeepEP's (24, 6, 6 tokens; ring 256).
    """
    return _tuned(num_ranks, num_sms, _DISPATCH_NVL_SEND, _INTERNODE_DISPATCH)


def get_combine_config(num_ranks: int, num_sms: int | None = None) -> Config:
    """Tuned combine config for ``num_ranks`` (as ``get_dispatch_config``).

    ``num_sms`` defaults to 24. Chunk sizes for 2, 4, 8 ranks are DeepEP's (10, 9, 4 tokens;
    ring 256). A combine must use the channel count (``num_sms / 2``) of the dispatch whose handle
    it reverses.
    """
    return _tuned(num_ranks, num_sms, _COMBINE_NVL_SEND, _INTERNODE_COMBINE)


def low_latency_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                          num_experts: int) -> int:
    """Bytes of NVSHMEM buffer low-latency mode needs (a multiple of 128); see
    ``numba_ep.reference.get_low_latency_rdma_size_hint``."""
    from numba_ep import reference

    return int(reference.get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts))
