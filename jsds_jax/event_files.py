"""Dropping TensorBoard events past a step from a run's event files (a resumed run's replay).

A run killed after its last checkpoint wrote scalars for steps it will redo on resume. The
writer's `purge_step` only asks the viewer to hide them, and not every loader honours it (the
fast Rust loader of recent TensorBoard does not), so the steps showed twice; here the records
are removed from the files themselves, as `train._truncate_jsonl` does for metrics.jsonl.

An event file is a sequence of TFRecords: uint64 length, uint32 masked CRC-32C of the length,
the serialized `Event` proto, uint32 masked CRC-32C of the data (all little-endian).
"""

import os
import pathlib
import struct

EVENTS_GLOB = "events.out.tfevents.*"
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


def read_records(path: str | os.PathLike) -> list[bytes]:
  """The records of a TFRecord file; a torn last record (a killed writer) is left out."""
  data = pathlib.Path(path).read_bytes()
  records, pos = [], 0
  while pos + _HEADER.size <= len(data):
    (length, _), start = _HEADER.unpack_from(data, pos), pos + _HEADER.size
    end = start + length + _FOOTER.size
    if end > len(data):
      break
    records.append(data[start:start + length])
    pos = end
  return records


def _masked_crc(data: bytes) -> int:
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  return record_writer.masked_crc32c(data)


def encode_record(data: bytes) -> bytes:
  """One TFRecord: framing and checksums around `data`."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked_crc(header)) + data
          + struct.pack("<I", _masked_crc(data)))


def purge_after(directory: str | os.PathLike, last_step: int) -> int:
  """Removes the summaries of steps > `last_step` from every event file in `directory`.

  Files are rewritten atomically (a temporary file, then a rename) and only when something is
  dropped; records without a summary (file version, session logs) are kept.

  Returns:
    How many events were dropped.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  dropped = 0
  for path in sorted(pathlib.Path(directory).glob(EVENTS_GLOB)):
    kept, here = [], 0
    records = read_records(path)
    for record in records:
      event = event_pb2.Event.FromString(record)
      if event.HasField("summary") and event.step > last_step:
        here += 1
      else:
        kept.append(record)
    torn = path.stat().st_size != sum(_HEADER.size + len(r) + _FOOTER.size for r in records)
    if here or torn:
      tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
      tmp.write_bytes(b"".join(encode_record(r) for r in kept))
      os.replace(tmp, path)
    dropped += here
  return dropped
