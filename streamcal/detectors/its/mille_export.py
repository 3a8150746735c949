"""Export of the ITS2 alignment problem to Millepede-II: ``Mille`` records from the model's
derivatives and a matching ``pede`` steering file, so that the same data can be aligned by
``pede`` and the result compared with the ML alignment.

The format layer (records, steering commands, labels) is :mod:`streamcal.detectors.its.mille`;
this module fills it from the cost of ``models/its_alignment.py`` (``ITSAlignmentModel``)
linearised at the model's current Theta, using the same per-hit derivatives as
:func:`streamcal.detectors.its.align.normal_equations` (``_hit_theta_derivatives``), so that the
normal equations ``pede`` builds from the file are those of the model.

Records
-------
One record per track (one set of local parameters). For every hit, in layer order, two
measurements, then the vertex term:

=============  =================  ==========================  ==================================
measurement    value ``r``        sigma                       derivatives
=============  =================  ==========================  ==================================
hit, xy        ``e`` (circle)     ``1 / sqrt(w_xy)``          local 1-3, global 6 of the sensor
hit, z         ``rz`` (line)      ``1 / sqrt(w_z)``           local 4-5, global 6 of the sensor
vertex, xy     ``delta``          ``1 / sqrt(wv_xy)``         local 3 only
vertex, z      ``-z0``            ``1 / sqrt(wv_z)``          local 4 only
=============  =================  ==========================  ==================================

* ``r`` are the cost's residuals at the linearisation point with the track parameters at their
  fitted values (Karimaki circle ``e = kappa r^2 - (y cos phi - x sin phi) + delta`` relative to
  the event vertex, line ``rz = z - z0 - tan(lambda) s``; the vertex term is the vertex entered
  as a measured point). The weights are the cost's (intrinsic resolution projected on the
  residual direction plus, with ``multiple_scattering``, the diagonal Highland variance), held
  fixed as the model holds them. Without a vertex term (``vertex="none"``) there are no vertex
  measurements.
* Local parameters (:data:`LOCAL_PARAMETERS`, Mille indices 1..5): ``kappa`` (= rho / 2, 1/mm),
  ``phi`` (rad), ``delta`` (mm) of the circle, ``z0`` (mm), ``tan(lambda)`` of the line: the
  parameters of the model's fit. The derivatives are those of the linearised residuals the
  model's fit and ``normal_equations`` use: ``de/d(kappa, phi, delta) = (r^2, y sin phi + x cos
  phi, 1)``, ``drz/d(z0, tan lambda) = (-1, -s)``. The z residuals' dependence on the circle
  through the arc length ``s`` is not exported: the model fits the line at the arc lengths of
  the fitted circle (two fits, not one five-parameter fit), and so does ``pede`` with these
  derivatives.
* Global parameters: the six Theta parameters (``alpha, beta, gamma, tau1, tau2, tau3``) of the
  hit's sensor, label :func:`~streamcal.detectors.its.mille.its_label` ``= 10 s + dof + 1``.
  ``de/dtau3`` is identically zero and, as ``Mille`` does, not stored.
* Signs. Millepede's measurement is "measured minus predicted" and its derivatives are those
  of the prediction: ``pede`` fits ``r - sum dLocal dq - sum dGlobal dp``. The export writes
  ``r`` and the derivatives ``-dr/dq``, ``-dr/dTheta``, so that this is the cost's linearised
  residual ``r + J dq + A dTheta`` and ``pede``'s correction ``dp`` is a step in Theta.

Normalisation (event weights)
-----------------------------
The cost normalises every event by its degrees of freedom, ``C = 1/N sum_i chi2_i / nu_i``
(``N`` events with ``nu_i > 0``, over all batches as ``align.batch_weights``); ``pede``
minimises the plain sum of ``(r / sigma)^2``. ``normalisation`` chooses:

* ``"cost"`` (default): every sigma of a track in event ``i`` is multiplied by
  ``sqrt(nu_i / nu_mean)``, ``nu_mean = sum_i nu_i / N``. ``pede``'s objective is then exactly
  ``nu_sum C`` (``nu_sum = sum_i nu_i``, the summary's ``objective_scale``): the same minimum
  and the same constrained solution as the model, ``pede``'s normal matrix and right-hand side
  ``nu_sum / 2`` times ``normal_equations``' Hessian and minus gradient. The factor keeps
  ``pede``'s chi2/ndf near 1 (an event of average ``nu`` is not rescaled), so its printout and
  any ``chisqcut`` stay meaningful; only the sigmas of events with more or fewer degrees of
  freedom than average are stretched or shrunk.
* ``"chi2"``: the cost's sigmas unchanged. ``pede`` minimises the un-normalised
  ``sum_i chi2_i``, which weights an event by ``nu_i`` relative to the cost; the minimum
  differs slightly from the model's unless every event has the same ``nu`` (then the two are
  proportional). Use it to compare with a conventional Millepede alignment.

Events with ``nu <= 0`` have no weight in the cost and are not exported (``rejects``).

Linearisation point and steering
--------------------------------
The residuals are computed at the model's current Theta (``theta0.npy``); ``pede``'s result is a
correction: ``Theta = theta0 + dp`` (to first order; the parameters' initial values in the
steering file are 0). ``pede`` cannot recompute the residuals (the Euler angles, the weights and
the track fits are non-linear): to iterate, set the model to the new Theta and export again.
The steering file lists ``mp2data.bin`` (run ``pede steer.txt`` in the output directory), fixes
the parameters of the fixed sensors (the :class:`~streamcal.detectors.its.align.Constraints`'
``free == 0`` and the ``fixed_layers``) with presigma -1, writes one ``Constraint`` block per
column ``q`` of ``Constraints.q`` (the run's ``Q^T Theta = 0``, orthonormal, zero on fixed
sensors) as ``sum_k q_k dp_k = -q . theta0``, sets ``entries min_entries`` (``pede``'s default
cut of 25 entries would silently fix sparsely hit sensors; 1 reproduces the model's problem)
and the method: ``inversion`` (also gives errors) up to :data:`INVERSION_MAX_PARAMETERS` fitted
parameters, else ``sparseMINRES-QLP``. Parameters with fewer than ``min_entries`` measurements
are not fitted by ``pede``; they are left out of the constraint blocks (their correction is 0,
which the constraint value already accounts for).

What the records do not carry, as in the model's cost: the correlation of multiple scattering
between the hits of a track (the weights are the diagonal Highland variances; broken lines,
GBL, would be needed for more), the dependence of a fitted vertex (``vertex="fit"``) on the
alignment (it is held at its first-pass value, the vertex measurements have no global
derivatives) and the weights' dependence on Theta.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from streamcal.detectors.its.align import (
    Constraints,
    RejectCounts,
    _check_batches,
    _hit_theta_derivatives,
    batch_weights,
    pack_tracks,
)
from streamcal.detectors.its.evaluation import THETA_NPY, RunFormatError, _load_theta, load_run_config
from streamcal.detectors.its.geometry import build_geometry
from streamcal.detectors.its.mille import ITS_DOFS, MilleWriter, its_label, write_steering
from streamcal.models.its_alignment import ITSAlignmentModel, TrackBatch

__all__ = [
    "MILLE_FILE",
    "STEERING_FILE",
    "SUMMARY_FILE",
    "THETA0_FILE",
    "SPOOL_DIR",
    "LOCAL_PARAMETERS",
    "INVERSION_MAX_PARAMETERS",
    "export_mille",
    "read_spool",
    "export_run",
]

MILLE_FILE = "mp2data.bin"
STEERING_FILE = "steer.txt"
SUMMARY_FILE = "summary.json"
THETA0_FILE = "theta0.npy"
SPOOL_DIR = "spool"
LOCAL_PARAMETERS: tuple[str, ...] = ("kappa", "phi", "delta", "z0", "tan_lambda")
"""The track parameters, in Mille local-index order (index = position + 1)."""
INVERSION_MAX_PARAMETERS = 10_000
"""``method="auto"``: ``inversion`` up to this many fitted parameters, else ``sparseMINRES-QLP``."""

_N_LOCAL = len(LOCAL_PARAMETERS)
_COEF_CUT = 1e-12  # constraint coefficients below this fraction of the column's largest are dropped


# ------------------------------------------------------------------------------------------------
# Measurements of a chunk of tracks


def _measurements(model: ITSAlignmentModel, sub: TrackBatch, res: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """The measurements of the tracks of ``sub`` as (T, M) arrays, ``M = 2 K + 2`` rows per track
    (hit k: rows ``2 k`` (xy) and ``2 k + 1`` (z); the vertex xy and z last): value, sigma
    (unscaled), exported local (T, M, 5) and global (T, M, 6) derivatives, labels (T, M, 6)
    and which rows exist (``valid``)."""
    ve, vz = _hit_theta_derivatives(model, sub, res)  # (T, K, 6): d(e)/dTheta, d(rz)/dTheta
    x, y = res["x"].double(), res["y"].double()
    t, k = x.shape
    c, s = res["cos"].double()[:, None], res["sin"].double()[:, None]
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    # d(residual)/d(kappa, phi, delta, z0, tan lambda), as align._projector_blocks
    j_xy = torch.stack([x * x + y * y, y * s + x * c, one, zero, zero], -1)
    j_z = torch.stack([zero, zero, zero, -one, -res["arc"].double()], -1)
    j_hit = torch.stack([j_xy, j_z], 2).reshape(t, 2 * k, _N_LOCAL)
    r_hit = torch.stack([res["e"], res["rz"]], 2).double().reshape(t, 2 * k)
    w_hit = torch.stack([res["w_xy"], res["w_z"]], 2).double().reshape(t, 2 * k)
    a_hit = torch.stack([ve, vz], 2).double().reshape(t, 2 * k, ITS_DOFS)
    valid_hit = sub.mask[:, :, None].expand(t, k, 2).reshape(t, 2 * k)
    # vertex: e = delta (d/d delta = 1), rz = -z0 (d/d z0 = -1), no global derivative
    j_v = torch.zeros(t, 2, _N_LOCAL, dtype=torch.float64)
    j_v[:, 0, 2] = 1.0
    j_v[:, 1, 3] = -1.0
    r_v = torch.stack([res["delta"], -res["z0"]], 1).double()
    w_v = torch.stack([res["wv_xy"], res["wv_z"]], 1).double()
    jac = torch.cat([j_hit, j_v], 1).numpy()
    glob = torch.cat([a_hit, torch.zeros(t, 2, ITS_DOFS, dtype=torch.float64)], 1).numpy()
    value = torch.cat([r_hit, r_v], 1).numpy()
    weight = torch.cat([w_hit, w_v], 1).numpy()
    valid = torch.cat([valid_hit, w_v > 0], 1).numpy()
    sensor = sub.sensor.numpy()
    lab_hit = its_label(sensor[:, :, None], np.arange(ITS_DOFS)[None, None, :])  # (T, K, 6)
    labels = np.zeros((t, 2 * k + 2, ITS_DOFS), dtype=np.int64)
    labels[:, : 2 * k] = np.repeat(lab_hit, 2, axis=1)
    param = np.zeros((t, 2 * k + 2, ITS_DOFS), dtype=np.int64)  # index in Theta.reshape(-1)
    param[:, : 2 * k] = np.repeat(sensor[:, :, None] * ITS_DOFS + np.arange(ITS_DOFS), 2, axis=1)
    sigma = np.where(valid, 1.0 / np.sqrt(np.where(valid, weight, 1.0)), 1.0)
    return {"value": value, "sigma": sigma, "local": -jac, "global": -glob, "labels": labels, "param": param,
            "valid": valid, "n_hit_rows": np.asarray(2 * k)}


def _event_chunks(batch: TrackBatch, chunk_tracks: int) -> list[Tensor]:
    """Track index chunks of about ``chunk_tracks`` holding whole events (``vertex="fit"``
    estimates the vertex from the tracks of an event); one chunk if the tracks are not ordered
    by event."""
    t = batch.n_tracks
    ev = batch.event
    if t <= chunk_tracks or not bool((ev[1:] >= ev[:-1]).all()):
        return [torch.arange(t)]
    bounds = [0]
    while bounds[-1] < t:
        nxt = min(bounds[-1] + chunk_tracks, t)
        if nxt < t:
            nxt = int(torch.searchsorted(ev, ev[nxt - 1], right=True))
        bounds.append(nxt)
    return [torch.arange(a, b) for a, b in zip(bounds, bounds[1:])]


def _check_options(model: ITSAlignmentModel, constraints: Constraints | None, fixed_layers: Sequence[int],
                   normalisation: str, method: str, min_entries: int, chunk_tracks: int) -> None:
    where = "export_mille"
    if not isinstance(model, ITSAlignmentModel):
        raise ValueError(f"{where}: model must be an ITSAlignmentModel, got {type(model).__name__}")
    if constraints is not None and (not isinstance(constraints, Constraints)
                                    or constraints.n_sensors != model.n_sensors):
        raise ValueError(f"{where}: constraints must be a Constraints for {model.n_sensors} sensors")
    n_layers = int(model.layer_radius.shape[0])
    for lay in fixed_layers:
        if isinstance(lay, bool) or not isinstance(lay, (int, np.integer)) or not 0 <= lay < n_layers:
            raise ValueError(f"{where}: fixed_layers must be layer indices in 0..{n_layers - 1}, got {lay!r}")
    if normalisation not in ("cost", "chi2"):
        raise ValueError(f"{where}: normalisation must be 'cost' or 'chi2', got {normalisation!r}")
    if not isinstance(method, str) or not method or any(ch.isspace() for ch in method):
        raise ValueError(f"{where}: method must be 'auto' or one pede method name, got {method!r}")
    for name, val in (("min_entries", min_entries), ("chunk_tracks", chunk_tracks)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{where}: {name} must be an integer >= 1, got {val!r}")


# ------------------------------------------------------------------------------------------------
# Export


@torch.no_grad()
def export_mille(
    model: ITSAlignmentModel,
    batches: Sequence[TrackBatch] | TrackBatch,
    out_dir: str | os.PathLike[str],
    *,
    constraints: Constraints | None = None,
    fixed_layers: Sequence[int] = (),
    double_precision: bool = False,
    normalisation: Literal["cost", "chi2"] = "cost",
    method: str = "auto",
    min_entries: int = 1,
    rejects: RejectCounts | None = None,
    extra: Mapping[str, Any] | None = None,
    chunk_tracks: int = 2048,
) -> dict[str, Any]:
    """Write ``out_dir/mp2data.bin`` (one ``Mille`` record per track of ``batches``, linearised at
    the model's current Theta), ``out_dir/steer.txt``, ``out_dir/theta0.npy`` (the linearisation
    point) and ``out_dir/summary.json``; see the module docstring for the content.

    Args:
        model: the alignment model (its config: vertex mode, weights, precision) at the
            linearisation point.
        batches: packed tracks (``align.pack_tracks``); several batches are one cost as in
            ``align.normal_equations``.
        out_dir: output directory (created).
        constraints: the run's constraints: fixed sensors (presigma -1) and ``Q^T Theta = 0``
            (one ``Constraint`` block per column of ``Q``); None for neither.
        fixed_layers: further layers whose sensors are fixed; ``constraints.q`` must vanish on
            them (build the constraints with those sensors fixed).
        double_precision: float64 records (negative word count, GBL ``MilleBinary``) instead of
            ``Mille``'s float32.
        normalisation: ``"cost"`` (``pede`` minimises ``nu_sum C``) or ``"chi2"`` (plain sigmas).
        method: ``pede`` method; ``"auto"``: ``inversion`` or ``sparseMINRES-QLP`` by size.
        min_entries: ``pede``'s ``entries`` cut, written to the steering file.
        rejects: reject counts of the packing, copied into the summary.
        extra: further summary entries (e.g. the run directory).
        chunk_tracks: tracks per vectorised chunk (whole events).

    Returns:
        The summary (also written as JSON): ``tracks``, ``records``, ``measurements``, ``rejects``,
        the normalisation and its ``objective_scale``, ``cost`` (C at the linearisation point),
        parameter and constraint counts, the ``pede`` method and the file names.

    Raises:
        ValueError: on invalid input (naming the argument) or when no event has positive
            degrees of freedom.
    """
    _check_options(model, constraints, fixed_layers, normalisation, method, min_entries, chunk_tracks)
    batches = _check_batches(batches, "export_mille")
    for b in batches:
        model._check_batch(b, "export_mille")
    n = model.n_sensors
    fixed = np.zeros(n, dtype=bool)
    if constraints is not None:
        fixed |= constraints.free[:, 0].numpy() == 0
    if len(fixed_layers):
        extra_fixed = np.isin(model.sensor_layer.numpy(), np.asarray(fixed_layers, dtype=np.int64)) & ~fixed
        q_on = constraints is not None and bool(
            (np.abs(constraints.q.numpy().reshape(n, ITS_DOFS, -1)[extra_fixed]) > 0).any())
        if q_on:
            raise ValueError("export_mille: constraints.q is non-zero on sensors of fixed_layers; build the "
                             "Constraints with those sensors fixed (Constraints.build(fixed=...))")
        fixed |= extra_fixed

    # event normalisation over all batches: c_t = dC/dchi2_t = 1 / (N nu_event)
    wb = batch_weights(model, batches)
    ev_ndfs = []
    for b in batches:
        ndf_t = model._ndf(b.mask.sum(1))
        ev_ndfs.append(torch.zeros(b.n_events, dtype=torch.float64).index_add_(0, b.event, ndf_t))
    nu_sum = float(sum(float(e[e > 0].sum()) for e in ev_ndfs))
    n_events = int(sum(int((e > 0).sum()) for e in ev_ndfs))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    theta0 = model.theta().numpy().astype(np.float64)
    np.save(out / THETA0_FILE, theta0)
    entries = np.zeros(n * ITS_DOFS, dtype=np.int64)
    counts = {"tracks": 0, "hit": 0, "vertex": 0, "zero_ndf": 0}
    cost = chi2_sum = 0.0
    with MilleWriter(out / MILLE_FILE, double_precision=double_precision) as writer:
        for w_b, b, ev_ndf in zip(wb, batches, ev_ndfs):
            scale_ev = ITSAlignmentModel._event_scale(ev_ndf)  # 1 / (N_b nu_event), 0 for nu <= 0
            for idx in _event_chunks(b, int(chunk_tracks)):
                sub = TrackBatch(b.sensor[idx], b.local[idx], b.mask[idx], b.event[idx], b.n_events, b.vertex)
                res = model._evaluate(sub, model.phi.detach(), need_grad=False, scale_ev=scale_ev)
                ct = (float(w_b) * scale_ev[sub.event]).numpy()  # (T,) c_t
                meas = _measurements(model, sub, res)
                keep = ct > 0
                counts["zero_ndf"] += int((~keep).sum())
                if normalisation == "cost":  # sigma * sqrt(nu_event / nu_mean) = sigma / sqrt(c_t nu_sum)
                    sigma = meas["sigma"] / np.sqrt(np.where(keep, ct * nu_sum, 1.0))[:, None]
                else:
                    sigma = meas["sigma"]
                valid = meas["valid"] & keep[:, None]
                nh = int(meas["n_hit_rows"])
                nz = (meas["global"] != 0) & valid[:, :, None]
                entries += np.bincount(meas["param"][nz], minlength=n * ITS_DOFS)
                counts["hit"] += int(valid[:, :nh].sum())
                counts["vertex"] += int(valid[:, nh:].sum())
                chi2 = res["chi2"].double().numpy()
                cost += float((ct * chi2).sum())
                chi2_sum += float(chi2[keep].sum())
                for i in np.flatnonzero(keep):
                    v = valid[i]
                    writer.write_track(meas["local"][i, v], meas["global"][i, v], meas["labels"][i, v],
                                       meas["value"][i, v], sigma[i, v])
                counts["tracks"] += int(keep.sum())
        records, n_bytes = writer.records_written, writer.bytes_written

    # steering: fixed sensors, constraint blocks, entries cut, method
    fitted = (entries >= int(min_entries)) & ~np.repeat(fixed, ITS_DOFS)
    params = {its_label(int(s), d): (0.0, -1.0) for s in np.flatnonzero(fixed) for d in range(ITS_DOFS)}
    blocks: list[tuple[float, dict[int, float]]] = []
    dropped = 0
    if constraints is not None:
        q = constraints.q.numpy()
        th = theta0.reshape(-1)
        for col in q.T:
            big = np.abs(col).max(initial=0.0)
            use = fitted & (np.abs(col) > _COEF_CUT * big)
            if not use.any():
                dropped += 1
                continue
            labels = its_label(np.flatnonzero(use) // ITS_DOFS, np.flatnonzero(use) % ITS_DOFS)
            blocks.append((-float(col @ th), {int(lab): float(c) for lab, c in zip(labels, col[use])}))
    n_fitted = int(fitted.sum())
    pede_method = method
    if method == "auto":
        pede_method = "inversion" if n_fitted <= INVERSION_MAX_PARAMETERS else "sparseMINRES-QLP"
    scale_txt = f"{nu_sum!r} C" if normalisation == "cost" else "sum of chi2 (un-normalised)"
    write_steering(
        out / STEERING_FILE, binary_files=[MILLE_FILE], parameters=params, constraints=blocks, method=pede_method,
        extra_lines=[
            f"entries {int(min_entries)}",
            "! ITS2 alignment export (streamcal.detectors.its.mille_export)",
            f"! local parameters 1..{_N_LOCAL}: {', '.join(LOCAL_PARAMETERS)}",
            "! global label 10 * sensor + dof + 1, dof 0..5 = alpha, beta, gamma, tau1, tau2, tau3",
            f"! results are corrections to {THETA0_FILE}: Theta = theta0 + p",
            f"! objective: {scale_txt}",
        ],
    )

    rej = asdict(rejects) if rejects is not None else {}
    rej["tracks_zero_ndf"] = counts["zero_ndf"]
    summary: dict[str, Any] = {
        "files": {"mille": MILLE_FILE, "steering": STEERING_FILE, "theta0": THETA0_FILE},
        "tracks": counts["tracks"],
        "records": records,
        "measurements": counts["hit"] + counts["vertex"],
        "hit_measurements": counts["hit"],
        "vertex_measurements": counts["vertex"],
        "events": n_events,
        "ndf": nu_sum,
        "rejects": rej,
        "normalisation": normalisation,
        "objective_scale": nu_sum if normalisation == "cost" else None,
        "cost": cost,
        "chi2": chi2_sum,
        "local_parameters": list(LOCAL_PARAMETERS),
        "parameters": {
            "labels": n * ITS_DOFS,
            "with_entries": int((entries > 0).sum()),
            "fitted": n_fitted,
            "fixed": int(fixed.sum()) * ITS_DOFS,
            "min_entries": int(min_entries),
        },
        "constraints": {"written": len(blocks), "dropped": dropped,
                        "modes": list(constraints.modes) if constraints is not None else []},
        "method": pede_method,
        "double_precision": bool(double_precision),
        "bytes": n_bytes,
        "theta0_max_abs": float(np.abs(theta0).max(initial=0.0)),
        "vertex": model.config.vertex,
        "multiple_scattering": bool(model.config.multiple_scattering),
    }
    if extra:
        summary.update(dict(extra))
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


# ------------------------------------------------------------------------------------------------
# A run directory of the alignment workers


def _spool_key(path: Path) -> tuple[str, int, str]:
    """``{stage}-{replica}.{incarnation}.arrows``: by worker, then incarnation."""
    head, _, rest = path.name.partition(".")
    inc = rest.split(".")[0]
    return head, int(inc) if inc.isdigit() else 0, path.name


def read_spool(spool_dir: str | os.PathLike[str],
               log: Callable[[str], None] | None = None) -> tuple[list[tuple[Path, pa.RecordBatch]], dict[str, Any]]:
    """The hit batches of the workers' spool files ``spool_dir/*.arrows`` (Arrow IPC streams of
    schema ``its.hits``), in worker and incarnation order, each with its file. A file whose tail
    is damaged (a killed worker) is read up to it and reported in ``info["damaged"]``.

    Raises:
        RunFormatError: if ``spool_dir`` is not a directory or holds no ``*.arrows`` file.
    """
    sd = Path(spool_dir)
    if not sd.is_dir():
        raise RunFormatError(sd, "missing (the alignment workers spool their hit batches there as *.arrows)")
    files = sorted(sd.glob("*.arrows"), key=_spool_key)
    if not files:
        raise RunFormatError(sd, "no spool files (*.arrows, Arrow IPC streams of schema its.hits)")
    out: list[tuple[Path, pa.RecordBatch]] = []
    damaged: list[str] = []
    for path in files:
        try:
            with pa.OSFile(str(path), "rb") as fh:
                reader = pa.ipc.open_stream(fh)
                while True:
                    try:
                        out.append((path, reader.read_next_batch()))
                    except StopIteration:
                        break
        except (pa.ArrowInvalid, OSError) as exc:
            damaged.append(path.name)
            if log is not None:
                log(f"spool {path.name}: read up to a damaged tail ({exc})")
    return out, {"files": [p.name for p in files], "batches": len(out), "damaged": damaged}


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    at: Literal["zero", "fitted"] = "zero",
    min_hits: int = 4,
    double_precision: bool = False,
    normalisation: Literal["cost", "chi2"] = "cost",
    method: str = "auto",
    min_entries: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`export_mille` for a run directory of the alignment workers (``streamcal its
    export-mille``): the geometry, cost and constraints of ``run_dir/run.json``, the hits of
    ``run_dir/spool/*.arrows`` packed per spooled batch as the workers pack them
    (``pack_tracks`` with ``min_hits``; the vertex columns for ``vertex="given"``), linearised
    at Theta = 0 (``at="zero"``: ``pede`` aligns from the ideal geometry) or at the run's
    ``theta.npy`` (``"fitted"``: ``pede``'s corrections to the ML result).

    Raises:
        RunFormatError: (a ``StreamcalError``) naming the file or directory that is missing or
            malformed.
    """
    if at not in ("zero", "fitted"):
        raise ValueError(f"export_run: at must be 'zero' or 'fitted', got {at!r}")
    rd = Path(run_dir)
    if not rd.is_dir():
        raise RunFormatError(rd, "not a directory (expected a run directory of the alignment workers)")
    rc = load_run_config(rd)
    geom = build_geometry(rc.geometry)
    model = ITSAlignmentModel.from_geometry(geom, rc.model)
    if at == "fitted":
        model.set_theta(torch.from_numpy(_load_theta(rd / THETA_NPY, geom.n_sensors)))
    hits, info = read_spool(rd / SPOOL_DIR, log)
    with_vertex = rc.model.vertex == "given"
    batches: list[TrackBatch] = []
    rejects = RejectCounts()
    for path, batch in hits:
        try:
            tb, cnt = pack_tracks(batch, geom, min_hits=min_hits, with_vertex=with_vertex)
        except ValueError as exc:
            raise RunFormatError(path, str(exc)) from exc
        rejects = rejects + cnt
        if tb.n_tracks:
            batches.append(tb)
    if not batches:
        raise RunFormatError(rd / SPOOL_DIR, f"no track with at least {min_hits} valid hits in the spool files")
    if log is not None:
        log(f"{len(batches)} batches, {rejects.tracks_used} tracks; linearised at Theta = {at}")
    extra = {"run": {"dir": rd.name, "at": at, "min_hits": int(min_hits), "spool": info}}
    return export_mille(model, batches, out_dir, constraints=rc.constraints.build(geom),
                        double_precision=double_precision, normalisation=normalisation, method=method,
                        min_entries=min_entries, rejects=rejects, extra=extra)
