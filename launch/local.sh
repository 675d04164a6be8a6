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
log_dir=$(mkdir -p "${LOG_DIR:-/tmp/sentiment_jax_local}" && cd "${LOG_DIR:-/tmp/sentiment_jax_local}" && pwd)
for ((i = 0; i < n; i++)); do : >"$log_dir/process_$i.log"; done
cd "$(dirname "$0")/.."  # the checkout's root: relative --config/--workdir paths start here

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM
for ((i = 0; i < n; i++)); do
  "$python" -m "${MODULE:-sentiment_jax.main}" --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
    --process_id="$i" --cpu_devices="${CPU_DEVICES:-1}" "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$log_dir/process_0.log" --pid="${pids[0]}" &

# The first failure stops the rest (they would wait for the lost peer). Needs bash >= 5.1.
status=0 running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  wait -n -p finished "${running[@]}" || { status=1; stop; }
  left=(); for pid in "${running[@]}"; do [[ $pid == "$finished" ]] || left+=("$pid"); done
  running=("${left[@]}")
done
[[ $status == 0 ]] || echo "a process failed; see $log_dir/process_*.log" >&2
wait  # the tail
exit $status
