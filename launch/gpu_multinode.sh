#!/usr/bin/env bash
# Runs one process of a multi-node GPU job: one process per node, all of the node's GPUs.
# Start it once on every node, either with SLURM's srun or by hand with the env contract.
#
# SLURM (one task per node; see launch/README.md for a complete sbatch file):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --kill-on-bad-exit=1 \
#       launch/gpu_multinode.sh python -m jsds_jax.train --config configs/blip_coco.py \
#       --workdir /shared/runs/blip_coco
#   The coordinator is the first node of the job (port JSDS_PORT, default 12355), the process
#   count SLURM_NTASKS and the process id SLURM_PROCID.
#
# Anywhere else, set on every node (the same address and count everywhere, ids 0..N-1):
#   JSDS_COORDINATOR_ADDRESS=10.0.0.1:12355   node 0's address (reachable by all) and a free port
#   JSDS_NUM_PROCESSES=2                      number of nodes
#   JSDS_PROCESS_ID=0                         this node's id; 0 hosts the coordinator
# and run: launch/gpu_multinode.sh python -m jsds_jax.train --config ... --workdir ...
#
# `python` means this checkout's venv (VENV, default .venv; launch/install.sh, then
# `.venv/bin/pip install "jax[cuda12]"`), which must exist on every node (a shared home does).
# The workdir must be on a filesystem every node sees (checkpoints are written collectively).
# A node that dies makes the others exit within JSDS_HEARTBEAT_TIMEOUT_S (default 60) seconds;
# resubmitting the same job resumes from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -eq 0 ]]; then
  echo "usage: launch/gpu_multinode.sh COMMAND..." >&2
  exit 2
fi
if [[ "$1" == "python" ]]; then
  if [[ ! -x "${VENV:-.venv}/bin/python" ]]; then
    echo "gpu_multinode.sh: no venv at ${VENV:-.venv}; run launch/install.sh and" \
         "'${VENV:-.venv}/bin/pip install \"jax[cuda12]\"' first" >&2
    exit 1
  fi
  set -- "${VENV:-.venv}/bin/python" "${@:2}"
fi

if [[ -n "${SLURM_PROCID:-}" && -z "${JSDS_COORDINATOR_ADDRESS:-}" ]]; then
  # The explicit contract rather than JAX's own SLURM detection: that one makes each process
  # see a single GPU (SLURM_LOCALID), right for a task per GPU, wrong for a task per node.
  # awk, not head: head would close the pipe early and `pipefail` turn SIGPIPE into a failure.
  first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
  export JSDS_COORDINATOR_ADDRESS="${first_node}:${JSDS_PORT:-12355}"
  export JSDS_NUM_PROCESSES="${SLURM_NTASKS}"
  export JSDS_PROCESS_ID="${SLURM_PROCID}"
fi
for v in JSDS_COORDINATOR_ADDRESS JSDS_NUM_PROCESSES JSDS_PROCESS_ID; do
  if [[ -z "${!v:-}" ]]; then
    echo "gpu_multinode.sh: $v is not set (and this is not a SLURM task)" >&2
    exit 2
  fi
done
export PYTHONUNBUFFERED=1
echo "gpu_multinode.sh: process ${JSDS_PROCESS_ID} of ${JSDS_NUM_PROCESSES} on $(hostname)," \
     "coordinator ${JSDS_COORDINATOR_ADDRESS}" >&2
exec "$@"
