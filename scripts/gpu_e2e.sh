#!/usr/bin/env bash
# One device call for issue 7: the sink-attention fused path checked on the GPU, then the
# end-to-end training step (moelab vs Transformers + PEFT) at Qwen3-30B-A3B and GPT-OSS-20B
# width with moelab's stage breakdown, then the longest sequence within BUDGET_GB for the
# systems in BUDGET_SYSTEMS (for BUDGET_MODELS, default MODELS; empty skips). Rows go to $OUT;
# plot them with `python -m moelab.bench plot`.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if python3 -c "import pytest" 2>/dev/null; then
  python3 -m pytest -q -x tests/test_attention.py -k cuda 2>&1 | tail -3
else
  echo "no pytest on this machine: attention check skipped"
fi
MODELS=${MODELS:-"qwen3-30b-a3b:moelab,hf:grouped_mm,hf:eager gpt-oss-20b:moelab,hf:grouped_mm"}
bench() {  # model systems tag extra-args...
  local model=$1 systems=$2 tag=$3; shift 3
  echo "== $(date +%T) $tag $model $systems"
  python3 -m moelab.bench train --model "$model" --layers 4 --seq "${SEQ:-4096,8192,16384,32768}" \
    --systems "$systems" --backend "${BACKEND:-triton}" --warmup 2 --steps 3 \
    --json "$OUT/${tag}_$model.json" "$@" 2>&1 \
    | grep -v -i 'warn' | tee "$OUT/${tag}_$model.log" | grep -v '^{'
}
for spec in $MODELS; do bench "${spec%%:*}" "${spec#*:}" e2e --breakdown; done
for spec in ${BUDGET_MODELS-$MODELS}; do
  bench "${spec%%:*}" "${BUDGET_SYSTEMS:-moelab}" budget --seq 4096 --budget-gb "${BUDGET_GB:-40}"
done
echo "== $(date +%T) done"
