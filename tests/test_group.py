"""Groups on a CPU: LocalGroup through spawn (1, 2, 3 ranks), failures, timeouts; MPI and torch.

Spawn targets are the top-level ``_w_*`` functions of this module: spawned ranks import it by name
(tests/conftest.py puts tests/ on sys.path, and spawn hands the parent's sys.path to its children).
"""
import os
import sys
import time

import pytest

import numba_ep
from numba_ep.errors import CommTimeoutError, NumbaEPError
from numba_ep.group import (Group, LocalGroup, MPIGroup, SingleRankGroup, SpawnError, as_group,
                            spawn)
from mpi_run import mpi_launch

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------ spawn targets (run in children)

def _w_allgather(group, tag):
    assert as_group(None) is group
    assert os.environ["NUMBA_EP_RANK"] == str(group.rank)
    data = bytes([group.rank]) * (group.rank * 3 + 1) + tag.encode()
    got = group.allgather_bytes(data)
    again = group.allgather_bytes(b"x" * group.rank)          # a second round, different lengths
    bc = group.broadcast_bytes(b"root-data" if group.rank == group.size - 1 else None,
                               root=group.size - 1)
    objs = group.allgather_object({"rank": group.rank})
    group.barrier()
    return {"rank": group.rank, "size": group.size, "local": (group.local_rank, group.local_size),
            "got": got, "again": again, "bc": bc, "objs": objs}


def _w_barrier_order(group, marker_dir):
    time.sleep(0.05 * (group.size - group.rank))  # later ranks arrive first
    open(os.path.join(marker_dir, f"before.{group.rank}"), "w").close()
    group.barrier()
    seen = sorted(f for f in os.listdir(marker_dir) if f.startswith("before."))
    group.barrier()
    return seen


def _w_raise_on(group, bad_rank):
    group.barrier()
    if group.rank == bad_rank:
        raise ValueError(f"boom from rank {group.rank}")
    group.barrier()  # the others wait here and are released by the failure
    return group.rank


def _w_late(group, late_rank, sleep_s, short_timeout):
    group.barrier()  # everyone has started (under the default, long timeout)
    group.timeout = short_timeout
    if group.rank == late_rank:
        time.sleep(sleep_s)
        return "late"
    try:
        group.barrier()
    except CommTimeoutError as e:
        return {"what": e.what, "rank": e.rank, "peer": e.peer, "msg": str(e),
                "is_timeout": isinstance(e, TimeoutError)}
    return "no timeout"


def _w_hang_in_barrier(group, late_rank):
    if group.rank == late_rank:
        time.sleep(60)
    group.barrier()


def _w_sleep(group, seconds):
    time.sleep(seconds)
    return group.rank


def _w_crash(group):
    if group.rank == 1:
        os._exit(7)
    return group.rank


def _w_abort_at_exit(group):
    # as glibc does on a bad free() in some library's exit code, after fn has returned
    import atexit

    atexit.register(os.abort)
    return group.rank * 10


def _w_torch(group, init_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}",
                            rank=group.rank, world_size=group.size)
    try:
        tg = as_group(dist.group.WORLD)
        out = tg.allgather_bytes(b"t" * (tg.rank + 1))
        tg.barrier()
        bc = tg.broadcast_bytes(b"hello" if tg.rank == 1 else None, root=1)
        return {"type": type(tg).__name__, "rank": tg.rank, "size": tg.size,
                "local": (tg.local_rank, tg.local_size), "out": out, "bc": bc}
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("nranks", [1, 2, 3])
def test_spawn_allgather(nranks):
    res = spawn(_w_allgather, nranks, "ab", group_timeout=20)
    assert [r["rank"] for r in res] == list(range(nranks))
    expect = [bytes([r]) * (r * 3 + 1) + b"ab" for r in range(nranks)]
    for r in res:
        assert r["size"] == nranks
        assert r["local"] == (r["rank"], nranks)
        assert r["got"] == expect
        assert r["again"] == [b"x" * q for q in range(nranks)]
        assert r["bc"] == b"root-data"
        assert r["objs"] == [{"rank": q} for q in range(nranks)]


def test_spawn_barrier_orders(tmp_path):
    res = spawn(_w_barrier_order, 3, str(tmp_path))
    assert res == [["before.0", "before.1", "before.2"]] * 3


def test_spawn_string_target():
    res = spawn(f"{HERE}/test_group.py:_w_sleep", 2, 0.0)
    assert res == [0, 1]
    res = spawn("test_group:_w_sleep", 1, 0.0)
    assert res == [0]


def test_spawn_rank_raises():
    t0 = time.monotonic()
    with pytest.raises(SpawnError) as ei:
        spawn(_w_raise_on, 3, 1, grace=10)
    # the waiting ranks saw the abort and stopped without waiting for the grace period
    assert time.monotonic() - t0 < 8
    msg = str(ei.value)
    assert "rank(s) 1" in msg and "boom from rank 1" in msg
    assert "Traceback" in msg and "_w_raise_on" in msg and "ValueError" in msg
    assert set(ei.value.failures) == {0, 1, 2}
    assert "boom" in ei.value.failures[1]


def test_spawn_rank_crashes():
    with pytest.raises(SpawnError, match=r"rank 1 exited with code 7"):
        spawn(_w_crash, 2, grace=2)


def test_spawn_rank_crashes_after_its_result(capfd):
    with pytest.warns(RuntimeWarning, match=r"rank \d returned its result, then its process was "
                                            r"killed by signal SIGABRT") as rec:
        res = spawn(_w_abort_at_exit, 2, grace=2)
    assert res == [0, 10]
    assert {str(w.message).split()[2] for w in rec} == {"0", "1"}
    # faulthandler in the rank printed where the abort came from
    assert "Fatal Python error: Aborted" in capfd.readouterr().err


def test_barrier_timeout_names_missing_rank():
    res = spawn(_w_late, 3, 2, 1.5, 0.5, group_timeout=60)
    assert res[2] == "late"
    for r in (0, 1):
        info = res[r]
        assert isinstance(info, dict), info
        assert info["what"] == "barrier" and info["rank"] == r and info["peer"] == 2
        assert info["is_timeout"]
        assert "rank(s) 2 of 3 never arrived" in info["msg"]


def test_barrier_timeout_fails_spawn_and_stops_hung_rank():
    t0 = time.monotonic()
    with pytest.raises(SpawnError) as ei:
        spawn(_w_hang_in_barrier, 2, 1, group_timeout=0.5, grace=0.5)
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert "CommTimeoutError" in msg and "rank(s) 1 of 2 never arrived" in msg
    assert "rank 1 stopped because of the above" in msg


def test_spawn_timeout_kills_hung_rank():
    with pytest.raises(SpawnError) as ei:
        spawn(_w_sleep, 2, 30, timeout=2.5)
    msg = str(ei.value)
    assert "still running after timeout=2.5 s; killed" in msg
    assert "_w_sleep" in msg  # the dumped Python stack shows where it hung


def test_spawn_argument_checks():
    with pytest.raises(ValueError, match="nranks"):
        spawn(_w_sleep, 0)
    with pytest.raises(TypeError, match="cannot be sent"):
        spawn(lambda g: 1, 1)
    with pytest.raises(ValueError, match="module:function"):
        spawn("no_colon_here", 1)
    with pytest.raises(ValueError, match="devices"):
        spawn(_w_sleep, 2, 0, devices=[0])


def test_interactive_main_function_is_refused(monkeypatch):
    import types

    fake_main = types.ModuleType("__main__")  # a notebook's __main__ has no __file__
    monkeypatch.setitem(sys.modules, "__main__", fake_main)

    def f(group):
        return 1

    f.__module__ = "__main__"
    with pytest.raises(TypeError, match="writefile"):
        spawn(f, 1)


def test_single_rank_group_and_as_group():
    g = as_group(None)
    assert isinstance(g, SingleRankGroup)
    assert (g.rank, g.size, g.local_rank, g.local_size, g.all_local) == (0, 1, 0, 1, True)
    assert g.allgather_bytes(b"abc") == [b"abc"]
    assert g.broadcast_bytes(b"q") == b"q"
    g.barrier()
    assert as_group(g) is g
    with pytest.raises(TypeError, match="builtins.int"):
        as_group(3)
    with pytest.raises(TypeError, match="needs bytes"):
        g.allgather_bytes("text")
    with pytest.raises(ValueError, match="root"):
        g.broadcast_bytes(b"", root=1)


def test_local_group_in_process(tmp_path):
    """A one-rank LocalGroup needs no other process; the store keeps at most two rounds."""
    g = LocalGroup(str(tmp_path), 0, 1, timeout=1)
    for i in range(5):
        assert g.allgather_bytes(bytes([i])) == [bytes([i])]
    assert len([f for f in os.listdir(tmp_path) if f.startswith("ag.")]) == 1
    g.close()
    with pytest.raises(NumbaEPError, match="closed"):
        g.barrier()
    with pytest.raises(ValueError):
        LocalGroup(str(tmp_path), 2, 2)
    with pytest.raises(FileNotFoundError):
        LocalGroup(str(tmp_path / "nope"), 0, 1)


def test_local_group_timeout_in_process(tmp_path):
    g = LocalGroup(str(tmp_path), 0, 3, timeout=0.2)
    with pytest.raises(CommTimeoutError) as ei:
        g.barrier()
    e = ei.value
    assert (e.what, e.rank, e.peer) == ("barrier", 0, (1, 2))
    assert "rank(s) 1, 2 of 3 never arrived" in str(e)
    import pickle

    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.what, e2.rank, e2.peer, str(e2)) == (e.what, e.rank, e.peer, str(e))


def test_timeout_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_EP_TIMEOUT_S", "0.25")
    assert LocalGroup(str(tmp_path), 0, 1).timeout == 0.25
    monkeypatch.setenv("NUMBA_EP_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="NUMBA_EP_TIMEOUT_S"):
        LocalGroup(str(tmp_path), 0, 1)


def test_lazy_exports():
    assert numba_ep.Group is Group
    assert numba_ep.spawn is spawn
    assert numba_ep.CommTimeoutError is CommTimeoutError


def test_submodules_after_a_plain_import():
    """``import numba_ep`` alone, in a fresh interpreter, reaches ``numba_ep.group`` and
    ``numba_ep.reference`` (and ``numba_ep.autograd`` where torch is installed)."""
    import subprocess

    code = ("import numba_ep, importlib.util as u; numba_ep.group.as_group; "
            "numba_ep.reference.calc_diff; "
            "u.find_spec('torch') is None or numba_ep.autograd.dispatch; print('ok')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------ torch.distributed (gloo, CPU)


def test_torch_group(tmp_path):
    pytest.importorskip("torch.distributed", reason="torch is not installed (pip install numba_ep[torch])")
    res = spawn(_w_torch, 2, str(tmp_path / "init"), timeout=120)
    for r, info in enumerate(res):
        assert info["type"] == "TorchGroup"
        assert (info["rank"], info["size"], info["local"]) == (r, 2, (r, 2))
        assert info["out"] == [b"t", b"tt"]
        assert info["bc"] == b"hello"


# ------------------------------------------------------------------ MPI (mpirun -n 2)

_MPI_SCRIPT = r"""
import numba_ep
from numba_ep.group import as_group, MPIGroup
from mpi4py import MPI
g = as_group(None)
assert isinstance(g, MPIGroup), type(g)
assert as_group(MPI.COMM_WORLD).size == g.size
out = g.allgather_bytes(b"m" * (g.rank + 1))
g.barrier()
bc = g.broadcast_bytes(b"hi" if g.rank == 0 else None, root=0)
assert out == [b"m" * (r + 1) for r in range(g.size)], out
assert bc == b"hi"
assert (g.local_rank, g.local_size) == (g.rank, g.size)
g.close()
print("MPI-OK", g.rank, flush=True)
"""


_MPI_TIMEOUT_SCRIPT = r"""
import time
import numba_ep
from numba_ep.errors import CommTimeoutError
from numba_ep.group import MPIGroup
from mpi4py import MPI
g = MPIGroup(MPI.COMM_WORLD, timeout=1.0)
big = bytes(range(256)) * 4096          # 1 MiB: past MPI's eager limit, so a rendezvous send
if g.rank == 1:
    time.sleep(3.0)                     # sits out rank 0's first barrier
    g.barrier()                         # ... and completes it late (rank 0's message is there)
    print("LATE-BARRIER-OK", flush=True)
else:
    t0 = time.monotonic()
    try:
        g.barrier()
        print("NO-TIMEOUT", flush=True)
    except CommTimeoutError as e:
        print("TIMEOUT", e.peer, e.rank, round(time.monotonic() - t0, 1), str(e), flush=True)
# the two ranks are in step again: the next collectives match (rank 0 waits out rank 1's nap)
g.timeout = 30.0
out = g.allgather_bytes(big[: g.rank + 1] + big if g.rank else big)
assert out == [big, big[:2] + big], [len(o) for o in out]
assert g.broadcast_bytes(b"root" if g.rank == 0 else None) == b"root"
g.close()
print("MPI-OK", g.rank, flush=True)
"""


def _run_mpi(tmp_path, script, name):
    path = tmp_path / name
    path.write_text(script)
    out = mpi_launch(2, [str(path)]).stdout
    assert "MPI-OK 0" in out and "MPI-OK 1" in out
    return out


def test_mpi_group(tmp_path):
    _run_mpi(tmp_path, _MPI_SCRIPT, "mpi_group.py")


def test_mpi_group_timeout_names_the_missing_rank(tmp_path):
    """MPI's own collectives never time out; MPIGroup's do, naming the rank, and the ranks are in
    step again afterwards (the late rank completes the collective the other gave up on)."""
    out = _run_mpi(tmp_path, _MPI_TIMEOUT_SCRIPT, "mpi_timeout.py")
    line = next(ln for ln in out.splitlines() if ln.startswith(("TIMEOUT", "NO-TIMEOUT")))
    assert line.startswith("TIMEOUT 1 0 "), line
    assert float(line.split()[3]) < 2.5, line           # 1 s timeout, not rank 1's 3 s
    assert "barrier #1 timed out after 1 s; rank(s) 1 of 2 never arrived" in line, line
    assert "LATE-BARRIER-OK" in out


def test_mpi_demo_without_a_gpu():
    """``mpirun -n 3 python -m numba_ep demo --mpi`` on a machine without a GPU: the Buffer
    round trip on the CPU backend over MPIGroup, every rank exact."""
    from numba_ep.group import gpu_count

    if gpu_count() > 0:
        pytest.skip("a GPU is visible: the MPI demo would run the GPU kernels")
    out = mpi_launch(3, ["-m", "numba_ep", "demo", "--mpi"]).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("[rank")]
    assert len(lines) == 3, out
    assert all("CPU backend, 3 MPI ranks" in ln and "= x * visits, exactly" in ln
               for ln in lines), out
