#!/usr/bin/env bash
# One device call: ms per forward+backward against tokens for every backend (issue 5's sweep),
# LoRA, then full fine-tune, each with the torch.compile'd grouped_mm baseline (MODES, SHAPES,
# BACKENDS and TOKENS narrow it). JSON rows go to $OUT after every row; plot them here with
# `python -m moelab.bench plot $OUT/sweep_*.json`.
# GRAPH=1 times every block replayed from a CUDA graph (kernel time, no launching; the eager
# block is launch-bound below about 6 ms, BENCHMARKS.md runs 19-20).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOKENS=${TOKENS:-1024,2048,4096,8192,16384,32768,65536}
for mode in ${MODES:-lora full}; do
  backends=${BACKENDS:-grouped_mm,triton,compiled_grouped_mm}
  for shape in ${SHAPES:-qwen3-30b-a3b gpt-oss-20b}; do
    python3 -m moelab.bench experts --shape "$shape" --tokens "$TOKENS" --mode "$mode" \
      --backends "$backends" --iters "${ITERS:-5}" ${GRAPH:+--graph} --json "$OUT/sweep_${shape}_${mode}.json" 2>&1 \
      | grep -v '^{' | grep -v -i 'warn\|softmax\|^$' | tail -n +2
  done
done
