"""``tpc_sc1d``: the 1D space-charge correction, one correction per 10 ms time frame.

Keeps the 1D IDCs of the last ion drift time (200 intervals) and, when the last interval of a
frame arrives, publishes the frame's correction fluctuation (dr, drphi, dz in cm on the grid):

* ``method: linear``: the production baseline, the average correction scaled by the relative
  1D IDC change (:func:`~streamcal.detectors.tpc.tasks.linear_scaler`);
* ``method: model``: a trained 1D model (``checkpoint``).

Bad input: NaN or wrongly shaped slices are rejected at the edge (schema); an interval that is
not newer than the last one is rejected as ``out_of_order``; both are counted. A missing interval
(gap) is filled with the last value and the frames whose window contains it are marked
``degraded`` with the number missing, never silently corrected as if complete. A frame whose
last interval never arrives is published (degraded) as soon as a later frame starts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from streamcal.config import Config
from streamcal.detectors.tpc.constants import parse_grid
from streamcal.detectors.tpc.streams import IntervalRing, average_correction, correction_schema, idc_schema
from streamcal.schemas import tensor_column
from streamcal.stage import Stage, register_stage
from streamcal.wire import Header

__all__ = ["TPCSC1DConfig", "TPCSC1D"]

log = logging.getLogger("streamcal.tpc")


@dataclass(frozen=True)
class TPCSC1DConfig(Config):
    grid: str = "90x17x17"
    method: Literal["linear", "model"] = "linear"
    checkpoint: str = ""  # trained 1D model (method: model)
    frame_intervals: int = 10  # IDC intervals per time frame (10 x 1 ms)
    history: int = 200  # intervals of 1D IDC the correction uses (one ion drift time)

    def validate(self) -> None:
        try:
            parse_grid(self.grid)
        except (ValueError, TypeError) as exc:
            self.fail("grid", str(exc))
        if self.method == "model" and not self.checkpoint:
            self.fail("checkpoint", "method 'model' needs a checkpoint file")
        if self.frame_intervals < 1:
            self.fail("frame_intervals", f"must be >= 1, got {self.frame_intervals}")
        if self.history < 1:
            self.fail("history", f"must be >= 1, got {self.history}")


@register_stage
class TPCSC1D(Stage):
    kind = "tpc_sc1d"
    Config = TPCSC1DConfig

    @classmethod
    def inputs(cls, config: TPCSC1DConfig) -> dict[str, str]:
        return {"idc": idc_schema(config.grid).name}

    @classmethod
    def outputs(cls, config: TPCSC1DConfig) -> dict[str, str]:
        return {"out": correction_schema(config.grid).name}

    def setup(self) -> None:
        cfg: TPCSC1DConfig = self.config
        self.grid = parse_grid(cfg.grid)
        self.schema = correction_schema(cfg.grid).schema
        self.ring = IntervalRing(cfg.history, fill=1.0)  # the 1D IDCs of the last drift time
        self.frame: int | None = None  # frame of the last interval
        self.frame_slices = 0
        self.frame_t0 = 0
        self.last_sent_ns = 0
        self.frames = self.degraded = self.out_of_order = self.missing = 0
        self.compute_ns: list[int] = []
        if cfg.method == "linear":
            from streamcal.detectors.tpc.tasks import linear_scaler

            self.avg = average_correction(self.grid).astype(np.float32)
            self.predict = lambda h: linear_scaler(self.avg, h)
        else:
            from streamcal.detectors.tpc.tasks import load_corrector

            from streamcal.errors import ConfigError

            try:
                corrector = load_corrector(cfg.checkpoint, task="sc1d", grid=self.grid)
            except ValueError as exc:
                raise ConfigError(f"stage '{self.ctx.stage}'", "checkpoint", str(exc)) from None
            self.predict = corrector.predict

    def process(self, port: str, batch: pa.RecordBatch, header: Header) -> None:
        cfg: TPCSC1DConfig = self.config
        intervals = batch.column("interval").to_numpy()
        values = batch.column("idc1d").to_numpy()
        dt = (header.t1_ns - header.t0_ns) // max(len(intervals), 1)
        for i, (k, v) in enumerate(zip(intervals.tolist(), values.tolist())):
            if self.ring.last is not None and k <= self.ring.last:
                self.out_of_order += 1
                self.metrics.inputs[port].rejects["out_of_order"] += 1
                log.warning("%s: IDC interval %d after %d rejected (out of order)", self.ctx.producer, k, self.ring.last)
                continue
            f = k // cfg.frame_intervals
            if self.frame is not None and f != self.frame:
                # the previous frame's last interval never came: publish it, degraded
                self._publish(self.frame, complete=False)
            self.missing += self.ring.put(k, v)
            if self.frame != f:
                self.frame, self.frame_slices = f, 0
                self.frame_t0 = header.t0_ns + i * dt - (k % cfg.frame_intervals) * dt
            self.frame_slices += 1
            self.frame_dt = dt
            self.last_sent_ns = header.sent_ns
            if (k + 1) % cfg.frame_intervals == 0:
                self._publish(f, complete=True)

    def _publish(self, frame: int, *, complete: bool) -> None:
        cfg: TPCSC1DConfig = self.config
        t = time.perf_counter_ns()
        n_seen = self.ring.seen
        history = self.ring.ordered()
        if n_seen < cfg.history:
            # the stream started less than one drift time ago: the earlier intervals are unknown,
            # taken as the mean of those seen, and the frame is marked degraded
            fill = float(history.mean()) if n_seen else 1.0
            history = np.concatenate([np.full(cfg.history - n_seen, fill), history])
        missing = self.ring.missing
        degraded = (not complete) or missing > 0 or self.frame_slices < cfg.frame_intervals or n_seen < cfg.history
        corr = np.asarray(self.predict(history), dtype=np.float32)
        batch = pa.RecordBatch.from_arrays(
            [pa.array([frame], pa.int64()), tensor_column(corr[None]), pa.array([self.frame_slices], pa.int32()),
             pa.array([missing], pa.int32()), pa.array([degraded], pa.bool_()), pa.array([cfg.method])],
            schema=self.schema,
        )
        self.compute_ns.append(time.perf_counter_ns() - t)
        t0 = self.frame_t0
        self.emit("out", batch, t0, t0 + cfg.frame_intervals * getattr(self, "frame_dt", 1_000_000),
                  extra={"trigger_sent_ns": self.last_sent_ns})
        self.frames += 1
        self.degraded += int(degraded)
        self.frame = None

    def finish(self) -> None:
        if self.frame is not None:
            self._publish(self.frame, complete=False)

    def summary(self) -> dict:
        c = np.array(self.compute_ns or [0]) / 1e6
        return {"frames": self.frames, "degraded": self.degraded, "out_of_order": self.out_of_order,
                "missing_intervals": self.missing, "compute_p50_ms": round(float(np.percentile(c, 50)), 3),
                "compute_p99_ms": round(float(np.percentile(c, 99)), 3)}
