#!/usr/bin/env bash
# N CPU processes on 127.0.0.1: a stand-in for the N hosts of a pod, to try multi-host runs locally.
#
#   launch/local.sh 2 --config=configs/lstm.py --workdir=runs/local2 [more main.py flags]
#
# Process i runs `python -m sentiment_jax.main --process_id=i ...`; its output goes to
# $LOG_DIR/process_i.log and process 0's is also shown. Environment: PYTHON (default python3),
# PORT (default 8476), CPU_DEVICES per process (default 1), LOG_DIR (default /tmp/sentiment_jax_local),
# MODULE (default sentiment_jax.main; any module taking the same process flags).
# If a process fails the others are stopped and the exit status is 1.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [sentiment_jax.main flags...]" >&2
  exit 2
fi
n=$1; shift
python=${PYTHON:-python3}
port=${PORT:-8476}
log_dir=${LOG_DIR:-/tmp/sentiment_jax_local}
mkdir -p "$log_dir"
cd "$(dirname "$0")/.."

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM
for ((i = 0; i < n; i++)); do
  "$python" -m "${MODULE:-sentiment_jax.main}" --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
    --process_id="$i" --cpu_devices="${CPU_DEVICES:-1}" "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$log_dir/process_0.log" --pid="${pids[0]}" &

status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $log_dir/process_$i.log" >&2
    status=1
    stop
  fi
done
wait  # the tail
exit $status
