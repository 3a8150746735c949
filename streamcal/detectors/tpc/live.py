"""A live TPC: the space-charge simulation advanced one IDC interval (1 ms) at a time.

Same physics and statistics as :class:`~streamcal.detectors.tpc.density.DensitySimulator`
(which draws a whole ion-drift-time history at once): per interval a Poisson number of
collisions, their tracks per (phi, r) cell of the grid, the ionisation reaching the readout. The
last ``n_time_bins`` intervals (200 ms) are kept in a ring buffer; they determine the density in
the drift volume exactly (:func:`~streamcal.detectors.tpc.density.density_from_readout`).

Per interval :meth:`LiveTPC.step` returns the IDCs of that interval on the grid's (phi, r) cells
(the 2D IDC map at the grid's granularity, ions relative to the nominal expectation of the cell,
so ~1) and the 1D IDC (ions of the whole map relative to the nominal expectation, the quantity
:meth:`DensitySample.idc1d` gives the training set). :meth:`LiveTPC.density` returns the density
now; :meth:`LiveTPC.idc1d_history` the last 200 1D IDCs, chronological.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamcal.detectors.tpc.constants import Grid, parse_grid
from streamcal.detectors.tpc.density import (
    DensityConfig,
    _cell_widths,
    as_generator,
    density_from_readout,
    expected_readout,
    reach_tables,
)

__all__ = ["LiveTPC"]


class LiveTPC:
    """One TPC side, simulated interval by interval (module doc).

    ``warm=True`` fills the history with a full drift time of simulated intervals first, so the
    drift volume is in its steady state from the first :meth:`step` on.
    """

    def __init__(self, grid: Grid | str | tuple[int, int, int], config: DensityConfig | None = None, *,
                 seed: Any = None, warm: bool = True) -> None:
        self.grid = parse_grid(grid)
        self.config = DensityConfig() if config is None else config
        if not isinstance(self.config, DensityConfig):
            raise TypeError(f"config must be a DensityConfig, got {type(self.config).__name__}")
        self.rng = as_generator(seed)
        g, c = self.grid, self.config
        self.n_t = c.n_time_bins
        self.p_reach, self.cbar, self.eta_acc = reach_tables(g.r, g.length)
        self.a = 1.0 / c.track_charge_rms**2 if c.track_charge_rms > 0 else 0.0
        eps = c.epsilon_on(g.phi[:, None], g.r[None, :])  # (nphi, nr)
        dr = _cell_widths(g.r)
        self.weight = eps * dr[None, :]  # ions per unit of readout signal, per cell
        expected = expected_readout(c, g.r, g.nphi, length=g.length)[-1]  # (nphi, nr), one interval
        self.expected_cell = expected * self.weight
        self.expected_total = float(self.expected_cell.sum())
        self.electrons = np.zeros((self.n_t, g.nphi, g.nr))  # ring buffer, track-cm per cm of r
        self.idc1 = np.zeros(self.n_t)
        self.pos = 0  # next slot to write
        self.steps = 0
        if warm:
            for _ in range(self.n_t):
                self.step()
            self.steps = 0

    def _interval(self) -> np.ndarray:
        """Readout signal of one interval per (phi, r) cell: as ``simulate_readout`` for one bin."""
        c, g = self.config, self.grid
        n_events = self.rng.poisson(c.rate_hz * c.time_bin)
        mu = c.multiplicity.dndeta_at(self.rng.random(n_events)) * self.eta_acc
        lam = float(mu.sum()) * self.p_reach / g.nphi  # (n_r,)
        counts = self.rng.poisson(np.broadcast_to(lam, (g.nphi, lam.size)))
        charge = self.rng.gamma(counts * self.a, 1.0 / self.a) if self.a > 0 else counts.astype(np.float64)
        charge *= self.cbar
        return np.flip(np.cumsum(np.flip(charge, axis=-1), axis=-1), axis=-1)

    def step(self) -> tuple[np.ndarray, float]:
        """Advance one interval; return its 2D IDC map (nphi, nr) and its 1D IDC (both relative)."""
        e = self._interval()
        self.electrons[self.pos] = e
        ions = e * self.weight
        idc1 = float(ions.sum() / self.expected_total)
        self.idc1[self.pos] = idc1
        self.pos = (self.pos + 1) % self.n_t
        self.steps += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            idc2 = np.where(self.expected_cell > 0, ions / np.where(self.expected_cell > 0, self.expected_cell, 1), 0.0)
        return idc2, idc1

    def _ordered(self, x: np.ndarray) -> np.ndarray:
        return np.roll(x, -self.pos, axis=0)

    def idc1d_history(self) -> np.ndarray:
        """The 1D IDCs of the last drift time (n_time_bins,), chronological."""
        return self._ordered(self.idc1).copy()

    def density(self) -> np.ndarray:
        """The density now (nphi, nr, nz), rho/eps0 in V/cm^2."""
        return density_from_readout(self._ordered(self.electrons), self.grid, self.config)

    def readout_from_idc(self, idc2: np.ndarray) -> np.ndarray:
        """Invert :meth:`step`'s 2D map to the readout signal of the interval (what a consumer of
        the IDC stream does to rebuild the density from the 3D IDC history)."""
        return np.asarray(idc2, dtype=np.float64) * self.expected_cell / np.where(self.weight > 0, self.weight, 1.0)
