"""ALICE ITS2 geometry: layers, staves, ALPIDE chips and their ideal placement.

Conventions (used by every module under ``streamcal.detectors.its``):

* Units: mm, rad, GeV, T. Global frame: z along the beam (and along B), x, y transverse, origin
  at the nominal interaction point.
* ITS2 has 7 barrel layers. Inner barrel (layers 0-2): 12, 16, 20 staves of 9 chips along z.
  Middle layers (3, 4): 24 and 30 staves of 112 chips (2 half-staves x 4 modules x 14 chips, i.e.
  4 chips across the stave in r-phi and 28 along z). Outer layers (5, 6): 42 and 48 staves of 196
  chips (4 across, 49 along z). In total 24,120 ALPIDE chips (``ITS2_N_SENSORS``).
* A chip is 15 x 30 mm (pitch in r-phi x z); its active matrix is 512 x 1024 pixels of
  26.88 x 29.24 um, i.e. 13.76 x 29.94 mm. Hits are accepted only inside the active matrix.
* Staves are flat. Stave ``k`` of a layer sits at azimuth ``phi_k = phi0 + 2 pi k / n_staves``
  with its plane normal ``(cos phi_k, sin phi_k, 0)`` at distance ``r_min`` (even ``k``) or
  ``r_min + stagger`` (odd ``k``) from the beam axis, so neighbouring staves overlap in r-phi
  without touching (the ITS2 "turbo" overlap, modelled here as a radial stagger). ``r_min`` is the
  layer's minimum radius from the ITS2 design.
* Simplifications against the real detector: the inner-barrel staves are tilted and the
  outer-barrel half-staves sit at two radii in ITS2; both are modelled by the radial stagger
  above. Chips sit edge to edge at the 15 x 30 mm pitch with the active matrix centred (the real
  ALPIDE has its ~1.2 mm periphery along one long edge). Material is a single x/X0 per stave
  crossing; there are no separate support, cooling or cable volumes.
* Sensor local frame ``(u, v, w)``: ``u`` along r-phi (increasing phi), ``v`` along z, ``w`` the
  outward normal; right-handed. A local point ``l`` maps to global as
  ``g = R_GEOM @ l + T_GEOM`` (the seed's ideal placement), with ``R_GEOM = [e_u | e_v | e_w]``
  (columns) and ``T_GEOM`` the chip centre. (ALICE's sensor frame calls the normal ``y``; the seed's
  ``PO`` matrix picks the two measurement coordinates, which here are simply ``u`` and ``v``.)
* Sensor ids are dense integers ``0 .. n_sensors - 1`` ordered by layer, stave, chip along z, chip
  across the stave.

Material: about 0.35 % X0 per inner-barrel layer, about 1 % X0 per outer-barrel layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ITS2_N_SENSORS",
    "ITS2_LAYERS",
    "LayerSpec",
    "ITSGeometryConfig",
    "ITSGeometry",
    "build_geometry",
]

ITS2_N_SENSORS = 24_120


@dataclass(frozen=True)
class LayerSpec:
    """One barrel layer.

    Args:
        n_staves: staves in azimuth (even, so that the radial stagger alternates).
        chips_u: chips across one stave (r-phi direction).
        chips_v: chips along one stave (z direction).
        r_min: minimum radius in mm (distance of the even staves' plane from the beam axis).
        x_x0: material per layer as a fraction of a radiation length.
    """

    n_staves: int
    chips_u: int
    chips_v: int
    r_min: float
    x_x0: float

    def __post_init__(self) -> None:
        if self.n_staves < 2 or self.n_staves % 2:
            raise ValueError(f"LayerSpec.n_staves must be an even integer >= 2, got {self.n_staves}")
        if self.chips_u < 1:
            raise ValueError(f"LayerSpec.chips_u must be >= 1, got {self.chips_u}")
        if self.chips_v < 1:
            raise ValueError(f"LayerSpec.chips_v must be >= 1, got {self.chips_v}")
        if not (self.r_min > 0 and math.isfinite(self.r_min)):
            raise ValueError(f"LayerSpec.r_min must be a positive radius in mm, got {self.r_min}")
        if not (0 <= self.x_x0 < 1):
            raise ValueError(f"LayerSpec.x_x0 must be in [0, 1), got {self.x_x0}")

    @property
    def chips_per_stave(self) -> int:
        return self.chips_u * self.chips_v


ITS2_LAYERS: tuple[LayerSpec, ...] = (
    LayerSpec(12, 1, 9, 22.4, 0.0035),
    LayerSpec(16, 1, 9, 30.1, 0.0035),
    LayerSpec(20, 1, 9, 37.8, 0.0035),
    LayerSpec(24, 4, 28, 194.4, 0.010),
    LayerSpec(30, 4, 28, 243.9, 0.010),
    LayerSpec(42, 4, 49, 342.3, 0.010),
    LayerSpec(48, 4, 49, 391.8, 0.010),
)


@dataclass(frozen=True)
class ITSGeometryConfig:
    """Frozen, validated geometry configuration.

    The default is the full ITS2 (24,120 chips). :meth:`small` builds reduced geometries for
    tests (fewer staves and chips, same layout rules).

    Args:
        layers: the barrel layers, innermost first, with strictly increasing ``r_min``.
        chip_pitch_u, chip_pitch_v: chip pitch (mm) across and along the stave.
        pixel_pitch_u, pixel_pitch_v: pixel pitch (mm).
        n_pixels_u, n_pixels_v: pixels per chip (active matrix).
        stagger_margin: radial clearance (mm) added to the minimum stagger that keeps
            neighbouring staves from intersecting.
        phi0: azimuth (rad) of stave 0 in every layer.
    """

    layers: tuple[LayerSpec, ...] = ITS2_LAYERS
    chip_pitch_u: float = 15.0
    chip_pitch_v: float = 30.0
    pixel_pitch_u: float = 0.02688
    pixel_pitch_v: float = 0.02924
    n_pixels_u: int = 512
    n_pixels_v: int = 1024
    stagger_margin: float = 1.0
    phi0: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ValueError("ITSGeometryConfig.layers must be a non-empty tuple of LayerSpec")
        if not all(isinstance(lay, LayerSpec) for lay in self.layers):
            raise ValueError("ITSGeometryConfig.layers must contain LayerSpec instances only")
        radii = [lay.r_min for lay in self.layers]
        if any(b <= a for a, b in zip(radii, radii[1:])):
            raise ValueError(f"ITSGeometryConfig.layers must have increasing r_min, got {radii}")
        for name in ("chip_pitch_u", "chip_pitch_v", "pixel_pitch_u", "pixel_pitch_v"):
            val = getattr(self, name)
            if not (val > 0 and math.isfinite(val)):
                raise ValueError(f"ITSGeometryConfig.{name} must be positive, got {val}")
        for name in ("n_pixels_u", "n_pixels_v"):
            if getattr(self, name) < 1:
                raise ValueError(f"ITSGeometryConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.active_u > self.chip_pitch_u or self.active_v > self.chip_pitch_v:
            raise ValueError(
                "ITSGeometryConfig: the active matrix (n_pixels x pixel_pitch) must fit in the chip "
                f"pitch, got {self.active_u:.3f} x {self.active_v:.3f} mm in "
                f"{self.chip_pitch_u} x {self.chip_pitch_v} mm"
            )
        if self.stagger_margin < 0:
            raise ValueError(f"ITSGeometryConfig.stagger_margin must be >= 0, got {self.stagger_margin}")
        for i, lay in enumerate(self.layers[:-1]):
            outer = self.layers[i + 1].r_min
            if lay.r_min + self.stagger(i) + 1.0 >= outer:
                raise ValueError(
                    f"ITSGeometryConfig.layers[{i}]: staggered staves (r_min + stagger = "
                    f"{lay.r_min + self.stagger(i):.2f} mm) reach layer {i + 1} at {outer} mm"
                )

    @property
    def active_u(self) -> float:
        """Active width of a chip across the stave (mm)."""
        return self.n_pixels_u * self.pixel_pitch_u

    @property
    def active_v(self) -> float:
        """Active length of a chip along the stave (mm)."""
        return self.n_pixels_v * self.pixel_pitch_v

    @property
    def n_sensors(self) -> int:
        return sum(lay.n_staves * lay.chips_per_stave for lay in self.layers)

    def stave_half_width(self, layer: int) -> float:
        return 0.5 * self.layers[layer].chips_u * self.chip_pitch_u

    def stave_half_length(self, layer: int) -> float:
        return 0.5 * self.layers[layer].chips_v * self.chip_pitch_v

    def stagger(self, layer: int) -> float:
        """Radial offset (mm) of odd staves: the minimum that keeps neighbours apart plus margin.

        With azimuthal step ``d`` and half width ``h``, the edge of an even stave reaches the
        odd neighbour's normal direction at ``r cos d + h sin d``; odd staves sit beyond that.
        """
        lay = self.layers[layer]
        d = 2.0 * math.pi / lay.n_staves
        h = self.stave_half_width(layer)
        return max(0.0, lay.r_min * (math.cos(d) - 1.0) + h * math.sin(d)) + self.stagger_margin

    @classmethod
    def small(
        cls,
        n_layers: int = 4,
        staves: tuple[int, ...] = (12, 16, 20, 24, 30, 42, 48),
        chips_v: tuple[int, ...] = (3, 3, 3, 4, 4, 4, 4),
        chips_u: tuple[int, ...] = (1, 1, 1, 4, 4, 4, 4),
    ) -> ITSGeometryConfig:
        """A reduced ITS2-like geometry: the first ``n_layers`` layers with the real radii and
        staves but fewer chips per stave (``chips_u`` across, ``chips_v`` along z)."""
        if not 1 <= n_layers <= len(ITS2_LAYERS):
            raise ValueError(f"ITSGeometryConfig.small: n_layers must be in 1..7, got {n_layers}")
        for name, val in (("staves", staves), ("chips_v", chips_v), ("chips_u", chips_u)):
            if len(val) < n_layers:
                raise ValueError(
                    f"ITSGeometryConfig.small: {name} needs at least n_layers={n_layers} entries, got {len(val)}"
                )
        layers = tuple(
            LayerSpec(staves[i], chips_u[i], chips_v[i], ITS2_LAYERS[i].r_min, ITS2_LAYERS[i].x_x0)
            for i in range(n_layers)
        )
        return cls(layers=layers)


def _rot_columns(phi: np.ndarray) -> np.ndarray:
    """R_GEOM for staves at azimuth ``phi``: columns e_u, e_v, e_w. Shape (n, 3, 3)."""
    c, s = np.cos(phi), np.sin(phi)
    z, o = np.zeros_like(phi), np.ones_like(phi)
    e_u = np.stack([-s, c, z], axis=-1)
    e_v = np.stack([z, z, o], axis=-1)
    e_w = np.stack([c, s, z], axis=-1)
    return np.stack([e_u, e_v, e_w], axis=-1)  # (n, 3 rows, 3 columns)


@dataclass(frozen=True, eq=False)
class ITSGeometry:
    """Ideal placement of every chip, as vectorised arrays (index = sensor id).

    Attributes:
        config: the geometry configuration.
        layer, stave, chip_u, chip_v: (N,) integer indices of each sensor.
        rot: (N, 3, 3) R_GEOM, columns e_u, e_v, e_w.
        trans: (N, 3) T_GEOM, the chip centre (mm).
        layer_first: (n_layers + 1,) first sensor id of each layer (and the total at the end).
        stave_phi, stave_radius: per layer, (n_staves,) azimuth and plane distance of each stave.
        layer_radius: (n_layers,) mean radius of each layer's staves (mm).
        layer_x0: (n_layers,) material per layer (fraction of X0).
    """

    config: ITSGeometryConfig
    layer: np.ndarray
    stave: np.ndarray
    chip_u: np.ndarray
    chip_v: np.ndarray
    rot: np.ndarray
    trans: np.ndarray
    layer_first: np.ndarray
    stave_phi: tuple[np.ndarray, ...]
    stave_radius: tuple[np.ndarray, ...]
    layer_radius: np.ndarray
    layer_x0: np.ndarray
    stave_first: tuple[np.ndarray, ...] = field(repr=False, default=())

    @property
    def n_sensors(self) -> int:
        return int(self.layer.shape[0])

    @property
    def n_layers(self) -> int:
        return len(self.config.layers)

    @property
    def half_u(self) -> float:
        """Half active width (mm): the local u range of a valid hit is [-half_u, half_u]."""
        return 0.5 * self.config.active_u

    @property
    def half_v(self) -> float:
        """Half active length (mm): the local v range of a valid hit is [-half_v, half_v]."""
        return 0.5 * self.config.active_v

    def sensor_id(self, layer: np.ndarray, stave: np.ndarray, iu: np.ndarray, iv: np.ndarray) -> np.ndarray:
        """Dense sensor id from (layer, stave, chip across, chip along z); vectorised."""
        layer, stave, iu, iv = np.broadcast_arrays(*(np.asarray(a) for a in (layer, stave, iu, iv)))
        if np.any((layer < 0) | (layer >= self.n_layers)):
            raise ValueError(f"ITSGeometry.sensor_id: layer must be in 0..{self.n_layers - 1}")
        ns = np.array([lay.n_staves for lay in self.config.layers])[layer]
        cu = np.array([lay.chips_u for lay in self.config.layers])[layer]
        cv = np.array([lay.chips_v for lay in self.config.layers])[layer]
        for name, val, hi in (("stave", stave, ns), ("iu", iu, cu), ("iv", iv, cv)):
            if np.any((val < 0) | (val >= hi)):
                raise ValueError(f"ITSGeometry.sensor_id: {name} out of range for its layer")
        return self.layer_first[layer] + (stave * cv + iv) * cu + iu

    def _check_points(self, fn: str, sensor: np.ndarray, pts: np.ndarray, arg: str) -> None:
        sensor = np.asarray(sensor)
        if sensor.size and (sensor.min() < 0 or sensor.max() >= self.n_sensors):
            raise ValueError(f"ITSGeometry.{fn}: sensor ids must be in 0..{self.n_sensors - 1}")
        if np.shape(pts)[-1:] != (3,):
            raise ValueError(f"ITSGeometry.{fn}: {arg} must have shape (..., 3), got {np.shape(pts)}")

    def to_global(self, sensor: np.ndarray, local: np.ndarray, rot: np.ndarray | None = None,
                  trans: np.ndarray | None = None) -> np.ndarray:
        """``g = R @ l + T`` for local points ``(..., 3)`` on ``sensor`` (ideal frames by default)."""
        self._check_points("to_global", sensor, local, "local")
        rot = self.rot if rot is None else rot
        trans = self.trans if trans is None else trans
        return np.einsum("...ij,...j->...i", rot[sensor], local) + trans[sensor]

    def to_local(self, sensor: np.ndarray, glob: np.ndarray, rot: np.ndarray | None = None,
                 trans: np.ndarray | None = None) -> np.ndarray:
        """``l = R^T (g - T)``: global points ``(..., 3)`` into the frame of ``sensor``."""
        self._check_points("to_local", sensor, glob, "glob")
        rot = self.rot if rot is None else rot
        trans = self.trans if trans is None else trans
        return np.einsum("...ji,...j->...i", rot[sensor], glob - trans[sensor])


def build_geometry(config: ITSGeometryConfig | None = None) -> ITSGeometry:
    """Place every chip of ``config`` (default: full ITS2, asserted to hold 24,120 chips)."""
    config = ITSGeometryConfig() if config is None else config
    if not isinstance(config, ITSGeometryConfig):
        raise TypeError(f"build_geometry: config must be an ITSGeometryConfig, got {type(config).__name__}")
    cfg = config
    layers, staves, ius, ivs, rots, transes = [], [], [], [], [], []
    layer_first = [0]
    stave_phi, stave_radius, stave_first, layer_radius = [], [], [], []
    for li, lay in enumerate(cfg.layers):
        k = np.arange(lay.n_staves)
        phi = cfg.phi0 + 2.0 * np.pi * k / lay.n_staves
        radius = lay.r_min + (k % 2) * cfg.stagger(li)
        stave_phi.append(phi)
        stave_radius.append(radius)
        layer_radius.append(float(radius.mean()))
        rot_st = _rot_columns(phi)  # (n_staves, 3, 3)
        # chips: index order stave, iv (along z), iu (across)
        st, iv, iu = np.meshgrid(k, np.arange(lay.chips_v), np.arange(lay.chips_u), indexing="ij")
        st, iv, iu = st.ravel(), iv.ravel(), iu.ravel()
        u_c = (iu - 0.5 * (lay.chips_u - 1)) * cfg.chip_pitch_u
        v_c = (iv - 0.5 * (lay.chips_v - 1)) * cfg.chip_pitch_v
        r = rot_st[st]
        centre = r[:, :, 2] * radius[st, None] + r[:, :, 0] * u_c[:, None] + r[:, :, 1] * v_c[:, None]
        stave_first.append(layer_first[-1] + k * lay.chips_per_stave)
        layers.append(np.full(st.shape, li, dtype=np.int16))
        staves.append(st.astype(np.int32))
        ius.append(iu.astype(np.int16))
        ivs.append(iv.astype(np.int16))
        rots.append(r)
        transes.append(centre)
        layer_first.append(layer_first[-1] + st.size)
    geom = ITSGeometry(
        config=cfg,
        layer=np.concatenate(layers),
        stave=np.concatenate(staves),
        chip_u=np.concatenate(ius),
        chip_v=np.concatenate(ivs),
        rot=np.concatenate(rots),
        trans=np.concatenate(transes),
        layer_first=np.asarray(layer_first, dtype=np.int64),
        stave_phi=tuple(stave_phi),
        stave_radius=tuple(stave_radius),
        layer_radius=np.asarray(layer_radius),
        layer_x0=np.asarray([lay.x_x0 for lay in cfg.layers]),
        stave_first=tuple(stave_first),
    )
    assert geom.n_sensors == cfg.n_sensors
    if cfg.layers == ITS2_LAYERS:
        assert geom.n_sensors == ITS2_N_SENSORS, geom.n_sensors
    return geom
