"""``running_stats``: a stateful transform that scores each sample against the running
per-channel mean and standard deviation (Welford's algorithm) seen so far by this replica.

For a sample x on channel c with n previous samples, mean m and variance s² (n-1 denominator),
the score is (x - m)/s when n >= 2, else 0; then (n, m, s²) are updated with x. Every
``summary_ms`` of event time (a timer) it logs the state; at end of stream it reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from streamcal.config import Config
from streamcal.schemas import register_schema
from streamcal.stage import Stage, register_stage
from streamcal.wire import Header

from streamcal.actors.synthetic import SAMPLES

__all__ = ["RunningStatsConfig", "RunningStats", "SCORED", "welford_scores"]

SCORED = register_schema(
    "demo.scored",
    pa.schema(
        [
            pa.field("event", pa.int64(), nullable=False),
            pa.field("channel", pa.int32(), nullable=False),
            pa.field("value", pa.float64(), nullable=False),
            pa.field("score", pa.float64(), nullable=False),
        ]
    ),
    doc="Samples with their score against the running per-channel mean and deviation.",
    finite=("value", "score"),
)


@dataclass(frozen=True)
class RunningStatsConfig(Config):
    channels: int = 8
    summary_ms: float = 100.0

    def validate(self) -> None:
        if self.channels < 1:
            self.fail("channels", f"must be >= 1, got {self.channels}")
        if not self.summary_ms > 0:
            self.fail("summary_ms", f"must be > 0, got {self.summary_ms}")


def welford_scores(
    channel: np.ndarray, value: np.ndarray, n: np.ndarray, mean: np.ndarray, m2: np.ndarray
) -> np.ndarray:
    """Score then update, sample by sample, in order. Updates ``n``, ``mean``, ``m2`` in place."""
    out = np.zeros(len(value))
    for i, (c, x) in enumerate(zip(channel.tolist(), value.tolist())):
        if n[c] >= 2:
            out[i] = (x - mean[c]) / np.sqrt(m2[c] / (n[c] - 1))
        n[c] += 1
        d = x - mean[c]
        mean[c] += d / n[c]
        m2[c] += d * (x - mean[c])
    return out


@register_stage
class RunningStats(Stage):
    kind = "running_stats"
    Config = RunningStatsConfig

    @classmethod
    def inputs(cls, config: RunningStatsConfig) -> dict[str, str]:
        return {"in": SAMPLES.name}

    @classmethod
    def outputs(cls, config: RunningStatsConfig) -> dict[str, str]:
        return {"out": SCORED.name}

    def setup(self) -> None:
        c = self.config.channels
        self.n = np.zeros(c, dtype=np.int64)
        self.mean = np.zeros(c)
        self.m2 = np.zeros(c)
        self.timers = 0

    def process(self, port: str, batch: pa.RecordBatch, header: Header) -> None:
        channel = batch.column("channel").to_numpy()
        if channel.size and (channel.min() < 0 or channel.max() >= self.config.channels):
            raise ValueError(f"channel out of range [0, {self.config.channels}) in {header.producer} seq {header.seq}")
        value = batch.column("value").to_numpy()
        score = welford_scores(channel, value, self.n, self.mean, self.m2)
        out = pa.RecordBatch.from_arrays(
            [batch.column("event"), batch.column("channel"), batch.column("value"), pa.array(score)],
            schema=SCORED.schema,
        )
        self.emit("out", out, header.t0_ns, header.t1_ns)

    def timer_period_ns(self) -> int:
        return int(self.config.summary_ms * 1e6)

    def on_timer(self, t_ns: int) -> None:
        self.timers += 1
        self.log.debug("t=%d ns: samples per channel %s", t_ns, self.n.tolist())

    def summary(self) -> dict:
        return {"samples": int(self.n.sum()), "timers": self.timers, "mean": [round(float(m), 6) for m in self.mean]}
