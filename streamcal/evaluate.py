"""``streamcal evaluate``: a trained TPC correction on unbiased held-out data, with its baselines,
as a JSON summary and the seed's figures 3-5:

    streamcal evaluate sc1d|sc3d --checkpoint DIR --report DIR [--n-eval N] [--seed S]
                                 [--baseline-checkpoint DIR] [--sc1d-checkpoint DIR] [--device auto]

Data. The evaluation split of the checkpoint's data config (:class:`~streamcal.detectors.tpc.tasks.
TPCDataConfig`): the same generator as training's evaluation, never biased, disjoint from the
training split. ``--n-eval`` sets its number of random maps (each combined with the 27 average
maps, so ``27 n`` samples; default: the checkpoint's ``data.n_random_eval``), ``--seed`` its
seed (default: the checkpoint's ``data.seed``). With both defaults the model's RMSE equals the
one training recorded for the checkpoint's epoch. Maps are cached in the config's
``data.cache_dir`` as in training.

Every quantity is the *correction* fluctuation (what the models predict, dr, drphi, dz in um) per
voxel of the full (phi, r, z) grid; ``pred - true`` is the residual left after applying the
correction. Compared on the same samples (series):

* ``model``: the checkpoint (for a residual sc3d model: after the 3D correction);
* ``after_1d``: a residual sc3d model's 1D pre-correction alone (its trained sc1d model, or the
  linear scaler);
* ``linear_scaler``: the average correction scaled by the relative change of the 1D IDC integrated
  over the last ion drift time (:func:`~streamcal.detectors.tpc.tasks.linear_scaler`, ALICE
  production);
* ``seed_unet``: with ``--baseline-checkpoint``, a non-residual sc3d model, the seed-style U-Net
  of ``configs/train/sc3d_seed.yaml`` (zero padding, no boundary channels, no 1D pre-correction);
* ``none``: no correction (the RMS of the fluctuation itself);
* ``phi_average_truth``: the phi average of the truth, the floor of any phi-independent
  correction (RMSE only).

Figures (one PNG each, one panel per component, baselines overlaid):

* ``fig3_rmse_vs_epoch.png``: the evaluation RMSE per training epoch (the run's ``metrics.jsonl``;
  the baseline run's too), with this evaluation's linear-scaler and no-correction RMSE;
* ``fig4_left_residual_vs_true.png``: mean and standard deviation of ``pred - true`` in bins of
  ``true`` (all voxels of all samples);
* ``fig4_right_vs_r.png``: mean and RMSE of ``pred - true`` vs r over phi at ``0 <= z < 5`` cm
  (the grid's z nodes there: z = 0, the central electrode, on the standard grids) for the samples
  whose integrated relative density fluctuation is closest to ``+1 sigma`` of its distribution
  (the seed's "small interval at around 1 sigma": the nearest 10 %, at least one sample). The
  integrated fluctuation is the relative 1D IDC change ``<I> / <I_avg> - 1``, the measured volume
  integral of ``(rho - <rho>) / <rho>`` (they agree to ~1e-3); its spread is dominated by the
  +-10 % scalings of the 27 average maps;
* ``fig5_line_charge.png``: numerical vs predicted correction fluctuation at ``0 <= z < 5`` cm for
  the seed's line charge (:func:`~streamcal.detectors.tpc.dataset.line_charge_sample`: r = 110 cm,
  sector 9, constant in z, on top of the nominal average map), with the Pearson correlation.

Targets (``summary.json["targets"]``, each with its value and whether it is met): RMSE <= 100 um
per component (the model); the 1D correction's RMSE <= 0.5 x the linear scaler's per component
(sc1d: the model; sc3d: ``after_1d``; not applicable to a non-residual sc3d model); line-charge
correlation >= 0.9 per component (applicable to sc3d: the 1D IDCs carry no phi information, so
an sc1d model cannot resolve a local charge; its value is still reported).

Importing this module does not import torch (the ``streamcal`` command loads it as a plugin).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from streamcal.errors import StreamcalError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "COMPONENTS",
    "TARGET_RMSE_UM",
    "TARGET_1D_RATIO",
    "TARGET_LINE_CORRELATION",
    "FIGURES",
    "EvaluationResult",
    "evaluate",
    "add_subparser",
    "cmd_evaluate",
]

COMPONENTS = ("dr", "drphi", "dz")
TARGET_RMSE_UM = 100.0
TARGET_1D_RATIO = 0.5
TARGET_LINE_CORRELATION = 0.9
Z_MAX_CM = 5.0  # figures 4 right and 5: 0 <= z < 5 cm
LINE_RADIUS_CM = 110.0
LINE_SECTOR = 9
SELECTION_FRACTION = 0.1  # figure 4 right: the samples nearest to +1 sigma
N_BINS = 40  # figure 4 left
MIN_BIN_COUNT = 10  # figure 4 left: bins with fewer voxels are not drawn
UM_PER_CM = 1e4
NOMINAL_AVERAGE = 13  # index of the nominal average map (scalings 0, 0, 0)
FIGURES = {
    "fig3": "fig3_rmse_vs_epoch.png",
    "fig4_left": "fig4_left_residual_vs_true.png",
    "fig4_right": "fig4_right_vs_r.png",
    "fig5": "fig5_line_charge.png",
}
LABELS = {
    "model": "model",
    "after_1d": "after 1D",
    "linear_scaler": "linear IDC scaler",
    "seed_unet": "seed-style U-Net",
    "none": "no correction",
    "phi_average_truth": "phi average of truth (1D floor)",
}
COLORS = {"model": "C0", "after_1d": "C2", "linear_scaler": "C3", "seed_unet": "C1", "none": "0.4"}
UNIT_LABELS = {"dr": "dr", "drphi": "dr\u03c6", "dz": "dz"}


@dataclass
class EvaluationResult:
    """What :func:`evaluate` returns: the report directory and the content of its ``summary.json``."""

    report_dir: Path
    summary: dict[str, Any]


# -- checkpoints ---------------------------------------------------------------------------------
def _checkpoint_file(path: str | Path, what: str) -> Path:
    """The ``.pt`` file of a run directory (``best.pt``, else ``last.pt``) or the file itself."""
    p = Path(path)
    if not p.exists():
        raise StreamcalError(f"{what} not found: {p}")
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise StreamcalError(f"{what} {p} holds no best.pt or last.pt (expected a run directory of `streamcal train`)")
    return p


def _read_checkpoint(path: str | Path, task: str, what: str) -> tuple[Path, dict[str, Any]]:
    """(file, checkpoint dict) of a checkpoint of ``task``; errors name the path."""
    from streamcal.train import load_checkpoint

    file = _checkpoint_file(path, what)
    try:
        ckpt = load_checkpoint(file)
    except StreamcalError as exc:
        raise StreamcalError(f"{what}: {exc}") from None
    except Exception as exc:  # torch.load of something else: pickle, zip or format errors
        raise StreamcalError(f"{what} {file} is not a readable streamcal checkpoint "
                             f"({type(exc).__name__}: {exc})") from None
    kind = ckpt.get("task")
    if kind != task:
        hint = f" (evaluate it with `streamcal evaluate {kind}`)" if kind in ("sc1d", "sc3d") else ""
        raise StreamcalError(f"{what} {file} is an {kind} checkpoint, not {task}{hint}")
    return file, ckpt


def _metrics_history(run_dir: Path, ckpt: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Per-epoch evaluation records: the run's ``metrics.jsonl`` if present, else the checkpoint's history."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records:
            return records, str(path)
    return list(ckpt.get("history") or []), "checkpoint history"


# -- statistics ----------------------------------------------------------------------------------
class _Accumulator:
    """Streaming sums over batches of ``pred - true`` (cm) per series: squared error per component,
    binned in ``true`` (figure 4 left) and per r at small z for selected samples (figure 4 right)."""

    def __init__(self, edges: np.ndarray, nr: int, zmask: np.ndarray) -> None:
        import numpy as np

        self.edges = edges  # (3, N_BINS + 1) cm
        self.zmask = zmask  # (nz,) bool
        self.n_voxels = 0
        self.sse: dict[str, np.ndarray] = {}
        self.bin_count = np.zeros((3, N_BINS), np.int64)
        self.bin_sum: dict[str, np.ndarray] = {}
        self.bin_sq: dict[str, np.ndarray] = {}
        self.r_count = 0
        self.r_sum: dict[str, np.ndarray] = {}
        self.r_sq: dict[str, np.ndarray] = {}
        self._nr = nr

    def add(self, truth: np.ndarray, preds: dict[str, np.ndarray | None], selected: np.ndarray,
            binned: tuple[str, ...]) -> None:
        """``truth`` (B, 3, nphi, nr, nz) cm; ``preds`` broadcastable to it (None: no correction);
        ``selected`` (B,) bool: the samples of figure 4 right; ``binned``: the series of figures 4."""
        import numpy as np

        b = truth.shape[0]
        self.n_voxels += truth[:, 0].size
        nb = N_BINS
        idx = []
        for c in range(3):
            lo, hi = self.edges[c, 0], self.edges[c, -1]
            i = np.floor((truth[:, c] - lo) / (hi - lo) * nb).astype(np.int64).ravel()
            i = np.clip(i, 0, nb - 1)
            idx.append(i)
            self.bin_count[c] += np.bincount(i, minlength=nb)
        n_sel = int(selected.sum())
        self.r_count += n_sel * truth.shape[2] * int(self.zmask.sum())  # per r node
        for name, pred in preds.items():
            diff = -truth if pred is None else np.broadcast_to(pred, truth.shape) - truth  # (B, 3, nphi, nr, nz)
            d64 = diff.astype(np.float64)
            self.sse[name] = self.sse.get(name, 0.0) + np.square(d64).sum(axis=(0, 2, 3, 4))
            if name in binned:
                s = self.bin_sum.setdefault(name, np.zeros((3, nb)))
                q = self.bin_sq.setdefault(name, np.zeros((3, nb)))
                for c in range(3):
                    flat = d64[:, c].ravel()
                    s[c] += np.bincount(idx[c], weights=flat, minlength=nb)
                    q[c] += np.bincount(idx[c], weights=flat * flat, minlength=nb)
            if n_sel and b and name in binned:
                part = d64[selected][..., self.zmask]  # (n_sel, 3, nphi, nr, n_zsel)
                rs = self.r_sum.setdefault(name, np.zeros((3, self._nr)))
                rq = self.r_sq.setdefault(name, np.zeros((3, self._nr)))
                rs += part.sum(axis=(0, 2, 4))
                rq += np.square(part).sum(axis=(0, 2, 4))

    def rmse_um(self, name: str) -> dict[str, float]:
        import numpy as np

        return _component_dict(np.sqrt(self.sse[name] / self.n_voxels) * UM_PER_CM)


def _component_dict(values: Any) -> dict[str, float]:
    return {c: float(v) for c, v in zip(COMPONENTS, values)}


def _none_if_nan(values: Any) -> list[float | None]:
    return [None if not math.isfinite(float(v)) else float(v) for v in values]


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation coefficient of two flat arrays; None where either is constant."""
    import numpy as np

    x = x.astype(np.float64) - x.mean()
    y = y.astype(np.float64) - y.mean()
    den = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    return float(np.dot(x, y) / den) if den > 0 else None


def _gain(truth: np.ndarray, pred: np.ndarray) -> float | None:
    """Least-squares slope through the origin of predicted on numerical, ``sum(t p) / sum(t t)``:
    1 is the right amplitude (the correlation is blind to it); None for a zero truth."""
    import numpy as np

    t, p = truth.astype(np.float64), pred.astype(np.float64)
    den = float(np.dot(t, t))
    return float(np.dot(t, p) / den) if den > 0 else None


# -- evaluation ----------------------------------------------------------------------------------
def evaluate(task: Literal["sc1d", "sc3d"], checkpoint: str | Path, report: str | Path, *, n_eval: int | None = None,
             seed: int | None = None, baseline_checkpoint: str | Path | None = None,
             sc1d_checkpoint: str | Path | None = None, device: str = "auto", batch_size: int = 32,
             progress: bool = True, log: Callable[[str], None] | None = None) -> EvaluationResult:
    """Evaluate a checkpoint of ``task`` (module doc) and write ``report/summary.json`` and the figures.

    Args:
        task: ``sc1d`` or ``sc3d``; the checkpoint must be of this task.
        checkpoint: a run directory of ``streamcal train`` (its ``best.pt``, else ``last.pt``) or a ``.pt``.
        report: the output directory (created).
        n_eval: random maps of the evaluation split (x 27 samples); the checkpoint's by default.
        seed: the data seed; the checkpoint's by default.
        baseline_checkpoint: a non-residual sc3d checkpoint (the seed-style U-Net) on the same grid.
        sc1d_checkpoint: the 1D model of a residual sc3d checkpoint trained on ``precorrection:
            sc1d`` (default: the path in its config).
        device: ``auto``, ``cpu`` or ``cuda``, for the models and the ground truth.
        batch_size: samples per evaluation batch.
        progress: tqdm bars; ``log``: receives a few status lines.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from streamcal.detectors.tpc.dataset import N_AVERAGE_MAPS
    from streamcal.detectors.tpc.tasks import (
        FluctuationData,
        SC1DCorrector,
        SC3DCorrector,
        linear_scaler,
        load_corrector,
    )
    from streamcal.train import resolve_device

    t_start = time.perf_counter()
    say = log or (lambda s: None)
    if task not in ("sc1d", "sc3d"):
        raise StreamcalError(f"unknown task {task!r} (sc1d or sc3d)")
    if n_eval is not None and n_eval < 1:
        raise StreamcalError(f"--n-eval must be >= 1 random map, got {n_eval}")
    if seed is not None and seed < 0:
        raise StreamcalError(f"--seed must be >= 0, got {seed}")
    if batch_size < 1:
        raise StreamcalError(f"batch_size must be >= 1, got {batch_size}")
    report_dir = Path(report)
    if report_dir.exists() and not report_dir.is_dir():
        raise StreamcalError(f"report directory {report_dir} exists and is not a directory")
    dev = resolve_device(device)

    file, ckpt = _read_checkpoint(checkpoint, task, "checkpoint")
    corrector = load_corrector(file, device=str(dev))
    grid = corrector.grid
    baseline = base_file = base_ckpt = None
    if baseline_checkpoint is not None:
        base_file, base_ckpt = _read_checkpoint(baseline_checkpoint, "sc3d", "baseline checkpoint")
        baseline = load_corrector(base_file, device=str(dev))
        assert isinstance(baseline, SC3DCorrector)
        if baseline.needs_precorrection:
            raise StreamcalError(f"baseline checkpoint {base_file} is a residual U-Net on a 1D pre-correction; the "
                                 f"baseline is the seed-style U-Net without one (configs/train/sc3d_seed.yaml)")
        if baseline.grid != grid:
            raise StreamcalError(f"baseline checkpoint {base_file} is for grid {baseline.grid}, the checkpoint "
                                 f"{file} for {grid}")
    pre_kind: str | None = None
    sc1d_model: SC1DCorrector | None = None
    if isinstance(corrector, SC3DCorrector) and corrector.needs_precorrection:
        pre_kind = corrector.config.precorrection
        if pre_kind == "sc1d":
            src = sc1d_checkpoint if sc1d_checkpoint is not None else corrector.config.sc1d_checkpoint
            if src is None:
                raise StreamcalError(f"checkpoint {file}: a residual model on an sc1d pre-correction without "
                                     f"sc1d_checkpoint in its config; give --sc1d-checkpoint")
            sc1d_file, _ = _read_checkpoint(src, "sc1d", "the sc1d pre-correction checkpoint of the sc3d model"
                                            + ("" if sc1d_checkpoint is not None else " (sc1d_checkpoint in its "
                                               "config; override with --sc1d-checkpoint)"))
            loaded = load_corrector(sc1d_file, device=str(dev))
            assert isinstance(loaded, SC1DCorrector)
            if loaded.grid != grid:
                raise StreamcalError(f"sc1d checkpoint {sc1d_file} is for grid {loaded.grid}, the sc3d model for {grid}")
            sc1d_model = loaded

    # data: the unbiased evaluation split of the checkpoint's data config
    data_cfg = corrector.config.data
    try:
        data_cfg = dataclasses.replace(data_cfg, n_random_eval=n_eval or data_cfg.n_random_eval,
                                       seed=data_cfg.seed if seed is None else seed)
    except ValueError as exc:
        raise StreamcalError(f"evaluation data: {exc}") from None
    dcfg = data_cfg.dataset_config("eval")
    data_dev = str(resolve_device(data_cfg.device if data_cfg.device != "auto" else str(dev)))
    needs_density = task == "sc3d" or baseline is not None
    t0 = time.perf_counter()
    data = FluctuationData(dcfg, densities=needs_density, cache_dir=data_cfg.cache_dir, progress=progress,
                           device=data_dev)
    n = len(data)
    say(f"evaluate {task}: {n} unbiased samples ({data_cfg.n_random_eval} random maps x {N_AVERAGE_MAPS}) on "
        f"{grid}, seed {data_cfg.seed}, ready in {time.perf_counter() - t0:.1f} s")

    # the 1D correction of samples (B, 3, nphi, nr, nz) cm
    def one_d(idc1d: np.ndarray, idc_avg: np.ndarray, avg_corr: np.ndarray) -> np.ndarray:
        assert sc1d_model is not None
        return sc1d_model.predict_batch(idc1d, idc1d_average=idc_avg, average_correction=avg_corr)

    def predictions(idc1d: np.ndarray, idc_avg: np.ndarray, avg_corr: np.ndarray, dens_avg: np.ndarray | None,
                    dens_fl: np.ndarray | None, truth: np.ndarray) -> dict[str, np.ndarray | None]:
        """Every series' prediction of a batch, broadcastable to ``truth``."""
        lin = linear_scaler(avg_corr, idc1d, idc_avg)  # (B, 3, nphi, nr, nz)
        out: dict[str, np.ndarray | None] = {}
        if isinstance(corrector, SC1DCorrector):
            p = corrector.predict_batch(idc1d, idc1d_average=idc_avg, average_correction=avg_corr, broadcast=False)
            out["model"] = p[:, :, None] if p.ndim == 4 else p  # (B, 3, 1|nphi, nr, nz)
        else:
            pre = None
            if pre_kind == "sc1d":
                pre = one_d(idc1d, idc_avg, avg_corr)
            elif pre_kind == "linear_scaler":
                pre = lin
            out["model"] = corrector.predict_batch(dens_avg, dens_fl, pre)
            if pre is not None:
                out["after_1d"] = pre
        out["linear_scaler"] = lin
        if baseline is not None:
            out["seed_unet"] = baseline.predict_batch(dens_avg, dens_fl)
        out["none"] = None
        out["phi_average_truth"] = truth.mean(axis=2, keepdims=True)
        return out

    # figure 4 right: samples nearest to +1 sigma of the integrated relative density fluctuation
    ratio_all = data.idc_ratio(np.arange(n))  # (N,)
    sigma = float(ratio_all.std())
    n_sel = max(1, int(math.ceil(SELECTION_FRACTION * n)))
    order = np.argsort(np.abs(ratio_all - sigma), kind="stable")
    selected = np.zeros(n, bool)
    selected[order[:n_sel]] = True
    zmask = grid.z < Z_MAX_CM  # (nz,)

    # figure 4 left: bins of the truth over its full range
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for start in range(0, n, 256):
        t = data.correction_fluctuation(np.arange(start, min(n, start + 256)))
        lo = np.minimum(lo, t.min(axis=(0, 2, 3, 4)))
        hi = np.maximum(hi, t.max(axis=(0, 2, 3, 4)))
    hi = np.where(hi > lo, hi, lo + 1e-6)
    edges = np.stack([np.linspace(a, b, N_BINS + 1) for a, b in zip(lo, hi)])  # (3, N_BINS + 1) cm

    acc = _Accumulator(edges, grid.nr, zmask)
    binned = ("model", "after_1d", "linear_scaler", "seed_unet")
    k_all, m_all = data.split_index(np.arange(n))
    bar = tqdm(range(0, n, batch_size), desc=f"evaluate {task}", unit="batch", disable=not progress, leave=False)
    for start in bar:
        idx = np.arange(start, min(n, start + batch_size))
        k, m = k_all[idx], m_all[idx]
        truth = data.correction_fluctuation(idx)  # (B, 3, nphi, nr, nz) cm
        dens_avg = dens_fl = None
        if needs_density:
            dens_avg, dens_fl = data.average_density[m], data.density_fluctuation(idx)
        preds = predictions(data.idc1d[k], data.idc_average[m], data.average_correction[m], dens_avg, dens_fl, truth)
        acc.add(truth, preds, selected[idx], binned)
    bar.close()
    series = list(acc.sse)
    rmse = {name: acc.rmse_um(name) for name in series}

    # figure 5: the line charge
    from streamcal.detectors.tpc.dataset import line_charge_sample

    lc = line_charge_sample(grid, radius=LINE_RADIUS_CM, sector=LINE_SECTOR, density_config=dcfg.density,
                            device=data_dev)
    lc_truth = lc["correction_fluctuation"][None].astype(np.float32)  # (1, 3, nphi, nr, nz)
    nominal_corr = data.average_correction[NOMINAL_AVERAGE][None]  # (1, 3, nphi, nr, nz), the line's average map
    lc_preds = predictions(lc["idc1d"][None], lc["idc1d_average"][None], nominal_corr, lc["density_average"][None],
                           lc["density_fluctuation"][None], lc_truth)
    line_series = [s for s in ("model", "after_1d", "linear_scaler", "seed_unet") if s in lc_preds]
    line_values = {s: np.broadcast_to(lc_preds[s], lc_truth.shape)[0] for s in line_series}  # (3, nphi, nr, nz) cm
    correlation = {s: {c: _pearson(lc_truth[0, i][..., zmask].ravel(), v[i][..., zmask].ravel())
                       for i, c in enumerate(COMPONENTS)} for s, v in line_values.items()}
    correlation_volume = {s: {c: _pearson(lc_truth[0, i].ravel(), v[i].ravel()) for i, c in enumerate(COMPONENTS)}
                          for s, v in line_values.items()}
    gain = {s: {c: _gain(lc_truth[0, i][..., zmask].ravel(), v[i][..., zmask].ravel()) for i, c in enumerate(COMPONENTS)}
            for s, v in line_values.items()}

    # figure data
    history, history_source = _metrics_history(file.parent, ckpt)
    base_history: list[dict[str, Any]] = []
    base_history_source = None
    if base_file is not None and base_ckpt is not None:
        base_history, base_history_source = _metrics_history(base_file.parent, base_ckpt)
    fig3 = {
        "file": FIGURES["fig3"], "source": history_source,
        "epochs": [r.get("epoch") for r in history],
        "rmse_um": {c: [r["rmse_um"][c] for r in history] for c in COMPONENTS},
        "rmse_precorrection_um": ({c: [r["rmse_precorrection_um"][c] for r in history] for c in COMPONENTS}
                                  if history and all("rmse_precorrection_um" in r for r in history) else None),
        "baseline": None if not base_history else {
            "source": base_history_source, "epochs": [r.get("epoch") for r in base_history],
            "rmse_um": {c: [r["rmse_um"][c] for r in base_history] for c in COMPONENTS}},
        "horizontal_lines_um": {s: rmse[s] for s in ("linear_scaler", "none")},
        "target_um": TARGET_RMSE_UM,
    }  # fmt: skip
    count = acc.bin_count.astype(np.float64)
    fig4_left: dict[str, Any] = {
        "file": FIGURES["fig4_left"], "n_bins": N_BINS, "min_count_drawn": MIN_BIN_COUNT,
        "bin_edges_um": {c: (edges[i] * UM_PER_CM).tolist() for i, c in enumerate(COMPONENTS)},
        "count": {c: acc.bin_count[i].tolist() for i, c in enumerate(COMPONENTS)},
        "series": {},
    }  # fmt: skip
    for name in acc.bin_sum:
        mean = _safe_div(acc.bin_sum[name], count)  # (3, N_BINS) cm
        std = np.sqrt(np.clip(_safe_div(acc.bin_sq[name], count) - mean * mean, 0.0, None))
        fig4_left["series"][name] = {c: {"mean_um": _none_if_nan(mean[i] * UM_PER_CM),
                                         "std_um": _none_if_nan(std[i] * UM_PER_CM)} for i, c in enumerate(COMPONENTS)}
    per_r = acc.r_count  # voxels per r node (selected samples x nphi x z nodes)
    sel_ratio = ratio_all[selected]
    fig4_right: dict[str, Any] = {
        "file": FIGURES["fig4_right"], "r_cm": grid.r.tolist(), "z_max_cm": Z_MAX_CM,
        "z_nodes_cm": grid.z[zmask].tolist(),
        "selection": {
            "variable": "integrated relative density fluctuation, measured as <I>/<I_avg> - 1 of the 1D IDCs",
            "sigma": sigma, "target": sigma, "fraction": SELECTION_FRACTION, "n_samples": int(n_sel),
            "interval": [float(sel_ratio.min()), float(sel_ratio.max())],
        },
        "series": {},
    }  # fmt: skip
    for name in acc.r_sum:
        mean = acc.r_sum[name] / per_r
        rms = np.sqrt(acc.r_sq[name] / per_r)
        fig4_right["series"][name] = {c: {"mean_um": _none_if_nan(mean[i] * UM_PER_CM),
                                          "rmse_um": _none_if_nan(rms[i] * UM_PER_CM)} for i, c in enumerate(COMPONENTS)}
    fig5: dict[str, Any] = {
        "file": FIGURES["fig5"], "radius_cm": LINE_RADIUS_CM, "sector": LINE_SECTOR,
        "relative_amplitude": 1.0, "z_max_cm": Z_MAX_CM,
        "idc_relative_change": float(np.mean(lc["idc1d"], dtype=np.float64) - 1.0),
        "truth_rms_um": {c: float(np.sqrt(np.mean(np.square(lc_truth[0, i][..., zmask], dtype=np.float64))) * UM_PER_CM)
                         for i, c in enumerate(COMPONENTS)},
        "correlation": correlation, "correlation_full_volume": correlation_volume,
        "gain": gain,
    }  # fmt: skip

    # targets
    targets: list[dict[str, Any]] = []
    for c in COMPONENTS:
        v = rmse["model"][c]
        targets.append({"name": "rmse", "series": "model", "component": c, "value": v, "threshold": TARGET_RMSE_UM,
                        "comparison": "<=", "met": bool(v <= TARGET_RMSE_UM), "applicable": True,
                        "description": "model RMSE on unbiased held-out data [um]"})
    one_d_series = "model" if task == "sc1d" else ("after_1d" if "after_1d" in rmse else None)
    for c in COMPONENTS:
        value = None if one_d_series is None else rmse[one_d_series][c] / rmse["linear_scaler"][c]
        targets.append({
            "name": "rmse_1d_over_linear_scaler", "series": one_d_series, "component": c, "value": value,
            "threshold": TARGET_1D_RATIO, "comparison": "<=", "met": bool(value is not None and value <= TARGET_1D_RATIO),
            "applicable": one_d_series is not None,
            "description": "the 1D correction's residual RMS over the linear scaler's"
                           + ("" if one_d_series is not None else " (not applicable: no 1D pre-correction)"),
        })  # fmt: skip
    for c in COMPONENTS:
        value = correlation["model"][c]
        targets.append({
            "name": "line_charge_correlation", "series": "model", "component": c, "value": value,
            "threshold": TARGET_LINE_CORRELATION, "comparison": ">=",
            "met": bool(value is not None and value >= TARGET_LINE_CORRELATION), "applicable": task == "sc3d",
            "description": "Pearson correlation of numerical and predicted line-charge correction fluctuation at "
                           f"0 <= z < {Z_MAX_CM:g} cm" + ("" if task == "sc3d" else
                                                           " (not applicable to sc1d: the 1D IDCs carry no phi "
                                                           "information, a local charge needs the 3D correction)"),
        })  # fmt: skip

    summary: dict[str, Any] = {
        "task": task,
        "checkpoint": {"path": str(checkpoint), "file": str(file), "epoch": ckpt.get("epoch"),
                       "n_params": ckpt.get("n_params"), "config": ckpt.get("task_config"),
                       "train_config": ckpt.get("train_config"),
                       "recorded_best_rmse_um": (ckpt.get("best") or {}).get("rmse_um")},
        "baseline_checkpoint": None if base_file is None or base_ckpt is None else {
            "path": str(baseline_checkpoint), "file": str(base_file), "epoch": base_ckpt.get("epoch"),
            "n_params": base_ckpt.get("n_params"), "config": base_ckpt.get("task_config")},
        "precorrection": None if pre_kind is None else {
            "kind": pre_kind, "sc1d_checkpoint": None if sc1d_model is None else str(
                sc1d_checkpoint if sc1d_checkpoint is not None else corrector.config.sc1d_checkpoint)},
        "data": {
            "grid": str(grid), "split": "eval", "unbiased": True, "n_random": int(data_cfg.n_random_eval),
            "n_average": N_AVERAGE_MAPS, "n_samples": int(n), "seed": int(data_cfg.seed),
            "scale_step": data_cfg.scale_step, "rate_hz": data_cfg.rate_hz, "epsilon": data_cfg.epsilon,
            "cache_dir": data_cfg.cache_dir,
            "quantity": "correction fluctuation per voxel (dr, drphi, dz), pred - true, um",
        },
        "series": {s: LABELS[s] for s in series},
        "rmse_um": rmse,
        "figures": {"fig3": fig3, "fig4_left": fig4_left, "fig4_right": fig4_right, "fig5": fig5},
        "targets": targets,
        "targets_met": all(t["met"] for t in targets if t["applicable"]),
        "device": str(dev),
    }  # fmt: skip
    report_dir.mkdir(parents=True, exist_ok=True)
    _plot_fig3(report_dir / FIGURES["fig3"], fig3, task)
    _plot_fig4_left(report_dir / FIGURES["fig4_left"], fig4_left)
    _plot_fig4_right(report_dir / FIGURES["fig4_right"], fig4_right)
    _plot_fig5(report_dir / FIGURES["fig5"], lc_truth[0], line_values, correlation, zmask)
    summary["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    text = json.dumps(summary, indent=2)
    (report_dir / "summary.json").write_text(text)
    return EvaluationResult(report_dir, json.loads(text))  # as written (tuples are lists)


# -- figures -------------------------------------------------------------------------------------
def _figure(title: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    fig.suptitle(title)
    return fig, axes


def _legend(ax: Any, **kw: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, **kw)


def _minor_log_label(value: float, _: Any) -> str:
    """Label the minor ticks 2 and 5 of each decade of a log axis."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6 else ""


def _plot_fig3(path: Path, fig3: dict[str, Any], task: str) -> None:
    from matplotlib.ticker import FuncFormatter

    fig, axes = _figure(f"{task}: RMSE on the unbiased evaluation split vs epoch (seed Fig. 3)")
    for ax, c in zip(axes, COMPONENTS):
        ep = fig3["epochs"]
        if ep:
            ax.plot(ep, fig3["rmse_um"][c], "o-", color=COLORS["model"], label="model")
        if fig3["rmse_precorrection_um"]:
            ax.plot(ep, fig3["rmse_precorrection_um"][c], "s--", color=COLORS["after_1d"], label="after 1D")
        if fig3["baseline"]:
            b = fig3["baseline"]
            ax.plot(b["epochs"], b["rmse_um"][c], "^-", color=COLORS["seed_unet"], label=LABELS["seed_unet"])
        for name, values in fig3["horizontal_lines_um"].items():
            ax.axhline(values[c], color=COLORS[name], ls=":", label=f"{LABELS[name]} ({values[c]:.0f} um)")
        ax.axhline(fig3["target_um"], color="k", ls="-.", lw=0.8, label=f"target {fig3['target_um']:g} um")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"RMSE {UNIT_LABELS[c]} [um]")
        ax.set_title(UNIT_LABELS[c])
        ax.grid(alpha=0.3, which="both")
        _legend(ax)
    fig.savefig(path, dpi=110)


def _plot_fig4_left(path: Path, f: dict[str, Any]) -> None:
    import numpy as np

    fig, axes = _figure("mean (points) and standard deviation (bands) of pred - true vs true (seed Fig. 4 left)")
    for ax, c in zip(axes, COMPONENTS):
        e = np.asarray(f["bin_edges_um"][c])
        centre = 0.5 * (e[1:] + e[:-1])
        ok = np.asarray(f["count"][c]) >= f["min_count_drawn"]
        for name, s in f["series"].items():
            mean = np.array([np.nan if v is None else v for v in s[c]["mean_um"]])
            std = np.array([np.nan if v is None else v for v in s[c]["std_um"]])
            mean[~ok], std[~ok] = np.nan, np.nan
            color = COLORS[name]
            ax.plot(centre, mean, "o-", ms=3, color=color, label=LABELS[name])
            ax.fill_between(centre, mean - std, mean + std, color=color, alpha=0.18, lw=0)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xlabel(f"{UNIT_LABELS[c]} true [um]")
        ax.set_ylabel(f"{UNIT_LABELS[c]} pred - true [um]")
        ax.set_title(UNIT_LABELS[c])
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.savefig(path, dpi=110)


def _plot_fig4_right(path: Path, f: dict[str, Any]) -> None:
    import numpy as np

    sel = f["selection"]
    fig, axes = _figure(f"mean (solid) and RMSE (dashed) of pred - true vs r, 0 <= z < {f['z_max_cm']:g} cm, over phi; "
                        f"{sel['n_samples']} samples near +1 sigma of the integrated density fluctuation "
                        f"(seed Fig. 4 right)")
    r = np.asarray(f["r_cm"])
    for ax, c in zip(axes, COMPONENTS):
        for name, s in f["series"].items():
            color = COLORS[name]
            mean = np.array([np.nan if v is None else v for v in s[c]["mean_um"]])
            rms = np.array([np.nan if v is None else v for v in s[c]["rmse_um"]])
            ax.plot(r, mean, "o-", ms=3, color=color, label=f"{LABELS[name]}: mean")
            ax.plot(r, rms, "s--", ms=3, color=color, label=f"{LABELS[name]}: RMSE")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xlabel("r [cm]")
        ax.set_ylabel(f"{UNIT_LABELS[c]} pred - true [um]")
        ax.set_title(UNIT_LABELS[c])
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.savefig(path, dpi=110)


def _plot_fig5(path: Path, truth: np.ndarray, values: dict[str, np.ndarray], corr: dict[str, dict[str, float | None]],
               zmask: np.ndarray) -> None:
    import numpy as np

    fig, axes = _figure(f"line charge at r = {LINE_RADIUS_CM:g} cm, sector {LINE_SECTOR}, constant in z: correction "
                        f"fluctuation at 0 <= z < {Z_MAX_CM:g} cm (seed Fig. 5)")
    markers = {"model": "o", "after_1d": "s", "linear_scaler": "x", "seed_unet": "^"}
    for i, (ax, c) in enumerate(zip(axes, COMPONENTS)):
        x = truth[i][..., zmask].ravel() * UM_PER_CM
        lo, hi = float(x.min()), float(x.max())
        for name, v in values.items():
            y = v[i][..., zmask].ravel() * UM_PER_CM
            lo, hi = min(lo, float(y.min())), max(hi, float(y.max()))
            r = corr[name][c]
            label = f"{LABELS[name]} (r = {'n/a' if r is None else f'{r:.3f}'})"
            ax.scatter(x, y, s=5, marker=markers[name], color=COLORS[name], alpha=0.5, label=label)
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="k", lw=0.7, ls="--")
        ax.set_xlabel(f"{UNIT_LABELS[c]} numerical [um]")
        ax.set_ylabel(f"{UNIT_LABELS[c]} predicted [um]")
        ax.set_title(UNIT_LABELS[c])
        ax.grid(alpha=0.3)
        _legend(ax, loc="upper left")
    fig.savefig(path, dpi=110)


# -- CLI -----------------------------------------------------------------------------------------
def _table(summary: dict[str, Any]) -> str:
    rows = [f"{'RMSE [um]':34s} {'dr':>10s} {'drphi':>10s} {'dz':>10s}"]
    for name, values in summary["rmse_um"].items():
        rows.append(f"{LABELS[name]:34s} " + " ".join(f"{values[c]:10.1f}" for c in COMPONENTS))
    for key, label in (("correlation", "line-charge r: "), ("gain", "line-charge gain: ")):
        for name, values in summary["figures"]["fig5"].get(key, {}).items():
            cells = " ".join(f"{'n/a':>10s}" if values[c] is None else f"{values[c]:10.3f}" for c in COMPONENTS)
            rows.append(f"{label + LABELS[name]:34s} {cells}")
    for t in summary["targets"]:
        if t["component"] != COMPONENTS[0]:
            continue
        parts = [x for x in summary["targets"] if x["name"] == t["name"]]
        state = "n/a" if not t["applicable"] else ("met" if all(x["met"] for x in parts) else "NOT met")
        vals = ", ".join("n/a" if x["value"] is None else f"{x['value']:.3g}" for x in parts)
        rows.append(f"target {t['name']} {t['comparison']} {t['threshold']:g}: {state} ({vals})")
    return "\n".join(rows)


def cmd_evaluate(args: argparse.Namespace) -> int:
    result = evaluate(args.task, args.checkpoint, args.report, n_eval=args.n_eval, seed=args.seed,
                      baseline_checkpoint=args.baseline_checkpoint, sc1d_checkpoint=args.sc1d_checkpoint,
                      device=args.device, batch_size=args.batch_size, progress=not args.no_progress,
                      log=lambda s: print(s, file=sys.stderr, flush=True))
    print(_table(result.summary))
    print(f"report: {result.report_dir / 'summary.json'} (+ {len(FIGURES)} PNG figures)")
    return 0


def add_subparser(subparsers: Any) -> None:
    """Register ``streamcal evaluate {sc1d,sc3d} --checkpoint DIR --report DIR``."""
    p = subparsers.add_parser("evaluate", help="evaluate a trained TPC correction on unbiased held-out data",
                              description="Evaluate a trained TPC correction on unbiased held-out data with its "
                                          "baselines: summary.json and the seed's figures 3-5 (PNG) in --report.")
    p.add_argument("task", choices=["sc1d", "sc3d"], help="the kind of checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory of `streamcal train` (or a .pt file)")
    p.add_argument("--report", required=True, help="output directory: summary.json and the PNG figures")
    p.add_argument("--n-eval", type=int, help="random maps of the evaluation split, x 27 samples "
                                              "(default: the checkpoint's data.n_random_eval)")
    p.add_argument("--seed", type=int, help="data seed (default: the checkpoint's data.seed)")
    p.add_argument("--baseline-checkpoint", help="a seed-style U-Net run (configs/train/sc3d_seed.yaml) to compare with")
    p.add_argument("--sc1d-checkpoint", help="the 1D model of a residual sc3d checkpoint (default: its config's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="models and ground truth")
    p.add_argument("--batch-size", type=int, default=32, help="samples per evaluation batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)
