"""Purging a killed run's replayed steps from its TensorBoard event files."""

from jsds_jax import event_files
from jsds_jax import metric_writer


def _steps(directory):
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  steps = []
  for path in sorted(directory.glob(event_files.EVENTS_GLOB)):
    for record in event_files.read_records(path):
      event = event_pb2.Event.FromString(record)
      if event.HasField("summary"):
        steps.append(event.step)
  return steps


def _write(directory, steps, purge_step=None, suffix=""):
  # A suffix: two writers started within one second would otherwise share a file name.
  writer = metric_writer._tensorboardx().SummaryWriter(  # pylint: disable=protected-access
      str(directory), purge_step=purge_step, filename_suffix=suffix)
  for step in steps:
    writer.add_scalar("train/loss", float(step), step)
  writer.close()


def test_a_resume_drops_the_steps_it_will_redo(tmp_path):
  _write(tmp_path, range(1, 11))            # killed at step 10, checkpoint at 6
  assert event_files.purge_after(tmp_path, 6) == 4
  _write(tmp_path, range(7, 13), purge_step=6, suffix=".resumed")
  assert _steps(tmp_path) == list(range(1, 13))  # each step once, in order
  assert event_files.purge_after(tmp_path, 12) == 0


def test_a_torn_last_record_is_dropped_and_the_file_stays_readable(tmp_path):
  _write(tmp_path, range(1, 5))
  path = next(tmp_path.glob(event_files.EVENTS_GLOB))
  path.write_bytes(path.read_bytes()[:-7])  # a kill in the middle of the last write
  assert event_files.purge_after(tmp_path, 100) == 0
  assert _steps(tmp_path) == [1, 2, 3]
  # The rewritten file's checksums are valid: TensorBoard's own reader accepts it.
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  data = path.read_bytes()
  record = event_files.read_records(path)[0]
  assert data[8:12] == record_writer.struct.pack("I", record_writer.masked_crc32c(data[:8]))
  assert data[12 + len(record):16 + len(record)] == record_writer.struct.pack(
      "I", record_writer.masked_crc32c(record))
