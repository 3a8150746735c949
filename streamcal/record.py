"""Recordings: a stream written to an Arrow IPC file, one record batch per message, with each
message's msgpack header kept in the batch's custom metadata (key ``streamcal.header``).

The file's schema is exactly the stream's schema, so any Arrow tool reads the data; replaying
re-encodes each batch into the same IPC payload bytes, and re-sends the original header with
only ``sent_ns`` re-stamped: a recorded-then-replayed stream is bit-identical in its payloads
and in every header field but ``sent_ns``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from streamcal import wire
from streamcal.errors import StreamcalError
from streamcal.wire import Header

__all__ = ["HEADER_KEY", "Recorder", "read_recording", "replay_frames"]

HEADER_KEY = b"streamcal.header"


class Recorder:
    """Append data messages of one stream to an Arrow IPC file."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, schema)
        self.messages = 0

    def write(self, header: Header | bytes, batch: pa.RecordBatch) -> None:
        raw = header if isinstance(header, bytes) else wire.encode_header(header)
        self._writer.write_batch(batch, custom_metadata={HEADER_KEY: raw})
        self.messages += 1

    def close(self) -> None:
        self._writer.close()
        self._sink.close()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_recording(path: str | os.PathLike) -> Iterator[tuple[Header, pa.RecordBatch]]:
    """Yield (header, batch) of every recorded message, in order."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (OSError, pa.ArrowInvalid) as exc:
        raise StreamcalError(f"cannot read recording '{path}': {exc}") from None
    for i in range(reader.num_record_batches):
        batch, meta = reader.get_batch_with_custom_metadata(i)
        if meta is None or HEADER_KEY not in meta:
            raise StreamcalError(f"recording '{path}': batch {i} has no '{HEADER_KEY.decode()}' metadata")
        header = wire.decode_header(meta[HEADER_KEY])
        yield header, batch


def replay_frames(path: str | os.PathLike, speed: float = 1.0) -> Iterator[tuple[Header, list]]:
    """Yield (header, frames) of a recording paced by event time (``t1_ns``) at ``speed``
    (1.0 real time, 0 as fast as possible). Headers are the recorded ones with ``sent_ns``
    re-stamped at send time."""
    if speed < 0:
        raise StreamcalError(f"replay speed must be >= 0 (0: as fast as possible), got {speed}")
    t_event0 = t_wall0 = None
    for header, batch in read_recording(path):
        if speed > 0:
            if t_event0 is None:
                t_event0, t_wall0 = header.t1_ns, time.monotonic_ns()
            target = t_wall0 + int((header.t1_ns - t_event0) / speed)
            delay = target - time.monotonic_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
        header.sent_ns = wire.now_ns()
        yield header, [wire.encode_header(header), wire.encode_payload(batch)]

