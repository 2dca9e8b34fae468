#!/usr/bin/env bash
# One device call for issue 7: the sink-attention fused path checked on the GPU, then the
# end-to-end training step (moelab vs Transformers + PEFT) at Qwen3-30B-A3B and GPT-OSS-20B
# width with the stage breakdown and the longest sequence within BUDGET_GB. Rows go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if python3 -c "import pytest" 2>/dev/null; then
  python3 -m pytest -q -x tests/test_attention.py -k cuda 2>&1 | tail -3
else
  echo "no pytest on this machine: attention check skipped"
fi
for spec in ${MODELS:-qwen3-30b-a3b:moelab,hf:grouped_mm,hf:eager gpt-oss-20b:moelab,hf:grouped_mm}; do
  model=${spec%%:*}; systems=${spec#*:}
  python3 -m moelab.bench train --model "$model" --layers 4 --seq "${SEQ:-8192}" \
    --systems "$systems" --backend "${BACKEND:-triton}" --warmup 2 --steps 3 --breakdown \
    --budget-gb "${BUDGET_GB:-40}" --json "$OUT/e2e_$model.json" 2>&1 \
    | grep -v -i 'warn' | tee "$OUT/e2e_$model.log" | grep -v '^{'
done
