#!/bin/bash
# Start the Ray head on this node and publish how to join it (run by ray-cluster.sbatch through srun).
# It writes the job's token, starts `ray start --head`, waits until the GCS answers, then writes
# JOBDIR/head_address (both files atomically), and stays in the foreground as long as the head runs.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
source "$here/common.sh"

activate_env
dir=$(job_dir)
token_file=$dir/auth_token
address_file=$dir/head_address
[[ -e $address_file ]] && die "$address_file exists: another head of job $SLURM_JOB_ID is running"

umask 077
write_atomic "$token_file" "$(python -c 'import secrets; print(secrets.token_hex(32), end="")')"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token_file

ip=$(node_ip)
port=${RAY_PORT:-6379}
log "starting the Ray head at $ip:$port ($(cpu_count) CPUs, $(gpu_count) GPUs)"
ray start --head --block --node-ip-address="$ip" --port="$port" --dashboard-host=127.0.0.1 \
    --num-cpus="$(cpu_count)" --num-gpus="$(gpu_count)" &
ray_pid=$!

timeout=${RAY_HEAD_TIMEOUT:-300}
waited=0
until ray health-check --address "$ip:$port" >/dev/null 2>&1; do
    kill -0 "$ray_pid" 2>/dev/null || die "ray start --head exited before the head answered (see above)"
    ((waited < timeout)) || die "the Ray head did not answer within $timeout s (raise RAY_HEAD_TIMEOUT)"
    sleep 2
    waited=$((waited + 2))
done
write_atomic "$address_file" "$ip:$port"
log "Ray head is up: $ip:$port"
wait "$ray_pid"
