#!/usr/bin/env bash
# The long-clip benchmark v2 (python -m mmsparse.eval.longdriver) under a wall-clock limit, for a
# GPU machine lent one command at a time:
#   OUT=/path/to/out bash tools/device_longbench.sh LABEL SECONDS [longdriver arguments...]
# The runs live in $LONGBENCH (default /tmp/longbench) and go on from their checkpoints when the
# same command runs again on the same machine (/tmp survives between calls while it stays
# warm). Every 30 s, and at the end, the run JSONs, metrics, logs, timing and costs (not the
# models or checkpoints) are tarred to $OUT/runs-LABEL.tgz, so what finished comes back even
# when the limit cuts the call; the driver's output goes to $OUT/log-LABEL.txt and, once every
# run is done, its report to $OUT. Merge the runs of several calls or machines afterwards with
# `longdriver --report-only --from DIR/runs` (README, "Long-clip quality").
set -uo pipefail
if [ $# -lt 2 ] || ! [[ $2 =~ ^[0-9]+$ ]]; then
  echo "usage: OUT=DIR bash tools/device_longbench.sh LABEL SECONDS [longdriver arguments...]" >&2
  exit 2
fi
: "${OUT:?set OUT to the folder that comes back}"
label=$1; limit=$2; shift 2
work=${LONGBENCH:-/tmp/longbench}
mkdir -p "$work/runs" "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
save() {
  (cd "$work" && tar czf "$OUT/runs-$label.tgz.tmp" --exclude='*.pt' --exclude='*.model' \
     runs $(ls timing.json backends.json costs.json spec.json 2>/dev/null)) \
    && mv "$OUT/runs-$label.tgz.tmp" "$OUT/runs-$label.tgz"
}
( while sleep 30; do save; done ) >/dev/null 2>&1 & saver=$!
stop_saver() { pkill -P "$saver" 2>/dev/null; kill "$saver" 2>/dev/null; wait "$saver" 2>/dev/null; }
trap stop_saver EXIT
timeout "$limit" "${PYTHON:-python3}" -m mmsparse.eval.longdriver --out "$work" --label "$label" \
  --results "$OUT" "$@" 2>&1 | grep --line-buffered -v "it/s\]" | tee "$OUT/log-$label.txt"
status=${PIPESTATUS[0]}
stop_saver
save
ls "$work/runs"
exit "$status"
