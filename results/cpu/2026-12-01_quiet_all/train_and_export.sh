#!/bin/bash
# compute queue 1: MobileSAM runs at 512 (resume) and 1024, then exports with static INT8
cd /work/wt/compute15 && export PYTHONPATH=$PWD LUNGSAM_CACHE=/work/cache/lungsam
L=/work/main/.venv/bin/lungsam
S=/work/s15
echo "start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
$L train --data ../shared/data/montgomery --backbone mobile_sam --checkpoint ../shared/weights/mobile_sam.pt \
    --encoder-size 512 --lr 1e-4 --folds 1 --epochs 12 --patience 4 --device cpu -q --resume --out /work/cache/cpu/run_mobile512 > $S/train_mobile512.log 2>&1
echo "train 512 rc $? $(date -u +%T)"
$L train --data ../shared/data/montgomery --backbone mobile_sam --checkpoint ../shared/weights/mobile_sam.pt \
    --encoder-size 1024 --lr 1e-4 --folds 1 --epochs 12 --patience 4 --device cpu -q --out /work/cache/cpu/run_mobile1024 > $S/train_mobile1024.log 2>&1
echo "train 1024 rc $? $(date -u +%T)"
for R in 1024 512; do
  /usr/bin/time -v $L export /work/cache/cpu/run_mobile$R --out /work/cache/cpu/b_mobile${R}s --int8 --int8-method static --calibration-images 16 --parity-images 8 --provenance > $S/export_mobile${R}s.log 2>&1
  echo "export $R static rc $? $(date -u +%T)"
done
echo "done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
