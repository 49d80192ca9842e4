#!/usr/bin/env bash
# Does DETR start to learn on the embedded benchmark within ~2,000 steps, and does UP-DETR pre-training change
# that? Six runs side by side as CPU processes (for a machine with >= 14 cores), all from the same frozen ImageNet
# CNN (BACKBONE, default efficientnet_lite0, with the weights of its installed package), cached CNN features:
#   A  DETR, embedded recipe (30 queries, stride 32)     B  A with 10 queries
#   C  A with stride 16 (model.backbone_stage=3)          D  C with 10 queries
#   E  A after 5 epochs of UP-DETR pre-training           F  D after 5 epochs of UP-DETR pre-training
# 24 epochs of 100 steps, evaluated every 4; runs still going at DEADLINE seconds are stopped.
#
#   studies/recipe_diag.sh OUT DEADLINE [BACKBONE]     (package importable)
set -u
OUT=${1:?usage: recipe_diag.sh OUT DEADLINE [BACKBONE]}; DEADLINE=${2:?}; BACKBONE=${3:-efficientnet_lite0}
CNN="--set model.backbone=$BACKBONE --backbone-weights imagenet"
mkdir -p "$OUT"; PY=${PYTHON:-python3}
D=$OUT/data
$PY -m updetr data embedded "$D" --seed 1 --no-progress > "$OUT/data.log" 2>&1 || { cat "$OUT/data.log"; exit 1; }
T="--preset embedded --embedded $D $CNN --seed 1 --no-progress --set data.cache_features=true --set optim.lr_drop=1000 --set eval_every=4"
P="--preset pretrain-embedded --images $D/unlabeled $CNN --seed 1 --no-progress --set data.cache_features=true --set optim.lr_drop=1000 --set eval_every=0"
S16="--set model.backbone_stage=3"; Q10="--set model.num_queries=10"
run() { local name=$1 threads=$2; shift 2; OMP_NUM_THREADS=$threads timeout "$DEADLINE" "$@" > "$OUT/$name.log" 2>&1; echo "$name exit $?" >> "$OUT/$name.log"; }
run A 2 $PY -m updetr train $T --epochs 24 --output "$OUT/A" &
run B 2 $PY -m updetr train $T --epochs 24 --output "$OUT/B" $Q10 &
run C 2 $PY -m updetr train $T --epochs 24 --output "$OUT/C" $S16 &
run D 2 $PY -m updetr train $T --epochs 24 --output "$OUT/D" $S16 $Q10 &
run E 3 bash -c "$PY -m updetr pretrain $P --epochs 5 --output $OUT/Ep && $PY -m updetr train $T --epochs 24 --output $OUT/E --init-from $OUT/Ep/checkpoint.pth" &
run F 3 bash -c "$PY -m updetr pretrain $P --epochs 5 --output $OUT/Fp $S16 $Q10 && $PY -m updetr train $T --epochs 24 --output $OUT/F $S16 $Q10 --init-from $OUT/Fp/checkpoint.pth" &
wait
for n in A B C D E F; do
  echo "== $n"; grep -o "hit_rate=[0-9.]*" "$OUT/$n.log"
  grep -o "epoch [0-9]*: .*val/AP=[0-9.e-]*, val/AP50=[0-9.e-]*" "$OUT/$n.log" |
    sed 's/train\/loss=\([0-9.]*\).*class_error=\([0-9.]*\).*images_per_s=\([0-9.]*\).*val\/AP=/loss \1 cerr \2 img\/s \3 AP=/'
  tail -1 "$OUT/$n.log"
done | tee "$OUT/summary.txt"
