#!/usr/bin/env bash
# Runs a jsds-jax binary on this machine: one process (the default), or N processes joined by
# JAX's distributed runtime on 127.0.0.1 (the multi-host code path, without a cluster).
#
#   launch/local.sh python -m jsds_jax.train --config configs/demo.py --workdir runs/demo
#   launch/local.sh -n 2 --cpu_devices 2 -- \
#       python -m jsds_jax.train --config configs/tiny.py --workdir /tmp/tiny2
#
# Options (before the command; `--` ends them):
#   -n N               processes (default 1: the command runs as it is, nothing is set).
#   --cpu_devices K    run on the CPU with K fake devices per process (JAX_PLATFORMS=cpu,
#                      XLA_FLAGS=--xla_force_host_platform_device_count=K): a 2×2 CPU run
#                      exercises the same sharding as a 2-host pod.
#   --port P           coordinator port (default: a free one).
#
# With N > 1 every process gets the explicit contract of jsds_jax/distributed.py
# (JSDS_COORDINATOR_ADDRESS=127.0.0.1:P, JSDS_NUM_PROCESSES=N, JSDS_PROCESS_ID=i); process i's
# output is prefixed with "[i]". If a process dies, the runtime terminates the others within
# JSDS_HEARTBEAT_TIMEOUT_S (default 60) seconds; this script then reports which one failed
# first and exits non-zero. Rerunning the same command resumes from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

n=1
cpu_devices=""
port=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    --cpu_devices) cpu_devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "usage: launch/local.sh [-n N] [--cpu_devices K] [--port P] [--] COMMAND..." >&2
  exit 2
fi
# `python` in the command means this checkout's venv when there is one.
if [[ "$1" == "python" && -x "${VENV:-.venv}/bin/python" ]]; then
  set -- "${VENV:-.venv}/bin/python" "${@:2}"
fi
if [[ -n "$cpu_devices" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="--xla_force_host_platform_device_count=${cpu_devices} ${XLA_FLAGS:-}"
fi
if [[ "$n" -eq 1 ]]; then
  exec "$@"
fi

if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export JSDS_COORDINATOR_ADDRESS="127.0.0.1:${port}" JSDS_NUM_PROCESSES="$n"
pids=()
for ((i = 0; i < n; i++)); do
  # Unbuffered, so the lines before a crash are not lost; each line tagged with its process.
  JSDS_PROCESS_ID=$i PYTHONUNBUFFERED=1 "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done
# Ctrl-C / TERM: pass it on to our processes (by pid), which save a checkpoint where they can.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM

status=0
live=("${pids[@]}")
while [[ ${#live[@]} -gt 0 ]]; do
  set +e
  wait -n -p finished "${live[@]}"
  rc=$?
  set -e
  [[ -z "${finished:-}" ]] && break
  live=($(printf '%s\n' "${live[@]}" | grep -vx "$finished" || true))
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    for ((i = 0; i < n; i++)); do [[ "${pids[$i]}" == "$finished" ]] && failed=$i; done
    echo "launch/local.sh: process ${failed} exited with status $rc; the others stop within" \
         "JSDS_HEARTBEAT_TIMEOUT_S (${JSDS_HEARTBEAT_TIMEOUT_S:-60} s). Rerun the same" \
         "command to resume from the last checkpoint." >&2
  fi
done
exit $status
