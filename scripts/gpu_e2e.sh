#!/usr/bin/env bash
# One device call for issue 7: the sink-attention fused paths checked on the GPU, then the
# end-to-end training step (moelab vs Transformers + PEFT) at Qwen3-30B-A3B and GPT-OSS-20B
# width with moelab's stage breakdown (PROFILE=1: a torch-profiler table per moelab row), then
# the longest sequence within BUDGET_GB for BUDGET_SYSTEMS on BUDGET_MODELS (default MODELS).
# An empty MODELS or BUDGET_MODELS skips that pass. The budget pass runs Triton's fixed
# configuration: memory does not depend on the tile shape, and autotuning every new length
# would cost minutes. Rows go to $RES (default $OUT); plot with `python -m moelab.bench plot`.
# Compiling and tuning the Triton kernels from scratch takes minutes of a device call: with
# TRITON_CACHE_DIR set and its folder packed into $OUT at the end, the next call can carry the
# archive back (BENCHMARKS.md, third session, shows the command).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; RES=${RES:-$OUT}; mkdir -p "$RES"
if python3 -c "import pytest" 2>/dev/null; then
  python3 -m pytest -q -x tests/test_attention.py -k "cuda or flash" 2>&1 | tail -3
else
  echo "no pytest on this machine: attention check skipped"
fi
MODELS=${MODELS-"qwen3-30b-a3b:moelab,moelab:no-ckpt,moelab:graph,moelab:no-ckpt:graph,hf:grouped_mm,hf:eager gpt-oss-20b:moelab,moelab:no-ckpt,moelab:graph,moelab:no-ckpt:graph,hf:grouped_mm"}
bench() {  # model systems tag extra-args...
  local model=$1 systems=$2 tag=$3; shift 3
  echo "== $(date +%T) $tag $model $systems"
  python3 -m moelab.bench train --model "$model" --layers 4 --seq "${SEQ:-8192,4096,16384,32768}" \
    --systems "$systems" --backend "${BACKEND:-triton}" --warmup 2 --steps 3 \
    --json "$RES/${tag}_$model.json" "$@" 2>&1 \
    | grep -v -i 'warn\|rope scaling' | tee "$RES/${tag}_$model.log" | grep -v '^{'
}
profile=()
[ -n "${PROFILE:-}" ] && profile=(--profile "$RES/profile")
for spec in $MODELS; do bench "${spec%%:*}" "${spec#*:}" e2e --breakdown "${profile[@]}"; done
for spec in ${BUDGET_MODELS-$MODELS}; do
  MOELAB_TRITON_AUTOTUNE=0 SEQ=4096 bench "${spec%%:*}" "${BUDGET_SYSTEMS:-moelab,hf:grouped_mm}" budget \
    --budget-gb "${BUDGET_GB:-40}"
done
echo "== $(date +%T) done"
