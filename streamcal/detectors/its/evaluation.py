"""Evaluation of an ITS2 alignment run: residual misalignment, DCA_xy vs pT, chi2/ndf, cost history.

The report behind ``streamcal evaluate align`` (plain numpy/torch; no Ray, no transport).

Run directory
-------------
Written by the alignment workers; :func:`write_run_json` and :func:`load_run` are the one
implementation of the format that both sides use.

* ``run.json``: the run's configuration, :class:`RunConfig`: ``geometry`` (the fields of
  ``ITSGeometryConfig``; ``layers`` a list of ``LayerSpec`` field dicts), ``misalignment``
  (``MisalignmentConfig``), ``simulation`` (``SimulationConfig``), ``model``
  (``ITSAlignmentConfig``), ``constraints`` (``{"modes": [...], "fixed_layers": [...]}``),
  ``workers`` (M, parallel modules), ``tau`` (local steps between synchronisations), ``epochs``
  and ``optimizer`` (``OptimizerConfig``). JSON has no tuples: lists are turned back into tuples.
* ``theta.npy``: (N, 6) float64, the fitted Theta (global frame, ALICE convention, as
  ``ITSAlignmentModel.theta()``).
* ``theta_true.npy``: (N, 6) float64, the true misalignment.
* ``metrics.jsonl``: one JSON object per line; ``{"epoch", "sync", "step", "cost", "tracks",
  "time_s"}`` after a synchronisation, ``{"epoch", "epoch_cost", "time_s"}`` after an epoch
  (costs may be null where no event was seen; other keys are ignored). Lines of other kinds are
  counted and skipped.

Quantities (:func:`evaluate_run`; :func:`write_report` writes ``summary.json`` and the figures)
--------------------------------------------------------------------------------------------------
1. Residual misalignment, fitted minus true, in each sensor's local frame (rotations about the
   chip centre ``rot_u, rot_v, rot_w`` in urad, shifts ``du, dv, dw`` in um; the difference of the
   local deltas of ``misalignment.global_to_local``), mean and RMS per layer and DoF, before
   (Theta = 0) and after. The truth is first brought to what the constrained fit can determine
   (:func:`expected_truth`): relative to the fixed sensors (the rigid-body part of their true
   misalignment is removed from every sensor), then with its component along the constrained
   modes removed (``Theta - Q Q^T Theta``, as ``align.measurement_residuals``; the first-order
   exact answer is ``align.ReferenceSolution.expected``, which needs the normal matrix); when a
   refine held some sensors at their start (``solved.npy``), the modes' amplitudes are those
   that meet the constraints with the held sensors' fitted values. Fixed
   sensors are left out of the statistics. Also over the sensors the training data reach
   (``EvaluationConfig.min_sensor_hits`` expected hits, from a fresh sample selected as in
   training and scaled to the run's events, :func:`sensor_precision`), with the median expected
   error of a sensor fitted alone and the RMS of the pulls residual / that error per layer. When
   the run directory holds the solve's own covariance (``theta_cov.npy``, ``streamcal its refine
   --solver direct``): per layer and DoF the RMS of those errors (the residual's RMS at the
   statistical limit of the data, correlations through the tracks included), the residual's RMS
   over the same sensors and their pulls (:func:`solve_errors`); and, held against the accuracy
   targets (``EvaluationConfig.target_rotation_urad``, ``target_translation_um``), the sensors
   whose error is within the target (the DoFs the tracks constrain to it) and the residual's RMS
   over them (``within_target``).
2. DCA_xy vs pT on fresh test samples (the run's simulation with another seed): on the ideal
   geometry fitted with Theta = 0 (``ideal``) and on the true misaligned geometry fitted with
   Theta = 0 (``before``) and with the run's Theta (``after``). Each track is fitted without the
   vertex term (``vertex="none"``, so the vertex does not pull the track) and DCA_xy is the
   signed transverse distance of the fitted circle to the true primary vertex (:func:`dca_xy`).
   Per bin of generated pT: mean (bias) with its error, width as the robust sigma
   ``1.4826 MAD`` with its asymptotic error ``1.166 sigma / sqrt(n)``, the resolution expected
   from the hit resolution and multiple scattering (:func:`predicted_dca_sigma`) and the width of
   the pulls ``DCA / sigma_expected``.
3. chi2/ndf per track on the same samples with the run's own cost (``ITSAlignmentModel``, the
   run's vertex mode), its distribution and mean, and the seed's cost C.
4. The cost history of the run and of any runs to compare with, labelled with M and tau.

Selection of test tracks: at least ``min_hits`` hits and, with ``inner_hit``, one on the
innermost layer (as the inner-barrel requirement of DCA studies: a track without it
extrapolates over a long lever arm and its DCA says little about the alignment).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from scipy.special import erf
from torch import Tensor

from streamcal.detectors.its.align import Constraints, OptimizerConfig, local_basis, pack_tracks
from streamcal.detectors.its.geometry import ITSGeometry, ITSGeometryConfig, LayerSpec, build_geometry
from streamcal.detectors.its.misalignment import (
    RIGID_MODES,
    WEAK_MODES,
    MisalignmentConfig,
    check_theta,
    compose,
    euler_to_matrix,
    global_to_local,
    matrix_to_euler,
)
from streamcal.detectors.its.refine import _diag_blocks, _linearise
from streamcal.detectors.its.simulation import PION_MASS, SimulationConfig, simulate
from streamcal.errors import ConfigError, StreamcalError
from streamcal.models.its_alignment import ITSAlignmentConfig, ITSAlignmentModel, TrackBatch, highland_theta0

__all__ = [
    "RUN_JSON",
    "THETA_NPY",
    "THETA_TRUE_NPY",
    "METRICS_JSONL",
    "DOFS",
    "DOF_UNITS",
    "SERIES",
    "FIGURES",
    "DEFAULT_PT_EDGES",
    "RunFormatError",
    "ConstraintSpec",
    "RunConfig",
    "RunMetrics",
    "AlignmentRun",
    "write_run_json",
    "load_run_config",
    "read_metrics",
    "load_run",
    "expected_truth",
    "residual_statistics",
    "EvalSample",
    "simulate_eval_sample",
    "DCAResult",
    "dca_xy",
    "predicted_dca_sigma",
    "robust_sigma",
    "expected_robust_sigma",
    "dca_vs_pt",
    "chi2_per_track",
    "SensorPrecision",
    "sensor_precision",
    "solve_errors",
    "alignment_targets",
    "EvaluationConfig",
    "default_test_seed",
    "evaluate_run",
    "write_report",
    "AlignmentReport",
    "evaluate_alignment",
]

RUN_JSON = "run.json"
THETA_NPY = "theta.npy"
THETA_TRUE_NPY = "theta_true.npy"
SOLVED_NPY = "solved.npy"
# optional: (N, 6, 6) covariance blocks of Theta (``streamcal its refine --solver direct``)
THETA_COV_NPY = "theta_cov.npy"
METRICS_JSONL = "metrics.jsonl"
DOFS: tuple[str, ...] = ("rot_u", "rot_v", "rot_w", "du", "dv", "dw")
DOF_UNITS: dict[str, str] = {"rot_u": "urad", "rot_v": "urad", "rot_w": "urad", "du": "um", "dv": "um", "dw": "um"}
_DOF_SCALE = np.array([1e6, 1e6, 1e6, 1e3, 1e3, 1e3])  # rad -> urad, mm -> um
SERIES: tuple[str, ...] = ("ideal", "before", "after")
SERIES_LABELS = {
    "ideal": "ideal geometry",
    "before": "misaligned, Theta = 0 (before)",
    "after": "misaligned, fitted Theta (after)",
}
_COLORS = {"ideal": "0.35", "before": "C3", "after": "C0"}
FIGURES = {
    "residuals": "residual_misalignment.png",
    "dca": "dca_xy_vs_pt.png",
    "chi2": "chi2_ndf.png",
    "cost": "cost_history.png",
}
DEFAULT_PT_EDGES: tuple[float, ...] = tuple(float(x) for x in np.geomspace(0.2, 20.0, 11))
_MAD_TO_SIGMA = 1.4826
# asymptotic standard error of 1.4826 MAD for a Gaussian: sqrt(1.360 / n) sigma
_MAD_SIGMA_ERR = math.sqrt(1.3605)


class RunFormatError(StreamcalError, ValueError):
    """A file of a run directory is missing or malformed; ``path`` names it."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


# ------------------------------------------------------------------------------------------------
# Run configuration


@dataclass(frozen=True)
class ConstraintSpec:
    """The constraints of a run, as written to ``run.json``.

    Args:
        modes: global modes removed from the fit (names of ``misalignment.weak_mode``).
        fixed_layers: layers whose sensors are held at Theta = 0 (the reference).
    """

    modes: tuple[str, ...] = ()
    fixed_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.modes, tuple) or not all(isinstance(m, str) for m in self.modes):
            raise ValueError(f"ConstraintSpec.modes must be a tuple of mode names, got {self.modes!r}")
        for m in self.modes:
            if m not in WEAK_MODES + RIGID_MODES:
                raise ValueError(f"ConstraintSpec.modes: unknown mode {m!r}; allowed: {WEAK_MODES + RIGID_MODES}")
        if not isinstance(self.fixed_layers, tuple) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.fixed_layers
        ):
            raise ValueError(
                f"ConstraintSpec.fixed_layers must be a tuple of layer indices >= 0, got {self.fixed_layers!r}"
            )
        if len(set(self.fixed_layers)) != len(self.fixed_layers):
            raise ValueError(f"ConstraintSpec.fixed_layers has duplicates: {self.fixed_layers}")

    def fixed_sensors(self, geom: ITSGeometry) -> np.ndarray:
        """Sensor ids of the fixed layers (sorted)."""
        bad = [x for x in self.fixed_layers if x >= geom.n_layers]
        if bad:
            raise ValueError(f"ConstraintSpec.fixed_layers: {bad} not in 0..{geom.n_layers - 1}")
        return np.nonzero(np.isin(geom.layer, np.asarray(self.fixed_layers, dtype=np.int64)))[0]

    def build(self, geom: ITSGeometry) -> Constraints:
        """The ``align.Constraints`` of this spec on ``geom``."""
        return Constraints.build(geom, modes=self.modes, fixed=self.fixed_sensors(geom))


@dataclass(frozen=True)
class RunConfig:
    """Everything a run directory's ``run.json`` holds.

    Args:
        geometry, misalignment, simulation, model: the configs of the run (training data were
            simulated with ``simulation`` on the geometry misaligned by ``misalignment``).
        constraints: weak-mode constraints and fixed layers.
        workers: M, the number of parallel modules.
        tau: local optimiser steps between two synchronisations.
        epochs: passes over the training data.
        optimizer: the Theta-space optimiser.
        refined_from: the run directory this one refines (``streamcal its refine``: global
            Gauss-Newton, ``epochs`` relinearisations); empty for a run of the workers.
    """

    geometry: ITSGeometryConfig
    misalignment: MisalignmentConfig
    simulation: SimulationConfig
    model: ITSAlignmentConfig
    constraints: ConstraintSpec = ConstraintSpec()
    workers: int = 1
    tau: int = 1
    epochs: int = 1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    refined_from: str = ""

    def __post_init__(self) -> None:
        types = {"geometry": ITSGeometryConfig, "misalignment": MisalignmentConfig, "simulation": SimulationConfig,
                 "model": ITSAlignmentConfig, "constraints": ConstraintSpec, "optimizer": OptimizerConfig}
        for name, cls in types.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"RunConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        for name, low in (("workers", 1), ("tau", 1), ("epochs", 0)):
            val = getattr(self, name)
            if not (isinstance(val, int) and not isinstance(val, bool) and val >= low):
                raise ValueError(f"RunConfig.{name} must be an integer >= {low}, got {val!r}")
        bad = [x for x in self.constraints.fixed_layers if x >= len(self.geometry.layers)]
        if bad:
            raise ValueError(f"RunConfig.constraints.fixed_layers: {bad} not in 0..{len(self.geometry.layers) - 1}")

    @property
    def label(self) -> str:
        """``"M=4, tau=5"``, or ``"refined (GN-CG) from RUN"``."""
        if self.refined_from:
            return f"refined (GN-CG) from {Path(self.refined_from).name}"
        return f"M={self.workers}, tau={self.tau}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str | os.PathLike[str] = RUN_JSON) -> RunConfig:
        """Inverse of :meth:`to_dict`; errors are :class:`RunFormatError` naming ``path`` and the field."""
        if not isinstance(data, Mapping):
            raise RunFormatError(path, f"expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise RunFormatError(path, f"unknown key(s) {unknown}; allowed: {names}")
        missing = [n for n in names if n not in data and n != "refined_from"]  # refined_from: optional
        if missing:
            raise RunFormatError(path, f"missing key(s) {missing}")
        geo = dict(_section(data, "geometry", path))
        if "layers" in geo:
            layers = geo["layers"]
            if not isinstance(layers, list) or not layers:
                raise RunFormatError(path, "geometry.layers must be a non-empty list of LayerSpec objects")
            geo["layers"] = tuple(_build(LayerSpec, lay, path, f"geometry.layers[{i}]") for i, lay in enumerate(layers))
        kwargs: dict[str, Any] = {
            "geometry": _build(ITSGeometryConfig, geo, path, "geometry"),
            "misalignment": _build(MisalignmentConfig, _section(data, "misalignment", path), path, "misalignment"),
            "simulation": _build(SimulationConfig, _section(data, "simulation", path), path, "simulation"),
            "model": _build(ITSAlignmentConfig, _section(data, "model", path), path, "model"),
            "constraints": _build(ConstraintSpec, _section(data, "constraints", path), path, "constraints"),
            "optimizer": _build(OptimizerConfig, _section(data, "optimizer", path), path, "optimizer"),
        }
        for name in ("workers", "tau", "epochs"):
            kwargs[name] = data[name]
        refined = data.get("refined_from", "")
        if not isinstance(refined, str):
            raise RunFormatError(path, f"refined_from must be a string (a run directory), got {refined!r}")
        kwargs["refined_from"] = refined
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise RunFormatError(path, str(exc)) from exc


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _tuples(obj: Any) -> Any:
    """Lists (JSON arrays) back to tuples, recursively."""
    if isinstance(obj, list):
        return tuple(_tuples(x) for x in obj)
    return obj


def _section(data: Mapping[str, Any], name: str, path: str | os.PathLike[str]) -> Mapping[str, Any]:
    sec = data[name]
    if not isinstance(sec, Mapping):
        raise RunFormatError(path, f"{name} must be a JSON object, got {type(sec).__name__}")
    return sec


def _build(cls: type, data: Any, path: str | os.PathLike[str], where: str) -> Any:
    """``cls(**data)`` with lists as tuples; unknown keys and invalid values name ``where``."""
    if not isinstance(data, Mapping):
        raise RunFormatError(path, f"{where} must be a JSON object, got {type(data).__name__}")
    names = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RunFormatError(path, f"{where}: unknown field(s) {unknown} of {cls.__name__}; allowed: {names}")
    try:
        return cls(**{k: v if k == "layers" else _tuples(v) for k, v in data.items()})
    except (TypeError, ValueError) as exc:
        raise RunFormatError(path, f"{where}: {exc}") from exc


def write_run_json(run_dir: str | os.PathLike[str], config: RunConfig) -> Path:
    """Write ``run_dir/run.json`` (creating ``run_dir``) atomically; returns its path."""
    if not isinstance(config, RunConfig):
        raise ValueError(f"write_run_json: config must be a RunConfig, got {type(config).__name__}")
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_JSON
    tmp = path.with_name(f".{RUN_JSON}.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def load_run_config(run_dir: str | os.PathLike[str]) -> RunConfig:
    """The :class:`RunConfig` of ``run_dir/run.json``."""
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise RunFormatError(path, f"missing (a run directory holds {RUN_JSON}, {THETA_NPY}, {THETA_TRUE_NPY} "
                                   f"and {METRICS_JSONL})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFormatError(path, f"not valid JSON: {exc}") from exc
    return RunConfig.from_dict(data, path)


@dataclass(frozen=True)
class RunMetrics:
    """The records of ``metrics.jsonl`` as arrays (in file order).

    Attributes:
        sync_epoch, sync_index, sync_step, sync_tracks: (S,) int64 of the synchronisation records.
        sync_cost, sync_time: (S,) float64 (cost at the synchronisation, seconds since the start).
        epoch, epoch_cost, epoch_time: (E,) of the end-of-epoch records.
        skipped: lines of other kinds.
    """

    sync_epoch: np.ndarray
    sync_index: np.ndarray
    sync_step: np.ndarray
    sync_tracks: np.ndarray
    sync_cost: np.ndarray
    sync_time: np.ndarray
    epoch: np.ndarray
    epoch_cost: np.ndarray
    epoch_time: np.ndarray
    skipped: int = 0


# key -> kind: "int", "float", or "cost" (a number, or null when a synchronisation or epoch saw no
# event: NaN in the arrays)
_SYNC_KEYS = {"epoch": "int", "sync": "int", "step": "int", "cost": "cost", "tracks": "int", "time_s": "float"}
_EPOCH_KEYS = {"epoch": "int", "epoch_cost": "cost", "time_s": "float"}


def _record(obj: Mapping[str, Any], keys: Mapping[str, str], path: Path, line: int) -> list[float]:
    out = []
    for key, kind in keys.items():
        if key not in obj:
            raise RunFormatError(path, f"line {line}: record without {key!r}: {dict(obj)}")
        val = obj[key]
        if kind == "cost" and val is None:
            out.append(math.nan)
            continue
        ok = isinstance(val, int) if kind == "int" else isinstance(val, (int, float))
        if isinstance(val, bool) or not ok:
            what = "an integer" if kind == "int" else "a number" + (" or null" if kind == "cost" else "")
            raise RunFormatError(path, f"line {line}: {key!r} must be {what}, got {val!r}")
        out.append(val)
    return out


def read_metrics(path: str | os.PathLike[str]) -> RunMetrics:
    """Parse a ``metrics.jsonl`` file (see the module docstring); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise RunFormatError(path, "missing (the workers' metrics, one JSON object per line)")
    syncs: list[list[float]] = []
    epochs: list[list[float]] = []
    skipped = 0
    with path.open() as f:
        for i, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RunFormatError(path, f"line {i}: not valid JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise RunFormatError(path, f"line {i}: expected a JSON object, got {type(obj).__name__}")
            if "epoch_cost" in obj:
                epochs.append(_record(obj, _EPOCH_KEYS, path, i))
            elif "sync" in obj:
                syncs.append(_record(obj, _SYNC_KEYS, path, i))
            else:
                skipped += 1
    s = np.asarray(syncs, dtype=np.float64).reshape(-1, len(_SYNC_KEYS))
    e = np.asarray(epochs, dtype=np.float64).reshape(-1, len(_EPOCH_KEYS))
    return RunMetrics(
        sync_epoch=s[:, 0].astype(np.int64), sync_index=s[:, 1].astype(np.int64), sync_step=s[:, 2].astype(np.int64),
        sync_cost=s[:, 3], sync_tracks=s[:, 4].astype(np.int64), sync_time=s[:, 5],
        epoch=e[:, 0].astype(np.int64), epoch_cost=e[:, 1], epoch_time=e[:, 2], skipped=skipped,
    )


@dataclass(frozen=True, eq=False)
class AlignmentRun:
    """A loaded run directory.

    Attributes:
        run_dir: the directory.
        config: its ``run.json``.
        metrics: its ``metrics.jsonl``.
        theta, theta_true: (N, 6) fitted and true Theta (None when loaded without arrays).
        theta_cov: (N, 6, 6) covariance blocks of Theta (``theta_cov.npy``, written by ``streamcal
            its refine --solver direct``; NaN for the sensors it did not solve), or None.
        solved: (N,) bool, the sensors the fit moved (``solved.npy``, written by ``streamcal its
            refine``: the others were held at their start), or None (every free sensor moved).
    """

    run_dir: Path
    config: RunConfig
    metrics: RunMetrics
    theta: np.ndarray | None = None
    theta_true: np.ndarray | None = None
    theta_cov: np.ndarray | None = None
    solved: np.ndarray | None = None

    @property
    def label(self) -> str:
        return self.config.label


def _read_npy(path: Path) -> Any:
    if not path.is_file():
        raise RunFormatError(path, "missing")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RunFormatError(path, f"not a readable .npy array: {exc}") from exc


def _load_theta(path: Path, n_sensors: int) -> np.ndarray:
    arr = _read_npy(path)
    if not isinstance(arr, np.ndarray) or arr.shape != (n_sensors, 6):
        shape = getattr(arr, "shape", None)
        raise RunFormatError(path, f"must have shape ({n_sensors}, 6) for the run's geometry, got {shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise RunFormatError(path, f"must hold floating-point values, got {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise RunFormatError(path, "must be finite (found NaN or inf)")
    return arr


def load_run(run_dir: str | os.PathLike[str], *, arrays: bool = True) -> AlignmentRun:
    """Load a run directory (``theta.npy`` and ``theta_true.npy`` only with ``arrays``; a run to
    compare costs with needs just ``run.json`` and ``metrics.jsonl``)."""
    rd = Path(run_dir)
    if not rd.is_dir():
        raise RunFormatError(rd, "not a directory (expected a run directory of the alignment workers)")
    config = load_run_config(rd)
    metrics = read_metrics(rd / METRICS_JSONL)
    theta = theta_true = cov = solved = None
    if arrays:
        n = config.geometry.n_sensors
        theta = _load_theta(rd / THETA_NPY, n)
        theta_true = _load_theta(rd / THETA_TRUE_NPY, n)
        if (rd / THETA_COV_NPY).exists():
            cov = _load_covariance(rd / THETA_COV_NPY, n)
        if (rd / SOLVED_NPY).exists():
            solved = _read_npy(rd / SOLVED_NPY)
            if not isinstance(solved, np.ndarray) or solved.shape != (n,) or solved.dtype != bool:
                raise RunFormatError(rd / SOLVED_NPY, f"must be a bool array of shape ({n},) for the run's geometry, "
                                                      f"got {getattr(solved, 'dtype', None)} "
                                                      f"{getattr(solved, 'shape', None)}")
    return AlignmentRun(rd, config, metrics, theta, theta_true, cov, solved)


def _load_covariance(path: Path, n_sensors: int) -> np.ndarray:
    """``theta_cov.npy``: (N, 6, 6) symmetric blocks, finite or all NaN per sensor (not solved)."""
    arr = _read_npy(path)
    if not isinstance(arr, np.ndarray) or arr.shape != (n_sensors, 6, 6) or not np.issubdtype(arr.dtype, np.floating):
        raise RunFormatError(path, f"must be a floating-point array of shape ({n_sensors}, 6, 6) for the run's "
                                   f"geometry, got {getattr(arr, 'dtype', None)} {getattr(arr, 'shape', None)}")
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr).reshape(n_sensors, 36)
    mixed = finite.any(1) & ~finite.all(1)
    if mixed.any():
        raise RunFormatError(path, f"sensor {int(np.flatnonzero(mixed)[0])}: a block must be all finite or all NaN "
                                   "(not solved)")
    ok = finite.all(1)
    diag = np.diagonal(arr[ok], axis1=1, axis2=2)
    if (diag < 0).any() or np.abs(arr[ok] - arr[ok].transpose(0, 2, 1)).max(initial=0.0) > 1e-9 * max(
            float(np.abs(diag).max(initial=0.0)), 1e-300):
        raise RunFormatError(path, "the blocks must be symmetric with a non-negative diagonal (covariances)")
    return arr


# ------------------------------------------------------------------------------------------------
# 1. Residual misalignment


def _invert(theta: np.ndarray) -> np.ndarray:
    """Theta of the inverse global deltas: ``a_R^T``, ``-a_R^T a_T`` (N, 6)."""
    rot_t = np.swapaxes(euler_to_matrix(theta[:, :3]), 1, 2)
    return np.concatenate([matrix_to_euler(rot_t), -np.einsum("nij,nj->ni", rot_t, theta[:, 3:])], 1)


def expected_truth(geom: ITSGeometry, theta_true: np.ndarray, constraints: ConstraintSpec,
                   solved: np.ndarray | None = None, theta_fit: np.ndarray | None = None) -> np.ndarray:
    """What a constrained fit can recover of ``theta_true`` (N, 6), the reference for residuals.

    * Fixed sensors: the fit keeps them at Theta = 0, so it measures every sensor relative to
      them. The rigid-body part of their true misalignment, ``G`` (in the global Theta a rigid
      motion is the same Theta on every sensor; ``G`` is their mean Theta), is removed from every
      sensor exactly: ``G^-1 o Theta_true`` (``misalignment.compose``). Their own rows become 0.
    * Mode constraints: the component along the constrained modes (orthonormal ``Q`` of
      ``align.Constraints``, restricted to the free sensors) is removed, ``Theta - Q Q^T Theta``.
    * Held sensors (``solved``, bool (N,), with the fit ``theta_fit``): a fit that moves only
      the ``solved`` sensors (``streamcal its refine`` holds those with too few hits, and the
      layers it was not asked to solve, at their start: ``solved.npy``) meets ``Q^T Theta = 0``
      with the held sensors at their fitted values, so the constrained modes' amplitudes on the
      solved ones are what makes the sum vanish with those, not with the held sensors' truth:
      ``Theta_s - Q_s (Q_s^T Q_s)^+ Q^T Theta'``, ``Q_s`` the rows of the solved sensors and
      ``Theta'`` the truth with the held rows replaced by the fit's. The held sensors' own rows
      stay the truth's (their residuals show where the fit left them). Without it the held
      sensors' errors move the reference of every solved one: on the full ITS2 (19,107 of
      24,120 chips solved; the 5,013 held ones' gamma 8.3 urad off the truth on average) the
      inner barrel's reference turns by 7 urad about the beam axis (0.17-0.26 um in du).

    Exact for truths made of a rigid motion plus anything the constraints leave free; a
    non-rigid misalignment of the fixed sensors themselves propagates into the fit in a way only
    the normal equations know (``align.ReferenceSolution.expected``)."""
    truth = check_theta(geom, theta_true, "expected_truth", "theta_true").copy()
    if (solved is None) != (theta_fit is None):
        raise ValueError("expected_truth: solved and theta_fit go together (the fit's held sensors and its values)")
    fixed = constraints.fixed_sensors(geom)
    if fixed.size:
        g = np.broadcast_to(truth[fixed].mean(0), truth.shape).copy()
        truth = compose(_invert(g), truth)
        truth[fixed] = 0.0
    q = constraints.build(geom).q.numpy()
    if q.shape[1]:  # Theta_s - Q_s (Q_s^T Q_s)^+ Q^T Theta' (every sensor solved: Theta - Q Q^T Theta)
        mask = np.ones(geom.n_sensors, dtype=bool) if solved is None else np.asarray(solved)
        if mask.shape != (geom.n_sensors,) or mask.dtype != bool:
            raise ValueError(f"expected_truth: solved must be a bool mask of shape ({geom.n_sensors},), got "
                             f"{mask.dtype} {mask.shape}")
        mixed = truth.copy()
        if solved is not None:
            fit = check_theta(geom, theta_fit, "expected_truth", "theta_fit")
            mixed[~mask] = fit[~mask]
        qs = q * np.repeat(mask, 6)[:, None]
        lam = np.linalg.lstsq(qs.T @ qs, q.T @ mixed.reshape(-1), rcond=1e-12)[0]
        truth = truth - (qs @ lam).reshape(truth.shape)
        truth[fixed] = 0.0
    return truth


def residual_statistics(
    geom: ITSGeometry, theta_fit: np.ndarray, theta_ref: np.ndarray, sensors: np.ndarray | None = None
) -> dict[str, Any]:
    """Fitted minus reference misalignment in each sensor's local frame, per layer and DoF.

    ``local(theta_fit) - local(theta_ref)`` (``misalignment.global_to_local``) in urad (rot_u,
    rot_v, rot_w) and um (du, dv, dw), over ``sensors`` (a bool mask (N,) or ids; default all).
    Returns ``{"layers": {dof: {"mean": [L], "rms": [L], "n": [L]}}, "all": {dof: {"mean",
    "rms", "n"}}}`` (None where a layer has no sensor)."""
    d = (global_to_local(geom, theta_fit) - global_to_local(geom, theta_ref)) * _DOF_SCALE  # (N, 6)
    sel = np.ones(geom.n_sensors, dtype=bool)
    if sensors is not None:
        s = np.asarray(sensors)
        if s.dtype == bool:
            if s.shape != (geom.n_sensors,):
                raise ValueError(f"residual_statistics: sensors mask must have shape ({geom.n_sensors},)")
            sel = s
        else:
            sel = np.zeros(geom.n_sensors, dtype=bool)
            sel[s.astype(np.int64)] = True
    layers: dict[str, dict[str, list[Any]]] = {}
    total: dict[str, dict[str, Any]] = {}
    for j, dof in enumerate(DOFS):
        rows: dict[str, list[Any]] = {"mean": [], "rms": [], "n": []}
        for li in range(geom.n_layers):
            v = d[sel & (geom.layer == li), j]
            rows["n"].append(int(v.size))
            rows["mean"].append(float(v.mean()) if v.size else None)
            rows["rms"].append(float(np.sqrt(np.mean(v * v))) if v.size else None)
        layers[dof] = rows
        v = d[sel, j]
        total[dof] = {"mean": float(v.mean()) if v.size else None,
                      "rms": float(np.sqrt(np.mean(v * v))) if v.size else None, "n": int(v.size)}
    return {"layers": layers, "all": total}


# ------------------------------------------------------------------------------------------------
# 2. Test samples and DCA_xy


@dataclass(frozen=True, eq=False)
class EvalSample:
    """Selected tracks of a freshly simulated test sample.

    Attributes:
        batch: the tracks (ordered by event and track), with the true vertex per event.
        pt: (T,) generated pT (GeV/c) of each track.
        events: simulated events.
        tracks_generated: simulated tracks; ``tracks_too_few_hits`` and ``tracks_no_inner_hit``
            were dropped (in this order), ``batch.n_tracks`` kept.
        seed: the simulation seed.
        misaligned: simulated on the misaligned geometry.
        sigma_u: the simulated intrinsic resolution along u (mm).
        multiple_scattering, mass: as simulated.
    """

    batch: TrackBatch
    pt: np.ndarray
    events: int
    tracks_generated: int
    tracks_too_few_hits: int
    tracks_no_inner_hit: int
    seed: int
    misaligned: bool
    sigma_u: float
    multiple_scattering: bool
    mass: float

    def describe(self) -> dict[str, Any]:
        """Sizes and selection counts, for the report."""
        return {"events": self.events, "seed": self.seed, "misaligned": self.misaligned,
                "tracks_generated": self.tracks_generated, "tracks_too_few_hits": self.tracks_too_few_hits,
                "tracks_no_inner_hit": self.tracks_no_inner_hit, "tracks_used": self.batch.n_tracks}


def simulate_eval_sample(
    geom: ITSGeometry,
    config: SimulationConfig,
    n_events: int,
    *,
    theta: np.ndarray | None = None,
    min_hits: int = 4,
    max_hits: int = 16,
    inner_hit: bool = True,
) -> EvalSample:
    """Simulate ``n_events`` on the geometry misaligned by ``theta`` (ideal if None) and keep the
    tracks with ``min_hits .. max_hits`` hits (and, with ``inner_hit``, one on layer 0)."""
    if not (isinstance(n_events, int) and n_events >= 1):
        raise ValueError(f"simulate_eval_sample: n_events must be an integer >= 1, got {n_events!r}")
    hits = pa.Table.from_batches(list(simulate(geom, config, n_events, theta=theta)))
    event = hits.column("event").to_numpy()
    track = hits.column("track").to_numpy().astype(np.int64)
    layer = hits.column("layer").to_numpy()
    key = event * config.tracks_per_event + track  # unique per (event, track), rows grouped by track
    ukey, first, inverse, count = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    n_gen = n_events * config.tracks_per_event
    enough = (count >= min_hits) & (count <= max_hits)
    inner = np.bincount(inverse, weights=(layer == 0), minlength=ukey.size) > 0
    keep = enough & (inner if inner_hit else True)
    rows = keep[inverse]
    batch, cnt = pack_tracks(hits.filter(pa.array(rows)), geom, min_hits=min_hits, max_hits=max_hits, with_vertex=True)
    if cnt.tracks_used != int(keep.sum()):  # pragma: no cover - the simulator writes clean hits
        raise RuntimeError(f"simulate_eval_sample: pack_tracks kept {cnt.tracks_used} of {int(keep.sum())} "
                           f"selected tracks ({cnt})")
    pt = hits.column("pt").to_numpy().astype(np.float64)[first[keep]]
    return EvalSample(
        batch=batch, pt=pt, events=n_events, tracks_generated=n_gen,
        tracks_too_few_hits=int(n_gen - enough.sum()), tracks_no_inner_hit=int((enough & ~keep).sum()),
        seed=int(config.seed), misaligned=theta is not None, sigma_u=float(config.sigma_u),
        multiple_scattering=bool(config.multiple_scattering), mass=float(config.mass),
    )


@dataclass(frozen=True, eq=False)
class DCAResult:
    """DCA_xy of every track of an :class:`EvalSample`.

    Attributes:
        dca: (T,) signed transverse distance (mm) of the fitted circle to the true vertex:
            the trajectory's closest point is ``V + dca (-sin phi, cos phi)`` with ``phi`` the
            track direction there (positive: the track passes to the left of the vertex).
        sigma: (T,) expected resolution (mm), :func:`predicted_dca_sigma`.
        pt: (T,) generated pT (GeV/c).
    """

    dca: np.ndarray
    sigma: np.ndarray
    pt: np.ndarray


def predicted_dca_sigma(model: ITSAlignmentModel, batch: TrackBatch, fit: Mapping[str, Tensor], pt: Tensor,
                        sigma_u: float, multiple_scattering: bool = True, mass: float = PION_MASS) -> Tensor:
    """Expected DCA_xy resolution (mm) of each track of ``batch`` for the circle fit ``fit``
    (``ITSAlignmentModel._evaluate`` without vertex term): linear error propagation of the
    weighted fit, ``sigma^2 = (B C B^T)_{delta delta}`` with ``B = (J^T W J)^-1 J^T W``, ``J`` the
    derivatives of the residuals ``e = kappa r^2 - (y cos phi - x sin phi) + delta`` by
    ``(delta, phi, kappa)``, ``W`` the fit's weights and ``C`` the true covariance of the hits:
    the intrinsic ``sigma_u`` projected on the circle normal plus the full (correlated) Highland
    covariance ``sum_l theta0_l^2 (r_i - r_l)(r_j - r_l) / cos^2 lambda`` of the layers crossed
    before both hits (PDG Highland form, ``p = pT / cos lambda``, thickness ``x/X0 / cos lambda``,
    scatterers at the mean layer radii). ``pt`` (T,) is the true pT."""
    x, y = fit["x"], fit["y"]  # (T, K) relative to the reference point
    dt = x.dtype
    m = batch.mask.to(dt)
    k, c, s = fit["kappa"][:, None], fit["cos"][:, None], fit["sin"][:, None]
    gx, gy = 2 * k * x + s, 2 * k * y - c  # gradient of e
    eu = model.rot_geom.to(dt)[batch.sensor][..., 0]  # (T, K, 3)
    var_int = (sigma_u * (eu[..., 0] * gx + eu[..., 1] * gy)) ** 2 * m
    cov = torch.diag_embed(var_int)  # (T, K, K)
    r = torch.sqrt(x * x + y * y)
    if multiple_scattering:
        tl = fit["tanl"]
        sec2 = 1.0 + tl * tl
        p = pt.to(dt) * sec2.sqrt()
        th2 = highland_theta0(p[:, None], model.layer_x0.to(dt)[None, :] * sec2.sqrt()[:, None], mass) ** 2  # (T, L)
        lay = model.sensor_layer[batch.sensor]  # (T, K)
        n_layers = model.layer_radius.shape[0]
        before = torch.arange(n_layers)[None, None, :] < lay[:, :, None]  # (T, K, L) scatterer before the hit
        arm = (r[:, :, None] - model.layer_radius.to(dt)[None, None, :]).clamp_min(0.0) * before * m[:, :, None]
        cov = cov + sec2[:, None, None] * torch.einsum("tkl,tl,tjl->tkj", arm, th2, arm)
    r0 = float(model.layer_radius.max())  # column scaling (conditioning); the delta row is unchanged
    jac = torch.stack([torch.ones_like(x), (x * c + y * s) / r0, r * r / r0**2], -1) * m[..., None]  # (T, K, 3)
    jw = jac.transpose(1, 2) * fit["w_xy"][:, None, :]  # (T, 3, K)
    b = torch.linalg.solve(jw @ jac, jw)[:, 0]  # (T, K): d delta / d e_k
    return torch.einsum("tk,tkj,tj->t", b, cov, b).clamp_min(0.0).sqrt()


@torch.no_grad()
def dca_xy(geom: ITSGeometry, sample: EvalSample, theta: np.ndarray, model_config: ITSAlignmentConfig,
           *, chunk_tracks: int = 8192) -> DCAResult:
    """Fit every track of ``sample`` with the geometry corrected by ``theta`` (N, 6) and the cost
    of ``model_config`` without vertex term (``vertex="none"``), and return its DCA_xy to the
    true vertex with the expected resolution.

    The fit is Karimaki's (``ITSAlignmentModel``) relative to the beam spot ``O``; its residual
    ``e(P) = kappa |P - O|^2 - ((P - O)_y cos phi - (P - O)_x sin phi) + delta`` is the signed
    distance of ``P`` to the circle (up to ``1 + rho d``: < 1e-4 relative for d < 0.1 mm), so the
    DCA to the vertex ``V`` is ``e(V)`` (``delta`` is the DCA to ``O``)."""
    theta = check_theta(geom, theta, "dca_xy")
    model = ITSAlignmentModel.from_geometry(geom, replace(model_config, vertex="none", precision="float64"))
    model.set_theta(torch.from_numpy(theta))
    batch = sample.batch
    if batch.vertex is None:
        raise ValueError("dca_xy: the sample's TrackBatch carries no vertex")
    pt_all = torch.from_numpy(sample.pt)
    dca = torch.zeros(batch.n_tracks, dtype=torch.float64)
    sig = torch.zeros(batch.n_tracks, dtype=torch.float64)
    phi = model.phi.detach()
    nh = batch.mask.sum(1)
    for lo in range(0, batch.n_tracks, chunk_tracks):
        idx = slice(lo, min(lo + chunk_tracks, batch.n_tracks))
        kmax = max(int(nh[idx].max()), 1)
        sub = TrackBatch(batch.sensor[idx, :kmax], batch.local[idx, :kmax], batch.mask[idx, :kmax],
                         batch.event[idx], batch.n_events, batch.vertex)
        fit = model._evaluate(sub, phi, need_grad=False)
        v = batch.vertex.to(torch.float64)[sub.event] - fit["ref"]  # (t, 3) vertex relative to the reference
        c, s = fit["cos"], fit["sin"]
        dca[idx] = fit["kappa"] * (v[:, 0] ** 2 + v[:, 1] ** 2) - (v[:, 1] * c - v[:, 0] * s) + fit["delta"]
        sig[idx] = predicted_dca_sigma(model, sub, fit, pt_all[idx], sample.sigma_u, sample.multiple_scattering,
                                       sample.mass)
    return DCAResult(dca.numpy(), sig.numpy(), sample.pt)


def robust_sigma(values: np.ndarray) -> tuple[float, float]:
    """``1.4826 MAD`` (about the median) and its asymptotic standard error for a Gaussian,
    ``sqrt(1.36 / n) sigma``; (nan, nan) for an empty array."""
    v = np.asarray(values, dtype=np.float64)
    if not v.size:
        return math.nan, math.nan
    sig = _MAD_TO_SIGMA * float(np.median(np.abs(v - np.median(v))))
    return sig, _MAD_SIGMA_ERR * sig / math.sqrt(v.size)


def expected_robust_sigma(sigmas: np.ndarray) -> float:
    """Expected value of :func:`robust_sigma` for zero-mean Gaussian values with the per-value
    widths ``sigmas`` (a mixture: tracks with different hit patterns and momenta): ``1.4826 m``
    with ``mean_i erf(m / (sqrt(2) sigma_i)) = 1/2`` (the median of |x|), solved by bisection."""
    s = np.asarray(sigmas, dtype=np.float64)
    s = s[np.isfinite(s) & (s > 0)]
    if not s.size:
        return math.nan
    lo, hi = 0.0, float(s.max())  # median of |x| < max sigma (P(|x| < sigma) = 0.68)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(np.mean(erf(mid / (math.sqrt(2.0) * s)))) < 0.5:
            lo = mid
        else:
            hi = mid
    return _MAD_TO_SIGMA * 0.5 * (lo + hi)


def dca_vs_pt(result: DCAResult, edges: Sequence[float] = DEFAULT_PT_EDGES, min_count: int = 50) -> dict[str, Any]:
    """DCA_xy statistics in bins of generated pT (um): ``n``, ``mean_um`` (bias) and
    ``mean_err_um`` (std / sqrt(n)), ``width_um`` and ``width_err_um`` (:func:`robust_sigma`),
    ``expected_um`` (:func:`expected_robust_sigma` of the predicted resolutions, the width the
    track fit alone would give), ``pull_width`` and ``pull_width_err`` (robust sigma of DCA /
    predicted sigma). Bins with fewer than ``min_count`` tracks hold None."""
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.diff(e) > 0):
        raise ValueError(f"dca_vs_pt: edges must be increasing with at least 2 entries, got {edges!r}")
    out: dict[str, list[Any]] = {k: [] for k in ("n", "mean_um", "mean_err_um", "width_um", "width_err_um",
                                                 "expected_um", "pull_width", "pull_width_err")}
    d_um, s_um = result.dca * 1e3, result.sigma * 1e3
    which = np.digitize(result.pt, e) - 1
    for b in range(e.size - 1):
        sel = which == b
        n = int(sel.sum())
        out["n"].append(n)
        if n < min_count:
            for k in out:
                if k != "n":
                    out[k].append(None)
            continue
        v = d_um[sel]
        out["mean_um"].append(float(v.mean()))
        out["mean_err_um"].append(float(v.std(ddof=1) / math.sqrt(n)))
        w, we = robust_sigma(v)
        out["width_um"].append(w)
        out["width_err_um"].append(we)
        out["expected_um"].append(expected_robust_sigma(s_um[sel]))
        pw, pwe = robust_sigma(v / np.maximum(s_um[sel], 1e-12))
        out["pull_width"].append(pw)
        out["pull_width_err"].append(pwe)
    return out


# ------------------------------------------------------------------------------------------------
# 3. chi2 / ndf


@torch.no_grad()
def chi2_per_track(geom: ITSGeometry, sample: EvalSample, theta: np.ndarray,
                   model_config: ITSAlignmentConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """chi2 (T,) and ndf (T,) of every track and the seed's cost C over the sample, with the
    geometry corrected by ``theta`` and the cost of ``model_config`` (its vertex mode; the
    sample carries the true vertex for ``"given"``)."""
    theta = check_theta(geom, theta, "chi2_per_track")
    model = ITSAlignmentModel.from_geometry(geom, model_config)
    model.set_theta(torch.from_numpy(theta))
    out = model(sample.batch)
    return out.chi2.numpy().copy(), out.ndf.numpy().copy(), float(out.cost)


@dataclass(frozen=True, eq=False)
class SensorPrecision:
    """What the training data can tell about each sensor on its own.

    Attributes:
        hits: (N,) expected hits per sensor in the run's training data (the sample's hits times
            ``scale``).
        sigma: (N, 6) expected conditional standard deviation of each local DoF (rot_u, rot_v,
            rot_w in rad; du, dv, dw in mm): ``sqrt(diag((L^T F_s L)^-1))`` with ``F_s`` the
            sensor's own 6 x 6 block of the Fisher information of the chi2 with the track
            parameters profiled out, summed over the sample and times ``scale``, and ``L`` the
            local-to-global map (:func:`~streamcal.detectors.its.align.local_basis`). It is the
            error of a sensor fitted while all others are exact: a lower bound of the error of a
            global fit (correlations with other sensors only add to it). ``inf`` where the sensor
            has too few hits to fix all six DoFs.
        scale: training events / sample events.
    """

    hits: np.ndarray
    sigma: np.ndarray
    scale: float


@torch.no_grad()
def sensor_precision(geom: ITSGeometry, batch: TrackBatch, model_config: ITSAlignmentConfig, scale: float,
                     *, chunk_tracks: int = 4096) -> SensorPrecision:
    """:class:`SensorPrecision` from the tracks of ``batch`` (selected as in training), scaled to
    ``scale`` times their number. The hit weights are the model's (intrinsic plus multiple scattering
    per hit, uncorrelated: the same approximation as the cost)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"sensor_precision: scale must be a positive finite number, got {scale!r}")
    model = ITSAlignmentModel.from_geometry(geom, replace(model_config, precision="float64"))
    if not isinstance(batch, TrackBatch):
        raise ValueError(f"sensor_precision: batch must be a TrackBatch, got {type(batch).__name__}")
    n = geom.n_sensors
    fisher = torch.zeros(n, 36, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    phi = model.phi.detach()
    half = torch.full((batch.n_events,), 0.5, dtype=torch.float64)
    for lo in range(0, batch.n_tracks, chunk_tracks):
        idx = slice(lo, min(lo + chunk_tracks, batch.n_tracks))
        sub = TrackBatch(batch.sensor[idx], batch.local[idx], batch.mask[idx], batch.event[idx],
                         batch.n_events, batch.vertex)
        res = model._evaluate(sub, phi, need_grad=True)
        # the chi2's own information: the linearisation of the cost with 2 c_t = 1 for every track
        _diag_blocks(_linearise(model, sub, res, half), fisher)
        hits.index_add_(0, sub.sensor[sub.mask], torch.ones(int(sub.mask.sum()), dtype=torch.float64))
    basis = local_basis(model)  # (N, 6, 6): local deltas -> global Theta
    f_loc = basis.transpose(1, 2) @ (fisher.reshape(n, 6, 6) * scale) @ basis
    f_loc = 0.5 * (f_loc + f_loc.transpose(1, 2))
    d = f_loc.diagonal(dim1=1, dim2=2).clamp_min(1e-300).sqrt()  # unit-diagonal scaling
    unit = f_loc / (d[:, :, None] * d[:, None, :])
    ev = torch.linalg.eigvalsh(unit)
    ok = (ev[:, 0] > 1e-10 * ev[:, -1].clamp_min(1e-300)) & (hits > 0)
    sigma = torch.full((n, 6), math.inf, dtype=torch.float64)
    if bool(ok.any()):
        cov = torch.linalg.inv(unit[ok]).diagonal(dim1=1, dim2=2).clamp_min(0)
        sigma[ok] = cov.sqrt() / d[ok]
    return SensorPrecision((hits * scale).numpy(), sigma.numpy(), float(scale))


def _training_events(run_dir: Path) -> int | None:
    """Events of the run's first epoch (its training data), from ``metrics.jsonl``."""
    path = run_dir / METRICS_JSONL
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "epoch_cost" in row and isinstance(row.get("events"), (int, float)):
            return int(row["events"])
    return None


def _precision_summary(geom: ITSGeometry, prec: SensorPrecision, residual: np.ndarray,
                       sel: np.ndarray) -> dict[str, Any]:
    """Per layer and DoF over the sensors ``sel``: the median expected conditional error and the
    RMS of the pulls residual / expected error (1 = at the statistical limit of a lone sensor)."""
    sig = prec.sigma * _DOF_SCALE
    out: dict[str, Any] = {}
    for jd, dof in enumerate(DOFS):
        med, pull = [], []
        for li in range(geom.n_layers):
            m = sel & (geom.layer == li) & np.isfinite(sig[:, jd])
            med.append(float(np.median(sig[m, jd])) if m.any() else None)
            pull.append(float(np.sqrt(np.mean((residual[m, jd] / sig[m, jd]) ** 2))) if m.any() else None)
        out[dof] = {"expected_sigma_median": med, "pull_rms": pull}
    return out


def solve_errors(geom: ITSGeometry, model_config: ITSAlignmentConfig, cov: np.ndarray, residual: np.ndarray,
                 sel: np.ndarray, targets: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The solve's own errors (``theta_cov``, :attr:`AlignmentRun.theta_cov`) against the residual
    misalignment ``residual`` (N, 6; local deltas in urad and um), over the sensors ``sel`` that
    have them: per DoF and layer (and over all layers, ``all_layers``) the sensors, the expected
    RMS ``sqrt(mean sigma^2)`` (what the residual's RMS is at the statistical limit of these data),
    the residual's RMS over the same sensors and the RMS of the pulls residual / sigma (1: at that
    limit). The covariance blocks are
    taken to the local frame with :func:`align.local_basis` (``cov_local = L^-1 cov L^-T``).

    ``targets`` (DoF -> urad or um, e.g. :func:`alignment_targets`): per DoF in it and layer
    (``within_target``) the sensors whose error is at most the target (those the data constrain
    to it: the tracks' own statistics decide, not the residual) and the residual's RMS over
    them, the figure to hold against the target; ``None`` where no sensor of the layer is."""
    model = ITSAlignmentModel.from_geometry(geom, replace(model_config, precision="float64"))
    linv = torch.linalg.inv(local_basis(model)).numpy()
    ok = sel & np.isfinite(cov[:, 0, 0])
    cov_loc = np.full_like(cov, np.nan)
    cov_loc[ok] = linv[ok] @ cov[ok] @ linv[ok].transpose(0, 2, 1)
    sig = np.sqrt(np.clip(np.diagonal(cov_loc, axis1=1, axis2=2), 0.0, None)) * _DOF_SCALE
    keys = ("sigma_rms", "residual_rms", "pull_rms")

    def rms(m: np.ndarray, jd: int) -> tuple[float | None, ...]:
        m = m & (sig[:, jd] > 0)
        if not m.any():
            return (None,) * 3
        s, r = sig[m, jd], residual[m, jd]
        return tuple(float(np.sqrt(np.mean(v**2))) for v in (s, r, r / s))

    out: dict[str, Any] = {"sensors_per_layer": [int((ok & (geom.layer == li)).sum()) for li in range(geom.n_layers)]}
    pooled = [rms(ok, jd) for jd in range(len(DOFS))]
    out["all_layers"] = {k: {dof: pooled[jd][i] for jd, dof in enumerate(DOFS)} for i, k in enumerate(keys)}
    for jd, dof in enumerate(DOFS):
        per_layer = [rms(ok & (geom.layer == li), jd) for li in range(geom.n_layers)]
        out[dof] = {k: [row[i] for row in per_layer] for i, k in enumerate(keys)}
    if targets:
        out["within_target"] = {}
        for dof, target in targets.items():
            jd = DOFS.index(dof)
            m = ok & (sig[:, jd] <= target)
            layers = [m & (geom.layer == li) for li in range(geom.n_layers)]
            out["within_target"][dof] = {
                "target": float(target),
                "sensors": [int(s.sum()) for s in layers], "of_sensors": out["sensors_per_layer"],
                "residual_rms": [float(np.sqrt(np.mean(residual[s, jd] ** 2))) if s.any() else None for s in layers],
                "all_layers_residual_rms": float(np.sqrt(np.mean(residual[m, jd] ** 2))) if m.any() else None,
            }
    return out


def alignment_targets(rotation_urad: float, translation_um: float) -> dict[str, float]:
    """The targets per DoF for :func:`solve_errors`: every rotation, and the shifts in the
    sensor's measurement directions (du, dv; dw, along the normal, is measured only through the
    tracks' inclination)."""
    return {"rot_u": rotation_urad, "rot_v": rotation_urad, "rot_w": rotation_urad,
            "du": translation_um, "dv": translation_um}


# ------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of :func:`evaluate_run`.

    Args:
        events: events per test sample (one on the ideal, one on the misaligned geometry).
        seed: simulation seed of the test samples (None: :func:`default_test_seed`); must differ
            from the run's training seed.
        pt_spectrum: ``"run"`` (the run's spectrum) or ``"uniform"`` (uniform in pT over the
            run's range, which fills the high-pT bins).
        pt_edges: pT bin edges (GeV/c) of the DCA figures.
        min_hits: hits a test track needs.
        inner_hit: test tracks need a hit on the innermost layer.
        min_count: a pT bin with fewer tracks is not reported.
        chi2_edges: histogram edges of chi2/ndf.
        target_rotation_urad, target_translation_um: the accuracy targets the solve's errors
            are held against (:func:`solve_errors`' ``within_target``; defaults: 10 urad, 1 um).
        min_sensor_hits: a sensor counts as reached by the tracks when the training data are
            expected to put at least this many hits on it (:func:`sensor_precision`, from a sample
            of ``events`` events selected as in training, scaled to the run's events); the
            residuals are reported over all free sensors and over the reached ones.
    """

    events: int = 20_000
    seed: int | None = None
    pt_spectrum: Literal["run", "uniform"] = "run"
    pt_edges: tuple[float, ...] = DEFAULT_PT_EDGES
    min_hits: int = 4
    inner_hit: bool = True
    min_count: int = 50
    chi2_edges: tuple[float, ...] = tuple(float(x) for x in np.linspace(0.0, 5.0, 51))
    min_sensor_hits: int = 100
    target_rotation_urad: float = 10.0
    target_translation_um: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.events, int) and self.events >= 1):
            raise ValueError(f"EvaluationConfig.events must be an integer >= 1, got {self.events!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"EvaluationConfig.seed must be a non-negative integer or None, got {self.seed!r}")
        if self.pt_spectrum not in ("run", "uniform"):
            raise ValueError(f"EvaluationConfig.pt_spectrum must be 'run' or 'uniform', got {self.pt_spectrum!r}")
        for name in ("pt_edges", "chi2_edges"):
            e = np.asarray(getattr(self, name), dtype=np.float64)
            if e.ndim != 1 or e.size < 2 or not np.all(np.diff(e) > 0):
                raise ValueError(f"EvaluationConfig.{name} must be increasing with at least 2 entries")
        if not (isinstance(self.min_hits, int) and self.min_hits >= 3):
            raise ValueError(f"EvaluationConfig.min_hits must be an integer >= 3, got {self.min_hits!r}")
        if not (isinstance(self.min_count, int) and self.min_count >= 2):
            raise ValueError(f"EvaluationConfig.min_count must be an integer >= 2, got {self.min_count!r}")
        if not (isinstance(self.min_sensor_hits, int) and self.min_sensor_hits >= 1):
            raise ValueError(f"EvaluationConfig.min_sensor_hits must be an integer >= 1, got {self.min_sensor_hits!r}")
        for name in ("target_rotation_urad", "target_translation_um"):
            val = getattr(self, name)
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise ValueError(f"EvaluationConfig.{name} must be a positive number, got {val!r}")


def default_test_seed(training_seed: int) -> int:
    """A test-sample seed derived from the run's training seed, distinct from it and from the
    small offsets workers use for their partitions: ``SeedSequence([seed, 0x7E57])``'s first word."""
    return int(np.random.SeedSequence([int(training_seed), 0x7E57]).generate_state(1)[0])


def _max_abs(values: Sequence[float | None]) -> float | None:
    vals = [abs(v) for v in values if v is not None]
    return max(vals) if vals else None


def _width_ratio(num: Mapping[str, list[Any]], den: Mapping[str, list[Any]]) -> tuple[list[Any], list[Any]]:
    """Per bin ``width(num) / width(den)`` and its error (independent errors); None where undefined."""
    ratio: list[float | None] = []
    err: list[float | None] = []
    for a, ae, b, be in zip(num["width_um"], num["width_err_um"], den["width_um"], den["width_err_um"]):
        if a is None or b is None or not (a > 0 and b > 0):
            ratio.append(None)
            err.append(None)
            continue
        ratio.append(a / b)
        err.append(a / b * math.hypot(ae / a, be / b))
    return ratio, err


def _cost_history(run: AlignmentRun) -> dict[str, Any]:
    m = run.metrics
    return {
        "run": str(run.run_dir), "label": run.label, "workers": run.config.workers, "tau": run.config.tau,
        "epochs": run.config.epochs, "optimizer": run.config.optimizer.method,
        "epoch": m.epoch.tolist(), "epoch_cost": m.epoch_cost.tolist(), "epoch_time_s": m.epoch_time.tolist(),
        "sync_epoch": m.sync_epoch.tolist(), "sync": m.sync_index.tolist(), "sync_step": m.sync_step.tolist(),
        "sync_cost": m.sync_cost.tolist(), "sync_tracks": m.sync_tracks.tolist(), "sync_time_s": m.sync_time.tolist(),
        "final_epoch_cost": float(m.epoch_cost[-1]) if m.epoch_cost.size else None,
    }


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    compare: Sequence[str | os.PathLike[str]] = (),
    config: EvaluationConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """All numbers of the report of ``run_dir`` (see the module docstring) as a JSON-ready dict.
    ``compare``: more run directories whose cost history is shown beside this run's."""
    cfg = EvaluationConfig() if config is None else config
    say = log or (lambda _: None)
    t0 = time.perf_counter()
    run = load_run(run_dir)
    others = [load_run(d, arrays=False) for d in compare]
    assert run.theta is not None and run.theta_true is not None
    rc = run.config
    geom = build_geometry(rc.geometry)
    n = geom.n_sensors

    # 1. residual misalignment
    reference = expected_truth(geom, run.theta_true, rc.constraints, run.solved,
                               None if run.solved is None else run.theta)
    free = np.ones(n, dtype=bool)
    free[rc.constraints.fixed_sensors(geom)] = False
    zeros = np.zeros((n, 6))
    residuals = {
        "units": DOF_UNITS, "dofs": list(DOFS), "layers": list(range(geom.n_layers)),
        "free_sensors": int(free.sum()), "fixed_sensors": int(n - free.sum()),
        "reference": "truth relative to the fixed sensors' rigid-body motion, constrained modes projected out"
                     + ("" if run.solved is None else " of the solved sensors with the held ones at the fit's values"),
        "held_sensors": 0 if run.solved is None else int((free & ~run.solved).sum()),
        "before": residual_statistics(geom, zeros, reference, free),
        "after": residual_statistics(geom, run.theta, reference, free),
    }
    say(f"residuals: {n} sensors ({int(free.sum())} free)")

    # 2. test samples
    seed = default_test_seed(rc.simulation.seed) if cfg.seed is None else cfg.seed
    if seed == rc.simulation.seed:
        raise ConfigError("EvaluationConfig", "seed", f"{seed} is the run's training seed; choose another")
    sim = replace(rc.simulation, seed=seed)
    if cfg.pt_spectrum == "uniform":
        sim = replace(sim, pt_spectrum="uniform")
    ideal = simulate_eval_sample(geom, sim, cfg.events, theta=None, min_hits=cfg.min_hits, inner_hit=cfg.inner_hit)
    mis = simulate_eval_sample(geom, sim, cfg.events, theta=run.theta_true, min_hits=cfg.min_hits,
                               inner_hit=cfg.inner_hit)
    say(f"test samples: {ideal.batch.n_tracks} ideal and {mis.batch.n_tracks} misaligned tracks "
        f"({cfg.events} events each, seed {seed})")
    d_after = (global_to_local(geom, run.theta) - global_to_local(geom, reference)) * _DOF_SCALE  # urad, um
    # what the training data can tell about each sensor: expected hits and conditional errors
    train_events = _training_events(Path(run_dir))
    if train_events:
        sel_sample = simulate_eval_sample(geom, sim, cfg.events, theta=None, min_hits=cfg.min_hits, inner_hit=False)
        prec = sensor_precision(geom, sel_sample.batch, rc.model, train_events / cfg.events)
        reached = free & (prec.hits >= cfg.min_sensor_hits)
        residuals["training_events"] = train_events
        residuals["min_sensor_hits"] = cfg.min_sensor_hits
        residuals["reached_sensors"] = int(reached.sum())
        residuals["reached_per_layer"] = [int((reached & (geom.layer == li)).sum()) for li in range(geom.n_layers)]
        residuals["free_per_layer"] = [int((free & (geom.layer == li)).sum()) for li in range(geom.n_layers)]
        residuals["before_reached"] = residual_statistics(geom, zeros, reference, reached)
        residuals["after_reached"] = residual_statistics(geom, run.theta, reference, reached)
        residuals["precision_reached"] = _precision_summary(geom, prec, d_after, reached)
        say(f"sensor precision: {int(reached.sum())} of {int(free.sum())} free sensors reached "
            f"(>= {cfg.min_sensor_hits} expected hits in {train_events} training events)")
    if run.theta_cov is not None:
        errs = solve_errors(geom, rc.model, run.theta_cov, d_after, free,
                            alignment_targets(cfg.target_rotation_urad, cfg.target_translation_um))
        residuals["solve_errors"] = errs
        say(f"the solve's errors ({THETA_COV_NPY}): {sum(errs['sensors_per_layer'])} sensors; expected RMS "
            + ", ".join(f"{dof} {'/'.join('-' if v is None else f'{v:.3g}' for v in errs[dof]['sigma_rms'])}"
                        for dof in DOFS))
    fits = {"ideal": (ideal, zeros), "before": (mis, zeros), "after": (mis, run.theta)}
    dca = {k: dca_xy(geom, s, th, rc.model) for k, (s, th) in fits.items()}
    bins = {k: dca_vs_pt(r, cfg.pt_edges, cfg.min_count) for k, r in dca.items()}
    ratio, ratio_err = _width_ratio(bins["after"], bins["ideal"])
    ratio_before, ratio_before_err = _width_ratio(bins["before"], bins["ideal"])
    edges = np.asarray(cfg.pt_edges)
    dca_summary = {
        "pt_edges": edges.tolist(), "pt_centres": np.sqrt(edges[1:] * edges[:-1]).tolist(),
        "min_count": cfg.min_count,
        "definition": "signed transverse distance of the circle fitted without vertex term to the true vertex",
        "series": bins,
        "overall": {k: {"n": int(r.dca.size), "mean_um": float(r.dca.mean() * 1e3) if r.dca.size else None,
                        "width_um": robust_sigma(r.dca * 1e3)[0] if r.dca.size else None} for k, r in dca.items()},
        "resolution_ratio_after_ideal": ratio, "resolution_ratio_after_ideal_err": ratio_err,
        "resolution_ratio_before_ideal": ratio_before, "resolution_ratio_before_ideal_err": ratio_before_err,
    }
    say("DCA_xy done")

    # 3. chi2/ndf
    ce = np.asarray(cfg.chi2_edges)
    chi2: dict[str, Any] = {"edges": ce.tolist(), "vertex": rc.model.vertex, "series": {}}
    for k, (s, th) in fits.items():
        c2, ndf, cost = chi2_per_track(geom, s, th, rc.model)
        ok = ndf > 0
        r = c2[ok] / ndf[ok]
        hist, _ = np.histogram(r, ce)
        chi2["series"][k] = {
            "hist": hist.tolist(), "overflow": int((r >= ce[-1]).sum()), "underflow": int((r < ce[0]).sum()),
            "tracks": int(r.size), "mean": float(r.mean()) if r.size else None,
            "median": float(np.median(r)) if r.size else None,
            "chi2_over_ndf": float(c2[ok].sum() / ndf[ok].sum()) if r.size else None, "cost": cost,
        }
    say("chi2/ndf done")

    # 4. cost history
    history = [_cost_history(r) for r in [run, *others]]

    headline = {
        "residual_rms_after": {d: residuals["after"]["all"][d]["rms"] for d in DOFS},
        "residual_rms_before": {d: residuals["before"]["all"][d]["rms"] for d in DOFS},
        "residual_units": DOF_UNITS,
        "residual_rms_after_reached": ({d: residuals["after_reached"]["all"][d]["rms"] for d in DOFS}
                                       if "after_reached" in residuals else None),
        "within_target": ({d: {"target": w["target"], "sensors": sum(w["sensors"]),
                               "of_sensors": sum(w["of_sensors"]), "residual_rms": w["all_layers_residual_rms"]}
                           for d, w in residuals["solve_errors"]["within_target"].items()}
                          if "solve_errors" in residuals else None),
        "dca_bias_max_abs_um": {k: _max_abs(b["mean_um"]) for k, b in bins.items()},
        "dca_bias_max_significance": {
            k: _max_abs([None if m is None else m / e for m, e in zip(b["mean_um"], b["mean_err_um"])])
            for k, b in bins.items()
        },
        "dca_resolution_ratio_after_ideal": ratio,
        "dca_resolution_ratio_after_ideal_max": max((x for x in ratio if x is not None), default=None),
        "dca_resolution_ratio_before_ideal_max": max((x for x in ratio_before if x is not None), default=None),
        "chi2_ndf_mean": {k: v["mean"] for k, v in chi2["series"].items()},
        "final_epoch_cost": history[0]["final_epoch_cost"],
    }
    summary = {
        "run": {"dir": str(run.run_dir), "label": run.label, "workers": rc.workers, "tau": rc.tau,
                "epochs": rc.epochs, "n_sensors": n, "n_layers": geom.n_layers,
                "constraints": {"modes": list(rc.constraints.modes), "fixed_layers": list(rc.constraints.fixed_layers)},
                "model_vertex": rc.model.vertex, "optimizer": rc.optimizer.method, "refined_from": rc.refined_from or None},
        "test_samples": {"seed": seed, "pt_spectrum": sim.pt_spectrum, "min_hits": cfg.min_hits,
                         "inner_hit": cfg.inner_hit, "ideal": ideal.describe(), "misaligned": mis.describe()},
        "headline": headline,
        "residuals": residuals,
        "dca_xy": dca_summary,
        "chi2_ndf": chi2,
        "cost_history": history,
        "figures": dict(FIGURES),
    }
    summary["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return _clean(summary)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN and inf become None, numpy scalars Python numbers, tuples lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------------------------
# Figures


def _nan(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _log_if_positive(ax: Any, axis: str, *arrays: np.ndarray) -> None:
    """Log scale only when there is something positive to show (else matplotlib warns)."""
    vals = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0)
    if np.any(np.isfinite(vals) & (vals > 0)):
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _minor_log_label(value: float, _: Any) -> str:
    """Label the minor ticks 2 and 5 of each decade of a log axis."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6 else ""


def _legend(ax: Any, **kw: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, **kw)


def _plot_residuals(path: Path, res: dict[str, Any]) -> None:
    from matplotlib.figure import Figure

    floor = 1e-3
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    fig.suptitle(f"residual misalignment (fitted - true) per layer, local frame, {res['free_sensors']} free sensors "
                 f"(values below {floor:g} drawn at {floor:g})")
    layers = np.asarray(res["layers"])
    for ax, dof in zip(axes, DOFS):
        allv = []
        for off, key, color in ((-0.2, "before", _COLORS["before"]), (0.2, "after", _COLORS["after"])):
            rows = res[key]["layers"][dof]
            rms, mean = _nan(rows["rms"]), np.abs(_nan(rows["mean"]))
            allv += [rms, mean]
            ax.bar(layers + off, np.maximum(rms, floor), width=0.38, color=color, alpha=0.75,
                   label=f"RMS {key} ({res[key]['all'][dof]['rms'] or 0:.3g})")
            ax.plot(layers + off, np.maximum(mean, floor), "k_", ms=14, mew=2)
            ax.plot(layers + off, np.maximum(mean, floor), "o", ms=4, color="k",
                    label="|mean|" if key == "before" else None)
        if res.get("solve_errors"):  # the statistical limit the solve's own errors give (theta_cov.npy)
            sig = _nan(res["solve_errors"][dof]["sigma_rms"])
            allv.append(sig)
            ax.plot(layers + 0.2, sig, "D", ms=6, color="forestgreen", mec="k", linestyle="none",
                    label="RMS of the solve's errors")
        _log_if_positive(ax, "y", np.maximum(np.concatenate(allv), floor))
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{dof} [{DOF_UNITS[dof]}]")
        ax.set_title(dof)
        ax.grid(alpha=0.3, axis="y", which="both")
        _legend(ax)
    fig.savefig(path, dpi=110)


def _plot_dca(path: Path, d: dict[str, Any]) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    ax_m, ax_w, ax_r = fig.subplots(1, 3)
    fig.suptitle("DCA$_{xy}$ to the true vertex vs $p_T$ (track fit without vertex term)")
    pt = np.asarray(d["pt_centres"])
    edges = np.asarray(d["pt_edges"])
    xerr = np.stack([pt - edges[:-1], edges[1:] - pt])
    widths = []
    for k in SERIES:
        s = d["series"][k]
        mean, merr = _nan(s["mean_um"]), _nan(s["mean_err_um"])
        w, werr = _nan(s["width_um"]), _nan(s["width_err_um"])
        widths.append(w)
        ax_m.errorbar(pt, mean, yerr=merr, xerr=xerr, fmt="o", ms=4, color=_COLORS[k], label=SERIES_LABELS[k])
        ax_w.errorbar(pt, w, yerr=werr, xerr=xerr, fmt="o", ms=4, color=_COLORS[k], label=SERIES_LABELS[k])
        if k != "ideal":
            wi, wie = _nan(d["series"]["ideal"]["width_um"]), _nan(d["series"]["ideal"]["width_err_um"])
            with np.errstate(invalid="ignore", divide="ignore"):
                r = w / wi
                re = r * np.hypot(werr / w, wie / wi)
            ax_r.errorbar(pt, r, yerr=re, xerr=xerr, fmt="o", ms=4, color=_COLORS[k], label=f"{k} / ideal")
    exp = _nan(d["series"]["ideal"]["expected_um"])
    ax_w.plot(pt, exp, "--", color="k", lw=1, label="expected (hit resolution + multiple scattering)")
    ax_m.axhline(0.0, color="k", lw=0.6)
    ax_r.axhline(1.0, color="k", lw=0.6)
    for ax in (ax_m, ax_w, ax_r):
        ax.set_xscale("log")
        ticks = [t for t in (0.2, 0.5, 1, 2, 5, 10, 20, 50) if edges[0] <= t <= edges[-1]]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("$p_T$ [GeV/c]")
        ax.grid(alpha=0.3, which="both")
        _legend(ax)
    _log_if_positive(ax_w, "y", *widths, exp)
    if ax_w.get_yscale() == "log":
        ax_w.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax_w.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
    ax_m.set_ylabel("mean DCA$_{xy}$ (bias) [um]")
    ax_w.set_ylabel("DCA$_{xy}$ width, 1.4826 MAD [um]")
    ax_r.set_ylabel("width ratio to the ideal geometry")
    ax_m.set_title("bias")
    ax_w.set_title("resolution")
    ax_r.set_title("resolution relative to ideal")
    fig.savefig(path, dpi=110)


def _plot_chi2(path: Path, c: dict[str, Any]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    edges = np.asarray(c["edges"])
    for k in SERIES:
        s = c["series"][k]
        h = np.asarray(s["hist"], dtype=np.float64)
        dens = h / max(s["tracks"], 1) / np.diff(edges)
        mean = "n/a" if s["mean"] is None else f"{s['mean']:.3f}"
        ax.stairs(dens, edges, color=_COLORS[k], lw=1.5,
                  label=f"{SERIES_LABELS[k]}: mean {mean}, overflow {s['overflow']}")
    ax.set_xlabel("$\\chi^2$ / ndf per track")
    ax.set_ylabel("tracks (normalised)")
    ax.set_title(f"$\\chi^2$/ndf on the test samples (run's cost, vertex '{c['vertex']}')")
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.savefig(path, dpi=110)


def _plot_cost(path: Path, history: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    ax_e, ax_s, ax_t = fig.subplots(1, 3)
    fig.suptitle("cost C($\\Theta$) of the alignment runs")
    vals = []
    for i, h in enumerate(history):
        label = f"{h['label']} ({Path(h['run']).name}{', evaluated' if i == 0 else ''})"
        color = f"C{i % 10}"
        ec, sc = _nan(h["epoch_cost"]), _nan(h["sync_cost"])
        vals += [ec, sc]
        ax_e.plot(h["epoch"], ec, "o-", ms=4, color=color, label=label)
        ax_s.plot(np.arange(1, sc.size + 1), sc, "-", lw=1, color=color, label=label)
        ax_t.plot(h["sync_time_s"], sc, "-", lw=1, color=color, label=label)
    for ax, xl in ((ax_e, "epoch"), (ax_s, "synchronisation (cumulative)"), (ax_t, "time [s]")):
        _log_if_positive(ax, "y", *vals)
        ax.set_xlabel(xl)
        ax.set_ylabel("cost")
        ax.grid(alpha=0.3, which="both")
        _legend(ax)
    ax_e.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_e.set_title("end of epoch")
    ax_s.set_title("at each synchronisation")
    ax_t.set_title("at each synchronisation vs wall time")
    fig.savefig(path, dpi=110)


def write_report(summary: Mapping[str, Any], report_dir: str | os.PathLike[str]) -> Path:
    """Write ``summary.json`` and the figures (:data:`FIGURES`) of :func:`evaluate_run`'s
    ``summary`` into ``report_dir`` (created); returns the path of ``summary.json``."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot_residuals(out / FIGURES["residuals"], summary["residuals"])
    _plot_dca(out / FIGURES["dca"], summary["dca_xy"])
    _plot_chi2(out / FIGURES["chi2"], summary["chi2_ndf"])
    _plot_cost(out / FIGURES["cost"], summary["cost_history"])
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return path


@dataclass
class AlignmentReport:
    """What :func:`evaluate_alignment` returns: the report directory and its ``summary.json``."""

    report_dir: Path
    summary: dict[str, Any]


def evaluate_alignment(
    run_dir: str | os.PathLike[str],
    report_dir: str | os.PathLike[str],
    *,
    compare: Sequence[str | os.PathLike[str]] = (),
    config: EvaluationConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> AlignmentReport:
    """:func:`evaluate_run` then :func:`write_report`."""
    summary = evaluate_run(run_dir, compare=compare, config=config, log=log)
    path = write_report(summary, report_dir)
    return AlignmentReport(path.parent, json.loads(path.read_text()))
