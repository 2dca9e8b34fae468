#!/usr/bin/env bash
# One device call: versions, correctness of every backend on fresh inputs, timings of every
# backend, then the Transformers v5 + PEFT anchors in the same run. Tables print last; full rows
# go to $OUT. Usage (device machine): bash scripts/gpu_bench.sh [TOKENS] (default 8192,32768);
# env SHAPES, MODES, BACKENDS, RANK (LoRA rank, default 16), NOCHECK, PROFILE, GRAPH, GRAPHED_BLOCK, GRADS
# (fresh: drop the gradients before each step, ours and, with ANCHOR_ROWS, the anchor's; default
# accumulate, the anchor script's protocol), ANCHOR_ROWS (scripts/anchor_rows.py's ROWS, or
# "default"), ANCHOR_TOKENS, SKIP_ANCHOR.
# The anchor script is shared/bench/anchor_bench.py, carried in as .anchor/ (not in the repo).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOKENS=${1:-8192,32768}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/env.txt"
python3 -c 'import torch, triton, transformers, peft; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' | tee -a "$OUT/env.txt"
for shape in ${SHAPES:-qwen3-30b-a3b gpt-oss-20b}; do
  python3 -m moelab.bench experts --shape "$shape" --tokens "$TOKENS" --mode "${MODES:-lora,full}" \
    --backends "${BACKENDS:-grouped_mm,triton}" --rank "${RANK:-16}" ${NOCHECK:---check} ${PROFILE:+--profile} ${GRAPH:+--graph} ${GRAPHED_BLOCK:+--graphed-block} ${GRADS:+--grads "$GRADS"} --json "$OUT/moelab_$shape.json" 2>&1 \
    | tee "$OUT/moelab_$shape.log" | grep -v '^{'
done
if [ -f .anchor/anchor_bench.py ] && [ -n "${ANCHOR_ROWS:-}" ]; then
  # chosen anchor rows only (scripts/anchor_rows.py; ANCHOR_ROWS=default: grouped_mm rows)
  [ "$ANCHOR_ROWS" = default ] && unset ANCHOR_ROWS
  OUT="$OUT" TOKENS="${ANCHOR_TOKENS:-$TOKENS}" ROWS="${ANCHOR_ROWS:-}" GRADS="${GRADS:-accumulate}" python3 scripts/anchor_rows.py 2>&1 \
    | tee "$OUT/anchor.log" | grep -v '^{' | grep -v Warning
elif [ -f .anchor/anchor_bench.py ] && [ -z "${SKIP_ANCHOR:-}" ]; then
  TOKENS="${ANCHOR_TOKENS:-$TOKENS}" python3 .anchor/anchor_bench.py 2>&1 | tee "$OUT/anchor.log" | grep -v '^{' | grep -v Warning
fi
