"""What the compiler made of the kernels, at a git revision and in the working tree, side by
side: a way to check a kernel refactor on a machine without a GPU.

    python scripts/kernel_diff.py                 # working tree against HEAD, every family
    python scripts/kernel_diff.py --base main~3 --families low_latency

For every kernel the GPU tests launch (``kernel_specs`` of tests/gpu/workers_intranode.py,
workers_internode.py and workers_buffer_ll.py, plus every low-latency send variant), both trees
compile it for sm_90 and the script compares:

- the PTX, with register numbers, labels and symbol names taken out (``PTX lines changed``);
- the ordered list of its memory and synchronisation instructions: loads, stores, atomics,
  reductions, fences, barriers and calls (``mem/sync``). If this list is the same, the two
  kernels make the same accesses in the same order, whatever the arithmetic around them;
- the SASS of the cubin that ``launch.compile_cubin`` makes, as for a GPU (the cubin's ``.text``
  sections, hashed): ``same`` means the GPU runs the identical program.

It exits 1 when a kernel's memory/sync list differs or a kernel exists on one side only. That is
not a verdict that the change is wrong, only that a GPU run has to judge it. Each side takes a
few minutes (the kernels are compiled in parallel; NVSHMEM kernels take ~10 s each).
"""
import argparse
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = ("intranode", "internode", "low_latency")
MEM_SYNC = re.compile(r"^\s*(@%?\w+\s+)?(ld|st|atom|red|fence|bar|membar|call|cp\.async|"
                      r"mbarrier)\b")


def normalize_ptx(text):
    """PTX lines without comments, blank lines, register numbers, labels and mangled names."""
    text = re.sub(r"_ZN\w+", "FN", text)
    text = re.sub(r"%(rd|r|p|f|fd|rs|h|hh)\d+", r"%\1", text)
    text = re.sub(r"\$L__BB\d+_\d+", "L", text)
    text = re.sub(r"_cudapy_smem_\d+", "SMEM", text)
    return [ln.rstrip() for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith("//")]


def mem_sync_ops(lines):
    """The memory and synchronisation instructions of normalized PTX, in order."""
    return [ln.strip() for ln in lines if MEM_SYNC.match(ln)]


def text_sections(cubin):
    """sha256 prefix and size of every ``.text*`` section of an ELF64 cubin, sorted (section
    names carry numba's unique suffixes, so only the contents are compared)."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx][4]
    out = []
    for sec in secs:
        name = cubin[strtab + sec[0]: cubin.index(b"\0", strtab + sec[0])]
        if name.startswith(b".text"):
            body = cubin[sec[4]: sec[4] + sec[5]]
            out.append(f"{hashlib.sha256(body).hexdigest()[:16]}:{sec[5]}")
    return sorted(out)


def _specs(repo, families):
    """(key, factory, signature, constants) of every kernel to compare, from ``repo``'s tests."""
    sys.path[:0] = [repo, os.path.join(repo, "tests", "gpu")]
    specs = []
    if "intranode" in families:
        import workers_intranode
        for n in (1, 2, 4, 8):
            specs += workers_intranode.kernel_specs(n)
    if "internode" in families:
        import workers_internode
        for layout in ((2, 1), (4, 2), (4, 1), (8, 4), (8, 2)):
            specs += workers_internode.kernel_specs(layout)
    if "low_latency" in families:
        import workers_buffer_ll

        from numba_ep.kernels import low_latency as ll
        for n in (1, 2, 4, 8):
            specs += workers_buffer_ll.kernel_specs(n)
        common = dict(num_ranks=2, num_experts=288, hidden=7168, max_tokens=128)
        for nv in (False, True):
            for v16 in (True, False) if not nv else (True,):
                for fp8, rs in ((True, False), (True, True), (False, False)):
                    specs.append((ll.make_dispatch_send, ll.DISPATCH_SEND_SIG,
                                  dict(common, num_topk=8, use_fp8=fp8, round_scale=rs,
                                       vec16=v16, use_nvshmem=nv)))
                for lf, zc in ((False, False), (True, False), (False, True)):
                    specs.append((ll.make_combine_send, ll.COMBINE_SEND_SIG,
                                  dict(common, use_logfmt=lf, zero_copy=zc, vec16=v16,
                                       use_nvshmem=nv)))
    unique = {}
    for f, sig, kw in specs:
        key = f"{f.__name__}({', '.join(f'{k}={v}' for k, v in sorted(kw.items()))})"
        unique.setdefault(key, (f, sig, kw))
    return unique


OPTIONS = ("lineinfo", "max_registers", "launch_bounds", "fastmath")   # get_kernel's, not constants


def _compile(args):
    """In a worker process: the kernel's PTX (normalized) and the ``.text`` sections of the cubin
    that ``launch.compile_cubin`` makes of it, as on a GPU (NVSHMEM's device code linked in)."""
    repo, families, key = args
    from types import SimpleNamespace

    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))
    f, sig, kw = _specs(repo, families)[key]
    from numba import cuda

    from numba_ep.launch import compile_cubin, parse_signature
    options = {k: v for k, v in kw.items() if k in OPTIONS}
    constants = {k: v for k, v in kw.items() if k not in OPTIONS}
    text, _ = cuda.compile(f(**constants), parse_signature(sig), device=False, cc=(9, 0),
                           output="ptx", abi="numba")
    cubin, _ = compile_cubin(f(**constants), parse_signature(sig), (9, 0), **options)
    return key, {"ptx": normalize_ptx(text), "sass": text_sections(cubin)}


def dump(repo, families, out, jobs):
    """Compile every kernel of ``repo`` (a checkout) and write {key: {ptx, sass}} to ``out``."""
    keys = list(_specs(repo, families))
    import multiprocessing as mp
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        result = dict(pool.map(_compile, [(repo, families, k) for k in keys]))
    with open(out, "w") as f:
        json.dump(result, f)


def compare(old, new):
    """Rows ``(key, ptx lines changed, mem/sync same, sass same)`` and the keys on one side
    only."""
    import difflib
    rows = []
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        changed = sum(1 for ln in difflib.unified_diff(a["ptx"], b["ptx"], lineterm="", n=0)
                      if ln[:1] in "+-" and not ln.startswith(("---", "+++")))
        sass = a["sass"] == b["sass"]
        rows.append((key, changed, mem_sync_ops(a["ptx"]) == mem_sync_ops(b["ptx"]), sass))
    return rows, sorted(set(old) ^ set(new))


def _side(repo, families, out, jobs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, os.path.abspath(__file__), "--dump", out, "--repo", repo,
                    "--families", ",".join(families), "--jobs", str(jobs)], env=env, check=True)
    with open(out) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="HEAD", help="the git revision to compare with (HEAD)")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--dump", help=argparse.SUPPRESS)
    p.add_argument("--repo", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    families = tuple(a.families.split(","))
    if a.dump:
        dump(a.repo, families, a.dump, a.jobs)
        return 0
    root = os.path.dirname(HERE)
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", root, "worktree", "add", "-q", "--detach", base, a.base],
                       check=True)
        try:
            old = _side(base, families, os.path.join(tmp, "old.json"), a.jobs)
        finally:
            subprocess.run(["git", "-C", root, "worktree", "remove", "--force", base])
        new = _side(root, families, os.path.join(tmp, "new.json"), a.jobs)
    rows, one_side = compare(old, new)
    bad = list(one_side)
    print("PTX lines changed | mem/sync | SASS | kernel   (kernels with any difference)")
    for key, changed, same_ops, sass in rows:
        if not same_ops:
            bad.append(key)
        if changed or not same_ops or not sass:
            print(f"{changed:>17} | {'same' if same_ops else 'DIFFERS':8} | "
                  f"{'same' if sass else 'differs':4} | {key}")
    same = sum(1 for r in rows if not r[1])
    print(f"{len(rows)} kernels on both sides; {same} with the same PTX; "
          f"{sum(1 for r in rows if r[2])} with the same memory/sync instructions; "
          f"{sum(1 for r in rows if r[3])} with the same SASS")
    for key in one_side:
        print(f"only on {'the base' if key in old else 'the working tree'}: {key}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
