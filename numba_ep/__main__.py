"""python -m numba_ep demo | bench NAME | selftest

- ``demo``: shows the library working. Without a GPU it runs the layout kernel in numba's CUDA
  simulator and a reference dispatch -> combine round trip; with GPUs it runs the real kernels on
  every local GPU (``--ranks N`` to choose; ``--mpi`` under mpirun).
- ``bench launch|layout|intranode|low-latency``: GPU benchmarks; prints a table and writes JSON
  (``--json PATH``). ``intranode`` and ``low-latency`` use every local GPU (``--ranks N``);
  ``low-latency`` prints dispatch, combine, both, and the send/recv phases of hook mode beside
  DeepEP V1's 2 x H100 numbers; ``--kernel-times`` adds each kernel's own duration from the CUDA
  profiler (DeepEP's method of measuring). With it a rank may print a glibc heap message
  (``free(): invalid pointer``, ``double free or corruption``) as its process exits, after its
  numbers are in. It comes only from processes that ran the profiler; the likely cause is
  torch's, which frees CUPTI activity buffers at shutdown that CUPTI still holds (pytorch/pytorch
  pull request 195207). ``numba_ep.spawn`` then warns that the rank died after returning.
- ``selftest``: the GPU test-suite (``pytest -m "gpu or multigpu"``).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    from numba_ep.group import gpu_count


    p = argparse.ArgumentParser(prog="python -m numba_ep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run what the library has, on GPUs or (without) on the CPU")
    d.add_argument("--ranks", type=int, default=None, help="GPUs to use (default: all local)")
    d.add_argument("--mpi", action="store_true", help="one rank per MPI process (under mpirun)")
    d.add_argument("--cpu", action="store_true", help="force the CPU path (simulator + reference)")
    b = sub.add_parser("bench", help="GPU benchmarks")
    b.add_argument("name", choices=["launch", "layout", "intranode", "internode", "low-latency"])
    b.add_argument("--json", default=None, help="write results to this JSON file")
    b.add_argument("--ranks", type=int, default=None)
    b.add_argument("--kernel-times", action="store_true",
                   help="low-latency: also each kernel's duration from the CUDA profiler "
                        "(torch.profiler; DeepEP's method), measured last")
    sub.add_parser("selftest", help="run the GPU tests with pytest")
    args = p.parse_args(argv)

    if args.cmd == "demo":
        from numba_ep import demo

        no_gpu = args.cpu or gpu_count() == 0
        if args.mpi:
            return demo.mpi_demo(cpu=no_gpu)
        if no_gpu:
            os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before anything imports numba
            return demo.cpu_demo()
        return demo.gpu_demo(args.ranks)
    if args.cmd == "bench":
        if gpu_count() == 0:
            print("bench: no CUDA GPU visible; benchmarks need one", file=sys.stderr)
            return 2
        from numba_ep import bench

        return bench.main(args.name, json_path=args.json, ranks=args.ranks,
                          kernel_times=args.kernel_times)
    if args.cmd == "selftest":
        import subprocess

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.call([sys.executable, "-m", "pytest", "-m", "gpu or multigpu", "-q",
                                os.path.join(here, "tests")])
    return 1


if __name__ == "__main__":
    sys.exit(main())
