#!/usr/bin/env bash
# A/B of NVSHMEM's proxy thread on the host time of eager low-latency steps, on one machine:
# ll_host_breakdown.py --ranks N, alternating NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=0 (thread kept) and
# unset (numba_ep's default on one host: no thread), ROUNDS times; a sampler records each rank
# process's CPU use per thread. Prints the step rows of every run and the CPU samples.
#     bash scripts/proxy_ab.sh [RANKS] [ROUNDS]
set -uo pipefail
R=${1:-1}; N=${2:-3}; OUT=${OUT:-/tmp/numba_ep_out}; mkdir -p "$OUT"
sample() {  # $1: parent pid; every 5 s, per python descendant: busy threads (ticks in 1 s)
  local hz; hz=$(getconf CLK_TCK)
  while kill -0 "$1" 2>/dev/null; do
    sleep 4
    for p in $(pgrep -P "$1" python3 2>/dev/null; pgrep -P "$1" python 2>/dev/null); do
      declare -A a=(); for t in /proc/$p/task/*; do
        a[$t]=$(awk '{print $14+$15}' "$t/stat" 2>/dev/null); done
      sleep 1; line="pid $p:"; tot=0
      for t in "${!a[@]}"; do
        b=$(awk '{print $14+$15}' "$t/stat" 2>/dev/null) || continue
        d=$(( b - ${a[$t]:-0} )); tot=$((tot + d))
        [ "$d" -ge $((hz / 4)) ] && line+=" ${t##*/}=$((100 * d / hz))%"
      done
      echo "$line total=$((100 * tot / hz))%"
    done
  done
}
for i in $(seq "$N"); do
  order="proxy noproxy"; [ $((i % 2)) = 0 ] && order="noproxy proxy"   # neither always first
  for mode in $order; do
    log="$OUT/breakdown-$mode-$i.log"
    if [ $mode = proxy ]; then export NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=0
    else unset NVSHMEM_DISABLE_LOCAL_ONLY_PROXY; fi
    python3 -W ignore scripts/ll_host_breakdown.py --ranks "$R" > "$log" 2>&1 &
    pid=$!; sample $pid > "$OUT/cpu-$mode-$i.log" 2>&1 & spid=$!
    wait $pid; echo "rc $?" >> "$log"; wait $spid
  done
done
unset NVSHMEM_DISABLE_LOCAL_ONLY_PROXY
for f in "$OUT"/breakdown-*.log; do
  echo "== ${f##*/}"
  grep -E "step, |cuLaunchKernel alone|cupy.empty small|^rc " "$f" | grep -v "launches only\|non-coop"
  sed -n '2p;$p' "${f/breakdown/cpu}" | sed 's/^/  /'
done
