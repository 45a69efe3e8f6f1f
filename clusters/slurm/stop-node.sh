#!/bin/bash
# Stop every Ray process of this node (run by ray-cluster.sbatch's cleanup through srun on all nodes).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
source "$here/common.sh"

activate_env
ray stop --force >/dev/null 2>&1 || true
log "Ray stopped"
