#!/usr/bin/env bash
# GPU proof of issue 6: caption_base with ZeRO-2 and ZeRO-3 on 2 GPUs (and 1 GPU for the scaling
# baseline), long_clip_ulysses with sequence parallel size 2. Each run's summary.json and
# metrics.jsonl are collected; $OUT/gpu_train_summary.json compares them.
#   OUT=/path/to/out bash tools/gpu_train_check.sh        (run from the repository root)
# Needs deepspeed/decord/av installed (../shared/tools/gpu-wheels.sh) and 2 GPUs.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0                  # DeepSpeed 0.19.8 cannot parse "9.0a"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mmsparse-torch-extensions}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STEPS=${STEPS:-60}
COMMON="run.steps=$STEPS run.progress=false checkpoint.every=0 checkpoint.export=false eval.every=0"
DATA=$OUT/data_caption_base                     # synthetic clips generated once, shared by the runs

RUNS=${RUNS:-all}                               # space-separated run names, or all

run() {  # name ngpus recipe overrides...
  local name=$1 n=$2 recipe=$3; shift 3
  [[ $RUNS == all || " $RUNS " == *" $name "* ]] || return 0
  local dir=$OUT/$name
  rm -rf "$dir"; mkdir -p "$dir"
  local t0=$(date +%s)
  ${DEEPSPEED:-deepspeed} --num_gpus "$n" --master_port $((29700 + RANDOM % 200)) --module mmsparse.train "$recipe" \
      run.dir="$dir" $COMMON "$@" > "$dir.log" 2>&1
  local rc=$?
  echo "{\"name\": \"$name\", \"gpus\": $n, \"recipe\": \"$recipe\", \"rc\": $rc, \"wall_s\": $(( $(date +%s) - t0 ))}" > "$dir.status.json"
  echo "$name: rc=$rc ($(( $(date +%s) - t0 )) s)"
  tail -n 5 "$dir.log"
}

nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.csv" 2>&1
python - <<PY
from mmsparse.data import synth
from pathlib import Path
root = Path("$DATA")
if not (root / "train/manifest.jsonl").exists():
    synth.make_dataset(root / "train", clips=64, frames=32, size=(224, 224), images=0)
    synth.make_dataset(root / "val", clips=16, frames=32, size=(224, 224), seed=1000, images=0)
PY
D="data.manifest=$DATA/train/manifest.jsonl data.val_manifest=$DATA/val/manifest.jsonl"

run caption_base_zero2_1gpu 1 caption_base $D deepspeed.zero_stage=2
run caption_base_zero2_2gpu 2 caption_base $D deepspeed.zero_stage=2
run caption_base_zero3_2gpu 2 caption_base_zero3 $D
run long_clip_ulysses_sp2_2gpu 2 long_clip_ulysses deepspeed.sequence_parallel_size=2 run.steps=20
run long_clip_ulysses_sp1_1gpu 1 long_clip_ulysses deepspeed.sequence_parallel_size=1 run.steps=20 \
    # may run out of memory: that is the point of sequence parallelism

python - <<PY
import json, pathlib
out = pathlib.Path("$OUT")
rows = {}
for st in sorted(out.glob("*.status.json")):
    s = json.loads(st.read_text())
    summ = out / s["name"] / "summary.json"
    if summ.exists():
        s.update(json.loads(summ.read_text()))
    else:
        log = (out / (s["name"] + ".log")).read_text(errors="replace")
        s["error_tail"] = log[-1500:]
    rows[s["name"]] = s
def ratio(a, b, k="clips_per_s"):
    try:
        return rows[a][k] / rows[b][k]
    except (KeyError, ZeroDivisionError, TypeError):
        return None
summary = {
    "runs": rows,
    "scaling_zero2_2gpu_vs_1gpu": ratio("caption_base_zero2_2gpu", "caption_base_zero2_1gpu"),
    "zero3_vs_zero2_2gpu": ratio("caption_base_zero3_2gpu", "caption_base_zero2_2gpu"),
}
(out / "gpu_train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
for n, r in rows.items():
    print(n, {k: r.get(k) for k in ("rc", "first_loss", "last_loss", "clips_per_s", "tokens_per_s", "mfu", "max_mem_gb")})
PY
