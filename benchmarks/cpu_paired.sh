#!/usr/bin/env bash
# CPU LSTM training speed like for like against PyTorch, paired in rounds by the peers' kit
# (../shared/bench/peers/bench_paired.py): our float32 against PyTorch float32 (the peer), our bfloat16
# against PyTorch under bfloat16 autocast (benchmarks/torch_autocast_peer.py). Exact masking stays on.
#   benchmarks/cpu_paired.sh uni [ROUNDS [STEPS]]       # or bi2; defaults 15 rounds, 10 (uni) / 3 (bi2) steps
# Ours runs twice per dtype: on the CPU kernel (model.lstm_backend=cpu_kernel) and on the scan.
# Needs the kit set up (its setup.sh: $PEERS_HOME with the arrays and torch-venv) and this checkout's
# .venv (or $PYTHON). Prints the kit's table (ratios to PyTorch float32), then per-round ratios like for like.
set -euo pipefail
model=${1:-uni}
rounds=${2:-15}
steps=${3:-$([ "$model" = uni ] && echo 10 || echo 3)}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
export PEERS_HOME=${PEERS_HOME:-/tmp/peers}
devices=${CPU_DEVICES:-$(nproc)}
# As cpu_setup runs them: the kernel on JAX's one multi-threaded device, the scan on one device per core.
J="env GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $py $repo/benchmarks/paired_lstm_contender.py --model $model"
K="$J --backend cpu_kernel"
S="$J --backend scan --cpu_devices $devices"
TB="$PEERS_HOME/torch-venv/bin/python $repo/benchmarks/torch_autocast_peer.py --mode serve --model $model"
raw="$PEERS_HOME/results/cpu_paired_${model}_$(date +%Y%m%d-%H%M%S).jsonl"
cd "${PEERS_KIT:-$repo/../shared/bench/peers}"
python3 bench_paired.py --rounds "$rounds" --uni-steps "$steps" --bi2-steps "$steps" --only "torch $model" \
  --baseline "torch $model" --out "$raw" --contender "torch $model bf16=$TB" \
  --contender "jax $model f32=$K" --contender "jax $model f32 scan=$S" \
  --contender "jax $model bf16=$K --dtype bfloat16" --contender "jax $model bf16 scan=$S --dtype bfloat16"
python3 - "$raw" "jax $model f32" "torch $model" "jax $model f32 scan" "torch $model" \
  "jax $model bf16" "torch $model bf16" "jax $model bf16 scan" "torch $model bf16" "jax $model f32" "jax $model f32 scan" \
  "jax $model bf16" "jax $model bf16 scan" <<'PY'
import collections, json, statistics, sys
rounds = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    chunk = json.loads(line)
    rounds[chunk["round"]][chunk["name"]] = chunk["examples_per_s"]
for ours, theirs in zip(sys.argv[2::2], sys.argv[3::2]):
    r = [c[ours] / c[theirs] for c in rounds.values()]
    print(f"{ours} / {theirs}: {statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}] over {len(r)} rounds")
PY
