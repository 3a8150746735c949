"""``tpc_sc3d``: the 3D space-charge correction per 10 ms time frame (asynchronous reconstruction).

Keeps the 2D IDC maps of the last ion drift time (the 3D IDC history) and, at the end of each
frame, rebuilds the density in the drift volume from them
(:func:`~streamcal.detectors.tpc.density.density_from_readout`), then predicts the correction
fluctuation (dr, drphi, dz in cm):

* ``method: model``: a trained 3D U-Net (``checkpoint``) on the average density and the density
  fluctuation; a residual model also takes the 1D correction of the same frame (input ``pre``,
  from ``tpc_sc1d``), frames wait for it. That input is the phi-independent (3, nr, nz) map of
  ``tpc.correction_rz/{grid}`` (``pre_payload: compact``, what ``tpc_sc1d`` publishes by default),
  broadcast over phi here, or the full map of ``tpc.correction/{grid}`` (``pre_payload: full``,
  for a ``tpc_sc1d`` with ``payload: full``); graph validation refuses a graph whose two settings differ;
* ``method: numerical``: the ground truth (Poisson solve + Langevin corrections), the slow
  reference.

Frames are predicted in batches of up to ``batch`` (throughput) and at the latest when
``max_wait_frames`` further frames have started (latency). Until the history holds a full drift
time, frames are marked ``degraded``; gaps in the IDC intervals too (filled with the last map).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from streamcal.config import Config
from streamcal.detectors.tpc.constants import parse_grid
from streamcal.detectors.tpc.streams import IntervalRing, correction_rz_schema, correction_schema, idc_schema
from streamcal.schemas import tensor_column, tensor_to_numpy
from streamcal.stage import Stage, register_stage
from streamcal.wire import Header

__all__ = ["TPCSC3DConfig", "TPCSC3D"]


@dataclass(frozen=True)
class TPCSC3DConfig(Config):
    grid: str = "90x17x17"
    method: Literal["model", "numerical"] = "model"
    checkpoint: str = ""
    device: str = "auto"  # auto: CUDA where there is one
    frame_intervals: int = 10
    batch: int = 8  # frames per inference call
    max_wait_frames: int = 8  # a queued frame is predicted at the latest this many frames later
    residual_input: bool = False  # wire the 1D correction on input 'pre' (residual models need it)
    pre_payload: Literal["compact", "full"] = "compact"  # the 1D correction's schema on 'pre' (module doc)

    def validate(self) -> None:
        try:
            parse_grid(self.grid)
        except (ValueError, TypeError) as exc:
            self.fail("grid", str(exc))
        if self.method == "model" and not self.checkpoint:
            self.fail("checkpoint", "method 'model' needs a checkpoint file")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            self.fail("device", f"must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        for name in ("frame_intervals", "batch", "max_wait_frames"):
            if getattr(self, name) < 1:
                self.fail(name, f"must be >= 1, got {getattr(self, name)}")


@register_stage
class TPCSC3D(Stage):
    kind = "tpc_sc3d"
    Config = TPCSC3DConfig

    @classmethod
    def inputs(cls, config: TPCSC3DConfig) -> dict[str, str]:
        ports = {"idc": idc_schema(config.grid).name}
        if config.residual_input:
            schema = correction_rz_schema if config.pre_payload == "compact" else correction_schema
            ports["pre"] = schema(config.grid).name
        return ports

    @classmethod
    def outputs(cls, config: TPCSC3DConfig) -> dict[str, str]:
        return {"out": correction_schema(config.grid).name}

    def setup(self) -> None:
        from streamcal.detectors.tpc.density import average_density
        from streamcal.detectors.tpc.live import LiveTPC

        cfg: TPCSC3DConfig = self.config
        self.grid = parse_grid(cfg.grid)
        self.schema = correction_schema(cfg.grid).schema
        self.live = LiveTPC(self.grid, warm=False)  # constants: readout <-> IDC, drift time
        self.n_t = self.live.n_t
        self.ring = IntervalRing(self.n_t, (self.grid.nphi, self.grid.nr))  # readout signal per interval
        self.average = average_density(self.grid, self.live.config)
        self.queue: list[dict] = []  # frames waiting for inference
        self.pre: dict[int, np.ndarray] = {}  # 1D corrections by frame: (3, nr, nz) compact, (3, nphi, nr, nz) full
        self.frames = self.degraded = self.out_of_order = self.missing = 0
        self.infer_ns: list[tuple[int, int]] = []  # (frames, ns) per call
        self.corrector = None
        if cfg.method == "model":
            from streamcal.detectors.tpc.tasks import load_corrector

            device = cfg.device
            if device == "auto":
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                self.corrector = load_corrector(cfg.checkpoint, device=device, task="sc3d", grid=self.grid)
            except ValueError as exc:
                self.fail_setup(str(exc))
            if self.corrector.needs_precorrection and not cfg.residual_input:
                self.fail_setup("this residual 3D model needs the 1D correction: set residual_input: true and wire 'pre'")
        else:
            from streamcal.detectors.tpc.streams import average_correction

            self.avg_correction = average_correction(self.grid, self.live.config)

    def fail_setup(self, msg: str) -> None:
        from streamcal.errors import ConfigError

        raise ConfigError(f"stage '{self.ctx.stage}'", "checkpoint", msg)

    def process(self, port: str, batch: pa.RecordBatch, header: Header) -> None:
        if port == "pre":
            for f, c in zip(batch.column("frame").to_pylist(), tensor_to_numpy(batch.column("correction"))):
                self.pre[f] = np.array(c)  # a copy: the message's buffer (shared memory) is released now
            self._flush(force=False)
            return
        cfg: TPCSC3DConfig = self.config
        maps = tensor_to_numpy(batch.column("idc2d"))
        dt = (header.t1_ns - header.t0_ns) // max(batch.num_rows, 1)
        for i, k in enumerate(batch.column("interval").to_pylist()):
            gap = self.ring.put(k, self.live.readout_from_idc(maps[i]))
            if gap < 0:
                self.out_of_order += 1
                self.metrics.inputs[port].rejects["out_of_order"] += 1
                continue
            self.missing += gap
            if (k + 1) % cfg.frame_intervals == 0:
                t1 = header.t0_ns + (i + 1) * dt
                self._enqueue(k // cfg.frame_intervals, t1 - cfg.frame_intervals * dt, t1, header.sent_ns)
        self._flush(force=False)

    def _enqueue(self, frame: int, t0: int, t1: int, sent_ns: int) -> None:
        from streamcal.detectors.tpc.density import density_from_readout

        history = self.ring.ordered()
        if self.ring.seen < self.n_t:  # before one drift time: nothing drifted in earlier (degraded)
            history = np.concatenate([np.zeros((self.n_t - self.ring.seen, *history.shape[1:])), history])
        density = density_from_readout(history, self.grid, self.live.config)
        missing = self.ring.missing
        self.queue.append({"frame": frame, "t0": t0, "t1": t1, "sent": sent_ns, "density": density,
                           "missing": missing, "degraded": self.ring.seen < self.n_t or missing > 0})

    def _ready(self) -> list[dict]:
        """Frames that can be predicted now (residual models: those whose 1D correction arrived)."""
        if self.corrector is not None and self.corrector.needs_precorrection:
            return [q for q in self.queue if q["frame"] in self.pre]
        return list(self.queue)

    def _flush(self, *, force: bool) -> None:
        cfg: TPCSC3DConfig = self.config
        while True:
            ready = self._ready()
            if not ready:
                return
            newest = self.queue[-1]["frame"]
            if not force and len(ready) < cfg.batch and newest - ready[0]["frame"] < cfg.max_wait_frames:
                return
            self._predict(ready[: cfg.batch])

    def _predict(self, items: list[dict]) -> None:
        t = time.perf_counter_ns()
        dens = np.stack([q["density"] for q in items])  # (B, nphi, nr, nz)
        if self.corrector is None:
            import torch

            from streamcal.detectors.tpc.langevin import space_charge_distortions

            corr = space_charge_distortions(torch.as_tensor(dens), self.grid, corrections=True).correction.numpy()
            out = (corr - self.avg_correction[None]).astype(np.float32)
        else:
            avg = np.broadcast_to(self.average, dens.shape)
            # (B, 3, nr, nz) compact, broadcast over phi by the corrector, or (B, 3, nphi, nr, nz)
            pre = np.stack([self.pre.pop(q["frame"]) for q in items]) if self.corrector.needs_precorrection else None
            out = self.corrector.predict_batch(avg, dens - avg, pre)
        self.infer_ns.append((len(items), time.perf_counter_ns() - t))
        method = "numerical" if self.corrector is None else "sc3d"
        for q, c in zip(items, out):
            batch = pa.RecordBatch.from_arrays(
                [pa.array([q["frame"]], pa.int64()), tensor_column(c[None]), pa.array([self.config.frame_intervals], pa.int32()),
                 pa.array([q["missing"]], pa.int32()), pa.array([q["degraded"]], pa.bool_()), pa.array([method])],
                schema=self.schema,
            )
            self.emit("out", batch, q["t0"], q["t1"], extra={"trigger_sent_ns": q["sent"]})
            self.frames += 1
            self.degraded += int(q["degraded"])
        done = {q["frame"] for q in items}
        self.queue = [q for q in self.queue if q["frame"] not in done]
        # 1D corrections of frames that will never come (older than everything queued) are dropped
        oldest = self.queue[0]["frame"] if self.queue else (self.ring.last or 0) // self.config.frame_intervals
        for f in [f for f in self.pre if f < oldest - self.config.max_wait_frames]:
            del self.pre[f]

    def finish(self) -> None:
        self._flush(force=True)
        if self.queue:  # residual model, 1D correction never came: predict is impossible, say so
            self.log.error("stage '%s': %d frame(s) never got their 1D correction and were not corrected",
                           self.ctx.stage, len(self.queue))

    def summary(self) -> dict:
        frames = sum(n for n, _ in self.infer_ns)
        ns = sum(t for _, t in self.infer_ns)
        return {"frames": self.frames, "degraded": self.degraded, "out_of_order": self.out_of_order,
                "missing_intervals": self.missing, "inference_calls": len(self.infer_ns),
                "inference_frames_per_s": round(frames / (ns / 1e9), 2) if ns else None,
                "not_corrected": len(self.queue)}
