#!/bin/bash
# Rows of bench/comm.py forked from another row's checkpoint (issue 18: the late epochs of long runs with cheaper
# act_up refreshes, without re-running the early epochs), one after another, after process WAIT_PID ends (0: at once):
#   bench/fork_queue.sh WAIT_PID PARENT_RUN ROW ...   e.g. bench/fork_queue.sh 0 runs/regime/all all+delta-sign1o
# Regime settings as bench/regime_queue.sh; EPOCHS (default 4), RUNS (runs/fork4) and OUT (bench/results/fork4).
cd "$(dirname "$0")/.." && mkdir -p logs
epochs=${EPOCHS:-4}; runs=${RUNS:-runs/fork4}; out=${OUT:-bench/results/fork4}; tag=$(basename "$runs")
wait_pid=$1; parent=$2; shift 2
while [[ $wait_pid != 0 ]] && kill -0 "$wait_pid" 2>/dev/null; do sleep 20; done
for row in "$@"; do
  echo "$(date -u +%H:%M:%S) start $tag-$row" >> logs/queue.log
  OMP_NUM_THREADS=1 .venv/bin/python bench/comm.py --rows "$row" --samples 2000 --epochs "$epochs" --eval-samples 200 \
    --clients 10 --lr 5e-4 --max-length 64 --score 100 --beams 4 --threads 1 --resume --seed 0 \
    --out "$out/$row" --runs "$runs" --set logging.drift=true --fork-from "$parent" > "logs/regime-$tag-$row.log" 2>&1
  echo "$(date -u +%H:%M:%S) end $tag-$row rc=$?" >> logs/queue.log
done
