"""``tpc_sc1d``: the 1D space-charge correction, one correction per 10 ms time frame.

Keeps the 1D IDCs of the last ion drift time (200 intervals) and, when the last interval of a
frame arrives, publishes the frame's correction fluctuation (dr, drphi, dz in cm on the grid):

* ``method: linear``: the production baseline, the average correction scaled by the relative
  1D IDC change (:func:`~streamcal.detectors.tpc.tasks.linear_scaler`);
* ``method: model``: a trained 1D model (``checkpoint``).

Both corrections are the same at every phi (the 1D IDCs carry no phi information; the linear
scaler scales the nominal average correction, which is azimuthally symmetric), so by default
(``payload: compact``) a frame's correction is published as the (3, nr, nz) map of schema
``tpc.correction_rz/{grid}``, to be broadcast over phi by the reader: nphi times fewer values
than the (3, nphi, nr, nz) map of ``tpc.correction/{grid}`` that ``payload: full`` publishes
(4.6 kB instead of 313 kB per frame at 90x17x17, 14 kB instead of 2.35 MB at 180x33x33).
``payload: full`` is the choice for a model trained with ``use_phi``, whose correction depends on
phi; ``compact`` refuses such a model at setup.

Latency (the frame's last interval in, its correction out: the synchronous reconstruction path).
Between frames the process mostly sleeps, and the first computation after 10 ms of sleep runs with
cold caches, several times slower than warm. With ``prewarm`` (default) the stage therefore runs
the frame's computation once more, and throws it away, when the interval before the frame's last
arrives: measured on 2 cores at 90x17x17 (``scripts/bench_tpc_live.py``), the correction then takes
0.12 instead of 0.22 ms (median) after the last interval, for about 0.2 ms of CPU per frame (2 % of
one core). A trained model runs through
:meth:`~streamcal.detectors.tpc.tasks.SC1DCorrector.live_predictor` (the per-frame work folded
into a few matrix products), and the output batch is assembled from cached parts.

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
from streamcal.detectors.tpc.streams import (
    IntervalRing,
    average_correction,
    correction_rz_schema,
    correction_schema,
    idc_schema,
)
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
    payload: Literal["compact", "full"] = "compact"  # compact: (3, nr, nz), the same at every phi (module doc)
    prewarm: bool = True  # compute once more, discarded, one interval before a frame's last (module doc)

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
        schema = correction_rz_schema if config.payload == "compact" else correction_schema
        return {"out": schema(config.grid).name}

    def setup(self) -> None:
        from streamcal.errors import ConfigError

        cfg: TPCSC1DConfig = self.config
        self.grid = parse_grid(cfg.grid)
        compact = cfg.payload == "compact"
        self.schema = (correction_rz_schema if compact else correction_schema)(cfg.grid).schema
        self.ring = IntervalRing(cfg.history, fill=1.0)  # the 1D IDCs of the last drift time
        self.frame: int | None = None  # frame of the last interval
        self.frame_slices = 0
        self.frame_t0 = 0
        self.last_sent_ns = 0
        self.frames = self.degraded = self.out_of_order = self.missing = 0
        self.compute_ns: list[int] = []
        where = f"stage '{self.ctx.stage}'"
        if cfg.method == "linear":
            from streamcal.detectors.tpc.tasks import linear_scaler

            avg = average_correction(self.grid).astype(np.float32)  # (3, nphi, nr, nz)
            if compact:
                # azimuthally symmetric (to float32 rounding): one phi node stands for all
                if not np.allclose(avg, avg[:, :1], rtol=1e-5, atol=1e-6 * float(np.abs(avg).max())):
                    raise ConfigError(where, "payload", "the average correction depends on phi: set payload: full")
                avg = np.ascontiguousarray(avg[:, 0])  # (3, nr, nz)
            self.avg = avg
            self.predict = lambda h: linear_scaler(self.avg, h)
        else:
            from streamcal.detectors.tpc.tasks import load_corrector

            try:
                corrector = load_corrector(cfg.checkpoint, task="sc1d", grid=self.grid)
            except ValueError as exc:
                raise ConfigError(where, "checkpoint", str(exc)) from None
            if compact and not corrector.phi_independent:
                raise ConfigError(where, "payload", f"the model in '{cfg.checkpoint}' depends on phi (model.use_phi): "
                                                    "its correction needs payload: full")
            # the per-frame fast path of a phi-independent network (SC1DCorrector.live_predictor)
            fast = corrector.live_predictor(cfg.history) if corrector.phi_independent else None
            if fast is None:  # none: the corrector's general path
                self.predict = (lambda h: corrector.predict_batch(h[None], broadcast=False)[0]) if compact \
                    else corrector.predict
            elif compact:
                self.predict = fast  # (3, nr, nz)
            else:  # the same numbers, broadcast over phi: (3, nphi, nr, nz)
                shape = (3, *self.grid.shape)
                self.predict = lambda h: np.ascontiguousarray(np.broadcast_to(fast(h)[:, None], shape))
        # the output batch, assembled per frame from cached parts (a frame is on the latency path)
        self._tensor_type = self.schema.field("correction").type
        self._tensor_size = int(np.prod(self._tensor_type.shape))
        # (slices, missing, degraded) -> their one-row columns and the method's (Arrow arrays are immutable:
        # shared by the batches); at most (frame_intervals + 1) (history + 1) 2 keys, a few in practice
        self._tails: dict[tuple[int, int, bool], list[pa.Array]] = {}
        self._method = pa.array([cfg.method], pa.utf8())
        # warm up: the first call of a model sets up its fixed per-voxel factors (a second or so)
        self._batch(0, self.predict(np.ones(cfg.history)), 0, 0, True)

    def _batch(self, frame: int, corr: np.ndarray, slices: int, missing: int, degraded: bool) -> pa.RecordBatch:
        """One row of the output schema, as ``tensor_column`` and ``pa.array`` would build it, in fewer
        and cheaper calls (they run once per frame on the latency path, mostly with cold caches)."""
        key = (slices, missing, bool(degraded))
        tail = self._tails.get(key)
        if tail is None:
            tail = self._tails[key] = [pa.array([slices], pa.int32()), pa.array([missing], pa.int32()),
                                       pa.array([key[2]], pa.bool_()), self._method]
        values = pa.array(np.ascontiguousarray(corr, dtype=np.float32).reshape(-1))  # zero-copy
        tensor = pa.ExtensionArray.from_storage(self._tensor_type, pa.FixedSizeListArray.from_arrays(values, self._tensor_size))
        return pa.RecordBatch.from_arrays([pa.array(np.array([frame], np.int64)), tensor, *tail], schema=self.schema)

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
            elif cfg.prewarm and (k + 2) % cfg.frame_intervals == 0:
                # one interval before the frame's last: the same computation, discarded, so that the
                # model and the code are in the caches when the last interval arrives (module doc)
                self._batch(f, self.predict(self._history()), 0, 0, True)

    def _history(self) -> np.ndarray:
        """The 1D IDCs of the last ``history`` intervals, oldest first."""
        cfg: TPCSC1DConfig = self.config
        n_seen = self.ring.seen
        history = self.ring.ordered()
        if n_seen < cfg.history:
            # the stream started less than one drift time ago: the earlier intervals are unknown,
            # taken as the mean of those seen, and the frame is marked degraded
            fill = float(history.mean()) if n_seen else 1.0
            history = np.concatenate([np.full(cfg.history - n_seen, fill), history])
        return history

    def _publish(self, frame: int, *, complete: bool) -> None:
        cfg: TPCSC1DConfig = self.config
        t = time.perf_counter_ns()
        n_seen = self.ring.seen
        history = self._history()
        missing = self.ring.missing
        degraded = (not complete) or missing > 0 or self.frame_slices < cfg.frame_intervals or n_seen < cfg.history
        batch = self._batch(frame, self.predict(history), self.frame_slices, missing, degraded)
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
