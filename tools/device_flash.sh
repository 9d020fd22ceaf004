#!/usr/bin/env bash
# The flash backend (FlashAttention-4 full blocks + Triton partial blocks) on a lent GPU, after
# FA4 is installed there (../shared/tools/fa4-wheels.sh: its install.sh, second transfer):
#   OUT=/path/to/out bash tools/device_flash.sh [SECONDS]     (default 480)
# 1. its GPU tests against the float64 truth (layouts of 128 x 128 and 64 x 64 blocks);
# 2. bench/attention.py --only A3,dense --quick: the flash row beside triton, flex, flex_closed,
#    flex_flash, cuDNN and FA4's dense kernel (issue 29's full-block targets);
# 3. E1 at 64 frames x 8 clips, profiled, with what time is left: the aligned captioner and the
#    aligned tiles with their neighbours in time in every 4th layer (`every4`, the captioner form
#    of the long-clip arm tiled_compress_every4), each with backend=flash forced beside auto's
#    choice; dense; the default captioner.
# Each step's output goes to $OUT/flash-*.log; the results to $OUT.
set -uo pipefail
: "${OUT:?set OUT to the folder that comes back}"
limit=${1:-480}
if ! [[ $limit =~ ^[0-9]+$ ]]; then
  echo "usage: OUT=DIR bash tools/device_flash.sh [SECONDS]" >&2
  exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if ! "$py" -c "import flash_attn.cute" 2>"$OUT/flash-import.log"; then
  echo "flash_attn.cute does not import (install FA4 first: ../shared/tools/fa4-wheels.sh):" >&2
  tail -3 "$OUT/flash-import.log" >&2
  exit 3
fi
start=$SECONDS
timeout $(( limit / 5 )) "$py" -m pytest -q -x tests/attention/test_flash_backend.py -k gpu > "$OUT/flash-tests.log" 2>&1
tail -3 "$OUT/flash-tests.log"
timeout $(( limit / 2 )) "$py" bench/attention.py --only A3,dense --quick --out "$OUT" --label flash \
  > "$OUT/flash-attention.log" 2>&1
grep "^|" "$OUT/flash-attention.log" | head -40
left=$(( limit - (SECONDS - start) ))
if (( left > 60 )); then
  every4="aligned;video_radius=1,0,0;video_radius_every=4"
  timeout "$left" "$py" bench/model.py --repeats 1 --variants aligned,dense,sparse --profile 1 \
    --config "aligned_flash:aligned;backend=flash" --config "every4:$every4" \
    --config "every4_flash:$every4;backend=flash" \
    --batch 8 --frames 64 --label e1-flash-64f-batch8 --out "$OUT" > "$OUT/flash-e1.log" 2>&1
  grep "^|" "$OUT/flash-e1.log"
fi
ls "$OUT"
