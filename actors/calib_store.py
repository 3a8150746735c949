"""``calib_store``: a sink that stores each message of its input as a calibration object.

Object name: ``name`` (default: the stream's name). Validity: ``message`` takes the header's
event-time window ``[t0_ns, t1_ns)``; ``open`` makes each object valid from its ``t0_ns`` on,
until a newer one supersedes it (the store returns the newest valid object). ``every`` keeps one
message in N (corrections every 10 ms add up quickly); what is skipped is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from streamcal.config import Config
from streamcal.schemas import ANY
from streamcal.stage import Sink, register_stage
from streamcal.store import CalibStore
from streamcal.wire import Header

__all__ = ["CalibStoreConfig", "CalibStoreSink"]


@dataclass(frozen=True)
class CalibStoreConfig(Config):
    db: str = "calib.sqlite"  # the SQLite store file
    name: str = ""  # object name (default: the stream name)
    validity: Literal["message", "open"] = "message"
    every: int = 1  # store one message in N

    def validate(self) -> None:
        if not self.db:
            self.fail("db", "must name a file")
        if self.every < 1:
            self.fail("every", f"must be >= 1, got {self.every}")


@register_stage
class CalibStoreSink(Sink):
    kind = "calib_store"
    Config = CalibStoreConfig

    @classmethod
    def inputs(cls, config: CalibStoreConfig) -> dict[str, str]:
        return {"in": ANY}

    def setup(self) -> None:
        self.store = CalibStore(self.config.db)
        self.seen = self.stored = 0
        self.ids: list[int] = []

    def process(self, port: str, batch: pa.RecordBatch, header: Header) -> None:
        self.seen += 1
        if (self.seen - 1) % self.config.every:
            return
        t1 = None if self.config.validity == "open" or header.t1_ns <= header.t0_ns else header.t1_ns
        meta = {"stream": header.stream, "producer": header.producer, "seq": header.seq, "schema": header.schema,
                "fingerprint": header.fp}
        meta.update({k: v for k, v in header.extra.items() if isinstance(v, (str, int, float, bool))
                     and k not in ("lseq", "inc")})
        self.ids.append(self.store.put(self.config.name or header.stream, header.t0_ns, t1, batch, meta))
        self.stored += 1

    def finish(self) -> None:
        self.store.close()

    def summary(self) -> dict:
        return {"db": self.config.db, "stored": self.stored, "skipped": self.seen - self.stored,
                "first_id": self.ids[0] if self.ids else None, "last_id": self.ids[-1] if self.ids else None}
