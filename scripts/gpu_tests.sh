#!/usr/bin/env bash
# The test suite on the GPU machine, one process per test file (a CUDA fault poisons its
# process, so the files after it would all fail and tell nothing), fixed Triton configurations,
# launches not blocking. Usage (device machine, repo root):
#   bash scripts/gpu_tests.sh [FILE ...]     (default: every tests/test_*.py)
# env BUDGET (seconds for all files, default 540), BLOCKING=1 (CUDA_LAUNCH_BLOCKING: a fault is
# reported at the launch that made it). One summary line per file, then the first lines of each
# failure; full logs under $OUT.
# The device image has no Hydra (the trainer's tests import it) and no network: carry its wheels
# as .whl/ (pip download hydra-core==1.3.* omegaconf antlr4-python3-runtime==4.9.3 -d .whl
# --no-deps, here) and they are installed into a folder of their own.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ! python3 -c "import hydra" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/moelab_site .whl/*.whl \
    && export PYTHONPATH=/tmp/moelab_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MOELAB_TEST_DEVICE=cuda MOELAB_TRITON_AUTOTUNE=0
[ -n "${BLOCKING:-}" ] && export CUDA_LAUNCH_BLOCKING=1
files=("$@"); [ ${#files[@]} -eq 0 ] && files=(tests/test_*.py)
T0=$SECONDS; failed=0
for f in "${files[@]}"; do
  left=$(( ${BUDGET:-540} - (SECONDS - T0) ))
  if [ $left -lt 15 ]; then echo "SKIPPED (budget) $f"; continue; fi
  log="$OUT/$(basename "$f" .py).log"
  timeout "$left" python3 -m pytest -q -p no:cacheprovider "$f" > "$log" 2>&1
  rc=$?
  echo "$f rc=$rc: $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$log" | tail -1) ($((SECONDS - T0)) s)"
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then
    failed=1
    grep -E '^(FAILED|ERROR) ' "$log" | head -5 | grep . || tail -3 "$log"
  fi
done
exit $failed
