"""``its_tracks``: a seeded source of ITS2 track hits on a misaligned detector, for alignment.

Simulates events (``streamcal.detectors.its.simulation``: helices from a beam spot, hits with
intrinsic resolution and multiple scattering) on the geometry misaligned by a random per-sensor
Theta plus global modes (``streamcal.detectors.its.misalignment``), and emits the hits as
reconstruction would hand them to an alignment: sensor id, measured local (u, v) and the event's
vertex, schema ``its.hits`` (no truth columns).

Partitions. With ``partitions: [w_0, w_1, ...]`` the stream is partitioned for alignment
workers: every round emits one message per partition ``m`` holding ``events_per_message x w_m /
max(w)`` events, routed to worker replica ``m`` (header ``part``); unequal weights give the
deliberately unequal partitions of the seed's weighted averaging. Without partitions, messages
of ``events_per_message`` events go to whichever worker has room.

Event time: event ``i`` happens at ``i / event_rate_hz``; ``speed`` paces it (0: as fast as
possible). With ``run_dir`` the true misalignment is written there (``theta_true.npy``) with the
configs that produced it (``producer.json``), for ``streamcal evaluate align``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from streamcal.config import Config
from streamcal.detectors.its.geometry import ITS2_LAYERS, ITSGeometry, ITSGeometryConfig, build_geometry
from streamcal.detectors.its.misalignment import MisalignmentConfig, apply_alignment, misalign
from streamcal.detectors.its.simulation import SimulationConfig, simulate_batch
from streamcal.schemas import register_schema
from streamcal.stage import Source, register_stage

__all__ = ["GeometrySpec", "MisalignmentSpec", "SimulationSpec", "ITSTracksConfig", "ITSTracksSource", "ITS_HITS"]

ITS_HITS = register_schema(
    "its.hits",
    pa.schema(
        [
            pa.field("event", pa.int64(), nullable=False),
            pa.field("track", pa.int32(), nullable=False),
            pa.field("sensor", pa.int32()),
            pa.field("u", pa.float64()),
            pa.field("v", pa.float64()),
            pa.field("vx", pa.float64()),
            pa.field("vy", pa.float64()),
            pa.field("vz", pa.float64()),
        ]
    ),
    doc="ITS hits for alignment, one row per hit: event, track in the event, sensor id, measured local "
    "(u, v) in mm, the event's primary vertex (mm). Bad hits are rejected and counted by the reader.",
)


@dataclass(frozen=True)
class GeometrySpec(Config):
    """The ITS geometry: the full ITS2 (default: 7 layers, 24,120 chips) or a reduced one with the
    real radii and staves but fewer chips (``ITSGeometryConfig.small``)."""

    layers: int = 7
    staves: tuple[int, ...] = ()  # per layer; default: the ITS2 stave counts
    chips_u: tuple[int, ...] = ()  # chips across a stave, per layer; default: ITS2's
    chips_v: tuple[int, ...] = ()  # chips along z, per layer; default: ITS2's

    def validate(self) -> None:
        if not 1 <= self.layers <= len(ITS2_LAYERS):
            self.fail("layers", f"must be in 1..{len(ITS2_LAYERS)}, got {self.layers}")
        for name in ("staves", "chips_u", "chips_v"):
            val = getattr(self, name)
            if val and (len(val) < self.layers or min(val) < 1):
                self.fail(name, f"needs at least layers={self.layers} entries >= 1, got {list(val)}")

    def config(self) -> ITSGeometryConfig:
        full = ITSGeometryConfig()
        if not (self.staves or self.chips_u or self.chips_v) and self.layers == len(ITS2_LAYERS):
            return full
        lay = full.layers
        return ITSGeometryConfig.small(
            n_layers=self.layers,
            staves=self.staves or tuple(x.n_staves for x in lay),
            chips_v=self.chips_v or tuple(x.chips_v for x in lay),
            chips_u=self.chips_u or tuple(x.chips_u for x in lay),
        )

    def build(self) -> ITSGeometry:
        return build_geometry(self.config())


@dataclass(frozen=True)
class MisalignmentSpec(Config):
    """The true misalignment (``MisalignmentConfig``): local Gaussian per chip plus global modes."""

    sigma_rot: tuple[float, float, float] = (1e-4, 1e-4, 1e-4)  # rad, about the chip's u, v, w
    sigma_trans: tuple[float, float, float] = (0.01, 0.01, 0.01)  # mm, along u, v, w
    modes: tuple[tuple[str, float], ...] = ()  # (mode, amplitude), e.g. [[radial, 0.005]]
    seed: int = 0

    def validate(self) -> None:
        try:
            self.config()
        except ValueError as exc:
            self.fail("(values)", str(exc))

    def config(self) -> MisalignmentConfig:
        return MisalignmentConfig(sigma_rot=tuple(self.sigma_rot), sigma_trans=tuple(self.sigma_trans),
                                  frame="local", modes=tuple((str(m), float(a)) for m, a in self.modes),
                                  seed=self.seed)


@dataclass(frozen=True)
class SimulationSpec(Config):
    """The event simulation (``SimulationConfig``; the fields a shift changes)."""

    tracks_per_event: int = 8
    pt_min: float = 0.2  # GeV/c
    pt_max: float = 20.0
    eta_max: float = 1.0
    multiple_scattering: bool = True
    sigma_u: float = 0.005  # mm
    sigma_v: float = 0.005
    seed: int = 0

    def validate(self) -> None:
        try:
            self.config()
        except ValueError as exc:
            self.fail("(values)", str(exc))

    def config(self) -> SimulationConfig:
        return SimulationConfig(**asdict(self))


@dataclass(frozen=True)
class ITSTracksConfig(Config):
    geometry: GeometrySpec = field(default_factory=GeometrySpec)
    misalignment: MisalignmentSpec = field(default_factory=MisalignmentSpec)
    simulation: SimulationSpec = field(default_factory=SimulationSpec)
    events: int = 10_000  # events in all
    events_per_message: int = 512  # per message (of the heaviest partition)
    partitions: tuple[float, ...] = ()  # relative partition sizes, one per worker replica
    event_rate_hz: float = 50_000.0  # event time: event i at i / rate
    speed: float = 0.0  # 1.0: real time; 0: as fast as possible
    run_dir: str = ""  # where theta_true.npy and producer.json go ("" = nowhere)

    def validate(self) -> None:
        if self.events < 0:
            self.fail("events", f"must be >= 0, got {self.events}")
        if self.events_per_message < 1:
            self.fail("events_per_message", f"must be >= 1, got {self.events_per_message}")
        if self.partitions and (min(self.partitions) <= 0 or not np.all(np.isfinite(self.partitions))):
            self.fail("partitions", f"must be positive finite weights, got {list(self.partitions)}")
        if not self.event_rate_hz > 0:
            self.fail("event_rate_hz", f"must be > 0, got {self.event_rate_hz}")
        if self.speed < 0:
            self.fail("speed", f"must be >= 0 (0: as fast as possible), got {self.speed}")

    def partition_events(self) -> list[int]:
        """Events per message of each partition (one entry without partitions)."""
        if not self.partitions:
            return [self.events_per_message]
        w = np.asarray(self.partitions, dtype=np.float64)
        return [max(1, int(round(self.events_per_message * x / w.max()))) for x in w]


def hits_for_alignment(sim: pa.RecordBatch) -> pa.RecordBatch:
    """The columns of a simulated batch that an alignment may read (schema ``its.hits``)."""
    return pa.RecordBatch.from_arrays([sim.column(f.name).cast(f.type) for f in ITS_HITS.schema],
                                      schema=ITS_HITS.schema)


@register_stage
class ITSTracksSource(Source):
    kind = "its_tracks"
    Config = ITSTracksConfig

    @classmethod
    def outputs(cls, config: ITSTracksConfig) -> dict[str, str]:
        return {"out": ITS_HITS.name}

    def setup(self) -> None:
        cfg: ITSTracksConfig = self.config
        self.geom = cfg.geometry.build()
        self.theta_true = misalign(self.geom, cfg.misalignment.config())
        self.sim = cfg.simulation.config()
        self.placement = apply_alignment(self.geom, self.theta_true)
        self.events_sent = self.hits_sent = 0
        self.per_partition = [0] * max(1, len(cfg.partitions))
        if cfg.run_dir and self.ctx.replica == 0:
            out = Path(cfg.run_dir)
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / "theta_true.npy", self.theta_true)
            info = {"geometry": cfg.geometry.to_dict(), "geometry_config": _jsonable(asdict(cfg.geometry.config())),
                    "misalignment": _jsonable(asdict(cfg.misalignment.config())),
                    "simulation": _jsonable(asdict(self.sim)), "events": cfg.events,
                    "partitions": list(cfg.partitions), "n_sensors": self.geom.n_sensors}
            (out / "producer.json").write_text(json.dumps(info, indent=1))

    def generate(self) -> Iterator[None]:
        cfg: ITSTracksConfig = self.config
        sizes = cfg.partition_events()
        period_ns = 1e9 / cfg.event_rate_hz
        start, batch_index = 0, 0
        # replicas of this source split the events: replica r simulates rounds r, r + R, ...
        rnd = 0
        while start < cfg.events:
            for m, size in enumerate(sizes):
                n = min(size, cfg.events - start)
                if n <= 0:
                    break
                if rnd % self.ctx.replicas == self.ctx.replica:
                    t0 = int(start * period_ns)
                    t1 = int((start + n) * period_ns)
                    self.pace(t1, cfg.speed)
                    sim = simulate_batch(self.geom, self.sim, n, placement=self.placement, batch_index=batch_index,
                                         event_offset=start)
                    out = hits_for_alignment(sim)
                    self.emit("out", out, t0, t1, partition=m if cfg.partitions else None)
                    self.events_sent += n
                    self.hits_sent += out.num_rows
                    self.per_partition[m] += n
                    self.work += 1
                    yield
                start += n
                batch_index += 1
            rnd += 1

    def summary(self) -> dict:
        return {"events": self.events_sent, "hits": self.hits_sent, "events_per_partition": self.per_partition,
                "sensors": self.geom.n_sensors}


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
