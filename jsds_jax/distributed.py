"""Multi-process start-up: `maybe_initialize()` joins the JAX distributed runtime, or does nothing.

Every binary (`encode`, `train`, `eval`) calls `maybe_initialize()` first thing in `main`, before
anything touches a device. What it does depends on where it runs:

  JSDS_DISTRIBUTED=off                 never initializes (one process, its own devices).
  JSDS_COORDINATOR_ADDRESS=host:port   explicit contract (plain multi-node GPU, CPU tests): with
  JSDS_NUM_PROCESSES=N                 N > 1 it initializes with exactly these values and turns
  JSDS_PROCESS_ID=i                    JAX's cluster detection off; N = 1 is a single process.
  SLURM (`srun`, SLURM_NTASKS > 1)     JAX's own SLURM detection: coordinator = first node of
                                       the step, process id = SLURM_PROCID, one GPU per task
                                       when tasks share a node.
  Cloud TPU VM                         JAX's TPU detection (worker 0 is the coordinator); a
                                       one-host TPU VM initializes as a 1-process cluster.
  anything else                        nothing: a single-process run.

Failure detection. Each process sends heartbeats to the coordination service (hosted by process
0). When a process dies, the service marks it unhealthy after `JSDS_HEARTBEAT_TIMEOUT_S` seconds
(default 60) and every surviving process is terminated by the runtime with "Terminating process
because the JAX distributed service detected fatal errors ... tasks are unhealthy (stopped sending
heartbeats)" (exit status 134, SIGABRT); when process 0 itself dies, the others see the service
go away and abort the same way, usually at once because their next collective fails. A survivor
blocked in a collective is not a hang: the abort comes from the runtime's own error-polling
thread. Rerunning the same launch command then resumes from the last complete checkpoint.
`JSDS_INIT_TIMEOUT_S` (default 300) bounds how long a process waits for its peers to appear,
`JSDS_SHUTDOWN_TIMEOUT_S` (default 300) how long a finished process waits at exit for the others
to finish (raise it when hosts may finish far apart, e.g. `encode` over slow storage).
"""

import dataclasses
import os

from absl import logging
import jax

_ENV_MODE = "JSDS_DISTRIBUTED"
_ENV_ADDRESS = "JSDS_COORDINATOR_ADDRESS"
_ENV_NUM = "JSDS_NUM_PROCESSES"
_ENV_ID = "JSDS_PROCESS_ID"
_ENV_HEARTBEAT = "JSDS_HEARTBEAT_TIMEOUT_S"
_ENV_INIT = "JSDS_INIT_TIMEOUT_S"
_ENV_SHUTDOWN = "JSDS_SHUTDOWN_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
DEFAULT_INIT_TIMEOUT_S = 300
DEFAULT_SHUTDOWN_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins (or not) a multi-process run.

  Attributes:
    how: "off" (single process), "env" (explicit JSDS_* contract), "slurm" or "tpu" (JAX's
      cluster detection).
    coordinator_address: "host:port" of process 0's coordination service ("env" only).
    num_processes: N ("env" only; detected otherwise).
    process_id: this process's id in [0, N) ("env" only).
    heartbeat_timeout_s: seconds without heartbeats before a peer is declared dead.
    init_timeout_s: seconds to wait for all peers at start-up.
    shutdown_timeout_s: seconds a finished process waits at exit for the others.
  """

  how: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S
  init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S
  shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S


def _int_env(env, name: str, default: int | None = None) -> int | None:
  value = env.get(name, "")
  if value == "":
    return default
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer") from None


def _on_cloud_tpu_vm() -> bool:
  # JAX's own test (libtpu present and a Google TPU PCI vendor id), not a guess from env vars.
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return False


def plan_from_env(env=None) -> Plan:
  """Decides how to start from the environment alone (pure: reads `env`, starts nothing).

  Args:
    env: a mapping like `os.environ` (default: `os.environ`).

  Returns:
    The `Plan`.

  Raises:
    ValueError: an incomplete or inconsistent JSDS_* contract.
  """
  env = os.environ if env is None else env
  timeouts = dict(heartbeat_timeout_s=_int_env(env, _ENV_HEARTBEAT, DEFAULT_HEARTBEAT_TIMEOUT_S),
                  init_timeout_s=_int_env(env, _ENV_INIT, DEFAULT_INIT_TIMEOUT_S),
                  shutdown_timeout_s=_int_env(env, _ENV_SHUTDOWN, DEFAULT_SHUTDOWN_TIMEOUT_S))
  mode = env.get(_ENV_MODE, "auto")
  if mode not in ("auto", "off"):
    raise ValueError(f"{_ENV_MODE} must be 'auto' or 'off', got {mode!r}")
  if mode == "off":
    return Plan("off", **timeouts)
  explicit = {k: env.get(k, "") for k in (_ENV_ADDRESS, _ENV_NUM, _ENV_ID)}
  if any(explicit.values()):
    missing = [k for k, v in explicit.items() if not v]
    if missing:
      raise ValueError(f"multi-process contract incomplete: {', '.join(missing)} not set (set "
                       f"all of {_ENV_ADDRESS}, {_ENV_NUM}, {_ENV_ID} or none)")
    num, pid = _int_env(env, _ENV_NUM), _int_env(env, _ENV_ID)
    if not 0 <= pid < num:
      raise ValueError(f"{_ENV_ID}={pid} must lie in [0, {_ENV_NUM}={num})")
    if num == 1:
      return Plan("off", **timeouts)
    return Plan("env", explicit[_ENV_ADDRESS], num, pid, **timeouts)
  # SLURM: only a multi-task step is a multi-process run (an `salloc` shell or a 1-task `srun`
  # is not). SLURM_STEP_NUM_TASKS is the step's count; SLURM_NTASKS the allocation's.
  slurm_tasks = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")
  if env.get("SLURM_PROCID", "") != "" and (slurm_tasks or 1) > 1:
    return Plan("slurm", **timeouts)
  platforms = env.get("JAX_PLATFORMS", "")
  if _on_cloud_tpu_vm() and (not platforms or "tpu" in platforms):
    return Plan("tpu", **timeouts)
  return Plan("off", **timeouts)


def maybe_initialize(env=None) -> Plan:
  """Joins the JAX distributed runtime when this is a multi-process run (see the module doc).

  Call it before anything touches a device (`jax.devices()`, a computation, `device_put`).
  Calling it again, or after `jax.distributed.initialize` was called elsewhere, does nothing.

  Args:
    env: a mapping like `os.environ` (default: `os.environ`).

  Returns:
    The `Plan` it followed.
  """
  plan = plan_from_env(env)
  if plan.how == "off" or jax.distributed.is_initialized():
    return plan
  kwargs = dict(initialization_timeout=plan.init_timeout_s,
                heartbeat_timeout_seconds=plan.heartbeat_timeout_s,
                shutdown_timeout_seconds=plan.shutdown_timeout_s)
  if plan.how == "env":
    # All three given: JAX's cluster detection would only pick local_device_ids (one GPU per
    # process under SLURM), which the explicit contract leaves to JAX_LOCAL_DEVICE_IDS.
    jax.distributed.initialize(coordinator_address=plan.coordinator_address,
                               num_processes=plan.num_processes, process_id=plan.process_id,
                               cluster_detection_method="deactivate", **kwargs)
  else:
    jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d joined the distributed runtime (%s)", jax.process_index(),
               jax.process_count(), plan.how)
  if not is_main_process():
    # One voice per run: INFO logs (and the binaries' progress bars, which check
    # `is_main_process`) come from process 0; warnings and errors still come from everyone.
    logging.set_verbosity(logging.WARNING)
  return plan


def is_main_process() -> bool:
  """True on process 0: the one that logs, shows progress bars and writes reports."""
  return jax.process_index() == 0
