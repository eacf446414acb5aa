#!/usr/bin/env bash
# One call on a lent GPU machine: environment check, GPU tests, benchmarks; logs under $OUT and a
# short summary printed last. Build the bundle first with scripts/prepare_device.sh (it adds
# pytest to the shared bundle), then, from the repo root (with .device-bundle/ carried):
#     bash scripts/gpu_run.sh [TESTS...] [-- BENCHES...]
# TESTS default to tests/gpu (pytest options such as -x may come first); BENCHES default to
# "launch layout"; a bench may name its rank count (intranode:2). PYTEST_TIMEOUT / BENCH_TIMEOUT
# (s) bound each part (SIGINT, so pytest still reports); SKIP_CHECK=1 skips check.py. A new
# kernel's first run: -x, and NUMBA_EP_TIMEOUT_S small, so that a hang costs minutes.
set -uo pipefail
OUT=${OUT:-/tmp/numba_ep_out}; mkdir -p "$OUT"
source .device-bundle/activate > "$OUT/run.log" 2>&1 || { cat "$OUT/run.log"; exit 1; }
export NUMBA_EP_CACHE_DIR=${NUMBA_EP_CACHE_DIR:-/tmp/numba_ep_cache}
tests=(); benches=(); seen_sep=0
for a in "$@"; do
  if [ "$a" = "--" ]; then seen_sep=1; elif [ $seen_sep = 0 ]; then tests+=("$a"); else benches+=("$a"); fi
done
[ ${#tests[@]} -gt 0 ] || tests=(tests/gpu)
[ $seen_sep = 1 ] || benches=(launch layout)
summary=()
gpus=$(nvidia-smi -L 2>&1); echo "$gpus" >> "$OUT/run.log"
summary+=("gpus: $(echo "$gpus" | grep -c GPU) x $(echo "$gpus" | head -1 | sed 's/ (UUID.*//;s/^GPU 0: //')")
if [ -z "${SKIP_CHECK:-}" ]; then
  python3 .device-bundle/check.py >> "$OUT/run.log" 2>&1
  summary+=("nvshmem check: $(tail -1 "$OUT/run.log")")
fi
if [ "${tests[0]}" != "none" ]; then
  # SIGINT first: pytest then prints where it was and its summary; killed 15 s later if not.
  timeout -s INT -k 15 ${PYTEST_TIMEOUT:-420} python3 -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/junit.xml" "${tests[@]}" > "$OUT/pytest.log" 2>&1
  summary+=("pytest (${tests[*]}): $(tail -1 "$OUT/pytest.log")")
fi
for b in "${benches[@]}"; do
  # NAME or NAME:RANKS (e.g. intranode:2 on a 4-GPU machine)
  name=${b%%:*}; extra=(); [ "$name" = "$b" ] || extra=(--ranks "${b#*:}")
  timeout -s INT -k 15 ${BENCH_TIMEOUT:-240} python3 -W ignore -m numba_ep bench "$name" "${extra[@]}" \
    --json "$OUT/bench-${b/:/-ep}.json" > "$OUT/bench.log" 2>&1
  summary+=("bench $b (rc $?):"); while IFS= read -r l; do summary+=("  $l"); done < "$OUT/bench.log"
  cat "$OUT/bench.log" >> "$OUT/run.log"; rm -f "$OUT/bench.log"
done
echo "================ failures ================"
grep -E "^(FAILED|ERROR)|Error|error:" "$OUT/pytest.log" 2>/dev/null | head -40
echo "================ summary ================"
printf '%s\n' "${summary[@]}"
