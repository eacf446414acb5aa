"""Spawn targets for tests/gpu/test_intranode_gpu.py: each function runs in one rank's process.

Every rank builds the inputs of EVERY rank from the same seeds (``make_inputs``), so each can run
``numba_ep.reference`` for the whole group and compare its own GPU outputs with it; nothing but
the Buffer's own traffic crosses between ranks. Dispatch must match the reference exactly (bytes
of recv_x and scales, top-k ids and weights, source indices, handle matrices, per-expert counts);
combine within a BF16 rounding tolerance and DeepEP's calc_diff bound.

Functions return plain Python values (lists, dicts, strings) so the parent can unpickle them.
"""
import time
from dataclasses import dataclass, replace

import numba_ep  # noqa: F401  (NumPy shim before numba.cuda)
import numpy as np

from numba_ep import reference as ref

BF16 = ref.bfloat16
FP8 = ref.float8_e4m3fn


# ------------------------------------------------------------------------------------------ cases

@dataclass(frozen=True)
class Case:
    name: str
    tokens: tuple            # tokens of rank r = tokens[r % len(tokens)]
    hidden: int
    topk: int = 8            # K; 0 = dispatch without top-k (routing from is_token_in_rank)
    experts_per_rank: int = 8
    fp8: bool = False
    alignment: int = 1
    worst: bool = False      # num_worst_tokens = max(tokens) * R
    drop: float = 0.1        # probability that a top-k slot is -1
    avoid_rank: int = -1     # experts of this rank are never chosen (it receives nothing)
    kind: str = "cupy"       # "cupy" or "torch"
    mode: str = "sync"       # "sync" | "async" | "async_prev" | "alloc_comm"
    bias: int = 0            # bias arrays in combine: 0, 1 (bias0) or 2 (bias0=ones, bias1=random)
    small_ring: bool = False  # Config(8, 6, 64): 4 channels, rings that wrap many times
    deepep_check: bool = False  # DeepEP's own combine check: combine(recv_x) / copies == x


SUITES = {
    "bf16": [
        Case("bf16-h7168-top8", (300, 257), 7168, deepep_check=True),
        Case("bf16-h4096-no-topk-async-prev", (128, 96), 4096, topk=0, mode="async_prev"),
        Case("bf16-h2048-align128-ring-wrap-alloc-comm-bias2", (600, 555), 2048, topk=4,
             alignment=128, small_ring=True, mode="alloc_comm", bias=2),
        Case("bf16-torch-h4096-async-bias1", (200, 131), 4096, topk=6, kind="torch",
             mode="async", bias=1, deepep_check=True),
    ],
    "fp8": [
        Case("fp8-h7168-top8-align128-worst", (256, 199), 7168, fp8=True, alignment=128,
             worst=True),
        Case("fp8-h2048-no-topk-async-prev", (100, 77), 2048, fp8=True, topk=0, mode="async_prev"),
        Case("fp8-torch-h4096-top8", (64, 33), 4096, fp8=True, kind="torch"),
    ],
    "edge": [
        Case("one-and-zero-tokens", (1, 0), 2048, topk=4),
        Case("no-tokens-anywhere", (0, 0), 4096, topk=4),
        Case("rank1-receives-nothing-bias2", (77, 50), 2048, topk=4, avoid_rank=1, bias=2),
        Case("tokens-sent-nowhere-worst", (65, 31), 4096, topk=1, drop=0.5, worst=True),
        Case("top16-odd-tokens-worst-align128", (3, 5), 7168, topk=16, experts_per_rank=16,
             worst=True, alignment=128),
    ],
}


GRAPH_CASE = Case("graph", (96, 80), 2048, topk=4)


def _torch_ok(cpu=False):
    """torch importable, with CUDA unless the Buffer runs on the CPU backend."""
    try:
        import torch

        return cpu or torch.cuda.is_available()
    except Exception:
        return False


# ------------------------------------------------------------------------------------ compilation

def _configs(case, R):
    from numba_ep.buffer import Buffer
    from numba_ep.config import Config

    if case.small_ring:
        return Config(8, 6, 64), Config(8, 4, 64)
    return Buffer.get_dispatch_config(R), Buffer.get_combine_config(R)


def kernel_specs(nranks):
    """Every (factory, signature, get_kernel keywords) that the suites and the graph test launch
    with ``nranks`` ranks (with repeats), so tests/gpu/parallel_compile.py can build them all before the ranks
    start (one kernel is ~5 s of NVRTC; the suites need ~25 per rank count). The specs come from
    the same functions the launchers use; a spec missed here is only compiled later, by a rank."""
    from numba_ep.kernels import barrier, intranode as I, layout

    R = nranks
    specs = [barrier.barrier_spec(R)]
    for case in [c for cases in SUITES.values() for c in cases] + [GRAPH_CASE]:
        dcfg, ccfg = _configs(case, R)
        L, K, H = case.experts_per_rank, case.topk, case.hidden
        S = H // 128 if case.fp8 else 0
        row = H if case.fp8 else 2 * H
        specs.append(layout.layout_spec(L * R, R, K if K else 4, R))
        for cfg in (dcfg, ccfg):
            specs.append(I.cached_notify_spec(R, cfg.num_channels))
        specs.append(I.notify_spec(R, dcfg.num_channels, L))
        n = dcfg.num_max_nvl_chunked_recv_tokens
        specs.append(I.dispatch_spec(R, dcfg.num_channels, n, row, K, S, L))
        specs.append(I.dispatch_spec(R, dcfg.num_channels, n, row, 0, S, L))  # cached
        n = ccfg.num_max_nvl_chunked_recv_tokens
        specs.append(I.combine_spec(R, ccfg.num_channels, n, 2 * H, K))
        if case.deepep_check:
            specs.append(I.combine_spec(R, ccfg.num_channels, n, 2 * H, 0))
    return specs


# ------------------------------------------------------------------------------------------ inputs

def num_tokens(case, r):
    return case.tokens[r % len(case.tokens)]


def make_inputs(case, seed, idx, r, R):
    """Host inputs of rank r for case number idx: bf16 x, its FP8 cast, top-k, weights, biases."""
    rng = np.random.default_rng([seed, idx, r])
    T, H, K = num_tokens(case, r), case.hidden, case.topk
    L = case.experts_per_rank
    E = L * R
    x = (rng.standard_normal((T, H)) * (1 + r)).astype(np.float32).astype(BF16)
    allowed = np.array([e for e in range(E) if e // L != case.avoid_rank], dtype=np.int64)
    k_route = K if K > 0 else 4  # without top-k dispatch, routing still comes from a top-4
    assert k_route <= len(allowed), "not enough experts for distinct top-k picks"
    scores = rng.random((T, len(allowed)))
    topk = allowed[np.argsort(-scores, axis=1)[:, :k_route]] if T else \
        np.zeros((0, k_route), np.int64)
    topk = np.ascontiguousarray(topk, dtype=np.int64)
    topk[rng.random(topk.shape) < case.drop] = -1
    weights = rng.standard_normal(topk.shape).astype(np.float32)
    out = dict(x=x, topk=topk, weights=weights, E=E, T=T)
    if case.fp8:
        out["x_fp8"], out["scales"] = ref.per_token_cast_to_fp8(x)
    out["bias0"] = np.ones((T, H), BF16)
    out["bias1"] = rng.standard_normal((T, H)).astype(np.float32).astype(BF16)
    return out


def expert_output(case, seed, idx, r, rows):
    """Rank r's combine input: random bf16 [rows, H]."""
    rng = np.random.default_rng([seed, idx, r, 7])
    return rng.standard_normal((rows, case.hidden)).astype(np.float32).astype(BF16)


# ------------------------------------------------------------------------------------------ kinds

class Kind:
    """Moves host arrays to this rank's GPU in the case's kind ("cupy", "torch"; "numpy" for the
    CPU backend), and results back to NumPy."""

    def __init__(self, kind, device):
        self.kind, self.device = kind, device  # device None: host memory (CPU backend)
        if kind == "torch":
            import torch

            if device is not None:
                torch.cuda.set_device(device)
            self.torch = torch

    def to(self, a, col_major=False):
        if a is None:
            return None
        if self.kind in ("cupy", "numpy"):  # bf16 / fp8 travel as uint16 / uint8 bits
            xp = np
            if self.kind == "cupy":
                import cupy as xp

            if a.dtype == BF16:
                a = a.view(np.uint16)
            elif a.dtype == FP8:
                a = a.view(np.uint8)
            if col_major:
                return xp.asarray(np.ascontiguousarray(a.T)).T
            return xp.array(a)
        torch = self.torch
        dev = "cpu" if self.device is None else f"cuda:{self.device}"
        if a.dtype == BF16:
            t = torch.from_numpy(np.ascontiguousarray(a.view(np.int16))).to(dev).view(torch.bfloat16)
        elif a.dtype == FP8:
            t = torch.from_numpy(np.ascontiguousarray(a.view(np.uint8))).to(dev).view(
                torch.float8_e4m3fn)
        else:
            t = torch.from_numpy(np.ascontiguousarray(a)).to(dev)
        if col_major:
            t = t.T.contiguous().T
        return t

    def host(self, a):
        """NumPy copy; bf16 comes back as uint16 bits, fp8 as uint8 bits."""
        if a is None:
            return None
        if self.kind == "torch" or type(a).__module__.startswith("torch"):
            torch = self.torch
            t = a.detach()
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            elif t.dtype == torch.float8_e4m3fn:
                t = t.view(torch.uint8)
            out = t.cpu().numpy()
            return out.view(np.uint16) if out.dtype == np.int16 else out
        if self.kind == "numpy":
            return np.array(a)
        import cupy as cp

        return cp.asnumpy(a)

    def is_kind(self, a):
        if self.kind == "numpy":
            return isinstance(a, np.ndarray)
        mod = type(a).__module__
        return mod.startswith("torch") if self.kind == "torch" else mod.startswith("cupy")

    def sync(self):
        if self.kind == "numpy" or self.device is None:
            return
        if self.kind == "torch":
            self.torch.cuda.current_stream().synchronize()
        else:
            import cupy as cp

            cp.cuda.get_current_stream().synchronize()


def bits(a):
    """Raw bytes of a host array (bf16 / fp8 / float32 compared bit for bit)."""
    return np.ascontiguousarray(a).view(np.uint8)


def assert_bits_equal(got, want, what):
    got, want = np.ascontiguousarray(got), np.ascontiguousarray(want)
    assert got.shape[0] == want.shape[0], f"{what}: {got.shape} vs {want.shape}"
    if got.shape[0] == 0:
        return
    g, w = bits(got).reshape(got.shape[0], -1), bits(want).reshape(want.shape[0], -1)
    assert g.shape == w.shape, f"{what}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    if not np.array_equal(g, w):
        rows = np.nonzero((g != w).any(axis=1))[0]
        raise AssertionError(f"{what}: {len(rows)} of {len(g)} rows differ, first rows "
                             f"{rows[:8].tolist()}")


def assert_bf16_close(got_u16, want_bf16, what):
    """Within one BF16 rounding step of the float32-accumulated reference, and calc_diff < 5e-6."""
    got = got_u16.view(BF16).astype(np.float32)
    want = want_bf16.astype(np.float32)
    assert got.shape == want.shape, f"{what}: {got.shape} vs {want.shape}"
    if got.size == 0:
        return
    tol = np.abs(want) * 2.0 ** -7 + 1e-5
    bad = np.abs(got - want) > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements differ beyond one bf16 ulp, e.g. "
                           f"{got[bad][:4]} vs {want[bad][:4]}")
    d = ref.calc_diff(got, want)
    assert d < 5e-6, f"{what}: calc_diff {d}"


# ------------------------------------------------------------------------------------------ one case

def _call_kwargs(buf, case):
    """Stream/event arguments of one call for the case's mode."""
    from numba_ep.buffer import Buffer

    if case.mode == "sync":
        return {}
    if case.mode == "async":
        return dict(async_finish=True)
    prev = Buffer.capture()
    kw = dict(previous_event=prev, async_finish=True)
    if case.mode == "alloc_comm":
        kw["allocate_on_comm_stream"] = True
    return kw


def _wait(case, event, cpu=False):
    if cpu:  # the CPU backend is synchronous: no event to wait for
        assert event.event is None
        return
    if case.mode == "sync":
        assert event.event is None
    else:
        assert event.event is not None and event.extra_tensors, "async call must return an event"
        event.current_stream_wait()


def run_case(group, buf, case, seed, idx):
    R, rank = group.size, group.rank
    cpu = getattr(buf, "_cpu", False)  # numba_ep.cpu backend: NumPy / torch CPU in and out
    kind = Kind("numpy" if cpu and case.kind == "cupy" else case.kind, buf.device)
    inputs = [make_inputs(case, seed, idx, r, R) for r in range(R)]
    mine = inputs[rank]
    E, T, H = mine["E"], mine["T"], case.hidden
    dcfg, ccfg = _configs(case, R)
    C = dcfg.num_sms // 2
    worst = max(case.tokens) * R if case.worst else 0

    # -- reference for the whole group
    layouts = [ref.get_dispatch_layout(i["topk"], E, R) for i in inputs]
    with_topk = case.topk > 0
    xs = [i["x_fp8"] if case.fp8 else i["x"] for i in inputs]
    want = ref.intranode_dispatch(
        xs, [i["topk"] for i in inputs] if with_topk else None,
        [i["weights"] for i in inputs] if with_topk else None, E, C,
        x_scales=[i["scales"] for i in inputs] if case.fp8 else None,
        expert_alignment=case.alignment, num_worst_tokens=worst,
        is_token_in_rank=None if with_topk else [lay[3] for lay in layouts],
        num_tokens_per_expert=None if with_topk else [lay[2] for lay in layouts])
    w = want[rank]
    n_real = w["num_recv_tokens"]

    # -- device inputs
    topk_d = kind.to(mine["topk"])
    weights_d = kind.to(mine["weights"])
    if case.fp8:
        x_d = (kind.to(mine["x_fp8"]), kind.to(mine["scales"], col_major=True))
    else:
        x_d = kind.to(mine["x"])

    # -- layout
    per_rank, per_rdma, per_expert, in_rank, ev = buf.get_dispatch_layout(
        topk_d, E, **_call_kwargs(buf, case))
    _wait(case, ev, cpu)
    assert per_rdma is None
    for got, exp, what in zip((per_rank, per_expert, in_rank), layouts[rank][0:1] +
                              layouts[rank][2:4], ("num_tokens_per_rank", "num_tokens_per_expert",
                                                   "is_token_in_rank")):
        assert kind.is_kind(got), f"{what}: not returned in the caller's kind"
        np.testing.assert_array_equal(kind.host(got), exp, err_msg=what)

    # -- dispatch
    kw = _call_kwargs(buf, case)
    recv_x, recv_topk, recv_w, counts, handle, ev = buf.dispatch(
        x_d, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_d if with_topk else None,
        topk_weights=weights_d if with_topk else None, expert_alignment=case.alignment,
        num_worst_tokens=worst, config=dcfg, **kw)
    _wait(case, ev, cpu)
    N = worst if worst else n_real
    rx, rsc = (recv_x if case.fp8 else (recv_x, None))
    assert kind.is_kind(rx)
    if case.kind == "torch":
        import torch

        assert rx.dtype == (torch.float8_e4m3fn if case.fp8 else torch.bfloat16)
    else:
        assert rx.dtype == (np.uint8 if case.fp8 else np.uint16)
    assert tuple(rx.shape) == (N, H), (tuple(rx.shape), (N, H))
    assert_bits_equal(kind.host(rx)[:n_real], w["recv_x"][:n_real], "recv_x")
    if case.fp8:
        assert tuple(rsc.shape) == (N, H // 128)
        assert_bits_equal(kind.host(rsc)[:n_real], w["recv_x_scales"][:n_real], "recv_x_scales")
    if with_topk:
        got_topk = kind.host(recv_topk)
        assert got_topk.shape == (N, case.topk) and got_topk.dtype == np.int64
        np.testing.assert_array_equal(got_topk[:n_real], w["recv_topk_idx"][:n_real],
                                      err_msg="recv_topk_idx")
        assert (got_topk[n_real:] == -1).all(), "padding rows must have recv_topk_idx -1"
        assert_bits_equal(kind.host(recv_w)[:n_real], w["recv_topk_weights"][:n_real],
                          "recv_topk_weights")
    else:
        assert recv_topk is None and recv_w is None
    assert counts == w["num_recv_tokens_per_expert_list"], (counts,
                                                            w["num_recv_tokens_per_expert_list"])
    if worst:
        assert counts == []
    assert len(handle) == 6
    names = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix",
             "recv_src_idx", "is_token_in_rank", "send_head")
    for i, name in enumerate(names):
        got = kind.host(handle[i])
        exp = w[name]
        if name == "recv_src_idx":
            got, exp = got[:n_real], exp[:n_real]
        np.testing.assert_array_equal(got, exp, err_msg=f"handle: {name}")

    # -- cached dispatch with the handle: the same rows
    kw = _call_kwargs(buf, case)
    cached = buf.dispatch(x_d, handle=handle, config=dcfg, **kw)
    assert cached[1:5] == (None, None, None, None)
    _wait(case, cached[5], cpu)
    crx, crsc = (cached[0] if case.fp8 else (cached[0], None))
    assert tuple(crx.shape) == (N, H)
    assert_bits_equal(kind.host(crx)[:n_real], w["recv_x"][:n_real], "cached recv_x")
    if case.fp8:
        assert_bits_equal(kind.host(crsc)[:n_real], w["recv_x_scales"][:n_real],
                          "cached recv_x_scales")

    # -- combine of random expert outputs (+ bias) against the reference
    rows = [worst if worst else want[r]["num_recv_tokens"] for r in range(R)]
    ys = [expert_output(case, seed, idx, r, rows[r]) for r in range(R)]
    biases = None
    if case.bias:
        biases = [(i["bias0"], i["bias1"] if case.bias == 2 else None) for i in inputs]
    want_c = ref.intranode_combine(
        ys, want, topk_weights=[want[r]["recv_topk_weights"] for r in range(R)] if with_topk
        else None, bias=biases)
    y_d = kind.to(ys[rank])
    bias_d = None
    if case.bias == 1:
        bias_d = kind.to(mine["bias0"])
    elif case.bias == 2:
        bias_d = (kind.to(mine["bias0"]), kind.to(mine["bias1"]))
    kw = _call_kwargs(buf, case)
    combined, combined_w, ev = buf.combine(y_d, handle, topk_weights=recv_w if with_topk else None,
                                           bias=bias_d, config=ccfg, **kw)
    _wait(case, ev, cpu)
    assert kind.is_kind(combined) and tuple(combined.shape) == (T, H)
    assert_bf16_close(kind.host(combined), want_c[rank][0], "combined_x")
    if with_topk:
        got_w = kind.host(combined_w)
        if got_w.size:
            assert ref.calc_diff(got_w, want_c[rank][1]) < 1e-9
        np.testing.assert_array_equal(got_w, want_c[rank][1], err_msg="combined_topk_weights")
    else:
        assert combined_w is None

    # -- DeepEP's own check: combining recv_x gives x times its number of copies
    if case.deepep_check and not case.fp8:
        again, _, ev = buf.combine(rx, handle, config=ccfg)
        kind.sync()
        copies = layouts[rank][3].sum(axis=1)
        sel = copies > 0
        if sel.any():
            check = kind.host(again).view(BF16).astype(np.float64)[sel] / copies[sel, None]
            d = ref.calc_diff(check, mine["x"].astype(np.float64)[sel])
            assert d < 5e-6, f"DeepEP check: calc_diff {d}"
    kind.sync()
    return n_real


def _nvl_bytes(R):
    from numba_ep.buffer import Buffer
    from numba_ep.config import Config

    cfgs = [Buffer.get_dispatch_config(R), Buffer.get_combine_config(R), Config(8, 6, 64)]
    return max(c.get_nvl_buffer_size_hint(7168 * 2, R) for c in cfgs)


def run_suite(group, suite, seed):
    """Run every case of ``suite`` on one Buffer; return [(case name, rows received)]."""
    from numba_ep.buffer import Buffer

    R = group.size
    buf = Buffer(group, _nvl_bytes(R), explicitly_destroy=True)
    done = []
    try:
        for idx, case in enumerate(SUITES[suite]):
            if case.kind == "torch" and not _torch_ok(getattr(buf, "_cpu", False)):
                done.append((case.name, "skipped: no torch (with CUDA)"))
                continue
            if case.avoid_rank >= R:
                case = replace(case, avoid_rank=-1)
            try:
                n = run_case(group, buf, case, seed, idx)
            except Exception as e:
                raise AssertionError(f"case {case.name!r} (seed {seed}, rank {group.rank} of "
                                     f"{R}): {type(e).__name__}: {e}") from e
            done.append((case.name, n))
            group.barrier()
    finally:
        buf.destroy()
    return done


# ------------------------------------------------------------------------------------------ graphs

def graph_capture(group, seed, replays=3):
    """Capture layout + dispatch(num_worst_tokens) + combine on a CuPy stream, replay it with new
    inputs copied into the captured arrays, and check every replay against the reference."""
    import cupy as cp

    from numba_ep.buffer import Buffer
    from numba_ep.kernels.waits import error_record

    R, rank = group.size, group.rank
    case = GRAPH_CASE
    T, H, K = num_tokens(case, rank), case.hidden, case.topk
    E = case.experts_per_rank * R
    worst = max(case.tokens) * R
    dcfg, ccfg = Buffer.get_dispatch_config(R), Buffer.get_combine_config(R)
    C = dcfg.num_sms // 2
    buf = Buffer(group, _nvl_bytes(R), explicitly_destroy=True)
    x_d = cp.empty((T, H), cp.uint16)
    topk_d = cp.empty((T, K), cp.int64)
    w_d = cp.empty((T, K), cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    keep = []

    def load(step):
        inp = make_inputs(case, seed, 1000 + step, rank, R)
        x_d.set(inp["x"].view(np.uint16), stream=stream)
        topk_d.set(inp["topk"], stream=stream)
        w_d.set(inp["weights"], stream=stream)
        stream.synchronize()

    def body():
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_d, E)
        recv_x, recv_topk, recv_w, counts, handle, _ = buf.dispatch(
            x_d, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_d, topk_weights=w_d,
            num_worst_tokens=worst, config=dcfg)
        assert counts == []
        combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w, config=ccfg)
        # Everything a captured kernel reads or writes stays referenced while the graph lives.
        keep.append((per_rank, per_expert, in_rank, handle))
        return recv_x, recv_topk, recv_w, combined, combined_w

    def check(step, outs):
        inputs = [make_inputs(case, seed, 1000 + step, r, R) for r in range(R)]
        want = ref.intranode_dispatch([i["x"] for i in inputs], [i["topk"] for i in inputs],
                                      [i["weights"] for i in inputs], E, C,
                                      num_worst_tokens=worst)
        w = want[rank]
        n = w["num_recv_tokens"]
        recv_x, recv_topk, recv_w, combined, combined_w = (cp.asnumpy(a) for a in outs)
        assert recv_x.shape == (worst, H)
        assert_bits_equal(recv_x[:n], w["recv_x"][:n], f"replay {step}: recv_x")
        np.testing.assert_array_equal(recv_topk[:n], w["recv_topk_idx"][:n])
        assert (recv_topk[n:] == -1).all()
        assert_bits_equal(recv_w[:n], w["recv_topk_weights"][:n], f"replay {step}: weights")
        want_c = ref.intranode_combine([d["recv_x"] for d in want], want,
                                       topk_weights=[d["recv_topk_weights"] for d in want])
        assert_bf16_close(combined, want_c[rank][0], f"replay {step}: combined_x")
        np.testing.assert_array_equal(combined_w, want_c[rank][1])
        return n

    seen = []
    try:
        # Eager run first: compiles every kernel outside the capture, and checks the eager path.
        load(0)
        with stream:
            outs = body()
            stream.synchronize()
        seen.append(check(0, outs))
        group.barrier()

        load(1)
        with stream:
            stream.begin_capture()
            outs = body()
            graph = stream.end_capture()
        group.barrier()
        for step in range(1, replays + 1):
            if step > 1:
                load(step)
            group.barrier()           # every rank's inputs are in place
            graph.launch(stream=stream)
            stream.synchronize()
            error_record().check()
            seen.append(check(step, outs))
            group.barrier()           # every rank has read its outputs before the next replay
    finally:
        cp.cuda.runtime.deviceSynchronize()
        buf.destroy()
    return seen


# ------------------------------------------------------------------------------------------ timeout

def timeout_absent_peer(group, timeout_s=2.0):
    """Rank 1 never dispatches; rank 0 must raise CommTimeoutError naming rank 1, quickly. Both
    ranks then destroy the Buffer together and return."""
    import cupy as cp

    from numba_ep.buffer import Buffer
    from numba_ep.errors import CommTimeoutError

    R, rank = group.size, group.rank
    case = Case("timeout", (64,), 2048, topk=4)
    buf = Buffer(group, _nvl_bytes(R), explicitly_destroy=True, timeout_s=timeout_s)
    inp = make_inputs(case, 0, 0, rank, R)
    x_d = cp.asarray(inp["x"].view(np.uint16))
    topk_d = cp.asarray(inp["topk"])
    w_d = cp.asarray(inp["weights"])
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_d, inp["E"])
    result = {"rank": rank}
    if rank == 0:
        t0 = time.monotonic()
        try:
            buf.dispatch(x_d, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                         num_tokens_per_expert=per_expert, topk_idx=topk_d, topk_weights=w_d)
            result["error"] = None
        except CommTimeoutError as e:
            result.update(error=str(e), peer=e.peer, what=e.what)
        result["elapsed"] = time.monotonic() - t0
        # The Buffer refuses further work after a timeout.
        try:
            buf.dispatch(x_d, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                         num_tokens_per_expert=per_expert, topk_idx=topk_d, topk_weights=w_d)
            result["after"] = "no error"
        except RuntimeError as e:
            result["after"] = str(e)
    group.barrier()       # rank 1 waits here while rank 0 times out
    buf.destroy()         # collective
    return result
