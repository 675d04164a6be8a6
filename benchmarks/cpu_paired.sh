#!/usr/bin/env bash
# CPU LSTM training speed like for like against PyTorch, paired in rounds by the peers' kit
# (../shared/bench/peers/bench_paired.py): our float32 against PyTorch float32, our bfloat16 against
# PyTorch under bfloat16 autocast, with subnormals flushed to zero on both sides as XLA's CPU runtime always
# does (benchmarks/torch_autocast_peer.py --flush_denormal); the kit's PyTorch, which keeps subnormals,
# is the table's baseline. Exact masking stays on.
#   benchmarks/cpu_paired.sh uni [ROUNDS [STEPS]]       # or bi2; defaults 15 rounds, 10 (uni) / 3 (bi2) steps
# Ours runs twice per dtype: on the CPU kernel (model.lstm_backend=cpu_kernel) and on the scan.
# Needs the kit set up (its setup.sh: $PEERS_HOME with the arrays and torch-venv) and this checkout's
# .venv (or $PYTHON). Prints the allocator, the kit's table (ratios to its PyTorch), then per-round ratios
# like for like.
#   ISA=AVX2 benchmarks/cpu_paired.sh uni ...   # float32 only, every contender capped at AVX2 on a newer CPU
# The cap: XLA and our kernel's build by --xla_cpu_max_isa, PyTorch by ATEN_CPU_CAPABILITY,
# MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA. XLA's matmuls (YNNPACK) pick their kernels at run time
# and ignore it, so a capped run favours us by however much of our step those matmuls take.
set -euo pipefail
model=${1:-uni}
rounds=${2:-15}
steps=${3:-$([ "$model" = uni ] && echo 10 || echo 3)}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
export PEERS_HOME=${PEERS_HOME:-/tmp/peers}
devices=${CPU_DEVICES:-$(nproc)}
# Every contender, PyTorch too, runs with the allocator cpu_setup picks (jemalloc where the system has it,
# else glibc with huge pages); MALLOC=glibc forces the latter.
eval "$(cd "$repo" && $py -c 'import os, shlex; from sentiment_jax import cpu_setup
path = None if os.environ.get("MALLOC") == "glibc" else cpu_setup.jemalloc()
print(" ".join(f"export {k}={shlex.quote(v)};" for k, v in cpu_setup.malloc_env(path).items()))')"
# As cpu_setup runs them: the kernel on JAX's one multi-threaded device, the scan on one device per core.
J="$py $repo/benchmarks/paired_lstm_contender.py --model $model"
K="$J --backend cpu_kernel"
S="$J --backend scan --cpu_devices $devices"
TB="$PEERS_HOME/torch-venv/bin/python $repo/benchmarks/torch_autocast_peer.py --mode serve --model $model"
raw="$PEERS_HOME/results/cpu_paired_${model}${ISA:+_$ISA}_$(date +%Y%m%d-%H%M%S).jsonl"
cd "${PEERS_KIT:-$repo/../shared/bench/peers}"
contenders=(--contender "torch $model ftz=$TB --dtype float32 --flush_denormal" --contender "jax $model f32=$K"
            --contender "jax $model f32 scan=$S")
if [ -n "${ISA:-}" ]; then
  isa_lower=$(echo "$ISA" | tr '[:upper:]' '[:lower:]')
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_max_isa=$ISA" ATEN_CPU_CAPABILITY=$isa_lower MKL_ENABLE_INSTRUCTIONS=$ISA \
    ONEDNN_MAX_CPU_ISA=$ISA
else
  contenders+=(--contender "torch $model bf16 ftz=$TB --flush_denormal" --contender "torch $model bf16=$TB"
               --contender "jax $model bf16=$K --dtype bfloat16"
               --contender "jax $model bf16 scan=$S --dtype bfloat16")
fi
echo "malloc: LD_PRELOAD=${LD_PRELOAD:-} MALLOC_CONF=${MALLOC_CONF:-} GLIBC_TUNABLES=${GLIBC_TUNABLES:-}"
python3 bench_paired.py --rounds "$rounds" --uni-steps "$steps" --bi2-steps "$steps" --only "torch $model" \
  --baseline "torch $model" --out "$raw" "${contenders[@]}"
python3 - "$raw" "jax $model f32" "torch $model ftz" "jax $model f32 scan" "torch $model ftz" \
  "jax $model f32" "torch $model" "jax $model bf16" "torch $model bf16 ftz" "jax $model bf16 scan" "torch $model bf16 ftz" \
  "jax $model bf16" "torch $model bf16" "jax $model f32" "jax $model f32 scan" "jax $model bf16" "jax $model bf16 scan" <<'PY'
import collections, json, statistics, sys
rounds = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    chunk = json.loads(line)
    rounds[chunk["round"]][chunk["name"]] = chunk["examples_per_s"]
for ours, theirs in zip(sys.argv[2::2], sys.argv[3::2]):
    if not all(ours in c and theirs in c for c in rounds.values()):
        continue  # a pair this run did not time (bfloat16 under ISA)
    r = [c[ours] / c[theirs] for c in rounds.values()]
    print(f"{ours} / {theirs}: {statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}] over {len(r)} rounds")
PY
