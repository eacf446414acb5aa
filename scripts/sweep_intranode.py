"""Sweep the compile-time choices of the intranode kernels (numba_ep.kernels.intranode.TUNING)
at the ``bench intranode`` shape on every local GPU; prints one line per variant and operation:
time around the Python call and device time from CUDA-graph replays, the slowest rank's.

    python scripts/sweep_intranode.py [--json PATH] [--ranks N] [--profile PREFIX]
                                      [--variants '[{"ring_nc": true, "unroll": 8}]']
"""
import argparse
import json

VARIANTS = [
    {"ring_nc": False, "unroll": 4},   # v3, the last measured kernels
    {"ring_nc": True, "unroll": 4},
    {"ring_nc": False, "unroll": 8},
    {"ring_nc": True, "unroll": 8},
]


def main():
    from numba_ep.bench import _device_name, intranode_rank
    from numba_ep.group import gpu_count, spawn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--ranks", type=int, default=None)
    ap.add_argument("--profile", help="path prefix for rank 0's cProfile of the host side")
    ap.add_argument("--variants", type=json.loads, default=VARIANTS,
                    help="JSON list of TUNING dicts (default: the built-in sweep)")
    args = ap.parse_args()
    n = args.ranks or gpu_count()
    per_rank = spawn(intranode_rank, n, variants=args.variants, profile=args.profile)
    table = {}
    cols = ("pipelined", "device", "isolated", "host")
    print(f"sweep intranode on {n} x {_device_name()}, us, slowest rank: back-to-back calls "
          "(DeepEP's method) / device (graph replay) / one call after a barrier / host per call")
    for v in per_rank[0]:
        for op in per_rank[0][v]:
            vals = [max(r[v][op][k] for r in per_rank) for k in cols]
            table[f"{v} {op}"] = dict(zip(cols, vals))
            print(f"  {v:<36} {op:<14} " + " ".join(f"{x:8.1f}" for x in vals))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
