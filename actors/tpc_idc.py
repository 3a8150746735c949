"""``tpc_idc``: the TPC's integrated digital currents, simulated live, one message per 1 ms interval.

The simulation is :class:`~streamcal.detectors.tpc.live.LiveTPC` (the same physics and statistics
as the training set). Event time is the wall clock (``clock: wall``, for live runs and latency
figures) or starts at 0 (``clock: zero``, reproducible). ``skip_every: N`` withholds every Nth
interval (a lost IDC slice, for drills); withheld intervals are counted in the summary.
To replay a recorded IDC stream instead, use the ``replay`` stage on a recording of this one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa

from streamcal.config import Config
from streamcal.detectors.tpc.constants import parse_grid
from streamcal.detectors.tpc.density import DensityConfig
from streamcal.detectors.tpc.streams import idc_schema
from streamcal.schemas import tensor_column
from streamcal.stage import Source, register_stage

__all__ = ["TPCIDCConfig", "TPCIDCSource"]


@dataclass(frozen=True)
class TPCIDCConfig(Config):
    grid: str = "90x17x17"
    intervals: int = 1000  # how many 1 ms intervals to produce (1000 = 1 s)
    rate_hz: float = 50_000.0  # interaction rate
    epsilon: float = 10.0  # gain x IBF
    speed: float = 1.0  # 1.0: real time (1 kHz); 0: as fast as possible
    clock: Literal["wall", "zero"] = "wall"
    seed: int = 0
    skip_every: int = 0  # withhold every Nth interval (0: never)

    def validate(self) -> None:
        try:
            parse_grid(self.grid)
        except (ValueError, TypeError) as exc:
            self.fail("grid", str(exc))
        if self.intervals < 0:
            self.fail("intervals", f"must be >= 0, got {self.intervals}")
        if self.rate_hz < 0:
            self.fail("rate_hz", f"must be >= 0 Hz, got {self.rate_hz}")
        if not self.epsilon > 0:
            self.fail("epsilon", f"must be > 0, got {self.epsilon}")
        if self.speed < 0:
            self.fail("speed", f"must be >= 0 (0: as fast as possible), got {self.speed}")
        if self.skip_every < 0:
            self.fail("skip_every", f"must be >= 0 (0: never), got {self.skip_every}")


@register_stage
class TPCIDCSource(Source):
    kind = "tpc_idc"
    Config = TPCIDCConfig

    @classmethod
    def outputs(cls, config: TPCIDCConfig) -> dict[str, str]:
        return {"out": idc_schema(config.grid).name}

    def setup(self) -> None:
        from streamcal.detectors.tpc.live import LiveTPC

        cfg: TPCIDCConfig = self.config
        self.live = LiveTPC(cfg.grid, DensityConfig(rate_hz=cfg.rate_hz, epsilon=cfg.epsilon),
                            seed=np.random.SeedSequence([cfg.seed, self.ctx.replica]))
        self.schema = idc_schema(cfg.grid).schema
        self.withheld = 0

    def generate(self) -> Iterator[None]:
        cfg: TPCIDCConfig = self.config
        dt = int(round(self.live.config.time_bin * 1e9))
        start = time.time_ns() if cfg.clock == "wall" else 0
        for k in range(cfg.intervals):
            idc2, idc1 = self.live.step()
            t0 = start + k * dt
            self.pace(t0 + dt, cfg.speed)
            if cfg.skip_every and (k + 1) % cfg.skip_every == 0:
                self.withheld += 1
                yield
                continue
            batch = pa.RecordBatch.from_arrays(
                [pa.array([k], pa.int64()), pa.array([idc1], pa.float64()),
                 tensor_column(idc2[None].astype(np.float32))],
                schema=self.schema,
            )
            self.emit("out", batch, t0, t0 + dt)
            yield

    def summary(self) -> dict:
        return {"intervals": self.live.steps, "withheld": self.withheld}
