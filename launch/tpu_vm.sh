#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice of many) with gcloud.
#
#   launch/tpu_vm.sh --name=sj-v4 --zone=us-central2-b --accelerator-type=v4-32 \
#       --workdir=/mnt/shared/runs/lstm -- --config=configs/lstm.py:imdb,fsdp
#   launch/tpu_vm.sh --name=sj-v4 --zone=us-central2-b delete
#
# Steps (positional; default: create copy install run logs):
#   create   make the TPU VM slice
#   copy     `git archive` this checkout (HEAD) and copy it to every worker
#   install  unpack it and pip install it with jax[tpu] on every worker
#   run      start training on --worker=all at once, detached (log: ~/sentiment_jax.log)
#   logs     follow worker 0's log until its training process exits
#   delete   delete the slice (it bills until then)
# Every worker runs the same command; JAX finds its peers from the TPU metadata, so no
# coordinator flags are needed. --workdir must be one folder all workers share (NFS,
# Filestore or a gcsfuse-mounted bucket): Orbax writes checkpoints there collectively.
# Flags after `--` go to `python -m sentiment_jax.main`. --dry-run prints every command.
set -euo pipefail

name="" zone="" accelerator="v4-8" version="tpu-ubuntu2204-base" project="" spot=0
workdir="runs/tpu" dry_run=0 steps=() main_args=()
repo=$(cd "$(dirname "$0")/.." && pwd)
jax_version=$(sed -n 's/^jax==\([0-9.]*\)$/\1/p' "$repo/requirements.lock")  # the tested release

usage() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator-type=*) accelerator=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --spot) spot=1 ;;
    --workdir=*) workdir=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    --) shift; main_args=("$@"); break ;;
    create|copy|install|run|logs|delete) steps+=("$1") ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
[[ -n $name && -n $zone ]] || { echo "--name and --zone are required" >&2; usage; }
[[ ${#steps[@]} -gt 0 ]] || steps=(create copy install run logs)

# Single-quotes a word for the shell unless it is plainly safe.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
# Prints a command (pasteable), then runs it unless --dry-run.
run() {
  local line="" word
  for word in "$@"; do line+="$(quote "$word") "; done
  echo "${line% }"
  [[ $dry_run == 1 ]] || "$@"
}
common=(--zone="$zone")
[[ -z $project ]] || common+=(--project="$project")
tarball=/tmp/sentiment_jax.tar.gz
remote=(gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command)

for step in "${steps[@]}"; do
  case $step in
    create)
      extra=(); [[ $spot == 0 ]] || extra=(--spot)
      run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$accelerator" \
        --version="$version" "${extra[@]}" ;;
    copy)
      run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
      run gcloud compute tpus tpu-vm scp "$tarball" "$name:~/sentiment_jax.tar.gz" "${common[@]}" --worker=all ;;
    install)
      run "${remote[@]}" "mkdir -p ~/sentiment_jax && tar -xzf ~/sentiment_jax.tar.gz -C ~/sentiment_jax \
&& python3 -m pip install -q -e ~/sentiment_jax \"jax[tpu]==$jax_version\"" ;;
    run)
      args=""; for word in --workdir="$workdir" "${main_args[@]}"; do args+="$(quote "$word") "; done
      run "${remote[@]}" "cd ~/sentiment_jax && nohup python3 -m sentiment_jax.main $args\
> ~/sentiment_jax.log 2>&1 < /dev/null & echo \$! > ~/sentiment_jax.pid" ;;
    logs)
      run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=0 \
        --command "tail -n +1 --pid=\$(cat ~/sentiment_jax.pid) -f ~/sentiment_jax.log" ;;
    delete)
      run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet ;;
  esac
done
