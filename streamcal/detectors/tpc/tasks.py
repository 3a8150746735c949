"""TPC glue of the distortion-fluctuation corrections: data, features, targets, the two training
tasks of :mod:`streamcal.train`, the linear IDC-scaler baseline and inference from a checkpoint.

Data. :class:`FluctuationData` holds the ``K`` random maps (density, correction, 1D IDCs) and the
27 average maps of a :class:`~streamcal.detectors.tpc.dataset.DatasetConfig` in memory and
assembles sample ``index = k * 27 + m`` as ``random k - average m`` on demand, exactly as
:meth:`DatasetGenerator.sample` does (tested), so a shuffled batch costs a few subtractions and no
sample is stored twice. It can be cached on disk (``data.cache_dir``). The training split is
biased (``data.bias``), the evaluation split never (seed section 4.2: "the final performance of
the trained models is evaluated with the *unbiased* data"); the two never share a random map.

Features and targets (units: cm for corrections, V/cm^2 for densities, relative for IDCs):

* 1D IDC fluctuation: ``idc1d - idc1d_average`` per time bin (the random map's 1D IDC relative to
  the one its average map would give). Its Fourier coefficients
  (:func:`~streamcal.detectors.tpc.idc.idc_fourier`, ``n_fourier`` complex ones) are the sc1d input.
* sc1d target: the phi-average of the correction fluctuation at each (r, z). The 1D IDCs carry no
  phi information, so this average is the best any 1D correction can do; the seed foresees the 1D
  correction for the global fluctuations that "depend to leading order only on the z-position"
  and leaves the local ones to the 3D correction. With ``model.use_phi`` the target is per voxel
  instead. Evaluation always compares with the full per-voxel truth.
* sc3d input: average density and density fluctuation; target: the correction fluctuation
  (3, nphi, nr, nz); in residual mode also the 1D correction (a trained sc1d model or the linear
  scaler) as input.

Normalisation constants (computed on the training split, stored in the checkpoint under
``task_state``, applied by :func:`load_corrector`):

* ``idc_mean``, ``idc_std`` (2 n_fourier,): per-coefficient mean and standard deviation of the
  Fourier features;
* ``extra_scale`` (3,) cm: RMS of the phi-averaged average correction (dr, drphi, dz);
* ``target_scale`` (3,) cm: RMS of the correction fluctuation per component (sc1d: of its phi
  average);
* ``density_scale`` V/cm^2: mean of the nominal average density; ``fluctuation_scale`` V/cm^2:
  RMS of the density fluctuation (sc3d).

Positions (sc1d): ``r`` and ``z`` mapped linearly to [-1, 1] (r: IFC -1, OFC +1; z: central
electrode -1, readout +1), and ``cos(phi), sin(phi)`` with ``use_phi``.

Baseline. :func:`linear_scaler` is the correction ALICE runs in production: the average correction
scaled by the relative change of the 1D IDC integrated over the last ion drift time.
"""

from __future__ import annotations

import abc

import hashlib
import json
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from streamcal.config import Config
from streamcal.detectors.tpc.constants import Grid, parse_grid
from streamcal.detectors.tpc.dataset import N_AVERAGE_MAPS, DatasetConfig, DatasetGenerator
from streamcal.detectors.tpc.density import DensityConfig
from streamcal.detectors.tpc.idc import idc_fourier
from streamcal.errors import ConfigError
from streamcal.models.sc1d import SC1DConfig, SC1DNet, SC1DTrees, build_sc1d, sc1d_features
from streamcal.models.sc3d import UNet3D, UNet3DConfig

__all__ = [
    "COMPONENTS",
    "TPCDataConfig",
    "SC1DTaskConfig",
    "SC3DTaskConfig",
    "FluctuationData",
    "linear_scaler",
    "idc_fluctuation_features",
    "positions",
    "SC1DTask",
    "SC3DTask",
    "SC1DCorrector",
    "SC3DCorrector",
    "load_corrector",
]

COMPONENTS = ("dr", "drphi", "dz")
UM_PER_CM = 1e4


# -- configs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TPCDataConfig(Config):
    """The training and evaluation data of a TPC task.

    Attributes:
        grid: ``PHIxRxZ`` (e.g. ``90x17x17``).
        n_random_train: random maps ``K`` of the training split (K x 27 samples).
        n_random_eval: random maps of the (unbiased) evaluation split.
        n_train_samples: use this many of the K x 27 training samples (a seeded random subset);
            all when null.
        seed: dataset seed (the splits are disjoint for any seed).
        bias: training bias half-width (seed section 4.2); the evaluation split is unbiased.
        scale_step: the +-x of the 27 average maps.
        rate_hz, epsilon: the density simulation (50 kHz Pb-Pb, gain x IBF).
        local_fraction: share of the training random maps that carry local excesses or deficits
            of ionisation (line charges and spots; :mod:`~streamcal.detectors.tpc.dataset`), so that
            the 3D correction learns the response to a local charge; 0: none. Never in evaluation.
        local_max, local_amplitude, local_width_cm: at most this many per map, the peak amplitude
            range relative to the expected local ionisation, the transverse sigma range (cm).
        norm_samples: training samples used to compute the normalisation constants.
        cache_dir: keep the generated maps here (``.npz`` named by a hash of the data config) and
            reuse them; null: generate each run.
        device: where the ground truth is computed (``auto``: CUDA when present).
    """

    owner = "data"
    grid: str = "90x17x17"
    n_random_train: int = 200
    n_random_eval: int = 20
    n_train_samples: int | None = None
    seed: int = 0
    bias: float = 0.05
    scale_step: float = 0.1
    rate_hz: float = 50_000.0
    epsilon: float = 10.0
    local_fraction: float = 0.0
    local_max: int = 3
    local_amplitude: tuple[float, float] = (-0.5, 1.5)
    local_width_cm: tuple[float, float] = (3.0, 12.0)
    norm_samples: int = 2000
    cache_dir: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "cpu"

    def validate(self) -> None:
        try:
            parse_grid(self.grid, argument="grid")
        except ValueError as exc:
            self.fail("grid", str(exc))
        if self.n_random_train < 1:
            self.fail("n_random_train", f"must be >= 1, got {self.n_random_train}")
        if self.n_random_eval < 1:
            self.fail("n_random_eval", f"must be >= 1, got {self.n_random_eval}")
        if self.n_train_samples is not None and not 1 <= self.n_train_samples <= self.n_random_train * N_AVERAGE_MAPS:
            self.fail("n_train_samples", f"must be in [1, n_random_train x 27 = {self.n_random_train * N_AVERAGE_MAPS}], "
                                         f"got {self.n_train_samples}")
        if self.seed < 0:
            self.fail("seed", f"must be >= 0, got {self.seed}")
        if not 0.0 <= self.bias < 1.0:
            self.fail("bias", f"must be in [0, 1), got {self.bias}")
        if not 0.0 <= self.scale_step < 0.8:
            self.fail("scale_step", f"must be in [0, 0.8), got {self.scale_step}")
        if not self.rate_hz > 0:
            self.fail("rate_hz", f"must be > 0, got {self.rate_hz}")
        if not self.epsilon > 0:
            self.fail("epsilon", f"must be > 0, got {self.epsilon}")
        if self.norm_samples < 1:
            self.fail("norm_samples", f"must be >= 1, got {self.norm_samples}")
        if not 0.0 <= self.local_fraction <= 1.0:
            self.fail("local_fraction", f"must be in [0, 1], got {self.local_fraction}")
        if self.local_max < 1:
            self.fail("local_max", f"must be >= 1, got {self.local_max}")
        if not -1.0 <= self.local_amplitude[0] <= self.local_amplitude[1]:
            self.fail("local_amplitude", f"must be [lo, hi] with -1 <= lo <= hi, got {list(self.local_amplitude)}")
        g = parse_grid(self.grid)
        if not 0.0 < self.local_width_cm[0] <= self.local_width_cm[1] < g.r_max - g.r_min:
            self.fail("local_width_cm", f"must be [lo, hi] cm with 0 < lo <= hi < {g.r_max - g.r_min}, "
                                        f"got {list(self.local_width_cm)}")

    @property
    def parsed_grid(self) -> Grid:
        return parse_grid(self.grid)

    def dataset_config(self, split: Literal["train", "eval"], n_fourier: int = 20) -> DatasetConfig:
        n = self.n_random_train if split == "train" else self.n_random_eval
        return DatasetConfig(grid=self.parsed_grid, n_random=n, scale_step=self.scale_step, bias=self.bias,
                             split=split, seed=self.seed, n_fourier=n_fourier,
                             density=DensityConfig(rate_hz=self.rate_hz, epsilon=self.epsilon),
                             local_fraction=self.local_fraction, local_max=self.local_max,
                             local_amplitude=self.local_amplitude, local_width_cm=self.local_width_cm)


@dataclass(frozen=True)
class SC1DTaskConfig(Config):
    """``streamcal train sc1d``: the sections ``data`` and ``model`` of the YAML file."""

    owner = "sc1d"
    data: TPCDataConfig = field(default_factory=TPCDataConfig)
    model: SC1DConfig = field(default_factory=SC1DConfig)


@dataclass(frozen=True)
class SC3DTaskConfig(Config):
    """``streamcal train sc3d``: ``data``, ``model`` and, for ``model.residual``, the 1D correction.

    Attributes:
        precorrection: the 1D correction whose residual the residual U-Net learns: ``sc1d`` (a
            trained model, ``sc1d_checkpoint``) or ``linear_scaler`` (:func:`linear_scaler`).
        sc1d_checkpoint: path of the sc1d checkpoint (file or run directory), needed for
            ``precorrection: sc1d`` with ``model.residual``.
    """

    owner = "sc3d"
    data: TPCDataConfig = field(default_factory=TPCDataConfig)
    model: UNet3DConfig = field(default_factory=UNet3DConfig)
    precorrection: Literal["sc1d", "linear_scaler"] = "sc1d"
    sc1d_checkpoint: str | None = None

    def validate(self) -> None:
        if self.model.residual and self.precorrection == "sc1d" and not self.sc1d_checkpoint:
            self.fail("sc1d_checkpoint", "model.residual with precorrection 'sc1d' needs the path of a trained "
                                         "sc1d checkpoint (or set precorrection: linear_scaler)")


# -- physics helpers ---------------------------------------------------------------------------
def linear_scaler(correction_average: np.ndarray, idc1d: np.ndarray, idc1d_average: np.ndarray | None = None) -> np.ndarray:
    """The linear IDC-scaler correction fluctuation (ALICE production): ``C_avg (<I> / <I_avg> - 1)``.

    Args:
        correction_average: the average correction map, (3, nphi, nr, nz) or (B, 3, nphi, nr, nz), cm.
        idc1d: the 1D IDCs of the last ion drift time, (n_t,) or (B, n_t), relative units.
        idc1d_average: the 1D IDCs the average map corresponds to (same shape); ones (nominal)
            when None.

    Returns the predicted correction fluctuation, shape of ``correction_average`` broadcast with the
    batch of ``idc1d``, cm. The space charge in the drift volume is the sum of the IDCs of the last
    ion drift time, so the ratio of the time averages scales the whole map.
    """
    idc = np.asarray(idc1d, dtype=np.float64)
    ref = np.ones_like(idc) if idc1d_average is None else np.asarray(idc1d_average, dtype=np.float64)
    if idc.shape[-1:] != ref.shape[-1:] or idc.ndim not in (1, 2):
        raise ValueError(f"idc1d must be (n_t,) or (B, n_t) and match idc1d_average, got {idc.shape} and {ref.shape}")
    ratio = idc.mean(axis=-1) / ref.mean(axis=-1) - 1.0  # () or (B,)
    corr = np.asarray(correction_average)
    return (corr * np.asarray(ratio)[..., None, None, None, None]).astype(np.float32) if idc.ndim == 2 \
        else (corr * float(ratio)).astype(np.float32)


def idc_fluctuation_features(idc1d: np.ndarray, idc1d_average: np.ndarray | None, n_fourier: int) -> np.ndarray:
    """Fourier features of the 1D IDC fluctuation ``idc1d - idc1d_average``: (..., 2 n_fourier)."""
    idc = np.asarray(idc1d, dtype=np.float64)
    ref = np.ones_like(idc) if idc1d_average is None else np.asarray(idc1d_average, dtype=np.float64)
    if idc.shape[-1] != ref.shape[-1]:
        raise ValueError(f"idc1d and idc1d_average differ in length: {idc.shape} vs {ref.shape}")
    return idc_fourier(idc - ref + 1.0, n_fourier)  # idc_fourier subtracts the 1 again


def positions(grid: Grid, use_phi: bool) -> np.ndarray:
    """Position features: (nr nz, 2) ``[r, z]`` in [-1, 1], or (nphi nr nz, 4) with ``cos, sin phi``
    (row-major over the grid axes)."""
    r = 2.0 * (grid.r - grid.r_min) / (grid.r_max - grid.r_min) - 1.0  # (nr,)
    z = 2.0 * grid.z / grid.length - 1.0  # (nz,)
    if not use_phi:
        rr, zz = np.meshgrid(r, z, indexing="ij")  # (nr, nz)
        return np.stack([rr.ravel(), zz.ravel()], axis=-1).astype(np.float32)  # (nr nz, 2)
    pp, rr, zz = np.meshgrid(grid.phi, r, z, indexing="ij")  # (nphi, nr, nz)
    return np.stack([rr.ravel(), zz.ravel(), np.cos(pp).ravel(), np.sin(pp).ravel()], axis=-1).astype(np.float32)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -- data --------------------------------------------------------------------------------------
class FluctuationData:
    """The maps of one split in memory; samples assembled on demand (module doc).

    Arrays (float32): ``average_density`` (27, nphi, nr, nz), ``average_correction``
    (27, 3, nphi, nr, nz), ``idc_average`` (27, n_t), ``density`` (K, nphi, nr, nz) (None without
    ``densities``), ``correction`` (K, 3, nphi, nr, nz), ``idc1d`` (K, n_t).
    """

    def __init__(self, config: DatasetConfig, *, densities: bool = True, cache_dir: str | Path | None = None,
                 progress: bool = False, device: str = "cpu") -> None:
        self.config = config
        self.grid: Grid = config.grid  # type: ignore[assignment]
        path = None
        if cache_dir is not None:
            key = json.dumps({**config.summary(), "densities": densities}, sort_keys=True, default=str)
            path = Path(cache_dir) / f"tpc-{config.split}-{config.grid}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        if path is not None and path.exists():
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            arrays = self._generate(densities, progress, device)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, **arrays)
                tmp.replace(path)
        self.average_density = arrays["average_density"]
        self.average_correction = arrays["average_correction"]
        self.idc_average = arrays["idc_average"]
        self.density = arrays.get("density")
        self.correction = arrays["correction"]
        self.idc1d = arrays["idc1d"]

    def _generate(self, densities: bool, progress: bool, device: str) -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm

        gen = DatasetGenerator(self.config, device=device)
        k = self.config.n_random
        _, avg_corr = gen.average_distortions()
        out: dict[str, np.ndarray] = {
            "average_density": gen.averages.astype(np.float32),
            "average_correction": avg_corr.astype(np.float32),
            "idc_average": np.stack([gen.sample(m)["idc1d_average"] for m in range(N_AVERAGE_MAPS)]).astype(np.float32),
            "correction": np.empty((k, 3, *self.grid.shape), np.float32),
            "idc1d": np.empty((k, self.config.density.n_time_bins), np.float32),
        }
        if densities:
            out["density"] = np.empty((k, *self.grid.shape), np.float32)
        for i in tqdm(range(k), desc=f"tpc maps ({self.config.split}, {self.grid})", disable=not progress, unit="map"):
            rnd = gen.random_map(i)
            out["correction"][i] = rnd["correction"]
            out["idc1d"][i] = rnd["idc1d"]
            if densities:
                out["density"][i] = rnd["density"]
        return out

    def __len__(self) -> int:
        return self.config.n_random * N_AVERAGE_MAPS

    @staticmethod
    def split_index(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices -> (random map k, average m)."""
        return np.divmod(np.asarray(index, dtype=np.int64), N_AVERAGE_MAPS)

    def correction_fluctuation(self, index: np.ndarray) -> np.ndarray:
        """(B, 3, nphi, nr, nz) cm."""
        k, m = self.split_index(index)
        return self.correction[k] - self.average_correction[m]

    def density_fluctuation(self, index: np.ndarray) -> np.ndarray:
        """(B, nphi, nr, nz) V/cm^2."""
        if self.density is None:
            raise RuntimeError("FluctuationData was built without densities")
        k, m = self.split_index(index)
        return self.density[k] - self.average_density[m]

    def idc_features(self, n_fourier: int) -> np.ndarray:
        """Fourier features of every sample, (K 27, 2 n_fourier) float64."""
        k, m = self.split_index(np.arange(len(self)))
        return idc_fluctuation_features(self.idc1d[k], self.idc_average[m], n_fourier)

    def idc_ratio(self, index: np.ndarray) -> np.ndarray:
        """``<idc1d> / <idc1d_average> - 1`` per sample (the linear scaler's factor), (B,)."""
        k, m = self.split_index(index)
        return self.idc1d[k].astype(np.float64).mean(-1) / self.idc_average[m].astype(np.float64).mean(-1) - 1.0


def _rms(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=axes))


def _scale(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, 1.0).astype(np.float32)


def _component_dict(values: Any) -> dict[str, float]:
    return {c: float(v) for c, v in zip(COMPONENTS, values)}


def _subset(n: int, size: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(n)[: min(size, n)])


class _Base(abc.ABC):
    """Shared parts of the TPC tasks (see :class:`streamcal.train.Task`); each task defines
    :meth:`batch`."""

    name: str = ""
    config: Any

    def __init__(self, config: Any) -> None:
        self.config = config
        self.grid = config.data.parsed_grid
        self.train_data: FluctuationData | None = None
        self.eval_data: FluctuationData | None = None
        self.train_index = np.zeros(0, np.int64)
        self.baselines: dict[str, Any] = {}

    def _load(self, *, densities: bool, progress: bool, device: str) -> None:
        d = self.config.data
        dev = str(_resolve_device(d.device if d.device != "auto" else device))
        kw = {"densities": densities, "cache_dir": d.cache_dir, "progress": progress, "device": dev}
        self.train_data = FluctuationData(d.dataset_config("train"), **kw)
        self.eval_data = FluctuationData(d.dataset_config("eval"), **kw)
        n = len(self.train_data)
        self.train_index = _subset(n, d.n_train_samples or n, d.seed) if d.n_train_samples else np.arange(n)

    def n_train(self) -> int:
        return int(len(self.train_index))

    def train_loader(self, *, epoch: int, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
        """Shuffled batches; the order depends only on ``(seed, epoch)`` (resume gives the same)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = self.train_index[torch.randperm(len(self.train_index), generator=g).numpy()]
        for start in range(0, len(order), batch_size):
            yield self.batch(self.train_data, order[start: start + batch_size], train=True)  # type: ignore[arg-type]

    def eval_loader(self, *, batch_size: int) -> Iterator[dict[str, Tensor]]:
        n = len(self.eval_data)  # type: ignore[arg-type]
        for start in range(0, n, batch_size):
            yield self.batch(self.eval_data, np.arange(start, min(n, start + batch_size)), train=False)  # type: ignore[arg-type]

    @abc.abstractmethod
    def batch(self, data: FluctuationData, index: np.ndarray, *, train: bool) -> dict[str, Tensor]:
        """Model inputs and targets of samples ``index`` of ``data`` as tensors."""

    def metrics(self, sums: dict[str, Tensor]) -> dict[str, Any]:
        count = float(sums["count"])
        out: dict[str, Any] = {"rmse_um": _component_dict(torch.sqrt(sums["sse"] / count) * UM_PER_CM)}
        for key in [k for k in sums if k.startswith("sse_")]:
            out[f"rmse_{key[4:]}_um"] = _component_dict(torch.sqrt(sums[key] / count) * UM_PER_CM)
        out["score"] = float(np.mean(list(out["rmse_um"].values())))
        return out

    @staticmethod
    def _tensor(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# -- sc1d ----------------------------------------------------------------------------------------
class SC1DTask(_Base):
    """The 1D correction (module doc): per-sample Fourier features, per-(r, z) targets."""

    name = "sc1d"
    config_class = SC1DTaskConfig

    def __init__(self, config: SC1DTaskConfig) -> None:
        super().__init__(config)
        self.model_config: SC1DConfig = config.model
        self.position = positions(self.grid, config.model.use_phi)  # (P, n_pos)
        self.state: dict[str, np.ndarray] = {}

    # normalisation and data
    def prepare(self, *, progress: bool = False, device: str = "cpu") -> None:
        self._load(densities=False, progress=progress, device=device)
        td, ed = self.train_data, self.eval_data
        assert td is not None and ed is not None
        nf = self.model_config.n_fourier
        self._idc = {"train": td.idc_features(nf).astype(np.float32), "eval": ed.idc_features(nf).astype(np.float32)}
        if not self.state:
            norm = _subset(len(self.train_index), self.config.data.norm_samples, self.config.data.seed + 1)
            idx = self.train_index[norm]
            feats = self._idc["train"][idx]
            target = self._target(td, idx)  # (n, P, 3)
            self.state = {
                "idc_mean": feats.mean(0).astype(np.float32),
                "idc_std": _scale(feats.std(0)) if self.model_config.idc_norm == "per_coefficient"
                else np.full(feats.shape[1], _scale(np.sqrt(np.mean(np.square(feats - feats.mean(0))))), np.float32),
                "target_scale": _scale(_rms(target, (0, 1))),
                "extra_scale": _scale(_rms(self._average_local(td, np.arange(N_AVERAGE_MAPS)), (0, 1))),
            }
        self.baselines = self._baselines()

    def _average_local(self, data: FluctuationData, m: np.ndarray) -> np.ndarray:
        """Average correction at the positions, (B, P, 3) cm."""
        c = data.average_correction[m]  # (B, 3, nphi, nr, nz)
        if not self.model_config.use_phi:
            c = c.mean(axis=2)  # (B, 3, nr, nz)
        return c.reshape(len(m), 3, -1).transpose(0, 2, 1)  # (B, P, 3)

    def _target(self, data: FluctuationData, index: np.ndarray) -> np.ndarray:
        """The target at the positions, (B, P, 3) cm (phi-averaged unless use_phi)."""
        k, m = data.split_index(index)
        if self.model_config.use_phi:
            c = data.correction[k] - data.average_correction[m]  # (B, 3, nphi, nr, nz)
        else:
            c = data.correction[k].mean(axis=2) - data.average_correction[m].mean(axis=2)  # (B, 3, nr, nz)
        return c.reshape(len(index), 3, -1).transpose(0, 2, 1)  # (B, P, 3)

    def batch(self, data: FluctuationData, index: np.ndarray, *, train: bool) -> dict[str, Tensor]:
        s = self.state
        split = "train" if data is self.train_data else "eval"
        _, m = data.split_index(index)
        out = {
            "idc": self._tensor((self._idc[split][index] - s["idc_mean"]) / s["idc_std"]),  # (B, 2 n_fourier)
            "position": self._tensor(self.position),  # (P, n_pos)
            "target": self._tensor(self._target(data, index) / s["target_scale"]),  # (B, P, 3)
        }
        if self.model_config.use_average_correction:
            out["extra"] = self._tensor(self._average_local(data, m) / s["extra_scale"])  # (B, P, 3)
        if not train and not self.model_config.use_phi:
            # per-sample, per-component sum over voxels of (truth - its phi average)^2, cm^2: the part of the
            # per-voxel error that no phi-independent prediction can remove
            full = data.correction_fluctuation(index)  # (B, 3, nphi, nr, nz)
            within = np.square(full - full.mean(axis=2, keepdims=True), dtype=np.float64).sum(axis=(2, 3, 4))
            out["within_ss"] = torch.from_numpy(within)  # (B, 3)
        return out

    def build_model(self) -> SC1DNet | SC1DTrees:
        return build_sc1d(self.model_config)

    def _forward(self, model: Any, batch: dict[str, Tensor]) -> Tensor:
        if isinstance(model, SC1DTrees):
            extra = batch.get("extra")
            out = model.predict(batch["idc"].cpu().numpy(), batch["position"].cpu().numpy(),
                                None if extra is None else extra.cpu().numpy())
            return torch.from_numpy(out).to(batch["idc"].device)
        return model(batch["idc"], batch["position"], batch.get("extra"))  # (B, P, 3)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return torch.mean(torch.square(self._forward(model, batch).float() - batch["target"]))

    def eval_step(self, model: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        scale = torch.as_tensor(self.state["target_scale"], device=batch["idc"].device, dtype=torch.float64)
        pred = self._forward(model, batch).double() * scale  # (B, P, 3) cm
        target = batch["target"].double() * scale  # (B, P, 3) cm
        sse_target = torch.square(pred - target).sum(dim=(0, 1))  # (3,)
        if self.model_config.use_phi:
            return {"sse": sse_target, "count": torch.tensor(float(pred.shape[0] * pred.shape[1]))}
        nphi = self.grid.nphi
        sse = nphi * sse_target + batch["within_ss"].double().sum(0)  # (3,) per voxel, all phi
        return {"sse": sse, "sse_target": nphi * sse_target,
                "count": torch.tensor(float(pred.shape[0] * pred.shape[1] * nphi))}

    def fit(self, model: SC1DTrees, *, seed: int) -> None:
        """One-shot fit of a non-gradient model on a random subset of (sample, position) rows."""
        td = self.train_data
        assert td is not None
        rows_per_sample = len(self.position)
        n_samples = max(1, min(self.n_train(), math.ceil(self.model_config.trees.max_rows / rows_per_sample)))
        idx = self.train_index[_subset(self.n_train(), n_samples, seed)]
        b = self.batch(td, idx, train=True)
        x = sc1d_features(b["idc"].numpy(), b["position"].numpy(), b["extra"].numpy() if "extra" in b else None)
        x = x.reshape(-1, x.shape[-1])  # (B P, F)
        y = b["target"].numpy().reshape(-1, 3)  # (B P, 3)
        if len(x) > self.model_config.trees.max_rows:
            keep = _subset(len(x), self.model_config.trees.max_rows, seed + 7)
            x, y = x[keep], y[keep]
        model.fit(x, y, seed=seed)

    def _baselines(self) -> dict[str, Any]:
        """RMSE (um) on the evaluation split of: no correction, the linear scaler, the phi-average of
        the truth (the floor of any phi-independent correction)."""
        ed = self.eval_data
        assert ed is not None
        sse = {"none": np.zeros(3), "linear_scaler": np.zeros(3), "phi_average_truth": np.zeros(3)}
        n = 0
        for start in range(0, len(ed), 256):
            idx = np.arange(start, min(len(ed), start + 256))
            truth = ed.correction_fluctuation(idx).astype(np.float64)  # (B, 3, nphi, nr, nz)
            _, m = ed.split_index(idx)
            lin = ed.average_correction[m] * ed.idc_ratio(idx)[:, None, None, None, None]
            sse["none"] += np.square(truth).sum(axis=(0, 2, 3, 4))
            sse["linear_scaler"] += np.square(truth - lin).sum(axis=(0, 2, 3, 4))
            sse["phi_average_truth"] += np.square(truth - truth.mean(axis=2, keepdims=True)).sum(axis=(0, 2, 3, 4))
            n += truth[:, 0].size
        return {f"{k}_rmse_um": _component_dict(np.sqrt(v / n) * UM_PER_CM) for k, v in sse.items()}

    def state_dict(self) -> dict[str, Any]:
        assert self.train_data is not None or self.state
        nominal = N_AVERAGE_MAPS // 2
        avg = self.train_data.average_correction[nominal] if self.train_data is not None else self.state["average_correction"]
        return {**{k: torch.from_numpy(np.asarray(v)) for k, v in self.state.items() if k != "average_correction"},
                "average_correction": torch.from_numpy(np.asarray(avg, dtype=np.float32))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: np.asarray(v.cpu().numpy() if isinstance(v, Tensor) else v) for k, v in state.items()}


# -- sc3d ----------------------------------------------------------------------------------------
class SC3DTask(_Base):
    """The 3D correction (module doc): U-Net on the density fields, optionally after the 1D one."""

    name = "sc3d"
    config_class = SC3DTaskConfig

    def __init__(self, config: SC3DTaskConfig) -> None:
        super().__init__(config)
        self.model_config: UNet3DConfig = config.model
        self.state: dict[str, np.ndarray] = {}
        self._pre: dict[str, np.ndarray] = {}

    def prepare(self, *, progress: bool = False, device: str = "cpu") -> None:
        self._load(densities=True, progress=progress, device=device)
        td, ed = self.train_data, self.eval_data
        assert td is not None and ed is not None
        if not self.state:
            idx = self.train_index[_subset(len(self.train_index), self.config.data.norm_samples, self.config.data.seed + 1)]
            chunks_f, chunks_c = [], []
            for start in range(0, len(idx), 256):
                part = idx[start: start + 256]
                chunks_f.append(np.mean(np.square(td.density_fluctuation(part), dtype=np.float64)))
                chunks_c.append(np.mean(np.square(td.correction_fluctuation(part), dtype=np.float64), axis=(0, 2, 3, 4)))
            w = np.array([len(idx[s: s + 256]) for s in range(0, len(idx), 256)], dtype=np.float64)
            self.state = {
                "density_scale": np.float32(td.average_density[N_AVERAGE_MAPS // 2].mean()),
                "fluctuation_scale": np.float32(math.sqrt(float(np.average(chunks_f, weights=w)))),
                "target_scale": _scale(np.sqrt(np.average(np.stack(chunks_c), axis=0, weights=w))),
            }
        if self.model_config.residual:
            self._pre = {"train": self._precorrect(td, device), "eval": self._precorrect(ed, device)}
        self.baselines = self._baselines()

    def _precorrect(self, data: FluctuationData, device: str) -> np.ndarray:
        """Per sample what the 1D correction needs: ``linear_scaler``: the factor
        ``<idc1d> / <idc1d_average> - 1`` (N,); ``sc1d``: the prediction (N, 3, nr, nz) cm, or
        (N, 3, nphi, nr, nz) for a per-voxel (``use_phi``) model."""
        n = len(data)
        if self.config.precorrection == "linear_scaler":
            return data.idc_ratio(np.arange(n)).astype(np.float32)  # (N,)
        corrector = load_corrector(self.config.sc1d_checkpoint, device=device)  # type: ignore[arg-type]
        if not isinstance(corrector, SC1DCorrector):
            raise ConfigError("sc3d", "sc1d_checkpoint", f"{self.config.sc1d_checkpoint} is not an sc1d checkpoint")
        if corrector.grid != self.grid:
            raise ConfigError("sc3d", "sc1d_checkpoint",
                              f"the sc1d model is for grid {corrector.grid}, the data for {self.grid}")
        k, m = data.split_index(np.arange(n))
        out = []
        for start in range(0, n, 512):
            sl = slice(start, start + 512)
            out.append(corrector.predict_batch(data.idc1d[k[sl]], idc1d_average=data.idc_average[m[sl]],
                                               average_correction=data.average_correction[m[sl]], broadcast=False))
        return np.concatenate(out)

    def precorrection(self, data: FluctuationData, index: np.ndarray) -> np.ndarray:
        """The 1D correction of samples ``index``, (B, 3, nphi, nr, nz) cm."""
        pre = self._pre["train" if data is self.train_data else "eval"][index]
        if pre.ndim == 1:  # linear scaler: the average correction times the relative IDC change
            _, m = data.split_index(index)
            return data.average_correction[m] * pre[:, None, None, None, None]
        if pre.ndim == 4:  # a phi-independent 1D correction (B, 3, nr, nz)
            return np.broadcast_to(pre[:, :, None], (len(index), 3, *self.grid.shape))
        return pre

    def batch(self, data: FluctuationData, index: np.ndarray, *, train: bool) -> dict[str, Tensor]:
        s = self.state
        k, m = data.split_index(index)
        avg = data.average_density[m] / s["density_scale"]  # (B, nphi, nr, nz)
        fluct = (data.density[k] - data.average_density[m]) / s["fluctuation_scale"]  # type: ignore[index]
        out = {
            "fields": self._tensor(np.stack([avg, fluct], axis=1)),  # (B, 2, nphi, nr, nz)
            "target": self._tensor(data.correction_fluctuation(index) / s["target_scale"][:, None, None, None]),
        }  # target (B, 3, nphi, nr, nz)
        if self.model_config.residual:
            pre = self.precorrection(data, index)  # (B, 3, nphi, nr, nz) cm
            out["precorrection"] = self._tensor(pre / s["target_scale"][:, None, None, None])
        return out

    def build_model(self) -> UNet3D:
        return UNet3D(self.model_config)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        pred = model(batch["fields"], batch.get("precorrection"))  # (B, 3, nphi, nr, nz)
        return torch.mean(torch.square(pred.float() - batch["target"]))

    def eval_step(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        scale = torch.as_tensor(self.state["target_scale"], device=batch["fields"].device, dtype=torch.float64)
        scale = scale.view(1, 3, 1, 1, 1)
        pred = model(batch["fields"], batch.get("precorrection")).double() * scale  # (B, 3, nphi, nr, nz) cm
        target = batch["target"].double() * scale
        out = {"sse": torch.square(pred - target).sum(dim=(0, 2, 3, 4)),
               "count": torch.tensor(float(target[:, 0].numel()))}
        if "precorrection" in batch:
            out["sse_precorrection"] = torch.square(batch["precorrection"].double() * scale - target).sum(dim=(0, 2, 3, 4))
        return out

    def fit(self, model: Any, *, seed: int) -> None:  # pragma: no cover - the U-Net is trained by gradient
        raise TypeError("the sc3d model is trained by the gradient loop")

    def _baselines(self) -> dict[str, Any]:
        ed = self.eval_data
        assert ed is not None
        sse = {"none": np.zeros(3), "linear_scaler": np.zeros(3)}
        if self.model_config.residual:
            sse["precorrection"] = np.zeros(3)
        n = 0
        for start in range(0, len(ed), 256):
            idx = np.arange(start, min(len(ed), start + 256))
            truth = ed.correction_fluctuation(idx).astype(np.float64)
            _, m = ed.split_index(idx)
            lin = ed.average_correction[m] * ed.idc_ratio(idx)[:, None, None, None, None]
            sse["none"] += np.square(truth).sum(axis=(0, 2, 3, 4))
            sse["linear_scaler"] += np.square(truth - lin).sum(axis=(0, 2, 3, 4))
            if "precorrection" in sse:
                pre = self.precorrection(ed, idx)
                sse["precorrection"] += np.square(truth - pre).sum(axis=(0, 2, 3, 4))
            n += truth[:, 0].size
        return {f"{k}_rmse_um": _component_dict(np.sqrt(v / n) * UM_PER_CM) for k, v in sse.items()}

    def state_dict(self) -> dict[str, Any]:
        return {k: torch.as_tensor(np.asarray(v)) for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: np.asarray(v.cpu().numpy() if isinstance(v, Tensor) else v) for k, v in state.items()}


# -- inference -------------------------------------------------------------------------------------
_NUMPY_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0, out=x),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
}


class _NumpyBilinearHead:
    """The live 1D correction's per-frame work in plain numpy: the IDC branch of the bilinear
    network (a linear map plus a small MLP) and its contraction with the per-voxel factors, which
    are fixed for the nominal average map. A frame is one sample: a dozen small matrix-vector
    products, for which torch's per-operation overhead (~10 us each) would dominate. Same numbers
    as :meth:`SC1DNet.combine` to float32 rounding (tests/tpc/test_models.py)."""

    def __init__(self, linear: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]], activation: Any,
                 factors: np.ndarray, offset: np.ndarray) -> None:
        self.linear, self.layers, self.activation = linear, layers, activation  # (n_idc, R), [(in, out), (out,)]
        self.factors, self.offset = factors, offset  # (R, P 3), (P 3,)

    @classmethod
    def build(cls, model: Any, local_terms: Tensor) -> _NumpyBilinearHead | None:
        act = _NUMPY_ACTIVATIONS.get(model.config.activation)
        if act is None:  # e.g. gelu: torch's
            return None

        def arr(t: Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().float().cpu().numpy())

        linears = [m for m in model.idc_mlp if isinstance(m, torch.nn.Linear)]
        g = arr(local_terms)  # (P, 3, R + 1)
        p = g.shape[0]
        return cls(arr(model.idc_linear.weight).T, [(arr(m.weight).T, arr(m.bias)) for m in linears], act,
                   np.ascontiguousarray(g[..., :-1].reshape(p * 3, -1).T), g[..., -1].reshape(p * 3))

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        """``feats`` (B, n_idc) float32 -> (B, P, 3) float32."""
        h = feats
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = self.activation(h)
        q = feats @ self.linear + h  # (B, R)
        out = q @ self.factors + self.offset  # (B, P 3)
        return out.reshape(feats.shape[0], -1, 3)


class _LiveSC1D:
    """The live stage's whole per-frame work for a phi-independent bilinear network on the nominal
    average map: ``h`` (n_t,) relative 1D IDCs -> the correction (3, nr, nz) cm, float32, in eight
    matrix products and a few element-wise operations, with everything that does not depend on
    ``h`` folded into fixed matrices: the Fourier features and their standardisation into one
    affine map (the first ``n_fourier`` rfft coefficients of ``h - 1`` over ``n_t``, as
    :func:`~streamcal.detectors.tpc.idc.idc_fourier`), the target scale and the output order into
    the per-voxel factors. A frame is computed after the process slept for most of the 10 ms, with
    cold caches, where each numpy call costs several times its warm time, so fewer calls is what
    counts (on 2 cores, 90x17x17: ~0.2 ms instead of ~0.45 ms after a 10 ms sleep, 30 instead of
    65 us warm). Same numbers as :meth:`SC1DCorrector.predict_batch` to float32 rounding (tested)."""

    def __init__(self, head: _NumpyBilinearHead, state: dict[str, np.ndarray], n_fourier: int, n_t: int,
                 out_shape: tuple[int, int, int]) -> None:
        dft = np.fft.rfft(np.eye(n_t), axis=-1)[:, :n_fourier] / n_t  # (n_t, k): row j = the transform of e_j
        dft = np.concatenate([dft.real, dft.imag], axis=1)  # (n_t, 2k) [Re, Im], as idc_fourier
        std, mean = np.asarray(state["idc_std"], np.float64), np.asarray(state["idc_mean"], np.float64)
        self.features = dft / std  # (n_t, 2k): (rfft(h - 1) / n_t - mean) / std = h @ features + bias
        self.bias = -(dft.sum(axis=0) + mean) / std  # (2k,)
        self.layers, self.activation, self.linear = head.layers, head.activation, head.linear
        p = head.factors.shape[1] // 3
        scale = np.repeat(np.asarray(state["target_scale"], np.float64), p)  # (3 P,) cm, component-major
        order = (np.arange(p)[None, :] * 3 + np.arange(3)[:, None]).ravel()  # column c P + p <- p 3 + c
        self.factors = (head.factors[:, order] * scale).astype(np.float32)  # (R, 3 P)
        self.offset = (head.offset[order] * scale).astype(np.float32)  # (3 P,)
        self.out_shape = out_shape
        self.n_t = n_t

    def __call__(self, h: np.ndarray) -> np.ndarray:
        x = (h @ self.features + self.bias).astype(np.float32)  # (2k,)
        y = x
        for i, (w, b) in enumerate(self.layers):
            y = y @ w + b
            if i < len(self.layers) - 1:
                y = self.activation(y)
        return ((x @ self.linear + y) @ self.factors + self.offset).reshape(self.out_shape)  # (3, nr, nz)


class SC1DCorrector:
    """A trained 1D correction for inference (see :func:`load_corrector`).

    ``predict(idc1d)`` maps the last 200 ms of 1D IDCs (relative units, as ``dataset.idc1d``) to the
    correction fluctuation (3, nphi, nr, nz) in cm, relative to the average correction map the
    model was trained with (``average_correction``: the nominal one unless given).
    """

    task = "sc1d"

    def __init__(self, model: SC1DNet | SC1DTrees, config: SC1DTaskConfig, state: dict[str, np.ndarray],
                 device: torch.device) -> None:
        self.model, self.config, self.state, self.device = model, config, state, device
        self.grid = config.data.parsed_grid
        self.model_config = config.model
        self.average_correction = np.asarray(state["average_correction"], dtype=np.float32)  # (3, nphi, nr, nz)
        self._local_terms = None  # bilinear network: its factors for the nominal average map, once
        self._numpy_head: _NumpyBilinearHead | None = None  # and, on CPU, its IDC part in numpy
        self._position = torch.from_numpy(positions(self.grid, config.model.use_phi)).to(device)  # (P, n_pos)

    @property
    def phi_independent(self) -> bool:
        """True when the correction is the same at every phi (a model without ``use_phi``):
        ``predict_batch(..., broadcast=False)`` then gives it as (B, 3, nr, nz)."""
        return not self.model_config.use_phi

    def live_predictor(self, n_t: int) -> Callable[[np.ndarray], np.ndarray] | None:
        """The live per-frame prediction for the nominal average map: ``h`` (n_t,) finite relative 1D
        IDCs -> (3, nr, nz) cm float32, the phi-independent correction of :meth:`predict` (to float32
        rounding) in a fraction of its time (:class:`_LiveSC1D`). None where there is no such fast
        path (a model with ``use_phi``, another architecture, a GPU device): use :meth:`predict`."""
        if self.model_config.use_phi or self.model_config.architecture != "bilinear" or isinstance(self.model, SC1DTrees):
            return None
        self.predict_batch(np.ones((1, n_t)))  # sets up the per-voxel factors (and the numpy head on CPU)
        if self._numpy_head is None:
            return None
        return _LiveSC1D(self._numpy_head, self.state, self.model_config.n_fourier, n_t,
                         (3, self.grid.nr, self.grid.nz))

    def predict_batch(self, idc1d: np.ndarray, *, idc1d_average: np.ndarray | None = None,
                      average_correction: np.ndarray | None = None, broadcast: bool = True) -> np.ndarray:
        """Batched :meth:`predict`: ``idc1d`` (B, n_t) -> (B, 3, nphi, nr, nz) cm (``broadcast=False``
        and a phi-independent model: (B, 3, nr, nz))."""
        cfg, s = self.model_config, self.state
        idc = np.asarray(idc1d, dtype=np.float64)
        if idc.ndim != 2 or not np.all(np.isfinite(idc)):
            raise ValueError(f"idc1d must be a finite (B, n_t) array, got shape {idc.shape}")
        feats = (idc_fluctuation_features(idc, idc1d_average, cfg.n_fourier) - s["idc_mean"]) / s["idc_std"]  # (B, 2k)
        extra = None
        # the live case (nominal average map, bilinear network): per-voxel factors fixed after the first call
        nominal_bilinear = (average_correction is None and cfg.architecture == "bilinear"
                            and not isinstance(self.model, SC1DTrees))
        if cfg.use_average_correction and not (nominal_bilinear and self._local_terms is not None):
            avg = self.average_correction if average_correction is None else np.asarray(average_correction, np.float32)
            avg = np.broadcast_to(avg, (idc.shape[0], 3, *self.grid.shape))  # (B, 3, nphi, nr, nz)
            if not cfg.use_phi:
                avg = avg.mean(axis=2)  # (B, 3, nr, nz)
            extra = avg.reshape(idc.shape[0], 3, -1).transpose(0, 2, 1) / s["extra_scale"]  # (B, P, 3)
        if isinstance(self.model, SC1DTrees):
            out = self.model.predict(feats, self._position.cpu().numpy(), extra)  # (B, P, 3)
        elif nominal_bilinear:
            # the nominal average map: its per-voxel factors are computed once (the live case)
            if self._local_terms is None:
                local = self._position
                if extra is not None:
                    local = torch.cat([local, torch.from_numpy(np.ascontiguousarray(extra[0], np.float32)).to(self.device)], -1)
                with torch.inference_mode():
                    self._local_terms = self.model.local_terms(local)  # (P, 3, R + 1)
                self._numpy_head = _NumpyBilinearHead.build(self.model, self._local_terms) if self.device.type == "cpu" else None
            if self._numpy_head is not None:
                out = self._numpy_head(feats.astype(np.float32))  # (B, P, 3)
            else:
                with torch.inference_mode():
                    out = self.model.combine(torch.from_numpy(feats.astype(np.float32)).to(self.device), self._local_terms)
                out = out.float().cpu().numpy()  # (B, P, 3)
        else:
            with torch.no_grad():
                t_extra = None if extra is None else torch.from_numpy(np.ascontiguousarray(extra, np.float32)).to(self.device)
                out = self.model(torch.from_numpy(feats.astype(np.float32)).to(self.device), self._position, t_extra)
            out = out.float().cpu().numpy()  # (B, P, 3)
        out = out * s["target_scale"]  # cm
        b = idc.shape[0]
        if cfg.use_phi:
            return out.transpose(0, 2, 1).reshape(b, 3, *self.grid.shape).astype(np.float32)
        out = out.transpose(0, 2, 1).reshape(b, 3, self.grid.nr, self.grid.nz)  # (B, 3, nr, nz)
        if not broadcast:
            return out.astype(np.float32)
        return np.ascontiguousarray(np.broadcast_to(out[:, :, None], (b, 3, *self.grid.shape)), dtype=np.float32)

    def predict(self, idc1d: np.ndarray, *, idc1d_average: np.ndarray | None = None,
                average_correction: np.ndarray | None = None) -> np.ndarray:
        """``idc1d`` (n_t,) relative 1D IDCs of the last ion drift time, chronological -> (3, nphi, nr, nz) cm.

        ``idc1d_average`` (n_t,): the 1D IDCs of the average map the correction is relative to
        (ones: nominal); ``average_correction`` (3, nphi, nr, nz) cm: that map's correction (the
        nominal training one when None).
        """
        idc = np.asarray(idc1d)
        if idc.ndim != 1:
            raise ValueError(f"idc1d must be one series (n_t,), got shape {idc.shape}")
        ref = None if idc1d_average is None else np.asarray(idc1d_average)[None]
        return self.predict_batch(idc[None], idc1d_average=ref, average_correction=average_correction)[0]


class SC3DCorrector:
    """A trained 3D correction for inference (see :func:`load_corrector`)."""

    task = "sc3d"

    def __init__(self, model: UNet3D, config: SC3DTaskConfig, state: dict[str, np.ndarray], device: torch.device) -> None:
        self.model, self.config, self.state, self.device = model, config, state, device
        self.grid = config.data.parsed_grid
        self.model_config = config.model
        # on a CPU the channels-last 3D convolutions are faster on small grids and slower on large
        # ones (scripts/bench_tpc_3d.py, 2 cores: 90x17x17 batch 16 85 vs 75 frames/s; 180x33x33
        # batch 1 71 vs 67 ms per frame)
        self._channels_last = device.type == "cpu" and int(np.prod(self.grid.shape)) <= 100_000
        if self._channels_last:
            self.model.to(memory_format=torch.channels_last_3d)

    @property
    def needs_precorrection(self) -> bool:
        return self.model_config.residual

    def predict_batch(self, density_average: np.ndarray, density_fluctuation: np.ndarray,
                      precorrection: np.ndarray | None = None) -> np.ndarray:
        """(B, nphi, nr, nz) V/cm^2 twice [+ the 1D correction, cm: (B, 3, nphi, nr, nz), or (B, 3, nr, nz)
        when it does not depend on phi (broadcast over phi)] -> (B, 3, nphi, nr, nz) cm."""
        s = self.state
        avg, fl = np.asarray(density_average, np.float32), np.asarray(density_fluctuation, np.float32)
        shape = (avg.shape[0], *self.grid.shape)
        if avg.shape != shape or fl.shape != shape:
            raise ValueError(f"density_average and density_fluctuation must have shape {shape}, got {avg.shape}, {fl.shape}")
        scale = s["target_scale"][:, None, None, None]  # (3, 1, 1, 1)
        pre_t = None
        if self.model_config.residual:
            if precorrection is None:
                raise ValueError("this residual 3D model needs the 1D correction (precorrection, (3, nphi, nr, nz) cm)")
            pre, g = np.asarray(precorrection, np.float32), self.grid
            if pre.shape[-3:] == (3, g.nr, g.nz) and pre.shape[-4:] != (3, *g.shape):
                pre = pre[..., None, :, :]  # phi-independent (B, 3, nr, nz): the same at every phi
            try:
                pre = np.broadcast_to(pre, (shape[0], 3, *g.shape))
            except ValueError:
                raise ValueError(f"precorrection must have shape {(shape[0], 3, *g.shape)} or, phi-independent, "
                                 f"{(shape[0], 3, g.nr, g.nz)}, got {np.shape(precorrection)}") from None
            pre_t = torch.from_numpy(np.ascontiguousarray(pre / scale, dtype=np.float32)).to(self.device)
        fields = np.stack([avg / s["density_scale"], fl / s["fluctuation_scale"]], axis=1)  # (B, 2, nphi, nr, nz)
        x = torch.from_numpy(fields.astype(np.float32)).to(self.device)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
            pre_t = None if pre_t is None else pre_t.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode():
            out = self.model(x, pre_t)
        return (out.float().cpu().numpy() * scale).astype(np.float32)  # (B, 3, nphi, nr, nz) cm

    def predict(self, density_average: np.ndarray, density_fluctuation: np.ndarray,
                precorrection: np.ndarray | None = None) -> np.ndarray:
        """(nphi, nr, nz) V/cm^2 twice [+ the 1D correction (3, nphi, nr, nz) or (3, nr, nz) cm] -> (3, nphi, nr, nz) cm."""
        pre = None if precorrection is None else np.asarray(precorrection)[None]
        return self.predict_batch(np.asarray(density_average)[None], np.asarray(density_fluctuation)[None], pre)[0]


def load_corrector(path: str | Path, *, device: str = "cpu", task: str | None = None,
                   grid: str | Grid | None = None) -> SC1DCorrector | SC3DCorrector:
    """A trained correction from a checkpoint written by ``streamcal train`` (a ``.pt`` file or a run
    directory: its ``best.pt``, else ``last.pt``), ready for ``.predict``. With ``task`` and/or
    ``grid``, a checkpoint of another task or grid is refused (``ValueError`` naming both)."""
    from streamcal.train import load_checkpoint

    want_task, want_grid = task, grid
    ckpt = load_checkpoint(path)
    task = ckpt["task"]
    dev = _resolve_device(device)
    if task == "sc1d":
        config: Any = SC1DTaskConfig.from_dict(ckpt["task_config"])
    elif task == "sc3d":
        config = SC3DTaskConfig.from_dict(ckpt["task_config"])
    else:
        raise ValueError(f"{path}: not a TPC correction checkpoint (task {task!r})")
    state = {k: np.asarray(v.cpu().numpy() if isinstance(v, Tensor) else v) for k, v in ckpt["task_state"].items()}
    if ckpt.get("model_pickle") is not None:
        model: Any = pickle.loads(ckpt["model_pickle"].numpy().tobytes())  # a trusted file written by streamcal train
    else:
        model = SC1DNet(config.model) if task == "sc1d" else UNet3D(config.model)
        model.load_state_dict(ckpt["model_state"])
        model.to(dev).eval()
    corrector = SC1DCorrector(model, config, state, dev) if task == "sc1d" else SC3DCorrector(model, config, state, dev)
    if want_task is not None or want_grid is not None:
        want = parse_grid(want_grid) if want_grid is not None else corrector.grid
        if (want_task or task) != task or want.shape != corrector.grid.shape:
            have = "x".join(map(str, corrector.grid.shape))
            raise ValueError(f"'{path}' is an {task} model trained on grid {have}, not "
                             f"{'x'.join(map(str, want.shape))} ({want_task or task})")
    return corrector

