"""``its_align``: ITS2 track-based alignment workers that average their constants every tau steps.

The seed's "Scalable Training via Parallelization": M worker replicas, each fed its own partition
of the hit stream (``its_tracks`` with ``partitions``), each optimising its own copy of Theta
(``models/its_alignment.py``, steps of ``streamcal.detectors.its.align``), and every ``tau`` steps
all of them replace their copy by ``Theta = sum_m mu_m Theta_m / sum_m mu_m``, ``mu_m`` the tracks
worker m used since the previous synchronisation (its partition's size). The sum is one
``torch.distributed`` all-reduce over the replicas' process group (gloo on CPU, NCCL on GPU;
:mod:`streamcal.group`), of ``[mu_m Theta_m, mu_m, active, cost, events, steps]``.

Steps. One received message is one step (a mini-batch of tracks): hits are checked and packed
(bad hits and tracks rejected and counted, never in the cost), the cost gradient is mapped to
Theta and the optimiser steps: ``gn`` (default) preconditions by the per-sensor Gauss-Newton
blocks accumulated over the data seen, with the stochastic-approximation step ``n_b / N_seen``
(recursive least squares: after one pass each worker holds the least-squares estimate of its
partition, to first order); ``sgd`` is the seed's rule with fixed rates; ``adam``. Epoch 1 runs
on the live stream. Each message is spooled twice: the hits as received to an Arrow IPC file
(``*.arrows``, for ``streamcal its refine`` and ``its export-mille``), and the packed tracks with
the cost's layout of them (``align.write_tracks``, ``*.tracks``, ~440 bytes per track in float32;
~160 without the layout, ``spool_layout: false``), which epochs 2.. replay without packing or
laying out again. Memory stays bounded: the first ``cache_mb`` of packed tracks are kept in
memory, the rest is read back a record at a time.

End of an epoch. A worker whose data has ended keeps taking part in the synchronisations with
``mu = 0, active = 0`` until every worker is inactive in the same all-reduce, so all leave the
epoch together whatever their partition sizes.

Outputs. After every ``publish_every``-th synchronisation replica 0 publishes the constants
(schema ``its.alignment``: sensor id and Theta) on ``out`` (make it latest-only and/or store it
with ``calib_store``), and at the end writes ``theta.npy``, ``metrics.jsonl`` (cost per
synchronisation and per epoch) and ``run.json`` into ``run_dir`` (``streamcal evaluate align``).

Failures. At every synchronisation replica 0 stores the averaged Theta and the epoch and count
in the group's store, and each replica its own position. A replica that dies is restarted by
Ray; it restores that checkpoint, the survivors' next all-reduce fails, the group re-forms with
the restarted replica and the all-reduce is repeated; the run completes. What the dead replica
had received since its last synchronisation is lost (counted by the runtime as lost messages).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from streamcal.actors.its_tracks import ITS_HITS, GeometrySpec
from streamcal.config import Config
from streamcal.detectors.its.align import (
    Constraints,
    OptimizerConfig,
    RejectCounts,
    ThetaOptimizer,
    hessian_blocks,
    pack_tracks,
    read_tracks,
    sgd_rates,
    theta_gradient,
    write_tracks,
)
from streamcal.detectors.its.misalignment import RIGID_MODES, WEAK_MODES
from streamcal.group import ReplicaGroup
from streamcal.models.its_alignment import ITSAlignmentConfig, ITSAlignmentModel
from streamcal.schemas import register_schema
from streamcal.stage import Stage, register_stage
from streamcal.wire import Header

__all__ = ["ModelSpec", "OptimizerSpec", "ITSAlignConfig", "ITSAlignWorker", "ITS_ALIGNMENT", "constants_batch"]

ITS_ALIGNMENT = register_schema(
    "its.alignment",
    pa.schema(
        [
            pa.field("sensor", pa.int32(), nullable=False),
            pa.field("alpha", pa.float64(), nullable=False),
            pa.field("beta", pa.float64(), nullable=False),
            pa.field("gamma", pa.float64(), nullable=False),
            pa.field("tau1", pa.float64(), nullable=False),
            pa.field("tau2", pa.float64(), nullable=False),
            pa.field("tau3", pa.float64(), nullable=False),
        ]
    ),
    doc="ITS alignment constants, one row per sensor: Theta = (alpha, beta, gamma) rad, ALICE Euler "
    "convention, and (tau1, tau2, tau3) mm: the global delta transformation g = a_R (R_GEOM l + T_GEOM) + a_T.",
    finite=("alpha", "beta", "gamma", "tau1", "tau2", "tau3"),
)


@dataclass(frozen=True)
class ModelSpec(Config):
    """The cost's settings (``ITSAlignmentConfig``)."""

    sigma_u: float = 0.005  # mm
    sigma_v: float = 0.005
    b_field: float = 0.5  # T
    vertex: Literal["given", "fit", "none"] = "given"
    sigma_vertex_xy: float = 0.015  # mm
    sigma_vertex_z: float = 0.02
    multiple_scattering: bool = True
    precision: Literal["float64", "float32"] = "float64"

    def validate(self) -> None:
        try:
            self.config()
        except ValueError as exc:
            self.fail("(values)", str(exc))

    def config(self) -> ITSAlignmentConfig:
        return ITSAlignmentConfig(**asdict(self))


@dataclass(frozen=True)
class OptimizerSpec(Config):
    """Theta-space optimiser (``OptimizerConfig``)."""

    method: Literal["gn", "sgd", "adam"] = "gn"
    lr: float = 1.0  # gn: the dimensionless step, in (0, 2)
    # sgd, adam: rates of the angles and of the translations; sgd with 0: the largest stable rates
    # for the data seen (align.sgd_rates on the Gauss-Newton blocks), updated during epoch 1
    lr_rot: float = 0.0
    lr_trans: float = 0.0
    damping: float = 1e-2  # gn: relative Levenberg damping of the blocks (keeps steps along barely measured directions small)
    # relative to all sensors' mean diagonal per DoF, or to each sensor's own (Marquardt; measured on the full ITS2
    # with 1M events: outer-barrel chips then drift along flat directions of the cost)
    damping_scale: Literal["global", "sensor"] = "global"
    # gn: "stochastic" scales each step by n_b / N (events of the batch / events seen so far, or in
    # the worker's whole partition from epoch 2 on); "constant": lr on every batch
    schedule: Literal["stochastic", "constant"] = "stochastic"
    # heavy-ball extrapolation between epochs: Theta_e += momentum (Theta_e - Theta_e-1)
    momentum: float = 0.0

    @property
    def auto_rates(self) -> bool:
        return self.method == "sgd" and (self.lr_rot <= 0 or self.lr_trans <= 0)

    def validate(self) -> None:
        if self.method == "adam" and (self.lr_rot <= 0 or self.lr_trans <= 0):
            self.fail("lr_rot", "adam needs positive lr_rot and lr_trans")
        if self.lr_rot < 0 or self.lr_trans < 0:
            self.fail("lr_rot", f"rates must be >= 0 (0: automatic for sgd), got {self.lr_rot}, {self.lr_trans}")
        if not 0.0 <= self.momentum < 1.0:
            self.fail("momentum", f"must be in [0, 1), got {self.momentum}")
        try:
            self.config()
        except ValueError as exc:
            self.fail("(values)", str(exc))

    def config(self) -> OptimizerConfig:
        return OptimizerConfig(method=self.method, lr=self.lr, lr_rot=self.lr_rot or 1.0, lr_trans=self.lr_trans or 1.0,
                               damping=self.damping, damping_scale=self.damping_scale)


@dataclass(frozen=True)
class ITSAlignConfig(Config):
    geometry: GeometrySpec = field(default_factory=GeometrySpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    tau: int = 5  # steps between synchronisations
    epochs: int = 3  # epoch 1 on the live stream, the others replay the spool
    constrain_modes: tuple[str, ...] = ("rz",)  # global modes held at zero (Q^T Theta = 0)
    fixed_layers: tuple[int, ...] = ()  # layers whose sensors stay at Theta = 0 (reference)
    min_hits: int = 4  # tracks with fewer valid hits are rejected
    publish_every: int = 1  # publish the constants after every N-th synchronisation
    run_dir: str = ""  # theta.npy, metrics.jsonl, run.json (replica 0); "" = nowhere
    spool_dir: str = ""  # where epoch 1's data is kept for the next epochs; "" = run_dir/spool or a temp dir
    backend: Literal["gloo", "nccl", "auto"] = "gloo"
    group_timeout_s: float = 120.0  # how long a synchronisation waits for a worker
    threads: int = 0  # torch threads per worker (0: torch's default)
    cache_mb: float = 1024.0  # packed tracks kept in memory for the replayed epochs (the rest is read from the spool)
    # store the cost's layout of the tracks in the spool (~440 bytes per track in float32; the replayed
    # epochs then skip building it, ~35 ms per 4000-event message), or the tracks only (~160 bytes per track)
    spool_layout: bool = True

    def validate(self) -> None:
        if self.tau < 1:
            self.fail("tau", f"must be >= 1, got {self.tau}")
        if self.epochs < 1:
            self.fail("epochs", f"must be >= 1, got {self.epochs}")
        for m in self.constrain_modes:
            if m not in WEAK_MODES + RIGID_MODES:
                self.fail("constrain_modes", f"unknown mode {m!r}; known: {', '.join(WEAK_MODES + RIGID_MODES)}")
        if self.fixed_layers and (min(self.fixed_layers) < 0 or max(self.fixed_layers) >= self.geometry.layers):
            self.fail("fixed_layers", f"must be layer indices in 0..{self.geometry.layers - 1}, got {list(self.fixed_layers)}")
        if self.min_hits < 3:
            self.fail("min_hits", f"must be >= 3 (5 track parameters), got {self.min_hits}")
        if self.publish_every < 1:
            self.fail("publish_every", f"must be >= 1, got {self.publish_every}")
        if not self.group_timeout_s > 0:
            self.fail("group_timeout_s", f"must be > 0, got {self.group_timeout_s}")
        if self.threads < 0:
            self.fail("threads", f"must be >= 0, got {self.threads}")
        if self.cache_mb < 0:
            self.fail("cache_mb", f"must be >= 0 (0: read every replayed batch from the spool), got {self.cache_mb}")


def constants_batch(theta: np.ndarray) -> pa.RecordBatch:
    """Theta (N, 6) as an ``its.alignment`` record batch."""
    theta = np.asarray(theta, dtype=np.float64)
    cols = [pa.array(np.arange(theta.shape[0], dtype=np.int32))] + [pa.array(theta[:, k]) for k in range(6)]
    return pa.RecordBatch.from_arrays(cols, schema=ITS_ALIGNMENT.schema)


def _tensor_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _from_bytes(blob: bytes | None) -> dict[str, np.ndarray] | None:
    if blob is None:
        return None
    with np.load(io.BytesIO(blob)) as z:
        return {k: z[k] for k in z.files}


@register_stage
class ITSAlignWorker(Stage):
    kind = "its_align"
    Config = ITSAlignConfig
    PROCESS_GROUP = True

    @classmethod
    def inputs(cls, config: ITSAlignConfig) -> dict[str, str]:
        return {"hits": ITS_HITS.name}

    @classmethod
    def outputs(cls, config: ITSAlignConfig) -> dict[str, str]:
        return {"out": ITS_ALIGNMENT.name}

    # ------------------------------------------------------------------ set-up and restore
    def setup(self) -> None:
        cfg: ITSAlignConfig = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.geom = cfg.geometry.build()
        self.model = ITSAlignmentModel.from_geometry(self.geom, cfg.model.config())
        fixed = np.flatnonzero(np.isin(self.geom.layer, np.asarray(cfg.fixed_layers, dtype=np.int64)))
        self.constraints = Constraints.build(self.geom, modes=cfg.constrain_modes, fixed=fixed)
        self.opt = ThetaOptimizer(cfg.optimizer.config(), self.constraints)
        self.group = ReplicaGroup(self.ctx.group_store, self.ctx.replica, self.ctx.replicas,
                                  backend=cfg.backend, timeout_s=cfg.group_timeout_s)
        n = self.geom.n_sensors
        self.with_vertex = cfg.model.vertex == "given"
        self.epoch = 1
        self.syncs = 0
        self.steps = 0  # steps of this replica (this incarnation)
        self.pos = 0  # spooled batches done in the current replay epoch
        self.events_seen = 0  # events of this partition seen in epoch 1 (the n_b / N schedule)
        self.blocks_sum = torch.zeros(n, 6, 6, dtype=torch.float64)
        self.blocks_events = 0
        self._since = dict(mu=0, cost=0.0, events=0, steps=0)
        self.epoch_totals = dict(cost=0.0, events=0.0)
        self.epoch_costs: list[dict[str, float]] = []
        self.rejects = RejectCounts()
        self.t_start = time.monotonic()
        self.t_range = [None, None]
        self.published = 0
        self.restored = False
        self._metrics = None
        if cfg.run_dir and self.ctx.replica == 0:  # one line per synchronisation, as it happens
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            self._metrics = open(Path(cfg.run_dir) / "metrics.jsonl", "a" if self.ctx.incarnation else "w")
        self._rebuild_blocks = False
        self._spooled = 0  # batches spooled by this incarnation
        self._packed: dict[tuple[int, int], Any] = {}  # (incarnation, index in its spool) -> TrackBatch
        self._packed_bytes = 0
        self._packed_tracks = 0
        self._from_spool = 0  # replayed batches read from the packed spool (beyond cache_mb)
        self._busy = 0.0  # seconds in _step during the current epoch
        self.busy_s: list[float] = []  # per epoch
        # the spool of epoch 1 (one file per incarnation, so a restarted replica keeps the data
        # its previous incarnation received)
        base = cfg.spool_dir or (str(Path(cfg.run_dir) / "spool") if cfg.run_dir else "")
        if not base:
            base = tempfile.mkdtemp(prefix="streamcal-its-spool-")
        self.spool_dir = Path(base)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        name = f"{self.ctx.stage}-{self.ctx.replica}.{self.ctx.incarnation}"
        self.spool_path = self.spool_dir / f"{name}.arrows"
        self.tracks_path = self.spool_dir / f"{name}.tracks"
        if self.ctx.incarnation == 0:
            for pattern in ("arrows", "tracks"):
                for old in self.spool_dir.glob(f"{self.ctx.stage}-{self.ctx.replica}.*.{pattern}"):
                    old.unlink()  # a previous run's data
        # the hits as received (``streamcal its refine`` and ``export-mille`` read them) and the
        # packed tracks the replayed epochs read (``align.write_tracks``)
        self._spool = pa.ipc.new_stream(str(self.spool_path), ITS_HITS.schema)
        self._tracks = open(self.tracks_path, "wb", buffering=1 << 20)
        if self.ctx.incarnation:
            self._restore()

    def _restore(self) -> None:
        """A restarted replica: Theta and the counts of the last synchronisation, and this
        replica's own position, from the group's store."""
        ck = _from_bytes(self.group.get("checkpoint"))
        mine = _from_bytes(self.group.get(f"replica/{self.ctx.replica}"))
        if ck is not None:
            self.model.set_theta(torch.from_numpy(ck["theta"]))
            self.epoch = int(ck["epoch"])
            self.syncs = int(ck["syncs"])
            self.epoch_totals = dict(cost=float(ck["epoch_cost"]), events=float(ck["epoch_events"]))
            self.restored = True
        if mine is not None:
            self.events_seen = int(mine["events_seen"])
            self.pos = int(mine["pos"])
        self.log.warning("restored from synchronisation %d (epoch %d, position %d)", self.syncs, self.epoch, self.pos)

    # ------------------------------------------------------------------ data
    def process(self, port: str, batch: pa.RecordBatch, header: Header) -> None:
        self._spool.write_batch(batch)
        lo, hi = self.t_range
        self.t_range = [header.t0_ns if lo is None else min(lo, header.t0_ns),
                        header.t1_ns if hi is None else max(hi, header.t1_ns)]
        self._step(batch, live=True, key=(self.ctx.incarnation, self._spooled))
        self._spooled += 1

    def _step(self, data: pa.RecordBatch | Any, live: bool, key: tuple[int, int] | None = None) -> None:
        """One step on ``data``: the hits as received (live) or, replayed, the TrackBatch read
        from the packed spool (None when the batch is in the cache)."""
        t_step = time.perf_counter()
        cfg: ITSAlignConfig = self.config
        tb = self._packed.get(key) if key is not None else None
        if tb is None and live:
            tb, cnt = pack_tracks(data, self.geom, min_hits=cfg.min_hits, with_vertex=self.with_vertex)
            self.rejects = self.rejects + cnt
            # keep the packed tracks (and the model's layout cached on them) for the next epochs,
            # within the memory budget; beyond it, later epochs read the packed spool
            size = sum(t.numel() * t.element_size() for t in (tb.sensor, tb.local, tb.mask, tb.event)) * 3
            if key is not None and self._packed_bytes + size <= cfg.cache_mb * 2**20:
                self._packed[key] = tb
                self._packed_bytes += size
                self._packed_tracks += tb.n_tracks
        elif tb is None:
            if data is None:
                raise RuntimeError(f"its_align: replayed batch {key} is neither cached nor read from the spool")
            tb = data
            self._from_spool += 1
        if tb.n_tracks:
            ev = tb.n_events
            gn = cfg.optimizer.method == "gn"
            need_blocks = gn or cfg.optimizer.auto_rates
            if live:
                self.events_seen += ev
            if need_blocks and (live or self._rebuild_blocks):  # GN blocks per event, over the data seen
                self.blocks_sum += hessian_blocks(self.model, tb) * ev
                self.blocks_events += ev
                blocks = self.blocks_sum / self.blocks_events
                if gn:  # the preconditioner
                    self.opt.set_blocks(blocks)
                else:  # the seed's SGD at the largest stable rates for the data seen
                    lr_rot, lr_trans = sgd_rates(blocks)
                    self.opt.config = replace(self.opt.config, lr_rot=lr_rot, lr_trans=lr_trans)
            cost, grad = theta_gradient(self.model, tb)
            if gn and cfg.optimizer.schedule == "stochastic":
                grad = grad * (ev / max(self.events_seen, ev))
            self.model.set_theta(self.opt.step(self.model.theta(), grad))
            s = self._since
            s["mu"] += tb.n_tracks
            s["cost"] += cost * ev
            s["events"] += ev
        if live:  # the packed tracks with the model's layout of them (built by the step)
            layout = self.model.plan_tensors(tb) if tb.n_tracks and cfg.spool_layout else None
            write_tracks(self._tracks, tb, layout)
        self._since["steps"] += 1
        self.steps += 1
        self.work += 1
        self._busy += time.perf_counter() - t_step
        if self._since["steps"] >= cfg.tau:
            self._sync(active=True)

    # ------------------------------------------------------------------ synchronisation
    def _sync(self, active: bool) -> bool:
        """One all-reduce: the weighted average of Theta and the cost sums. Returns whether any
        worker is still active."""
        s = self._since
        theta = self.model.theta().detach().to(torch.float64)
        extra = torch.tensor([s["mu"], float(active), s["cost"], s["events"], s["steps"]], dtype=torch.float64)
        vec = torch.cat([theta.reshape(-1) * s["mu"], extra])
        tot = self.group.allreduce_sum(vec)
        n6 = theta.numel()
        mu, n_active, cost, events, steps = (float(x) for x in tot[n6:])
        if mu > 0 and self.ctx.replicas > 1:  # a single replica's average is its own Theta
            self.model.set_theta((tot[:n6] / mu).reshape(theta.shape))
        self.syncs += 1
        self.epoch_totals["cost"] += cost
        self.epoch_totals["events"] += events
        self._since = dict(mu=0, cost=0.0, events=0, steps=0)
        row = {"epoch": self.epoch, "sync": self.syncs, "step": self.steps, "cost": cost / events if events else None,
               "tracks": int(mu), "active": int(n_active), "time_s": round(time.monotonic() - self.t_start, 3)}
        self._checkpoint()
        if self._metrics is not None:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()
        if self.ctx.replica == 0:
            if self.syncs % self.config.publish_every == 0 and mu > 0:
                self._publish()
        return n_active > 0

    def _checkpoint(self) -> None:
        if self.ctx.replicas == 1:
            return
        if self.ctx.replica == 0:
            self.group.put("checkpoint", _tensor_bytes(
                theta=self.model.theta().detach().numpy(), epoch=self.epoch, syncs=self.syncs,
                epoch_cost=self.epoch_totals["cost"], epoch_events=self.epoch_totals["events"]))
        self.group.put(f"replica/{self.ctx.replica}", _tensor_bytes(events_seen=self.events_seen, pos=self.pos))

    def _publish(self) -> None:
        if "out" not in self.ctx.outputs:
            return
        lo, hi = self.t_range
        self.emit("out", constants_batch(self.model.theta().detach().numpy()), lo or 0, hi or 0,
                  extra={"epoch": self.epoch, "sync": self.syncs})
        self.published += 1

    def _drain_epoch(self) -> None:
        """Take part in synchronisations until every worker has ended this epoch."""
        while self._sync(active=False):
            self.work += 1
        e = self.epoch_totals
        row = {"epoch": self.epoch, "epoch_cost": e["cost"] / e["events"] if e["events"] else None,
               "events": e["events"], "time_s": round(time.monotonic() - self.t_start, 3)}
        self.epoch_costs.append(row)
        self.busy_s.append(round(self._busy, 3))
        self._busy = 0.0
        if self._metrics is not None:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()
        self.epoch_totals = dict(cost=0.0, events=0.0)

    def _replay(self, start: int):
        """The spooled batches of every incarnation, in order, from position ``start``: (key,
        TrackBatch), the batch None when the cache holds it (its record is skipped, not decoded).
        Buffered reads, a record at a time (a memory map would keep the whole spool, GBs at the
        seed's scale, resident in this process)."""
        k = 0
        files = sorted(self.spool_dir.glob(f"{self.ctx.stage}-{self.ctx.replica}.*.tracks"),
                       key=lambda p: int(p.suffixes[-2].lstrip(".")))
        for path in files:
            inc, j = int(path.suffixes[-2].lstrip(".")), 0
            try:
                with open(path, "rb", buffering=1 << 20) as f:
                    while True:
                        cached = (inc, j) in self._packed
                        tb = read_tracks(f, skip=cached or k < start, model=self.model)
                        if tb is None:
                            break
                        if k >= start:
                            yield (inc, j), None if cached else tb
                        k += 1
                        j += 1
            except (ValueError, OSError) as exc:  # the tail a killed incarnation left unfinished
                self.log.warning("spool %s: read up to a damaged tail (%s)", path.name, exc)

    # ------------------------------------------------------------------ end of stream: the other epochs
    def finish(self) -> None:
        cfg: ITSAlignConfig = self.config
        self._spool.close()
        self._tracks.close()
        if self.epoch == 1:
            self._drain_epoch()
            self.epoch = 2
            self.pos = 0
        prev = None
        while self.epoch <= cfg.epochs:
            beta = cfg.optimizer.momentum
            if beta and prev is not None:  # every replica holds the same synchronised Theta here
                th = self.model.theta().detach()
                self.model.set_theta(th + beta * (th - prev))
            prev = self.model.theta().detach().clone()
            # a replica restarted after epoch 1 has no preconditioner yet: built on this pass
            self._rebuild_blocks = (cfg.optimizer.method == "gn" or cfg.optimizer.auto_rates) and self.blocks_events == 0
            for key, batch in self._replay(self.pos):
                self.pos += 1
                self._step(batch, live=False, key=key)
            self._drain_epoch()
            self.epoch += 1
            self.pos = 0
        if self.ctx.replica == 0:
            self._publish()
            self._write_outputs()

    def _write_outputs(self) -> None:
        cfg: ITSAlignConfig = self.config
        if not cfg.run_dir:
            return
        out = Path(cfg.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "theta.npy", self.model.theta().detach().numpy())
        if self._metrics is not None:
            self._metrics.close()
        prod = out / "producer.json"  # the data's configs, written there by the its_tracks source
        if not prod.exists():
            self.log.warning("no %s: run.json (for `streamcal evaluate align`) is not written", prod)
            return
        from streamcal.detectors.its.evaluation import RunConfig, write_run_json

        data = json.loads(prod.read_text())
        write_run_json(out, RunConfig.from_dict(json.loads(json.dumps({
            "geometry": asdict(cfg.geometry.config()), "misalignment": data["misalignment"],
            "simulation": data["simulation"], "model": asdict(cfg.model.config()),
            "constraints": {"modes": list(cfg.constrain_modes), "fixed_layers": list(cfg.fixed_layers)},
            "workers": self.ctx.replicas, "tau": cfg.tau, "epochs": cfg.epochs,
            "optimizer": asdict(cfg.optimizer.config()),
        }))))

    def summary(self) -> dict:
        rej = asdict(self.rejects)
        return {"epochs": len(self.epoch_costs), "syncs": self.syncs, "steps": self.steps,
                "events_seen": self.events_seen,
                "epoch_cost": [e["epoch_cost"] for e in self.epoch_costs], "rejects": rej,
                "published": self.published, "group": self.group.stats(), "pid": os.getpid(),
                "cache": {"batches": len(self._packed), "tracks": self._packed_tracks,
                          "mb": round(self._packed_bytes / 2**20, 3), "spool_batches": self._from_spool},
                "busy_s": self.busy_s}
