"""``synthetic``: a seeded source of detector-like samples, paced by event time.

Message ``k`` covers event time [k*period, (k+1)*period) and holds ``rows`` samples: for each
row a channel ``c`` (cycling through ``channels``) and a value drawn from N(mu_c, sigma_c) with
mu_c = 10 + c and sigma_c = 1 + 0.1 c, from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from streamcal.config import Config
from streamcal.schemas import register_schema
from streamcal.stage import Source, register_stage

__all__ = ["SyntheticConfig", "SyntheticSource", "SAMPLES", "synthetic_batch"]

SAMPLES = register_schema(
    "demo.samples",
    pa.schema(
        [
            pa.field("event", pa.int64(), nullable=False),
            pa.field("channel", pa.int32(), nullable=False),
            pa.field("value", pa.float64(), nullable=False),
        ]
    ),
    doc="Detector-like samples: one row per (event, channel) measurement.",
    finite=("value",),
)


@dataclass(frozen=True)
class SyntheticConfig(Config):
    messages: int = 200
    rows: int = 64
    channels: int = 8
    period_ms: float = 10.0
    speed: float = 0.0  # 1.0: real time; 0: as fast as possible
    seed: int = 0
    start_ns: int = 0  # event time of the first message

    def validate(self) -> None:
        if self.messages < 0:
            self.fail("messages", f"must be >= 0, got {self.messages}")
        if self.rows < 1:
            self.fail("rows", f"must be >= 1, got {self.rows}")
        if self.channels < 1:
            self.fail("channels", f"must be >= 1, got {self.channels}")
        if not self.period_ms > 0:
            self.fail("period_ms", f"must be > 0, got {self.period_ms}")
        if self.speed < 0:
            self.fail("speed", f"must be >= 0 (0: as fast as possible), got {self.speed}")


def synthetic_batch(cfg: SyntheticConfig, k: int, rng: np.random.Generator) -> pa.RecordBatch:
    """Message ``k`` of the stream (draws ``cfg.rows`` normals from ``rng``)."""
    idx = np.arange(cfg.rows, dtype=np.int64) + k * cfg.rows
    channel = (idx % cfg.channels).astype(np.int32)
    value = rng.normal(10.0 + channel, 1.0 + 0.1 * channel)
    return pa.RecordBatch.from_arrays(
        [pa.array(idx), pa.array(channel), pa.array(value)], schema=SAMPLES.schema
    )


@register_stage
class SyntheticSource(Source):
    kind = "synthetic"
    Config = SyntheticConfig

    @classmethod
    def outputs(cls, config: SyntheticConfig) -> dict[str, str]:
        return {"out": SAMPLES.name}

    def generate(self) -> Iterator[None]:
        cfg: SyntheticConfig = self.config
        rng = np.random.default_rng([cfg.seed, self.ctx.replica])
        period = int(round(cfg.period_ms * 1e6))
        for k in range(cfg.messages):
            t0 = cfg.start_ns + k * period
            self.pace(t0 + period, cfg.speed)
            self.emit("out", synthetic_batch(cfg, k, rng), t0, t0 + period)
            yield
