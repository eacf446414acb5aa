"""Run intranode code paths at more ranks than this host has GPUs (rank r on GPU r % count):
the kernel-level round trip and Buffer suites of tests/gpu at N ranks, checked against
numba_ep.reference as in the GPU tests. Ranks sharing a GPU are time-sliced by the driver, so
this is a correctness run of the N-rank code paths (ring indexing, peer groups, barriers), never
a timing. Usage, on a GPU machine:  python scripts/oversubscribe.py 8 [suite ...]
(suites: edge, bf16, fp8 of tests/gpu/workers_intranode.py; ll, the low-latency matrix; and
internode:G, the internode GPU test's suite with the ranks split into nodes of G, e.g.
``python scripts/oversubscribe.py 8 internode:4 internode:2`` for 2 x 4 and 4 x 2).
The NVSHMEM suites (ll, internode) need as many ranks on every GPU (6 on 2 GPUs, not 3):
NVSHMEM cannot start on an uneven split, and ``nvshmem_init`` says so.
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "gpu"))

import numba_ep  # noqa: E402,F401
from numba_ep.group import gpu_count, spawn  # noqa: E402


def main(argv):
    n = int(argv[0]) if argv else 8
    suites = argv[1:] or ["edge", "bf16", "fp8"]
    import workers_intranode as W
    from workers_intranode_kernels import dispatch_combine_round_trip

    print(f"{n} ranks on {gpu_count()} GPUs")
    ok = True
    runs = [("round trip mixed 2048", dispatch_combine_round_trip,
             ([512, 0, 300, 1, 77, 256, 5, 129][:n], 2048, 8 * n, 8, 4, 64), {}),
            # the expert count must divide by the rank count: 255 experts for 3 ranks
            ("round trip 1024 x 7168", dispatch_combine_round_trip,
             (1024, 7168, 256 // n * n, 8, 12, 256), {})]
    for s in suites:
        if s == "ll":  # the low-latency matrix (NVSHMEM with two PEs on a GPU)
            import workers_low_latency as LL

            runs.append(("low-latency matrix", f"{LL.__file__}:ll_matrix", (), {}))
        elif s.startswith("internode:"):   # the ranks split into nodes of G (spawn passes env)
            import workers_internode as I

            g = int(s.partition(":")[2])
            runs.append((f"internode suite, {n // g} nodes x {g}", f"{I.__file__}:suite", (1234,),
                         {"NUMBA_EP_GPUS_PER_NODE": str(g)}))
        else:
            runs.append((f"Buffer suite {s}", f"{W.__file__}:run_suite", (s, 1234), {}))
    for name, fn, args, env in runs:
        t0 = time.monotonic()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            res = spawn(fn, n, *args, timeout=400, group_timeout=300)
            print(f"PASS {name} ({time.monotonic() - t0:.0f} s): {res[0] if res else ''}",
                  flush=True)
        except Exception as e:  # report and go on: each run is independent
            ok = False
            print(f"FAIL {name} ({time.monotonic() - t0:.0f} s): {type(e).__name__}: "
                  f"{str(e)[:3000]}", flush=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
