#!/usr/bin/env bash
# A/B of the block benchmark between this checkout's moelab and another copy of the package, in
# alternating processes (new, then old, ROUNDS times), each row its own process; every row's
# JSON goes to $OUT/NAME_{new,old}_rK.json and one summary line per row prints.
# Usage (device machine, repo root):
#   git archive REV moelab | tar -x -C exp/old        (the old copy, made before the call)
#   OLD=exp/old ROUNDS=3 bash scripts/gpu_ab.sh NAME --shape qwen3-30b-a3b --mode lora --graph
# The arguments after NAME go to `python -m moelab.bench experts` (add --tokens, --backends...).
# `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH (BENCHMARKS.md,
# runs 155-156: an "old" variant that ran the new code), so each variant runs from its own
# directory with PYTHONSAFEPATH=1, and each first prints the package it imported. Give
# TRITON_CACHE_DIR and MOELAB_CACHE_DIR as absolute paths (both variants share the tuning).
set -uo pipefail
NAME=$1; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # the variants run elsewhere
ROOT=$PWD
OLD=$(cd "${OLD:?set OLD to the folder holding the old moelab/}" && pwd)
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
variant_dir() { if [ "$1" = old ]; then echo "$OLD"; else echo "$ROOT"; fi; }
for v in new old; do
  (cd "$(variant_dir $v)" && PYTHONPATH=$(variant_dir $v) python3 -c \
    "import moelab; print('$v imports', moelab.__file__)")
done
for round in $(seq 1 "${ROUNDS:-3}"); do
  for v in new old; do
    json="$OUT/${NAME}_${v}_r$round.json"
    (cd "$(variant_dir $v)" && PYTHONPATH=$(variant_dir $v) python3 -m moelab.bench experts "$@" \
      --json "$json" > "${json%.json}.log" 2>&1)
    echo "$v r$round rc=$?: $(grep -A4 '^shape' "${json%.json}.log" | grep -v '^shape' | grep -v '^SM MHz' | tr -s ' ' | paste -sd ';')"
  done
done
