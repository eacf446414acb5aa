#!/usr/bin/env bash
# Before/after timings in one device call: the same bench from an older revision's package and
# from the working tree, one after the other on the same machine (lent machines differ in card
# and host, so numbers from two calls do not compare).
#
#   here:        bash scripts/ab_bench.sh prepare REV     # REV's numba_ep/ into ab_base/ (untracked,
#                                                         # so it travels with the tree)
#   on a device: bash scripts/ab_bench.sh run NAME[:RANKS] [bench options...]
#   here, after: rm -rf ab_base
#
# `run` prints both tables side by side (old | new) and leaves them under $OUT. Each side keeps
# its own compiled-kernel cache: the cache key holds a digest of the kernel sources anyway.
set -uo pipefail
cmd=${1:-}; shift || true
case "$cmd" in
  prepare)
    rev=${1:?usage: ab_bench.sh prepare REV}
    rm -rf ab_base && mkdir ab_base
    git archive "$rev" numba_ep | tar -x -C ab_base
    echo "ab_base/numba_ep: numba_ep of $(git rev-parse --short "$rev")" ;;
  run)
    b=${1:?usage: ab_bench.sh run NAME[:RANKS] [options]}; shift
    [ -d ab_base/numba_ep ] || { echo "ab_base/numba_ep missing: run 'prepare REV' first"; exit 1; }
    OUT=${OUT:-/tmp/numba_ep_out}; mkdir -p "$OUT"
    name=${b%%:*}; extra=(); [ "$name" = "$b" ] || extra=(--ranks "${b#*:}")
    # from inside ab_base/, `python -m numba_ep` (and every spawned rank) imports the old package
    (cd ab_base && timeout -s INT ${BENCH_TIMEOUT:-240} python3 -W ignore -m numba_ep bench "$name" \
        "${extra[@]}" "$@" --json "$OUT/ab-old.json" > "$OUT/ab-old.txt" 2>&1); rc_old=$?
    timeout -s INT ${BENCH_TIMEOUT:-240} python3 -W ignore -m numba_ep bench "$name" "${extra[@]}" \
        "$@" --json "$OUT/ab-new.json" > "$OUT/ab-new.txt" 2>&1; rc_new=$?
    echo "old rc $rc_old | new rc $rc_new"
    paste -d '|' <(cut -c1-78 "$OUT/ab-old.txt") <(sed -E 's/^.*[[:space:]]([-0-9.]+)$/ \1/' "$OUT/ab-new.txt") ;;
  *)
    echo "usage: ab_bench.sh prepare REV | run NAME[:RANKS] [bench options]"; exit 2 ;;
esac
