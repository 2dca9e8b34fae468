#!/usr/bin/env bash
# One device call: the triton backend's stages timed one by one (python -m moelab.bench stages)
# for each SHAPE:MODE in STAGES, at TOKENS (default 8192). Tables print; rows go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for sm in ${STAGES:-qwen3-30b-a3b:lora qwen3-30b-a3b:full gpt-oss-20b:lora}; do
  python3 -m moelab.bench stages --shape "${sm%%:*}" --mode "${sm##*:}" --tokens "${TOKENS:-8192}" \
    --json "$OUT/stages_${sm%%:*}_${sm##*:}.json" 2>&1 | tee "$OUT/stages_${sm%%:*}_${sm##*:}.log" | grep -v '^{'
done
