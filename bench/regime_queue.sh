#!/bin/bash
# Runs learning-regime rows of bench/comm.py one after another (issue 18), after process WAIT_PID ends (0: at once):
#   bench/regime_queue.sh WAIT_PID ROW[@sN] ...     e.g. bench/regime_queue.sh 0 all+int4o baseline@s2
# Each row: 2000 E2E samples, 10 clients, 2 epochs, drift probe on; resumable (--resume); logs in logs/.
# SAMPLES=4000 RUNS=runs/scaling/S50 OUT=bench/results/scaling/S50 bench/regime_queue.sh 0 baseline all: another S;
# EPOCHS=3 RUNS=runs/regime3 OUT=bench/results/regime3 ...: rows lengthened to 3 epochs (copy their runs there first).
# EXTRA='--keep-epochs 3 4' ...: more bench/comm.py options for every row.
cd "$(dirname "$0")/.." && mkdir -p logs
samples=${SAMPLES:-2000}; epochs=${EPOCHS:-2}; runs=${RUNS:-runs/regime}; out=${OUT:-bench/results/regime}; tag=${RUNS:+$(basename "$runs")-}
wait_pid=$1; shift
while [[ $wait_pid != 0 ]] && kill -0 "$wait_pid" 2>/dev/null; do sleep 20; done
for spec in "$@"; do
  row=${spec%@s*}; seed=0; [[ $spec == *@s* ]] && seed=${spec##*@s}
  echo "$(date -u +%H:%M:%S) start $tag$spec" >> logs/queue.log
  OMP_NUM_THREADS=1 .venv/bin/python bench/comm.py --rows "$row" --samples "$samples" --epochs "$epochs" --eval-samples 200 \
    --clients 10 --lr 5e-4 --max-length 64 --score 100 --beams 4 --threads 1 --resume --seed "$seed" \
    --out "$out/$spec" --runs "$runs" --set logging.drift=true ${EXTRA:-} > "logs/regime-$tag$spec.log" 2>&1; rc=$?
  echo "$(date -u +%H:%M:%S) end $tag$spec rc=$rc" >> logs/queue.log
done
