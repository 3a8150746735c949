"""Space-charge density simulator for one TPC side: pile-up of ion-backflow and primary ions.

Physics model (seed sections 2.1-2.2; conventions of :mod:`streamcal.detectors.tpc.constants`):

* **Pile-up.** Collisions arrive as a Poisson process of rate ``rate_hz``; the ions of the last
  ion drift time ``T`` (200 ms) are in the drift volume, i.e. on average
  ``N_pile-up = rate x T`` events (50 kHz Pb-Pb -> 10^4). Time is binned in intervals of
  ``time_bin`` (the 1 ms IDC integration time); the number of events per bin is Poisson.
* **Multiplicity.** Per event a centrality ``c ~ U(0, 1)`` (minimum bias = uniform in centrality)
  gives the mean charged-particle density ``dN/deta(c)``, interpolated log-linearly between the
  centrality-bin centres of the ALICE measurement in Pb-Pb at sqrt(s_NN) = 5.02 TeV
  (ALICE, Phys. Rev. Lett. 116 (2016) 222302, |eta| < 0.5): 0-2.5 %: 2035, 2.5-5 %: 1850,
  5-7.5 %: 1666, 7.5-10 %: 1505, 10-20 %: 1180, 20-30 %: 786, 30-40 %: 512, 40-50 %: 318,
  50-60 %: 183, 60-70 %: 96.3, 70-80 %: 44.9, 80-90 %: 17.5, plus 6.0 assumed for 90-100 %.
  This is a Glauber-like shape (steep in central, power-law-like fall in peripheral events);
  its mean is ~ 492 and its relative RMS ~ 1.15. ``dN/deta`` is taken flat over the acceptance
  of one side, ``0 <= eta <= eta_acc = asinh(L / R_IFC)`` (~ 1.81), so an event has
  ``M ~ Poisson(dN/deta(c) * eta_acc)`` tracks per side.
* **Tracks.** Straight tracks from the vertex, azimuth uniform, ``eta`` uniform in
  ``[0, eta_acc]``. A track at ``eta`` crosses the cylinder radially up to
  ``r_exit = L / sinh(eta)`` (it leaves through the readout end-cap beyond), and deposits
  ``g * cosh(eta)`` units of ionisation per cm of radius (``cosh(eta)`` = path length per cm
  of radius; ``g`` ~ Gamma with mean 1 and relative RMS ``track_charge_rms``: dE/dx and
  momentum spread). With eta flat this gives the primary-ionisation density ``~ 1/r^2``
  (the expectation per unit r at radius r is ``dN/deta * L / r``).
* **Ions.** The electrons of an event reach the readout within ~ 100 us (instantaneous here);
  ``epsilon(phi, r) = gain x IBF`` ions per electron flow back as a thin disk that drifts from the
  readout (z = L) towards the central electrode (z = 0) at ``v_ion = L / T``, so the density at z
  reflects the events of ``(L - z) / v_ion`` ago. The primary ions of an event (one per
  electron) start uniformly in z and drift the same way; those that reached z = 0 are gone,
  so an event of age ``tau`` leaves primary ions uniformly on ``[0, L - v_ion tau]``.

Efficient, exact sampling. Per (time bin, phi cell, radial-reach bin) the number of tracks is
Poisson with mean ``sum_events(mu(c_e)) * p_phi * p_reach`` (a Poisson number of events with
Poisson multiplicities is, given the event centralities, a Poisson number of tracks that split
independently over cells), and the summed ``g`` of ``n`` tracks is ``Gamma(n a, 1/a)``
(``a = 1/track_charge_rms^2``). A track in reach bin ``b`` covers the radial nodes ``0..b``, so
the deposit per node is a reverse cumulative sum over reach bins. ``cosh(eta)`` is replaced by
its exact mean within each reach bin (this keeps the average exact and neglects only the small
within-bin spread of the single-track charge). This reproduces the compound-Poisson statistics
behind the seed's eq. 1 without a loop over 10^4 events x 10^3 tracks::

    sigma_SC / mu_SC = 1/sqrt(N) * sqrt(1 + (sigma_M/mu_M)^2 + (1 + (sigma_Q/mu_Q)^2(r)) / (F mu_M))

(eq. 1; ``F`` the fraction of tracks crossing the volume element, ``Q`` the charge a crossing
track leaves in it). See :func:`eq1_relative_fluctuation`.

Normalisation. The density is rho/eps0 in V/cm^2: ``ionisation_per_cm`` electrons per cm of
track times ``e/eps0`` = 1.8095e-6 V cm per elementary charge. The default
:data:`IONISATION_PER_CM` is an *effective* value calibrated once with the Poisson solver and the
Langevin distortions (see :mod:`streamcal.detectors.tpc.langevin`) such that the average radial
distortion at 50 kHz Pb-Pb and epsilon = 10 reaches ~ 10 cm near the inner field cage for
electrons from the central electrode (seed Fig. 1, left): 320 per cm of track, giving
rho/eps0 ~ 0.68 V/cm^2 at the inner field cage and, on 90x17x17, an average dr = 9.96 cm at
(r = R_IFC, z = 0), |drphi| <= 3.0 cm, |dz| <= 1.5 cm, and distortion fluctuations of 1.3 mm RMS
in dr there (up to ~ 3 mm). The minimum-ionising value in Ne-CO2-N2 is ~ 37 electrons per cm;
the effective factor ~ 9 stands for what this straight-track model leaves out (secondaries,
low-momentum curling tracks, delta electrons, photon conversions).
The relative fluctuations do not depend on this constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamcal.detectors.tpc.constants import (
    DRIFT_LENGTH,
    IDC_INTEGRATION_TIME,
    ION_DRIFT_TIME,
    N_SECTORS,
    R_IFC,
    Grid,
    parse_grid,
)

__all__ = [
    "E_OVER_EPS0",
    "IONISATION_PER_CM",
    "PBPB_5TEV_CENTRALITY_EDGES",
    "PBPB_5TEV_DNDETA",
    "MultiplicityModel",
    "DensityConfig",
    "DensitySample",
    "DensitySimulator",
    "SeedLike",
    "as_generator",
    "eta_acceptance",
    "reach_tables",
    "simulate_readout",
    "expected_readout",
    "density_from_readout",
    "simulate_density",
    "average_density",
    "sector_epsilon_map",
    "eq1_relative_fluctuation",
]

E_OVER_EPS0 = 1.602176634e-19 / 8.8541878128e-14  # V cm: elementary charge / eps0 (eps0 in F/cm)
IONISATION_PER_CM = 320.0  # effective electrons per cm of track (calibrated, see module doc)

PBPB_5TEV_CENTRALITY_EDGES: tuple[float, ...] = (
    0.0, 0.025, 0.05, 0.075, 0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 1.0,
)  # fmt: skip
PBPB_5TEV_DNDETA: tuple[float, ...] = (
    2035.0, 1850.0, 1666.0, 1505.0, 1180.0, 786.0, 512.0, 318.0, 183.0, 96.3, 44.9, 17.5, 6.0,
)  # fmt: skip

SeedLike = int | np.random.Generator | np.random.SeedSequence | torch.Generator | None


def as_generator(seed: SeedLike) -> np.random.Generator:
    """A numpy Generator from an int, SeedSequence, numpy Generator or torch Generator.

    A torch Generator is consumed once (one 63-bit draw) to seed a numpy Generator, so a
    torch-seeded run is deterministic too. ``None`` gives fresh OS entropy.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer, np.random.SeedSequence)):
        if isinstance(seed, (int, np.integer)) and seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        return np.random.default_rng(seed)
    if isinstance(seed, torch.Generator):
        draw = int(torch.randint(0, 2**62, (1,), generator=seed).item())
        return np.random.default_rng(draw)
    raise TypeError(
        "seed must be an int >= 0, numpy SeedSequence, numpy Generator, torch Generator or None, "
        f"got {type(seed).__name__}"
    )


def eta_acceptance(r_min: float = R_IFC, length: float = DRIFT_LENGTH) -> float:
    """Largest pseudorapidity of a vertex track that still reaches ``r_min`` inside one side."""
    return math.asinh(length / r_min)


@dataclass(frozen=True)
class MultiplicityModel:
    """Charged-particle density per event, ``dN/deta`` as a function of centrality.

    ``dndeta[i]`` is the mean in the centrality bin ``[edges[i], edges[i+1]]``; a sampled
    centrality is mapped to ``exp(interp(c, bin centres, log dndeta))`` (log-linear between
    bin centres, constant beyond the outer centres). Defaults: ALICE Pb-Pb 5.02 TeV (module doc).
    """

    centrality_edges: tuple[float, ...] = PBPB_5TEV_CENTRALITY_EDGES
    dndeta: tuple[float, ...] = PBPB_5TEV_DNDETA

    def __post_init__(self) -> None:
        edges = np.asarray(self.centrality_edges, dtype=float)
        values = np.asarray(self.dndeta, dtype=float)
        if edges.ndim != 1 or edges.size < 2 or edges[0] != 0.0 or edges[-1] != 1.0 or np.any(np.diff(edges) <= 0):
            raise ValueError(
                "MultiplicityModel.centrality_edges must increase strictly from 0.0 to 1.0, "
                f"got {self.centrality_edges!r}"
            )
        if values.shape != (edges.size - 1,) or np.any(~np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(
                f"MultiplicityModel.dndeta must hold {edges.size - 1} finite values > 0 (one per "
                f"centrality bin), got {self.dndeta!r}"
            )

    @classmethod
    def fixed(cls, dndeta: float) -> MultiplicityModel:
        """Every event has the same ``dN/deta`` (multiplicity fluctuates only by Poisson)."""
        return cls(centrality_edges=(0.0, 1.0), dndeta=(float(dndeta),))

    def dndeta_at(self, centrality: np.ndarray) -> np.ndarray:
        """``dN/deta`` at centrality ``c`` in [0, 1] (same shape as ``centrality``)."""
        edges = np.asarray(self.centrality_edges)
        centres = 0.5 * (edges[1:] + edges[:-1])
        logs = np.log(np.asarray(self.dndeta))
        return np.exp(np.interp(centrality, centres, logs))

    def dndeta_moments(self, n: int = 200_001) -> tuple[float, float]:
        """Mean and variance of ``dN/deta`` over minimum-bias events (trapezoid, ``n`` points)."""
        c = np.linspace(0.0, 1.0, n)
        v = self.dndeta_at(c)
        w = np.full(n, 1.0 / (n - 1))
        w[0] = w[-1] = 0.5 / (n - 1)
        mean = float(np.sum(w * v))
        return mean, float(np.sum(w * v * v) - mean * mean)

    def track_moments(self, eta_acc: float) -> tuple[float, float]:
        """Mean and variance of the track count per event and side, ``M ~ Poisson(dN/deta eta_acc)``."""
        mean, var = self.dndeta_moments()
        mu = mean * eta_acc
        return mu, mu + var * eta_acc**2


def sector_epsilon_map(factors: Sequence[float]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A relative epsilon map that is constant per sector: ``factors[s]`` for sector ``s``.

    Sector ``s`` covers ``phi in [2 pi s / 18, 2 pi (s + 1) / 18)``. The returned callable maps
    broadcastable ``(phi, r)`` arrays to relative factors (multiplying ``DensityConfig.epsilon``).
    """
    values = np.asarray(factors, dtype=float)
    if values.shape != (N_SECTORS,) or np.any(~np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"factors must be {N_SECTORS} finite values > 0 (one per sector), got {factors!r}")

    def epsilon_map(phi: np.ndarray, r: np.ndarray) -> np.ndarray:
        sector = np.floor(np.mod(phi, 2 * np.pi) / (2 * np.pi / N_SECTORS)).astype(int) % N_SECTORS
        return np.broadcast_to(values[sector], np.broadcast_shapes(np.shape(phi), np.shape(r)))

    return epsilon_map


@dataclass(frozen=True)
class DensityConfig:
    """Configuration of the space-charge simulation (all quantities per TPC side).

    Attributes:
        rate_hz: interaction rate in Hz (>= 0); pile-up ``N = rate_hz * ion_drift_time``.
        epsilon: ions flowing back per primary electron, gain x IBF (> 0; ~ 10, seed sect. 1).
        epsilon_map: optional relative local map ``f(phi, r)`` (broadcasting arrays -> factor > 0),
            the local epsilon being ``epsilon * f``; ``None`` means uniform.
        ion_drift_time: ion drift time over the full drift length in s (> 0).
        time_bin: time granularity in s (the IDC integration time; 0 < time_bin <= ion_drift_time).
        track_charge_rms: relative RMS of the single-track ionisation ``g`` (>= 0).
        primary_ions: include the primary-ionisation ions (besides the ion backflow).
        ionisation_per_cm: effective electrons per cm of track (> 0; sets the normalisation).
        multiplicity: the ``dN/deta`` distribution per event.
    """

    rate_hz: float = 50_000.0
    epsilon: float = 10.0
    epsilon_map: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    ion_drift_time: float = ION_DRIFT_TIME
    time_bin: float = IDC_INTEGRATION_TIME
    track_charge_rms: float = 0.3
    primary_ions: bool = True
    ionisation_per_cm: float = IONISATION_PER_CM
    multiplicity: MultiplicityModel = field(default_factory=MultiplicityModel)

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"DensityConfig.{name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"DensityConfig.{name} must be finite, got {value!r}")
            return float(value)

        if number("rate_hz") < 0:
            raise ValueError(f"DensityConfig.rate_hz must be >= 0 Hz, got {self.rate_hz!r}")
        for name in ("epsilon", "ion_drift_time", "ionisation_per_cm"):
            if number(name) <= 0:
                raise ValueError(f"DensityConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < number("time_bin") <= self.ion_drift_time:
            raise ValueError(
                f"DensityConfig.time_bin must satisfy 0 < time_bin <= ion_drift_time "
                f"({self.ion_drift_time} s), got {self.time_bin!r}"
            )
        if number("track_charge_rms") < 0:
            raise ValueError(f"DensityConfig.track_charge_rms must be >= 0, got {self.track_charge_rms!r}")
        if not isinstance(self.primary_ions, bool):
            raise TypeError(f"DensityConfig.primary_ions must be True or False, got {self.primary_ions!r}")
        if self.epsilon_map is not None and not callable(self.epsilon_map):
            raise TypeError(
                f"DensityConfig.epsilon_map must be None or a callable f(phi, r), got {self.epsilon_map!r}"
            )
        if not isinstance(self.multiplicity, MultiplicityModel):
            raise TypeError(
                f"DensityConfig.multiplicity must be a MultiplicityModel, got {type(self.multiplicity).__name__}"
            )

    @property
    def pile_up(self) -> float:
        """Mean number of ion pile-up events, ``rate x ion drift time``."""
        return self.rate_hz * self.ion_drift_time

    @property
    def n_time_bins(self) -> int:
        """Number of time bins covering one ion drift time (the last one may be partial)."""
        return int(math.ceil(self.ion_drift_time / self.time_bin - 1e-9))

    def epsilon_on(self, phi: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Local epsilon on broadcast ``(phi, r)`` arrays."""
        shape = np.broadcast_shapes(np.shape(phi), np.shape(r))
        if self.epsilon_map is None:
            return np.full(shape, self.epsilon)
        factor = np.broadcast_to(np.asarray(self.epsilon_map(phi, r), dtype=float), shape)
        if np.any(~np.isfinite(factor)) or np.any(factor <= 0):
            raise ValueError("DensityConfig.epsilon_map must return finite factors > 0")
        return self.epsilon * factor

    def time_edges(self) -> np.ndarray:
        """Ages (s) bounding the time bins, chronological order: bin ``t`` spans ``[edges[t+1], edges[t]]``.

        Shape (n_time_bins + 1,), from ``ion_drift_time`` (oldest) down to 0 (now).
        """
        n = self.n_time_bins
        ages = (n - np.arange(n + 1)) * self.time_bin
        ages[0] = min(ages[0], self.ion_drift_time)
        return ages


def reach_tables(r_nodes: np.ndarray, length: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Radial-reach bins of vertex tracks over the nodes ``r_nodes`` (increasing).

    Reach bin ``b < n - 1`` holds the tracks with ``r_exit = L / sinh(eta)`` in
    ``[r_b, r_{b+1})``, bin ``n - 1`` those reaching ``r_{n-1}``; a track of bin ``b`` crosses the
    nodes ``0..b``. Returns ``(p, cbar, eta_acc)``: the probability of each bin for ``eta`` uniform
    in ``[0, eta_acc]``, ``eta_acc = asinh(L / r_0)``, and the mean ``cosh(eta)`` in each bin
    (exact: ``(sinh eta_hi - sinh eta_lo) / (eta_hi - eta_lo)``).
    """
    r_nodes = np.asarray(r_nodes, dtype=float)
    eta_at = np.arcsinh(length / r_nodes)  # decreasing with r
    eta_hi = eta_at  # bin b: eta in (eta(r_{b+1}), eta(r_b)]
    eta_lo = np.append(eta_at[1:], 0.0)
    width = eta_hi - eta_lo
    eta_acc = float(eta_at[0])
    p = width / eta_acc
    cbar = (np.sinh(eta_hi) - np.sinh(eta_lo)) / width
    return p, cbar, eta_acc


def simulate_readout(
    config: DensityConfig,
    r_nodes: np.ndarray,
    n_phi: int,
    rng: np.random.Generator,
    *,
    n_samples: int = 1,
    length: float = DRIFT_LENGTH,
    n_sides: int = 1,
) -> np.ndarray:
    """Primary-electron ionisation reaching the readout per time bin, per (phi bin, radial node).

    Returns an array of shape ``(n_samples, n_sides, n_time_bins, n_phi, n_r)`` (float64) in
    track-cm per cm of radius: for phi bin ``k`` (``n_phi`` equal azimuth bins, the caller decides
    where they start) and node ``j``, the summed ``g cosh(eta)`` of the tracks of the bin that cross
    radius ``r_j``. Multiply by the bin's radial extent for track length and by
    ``ionisation_per_cm`` for electrons. Time bins are chronological (last = most recent).
    The sides share the events (centralities) and draw their tracks independently.
    """
    n_t = config.n_time_bins
    p_reach, cbar, eta_acc = reach_tables(r_nodes, length)
    n_r = p_reach.size
    widths = np.diff(config.time_edges()[::-1])[::-1]  # (n_t,) duration of each bin, s
    n_events = rng.poisson(config.rate_hz * widths, size=(n_samples, n_t))  # (S, T)
    centrality = rng.random(int(n_events.sum()))
    mu = config.multiplicity.dndeta_at(centrality) * eta_acc  # mean tracks per event and side
    owner = np.repeat(np.arange(n_samples * n_t), n_events.ravel())
    sum_mu = np.bincount(owner, weights=mu, minlength=n_samples * n_t).reshape(n_samples, 1, n_t, 1, 1)
    lam = sum_mu * (p_reach / n_phi)  # (S, 1, T, 1, R)
    lam = np.broadcast_to(lam, (n_samples, n_sides, n_t, n_phi, n_r))
    counts = rng.poisson(lam)  # tracks per (sample, side, time, phi, reach bin)
    if config.track_charge_rms > 0:
        a = 1.0 / config.track_charge_rms**2
        charge = rng.gamma(counts * a, 1.0 / a)  # sum of g over the tracks, g ~ Gamma(a, 1/a)
    else:
        charge = counts.astype(np.float64)
    charge *= cbar
    # a track of reach bin b crosses nodes 0..b: reverse cumulative sum over the reach axis
    return np.flip(np.cumsum(np.flip(charge, axis=-1), axis=-1), axis=-1)


def expected_readout(config: DensityConfig, r_nodes: np.ndarray, n_phi: int, *, length: float = DRIFT_LENGTH) -> np.ndarray:
    """Expectation of :func:`simulate_readout` per sample and side: shape ``(n_time_bins, n_phi, n_r)``.

    Per time bin of width ``dt``: ``rate dt <dN/deta> L / (r_j n_phi)`` (the 1/r profile of
    straight tracks per cm of radius; per unit area it is 1/r^2).
    """
    mean_dndeta, _ = config.multiplicity.dndeta_moments()
    widths = np.diff(config.time_edges()[::-1])[::-1]
    p_reach, cbar, eta_acc = reach_tables(r_nodes, length)
    per_track = np.flip(np.cumsum(np.flip(p_reach * cbar)))  # = L / (r_j eta_acc)
    rate = config.rate_hz * widths * mean_dndeta * eta_acc / n_phi
    return np.broadcast_to(rate[:, None, None] * per_track[None, None, :], (widths.size, n_phi, per_track.size)).copy()


def _z_weights(config: DensityConfig, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractions of each time bin's ions in each z cell: IBF ``(n_t, nz)``, primary ``(n_t, nz)``, cell lengths ``(nz,)``.

    The z cell of node ``i`` is ``[z_i - dz/2, z_i + dz/2]`` clipped to ``[0, L]``. Ions that
    entered during a bin of ages ``[A0, A1]`` lie uniformly on ``[L - v A1, L - v A0]``
    (``v = L / T``); the primary ions of an event of age ``tau`` lie uniformly on
    ``[0, L - v tau]`` with ``1/L`` of the event's electrons per cm, averaged exactly over the bin.
    """
    L = grid.length
    v = L / config.ion_drift_time
    z = grid.z
    c0 = np.clip(z - grid.dz / 2, 0.0, L)
    c1 = np.clip(z + grid.dz / 2, 0.0, L)
    w = c1 - c0  # (nz,)
    ages = config.time_edges()
    a_old, a_new = ages[:-1], ages[1:]  # bin t spans ages [a_new, a_old]
    z_lo = np.clip(L - v * a_old, 0.0, L)[:, None]  # (n_t, 1)
    z_hi = np.clip(L - v * a_new, 0.0, L)[:, None]
    span = np.maximum(z_hi - z_lo, 1e-300)
    ibf = np.clip(np.minimum(z_hi, c1) - np.maximum(z_lo, c0), 0.0, None) / span  # (n_t, nz)

    def h(x: np.ndarray) -> np.ndarray:
        # antiderivative of clip(s, 0, w) in s (w per cell)
        return np.where(x < 0, 0.0, np.where(x <= w, 0.5 * x * x, 0.5 * w * w + w * (x - w)))

    # mean over Z uniform in [z_lo, z_hi] of |[0, Z] cap cell| / L
    prim = (h(z_hi - c0) - h(z_lo - c0)) / span / L
    return ibf, prim, w


def density_from_readout(
    electrons: np.ndarray,
    grid: Grid,
    config: DensityConfig,
    *,
    epsilon_local: np.ndarray | None = None,
) -> np.ndarray:
    """Density rho/eps0 (V/cm^2) on ``grid`` from the readout history on the grid's (phi, r) cells.

    ``electrons`` has shape ``(..., n_time_bins, nphi, nr)`` (output of :func:`simulate_readout`
    with ``n_phi = grid.nphi`` and ``r_nodes = grid.r``; phi bin ``k`` centred on ``phi_k``),
    chronological. Returns ``(..., nphi, nr, nz)``. Ion backflow: ``epsilon(phi, r)`` times the
    electrons, drifting from the readout; primary ions: one per electron, see :func:`_z_weights`.
    """
    electrons = np.asarray(electrons, dtype=np.float64)
    n_t = config.n_time_bins
    if electrons.ndim < 3 or electrons.shape[-3:] != (n_t, grid.nphi, grid.nr):
        raise ValueError(
            f"electrons must have shape (..., {n_t}, {grid.nphi}, {grid.nr}) = (..., n_time_bins, nphi, nr), "
            f"got {electrons.shape}"
        )
    ibf_w, prim_w, cell = _z_weights(config, grid)
    if epsilon_local is None:
        epsilon_local = config.epsilon_on(grid.phi[:, None], grid.r[None, :])  # (nphi, nr)
    ions = np.einsum("...tpr,ti->...pri", electrons, ibf_w) * epsilon_local[..., None]
    if config.primary_ions:
        ions = ions + np.einsum("...tpr,ti->...pri", electrons, prim_w)
    # ions per cm of radius in the cell (phi_k, r_j, z_i) -> per cm^3: / (r_j dphi dz_i)
    volume = grid.r[None, :, None] * grid.dphi * cell[None, None, :]  # (1, nr, nz)
    return ions * (config.ionisation_per_cm * E_OVER_EPS0) / volume


@dataclass(frozen=True)
class DensitySample:
    """One or more simulated maps: ``density`` (n, nphi, nr, nz) in V/cm^2 and the readout
    history ``electrons`` (n, n_time_bins, nphi, nr) in track-cm per cm of radius (chronological)."""

    density: np.ndarray
    electrons: np.ndarray
    grid: Grid
    config: DensityConfig

    def idc1d(self) -> np.ndarray:
        """Relative 1D IDC per time bin, (n, n_time_bins): ion charge entering per bin, normalised to
        the expectation of the configured rate (so it fluctuates around 1)."""
        eps = self.config.epsilon_on(self.grid.phi[:, None], self.grid.r[None, :])
        dr = _cell_widths(self.grid.r)
        total = np.einsum("ntpr,pr,r->nt", self.electrons, eps, dr)
        expected = np.einsum(
            "tpr,pr,r->t", expected_readout(self.config, self.grid.r, self.grid.nphi, length=self.grid.length), eps, dr
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(expected > 0, total / np.where(expected > 0, expected, 1.0), 0.0)

    def idc_maps(self) -> np.ndarray:
        """2D IDC maps of this same simulation on the grid's (phi, r) cells, (n, n_time_bins, nphi, nr).

        Pad groups of one grid cell each: per time bin (chronological) the ions that the
        amplification sends back into the drift volume through the cell, ``epsilon(phi, r) x
        ionisation_per_cm x`` the primary-electron track length arriving there (the IDC definition
        of :mod:`streamcal.detectors.tpc.idc`). Their history determines ``density`` exactly:
        ``density_from_readout(maps / (epsilon ionisation_per_cm dr_cell), grid, config)``, and
        ``idc_1d`` of the maps is proportional to :meth:`idc1d`.
        """
        eps = self.config.epsilon_on(self.grid.phi[:, None], self.grid.r[None, :])  # (nphi, nr)
        per_cell = eps * _cell_widths(self.grid.r)[None, :] * self.config.ionisation_per_cm  # (nphi, nr)
        return self.electrons * per_cell[None, None]  # (n, n_t, nphi, nr)


def _cell_widths(x: np.ndarray) -> np.ndarray:
    """Widths of the cells around the nodes ``x`` (half cells at both ends)."""
    edges = np.concatenate([[x[0]], 0.5 * (x[1:] + x[:-1]), [x[-1]]])
    return np.diff(edges)


class DensitySimulator:
    """Random space-charge density maps on a grid (module doc; seed eq. 1 statistics).

    >>> sim = DensitySimulator("90x17x17")
    >>> sample = sim.sample(seed=1, n=2)   # sample.density: (2, 90, 17, 17) V/cm^2
    """

    def __init__(self, grid: Grid | str | tuple[int, int, int], config: DensityConfig | None = None) -> None:
        self.grid = parse_grid(grid)
        self.config = DensityConfig() if config is None else config
        if not isinstance(self.config, DensityConfig):
            raise TypeError(f"config must be a DensityConfig, got {type(self.config).__name__}")

    def __repr__(self) -> str:
        return f"DensitySimulator(grid={self.grid}, rate_hz={self.config.rate_hz}, epsilon={self.config.epsilon})"

    def sample(self, seed: Any = None, n: int = 1) -> DensitySample:
        """``n`` independent maps (vectorised)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        rng = as_generator(seed)
        g = self.grid
        electrons = simulate_readout(self.config, g.r, g.nphi, rng, n_samples=int(n), length=g.length)[:, 0]
        return DensitySample(density_from_readout(electrons, g, self.config), electrons, g, self.config)

    def average(self) -> np.ndarray:
        """The nominal average map (expectation of :meth:`sample`), shape (nphi, nr, nz)."""
        return average_density(self.grid, self.config)


def simulate_density(
    grid: Grid | str | tuple[int, int, int], config: DensityConfig | None = None, *, seed: Any = None, n: int = 1
) -> np.ndarray:
    """``n`` random density maps, shape (n, nphi, nr, nz), rho/eps0 in V/cm^2."""
    return DensitySimulator(grid, config).sample(seed, n).density


def average_density(grid: Grid | str | tuple[int, int, int], config: DensityConfig | None = None) -> np.ndarray:
    """Nominal average density (nphi, nr, nz) in V/cm^2: the exact expectation of the simulator.

    Ion backflow: ``rate <dN/deta> epsilon(phi, r) n_ion e / (2 pi eps0 r^2)`` uniform in z (cell
    averages at the z boundaries); primary ions add ``(1 - z/L)`` times that over epsilon.
    """
    g = parse_grid(grid)
    config = DensityConfig() if config is None else config
    return density_from_readout(expected_readout(config, g.r, g.nphi, length=g.length), g, config)


def eq1_relative_fluctuation(
    n_pileup: float | np.ndarray,
    *,
    mult_relative_rms: float,
    mean_tracks: float,
    fraction: float | np.ndarray = 1.0,
    charge_relative_rms: float | np.ndarray = 0.0,
) -> np.ndarray:
    """The seed's eq. 1: relative space-charge density fluctuation.

    ``sigma/mu = sqrt(1 + (sigma_M/mu_M)^2 + (1 + (sigma_Q/mu_Q)^2) / (F mu_M)) / sqrt(N)``
    with ``F`` the fraction of tracks crossing the volume element (1: full volume).
    """
    n = np.asarray(n_pileup, dtype=float)
    term = 1.0 + mult_relative_rms**2 + (1.0 + np.asarray(charge_relative_rms) ** 2) / (np.asarray(fraction) * mean_tracks)
    return np.sqrt(term / n)
