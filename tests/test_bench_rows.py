"""CPU checks of the bench's arithmetic (the measurements themselves need GPUs)."""
import pytest

from numba_ep.bench import _merge_ranks, _rows_of_times


def test_rows_of_times_gbps_and_optional_device_time():
    times = {name: {"pipelined": 100.0, "isolated": 120.0, "host": 30.0, "device": dev}
             for name, dev in (("dispatch BF16", 90.0), ("dispatch FP8", None),
                               ("combine BF16", 95.0))}
    rows = _rows_of_times(times, 7168, (("logical", 1000), ("remote", 250)))
    # BF16 rows: 2 x 7168 bytes; 1000 rows in 100 us = 143.36 GB/s
    assert rows["dispatch BF16, logical GB/s"] == pytest.approx(1000 * 14336 / 100.0 / 1e3)
    assert rows["combine BF16, remote GB/s"] == pytest.approx(250 * 14336 / 100.0 / 1e3)
    # FP8 rows: 7168 bytes plus 56 float32 scales
    assert rows["dispatch FP8, logical GB/s"] == pytest.approx(1000 * (7168 + 224) / 100.0 / 1e3)
    assert rows["dispatch BF16, device us (graph replay)"] == 90.0
    assert "dispatch FP8, device us (graph replay)" not in rows   # not measured: no row
    assert rows["combine BF16, host us per call"] == 30.0
    assert list(rows)[0] == "dispatch BF16, us (back-to-back calls, DeepEP's method)"


def test_merge_ranks_averages_rates_and_takes_the_slowest_time():
    ranks = [{"dispatch, us": 10.0, "dispatch, GB/s": 100.0, "received rows": 4.0, "x": "a"},
             {"dispatch, us": 12.0, "dispatch, GB/s": 50.0, "received rows": 6.0, "x": "b"}]
    assert _merge_ranks(ranks) == {"dispatch, us": 12.0, "dispatch, GB/s": 75.0,
                                   "received rows": 5.0, "x": "b"}
