"""Sweep the compile-time choices of the intranode kernels (numba_ep.kernels.intranode.TUNING)
at the ``bench intranode`` shape on every local GPU; prints one line per variant and operation:
time around the Python call and device time from CUDA-graph replays, the slowest rank's.

    python scripts/sweep_intranode.py [--json PATH] [--ranks N]
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
    args = ap.parse_args()
    n = args.ranks or gpu_count()
    per_rank = spawn(intranode_rank, n, variants=VARIANTS)
    table = {}
    print(f"sweep intranode on {n} x {_device_name()} (us: around the call / device from graphs)")
    for v in per_rank[0]:
        for op in per_rank[0][v]:
            call = max(r[v][op][0] for r in per_rank)
            dev = max(r[v][op][1] for r in per_rank)
            table[f"{v} {op}"] = (call, dev)
            print(f"  {v:<36} {op:<14} {call:8.1f} {dev:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
