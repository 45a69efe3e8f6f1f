#!/bin/bash
# Join this node to the job's Ray head (run by ray-cluster.sbatch through srun on every other node).
# It waits for JOBDIR/head_address (polling, RAY_HEAD_TIMEOUT), reads the token next to it, and stays in
# the foreground as long as the node runs.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
source "$here/common.sh"

activate_env
dir=$(job_dir)
wait_for_file "$dir/head_address" "the Ray head's address"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$dir/auth_token
[[ -s $RAY_AUTH_TOKEN_PATH ]] || die "no token at $RAY_AUTH_TOKEN_PATH next to the head's address"
address=$(<"$dir/head_address")

log "joining $address ($(cpu_count) CPUs, $(gpu_count) GPUs)"
exec ray start --block --address="$address" --node-ip-address="$(node_ip)" \
    --num-cpus="$(cpu_count)" --num-gpus="$(gpu_count)"
