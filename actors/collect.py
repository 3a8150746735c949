"""``collect``: a sink that counts what it receives (any schema): messages, rows, distinct
values of a column, out-of-order messages per producer, and an optional column sum. With
``delay_ms`` it simulates a slow consumer (for backpressure drills)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamcal.config import Config
from streamcal.schemas import ANY
from streamcal.stage import Sink, register_stage
from streamcal.wire import Header

__all__ = ["CollectConfig", "Collect"]


@dataclass(frozen=True)
class CollectConfig(Config):
    keep: int = 0  # keep the last N batches in memory (in-process runs and tests)
    sum_column: str = ""  # sum this numeric column
    distinct_column: str = ""  # count distinct values of this integer column
    delay_ms: float = 0.0  # sleep this long per message (a deliberately slow consumer)

    def validate(self) -> None:
        if self.keep < 0:
            self.fail("keep", f"must be >= 0, got {self.keep}")
        if self.delay_ms < 0:
            self.fail("delay_ms", f"must be >= 0, got {self.delay_ms}")


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
        self.last_seq: dict[str, int] = {}
        self.out_of_order = 0
        self._distinct: list[np.ndarray] = []

    def process(self, port: str, batch: pa.RecordBatch, header: Header) -> None:
        self.messages += 1
        self.rows += batch.num_rows
        if header.seq <= self.last_seq.get(header.producer, -1):
            self.out_of_order += 1
        self.last_seq[header.producer] = header.seq
        if self.config.sum_column:
            self.total += pc.sum(batch.column(self.config.sum_column)).as_py() or 0.0
        if self.config.distinct_column:
            self._distinct.append(np.unique(batch.column(self.config.distinct_column).to_numpy()))
            if len(self._distinct) > 64:
                self._distinct = [np.unique(np.concatenate(self._distinct))]
        self.first_t0 = header.t0_ns if self.first_t0 is None else min(self.first_t0, header.t0_ns)
        self.last_t1 = max(self.last_t1, header.t1_ns)
        if self.config.keep:
            self.batches.append((header, batch))
            del self.batches[: -self.config.keep]
        if self.config.delay_ms:
            time.sleep(self.config.delay_ms / 1e3)

    def summary(self) -> dict:
        out = {"messages": self.messages, "rows": self.rows, "t0_ns": self.first_t0, "t1_ns": self.last_t1,
               "out_of_order": self.out_of_order}
        if self.config.sum_column:
            out[f"sum_{self.config.sum_column}"] = self.total
        if self.config.distinct_column:
            d = np.unique(np.concatenate(self._distinct)) if self._distinct else np.zeros(0)
            out[f"distinct_{self.config.distinct_column}"] = int(d.size)
        return out
