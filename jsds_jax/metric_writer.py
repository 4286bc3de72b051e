"""The train run's metric log: `<workdir>/metrics.jsonl` and TensorBoard event files.

  writer = MetricWriter(workdir, start_step)      # drops records a killed run left after it
  writer.write("train", step, {"loss": 0.7, ...})  # one JSON line + TensorBoard scalars
  read_jsonl(workdir / METRICS_FILE)               # the records back, as dicts
"""

from collections.abc import Mapping
import json
import os
import pathlib
import sys
import time

import jax

from jsds_jax import atomic
from jsds_jax import event_files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Appends records to `<workdir>/metrics.jsonl` and TensorBoard event files (process 0).

  Args:
    workdir: the train workdir.
    start_step: the step the run (re)starts at; records after it, left by a run killed after
      its last checkpoint, are dropped (and TensorBoard told to purge them).
  """

  def __init__(self, workdir: pathlib.Path, start_step: int):
    self.enabled = jax.process_index() == 0
    self.path = workdir / METRICS_FILE
    self._tb = None
    if not self.enabled:
      return
    truncate_jsonl(self.path, start_step)
    tensorboardx = _tensorboardx()
    event_files.purge_after(workdir / TENSORBOARD_DIR, start_step)
    self._tb = tensorboardx.SummaryWriter(str(workdir / TENSORBOARD_DIR),
                                          purge_step=start_step if start_step else None)

  def write(self, kind: str, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"kind": kind, "step": int(step), "time": round(time.time(), 3), **scalars}
    # One write of a whole line, flushed and synced: a kill leaves at most a partial last line,
    # which the next run's `truncate_jsonl` drops.
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      atomic.sync(f)
    for k, v in scalars.items():
      # TensorBoard tags take no "@": "val/sparse/t2i/R1".
      self._tb.add_scalar(f"{kind}/{k}".replace("@", ""), v, int(step))
    if kind != "train":
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _tensorboardx():
  """tensorboardX, imported without torch.

  Its writer imports torch when installed (only to accept torch tensors), which costs seconds
  at every start; it falls back to numpy when the import fails, so torch is masked meanwhile.
  """
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


def truncate_jsonl(path: pathlib.Path, last_step: int) -> None:
  """Keeps the records with step <= last_step (and drops unparsable lines), atomically."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line + "\n")
    except (ValueError, KeyError, TypeError):
      continue
  atomic.write_text(path, "".join(kept))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl."""
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
