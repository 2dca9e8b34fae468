#!/usr/bin/env bash
# Install moelab with its test extras into the active Python environment (CPU machines).
# torch is pinned first: that version's CPU wheel is on disk here, while a bare `torch`
# requirement could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
