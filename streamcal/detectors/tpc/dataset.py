"""Training-set generator for the distortion-fluctuation corrections (seed section 4.2).

The seed's *augmentation procedure*: ``K`` random density maps (default 1000, simulated with
:mod:`streamcal.detectors.tpc.density` at the nominal rate) are combined with ``M = 27`` average
maps, giving ``K x M`` samples. The average maps are the nominal average (the exact expectation
of the simulator, the ``K -> infinity`` limit of the seed's "average of all random maps") scaled by

    s(d) = 1 + c + l (d - 0.5) + p (d - 0.5)^2,   c, l, p in {-x, 0, +x}  (x = 0.1: "+-10 %"),

with ``d = (L - z) / L`` the relative drift length (0 at the readout, 1 at the central
electrode). A sample holds the average map, the fluctuation ``random - average`` of the density
and of the distortions and corrections (dr, drphi, dz from
:func:`~streamcal.detectors.tpc.langevin.space_charge_distortions`), and the matching 1D IDC
series. The distortions of each random map and of the 27 average maps are computed once, so a
sample costs two subtractions.

Bias (training only): "the space-charge densities of the training samples are randomly biased
towards generally lower or higher values to make the distribution of fluctuations more uniform".
With ``bias = b > 0`` each random map of the training split is multiplied by ``f = 1 + b u``,
``u ~ U(-1, 1)`` (its IDCs too, as a change of rate would); the global fluctuation, normally
Gaussian with sigma ~ 1.5 % (eq. 1 at 10^4 pile-up), becomes roughly uniform over ``+-b``. The
evaluation split is always unbiased (``f = 1``).

Local perturbations (training only, off by default): the seed's model fails its line-charge test
(Fig. 5) because the training fluctuations are all global or diffuse, so the network never sees
the response to a *local* charge. With ``local_fraction = p > 0`` each random map of the training
split carries, with probability ``p``, 1 to ``local_max`` localized excesses or deficits of
ionisation: at a random (phi, r), a transverse Gaussian of width ``U(local_width_cm)`` and peak
``a x`` the expected readout there, ``a ~ U(local_amplitude)``, either during the whole ion drift
time (a line charge along all z, as in the seed's test) or during a random interval (a charge
localized in z). They are added to the simulated readout history before the density and the IDCs
are computed from it, so both see them consistently (a local source raises the 1D IDCs by its share
of the charge). They use their own random stream, so a map without them is identical to the one
drawn with ``local_fraction = 0``. The evaluation split never has them.

Determinism and disjoint splits: random map ``k`` of split ``s`` is drawn from
``numpy.random.SeedSequence(seed, spawn_key=(SPLIT_KEYS[s], k))``. Distinct ``(split, k)`` give
independent streams, so the training and evaluation splits never share a random map, and a sample
depends only on ``(seed, split, index)`` (not on workers, shards or order).

Sample order: ``index = k * M + m`` (random map ``k``, average ``m``). Units: densities rho/eps0 in
V/cm^2, distortions and corrections in cm, IDCs relative to the nominal expectation (1 = nominal).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from streamcal.detectors.tpc.constants import N_SECTORS, Grid, parse_grid
from streamcal.detectors.tpc.density import (
    DensityConfig,
    DensitySample,
    DensitySimulator,
    average_density,
    density_from_readout,
    expected_readout,
)
from streamcal.detectors.tpc.idc import idc_fourier

__all__ = [
    "SPLIT_KEYS",
    "N_AVERAGE_MAPS",
    "TENSOR_FIELDS",
    "SCALAR_FIELDS",
    "DatasetConfig",
    "average_scalings",
    "scaled_average",
    "DatasetGenerator",
    "TPCFluctuationDataset",
    "write_shards",
    "read_shards",
    "LINE_CHARGE_WIDTH",
    "gaussian_spot",
    "line_charge_profile",
    "line_charge_sample",
]

SPLIT_KEYS: dict[str, int] = {"train": 0, "eval": 1}
N_AVERAGE_MAPS = 27
TENSOR_FIELDS = (
    "density_average",  # (nphi, nr, nz) V/cm^2
    "density_fluctuation",  # (nphi, nr, nz) V/cm^2, random - average
    "distortion_fluctuation",  # (3, nphi, nr, nz) cm: dr, drphi, dz
    "correction_fluctuation",  # (3, nphi, nr, nz) cm
    "idc1d",  # (n_time_bins,) relative 1D IDC of the random map, chronological
    "idc1d_average",  # (n_time_bins,) expected relative 1D IDC of the average map, s(d(t))
    "idc_fourier",  # (2 n_fourier,) [Re, Im] of rfft(idc1d - 1) / n_time_bins
)
SCALAR_FIELDS = (
    "sample_index",
    "random_index",
    "average_index",
    "scale_c",
    "scale_l",
    "scale_p",
    "bias_factor",
    "relative_fluctuation",  # sum((random - average) dV) / sum(average dV)
)
UNITS = {
    "density_average": "V/cm^2 (rho/eps0)",
    "density_fluctuation": "V/cm^2 (rho/eps0)",
    "distortion_fluctuation": "cm (dr, drphi, dz)",
    "correction_fluctuation": "cm (dr, drphi, dz)",
    "idc1d": "relative to the nominal expectation",
    "idc1d_average": "relative to the nominal expectation",
    "idc_fourier": "rfft(idc1d - 1) / n, [Re c_0..c_k-1, Im c_0..c_k-1]",
}


@dataclass(frozen=True)
class DatasetConfig:
    """Configuration of the augmented training set.

    Attributes:
        grid: the (phi x r x z) grid (a :class:`Grid` or ``"90x17x17"``).
        n_random: number ``K`` of random density maps (>= 1).
        scale_step: ``x`` of the average-map scalings (0 <= x < 1 / 1.25 so that s(d) > 0).
        bias: half-width ``b`` of the training bias factor ``1 + b U(-1, 1)`` (0 <= b < 1).
        split: ``"train"`` or ``"eval"`` (eval is never biased).
        seed: non-negative integer.
        density: the density simulation (rate, epsilon, ...).
        n_fourier: number of Fourier coefficients of the 1D IDC series (>= 1).
        local_fraction: probability that a training random map carries local perturbations
            (module doc; 0 = none; the evaluation split never has them).
        local_max: at most this many perturbations per map (1 .. local_max, uniform).
        local_amplitude: ``(lo, hi)`` of the peak amplitude relative to the expected local readout
            (``lo >= -1``: a deficit cannot remove more than all of the ionisation).
        local_width_cm: ``(lo, hi)`` of the transverse Gaussian sigma in cm.
    """

    grid: Grid | str = field(default_factory=lambda: Grid(90, 17, 17))
    n_random: int = 1000
    scale_step: float = 0.1
    bias: float = 0.05
    split: Literal["train", "eval"] = "train"
    seed: int = 0
    density: DensityConfig = field(default_factory=DensityConfig)
    n_fourier: int = 20
    local_fraction: float = 0.0
    local_max: int = 3
    local_amplitude: tuple[float, float] = (-0.5, 1.5)
    local_width_cm: tuple[float, float] = (3.0, 12.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", parse_grid(self.grid, argument="DatasetConfig.grid"))
        if isinstance(self.n_random, bool) or not isinstance(self.n_random, (int, np.integer)) or self.n_random < 1:
            raise ValueError(f"DatasetConfig.n_random must be an integer >= 1, got {self.n_random!r}")
        if not isinstance(self.scale_step, (int, float)) or not 0 <= self.scale_step < 0.8:
            raise ValueError(f"DatasetConfig.scale_step must be a number in [0, 0.8), got {self.scale_step!r}")
        if not isinstance(self.bias, (int, float)) or not 0 <= self.bias < 1:
            raise ValueError(f"DatasetConfig.bias must be a number in [0, 1), got {self.bias!r}")
        if self.split not in SPLIT_KEYS:
            raise ValueError(f"DatasetConfig.split must be one of {sorted(SPLIT_KEYS)}, got {self.split!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"DatasetConfig.seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.density, DensityConfig):
            raise TypeError(f"DatasetConfig.density must be a DensityConfig, got {type(self.density).__name__}")
        n_t = self.density.n_time_bins
        if isinstance(self.n_fourier, bool) or not isinstance(self.n_fourier, (int, np.integer)) or not 1 <= self.n_fourier <= n_t // 2 + 1:
            raise ValueError(f"DatasetConfig.n_fourier must be an integer in [1, {n_t // 2 + 1}], got {self.n_fourier!r}")
        if not isinstance(self.local_fraction, (int, float)) or not 0 <= self.local_fraction <= 1:
            raise ValueError(f"DatasetConfig.local_fraction must be a number in [0, 1], got {self.local_fraction!r}")
        if isinstance(self.local_max, bool) or not isinstance(self.local_max, (int, np.integer)) or self.local_max < 1:
            raise ValueError(f"DatasetConfig.local_max must be an integer >= 1, got {self.local_max!r}")
        lo, hi = _range_pair(self.local_amplitude, "local_amplitude")
        if lo < -1:
            raise ValueError(f"DatasetConfig.local_amplitude must have lo >= -1 (at most all of the ionisation removed), got {lo}")
        wlo, whi = _range_pair(self.local_width_cm, "local_width_cm")
        if wlo <= 0 or whi >= self.grid.r_max - self.grid.r_min:  # type: ignore[union-attr]
            raise ValueError(f"DatasetConfig.local_width_cm must lie in (0, {self.grid.r_max - self.grid.r_min}) cm, "  # type: ignore[union-attr]
                             f"got ({wlo}, {whi})")
        object.__setattr__(self, "local_amplitude", (lo, hi))
        object.__setattr__(self, "local_width_cm", (wlo, whi))

    @property
    def n_samples(self) -> int:
        return self.n_random * N_AVERAGE_MAPS

    @property
    def effective_bias(self) -> float:
        return self.bias if self.split == "train" else 0.0

    @property
    def effective_local_fraction(self) -> float:
        return float(self.local_fraction) if self.split == "train" else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description (shard metadata)."""
        d = self.density
        return {
            "grid": str(self.grid),
            "n_random": int(self.n_random),
            "n_average": N_AVERAGE_MAPS,
            "scale_step": self.scale_step,
            "bias": self.effective_bias,
            "split": self.split,
            "seed": int(self.seed),
            "n_fourier": int(self.n_fourier),
            "density": {
                "rate_hz": d.rate_hz,
                "epsilon": d.epsilon,
                "epsilon_map": None if d.epsilon_map is None else repr(d.epsilon_map),
                "ion_drift_time": d.ion_drift_time,
                "time_bin": d.time_bin,
                "track_charge_rms": d.track_charge_rms,
                "primary_ions": d.primary_ions,
                "ionisation_per_cm": d.ionisation_per_cm,
                "multiplicity": asdict(d.multiplicity),
            },
            "units": UNITS,
            # only when used, so that data without local perturbations keeps its cache key
            **({"local": {"fraction": self.effective_local_fraction, "max": int(self.local_max),
                          "amplitude": list(self.local_amplitude), "width_cm": list(self.local_width_cm)}}
               if self.effective_local_fraction > 0 else {}),
        }


def _range_pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"DatasetConfig.{name} must be a pair (lo, hi) of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"DatasetConfig.{name} must be a pair of finite numbers with lo <= hi, got {value!r}")
    return lo, hi


def average_scalings(x: float = 0.1) -> np.ndarray:
    """The 27 ``(c, l, p)`` triples, each in ``{-x, 0, +x}`` (index 13 is the nominal 0, 0, 0)."""
    return np.array(list(itertools.product((-x, 0.0, x), repeat=3)), dtype=np.float64)


def scaled_average(nominal: np.ndarray, grid: Grid, c: float, l: float, p: float) -> np.ndarray:
    """``nominal * s(d)`` with ``s(d) = 1 + c + l (d - 0.5) + p (d - 0.5)^2``, ``d = (L - z)/L``."""
    d = (grid.length - grid.z) / grid.length
    return nominal * (1.0 + c + l * (d - 0.5) + p * (d - 0.5) ** 2)


class DatasetGenerator:
    """Produces the samples of a :class:`DatasetConfig` by index (module doc).

    ``solver``: an optional :class:`~streamcal.detectors.tpc.poisson.PoissonSolver` to reuse;
    ``device``: where the distortions are computed.
    """

    def __init__(self, config: DatasetConfig | None = None, *, solver: Any = None, device: str | torch.device = "cpu") -> None:
        self.config = DatasetConfig() if config is None else config
        if not isinstance(self.config, DatasetConfig):
            raise TypeError(f"config must be a DatasetConfig, got {type(self.config).__name__}")
        self.grid: Grid = self.config.grid  # type: ignore[assignment]
        self.device = torch.device(device)
        self._solver = solver
        self._simulator = DensitySimulator(self.grid, self.config.density)
        self.scalings = average_scalings(self.config.scale_step)  # (27, 3)
        self.nominal = average_density(self.grid, self.config.density)  # (nphi, nr, nz)
        self._averages: np.ndarray | None = None
        self._average_distortions: tuple[np.ndarray, np.ndarray] | None = None
        self._cache: tuple[int, dict[str, Any]] | None = None
        self._expected: np.ndarray | None = None  # expected readout per bin, for local perturbations
        ages = self.config.density.time_edges()
        d_mid = 0.5 * (ages[:-1] + ages[1:]) / self.config.density.ion_drift_time  # (n_t,)
        c, l, p = self.scalings.T
        self._idc_average = 1.0 + c[:, None] + l[:, None] * (d_mid - 0.5) + p[:, None] * (d_mid - 0.5) ** 2  # (27, n_t)
        _, nr, nz = self.grid.shape
        edges_r = np.concatenate([[self.grid.r[0]], 0.5 * (self.grid.r[1:] + self.grid.r[:-1]), [self.grid.r[-1]]])
        edges_z = np.concatenate([[0.0], 0.5 * (self.grid.z[1:] + self.grid.z[:-1]), [self.grid.length]])
        self._volume = self.grid.dphi * (self.grid.r * np.diff(edges_r))[:, None] * np.diff(edges_z)[None, :]  # (nr, nz)

    def __len__(self) -> int:
        return self.config.n_samples

    # -- physics -------------------------------------------------------------------------------
    def _distortions(self, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distortion, correction) of ``rho`` (..., nphi, nr, nz) -> (..., 3, nphi, nr, nz) each, cm."""
        from streamcal.detectors.tpc.langevin import space_charge_distortions  # solver stack, loaded on use
        from streamcal.detectors.tpc.poisson import PoissonSolver

        if self._solver is None:
            self._solver = PoissonSolver(self.grid, dtype=torch.float64, device=self.device)
        t = torch.as_tensor(rho, dtype=torch.float64, device=self.device)
        out = space_charge_distortions(t, self.grid, solver=self._solver, corrections=True)
        return out.distortion.detach().cpu().numpy(), out.correction.detach().cpu().numpy()

    @property
    def averages(self) -> np.ndarray:
        """The 27 average maps, shape (27, nphi, nr, nz)."""
        if self._averages is None:
            self._averages = np.stack([scaled_average(self.nominal, self.grid, *s) for s in self.scalings])
        return self._averages

    def average_distortions(self) -> tuple[np.ndarray, np.ndarray]:
        """Distortions and corrections of the 27 average maps, (27, 3, nphi, nr, nz) each (cached)."""
        if self._average_distortions is None:
            self._average_distortions = self._distortions(self.averages)
        return self._average_distortions

    def random_seed_sequence(self, k: int) -> np.random.SeedSequence:
        """The seed of random map ``k`` of this split (module doc)."""
        return np.random.SeedSequence(int(self.config.seed), spawn_key=(SPLIT_KEYS[self.config.split], int(k)))

    def random_map(self, k: int, *, with_distortions: bool = True) -> dict[str, Any]:
        """Random map ``k``: ``density`` (nphi, nr, nz), ``idc1d`` (n_t,), ``bias_factor`` and, if
        asked, its ``distortion`` and ``correction`` (3, nphi, nr, nz); ``local``: the local
        perturbations it carries (module doc), each ``{phi0 (rad), r0 (cm), width (cm), amplitude,
        t0, t1}`` with ``[t0, t1)`` the time bins (chronological) it lasts."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < self.config.n_random:
            raise IndexError(f"random map index must be in [0, {self.config.n_random}), got {k!r}")
        if self._cache is not None and self._cache[0] == k and ("distortion" in self._cache[1] or not with_distortions):
            return self._cache[1]
        rng = np.random.default_rng(self.random_seed_sequence(k))
        sample = self._simulator.sample(rng, n=1)
        b = self.config.effective_bias
        f = 1.0 + b * rng.uniform(-1.0, 1.0) if b > 0 else 1.0
        local: list[dict[str, float]] = []
        if self.config.effective_local_fraction > 0:
            sample, local = self._perturb(sample, k)
        out: dict[str, Any] = {
            "density": sample.density[0] * f,
            "idc1d": sample.idc1d()[0] * f,
            "bias_factor": float(f),
            "local": local,
        }
        if with_distortions:
            out["distortion"], out["correction"] = self._distortions(out["density"])
        self._cache = (int(k), out)
        return out

    def _perturb(self, sample: DensitySample, k: int) -> tuple[DensitySample, list[dict[str, float]]]:
        """Local perturbations of random map ``k`` (module doc), from their own random stream."""
        cfg = self.config
        rng = np.random.default_rng(np.random.SeedSequence(int(cfg.seed), spawn_key=(SPLIT_KEYS[cfg.split], int(k), 1)))
        if rng.random() >= cfg.effective_local_fraction:
            return sample, []
        g = self.grid
        if self._expected is None:  # the same for every map
            self._expected = expected_readout(cfg.density, g.r, g.nphi, length=g.length)  # (n_t, nphi, nr)
        expected = self._expected
        electrons = sample.electrons.copy()  # (1, n_t, nphi, nr)
        n_t = electrons.shape[1]
        n = int(rng.integers(1, cfg.local_max + 1))
        local = []
        for _ in range(n):
            width = rng.uniform(*cfg.local_width_cm)
            r0 = rng.uniform(g.r_min + 0.5 * width, g.r_max - 0.5 * width)
            phi0 = rng.uniform(0.0, 2.0 * math.pi)
            spot = gaussian_spot(g, phi0=phi0, r0=r0, width=width)  # (nphi, nr)
            amplitude = rng.uniform(*cfg.local_amplitude)
            if rng.random() < 0.5:  # the whole drift time: a line charge along all z
                t0, t1 = 0, n_t
            else:  # a random interval of 10-60 % of it: a charge localized in z
                span = max(1, int(round(rng.uniform(0.1, 0.6) * n_t)))
                t0 = int(rng.integers(0, n_t - span + 1))
                t1 = t0 + span
            electrons[0, t0:t1] += amplitude * expected[t0:t1] * spot[None]
            local.append({"phi0": phi0, "r0": r0, "width": width, "amplitude": amplitude, "t0": t0, "t1": t1})
        np.clip(electrons, 0.0, None, out=electrons)
        density = density_from_readout(electrons, g, cfg.density)
        return DensitySample(density, electrons, g, cfg.density), local

    def sample(self, index: int) -> dict[str, Any]:
        """Sample ``index = k * 27 + m`` as numpy arrays (float32) and scalars (module doc)."""
        n = self.config.n_samples
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise IndexError(f"sample index must be in [0, {n}), got {index!r}")
        k, m = divmod(int(index), N_AVERAGE_MAPS)
        rnd = self.random_map(k)
        avg = self.averages[m]
        avg_dist, avg_corr = self.average_distortions()
        return self._assemble(
            index=int(index), random_index=k, average_index=m, average=avg, random=rnd,
            dist_fluct=rnd["distortion"] - avg_dist[m], corr_fluct=rnd["correction"] - avg_corr[m],
            idc_average=self._idc_average[m], scaling=self.scalings[m],
        )  # fmt: skip

    def _assemble(
        self,
        *,
        index: int,
        random_index: int,
        average_index: int,
        average: np.ndarray,
        random: dict[str, Any],
        dist_fluct: np.ndarray,
        corr_fluct: np.ndarray,
        idc_average: np.ndarray,
        scaling: np.ndarray,
    ) -> dict[str, Any]:
        fluct = random["density"] - average
        integral = float(np.sum(average * self._volume))
        rel = float(np.sum(fluct * self._volume)) / integral if integral > 0 else 0.0
        idc1d = np.asarray(random["idc1d"], dtype=np.float64)
        return {
            "density_average": average.astype(np.float32),
            "density_fluctuation": fluct.astype(np.float32),
            "distortion_fluctuation": dist_fluct.astype(np.float32),
            "correction_fluctuation": corr_fluct.astype(np.float32),
            "idc1d": idc1d.astype(np.float32),
            "idc1d_average": np.asarray(idc_average, dtype=np.float32),
            "idc_fourier": idc_fourier(idc1d, self.config.n_fourier).astype(np.float32),
            "sample_index": np.int64(index),
            "random_index": np.int64(random_index),
            "average_index": np.int64(average_index),
            "scale_c": np.float32(scaling[0]),
            "scale_l": np.float32(scaling[1]),
            "scale_p": np.float32(scaling[2]),
            "bias_factor": np.float32(random["bias_factor"]),
            "relative_fluctuation": np.float32(rel),
        }

    def iter_samples(self, indices: Sequence[int] | range) -> Iterator[dict[str, Any]]:
        """Samples in the given order (consecutive indices of one random map reuse its distortions)."""
        for i in indices:
            yield self.sample(int(i))


def _shard_indices(start: int, stop: int, worker: int, n_workers: int) -> list[int]:
    """Indices of ``[start, stop)`` whose random map ``index // 27`` falls to ``worker``."""
    return [i for i in range(start, stop) if (i // N_AVERAGE_MAPS) % n_workers == worker]


class TPCFluctuationDataset(IterableDataset):
    """The augmented training set generated on the fly (a torch IterableDataset).

    Yields dicts of CPU tensors (fields :data:`TENSOR_FIELDS` and :data:`SCALAR_FIELDS`) for the
    sample indices ``[start, stop)``. With a multi-worker DataLoader each worker takes whole random
    maps (``(index // 27) % num_workers == worker_id``), so every sample is produced exactly once
    and each worker computes the distortions of its random maps once.
    """

    def __init__(self, config: DatasetConfig | None = None, *, start: int = 0, stop: int | None = None, device: str = "cpu") -> None:
        super().__init__()
        self.config = DatasetConfig() if config is None else config
        n = self.config.n_samples
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise ValueError(f"start, stop must satisfy 0 <= start <= stop <= {n} (n_samples), got {start}, {stop}")
        self.start, self.stop, self.device = int(start), int(stop), device
        self._generator: DatasetGenerator | None = None

    def __len__(self) -> int:
        return self.stop - self.start

    def indices(self) -> list[int]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return _shard_indices(self.start, self.stop, worker, n_workers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._generator is None:
            self._generator = DatasetGenerator(self.config, device=self.device)
        for s in self._generator.iter_samples(self.indices()):
            yield {k: torch.from_numpy(np.asarray(v)) for k, v in s.items()}


def _to_table(rows: list[dict[str, Any]], metadata: dict[str, Any]) -> Any:
    import pyarrow as pa

    columns: dict[str, Any] = {}
    for name in TENSOR_FIELDS:
        stacked = np.ascontiguousarray(np.stack([r[name] for r in rows]))  # (n, *shape)
        columns[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(stacked)
    for name in SCALAR_FIELDS:
        columns[name] = pa.array(np.array([r[name] for r in rows]))
    table = pa.table(columns)
    return table.replace_schema_metadata({"streamcal.tpc.dataset": json.dumps(metadata)})


def write_shards(
    config: DatasetConfig,
    out_dir: str | Path,
    *,
    n_samples: int | None = None,
    start: int = 0,
    shard_size: int = 1000,
    file_format: Literal["parquet", "arrow"] = "parquet",
    progress: bool = True,
    device: str = "cpu",
) -> list[Path]:
    """Write samples ``[start, start + n_samples)`` to ``out_dir`` as Parquet or Arrow IPC shards.

    Files ``{split}-{i:05d}.{parquet|arrow}`` of at most ``shard_size`` rows; tensors are Arrow
    fixed-shape tensor columns, the config and units are in the schema metadata and in
    ``{split}-dataset.json``. Returns the shard paths. A tqdm bar shows progress.
    """
    import pyarrow.feather as feather
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    total = config.n_samples - start if n_samples is None else n_samples
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if not 0 <= start or not 1 <= total or start + total > config.n_samples:
        raise ValueError(
            f"start and n_samples must satisfy 0 <= start, 1 <= n_samples, start + n_samples <= {config.n_samples} "
            f"(n_random x 27), got start={start}, n_samples={n_samples}"
        )
    if file_format not in ("parquet", "arrow"):
        raise ValueError(f"file_format must be 'parquet' or 'arrow', got {file_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = DatasetGenerator(config, device=device)
    meta = config.summary()
    (out / f"{config.split}-dataset.json").write_text(json.dumps(meta, indent=2))
    paths: list[Path] = []
    rows: list[dict[str, Any]] = []
    n_shards = math.ceil(total / shard_size)
    with tqdm(total=total, desc=f"tpc dataset ({config.split})", unit="sample", disable=not progress) as bar:
        for s in generator.iter_samples(range(start, start + total)):
            rows.append(s)
            bar.update(1)
            if len(rows) == shard_size or s["sample_index"] == start + total - 1:
                path = out / f"{config.split}-{len(paths):05d}.{file_format}"
                table = _to_table(rows, {**meta, "shard": len(paths), "n_shards": n_shards})
                if file_format == "parquet":
                    pq.write_table(table, path, use_dictionary=False)  # dictionaries only slow float maps down
                else:
                    feather.write_feather(table, path, compression="uncompressed")
                paths.append(path)
                rows = []
    return paths


def read_shards(paths: str | Path | Sequence[str | Path]) -> dict[str, np.ndarray]:
    """Read shards written by :func:`write_shards` (a directory or files) into numpy arrays."""
    import pyarrow as pa
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    if isinstance(paths, (str, Path)) and Path(paths).is_dir():
        files = sorted(p for p in Path(paths).iterdir() if p.suffix in (".parquet", ".arrow"))
    else:
        files = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not files:
        raise FileNotFoundError(f"no .parquet or .arrow shards in {paths!s}")
    tables = [pq.read_table(f) if f.suffix == ".parquet" else feather.read_table(f) for f in files]
    table = pa.concat_tables(tables)
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        out[name] = col.to_numpy_ndarray() if isinstance(col.type, pa.FixedShapeTensorType) else col.to_numpy()
    return out


LINE_CHARGE_WIDTH = 5.0  # cm, default transverse Gaussian sigma of the line charge


def gaussian_spot(grid: Grid | str | tuple[int, int, int], *, phi0: float, r0: float, width: float) -> np.ndarray:
    """A transverse Gaussian spot (nphi, nr) of ``width`` cm at ``(phi0, r0)`` in the (x, y) plane.

    Sampled on the grid's (phi, r) nodes and rescaled so that its integral over the grid's cells,
    ``sum(spot * r dr dphi)``, equals that of the continuous Gaussian of peak 1, ``2 pi width^2``
    cm^2: the spot carries the same charge on any grid, also where the grid spacing exceeds the width
    (then it spreads over the nearest nodes).
    """
    g = parse_grid(grid)
    d2 = g.r[None, :] ** 2 + r0**2 - 2.0 * r0 * g.r[None, :] * np.cos(g.phi[:, None] - phi0)  # (nphi, nr)
    spot = np.exp(-d2 / (2.0 * width * width))
    edges = np.concatenate([[g.r[0]], 0.5 * (g.r[1:] + g.r[:-1]), [g.r[-1]]])
    area = g.dphi * g.r * np.diff(edges)  # (nr,) cell areas in cm^2
    return spot * (2.0 * math.pi * width * width / float(np.sum(spot * area[None, :])))


def line_charge_profile(
    grid: Grid | str | tuple[int, int, int], *, radius: float = 110.0, sector: int = 9,
    width: float = LINE_CHARGE_WIDTH,
) -> np.ndarray:
    """Transverse profile (nphi, nr) of a line charge along z at ``radius`` (cm) and the centre of
    ``sector`` (phi = (sector + 0.5) x 20 deg), in units of its peak value: :func:`gaussian_spot`
    of ``width`` cm there. Errors name the argument and its allowed range.
    """
    g = parse_grid(grid)
    if not isinstance(radius, (int, float)) or not g.r_min < radius < g.r_max:
        raise ValueError(f"radius must be inside the drift volume ({g.r_min}, {g.r_max}) cm, got {radius!r}")
    if isinstance(sector, bool) or not isinstance(sector, (int, np.integer)) or not 0 <= sector < N_SECTORS:
        raise ValueError(f"sector must be an integer in [0, {N_SECTORS - 1}], got {sector!r}")
    if not isinstance(width, (int, float)) or not math.isfinite(width) or not 0 < width < g.r_max - g.r_min:
        raise ValueError(f"width must be a number of cm in (0, {g.r_max - g.r_min}), got {width!r}")
    phi0 = (sector + 0.5) * 2.0 * math.pi / N_SECTORS
    return gaussian_spot(g, phi0=phi0, r0=radius, width=width)


def line_charge_sample(
    grid: Grid | str | tuple[int, int, int] = "90x17x17",
    *,
    radius: float = 110.0,
    sector: int = 9,
    relative_amplitude: float = 1.0,
    width: float = LINE_CHARGE_WIDTH,
    density_config: DensityConfig | None = None,
    n_fourier: int = 20,
    solver: Any = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """The line-charge case of the seed (Fig. 5) in the dataset's sample format.

    A density fluctuation constant along all z at ``radius`` (cm) in ``sector``
    (:func:`line_charge_profile`: a Gaussian of ``width`` cm, default 5 cm, whose peak is
    ``relative_amplitude`` x the nominal average density at ``radius``, mid z), added on top of the
    nominal average. Its charge per cm of z is ``relative_amplitude x rho_avg(radius) x 2 pi width^2``
    on every grid (0.19 % of the total space charge for the defaults). The distortion and
    correction fluctuations are exact for the grid: the full ground truth (Poisson solve, Langevin
    distortions, corrections) of ``average + line`` minus that of the average. ``idc1d`` is
    constant, raised by the line's share of the total charge; the sample is unbiased
    (``bias_factor = 1``) and uses the nominal average (``average_index = 13``).
    """
    g = parse_grid(grid)
    if not isinstance(relative_amplitude, (int, float)) or not math.isfinite(relative_amplitude):
        raise ValueError(f"relative_amplitude must be a finite number, got {relative_amplitude!r}")
    profile = line_charge_profile(g, radius=radius, sector=sector, width=width)  # (nphi, nr)
    dc = DensityConfig() if density_config is None else density_config
    config = DatasetConfig(grid=g, n_random=1, bias=0.0, split="eval", density=dc, n_fourier=n_fourier)
    gen = DatasetGenerator(config, solver=solver, device=device)
    nominal = gen.nominal
    # The nominal density falls exactly as 1/r^2 along r (module density): take it at ``radius``.
    j = int(np.argmin(np.abs(g.r - radius)))
    local = float(nominal[:, j, g.nz // 2].mean()) * (g.r[j] / radius) ** 2
    line = relative_amplitude * local * profile[:, :, None] * np.ones(g.nz)  # (nphi, nr, nz)
    dist, corr = gen._distortions(np.stack([nominal, nominal + line]))
    n_t = dc.n_time_bins
    share = float(np.sum(line * gen._volume) / np.sum(nominal * gen._volume))
    random = {"density": nominal + line, "idc1d": np.full(n_t, 1.0 + share), "bias_factor": 1.0}
    return gen._assemble(
        index=-1, random_index=-1, average_index=N_AVERAGE_MAPS // 2, average=nominal, random=random,
        dist_fluct=dist[1] - dist[0], corr_fluct=corr[1] - corr[0], idc_average=np.ones(n_t),
        scaling=np.zeros(3),
    )  # fmt: skip
