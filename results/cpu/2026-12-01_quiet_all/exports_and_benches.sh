#!/bin/bash
# compute queue 2: dynamic-INT8 exports, then the quiet-machine benches (helper jobs paused meanwhile)
cd /work/wt/compute15 && export PYTHONPATH=$PWD LUNGSAM_CACHE=/work/cache/lungsam
L=/work/main/.venv/bin/lungsam
S=/work/s15
while ! grep -q '^done' $S/queue1.out; do sleep 20; done
for R in 1024 512; do
  /usr/bin/time -v $L export /work/cache/cpu/run_mobile$R --out /work/cache/cpu/b_mobile${R}d --int8 --int8-method dynamic --parity-images 8 --provenance > $S/export_mobile${R}d.log 2>&1
  echo "export $R dynamic rc $? $(date -u +%T)"
done
pause() { ps -eo pid=,ni=,args= | awk '$2>=15 {print $1}' | xargs -r kill -$1; }
pause STOP; sleep 5
echo "benches start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
for R in 1024 512; do
  O=$S/bench_mobile${R}
  { echo "load average before: $(cat /proc/loadavg)"
    $L bench /work/cache/cpu/b_mobile${R}s --run /work/cache/cpu/run_mobile$R --backends torch,onnxruntime,openvino --precisions fp32,int8 --interleave --limit 6 --repeats 1 --warmup 1 --batch 1 --out $O/static
    echo "load average mid: $(cat /proc/loadavg)"
    $L bench /work/cache/cpu/b_mobile${R}d --run /work/cache/cpu/run_mobile$R --backends torch,onnxruntime --precisions fp32,int8 --interleave --limit 6 --repeats 1 --warmup 1 --batch 1 --out $O/dynamic
    echo "load average after: $(cat /proc/loadavg)"; } > $S/bench_mobile${R}.log 2>&1
  echo "bench $R rc $? $(date -u +%T)"
done
O=$S/bench_lite192q
{ echo "load average before: $(cat /proc/loadavg)"
  $L bench /work/cache/cpu/b_lite192m --run /tmp/d/lite192 --backends torch,onnxruntime,openvino --precisions fp32,int8 --interleave --limit 6 --repeats 1 --warmup 1 --batch 1 --out $O
  echo "load average after: $(cat /proc/loadavg)"
  LUNGSAM=$L bash scripts/cpu_headline.sh /work/cache/cpu/b_lite192m 20 openvino int8
  LUNGSAM=$L bash scripts/cpu_headline.sh /work/cache/cpu/b_lite192m 20 onnxruntime fp32
  LUNGSAM=$L bash scripts/cpu_headline.sh /work/cache/cpu/b_mobile512s 20 openvino int8
} > $S/bench_lite192q.log 2>&1
echo "bench lite192 + headlines rc $? $(date -u +%T)"
pause CONT
echo "done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
