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


def test_low_latency_rows_take_the_slowest_rank_and_show_kernel_times(monkeypatch):
    """bench low-latency: each time row is the slowest rank's, the CUDA-profiler kernel rows
    appear when measured (with their sum), and a profile that could not be read says why."""
    from numba_ep import bench, group

    def rank(i, kernels):
        r = {"dispatch": 30.0 + i, "combine": 40.0 - i, "dispatch+combine": 71.0,
             "pair_dispatch+combine": 69.0 + i,
             "dispatch_GBps": 200.0 + 10 * i, "combine_GBps": 300.0}
        if kernels:
            r.update(kernel_dispatch=25.0 + i, kernel_combine=35.0, **{
                "kernel_dispatch+combine": 60.0 + i})
        else:
            r["kernel_note"] = "3 kernels for 40 steps"
        return r

    labels = [label for _, label in bench._LL_ROWS]
    assert len(set(labels)) == len(labels)   # one row per label: none overwrites another
    for kernels in (True, False):
        monkeypatch.setattr(group, "spawn", lambda fn, n, **kw: [rank(i, kernels) for i in range(n)])
        rows = bench.bench_low_latency(ranks=2)
        assert rows["dispatch (FP8), us"] == 31.0 and rows["combine (BF16), us"] == 40.0
        assert rows["dispatch logical GB/s (FP8 messages)"] == 205.0
        assert "  DeepEP V1 2xH100 dispatch, us" in rows
        assert rows["  dispatch + combine, events around the pair only (as DeepEP's bench), us"] == 70.0
        label = "kernel time (CUDA profiler, DeepEP's method): dispatch, us"
        if kernels:
            assert rows[label] == 26.0 and rows["  kernel time: dispatch + combine, us"] == 61.0
            assert "kernel time (CUDA profiler)" not in rows
        else:
            assert label not in rows
            assert rows["kernel time (CUDA profiler)"] == "3 kernels for 40 steps"


def test_torch_rows_need_torch_with_cuda(monkeypatch):
    """The benches' torch rows run only where torch is installed with CUDA."""
    torch = pytest.importorskip("torch")
    from numba_ep.bench_ll import cuda_torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_torch() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_torch() is torch


def test_host_time_is_the_median_of_loops_each_behind_a_delay():
    """``host_us_per_call``: warm-up calls first, then each loop behind its own delay kernel
    (the ranks lined up first) and drained before the next; the result is the median of the
    loops' means, so one slow loop (a preemption) does not move it."""
    from numba_ep import bench_ll

    clock = [0.0]
    log = []
    loop_cost_us = iter([2.0, 500.0, 3.0, 4.0, 1.0])   # per call, one value per loop
    cost = [0.0]

    class Stream:
        def synchronize(self):
            log.append("sync")
            nxt = next(loop_cost_us, None)
            if nxt is not None:
                cost[0] = nxt

    class Delay:
        def launch(self, grid, block, ns, stream=None):
            log.append(("delay", ns))

    def fn():
        clock[0] += cost[0] * 1e-6
        log.append("call")

    got = bench_ll.host_us_per_call(fn, Stream(), Delay(), calls=4, reps=5, warmup=2,
                                    barrier=lambda: log.append("barrier"), ns_per_call=1000,
                                    clock=lambda: clock[0])
    assert got == pytest.approx(3.0)
    loop = ["sync", "barrier", ("delay", 4000)] + ["call"] * 4
    assert log == ["call"] * 2 + loop * 5 + ["sync"]


def test_host_overhead_script_times_the_buffers_gpu_branch():
    """scripts/ll_host_overhead.py (the eager path's Python, measured without a GPU) runs its
    fakes through the Buffer's GPU branch: it fails if a change makes them stale."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "ll_host_overhead.py"
    out = subprocess.run([sys.executable, str(script), "--steps", "20"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1])
            for line in out.stdout.splitlines()[1:] if line.strip()}
    assert set(rows) == {"kernel layer (checked=True)", "Buffer", "Buffer over the kernel layer"}
    assert 0 < rows["kernel layer (checked=True)"] < rows["Buffer"]
