#!/usr/bin/env bash
# Runs one command on every worker of an existing Cloud TPU VM (a pod slice such as v4-32):
# copies this checkout to each worker, sets up the venv there (once; later runs reuse it), and
# starts the command on all workers at once. It creates, deletes and resizes nothing.
#
#   launch/tpu_pod.sh NAME ZONE [--project P] [--dir D] -- COMMAND...
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b -- \
#       python -m jsds_jax.train --config configs/demo.py --workdir /mnt/shared/runs/demo
#
# On each worker the command runs in ~/D (default jsds-jax) with `python` meaning the venv's
# (~/D/.venv). JAX's TPU detection joins the workers into one distributed run
# (jsds_jax/distributed.py): nothing to set by hand. Every process must see the same workdir
# (checkpoints are written collectively): a Filestore/NFS mount or a gcsfuse-mounted bucket at
# the same path on all workers. launch/README.md has the full recipe.
#
# Environment passed through to the workers when set here: JSDS_HEARTBEAT_TIMEOUT_S,
# JSDS_INIT_TIMEOUT_S, JSDS_SHUTDOWN_TIMEOUT_S, HF_TOKEN, HF_HUB_OFFLINE. JAX_TPU_EXTRA (default "tpu") picks the jax
# extra installed beside the project.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 2 ]]; then
  echo "usage: launch/tpu_pod.sh NAME ZONE [--project P] [--dir D] -- COMMAND..." >&2
  exit 2
fi
name="$1"; zone="$2"; shift 2
project_args=()
dir="jsds-jax"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project_args=(--project "$2"); shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "launch/tpu_pod.sh: no command given (put it after --)" >&2
  exit 2
fi
gc=(gcloud compute tpus tpu-vm)
where=("$name" --zone "$zone" "${project_args[@]}" --worker=all)

# 1. This checkout (tracked and untracked-but-not-ignored files, no venv, no runs) to ~/$dir.
archive=$(mktemp /tmp/jsds-jax-XXXXXX.tgz)
trap 'rm -f "$archive"' EXIT
git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -
"${gc[@]}" scp "$archive" "$name:/tmp/jsds-jax.tgz" --zone "$zone" "${project_args[@]}" \
  --worker=all
# 2. Unpack, venv (idempotent), jax with the TPU runtime at the version the project resolved.
printf -v command_q '%q ' "$@"
env_q=""
for v in JSDS_HEARTBEAT_TIMEOUT_S JSDS_INIT_TIMEOUT_S JSDS_SHUTDOWN_TIMEOUT_S HF_TOKEN \
         HF_HUB_OFFLINE; do
  [[ -n "${!v:-}" ]] && env_q+="export $v=$(printf '%q' "${!v}"); "
done
extra=${JAX_TPU_EXTRA:-tpu}
remote=$(cat <<EOF
set -euo pipefail
mkdir -p ~/$dir && cd ~/$dir && tar -xzf /tmp/jsds-jax.tgz
if [[ ! -f .venv/.jsds-tpu-ready ]]; then
  launch/install.sh
  v=\$(.venv/bin/python -c 'import jax; print(jax.__version__)')
  .venv/bin/pip install -q --disable-pip-version-check "jax[$extra]==\$v"
  touch .venv/.jsds-tpu-ready
else
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
fi
# PYTHONPATH: the checkout's modules also for scripts run by path (tests/..., bench/...).
export PATH=\$PWD/.venv/bin:\$PATH PYTHONPATH=\$PWD PYTHONUNBUFFERED=1
$env_q
# Only worker 0 prints at INFO level for the binaries (they log from process 0), but every
# worker's errors reach this terminal.
exec $command_q
EOF
)
# 3. The same command on every worker, at once; gcloud returns when all have exited, and its
# status is non-zero when any worker failed.
exec "${gc[@]}" ssh "${where[@]}" --command "$remote"
