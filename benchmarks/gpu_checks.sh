#!/usr/bin/env bash
# Every GPU check in one script, for the few sessions that are lent a GPU machine for minutes:
# the methods' step overhead (fp32 and bf16), the loader with CPU and GPU JPEG decoding, the
# trainer end to end on CUDA (bf16 autocast on/off, --decode-device cpu/cuda) and DDP over NCCL.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR SHARDS
#
# SHARDS: `benchmarks/loader.py`'s cremad-preset synth shards (built on any machine with
# `benchmarks/loader.py --work W`, then W/shards), so the GPU machine needs no ffmpeg.
# Each part has its own time limit and writes its figures as soon as it ends, so one part
# that fails or hangs costs only its own minutes. Results: benchmarks/RESULTS-gpu.md.
set -u
OUT=${1:?usage: gpu_checks.sh OUT_DIR SHARDS}
SHARDS=${2:?usage: gpu_checks.sh OUT_DIR SHARDS}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
part() { echo; echo "== $(date -u +%H:%M:%S) $*"; }

part machine
nvidia-smi -L
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')"

part "methods: step time / none, fp32 and bf16"
timeout 240 $PY benchmarks/balance.py --device cuda --methods all --precision fp32,bf16 \
    --rounds 8 --steps 5 --md "$OUT/balance-cuda.md" --json "$OUT/balance-cuda.json"

part "loader: CPU vs GPU JPEG decode, shard loader vs seed-style, model step rates"
mkdir -p /tmp/loader && cp -r "$SHARDS" /tmp/loader/shards
timeout 200 $PY benchmarks/loader.py --work /tmp/loader --device cuda --batch-size 32 \
    --loaders exact,exact_gpu,resample,seed --workers 4 --frames 1,3 --rounds 3 \
    --models tiny,resnet18 --model-steps 20 --results "$OUT/loader-cuda.md"

part "trainer on CUDA: bf16 autocast on/off, JPEG decode on CPU/GPU"
cat > /tmp/run_avtrain.py <<'EOF'
import sys
import cli
sys.argv[0] = "avtrain"
cli.avtrain()
EOF
fit() {  # name, then fit flags
    local name=$1; shift
    timeout 120 $PY /tmp/run_avtrain.py fit --shards "$SHARDS" --run-dir "/tmp/runs/$name" \
        --model resnet18 --epochs 3 --batch-size 16 --workers 4 --device cuda --no-progress \
        "$@" > "/tmp/runs-$name.log" 2>&1
    echo "$name: exit $? $(tail -n 2 "/tmp/runs-$name.log" | tr '\n' ' ')"
}
mkdir -p /tmp/runs
fit bf16-cpudecode --amp --decode-device cpu
fit bf16-gpudecode --amp --decode-device cuda
fit fp32-cpudecode --no-amp --decode-device cpu
fit ogm_ge-bf16 --amp --method ogm_ge
$PY - "$OUT/fit-cuda.md" <<'EOF'
import os, sys
from avtrain.bench import run_values
rows = ["| run | test acc | step time, median over epochs (s, loading included) | wall (s) |",
        "|---|---|---|---|"]
for name in ("bf16-cpudecode", "bf16-gpudecode", "fp32-cpudecode", "ogm_ge-bf16"):
    run = f"/tmp/runs/{name}"
    if not os.path.exists(f"{run}/summary.json"):
        rows.append(f"| {name} | failed (see log.txt) | | |")
        continue
    v = run_values(run)
    rows.append(f"| {name} | {v['acc']:.3f} | {v['step_time']:.4f} | {v['wall_time']} |")
open(sys.argv[1], "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
EOF

part "DDP over NCCL: 2 ranks (torchrun) on $($PY -c 'import torch; print(torch.cuda.device_count())') GPU(s)"
timeout 120 torchrun --standalone --nproc_per_node 2 /tmp/run_avtrain.py fit --shards "$SHARDS" \
    --run-dir /tmp/runs/ddp --model tiny --epochs 2 --batch-size 16 --workers 2 \
    --device cuda --no-progress > /tmp/ddp.log 2>&1
echo "ddp exit $?"; grep -v "^\s*$" /tmp/ddp.log | tail -n 25
part done
