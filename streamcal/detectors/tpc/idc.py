"""Integrated digital currents (IDCs) from the space-charge simulation (seed section 2.3).

The readout integrates the pad signals over ``time_bin`` (1 ms): per interval a 2D IDC map
(pad rows x pads, per sector and side, or coarser pad groups). Here the IDC of a pad is the
number of ions that the amplification of that interval sends back into the drift volume through
the pad: ``IDC(t, pad) = epsilon(pad) x electrons(t, pad)``. This takes the local epsilon into
account as the seed requires; it assumes the local epsilon variations come from the gain (which
the currents measure), the IBF fraction being uniform. The IDCs are therefore exactly the source
term of the ion-backflow density, and the 3D IDC history of the last ion drift time determines
the density (:func:`density_from_idc`).

Derived quantities (O2 convention, ``<.>_t`` the mean over the time bins of the history,
``<.>_pads`` over the pads of the map):

* 1D IDC: ``IDC_1D(t) = <IDC(t, pad)>_pads``; 0D IDC: ``IDC_0D = <IDC_1D>_t``;
* factorisation ``IDC(t, pad) = IDC0(pad) * IDC1(t) * (1 + IDCDelta(t, pad))`` with
  ``IDC0(pad) = <IDC(t, pad)>_t``, ``IDC1(t) = <IDC(t, pad) / IDC0(pad)>_pads`` (pads with
  ``IDC0 > 0``) and ``IDCDelta`` the remainder, so the recomposition is exact;
* model input: the Fourier coefficients of the last ``n`` values of ``IDC1``,
  ``c_k = rfft(IDC1 - 1)_k / n`` (``c_0`` is then the mean relative deviation and ``|c_k|`` the
  amplitude of a period ``n / k`` ms modulation, half its peak size), the first ``k``
  coefficients laid out as ``[Re c_0..c_{k-1}, Im c_0..c_{k-1}]`` (:func:`idc_fourier`).

Pad plane. :class:`PadGeometry` is a simplified ALICE pad plane: 152 pad rows per sector with a
uniform pitch between 85.2 cm and 245.8 cm, pads per row growing proportionally to r and adding up
to 14,560 per sector (524,160 on both sides). The real region-wise pad sizes are not reproduced.
Tracks are sampled at an azimuthal resolution ``fine_bins_per_pad`` times finer than the widest
pad and each fine bin is attributed to the pad containing its centre.

Memory. At full granularity the history of 200 maps of 524,160 pads is a float32 ring buffer of
200 x 524,160 x 4 B = 419.3 MB (float16: 209.7 MB), see :class:`IDCHistory`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from streamcal.detectors.tpc.constants import (
    DRIFT_LENGTH,
    N_SECTORS,
    PAD_ROWS,
    PADS_PER_SECTOR,
    Grid,
    parse_grid,
)
from streamcal.detectors.tpc.density import (
    DensityConfig,
    SeedLike,
    as_generator,
    density_from_readout,
    reach_tables,
)

__all__ = [
    "R_FIRST_PAD_ROW",
    "R_LAST_PAD_ROW",
    "PadGeometry",
    "IDCConfig",
    "IDCSeries",
    "IDCSimulator",
    "IDCDecomposition",
    "IDCHistory",
    "idc_1d",
    "idc_0d",
    "idc_decomposition",
    "idc_fourier",
    "density_from_idc",
]

R_FIRST_PAD_ROW = 85.2  # cm, centre of the first pad row (simplified pad plane)
R_LAST_PAD_ROW = 245.8  # cm, centre of the last pad row


@dataclass(frozen=True)
class PadGeometry:
    """Simplified pad plane of one sector (identical for all sectors and both sides)."""

    pad_rows: int = PAD_ROWS
    pads_per_sector: int = PADS_PER_SECTOR
    n_sectors: int = N_SECTORS
    r_first_row: float = R_FIRST_PAD_ROW
    r_last_row: float = R_LAST_PAD_ROW

    def __post_init__(self) -> None:
        for name in ("pad_rows", "pads_per_sector", "n_sectors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"PadGeometry.{name} must be an integer >= 1, got {value!r}")
        if self.pads_per_sector < self.pad_rows:
            raise ValueError(
                f"PadGeometry.pads_per_sector must be >= pad_rows ({self.pad_rows}), got {self.pads_per_sector}"
            )
        if not 0 < self.r_first_row < self.r_last_row:
            raise ValueError(
                "PadGeometry radii must satisfy 0 < r_first_row < r_last_row, "
                f"got {self.r_first_row}, {self.r_last_row}"
            )

    @property
    def row_radii(self) -> np.ndarray:
        """Pad-row centres in cm, shape (pad_rows,)."""
        return np.linspace(self.r_first_row, self.r_last_row, self.pad_rows)

    @property
    def row_pitch(self) -> float:
        return (self.r_last_row - self.r_first_row) / max(self.pad_rows - 1, 1)

    @property
    def pads_per_row(self) -> np.ndarray:
        """Pads in each row (~ r, summing to ``pads_per_sector``), shape (pad_rows,) int."""
        r = self.row_radii
        exact = self.pads_per_sector * r / r.sum()
        n = np.maximum(np.floor(exact).astype(np.int64), 1)
        rest = self.pads_per_sector - int(n.sum())
        order = np.argsort(-(exact - np.floor(exact)), kind="stable")
        n[order[: max(rest, 0)]] += 1
        return n

    @property
    def row_offsets(self) -> np.ndarray:
        """Flat pad index of the first pad of each row within a sector, shape (pad_rows,)."""
        return np.concatenate([[0], np.cumsum(self.pads_per_row)[:-1]])

    @property
    def sector_width(self) -> float:
        return 2.0 * math.pi / self.n_sectors

    def pad_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Azimuth (relative to the sector start) and radius of every pad, flat within a sector."""
        n = self.pads_per_row
        row = np.repeat(np.arange(self.pad_rows), n)
        pad = np.arange(self.pads_per_sector) - np.repeat(self.row_offsets, n)
        return (pad + 0.5) / n[row] * self.sector_width, self.row_radii[row]


@dataclass(frozen=True)
class IDCConfig:
    """IDC map layout and simulation resolution.

    Attributes:
        geometry: the pad plane.
        rows_per_group, pads_per_group: grouping (1, 1 = full pad granularity). Rows are grouped
            in consecutive blocks; within a block a pad belongs to group
            ``floor(u * ceil(max_pads_in_block / pads_per_group))``, ``u`` its relative azimuth in the
            sector. A group's IDC is the mean of its pads.
        n_sides: 1 (A only) or 2 (A and C).
        fine_bins_per_pad: azimuthal sampling resolution in units of the widest pad (>= 1).
    """

    geometry: PadGeometry = field(default_factory=PadGeometry)
    rows_per_group: int = 1
    pads_per_group: int = 1
    n_sides: Literal[1, 2] = 2
    fine_bins_per_pad: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, PadGeometry):
            raise TypeError(f"IDCConfig.geometry must be a PadGeometry, got {type(self.geometry).__name__}")
        for name in ("rows_per_group", "pads_per_group", "fine_bins_per_pad"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"IDCConfig.{name} must be an integer >= 1, got {value!r}")
        if self.rows_per_group > self.geometry.pad_rows:
            raise ValueError(
                f"IDCConfig.rows_per_group must be <= pad_rows ({self.geometry.pad_rows}), got {self.rows_per_group}"
            )
        if self.n_sides not in (1, 2):
            raise ValueError(f"IDCConfig.n_sides must be 1 or 2, got {self.n_sides!r}")

    def group_index(self) -> tuple[np.ndarray, int]:
        """Group of every pad of a sector (flat, shape (pads_per_sector,)) and groups per sector."""
        geo = self.geometry
        n = geo.pads_per_row
        row = np.repeat(np.arange(geo.pad_rows), n)
        pad = np.arange(geo.pads_per_sector) - np.repeat(geo.row_offsets, n)
        if self.rows_per_group == 1 and self.pads_per_group == 1:
            return np.arange(geo.pads_per_sector), geo.pads_per_sector
        block = row // self.rows_per_group
        n_blocks = int(block.max()) + 1
        max_pads = np.array([n[b * self.rows_per_group : (b + 1) * self.rows_per_group].max() for b in range(n_blocks)])
        groups_in_block = -(-max_pads // self.pads_per_group)  # ceil
        offsets = np.concatenate([[0], np.cumsum(groups_in_block)[:-1]])
        u = (pad + 0.5) / n[row]
        return offsets[block] + np.floor(u * groups_in_block[block]).astype(np.int64), int(groups_in_block.sum())

    @property
    def groups_per_sector(self) -> int:
        return self.group_index()[1]

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """Shape of one 2D IDC map: (n_sides, n_sectors, groups_per_sector)."""
        return (self.n_sides, self.geometry.n_sectors, self.groups_per_sector)


@dataclass(frozen=True)
class IDCSeries:
    """Simulated IDC maps ``idc`` of shape (n_time_bins, n_sides, n_sectors, groups) in ions per
    pad (group mean) and time bin, chronological (last = most recent)."""

    idc: np.ndarray
    config: IDCConfig
    density_config: DensityConfig

    @property
    def idc_1d(self) -> np.ndarray:
        return idc_1d(self.idc)

    @property
    def idc_0d(self) -> float:
        return idc_0d(self.idc)


class IDCSimulator:
    """IDC maps from the space-charge model of :mod:`streamcal.detectors.tpc.density`.

    Same events, tracks and epsilon as the density simulation (the two sides share the events and
    draw their tracks independently).
    """

    def __init__(self, config: IDCConfig | None = None, density_config: DensityConfig | None = None) -> None:
        self.config = IDCConfig() if config is None else config
        self.density_config = DensityConfig() if density_config is None else density_config
        if not isinstance(self.config, IDCConfig):
            raise TypeError(f"config must be an IDCConfig, got {type(self.config).__name__}")
        if not isinstance(self.density_config, DensityConfig):
            raise TypeError(f"density_config must be a DensityConfig, got {type(self.density_config).__name__}")
        geo = self.config.geometry
        self._fine = int(self.config.fine_bins_per_pad * geo.pads_per_row.max())  # fine bins per sector
        f = np.arange(self._fine)
        n = geo.pads_per_row
        pad_in_row = np.floor((f[:, None] + 0.5) * n[None, :] / self._fine).astype(np.int64)  # (F, rows)
        self._pad_of_fine = geo.row_offsets[None, :] + pad_in_row  # (F, rows) flat pad in sector
        self._groups, self._n_groups = self.config.group_index()
        self._pads_in_group = np.bincount(self._groups, minlength=self._n_groups)
        phi_rel, r_pad = geo.pad_centres()
        self._epsilon_pad = np.stack(
            [self.density_config.epsilon_on(phi_rel + s * geo.sector_width, r_pad) for s in range(geo.n_sectors)]
        )  # (n_sectors, pads_per_sector)

    def simulate(self, n_time_bins: int | None = None, seed: SeedLike = None) -> IDCSeries:
        """``n_time_bins`` consecutive IDC maps (default: one ion drift time)."""
        dc = self.density_config
        n_t = dc.n_time_bins if n_time_bins is None else n_time_bins
        if isinstance(n_t, bool) or not isinstance(n_t, (int, np.integer)) or n_t < 1:
            raise ValueError(f"n_time_bins must be an integer >= 1, got {n_time_bins!r}")
        rng = as_generator(seed)
        geo = self.config.geometry
        n_sec, n_rows, n_fine = geo.n_sectors, geo.pad_rows, self._fine
        p_reach, cbar, eta_acc = reach_tables(geo.row_radii, DRIFT_LENGTH)
        cum = np.cumsum(p_reach)
        cum[-1] = 1.0
        a = 1.0 / dc.track_charge_rms**2 if dc.track_charge_rms > 0 else 0.0
        n_bins_phi = n_sec * n_fine
        pad_index = (np.arange(n_sec)[:, None, None] * geo.pads_per_sector + self._pad_of_fine[None]).reshape(-1)
        out = np.empty((n_t, self.config.n_sides, n_sec, self._n_groups), dtype=np.float32)
        scale = geo.row_pitch * dc.ionisation_per_cm  # track-cm per cm -> electrons per row
        for t in range(n_t):
            n_ev = rng.poisson(dc.rate_hz * dc.time_bin)
            sum_mu = float(np.sum(dc.multiplicity.dndeta_at(rng.random(n_ev)))) * eta_acc
            for side in range(self.config.n_sides):
                n_tracks = rng.poisson(sum_mu)
                phi_bin = rng.integers(0, n_bins_phi, n_tracks)
                reach = np.minimum(np.searchsorted(cum, rng.random(n_tracks), side="right"), n_rows - 1)
                g = rng.gamma(a, 1.0 / a, n_tracks) if a > 0 else np.ones(n_tracks)
                dep = np.bincount(phi_bin * n_rows + reach, weights=g * cbar[reach], minlength=n_bins_phi * n_rows)
                dep = dep.reshape(n_bins_phi, n_rows)
                dep = np.flip(np.cumsum(np.flip(dep, axis=1), axis=1), axis=1)  # track crosses rows 0..reach
                pads = np.bincount(pad_index, weights=dep.reshape(-1), minlength=n_sec * geo.pads_per_sector)
                ions = pads.reshape(n_sec, geo.pads_per_sector) * scale * self._epsilon_pad
                if self._n_groups == geo.pads_per_sector:
                    out[t, side] = ions
                else:
                    grouped = np.stack([np.bincount(self._groups, weights=ions[s], minlength=self._n_groups) for s in range(n_sec)])
                    out[t, side] = grouped / self._pads_in_group
        return IDCSeries(out, self.config, dc)


def idc_1d(idc: np.ndarray) -> np.ndarray:
    """1D IDC: mean of each map, ``idc`` shape (n_t, ...) -> (n_t,)."""
    idc = np.asarray(idc)
    return idc.reshape(idc.shape[0], -1).mean(axis=1, dtype=np.float64)


def idc_0d(idc: np.ndarray) -> float:
    """0D IDC: the time mean of the 1D IDC."""
    return float(idc_1d(idc).mean())


@dataclass(frozen=True)
class IDCDecomposition:
    """``IDC(t, pad) = idc0(pad) * idc1(t) * (1 + delta(t, pad))``; shapes ``idc0`` (...pads),
    ``idc1`` (n_t,), ``delta`` (n_t, ...pads)."""

    idc0: np.ndarray
    idc1: np.ndarray
    delta: np.ndarray

    def recompose(self) -> np.ndarray:
        idc1 = self.idc1.reshape((-1,) + (1,) * self.idc0.ndim)
        return self.idc0[None] * idc1 * (1.0 + self.delta)


def idc_decomposition(idc: np.ndarray) -> IDCDecomposition:
    """Factorise IDC maps (n_t, ...pads) into IDC0, IDC1 and IDCDelta (module doc), in float64.

    Pads whose IDC0 is 0 carry IDC = 0 at all times (IDCs are >= 0) and get ``delta = 0``; an
    interval with ``IDC1 = 0`` gets ``delta = -1``. Negative IDCs are rejected.
    """
    x = np.asarray(idc, dtype=np.float64)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"idc must have shape (n_time_bins >= 1, ...pads), got {x.shape}")
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError("idc must be finite and >= 0 (currents)")
    idc0 = x.mean(axis=0)
    live = idc0 > 0
    ratio = np.where(live, x / np.where(live, idc0, 1.0), 0.0)  # (n_t, ...pads)
    n_live = int(live.sum())
    idc1 = ratio.reshape(x.shape[0], -1).sum(axis=1) / max(n_live, 1)
    shaped = idc1.reshape((-1,) + (1,) * idc0.ndim)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(live & (shaped > 0), ratio / np.where(shaped > 0, shaped, 1.0) - 1.0, 0.0)
    delta = np.where(live & (shaped == 0), -1.0, delta)
    return IDCDecomposition(idc0, idc1, delta)


def idc_fourier(idc1: np.ndarray, n_coefficients: int) -> np.ndarray:
    """Fourier input of the 1D IDCs: ``c = rfft(idc1 - 1) / n``, first ``k`` as ``[Re, Im]``.

    ``idc1`` has shape (..., n) with the last ``n`` values (e.g. 200 ms) of the relative 1D IDC;
    returns (..., 2k) float64. ``k <= n // 2 + 1``.
    """
    x = np.asarray(idc1, dtype=np.float64)
    n = x.shape[-1] if x.ndim else 0
    if n < 1:
        raise ValueError(f"idc1 must have shape (..., n >= 1), got {x.shape}")
    if isinstance(n_coefficients, bool) or not isinstance(n_coefficients, (int, np.integer)) or not 1 <= n_coefficients <= n // 2 + 1:
        raise ValueError(f"n_coefficients must be an integer in [1, {n // 2 + 1}] for n = {n} values, got {n_coefficients!r}")
    c = np.fft.rfft(x - 1.0, axis=-1)[..., :n_coefficients] / n
    return np.concatenate([c.real, c.imag], axis=-1)


class IDCHistory:
    """Ring buffer of the last ``length`` 2D IDC maps (the 3D IDC history).

    One preallocated ``(length, *map_shape)`` array; :meth:`push` overwrites the oldest map.
    At full granularity (524,160 pads, 200 maps) float32 takes 419.3 MB, float16 209.7 MB.
    """

    def __init__(self, map_shape: tuple[int, ...] | int, length: int = 200, dtype: np.dtype | str = np.float32) -> None:
        shape = (map_shape,) if isinstance(map_shape, (int, np.integer)) else tuple(map_shape)
        if not shape or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
            raise ValueError(f"map_shape must be positive integers, got {map_shape!r}")
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length must be an integer >= 1, got {length!r}")
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype must be float16, float32 or float64, got {dt}")
        self.map_shape = shape
        self.length = int(length)
        self.buffer = np.zeros((self.length, *shape), dtype=dt)
        self._next = 0
        self._count = 0

    @staticmethod
    def required_nbytes(map_shape: tuple[int, ...] | int, length: int = 200, dtype: np.dtype | str = np.float32) -> int:
        """Bytes of the buffer :class:`IDCHistory` would allocate."""
        n = int(np.prod(map_shape))
        return n * int(length) * np.dtype(dtype).itemsize

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def __len__(self) -> int:
        return self._count

    def push(self, idc_map: np.ndarray) -> None:
        """Append one map (shape ``map_shape``), dropping the oldest once full."""
        m = np.asarray(idc_map)
        if m.shape != self.map_shape:
            raise ValueError(f"idc_map must have shape {self.map_shape}, got {m.shape}")
        self.buffer[self._next] = m
        self._next = (self._next + 1) % self.length
        self._count = min(self._count + 1, self.length)

    def ordered(self) -> np.ndarray:
        """The stored maps in chronological order (a copy), shape (len(self), *map_shape)."""
        if self._count < self.length:
            return self.buffer[: self._count].copy()
        return np.roll(self.buffer, -self._next, axis=0)


def density_from_idc(
    idc: np.ndarray,
    grid: Grid | str | tuple[int, int, int],
    *,
    density_config: DensityConfig | None = None,
    idc_config: IDCConfig | None = None,
    side: int = 0,
) -> np.ndarray:
    """Density estimate (nphi, nr, nz) in V/cm^2 on one side from the 3D IDC history.

    ``idc`` has shape (n_t, n_sides, n_sectors, pads_per_sector) at full pad granularity, in ions
    per pad and time bin (as :class:`IDCSimulator` writes them), chronological with at least one
    ion drift time of maps (the last ``n_time_bins`` are used). Each pad is attributed to the grid
    cell (phi_k, r_j) nearest its centre; the ion-backflow ions then drift as in
    :func:`~streamcal.detectors.tpc.density.density_from_readout` and the primary ions follow
    from ``IDC / epsilon``.
    """
    g = parse_grid(grid)
    dc = DensityConfig() if density_config is None else density_config
    ic = IDCConfig() if idc_config is None else idc_config
    geo = ic.geometry
    x = np.asarray(idc, dtype=np.float64)
    n_t = dc.n_time_bins
    if x.ndim != 4 or x.shape[1:] != (ic.n_sides, geo.n_sectors, geo.pads_per_sector) or x.shape[0] < n_t:
        raise ValueError(
            f"idc must have shape (n_t >= {n_t}, {ic.n_sides}, {geo.n_sectors}, {geo.pads_per_sector}) "
            f"(full pad granularity), got {x.shape}"
        )
    if not 0 <= side < ic.n_sides:
        raise ValueError(f"side must be in [0, {ic.n_sides - 1}], got {side!r}")
    x = x[-n_t:, side]  # (n_t, n_sectors, pads)
    phi_rel, r_pad = geo.pad_centres()
    phi = (np.arange(geo.n_sectors)[:, None] * geo.sector_width + phi_rel[None, :]).reshape(-1)
    r_pad = np.broadcast_to(r_pad, (geo.n_sectors, r_pad.size)).reshape(-1)
    eps = dc.epsilon_on(phi, r_pad)
    k = np.rint(phi / g.dphi).astype(np.int64) % g.nphi
    j = np.clip(np.rint((r_pad - g.r_min) / g.dr).astype(np.int64), 0, g.nr - 1)
    cell = k * g.nr + j
    electrons = x.reshape(n_t, -1) / (eps * dc.ionisation_per_cm)  # track-cm per pad
    per_cell = np.stack([np.bincount(cell, weights=e, minlength=g.nphi * g.nr) for e in electrons])
    edges = np.concatenate([[g.r[0]], 0.5 * (g.r[1:] + g.r[:-1]), [g.r[-1]]])
    per_cm = per_cell.reshape(n_t, g.nphi, g.nr) / np.diff(edges)[None, None, :]  # track-cm per cm of r
    eps_grid = dc.epsilon_on(g.phi[:, None], g.r[None, :])
    return density_from_readout(per_cm, g, dc, epsilon_local=eps_grid)
