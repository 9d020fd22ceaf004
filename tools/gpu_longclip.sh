#!/usr/bin/env bash
# The long-clip benchmark (issue 7) end to end in one command: needle clips, training of every
# attention pattern at once (one process per pattern, dealt over the GPUs), evaluation, report.
# Everything happens in tools/gpu_longclip.py; this sets the environment it needs.
#   OUT=/path/to/out bash tools/gpu_longclip.sh            (from the repository root; ~6.5 min)
#   OUT=/tmp/lc bash tools/gpu_longclip.sh --smoke         (CPU check at toy scale)
# Extra arguments go to tools/gpu_longclip.py (--help lists them: patterns, budget, sizes).
# Needs deepspeed/decord/av importable (../shared/tools/gpu-wheels.sh, PYTHONPATH=/tmp/site).
# Writes $OUT/longclip-<device>-<date>.{md,json,png} and ...-logs.tar.gz.
set -uo pipefail
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # DeepSpeed 0.19.8 cannot parse "9.0a"
case "$TORCH_CUDA_ARCH_LIST" in *a*) export TORCH_CUDA_ARCH_LIST=9.0 ;; esac
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mmsparse-torch-extensions}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "${PYTHON:-python3}" tools/gpu_longclip.py "$@"
