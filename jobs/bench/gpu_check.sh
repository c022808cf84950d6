#!/usr/bin/env bash
# One command for the day a GPU is lent: every `gpu`-marked test, then the GPU benchmarks, then a short
# ImageNet-shaped sampling run on generated data — raysub's NCCL, bf16, channels_last and pinned-memory paths —
# in under 8 minutes on one GPU. Writes one JSON file of figures (default gpu_check.json; argument 1 overrides).
#
#   bash jobs/bench/gpu_check.sh [OUT.json]
#
# Each part has its own time limit and its own entry in the JSON (rc, seconds, the benchmark's last-line figures),
# so one failing part does not hide the others; the script exits non-zero when any part failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-gpu_check.json}"
WORK="$(mktemp -d -t raysub-gpu-check-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

NGPU="$(python3 -c 'import torch; print(torch.cuda.device_count())')"
if [ "${NGPU:-0}" -lt 1 ]; then
  echo "gpu_check.sh: error: no CUDA GPU is visible (torch.cuda.device_count() = ${NGPU:-?}): run it on a GPU machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK/gpus.txt" 2>/dev/null || true
echo "gpu_check: $NGPU GPU(s): $(tr '\n' ';' < "$WORK/gpus.txt")"

part() {  # part NAME LIMIT_S COMMAND...: run it, keep its output, its rc and wall time
  local name="$1" limit="$2"; shift 2
  echo "gpu_check: [$name] $* (limit ${limit}s)"
  local t0; t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$WORK/$name.out" 2>&1
  local rc=$?
  local t1; t1=$(date +%s.%N)
  echo "$rc $(python3 -c "print(round($t1 - $t0, 1))")" > "$WORK/$name.rc"
  tail -n 3 "$WORK/$name.out" | cut -c1-300
  echo "gpu_check: [$name] rc=$rc"
}

# 1. every gpu-marked test (NCCL sampling/training parity, the sharded projection over NCCL, bf16, channels_last)
part tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=10
# 2. the sharded projection's step time at ImageNet ResNet-18 shapes, one rank per GPU over NCCL
part sharded 120 python3 jobs/bench/sharded_projection.py --device cuda --world "$NGPU" --step-model resnet18 \
  --step-shape 3,224,224 --step-dim 120 --batch $((64 * NGPU)) --rounds 5 --steps 5 --skip-memory
# 3. raysub's Ray Train sampler vs plain DDP, ResNet-18 at 224², 1 GPU and all GPUs
part ddp_overhead 150 python3 jobs/bench/ddp_overhead.py --gpu --rounds 1 --epochs 2
# 4. a short ImageNet-shaped sampling run (bf16, channels_last, pinned memory) on generated 256² JPEGs
python3 - "$WORK/imagenet" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
root, rng = sys.argv[1], np.random.RandomState(0)
for split, per_class in (("train", 32), ("val", 8)):
    for c in range(10):
        os.makedirs(os.path.join(root, split, f"n{c:08d}"))
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 256, (256, 256, 3)).astype(np.uint8)).save(
                os.path.join(root, split, f"n{c:08d}", f"{i}.JPEG"))
EOF
part sampling 120 python3 -m raysub.cli sample imagenet_resnet18 "data.root=$WORK/imagenet" "run_dir=$WORK/run" \
  "cluster.num_workers=$NGPU" cluster.cpus_per_worker=1 cluster.max_failures=0 data.num_workers=2 \
  data.batch_size=$((32 * NGPU)) sgd.epochs=1 sgd.lr_milestones=[] sample.epochs=1 sample.snapshots_per_epoch=2 \
  compute.bf16=true compute.channels_last=true

python3 - "$WORK" "$OUT" "$NGPU" <<'EOF'
import json, os, sys
work, out, ngpu = sys.argv[1], sys.argv[2], int(sys.argv[3])
figures = {"gpus": ngpu, "gpu": open(os.path.join(work, "gpus.txt")).read().strip().splitlines()}
failed = []
for name in ("tests", "sharded", "ddp_overhead", "sampling"):
    rc, secs = open(os.path.join(work, f"{name}.rc")).read().split()
    text = open(os.path.join(work, f"{name}.out")).read().strip().splitlines()
    entry = {"rc": int(rc), "seconds": float(secs)}
    try:
        entry["figures"] = json.loads(text[-1])  # a benchmark's last line
    except (IndexError, ValueError):
        entry["tail"] = text[-5:]
    figures[name] = entry
    if int(rc):
        failed.append(name)
figures["failed"] = failed
with open(out, "w") as f:
    json.dump(figures, f, indent=1)
print(f"gpu_check: figures in {out}" + (f"; FAILED: {', '.join(failed)}" if failed else "; every part passed"))
sys.exit(1 if failed else 0)
EOF
