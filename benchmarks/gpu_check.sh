#!/usr/bin/env bash
# CUDA checks for a machine with a GPU: the real CLI paths in fp32 / bf16 / fp16, torchrun with
# NCCL and DDP, one-shot and panoptic training, evaluation, the demo and experiment at --quick, and
# training-step throughput.
#
#   benchmarks/gpu_check.sh OUTDIR          (package importable: pip install -e . or PYTHONPATH=src)
#
# GPU_CHECK_THROUGHPUT=0 skips the throughput part. Every check appends PASS/FAIL to OUTDIR/summary.txt; full output goes to OUTDIR/gpu_check.log.
set -u -o pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
WORK=$(mktemp -d)
U="$PY -m updetr"
COMMON="--no-progress --device cuda --backbone-weights none --set data.num_workers=4"

check() {  # check NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "===== $name: $*" >>"$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then echo "PASS $name ($((SECONDS - t0)) s)"; else echo "FAIL $name (exit $rc, $((SECONDS - t0)) s)"; fi | tee -a "$OUT/summary.txt"
}

nvidia-smi -L | tee -a "$OUT/summary.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/summary.txt"

check data 120 $U data embedded "$WORK/emb" --num-train 64 --num-val 32 --num-unlabeled 64
check train-fp32 180 $U train --preset embedded --embedded "$WORK/emb" --epochs 2 --output "$WORK/fp32" $COMMON
check train-bf16 180 $U train --preset embedded --embedded "$WORK/emb" --epochs 2 --output "$WORK/bf16" $COMMON --set optim.amp=bf16
check train-bf16-resume 180 $U train --preset embedded --embedded "$WORK/emb" --epochs 3 --output "$WORK/bf16" $COMMON --set optim.amp=bf16 --resume "$WORK/bf16/checkpoint.pth"
check pretrain-fp16 180 $U pretrain --preset pretrain-embedded --images "$WORK/emb/unlabeled" --epochs 1 --output "$WORK/pre" $COMMON --set optim.amp=fp16
check torchrun-nccl-ddp 180 $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m updetr train --preset embedded --embedded "$WORK/emb" --epochs 1 --output "$WORK/ddp" --init-from "$WORK/pre/checkpoint.pth" $COMMON --set optim.amp=bf16
check pretrain-cached-bf16 180 $U pretrain --preset pretrain-embedded --images "$WORK/emb/unlabeled" --epochs 1 --output "$WORK/prec" $COMMON --set optim.amp=bf16 --set data.cache_features=true
check train-cached-fp32 180 $U train --preset embedded --embedded "$WORK/emb" --epochs 2 --output "$WORK/ftc" --init-from "$WORK/prec/checkpoint.pth" $COMMON --set data.cache_features=true
check torchrun-nccl-cached 180 $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m updetr train --preset embedded --embedded "$WORK/emb" --epochs 1 --output "$WORK/ddpc" $COMMON --set data.cache_features=true --set optim.amp=bf16
check eval 120 $U eval --checkpoint "$WORK/bf16/checkpoint.pth" --embedded "$WORK/emb" --device cuda --no-progress
check oneshot 180 $U oneshot train --preset embedded --embedded "$WORK/emb" --init-from "$WORK/pre/checkpoint.pth" --epochs 1 --output "$WORK/os" $COMMON --set optim.amp=bf16
check panoptic 180 $U panoptic train --stage joint --preset embedded --embedded "$WORK/emb" --epochs 1 --output "$WORK/pan" $COMMON --set optim.amp=bf16
check demo-quick-cuda 300 $U demo --quick --device cuda --output "$WORK/demo" --no-progress
check experiment-quick-cuda 300 $U experiment --quick --device cuda --output "$WORK/exp" --no-progress
grep -h "NCCL\|process group" "$LOG" | head -3 >>"$OUT/summary.txt"

[ "${GPU_CHECK_THROUGHPUT:-1}" = 1 ] || { rm -rf "$WORK"; exit 0; }
echo "===== throughput" >>"$LOG"
for amp in none bf16; do
  $PY benchmarks/train_step.py --device cuda --amp $amp --steps 20 2>>"$LOG" | tee -a "$OUT/summary.txt"
  $PY benchmarks/train_step.py --device cuda --amp $amp --steps 20 --batch-scale 4 2>>"$LOG" | tail -2 | tee -a "$OUT/summary.txt"
done
rm -rf "$WORK"
