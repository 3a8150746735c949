"""``record``: a sink that writes its input stream to an Arrow IPC recording (headers kept)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from streamcal.config import Config
from streamcal.record import Recorder
from streamcal.schemas import ANY
from streamcal.stage import Sink, register_stage
from streamcal.wire import Header, encode_header

__all__ = ["RecordConfig", "Record"]


@dataclass(frozen=True)
class RecordConfig(Config):
    path: str = "recording.arrow"  # for replicas > 1, ``{replica}`` in the path is replaced
    every: int = 1  # keep one message in N (an archive of a fast stream); 1 keeps all

    def validate(self) -> None:
        if not self.path:
            self.fail("path", "must name a file")
        if self.every < 1:
            self.fail("every", f"must be >= 1, got {self.every}")


@register_stage
class Record(Sink):
    kind = "record"
    Config = RecordConfig

    @classmethod
    def inputs(cls, config: RecordConfig) -> dict[str, str]:
        return {"in": ANY}

    def setup(self) -> None:
        self.recorder: Recorder | None = None
        self.seen = 0

    def process(self, port: str, batch: pa.RecordBatch, header: Header) -> None:
        self.seen += 1
        if (self.seen - 1) % self.config.every:
            return
        if self.recorder is None:
            self.recorder = Recorder(self.config.path.format(replica=self.ctx.replica), batch.schema)
        header.extra.pop("lseq", None)  # link bookkeeping is not part of the stream
        self.recorder.write(encode_header(header), batch)

    def finish(self) -> None:
        if self.recorder is not None:
            self.recorder.close()

    def summary(self) -> dict:
        return {"path": self.config.path.format(replica=self.ctx.replica),
                "messages": self.recorder.messages if self.recorder else 0, "skipped": self.seen - (
                    self.recorder.messages if self.recorder else 0)}
