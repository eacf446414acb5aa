"""Where a torch caller's extra host time goes in normal-mode calls, measured on one GPU.

A cached BF16 intranode dispatch costs ~120 us of host with torch tensors against ~75 us with
CuPy arrays on a 2xH200 host (bench intranode). This times both (the host's time per call while
a delay kernel holds the stream, so no call waits for the GPU), then profiles each with cProfile
and prints, per function, the own time per call under torch minus under CuPy: cProfile inflates
every small call, but both runs are inflated alike, so the largest differences show where the
torch path spends its extra time.

    python scripts/normal_host_profile.py [--calls 300] [--tokens 4096] [--top 25]
"""
import argparse
import cProfile
import pstats
import sys
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numba_ep  # noqa: E402,F401  (NumPy shim first)
from ll_host_breakdown import per_call_us  # noqa: E402


def own_times(fn, calls):
    """{function: own seconds per call} over ``calls`` calls of ``fn`` under cProfile."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats
    return {f"{os.path.basename(k[0])}:{k[1]}({k[2]})": v[2] / calls for k, v in stats.items()}


def profile(group, calls=300, tokens=4096, hidden=7168, num_topk=8, num_experts=256, top=25):
    import cupy as cp
    import torch

    from numba_ep.bench_ll import DELAY_SIG, make_delay
    from numba_ep.buffer import Buffer
    from numba_ep.config import Config
    from numba_ep.demo import _random_topk
    from numba_ep.launch import get_kernel

    R = group.size
    rng = np.random.default_rng(7 + group.rank)
    cfg = Config(24, Buffer.get_dispatch_config(R).num_max_nvl_chunked_send_tokens, 256)
    buf = Buffer(group, max(cfg.get_nvl_buffer_size_hint(hidden * 2, R), 64 << 20),
                 explicitly_destroy=True)
    stream = cp.cuda.Stream(non_blocking=True)
    delay = get_kernel(make_delay, DELAY_SIG)
    dev = torch.device("cuda", cp.cuda.Device().id)
    ts = torch.cuda.ExternalStream(stream.ptr, device=dev)
    out = {}
    try:
        with stream, torch.cuda.stream(ts):
            x = cp.asarray(rng.integers(0, 1 << 14, (tokens, hidden), dtype=np.uint16))
            topk = cp.asarray(_random_topk(rng, tokens, num_experts, num_topk, drop=0.0))
            w = cp.asarray(rng.random((tokens, num_topk), dtype=np.float32))
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, num_experts)

            def as_t(a):
                return torch.as_tensor(a, device=dev)

            runs = {}
            for kind in ("cupy", "torch"):
                xi = x if kind == "cupy" else as_t(x.view(cp.int16)).view(torch.bfloat16)
                conv = (lambda a: a) if kind == "cupy" else as_t
                recv_x, _, _, _, handle, _ = buf.dispatch(
                    xi, num_tokens_per_rank=conv(per_rank), is_token_in_rank=conv(in_rank),
                    num_tokens_per_expert=conv(per_expert), topk_idx=conv(topk),
                    topk_weights=conv(w), config=cfg)
                runs[kind] = {
                    "dispatch": lambda xi=xi, h=handle: buf.dispatch(xi, handle=h, config=cfg),
                    "combine": lambda r=recv_x, h=handle: buf.combine(r, h, config=cfg),
                }
            for op in ("dispatch", "combine"):
                for kind in ("cupy", "torch"):
                    out[f"{op} {kind}, host us per call"] = per_call_us(
                        runs[kind][op], stream, delay, 100)
            for op in ("dispatch", "combine"):
                own = {}
                for kind in ("cupy", "torch"):
                    stream.synchronize()
                    delay.launch(1, 1, calls * 2_000_000, stream=stream)
                    own[kind] = own_times(runs[kind][op], calls)
                    stream.synchronize()
                diff = {k: own["torch"].get(k, 0.0) - own["cupy"].get(k, 0.0)
                        for k in set(own["torch"]) | set(own["cupy"])}
                rows = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]
                out[f"{op}: cProfile own us per call, torch - cupy (total "
                    f"{sum(own['torch'].values()) * 1e6:.1f} vs "
                    f"{sum(own['cupy'].values()) * 1e6:.1f})"] = [
                    f"{d * 1e6:+8.2f}  {k}" for k, d in rows]
    finally:
        stream.synchronize()
        buf.destroy()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    from numba_ep.group import spawn

    res = spawn(profile, 1, calls=a.calls, tokens=a.tokens, top=a.top, timeout=600)[0]
    for k, v in res.items():
        if isinstance(v, list):
            print(k)
            for line in v:
                print("   ", line)
        else:
            print(f"{k}: {v:.2f}")


if __name__ == "__main__":
    main()
