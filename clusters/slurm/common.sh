#!/bin/bash
# Helpers of the SLURM scripts (sourced, never run): environment, resources and the rendezvous files.
#
# Settings (environment variables; sbatch passes the submitting shell's environment to the job):
#   VISCY_VENV        virtual environment holding viscy and ray (default: $SLURM_SUBMIT_DIR/.venv, the one
#                     `make test` creates in the repository), or
#   VISCY_CONDA_ENV   a conda environment name or prefix instead (needs `conda` on PATH, e.g. a module)
#   VISCY_RAY_DIR     rendezvous directory on storage every node sees (default: $HOME/.viscy-ray); the head
#                     writes VISCY_RAY_DIR/JOBID/{head_address,auth_token} there
#   RAY_HEAD_TIMEOUT  seconds to wait for the head and the workers (default: 300)
#   RAY_PORT          GCS port of the head (default: 6379)
#   RAY_NODE_IP       this node's address for Ray (default: its first non-loopback IPv4 address)
#   RAY_NUM_CPUS, RAY_NUM_GPUS   override what SLURM allocated to each node
# shellcheck shell=bash

log() { echo "viscy-ray [$(hostname -s)] $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Activate VISCY_CONDA_ENV or VISCY_VENV (activation scripts may read unset variables: relax -u meanwhile).
activate_env() {
    set +u
    if [[ -n ${VISCY_CONDA_ENV:-} ]]; then
        command -v conda >/dev/null || die "VISCY_CONDA_ENV=$VISCY_CONDA_ENV but conda is not on PATH"
        eval "$(conda shell.bash hook)"
        conda activate "$VISCY_CONDA_ENV" || die "cannot activate conda environment $VISCY_CONDA_ENV"
    else
        local venv=${VISCY_VENV:-${SLURM_SUBMIT_DIR:-$PWD}/.venv}
        [[ -f $venv/bin/activate ]] || die "no virtual environment at $venv: set VISCY_VENV or VISCY_CONDA_ENV"
        # shellcheck source=/dev/null
        source "$venv/bin/activate"
    fi
    set -u
    command -v ray >/dev/null || die "ray is not installed in the activated environment"
}

# This job's rendezvous directory (shared storage).
job_dir() {
    echo "${VISCY_RAY_DIR:-$HOME/.viscy-ray}/${SLURM_JOB_ID:?not inside a SLURM job}"
}

# CPUs for Ray on this node.
cpu_count() {
    echo "${RAY_NUM_CPUS:-${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}}"
}

# GPUs for Ray on this node: SLURM_GPUS_ON_NODE (set in job steps), else the --gpus-per-node request in
# SLURM_GPUS_PER_NODE, written as "4", "a100:4" or "a100:2,v100:2" (typed counts are summed).
gpu_count() {
    if [[ -n ${RAY_NUM_GPUS:-} ]]; then
        echo "$RAY_NUM_GPUS"
        return
    fi
    if [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
        echo "$SLURM_GPUS_ON_NODE"
        return
    fi
    local spec=${SLURM_GPUS_PER_NODE:-0} total=0 item count
    local -a items
    IFS=',' read -ra items <<<"$spec"
    for item in "${items[@]}"; do
        count=${item##*:}  # a100:4 -> 4
        count=${count%%(*} # 4(IDX:0-3) -> 4
        [[ $count =~ ^[0-9]+$ ]] || die "cannot read a GPU count from SLURM_GPUS_PER_NODE='$spec'; set RAY_NUM_GPUS"
        total=$((total + count))
    done
    echo "$total"
}

# This node's address for Ray: RAY_NODE_IP, else the first non-loopback IPv4 address of the host.
node_ip() {
    if [[ -n ${RAY_NODE_IP:-} ]]; then
        echo "$RAY_NODE_IP"
        return
    fi
    local ip
    local -a ips
    read -ra ips <<<"$(hostname --ip-address) $(hostname -I 2>/dev/null || true)"
    for ip in "${ips[@]}"; do
        if [[ $ip =~ ^[0-9.]+$ && $ip != 127.* ]]; then
            echo "$ip"
            return
        fi
    done
    die "no non-loopback IPv4 address for $(hostname); set RAY_NODE_IP"
}

# Write CONTENT to FILE atomically (a reader sees nothing or everything), readable by the owner only.
write_atomic() {
    local file=$1 content=$2 tmp
    tmp=$(mktemp "$file.XXXXXX")
    printf '%s' "$content" >"$tmp"
    mv -f "$tmp" "$file"
}

# Wait until FILE exists and is not empty, polling every 2 s for at most RAY_HEAD_TIMEOUT seconds.
# WHAT names it in the error; PID (optional) is a process that must stay alive meanwhile.
wait_for_file() {
    local file=$1 what=$2 pid=${3:-} timeout=${RAY_HEAD_TIMEOUT:-300} waited=0
    until [[ -s $file ]]; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            die "$what never appeared in $file: the process that writes it ($pid) has exited (see its log above)"
        fi
        if ((waited >= timeout)); then
            die "$what did not appear in $file within $timeout s (raise RAY_HEAD_TIMEOUT, or check the head's log)"
        fi
        sleep 2
        waited=$((waited + 2))
    done
}

# Alive Ray nodes of the cluster at ADDRESS (0 while it cannot be asked).
alive_nodes() {
    python -c 'import sys
from ray.util.state import list_nodes
print(len(list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")], limit=100000)))' "$1" 2>/dev/null ||
        echo 0
}

# Wait until COUNT nodes are alive in the cluster at ADDRESS, polling every 2 s for RAY_HEAD_TIMEOUT seconds.
wait_for_nodes() {
    local address=$1 want=$2 timeout=${RAY_HEAD_TIMEOUT:-300} waited=0 alive
    while :; do
        alive=$(alive_nodes "$address")
        ((alive >= want)) && return 0
        if ((waited >= timeout)); then
            die "only $alive of $want Ray nodes joined $address within $timeout s (see the workers' log above)"
        fi
        sleep 2
        waited=$((waited + 2))
    done
}
