"""Alignment steps on the ITS2 chi^2 cost: input checks, SGD (seed), Adam, block Gauss-Newton,
weighted averaging, weak-mode constraints and a sparse least-squares reference solution.

The functions here are what a worker calls; they know nothing of Ray or transport.

Update rule (seed, "The optimization step at iteration t")::

    Theta(t+1) = Theta(t) - eta * (grad_Phi C(Theta) . dPhi/dTheta)

The gradient is computed in Phi-space (``ITSAlignmentModel``), mapped to Theta with the analytic
Jacobian, the update is applied to Theta (so every a_R stays a rotation) and mapped back to Phi.

Weak modes. With tracks alone the chi^2 is exactly invariant under a global rigid-body motion
(3 translations, 3 rotations) and, for sensors small compared with their radius, under a global
scaling (radial + z expansion). It is only weakly sensitive to modes that map helices to helices
of another momentum or dip: curl (dphi ~ R, charge-antisymmetric sagitta), telescope (dz ~ R),
twist (dphi ~ z). The vertex term (an event vertex measured independently) fixes translations
and the modes that displace the vertex (clamshell, skew, elliptical partly); a vertex *fitted
from the same tracks* fixes nothing global. :class:`Constraints` removes chosen modes explicitly
(``Q^T Theta = 0``, as Millepede's linear constraints) and/or fixes reference sensors.

Reference solution. :func:`reference_solution` builds the linearised global least-squares problem
``H dTheta = -g`` with ``H = sum_tracks 2 a_t A^T P A``, ``P = W - W J (J^T W J)^-1 J^T W`` (track
parameters profiled out), and solves it with the constraints via a sparse KKT system
(``scipy.sparse.linalg.spsolve``), iterating the linearisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from streamcal.detectors.its.geometry import ITSGeometry
from streamcal.detectors.its.misalignment import global_to_local, mode_vectors
from streamcal.models.its_alignment import ITSAlignmentModel, TrackBatch, euler_derivatives

__all__ = [
    "RejectCounts",
    "pack_tracks",
    "Constraints",
    "OptimizerConfig",
    "ThetaOptimizer",
    "theta_gradient",
    "hessian_blocks",
    "weighted_average",
    "reference_solution",
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
    tracks_used: int = 0
    events_used: int = 0

    def __add__(self, other: RejectCounts) -> RejectCounts:
        return RejectCounts(**{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__})

    @property
    def hits_rejected(self) -> int:
        return self.hits_unknown_sensor + self.hits_nan + self.hits_outside_sensor + self.hits_duplicate_sensor


def pack_tracks(
    hits: pa.RecordBatch | pa.Table | dict[str, np.ndarray],
    geom: ITSGeometry,
    *,
    min_hits: int = 4,
    max_hits: int = 16,
    tolerance: float = 0.05,
    with_vertex: bool = True,
) -> tuple[TrackBatch, RejectCounts]:
    """Validate hit rows and pad them into a :class:`TrackBatch`.

    Rejected and counted: hits on unknown sensor ids (outside ``0 .. N-1``), hits with NaN or
    infinite local coordinates, hits outside the active area by more than ``tolerance`` (mm), a
    second hit of the same track on the same sensor; then tracks with fewer than ``min_hits`` (or
    more than ``max_hits``) valid hits. Needs columns ``event``, ``track``, ``sensor``, ``u``, ``v``
    (and ``vx``, ``vy``, ``vz`` when ``with_vertex``).
    """
    if min_hits < 3:
        raise ValueError(f"pack_tracks: min_hits must be >= 3 (5 track parameters), got {min_hits}")
    if max_hits < min_hits:
        raise ValueError(f"pack_tracks: max_hits must be >= min_hits, got {max_hits} < {min_hits}")

    def col(name: str) -> np.ndarray:
        if isinstance(hits, dict):
            return np.asarray(hits[name])
        return hits.column(name).to_numpy(zero_copy_only=False)

    event = col("event").astype(np.int64)
    track = col("track").astype(np.int64)
    sensor = col("sensor").astype(np.int64)
    u = col("u").astype(np.float64)
    v = col("v").astype(np.float64)
    cnt = RejectCounts(hits_in=int(event.size))
    bad_sensor = (sensor < 0) | (sensor >= geom.n_sensors)
    bad_nan = ~(np.isfinite(u) & np.isfinite(v)) & ~bad_sensor
    outside = ~bad_sensor & ~bad_nan & (
        (np.abs(u) > geom.half_u + tolerance) | (np.abs(v) > geom.half_v + tolerance)
    )
    cnt.hits_unknown_sensor = int(bad_sensor.sum())
    cnt.hits_nan = int(bad_nan.sum())
    cnt.hits_outside_sensor = int(outside.sum())
    # tracks are (event, track) pairs, counted before any hit is dropped
    order = np.lexsort((geom.layer[np.clip(sensor, 0, geom.n_sensors - 1)], track, event))
    ev_s, tr_s = event[order], track[order]
    new_trk = np.ones(order.size, dtype=bool)
    new_trk[1:] = (ev_s[1:] != ev_s[:-1]) | (tr_s[1:] != tr_s[:-1])
    tid_sorted = np.cumsum(new_trk) - 1
    cnt.tracks_in = int(new_trk.sum())
    keep_sorted = ~(bad_sensor | bad_nan | outside)[order]
    # duplicate sensor within a track
    s_sorted = sensor[order]
    key = tid_sorted * (geom.n_sensors + 1) + np.where(keep_sorted, s_sorted, geom.n_sensors)
    _, first = np.unique(key, return_index=True)
    dup = np.ones(order.size, dtype=bool)
    dup[first] = False
    dup &= keep_sorted
    cnt.hits_duplicate_sensor = int(dup.sum())
    keep_sorted &= ~dup
    nvalid = np.bincount(tid_sorted, weights=keep_sorted, minlength=cnt.tracks_in).astype(np.int64)
    good_trk = (nvalid >= min_hits) & (nvalid <= max_hits)
    cnt.tracks_too_few_hits = int((~good_trk).sum())
    sel = keep_sorted & good_trk[tid_sorted]
    idx = order[sel]
    tid = tid_sorted[sel]
    # renumber tracks and events densely
    utid, tdense = np.unique(tid, return_inverse=True)
    n_t = utid.size
    starts = np.searchsorted(tdense, np.arange(n_t))
    pos = np.arange(tdense.size) - starts[tdense]
    k = int(nvalid[good_trk].max()) if n_t else min_hits
    trk_event = event[idx][starts] if n_t else np.zeros(0, dtype=np.int64)
    uev, edense = np.unique(trk_event, return_inverse=True)
    cnt.tracks_used = int(n_t)
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
        vx = np.stack([col("vx"), col("vy"), col("vz")], 1).astype(np.float64)[idx][starts]  # (T, 3)
        vertex_ev = np.zeros((uev.size, 3))
        vertex_ev[edense] = vx
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


# ------------------------------------------------------------------------------------------------
# Constraints (weak modes, reference sensors)


@dataclass
class Constraints:
    """Linear constraints on Theta: ``Q^T Theta = 0`` for the ``modes`` (orthonormal basis ``Q``)
    and ``Theta_s = 0`` for the ``fixed`` sensors. Build with :meth:`build`."""

    q: Tensor  # (6N, m)
    free: Tensor  # (N, 1) 1.0 for free sensors, 0.0 for fixed ones
    modes: tuple[str, ...] = ()

    @classmethod
    def build(cls, geom: ITSGeometry, modes: Sequence[str] = (), fixed: np.ndarray | None = None) -> Constraints:
        q = mode_vectors(geom, tuple(modes))
        free = np.ones((geom.n_sensors, 1))
        if fixed is not None:
            free[np.asarray(fixed)] = 0.0
            # restrict modes to the free sensors and re-orthonormalise
            qf = q * np.repeat(free[:, 0], 6)[:, None]
            if qf.shape[1]:
                qq, r = np.linalg.qr(qf)
                q = qq[:, np.abs(np.diag(r)) > 1e-9]
        return cls(torch.from_numpy(q), torch.from_numpy(free), tuple(modes))

    def project(self, delta: Tensor) -> Tensor:
        """Euclidean projection of an update (N, 6) onto the constraint surface."""
        d = delta * self.free
        if self.q.shape[1]:
            flat = d.reshape(-1)
            flat = flat - self.q @ (self.q.T @ flat)
            d = flat.reshape(delta.shape)
        return d

    def project_metric(self, delta: Tensor, precond_q: Tensor, small: Tensor) -> Tensor:
        """Projection in the metric of a block preconditioner ``D``: ``d - D^-1 Q (Q^T D^-1 Q)^-1
        Q^T d`` with ``precond_q = D^-1 Q`` (6N, m) and ``small = Q^T D^-1 Q`` (m, m)."""
        d = delta * self.free
        if self.q.shape[1]:
            flat = d.reshape(-1)
            flat = flat - precond_q @ torch.linalg.solve(small, self.q.T @ flat)
            d = flat.reshape(delta.shape) * self.free
        return d


# ------------------------------------------------------------------------------------------------
# Gradients, Hessian blocks, optimisers


def theta_gradient(model: ITSAlignmentModel, batch: TrackBatch) -> tuple[float, Tensor]:
    """Cost and ``dC/dTheta = grad_Phi C . dPhi/dTheta`` (N, 6) at the model's current Theta."""
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.cost.backward()
    assert model.phi.grad is not None
    jac = model.jacobian()  # (N, 9, 6)
    g = torch.einsum("npk,np->nk", jac, model.phi.grad)
    return float(out.cost.detach()), g


def _hit_theta_derivatives(model: ITSAlignmentModel, batch: TrackBatch, res: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per hit, d(e)/dTheta and d(rz)/dTheta of its own sensor at fixed track parameters:
    (T, K, 6) each. Uses ``dg/dangle = (d a_R/d angle) a_R^T (g - a_T)``, ``dg/dtau = 1``."""
    theta = model.theta()
    glob = model.global_positions(batch, model.phi.detach())  # (T, K, 3)
    d_ar = euler_derivatives(theta[:, :3])  # (N, 3, 3, 3)
    from streamcal.models.its_alignment import euler_to_matrix

    a_r = euler_to_matrix(theta[:, :3])
    gen = d_ar @ a_r[:, None].transpose(-1, -2)  # (N, 3, 3, 3)
    sid = batch.sensor
    rel = glob - theta[sid][..., 3:]  # (T, K, 3)
    dg = torch.einsum("tkaij,tkj->tkai", gen[sid], rel)  # (T, K, 3 angles, 3 xyz)
    k = res["kappa"][:, None]
    c, s = res["cos"][:, None], res["sin"][:, None]
    x, y = res["x"], res["y"]
    de = torch.stack([2 * k * x + s, 2 * k * y - c, torch.zeros_like(x)], -1)  # (T, K, 3)
    _, dsdx, dsdy = _arc_derivs(res)
    tl = res["tanl"][:, None]
    drz = torch.stack([-tl * dsdx, -tl * dsdy, torch.ones_like(x)], -1)
    ve = torch.cat([torch.einsum("tkai,tki->tka", dg, de), de], -1)  # (T, K, 6)
    vz = torch.cat([torch.einsum("tkai,tki->tka", dg, drz), drz], -1)
    return ve, vz


def _arc_derivs(res: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    from streamcal.models.its_alignment import _arc_length

    return _arc_length(res["x"], res["y"], {k: res[k] for k in ("cos", "sin", "delta", "kappa")})


@torch.no_grad()
def hessian_blocks(model: ITSAlignmentModel, batches: Iterable[TrackBatch]) -> Tensor:
    """Per-sensor Gauss-Newton blocks (N, 6, 6) of C at the current Theta, without the track-fit
    projection (``sum 2 a w v v^T``): an upper bound of the block diagonal of the full Hessian,
    so the block-preconditioned step with eta <= 1 never overshoots."""
    n = model.n_sensors
    acc = torch.zeros(n, 36, dtype=torch.float64)
    for batch in batches:
        res = model._evaluate(batch, model.phi.detach(), need_grad=True)
        ve, vz = _hit_theta_derivatives(model, batch, res)
        ev_scale = ITSAlignmentModel._event_scale(res["event_ndf"])
        a = ev_scale[batch.event][:, None]  # (T, 1)
        wxy, wz = 2 * a * res["w_xy"], 2 * a * res["w_z"]
        outer = wxy[..., None, None] * ve[..., :, None] * ve[..., None, :] + wz[..., None, None] * vz[
            ..., :, None
        ] * vz[..., None, :]  # (T, K, 6, 6)
        acc.index_add_(0, batch.sensor.reshape(-1), outer.reshape(-1, 36))
    return acc.reshape(n, 6, 6)


@dataclass(frozen=True)
class OptimizerConfig:
    """Theta-space optimiser.

    Args:
        method: ``"sgd"`` (the seed's rule), ``"adam"`` (Kingma & Ba, per-DoF adaptive) or
            ``"gn"`` (SGD preconditioned by the per-sensor Gauss-Newton blocks of
            :func:`hessian_blocks`).
        lr_rot, lr_trans: learning rates for the angles and the translations (SGD, Adam). For
            ``"gn"`` ``lr_rot`` is the (dimensionless) step eta in (0, 2).
        betas, eps: Adam moments.
        damping: relative Levenberg damping of the GN blocks.
    """

    method: Literal["sgd", "adam", "gn"] = "gn"
    lr_rot: float = 1.0
    lr_trans: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-12
    damping: float = 1e-6

    def __post_init__(self) -> None:
        if self.method not in ("sgd", "adam", "gn"):
            raise ValueError(f"OptimizerConfig.method must be 'sgd', 'adam' or 'gn', got {self.method!r}")
        if not (self.lr_rot > 0 and self.lr_trans > 0):
            raise ValueError("OptimizerConfig.lr_rot and lr_trans must be > 0")
        if self.method == "gn" and not self.lr_rot < 2:
            raise ValueError(f"OptimizerConfig.lr_rot is the GN step and must be in (0, 2), got {self.lr_rot}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimizerConfig.betas must be in [0, 1), got {self.betas}")


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
    _dq: Tensor | None = field(default=None, repr=False)
    _small: Tensor | None = field(default=None, repr=False)

    def set_blocks(self, blocks: Tensor) -> None:
        """Install per-sensor GN blocks (N, 6, 6) (method ``"gn"``)."""
        n = blocks.shape[0]
        diag = blocks.diagonal(dim1=1, dim2=2)
        scale = diag.mean(0).clamp_min(1e-30)  # (6,) typical curvature per DoF
        reg = torch.diag_embed(self.config.damping * scale.expand(n, 6) + 1e-300)
        self._inv = torch.linalg.inv(blocks + reg)  # (N, 6, 6)
        q = self.constraints.q
        if q.shape[1]:
            dq = torch.einsum("nij,njm->nim", self._inv, q.reshape(n, 6, -1))  # (N, 6, m)
            dq = dq * self.constraints.free[:, :, None]
            self._dq = dq.reshape(6 * n, -1)
            self._small = q.T @ self._dq
        self.blocks = blocks

    def step(self, theta: Tensor, grad: Tensor) -> Tensor:
        """One update: returns the new Theta (N, 6) (constraints applied)."""
        cfg = self.config
        self.step_count += 1
        lr = torch.tensor([cfg.lr_rot] * 3 + [cfg.lr_trans] * 3, dtype=theta.dtype)
        if cfg.method == "sgd":
            delta = -lr * grad
            return theta + self.constraints.project(delta)
        if cfg.method == "adam":
            b1, b2 = cfg.betas
            self._m = (1 - b1) * grad if self._m is None else b1 * self._m + (1 - b1) * grad
            self._v = (1 - b2) * grad * grad if self._v is None else b2 * self._v + (1 - b2) * grad * grad
            mh = self._m / (1 - b1**self.step_count)
            vh = self._v / (1 - b2**self.step_count)
            delta = -lr * mh / (vh.sqrt() + cfg.eps)
            return theta + self.constraints.project(delta)
        if self._inv is None:
            raise RuntimeError("ThetaOptimizer(method='gn') needs set_blocks(hessian_blocks(...)) first")
        delta = -cfg.lr_rot * torch.einsum("nij,nj->ni", self._inv, grad)
        if self._dq is not None and self._small is not None:
            return theta + self.constraints.project_metric(delta, self._dq, self._small)
        return theta + delta * self.constraints.free


def weighted_average(thetas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Synchronisation (seed, "Scalable Training via Parallelization"):
    ``Theta = sum_m mu_m Theta_m / sum_m mu_m`` with ``mu_m`` the partition sizes."""
    if len(thetas) != len(weights) or not thetas:
        raise ValueError("weighted_average: thetas and weights must be non-empty and of equal length")
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weighted_average: weights must be >= 0 with a positive sum, got {list(weights)}")
    stack = torch.stack([t.to(torch.float64) for t in thetas])  # (M, N, 6)
    return torch.einsum("m,mnk->nk", w, stack) / w.sum()


# ------------------------------------------------------------------------------------------------
# Sparse least-squares reference


def _projector_blocks(res: dict[str, Tensor], batch: TrackBatch) -> tuple[Tensor, Tensor]:
    """Per track P = W - W J (J^T W J)^-1 J^T W for the xy (K+1 incl. vertex) and z residuals."""
    x, y = res["x"], res["y"]
    c, s = res["cos"][:, None], res["sin"][:, None]
    t = x.shape[0]
    zero = torch.zeros(t, 1, dtype=x.dtype)
    one = torch.ones(t, 1, dtype=x.dtype)
    jxy = torch.stack(
        [torch.cat([x * x + y * y, zero], 1), torch.cat([y * s + x * c, zero], 1), torch.cat([torch.ones_like(x), one], 1)],
        -1,
    )  # (T, K+1, 3): d e / d(kappa, phi, delta)
    wxy = torch.cat([res["w_xy"], res["wv_xy"][:, None]], 1)
    jz = torch.stack([-torch.cat([torch.ones_like(x), one], 1), -torch.cat([res["arc"], zero], 1)], -1)
    wz = torch.cat([res["w_z"], res["wv_z"][:, None]], 1)

    def proj(j: Tensor, w: Tensor) -> Tensor:
        j = j / j.abs().amax(1, keepdim=True).clamp_min(1e-30)  # column scaling (P is invariant)
        wj = w[..., None] * j  # (T, M, p)
        m = j.transpose(1, 2) @ wj  # (T, p, p)
        return torch.diag_embed(w) - wj @ torch.linalg.solve(m, wj.transpose(1, 2))

    return proj(jxy, wxy), proj(jz, wz)


@torch.no_grad()
def reference_solution(
    model: ITSAlignmentModel,
    batches: Sequence[TrackBatch],
    constraints: Constraints,
    *,
    n_iter: int = 2,
    ridge: float = 1e-9,
) -> Tensor:
    """Minimise C over Theta by Gauss-Newton on the linearised global least-squares problem,
    solved directly (sparse KKT with the constraints, ``scipy.sparse.linalg.spsolve``).
    Sets the model to the solution and returns Theta (N, 6). For small geometries."""
    n = model.n_sensors
    nn6 = 6 * n
    for _ in range(n_iter):
        hmat = sp.csr_matrix((nn6, nn6))
        grad = np.zeros(nn6)
        for batch in batches:
            res = model._evaluate(batch, model.phi.detach(), need_grad=True)
            ve, vz = _hit_theta_derivatives(model, batch, res)  # (T, K, 6)
            pxy, pz = _projector_blocks(res, batch)  # (T, K+1, K+1)
            a = (2.0 * ITSAlignmentModel._event_scale(res["event_ndf"])[batch.event]).numpy()  # (T,)
            t, k = batch.sensor.shape
            # measurement rows: per track K xy rows (+ vertex row with zero derivative), same for z
            cols = (6 * batch.sensor[..., None] + torch.arange(6)).numpy()  # (T, K, 6)
            for pmat, v in ((pxy, ve), (pz, vz)):
                pm = pmat[:, :k, :k].numpy() * a[:, None, None]  # vertex rows carry no Theta
                vals = v.numpy() * batch.mask.numpy()[..., None]
                rows = np.repeat(np.arange(t * k), 6)
                amat = sp.csr_matrix((vals.reshape(-1), (rows, cols.reshape(-1))), shape=(t * k, nn6))
                pblk = sp.block_diag(list(pm), format="csr")
                hmat = hmat + (amat.T @ (pblk @ amat)).tocsr()
            g = res["grad_g"]  # dC/dg per hit: gradient in Theta via the same derivative vectors
            gt = _grad_theta_from_hits(model, batch, g)
            grad += gt.reshape(-1).numpy()
        hmat = hmat + ridge * sp.diags(np.maximum(hmat.diagonal(), 1e-30))
        free = np.repeat(constraints.free[:, 0].numpy(), 6) > 0
        cons = [constraints.q.numpy()] if constraints.q.shape[1] else []
        fixed_rows = np.nonzero(~free)[0]
        if fixed_rows.size:
            cons.append(np.eye(nn6)[:, fixed_rows])
        qmat = np.concatenate(cons, 1) if cons else np.zeros((nn6, 0))
        m = qmat.shape[1]
        kkt = sp.bmat([[hmat, sp.csr_matrix(qmat)], [sp.csr_matrix(qmat.T), None]], format="csc")
        rhs = np.concatenate([-grad, np.zeros(m)])
        sol = spla.spsolve(kkt, rhs)
        delta = torch.from_numpy(sol[:nn6]).reshape(n, 6)
        model.set_theta(model.theta() + delta)
    return model.theta()


def _grad_theta_from_hits(model: ITSAlignmentModel, batch: TrackBatch, grad_g: Tensor) -> Tensor:
    grad_phi = model._phi_grad_from_hits(grad_g, batch.sensor, batch.local / model.half_size, model.n_sensors)
    return torch.einsum("npk,np->nk", model.jacobian(), grad_phi)


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
