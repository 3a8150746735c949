"""``collect``: a sink that counts what it receives and keeps a checksum (any schema)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from streamcal.config import Config
from streamcal.schemas import ANY
from streamcal.stage import Sink, register_stage
from streamcal.wire import Header

__all__ = ["CollectConfig", "Collect"]


@dataclass(frozen=True)
class CollectConfig(Config):
    keep: int = 0  # keep the last N batches in memory (for tests and the in-process runner)
    sum_column: str = ""  # sum this numeric column into the summary

    def validate(self) -> None:
        if self.keep < 0:
            self.fail("keep", f"must be >= 0, got {self.keep}")


@register_stage
class Collect(Sink):
    kind = "collect"
    Config = CollectConfig

    @classmethod
    def inputs(cls, config: CollectConfig) -> dict[str, str]:
        return {"in": ANY}

    def setup(self) -> None:
        self.messages = 0
        self.rows = 0
        self.total = 0.0
        self.batches: list[tuple[Header, pa.RecordBatch]] = []
        self.first_t0: int | None = None
        self.last_t1 = 0

    def process(self, port: str, batch: pa.RecordBatch, header: Header) -> None:
        self.messages += 1
        self.rows += batch.num_rows
        if self.config.sum_column:
            import pyarrow.compute as pc

            s = pc.sum(batch.column(self.config.sum_column)).as_py()
            self.total += s or 0.0
        self.first_t0 = header.t0_ns if self.first_t0 is None else min(self.first_t0, header.t0_ns)
        self.last_t1 = max(self.last_t1, header.t1_ns)
        if self.config.keep:
            self.batches.append((header, batch))
            del self.batches[: -self.config.keep]

    def summary(self) -> dict:
        out = {"messages": self.messages, "rows": self.rows, "t0_ns": self.first_t0, "t1_ns": self.last_t1}
        if self.config.sum_column:
            out[f"sum_{self.config.sum_column}"] = self.total
        return out
