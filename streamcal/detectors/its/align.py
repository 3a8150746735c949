"""Alignment steps on the ITS2 chi^2 cost: input checks, SGD (seed), Adam, block Gauss-Newton,
weighted averaging, weak-mode constraints and a sparse least-squares reference solution.

The functions here are what a worker calls; they know nothing of Ray or transport.

Cost over several batches. ``ITSAlignmentModel`` normalises a batch's cost by its own number of
events, ``C_b = 1/N_b sum_i chi2_i / nu_i``; the cost of a list of batches is the seed's
``C = 1/N_event sum_i chi2_i / nu_i`` over all of them, i.e. ``C = sum_b (N_b / N) C_b``
(:func:`batch_weights`, :func:`total_cost`, :func:`full_gradient`).

Update rule (seed, "The optimization step at iteration t")::

    Theta(t+1) = Theta(t) - eta * (grad_Phi C(Theta) . dPhi/dTheta)

The gradient is computed in Phi-space (``ITSAlignmentModel``), mapped to Theta with the analytic
Jacobian (:func:`theta_gradient`), the update is applied to Theta (so every a_R stays a rotation)
and mapped back to Phi (``model.set_theta``). :class:`ThetaOptimizer` implements

* ``"sgd"``: the seed's rule, one rate for the angles and one for the translations.
  :func:`sgd_rates` gives the largest rates that are stable for the problem at hand (from
  :func:`hessian_blocks`).
* ``"gn"``: the same step preconditioned by the per-sensor 6 x 6 Gauss-Newton blocks
  ``D_s = sum 2 a w v v^T`` (:func:`hessian_blocks`). Each hit residual depends on one sensor
  only, so ``D = A^T W A`` is block-diagonal and, the track fit's projector being ``P <= W``,
  the Gauss-Newton matrix ``H = A^T P A`` satisfies ``H <= D``: the eigenvalues of ``D^-1 H``
  lie in [0, 1] and the step ``-eta D^-1 g`` converges for 0 < eta < 2 (no tuning). It removes
  the bad conditioning of the global Theta parameterisation (a rotation about the beam axis
  and a shift along r-phi move a chip almost identically).
* ``"adam"``: per-parameter adaptive rates (Kingma & Ba).

Updates respect the :class:`Constraints`, projected in the optimiser's metric.

Weak modes. :func:`weak_mode_analysis` expresses the normal matrix ``H`` of
:func:`normal_equations` in the local per-sensor basis (rotation about the chip centre, shifts
along u, v, w), scales it to unit diagonal and computes its smallest eigenvalues; each global
mode of ``misalignment.weak_mode`` (or any displacement field) gets its relative stiffness
``m^T H m / m^T diag(H) m`` (0: the cost is blind to it; 1: as stiff as moving single
parameters) and its overlap with the near-null eigenvectors. Measured on a compact five-layer
barrel (R = 22-55 mm, 200 chips; 2300 tracks of |eta| < 0.4 from a 15 um x 10 mm beam spot,
B = 0.5 T, no multiple scattering, the vertex term with the given vertex; see
``tests/its/test_align.py``):

=======================  ============  ======================================================
mode                     stiffness     what constrains it
=======================  ============  ======================================================
rz (rotation about z)    1e-9          nothing: tracks from the beam line turn with the
                                       detector (only the 15 um beam-spot offsets see it)
curl (dphi = c R)        1.5e-5        the track curvature absorbs it; on this barrel it is
                                       96 % rz (overlap 0.96)
telescope (dz = c R)     2.4e-5        tan(lambda) absorbs it (up to arc length != R)
shear (dx or dy = c R)   2.6e-5        the track direction absorbs it (not in the mode table;
                                       ``extra`` of :func:`weak_mode_analysis`)
rx, ry                   3.3e-4        the vertex term, through the 10 mm spread in vertex z
tx, ty / tz              6.7e-3 / 1e-2 the vertex term
clamshell, skew          1.4e-2, 3e-2  the vertex term and the rigid chips
twist, zexpansion        5e-2, 8e-2    rigid chips: hits across a chip move differently
radial, elliptical,      0.2-0.3       rigid chips: a chip moves but is not stretched
conical
=======================  ============  ======================================================

The spectrum has one blind eigenvalue (1e-9, rz), three near 1.5e-5 (the two shears and the
telescope; curl is rz plus these), then collective modes from 1e-4 on (displacements linear in
R within azimuthal sectors, which tracks from one point absorb). rz must be constrained (else
the system is singular up to the beam spot); the weak ones give large but honest errors
(micrometres per chip with a few thousand tracks) unless they are constrained as well.
:class:`Constraints` removes chosen modes explicitly (``Q^T Theta = 0`` with ``Q`` an
orthonormal basis of the modes, as Millepede's linear constraints), arbitrary directions (e.g.
the eigenvectors below a threshold, as Millepede's eigenvalue cut) and/or fixes reference
sensors (``Theta_s = 0``): fixing the innermost and outermost layers removes all of the above
(smallest constrained stiffness 0.14). :func:`constrained_stiffness` checks that the constrained
problem is full rank (unique solution). A misalignment along a constrained blind mode is not
recovered: the fit returns the truth with its component along ``Q`` removed
(``Theta_true - Q Q^T Theta_true``; in general :meth:`ReferenceSolution.expected` gives the
noise-free constrained fit ``K H Theta_true``); with fixed sensors it is the truth relative to
them.

Reference solution. :func:`reference_solution` minimises C by Gauss-Newton on the linearised
global least-squares problem with the track parameters profiled out per track (closed form,
vectorised): ``H = sum_tracks 2 c_t A^T P A``, ``P = W - W J (J^T W J)^-1 J^T W``, ``g = dC/dTheta``
(c_t: the track's weight in C, A: residual derivatives by Theta at fixed track parameters, J: by
the 5 track parameters), solved with the constraints as a sparse KKT system (``scipy.sparse``,
LU). Its statistical covariance is the sandwich ``K V K`` with ``K`` the upper-left block of the
inverse KKT matrix and ``V = sum 4 c_t^2 A^T P S P A`` the covariance of the gradient for the
residuals' noise ``S`` (:func:`noise_factors`: intrinsic errors, multiple scattering correlated
along the track; the vertex either exact or with its configured resolution).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

import numpy as np
import pyarrow as pa
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from streamcal.detectors.its.geometry import ITSGeometry
from streamcal.detectors.its.misalignment import RIGID_MODES, WEAK_MODES, global_to_local, mode_vectors
from streamcal.models.its_alignment import ITSAlignmentModel, TrackBatch, _arc_length

__all__ = [
    "RejectCounts",
    "pack_tracks",
    "write_tracks",
    "read_tracks",
    "Constraints",
    "Projection",
    "batch_weights",
    "total_cost",
    "theta_gradient",
    "full_gradient",
    "hessian_blocks",
    "sgd_rates",
    "OptimizerConfig",
    "ThetaOptimizer",
    "run_epoch",
    "weighted_average",
    "local_basis",
    "NormalEquations",
    "normal_equations",
    "noise_factors",
    "ReferenceSolution",
    "reference_solution",
    "WeakModeReport",
    "weak_mode_analysis",
    "constrained_stiffness",
    "measurement_residuals",
]


# ------------------------------------------------------------------------------------------------
# Input checks and packing


@dataclass
class RejectCounts:
    """What :func:`pack_tracks` rejected (never folded into the cost)."""

    hits_in: int = 0
    hits_unknown_sensor: int = 0
    hits_nan: int = 0
    hits_outside_sensor: int = 0
    hits_duplicate_sensor: int = 0
    tracks_in: int = 0
    tracks_too_few_hits: int = 0
    tracks_too_many_hits: int = 0
    tracks_bad_vertex: int = 0
    tracks_used: int = 0
    hits_used: int = 0
    events_used: int = 0

    def __add__(self, other: RejectCounts) -> RejectCounts:
        if not isinstance(other, RejectCounts):
            return NotImplemented
        return RejectCounts(**{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__})

    @property
    def hits_rejected(self) -> int:
        """Hits dropped by the per-hit checks (not counting the hits of dropped tracks)."""
        return self.hits_unknown_sensor + self.hits_nan + self.hits_outside_sensor + self.hits_duplicate_sensor

    @property
    def tracks_rejected(self) -> int:
        return self.tracks_too_few_hits + self.tracks_too_many_hits + self.tracks_bad_vertex


def _column(hits: pa.RecordBatch | pa.Table | dict[str, np.ndarray], name: str, fill: float | None) -> np.ndarray:
    """Column ``name`` as numpy; nulls become ``fill`` (a ValueError if ``fill`` is None)."""
    if isinstance(hits, dict):
        if name not in hits:
            raise ValueError(f"pack_tracks: hits has no column {name!r} (got {sorted(hits)})")
        arr = np.asarray(hits[name])
        if arr.ndim != 1:
            raise ValueError(f"pack_tracks: column {name!r} must be one-dimensional, got shape {arr.shape}")
        return arr
    if name not in hits.schema.names:
        raise ValueError(f"pack_tracks: hits has no column {name!r} (got {hits.schema.names})")
    col = hits.column(name)
    if col.null_count:
        if fill is None:
            raise ValueError(f"pack_tracks: column {name!r} has {col.null_count} null values")
        col = col.cast(pa.float64()).fill_null(float(fill))
    return col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array) else col.to_numpy()


def pack_tracks(
    hits: pa.RecordBatch | pa.Table | dict[str, np.ndarray],
    geom: ITSGeometry,
    *,
    min_hits: int = 4,
    max_hits: int = 16,
    tolerance: float = 0.05,
    with_vertex: bool = True,
) -> tuple[TrackBatch, RejectCounts]:
    """Validate hit rows and pad them into a :class:`TrackBatch` (vectorised, no loop per track).

    Rejected and counted, in this order: hits on unknown sensor ids (outside ``0 .. N-1``, null
    or not an integer), hits with NaN, infinite or null local coordinates, hits outside the
    active area by more than ``tolerance`` (mm), a second hit of the same track on the same
    sensor; then tracks with fewer than ``min_hits`` or more than ``max_hits`` valid hits, and
    (``with_vertex``) tracks whose event vertex is not finite. Rejected hits and tracks never
    enter the batch. Needs columns ``event``, ``track``, ``sensor``, ``u``, ``v`` (and ``vx``,
    ``vy``, ``vz`` when ``with_vertex``; they must agree within an event). Tracks are the
    ``(event, track)`` pairs; the output is ordered by event, track and layer.
    """
    if not (isinstance(min_hits, (int, np.integer)) and min_hits >= 3):
        raise ValueError(f"pack_tracks: min_hits must be an integer >= 3 (5 track parameters), got {min_hits!r}")
    if not (isinstance(max_hits, (int, np.integer)) and max_hits >= min_hits):
        raise ValueError(f"pack_tracks: max_hits must be an integer >= min_hits={min_hits}, got {max_hits!r}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"pack_tracks: tolerance must be a finite length >= 0 (mm), got {tolerance!r}")
    if not isinstance(hits, (pa.RecordBatch, pa.Table, dict)):
        raise ValueError(f"pack_tracks: hits must be a pyarrow RecordBatch/Table or a dict, got {type(hits).__name__}")

    n_sens = geom.n_sensors
    event_raw = _column(hits, "event", None)
    track_raw = _column(hits, "track", None)
    n_in = event_raw.shape[0]
    for name, arr in (("event", event_raw), ("track", track_raw)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"pack_tracks: column {name!r} must hold integers, got {arr.dtype}")
    event = event_raw.astype(np.int64)
    track = track_raw.astype(np.int64)
    sensor_raw = _column(hits, "sensor", -1)
    u = _column(hits, "u", math.nan).astype(np.float64)
    v = _column(hits, "v", math.nan).astype(np.float64)
    cols = {"track": track, "sensor": sensor_raw, "u": u, "v": v}
    if with_vertex:
        vtx = np.stack([_column(hits, c, math.nan).astype(np.float64) for c in ("vx", "vy", "vz")], 1)
        cols["vx"] = vtx
    for name, arr in cols.items():
        if arr.shape[0] != n_in:
            raise ValueError(f"pack_tracks: column {name!r} has {arr.shape[0]} rows, column 'event' {n_in}")

    cnt = RejectCounts(hits_in=int(n_in))
    if np.issubdtype(sensor_raw.dtype, np.integer):
        sensor = sensor_raw.astype(np.int64)
        bad_sensor = (sensor < 0) | (sensor >= n_sens)
    else:
        sf = sensor_raw.astype(np.float64)
        bad_sensor = ~np.isfinite(sf) | (sf != np.round(sf)) | (sf < 0) | (sf >= n_sens)
        sensor = np.where(bad_sensor, -1, np.nan_to_num(sf)).astype(np.int64)
    bad_nan = ~(np.isfinite(u) & np.isfinite(v)) & ~bad_sensor
    with np.errstate(invalid="ignore"):
        outside = ~bad_sensor & ~bad_nan & (
            (np.abs(u) > geom.half_u + tolerance) | (np.abs(v) > geom.half_v + tolerance)
        )
    cnt.hits_unknown_sensor = int(bad_sensor.sum())
    cnt.hits_nan = int(bad_nan.sum())
    cnt.hits_outside_sensor = int(outside.sum())
    sensor_safe = np.where(bad_sensor, 0, sensor)

    # tracks are (event, track) pairs, counted before any hit is dropped
    order = np.lexsort((geom.layer[sensor_safe], track, event))
    ev_s, tr_s = event[order], track[order]
    new_trk = np.ones(order.size, dtype=bool)
    new_trk[1:] = (ev_s[1:] != ev_s[:-1]) | (tr_s[1:] != tr_s[:-1])
    tid_sorted = np.cumsum(new_trk) - 1
    cnt.tracks_in = int(new_trk.sum())
    keep_sorted = ~(bad_sensor | bad_nan | outside)[order]
    # a second hit of the same track on the same sensor (the first valid one is kept)
    key = tid_sorted * (n_sens + 1) + np.where(keep_sorted, sensor_safe[order], n_sens)
    _, first = np.unique(key, return_index=True)
    dup = np.ones(order.size, dtype=bool)
    dup[first] = False
    dup &= keep_sorted
    cnt.hits_duplicate_sensor = int(dup.sum())
    keep_sorted &= ~dup
    nvalid = np.bincount(tid_sorted, weights=keep_sorted, minlength=cnt.tracks_in).astype(np.int64)
    too_few = nvalid < min_hits
    too_many = nvalid > max_hits
    cnt.tracks_too_few_hits = int(too_few.sum())
    cnt.tracks_too_many_hits = int(too_many.sum())
    good_trk = ~(too_few | too_many)
    if with_vertex:
        row_bad = ~np.isfinite(cols["vx"][order]).all(1)
        bad_vtx = (np.bincount(tid_sorted, weights=row_bad, minlength=cnt.tracks_in) > 0) & good_trk
        cnt.tracks_bad_vertex = int(bad_vtx.sum())
        good_trk &= ~bad_vtx
    sel = keep_sorted & good_trk[tid_sorted]
    idx = order[sel]
    tid = tid_sorted[sel]
    # renumber tracks and events densely
    utid, tdense = np.unique(tid, return_inverse=True)
    n_t = int(utid.size)
    starts = np.searchsorted(tdense, np.arange(n_t))
    pos = np.arange(tdense.size) - starts[tdense]
    k = int(nvalid[utid].max()) if n_t else int(min_hits)
    trk_event = event[idx][starts] if n_t else np.zeros(0, dtype=np.int64)
    uev, edense = np.unique(trk_event, return_inverse=True)
    cnt.tracks_used = n_t
    cnt.hits_used = int(idx.size)
    cnt.events_used = int(uev.size)
    sens = np.zeros((n_t, k), dtype=np.int64)
    loc = np.zeros((n_t, k, 2), dtype=np.float64)
    mask = np.zeros((n_t, k), dtype=bool)
    sens[tdense, pos] = sensor[idx]
    loc[tdense, pos, 0] = u[idx]
    loc[tdense, pos, 1] = v[idx]
    mask[tdense, pos] = True
    vertex = None
    if with_vertex:
        vx_trk = cols["vx"][idx][starts] if n_t else np.zeros((0, 3))  # (T, 3)
        vertex_ev = np.zeros((uev.size, 3))
        vertex_ev[edense] = vx_trk
        spread = np.abs(cols["vx"][idx] - vertex_ev[edense][tdense]).max(1) if n_t else np.zeros(0)
        if spread.size and spread.max() > 1e-9:
            bad_ev = int(uev[edense[tdense[int(np.argmax(spread))]]])
            raise ValueError(f"pack_tracks: the vertex columns (vx, vy, vz) differ between the rows of event {bad_ev}")
        vertex = torch.from_numpy(vertex_ev)
    batch = TrackBatch(
        sensor=torch.from_numpy(sens),
        local=torch.from_numpy(loc),
        mask=torch.from_numpy(mask),
        event=torch.from_numpy(edense.astype(np.int64)),
        n_events=int(uev.size),
        vertex=vertex,
    )
    return batch, cnt


# A packed-track record: the header, then nh (T,) uint8, event (T,) int32, sensor (H,) int32,
# local (H, 2) float64 and, with the vertex flag, vertex (E, 3) float64; H = sum(nh) real hits.
# With the layout flag: the count of tensors (uint32), a header per tensor (dtype code, ndim,
# shape) and their data (int64 stored as int32).
_TRACKS_MAGIC = b"SCTRACK1"
_TRACKS_HEAD = struct.Struct("<8sIIIII")  # magic, n_events, n_tracks, n_hits, max hits K, flags
_HAS_VERTEX, _HAS_LAYOUT = 1, 2
_TENSOR_HEAD = struct.Struct("<BBxx4I")  # dtype code, ndim, shape (up to 4 dims)
_TENSOR_CODES = {1: (torch.int64, np.int32), 2: (torch.float32, np.float32), 3: (torch.float64, np.float64),
                 4: (torch.int32, np.int32)}


def _encode_tensors(tensors: Sequence[Tensor]) -> list[np.ndarray]:
    heads, datas = [], []
    for i, t in enumerate(tensors):
        code = next((c for c, (td, _) in _TENSOR_CODES.items() if td == t.dtype), None)
        if code is None or t.ndim > 4:
            raise ValueError(f"write_tracks: layout tensor {i}: {t.dtype} of {t.ndim} dimensions cannot be stored")
        a = t.detach().cpu().numpy()
        if code == 1:
            if a.size and (a.min() < -2**31 or a.max() >= 2**31):
                raise ValueError(f"write_tracks: layout tensor {i}: int64 values beyond the int32 range")
            a = a.astype(np.int32)
        shape = list(a.shape) + [0] * (4 - a.ndim)
        heads.append(np.frombuffer(_TENSOR_HEAD.pack(code, a.ndim, *shape), np.uint8))
        datas.append(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return [np.array([len(tensors)], np.uint32).view(np.uint8), *heads, *datas]


def write_tracks(f: BinaryIO, batch: TrackBatch, layout: Sequence[Tensor] | None = None) -> int:
    """Append ``batch`` (as :func:`pack_tracks` returns it: real hits first in each row) to the
    binary file ``f`` as one record of its real hits only (about 21 bytes per hit, against
    ~56 in the ``its.hits`` rows and ~130 per hit padded in memory); returns the bytes written.
    :func:`read_tracks` gives back the same batch, bit for bit. ``layout``: the model's layout of
    the batch (``ITSAlignmentModel.plan_tensors``, about 38 bytes per hit in float32), stored
    with it so that a replay does not build it again."""
    mask = batch.mask
    nh = mask.sum(1)
    t, k = mask.shape
    if t and not bool((mask == (torch.arange(k)[None, :] < nh[:, None])).all()):
        raise ValueError("write_tracks: every track's real hits must come first in its row (as pack_tracks packs them)")
    if k > 255:
        raise ValueError(f"write_tracks: at most 255 hits per track, got rows of {k}")
    parts = [
        nh.numpy().astype(np.uint8),
        batch.event.numpy().astype(np.int32),
        batch.sensor[mask].numpy().astype(np.int32),
        batch.local[mask].to(torch.float64).numpy(),
    ]
    flags = 0
    if batch.vertex is not None:
        parts.append(batch.vertex.to(torch.float64).numpy())
        flags |= _HAS_VERTEX
    if layout is not None:
        parts += _encode_tensors(layout)
        flags |= _HAS_LAYOUT
    head = _TRACKS_HEAD.pack(_TRACKS_MAGIC, batch.n_events, t, int(nh.sum()), k, flags)
    f.write(head)
    for a in parts:
        f.write(np.ascontiguousarray(a).data)
    return len(head) + sum(a.nbytes for a in parts)


def read_tracks(f: BinaryIO, *, skip: bool = False, model: ITSAlignmentModel | None = None) -> TrackBatch | None:
    """The next record of a :func:`write_tracks` file: the TrackBatch, or None at the end of the
    file. ``skip``: move past the record without decoding it (returns an empty TrackBatch).
    ``model``: a layout stored with the record is attached to the batch for this model
    (``ITSAlignmentModel.attach_plan``); without a model it is skipped. A record cut short (the
    file of a process that died while writing) or a foreign header raises ValueError naming the
    offset."""
    where = f.tell()
    head = f.read(_TRACKS_HEAD.size)
    if not head:
        return None
    if len(head) < _TRACKS_HEAD.size:
        raise ValueError(f"read_tracks: a record header cut short at byte {where}")
    magic, n_events, t, h, k, flags = _TRACKS_HEAD.unpack(head)
    if magic != _TRACKS_MAGIC:
        raise ValueError(f"read_tracks: no track record at byte {where} (magic {magic!r})")
    sizes = [t, 4 * t, 4 * h, 16 * h] + ([24 * n_events] if flags & _HAS_VERTEX else [])
    end = where + _TRACKS_HEAD.size + sum(sizes)
    layout_heads: list[tuple[int, ...]] = []
    if flags & _HAS_LAYOUT:  # the layout's size is in its tensor headers, read them
        f.seek(end)
        raw = f.read(4)
        count = int(np.frombuffer(raw, np.uint32)[0]) if len(raw) == 4 else -1
        heads = f.read(count * _TENSOR_HEAD.size) if count >= 0 else b""
        if count < 0 or len(heads) < count * _TENSOR_HEAD.size:
            raise ValueError(f"read_tracks: the record at byte {where} is cut short (layout headers)")
        for i in range(count):
            code, ndim, *shape = _TENSOR_HEAD.unpack_from(heads, i * _TENSOR_HEAD.size)
            if code not in _TENSOR_CODES or ndim > 4:
                raise ValueError(f"read_tracks: the record at byte {where}: layout tensor {i} has an unknown dtype "
                                 f"code {code} or {ndim} dimensions")
            layout_heads.append((code, *shape[:ndim]))
        end = f.tell() + sum(int(np.prod(hd[1:], dtype=np.int64)) * np.dtype(_TENSOR_CODES[hd[0]][1]).itemsize
                             for hd in layout_heads)
        f.seek(where + _TRACKS_HEAD.size)
    if skip:
        if f.seek(0, 2) < end:
            raise ValueError(f"read_tracks: the record at byte {where} is cut short")
        f.seek(end)
        empty = torch.zeros(0, k, dtype=torch.int64)
        return TrackBatch(empty, torch.zeros(0, k, 2, dtype=torch.float64), empty.bool(),
                          torch.zeros(0, dtype=torch.int64), int(n_events))
    buf = f.read(sum(sizes))
    if len(buf) < sum(sizes):
        raise ValueError(f"read_tracks: the record at byte {where} is cut short ({len(buf)} of {sum(sizes)} bytes)")
    offs = np.cumsum([0] + sizes)
    nh = np.frombuffer(buf, np.uint8, t, offs[0])
    mask = np.arange(k)[None, :] < nh[:, None]
    sensor = np.zeros((t, k), dtype=np.int64)
    sensor[mask] = np.frombuffer(buf, np.int32, h, offs[2])
    local = np.zeros((t, k), dtype=np.complex128)  # (u, v) pairs moved as one 16-byte element
    local[mask] = np.frombuffer(buf, np.complex128, h, offs[3])
    vertex = None
    if flags & _HAS_VERTEX:
        vertex = torch.from_numpy(np.frombuffer(buf, np.float64, 3 * n_events, offs[4]).reshape(n_events, 3).copy())
    event = torch.from_numpy(np.frombuffer(buf, np.int32, t, offs[1]).astype(np.int64))
    batch = TrackBatch(sensor=torch.from_numpy(sensor), local=torch.from_numpy(local.view(np.float64).reshape(t, k, 2)),
                       mask=torch.from_numpy(mask), event=event, n_events=int(n_events), vertex=vertex)
    if layout_heads:
        f.seek(4 + len(layout_heads) * _TENSOR_HEAD.size, 1)
        size = end - f.tell()
        data = bytearray(size)
        if f.readinto(data) < size:
            raise ValueError(f"read_tracks: the record at byte {where} is cut short (layout)")
        if model is not None:
            tensors, off = [], 0
            for code, *shape in layout_heads:
                td, nd = _TENSOR_CODES[code]
                cnt = int(np.prod(shape, dtype=np.int64))
                a = np.frombuffer(data, nd, cnt, off).reshape(shape)
                off += cnt * np.dtype(nd).itemsize
                tensors.append(torch.from_numpy(a.astype(np.int64) if code == 1 else a))
            model.attach_plan(batch, tensors)
    return batch


# ------------------------------------------------------------------------------------------------
# Constraints (weak modes, reference sensors)


def _restricted_basis(q: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Orthonormal basis (6N, m') of the directions ``q`` (6N, m) restricted to the ``free``
    sensors (bool (N,)), dependent directions dropped (e.g. a translation once three sensors are
    fixed)."""
    qf = q * np.repeat(free, 6).astype(np.float64)[:, None]
    if qf.shape[1]:
        scale = np.linalg.norm(qf, axis=0)
        qf = qf[:, scale > 1e-12] / scale[scale > 1e-12]
    if not qf.shape[1]:
        return np.zeros((q.shape[0], 0))
    return np.ascontiguousarray(sla.orth(qf, rcond=1e-9))


@dataclass
class Constraints:
    """Linear constraints on Theta: ``Q^T Theta = 0`` (``Q`` (6N, m) orthonormal, zero on fixed
    sensors) and ``Theta_s = 0`` for the fixed sensors (``free[s] = 0``). Build with
    :meth:`build`. The optimisers keep ``Q^T Theta`` and the fixed sensors at their starting
    values (0 from the ideal geometry); :func:`reference_solution` imposes them exactly."""

    q: Tensor  # (6N, m)
    free: Tensor  # (N, 1) 1.0 for free sensors, 0.0 for fixed ones
    modes: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        geom: ITSGeometry,
        modes: Sequence[str] = (),
        fixed: Sequence[int] | np.ndarray | None = None,
        vectors: np.ndarray | None = None,
    ) -> Constraints:
        """Constraints removing the global ``modes`` (names of ``misalignment.weak_mode``, e.g.
        ``"rz"``, ``"radial"``), fixing the ``fixed`` sensor ids and removing the extra
        directions ``vectors`` (6N, k) in Theta space."""
        n = geom.n_sensors
        for m in modes:
            if m not in WEAK_MODES + RIGID_MODES:
                raise ValueError(f"Constraints.build: unknown mode {m!r}; allowed: {WEAK_MODES + RIGID_MODES}")
        q = mode_vectors(geom, tuple(modes))
        if vectors is not None:
            vec = np.asarray(vectors, dtype=np.float64)
            if vec.ndim == 1:
                vec = vec[:, None]
            if vec.ndim != 2 or vec.shape[0] != 6 * n or not np.isfinite(vec).all():
                raise ValueError(f"Constraints.build: vectors must be finite with shape ({6 * n}, k), got {vec.shape}")
            q = np.concatenate([q, vec], 1)
        free = np.ones((n, 1))
        if fixed is not None:
            fx = np.asarray(fixed)
            if fx.size and (not np.issubdtype(fx.dtype, np.integer) or fx.min() < 0 or fx.max() >= n):
                raise ValueError(f"Constraints.build: fixed must be sensor ids in 0..{n - 1}, got {fixed!r}")
            free[fx] = 0.0
        return cls(torch.from_numpy(_restricted_basis(q, free[:, 0] > 0)), torch.from_numpy(free), tuple(modes))

    def with_free(self, free: np.ndarray) -> Constraints:
        """The same constraints with only the sensors ``free`` (bool (N,)) free, the others fixed."""
        free = np.asarray(free, dtype=bool)
        if free.shape != (self.n_sensors,):
            raise ValueError(f"Constraints.with_free: free must be a bool mask of shape ({self.n_sensors},), "
                             f"got {free.shape}")
        q = _restricted_basis(self.q.numpy(), free)
        return Constraints(torch.from_numpy(q), torch.from_numpy(free.astype(np.float64)[:, None]), self.modes)

    @property
    def n_sensors(self) -> int:
        return int(self.free.shape[0])

    @property
    def n_constraints(self) -> int:
        """Number of independent constraint equations (mode constraints + 6 per fixed sensor)."""
        return int(self.q.shape[1]) + 6 * int((self.free[:, 0] == 0).sum())

    def project(self, delta: Tensor, metric_inv: Tensor | None = None) -> Tensor:
        """Projection of an update (N, 6) onto ``{Q^T d = 0, d_fixed = 0}``, orthogonal in the
        metric ``M`` given by its inverse blocks ``metric_inv`` (N, 6, 6) (or a diagonal (6,) or
        (N, 6)); Euclidean if None: ``d - M^-1 Q (Q^T M^-1 Q)^-1 Q^T d``. For a step
        ``-M^-1 g`` this is the constrained minimiser of ``g^T d + d^T M d / 2``. To project
        many updates in one metric, build the :meth:`projection` once."""
        return self.projection(metric_inv, delta.dtype)(delta)

    def projection(self, metric_inv: Tensor | None = None, dtype: torch.dtype = torch.float64) -> Projection:
        """:meth:`project` in the metric given by ``metric_inv`` as a callable, its metric-dependent
        part (``M^-1 Q`` and ``Q^T M^-1 Q``) computed here, once, in ``dtype``."""
        n = self.n_sensors
        free = self.free.to(dtype)
        if not self.q.shape[1]:
            return Projection(self, free, None, None, None)
        q = self.q.to(dtype)
        if metric_inv is None:
            mq = q
        else:
            shapes = ((n, 6, 6), (n, 6), (6,))
            if tuple(metric_inv.shape) not in shapes:
                raise ValueError(f"Constraints.projection: metric_inv must have shape {shapes[0]}, {shapes[1]} or "
                                 f"{shapes[2]}, got {tuple(metric_inv.shape)}")
            qb = q.reshape(n, 6, -1)
            if metric_inv.ndim == 3:
                mq = torch.einsum("nij,njm->nim", metric_inv.to(dtype), qb)
            else:
                mq = metric_inv.to(dtype).expand(n, 6)[..., None] * qb
            mq = (mq * free[:, :, None]).reshape(6 * n, -1)
        return Projection(self, free, q, mq, q.T @ mq)

    def matrix(self) -> np.ndarray:
        """All constraint directions as columns (6N, n_constraints): ``Q`` and the unit vectors of
        the fixed sensors' parameters."""
        n = self.n_sensors
        fixed_rows = np.nonzero(np.repeat(self.free[:, 0].numpy() == 0, 6))[0]
        e = np.zeros((6 * n, fixed_rows.size))
        e[fixed_rows, np.arange(fixed_rows.size)] = 1.0
        return np.concatenate([self.q.numpy(), e], 1)


@dataclass(frozen=True, eq=False)
class Projection:
    """:meth:`Constraints.project` in one metric (built by :meth:`Constraints.projection`): call
    it on updates (N, 6)."""

    constraints: Constraints
    free: Tensor  # (N, 1)
    q: Tensor | None  # (6N, m); None without mode constraints
    mq: Tensor | None  # (6N, m): M^-1 Q, zero on the fixed sensors
    small: Tensor | None  # (m, m): Q^T M^-1 Q

    def __call__(self, delta: Tensor) -> Tensor:
        n = self.constraints.n_sensors
        if tuple(delta.shape) != (n, 6):
            raise ValueError(f"Constraints.project: delta must have shape ({n}, 6), got {tuple(delta.shape)}")
        free = self.free.to(delta.dtype)
        d = delta * free
        if self.q is None or self.mq is None or self.small is None:
            return d
        q, mq, small = (t.to(delta.dtype) for t in (self.q, self.mq, self.small))
        flat = d.reshape(-1)
        flat = flat - mq @ torch.linalg.solve(small, q.T @ flat)
        return flat.reshape(n, 6) * free


# ------------------------------------------------------------------------------------------------
# Costs and gradients over batches


def _check_batches(batches: Sequence[TrackBatch], where: str) -> list[TrackBatch]:
    if isinstance(batches, TrackBatch):
        return [batches]
    out = list(batches)
    if not out:
        raise ValueError(f"{where}: batches must hold at least one TrackBatch")
    for i, b in enumerate(out):
        if not isinstance(b, TrackBatch):
            raise ValueError(f"{where}: batches[{i}] must be a TrackBatch, got {type(b).__name__}")
    return out


def _n_good_events(model: ITSAlignmentModel, batch: TrackBatch) -> int:
    ndf = model._ndf(batch.mask.sum(1))
    ev = torch.zeros(batch.n_events, dtype=torch.float64).index_add_(0, batch.event, ndf)
    return int((ev > 0).sum())


def batch_weights(model: ITSAlignmentModel, batches: Sequence[TrackBatch]) -> np.ndarray:
    """Weights ``N_b / N`` (events with nu > 0) so that ``C = sum_b w_b C_b`` is the cost of all
    batches together (the seed's mean over events)."""
    batches = _check_batches(batches, "batch_weights")
    n = np.array([_n_good_events(model, b) for b in batches], dtype=np.float64)
    if not n.sum() > 0:
        raise ValueError("batch_weights: no event with positive degrees of freedom in batches")
    return n / n.sum()


@torch.no_grad()
def total_cost(model: ITSAlignmentModel, batches: Sequence[TrackBatch]) -> float:
    """C over all ``batches`` at the model's current Theta."""
    batches = _check_batches(batches, "total_cost")
    w = batch_weights(model, batches)
    return float(sum(wb * float(model(b).cost) for wb, b in zip(w, batches) if wb > 0))


def theta_gradient(model: ITSAlignmentModel, batch: TrackBatch) -> tuple[float, Tensor]:
    """Cost and ``dC/dTheta = grad_Phi C . dPhi/dTheta`` (N, 6) at the model's current Theta.
    Only the sensors with a non-zero ``grad_Phi C`` (those with hits in ``batch``) are mapped
    (``model.theta_grad``, no Jacobian is formed); the other rows are zero."""
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.cost.backward()
    grad = model.phi.grad
    if grad is None:
        raise RuntimeError("theta_gradient: the model's phi received no gradient (is phi.requires_grad off?)")
    touched = torch.nonzero(grad.ne(0).any(1))[:, 0]
    g = model.theta_grad(grad, touched)
    model.zero_grad(set_to_none=True)
    return float(out.cost.detach()), g


def full_gradient(model: ITSAlignmentModel, batches: Sequence[TrackBatch]) -> tuple[float, Tensor]:
    """C and dC/dTheta (N, 6) over all ``batches`` (weighted by :func:`batch_weights`)."""
    batches = _check_batches(batches, "full_gradient")
    w = batch_weights(model, batches)
    cost, grad = 0.0, torch.zeros(model.n_sensors, 6, dtype=torch.float64)
    for wb, b in zip(w, batches):
        if wb == 0:  # no event with degrees of freedom
            continue
        c, g = theta_gradient(model, b)
        cost += wb * c
        grad += wb * g
    return cost, grad


def _hit_theta_derivatives(
    model: ITSAlignmentModel, batch: TrackBatch, res: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """Per hit, d(e)/dTheta and d(rz)/dTheta of its own sensor at fixed track parameters:
    (T, K, 6) each. Uses ``dg/dangle_a = (d a_R/d angle_a) a_R^T (g - a_T) = omega_a x (g - a_T)``
    (:func:`_rotation_axes`), ``dg/dtau = 1``."""
    theta = model.theta()
    glob = model.global_positions(batch, model.phi.detach())  # (T, K, 3)
    sid = batch.sensor
    rel = glob - theta[sid][..., 3:]  # (T, K, 3)
    axes = _rotation_axes(theta)[sid]  # (T, K, 3 angles, 3 xyz)
    dg = torch.linalg.cross(axes, rel[:, :, None, :].expand_as(axes), dim=-1)  # (T, K, 3 angles, 3 xyz)
    k = res["kappa"][:, None]
    c, s = res["cos"][:, None], res["sin"][:, None]
    x, y = res["x"], res["y"]
    de = torch.stack([2 * k * x + s, 2 * k * y - c, torch.zeros_like(x)], -1)  # (T, K, 3)
    _, dsdx, dsdy = _arc_length(x, y, {key: res[key] for key in ("cos", "sin", "delta", "kappa")})
    tl = res["tanl"][:, None]
    drz = torch.stack([-tl * dsdx, -tl * dsdy, torch.ones_like(x)], -1)
    ve = torch.cat([torch.einsum("tkai,tki->tka", dg, de), de], -1)  # (T, K, 6)
    vz = torch.cat([torch.einsum("tkai,tki->tka", dg, drz), drz], -1)
    return ve, vz


def _track_weight(model: ITSAlignmentModel, batch: TrackBatch, res: dict[str, Tensor], wb: float) -> Tensor:
    """c_t = dC/dchi2_t (T,) for a batch of weight ``wb`` in the total cost."""
    return wb * ITSAlignmentModel._event_scale(res["event_ndf"])[batch.event]


def _rotation_axes(theta: Tensor) -> Tensor:
    """Per sensor the axes (N, 3, 3) of ``(d a_R / d angle_a) a_R^T``, row a: a rotation matrix's
    derivative times its transpose is antisymmetric, ``[omega_a]_x``, so
    ``dg/d angle_a = omega_a x (g - a_T)``. For ``a_R = R_x(alpha) R_y(beta) R_z(gamma)``:
    ``omega_alpha = e_x``, ``omega_beta = R_x e_y``, ``omega_gamma = R_x R_y e_z``."""
    a, b = theta[:, 0], theta[:, 1]
    sa, ca, sb, cb = a.sin(), a.cos(), b.sin(), b.cos()
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, ca, sa], 1),
                        torch.stack([sb, -sa * cb, ca * cb], 1)], 1)


_TRIU = torch.triu_indices(6, 6)


@torch.no_grad()
def hessian_blocks(model: ITSAlignmentModel, batches: Iterable[TrackBatch] | TrackBatch) -> Tensor:
    """Per-sensor Gauss-Newton blocks (N, 6, 6) of C (all batches, :func:`batch_weights`) at the
    current Theta, without the track-fit projection: ``D = sum 2 c w v v^T = A^T W A``. Since
    ``P <= W``, ``D`` bounds the Gauss-Newton matrix ``H = A^T P A`` from above (``H <= D``), so
    the block-preconditioned step with 0 < eta < 2 converges.

    Computed per hit on the cost's fast layout (``ITSAlignmentModel.hit_derivatives``, the
    model's precision) in the factored form ``v = B_s u``: with ``d`` the residual's derivative
    w.r.t. the hit's global position (``e``: ``(2 kappa x + sin, 2 kappa y - cos, 0)``; ``rz``:
    ``(-tan(lambda) ds/dx, -tan(lambda) ds/dy, 1)``),
    ``u = ((g - a_T) x d, d)`` and ``B_s = diag(Omega_s, 1)`` (:func:`_rotation_axes`), so each
    sensor accumulates the 21 distinct products of ``u`` and is rotated once: the same blocks as
    the per-hit derivatives of :func:`_hit_theta_derivatives`."""
    batches = _check_batches(batches, "hessian_blocks")
    w = batch_weights(model, batches)
    n = model.n_sensors
    acc = torch.zeros(21, n, dtype=torch.float64)
    a_t = model.theta()[:, 3:].to(torch.float64)
    iu0, iu1 = _TRIU
    for wb, batch in zip(w, batches):
        model._check_batch(batch, "hessian_blocks")
        if wb == 0:
            continue
        for sid, g, d_e, d_z, w_e, w_z in model.hit_derivatives(batch):
            at = a_t.T.index_select(1, sid)  # (3, m)
            r = g - at  # g - a_T
            u_e, u_z = ([r[1] * d[2] - r[2] * d[1], r[2] * d[0] - r[0] * d[2], r[0] * d[1] - r[1] * d[0], *d]
                        for d in (d_e, d_z))
            w_e, w_z = w_e * float(wb), w_z * float(wb)
            for p, (i, j) in enumerate(zip(iu0.tolist(), iu1.tolist())):  # one row at a time: stays in cache
                prod = (u_z[i] * u_z[j]).mul_(w_z)
                if j != 5:  # d_e has no z component
                    prod.addcmul_(u_e[i] * u_e[j], w_e)
                acc[p].index_add_(0, sid, prod)
    full = torch.zeros(n, 6, 6, dtype=torch.float64)
    full[:, iu0, iu1] = acc.T
    full[:, iu1, iu0] = acc.T
    om = _rotation_axes(model.theta().to(torch.float64))  # B = diag(Omega, 1): rotate the angle rows / columns
    out = full.clone()
    out[:, :3, 3:] = om @ full[:, :3, 3:]
    out[:, 3:, :3] = out[:, :3, 3:].transpose(1, 2)
    out[:, :3, :3] = om @ full[:, :3, :3] @ om.transpose(1, 2)
    return 0.5 * (out + out.transpose(1, 2))  # symmetric to the last bit


def sgd_rates(blocks: Tensor, rot_share: float | None = None) -> tuple[float, float]:
    """Largest stable plain-SGD rates ``(lr_rot, lr_trans)`` for the blocks ``D`` of
    :func:`hessian_blocks`: with ``L = diag(lr)``, ``lambda_max(L^1/2 D_s L^1/2) = 1`` for the
    stiffest sensor, so ``lambda_max(L H) <= 1`` and a step of 1 is stable. The ratio
    ``lr_rot / lr_trans`` defaults to ``mean D_trans / mean D_rot`` (equal typical curvature)."""
    if blocks.ndim != 3 or tuple(blocks.shape[1:]) != (6, 6):
        raise ValueError(f"sgd_rates: blocks must have shape (N, 6, 6), got {tuple(blocks.shape)}")
    diag = blocks.diagonal(dim1=1, dim2=2)
    used = diag.sum(1) > 0
    if not bool(used.any()):
        raise ValueError("sgd_rates: blocks are all zero (no hits)")
    ratio = float(diag[used, 3:].mean() / diag[used, :3].mean()) if rot_share is None else float(rot_share)
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"sgd_rates: rot_share must be a positive finite ratio, got {rot_share!r}")
    s = torch.tensor([math.sqrt(ratio)] * 3 + [1.0] * 3, dtype=blocks.dtype)
    lam = torch.linalg.eigvalsh(s[:, None] * blocks[used] * s[None, :]).amax()
    lr_trans = 1.0 / float(lam)
    return ratio * lr_trans, lr_trans


# ------------------------------------------------------------------------------------------------
# Optimisers


@dataclass(frozen=True)
class OptimizerConfig:
    """Theta-space optimiser.

    Args:
        method: ``"sgd"`` (the seed's rule), ``"adam"`` (Kingma & Ba, per-parameter adaptive) or
            ``"gn"`` (SGD preconditioned by the per-sensor Gauss-Newton blocks of
            :func:`hessian_blocks`).
        lr_rot, lr_trans: learning rates for the angles and the translations (``"sgd"``,
            ``"adam"``). For ``"gn"`` only ``lr`` is used.
        lr: the dimensionless step eta of ``"gn"``, in (0, 2).
        betas, eps: Adam moments and denominator offset.
        damping: relative Levenberg damping of the GN blocks: times the mean diagonal per DoF over
            all sensors (``damping_scale="global"``) or Marquardt's, times each sensor's own
            diagonal (``"sensor"``: the same relative damping for a chip at 22 mm and one at
            390 mm, whose Theta-space curvatures differ by the lever arm squared).
    """

    method: Literal["sgd", "adam", "gn"] = "gn"
    lr_rot: float = 1.0
    lr_trans: float = 1.0
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-12
    damping: float = 1e-6
    damping_scale: Literal["global", "sensor"] = "global"

    def __post_init__(self) -> None:
        if self.method not in ("sgd", "adam", "gn"):
            raise ValueError(f"OptimizerConfig.method must be 'sgd', 'adam' or 'gn', got {self.method!r}")
        for name in ("lr_rot", "lr_trans", "lr"):
            val = getattr(self, name)
            if not (isinstance(val, (int, float)) and val > 0 and math.isfinite(val)):
                raise ValueError(f"OptimizerConfig.{name} must be a positive finite float, got {val!r}")
        if self.method == "gn" and not self.lr < 2:
            raise ValueError(f"OptimizerConfig.lr is the GN step and must be in (0, 2), got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimizerConfig.betas must be two values in [0, 1), got {self.betas}")
        if self.damping_scale not in ("global", "sensor"):
            raise ValueError(f"OptimizerConfig.damping_scale must be 'global' or 'sensor', got {self.damping_scale!r}")
        if not (self.eps > 0 and self.damping >= 0):
            raise ValueError(f"OptimizerConfig.eps must be > 0 and damping >= 0, got {self.eps}, {self.damping}")


@dataclass
class ThetaOptimizer:
    """Applies Theta updates from Theta gradients (state lives here, not in the model)."""

    config: OptimizerConfig
    constraints: Constraints
    blocks: Tensor | None = None  # (N, 6, 6) for "gn"
    step_count: int = 0
    _m: Tensor | None = field(default=None, repr=False)
    _v: Tensor | None = field(default=None, repr=False)
    _inv: Tensor | None = field(default=None, repr=False)
    # the constraint projection in the current metric ("gn": the blocks; "sgd": the rates)
    _proj: Projection | None = field(default=None, repr=False)
    _proj_rates: tuple[float, float, torch.dtype] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, OptimizerConfig):
            raise ValueError(f"ThetaOptimizer: config must be an OptimizerConfig, got {type(self.config).__name__}")
        if not isinstance(self.constraints, Constraints):
            raise ValueError(
                f"ThetaOptimizer: constraints must be a Constraints, got {type(self.constraints).__name__}"
            )
        if self.blocks is not None:
            self.set_blocks(self.blocks)

    def set_blocks(self, blocks: Tensor) -> None:
        """Install per-sensor GN blocks (N, 6, 6) (method ``"gn"``); sensors without hits get the
        damping only (and a gradient of zero, so they do not move)."""
        n = self.constraints.n_sensors
        if tuple(blocks.shape) != (n, 6, 6) or not bool(torch.isfinite(blocks).all()):
            raise ValueError(f"ThetaOptimizer.set_blocks: blocks must be finite with shape ({n}, 6, 6), "
                             f"got {tuple(blocks.shape)}")
        blocks = blocks.to(torch.float64)
        diag = blocks.diagonal(dim1=1, dim2=2)
        scale = diag.mean(0).clamp_min(1e-30)  # (6,) typical curvature per DoF
        if self.config.damping_scale == "sensor":  # Marquardt: each sensor's own diagonal
            reg = torch.diag_embed(self.config.damping * diag + 1e-12 * scale)
        else:
            reg = torch.diag_embed((self.config.damping * scale + 1e-30 * scale.max()).expand(n, 6))
        self._inv = torch.linalg.inv(blocks + reg)  # (N, 6, 6)
        self._proj = self.constraints.projection(self._inv)
        self._proj_rates = None
        self.blocks = blocks

    def _lr(self, dtype: torch.dtype) -> Tensor:
        cfg = self.config
        return torch.tensor([cfg.lr_rot] * 3 + [cfg.lr_trans] * 3, dtype=dtype)

    def step(self, theta: Tensor, grad: Tensor) -> Tensor:
        """One update: returns the new Theta (N, 6) (constraints applied)."""
        cfg = self.config
        n = self.constraints.n_sensors
        for name, val in (("theta", theta), ("grad", grad)):
            if tuple(val.shape) != (n, 6):
                raise ValueError(f"ThetaOptimizer.step: {name} must have shape ({n}, 6), got {tuple(val.shape)}")
        if not bool(torch.isfinite(grad).all()):
            raise ValueError("ThetaOptimizer.step: grad must be finite (found NaN or inf)")
        self.step_count += 1
        if cfg.method == "adam":
            lr = self._lr(theta.dtype)
            b1, b2 = cfg.betas
            self._m = (1 - b1) * grad if self._m is None else b1 * self._m + (1 - b1) * grad
            self._v = (1 - b2) * grad * grad if self._v is None else b2 * self._v + (1 - b2) * grad * grad
            mh = self._m / (1 - b1**self.step_count)
            vh = self._v / (1 - b2**self.step_count)
            metric_inv = lr / (vh.sqrt() + cfg.eps)  # (N, 6) diagonal metric of this step
            return theta + self.constraints.project(-metric_inv * mh, metric_inv)
        if cfg.method == "sgd":
            metric_inv = self._lr(theta.dtype)  # (6,)
            rates = (cfg.lr_rot, cfg.lr_trans, theta.dtype)
            if self._proj is None or self._proj_rates != rates:
                self._proj, self._proj_rates = self.constraints.projection(metric_inv, theta.dtype), rates
            delta = -metric_inv * grad
        else:
            if self._inv is None or self._proj is None:
                raise RuntimeError("ThetaOptimizer(method='gn') needs set_blocks(hessian_blocks(...)) first")
            delta = -cfg.lr * torch.einsum("nij,nj->ni", self._inv, grad)
        return theta + self._proj(delta)


def run_epoch(
    model: ITSAlignmentModel,
    optimizer: ThetaOptimizer,
    batches: Sequence[TrackBatch],
    *,
    full_batch: bool = False,
) -> float:
    """One pass over ``batches``: a step per batch (the seed's SGD on mini-batches), or with
    ``full_batch`` one step with the gradient of the total cost (:func:`full_gradient`).
    Updates the model in place; returns the cost averaged over the pass (before the steps)."""
    batches = _check_batches(batches, "run_epoch")
    if full_batch:
        cost, grad = full_gradient(model, batches)
        model.set_theta(optimizer.step(model.theta(), grad))
        return cost
    w = batch_weights(model, batches)
    cost = 0.0
    for wb, b in zip(w, batches):
        if wb == 0:  # no event with degrees of freedom
            continue
        c, g = theta_gradient(model, b)
        cost += float(wb) * c
        model.set_theta(optimizer.step(model.theta(), g))
    return cost


def weighted_average(thetas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Synchronisation (seed, "Scalable Training via Parallelization"):
    ``Theta = sum_m mu_m Theta_m / sum_m mu_m`` with ``mu_m`` the partition sizes (float64).
    Angles are averaged linearly, exact to first order for the small rotations of alignment."""
    thetas = list(thetas)
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64).reshape(-1))
    if not thetas:
        raise ValueError("weighted_average: thetas must hold at least one Theta")
    if len(thetas) != w.numel():
        raise ValueError(f"weighted_average: got {len(thetas)} thetas but {w.numel()} weights")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(
            f"weighted_average: weights must be finite and >= 0 with a positive sum, got {w.tolist()}"
        )
    shape = tuple(thetas[0].shape)
    for i, t in enumerate(thetas):
        if not isinstance(t, Tensor):
            raise ValueError(f"weighted_average: thetas[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape or len(shape) != 2 or shape[1] != 6:
            raise ValueError(f"weighted_average: thetas[{i}] has shape {tuple(t.shape)}, expected {shape} = (N, 6)")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"weighted_average: thetas[{i}] must be finite (found NaN or inf)")
    stack = torch.stack([t.to(torch.float64) for t in thetas])  # (M, N, 6)
    return torch.einsum("m,mnk->nk", w, stack) / w.sum()


# ------------------------------------------------------------------------------------------------
# Linearised global least squares (normal equations) and the reference solution


def local_basis(model: ITSAlignmentModel) -> Tensor:
    """Per sensor the linear map (N, 6, 6) from local deltas ``(rot_u, rot_v, rot_w, du, dv, dw)``
    (``misalignment.local_to_global``) to global Theta at Theta = 0: ``omega = R_G r``,
    ``a_T = R_G t + T_G x omega``."""
    rg = model.rot_geom
    tg = model.trans_geom
    n = rg.shape[0]
    cross = torch.zeros(n, 3, 3, dtype=rg.dtype)  # [T]_x: T x w = [T]_x w
    cross[:, 0, 1], cross[:, 0, 2] = -tg[:, 2], tg[:, 1]
    cross[:, 1, 0], cross[:, 1, 2] = tg[:, 2], -tg[:, 0]
    cross[:, 2, 0], cross[:, 2, 1] = -tg[:, 1], tg[:, 0]
    out = torch.zeros(n, 6, 6, dtype=rg.dtype)
    out[:, :3, :3] = rg
    out[:, 3:, :3] = cross @ rg
    out[:, 3:, 3:] = rg
    return out


def _projector(j: Tensor, w: Tensor) -> Tensor:
    """P = W - W J (J^T W J)^-1 J^T W per track: j (T, M, p), w (T, M)."""
    j = j / j.abs().amax(1, keepdim=True).clamp_min(1e-30)  # column scaling (P is invariant)
    wj = w[..., None] * j  # (T, M, p)
    m = j.transpose(1, 2) @ wj  # (T, p, p)
    return torch.diag_embed(w) - wj @ torch.linalg.solve(m, wj.transpose(1, 2))


def _projector_blocks(res: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """P for the xy (K hits + vertex) and z residuals: (T, K+1, K+1) each (vertex last)."""
    x, y = res["x"], res["y"]
    c, s = res["cos"][:, None], res["sin"][:, None]
    t = x.shape[0]
    zero = torch.zeros(t, 1, dtype=x.dtype)
    one = torch.ones(t, 1, dtype=x.dtype)
    jxy = torch.stack(
        [
            torch.cat([x * x + y * y, zero], 1),
            torch.cat([y * s + x * c, zero], 1),
            torch.cat([torch.ones_like(x), one], 1),
        ],
        -1,
    )  # (T, K+1, 3): d e / d(kappa, phi, delta); the vertex residual is delta
    wxy = torch.cat([res["w_xy"], res["wv_xy"][:, None]], 1)
    # (T, K+1, 2): d rz / d(z0, tan lambda); the vertex residual is -z0
    jz = torch.stack([-torch.cat([torch.ones_like(x), one], 1), -torch.cat([res["arc"], zero], 1)], -1)
    wz = torch.cat([res["w_z"], res["wv_z"][:, None]], 1)
    return _projector(jxy, wxy), _projector(jz, wz)


def noise_factors(model: ITSAlignmentModel, res: dict[str, Tensor], *, vertex_noise: bool = True
                  ) -> tuple[Tensor, Tensor]:
    """Factors ``F`` of the residuals' true noise covariance ``S = F F^T`` for the xy and z
    residuals of the evaluation ``res`` (``model._evaluate``): (T, K+1, K+1+L) in float64, the K
    hits, then the vertex (rows), and the columns: each hit's intrinsic error, the vertex's
    (``vertex_noise``: measured with the configured resolution; else exact, as a simulation's
    truth) and one multiple-scattering kick per layer ``l`` of the track, of the Highland width
    ``theta0_l``, that moves every hit further out by ``theta0_l (r - r_l)`` (times ``sec
    lambda`` across the track in xy, ``sec^2 lambda`` in z). The cost weighs each hit with the
    diagonal of ``S`` alone (``1/w``): one kick moves all later hits of the track coherently,
    which the diagonal leaves out and the errors (``P S P`` with the fit's projector) must not.
    Without multiple scattering ``S = W^-1`` (and ``P S P = P`` with the vertex's noise).
    Neglected: the correlation of a hit's xy and z residuals through its u error (the arc length
    it shifts, a small fraction of the z error at the incidence angles of barrel tracks)."""
    w_xy = res["w_xy"]
    t, k = w_xy.shape
    f64 = torch.float64
    hit = (w_xy > 0).to(f64)
    ms = "noise_ms_theta2" in res
    n_layers = int(model.layer_radius.shape[0]) if ms else 0
    out = []
    for plane, w, wv in (("xy", w_xy, res["wv_xy"]), ("z", res["w_z"], res["wv_z"])):
        f = torch.zeros(t, k + 1, k + 1 + n_layers, dtype=f64)
        sd = res["noise_var_int_" + plane].to(f64).clamp_min(0.0).sqrt() * hit
        f[:, :k, :k] = torch.diag_embed(sd)
        if vertex_noise:
            wv64 = wv.to(f64)
            f[:, k, k] = torch.where(wv64 > 0, wv64.clamp_min(1e-300).rsqrt(), torch.zeros_like(wv64))
        if ms:
            var = {key: res["noise_" + key] for key in ("sec2", "ms_layer", "ms_r", "ms_theta2", "var_int_" + plane)}
            f[:, :k, k + 1:] = model._kick_columns(var, hit, plane)[0]
        out.append(f)
    return out[0], out[1]


def _segment_sum(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique sorted ``keys`` and the sums of the ``values`` rows sharing each key."""
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    if not ks.size:
        return ks, values[:0]
    start = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    return ks[start], np.add.reduceat(values[order], start, axis=0)


def _pair_blocks(
    sid: Tensor, mask: Tensor, n: int, terms: Sequence[tuple[Tensor, Tensor]]
) -> tuple[np.ndarray, np.ndarray]:
    """Sensor-pair 6 x 6 blocks of ``sum_t A_t^T M_t A_t`` for the given ``(M, V)`` terms
    (``M`` (T, K, K) hit-space matrices, ``V`` (T, K, 6) residual derivatives): returns the
    sorted pair keys ``s_i * n + s_j`` (P,) and the summed blocks (P, 36)."""
    ti, i, j = (mask[:, :, None] & mask[:, None, :]).nonzero(as_tuple=True)
    blocks = sum(m[ti, i, j][:, None, None] * v[ti, i][:, :, None] * v[ti, j][:, None, :] for m, v in terms)
    keys = (sid[ti, i] * n + sid[ti, j]).numpy()
    return _segment_sum(keys, blocks.reshape(-1, 36).numpy())


def _reduce_pairs(keys: list[np.ndarray], blocks: list[np.ndarray], n: int) -> sp.csr_matrix:
    """Sum the pair blocks of all chunks into a sparse (6n, 6n) matrix (block-sparse build)."""
    if not keys:
        return sp.csr_matrix((6 * n, 6 * n))
    uk, acc = _segment_sum(np.concatenate(keys), np.concatenate(blocks))
    rows, cols = uk // n, uk % n
    indptr = np.searchsorted(rows, np.arange(n + 1))
    bsr = sp.bsr_matrix((acc.reshape(-1, 6, 6), cols, indptr), shape=(6 * n, 6 * n))
    return bsr.tocsr()


@dataclass
class NormalEquations:
    """The linearised problem at ``theta``: ``C(theta + d) ~ cost + grad . d + d^T H d / 2``.

    Attributes:
        theta: (N, 6) expansion point.
        cost: C at ``theta`` (all batches).
        grad: (6N,) dC/dTheta.
        hessian: (6N, 6N) Gauss-Newton matrix with the track parameters profiled out.
        grad_cov: (6N, 6N) covariance of ``grad`` from the hit (and vertex) noise.
    """

    theta: Tensor
    cost: float
    grad: np.ndarray
    hessian: sp.csr_matrix
    grad_cov: sp.csr_matrix


@torch.no_grad()
def normal_equations(
    model: ITSAlignmentModel,
    batches: Sequence[TrackBatch] | TrackBatch,
    *,
    vertex_noise: bool = False,
    covariance: bool = True,
    chunk_tracks: int = 2048,
) -> NormalEquations:
    """Normal equations of C at the model's Theta (vectorised over tracks, chunked).

    ``grad_cov`` (only with ``covariance``; else an empty matrix) takes the hits' noise of
    :func:`noise_factors` (intrinsic errors and multiple scattering correlated along each track)
    and, for the vertex term, an exact vertex (``vertex_noise=False``, e.g. simulation truth) or
    one measured with the configured resolution independently per track (``True``; the
    correlation between tracks of one event is neglected).
    """
    batches = _check_batches(batches, "normal_equations")
    if not (isinstance(chunk_tracks, int) and chunk_tracks >= 1):
        raise ValueError(f"normal_equations: chunk_tracks must be an integer >= 1, got {chunk_tracks!r}")
    w = batch_weights(model, batches)
    n = model.n_sensors
    hkeys: list[np.ndarray] = []
    hblocks: list[np.ndarray] = []
    vkeys: list[np.ndarray] = []
    vblocks: list[np.ndarray] = []
    grad = torch.zeros(n, 6, dtype=torch.float64)
    cost = 0.0
    for wb, batch in zip(w, batches):
        model._check_batch(batch, "normal_equations")
        if wb == 0:
            continue
        res_all = model._evaluate(batch, model.phi.detach(), need_grad=False)
        cost += float(wb) * float(res_all["cost"])
        scale_ev = ITSAlignmentModel._event_scale(res_all["event_ndf"])
        for idx in torch.arange(batch.n_tracks).split(chunk_tracks):
            sub = TrackBatch(batch.sensor[idx], batch.local[idx], batch.mask[idx], batch.event[idx],
                             batch.n_events, batch.vertex)
            res = model._evaluate(sub, model.phi.detach(), need_grad=True, scale_ev=scale_ev)
            ve, vz = _hit_theta_derivatives(model, sub, res)  # (T, K, 6)
            pxy, pz = _projector_blocks(res)  # (T, K+1, K+1)
            ct = float(wb) * scale_ev[sub.event]  # (T,) dC / dchi2_t
            k = sub.sensor.shape[1]
            c2 = (2.0 * ct)[:, None, None]
            kk, bb = _pair_blocks(sub.sensor, sub.mask, n, ((c2 * pxy[:, :k, :k], ve), (c2 * pz[:, :k, :k], vz)))
            hkeys.append(kk)
            hblocks.append(bb)
            gh = 2.0 * ct[:, None, None] * (
                (res["w_xy"] * res["e"])[..., None] * ve + (res["w_z"] * res["rz"])[..., None] * vz
            )  # gradient: 2 c (w e ve + w_z rz vz) per hit, accumulated per sensor
            grad.index_add_(0, sub.sensor.reshape(-1), (gh * sub.mask[..., None]).reshape(-1, 6))
            if not covariance:
                continue
            # covariance of the gradient: 4 c^2 A^T P S P A with S = F F^T the residuals' noise
            fxy, fz = (f.to(pxy.dtype) for f in noise_factors(model, res, vertex_noise=vertex_noise))
            pf_xy, pf_z = pxy @ fxy, pz @ fz
            psp_xy = pf_xy @ pf_xy.transpose(1, 2)
            psp_z = pf_z @ pf_z.transpose(1, 2)
            c4 = (4.0 * ct * ct)[:, None, None]
            kk, bb = _pair_blocks(sub.sensor, sub.mask, n, ((c4 * psp_xy[:, :k, :k], ve), (c4 * psp_z[:, :k, :k], vz)))
            vkeys.append(kk)
            vblocks.append(bb)
    hess = _reduce_pairs(hkeys, hblocks, n)
    gcov = _reduce_pairs(vkeys, vblocks, n)
    return NormalEquations(model.theta(), cost, grad.reshape(-1).numpy(), hess, gcov)


@dataclass
class ReferenceSolution:
    """Result of :func:`reference_solution`.

    Attributes:
        theta: (N, 6) the constrained minimum of C.
        cost: C at ``theta``.
        normal: the normal equations at ``theta`` (H, gradient covariance).
        constraints: the constraints used.
        n_iter: Gauss-Newton iterations done.
        last_step: max |dTheta| of the last iteration (rad and mm mixed).
    """

    theta: Tensor
    cost: float
    normal: NormalEquations
    constraints: Constraints
    n_iter: int
    last_step: float
    _kinv: np.ndarray | None = field(default=None, repr=False)
    _cov: np.ndarray | None = field(default=None, repr=False)

    def _kkt_inverse_block(self) -> np.ndarray:
        """K = Z (Z^T H Z)^-1 Z^T (6N, 6N), Z a basis of the constrained subspace (dense)."""
        if self._kinv is None:
            free = np.repeat(self.constraints.free[:, 0].numpy() > 0, 6)
            q = self.constraints.q.numpy()[free]
            h = self.normal.hessian[free][:, free].toarray()
            ds = 1.0 / np.sqrt(np.maximum(np.diag(h), 1e-300))  # unit-diagonal scaling
            h = h * ds[:, None] * ds[None, :]
            q = q * ds[:, None]
            q = q / np.linalg.norm(q, axis=0, keepdims=True).clip(1e-300)
            nf, m = h.shape[0], q.shape[1]
            kkt = np.block([[h, q], [q.T, np.zeros((m, m))]])
            rhs = np.zeros((nf + m, nf))
            rhs[:nf] = np.eye(nf)
            kf = np.linalg.solve(kkt, rhs)[:nf] * ds[:, None] * ds[None, :]
            k = np.zeros((free.size, free.size))
            k[np.ix_(free, free)] = 0.5 * (kf + kf.T)
            self._kinv = k
        return self._kinv

    def covariance(self) -> np.ndarray:
        """Statistical covariance of Theta (6N, 6N): ``K V K`` (dense; small geometries)."""
        if self._cov is None:
            k = self._kkt_inverse_block()
            self._cov = k @ (self.normal.grad_cov @ k)
        return self._cov

    def errors(self, model: ITSAlignmentModel, frame: Literal["local", "global"] = "local") -> np.ndarray:
        """Standard errors (N, 6): of the local deltas (rot_u, rot_v, rot_w, du, dv, dw) or of
        Theta (``"global"``). Only the per-sensor 6 x 6 blocks of ``K V K`` are formed."""
        if frame not in ("local", "global"):
            raise ValueError(f"ReferenceSolution.errors: frame must be 'local' or 'global', got {frame!r}")
        n = model.n_sensors
        if self._cov is not None:
            blocks = self._cov.reshape(n, 6, n, 6)[np.arange(n), :, np.arange(n), :]
        else:
            k = self._kkt_inverse_block()
            vk = np.asarray(self.normal.grad_cov @ k)  # (6N, 6N)
            blocks = np.einsum("sak,ksb->sab", k.reshape(n, 6, 6 * n), vk.reshape(6 * n, n, 6))
        if frame == "local":
            linv = torch.linalg.inv(local_basis(model)).numpy()  # (N, 6, 6)
            blocks = np.einsum("nij,njk,nlk->nil", linv, blocks, linv)
        return np.sqrt(np.clip(np.diagonal(blocks, axis1=1, axis2=2), 0, None))

    def expected(self, theta_true: np.ndarray | Tensor) -> np.ndarray:
        """The noise-free constrained fit of data generated with ``theta_true`` (N, 6), to first
        order: ``K H theta_true``. Equals ``theta_true`` for a truth inside the constrained
        subspace and removes its component along exactly blind constrained modes."""
        t = np.asarray(theta_true, dtype=np.float64)
        k = self._kkt_inverse_block()
        return (k @ (self.normal.hessian @ t.reshape(-1))).reshape(t.shape)


def _kkt_factor(hess: sp.csr_matrix, constraints: Constraints) -> tuple[spla.SuperLU, np.ndarray, np.ndarray]:
    """LU of the KKT matrix ``[[D H_ff D, D Q_f], [(D Q_f)^T, 0]]`` on the free parameters,
    scaled to unit diagonal by ``D`` (rotations and shifts have very different curvatures);
    returns it, the free-parameter mask and ``D``. Raises if it is singular."""
    free = np.repeat(constraints.free[:, 0].numpy() > 0, 6)
    q = constraints.q.numpy()[free]
    h = hess[free][:, free]
    diag = h.diagonal()
    dead = ~(diag > 0)
    if dead.any():
        raise ValueError(
            f"reference_solution: {int(dead.sum())} free parameters have no hits (zero curvature); "
            "fix those sensors (Constraints.build(fixed=...))"
        )
    ds = 1.0 / np.sqrt(diag)
    hsc = sp.diags(ds) @ h @ sp.diags(ds)
    qs = sp.csr_matrix(q * ds[:, None])
    kkt = sp.bmat([[hsc, qs], [qs.T, None]], format="csc")
    msg = "reference_solution: the normal matrix with the constraints is singular; constrain the blind modes"
    try:
        lu = spla.splu(kkt)
    except RuntimeError as exc:  # exactly singular
        raise ValueError(f"{msg} (see weak_mode_analysis): {exc}") from exc
    pivots = np.abs(lu.U.diagonal())
    if not pivots.min() > 1e-12 * pivots.max():  # numerically singular (unit-diagonal scaling)
        raise ValueError(f"{msg} (see weak_mode_analysis): smallest LU pivot {pivots.min():.1e}")
    return lu, free, ds


@torch.no_grad()
def reference_solution(
    model: ITSAlignmentModel,
    batches: Sequence[TrackBatch] | TrackBatch,
    constraints: Constraints,
    *,
    n_iter: int = 5,
    tol: float = 1e-8,
    vertex_noise: bool = False,
    covariance: bool = True,
) -> ReferenceSolution:
    """Minimise C over Theta by Gauss-Newton on the linearised global least-squares problem,
    solved directly each iteration (sparse KKT system with the constraints, LU), imposing
    ``Q^T Theta = 0`` and the fixed sensors at 0 whatever the starting point. Stops after
    ``n_iter`` iterations or when max |dTheta| < ``tol``. Sets the model to the solution. With
    ``covariance`` the final normal equations carry the gradient covariance (for
    :meth:`ReferenceSolution.covariance` and ``errors``). For small geometries (the covariance
    is dense). Raises a ValueError when the constrained
    system is singular (see :func:`weak_mode_analysis` for nearly blind modes)."""
    batches = _check_batches(batches, "reference_solution")
    if not isinstance(constraints, Constraints) or constraints.n_sensors != model.n_sensors:
        raise ValueError(f"reference_solution: constraints must be a Constraints for {model.n_sensors} sensors")
    if not (isinstance(n_iter, int) and n_iter >= 1):
        raise ValueError(f"reference_solution: n_iter must be an integer >= 1, got {n_iter!r}")
    n = model.n_sensors
    q = constraints.q.numpy()
    free = np.repeat(constraints.free[:, 0].numpy() > 0, 6)
    # start on the constraint surface
    th = model.theta().reshape(-1).numpy().copy()
    th[~free] = 0.0
    th = th - q @ (q.T @ th)
    model.set_theta(torch.from_numpy(th.reshape(n, 6)))
    step = math.inf
    it = 0
    while True:
        final = it == n_iter or step < tol
        ne = normal_equations(model, batches, vertex_noise=vertex_noise, covariance=final and covariance)
        if final:
            break
        it += 1
        lu, free, ds = _kkt_factor(ne.hessian, constraints)
        nf = int(free.sum())
        sol = lu.solve(np.concatenate([-ne.grad[free] * ds, np.zeros(q.shape[1])]))
        if not np.isfinite(sol).all():
            raise ValueError("reference_solution: the constrained normal equations have no finite solution")
        sol[:nf] *= ds
        chk = ne.hessian[free][:, free] @ sol[:nf] + q[free] @ sol[nf:] + ne.grad[free]
        if np.linalg.norm(chk) > 1e-6 * max(np.linalg.norm(ne.grad[free]), 1e-300):
            raise ValueError("reference_solution: the constrained normal matrix is numerically singular; constrain "
                             "the blind modes (see weak_mode_analysis)")
        delta = np.zeros(6 * n)
        delta[free] = sol[:nf]
        model.set_theta(torch.from_numpy((th + delta).reshape(n, 6)))
        th = model.theta().reshape(-1).numpy().copy()
        step = float(np.abs(delta).max())
    return ReferenceSolution(model.theta(), ne.cost, ne, constraints, it, step)


# ------------------------------------------------------------------------------------------------
# Weak modes


@dataclass
class WeakModeReport:
    """Result of :func:`weak_mode_analysis`.

    Attributes:
        eigenvalues: (k,) smallest eigenvalues of the scaled normal matrix (ascending).
        eigenvectors: (6N, k) their eigenvectors, mapped back to Theta (unit Euclidean norm).
        stiffness: per mode ``m^T H m / m^T diag_loc(H) m`` (0: blind, ~1: as stiff as single
            parameters), computed in the scaled local basis.
        overlap: per mode, the fraction of its (scaled) norm in the span of the eigenvectors with
            eigenvalue below ``threshold``.
        threshold: the near-null eigenvalue threshold used.
        n_null: number of eigenvalues below ``threshold``.
        constrained_min: smallest eigenvalue of the scaled normal matrix restricted to the
            subspace allowed by the constraints (> 0: unique solution); None without constraints.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    stiffness: dict[str, float]
    overlap: dict[str, float]
    threshold: float
    n_null: int
    constrained_min: float | None = None

    def weak(self, max_stiffness: float) -> tuple[str, ...]:
        """Modes with stiffness below ``max_stiffness``."""
        return tuple(m for m, s in self.stiffness.items() if s < max_stiffness)


@dataclass
class _Scaled:
    """``H`` in the local per-sensor basis scaled to unit diagonal: ``hs = S L^T H L S`` on the
    parameters with curvature (``used``); ``lmat`` = L (6N, 6N), ``s`` the scales."""

    hs: np.ndarray
    s: np.ndarray
    used: np.ndarray
    lmat: sp.csr_matrix
    lb: np.ndarray


def _scaled(model: ITSAlignmentModel, hessian: sp.spmatrix | NormalEquations | ReferenceSolution,
            where: str) -> _Scaled:
    if isinstance(hessian, ReferenceSolution):
        hessian = hessian.normal.hessian
    if isinstance(hessian, NormalEquations):
        hessian = hessian.hessian
    nn6 = 6 * model.n_sensors
    if not sp.issparse(hessian) or hessian.shape != (nn6, nn6):
        shape = getattr(hessian, "shape", None)
        raise ValueError(f"{where}: hessian must be a sparse ({nn6}, {nn6}) matrix, got {shape}")
    lb = local_basis(model).numpy()
    lmat = _block_diag(lb)
    hl = (lmat.T @ hessian @ lmat).toarray()
    d = np.diag(hl).copy()
    used = d > 0
    s = np.zeros(nn6)
    s[used] = 1.0 / np.sqrt(d[used])
    hs = (hl * s[:, None] * s[None, :])[np.ix_(used, used)]
    return _Scaled(0.5 * (hs + hs.T), s, used, lmat, lb)


def _constrained_min(sc: _Scaled, constraints: Constraints) -> float:
    """Smallest eigenvalue of ``hs`` on the subspace allowed by ``constraints``: the fixed
    sensors' parameters are dropped, ``Q^T Theta = 0`` becomes ``(S L^T Q)^T y = 0`` in the
    scaled local coordinates ``y``."""
    keep = np.repeat(constraints.free[:, 0].numpy() > 0, 6)[sc.used]
    hs = sc.hs[np.ix_(keep, keep)]
    q = constraints.q.numpy()
    if q.shape[1]:
        a = np.asarray(sc.lmat.T @ q)[sc.used][keep] * sc.s[sc.used][keep][:, None]
        z = sla.null_space(a.T, rcond=1e-10)
        hs = z.T @ hs @ z
    if not hs.shape[0]:
        return math.inf
    return float(_smallest_eigh(hs, 1)[0][0])


def _smallest_eigh(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest eigenpairs of a symmetric positive semi-definite matrix (ascending):
    shift-invert Lanczos about a small negative shift (the matrix is scaled to unit diagonal),
    dense for small matrices or large ``k``."""
    n = a.shape[0]
    if n <= 200 or k > n // 10:
        return sla.eigh(a, subset_by_index=[0, k - 1])
    w, v = spla.eigsh(a, k=k, sigma=-1e-3, which="LM", tol=0.0)
    order = np.argsort(w)
    return w[order], v[:, order]


def constrained_stiffness(
    model: ITSAlignmentModel, hessian: sp.spmatrix | NormalEquations | ReferenceSolution, constraints: Constraints
) -> float:
    """Smallest eigenvalue of the scaled normal matrix (see :func:`weak_mode_analysis`) on the
    subspace allowed by ``constraints``: > 0 means the constrained problem has a unique
    solution; its size says how weak the weakest remaining direction is (relative to a single
    parameter). Dense, small geometries."""
    if not isinstance(constraints, Constraints) or constraints.n_sensors != model.n_sensors:
        raise ValueError(f"constrained_stiffness: constraints must be a Constraints for {model.n_sensors} sensors")
    return _constrained_min(_scaled(model, hessian, "constrained_stiffness"), constraints)


def weak_mode_analysis(
    model: ITSAlignmentModel,
    geom: ITSGeometry,
    hessian: sp.spmatrix | NormalEquations | ReferenceSolution,
    *,
    modes: Sequence[str] = WEAK_MODES + RIGID_MODES,
    extra: Mapping[str, np.ndarray] | None = None,
    n_eig: int = 40,
    threshold: float = 1e-6,
    constraints: Constraints | None = None,
) -> WeakModeReport:
    """Near-null space of the normal matrix ``H`` (dense eigen-decomposition, small geometries).

    ``H`` is expressed in the local per-sensor basis (:func:`local_basis`: rotations about the
    chip centre, shifts along u, v, w) and scaled to unit diagonal, so that the eigenvalues are
    relative to single-parameter curvatures and do not depend on units or on the global Theta
    parameterisation (whose rotation about z and r-phi shift are nearly collinear for one chip).
    Sensors without hits are left out. Only the ``n_eig`` smallest eigenvalues are computed
    (``n_null`` counts those below ``threshold``). ``modes`` are names of
    ``misalignment.weak_mode``; ``extra`` adds named displacement fields given as Theta
    vectors (N, 6) or (6N,). With ``constraints`` (default: those of a
    :class:`ReferenceSolution`) also :func:`constrained_stiffness`."""
    if isinstance(hessian, ReferenceSolution) and constraints is None:
        constraints = hessian.constraints
    if geom.n_sensors != model.n_sensors:
        raise ValueError(f"weak_mode_analysis: geom has {geom.n_sensors} sensors, the model {model.n_sensors}")
    if not (isinstance(n_eig, int) and n_eig >= 1):
        raise ValueError(f"weak_mode_analysis: n_eig must be an integer >= 1, got {n_eig!r}")
    sc = _scaled(model, hessian, "weak_mode_analysis")
    hs, s, used = sc.hs, sc.s, sc.used
    k = min(n_eig, hs.shape[0])
    evals, evecs = _smallest_eigh(hs, k)
    vec_l = np.zeros((6 * model.n_sensors, k))
    vec_l[used] = evecs * s[used, None]  # back to local deltas
    vec_t = sc.lmat @ vec_l  # to Theta
    vec_t /= np.linalg.norm(vec_t, axis=0, keepdims=True).clip(1e-300)
    null = evecs[:, evals < threshold]
    linv = _block_diag(np.linalg.inv(sc.lb))
    fields: dict[str, np.ndarray] = {}
    for name in modes:
        mvec = mode_vectors(geom, (name,))
        if mvec.shape[1]:
            fields[name] = mvec[:, 0]
    for name, vec in (extra or {}).items():
        arr = np.asarray(vec, dtype=np.float64).reshape(-1)
        if arr.size != 6 * model.n_sensors or not np.isfinite(arr).all():
            raise ValueError(f"weak_mode_analysis: extra[{name!r}] must be a finite Theta of {model.n_sensors} x 6")
        fields[name] = arr
    stiff: dict[str, float] = {}
    overlap: dict[str, float] = {}
    for name, vec in fields.items():
        ml = linv @ vec
        y = (ml / np.where(used, s, 1.0))[used]  # scaled coordinates: y = D^1/2 m_loc
        yy = float(y @ y)
        if yy <= 0:
            continue
        stiff[name] = float(y @ hs @ y) / yy
        overlap[name] = float(np.sum((null.T @ y) ** 2)) / yy
    cmin = _constrained_min(sc, constraints) if constraints is not None else None
    return WeakModeReport(evals, vec_t, stiff, overlap, threshold, int((evals < threshold).sum()), cmin)


def _block_diag(blocks: np.ndarray) -> sp.csr_matrix:
    """Block-diagonal sparse matrix from (N, 6, 6) blocks (vectorised)."""
    n = blocks.shape[0]
    base = 6 * np.arange(n)[:, None, None]
    rows = np.broadcast_to(base + np.arange(6)[None, :, None], blocks.shape)
    cols = np.broadcast_to(base + np.arange(6)[None, None, :], blocks.shape)
    return sp.csr_matrix((blocks.reshape(-1), (rows.reshape(-1), cols.reshape(-1))), shape=(6 * n, 6 * n))


# ------------------------------------------------------------------------------------------------
# Evaluation


def measurement_residuals(
    geom: ITSGeometry, theta_fit: np.ndarray, theta_true: np.ndarray, constraints: Constraints | None = None
) -> dict[str, np.ndarray]:
    """Fitted minus true misalignment in each sensor's frame: shifts of the chip centre along u
    and v (its measurement directions) and w, and rotations about u, v, w (N each). If
    ``constraints`` is given, the truth's component along the constrained modes (which the data
    cannot determine) is removed first (fixed sensors are not accounted for)."""
    truth = np.asarray(theta_true, dtype=np.float64)
    if constraints is not None and constraints.q.shape[1]:
        q = constraints.q.numpy()
        flat = truth.reshape(-1)
        truth = (flat - q @ (q.T @ flat)).reshape(truth.shape)
    lf = global_to_local(geom, np.asarray(theta_fit, dtype=np.float64))
    lt = global_to_local(geom, truth)
    d = lf - lt
    return {"du": d[:, 3], "dv": d[:, 4], "dw": d[:, 5], "rot_u": d[:, 0], "rot_v": d[:, 1], "rot_w": d[:, 2]}
