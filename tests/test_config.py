"""Config: validation, tuned tables for 1..8 ranks, NVLink/RDMA size hints (CPU only)."""
import dataclasses

import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep import config as cfg
from numba_ep import reference
from numba_ep.buffer import Buffer
from numba_ep.config import Config
from numba_ep.kernels import intranode

DEEPEP_DISPATCH_NVL_SEND = {2: 24, 4: 6, 8: 6}
DEEPEP_COMBINE_NVL_SEND = {2: 10, 4: 9, 8: 4}


# ------------------------------------------------------------------------------------ Config

def test_defaults_and_positional_arguments():
    c = Config()
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens) == (20, 6, 256, 6)
    # DeepEP rounds rdma_recv up to a multiple of rdma_send: 256 -> 258
    assert c.num_max_rdma_chunked_recv_tokens == 258
    d = Config(24, 8, 256)  # DeepEP's test_intranode config, positional
    assert (d.num_sms, d.num_max_nvl_chunked_send_tokens, d.num_max_nvl_chunked_recv_tokens) == \
        (24, 8, 256)
    assert d.num_channels == 12


def test_config_is_immutable():
    c = Config(24, 8, 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_sms = 30


@pytest.mark.parametrize("kwargs, exc, fragments", [
    (dict(num_sms=21), ValueError, ["num_sms", "even", "21"]),
    (dict(num_sms=0), ValueError, ["num_sms", ">= 2"]),
    (dict(num_sms=-4), ValueError, ["num_sms"]),
    (dict(num_sms=24.0), TypeError, ["num_sms", "int"]),
    (dict(num_sms=True), TypeError, ["num_sms"]),
    (dict(num_max_nvl_chunked_send_tokens=256), ValueError,
     ["num_max_nvl_chunked_send_tokens", "smaller", "256"]),
    (dict(num_max_nvl_chunked_send_tokens=300), ValueError, ["num_max_nvl_chunked_send_tokens"]),
    (dict(num_max_nvl_chunked_send_tokens=0), ValueError, ["num_max_nvl_chunked_send_tokens"]),
    (dict(num_max_nvl_chunked_send_tokens=4, num_max_nvl_chunked_recv_tokens=16), ValueError,
     ["num_max_nvl_chunked_recv_tokens", "32", "publishes", "16"]),
    (dict(num_max_rdma_chunked_send_tokens=200, num_max_rdma_chunked_recv_tokens=128),
     ValueError, ["num_max_rdma_chunked_send_tokens"]),
    (dict(num_max_rdma_chunked_send_tokens=128, num_max_rdma_chunked_recv_tokens=128),
     ValueError, ["num_max_rdma_chunked_send_tokens", "smaller"]),
])
def test_config_validation(kwargs, exc, fragments):
    with pytest.raises(exc) as e:
        Config(**kwargs)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_rdma_ring_rounding_keeps_room_for_two_chunks():
    c = Config(num_max_rdma_chunked_send_tokens=100, num_max_rdma_chunked_recv_tokens=150)
    assert c.num_max_rdma_chunked_recv_tokens == 200
    assert c.num_max_rdma_chunked_send_tokens <= c.num_max_rdma_chunked_recv_tokens // 2


def test_smallest_valid_ring():
    c = Config(2, 31, 32)
    assert c.num_max_nvl_chunked_recv_tokens == 32 and c.num_channels == 1


# ------------------------------------------------------------------------------------ tables

@pytest.mark.parametrize("num_ranks", range(1, 9))
def test_tables_cover_every_rank_count(num_ranks):
    d = cfg.get_dispatch_config(num_ranks)
    c = cfg.get_combine_config(num_ranks)
    for conf in (d, c):
        assert isinstance(conf, Config)
        assert conf.num_sms == 24
        assert conf.num_max_nvl_chunked_recv_tokens == 256
        assert conf.num_max_nvl_chunked_send_tokens < conf.num_max_nvl_chunked_recv_tokens
        # combine needs at least the kernel's minimum ring
        assert conf.num_max_nvl_chunked_recv_tokens >= intranode.MIN_RECV_SLOTS
    if num_ranks in DEEPEP_DISPATCH_NVL_SEND:
        assert d.num_max_nvl_chunked_send_tokens == DEEPEP_DISPATCH_NVL_SEND[num_ranks]
        assert c.num_max_nvl_chunked_send_tokens == DEEPEP_COMBINE_NVL_SEND[num_ranks]
    assert cfg.get_dispatch_config(num_ranks, num_sms=8).num_sms == 8


def test_tables_chunk_sizes_do_not_grow_with_ranks():
    for table in (cfg.get_dispatch_config, cfg.get_combine_config):
        sends = [table(r).num_max_nvl_chunked_send_tokens for r in range(1, 9)]
        assert sends == sorted(sends, reverse=True), sends


@pytest.mark.parametrize("num_ranks", [0, -1])
def test_tables_reject_other_rank_counts(num_ranks):
    for table in (cfg.get_dispatch_config, cfg.get_combine_config, Buffer.get_dispatch_config,
                  Buffer.get_combine_config):
        with pytest.raises(ValueError, match="positive rank count"):
            table(num_ranks)


def test_internode_rank_counts_take_deepeps_tables():
    # DeepEP V1's rows (notes/deepep-v1.md 1.2); internode mode reads only num_sms
    assert cfg.get_dispatch_config(16) == Config(24, 36, 288, 20, 128)
    assert cfg.get_combine_config(16) == Config(24, 4, 288, 12, 128)
    assert cfg.get_dispatch_config(128) == Config(24, 20, 560, 12, 128)
    assert cfg.get_combine_config(160) == Config(24, 2, 720, 8, 128)
    # counts DeepEP does not list: the largest listed row below (8's below 16)
    assert cfg.get_dispatch_config(40) == cfg.get_dispatch_config(32)
    assert cfg.get_dispatch_config(12) == cfg.get_dispatch_config(8)
    assert cfg.get_combine_config(1000) == cfg.get_combine_config(160)
    assert Buffer.get_dispatch_config(16).num_sms == Buffer.num_sms


def test_tables_reject_non_int():
    with pytest.raises(TypeError, match="num_ranks"):
        cfg.get_dispatch_config(2.0)


def test_buffer_tables_follow_buffer_num_sms():
    old = Buffer.num_sms
    try:
        assert Buffer.get_dispatch_config(2).num_sms == old == 20
        Buffer.set_num_sms(24)
        assert Buffer.num_sms == 24
        assert Buffer.get_dispatch_config(2).num_sms == 24
        assert Buffer.get_combine_config(4).num_sms == 24
        assert Buffer.get_combine_config(4).num_max_nvl_chunked_send_tokens == 9
        with pytest.raises(ValueError, match="even"):
            Buffer.set_num_sms(25)
        with pytest.raises(ValueError, match="new_num_sms"):
            Buffer.set_num_sms(0)
        assert Buffer.num_sms == 24
    finally:
        Buffer.num_sms = old


# ------------------------------------------------------------------------------------ size hints

def test_nvl_hint_is_the_kernel_layout_with_worst_case_arguments():
    c = Config(24, 8, 256)
    hb = 7168 * 2
    expected = intranode.nvl_bytes_needed(2, num_channels=12, num_recv_slots=256, hidden_bytes=hb,
                                          num_topk=16, num_scales=hb // 128)
    hint = c.get_nvl_buffer_size_hint(hb, 2)
    assert hint % 128 == 0
    assert hint == (expected + 127) // 128 * 128


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 8])
def test_nvl_hint_monotonic_in_hidden(num_ranks):
    c = cfg.get_dispatch_config(num_ranks)
    hints = [c.get_nvl_buffer_size_hint(h * 2, num_ranks) for h in (16, 128, 1024, 2048, 4096, 7168)]
    assert all(a < b for a, b in zip(hints, hints[1:])), hints


def test_nvl_hint_monotonic_in_ranks_and_ring():
    c = cfg.get_dispatch_config(2)
    hints = [c.get_nvl_buffer_size_hint(4096 * 2, r) for r in range(1, 9)]
    assert all(a < b for a, b in zip(hints, hints[1:])), hints
    small, big = Config(24, 6, 64), Config(24, 6, 256)
    assert small.get_nvl_buffer_size_hint(8192, 2) < big.get_nvl_buffer_size_hint(8192, 2)
    # more than 8 ranks: sized for the 8-rank NVLink domain
    assert c.get_nvl_buffer_size_hint(8192, 16) == c.get_nvl_buffer_size_hint(8192, 8)


@pytest.mark.parametrize("hidden, elem, topk, scales", [
    (7168, 2, 8, 0), (7168, 1, 8, 56), (4096, 1, 16, 32), (2048, 2, 16, 0), (2048, 1, 1, 16),
])
def test_nvl_hint_covers_dispatch_and_combine(hidden, elem, topk, scales):
    """DeepEP's sizing recipe (hidden_bytes = H * max(elem, 2), max over both configs) must cover
    what the kernels ask for in either direction."""
    for r in (1, 2, 4, 8):
        d, c = cfg.get_dispatch_config(r), cfg.get_combine_config(r)
        hint = max(d.get_nvl_buffer_size_hint(hidden * max(elem, 2), r),
                   c.get_nvl_buffer_size_hint(hidden * max(elem, 2), r))
        need_dispatch = intranode.nvl_bytes_needed(r, d.num_channels,
                                                   d.num_max_nvl_chunked_recv_tokens,
                                                   hidden * elem, topk, scales)
        need_combine = intranode.nvl_bytes_needed(r, c.num_channels,
                                                  c.num_max_nvl_chunked_recv_tokens,
                                                  hidden * 2, topk, 0)
        assert need_dispatch <= hint and need_combine <= hint


def test_nvl_hint_validates_arguments():
    c = Config()
    with pytest.raises(ValueError, match="hidden_bytes"):
        c.get_nvl_buffer_size_hint(0, 2)
    with pytest.raises(ValueError, match="num_ranks"):
        c.get_nvl_buffer_size_hint(1024, 0)
    with pytest.raises(ValueError, match="16-byte"):
        c.get_nvl_buffer_size_hint(100, 2)  # a row must be whole 16-byte vectors


def test_rdma_hint():
    c = Config()
    for r in range(1, 9):
        assert c.get_rdma_buffer_size_hint(7168 * 2, r) == 0
    # across nodes: the worst case of the internode regions, growing with tokens and ranks
    h = c.get_rdma_buffer_size_hint(7168 * 2, 16)
    assert h > 4096 * 7168 * 2 * 16 and h % 128 == 0
    assert c.get_rdma_buffer_size_hint(7168 * 2, 16, num_max_tokens=128) < h
    assert c.get_rdma_buffer_size_hint(7168 * 2, 4, num_gpus_per_node=2) > 0
    assert c.get_rdma_buffer_size_hint(7168 * 2, 4, num_gpus_per_node=4) == 0
    with pytest.raises(ValueError, match="divisor"):
        c.get_rdma_buffer_size_hint(7168 * 2, 6, num_gpus_per_node=4)


def test_low_latency_hint_delegates_to_reference():
    for args in [(128, 7168, 2, 288), (16, 2048, 8, 64), (1, 4096, 1, 8)]:
        want = reference.get_low_latency_rdma_size_hint(*args)
        assert cfg.low_latency_size_hint(*args) == want
        assert Buffer.get_low_latency_rdma_size_hint(*args) == want
        assert want % 128 == 0 and want > 0
    assert cfg.low_latency_size_hint(256, 7168, 2, 288) > cfg.low_latency_size_hint(128, 7168, 2, 288)
