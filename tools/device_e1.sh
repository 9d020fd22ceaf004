#!/usr/bin/env bash
# E1 (bench/model.py) for a GPU machine lent one command at a time: the default captioner
# (`sparse`), the block-aligned tiles (`aligned`), the aligned whole-frame tiles with their
# neighbours in time in every 2nd / 4th layer (`every2`, `every4`: the captioner forms of the
# long-clip arms tiled_compress_every2 / _every4), whole-frame tiles of 8 tubelet steps at
# radius 0 shifted by 4 in odd layers (`t8s`: tiled_shifted_t8_compress's form), the aligned
# whole-frame tiles with their neighbours in time in every layer (`r1`: tiled_compress's own
# form) and the dense model, same run:
#   OUT=/path/to/out bash tools/device_e1.sh [SECONDS]      (default 420)
# 64 frames x 8 clips a step with 2 interleaved repeats get 40 % of SECONDS, 512 and 1,024 frames
# (batch 1, one repeat) the rest; the 64-frame cases are profiled after timing (kernel time by
# category: --profile 2). bench/model.py rewrites its JSON in $OUT after every case, so a
# call cut short keeps what it measured; each part's output goes to $OUT/e1-*.log. Extra
# arguments go to both bench/model.py runs (e.g. --override backend=flash).
set -uo pipefail
: "${OUT:?set OUT to the folder that comes back}"
limit=${1:-420}
if ! [[ $limit =~ ^[0-9]+$ ]]; then
  echo "usage: OUT=DIR bash tools/device_e1.sh [SECONDS] [bench/model.py arguments...]" >&2
  exit 2
fi
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
wide="aligned;video_radius=1,0,0"
variants=(--variants sparse,aligned,dense --config "every2:$wide;video_radius_every=2"
          --config "every4:$wide;video_radius_every=4"
          --config "t8s:aligned;video_tile=8,14,14;schedule=tiled_shifted" --config "r1:$wide")
timeout $(( limit * 2 / 5 )) "$py" bench/model.py --repeats 2 "${variants[@]}" --batch 8 --frames 64 \
  --profile 2 --label e1-64f-batch8 --out "$OUT" "$@" > "$OUT/e1-64f.log" 2>&1
first=$?
timeout $(( limit * 3 / 5 )) "$py" bench/model.py --repeats 1 "${variants[@]}" --batch 1 --frames 512,1024 \
  --label e1-512f-1024f --out "$OUT" "$@" > "$OUT/e1-long.log" 2>&1
second=$?
grep -h "^|" "$OUT"/e1-64f.log "$OUT"/e1-long.log
ls "$OUT"
exit $(( first > second ? first : second ))
