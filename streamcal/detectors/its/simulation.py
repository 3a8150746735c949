"""Vectorised ITS2 track simulator: helices in a solenoid, hits on the (misaligned) chips.

Physics:

* Events have a primary vertex drawn from a Gaussian beam spot and ``tracks_per_event`` charged
  pions. pT follows a Tsallis-like spectrum ``dN/dpT ~ pT (1 + pT / (n T))^-n`` between
  ``pt_min`` (0.2 GeV/c) and ``pt_max``; eta is uniform in ``[-eta_max, eta_max]``, phi uniform,
  charge +-1.
* B = 0.5 T along +z: transverse radius ``R [m] = pT [GeV/c] / (0.3 B [T])`` (the seed's
  ``pT = 0.3 B R``); a positive track turns clockwise. The helix in the transverse path length
  ``t`` from a point ``p0`` with direction ``phi0`` and signed curvature ``k`` is
  ``xy(t) = p0 + t sinc(k t / 2) (cos, sin)(phi0 + k t / 2)``, ``z(t) = z0 + t tan(lambda)``.
* Propagation goes sub-layer by sub-layer (even staves, then the radially staggered odd ones):
  the crossing with the sub-layer's radius picks the stave, Newton's method on the helix gives the
  exact crossing with the stave plane, and then with the *actual* (misaligned) plane of the chip
  under it (or of its neighbour, when the misaligned chip covers the point instead). Crossings
  are accepted only where Newton converged (tracks that curl up before a layer stop there). A hit
  is recorded inside the chip's active matrix and smeared by the intrinsic resolution
  (``sigma_u``, ``sigma_v``, ~5 um), Gaussian.
* Multiple scattering at every stave crossed, Highland as given by the PDG review "Passage of
  particles through matter" (Lynch & Dahl form, unit charge):
  ``theta0 = 13.6 MeV / (beta c p) sqrt(x/X0) (1 + 0.038 ln(x / (X0 beta^2)))`` with
  ``x/X0 = layer x/X0 / |cos(incidence)|``; two independent Gaussian kicks of width theta0 in the
  planes perpendicular to the direction (one in the transverse plane, one in the dip). |p| is
  conserved (no energy loss); the kick is applied at the crossing point (thin scatterer).

Output: pyarrow RecordBatches (:data:`HIT_SCHEMA`), one row per hit, ordered by event, track,
radius. Columns: ``event`` (int64), ``track`` (int32, index in the event), ``sensor`` (int32),
``layer`` (int8), ``u``, ``v`` (measured local position, mm), ``x``, ``y``, ``z`` (the measured
hit placed with the *ideal* geometry, i.e. what reconstruction sees before alignment),
``u_true``, ``v_true`` (the true crossing in the frame of the actual, misaligned chip), ``pt``
(generated pT, float32), ``charge`` (int8), ``vx``, ``vy``, ``vz`` (true primary vertex). The
truth columns are for evaluation; an alignment must not read them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from streamcal.detectors.its.geometry import ITSGeometry
from streamcal.detectors.its.misalignment import apply_alignment, check_theta

__all__ = [
    "PION_MASS",
    "HIT_SCHEMA",
    "SimulationConfig",
    "highland_theta0",
    "sample_pt",
    "simulate_batch",
    "simulate",
]

PION_MASS = 0.13957  # GeV/c^2

HIT_SCHEMA = pa.schema(
    [
        ("event", pa.int64()),
        ("track", pa.int32()),
        ("sensor", pa.int32()),
        ("layer", pa.int8()),
        ("u", pa.float64()),
        ("v", pa.float64()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("z", pa.float64()),
        ("u_true", pa.float64()),
        ("v_true", pa.float64()),
        ("pt", pa.float32()),
        ("charge", pa.int8()),
        ("vx", pa.float64()),
        ("vy", pa.float64()),
        ("vz", pa.float64()),
    ]
)


@dataclass(frozen=True)
class SimulationConfig:
    """Frozen, validated simulator configuration (units: mm, GeV, T).

    Args:
        tracks_per_event: tracks per event (the seed's data: 8).
        b_field: solenoid field (T) along +z.
        pt_min, pt_max: pT range (GeV/c).
        pt_spectrum: ``"tsallis"`` (realistic), ``"uniform"`` in pT, or ``"fixed"`` (= pt_min).
        tsallis_n, tsallis_t: Tsallis exponent and temperature (GeV).
        eta_max: |eta| range.
        beam_spot_mean, beam_spot_sigma: Gaussian primary vertex (mm).
        sigma_u, sigma_v: intrinsic resolution (mm) along u (r-phi) and v (z).
        multiple_scattering: apply Highland kicks at each stave.
        mass: particle mass (GeV/c^2).
        seed: base seed; batch ``i`` uses ``SeedSequence([seed, i])``.
    """

    tracks_per_event: int = 8
    b_field: float = 0.5
    pt_min: float = 0.2
    pt_max: float = 20.0
    pt_spectrum: Literal["tsallis", "uniform", "fixed"] = "tsallis"
    tsallis_n: float = 7.0
    tsallis_t: float = 0.15
    eta_max: float = 1.0
    beam_spot_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    beam_spot_sigma: tuple[float, float, float] = (0.015, 0.015, 50.0)
    sigma_u: float = 0.005
    sigma_v: float = 0.005
    multiple_scattering: bool = True
    mass: float = PION_MASS
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.tracks_per_event, (int, np.integer)) or self.tracks_per_event < 1:
            raise ValueError(f"SimulationConfig.tracks_per_event must be >= 1, got {self.tracks_per_event}")
        if not self.b_field > 0:
            raise ValueError(f"SimulationConfig.b_field must be > 0 T, got {self.b_field}")
        if not 0 < self.pt_min <= self.pt_max:
            raise ValueError(
                f"SimulationConfig.pt_min/pt_max must satisfy 0 < pt_min <= pt_max, got {self.pt_min}, {self.pt_max}"
            )
        if self.pt_spectrum not in ("tsallis", "uniform", "fixed"):
            raise ValueError(
                f"SimulationConfig.pt_spectrum must be one of 'tsallis', 'uniform', 'fixed', got {self.pt_spectrum!r}"
            )
        if not self.tsallis_n > 3:
            raise ValueError(f"SimulationConfig.tsallis_n must be > 3 (finite mean pT), got {self.tsallis_n}")
        if not self.tsallis_t > 0:
            raise ValueError(f"SimulationConfig.tsallis_t must be > 0 GeV, got {self.tsallis_t}")
        if not 0 <= self.eta_max <= 4:
            raise ValueError(f"SimulationConfig.eta_max must be in [0, 4], got {self.eta_max}")
        for name in ("beam_spot_mean", "beam_spot_sigma"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"SimulationConfig.{name} must have 3 entries (x, y, z)")
        if any(s < 0 for s in self.beam_spot_sigma):
            raise ValueError(f"SimulationConfig.beam_spot_sigma must be >= 0, got {self.beam_spot_sigma}")
        for name in ("sigma_u", "sigma_v"):
            if getattr(self, name) < 0:
                raise ValueError(f"SimulationConfig.{name} must be >= 0 (mm), got {getattr(self, name)}")
        if self.mass < 0:
            raise ValueError(f"SimulationConfig.mass must be >= 0, got {self.mass}")
        if not (isinstance(self.seed, (int, np.integer)) and self.seed >= 0):
            raise ValueError(f"SimulationConfig.seed must be a non-negative integer, got {self.seed!r}")
        nums = (self.b_field, self.pt_min, self.pt_max, self.eta_max, self.sigma_u, self.sigma_v, self.mass)
        if not all(np.isfinite(nums)) or not all(np.isfinite(self.beam_spot_mean + self.beam_spot_sigma)):
            raise ValueError("SimulationConfig: all numeric fields must be finite")


def highland_theta0(p: np.ndarray, x_x0: np.ndarray, mass: float = PION_MASS) -> np.ndarray:
    """Highland multiple-scattering angle (rad, plane projected) for momentum ``p`` (GeV/c) and
    thickness ``x_x0`` (radiation lengths), unit charge."""
    p = np.asarray(p, dtype=np.float64)
    x_x0 = np.asarray(x_x0, dtype=np.float64)
    beta = p / np.sqrt(p * p + mass * mass)
    safe = np.maximum(x_x0, 1e-12)
    return np.where(
        x_x0 > 0, 0.0136 / (beta * p) * np.sqrt(safe) * (1.0 + 0.038 * np.log(safe / beta**2)), 0.0
    )


def sample_pt(rng: np.random.Generator, n: int, config: SimulationConfig) -> np.ndarray:
    """Draw ``n`` transverse momenta (GeV/c) from the configured spectrum (inverse CDF)."""
    if config.pt_spectrum == "fixed" or config.pt_min == config.pt_max:
        return np.full(n, config.pt_min)
    if config.pt_spectrum == "uniform":
        return rng.uniform(config.pt_min, config.pt_max, n)
    grid = np.geomspace(config.pt_min, config.pt_max, 2048)
    pdf = grid * (1.0 + grid / (config.tsallis_n * config.tsallis_t)) ** (-config.tsallis_n)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(grid))])
    return np.interp(rng.uniform(0.0, cdf[-1], n), cdf, grid)


def _sinc(x: np.ndarray) -> np.ndarray:
    return np.sinc(x / np.pi)  # sin(x) / x


def _helix_xy(px, py, phi0, k, t):
    half = 0.5 * k * t
    f = t * _sinc(half)
    return px + f * np.cos(phi0 + half), py + f * np.sin(phi0 + half)


def _cross_plane(px, py, pz, phi, k, tanl, t, normal, point, n_iter: int = 4):
    """Newton on the helix transverse path ``t`` for the crossing with the plane through ``point``
    (n, 3) with ``normal`` (n, 3), from the start value ``t``. Returns (t, x, y, z, |residual|)."""
    for _ in range(n_iter):
        x, y = _helix_xy(px, py, phi, k, t)
        z = pz + t * tanl
        f = normal[:, 0] * (x - point[:, 0]) + normal[:, 1] * (y - point[:, 1]) + normal[:, 2] * (z - point[:, 2])
        fp = normal[:, 0] * np.cos(phi + k * t) + normal[:, 1] * np.sin(phi + k * t) + normal[:, 2] * tanl
        t = t - f / np.where(np.abs(fp) > 1e-6, fp, 1e-6)
    x, y = _helix_xy(px, py, phi, k, t)
    z = pz + t * tanl
    f = normal[:, 0] * (x - point[:, 0]) + normal[:, 1] * (y - point[:, 1]) + normal[:, 2] * (z - point[:, 2])
    return t, x, y, z, np.abs(f)


# Tracks that pass within this distance (mm) of an ideal stave's edge are still tried on the
# actual (misaligned) chips; misalignments larger than this can lose hits at stave edges.
_EDGE_MARGIN = 2.0
# Newton convergence: a crossing is accepted if the point is this close (mm) to the plane.
_PLANE_TOL = 1e-7
_CYL_TOL = 1e-3


def simulate_batch(
    geom: ITSGeometry,
    config: SimulationConfig,
    n_events: int,
    *,
    placement: tuple[np.ndarray, np.ndarray] | None = None,
    batch_index: int = 0,
    event_offset: int = 0,
) -> pa.RecordBatch:
    """Simulate ``n_events`` events on the chips placed at ``placement = (rot, trans)`` (the
    actual, misaligned geometry, e.g. from :func:`~streamcal.detectors.its.misalignment.apply_alignment`;
    default ideal). Returns one RecordBatch (:data:`HIT_SCHEMA`), rows ordered by event, track
    and radius. The random stream is ``SeedSequence([config.seed, batch_index])``."""
    if not isinstance(config, SimulationConfig):
        raise TypeError(f"simulate_batch: config must be a SimulationConfig, got {type(config).__name__}")
    if not (isinstance(n_events, (int, np.integer)) and n_events >= 1):
        raise ValueError(f"simulate_batch: n_events must be an integer >= 1, got {n_events!r}")
    if not (isinstance(batch_index, (int, np.integer)) and batch_index >= 0):
        raise ValueError(f"simulate_batch: batch_index must be an integer >= 0, got {batch_index!r}")
    if placement is None:
        rot_act, trans_act = geom.rot, geom.trans
    else:
        if len(placement) != 2:
            raise ValueError("simulate_batch: placement must be a (rot, trans) pair")
        rot_act, trans_act = (np.asarray(a, dtype=np.float64) for a in placement)
        n = geom.n_sensors
        if rot_act.shape != (n, 3, 3) or trans_act.shape != (n, 3):
            raise ValueError(
                f"simulate_batch: placement must be rot ({n}, 3, 3) and trans ({n}, 3), got "
                f"{rot_act.shape} and {trans_act.shape}"
            )
        if not (np.isfinite(rot_act).all() and np.isfinite(trans_act).all()):
            raise ValueError("simulate_batch: placement must be finite (found NaN or inf)")
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, int(batch_index)]))
    cfg = geom.config
    nt = n_events * config.tracks_per_event

    # --- generation ---------------------------------------------------------------------------
    vtx = rng.standard_normal((n_events, 3)) * np.asarray(config.beam_spot_sigma) + np.asarray(
        config.beam_spot_mean
    )  # (E, 3)
    ev = np.repeat(np.arange(n_events), config.tracks_per_event)  # (T,) event of each track
    pt = sample_pt(rng, nt, config)
    eta = rng.uniform(-config.eta_max, config.eta_max, nt)
    phi = rng.uniform(-np.pi, np.pi, nt)
    charge = rng.choice(np.array([-1, 1]), nt)
    tanl = np.sinh(eta)
    p = pt * np.cosh(eta)
    px, py, pz = vtx[ev, 0].copy(), vtx[ev, 1].copy(), vtx[ev, 2].copy()
    ptc = pt.copy()
    kcur = -charge * 0.3 * config.b_field / (1000.0 * ptc)  # 1/mm, signed (clockwise for q > 0)

    hit_trk, hit_sid, hit_layer, hit_loc, hit_order = [], [], [], [], []
    order = 0
    for li, lay in enumerate(cfg.layers):
        h = cfg.stave_half_width(li)
        half_len = cfg.stave_half_length(li)
        dphi = 2.0 * np.pi / lay.n_staves
        for parity in (0, 1):
            r_sub = lay.r_min + parity * cfg.stagger(li)
            # transverse path to radius r_sub: straight-line start, Newton on |xy(t)|^2 = r^2
            cphi, sphi = np.cos(phi), np.sin(phi)
            pd = px * cphi + py * sphi
            disc = pd * pd - (px * px + py * py) + r_sub * r_sub
            ok = disc > 0
            t = np.where(ok, -pd + np.sqrt(np.maximum(disc, 0.0)), 0.0)
            for _ in range(4):
                x, y = _helix_xy(px, py, phi, kcur, t)
                dirx, diry = np.cos(phi + kcur * t), np.sin(phi + kcur * t)
                g = x * x + y * y - r_sub * r_sub
                gp = 2.0 * (x * dirx + y * diry)
                t = t - np.where(np.abs(gp) > 1e-9, g / np.where(np.abs(gp) > 1e-9, gp, 1.0), 0.0)
            x, y = _helix_xy(px, py, phi, kcur, t)
            ok &= (t > 0) & (np.abs(np.hypot(x, y) - r_sub) < _CYL_TOL)  # loopers never reach r_sub
            phic = np.arctan2(y, x)
            idx = np.round((phic - cfg.phi0 - parity * dphi) / (2 * dphi)).astype(np.int64)
            stave = np.mod(2 * idx + parity, lay.n_staves)
            sphi_k = geom.stave_phi[li][stave]
            nx, ny = np.cos(sphi_k), np.sin(sphi_k)
            rk = geom.stave_radius[li][stave]
            # crossing with the ideal stave plane
            n_st = np.stack([nx, ny, np.zeros_like(nx)], axis=1)
            t, x, y, z, res = _cross_plane(px, py, pz, phi, kcur, tanl, t, n_st, n_st * rk[:, None])
            ok &= (t > 0) & (res < _PLANE_TOL)
            us = -ny * x + nx * y
            crosses = ok & (np.abs(us) <= h) & (np.abs(z) <= half_len)  # through the ideal stave
            cand = ok & (np.abs(us) <= h + _EDGE_MARGIN) & (np.abs(z) <= half_len + _EDGE_MARGIN)
            iu = np.clip(np.floor((us + h) / cfg.chip_pitch_u), 0, lay.chips_u - 1).astype(np.int64)
            iv = np.clip(np.floor((z + half_len) / cfg.chip_pitch_v), 0, lay.chips_v - 1).astype(np.int64)
            # crossing with the actual chip plane (3D: the chip may be tilted); if the point falls
            # outside that chip's active matrix, try the neighbour on that side (a misaligned chip
            # can cover a point that the ideal layout gives to its neighbour)
            c_idx = np.nonzero(cand)[0]
            t_c = t[c_idx]
            hit = np.zeros(c_idx.size, dtype=bool)
            sid_c = np.zeros(c_idx.size, dtype=np.int64)
            loc_c = np.zeros((c_idx.size, 3))
            glob_c = np.zeros((c_idx.size, 3))
            t_out = t_c.copy()
            todo = np.arange(c_idx.size)
            iu_c, iv_c = iu[c_idx], iv[c_idx]
            for attempt in range(2):
                if not todo.size:
                    break
                j = c_idx[todo]
                sid = geom.layer_first[li] + (stave[j] * lay.chips_v + iv_c[todo]) * lay.chips_u + iu_c[todo]
                r_a, c_a = rot_act[sid], trans_act[sid]
                tt, xx, yy, zz, res = _cross_plane(
                    px[j], py[j], pz[j], phi[j], kcur[j], tanl[j], t_c[todo], r_a[:, :, 2], c_a
                )
                glob = np.stack([xx, yy, zz], axis=1)
                loc = np.einsum("nji,nj->ni", r_a, glob - c_a)
                good = (tt > 0) & (res < _PLANE_TOL)
                inside = good & (np.abs(loc[:, 0]) <= geom.half_u) & (np.abs(loc[:, 1]) <= geom.half_v)
                k_in = todo[inside]
                hit[k_in], sid_c[k_in], loc_c[k_in], glob_c[k_in] = True, sid[inside], loc[inside], glob[inside]
                t_out[todo[good]] = tt[good]
                if attempt == 0:
                    # neighbour in the direction of the overflow, where there is one
                    su = np.where(loc[:, 0] > geom.half_u, 1, np.where(loc[:, 0] < -geom.half_u, -1, 0))
                    sv = np.where(loc[:, 1] > geom.half_v, 1, np.where(loc[:, 1] < -geom.half_v, -1, 0))
                    nu, nv = iu_c[todo] + su, iv_c[todo] + sv
                    retry = (good & ~inside & ((su != 0) | (sv != 0)) & (nu >= 0) & (nu < lay.chips_u)
                             & (nv >= 0) & (nv < lay.chips_v))
                    iu_c[todo[retry]], iv_c[todo[retry]] = nu[retry], nv[retry]
                    todo = todo[retry]
            sel = c_idx[hit]
            hit_trk.append(sel)
            hit_sid.append(sid_c[hit])
            hit_layer.append(np.full(sel.size, li, dtype=np.int8))
            hit_loc.append(loc_c[hit, :2])
            hit_order.append(np.full(sel.size, order, dtype=np.int32))
            order += 1
            # move tracks that cross material (a chip, or the ideal stave) to the crossing point
            in_chip = np.zeros(nt, dtype=bool)
            in_chip[sel] = True
            t[c_idx] = t_out
            mv = np.nonzero(crosses | in_chip)[0]
            x, y = _helix_xy(px[mv], py[mv], phi[mv], kcur[mv], t[mv])
            pz[mv] = pz[mv] + t[mv] * tanl[mv]
            px[mv], py[mv] = x, y
            phi[mv] = phi[mv] + kcur[mv] * t[mv]
            if config.multiple_scattering and lay.x_x0 > 0 and mv.size:
                cl = 1.0 / np.sqrt(1.0 + tanl[mv] ** 2)
                d = np.stack([cl * np.cos(phi[mv]), cl * np.sin(phi[mv]), tanl[mv] * cl], axis=1)  # (m, 3)
                nrm = np.stack([nx[mv], ny[mv], 0 * nx[mv]], axis=1)
                in_mv = np.nonzero(in_chip[mv])[0]
                nrm[in_mv] = rot_act[hit_sid[-1][np.searchsorted(sel, mv[in_mv])], :, 2]
                cos_inc = np.abs(np.sum(d * nrm, axis=1))
                th0 = highland_theta0(p[mv], lay.x_x0 / np.maximum(cos_inc, 1e-3), config.mass)
                e1 = np.stack([-np.sin(phi[mv]), np.cos(phi[mv]), 0 * cl], axis=1)
                e2 = np.cross(d, e1)
                kick = rng.standard_normal((mv.size, 2)) * th0[:, None]
                d = d + kick[:, :1] * e1 + kick[:, 1:] * e2
                d /= np.linalg.norm(d, axis=1, keepdims=True)
                tr = np.hypot(d[:, 0], d[:, 1])
                phi[mv] = np.arctan2(d[:, 1], d[:, 0])
                tanl[mv] = d[:, 2] / tr
                ptc[mv] = p[mv] * tr
                kcur[mv] = -charge[mv] * 0.3 * config.b_field / (1000.0 * ptc[mv])

    trk = np.concatenate(hit_trk)
    sid = np.concatenate(hit_sid)
    layer = np.concatenate(hit_layer)
    loc = np.concatenate(hit_loc)
    hord = np.concatenate(hit_order)
    srt = np.lexsort((hord, trk))  # by track (event-major), then radius
    trk, sid, layer, loc = trk[srt], sid[srt], layer[srt], loc[srt]
    meas = loc + rng.standard_normal(loc.shape) * np.array([config.sigma_u, config.sigma_v])
    l3 = np.concatenate([meas, np.zeros((meas.shape[0], 1))], axis=1)
    glob = np.einsum("nij,nj->ni", geom.rot[sid], l3) + geom.trans[sid]  # ideal placement
    e = ev[trk]
    cols = [
        pa.array(event_offset + e.astype(np.int64)),
        pa.array((trk % config.tracks_per_event).astype(np.int32)),
        pa.array(sid.astype(np.int32)),
        pa.array(layer),
        pa.array(meas[:, 0]),
        pa.array(meas[:, 1]),
        pa.array(glob[:, 0]),
        pa.array(glob[:, 1]),
        pa.array(glob[:, 2]),
        pa.array(loc[:, 0]),
        pa.array(loc[:, 1]),
        pa.array(pt[trk].astype(np.float32)),
        pa.array(charge[trk].astype(np.int8)),
        pa.array(vtx[e, 0]),
        pa.array(vtx[e, 1]),
        pa.array(vtx[e, 2]),
    ]
    return pa.RecordBatch.from_arrays(cols, schema=HIT_SCHEMA)


def simulate(
    geom: ITSGeometry,
    config: SimulationConfig,
    n_events: int,
    *,
    theta: np.ndarray | None = None,
    batch_events: int = 4096,
) -> Iterator[pa.RecordBatch]:
    """Stream ``n_events`` events in RecordBatches of ``batch_events`` events, simulated on the
    geometry misaligned by ``theta`` (N, 6) (ideal if None). Deterministic for a given seed and
    ``batch_events`` (batch ``b`` draws from ``SeedSequence([seed, b])``, so a different batch size
    gives different, equally valid, events)."""
    if not (isinstance(batch_events, (int, np.integer)) and batch_events >= 1):
        raise ValueError(f"simulate: batch_events must be an integer >= 1, got {batch_events!r}")
    if not (isinstance(n_events, (int, np.integer)) and n_events >= 0):
        raise ValueError(f"simulate: n_events must be an integer >= 0, got {n_events!r}")
    placement = None if theta is None else apply_alignment(geom, check_theta(geom, theta, "simulate"))
    for b, start in enumerate(range(0, n_events, batch_events)):
        n = min(batch_events, n_events - start)
        yield simulate_batch(geom, config, n, placement=placement, batch_index=b, event_offset=start)
